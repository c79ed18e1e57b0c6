//! What a caller submits to a [`super::Session`] and what comes back: tasks, their results and
//! errors (RFC 7143 sections 3.2.2 and 11.3-11.7 for the SCSI side).
//!
//! A task keeps its [`TaskId`] for its whole life, while the Initiator Task Tag it travels under
//! changes each time it is issued again (after a UNIT ATTENTION or on a new connection).

use alloc::vec::Vec;
use core::fmt;

use super::login::LoginError;
use super::pdus::{RejectReason, Residual};
use super::session::ConnectionError;
use super::text::{TextAssembler, TextError, TextKeys};
use crate::pdu::Lun;
use crate::scsi::{CommandError, Sense, Status};

/// The caller's handle on a submitted task, unique for the session's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {}", self.0)
    }
}

/// How a SCSI command completed at the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiReply {
    pub status: Status,
    /// The sense data (without the iSCSI 2-byte length), empty when the target sent none.
    pub sense: Vec<u8>,
    /// Data-In bytes, as many as the target transferred (the expected length less an underflow).
    pub data: Vec<u8>,
    pub residual: Residual,
    /// UNIT ATTENTIONs this command met and was retried after.
    pub unit_attentions_retried: u32,
}

impl ScsiReply {
    /// The decoded sense data, if any could be decoded.
    pub fn sense(&self) -> Option<Sense> {
        Sense::parse(&self.sense).ok()
    }

    /// The command's failure, `None` for GOOD and CONDITION MET.
    pub fn error(&self) -> Option<CommandError> {
        let sense = (!self.sense.is_empty()).then_some(self.sense.as_slice());
        CommandError::from_status(self.status, sense)
    }
}

/// A completed task's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskReply {
    Scsi(ScsiReply),
    /// The keys of a Text Response sequence (e.g. a SendTargets list).
    Text(TextKeys),
}

/// Why a task did not complete at the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// Its deadline ([`super::RetryPolicy::command_deadline_ms`]) passed.
    DeadlineExceeded,
    /// It was issued on [`super::RetryPolicy::max_attempts`] connections and each failed; the
    /// last failure.
    RetriesExhausted(ConnectionError),
    /// Logins kept failing ([`super::RetryPolicy::max_failed_logins`] in a row); the last failure.
    ConnectionUnavailable(ConnectionError),
    /// The session failed for good (e.g. authentication refused).
    SessionFailed(LoginError),
    /// The target rejected the command PDU.
    Rejected(RejectReason),
    /// The iSCSI Response field was not "command completed at target" (1: target failure).
    TargetFailure { response: u8 },
    /// The session logged out before the task could run.
    LoggedOut,
    /// The target's text answer could not be read.
    Text(TextError),
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::DeadlineExceeded => f.write_str("the command's deadline passed"),
            TaskError::RetriesExhausted(e) => {
                write!(f, "the command failed on every connection tried; last: {e}")
            }
            TaskError::ConnectionUnavailable(e) => {
                write!(
                    f,
                    "no connection to the target could be established; last: {e}"
                )
            }
            TaskError::SessionFailed(e) => write!(f, "the session failed: {e}"),
            TaskError::Rejected(reason) => write!(f, "the target rejected the command: {reason:?}"),
            TaskError::TargetFailure { response } => {
                write!(
                    f,
                    "the target failed the command (iSCSI response {response:#04x})"
                )
            }
            TaskError::LoggedOut => f.write_str("the session logged out"),
            TaskError::Text(e) => write!(f, "unreadable text answer: {e}"),
        }
    }
}

impl core::error::Error for TaskError {}

/// A finished task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub task: TaskId,
    pub result: Result<TaskReply, TaskError>,
}

/// The task's request, and the answer being assembled.
#[derive(Debug)]
pub(crate) enum TaskBody {
    Scsi {
        lun: Lun,
        cdb: [u8; 16],
        /// Expected Data-In length (0 for none).
        read_len: u32,
        /// Data-Out bytes (empty for none).
        write: Vec<u8>,
        /// Data-In received so far, allocated on the first Data-In.
        data_in: Vec<u8>,
        /// The highest byte offset Data-In reached.
        data_in_end: u32,
    },
    Text {
        request: TextKeys,
        reply: TextAssembler,
    },
}

/// Where an issued task travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Issued {
    pub itt: u32,
    pub at_ms: u64,
}

#[derive(Debug)]
pub(crate) struct Task {
    pub body: TaskBody,
    pub submitted_ms: u64,
    /// Connections this task was issued on that failed before it completed.
    pub attempts: u32,
    pub unit_attentions: u32,
    pub issued: Option<Issued>,
    /// Submitted with [`super::Session::submit_first`]: goes before every other task, and
    /// through a hold after reconnection.
    pub urgent: bool,
}

impl Task {
    /// Forgets what the last issue produced, before issuing again.
    pub fn reset_progress(&mut self) {
        self.issued = None;
        match &mut self.body {
            TaskBody::Scsi {
                data_in,
                data_in_end,
                ..
            } => {
                data_in.clear();
                *data_in_end = 0;
            }
            TaskBody::Text { reply, .. } => *reply = TextAssembler::new(),
        }
    }
}
