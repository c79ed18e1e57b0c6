//! The receiving side of a migration, as a sans-IO state machine (see [`crate::machine`]).
//!
//! ```text
//! AwaitHello -Hello-> AwaitConfig -VmConfig, admitted-> Receiving (batches, round markers)
//!   Receiving -Switchover-> Final (final batches, vCPU and device state)
//!   Final -Commit-> [TakingDisk (TakeDisk) -disk taken->] Done (ResumeVm, CommitAck,
//!   AnnounceMac)
//! ```
//!
//! A VM with a shared disk (`VmConfig::disk`) is resumed only once this node holds the
//! disk's reservation ([`DestinationAction::TakeDisk`], answered by
//! [`Destination::on_disk_taken`]): from then on the source's writes are refused by the
//! target, so the VM can never be written from two nodes. A takeover that fails or times out
//! aborts the migration before the VM runs here (the source then reclaims the disk).
//!
//! The commit point is the `Commit` message: before it, any failure (abort, timeout, malformed or
//! out-of-order message, local error) discards the copy and ends in `Failed`, so the VM never runs
//! here; on it, the VM resumes here and the acknowledgement is sent exactly once. Messages after
//! `Done` are ignored: the VM is ours and an abort can no longer take it back.
//!
//! Stream rules checked here (the message layer checks each message alone): page batches and
//! round markers carry the current round number, rounds advance by one at each marker, pages lie
//! inside the configured memory, each vCPU's state arrives once and all of them before `Commit`.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::machine::{version_compatible, Failure, GuestError, Output, Timeouts};
use crate::message::{
    decompress_page_into, AbortReason, Capabilities, ConfigReply, CpuVendor, Hello, Message,
    MessageError, PageBatchView, PageData, RefuseReason, VmConfig, PAGE_SIZE, ZERO_PAGE,
};

/// The destination's view of the VM it builds.
pub trait DestinationHost {
    /// Checks that this node can take the VM (name free, memory, CPU compatible with the
    /// source's `peer` hello) and creates it, empty and not running. Refusing creates nothing.
    fn admit(&mut self, config: &VmConfig, peer: &Hello) -> Result<(), RefuseReason>;
    /// Writes one page of the new VM's memory.
    fn write_page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), GuestError>;
    /// Loads one vCPU's encoded state.
    fn load_vcpu(&mut self, vcpu: u32, state: &[u8]) -> Result<(), GuestError>;
    /// Loads one device model's state.
    fn load_device(&mut self, device: u32, state: &[u8]) -> Result<(), GuestError>;
}

/// What the destination asks its driver to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationAction {
    /// Run the migrated VM: it is ours now.
    ResumeVm,
    /// Drop the partly built VM (the migration failed).
    DiscardCopy,
    /// Announce the VM's MAC on the cluster network (gratuitous ARP/RARP).
    AnnounceMac([u8; 6]),
    /// Take the VM's shared disk over (register this node, preempt the source's reservation),
    /// then call [`Destination::on_disk_taken`].
    TakeDisk,
}

/// Where the destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationState {
    AwaitHello,
    AwaitConfig,
    Receiving,
    Final,
    /// Everything arrived and the source committed; waiting for the disk's reservation.
    TakingDisk,
    Done,
    Failed,
}

/// The destination's settings.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub node_name: String,
    pub capabilities: Capabilities,
    pub cpu_vendor: CpuVendor,
    pub cpu_features: u64,
    pub timeouts: Timeouts,
}

/// The receiving side of one migration.
#[derive(Debug)]
pub struct Destination {
    config: DestinationConfig,
    state: DestinationState,
    out: VecDeque<Output<DestinationAction>>,
    deadline: Option<u64>,
    peer: Option<Hello>,
    vm: Option<VmConfig>,
    round: u32,
    vcpus_loaded: Vec<bool>,
    failure: Option<Failure>,
    pages_received: u64,
}

fn hello_of(config: &DestinationConfig) -> Hello {
    crate::machine::hello(
        &config.node_name,
        config.capabilities,
        config.cpu_vendor,
        config.cpu_features,
    )
}

impl Destination {
    /// A destination for a connection accepted at `now`, waiting for the source's hello.
    /// Refuses a configuration whose hello could not be sent (node name too long).
    pub fn new(config: DestinationConfig, now: u64) -> Result<Self, MessageError> {
        Message::Hello(hello_of(&config)).encode_payload(&mut Vec::new())?;
        let deadline = Some(now.saturating_add(config.timeouts.handshake_us));
        Ok(Self {
            config,
            state: DestinationState::AwaitHello,
            out: VecDeque::new(),
            deadline,
            peer: None,
            vm: None,
            round: 1,
            vcpus_loaded: Vec::new(),
            failure: None,
            pages_received: 0,
        })
    }

