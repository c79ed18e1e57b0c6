//! An Ethernet switch for QEMU's `-netdev stream` NICs on a unix socket: the cluster link of
//! QEMU nodes (`qemu-run.sh`, the Linux baseline).
//!
//! Each QEMU connects to the switch's socket (`-netdev stream,server=off,addr.type=unix,...`)
//! and the connection is a switch port. QEMU frames its stream as a 4-byte big-endian length
//! followed by the Ethernet frame. The switch learns source MACs and sends a unicast frame to
//! the port that owns its destination, or floods it (broadcast, multicast, unknown MAC).
//!
//! Why not QEMU's own links: a node that listens while its peer connects (`server=on/off`)
//! blocks its vCPU thread in the socket send once the peer stops reading (QEMU 7.2 leaves that
//! socket blocking), so cutting one node's link froze the other; `-netdev socket` (TCP) held
//! frames up to ~40 ms (Nagle against delayed ACKs); `dgram` and vde drop frames under a 512 KiB
//! TCP window. Here every port has its own reader, which never waits for another port, and its
//! own writer with a bounded queue: a port whose QEMU stops reading (a node frozen, its NIC
//! link cut) loses the frames beyond its queue, as a real switch port would, and never slows
//! or blocks the others.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

/// Largest frame accepted from a port (QEMU's stream netdev carries frames up to 64 KiB with
/// offloads; an e1000 without them sends at most 1518 bytes). A longer length closes the port.
pub const MAX_FRAME: usize = 65536;

/// Default bytes queued for one port before its frames are dropped: four of the nodes' 1 MiB TCP
/// windows. A QEMU whose NIC ring is full stops reading its socket, so a port's queue holds what
/// the windows of the connections toward it put in flight: with a queue only as large as one
/// window, a bulk transfer lost frames and stalled for smoltcp's 1 s retransmission timeout.
pub const DEFAULT_PORT_QUEUE: usize = 4 << 20;

/// A bound switch; [`StreamSwitch::run`] accepts ports until the process ends.
pub struct StreamSwitch {
    listener: UnixListener,
    fabric: Arc<Fabric>,
}

/// Counts a running switch's ports: see [`StreamSwitch::ports`].
#[derive(Clone)]
pub struct PortCount(Arc<Fabric>);

impl PortCount {
    pub fn get(&self) -> usize {
        self.0.ports.lock().unwrap().len()
    }
}

/// What every port's reader shares: the live ports and the learned MAC table.
struct Fabric {
    ports: Mutex<Vec<Arc<Port>>>,
    macs: Mutex<HashMap<[u8; 6], usize>>,
    port_queue: usize,
}

/// The sending half of a port: readers queue frames in its outbox and send them once their
/// read is switched; what the socket does not take then is left to the port's own writer.
struct Port {
    id: usize,
    /// The port's connection: the readers' non-blocking sends (see [`Port::flush`]), the
    /// writer's blocking ones, and the shutdown when the port closes.
    stream: UnixStream,
    outbox: Mutex<Outbox>,
    wake: Condvar,
}

#[derive(Default)]
struct Outbox {
    /// Encoded records (length + frame) not yet written.
    queued: Vec<u8>,
    closed: bool,
    /// The writer is writing a batch it took from `queued` (frames may not overtake it).
    writing: bool,
    /// The last frame offered was dropped (for logging each episode once).
    dropping: bool,
    forwarded: u64,
    dropped: u64,
}

impl StreamSwitch {
    /// Listens on the unix socket `path` (which must not exist), queueing at most `port_queue`
    /// bytes for each port.
    pub fn bind(path: &Path, port_queue: usize) -> io::Result<StreamSwitch> {
        Ok(StreamSwitch {
            listener: UnixListener::bind(path)?,
            fabric: Arc::new(Fabric {
                ports: Mutex::new(Vec::new()),
                macs: Mutex::new(HashMap::new()),
                port_queue,
            }),
        })
    }

    /// A handle that counts the switch's connected ports (for callers waiting on peers).
    pub fn ports(&self) -> PortCount {
        PortCount(Arc::clone(&self.fabric))
    }

