//! End-to-end tests of shared storage (issue 6): two QEMU nodes and the tgtd that qemu-run.sh
//! starts on the host with one shared LUN. The test guest's disk is that LUN
//! (`vm create g1 ... disk=<iqn>/1`); its workload keeps writing self-describing blocks and
//! remembers what each acknowledged write put where. The VM moves node1 -> node2 -> node1
//! while it writes; afterwards the guest verifies every block it wrote, and a host-side read
//! of the LUN through our own initiator (`storage::blocking`) must agree block for block
//! (the same digest): no acknowledged write was lost. Along the way: the disk's reservation
//! follows the VM (`disk list` names the holder), the source's write after the handoff is
//! refused (RESERVATION CONFLICT, the node's own fence check), a second VM cannot take a LUN
//! another node holds, and a migration that fails at the switchover after the destination
//! took the disk (`migrate debug fail-takeover`) leaves the disk with the source and the VM
//! running there.
//!
//! Every test boots two nodes, so it is `#[ignore]`d like the other e2e tests:
//! `./run-tests.sh` runs it; by hand: `cargo test -p tests --test shared_disk --
//! --include-ignored`.

use std::net::SocketAddr;
use std::time::Duration;

use guest_abi::disk::DiskDigest;
use storage::blocking::Client;
use storage::iscsi::{Isid, SessionConfig};
use tests::guest_disk::{
    boot_vm, cmd, disk_verify, guest_line, memory_verify, ok, refused, wait_disk_writes,
};
use tests::{Cluster, ClusterOptions, Console};

/// How long a migration of the 16 MiB guest may take under TCG on a loaded machine.
const MIGRATION: Duration = Duration::from_secs(180);

/// The shared LUN qemu-run.sh gives the cluster: (host-side portal, `<iqn>/1`).
fn shared_lun(cluster: &Cluster) -> (SocketAddr, String) {
    let read = |name: &str| {
        std::fs::read_to_string(cluster.dir().join(name))
            .unwrap_or_else(|e| panic!("{name} in the run directory: {e}"))
            .trim()
            .to_string()
    };
    let portal = read("storage.portal").parse().expect("a host:port portal");
    (portal, format!("{}/1", read("storage.iqn")))
}

/// Migrates `vm` from the node of `from` to `to` and waits for the summary.
fn migrate(from: &mut Console, vm: &str, to: &str) -> String {
    ok(
        from,
        &format!("migrate {vm} {to}"),
        &format!("migrating {vm} to {to}"),
    );
    let (which, text) = from
        .expect_any(
            &[
                &format!("migration of {vm} to {to} completed"),
                &format!("migration of {vm} to {to} failed"),
            ],
            MIGRATION,
        )
        .unwrap_or_else(|e| panic!("waiting for the migration of {vm} to {to}: {e:?}"));
    let summary = from.expect("\n", MIGRATION).unwrap();
    assert_eq!(which, 0, "migration failed: {text}{summary}");
    summary
}

/// `disk list` on `console`: the line of `path`.
fn listed(console: &mut Console, path: &str) -> String {
    let out = ok(console, "disk list", "disk(s) at");
    out.lines()
        .find(|l| l.trim_start().starts_with(path))
        .unwrap_or_else(|| panic!("{path} not in disk list:\n{out}"))
        .to_string()
}

/// Reads the whole LUN from the host and computes the guest's digest of it.
fn host_digest(portal: SocketAddr, path: &str) -> DiskDigest {
    let (iqn, lun) = path.rsplit_once('/').unwrap();
    let initiator = "iqn.2026-11.test.hv:host-check";
    let config = SessionConfig::normal(initiator, iqn, Isid::for_name(initiator));
    let mut client = Client::connect(
        portal,
        config,
        lun.parse().unwrap(),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("host session to {path}: {e}"));
    let capacity = client.read_capacity().unwrap();
    let blocks_per_read = (256 * 1024) / u64::from(capacity.block_len);
    let mut digest = DiskDigest::default();
    let mut lba = 0;
    while lba < capacity.blocks() {
        let n = blocks_per_read.min(capacity.blocks() - lba);
        let data = client.read(lba, n as u32).unwrap();
        // The guest's block addresses are 512-byte sectors.
        digest.add_image(lba * u64::from(capacity.block_len) / 512, &data);
        lba += n;
    }
    client.logout().unwrap();
    digest
}

