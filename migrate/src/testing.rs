//! Test support shared by the crate's unit tests: a seedable random source, a fake source guest
//! (pages plus a dirty log) that keeps writing while it runs, a fake destination host that keeps
//! the memory digest up to date as pages land, the configurations of both ends, an in-memory
//! network of non-blocking pipes with failures to inject, and the failure rule every migration
//! run must satisfy.
//!
//! The dirty log is a small bitset rather than vmx's `DirtyBitmap`: `migrate` must not depend on
//! vmx (see the crate docs), and the state machines only see the `SourceGuest` trait anyway.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use crate::destination::{Destination, DestinationConfig, DestinationHost, DestinationState};
use crate::digest::{content_hash, MemoryDigest, ZERO_PAGE_CONTENT_HASH};
use crate::link::{Pipe, PipeError};
use crate::machine::{GuestError, Timeouts};
use crate::message::{Capabilities, CpuVendor, Hello, RefuseReason, VmConfig, PAGE_SIZE};
use crate::policy::PolicyConfig;
use crate::source::{Source, SourceConfig, SourceGuest, SourceState};

/// The migrated VM's MAC.
pub const MAC: [u8; 6] = [0x52, 0x54, 0, 0xAA, 0xBB, 0xCC];
/// One tick of the simulated clock (µs): the deadlines below count in ticks.
pub const TICK_US: u64 = 1000;

/// A xorshift64* generator: the same seed gives the same run.
pub struct Rng(pub u64);

impl Rng {
    /// The generator of run `seed`: small seeds spread over the state, which is never zero.
    pub fn seeded(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }

    /// A page of random words.
    pub fn page(&mut self) -> Page {
        let mut page: Page = Box::new([0; PAGE_SIZE]);
        for chunk in page.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        page
    }
}

pub type Page = Box<[u8; PAGE_SIZE]>;

/// A guest that is only its pages: never dirty, no vCPU or device state.
pub struct PagesGuest(pub Vec<Page>);

impl SourceGuest for PagesGuest {
    fn page_count(&self) -> u64 {
        self.0.len() as u64
    }
    fn page(&self, page: u64) -> Result<&[u8; PAGE_SIZE], GuestError> {
        self.0
            .get(page as usize)
            .map(|p| &**p)
            .ok_or(GuestError::PageOutOfRange { page })
    }
    fn harvest_dirty(&mut self) -> Result<Vec<u64>, GuestError> {
        Ok(Vec::new())
    }
    fn save_vcpus(&mut self) -> Result<Vec<Vec<u8>>, GuestError> {
        Ok(Vec::new())
    }
    fn save_devices(&mut self) -> Result<Vec<(u32, Vec<u8>)>, GuestError> {
        Ok(Vec::new())
    }
}

/// The fake guest's one vCPU state.
pub fn vcpu_blob() -> Vec<u8> {
    let mut v = b"VCPU".to_vec();
    v.extend_from_slice(&[1, 0, 0, 0]);
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&[9, 8, 7, 6]);
    v
}

/// The fake guest's device states: one UART.
pub fn device_states() -> Vec<(u32, Vec<u8>)> {
    vec![(1, vec![0x16, 0x55, 0x0A])]
}

/// The source's VM: pages of zeros, of one byte or random, and a guest that writes at random.
pub struct FakeGuest {
    pub pages: Vec<Page>,
    /// What the guest itself wrote: the source's memory must always equal it.
    pub expected: Vec<Page>,
    /// One bit a page written since the last harvest.
    dirty: Vec<u64>,
    pub paused: bool,
    pub throttle: u8,
    pub destroyed: bool,
    writes_per_slice: u64,
}

