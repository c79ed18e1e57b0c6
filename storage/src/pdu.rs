//! The iSCSI Basic Header Segment (BHS): the fixed 48-byte header every iSCSI PDU starts with
//! (RFC 7143 section 11.2).
//!
//! ```text
//! byte  0      bit 7 reserved, bit 6 I (immediate delivery), bits 5..0 opcode
//! byte  1      bit 7 F (final; T "transit" in Login PDUs), bits 6..0 opcode-specific flags
//! bytes 2..4   opcode-specific
//! byte  4      TotalAHSLength, in 4-byte words
//! bytes 5..8   DataSegmentLength, in bytes, 24 bits
//! bytes 8..16  LUN, or opcode-specific
//! bytes 16..20 Initiator Task Tag
//! bytes 20..48 opcode-specific
//! ```
//!
//! All integers are big-endian (RFC 7143 section 11: network byte order).
//!
//! [`Bhs`] keeps the opcode-specific areas as raw bytes, so every PDU type round-trips through it
//! unchanged; typed accessors cover what most PDUs share: the LUN and the command/status sequence
//! numbers. Their positions depend on the opcode, see [`SequenceField`]. The per-opcode PDU types
//! (SCSI Command, Login, R2T, ...) in `crate::iscsi::pdus` build on it, reading their own fields
//! with [`Bhs::tail_u32`] and its siblings.

use core::fmt;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// Largest DataSegmentLength the 24-bit field can carry.
pub const MAX_DATA_SEGMENT_LENGTH: u32 = 0x00FF_FFFF;

/// Byte 1, bit 7: the F (final) bit, named T (transit) in Login Request and Response PDUs.
pub const FINAL_BIT: u8 = 0x80;

/// Byte 0, bit 6: the I (immediate delivery) bit.
const IMMEDIATE_BIT: u8 = 0x40;

/// Byte 0, bits 5..0: the opcode. Bit 7 is reserved: written as 0, ignored when read.
const OPCODE_MASK: u8 = 0x3F;

/// Offset of the opcode-specific area at the end of the BHS.
const SPECIFIC_TAIL_OFFSET: usize = 20;

/// Every opcode of RFC 7143 section 11.1.1. Codes below 0x20 are sent by initiators, the others
/// by targets. The vendor-specific codes have one variant each, so that every value of this type
/// is a valid opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// 0x00
    NopOut,
    /// 0x01: encapsulates a SCSI Command Descriptor Block.
    ScsiCommand,
    /// 0x02
    TaskManagementRequest,
    /// 0x03
    LoginRequest,
    /// 0x04
    TextRequest,
    /// 0x05: SCSI Data-Out, for writes.
    DataOut,
    /// 0x06
    LogoutRequest,
    /// 0x10
    SnackRequest,
    /// 0x1c
    InitiatorVendorSpecific1C,
    /// 0x1d
    InitiatorVendorSpecific1D,
    /// 0x1e
    InitiatorVendorSpecific1E,
    /// 0x20
    NopIn,
    /// 0x21: SCSI status, and sense data if any.
    ScsiResponse,
    /// 0x22
    TaskManagementResponse,
    /// 0x23
    LoginResponse,
    /// 0x24
    TextResponse,
    /// 0x25: SCSI Data-In, for reads.
    DataIn,
    /// 0x26
    LogoutResponse,
    /// 0x31: R2T, the target is ready to receive write data.
    ReadyToTransfer,
    /// 0x32
    AsyncMessage,
    /// 0x3c
    TargetVendorSpecific3C,
    /// 0x3d
    TargetVendorSpecific3D,
    /// 0x3e
    TargetVendorSpecific3E,
    /// 0x3f
    Reject,
}

impl Opcode {
    /// Every opcode, in code order.
    pub const ALL: [Opcode; 24] = [
        Opcode::NopOut,
        Opcode::ScsiCommand,
        Opcode::TaskManagementRequest,
        Opcode::LoginRequest,
        Opcode::TextRequest,
        Opcode::DataOut,
        Opcode::LogoutRequest,
        Opcode::SnackRequest,
        Opcode::InitiatorVendorSpecific1C,
        Opcode::InitiatorVendorSpecific1D,
        Opcode::InitiatorVendorSpecific1E,
        Opcode::NopIn,
        Opcode::ScsiResponse,
        Opcode::TaskManagementResponse,
        Opcode::LoginResponse,
        Opcode::TextResponse,
        Opcode::DataIn,
        Opcode::LogoutResponse,
        Opcode::ReadyToTransfer,
        Opcode::AsyncMessage,
        Opcode::TargetVendorSpecific3C,
        Opcode::TargetVendorSpecific3D,
        Opcode::TargetVendorSpecific3E,
        Opcode::Reject,
    ];

