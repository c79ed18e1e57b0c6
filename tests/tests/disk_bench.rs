//! The disk benchmark (issue 7): 4 KiB sequential and random writes and reads measured by the
//! test guest on its virtio-blk disk, next to the same measured from the host through our iSCSI
//! initiator against the same tgtd, in one run; the table goes to target/bench/disk.txt.
//!
//! It boots two QEMU nodes (so qemu-run.sh starts tgtd with the shared LUN; the run directory
//! holds `storage.portal`, the host-side `127.0.0.1:PORT`, and `storage.iqn`), then:
//!
//! 1. the host reference, first, while nothing else uses the LUN (no VM holds a reservation
//!    yet): `storage::iscsi::Disk` driven directly over a `transport::TcpPipe`, busy-polled,
//!    with 1 and then 8 requests in flight (the blocking client has one at a time and sleeps
//!    200 µs when nothing moved, which would measure its own sleep), on the host's region of
//!    the LUN (`guest_abi::disk::host_bench_region`, the last quarter). Should the LUN be
//!    reserved by then, it registers a key of its own for the run (Write Exclusive - Registrants
//!    Only lets registrants write) and removes it afterwards;
//! 2. the guest: `vm create g1 mem=16 disk=<iqn>/1` (the shared LUN as its virtio-blk disk),
//!    `vm start g1`, its workload writes for a while; then the guest's `disk bench` command
//!    (`guest_abi::command::DISK_BENCH`, the byte `b`, typed through `vm console g1` since the
//!    shell has no command for it) holds the workload and measures the same patterns, limits,
//!    sizes and queue depths on the guest's region of the disk (`guest_abi::disk::bench_region`,
//!    the third quarter), twice: spinning on the used ring, and with HLT between polls
//!    (`guest_abi::disk::BenchWait`), and prints one line per measurement; then
//!    `vm verify g1 disk` checks that the workload's blocks (the first half) came through
//!    intact.
//!
//! Both sides write self-describing blocks (`guest_abi::disk::fill_bench_block`) and check
//! every block they read back, so a broken path cannot report a fast figure.
//!
//! The kernel must give a VM the shared LUN as its disk (`disk=<iqn>/<lun>`); without it the
//! test fails and says so. `HV_DISK_BENCH_DISK=ram:64` benchmarks another disk instead (a RAM
//! disk of the node; the report says which disk it was).
//!
//! `./run-tests.sh` runs it alone after the other end-to-end tests, built with `--release` (the
//! host reference must be optimized like the kernel's initiator; a debug build's figures are
//! 3-4x lower, and the report says which it was); by hand:
//! `cargo test --release -p tests --test disk_bench -- --include-ignored disk_benchmark`. The
//! line parsers have plain unit tests at the end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use guest_abi::disk::{
    bench_random, check_bench_block, fill_bench_block, host_bench_region, BenchPattern, BenchWait,
    BENCH_MAX_OPS, BENCH_MILLIS, BENCH_QUEUE_DEPTHS, BENCH_SEED, BLOCK_BYTES, BLOCK_WORDS,
    SECTORS_PER_BLOCK,
};
use storage::iscsi::{
    Disk, DiskError, DiskEvent, DiskReply, Isid, OpId, Session, SessionConfig, SessionEvent,
    SessionState,
};
use storage::scsi::{CommandError, ReservationKey};
use transport::{Pipe, PipeError, TcpPipe};

use tests::guest_disk::{cmd, guest_line, wait_disk_writes};
use tests::{Cluster, ClusterOptions};

/// Bound on waiting for one guest line.
const GUEST_LINE: Duration = Duration::from_secs(60);
/// Bound on the guest's whole benchmark (16 measurements of 2 s, their drains, the prints).
const GUEST_BENCH: Duration = Duration::from_secs(300);
/// The shared LUN qemu-run.sh sets up.
const LUN: u16 = 1;
/// Longest wait for requests in flight at the end of a host measurement, or for a control
/// operation (login, READ CAPACITY, registration).
const HOST_WAIT: Duration = Duration::from_secs(30);
/// The host reference's initiator (its own I_T nexus beside the nodes').
const HOST_INITIATOR: &str = "iqn.2026-11.test.hv:disk-bench-host";
/// Picks the disk instead of the shared LUN, e.g. `ram:64`.
const DISK_ENV: &str = "HV_DISK_BENCH_DISK";
/// The host reference must run optimized, as the kernel's initiator does: unoptimized, the
/// host spends more time building PDUs than tgtd takes to answer (3-4x lower figures).
const COMMAND: &str =
    "cargo test --release -p tests --test disk_bench -- --include-ignored disk_benchmark";

