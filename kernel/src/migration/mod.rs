//! Live migration on this node: at most one VM leaving (`migrate <vm> <node>`) and one VM
//! arriving at a time, both advanced by the console loop without ever blocking it.
//!
//! The protocol and every decision live in the `migrate` crate (sans-IO state machines, driven
//! through `migrate::driver` over a non-blocking pipe). This module is the glue: a smoltcp TCP
//! connection on the cluster network as the pipe ([`crate::net::SocketPipe`]), this node's VM table
//! as the guest ([`glue`]), and the actions the machines ask for (throttle, pause, resume,
//! destroy, announce) carried out on the VM table and the NIC.
//!
//! Every node listens on [`PORT`]. One loop pass = one `step` of each machine, the actions it
//! returned, then one `flush`: so a commit acknowledgement leaves only after the VM was resumed.

mod glue;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ::net::addr::Ipv4;
use ::net::announce::{rarp_announce, AnnounceParams, AnnounceSchedule};
use ::net::bench::SocketBuffers;
use ::net::smoltcp::iface::SocketHandle;
use ::net::smoltcp::socket::tcp::State;
use ::net::smoltcp::time::Duration as SmolDuration;
use migrate::destination::{Destination, DestinationAction, DestinationConfig, DestinationState};
use migrate::digest::MemoryDigest;
use migrate::driver::{DestinationDriver, SourceDriver};
use migrate::machine::Timeouts;
use migrate::message::{Capabilities, CpuVendor, Ownership, SharedDisk, VmConfig};
use migrate::owner::{OwnerQueryClient, OwnerResponder, QueryState};
use migrate::policy::PolicyConfig;
use migrate::source::{Source, SourceAction, SourceConfig, SourceState};

use crate::clock;
use crate::net::Net;
use crate::net::SocketPipe;
use crate::storage::attachment::{Procedure, Ticket};
use crate::storage::{After, Storage};
use crate::vm::{DiskSpec, VmState, VmTable};
use ::storage::LunPath;
use glue::{DestinationNode, IncomingVm, SourceVm};

/// The TCP port every node receives migrations on.
pub const PORT: u16 = 7070;
/// The TCP port every node answers owner queries on (see `migrate::owner`).
pub const QUERY_PORT: u16 = 7071;
/// Pause between two owner queries of a migration in doubt.
const QUERY_RETRY_US: u64 = 2_000_000;
/// Pages per batch: 128 KiB of raw pages per frame keeps one loop pass short.
const BATCH_PAGES: usize = 32;
/// A connection with unacknowledged data or unanswered keep-alives for this long is lost.
const TCP_TIMEOUT: SmolDuration = SmolDuration::from_secs(10);
const TCP_KEEP_ALIVE: SmolDuration = SmolDuration::from_secs(2);
/// Summary lines kept for `migrate status`.
const HISTORY: usize = 8;

/// A VM leaving this node.
struct Outgoing {
    vm: String,
    peer: String,
    target: Ipv4,
    driver: SourceDriver,
    socket: SocketHandle,
    was_running: bool,
    started_us: u64,
    /// Set when the source lost track of the commit (see `SourceState::InDoubt`).
    in_doubt: bool,
    /// The digest of the VM's memory at switchover, computed before the copy here is freed.
    digest: Option<u64>,
    /// While in doubt: the owner query under way, and when the next may start.
    query: Option<(OwnerQueryClient, SocketHandle)>,
    next_query_us: u64,
    /// The VM's shared disk, if it has one.
    disk: Option<LunPath>,
    /// The switchover's quiesce of that disk, while the source waits in `Quiescing`.
    quiesce: Quiesce,
    /// Log lines kept until the migration ends (see [`Notes`]).
    notes: Notes,
}

/// Where the source's quiesce of a shared disk is: the paused VM's requests drain, then the
/// target flushes its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiesce {
    Idle,
    Draining,
    Flushing(Ticket),
}

/// A VM arriving on this node.
struct Incoming {
    driver: DestinationDriver,
    socket: SocketHandle,
    copy: IncomingVm,
    started_us: u64,
    /// The takeover of the VM's shared disk, once asked for.
    takeover: Option<Ticket>,
    /// Log lines kept until the migration ends (see [`Notes`]).
    notes: Notes,
}

/// Log lines of a migration's switchover, written once it has ended. The console is a serial
/// port, and a line costs ~100 us per character on these nodes (measured: ~8 ms for one log
/// line): printed while the VM is paused, a line lengthened the pause by that much.
#[derive(Debug, Default)]
struct Notes(Vec<String>);

impl Notes {
    fn add(&mut self, line: String) {
        self.0.push(line);
    }

    fn write(self) {
        for line in self.0 {
            log::info!("{line}");
        }
    }
}

/// The VM's MAC being announced at its new home.
struct Announcement {
    mac: [u8; 6],
    schedule: AnnounceSchedule,
}

