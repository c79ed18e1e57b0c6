//! frame-hub: links the NICs of emulated nodes.
//!
//! `frame-hub --link HUB_PORT:NODE_PORT ... [--ready-file FILE]`: a hub over UDP on 127.0.0.1
//! (see `tests::hub`): for each link, receives the node's frames on 127.0.0.1:HUB_PORT and sends
//! it the other nodes' frames at 127.0.0.1:NODE_PORT. A Bochs NIC with `ethmod=socket,
//! ethdev=P` is the link `P+1:P`.
//!
//! `frame-hub --stream PATH [--ready-file FILE]`: a learning switch on the unix socket PATH
//! for QEMU's `-netdev stream,server=off,addr.type=unix,addr.path=PATH` (see `tests::switch`).
//!
//! Writes FILE once listening; runs until killed.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use tests::hub::{Hub, Link};
use tests::switch::{StreamSwitch, DEFAULT_PORT_QUEUE};

const USAGE: &str = "usage: frame-hub --link HUB_PORT:NODE_PORT ... [--ready-file FILE]\n       \
                     frame-hub --stream PATH [--ready-file FILE]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("frame-hub: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut links = Vec::new();
    let mut ready_file = None;
    let mut stream = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--link" => {
                let (hub, node) = value
                    .split_once(':')
                    .and_then(|(h, n)| Some((h.parse::<u16>().ok()?, n.parse::<u16>().ok()?)))
                    .ok_or_else(|| format!("bad link '{value}'\n{USAGE}"))?;
                let at = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                links.push(Link {
                    bind: at(hub),
                    node: at(node),
                });
            }
            "--stream" => stream = Some(value),
            "--ready-file" => ready_file = Some(value),
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    let ready = |file: Option<String>| match file {
        Some(file) => std::fs::write(&file, "ready\n").map_err(|e| format!("write {file}: {e}")),
        None => Ok(()),
    };
    if let Some(path) = stream {
        if !links.is_empty() {
            return Err(format!("--stream and --link do not mix\n{USAGE}"));
        }
        let switch = StreamSwitch::bind(path.as_ref(), DEFAULT_PORT_QUEUE)
            .map_err(|e| format!("listen on {path}: {e}"))?;
        ready(ready_file)?;
        return switch.run().map_err(|e| format!("accept on {path}: {e}"));
    }
    if links.len() < 2 {
        return Err(format!("a hub needs at least two links\n{USAGE}"));
    }
    let hub = Hub::bind(&links).map_err(|e| format!("bind: {e}"))?;
    ready(ready_file)?;
    for handle in hub.spawn() {
        let _ = handle.join();
    }
    Ok(())
}
