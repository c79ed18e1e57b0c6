//! One LUN in use by a VM of this node: its iSCSI session (own TCP connection on the storage
//! network, reconnected by the session when lost), the channel to the VM's virtio-blk device,
//! and the reservation work the node does on the LUN, one procedure at a time. The procedures
//! themselves (open, claim, take over, flush, probe, release) are the `storage` crate's
//! [`Procedures`]; this is the glue between them, the guest's requests and the console.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ::net::addr::Endpoint;
use ::net::smoltcp::iface::SocketHandle;
use storage::iscsi::{
    Disk, DiskError, DiskEvent, DiskReply, OpId, RegistrationEvent, SessionEvent,
};
use storage::ownership::{self, Procedures};
use storage::scsi::ReservationKey;
use storage::LunPath;
use vmx::devices::virtio::blk::{RequestId, RequestKind, SECTOR_SIZE};

use super::backend::SharedChannel;

pub use storage::ownership::{Outcome, Procedure, Ticket};

/// A LUN attached for one VM.
pub struct Attachment {
    pub path: LunPath,
    pub portal: Endpoint,
    /// The VM that uses it.
    pub user: String,
    pub disk: Disk,
    pub socket: Option<SocketHandle>,
    pub channel: SharedChannel,
    /// Guest requests at the target, by the operation carrying them.
    guest_ops: BTreeMap<OpId, (RequestId, bool)>,
    /// The reservation procedures queued and running on the LUN.
    procedures: Procedures,
    /// Set once the node gave the disk up: the session logs out and the attachment goes.
    pub closing: bool,
    /// Since when the session has had no working connection, and whether the console was
    /// told (a target that stays away is worth a line, a reconnect is routine).
    lost_since: Option<u64>,
    lost_reported: bool,
}

/// How long a lost connection may last before the console hears of it.
const LOST_REPORT_MS: u64 = 5_000;

impl Attachment {
    pub fn new(
        path: LunPath,
        portal: Endpoint,
        user: &str,
        disk: Disk,
        channel: SharedChannel,
        key: ReservationKey,
    ) -> Attachment {
        Attachment {
            path,
            portal,
            user: user.to_string(),
            disk,
            socket: None,
            channel,
            guest_ops: BTreeMap::new(),
            procedures: Procedures::new(key),
            closing: false,
            lost_since: None,
            lost_reported: false,
        }
    }

    /// Queues `procedure`; its outcome comes back from [`Self::take_result`].
    pub fn start(&mut self, ticket: Ticket, procedure: Procedure) {
        self.procedures.start(ticket, procedure);
    }

    /// The outcome of a finished procedure, once.
    pub fn take_result(
        &mut self,
        ticket: Ticket,
    ) -> Option<Result<Outcome, ownership::ProcedureError>> {
        self.procedures.take_result(ticket)
    }

    /// Whether the outcome of `ticket` is still to come (queued or running).
    pub fn pending(&self, ticket: Ticket) -> bool {
        self.procedures.pending(ticket)
    }

    /// Whether anything is under way (the loop should not sleep).
    pub fn busy(&self) -> bool {
        self.procedures.busy()
            || !self.guest_ops.is_empty()
            || !self.channel.lock().submitted.is_empty()
    }

