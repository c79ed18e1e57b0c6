//! What the console asks of the storage: SendTargets discovery, and each LUN of a target with
//! its size and reservation. Short-lived sessions of their own, driven to completion with the
//! caller's `idle` hook between polls (the VM slices run there), every wait bounded.
//!
//! Targets are always reached through the portal they were discovered on: behind QEMU's user
//! networking the target advertises its own view of its address (the host's 127.0.0.1), which
//! the node cannot reach.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ::net::addr::Endpoint;
use ::net::smoltcp::iface::SocketHandle;
use storage::iscsi::discovery::{parse_send_targets, send_targets_request, DiscoveredTarget};
use storage::iscsi::{
    Disk, DiskEvent, Session, SessionConfig, SessionEvent, SessionState, TaskId, TaskReply,
};
use storage::scsi::{
    parse_report_luns, Capacity, Command, CommandError, PrInAction, ReservationKey,
    ReservationStatus, StandardInquiry, Status,
};
use storage::{Lun, LunPath};

use crate::net::{Net, SocketPipe};

/// How long one console request may take in all.
const DEADLINE_MS: u64 = 15_000;

/// A LUN as `disk list` shows it.
#[derive(Debug, Clone)]
pub struct LunInfo {
    pub path: LunPath,
    pub bytes: u64,
    pub block_len: u32,
    pub vendor: String,
    pub product: String,
    /// The reservation holder's key, if the LUN is reserved.
    pub holder: Option<ReservationKey>,
}

/// One temporary session with its own connection.
struct Probe<'a> {
    net: &'a mut Net,
    idle: &'a mut dyn FnMut(),
    portal: Endpoint,
    disk: Disk,
    socket: Option<SocketHandle>,
    deadline: u64,
}

impl Probe<'_> {
    fn now() -> u64 {
        crate::clock::uptime_ms()
    }

    /// Polls until `task` completes; its reply.
    fn wait(&mut self, task: TaskId) -> Result<TaskReply, String> {
        loop {
            let now = Self::now();
            if now >= self.deadline {
                return Err(format!(
                    "no answer from {} within {} s",
                    self.portal,
                    DEADLINE_MS / 1000
                ));
            }
            let stack = self
                .net
                .storage_stack()
                .ok_or_else(|| "this node has no storage network interface".to_string())?;
            let (events, refused) =
                super::poll_over_tcp(&mut self.disk, &mut self.socket, stack, self.portal, now);
            if let Some(e) = refused {
                return Err(format!("connecting to {}: {e}", self.portal));
            }
            for event in events {
                match event {
                    DiskEvent::Session(SessionEvent::Completed(done)) if done.task == task => {
                        return done.result.map_err(|e| format!("{e}"));
                    }
                    DiskEvent::Session(SessionEvent::ConnectionLost(e)) => {
                        log::debug!("storage: {}: connection lost: {e}", self.portal);
                    }
                    _ => {}
                }
            }
            if self.disk.session().state() == SessionState::Failed {
                let why = self
                    .disk
                    .session()
                    .failure()
                    .map_or_else(|| "login failed".to_string(), |e| format!("{e}"));
                return Err(format!("{}: {why}", self.portal));
            }
            self.net.poll();
            (self.idle)();
        }
    }

    /// Runs a SCSI command on `lun`; the data it returned, or why it failed.
    fn command(&mut self, lun: u16, command: &Command) -> Result<Vec<u8>, String> {
        let lun = Lun::single_level(lun).map_err(|e| format!("LUN {lun}: {e}"))?;
        let task = self
            .disk
            .session_mut()
            .submit(lun, command, Vec::new(), Self::now())
            .map_err(|e| format!("{e}"))?;
        match self.wait(task)? {
            TaskReply::Scsi(reply) if reply.status == Status::Good => Ok(reply.data),
            TaskReply::Scsi(reply) => {
                Err(CommandError::from_status(reply.status, Some(&reply.sense))
                    .map_or_else(|| format!("status {}", reply.status), |e| format!("{e}")))
            }
            TaskReply::Text(_) => Err("a text answer to a SCSI command".to_string()),
        }
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        // A polite end when the session is up; the socket goes either way.
        self.disk.session_mut().logout(Self::now());
        if let Some(stack) = self.net.storage_stack() {
            if let Some(handle) = self.socket.take() {
                let _ = self
                    .disk
                    .poll(&mut SocketPipe(stack.tcp_socket(handle)), Self::now());
                stack.tcp_release(handle);
            }
        }
    }
}

fn probe<'a>(
    net: &'a mut Net,
    idle: &'a mut dyn FnMut(),
    portal: Endpoint,
    config: SessionConfig,
) -> Result<Probe<'a>, String> {
    let disk = Disk::new(Session::new(config), 0).map_err(|e| format!("{e}"))?;
    Ok(Probe {
        net,
        idle,
        portal,
        disk,
        socket: None,
        deadline: crate::clock::uptime_ms() + DEADLINE_MS,
    })
}

/// SendTargets=All through `portal` with a discovery session.
pub fn discover(
    net: &mut Net,
    idle: &mut dyn FnMut(),
    portal: Endpoint,
    config: SessionConfig,
) -> Result<Vec<DiscoveredTarget>, String> {
    let mut p = probe(net, idle, portal, config)?;
    let task = p
        .disk
        .session_mut()
        .submit_text(send_targets_request(), Probe::now())
        .map_err(|e| format!("{e}"))?;
    match p.wait(task)? {
        TaskReply::Text(keys) => parse_send_targets(&keys).map_err(|e| format!("{e}")),
        TaskReply::Scsi(_) => Err("a SCSI answer to SendTargets".to_string()),
    }
}

/// Every disk LUN of `target` through `portal`: size, identity, reservation holder.
pub fn luns(
    net: &mut Net,
    idle: &mut dyn FnMut(),
    portal: Endpoint,
    config: SessionConfig,
    target: &str,
) -> Result<Vec<LunInfo>, String> {
    let mut p = probe(net, idle, portal, config)?;
    let report = p.command(0, &Command::report_luns(8 + 8 * 256))?;
    let numbers = parse_report_luns(&report).map_err(|e| format!("REPORT LUNS: {e}"))?;
    let mut out = Vec::new();
    for lun in numbers {
        let inquiry = p.command(lun, &Command::inquiry(255))?;
        let inquiry =
            StandardInquiry::parse(&inquiry).map_err(|e| format!("LUN {lun} INQUIRY: {e}"))?;
        if !inquiry.is_connected() || !inquiry.is_disk() {
            continue;
        }
        let capacity = p.command(lun, &Command::read_capacity16(Capacity::LEN as u32))?;
        let capacity =
            Capacity::parse(&capacity).map_err(|e| format!("LUN {lun} capacity: {e}"))?;
        let reservation = p.command(
            lun,
            &Command::persistent_reserve_in(PrInAction::ReadReservation, 24),
        )?;
        let reservation = ReservationStatus::parse(&reservation)
            .map_err(|e| format!("LUN {lun} reservation: {e}"))?;
        let path = LunPath::new(target, lun).map_err(|e| format!("{target}/{lun}: {e}"))?;
        out.push(LunInfo {
            path,
            bytes: capacity.bytes(),
            block_len: capacity.block_len,
            vendor: inquiry.vendor,
            product: inquiry.product,
            holder: reservation.holder.map(|(key, _)| key),
        });
    }
    Ok(out)
}
