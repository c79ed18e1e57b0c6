//! One network interface: a smoltcp [`Interface`] over a NIC's `phy::Device`, its sockets, the
//! mirror of its neighbor cache, the `ping` job, and its address: static, or leased by the DHCP
//! client ([`crate::dhcp`]).
//!
//! [`Stack::poll`] does a bounded amount of work, so the node's single loop (which also runs
//! vCPU slices and the console) is never held up by a flood: at most `budget` received frames,
//! then the ping job's bookkeeping, then one round of transmission per socket. It reports
//! whether frames are probably still waiting, so the caller can poll again before sleeping.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{self, ChecksumCapabilities, Device};
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, Ipv4Address,
};

use crate::addr::{Addressing, Ipv4, Ipv4Net};
use crate::bench::{self, BenchJob, BenchServer, Limit, SocketBuffers};
use crate::dhcp::{self, DhcpState};
use crate::neighbors::{Neighbor, NeighborTable};
use crate::ping::{CountError, PingEvent, PingJob, PingSummary, PAYLOAD};
use crate::transport::TransportError;
use quick_ack::QuickAcks;

/// Why a ping cannot start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingError {
    /// A ping is already running on this interface.
    Busy,
    /// The interface has no address.
    NoAddress,
    /// The interface's address comes from DHCP, and there is no lease yet.
    NoLease,
    /// The target is this interface's own address.
    OwnAddress(Ipv4),
    /// The target is outside the interface's subnet (and there are no routes).
    NoRoute {
        target: Ipv4,
        net: Ipv4Net,
    },
    /// Not a host address.
    NotUnicast(Ipv4),
    Count(CountError),
}

impl fmt::Display for PingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PingError::Busy => write!(f, "a ping is already running"),
            PingError::NoAddress => {
                write!(f, "the interface has no address (configure cluster_addr)")
            }
            PingError::NoLease => write!(f, "the interface has no DHCP lease yet"),
            PingError::OwnAddress(ip) => write!(f, "{ip} is this node's own address"),
            PingError::NoRoute { target, net } => write!(
                f,
                "no route to {target}: it is outside the cluster network {}/{}",
                net.network(),
                net.prefix
            ),
            PingError::NotUnicast(ip) => write!(f, "{ip} is not a host address"),
            PingError::Count(e) => write!(f, "{e}"),
        }
    }
}

/// What one [`Stack::poll`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollOutcome {
    /// Frames received and processed.
    pub frames: usize,
    /// The budget ran out: more frames are probably waiting.
    pub more: bool,
}

/// Rounds of egress per poll at most (each gives every socket one chance to send one segment;
/// a round that sends nothing, or a full transmit ring, ends the poll's egress).
const EGRESS_ROUNDS: usize = 128;
/// How long a closed connection's socket stays in TIME-WAIT (smoltcp: 10 s).
const TIME_WAIT: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(200);
/// First local port of outgoing TCP connections.
const EPHEMERAL_FIRST: u16 = 49152;

struct ActivePing {
    job: PingJob,
    handle: SocketHandle,
    events: Vec<PingEvent>,
}

/// A device whose transmit tokens may only queue frames for the hardware: [`Stack::poll`]
/// calls `flush_tx` once its egress is done, so a burst costs one doorbell write instead of one
/// per frame (under emulation each is a trip into the emulator).
pub trait TxFlush {
    /// Hands every frame queued since the last call to the hardware.
    fn flush_tx(&mut self);
}

/// An interface with its sockets.
pub struct Stack<D: Device + TxFlush> {
    device: D,
    iface: Interface,
    sockets: SocketSet<'static>,
    addr: Option<Ipv4Net>,
    dhcp: dhcp::Client,
    neighbors: NeighborTable,
    ping: Option<ActivePing>,
    next_ident: u16,
    bench: Option<(BenchJob, SocketHandle)>,
    /// The bench listener: its connections, and how many it served (`None`: not started).
    bench_servers: Vec<(BenchServer, SocketHandle)>,
    bench_served: Option<u64>,
    /// Sockets closed by their owner, removed once their connection has ended (the time: when
    /// they were first seen in TIME-WAIT).
    closing: Vec<(SocketHandle, Option<Instant>)>,
    next_port: u16,
    /// TCP sockets acknowledged per segment while their connection opens (added and removed
    /// through it, so it never holds a handle the socket set has reused).
    quick_acks: QuickAcks,
}

