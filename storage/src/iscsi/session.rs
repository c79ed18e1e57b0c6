//! An iSCSI session in the full feature phase, sans-IO and non-blocking (RFC 7143 sections 3,
//! 4.2, 6.1 (ERL 0), 7, 11.3-11.19).
//!
//! The caller owns the connection: it opens a byte [`Pipe`] when [`Session::needs_connection`]
//! says so, tells the session with [`Session::connection_opened`], and then calls
//! [`Session::poll`] with that pipe from its loop. One poll receives what is waiting (at most
//! [`super::wire::RECEIVE_BUDGET`] bytes), handles it, fires timers, issues queued commands and
//! sends what the pipe takes; it never waits. Results come back as [`SessionEvent`]s.
//!
//! ```text
//!  needs_connection ─► connection_opened ─► login ─► full feature ─► (logout) ─► Closed
//!        ▲                                    │            │
//!        └──────── ConnectionLost ◄───────────┴────────────┘    (permanent login error: Failed)
//! ```
//!
//! What it handles in the full feature phase:
//! - the command window: a command is issued only while CmdSN <= MaxCmdSN (serial arithmetic,
//!   section 4.2.2.1); the others wait in order;
//! - write data: immediate data in the command PDU and unsolicited Data-Out up to
//!   FirstBurstLength when negotiated, then Data-Out sequences answering each R2T, every PDU
//!   within the target's MaxRecvDataSegmentLength;
//! - read data: Data-In placed by BufferOffset (an offset past the expected length is a protocol
//!   error), status from a SCSI Response or from the last Data-In (S bit);
//! - NOP: a target's NOP-In with a Target Transfer Tag is answered; after
//!   [`Timeouts::nop_interval_ms`] without a PDU we ping, and no answer within
//!   [`Timeouts::nop_timeout_ms`] declares the connection dead;
//! - Reject and Asynchronous Message (target asks for a logout, or will drop the connection);
//! - UNIT ATTENTION: a command that ends in CHECK CONDITION with that sense key is issued again,
//!   at most [`RetryPolicy::unit_attention_retries`] times, and reported as an event.
//!
//! Recovery is error recovery level 0 (section 7.1.5): any connection failure (pipe error, stall,
//! damaged stream, protocol error, command or NOP timeout) ends the connection. The caller opens a
//! new one; we log in again with the same ISID and TSIH 0, which reinstates the session and makes
//! the target drop the old one's tasks (section 6.3.5), and issue again the commands that had
//! not completed. Each command may ride [`RetryPolicy::max_attempts`] failed connections and must
//! finish within [`RetryPolicy::command_deadline_ms`]; past either it fails with a typed error.
//! Re-issuing is what ERL 0 offers: it is safe for reads and writes of blocks (idempotent), and
//! for the persistent reservation actions the hypervisor uses as long as the caller treats a
//! RESERVATION CONFLICT after a retried REGISTER as "already registered".

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use transport::{Pipe, PipeError};

use super::login::{Login, LoginConfig, LoginError, LoginStep};
use super::negotiate::{OperationalParams, SessionType};
use super::pdus::{
    AsyncEvent, DataOut, LogoutReason, LogoutRequest, NopOut, ParseError, RejectReason, Residual,
    ScsiCommand, TargetPdu, TargetSequence, TaskAttribute, TextRequest, RESERVED_TAG,
};
use super::stream::StreamError;
use super::task::{Completion, Issued, ScsiReply, Task, TaskBody, TaskError, TaskId, TaskReply};
use super::text::{TextAssembler, TextKeys};
use super::wire::Wire;
use crate::pdu::{Lun, Opcode, PduError};
use crate::scsi::{Command, DataDirection, Sense, Status};

/// How long each wait may take, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From [`Session::connection_opened`] to the full feature phase (covers the TCP connect).
    pub login_ms: u64,
    /// From issuing a command to its completion.
    pub command_ms: u64,
    /// Quiet time after which we ping the target with a NOP-Out; 0 disables pings.
    pub nop_interval_ms: u64,
    /// How long a ping may go unanswered.
    pub nop_timeout_ms: u64,
    /// From [`Session::logout`] to the Logout Response.
    pub logout_ms: u64,
    /// How long the pipe may take none of the bytes waiting to be sent.
    pub stall_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            login_ms: 15_000,
            command_ms: 30_000,
            nop_interval_ms: 5_000,
            nop_timeout_ms: 10_000,
            logout_ms: 5_000,
            stall_ms: 30_000,
        }
    }
}

/// Bounds on retrying, so every failure ends in a typed error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Failed connections a command may be issued on before it fails.
    pub max_attempts: u32,
    /// A command's whole life: queueing, retries and reconnections.
    pub command_deadline_ms: u64,
    /// Times a command is issued again after a UNIT ATTENTION.
    pub unit_attention_retries: u32,
    /// Wait before the first reconnection; doubles with each failed login.
    pub reconnect_delay_ms: u64,
    /// Longest wait between reconnections (also caps a target's Time2Wait).
    pub max_reconnect_delay_ms: u64,
    /// Failed logins in a row after which the waiting commands fail (reconnecting goes on).
    pub max_failed_logins: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            command_deadline_ms: 120_000,
            unit_attention_retries: 8,
            reconnect_delay_ms: 100,
            max_reconnect_delay_ms: 5_000,
            max_failed_logins: 6,
        }
    }
}

/// Everything a session needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub login: LoginConfig,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    /// Seeds our mutual CHAP challenges; give it real entropy (RDRAND, a boot nonce).
    pub entropy: u64,
}

/// A violation of the protocol by the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// A PDU that makes no sense now (e.g. a Login Response in the full feature phase).
    UnexpectedPdu { opcode: Opcode },
    /// A PDU for a task we do not have.
    UnknownTask { opcode: Opcode, itt: u32 },
    /// Data-In outside the command's expected transfer, or for a command without Data-In.
    DataInOutOfRange {
        itt: u32,
        offset: u32,
        len: u32,
        expected: u32,
    },
    /// An R2T outside the command's write data, or for a command that writes nothing.
    R2tOutOfRange {
        itt: u32,
        offset: u32,
        len: u32,
        write_len: u32,
    },
}

