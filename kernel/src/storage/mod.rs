//! The node's shared storage: iSCSI on the storage network, the LUNs VMs use as disks, and the
//! SCSI-3 persistent reservations that decide which node may write each one.
//!
//! - A VM's LUN is an [`attachment::Attachment`]: its own iSCSI session (the `storage` crate's
//!   sans-IO initiator) over a smoltcp TCP socket on the storage interface, reconnected by the
//!   session when lost, polled from the main loop ([`Storage::poll`]); the VM's virtio-blk
//!   device reaches it through a [`backend::Channel`], so a slow target never stalls the loop.
//! - Reservations follow fence_scsi: every node registers one key ([`ReservationKey::for_node`]),
//!   type Write Exclusive - Registrants Only; a new VM claims a free LUN (or refuses one another
//!   node holds), a migration's destination preempts the source before it resumes the VM, and
//!   a source whose migration failed takes the LUN back before its VM writes again.
//! - The console's `iscsi discover` and `disk list` use short-lived sessions of their own
//!   ([`survey`]).

pub mod attachment;
pub mod backend;
pub mod survey;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;

use ::net::addr::Endpoint;
use ::net::smoltcp::iface::SocketHandle;
use ::net::stack::{ConnectError, Stack};
use spin::Mutex;
use storage::iscsi::{Disk, DiskEvent, Isid, Session, SessionConfig, SessionEvent, SessionState};
use storage::scsi::ReservationKey;
use storage::LunPath;

use crate::net::{Net, Nic, SocketPipe};
use crate::vm::BlockBackend;
use attachment::{Attachment, Outcome, Procedure, Ticket};
use backend::{Channel, IscsiBackend};
use storage::ownership;
use transport::ClosedPipe;

/// The iSCSI name of a node: one initiator name per node, so the target's ACLs and logs name it.
pub fn initiator_name(node: &str) -> String {
    format!("iqn.2026-11.hv.node:{}", node.to_ascii_lowercase())
}

/// Why a storage request cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// No `iscsi_portal` in the node configuration.
    NoPortal,
    /// The LUN is already attached to a VM of this node.
    InUse { path: String, user: String },
    /// No attachment for that LUN.
    NotAttached(String),
}

impl core::fmt::Display for StorageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StorageError::NoPortal => write!(
                f,
                "this node has no shared storage: set iscsi_portal in its configuration \
                 (config set iscsi_portal <address>[:port])"
            ),
            StorageError::InUse { path, user } => {
                write!(f, "disk {path} is already used by VM '{user}' on this node")
            }
            StorageError::NotAttached(path) => write!(f, "disk {path} is not attached here"),
        }
    }
}

/// Why a procedure gave no outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcedureError {
    /// The storage crate's reason: another node holds the disk, a command failed, the session
    /// ended.
    Procedure(ownership::ProcedureError),
    /// The LUN is no longer attached here.
    Detached(LunPath),
    /// No procedure of that ticket is queued, running or finished (a caller's bug).
    UnknownTicket,
}

/// What the service does by itself once a background procedure ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// The node took its disk back (a failed migration): let the VM's held I/O go.
    Reclaimed { vm: String },
    /// The destination took the disk over: the probe shows whether this node is fenced; then
    /// the attachment goes.
    FenceCheck { vm: String, new_owner: String },
    /// The disk was given up: log out.
    Detach,
}

/// This node's iSCSI initiator.
pub struct Storage {
    node: String,
    initiator: String,
    key: ReservationKey,
    portal: Option<Endpoint>,
    attachments: Vec<Attachment>,
    background: Vec<(LunPath, Ticket, After)>,
    /// The other nodes' names, to name reservation holders.
    peers: Vec<String>,
    next_ticket: u64,
    /// Sessions opened so far: each gets its own ISID (the same initiator name and ISID would
    /// make the target replace one session by the other).
    sessions: u32,
}

impl Storage {
    pub fn new(node: &str, portal: Option<Endpoint>) -> Storage {
        Storage {
            node: node.to_string(),
            initiator: initiator_name(node),
            key: ReservationKey::for_node(node),
            portal,
            attachments: Vec::new(),
            background: Vec::new(),
            peers: Vec::new(),
            next_ticket: 1,
            sessions: 0,
        }
    }

    pub fn portal(&self) -> Option<Endpoint> {
        self.portal
    }

    pub fn set_portal(&mut self, portal: Option<Endpoint>) {
        self.portal = portal;
    }

    pub fn initiator(&self) -> &str {
        &self.initiator
    }

    /// This node's reservation key.
    pub fn key(&self) -> ReservationKey {
        self.key
    }

    /// A fresh session configuration to `target` (or a discovery session with `None`).
    pub fn session_config(&mut self, target: Option<&str>) -> SessionConfig {
        self.sessions = self.sessions.wrapping_add(1);
        let isid = Isid::for_name(&format!("{}#{}", self.node, self.sessions));
        let mut config = match target {
            Some(target) => SessionConfig::normal(&self.initiator, target, isid),
            None => SessionConfig::discovery(&self.initiator, isid),
        };
        config.entropy = crate::clock::rdtsc();
        config
    }