/// Why a TCP connection or a bench cannot start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// A bench is already running on this interface.
    Busy,
    /// The interface has no address.
    NoAddress,
    /// The interface's address comes from DHCP, and there is no lease yet.
    NoLease,
    OwnAddress(Ipv4),
    NoRoute {
        target: Ipv4,
        net: Ipv4Net,
    },
    NotUnicast(Ipv4),
    BadPort,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Busy => write!(f, "a bench is already running"),
            ConnectError::NoAddress => {
                write!(f, "the interface has no address (configure cluster_addr)")
            }
            ConnectError::NoLease => write!(f, "the interface has no DHCP lease yet"),
            ConnectError::OwnAddress(ip) => write!(f, "{ip} is this node's own address"),
            ConnectError::NoRoute { target, net } => write!(
                f,
                "no route to {target}: it is outside the network {}/{}",
                net.network(),
                net.prefix
            ),
            ConnectError::NotUnicast(ip) => write!(f, "{ip} is not a host address"),
            ConnectError::BadPort => write!(f, "port 0 is not a valid destination"),
        }
    }
}

/// Why a destination cannot be reached on an interface; pings and connections report it in
/// their own error types.
enum TargetError {
    NoAddress,
    NoLease,
    OwnAddress(Ipv4),
    NoRoute { target: Ipv4, net: Ipv4Net },
    NotUnicast(Ipv4),
}

impl From<TargetError> for PingError {
    fn from(e: TargetError) -> PingError {
        match e {
            TargetError::NoAddress => PingError::NoAddress,
            TargetError::NoLease => PingError::NoLease,
            TargetError::OwnAddress(ip) => PingError::OwnAddress(ip),
            TargetError::NoRoute { target, net } => PingError::NoRoute { target, net },
            TargetError::NotUnicast(ip) => PingError::NotUnicast(ip),
        }
    }
}

impl From<TargetError> for ConnectError {
    fn from(e: TargetError) -> ConnectError {
        match e {
            TargetError::NoAddress => ConnectError::NoAddress,
            TargetError::NoLease => ConnectError::NoLease,
            TargetError::OwnAddress(ip) => ConnectError::OwnAddress(ip),
            TargetError::NoRoute { target, net } => ConnectError::NoRoute { target, net },
            TargetError::NotUnicast(ip) => ConnectError::NotUnicast(ip),
        }
    }
}

impl From<ConnectError> for TransportError {
    fn from(e: ConnectError) -> TransportError {
        match e {
            ConnectError::NoRoute { .. } | ConnectError::NoLease => TransportError::Unreachable,
            _ => TransportError::Invalid,
        }
    }
}

/// Gives `iface` the address `addr` (recorded in `slot`) and flushes the neighbor mirror, as
/// smoltcp flushes its cache.
fn install_address(
    iface: &mut Interface,
    slot: &mut Option<Ipv4Net>,
    table: &mut NeighborTable,
    addr: Option<Ipv4Net>,
) {
    iface.update_ip_addrs(|addrs| {
        addrs.clear();
        if let Some(net) = addr {
            // Capacity is at least one address.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(to_smol(net.addr)), net.prefix));
        }
    });
    *slot = addr;
    table.flush();
}

fn to_smol(ip: Ipv4) -> Ipv4Address {
    let [a, b, c, d] = ip.0;
    Ipv4Address::new(a, b, c, d)
}

fn from_smol(ip: Ipv4Address) -> Ipv4 {
    Ipv4(ip.octets())
}