    /// Accepts ports (one reader and one writer thread each) until the listener fails.
    pub fn run(self) -> io::Result<()> {
        for (id, stream) in self.listener.incoming().enumerate() {
            let stream = stream?;
            let port = Arc::new(Port {
                id,
                stream: stream.try_clone()?,
                outbox: Mutex::new(Outbox::default()),
                wake: Condvar::new(),
            });
            self.fabric.ports.lock().unwrap().push(Arc::clone(&port));
            eprintln!("frame-hub: port {id} connected");
            let out = Arc::clone(&port);
            thread::spawn(move || write_port(&out));
            let fabric = Arc::clone(&self.fabric);
            thread::spawn(move || {
                let why = read_port(&fabric, id, stream);
                fabric.remove(&port);
                let _ = port.stream.shutdown(std::net::Shutdown::Both);
                let outbox = port.outbox.lock().unwrap();
                eprintln!(
                    "frame-hub: port {id} closed ({why}); {} frames delivered to it, {} dropped",
                    outbox.forwarded, outbox.dropped
                );
            });
        }
        Ok(())
    }
}

/// Reads frames from port `id` and switches them, until the peer closes or misbehaves.
fn read_port(fabric: &Fabric, id: usize, stream: UnixStream) -> String {
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let mut record = Vec::with_capacity(4 + MAX_FRAME);
    loop {
        let mut header = [0u8; 4];
        if let Err(e) = reader.read_exact(&mut header) {
            return match e.kind() {
                io::ErrorKind::UnexpectedEof => "end of stream".to_string(),
                _ => format!("read: {e}"),
            };
        }
        let len = u32::from_be_bytes(header) as usize;
        if len == 0 || len > MAX_FRAME {
            return format!("bad frame length {len}");
        }
        record.clear();
        record.extend_from_slice(&header);
        record.resize(4 + len, 0);
        if let Err(e) = reader.read_exact(&mut record[4..]) {
            return format!("truncated frame: {e}");
        }
        fabric.switch(id, &record);
        if !holds_a_frame(reader.buffer()) {
            // The frames one read brought are switched: one send per port for all of them.
            fabric.flush();
        }
    }
}

/// Whether `buffered` starts with a whole record (length + frame).
fn holds_a_frame(buffered: &[u8]) -> bool {
    match buffered.first_chunk::<4>() {
        Some(len) => buffered.len() >= 4 + u32::from_be_bytes(*len) as usize,
        None => false,
    }
}

/// Writes what is queued for `port`, a batch per system call, until the port closes.
fn write_port(port: &Port) {
    let mut stream = &port.stream;
    let mut batch = Vec::new();
    loop {
        {
            let mut outbox = port.outbox.lock().unwrap();
            while outbox.queued.is_empty() && !outbox.closed {
                outbox = port.wake.wait(outbox).unwrap();
            }
            if outbox.closed {
                return;
            }
            batch.clear();
            std::mem::swap(&mut batch, &mut outbox.queued);
            outbox.writing = true;
        }
        if stream.write_all(&batch).is_err() {
            port.close();
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        port.outbox.lock().unwrap().writing = false;
    }
}

/// Sends what `stream` takes of `bytes` now, without waiting: `Ok(0)` when its buffer is full.
fn send_now(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `bytes`, alive for the call; the descriptor
    // belongs to `stream`, open for the call. MSG_DONTWAIT makes this one call non-blocking
    // without changing the socket (the port's writer thread writes to it blocking);
    // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent >= 0 {
        return Ok(sent as usize);
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(0),
        _ => Err(e),
    }
}

impl Fabric {
    /// Queues `record` (length + frame) from port `from` on the ports it is for.
    fn switch(&self, from: usize, record: &[u8]) {
        let frame = &record[4..];
        let mut to = None;
        if frame.len() >= 14 {
            let dst: [u8; 6] = frame[..6].try_into().unwrap();
            let src: [u8; 6] = frame[6..12].try_into().unwrap();
            let mut macs = self.macs.lock().unwrap();
            if src[0] & 1 == 0 {
                macs.insert(src, from);
            }
            if dst[0] & 1 == 0 {
                to = macs.get(&dst).copied();
            }
        }
        if to == Some(from) {
            return; // for a station on the port it came from
        }
        for port in self.ports.lock().unwrap().iter() {
            if port.id != from && to.is_none_or(|t| t == port.id) {
                port.enqueue(record, self.port_queue);
            }
        }
    }

