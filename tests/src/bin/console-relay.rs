//! console-relay: one node's serial console as a unix socket for any number of clients, and a
//! complete, exact log of everything the node printed.
//!
//! The emulator's serial port connects to the relay once, at start-up:
//! - Bochs: `com1: mode=socket-client, dev=127.0.0.1:PORT` (TCP only): the relay listens on
//!   127.0.0.1 with a port the kernel picks (`--node-tcp 127.0.0.1:0`);
//! - QEMU: `-chardev socket,id=con,path=NODE_SOCK` (client): the relay listens on the unix socket
//!   `--node-unix NODE_SOCK`.
//!
//! Once listening it writes `--ready-file` (whole, by rename): the TCP port, or `unix`. Then:
//! - it serves console clients on the unix socket `--unix`, any number of them, connecting and
//!   disconnecting as they like: everything the node sends goes to every connected client, and
//!   what any client sends goes to the node;
//! - it appends every byte the node sends to `--log`, whether or not a client is connected.
//!
//! Why not QEMU's own `-chardev socket,server=on,logfile=...`: measured with QEMU 7.2, its logfile
//! sometimes repeats a byte (`node11> `, `kernnel`) when the console client reads in bursts, while
//! the socket stream itself is right; and Bochs has no log at all. The relay always reads the
//! node at once, so the emulator never waits on a slow client, and logs what it read.
//!
//! It exits when the node closes its connection (the emulator stopped), and dies with SIGTERM
//! like any process (the launcher starts it with a parent-death signal).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

const USAGE: &str =
    "usage: console-relay --unix <console.sock> --log <node.log> --ready-file <file> \
                     (--node-tcp <127.0.0.1:port> | --node-unix <serial.sock>)";

struct Args {
    unix: PathBuf,
    log: PathBuf,
    ready_file: PathBuf,
    node: NodeSide,
}

enum NodeSide {
    Tcp(String),
    Unix(PathBuf),
}

fn parse_args() -> Result<Args, String> {
    let mut unix = None;
    let mut log = None;
    let mut ready_file = None;
    let mut node = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--unix" => unix = Some(PathBuf::from(value)),
            "--log" => log = Some(PathBuf::from(value)),
            "--ready-file" => ready_file = Some(PathBuf::from(value)),
            "--node-tcp" => node = Some(NodeSide::Tcp(value)),
            "--node-unix" => node = Some(NodeSide::Unix(PathBuf::from(value))),
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    Ok(Args {
        unix: unix.ok_or_else(|| format!("--unix is required\n{USAGE}"))?,
        log: log.ok_or_else(|| format!("--log is required\n{USAGE}"))?,
        ready_file: ready_file.ok_or_else(|| format!("--ready-file is required\n{USAGE}"))?,
        node: node.ok_or_else(|| format!("--node-tcp or --node-unix is required\n{USAGE}"))?,
    })
}

type Clients = Arc<Mutex<Vec<UnixStream>>>;

/// The node's end: a TCP or unix stream, read by the main loop, written by the input threads.
trait NodeStream: Read + Write + Send + 'static {}
impl NodeStream for TcpStream {}
impl NodeStream for UnixStream {}

type NodeWriter = Arc<OnceLock<Mutex<Box<dyn NodeStream>>>>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("console-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

enum NodeListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let (node_listener, ready) = match &args.node {
        NodeSide::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            let port = l
                .local_addr()
                .map_err(|e| format!("local address: {e}"))?
                .port();
            (NodeListener::Tcp(l), format!("{port}\n"))
        }
        NodeSide::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l =
                UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))?;
            (NodeListener::Unix(l, path.clone()), "unix\n".to_string())
        }
    };
    let _ = std::fs::remove_file(&args.unix);
    let console_listener =
        UnixListener::bind(&args.unix).map_err(|e| format!("bind {}: {e}", args.unix.display()))?;
    let mut log =
        File::create(&args.log).map_err(|e| format!("create {}: {e}", args.log.display()))?;

    // Announce readiness last: once the file exists, everything is listening.
    let tmp = args.ready_file.with_extension("tmp");
    std::fs::write(&tmp, ready)
        .and_then(|()| std::fs::rename(&tmp, &args.ready_file))
        .map_err(|e| format!("write {}: {e}", args.ready_file.display()))?;

    let clients: Clients = Arc::new(Mutex::new(Vec::new()));
    let node_writer: NodeWriter = Arc::new(OnceLock::new());

    {
        let clients = Arc::clone(&clients);
        let node_writer = Arc::clone(&node_writer);
        thread::spawn(move || accept_clients(console_listener, clients, node_writer));
    }

    let mut node: Box<dyn NodeStream> = match node_listener {
        NodeListener::Tcp(l) => {
            let (s, _) = l.accept().map_err(|e| format!("accept the node: {e}"))?;
            let _ = s.set_nodelay(true);
            let writer = s.try_clone().map_err(|e| format!("clone: {e}"))?;
            let _ = node_writer.set(Mutex::new(Box::new(writer)));
            Box::new(s)
        }
        NodeListener::Unix(l, path) => {
            let (s, _) = l.accept().map_err(|e| format!("accept the node: {e}"))?;
            let _ = std::fs::remove_file(path);
            let writer = s.try_clone().map_err(|e| format!("clone: {e}"))?;
            let _ = node_writer.set(Mutex::new(Box::new(writer)));
            Box::new(s)
        }
    };

    let mut buf = [0u8; 4096];
    loop {
        let n = match node.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let data = &buf[..n];
        log.write_all(data)
            .and_then(|()| log.flush())
            .map_err(|e| format!("write {}: {e}", args.log.display()))?;
        let mut list = clients.lock().unwrap_or_else(|p| p.into_inner());
        // A client that cannot take the output (gone, or stuck for seconds) is dropped.
        list.retain_mut(|c| c.write_all(data).is_ok());
    }

    // The node is gone: let the clients see end-of-file, as QEMU's socket does.
    let list = clients.lock().unwrap_or_else(|p| p.into_inner());
    for c in list.iter() {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    let _ = std::fs::remove_file(&args.unix);
    Ok(())
}

fn accept_clients(listener: UnixListener, clients: Clients, node_writer: NodeWriter) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
        let Ok(reader) = conn.try_clone() else {
            continue;
        };
        clients.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        let node_writer = Arc::clone(&node_writer);
        thread::spawn(move || forward_input(reader, node_writer));
    }
}

/// Copies what one console client types to the node, until the client goes away.
fn forward_input(mut client: UnixStream, node_writer: NodeWriter) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        // Input typed before the node connected waits for it (it connects at start-up).
        let node = loop {
            if let Some(node) = node_writer.get() {
                break node;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut node = node.lock().unwrap_or_else(|p| p.into_inner());
        if node
            .write_all(&buf[..n])
            .and_then(|()| node.flush())
            .is_err()
        {
            return;
        }
    }
}
