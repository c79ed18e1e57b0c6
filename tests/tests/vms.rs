//! End-to-end tests of virtual machines: the test guest (tests/guest) under the node's
//! hypervisor, driven through the node console's `vm` commands, on QEMU (`-cpu EPYC`: AMD SVM
//! with nested paging) and on Bochs (Intel VMX with EPT: `corei7_skylake_x`, EPT with A/D bits,
//! and `corei7_ivy_bridge_3770k`, EPT without them).
//!
//! Each scenario is one function taking the [`Host`] it runs on; thin `#[test]`s run it per
//! host: `qemu_*` every scenario, `bochs_*` those issue 3 asks of Intel (boot, heartbeat and
//! verification; exact dirty tracking with dirty bits, and with write protection where EPT has no
//! A/D bits; a guest executing garbage; an access outside guest RAM). Bochs is several times
//! slower than QEMU, so the Bochs set stays small.
//!
//! Every test boots one node, so every test is `#[ignore]`d like those of e2e.rs: `./run-tests.sh`
//! runs them; by hand: `cargo test -p tests --test vms -- --include-ignored --test-threads 2`
//! (add `HV_E2E_NO_BUILD=1` when the images are built; add `bochs_` or `qemu_` to run one set).
//! The parsers of the guest's and the node's lines have plain unit tests at the end (not
//! ignored).
//!
//! What the node prints that these tests rely on:
//! - guest lines `[g1] test guest: 16 MiB, 3069 data pages at 0x403000, dirty 0 pages/s over
//!   3069 pages` (its hot set; a hot set larger than the data pages adds
//!   ` (hot=N is more than the data pages: all of them)`),
//!   `[g1] ready image=0x100000-0x104100 stack=0xf0000-0x100000 versions=0x400000`,
//!   `[g1] heartbeat N ok` (once a second), `[g1] verify ok pages=N hash=0x.. cycles=C`;
//! - `vm dirty g1 harvest`: `vm g1: N dirty pages: 0x1-0x3 0xff ...` (guest page numbers);
//! - a guest stopped by the hypervisor: `vm g1: stopped: <reason>`, `vm show`: `state: crashed:`.
//!
//! Guest lines arrive at any time, each followed by a redrawn prompt, so commands go through
//! [`Console::command_amid_output`], which waits for the command's own prompt.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;

use tests::{Cluster, ClusterOptions, Console};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Bound on waiting for one guest line (a heartbeat comes every second of guest time; TCG on a
/// loaded machine is slow).
const GUEST_LINE: Duration = Duration::from_secs(60);

/// Ctrl-]: leaves an attached VM console.
const DETACH: u8 = 0x1D;

// ---------------------------------------------------------------------------------------------
// Parsers (pure; unit-tested below)
// ---------------------------------------------------------------------------------------------

/// Parses `0x..` (or plain decimal) into a number.
fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches(',');
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The value of `key=value` in a line of space-separated fields.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// `0x100000-0x104100` -> (start, end).
fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once('-')?;
    Some((parse_num(a)?, parse_num(b)?))
}

/// Page numbers from compact hex ranges: `0x1-0x3 0xff` -> {1, 2, 3, 0xff}.
fn parse_page_ranges(text: &str) -> Option<BTreeSet<u64>> {
    let mut pages = BTreeSet::new();
    for word in text.split_whitespace() {
        match word.split_once('-') {
            Some(_) => {
                let (a, b) = parse_range(word)?;
                if a > b {
                    return None;
                }
                pages.extend(a..=b);
            }
            None => {
                pages.insert(parse_num(word)?);
            }
        }
    }
    Some(pages)
}

/// The output of `vm dirty <name> harvest`: the count it states and the pages it lists.
fn parse_harvest(out: &str, name: &str) -> (u64, BTreeSet<u64>) {
    let head = format!("vm {name}: ");
    let line = out
        .lines()
        .find(|l| l.contains(&head) && l.contains(" dirty pages:"))
        .unwrap_or_else(|| panic!("no harvest line in:\n{out}"));
    let rest = &line[line.find(&head).unwrap() + head.len()..];
    let (count, list) = rest.split_once(" dirty pages:").unwrap();
    let count = parse_num(count).unwrap_or_else(|| panic!("bad count in {line:?}"));
    let pages = parse_page_ranges(list).unwrap_or_else(|| panic!("bad page list in {line:?}"));
    (count, pages)
}

/// What the guest announced at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GuestLayout {
    mem_mib: u64,
    data_pages: u64,
    /// GPA of data page 0.
    data_gpa: u64,
    image: (u64, u64),
    stack: (u64, u64),
    versions_gpa: u64,
    /// The data pages its dirty workload cycles over, from data page 0.
    hot_pages: u64,
}

/// `16 MiB, 3069 data pages at 0x403000, dirty 0 pages/s over 3069 pages` (after
/// `test guest: `) and
/// `image=0x100000-0x104100 stack=0xf0000-0x100000 versions=0x400000` (after `ready `).
fn parse_layout(boot: &str, ready: &str) -> Option<GuestLayout> {
    let words: Vec<&str> = boot.split_whitespace().collect();
    let mem_mib = parse_num(words.first()?)?;
    let pages_at = words.iter().position(|w| *w == "data")?;
    let data_pages = parse_num(words.get(pages_at.checked_sub(1)?)?)?;
    let at = words.iter().position(|w| *w == "at")?;
    let data_gpa = parse_num(words.get(at + 1)?)?;
    let over = words.iter().position(|w| *w == "over")?;
    let hot_pages = parse_num(words.get(over + 1)?)?;
    Some(GuestLayout {
        mem_mib,
        data_pages,
        data_gpa,
        image: parse_range(field(ready, "image")?)?,
        stack: parse_range(field(ready, "stack")?)?,
        versions_gpa: parse_num(field(ready, "versions")?)?,
        hot_pages,
    })
}

