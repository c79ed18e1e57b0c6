//! End-to-end tests of live migration (issue 5): two QEMU nodes (AMD SVM + NPT) linked NIC to
//! NIC, the test guest (64 MiB) moved between them with `migrate <vm> <node>`.
//!
//! What each move must show:
//! - node1 prints `[migrate] migration of vm1 to node2 completed: total .., downtime .., ..` and
//!   `[migrate] vm vm1 now runs on node2; memory digest at switchover 0x..`;
//! - node2 prints `[migrate] incoming vm vm1 arrived in ..: running on node2 (.. memory digest
//!   0x..)`: the same digest, so the destination's memory equals the source's at switchover;
//! - the guest's heartbeats continue on node2 with the next number (guest time stood still
//!   during the pause: no number skipped, none repeated), all saying ok (the guest's background
//!   check found no bad page), and `vm verify` passes there;
//! - `vm list` shows the VM on its new node only.
//!
//! Failures (link cut, destination killed, cancel, refusal) must leave the VM running on node1,
//! its verification passing, and no copy on node2. A lost commit acknowledgement leaves the
//! source in doubt until node2 says it runs the VM.
//!
//! Every test boots two nodes, so every test is `#[ignore]`d like those of e2e.rs:
//! `./run-tests.sh` runs them; by hand:
//! `cargo test -p tests --test migration -- --include-ignored --test-threads 2`.

use std::time::Duration;

use tests::{hex_after, Cluster, ClusterOptions, Console};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Bound on one migration of a 64 MiB guest under TCG (a few seconds at ~20 MB/s; a dirtying
/// guest takes several rounds and throttling).
const MIGRATION: Duration = Duration::from_secs(240);
/// Bound on waiting for one guest line.
const GUEST_LINE: Duration = Duration::from_secs(60);
/// The benchmark's dirtying guests: pages rewritten per second (QEMU's reference guest writes
/// at the same rate).
const BENCH_DIRTY_RATE: u64 = 20_000;

// ---------------------------------------------------------------------------------------------
// Parsers (pure; unit-tested below)
// ---------------------------------------------------------------------------------------------

/// The heartbeat numbers of `[name] heartbeat N ok` lines, in order; panics on a FAIL line.
fn heartbeats(text: &str, name: &str) -> Vec<u64> {
    let needle = format!("[{name}] heartbeat ");
    text.lines()
        .filter_map(|l| Some(&l[l.find(&needle)? + needle.len()..]))
        .map(|rest| {
            assert!(
                rest.trim_end().ends_with("ok"),
                "[{name}] heartbeat {rest:?}: the guest reports a bad page"
            );
            rest.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap()
        })
        .collect()
}

/// What a completed migration's summary line states.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    total_ms: f64,
    /// From the pause until the destination's acknowledgement.
    downtime_ms: f64,
    /// From the pause until the last byte was handed to TCP: what QEMU reports as downtime.
    send_downtime_ms: f64,
    /// The highest auto-converge throttle, in percent.
    throttle: u64,
    wire_mb: f64,
    stream_mb_s: f64,
    rounds: u64,
}

/// The number between `before` and `after` in `line`.
fn number_between(line: &str, before: &str, after: &str) -> Option<f64> {
    line.split(before)
        .nth(1)?
        .split(after)
        .next()?
        .trim()
        .parse()
        .ok()
}

fn parse_summary(line: &str) -> Option<Summary> {
    let rounds = line.split(" rounds").next()?.rsplit(' ').next()?;
    Some(Summary {
        total_ms: number_between(line, "total ", " ms")?,
        downtime_ms: number_between(line, "downtime ", " ms")?,
        send_downtime_ms: number_between(line, " ms (", " ms until the last byte was sent")?,
        wire_mb: line
            .split(" MB on the wire")
            .next()?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?,
        stream_mb_s: number_between(line, "on the wire (", " MB/s while copying")?,
        rounds: rounds.parse().ok()?,
        throttle: number_between(line, " rounds, throttle ", "%")? as u64,
    })
}

