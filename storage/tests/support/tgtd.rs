//! A private iSCSI target for integration tests: Debian's `tgt` 1.0.85 (`tgtd` and `tgtadm`).
//!
//! [`Tgtd::start`] gives each test its own `tgtd`, listening on a free loopback port with its own
//! control socket (`-C`), so tests run in parallel and never touch a target someone else runs.
//! LUNs are sparse files in a fresh temporary directory. Dropping the [`Tgtd`] stops the daemon
//! the way tgt wants (it ignores SIGTERM): system offline, targets deleted with `--force`, system
//! deleted; then it waits for that PID, SIGKILLs that PID only if it is still there, and removes
//! the directory.
//!
//! For reconnect tests, [`Tgtd::drop_connections`] closes every connection of a target from the
//! target side (`tgtadm --op delete --mode conn`), and [`Tgtd::set_target_online`] makes the
//! target refuse (offline) or accept (ready) new logins; tgt keeps existing sessions of an
//! offline target, so an outage is both together.
//!
//! When tgtd cannot run here (not installed, not root) [`Tgtd::start`] says so with
//! [`HarnessError::is_unavailable`]; [`start_or_skip`] turns that into a test failure unless
//! `HV_SKIP_TGTD=1` is set.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The IQN prefix of the harness's targets; target `tid` is `{IQN_PREFIX}:disk{tid}`.
pub const IQN_PREFIX: &str = "iqn.2026-01.test.hv";

/// Set to `1` to let tests skip (with a message) when tgtd cannot run on this host.
pub const SKIP_ENV: &str = "HV_SKIP_TGTD";

/// Set to `1` to keep the temporary directory (LUN images, tgtd.log) after a test.
pub const KEEP_ENV: &str = "HV_KEEP_TGTD";

/// How long tgtd may take to listen and answer tgtadm.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one tgtadm invocation may take.
const TGTADM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long tgtd may take to exit after `--op delete --mode system`.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Fresh ports to try when one is taken between choosing it and tgtd binding it.
const START_ATTEMPTS: usize = 5;

/// tgtd keeps `-C` in a C `short` (it refuses 32768 and above), so the control number cannot be
/// the port itself. Ports map into 16384..=32767, away from the small numbers people use by hand;
/// a clash makes tgtd exit ("another tgtd is using ...") and the harness tries another port.
const CONTROL_BASE: u16 = 16384;

/// Where programs live besides PATH: the Debian package puts tgtd and tgtadm in /usr/sbin.
const SBIN_DIRS: [&str; 5] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"];

/// One logical unit to create: LUN `lun` of target `tid`, backed by a sparse file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LunSpec {
    /// Target ID, 1 or more. Each distinct `tid` becomes one target.
    pub tid: u32,
    /// LUN, 1 or more: tgt puts its own controller LU at LUN 0.
    pub lun: u16,
    /// Size of the backing file in bytes (tgt exposes 512-byte blocks).
    pub size: u64,
}

impl LunSpec {
    /// LUN `lun` of `size` bytes on target 1.
    pub const fn new(lun: u16, size: u64) -> LunSpec {
        LunSpec { tid: 1, lun, size }
    }

    /// The same LUN on target `tid`.
    pub const fn on_target(self, tid: u32) -> LunSpec {
        LunSpec { tid, ..self }
    }
}