    /// Sends what the readers queued, on every port (see [`Port::flush`]).
    fn flush(&self) {
        for port in self.ports.lock().unwrap().iter() {
            port.flush();
        }
    }

    fn remove(&self, port: &Arc<Port>) {
        port.close();
        self.ports.lock().unwrap().retain(|p| p.id != port.id);
        self.macs.lock().unwrap().retain(|_, id| *id != port.id);
    }
}

impl Port {
    fn enqueue(&self, record: &[u8], limit: usize) {
        let mut outbox = self.outbox.lock().unwrap();
        if outbox.closed {
            return;
        }
        if outbox.queued.len() + record.len() > limit {
            // Said once per episode of drops (a node that stopped reading, or a burst larger
            // than the queue): losses explain TCP stalls on the link.
            if !outbox.dropping {
                eprintln!(
                    "frame-hub: port {}: queue full ({} bytes), dropping frames ({} so far)",
                    self.id,
                    outbox.queued.len(),
                    outbox.dropped
                );
            }
            outbox.dropping = true;
            outbox.dropped += 1;
            return;
        }
        outbox.dropping = false;
        outbox.forwarded += 1;
        outbox.queued.extend_from_slice(record);
    }

    /// Sends what is queued from the calling reader, without waiting: a hand-over to the
    /// writer thread costs two context switches, and at full speed (~80000 frames a second)
    /// those cost the emulators the cores they need. Under the lock, so nothing overtakes a
    /// batch the writer is writing; what the socket does not take now is left to the writer.
    fn flush(&self) {
        let mut outbox = self.outbox.lock().unwrap();
        if outbox.closed || outbox.writing || outbox.queued.is_empty() {
            return;
        }
        match send_now(&self.stream, &outbox.queued) {
            Ok(sent) => {
                outbox.queued.drain(..sent);
            }
            // The peer is gone: its reader closes the port.
            Err(_) => return,
        }
        if !outbox.queued.is_empty() {
            drop(outbox);
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        self.outbox.lock().unwrap().closed = true;
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    /// A switch running in the background on a socket in a directory of its own, which goes
    /// away with it (the switch's threads live on, on an unlinked socket, until the test ends).
    struct TestSwitch {
        dir: PathBuf,
        path: PathBuf,
        ports: PortCount,
    }

    impl Drop for TestSwitch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn switch(port_queue: usize) -> TestSwitch {
        let dir = std::env::temp_dir().join(format!(
            "switch-test-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("link.sock");
        let sw = StreamSwitch::bind(&path, port_queue).unwrap();
        let ports = sw.ports();
        thread::spawn(move || sw.run());
        TestSwitch { dir, path, ports }
    }

    /// Connects a port and waits until the switch has registered it: a frame sent before
    /// then would not reach the new port.
    fn connect(TestSwitch { path, ports, .. }: &TestSwitch) -> UnixStream {
        let before = ports.get();
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        while ports.get() == before {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "port not registered"
            );
            thread::sleep(Duration::from_millis(1));
        }
        s
    }

    fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    fn send(s: &mut UnixStream, frame: &[u8]) {
        let mut rec = (frame.len() as u32).to_be_bytes().to_vec();
        rec.extend_from_slice(frame);
        s.write_all(&rec).unwrap();
    }

    fn recv(s: &mut UnixStream) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f)?;
        Ok(f)
    }

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 1, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 1, 2];
    const C: [u8; 6] = [0x52, 0x54, 0, 0, 1, 3];
    const BROADCAST: [u8; 6] = [0xff; 6];

    #[test]
    fn frames_cross_in_both_directions_whole_and_in_order() {
        let sw = switch(DEFAULT_PORT_QUEUE);
        let mut a = connect(&sw);
        let mut b = connect(&sw);
        for i in 0..100u32 {
            let f = frame(B, A, &vec![i as u8; 60 + i as usize * 14]);
            send(&mut a, &f);
            assert_eq!(recv(&mut b).unwrap(), f);
        }
        let back = frame(A, B, b"reply");
        send(&mut b, &back);
        assert_eq!(recv(&mut a).unwrap(), back);
    }