/// Failures the end-to-end tests cause on purpose, each for the next incoming migration.
#[derive(Debug, Default)]
pub struct TestHooks {
    /// `migrate debug drop-commit-ack`: commit, but lose the acknowledgement (the source is
    /// then in doubt).
    pub drop_next_commit_ack: bool,
    /// `migrate debug fail-takeover`: take the disk over, then report a failure (the worst
    /// case for the source, which must take it back).
    pub fail_next_takeover: bool,
}

/// This node's migrations.
pub struct Migrations {
    node_name: String,
    listener: Option<SocketHandle>,
    outgoing: Option<Outgoing>,
    incoming: Option<Incoming>,
    announcements: Vec<Announcement>,
    history: Vec<String>,
    owner_listener: Option<SocketHandle>,
    responders: Vec<(OwnerResponder, SocketHandle)>,
    /// Failures the e2e tests cause on purpose (`migrate debug ...`).
    pub hooks: TestHooks,
}

/// Downtime target of a migration unless `migrate ... downtime=<ms>` says otherwise: 10 ms, not
/// QEMU's 300 ms. Since the throttle goes straight to the level the rates call for, a short
/// target costs few rounds: measured under TCG on the test guest rewriting a 12 MiB hot set at
/// 20000 pages/s (QEMU's reference workload), 10 ms gave 5 rounds, 86.7 MB and 17.6 ms of
/// downtime (7.8 ms until the last byte was sent); 50 ms gave 8 rounds, 122.9 MB and 70.5 ms
/// (see the benchmark in tests/tests/migration.rs).
pub const DEFAULT_DOWNTIME_MS: u64 = 10;
/// Rounds in a row the guest must dirty faster than half the link before it is throttled:
/// one, not QEMU's two. The policy throttles to the level the rates call for (see
/// `migrate::policy`), so one round's measurement suffices, and every round waited resends the
/// guest's whole hot set.
const THROTTLE_AFTER_ROUNDS: u32 = 1;
/// Largest downtime target `migrate` accepts.
pub const MAX_DOWNTIME_MS: u64 = 10_000;

/// What `migrate <vm> <node> [downtime=<ms>]` asks for.
pub struct Request<'a> {
    pub vm: &'a str,
    pub target: Ipv4,
    /// The target's name (or address) for messages.
    pub label: &'a str,
    pub downtime_ms: u64,
}

/// Why `migrate` refused to start.
#[derive(Debug)]
pub enum StartError {
    Busy(String),
    UnknownVm(String),
    WrongState(String, String),
    NoNetwork(String),
    Connect(String),
    Setup(String),
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartError::Busy(vm) => write!(
                f,
                "a migration is already running (of {vm}); one at a time ('migrate status')"
            ),
            StartError::UnknownVm(vm) => {
                write!(f, "no VM named '{vm}' on this node (see 'vm list')")
            }
            StartError::WrongState(vm, state) => write!(
                f,
                "VM '{vm}' is {state}: only a running or paused VM can be migrated"
            ),
            StartError::NoNetwork(why) => write!(f, "no cluster network: {why}"),
            StartError::Connect(why) => write!(f, "cannot connect: {why}"),
            StartError::Setup(why) => write!(f, "{why}"),
        }
    }
}

fn now_us() -> u64 {
    clock::uptime_us()
}

/// This node's side of a hello.
fn capabilities() -> Capabilities {
    Capabilities::KNOWN
}

/// Megabytes (10^6) with one decimal.
struct Mb(u64);

impl core::fmt::Display for Mb {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let tenths = self.0 / 100_000;
        write!(f, "{}.{} MB", tenths / 10, tenths % 10)
    }
}

/// Bytes over microseconds as MB/s with one decimal.
struct Rate {
    bytes: u64,
    us: u64,
}

impl core::fmt::Display for Rate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let tenths = self.bytes * 10 / self.us.max(1);
        write!(f, "{}.{} MB/s", tenths / 10, tenths % 10)
    }
}

/// Milliseconds with one decimal from microseconds.
struct Ms(u64);

impl core::fmt::Display for Ms {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{} ms", self.0 / 1000, (self.0 % 1000) / 100)
    }
}

impl Migrations {
    pub fn new(node_name: &str) -> Migrations {
        Migrations {
            node_name: node_name.to_string(),
            listener: None,
            outgoing: None,
            incoming: None,
            announcements: Vec::new(),
            history: Vec::new(),
            owner_listener: None,
            responders: Vec::new(),
            hooks: TestHooks::default(),
        }
    }

    /// The VM being sent or received, if any.
    pub fn busy_with(&self) -> Option<&str> {
        self.outgoing
            .as_ref()
            .map(|o| o.vm.as_str())
            .or_else(|| self.incoming.as_ref().and_then(|i| i.copy.name.as_deref()))
    }