    pub fn state(&self) -> DestinationState {
        self.state
    }

    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// The configuration of the VM being received, once admitted.
    pub fn vm(&self) -> Option<&VmConfig> {
        self.vm.as_ref()
    }

    /// Pages written so far (all rounds).
    pub fn pages_received(&self) -> u64 {
        self.pages_received
    }

    /// The next output to perform, in order.
    pub fn poll_output(&mut self) -> Option<Output<DestinationAction>> {
        self.out.pop_front()
    }

    /// Fires the deadline of the current wait.
    pub fn on_tick(&mut self, now: u64) {
        if self.deadline.is_some_and(|d| now >= d) {
            let text = alloc::format!("timed out in state {:?}", self.state);
            self.abort(AbortReason::Timeout, text, false);
        }
    }

    /// The answer to [`DestinationAction::TakeDisk`]: this node holds the disk now, or why
    /// it could not take it.
    pub fn on_disk_taken(&mut self, result: Result<(), String>) {
        if self.state != DestinationState::TakingDisk {
            return;
        }
        match result {
            Ok(()) => self.commit(),
            Err(why) => {
                let text = alloc::format!("disk takeover: {why}");
                self.abort(AbortReason::LocalFailure, text, false);
            }
        }
    }

    /// The commit point: the VM runs here from now on.
    fn commit(&mut self) {
        self.state = DestinationState::Done;
        self.deadline = None;
        self.out.push_back(Output::Do(DestinationAction::ResumeVm));
        self.out.push_back(Output::Send(Message::CommitAck));
        if let Some(vm) = &self.vm {
            self.out
                .push_back(Output::Do(DestinationAction::AnnounceMac(vm.mac)));
        }
    }

    /// A failure the driver saw: transport error, undecodable frame.
    pub fn fail(&mut self, reason: AbortReason, text: &str) {
        self.abort(reason, text.to_string(), false);
    }

    /// Handles a message from the source.
    pub fn on_message(&mut self, now: u64, message: Message, host: &mut impl DestinationHost) {
        if matches!(
            self.state,
            DestinationState::Done | DestinationState::Failed
        ) {
            return;
        }
        if let Message::Abort(abort) = message {
            self.abort(abort.reason, abort.text, true);
            return;
        }
        if let Err((reason, text)) = self.handle(now, message, host) {
            self.abort(reason, text, false);
        }
    }

    fn handle(
        &mut self,
        now: u64,
        message: Message,
        host: &mut impl DestinationHost,
    ) -> Result<(), (AbortReason, String)> {
        let local = |e: GuestError| (AbortReason::LocalFailure, alloc::format!("{e}"));
        let protocol = |text: String| (AbortReason::ProtocolError, text);
        match (self.state, message) {
            (DestinationState::AwaitHello, Message::Hello(hello)) => {
                if !version_compatible(hello.min_version, hello.max_version) {
                    return Err(protocol("no common protocol version".to_string()));
                }
                self.out
                    .push_back(Output::Send(Message::Hello(hello_of(&self.config))));
                self.peer = Some(hello);
                self.wait(
                    DestinationState::AwaitConfig,
                    now,
                    self.config.timeouts.handshake_us,
                );
            }
            (DestinationState::AwaitConfig, Message::VmConfig(config)) => {
                let Some(peer) = self.peer.as_ref() else {
                    return Err(protocol("configuration before hello".to_string()));
                };
                match host.admit(&config, peer) {
                    Ok(()) => {
                        self.vcpus_loaded = vec![false; config.vcpus as usize];
                        self.vm = Some(config);
                        self.out
                            .push_back(Output::Send(Message::VmConfigReply(ConfigReply::Accept)));
                        self.wait(
                            DestinationState::Receiving,
                            now,
                            self.config.timeouts.idle_us,
                        );
                    }
                    Err(reason) => {
                        // Refused before anything was created: nothing to discard.
                        self.out.push_back(Output::Send(Message::VmConfigReply(
                            ConfigReply::Refuse(reason.clone()),
                        )));
                        self.state = DestinationState::Failed;
                        self.deadline = None;
                        self.failure = Some(Failure::Refused(reason));
                    }
                }
            }
            (_, Message::PageBatch(batch)) => {
                self.receive_pages(
                    now,
                    batch.round,
                    batch.entries.iter().map(|e| (e.page, e.data())),
                    host,
                )?;
            }
            (DestinationState::Receiving, Message::RoundMarker(marker)) => {
                if marker.round != self.round {
                    return Err(protocol(alloc::format!(
                        "round marker {} in round {}",
                        marker.round,
                        self.round
                    )));
                }
                self.round = self.round.saturating_add(1);
                self.deadline = Some(now.saturating_add(self.config.timeouts.idle_us));
            }
            (DestinationState::Receiving, Message::Switchover) => {
                self.wait(DestinationState::Final, now, self.config.timeouts.idle_us);
            }
            (DestinationState::Final, Message::VcpuState(v)) => {
                let slot = self
                    .vcpus_loaded
                    .get_mut(v.vcpu as usize)
                    .ok_or_else(|| local(GuestError::NoSuchVcpu { vcpu: v.vcpu }))?;
                if *slot {
                    return Err(protocol(alloc::format!("vCPU {} state sent twice", v.vcpu)));
                }
                host.load_vcpu(v.vcpu, &v.bytes).map_err(local)?;
                *slot = true;
                self.deadline = Some(now.saturating_add(self.config.timeouts.idle_us));
            }
            (DestinationState::Final, Message::DeviceState(d)) => {
                host.load_device(d.device, &d.bytes).map_err(local)?;
                self.deadline = Some(now.saturating_add(self.config.timeouts.idle_us));
            }
            (DestinationState::Final, Message::Commit) => {
                if !self.vcpus_loaded.iter().all(|&loaded| loaded) {
                    return Err(protocol("commit before every vCPU state".to_string()));
                }
                if self.vm.as_ref().is_some_and(|vm| vm.disk.is_some()) {
                    self.out.push_back(Output::Do(DestinationAction::TakeDisk));
                    self.wait(
                        DestinationState::TakingDisk,
                        now,
                        self.config.timeouts.disk_us,
                    );
                } else {
                    self.commit();
                }
            }
            (state, other) => {
                return Err(protocol(alloc::format!(
                    "unexpected {:?} in state {state:?}",
                    other.kind()
                )));
            }
        }
        Ok(())
    }

