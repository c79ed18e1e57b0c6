//! frame-hub: links the NICs of emulated nodes on 127.0.0.1 (see `tests::hub`).
//!
//! `frame-hub --link HUB_PORT:NODE_PORT ... [--ready-file FILE]`: for each link, receives the
//! node's frames on 127.0.0.1:HUB_PORT and sends it the other nodes' frames at
//! 127.0.0.1:NODE_PORT. A Bochs NIC with `ethmod=socket, ethdev=P` is the link `P+1:P`.
//! Writes FILE once every port is bound; runs until killed.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use tests::hub::{Hub, Link};

const USAGE: &str = "usage: frame-hub --link HUB_PORT:NODE_PORT ... [--ready-file FILE]";

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
            "--ready-file" => ready_file = Some(value),
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if links.len() < 2 {
        return Err(format!("a hub needs at least two links\n{USAGE}"));
    }
    let hub = Hub::bind(&links).map_err(|e| format!("bind: {e}"))?;
    if let Some(file) = ready_file {
        std::fs::write(&file, "ready\n").map_err(|e| format!("write {file}: {e}"))?;
    }
    for handle in hub.spawn() {
        let _ = handle.join();
    }
    Ok(())
}
