//! Decoders for the parameter data the target returns: standard INQUIRY data (SPC-4, INQUIRY),
//! READ CAPACITY(16) data (SBC-3) and REPORT LUNS data (SPC-4, REPORT LUNS).
//!
//! Every decoder takes the Data-In bytes as received, which may be shorter than the allocation
//! length (the target sends what it has) or shorter than the data (the allocation length cut it:
//! the decoders then return [`DataError::Truncated`] with the length to ask for). Bytes beyond the
//! data are ignored. No input makes a decoder panic.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::pdu::Lun;

/// Why parameter data could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataError {
    /// The data is shorter than its own header says, or than its fixed fields: `needed` bytes
    /// (the allocation length to retry with, for variable-length lists) but only `got`.
    Truncated { needed: usize, got: usize },
    /// A field holds a value the standard does not allow here.
    Invalid(&'static str),
    /// REPORT LUNS listed a LUN that is not a single-level peripheral or flat-space LUN.
    UnsupportedLun([u8; 8]),
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Truncated { needed, got } => write!(
                f,
                "SCSI parameter data is truncated: {got} bytes received, {needed} needed"
            ),
            DataError::Invalid(what) => write!(f, "invalid SCSI parameter data: {what}"),
            DataError::UnsupportedLun(bytes) => {
                write!(f, "LUN ")?;
                for byte in bytes {
                    write!(f, "{byte:02x}")?;
                }
                write!(f, " is not a single-level LUN")
            }
        }
    }
}

impl core::error::Error for DataError {}

/// `Ok` if `bytes` holds at least `needed` bytes.
pub(crate) fn check_len(bytes: &[u8], needed: usize) -> Result<(), DataError> {
    if bytes.len() < needed {
        Err(DataError::Truncated {
            needed,
            got: bytes.len(),
        })
    } else {
        Ok(())
    }
}

/// The big-endian `N`-byte field at `offset`.
fn field<const N: usize>(bytes: &[u8], offset: usize) -> Result<[u8; N], DataError> {
    let end = offset.saturating_add(N);
    check_len(bytes, end)?;
    bytes
        .get(offset..end)
        .and_then(|slice| slice.try_into().ok())
        .ok_or(DataError::Truncated {
            needed: end,
            got: bytes.len(),
        })
}

/// The big-endian u32 at `offset`.
pub(crate) fn be_u32(bytes: &[u8], offset: usize) -> Result<u32, DataError> {
    field(bytes, offset).map(u32::from_be_bytes)
}

/// The big-endian u64 at `offset`.
pub(crate) fn be_u64(bytes: &[u8], offset: usize) -> Result<u64, DataError> {
    field(bytes, offset).map(u64::from_be_bytes)
}

/// The PERIPHERAL DEVICE TYPE of a disk: a direct access block device (SBC).
pub const DIRECT_ACCESS_BLOCK_DEVICE: u8 = 0x00;

/// The fields of standard INQUIRY data the hypervisor looks at (SPC-4, standard INQUIRY data).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StandardInquiry {
    /// PERIPHERAL QUALIFIER (byte 0 bits 7..5): 0 connected, 1 not connected now, 3 no logical
    /// unit at this LUN (byte 0 is then 0x7F: qualifier 3, type 0x1F). tgt answers other commands
    /// to a missing LUN with ILLEGAL REQUEST 25/00.
    pub peripheral_qualifier: u8,
    /// PERIPHERAL DEVICE TYPE (byte 0 bits 4..0): 0x00 disk, 0x0C storage array controller (tgt's
    /// LUN 0), 0x1F unknown.
    pub peripheral_device_type: u8,
    /// RMB (byte 1 bit 7): removable medium.
    pub removable: bool,
    /// T10 VENDOR IDENTIFICATION (bytes 8..16), trailing spaces removed.
    pub vendor: String,
    /// PRODUCT IDENTIFICATION (bytes 16..32), trailing spaces removed.
    pub product: String,
    /// PRODUCT REVISION LEVEL (bytes 32..36), trailing spaces removed.
    pub revision: String,
}

impl StandardInquiry {
    /// Length of the standard INQUIRY data up to the end of PRODUCT REVISION LEVEL, the least SPC-4
    /// allows a device server to return and the allocation length to use.
    pub const LEN: usize = 36;

