//! End-to-end tests: real nodes under QEMU (AMD SVM) and Bochs (Intel VMX), driven through their
//! serial consoles.
//!
//! Every test boots nodes, so every test is `#[ignore]`d: plain `cargo test` stays fast.
//! `./run-tests.sh` runs them (`cargo test -p tests --test e2e -- --include-ignored`); to run one
//! by hand: `cargo test -p tests --test e2e -- --include-ignored --test-threads 2 help_lists`.
//! Tests panic on failure (`unwrap`, `assert!`) rather than return `Err`: the harness keeps the
//! logs of a cluster dropped while its thread panics. A failed test keeps its run directory
//! (target/e2e/<test>-<pid>-<n>/, with every node's serial log) and prints its path.

use std::time::Duration;

use tests::{
    parse_exception_report, pseudo_random_bytes, Cluster, ClusterOptions, Emulator,
    ExceptionReport, Firmware,
};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn bochs() -> ClusterOptions {
    ClusterOptions {
        emulator: Emulator::Bochs,
        ..ClusterOptions::single()
    }
}

/// Asserts that `text` contains every one of `needles`.
fn assert_contains_all(text: &str, needles: &[&str], what: &str) {
    let missing: Vec<&&str> = needles.iter().filter(|n| !text.contains(**n)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {missing:?} missing from the output:\n{text}"
    );
}

/// An error message for bad input: says what is wrong and how to use the command.
fn assert_error_with_usage(out: &str, input: &str) {
    let lower = out.to_lowercase();
    assert!(
        ["error", "unknown", "invalid", "bad "]
            .iter()
            .any(|w| lower.contains(w)),
        "{input:?}: no error message in:\n{out}"
    );
    assert!(lower.contains("usage"), "{input:?}: no usage in:\n{out}");
}

// ---------------------------------------------------------------------------------------------
// Boot on every firmware and emulator path
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_bios_boots_two_linked_nodes() {
    let mut cluster = Cluster::start(ClusterOptions::default()).unwrap();
    for k in 1..=2 {
        let out = cluster.console(k).command("help").unwrap();
        assert_contains_all(&out, &["info"], &format!("node{k} help"));
    }
    cluster.stop().unwrap();
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_uefi_boots() {
    let mut cluster = Cluster::start(ClusterOptions {
        firmware: Firmware::Uefi,
        ..ClusterOptions::single()
    })
    .unwrap();
    let out = cluster.console(1).command("info").unwrap();
    assert_contains_all(&out, &["AMD-V (SVM)", "NPT yes"], "info under UEFI");
    cluster.stop().unwrap();
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_bios_boots_with_vmx_and_ept() {
    let mut cluster = Cluster::start(bochs()).unwrap();
    let out = cluster.console(1).command("info").unwrap();
    assert_contains_all(&out, &["Intel VT-x (VMX)", "EPT yes"], "info under Bochs");
    cluster.stop().unwrap();
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_two_nodes_boot_with_linked_nics() {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        mem_mib: 256,
        ..bochs()
    })
    .unwrap();
    for k in 1..=2 {
        let out = cluster.console(k).command("info").unwrap();
        assert_contains_all(&out, &[&format!("node{k}"), "EPT yes"], "info");
    }
    cluster.stop().unwrap();
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn three_nodes_boot_through_a_switch() {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        mem_mib: 256,
        ..Default::default()
    })
    .unwrap();
    for k in 1..=3 {
        let out = cluster.console(k).command("help").unwrap();
        assert_contains_all(&out, &["info"], &format!("node{k} help"));
    }
    cluster.stop().unwrap();
}

