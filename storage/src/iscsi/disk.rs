//! One logical unit as the hypervisor uses it: block reads and writes, flush, the identifying
//! commands, and the persistent reservations that fence a node off the shared disk, all as
//! non-blocking operations over a [`Session`].
//!
//! Each operation returns an [`OpId`] at once; its result comes back from [`Disk::poll`] as a
//! [`DiskEvent::Completed`], decoded ([`DiskReply`]) or as a typed [`DiskError`] (a SCSI
//! status with its sense, a task error, or an answer that does not decode).
//!
//! Reservations follow fence_scsi and Windows failover clusters: one key per node
//! ([`ReservationKey::for_node`]), type Write Exclusive - Registrants Only, so every registered
//! node may write and fencing a node is preempting its key (SPC-4 5.13).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use transport::Pipe;

use super::session::{Session, SessionEvent, SubmitError};
use super::task::{TaskError, TaskId, TaskReply};
use crate::pdu::{Lun, PduError};
use crate::scsi::{
    parse_report_luns, Capacity, Command, CommandError, DataError, PrInAction, PrOutAction,
    RegisteredKeys, ReservationKey, ReservationStatus, ReservationType, StandardInquiry,
    TransferTooLong,
};

/// The reservation type of the cluster's shared disks.
pub const FENCE_RESERVATION: ReservationType = ReservationType::WriteExclusiveRegistrantsOnly;

/// Allocation lengths: INQUIRY's standard data fits 255 bytes; READ KEYS of 8 + 8 * 255 keys,
/// far more nodes than a cluster has; REPORT LUNS of 511 LUNs.
const INQUIRY_LEN: u16 = 255;
const READ_KEYS_LEN: u16 = 8 + 8 * 255;
const READ_RESERVATION_LEN: u16 = 24;
const REPORT_LUNS_LEN: u32 = 8 + 8 * 511;

/// An operation's handle: the id of its task in the session.
pub type OpId = TaskId;

/// A decoded answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskReply {
    /// The operation succeeded and returns no data (write, flush, TEST UNIT READY, PR OUT).
    Done,
    /// The blocks read.
    Data(Vec<u8>),
    Inquiry(StandardInquiry),
    Capacity(Capacity),
    Luns(Vec<u16>),
    Keys(RegisteredKeys),
    Reservation(ReservationStatus),
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskError {
    /// The command completed with a failure status (RESERVATION CONFLICT when fenced, CHECK
    /// CONDITION with sense, ...).
    Scsi(CommandError),
    /// The command did not complete (see [`TaskError`]).
    Task(TaskError),
    /// The answer does not decode.
    Data(DataError),
    /// A read returned fewer bytes than asked for.
    ShortRead { expected: u32, got: u32 },
    /// Write data that is not a whole number of blocks.
    Unaligned { len: usize, block_len: u32 },
    /// A transfer larger than one SCSI command can move.
    TooLong(TransferTooLong),
    /// The session refused the operation.
    Submit(SubmitError),
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Scsi(e) => write!(f, "{e}"),
            DiskError::Task(e) => write!(f, "{e}"),
            DiskError::Data(e) => write!(f, "bad answer: {e}"),
            DiskError::ShortRead { expected, got } => {
                write!(f, "read returned {got} of {expected} bytes")
            }
            DiskError::Unaligned { len, block_len } => write!(
                f,
                "{len} bytes are not a whole number of {block_len}-byte blocks"
            ),
            DiskError::TooLong(e) => write!(f, "{e}"),
            DiskError::Submit(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for DiskError {}

impl From<SubmitError> for DiskError {
    fn from(error: SubmitError) -> Self {
        DiskError::Submit(error)
    }
}

/// What the disk did about its registration after a reconnection (see
/// [`Disk::keep_registration`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationEvent {
    /// Our key was still registered; the new session registered it too.
    Restored { key: ReservationKey },
    /// Our key is gone: another node preempted (fenced) us. We did not register again, so the
    /// queued writes fail with RESERVATION CONFLICT, as fencing requires.
    Fenced { key: ReservationKey },
    /// READ KEYS or the registration failed; the queue was let go anyway.
    Failed(DiskError),
}

/// What [`Disk::poll`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskEvent {
    Completed {
        op: OpId,
        result: Result<DiskReply, DiskError>,
    },
    /// After a reconnection, with [`Disk::keep_registration`].
    Registration(RegistrationEvent),
    /// Every session event other than the completion of a disk operation (log-ins, lost
    /// connections, UNIT ATTENTIONs, ...).
    Session(SessionEvent),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read {
        bytes: u32,
    },
    NoData,
    Inquiry,
    Capacity,
    ReportLuns,
    ReadKeys,
    ReadReservation,
    /// READ KEYS after a reconnection, to see whether our key survived.
    RestoreCheck,
    /// REGISTER AND IGNORE EXISTING KEY on the new session.
    RestoreRegister,
}

