//! The source and destination machines driven over a [`FrameLink`], one non-blocking step at a
//! time.
//!
//! The kernel's loop calls, for each migration: `step` (receive, feed the machine, tick), then
//! performs the returned actions in order (and calls [`SourceDriver::on_paused`] after pausing),
//! then `flush`. Sending only in `flush` is what orders the wire after the actions: the
//! destination's `CommitAck` is queued in the same step as its `ResumeVm`, and reaches the source
//! only after the VM runs here, so the source never destroys its copy before the other one runs.
//! One exception, which orders nothing: the source's pre-copy page batches, made by its ticks,
//! go straight into the pipe's own buffer during `step` when nothing is queued before them and
//! the pipe has room (one copy of each page less, [`FrameLink::send_pending`]); pages carry no
//! decision and no action waits on them.
//!
//! Backpressure: the source produces page batches only while the link's outbound queue is below
//! [`DriverLimits::outbound_high_water`], and at most [`DriverLimits::ticks_per_step`] per step,
//! so a slow link bounds memory and one step stays short. A round also ends only once its batches
//! left the queue, so the policy measures the link's bandwidth and not how fast a buffer fills.
//!
//! Failures: a pipe error, an undecodable stream, or a pipe that takes nothing for
//! [`DriverLimits::stall_timeout_us`] becomes an abort of the machine, which decides what it means
//! in its state (resume the VM, discard the copy, ask about an in-doubt commit, or nothing once
//! done). After a pipe error nothing more is sent or received: the connection is gone.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::destination::{Destination, DestinationAction, DestinationHost, DestinationState};
use crate::link::{FrameLink, Incoming, LinkError, Pipe, PipeError};
use crate::machine::{GuestError, Output};
use crate::message::{AbortReason, Message, MessageError};
use crate::pending::{BatchError, PendingBatch};
use crate::source::{Source, SourceAction, SourceGuest, SourceState};

/// The bounds a driver works within. [`Default`] gives the values for a real link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverLimits {
    /// The source makes no new page batch while this many bytes wait in the outbound queue.
    /// 256 KiB keeps a TCP send buffer fed between steps, and is what the final pause may have
    /// to drain on top of the last pages (about 2 ms at 1 Gbit/s).
    pub outbound_high_water: usize,
    /// Most source ticks (each at most one page batch) per step, so the caller's loop gets back
    /// to its VMs even when the link takes everything (a zero-page batch is tiny on the wire but
    /// still reads every page).
    pub ticks_per_step: u32,
    /// How long queued bytes may wait while the pipe takes none of them before the connection
    /// counts as failed. The machines' deadlines cover waiting for the peer, but pre-copy has no
    /// deadline (the source is the one talking), and a TCP peer that stops reading leaves a zero
    /// window that no retransmission timer ends.
    pub stall_timeout_us: u64,
}

impl Default for DriverLimits {
    fn default() -> Self {
        Self {
            outbound_high_water: 256 * 1024,
            ticks_per_step: 8,
            stall_timeout_us: 30_000_000,
        }
    }
}

/// Why a driver's connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    /// The pipe reported an error.
    Pipe(PipeError),
    /// The pipe took no byte for this many microseconds while bytes were waiting.
    Stalled { us: u64 },
}

impl fmt::Display for TransportFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportFailure::Pipe(e) => write!(f, "{e}"),
            TransportFailure::Stalled { us } => {
                write!(f, "the connection took no data for {} ms", us / 1000)
            }
        }
    }
}

impl core::error::Error for TransportFailure {}

/// The link plus what both drivers track about the connection under it.
#[derive(Debug)]
struct Connection {
    link: FrameLink,
    limits: DriverLimits,
    broken: Option<TransportFailure>,
    /// Set once an undecodable stream was reported, so it is reported once.
    stream_failed: bool,
    /// When a flush last found bytes waiting and the pipe taking none of them.
    stalled_since: Option<u64>,
}

impl Connection {
    fn new(limits: DriverLimits) -> Self {
        Self {
            link: FrameLink::new(),
            limits,
            broken: None,
            stream_failed: false,
            stalled_since: None,
        }
    }

    /// Pulls what is waiting; a pipe error breaks the connection and is returned once.
    fn receive(&mut self, pipe: &mut impl Pipe) -> Option<TransportFailure> {
        if self.broken.is_some() {
            return None;
        }
        let error = TransportFailure::Pipe(self.link.receive(pipe).err()?);
        self.broken = Some(error);
        Some(error)
    }