    /// The 6-bit code of this opcode.
    pub const fn code(self) -> u8 {
        match self {
            Opcode::NopOut => 0x00,
            Opcode::ScsiCommand => 0x01,
            Opcode::TaskManagementRequest => 0x02,
            Opcode::LoginRequest => 0x03,
            Opcode::TextRequest => 0x04,
            Opcode::DataOut => 0x05,
            Opcode::LogoutRequest => 0x06,
            Opcode::SnackRequest => 0x10,
            Opcode::InitiatorVendorSpecific1C => 0x1c,
            Opcode::InitiatorVendorSpecific1D => 0x1d,
            Opcode::InitiatorVendorSpecific1E => 0x1e,
            Opcode::NopIn => 0x20,
            Opcode::ScsiResponse => 0x21,
            Opcode::TaskManagementResponse => 0x22,
            Opcode::LoginResponse => 0x23,
            Opcode::TextResponse => 0x24,
            Opcode::DataIn => 0x25,
            Opcode::LogoutResponse => 0x26,
            Opcode::ReadyToTransfer => 0x31,
            Opcode::AsyncMessage => 0x32,
            Opcode::TargetVendorSpecific3C => 0x3c,
            Opcode::TargetVendorSpecific3D => 0x3d,
            Opcode::TargetVendorSpecific3E => 0x3e,
            Opcode::Reject => 0x3f,
        }
    }

    /// The opcode with 6-bit code `code`, or [`PduError::UnknownOpcode`] for reserved codes.
    pub fn from_code(code: u8) -> Result<Self, PduError> {
        Self::ALL
            .into_iter()
            .find(|opcode| opcode.code() == code)
            .ok_or(PduError::UnknownOpcode { code })
    }

    /// Whether initiators send PDUs with this opcode (targets send the others).
    pub const fn is_initiator_opcode(self) -> bool {
        self.code() < 0x20
    }

    /// Whether the opcode's layout is vendor-defined, so no field beyond the common ones is known.
    pub const fn is_vendor_specific(self) -> bool {
        matches!(
            self,
            Opcode::InitiatorVendorSpecific1C
                | Opcode::InitiatorVendorSpecific1D
                | Opcode::InitiatorVendorSpecific1E
                | Opcode::TargetVendorSpecific3C
                | Opcode::TargetVendorSpecific3D
                | Opcode::TargetVendorSpecific3E
        )
    }
}

/// The sequence numbers that order commands and statuses on a session (RFC 7143 section 4.2.2).
///
/// Where they sit depends on the opcode, with a regular pattern:
/// - initiator PDUs that carry a command (NOP-Out, SCSI Command, Task Management, Login, Text,
///   Logout) have CmdSN at byte 24, and they, SCSI Data-Out and SNACK have ExpStatSN at byte 28;
/// - every non-vendor target PDU has StatSN at byte 24, ExpCmdSN at 28 and MaxCmdSN at 32 (in
///   Data-In, StatSN is only meaningful when its S bit is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SequenceField {
    CmdSn,
    ExpStatSn,
    StatSn,
    ExpCmdSn,
    MaxCmdSn,
}

impl SequenceField {
    /// Byte offset of this field in a BHS with `opcode`, or `None` if that PDU has no such field.
    pub const fn offset(self, opcode: Opcode) -> Option<usize> {
        let carries_command = matches!(
            opcode,
            Opcode::NopOut
                | Opcode::ScsiCommand
                | Opcode::TaskManagementRequest
                | Opcode::LoginRequest
                | Opcode::TextRequest
                | Opcode::LogoutRequest
        );
        let acknowledges_status =
            carries_command || matches!(opcode, Opcode::DataOut | Opcode::SnackRequest);
        let is_target_pdu = !opcode.is_initiator_opcode() && !opcode.is_vendor_specific();
        match self {
            SequenceField::CmdSn if carries_command => Some(24),
            SequenceField::ExpStatSn if acknowledges_status => Some(28),
            SequenceField::StatSn if is_target_pdu => Some(24),
            SequenceField::ExpCmdSn if is_target_pdu => Some(28),
            SequenceField::MaxCmdSn if is_target_pdu => Some(32),
            _ => None,
        }
    }
}

/// An 8-byte SCSI logical unit number as carried in the BHS (SAM: LUN byte 0 is BHS byte 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Lun(pub [u8; 8]);

impl Lun {
    /// Largest LUN of the single-level structure (flat space addressing, 14 bits).
    pub const MAX_SINGLE_LEVEL: u16 = 0x3FFF;

    /// The single-level LUN structure for `number`, the form targets such as tgt report:
    /// peripheral device addressing (method 00b, bus 0) below 256, flat space addressing (method
    /// 01b) from 256 to 16383, all other bytes zero.
    pub fn single_level(number: u16) -> Result<Lun, PduError> {
        let [high, low] = number.to_be_bytes();
        let first_byte = match number {
            0..=0xFF => 0x00,
            0x100..=Self::MAX_SINGLE_LEVEL => 0x40 | high,
            _ => return Err(PduError::LunOutOfRange { number }),
        };
        Ok(Lun([first_byte, low, 0, 0, 0, 0, 0, 0]))
    }

