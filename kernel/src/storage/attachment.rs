//! One LUN in use by a VM of this node: its iSCSI session (own TCP connection on the storage
//! network, reconnected by the session when lost), the channel to the VM's virtio-blk device,
//! and the reservation work the node does on the LUN ([`Procedure`]), one at a time.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ::net::addr::Endpoint;
use ::net::smoltcp::iface::SocketHandle;
use storage::iscsi::{Disk, DiskError, DiskEvent, DiskReply, OpId, RegistrationEvent};
use storage::iscsi::{SessionEvent, SessionState};
use storage::scsi::{CommandError, ReservationKey};
use storage::LunPath;
use transport::{Pipe, PipeError};
use vmx::devices::virtio::blk::{RequestId, RequestKind, SECTOR_SIZE};

use super::backend::SharedChannel;

/// A handle to the outcome of a [`Procedure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// Reservation and housekeeping work on a LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Procedure {
    /// Logged in, READ CAPACITY: the disk's size.
    Open,
    /// Register this node's key and make sure it holds the reservation (Write Exclusive -
    /// Registrants Only). `takeover`: preempt another holder (a migration's destination, or the
    /// source taking its disk back); otherwise another holder is an error (a new VM must not
    /// use a disk another node's VM writes).
    Claim { takeover: bool },
    /// SYNCHRONIZE CACHE: every acknowledged write is durable at the target.
    Flush,
    /// A write of no blocks: whether the target lets this node's session write (a fenced node
    /// gets RESERVATION CONFLICT). Harmless: nothing is written.
    Probe,
    /// Give the disk up: RELEASE (if we hold it), then unregister our key.
    Release,
}

/// What a finished procedure found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Open: size in 512-byte sectors.
    Opened {
        sectors: u64,
    },
    /// Claim: who held the reservation before (`None`: nobody, or already us).
    Claimed {
        previous: Option<ReservationKey>,
    },
    Flushed,
    /// Probe: whether the write was allowed.
    Probed {
        write_allowed: bool,
    },
    Released,
}

/// Why a procedure did not give its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcedureError {
    /// Another node holds the disk's reservation (a claim without takeover).
    HeldBy(ReservationKey),
    /// The session or a command failed.
    Failed(String),
}

/// One step of the running procedure: the operation it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Capacity,
    Register,
    ReadReservation,
    Reserve { previous: Option<ReservationKey> },
    Preempt { victim: ReservationKey },
    Flush,
    Probe,
    Release,
    Unregister,
}

struct Running {
    ticket: Ticket,
    procedure: Procedure,
    step: Step,
    op: Option<OpId>,
}

/// A LUN attached for one VM.
pub struct Attachment {
    pub path: LunPath,
    pub portal: Endpoint,
    /// The VM that uses it.
    pub user: String,
    pub disk: Disk,
    pub socket: Option<SocketHandle>,
    pub channel: SharedChannel,
    key: ReservationKey,
    /// Guest requests at the target, by the operation carrying them.
    guest_ops: BTreeMap<OpId, (RequestId, bool)>,
    running: Option<Running>,
    queued: VecDeque<(Ticket, Procedure)>,
    finished: Vec<(Ticket, Result<Outcome, ProcedureError>)>,
    /// The LUN's size in 512-byte sectors, once [`Procedure::Open`] read it.
    pub sectors: Option<u64>,
    /// Set once the node gave the disk up: the session logs out and the attachment goes.
    pub closing: bool,
    /// Since when the session has had no working connection, and whether the console was
    /// told (a target that stays away is worth a line, a reconnect is routine).
    lost_since: Option<u64>,
    lost_reported: bool,
}

/// How long a lost connection may last before the console hears of it.
const LOST_REPORT_MS: u64 = 5_000;

/// A pipe that is always closed: what the session gets while it has no TCP connection.
pub struct NoConnection;

impl Pipe for NoConnection {
    fn send(&mut self, _: &[u8]) -> Result<usize, PipeError> {
        Err(PipeError::Closed)
    }

    fn recv(&mut self, _: &mut [u8]) -> Result<usize, PipeError> {
        Err(PipeError::Closed)
    }
}