/// The data-page indices the guest's dirty test (`t`) rewrites: every 7th from 3, at most 200
/// (guest-abi's `dirty_test_pages`).
fn dirty_test_indices(data_pages: u64) -> Vec<u64> {
    (3..data_pages).step_by(7).take(200).collect()
}

/// What a test guest's own activity may dirty (an allowance, not a requirement): its page
/// tables (AMD nested paging treats guest page-table walks as writes; Intel EPT without A/D
/// does not, so there they do not appear), its stack, its image.
fn own_pages(layout: &GuestLayout) -> BTreeSet<u64> {
    let mut own: BTreeSet<u64> = (0x1..=0x7).collect();
    own.extend(pages_of(layout.stack.0, layout.stack.1));
    own.extend(pages_of(layout.image.0, layout.image.1));
    own
}

/// Guest page numbers of a byte range `[start, end)`.
fn pages_of(start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
    start / 4096..=(end.max(start + 1) - 1) / 4096
}

/// `[name] heartbeat N ok` lines in `text`: (N, whether it said ok).
fn heartbeats_in(text: &str, name: &str) -> Vec<(u64, bool)> {
    let needle = format!("[{name}] heartbeat ");
    text.match_indices(&needle)
        .filter_map(|(i, _)| {
            let rest = &text[i + needle.len()..];
            let mut words = rest.split_whitespace();
            let n = parse_num(words.next()?)?;
            Some((n, words.next() == Some("ok")))
        })
        .collect()
}

/// `exits: 13072 total, 2003/s: hlt=6419 io=6653` from `vm show`: (total, per second, the
/// breakdown by reason).
fn parse_exits(show: &str) -> Option<(u64, u64, String)> {
    let line = show
        .lines()
        .find(|l| l.trim_start().starts_with("exits:"))?;
    let rest = line.trim_start().strip_prefix("exits:")?.trim();
    let (total, rest) = rest.split_once(" total, ")?;
    let (rate, reasons) = rest.split_once("/s")?;
    Some((
        parse_num(total)?,
        parse_num(rate)?,
        reasons.trim_start_matches(':').trim().to_string(),
    ))
}

/// `memory: total 502.6 MiB, free 486.6 MiB` from `info`: free MiB.
fn parse_free_mib(info: &str) -> Option<f64> {
    let line = info.lines().find(|l| l.starts_with("memory:"))?;
    let free = line.split("free ").nth(1)?;
    free.split_whitespace().next()?.parse().ok()
}

/// `state: ...` from `vm show`.
fn show_state(show: &str) -> Option<String> {
    show.lines()
        .find_map(|l| l.trim_start().strip_prefix("state: "))
        .map(|s| s.trim().to_string())
}

/// The STATE column of `vm list` for `name` (columns NAME STATE MEMORY NODE).
fn list_state(list: &str, name: &str) -> Option<(String, String)> {
    list.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.first() == Some(&name) && w.len() >= 5).then(|| (w[1].to_string(), w[4].to_string()))
    })
}

// ---------------------------------------------------------------------------------------------
// Console helpers
// ---------------------------------------------------------------------------------------------

/// Runs a command amid guest output; returns its output.
fn cmd(console: &mut Console, line: &str) -> String {
    cmd_with_before(console, line).1
}

/// Runs a command amid guest output; returns what came before its echo and its output.
fn cmd_with_before(console: &mut Console, line: &str) -> (String, String) {
    console
        .command_amid_output(line)
        .unwrap_or_else(|e| panic!("command {line:?}: {e:?}"))
}

/// Runs a command that must succeed: its output has no `error`.
fn ok(console: &mut Console, line: &str, expect: &str) -> String {
    let out = cmd(console, line);
    assert!(
        !out.contains("error") && out.contains(expect),
        "{line:?}: expected {expect:?} and no error, got:\n{out}"
    );
    out
}

/// Runs a command that must fail with a clear message: `error: vm: ...` containing `what`.
fn refused(console: &mut Console, line: &str, what: &str) -> String {
    let out = cmd(console, line);
    assert!(
        out.contains("error: vm: ") && out.contains(what),
        "{line:?}: expected an error saying {what:?}, got:\n{out}"
    );
    out
}

/// Reads the rest of the current line (after a match), without the line end.
fn rest_of_line(console: &mut Console) -> String {
    let text = console.expect("\n", GUEST_LINE).unwrap();
    text.trim_end_matches(['\r', '\n']).to_string()
}

/// Creates and starts a VM; returns its layout from the guest's boot and ready lines.
fn boot_vm(console: &mut Console, name: &str, options: &str) -> GuestLayout {
    ok(
        console,
        format!("vm create {name} {options}").trim(),
        &format!("vm {name} created (off)"),
    );
    ok(
        console,
        &format!("vm start {name}"),
        &format!("vm {name} started"),
    );
    console
        .expect(&format!("[{name}] test guest: "), GUEST_LINE)
        .unwrap();
    let boot = rest_of_line(console);
    console
        .expect(&format!("[{name}] ready "), GUEST_LINE)
        .unwrap();
    let ready = rest_of_line(console);
    parse_layout(&boot, &ready)
        .unwrap_or_else(|| panic!("cannot parse the guest's boot lines {boot:?} / {ready:?}"))
}

/// Waits until each of `names` has printed `count` more heartbeats (from the cursor on);
/// returns every heartbeat seen per VM, in order, and asserts they all said ok.
fn wait_heartbeats(
    console: &mut Console,
    names: &[&str],
    count: usize,
) -> BTreeMap<String, Vec<u64>> {
    let needles: Vec<String> = names.iter().map(|n| format!("[{n}] heartbeat ")).collect();
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let mut seen: BTreeMap<String, Vec<u64>> =
        names.iter().map(|n| (n.to_string(), Vec::new())).collect();
    while seen.values().any(|v| v.len() < count) {
        let (which, _) = console.expect_any(&needles, GUEST_LINE).unwrap();
        let line = rest_of_line(console);
        let mut words = line.split_whitespace();
        let n = words
            .next()
            .and_then(parse_num)
            .unwrap_or_else(|| panic!("bad heartbeat line {line:?}"));
        assert_eq!(
            words.next(),
            Some("ok"),
            "[{}] heartbeat {line:?}: the guest reports a bad page",
            names[which]
        );
        seen.get_mut(names[which]).unwrap().push(n);
    }
    seen
}