impl FakeGuest {
    /// `pages` pages; each time slice writes up to `writes_per_slice` bytes, fewer when
    /// throttled.
    pub fn new(rng: &mut Rng, pages: usize, writes_per_slice: u64) -> Self {
        let pages: Vec<Page> = (0..pages)
            .map(|_| match rng.below(3) {
                0 => Box::new([0; PAGE_SIZE]),
                1 => Box::new([rng.next_u64() as u8; PAGE_SIZE]),
                _ => rng.page(),
            })
            .collect();
        Self {
            expected: pages.clone(),
            dirty: vec![0; pages.len().div_ceil(64)],
            pages,
            paused: false,
            throttle: 0,
            destroyed: false,
            writes_per_slice,
        }
    }

    pub fn running(&self) -> bool {
        !self.paused && !self.destroyed
    }

    /// The guest's own work: random writes, fewer when throttled.
    pub fn run_slice(&mut self, rng: &mut Rng) {
        if !self.running() {
            return;
        }
        let writes = rng.below(self.writes_per_slice + 1) * u64::from(100 - self.throttle) / 100;
        for _ in 0..writes {
            let page = rng.below(self.pages.len() as u64) as usize;
            let offset = rng.below(PAGE_SIZE as u64) as usize;
            let value = rng.next_u64() as u8;
            self.pages[page][offset] = value;
            self.expected[page][offset] = value;
            self.dirty[page / 64] |= 1 << (page % 64);
        }
    }
}

impl SourceGuest for FakeGuest {
    fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }

    fn page(&self, page: u64) -> Result<&[u8; PAGE_SIZE], GuestError> {
        self.pages
            .get(page as usize)
            .map(|p| &**p)
            .ok_or(GuestError::PageOutOfRange { page })
    }

    fn harvest_dirty(&mut self) -> Result<Vec<u64>, GuestError> {
        let mut out = Vec::new();
        for (w, word) in self.dirty.iter_mut().enumerate() {
            for bit in 0..64 {
                if *word & (1 << bit) != 0 {
                    out.push((w * 64 + bit) as u64);
                }
            }
            *word = 0;
        }
        Ok(out)
    }

    fn save_vcpus(&mut self) -> Result<Vec<Vec<u8>>, GuestError> {
        Ok(vec![vcpu_blob()])
    }

    fn save_devices(&mut self) -> Result<Vec<(u32, Vec<u8>)>, GuestError> {
        Ok(device_states())
    }
}

/// The destination's VM, with the digest kept up to date as pages land, the way the kernel
/// is meant to: one content hash per page, starting from the zeroed VM.
#[derive(Default)]
pub struct FakeHost {
    pub pages: Vec<Page>,
    hashes: Vec<u64>,
    pub digest: MemoryDigest,
    pub created: bool,
    pub resumed: bool,
    pub discarded: bool,
    pub announced: Option<[u8; 6]>,
    pub vcpus: Vec<Vec<u8>>,
    pub devices: Vec<(u32, Vec<u8>)>,
    /// Refuse the VM with this reason.
    pub refuse: Option<RefuseReason>,
    /// Fail the page write with this index (counting from 0).
    pub fail_write_at: Option<u64>,
    writes: u64,
}

impl DestinationHost for FakeHost {
    fn admit(&mut self, config: &VmConfig, _peer: &Hello) -> Result<(), RefuseReason> {
        if let Some(reason) = self.refuse.clone() {
            return Err(reason);
        }
        let pages = config.mem_bytes / PAGE_SIZE as u64;
        self.pages = (0..pages).map(|_| Box::new([0; PAGE_SIZE])).collect();
        self.hashes = vec![ZERO_PAGE_CONTENT_HASH; pages as usize];
        self.digest = MemoryDigest::zeroed(pages);
        self.created = true;
        Ok(())
    }

