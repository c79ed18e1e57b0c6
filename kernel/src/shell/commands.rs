//! The console's commands.

use alloc::format;
use alloc::string::ToString;
use core::fmt::Write;

use bootloader_api::info::MemoryRegionKind;
use kernel::config::{log_level_name, parse_log_level, OnPanic};
use kernel::console::shell::{parse_number, write_help, Command, CommandError};

use super::Node;
use crate::arch::apic;
use crate::arch::deliberate::FaultKind;
use crate::arch::power;
use crate::{clock, fault, mem, trap};

type Result = core::result::Result<(), CommandError>;

const VM_USAGE: &str =
    "create <name> [mem=<MiB>] [vcpus=1] [dirty=<pages/s>] [hot=<pages>] [track=dbit|wp] [mac=<xx:..>] \
[disk=ram:<MiB>|<iqn>/<lun>] | start|stop|pause|resume|verify|show|destroy|console <name> | list \
| dirty <name> reset|harvest | verify <name> disk | disk <name> hold|run|digest";

pub const TABLE: &[Command<Node>] = &[
    Command {
        name: "help",
        usage: "",
        summary: "list the commands",
        hidden: false,
        run: help,
    },
    Command {
        name: "info",
        usage: "",
        summary: "CPU, virtualization support, memory and uptime of this node",
        hidden: false,
        run: info,
    },
    Command {
        name: "mem",
        usage: "",
        summary: "boot memory map, physical frames and kernel heap",
        hidden: false,
        run: mem,
    },
    Command {
        name: "uptime",
        usage: "",
        summary: "time since boot",
        hidden: false,
        run: uptime,
    },
    Command {
        name: "log",
        usage: "level [off|error|warn|info|debug|trace]",
        summary: "show or set the log level",
        hidden: false,
        run: log_cmd,
    },
    Command {
        name: "config",
        usage: "[show | set <key> <value>]",
        summary: "show the node configuration or override one key",
        hidden: false,
        run: config,
    },
    Command {
        name: "vm",
        usage: VM_USAGE,
        summary: "create, run and inspect virtual machines",
        hidden: false,
        run: super::vm::vm,
    },
    Command {
        name: "net",
        usage: super::net::NET_USAGE,
        summary: "network interface (address, link, counters) or its neighbor cache",
        hidden: false,
        run: super::net::net_cmd,
    },
    Command {
        name: "ping",
        usage: super::net::PING_USAGE,
        summary:
            "ICMP echo to a node or address, once a second (count 1..1000, default 4; Ctrl-C stops)",
        hidden: false,
        run: super::net::ping,
    },
    Command {
        name: "migrate",
        usage: super::migrate::MIGRATE_USAGE,
        summary: "move a VM to another node while it runs; progress, cancel",
        hidden: false,
        run: super::migrate::migrate,
    },
    Command {
        name: "iscsi",
        usage: super::storage::ISCSI_USAGE,
        summary: "the shared storage's targets (SendTargets), this node's initiator and sessions",
        hidden: false,
        run: super::storage::iscsi,
    },
    Command {
        name: "disk",
        usage: super::storage::DISK_USAGE,
        summary: "the shared disks: each LUN as <iqn>/<lun>, its size, which node holds it",
        hidden: false,
        run: super::storage::disk,
    },
    Command {
        name: "pci",
        usage: "",
        summary: "the PCI functions found at boot",
        hidden: false,
        run: super::net::pci_cmd,
    },
    Command {
        name: "bench",
        usage: "verify <pages>",
        summary: "time the test guest's page-verify loop run natively (reference for the VM)",
        hidden: false,
        run: bench,
    },
    Command {
        name: "reboot",
        usage: "",
        summary: "restart this node",
        hidden: false,
        run: reboot,
    },
    Command {
        name: "halt",
        usage: "",
        summary: "stop this node (the CPU halts for good)",
        hidden: false,
        run: halt,
    },
    Command {
        name: "debug",
        usage: "fault <ud|de|bp|pf|gp> | panic",
        summary: "cause a fault on purpose (tests of exception reporting)",
        hidden: true,
        run: debug,
    },
];