    /// Starts sending `vm` to `target` (`label` names it in messages).
    pub fn start(
        &mut self,
        net: &mut Net,
        vms: &mut VmTable,
        request: &Request<'_>,
        cpu_vendor: CpuVendor,
    ) -> Result<(), StartError> {
        let Request {
            vm,
            target,
            label,
            downtime_ms,
        } = *request;
        if let Some(busy) = self.busy_with() {
            return Err(StartError::Busy(busy.to_string()));
        }
        let v = vms
            .get(vm)
            .map_err(|_| StartError::UnknownVm(vm.to_string()))?;
        let was_running = match v.state {
            VmState::Running => true,
            VmState::Paused => false,
            ref other => return Err(StartError::WrongState(vm.to_string(), other.to_string())),
        };
        if let Some(why) = v.migration_blocker() {
            return Err(StartError::Setup(why));
        }
        let disk = v.disk().and_then(|(spec, device)| match spec {
            DiskSpec::Iscsi(path) => Some((path.clone(), device.config().capacity_sectors)),
            DiskSpec::Ram { .. } => None,
        });
        let config = SourceConfig {
            node_name: self.node_name.clone(),
            capabilities: capabilities(),
            cpu_vendor,
            cpu_features: 0,
            vm: VmConfig {
                name: vm.to_string(),
                mem_bytes: v.ram_bytes(),
                vcpus: 1,
                dirty_rate: v.spec.dirty_pages_per_sec,
                hot_pages: v.spec.hot_pages,
                mac: v.spec.mac,
                disk: disk.as_ref().map(|(path, sectors)| SharedDisk {
                    id: path.to_string(),
                    sectors: *sectors,
                }),
            },
            policy: PolicyConfig {
                downtime_target_us: downtime_ms.saturating_mul(1000),
                throttle_after_rounds: THROTTLE_AFTER_ROUNDS,
                ..PolicyConfig::default()
            },
            timeouts: Timeouts::default(),
            batch_pages: BATCH_PAGES,
        };
        let source = Source::new(config).map_err(|e| StartError::Setup(format!("{e}")))?;
        let Some(stack) = net.cluster_stack() else {
            return Err(StartError::NoNetwork(net.missing_reason().to_string()));
        };
        let socket = stack
            .tcp_connect_with(target, PORT, SocketBuffers::BULK_SEND)
            .map_err(|e| StartError::Connect(format!("{e}")))?;
        tune(stack.tcp_socket(socket));
        let now = now_us();
        let mut driver = SourceDriver::new(source);
        driver.start(now);
        if let Ok(v) = vms.get_mut(vm) {
            v.migrating = true;
        }
        let heap = crate::mem::heap_stats();
        log::info!(
            "migration of {vm} to {label} ({target}) started (heap {} of {} KiB used)",
            heap.used / 1024,
            heap.size / 1024
        );
        self.outgoing = Some(Outgoing {
            vm: vm.to_string(),
            peer: label.to_string(),
            target,
            driver,
            socket,
            was_running,
            started_us: now,
            in_doubt: false,
            digest: None,
            query: None,
            next_query_us: 0,
            disk: disk.map(|(path, _)| path),
            quiesce: Quiesce::Idle,
            notes: Notes::default(),
        });
        Ok(())
    }

    /// `migrate cancel <vm>`: aborts the outgoing migration of `vm` (before its commit).
    pub fn cancel(
        &mut self,
        vms: &mut VmTable,
        storage: &mut Storage,
        vm: &str,
    ) -> Result<(), String> {
        let Some(out) = self.outgoing.as_mut().filter(|o| o.vm == vm) else {
            return Err(format!("no migration of '{vm}' is running on this node"));
        };
        if out.driver.source().state() == SourceState::AwaitCommitAck {
            return Err(format!(
                "the migration of '{vm}' is committing: too late to cancel"
            ));
        }
        let actions = out.driver.cancel(now_us());
        let mut lines = Vec::new();
        source_actions(out, vms, storage, actions, &mut lines);
        Ok(())
    }

    /// `migrate resolve <vm> here|there`: the operator's answer for a migration in doubt.
    pub fn resolve(
        &mut self,
        vms: &mut VmTable,
        storage: &mut Storage,
        vm: &str,
        there: bool,
    ) -> Result<(), String> {
        let Some(out) = self.outgoing.as_mut().filter(|o| o.vm == vm && o.in_doubt) else {
            return Err(format!("no migration of '{vm}' is in doubt on this node"));
        };
        let actions = out.driver.resolve_in_doubt(now_us(), there);
        let mut lines = Vec::new();
        source_actions(out, vms, storage, actions, &mut lines);
        Ok(())
    }

