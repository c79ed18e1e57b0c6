//! The sending side of a migration, as a sans-IO state machine (see [`crate::machine`]).
//!
//! ```text
//! Idle -start-> AwaitHello -Hello-> AwaitConfigReply -Accept-> PreCopy (rounds, policy)
//!   PreCopy -policy says switchover-> Pausing (PauseVm) -paused-> [Quiescing (QuiesceDisk)
//!   -disk quiesced->] FinalCopy (Switchover, the last dirty pages batch by batch, like a round)
//!   -> AwaitCommitAck (vCPU and device state, Commit sent on the way) -CommitAck-> Done
//!   (DestroyVm)
//! ```
//!
//! A VM with a shared disk (`VmConfig::disk`) passes through `Quiescing`: its requests in
//! flight complete (their data lands in guest memory before the final pages are harvested) and
//! the target's cache is flushed, so the destination starts from the disk the guest saw. The
//! destination takes the disk's reservation over before it resumes the VM (see
//! [`crate::destination`]); if the migration fails after `Commit` went out, the destination may
//! already have taken it, so the source asks for [`SourceAction::ReclaimDisk`] before
//! [`SourceAction::ResumeVm`].
//!
//! Failure rule: before `Commit` is sent, any failure (refusal, abort from the peer, timeout,
//! cancel, transport or decode error reported by the driver, local error) ends in `Failed` with
//! the VM running: the throttle is lifted and a paused VM is resumed. The source only ever reads
//! guest memory, so the VM continues exactly where it was.
//!
//! After `Commit` is sent the source cannot know on its own whether the destination took over:
//! the acknowledgement may be lost after the destination resumed the VM. Resuming here could run
//! the VM on two nodes, giving up could run it on none. So a failure in `AwaitCommitAck` leads to
//! `InDoubt` with [`SourceAction::ResolveInDoubt`]: the driver asks an authority both nodes share
//! (the cluster's owner record / the disk reservation, see storage/) and calls
//! [`Source::resolve_in_doubt`]. This is where we differ from "the source resumes on any error".

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::frame::HEADER_LEN;
use crate::machine::{version_compatible, Failure, GuestError, Output, Timeouts};
use crate::message::{
    compact_encoding, AbortReason, Capabilities, ConfigReply, CpuVendor, DeviceStateMsg, Hello,
    Message, MessageError, PageEncoding, PageEntry, RoundMarker, VcpuStateMsg, VmConfig, PAGE_SIZE,
};
use crate::pending::{PendingBatch, PendingPage};
use crate::policy::{Decision, Policy, PolicyConfig, PolicyError};

/// Largest number of pages per batch a source may be configured with: keeps a batch (up to
/// 4105 bytes per raw page) far below the frame limit.
pub const MAX_BATCH_PAGES: usize = 2048;

/// The source's view of the VM it moves.
pub trait SourceGuest {
    /// Number of guest pages.
    fn page_count(&self) -> u64;
    /// Page `page` where it lies in guest memory (read only while the VM does not run).
    fn page(&self, page: u64) -> Result<&[u8; PAGE_SIZE], GuestError>;
    /// The pages written since the previous call (in any order), clearing the log.
    fn harvest_dirty(&mut self) -> Result<Vec<u64>, GuestError>;
    /// The encoded state of every vCPU (vmx `VcpuState::encode`), in vCPU order. Called paused.
    fn save_vcpus(&mut self) -> Result<Vec<Vec<u8>>, GuestError>;
    /// The state of every device model as (device id, bytes). Called paused.
    fn save_devices(&mut self) -> Result<Vec<(u32, Vec<u8>)>, GuestError>;
}

/// What the source asks its driver to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAction {
    /// Take this percentage of vCPU time away from the VM (0: no throttle).
    SetThrottle(u8),
    /// Pause the VM, then call [`Source::on_paused`].
    PauseVm,
    /// Run the VM again (the migration failed).
    ResumeVm,
    /// The destination runs the VM: free this node's copy.
    DestroyVm,
    /// Find out whether the destination committed and call [`Source::resolve_in_doubt`].
    ResolveInDoubt,
    /// Let the paused VM's disk requests in flight complete and flush the disk, then call
    /// [`Source::on_disk_quiesced`].
    QuiesceDisk,
    /// Make sure this node holds the VM's disk reservation again (the destination may have
    /// taken it before the migration failed); comes right before [`SourceAction::ResumeVm`].
    ReclaimDisk,
}

