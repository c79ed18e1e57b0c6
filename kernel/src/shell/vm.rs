//! The `vm` console command.

use alloc::format;
use alloc::string::{String, ToString};
use core::fmt::Write;

use kernel::config::is_valid_node_name;
use kernel::console::shell::{parse_number, CommandError};
use kernel::guest_workload;

use super::Node;
use crate::vm::{DirtyTracking, DiskSpec, VmError, VmSpec, VmState, MAX_MEM_MIB, MIN_MEM_MIB};

type Result = core::result::Result<(), CommandError>;

const DEFAULT_MEM_MIB: u64 = 32;

fn failed(err: VmError) -> CommandError {
    CommandError::Failed(err.to_string())
}

fn out_err(_: core::fmt::Error) -> CommandError {
    CommandError::Failed("console write failed".into())
}

fn bad(text: String) -> CommandError {
    CommandError::BadArguments(text)
}

/// Refuses operator changes to a VM a migration holds.
fn not_migrating(node: &Node, name: &str) -> Result {
    match node.vms.get(name) {
        Ok(vm) if vm.migrating => Err(failed(VmError::Migrating(name.into()))),
        _ => Ok(()),
    }
}

pub fn vm(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    if let ["start" | "stop" | "pause" | "resume" | "destroy" | "dirty", name, ..] = args {
        not_migrating(node, name)?;
    }
    let node_name = node.config.name.clone();
    if let ["create", name, options @ ..] = args {
        let (spec, disk) = parse_create(&node_name, name, options)?;
        match disk {
            Some(DiskSpec::Iscsi(path)) => super::storage::create_vm(node, spec, path)?,
            disk => node.vms.create(spec, disk).map_err(failed)?,
        }
        return writeln!(out, "vm {name} created (off); 'vm start {name}' boots it")
            .map_err(out_err);
    }
    if let ["destroy", name] = args {
        let disk = node
            .vms
            .get(name)
            .ok()
            .and_then(|vm| vm.disk().map(|(spec, _)| spec.clone()));
        node.vms.destroy(name).map_err(failed)?;
        super::storage::destroyed_vm(node, disk);
        return writeln!(out, "vm {name} destroyed").map_err(out_err);
    }
    let vms = &mut node.vms;
    match args {
        ["start", name] => {
            vms.start(name).map_err(failed)?;
            writeln!(out, "vm {name} started").map_err(out_err)
        }
        ["stop", name] => {
            vms.stop(name).map_err(failed)?;
            writeln!(out, "vm {name} stopped (off)").map_err(out_err)
        }
        ["pause", name] => {
            vms.pause(name).map_err(failed)?;
            writeln!(out, "vm {name} paused").map_err(out_err)
        }
        ["resume", name] => {
            vms.resume(name).map_err(failed)?;
            writeln!(out, "vm {name} resumed").map_err(out_err)
        }
        ["verify", name] => {
            guest_command(vms, name, guest_abi::command::VERIFY)?;
            writeln!(
                out,
                "vm {name}: verification requested; the guest answers below"
            )
            .map_err(out_err)
        }
        ["verify", name, "disk"] => {
            guest_command(vms, name, guest_abi::command::DISK_VERIFY)?;
            writeln!(
                out,
                "vm {name}: disk verification requested; the guest answers below"
            )
            .map_err(out_err)
        }
        ["disk", name, what @ ("hold" | "run")] => {
            let byte = if *what == "hold" {
                guest_abi::command::DISK_HOLD
            } else {
                guest_abi::command::DISK_RUN
            };
            guest_command(vms, name, byte)?;
            writeln!(
                out,
                "vm {name}: disk {what} requested; the guest answers below"
            )
            .map_err(out_err)
        }
        ["disk", name, "digest"] => {
            let vm = vms.get(name).map_err(failed)?;
            if vm.disk().is_none() {
                return Err(CommandError::Failed(format!("VM '{name}' has no disk")));
            }
            let digest = vm.disk_digest().ok_or_else(|| {
                CommandError::Failed(format!("VM '{name}': its disk cannot be read from here"))
            })?;
            writeln!(
                out,
                "vm {name}: disk digest blocks={} hash={:#018x}",
                digest.blocks, digest.hash
            )
            .map_err(out_err)
        }
        ["console", name] => {
            vms.get(name).map_err(failed)?;
            vms.attached = Some((*name).into());
            writeln!(
                out,
                "attached to {name}'s console; Ctrl-] returns to the shell"
            )
            .map_err(out_err)
        }
        ["list"] => list(node, out).map_err(out_err),
        ["show", name] => show(node, name, out),
        ["dirty", name, "reset"] => {
            vms.get_mut(name).map_err(failed)?.dirty_reset();
            writeln!(out, "vm {name}: dirty log reset").map_err(out_err)
        }
        ["dirty", name, "harvest"] => {
            let vm = vms.get_mut(name).map_err(failed)?;
            let pages = vm.dirty_harvest().map_err(CommandError::Failed)?;
            write!(out, "vm {name}: {} dirty pages:", pages.count()).map_err(out_err)?;
            write_ranges(out, pages.iter()).map_err(out_err)?;
            writeln!(out).map_err(out_err)
        }
        [] => Err(bad("missing subcommand".into())),
        [sub, ..] => Err(bad(format!(
            "unknown subcommand or wrong arguments for '{sub}'"
        ))),
    }
}

