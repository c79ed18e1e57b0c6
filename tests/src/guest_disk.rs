//! Console helpers of the end-to-end tests that drive the test guest's disk: create and boot a
//! VM, wait for its heartbeats and their acknowledged-write counts, ask it to verify its disk
//! or memory, and read the `key=value` fields of its lines (formats in `guest_abi::disk` and
//! tests/guest). They panic with the console's text when the node does not answer as expected,
//! which is what a test wants.

use std::time::{Duration, Instant};

use crate::Console;

/// Bound on waiting for one guest line (TCG on a loaded machine is slow).
pub const GUEST_LINE: Duration = Duration::from_secs(60);

/// The value of `key=value` in a line of space-separated fields, as a number (`0x..` or
/// decimal).
pub fn field(line: &str, key: &str) -> Option<u64> {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?;
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

/// `W` from a heartbeat's `... ok disk writes=W` (None without the disk part).
pub fn heartbeat_writes(line: &str) -> Option<u64> {
    line.contains(" ok disk ")
        .then(|| field(line, "writes"))
        .flatten()
}

/// Runs a command amid guest output; returns its output.
pub fn cmd(console: &mut Console, line: &str) -> String {
    console
        .command_amid_output(line)
        .unwrap_or_else(|e| panic!("command {line:?}: {e:?}"))
        .1
}

/// Runs a command that must succeed: its output has `expect` and no `error`.
pub fn ok(console: &mut Console, line: &str, expect: &str) -> String {
    let out = cmd(console, line);
    assert!(
        !out.contains("error") && out.contains(expect),
        "{line:?}: expected {expect:?} and no error, got:\n{out}"
    );
    out
}

/// Runs a command that must be refused with a message containing `what`.
pub fn refused(console: &mut Console, line: &str, what: &str) {
    let out = cmd(console, line);
    assert!(
        out.contains("error") && out.contains(what),
        "{line:?}: expected an error saying {what:?}, got:\n{out}"
    );
}

/// Reads the rest of the current line (after a match), without the line end.
pub fn rest_of_line(console: &mut Console) -> String {
    let text = console.expect("\n", GUEST_LINE).unwrap();
    text.trim_end_matches(['\r', '\n']).to_string()
}

/// Waits for `[vm] <prefix>` and returns the rest of that line.
pub fn guest_line(console: &mut Console, vm: &str, prefix: &str) -> String {
    console
        .expect(&format!("[{vm}] {prefix}"), GUEST_LINE)
        .unwrap_or_else(|e| panic!("waiting for [{vm}] {prefix}: {e:?}"));
    rest_of_line(console)
}

/// Creates and starts a VM; returns the guest's `disk:` line (after `disk: `).
pub fn boot_vm(console: &mut Console, name: &str, options: &str) -> String {
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
pub fn heartbeat(console: &mut Console, vm: &str) -> String {
    let line = guest_line(console, vm, "heartbeat ");
    assert!(
        line.split_whitespace().nth(1) == Some("ok"),
        "[{vm}] heartbeat {line}: the guest reports a bad page"
    );
    line
}

/// Waits until `vm`'s heartbeat reports at least `min` acknowledged disk writes; returns the
/// count seen.
pub fn wait_disk_writes(console: &mut Console, vm: &str, min: u64) -> u64 {
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
pub fn disk_verify(console: &mut Console, vm: &str) -> (u64, u64, u64) {
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
pub fn memory_verify(console: &mut Console, vm: &str) {
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

#[cfg(test)]
mod tests {
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