/// Asserts that heartbeats count up by one, each after the previous.
fn assert_consecutive(name: &str, beats: &[u64]) {
    assert!(
        beats.windows(2).all(|w| w[1] == w[0] + 1),
        "{name}'s heartbeats do not count up by one: {beats:?}"
    );
}

/// Asks the guest for a full verification; returns (pages, hash, cycles) from its answer.
fn guest_verify(console: &mut Console, name: &str) -> (u64, u64, u64) {
    ok(
        console,
        &format!("vm verify {name}"),
        "verification requested",
    );
    console
        .expect(&format!("[{name}] verify "), GUEST_LINE)
        .unwrap();
    let line = rest_of_line(console);
    assert!(line.starts_with("ok "), "[{name}] verify {line}");
    let get = |k| {
        field(&line, k)
            .and_then(parse_num)
            .unwrap_or_else(|| panic!("no {k}= in [{name}] verify {line}"))
    };
    (get("pages"), get("hash"), get("cycles"))
}

/// Attaches to a VM's console and sends `bytes` to the guest. The console stays attached (the
/// guest's output comes raw, without the `[name] ` prefix) until [`detach`].
fn attach_and_send(console: &mut Console, name: &str, bytes: &[u8]) {
    ok(console, &format!("vm console {name}"), "attached to");
    console.send_bytes(bytes).unwrap();
}

/// Leaves the attached console (Ctrl-]) and waits for the shell.
fn detach(console: &mut Console, name: &str) {
    console.send_bytes(&[DETACH]).unwrap();
    console
        .expect(&format!("[detached from {name}]"), secs(30))
        .unwrap();
    console.wait_prompt().unwrap();
}

fn free_mib(console: &mut Console) -> f64 {
    let out = cmd(console, "info");
    parse_free_mib(&out).unwrap_or_else(|| panic!("no free memory in info:\n{out}"))
}

// ---------------------------------------------------------------------------------------------
// Hosts: where a scenario runs
// ---------------------------------------------------------------------------------------------

/// The node a scenario runs on: one node, an emulator and its CPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Host {
    /// QEMU TCG `-cpu EPYC`: AMD SVM, nested paging (NPT, which always has dirty bits).
    Qemu,
    /// Bochs `corei7_skylake_x` (qemu-run.sh's default model): Intel VMX, EPT with A/D bits.
    BochsSkylake,
    /// Bochs `corei7_ivy_bridge_3770k`: Intel VMX, EPT without A/D bits (write protection only).
    BochsIvyBridge,
}

impl Host {
    fn options(self) -> ClusterOptions {
        match self {
            Host::Qemu => ClusterOptions::single(),
            Host::BochsSkylake => ClusterOptions::single_bochs(),
            Host::BochsIvyBridge => {
                ClusterOptions::single().with_bochs_cpu("corei7_ivy_bridge_3770k")
            }
        }
    }

    /// How `info` names the node's virtualization.
    fn virtualization(self) -> &'static str {
        match self {
            Host::Qemu => "AMD-V (SVM)",
            Host::BochsSkylake | Host::BochsIvyBridge => "Intel VT-x (VMX)",
        }
    }

    /// Whether the nested page tables have dirty bits (`track=dbit`, the default, works).
    fn has_dirty_bits(self) -> bool {
        self != Host::BochsIvyBridge
    }

    /// For reports: emulator, CPU, virtualization.
    fn describe(self) -> &'static str {
        match self {
            Host::Qemu => "QEMU TCG -cpu EPYC, AMD SVM + NPT",
            Host::BochsSkylake => "Bochs corei7_skylake_x, Intel VMX + EPT with A/D",
            Host::BochsIvyBridge => "Bochs corei7_ivy_bridge_3770k, Intel VMX + EPT without A/D",
        }
    }

    fn start(self) -> Cluster {
        let mut cluster = Cluster::start(self.options()).unwrap();
        let info = cmd(cluster.console(1), "info");
        assert!(
            info.contains(self.virtualization()),
            "{self:?}: the node does not say {:?}:\n{info}",
            self.virtualization()
        );
        cluster
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios (each written once, run per host by the #[test]s below)
// ---------------------------------------------------------------------------------------------

/// A VM boots the test guest, its heartbeat advances, a verification passes.
fn vm_boots_heartbeats_and_verifies(host: Host) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    let layout = boot_vm(console, "g1", "mem=16");
    assert_eq!(layout.mem_mib, 16, "{layout:?}");
    assert!(layout.data_pages > 3000, "{layout:?}");
    let beats = wait_heartbeats(console, &["g1"], 3)["g1"].clone();
    assert_consecutive("g1", &beats);
    assert!(beats[2] >= beats[0] + 2, "{beats:?}");
    let (pages, _, _) = guest_verify(console, "g1");
    assert_eq!(pages, layout.data_pages);
    // Still running and listed after the verification.
    let beats = wait_heartbeats(console, &["g1"], 1)["g1"].clone();
    assert!(beats[0] > 3, "{beats:?}");
    let list = cmd(console, "vm list");
    assert!(list.contains("NAME") && list.contains("STATE"), "{list}");
    assert_eq!(
        list_state(&list, "g1"),
        Some(("running".into(), "node1".into())),
        "{list}"
    );
    cluster.stop().unwrap();
}

/// Pause stops the guest (no heartbeat, no exit); resume continues it where it was.
fn vm_pause_and_resume(host: Host) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    boot_vm(console, "g1", "mem=16");
    let mut beats = wait_heartbeats(console, &["g1"], 2)["g1"].clone();
    let (before, out) = cmd_with_before(console, "vm pause g1");
    assert!(out.contains("vm g1 paused"), "{out}");
    beats.extend(heartbeats_in(&before, "g1").iter().map(|b| b.0));
    assert_consecutive("g1", &beats);
    let last = *beats.last().unwrap();

    // Paused: no heartbeat for a while, no VM exit at all, and the state says so.
    let show1 = cmd(console, "vm show g1");
    assert_eq!(show_state(&show1).as_deref(), Some("paused"), "{show1}");
    let quiet = console.expect("[g1] heartbeat ", Duration::from_millis(2500));
    assert!(quiet.is_err(), "a heartbeat while paused: {quiet:?}");
    let show2 = cmd(console, "vm show g1");
    let (t1, _, _) = parse_exits(&show1).unwrap_or_else(|| panic!("{show1}"));
    let (t2, _, _) = parse_exits(&show2).unwrap_or_else(|| panic!("{show2}"));
    assert_eq!(t1, t2, "the paused vCPU exited:\n{show1}\n{show2}");
    let list = cmd(console, "vm list");
    assert_eq!(
        list_state(&list, "g1").map(|s| s.0).as_deref(),
        Some("paused")
    );

    ok(console, "vm resume g1", "vm g1 resumed");
    let after = wait_heartbeats(console, &["g1"], 3)["g1"].clone();
    assert_eq!(
        after[0],
        last + 1,
        "the counter does not follow on after resume: {last} then {after:?}"
    );
    assert_consecutive("g1", &after);
    // Exactly one boot line: the guest did not restart.
    assert_eq!(
        console.output().matches("[g1] test guest:").count(),
        1,
        "the guest restarted"
    );
    let show = cmd(console, "vm show g1");
    assert_eq!(show_state(&show).as_deref(), Some("running"), "{show}");
    guest_verify(console, "g1");
    cluster.stop().unwrap();
}