/// A logical unit over a session.
#[derive(Debug)]
pub struct Disk {
    session: Session,
    lun: Lun,
    block_len: u32,
    ops: BTreeMap<OpId, Op>,
    /// The key to keep registered across reconnections.
    kept_key: Option<ReservationKey>,
    /// The restoring operation in flight, if any.
    restoring: Option<OpId>,
}

impl Disk {
    /// LUN `lun` over `session`, with 512-byte blocks until [`Disk::read_capacity`] reports
    /// the real size (or [`Disk::set_block_len`] says it).
    pub fn new(session: Session, lun: u16) -> Result<Disk, PduError> {
        Ok(Disk {
            session,
            lun: Lun::single_level(lun)?,
            block_len: 512,
            ops: BTreeMap::new(),
            kept_key: None,
            restoring: None,
        })
    }

    /// Keeps `key` registered across reconnections (or stops, with `None`).
    ///
    /// tgt ties a registration to the I_T nexus of one session (its id and creation time), so
    /// after a reconnection the new session is not registered, although READ KEYS still lists
    /// the key of the old one: the node's writes under a Registrants Only reservation would fail
    /// with RESERVATION CONFLICT. With a key kept, every re-login holds the queue, reads the
    /// keys, registers again (REGISTER AND IGNORE EXISTING KEY) only if our key is still there
    /// (if it is gone we were fenced, and must stay out), then lets the queue go, reporting a
    /// [`DiskEvent::Registration`]. Call it after registering.
    pub fn keep_registration(&mut self, key: Option<ReservationKey>) {
        self.kept_key = key;
        self.session.set_hold_after_reconnect(key.is_some());
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// For connection management: `needs_connection`, `connection_opened`, `logout`.
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    pub fn lun(&self) -> Lun {
        self.lun
    }

    pub fn block_len(&self) -> u32 {
        self.block_len
    }

    pub fn set_block_len(&mut self, block_len: u32) {
        self.block_len = block_len.max(1);
    }

    /// Operations submitted and not completed.
    pub fn pending(&self) -> usize {
        self.ops.len()
    }

    /// Drives the session (see [`Session::poll`]) and decodes completed operations.
    pub fn poll(&mut self, pipe: &mut impl Pipe, now_ms: u64) -> Vec<DiskEvent> {
        let events = self.session.poll(pipe, now_ms);
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            match event {
                SessionEvent::Completed(completion) => match self.ops.remove(&completion.task) {
                    Some(op @ (Op::RestoreCheck | Op::RestoreRegister)) => {
                        let result = self.decode(op, completion.result);
                        if let Some(event) = self.restore_step(op, result, now_ms) {
                            out.push(DiskEvent::Registration(event));
                        }
                    }
                    Some(op) => {
                        let result = self.decode(op, completion.result);
                        out.push(DiskEvent::Completed {
                            op: completion.task,
                            result,
                        });
                    }
                    None => out.push(DiskEvent::Session(SessionEvent::Completed(completion))),
                },
                SessionEvent::LoggedIn {
                    reconnected: true, ..
                } => {
                    if let (Some(_), None) = (self.kept_key, self.restoring) {
                        let command =
                            Command::persistent_reserve_in(PrInAction::ReadKeys, READ_KEYS_LEN);
                        self.start_restore(Op::RestoreCheck, &command, Vec::new(), now_ms);
                    }
                    out.push(DiskEvent::Session(event));
                }
                other => out.push(DiskEvent::Session(other)),
            }
        }
        out
    }

    fn start_restore(&mut self, op: Op, command: &Command, write: Vec<u8>, now_ms: u64) {
        match self.session.submit_first(self.lun, command, write, now_ms) {
            Ok(id) => {
                self.ops.insert(id, op);
                self.restoring = Some(id);
            }
            // The session is closing: nothing to restore, nothing to hold.
            Err(_) => {
                self.restoring = None;
                self.session.release_hold();
            }
        }
    }