    /// Like `receive`, handing each whole frame to `on_frame` as it arrives, or the text of a
    /// stream error (once).
    fn receive_frames(
        &mut self,
        pipe: &mut impl Pipe,
        on_frame: &mut dyn FnMut(Result<Incoming<'_>, String>),
    ) -> Option<TransportFailure> {
        if self.broken.is_some() {
            return None;
        }
        let stream_failed = &mut self.stream_failed;
        let result = self.link.receive_frames(pipe, &mut |frame| match frame {
            Ok(incoming) => on_frame(Ok(incoming)),
            Err(e) => {
                if let Some(text) = stream_error(stream_failed, &e) {
                    on_frame(Err(text));
                }
            }
        });
        let error = TransportFailure::Pipe(result.err()?);
        self.broken = Some(error);
        Some(error)
    }

    /// The next decoded message, or the text of a stream error (returned once).
    fn next_message(&mut self) -> Result<Option<Message>, alloc::string::String> {
        Ok(self.next_incoming()?.map(Incoming::into_message))
    }

    /// Like `next_message`, with page batches read in place.
    fn next_incoming(&mut self) -> Result<Option<Incoming<'_>>, alloc::string::String> {
        if self.stream_failed {
            return Ok(None);
        }
        match self.link.next_incoming() {
            Ok(incoming) => Ok(incoming),
            Err(e) => Err(stream_error(&mut self.stream_failed, &e).unwrap_or_default()),
        }
    }

    /// Queues a message unless the connection is gone (then there is nowhere to send it).
    fn queue(&mut self, message: &Message) -> Result<(), MessageError> {
        if self.broken.is_some() {
            return Ok(());
        }
        self.link.queue(message)
    }

    /// Like `queue`, for a page batch read from `guest` as it is encoded: straight into the
    /// pipe's buffer when there is one at hand with room ([`FrameLink::send_pending`]).
    fn queue_pending(
        &mut self,
        batch: &PendingBatch,
        guest: &dyn SourceGuest,
        pipe: Option<&mut dyn Pipe>,
    ) -> Result<(), BatchError> {
        if self.broken.is_some() {
            return Ok(());
        }
        match pipe {
            Some(pipe) => self.link.send_pending(batch, guest, pipe),
            None => self.link.queue_pending(batch, guest),
        }
    }

    /// Sends what the pipe takes; a pipe error or a stall breaks the connection and is returned.
    fn flush(&mut self, now: u64, pipe: &mut impl Pipe) -> Option<TransportFailure> {
        if self.broken.is_some() {
            return None;
        }
        let before = self.link.bytes_sent();
        if let Err(e) = self.link.flush(pipe) {
            self.broken = Some(TransportFailure::Pipe(e));
            return self.broken;
        }
        if self.link.queued() == 0 || self.link.bytes_sent() != before {
            self.stalled_since = None;
            return None;
        }
        let since = *self.stalled_since.get_or_insert(now);
        let us = now.saturating_sub(since);
        if us >= self.limits.stall_timeout_us {
            self.broken = Some(TransportFailure::Stalled { us });
            return self.broken;
        }
        None
    }

    /// Nothing is left to send, or sending is hopeless.
    fn drained(&self) -> bool {
        self.broken.is_some() || self.link.queued() == 0
    }
}

/// The text of an undecodable stream, the first time (`reported` remembers it).
fn stream_error(reported: &mut bool, error: &LinkError) -> Option<String> {
    if core::mem::replace(reported, true) {
        return None;
    }
    Some(format!("undecodable stream from the peer: {error}"))
}

/// A [`Source`] over a link.
#[derive(Debug)]
pub struct SourceDriver {
    source: Source,
    conn: Connection,
    /// Actions produced and not yet returned (e.g. by `start`, which returns none).
    actions: Vec<SourceAction>,
}

impl SourceDriver {
    /// A driver with [`DriverLimits::default`].
    pub fn new(source: Source) -> Self {
        Self::with_limits(source, DriverLimits::default())
    }

    /// A driver with other limits (tests use small ones so backpressure shows on small VMs).
    pub fn with_limits(source: Source, limits: DriverLimits) -> Self {
        Self {
            source,
            conn: Connection::new(limits),
            actions: Vec::new(),
        }
    }

    /// Opens the migration: queues the hello (sent by the next [`flush`](Self::flush)).
    pub fn start(&mut self, now: u64) {
        self.source.start(now);
        self.drain(now, None);
    }

    /// One non-blocking step: receives and handles what is waiting, fires deadlines, and during
    /// pre-copy makes page batches within the limits. Sends nothing but those batches (see the
    /// module doc and [`flush`](Self::flush)).
    /// Returns the actions to perform, in order.
    pub fn step(
        &mut self,
        now: u64,
        pipe: &mut impl Pipe,
        guest: &mut impl SourceGuest,
    ) -> Vec<SourceAction> {
        let pipe_failure = self.conn.receive(pipe);
        // Messages that arrived before a pipe error count: a CommitAck followed by a close is a
        // completed migration, not a failed one.
        loop {
            match self.conn.next_message() {
                Ok(Some(message)) => {
                    self.source.on_message(now, message, guest);
                    self.drain(now, Some(&*guest));
                }
                Ok(None) => break,
                Err(text) => {
                    self.source.fail(now, AbortReason::ProtocolError, &text);
                    self.drain(now, Some(&*guest));
                    break;
                }
            }
        }
        if let Some(failure) = pipe_failure {
            self.transport_failed(now, failure);
        }
        self.tick(now, guest, pipe);
        core::mem::take(&mut self.actions)
    }