    /// One pass of migration work; returns lines for the console and whether there is more
    /// to do right away (the loop should not halt).
    pub fn poll(
        &mut self,
        net: &mut Net,
        vms: &mut VmTable,
        storage: &mut Storage,
    ) -> (Vec<String>, bool) {
        let mut lines = Vec::new();
        let mut busy = false;
        self.ensure_listener(net);
        self.accept(net, vms);
        self.serve_owner_queries(net, vms);
        if let Some(out) = self.outgoing.as_mut() {
            let progress = poll_outgoing(out, net, vms, storage, &mut lines);
            if progress {
                // Onto the wire now, before this pass prints anything (see `Notes`).
                net.poll();
            }
            busy |= progress;
            if out.driver.finished() && !out.in_doubt {
                let out = self.outgoing.take().expect("checked above");
                self.finish_outgoing(out, net, vms, &mut lines);
            }
        }
        if let Some(inc) = self.incoming.as_mut() {
            let mut announce = None;
            let progress = poll_incoming(
                inc,
                net,
                vms,
                storage,
                &mut lines,
                &mut announce,
                &mut self.hooks,
            );
            if progress {
                // The commit acknowledgement, first of all, before any console line.
                net.poll();
            }
            busy |= progress;
            if let Some(mac) = announce {
                self.announcements.push(Announcement {
                    mac,
                    schedule: AnnounceSchedule::new(
                        AnnounceParams::QEMU_DEFAULT,
                        clock::uptime_ms(),
                    ),
                });
            }
            if inc.driver.finished() {
                let inc = self.incoming.take().expect("checked above");
                self.finish_incoming(inc, net, vms, &mut lines);
            }
        }
        self.announce(net);
        for line in &lines {
            if line.starts_with("migration") {
                self.history.push(line.clone());
            }
        }
        let excess = self.history.len().saturating_sub(HISTORY);
        self.history.drain(..excess);
        (lines, busy)
    }

    /// Answers owner queries: whether a VM runs here, is still arriving, or is not here.
    fn serve_owner_queries(&mut self, net: &mut Net, vms: &VmTable) {
        let Some(stack) = net.cluster_stack() else {
            return;
        };
        match self.owner_listener {
            None => match stack.tcp_listen_with(QUERY_PORT, SocketBuffers::SMALL) {
                Ok(handle) => self.owner_listener = Some(handle),
                Err(e) => log::error!("owner query listener: {e}"),
            },
            Some(handle) => {
                let state = stack.tcp_socket(handle).state();
                if !matches!(state, State::Listen | State::SynReceived) {
                    self.owner_listener = None;
                    self.responders
                        .push((OwnerResponder::new(now_us()), handle));
                }
            }
        }
        let incoming = self.incoming.as_ref().and_then(|inc| {
            let receiving = !matches!(
                inc.driver.destination().state(),
                DestinationState::Done | DestinationState::Failed
            );
            inc.copy.name.clone().filter(|_| receiving)
        });
        let now = now_us();
        self.responders.retain_mut(|(responder, handle)| {
            let mut pipe = SocketPipe(stack.tcp_socket(*handle));
            let done = responder.step(now, &mut pipe, |vm| {
                let ownership = if incoming.as_deref() == Some(vm) {
                    Ownership::Receiving
                } else if vms.get(vm).is_ok_and(|v| v.state != VmState::Incoming) {
                    Ownership::Runs
                } else {
                    Ownership::Absent
                };
                log::info!("owner query for {vm}: {ownership:?}");
                ownership
            });
            if done {
                stack.tcp_release(*handle);
            }
            !done
        });
    }

    fn ensure_listener(&mut self, net: &mut Net) {
        if self.listener.is_some() || self.incoming.is_some() {
            return;
        }
        let Some(stack) = net.cluster_stack() else {
            return;
        };
        match stack.tcp_listen_with(PORT, SocketBuffers::BULK_RECEIVE) {
            Ok(handle) => {
                tune(stack.tcp_socket(handle));
                self.listener = Some(handle);
            }
            Err(e) => log::error!("migration listener: {e}"),
        }
    }

    /// Turns a connected listener into the incoming migration (the next listener opens once
    /// it ends: one incoming migration at a time, later connections are refused).
    fn accept(&mut self, net: &mut Net, vms: &VmTable) {
        let Some(handle) = self.listener else { return };
        let Some(stack) = net.cluster_stack() else {
            return;
        };
        let state = stack.tcp_socket(handle).state();
        if matches!(state, State::Listen | State::SynReceived) {
            return;
        }
        self.listener = None;
        // A node without virtualization still answers, and refuses every VM in admission.
        let vendor = vms.vendor().unwrap_or(CpuVendor::Amd);
        let config = DestinationConfig {
            node_name: self.node_name.clone(),
            capabilities: capabilities(),
            cpu_vendor: vendor,
            cpu_features: 0,
            timeouts: Timeouts::default(),
        };
        let now = now_us();
        match Destination::new(config, now) {
            Ok(dest) => {
                let peer = stack
                    .tcp_socket(handle)
                    .remote_endpoint()
                    .map(|e| format!("{}", e.addr))
                    .unwrap_or_default();
                log::info!("migration: incoming connection from {peer}");
                self.incoming = Some(Incoming {
                    driver: DestinationDriver::new(dest),
                    socket: handle,
                    copy: IncomingVm::new(),
                    started_us: now,
                    takeover: None,
                    notes: Notes::default(),
                });
            }
            Err(e) => {
                log::error!("migration: cannot receive: {e:?}");
                stack.tcp_release(handle);
            }
        }
    }

