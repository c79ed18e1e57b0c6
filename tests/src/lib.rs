//! End-to-end test harness: boots hypervisor nodes and talks to their serial consoles.
//!
//! A [`Cluster`] runs `qemu-run.sh --headless DIR` as a child process: the script builds each
//! node's configuration and disk image, starts the emulators (QEMU TCG `-cpu EPYC` for AMD SVM,
//! or Bochs with an Intel VMX+EPT model), links the nodes and prints `READY` once every node's
//! console is up. Node K's console is the unix socket `DIR/nodeK.sock`, its complete serial
//! output the file `DIR/nodeK.log` (both kept by `console-relay`, which logs exactly what the
//! node sent); a [`Console`] writes to the socket and reads the log, so it sees everything the
//! node printed since power-on, including what came before it connected.
//!
//! ```no_run
//! use std::time::Duration;
//! use tests::{Cluster, ClusterOptions};
//!
//! let mut cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).unwrap();
//! let node1 = cluster.console(1);
//! let out = node1.command("info").unwrap(); // sends the line, returns everything up to the prompt
//! assert!(out.contains("AMD-V (SVM)"), "{out}");
//! node1.send_line("help").unwrap();
//! node1.expect("reboot", Duration::from_secs(10)).unwrap();
//! ```
//!
//! Process hygiene, whatever happens:
//! - dropping a `Cluster` sends SIGTERM to `qemu-run.sh`, which stops every process it started
//!   (by PID; SIGKILL for those that ignore SIGTERM) and exits; the drop waits for it, bounded;
//! - `qemu-run.sh` runs in its own process group with a parent-death signal (SIGTERM when the
//!   thread that started it dies), and starts its emulators with one too, so a test process that
//!   is killed (Ctrl-C on `cargo test`, SIGKILL, a panic that aborts) still takes its nodes with
//!   it. A `Cluster` therefore belongs to the thread that started it;
//! - a test that fails (the drop happens while panicking) keeps DIR with every node's log and
//!   prints its path; a test that passes removes DIR. So tests fail by panicking (`unwrap`,
//!   `assert!`): `HarnessError` and `ExpectError` print their whole message as `Debug` for that.
//!
//! Images are built once per test process (`qemu-run.sh --build-only`), unless the environment
//! variable `HV_E2E_NO_BUILD=1` says the caller (run-tests.sh) has already built them.
//!
//! Every wait is bounded: READY by [`ClusterOptions::boot_timeout`], console waits by the
//! timeout given or [`Console::set_default_timeout`].

pub mod guest_disk;
pub mod hub;
pub mod linux_guest;
pub mod switch;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Which disk image the nodes boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS boot (SeaBIOS under QEMU, the Bochs BIOS under Bochs).
    Bios,
    /// UEFI boot with OVMF (QEMU only).
    Uefi,
}

/// Which emulator runs the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    /// QEMU TCG with `-cpu EPYC`: AMD SVM with nested paging.
    Qemu,
    /// Bochs with an Intel model ([`ClusterOptions::bochs_cpu`], by default corei7_skylake_x: VMX
    /// with EPT and A/D bits). BIOS only.
    Bochs,
}

/// What [`Cluster::start`] boots.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of nodes (1..=99); two or more are linked through a switch (frame-hub).
    pub nodes: usize,
    pub firmware: Firmware,
    pub emulator: Emulator,
    /// The Bochs CPU model (`qemu-run.sh --bochs-cpu`), e.g. `corei7_ivy_bridge_3770k` (EPT
    /// without A/D bits); `None`: the script's default, corei7_skylake_x. Only for Bochs.
    pub bochs_cpu: Option<String>,
    /// Memory per node.
    pub mem_mib: u32,
    /// Extra `key = value` lines for every node's configuration (`qemu-run.sh --set`), e.g.
    /// `("on_panic".into(), "exit".into())`.
    pub set: Vec<(String, String)>,
    /// Bound on the wait for every node's console.
    pub boot_timeout: Duration,
    /// The QEMU NIC model of the node links (`qemu-run.sh --nic`), e.g. `virtio-net-pci`;
    /// `None`: the script's default, e1000. Only for QEMU.
    pub nic: Option<String>,
    /// Record every node's cluster-link frames in `nodeK.cluster.pcap` (`qemu-run.sh
    /// --capture`). Only for QEMU.
    pub capture: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 2,
            firmware: Firmware::Bios,
            emulator: Emulator::Qemu,
            bochs_cpu: None,
            mem_mib: 512,
            set: Vec::new(),
            boot_timeout: Duration::from_secs(180),
            nic: None,
            capture: false,
        }
    }
}

