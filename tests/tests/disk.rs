//! End-to-end tests of the guest's virtio-blk disk, on a QEMU node (`-cpu EPYC`, AMD SVM) and
//! on a Bochs node (Intel VMX):
//! `vm create ... disk=ram:8` gives the test guest a legacy virtio-blk PCI device backed by a
//! RAM disk of the node, which completes requests asynchronously (on a later pass of the
//! node's main loop). The guest's workload keeps writing self-describing 4 KiB blocks and
//! remembers what each acknowledged write put where (`guest_abi::disk`); these tests make it
//! read everything back (`vm verify <vm> disk`), compare its digest with the node's own raw
//! read of the disk (`vm disk <vm> digest`), power-cycle it, try to migrate it (a RAM disk
//! stays on its node, so the VM must too), and check that a VM without a disk behaves as
//! before.
//!
//! Every test boots a node, so every test is `#[ignore]`d like those of vms.rs:
//! `./run-tests.sh` runs them; by hand:
//! `cargo test -p tests --test disk -- --include-ignored --test-threads 2`
//! (add `HV_E2E_NO_BUILD=1` when the images are built). The line parsers have plain unit tests
//! at the end.
//!
//! What the node prints that these tests rely on:
//! - guest lines `[g1] disk: virtio-blk 16384 sectors at port 0xc000, writing 2048 blocks of
//!   4 KiB` or `[g1] disk: none`; `[g1] heartbeat N ok disk writes=W`;
//!   `[g1] disk verify ok blocks=N writes=W hash=0x.. cycles=C`; `[g1] disk hold writes=W`;
//!   `[g1] disk run`; `[g1] disk verify: no disk`;
//! - `vm disk g1 digest`: `vm g1: disk digest blocks=N hash=0x..`;
//! - `vm show g1`: `disk: virtio-blk (legacy) 00:04.0 io 0xc000, 8 MiB RAM disk, 16384
//!   sectors, on this node only`, `disk i/o: ...`, `migration: not possible: ...`.

use std::time::{Duration, Instant};

use tests::{Cluster, ClusterOptions, Console};

/// Bound on waiting for one guest line (TCG on a loaded machine is slow).
const GUEST_LINE: Duration = Duration::from_secs(60);

/// The value of `key=value` in a line of space-separated fields, as a number (`0x..` or
/// decimal).
fn field(line: &str, key: &str) -> Option<u64> {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?;
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

/// `W` from a heartbeat's `... ok disk writes=W` (None without the disk part).
fn heartbeat_writes(line: &str) -> Option<u64> {
    line.contains(" ok disk ")
        .then(|| field(line, "writes"))
        .flatten()
}

/// Runs a command amid guest output; returns its output.
fn cmd(console: &mut Console, line: &str) -> String {
    console
        .command_amid_output(line)
        .unwrap_or_else(|e| panic!("command {line:?}: {e:?}"))
        .1
}

/// Runs a command that must succeed: its output has `expect` and no `error`.
fn ok(console: &mut Console, line: &str, expect: &str) -> String {
    let out = cmd(console, line);
    assert!(
        !out.contains("error") && out.contains(expect),
        "{line:?}: expected {expect:?} and no error, got:\n{out}"
    );
    out
}

/// Runs a command that must be refused with a message containing `what`.
fn refused(console: &mut Console, line: &str, what: &str) {
    let out = cmd(console, line);
    assert!(
        out.contains("error") && out.contains(what),
        "{line:?}: expected an error saying {what:?}, got:\n{out}"
    );
}

/// Reads the rest of the current line (after a match), without the line end.
fn rest_of_line(console: &mut Console) -> String {
    let text = console.expect("\n", GUEST_LINE).unwrap();
    text.trim_end_matches(['\r', '\n']).to_string()
}

/// Waits for `[vm] <prefix>` and returns the rest of that line.
fn guest_line(console: &mut Console, vm: &str, prefix: &str) -> String {
    console
        .expect(&format!("[{vm}] {prefix}"), GUEST_LINE)
        .unwrap_or_else(|e| panic!("waiting for [{vm}] {prefix}: {e:?}"));
    rest_of_line(console)
}

/// Creates and starts a VM; returns the guest's `disk:` line (after `disk: `).
fn boot_vm(console: &mut Console, name: &str, options: &str) -> String {
    ok(
        console,
        &format!("vm create {name} {options}"),
        &format!("vm {name} created (off)"),
    );
    ok(
        console,
        &format!("vm start {name}"),
        &format!("vm {name} started"),
    );
    guest_line(console, name, "ready ");
    guest_line(console, name, "disk: ")
}

/// The next heartbeat of `vm`: the rest of its line (`N ok ...`), which must say ok.
fn heartbeat(console: &mut Console, vm: &str) -> String {
    let line = guest_line(console, vm, "heartbeat ");
    assert!(
        line.split_whitespace().nth(1) == Some("ok"),
        "[{vm}] heartbeat {line}: the guest reports a bad page"
    );
    line
}

/// Waits until `vm`'s heartbeat reports at least `min` acknowledged disk writes; returns the
/// count seen.
fn wait_disk_writes(console: &mut Console, vm: &str, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = heartbeat(console, vm);
        let writes = heartbeat_writes(&line)
            .unwrap_or_else(|| panic!("[{vm}] heartbeat {line}: no disk part"));
        if writes >= min {
            return writes;
        }
        assert!(
            Instant::now() < deadline,
            "[{vm}] only {writes} disk writes acknowledged after 120 s"
        );
    }
}

