//! The disk workload: when the VM has a virtio-blk disk, keep writing self-describing blocks
//! (`guest_abi::disk`) over a window of it, remember the generation of every write the device
//! acknowledged, and on request read everything back and check it.
//!
//! Each pass of the guest's main loop reaps completions and starts at most
//! [`WRITES_PER_PASS`] writes, paced to [`WRITES_PER_SEC`], so the heartbeat and the memory
//! checks keep their rhythm. A generation is a global write counter (1, 2, ...), so every write
//! of a block is distinguishable from every other, even after a failed write left the block
//! in doubt. The table entry of a block changes only when its write completes with OK: a
//! verification then proves that no acknowledged write was lost (or misplaced, or torn).
//! Every [`FLUSH_EVERY`] acknowledged writes a FLUSH goes out too.

use guest_abi::disk::{
    check_block, fill_block, window_blocks, BlockMismatch, DiskDigest, MAX_WINDOW_BLOCKS,
    SECTORS_PER_BLOCK,
};

use crate::virtio_blk::{Op, VirtioBlk, SLOTS, SLOT_BUFFER, STATUS_OK};

/// Writes started per pass of the main loop at most.
pub const WRITES_PER_PASS: u64 = 2;
/// Pace of the writes.
pub const WRITES_PER_SEC: u64 = 200;
/// A FLUSH after this many acknowledged writes.
pub const FLUSH_EVERY: u64 = 256;
/// Blocks per verification read (one slot buffer).
const READ_BLOCKS: u64 = (SLOT_BUFFER / 4096) as u64;
/// A generation-table entry for a block whose last write failed: its contents are unknown
/// until the next write succeeds, and it is left out of verifications and digests.
const IN_DOUBT: u32 = u32::MAX;
/// Longest wait for requests in flight, in seconds of guest time.
const DRAIN_SECS: u64 = 30;

/// The generation each block of the window must hold (0: not written this boot).
static mut GENERATIONS: [u32; MAX_WINDOW_BLOCKS as usize] = [0; MAX_WINDOW_BLOCKS as usize];

/// What a slot is doing.
#[derive(Debug, Clone, Copy)]
enum Job {
    Idle,
    Write { block: u64, generation: u32 },
    Flush,
    Read { first: u64, count: u64 },
}

/// How a verification went.
pub enum Verdict {
    Ok {
        digest: DiskDigest,
    },
    Mismatch {
        lba: u64,
        expected: u32,
        found: BlockMismatch,
    },
    ReadError {
        lba: u64,
        status: u8,
    },
    /// Requests did not complete in time, or the device broke.
    Stuck {
        in_flight: usize,
    },
}

pub struct DiskWorkload {
    blk: VirtioBlk,
    window: u64,
    jobs: [Job; SLOTS],
    cursor: u64,
    /// Writes started (the last generation used).
    issued: u64,
    /// Writes the device acknowledged with OK.
    acked: u64,
    /// Requests that completed with another status.
    errors: u64,
    held: bool,
    /// Pacing: writes started since `pace_start` (TSC).
    pace_start: u64,
    paced: u64,
    tsc_hz: u64,
    unflushed: u64,
}

impl DiskWorkload {
    pub fn new(blk: VirtioBlk, now: u64, tsc_hz: u64) -> DiskWorkload {
        let window = window_blocks(blk.capacity_sectors());
        DiskWorkload {
            blk,
            window,
            jobs: [Job::Idle; SLOTS],
            cursor: 0,
            issued: 0,
            acked: 0,
            errors: 0,
            held: false,
            pace_start: now,
            paced: 0,
            tsc_hz,
            unflushed: 0,
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.blk.capacity_sectors()
    }

    pub fn window_blocks(&self) -> u64 {
        self.window
    }

    pub fn io_base(&self) -> u16 {
        self.blk.io_base()
    }

    /// Writes acknowledged.
    pub fn writes(&self) -> u64 {
        self.acked
    }

    /// Requests that failed.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    pub fn broken(&self) -> bool {
        self.blk.broken()
    }

    fn generation(block: u64) -> u32 {
        // SAFETY: block < window <= MAX_WINDOW_BLOCKS (every caller's loop bound); this
        // single-threaded program is the only user of the table.
        unsafe {
            core::ptr::read_volatile((&raw const GENERATIONS as *const u32).add(block as usize))
        }
    }

    fn set_generation(block: u64, generation: u32) {
        // SAFETY: as in `generation`.
        unsafe {
            core::ptr::write_volatile(
                (&raw mut GENERATIONS as *mut u32).add(block as usize),
                generation,
            )
        }
    }

    /// Takes every completion; returns how many there were. Read completions are handed to
    /// `on_read(first block, count, slot, status)` before the slot is reused.
    fn reap(&mut self, on_read: &mut dyn FnMut(&mut VirtioBlk, u64, u64, usize, u8)) -> usize {
        let mut n = 0;
        while let Some((slot, status)) = self.blk.poll() {
            n += 1;
            let job = core::mem::replace(&mut self.jobs[slot], Job::Idle);
            match job {
                Job::Write { block, generation } => {
                    if status == STATUS_OK {
                        Self::set_generation(block, generation);
                        self.acked += 1;
                        self.unflushed += 1;
                    } else {
                        Self::set_generation(block, IN_DOUBT);
                        self.errors += 1;
                    }
                }
                Job::Flush => {
                    if status != STATUS_OK {
                        self.errors += 1;
                    }
                }
                Job::Read { first, count } => on_read(&mut self.blk, first, count, slot, status),
                Job::Idle => {}
            }
        }
        n
    }