/// Why the harness could not do what a test asked.
#[derive(Debug)]
pub enum HarnessError {
    /// A program is not installed (`apt-get install tgt libiscsi-bin`).
    NotInstalled { program: &'static str },
    /// tgtd needs root (for /var/run/tgtd and its portal).
    NotRoot,
    /// The test asked for something impossible (duplicate LUN, LUN 0, size 0...).
    Invalid(String),
    /// A file or process operation failed.
    Io { context: String, source: io::Error },
    /// tgtd exited on its own; `log` is what it printed.
    Exited { status: ExitStatus, log: String },
    /// Something did not happen in time.
    Timeout { what: String, log: String },
    /// A command (tgtadm, or a tool run by [`run_tool`]) failed.
    Command {
        command: String,
        status: Option<i32>,
        output: String,
    },
}

impl HarnessError {
    /// Whether tgtd cannot run on this host at all (rather than failed).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            HarnessError::NotInstalled { .. } | HarnessError::NotRoot
        )
    }

    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
        let context = context.into();
        move |source| HarnessError::Io { context, source }
    }
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HarnessError::NotInstalled { program } => write!(
                f,
                "`{program}` is not installed (apt-get install tgt libiscsi-bin)"
            ),
            HarnessError::NotRoot => write!(f, "tgtd must run as root"),
            HarnessError::Invalid(what) => write!(f, "invalid harness request: {what}"),
            HarnessError::Io { context, source } => write!(f, "{context}: {source}"),
            HarnessError::Exited { status, log } => {
                write!(f, "tgtd exited early ({status}); its log:\n{log}")
            }
            HarnessError::Timeout { what, log } => {
                write!(f, "timed out waiting for {what}")?;
                if !log.is_empty() {
                    write!(f, "; tgtd log:\n{log}")?;
                }
                Ok(())
            }
            HarnessError::Command {
                command,
                status,
                output,
            } => {
                let status = status.map_or("a signal".to_string(), |code| code.to_string());
                write!(f, "`{command}` failed with {status}: {}", output.trim())
            }
        }
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HarnessError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Starts tgtd with `luns`, or, when tgtd cannot run here and `HV_SKIP_TGTD=1` is set, prints a
/// line saying `test` was skipped and returns `None`. Any other failure panics: a test that needs
/// a target must not pass without one.
///
/// The skip line goes straight to the process's stderr, past libtest's output capture, so it
/// shows in a plain `cargo test` run.
pub fn start_or_skip(test: &str, luns: &[LunSpec]) -> Option<Tgtd> {
    match Tgtd::start(luns) {
        Ok(tgtd) => Some(tgtd),
        Err(error) if error.is_unavailable() && skip_requested() => {
            report_skip(test, &error);
            None
        }
        Err(error) if error.is_unavailable() => panic!(
            "{test}: tgtd cannot run here: {error}. Set {SKIP_ENV}=1 to skip the tests that need \
             it"
        ),
        Err(error) => panic!("{test}: cannot start tgtd: {error}"),
    }
}

/// Prints "SKIPPED <test>: <why>" on the real stderr (not captured by libtest).
pub fn report_skip(test: &str, why: &dyn fmt::Display) {
    let _ = writeln!(io::stderr(), "SKIPPED {test}: {why} and {SKIP_ENV}=1");
}

/// Whether `HV_SKIP_TGTD=1`.
pub fn skip_requested() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|value| value == "1")
}

/// An iSCSI connection as tgtadm lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The session (I_T nexus) ID.
    pub sid: u64,
    /// The connection ID within the session.
    pub cid: u32,
    /// The initiator's IQN.
    pub initiator: String,
    /// The initiator's IP address.
    pub address: String,
}

/// tgtadm bound to one tgtd's control socket.
#[derive(Debug, Clone)]
pub struct Control {
    tgtadm: PathBuf,
    number: u16,
}

impl Control {
    /// The control number (`tgtd -C`, `tgtadm -C`).
    pub fn number(&self) -> u16 {
        self.number
    }

    /// The Unix socket tgtadm talks to.
    pub fn socket_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/tgtd/socket.{}", self.number))
    }

    /// Runs `tgtadm -C N <args>` (bounded in time) and returns its standard output.
    pub fn run(&self, args: &[&str]) -> Result<String, HarnessError> {
        self.run_within(args, TGTADM_TIMEOUT)
    }

    fn run_within(&self, args: &[&str], timeout: Duration) -> Result<String, HarnessError> {
        let number = self.number.to_string();
        let mut full: Vec<&str> = vec!["-C", &number];
        full.extend_from_slice(args);
        let output = run_bounded(&self.tgtadm, &full, timeout)?;
        output.success_stdout()
    }
}

/// A running tgtd with its targets and LUN files; stopped and cleaned up on drop.
pub struct Tgtd {
    child: Option<Child>,
    pid: u32,
    dir: PathBuf,
    log_path: PathBuf,
    portal: SocketAddr,
    control: Control,
    luns: BTreeMap<(u32, u16), PathBuf>,
}