    /// The attachments, for `disk list` and `vm show`.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    fn find(&self, path: &LunPath) -> Option<usize> {
        self.attachments.iter().position(|a| a.path == *path)
    }

    /// Opens a session to `path` for VM `user` and reads the LUN's size ([`Procedure::Open`]).
    pub fn attach(&mut self, path: &LunPath, user: &str) -> Result<Ticket, StorageError> {
        let portal = self.portal.ok_or(StorageError::NoPortal)?;
        if let Some(i) = self.find(path) {
            let a = &self.attachments[i];
            if !a.closing {
                return Err(StorageError::InUse {
                    path: path.to_string(),
                    user: a.user.clone(),
                });
            }
            // A closing one (its VM went away): drop it, this one replaces it.
            let old = self.attachments.remove(i);
            drop(old);
        }
        let mut config = self.session_config(Some(&path.target));
        // A VM's disk notices a dead path within seconds (open-iscsi pings every 5 s and waits
        // 5 s): idle sessions ping every 2 s and give up after 3 s without an answer.
        config.timeouts.nop_interval_ms = 2_000;
        config.timeouts.nop_timeout_ms = 3_000;
        let disk = Disk::new(Session::new(config), path.lun)
            .map_err(|_| StorageError::NotAttached(path.to_string()))?;
        let channel = Arc::new(Mutex::new(Channel::default()));
        let mut attachment = Attachment::new(path.clone(), portal, user, disk, channel, self.key);
        let ticket = self.ticket();
        attachment.start(ticket, Procedure::Open);
        self.attachments.push(attachment);
        Ok(ticket)
    }

    fn ticket(&mut self) -> Ticket {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        ticket
    }

    /// Queues `procedure` on the LUN's attachment.
    pub fn start(&mut self, path: &LunPath, procedure: Procedure) -> Result<Ticket, StorageError> {
        let i = self
            .find(path)
            .ok_or_else(|| StorageError::NotAttached(path.to_string()))?;
        let ticket = self.ticket();
        self.attachments[i].start(ticket, procedure);
        Ok(ticket)
    }

    /// The outcome of `ticket` once its procedure finished; `None` while it runs. A ticket
    /// whose attachment is gone reports a failure.
    pub fn result(
        &mut self,
        path: &LunPath,
        ticket: Ticket,
    ) -> Option<Result<Outcome, ProcedureError>> {
        let Some(i) = self.find(path) else {
            return Some(Err(ProcedureError::Detached(path.clone())));
        };
        let a = &mut self.attachments[i];
        if let Some(result) = a.take_result(ticket) {
            return Some(result.map_err(ProcedureError::Procedure));
        }
        if a.pending(ticket) {
            None
        } else {
            Some(Err(ProcedureError::UnknownTicket))
        }
    }

    /// The VM's end of an attached LUN, `sectors` large.
    pub fn backend(&self, path: &LunPath, sectors: u64) -> Option<Box<dyn BlockBackend>> {
        let a = &self.attachments[self.find(path)?];
        let serial = format!("hv-{}", a.user);
        Some(Box::new(IscsiBackend::new(
            a.channel.clone(),
            sectors,
            &serial,
        )))
    }

    /// Holds (or lets go) the guest's requests to `path`: while a node re-takes its disk, its
    /// VM's writes must wait.
    pub fn hold(&mut self, path: &LunPath, hold: bool) {
        if let Some(i) = self.find(path) {
            self.attachments[i].channel.lock().hold = hold;
        }
    }

    /// The VM no longer uses `path`: log out and forget the attachment (its requests still in
    /// flight fail).
    pub fn detach(&mut self, path: &LunPath) {
        if let Some(i) = self.find(path) {
            let a = &mut self.attachments[i];
            a.closing = true;
            let now = crate::clock::uptime_ms();
            a.disk.session_mut().logout(now);
        }
    }

    /// Runs `procedure` on `path` and then does `after` by itself (see [`After`]).
    pub fn start_background(
        &mut self,
        path: &LunPath,
        procedure: Procedure,
        after: After,
    ) -> Result<(), StorageError> {
        let ticket = self.start(path, procedure)?;
        self.background.push((path.clone(), ticket, after));
        Ok(())
    }

    /// Gives the disk up (RELEASE, unregister), then logs out.
    pub fn release_and_detach(&mut self, path: &LunPath) {
        if self
            .start_background(path, Procedure::Release, After::Detach)
            .is_err()
        {
            self.detach(path);
        }
    }

    fn finish_background(&mut self, lines: &mut Vec<String>) {
        let mut i = 0;
        while i < self.background.len() {
            let (path, ticket, _) = &self.background[i];
            let (path, ticket) = (path.clone(), *ticket);
            let Some(result) = self.result(&path, ticket) else {
                i += 1;
                continue;
            };
            let (_, _, after) = self.background.remove(i);
            match (after, result) {
                (After::Reclaimed { vm }, result) => {
                    self.hold(&path, false);
                    match result {
                        Ok(_) => lines.push(format!(
                            "disk {path} of {vm} is held by {} again",
                            self.node
                        )),
                        Err(e) => lines.push(format!(
                            "disk {path} of {vm}: taking it back FAILED ({}); its writes may be refused",
                            self.describe(&e)
                        )),
                    }
                }
                (After::FenceCheck { vm, new_owner }, result) => {
                    match result {
                        Ok(Outcome::Probed {
                            write_allowed: false,
                        }) => lines.push(format!(
                            "disk {path}: a write from {} is refused (RESERVATION CONFLICT): {vm}'s disk belongs to {new_owner} now",
                            self.node
                        )),
                        Ok(_) => lines.push(format!(
                            "disk {path}: WARNING: {} can still write after the handoff of {vm} to {new_owner}",
                            self.node
                        )),
                        Err(e) => lines.push(format!(
                            "disk {path}: fence check failed: {}",
                            self.describe(&e)
                        )),
                    }
                    self.detach(&path);
                }
                (After::Detach, result) => {
                    if let Err(e) = result {
                        log::warn!("storage: {path}: giving the disk up: {}", self.describe(&e));
                    }
                    self.detach(&path);
                }
            }
        }
    }

    /// A procedure error in words (holders by node name when the node knows them).
    pub fn describe(&self, error: &ProcedureError) -> String {
        match error {
            ProcedureError::Procedure(ownership::ProcedureError::HeldBy(key)) => {
                format!("reserved by {}", self.holder_name(*key))
            }
            ProcedureError::Procedure(other) => format!("{other}"),
            ProcedureError::Detached(path) => format!("disk {path} is no longer attached"),
            ProcedureError::UnknownTicket => String::from("no such procedure"),
        }
    }

    /// The names of the other nodes (for holders of reservations).
    pub fn set_peers(&mut self, peers: Vec<String>) {
        self.peers = peers;
    }

    /// A node name for a reservation key: this node, a peer, or the key itself.
    pub fn holder_name(&self, key: ReservationKey) -> String {
        if key == self.key {
            return self.node.clone();
        }
        key.find_node(self.peers.iter().map(String::as_str))
            .map_or_else(|| format!("key {key}"), ToString::to_string)
    }

    /// One round of storage work: connects sessions that need it, polls each one, moves guest
    /// requests and completions, runs reservation procedures. Returns lines for the console and
    /// whether work is under way (the loop should poll again before sleeping).
    pub fn poll(&mut self, net: &mut Net) -> (Vec<String>, bool) {
        let mut lines = Vec::new();
        let mut busy = false;
        let Some(stack) = net.storage_stack() else {
            return (lines, false);
        };
        let now = crate::clock::uptime_ms();
        for a in &mut self.attachments {
            a.issue_guest_requests(now);
            a.run_procedures(now);
            let (events, refused) = poll_over_tcp(&mut a.disk, &mut a.socket, stack, a.portal, now);
            if let Some(e) = refused {
                log::warn!("storage: {}: connecting: {e}", a.path);
            }
            lines.extend(a.absorb(events, now));
            lines.extend(a.check_reachable(now));
            // Procedures whose step finished in this poll go on at once.
            a.run_procedures(now);
            busy |= a.busy();
        }
        // Attachments given up whose session ended.
        self.attachments.retain_mut(|a| {
            let ended = matches!(
                a.disk.session().state(),
                SessionState::Closed | SessionState::Failed
            );
            let gone = a.closing && ended;
            if gone {
                if let Some(handle) = a.socket.take() {
                    stack.tcp_release(handle);
                }
            }
            !gone
        });
        self.finish_background(&mut lines);
        busy |= !self.background.is_empty();
        (lines, busy)
    }
}