/// Where the source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    Idle,
    AwaitHello,
    AwaitConfigReply,
    PreCopy,
    Pausing,
    /// Paused, waiting for the VM's disk I/O to drain and the disk to be flushed.
    Quiescing,
    /// Paused: the last dirty pages go out batch by batch (the driver keeps its queue bounded,
    /// so a large final round never has to sit in memory at once).
    FinalCopy,
    AwaitCommitAck,
    InDoubt,
    Done,
    Failed,
}

/// The source's settings.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub node_name: String,
    pub capabilities: Capabilities,
    pub cpu_vendor: CpuVendor,
    pub cpu_features: u64,
    pub vm: VmConfig,
    pub policy: PolicyConfig,
    pub timeouts: Timeouts,
    /// Pages per batch, `1..=MAX_BATCH_PAGES`.
    pub batch_pages: usize,
}

/// A source configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceError {
    Policy(PolicyError),
    BatchPages {
        value: usize,
    },
    /// The hello or the VM configuration could not be sent (a name too long, no memory, ...).
    Message(MessageError),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Policy(e) => write!(f, "{e}"),
            SourceError::Message(e) => write!(f, "{e}"),
            SourceError::BatchPages { value } => write!(
                f,
                "batch size of {value} pages is outside 1..={MAX_BATCH_PAGES}"
            ),
        }
    }
}

impl core::error::Error for SourceError {}

/// What a migration cost, for the final summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub started_us: u64,
    /// When the destination accepted the VM and the first round began (the handshake, with the
    /// destination reserving the VM's memory, comes before).
    pub copy_started_us: Option<u64>,
    /// When the VM was paused, if it was.
    pub paused_us: Option<u64>,
    /// When the last byte of the switchover (the commit) was handed to the transport: the end
    /// of the pause as QEMU counts it (see [`Summary::send_downtime_us`]).
    pub final_sent_us: Option<u64>,
    /// When the migration ended (done or failed).
    pub finished_us: Option<u64>,
    /// Frame bytes of page batches, markers and state sent.
    pub bytes_sent: u64,
    pub rounds: u32,
    pub pages_raw: u64,
    pub pages_zero: u64,
    pub pages_compressed: u64,
}

impl Summary {
    /// Bytes per second from the first page to the end: the stream's throughput.
    pub fn stream_bytes_per_sec(&self) -> Option<u64> {
        let us = self.finished_us?.checked_sub(self.copy_started_us?)?.max(1);
        u64::try_from(u128::from(self.bytes_sent) * 1_000_000 / u128::from(us)).ok()
    }

    /// The pause the guest saw, once the migration ended after pausing: from the pause until
    /// the destination acknowledged the commit (it resumes the VM before acknowledging).
    pub fn downtime_us(&self) -> Option<u64> {
        Some(self.finished_us?.saturating_sub(self.paused_us?))
    }

    /// The pause as QEMU reports its `downtime`: from the pause until the last byte of the final
    /// state was handed to the transport, leaving out the transit, the destination's loading and
    /// resume and the acknowledgement that [`downtime_us`](Self::downtime_us) includes. Only for
    /// comparing like with like.
    pub fn send_downtime_us(&self) -> Option<u64> {
        Some(self.final_sent_us?.saturating_sub(self.paused_us?))
    }
}

