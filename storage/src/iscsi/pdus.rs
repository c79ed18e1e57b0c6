//! Typed iSCSI PDUs over [`Bhs`] (RFC 7143 section 11).
//!
//! Each PDU type is a plain struct of its header fields with `to_bhs` (building the 48-byte header
//! for a data segment of a given length) and `from_bhs` (reading them back). Data segments are
//! kept apart from the headers: write data goes onto the wire straight from the caller's buffer.
//! [`TargetPdu::parse`] and [`InitiatorPdu::parse`] turn a whole received [`Pdu`] into the typed
//! form, checking what the header alone cannot say (a SCSI Response's sense length, a Reject's
//! copy of the rejected header).
//!
//! Byte offsets below are those of the BHS, from the section 11 layouts.

use alloc::vec::Vec;
use core::fmt;

use crate::pdu::{Bhs, Lun, Opcode, BHS_LEN, FINAL_BIT};

/// The reserved tag value: "no task" in ITT and TTT fields (RFC 7143 section 11.18, 11.19).
pub const RESERVED_TAG: u32 = 0xFFFF_FFFF;

/// A whole PDU as it travels: header, additional header segments, data segment (without
/// padding or digests, which the stream codec adds and strips).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    /// The AHS bytes, a multiple of 4 long.
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

impl Pdu {
    /// A PDU of `bhs` and `data`, no AHS; the header's DataSegmentLength is set from `data`.
    pub fn new(mut bhs: Bhs, data: Vec<u8>) -> Self {
        bhs.data_segment_length = data.len() as u32;
        Self {
            bhs,
            ahs: Vec::new(),
            data,
        }
    }
}

/// Why a received PDU cannot be taken as the PDU its opcode names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// An initiator opcode from the target, or the reverse.
    WrongDirection { opcode: Opcode },
    /// A SCSI Response whose SenseLength runs past its data segment, or a data segment of 1 byte.
    SenseLength { sense_len: usize, data_len: usize },
    /// A Reject whose data segment is not the 48-byte header it rejects.
    RejectedHeaderMissing { data_len: usize },
    /// An additional header segment where none is defined (only SCSI Commands may carry one).
    UnexpectedAhs { opcode: Opcode },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::WrongDirection { opcode } => {
                write!(f, "{opcode:?} PDU travelling in the wrong direction")
            }
            ParseError::SenseLength {
                sense_len,
                data_len,
            } => write!(
                f,
                "sense length {sense_len} does not fit a {data_len}-byte data segment"
            ),
            ParseError::RejectedHeaderMissing { data_len } => write!(
                f,
                "Reject carries {data_len} bytes instead of the rejected 48-byte header"
            ),
            ParseError::UnexpectedAhs { opcode } => {
                write!(f, "{opcode:?} PDU with an additional header segment")
            }
        }
    }
}

impl core::error::Error for ParseError {}

fn lun_bhs(opcode: Opcode, lun: Lun, itt: u32, data_len: u32) -> Bhs {
    let mut bhs = Bhs::new(opcode);
    bhs.set_lun(lun);
    bhs.initiator_task_tag = itt;
    bhs.data_segment_length = data_len;
    bhs
}

/// The sequence numbers every target PDU carries at 24, 28 and 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetSequence {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl TargetSequence {
    fn read(bhs: &Bhs) -> Self {
        Self {
            stat_sn: bhs.tail_u32(24),
            exp_cmd_sn: bhs.tail_u32(28),
            max_cmd_sn: bhs.tail_u32(32),
        }
    }

    fn write(&self, bhs: &mut Bhs) {
        bhs.set_tail_u32(24, self.stat_sn);
        bhs.set_tail_u32(28, self.exp_cmd_sn);
        bhs.set_tail_u32(32, self.max_cmd_sn);
    }
}

/// SCSI task attributes (byte 1, bits 2..0 of a SCSI Command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAttribute {
    Untagged,
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

impl TaskAttribute {
    const fn code(self) -> u8 {
        match self {
            TaskAttribute::Untagged => 0,
            TaskAttribute::Simple => 1,
            TaskAttribute::Ordered => 2,
            TaskAttribute::HeadOfQueue => 3,
            TaskAttribute::Aca => 4,
        }
    }

    fn from_code(code: u8) -> Self {
        match code & 0x07 {
            1 => TaskAttribute::Simple,
            2 => TaskAttribute::Ordered,
            3 => TaskAttribute::HeadOfQueue,
            4 => TaskAttribute::Aca,
            _ => TaskAttribute::Untagged,
        }
    }
}

/// SCSI Command (0x01, section 11.3). CDBs of up to 16 bytes: the hypervisor issues no longer ones,
/// so no Extended CDB AHS is ever built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// No unsolicited Data-Out PDUs follow.
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attribute: TaskAttribute,
    pub lun: Lun,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The CDB, zero-padded to 16 bytes.
    pub cdb: [u8; 16],
}

impl ScsiCommand {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::ScsiCommand, self.lun, self.itt, data_len);
        bhs.immediate = self.immediate;
        bhs.flags = self.attribute.code()
            | if self.final_ { FINAL_BIT } else { 0 }
            | if self.read { 0x40 } else { 0 }
            | if self.write { 0x20 } else { 0 };
        bhs.set_tail_u32(20, self.expected_data_transfer_length);
        bhs.set_tail_u32(24, self.cmd_sn);
        bhs.set_tail_u32(28, self.exp_stat_sn);
        bhs.specific_20_47[12..28].copy_from_slice(&self.cdb);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&bhs.specific_20_47[12..28]);
        Self {
            immediate: bhs.immediate,
            final_: bhs.is_final(),
            read: bhs.flags & 0x40 != 0,
            write: bhs.flags & 0x20 != 0,
            attribute: TaskAttribute::from_code(bhs.flags),
            lun: bhs.lun(),
            itt: bhs.initiator_task_tag,
            expected_data_transfer_length: bhs.tail_u32(20),
            cmd_sn: bhs.tail_u32(24),
            exp_stat_sn: bhs.tail_u32(28),
            cdb,
        }
    }
}