impl ClusterOptions {
    /// One node, BIOS, QEMU: the cheapest node there is.
    pub fn single() -> Self {
        ClusterOptions {
            nodes: 1,
            ..Default::default()
        }
    }

    /// One node under Bochs with its default CPU model (Intel VMX, EPT with A/D bits).
    pub fn single_bochs() -> Self {
        ClusterOptions {
            emulator: Emulator::Bochs,
            ..Self::single()
        }
    }

    /// Runs the nodes under Bochs with this CPU model (`qemu-run.sh --bochs-cpu MODEL`).
    pub fn with_bochs_cpu(mut self, model: &str) -> Self {
        self.emulator = Emulator::Bochs;
        self.bochs_cpu = Some(model.to_string());
        self
    }

    /// Adds a configuration line for every node.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.set.push((key.to_string(), value.to_string()));
        self
    }

    /// The `qemu-run.sh` arguments for these options (after `--headless DIR`).
    pub fn script_args(&self) -> Vec<String> {
        let mut args = vec![
            "--nodes".to_string(),
            self.nodes.to_string(),
            "--mem".to_string(),
            self.mem_mib.to_string(),
        ];
        if self.firmware == Firmware::Uefi {
            args.push("--uefi".into());
        }
        if self.emulator == Emulator::Bochs {
            args.push("--bochs".into());
            if let Some(model) = &self.bochs_cpu {
                args.push("--bochs-cpu".into());
                args.push(model.clone());
            }
        }
        if let Some(nic) = &self.nic {
            args.push("--nic".into());
            args.push(nic.clone());
        }
        if self.capture {
            args.push("--capture".into());
        }
        for (k, v) in &self.set {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        args
    }
}

/// Why the harness could not do what was asked.
pub struct HarnessError(pub String);

// Debug prints the message as is: `unwrap()` and `Result`-returning tests show it readably.
impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

fn err<T>(msg: impl Into<String>) -> Result<T, HarnessError> {
    Err(HarnessError(msg.into()))
}

/// The migration benchmarks' hot set: the pages a dirtying guest rewrites, the same for our test
/// guest (`vm create ... hot=`) and QEMU's reference Linux guest (the file it rewrites), so both
/// benchmarks run the same workload. 12 MiB: what the Linux guest's free memory allows.
pub const BENCH_DIRTY_HOT_PAGES: u64 = 3072;

/// The downtime target of the benchmark's migrations (`migrate ... downtime=`, the kernel's
/// default), which QEMU's reference also runs with (`downtime-limit`) for a like-for-like row
/// next to its own default of 300 ms: bytes on the wire depend on how much may be left for the
/// pause.
pub const BENCH_DOWNTIME_MS: u64 = 10;

/// The workspace root (where qemu-run.sh lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .to_path_buf()
}

/// The cargo target directory (CARGO_TARGET_DIR or the workspace's target/).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the kernel, the image tool and the console relay once per process.
pub fn ensure_built() -> Result<(), HarnessError> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| {
        if std::env::var("HV_E2E_NO_BUILD").is_ok_and(|v| !v.is_empty() && v != "0") {
            return Ok(());
        }
        let out = Command::new(workspace_root().join("qemu-run.sh"))
            .arg("--build-only")
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run qemu-run.sh --build-only: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "qemu-run.sh --build-only failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    result.clone().map_err(HarnessError)
}

/// `--kernel ELF` when the environment variable HV_E2E_KERNEL names a kernel to boot instead of
/// the one built from kernel/ (for trying the harness against another kernel).
fn kernel_override() -> Vec<String> {
    match std::env::var("HV_E2E_KERNEL") {
        Ok(k) if !k.is_empty() => vec!["--kernel".into(), k],
        _ => Vec::new(),
    }
}