fn no_arguments(args: &[&str]) -> Result {
    match args {
        [] => Ok(()),
        _ => Err(CommandError::BadArguments(format!(
            "unexpected argument '{}'",
            args[0]
        ))),
    }
}

/// Console output cannot fail in a way a command could handle.
fn out_err(_: core::fmt::Error) -> CommandError {
    CommandError::Failed("console write failed".into())
}

fn help(_: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    no_arguments(args)?;
    writeln!(out, "commands:").map_err(out_err)?;
    write_help(TABLE, out).map_err(out_err)
}

fn mib(bytes: u64) -> MibText {
    MibText(bytes)
}

/// Bytes shown as MiB with one decimal.
struct MibText(u64);

impl core::fmt::Display for MibText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let tenths = self.0 * 10 / (1024 * 1024);
        write!(f, "{}.{} MiB", tenths / 10, tenths % 10)
    }
}

fn write_uptime(out: &mut dyn Write) -> core::fmt::Result {
    let ms = clock::uptime_ms();
    writeln!(out, "uptime: {}.{:03} s", ms / 1000, ms % 1000)
}

fn info(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    no_arguments(args)?;
    (|| {
        writeln!(out, "node: {}", node.config.name)?;
        writeln!(out, "{}", node.caps)?;
        if let Some(timer) = apic::info() {
            writeln!(
                out,
                "apic: {} id {}, timer {} kHz, tick {} Hz",
                timer.mode,
                timer.apic_id,
                timer.timer_hz / 1000,
                timer.tick_hz
            )?;
        }
        writeln!(out, "tsc: {} MHz", clock::tsc_hz() / 1_000_000)?;
        writeln!(
            out,
            "interrupts: {} timer ticks, {} unexpected",
            trap::timer_ticks(),
            trap::unexpected_interrupts()
        )?;
        let frames = mem::frame_stats();
        writeln!(
            out,
            "memory: total {}, free {}",
            mib(frames.total * 4096),
            mib(frames.free * 4096)
        )?;
        write_uptime(out)
    })()
    .map_err(out_err)
}

fn kind_name(kind: MemoryRegionKind) -> alloc::string::String {
    match kind {
        MemoryRegionKind::Usable => "usable".into(),
        MemoryRegionKind::Bootloader => "bootloader".into(),
        MemoryRegionKind::UnknownUefi(t) => format!("uefi type {t}"),
        MemoryRegionKind::UnknownBios(t) => format!("e820 type {t}"),
        _ => "other".into(),
    }
}

fn mem(_: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    no_arguments(args)?;
    (|| {
        writeln!(out, "boot memory map:")?;
        for region in mem::memory_map() {
            writeln!(
                out,
                "  {:#014x}-{:#014x} {:>12}  {}",
                region.start,
                region.end,
                mib(region.end - region.start).to_string(),
                kind_name(region.kind)
            )?;
        }
        let frames = mem::frame_stats();
        writeln!(
            out,
            "frames: {} total, {} free, {} used (4 KiB each; {} free)",
            frames.total,
            frames.free,
            frames.total - frames.free,
            mib(frames.free * 4096)
        )?;
        let heap = mem::heap_stats();
        writeln!(
            out,
            "heap: {} used of {}",
            mib(heap.used as u64),
            mib(heap.size as u64)
        )
    })()
    .map_err(out_err)
}

fn uptime(_: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    no_arguments(args)?;
    write_uptime(out).map_err(out_err)
}

fn log_cmd(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    match args {
        ["level"] => {
            writeln!(out, "log level: {}", log_level_name(log::max_level())).map_err(out_err)
        }
        ["level", level] => {
            let filter = parse_log_level(level).ok_or_else(|| {
                CommandError::BadArguments(format!("unknown log level '{level}'"))
            })?;
            log::set_max_level(filter);
            node.config.log_level = filter;
            writeln!(out, "log level: {}", log_level_name(filter)).map_err(out_err)
        }
        [] => Err(CommandError::BadArguments("missing 'level'".into())),
        [other, ..] => Err(CommandError::BadArguments(format!(
            "unknown subcommand '{other}'"
        ))),
    }
}