/// How much data a target did not transfer (underflow) or could not (overflow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    #[default]
    None,
    /// Fewer bytes than the expected transfer length were moved (U bit).
    Underflow(u32),
    /// The command wanted more than the expected transfer length (O bit).
    Overflow(u32),
}

impl Residual {
    /// From the O (0x04) and U (0x02) bits of byte 1 and the Residual Count.
    fn from_flags(flags: u8, count: u32) -> Self {
        if flags & 0x04 != 0 {
            Residual::Overflow(count)
        } else if flags & 0x02 != 0 {
            Residual::Underflow(count)
        } else {
            Residual::None
        }
    }

    fn flags_and_count(self) -> (u8, u32) {
        match self {
            Residual::None => (0, 0),
            Residual::Overflow(count) => (0x04, count),
            Residual::Underflow(count) => (0x02, count),
        }
    }
}

/// SCSI Response (0x21, section 11.4). The data segment holds the sense data prefixed by its
/// 2-byte length, then any response data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    pub itt: u32,
    /// 0: command completed at target; 1: target failure.
    pub response: u8,
    pub status: u8,
    pub residual: Residual,
    pub sequence: TargetSequence,
    pub exp_data_sn: u32,
    pub sense: Vec<u8>,
}

impl ScsiResponse {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::ScsiResponse, Lun::default(), self.itt, data_len);
        let (flags, count) = self.residual.flags_and_count();
        bhs.flags = FINAL_BIT | flags;
        bhs.specific_2_3 = [self.response, self.status];
        self.sequence.write(&mut bhs);
        bhs.set_tail_u32(36, self.exp_data_sn);
        bhs.set_tail_u32(44, count);
        bhs
    }

    /// The data segment: SenseLength, then the sense bytes (empty when there is no sense).
    pub fn data_segment(&self) -> Vec<u8> {
        if self.sense.is_empty() {
            return Vec::new();
        }
        let mut data = Vec::with_capacity(2 + self.sense.len());
        data.extend_from_slice(&(self.sense.len() as u16).to_be_bytes());
        data.extend_from_slice(&self.sense);
        data
    }

    fn parse(bhs: &Bhs, data: &[u8]) -> Result<Self, ParseError> {
        let sense = match data {
            [] => Vec::new(),
            [high, low, rest @ ..] => {
                let sense_len = usize::from(u16::from_be_bytes([*high, *low]));
                rest.get(..sense_len)
                    .ok_or(ParseError::SenseLength {
                        sense_len,
                        data_len: data.len(),
                    })?
                    .to_vec()
            }
            [_] => {
                return Err(ParseError::SenseLength {
                    sense_len: 0,
                    data_len: 1,
                })
            }
        };
        Ok(Self {
            itt: bhs.initiator_task_tag,
            response: bhs.specific_2_3[0],
            status: bhs.specific_2_3[1],
            residual: Residual::from_flags(bhs.flags, bhs.tail_u32(44)),
            sequence: TargetSequence::read(bhs),
            exp_data_sn: bhs.tail_u32(36),
            sense,
        })
    }
}

/// SCSI Data-In (0x25, section 11.7). With the S bit it also carries the command's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    /// The S bit: `status` and the residual are valid, and this PDU completes the command.
    pub status: Option<u8>,
    pub residual: Residual,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub sequence: TargetSequence,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

impl DataIn {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::DataIn, self.lun, self.itt, data_len);
        let (residual_flags, count) = self.residual.flags_and_count();
        bhs.flags = if self.final_ { FINAL_BIT } else { 0 };
        if let Some(status) = self.status {
            bhs.flags |= 0x01 | residual_flags;
            bhs.specific_2_3[1] = status;
            bhs.set_tail_u32(44, count);
        }
        bhs.set_tail_u32(20, self.ttt);
        self.sequence.write(&mut bhs);
        bhs.set_tail_u32(36, self.data_sn);
        bhs.set_tail_u32(40, self.buffer_offset);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        let has_status = bhs.flags & 0x01 != 0;
        Self {
            final_: bhs.is_final(),
            status: has_status.then_some(bhs.specific_2_3[1]),
            residual: if has_status {
                Residual::from_flags(bhs.flags, bhs.tail_u32(44))
            } else {
                Residual::None
            },
            lun: bhs.lun(),
            itt: bhs.initiator_task_tag,
            ttt: bhs.tail_u32(20),
            sequence: TargetSequence::read(bhs),
            data_sn: bhs.tail_u32(36),
            buffer_offset: bhs.tail_u32(40),
        }
    }
}

/// SCSI Data-Out (0x05, section 11.7), unsolicited (TTT reserved) or answering an R2T.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

impl DataOut {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::DataOut, self.lun, self.itt, data_len);
        bhs.flags = if self.final_ { FINAL_BIT } else { 0 };
        bhs.set_tail_u32(20, self.ttt);
        bhs.set_tail_u32(28, self.exp_stat_sn);
        bhs.set_tail_u32(36, self.data_sn);
        bhs.set_tail_u32(40, self.buffer_offset);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        Self {
            final_: bhs.is_final(),
            lun: bhs.lun(),
            itt: bhs.initiator_task_tag,
            ttt: bhs.tail_u32(20),
            exp_stat_sn: bhs.tail_u32(28),
            data_sn: bhs.tail_u32(36),
            buffer_offset: bhs.tail_u32(40),
        }
    }
}