fn describe(error: &DiskError) -> ProcedureError {
    ProcedureError::Failed(format!("{error}"))
}

fn is_conflict(error: &DiskError) -> bool {
    matches!(error, DiskError::Scsi(CommandError::ReservationConflict))
}

impl Attachment {
    pub fn new(
        path: LunPath,
        portal: Endpoint,
        user: &str,
        disk: Disk,
        channel: SharedChannel,
        key: ReservationKey,
    ) -> Attachment {
        Attachment {
            path,
            portal,
            user: user.to_string(),
            disk,
            socket: None,
            channel,
            key,
            guest_ops: BTreeMap::new(),
            running: None,
            queued: VecDeque::new(),
            finished: Vec::new(),
            sectors: None,
            closing: false,
            lost_since: None,
            lost_reported: false,
        }
    }

    /// Queues `procedure`; its outcome comes back from [`Self::take_result`].
    pub fn start(&mut self, ticket: Ticket, procedure: Procedure) {
        self.queued.push_back((ticket, procedure));
    }

    /// The outcome of a finished procedure, once.
    pub fn take_result(&mut self, ticket: Ticket) -> Option<Result<Outcome, ProcedureError>> {
        let at = self.finished.iter().position(|(t, _)| *t == ticket)?;
        Some(self.finished.remove(at).1)
    }

    /// Whether the procedure of `ticket` is still queued or running.
    pub fn pending(&self, ticket: Ticket) -> bool {
        self.running.as_ref().is_some_and(|r| r.ticket == ticket)
            || self.queued.iter().any(|(t, _)| *t == ticket)
    }

    /// Whether anything is under way (the loop should not sleep).
    pub fn busy(&self) -> bool {
        self.running.is_some()
            || !self.queued.is_empty()
            || !self.guest_ops.is_empty()
            || !self.channel.lock().submitted.is_empty()
    }

    /// Handles what one poll of the session reported.
    pub fn absorb(&mut self, events: Vec<DiskEvent>, now_ms: u64) -> Vec<String> {
        let mut lines = Vec::new();
        for event in events {
            match event {
                DiskEvent::Completed { op, result } => {
                    if let Some((request, is_read)) = self.guest_ops.remove(&op) {
                        self.complete_guest(request, is_read, result);
                    } else if self.running.as_ref().is_some_and(|r| r.op == Some(op)) {
                        self.advance(result, now_ms);
                    }
                }
                DiskEvent::Registration(RegistrationEvent::Fenced { .. }) => lines.push(format!(
                    "{}: this node's key is no longer registered (fenced by another node): its \
                     writes are refused",
                    self.path
                )),
                DiskEvent::Registration(RegistrationEvent::Restored { .. }) => {
                    log::info!(
                        "storage: {}: registration restored after a reconnect",
                        self.path
                    )
                }
                DiskEvent::Registration(RegistrationEvent::Failed(e)) => {
                    log::warn!("storage: {}: restoring the registration: {e}", self.path)
                }
                DiskEvent::Session(SessionEvent::LoggedIn { reconnected, .. }) => {
                    if reconnected {
                        log::info!("storage: {}: logged in again", self.path);
                    }
                    if let (Some(since), true) = (self.lost_since, self.lost_reported) {
                        lines.push(format!(
                            "disk {} of {}: the target answers again (after {} s)",
                            self.path,
                            self.user,
                            now_ms.saturating_sub(since) / 1000
                        ));
                    }
                    self.lost_since = None;
                    self.lost_reported = false;
                }
                DiskEvent::Session(SessionEvent::ConnectionLost(e)) => {
                    log::warn!("storage: {}: connection lost: {e}", self.path);
                    self.lost_since.get_or_insert(now_ms);
                }
                // 29/xx (power on or reset: every new session's first command gets one) is
                // routine; the others (2A/xx: reservations changed) are worth a line.
                DiskEvent::Session(SessionEvent::UnitAttention { sense, .. })
                    if sense.asc == 0x29 =>
                {
                    log::debug!("storage: {}: {sense}", self.path);
                }
                DiskEvent::Session(SessionEvent::UnitAttention { sense, .. }) => {
                    log::info!("storage: {}: {sense}", self.path);
                }
                DiskEvent::Session(SessionEvent::Failed(e)) => {
                    lines.push(format!("{}: the iSCSI session failed: {e}", self.path));
                }
                DiskEvent::Session(_) => {}
            }
        }
        lines
    }