    fn write_page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), GuestError> {
        if self.fail_write_at == Some(self.writes) {
            return Err(GuestError::Failed("page write failed"));
        }
        self.writes += 1;
        let slot = self
            .pages
            .get_mut(page as usize)
            .ok_or(GuestError::PageOutOfRange { page })?;
        slot.copy_from_slice(data);
        let new = content_hash(data);
        self.digest.replace(page, self.hashes[page as usize], new);
        self.hashes[page as usize] = new;
        Ok(())
    }

    fn load_vcpu(&mut self, _vcpu: u32, state: &[u8]) -> Result<(), GuestError> {
        self.vcpus.push(state.to_vec());
        Ok(())
    }

    fn load_device(&mut self, device: u32, state: &[u8]) -> Result<(), GuestError> {
        self.devices.push((device, state.to_vec()));
        Ok(())
    }
}

/// A policy that converges in a few rounds of a small guest: a downtime target of two ticks,
/// throttling from the second round.
pub fn policy() -> PolicyConfig {
    PolicyConfig {
        downtime_target_us: 2 * TICK_US,
        max_rounds: 20,
        throttle_after_rounds: 1,
        ..PolicyConfig::default()
    }
}

pub fn timeouts() -> Timeouts {
    Timeouts {
        handshake_us: 50 * TICK_US,
        pause_us: 20 * TICK_US,
        idle_us: 50 * TICK_US,
        commit_us: 50 * TICK_US,
        disk_us: 20 * TICK_US,
    }
}

/// node1 (AMD) sends the VM "guest" of `pages` pages, `batch_pages` a batch.
pub fn source_config(pages: usize, batch_pages: usize) -> SourceConfig {
    SourceConfig {
        node_name: "node1".to_string(),
        capabilities: Capabilities::KNOWN,
        cpu_vendor: CpuVendor::Amd,
        cpu_features: 0,
        vm: VmConfig {
            name: "guest".to_string(),
            mem_bytes: (pages * PAGE_SIZE) as u64,
            vcpus: 1,
            dirty_rate: 0,
            hot_pages: 0,
            mac: MAC,
            disk: None,
        },
        policy: policy(),
        timeouts: timeouts(),
        batch_pages,
    }
}

/// node2 (Intel) receives.
pub fn destination_config() -> DestinationConfig {
    DestinationConfig {
        node_name: "node2".to_string(),
        capabilities: Capabilities::KNOWN,
        cpu_vendor: CpuVendor::Intel,
        cpu_features: 0,
        timeouts: timeouts(),
    }
}

/// The failure rule, on a finished migration: either it committed, the destination runs an
/// exact copy (memory, digest, vCPU and device states, MAC announced) and the source destroyed
/// its VM; or it failed on both ends, the source VM runs on, unthrottled and untouched, and the
/// destination discarded the copy it made. `ctx` says which run it was.
pub fn check_outcome(
    source: &Source,
    destination: &Destination,
    guest: &FakeGuest,
    host: &FakeHost,
    ctx: &str,
) {
    match source.state() {
        SourceState::Done => {
            assert_eq!(destination.state(), DestinationState::Done, "{ctx}");
            assert!(host.resumed && !host.discarded, "{ctx}");
            assert!(guest.destroyed, "{ctx}");
            assert!(host.pages == guest.pages, "memory differs: {ctx}");
            let full = MemoryDigest::from_pages(
                guest
                    .pages
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i as u64, &**p)),
            );
            assert_eq!(host.digest, full, "digest differs: {ctx}");
            assert_eq!(host.vcpus, [vcpu_blob()], "{ctx}");
            assert_eq!(host.devices, device_states(), "{ctx}");
            assert_eq!(host.announced, Some(MAC), "{ctx}");
        }
        SourceState::Failed => {
            assert!(source.failure().is_some(), "{ctx}");
            assert!(!host.resumed, "VM runs on both nodes: {ctx}");
            assert!(guest.running(), "source VM not running: {ctx}");
            assert_eq!(guest.throttle, 0, "{ctx}");
            assert!(guest.pages == guest.expected, "{ctx}");
            assert_eq!(destination.state(), DestinationState::Failed, "{ctx}");
            assert_eq!(host.created, host.discarded, "copy kept: {ctx}");
        }
        other => panic!("source ended in {other:?}: {ctx}"),
    }
}