/// Why a connection ended. The session recovers from all of these by reconnecting, except a
/// permanent [`LoginError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionError {
    Pipe(PipeError),
    /// The pipe took nothing for [`Timeouts::stall_ms`].
    Stalled,
    /// The inbound byte stream is damaged (digest mismatch, oversized or reserved PDU).
    Stream(StreamError),
    /// A PDU that does not parse as its type.
    Parse(ParseError),
    Protocol(ProtocolError),
    Login(LoginError),
    LoginTimeout,
    /// The target did not answer our Logout Request in time.
    LogoutTimeout,
    NopTimeout,
    /// A command took longer than [`Timeouts::command_ms`].
    CommandTimeout {
        task: TaskId,
    },
    /// The target announced it drops the connection (Asynchronous Message 2 or 3).
    TargetDropping {
        time2wait_s: u16,
    },
    /// The target asked for a logout, which completed; we log in again.
    TargetRequestedLogout {
        time2wait_s: u16,
    },
    /// A PDU was rejected for a reason that asks to send it again (digest error, resources).
    Rejected(RejectReason),
    /// The caller opened a new connection while this one was in use.
    Replaced,
    /// A PDU we built could not be encoded (a bug: lengths are bounded before encoding).
    Encode(PduError),
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionError::Pipe(e) => write!(f, "{e}"),
            ConnectionError::Stalled => f.write_str("the connection took no data for too long"),
            ConnectionError::Stream(e) => write!(f, "{e}"),
            ConnectionError::Parse(e) => write!(f, "malformed PDU: {e}"),
            ConnectionError::Protocol(e) => write!(f, "protocol error: {e:?}"),
            ConnectionError::Login(e) => write!(f, "{e}"),
            ConnectionError::LoginTimeout => f.write_str("login timed out"),
            ConnectionError::LogoutTimeout => f.write_str("logout timed out"),
            ConnectionError::Replaced => f.write_str("the caller opened a new connection"),
            ConnectionError::NopTimeout => f.write_str("the target did not answer a NOP-Out ping"),
            ConnectionError::CommandTimeout { task } => write!(f, "{task} timed out"),
            ConnectionError::TargetDropping { time2wait_s } => {
                write!(
                    f,
                    "the target drops the connection (Time2Wait {time2wait_s} s)"
                )
            }
            ConnectionError::TargetRequestedLogout { time2wait_s } => {
                write!(
                    f,
                    "the target asked for a logout (Time2Wait {time2wait_s} s)"
                )
            }
            ConnectionError::Rejected(reason) => write!(f, "PDU rejected: {reason:?}"),
            ConnectionError::Encode(e) => write!(f, "cannot encode a PDU: {e}"),
        }
    }
}

impl core::error::Error for ConnectionError {}

impl From<PduError> for ConnectionError {
    fn from(error: PduError) -> Self {
        ConnectionError::Encode(error)
    }
}

/// Why a task could not be submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The session logged out, is logging out, or failed for good.
    Closed,
    /// The write data is not as long as the command's expected transfer.
    WriteLengthMismatch { expected: u32, actual: usize },
    /// SCSI commands need a normal session, not a discovery one.
    DiscoverySession,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Closed => f.write_str("the session is closed"),
            SubmitError::WriteLengthMismatch { expected, actual } => write!(
                f,
                "the command writes {expected} bytes but {actual} were given"
            ),
            SubmitError::DiscoverySession => {
                f.write_str("a discovery session carries no SCSI commands")
            }
        }
    }
}

impl core::error::Error for SubmitError {}

/// What a poll reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The connection reached the full feature phase; `reconnected` after the first time.
    LoggedIn { tsih: u16, reconnected: bool },
    /// A task finished.
    Completed(Completion),
    /// A UNIT ATTENTION arrived, for `task` (which is issued again if it has retries left) or in
    /// an Asynchronous Message. Callers watch these: 2A/03-05 mean reservations changed.
    UnitAttention {
        task: Option<TaskId>,
        lun: Lun,
        sense: Sense,
    },
    /// The connection ended: close the pipe. [`Session::needs_connection`] says when to open the
    /// next one.
    ConnectionLost(ConnectionError),
    /// The session failed for good; every task was completed with an error.
    Failed(LoginError),
    /// The session ended after [`Session::logout`]; `clean` if the target confirmed it.
    LoggedOut { clean: bool },
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Waiting for a new connection.
    Disconnected,
    LoggingIn,
    FullFeature,
    LoggingOut,
    Closed,
    Failed,
}

/// Counters for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionStats {
    pub logins: u64,
    pub connection_losses: u64,
    pub commands_issued: u64,
    /// Commands issued again (after a UNIT ATTENTION or on a new connection).
    pub commands_reissued: u64,
    pub tasks_completed: u64,
    pub unit_attentions: u64,
    pub nop_pings_sent: u64,
    pub nop_answers_sent: u64,
    pub rejects: u64,
    pub async_messages: u64,
    pub pdus_sent: u64,
    pub pdus_received: u64,
    pub data_out_pdus: u64,
    pub data_in_bytes: u64,
    pub data_out_bytes: u64,
}

/// Outbound bytes above which no new command or Data-Out PDU is queued until the pipe drains:
/// a large write is encoded as the pipe takes it, not all at once.
const OUTBOUND_HIGH_WATER: usize = 256 * 1024;

/// Serial number arithmetic of RFC 1982 on 32 bits (RFC 7143 section 4.2.2.1).
fn serial_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

fn serial_le(a: u32, b: u32) -> bool {
    a == b || serial_lt(a, b)
}

/// Data-Out still to send for one unsolicited burst or one R2T.
#[derive(Debug, Clone, Copy)]
struct OutSequence {
    itt: u32,
    lun: Lun,
    ttt: u32,
    next: u32,
    end: u32,
    data_sn: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogoutCause {
    User,
    TargetRequest { time2wait_s: u16 },
}

#[derive(Debug)]
enum Phase {
    Login(Box<Login>),
    Full,
    LoggingOut { itt: u32, cause: LogoutCause },
}

#[derive(Debug, Clone, Copy)]
struct Ping {
    itt: u32,
    deadline_ms: u64,
}

/// The negotiated values that shape our Data-Out.
#[derive(Debug, Clone, Copy)]
struct WriteLimits {
    immediate_data: bool,
    initial_r2t: bool,
    first_burst_length: u32,
    max_xmit_data_segment_length: u32,
}

/// One connection and the session numbers that live with it (ERL 0: a new connection is a new
/// session).
#[derive(Debug)]
struct Connection {
    wire: Wire,
    phase: Phase,
    opened_ms: u64,
    logout_deadline_ms: u64,
    params: Option<OperationalParams>,
    tsih: u16,
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    last_received_ms: u64,
    ping: Option<Ping>,
    out_sequences: VecDeque<OutSequence>,
}

impl Connection {
    fn take_itt(&mut self) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == RESERVED_TAG {
            self.next_itt = 0;
        }
        itt
    }

    /// Section 4.2.2.1: ExpCmdSN and MaxCmdSN only move forward, and a MaxCmdSN below
    /// ExpCmdSN - 1 invalidates both.
    fn update_window(&mut self, sequence: TargetSequence) {
        if serial_lt(sequence.max_cmd_sn, sequence.exp_cmd_sn.wrapping_sub(1)) {
            return;
        }
        if serial_lt(self.exp_cmd_sn, sequence.exp_cmd_sn) {
            self.exp_cmd_sn = sequence.exp_cmd_sn;
        }
        if serial_lt(self.max_cmd_sn, sequence.max_cmd_sn) {
            self.max_cmd_sn = sequence.max_cmd_sn;
        }
    }

