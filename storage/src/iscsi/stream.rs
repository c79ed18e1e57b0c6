//! Whole PDUs to and from a byte stream (RFC 7143 section 11.1, digests section 13.1).
//!
//! On the wire a PDU is: the 48-byte BHS, TotalAHSLength words of additional header segments, a
//! header digest when negotiated, the data segment padded to 4 bytes, a data digest when
//! negotiated and the data segment is not empty. [`encode_pdu`] writes that; [`PduDecoder`] reads
//! it back from bytes that arrive in pieces of any size.
//!
//! The decoder takes only what it is given: it never panics, never allocates more than one
//! PDU's worth beyond the bytes it holds, and refuses a data segment longer than the bound it
//! was built with (our MaxRecvDataSegmentLength), before any of it arrives. A damaged stream
//! cannot be resynchronised (a PDU has no marker to find the next one), so the first error is
//! final and is returned by every later call.

use alloc::vec::Vec;
use core::fmt;

use super::digest::{crc32c, from_wire, to_wire, DIGEST_LEN};
use super::pdus::Pdu;
use crate::pdu::{padding_len, Bhs, PduError, BHS_LEN, MAX_DATA_SEGMENT_LENGTH};

/// Which digests a connection uses. Login PDUs never carry digests: the negotiated ones start
/// with the first PDU of the full feature phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    pub const NONE: Digests = Digests {
        header: false,
        data: false,
    };

    /// Every choice of digests, for tests that try them all.
    #[cfg(test)]
    pub(crate) const ALL: [Digests; 4] = [
        Digests::NONE,
        Digests {
            header: true,
            data: false,
        },
        Digests {
            header: false,
            data: true,
        },
        Digests {
            header: true,
            data: true,
        },
    ];
}

/// Why the inbound stream cannot be read any further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// The BHS is not valid (a reserved opcode).
    Header(PduError),
    /// The data segment is longer than we said we could receive.
    DataSegmentTooLong { len: u32, max: u32 },
    /// The header digest does not match: the lengths in it cannot be trusted either.
    HeaderDigest { received: u32, computed: u32 },
    /// The data digest does not match.
    DataDigest { received: u32, computed: u32 },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Header(e) => write!(f, "bad iSCSI header: {e}"),
            StreamError::DataSegmentTooLong { len, max } => write!(
                f,
                "data segment of {len} bytes exceeds our MaxRecvDataSegmentLength {max}"
            ),
            StreamError::HeaderDigest { received, computed } => write!(
                f,
                "header digest {received:#010x} does not match the computed {computed:#010x}"
            ),
            StreamError::DataDigest { received, computed } => write!(
                f,
                "data digest {received:#010x} does not match the computed {computed:#010x}"
            ),
        }
    }
}

impl core::error::Error for StreamError {}

/// Bytes `data_len` occupies on the wire after the header: padded data and its digest.
fn data_wire_len(data_len: usize, digests: Digests) -> usize {
    if data_len == 0 {
        return 0;
    }
    data_len + padding_len(data_len) + if digests.data { DIGEST_LEN } else { 0 }
}

/// Encoded length of a PDU.
pub fn encoded_len(ahs_len: usize, data_len: usize, digests: Digests) -> usize {
    BHS_LEN
        + ahs_len
        + if digests.header { DIGEST_LEN } else { 0 }
        + data_wire_len(data_len, digests)
}