    /// Sends what is queued. A pipe error or stall fails the source; returns its actions.
    pub fn flush(&mut self, now: u64, pipe: &mut impl Pipe) -> Vec<SourceAction> {
        if let Some(failure) = self.conn.flush(now, pipe) {
            self.transport_failed(now, failure);
        } else {
            if self.conn.link.bytes_sent() > 0 {
                self.source.on_bytes_sent(now);
            }
            if self.conn.link.queued() == 0 {
                self.source.on_final_sent(now);
            }
        }
        core::mem::take(&mut self.actions)
    }

    /// The VM paused as asked by [`SourceAction::PauseVm`]: queues the final pages and state.
    pub fn on_paused(&mut self, now: u64, guest: &mut impl SourceGuest) -> Vec<SourceAction> {
        self.source.on_paused(now, guest);
        self.drain(now, Some(&*guest));
        core::mem::take(&mut self.actions)
    }

    /// The answer to [`SourceAction::QuiesceDisk`].
    pub fn on_disk_quiesced(
        &mut self,
        now: u64,
        guest: &mut impl SourceGuest,
        result: Result<(), String>,
    ) -> Vec<SourceAction> {
        self.source.on_disk_quiesced(now, guest, result);
        self.drain(now, Some(&*guest));
        core::mem::take(&mut self.actions)
    }

    /// `migrate cancel`.
    pub fn cancel(&mut self, now: u64) -> Vec<SourceAction> {
        self.source.cancel(now);
        self.drain(now, None);
        core::mem::take(&mut self.actions)
    }

    /// The answer to [`SourceAction::ResolveInDoubt`].
    pub fn resolve_in_doubt(&mut self, now: u64, destination_committed: bool) -> Vec<SourceAction> {
        self.source.resolve_in_doubt(now, destination_committed);
        self.drain(now, None);
        core::mem::take(&mut self.actions)
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn link(&self) -> &FrameLink {
        &self.conn.link
    }

    pub fn limits(&self) -> DriverLimits {
        self.conn.limits
    }

    /// Why the connection is gone, if it is: the caller may close its socket.
    pub fn transport_failure(&self) -> Option<TransportFailure> {
        self.conn.broken
    }

    /// True once the machine is Done or Failed and nothing is left to send (or sending is
    /// hopeless). An in-doubt source is not finished: it waits for `resolve_in_doubt`.
    pub fn finished(&self) -> bool {
        matches!(self.source.state(), SourceState::Done | SourceState::Failed)
            && self.conn.drained()
    }

    fn transport_failed(&mut self, now: u64, failure: TransportFailure) {
        let text = format!("{failure}");
        self.source.fail(now, AbortReason::TransportError, &text);
        self.drain(now, None);
    }

    /// Ticks the machine while it copies, within the limits; its page batches go straight
    /// into `pipe`'s buffer while it has room (the send of the step, see the module doc).
    fn tick(&mut self, now: u64, guest: &mut impl SourceGuest, pipe: &mut impl Pipe) {
        let limits = self.conn.limits;
        let copying = |state| matches!(state, SourceState::PreCopy | SourceState::FinalCopy);
        for _ in 0..limits.ticks_per_step.max(1) {
            let state = self.source.state();
            if copying(state) {
                let queued = self.conn.link.queued();
                // Copying has no deadline to miss, so not ticking only delays the next batch.
                // A pre-copy round ends once its pages reached the peer (`Pipe::in_flight`).
                let round_ends_next =
                    state == SourceState::PreCopy && self.source.round_pages_left() == 0;
                let undelivered = queued > 0 || pipe.in_flight() > 0;
                if queued >= limits.outbound_high_water || (round_ends_next && undelivered) {
                    break;
                }
            }
            self.source.on_tick(now, guest);
            self.drain_to(now, Some(&*guest), Some(pipe));
            if !copying(self.source.state()) {
                break;
            }
        }
    }

    /// Moves the machine's outputs to the link (messages) and the action list. Page batches
    /// are encoded from `guest` (every call that can make one has it).
    fn drain(&mut self, now: u64, guest: Option<&dyn SourceGuest>) {
        self.drain_to(now, guest, None);
    }

    /// Like `drain`, page batches written straight into `pipe`'s buffer while it has room.
    fn drain_to(
        &mut self,
        now: u64,
        guest: Option<&dyn SourceGuest>,
        mut pipe: Option<&mut dyn Pipe>,
    ) {
        while let Some(output) = self.source.poll_output() {
            match output {
                Output::Send(message) => {
                    if let Err(e) = self.conn.queue(&message) {
                        // The machine checks what it sends; this is a bug or a state blob that
                        // slipped through. The abort it causes always encodes.
                        let text = format!("cannot send {:?}: {e}", message.kind());
                        self.source.fail(now, AbortReason::LocalFailure, &text);
                    }
                }
                Output::SendPages(batch) => {
                    let queued = match guest {
                        Some(guest) => {
                            let pipe = pipe.as_mut().map(|p| &mut **p as &mut dyn Pipe);
                            self.conn.queue_pending(&batch, guest, pipe)
                        }
                        None => Err(BatchError::Guest(GuestError::Failed(
                            "a page batch was made without the guest at hand",
                        ))),
                    };
                    if let Err(e) = queued {
                        let text = format!("cannot send a page batch: {e}");
                        self.source.fail(now, AbortReason::LocalFailure, &text);
                    }
                }
                Output::Do(action) => self.actions.push(action),
            }
        }
    }
}

/// A [`Destination`] over a link.
#[derive(Debug)]
pub struct DestinationDriver {
    destination: Destination,
    conn: Connection,
    actions: Vec<DestinationAction>,
}

impl DestinationDriver {
    /// A driver with [`DriverLimits::default`].
    pub fn new(destination: Destination) -> Self {
        Self::with_limits(destination, DriverLimits::default())
    }