    fn finish_outgoing(
        &mut self,
        mut out: Outgoing,
        net: &mut Net,
        vms: &mut VmTable,
        lines: &mut Vec<String>,
    ) {
        core::mem::take(&mut out.notes).write();
        if let Some(stack) = net.cluster_stack() {
            stack.tcp_release(out.socket);
        }
        if let Ok(vm) = vms.get_mut(&out.vm) {
            vm.migrating = false;
            vm.set_throttle(0);
        }
        let heap = crate::mem::heap_stats();
        log::info!(
            "migration of {} ended (heap {} of {} KiB used)",
            out.vm,
            heap.used / 1024,
            heap.size / 1024
        );
        let source = out.driver.source();
        let s = source.summary();
        let total = s
            .finished_us
            .unwrap_or_else(now_us)
            .saturating_sub(s.started_us);
        match source.state() {
            SourceState::Done => {
                lines.push(format!(
                    "migration of {} to {} completed: total {}, downtime {} ({} until the last byte was sent), {} on the wire ({} while copying), {} rounds, throttle {}%, pages raw {} zero {} compressed {}",
                    out.vm,
                    out.peer,
                    Ms(total),
                    Ms(s.downtime_us().unwrap_or(0)),
                    Ms(s.send_downtime_us().unwrap_or(0)),
                    Mb(s.bytes_sent),
                    Rate {
                        bytes: s.stream_bytes_per_sec().unwrap_or(0),
                        us: 1_000_000
                    },
                    s.rounds,
                    source.policy().throttle(),
                    s.pages_raw,
                    s.pages_zero,
                    s.pages_compressed
                ));
                if let Some(digest) = out.digest {
                    lines.push(format!(
                        "vm {} now runs on {}; memory digest at switchover {digest:#018x}",
                        out.vm, out.peer
                    ));
                }
            }
            _ => {
                let why = source
                    .failure()
                    .map_or_else(|| String::from("unknown reason"), |f| format!("{f}"));
                lines.push(format!(
                    "migration of {} to {} failed after {}: {why}; {} stays on {} ({})",
                    out.vm,
                    out.peer,
                    Ms(total),
                    out.vm,
                    self.node_name,
                    vms.get(&out.vm)
                        .map_or_else(|_| String::from("gone"), |v| v.state.to_string())
                ));
            }
        }
    }

    fn finish_incoming(
        &mut self,
        mut inc: Incoming,
        net: &mut Net,
        vms: &mut VmTable,
        lines: &mut Vec<String>,
    ) {
        core::mem::take(&mut inc.notes).write();
        if let Some(stack) = net.cluster_stack() {
            stack.tcp_release(inc.socket);
        }
        let dest = inc.driver.destination();
        let elapsed = now_us().saturating_sub(inc.started_us);
        let name = inc
            .copy
            .name
            .clone()
            .unwrap_or_else(|| String::from("(none)"));
        match dest.state() {
            DestinationState::Done => lines.push(format!(
                "incoming vm {name} arrived in {}: {} on {} ({} pages received, memory digest {:#018x})",
                Ms(elapsed),
                vms.get(&name).map_or_else(|_| String::from("gone"), |v| v.state.to_string()),
                self.node_name,
                dest.pages_received(),
                inc.copy.digest.value()
            )),
            _ => {
                let why = dest
                    .failure()
                    .map_or_else(|| String::from("connection ended"), |f| format!("{f}"));
                lines.push(format!(
                    "incoming migration of {name} failed: {why}; the copy was discarded"
                ));
            }
        }
    }

    /// Sends the due announcement rounds of migrated VMs.
    fn announce(&mut self, net: &mut Net) {
        let now = clock::uptime_ms();
        self.announcements.retain_mut(|a| {
            if a.schedule.poll(now) && !net.send_cluster_frame(&rarp_announce(a.mac)) {
                log::warn!("announce: transmit ring full, round lost");
            }
            !a.schedule.is_done()
        });
    }

    /// `migrate status`.
    pub fn status(&self, vms: &VmTable, out: &mut dyn core::fmt::Write) -> core::fmt::Result {
        match &self.outgoing {
            Some(o) => status_line(o, vms, out)?,
            None => writeln!(out, "no outgoing migration")?,
        }
        match &self.incoming {
            Some(i) => writeln!(
                out,
                "incoming: {} ({:?}), {} pages received",
                i.copy.name.as_deref().unwrap_or("(handshake)"),
                i.driver.destination().state(),
                i.driver.destination().pages_received()
            )?,
            None => writeln!(out, "no incoming migration")?,
        }
        for line in &self.history {
            writeln!(out, "  {line}")?;
        }
        Ok(())
    }
}

/// Socket settings of migration connections: a lost peer is noticed within [`TCP_TIMEOUT`].
///
/// Nagle and delayed ACKs off: the switchover is a few small frames each way (final pages,
/// state, commit, acknowledgement), and Nagle waiting on a delayed ACK would add smoltcp's
/// 10 ms ACK delay to the guest's downtime at each exchange.
fn tune(socket: &mut ::net::smoltcp::socket::tcp::Socket<'static>) {
    socket.set_timeout(Some(TCP_TIMEOUT));
    socket.set_keep_alive(Some(TCP_KEEP_ALIVE));
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
}