    /// Decodes standard INQUIRY data:
    ///
    /// ```text
    /// byte 0        bits 7..5 PERIPHERAL QUALIFIER, bits 4..0 PERIPHERAL DEVICE TYPE
    /// byte 1        bit 7 RMB
    /// byte 2        VERSION
    /// byte 3        NORMACA, HISUP, RESPONSE DATA FORMAT
    /// byte 4        ADDITIONAL LENGTH (n - 4)
    /// bytes 5..8    capability flags
    /// bytes 8..16   T10 VENDOR IDENTIFICATION, ASCII, space padded
    /// bytes 16..32  PRODUCT IDENTIFICATION
    /// bytes 32..36  PRODUCT REVISION LEVEL
    /// ```
    ///
    /// Bytes outside printable ASCII (the standard allows no others) become '?'.
    pub fn parse(bytes: &[u8]) -> Result<StandardInquiry, DataError> {
        check_len(bytes, Self::LEN)?;
        if usize::from(bytes[4]) + 5 < Self::LEN {
            return Err(DataError::Invalid(
                "standard INQUIRY data is shorter than 36 bytes",
            ));
        }
        Ok(StandardInquiry {
            peripheral_qualifier: bytes[0] >> 5,
            peripheral_device_type: bytes[0] & 0x1F,
            removable: bytes[1] & 0x80 != 0,
            vendor: ascii_field(&bytes[8..16]),
            product: ascii_field(&bytes[16..32]),
            revision: ascii_field(&bytes[32..36]),
        })
    }

    /// Whether a logical unit is connected at this LUN (peripheral qualifier 0).
    pub fn is_connected(&self) -> bool {
        self.peripheral_qualifier == 0
    }

    /// Whether the logical unit is a disk (direct access block device).
    pub fn is_disk(&self) -> bool {
        self.peripheral_device_type == DIRECT_ACCESS_BLOCK_DEVICE
    }
}

/// An INQUIRY ASCII field as a string: trailing spaces and NULs removed, anything not printable
/// ASCII replaced by '?'.
fn ascii_field(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .rposition(|&byte| byte != b' ' && byte != 0)
        .map_or(0, |last| last + 1);
    bytes[..end]
        .iter()
        .map(|&byte| {
            if (0x20..=0x7E).contains(&byte) {
                char::from(byte)
            } else {
                '?'
            }
        })
        .collect()
}

/// The size of a logical unit, from READ CAPACITY(16) (SBC-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capacity {
    /// RETURNED LOGICAL BLOCK ADDRESS: the address of the last block, so one less than the count.
    pub last_lba: u64,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub block_len: u32,
}

impl Capacity {
    /// The length of the full READ CAPACITY(16) data, the allocation length to use.
    pub const LEN: usize = 32;

    /// Decodes READ CAPACITY(16) parameter data (the first 12 of its 32 bytes):
    ///
    /// ```text
    /// bytes 0..8    RETURNED LOGICAL BLOCK ADDRESS
    /// bytes 8..12   LOGICAL BLOCK LENGTH IN BYTES
    /// byte 12       P_TYPE, PROT_EN
    /// byte 13       P_I_EXPONENT, LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
    /// bytes 14..16  LBPME, LBPRZ, LOWEST ALIGNED LOGICAL BLOCK ADDRESS
    /// bytes 16..32  reserved
    /// ```
    ///
    /// A block length of 0, and a size that does not fit 64 bits of bytes, are refused, so that
    /// [`Capacity::blocks`] and [`Capacity::bytes`] cannot overflow.
    pub fn parse(bytes: &[u8]) -> Result<Capacity, DataError> {
        let last_lba = be_u64(bytes, 0)?;
        let block_len = be_u32(bytes, 8)?;
        if block_len == 0 {
            return Err(DataError::Invalid("READ CAPACITY block length is 0"));
        }
        let fits = last_lba
            .checked_add(1)
            .and_then(|blocks| blocks.checked_mul(u64::from(block_len)))
            .is_some();
        if !fits {
            return Err(DataError::Invalid("READ CAPACITY size exceeds 2^64 bytes"));
        }
        Ok(Capacity {
            last_lba,
            block_len,
        })
    }

    /// The number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.last_lba.saturating_add(1)
    }

    /// The size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks().saturating_mul(u64::from(self.block_len))
    }
}

