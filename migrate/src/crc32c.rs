//! CRC-32C (Castagnoli), the checksum of migration frames.
//!
//! Castagnoli's polynomial detects more error patterns than the IEEE CRC-32 at the same cost, and
//! it is the checksum iSCSI digests use too (RFC 7143 section 13.1), so one implementation serves
//! both. Parameters: reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF.
//!
//! A byte-at-a-time table lookup: 1 KiB of table built at compile time, no allocation, fast enough
//! for the link speeds of a first version (a later version can switch to the SSE4.2 `crc32`
//! instruction on the host without changing any value).

/// The Castagnoli polynomial, bit-reflected (LSB-first) as the table algorithm needs it.
const POLYNOMIAL_REFLECTED: u32 = 0x82F6_3B78;

/// `TABLE[b]` is the CRC register update for the byte value `b`.
const TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLYNOMIAL_REFLECTED
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
}

/// An incremental CRC-32C: feed the covered bytes in any number of pieces, then [`finish`].
///
/// [`finish`]: Crc32c::finish
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crc32c {
    register: u32,
}

impl Crc32c {
    /// A checksum over no bytes yet.
    pub const fn new() -> Self {
        Self {
            register: 0xFFFF_FFFF,
        }
    }

    /// Adds `bytes` to the checksummed data.
    pub fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            let index = (self.register ^ u32::from(byte)) & 0xFF;
            self.register = (self.register >> 8) ^ TABLE[index as usize];
        }
    }

    /// The CRC-32C of everything passed to [`update`](Self::update).
    pub const fn finish(&self) -> u32 {
        self.register ^ 0xFFFF_FFFF
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

/// The CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(bytes);
    crc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_check_value() {
        // The "check" value of the CRC-32C parameter set: the CRC of the ASCII digits 1 to 9.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn empty_input() {
        assert_eq!(crc32c(&[]), 0);
    }

    #[test]
    fn iscsi_test_vectors() {
        // RFC 3720 appendix B.4 (CRC examples for the iSCSI digests, same as RFC 7143's CRC-32C).
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: [u8; 32] = core::array::from_fn(|i| 31 - i as u8);
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
    }

    #[test]
    fn pieces_give_the_same_value_as_one_call() {
        let data = b"The quick brown fox jumps over the lazy dog";
        for split in 0..=data.len() {
            let mut crc = Crc32c::new();
            crc.update(&data[..split]);
            crc.update(&data[split..]);
            assert_eq!(crc.finish(), crc32c(data), "split at {split}");
        }
    }
}