/// One direction of the network.
#[derive(Default)]
pub struct Channel {
    pub bytes: VecDeque<u8>,
    /// What the sender may still put in this step.
    pub credit: usize,
    /// Set by a cut: every call fails, and what was in flight is lost.
    pub cut: bool,
    /// Set by an orderly close: the receiver gets what is in flight, then `Closed`.
    pub closed: bool,
    /// Nothing moves (a peer that stopped reading, a zero window), and nobody is told.
    pub frozen: bool,
}

/// One end of the network, as the [`Pipe`] its machine talks through.
pub struct End<'a> {
    tx: &'a mut Channel,
    rx: &'a mut Channel,
}

impl Pipe for End<'_> {
    /// What the peer has not read yet, like a TCP socket's unacknowledged bytes.
    fn in_flight(&self) -> usize {
        self.tx.bytes.len()
    }

    fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
        if self.tx.cut || self.tx.closed {
            return Err(PipeError::Closed);
        }
        if self.tx.frozen {
            return Ok(0);
        }
        let n = data.len().min(self.tx.credit);
        self.tx.credit -= n;
        self.tx.bytes.extend(&data[..n]);
        Ok(n)
    }

    /// Like a socket's ring: room for the whole frame within this step's credit, or none.
    fn send_in_place(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> Result<bool, PipeError> {
        if self.tx.cut || self.tx.closed {
            return Err(PipeError::Closed);
        }
        if self.tx.frozen || self.tx.credit < len {
            return Ok(false);
        }
        let mut space = alloc::vec![0u8; len];
        if !fill(&mut space) {
            return Ok(false);
        }
        self.tx.credit -= len;
        self.tx.bytes.extend(&space);
        Ok(true)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError> {
        if self.rx.cut {
            return Err(PipeError::Closed);
        }
        if self.rx.frozen {
            return Ok(0);
        }
        let n = buf.len().min(self.rx.bytes.len());
        if n == 0 && self.rx.closed {
            return Err(PipeError::Closed);
        }
        for (slot, byte) in buf.iter_mut().zip(self.rx.bytes.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }

    /// The channel's ring as it lies: its first part, wrapped if a second part follows.
    fn recv_in_place(
        &mut self,
        take: &mut dyn FnMut(transport::Received<'_>) -> usize,
    ) -> Result<usize, PipeError> {
        if self.rx.cut {
            return Err(PipeError::Closed);
        }
        if self.rx.frozen {
            return Ok(0);
        }
        let (first, second) = self.rx.bytes.as_slices();
        if first.is_empty() {
            return if self.rx.closed {
                Err(PipeError::Closed)
            } else {
                Ok(0)
            };
        }
        let n = take(transport::Received {
            bytes: first,
            wrapped: !second.is_empty(),
            capacity: usize::MAX,
        })
        .min(first.len());
        self.rx.bytes.drain(..n);
        Ok(n)
    }
}

/// The connection between the source's node and the destination's. A new one carries nothing
/// (a connection not yet established): give its channels credit.
#[derive(Default)]
pub struct Net {
    pub to_destination: Channel,
    pub to_source: Channel,
}

impl Net {
    /// A connection that takes everything it is given.
    pub fn unlimited() -> Self {
        let mut net = Net::default();
        net.each(|c| c.credit = usize::MAX);
        net
    }

    pub fn source_end(&mut self) -> End<'_> {
        End {
            tx: &mut self.to_destination,
            rx: &mut self.to_source,
        }
    }

    pub fn destination_end(&mut self) -> End<'_> {
        End {
            tx: &mut self.to_source,
            rx: &mut self.to_destination,
        }
    }

    pub fn each(&mut self, f: impl Fn(&mut Channel)) {
        f(&mut self.to_destination);
        f(&mut self.to_source);
    }
}