fn config(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    match args {
        [] | ["show"] => {
            for line in node.config.lines() {
                writeln!(out, "{line}").map_err(out_err)?;
            }
            Ok(())
        }
        ["set", key, value] => {
            node.config
                .set(key, value)
                .map_err(|kind| CommandError::BadArguments(format!("{key}: {kind}")))?;
            // Apply what takes effect at once; the rest is read by its owner when used.
            log::set_max_level(node.config.log_level);
            fault::set_exit_on_fault(node.config.on_panic == OnPanic::Exit);
            match *key {
                "cluster_addr" => node.net.set_address(node.config.cluster_addr),
                "storage_addr" => node.net.set_storage_address(node.config.storage_addr),
                "iscsi_portal" => node.storage.set_portal(node.config.iscsi_portal),
                _ => {}
            }
            writeln!(out, "{key} = {value}").map_err(out_err)
        }
        ["set", ..] => Err(CommandError::BadArguments(
            "set needs a key and a value".into(),
        )),
        [other, ..] => Err(CommandError::BadArguments(format!(
            "unknown subcommand '{other}'"
        ))),
    }
}

fn reboot(_: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    no_arguments(args)?;
    let _ = writeln!(out, "rebooting");
    power::reboot()
}

fn halt(_: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    no_arguments(args)?;
    let _ = writeln!(out, "node halted");
    power::halt_forever()
}

/// Runs the test guest's verification loop on `pages` freshly written pages in host memory,
/// timed with the TSC: the native reference for the same loop inside a VM (`vm verify`).
fn bench(_: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    let pages = match args {
        ["verify", pages] => parse_number("pages", pages)?,
        _ => {
            return Err(CommandError::BadArguments(
                "expected 'verify <pages>'".into(),
            ))
        }
    };
    if !(1..=1 << 20).contains(&pages) {
        return Err(CommandError::BadArguments(
            "pages must be 1..=1048576".into(),
        ));
    }
    let mut ram = crate::vm::memory::GuestRam::new(pages * 4096)
        .map_err(|_| CommandError::Failed(format!("not enough memory for {pages} pages")))?;
    for index in 0..pages as usize {
        if let Some(words) = ram.page_words_mut(index) {
            guest_abi::fill_page(words, index as u64, 1);
        }
    }
    let zero = [0u64; 512];
    let t0 = clock::rdtsc();
    let report = guest_abi::verify_pages(
        pages,
        |_| 1,
        |i| ram.page_words(i as usize).unwrap_or(&zero),
    );
    let cycles = clock::rdtsc() - t0;
    ram.free();
    writeln!(
        out,
        "native verify {} pages={pages} hash={:#018x} cycles={cycles}",
        if report.bad == 0 { "ok" } else { "FAILED" },
        report.hash
    )
    .map_err(out_err)
}

/// An unmapped, canonical, lower-half address for the page-fault case.
const UNMAPPED_PROBE: u64 = 0x0000_7FFF_DEAD_B000;

fn debug(_: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    let fault = match args {
        ["panic"] => panic!("deliberate panic from the console"),
        ["fault", "ud"] => FaultKind::InvalidOpcode,
        ["fault", "de"] => FaultKind::DivideError,
        ["fault", "bp"] => FaultKind::Breakpoint,
        ["fault", "gp"] => FaultKind::GeneralProtection,
        ["fault", "pf"] => {
            if mem::is_mapped(UNMAPPED_PROBE) {
                return Err(CommandError::Failed(format!(
                    "probe address {UNMAPPED_PROBE:#x} is mapped"
                )));
            }
            FaultKind::PageFault(UNMAPPED_PROBE)
        }
        ["fault", other] => {
            return Err(CommandError::BadArguments(format!(
                "unknown fault '{other}'"
            )))
        }
        _ => {
            return Err(CommandError::BadArguments(
                "expected 'fault <kind>' or 'panic'".into(),
            ))
        }
    };
    writeln!(out, "raising {fault} at {:#x}", fault.expected_address()).map_err(out_err)?;
    fault.raise();
    writeln!(out, "returned from {fault}").map_err(out_err)
}