/// Sends a one-byte command to a running test guest.
fn guest_command(vms: &mut crate::vm::VmTable, name: &str, byte: u8) -> Result {
    let vm = vms.get(name).map_err(failed)?;
    if vm.state != VmState::Running {
        return Err(failed(VmError::WrongState {
            name: name.into(),
            state: vm.state.to_string(),
            wanted: "running",
        }));
    }
    vms.send_input(name, &[byte]).map_err(failed)?;
    Ok(())
}

/// A locally administered unicast MAC derived from the node and VM names (FNV-1a): stable for
/// a VM created again under the same name, distinct between VMs in practice.
fn default_mac(node: &str, vm: &str) -> [u8; 6] {
    let mut hash = ::net::bench::Fnv1a::default();
    hash.update(node.as_bytes());
    hash.update(b"/");
    hash.update(vm.as_bytes());
    let b = hash.0.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    // Unicast only: a VM's station address cannot be a group address.
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

fn parse_create(
    node: &str,
    name: &str,
    options: &[&str],
) -> core::result::Result<(VmSpec, Option<DiskSpec>), CommandError> {
    if !is_valid_node_name(name) {
        return Err(bad(format!(
            "bad VM name '{name}': 1-32 letters, digits, '-' or '_', starting with a letter"
        )));
    }
    let mut spec = VmSpec {
        name: name.into(),
        mem_mib: DEFAULT_MEM_MIB,
        dirty_pages_per_sec: 0,
        hot_pages: 0,
        tracking: DirtyTracking::DirtyBits,
        mac: default_mac(node, name),
    };
    let mut disk = None;
    for option in options {
        let Some((key, value)) = option.split_once('=') else {
            return Err(bad(format!("expected key=value, not '{option}'")));
        };
        match key {
            "mem" => {
                let mib = parse_number("mem", value)?;
                if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
                    return Err(bad(format!(
                        "mem must be {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB, not {mib}"
                    )));
                }
                spec.mem_mib = mib;
            }
            "vcpus" => {
                if parse_number("vcpus", value)? != 1 {
                    return Err(bad("only 1 vCPU per VM is supported so far".into()));
                }
            }
            "dirty" => spec.dirty_pages_per_sec = parse_number("dirty", value)?,
            "hot" => spec.hot_pages = guest_workload::parse_hot_pages(value)?,
            "mac" => {
                spec.mac = parse_mac(value).ok_or_else(|| {
                    bad(format!(
                        "mac must be six hex bytes like 02:00:00:00:00:01 (unicast), not '{value}'"
                    ))
                })?
            }
            "track" => {
                spec.tracking = match value {
                    "dbit" => DirtyTracking::DirtyBits,
                    "wp" => DirtyTracking::WriteProtect,
                    _ => return Err(bad(format!("track must be dbit or wp, not '{value}'"))),
                }
            }
            "disk" => disk = Some(DiskSpec::parse(value).map_err(bad)?),
            _ => return Err(bad(format!("unknown option '{key}'"))),
        }
    }
    Ok((spec, disk))
}