    /// The number of a single-level LUN in peripheral (bus 0) or flat space addressing, or `None`
    /// for any other structure (hierarchical levels, other buses, other addressing methods).
    pub fn single_level_number(&self) -> Option<u16> {
        let [first, second, rest @ ..] = self.0;
        if rest != [0; 6] {
            return None;
        }
        match first >> 6 {
            0b00 if first == 0 => Some(u16::from(second)),
            0b01 => Some(u16::from_be_bytes([first & 0x3F, second])),
            _ => None,
        }
    }
}

/// Why a BHS could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduError {
    /// The buffer is shorter than [`BHS_LEN`].
    ShortBuffer { needed: usize, available: usize },
    /// The opcode is reserved in RFC 7143.
    UnknownOpcode { code: u8 },
    /// The DataSegmentLength does not fit in 24 bits.
    DataSegmentTooLong { len: u32 },
    /// The LUN does not fit the single-level structure.
    LunOutOfRange { number: u16 },
    /// The PDU type of `opcode` has no such sequence number field.
    FieldNotInOpcode {
        opcode: Opcode,
        field: SequenceField,
    },
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PduError::ShortBuffer { needed, available } => write!(
                f,
                "buffer of {available} bytes is too short for a {needed}-byte iSCSI header"
            ),
            PduError::UnknownOpcode { code } => write!(f, "unknown iSCSI opcode {code:#04x}"),
            PduError::DataSegmentTooLong { len } => write!(
                f,
                "data segment length {len} exceeds the 24-bit limit {MAX_DATA_SEGMENT_LENGTH}"
            ),
            PduError::LunOutOfRange { number } => write!(
                f,
                "LUN {number} exceeds the single-level limit {}",
                Lun::MAX_SINGLE_LEVEL
            ),
            PduError::FieldNotInOpcode { opcode, field } => {
                write!(f, "{opcode:?} PDUs have no {field:?} field")
            }
        }
    }
}

impl core::error::Error for PduError {}

/// Number of zero bytes that follow a data segment (or AHS, or text) of `len` bytes: iSCSI pads
/// every segment to a multiple of 4 bytes, and the padding is not counted in its length field.
pub const fn padding_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// `len` rounded up to a multiple of 4: the bytes a segment of `len` bytes occupies on the wire.
/// `None` only if that does not fit in `usize`.
pub const fn padded_len(len: usize) -> Option<usize> {
    len.checked_add(padding_len(len))
}

/// A decoded Basic Header Segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bhs {
    pub opcode: Opcode,
    /// The I bit: deliver the command immediately, outside the CmdSN window.
    pub immediate: bool,
    /// Byte 1 whole: [`FINAL_BIT`] and the opcode-specific flags.
    pub flags: u8,
    /// Bytes 2..4, opcode-specific.
    pub specific_2_3: [u8; 2],
    /// Length of the additional header segments, in 4-byte words.
    pub total_ahs_length: u8,
    /// Length of the data segment in bytes, without padding; at most
    /// [`MAX_DATA_SEGMENT_LENGTH`].
    pub data_segment_length: u32,
    /// Bytes 8..16: the LUN (see [`Bhs::lun`]) or, e.g. in Login PDUs, opcode-specific fields.
    pub lun_or_specific_8_15: [u8; 8],
    /// Chosen by the initiator to match responses to its task; 0xFFFFFFFF is reserved.
    pub initiator_task_tag: u32,
    /// Bytes 20..48, opcode-specific; the sequence numbers live here.
    pub specific_20_47: [u8; 28],
}

impl Bhs {
    /// A BHS of `opcode` with every other field zero.
    pub const fn new(opcode: Opcode) -> Self {
        Self {
            opcode,
            immediate: false,
            flags: 0,
            specific_2_3: [0; 2],
            total_ahs_length: 0,
            data_segment_length: 0,
            lun_or_specific_8_15: [0; 8],
            initiator_task_tag: 0,
            specific_20_47: [0; 28],
        }
    }

    /// Decodes the BHS at the start of `bytes` (which may continue with the rest of the PDU).
    ///
    /// The reserved bit 7 of byte 0 is ignored, as RFC 7143 section 11 requires of receivers.
    pub fn decode(bytes: &[u8]) -> Result<Self, PduError> {
        let bytes: &[u8; BHS_LEN] = bytes
            .get(..BHS_LEN)
            .and_then(|head| head.try_into().ok())
            .ok_or(PduError::ShortBuffer {
                needed: BHS_LEN,
                available: bytes.len(),
            })?;
        let mut bhs = Bhs::new(Opcode::from_code(bytes[0] & OPCODE_MASK)?);
        bhs.immediate = bytes[0] & IMMEDIATE_BIT != 0;
        bhs.flags = bytes[1];
        bhs.specific_2_3.copy_from_slice(&bytes[2..4]);
        bhs.total_ahs_length = bytes[4];
        bhs.data_segment_length = u32::from_be_bytes([0, bytes[5], bytes[6], bytes[7]]);
        bhs.lun_or_specific_8_15.copy_from_slice(&bytes[8..16]);
        bhs.initiator_task_tag = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        bhs.specific_20_47.copy_from_slice(&bytes[20..48]);
        Ok(bhs)
    }

