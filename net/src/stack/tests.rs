//! Two interfaces over two e1000 device models, wired back to back, in simulated time.

use alloc::rc::Rc;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::time::Instant;

use super::*;
use crate::e1000::fake::{device, FakeMem, FakeRegs, Model};
use crate::e1000::{E1000Config, E1000};
use crate::neighbors::tests::arp;

type Nic = E1000<FakeRegs, FakeMem>;

struct Node {
    model: Rc<RefCell<Model>>,
    stack: Stack<Nic>,
}

fn node(k: u8, addr: Option<&str>) -> Node {
    let mac = [0x52, 0x54, 0, 0, 1, k];
    let (model, regs, rx, tx) = device(mac, 32, 32);
    let nic = E1000::new(
        regs,
        rx,
        tx,
        E1000Config {
            rx_descriptors: 32,
            tx_descriptors: 32,
        },
    )
    .unwrap();
    let addr = addr.map(|a| Ipv4Net::parse(a).unwrap());
    let stack = Stack::new(nic, mac, addr, Instant::from_millis(0), u64::from(k));
    Node { model, stack }
}

struct Link {
    a: Node,
    b: Node,
    now: Instant,
    /// Frames that crossed the wire each way.
    a_to_b: usize,
    b_to_a: usize,
}

impl Link {
    fn new() -> Link {
        Link {
            a: node(1, Some("10.10.0.1/24")),
            b: node(2, Some("10.10.0.2/24")),
            now: Instant::from_millis(0),
            a_to_b: 0,
            b_to_a: 0,
        }
    }

    fn wire(from: &Rc<RefCell<Model>>, to: &Rc<RefCell<Model>>) -> usize {
        let frames: Vec<Vec<u8>> = core::mem::take(&mut from.borrow_mut().sent);
        let n = frames.len();
        for f in frames {
            to.borrow_mut().deliver(&f);
        }
        n
    }

    /// One millisecond: both nodes poll, the wire carries what they sent.
    fn step(&mut self) {
        self.now += smoltcp::time::Duration::from_millis(1);
        self.a.stack.poll(self.now, 64);
        self.b.stack.poll(self.now, 64);
        self.a_to_b += Self::wire(&self.a.model, &self.b.model);
        self.b_to_a += Self::wire(&self.b.model, &self.a.model);
    }

    /// Runs until A's ping job ends (bounded); returns its printed lines and summary.
    fn run_ping(&mut self) -> (Vec<String>, PingSummary) {
        let mut lines = Vec::new();
        for _ in 0..60_000 {
            self.step();
            let (events, summary) = self.a.stack.ping_output(self.now);
            lines.extend(events.iter().map(|e| e.to_string()));
            if let Some(s) = summary {
                return (lines, s);
            }
        }
        panic!("ping did not end: {lines:?}");
    }
}

#[test]
fn two_nodes_ping_each_other() {
    let mut link = Link::new();
    let header = link
        .a
        .stack
        .start_ping(Ipv4([10, 10, 0, 2]), "node2", 3, link.now)
        .unwrap();
    assert_eq!(header, "PING node2 (10.10.0.2): 56 data bytes");
    assert!(link.a.stack.ping_active());
    let (lines, summary) = link.run_ping();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.starts_with(&alloc::format!(
                "64 bytes from 10.10.0.2: icmp_seq={} time=",
                i + 1
            )),
            "{line}"
        );
    }
    assert_eq!((summary.transmitted, summary.received), (3, 3));
    assert!(!link.a.stack.ping_active());
    // Both learned each other's MAC (A from B's ARP reply, B from A's request).
    let now = link.now;
    let a_neighbors = link.a.stack.neighbors(now);
    assert_eq!(a_neighbors.len(), 1);
    assert_eq!(a_neighbors[0].ip, Ipv4([10, 10, 0, 2]));
    assert_eq!(a_neighbors[0].mac, [0x52, 0x54, 0, 0, 1, 2]);
    assert_eq!(link.b.stack.neighbors(now)[0].ip, Ipv4([10, 10, 0, 1]));
    // ARP request + reply, then 3 requests and 3 replies.
    assert_eq!((link.a_to_b, link.b_to_a), (4, 4));
    let c = link.a.stack.device_mut().counters();
    assert_eq!((c.tx_packets, c.rx_packets), (4, 4));
    assert_eq!(c.tx_bytes, 42 + 3 * 98);

    // And back, by the other side, now that ARP is resolved both ways.
    link.b
        .stack
        .start_ping(Ipv4([10, 10, 0, 1]), "10.10.0.1", 2, link.now)
        .unwrap();
    let mut lines = Vec::new();
    let summary = loop {
        link.step();
        let (events, summary) = link.b.stack.ping_output(link.now);
        lines.extend(events.iter().map(|e| e.to_string()));
        if let Some(s) = summary {
            break s;
        }
    };
    assert_eq!((summary.transmitted, summary.received), (2, 2), "{lines:?}");
    assert!(summary
        .to_string()
        .starts_with("--- 10.10.0.1 ping statistics ---"));
}