/// The sending side of one migration.
#[derive(Debug)]
pub struct Source {
    config: SourceConfig,
    policy: Policy,
    state: SourceState,
    out: VecDeque<Output<SourceAction>>,
    deadline: Option<u64>,
    caps: Capabilities,
    round: u32,
    round_pages: Vec<u64>,
    cursor: usize,
    round_start: u64,
    round_bytes: u64,
    round_sent: u64,
    /// Pages dirtied in the last pre-copy round, sent with the final pages after pausing.
    pending: Vec<u64>,
    paused: bool,
    throttled: bool,
    /// `Commit` went out: from here the destination may have taken the disk.
    commit_sent: bool,
    failure: Option<Failure>,
    summary: Summary,
    /// Pages found dirty at the end of the last round, and the rate they were dirtied at
    /// (pages per second), for the operator's progress line.
    last_dirty: u64,
    last_dirty_rate: Option<u64>,
    /// When the transport took the hello: its answer gives the round trip the policy counts
    /// into every pause.
    hello_sent_us: Option<u64>,
}

fn hello_of(config: &SourceConfig) -> Hello {
    crate::machine::hello(
        &config.node_name,
        config.capabilities,
        config.cpu_vendor,
        config.cpu_features,
    )
}

/// Checks that `message` encodes, so the driver never holds a message the wire refuses
/// (oversized or malformed state from a device model).
fn checked(message: Message) -> Result<Message, GuestError> {
    message
        .encode_payload(&mut Vec::new())
        .map_err(|_| GuestError::Failed("saved state cannot be sent (too large or malformed)"))?;
    Ok(message)
}

fn sorted_unique(mut pages: Vec<u64>) -> Vec<u64> {
    pages.sort_unstable();
    pages.dedup();
    pages
}

impl Source {
    /// A source ready to [`start`](Self::start).
    pub fn new(config: SourceConfig) -> Result<Self, SourceError> {
        if config.batch_pages == 0 || config.batch_pages > MAX_BATCH_PAGES {
            return Err(SourceError::BatchPages {
                value: config.batch_pages,
            });
        }
        let policy = Policy::new(config.policy).map_err(SourceError::Policy)?;
        // Encode both opening messages once: a configuration the peer would refuse to decode
        // is caught here, not halfway through a handshake.
        let mut scratch = Vec::new();
        Message::Hello(hello_of(&config))
            .encode_payload(&mut scratch)
            .map_err(SourceError::Message)?;
        Message::VmConfig(config.vm.clone())
            .encode_payload(&mut scratch)
            .map_err(SourceError::Message)?;
        Ok(Self {
            config,
            policy,
            state: SourceState::Idle,
            out: VecDeque::new(),
            deadline: None,
            caps: Capabilities::default(),
            round: 0,
            round_pages: Vec::new(),
            cursor: 0,
            round_start: 0,
            round_bytes: 0,
            round_sent: 0,
            pending: Vec::new(),
            paused: false,
            throttled: false,
            commit_sent: false,
            failure: None,
            summary: Summary::default(),
            last_dirty: 0,
            last_dirty_rate: None,
            hello_sent_us: None,
        })
    }

    pub fn state(&self) -> SourceState {
        self.state
    }

    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The current pre-copy round (1 is the full copy), 0 before it starts.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Pages of the current round not yet put into a batch. In pre-copy, 0 means the next tick
    /// ends the round; a driver with an outbound queue waits for the queue to drain first, so
    /// the round's measured bandwidth is the link's, not the speed of filling a buffer.
    pub fn round_pages_left(&self) -> usize {
        self.round_pages.len().saturating_sub(self.cursor)
    }

    /// Pages of the current round sent so far, and the round's size.
    pub fn round_progress(&self) -> (u64, u64) {
        (self.cursor as u64, self.round_pages.len() as u64)
    }

    /// Pages found dirty at the end of the last round (what the next round resends).
    pub fn dirty_pending(&self) -> u64 {
        self.last_dirty
    }

    /// How fast the guest dirtied pages during the last round, in pages per second.
    pub fn dirty_rate(&self) -> Option<u64> {
        self.last_dirty_rate
    }

    /// The policy's view: measured bandwidth, throttle, rounds.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The next output to perform, in order.
    pub fn poll_output(&mut self) -> Option<Output<SourceAction>> {
        self.out.pop_front()
    }

