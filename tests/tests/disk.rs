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

use tests::guest_disk::{
    boot_vm, cmd, disk_verify, field, guest_line, heartbeat, heartbeat_writes, memory_verify, ok,
    refused, wait_disk_writes,
};
use tests::{Cluster, ClusterOptions, Console};

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
        ("disk=iscsi:lun1", "<target iqn>/<lun>"),
        // A single node has no storage network, so no portal.
        ("disk=iqn.2026-11.test.hv:cluster/1", "no shared storage"),
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
