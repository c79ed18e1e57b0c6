//! Who may write a shared LUN: the reservation procedures a node runs on it, sans-IO.
//!
//! The cluster fences with SCSI-3 persistent reservations the way fence_scsi does (see
//! [`crate::scsi::pr`]): every node registers its own key and one of them holds a Write
//! Exclusive - Registrants Only reservation ([`crate::iscsi::FENCE_RESERVATION`]), so every
//! registered node may write and one whose key was preempted may not (SPC-4 5.13). On top of the
//! single commands of [`Disk`], a node needs a few multi-command [`Procedure`]s:
//!
//! - [`Procedure::Open`]: READ CAPACITY(16).
//! - [`Procedure::Claim`]: REGISTER AND IGNORE EXISTING KEY, READ RESERVATION, then RESERVE if
//!   nobody holds the reservation, nothing more if we do, PREEMPT the holder with `takeover`, and
//!   otherwise [`ProcedureError::HeldBy`] followed by REGISTER of key 0 (unregister).
//! - [`Procedure::Flush`]: SYNCHRONIZE CACHE(16).
//! - [`Procedure::Probe`]: WRITE(16) of no blocks; GOOD means we may write, RESERVATION
//!   CONFLICT that we are fenced.
//! - [`Procedure::Release`]: RELEASE, then unregister; RESERVATION CONFLICT (we were fenced) is
//!   no error.
//!
//! [`Procedures`] holds the queue of one LUN and runs them one at a time over the caller's
//! [`Disk`], which it never owns: the caller polls the disk, hands each
//! [`DiskEvent::Completed`](crate::iscsi::DiskEvent::Completed) to
//! [`Procedures::on_completion`] (guest I/O on the same disk is the caller's), and calls
//! [`Procedures::run`] from its loop so the next procedure starts once the session is in the full
//! feature phase. A claim that ends with this node holding the reservation asks the disk to keep
//! the registration across reconnections ([`Disk::keep_registration`]); an unregister stops it.
//!
//! ```text
//! let mut procedures = Procedures::new(ReservationKey::for_node("node1"));
//! procedures.start(Ticket(1), Procedure::Claim { takeover: false });
//! loop {
//!     procedures.run(&mut disk, now);
//!     for event in disk.poll(&mut pipe, now) {
//!         if let DiskEvent::Completed { op, result } = event {
//!             if !procedures.on_completion(op, &result, &mut disk, now) {
//!                 complete_guest_request(op, result);
//!             }
//!         }
//!     }
//!     if let Some(result) = procedures.take_result(Ticket(1)) { break result; }
//! }
//! ```

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

use crate::iscsi::{Disk, DiskError, DiskReply, LoginError, OpId, SessionState};
use crate::scsi::{Capacity, CommandError, ReservationKey};

/// The unit of [`Outcome::Opened`]: 512-byte sectors, as virtio-blk and the guests count, whatever
/// the LUN's logical block length.
pub const SECTOR_SIZE: u64 = 512;

/// A handle to the outcome of a [`Procedure`], chosen by the caller (unique per [`Procedures`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// Reservation and housekeeping work on a LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Procedure {
    /// READ CAPACITY: the disk's size (the session is logged in by then).
    Open,
    /// Register this node's key and make sure it holds the reservation
    /// ([`crate::iscsi::FENCE_RESERVATION`]).
    /// `takeover`: preempt another holder (a migration's destination, or the source taking its
    /// disk back); otherwise another holder is [`ProcedureError::HeldBy`] (a new VM must not use
    /// a disk another node's VM writes), and our registration is removed again.
    Claim { takeover: bool },
    /// SYNCHRONIZE CACHE: every acknowledged write is durable at the target.
    Flush,
    /// A write of no blocks: whether the target lets this node's session write (a fenced node
    /// gets RESERVATION CONFLICT). Harmless: SBC-3 makes a TRANSFER LENGTH of 0 write nothing.
    Probe,
    /// Give the disk up: RELEASE (a no-op unless we hold it), then unregister our key.
    Release,
}

impl fmt::Display for Procedure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Procedure::Open => "open",
            Procedure::Claim { takeover: false } => "claim",
            Procedure::Claim { takeover: true } => "take over",
            Procedure::Flush => "flush",
            Procedure::Probe => "probe",
            Procedure::Release => "release",
        })
    }
}

/// What a finished procedure found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Open: the size in [`SECTOR_SIZE`] sectors.
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