/// Appends the wire form of a PDU with header `bhs` (its TotalAHSLength and DataSegmentLength are
/// set from `ahs` and `data`), `ahs` and `data` to `out`. On error nothing is appended.
pub fn encode_pdu(
    bhs: &Bhs,
    ahs: &[u8],
    data: &[u8],
    digests: Digests,
    out: &mut Vec<u8>,
) -> Result<(), PduError> {
    let mut bhs = *bhs;
    if ahs.len() % 4 != 0 || ahs.len() / 4 > usize::from(u8::MAX) {
        // An AHS must be whole words and fit the one-byte length: the nearest error is a length
        // that cannot be expressed.
        return Err(PduError::DataSegmentTooLong {
            len: ahs.len() as u32,
        });
    }
    bhs.total_ahs_length = (ahs.len() / 4) as u8;
    bhs.data_segment_length = u32::try_from(data.len())
        .ok()
        .filter(|len| *len <= MAX_DATA_SEGMENT_LENGTH)
        .ok_or(PduError::DataSegmentTooLong {
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
        })?;
    let header = bhs.to_bytes()?;
    out.reserve(encoded_len(ahs.len(), data.len(), digests));
    out.extend_from_slice(&header);
    out.extend_from_slice(ahs);
    if digests.header {
        out.extend_from_slice(&to_wire(crc32c(&[&header, ahs])));
    }
    if !data.is_empty() {
        let padding = [0u8; 3];
        let padding = &padding[..padding_len(data.len())];
        out.extend_from_slice(data);
        out.extend_from_slice(padding);
        if digests.data {
            out.extend_from_slice(&to_wire(crc32c(&[data, padding])));
        }
    }
    Ok(())
}

/// Size of each read the decoder offers a pipe.
const READ_CHUNK: usize = 16 * 1024;

/// Reassembles PDUs from stream bytes.
#[derive(Debug)]
pub struct PduDecoder {
    /// Received bytes; those before `start` were consumed already. Decoding advances `start`
    /// instead of shifting, so many small PDUs cost linear time.
    buf: Vec<u8>,
    start: usize,
    digests: Digests,
    max_data_segment_length: u32,
    failure: Option<StreamError>,
}

impl PduDecoder {
    /// A decoder that refuses data segments longer than `max_data_segment_length`.
    pub fn new(max_data_segment_length: u32) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            digests: Digests::NONE,
            max_data_segment_length,
            failure: None,
        }
    }

    /// Digests to expect from the next PDU on.
    pub fn set_digests(&mut self, digests: Digests) {
        self.digests = digests;
    }

    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// Changes the data segment bound (login uses the default 8192, full feature phase ours).
    pub fn set_max_data_segment_length(&mut self, max: u32) {
        self.max_data_segment_length = max;
    }

    /// Bytes received and not yet taken as PDUs.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Lets `read` write up to 16 KiB straight into the buffer; returns what it
    /// returned. The closure reports how many bytes it wrote (more is clamped).
    pub fn push_with<E>(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        self.compact();
        let old_len = self.buf.len();
        self.buf.resize(old_len + READ_CHUNK, 0);
        let result = read(&mut self.buf[old_len..]);
        let got = match &result {
            Ok(n) => (*n).min(READ_CHUNK),
            Err(_) => 0,
        };
        self.buf.truncate(old_len + got);
        result.map(|_| got)
    }

    fn compact(&mut self) {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// The next whole PDU, `Ok(None)` if more bytes are needed.
    pub fn next_pdu(&mut self) -> Result<Option<Pdu>, StreamError> {
        if let Some(error) = self.failure {
            return Err(error);
        }
        let result = self.decode_one();
        if let Err(error) = result {
            self.failure = Some(error);
        }
        result
    }

    fn decode_one(&mut self) -> Result<Option<Pdu>, StreamError> {
        let available = &self.buf[self.start..];
        if available.len() < BHS_LEN {
            return Ok(None);
        }
        let bhs = Bhs::decode(available).map_err(StreamError::Header)?;
        let header_len = BHS_LEN + bhs.total_ahs_len_bytes();
        let digest_len = if self.digests.header { DIGEST_LEN } else { 0 };
        // The header digest is checked before the lengths it covers are believed.
        if self.digests.header {
            let Some(header) = available.get(..header_len + DIGEST_LEN) else {
                return Ok(None);
            };
            let computed = crc32c(&[&header[..header_len]]);
            let received = read_digest(&header[header_len..]);
            if received != computed {
                return Err(StreamError::HeaderDigest { received, computed });
            }
        }
        if bhs.data_segment_length > self.max_data_segment_length {
            return Err(StreamError::DataSegmentTooLong {
                len: bhs.data_segment_length,
                max: self.max_data_segment_length,
            });
        }
        let data_len = bhs.data_segment_length as usize;
        let data_start = header_len + digest_len;
        let total = data_start + data_wire_len(data_len, self.digests);
        let Some(whole) = available.get(..total) else {
            return Ok(None);
        };
        let padded_end = data_start + data_len + padding_len(data_len);
        if self.digests.data && data_len > 0 {
            let computed = crc32c(&[&whole[data_start..padded_end]]);
            let received = read_digest(&whole[padded_end..]);
            if received != computed {
                return Err(StreamError::DataDigest { received, computed });
            }
        }
        let pdu = Pdu {
            bhs,
            ahs: whole[BHS_LEN..header_len].to_vec(),
            data: whole[data_start..data_start + data_len].to_vec(),
        };
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(pdu))
    }
}