    fn window_open(&self) -> bool {
        serial_le(self.cmd_sn, self.max_cmd_sn)
    }

    /// What bounds the data we send; RFC defaults before login completes.
    fn limits(&self) -> WriteLimits {
        let defaults;
        let params = match &self.params {
            Some(params) => params,
            None => {
                defaults = OperationalParams::defaults(8192);
                &defaults
            }
        };
        WriteLimits {
            immediate_data: params.immediate_data,
            initial_r2t: params.initial_r2t,
            first_burst_length: params.first_burst_length,
            // Section 13.12 bounds it from below; a smaller value would make no progress.
            max_xmit_data_segment_length: params.max_xmit_data_segment_length.max(512),
        }
    }

    fn queue(
        &mut self,
        stats: &mut SessionStats,
        bhs: &crate::pdu::Bhs,
        data: &[u8],
    ) -> Result<(), ConnectionError> {
        self.wire.queue(bhs, data)?;
        stats.pdus_sent += 1;
        Ok(())
    }
}

#[derive(Debug)]
enum Link {
    Disconnected { retry_at_ms: u64 },
    Connected(Box<Connection>),
    Closed,
    Failed(LoginError),
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    id: TaskId,
    /// Set for the continuation of a Text Response sequence: the target's TTT.
    text_ttt: Option<u32>,
}

/// The session state that survives connections.
#[derive(Debug)]
struct Core {
    config: SessionConfig,
    tasks: BTreeMap<TaskId, Task>,
    queue: VecDeque<Queued>,
    by_itt: BTreeMap<u32, TaskId>,
    events: Vec<SessionEvent>,
    stats: SessionStats,
    next_task: u64,
    /// Failed logins in a row, for failing waiting commands.
    failed_logins: u32,
    /// Failed logins since the last success, for the reconnection backoff.
    backoff_exponent: u32,
    /// Set by [`Session::logout`]: the deadline of the logout.
    logout_deadline_ms: Option<u64>,
    ever_logged_in: bool,
    redirect: Option<String>,
    entropy: u64,
    cid: u16,
    /// Hold the queue after each re-login until [`Session::release_hold`].
    hold_after_reconnect: bool,
    /// Only urgent tasks are issued while set.
    hold: bool,
}

impl Core {
    fn finish(&mut self, id: TaskId, result: Result<TaskReply, TaskError>) {
        if self.tasks.remove(&id).is_some() {
            self.stats.tasks_completed += 1;
            self.events
                .push(SessionEvent::Completed(Completion { task: id, result }));
        }
    }

    fn fail_all(&mut self, error: &TaskError) {
        let ids: Vec<TaskId> = self.tasks.keys().copied().collect();
        for id in ids {
            self.finish(id, Err(error.clone()));
        }
        self.queue.clear();
        self.by_itt.clear();
    }

    fn timeouts(&self) -> Timeouts {
        self.config.timeouts
    }
}

/// What a connection step ended with, besides going on.
enum StepEnd {
    LoggedOut {
        cause: LogoutCause,
        response: u8,
        time2wait_s: u16,
    },
}

/// An iSCSI session: see the module documentation.
#[derive(Debug)]
pub struct Session {
    core: Core,
    link: Link,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        let entropy = config.entropy;
        Self {
            core: Core {
                config,
                tasks: BTreeMap::new(),
                queue: VecDeque::new(),
                by_itt: BTreeMap::new(),
                events: Vec::new(),
                stats: SessionStats::default(),
                next_task: 1,
                failed_logins: 0,
                backoff_exponent: 0,
                logout_deadline_ms: None,
                ever_logged_in: false,
                redirect: None,
                entropy,
                cid: 0,
                hold_after_reconnect: false,
                hold: false,
            },
            link: Link::Disconnected { retry_at_ms: 0 },
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.core.config
    }

    pub fn state(&self) -> SessionState {
        match &self.link {
            Link::Disconnected { .. } => SessionState::Disconnected,
            Link::Connected(conn) => match conn.phase {
                Phase::Login(_) => SessionState::LoggingIn,
                Phase::Full => SessionState::FullFeature,
                Phase::LoggingOut { .. } => SessionState::LoggingOut,
            },
            Link::Closed => SessionState::Closed,
            Link::Failed(_) => SessionState::Failed,
        }
    }

    /// Why the session failed for good, once it has.
    pub fn failure(&self) -> Option<&LoginError> {
        match &self.link {
            Link::Failed(error) => Some(error),
            _ => None,
        }
    }

    /// Whether the caller should open a new connection now and call
    /// [`connection_opened`](Self::connection_opened).
    pub fn needs_connection(&self, now_ms: u64) -> bool {
        matches!(self.link, Link::Disconnected { retry_at_ms } if now_ms >= retry_at_ms)
    }

    /// When a disconnected session wants its next connection (for a caller's timer).
    pub fn reconnect_at_ms(&self) -> Option<u64> {
        match self.link {
            Link::Disconnected { retry_at_ms } => Some(retry_at_ms),
            _ => None,
        }
    }

    /// After a login redirect: the address (`host:port,tag`) to connect to instead of the
    /// portal, for the next connection only.
    pub fn redirect_address(&self) -> Option<&str> {
        self.core.redirect.as_deref()
    }

    /// The caller opened a new connection (the pipe it passes to [`poll`](Self::poll) from now
    /// on): the login starts. An existing connection is dropped first. Returns false, doing
    /// nothing, once the session is closed or failed.
    pub fn connection_opened(&mut self, now_ms: u64) -> bool {
        if let Link::Connected(_) = self.link {
            self.connection_failed(ConnectionError::Replaced, now_ms);
        }
        if matches!(self.link, Link::Closed | Link::Failed(_)) {
            return false;
        }
        self.core.redirect = None;
        let core = &mut self.core;
        core.entropy = core
            .entropy
            .wrapping_add(now_ms)
            .wrapping_mul(0x2545_F491_4F6C_DD1D);
        let initial_cmd_sn = 1;
        let mut conn = Connection {
            wire: Wire::new(8192.max(core.config.login.negotiation.max_recv_data_segment_length)),
            phase: Phase::Full,
            opened_ms: now_ms,
            logout_deadline_ms: 0,
            params: None,
            tsih: 0,
            cmd_sn: initial_cmd_sn,
            exp_cmd_sn: initial_cmd_sn,
            max_cmd_sn: initial_cmd_sn,
            exp_stat_sn: 0,
            next_itt: 0,
            last_received_ms: now_ms,
            ping: None,
            out_sequences: VecDeque::new(),
        };
        let itt = conn.take_itt();
        let mut login = Login::new(
            core.config.login.clone(),
            itt,
            core.cid,
            initial_cmd_sn,
            core.entropy,
        );
        let first = login.start();
        // A login request always encodes: its text is a few hundred bytes.
        let queued = conn.queue(&mut core.stats, &first.bhs, &first.data);
        conn.phase = Phase::Login(Box::new(login));
        self.link = Link::Connected(Box::new(conn));
        if let Err(error) = queued {
            self.connection_failed(error, now_ms);
        }
        true
    }