/// One command of a procedure: where it is, and what a failure names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// READ CAPACITY(16).
    ReadCapacity,
    /// PERSISTENT RESERVE OUT, REGISTER AND IGNORE EXISTING KEY with our key.
    Register,
    /// PERSISTENT RESERVE IN, READ RESERVATION.
    ReadReservation,
    /// PERSISTENT RESERVE OUT, RESERVE.
    Reserve,
    /// PERSISTENT RESERVE OUT, PREEMPT of `victim`'s registrations and reservation.
    Preempt { victim: ReservationKey },
    /// SYNCHRONIZE CACHE(16).
    SynchronizeCache,
    /// WRITE(16) of no blocks.
    Probe,
    /// PERSISTENT RESERVE OUT, RELEASE.
    Release,
    /// PERSISTENT RESERVE OUT, REGISTER of key 0 (unregister).
    Unregister,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::ReadCapacity => f.write_str("READ CAPACITY"),
            Step::Register => f.write_str("REGISTER AND IGNORE EXISTING KEY"),
            Step::ReadReservation => f.write_str("READ RESERVATION"),
            Step::Reserve => f.write_str("RESERVE"),
            Step::Preempt { victim } => write!(f, "PREEMPT of key {victim}"),
            Step::SynchronizeCache => f.write_str("SYNCHRONIZE CACHE"),
            Step::Probe => f.write_str("WRITE of no blocks"),
            Step::Release => f.write_str("RELEASE"),
            Step::Unregister => f.write_str("REGISTER (unregister)"),
        }
    }
}

/// Why a procedure did not give its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcedureError {
    /// Another node's key holds the reservation (a claim without takeover).
    HeldBy(ReservationKey),
    /// A command failed (a SCSI status, a task that did not complete, an answer that does not
    /// decode).
    Command { step: Step, error: DiskError },
    /// A command succeeded with an answer of another kind than it asks for (a bug).
    UnexpectedReply { step: Step, reply: &'static str },
    /// The session failed for good (`Some`: why) or was closed before the procedure started.
    SessionEnded(Option<LoginError>),
}

impl fmt::Display for ProcedureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcedureError::HeldBy(key) => write!(f, "the reservation is held by key {key}"),
            ProcedureError::Command { step, error } => write!(f, "{step}: {error}"),
            ProcedureError::UnexpectedReply { step, reply } => {
                write!(f, "{step}: unexpected answer ({reply})")
            }
            ProcedureError::SessionEnded(Some(error)) => write!(f, "{error}"),
            ProcedureError::SessionEnded(None) => f.write_str("the session is closed"),
        }
    }
}

impl core::error::Error for ProcedureError {}

/// The kind of a reply, for [`ProcedureError::UnexpectedReply`] (never the data itself).
fn reply_kind(reply: &DiskReply) -> &'static str {
    match reply {
        DiskReply::Done => "no data",
        DiskReply::Data(_) => "blocks",
        DiskReply::Inquiry(_) => "INQUIRY data",
        DiskReply::Capacity(_) => "READ CAPACITY data",
        DiskReply::Luns(_) => "REPORT LUNS data",
        DiskReply::Keys(_) => "READ KEYS data",
        DiskReply::Reservation(_) => "READ RESERVATION data",
    }
}

fn is_conflict(error: &DiskError) -> bool {
    matches!(error, DiskError::Scsi(CommandError::ReservationConflict))
}

/// The procedure under way.
#[derive(Debug)]
struct Running {
    ticket: Ticket,
    procedure: Procedure,
    step: Step,
    /// The operation of `step`, once submitted.
    op: Option<OpId>,
    /// The outcome was already given (a refused claim still unregisters).
    reported: bool,
}

/// The procedures of one LUN: a queue run one at a time over the caller's [`Disk`].
#[derive(Debug)]
pub struct Procedures {
    key: ReservationKey,
    running: Option<Running>,
    queued: VecDeque<(Ticket, Procedure)>,
    finished: Vec<(Ticket, Result<Outcome, ProcedureError>)>,
    capacity: Option<Capacity>,
}

impl Procedures {
    /// No procedures yet; claims and releases use `key`, this node's
    /// ([`ReservationKey::for_node`]).
    pub fn new(key: ReservationKey) -> Procedures {
        Procedures {
            key,
            running: None,
            queued: VecDeque::new(),
            finished: Vec::new(),
            capacity: None,
        }
    }

    /// The key this node registers.
    pub fn key(&self) -> ReservationKey {
        self.key
    }