    /// Opens the migration: sends the hello.
    pub fn start(&mut self, now: u64) {
        if self.state != SourceState::Idle {
            return;
        }
        self.summary.started_us = now;
        self.out
            .push_back(Output::Send(Message::Hello(hello_of(&self.config))));
        self.wait(
            SourceState::AwaitHello,
            now,
            self.config.timeouts.handshake_us,
        );
    }

    /// Handles a message from the destination.
    pub fn on_message(&mut self, now: u64, message: Message, guest: &mut impl SourceGuest) {
        if let Message::Abort(abort) = message {
            self.abort(now, abort.reason, abort.text, true);
            return;
        }
        match (self.state, message) {
            (SourceState::Done | SourceState::Failed | SourceState::InDoubt, _) => {}
            (SourceState::AwaitHello, Message::Hello(hello)) => {
                if !version_compatible(hello.min_version, hello.max_version) {
                    self.abort(
                        now,
                        AbortReason::ProtocolError,
                        "no common protocol version".to_string(),
                        false,
                    );
                    return;
                }
                if let Some(sent) = self.hello_sent_us {
                    self.policy.set_round_trip_us(now.saturating_sub(sent));
                }
                self.caps = self.config.capabilities.common(hello.capabilities);
                self.out
                    .push_back(Output::Send(Message::VmConfig(self.config.vm.clone())));
                self.wait(
                    SourceState::AwaitConfigReply,
                    now,
                    self.config.timeouts.handshake_us,
                );
            }
            (SourceState::AwaitConfigReply, Message::VmConfigReply(ConfigReply::Accept)) => {
                // Clear the dirty log before reading anything: every page written from here on
                // is in the next harvest, so nothing read in round 1 can go stale unnoticed.
                if let Err(e) = guest.harvest_dirty() {
                    self.local_failure(now, e);
                    return;
                }
                self.state = SourceState::PreCopy;
                self.deadline = None;
                self.summary.copy_started_us = Some(now);
                let pages = guest.page_count();
                self.begin_round(now, (0..pages).collect());
            }
            (SourceState::AwaitConfigReply, Message::VmConfigReply(ConfigReply::Refuse(r))) => {
                // Nothing was paused or throttled yet; the destination created nothing.
                self.state = SourceState::Failed;
                self.deadline = None;
                self.failure = Some(Failure::Refused(r));
                self.summary.finished_us = Some(now);
            }
            (SourceState::AwaitCommitAck, Message::CommitAck) => {
                self.state = SourceState::Done;
                self.deadline = None;
                self.summary.finished_us = Some(now);
                self.out.push_back(Output::Do(SourceAction::DestroyVm));
            }
            (_, other) => {
                let text =
                    alloc::format!("unexpected {:?} in state {:?}", other.kind(), self.state);
                self.abort(now, AbortReason::ProtocolError, text, false);
            }
        }
    }

    /// Advances time: fires deadlines and, during pre-copy, sends the next batch or ends the round.
    pub fn on_tick(&mut self, now: u64, guest: &mut impl SourceGuest) {
        if self.deadline.is_some_and(|d| now >= d) {
            let text = alloc::format!("timed out in state {:?}", self.state);
            self.abort(now, AbortReason::Timeout, text, false);
            return;
        }
        match self.state {
            SourceState::PreCopy | SourceState::FinalCopy
                if self.cursor < self.round_pages.len() =>
            {
                if let Err(e) = self.send_batch(guest) {
                    self.local_failure(now, e);
                }
            }
            SourceState::PreCopy => self.end_round(now, guest),
            SourceState::FinalCopy => {
                if let Err(e) = self.send_state(guest) {
                    self.local_failure(now, e);
                    return;
                }
                self.out.push_back(Output::Send(Message::Commit));
                self.commit_sent = true;
                self.wait(
                    SourceState::AwaitCommitAck,
                    now,
                    self.config.timeouts.commit_us,
                );
            }
            _ => {}
        }
    }

    /// The transport took bytes of the stream: the first time, the hello left (a connection
    /// being opened takes nothing), and its answer will time a round trip.
    pub fn on_bytes_sent(&mut self, now: u64) {
        if self.state == SourceState::AwaitHello && self.hello_sent_us.is_none() {
            self.hello_sent_us = Some(now);
        }
    }

