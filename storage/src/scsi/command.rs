//! Command Descriptor Blocks (CDBs) for the commands the hypervisor issues, with the data transfer
//! each one expects.
//!
//! Every builder lays out its CDB byte by byte from the standard that defines it; the layouts are
//! quoted next to each builder. Multi-byte fields are big-endian, as everywhere in SCSI. The last
//! byte of every CDB is CONTROL (SAM-5), always 0 here: no NACA, no linked commands.
//!
//! Transfer lengths are carried in [`DataDirection`] because the transport needs them before any
//! data moves: iSCSI puts the Expected Data Transfer Length in the SCSI Command PDU and sets its R
//! or W bit from the direction (RFC 7143 section 11.3).

use core::fmt;

use super::pr::{PrInAction, PrOutAction, ReservationType, PR_OUT_PARAMETER_LIST_LEN};

/// TEST UNIT READY (SPC-4).
pub const OP_TEST_UNIT_READY: u8 = 0x00;
/// INQUIRY (SPC-4).
pub const OP_INQUIRY: u8 = 0x12;
/// PERSISTENT RESERVE IN (SPC-4 6.15).
pub const OP_PERSISTENT_RESERVE_IN: u8 = 0x5E;
/// PERSISTENT RESERVE OUT (SPC-4 6.16).
pub const OP_PERSISTENT_RESERVE_OUT: u8 = 0x5F;
/// READ(16) (SBC-3).
pub const OP_READ_16: u8 = 0x88;
/// WRITE(16) (SBC-3).
pub const OP_WRITE_16: u8 = 0x8A;
/// SYNCHRONIZE CACHE(16) (SBC-3).
pub const OP_SYNCHRONIZE_CACHE_16: u8 = 0x91;
/// SERVICE ACTION IN(16), which carries READ CAPACITY(16) (SBC-3).
pub const OP_SERVICE_ACTION_IN_16: u8 = 0x9E;
/// REPORT LUNS (SPC-4).
pub const OP_REPORT_LUNS: u8 = 0xA0;
/// The SERVICE ACTION IN(16) service action of READ CAPACITY(16) (SBC-3).
pub const SA_READ_CAPACITY_16: u8 = 0x10;

/// The longest CDB carried without an additional header segment: iSCSI's BHS has room for 16
/// bytes (RFC 7143 section 11.3.5), and every command built here fits.
pub const MAX_CDB_LEN: usize = 16;

/// A Command Descriptor Block of at most [`MAX_CDB_LEN`] bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cdb {
    bytes: [u8; MAX_CDB_LEN],
    len: u8,
}

impl Cdb {
    /// A CDB holding `bytes`, or `None` if it is empty or longer than [`MAX_CDB_LEN`].
    pub fn new(bytes: &[u8]) -> Option<Cdb> {
        if bytes.is_empty() || bytes.len() > MAX_CDB_LEN {
            return None;
        }
        let mut cdb = Cdb {
            bytes: [0; MAX_CDB_LEN],
            len: bytes.len() as u8,
        };
        cdb.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(cdb)
    }

    /// The CDB's bytes, exactly as long as the command defines (6, 10, 12 or 16).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The CDB followed by zeros up to 16 bytes: the form the iSCSI BHS carries.
    pub fn padded(&self) -> [u8; MAX_CDB_LEN] {
        // `new` zeroes the tail, so the array is already padded.
        self.bytes
    }

    /// The operation code (byte 0).
    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }

    /// The length of the CDB in bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: a CDB has at least its operation code.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A CDB of fixed length `N` built from an array, for the builders below (all lengths fit).
    const fn from_array<const N: usize>(array: [u8; N]) -> Cdb {
        let mut bytes = [0; MAX_CDB_LEN];
        let mut i = 0;
        while i < N {
            bytes[i] = array[i];
            i += 1;
        }
        Cdb {
            bytes,
            len: N as u8,
        }
    }
}

impl fmt::Debug for Cdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cdb(")?;
        for (i, byte) in self.as_bytes().iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            write!(f, "{byte:02x}")?;
        }
        write!(f, ")")
    }
}