    fn write_in_flight(&self, block: u64) -> bool {
        self.jobs
            .iter()
            .any(|j| matches!(j, Job::Write { block: b, .. } if *b == block))
    }

    /// One pass of the main loop: take completions, start the writes the pace allows.
    pub fn pass(&mut self, now: u64) {
        self.reap(&mut |_, _, _, _, _| {});
        if self.held || self.window == 0 || self.blk.broken() {
            return;
        }
        let elapsed = now.saturating_sub(self.pace_start);
        let owed =
            (u128::from(WRITES_PER_SEC) * u128::from(elapsed) / u128::from(self.tsc_hz)) as u64;
        if owed > self.paced + 4 * WRITES_PER_SEC {
            // Far behind (a pause, a long verification): forgive rather than burst.
            self.paced = owed;
        }
        let mut started = 0;
        if self.unflushed >= FLUSH_EVERY {
            if let Some(slot) = self.blk.free_slot() {
                self.blk.submit(slot, Op::Flush, 0, 0);
                self.jobs[slot] = Job::Flush;
                self.unflushed = 0;
                started += 1;
            }
        }
        while self.paced < owed && started < WRITES_PER_PASS {
            let Some(slot) = self.blk.free_slot() else {
                break;
            };
            let block = self.cursor;
            self.cursor = (self.cursor + 1) % self.window;
            if self.write_in_flight(block) {
                // The window is smaller than the slots: wait for that write.
                break;
            }
            self.issued += 1;
            let generation = self.issued as u32;
            let lba = block * SECTORS_PER_BLOCK;
            fill_block(self.blk.block_words(slot, 0), lba, u64::from(generation));
            self.blk.submit(slot, Op::Write, lba, 4096);
            self.jobs[slot] = Job::Write { block, generation };
            self.paced += 1;
            started += 1;
        }
        if started > 0 {
            self.blk.notify();
        }
    }

    /// Waits (HLT between polls) until nothing is in flight; false on timeout or a broken
    /// device.
    fn drain(&mut self, on_read: &mut dyn FnMut(&mut VirtioBlk, u64, u64, usize, u8)) -> bool {
        let deadline = crate::rdtsc() + DRAIN_SECS * self.tsc_hz;
        while self.blk.in_flight() > 0 {
            if self.reap(on_read) == 0 {
                if self.blk.broken() || crate::rdtsc() > deadline {
                    return false;
                }
                crate::halt();
            }
        }
        true
    }

    /// Stops starting writes and waits for those in flight.
    pub fn hold(&mut self) -> bool {
        self.held = true;
        self.drain(&mut |_, _, _, _, _| {})
    }

    /// Whether the workload is held ([`Self::hold`]).
    pub fn held(&self) -> bool {
        self.held
    }

    /// The device, for the disk benchmark: only while held and drained, so that no request of
    /// the workload is in flight (completions of requests it does not know are ignored).
    pub fn device(&mut self) -> &mut VirtioBlk {
        &mut self.blk
    }

    /// Starts writing again (at the normal pace from now on).
    pub fn run(&mut self, now: u64) {
        self.held = false;
        self.pace_start = now;
        self.paced = 0;
    }

    /// Waits for the writes in flight, then reads back every block written this boot and
    /// checks it against its generation.
    pub fn verify(&mut self) -> Verdict {
        if !self.drain(&mut |_, _, _, _, _| {}) {
            return Verdict::Stuck {
                in_flight: self.blk.in_flight(),
            };
        }
        let mut verdict: Option<Verdict> = None;
        let mut check = |blk: &mut VirtioBlk, first: u64, count: u64, slot: usize, status: u8| {
            if verdict.is_some() {
                return;
            }
            if status != STATUS_OK {
                verdict = Some(Verdict::ReadError {
                    lba: first * SECTORS_PER_BLOCK,
                    status,
                });
                return;
            }
            for i in 0..count {
                let block = first + i;
                let expected = Self::generation(block);
                if expected == 0 || expected == IN_DOUBT {
                    continue;
                }
                let lba = block * SECTORS_PER_BLOCK;
                if let Err(found) =
                    check_block(blk.block_words(slot, i as usize), lba, u64::from(expected))
                {
                    verdict = Some(Verdict::Mismatch {
                        lba,
                        expected,
                        found,
                    });
                    return;
                }
            }
        };
        let deadline = crate::rdtsc() + DRAIN_SECS * self.tsc_hz;
        let mut next = 0u64;
        loop {
            // Start reads of every chunk holding a written block, SLOTS at a time.
            let mut started = false;
            while next < self.window {
                let Some(slot) = self.blk.free_slot() else {
                    break;
                };
                let count = READ_BLOCKS.min(self.window - next);
                let written = (next..next + count).any(|b| Self::generation(b) != 0);
                if written {
                    self.blk.submit(
                        slot,
                        Op::Read,
                        next * SECTORS_PER_BLOCK,
                        (count * 4096) as u32,
                    );
                    self.jobs[slot] = Job::Read { first: next, count };
                    started = true;
                }
                next += count;
            }
            if started {
                self.blk.notify();
            }
            if next >= self.window && self.blk.in_flight() == 0 {
                break;
            }
            if self.reap(&mut check) == 0 {
                if self.blk.broken() || crate::rdtsc() > deadline {
                    return Verdict::Stuck {
                        in_flight: self.blk.in_flight(),
                    };
                }
                crate::halt();
            }
        }
        if let Some(v) = verdict {
            return v;
        }
        let mut digest = DiskDigest::default();
        for block in 0..self.window {
            let g = Self::generation(block);
            if g != IN_DOUBT {
                digest.add(block * SECTORS_PER_BLOCK, u64::from(g));
            }
        }
        Verdict::Ok { digest }
    }
}