    /// Writes the BHS into the first [`BHS_LEN`] bytes of `out`.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<(), PduError> {
        if self.data_segment_length > MAX_DATA_SEGMENT_LENGTH {
            return Err(PduError::DataSegmentTooLong {
                len: self.data_segment_length,
            });
        }
        let available = out.len();
        let out = out.get_mut(..BHS_LEN).ok_or(PduError::ShortBuffer {
            needed: BHS_LEN,
            available,
        })?;
        out[0] = self.opcode.code() | if self.immediate { IMMEDIATE_BIT } else { 0 };
        out[1] = self.flags;
        out[2..4].copy_from_slice(&self.specific_2_3);
        out[4] = self.total_ahs_length;
        out[5..8].copy_from_slice(&self.data_segment_length.to_be_bytes()[1..]);
        out[8..16].copy_from_slice(&self.lun_or_specific_8_15);
        out[16..20].copy_from_slice(&self.initiator_task_tag.to_be_bytes());
        out[20..48].copy_from_slice(&self.specific_20_47);
        Ok(())
    }

    /// The encoded BHS.
    pub fn to_bytes(&self) -> Result<[u8; BHS_LEN], PduError> {
        let mut bytes = [0u8; BHS_LEN];
        self.encode_into(&mut bytes)?;
        Ok(bytes)
    }

    /// The F bit (the T bit in Login PDUs): this is the final PDU of a sequence.
    pub const fn is_final(&self) -> bool {
        self.flags & FINAL_BIT != 0
    }

    /// Sets or clears the F (or T) bit, keeping the other flags.
    pub fn set_final(&mut self, is_final: bool) {
        if is_final {
            self.flags |= FINAL_BIT;
        } else {
            self.flags &= !FINAL_BIT;
        }
    }

    /// Bytes 8..16 read as a LUN. Only meaningful for PDUs that address a logical unit.
    pub const fn lun(&self) -> Lun {
        Lun(self.lun_or_specific_8_15)
    }

    /// Stores `lun` in bytes 8..16.
    pub fn set_lun(&mut self, lun: Lun) {
        self.lun_or_specific_8_15 = lun.0;
    }

    /// Length of the additional header segments in bytes.
    pub const fn total_ahs_len_bytes(&self) -> usize {
        self.total_ahs_length as usize * 4
    }

    /// The sequence number `field`, or `None` if PDUs of this opcode have no such field.
    pub fn sequence_number(&self, field: SequenceField) -> Option<u32> {
        let start = field.offset(self.opcode)? - SPECIFIC_TAIL_OFFSET;
        let bytes = &self.specific_20_47[start..start + 4];
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Stores `value` in the sequence number `field`, or fails if PDUs of this opcode have none.
    pub fn set_sequence_number(
        &mut self,
        field: SequenceField,
        value: u32,
    ) -> Result<(), PduError> {
        let offset = field
            .offset(self.opcode)
            .ok_or(PduError::FieldNotInOpcode {
                opcode: self.opcode,
                field,
            })?;
        let start = offset - SPECIFIC_TAIL_OFFSET;
        self.specific_20_47[start..start + 4].copy_from_slice(&value.to_be_bytes());
        Ok(())
    }

    /// The big-endian `u32` at byte `offset` of the BHS, for the opcode-specific fields of the
    /// typed PDUs (`crate::iscsi::pdus`). Offsets outside bytes 20..48 read as 0: every caller
    /// passes a constant from RFC 7143 section 11, so that never happens, and a decoder must not
    /// panic on a typo either.
    pub fn tail_u32(&self, offset: usize) -> u32 {
        let mut word = [0u8; 4];
        if let Some(bytes) = self.tail_slice(offset, 4) {
            word.copy_from_slice(bytes);
        }
        u32::from_be_bytes(word)
    }

    /// The big-endian `u16` at byte `offset` (20..48) of the BHS; 0 outside.
    pub fn tail_u16(&self, offset: usize) -> u16 {
        let mut half = [0u8; 2];
        if let Some(bytes) = self.tail_slice(offset, 2) {
            half.copy_from_slice(bytes);
        }
        u16::from_be_bytes(half)
    }

    /// The byte at `offset` (20..48) of the BHS; 0 outside.
    pub fn tail_u8(&self, offset: usize) -> u8 {
        self.tail_slice(offset, 1).map_or(0, |bytes| bytes[0])
    }

    /// Stores `value` big-endian at byte `offset` (20..48) of the BHS; ignored outside.
    pub fn set_tail_u32(&mut self, offset: usize, value: u32) {
        if let Some(bytes) = self.tail_slice_mut(offset, 4) {
            bytes.copy_from_slice(&value.to_be_bytes());
        }
    }

    /// Stores `value` big-endian at byte `offset` (20..48) of the BHS; ignored outside.
    pub fn set_tail_u16(&mut self, offset: usize, value: u16) {
        if let Some(bytes) = self.tail_slice_mut(offset, 2) {
            bytes.copy_from_slice(&value.to_be_bytes());
        }
    }

    /// Stores `value` at byte `offset` (20..48) of the BHS; ignored outside.
    pub fn set_tail_u8(&mut self, offset: usize, value: u8) {
        if let Some(bytes) = self.tail_slice_mut(offset, 1) {
            bytes[0] = value;
        }
    }

    fn tail_slice(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let start = offset.checked_sub(SPECIFIC_TAIL_OFFSET)?;
        self.specific_20_47.get(start..start.checked_add(len)?)
    }

    fn tail_slice_mut(&mut self, offset: usize, len: usize) -> Option<&mut [u8]> {
        let start = offset.checked_sub(SPECIFIC_TAIL_OFFSET)?;
        self.specific_20_47.get_mut(start..start.checked_add(len)?)
    }

    /// CmdSN, in initiator PDUs that carry a command.
    pub fn cmd_sn(&self) -> Option<u32> {
        self.sequence_number(SequenceField::CmdSn)
    }

    /// ExpStatSN, in initiator PDUs other than the vendor-specific ones.
    pub fn exp_stat_sn(&self) -> Option<u32> {
        self.sequence_number(SequenceField::ExpStatSn)
    }

    /// StatSN, in target PDUs.
    pub fn stat_sn(&self) -> Option<u32> {
        self.sequence_number(SequenceField::StatSn)
    }

    /// ExpCmdSN, in target PDUs.
    pub fn exp_cmd_sn(&self) -> Option<u32> {
        self.sequence_number(SequenceField::ExpCmdSn)
    }

    /// MaxCmdSN, in target PDUs.
    pub fn max_cmd_sn(&self) -> Option<u32> {
        self.sequence_number(SequenceField::MaxCmdSn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    /// A Login Request laid out by hand from RFC 7143 section 11.12.
    #[rustfmt::skip]
    const LOGIN_REQUEST: [u8; 48] = [
        0x43,                   // I=1, opcode 0x03
        0x87,                   // T=1, C=0, CSG=1 (operational), NSG=3 (full feature)
        0x00, 0x00,             // Version-max 0, Version-min 0
        0x00,                   // TotalAHSLength
        0x00, 0x01, 0x2c,       // DataSegmentLength 300
        0x40, 0x00, 0x01, 0x37, 0x00, 0x00, // ISID (random type)
        0x00, 0x00,             // TSIH 0: a new session
        0x00, 0x00, 0x00, 0x01, // Initiator Task Tag 1
        0x00, 0x01, 0x00, 0x00, // CID 1, reserved
        0x00, 0x00, 0x00, 0x07, // CmdSN 7
        0x00, 0x00, 0x00, 0x00, // ExpStatSN 0
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // reserved
    ];

    /// A SCSI Command (READ(16) of 8 blocks at LBA 16 on LUN 1), from RFC 7143 section 11.3.
    #[rustfmt::skip]
    const SCSI_READ_COMMAND: [u8; 48] = [
        0x01,                   // I=0, opcode 0x01
        0xc1,                   // F=1, R=1, W=0, ATTR=1 (simple)
        0x00, 0x00,             // reserved
        0x00,                   // TotalAHSLength
        0x00, 0x00, 0x00,       // DataSegmentLength 0
        0x00, 0x01, 0, 0, 0, 0, 0, 0, // LUN 1
        0x00, 0x00, 0x00, 0x2a, // Initiator Task Tag 42
        0x00, 0x00, 0x10, 0x00, // Expected Data Transfer Length 4096
        0x00, 0x00, 0x00, 0x08, // CmdSN 8
        0x00, 0x00, 0x00, 0x03, // ExpStatSN 3
        // CDB: READ(16), LBA 16, 8 blocks.
        0x88, 0x00, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x08, 0x00, 0x00,
    ];

    /// The SCSI Response to that command, from RFC 7143 section 11.4.
    #[rustfmt::skip]
    const SCSI_RESPONSE: [u8; 48] = [
        0x21,                   // opcode 0x21
        0x80,                   // bit 7 always 1, no residual flags
        0x00, 0x00,             // Response 0 (completed at target), Status 0 (GOOD)
        0x00,                   // TotalAHSLength
        0x00, 0x00, 0x00,       // DataSegmentLength 0
        0, 0, 0, 0, 0, 0, 0, 0, // reserved
        0x00, 0x00, 0x00, 0x2a, // Initiator Task Tag 42
        0x00, 0x00, 0x00, 0x00, // SNACK Tag
        0x00, 0x00, 0x00, 0x03, // StatSN 3
        0x00, 0x00, 0x00, 0x09, // ExpCmdSN 9
        0x00, 0x00, 0x00, 0x18, // MaxCmdSN 24
        0, 0, 0, 0,             // ExpDataSN
        0, 0, 0, 0,             // Bidirectional Read Residual Count
        0, 0, 0, 0,             // Residual Count
    ];

    /// An R2T for LUN 300 (flat space addressing), from RFC 7143 section 11.8.
    #[rustfmt::skip]
    const READY_TO_TRANSFER: [u8; 48] = [
        0x31,                   // opcode 0x31
        0x80,                   // bit 7 always 1
        0x00, 0x00,             // reserved
        0x00,                   // TotalAHSLength
        0x00, 0x00, 0x00,       // DataSegmentLength 0
        0x41, 0x2c, 0, 0, 0, 0, 0, 0, // LUN 300
        0x12, 0x34, 0x56, 0x78, // Initiator Task Tag
        0x00, 0x00, 0x00, 0x05, // Target Transfer Tag
        0x00, 0x00, 0x00, 0x04, // StatSN 4
        0x00, 0x00, 0x00, 0x0a, // ExpCmdSN 10
        0x00, 0x00, 0x00, 0x19, // MaxCmdSN 25
        0x00, 0x00, 0x00, 0x00, // R2TSN 0
        0x00, 0x01, 0x00, 0x00, // Buffer Offset 65536
        0x00, 0x01, 0x00, 0x00, // Desired Data Transfer Length 65536
    ];

    #[test]
    fn login_request_decodes_and_round_trips() {
        let bhs = Bhs::decode(&LOGIN_REQUEST).unwrap();
        assert_eq!(bhs.opcode, Opcode::LoginRequest);
        assert!(bhs.immediate);
        assert!(bhs.is_final(), "T bit");
        assert_eq!(bhs.flags, 0x87);
        assert_eq!(bhs.total_ahs_length, 0);
        assert_eq!(bhs.data_segment_length, 300);
        assert_eq!(
            bhs.lun_or_specific_8_15,
            [0x40, 0x00, 0x01, 0x37, 0x00, 0x00, 0x00, 0x00]
        );
        assert_eq!(bhs.initiator_task_tag, 1);
        assert_eq!(bhs.cmd_sn(), Some(7));
        assert_eq!(bhs.exp_stat_sn(), Some(0));
        assert_eq!(bhs.stat_sn(), None);
        assert_eq!(bhs.to_bytes().unwrap(), LOGIN_REQUEST);
    }

    #[test]
    fn scsi_command_built_field_by_field_matches_the_layout() {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.flags = 0x41; // R=1, ATTR=simple
        bhs.set_final(true);
        bhs.set_lun(Lun::single_level(1).unwrap());
        bhs.initiator_task_tag = 42;
        bhs.specific_20_47[0..4].copy_from_slice(&4096u32.to_be_bytes());
        bhs.set_sequence_number(SequenceField::CmdSn, 8).unwrap();
        bhs.set_sequence_number(SequenceField::ExpStatSn, 3)
            .unwrap();
        bhs.specific_20_47[12..28].copy_from_slice(&SCSI_READ_COMMAND[32..48]);
        assert_eq!(bhs.to_bytes().unwrap(), SCSI_READ_COMMAND);
        assert_eq!(Bhs::decode(&SCSI_READ_COMMAND).unwrap(), bhs);
    }

    #[test]
    fn scsi_response_sequence_numbers() {
        let bhs = Bhs::decode(&SCSI_RESPONSE).unwrap();
        assert_eq!(bhs.opcode, Opcode::ScsiResponse);
        assert!(!bhs.immediate);
        assert!(bhs.is_final());
        assert_eq!(bhs.initiator_task_tag, 42);
        assert_eq!(bhs.stat_sn(), Some(3));
        assert_eq!(bhs.exp_cmd_sn(), Some(9));
        assert_eq!(bhs.max_cmd_sn(), Some(24));
        assert_eq!(bhs.cmd_sn(), None);
        assert_eq!(bhs.exp_stat_sn(), None);
        assert_eq!(bhs.to_bytes().unwrap(), SCSI_RESPONSE);
    }

    #[test]
    fn ready_to_transfer_with_flat_lun() {
        let bhs = Bhs::decode(&READY_TO_TRANSFER).unwrap();
        assert_eq!(bhs.opcode, Opcode::ReadyToTransfer);
        assert_eq!(bhs.lun().single_level_number(), Some(300));
        assert_eq!(bhs.initiator_task_tag, 0x1234_5678);
        assert_eq!(bhs.stat_sn(), Some(4));
        assert_eq!(bhs.exp_cmd_sn(), Some(10));
        assert_eq!(bhs.max_cmd_sn(), Some(25));
        assert_eq!(bhs.to_bytes().unwrap(), READY_TO_TRANSFER);
    }

    #[test]
    fn decode_reads_only_the_header_of_a_longer_pdu() {
        let mut pdu = LOGIN_REQUEST.to_vec();
        pdu.extend_from_slice(&[0xEE; 300]);
        assert_eq!(Bhs::decode(&pdu), Bhs::decode(&LOGIN_REQUEST));
    }

    #[test]
    fn reserved_bit_is_ignored_on_decode_and_cleared_on_encode() {
        let mut bytes = SCSI_RESPONSE;
        bytes[0] |= 0x80;
        let bhs = Bhs::decode(&bytes).unwrap();
        assert_eq!(bhs.opcode, Opcode::ScsiResponse);
        assert_eq!(bhs.to_bytes().unwrap(), SCSI_RESPONSE);
    }

    #[test]
    fn twenty_four_bit_data_segment_length() {
        let mut bhs = Bhs::new(Opcode::DataIn);
        bhs.data_segment_length = MAX_DATA_SEGMENT_LENGTH;
        let bytes = bhs.to_bytes().unwrap();
        assert_eq!(bytes[4..8], [0x00, 0xff, 0xff, 0xff]);
        assert_eq!(Bhs::decode(&bytes).unwrap().data_segment_length, 0xFF_FFFF);

        bhs.data_segment_length = MAX_DATA_SEGMENT_LENGTH + 1;
        assert_eq!(
            bhs.to_bytes(),
            Err(PduError::DataSegmentTooLong { len: 0x100_0000 })
        );
    }

    #[test]
    fn total_ahs_length_is_in_words() {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.total_ahs_length = 5;
        assert_eq!(bhs.total_ahs_len_bytes(), 20);
        assert_eq!(bhs.to_bytes().unwrap()[4], 5);
    }

    #[test]
    fn short_buffers_are_refused() {
        assert_eq!(
            Bhs::decode(&LOGIN_REQUEST[..47]),
            Err(PduError::ShortBuffer {
                needed: 48,
                available: 47
            })
        );
        assert_eq!(
            Bhs::decode(&[]),
            Err(PduError::ShortBuffer {
                needed: 48,
                available: 0
            })
        );
        let mut out = [0u8; 40];
        assert_eq!(
            Bhs::new(Opcode::NopOut).encode_into(&mut out),
            Err(PduError::ShortBuffer {
                needed: 48,
                available: 40
            })
        );
    }

    #[test]
    fn every_opcode_code_decodes_or_is_unknown() {
        let known: Vec<u8> = Opcode::ALL.iter().map(|opcode| opcode.code()).collect();
        assert_eq!(
            known,
            [
                0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x1c, 0x1d, 0x1e, 0x20, 0x21, 0x22,
                0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3c, 0x3d, 0x3e, 0x3f
            ]
        );
        for code in 0..=0x3F {
            let mut bytes = [0u8; BHS_LEN];
            bytes[0] = code;
            let decoded = Bhs::decode(&bytes).map(|bhs| bhs.opcode);
            if known.contains(&code) {
                let opcode = decoded.unwrap();
                assert_eq!(opcode.code(), code);
                assert_eq!(opcode.is_initiator_opcode(), code < 0x20);
                assert_eq!(Bhs::new(opcode).to_bytes().unwrap(), bytes);
            } else {
                assert_eq!(decoded, Err(PduError::UnknownOpcode { code }));
            }
        }
    }

    #[test]
    fn sequence_number_positions_follow_rfc_7143() {
        use SequenceField::*;
        let expect = |opcode: Opcode, fields: &[(SequenceField, Option<usize>)]| {
            for &(field, offset) in fields {
                assert_eq!(field.offset(opcode), offset, "{field:?} in {opcode:?}");
            }
        };
        for opcode in [
            Opcode::NopOut,
            Opcode::ScsiCommand,
            Opcode::TaskManagementRequest,
            Opcode::LoginRequest,
            Opcode::TextRequest,
            Opcode::LogoutRequest,
        ] {
            expect(
                opcode,
                &[(CmdSn, Some(24)), (ExpStatSn, Some(28)), (StatSn, None)],
            );
        }
        for opcode in [Opcode::DataOut, Opcode::SnackRequest] {
            expect(opcode, &[(CmdSn, None), (ExpStatSn, Some(28))]);
        }
        for opcode in [
            Opcode::NopIn,
            Opcode::ScsiResponse,
            Opcode::TaskManagementResponse,
            Opcode::LoginResponse,
            Opcode::TextResponse,
            Opcode::DataIn,
            Opcode::LogoutResponse,
            Opcode::ReadyToTransfer,
            Opcode::AsyncMessage,
            Opcode::Reject,
        ] {
            expect(
                opcode,
                &[
                    (StatSn, Some(24)),
                    (ExpCmdSn, Some(28)),
                    (MaxCmdSn, Some(32)),
                    (CmdSn, None),
                    (ExpStatSn, None),
                ],
            );
        }
        for opcode in Opcode::ALL.into_iter().filter(|op| op.is_vendor_specific()) {
            for field in [CmdSn, ExpStatSn, StatSn, ExpCmdSn, MaxCmdSn] {
                assert_eq!(field.offset(opcode), None);
            }
        }
    }

    #[test]
    fn setting_a_missing_sequence_number_is_refused() {
        let mut bhs = Bhs::new(Opcode::DataOut);
        assert_eq!(
            bhs.set_sequence_number(SequenceField::CmdSn, 1),
            Err(PduError::FieldNotInOpcode {
                opcode: Opcode::DataOut,
                field: SequenceField::CmdSn
            })
        );
        assert_eq!(bhs, Bhs::new(Opcode::DataOut), "nothing was written");
        bhs.set_sequence_number(SequenceField::ExpStatSn, 0xA1B2_C3D4)
            .unwrap();
        assert_eq!(bhs.to_bytes().unwrap()[28..32], [0xA1, 0xB2, 0xC3, 0xD4]);
    }

    #[test]
    fn tail_accessors_read_and_write_big_endian_and_ignore_bad_offsets() {
        let mut bhs = Bhs::decode(&READY_TO_TRANSFER).unwrap();
        assert_eq!(bhs.tail_u32(40), 65536, "Buffer Offset");
        assert_eq!(bhs.tail_u32(44), 65536, "Desired Data Transfer Length");
        assert_eq!(bhs.tail_u16(20), 0);
        assert_eq!(bhs.tail_u8(23), 5, "low byte of the Target Transfer Tag");
        bhs.set_tail_u32(36, 0x0102_0304);
        bhs.set_tail_u16(40, 0xA0B0);
        bhs.set_tail_u8(47, 0x7F);
        let bytes = bhs.to_bytes().unwrap();
        assert_eq!(bytes[36..40], [1, 2, 3, 4]);
        assert_eq!(bytes[40..42], [0xA0, 0xB0]);
        assert_eq!(bytes[47], 0x7F);
        // Outside the opcode-specific tail: reads give 0, writes change nothing.
        for offset in [0, 19, 45, 47, 48, usize::MAX] {
            let before = bhs;
            bhs.set_tail_u32(offset, u32::MAX);
            assert_eq!(bhs, before, "offset {offset}");
        }
        assert_eq!(bhs.tail_u32(46), 0);
        assert_eq!(bhs.tail_u16(usize::MAX), 0);
        assert_eq!(bhs.tail_u8(48), 0);
    }

    #[test]
    fn final_bit_keeps_other_flags() {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.flags = 0x21; // W=1, ATTR=simple
        bhs.set_final(true);
        assert_eq!(bhs.flags, 0xA1);
        assert!(bhs.is_final());
        bhs.set_final(false);
        assert_eq!(bhs.flags, 0x21);
        assert!(!bhs.is_final());
    }

    #[test]
    fn single_level_lun_encoding() {
        let cases: [(u16, [u8; 2]); 6] = [
            (0, [0x00, 0x00]),
            (5, [0x00, 0x05]),
            (255, [0x00, 0xff]),
            (256, [0x41, 0x00]),
            (300, [0x41, 0x2c]),
            (16383, [0x7f, 0xff]),
        ];
        for (number, first_two) in cases {
            let lun = Lun::single_level(number).unwrap();
            assert_eq!(lun.0[..2], first_two, "LUN {number}");
            assert_eq!(lun.0[2..], [0; 6], "LUN {number}");
            assert_eq!(lun.single_level_number(), Some(number));
        }
        assert_eq!(
            Lun::single_level(16384),
            Err(PduError::LunOutOfRange { number: 16384 })
        );
        assert_eq!(
            Lun::single_level(u16::MAX),
            Err(PduError::LunOutOfRange { number: u16::MAX })
        );
    }

    #[test]
    fn single_level_lun_decoding_rejects_other_structures() {
        // Flat space addressing of a small number is valid too.
        assert_eq!(
            Lun([0x40, 0x05, 0, 0, 0, 0, 0, 0]).single_level_number(),
            Some(5)
        );
        // Peripheral device addressing on bus 1.
        assert_eq!(
            Lun([0x01, 0x05, 0, 0, 0, 0, 0, 0]).single_level_number(),
            None
        );
        // Logical unit addressing method (10b) and extended addressing (11b).
        assert_eq!(
            Lun([0x80, 0x05, 0, 0, 0, 0, 0, 0]).single_level_number(),
            None
        );
        assert_eq!(
            Lun([0xC0, 0x05, 0, 0, 0, 0, 0, 0]).single_level_number(),
            None
        );
        // A second level.
        assert_eq!(
            Lun([0x00, 0x05, 0x00, 0x01, 0, 0, 0, 0]).single_level_number(),
            None
        );
    }

    #[test]
    fn padding_to_four_bytes() {
        let cases = [
            (0, 0),
            (1, 3),
            (2, 2),
            (3, 1),
            (4, 0),
            (5, 3),
            (300, 0),
            (301, 3),
        ];
        for (len, padding) in cases {
            assert_eq!(padding_len(len), padding, "len {len}");
            assert_eq!(padded_len(len), Some(len + padding), "len {len}");
        }
        assert_eq!(padded_len(usize::MAX - 3), Some(usize::MAX - 3));
        assert_eq!(padded_len(usize::MAX), None);
    }

    #[test]
    fn errors_display_as_sentences() {
        assert_eq!(
            PduError::UnknownOpcode { code: 0x07 }.to_string(),
            "unknown iSCSI opcode 0x07"
        );
        assert_eq!(
            PduError::FieldNotInOpcode {
                opcode: Opcode::DataOut,
                field: SequenceField::CmdSn
            }
            .to_string(),
            "DataOut PDUs have no CmdSn field"
        );
    }
}