fn list(node: &Node, out: &mut dyn Write) -> core::fmt::Result {
    writeln!(out, "{:<16} {:<8} {:>8}  NODE", "NAME", "STATE", "MEMORY")?;
    for vm in node.vms.iter() {
        writeln!(
            out,
            "{:<16} {:<8} {:>4} MiB  {}",
            vm.spec.name, vm.state, vm.spec.mem_mib, node.config.name
        )?;
    }
    Ok(())
}

fn show(node: &Node, name: &str, out: &mut dyn Write) -> Result {
    let vm = node.vms.get(name).map_err(failed)?;
    (|| {
        writeln!(out, "vm {name} on {}", node.config.name)?;
        match &vm.state {
            VmState::Crashed(reason) => writeln!(out, "  state: crashed: {reason}")?,
            state => writeln!(out, "  state: {state}")?,
        }
        writeln!(
            out,
            "  memory: {} MiB, {}",
            vm.ram_bytes() >> 20,
            guest_workload::describe(
                vm.spec.dirty_pages_per_sec,
                vm.spec.hot_pages,
                vm.ram_bytes()
            )
        )?;
        writeln!(out, "  dirty tracking: {}", vm.spec.tracking)?;
        writeln!(out, "  mac: {}", ::net::e1000::Mac(vm.spec.mac))?;
        show_disk(vm, out)?;
        if vm.migrating {
            writeln!(out, "  held by a migration (see 'migrate status')")?;
        }
        writeln!(out, "  rip: {:#x}", vm.rip())?;
        writeln!(
            out,
            "  exits: {} total, {}/s: {}",
            vm.exits.total(),
            vm.exit_rate(),
            vm.exits
        )
    })()
    .map_err(out_err)
}

/// The `disk:` lines of `vm show`.
fn show_disk(vm: &crate::vm::Vm, out: &mut dyn Write) -> core::fmt::Result {
    let Some((spec, dev)) = vm.disk() else {
        return writeln!(out, "  disk: none");
    };
    let sectors = dev.config().capacity_sectors;
    let io = match dev.io_base() {
        Some(base) => format!("io {base:#x}"),
        None => String::from("io off"),
    };
    let place = if vm.has_local_disk() {
        "on this node only"
    } else {
        "on shared storage"
    };
    writeln!(
        out,
        "  disk: virtio-blk (legacy) 00:{:02x}.0 {io}, {spec}, {sectors} sectors, {place}",
        crate::vm::DISK_PCI_SLOT
    )?;
    let s = dev.stats();
    writeln!(
        out,
        "  disk i/o: {} in flight, {} reads ({} KiB), {} writes ({} KiB), {} flushes, \
         {} I/O failures, {} unsupported",
        vm.disk_in_flight(),
        s.reads,
        s.read_bytes >> 10,
        s.writes,
        s.write_bytes >> 10,
        s.flushes,
        s.io_errors,
        s.unsupported
    )?;
    match dev.fault() {
        Some(fault) => writeln!(out, "  disk device: needs reset: {fault}")?,
        None => writeln!(out, "  disk device: status {:#04x}", dev.status())?,
    }
    if let Some(why) = vm.migration_blocker() {
        writeln!(out, "  migration: not possible: {why}")?;
    }
    Ok(())
}

/// Writes ascending page numbers as compact hex ranges: ` 0x10-0x12 0x20`.
fn write_ranges(out: &mut dyn Write, pages: impl Iterator<Item = u64>) -> core::fmt::Result {
    let mut run: Option<(u64, u64)> = None;
    let flush = |out: &mut dyn Write, (a, b): (u64, u64)| {
        if a == b {
            write!(out, " {a:#x}")
        } else {
            write!(out, " {a:#x}-{b:#x}")
        }
    };
    for page in pages {
        run = match run {
            Some((a, b)) if page == b + 1 => Some((a, page)),
            Some(r) => {
                flush(out, r)?;
                Some((page, page))
            }
            None => Some((page, page)),
        };
    }
    if let Some(r) = run {
        flush(out, r)?;
    }
    Ok(())
}