/// Ready To Transfer (0x31, section 11.8): the target asks for `desired_length` bytes of write
/// data from `buffer_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyToTransfer {
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub sequence: TargetSequence,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_length: u32,
}

impl ReadyToTransfer {
    pub fn to_bhs(&self) -> Bhs {
        let mut bhs = lun_bhs(Opcode::ReadyToTransfer, self.lun, self.itt, 0);
        bhs.flags = FINAL_BIT;
        bhs.set_tail_u32(20, self.ttt);
        self.sequence.write(&mut bhs);
        bhs.set_tail_u32(36, self.r2t_sn);
        bhs.set_tail_u32(40, self.buffer_offset);
        bhs.set_tail_u32(44, self.desired_length);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        Self {
            lun: bhs.lun(),
            itt: bhs.initiator_task_tag,
            ttt: bhs.tail_u32(20),
            sequence: TargetSequence::read(bhs),
            r2t_sn: bhs.tail_u32(36),
            buffer_offset: bhs.tail_u32(40),
            desired_length: bhs.tail_u32(44),
        }
    }
}

/// NOP-Out (0x00, section 11.18): our ping (ITT set, TTT reserved) or the answer to a target's
/// ping (ITT reserved, TTT echoed). The ping data travels in the data segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl NopOut {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::NopOut, self.lun, self.itt, data_len);
        bhs.immediate = self.immediate;
        bhs.flags = FINAL_BIT;
        bhs.set_tail_u32(20, self.ttt);
        bhs.set_tail_u32(24, self.cmd_sn);
        bhs.set_tail_u32(28, self.exp_stat_sn);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        Self {
            immediate: bhs.immediate,
            lun: bhs.lun(),
            itt: bhs.initiator_task_tag,
            ttt: bhs.tail_u32(20),
            cmd_sn: bhs.tail_u32(24),
            exp_stat_sn: bhs.tail_u32(28),
        }
    }
}

/// NOP-In (0x20, section 11.19): the answer to our ping (ITT set), or the target's own ping that
/// wants an answer when its TTT is not reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NopIn {
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub sequence: TargetSequence,
}

impl NopIn {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::NopIn, self.lun, self.itt, data_len);
        bhs.flags = FINAL_BIT;
        bhs.set_tail_u32(20, self.ttt);
        self.sequence.write(&mut bhs);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        Self {
            lun: bhs.lun(),
            itt: bhs.initiator_task_tag,
            ttt: bhs.tail_u32(20),
            sequence: TargetSequence::read(bhs),
        }
    }
}

/// Login stages (CSG/NSG, section 11.12.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Security,
    Operational,
    FullFeature,
    /// Stage code 2, reserved.
    Reserved,
}

impl Stage {
    pub const fn code(self) -> u8 {
        match self {
            Stage::Security => 0,
            Stage::Operational => 1,
            Stage::Reserved => 2,
            Stage::FullFeature => 3,
        }
    }

    pub const fn from_code(code: u8) -> Self {
        match code & 0x03 {
            0 => Stage::Security,
            1 => Stage::Operational,
            2 => Stage::Reserved,
            _ => Stage::FullFeature,
        }
    }
}

/// The Initiator Session ID (section 11.12.5): 6 bytes, `T A B C D`. We use type 01b,
/// "random": A (6 bits) reserved, B and C (24 bits) a random number, D (16 bits) a qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Isid(pub [u8; 6]);

impl Isid {
    /// A random-type ISID with the low 24 bits of `random` in B and C and `qualifier` in D.
    pub const fn random_type(random: u32, qualifier: u16) -> Self {
        let r = random.to_be_bytes();
        let q = qualifier.to_be_bytes();
        Isid([0x40, r[1], r[2], r[3], q[0], q[1]])
    }
}

impl Isid {
    /// A random-type ISID derived from `name` (64-bit FNV-1a), so one initiator keeps the same
    /// ISID across reconnections (session reinstatement, section 6.3.5) and two initiators of
    /// different names get different ones.
    pub const fn for_name(name: &str) -> Self {
        let bytes = name.as_bytes();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0;
        while i < bytes.len() {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        Isid::random_type(hash as u32, (hash >> 32) as u16)
    }
}

fn login_flags(transit: bool, continue_: bool, csg: Stage, nsg: Stage) -> u8 {
    (if transit { FINAL_BIT } else { 0 })
        | (if continue_ { 0x40 } else { 0 })
        | (csg.code() << 2)
        | if transit { nsg.code() } else { 0 }
}

/// Login Request (0x03, section 11.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub isid: Isid,
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl LoginRequest {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = Bhs::new(Opcode::LoginRequest);
        bhs.immediate = true;
        bhs.flags = login_flags(self.transit, self.continue_, self.csg, self.nsg);
        bhs.data_segment_length = data_len;
        bhs.lun_or_specific_8_15[..6].copy_from_slice(&self.isid.0);
        bhs.lun_or_specific_8_15[6..].copy_from_slice(&self.tsih.to_be_bytes());
        bhs.initiator_task_tag = self.itt;
        bhs.set_tail_u16(20, self.cid);
        bhs.set_tail_u32(24, self.cmd_sn);
        bhs.set_tail_u32(28, self.exp_stat_sn);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&bhs.lun_or_specific_8_15[..6]);
        Self {
            transit: bhs.flags & FINAL_BIT != 0,
            continue_: bhs.flags & 0x40 != 0,
            csg: Stage::from_code(bhs.flags >> 2),
            nsg: Stage::from_code(bhs.flags),
            isid: Isid(isid),
            tsih: u16::from_be_bytes([bhs.lun_or_specific_8_15[6], bhs.lun_or_specific_8_15[7]]),
            itt: bhs.initiator_task_tag,
            cid: bhs.tail_u16(20),
            cmd_sn: bhs.tail_u32(24),
            exp_stat_sn: bhs.tail_u32(28),
        }
    }
}