fn status_line(o: &Outgoing, vms: &VmTable, out: &mut dyn core::fmt::Write) -> core::fmt::Result {
    let source = o.driver.source();
    let s = source.summary();
    let elapsed = now_us().saturating_sub(o.started_us);
    let (done, total) = source.round_progress();
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    let bar: String = (0..20)
        .map(|i| if i * 5 < percent { '#' } else { '.' })
        .collect();
    let policy = source.policy();
    write!(
        out,
        "{} -> {}: {:?}, round {} [{bar}] {percent}% of {} pages, {} sent, {}",
        o.vm,
        o.peer,
        source.state(),
        source.round(),
        total,
        Mb(s.bytes_sent),
        Rate {
            bytes: s.bytes_sent,
            us: elapsed
        }
    )?;
    if let Some(rate) = source.dirty_rate() {
        write!(out, ", dirty {rate} pages/s")?;
    }
    if let Some(us) = policy.expected_downtime_us(source.dirty_pending()) {
        write!(out, ", expected downtime {}", Ms(us))?;
    }
    let throttle = vms.get(&o.vm).map_or(0, |v| v.throttle_percent());
    writeln!(out, ", throttle {throttle}%")?;
    if o.in_doubt {
        writeln!(
            out,
            "  IN DOUBT: the commit was sent but not acknowledged; {} stays paused here. \
             Check {} and run 'migrate resolve {} here' (it does not run there) or \
             'migrate resolve {} there' (it runs there).",
            o.vm, o.peer, o.vm, o.vm
        )?;
    }
    Ok(())
}

/// One pass of the outgoing migration. True if it has more to do right away.
fn poll_outgoing(
    out: &mut Outgoing,
    net: &mut Net,
    vms: &mut VmTable,
    storage: &mut Storage,
    lines: &mut Vec<String>,
) -> bool {
    let interrupts = net.cluster_interrupts();
    let Some(stack) = net.cluster_stack() else {
        let actions = out.driver.cancel(now_us());
        source_actions(out, vms, storage, actions, lines);
        return false;
    };
    let now = now_us();
    if out.in_doubt {
        settle_in_doubt(out, stack, vms, storage, lines, now);
        return false;
    }
    quiesce_step(out, vms, storage, lines);
    let mut pipe = SocketPipe(stack.tcp_socket(out.socket));
    let before = progress(out.driver.link(), out.driver.source().state());
    let actions = {
        let mut guest = SourceVm {
            vms,
            name: &out.vm,
            was_running: out.was_running,
        };
        out.driver.step(now, &mut pipe, &mut guest)
    };
    source_actions(out, vms, storage, actions, lines);
    let actions = out.driver.flush(now_us(), &mut pipe);
    source_actions(out, vms, storage, actions, lines);
    // A pass that moved bytes or changed state may have more to do at once. Otherwise the
    // source waits for the network (the socket's buffer is full, or an answer is due), and the
    // node may sleep if a NIC interrupt wakes it when a frame arrives: spinning took the
    // emulator's CPU from the destination on a 2-core host. With a polled NIC a frame waits for
    // the next tick (up to 1 ms), so the copy and every state of the pause spin.
    let waiting_on_wire = !interrupts
        && matches!(
            out.driver.source().state(),
            SourceState::PreCopy
                | SourceState::Pausing
                | SourceState::Quiescing
                | SourceState::FinalCopy
                | SourceState::AwaitCommitAck
        );
    waiting_on_wire || progress(out.driver.link(), out.driver.source().state()) != before
}

/// What a pass of a migration is judged by: bytes moved either way, and the machine's state.
fn progress<S: PartialEq>(link: &migrate::link::FrameLink, state: S) -> (u64, u64, S) {
    (link.bytes_sent(), link.bytes_received(), state)
}

/// The quiesce of a paused VM's shared disk: once its requests have drained, the flush; once
/// that answered, the source goes on (or aborts, if the flush failed).
fn quiesce_step(
    out: &mut Outgoing,
    vms: &mut VmTable,
    storage: &mut Storage,
    lines: &mut Vec<String>,
) {
    let result = match (out.quiesce, out.disk.clone()) {
        (Quiesce::Idle, _) => return,
        (_, None) => Some(Err(String::from("the VM has no shared disk"))),
        (Quiesce::Draining, Some(path)) => {
            if vms.get(&out.vm).is_ok_and(|vm| vm.disk_in_flight() > 0) {
                return;
            }
            match storage.start(&path, Procedure::Flush) {
                Ok(ticket) => {
                    out.quiesce = Quiesce::Flushing(ticket);
                    None
                }
                Err(e) => Some(Err(format!("{e}"))),
            }
        }
        (Quiesce::Flushing(ticket), Some(path)) => storage
            .result(&path, ticket)
            .map(|result| result.map(|_| ()).map_err(|e| storage.describe(&e))),
    };
    let Some(result) = result else {
        return;
    };
    out.quiesce = Quiesce::Idle;
    let actions = {
        let mut guest = SourceVm {
            vms,
            name: &out.vm,
            was_running: out.was_running,
        };
        out.driver.on_disk_quiesced(now_us(), &mut guest, result)
    };
    source_actions(out, vms, storage, actions, lines);
}

