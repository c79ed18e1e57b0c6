//! Live migration on the Intel path (issue 5 on VT-x): two Bochs nodes (`corei7_skylake_x`: VMX
//! with EPT and its accessed/dirty flags) linked through frame-hub, a small test guest moved from
//! node1 to node2 and back. The dirty pages of each round come from the EPT dirty flags here,
//! from the NPT ones in tests/tests/migration.rs (QEMU, AMD SVM).
//!
//! Bochs runs a few times slower than QEMU TCG, so the guest is the smallest the layout allows
//! (8 MiB), idle (its heartbeat and stack pages are what the later rounds resend), and the test
//! is one round trip. `#[ignore]`d like every end-to-end test:
//! `cargo test -p tests --test migration_vmx -- --include-ignored`.

use std::time::Duration;

use tests::{hex_after, Cluster, ClusterOptions, Emulator};

const MIGRATION: Duration = Duration::from_secs(300);
const GUEST_LINE: Duration = Duration::from_secs(90);

/// Moves vm1 from node `from` to node `to`: completed, same memory digest on both sides, the
/// guest verifies its memory on the destination.
fn migrate(cluster: &mut Cluster, from: usize, to: usize) {
    let to_name = format!("node{to}");
    cluster
        .console(from)
        .command_amid_output(&format!("migrate vm1 {to_name}"))
        .unwrap();
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
    let summary = cluster
        .console(from)
        .expect("\n", Duration::from_secs(5))
        .unwrap();
    eprintln!("vm1 to {to_name}:{summary}");
    cluster
        .console(from)
        .expect("memory digest at switchover ", Duration::from_secs(30))
        .unwrap();
    let line = cluster
        .console(from)
        .expect("\n", Duration::from_secs(5))
        .unwrap();
    let source = hex_after(&format!("d {}", line.trim()), "d ").expect("source digest");
    let arrived = cluster
        .console(to)
        .expect("incoming vm vm1 arrived", MIGRATION)
        .unwrap();
    let rest = cluster
        .console(to)
        .expect("\n", Duration::from_secs(5))
        .unwrap();
    let destination =
        hex_after(&format!("{arrived}{rest}"), "memory digest ").expect("destination digest");
    assert_eq!(source, destination, "memory differs after the move");
    cluster.console(to).verify_guest("vm1", GUEST_LINE);
}

#[test]
#[ignore = "boots two Bochs nodes; run by ./run-tests.sh"]
fn bochs_guest_migrates_there_and_back_with_ept_dirty_flags() {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        emulator: Emulator::Bochs,
        mem_mib: 256,
        ..Default::default()
    })
    .unwrap();
    let c = cluster.console(1);
    c.command_amid_output("vm create vm1 mem=8 dirty=0 track=dbit")
        .unwrap();
    c.command_amid_output("vm start vm1").unwrap();
    c.expect("[vm1] heartbeat 1 ok", GUEST_LINE).unwrap();
    migrate(&mut cluster, 1, 2);
    cluster
        .console(2)
        .expect("[vm1] heartbeat ", GUEST_LINE)
        .unwrap();
    migrate(&mut cluster, 2, 1);
    cluster.stop().unwrap();
}