impl<D: Device + TxFlush> Stack<D> {
    /// An interface with station address `mac` (unicast) and optionally an IPv4 address.
    /// `seed` varies TCP initial sequence numbers and ports between boots.
    pub fn new(
        mut device: D,
        mac: [u8; 6],
        addr: Option<Ipv4Net>,
        now: Instant,
        seed: u64,
    ) -> Stack<D> {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = seed;
        let iface = Interface::new(config, &mut device, now);
        let mut stack = Stack {
            device,
            iface,
            sockets: SocketSet::new(Vec::new()),
            addr: None,
            dhcp: dhcp::Client::new(),
            neighbors: NeighborTable::new(),
            ping: None,
            next_ident: (seed as u16) | 1,
            bench: None,
            bench_servers: Vec::new(),
            bench_served: None,
            closing: Vec::new(),
            next_port: EPHEMERAL_FIRST + (seed % 8192) as u16,
            quick_acks: QuickAcks::default(),
        };
        stack.set_address(addr);
        stack
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn mac(&self) -> [u8; 6] {
        match self.iface.hardware_addr() {
            HardwareAddress::Ethernet(EthernetAddress(mac)) => mac,
        }
    }

    pub fn address(&self) -> Option<Ipv4Net> {
        self.addr
    }

    /// Gives the interface a static address (or none), stopping the DHCP client if it ran.
    pub fn set_address(&mut self, addr: Option<Ipv4Net>) {
        self.dhcp.stop(&mut self.sockets);
        self.apply_address(addr);
    }

    /// Configures the address: static, or DHCP (starts the client, without an address until
    /// the first lease; already running, it keeps its lease), or none.
    pub fn set_addressing(&mut self, addressing: Option<Addressing>) {
        match addressing {
            Some(Addressing::Dhcp) => {
                if self.dhcp.state().is_none() {
                    self.apply_address(None);
                    self.dhcp.start(&mut self.sockets);
                }
            }
            other => self.set_address(other.and_then(Addressing::static_net)),
        }
    }

    /// How the address is configured.
    pub fn addressing(&self) -> Option<Addressing> {
        match self.dhcp.state() {
            Some(_) => Some(Addressing::Dhcp),
            None => self.addr.map(Addressing::Static),
        }
    }

    /// The DHCP client's state (`None`: the address is static).
    pub fn dhcp(&self) -> Option<&DhcpState> {
        self.dhcp.state()
    }

    /// Applies the DHCP client's news, if any.
    fn poll_dhcp(&mut self, now: Instant) {
        if let Some(addr) = self.dhcp.poll(&mut self.sockets, now).new_address() {
            self.apply_address(addr);
        }
    }

    /// Replaces the interface address (flushes the neighbor cache, as smoltcp does).
    fn apply_address(&mut self, addr: Option<Ipv4Net>) {
        install_address(&mut self.iface, &mut self.addr, &mut self.neighbors, addr);
    }

    /// Neighbors with valid entries at `now`, sorted by address.
    pub fn neighbors(&self, now: Instant) -> Vec<Neighbor> {
        self.neighbors.valid(now)
    }

    /// Receives up to `budget` frames, advances the ping job, sends what is queued.
    pub fn poll(&mut self, now: Instant, budget: usize) -> PollOutcome {
        self.iface.poll_maintenance(now);
        let mut frames = 0;
        let mut tap = Tap {
            inner: &mut self.device,
            table: &mut self.neighbors,
            own: self.addr,
            now,
        };
        self.quick_acks.begin(&self.sockets);
        while frames < budget {
            match self
                .iface
                .poll_ingress_single(now, &mut tap, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed
                | PollIngressSingleResult::SocketStateChanged => frames += 1,
            }
            // Each ACK overwrites the DHCP socket's packet buffer: read its lease before the
            // next frame.
            if let Some(addr) = self.dhcp.poll(&mut self.sockets, now).new_address() {
                install_address(&mut self.iface, &mut self.addr, tap.table, addr);
                tap.own = addr;
            }
            if self.quick_acks.due(&self.sockets) {
                // One round of transmission carries the acknowledgement.
                self.iface.poll_egress(now, &mut tap, &mut self.sockets);
            }
        }
        Self::advance_ping(
            &mut self.ping,
            &mut self.sockets,
            &tap.inner.capabilities().checksum,
            now,
        );
        let mut sending = false;
        for _ in 0..EGRESS_ROUNDS {
            if let Some((job, handle)) = self.bench.as_mut() {
                job.advance(self.sockets.get_mut::<tcp::Socket>(*handle), now);
            }
            Self::advance_bench_servers(
                &mut self.bench_servers,
                &mut self.bench_served,
                &mut self.sockets,
                &mut self.quick_acks,
            );
            if self.iface.poll_egress(now, &mut tap, &mut self.sockets) == PollResult::None {
                break;
            }
            sending = true;
        }
        self.device.flush_tx();
        // The client gives up an expired lease while sending.
        self.poll_dhcp(now);
        let sockets = &mut self.sockets;
        let quick_acks = &mut self.quick_acks;
        self.closing.retain_mut(|(h, since)| {
            let done = match sockets.get::<tcp::Socket>(*h).state() {
                tcp::State::Closed => true,
                // smoltcp keeps TIME-WAIT for 10 s; the last ACK has left long before this.
                tcp::State::TimeWait => now >= *since.get_or_insert(now) + TIME_WAIT,
                _ => false,
            };
            if done {
                quick_acks.remove_socket(sockets, *h);
            }
            !done
        });
        PollOutcome {
            frames,
            more: frames >= budget || (sending && self.bench.is_some()),
        }
    }

    /// Validates a destination on this interface's network (for pings and connections alike).
    fn check_target(&self, target: Ipv4) -> Result<(), TargetError> {
        let net = self.addr.ok_or(if self.dhcp.state().is_some() {
            TargetError::NoLease
        } else {
            TargetError::NoAddress
        })?;
        if !target.is_unicast() || target == net.broadcast() && net.prefix <= 30 {
            return Err(TargetError::NotUnicast(target));
        }
        if target == net.addr {
            return Err(TargetError::OwnAddress(target));
        }
        if !net.contains(target) {
            return Err(TargetError::NoRoute { target, net });
        }
        Ok(())
    }

    /// Adds `socket` and starts connecting it to `target:port` from a fresh local port.
    fn connect_socket(
        &mut self,
        mut socket: tcp::Socket<'static>,
        target: Ipv4,
        port: u16,
    ) -> Result<SocketHandle, ConnectError> {
        self.check_target(target)?;
        if port == 0 {
            return Err(ConnectError::BadPort);
        }
        let local = self.next_port;
        self.next_port = if local == u16::MAX {
            EPHEMERAL_FIRST
        } else {
            local + 1
        };
        socket
            .connect(
                self.iface.context(),
                (IpAddress::Ipv4(to_smol(target)), port),
                local,
            )
            .map_err(|_| ConnectError::BadPort)?;
        Ok(self.quick_acks.add_socket(&mut self.sockets, socket))
    }

    /// Opens a TCP connection to `target:port` (it completes during later polls) with
    /// [`SocketBuffers::BULK`]; the socket is the caller's until [`Stack::tcp_release`].
    pub fn tcp_connect(&mut self, target: Ipv4, port: u16) -> Result<SocketHandle, ConnectError> {
        self.tcp_connect_with(target, port, SocketBuffers::BULK)
    }

    /// Like [`Stack::tcp_connect`], with buffers sized for what the connection carries.
    pub fn tcp_connect_with(
        &mut self,
        target: Ipv4,
        port: u16,
        buffers: SocketBuffers,
    ) -> Result<SocketHandle, ConnectError> {
        self.connect_socket(bench::socket_with(buffers), target, port)
    }

    /// A socket listening on TCP `port` (it turns into the connection of the first client) with
    /// [`SocketBuffers::BULK`]; the socket is the caller's until [`Stack::tcp_release`].
    pub fn tcp_listen(&mut self, port: u16) -> Result<SocketHandle, ConnectError> {
        self.tcp_listen_with(port, SocketBuffers::BULK)
    }

    /// Like [`Stack::tcp_listen`], with buffers sized for what the connection carries.
    pub fn tcp_listen_with(
        &mut self,
        port: u16,
        buffers: SocketBuffers,
    ) -> Result<SocketHandle, ConnectError> {
        let mut socket = bench::socket_with(buffers);
        socket.listen(port).map_err(|_| ConnectError::BadPort)?;
        Ok(self.quick_acks.add_socket(&mut self.sockets, socket))
    }

    /// The socket of a handle from [`Stack::tcp_connect`] or [`Stack::tcp_listen`].
    pub fn tcp_socket(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Closes the connection (FIN after the queued data) and forgets the socket once the
    /// connection has ended.
    pub fn tcp_release(&mut self, handle: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(handle).close();
        self.retire(handle);
    }

    /// Forgets a socket once its connection has ended ([`TIME_WAIT`] after it entered
    /// TIME-WAIT: long enough for the last, possibly delayed, ACK to leave).
    fn retire(&mut self, handle: SocketHandle) {
        self.closing.push((handle, None));
    }

    /// Starts listening on the bench port ([`bench::PORT`]); idempotent.
    pub fn start_bench_listener(&mut self) {
        if self.bench_served.is_none() {
            self.bench_served = Some(0);
            Self::advance_bench_servers(
                &mut self.bench_servers,
                &mut self.bench_served,
                &mut self.sockets,
                &mut self.quick_acks,
            );
        }
    }

    /// Advances the bench connections, forgets ended ones, and keeps one socket listening
    /// (unless [`bench::MAX_CONNECTIONS`] are open).
    fn advance_bench_servers(
        servers: &mut Vec<(BenchServer, SocketHandle)>,
        served: &mut Option<u64>,
        sockets: &mut SocketSet<'static>,
        quick_acks: &mut QuickAcks,
    ) {
        let Some(served) = served.as_mut() else {
            return;
        };
        let mut listening = false;
        servers.retain_mut(|(server, handle)| {
            let socket = sockets.get_mut::<tcp::Socket>(*handle);
            if server.advance(socket, served) {
                quick_acks.remove_socket(sockets, *handle);
                return false;
            }
            listening |= socket.state() == tcp::State::Listen;
            true
        });
        if !listening && servers.len() < bench::MAX_CONNECTIONS {
            let handle = quick_acks.add_socket(sockets, bench::listener());
            servers.push((BenchServer::default(), handle));
        }
    }

    /// Connections the bench listener served to the end (`None`: it was never started).
    pub fn bench_served(&self) -> Option<u64> {
        self.bench_served
    }

    /// Starts a bench to `target`'s bench listener; returns the header line.
    pub fn start_bench(
        &mut self,
        target: Ipv4,
        label: &str,
        limit: Limit,
        now: Instant,
    ) -> Result<String, ConnectError> {
        if self.bench.is_some() {
            return Err(ConnectError::Busy);
        }
        let handle = self.connect_socket(bench::socket(), target, bench::PORT)?;
        let job = BenchJob::new(target, label, limit, now);
        let header = job.header();
        self.bench = Some((job, handle));
        Ok(header)
    }

    /// True while a bench job runs.
    pub fn bench_active(&self) -> bool {
        self.bench.is_some()
    }

    /// Progress lines since the last call, and the result once the job has ended (the job is
    /// then gone).
    pub fn bench_output(&mut self) -> (Vec<String>, Option<Result<String, String>>) {
        let Some((job, handle)) = self.bench.as_mut() else {
            return (Vec::new(), None);
        };
        let handle = *handle;
        let (lines, outcome) = job.take_output();
        if job.is_done() {
            self.bench = None;
            self.retire(handle);
        }
        (lines, outcome)
    }

    /// Stops the bench job (Ctrl-C); returns its summary.
    pub fn cancel_bench(&mut self, now: Instant) -> Option<String> {
        let (mut job, handle) = self.bench.take()?;
        let line = job.cancel(self.sockets.get_mut::<tcp::Socket>(handle), now);
        self.retire(handle);
        Some(line)
    }

    /// Starts a ping of `count` requests to `target`, labelled `label` in the output (a node
    /// name, or the address itself). Returns the header line to print.
    pub fn start_ping(
        &mut self,
        target: Ipv4,
        label: &str,
        count: u32,
        now: Instant,
    ) -> Result<String, PingError> {
        if self.ping.is_some() {
            return Err(PingError::Busy);
        }
        self.check_target(target)?;
        let ident = self.next_ident;
        self.next_ident = self.next_ident.wrapping_add(1).max(1);
        let job = PingJob::new(target, label, count, ident, now).map_err(PingError::Count)?;
        let mut socket = icmp::Socket::new(
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 16], vec![0; 16 * 128]),
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 16], vec![0; 16 * 128]),
        );
        // A fresh socket binds to a fresh identifier: cannot fail.
        let _ = socket.bind(icmp::Endpoint::Ident(ident));
        let handle = self.sockets.add(socket);
        let header = job.header();
        self.ping = Some(ActivePing {
            job,
            handle,
            events: Vec::new(),
        });
        Ok(header)
    }

    /// True while a ping job runs.
    pub fn ping_active(&self) -> bool {
        self.ping.is_some()
    }

    /// The lines the ping job produced since the last call, and its summary once it has ended
    /// (the job is then gone).
    pub fn ping_output(&mut self, now: Instant) -> (Vec<PingEvent>, Option<PingSummary>) {
        let Some(active) = self.ping.as_mut() else {
            return (Vec::new(), None);
        };
        let events = core::mem::take(&mut active.events);
        if !active.job.is_done() {
            return (events, None);
        }
        (events, self.finish_ping(now))
    }

    /// Stops the ping job (Ctrl-C); returns its summary.
    pub fn cancel_ping(&mut self, now: Instant) -> Option<PingSummary> {
        self.finish_ping(now)
    }

    fn finish_ping(&mut self, now: Instant) -> Option<PingSummary> {
        let active = self.ping.take()?;
        self.sockets.remove(active.handle);
        Some(active.job.summary(now))
    }

    fn advance_ping(
        ping: &mut Option<ActivePing>,
        sockets: &mut SocketSet<'static>,
        checksum: &ChecksumCapabilities,
        now: Instant,
    ) {
        let Some(active) = ping.as_mut() else {
            return;
        };
        let socket = sockets.get_mut::<icmp::Socket>(active.handle);
        while let Ok((data, from)) = socket.recv() {
            let IpAddress::Ipv4(from) = from;
            let Ok(packet) = Icmpv4Packet::new_checked(data) else {
                continue;
            };
            let Ok(Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            }) = Icmpv4Repr::parse(&packet, checksum)
            else {
                continue;
            };
            let bytes = data.len() + 8;
            if let Some(event) = active
                .job
                .on_reply(ident, seq_no, bytes, from_smol(from), now)
            {
                active.events.push(event);
            }
        }
        let lost = active.job.expire(now);
        active.events.extend(lost);
        if let Some(seq) = active.job.due(now) {
            let mut payload = [0u8; PAYLOAD];
            for (i, b) in payload.iter_mut().enumerate() {
                *b = i as u8;
            }
            let repr = Icmpv4Repr::EchoRequest {
                ident: active.job.ident(),
                seq_no: seq,
                data: &payload,
            };
            let target = IpAddress::Ipv4(to_smol(active.job.target()));
            // A full socket buffer (the neighbor does not answer ARP) loses this request; it is
            // still counted as transmitted and reported lost after the timeout.
            if let Ok(buf) = socket.send(repr.buffer_len(), target) {
                let mut packet = Icmpv4Packet::new_unchecked(buf);
                repr.emit(&mut packet, checksum);
            }
            active.job.mark_sent(seq, now);
        }
    }
}