    /// What the last [`Procedure::Open`] read.
    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }

    /// Queues `procedure` behind the others; its outcome comes back from
    /// [`Self::take_result`]. It starts from [`Self::run`].
    pub fn start(&mut self, ticket: Ticket, procedure: Procedure) {
        self.queued.push_back((ticket, procedure));
    }

    /// The outcome of a finished procedure, once.
    pub fn take_result(&mut self, ticket: Ticket) -> Option<Result<Outcome, ProcedureError>> {
        let at = self.finished.iter().position(|(t, _)| *t == ticket)?;
        Some(self.finished.remove(at).1)
    }

    /// Whether the outcome of `ticket` is still to come (queued or running). False once
    /// [`Self::take_result`] has it, even while a refused claim still unregisters.
    pub fn pending(&self, ticket: Ticket) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.ticket == ticket && !r.reported)
            || self.queued.iter().any(|(t, _)| *t == ticket)
    }

    /// Whether any procedure is queued or running (commands of ours may be in flight).
    pub fn busy(&self) -> bool {
        self.running.is_some() || !self.queued.is_empty()
    }

    /// Whether `op` is the operation of the running procedure.
    pub fn owns(&self, op: OpId) -> bool {
        self.running.as_ref().is_some_and(|r| r.op == Some(op))
    }

    /// Starts the next queued procedure when none runs and the session is in the full feature
    /// phase. While it logs in (or reconnects) the queue waits, which keeps the steps in order
    /// with the login; once the session failed or was closed, every queued procedure fails with
    /// [`ProcedureError::SessionEnded`] (a running one fails through its command).
    pub fn run(&mut self, disk: &mut Disk, now_ms: u64) {
        while self.running.is_none() {
            match disk.session().state() {
                SessionState::FullFeature => {}
                SessionState::Failed | SessionState::Closed => {
                    let failure = disk.session().failure().cloned();
                    for (ticket, _) in self.queued.drain(..) {
                        self.finished
                            .push((ticket, Err(ProcedureError::SessionEnded(failure.clone()))));
                    }
                    return;
                }
                _ => return,
            }
            let Some((ticket, procedure)) = self.queued.pop_front() else {
                return;
            };
            let step = match procedure {
                Procedure::Open => Step::ReadCapacity,
                Procedure::Claim { .. } => Step::Register,
                Procedure::Flush => Step::SynchronizeCache,
                Procedure::Probe => Step::Probe,
                Procedure::Release => Step::Release,
            };
            self.running = Some(Running {
                ticket,
                procedure,
                step,
                op: None,
                reported: false,
            });
            // A command the disk refuses at once ends the procedure: try the next one.
            self.submit_step(disk, now_ms);
        }
    }

    /// Takes the completion of `op` if it belongs to the running procedure, and goes on with
    /// the procedure's next command (or records its outcome). Returns whether `op` was ours;
    /// if not, `result` belongs to someone else (the caller's guest I/O).
    pub fn on_completion(
        &mut self,
        op: OpId,
        result: &Result<DiskReply, DiskError>,
        disk: &mut Disk,
        now_ms: u64,
    ) -> bool {
        if !self.owns(op) {
            return false;
        }
        self.advance(result, disk, now_ms);
        true
    }

    fn submit_step(&mut self, disk: &mut Disk, now_ms: u64) {
        let key = self.key;
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let submitted = match running.step {
            Step::ReadCapacity => disk.read_capacity(now_ms),
            Step::Register => disk.register_and_ignore(key, now_ms),
            Step::ReadReservation => disk.read_reservation(now_ms),
            Step::Reserve => disk.reserve(key, now_ms),
            Step::Preempt { victim } => disk.preempt(key, victim, now_ms),
            Step::SynchronizeCache => disk.flush(now_ms),
            Step::Probe => disk.write(0, Vec::new(), now_ms),
            Step::Release => disk.release(key, now_ms),
            Step::Unregister => disk.register(key, ReservationKey::NONE, now_ms),
        };
        match submitted {
            Ok(op) => running.op = Some(op),
            Err(error) => {
                let step = running.step;
                self.finish(Err(ProcedureError::Command { step, error }));
            }
        }
    }

    /// Ends the running procedure with `result` (unless its outcome was given already).
    fn finish(&mut self, result: Result<Outcome, ProcedureError>) {
        if let Some(running) = self.running.take() {
            if !running.reported {
                self.finished.push((running.ticket, result));
            }
        }
    }

    /// Gives the outcome now while the procedure goes on (a refused claim unregisters).
    fn report(&mut self, result: Result<Outcome, ProcedureError>) {
        if let Some(running) = self.running.as_mut() {
            if !running.reported {
                running.reported = true;
                self.finished.push((running.ticket, result));
            }
        }
    }

    /// We hold the reservation: keep the registration through reconnections.
    fn claimed(&mut self, disk: &mut Disk, previous: Option<ReservationKey>) {
        disk.keep_registration(Some(self.key));
        self.finish(Ok(Outcome::Claimed { previous }));
    }

    /// The running procedure's operation completed: its next step, or its outcome.
    fn advance(&mut self, result: &Result<DiskReply, DiskError>, disk: &mut Disk, now_ms: u64) {
        let Some(&Running {
            procedure, step, ..
        }) = self.running.as_ref()
        else {
            return;
        };
        let takeover = matches!(procedure, Procedure::Claim { takeover: true });
        let next = match (step, result) {
            (Step::ReadCapacity, Ok(DiskReply::Capacity(capacity))) => {
                self.capacity = Some(*capacity);
                let sectors = capacity.bytes() / SECTOR_SIZE;
                return self.finish(Ok(Outcome::Opened { sectors }));
            }
            (Step::Register, Ok(_)) => Step::ReadReservation,
            (Step::ReadReservation, Ok(DiskReply::Reservation(status))) => match status.holder {
                None => Step::Reserve,
                Some((holder, _)) if holder == self.key => return self.claimed(disk, None),
                Some((holder, _)) if takeover => Step::Preempt { victim: holder },
                Some((holder, _)) => {
                    // Not ours to take: say so at once, and leave no registration behind.
                    self.report(Err(ProcedureError::HeldBy(holder)));
                    Step::Unregister
                }
            },
            (Step::Reserve, Ok(_)) => return self.claimed(disk, None),
            (Step::Preempt { victim }, Ok(_)) => return self.claimed(disk, Some(victim)),
            (Step::SynchronizeCache, Ok(_)) => return self.finish(Ok(Outcome::Flushed)),
            (Step::Probe, Ok(_)) => {
                return self.finish(Ok(Outcome::Probed {
                    write_allowed: true,
                }))
            }
            // Write Exclusive - Registrants Only refuses writes of unregistered nexuses with
            // RESERVATION CONFLICT (SPC-4 5.13): we were preempted.
            (Step::Probe, Err(error)) if is_conflict(error) => {
                return self.finish(Ok(Outcome::Probed {
                    write_allowed: false,
                }))
            }
            // RELEASE by a registrant that does not hold the reservation does nothing; by a
            // fenced (unregistered) one it is a RESERVATION CONFLICT; neither stops the
            // unregister, whose own failure is the one reported.
            (Step::Release, _) => Step::Unregister,
            (Step::Unregister, result) => {
                disk.keep_registration(None);
                return self.finish(match result {
                    Ok(_) => Ok(Outcome::Released),
                    // Not registered any more (fenced): nothing left to give up.
                    Err(error) if is_conflict(error) => Ok(Outcome::Released),
                    Err(error) => Err(ProcedureError::Command {
                        step,
                        error: error.clone(),
                    }),
                });
            }
            (step, Ok(reply)) => {
                return self.finish(Err(ProcedureError::UnexpectedReply {
                    step,
                    reply: reply_kind(reply),
                }))
            }
            (step, Err(error)) => {
                return self.finish(Err(ProcedureError::Command {
                    step,
                    error: error.clone(),
                }))
            }
        };
        if let Some(running) = self.running.as_mut() {
            running.step = next;
            running.op = None;
        }
        self.submit_step(disk, now_ms);
    }
}

