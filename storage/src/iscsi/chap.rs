//! CHAP authentication in the login security stage (RFC 7143 section 12.1.3, RFC 1994).
//!
//! The target sends an identifier `CHAP_I` and a challenge `CHAP_C`; we answer with our name
//! `CHAP_N` and `CHAP_R = MD5(identifier byte, secret, challenge)`. With mutual CHAP we also send
//! our own identifier and challenge, and check the target's answer with the secret it should
//! know. Binary values travel as `0x` hexadecimal or `0b` base64 (section 6.1); we send hex.
//! Only MD5 (`CHAP_A=5`) is offered: it is the one algorithm RFC 7143 requires.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use md5::{Digest, Md5};

/// The CHAP algorithm number of MD5 (RFC 1994).
pub const CHAP_MD5: u8 = 5;

/// Shortest challenge we send, in bytes (RFC 7143 section 12.1.3 asks for at least as long as
/// the secret; 16 bytes is what common initiators use).
pub const CHALLENGE_LEN: usize = 16;

/// Longest binary value we decode: a hex value of [`super::text::MAX_VALUE_LEN`] characters.
const MAX_BINARY_LEN: usize = 4096;

/// A name and the secret shared with the other side.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    pub name: String,
    pub secret: Vec<u8>,
}

impl fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets stay out of logs.
        f.debug_struct("ChapCredentials")
            .field("name", &self.name)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// CHAP for a login: our credentials, and optionally the target's for mutual authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapConfig {
    /// The name and secret the target knows us by.
    pub initiator: ChapCredentials,
    /// The name and secret the target must prove it knows (mutual CHAP), if any.
    pub target: Option<ChapCredentials>,
}

/// Why a CHAP value could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapError {
    /// Not `0x`-hex or `0b`-base64, or a bad digit.
    BadEncoding,
    /// Longer than we accept.
    TooLong,
    /// `CHAP_I` is not a number from 0 to 255.
    BadIdentifier,
    /// The target chose an algorithm other than MD5.
    UnsupportedAlgorithm,
    /// A required CHAP key is missing from the target's response.
    MissingKey { key: &'static str },
    /// Mutual CHAP: the target's response does not prove it knows its secret.
    TargetNotAuthenticated,
    /// Mutual CHAP: the target sent our own challenge back (a reflection attack).
    ChallengeReflected,
}

impl fmt::Display for ChapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChapError::BadEncoding => f.write_str("CHAP value is not valid hex or base64"),
            ChapError::TooLong => f.write_str("CHAP value is too long"),
            ChapError::BadIdentifier => f.write_str("CHAP_I is not a number from 0 to 255"),
            ChapError::UnsupportedAlgorithm => {
                f.write_str("the target chose a CHAP algorithm other than MD5")
            }
            ChapError::MissingKey { key } => write!(f, "the target's CHAP response lacks {key}"),
            ChapError::TargetNotAuthenticated => {
                f.write_str("the target failed mutual CHAP authentication")
            }
            ChapError::ChallengeReflected => f.write_str("the target reflected our CHAP challenge"),
        }
    }
}

impl core::error::Error for ChapError {}

/// `MD5(identifier || secret || challenge)`, the CHAP response (RFC 1994 section 4.1).
pub fn response(identifier: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update([identifier]);
    md5.update(secret);
    md5.update(challenge);
    md5.finalize().into()
}

/// `0x` followed by lowercase hex digits.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 + bytes.len() * 2);
    text.push_str("0x");
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0F)]));
    }
    text
}

/// Decodes a binary value: `0x`/`0X` hex (an odd digit count has an implied leading zero) or
/// `0b`/`0B` base64.
pub fn decode_binary(value: &str) -> Result<Vec<u8>, ChapError> {
    if value.len() > 2 * MAX_BINARY_LEN + 2 {
        return Err(ChapError::TooLong);
    }
    let (prefix, body) = value.split_at_checked(2).ok_or(ChapError::BadEncoding)?;
    match prefix {
        "0x" | "0X" => decode_hex(body),
        "0b" | "0B" => decode_base64(body),
        _ => Err(ChapError::BadEncoding),
    }
}