/// Which way data moves for a command, and how many bytes the initiator expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataDirection {
    /// No data phase.
    None,
    /// From the target to the initiator (iSCSI Data-In), at most this many bytes.
    In(u32),
    /// From the initiator to the target (iSCSI Data-Out or immediate data), this many bytes.
    Out(u32),
}

impl DataDirection {
    /// The expected data transfer length in bytes (0 for [`DataDirection::None`]).
    pub fn transfer_length(self) -> u32 {
        match self {
            DataDirection::None => 0,
            DataDirection::In(len) | DataDirection::Out(len) => len,
        }
    }
}

/// A READ(16) or WRITE(16) whose byte count does not fit the 32-bit transfer length of the
/// transport (iSCSI's Expected Data Transfer Length, RFC 7143 section 11.3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferTooLong {
    /// The requested number of logical blocks.
    pub blocks: u32,
    /// The logical block length in bytes.
    pub block_len: u32,
}

impl fmt::Display for TransferTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} blocks of {} bytes exceed the 4 GiB limit of one SCSI transfer",
            self.blocks, self.block_len
        )
    }
}

impl core::error::Error for TransferTooLong {}

/// A SCSI command ready to send: its CDB and the data transfer it expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Command {
    /// The Command Descriptor Block.
    pub cdb: Cdb,
    /// The data phase, with the expected transfer length in bytes.
    pub direction: DataDirection,
}

impl Command {
    /// TEST UNIT READY (SPC-4): no data; the usual way to collect a pending UNIT ATTENTION.
    ///
    /// ```text
    /// byte 0      opcode 0x00
    /// bytes 1..5  reserved
    /// byte 5      CONTROL
    /// ```
    pub fn test_unit_ready() -> Command {
        Command {
            cdb: Cdb::from_array([OP_TEST_UNIT_READY, 0, 0, 0, 0, 0]),
            direction: DataDirection::None,
        }
    }

    /// INQUIRY for the standard INQUIRY data (SPC-4; EVPD 0, page code 0). Parse the answer
    /// with [`super::StandardInquiry::parse`]; 36 bytes hold every field it reads.
    ///
    /// ```text
    /// byte 0      opcode 0x12
    /// byte 1      bit 0 EVPD (0)
    /// byte 2      PAGE CODE (0)
    /// bytes 3..5  ALLOCATION LENGTH
    /// byte 5      CONTROL
    /// ```
    pub fn inquiry(allocation_length: u16) -> Command {
        let [len_hi, len_lo] = allocation_length.to_be_bytes();
        Command {
            cdb: Cdb::from_array([OP_INQUIRY, 0, 0, len_hi, len_lo, 0]),
            direction: DataDirection::In(u32::from(allocation_length)),
        }
    }

    /// REPORT LUNS (SPC-4) with SELECT REPORT 0 (the logical units of the target, without
    /// well-known ones). SPC-4 requires an allocation length of at least 16 bytes. Parse the answer
    /// with [`super::parse_report_luns`].
    ///
    /// ```text
    /// byte 0       opcode 0xA0
    /// byte 1       reserved
    /// byte 2       SELECT REPORT
    /// bytes 3..6   reserved
    /// bytes 6..10  ALLOCATION LENGTH
    /// byte 10      reserved
    /// byte 11      CONTROL
    /// ```
    pub fn report_luns(allocation_length: u32) -> Command {
        let [a, b, c, d] = allocation_length.to_be_bytes();
        Command {
            cdb: Cdb::from_array([OP_REPORT_LUNS, 0, 0, 0, 0, 0, a, b, c, d, 0, 0]),
            direction: DataDirection::In(allocation_length),
        }
    }

