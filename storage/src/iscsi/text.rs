//! Text keys: the `key=value\0` data segments of Login and Text PDUs (RFC 7143 sections 6.1 and
//! 11.10-11.13).
//!
//! [`TextKeys`] is an ordered list of pairs (order matters: in a SendTargets answer each
//! TargetAddress belongs to the TargetName before it, and a key may repeat). [`TextAssembler`]
//! joins the data segments of a PDU sequence with the C (continue) bit set, since a pair may be
//! cut anywhere between two PDUs, and bounds the total so a target cannot make us buffer without
//! limit.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Longest key name (RFC 7143 section 6.1: at most 63 bytes).
pub const MAX_KEY_LEN: usize = 63;

/// Longest value we accept. Standard values are at most 255 bytes, but binary values (a CHAP
/// challenge in hex) may be up to 8192 (section 6.1, "large binary values").
pub const MAX_VALUE_LEN: usize = 8192;

/// Most text a sequence of continued PDUs may add up to. A SendTargets answer of a few hundred
/// targets fits comfortably.
pub const MAX_TEXT_LEN: usize = 256 * 1024;

/// Why text could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextError {
    /// The last pair is not terminated by a NUL byte.
    Unterminated,
    /// A pair without `=`, or with an empty key.
    MissingKey { at: usize },
    /// A key longer than [`MAX_KEY_LEN`] or with characters outside the allowed set.
    BadKey { at: usize },
    /// A value longer than [`MAX_VALUE_LEN`].
    ValueTooLong { at: usize, len: usize },
    /// Not UTF-8.
    NotUtf8 { at: usize },
    /// The text of a continued sequence grew past [`MAX_TEXT_LEN`].
    TooLong { len: usize },
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::Unterminated => f.write_str("text does not end in a NUL byte"),
            TextError::MissingKey { at } => write!(f, "text pair at byte {at} has no key"),
            TextError::BadKey { at } => write!(f, "text key at byte {at} is not a valid key"),
            TextError::ValueTooLong { at, len } => {
                write!(f, "text value at byte {at} is {len} bytes long")
            }
            TextError::NotUtf8 { at } => write!(f, "text pair at byte {at} is not UTF-8"),
            TextError::TooLong { len } => write!(
                f,
                "continued text of {len} bytes exceeds the {MAX_TEXT_LEN}-byte limit"
            ),
        }
    }
}

impl core::error::Error for TextError {}

/// Section 6.1: key names are letters, digits and `.-+@_`.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-+@_".contains(&b))
}

/// An ordered list of `key=value` pairs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextKeys {
    pairs: Vec<(String, String)>,
}

impl TextKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a pair.
    pub fn push(&mut self, key: &str, value: &str) {
        self.pairs.push((String::from(key), String::from(value)));
    }

    /// The value of the first pair named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    /// Every pair, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Appends every pair of `other`.
    pub fn extend(&mut self, other: TextKeys) {
        self.pairs.extend(other.pairs);
    }

    /// The data segment: each pair as `key=value` followed by a NUL.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in &self.pairs {
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        }
        out
    }

    /// Reads a data segment. Empty strings between NULs are skipped (some targets pad with
    /// extra NULs); everything else must be a well-formed pair.
    pub fn decode(bytes: &[u8]) -> Result<TextKeys, TextError> {
        let mut keys = TextKeys::new();
        if bytes.is_empty() {
            return Ok(keys);
        }
        if bytes.last() != Some(&0) {
            return Err(TextError::Unterminated);
        }
        let mut at = 0;
        for pair in bytes[..bytes.len() - 1].split(|b| *b == 0) {
            let start = at;
            at += pair.len() + 1;
            if pair.is_empty() {
                continue;
            }
            let text = core::str::from_utf8(pair).map_err(|_| TextError::NotUtf8 { at: start })?;
            let (key, value) = text
                .split_once('=')
                .ok_or(TextError::MissingKey { at: start })?;
            if key.is_empty() {
                return Err(TextError::MissingKey { at: start });
            }
            if !valid_key(key) {
                return Err(TextError::BadKey { at: start });
            }
            if value.len() > MAX_VALUE_LEN {
                return Err(TextError::ValueTooLong {
                    at: start,
                    len: value.len(),
                });
            }
            keys.push(key, value);
        }
        Ok(keys)
    }
}