    /// A driver with other limits (only `stall_timeout_us` matters on this side).
    pub fn with_limits(destination: Destination, limits: DriverLimits) -> Self {
        Self {
            destination,
            conn: Connection::new(limits),
            actions: Vec::new(),
        }
    }

    /// One non-blocking step: receives (at most [`crate::link::RECEIVE_BUDGET`] bytes, which
    /// bounds the page writes of one step) and handles what arrived, then fires deadlines.
    /// Sends nothing (see [`flush`](Self::flush)). Returns the actions to perform, in order.
    pub fn step(
        &mut self,
        now: u64,
        pipe: &mut impl Pipe,
        host: &mut impl DestinationHost,
    ) -> Vec<DestinationAction> {
        // Page batches are written to the guest from where they lie in the pipe's buffer when
        // they can be (`FrameLink::receive_frames`). The machine keeps its outputs in order,
        // so they are drained once, after the frames of the step.
        let destination = &mut self.destination;
        let pipe_failure = self.conn.receive_frames(pipe, &mut |frame| match frame {
            Ok(Incoming::Pages(batch)) => destination.on_page_batch(now, &batch, host),
            Ok(Incoming::Message(message)) => destination.on_message(now, message, host),
            Err(text) => destination.fail(AbortReason::ProtocolError, &text),
        });
        self.drain();
        if let Some(failure) = pipe_failure {
            self.transport_failed(failure);
        }
        self.destination.on_tick(now);
        self.drain();
        core::mem::take(&mut self.actions)
    }

    /// Sends what is queued. A pipe error or stall fails the destination (which, once done,
    /// ignores it: the VM is ours); returns its actions.
    pub fn flush(&mut self, now: u64, pipe: &mut impl Pipe) -> Vec<DestinationAction> {
        if let Some(failure) = self.conn.flush(now, pipe) {
            self.transport_failed(failure);
        }
        core::mem::take(&mut self.actions)
    }

    /// The answer to [`DestinationAction::TakeDisk`]; returns the actions that follow (the
    /// resume, or the discard), the acknowledgement or abort going out at the next flush.
    pub fn on_disk_taken(&mut self, result: Result<(), String>) -> Vec<DestinationAction> {
        self.destination.on_disk_taken(result);
        self.drain();
        core::mem::take(&mut self.actions)
    }

    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    pub fn link(&self) -> &FrameLink {
        &self.conn.link
    }

    pub fn limits(&self) -> DriverLimits {
        self.conn.limits
    }

    /// Why the connection is gone, if it is: the caller may close its socket.
    pub fn transport_failure(&self) -> Option<TransportFailure> {
        self.conn.broken
    }

    /// True once the machine is Done or Failed and nothing is left to send (or sending is
    /// hopeless).
    pub fn finished(&self) -> bool {
        matches!(
            self.destination.state(),
            DestinationState::Done | DestinationState::Failed
        ) && self.conn.drained()
    }