/// Two VMs run side by side (time-sliced on the node's one core).
fn two_vms_run_side_by_side(host: Host) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    boot_vm(console, "g1", "mem=16");
    boot_vm(console, "g2", "mem=16 dirty=100");
    let beats = wait_heartbeats(console, &["g1", "g2"], 3);
    for (name, b) in &beats {
        assert_consecutive(name, b);
    }
    let list = cmd(console, "vm list");
    for name in ["g1", "g2"] {
        assert_eq!(
            list_state(&list, name),
            Some(("running".into(), "node1".into())),
            "{name} in:\n{list}"
        );
    }
    // Both verify (g2 rewrites 100 pages a second meanwhile).
    guest_verify(console, "g1");
    guest_verify(console, "g2");
    let more = wait_heartbeats(console, &["g1", "g2"], 1);
    for (name, b) in &more {
        assert!(b[0] > *beats[name].last().unwrap(), "{name}: {b:?}");
    }
    cluster.stop().unwrap();
}

/// Destroying a VM gives its memory back: `info`'s free memory is what it was before.
fn vm_destroy_frees_the_memory(host: Host) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    let before = free_mib(console);
    boot_vm(console, "g1", "mem=16");
    wait_heartbeats(console, &["g1"], 1);
    let running = free_mib(console);
    assert!(
        running <= before - 16.0,
        "a 16 MiB VM took only {:.1} MiB ({before} -> {running})",
        before - running
    );
    ok(console, "vm destroy g1", "vm g1 destroyed");
    let after = free_mib(console);
    assert!(
        (after - before).abs() <= 0.1,
        "free memory {before} MiB before the VM, {after} MiB after destroying it"
    );
    refused(console, "vm show g1", "no VM named 'g1'");
    let list = cmd(console, "vm list");
    assert!(list_state(&list, "g1").is_none(), "{list}");
    // The name and the memory can be used again; a VM that never ran is freed as well.
    ok(console, "vm create g1 mem=32", "vm g1 created");
    ok(console, "vm destroy g1", "vm g1 destroyed");
    let again = free_mib(console);
    assert!(
        (again - before).abs() <= 0.1,
        "free memory {before} MiB at first, {again} MiB after a second create + destroy"
    );
    cluster.stop().unwrap();
}