#[test]
fn a_silent_peer_times_out() {
    let mut link = Link::new();
    let start = link.now;
    link.a
        .stack
        .start_ping(Ipv4([10, 10, 0, 9]), "node9", 2, link.now)
        .unwrap();
    let (lines, summary) = link.run_ping();
    assert_eq!(
        lines,
        [
            "no reply for icmp_seq=1 (timeout 2 s)",
            "no reply for icmp_seq=2 (timeout 2 s)"
        ]
    );
    assert!(summary.all_lost());
    assert_eq!(summary.transmitted, 2);
    // Second request at +1 s, its timeout at +3 s.
    let took = (link.now - start).total_millis();
    assert!((3000..3100).contains(&took), "{took}");
    // Only ARP requests went out (smoltcp rate-limits them to one per second).
    assert!((1..=4).contains(&link.a_to_b), "{}", link.a_to_b);
    // The socket is gone: a new job can start.
    assert!(link
        .a
        .stack
        .start_ping(Ipv4([10, 10, 0, 2]), "node2", 1, link.now)
        .is_ok());
}

#[test]
fn bad_targets_are_refused() {
    let mut link = Link::new();
    let now = link.now;
    let a = &mut link.a.stack;
    assert_eq!(
        a.start_ping(Ipv4([10, 10, 0, 1]), "", 1, now),
        Err(PingError::OwnAddress(Ipv4([10, 10, 0, 1])))
    );
    let err = a.start_ping(Ipv4([10, 20, 0, 1]), "", 1, now).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no route to 10.20.0.1: it is outside the cluster network 10.10.0.0/24"
    );
    assert_eq!(
        a.start_ping(Ipv4([10, 10, 0, 255]), "", 1, now),
        Err(PingError::NotUnicast(Ipv4([10, 10, 0, 255])))
    );
    assert_eq!(
        a.start_ping(Ipv4([224, 0, 0, 1]), "", 1, now),
        Err(PingError::NotUnicast(Ipv4([224, 0, 0, 1])))
    );
    assert!(matches!(
        a.start_ping(Ipv4([10, 10, 0, 2]), "", 0, now),
        Err(PingError::Count(_))
    ));
    a.start_ping(Ipv4([10, 10, 0, 2]), "", 5, now).unwrap();
    assert_eq!(
        a.start_ping(Ipv4([10, 10, 0, 3]), "", 1, now),
        Err(PingError::Busy)
    );
    let summary = a.cancel_ping(now).unwrap();
    assert_eq!(summary.received, 0);
    assert!(a.cancel_ping(now).is_none());

    let mut bare = node(3, None);
    assert_eq!(
        bare.stack.start_ping(Ipv4([10, 10, 0, 2]), "", 1, now),
        Err(PingError::NoAddress)
    );
    assert!(PingError::NoAddress.to_string().contains("cluster_addr"));
}

