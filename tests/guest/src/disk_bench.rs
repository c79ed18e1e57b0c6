//! The disk benchmark (`guest_abi::command::DISK_BENCH`): 4 KiB sequential and random writes
//! and reads over the guest's benchmark region of the disk (`guest_abi::disk::bench_region`,
//! which the self-verifying workload never touches), at queue depth 1 and 8, timed with the
//! guest's TSC.
//!
//! The workload is held (its writes drained) before this runs, so every slot of the driver is
//! the benchmark's. Each measurement starts requests for `BENCH_MILLIS` or until
//! `BENCH_MAX_OPS` were started, keeping `qd` in flight, then waits for those in flight: ops
//! are the completed requests, the time runs from the first submit to the last completion.
//!
//! Every pattern runs twice, once per way of waiting (`BenchWait`): spinning on the used ring
//! without leaving the guest (no HLT, no register read: every port access is an exit; only the
//! device status is read every 10 ms, to notice a broken device), and with a HLT whenever
//! nothing completed and nothing could be started (the vCPU yields until the hypervisor's next
//! slice, as the workload does). Which one a hypervisor serves better says how its device
//! model is driven: a device model that only runs between a vCPU's slices serves a spinning
//! guest only when the guest exits.
//!
//! Nothing fast can come out of a broken path: every write carries a self-describing block
//! (`fill_bench_block`: LBA and a generation unique to this write), the generation a block
//! must hold changes only when its write completes OK, and every read is checked against it
//! (`check_bench_block`). The generations of one run start from the TSC at its start, so
//! blocks left by an earlier run never pass for this run's. Random blocks are drawn among
//! those the sequential writes covered, never one with a write in flight.

use core::fmt::{self, Write};

use guest_abi::disk::{
    bench_random, bench_region, check_bench_block, fill_bench_block, BenchPattern, BenchWait,
    BlockMismatch, BENCH_MAX_OPS, BENCH_MILLIS, BENCH_QUEUE_DEPTHS, BENCH_SEED, BLOCK_BYTES,
    MAX_BENCH_BLOCKS, SECTORS_PER_BLOCK,
};

use crate::rdtsc;
use crate::virtio_blk::{Op, VirtioBlk, SLOTS, STATUS_OK};

/// Longest wait for the requests in flight at the end of a measurement, in seconds.
const DRAIN_SECS: u64 = 30;
/// Random draws for a block without a write in flight before waiting for a completion.
const DRAWS: usize = 8;

/// The sequence number (generation - base) each block of the region must hold; 0: not
/// written in this run.
static mut SEQUENCES: [u32; MAX_BENCH_BLOCKS as usize] = [0; MAX_BENCH_BLOCKS as usize];

fn sequence(block: u64) -> u32 {
    assert!(block < MAX_BENCH_BLOCKS);
    // SAFETY: in bounds (checked); this single-threaded program is the only user.
    unsafe { core::ptr::read_volatile((&raw const SEQUENCES as *const u32).add(block as usize)) }
}

fn set_sequence(block: u64, seq: u32) {
    assert!(block < MAX_BENCH_BLOCKS);
    // SAFETY: as in `sequence`.
    unsafe { core::ptr::write_volatile((&raw mut SEQUENCES as *mut u32).add(block as usize), seq) }
}

/// One request in flight.
#[derive(Clone, Copy)]
struct Request {
    /// Block index within the region.
    block: u64,
    /// For a write: the sequence number it writes.
    write: Option<u32>,
    /// TSC at submission.
    submitted: u64,
}

/// What one measurement found.
struct Figures {
    ops: u64,
    cycles: u64,
    latency_cycles: u64,
}

/// Why a measurement failed.
enum Failure {
    Status {
        lba: u64,
        status: u8,
    },
    Mismatch {
        lba: u64,
        expected: u64,
        found: BlockMismatch,
    },
    Stuck {
        in_flight: usize,
    },
    Broken,
    NothingWritten,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status { lba, status } => write!(f, "lba={lba} status {status}"),
            Failure::Mismatch {
                lba,
                expected,
                found,
            } => write!(f, "lba={lba} expected gen {expected} found {found}"),
            Failure::Stuck { in_flight } => {
                write!(f, "{in_flight} requests never completed")
            }
            Failure::Broken => f.write_str("the device needs a reset"),
            Failure::NothingWritten => f.write_str("no block was written to read back"),
        }
    }
}

struct Bench<'a> {
    blk: &'a mut VirtioBlk,
    tsc_hz: u64,
    /// First block of the region on the disk, and its length.
    first: u64,
    blocks: u64,
    /// Blocks `0..written` of the region hold this run's data.
    written: u64,
    /// Generation of sequence number s: base + s (wrapping).
    base: u64,
    seq: u32,
    jobs: [Option<Request>; SLOTS],
}

