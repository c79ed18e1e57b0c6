//! The `migrate` console command: start, watch, cancel and resolve live migrations.
//!
//! `migrate <vm> <node>` returns at once; the migration runs in the console loop and prints a
//! summary line when it ends. A VM named `status`, `cancel`, `resolve` or `debug` cannot be
//! migrated (rename it): the subcommands take precedence.

use alloc::format;
use alloc::string::ToString;
use core::fmt::Write;

use kernel::console::shell::{parse_number, CommandError};

use super::Node;
use crate::migration::{Request, DEFAULT_DOWNTIME_MS, MAX_DOWNTIME_MS};

type Result = core::result::Result<(), CommandError>;

pub const MIGRATE_USAGE: &str =
    "<vm> <node|address> [downtime=<ms>] | status | cancel <vm> | resolve <vm> here|there";

fn out_err(_: core::fmt::Error) -> CommandError {
    CommandError::Failed("console write failed".into())
}

/// `downtime=<ms>` (the only option so far).
fn parse_options(options: &[&str]) -> core::result::Result<u64, CommandError> {
    let mut downtime_ms = DEFAULT_DOWNTIME_MS;
    for option in options {
        match option.split_once('=') {
            Some(("downtime", value)) => {
                downtime_ms = parse_number("downtime", value)?;
                if !(1..=MAX_DOWNTIME_MS).contains(&downtime_ms) {
                    return Err(CommandError::BadArguments(format!(
                        "downtime must be 1..={MAX_DOWNTIME_MS} ms, not {downtime_ms}"
                    )));
                }
            }
            _ => {
                return Err(CommandError::BadArguments(format!(
                    "unknown option '{}' (downtime=<ms>)",
                    super::net::shorten(option)
                )))
            }
        }
    }
    Ok(downtime_ms)
}

pub fn migrate(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    match args {
        ["status"] => node.migrations.status(&node.vms, out).map_err(out_err),
        ["cancel", vm] => {
            node.migrations
                .cancel(&mut node.vms, &mut node.storage, vm)
                .map_err(CommandError::Failed)?;
            writeln!(out, "migration of {vm} cancelled").map_err(out_err)
        }
        ["resolve", vm, side @ ("here" | "there")] => {
            node.migrations
                .resolve(&mut node.vms, &mut node.storage, vm, *side == "there")
                .map_err(CommandError::Failed)?;
            writeln!(out, "migration of {vm} resolved: the VM runs {side}").map_err(out_err)
        }
        // Hidden test hooks (see `migration::TestHooks`).
        ["debug", "drop-commit-ack"] => {
            node.migrations.hooks.drop_next_commit_ack = true;
            writeln!(
                out,
                "the next incoming migration will lose its commit acknowledgement"
            )
            .map_err(out_err)
        }
        ["debug", "fail-takeover"] => {
            node.migrations.hooks.fail_next_takeover = true;
            writeln!(
                out,
                "the next incoming migration will fail after taking its disk over"
            )
            .map_err(out_err)
        }
        ["resolve", _, side] => Err(CommandError::BadArguments(format!(
            "resolve takes 'here' or 'there', not '{}'",
            super::net::shorten(side)
        ))),
        [vm, target, options @ ..] if !matches!(*vm, "status" | "cancel" | "resolve" | "debug") => {
            let downtime_ms = parse_options(options)?;
            if node.vms.get(vm).is_err() {
                return Err(CommandError::Failed(format!(
                    "no VM named '{}' on this node (see 'vm list')",
                    super::net::shorten(vm)
                )));
            }
            let (ip, label) = super::net::resolve(node, target)?;
            let own = node.config.cluster_addr.map(|a| a.addr);
            if *target == node.config.name || own == Some(ip) {
                return Err(CommandError::Failed(format!(
                    "{vm} already runs on this node ({})",
                    node.config.name
                )));
            }
            let label = node
                .config
                .peer_name(ip)
                .map_or(label, |name| name.to_string());
            let Some(vendor) = node.vms.vendor() else {
                return Err(CommandError::Failed(
                    "this node cannot run VMs (no SVM or VMX)".into(),
                ));
            };
            let request = Request {
                vm,
                target: ip,
                label: &label,
                downtime_ms,
            };
            node.migrations
                .start(&mut node.net, &mut node.vms, &request, vendor)
                .map_err(|e| CommandError::Failed(e.to_string()))?;
            writeln!(
                out,
                "migrating {vm} to {label} ({ip}), downtime target {downtime_ms} ms; 'migrate status' shows progress"
            )
            .map_err(out_err)
        }
        [] => Err(CommandError::BadArguments("missing VM and node".into())),
        _ => Err(CommandError::BadArguments(format!(
            "unknown form 'migrate {}'",
            super::net::shorten(&args.join(" "))
        ))),
    }
}