/// Login Response (0x23, section 11.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: Isid,
    pub tsih: u16,
    pub itt: u32,
    pub sequence: TargetSequence,
    pub status_class: u8,
    pub status_detail: u8,
}

impl LoginResponse {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = Bhs::new(Opcode::LoginResponse);
        bhs.flags = login_flags(self.transit, self.continue_, self.csg, self.nsg);
        bhs.specific_2_3 = [self.version_max, self.version_active];
        bhs.data_segment_length = data_len;
        bhs.lun_or_specific_8_15[..6].copy_from_slice(&self.isid.0);
        bhs.lun_or_specific_8_15[6..].copy_from_slice(&self.tsih.to_be_bytes());
        bhs.initiator_task_tag = self.itt;
        self.sequence.write(&mut bhs);
        bhs.set_tail_u8(36, self.status_class);
        bhs.set_tail_u8(37, self.status_detail);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        let request = LoginRequest::from_bhs(bhs);
        Self {
            transit: request.transit,
            continue_: request.continue_,
            csg: request.csg,
            nsg: request.nsg,
            version_max: bhs.specific_2_3[0],
            version_active: bhs.specific_2_3[1],
            isid: request.isid,
            tsih: request.tsih,
            itt: bhs.initiator_task_tag,
            sequence: TargetSequence::read(bhs),
            status_class: bhs.tail_u8(36),
            status_detail: bhs.tail_u8(37),
        }
    }
}

/// Text Request (0x04, section 11.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub itt: u32,
    /// Reserved on a new request; the target's TTT when asking for the rest of a long answer.
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl TextRequest {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::TextRequest, Lun::default(), self.itt, data_len);
        bhs.immediate = self.immediate;
        bhs.flags =
            (if self.final_ { FINAL_BIT } else { 0 }) | if self.continue_ { 0x40 } else { 0 };
        bhs.set_tail_u32(20, self.ttt);
        bhs.set_tail_u32(24, self.cmd_sn);
        bhs.set_tail_u32(28, self.exp_stat_sn);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        Self {
            immediate: bhs.immediate,
            final_: bhs.is_final(),
            continue_: bhs.flags & 0x40 != 0,
            itt: bhs.initiator_task_tag,
            ttt: bhs.tail_u32(20),
            cmd_sn: bhs.tail_u32(24),
            exp_stat_sn: bhs.tail_u32(28),
        }
    }
}

/// Text Response (0x24, section 11.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    /// The text in this PDU continues in the next one (a key=value may be cut anywhere).
    pub continue_: bool,
    pub itt: u32,
    pub ttt: u32,
    pub sequence: TargetSequence,
}

impl TextResponse {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::TextResponse, Lun::default(), self.itt, data_len);
        bhs.flags =
            (if self.final_ { FINAL_BIT } else { 0 }) | if self.continue_ { 0x40 } else { 0 };
        bhs.set_tail_u32(20, self.ttt);
        self.sequence.write(&mut bhs);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        Self {
            final_: bhs.is_final(),
            continue_: bhs.flags & 0x40 != 0,
            itt: bhs.initiator_task_tag,
            ttt: bhs.tail_u32(20),
            sequence: TargetSequence::read(bhs),
        }
    }
}

/// Logout reason codes (section 11.14.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutReason {
    CloseSession,
    CloseConnection,
    RemoveConnectionForRecovery,
    Other(u8),
}

impl LogoutReason {
    pub const fn code(self) -> u8 {
        match self {
            LogoutReason::CloseSession => 0,
            LogoutReason::CloseConnection => 1,
            LogoutReason::RemoveConnectionForRecovery => 2,
            LogoutReason::Other(code) => code & 0x7F,
        }
    }

    pub const fn from_code(code: u8) -> Self {
        match code & 0x7F {
            0 => LogoutReason::CloseSession,
            1 => LogoutReason::CloseConnection,
            2 => LogoutReason::RemoveConnectionForRecovery,
            other => LogoutReason::Other(other),
        }
    }
}

/// Logout Request (0x06, section 11.14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl LogoutRequest {
    pub fn to_bhs(&self) -> Bhs {
        let mut bhs = lun_bhs(Opcode::LogoutRequest, Lun::default(), self.itt, 0);
        bhs.immediate = self.immediate;
        bhs.flags = FINAL_BIT | self.reason.code();
        bhs.set_tail_u16(20, self.cid);
        bhs.set_tail_u32(24, self.cmd_sn);
        bhs.set_tail_u32(28, self.exp_stat_sn);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        Self {
            immediate: bhs.immediate,
            reason: LogoutReason::from_code(bhs.flags),
            itt: bhs.initiator_task_tag,
            cid: bhs.tail_u16(20),
            cmd_sn: bhs.tail_u32(24),
            exp_stat_sn: bhs.tail_u32(28),
        }
    }
}

/// Logout Response (0x26, section 11.15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutResponse {
    /// 0 closed successfully, 1 CID not found, 2 recovery not supported, 3 cleanup failed.
    pub response: u8,
    pub itt: u32,
    pub sequence: TargetSequence,
    pub time2wait: u16,
    pub time2retain: u16,
}

