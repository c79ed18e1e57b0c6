//! The `iscsi` and `disk` console commands, and the shared-disk half of `vm create` and
//! `vm destroy`.
//!
//! Each waits for the storage (bounded by the storage's own deadlines), running the VM slices
//! between polls like `net connect` does, so VMs keep running while the console waits.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

use ::net::addr::Endpoint;
use ::storage::LunPath;
use kernel::config::ISCSI_DEFAULT_PORT;
use kernel::console::shell::CommandError;

use super::{Idler, Node};
use crate::storage::attachment::{Outcome, Procedure, Ticket};
use crate::storage::survey;
use crate::vm::{DiskSpec, VmSpec};

type Result = core::result::Result<(), CommandError>;

pub const ISCSI_USAGE: &str = "discover [<address>[:port]] | show";
pub const DISK_USAGE: &str = "list [<address>[:port]]";

/// Longest wait for one procedure on an attached LUN (log-in included).
const PROCEDURE_TIMEOUT_MS: u64 = 20_000;

fn out_err(_: core::fmt::Error) -> CommandError {
    CommandError::Failed("console write failed".into())
}

/// The portal named on the command line, or the node's `iscsi_portal`.
fn portal(node: &Node, arg: Option<&&str>) -> core::result::Result<Endpoint, CommandError> {
    match arg {
        Some(text) => Endpoint::parse(text, ISCSI_DEFAULT_PORT).map_err(|e| {
            CommandError::BadArguments(format!("portal '{}': {e}", super::net::shorten(text)))
        }),
        None => node.storage.portal().ok_or_else(|| {
            CommandError::Failed(format!("{}", crate::storage::StorageError::NoPortal))
        }),
    }
}

/// `iscsi discover [portal]` | `iscsi show`.
pub fn iscsi(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    match args {
        ["discover", rest @ ..] if rest.len() <= 1 => {
            let portal = portal(node, rest.first())?;
            let config = node.storage.session_config(None);
            let Node { net, vms, .. } = node;
            let mut idler = Idler::new();
            let targets = survey::discover(net, &mut || idler.idle(vms), portal, config)
                .map_err(|e| CommandError::Failed(format!("discovery at {portal}: {e}")))?;
            writeln!(out, "{} target(s) at {portal}:", targets.len()).map_err(out_err)?;
            for target in &targets {
                let advertised: Vec<String> =
                    target.portals.iter().map(ToString::to_string).collect();
                writeln!(
                    out,
                    "  {} (advertises {})",
                    target.name,
                    if advertised.is_empty() {
                        String::from("no address")
                    } else {
                        advertised.join(", ")
                    }
                )
                .map_err(out_err)?;
            }
            Ok(())
        }
        ["show"] => {
            let s = &node.storage;
            writeln!(
                out,
                "initiator {}, reservation key {}, portal {}",
                s.initiator(),
                s.key(),
                s.portal()
                    .map_or_else(|| String::from("none (iscsi_portal)"), |p| p.to_string())
            )
            .map_err(out_err)?;
            for a in s.attachments() {
                writeln!(
                    out,
                    "  {} for {}: session {:?}{}",
                    a.path,
                    a.user,
                    a.disk.session().state(),
                    if a.closing { ", closing" } else { "" }
                )
                .map_err(out_err)?;
            }
            Ok(())
        }
        _ => Err(CommandError::BadArguments(format!(
            "usage: iscsi {ISCSI_USAGE}"
        ))),
    }
}