    /// READ CAPACITY(16) (SBC-3): SERVICE ACTION IN(16) 0x9E with service action 0x10, PMI 0.
    /// The answer is 32 bytes; [`super::Capacity::parse`] needs the first 12.
    ///
    /// ```text
    /// byte 0        opcode 0x9E
    /// byte 1        bits 4..0 SERVICE ACTION (0x10)
    /// bytes 2..10   obsolete LOGICAL BLOCK ADDRESS (0)
    /// bytes 10..14  ALLOCATION LENGTH
    /// byte 14       bit 0 PMI (0)
    /// byte 15       CONTROL
    /// ```
    pub fn read_capacity16(allocation_length: u32) -> Command {
        let mut cdb = [0u8; 16];
        cdb[0] = OP_SERVICE_ACTION_IN_16;
        cdb[1] = SA_READ_CAPACITY_16;
        cdb[10..14].copy_from_slice(&allocation_length.to_be_bytes());
        Command {
            cdb: Cdb::from_array(cdb),
            direction: DataDirection::In(allocation_length),
        }
    }

    /// READ(16) (SBC-3) of `blocks` logical blocks of `block_len` bytes from `lba`, with DPO, FUA
    /// and RDPROTECT 0.
    ///
    /// ```text
    /// byte 0        opcode 0x88
    /// byte 1        RDPROTECT, DPO, FUA (0)
    /// bytes 2..10   LOGICAL BLOCK ADDRESS
    /// bytes 10..14  TRANSFER LENGTH, in logical blocks
    /// byte 14       GROUP NUMBER (0)
    /// byte 15       CONTROL
    /// ```
    ///
    /// # Panics
    ///
    /// If `blocks * block_len` exceeds `u32::MAX` bytes; [`Command::try_read16`] returns an error
    /// instead. Callers split I/O into much smaller pieces (iSCSI's MaxBurstLength) anyway.
    pub fn read16(lba: u64, blocks: u32, block_len: u32) -> Command {
        match Self::try_read16(lba, blocks, block_len) {
            Ok(command) => command,
            Err(error) => panic!("READ(16): {error}"),
        }
    }

    /// [`Command::read16`], or an error if the transfer does not fit 32 bits of bytes.
    pub fn try_read16(lba: u64, blocks: u32, block_len: u32) -> Result<Command, TransferTooLong> {
        let bytes = transfer_bytes(blocks, block_len)?;
        Ok(Command {
            cdb: block_cdb(OP_READ_16, lba, blocks),
            direction: DataDirection::In(bytes),
        })
    }

    /// WRITE(16) (SBC-3) of `blocks` logical blocks of `block_len` bytes at `lba`, with FUA 0:
    /// the data may sit in the target's volatile cache until [`Command::synchronize_cache16`].
    /// Same layout as READ(16) with opcode 0x8A (byte 1 holds WRPROTECT, DPO, FUA, all 0).
    ///
    /// # Panics
    ///
    /// If `blocks * block_len` exceeds `u32::MAX` bytes; see [`Command::try_write16`].
    pub fn write16(lba: u64, blocks: u32, block_len: u32) -> Command {
        match Self::try_write16(lba, blocks, block_len) {
            Ok(command) => command,
            Err(error) => panic!("WRITE(16): {error}"),
        }
    }

    /// [`Command::write16`], or an error if the transfer does not fit 32 bits of bytes.
    pub fn try_write16(lba: u64, blocks: u32, block_len: u32) -> Result<Command, TransferTooLong> {
        let bytes = transfer_bytes(blocks, block_len)?;
        Ok(Command {
            cdb: block_cdb(OP_WRITE_16, lba, blocks),
            direction: DataDirection::Out(bytes),
        })
    }

    /// SYNCHRONIZE CACHE(16) (SBC-3) of `blocks` blocks from `lba`; 0 blocks means from `lba` to
    /// the end of the medium, so `(0, 0)` flushes everything. IMMED is 0: the status arrives only
    /// once the data is on stable storage, which is the point of issuing it.
    ///
    /// ```text
    /// byte 0        opcode 0x91
    /// byte 1        bit 1 IMMED (0)
    /// bytes 2..10   LOGICAL BLOCK ADDRESS
    /// bytes 10..14  NUMBER OF LOGICAL BLOCKS
    /// byte 14       GROUP NUMBER (0)
    /// byte 15       CONTROL
    /// ```
    pub fn synchronize_cache16(lba: u64, blocks: u32) -> Command {
        Command {
            cdb: block_cdb(OP_SYNCHRONIZE_CACHE_16, lba, blocks),
            direction: DataDirection::None,
        }
    }