fn read_digest(bytes: &[u8]) -> u32 {
    let mut word = [0u8; DIGEST_LEN];
    for (to, from) in word.iter_mut().zip(bytes) {
        *to = *from;
    }
    from_wire(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdus::{DataIn, NopOut, TargetSequence, RESERVED_TAG};
    use crate::pdu::{Lun, Opcode};

    fn data_in(len: usize) -> (Bhs, Vec<u8>) {
        let header = DataIn {
            final_: true,
            status: None,
            residual: Default::default(),
            lun: Lun::default(),
            itt: 1,
            ttt: RESERVED_TAG,
            sequence: TargetSequence::default(),
            data_sn: 0,
            buffer_offset: 0,
        };
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        (header.to_bhs(len as u32), data)
    }

    #[test]
    fn round_trip_byte_by_byte_with_every_digest_choice() {
        for digests in Digests::ALL {
            for len in [0usize, 1, 2, 3, 4, 5, 511, 8192] {
                let (bhs, data) = data_in(len);
                let mut wire = Vec::new();
                encode_pdu(&bhs, &[], &data, digests, &mut wire).unwrap();
                assert_eq!(wire.len(), encoded_len(0, len, digests));
                assert_eq!(wire.len() % 4, 0);
                let mut decoder = PduDecoder::new(8192);
                decoder.set_digests(digests);
                for (i, byte) in wire.iter().enumerate() {
                    assert_eq!(decoder.next_pdu().unwrap(), None, "early at {i}");
                    decoder.push(&[*byte]);
                }
                let pdu = decoder.next_pdu().unwrap().unwrap();
                assert_eq!(pdu.bhs, bhs);
                assert_eq!(pdu.data, data);
                assert_eq!(decoder.buffered(), 0);
                assert_eq!(decoder.next_pdu().unwrap(), None);
            }
        }
    }

    #[test]
    fn several_pdus_in_one_push() {
        let mut wire = Vec::new();
        for len in [3, 0, 9] {
            let (bhs, data) = data_in(len);
            encode_pdu(&bhs, &[], &data, Digests::NONE, &mut wire).unwrap();
        }
        let mut decoder = PduDecoder::new(100);
        decoder.push(&wire);
        let lens: Vec<usize> = core::iter::from_fn(|| decoder.next_pdu().unwrap())
            .map(|pdu| pdu.data.len())
            .collect();
        assert_eq!(lens, [3, 0, 9]);
    }

    #[test]
    fn ahs_is_carried_and_covered_by_the_header_digest() {
        let nop = NopOut {
            immediate: true,
            lun: Lun::default(),
            itt: 1,
            ttt: RESERVED_TAG,
            cmd_sn: 0,
            exp_stat_sn: 0,
        };
        let digests = Digests {
            header: true,
            data: true,
        };
        let mut wire = Vec::new();
        encode_pdu(&nop.to_bhs(0), &[1, 2, 3, 4], b"ping", digests, &mut wire).unwrap();
        assert_eq!(wire[4], 1, "TotalAHSLength in words");
        let mut decoder = PduDecoder::new(100);
        decoder.set_digests(digests);
        decoder.push(&wire);
        let pdu = decoder.next_pdu().unwrap().unwrap();
        assert_eq!(pdu.ahs, [1, 2, 3, 4]);
        assert_eq!(pdu.data, b"ping");

        wire[50] ^= 1; // inside the AHS
        let mut decoder = PduDecoder::new(100);
        decoder.set_digests(digests);
        decoder.push(&wire);
        assert!(matches!(
            decoder.next_pdu(),
            Err(StreamError::HeaderDigest { .. })
        ));
        assert!(
            matches!(decoder.next_pdu(), Err(StreamError::HeaderDigest { .. })),
            "errors are final"
        );
        assert!(encode_pdu(&nop.to_bhs(0), &[1, 2, 3], &[], digests, &mut wire).is_err());
    }

    #[test]
    fn data_digest_covers_the_padding() {
        let digests = Digests {
            header: false,
            data: true,
        };
        let (bhs, data) = data_in(5);
        let mut wire = Vec::new();
        encode_pdu(&bhs, &[], &data, digests, &mut wire).unwrap();
        assert_eq!(wire.len(), 48 + 8 + 4);
        wire[48 + 6] = 0xFF; // a padding byte
        let mut decoder = PduDecoder::new(100);
        decoder.set_digests(digests);
        decoder.push(&wire);
        assert!(matches!(
            decoder.next_pdu(),
            Err(StreamError::DataDigest { .. })
        ));
    }

    #[test]
    fn long_data_segments_are_refused_from_the_header_alone() {
        let (bhs, _) = data_in(0);
        let mut header = bhs;
        header.data_segment_length = 8193;
        let mut decoder = PduDecoder::new(8192);
        decoder.push(&header.to_bytes().unwrap());
        assert_eq!(
            decoder.next_pdu(),
            Err(StreamError::DataSegmentTooLong {
                len: 8193,
                max: 8192
            })
        );
    }

    #[test]
    fn reserved_opcodes_fail_the_stream() {
        let mut bytes = [0u8; BHS_LEN];
        bytes[0] = 0x07;
        let mut decoder = PduDecoder::new(100);
        decoder.push(&bytes);
        assert_eq!(
            decoder.next_pdu(),
            Err(StreamError::Header(PduError::UnknownOpcode { code: 0x07 }))
        );
    }

    #[test]
    fn push_with_reads_into_the_buffer_and_clamps() {
        let mut decoder = PduDecoder::new(100);
        let (bhs, data) = data_in(4);
        let mut wire = Vec::new();
        encode_pdu(&bhs, &[], &data, Digests::NONE, &mut wire).unwrap();
        let got = decoder
            .push_with(|buf| -> Result<usize, ()> {
                buf[..wire.len()].copy_from_slice(&wire);
                Ok(wire.len())
            })
            .unwrap();
        assert_eq!(got, wire.len());
        assert_eq!(decoder.buffered(), wire.len());
        assert_eq!(
            decoder.push_with(|_| -> Result<usize, ()> { Err(()) }),
            Err(())
        );
        assert_eq!(decoder.buffered(), wire.len(), "nothing added on error");
        let got = decoder
            .push_with(|_| -> Result<usize, ()> { Ok(usize::MAX) })
            .unwrap();
        assert_eq!(got, READ_CHUNK, "a pipe claiming too much is clamped");
        assert_eq!(
            decoder.next_pdu().unwrap().unwrap().bhs.opcode,
            Opcode::DataIn
        );
    }
}