/// `vm verify <vm> disk`; returns (blocks, writes, hash) of `disk verify ok ...`.
fn disk_verify(console: &mut Console, vm: &str) -> (u64, u64, u64) {
    ok(
        console,
        &format!("vm verify {vm} disk"),
        "disk verification requested",
    );
    let ok_line = format!("[{vm}] disk verify ok ");
    let failed = format!("[{vm}] disk verify FAILED");
    let (which, text) = console
        .expect_any(&[&ok_line, &failed], GUEST_LINE)
        .unwrap_or_else(|e| panic!("waiting for [{vm}] disk verify: {e:?}"));
    let line = rest_of_line(console);
    assert_eq!(which, 0, "[{vm}]'s disk verification failed: {text}{line}");
    // Shown with the output of a failing test (or with --nocapture).
    eprintln!("[{vm}] disk verify ok {line}");
    let get = |k| field(&line, k).unwrap_or_else(|| panic!("no {k}= in disk verify ok {line}"));
    (get("blocks"), get("writes"), get("hash"))
}

/// `vm verify <vm>`: the guest's memory check must pass.
fn memory_verify(console: &mut Console, vm: &str) {
    ok(
        console,
        &format!("vm verify {vm}"),
        "verification requested",
    );
    let ok_line = format!("[{vm}] verify ok ");
    let failed = format!("[{vm}] verify FAILED");
    let (which, text) = console
        .expect_any(&[&ok_line, &failed], GUEST_LINE)
        .unwrap();
    assert_eq!(which, 0, "[{vm}]'s memory verification failed:\n{text}");
}

/// `memory: total 502.6 MiB, free 486.6 MiB` from `info`: free MiB.
fn free_mib(console: &mut Console) -> f64 {
    let out = cmd(console, "info");
    out.lines()
        .find(|l| l.starts_with("memory:"))
        .and_then(|l| l.split("free ").nth(1))
        .and_then(|f| f.split_whitespace().next())
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("no free memory in info:\n{out}"))
}