    /// PERSISTENT RESERVE IN (SPC-4 6.15). Parse READ KEYS with [`super::RegisteredKeys::parse`]
    /// (8 bytes of header plus 8 per key) and READ RESERVATION with
    /// [`super::ReservationStatus::parse`] (24 bytes hold it).
    ///
    /// ```text
    /// byte 0      opcode 0x5E
    /// byte 1      bits 4..0 SERVICE ACTION
    /// bytes 2..7  reserved
    /// bytes 7..9  ALLOCATION LENGTH
    /// byte 9      CONTROL
    /// ```
    pub fn persistent_reserve_in(action: PrInAction, allocation_length: u16) -> Command {
        let [len_hi, len_lo] = allocation_length.to_be_bytes();
        Command {
            cdb: Cdb::from_array([
                OP_PERSISTENT_RESERVE_IN,
                action.service_action(),
                0,
                0,
                0,
                0,
                0,
                len_hi,
                len_lo,
                0,
            ]),
            direction: DataDirection::In(u32::from(allocation_length)),
        }
    }

    /// PERSISTENT RESERVE OUT (SPC-4 6.16) with SCOPE 0 (the logical unit) and a 24-byte
    /// parameter list: send [`PrOutAction::parameter_list`] as the Data-Out.
    ///
    /// `kind` is the reservation type. RESERVE, RELEASE, PREEMPT and PREEMPT AND ABORT need it
    /// (the target answers ILLEGAL REQUEST without one); the other service actions ignore it.
    ///
    /// ```text
    /// byte 0      opcode 0x5F
    /// byte 1      bits 4..0 SERVICE ACTION
    /// byte 2      bits 7..4 SCOPE (0), bits 3..0 TYPE
    /// bytes 3..5  reserved
    /// bytes 5..9  PARAMETER LIST LENGTH (24)
    /// byte 9      CONTROL
    /// ```
    pub fn persistent_reserve_out(action: PrOutAction, kind: Option<ReservationType>) -> Command {
        let [a, b, c, d] = (PR_OUT_PARAMETER_LIST_LEN as u32).to_be_bytes();
        let scope_and_type = kind.map_or(0, ReservationType::code);
        Command {
            cdb: Cdb::from_array([
                OP_PERSISTENT_RESERVE_OUT,
                action.service_action(),
                scope_and_type,
                0,
                0,
                a,
                b,
                c,
                d,
                0,
            ]),
            direction: DataDirection::Out(PR_OUT_PARAMETER_LIST_LEN as u32),
        }
    }
}

/// Bytes moved by `blocks` blocks of `block_len` bytes, if that fits the 32-bit transfer length.
fn transfer_bytes(blocks: u32, block_len: u32) -> Result<u32, TransferTooLong> {
    blocks
        .checked_mul(block_len)
        .ok_or(TransferTooLong { blocks, block_len })
}

/// The 16-byte layout READ(16), WRITE(16) and SYNCHRONIZE CACHE(16) share: opcode, flags 0,
/// 8-byte LBA, 4-byte block count, group number 0, CONTROL 0.
fn block_cdb(opcode: u8, lba: u64, blocks: u32) -> Cdb {
    let mut cdb = [0u8; 16];
    cdb[0] = opcode;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Cdb::from_array(cdb)
}

#[cfg(test)]
mod tests {
    use super::super::pr::ReservationKey;
    use super::*;
    use alloc::format;
    use alloc::string::ToString;

    #[test]
    fn test_unit_ready_is_six_zero_bytes() {
        let command = Command::test_unit_ready();
        assert_eq!(command.cdb.as_bytes(), [0u8; 6]);
        assert_eq!(command.direction, DataDirection::None);
        assert_eq!(command.direction.transfer_length(), 0);
    }