    /// Queues a SCSI command for `lun`. `write_data` must be exactly the command's Data-Out
    /// length (empty for reads and commands without data). The command is issued when a
    /// connection is in the full feature phase and the command window is open.
    pub fn submit(
        &mut self,
        lun: Lun,
        command: &Command,
        write_data: Vec<u8>,
        now_ms: u64,
    ) -> Result<TaskId, SubmitError> {
        self.submit_scsi(lun, command, write_data, now_ms, false)
    }

    fn submit_scsi(
        &mut self,
        lun: Lun,
        command: &Command,
        write_data: Vec<u8>,
        now_ms: u64,
        urgent: bool,
    ) -> Result<TaskId, SubmitError> {
        self.accepting()?;
        if self.core.config.login.session_type == SessionType::Discovery {
            return Err(SubmitError::DiscoverySession);
        }
        let (read_len, write_len) = match command.direction {
            DataDirection::None => (0, 0),
            DataDirection::In(len) => (len, 0),
            DataDirection::Out(len) => (0, len),
        };
        if write_data.len() != write_len as usize {
            return Err(SubmitError::WriteLengthMismatch {
                expected: write_len,
                actual: write_data.len(),
            });
        }
        Ok(self.add_task(
            TaskBody::Scsi {
                lun,
                cdb: command.cdb.padded(),
                read_len,
                write: write_data,
                data_in: Vec::new(),
                data_in_end: 0,
            },
            now_ms,
            urgent,
        ))
    }

    /// Queues a Text Request with `keys` (e.g. `SendTargets=All` on a discovery session); the
    /// completion carries the target's keys.
    pub fn submit_text(&mut self, keys: TextKeys, now_ms: u64) -> Result<TaskId, SubmitError> {
        self.accepting()?;
        Ok(self.add_task(
            TaskBody::Text {
                request: keys,
                reply: TextAssembler::new(),
            },
            now_ms,
            false,
        ))
    }

    fn accepting(&self) -> Result<(), SubmitError> {
        if self.core.logout_deadline_ms.is_some()
            || matches!(self.link, Link::Closed | Link::Failed(_))
        {
            return Err(SubmitError::Closed);
        }
        Ok(())
    }

    fn add_task(&mut self, body: TaskBody, now_ms: u64, urgent: bool) -> TaskId {
        let id = TaskId(self.core.next_task);
        self.core.next_task += 1;
        self.core.tasks.insert(
            id,
            Task {
                body,
                submitted_ms: now_ms,
                attempts: 0,
                unit_attentions: 0,
                issued: None,
                urgent,
            },
        );
        let queued = Queued { id, text_ttt: None };
        if urgent {
            self.core.queue.push_front(queued);
        } else {
            self.core.queue.push_back(queued);
        }
        id
    }

    /// As [`submit`](Self::submit), but the command goes before every queued one and is issued
    /// even while the queue is held after a reconnection (see
    /// [`set_hold_after_reconnect`](Self::set_hold_after_reconnect)): for the commands that
    /// must restore the initiator's state on a new session before anything else runs.
    pub fn submit_first(
        &mut self,
        lun: Lun,
        command: &Command,
        write_data: Vec<u8>,
        now_ms: u64,
    ) -> Result<TaskId, SubmitError> {
        self.submit_scsi(lun, command, write_data, now_ms, true)
    }

    /// With `hold` set, every re-login (not the first login) holds the queue: only
    /// [`submit_first`](Self::submit_first) commands are issued until
    /// [`release_hold`](Self::release_hold). Targets such as tgt tie persistent reservation
    /// registrations to the I_T nexus of one session, so a node must register again on the new
    /// session before its queued writes run, or they fail with RESERVATION CONFLICT.
    pub fn set_hold_after_reconnect(&mut self, hold: bool) {
        self.core.hold_after_reconnect = hold;
        if !hold {
            self.core.hold = false;
        }
    }

    /// Lets the held queue go.
    pub fn release_hold(&mut self) {
        self.core.hold = false;
    }

    /// Whether the queue is held after a reconnection.
    pub fn is_held(&self) -> bool {
        self.core.hold
    }

    /// Closes the session: commands not yet issued fail with [`TaskError::LoggedOut`], issued
    /// ones may complete, then a Logout Request (close session) is sent. A
    /// [`SessionEvent::LoggedOut`] follows, within [`Timeouts::logout_ms`].
    pub fn logout(&mut self, now_ms: u64) {
        if self.core.logout_deadline_ms.is_some() {
            return;
        }
        self.core.logout_deadline_ms = Some(now_ms + self.core.timeouts().logout_ms);
        let queued: Vec<TaskId> = self
            .core
            .queue
            .iter()
            .map(|q| q.id)
            .filter(|id| {
                self.core
                    .tasks
                    .get(id)
                    .is_some_and(|task| task.issued.is_none())
            })
            .collect();
        self.core.queue.clear();
        for id in queued {
            self.core.finish(id, Err(TaskError::LoggedOut));
        }
        match &self.link {
            Link::Disconnected { .. } => self.close(false),
            Link::Connected(conn) if matches!(conn.phase, Phase::Login(_)) => self.close(false),
            _ => {}
        }
    }

    /// The parameters of the current connection, once logged in.
    pub fn params(&self) -> Option<&OperationalParams> {
        match &self.link {
            Link::Connected(conn) => conn.params.as_ref(),
            _ => None,
        }
    }

    /// The TSIH of the current session, once logged in.
    pub fn tsih(&self) -> Option<u16> {
        match &self.link {
            Link::Connected(conn) if conn.params.is_some() => Some(conn.tsih),
            _ => None,
        }
    }

    pub fn stats(&self) -> &SessionStats {
        &self.core.stats
    }

    /// Tasks submitted and not completed.
    pub fn pending_tasks(&self) -> usize {
        self.core.tasks.len()
    }

    /// One non-blocking step with the current connection's pipe (any pipe while disconnected:
    /// it is not touched then). Returns what happened.
    pub fn poll(&mut self, pipe: &mut impl Pipe, now_ms: u64) -> Vec<SessionEvent> {
        if let Link::Connected(conn) = &mut self.link {
            match step_connection(&mut self.core, conn, pipe, now_ms) {
                Ok(None) => {}
                Ok(Some(StepEnd::LoggedOut {
                    cause,
                    response,
                    time2wait_s,
                })) => match cause {
                    LogoutCause::User => self.close(response == 0),
                    LogoutCause::TargetRequest { time2wait_s: asked } => self.connection_failed(
                        ConnectionError::TargetRequestedLogout {
                            time2wait_s: asked.max(time2wait_s),
                        },
                        now_ms,
                    ),
                },
                Err(error) => self.connection_failed(error, now_ms),
            }
        }
        self.check_deadlines(now_ms);
        if let Some(deadline) = self.core.logout_deadline_ms {
            let closing = !matches!(self.link, Link::Closed | Link::Failed(_));
            if closing && (now_ms >= deadline || matches!(self.link, Link::Disconnected { .. })) {
                self.close(false);
            }
        }
        core::mem::take(&mut self.core.events)
    }

