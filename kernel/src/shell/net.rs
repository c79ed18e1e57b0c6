//! The `net`, `ping` and `pci` console commands.
//!
//! `net bench` and `net send` are console jobs like `ping` (the loop prints their progress;
//! Ctrl-C stops them). `net connect` blocks the console (not the VMs) for at most its timeouts.

use alloc::format;
use alloc::string::{String, ToString};
use core::fmt::Write;

use ::net::addr::Ipv4;
use ::net::bench::{self, Limit};
use ::net::dhcp::DhcpLine;
use ::net::e1000::{Mac, BUF_SIZE};
use ::net::neighbors::NeighborLine;
use ::net::ping::{DEFAULT_COUNT, MAX_COUNT};
use kernel::console::shell::{parse_number, CommandError};

use super::Node;
use crate::net;
use crate::pci;

type Result = core::result::Result<(), CommandError>;

pub const NET_USAGE: &str = "[show | arp | bench <address|node> [seconds] | \
send <address|node> <MiB> | connect <address|node> <port> [text...]]";
pub const PING_USAGE: &str = "<address|node> [count]";

fn out_err(_: core::fmt::Error) -> CommandError {
    CommandError::Failed("console write failed".into())
}

fn bad(text: String) -> CommandError {
    CommandError::BadArguments(text)
}

/// `net [show]`, `net arp`.
pub fn net_cmd(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    match args {
        [] | ["show"] => show(node, out).map_err(out_err),
        ["arp"] => arp(node, out).map_err(out_err),
        ["bench", rest @ ..] => bench_cmd(node, rest, out),
        ["send", rest @ ..] => send_cmd(node, rest, out),
        ["connect", rest @ ..] => connect_cmd(node, rest, out),
        [other, ..] => Err(bad(format!("unknown subcommand '{other}'"))),
    }
}

fn show(node: &mut Node, out: &mut dyn Write) -> core::fmt::Result {
    let Some(status) = node.net.status() else {
        return writeln!(out, "no network interface: {}", node.net.missing_reason());
    };
    let Some(iface) = node.net.iface() else {
        return Ok(());
    };
    show_iface(iface, &status, out)?;
    if let Some(served) = node.net.bench_served() {
        writeln!(
            out,
            "  bench listener: tcp port {}, {served} transfers served",
            bench::PORT
        )?;
    }
    if node.config.peers.is_empty() {
        writeln!(out, "  peers: none configured")?;
    } else {
        write!(out, "  peers:")?;
        for peer in &node.config.peers {
            write!(out, " {}={}", peer.name, peer.addr)?;
        }
        writeln!(out)?;
    }
    if let Some(status) = node.net.storage_status() {
        if let Some(iface) = node.net.storage() {
            show_iface(iface, &status, out)?;
        }
    }
    Ok(())
}

fn show_iface(
    iface: &net::Iface,
    status: &net::IfaceStatus,
    out: &mut dyn Write,
) -> core::fmt::Result {
    writeln!(
        out,
        "{} ({}): {} {} at {}, registers at {:#x}",
        iface.name, iface.role, iface.driver, iface.model, iface.pci, iface.bar
    )?;
    writeln!(
        out,
        "  mac {} ({}), link {}",
        Mac(status.mac),
        match iface.mac_source {
            ::net::e1000::MacSource::Registers => "registers",
            ::net::e1000::MacSource::Eeprom => "EEPROM",
        },
        if status.link_up { "up" } else { "down" }
    )?;
    match (status.addr, &status.dhcp) {
        (Some(addr), None) => writeln!(out, "  inet {addr}")?,
        (None, None) => writeln!(out, "  inet none (set {})", iface.addr_key)?,
        (addr, Some(dhcp)) => {
            match addr {
                Some(addr) => writeln!(out, "  inet {addr} (dhcp)")?,
                None => writeln!(out, "  inet none (dhcp)")?,
            }
            writeln!(
                out,
                "  {}",
                DhcpLine {
                    state: dhcp,
                    now: net::now()
                }
            )?;
        }
    }
    writeln!(
        out,
        "  rings: rx {} tx {} descriptors, {BUF_SIZE}-byte buffers",
        status.rings.0, status.rings.1
    )?;
    writeln!(out, "  interrupts: {}", iface.irq)?;
    let c = status.counters;
    writeln!(
        out,
        "  rx: {} packets, {} bytes, {} errors, {} missed",
        c.rx_packets, c.rx_bytes, c.rx_errors, c.rx_missed
    )?;
    writeln!(
        out,
        "  tx: {} packets, {} bytes, {} dropped",
        c.tx_packets, c.tx_bytes, c.tx_dropped
    )
}

fn arp(node: &mut Node, out: &mut dyn Write) -> core::fmt::Result {
    let Some(iface) = node.net.iface() else {
        return writeln!(out, "no network interface: {}", node.net.missing_reason());
    };
    let name = iface.name;
    let neighbors = node.net.neighbors();
    writeln!(out, "neighbor cache of {name}: {} entries", neighbors.len())?;
    let now = net::now();
    for neighbor in &neighbors {
        write!(out, "  {}", NeighborLine { neighbor, now })?;
        match node.config.peer_name(neighbor.ip) {
            Some(peer) => writeln!(out, "  ({peer})")?,
            None => writeln!(out)?,
        }
    }
    if let Some(storage) = node.net.storage() {
        let name = storage.name;
        let neighbors = node.net.storage_neighbors();
        writeln!(out, "neighbor cache of {name}: {} entries", neighbors.len())?;
        for neighbor in &neighbors {
            writeln!(out, "  {}", NeighborLine { neighbor, now })?;
        }
    }
    Ok(())
}