/// The names of the VMs `vm list` shows.
fn vm_names(console: &mut Console) -> Vec<String> {
    let list = cmd(console, "vm list");
    list.lines()
        .skip_while(|l| !l.contains("NAME"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every refusal is a clear error and the node keeps answering.
fn vm_commands_refuse_clearly(host: Host) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    let free = free_mib(console);
    ok(console, "vm create g1 mem=16", "vm g1 created");
    refused(console, "vm create g1 mem=16", "already exists");
    refused(console, "vm create big mem=4096", "not enough memory");
    refused(console, "vm start nosuch", "no VM named 'nosuch'");
    refused(console, "vm show nosuch", "no VM named 'nosuch'");
    refused(console, "vm destroy nosuch", "no VM named 'nosuch'");
    refused(console, "vm pause g1", "is off");
    refused(console, "vm resume g1", "is off");
    refused(console, "vm verify g1", "is off");
    refused(console, "vm stop g1", "is off");
    // Bad arguments: an error and the usage line.
    for (line, what) in [
        ("vm create g2 vcpus=2", "vCPU"),
        ("vm create g2 color=red", "unknown option"),
        ("vm create g2 mem=lots", "mem"),
        (
            "vm create g2 hot=many",
            "hot must be a number of data pages",
        ),
        ("vm create g2 hot=-1", "hot must be a number of data pages"),
        ("vm create g2 track=magic", "track"),
        ("vm create g2 16", "key=value"),
        ("vm frobnicate g1", "frobnicate"),
    ] {
        let out = refused(console, line, what);
        assert!(
            out.contains("usage: vm "),
            "{line:?}: no usage line:\n{out}"
        );
    }
    // A running VM cannot be started again.
    ok(console, "vm start g1", "vm g1 started");
    refused(console, "vm start g1", "is running");
    refused(console, "vm resume g1", "is running");
    // Nothing was created by the refused commands, and the node still answers.
    assert_eq!(vm_names(console), ["g1"]);
    let help = cmd(console, "help");
    assert!(help.contains("reboot"), "{help}");
    ok(console, "vm destroy g1", "destroyed");
    let after = free_mib(console);
    assert!((after - free).abs() <= 0.1, "{free} MiB free, then {after}");
    cluster.stop().unwrap();
}

/// The guest writes a known set of pages; the harvest reports exactly those, plus only pages
/// its own code touched; the next harvest reports no data page. `track` is `dbit` or `wp`.
/// On a host whose nested paging has no dirty bits, a VM that asks for them (explicitly or by
/// default) is refused first, with a hint to use track=wp, and nothing is created.
fn dirty_tracking_is_exact(host: Host, track: &str) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    if !host.has_dirty_bits() {
        let free = free_mib(console);
        for line in ["vm create g1 mem=16", "vm create g1 mem=16 track=dbit"] {
            refused(console, line, "use track=wp");
        }
        assert!(vm_names(console).is_empty(), "a refused VM was created");
        let after = free_mib(console);
        assert!((after - free).abs() <= 0.1, "{free} MiB free, then {after}");
    }
    let layout = boot_vm(console, "g1", &format!("mem=16 track={track}"));
    let show = cmd(console, "vm show g1");
    let mode = if track == "wp" {
        "write protection"
    } else {
        "dirty bits"
    };
    assert!(show.contains(&format!("dirty tracking: {mode}")), "{show}");
    // Let the guest settle into its loop (the boot wrote every page).
    wait_heartbeats(console, &["g1"], 1);

    let data_first = layout.data_gpa / 4096;
    let data = data_first..data_first + layout.data_pages;
    let indices = dirty_test_indices(layout.data_pages);
    let written: BTreeSet<u64> = indices.iter().map(|i| data_first + i).collect();
    let version_pages: BTreeSet<u64> = indices
        .iter()
        .map(|i| (layout.versions_gpa + 4 * i) / 4096)
        .collect();
    let own = own_pages(&layout);

    ok(console, "vm dirty g1 reset", "dirty log reset");
    attach_and_send(console, "g1", b"t");
    console.expect("dirtytest wrote ", GUEST_LINE).unwrap();
    let count = rest_of_line(console);
    assert_eq!(
        count.trim(),
        format!("{} pages", indices.len()),
        "the guest wrote another number of pages than guest-abi's dirty_test_pages"
    );
    detach(console, "g1");

    let out = cmd(console, "vm dirty g1 harvest");
    let (n, pages) = parse_harvest(&out, "g1");
    // Shown with the output of a failing test (or with --nocapture).
    eprintln!("{host:?} {track}: first harvest: {}", out.trim());
    assert_eq!(n, pages.len() as u64, "count and list disagree:\n{out}");
    let missing: Vec<_> = written
        .difference(&pages)
        .map(|p| format!("{p:#x}"))
        .collect();
    assert!(
        missing.is_empty(),
        "{host:?} {track}: written pages not reported: {missing:?}\n{out}"
    );
    let missing: Vec<_> = version_pages
        .difference(&pages)
        .map(|p| format!("{p:#x}"))
        .collect();
    assert!(
        missing.is_empty(),
        "{host:?} {track}: written version-table pages not reported: {missing:?}\n{out}"
    );
    let foreign: Vec<_> = pages
        .iter()
        .filter(|p| data.contains(p) && !written.contains(p))
        .map(|p| format!("{p:#x}"))
        .collect();
    assert!(
        foreign.is_empty(),
        "{host:?} {track}: data pages reported but not written: {foreign:?}\n{out}"
    );
    let unexplained: Vec<_> = pages
        .iter()
        .filter(|p| !data.contains(p) && !own.contains(p) && !version_pages.contains(p))
        .map(|p| format!("{p:#x}"))
        .collect();
    assert!(
        unexplained.is_empty(),
        "{host:?} {track}: pages reported that neither the test nor the guest's own code \
         touched: {unexplained:?}\n{out}"
    );

    // Right after: nothing written since but the guest's own bookkeeping.
    let out = cmd(console, "vm dirty g1 harvest");
    let (n, pages) = parse_harvest(&out, "g1");
    eprintln!("{host:?} {track}: second harvest: {}", out.trim());
    assert_eq!(n, pages.len() as u64, "{out}");
    let unexpected: Vec<_> = pages
        .iter()
        .filter(|p| !own.contains(p))
        .map(|p| format!("{p:#x}"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{host:?} {track}: second harvest reports pages nobody wrote since the first: \
         {unexpected:?}\n{out}"
    );
    // The guest is intact and alive.
    guest_verify(console, "g1");
    cluster.stop().unwrap();
}

/// Pages reported in a harvest, as hex for a failure message.
fn hex_pages<'a>(pages: impl Iterator<Item = &'a u64>) -> Vec<String> {
    pages.map(|p| format!("{p:#x}")).collect()
}

/// A guest with a hot set (`hot=512`) rewrites only its first 512 data pages, all of them, at
/// its dirty rate: a harvest over a few seconds reports those pages and their version-table
/// page, besides what its own code touches (page tables, stack, image), and no other data
/// page; every page still verifies (the cold ones keep their first version). A hot set larger
/// than the data pages becomes all of them, and the guest and `vm show` say so.
fn hot_set_bounds_the_dirty_pages(host: Host) {
    const HOT: u64 = 512;
    let mut cluster = host.start();
    let console = cluster.console(1);
    let layout = boot_vm(console, "g1", &format!("mem=16 dirty=20000 hot={HOT}"));
    assert_eq!(layout.hot_pages, HOT, "{layout:?}");
    let show = cmd(console, "vm show g1");
    assert!(
        show.contains(&format!(
            "dirty rate 20000 pages/s over data pages 0..{HOT} ({HOT} of {})",
            layout.data_pages
        )),
        "{show}"
    );
    // Past the boot, which wrote every page once.
    wait_heartbeats(console, &["g1"], 1);

    let data_first = layout.data_gpa / 4096;
    let data = data_first..data_first + layout.data_pages;
    let hot: BTreeSet<u64> = (data_first..data_first + HOT).collect();
    let hot_versions: BTreeSet<u64> = (0..HOT)
        .map(|i| (layout.versions_gpa + 4 * i) / 4096)
        .collect();
    let own = own_pages(&layout);

    ok(console, "vm dirty g1 reset", "dirty log reset");
    // Two seconds at 20000 pages/s: the 512 hot pages come round about 80 times.
    wait_heartbeats(console, &["g1"], 2);
    let out = cmd(console, "vm dirty g1 harvest");
    let (n, pages) = parse_harvest(&out, "g1");
    eprintln!("{host:?} hot={HOT}: harvest: {}", out.trim());
    assert_eq!(n, pages.len() as u64, "count and list disagree:\n{out}");
    let missed = hex_pages(hot.difference(&pages));
    assert!(
        missed.is_empty(),
        "{host:?}: hot pages the guest should have rewritten, not reported: {missed:?}\n{out}"
    );
    let cold = hex_pages(
        pages
            .iter()
            .filter(|p| data.contains(p) && !hot.contains(p)),
    );
    assert!(
        cold.is_empty(),
        "{host:?}: data pages outside the hot set were written: {cold:?}\n{out}"
    );
    let unexplained = hex_pages(
        pages
            .iter()
            .filter(|p| !data.contains(p) && !hot_versions.contains(p) && !own.contains(p)),
    );
    assert!(
        unexplained.is_empty(),
        "{host:?}: pages reported that neither the hot set, its versions nor the guest's own \
         code account for: {unexplained:?}\n{out}"
    );
    let (verified, _, _) = guest_verify(console, "g1");
    assert_eq!(
        verified, layout.data_pages,
        "every page verifies, hot or not"
    );
    wait_heartbeats(console, &["g1"], 1);

    // More than the data pages: all of them, said by the guest and by `vm show`.
    ok(
        console,
        "vm create g2 mem=8 dirty=100 hot=99999",
        "vm g2 created",
    );
    ok(console, "vm start g2", "vm g2 started");
    console.expect("[g2] test guest: ", GUEST_LINE).unwrap();
    let boot = rest_of_line(console);
    console.expect("[g2] ready ", GUEST_LINE).unwrap();
    let ready = rest_of_line(console);
    let g2 = parse_layout(&boot, &ready).unwrap_or_else(|| panic!("{boot:?} / {ready:?}"));
    assert_eq!(g2.hot_pages, g2.data_pages, "not clamped to all: {boot}");
    assert!(
        boot.ends_with("(hot=99999 is more than the data pages: all of them)"),
        "{boot}"
    );
    let show = cmd(console, "vm show g2");
    assert!(
        show.contains(&format!(
            "over all {} data pages (hot=99999 is more than the data pages)",
            g2.data_pages
        )),
        "{show}"
    );
    guest_verify(console, "g2");
    cluster.stop().unwrap();
}

/// A guest that executes garbage (invalid opcode, no IDT: triple fault) is stopped with a
/// message; the other VM and the node keep running, and the crashed VM can start again.
fn guest_triple_fault_stops_only_that_vm(host: Host) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    boot_vm(console, "g1", "mem=16");
    boot_vm(console, "bad", "mem=16");
    wait_heartbeats(console, &["g1", "bad"], 1);

    attach_and_send(console, "bad", b"u");
    let text = console
        .expect(
            "vm bad: stopped: triple fault (shutdown) at rip ",
            GUEST_LINE,
        )
        .unwrap();
    assert!(
        text.contains("executing an"),
        "the guest did not say so:\n{text}"
    );
    detach(console, "bad");

    let show = cmd(console, "vm show bad");
    let state = show_state(&show).unwrap_or_default();
    assert!(state.starts_with("crashed: triple fault"), "{show}");
    let list = cmd(console, "vm list");
    assert_eq!(
        list_state(&list, "bad").map(|s| s.0).as_deref(),
        Some("crashed")
    );
    assert_eq!(
        list_state(&list, "g1").map(|s| s.0).as_deref(),
        Some("running")
    );
    refused(console, "vm verify bad", "is crashed");

    // g1 carries on, the node answers.
    let beats = wait_heartbeats(console, &["g1"], 3)["g1"].clone();
    assert_consecutive("g1", &beats);
    let help = cmd(console, "help");
    assert!(help.contains("reboot"), "{help}");
    guest_verify(console, "g1");

    // A crashed VM boots afresh on start.
    ok(console, "vm start bad", "vm bad started");
    console.expect("[bad] ready ", GUEST_LINE).unwrap();
    wait_heartbeats(console, &["bad", "g1"], 1);
    assert_eq!(cluster.node_exit_status(1), None);
    cluster.stop().unwrap();
}