    /// The next step of restoring the registration after `op` completed.
    fn restore_step(
        &mut self,
        op: Op,
        result: Result<DiskReply, DiskError>,
        now_ms: u64,
    ) -> Option<RegistrationEvent> {
        let key = self.kept_key?;
        let event = match (op, result) {
            (Op::RestoreCheck, Ok(DiskReply::Keys(keys))) if keys.contains(key) => {
                let action = PrOutAction::RegisterAndIgnoreExistingKey { new_key: key };
                let command = Command::persistent_reserve_out(action, None);
                self.start_restore(
                    Op::RestoreRegister,
                    &command,
                    action.parameter_list().to_vec(),
                    now_ms,
                );
                return None;
            }
            (Op::RestoreCheck, Ok(_)) => RegistrationEvent::Fenced { key },
            (_, Ok(_)) => RegistrationEvent::Restored { key },
            (_, Err(error)) => RegistrationEvent::Failed(error),
        };
        self.restoring = None;
        self.session.release_hold();
        Some(event)
    }

    fn decode(
        &mut self,
        op: Op,
        result: Result<TaskReply, TaskError>,
    ) -> Result<DiskReply, DiskError> {
        let reply = match result.map_err(DiskError::Task)? {
            TaskReply::Scsi(reply) => reply,
            // Disk operations are SCSI commands; a text answer cannot belong to one.
            TaskReply::Text(_) => return Err(DiskError::Data(DataError::Invalid("text reply"))),
        };
        if let Some(error) = reply.error() {
            return Err(DiskError::Scsi(error));
        }
        let data = reply.data;
        Ok(match op {
            Op::NoData | Op::RestoreRegister => DiskReply::Done,
            Op::Read { bytes } => {
                if data.len() != bytes as usize {
                    return Err(DiskError::ShortRead {
                        expected: bytes,
                        got: data.len() as u32,
                    });
                }
                DiskReply::Data(data)
            }
            Op::Inquiry => {
                DiskReply::Inquiry(StandardInquiry::parse(&data).map_err(DiskError::Data)?)
            }
            Op::Capacity => {
                let capacity = Capacity::parse(&data).map_err(DiskError::Data)?;
                self.block_len = capacity.block_len;
                DiskReply::Capacity(capacity)
            }
            Op::ReportLuns => DiskReply::Luns(parse_report_luns(&data).map_err(DiskError::Data)?),
            Op::ReadKeys | Op::RestoreCheck => {
                DiskReply::Keys(RegisteredKeys::parse(&data).map_err(DiskError::Data)?)
            }
            Op::ReadReservation => {
                DiskReply::Reservation(ReservationStatus::parse(&data).map_err(DiskError::Data)?)
            }
        })
    }

    fn submit(
        &mut self,
        op: Op,
        command: &Command,
        write: Vec<u8>,
        now_ms: u64,
    ) -> Result<OpId, DiskError> {
        let id = self.session.submit(self.lun, command, write, now_ms)?;
        self.ops.insert(id, op);
        Ok(id)
    }

    /// Reads `blocks` blocks from `lba`.
    pub fn read(&mut self, lba: u64, blocks: u32, now_ms: u64) -> Result<OpId, DiskError> {
        let command =
            Command::try_read16(lba, blocks, self.block_len).map_err(DiskError::TooLong)?;
        let bytes = command.direction.transfer_length();
        self.submit(Op::Read { bytes }, &command, Vec::new(), now_ms)
    }

    /// Writes `data`, a whole number of blocks, from `lba`.
    pub fn write(&mut self, lba: u64, data: Vec<u8>, now_ms: u64) -> Result<OpId, DiskError> {
        let block_len = self.block_len;
        if !data.len().is_multiple_of(block_len as usize) {
            return Err(DiskError::Unaligned {
                len: data.len(),
                block_len,
            });
        }
        let blocks = u32::try_from(data.len() / block_len as usize).map_err(|_| {
            DiskError::TooLong(TransferTooLong {
                blocks: u32::MAX,
                block_len,
            })
        })?;
        let command = Command::try_write16(lba, blocks, block_len).map_err(DiskError::TooLong)?;
        self.submit(Op::NoData, &command, data, now_ms)
    }

    /// SYNCHRONIZE CACHE of the whole unit: acknowledged writes reach stable storage.
    pub fn flush(&mut self, now_ms: u64) -> Result<OpId, DiskError> {
        self.submit(
            Op::NoData,
            &Command::synchronize_cache16(0, 0),
            Vec::new(),
            now_ms,
        )
    }

    pub fn test_unit_ready(&mut self, now_ms: u64) -> Result<OpId, DiskError> {
        self.submit(Op::NoData, &Command::test_unit_ready(), Vec::new(), now_ms)
    }

    pub fn inquiry(&mut self, now_ms: u64) -> Result<OpId, DiskError> {
        self.submit(
            Op::Inquiry,
            &Command::inquiry(INQUIRY_LEN),
            Vec::new(),
            now_ms,
        )
    }