    /// Everything queued so far, the commit included, was handed to the transport: records the
    /// end of the pause as QEMU counts it ([`Summary::send_downtime_us`]), once.
    pub fn on_final_sent(&mut self, now: u64) {
        if self.state == SourceState::AwaitCommitAck && self.summary.final_sent_us.is_none() {
            self.summary.final_sent_us = Some(now);
        }
    }

    /// The driver paused the VM as asked by [`SourceAction::PauseVm`].
    pub fn on_paused(&mut self, now: u64, guest: &mut impl SourceGuest) {
        if self.state != SourceState::Pausing {
            return;
        }
        self.summary.paused_us = Some(now);
        if self.config.vm.disk.is_some() {
            self.out.push_back(Output::Do(SourceAction::QuiesceDisk));
            self.wait(SourceState::Quiescing, now, self.config.timeouts.disk_us);
        } else {
            self.begin_final_copy(now, guest);
        }
    }

    /// The answer to [`SourceAction::QuiesceDisk`]: the VM's disk is drained and flushed, or
    /// why it could not be.
    pub fn on_disk_quiesced(
        &mut self,
        now: u64,
        guest: &mut impl SourceGuest,
        result: Result<(), String>,
    ) {
        if self.state != SourceState::Quiescing {
            return;
        }
        match result {
            Ok(()) => self.begin_final_copy(now, guest),
            Err(why) => {
                let text = alloc::format!("disk quiesce: {why}");
                self.abort(now, AbortReason::LocalFailure, text, false);
            }
        }
    }

    fn begin_final_copy(&mut self, now: u64, guest: &mut impl SourceGuest) {
        self.out.push_back(Output::Send(Message::Switchover));
        let mut pages = core::mem::take(&mut self.pending);
        match guest.harvest_dirty() {
            Ok(dirty) => pages.extend(dirty),
            Err(e) => {
                self.local_failure(now, e);
                return;
            }
        }
        // The final pages belong to one more round, so the destination's round check holds.
        // Sending them needs no deadline: the driver notices a link that stops taking data.
        self.begin_round(now, sorted_unique(pages));
        self.state = SourceState::FinalCopy;
        self.deadline = None;
    }

    /// `migrate cancel`.
    pub fn cancel(&mut self, now: u64) {
        self.abort(
            now,
            AbortReason::Cancelled,
            "cancelled by the operator".to_string(),
            false,
        );
    }

    /// A failure the driver saw: transport error, undecodable frame, local error.
    pub fn fail(&mut self, now: u64, reason: AbortReason, text: &str) {
        self.abort(now, reason, text.to_string(), false);
    }

    /// The answer to [`SourceAction::ResolveInDoubt`]: whether the destination runs the VM.
    pub fn resolve_in_doubt(&mut self, now: u64, destination_committed: bool) {
        if self.state != SourceState::InDoubt {
            return;
        }
        self.summary.finished_us = Some(now);
        if destination_committed {
            self.state = SourceState::Done;
            self.failure = None;
            self.out.push_back(Output::Do(SourceAction::DestroyVm));
        } else {
            self.state = SourceState::Failed;
            self.release_vm();
        }
    }

    fn wait(&mut self, state: SourceState, now: u64, timeout: u64) {
        self.state = state;
        self.deadline = Some(now.saturating_add(timeout));
    }

    fn local_failure(&mut self, now: u64, error: GuestError) {
        self.abort(
            now,
            AbortReason::LocalFailure,
            alloc::format!("{error}"),
            false,
        );
    }

    /// Gives the VM back to its guest: no throttle, not paused.
    fn release_vm(&mut self) {
        if self.throttled {
            self.throttled = false;
            self.out.push_back(Output::Do(SourceAction::SetThrottle(0)));
        }
        if self.paused {
            self.paused = false;
            if self.commit_sent && self.config.vm.disk.is_some() {
                self.out.push_back(Output::Do(SourceAction::ReclaimDisk));
            }
            self.out.push_back(Output::Do(SourceAction::ResumeVm));
        }
    }

