//! `net bench` / `net send`: TCP throughput and integrity to the bench listener of a peer.
//!
//! Every node listens on TCP port [`PORT`] ([`BenchServer`]). A client ([`BenchJob`]) connects,
//! sends a pseudo-random byte stream (for a time, or a number of bytes), then closes its side.
//! The listener counts and hashes (FNV-1a, 64 bits) everything it received and, at the end of the
//! stream, answers with a 16-byte report: the byte count and the hash, little-endian `u64`s. The
//! client compares them with its own: the transfer arrived intact or the job fails.
//!
//! The listener serves up to [`MAX_CONNECTIONS`] connections at once.
//! Both sides are non-blocking state machines over a smoltcp TCP socket, advanced by the
//! stack's poll: the node's loop never waits for them.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};

use crate::addr::Ipv4;

/// The TCP port every node's bench listener listens on.
pub const PORT: u16 = 5001;
/// Default and maximum duration of `net bench`, seconds.
pub const DEFAULT_SECONDS: u32 = 5;
pub const MAX_SECONDS: u32 = 3600;
/// Maximum size of `net send`, MiB.
pub const MAX_MIB: u32 = 4096;
/// Bytes of the receiver's report.
pub const REPORT_LEN: usize = 16;
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that makes no progress for this long is given up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket buffers of bench connections (and of the migration's, which use these sockets): a
/// window far beyond one poll interval's worth of data (smoltcp scales the window for buffers
/// over 64 KiB). Under QEMU on a 2-core host the ACKs of a bulk transfer wait on the host's
/// scheduler (emulator threads and the link's switch share the cores), so the window has to
/// cover those delays: measured with two QEMU nodes, a 512 KiB window left an idle 64 MiB
/// migration ACK-clocked at ~0.86 of the bench's throughput, 1 MiB gave ~0.9-0.92 (the bench
/// itself slightly faster), while 2 MiB (measured with the 1024-descriptor receive ring of
/// then, which it overran) made the bench collapse to ~110 MB/s.
pub const BUFFER: usize = 1024 * 1024;
/// Length of the repeated pseudo-random pattern the client sends.
const PATTERN_LEN: usize = 64 * 1024 - 1;

/// FNV-1a, 64 bits, incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a(pub u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// How much a job sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Seconds(u32),
    Bytes(u64),
}

/// Megabytes (10^6 bytes) per second, two decimals.
pub struct MbPerSec {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl fmt::Display for MbPerSec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.elapsed.total_micros().max(1);
        // bytes / us = MB/s; keep two decimals.
        let centi = u128::from(self.bytes) * 100 / u128::from(us);
        write!(f, "{}.{:02} MB/s", centi / 100, centi % 100)
    }
}

fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..PATTERN_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// How much a TCP connection buffers each way: the most it may have in flight (send) and the
/// window it offers its peer (receive). Each is allocated whole for the socket's life, so a
/// connection that carries bulk data one way and answers the other gets a small buffer there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    pub send: usize,
    pub receive: usize,
}

/// Room for requests and answers of a few KiB.
const SMALL_BUFFER: usize = 16 * 1024;

impl SocketBuffers {
    /// Bulk data both ways (bench connections, iSCSI).
    pub const BULK: Self = Self {
        send: BUFFER,
        receive: BUFFER,
    };
    /// Bulk data out, answers in (a migration's source).
    pub const BULK_SEND: Self = Self {
        send: BUFFER,
        receive: SMALL_BUFFER,
    };
    /// Bulk data in, answers out (a migration's destination).
    pub const BULK_RECEIVE: Self = Self {
        send: SMALL_BUFFER,
        receive: BUFFER,
    };
    /// Requests and answers only (the owner query).
    pub const SMALL: Self = Self {
        send: SMALL_BUFFER,
        receive: SMALL_BUFFER,
    };
}

/// A new TCP socket with bench-sized buffers ([`SocketBuffers::BULK`]).
pub fn socket() -> tcp::Socket<'static> {
    socket_with(SocketBuffers::BULK)
}

/// A new TCP socket set up as the bench's, with `buffers`.
pub fn socket_with(buffers: SocketBuffers) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(alloc::vec![0; buffers.receive]),
        tcp::SocketBuffer::new(alloc::vec![0; buffers.send]),
    );
    s.set_nagle_enabled(false);
    // Without congestion control smoltcp sends the whole window at once, overrunning the
    // receiver's ring; Reno backs off on loss.
    s.set_congestion_control(tcp::CongestionControl::Reno);
    s.set_timeout(Some(STALL_TIMEOUT));
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Sending,
    /// Our side is closed; waiting for the receiver's report.
    Report,
    Done,
}