/// A name for the current test's run directory: the test function's name (libtest names each
/// test's thread after the test), made file-name safe and short (unix socket paths are limited).
pub fn dir_stem(thread_name: Option<&str>) -> String {
    let name = thread_name
        .filter(|n| *n != "main")
        .and_then(|n| n.rsplit("::").next())
        .unwrap_or("cluster");
    let mut stem: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if stem.is_empty() {
        stem.push_str("cluster");
    }
    stem
}

/// Unix socket paths hold at most 107 bytes; DIR/node99.serial (qemu-run.sh's longest) must fit.
const MAX_DIR_LEN: usize = 107 - "/node99.serial".len();

fn run_dir_for(stem: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let leaf = format!("{stem}-{}-{n}", std::process::id());
    let preferred = target_dir().join("e2e").join(&leaf);
    if preferred.as_os_str().len() <= MAX_DIR_LEN {
        preferred
    } else {
        std::env::temp_dir().join("hv-e2e").join(leaf)
    }
}

/// A set of running nodes, stopped when dropped.
pub struct Cluster {
    child: Option<Child>,
    dir: PathBuf,
    consoles: Vec<Console>,
    opts: ClusterOptions,
    keep_dir: bool,
    /// qemu-run.sh's exit code once it has been stopped.
    exit_code: Option<Option<i32>>,
}

impl Cluster {
    /// Boots the nodes and waits until every console is ready and shows its prompt.
    pub fn start(opts: ClusterOptions) -> Result<Cluster, HarnessError> {
        if opts.nodes == 0 || opts.nodes > 99 {
            return err(format!("nodes must be 1..=99, not {}", opts.nodes));
        }
        ensure_built()?;
        let dir = run_dir_for(&dir_stem(thread::current().name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError(format!("create {}: {e}", dir.display())))?;
        let script_log = File::create(dir.join("qemu-run.log"))
            .map_err(|e| HarnessError(format!("create qemu-run.log: {e}")))?;

        // qemu-run.sh reports its own, more precise, timeout a little before ours.
        let script_timeout = opts.boot_timeout.as_secs().max(10);
        let mut cmd = Command::new(workspace_root().join("qemu-run.sh"));
        cmd.arg("--headless")
            .arg(&dir)
            .arg("--no-build")
            .arg("--timeout")
            .arg(script_timeout.to_string())
            .args(opts.script_args())
            .args(kernel_override())
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(script_log));
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Our own process group: a terminal's Ctrl-C reaches the test process, whose
                // death then stops the script through the parent-death signal below.
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl: then nobody would stop us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| HarnessError(format!("cannot run qemu-run.sh: {e}")))?;

