//! A blocking iSCSI client for host tools and tests (feature `std`).
//!
//! It drives the same sans-IO [`crate::iscsi::Session`] and [`Disk`] the kernel uses, over a
//! [`transport::TcpPipe`]: each call submits one operation and polls until it completes or the
//! client's timeout passes, opening TCP connections whenever the session asks for one
//! (reconnection and re-issue are the session's, not this module's). Between polls that moved
//! nothing it sleeps 200 µs, which is plenty for a host test and keeps a core free.
//!
//! ```no_run
//! use std::time::Duration;
//! use storage::blocking::Client;
//! use storage::iscsi::{Isid, SessionConfig};
//!
//! let initiator = "iqn.2026-01.test.hv:node1";
//! let config = SessionConfig::normal(initiator, "iqn.2026-01.test.hv:shared", Isid::for_name(initiator));
//! let mut client = Client::connect("127.0.0.1:3260", config, 1, Duration::from_secs(10))?;
//! let capacity = client.read_capacity()?;
//! let first_block = client.read(0, 1)?;
//! client.logout()?;
//! # Ok::<(), storage::blocking::BlockingError>(())
//! ```

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::string::{String, ToString};
use std::time::{Duration, Instant};
use std::vec::Vec;

use core::fmt;

use transport::{ClosedPipe, TcpPipe};

use crate::iscsi::discovery::{self, DiscoveredTarget, DiscoveryError};
use crate::iscsi::{
    ChapConfig, ConnectionError, Disk, DiskError, DiskEvent, DiskReply, Isid, LoginError, OpId,
    RegistrationEvent, SessionConfig, SessionEvent, SessionState, SessionStats, TaskError,
    TaskReply,
};
use crate::scsi::{
    Capacity, RegisteredKeys, ReservationKey, ReservationStatus, Sense, StandardInquiry,
};

/// The longest one TCP connect may block.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a blocking call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockingError {
    /// The portal address does not resolve.
    Address(io::ErrorKind),
    /// Nothing completed within the client's timeout; the last connection failure, if any.
    Timeout { last: Option<ConnectionError> },
    /// The operation completed with an error.
    Disk(DiskError),
    /// The session failed for good (authentication refused, target not found, ...).
    Login(LoginError),
    /// The session was logged out.
    Closed,
    /// A SendTargets answer that does not parse.
    Discovery(DiscoveryError),
    /// The operation completed with an answer of another kind than asked (a bug).
    UnexpectedReply,
}

impl fmt::Display for BlockingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockingError::Address(kind) => write!(f, "cannot resolve the portal: {kind}"),
            BlockingError::Timeout { last: Some(last) } => {
                write!(f, "timed out; last connection failure: {last}")
            }
            BlockingError::Timeout { last: None } => f.write_str("timed out"),
            BlockingError::Disk(e) => write!(f, "{e}"),
            BlockingError::Login(e) => write!(f, "{e}"),
            BlockingError::Closed => f.write_str("the session is closed"),
            BlockingError::Discovery(e) => write!(f, "{e}"),
            BlockingError::UnexpectedReply => f.write_str("unexpected kind of reply"),
        }
    }
}

impl std::error::Error for BlockingError {}

impl From<DiskError> for BlockingError {
    fn from(error: DiskError) -> Self {
        match error {
            DiskError::Task(TaskError::SessionFailed(login)) => BlockingError::Login(login),
            DiskError::Task(TaskError::LoggedOut) => BlockingError::Closed,
            other => BlockingError::Disk(other),
        }
    }
}

fn resolve(portal: impl ToSocketAddrs) -> Result<Vec<SocketAddr>, BlockingError> {
    let addresses: Vec<SocketAddr> = portal
        .to_socket_addrs()
        .map_err(|e| BlockingError::Address(e.kind()))?
        .collect();
    if addresses.is_empty() {
        return Err(BlockingError::Address(io::ErrorKind::NotFound));
    }
    Ok(addresses)
}