impl LogoutResponse {
    pub fn to_bhs(&self) -> Bhs {
        let mut bhs = lun_bhs(Opcode::LogoutResponse, Lun::default(), self.itt, 0);
        bhs.flags = FINAL_BIT;
        bhs.specific_2_3[0] = self.response;
        self.sequence.write(&mut bhs);
        bhs.set_tail_u16(40, self.time2wait);
        bhs.set_tail_u16(42, self.time2retain);
        bhs
    }

    pub fn from_bhs(bhs: &Bhs) -> Self {
        Self {
            response: bhs.specific_2_3[0],
            itt: bhs.initiator_task_tag,
            sequence: TargetSequence::read(bhs),
            time2wait: bhs.tail_u16(40),
            time2retain: bhs.tail_u16(42),
        }
    }
}

/// Reject reasons (section 11.17.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    DataDigestError,
    SnackReject,
    ProtocolError,
    CommandNotSupported,
    ImmediateCommandReject,
    TaskInProgress,
    InvalidDataAck,
    InvalidPduField,
    LongOperationReject,
    WaitingForLogout,
    Other(u8),
}

impl RejectReason {
    pub const fn code(self) -> u8 {
        match self {
            RejectReason::DataDigestError => 0x02,
            RejectReason::SnackReject => 0x03,
            RejectReason::ProtocolError => 0x04,
            RejectReason::CommandNotSupported => 0x05,
            RejectReason::ImmediateCommandReject => 0x06,
            RejectReason::TaskInProgress => 0x07,
            RejectReason::InvalidDataAck => 0x08,
            RejectReason::InvalidPduField => 0x09,
            RejectReason::LongOperationReject => 0x0a,
            RejectReason::WaitingForLogout => 0x0c,
            RejectReason::Other(code) => code,
        }
    }

    pub const fn from_code(code: u8) -> Self {
        match code {
            0x02 => RejectReason::DataDigestError,
            0x03 => RejectReason::SnackReject,
            0x04 => RejectReason::ProtocolError,
            0x05 => RejectReason::CommandNotSupported,
            0x06 => RejectReason::ImmediateCommandReject,
            0x07 => RejectReason::TaskInProgress,
            0x08 => RejectReason::InvalidDataAck,
            0x09 => RejectReason::InvalidPduField,
            0x0a => RejectReason::LongOperationReject,
            0x0c => RejectReason::WaitingForLogout,
            other => RejectReason::Other(other),
        }
    }

    /// Whether RFC 7143 allows sending the rejected PDU again (the target was short of
    /// resources, or the PDU was damaged on the way); the others would be rejected again.
    pub const fn may_resend(self) -> bool {
        matches!(
            self,
            RejectReason::DataDigestError
                | RejectReason::SnackReject
                | RejectReason::ImmediateCommandReject
                | RejectReason::LongOperationReject
        )
    }
}

/// Reject (0x3f, section 11.17): the data segment is the header of the rejected PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub reason: RejectReason,
    pub sequence: TargetSequence,
    pub data_sn: u32,
    /// The header that was rejected (its opcode may be one we do not know, so kept raw).
    pub rejected: [u8; BHS_LEN],
}

impl Reject {
    pub fn to_bhs(&self) -> Bhs {
        let mut bhs = lun_bhs(Opcode::Reject, Lun::default(), RESERVED_TAG, BHS_LEN as u32);
        bhs.flags = FINAL_BIT;
        bhs.specific_2_3[0] = self.reason.code();
        self.sequence.write(&mut bhs);
        bhs.set_tail_u32(36, self.data_sn);
        bhs
    }

    /// The opcode code (6 bits) of the rejected PDU.
    pub fn rejected_opcode(&self) -> u8 {
        self.rejected[0] & 0x3F
    }

    /// The Initiator Task Tag of the rejected PDU.
    pub fn rejected_itt(&self) -> u32 {
        u32::from_be_bytes([
            self.rejected[16],
            self.rejected[17],
            self.rejected[18],
            self.rejected[19],
        ])
    }

    fn parse(bhs: &Bhs, data: &[u8]) -> Result<Self, ParseError> {
        let rejected = data
            .get(..BHS_LEN)
            .and_then(|header| <[u8; BHS_LEN]>::try_from(header).ok())
            .ok_or(ParseError::RejectedHeaderMissing {
                data_len: data.len(),
            })?;
        Ok(Self {
            reason: RejectReason::from_code(bhs.specific_2_3[0]),
            sequence: TargetSequence::read(bhs),
            data_sn: bhs.tail_u32(36),
            rejected,
        })
    }
}

/// AsyncEvent codes (section 11.9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEvent {
    /// A SCSI asynchronous event; the sense data is in the data segment.
    ScsiEvent,
    /// The target asks for a logout within Parameter3 seconds.
    LogoutRequested,
    /// The target will drop connection Parameter1 (Time2Wait Parameter2, Time2Retain Parameter3).
    DroppingConnection,
    /// The target will drop all connections of the session.
    DroppingAllConnections,
    /// The target asks to renegotiate operational parameters.
    RenegotiationRequested,
    VendorSpecific,
    Other(u8),
}

impl AsyncEvent {
    pub const fn code(self) -> u8 {
        match self {
            AsyncEvent::ScsiEvent => 0,
            AsyncEvent::LogoutRequested => 1,
            AsyncEvent::DroppingConnection => 2,
            AsyncEvent::DroppingAllConnections => 3,
            AsyncEvent::RenegotiationRequested => 4,
            AsyncEvent::VendorSpecific => 255,
            AsyncEvent::Other(code) => code,
        }
    }