#[test]
#[ignore = "boots two QEMU nodes and a tgtd; run by ./run-tests.sh"]
fn shared_disk_follows_the_vm_and_keeps_every_acknowledged_write() {
    let mut cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let (portal, path) = shared_lun(&cluster);

    // A VM on the shared LUN; the LUN is then reserved by node1, and node2 cannot use it.
    let c1 = cluster.console(1);
    let disk_line = boot_vm(c1, "g1", &format!("mem=16 disk={path}"));
    assert!(disk_line.starts_with("virtio-blk"), "{disk_line}");
    let writes = wait_disk_writes(c1, "g1", 100);
    let line = listed(c1, &path);
    assert!(
        line.contains("reserved by node1") && line.contains("used here by g1"),
        "{line}"
    );
    refused(
        cluster.console(2),
        &format!("vm create g2 mem=16 disk={path}"),
        "reserved by node1",
    );

    // node1 -> node2 while the guest writes: node1 is fenced off the disk afterwards.
    migrate(cluster.console(1), "g1", "node2");
    let fenced = format!("disk {path}: a write from node1 is refused (RESERVATION CONFLICT)");
    cluster.console(1).expect(&fenced, MIGRATION).unwrap();
    let c2 = cluster.console(2);
    let writes = wait_disk_writes(c2, "g1", writes + 100);
    disk_verify(c2, "g1");
    let line = listed(c2, &path);
    assert!(
        line.contains("reserved by node2") && line.contains("used here by g1"),
        "{line}"
    );

    // node2 -> node1.
    migrate(cluster.console(2), "g1", "node1");
    let fenced = format!("disk {path}: a write from node2 is refused (RESERVATION CONFLICT)");
    cluster.console(2).expect(&fenced, MIGRATION).unwrap();
    let c1 = cluster.console(1);
    wait_disk_writes(c1, "g1", writes + 100);
    memory_verify(c1, "g1");

    // The guest stops writing; what it verifies is what the host reads from the target.
    ok(c1, "vm disk g1 hold", "disk hold requested");
    let held = guest_line(c1, "g1", "disk hold ");
    assert!(held.starts_with("writes="), "disk hold {held}");
    let (blocks, _, hash) = disk_verify(c1, "g1");
    let host = host_digest(portal, &path);
    assert_eq!(
        (host.blocks, host.hash),
        (blocks, hash),
        "the host's read of {path} differs from what the guest verified"
    );
    eprintln!("host read of {path}: {blocks} blocks, digest {hash:#018x}, same as the guest's");
    ok(c1, "vm disk g1 run", "disk run requested");

    // A migration that fails at the switchover, after node2 took the disk: node1 takes it
    // back, and the VM goes on writing there.
    ok(
        cluster.console(2),
        "migrate debug fail-takeover",
        "fail after taking its disk over",
    );
    let c1 = cluster.console(1);
    ok(c1, "migrate g1 node2", "migrating g1 to node2");
    c1.expect("migration of g1 to node2 failed", MIGRATION)
        .unwrap();
    let why = c1.expect("\n", MIGRATION).unwrap();
    assert!(
        why.contains("disk takeover") && why.contains("stays on node1"),
        "{why}"
    );
    c1.expect(
        &format!("disk {path} of g1 is held by node1 again"),
        MIGRATION,
    )
    .unwrap();
    let line = listed(c1, &path);
    assert!(line.contains("reserved by node1"), "{line}");
    let list = cmd(c1, "vm list");
    assert!(
        list.lines()
            .any(|l| l.starts_with("g1 ") && l.contains("running")),
        "{list}"
    );
    let writes = wait_disk_writes(c1, "g1", 0);
    wait_disk_writes(c1, "g1", writes + 100);
    disk_verify(c1, "g1");
    let list = cmd(cluster.console(2), "vm list");
    assert!(!list.lines().any(|l| l.starts_with("g1 ")), "{list}");

    // Destroying the VM gives the disk up: nobody holds it.
    ok(cluster.console(1), "vm destroy g1", "vm g1 destroyed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let line = listed(cluster.console(1), &path);
        if line.contains("not reserved") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still reserved: {line}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    cluster.stop().unwrap();
}

/// tgtadm on the cluster's tgtd (its control socket number is in the run directory).
fn tgtadm(cluster: &Cluster, args: &[&str]) -> String {
    let control = std::fs::read_to_string(cluster.dir().join("storage.control")).unwrap();
    let out = std::process::Command::new("tgtadm")
        .args(["-C", control.trim()])
        .args(args)
        .output()
        .expect("tgtadm runs");
    assert!(out.status.success(), "tgtadm {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Drops every connection to target 1, as a target restart or a network hiccup would; returns
/// how many there were.
fn drop_connections(cluster: &Cluster) -> usize {
    let listing = tgtadm(
        cluster,
        &[
            "--lld", "iscsi", "--op", "show", "--mode", "conn", "--tid", "1",
        ],
    );
    // `Session: S` then `Connection: C` lines.
    let mut dropped = 0;
    let mut session = None;
    for line in listing.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix("Session: ") {
            session = Some(s.to_string());
        } else if let (Some(c), Some(s)) = (line.strip_prefix("Connection: "), session.as_ref()) {
            tgtadm(
                cluster,
                &[
                    "--lld", "iscsi", "--op", "delete", "--mode", "conn", "--tid", "1", "--sid", s,
                    "--cid", c,
                ],
            );
            dropped += 1;
        }
    }
    dropped
}

/// The console's storage errors, and a VM whose iSCSI connection the target drops while it
/// writes, then whose target hangs for seconds: the node logs in again, registers again (tgt
/// ties a registration to its session), tells the console when the target stays away and when
/// it is back, and the guest's writes go on with nothing lost.
#[test]
#[ignore = "boots two QEMU nodes and a tgtd; run by ./run-tests.sh"]
fn storage_errors_are_clear_and_a_dropped_connection_loses_nothing() {
    let mut cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let (portal, path) = shared_lun(&cluster);
    let iqn = path.rsplit_once('/').unwrap().0.to_string();
    let c1 = cluster.console(1);
    let found = ok(c1, "iscsi discover", "1 target(s)");
    assert!(found.contains(&iqn), "{found}");
    refused(c1, "iscsi discover 10.0.2.2:1", "no connection");
    refused(c1, "iscsi discover 10.0.2.2:port", "port");
    refused(
        c1,
        &format!("vm create g3 mem=16 disk={iqn}/7"),
        "logical unit not supported",
    );
    refused(
        c1,
        "vm create g3 mem=16 disk=iqn.2026-11.test.hv:nothere/1",
        "TargetNotFound",
    );
    refused(c1, "vm create g3 mem=16 disk=cluster/1", "iSCSI name");
    refused(c1, &format!("vm create g3 mem=16 disk={iqn}/99999"), "LUN");

    boot_vm(c1, "g1", &format!("mem=16 disk={path}"));
    let writes = wait_disk_writes(c1, "g1", 100);
    for _ in 0..2 {
        assert!(drop_connections(&cluster) >= 1, "no connection to drop");
        let c1 = cluster.console(1);
        c1.expect("registration restored after a reconnect", MIGRATION)
            .unwrap();
    }
    // The target hangs (its process stopped) for a while: the node says so, waits, and goes
    // on when it answers again; the guest's requests wait rather than fail.
    let pid = std::fs::read_to_string(cluster.dir().join("tgtd.pid")).unwrap();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, pid.trim()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let hung = cluster
        .console(1)
        .expect("has not answered for", MIGRATION)
        .map_err(|e| format!("{e:?}"));
    signal("-CONT");
    hung.unwrap();
    let c1 = cluster.console(1);
    c1.expect("the target answers again", MIGRATION).unwrap();
    wait_disk_writes(c1, "g1", writes + 200);
    let heartbeat = guest_line(c1, "g1", "heartbeat ");
    assert!(
        !heartbeat.contains("errors="),
        "guest I/O failed: {heartbeat}"
    );
    ok(c1, "vm disk g1 hold", "disk hold requested");
    guest_line(c1, "g1", "disk hold ");
    let (blocks, _, hash) = disk_verify(c1, "g1");
    let host = host_digest(portal, &path);
    assert_eq!((host.blocks, host.hash), (blocks, hash));
    cluster.stop().unwrap();
}