/// Asks the destination, again and again, whether it runs the VM, until it answers for sure.
fn settle_in_doubt(
    out: &mut Outgoing,
    stack: &mut ::net::stack::Stack<crate::net::Nic>,
    vms: &mut VmTable,
    storage: &mut Storage,
    lines: &mut Vec<String>,
    now: u64,
) {
    if out.query.is_none() {
        if now < out.next_query_us {
            return;
        }
        out.next_query_us = now.saturating_add(QUERY_RETRY_US);
        match stack.tcp_connect_with(out.target, QUERY_PORT, SocketBuffers::SMALL) {
            Ok(handle) => out.query = Some((OwnerQueryClient::new(&out.vm, now), handle)),
            Err(e) => {
                log::warn!("migration of {}: owner query: {e}", out.vm);
                return;
            }
        }
    }
    let Some((client, handle)) = out.query.as_mut() else {
        return;
    };
    let state = client
        .step(now, &mut SocketPipe(stack.tcp_socket(*handle)))
        .clone();
    let committed = match state {
        QueryState::Waiting => return,
        QueryState::Answered(Ownership::Runs) => Some(true),
        QueryState::Answered(Ownership::Absent) => Some(false),
        QueryState::Answered(Ownership::Receiving) => None,
        QueryState::Failed(why) => {
            log::info!("migration of {}: owner query: {why}; asking again", out.vm);
            None
        }
    };
    stack.tcp_release(*handle);
    out.query = None;
    if let Some(committed) = committed {
        lines.push(format!(
            "migration of {} no longer in doubt: {} {} it",
            out.vm,
            out.peer,
            if committed { "runs" } else { "does not run" }
        ));
        let actions = out.driver.resolve_in_doubt(now, committed);
        source_actions(out, vms, storage, actions, lines);
    }
}

/// Carries out what the source asked for.
fn source_actions(
    out: &mut Outgoing,
    vms: &mut VmTable,
    storage: &mut Storage,
    actions: Vec<SourceAction>,
    lines: &mut Vec<String>,
) {
    let mut queue = actions;
    while !queue.is_empty() {
        let mut next = Vec::new();
        for action in queue {
            match action {
                SourceAction::SetThrottle(percent) => {
                    if let Ok(vm) = vms.get_mut(&out.vm) {
                        vm.set_throttle(percent);
                    }
                    log::info!("migration of {}: throttle {percent}%", out.vm);
                }
                SourceAction::PauseVm => {
                    if out.was_running {
                        if let Err(e) = vms.pause(&out.vm) {
                            log::error!("migration of {}: pause: {e}", out.vm);
                        }
                    }
                    out.notes.add(format!(
                        "migration of {}: paused for the switchover after round {} ({} dirty pages left)",
                        out.vm,
                        out.driver.source().round(),
                        out.driver.source().dirty_pending()
                    ));
                    let mut guest = SourceVm {
                        vms,
                        name: &out.vm,
                        was_running: out.was_running,
                    };
                    next.extend(out.driver.on_paused(now_us(), &mut guest));
                }
                SourceAction::ResumeVm => {
                    if out.was_running {
                        if let Err(e) = vms.resume(&out.vm) {
                            log::error!("migration of {}: resume: {e}", out.vm);
                        }
                    }
                    if let Ok(vm) = vms.get_mut(&out.vm) {
                        vm.migrating = false;
                    }
                    out.in_doubt = false;
                }
                SourceAction::DestroyVm => {
                    // The copy here is frozen at the pause: its digest is what the destination
                    // must hold.
                    out.digest = vms.get(&out.vm).ok().map(digest_of);
                    if let Err(e) = vms.destroy(&out.vm) {
                        log::error!("migration of {}: destroy: {e}", out.vm);
                    }
                    out.in_doubt = false;
                    if let Some(path) = out.disk.as_ref() {
                        // The destination preempted this node: show that the target now
                        // refuses its writes, then let the session go.
                        let after = After::FenceCheck {
                            vm: out.vm.clone(),
                            new_owner: out.peer.clone(),
                        };
                        if storage
                            .start_background(path, Procedure::Probe, after)
                            .is_err()
                        {
                            storage.detach(path);
                        }
                    }
                }
                SourceAction::QuiesceDisk => out.quiesce = Quiesce::Draining,
                SourceAction::ReclaimDisk => {
                    if let Some(path) = out.disk.clone() {
                        // The VM's I/O waits until this node holds the disk again.
                        storage.hold(&path, true);
                        let after = After::Reclaimed { vm: out.vm.clone() };
                        if let Err(e) = storage.start_background(
                            &path,
                            Procedure::Claim { takeover: true },
                            after,
                        ) {
                            storage.hold(&path, false);
                            lines.push(format!(
                                "migration of {}: taking disk {path} back: {e}",
                                out.vm
                            ));
                        }
                    }
                }
                SourceAction::ResolveInDoubt => {
                    out.in_doubt = true;
                    lines.push(format!(
                        "migration of {} to {} is IN DOUBT: the commit was sent, no acknowledgement came; {} stays paused here (see 'migrate status')",
                        out.vm, out.peer, out.vm
                    ));
                }
            }
        }
        queue = next;
    }
}