/// A guest with an 8 MiB RAM disk writes to it continuously; every acknowledged write reads
/// back intact, the guest's digest equals the node's raw read of the disk, the memory
/// workload is unaffected, a power cycle (with writes in flight) leaves a working disk, and
/// destroying the VM frees the disk's memory. `opts` picks the emulator (and so SVM or VMX).
fn guest_disk_writes_and_verifies(opts: ClusterOptions) {
    let mut cluster = Cluster::start(opts).unwrap();
    let console = cluster.console(1);
    let free_before = free_mib(console);
    let disk = boot_vm(console, "g1", "mem=16 disk=ram:8");
    assert!(
        disk.starts_with("virtio-blk 16384 sectors") && disk.contains("2048 blocks"),
        "[g1] disk: {disk}"
    );
    let running = free_mib(console);
    assert!(
        running <= free_before - 24.0,
        "a 16 MiB VM with an 8 MiB disk took only {:.1} MiB",
        free_before - running
    );

    // The workload runs: acknowledged writes grow while the heartbeat keeps its pace.
    let first = wait_disk_writes(console, "g1", 1);
    let later = wait_disk_writes(console, "g1", first + 100);
    assert!(later > first, "{first} then {later}");

    let show = ok(console, "vm show g1", "disk: virtio-blk");
    for want in [
        "00:04.0 io 0xc000",
        "8 MiB RAM disk",
        "16384 sectors",
        "on this node only",
        "migration: not possible",
        "disk device: status 0x07",
    ] {
        assert!(show.contains(want), "vm show lacks {want:?}:\n{show}");
    }
    let io = show
        .lines()
        .find(|l| l.contains("disk i/o:"))
        .unwrap_or_else(|| panic!("no disk i/o line:\n{show}"));
    assert!(io.contains(" 0 I/O failures, 0 unsupported"), "{io}");

    // Read back every written block while the workload keeps going.
    let (blocks, writes, _) = disk_verify(console, "g1");
    assert!(writes > 0 && blocks > 0, "blocks={blocks} writes={writes}");
    assert!(
        blocks <= 2048 && blocks <= writes,
        "blocks={blocks} writes={writes}"
    );

    // Held (no write in flight), the guest's digest is the node's digest of the raw disk.
    ok(console, "vm disk g1 hold", "disk hold requested");
    let held = guest_line(console, "g1", "disk hold ");
    let held_writes = field(&held, "writes").unwrap_or_else(|| panic!("disk hold {held}"));
    let (blocks, writes, hash) = disk_verify(console, "g1");
    assert_eq!(writes, held_writes, "writes went on while held");
    let out = ok(console, "vm disk g1 digest", "disk digest");
    eprintln!("node: {}", out.trim());
    assert_eq!(
        (field(&out, "blocks"), field(&out, "hash")),
        (Some(blocks), Some(hash)),
        "the guest's digest (blocks={blocks} hash={hash:#x}) differs from the node's:\n{out}"
    );
    ok(console, "vm disk g1 run", "disk run requested");
    guest_line(console, "g1", "disk run");
    wait_disk_writes(console, "g1", held_writes + 20);

    // The memory workload did not suffer.
    memory_verify(console, "g1");

    // A power cycle while writes are in flight: the disk device starts over, the RAM disk
    // keeps its contents, the new boot's writes verify.
    ok(console, "vm stop g1", "vm g1 stopped");
    ok(console, "vm start g1", "vm g1 started");
    let disk = guest_line(console, "g1", "disk: ");
    assert!(
        disk.starts_with("virtio-blk 16384 sectors"),
        "[g1] disk: {disk}"
    );
    wait_disk_writes(console, "g1", 20);
    let (_, writes, _) = disk_verify(console, "g1");
    assert!(writes >= 20, "{writes}");

    // Destroying the VM frees its RAM and its disk.
    ok(console, "vm destroy g1", "vm g1 destroyed");
    let after = free_mib(console);
    assert!(
        (after - free_before).abs() <= 0.1,
        "free memory {free_before} MiB before the VM, {after} MiB after destroying it"
    );
    cluster.stop().unwrap();
}

#[test]
#[ignore = "boots a QEMU node; run with --include-ignored (./run-tests.sh does)"]
fn qemu_guest_disk_writes_and_verifies() {
    guest_disk_writes_and_verifies(ClusterOptions::single());
}