    /// READ CAPACITY(16); its completion also sets this disk's block length.
    pub fn read_capacity(&mut self, now_ms: u64) -> Result<OpId, DiskError> {
        self.submit(
            Op::Capacity,
            &Command::read_capacity16(Capacity::LEN as u32),
            Vec::new(),
            now_ms,
        )
    }

    pub fn report_luns(&mut self, now_ms: u64) -> Result<OpId, DiskError> {
        self.submit(
            Op::ReportLuns,
            &Command::report_luns(REPORT_LUNS_LEN),
            Vec::new(),
            now_ms,
        )
    }

    /// PERSISTENT RESERVE IN, READ KEYS: the registered keys.
    pub fn read_keys(&mut self, now_ms: u64) -> Result<OpId, DiskError> {
        self.submit(
            Op::ReadKeys,
            &Command::persistent_reserve_in(PrInAction::ReadKeys, READ_KEYS_LEN),
            Vec::new(),
            now_ms,
        )
    }

    /// PERSISTENT RESERVE IN, READ RESERVATION: the holder and type, if any.
    pub fn read_reservation(&mut self, now_ms: u64) -> Result<OpId, DiskError> {
        self.submit(
            Op::ReadReservation,
            &Command::persistent_reserve_in(PrInAction::ReadReservation, READ_RESERVATION_LEN),
            Vec::new(),
            now_ms,
        )
    }

    /// PERSISTENT RESERVE OUT with `action` (the type is [`FENCE_RESERVATION`] for the actions
    /// that take one).
    pub fn reservation_out(&mut self, action: PrOutAction, now_ms: u64) -> Result<OpId, DiskError> {
        let kind = match action {
            PrOutAction::Reserve { .. }
            | PrOutAction::Release { .. }
            | PrOutAction::Preempt { .. }
            | PrOutAction::PreemptAndAbort { .. } => Some(FENCE_RESERVATION),
            _ => None,
        };
        let command = Command::persistent_reserve_out(action, kind);
        self.submit(
            Op::NoData,
            &command,
            action.parameter_list().to_vec(),
            now_ms,
        )
    }

    /// REGISTER `new_key`, replacing `current` (NONE when not registered; `new_key` NONE
    /// unregisters).
    pub fn register(
        &mut self,
        current: ReservationKey,
        new_key: ReservationKey,
        now_ms: u64,
    ) -> Result<OpId, DiskError> {
        self.reservation_out(
            PrOutAction::Register {
                key: current,
                new_key,
            },
            now_ms,
        )
    }

    /// REGISTER AND IGNORE EXISTING KEY: registers `new_key` whatever was registered. Unlike
    /// REGISTER it is idempotent, so it is the one to use where a retry may repeat it.
    pub fn register_and_ignore(
        &mut self,
        new_key: ReservationKey,
        now_ms: u64,
    ) -> Result<OpId, DiskError> {
        self.reservation_out(
            PrOutAction::RegisterAndIgnoreExistingKey { new_key },
            now_ms,
        )
    }

    /// RESERVE with our registered `key`.
    pub fn reserve(&mut self, key: ReservationKey, now_ms: u64) -> Result<OpId, DiskError> {
        self.reservation_out(PrOutAction::Reserve { key }, now_ms)
    }

    /// RELEASE the reservation we hold with `key`.
    pub fn release(&mut self, key: ReservationKey, now_ms: u64) -> Result<OpId, DiskError> {
        self.reservation_out(PrOutAction::Release { key }, now_ms)
    }

    /// CLEAR every registration and the reservation (needs our registered `key`).
    pub fn clear(&mut self, key: ReservationKey, now_ms: u64) -> Result<OpId, DiskError> {
        self.reservation_out(PrOutAction::Clear { key }, now_ms)
    }

    /// PREEMPT: removes `victim`'s registration (and takes its reservation): the fence.
    pub fn preempt(
        &mut self,
        key: ReservationKey,
        victim: ReservationKey,
        now_ms: u64,
    ) -> Result<OpId, DiskError> {
        self.reservation_out(PrOutAction::Preempt { key, victim }, now_ms)
    }

    /// PREEMPT AND ABORT: as [`Disk::preempt`], and aborts the victim's outstanding commands.
    pub fn preempt_and_abort(
        &mut self,
        key: ReservationKey,
        victim: ReservationKey,
        now_ms: u64,
    ) -> Result<OpId, DiskError> {
        self.reservation_out(PrOutAction::PreemptAndAbort { key, victim }, now_ms)
    }
}