/// The device as smoltcp sees it during a poll: every received frame is shown to the neighbor
/// table mirror on its way up.
struct Tap<'a, D: Device> {
    inner: &'a mut D,
    table: &'a mut NeighborTable,
    own: Option<Ipv4Net>,
    now: Instant,
}

struct TapRx<'a, T> {
    inner: T,
    table: &'a mut NeighborTable,
    own: Option<Ipv4Net>,
    now: Instant,
}

impl<T: phy::RxToken> phy::RxToken for TapRx<'_, T> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let TapRx {
            inner,
            table,
            own,
            now,
        } = self;
        inner.consume(|frame| {
            table.observe(frame, own, now);
            f(frame)
        })
    }

    fn meta(&self) -> phy::PacketMeta {
        self.inner.meta()
    }
}

impl<D: Device> Device for Tap<'_, D> {
    type RxToken<'b>
        = TapRx<'b, D::RxToken<'b>>
    where
        Self: 'b;
    type TxToken<'b>
        = D::TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (rx, tx) = self.inner.receive(timestamp)?;
        Some((
            TapRx {
                inner: rx,
                table: self.table,
                own: self.own,
                now: self.now,
            },
            tx,
        ))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> phy::DeviceCapabilities {
        self.inner.capabilities()
    }
}

mod quick_ack;
mod transport;
pub use transport::TcpTransport;

#[cfg(test)]
mod tests;