    /// Handles what one poll of the session reported.
    pub fn absorb(&mut self, events: Vec<DiskEvent>, now_ms: u64) -> Vec<String> {
        let mut lines = Vec::new();
        for event in events {
            match event {
                DiskEvent::Completed { op, result } => {
                    if let Some((request, is_read)) = self.guest_ops.remove(&op) {
                        self.complete_guest(request, is_read, result);
                    } else {
                        self.procedures
                            .on_completion(op, &result, &mut self.disk, now_ms);
                    }
                }
                DiskEvent::Registration(RegistrationEvent::Fenced { .. }) => lines.push(format!(
                    "{}: this node's key is no longer registered (fenced by another node): its \
                     writes are refused",
                    self.path
                )),
                DiskEvent::Registration(RegistrationEvent::Restored { .. }) => {
                    log::info!(
                        "storage: {}: registration restored after a reconnect",
                        self.path
                    )
                }
                DiskEvent::Registration(RegistrationEvent::Failed(e)) => {
                    log::warn!("storage: {}: restoring the registration: {e}", self.path)
                }
                DiskEvent::Session(SessionEvent::LoggedIn { reconnected, .. }) => {
                    if reconnected {
                        log::info!("storage: {}: logged in again", self.path);
                    }
                    if let (Some(since), true) = (self.lost_since, self.lost_reported) {
                        lines.push(format!(
                            "disk {} of {}: the target answers again (after {} s)",
                            self.path,
                            self.user,
                            now_ms.saturating_sub(since) / 1000
                        ));
                    }
                    self.lost_since = None;
                    self.lost_reported = false;
                }
                DiskEvent::Session(SessionEvent::ConnectionLost(e)) => {
                    log::warn!("storage: {}: connection lost: {e}", self.path);
                    self.lost_since.get_or_insert(now_ms);
                }
                // 29/xx (power on or reset: every new session's first command gets one) is
                // routine; the others (2A/xx: reservations changed) are worth a line.
                DiskEvent::Session(SessionEvent::UnitAttention { sense, .. })
                    if sense.asc == 0x29 =>
                {
                    log::debug!("storage: {}: {sense}", self.path);
                }
                DiskEvent::Session(SessionEvent::UnitAttention { sense, .. }) => {
                    log::info!("storage: {}: {sense}", self.path);
                }
                DiskEvent::Session(SessionEvent::Failed(e)) => {
                    lines.push(format!("{}: the iSCSI session failed: {e}", self.path));
                }
                DiskEvent::Session(_) => {}
            }
        }
        lines
    }

    fn complete_guest(
        &mut self,
        request: RequestId,
        is_read: bool,
        result: Result<DiskReply, DiskError>,
    ) {
        let data = match result {
            Ok(DiskReply::Data(data)) if is_read => Ok(data),
            Ok(DiskReply::Done) if !is_read => Ok(Vec::new()),
            Ok(_) => Err(()),
            Err(e) => {
                log::warn!("storage: {}: guest request failed: {e}", self.path);
                Err(())
            }
        };
        self.channel.lock().completed.push_back((request, data));
    }

    /// A line for the console once the target has stayed away for a while.
    pub fn check_reachable(&mut self, now_ms: u64) -> Option<String> {
        let since = self.lost_since?;
        if self.lost_reported || now_ms < since + LOST_REPORT_MS || self.closing {
            return None;
        }
        self.lost_reported = true;
        Some(format!(
            "disk {} of {}: the target at {} has not answered for {} s; the guest's disk \
             requests wait (each fails after {} s)",
            self.path,
            self.user,
            self.portal,
            now_ms.saturating_sub(since) / 1000,
            self.disk.session().config().retry.command_deadline_ms / 1000
        ))
    }

    /// Moves the guest's queued requests into iSCSI commands (unless held).
    pub fn issue_guest_requests(&mut self, now_ms: u64) {
        let requests: Vec<_> = {
            let mut channel = self.channel.lock();
            if channel.hold {
                return;
            }
            channel.submitted.drain(..).collect()
        };
        let block_len = u64::from(self.disk.block_len());
        for request in requests {
            let (submitted, is_read) = match request.kind {
                RequestKind::Read { sector, len } => {
                    let lba = sector * SECTOR_SIZE / block_len;
                    let blocks = (u64::from(len) / block_len) as u32;
                    (self.disk.read(lba, blocks, now_ms), true)
                }
                RequestKind::Write { sector, data } => {
                    let lba = sector * SECTOR_SIZE / block_len;
                    (self.disk.write(lba, data, now_ms), false)
                }
                RequestKind::Flush => (self.disk.flush(now_ms), false),
                // Answered by the backend itself.
                RequestKind::GetId => continue,
            };
            match submitted {
                Ok(op) => {
                    self.guest_ops.insert(op, (request.id, is_read));
                }
                Err(e) => {
                    log::warn!("storage: {}: guest request refused: {e}", self.path);
                    self.channel
                        .lock()
                        .completed
                        .push_back((request.id, Err(())));
                }
            }
        }
    }

    /// Starts the next queued procedure when none runs and the session can take commands
    /// (fails the queued ones once the session ended).
    pub fn run_procedures(&mut self, now_ms: u64) {
        self.procedures.run(&mut self.disk, now_ms);
    }
}