    fn complete_guest(
        &mut self,
        request: RequestId,
        is_read: bool,
        result: Result<DiskReply, DiskError>,
    ) {
        let data = match result {
            Ok(DiskReply::Data(data)) if is_read => Ok(data),
            Ok(DiskReply::Done) if !is_read => Ok(Vec::new()),
            Ok(_) => Err(()),
            Err(e) => {
                log::warn!("storage: {}: guest request failed: {e}", self.path);
                Err(())
            }
        };
        self.channel.lock().completed.push_back((request, data));
    }

    /// A line for the console once the target has stayed away for a while.
    pub fn check_reachable(&mut self, now_ms: u64) -> Option<String> {
        let since = self.lost_since?;
        if self.lost_reported || now_ms < since + LOST_REPORT_MS || self.closing {
            return None;
        }
        self.lost_reported = true;
        Some(format!(
            "disk {} of {}: the target at {} has not answered for {} s; the guest's disk \
             requests wait (each fails after {} s)",
            self.path,
            self.user,
            self.portal,
            now_ms.saturating_sub(since) / 1000,
            self.disk.session().config().retry.command_deadline_ms / 1000
        ))
    }

    /// Moves the guest's queued requests into iSCSI commands (unless held).
    pub fn issue_guest_requests(&mut self, now_ms: u64) {
        let requests: Vec<_> = {
            let mut channel = self.channel.lock();
            if channel.hold {
                return;
            }
            channel.submitted.drain(..).collect()
        };
        let block_len = u64::from(self.disk.block_len());
        for request in requests {
            let (submitted, is_read) = match request.kind {
                RequestKind::Read { sector, len } => {
                    let lba = sector * SECTOR_SIZE / block_len;
                    let blocks = (u64::from(len) / block_len) as u32;
                    (self.disk.read(lba, blocks, now_ms), true)
                }
                RequestKind::Write { sector, data } => {
                    let lba = sector * SECTOR_SIZE / block_len;
                    (self.disk.write(lba, data, now_ms), false)
                }
                RequestKind::Flush => (self.disk.flush(now_ms), false),
                // Answered by the backend itself.
                RequestKind::GetId => continue,
            };
            match submitted {
                Ok(op) => {
                    self.guest_ops.insert(op, (request.id, is_read));
                }
                Err(e) => {
                    log::warn!("storage: {}: guest request refused: {e}", self.path);
                    self.channel
                        .lock()
                        .completed
                        .push_back((request.id, Err(())));
                }
            }
        }
    }

    /// Starts the next queued procedure when none runs and the session can take commands.
    pub fn run_procedures(&mut self, now_ms: u64) {
        if self.running.is_some() {
            return;
        }
        match self.disk.session().state() {
            SessionState::FullFeature => {}
            SessionState::Failed | SessionState::Closed => {
                let why = self
                    .disk
                    .session()
                    .failure()
                    .map_or_else(|| "the session is closed".to_string(), |e| format!("{e}"));
                for (ticket, _) in self.queued.drain(..) {
                    self.finished
                        .push((ticket, Err(ProcedureError::Failed(why.clone()))));
                }
                return;
            }
            // Commands would queue in the session anyway; waiting keeps the steps in order
            // with the log-in.
            _ => return,
        }
        let Some((ticket, procedure)) = self.queued.pop_front() else {
            return;
        };
        let step = match procedure {
            Procedure::Open => Step::Capacity,
            Procedure::Claim { .. } => Step::Register,
            Procedure::Flush => Step::Flush,
            Procedure::Probe => Step::Probe,
            Procedure::Release => Step::Release,
        };
        self.running = Some(Running {
            ticket,
            procedure,
            step,
            op: None,
        });
        self.submit_step(now_ms);
    }