/// A guest spinning with interrupts off, never exiting, cannot hold the node: the host takes
/// the CPU back every tick (AMD: the timer interrupt exits, which needs V_INTR_MASKING; Intel:
/// the VMX-preemption timer, as Bochs gives such a guest no external-interrupt exit), so the
/// console answers, the other VM keeps its heartbeat, and the spinner can be stopped.
fn spinning_guest_cannot_hold_the_node(host: Host) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    boot_vm(console, "g1", "mem=16");
    boot_vm(console, "spin", "mem=16");
    wait_heartbeats(console, &["g1", "spin"], 1);
    attach_and_send(console, "spin", b"s");
    console
        .expect("spinning with interrupts off", GUEST_LINE)
        .unwrap();
    detach(console, "spin");
    let beats = wait_heartbeats(console, &["g1"], 3)["g1"].clone();
    assert_consecutive("g1", &beats);
    let show = cmd(console, "vm show spin");
    assert!(
        show_state(&show).as_deref() == Some("running")
            && (show.contains("intr=") || show.contains("slice=")),
        "the spinner is not preempted:\n{show}"
    );
    ok(console, "vm stop spin", "vm spin stopped");
    guest_verify(console, "g1");
    cluster.stop().unwrap();
}

/// A guest access outside its RAM ends in a clean stop of that VM with a message.
fn guest_access_outside_ram_stops_the_vm(host: Host) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    boot_vm(console, "g1", "mem=16");
    wait_heartbeats(console, &["g1"], 1);
    attach_and_send(console, "g1", b"o");
    console.expect("reading 0x", GUEST_LINE).unwrap();
    let gpa = rest_of_line(console);
    let gpa = gpa
        .split_whitespace()
        .next()
        .and_then(|h| u64::from_str_radix(h.trim_end_matches(','), 16).ok());
    assert_eq!(
        gpa,
        Some((16 << 20) + 0x10_0000),
        "the guest's announcement"
    );
    let text = console
        .expect("outside its 16 MiB of RAM", GUEST_LINE)
        .unwrap();
    assert!(
        text.contains("vm g1: stopped: guest accessed 0x1100000"),
        "no stop message:\n{text}"
    );
    detach(console, "g1");
    let show = cmd(console, "vm show g1");
    let state = show_state(&show).unwrap_or_default();
    assert!(
        state.starts_with("crashed: guest accessed 0x1100000, outside its 16 MiB of RAM"),
        "{show}"
    );
    // The read never completed in the guest (it would print `read 0x...`).
    assert!(
        !console.output().contains("read 0x"),
        "the guest read something past its RAM"
    );
    let info = cmd(console, "info");
    assert!(info.contains(host.virtualization()), "{info}");
    assert_eq!(cluster.node_exit_status(1), None);
    cluster.stop().unwrap();
}