#[cfg(test)]
mod tests {
    //! The procedures against the in-memory target ([`crate::iscsi::fake_target`]), which keeps
    //! registrations per connection as tgt does. Another node is a registration of a connection
    //! that is not ours (nexus 999). Time is simulated: each step is one millisecond.

    use alloc::vec;
    use alloc::vec::Vec;

    use super::*;
    use crate::iscsi::fake_target::{
        mem_pipe, test_session_config, FakeTarget, MemPipe, TargetConfig,
    };
    use crate::iscsi::{
        DiskEvent, LoginStatus, RegistrationEvent, Session, TaskError, FENCE_RESERVATION,
    };

    const US: ReservationKey = ReservationKey::for_node("node-a");
    const OTHER: ReservationKey = ReservationKey::for_node("node-b");
    /// The connection id the other node's registration is bound to.
    const OTHER_NEXUS: u32 = 999;
    const WERO: u8 = FENCE_RESERVATION.code();

    const OP_WRITE: u8 = 0x8A;
    const OP_SYNC: u8 = 0x91;
    const OP_CAPACITY: u8 = 0x9E;
    const OP_PR_IN: u8 = 0x5E;
    const OP_PR_OUT: u8 = 0x5F;

    /// The procedures of node A over a disk of the in-memory target.
    struct Rig {
        procedures: Procedures,
        disk: Disk,
        target: FakeTarget,
        pipe: MemPipe,
        now: u64,
        next_ticket: u64,
        registration: Vec<RegistrationEvent>,
        /// Completions that were not the procedures'.
        foreign: Vec<OpId>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig::with_target(TargetConfig::default())
        }