    /// Handles a page batch read in place from the received frame (see
    /// [`crate::link::FrameLink::next_incoming`]): the same as [`on_message`](Self::on_message)
    /// with the decoded batch, without copying the pages out of the frame first.
    pub fn on_page_batch(
        &mut self,
        now: u64,
        batch: &PageBatchView<'_>,
        host: &mut impl DestinationHost,
    ) {
        if matches!(
            self.state,
            DestinationState::Done | DestinationState::Failed
        ) {
            return;
        }
        if let Err((reason, text)) = self.receive_pages(now, batch.round, batch.pages(), host) {
            self.abort(reason, text, false);
        }
    }

    /// Writes the pages of a batch of `round` into the VM, if the state takes pages.
    fn receive_pages<'a>(
        &mut self,
        now: u64,
        round: u32,
        pages: impl Iterator<Item = (u64, PageData<'a>)>,
        host: &mut impl DestinationHost,
    ) -> Result<(), (AbortReason, String)> {
        if !matches!(
            self.state,
            DestinationState::Receiving | DestinationState::Final
        ) {
            return Err((
                AbortReason::ProtocolError,
                alloc::format!("unexpected PageBatch in state {:?}", self.state),
            ));
        }
        if round != self.round {
            return Err((
                AbortReason::ProtocolError,
                alloc::format!("page batch of round {round} in round {}", self.round),
            ));
        }
        let limit = self
            .vm
            .as_ref()
            .map_or(0, |vm| vm.mem_bytes / PAGE_SIZE as u64);
        // Raw pages are written from where they lie and zero pages from one static page, with no
        // copy in between; compressed pages are decoded into one buffer per batch.
        let mut scratch: Option<Box<[u8; PAGE_SIZE]>> = None;
        for (page, encoded) in pages {
            if page >= limit {
                return Err((
                    AbortReason::ProtocolError,
                    alloc::format!("page {page} beyond the VM's {limit} pages"),
                ));
            }
            let data: &[u8; PAGE_SIZE] = match encoded {
                PageData::Raw(bytes) => bytes,
                PageData::Zero => &ZERO_PAGE,
                PageData::Compressed(bytes) => {
                    let buffer = scratch.get_or_insert_with(|| Box::new([0; PAGE_SIZE]));
                    decompress_page_into(bytes, buffer)
                        .map_err(|e| (AbortReason::ProtocolError, alloc::format!("{e}")))?;
                    buffer
                }
            };
            host.write_page(page, data)
                .map_err(|e| (AbortReason::LocalFailure, alloc::format!("{e}")))?;
            self.pages_received += 1;
        }
        self.deadline = Some(now.saturating_add(self.config.timeouts.idle_us));
        Ok(())
    }