#[test]
fn polling_is_bounded_and_garbage_is_harmless() {
    let mut link = Link::new();
    // 31 junk frames fill B's receive ring (32 descriptors, one kept empty).
    let mut x = 0x1234_5678_9ABC_DEF0u64;
    for i in 0..31 {
        let mut f: Vec<u8> = (0..(14 + (i * 37) % 1500))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // Some of them claim to be ARP or IPv4 for B.
        if f.len() > 14 && i % 3 == 0 {
            f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 1, 2]);
            f[12..14].copy_from_slice(if i % 2 == 0 {
                &[0x08, 0x06]
            } else {
                &[0x08, 0x00]
            });
        }
        assert!(link.b.model.borrow_mut().deliver(&f));
    }
    let out = link.b.stack.poll(Instant::from_millis(1), 10);
    assert_eq!(
        out,
        PollOutcome {
            frames: 10,
            more: true
        }
    );
    let out = link.b.stack.poll(Instant::from_millis(1), 100);
    assert_eq!(
        out,
        PollOutcome {
            frames: 21,
            more: false
        }
    );
    assert_eq!(
        link.b.stack.poll(Instant::from_millis(1), 100),
        PollOutcome::default()
    );
    // An ARP request aimed at B, from a sender outside its subnet, is ignored...
    let outsider = arp(1, [2, 0, 0, 0, 0, 9], [10, 99, 0, 9], [10, 10, 0, 2]);
    link.b.model.borrow_mut().deliver(&outsider);
    link.b.stack.poll(Instant::from_millis(2), 10);
    assert!(link.b.stack.neighbors(Instant::from_millis(2)).is_empty());
    // ... and B still answers pings.
    link.a
        .stack
        .start_ping(Ipv4([10, 10, 0, 2]), "node2", 1, link.now)
        .unwrap();
    let (_, summary) = link.run_ping();
    assert_eq!(summary.received, 1);
}

#[test]
fn changing_the_address_flushes_neighbors() {
    let mut link = Link::new();
    link.a
        .stack
        .start_ping(Ipv4([10, 10, 0, 2]), "node2", 1, link.now)
        .unwrap();
    link.run_ping();
    assert_eq!(link.a.stack.neighbors(link.now).len(), 1);
    let new = Ipv4Net::parse("10.10.0.5/24").unwrap();
    link.a.stack.set_address(Some(new));
    assert_eq!(link.a.stack.address(), Some(new));
    assert!(link.a.stack.neighbors(link.now).is_empty());
    // B reaches A at its new address.
    link.b
        .stack
        .start_ping(Ipv4([10, 10, 0, 5]), "node1", 1, link.now)
        .unwrap();
    let summary = loop {
        link.step();
        if let (_, Some(s)) = link.b.stack.ping_output(link.now) {
            break s;
        }
    };
    assert_eq!(summary.received, 1);
    assert_eq!(link.a.stack.mac(), [0x52, 0x54, 0, 0, 1, 1]);
}

mod tcp {
    use alloc::string::String;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::cell::Cell;
    use core::time::Duration;

    use super::*;
    use crate::bench::{self, Limit};
    use crate::transport::{Transport, TransportError};

    const NODE2: Ipv4 = Ipv4([10, 10, 0, 2]);

    /// Runs until A's bench job ends (bounded); returns its lines and result.
    fn run_bench(link: &mut Link) -> (Vec<String>, Result<String, String>) {
        let mut lines = Vec::new();
        for _ in 0..600_000 {
            link.step();
            let (more, outcome) = link.a.stack.bench_output();
            lines.extend(more);
            if let Some(outcome) = outcome {
                assert!(!link.a.stack.bench_active());
                return (lines, outcome);
            }
        }
        panic!("bench did not end: {lines:?}");
    }

    #[test]
    fn bench_sends_and_the_checksums_match() {
        let mut link = Link::new();
        link.b.stack.start_bench_listener();
        let header = link
            .a
            .stack
            .start_bench(NODE2, "node2", Limit::Bytes(3 << 20), link.now)
            .unwrap();
        assert_eq!(
            header,
            "BENCH node2 (10.10.0.2) port 5001: sending 3145728 bytes"
        );
        let (lines, outcome) = run_bench(&mut link);
        let summary = outcome.unwrap();
        assert!(
            summary.contains("3145728 bytes in") && summary.contains("intact"),
            "{summary}"
        );
        assert!(summary.contains(" MB/s;"), "{summary}");
        assert!(
            lines.iter().all(|l| l.contains("bytes acknowledged")),
            "{lines:?}"
        );
        // Let the connection finish closing; the listener takes the next client.
        for _ in 0..100 {
            link.step();
        }
        assert_eq!(link.b.stack.bench_served(), Some(1));
        link.a
            .stack
            .start_bench(NODE2, "node2", Limit::Seconds(2), link.now)
            .unwrap();
        let (lines, outcome) = run_bench(&mut link);
        assert!(outcome.unwrap().contains("intact"));
        assert!(!lines.is_empty(), "no progress lines: {lines:?}");
        assert!(lines[0].starts_with("[  1.0 s] "), "{lines:?}");
        for _ in 0..100 {
            link.step();
        }
        assert_eq!(link.b.stack.bench_served(), Some(2));
    }