// ---------------------------------------------------------------------------------------------
// Figures and the guest's lines (pure; unit-tested below)
// ---------------------------------------------------------------------------------------------

/// One measurement: a pattern at a queue depth (and, in the guest, a way of waiting).
#[derive(Debug, Clone, PartialEq)]
struct Measurement {
    pattern: BenchPattern,
    qd: usize,
    /// How the guest waited; None for the host.
    wait: Option<BenchWait>,
    ops: u64,
    seconds: f64,
    mb_s: f64,
    iops: f64,
    /// Mean time from submission to completion, µs.
    us_per_op: f64,
}

impl Measurement {
    /// From raw counts, as the guest computes them (MB = 10^6 bytes).
    fn from_counts(
        pattern: BenchPattern,
        qd: usize,
        ops: u64,
        elapsed: Duration,
        latency: Duration,
    ) -> Measurement {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Measurement {
            pattern,
            qd,
            wait: None,
            ops,
            seconds,
            mb_s: (ops * BLOCK_BYTES as u64) as f64 / seconds / 1e6,
            iops: ops as f64 / seconds,
            us_per_op: latency.as_secs_f64() * 1e6 / ops.max(1) as f64,
        }
    }
}

/// The number before `unit` in `words` (`... 1234 ops ...` -> 1234 for "ops").
fn number_before(words: &[&str], unit: &str) -> Option<f64> {
    let at = words.iter().position(|w| *w == unit)?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

/// Parses `disk bench seq-write 4k qd8 spin: 1234 ops 2.010 s 2.51 MB/s 614 IOPS 13020 us/op`
/// anywhere in a line (a `[g1] ` prefix, a trailing `\r` and the like are ignored).
fn parse_guest_line(line: &str) -> Option<Measurement> {
    let rest = &line[line.find("disk bench ")? + "disk bench ".len()..];
    let (head, figures) = rest.split_once(':')?;
    let mut head = head.split_whitespace();
    let pattern = BenchPattern::from_name(head.next()?)?;
    if head.next()? != "4k" {
        return None;
    }
    let qd = head.next()?.strip_prefix("qd")?.parse().ok()?;
    let wait = BenchWait::from_name(head.next()?)?;
    if head.next().is_some() {
        return None;
    }
    let words: Vec<&str> = figures.split_whitespace().collect();
    Some(Measurement {
        pattern,
        qd,
        wait: Some(wait),
        ops: number_before(&words, "ops")? as u64,
        seconds: number_before(&words, "s")?,
        mb_s: number_before(&words, "MB/s")?,
        iops: number_before(&words, "IOPS")?,
        us_per_op: number_before(&words, "us/op")?,
    })
}

/// The blocks of `disk bench region blocks=8192..12288 qd=1,8 ...`.
fn parse_region_line(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.find("disk bench region blocks=")? + "disk bench region blocks=".len()..];
    let range = rest.split_whitespace().next()?;
    let (a, b) = range.split_once("..")?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// What the guest printed between its `disk bench` command and `disk bench done`: the region
/// and every measurement, or why it failed.
fn parse_guest_output(text: &str) -> Result<((u64, u64), Vec<Measurement>), String> {
    if let Some(line) = text.lines().find(|l| l.contains("disk bench FAILED")) {
        return Err(line.trim().to_string());
    }
    if !text.contains("disk bench done") {
        return Err("no 'disk bench done' line".into());
    }
    let region = text
        .lines()
        .find_map(parse_region_line)
        .ok_or("no 'disk bench region' line")?;
    let lines: Vec<Measurement> = text.lines().filter_map(parse_guest_line).collect();
    for wait in BenchWait::ALL {
        for qd in BENCH_QUEUE_DEPTHS {
            for pattern in BenchPattern::ALL {
                if find(&lines, pattern, qd, Some(wait)).is_none() {
                    return Err(format!(
                        "no line for {} at qd{qd} {}",
                        pattern.name(),
                        wait.name()
                    ));
                }
            }
        }
    }
    Ok((region, lines))
}

fn find(
    lines: &[Measurement],
    pattern: BenchPattern,
    qd: usize,
    wait: Option<BenchWait>,
) -> Option<&Measurement> {
    lines
        .iter()
        .find(|m| m.pattern == pattern && m.qd == qd && m.wait == wait)
}

/// What each side ran on, for the report.
struct Setup {
    guest_disk: String,
    guest_blocks: (u64, u64),
    host_target: String,
    host_blocks: (u64, u64),
    host_note: Option<String>,
    /// Whether this test (and so the host's initiator) was built with optimizations.
    host_optimized: bool,
    command: String,
}

/// The table of target/bench/disk.txt: per pattern and queue depth, the guest spinning, the
/// guest halting, the host, and the guest's share of the host's throughput.
fn report(setup: &Setup, guest: &[Measurement], host: &[Measurement]) -> String {
    let mut r = format!(
        "disk benchmark: 4 KiB requests, each measurement {BENCH_MILLIS} ms or {BENCH_MAX_OPS} \
         requests (then those in flight), every read checked (QEMU TCG nodes)\n"
    );
    r.push_str(&format!(
        "  guest: the test guest's legacy virtio-blk driver, timed by its TSC, waiting by spinning \
         on the used ring (spin) or by HLT between polls (hlt); {}; blocks {}..{}\n",
        setup.guest_disk, setup.guest_blocks.0, setup.guest_blocks.1
    ));
    r.push_str(&format!(
        "  host:  storage::iscsi::Disk on the host ({}), busy-polling a TCP pipe; {}; blocks {}..{}\n",
        if setup.host_optimized {
            "optimized build"
        } else {
            "UNOPTIMIZED debug build: run with --release for a fair reference"
        },
        setup.host_target,
        setup.host_blocks.0,
        setup.host_blocks.1
    ));
    if let Some(note) = &setup.host_note {
        r.push_str(&format!("  note: {note}\n"));
    }
    r.push_str(&format!(
        "  {:<10} {:>3} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "pattern",
        "qd",
        "spin MB/s",
        "spin IOPS",
        "spin us/op",
        "hlt MB/s",
        "hlt IOPS",
        "hlt us/op",
        "host MB/s",
        "host IOPS",
        "host us/op",
        "spin/host",
        "hlt/host"
    ));
    let cells = |m: Option<&Measurement>| match m {
        Some(m) => [
            format!("{:.2}", m.mb_s),
            format!("{:.0}", m.iops),
            format!("{:.0}", m.us_per_op),
        ],
        None => ["-".to_string(), "-".to_string(), "-".to_string()],
    };
    let ratio = |g: Option<&Measurement>, h: Option<&Measurement>| match (g, h) {
        (Some(g), Some(h)) if h.mb_s > 0.0 => format!("{:.3}", g.mb_s / h.mb_s),
        _ => "-".to_string(),
    };
    for qd in BENCH_QUEUE_DEPTHS {
        for pattern in BenchPattern::ALL {
            let spin = find(guest, pattern, qd, Some(BenchWait::Spin));
            let hlt = find(guest, pattern, qd, Some(BenchWait::Hlt));
            let h = find(host, pattern, qd, None);
            let row: Vec<String> = [cells(spin), cells(hlt), cells(h)]
                .into_iter()
                .flatten()
                .chain([ratio(spin, h), ratio(hlt, h)])
                .collect();
            r.push_str(&format!("  {:<10} {:>3}", pattern.name(), qd));
            for cell in row {
                r.push_str(&format!(" {cell:>10}"));
            }
            r.push('\n');
        }
    }
    r.push_str(&format!("  (command: {})\n", setup.command));
    r
}

// ---------------------------------------------------------------------------------------------
// The host reference: the iSCSI initiator driven directly, several requests in flight
// ---------------------------------------------------------------------------------------------

/// The pipe the session gets while it has no TCP connection.
struct ClosedPipe;

impl Pipe for ClosedPipe {
    fn send(&mut self, _: &[u8]) -> Result<usize, PipeError> {
        Err(PipeError::Closed)
    }

    fn recv(&mut self, _: &mut [u8]) -> Result<usize, PipeError> {
        Err(PipeError::Closed)
    }
}

/// A completed operation.
type Completed = (OpId, Result<DiskReply, DiskError>);

/// One request in flight.
struct HostRequest {
    /// Block index within the region.
    block: u64,
    /// For a write: its sequence number.
    write: Option<u32>,
    submitted: Instant,
}

struct HostDisk {
    disk: Disk,
    portal: SocketAddr,
    pipe: Option<TcpPipe>,
    start: Instant,
    /// Connections lost during the run (the session reconnects and re-issues).
    reconnects: u64,
}

impl HostDisk {
    fn connect(portal: SocketAddr, iqn: &str) -> Result<HostDisk, String> {
        let config = SessionConfig::normal(HOST_INITIATOR, iqn, Isid::for_name(HOST_INITIATOR));
        let disk = Disk::new(Session::new(config), LUN).map_err(|e| format!("LUN: {e:?}"))?;
        let mut host = HostDisk {
            disk,
            portal,
            pipe: None,
            start: Instant::now(),
            reconnects: 0,
        };
        let deadline = Instant::now() + HOST_WAIT;
        loop {
            host.poll()?;
            match host.disk.session().state() {
                SessionState::FullFeature => return Ok(host),
                SessionState::Failed | SessionState::Closed => {
                    return Err(format!(
                        "login to {iqn} at {portal} failed: {:?}",
                        host.disk.session().failure()
                    ))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no login to {iqn} at {portal} within {HOST_WAIT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// One poll of the session (opening a connection when it wants one); returns the
    /// completions of operations.
    fn poll(&mut self) -> Result<Vec<Completed>, String> {
        let now = self.now_ms();
        if self.disk.session().needs_connection(now) {
            self.pipe = TcpPipe::connect(self.portal, Duration::from_secs(5)).ok();
            self.disk.session_mut().connection_opened(now);
        }
        let events = match self.pipe.as_mut() {
            Some(pipe) => self.disk.poll(pipe, now),
            None => self.disk.poll(&mut ClosedPipe, now),
        };
        let mut done = Vec::new();
        for event in events {
            match event {
                DiskEvent::Completed { op, result } => done.push((op, result)),
                DiskEvent::Session(SessionEvent::ConnectionLost(_)) => {
                    self.pipe = None;
                    self.reconnects += 1;
                }
                DiskEvent::Session(SessionEvent::Failed(e)) => {
                    return Err(format!("the iSCSI session failed: {e}"))
                }
                DiskEvent::Session(SessionEvent::LoggedOut { .. }) => self.pipe = None,
                _ => {}
            }
        }
        Ok(done)
    }

    /// Submits one operation (`submit(disk, now_ms)`) and waits for it: its result, or why
    /// it never came.
    fn run(
        &mut self,
        submit: impl FnOnce(&mut Disk, u64) -> Result<OpId, DiskError>,
    ) -> Result<Result<DiskReply, DiskError>, String> {
        let now = self.now_ms();
        let op = match submit(&mut self.disk, now) {
            Ok(op) => op,
            Err(e) => return Ok(Err(e)),
        };
        let deadline = Instant::now() + HOST_WAIT;
        loop {
            if let Some((_, result)) = self.poll()?.into_iter().find(|(id, _)| *id == op) {
                return Ok(result);
            }
            if Instant::now() > deadline {
                return Err(format!("no answer within {HOST_WAIT:?}"));
            }
            std::thread::yield_now();
        }
    }

    fn logout(mut self) {
        let now = self.now_ms();
        self.disk.session_mut().logout(now);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pipe.is_some() && Instant::now() < deadline {
            if self.poll().is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The host's run over its region: what each block must hold.
struct HostBench {
    host: HostDisk,
    /// First 4 KiB block of the region on the LUN, and its length.
    first: u64,
    blocks: u64,
    /// LUN blocks per 4 KiB.
    per_block: u64,
    written: u64,
    base: u64,
    seq: u32,
    sequences: Vec<u32>,
}

impl HostBench {
    /// The 512-byte sector of region block `block` (what the pattern records, as in the
    /// guest), and its LBA on the LUN.
    fn addresses(&self, block: u64) -> (u64, u64) {
        let sector = (self.first + block) * SECTORS_PER_BLOCK;
        (sector, (self.first + block) * self.per_block)
    }

    fn block_bytes(sector: u64, generation: u64) -> Vec<u8> {
        let mut words = [0u64; BLOCK_WORDS];
        fill_bench_block(&mut words, sector, generation);
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn write_in_flight(jobs: &HashMap<OpId, HostRequest>, block: u64) -> bool {
        jobs.values().any(|r| r.block == block && r.write.is_some())
    }

    /// The same choice of blocks as the guest's (tests/guest/src/disk_bench.rs).
    fn pick(
        &self,
        pattern: BenchPattern,
        jobs: &HashMap<OpId, HostRequest>,
        cursor: &mut u64,
        rng: &mut u64,
    ) -> Option<u64> {
        match pattern {
            BenchPattern::SeqWrite => {
                let block = *cursor % self.blocks;
                if Self::write_in_flight(jobs, block) {
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
            BenchPattern::RandWrite => (0..8)
                .map(|_| bench_random(rng) % self.written)
                .find(|&b| !Self::write_in_flight(jobs, b)),
        }
    }

    fn measure(&mut self, pattern: BenchPattern, qd: usize) -> Result<Measurement, String> {
        let what = format!("host {} qd{qd}", pattern.name());
        if (!pattern.writes() || pattern.random()) && self.written == 0 {
            return Err(format!("{what}: no block written to read back"));
        }
        let mut jobs: HashMap<OpId, HostRequest> = HashMap::new();
        let (mut cursor, mut rng) = (0u64, BENCH_SEED);
        let (mut started, mut ops, mut latency) = (0u64, 0u64, Duration::ZERO);
        let start = Instant::now();
        let mut last = start;
        let stop_submitting = start + Duration::from_millis(BENCH_MILLIS);
        let give_up = stop_submitting + HOST_WAIT;
        loop {
            let done = self.host.poll().map_err(|e| format!("{what}: {e}"))?;
            let moved = !done.is_empty();
            for (op, result) in done {
                let Some(req) = jobs.remove(&op) else {
                    continue;
                };
                let now = Instant::now();
                let (sector, _) = self.addresses(req.block);
                match (req.write, result) {
                    (Some(seq), Ok(DiskReply::Done)) => {
                        self.sequences[req.block as usize] = seq;
                    }
                    (None, Ok(DiskReply::Data(data))) => {
                        let seq = self.sequences[req.block as usize];
                        let expected = self.base.wrapping_add(u64::from(seq));
                        let mut words = [0u64; BLOCK_WORDS];
                        for (w, b) in words.iter_mut().zip(data.as_chunks::<8>().0) {
                            *w = u64::from_le_bytes(*b);
                        }
                        if seq == 0 || data.len() != BLOCK_BYTES {
                            return Err(format!(
                                "{what}: sector {sector}: {} bytes of a block never written",
                                data.len()
                            ));
                        }
                        check_bench_block(&words, sector, expected).map_err(|m| {
                            format!("{what}: sector {sector} expected gen {expected} found {m}")
                        })?;
                    }
                    (_, Err(e)) => return Err(format!("{what}: sector {sector}: {e}")),
                    (_, Ok(other)) => {
                        return Err(format!("{what}: sector {sector}: unexpected {other:?}"))
                    }
                }
                ops += 1;
                latency += now - req.submitted;
                last = now;
            }
            let now = Instant::now();
            let mut submitted = false;
            if now < stop_submitting && started < BENCH_MAX_OPS {
                while jobs.len() < qd && started < BENCH_MAX_OPS {
                    let Some(block) = self.pick(pattern, &jobs, &mut cursor, &mut rng) else {
                        break;
                    };
                    let (sector, lba) = self.addresses(block);
                    let now_ms = self.host.now_ms();
                    let (op, write) = if pattern.writes() {
                        self.seq += 1;
                        let generation = self.base.wrapping_add(u64::from(self.seq));
                        let data = Self::block_bytes(sector, generation);
                        (self.host.disk.write(lba, data, now_ms), Some(self.seq))
                    } else {
                        let blocks = self.per_block as u32;
                        (self.host.disk.read(lba, blocks, now_ms), None)
                    };
                    let op = op.map_err(|e| format!("{what}: submit: {e}"))?;
                    jobs.insert(
                        op,
                        HostRequest {
                            block,
                            write,
                            submitted: Instant::now(),
                        },
                    );
                    started += 1;
                    submitted = true;
                }
            } else if jobs.is_empty() {
                break;
            }
            if now > give_up {
                return Err(format!("{what}: {} requests never completed", jobs.len()));
            }
            if !moved && !submitted {
                std::thread::yield_now();
            }
        }
        if pattern == BenchPattern::SeqWrite {
            self.written = self.written.max(cursor.min(self.blocks));
        }
        Ok(Measurement::from_counts(
            pattern,
            qd,
            ops,
            last - start,
            latency,
        ))
    }
}

/// What the host reference measured, and on what.
struct HostRun {
    measurements: Vec<Measurement>,
    blocks: (u64, u64),
    note: Option<String>,
}

/// Runs the host reference against `iqn` LUN 1 at `portal`.
fn host_reference(portal: SocketAddr, iqn: &str) -> Result<HostRun, String> {
    let mut host = HostDisk::connect(portal, iqn)?;
    let capacity = match host.run(|d, now| d.read_capacity(now))? {
        Ok(DiskReply::Capacity(c)) => c,
        other => return Err(format!("READ CAPACITY: {other:?}")),
    };
    let block_len = u64::from(capacity.block_len);
    if block_len == 0 || !(BLOCK_BYTES as u64).is_multiple_of(block_len) {
        return Err(format!("a block length of {block_len} bytes"));
    }
    let sectors = (capacity.last_lba + 1) * block_len / 512;
    let region = host_bench_region(sectors)
        .ok_or_else(|| format!("the LUN ({sectors} sectors) has no room for the benchmark"))?;
    let mut bench = HostBench {
        host,
        first: region.start,
        blocks: region.end - region.start,
        per_block: BLOCK_BYTES as u64 / block_len,
        written: 0,
        // Runs are seconds apart, far more nanoseconds than the writes of one run.
        base: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        seq: 0,
        sequences: vec![0; (region.end - region.start) as usize],
    };

    // A write nobody times: if the LUN is reserved (a node's Write Exclusive - Registrants
    // Only), register our own key for the run.
    let (sector, lba) = bench.addresses(0);
    let probe = HostBench::block_bytes(sector, 0);
    let mut key = None;
    match bench.host.run(|d, now| d.write(lba, probe.clone(), now))? {
        Ok(_) => {}
        Err(DiskError::Scsi(CommandError::ReservationConflict)) => {
            let k = ReservationKey::for_node("disk-bench-host");
            bench
                .host
                .run(|d, now| d.register_and_ignore(k, now))?
                .map_err(|e| format!("registering the host's key: {e}"))?;
            key = Some(k);
            bench
                .host
                .run(|d, now| d.write(lba, probe, now))?
                .map_err(|e| format!("the probe write, registered: {e}"))?;
        }
        Err(e) => return Err(format!("the probe write: {e}")),
    }

    let mut measurements = Vec::new();
    let mut result = Ok(());
    'all: for qd in BENCH_QUEUE_DEPTHS {
        for pattern in BenchPattern::ALL {
            match bench.measure(pattern, qd) {
                Ok(m) => measurements.push(m),
                Err(e) => {
                    result = Err(e);
                    break 'all;
                }
            }
        }
    }
    let mut notes = Vec::new();
    if let Some(k) = key {
        let removed = bench
            .host
            .run(|d, now| d.register_and_ignore(ReservationKey::NONE, now));
        notes.push(format!(
            "the LUN was reserved: the host registered key {:#x} for the run{}",
            k.0,
            if matches!(removed, Ok(Ok(_))) {
                " and removed it"
            } else {
                " (removing it failed)"
            }
        ));
    }
    if bench.host.reconnects > 0 {
        notes.push(format!(
            "the host's session reconnected {} times",
            bench.host.reconnects
        ));
    }
    bench.host.logout();
    result?;
    Ok(HostRun {
        measurements,
        blocks: (region.start, region.end),
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    })
}

// ---------------------------------------------------------------------------------------------
// The guest
// ---------------------------------------------------------------------------------------------

/// The `disk=` value: the shared LUN, or what HV_DISK_BENCH_DISK says.
fn disk_option(iqn: &str) -> (String, bool) {
    match std::env::var(DISK_ENV) {
        Ok(v) if !v.is_empty() => (v, true),
        _ => (format!("{iqn}/{LUN}"), false),
    }
}

/// Reads one line of the run directory (`storage.portal`, `storage.iqn`).
fn run_file(cluster: &Cluster, name: &str) -> String {
    let path = cluster.dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (qemu-run.sh starts tgtd for two or more nodes)",
                path.display()
            )
        })
        .trim()
        .to_string()
}

#[test]
#[ignore = "boots two QEMU nodes and a tgtd; run alone by ./run-tests.sh"]
fn disk_benchmark() {
    let mut cluster = Cluster::start(ClusterOptions::default().with("on_panic", "exit")).unwrap();
    let portal: SocketAddr = run_file(&cluster, "storage.portal")
        .parse()
        .expect("storage.portal holds 127.0.0.1:PORT");
    assert!(portal.ip().is_loopback(), "{portal}");
    let iqn = run_file(&cluster, "storage.iqn");

    // 1. The host reference, while no VM uses the LUN.
    let host = host_reference(portal, &iqn).unwrap_or_else(|e| panic!("host reference: {e}"));

    // 2. The guest, with the shared LUN as its disk.
    let (disk, overridden) = disk_option(&iqn);
    let c = cluster.console(1);
    let out = cmd(c, &format!("vm create g1 mem=16 disk={disk}"));
    if !out.contains("vm g1 created") {
        panic!(
            "the kernel did not create a VM with disk={disk}{}:\n{out}\n\
             (the benchmark needs the shared LUN as a VM's disk; {DISK_ENV}=ram:64 benchmarks \
             a RAM disk of the node instead)",
            if overridden {
                format!(" (from {DISK_ENV})")
            } else {
                String::new()
            }
        );
    }
    let out = cmd(c, "vm start g1");
    assert!(out.contains("vm g1 started"), "{out}");
    let disk_line = guest_line(c, "g1", "disk: ");
    assert!(
        disk_line.starts_with("virtio-blk "),
        "[g1] disk: {disk_line}"
    );
    wait_disk_writes(c, "g1", 20);
    let show = cmd(c, "vm show g1");
    let guest_disk = show
        .lines()
        .find(|l| l.trim_start().starts_with("disk: "))
        .map(|l| l.trim().trim_start_matches("disk: ").to_string())
        .unwrap_or_else(|| panic!("no disk line in vm show:\n{show}"));

    // The shell has no command for the benchmark byte: type it on the guest's console and
    // leave again at once; the guest's lines then come as `[g1] ...` like all others.
    let out = cmd(c, "vm console g1");
    assert!(out.contains("attached"), "{out}");
    c.send_bytes(&[guest_abi::command::DISK_BENCH, 0x1D])
        .unwrap(); // the byte, Ctrl-]
    c.expect("[detached from g1]", GUEST_LINE).unwrap();
    let started = Instant::now();
    let (which, text) = c
        .expect_any(
            &["[g1] disk bench done", "[g1] disk bench FAILED"],
            GUEST_BENCH,
        )
        .unwrap_or_else(|e| panic!("waiting for the guest's benchmark: {e:?}"));
    let rest = c.expect("\n", GUEST_LINE).unwrap();
    let wall = started.elapsed();
    let text: String = format!("{text}{rest}")
        .lines()
        .filter_map(|l| Some(format!("{}\n", l[l.find("[g1] disk bench")?..].trim_end())))
        .collect();
    eprintln!("guest output (wall {wall:.1?}):\n{}", text.trim_end());
    assert_eq!(which, 0, "the guest's benchmark failed:\n{text}");
    let (guest_blocks, guest) =
        parse_guest_output(&text).unwrap_or_else(|e| panic!("{e}; the guest said:\n{text}"));
    for m in guest.iter().chain(&host.measurements) {
        assert!(m.ops > 0 && m.seconds > 0.0, "{m:?}");
    }

    // The workload's blocks came through the benchmark intact, and it writes again.
    let out = cmd(c, "vm verify g1 disk");
    assert!(out.contains("disk verification requested"), "{out}");
    let (which, text) = c
        .expect_any(
            &["[g1] disk verify ok", "[g1] disk verify FAILED"],
            GUEST_LINE,
        )
        .unwrap();
    let rest = c.expect("\n", GUEST_LINE).unwrap();
    assert_eq!(which, 0, "after the benchmark: {text}{rest}");

    let setup = Setup {
        guest_disk: format!("disk={disk} ({guest_disk})"),
        guest_blocks,
        host_target: format!("tgtd {portal} {iqn} LUN {LUN}"),
        host_blocks: host.blocks,
        host_note: host.note.clone(),
        host_optimized: !cfg!(debug_assertions),
        command: if overridden {
            format!("{DISK_ENV}={disk} {COMMAND}")
        } else {
            COMMAND.to_string()
        },
    };
    let table = report(&setup, &guest, &host.measurements);
    print!("{table}");
    let dir = tests::target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk.txt"), &table).unwrap();
    cluster.stop().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Parser tests (not ignored)
// ---------------------------------------------------------------------------------------------

#[test]
fn guest_lines_parse() {
    let m = parse_guest_line(
        "[g1] disk bench seq-write 4k qd8 spin: 1234 ops 2.010 s 2.51 MB/s 614 IOPS 13020 us/op\r",
    )
    .unwrap();
    assert_eq!(
        m,
        Measurement {
            pattern: BenchPattern::SeqWrite,
            qd: 8,
            wait: Some(BenchWait::Spin),
            ops: 1234,
            seconds: 2.01,
            mb_s: 2.51,
            iops: 614.0,
            us_per_op: 13020.0,
        }
    );
    let m = parse_guest_line(
        "disk bench rand-read 4k qd1 hlt: 7 ops 0.004 s 6.00 MB/s 1750 IOPS 571 us/op",
    )
    .unwrap();
    assert_eq!(
        (m.pattern, m.qd, m.wait, m.ops),
        (BenchPattern::RandRead, 1, Some(BenchWait::Hlt), 7)
    );
    for bad in [
        "disk bench done",
        "disk bench FAILED seq-read 4k qd1 spin: lba=3 status 1",
        "disk bench seq-write 4k qd8: 1 ops 1.000 s 1.00 MB/s 1 IOPS 1 us/op",
        "disk bench seq-write 8k qd8 spin: 1 ops 1.000 s 1.00 MB/s 1 IOPS 1 us/op",
        "disk bench seq-write 4k qdx spin: 1 ops 1.000 s 1.00 MB/s 1 IOPS 1 us/op",
        "disk bench seq-write 4k qd1 nap: 1 ops 1.000 s 1.00 MB/s 1 IOPS 1 us/op",
        "disk bench seq-write 4k qd1 hlt x: 1 ops 1.000 s 1.00 MB/s 1 IOPS 1 us/op",
        "disk bench backwards 4k qd1 hlt: 1 ops 1.000 s 1.00 MB/s 1 IOPS 1 us/op",
        "disk bench seq-write 4k qd1 hlt: 1 ops 1.000 s 1.00 MB/s",
        "disk bench region blocks=8192..12288 qd=1,8 wait=spin,hlt millis=2000 max_ops=50000",
        "heartbeat 7 ok disk writes=3",
    ] {
        assert_eq!(parse_guest_line(bad), None, "{bad}");
    }
    assert_eq!(
        parse_region_line("[g1] disk bench region blocks=8192..12288 qd=1,8 wait=spin,hlt"),
        Some((8192, 12288))
    );
    assert_eq!(parse_region_line("disk bench done"), None);
}

#[test]
fn guest_output_needs_every_line_and_reports_failures() {
    let mut text = String::from("[g1] disk bench region blocks=8192..12288 qd=1,8\r\n");
    for wait in BenchWait::ALL {
        for qd in BENCH_QUEUE_DEPTHS {
            for p in BenchPattern::ALL {
                text.push_str(&format!(
                    "[g1] disk bench {} 4k qd{qd} {}: 10 ops 1.000 s 0.04 MB/s 10 IOPS 100000 us/op\r\n",
                    p.name(),
                    wait.name()
                ));
            }
        }
    }
    assert!(parse_guest_output(&text).unwrap_err().contains("done"));
    text.push_str("[g1] disk bench done\r\n");
    let (region, lines) = parse_guest_output(&text).unwrap();
    assert_eq!((region, lines.len()), ((8192, 12288), 16));
    let missing = text.replace("rand-read 4k qd8 hlt", "rand-read 4k qd9 hlt");
    assert!(parse_guest_output(&missing)
        .unwrap_err()
        .contains("rand-read at qd8 hlt"));
    let failed = "disk bench region blocks=1..2 qd=1,8\r\n\
                  [g1] disk bench FAILED seq-read 4k qd1 spin: lba=65536 expected gen 9 found gen 8\r\n";
    assert_eq!(
        parse_guest_output(failed).unwrap_err(),
        "[g1] disk bench FAILED seq-read 4k qd1 spin: lba=65536 expected gen 9 found gen 8"
    );
}

#[test]
fn report_pairs_guest_and_host_figures() {
    let m = |pattern, qd, wait, mb_s| Measurement {
        pattern,
        qd,
        wait,
        ops: 100,
        seconds: 1.0,
        mb_s,
        iops: mb_s * 1e6 / 4096.0,
        us_per_op: 50.0,
    };
    let guest = [
        m(BenchPattern::SeqWrite, 1, Some(BenchWait::Spin), 2.0),
        m(BenchPattern::SeqWrite, 1, Some(BenchWait::Hlt), 4.0),
        m(BenchPattern::RandRead, 8, Some(BenchWait::Hlt), 4.0),
    ];
    let host = [m(BenchPattern::SeqWrite, 1, None, 40.0)];
    let setup = Setup {
        guest_disk: "disk=ram:64".into(),
        guest_blocks: (8192, 12288),
        host_target: "tgtd 127.0.0.1:3260 iqn.x LUN 1".into(),
        host_blocks: (12288, 16384),
        host_note: Some("a note".into()),
        host_optimized: false,
        command: COMMAND.into(),
    };
    let r = report(&setup, &guest, &host);
    let row = r.lines().find(|l| l.contains("seq-write")).unwrap();
    assert!(row.ends_with("0.050      0.100"), "{row}");
    assert!(
        row.contains("40.00") && row.contains("2.00") && row.contains("4.00"),
        "{row}"
    );
    let row = r
        .lines()
        .find(|l| l.contains("rand-read") && l.contains(" 8 "))
        .unwrap();
    assert!(
        row.contains("4.00") && row.trim_end().ends_with("-          -"),
        "{row}"
    );
    // Every pattern at every queue depth has a row.
    assert_eq!(
        r.lines()
            .filter(|l| l.contains("-write ") || l.contains("-read "))
            .count(),
        8
    );
    assert!(r.contains("blocks 8192..12288") && r.contains("blocks 12288..16384"));
    assert!(r.contains("note: a note") && r.contains(COMMAND) && r.contains("UNOPTIMIZED"));
    let from = Measurement::from_counts(
        BenchPattern::SeqRead,
        8,
        1000,
        Duration::from_secs(2),
        Duration::from_millis(500),
    );
    assert_eq!(from.iops, 500.0);
    assert!((from.mb_s - 2.048).abs() < 1e-9);
    assert_eq!(from.us_per_op, 500.0);
}