    fn abort(&mut self, now: u64, reason: AbortReason, text: String, by_peer: bool) {
        match self.state {
            SourceState::Done | SourceState::Failed | SourceState::InDoubt => return,
            SourceState::Idle => {
                self.state = SourceState::Failed;
            }
            // The destination aborting means it did not commit and never will (it ignores
            // everything once failed), so the VM can safely run here again.
            SourceState::AwaitCommitAck if by_peer => {
                self.state = SourceState::Failed;
                self.summary.finished_us = Some(now);
                self.release_vm();
            }
            SourceState::AwaitCommitAck => {
                if !by_peer {
                    self.send_abort(reason, &text);
                }
                self.state = SourceState::InDoubt;
                self.out.push_back(Output::Do(SourceAction::ResolveInDoubt));
            }
            _ => {
                if !by_peer {
                    self.send_abort(reason, &text);
                }
                self.state = SourceState::Failed;
                self.summary.finished_us = Some(now);
                self.release_vm();
            }
        }
        self.deadline = None;
        self.failure = Some(Failure::Aborted {
            by_peer,
            reason,
            text,
        });
    }

    fn send_abort(&mut self, reason: AbortReason, text: &str) {
        self.out
            .push_back(Output::Send(crate::machine::abort_message(reason, text)));
    }

    fn begin_round(&mut self, now: u64, pages: Vec<u64>) {
        self.round = self.round.saturating_add(1);
        self.summary.rounds = self.round;
        self.round_pages = pages;
        self.cursor = 0;
        self.round_start = now;
        self.round_bytes = 0;
        self.round_sent = 0;
    }

    /// Sends the next batch of `round_pages` from `cursor`.
    fn send_batch(&mut self, guest: &impl SourceGuest) -> Result<(), GuestError> {
        let end = self
            .cursor
            .saturating_add(self.config.batch_pages)
            .min(self.round_pages.len());
        let mut pages = Vec::with_capacity(end - self.cursor);
        // Each page is classified where it lies; a raw one is read again only when the driver
        // encodes the batch (see `crate::pending`), so it is copied once on its way out.
        let mut bytes = (HEADER_LEN + 8) as u64;
        for &page in self.round_pages.get(self.cursor..end).unwrap_or(&[]) {
            let pending = match compact_encoding(guest.page(page)?, self.caps) {
                None => {
                    self.summary.pages_raw += 1;
                    PendingPage::InGuest(page)
                }
                Some(encoding) => {
                    match encoding {
                        PageEncoding::Raw(_) => self.summary.pages_raw += 1,
                        PageEncoding::Zero => self.summary.pages_zero += 1,
                        PageEncoding::Compressed(_) => self.summary.pages_compressed += 1,
                    }
                    PendingPage::Encoded(PageEntry { page, encoding })
                }
            };
            bytes += pending.wire_len() as u64;
            pages.push(pending);
        }
        let count = (end - self.cursor) as u64;
        self.cursor = end;
        self.round_bytes += bytes;
        self.round_sent += count;
        self.summary.bytes_sent += bytes;
        self.out.push_back(Output::SendPages(PendingBatch {
            round: self.round,
            pages,
        }));
        Ok(())
    }

    fn end_round(&mut self, now: u64, guest: &mut impl SourceGuest) {
        let dirty = match guest.harvest_dirty() {
            Ok(d) => sorted_unique(d),
            Err(e) => {
                self.local_failure(now, e);
                return;
            }
        };
        self.out
            .push_back(Output::Send(Message::RoundMarker(RoundMarker {
                round: self.round,
                pages_sent: self.round_sent,
                dirty_remaining: dirty.len() as u64,
            })));
        self.summary.bytes_sent += (HEADER_LEN + 20) as u64;
        let elapsed = now.saturating_sub(self.round_start);
        self.last_dirty = dirty.len() as u64;
        if elapsed > 0 {
            self.last_dirty_rate = Some(
                u64::try_from(u128::from(self.last_dirty) * 1_000_000 / u128::from(elapsed))
                    .unwrap_or(u64::MAX),
            );
        }
        let decision = self.policy.end_round(crate::policy::RoundStats {
            bytes_sent: self.round_bytes,
            elapsed_us: now.saturating_sub(self.round_start),
            pages_dirty: dirty.len() as u64,
        });
        match decision {
            Decision::Continue => self.begin_round(now, dirty),
            Decision::Throttle(level) => {
                self.throttled = true;
                self.out
                    .push_back(Output::Do(SourceAction::SetThrottle(level)));
                self.begin_round(now, dirty);
            }
            Decision::Switchover(_) => {
                self.pending = dirty;
                self.paused = true;
                self.out.push_back(Output::Do(SourceAction::PauseVm));
                self.wait(SourceState::Pausing, now, self.config.timeouts.pause_us);
            }
        }
    }