        // Wait for READY on stdout, bounded.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut cluster = Cluster {
            child: Some(child),
            dir,
            consoles: Vec::new(),
            opts,
            keep_dir: false,
            exit_code: None,
        };
        let deadline = Instant::now() + cluster.opts.boot_timeout + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.trim() == "READY" => break,
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    cluster.keep_dir = true;
                    return err(format!(
                        "no READY from qemu-run.sh within {:?}; {}",
                        cluster.opts.boot_timeout,
                        cluster.diagnostics()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    cluster.keep_dir = true;
                    let status = cluster.child.as_mut().and_then(|c| {
                        let t0 = Instant::now();
                        while t0.elapsed() < Duration::from_secs(10) {
                            if let Ok(Some(st)) = c.try_wait() {
                                return Some(st);
                            }
                            thread::sleep(Duration::from_millis(50));
                        }
                        None
                    });
                    return err(format!(
                        "qemu-run.sh ended before READY ({}); {}",
                        status.map_or("still running".to_string(), |s| s.to_string()),
                        cluster.diagnostics()
                    ));
                }
            }
        }

        for k in 1..=cluster.opts.nodes {
            let name = cluster
                .opts
                .set
                .iter()
                .rev()
                .find(|(key, _)| key == "name")
                .map_or_else(|| format!("node{k}"), |(_, v)| v.clone());
            let console = Console::open(&cluster.dir, k, &name)?;
            cluster.consoles.push(console);
        }
        // Position every console after its boot prompt.
        for console in &mut cluster.consoles {
            console.expect("console ready", Duration::from_secs(5))?;
            console.wait_prompt()?;
        }
        Ok(cluster)
    }

    /// The run directory (configs, logs, sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> usize {
        self.consoles.len()
    }

    /// Node K's console (K counts from 1).
    pub fn console(&mut self, k: usize) -> &mut Console {
        assert!(
            (1..=self.consoles.len()).contains(&k),
            "node {k} does not exist"
        );
        &mut self.consoles[k - 1]
    }

    /// The exit status of node K's emulator, if it has exited on its own.
    pub fn node_exit_status(&self, k: usize) -> Option<i32> {
        read_status(&self.dir, k)
    }

    /// Waits until node K's emulator exits and returns its exit status.
    pub fn wait_node_exit(&self, k: usize, timeout: Duration) -> Result<i32, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.node_exit_status(k) {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return err(format!(
                    "node{k}'s emulator still running after {timeout:?}; log tail:\n{}",
                    tail_of_file(&self.dir.join(format!("node{k}.log")), 1500)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one QMP command (a JSON object) to node K's QEMU and returns its reply line.
    pub fn qmp(&self, k: usize, command: &str) -> Result<String, HarnessError> {
        let path = self.dir.join(format!("node{k}.qmp"));
        let fail = |e: io::Error| HarnessError(format!("QMP of node{k} ({}): {e}", path.display()));
        let stream = UnixStream::connect(&path).map_err(fail)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(fail)?;
        let mut writer = stream.try_clone().map_err(fail)?;
        let mut reader = io::BufReader::new(stream);
        let mut line = String::new();
        // The greeting, then capabilities negotiation, then the command; events may come
        // in between, so read until a line with "return" or "error".
        reader.read_line(&mut line).map_err(fail)?;
        let reply = |reader: &mut io::BufReader<UnixStream>| -> Result<String, HarnessError> {
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).map_err(fail)? == 0 {
                    return err(format!("QMP of node{k}: connection closed"));
                }
                if line.contains("\"return\"") || line.contains("\"error\"") {
                    return Ok(line);
                }
            }
        };
        writeln!(writer, "{{\"execute\": \"qmp_capabilities\"}}").map_err(fail)?;
        reply(&mut reader)?;
        writeln!(writer, "{command}").map_err(fail)?;
        let answer = reply(&mut reader)?;
        if answer.contains("\"error\"") {
            return err(format!("QMP of node{k}: {command} failed: {answer}"));
        }
        Ok(answer)
    }

    /// Cuts (or restores) node K's cluster link, as pulling its cable would.
    pub fn set_cluster_link(&self, k: usize, up: bool) -> Result<(), HarnessError> {
        self.qmp(
            k,
            &format!("{{\"execute\": \"set_link\", \"arguments\": {{\"name\": \"cluster\", \"up\": {up}}}}}"),
        )
        .map(|_| ())
    }

    /// Kills node K's emulator at once (SIGKILL), as a power loss would.
    pub fn kill_node(&self, k: usize) -> Result<(), HarnessError> {
        let path = self.dir.join(format!("node{k}.pid"));
        let pid = fs::read_to_string(&path)
            .map_err(|e| HarnessError(format!("{}: {e}", path.display())))?;
        let status = Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .map_err(|e| HarnessError(format!("kill: {e}")))?;
        if !status.success() {
            return err(format!("kill -KILL {} failed", pid.trim()));
        }
        Ok(())
    }

    /// Keeps the run directory after the cluster is dropped, even when the test passes.
    pub fn keep_dir(&mut self) {
        self.keep_dir = true;
    }

    /// Stops every node now and checks that qemu-run.sh exited cleanly (status 0).
    pub fn stop(mut self) -> Result<(), HarnessError> {
        match self.shutdown() {
            Some(0) => Ok(()),
            other => {
                self.keep_dir = true;
                err(format!(
                    "qemu-run.sh did not stop cleanly (status {other:?}); {}",
                    self.diagnostics()
                ))
            }
        }
    }

    /// SIGTERM to qemu-run.sh, bounded wait, SIGKILL to its process group as a last resort.
    /// Returns its exit code (None if it had to be killed or was killed by a signal).
    fn shutdown(&mut self) -> Option<i32> {
        if let Some(code) = self.exit_code {
            return code;
        }
        let code = self.stop_script();
        self.exit_code = Some(code);
        code
    }

    fn stop_script(&mut self) -> Option<i32> {
        self.consoles.clear();
        let mut child = self.child.take()?;
        let pid = child.id() as libc::pid_t;
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        // SAFETY: plain signal to the child we started (not yet reaped, so the pid is ours).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            match child.try_wait() {
                Ok(Some(st)) => return st.code(),
                Ok(None) => thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
        eprintln!(
            "e2e: qemu-run.sh (pid {pid}) ignored SIGTERM for 20 s: killing its process group"
        );
        // SAFETY: the child leads its own process group (setpgid in pre_exec).
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
        let _ = child.wait();
        None
    }

    /// qemu-run.sh's messages and the tail of every node's serial log.
    pub fn diagnostics(&self) -> String {
        let mut s = format!("run directory {}\n", self.dir.display());
        s.push_str("--- qemu-run.sh:\n");
        s.push_str(&tail_of_file(&self.dir.join("qemu-run.log"), 3000));
        for k in 1..=self.opts.nodes {
            s.push_str(&format!("\n--- node{k}.log (tail):\n"));
            s.push_str(&tail_of_file(&self.dir.join(format!("node{k}.log")), 1500));
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let clean = self.shutdown() == Some(0);
        if thread::panicking() || self.keep_dir || !clean {
            eprintln!(
                "e2e: kept the run directory with every node's serial log: {}",
                self.dir.display()
            );
            if !clean && !thread::panicking() {
                eprintln!("e2e: qemu-run.sh did not exit cleanly; see qemu-run.log there");
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn read_status(dir: &Path, k: usize) -> Option<i32> {
    std::fs::read_to_string(dir.join(format!("node{k}.status")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The last `max` bytes of a file as text (escape sequences removed), or a note why not.
pub fn tail_of_file(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail_text(&bytes, max),
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// The last `max` bytes of some output, as printable text: ANSI escape sequences dropped,
/// control characters other than newline and tab shown as `\xNN`.
pub fn tail_text(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ params final-byte
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&p) = chars.peek() {
                        chars.next();
                        if ('@'..='~').contains(&p) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// A wait on a console that did not end in a match.
pub struct ExpectError {
    /// Which node.
    pub node: String,
    /// What was awaited.
    pub pattern: String,
    /// Why it ended: a timeout, or the node's emulator exiting.
    pub reason: String,
    /// The end of the output seen since the last match (printable).
    pub tail: String,
}

impl fmt::Display for ExpectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: waiting for {:?}: {}; output since the last match ends with:\n{}",
            self.node, self.pattern, self.reason, self.tail
        )
    }
}

impl fmt::Debug for ExpectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for ExpectError {}

impl From<ExpectError> for HarnessError {
    fn from(e: ExpectError) -> Self {
        HarnessError(e.to_string())
    }
}

/// One node's serial console: write to its socket, read its complete log, expect-style.
///
/// The text the console has *seen* is the node's serial output since power-on; a cursor marks
/// where the last match ended, and every `expect` searches from there.
pub struct Console {
    node: String,
    index: usize,
    dir: PathBuf,
    stream: UnixStream,
    log: File,
    seen: Vec<u8>,
    cursor: usize,
    default_timeout: Duration,
    drain: Option<thread::JoinHandle<()>>,
}

impl Console {
    /// Connects to node K's console in DIR. `name` is the node's name (its prompt is `name> `).
    pub fn open(dir: &Path, k: usize, name: &str) -> Result<Console, HarnessError> {
        let sock = dir.join(format!("node{k}.sock"));
        let log_path = dir.join(format!("node{k}.log"));
        let stream = UnixStream::connect(&sock)
            .map_err(|e| HarnessError(format!("connect {}: {e}", sock.display())))?;
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| HarnessError(format!("socket: {e}")))?;
        let log = File::open(&log_path)
            .map_err(|e| HarnessError(format!("open {}: {e}", log_path.display())))?;
        // The log is the record; what the socket delivers is read and dropped so the node's
        // output never stalls on a full socket buffer.
        let mut drain_end = stream
            .try_clone()
            .map_err(|e| HarnessError(format!("socket: {e}")))?;
        let drain = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = drain_end.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        });
        Ok(Console {
            node: name.to_string(),
            index: k,
            dir: dir.to_path_buf(),
            stream,
            log,
            seen: Vec::new(),
            cursor: 0,
            default_timeout: Duration::from_secs(60),
            drain: Some(drain),
        })
    }

    /// The node's name, as in its prompt.
    pub fn name(&self) -> &str {
        &self.node
    }

    /// The prompt the shell prints: `name> `.
    pub fn prompt(&self) -> String {
        format!("{}> ", self.node)
    }

    /// The timeout of [`wait_prompt`](Self::wait_prompt) and [`command`](Self::command)
    /// (default 60 s).
    pub fn set_default_timeout(&mut self, timeout: Duration) {
        self.default_timeout = timeout;
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Sends a line as a terminal does: the text, then Enter (carriage return).
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\r');
        self.send_bytes(&bytes)
    }

    /// Reads what the node printed since the last read into `seen`.
    fn pull(&mut self) {
        let mut buf = [0u8; 16384];
        loop {
            match self.log.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn exited(&self) -> Option<i32> {
        read_status(&self.dir, self.index)
    }

    /// Waits until `needle` appears after the cursor; returns the text from the cursor up to and
    /// including it and moves the cursor past it.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> Result<String, ExpectError> {
        self.expect_any(&[needle], timeout).map(|(_, text)| text)
    }

    /// Waits for the first of several strings; returns which one matched (its index) and the
    /// text up to and including it.
    pub fn expect_any(
        &mut self,
        needles: &[&str],
        timeout: Duration,
    ) -> Result<(usize, String), ExpectError> {
        let deadline = Instant::now() + timeout;
        let mut exited_seen = false;
        loop {
            self.pull();
            if let Some((which, end)) = find_first(&self.seen[self.cursor..], needles) {
                let end = self.cursor + end;
                let text = String::from_utf8_lossy(&self.seen[self.cursor..end]).into_owned();
                self.cursor = end;
                return Ok((which, text));
            }
            // One more read after the emulator exits: its last bytes may land just before.
            if exited_seen {
                let st = self.exited().unwrap_or(-1);
                return Err(self.failure(needles, format!("the emulator exited (status {st})")));
            }
            if self.exited().is_some() {
                exited_seen = true;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(self.failure(needles, format!("timed out after {timeout:?}")));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn failure(&self, needles: &[&str], reason: String) -> ExpectError {
        ExpectError {
            node: self.node.clone(),
            pattern: needles.join("\" or \""),
            reason,
            tail: tail_text(&self.seen[self.cursor..], 2000),
        }
    }

    /// Waits for the shell prompt (default timeout); returns the text before and including it.
    pub fn wait_prompt(&mut self) -> Result<String, ExpectError> {
        let prompt = self.prompt();
        let timeout = self.default_timeout;
        self.expect(&prompt, timeout)
    }

    /// Runs one command: sends the line and waits for the next prompt. Returns what the node
    /// printed in between (the echoed command line included).
    pub fn command(&mut self, line: &str) -> Result<String, ExpectError> {
        self.send_line(line).map_err(|e| ExpectError {
            node: self.node.clone(),
            pattern: self.prompt(),
            reason: format!("cannot send {line:?}: {e}"),
            tail: String::new(),
        })?;
        let out = self.wait_prompt()?;
        let prompt = self.prompt();
        Ok(out.strip_suffix(&prompt).unwrap_or(&out).to_string())
    }

    /// Runs one command while the node may print other lines at any time (running VMs' guest
    /// lines `[name] ...`, after each of which the shell redraws its prompt and the line being
    /// typed): [`command`](Self::command) would stop at such a redrawn prompt. This waits for
    /// the echo of the whole line and its line end (`line\r\n`, which the editor prints on
    /// Enter, after any redraw), then for the prompt the shell prints after the command's
    /// output: nothing else can come in between, the shell runs a command to its end before
    /// it shows guest output. Returns the text before the echo (what the node printed since
    /// the last match: guest lines, for instance) and the command's output (neither the echo
    /// nor the prompt).
    pub fn command_amid_output(&mut self, line: &str) -> Result<(String, String), ExpectError> {
        self.send_line(line).map_err(|e| ExpectError {
            node: self.node.clone(),
            pattern: format!("{line}\r\n"),
            reason: format!("cannot send {line:?}: {e}"),
            tail: String::new(),
        })?;
        let timeout = self.default_timeout;
        let echo = format!("{line}\r\n");
        let before = self.expect(&echo, timeout)?;
        let before = before.strip_suffix(&echo).unwrap_or(&before).to_string();
        let out = self.wait_prompt()?;
        let prompt = self.prompt();
        Ok((
            before,
            out.strip_suffix(&prompt).unwrap_or(&out).to_string(),
        ))
    }

    /// Forgets the output not matched yet: after a short quiet period (no new output for
    /// `quiet`, at most `timeout` in all), moves the cursor to the end of what was printed.
    pub fn skip_output(&mut self, quiet: Duration, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last_len = usize::MAX;
        let mut last_change = Instant::now();
        while Instant::now() < deadline {
            self.pull();
            if self.seen.len() != last_len {
                last_len = self.seen.len();
                last_change = Instant::now();
            } else if last_change.elapsed() >= quiet {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.cursor = self.seen.len();
    }

    /// Everything the node printed since power-on (as far as read), as text.
    pub fn output(&mut self) -> String {
        self.pull();
        String::from_utf8_lossy(&self.seen).into_owned()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.drain.take() {
            let _ = h.join();
        }
    }
}

/// The earliest match among `needles` in `hay`: (index of the needle, end offset of the match).
fn find_first(hay: &[u8], needles: &[&str]) -> Option<(usize, usize)> {
    needles
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_empty())
        .filter_map(|(i, n)| {
            let n = n.as_bytes();
            hay.windows(n.len())
                .position(|w| w == n)
                .map(|pos| (pos, i, pos + n.len()))
        })
        .min()
        .map(|(_, i, end)| (i, end))
}

/// An exception report as the kernel prints it:
/// `EXCEPTION #UD invalid opcode (vector 6) error=0x0 rip=0xffff800000001234 cr2=0x0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExceptionReport {
    pub mnemonic: String,
    pub vector: u8,
    pub error_code: u64,
    pub rip: u64,
    pub cr2: u64,
}

/// Finds and parses the first exception report line in `text`.
pub fn parse_exception_report(text: &str) -> Option<ExceptionReport> {
    let line = text.lines().find(|l| l.contains("EXCEPTION #"))?;
    let rest = &line[line.find("EXCEPTION #")? + "EXCEPTION #".len()..];
    let mnemonic: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let vector = {
        let v = &rest[rest.find("(vector ")? + "(vector ".len()..];
        let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()?
    };
    let hex_field = |key: &str| -> Option<u64> {
        let pat = format!("{key}=0x");
        let v = &rest[rest.find(&pat)? + pat.len()..];
        let digits: String = v.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        u64::from_str_radix(&digits, 16).ok()
    };
    Some(ExceptionReport {
        mnemonic,
        vector,
        error_code: hex_field("error")?,
        rip: hex_field("rip")?,
        cr2: hex_field("cr2")?,
    })
}

/// The `0x..` number right after `key` in `text` (e.g. a memory digest in a node's line).
pub fn hex_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let word = rest.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    u64::from_str_radix(word.strip_prefix("0x")?, 16).ok()
}

impl Console {
    /// Asks the test guest `vm` for a full verification of its memory (`vm verify`) and panics
    /// unless it answers `verify ok` within `timeout`.
    pub fn verify_guest(&mut self, vm: &str, timeout: Duration) {
        let (_, out) = self
            .command_amid_output(&format!("vm verify {vm}"))
            .unwrap();
        assert!(out.contains("verification requested"), "{out}");
        let ok = format!("[{vm}] verify ok");
        let failed = format!("[{vm}] verify FAILED");
        let (which, text) = self.expect_any(&[&ok, &failed], timeout).unwrap();
        assert_eq!(which, 0, "{vm}'s verification failed:\n{text}");
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), for garbage-input tests that fail the same
/// way every time.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn script_args_follow_options() {
        let opts = ClusterOptions {
            nodes: 3,
            firmware: Firmware::Uefi,
            mem_mib: 256,
            ..Default::default()
        }
        .with("on_panic", "exit");
        assert_eq!(
            opts.script_args(),
            [
                "--nodes",
                "3",
                "--mem",
                "256",
                "--uefi",
                "--set",
                "on_panic=exit"
            ]
        );
        let bochs = ClusterOptions {
            emulator: Emulator::Bochs,
            ..ClusterOptions::single()
        };
        assert!(bochs.script_args().contains(&"--bochs".to_string()));
        assert!(!bochs.script_args().contains(&"--bochs-cpu".to_string()));
        let ivy = ClusterOptions::single().with_bochs_cpu("corei7_ivy_bridge_3770k");
        assert_eq!(ivy.emulator, Emulator::Bochs);
        assert_eq!(
            ivy.script_args(),
            [
                "--nodes",
                "1",
                "--mem",
                "512",
                "--bochs",
                "--bochs-cpu",
                "corei7_ivy_bridge_3770k"
            ]
        );
        assert_eq!(ClusterOptions::single_bochs().emulator, Emulator::Bochs);
    }

    #[test]
    fn dir_stem_is_short_and_safe() {
        assert_eq!(dir_stem(Some("qemu_bios_boots")), "qemu_bios_boots");
        assert_eq!(dir_stem(Some("mod::inner::the_test")), "the_test");
        assert_eq!(dir_stem(Some("main")), "cluster");
        assert_eq!(dir_stem(None), "cluster");
        assert_eq!(dir_stem(Some("a b/c")), "a_b_c");
        assert_eq!(dir_stem(Some(&"x".repeat(100))).len(), 32);
    }

    #[test]
    fn find_first_picks_the_earliest_match() {
        assert_eq!(find_first(b"abc node1> x", &["node1> "]), Some((0, 11)));
        assert_eq!(
            find_first(b"error: bad\nnode1> ", &["node1> ", "error"]),
            Some((1, 5))
        );
        assert_eq!(find_first(b"nothing", &["x", ""]), None);
    }

    #[test]
    fn tail_text_strips_escapes_and_shows_controls() {
        assert_eq!(
            tail_text(b"\x1b[2J\x1b[1;1Hhello\r\n\x01", 100),
            "hello\n\\x01"
        );
        assert_eq!(tail_text(b"0123456789", 3), "789");
    }

    #[test]
    fn exception_report_is_parsed() {
        let text = "[  1.234] boom\r\nEXCEPTION #PF (vector 14) error=0x2 rip=0xffff800000012345 \
                    cr2=0xdead000\r\nhalted\r\n";
        assert_eq!(
            parse_exception_report(text),
            Some(ExceptionReport {
                mnemonic: "PF".into(),
                vector: 14,
                error_code: 2,
                rip: 0xffff_8000_0001_2345,
                cr2: 0xdead000,
            })
        );
        assert_eq!(parse_exception_report("no report here"), None);
        // With the exception's name between mnemonic and vector, as the kernel prints it.
        let named = "EXCEPTION #UD invalid opcode (vector 6) error=0x0 rip=0xffff80000001a2b0 \
                     cr2=0x0\n";
        let report = parse_exception_report(named).unwrap();
        assert_eq!((report.mnemonic.as_str(), report.vector), ("UD", 6));
        assert_eq!(report.rip, 0xffff_8000_0001_a2b0);
    }

    #[test]
    fn pseudo_random_bytes_are_deterministic_and_varied() {
        let a = pseudo_random_bytes(42, 4096);
        assert_eq!(a, pseudo_random_bytes(42, 4096));
        let distinct: std::collections::HashSet<u8> = a.iter().copied().collect();
        assert!(distinct.len() > 200);
    }
}