/// Joins the data segments of a continued (C bit) PDU sequence.
#[derive(Debug, Default)]
pub struct TextAssembler {
    bytes: Vec<u8>,
}

impl TextAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one PDU's data segment.
    pub fn push(&mut self, data: &[u8]) -> Result<(), TextError> {
        let len = self.bytes.len() + data.len();
        if len > MAX_TEXT_LEN {
            return Err(TextError::TooLong { len });
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    /// The pairs of the whole sequence; the assembler is empty again afterwards.
    pub fn finish(&mut self) -> Result<TextKeys, TextError> {
        let bytes = core::mem::take(&mut self.bytes);
        TextKeys::decode(&bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn encode_and_decode_keep_order_and_repeats() {
        let mut keys = TextKeys::new();
        keys.push("TargetName", "iqn.2026-01.test:a");
        keys.push("TargetAddress", "127.0.0.1:3260,1");
        keys.push("TargetAddress", "[::1]:3260,1");
        keys.push("X-com.example.Empty", "");
        let bytes = keys.encode();
        assert_eq!(&bytes[..30], b"TargetName=iqn.2026-01.test:a\0");
        let decoded = TextKeys::decode(&bytes).unwrap();
        assert_eq!(decoded, keys);
        assert_eq!(decoded.get("TargetAddress"), Some("127.0.0.1:3260,1"));
        assert_eq!(decoded.get("X-com.example.Empty"), Some(""));
        assert_eq!(decoded.get("Missing"), None);
        assert_eq!(decoded.len(), 4);
    }

    #[test]
    fn values_may_hold_equals_signs() {
        let keys = TextKeys::decode(b"CHAP_C=0xab=cd\0").unwrap();
        assert_eq!(keys.get("CHAP_C"), Some("0xab=cd"));
    }

    #[test]
    fn malformed_text_is_refused() {
        assert_eq!(TextKeys::decode(b"A=1"), Err(TextError::Unterminated));
        assert_eq!(
            TextKeys::decode(b"A=1\0NoEquals\0"),
            Err(TextError::MissingKey { at: 4 })
        );
        assert_eq!(
            TextKeys::decode(b"=1\0"),
            Err(TextError::MissingKey { at: 0 })
        );
        assert_eq!(
            TextKeys::decode(b"Bad Key=1\0"),
            Err(TextError::BadKey { at: 0 })
        );
        assert_eq!(
            TextKeys::decode(b"A=\xff\0"),
            Err(TextError::NotUtf8 { at: 0 })
        );
        let long_key = [b'K'; 64];
        let mut text = long_key.to_vec();
        text.extend_from_slice(b"=1\0");
        assert_eq!(TextKeys::decode(&text), Err(TextError::BadKey { at: 0 }));
        let mut text = b"A=".to_vec();
        text.extend_from_slice(&[b'v'; MAX_VALUE_LEN + 1]);
        text.push(0);
        assert_eq!(
            TextKeys::decode(&text),
            Err(TextError::ValueTooLong {
                at: 0,
                len: MAX_VALUE_LEN + 1
            })
        );
    }

    #[test]
    fn extra_nuls_are_skipped() {
        let keys = TextKeys::decode(b"\0A=1\0\0B=2\0\0").unwrap();
        assert_eq!(keys.iter().collect::<Vec<_>>(), [("A", "1"), ("B", "2")]);
        assert!(TextKeys::decode(b"").unwrap().is_empty());
        assert!(TextKeys::decode(b"\0").unwrap().is_empty());
    }

    #[test]
    fn assembler_joins_pairs_cut_anywhere_and_is_bounded() {
        let mut keys = TextKeys::new();
        keys.push("SendTargets", "All");
        keys.push("TargetName", "iqn.x");
        let bytes = keys.encode();
        for cut in 0..=bytes.len() {
            let mut assembler = TextAssembler::new();
            assembler.push(&bytes[..cut]).unwrap();
            assembler.push(&bytes[cut..]).unwrap();
            assert_eq!(assembler.finish().unwrap(), keys);
            assert!(assembler.is_empty());
        }
        let mut assembler = TextAssembler::new();
        assembler.push(&vec![b'a'; MAX_TEXT_LEN]).unwrap();
        assert_eq!(
            assembler.push(b"b"),
            Err(TextError::TooLong {
                len: MAX_TEXT_LEN + 1
            })
        );
    }
}