    pub const fn from_code(code: u8) -> Self {
        match code {
            0 => AsyncEvent::ScsiEvent,
            1 => AsyncEvent::LogoutRequested,
            2 => AsyncEvent::DroppingConnection,
            3 => AsyncEvent::DroppingAllConnections,
            4 => AsyncEvent::RenegotiationRequested,
            255 => AsyncEvent::VendorSpecific,
            other => AsyncEvent::Other(other),
        }
    }
}

/// Asynchronous Message (0x32, section 11.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: Lun,
    pub sequence: TargetSequence,
    pub event: AsyncEvent,
    pub vcode: u8,
    pub parameters: [u16; 3],
    /// For [`AsyncEvent::ScsiEvent`]: the sense data (without its 2-byte length).
    pub sense: Vec<u8>,
}

impl AsyncMessage {
    pub fn to_bhs(&self, data_len: u32) -> Bhs {
        let mut bhs = lun_bhs(Opcode::AsyncMessage, self.lun, RESERVED_TAG, data_len);
        bhs.flags = FINAL_BIT;
        self.sequence.write(&mut bhs);
        bhs.set_tail_u8(36, self.event.code());
        bhs.set_tail_u8(37, self.vcode);
        bhs.set_tail_u16(38, self.parameters[0]);
        bhs.set_tail_u16(40, self.parameters[1]);
        bhs.set_tail_u16(42, self.parameters[2]);
        bhs
    }

    /// The data segment: SenseLength then the sense bytes (empty without sense).
    pub fn data_segment(&self) -> Vec<u8> {
        ScsiResponse {
            itt: 0,
            response: 0,
            status: 0,
            residual: Residual::None,
            sequence: TargetSequence::default(),
            exp_data_sn: 0,
            sense: self.sense.clone(),
        }
        .data_segment()
    }

    fn parse(bhs: &Bhs, data: &[u8]) -> Result<Self, ParseError> {
        // Same layout as a SCSI Response's data segment; anything after the sense is vendor data.
        let sense = ScsiResponse::parse(bhs, data)?.sense;
        Ok(Self {
            lun: bhs.lun(),
            sequence: TargetSequence::read(bhs),
            event: AsyncEvent::from_code(bhs.tail_u8(36)),
            vcode: bhs.tail_u8(37),
            parameters: [bhs.tail_u16(38), bhs.tail_u16(40), bhs.tail_u16(42)],
            sense,
        })
    }
}

/// A PDU a target sends, typed. Data segments that are payload (read data, text, ping data)
/// stay in the variant beside the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPdu {
    NopIn(NopIn, Vec<u8>),
    ScsiResponse(ScsiResponse),
    DataIn(DataIn, Vec<u8>),
    ReadyToTransfer(ReadyToTransfer),
    LoginResponse(LoginResponse, Vec<u8>),
    TextResponse(TextResponse, Vec<u8>),
    LogoutResponse(LogoutResponse),
    Reject(Reject),
    AsyncMessage(AsyncMessage),
    /// Task Management Responses (we send no such request) and vendor-specific PDUs: the header
    /// only, for the session to ignore or refuse.
    Other(Bhs),
}

impl TargetPdu {
    /// Types a PDU received from a target.
    pub fn parse(pdu: Pdu) -> Result<Self, ParseError> {
        let Pdu { bhs, ahs, data } = pdu;
        if !ahs.is_empty() {
            return Err(ParseError::UnexpectedAhs { opcode: bhs.opcode });
        }
        Ok(match bhs.opcode {
            Opcode::NopIn => TargetPdu::NopIn(NopIn::from_bhs(&bhs), data),
            Opcode::ScsiResponse => TargetPdu::ScsiResponse(ScsiResponse::parse(&bhs, &data)?),
            Opcode::DataIn => TargetPdu::DataIn(DataIn::from_bhs(&bhs), data),
            Opcode::ReadyToTransfer => TargetPdu::ReadyToTransfer(ReadyToTransfer::from_bhs(&bhs)),
            Opcode::LoginResponse => TargetPdu::LoginResponse(LoginResponse::from_bhs(&bhs), data),
            Opcode::TextResponse => TargetPdu::TextResponse(TextResponse::from_bhs(&bhs), data),
            Opcode::LogoutResponse => TargetPdu::LogoutResponse(LogoutResponse::from_bhs(&bhs)),
            Opcode::Reject => TargetPdu::Reject(Reject::parse(&bhs, &data)?),
            Opcode::AsyncMessage => TargetPdu::AsyncMessage(AsyncMessage::parse(&bhs, &data)?),
            Opcode::TaskManagementResponse
            | Opcode::TargetVendorSpecific3C
            | Opcode::TargetVendorSpecific3D
            | Opcode::TargetVendorSpecific3E => TargetPdu::Other(bhs),
            opcode => return Err(ParseError::WrongDirection { opcode }),
        })
    }