impl fmt::Debug for Tgtd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tgtd")
            .field("pid", &self.pid)
            .field("portal", &self.portal)
            .field("control", &self.control.number)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Tgtd {
    /// Starts a tgtd on a free loopback port with one target per distinct `tid` in `luns`, each
    /// LUN backed by a new sparse file, every target open to all initiators (`-I ALL`) and
    /// without CHAP (see [`Tgtd::add_chap_account`]).
    pub fn start(luns: &[LunSpec]) -> Result<Tgtd, HarnessError> {
        validate(luns)?;
        let tgtd_program = find_program("tgtd")?;
        let tgtadm = find_program("tgtadm")?;
        if !is_root() {
            return Err(HarnessError::NotRoot);
        }
        let dir = make_temp_dir()?;
        let images = match create_images(&dir, luns) {
            Ok(images) => images,
            Err(error) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(error);
            }
        };
        let log_path = dir.join("tgtd.log");
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match launch(&tgtd_program, &tgtadm, &log_path) {
                Ok((child, portal, control)) => {
                    let tgtd = Tgtd {
                        pid: child.id(),
                        child: Some(child),
                        dir,
                        log_path,
                        portal,
                        control,
                        luns: images,
                    };
                    // On error, dropping `tgtd` stops the daemon and removes the directory.
                    tgtd.configure()?;
                    return Ok(tgtd);
                }
                Err(Launch::Retry(error)) => last_error = Some(error),
                Err(Launch::Fail(error)) => {
                    let _ = fs::remove_dir_all(&dir);
                    return Err(error);
                }
            }
        }
        let _ = fs::remove_dir_all(&dir);
        Err(last_error.unwrap_or(HarnessError::Invalid("no start attempt".into())))
    }

    /// Creates the targets and LUNs and opens them to every initiator.
    fn configure(&self) -> Result<(), HarnessError> {
        for tid in self.tids() {
            let tid_arg = tid.to_string();
            let iqn = self.iqn(tid);
            self.control.run(&[
                "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", &tid_arg, "-T", &iqn,
            ])?;
            for ((_, lun), path) in self.luns.range((tid, 0)..=(tid, u16::MAX)) {
                let path = path.to_str().ok_or_else(|| {
                    HarnessError::Invalid(format!("non-UTF-8 path {}", path.display()))
                })?;
                self.control.run(&[
                    "--lld",
                    "iscsi",
                    "--op",
                    "new",
                    "--mode",
                    "logicalunit",
                    "--tid",
                    &tid_arg,
                    "--lun",
                    &lun.to_string(),
                    "-b",
                    path,
                ])?;
            }
            self.control.run(&[
                "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", &tid_arg, "-I",
                "ALL",
            ])?;
        }
        Ok(())
    }

    /// The portal: 127.0.0.1 and this instance's port.
    pub fn portal(&self) -> SocketAddr {
        self.portal
    }

    /// tgtd's process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The IQN of target `tid`.
    pub fn iqn(&self, tid: u32) -> String {
        format!("{IQN_PREFIX}:disk{tid}")
    }

    /// The target IDs, ascending.
    pub fn tids(&self) -> Vec<u32> {
        let mut tids: Vec<u32> = self.luns.keys().map(|&(tid, _)| tid).collect();
        tids.dedup();
        tids
    }

    /// The backing file of LUN `lun` of target `tid`.
    ///
    /// # Panics
    ///
    /// If the harness was not started with that LUN.
    pub fn lun_path(&self, tid: u32, lun: u16) -> &Path {
        self.luns
            .get(&(tid, lun))
            .unwrap_or_else(|| panic!("no LUN {lun} on target {tid}"))
    }

    /// The libiscsi URL of a LUN, for `iscsi-inq`, `iscsi-readcapacity16`...
    pub fn url(&self, tid: u32, lun: u16) -> String {
        format!("iscsi://{}/{}/{lun}", self.portal, self.iqn(tid))
    }

    /// The temporary directory holding the LUN files and `tgtd.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// tgtadm for this instance, to run any other command.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// What tgtd printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Requires CHAP on target `tid`: adds the incoming account `user`/`password` (the
    /// initiator proves it knows the secret) and binds it to the target. tgt wants CHAP secrets
    /// of 12 to 16 characters for interoperability but accepts others.
    pub fn add_chap_account(
        &self,
        tid: u32,
        user: &str,
        password: &str,
    ) -> Result<(), HarnessError> {
        self.add_account(tid, user, password, false)
    }

    /// Adds an outgoing account (the target proves itself to the initiator: mutual CHAP) and
    /// binds it to target `tid`. tgt allows one outgoing account per target.
    pub fn add_outgoing_chap_account(
        &self,
        tid: u32,
        user: &str,
        password: &str,
    ) -> Result<(), HarnessError> {
        self.add_account(tid, user, password, true)
    }

    /// Creates the account `user`/`password` and binds it to target `tid`, as the target's
    /// outgoing account when `outgoing` is set.
    fn add_account(
        &self,
        tid: u32,
        user: &str,
        password: &str,
        outgoing: bool,
    ) -> Result<(), HarnessError> {
        self.control.run(&[
            "--lld",
            "iscsi",
            "--op",
            "new",
            "--mode",
            "account",
            "--user",
            user,
            "--password",
            password,
        ])?;
        let tid = tid.to_string();
        let mut bind = vec![
            "--lld", "iscsi", "--op", "bind", "--mode", "account", "--tid", &tid, "--user", user,
        ];
        if outgoing {
            bind.push("--outgoing");
        }
        self.control.run(&bind)?;
        Ok(())
    }

    /// The connections logged in to target `tid` (discovery sessions are not listed).
    pub fn connections(&self, tid: u32) -> Result<Vec<Connection>, HarnessError> {
        let output = self.control.run(&[
            "--lld",
            "iscsi",
            "--op",
            "show",
            "--mode",
            "conn",
            "--tid",
            &tid.to_string(),
        ])?;
        parse_connections(&output)
    }

    /// Waits (up to `timeout`) until target `tid` has at least `count` connections, and returns
    /// them.
    pub fn wait_for_connections(
        &self,
        tid: u32,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Connection>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let connections = self.connections(tid)?;
            if connections.len() >= count {
                return Ok(connections);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "{count} connection(s) to target {tid}, have {}",
                        connections.len()
                    ),
                    log: String::new(),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Closes every connection to target `tid` from the target side, as a target failure or
    /// network cut would (the initiator sees its TCP connection close), and waits until tgtadm
    /// lists none. Returns how many were closed. New logins are still accepted; combine with
    /// [`Tgtd::set_target_online`] for an outage.
    pub fn drop_connections(&self, tid: u32) -> Result<usize, HarnessError> {
        let connections = self.connections(tid)?;
        let tid_arg = tid.to_string();
        for connection in &connections {
            self.control.run(&[
                "--lld",
                "iscsi",
                "--op",
                "delete",
                "--mode",
                "conn",
                "--tid",
                &tid_arg,
                "--sid",
                &connection.sid.to_string(),
                "--cid",
                &connection.cid.to_string(),
            ])?;
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let remaining = self.connections(tid)?;
            if remaining.iter().all(|c| !connections.contains(c)) {
                return Ok(connections.len());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("connections {remaining:?} of target {tid} to close"),
                    log: self.log(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets target `tid` ready (`true`) or offline (`false`). An offline tgt target rejects new
    /// logins (status 0x0203 or 0x0300, depending on the stage) but keeps its existing sessions.
    pub fn set_target_online(&self, tid: u32, online: bool) -> Result<(), HarnessError> {
        self.control.run(&[
            "--lld",
            "iscsi",
            "--op",
            "update",
            "--mode",
            "target",
            "--tid",
            &tid.to_string(),
            "--name",
            "state",
            "--value",
            if online { "ready" } else { "offline" },
        ])?;
        Ok(())
    }

    /// Stops tgtd and removes the directory, reporting what went wrong (dropping does the same
    /// and ignores errors).
    pub fn stop(mut self) -> Result<(), HarnessError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // tgtd ignores SIGTERM; this is its documented way down. Errors are collected, not
        // returned early: the process must be gone whatever happened.
        let mut first_error = None;
        let mut note = |result: Result<String, HarnessError>| {
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        };
        if matches!(child.try_wait(), Ok(None)) {
            note(self.control.run_within(
                &[
                    "--op", "update", "--mode", "sys", "--name", "State", "-v", "offline",
                ],
                Duration::from_secs(3),
            ));
            for tid in self.tids() {
                note(self.control.run_within(
                    &[
                        "--lld",
                        "iscsi",
                        "--op",
                        "delete",
                        "--mode",
                        "target",
                        "--tid",
                        &tid.to_string(),
                        "--force",
                    ],
                    Duration::from_secs(3),
                ));
            }
            note(self.control.run_within(
                &["--op", "delete", "--mode", "system"],
                Duration::from_secs(3),
            ));
        }
        if wait_for_exit(&mut child, STOP_TIMEOUT).is_none() {
            // By PID only: Child::kill sends SIGKILL to this child and nothing else.
            let _ = child.kill();
            let _ = child.wait();
            first_error.get_or_insert(HarnessError::Timeout {
                what: format!("tgtd (PID {}) to exit; it was killed", self.pid),
                log: String::new(),
            });
        }
        if thread::panicking() || std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            eprintln!(
                "tgtd (PID {}, portal {}, control {}) files kept in {}; log tail:\n{}",
                self.pid,
                self.portal,
                self.control.number,
                self.dir.display(),
                tail(&self.log(), 40)
            );
        } else if let Err(source) = fs::remove_dir_all(&self.dir) {
            first_error.get_or_insert(HarnessError::Io {
                context: format!("removing {}", self.dir.display()),
                source,
            });
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            eprintln!("stopping tgtd: {error}");
        }
    }
}

/// Why one launch attempt failed: worth another port, or not.
enum Launch {
    Retry(HarnessError),
    Fail(HarnessError),
}

/// Starts tgtd on a fresh port and waits until it serves exactly that portal and its control
/// socket answers.
fn launch(
    tgtd: &Path,
    tgtadm: &Path,
    log_path: &Path,
) -> Result<(Child, SocketAddr, Control), Launch> {
    let port = free_port().map_err(Launch::Fail)?;
    let portal = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let control = Control {
        tgtadm: tgtadm.to_path_buf(),
        number: CONTROL_BASE + port % CONTROL_BASE,
    };
    let log = File::create(log_path)
        .map_err(HarnessError::io(format!("creating {}", log_path.display())))
        .map_err(Launch::Fail)?;
    let log_err = log
        .try_clone()
        .map_err(HarnessError::io("duplicating the log file"))
        .map_err(Launch::Fail)?;
    let mut child = Command::new(tgtd)
        .args(["-f", "--iscsi", &format!("portal={portal}"), "-C"])
        .arg(control.number.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(HarnessError::io(format!("starting {}", tgtd.display())))
        .map_err(Launch::Fail)?;

    let expected_portal = format!("Portal: {portal},1");
    let deadline = Instant::now() + START_TIMEOUT;
    let read_log = || fs::read_to_string(log_path).unwrap_or_default();
    loop {
        match child.try_wait() {
            // Typically "another tgtd is using" the control number: try another.
            Ok(Some(status)) => {
                return Err(Launch::Retry(HarnessError::Exited {
                    status,
                    log: read_log(),
                }))
            }
            Ok(None) => {}
            Err(source) => {
                kill_and_reap(&mut child);
                return Err(Launch::Fail(HarnessError::Io {
                    context: "waiting for tgtd".into(),
                    source,
                }));
            }
        }
        let portals = control.run_within(
            &["--lld", "iscsi", "--op", "show", "--mode", "portal"],
            Duration::from_secs(2),
        );
        if let Ok(portals) = portals {
            // If the port was taken meanwhile, tgtd does not exit: it logs the bind failure and
            // falls back to 0.0.0.0:3260 and [::]:3260. Never keep such an instance.
            if portals.trim() != expected_portal {
                kill_and_reap(&mut child);
                return Err(Launch::Retry(HarnessError::Invalid(format!(
                    "tgtd serves {:?} instead of {portal}; log:\n{}",
                    portals.trim(),
                    read_log()
                ))));
            }
            if TcpStream::connect_timeout(&portal, Duration::from_millis(500)).is_ok() {
                return Ok((child, portal, control));
            }
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            return Err(Launch::Fail(HarnessError::Timeout {
                what: format!("tgtd to serve {portal} with control {}", control.number),
                log: read_log(),
            }));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs `child` (by its PID, through std) and reaps it.
fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `timeout` for `child` to exit and reaps it; `None` if it is still running.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// A loopback port nobody listens on right now. The listener is closed before tgtd binds the
/// port, so another process may take it meanwhile: [`launch`] checks and retries.
fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(HarnessError::io("binding a loopback port"))?;
    let port = listener
        .local_addr()
        .map_err(HarnessError::io("reading the bound port"))?
        .port();
    Ok(port)
}

/// Refuses requests tgt would refuse, with a clearer message.
fn validate(luns: &[LunSpec]) -> Result<(), HarnessError> {
    let mut seen = std::collections::BTreeSet::new();
    for spec in luns {
        if spec.tid == 0 {
            return Err(HarnessError::Invalid("target ID 0 is reserved".into()));
        }
        if spec.lun == 0 {
            return Err(HarnessError::Invalid(
                "LUN 0 is tgt's controller; use LUNs from 1".into(),
            ));
        }
        if spec.size == 0 {
            return Err(HarnessError::Invalid(format!(
                "LUN {} has size 0",
                spec.lun
            )));
        }
        if !seen.insert((spec.tid, spec.lun)) {
            return Err(HarnessError::Invalid(format!(
                "LUN {} of target {} requested twice",
                spec.lun, spec.tid
            )));
        }
    }
    Ok(())
}

/// A new, empty directory under the system temporary directory, unique to this call.
fn make_temp_dir() -> Result<PathBuf, HarnessError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    for _ in 0..100 {
        let dir = std::env::temp_dir().join(format!(
            "hv-tgtd-{}-{}-{nanos:09}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(HarnessError::Io {
                    context: format!("creating {}", dir.display()),
                    source,
                })
            }
        }
    }
    Err(HarnessError::Invalid(
        "no unused temporary directory name".into(),
    ))
}

/// Creates a sparse file per LUN (like `truncate -s`).
fn create_images(
    dir: &Path,
    luns: &[LunSpec],
) -> Result<BTreeMap<(u32, u16), PathBuf>, HarnessError> {
    let mut images = BTreeMap::new();
    for spec in luns {
        let path = dir.join(format!("t{}-lun{}.img", spec.tid, spec.lun));
        let file = File::create(&path)
            .map_err(HarnessError::io(format!("creating {}", path.display())))?;
        file.set_len(spec.size)
            .map_err(HarnessError::io(format!("sizing {}", path.display())))?;
        images.insert((spec.tid, spec.lun), path);
    }
    Ok(images)
}

/// Parses `tgtadm --op show --mode conn`:
///
/// ```text
/// Session: 4
///     Connection: 0
///         Initiator: iqn.2026-01.test.hv:init
///         IP Address: 127.0.0.1
/// ```
pub fn parse_connections(output: &str) -> Result<Vec<Connection>, HarnessError> {
    let bad = |line: &str| HarnessError::Invalid(format!("unexpected tgtadm conn line {line:?}"));
    let mut connections = Vec::new();
    let mut sid = None;
    for line in output.lines() {
        let line = line.trim();
        if let Some(value) = line.strip_prefix("Session:") {
            sid = Some(value.trim().parse::<u64>().map_err(|_| bad(line))?);
        } else if let Some(value) = line.strip_prefix("Connection:") {
            connections.push(Connection {
                sid: sid.ok_or_else(|| bad(line))?,
                cid: value.trim().parse().map_err(|_| bad(line))?,
                initiator: String::new(),
                address: String::new(),
            });
        } else if let Some(value) = line.strip_prefix("Initiator:") {
            let connection = connections.last_mut().ok_or_else(|| bad(line))?;
            connection.initiator = value.trim().to_string();
        } else if let Some(value) = line.strip_prefix("IP Address:") {
            let connection = connections.last_mut().ok_or_else(|| bad(line))?;
            connection.address = value.trim().to_string();
        }
    }
    Ok(connections)
}

/// Whether this process runs with effective UID 0 (from /proc/self/status; if that cannot be
/// read, assume yes and let tgtd say otherwise).
fn is_root() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_none_or(|effective| effective == "0")
}

/// The path of `program`, searched in PATH and the usual sbin directories (tgtd and tgtadm live
/// in /usr/sbin, which is not in every PATH).
pub fn find_program(program: &'static str) -> Result<PathBuf, HarnessError> {
    let path_dirs = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or(HarnessError::NotInstalled { program })
}

/// Runs an installed tool (e.g. `iscsi-ls`) with `args`, bounded by `timeout`, and returns its
/// standard output; a non-zero exit is an error carrying its output.
pub fn run_tool(
    program: &'static str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, HarnessError> {
    let path = find_program(program)?;
    run_bounded(&path, args, timeout)?.success_stdout()
}

/// What a finished command printed.
struct Output {
    command: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn success_stdout(self) -> Result<String, HarnessError> {
        if self.status.success() {
            Ok(self.stdout)
        } else {
            Err(HarnessError::Command {
                command: self.command,
                status: self.status.code(),
                output: format!("{}{}", self.stderr, self.stdout),
            })
        }
    }
}

/// Runs `program args`, killing it (by PID) if it outlives `timeout`.
fn run_bounded(program: &Path, args: &[&str], timeout: Duration) -> Result<Output, HarnessError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(HarnessError::io(format!("starting `{command}`")))?;
    // Drain both pipes on threads so a chatty command cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = wait_for_exit(&mut child, timeout);
    if status.is_none() {
        kill_and_reap(&mut child);
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(HarnessError::Timeout {
            what: format!("`{command}` ({timeout:?})"),
            log: format!("{stderr}{stdout}"),
        });
    };
    Ok(Output {
        command,
        status,
        stdout,
        stderr,
    })
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