    #[test]
    fn learned_unicast_goes_to_one_port_broadcast_to_all_others() {
        let sw = switch(DEFAULT_PORT_QUEUE);
        let mut a = connect(&sw);
        let mut b = connect(&sw);
        let mut c = connect(&sw);
        // B and C announce themselves: the others see each broadcast, the sender does not.
        let hello_b = frame(BROADCAST, B, b"arp b");
        send(&mut b, &hello_b);
        assert_eq!(recv(&mut a).unwrap(), hello_b);
        assert_eq!(recv(&mut c).unwrap(), hello_b);
        let hello_c = frame(BROADCAST, C, b"arp c");
        send(&mut c, &hello_c);
        assert_eq!(recv(&mut a).unwrap(), hello_c);
        assert_eq!(recv(&mut b).unwrap(), hello_c);
        // A -> B and A -> C: each is the next frame its station reads, so neither unicast
        // reached the other station.
        let to_b = frame(B, A, b"to b");
        let to_c = frame(C, A, b"to c");
        send(&mut a, &to_b);
        send(&mut a, &to_c);
        assert_eq!(recv(&mut b).unwrap(), to_b);
        assert_eq!(recv(&mut c).unwrap(), to_c);
        // Unknown destination: flooded.
        let unknown = frame([0x52, 0x54, 0, 0, 9, 9], C, b"who");
        send(&mut c, &unknown);
        assert_eq!(recv(&mut a).unwrap(), unknown);
        assert_eq!(recv(&mut b).unwrap(), unknown);
    }

    #[test]
    fn frames_keep_their_order_between_sent_at_once_and_queued() {
        // A queue large enough to drop nothing; the receiver starts late and reads in bursts,
        // so frames go out directly, partly, through the writer, and directly again.
        let sw = switch(64 << 20);
        let mut a = connect(&sw);
        let mut b = connect(&sw);
        let count = 3000u32;
        let sender = thread::spawn(move || {
            for i in 0..count {
                let mut payload = i.to_be_bytes().to_vec();
                payload.resize(1400 + (i as usize * 7) % 100, i as u8);
                send(&mut a, &frame(B, A, &payload));
            }
            a
        });
        thread::sleep(Duration::from_millis(300));
        for i in 0..count {
            if i % 500 == 0 {
                thread::sleep(Duration::from_millis(20));
            }
            let f = recv(&mut b).unwrap();
            assert_eq!(f[14..18], i.to_be_bytes(), "frame {i} out of order");
            assert_eq!(f.len(), 14 + 1400 + (i as usize * 7) % 100);
        }
        sender.join().unwrap();
    }

    #[test]
    fn a_port_that_stops_reading_loses_frames_and_never_blocks_the_sender() {
        let queue = 64 * 1024;
        let sw = switch(queue);
        let mut a = connect(&sw);
        let mut b = connect(&sw); // never reads until the end
        let f = frame(B, A, &[7u8; 1500]);
        // Far more than the socket buffers and the port queue together; the writes complete
        // because the switch keeps reading A whatever B does (a blocked write would hang the
        // test, whose runner reports it).
        for _ in 0..20_000 {
            send(&mut a, &f);
        }
        // A still reaches B's side of the switch afterwards, and B can drain what was kept.
        let started = Instant::now();
        let mut got = 0;
        b.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while recv(&mut b).is_ok() {
            got += 1;
            assert!(started.elapsed() < Duration::from_secs(60));
        }
        assert!(got > 0, "B got nothing");
        assert!(got < 20_000, "B got every frame: nothing was dropped");
    }

    #[test]
    fn a_malformed_or_closed_port_leaves_the_others_linked() {
        let sw = switch(DEFAULT_PORT_QUEUE);
        let mut a = connect(&sw);
        let mut b = connect(&sw);
        let mut bad = connect(&sw);
        bad.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            bad.read(&mut buf).unwrap(),
            0,
            "the switch did not close the bad port"
        );
        let gone = connect(&sw);
        drop(gone);
        let started = Instant::now();
        while sw.ports.get() > 2 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "closed ports stay"
            );
            thread::sleep(Duration::from_millis(1));
        }
        let f = frame(BROADCAST, A, b"still here");
        send(&mut a, &f);
        assert_eq!(recv(&mut b).unwrap(), f);
    }
}