impl Bench<'_> {
    fn lba(&self, block: u64) -> u64 {
        (self.first + block) * SECTORS_PER_BLOCK
    }

    fn write_in_flight(&self, block: u64) -> bool {
        self.jobs
            .iter()
            .any(|j| matches!(j, Some(r) if r.block == block && r.write.is_some()))
    }

    /// The next block `pattern` wants, or None if it must wait for a completion.
    fn pick(&self, pattern: BenchPattern, cursor: &mut u64, rng: &mut u64) -> Option<u64> {
        match pattern {
            BenchPattern::SeqWrite => {
                let block = *cursor % self.blocks;
                if self.write_in_flight(block) {
                    return None;
                }
                *cursor += 1;
                Some(block)
            }
            BenchPattern::SeqRead => {
                let block = *cursor % self.written;
                *cursor += 1;
                Some(block)
            }
            BenchPattern::RandRead => Some(bench_random(rng) % self.written),
            BenchPattern::RandWrite => (0..DRAWS)
                .map(|_| bench_random(rng) % self.written)
                .find(|&b| !self.write_in_flight(b)),
        }
    }

    /// Takes one completion of the benchmark's: its latency in cycles; Ok(None) when there is
    /// none.
    fn complete(&mut self) -> Result<Option<u64>, Failure> {
        let (slot, status, now, req) = loop {
            let Some((slot, status)) = self.blk.poll() else {
                return Ok(None);
            };
            // None: not ours (cannot happen: the workload drained before the benchmark).
            if let Some(req) = self.jobs[slot].take() {
                break (slot, status, rdtsc(), req);
            }
        };
        let lba = self.lba(req.block);
        if status != STATUS_OK {
            return Err(Failure::Status { lba, status });
        }
        match req.write {
            Some(seq) => set_sequence(req.block, seq),
            None => {
                let seq = sequence(req.block);
                let expected = self.base.wrapping_add(u64::from(seq));
                if seq == 0 {
                    return Err(Failure::NothingWritten);
                }
                if let Err(found) = check_bench_block(self.blk.block_words(slot, 0), lba, expected)
                {
                    return Err(Failure::Mismatch {
                        lba,
                        expected,
                        found,
                    });
                }
            }
        }
        Ok(Some(now - req.submitted))
    }

    fn measure(
        &mut self,
        pattern: BenchPattern,
        qd: usize,
        wait: BenchWait,
    ) -> Result<Figures, Failure> {
        if !pattern.writes() || pattern.random() {
            // Reads and random writes stay among the blocks the sequential writes covered.
            if self.written == 0 {
                return Err(Failure::NothingWritten);
            }
        }
        let qd = qd.clamp(1, SLOTS);
        let mut cursor = 0u64;
        let mut rng = BENCH_SEED;
        let start = rdtsc();
        let stop_submitting = start + BENCH_MILLIS * self.tsc_hz / 1000;
        let give_up = stop_submitting + DRAIN_SECS * self.tsc_hz;
        let check_every = self.tsc_hz / 100;
        let mut next_check = start + check_every;
        let (mut started, mut ops, mut latency, mut last) = (0u64, 0u64, 0u64, start);
        loop {
            let mut moved = false;
            while let Some(cycles) = self.complete()? {
                ops += 1;
                latency += cycles;
                last = rdtsc();
                moved = true;
            }
            let now = rdtsc();
            if now < stop_submitting && started < BENCH_MAX_OPS {
                let mut submitted = false;
                while self.blk.in_flight() < qd && started < BENCH_MAX_OPS {
                    let Some(slot) = self.blk.free_slot() else {
                        break;
                    };
                    let Some(block) = self.pick(pattern, &mut cursor, &mut rng) else {
                        break;
                    };
                    let lba = self.lba(block);
                    let write = if pattern.writes() {
                        self.seq += 1;
                        let generation = self.base.wrapping_add(u64::from(self.seq));
                        fill_bench_block(self.blk.block_words(slot, 0), lba, generation);
                        self.blk.submit(slot, Op::Write, lba, BLOCK_BYTES as u32);
                        Some(self.seq)
                    } else {
                        self.blk.submit(slot, Op::Read, lba, BLOCK_BYTES as u32);
                        None
                    };
                    self.jobs[slot] = Some(Request {
                        block,
                        write,
                        submitted: rdtsc(),
                    });
                    started += 1;
                    submitted = true;
                }
                if submitted {
                    self.blk.notify();
                    moved = true;
                }
            } else if self.blk.in_flight() == 0 {
                break;
            }
            if !moved && wait == BenchWait::Hlt {
                crate::halt();
            }
            if now >= next_check {
                // A register read is an exit: only now and then.
                next_check = now + check_every;
                if self.blk.broken() {
                    return Err(Failure::Broken);
                }
                if now > give_up {
                    return Err(Failure::Stuck {
                        in_flight: self.blk.in_flight(),
                    });
                }
            }
        }
        if pattern == BenchPattern::SeqWrite {
            self.written = self.written.max(cursor.min(self.blocks));
        }
        Ok(Figures {
            ops,
            cycles: last - start,
            latency_cycles: latency,
        })
    }
}