// ---------------------------------------------------------------------------------------------
// The console shell
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn help_lists_every_command() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let out = cluster.console(1).command("help").unwrap();
    assert_contains_all(
        &out,
        &["help", "info", "mem", "log level", "reboot", "halt"],
        "help",
    );
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_info_reports_svm_and_npt() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let out = cluster.console(1).command("info").unwrap();
    assert_contains_all(
        &out,
        &["AMD-V (SVM)", "NPT yes"],
        "info under QEMU -cpu EPYC",
    );
    let out = cluster.console(1).command("mem").unwrap();
    assert!(
        out.trim_end().lines().count() >= 2,
        "mem printed nothing:\n{out}"
    );
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn unknown_command_gives_error_and_usage() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let console = cluster.console(1);
    let out = console.command("frobnicate").unwrap();
    let lower = out.to_lowercase();
    assert!(
        lower.contains("error") && lower.contains("unknown command"),
        "no error for an unknown command:\n{out}"
    );
    assert!(
        lower.contains("usage") && lower.contains("help"),
        "no usage for an unknown command:\n{out}"
    );
    // The shell still works.
    let out = console.command("help").unwrap();
    assert_contains_all(&out, &["reboot"], "help after an unknown command");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bad_arguments_give_error_and_usage() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let console = cluster.console(1);
    for input in [
        "log level bogus",
        "log",
        "mem extra",
        "debug fault nonsense",
    ] {
        let out = console.command(input).unwrap();
        assert_error_with_usage(&out, input);
    }
    // A good argument is accepted (no error) and the shell still works.
    let out = console.command("log level debug").unwrap();
    assert!(
        !out.to_lowercase().contains("error"),
        "log level debug refused:\n{out}"
    );
    console.command("log level info").unwrap();
    console.command("help").unwrap();
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn line_editing_backspace_ctrl_c_and_history() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let console = cluster.console(1);
    // Backspace (DEL, as terminals send it) erases: "inof" -> "info".
    console.send_bytes(b"inof\x7f\x7ffo\r").unwrap();
    let out = console.wait_prompt().unwrap();
    assert_contains_all(&out, &["AMD-V (SVM)"], "info typed with backspaces");
    // Ctrl-C abandons the line: the node does not reboot.
    console.send_bytes(b"reboot\x03").unwrap();
    console.wait_prompt().unwrap();
    let out = console.command("help").unwrap();
    assert_contains_all(&out, &["log level"], "help after an abandoned line");
    assert!(
        !out.contains("console ready"),
        "the abandoned reboot ran:\n{out}"
    );
    // Arrow up recalls the previous line.
    console.send_bytes(b"\x1b[A\r").unwrap();
    let out = console.wait_prompt().unwrap();
    assert_contains_all(&out, &["log level"], "help recalled with arrow up");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn long_line_does_not_crash_the_node() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let console = cluster.console(1);
    let mut line = "x".repeat(10_000);
    line.push('\r');
    console.send_bytes(line.as_bytes()).unwrap();
    console.set_default_timeout(secs(120));
    console.wait_prompt().unwrap();
    console.set_default_timeout(secs(60));
    let out = console.command("help").unwrap();
    assert_contains_all(
        &out,
        &["log level", "reboot"],
        "help after a 10,000-character line",
    );
    assert_eq!(cluster.node_exit_status(1), None);
}