/// The same on Bochs (Intel VMX with EPT): the I/O exits of the disk take the VMX path.
#[test]
#[ignore = "boots a Bochs node; run with --include-ignored (./run-tests.sh does)"]
fn bochs_guest_disk_writes_and_verifies() {
    guest_disk_writes_and_verifies(ClusterOptions::single_bochs());
}

/// A VM whose disk exists only on its node cannot move: `migrate` is refused up front, and the
/// VM keeps running on the source with its disk intact; the destination holds no copy.
#[test]
#[ignore = "boots two QEMU nodes; run with --include-ignored (./run-tests.sh does)"]
fn qemu_vm_with_a_ram_disk_stays_on_its_node() {
    let mut cluster = Cluster::start(ClusterOptions::default().with("on_panic", "exit")).unwrap();
    let c1 = cluster.console(1);
    boot_vm(c1, "g1", "mem=16 disk=ram:8");
    let before = wait_disk_writes(c1, "g1", 50);
    let out = cmd(c1, "migrate g1 node2");
    assert!(
        out.contains("error") && out.contains("cannot be migrated"),
        "migrate of a VM with a RAM disk was not refused up front: {out}"
    );
    let list = cmd(c1, "vm list");
    assert!(
        list.lines()
            .any(|l| l.starts_with("g1 ") && l.contains("running")),
        "{list}"
    );
    wait_disk_writes(c1, "g1", before + 50);
    disk_verify(c1, "g1");
    memory_verify(c1, "g1");
    let list = cmd(cluster.console(2), "vm list");
    assert!(!list.lines().any(|l| l.starts_with("g1 ")), "{list}");
    cluster.stop().unwrap();
}

/// A VM without a disk says so and behaves as before; bad `disk=` values are refused clearly
/// and create nothing.
#[test]
#[ignore = "boots a QEMU node; run with --include-ignored (./run-tests.sh does)"]
fn qemu_guest_without_disk() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let console = cluster.console(1);
    for (option, what) in [
        ("disk=ram:0", "disk must be ram:<MiB>"),
        ("disk=ram:2048", "disk must be ram:<MiB>"),
        ("disk=ram:lots", "disk must be ram:<MiB>"),
        ("disk=ram", "disk must be ram:<MiB>"),
        ("disk=nvme:8", "disk must be ram:<MiB>"),
        ("disk=iscsi:lun1", "not available yet"),
    ] {
        refused(console, &format!("vm create bad mem=16 {option}"), what);
    }
    refused(
        console,
        "vm create big mem=256 disk=ram:1024",
        "not enough memory",
    );
    let list = cmd(console, "vm list");
    assert!(!list.contains("bad") && !list.contains("big"), "{list}");

    let disk = boot_vm(console, "g2", "mem=16");
    assert_eq!(disk, "none");
    let line = heartbeat(console, "g2");
    assert!(
        heartbeat_writes(&line).is_none() && !line.contains("disk"),
        "{line}"
    );
    memory_verify(console, "g2");
    ok(console, "vm verify g2 disk", "disk verification requested");
    guest_line(console, "g2", "disk verify: no disk");
    let show = ok(console, "vm show g2", "disk: none");
    assert!(!show.contains("migration: not possible"), "{show}");
    refused(console, "vm disk g2 digest", "has no disk");
    heartbeat(console, "g2");
    cluster.stop().unwrap();
}

#[cfg(test)]
mod parsers {
    use super::*;

    #[test]
    fn fields_and_heartbeats() {
        let line = "ok blocks=12 writes=300 hash=0x00ab cycles=5";
        assert_eq!(field(line, "blocks"), Some(12));
        assert_eq!(field(line, "hash"), Some(0xab));
        assert_eq!(field(line, "nope"), None);
        assert_eq!(heartbeat_writes("7 ok disk writes=42"), Some(42));
        assert_eq!(heartbeat_writes("7 ok disk writes=42 errors=1"), Some(42));
        assert_eq!(heartbeat_writes("7 ok"), None);
    }
}
