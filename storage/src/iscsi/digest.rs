//! CRC32C, the one digest iSCSI defines for headers and data segments (RFC 7143 section 13.1).
//!
//! The CRC register starts at all ones and is complemented at the end (the `crc` crate's
//! `CRC_32_ISCSI`). On the wire the value goes least significant byte first: RFC 7143's own
//! example of 32 zero bytes ends in `aa 36 91 8a` for the value 0x8A9136AA, so [`to_wire`] and
//! [`from_wire`] are little-endian although everything else in iSCSI is big-endian.
//! A data digest covers the data segment and its padding; a header digest the BHS and the AHS.

use crc::{Crc, CRC_32_ISCSI};

/// Length of a digest on the wire.
pub const DIGEST_LEN: usize = 4;

const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// The CRC32C of the concatenation of `parts` (e.g. a data segment, then its padding).
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut digest = CRC32C.digest();
    for part in parts {
        digest.update(part);
    }
    digest.finalize()
}

/// The bytes of `crc` as they travel.
pub const fn to_wire(crc: u32) -> [u8; DIGEST_LEN] {
    crc.to_le_bytes()
}

/// The value of a digest read from the wire.
pub const fn from_wire(bytes: [u8; DIGEST_LEN]) -> u32 {
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of RFC 7143 appendix B.4.
    #[test]
    fn rfc_7143_examples() {
        assert_eq!(to_wire(crc32c(&[&[0u8; 32]])), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(to_wire(crc32c(&[&[0xffu8; 32]])), [0x43, 0xab, 0xa8, 0x62]);
        let incrementing: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(to_wire(crc32c(&[&incrementing])), [0x4e, 0x79, 0xdd, 0x46]);
        let decrementing: [u8; 32] = core::array::from_fn(|i| 31 - i as u8);
        assert_eq!(to_wire(crc32c(&[&decrementing])), [0x5c, 0xdb, 0x3f, 0x11]);
        // An iSCSI Read (10) command PDU.
        #[rustfmt::skip]
        let read_pdu: [u8; 48] = [
            0x01, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0x14, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0, 0x14, 0, 0, 0, 0x18,
            0x28, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(to_wire(crc32c(&[&read_pdu])), [0x56, 0x3a, 0x96, 0xd9]);
    }

    #[test]
    fn parts_are_one_stream_and_wire_bytes_round_trip() {
        let data = b"123456789";
        assert_eq!(crc32c(&[data]), 0xE306_9283, "the CRC-32C check value");
        assert_eq!(crc32c(&[&data[..4], &data[4..]]), crc32c(&[data]));
        assert_eq!(from_wire(to_wire(0xE306_9283)), 0xE306_9283);
    }
}
