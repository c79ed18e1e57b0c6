//! The Linux baseline for `net bench` (issue 4, item 7): two plain Linux guests under QEMU TCG,
//! linked as our two nodes are (an e1000 NIC each, `-netdev stream` clients of the switch of
//! `tests::switch` on a unix socket), move 64 MiB over TCP with busybox `nc`; the sender times
//! the transfer inside the guest and the receiver counts the bytes that arrived. The figure goes to
//! target/bench/net-baseline.txt, next to our kernel's figures from target/bench/net-bench.txt
//! when that file is there (./run-tests.sh runs this test after net.rs for that).
//!
//! The kernel is Debian's linux-image-6.1.0-56-amd64 (the cloud kernel has no e1000 driver) and
//! its e1000 module, which scripts/setup.sh puts in target/linux-baseline/; the initramfs (the
//! static busybox of Debian's busybox-static, the module and an init script) is built here.
//! By hand: `cargo test -p tests --test baseline -- --include-ignored`.
//! The guests' addresses (10.20.0.1 and .2) exist only inside the emulated link.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use tests::linux_guest::{build_initramfs, linux_dir, linux_package, Guest};
use tests::switch::{StreamSwitch, DEFAULT_PORT_QUEUE};

/// What the sender moves: the amount of our 64 MiB `net send`.
const BYTES: u64 = 64 << 20;

/// Bounds the whole run (boot ~6 s each, the transfer ~10 s at the expected ~6-10 MB/s).
const DEADLINE: Duration = Duration::from_secs(150);

/// The guests' /init (after `linux_guest::INIT_START`): role from the kernel command line
/// (`baseline.role=recv|send`). The receiver's nc reads its standard input from a FIFO nobody
/// writes (an EOF there would make busybox nc shut its side down at once); the sender's nc shuts
/// down its side at the end of the data, and exits when the receiver, having read everything,
/// closes. Both power off at the end.
const INIT: &str = r#"role=recv
for w in $(cat /proc/cmdline); do
    case "$w" in baseline.role=*) role="${w#baseline.role=}" ;; esac
done
insmod /e1000.ko || echo "BASELINE-ERROR insmod e1000 failed"
ip link set lo up
if [ "$role" = recv ]; then
    mkfifo /hold
    ( n=$(nc -l -p 5001 <>/hold | wc -c); echo "BASELINE-RECEIVED bytes=$n" ) &
    ip addr add 10.20.0.1/24 dev eth0
    ip link set eth0 up
    echo "BASELINE-LISTENING"
    wait
else
    ip addr add 10.20.0.2/24 dev eth0
    ip link set eth0 up
    i=0
    until ping -c 1 -W 1 10.20.0.1 >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -ge 60 ] && break
    done
    echo "BASELINE-PEER-UP after $i failed pings"
    sleep 1
    t0=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/zero bs=65536 count=COUNT 2>/dev/null | nc 10.20.0.1 5001
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "BASELINE-SENT start=$t0 end=$t1"
fi
poweroff -f
"#;

/// A guest of the emulated link: `role` (recv or send), the options of its `-netdev stream`
/// `link` (the switch's unix socket), its NIC's `mac`.
fn start_guest(dir: &Path, role: &str, link: &str, mac: &str) -> io::Result<Guest> {
    Guest::start(
        dir,
        role,
        &format!("console=ttyS0 quiet panic=1 baseline.role={role}"),
        &[
            "-cpu",
            "EPYC",
            "-m",
            "256",
            "-display",
            "none",
            "-monitor",
            "none",
            "-parallel",
            "none",
            "-netdev",
            &format!("stream,id=link,{link}"),
            "-device",
            &format!("e1000,netdev=link,mac={mac}"),
        ],
    )
}

/// The value of `key=` on the line of `out` that starts with `marker`.
fn field(out: &str, marker: &str, key: &str) -> Option<String> {
    let line = out.lines().map(str::trim).find(|l| l.starts_with(marker))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")[..]))
        .map(str::to_string)
}

/// Our kernel's figures: every line of net-bench.txt with an MB/s figure, with that figure.
fn our_figures(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let before = &line[..line.find(" MB/s")?];
            let mbs = before.split_whitespace().last()?.parse().ok()?;
            Some((line.trim().to_string(), mbs))
        })
        .collect()
}