    fn close(&mut self, clean: bool) {
        if matches!(self.link, Link::Closed) {
            return;
        }
        self.link = Link::Closed;
        self.core.fail_all(&TaskError::LoggedOut);
        self.core.events.push(SessionEvent::LoggedOut { clean });
    }

    /// Ends the connection after `error` and decides what comes next.
    fn connection_failed(&mut self, error: ConnectionError, now_ms: u64) {
        let Link::Connected(conn) = core::mem::replace(
            &mut self.link,
            Link::Disconnected {
                retry_at_ms: now_ms,
            },
        ) else {
            return;
        };
        let core = &mut self.core;
        let was_logged_in = conn.params.is_some();
        core.stats.connection_losses += 1;
        core.events
            .push(SessionEvent::ConnectionLost(error.clone()));

        // Every issued task goes back to the front of the queue, in submission order, unless it
        // has used up its attempts.
        core.by_itt.clear();
        let issued: Vec<TaskId> = core
            .tasks
            .iter()
            .filter(|(_, task)| task.issued.is_some())
            .map(|(id, _)| *id)
            .collect();
        let mut again = Vec::new();
        for id in issued {
            let Some(task) = core.tasks.get_mut(&id) else {
                continue;
            };
            task.reset_progress();
            task.attempts += 1;
            if task.attempts >= core.config.retry.max_attempts {
                core.finish(id, Err(TaskError::RetriesExhausted(error.clone())));
            } else {
                again.push(id);
            }
        }
        let waiting: Vec<Queued> = core
            .queue
            .iter()
            .copied()
            .filter(|q| q.text_ttt.is_none() && !again.contains(&q.id))
            .collect();
        // Urgent tasks stay ahead of everything, in their own order.
        let urgent = |id: &TaskId| core.tasks.get(id).is_some_and(|task| task.urgent);
        let (mut first, rest): (Vec<Queued>, Vec<Queued>) = again
            .into_iter()
            .map(|id| Queued { id, text_ttt: None })
            .chain(waiting)
            .partition(|q| urgent(&q.id));
        first.extend(rest);
        core.queue = first.into_iter().collect();

        if core.logout_deadline_ms.is_some() {
            self.close(false);
            return;
        }
        let mut wait_ms = 0;
        let mut redirected = false;
        match &error {
            ConnectionError::Login(LoginError::Redirected { address, .. }) => {
                core.redirect.clone_from(address);
                redirected = true;
            }
            ConnectionError::Login(login) if login.is_permanent() => {
                let login = login.clone();
                core.fail_all(&TaskError::SessionFailed(login.clone()));
                core.events.push(SessionEvent::Failed(login.clone()));
                self.link = Link::Failed(login);
                return;
            }
            ConnectionError::TargetDropping { time2wait_s }
            | ConnectionError::TargetRequestedLogout { time2wait_s } => {
                wait_ms = u64::from(*time2wait_s) * 1000;
            }
            _ => {}
        }
        let retry = core.config.retry;
        if was_logged_in {
            core.backoff_exponent = 0;
        } else {
            core.failed_logins += 1;
            core.backoff_exponent = (core.backoff_exponent + 1).min(16);
            if core.failed_logins >= retry.max_failed_logins {
                core.failed_logins = 0;
                core.fail_all(&TaskError::ConnectionUnavailable(error));
            }
        }
        let backoff = retry
            .reconnect_delay_ms
            .saturating_mul(1 << core.backoff_exponent.saturating_sub(1).min(16));
        let delay = if redirected {
            // The target named where to go: no reason to wait. Redirect loops still count as
            // failed logins, which bounds them.
            0
        } else if was_logged_in && wait_ms == 0 {
            retry.reconnect_delay_ms
        } else {
            backoff.max(wait_ms)
        };
        self.link = Link::Disconnected {
            retry_at_ms: now_ms + delay.min(retry.max_reconnect_delay_ms),
        };
    }

    /// Fails tasks past their deadline. An issued one may still run at the target, so its
    /// connection goes too: the next login's session reinstatement ends it there.
    fn check_deadlines(&mut self, now_ms: u64) {
        let deadline = self.core.config.retry.command_deadline_ms;
        let late: Vec<(TaskId, bool)> = self
            .core
            .tasks
            .iter()
            .filter(|(_, task)| now_ms >= task.submitted_ms.saturating_add(deadline))
            .map(|(id, task)| (*id, task.issued.is_some()))
            .collect();
        let mut drop_connection = None;
        for (id, issued) in late {
            if let Some(Issued { itt, .. }) = self.core.tasks.get(&id).and_then(|t| t.issued) {
                self.core.by_itt.remove(&itt);
                if let Link::Connected(conn) = &mut self.link {
                    conn.out_sequences.retain(|s| s.itt != itt);
                }
            }
            self.core.queue.retain(|q| q.id != id);
            self.core.finish(id, Err(TaskError::DeadlineExceeded));
            if issued {
                drop_connection = Some(id);
            }
        }
        if let Some(task) = drop_connection {
            self.connection_failed(ConnectionError::CommandTimeout { task }, now_ms);
        }
    }
}

/// Receives, handles, times and sends on a connection. `Ok(Some(_))` ends it cleanly.
fn step_connection(
    core: &mut Core,
    conn: &mut Connection,
    pipe: &mut impl Pipe,
    now_ms: u64,
) -> Result<Option<StepEnd>, ConnectionError> {
    let received = conn.wire.receive(pipe);
    // PDUs that arrived before a pipe error count: a Logout Response followed by a close is a
    // completed logout.
    loop {
        let pdu = match conn.wire.next_pdu() {
            Ok(Some(pdu)) => pdu,
            Ok(None) => break,
            Err(error) => return Err(ConnectionError::Stream(error)),
        };
        core.stats.pdus_received += 1;
        let pdu = TargetPdu::parse(pdu).map_err(ConnectionError::Parse)?;
        if let Some(end) = handle_pdu(core, conn, pdu, now_ms)? {
            return Ok(Some(end));
        }
    }
    received.map_err(ConnectionError::Pipe)?;
    check_timers(core, conn, now_ms)?;
    issue(core, conn, now_ms)?;
    fill_data_out(core, conn)?;
    let stalled = conn
        .wire
        .flush(pipe, now_ms, core.timeouts().stall_ms)
        .map_err(ConnectionError::Pipe)?;
    if stalled {
        return Err(ConnectionError::Stalled);
    }
    Ok(None)
}