/// The guest's page-verify loop in our VM vs the same loop run natively by the node kernel
/// (`bench verify`), and the VM exits per second the guest causes at idle. Prints the figures
/// (not captured: they show in the CI log) and writes them to target/bench/`file`.
fn bench_verify_in_vm_vs_native(host: Host, file: &str) {
    let mut cluster = host.start();
    let console = cluster.console(1);
    let layout = boot_vm(console, "g1", "mem=16 dirty=0");
    // Idle for a few seconds, then read the exit rate.
    wait_heartbeats(console, &["g1"], 3);
    let show = cmd(console, "vm show g1");
    let (total, per_sec, reasons) =
        parse_exits(&show).unwrap_or_else(|| panic!("no exits line in:\n{show}"));
    assert!(total > 0, "{show}");

    let (pages, guest_hash, guest_cycles) = guest_verify(console, "g1");
    assert_eq!(pages, layout.data_pages);
    let out = cmd(console, &format!("bench verify {pages}"));
    let line = out
        .lines()
        .find(|l| l.starts_with("native verify "))
        .unwrap_or_else(|| panic!("no native verify line in:\n{out}"));
    assert!(line.starts_with("native verify ok "), "{line}");
    let native_pages = field(line, "pages").and_then(parse_num);
    let native_hash = field(line, "hash").and_then(parse_num).unwrap();
    let native_cycles = field(line, "cycles").and_then(parse_num).unwrap();
    assert_eq!(native_pages, Some(pages), "{line}");
    assert_eq!(
        guest_hash, native_hash,
        "the guest's memory hash differs from the native run over the same pages"
    );

    let ratio = guest_cycles as f64 / native_cycles.max(1) as f64;
    let report = format!(
        "bench vm-verify ({}; one run):\n\
         \x20 guest verify:  pages={pages} cycles={guest_cycles} hash={guest_hash:#018x}\n\
         \x20 native verify: pages={pages} cycles={native_cycles} hash={native_hash:#018x}\n\
         \x20 ratio guest/native: {ratio:.3}\n\
         \x20 idle guest VM exits: {per_sec}/s ({total} total: {reasons})\n",
        host.describe()
    );
    let path = tests::target_dir().join("bench").join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &report).unwrap();
    // Straight to the process's stderr, past libtest's output capture.
    let _ = std::io::stderr()
        .write_all(format!("\n{report}  (also in {})\n", path.display()).as_bytes());
    cluster.stop().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tests on QEMU (AMD SVM + NPT)
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "boots a QEMU node; run by ./run-tests.sh"]
fn qemu_spinning_guest_cannot_hold_the_node() {
    spinning_guest_cannot_hold_the_node(Host::Qemu);
}