#[test]
#[ignore = "end-to-end: boots nodes; run ./run-tests.sh"]
fn linux_baseline_tcp_throughput() {
    let started = Instant::now();
    let package = linux_package();
    let dir = tests::target_dir()
        .join("e2e")
        .join(format!("linux_baseline-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let init = INIT.replace("COUNT", &(BYTES / 65536).to_string());
    let e1000 = linux_dir().join("e1000.ko");
    build_initramfs(&dir, &init, &[(&e1000, "e1000.ko")]).unwrap();

    // The link, as qemu-run.sh wires nodes: both QEMUs connect to a switch's unix socket.
    let link = dir.join("link.sock");
    let switch = StreamSwitch::bind(&link, DEFAULT_PORT_QUEUE).unwrap();
    thread::spawn(move || switch.run());
    let client = format!("server=off,addr.type=unix,addr.path={}", link.display());
    let recv = start_guest(&dir, "recv", &client, "52:54:00:00:03:01").unwrap();
    let send = start_guest(&dir, "send", &client, "52:54:00:00:03:02").unwrap();

    // Both guests power off once the transfer is over (bounded: DEADLINE).
    let mut guests = [recv, send];
    loop {
        let done = guests.iter_mut().all(|g| !g.running());
        if done {
            break;
        }
        if started.elapsed() > DEADLINE {
            panic!(
                "the Linux guests did not finish within {DEADLINE:?} (logs kept in {})\n{}\n{}",
                dir.display(),
                guests[0].diagnostics(),
                guests[1].diagnostics()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    let (recv_out, send_out) = (guests[0].serial(), guests[1].serial());
    let diag = || {
        format!(
            "(logs kept in {})\n{}\n{}",
            dir.display(),
            guests[0].diagnostics(),
            guests[1].diagnostics()
        )
    };
    let received: u64 = field(&recv_out, "BASELINE-RECEIVED", "bytes")
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("the receiver reported no byte count {}", diag()));
    assert_eq!(received, BYTES, "the transfer did not complete {}", diag());
    let time = |key| -> f64 {
        field(&send_out, "BASELINE-SENT", key)
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("the sender reported no {key} time {}", diag()))
    };
    let seconds = time("end") - time("start");
    assert!(seconds > 0.0, "sender's times: {}", diag());
    let mbs = BYTES as f64 / seconds / 1e6;

    let mut report = String::new();
    writeln!(
        report,
        "Linux baseline (QEMU TCG -cpu EPYC -m 256, e1000s linked through frame-hub's switch; one run):\n\
         \x20 10.20.0.2 -> 10.20.0.1, busybox dd | nc, 64 MiB: {mbs:.2} MB/s \
         ({BYTES} bytes received in {seconds:.2} s, timed in the sending guest)\n\
         \x20 Linux: Debian {package} (its e1000 module), busybox-static initramfs\n\
         \x20 (command: cargo test -p tests --test baseline -- --include-ignored linux_baseline)"
    )
    .unwrap();
    let bench = tests::target_dir().join("bench");
    let ours = bench.join("net-bench.txt");
    match fs::read_to_string(&ours) {
        Ok(text) if !our_figures(&text).is_empty() => {
            let age = fs::metadata(&ours)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map_or(String::new(), |a| format!(", written {}s ago", a.as_secs()));
            writeln!(
                report,
                "our kernel (target/bench/net-bench.txt{age}), ratio to the Linux baseline:"
            )
            .unwrap();
            for (line, ours) in our_figures(&text) {
                writeln!(report, "  {line}  = {:.2}x Linux", ours / mbs).unwrap();
            }
        }
        _ => writeln!(
            report,
            "our kernel: no figures in target/bench/net-bench.txt (run net.rs's \
             qemu_nodes_bench_and_send_64_mib_intact first for the comparison)"
        )
        .unwrap(),
    }
    print!("{report}");
    println!(
        "(wall time of the baseline: {:.1}s)",
        started.elapsed().as_secs_f64()
    );
    fs::create_dir_all(&bench).unwrap();
    fs::write(bench.join("net-baseline.txt"), &report).unwrap();
    drop(guests);
    let _ = fs::remove_dir_all(&dir);
}