/// Resolves a ping target: an address, a peer's name, or this node's own name.
pub(super) fn resolve(
    node: &Node,
    target: &str,
) -> core::result::Result<(Ipv4, String), CommandError> {
    if target.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        let ip = Ipv4::parse(target).map_err(|e| bad(format!("'{}': {e}", shorten(target))))?;
        return Ok((ip, target.to_string()));
    }
    if let Some(ip) = node.config.peer_addr(target) {
        return Ok((ip, target.to_string()));
    }
    if target == node.config.name {
        if let Some(own) = node.config.cluster_addr {
            return Ok((own.addr, target.to_string()));
        }
    }
    let known: String = node
        .config
        .peers
        .iter()
        .map(|p| p.name.as_str())
        .collect::<alloc::vec::Vec<_>>()
        .join(", ");
    Err(CommandError::Failed(format!(
        "unknown host '{}': not an IPv4 address nor a configured peer ({})",
        shorten(target),
        if known.is_empty() {
            String::from("no peers configured")
        } else {
            format!("peers: {known}")
        }
    )))
}

/// At most 32 characters of user input in a message.
pub(super) fn shorten(text: &str) -> String {
    let mut s: String = text.chars().take(32).collect();
    if text.chars().count() > 32 {
        s.push_str("...");
    }
    s
}

/// `ping <address|node> [count]`: starts the job; the console loop prints its replies.
pub fn ping(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    let (target, count) = match args {
        [target] => (*target, u64::from(DEFAULT_COUNT)),
        [target, count] => (*target, parse_number("count", count)?),
        [] => return Err(bad("missing the address or node to ping".into())),
        _ => return Err(bad("too many arguments".into())),
    };
    if !(1..=u64::from(MAX_COUNT)).contains(&count) {
        return Err(bad(format!("count must be 1 to {MAX_COUNT}, not {count}")));
    }
    let (ip, label) = resolve(node, target)?;
    let header = node
        .net
        .start_ping(ip, &label, count as u32)
        .map_err(CommandError::Failed)?;
    writeln!(out, "{header}").map_err(out_err)
}

/// `net bench <address|node> [seconds]`: TCP throughput to the peer's bench listener.
fn bench_cmd(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    let (target, seconds) = match args {
        [target] => (*target, u64::from(bench::DEFAULT_SECONDS)),
        [target, seconds] => (*target, parse_number("seconds", seconds)?),
        [] => return Err(bad("missing the address or node".into())),
        _ => return Err(bad("too many arguments".into())),
    };
    if !(1..=u64::from(bench::MAX_SECONDS)).contains(&seconds) {
        return Err(bad(format!(
            "seconds must be 1 to {}, not {seconds}",
            bench::MAX_SECONDS
        )));
    }
    start_bench(node, target, Limit::Seconds(seconds as u32), out)
}

/// `net send <address|node> <MiB>`: sends that much to the peer's bench listener, which
/// returns its count and checksum of what arrived.
fn send_cmd(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    let (target, mib) = match args {
        [target, mib] => (*target, parse_number("MiB", mib)?),
        [] | [_] => return Err(bad("needs an address or node and a size in MiB".into())),
        _ => return Err(bad("too many arguments".into())),
    };
    if !(1..=u64::from(bench::MAX_MIB)).contains(&mib) {
        return Err(bad(format!(
            "MiB must be 1 to {}, not {mib}",
            bench::MAX_MIB
        )));
    }
    start_bench(node, target, Limit::Bytes(mib << 20), out)
}

fn start_bench(node: &mut Node, target: &str, limit: Limit, out: &mut dyn Write) -> Result {
    let (ip, label) = resolve(node, target)?;
    let header = node
        .net
        .start_bench(ip, &label, limit)
        .map_err(CommandError::Failed)?;
    writeln!(out, "{header}").map_err(out_err)
}

/// `net connect <address|node> <port> [text...]`: opens a TCP connection, sends the text and a
/// newline, prints the answer that arrives within a second.
fn connect_cmd(node: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    let (target, port, words) = match args {
        [target, port, words @ ..] => (*target, parse_number("port", port)?, words),
        _ => return Err(bad("needs an address or node and a port".into())),
    };
    if !(1..=65535).contains(&port) {
        return Err(bad(format!("port must be 1 to 65535, not {port}")));
    }
    let (ip, label) = resolve(node, target)?;
    let mut text = words.join(" ");
    text.push('\n');
    let Node { net, vms, .. } = node;
    let mut idler = super::Idler::new();
    let mut idle = || idler.idle(vms);
    let (local, reply) = net
        .send_text(
            ip,
            port as u16,
            text.as_bytes(),
            core::time::Duration::from_secs(1),
            &mut idle,
        )
        .map_err(CommandError::Failed)?;
    (|| {
        writeln!(
            out,
            "connected to {label} ({ip}) port {port} from port {local}: sent {} bytes",
            text.len()
        )?;
        match reply {
            Some(reply) => writeln!(out, "reply: {}", reply.trim_end()),
            None => writeln!(out, "no reply within 1 s"),
        }
    })()
    .map_err(out_err)
}

/// `pci`: the functions found at boot.
pub fn pci_cmd(_: &mut Node, args: &[&str], out: &mut dyn Write) -> Result {
    if let Some(arg) = args.first() {
        return Err(bad(format!("unexpected argument '{arg}'")));
    }
    let functions = pci::functions();
    (|| {
        writeln!(out, "{} PCI functions:", functions.len())?;
        for f in functions {
            writeln!(out, "  {f}")?;
        }
        Ok(())
    })()
    .map_err(out_err)
}