    /// The PDU's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            TargetPdu::NopIn(..) => Opcode::NopIn,
            TargetPdu::ScsiResponse(_) => Opcode::ScsiResponse,
            TargetPdu::DataIn(..) => Opcode::DataIn,
            TargetPdu::ReadyToTransfer(_) => Opcode::ReadyToTransfer,
            TargetPdu::LoginResponse(..) => Opcode::LoginResponse,
            TargetPdu::TextResponse(..) => Opcode::TextResponse,
            TargetPdu::LogoutResponse(_) => Opcode::LogoutResponse,
            TargetPdu::Reject(_) => Opcode::Reject,
            TargetPdu::AsyncMessage(_) => Opcode::AsyncMessage,
            TargetPdu::Other(bhs) => bhs.opcode,
        }
    }

    /// The sequence numbers, for every PDU that has them.
    pub fn sequence(&self) -> Option<TargetSequence> {
        match self {
            TargetPdu::NopIn(pdu, _) => Some(pdu.sequence),
            TargetPdu::ScsiResponse(pdu) => Some(pdu.sequence),
            TargetPdu::DataIn(pdu, _) => Some(pdu.sequence),
            TargetPdu::ReadyToTransfer(pdu) => Some(pdu.sequence),
            TargetPdu::LoginResponse(pdu, _) => Some(pdu.sequence),
            TargetPdu::TextResponse(pdu, _) => Some(pdu.sequence),
            TargetPdu::LogoutResponse(pdu) => Some(pdu.sequence),
            TargetPdu::Reject(pdu) => Some(pdu.sequence),
            TargetPdu::AsyncMessage(pdu) => Some(pdu.sequence),
            TargetPdu::Other(_) => None,
        }
    }

    /// Whether the PDU carries a status, so its StatSN is consumed (section 4.2.2.2): everything
    /// but R2Ts, Data-In without the S bit, and unsolicited NOP-Ins (reserved ITT).
    pub fn consumes_stat_sn(&self) -> bool {
        match self {
            TargetPdu::NopIn(pdu, _) => pdu.itt != RESERVED_TAG,
            TargetPdu::DataIn(pdu, _) => pdu.status.is_some(),
            TargetPdu::ReadyToTransfer(_) | TargetPdu::Other(_) => false,
            _ => true,
        }
    }
}

/// A PDU an initiator sends, typed: what the test target reads, and what the fuzz tests feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorPdu {
    NopOut(NopOut, Vec<u8>),
    ScsiCommand(ScsiCommand, Vec<u8>),
    DataOut(DataOut, Vec<u8>),
    LoginRequest(LoginRequest, Vec<u8>),
    TextRequest(TextRequest, Vec<u8>),
    LogoutRequest(LogoutRequest),
    /// Task management, SNACK, vendor-specific: header only.
    Other(Bhs),
}