        fn with_target(target: TargetConfig) -> Rig {
            Rig {
                procedures: Procedures::new(US),
                disk: Disk::new(
                    Session::new(test_session_config("iqn.2026-01.test:node-a")),
                    1,
                )
                .unwrap(),
                target: FakeTarget::new(target),
                pipe: MemPipe::dead(),
                now: 0,
                next_ticket: 1,
                registration: Vec::new(),
                foreign: Vec::new(),
            }
        }

        /// Another node registered and holding the reservation.
        fn held_by_other(&mut self) {
            self.target.keys = vec![(OTHER.0, OTHER_NEXUS)];
            self.target.reservation = Some((OTHER.0, WERO));
        }

        fn start(&mut self, procedure: Procedure) -> Ticket {
            let ticket = Ticket(self.next_ticket);
            self.next_ticket += 1;
            self.procedures.start(ticket, procedure);
            ticket
        }

        /// One round of the caller's loop.
        fn step(&mut self) {
            if self.disk.session().needs_connection(self.now) {
                let (initiator, target) = mem_pipe();
                self.target.accept(target);
                self.pipe = initiator;
                self.disk.session_mut().connection_opened(self.now);
            }
            self.procedures.run(&mut self.disk, self.now);
            for event in self.disk.poll(&mut self.pipe, self.now) {
                match event {
                    DiskEvent::Completed { op, result } => {
                        if !self
                            .procedures
                            .on_completion(op, &result, &mut self.disk, self.now)
                        {
                            self.foreign.push(op);
                        }
                    }
                    DiskEvent::Registration(event) => self.registration.push(event),
                    DiskEvent::Session(_) => {}
                }
            }
            self.procedures.run(&mut self.disk, self.now);
            self.target.poll();
            self.now += 1;
        }

        /// Steps until `ticket`'s outcome is there.
        fn outcome(&mut self, ticket: Ticket) -> Result<Outcome, ProcedureError> {
            for _ in 0..20_000 {
                if let Some(result) = self.procedures.take_result(ticket) {
                    assert!(!self.procedures.pending(ticket));
                    return result;
                }
                assert!(self.procedures.pending(ticket), "{ticket:?} lost");
                self.step();
            }
            panic!("{ticket:?} never finished");
        }

        fn run(&mut self, procedure: Procedure) -> Result<Outcome, ProcedureError> {
            let ticket = self.start(procedure);
            self.outcome(ticket)
        }

        /// Steps until no procedure is queued or running.
        fn settle(&mut self) {
            for _ in 0..20_000 {
                if !self.procedures.busy() {
                    return;
                }
                self.step();
            }
            panic!("procedures never settled");
        }

        /// One command outside the procedures, to its completion.
        fn command(
            &mut self,
            submit: impl FnOnce(&mut Disk, u64) -> Result<OpId, DiskError>,
        ) -> Result<(), DiskError> {
            let op = submit(&mut self.disk, self.now).unwrap();
            for _ in 0..10_000 {
                if self.disk.session().needs_connection(self.now) {
                    let (initiator, target) = mem_pipe();
                    self.target.accept(target);
                    self.pipe = initiator;
                    self.disk.session_mut().connection_opened(self.now);
                }
                let events = self.disk.poll(&mut self.pipe, self.now);
                self.target.poll();
                self.now += 1;
                for event in events {
                    if let DiskEvent::Completed { op: id, result } = event {
                        if id == op {
                            return result.map(|_| ());
                        }
                    }
                }
            }
            panic!("{op} never completed");
        }

        fn keys(&self) -> Vec<u64> {
            self.target.keys.iter().map(|(key, _)| *key).collect()
        }

        fn commands_since(&self, start: usize) -> Vec<u8> {
            self.target.stats.commands[start..].to_vec()
        }