    #[test]
    fn inquiry_layout() {
        let command = Command::inquiry(0x0124);
        assert_eq!(command.cdb.as_bytes(), [0x12, 0, 0, 0x01, 0x24, 0]);
        assert_eq!(command.direction, DataDirection::In(0x124));
    }

    #[test]
    fn report_luns_layout() {
        let command = Command::report_luns(0x0102_0304);
        assert_eq!(
            command.cdb.as_bytes(),
            [0xA0, 0, 0, 0, 0, 0, 0x01, 0x02, 0x03, 0x04, 0, 0]
        );
        assert_eq!(command.direction, DataDirection::In(0x0102_0304));
    }

    #[test]
    fn read_capacity16_layout() {
        let command = Command::read_capacity16(32);
        #[rustfmt::skip]
        let expected = [
            0x9E, 0x10,             // SERVICE ACTION IN(16), READ CAPACITY(16)
            0, 0, 0, 0, 0, 0, 0, 0, // obsolete LBA
            0, 0, 0, 32,            // ALLOCATION LENGTH
            0,                      // PMI 0
            0,                      // CONTROL
        ];
        assert_eq!(command.cdb.as_bytes(), expected);
        assert_eq!(command.direction, DataDirection::In(32));
    }

    #[test]
    fn read16_layout() {
        let command = Command::read16(0x0102_0304_0506_0708, 0x0A0B_0C0D, 1);
        #[rustfmt::skip]
        let expected = [
            0x88, 0x00,                                     // READ(16), no DPO/FUA
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // LBA
            0x0A, 0x0B, 0x0C, 0x0D,                         // TRANSFER LENGTH
            0x00,                                           // GROUP NUMBER
            0x00,                                           // CONTROL
        ];
        assert_eq!(command.cdb.as_bytes(), expected);
        assert_eq!(command.direction, DataDirection::In(0x0A0B_0C0D));
        let small = Command::read16(16, 8, 512);
        assert_eq!(small.direction, DataDirection::In(4096));
    }

    #[test]
    fn read16_matches_the_cdb_in_the_pdu_tests() {
        // The same READ(16) as in `pdu`'s SCSI Command example: LBA 16, 8 blocks.
        let command = Command::read16(16, 8, 512);
        assert_eq!(
            command.cdb.padded(),
            [0x88, 0x00, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x08, 0x00, 0x00]
        );
    }

    #[test]
    fn write16_layout() {
        let command = Command::write16(0xFFFF_FFFF_FFFF_FFFE, 1, 4096);
        #[rustfmt::skip]
        let expected = [
            0x8A, 0x00,                                     // WRITE(16), FUA 0
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, // LBA
            0x00, 0x00, 0x00, 0x01,                         // TRANSFER LENGTH
            0x00,
            0x00,
        ];
        assert_eq!(command.cdb.as_bytes(), expected);
        assert_eq!(command.direction, DataDirection::Out(4096));
    }

    #[test]
    fn transfers_beyond_four_gib_are_refused() {
        assert_eq!(
            Command::try_read16(0, 0x0080_0000, 512),
            Err(TransferTooLong {
                blocks: 0x0080_0000,
                block_len: 512
            })
        );
        assert!(Command::try_write16(0, u32::MAX, 2).is_err());
        // Exactly u32::MAX bytes still fits.
        assert_eq!(
            Command::try_read16(0, u32::MAX, 1).unwrap().direction,
            DataDirection::In(u32::MAX)
        );
        assert_eq!(
            TransferTooLong {
                blocks: 9,
                block_len: 1 << 30
            }
            .to_string(),
            "9 blocks of 1073741824 bytes exceed the 4 GiB limit of one SCSI transfer"
        );
    }

    #[test]
    #[should_panic(expected = "WRITE(16)")]
    fn write16_panics_on_overflow() {
        Command::write16(0, u32::MAX, 512);
    }