/// Ethernet frames of a pcap file (classic format, either byte order): (seconds, frame).
fn pcap_frames(bytes: &[u8]) -> Vec<(f64, Vec<u8>)> {
    let u32_at = |at: usize, le: bool| {
        let b: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let le = match bytes.get(..4) {
        Some([0xd4, 0xc3, 0xb2, 0xa1]) => true,
        Some([0xa1, 0xb2, 0xc3, 0xd4]) => false,
        _ => return Vec::new(),
    };
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let time = f64::from(u32_at(at, le)) + f64::from(u32_at(at + 4, le)) / 1e6;
        let len = u32_at(at + 8, le) as usize;
        let start = at + 16;
        let Some(frame) = bytes.get(start..start + len) else {
            break;
        };
        frames.push((time, frame.to_vec()));
        at = start + len;
    }
    frames
}

/// RARP announcements (ethertype 0x8035, broadcast) from `mac`: their capture times.
fn rarp_announcements(frames: &[(f64, Vec<u8>)], mac: [u8; 6]) -> Vec<f64> {
    frames
        .iter()
        .filter(|(_, f)| f.len() >= 14 && f[12..14] == [0x80, 0x35] && f[6..12] == mac)
        .filter(|(_, f)| f[..6] == [0xff; 6])
        .map(|(t, _)| *t)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Scenario helpers
// ---------------------------------------------------------------------------------------------

const VM_MAC: &str = "02:00:00:00:00:01";
const VM_MAC_BYTES: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn two_nodes(capture: bool) -> Cluster {
    let mut opts = ClusterOptions::default().with("on_panic", "exit");
    opts.capture = capture;
    Cluster::start(opts).expect("cluster boots")
}

/// Creates and starts `vm1` (64 MiB) on node `k` and waits for its first heartbeat.
fn start_guest(cluster: &mut Cluster, k: usize, dirty: u64) {
    start_guest_with(cluster, k, &format!("dirty={dirty}"));
}

/// Like [`start_guest`], with the dirty options given whole (`dirty=N hot=P`).
fn start_guest_with(cluster: &mut Cluster, k: usize, dirty_options: &str) {
    let c = cluster.console(k);
    c.command_amid_output(&format!(
        "vm create vm1 mem=64 {dirty_options} mac={VM_MAC}"
    ))
    .unwrap();
    c.command_amid_output("vm start vm1").unwrap();
    c.expect("[vm1] ready", GUEST_LINE).unwrap();
    c.expect("[vm1] heartbeat 1 ok", GUEST_LINE).unwrap();
}

/// Whether `vm list` on `c` shows vm1, and its state.
fn listed_state(c: &mut Console) -> Option<String> {
    let (_, out) = c.command_amid_output("vm list").unwrap();
    out.lines()
        .find(|l| l.starts_with("vm1 "))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
}

/// Moves vm1 from node `from` to node `to` and checks everything a move must show; returns the
/// summary.
fn migrate_and_check(cluster: &mut Cluster, from: usize, to: usize) -> Summary {
    let to_name = format!("node{to}");
    let from_name = format!("node{from}");
    // Forget old output on the destination: its first heartbeat after the move is looked for
    // from here.
    cluster
        .console(to)
        .skip_output(Duration::from_millis(200), secs(5));
    let source_text_start = cluster.console(from).output().len();
    let (_, out) = cluster
        .console(from)
        .command_amid_output(&format!(
            "migrate vm1 {to_name} downtime={}",
            tests::BENCH_DOWNTIME_MS
        ))
        .unwrap();
    assert!(
        out.contains(&format!("migrating vm1 to {to_name}")),
        "{out}"
    );

    let (which, text) = cluster
        .console(from)
        .expect_any(
            &[
                &format!("migration of vm1 to {to_name} completed"),
                &format!("migration of vm1 to {to_name} failed"),
            ],
            MIGRATION,
        )
        .unwrap();
    assert_eq!(which, 0, "the migration failed:\n{text}");
    let line = cluster.console(from).expect("\n", secs(5)).unwrap();
    let summary = parse_summary(&line).unwrap_or_else(|| panic!("bad summary line {line:?}"));
    let digest_line = cluster
        .console(from)
        .expect("memory digest at switchover ", secs(30))
        .map(|_| cluster.console(from).expect("\n", secs(5)).unwrap())
        .unwrap();
    let source_digest = hex_after(&format!("digest {}", digest_line.trim()), "digest ")
        .unwrap_or_else(|| panic!("bad digest {digest_line:?}"));

    let arrived = cluster
        .console(to)
        .expect("incoming vm vm1 arrived", MIGRATION)
        .unwrap();
    let arrived = format!(
        "{arrived}{}",
        cluster.console(to).expect("\n", secs(5)).unwrap()
    );
    assert!(
        arrived.contains(&format!("running on {to_name}")),
        "{arrived}"
    );
    let dest_digest = hex_after(&arrived, "memory digest ").expect("digest on the destination");
    assert_eq!(
        source_digest, dest_digest,
        "the destination's memory differs from the source's at switchover"
    );

    // Heartbeats: the last on the source and the first on the destination are consecutive.
    let source_text = cluster.console(from).output()[source_text_start..].to_string();
    let last_on_source = heartbeats(&source_text, "vm1").last().copied();
    let next = cluster
        .console(to)
        .expect("[vm1] heartbeat ", GUEST_LINE)
        .unwrap();
    let rest = cluster.console(to).expect("\n", secs(5)).unwrap();
    let first_on_dest = heartbeats(&format!("{next}{rest}"), "vm1")[0];
    if let Some(last) = last_on_source {
        assert_eq!(
            first_on_dest,
            last + 1,
            "heartbeat jumped from {last} on {from_name} to {first_on_dest} on {to_name}"
        );
    }

    cluster.console(to).verify_guest("vm1", GUEST_LINE);
    assert_eq!(
        listed_state(cluster.console(to)).as_deref(),
        Some("running")
    );
    assert_eq!(
        listed_state(cluster.console(from)),
        None,
        "vm1 still on {from_name}"
    );
    summary
}

/// A failed migration: the VM runs on node1, verified, and node2 holds no copy.
fn assert_stayed_on_node1(cluster: &mut Cluster) {
    assert_eq!(listed_state(cluster.console(1)).as_deref(), Some("running"));
    cluster
        .console(1)
        .expect("[vm1] heartbeat ", GUEST_LINE)
        .unwrap();
    cluster.console(1).verify_guest("vm1", GUEST_LINE);
}

fn wait_failed_on_node1(cluster: &mut Cluster) -> String {
    let (which, text) = cluster
        .console(1)
        .expect_any(
            &[
                "migration of vm1 to node2 failed",
                "migration of vm1 to node2 completed",
            ],
            MIGRATION,
        )
        .unwrap();
    assert_eq!(which, 0, "the migration should have failed:\n{text}");
    cluster.console(1).expect("\n", secs(5)).unwrap()
}

/// Waits until the source has sent part of the memory (round 1 in progress).
fn wait_until_sending(c: &mut Console) {
    for _ in 0..200 {
        let (_, out) = c.command_amid_output("migrate status").unwrap();
        if out.contains("PreCopy") && !out.contains(" 0.0 MB sent") {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the migration never started sending");
}

/// Two nodes; vm1, dirtying 2000 pages/s, starts on node1 and its migration to node2 is under
/// way when `interrupt` strikes the cluster mid-copy: the migration fails and the VM stays on
/// node1 (checked here). Returns the cluster for the rest of the test.
fn interrupt_migration(interrupt: impl FnOnce(&mut Cluster)) -> Cluster {
    let mut cluster = two_nodes(false);
    start_guest(&mut cluster, 1, 2000);
    cluster
        .console(1)
        .command_amid_output("migrate vm1 node2")
        .unwrap();
    wait_until_sending(cluster.console(1));
    interrupt(&mut cluster);
    let line = wait_failed_on_node1(&mut cluster);
    eprintln!("{line}");
    assert_stayed_on_node1(&mut cluster);
    cluster
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// An idle guest goes to node2 and back; node2's link capture shows the VM's announcements.
#[test]
#[ignore = "boots two QEMU nodes; run by ./run-tests.sh"]
fn idle_guest_migrates_there_and_back() {
    let mut cluster = two_nodes(true);
    start_guest(&mut cluster, 1, 0);
    let there = migrate_and_check(&mut cluster, 1, 2);
    // The announcements go out over 800 ms after the resume; wait for them to be captured.
    std::thread::sleep(Duration::from_secs(3));
    let pcap = std::fs::read(cluster.dir().join("node2.cluster.pcap")).unwrap();
    let times = rarp_announcements(&pcap_frames(&pcap), VM_MAC_BYTES);
    assert_eq!(
        times.len(),
        5,
        "RARP announcements for {VM_MAC} in node2's capture"
    );
    // QEMU's schedule: rounds at 0, 50, 200, 450 and 800 ms; delays are lower bounds.
    let span = times[4] - times[0];
    assert!(span >= 0.75, "announcements spread over {span} s");
    let back = migrate_and_check(&mut cluster, 2, 1);
    eprintln!("there: {there:?}, back: {back:?}");
    cluster.stop().unwrap();
}

/// Pages per second the dirtying guest rewrites: 80000 pages/s = 328 MB/s, measured under QEMU
/// TCG: `net bench` between the two nodes carries 91-151 MB/s (22000-37000 pages/s), a
/// migration streams 55-93 MB/s while copying, and the 64 MiB guest does rewrite 80400-81000
/// pages/s (a dirty-log harvest over 0.10-0.15 s). So every pre-copy round finds its whole
/// memory dirty again until the throttle (auto-converge) reaches 60-99 %: 20-24 rounds, 13-25 s
/// each way.
const FASTER_THAN_THE_LINK: u64 = 80_000;

/// [`migrate_and_check`] for a guest faster than the link: the source must have throttled it
/// (`migration of vm1: throttle N%`), or the guest was not as fast as the test says.
fn migrate_throttled(cluster: &mut Cluster, from: usize, to: usize) -> Summary {
    let start = cluster.console(from).output().len();
    let summary = migrate_and_check(cluster, from, to);
    let text = cluster.console(from).output()[start..].to_string();
    assert!(
        text.contains("migration of vm1: throttle "),
        "node{from} never throttled a guest dirtying {FASTER_THAN_THE_LINK} pages/s: {summary:?}"
    );
    summary
}

/// A guest that dirties memory faster than the link converges (auto-converge) both ways.
#[test]
#[ignore = "boots two QEMU nodes; run by ./run-tests.sh"]
fn dirtying_guest_converges_there_and_back() {
    let mut cluster = two_nodes(false);
    start_guest(&mut cluster, 1, FASTER_THAN_THE_LINK);
    let there = migrate_throttled(&mut cluster, 1, 2);
    assert!(
        there.rounds > 1,
        "a dirtying guest needs more than one round: {there:?}"
    );
    let back = migrate_throttled(&mut cluster, 2, 1);
    eprintln!("there: {there:?}, back: {back:?}");
    cluster.stop().unwrap();
}

/// Wrong requests get clear errors; a refusal and a cancel leave the VM where it was.
#[test]
#[ignore = "boots two QEMU nodes; run by ./run-tests.sh"]
fn bad_requests_refusal_and_cancel_leave_the_vm_on_the_source() {
    let mut cluster = two_nodes(false);
    start_guest(&mut cluster, 1, 0);
    let c = cluster.console(1);
    for (line, error) in [
        ("migrate nosuch node2", "no VM named 'nosuch'"),
        ("migrate vm1 node9", "unknown host 'node9'"),
        ("migrate vm1 node1", "already runs on this node"),
        ("migrate vm1 10.10.0.1", "already runs on this node"),
        ("migrate vm1", "usage"),
        (
            "migrate vm1 node2 downtime=0",
            "downtime must be 1..=10000 ms",
        ),
        ("migrate vm1 node2 speed=3", "unknown option 'speed=3'"),
        ("migrate cancel vm1", "no migration of 'vm1'"),
        ("migrate resolve vm1 maybe", "here' or 'there'"),
    ] {
        let (_, out) = c.command_amid_output(line).unwrap();
        assert!(out.contains(error), "{line}: expected {error:?} in:\n{out}");
    }

    // node2 already has a VM of that name: refused before any page is sent.
    cluster
        .console(2)
        .command_amid_output("vm create vm1 mem=8")
        .unwrap();
    cluster
        .console(1)
        .command_amid_output("migrate vm1 node2")
        .unwrap();
    let line = wait_failed_on_node1(&mut cluster);
    assert!(line.contains("NameExists"), "{line}");
    assert_stayed_on_node1(&mut cluster);
    let (_, out) = cluster
        .console(2)
        .command_amid_output("vm destroy vm1")
        .unwrap();
    assert!(out.contains("destroyed"), "{out}");

    // node2 has too little memory left (a big VM takes most of it): refused, with the figure.
    let (_, out) = cluster
        .console(2)
        .command_amid_output("vm create big mem=440")
        .unwrap();
    assert!(out.contains("created"), "{out}");
    cluster
        .console(1)
        .command_amid_output("migrate vm1 node2")
        .unwrap();
    let line = wait_failed_on_node1(&mut cluster);
    assert!(line.contains("NotEnoughMemory"), "{line}");
    assert_stayed_on_node1(&mut cluster);
    cluster
        .console(2)
        .command_amid_output("vm destroy big")
        .unwrap();

    // A second migration while one runs, then a cancel.
    let c = cluster.console(1);
    c.command_amid_output("migrate vm1 node2").unwrap();
    let (_, out) = c.command_amid_output("migrate vm1 node2").unwrap();
    assert!(out.contains("already running"), "{out}");
    let (_, out) = c.command_amid_output("vm stop vm1").unwrap();
    assert!(out.contains("being migrated"), "{out}");
    wait_until_sending(c);
    let (_, out) = c.command_amid_output("migrate cancel vm1").unwrap();
    assert!(out.contains("cancelled"), "{out}");
    let line = wait_failed_on_node1(&mut cluster);
    assert!(line.contains("Cancelled"), "{line}");
    assert_stayed_on_node1(&mut cluster);
    cluster
        .console(2)
        .expect("incoming migration of vm1 failed", MIGRATION)
        .unwrap();
    assert_eq!(listed_state(cluster.console(2)), None);
    cluster.stop().unwrap();
}

/// The destination commits but its acknowledgement is lost (a test hook resets the connection
/// just before it leaves): the source, in doubt, keeps the VM paused and asks node2, which says
/// it runs the VM; the source then frees its copy. The VM runs on node2 only, intact.
#[test]
#[ignore = "boots two QEMU nodes; run by ./run-tests.sh"]
fn lost_commit_acknowledgement_is_settled_by_asking_the_destination() {
    let mut cluster = two_nodes(false);
    start_guest(&mut cluster, 1, 0);
    let (_, out) = cluster
        .console(2)
        .command_amid_output("migrate debug drop-commit-ack")
        .unwrap();
    assert!(
        out.contains("will lose its commit acknowledgement"),
        "{out}"
    );
    let start = cluster.console(1).output().len();
    migrate_and_check(&mut cluster, 1, 2);
    let text = cluster.console(1).output()[start..].to_string();
    let doubt = text.find("is IN DOUBT").expect("the source was in doubt");
    let settled = text
        .find("migration of vm1 no longer in doubt: node2 runs it")
        .expect("the source asked node2");
    let completed = text.find("migration of vm1 to node2 completed").unwrap();
    assert!(doubt < settled && settled < completed, "{text}");
    let node2 = cluster.console(2).output();
    assert!(node2.contains("owner query for vm1: Runs"), "{node2}");
    cluster.stop().unwrap();
}

/// The cluster link is cut in the middle of the copy: the VM stays on node1; once the link is
/// back, the migration succeeds.
#[test]
#[ignore = "boots two QEMU nodes; run by ./run-tests.sh"]
fn link_cut_mid_migration_leaves_the_vm_on_the_source() {
    let mut cluster = interrupt_migration(|cluster| cluster.set_cluster_link(2, false).unwrap());
    cluster
        .console(2)
        .expect("incoming migration of vm1 failed", MIGRATION)
        .unwrap();
    assert_eq!(listed_state(cluster.console(2)), None);

    cluster.set_cluster_link(2, true).unwrap();
    migrate_and_check(&mut cluster, 1, 2);
    cluster.stop().unwrap();
}

/// The destination dies in the middle of the copy: the VM stays on node1.
#[test]
#[ignore = "boots two QEMU nodes; run by ./run-tests.sh"]
fn destination_killed_mid_migration_leaves_the_vm_on_the_source() {
    let cluster = interrupt_migration(|cluster| cluster.kill_node(2).unwrap());
    // The killed node is expected to be gone; stop the rest.
    drop(cluster);
}

/// `net bench node<to> 5` on node `from`: the TCP throughput in MB/s.
fn raw_throughput(cluster: &mut Cluster, from: usize, to: usize) -> f64 {
    bench_throughput(cluster, from, &format!("net bench node{to} 5"))
}

/// The size of the benchmark's fresh raw transfers: about the idle stream's 63 MB.
const FRESH_MIB: u32 = 60;

/// `net send node<to> FRESH_MIB` on node `from`: the throughput of a new TCP connection carrying
/// as much as an idle migration's stream, slow start included, in MB/s.
fn fresh_throughput(cluster: &mut Cluster, from: usize, to: usize) -> f64 {
    bench_throughput(cluster, from, &format!("net send node{to} {FRESH_MIB}"))
}

/// Runs a `net bench` or `net send` command on node `from`: its throughput in MB/s.
fn bench_throughput(cluster: &mut Cluster, from: usize, command: &str) -> f64 {
    let c = cluster.console(from);
    c.set_default_timeout(secs(120));
    let out = c.command(command).unwrap();
    c.set_default_timeout(secs(60));
    out.lines()
        .find(|l| l.contains(" bench: ") && l.contains("intact"))
        .and_then(|l| l.split(" MB/s").next()?.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no bench figure in:\n{out}"))
}

/// Idle migrations (and raw measurements) whose medians the benchmark reports.
const IDLE_RUNS: usize = 5;

/// Migrations of each dirtying guest whose median the benchmark reports.
const DIRTY_RUNS: usize = 3;

/// The run of median stream throughput, and every run's throughput as printed.
fn median_run(mut runs: Vec<Summary>) -> (Summary, Vec<String>) {
    let printed = runs
        .iter()
        .map(|s| format!("{:.1}", s.stream_mb_s))
        .collect();
    runs.sort_by(|a, b| a.stream_mb_s.total_cmp(&b.stream_mb_s));
    let median = runs.swap_remove(runs.len() / 2);
    (median, printed)
}

/// The median of a non-empty list.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The benchmark (issue 5, item 6): raw `net bench` throughput between the nodes, then an idle
/// and two dirtying 64 MiB guests migrated over the same link. Stream/raw is given against the
/// 5-second bench (the goal's measure: a long-lived connection's steady rate) and against a new
/// connection carrying as much as the idle stream: a migration opens a new connection, whose TCP
/// slow start weighs a few percent in a stream of ~0.4 s and nothing in 5 s. A warm-up
/// migration comes first (shown, not counted); the idle figures are the median of five runs,
/// each dirtying scenario's of three. The figures go to
/// target/bench/migration.txt, whose last line gives QEMU's reference run
/// (tests/tests/qemu_migration.rs) the bandwidth to set. ./run-tests.sh runs it alone.
///
/// The dirtying guests write 20000 pages/s: over a hot set of
/// [`tests::BENCH_DIRTY_HOT_PAGES`] pages, the same as the file QEMU's reference guest rewrites
/// (like for like), and over all of their memory (no reference: a Linux guest cannot rewrite
/// all of its memory).
#[test]
#[ignore = "boots two QEMU nodes; run alone by ./run-tests.sh"]
fn migration_benchmark() {
    let mut cluster = two_nodes(false);
    // A first migration runs code the emulator has not translated yet (on both nodes, the
    // switchover's above all): its pause was 10-20 ms where later ones take 1-2. It is shown,
    // not counted.
    start_guest(&mut cluster, 1, 0);
    let warm_up = migrate_and_check(&mut cluster, 1, 2);
    cluster
        .console(2)
        .command_amid_output("vm destroy vm1")
        .unwrap();
    // The emulated link's throughput swings by 10-20 % between runs on a shared 2-core
    // machine: the raw figure and the idle migration are the medians of five, each raw
    // measurement right before its migration, all node1 -> node2; each dirtying scenario the
    // median of three.
    let mut raw = Vec::new();
    let mut fresh = Vec::new();
    let mut idle = Vec::new();
    for _ in 0..IDLE_RUNS {
        raw.push(raw_throughput(&mut cluster, 1, 2));
        fresh.push(fresh_throughput(&mut cluster, 1, 2));
        start_guest(&mut cluster, 1, 0);
        idle.push(migrate_and_check(&mut cluster, 1, 2));
        cluster
            .console(2)
            .command_amid_output("vm destroy vm1")
            .unwrap();
    }
    let hot_pages = tests::BENCH_DIRTY_HOT_PAGES;
    let mut dirtying = |options: &str| {
        let runs: Vec<Summary> = (0..DIRTY_RUNS)
            .map(|_| {
                start_guest_with(&mut cluster, 1, options);
                let run = migrate_and_check(&mut cluster, 1, 2);
                cluster
                    .console(2)
                    .command_amid_output("vm destroy vm1")
                    .unwrap();
                run
            })
            .collect();
        median_run(runs)
    };
    let (hot, hot_runs) = dirtying(&format!("dirty={BENCH_DIRTY_RATE} hot={hot_pages}"));
    let (all, all_runs) = dirtying(&format!("dirty={BENCH_DIRTY_RATE}"));
    let raw_runs: Vec<String> = raw.iter().map(|r| format!("{r:.1}")).collect();
    let raw = median(&raw);
    let fresh_runs: Vec<String> = fresh.iter().map(|r| format!("{r:.1}")).collect();
    let fresh = median(&fresh);
    let (idle, idle_runs) = median_run(idle);

    let mut report = String::from(
        "live migration, 64 MiB test guest (QEMU TCG nodes, e1000s linked through frame-hub's switch):\n",
    );
    report.push_str(&format!(
        "  raw throughput node1 -> node2 (net bench node2 5): median {raw:.2} MB/s of {} ({} MB/s)\n",
        raw_runs.len(),
        raw_runs.join(", ")
    ));
    report.push_str(&format!(
        "  raw throughput of a new connection carrying {FRESH_MIB} MiB, about the idle stream's size, \
         slow start included (net send node2 {FRESH_MIB}): median {fresh:.2} MB/s of {} ({} MB/s)\n",
        fresh_runs.len(),
        fresh_runs.join(", ")
    ));
    report.push_str(&format!(
        "  warm-up (a first migration, not counted: the emulator translates the migration's code \
         on its first run): total {:.1} ms, downtime {:.1} ms ({:.1} ms sent), {:.1} MB/s\n",
        warm_up.total_ms, warm_up.downtime_ms, warm_up.send_downtime_ms, warm_up.stream_mb_s
    ));
    for (name, runs) in [
        ("idle", &idle_runs),
        ("dirty, hot set", &hot_runs),
        ("dirty, all memory", &all_runs),
    ] {
        report.push_str(&format!(
            "  {name}: the median (by stream MB/s) of {} migrations node1 -> node2 ({} MB/s)\n",
            runs.len(),
            runs.join(", ")
        ));
    }
    report.push_str(&format!(
        "  downtime target {} ms (migrate ... downtime=; QEMU's reference has a row with the same \
         downtime-limit)\n",
        tests::BENCH_DOWNTIME_MS
    ));
    report.push_str(
        "  downtime: from the pause until the destination acknowledged (it resumes the VM first); \
         sent: from the pause until the last byte was handed to TCP, what QEMU reports as its downtime\n",
    );
    report.push_str(
        "  scenario                          total ms  downtime ms  sent ms  MB on wire  rounds  throttle %  stream MB/s  stream/raw  stream/new connection\n",
    );
    let hot_name = format!(
        "dirty {BENCH_DIRTY_RATE} pages/s, {} MiB hot",
        hot_pages * 4096 / (1024 * 1024)
    );
    let all_name = format!("dirty {BENCH_DIRTY_RATE} pages/s, all 64 MiB");
    for (name, s) in [("idle", &idle), (&*hot_name, &hot), (&*all_name, &all)] {
        report.push_str(&format!(
            "  {name:<32} {:>9.1} {:>12.1} {:>8.1} {:>11.1} {:>7} {:>11} {:>12.1} {:>11.2} {:>22.2}\n",
            s.total_ms,
            s.downtime_ms,
            s.send_downtime_ms,
            s.wire_mb,
            s.rounds,
            s.throttle,
            s.stream_mb_s,
            s.stream_mb_s / raw,
            s.stream_mb_s / fresh
        ));
    }
    report.push_str(
        "  (command: cargo test -p tests --test migration -- --include-ignored migration_benchmark)\n",
    );
    // The stream throughput of the idle run: QEMU's reference migration is throttled to it.
    report.push_str(&format!(
        "reference_bandwidth_mbps={:.0}\n",
        idle.stream_mb_s.max(1.0)
    ));
    print!("{report}");
    let dir = tests::target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("migration.txt"), report).unwrap();
    cluster.stop().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Parser tests (not ignored)
// ---------------------------------------------------------------------------------------------

#[test]
fn summary_and_digest_lines_parse() {
    let line = "[migrate] migration of vm1 to node2 completed: total 4210.5 ms, downtime 35.2 ms \
                (3.1 ms until the last byte was sent), 70.1 MB on the wire (16.6 MB/s while copying), 3 rounds, throttle 30%, pages raw 16000 zero 380 compressed 4";
    assert_eq!(
        parse_summary(line),
        Some(Summary {
            total_ms: 4210.5,
            downtime_ms: 35.2,
            send_downtime_ms: 3.1,
            wire_mb: 70.1,
            stream_mb_s: 16.6,
            rounds: 3,
            throttle: 30,
        })
    );
    assert_eq!(
        hex_after("digest 0x00000000deadbeef)", "digest "),
        Some(0xdead_beef)
    );
    assert_eq!(
        heartbeats(
            "[vm1] heartbeat 7 ok\r\n[x] heartbeat 9 ok\n[vm1] heartbeat 8 ok",
            "vm1"
        ),
        [7, 8]
    );
}

#[test]
fn pcap_rarp_frames_are_found() {
    let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1];
    pcap.extend_from_slice(&[0; 20]);
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&VM_MAC_BYTES);
    frame.extend_from_slice(&[0x80, 0x35]);
    frame.resize(60, 0);
    for (sec, usec) in [(10u32, 0u32), (10, 500_000)] {
        pcap.extend_from_slice(&sec.to_le_bytes());
        pcap.extend_from_slice(&usec.to_le_bytes());
        pcap.extend_from_slice(&60u32.to_le_bytes());
        pcap.extend_from_slice(&60u32.to_le_bytes());
        pcap.extend_from_slice(&frame);
    }
    let times = rarp_announcements(&pcap_frames(&pcap), VM_MAC_BYTES);
    assert_eq!(times, [10.0, 10.5]);
    assert!(rarp_announcements(&pcap_frames(&pcap), [2, 0, 0, 0, 0, 2]).is_empty());
}