fn check_timers(
    core: &mut Core,
    conn: &mut Connection,
    now_ms: u64,
) -> Result<(), ConnectionError> {
    let timeouts = core.timeouts();
    match conn.phase {
        Phase::Login(_) => {
            if now_ms >= conn.opened_ms.saturating_add(timeouts.login_ms) {
                return Err(ConnectionError::LoginTimeout);
            }
            return Ok(());
        }
        Phase::LoggingOut { cause, .. } => {
            if now_ms >= conn.logout_deadline_ms {
                return Err(match cause {
                    LogoutCause::User => ConnectionError::LogoutTimeout,
                    LogoutCause::TargetRequest { time2wait_s } => {
                        ConnectionError::TargetRequestedLogout { time2wait_s }
                    }
                });
            }
        }
        Phase::Full => {}
    }
    if let Some(ping) = conn.ping {
        if now_ms >= ping.deadline_ms {
            return Err(ConnectionError::NopTimeout);
        }
    } else if timeouts.nop_interval_ms > 0
        && matches!(conn.phase, Phase::Full)
        && now_ms
            >= conn
                .last_received_ms
                .saturating_add(timeouts.nop_interval_ms)
    {
        let itt = conn.take_itt();
        let nop = NopOut {
            immediate: true,
            lun: Lun::default(),
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: conn.cmd_sn,
            exp_stat_sn: conn.exp_stat_sn,
        };
        conn.queue(&mut core.stats, &nop.to_bhs(0), &[])?;
        core.stats.nop_pings_sent += 1;
        conn.ping = Some(Ping {
            itt,
            deadline_ms: now_ms.saturating_add(timeouts.nop_timeout_ms),
        });
    }
    for (id, task) in &core.tasks {
        if let Some(issued) = task.issued {
            if now_ms >= issued.at_ms.saturating_add(timeouts.command_ms) {
                return Err(ConnectionError::CommandTimeout { task: *id });
            }
        }
    }
    Ok(())
}