    #[test]
    fn bench_errors_are_clear() {
        let mut link = Link::new();
        // No listener on node2: refused.
        link.a
            .stack
            .start_bench(NODE2, "node2", Limit::Seconds(1), link.now)
            .unwrap();
        assert_eq!(
            link.a
                .stack
                .start_bench(NODE2, "node2", Limit::Seconds(1), link.now),
            Err(ConnectError::Busy)
        );
        let err = run_bench(&mut link).1.unwrap_err();
        assert!(err.contains("connection refused by 10.10.0.2"), "{err}");
        // Nobody there: unreachable.
        link.a
            .stack
            .start_bench(
                Ipv4([10, 10, 0, 9]),
                "10.10.0.9",
                Limit::Seconds(1),
                link.now,
            )
            .unwrap();
        let err = run_bench(&mut link).1.unwrap_err();
        assert!(
            err.contains("no answer from 10.10.0.9 within 5 s: host unreachable"),
            "{err}"
        );
        for (target, want) in [
            (Ipv4([10, 10, 0, 1]), "own address"),
            (Ipv4([10, 20, 0, 1]), "no route to 10.20.0.1"),
            (Ipv4([10, 10, 0, 255]), "not a host address"),
        ] {
            let err = link
                .a
                .stack
                .start_bench(target, "x", Limit::Seconds(1), link.now)
                .unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn cancelling_a_bench_frees_the_listener() {
        let mut link = Link::new();
        link.b.stack.start_bench_listener();
        link.a
            .stack
            .start_bench(NODE2, "node2", Limit::Seconds(100), link.now)
            .unwrap();
        for _ in 0..500 {
            link.step();
        }
        let line = link.a.stack.cancel_bench(link.now).unwrap();
        assert!(line.contains("bench cancelled"), "{line}");
        assert!(!link.a.stack.bench_active());
        for _ in 0..100 {
            link.step();
        }
        link.a
            .stack
            .start_bench(NODE2, "node2", Limit::Bytes(100_000), link.now)
            .unwrap();
        let summary = run_bench(&mut link).1.unwrap();
        // Exactly the bytes asked for, although the socket takes more than one pattern chunk
        // (64 KiB) at once.
        assert!(
            summary.contains("100000 bytes in") && summary.contains("intact"),
            "{summary}"
        );
    }

    /// A's transport with B (and the wire) run by the idle hook, in simulated time; `serve`
    /// runs on B's side every millisecond.
    fn with_transport<R>(
        link: &mut Link,
        target: Ipv4,
        port: u16,
        mut serve: impl FnMut(&mut Stack<Nic>),
        body: impl FnOnce(Result<&mut dyn Transport, TransportError>) -> R,
    ) -> R {
        let now = Cell::new(link.now);
        let Link { a, b, .. } = link;
        let (a_model, b_model) = (a.model.clone(), b.model.clone());
        let idle = || {
            now.set(now.get() + smoltcp::time::Duration::from_millis(1));
            b.stack.poll(now.get(), 64);
            serve(&mut b.stack);
            b.stack.poll(now.get(), 64);
            Link::wire(&a_model, &b_model);
            Link::wire(&b_model, &a_model);
        };
        let t = TcpTransport::connect(
            &mut a.stack,
            target,
            port,
            Duration::from_secs(3),
            || now.get(),
            idle,
        );
        match t {
            Ok(mut t) => body(Ok(&mut t)),
            Err(e) => body(Err(e)),
        }
    }

    #[test]
    fn transport_moves_bytes_both_ways_with_timeouts() {
        let mut link = Link::new();
        let server = link.b.stack.tcp_listen(7000).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut echoed = 0usize;
        let mut quiet = false;
        with_transport(
            &mut link,
            NODE2,
            7000,
            |b| {
                // An echo server that stops echoing (to test timeouts) when `quiet`.
                let s = b.tcp_socket(server);
                let mut buf = [0u8; 4096];
                while !quiet && s.can_recv() && s.can_send() {
                    let room = (s.send_capacity() - s.send_queue()).min(buf.len());
                    let n = s.recv_slice(&mut buf[..room]).unwrap();
                    let n = s.send_slice(&buf[..n]).unwrap();
                    echoed += n;
                    if echoed >= 300_000 {
                        quiet = true;
                    }
                }
            },
            |t| {
                let t = t.unwrap();
                let long = Duration::from_secs(10);
                let mut back = vec![0u8; data.len()];
                let mut got = 0;
                let mut sent = 0;
                while got < data.len() {
                    if sent < data.len() {
                        sent += t
                            .write(&data[sent..], Duration::from_millis(1))
                            .unwrap_or(0);
                    }
                    match t.read(&mut back[got..], Duration::from_millis(1)) {
                        Ok(n) => got += n,
                        Err(TransportError::Timeout) => {}
                        Err(e) => panic!("read: {e}"),
                    }
                }
                assert!(back == data);
                t.flush(long).unwrap();
                let mut b = [0u8; 1];
                assert_eq!(
                    t.read(&mut b, Duration::from_millis(200)),
                    Err(TransportError::Timeout)
                );
            },
        );
    }

    /// Streams from A to a fresh connection on B: (bytes received, frames B sent, polls) over
    /// the quick-ACK phase and over the 1 MiB after it. `delayed_acks`: B's socket keeps
    /// smoltcp's delayed ACKs (the bench's), else acknowledges at once (the migration's).
    fn acks_of_a_fresh_connection(delayed_acks: bool) -> [(usize, usize, usize); 2] {
        use super::super::quick_ack::QUICK_BYTES;
        let mut link = Link::new();
        let server = link.b.stack.tcp_listen(7003).unwrap();
        if !delayed_acks {
            link.b.stack.tcp_socket(server).set_ack_delay(None);
        }
        let client = link.a.stack.tcp_connect(NODE2, 7003).unwrap();
        for _ in 0..50 {
            link.step();
        }
        assert_eq!(
            link.a.stack.tcp_socket(client).state(),
            smoltcp::socket::tcp::State::Established
        );
        let chunk = vec![0x5au8; 64 * 1024];
        let mut buf = vec![0u8; 64 * 1024];
        let mut phases = [(0usize, 0usize, 0usize); 2];
        let mut received = 0;
        while received < QUICK_BYTES + (1 << 20) {
            let _ = link.a.stack.tcp_socket(client).send_slice(&chunk);
            let acks_before = link.b_to_a;
            link.step();
            let mut got = 0;
            while let Ok(n @ 1..) = link.b.stack.tcp_socket(server).recv_slice(&mut buf) {
                got += n;
            }
            let phase = &mut phases[usize::from(received >= QUICK_BYTES)];
            phase.0 += got;
            phase.1 += link.b_to_a - acks_before;
            phase.2 += 1;
            received += got;
            assert!(
                phase.2 < 100_000,
                "the transfer stalled at {received} bytes"
            );
        }
        phases
    }

    /// Regression test: acknowledged once per poll, a fresh connection's slow start grew its
    /// window one segment per poll, and an idle migration spent its first ~60 ms at a fraction
    /// of the link's speed. While its window opens, a connection is acknowledged for every
    /// full segment (every second one with delayed ACKs); afterwards at most once per poll.
    #[test]
    fn a_fresh_connection_is_acknowledged_per_segment_until_its_window_opens() {
        use super::super::quick_ack::ACK_EVERY;
        for (delayed_acks, segments_per_ack) in [(false, 1), (true, 2)] {
            let [(quick_bytes, quick_acks, _), (_, later_acks, later_polls)] =
                acks_of_a_fresh_connection(delayed_acks);
            assert!(
                quick_acks >= quick_bytes / (segments_per_ack * ACK_EVERY) * 9 / 10,
                "delayed ACKs {delayed_acks}: {quick_acks} ACKs for the first {quick_bytes} bytes"
            );
            assert!(
                later_acks <= later_polls,
                "delayed ACKs {delayed_acks}: {later_acks} ACKs in {later_polls} polls after \
                 the window opened"
            );
        }
    }

    /// A connection sized for bulk one way: its buffers are what was asked for, the big one
    /// is used as the window, and the small way still carries more than its buffer in pieces.
    #[test]
    fn connections_get_the_buffers_asked_for_each_way() {
        use crate::bench::SocketBuffers;
        let mut link = Link::new();
        let server = link
            .b
            .stack
            .tcp_listen_with(7004, SocketBuffers::BULK_RECEIVE)
            .unwrap();
        let client = link
            .a
            .stack
            .tcp_connect_with(NODE2, 7004, SocketBuffers::BULK_SEND)
            .unwrap();
        for _ in 0..50 {
            link.step();
        }
        let c = link.a.stack.tcp_socket(client);
        assert_eq!(c.state(), smoltcp::socket::tcp::State::Established);
        let sizes = |s: &smoltcp::socket::tcp::Socket| (s.send_capacity(), s.recv_capacity());
        assert_eq!(sizes(c), (bench::BUFFER, SocketBuffers::BULK_SEND.receive));
        let s = link.b.stack.tcp_socket(server);
        assert_eq!(sizes(s), (SocketBuffers::BULK_RECEIVE.send, bench::BUFFER));
        // The bulk way takes a window's worth at once; the answer way, four times its buffer
        // in pieces.
        let bulk = vec![0xA5u8; bench::BUFFER];
        assert_eq!(
            link.a.stack.tcp_socket(client).send_slice(&bulk),
            Ok(bench::BUFFER)
        );
        let answers = vec![0x5Au8; 4 * SocketBuffers::BULK_RECEIVE.send];
        let (mut sent, mut got_bulk, mut got_answers) = (0, 0, 0);
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..100_000 {
            if got_bulk == bulk.len() && got_answers == answers.len() {
                break;
            }
            sent += link
                .b
                .stack
                .tcp_socket(server)
                .send_slice(&answers[sent..])
                .unwrap();
            link.step();
            while let Ok(n @ 1..) = link.b.stack.tcp_socket(server).recv_slice(&mut buf) {
                got_bulk += n;
            }
            while let Ok(n @ 1..) = link.a.stack.tcp_socket(client).recv_slice(&mut buf) {
                got_answers += n;
            }
        }
        assert_eq!((got_bulk, got_answers), (bulk.len(), answers.len()));
    }

    #[test]
    fn the_bench_listener_serves_several_clients_at_once() {
        let mut link = Link::new();
        link.b.stack.start_bench_listener();
        // One client connects and stays (no data, no close).
        let idle = link.a.stack.tcp_connect(NODE2, bench::PORT).unwrap();
        for _ in 0..50 {
            link.step();
        }
        assert_eq!(
            link.a.stack.tcp_socket(idle).state(),
            smoltcp::socket::tcp::State::Established
        );
        link.a
            .stack
            .start_bench(NODE2, "node2", Limit::Bytes(200_000), link.now)
            .unwrap();
        assert!(run_bench(&mut link).1.unwrap().contains("intact"));
        link.a.stack.tcp_release(idle);
        for _ in 0..100 {
            link.step();
        }
        // The idle client's empty stream was reported too; both connections are gone.
        assert_eq!(link.b.stack.bench_served(), Some(2));
        assert_eq!(link.b.stack.bench_servers.len(), 1);
    }

    #[test]
    fn transport_reports_closed_refused_and_unreachable() {
        let mut link = Link::new();
        let server = link.b.stack.tcp_listen(7001).unwrap();
        let mut closed = false;
        with_transport(
            &mut link,
            NODE2,
            7001,
            |b| {
                let s = b.tcp_socket(server);
                if s.state() == smoltcp::socket::tcp::State::Established && !closed {
                    let _ = s.send_slice(b"bye");
                    s.close();
                    closed = true;
                }
            },
            |t| {
                let t = t.unwrap();
                let mut b = [0u8; 8];
                t.read_exact(&mut b[..3], Duration::from_secs(2)).unwrap();
                assert_eq!(&b[..3], b"bye");
                assert_eq!(
                    t.read(&mut b, Duration::from_secs(2)),
                    Err(TransportError::Closed)
                );
            },
        );
        with_transport(
            &mut link,
            NODE2,
            7002,
            |_| {},
            |t| {
                assert_eq!(t.err(), Some(TransportError::Refused));
            },
        );
        with_transport(
            &mut link,
            Ipv4([10, 10, 0, 9]),
            7002,
            |_| {},
            |t| {
                assert_eq!(t.err(), Some(TransportError::Unreachable));
            },
        );
        with_transport(
            &mut link,
            Ipv4([10, 20, 0, 9]),
            7002,
            |_| {},
            |t| {
                assert_eq!(t.err(), Some(TransportError::Unreachable));
            },
        );
    }
}

mod dhcp;