    /// The vCPU and device state, after the final pages (the VM is paused).
    fn send_state(&mut self, guest: &mut impl SourceGuest) -> Result<(), GuestError> {
        for (index, bytes) in guest.save_vcpus()?.into_iter().enumerate() {
            let vcpu = u32::try_from(index).map_err(|_| GuestError::Failed("too many vCPUs"))?;
            self.summary.bytes_sent += (HEADER_LEN + 8 + bytes.len()) as u64;
            let message = checked(Message::VcpuState(VcpuStateMsg { vcpu, bytes }))?;
            self.out.push_back(Output::Send(message));
        }
        for (device, bytes) in guest.save_devices()? {
            self.summary.bytes_sent += (HEADER_LEN + 8 + bytes.len()) as u64;
            let message = checked(Message::DeviceState(DeviceStateMsg { device, bytes }))?;
            self.out.push_back(Output::Send(message));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Failure;

    struct Guest;

    impl SourceGuest for Guest {
        fn page_count(&self) -> u64 {
            2
        }
        fn page(&self, _page: u64) -> Result<&[u8; PAGE_SIZE], GuestError> {
            Ok(&crate::message::ZERO_PAGE)
        }
        fn harvest_dirty(&mut self) -> Result<Vec<u64>, GuestError> {
            Ok(Vec::new())
        }
        fn save_vcpus(&mut self) -> Result<Vec<Vec<u8>>, GuestError> {
            // Not a vmx encoding: the source must refuse to send it.
            Ok(alloc::vec![alloc::vec![1, 2, 3]])
        }
        fn save_devices(&mut self) -> Result<Vec<(u32, Vec<u8>)>, GuestError> {
            Ok(Vec::new())
        }
    }

    fn config() -> SourceConfig {
        SourceConfig {
            node_name: "node1".to_string(),
            capabilities: Capabilities::KNOWN,
            cpu_vendor: CpuVendor::Amd,
            cpu_features: 0,
            vm: VmConfig {
                name: "vm".to_string(),
                mem_bytes: 2 * PAGE_SIZE as u64,
                vcpus: 1,
                dirty_rate: 0,
                hot_pages: 0,
                mac: [2; 6],
                disk: None,
            },
            policy: PolicyConfig::default(),
            timeouts: Timeouts::default(),
            batch_pages: 8,
        }
    }

    fn drain(s: &mut Source) -> Vec<Output<SourceAction>> {
        core::iter::from_fn(|| s.poll_output()).collect()
    }

    fn peer_hello() -> Message {
        Message::Hello(Hello {
            min_version: crate::frame::PROTOCOL_VERSION,
            max_version: crate::frame::PROTOCOL_VERSION,
            node_name: "node2".to_string(),
            capabilities: Capabilities::KNOWN,
            cpu_vendor: CpuVendor::Intel,
            cpu_features: 0,
        })
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let mut c = config();
        c.batch_pages = 0;
        assert_eq!(
            Source::new(c).map(|_| ()),
            Err(SourceError::BatchPages { value: 0 })
        );
        let mut c = config();
        c.vm.mem_bytes = 0;
        assert!(matches!(Source::new(c), Err(SourceError::Message(_))));
        let mut c = config();
        c.policy.max_rounds = 0;
        assert!(matches!(Source::new(c), Err(SourceError::Policy(_))));
    }

    #[test]
    fn handshake_waits_time_out_and_leave_the_vm_alone() {
        let mut s = Source::new(config()).unwrap();
        s.start(0);
        drain(&mut s);
        s.on_tick(Timeouts::default().handshake_us, &mut Guest);
        assert_eq!(s.state(), SourceState::Failed);
        let out = drain(&mut s);
        // Only the abort goes out: nothing was paused or throttled.
        assert_eq!(out.len(), 1);
        assert!(
            matches!(&out[0], Output::Send(Message::Abort(a)) if a.reason == AbortReason::Timeout)
        );
    }

    #[test]
    fn the_hello_times_the_round_trip_the_policy_counts_into_the_pause() {
        let mut s = Source::new(config()).unwrap();
        s.start(0);
        // The connection opened only at 5 ms: the round trip runs from when the hello left.
        s.on_bytes_sent(5_000);
        s.on_bytes_sent(6_000);
        s.on_message(7_500, peer_hello(), &mut Guest);
        assert_eq!(s.state(), SourceState::AwaitConfigReply);
        assert_eq!(s.policy().fixed_pause_us(), 2_500);
    }

    #[test]
    fn incompatible_version_aborts() {
        let mut s = Source::new(config()).unwrap();
        s.start(0);
        drain(&mut s);
        s.on_message(
            1,
            Message::Hello(Hello {
                min_version: crate::frame::PROTOCOL_VERSION + 1,
                max_version: crate::frame::PROTOCOL_VERSION + 2,
                node_name: String::new(),
                capabilities: Capabilities::KNOWN,
                cpu_vendor: CpuVendor::Intel,
                cpu_features: 0,
            }),
            &mut Guest,
        );
        assert!(matches!(
            s.failure(),
            Some(Failure::Aborted {
                reason: AbortReason::ProtocolError,
                ..
            })
        ));
    }

    /// Runs a source with a silent peer up to the pause.
    fn paused_source() -> Source {
        let mut s = Source::new(config()).unwrap();
        s.start(0);
        s.on_message(1, peer_hello(), &mut Guest);
        s.on_message(2, Message::VmConfigReply(ConfigReply::Accept), &mut Guest);
        for t in 3..10 {
            s.on_tick(t, &mut Guest);
        }
        assert_eq!(s.state(), SourceState::Pausing);
        drain(&mut s);
        s
    }

    #[test]
    fn pause_timeout_resumes_the_vm() {
        let mut s = paused_source();
        s.on_tick(9 + Timeouts::default().pause_us, &mut Guest);
        let out = drain(&mut s);
        assert_eq!(out.last(), Some(&Output::Do(SourceAction::ResumeVm)));
        assert_eq!(s.state(), SourceState::Failed);
    }

    #[test]
    fn unsendable_vcpu_state_aborts_and_resumes() {
        let mut s = paused_source();
        s.on_paused(10, &mut Guest);
        assert_eq!(s.state(), SourceState::FinalCopy);
        // Two pages in one batch, then the state, which cannot be sent.
        s.on_tick(11, &mut Guest);
        s.on_tick(12, &mut Guest);
        assert_eq!(s.state(), SourceState::Failed);
        let out = drain(&mut s);
        assert_eq!(out.last(), Some(&Output::Do(SourceAction::ResumeVm)));
        assert!(!out.contains(&Output::Send(Message::Commit)));
    }

    #[test]
    fn in_doubt_resolves_either_way() {
        for committed in [false, true] {
            let mut s = paused_source();
            s.state = SourceState::AwaitCommitAck;
            s.deadline = Some(100);
            s.on_tick(100, &mut Guest);
            assert_eq!(s.state(), SourceState::InDoubt);
            assert_eq!(
                drain(&mut s).last(),
                Some(&Output::Do(SourceAction::ResolveInDoubt))
            );
            s.resolve_in_doubt(101, committed);
            let expected = if committed {
                SourceAction::DestroyVm
            } else {
                SourceAction::ResumeVm
            };
            assert_eq!(drain(&mut s).last(), Some(&Output::Do(expected)));
        }
    }
}