/// Decodes REPORT LUNS parameter data into LUN numbers, in the target's order:
///
/// ```text
/// bytes 0..4  LUN LIST LENGTH, in bytes (8 per LUN)
/// bytes 4..8  reserved
/// bytes 8..   8-byte LUNs
/// ```
///
/// Every LUN must be single-level, in peripheral device addressing (bus 0) or flat space
/// addressing (see [`Lun::single_level_number`]); tgt reports LUNs that way. Anything else
/// (hierarchical LUNs, other buses) is [`DataError::UnsupportedLun`] rather than silently left
/// out. If the allocation length cut the list, the error says the length to ask for.
pub fn parse_report_luns(bytes: &[u8]) -> Result<Vec<u16>, DataError> {
    check_len(bytes, 8)?;
    let list_len = usize::try_from(be_u32(bytes, 0)?)
        .map_err(|_| DataError::Invalid("REPORT LUNS list length overflows"))?;
    if list_len % 8 != 0 {
        return Err(DataError::Invalid(
            "REPORT LUNS list length is not a multiple of 8",
        ));
    }
    let end = 8usize.saturating_add(list_len);
    check_len(bytes, end)?;
    // `list_len` is a multiple of 8, so there is no remainder.
    let (entries, _) = bytes[8..end].as_chunks::<8>();
    entries
        .iter()
        .map(|&lun| {
            Lun(lun)
                .single_level_number()
                .ok_or(DataError::UnsupportedLun(lun))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    /// Standard INQUIRY data modelled on tgt 1.0.85's answer for a disk LUN, as iscsi-inq decodes
    /// it: SPC-3 (5), HiSup, response data format 2, CmdQue, "IET", "VIRTUAL-DISK", "0001". Cut
    /// at 36 bytes (tgt sends version descriptors after them).
    #[rustfmt::skip]
    const TGT_INQUIRY: [u8; 36] = [
        0x00, 0x00, 0x05, 0x12, 0x3B, 0x00, 0x00, 0x02,
        b'I', b'E', b'T', b' ', b' ', b' ', b' ', b' ',
        b'V', b'I', b'R', b'T', b'U', b'A', b'L', b'-',
        b'D', b'I', b'S', b'K', b' ', b' ', b' ', b' ',
        b'0', b'0', b'0', b'1',
    ];

    #[test]
    fn standard_inquiry() {
        let inquiry = StandardInquiry::parse(&TGT_INQUIRY).unwrap();
        assert_eq!(
            inquiry,
            StandardInquiry {
                peripheral_qualifier: 0,
                peripheral_device_type: 0,
                removable: false,
                vendor: "IET".to_string(),
                product: "VIRTUAL-DISK".to_string(),
                revision: "0001".to_string(),
            }
        );
        assert!(inquiry.is_connected());
        assert!(inquiry.is_disk());

        let mut controller = TGT_INQUIRY;
        controller[0] = 0x0C;
        controller[1] = 0x80;
        let controller = StandardInquiry::parse(&controller).unwrap();
        assert_eq!(controller.peripheral_device_type, 0x0C);
        assert!(controller.removable);
        assert!(!controller.is_disk());

        let mut missing = TGT_INQUIRY;
        missing[0] = 0x7F;
        let missing = StandardInquiry::parse(&missing).unwrap();
        assert_eq!(missing.peripheral_qualifier, 3);
        assert_eq!(missing.peripheral_device_type, 0x1F);
        assert!(!missing.is_connected());
    }

    #[test]
    fn inquiry_strings_are_sanitised() {
        let mut data = TGT_INQUIRY;
        data[8..16].copy_from_slice(b"A\x01B\xFF\0\0  ");
        data[16..32].copy_from_slice(&[b' '; 16]);
        let inquiry = StandardInquiry::parse(&data).unwrap();
        assert_eq!(inquiry.vendor, "A?B?");
        assert_eq!(inquiry.product, "");
    }

    #[test]
    fn short_inquiry_data_is_refused() {
        assert_eq!(
            StandardInquiry::parse(&TGT_INQUIRY[..35]),
            Err(DataError::Truncated {
                needed: 36,
                got: 35
            })
        );
        let mut short_header = TGT_INQUIRY;
        short_header[4] = 30;
        assert_eq!(
            StandardInquiry::parse(&short_header),
            Err(DataError::Invalid(
                "standard INQUIRY data is shorter than 36 bytes"
            ))
        );
        // Longer data (vendor-specific and version descriptors) is fine.
        let mut long = TGT_INQUIRY.to_vec();
        long.extend_from_slice(&[0; 60]);
        assert!(StandardInquiry::parse(&long).is_ok());
    }

    #[test]
    fn read_capacity16() {
        // tgt's answer for a 64 MiB file: last LBA 131071, 512-byte blocks, 8 per physical block.
        let mut data = [0u8; 32];
        data[4..8].copy_from_slice(&131_071u32.to_be_bytes());
        data[8..12].copy_from_slice(&512u32.to_be_bytes());
        data[13] = 0x03;
        let capacity = Capacity::parse(&data).unwrap();
        assert_eq!(
            capacity,
            Capacity {
                last_lba: 131_071,
                block_len: 512
            }
        );
        assert_eq!(capacity.blocks(), 131_072);
        assert_eq!(capacity.bytes(), 64 << 20);
        // 12 bytes are enough.
        assert_eq!(Capacity::parse(&data[..12]), Ok(capacity));
        assert_eq!(
            Capacity::parse(&data[..11]),
            Err(DataError::Truncated {
                needed: 12,
                got: 11
            })
        );
    }

    #[test]
    fn impossible_capacities_are_refused() {
        let mut zero_block = [0u8; 12];
        zero_block[7] = 1;
        assert_eq!(
            Capacity::parse(&zero_block),
            Err(DataError::Invalid("READ CAPACITY block length is 0"))
        );
        let mut all_ones = [0xFFu8; 12];
        all_ones[8..12].copy_from_slice(&1u32.to_be_bytes());
        assert!(Capacity::parse(&all_ones).is_err());
        let mut too_big = [0u8; 12];
        too_big[0] = 0x01; // last LBA 2^56
        too_big[8..12].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            Capacity::parse(&too_big),
            Err(DataError::Invalid("READ CAPACITY size exceeds 2^64 bytes"))
        );
        // 2^55 blocks of 512 bytes would be 2^64 bytes; one block less fits.
        let mut largest = [0u8; 12];
        largest[0..8].copy_from_slice(&((1u64 << 55) - 2).to_be_bytes());
        largest[8..12].copy_from_slice(&512u32.to_be_bytes());
        let capacity = Capacity::parse(&largest).unwrap();
        assert_eq!(capacity.bytes(), u64::MAX - 511);
    }

    #[test]
    fn report_luns() {
        #[rustfmt::skip]
        let data = [
            0, 0, 0, 32,  0, 0, 0, 0,       // 4 LUNs
            0x00, 0x00, 0, 0, 0, 0, 0, 0,   // LUN 0, peripheral addressing
            0x00, 0x01, 0, 0, 0, 0, 0, 0,   // LUN 1
            0x40, 0x02, 0, 0, 0, 0, 0, 0,   // LUN 2, flat space addressing
            0x41, 0x2C, 0, 0, 0, 0, 0, 0,   // LUN 300
        ];
        assert_eq!(parse_report_luns(&data).unwrap(), vec![0, 1, 2, 300]);
        assert_eq!(
            parse_report_luns(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
            Vec::<u16>::new()
        );
        // A 16-byte allocation length shows the first LUN only: ask for 40.
        assert_eq!(
            parse_report_luns(&data[..16]),
            Err(DataError::Truncated {
                needed: 40,
                got: 16
            })
        );
        assert_eq!(
            parse_report_luns(&data[..7]),
            Err(DataError::Truncated { needed: 8, got: 7 })
        );
        let mut odd = data;
        odd[3] = 31;
        assert_eq!(
            parse_report_luns(&odd),
            Err(DataError::Invalid(
                "REPORT LUNS list length is not a multiple of 8"
            ))
        );
        let mut hierarchical = data;
        hierarchical[11] = 0x01;
        assert_eq!(
            parse_report_luns(&hierarchical),
            Err(DataError::UnsupportedLun([0, 0, 0, 1, 0, 0, 0, 0]))
        );
        assert_eq!(
            DataError::UnsupportedLun([0, 0, 0, 1, 0, 0, 0, 0]).to_string(),
            "LUN 0000000100000000 is not a single-level LUN"
        );
    }

    #[test]
    fn errors_display_as_sentences() {
        assert_eq!(
            DataError::Truncated { needed: 24, got: 8 }.to_string(),
            "SCSI parameter data is truncated: 8 bytes received, 24 needed"
        );
        assert_eq!(
            DataError::Invalid("READ CAPACITY block length is 0").to_string(),
            "invalid SCSI parameter data: READ CAPACITY block length is 0"
        );
    }
}