/// `disk list [portal]`: every disk LUN of every target, its size and who holds it.
pub fn disk(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    let ["list", rest @ ..] = args else {
        return Err(CommandError::BadArguments(format!(
            "usage: disk {DISK_USAGE}"
        )));
    };
    if rest.len() > 1 {
        return Err(CommandError::BadArguments(format!(
            "usage: disk {DISK_USAGE}"
        )));
    }
    let portal = portal(node, rest.first())?;
    let config = node.storage.session_config(None);
    let mut idler = Idler::new();
    let targets = {
        let Node { net, vms, .. } = node;
        survey::discover(net, &mut || idler.idle(vms), portal, config)
            .map_err(|e| CommandError::Failed(format!("discovery at {portal}: {e}")))?
    };
    let mut luns = Vec::new();
    for target in &targets {
        let config = node.storage.session_config(Some(&target.name));
        let Node { net, vms, .. } = node;
        let found = survey::luns(net, &mut || idler.idle(vms), portal, config, &target.name)
            .map_err(|e| CommandError::Failed(format!("{}: {e}", target.name)))?;
        luns.extend(found);
    }
    writeln!(out, "{} disk(s) at {portal}:", luns.len()).map_err(out_err)?;
    for lun in &luns {
        let holder = match lun.holder {
            Some(key) => format!("reserved by {}", node.storage.holder_name(key)),
            None => String::from("not reserved"),
        };
        let user = node
            .storage
            .attachments()
            .iter()
            .find(|a| a.path == lun.path && !a.closing)
            .map(|a| format!(", used here by {}", a.user))
            .unwrap_or_default();
        writeln!(
            out,
            "  {}  {} MiB ({} x {} B)  {} {}  {holder}{user}",
            lun.path,
            lun.bytes >> 20,
            lun.bytes / u64::from(lun.block_len.max(1)),
            lun.block_len,
            lun.vendor,
            lun.product
        )
        .map_err(out_err)?;
    }
    Ok(())
}

/// Waits for a procedure on an attached LUN.
fn wait(node: &mut Node, path: &LunPath, ticket: Ticket) -> core::result::Result<Outcome, String> {
    let deadline = crate::clock::uptime_ms() + PROCEDURE_TIMEOUT_MS;
    let mut idler = Idler::new();
    loop {
        let (lines, _) = node.storage.poll(&mut node.net);
        for line in lines {
            crate::println!("[storage] {line}");
        }
        if let Some(result) = node.storage.result(path, ticket) {
            return result.map_err(|e| node.storage.describe(&e));
        }
        if crate::clock::uptime_ms() >= deadline {
            return Err(format!(
                "no answer from the storage within {} s",
                PROCEDURE_TIMEOUT_MS / 1000
            ));
        }
        node.net.poll();
        idler.idle(&mut node.vms);
    }
}

/// `vm create ... disk=<iqn>/<lun>`: attaches the LUN, claims its reservation for this node
/// (refused if another node holds it), then creates the VM on it.
pub fn create_vm(node: &mut Node, spec: VmSpec, path: LunPath) -> Result {
    let name = spec.name.clone();
    if node.vms.get(&name).is_ok() {
        return Err(CommandError::Failed(format!("VM '{name}' already exists")));
    }
    let open = node
        .storage
        .attach(&path, &name)
        .map_err(|e| CommandError::Failed(format!("{e}")))?;
    let fail = |node: &mut Node, why: String, release: bool| {
        if release {
            node.storage.release_and_detach(&path);
        } else {
            node.storage.detach(&path);
        }
        CommandError::Failed(format!("disk {path}: {why}"))
    };
    let sectors = match wait(node, &path, open) {
        Ok(Outcome::Opened { sectors }) => sectors,
        Ok(other) => return Err(fail(node, format!("unexpected {other:?}"), false)),
        Err(why) => return Err(fail(node, why, false)),
    };
    let claim = node
        .storage
        .start(&path, Procedure::Claim { takeover: false })
        .map_err(|e| CommandError::Failed(format!("{e}")))?;
    match wait(node, &path, claim) {
        Ok(Outcome::Claimed { .. }) => {}
        Ok(other) => return Err(fail(node, format!("unexpected {other:?}"), true)),
        // A refused claim unregisters by itself; releasing after it is harmless.
        Err(why) => return Err(fail(node, why, true)),
    }
    let Some(backend) = node.storage.backend(&path, sectors) else {
        return Err(fail(node, "not attached".to_string(), true));
    };
    if let Err(e) = node
        .vms
        .create_attached(spec, DiskSpec::Iscsi(path.clone()), backend)
    {
        return Err(fail(node, format!("{e}"), true));
    }
    Ok(())
}

/// After `vm destroy`: a VM's shared disk is given up (reservation released, session closed).
pub fn destroyed_vm(node: &mut Node, disk: Option<DiskSpec>) {
    if let Some(DiskSpec::Iscsi(path)) = disk {
        node.storage.release_and_detach(&path);
    }
}