    #[test]
    fn synchronize_cache16_layout() {
        let command = Command::synchronize_cache16(0x10, 0x20);
        #[rustfmt::skip]
        let expected = [
            0x91, 0x00,                   // SYNCHRONIZE CACHE(16), IMMED 0
            0, 0, 0, 0, 0, 0, 0, 0x10,    // LBA
            0, 0, 0, 0x20,                // NUMBER OF LOGICAL BLOCKS
            0x00,
            0x00,
        ];
        assert_eq!(command.cdb.as_bytes(), expected);
        assert_eq!(command.direction, DataDirection::None);
        let whole = Command::synchronize_cache16(0, 0);
        assert_eq!(whole.cdb.as_bytes()[1..], [0u8; 15]);
    }

    #[test]
    fn persistent_reserve_in_layout() {
        let keys = Command::persistent_reserve_in(PrInAction::ReadKeys, 0x0208);
        assert_eq!(
            keys.cdb.as_bytes(),
            [0x5E, 0x00, 0, 0, 0, 0, 0, 0x02, 0x08, 0]
        );
        assert_eq!(keys.direction, DataDirection::In(0x208));
        let reservation = Command::persistent_reserve_in(PrInAction::ReadReservation, 24);
        assert_eq!(
            reservation.cdb.as_bytes(),
            [0x5E, 0x01, 0, 0, 0, 0, 0, 0, 24, 0]
        );
        let capabilities = Command::persistent_reserve_in(PrInAction::ReportCapabilities, 8);
        assert_eq!(
            capabilities.cdb.as_bytes(),
            [0x5E, 0x02, 0, 0, 0, 0, 0, 0, 8, 0]
        );
    }

    #[test]
    fn persistent_reserve_out_layout() {
        let key = ReservationKey(0x1122_3344_5566_7788);
        let cases = [
            (
                PrOutAction::Register {
                    key: ReservationKey(0),
                    new_key: key,
                },
                None,
                0x00,
                0x00,
            ),
            (
                PrOutAction::Reserve { key },
                Some(ReservationType::WriteExclusiveRegistrantsOnly),
                0x01,
                0x05,
            ),
            (
                PrOutAction::Release { key },
                Some(ReservationType::WriteExclusiveRegistrantsOnly),
                0x02,
                0x05,
            ),
            (PrOutAction::Clear { key }, None, 0x03, 0x00),
            (
                PrOutAction::Preempt {
                    key,
                    victim: ReservationKey(7),
                },
                Some(ReservationType::ExclusiveAccess),
                0x04,
                0x03,
            ),
            (
                PrOutAction::PreemptAndAbort {
                    key,
                    victim: ReservationKey(7),
                },
                Some(ReservationType::ExclusiveAccessAllRegistrants),
                0x05,
                0x08,
            ),
            (
                PrOutAction::RegisterAndIgnoreExistingKey { new_key: key },
                None,
                0x06,
                0x00,
            ),
        ];
        for (action, kind, service_action, type_byte) in cases {
            let command = Command::persistent_reserve_out(action, kind);
            assert_eq!(
                command.cdb.as_bytes(),
                [0x5F, service_action, type_byte, 0, 0, 0, 0, 0, 24, 0],
                "{action:?}"
            );
            assert_eq!(command.direction, DataDirection::Out(24));
        }
    }

    #[test]
    fn cdb_accessors() {
        let command = Command::read_capacity16(32);
        assert_eq!(command.cdb.len(), 16);
        assert!(!command.cdb.is_empty());
        assert_eq!(command.cdb.opcode(), 0x9E);
        let short = Command::test_unit_ready().cdb;
        assert_eq!(short.padded(), [0u8; 16]);
        assert_eq!(Cdb::new(&[0x12, 0, 0, 0, 36, 0]).unwrap().as_bytes()[4], 36);
        assert_eq!(Cdb::new(&[]), None);
        assert_eq!(Cdb::new(&[0; 17]), None);
        assert_eq!(
            Cdb::new(&[0; 16]).unwrap().padded(),
            Command::read16(0, 0, 512).cdb.padded().map(|_| 0)
        );
        assert_eq!(
            format!("{:?}", Command::inquiry(36).cdb),
            "Cdb(12 00 00 00 24 00)"
        );
    }
}