fn handle_pdu(
    core: &mut Core,
    conn: &mut Connection,
    pdu: TargetPdu,
    now_ms: u64,
) -> Result<Option<StepEnd>, ConnectionError> {
    conn.last_received_ms = now_ms;
    if let Phase::Login(login) = &mut conn.phase {
        let TargetPdu::LoginResponse(response, data) = pdu else {
            return Err(ConnectionError::Protocol(ProtocolError::UnexpectedPdu {
                opcode: pdu.opcode(),
            }));
        };
        match login.on_response(&response, &data) {
            Ok(LoginStep::Send(request)) => {
                conn.queue(&mut core.stats, &request.bhs, &request.data)?;
            }
            Ok(LoginStep::Complete(outcome)) => {
                conn.cmd_sn = outcome.exp_cmd_sn;
                conn.exp_cmd_sn = outcome.exp_cmd_sn;
                conn.max_cmd_sn = outcome.max_cmd_sn;
                conn.exp_stat_sn = outcome.exp_stat_sn;
                conn.tsih = outcome.tsih;
                conn.wire.enter_full_feature(
                    outcome.params.digests(),
                    outcome.params.max_recv_data_segment_length,
                );
                conn.params = Some(outcome.params);
                conn.phase = Phase::Full;
                core.failed_logins = 0;
                core.backoff_exponent = 0;
                core.stats.logins += 1;
                if core.ever_logged_in && core.hold_after_reconnect {
                    core.hold = true;
                }
                core.events.push(SessionEvent::LoggedIn {
                    tsih: outcome.tsih,
                    reconnected: core.ever_logged_in,
                });
                core.ever_logged_in = true;
            }
            Err(error) => return Err(ConnectionError::Login(error)),
        }
        return Ok(None);
    }

    if let Some(sequence) = pdu.sequence() {
        conn.update_window(sequence);
        if pdu.consumes_stat_sn() {
            conn.exp_stat_sn = sequence.stat_sn.wrapping_add(1);
        }
    }
    let opcode = pdu.opcode();
    let task_of = |core: &Core, itt: u32| {
        core.by_itt
            .get(&itt)
            .copied()
            .ok_or(ConnectionError::Protocol(ProtocolError::UnknownTask {
                opcode,
                itt,
            }))
    };
    match pdu {
        TargetPdu::NopIn(nop, data) => {
            if nop.itt != RESERVED_TAG {
                if conn.ping.is_some_and(|ping| ping.itt == nop.itt) {
                    conn.ping = None;
                }
            } else if nop.ttt != RESERVED_TAG {
                // The target's ping: answer with its TTT and its data (section 11.18).
                let max = conn.limits().max_xmit_data_segment_length as usize;
                let echo = &data[..data.len().min(max)];
                let answer = NopOut {
                    immediate: true,
                    lun: nop.lun,
                    itt: RESERVED_TAG,
                    ttt: nop.ttt,
                    cmd_sn: conn.cmd_sn,
                    exp_stat_sn: conn.exp_stat_sn,
                };
                conn.queue(&mut core.stats, &answer.to_bhs(echo.len() as u32), echo)?;
                core.stats.nop_answers_sent += 1;
            }
        }
        TargetPdu::ScsiResponse(response) => {
            let id = task_of(core, response.itt)?;
            complete_scsi(
                core,
                conn,
                id,
                response.itt,
                response.response,
                response.status,
                response.sense,
                response.residual,
            );
        }
        TargetPdu::DataIn(header, data) => {
            let id = task_of(core, header.itt)?;
            let Some(Task {
                body:
                    TaskBody::Scsi {
                        read_len,
                        data_in,
                        data_in_end,
                        ..
                    },
                ..
            }) = core.tasks.get_mut(&id)
            else {
                return Err(ConnectionError::Protocol(ProtocolError::UnexpectedPdu {
                    opcode,
                }));
            };
            let offset = header.buffer_offset;
            let end = u64::from(offset) + data.len() as u64;
            if end > u64::from(*read_len) {
                return Err(ConnectionError::Protocol(ProtocolError::DataInOutOfRange {
                    itt: header.itt,
                    offset,
                    len: data.len() as u32,
                    expected: *read_len,
                }));
            }
            if !data.is_empty() {
                if data_in.len() < *read_len as usize {
                    data_in.resize(*read_len as usize, 0);
                }
                data_in[offset as usize..end as usize].copy_from_slice(&data);
                *data_in_end = (*data_in_end).max(end as u32);
                core.stats.data_in_bytes += data.len() as u64;
            }
            if let Some(status) = header.status {
                complete_scsi(
                    core,
                    conn,
                    id,
                    header.itt,
                    0,
                    status,
                    Vec::new(),
                    header.residual,
                );
            }
        }
        TargetPdu::ReadyToTransfer(r2t) => {
            let id = task_of(core, r2t.itt)?;
            let write_len = match core.tasks.get(&id) {
                Some(Task {
                    body: TaskBody::Scsi { write, lun, .. },
                    ..
                }) => (write.len() as u32, *lun),
                _ => (0, Lun::default()),
            };
            let (write_len, lun) = write_len;
            let end = u64::from(r2t.buffer_offset) + u64::from(r2t.desired_length);
            if r2t.desired_length == 0 || end > u64::from(write_len) {
                return Err(ConnectionError::Protocol(ProtocolError::R2tOutOfRange {
                    itt: r2t.itt,
                    offset: r2t.buffer_offset,
                    len: r2t.desired_length,
                    write_len,
                }));
            }
            conn.out_sequences.push_back(OutSequence {
                itt: r2t.itt,
                lun,
                ttt: r2t.ttt,
                next: r2t.buffer_offset,
                end: end as u32,
                data_sn: 0,
            });
        }
        TargetPdu::TextResponse(header, data) => {
            let id = task_of(core, header.itt)?;
            let Some(Task {
                body: TaskBody::Text { reply, .. },
                ..
            }) = core.tasks.get_mut(&id)
            else {
                return Err(ConnectionError::Protocol(ProtocolError::UnexpectedPdu {
                    opcode,
                }));
            };
            if let Err(error) = reply.push(&data) {
                core.by_itt.remove(&header.itt);
                core.finish(id, Err(TaskError::Text(error)));
            } else if header.continue_ || !header.final_ {
                // More text follows: ask for it with the target's TTT, same task tag.
                core.queue.push_front(Queued {
                    id,
                    text_ttt: Some(header.ttt),
                });
            } else {
                let keys = reply.finish();
                core.by_itt.remove(&header.itt);
                core.finish(id, keys.map(TaskReply::Text).map_err(TaskError::Text));
            }
        }
        TargetPdu::LogoutResponse(response) => match conn.phase {
            Phase::LoggingOut { itt, cause } if itt == response.itt => {
                return Ok(Some(StepEnd::LoggedOut {
                    cause,
                    response: response.response,
                    time2wait_s: response.time2wait,
                }));
            }
            _ => {
                return Err(ConnectionError::Protocol(ProtocolError::UnexpectedPdu {
                    opcode,
                }));
            }
        },
        TargetPdu::Reject(reject) => {
            core.stats.rejects += 1;
            let itt = reject.rejected_itt();
            if conn.ping.is_some_and(|ping| ping.itt == itt) {
                // Our ping was refused; the target is alive, which is what we wanted to know.
                conn.ping = None;
                return Ok(None);
            }
            let rejected = reject.rejected_opcode();
            if rejected == Opcode::DataOut.code() {
                return Err(ConnectionError::Rejected(reject.reason));
            }
            let is_command =
                rejected == Opcode::ScsiCommand.code() || rejected == Opcode::TextRequest.code();
            if let (true, Some(&id)) = (is_command, core.by_itt.get(&itt)) {
                if reject.reason.may_resend() {
                    return Err(ConnectionError::Rejected(reject.reason));
                }
                core.by_itt.remove(&itt);
                conn.out_sequences.retain(|s| s.itt != itt);
                core.finish(id, Err(TaskError::Rejected(reject.reason)));
            }
        }
        TargetPdu::AsyncMessage(message) => {
            core.stats.async_messages += 1;
            match message.event {
                AsyncEvent::ScsiEvent => {
                    if let Ok(sense) = Sense::parse(&message.sense) {
                        if sense.is_unit_attention() {
                            core.stats.unit_attentions += 1;
                        }
                        core.events.push(SessionEvent::UnitAttention {
                            task: None,
                            lun: message.lun,
                            sense,
                        });
                    }
                }
                AsyncEvent::LogoutRequested => {
                    if matches!(conn.phase, Phase::Full) {
                        start_logout(
                            core,
                            conn,
                            LogoutCause::TargetRequest {
                                time2wait_s: message.parameters[2],
                            },
                            now_ms,
                        )?;
                    }
                }
                AsyncEvent::DroppingConnection | AsyncEvent::DroppingAllConnections => {
                    return Err(ConnectionError::TargetDropping {
                        time2wait_s: message.parameters[1],
                    });
                }
                // We cannot renegotiate in the full feature phase with ERL 0 tooling; the target
                // keeps the current values or drops the connection, which we recover from.
                AsyncEvent::RenegotiationRequested
                | AsyncEvent::VendorSpecific
                | AsyncEvent::Other(_) => {}
            }
        }
        TargetPdu::LoginResponse(..) => {
            return Err(ConnectionError::Protocol(ProtocolError::UnexpectedPdu {
                opcode,
            }));
        }
        // We send no task management requests; vendor PDUs mean nothing to us.
        TargetPdu::Other(_) => {}
    }
    Ok(None)
}

/// A SCSI command finished at the target: complete it, or issue it again after a UNIT
/// ATTENTION.
#[allow(clippy::too_many_arguments)]
fn complete_scsi(
    core: &mut Core,
    conn: &mut Connection,
    id: TaskId,
    itt: u32,
    response: u8,
    status: u8,
    sense: Vec<u8>,
    residual: Residual,
) {
    core.by_itt.remove(&itt);
    conn.out_sequences.retain(|s| s.itt != itt);
    if response != 0 {
        core.finish(id, Err(TaskError::TargetFailure { response }));
        return;
    }
    let status = Status::from_u8(status);
    let retries = core.config.retry.unit_attention_retries;
    let Some(task) = core.tasks.get_mut(&id) else {
        return;
    };
    if status == Status::CheckCondition {
        if let Ok(parsed) = Sense::parse(&sense) {
            if parsed.is_unit_attention() {
                core.stats.unit_attentions += 1;
                let lun = match &task.body {
                    TaskBody::Scsi { lun, .. } => *lun,
                    TaskBody::Text { .. } => Lun::default(),
                };
                core.events.push(SessionEvent::UnitAttention {
                    task: Some(id),
                    lun,
                    sense: parsed,
                });
                if task.unit_attentions < retries {
                    // The condition is cleared by reporting it: the same command now runs.
                    task.unit_attentions += 1;
                    task.reset_progress();
                    core.queue.push_front(Queued { id, text_ttt: None });
                    return;
                }
            }
        }
    }
    let unit_attentions_retried = task.unit_attentions;
    let TaskBody::Scsi {
        read_len,
        data_in,
        data_in_end,
        ..
    } = &mut task.body
    else {
        return;
    };
    let mut data = core::mem::take(data_in);
    let transferred = match residual {
        Residual::Underflow(count) => read_len.saturating_sub(count),
        _ => *data_in_end,
    };
    data.resize(transferred.min(*read_len) as usize, 0);
    let reply = ScsiReply {
        status,
        sense,
        data,
        residual,
        unit_attentions_retried,
    };
    core.finish(id, Ok(TaskReply::Scsi(reply)));
}