fn hex_digit(c: u8) -> Result<u8, ChapError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(ChapError::BadEncoding),
    }
}

fn decode_hex(body: &str) -> Result<Vec<u8>, ChapError> {
    let digits = body.as_bytes();
    if digits.is_empty() {
        return Err(ChapError::BadEncoding);
    }
    let mut out = Vec::with_capacity(digits.len().div_ceil(2));
    let (head, rest) = if digits.len() % 2 == 1 {
        digits.split_at(1)
    } else {
        (&digits[..0], digits)
    };
    if let [single] = head {
        out.push(hex_digit(*single)?);
    }
    for [high, low] in rest.as_chunks::<2>().0 {
        out.push(hex_digit(*high)? << 4 | hex_digit(*low)?);
    }
    Ok(out)
}

fn base64_digit(c: u8) -> Result<u32, ChapError> {
    Ok(u32::from(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return Err(ChapError::BadEncoding),
    }))
}

fn decode_base64(body: &str) -> Result<Vec<u8>, ChapError> {
    let body = body.trim_end_matches('=');
    let digits = body.as_bytes();
    if digits.is_empty() || digits.len() % 4 == 1 {
        return Err(ChapError::BadEncoding);
    }
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut word = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            word |= base64_digit(*c)? << (18 - 6 * i);
        }
        let bytes = word.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

/// Parses `CHAP_I`: a decimal (or hex) number from 0 to 255.
pub fn parse_identifier(value: &str) -> Result<u8, ChapError> {
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|_| ChapError::BadIdentifier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Computed independently (Python's hashlib) for identifier 1, secret "secretsecret" and
    /// challenge 00 01 .. 0f.
    #[test]
    fn response_known_vector() {
        let challenge: Vec<u8> = (0u8..16).collect();
        let r = response(1, b"secretsecret", &challenge);
        assert_eq!(encode_hex(&r), "0x226dc576c33f04ff9c3a200ffe35f442");
    }

    /// MD5 itself, from RFC 1321's test suite: MD5("abc").
    #[test]
    fn md5_of_abc() {
        let r = response(b'a', b"b", b"c");
        assert_eq!(encode_hex(&r), "0x900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn hex_and_base64_decode() {
        assert_eq!(decode_binary("0x00ff10").unwrap(), [0x00, 0xff, 0x10]);
        assert_eq!(decode_binary("0XABC").unwrap(), [0x0a, 0xbc]);
        assert_eq!(decode_binary("0bAP8Q").unwrap(), [0x00, 0xff, 0x10]);
        assert_eq!(decode_binary("0bTWFu").unwrap(), b"Man");
        assert_eq!(decode_binary("0bTWE=").unwrap(), b"Ma");
        assert_eq!(decode_binary("0bTQ==").unwrap(), b"M");
        for bad in ["", "0", "0x", "0xzz", "ab12", "0b", "0bT", "0b!!!!", "0xé"] {
            assert_eq!(decode_binary(bad), Err(ChapError::BadEncoding), "{bad}");
        }
        let long = alloc::format!("0x{}", "00".repeat(MAX_BINARY_LEN + 1));
        assert_eq!(decode_binary(&long), Err(ChapError::TooLong));
        let bytes = vec![0xde, 0xad, 0xbe, 0xef];
        assert_eq!(decode_binary(&encode_hex(&bytes)).unwrap(), bytes);
    }

    #[test]
    fn identifiers() {
        assert_eq!(parse_identifier("0"), Ok(0));
        assert_eq!(parse_identifier("255"), Ok(255));
        assert_eq!(parse_identifier("0x1f"), Ok(31));
        assert_eq!(parse_identifier("256"), Err(ChapError::BadIdentifier));
        assert_eq!(parse_identifier("-1"), Err(ChapError::BadIdentifier));
    }

    #[test]
    fn secrets_are_not_printed() {
        let credentials = ChapCredentials {
            name: String::from("node1"),
            secret: b"verysecret12".to_vec(),
        };
        let text = alloc::format!("{credentials:?}");
        assert!(text.contains("node1"));
        assert!(!text.contains("verysecret"));
    }
}