/// The client side: one `net bench` or `net send`.
pub struct BenchJob {
    target: Ipv4,
    label: String,
    limit: Limit,
    phase: Phase,
    started: Instant,
    connected: Option<Instant>,
    /// Bytes queued into the socket.
    queued: u64,
    hash: Fnv1a,
    pattern: Vec<u8>,
    report: [u8; REPORT_LEN],
    report_len: usize,
    last_progress: Instant,
    last_acked: u64,
    /// Bytes acknowledged at the last progress line (and when it was printed).
    tick: (Instant, u64),
    lines: Vec<String>,
    outcome: Option<Result<String, String>>,
}

impl BenchJob {
    pub fn new(target: Ipv4, label: &str, limit: Limit, now: Instant) -> BenchJob {
        BenchJob {
            target,
            label: String::from(label),
            limit,
            phase: Phase::Connecting,
            started: now,
            connected: None,
            queued: 0,
            hash: Fnv1a::default(),
            pattern: pattern(),
            report: [0; REPORT_LEN],
            report_len: 0,
            last_progress: now,
            last_acked: 0,
            tick: (now, 0),
            lines: Vec::new(),
            outcome: None,
        }
    }

    pub fn target(&self) -> Ipv4 {
        self.target
    }

    /// The line printed when the job starts.
    pub fn header(&self) -> String {
        let what = match self.limit {
            Limit::Seconds(s) => format!("for {s} s"),
            Limit::Bytes(n) => format!("{n} bytes"),
        };
        format!(
            "BENCH {} ({}) port {PORT}: sending {what}",
            self.label, self.target
        )
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Lines printed since the last call, and the final result once the job is over (`Ok`:
    /// the summary line; `Err`: the error).
    pub fn take_output(&mut self) -> (Vec<String>, Option<Result<String, String>>) {
        (core::mem::take(&mut self.lines), self.outcome.take())
    }

    fn fail(&mut self, socket: &mut tcp::Socket, why: String) {
        socket.abort();
        self.phase = Phase::Done;
        self.outcome = Some(Err(format!("net bench to {}: {why}", self.label)));
    }

    /// Advances the job: moves data into `socket`, reads the report, notes progress.
    pub fn advance(&mut self, socket: &mut tcp::Socket, now: Instant) {
        match self.phase {
            Phase::Done => {}
            Phase::Connecting => match socket.state() {
                State::Established => {
                    self.phase = Phase::Sending;
                    self.connected = Some(now);
                    self.tick = (now, 0);
                    self.last_progress = now;
                    self.advance(socket, now);
                }
                State::Closed => self.fail(
                    socket,
                    format!("connection refused by {} (no bench listener)", self.target),
                ),
                _ if now >= self.started + CONNECT_TIMEOUT => self.fail(
                    socket,
                    format!(
                        "no answer from {} within {} s: host unreachable or down",
                        self.target,
                        CONNECT_TIMEOUT.secs()
                    ),
                ),
                _ => {}
            },
            Phase::Sending | Phase::Report => self.transfer(socket, now),
        }
    }

    fn acked(&self, socket: &tcp::Socket) -> u64 {
        self.queued - socket.send_queue() as u64
    }

    fn transfer(&mut self, socket: &mut tcp::Socket, now: Instant) {
        let Some(connected) = self.connected else {
            return;
        };
        if socket.state() == State::Closed {
            return self.fail(
                socket,
                String::from("connection reset (or timed out) during the transfer"),
            );
        }
        if self.phase == Phase::Sending {
            let more = match self.limit {
                Limit::Seconds(s) => now < connected + Duration::from_secs(u64::from(s)),
                Limit::Bytes(n) => self.queued < n,
            };
            if more {
                while socket.can_send() {
                    // What is left to send, after what this loop already queued.
                    let want = match self.limit {
                        Limit::Bytes(n) => n.saturating_sub(self.queued),
                        Limit::Seconds(_) => u64::MAX,
                    };
                    let offset = (self.queued % PATTERN_LEN as u64) as usize;
                    let chunk = &self.pattern[offset..];
                    let chunk = &chunk[..chunk.len().min(want.min(usize::MAX as u64) as usize)];
                    let hash = &mut self.hash;
                    let n = socket
                        .send(|buf| {
                            let n = buf.len().min(chunk.len());
                            buf[..n].copy_from_slice(&chunk[..n]);
                            hash.update(&chunk[..n]);
                            (n, n)
                        })
                        .unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    self.queued += n as u64;
                    if matches!(self.limit, Limit::Bytes(t) if self.queued >= t) {
                        break;
                    }
                }
            } else {
                socket.close();
                self.phase = Phase::Report;
            }
        }
        if self.phase == Phase::Report {
            while socket.can_recv() && self.report_len < REPORT_LEN {
                let got = socket
                    .recv_slice(&mut self.report[self.report_len..])
                    .unwrap_or(0);
                if got == 0 {
                    break;
                }
                self.report_len += got;
            }
            if self.report_len == REPORT_LEN {
                return self.finish(now, connected);
            }
            if !socket.may_recv() {
                return self.fail(
                    socket,
                    String::from("the receiver closed the connection without its report"),
                );
            }
        }
        let acked = self.acked(socket);
        if acked != self.last_acked || self.report_len > 0 {
            self.last_acked = acked;
            self.last_progress = now;
        } else if now >= self.last_progress + STALL_TIMEOUT {
            return self.fail(
                socket,
                format!("no progress for {} s", STALL_TIMEOUT.secs()),
            );
        }
        if now >= self.tick.0 + Duration::from_secs(1) {
            let elapsed = now - connected;
            self.lines.push(format!(
                "[{:>3}.{} s] {} bytes acknowledged, {}",
                elapsed.secs(),
                elapsed.millis() % 1000 / 100,
                acked,
                MbPerSec {
                    bytes: acked - self.tick.1,
                    elapsed: now - self.tick.0
                }
            ));
            self.tick = (now, acked);
        }
    }

    fn finish(&mut self, now: Instant, connected: Instant) {
        let count = u64::from_le_bytes(self.report[..8].try_into().unwrap_or([0; 8]));
        let hash = u64::from_le_bytes(self.report[8..].try_into().unwrap_or([0; 8]));
        self.phase = Phase::Done;
        // Our FIN was sent; the peer closes after its report: the socket ends by itself.
        let elapsed = now - connected;
        if count != self.queued || hash != self.hash.0 {
            self.outcome = Some(Err(format!(
                "net bench to {}: transfer corrupted: sent {} bytes (FNV-1a {:016x}), \
                 the receiver got {count} bytes (FNV-1a {hash:016x})",
                self.label, self.queued, self.hash.0
            )));
            return;
        }
        self.outcome = Some(Ok(format!(
            "--- {} ({}) bench: {} bytes in {}.{:03} s: {}; checksum FNV-1a {:016x} \
             matches the receiver's: intact",
            self.label,
            self.target,
            self.queued,
            elapsed.secs(),
            elapsed.millis() % 1000,
            MbPerSec {
                bytes: self.queued,
                elapsed
            },
            self.hash.0
        )));
    }

    /// Ctrl-C: stops the job; returns what to print.
    pub fn cancel(&mut self, socket: &mut tcp::Socket, now: Instant) -> String {
        socket.abort();
        self.phase = Phase::Done;
        let acked = self.acked(socket).min(self.queued);
        let elapsed = self.connected.map_or(Duration::ZERO, |c| now - c);
        format!(
            "--- {} ({}) bench cancelled: {} bytes acknowledged in {}.{:03} s: {}",
            self.label,
            self.target,
            acked,
            elapsed.secs(),
            elapsed.millis() % 1000,
            MbPerSec {
                bytes: acked,
                elapsed
            }
        )
    }
}

/// The listener side of one connection: counts and hashes what the client sends, reports at
/// its end of stream. [`crate::stack::Stack`] keeps one socket listening on [`PORT`] and one
/// `BenchServer` per connection (at most [`MAX_CONNECTIONS`]).
#[derive(Debug, Default)]
pub struct BenchServer {
    bytes: u64,
    hash: Fnv1a,
    reported: bool,
}

/// Bench connections served at once (more are refused).
pub const MAX_CONNECTIONS: usize = 4;

/// A new socket listening on [`PORT`].
pub fn listener() -> tcp::Socket<'static> {
    let mut s = socket();
    // Cannot fail: the socket is new and the port non-zero.
    let _ = s.listen(PORT);
    s
}

impl BenchServer {
    /// Advances the connection: consumes data, reports at the end of the stream (counting it in
    /// `served`). Returns true once the connection is over (the socket can go).
    pub fn advance(&mut self, socket: &mut tcp::Socket, served: &mut u64) -> bool {
        match socket.state() {
            State::Closed => return true,
            State::TimeWait => {
                socket.abort();
                return true;
            }
            State::Listen | State::SynReceived => return false,
            _ => {}
        }
        while socket.can_recv() {
            let hash = &mut self.hash;
            let n = socket
                .recv(|buf| {
                    hash.update(buf);
                    (buf.len(), buf.len())
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            self.bytes += n as u64;
        }
        if !socket.may_recv() && !self.reported && socket.state() == State::CloseWait {
            let mut report = [0u8; REPORT_LEN];
            report[..8].copy_from_slice(&self.bytes.to_le_bytes());
            report[8..].copy_from_slice(&self.hash.0.to_le_bytes());
            if socket.send_slice(&report) == Ok(REPORT_LEN) {
                socket.close();
                self.reported = true;
                *served += 1;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_values() {
        let mut h = Fnv1a::default();
        h.update(b"");
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv1a::default();
        h.update(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv1a::default();
        h.update(b"foo");
        h.update(b"bar");
        assert_eq!(h.0, 0x85944171f73967e8);
    }

    #[test]
    fn rates_print_with_two_decimals() {
        let r = MbPerSec {
            bytes: 6_543_210,
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(alloc::string::ToString::to_string(&r), "6.54 MB/s");
        let r = MbPerSec {
            bytes: 0,
            elapsed: Duration::ZERO,
        };
        assert_eq!(alloc::string::ToString::to_string(&r), "0.00 MB/s");
    }
}
