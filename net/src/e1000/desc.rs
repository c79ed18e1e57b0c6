//! Legacy receive and transmit descriptors (16 bytes each): the second 8-byte word as fields.
//!
//! Word 0 of both kinds is the buffer's device address. Word 1, little-endian:
//! - receive: length (16), packet checksum (16), status (8), errors (8), special (16);
//! - transmit: length (16), checksum offset (8), command (8), status (8), checksum start (8),
//!   special (16).

/// Bytes per descriptor.
pub const DESC_SIZE: usize = 16;

/// Receive descriptor status bits.
pub mod rx_status {
    /// Descriptor done: the device wrote this descriptor.
    pub const DD: u8 = 1 << 0;
    /// End of packet: last descriptor of a frame.
    pub const EOP: u8 = 1 << 1;
}

/// Receive descriptor error bits.
pub mod rx_errors {
    /// CRC or alignment error.
    pub const CE: u8 = 1 << 0;
    /// Symbol error.
    pub const SE: u8 = 1 << 1;
    /// Sequence error.
    pub const SEQ: u8 = 1 << 2;
    /// Carrier extension error.
    pub const CXE: u8 = 1 << 4;
    /// Receive data error.
    pub const RXE: u8 = 1 << 7;
    /// The errors that make a frame worthless (checksum-offload errors are not among them: the
    /// driver does not enable checksum offload).
    pub const FATAL: u8 = CE | SE | SEQ | CXE | RXE;
}

/// Transmit descriptor command bits.
pub mod tx_cmd {
    /// End of packet.
    pub const EOP: u8 = 1 << 0;
    /// Insert the frame check sequence.
    pub const IFCS: u8 = 1 << 1;
    /// Report status: set DD when done.
    pub const RS: u8 = 1 << 3;
}

/// Transmit descriptor status bits.
pub mod tx_status {
    /// Descriptor done.
    pub const DD: u8 = 1 << 0;
}

/// Word 1 of a legacy receive descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxDesc {
    pub length: u16,
    pub checksum: u16,
    pub status: u8,
    pub errors: u8,
    pub special: u16,
}

impl RxDesc {
    pub fn decode(word: u64) -> Self {
        RxDesc {
            length: word as u16,
            checksum: (word >> 16) as u16,
            status: (word >> 32) as u8,
            errors: (word >> 40) as u8,
            special: (word >> 48) as u16,
        }
    }

    pub fn encode(&self) -> u64 {
        u64::from(self.length)
            | (u64::from(self.checksum) << 16)
            | (u64::from(self.status) << 32)
            | (u64::from(self.errors) << 40)
            | (u64::from(self.special) << 48)
    }

    /// The device has written this descriptor.
    pub fn done(&self) -> bool {
        self.status & rx_status::DD != 0
    }

    /// Last descriptor of its frame.
    pub fn end_of_packet(&self) -> bool {
        self.status & rx_status::EOP != 0
    }

    /// The frame is damaged.
    pub fn has_errors(&self) -> bool {
        self.errors & rx_errors::FATAL != 0
    }
}

/// Word 1 of a legacy transmit descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxDesc {
    pub length: u16,
    pub cso: u8,
    pub cmd: u8,
    pub status: u8,
    pub css: u8,
    pub special: u16,
}

impl TxDesc {
    /// A whole frame of `length` bytes in one buffer: end of packet, insert FCS, report status.
    pub fn frame(length: u16) -> Self {
        TxDesc {
            length,
            cmd: tx_cmd::EOP | tx_cmd::IFCS | tx_cmd::RS,
            ..TxDesc::default()
        }
    }

    pub fn decode(word: u64) -> Self {
        TxDesc {
            length: word as u16,
            cso: (word >> 16) as u8,
            cmd: (word >> 24) as u8,
            status: (word >> 32) as u8,
            css: (word >> 40) as u8,
            special: (word >> 48) as u16,
        }
    }

    pub fn encode(&self) -> u64 {
        u64::from(self.length)
            | (u64::from(self.cso) << 16)
            | (u64::from(self.cmd) << 24)
            | (u64::from(self.status) << 32)
            | (u64::from(self.css) << 40)
            | (u64::from(self.special) << 48)
    }

    /// The device has sent this descriptor's buffer.
    pub fn done(&self) -> bool {
        self.status & tx_status::DD != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_layout_matches_the_manual() {
        // length 0x05EA, checksum 0xBEEF, status DD|EOP, errors CE, special 0x0123.
        let word = 0x0123_0103_BEEF_05EA_u64;
        let d = RxDesc::decode(word);
        assert_eq!(d.length, 0x05EA);
        assert_eq!(d.checksum, 0xBEEF);
        assert_eq!(d.status, 0x03);
        assert_eq!(d.errors, 0x01);
        assert_eq!(d.special, 0x0123);
        assert!(d.done() && d.end_of_packet() && d.has_errors());
        assert_eq!(d.encode(), word);
        assert!(!RxDesc::decode(0).done());
        // Checksum-offload error bits alone do not make a frame bad.
        let d = RxDesc {
            errors: 0x60,
            ..RxDesc::default()
        };
        assert!(!d.has_errors());
    }

    #[test]
    fn tx_layout_matches_the_manual() {
        let d = TxDesc::frame(60);
        assert_eq!(d.encode(), 60 | (0x0Bu64 << 24));
        let word = 0xABCD_1101_0B22_0040_u64;
        let d = TxDesc::decode(word);
        assert_eq!(
            d,
            TxDesc {
                length: 0x40,
                cso: 0x22,
                cmd: 0x0B,
                status: 0x01,
                css: 0x11,
                special: 0xABCD
            }
        );
        assert!(d.done());
        assert_eq!(d.encode(), word);
    }

    #[test]
    fn round_trips() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            assert_eq!(RxDesc::decode(x).encode(), x);
            assert_eq!(TxDesc::decode(x).encode(), x);
        }
    }
}