impl InitiatorPdu {
    /// Types a PDU received from an initiator.
    pub fn parse(pdu: Pdu) -> Result<Self, ParseError> {
        let Pdu { bhs, ahs, data } = pdu;
        if !ahs.is_empty() && bhs.opcode != Opcode::ScsiCommand {
            return Err(ParseError::UnexpectedAhs { opcode: bhs.opcode });
        }
        Ok(match bhs.opcode {
            Opcode::NopOut => InitiatorPdu::NopOut(NopOut::from_bhs(&bhs), data),
            Opcode::ScsiCommand => InitiatorPdu::ScsiCommand(ScsiCommand::from_bhs(&bhs), data),
            Opcode::DataOut => InitiatorPdu::DataOut(DataOut::from_bhs(&bhs), data),
            Opcode::LoginRequest => InitiatorPdu::LoginRequest(LoginRequest::from_bhs(&bhs), data),
            Opcode::TextRequest => InitiatorPdu::TextRequest(TextRequest::from_bhs(&bhs), data),
            Opcode::LogoutRequest => InitiatorPdu::LogoutRequest(LogoutRequest::from_bhs(&bhs)),
            Opcode::TaskManagementRequest
            | Opcode::SnackRequest
            | Opcode::InitiatorVendorSpecific1C
            | Opcode::InitiatorVendorSpecific1D
            | Opcode::InitiatorVendorSpecific1E => InitiatorPdu::Other(bhs),
            opcode => return Err(ParseError::WrongDirection { opcode }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn lun(number: u16) -> Lun {
        Lun::single_level(number).unwrap()
    }

    #[test]
    fn scsi_command_round_trips_with_flags() {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8a;
        let command = ScsiCommand {
            immediate: false,
            final_: false,
            read: false,
            write: true,
            attribute: TaskAttribute::Simple,
            lun: lun(1),
            itt: 7,
            expected_data_transfer_length: 4096,
            cmd_sn: 10,
            exp_stat_sn: 3,
            cdb,
        };
        let bhs = command.to_bhs(512);
        let bytes = bhs.to_bytes().unwrap();
        assert_eq!(bytes[1], 0x21, "W and simple, no F");
        assert_eq!(bytes[5..8], [0, 2, 0]);
        assert_eq!(bytes[32], 0x8a, "CDB at byte 32");
        assert_eq!(
            ScsiCommand::from_bhs(&Bhs::decode(&bytes).unwrap()),
            command
        );
    }

    #[test]
    fn scsi_response_sense_is_length_prefixed() {
        let response = ScsiResponse {
            itt: 9,
            response: 0,
            status: 0x02,
            residual: Residual::Underflow(100),
            sequence: TargetSequence {
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 3,
            },
            exp_data_sn: 0,
            sense: vec![0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2a, 0x04],
        };
        let data = response.data_segment();
        assert_eq!(data[..2], [0, 14]);
        let bhs = response.to_bhs(data.len() as u32);
        assert_eq!(bhs.flags, 0x82);
        let parsed = TargetPdu::parse(Pdu::new(bhs, data)).unwrap();
        assert_eq!(parsed, TargetPdu::ScsiResponse(response.clone()));
        assert!(parsed.consumes_stat_sn());

        // A sense length past the data is refused, as is a lone byte.
        let mut bad = response.data_segment();
        bad[1] = 15;
        assert_eq!(
            TargetPdu::parse(Pdu::new(bhs, bad)),
            Err(ParseError::SenseLength {
                sense_len: 15,
                data_len: 16
            })
        );
        assert!(TargetPdu::parse(Pdu::new(bhs, vec![0])).is_err());
    }

    #[test]
    fn data_in_status_only_with_s_bit() {
        let data_in = DataIn {
            final_: true,
            status: Some(0),
            residual: Residual::Overflow(5),
            lun: lun(2),
            itt: 4,
            ttt: RESERVED_TAG,
            sequence: TargetSequence::default(),
            data_sn: 3,
            buffer_offset: 8192,
        };
        let bhs = data_in.to_bhs(100);
        assert_eq!(bhs.flags, 0x85);
        assert_eq!(DataIn::from_bhs(&bhs), data_in);

        let mut no_status = bhs;
        no_status.flags = 0x00;
        no_status.specific_2_3[1] = 0x02;
        let parsed = DataIn::from_bhs(&no_status);
        assert_eq!(parsed.status, None, "status byte ignored without S");
        assert_eq!(parsed.residual, Residual::None);
        assert!(!TargetPdu::DataIn(parsed, vec![]).consumes_stat_sn());
    }

    #[test]
    fn login_request_matches_the_pdu_module_vector() {
        let request = LoginRequest {
            transit: true,
            continue_: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            isid: Isid([0x40, 0x00, 0x01, 0x37, 0x00, 0x00]),
            tsih: 0,
            itt: 1,
            cid: 1,
            cmd_sn: 7,
            exp_stat_sn: 0,
        };
        let bytes = request.to_bhs(300).to_bytes().unwrap();
        assert_eq!(bytes[..4], [0x43, 0x87, 0, 0]);
        assert_eq!(bytes[8..16], [0x40, 0, 1, 0x37, 0, 0, 0, 0]);
        assert_eq!(bytes[20..22], [0, 1]);
        assert_eq!(
            LoginRequest::from_bhs(&Bhs::decode(&bytes).unwrap()),
            request
        );

        // Without T, NSG is sent as 0 whatever the struct says.
        let no_transit = LoginRequest {
            transit: false,
            ..request
        };
        assert_eq!(no_transit.to_bhs(0).flags, 0x04);
    }

    #[test]
    fn login_response_status_and_stages() {
        let response = LoginResponse {
            transit: true,
            continue_: false,
            csg: Stage::Security,
            nsg: Stage::Operational,
            version_max: 0,
            version_active: 0,
            isid: Isid::random_type(0x12_3456, 0xBEEF),
            tsih: 0x0102,
            itt: 5,
            sequence: TargetSequence {
                stat_sn: 100,
                exp_cmd_sn: 1,
                max_cmd_sn: 1,
            },
            status_class: 2,
            status_detail: 1,
        };
        let bhs = response.to_bhs(0);
        assert_eq!(bhs.flags, 0x81);
        assert_eq!(bhs.tail_u8(36), 2);
        assert_eq!(LoginResponse::from_bhs(&bhs), response);
        assert_eq!(response.isid.0[0] >> 6, 0b01, "random ISID type");
    }

    #[test]
    fn reject_carries_the_rejected_header() {
        let command = ScsiCommand {
            immediate: false,
            final_: true,
            read: true,
            write: false,
            attribute: TaskAttribute::Simple,
            lun: lun(0),
            itt: 0x55,
            expected_data_transfer_length: 0,
            cmd_sn: 1,
            exp_stat_sn: 1,
            cdb: [0; 16],
        };
        let rejected = command.to_bhs(0).to_bytes().unwrap();
        let reject = Reject {
            reason: RejectReason::CommandNotSupported,
            sequence: TargetSequence::default(),
            data_sn: 0,
            rejected,
        };
        let parsed = TargetPdu::parse(Pdu::new(reject.to_bhs(), rejected.to_vec())).unwrap();
        let TargetPdu::Reject(parsed) = parsed else {
            panic!("not a reject: {parsed:?}");
        };
        assert_eq!(parsed.rejected_itt(), 0x55);
        assert_eq!(parsed.rejected_opcode(), 0x01);
        assert!(!parsed.reason.may_resend());
        assert!(TargetPdu::parse(Pdu::new(reject.to_bhs(), vec![0; 47])).is_err());
    }

    #[test]
    fn async_message_with_sense_and_parameters() {
        let message = AsyncMessage {
            lun: lun(1),
            sequence: TargetSequence::default(),
            event: AsyncEvent::LogoutRequested,
            vcode: 0,
            parameters: [0, 0, 3],
            sense: vec![0x70, 0, 6],
        };
        let data = message.data_segment();
        let parsed = TargetPdu::parse(Pdu::new(message.to_bhs(data.len() as u32), data)).unwrap();
        assert_eq!(parsed, TargetPdu::AsyncMessage(message));
    }

    #[test]
    fn every_reason_and_event_code_round_trips() {
        for code in 0..=255u8 {
            assert_eq!(RejectReason::from_code(code).code(), code);
            assert_eq!(AsyncEvent::from_code(code).code(), code);
            assert_eq!(LogoutReason::from_code(code).code(), code & 0x7F);
        }
    }

    #[test]
    fn isids_from_names_are_stable_and_distinct() {
        let a = Isid::for_name("iqn.2026-01.test:node1");
        assert_eq!(a, Isid::for_name("iqn.2026-01.test:node1"));
        assert_ne!(a, Isid::for_name("iqn.2026-01.test:node2"));
        assert_eq!(a.0[0], 0x40, "type 01b, A reserved");
    }

    #[test]
    fn direction_is_checked() {
        let nop_out = NopOut {
            immediate: true,
            lun: Lun::default(),
            itt: 1,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            exp_stat_sn: 1,
        };
        let pdu = Pdu::new(nop_out.to_bhs(0), Vec::new());
        assert_eq!(
            TargetPdu::parse(pdu.clone()),
            Err(ParseError::WrongDirection {
                opcode: Opcode::NopOut
            })
        );
        assert_eq!(
            InitiatorPdu::parse(pdu),
            Ok(InitiatorPdu::NopOut(nop_out, Vec::new()))
        );
    }
}