/// A fixed-point number: `value` in units of 10^-`decimals`, printed as `x.yy` (integers
/// only, no floating point in the guest).
struct Fixed {
    value: u128,
    decimals: u32,
}

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scale = 10u128.pow(self.decimals);
        write!(
            f,
            "{}.{:0width$}",
            self.value / scale,
            self.value % scale,
            width = self.decimals as usize
        )
    }
}

fn line(out: &mut dyn Write, what: &What, f: &Figures, tsc_hz: u64) {
    let hz = u128::from(tsc_hz);
    let cycles = u128::from(f.cycles.max(1));
    let ops = u128::from(f.ops);
    let bytes = ops * BLOCK_BYTES as u128;
    let seconds = Fixed {
        value: cycles * 1000 / hz,
        decimals: 3,
    };
    // MB = 10^6 bytes; in hundredths.
    let mb_s = Fixed {
        value: bytes * hz * 100 / cycles / 1_000_000,
        decimals: 2,
    };
    let iops = ops * hz / cycles;
    let us_per_op = u128::from(f.latency_cycles) * 1_000_000 / hz / ops.max(1);
    let _ = writeln!(
        out,
        "disk bench {what}: {} ops {seconds} s {mb_s} MB/s {iops} IOPS {us_per_op} us/op",
        f.ops
    );
}

/// One measurement's name: `seq-write 4k qd8 spin`.
struct What {
    pattern: BenchPattern,
    qd: usize,
    wait: BenchWait,
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} 4k qd{} {}",
            self.pattern.name(),
            self.qd,
            self.wait.name()
        )
    }
}

/// Runs every measurement and prints its lines (see `guest_abi::command::DISK_BENCH`). The
/// caller has drained the workload: no request of it is in flight.
pub fn run(blk: &mut VirtioBlk, tsc_hz: u64, out: &mut dyn Write) {
    let Some(region) = bench_region(blk.capacity_sectors()) else {
        let _ = writeln!(
            out,
            "disk bench FAILED: a disk of {} sectors has no benchmark region (16 MiB at least)",
            blk.capacity_sectors()
        );
        return;
    };
    if blk.in_flight() > 0 {
        let _ = writeln!(
            out,
            "disk bench FAILED: {} requests of the workload in flight",
            blk.in_flight()
        );
        return;
    }
    for block in 0..MAX_BENCH_BLOCKS {
        set_sequence(block, 0);
    }
    let _ = write!(
        out,
        "disk bench region blocks={}..{} qd=",
        region.start, region.end
    );
    for (i, qd) in BENCH_QUEUE_DEPTHS.iter().enumerate() {
        let _ = write!(out, "{}{qd}", if i > 0 { "," } else { "" });
    }
    let _ = write!(out, " wait=");
    for (i, wait) in BenchWait::ALL.iter().enumerate() {
        let _ = write!(out, "{}{}", if i > 0 { "," } else { "" }, wait.name());
    }
    let _ = writeln!(out, " millis={BENCH_MILLIS} max_ops={BENCH_MAX_OPS}");
    let mut bench = Bench {
        blk,
        tsc_hz,
        first: region.start,
        blocks: region.end - region.start,
        written: 0,
        // Runs are seconds of TSC apart, far more than the writes of one run.
        base: rdtsc(),
        seq: 0,
        jobs: [None; SLOTS],
    };
    for wait in BenchWait::ALL {
        for qd in BENCH_QUEUE_DEPTHS {
            for pattern in BenchPattern::ALL {
                let what = What { pattern, qd, wait };
                match bench.measure(pattern, qd, wait) {
                    Ok(figures) => line(out, &what, &figures, tsc_hz),
                    Err(failure) => {
                        let _ = writeln!(out, "disk bench FAILED {what}: {failure}");
                        return;
                    }
                }
            }
        }
    }
    let _ = writeln!(out, "disk bench done");
}