fn start_logout(
    core: &mut Core,
    conn: &mut Connection,
    cause: LogoutCause,
    now_ms: u64,
) -> Result<(), ConnectionError> {
    let itt = conn.take_itt();
    let request = LogoutRequest {
        immediate: true,
        reason: LogoutReason::CloseSession,
        itt,
        cid: core.cid,
        cmd_sn: conn.cmd_sn,
        exp_stat_sn: conn.exp_stat_sn,
    };
    conn.queue(&mut core.stats, &request.to_bhs(), &[])?;
    conn.phase = Phase::LoggingOut { itt, cause };
    conn.logout_deadline_ms = now_ms.saturating_add(core.timeouts().logout_ms);
    Ok(())
}

/// Issues queued tasks while the window is open, or the user's logout once nothing is issued.
fn issue(core: &mut Core, conn: &mut Connection, now_ms: u64) -> Result<(), ConnectionError> {
    if !matches!(conn.phase, Phase::Full) {
        return Ok(());
    }
    if core.logout_deadline_ms.is_some() {
        if core.by_itt.is_empty() {
            start_logout(core, conn, LogoutCause::User, now_ms)?;
        }
        return Ok(());
    }
    let params = conn.limits();
    while conn.window_open() && conn.wire.queued() < OUTBOUND_HIGH_WATER {
        let next = if core.hold {
            // Only urgent tasks pass a hold; they usually sit at the front, but a UNIT ATTENTION
            // retry may have been put before them.
            let tasks = &core.tasks;
            let urgent = core
                .queue
                .iter()
                .position(|q| tasks.get(&q.id).is_some_and(|task| task.urgent));
            urgent.and_then(|position| core.queue.remove(position))
        } else {
            core.queue.pop_front()
        };
        let Some(next) = next else {
            break;
        };
        let Some(task) = core.tasks.get_mut(&next.id) else {
            continue;
        };
        let reissue = task.attempts > 0 || task.unit_attentions > 0;
        let cmd_sn = conn.cmd_sn;
        conn.cmd_sn = conn.cmd_sn.wrapping_add(1);
        match &task.body {
            TaskBody::Scsi {
                lun,
                cdb,
                read_len,
                write,
                ..
            } => {
                let itt = conn.take_itt();
                let write_len = write.len() as u32;
                let immediate_len = if params.immediate_data {
                    write_len
                        .min(params.first_burst_length)
                        .min(params.max_xmit_data_segment_length)
                } else {
                    0
                };
                let unsolicited_end = if params.initial_r2t {
                    immediate_len
                } else {
                    write_len.min(params.first_burst_length)
                };
                let command = ScsiCommand {
                    immediate: false,
                    final_: unsolicited_end == immediate_len,
                    read: *read_len > 0,
                    write: write_len > 0,
                    attribute: TaskAttribute::Simple,
                    lun: *lun,
                    itt,
                    expected_data_transfer_length: if write_len > 0 {
                        write_len
                    } else {
                        *read_len
                    },
                    cmd_sn,
                    exp_stat_sn: conn.exp_stat_sn,
                    cdb: *cdb,
                };
                let immediate = &write[..immediate_len as usize];
                conn.wire.queue(&command.to_bhs(immediate_len), immediate)?;
                core.stats.pdus_sent += 1;
                core.stats.data_out_bytes += u64::from(immediate_len);
                if unsolicited_end > immediate_len {
                    conn.out_sequences.push_back(OutSequence {
                        itt,
                        lun: *lun,
                        ttt: RESERVED_TAG,
                        next: immediate_len,
                        end: unsolicited_end,
                        data_sn: 0,
                    });
                }
                task.issued = Some(Issued { itt, at_ms: now_ms });
                core.by_itt.insert(itt, next.id);
            }
            TaskBody::Text { request, .. } => {
                let (itt, ttt, data) = match (next.text_ttt, task.issued) {
                    (Some(ttt), Some(issued)) => (issued.itt, ttt, Vec::new()),
                    _ => (conn.take_itt(), RESERVED_TAG, request.encode()),
                };
                let text = TextRequest {
                    immediate: false,
                    final_: true,
                    continue_: false,
                    itt,
                    ttt,
                    cmd_sn,
                    exp_stat_sn: conn.exp_stat_sn,
                };
                conn.queue(&mut core.stats, &text.to_bhs(data.len() as u32), &data)?;
                if task.issued.is_none() {
                    task.issued = Some(Issued { itt, at_ms: now_ms });
                }
                core.by_itt.insert(itt, next.id);
            }
        }
        core.stats.commands_issued += 1;
        if reissue && next.text_ttt.is_none() {
            core.stats.commands_reissued += 1;
        }
    }
    Ok(())
}

/// Encodes Data-Out PDUs of the pending sequences while the outbound queue has room.
fn fill_data_out(core: &mut Core, conn: &mut Connection) -> Result<(), ConnectionError> {
    if conn.params.is_none() {
        return Ok(());
    }
    let max_len = conn.limits().max_xmit_data_segment_length;
    while conn.wire.queued() < OUTBOUND_HIGH_WATER {
        let Some(sequence) = conn.out_sequences.front_mut() else {
            break;
        };
        let write = core
            .by_itt
            .get(&sequence.itt)
            .and_then(|id| core.tasks.get(id))
            .and_then(|task| match &task.body {
                TaskBody::Scsi { write, .. } => Some(write),
                TaskBody::Text { .. } => None,
            });
        let Some(write) = write else {
            // The task completed or was issued again: its old sequences are void.
            conn.out_sequences.pop_front();
            continue;
        };
        let len = (sequence.end - sequence.next).min(max_len);
        let start = sequence.next as usize;
        let Some(chunk) = write.get(start..start + len as usize) else {
            conn.out_sequences.pop_front();
            continue;
        };
        let final_ = sequence.next + len == sequence.end;
        let header = DataOut {
            final_,
            lun: sequence.lun,
            itt: sequence.itt,
            ttt: sequence.ttt,
            exp_stat_sn: conn.exp_stat_sn,
            data_sn: sequence.data_sn,
            buffer_offset: sequence.next,
        };
        sequence.next += len;
        sequence.data_sn += 1;
        if final_ {
            conn.out_sequences.pop_front();
        }
        conn.wire.queue(&header.to_bhs(len), chunk)?;
        core.stats.pdus_sent += 1;
        core.stats.data_out_pdus += 1;
        core.stats.data_out_bytes += u64::from(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(serial_lt(1, 2));
        assert!(!serial_lt(2, 1));
        assert!(serial_lt(u32::MAX, 0));
        assert!(serial_lt(0xFFFF_FFF0, 5));
        assert!(!serial_lt(5, 0xFFFF_FFF0));
        assert!(serial_le(7, 7));
        assert!(!serial_lt(7, 7));
    }
}