    fn submit_step(&mut self, now_ms: u64) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let key = self.key;
        let disk = &mut self.disk;
        let submitted = match running.step {
            Step::Capacity => disk.read_capacity(now_ms),
            Step::Register => disk.register_and_ignore(key, now_ms),
            Step::ReadReservation => disk.read_reservation(now_ms),
            Step::Reserve { .. } => disk.reserve(key, now_ms),
            Step::Preempt { victim } => disk.preempt(key, victim, now_ms),
            Step::Flush => disk.flush(now_ms),
            Step::Probe => disk.write(0, Vec::new(), now_ms),
            Step::Release => disk.release(key, now_ms),
            Step::Unregister => disk.register(key, ReservationKey::NONE, now_ms),
        };
        match submitted {
            Ok(op) => running.op = Some(op),
            Err(e) => self.finish(Err(describe(&e))),
        }
    }

    fn finish(&mut self, result: Result<Outcome, ProcedureError>) {
        if let Some(running) = self.running.take() {
            self.finished.push((running.ticket, result));
        }
    }

    /// The running procedure's operation completed: the next step, or the outcome.
    fn advance(&mut self, result: Result<DiskReply, DiskError>, now_ms: u64) {
        let Some(&Running {
            ticket,
            procedure,
            step,
            ..
        }) = self.running.as_ref()
        else {
            return;
        };
        let takeover = matches!(procedure, Procedure::Claim { takeover: true });
        let next = match (step, result) {
            (Step::Capacity, Ok(DiskReply::Capacity(capacity))) => {
                let sectors = capacity.bytes() / SECTOR_SIZE;
                self.sectors = Some(sectors);
                return self.finish(Ok(Outcome::Opened { sectors }));
            }
            (Step::Register, Ok(_)) => Step::ReadReservation,
            (Step::ReadReservation, Ok(DiskReply::Reservation(status))) => match status.holder {
                None => Step::Reserve { previous: None },
                Some((holder, _)) if holder == self.key => {
                    self.disk.keep_registration(Some(self.key));
                    return self.finish(Ok(Outcome::Claimed { previous: None }));
                }
                Some((holder, _)) if takeover => Step::Preempt { victim: holder },
                Some((holder, _)) => {
                    // Not ours to take: leave no registration behind either.
                    self.finished
                        .push((ticket, Err(ProcedureError::HeldBy(holder))));
                    Step::Unregister
                }
            },
            (Step::Reserve { previous }, Ok(_)) => {
                self.disk.keep_registration(Some(self.key));
                return self.finish(Ok(Outcome::Claimed { previous }));
            }
            (Step::Preempt { victim }, Ok(_)) => {
                self.disk.keep_registration(Some(self.key));
                return self.finish(Ok(Outcome::Claimed {
                    previous: Some(victim),
                }));
            }
            (Step::Flush, Ok(_)) => return self.finish(Ok(Outcome::Flushed)),
            (Step::Probe, Ok(_)) => {
                return self.finish(Ok(Outcome::Probed {
                    write_allowed: true,
                }))
            }
            (Step::Probe, Err(e)) if is_conflict(&e) => {
                return self.finish(Ok(Outcome::Probed {
                    write_allowed: false,
                }))
            }
            // Releasing what we do not hold (or no longer may touch) is not an error here.
            (Step::Release, Ok(_) | Err(_)) => Step::Unregister,
            (Step::Unregister, result) => {
                self.disk.keep_registration(None);
                // After a refused claim the outcome was already given.
                if self.finished.iter().any(|(t, _)| *t == ticket) {
                    self.running = None;
                    return;
                }
                return self.finish(match result {
                    Ok(_) => Ok(Outcome::Released),
                    Err(e) if is_conflict(&e) => Ok(Outcome::Released),
                    Err(e) => Err(describe(&e)),
                });
            }
            (step, Ok(reply)) => {
                return self.finish(Err(ProcedureError::Failed(format!(
                    "unexpected answer {reply:?} in {step:?}"
                ))))
            }
            (_, Err(e)) => return self.finish(Err(describe(&e))),
        };
        if let Some(running) = self.running.as_mut() {
            running.step = next;
            running.op = None;
        }
        self.submit_step(now_ms);
    }
}