/// A blocking client of one LUN.
pub struct Client {
    disk: Disk,
    portal: Vec<SocketAddr>,
    pipe: Option<TcpPipe>,
    timeout: Duration,
    start: Instant,
    unit_attentions: Vec<Sense>,
    events: Vec<SessionEvent>,
    registration: Vec<RegistrationEvent>,
    last_error: Option<ConnectionError>,
    text_reply: Option<(OpId, Result<TaskReply, TaskError>)>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("portal", &self.portal)
            .field("state", &self.disk.session().state())
            .finish()
    }
}

impl Client {
    /// Connects to `portal` (`"host:port"`, a `SocketAddr`...), logs in with `config` and waits for the full feature
    /// phase, at most `timeout`; later calls each wait at most `timeout` too.
    pub fn connect(
        portal: impl ToSocketAddrs,
        config: SessionConfig,
        lun: u16,
        timeout: Duration,
    ) -> Result<Client, BlockingError> {
        let disk = Disk::new(crate::iscsi::Session::new(config), lun).map_err(|_| {
            BlockingError::Disk(DiskError::Data(crate::scsi::DataError::Invalid("LUN")))
        })?;
        let mut client = Client {
            disk,
            portal: resolve(portal)?,
            pipe: None,
            timeout,
            start: Instant::now(),
            unit_attentions: Vec::new(),
            events: Vec::new(),
            registration: Vec::new(),
            last_error: None,
            text_reply: None,
        };
        client.wait_logged_in()?;
        Ok(client)
    }