    fn wait(&mut self, state: DestinationState, now: u64, timeout: u64) {
        self.state = state;
        self.deadline = Some(now.saturating_add(timeout));
    }

    fn abort(&mut self, reason: AbortReason, text: String, by_peer: bool) {
        if matches!(
            self.state,
            DestinationState::Done | DestinationState::Failed
        ) {
            return;
        }
        if !by_peer {
            self.out
                .push_back(Output::Send(crate::machine::abort_message(reason, &text)));
        }
        if self.vm.is_some() {
            self.out
                .push_back(Output::Do(DestinationAction::DiscardCopy));
        }
        self.state = DestinationState::Failed;
        self.deadline = None;
        self.failure = Some(Failure::Aborted {
            by_peer,
            reason,
            text,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{PageBatch, PageEncoding, PageEntry, RoundMarker};
    use alloc::boxed::Box;

    #[derive(Default)]
    struct Host {
        pages: u64,
    }

    impl DestinationHost for Host {
        fn admit(&mut self, config: &VmConfig, _peer: &Hello) -> Result<(), RefuseReason> {
            self.pages = config.mem_bytes / PAGE_SIZE as u64;
            Ok(())
        }
        fn write_page(&mut self, page: u64, _data: &[u8; PAGE_SIZE]) -> Result<(), GuestError> {
            if page < self.pages {
                Ok(())
            } else {
                Err(GuestError::PageOutOfRange { page })
            }
        }
        fn load_vcpu(&mut self, _vcpu: u32, _state: &[u8]) -> Result<(), GuestError> {
            Ok(())
        }
        fn load_device(&mut self, _device: u32, _state: &[u8]) -> Result<(), GuestError> {
            Ok(())
        }
    }

    fn config() -> DestinationConfig {
        DestinationConfig {
            node_name: "node2".to_string(),
            capabilities: Capabilities::KNOWN,
            cpu_vendor: CpuVendor::Intel,
            cpu_features: 0,
            timeouts: Timeouts::default(),
        }
    }

    fn hello() -> Message {
        Message::Hello(Hello {
            min_version: crate::frame::PROTOCOL_VERSION,
            max_version: crate::frame::PROTOCOL_VERSION,
            node_name: "node1".to_string(),
            capabilities: Capabilities::KNOWN,
            cpu_vendor: CpuVendor::Amd,
            cpu_features: 0,
        })
    }

    /// A destination that accepted a 4-page VM with 1 vCPU.
    fn receiving(host: &mut Host) -> Destination {
        let mut d = Destination::new(config(), 0).unwrap();
        d.on_message(0, hello(), host);
        d.on_message(
            0,
            Message::VmConfig(VmConfig {
                name: "vm".to_string(),
                mem_bytes: 4 * PAGE_SIZE as u64,
                vcpus: 1,
                dirty_rate: 0,
                hot_pages: 0,
                mac: [2; 6],
                disk: None,
            }),
            host,
        );
        assert_eq!(d.state(), DestinationState::Receiving);
        while d.poll_output().is_some() {}
        d
    }

    fn drain(d: &mut Destination) -> Vec<Output<DestinationAction>> {
        core::iter::from_fn(|| d.poll_output()).collect()
    }

    fn is_abort(o: &Output<DestinationAction>, want: AbortReason) -> bool {
        matches!(o, Output::Send(Message::Abort(a)) if a.reason == want)
    }

    #[test]
    fn out_of_order_message_aborts_and_discards() {
        let mut host = Host::default();
        let mut d = receiving(&mut host);
        d.on_message(1, Message::Commit, &mut host);
        let out = drain(&mut d);
        assert!(is_abort(&out[0], AbortReason::ProtocolError));
        assert_eq!(out[1], Output::Do(DestinationAction::DiscardCopy));
        assert_eq!(d.state(), DestinationState::Failed);
        // Terminal: later messages are ignored.
        d.on_message(2, Message::Switchover, &mut host);
        assert!(drain(&mut d).is_empty());
    }

    #[test]
    fn message_before_hello_aborts_without_a_copy() {
        let mut d = Destination::new(config(), 0).unwrap();
        d.on_message(0, Message::Switchover, &mut Host::default());
        let out = drain(&mut d);
        assert_eq!(out.len(), 1);
        assert!(is_abort(&out[0], AbortReason::ProtocolError));
    }

    /// A batch read in place is handled exactly like the same batch decoded: same pages
    /// written, same refusals (wrong round, page beyond memory, wrong state).
    #[test]
    fn page_batches_read_in_place_behave_like_decoded_ones() {
        let payload = |round: u32, page: u64| {
            let message = Message::PageBatch(PageBatch {
                round,
                entries: vec![PageEntry {
                    page,
                    encoding: PageEncoding::Raw(Box::new([1; PAGE_SIZE])),
                }],
            });
            let mut frame = Vec::new();
            message.encode(&mut frame).unwrap();
            frame[crate::frame::HEADER_LEN..].to_vec()
        };
        let good = payload(1, 3);
        let mut host = Host::default();
        let mut d = receiving(&mut host);
        d.on_page_batch(1, &PageBatchView::parse(&good).unwrap(), &mut host);
        assert_eq!(d.pages_received(), 1);
        assert_eq!(d.state(), DestinationState::Receiving);
        for bad in [payload(2, 0), payload(1, 4)] {
            let mut host = Host::default();
            let mut d = receiving(&mut host);
            d.on_page_batch(1, &PageBatchView::parse(&bad).unwrap(), &mut host);
            assert_eq!(d.state(), DestinationState::Failed);
            assert!(is_abort(&drain(&mut d)[0], AbortReason::ProtocolError));
        }
        // Before the VM configuration, pages are out of order.
        let mut d = Destination::new(config(), 0).unwrap();
        d.on_page_batch(0, &PageBatchView::parse(&good).unwrap(), &mut host);
        assert_eq!(d.state(), DestinationState::Failed);
    }

    #[test]
    fn wrong_round_and_pages_outside_memory_are_refused() {
        let batch = |round, page| {
            Message::PageBatch(PageBatch {
                round,
                entries: vec![PageEntry {
                    page,
                    encoding: PageEncoding::Raw(Box::new([1; PAGE_SIZE])),
                }],
            })
        };
        for bad in [
            batch(2, 0),
            batch(1, 4),
            Message::RoundMarker(RoundMarker {
                round: 3,
                pages_sent: 0,
                dirty_remaining: 0,
            }),
        ] {
            let mut host = Host::default();
            let mut d = receiving(&mut host);
            d.on_message(1, batch(1, 3), &mut host);
            assert_eq!(d.pages_received(), 1);
            d.on_message(1, bad, &mut host);
            assert_eq!(d.state(), DestinationState::Failed);
        }
    }

    #[test]
    fn every_wait_times_out() {
        let mut d = Destination::new(config(), 0).unwrap();
        d.on_tick(Timeouts::default().handshake_us - 1);
        assert_eq!(d.state(), DestinationState::AwaitHello);
        d.on_tick(Timeouts::default().handshake_us);
        assert_eq!(d.state(), DestinationState::Failed);

        let mut host = Host::default();
        let mut d = receiving(&mut host);
        d.on_message(5, Message::Switchover, &mut host);
        d.on_tick(5 + Timeouts::default().idle_us);
        let out = drain(&mut d);
        assert!(is_abort(&out[0], AbortReason::Timeout));
        assert_eq!(out[1], Output::Do(DestinationAction::DiscardCopy));
    }

    #[test]
    fn commit_needs_every_vcpu_and_is_acknowledged_once() {
        let mut host = Host::default();
        let mut d = receiving(&mut host);
        d.on_message(1, Message::Switchover, &mut host);
        let mut blob = b"VCPU".to_vec();
        blob.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        let vcpu = Message::VcpuState(crate::message::VcpuStateMsg {
            vcpu: 0,
            bytes: blob,
        });
        d.on_message(1, vcpu, &mut host);
        d.on_message(1, Message::Commit, &mut host);
        assert_eq!(
            drain(&mut d),
            [
                Output::Do(DestinationAction::ResumeVm),
                Output::Send(Message::CommitAck),
                Output::Do(DestinationAction::AnnounceMac([2; 6])),
            ]
        );
        // A repeated commit, or an abort after the commit, changes nothing.
        d.on_message(2, Message::Commit, &mut host);
        d.fail(AbortReason::TransportError, "late");
        assert!(drain(&mut d).is_empty());
        assert_eq!(d.state(), DestinationState::Done);

        let mut d = receiving(&mut host);
        d.on_message(1, Message::Switchover, &mut host);
        d.on_message(1, Message::Commit, &mut host);
        assert_eq!(d.state(), DestinationState::Failed);
    }

    #[test]
    fn long_node_name_is_refused_up_front() {
        let mut c = config();
        c.node_name = "n".repeat(crate::message::MAX_NAME_LEN + 1);
        assert!(matches!(
            Destination::new(c, 0),
            Err(MessageError::TooLong { .. })
        ));
    }
}