/// Sends 4 KiB of pseudo-random bytes (control characters, escape sequences, CR/LF, NUL, high
/// bytes) in chunks, as a noisy line would deliver them, then Ctrl-C to abandon whatever line is
/// left over; the node must still answer `help` and `info`.
fn survives_binary_garbage(opts: ClusterOptions, cpu_marker: &str) {
    let mut cluster = Cluster::start(opts).unwrap();
    let console = cluster.console(1);
    let garbage = pseudo_random_bytes(0x5eed_f00d_6a7b_a6e1, 4096);
    for chunk in garbage.chunks(512) {
        console.send_bytes(chunk).unwrap();
    }
    console.send_bytes(b"\x03\x03\r").unwrap();
    // Let the node work through it, then forget its answers.
    console.skip_output(Duration::from_millis(1500), secs(120));
    let out = console.command("help").unwrap();
    assert_contains_all(&out, &["log level", "reboot"], "help after binary garbage");
    let out = console.command("info").unwrap();
    assert_contains_all(&out, &[cpu_marker], "info after binary garbage");
    assert_eq!(cluster.node_exit_status(1), None);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn binary_garbage_does_not_crash_the_node() {
    survives_binary_garbage(ClusterOptions::single(), "AMD-V (SVM)");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_binary_garbage_does_not_crash_the_node() {
    survives_binary_garbage(bochs(), "Intel VT-x (VMX)");
}

/// `reboot` restarts the machine (the emulator keeps running) and the console comes back.
fn reboots(opts: ClusterOptions) {
    let mut cluster = Cluster::start(opts).unwrap();
    let console = cluster.console(1);
    console.send_line("reboot").unwrap();
    console.expect("rebooting", secs(30)).unwrap();
    console.expect("console ready", secs(120)).unwrap();
    console.wait_prompt().unwrap();
    let out = console.command("help").unwrap();
    assert_contains_all(&out, &["reboot"], "help after reboot");
    assert_eq!(
        cluster.node_exit_status(1),
        None,
        "the emulator exited instead"
    );
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn reboot_command_reboots_the_node() {
    reboots(ClusterOptions::single());
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_reboot_command_reboots_the_node() {
    reboots(bochs());
}

// ---------------------------------------------------------------------------------------------
// Exceptions
// ---------------------------------------------------------------------------------------------

/// Runs `debug <args>` on node 1 and returns the parsed exception report and the address the
/// kernel announced before raising the fault (`raising <what> at 0x...`: the faulting
/// instruction for #UD and #DE, the address after INT3 for #BP, the probed address for #PF).
fn fault(cluster: &mut Cluster, args: &str) -> (ExceptionReport, u64) {
    let console = cluster.console(1);
    console.send_line(&format!("debug {args}")).unwrap();
    console.expect("raising ", secs(30)).unwrap();
    let announce = console.expect("\n", secs(10)).unwrap();
    let expected = announce
        .rsplit_once(" at 0x")
        .and_then(|(_, hex)| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no address in the announcement {announce:?}"));
    let mut text = console.expect("EXCEPTION #", secs(60)).unwrap();
    text.push_str(&console.expect("\n", secs(10)).unwrap());
    let report = parse_exception_report(&text)
        .unwrap_or_else(|| panic!("no parsable exception report in:\n{text}"));
    (report, expected)
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn invalid_opcode_is_reported() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let (report, site) = fault(&mut cluster, "fault ud");
    assert_eq!(
        (report.mnemonic.as_str(), report.vector),
        ("UD", 6),
        "{report:?}"
    );
    assert_eq!(
        report.rip, site,
        "RIP is not the ud2 instruction: {report:?}"
    );
    let console = cluster.console(1);
    console
        .expect("node halted (on_panic = halt)", secs(10))
        .unwrap();
    // on_panic = halt (the default): the machine stays up, halted.
    std::thread::sleep(secs(1));
    assert_eq!(cluster.node_exit_status(1), None, "the emulator exited");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn page_fault_is_reported() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let (report, probe) = fault(&mut cluster, "fault pf");
    assert_eq!(
        (report.mnemonic.as_str(), report.vector),
        ("PF", 14),
        "{report:?}"
    );
    assert_eq!(
        report.cr2, probe,
        "CR2 is not the probed address: {report:?}"
    );
    // A read (W=0) of a not-present page (P=0) in kernel mode (U=0).
    assert_eq!(report.error_code & 0b111, 0, "{report:?}");
    assert_ne!(report.rip, 0, "{report:?}");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn breakpoint_is_reported_and_the_node_carries_on() {
    let mut cluster = Cluster::start(ClusterOptions::single()).unwrap();
    let (report, resume) = fault(&mut cluster, "fault bp");
    assert_eq!(
        (report.mnemonic.as_str(), report.vector),
        ("BP", 3),
        "{report:?}"
    );
    assert_eq!(report.rip, resume, "{report:?}");
    let console = cluster.console(1);
    console.wait_prompt().unwrap();
    let out = console.command("help").unwrap();
    assert_contains_all(&out, &["reboot"], "help after a breakpoint");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_exits_with_failure_on_exception_when_on_panic_exit() {
    let mut cluster = Cluster::start(ClusterOptions::single().with("on_panic", "exit")).unwrap();
    let (report, _) = fault(&mut cluster, "fault ud");
    assert_eq!(report.vector, 6, "{report:?}");
    let status = cluster.wait_node_exit(1, secs(60)).unwrap();
    // isa-debug-exit: QEMU exits with (value << 1) | 1; the kernel writes 1.
    assert_eq!(status, 3, "QEMU's exit status after a fatal exception");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn panic_is_reported_and_exits_qemu_when_on_panic_exit() {
    let mut cluster = Cluster::start(ClusterOptions::single().with("on_panic", "exit")).unwrap();
    let console = cluster.console(1);
    console.send_line("debug panic").unwrap();
    let out = console
        .expect("deliberate panic from the console", secs(30))
        .unwrap();
    assert!(out.contains("PANIC at "), "no panic location:\n{out}");
    let status = cluster.wait_node_exit(1, secs(60)).unwrap();
    assert_eq!(status, 3, "QEMU's exit status after a panic");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_exits_with_failure_on_exception_when_on_panic_exit() {
    let mut cluster = Cluster::start(bochs().with("on_panic", "exit")).unwrap();
    let (report, probe) = fault(&mut cluster, "fault pf");
    assert_eq!(report.vector, 14, "{report:?}");
    assert_eq!(report.cr2, probe, "{report:?}");
    let status = cluster.wait_node_exit(1, secs(60)).unwrap();
    assert_ne!(
        status, 0,
        "Bochs exited with status 0 after a fatal exception"
    );
}