    /// How long each later call may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn stats(&self) -> SessionStats {
        *self.disk.session().stats()
    }

    /// Every UNIT ATTENTION seen (retried or not), oldest first.
    pub fn unit_attentions(&self) -> &[Sense] {
        &self.unit_attentions
    }

    /// Every session event other than completions, oldest first (log-ins, lost connections).
    pub fn events(&self) -> &[SessionEvent] {
        &self.events
    }

    /// Keeps `key` registered across reconnections ([`Disk::keep_registration`]).
    pub fn keep_registration(&mut self, key: Option<ReservationKey>) {
        self.disk.keep_registration(key);
    }

    /// What was done about the kept registration after each reconnection, oldest first.
    pub fn registration_events(&self) -> &[RegistrationEvent] {
        &self.registration
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn wait_logged_in(&mut self) -> Result<(), BlockingError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            self.step(None);
            match self.disk.session().state() {
                SessionState::FullFeature => return Ok(()),
                SessionState::Failed => {
                    return Err(self
                        .disk
                        .session()
                        .failure()
                        .cloned()
                        .map_or(BlockingError::Closed, BlockingError::Login))
                }
                SessionState::Closed => return Err(BlockingError::Closed),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(BlockingError::Timeout {
                    last: self.last_error.clone(),
                });
            }
        }
    }

    /// Opens a TCP connection for the session (to the redirect address if it has one).
    fn open_connection(&mut self, now_ms: u64) {
        let redirect = self
            .disk
            .session()
            .redirect_address()
            .and_then(|address| discovery::parse_target_address(address).ok())
            .and_then(|portal| resolve(portal.to_string()).ok());
        let addresses = redirect.unwrap_or_else(|| self.portal.clone());
        let timeout = CONNECT_TIMEOUT.min(self.timeout);
        self.pipe = TcpPipe::connect(&addresses[..], timeout).ok();
        self.disk.session_mut().connection_opened(now_ms);
        if self.pipe.is_none() {
            // The session learns of the failure as a closed pipe during login, which counts as
            // a failed attempt and backs off.
            let events = self.disk.poll(&mut ClosedPipe, now_ms);
            self.absorb(events, None);
        }
    }

    /// One poll; returns the completion of `op` if it came.
    fn step(&mut self, op: Option<OpId>) -> Option<Result<DiskReply, DiskError>> {
        let now = self.now_ms();
        if self.disk.session().needs_connection(now) {
            self.open_connection(now);
        }
        let before = self.progress();
        let events = match self.pipe.as_mut() {
            Some(pipe) => self.disk.poll(pipe, now),
            None => self.disk.poll(&mut ClosedPipe, now),
        };
        let done = self.absorb(events, op);
        if done.is_none() && self.progress() == before {
            std::thread::sleep(Duration::from_micros(200));
        }
        done
    }

    fn progress(&self) -> u64 {
        let stats = self.disk.session().stats();
        stats.pdus_sent + stats.pdus_received + stats.data_out_pdus
    }

    fn absorb(
        &mut self,
        events: Vec<DiskEvent>,
        op: Option<OpId>,
    ) -> Option<Result<DiskReply, DiskError>> {
        let mut done = None;
        for event in events {
            match event {
                DiskEvent::Completed { op: id, result } if Some(id) == op => done = Some(result),
                // A late completion of an operation whose caller timed out.
                DiskEvent::Completed { .. } => {}
                DiskEvent::Registration(event) => self.registration.push(event),
                DiskEvent::Session(SessionEvent::Completed(completion)) => {
                    self.text_reply = Some((completion.task, completion.result));
                }
                DiskEvent::Session(event) => {
                    match &event {
                        SessionEvent::ConnectionLost(error) => {
                            self.last_error = Some(error.clone());
                            self.pipe = None;
                        }
                        SessionEvent::LoggedOut { .. } | SessionEvent::Failed(_) => {
                            self.pipe = None
                        }
                        SessionEvent::UnitAttention { sense, .. } => {
                            self.unit_attentions.push(*sense)
                        }
                        _ => {}
                    }
                    self.events.push(event);
                }
            }
        }
        done
    }

    fn run(&mut self, submitted: Result<OpId, DiskError>) -> Result<DiskReply, BlockingError> {
        let op = submitted?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(result) = self.step(Some(op)) {
                return result.map_err(BlockingError::from);
            }
            if Instant::now() >= deadline {
                return Err(BlockingError::Timeout {
                    last: self.last_error.clone(),
                });
            }
        }
    }

    /// Drives the session for `duration` without an operation of our own (to let it notice a
    /// dropped connection, answer NOP pings, or reconnect).
    pub fn poll_for(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.step(None);
        }
    }

    fn done(reply: DiskReply) -> Result<(), BlockingError> {
        match reply {
            DiskReply::Done => Ok(()),
            _ => Err(BlockingError::UnexpectedReply),
        }
    }

    pub fn read(&mut self, lba: u64, blocks: u32) -> Result<Vec<u8>, BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.read(lba, blocks, now);
        match self.run(submitted)? {
            DiskReply::Data(data) => Ok(data),
            _ => Err(BlockingError::UnexpectedReply),
        }
    }

    /// Writes `data` (whole blocks) at `lba`.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.write(lba, data.to_vec(), now);
        Self::done(self.run(submitted)?)
    }

    pub fn flush(&mut self) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.flush(now);
        Self::done(self.run(submitted)?)
    }

    pub fn test_unit_ready(&mut self) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.test_unit_ready(now);
        Self::done(self.run(submitted)?)
    }

    pub fn inquiry(&mut self) -> Result<StandardInquiry, BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.inquiry(now);
        match self.run(submitted)? {
            DiskReply::Inquiry(inquiry) => Ok(inquiry),
            _ => Err(BlockingError::UnexpectedReply),
        }
    }

    /// READ CAPACITY(16); also sets the block length later reads and writes use.
    pub fn read_capacity(&mut self) -> Result<Capacity, BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.read_capacity(now);
        match self.run(submitted)? {
            DiskReply::Capacity(capacity) => Ok(capacity),
            _ => Err(BlockingError::UnexpectedReply),
        }
    }

    pub fn report_luns(&mut self) -> Result<Vec<u16>, BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.report_luns(now);
        match self.run(submitted)? {
            DiskReply::Luns(luns) => Ok(luns),
            _ => Err(BlockingError::UnexpectedReply),
        }
    }

    pub fn read_keys(&mut self) -> Result<RegisteredKeys, BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.read_keys(now);
        match self.run(submitted)? {
            DiskReply::Keys(keys) => Ok(keys),
            _ => Err(BlockingError::UnexpectedReply),
        }
    }

    pub fn read_reservation(&mut self) -> Result<ReservationStatus, BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.read_reservation(now);
        match self.run(submitted)? {
            DiskReply::Reservation(status) => Ok(status),
            _ => Err(BlockingError::UnexpectedReply),
        }
    }

    pub fn register(
        &mut self,
        current: ReservationKey,
        new_key: ReservationKey,
    ) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.register(current, new_key, now);
        Self::done(self.run(submitted)?)
    }

    pub fn register_and_ignore(&mut self, new_key: ReservationKey) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.register_and_ignore(new_key, now);
        Self::done(self.run(submitted)?)
    }

    pub fn reserve(&mut self, key: ReservationKey) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.reserve(key, now);
        Self::done(self.run(submitted)?)
    }

    pub fn release(&mut self, key: ReservationKey) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.release(key, now);
        Self::done(self.run(submitted)?)
    }

    pub fn clear(&mut self, key: ReservationKey) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.clear(key, now);
        Self::done(self.run(submitted)?)
    }

    pub fn preempt(
        &mut self,
        key: ReservationKey,
        victim: ReservationKey,
    ) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.preempt(key, victim, now);
        Self::done(self.run(submitted)?)
    }

    pub fn preempt_and_abort(
        &mut self,
        key: ReservationKey,
        victim: ReservationKey,
    ) -> Result<(), BlockingError> {
        let now = self.now_ms();
        let submitted = self.disk.preempt_and_abort(key, victim, now);
        Self::done(self.run(submitted)?)
    }

    /// A Text Request on this session (e.g. SendTargets on a discovery session).
    pub fn text(
        &mut self,
        keys: crate::iscsi::TextKeys,
    ) -> Result<crate::iscsi::TextKeys, BlockingError> {
        let now = self.now_ms();
        let id = self
            .disk
            .session_mut()
            .submit_text(keys, now)
            .map_err(|e| BlockingError::Disk(DiskError::Submit(e)))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            self.step(None);
            if let Some((task, result)) = self.text_reply.take() {
                if task == id {
                    return match result {
                        Ok(TaskReply::Text(keys)) => Ok(keys),
                        Ok(TaskReply::Scsi(_)) => Err(BlockingError::UnexpectedReply),
                        Err(e) => Err(DiskError::Task(e).into()),
                    };
                }
            }
            if Instant::now() >= deadline {
                return Err(BlockingError::Timeout {
                    last: self.last_error.clone(),
                });
            }
        }
    }

    /// Logs out and waits for the target's answer (at most the session's logout timeout).
    pub fn logout(mut self) -> Result<(), BlockingError> {
        let now = self.now_ms();
        self.disk.session_mut().logout(now);
        let deadline = Instant::now() + self.timeout;
        loop {
            self.step(None);
            let clean = self.events.iter().find_map(|event| match event {
                SessionEvent::LoggedOut { clean } => Some(*clean),
                _ => None,
            });
            match clean {
                Some(true) => return Ok(()),
                Some(false) => {
                    return Err(BlockingError::Timeout {
                        last: self.last_error.clone(),
                    })
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(BlockingError::Timeout {
                    last: self.last_error.clone(),
                });
            }
        }
    }
}

/// Lists the targets of `portal` with a discovery session of `initiator_name` (with CHAP if
/// given), then logs out.
pub fn discover(
    portal: impl ToSocketAddrs,
    initiator_name: &str,
    chap: Option<ChapConfig>,
    timeout: Duration,
) -> Result<Vec<DiscoveredTarget>, BlockingError> {
    // Another ISID than the node's normal sessions get from `Isid::for_name(initiator_name)`:
    // a discovery session must not look like their reinstatement.
    let isid = Isid::for_name(&std::format!("{initiator_name}#discovery"));
    let mut config = SessionConfig::discovery(initiator_name, isid);
    config.login.chap = chap;
    let mut client = Client::connect(portal, config, 0, timeout)?;
    let keys = client.text(discovery::send_targets_request())?;
    let targets = discovery::parse_send_targets(&keys).map_err(BlockingError::Discovery)?;
    // The list is what we came for; a logout the target does not confirm changes nothing.
    let _ = client.logout();
    Ok(targets)
}

/// The portal of `target` reachable over loopback, as `host:port` (for tests of discovery).
pub fn portal_of(target: &DiscoveredTarget) -> Option<String> {
    target.portals.first().map(|portal| portal.to_string())
}