/// The digest of all of a VM's memory (see `migrate::digest`).
fn digest_of(vm: &crate::vm::Vm) -> u64 {
    let mut digest = MemoryDigest::zeroed(0);
    for index in 0..vm.page_count() {
        if let Some(page) = vm.page(index) {
            digest.add(index, page);
        }
    }
    digest.value()
}

/// One pass of the incoming migration. True if it has more to do right away.
fn poll_incoming(
    inc: &mut Incoming,
    net: &mut Net,
    vms: &mut VmTable,
    storage: &mut Storage,
    lines: &mut Vec<String>,
    announce: &mut Option<[u8; 6]>,
    hooks: &mut TestHooks,
) -> bool {
    let interrupts = net.cluster_interrupts();
    let Some(stack) = net.cluster_stack() else {
        return false;
    };
    let now = now_us();
    let mut pipe = SocketPipe(stack.tcp_socket(inc.socket));
    let before = progress(inc.driver.link(), inc.driver.destination().state());
    if let (Some(ticket), Some(path)) = (inc.takeover, inc.copy.disk.clone()) {
        if let Some(result) = storage.result(&path, ticket) {
            inc.takeover = None;
            let mut result = result.map(|_| ()).map_err(|e| storage.describe(&e));
            if result.is_ok() && core::mem::take(&mut hooks.fail_next_takeover) {
                log::warn!("debug: failing the disk takeover after it succeeded");
                result = Err(String::from(
                    "failed on purpose (migrate debug fail-takeover)",
                ));
            }
            match &result {
                Ok(()) => inc.notes.add(format!("migration: disk {path} taken over")),
                Err(e) => log::warn!("migration: disk {path}: takeover failed: {e}"),
            }
            let actions = inc.driver.on_disk_taken(result);
            destination_actions(inc, vms, storage, actions, lines, announce);
        }
    }
    let actions = {
        let mut host = DestinationNode {
            vms,
            storage,
            copy: &mut inc.copy,
        };
        inc.driver.step(now, &mut pipe, &mut host)
    };
    if hooks.drop_next_commit_ack && actions.contains(&DestinationAction::ResumeVm) {
        // The test hook: commit, but reset the connection before the acknowledgement leaves.
        hooks.drop_next_commit_ack = false;
        log::warn!("debug: dropping the commit acknowledgement");
        pipe.0.abort();
    }
    destination_actions(inc, vms, storage, actions, lines, announce);
    let actions = inc.driver.flush(now_us(), &mut pipe);
    destination_actions(inc, vms, storage, actions, lines, announce);
    // As for the source: a pass without progress waits for the network (a NIC interrupt wakes
    // the node, or it spins through the pause with a polled NIC) or for the disk takeover (the
    // storage service says when it is busy).
    let waiting_on_wire = !interrupts
        && matches!(
            inc.driver.destination().state(),
            DestinationState::Final | DestinationState::TakingDisk
        );
    waiting_on_wire || progress(inc.driver.link(), inc.driver.destination().state()) != before
}

/// Carries out what the destination asked for.
fn destination_actions(
    inc: &mut Incoming,
    vms: &mut VmTable,
    storage: &mut Storage,
    actions: Vec<DestinationAction>,
    lines: &mut Vec<String>,
    announce: &mut Option<[u8; 6]>,
) {
    for action in actions {
        match action {
            DestinationAction::ResumeVm => {
                let Some(name) = inc.copy.name.clone() else {
                    continue;
                };
                inc.notes
                    .add(format!("migration of {name}: committed, resuming it here"));
                let clock = inc.copy.clock.unwrap_or_else(|| {
                    log::warn!("migration of {name}: no clock state came; guest time restarts");
                    crate::vm::ClockState {
                        guest_tsc: 0,
                        tsc_hz: clock::tsc_hz(),
                        running: true,
                    }
                });
                if let Ok(vm) = vms.get_mut(&name) {
                    vm.finish_incoming(clock);
                }
            }
            DestinationAction::DiscardCopy => {
                if let Some(name) = inc.copy.name.as_deref() {
                    if let Err(e) = vms.destroy(name) {
                        log::error!("migration: discarding {name}: {e}");
                    }
                    lines.push(format!("incoming copy of {name} discarded"));
                }
                if let Some(path) = inc.copy.disk.as_ref() {
                    // A takeover may have gone through before the failure: give the disk up
                    // (the source takes it back in any case).
                    storage.release_and_detach(path);
                }
            }
            DestinationAction::AnnounceMac(mac) => *announce = Some(mac),
            DestinationAction::TakeDisk => {
                let started = match inc.copy.disk.as_ref() {
                    Some(path) => storage
                        .start(path, Procedure::Claim { takeover: true })
                        .map_err(|e| format!("{e}")),
                    None => Err(String::from("the VM has no shared disk here")),
                };
                match started {
                    Ok(ticket) => inc.takeover = Some(ticket),
                    Err(e) => {
                        let more = inc.driver.on_disk_taken(Err(e));
                        destination_actions(inc, vms, storage, more, lines, announce);
                    }
                }
            }
        }
    }
}