    fn transport_failed(&mut self, failure: TransportFailure) {
        let text = format!("{failure}");
        self.destination.fail(AbortReason::TransportError, &text);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(output) = self.destination.poll_output() {
            match output {
                Output::Send(message) => {
                    if let Err(e) = self.conn.queue(&message) {
                        let text = format!("cannot send {:?}: {e}", message.kind());
                        self.destination.fail(AbortReason::LocalFailure, &text);
                    }
                }
                // A destination sends no pages.
                Output::SendPages(_) => self.destination.fail(
                    AbortReason::LocalFailure,
                    "the destination made a page batch",
                ),
                Output::Do(action) => self.actions.push(action),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Both drivers over an in-memory network that carries a few thousand bytes per direction per
    //! step, with a guest that keeps writing, and failures injected at every step. The invariant
    //! is the one of `end_to_end_tests`: either the migration committed and the destination's
    //! memory (and digest) equals the source's, or the source VM runs on untouched and the
    //! destination discarded its copy.

    use super::*;
    use crate::machine::Failure;
    use crate::message::{Capabilities, CpuVendor, Hello, RefuseReason, PAGE_SIZE};
    use crate::testing::{
        check_outcome, destination_config, source_config, FakeGuest, FakeHost, Net, Rng, TICK_US,
    };
    use alloc::string::ToString;

    const PAGES: usize = 64;
    /// Bytes each direction carries per step: a raw page and a half, so a full copy takes tens
    /// of steps and the outbound queue fills.
    const CAPACITY: usize = 3000;
    const MAX_STEPS: u64 = 5000;
    const BATCH_PAGES: usize = 4;

    fn limits() -> DriverLimits {
        DriverLimits {
            outbound_high_water: 8 * 1024,
            ticks_per_step: 4,
            stall_timeout_us: 40 * TICK_US,
        }
    }

    /// Where in a step a fault strikes: just before this call.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Phase {
        SourceStep,
        SourceFlush,
        DestinationStep,
        DestinationFlush,
    }

    const PHASES: [Phase; 4] = [
        Phase::SourceStep,
        Phase::SourceFlush,
        Phase::DestinationStep,
        Phase::DestinationFlush,
    ];

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fault {
        None,
        /// Both directions fail with `Closed` from then on.
        Cut {
            step: u64,
            phase: Phase,
        },
        /// One bit flips in the bytes in flight (if any).
        Corrupt {
            step: u64,
            bit: u64,
        },
        /// From then on nothing moves and no error is reported.
        Freeze {
            step: u64,
        },
        /// The destination refuses the VM.
        Refuse,
        /// The destination closes the connection right after flushing its CommitAck.
        CloseAfterAck,
    }

    struct Run {
        source: SourceDriver,
        destination: DestinationDriver,
        guest: FakeGuest,
        host: FakeHost,
        steps: u64,
        throttled: bool,
        /// Largest outbound queue of the source seen after a step during pre-copy.
        max_precopy_queue: usize,
    }

    /// What the kernel does with the source's actions, including `on_paused` after a pause.
    struct SourceSide {
        guest: FakeGuest,
        in_doubt: bool,
        throttled: bool,
    }

    impl SourceSide {
        fn perform(
            &mut self,
            driver: &mut SourceDriver,
            now: u64,
            actions: Vec<SourceAction>,
            host: &FakeHost,
        ) {
            for action in actions {
                match action {
                    SourceAction::SetThrottle(level) => {
                        self.throttled |= level > 0;
                        self.guest.throttle = level;
                    }
                    SourceAction::PauseVm => {
                        self.guest.paused = true;
                        let more = driver.on_paused(now, &mut self.guest);
                        self.perform(driver, now, more, host);
                    }
                    SourceAction::ResumeVm => self.guest.paused = false,
                    SourceAction::DestroyVm => {
                        // The acknowledgement left the destination only after its VM ran.
                        assert!(host.resumed, "source destroyed its VM before the copy ran");
                        self.guest.destroyed = true;
                    }
                    SourceAction::ResolveInDoubt => self.in_doubt = true,
                    // These tests migrate VMs without a shared disk.
                    SourceAction::QuiesceDisk | SourceAction::ReclaimDisk => {
                        unreachable!("no disk")
                    }
                }
            }
        }
    }

    fn perform_destination(host: &mut FakeHost, actions: Vec<DestinationAction>) {
        for action in actions {
            match action {
                DestinationAction::ResumeVm => host.resumed = true,
                DestinationAction::DiscardCopy => {
                    assert!(!host.resumed, "discarded a running VM");
                    host.discarded = true;
                }
                DestinationAction::AnnounceMac(mac) => host.announced = Some(mac),
                DestinationAction::TakeDisk => unreachable!("no disk"),
            }
        }
    }

    fn destination() -> Destination {
        Destination::new(destination_config(), 0).expect("valid destination config")
    }

    fn migrate(seed: u64, writes_per_step: u64, fault: Fault, limits: DriverLimits) -> Run {
        let mut rng = Rng::seeded(seed);
        let mut side = SourceSide {
            guest: FakeGuest::new(&mut rng, PAGES, writes_per_step),
            in_doubt: false,
            throttled: false,
        };
        let mut host = FakeHost::default();
        if fault == Fault::Refuse {
            host.refuse = Some(RefuseReason::Busy);
        }
        let source = Source::new(source_config(PAGES, BATCH_PAGES)).expect("valid source config");
        let mut sdrv = SourceDriver::with_limits(source, limits);
        let mut ddrv = DestinationDriver::with_limits(destination(), limits);
        let mut net = Net::default();
        let mut max_precopy_queue = 0;
        sdrv.start(0);

        let mut step = 0;
        while step < MAX_STEPS {
            let now = step * TICK_US;
            net.each(|c| c.credit = CAPACITY);
            let strike = |net: &mut Net, phase: Phase| match fault {
                Fault::Cut { step: s, phase: p } if s == step && p == phase => {
                    net.each(|c| c.cut = true)
                }
                Fault::Freeze { step: s } if s == step && phase == Phase::SourceStep => {
                    net.each(|c| c.frozen = true)
                }
                Fault::Corrupt { step: s, bit } if s == step => {
                    if phase == Phase::DestinationStep && !net.to_destination.bytes.is_empty() {
                        let bytes = &mut net.to_destination.bytes;
                        let bit = bit as usize % (bytes.len() * 8);
                        bytes[bit / 8] ^= 1 << (bit % 8);
                    }
                    if phase == Phase::SourceStep && !net.to_source.bytes.is_empty() {
                        let bytes = &mut net.to_source.bytes;
                        let bit = bit as usize % (bytes.len() * 8);
                        bytes[bit / 8] ^= 1 << (bit % 8);
                    }
                }
                _ => {}
            };

            strike(&mut net, Phase::SourceStep);
            let actions = sdrv.step(now, &mut net.source_end(), &mut side.guest);
            side.perform(&mut sdrv, now, actions, &host);
            if sdrv.source().state() == SourceState::PreCopy {
                max_precopy_queue = max_precopy_queue.max(sdrv.link().queued());
            }
            strike(&mut net, Phase::SourceFlush);
            let actions = sdrv.flush(now, &mut net.source_end());
            side.perform(&mut sdrv, now, actions, &host);

            strike(&mut net, Phase::DestinationStep);
            let actions = ddrv.step(now, &mut net.destination_end(), &mut host);
            perform_destination(&mut host, actions);
            strike(&mut net, Phase::DestinationFlush);
            let actions = ddrv.flush(now, &mut net.destination_end());
            perform_destination(&mut host, actions);
            if fault == Fault::CloseAfterAck && ddrv.destination().state() == DestinationState::Done
            {
                net.each(|c| c.closed = true);
            }

            // The shared authority answers once the destination has settled either way.
            if side.in_doubt && ddrv.finished() {
                side.in_doubt = false;
                let committed = ddrv.destination().state() == DestinationState::Done;
                let actions = sdrv.resolve_in_doubt(now, committed);
                side.perform(&mut sdrv, now, actions, &host);
            }
            side.guest.run_slice(&mut rng);
            if sdrv.finished() && ddrv.finished() && !side.in_doubt {
                break;
            }
            step += 1;
        }
        Run {
            source: sdrv,
            destination: ddrv,
            guest: side.guest,
            host,
            steps: step,
            throttled: side.throttled,
            max_precopy_queue,
        }
    }

    fn check(run: &Run, fault: Fault) {
        let ctx = alloc::format!("{fault:?}, ended at step {}", run.steps);
        assert!(run.steps < MAX_STEPS, "run did not finish: {ctx}");
        check_outcome(
            run.source.source(),
            run.destination.destination(),
            &run.guest,
            &run.host,
            &ctx,
        );
        assert!(run.source.finished() && run.destination.finished(), "{ctx}");
    }

    #[test]
    fn migration_over_a_slow_link_matches_memory_and_digest() {
        for seed in 1..=3 {
            for writes in [0, 6, 40] {
                let run = migrate(seed, writes, Fault::None, limits());
                check(&run, Fault::None);
                assert_eq!(run.source.source().state(), SourceState::Done);
                assert!(run.source.transport_failure().is_none());
                // Over a slow link the commit leaves after the pause and before the ack.
                let s = run.source.source().summary();
                let (paused, sent) = (s.paused_us.unwrap(), s.final_sent_us.unwrap());
                assert!(paused <= sent && sent <= s.finished_us.unwrap());
                assert!(s.send_downtime_us() <= s.downtime_us());
                // Backpressure held: at most one batch past the high-water mark.
                let batch = BATCH_PAGES * (PAGE_SIZE + 16) + 64;
                assert!(
                    run.max_precopy_queue <= limits().outbound_high_water + batch,
                    "queue reached {}",
                    run.max_precopy_queue
                );
                assert!(
                    run.max_precopy_queue > CAPACITY,
                    "the link was never the bottleneck"
                );
                // Everything queued went out, and the receiver read all of it.
                assert_eq!(
                    run.source.link().bytes_sent(),
                    run.destination.link().bytes_received()
                );
                if writes == 40 {
                    assert!(
                        run.throttled,
                        "seed {seed}: a busy guest was never throttled"
                    );
                }
            }
        }
    }

    #[test]
    fn default_limits_also_converge() {
        let run = migrate(4, 6, Fault::None, DriverLimits::default());
        check(&run, Fault::None);
        assert_eq!(run.source.source().state(), SourceState::Done);
    }

    #[test]
    fn refusal_ends_both_sides() {
        let run = migrate(1, 4, Fault::Refuse, limits());
        check(&run, Fault::Refuse);
        assert_eq!(
            run.source.source().failure(),
            Some(&Failure::Refused(RefuseReason::Busy))
        );
    }

    /// A cut and a corrupted byte in flight at every step of a migration (every fifth step for
    /// a busy guest, whose migration is four times longer), the phase of the step rotating, and
    /// in all four phases around the commit.
    #[test]
    fn failure_at_any_step_leaves_one_running_copy() {
        let mut runs = 0;
        let mut committed = 0;
        let mut in_doubt_resolved = 0;
        let mut tally = |run: &Run, fault: Fault| {
            check(run, fault);
            runs += 1;
            if run.source.source().state() == SourceState::Done {
                committed += 1;
                // Done although the connection broke: the cut fell between Commit and
                // CommitAck and the in-doubt source learned that the destination committed.
                if run.source.transport_failure().is_some() {
                    in_doubt_resolved += 1;
                }
            }
        };
        for (seed, writes, stride) in [(1, 6, 1), (2, 40, 5)] {
            let steps = migrate(seed, writes, Fault::None, limits()).steps;
            for step in (0..=steps + 1).step_by(stride) {
                let phase = PHASES[(step / stride as u64 % 4) as usize];
                let cut = Fault::Cut { step, phase };
                let corrupt = Fault::Corrupt {
                    step,
                    bit: seed * 7919 + step * 31,
                };
                for fault in [cut, corrupt] {
                    tally(&migrate(seed, writes, fault, limits()), fault);
                }
            }
        }
        let steps = migrate(1, 6, Fault::None, limits()).steps;
        for step in steps.saturating_sub(6)..=steps {
            for phase in PHASES {
                let fault = Fault::Cut { step, phase };
                tally(&migrate(1, 6, fault, limits()), fault);
            }
        }
        assert!(committed > 0 && committed < runs, "{committed} of {runs}");
        assert!(
            in_doubt_resolved > 0,
            "no cut fell between Commit and CommitAck"
        );
        std::eprintln!("{runs} failure runs, {committed} committed, {in_doubt_resolved} in doubt");
    }

    #[test]
    fn a_link_that_stops_moving_fails_on_the_stall_timeout() {
        let reference = migrate(1, 6, Fault::None, limits());
        // Early (handshake), mid pre-copy, and late.
        for step in [1, reference.steps / 2, reference.steps.saturating_sub(2)] {
            let fault = Fault::Freeze { step };
            let run = migrate(1, 6, fault, limits());
            check(&run, fault);
        }
        let run = migrate(
            1,
            6,
            Fault::Freeze {
                step: reference.steps / 2,
            },
            limits(),
        );
        assert_eq!(run.source.source().state(), SourceState::Failed);
        assert!(matches!(
            run.source.transport_failure(),
            Some(TransportFailure::Stalled { .. })
        ));
    }

    #[test]
    fn close_after_done_is_not_a_failure() {
        let mut run = migrate(2, 6, Fault::None, limits());
        check(&run, Fault::None);
        let mut net = Net::default();
        net.each(|c| c.closed = true);
        let now = (run.steps + 1) * TICK_US;
        assert!(run
            .source
            .step(now, &mut net.source_end(), &mut run.guest)
            .is_empty());
        assert!(run.source.flush(now, &mut net.source_end()).is_empty());
        assert!(run
            .destination
            .step(now, &mut net.destination_end(), &mut run.host)
            .is_empty());
        assert!(run
            .destination
            .flush(now, &mut net.destination_end())
            .is_empty());
        assert_eq!(run.source.source().state(), SourceState::Done);
        assert!(run.source.source().failure().is_none());
        assert_eq!(
            run.destination.destination().state(),
            DestinationState::Done
        );
        assert!(run.destination.destination().failure().is_none());
        assert!(run.source.finished() && run.destination.finished());
    }

    #[test]
    fn ack_followed_by_a_close_completes() {
        // The destination closes right after its CommitAck, so the source reads the ack and the
        // close in one step: the ack counts, the close is no failure.
        let run = migrate(3, 6, Fault::CloseAfterAck, limits());
        check(&run, Fault::CloseAfterAck);
        assert_eq!(run.source.source().state(), SourceState::Done);
        assert!(run.source.source().failure().is_none());
        assert_eq!(
            run.source.transport_failure(),
            Some(TransportFailure::Pipe(PipeError::Closed))
        );
    }

    #[test]
    fn garbage_from_the_peer_aborts_without_a_panic() {
        let mut host = FakeHost::default();
        let mut ddrv = DestinationDriver::with_limits(destination(), limits());
        let mut net = Net::unlimited();
        net.to_destination.bytes.extend(b"SSH-2.0-OpenSSH_9.6\r\n");
        let actions = ddrv.step(0, &mut net.destination_end(), &mut host);
        assert!(actions.is_empty(), "no VM was created, nothing to discard");
        assert_eq!(ddrv.destination().state(), DestinationState::Failed);
        assert!(matches!(
            ddrv.destination().failure(),
            Some(Failure::Aborted {
                reason: AbortReason::ProtocolError,
                by_peer: false,
                ..
            })
        ));
        assert!(!ddrv.finished(), "the abort is still to be sent");
        ddrv.flush(0, &mut net.destination_end());
        assert!(ddrv.finished());
        let mut reader = FrameLink::new();
        reader.receive(&mut net.source_end()).unwrap();
        assert!(matches!(
            reader.next_message(),
            Ok(Some(Message::Abort(a))) if a.reason == AbortReason::ProtocolError
        ));

        // The source, mid pre-copy: the VM is released and an abort goes out.
        let mut rng = Rng(5);
        let mut guest = FakeGuest::new(&mut rng, PAGES, 0);
        let mut sdrv = SourceDriver::with_limits(
            Source::new(source_config(PAGES, BATCH_PAGES)).unwrap(),
            limits(),
        );
        sdrv.start(0);
        let mut net = Net::unlimited();
        let mut peer = FrameLink::new();
        peer.queue(&Message::Hello(Hello {
            min_version: crate::frame::PROTOCOL_VERSION,
            max_version: crate::frame::PROTOCOL_VERSION,
            node_name: "node2".to_string(),
            capabilities: Capabilities::KNOWN,
            cpu_vendor: CpuVendor::Intel,
            cpu_features: 0,
        }))
        .unwrap();
        peer.queue(&Message::VmConfigReply(crate::message::ConfigReply::Accept))
            .unwrap();
        peer.flush(&mut net.destination_end()).unwrap();
        net.to_source.bytes.extend([0xFF; 40]);
        let actions = sdrv.step(0, &mut net.source_end(), &mut guest);
        assert!(
            actions.is_empty(),
            "nothing was paused or throttled yet: {actions:?}"
        );
        assert_eq!(sdrv.source().state(), SourceState::Failed);
        sdrv.flush(0, &mut net.source_end());
        assert!(sdrv.finished());
    }

    #[test]
    fn a_round_ends_only_once_its_pages_reached_the_peer() {
        let mut rng = Rng(11);
        let mut guest = FakeGuest::new(&mut rng, PAGES, 0);
        let mut host = FakeHost::default();
        let mut sdrv = SourceDriver::new(Source::new(source_config(PAGES, BATCH_PAGES)).unwrap());
        let mut ddrv = DestinationDriver::new(destination());
        let mut net = Net::unlimited();
        sdrv.start(0);
        let mut now = 0;
        while sdrv.source().state() != SourceState::PreCopy {
            now += TICK_US;
            sdrv.step(now, &mut net.source_end(), &mut guest);
            sdrv.flush(now, &mut net.source_end());
            ddrv.step(now, &mut net.destination_end(), &mut host);
            ddrv.flush(now, &mut net.destination_end());
            assert!(now < 100 * TICK_US, "the handshake did not finish");
        }
        // The destination stops reading: every page of round 1 is sent, none received.
        for _ in 0..50 {
            now += TICK_US;
            sdrv.step(now, &mut net.source_end(), &mut guest);
            sdrv.flush(now, &mut net.source_end());
        }
        assert_eq!(sdrv.source().round_pages_left(), 0);
        assert_eq!(
            sdrv.source().round(),
            1,
            "the round ended with pages in flight"
        );
        // Once the destination has read them, the round ends.
        ddrv.step(now, &mut net.destination_end(), &mut host);
        now += TICK_US;
        sdrv.step(now, &mut net.source_end(), &mut guest);
        assert!(sdrv.source().round() > 1 || sdrv.source().state() != SourceState::PreCopy);
    }

    #[test]
    fn start_actions_and_cancel_go_through_the_driver() {
        let mut rng = Rng(9);
        let mut guest = FakeGuest::new(&mut rng, PAGES, 0);
        let mut sdrv = SourceDriver::new(Source::new(source_config(PAGES, BATCH_PAGES)).unwrap());
        sdrv.start(0);
        assert!(sdrv.link().queued() > 0, "the hello is queued");
        let mut net = Net::default();
        // A connection not yet established takes nothing: no error, nothing sent.
        assert!(sdrv.flush(0, &mut net.source_end()).is_empty());
        assert_eq!(sdrv.link().bytes_sent(), 0);
        assert!(sdrv.step(1, &mut net.source_end(), &mut guest).is_empty());
        assert!(sdrv.cancel(2).is_empty());
        assert_eq!(sdrv.source().state(), SourceState::Failed);
        assert!(!sdrv.finished(), "hello and abort are still queued");
        net.each(|c| c.credit = usize::MAX);
        sdrv.flush(3, &mut net.source_end());
        assert!(sdrv.finished());
    }
}