/// One poll of `disk` over its own TCP connection to `portal` on the storage network: when the
/// session asks for a new connection the old socket goes and a new one is opened first, and a
/// socket whose connection ended (lost, logged out, failed) is released after the poll.
/// Returns the events, and why no connection could be opened (the session then sees a closed
/// pipe, counts a failed attempt and backs off).
fn poll_over_tcp(
    disk: &mut Disk,
    socket: &mut Option<SocketHandle>,
    stack: &mut Stack<Nic>,
    portal: Endpoint,
    now: u64,
) -> (Vec<DiskEvent>, Option<ConnectError>) {
    let mut refused = None;
    if disk.session().needs_connection(now) {
        if let Some(old) = socket.take() {
            stack.tcp_release(old);
        }
        match stack.tcp_connect(portal.addr, portal.port) {
            Ok(handle) => *socket = Some(handle),
            Err(e) => refused = Some(e),
        }
        disk.session_mut().connection_opened(now);
    }
    let events = match *socket {
        Some(handle) => disk.poll(&mut SocketPipe(stack.tcp_socket(handle)), now),
        None => disk.poll(&mut ClosedPipe, now),
    };
    let ended = events.iter().any(|e| {
        matches!(
            e,
            DiskEvent::Session(
                SessionEvent::ConnectionLost(_)
                    | SessionEvent::LoggedOut { .. }
                    | SessionEvent::Failed(_)
            )
        )
    });
    if ended {
        if let Some(old) = socket.take() {
            stack.tcp_release(old);
        }
    }
    (events, refused)
}