        fn no_violations(&self) {
            assert!(
                self.target.stats.violations.is_empty(),
                "{:?}",
                self.target.stats.violations
            );
            assert!(self.foreign.is_empty(), "{:?}", self.foreign);
        }
    }

    fn conflict() -> DiskError {
        DiskError::Scsi(CommandError::ReservationConflict)
    }

    #[test]
    fn open_reads_the_size_in_sectors() {
        let mut rig = Rig::with_target(TargetConfig {
            block_len: 4096,
            blocks: 100,
            ..TargetConfig::default()
        });
        assert_eq!(
            rig.run(Procedure::Open),
            Ok(Outcome::Opened { sectors: 800 })
        );
        assert_eq!(rig.procedures.capacity().map(|c| c.block_len), Some(4096));
        assert_eq!(rig.disk.block_len(), 4096);
        rig.no_violations();
    }

    #[test]
    fn claim_of_a_free_lun_registers_reserves_and_keeps_the_registration() {
        let mut rig = Rig::new();
        assert_eq!(
            rig.run(Procedure::Claim { takeover: false }),
            Ok(Outcome::Claimed { previous: None })
        );
        assert_eq!(
            rig.commands_since(0),
            [OP_PR_OUT, OP_PR_IN, OP_PR_OUT],
            "REGISTER AND IGNORE, READ RESERVATION, RESERVE"
        );
        assert_eq!(rig.keys(), [US.0]);
        assert_eq!(rig.target.reservation, Some((US.0, WERO)));
        assert!(!rig.procedures.busy());

        // The claim asked the disk to keep the registration: after a lost connection the new
        // one registers again, and the probe is allowed.
        rig.target.faults.drop_after_pdus = Some(0);
        assert_eq!(
            rig.run(Procedure::Probe),
            Ok(Outcome::Probed {
                write_allowed: true
            })
        );
        assert_eq!(rig.registration, [RegistrationEvent::Restored { key: US }]);
        rig.no_violations();
    }

    #[test]
    fn claim_when_already_ours_does_not_reserve_again() {
        let mut rig = Rig::new();
        rig.run(Procedure::Claim { takeover: false }).unwrap();
        let before = rig.target.stats.commands.len();
        for takeover in [false, true] {
            assert_eq!(
                rig.run(Procedure::Claim { takeover }),
                Ok(Outcome::Claimed { previous: None })
            );
        }
        assert_eq!(
            rig.commands_since(before),
            [OP_PR_OUT, OP_PR_IN, OP_PR_OUT, OP_PR_IN],
            "register and read only, twice"
        );
        assert_eq!(rig.keys(), [US.0]);
        assert_eq!(rig.target.reservation, Some((US.0, WERO)));
        rig.no_violations();
    }

    #[test]
    fn claim_held_by_another_node_is_refused_and_our_registration_removed() {
        let mut rig = Rig::new();
        rig.held_by_other();
        let ticket = rig.start(Procedure::Claim { takeover: false });
        // The outcome comes as soon as the reservation was read...
        assert_eq!(rig.outcome(ticket), Err(ProcedureError::HeldBy(OTHER)));
        assert_eq!(rig.keys(), [OTHER.0, US.0], "the unregister still runs");
        assert!(rig.procedures.busy());
        // ...and the registration goes after it, with no second outcome for the ticket.
        rig.settle();
        assert_eq!(rig.keys(), [OTHER.0]);
        assert_eq!(rig.target.reservation, Some((OTHER.0, WERO)));
        assert_eq!(rig.procedures.take_result(ticket), None);
        assert!(!rig.procedures.pending(ticket));
        assert_eq!(
            rig.commands_since(0),
            [OP_PR_OUT, OP_PR_IN, OP_PR_OUT],
            "REGISTER AND IGNORE, READ RESERVATION, REGISTER 0"
        );
        // Our writes stay refused, and a reconnection does not register us again.
        assert_eq!(
            rig.run(Procedure::Probe),
            Ok(Outcome::Probed {
                write_allowed: false
            })
        );
        rig.target.faults.drop_after_pdus = Some(0);
        rig.run(Procedure::Open).unwrap();
        assert!(rig.registration.is_empty(), "{:?}", rig.registration);
        // SBC-3: SYNCHRONIZE CACHE conflicts like a write.
        assert_eq!(
            rig.run(Procedure::Flush),
            Err(ProcedureError::Command {
                step: Step::SynchronizeCache,
                error: conflict()
            })
        );
        rig.no_violations();
    }

    #[test]
    fn takeover_preempts_the_holder() {
        let mut rig = Rig::new();
        rig.held_by_other();
        assert_eq!(
            rig.run(Procedure::Claim { takeover: true }),
            Ok(Outcome::Claimed {
                previous: Some(OTHER)
            })
        );
        assert_eq!(
            rig.commands_since(0),
            [OP_PR_OUT, OP_PR_IN, OP_PR_OUT],
            "REGISTER AND IGNORE, READ RESERVATION, PREEMPT"
        );
        assert_eq!(rig.keys(), [US.0], "the holder's registration is gone");
        assert_eq!(rig.target.reservation, Some((US.0, WERO)));
        assert_eq!(
            rig.run(Procedure::Probe),
            Ok(Outcome::Probed {
                write_allowed: true
            })
        );
        rig.no_violations();
    }

    #[test]
    fn flush_synchronizes_the_cache() {
        let mut rig = Rig::new();
        assert_eq!(rig.run(Procedure::Flush), Ok(Outcome::Flushed));
        assert_eq!(rig.commands_since(0), [OP_SYNC]);
        rig.no_violations();
    }

    #[test]
    fn probe_is_allowed_until_another_node_fences_us() {
        let mut rig = Rig::new();
        let allowed = Ok(Outcome::Probed {
            write_allowed: true,
        });
        // No reservation: anyone may write.
        assert_eq!(rig.run(Procedure::Probe), allowed);
        rig.run(Procedure::Claim { takeover: false }).unwrap();
        assert_eq!(rig.run(Procedure::Probe), allowed);
        // Another node preempts us.
        rig.held_by_other();
        assert_eq!(
            rig.run(Procedure::Probe),
            Ok(Outcome::Probed {
                write_allowed: false
            })
        );
        assert_eq!(
            rig.commands_since(rig.target.stats.commands.len() - 1),
            [OP_WRITE]
        );
        assert!(
            rig.target.disk.iter().all(|&byte| byte == 0),
            "nothing written"
        );
        rig.no_violations();
    }

    #[test]
    fn release_gives_the_disk_up_and_tolerates_being_fenced() {
        let mut rig = Rig::new();
        rig.run(Procedure::Claim { takeover: false }).unwrap();
        assert_eq!(rig.run(Procedure::Release), Ok(Outcome::Released));
        assert!(rig.keys().is_empty());
        assert_eq!(rig.target.reservation, None);
        // The registration is no longer kept: a reconnection registers nothing.
        rig.target.faults.drop_after_pdus = Some(0);
        rig.run(Procedure::Flush).unwrap();
        assert!(rig.registration.is_empty(), "{:?}", rig.registration);

        // Fenced meanwhile: RELEASE and the unregister both conflict, and that is fine.
        rig.run(Procedure::Claim { takeover: false }).unwrap();
        rig.held_by_other();
        assert_eq!(rig.run(Procedure::Release), Ok(Outcome::Released));
        assert_eq!(rig.keys(), [OTHER.0]);
        assert_eq!(rig.target.reservation, Some((OTHER.0, WERO)));

        // A registrant that does not hold the reservation releases nothing but its key.
        rig.run(Procedure::Claim { takeover: false }).unwrap_err();
        rig.settle();
        rig.target.keys.push((US.0, rig.target.stats.connections));
        assert_eq!(rig.run(Procedure::Release), Ok(Outcome::Released));
        assert_eq!(rig.keys(), [OTHER.0]);
        assert_eq!(rig.target.reservation, Some((OTHER.0, WERO)));
        rig.no_violations();
    }

    #[test]
    fn queued_procedures_run_one_at_a_time_in_order() {
        let mut rig = Rig::new();
        let procedures = [
            Procedure::Open,
            Procedure::Claim { takeover: false },
            Procedure::Flush,
            Procedure::Probe,
            Procedure::Release,
        ];
        // Queued before the login: they wait for the full feature phase.
        let tickets: Vec<Ticket> = procedures.iter().map(|p| rig.start(*p)).collect();
        assert!(tickets.iter().all(|t| rig.procedures.pending(*t)));
        let mut order = Vec::new();
        for _ in 0..20_000 {
            if order.len() == tickets.len() {
                break;
            }
            for ticket in &tickets {
                if let Some(result) = rig.procedures.take_result(*ticket) {
                    order.push((*ticket, result));
                }
            }
            assert!(
                rig.disk.pending() <= 1,
                "one command of one procedure at a time"
            );
            rig.step();
        }
        assert_eq!(
            order,
            [
                (tickets[0], Ok(Outcome::Opened { sectors: 2048 })),
                (tickets[1], Ok(Outcome::Claimed { previous: None })),
                (tickets[2], Ok(Outcome::Flushed)),
                (
                    tickets[3],
                    Ok(Outcome::Probed {
                        write_allowed: true
                    })
                ),
                (tickets[4], Ok(Outcome::Released)),
            ]
        );
        assert_eq!(
            rig.target.stats.commands,
            [
                OP_CAPACITY,
                OP_PR_OUT,
                OP_PR_IN,
                OP_PR_OUT,
                OP_SYNC,
                OP_WRITE,
                OP_PR_OUT,
                OP_PR_OUT
            ]
        );
        assert!(!rig.procedures.busy());
        rig.no_violations();
    }

    #[test]
    fn a_failed_or_closed_session_fails_the_queued_procedures() {
        // The target refuses the login for good.
        let mut rig = Rig::with_target(TargetConfig {
            refuse_login: Some((2, 3)),
            ..TargetConfig::default()
        });
        let open = rig.start(Procedure::Open);
        let claim = rig.start(Procedure::Claim { takeover: false });
        let ended = Err(ProcedureError::SessionEnded(Some(LoginError::Refused(
            LoginStatus::TargetNotFound,
        ))));
        assert_eq!(rig.outcome(open), ended);
        assert_eq!(rig.outcome(claim), ended);
        assert!(!rig.procedures.busy());
        assert!(rig.target.stats.commands.is_empty());

        // Logged out: what is queued fails, what runs fails through its command.
        let mut rig = Rig::new();
        rig.run(Procedure::Open).unwrap();
        rig.target.faults.hold_commands = true;
        let flush = rig.start(Procedure::Flush);
        let probe = rig.start(Procedure::Probe);
        while rig.target.held_commands() == 0 {
            rig.step();
        }
        rig.disk.session_mut().logout(rig.now);
        assert_eq!(rig.outcome(probe), Err(ProcedureError::SessionEnded(None)));
        rig.target.faults.hold_commands = false;
        let flushed = rig.outcome(flush);
        assert!(
            matches!(
                flushed,
                Ok(Outcome::Flushed)
                    | Err(ProcedureError::Command {
                        step: Step::SynchronizeCache,
                        error: DiskError::Task(TaskError::LoggedOut)
                    })
            ),
            "{flushed:?}"
        );
        // Anything started later fails at once.
        assert_eq!(
            rig.run(Procedure::Open),
            Err(ProcedureError::SessionEnded(None))
        );
    }

    #[test]
    fn a_failed_command_is_a_typed_error_naming_its_step() {
        let mut rig = Rig::new();
        rig.target.faults.unit_attentions = 100;
        let result = rig.run(Procedure::Claim { takeover: false });
        assert!(
            matches!(
                result,
                Err(ProcedureError::Command {
                    step: Step::Register,
                    error: DiskError::Scsi(CommandError::CheckCondition(_))
                })
            ),
            "{result:?}"
        );
        let text = alloc::format!("{}", result.unwrap_err());
        assert!(
            text.starts_with("REGISTER AND IGNORE EXISTING KEY: "),
            "{text}"
        );
        // The next procedure runs regardless.
        rig.target.faults.unit_attentions = 0;
        assert_eq!(rig.run(Procedure::Flush), Ok(Outcome::Flushed));
    }

    #[test]
    fn the_fake_target_keeps_the_reservation_rules_of_spc4() {
        let mut rig = Rig::new();
        // Unregistered: only the two REGISTER actions are allowed.
        assert_eq!(rig.command(|d, t| d.reserve(US, t)), Err(conflict()));
        assert_eq!(
            rig.command(|d, t| d.register(US, OTHER, t)),
            Err(conflict())
        );
        assert_eq!(
            rig.command(|d, t| d.register(ReservationKey::NONE, US, t)),
            Ok(())
        );
        // A wrong RESERVATION KEY conflicts.
        assert_eq!(rig.command(|d, t| d.reserve(OTHER, t)), Err(conflict()));
        // Another holder: RESERVE conflicts, RELEASE does nothing, PREEMPT takes it.
        rig.target.keys.push((OTHER.0, OTHER_NEXUS));
        rig.target.reservation = Some((OTHER.0, WERO));
        assert_eq!(rig.command(|d, t| d.reserve(US, t)), Err(conflict()));
        assert_eq!(rig.command(|d, t| d.release(US, t)), Ok(()));
        assert_eq!(rig.target.reservation, Some((OTHER.0, WERO)));
        let nobody = ReservationKey(0x55);
        assert_eq!(
            rig.command(|d, t| d.preempt(US, nobody, t)),
            Err(conflict())
        );
        assert_eq!(rig.command(|d, t| d.preempt(US, OTHER, t)), Ok(()));
        assert_eq!(rig.target.reservation, Some((US.0, WERO)));
        assert_eq!(rig.keys(), [US.0]);
        // Reserving again what we hold is fine; the holder unregistering releases it.
        assert_eq!(rig.command(|d, t| d.reserve(US, t)), Ok(()));
        assert_eq!(
            rig.command(|d, t| d.register(US, ReservationKey::NONE, t)),
            Ok(())
        );
        assert_eq!(rig.target.reservation, None);
        assert!(rig.keys().is_empty());
        rig.no_violations();
    }
}