#[test]
#[ignore = "boots a Bochs node; run by ./run-tests.sh"]
fn bochs_spinning_guest_cannot_hold_the_node() {
    spinning_guest_cannot_hold_the_node(Host::BochsSkylake);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_vm_boots_heartbeats_and_verifies() {
    vm_boots_heartbeats_and_verifies(Host::Qemu);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_vm_pause_and_resume() {
    vm_pause_and_resume(Host::Qemu);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_two_vms_run_side_by_side() {
    two_vms_run_side_by_side(Host::Qemu);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_vm_destroy_frees_the_memory() {
    vm_destroy_frees_the_memory(Host::Qemu);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_vm_commands_refuse_clearly() {
    vm_commands_refuse_clearly(Host::Qemu);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_dirty_tracking_with_dirty_bits_is_exact() {
    dirty_tracking_is_exact(Host::Qemu, "dbit");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_dirty_tracking_with_write_protection_is_exact() {
    dirty_tracking_is_exact(Host::Qemu, "wp");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_hot_set_bounds_the_dirty_pages() {
    hot_set_bounds_the_dirty_pages(Host::Qemu);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_guest_triple_fault_stops_only_that_vm() {
    guest_triple_fault_stops_only_that_vm(Host::Qemu);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_guest_access_outside_ram_stops_the_vm() {
    guest_access_outside_ram_stops_the_vm(Host::Qemu);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn qemu_bench_verify_in_vm_vs_native() {
    bench_verify_in_vm_vs_native(Host::Qemu, "vm-verify.txt");
}

// ---------------------------------------------------------------------------------------------
// Tests on Bochs (Intel VMX + EPT): the proofs of issue 3 item 7, kept lean (Bochs is slower)
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_vm_boots_heartbeats_and_verifies() {
    vm_boots_heartbeats_and_verifies(Host::BochsSkylake);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_dirty_tracking_with_dirty_bits_is_exact() {
    dirty_tracking_is_exact(Host::BochsSkylake, "dbit");
}

/// EPT without A/D bits: track=dbit (the default) is refused, track=wp is exact.
#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_ivy_bridge_dirty_tracking_with_write_protection_is_exact() {
    dirty_tracking_is_exact(Host::BochsIvyBridge, "wp");
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_guest_triple_fault_stops_only_that_vm() {
    guest_triple_fault_stops_only_that_vm(Host::BochsSkylake);
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn bochs_guest_access_outside_ram_stops_the_vm() {
    guest_access_outside_ram_stops_the_vm(Host::BochsSkylake);
}

// ---------------------------------------------------------------------------------------------
// Unit tests of the parsers (no node)
// ---------------------------------------------------------------------------------------------

#[test]
fn parses_page_ranges_and_harvest_lines() {
    assert_eq!(
        parse_page_ranges(" 0x1-0x3 0xff 0x400-0x401").unwrap(),
        [1, 2, 3, 0xff, 0x400, 0x401].into_iter().collect()
    );
    assert_eq!(parse_page_ranges("").unwrap(), BTreeSet::new());
    assert!(parse_page_ranges("0x3-0x1").is_none());
    assert!(parse_page_ranges("zz").is_none());
    let out = "vm g1: 6 dirty pages: 0x1-0x3 0xff 0x406 0x40d\r\n";
    let (n, pages) = parse_harvest(out, "g1");
    assert_eq!(n, 6);
    assert_eq!(pages, [1, 2, 3, 0xff, 0x406, 0x40d].into_iter().collect());
    let (n, pages) = parse_harvest("vm g1: 0 dirty pages:\r\n", "g1");
    assert_eq!((n, pages.len()), (0, 0));
}

#[test]
fn parses_guest_lines() {
    let layout = parse_layout(
        "16 MiB, 3069 data pages at 0x403000, dirty 20000 pages/s over 512 pages",
        "image=0x100000-0x104100 stack=0xf0000-0x100000 versions=0x400000",
    )
    .unwrap();
    assert_eq!(
        layout,
        GuestLayout {
            mem_mib: 16,
            data_pages: 3069,
            data_gpa: 0x403000,
            image: (0x100000, 0x104100),
            stack: (0xf0000, 0x100000),
            versions_gpa: 0x400000,
            hot_pages: 512,
        }
    );
    let clamped = parse_layout(
        "8 MiB, 1023 data pages at 0x401000, dirty 100 pages/s over 1023 pages \
         (hot=99999 is more than the data pages: all of them)",
        "image=0x100000-0x104100 stack=0xf0000-0x100000 versions=0x400000",
    )
    .unwrap();
    assert_eq!((clamped.data_pages, clamped.hot_pages), (1023, 1023));
    // A guest from before hot sets (no `over`) is not mistaken for one with a hot set.
    assert_eq!(
        parse_layout(
            "16 MiB, 3069 data pages at 0x403000, dirty 0 pages/s",
            "image=0x100000-0x104100 stack=0xf0000-0x100000 versions=0x400000",
        ),
        None
    );
    assert_eq!(pages_of(0x100000, 0x104100), 0x100..=0x104);
    assert_eq!(pages_of(0xf0000, 0x100000), 0xf0..=0xff);
    let idx = dirty_test_indices(3069);
    assert_eq!(
        (idx.len(), idx[0], idx[1], idx[199]),
        (200, 3, 10, 3 + 7 * 199)
    );
    assert_eq!(dirty_test_indices(20), [3, 10, 17]);
    let text = "node1> \r\x1b[K[g1] heartbeat 5 ok\r\nnode1> \r\x1b[K[g2] heartbeat 9 ok\r\n\
                [g1] heartbeat 6 FAIL page 3: Corrupt\r\n";
    assert_eq!(heartbeats_in(text, "g1"), [(5, true), (6, false)]);
    assert_eq!(heartbeats_in(text, "g2"), [(9, true)]);
}

#[test]
fn parses_node_output() {
    let show = "vm g1 on node1\r\n  state: crashed: triple fault (shutdown) at rip 0x10041e\r\n  \
                exits: 13072 total, 2003/s: hlt=6419 io=6653\r\n";
    assert_eq!(
        parse_exits(show),
        Some((13072, 2003, "hlt=6419 io=6653".to_string()))
    );
    assert_eq!(
        show_state(show).as_deref(),
        Some("crashed: triple fault (shutdown) at rip 0x10041e")
    );
    let info = "tsc: 2597 MHz\r\nmemory: total 502.6 MiB, free 486.6 MiB\r\nuptime: 1 s\r\n";
    assert_eq!(parse_free_mib(info), Some(486.6));
    let list =
        "NAME             STATE      MEMORY  NODE\r\ng1               running   16 MiB  node1\r\n\
                w1               crashed   16 MiB  node1\r\n";
    assert_eq!(
        list_state(list, "w1"),
        Some(("crashed".into(), "node1".into()))
    );
    assert_eq!(list_state(list, "nope"), None);
    assert_eq!(field("ok pages=3 hash=0x1f cycles=9", "hash"), Some("0x1f"));
}
