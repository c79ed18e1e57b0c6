//! The `ping` job: which echo request is due, which reply belongs to which request, what to
//! print. Pure bookkeeping over timestamps; [`crate::stack`] moves the packets.
//!
//! One request per [`INTERVAL`] (the first at once), [`PAYLOAD`] data bytes each; a request
//! without a reply after [`REPLY_TIMEOUT`] is reported lost. The job ends when every request
//! was answered or lost, or when it is cancelled, with a summary in the familiar format:
//!
//! ```text
//! PING node2 (10.10.0.2): 56 data bytes
//! 64 bytes from 10.10.0.2: icmp_seq=1 time=1.52 ms
//! no reply from 10.10.0.2: icmp_seq=2 (timeout 2 s)
//! --- node2 (10.10.0.2) ping statistics ---
//! 2 packets transmitted, 1 received, 50% packet loss, time 3004 ms
//! rtt min/avg/max = 1.52/1.52/1.52 ms
//! ```

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::time::{Duration, Instant};

use crate::addr::Ipv4;

/// Data bytes per request (the ICMP message is 8 bytes more).
pub const PAYLOAD: usize = 56;
/// Time between requests.
pub const INTERVAL: Duration = Duration::from_millis(1000);
/// How long a request waits for its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_millis(2000);
/// Most requests one job sends.
pub const MAX_COUNT: u32 = 1000;
/// Requests when the command gives no count.
pub const DEFAULT_COUNT: u32 = 4;

/// Why a job cannot start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountError {
    /// 0 or more than [`MAX_COUNT`].
    OutOfRange(u32),
}

impl fmt::Display for CountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CountError::OutOfRange(n) => write!(f, "count {n} out of range: 1 to {MAX_COUNT}"),
        }
    }
}

/// Something to print while the job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingEvent {
    Reply {
        seq: u16,
        /// ICMP message length (header + data), as ping prints it.
        bytes: usize,
        from: Ipv4,
        rtt: Duration,
    },
    Lost {
        seq: u16,
    },
}

/// Milliseconds with three significant digits: `0.352`, `1.52`, `15.3`, `153`.
pub struct Millis(pub Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.total_micros();
        if us < 1_000 {
            write!(f, "{}.{:03}", us / 1000, us % 1000)
        } else if us < 10_000 {
            write!(f, "{}.{:02}", us / 1000, us % 1000 / 10)
        } else if us < 100_000 {
            write!(f, "{}.{}", us / 1000, us % 1000 / 100)
        } else {
            write!(f, "{}", us / 1000)
        }
    }
}

/// A job in progress.
#[derive(Debug, Clone)]
pub struct PingJob {
    target: Ipv4,
    label: String,
    ident: u16,
    count: u16,
    started: Instant,
    /// Per request (index = seq - 1): when it was sent.
    sent: Vec<Option<Instant>>,
    /// Per request: answered, or reported lost.
    settled: Vec<bool>,
    rtts: Vec<Duration>,
    duplicates: u32,
}

impl PingJob {
    /// A job of `count` requests to `target` (shown as `label`, e.g. the peer's name) with ICMP
    /// identifier `ident`.
    pub fn new(
        target: Ipv4,
        label: &str,
        count: u32,
        ident: u16,
        now: Instant,
    ) -> Result<PingJob, CountError> {
        if !(1..=MAX_COUNT).contains(&count) {
            return Err(CountError::OutOfRange(count));
        }
        let n = count as usize;
        Ok(PingJob {
            target,
            label: String::from(label),
            ident,
            count: count as u16,
            started: now,
            sent: vec![None; n],
            settled: vec![false; n],
            rtts: Vec::new(),
            duplicates: 0,
        })
    }

    pub fn target(&self) -> Ipv4 {
        self.target
    }

    pub fn ident(&self) -> u16 {
        self.ident
    }

    /// The line printed when the job starts.
    pub fn header(&self) -> String {
        let mut s = String::new();
        let _ = fmt::write(
            &mut s,
            format_args!("PING {}: {PAYLOAD} data bytes", Label(self)),
        );
        s
    }

    fn transmitted(&self) -> usize {
        self.sent.iter().filter(|s| s.is_some()).count()
    }

    /// The sequence number (1-based) of the request due at `now`, if any.
    pub fn due(&self, now: Instant) -> Option<u16> {
        let next = self.transmitted();
        if next >= usize::from(self.count) {
            return None;
        }
        let at = self.started + INTERVAL * next as u32;
        (now >= at).then_some(next as u16 + 1)
    }

    /// Request `seq` went out at `now`.
    pub fn mark_sent(&mut self, seq: u16, now: Instant) {
        if let Some(slot) = self.sent.get_mut(usize::from(seq).wrapping_sub(1)) {
            *slot = Some(now);
        }
    }

    /// An echo reply arrived; returns what to print, if it answers one of our requests.
    pub fn on_reply(
        &mut self,
        ident: u16,
        seq: u16,
        bytes: usize,
        from: Ipv4,
        now: Instant,
    ) -> Option<PingEvent> {
        if ident != self.ident || from != self.target {
            return None;
        }
        let index = usize::from(seq).checked_sub(1)?;
        let sent = (*self.sent.get(index)?)?;
        if self.settled[index] {
            self.duplicates += 1;
            return None;
        }
        self.settled[index] = true;
        let rtt = now - sent;
        self.rtts.push(rtt);
        Some(PingEvent::Reply {
            seq,
            bytes,
            from,
            rtt,
        })
    }

    /// Requests whose reply is overdue at `now`, each reported once.
    pub fn expire(&mut self, now: Instant) -> Vec<PingEvent> {
        let mut lost = Vec::new();
        for (i, (sent, settled)) in self.sent.iter().zip(self.settled.iter_mut()).enumerate() {
            if let Some(at) = sent {
                if !*settled && now >= *at + REPLY_TIMEOUT {
                    *settled = true;
                    lost.push(PingEvent::Lost { seq: i as u16 + 1 });
                }
            }
        }
        lost
    }

    /// Every request was sent and answered or lost.
    pub fn is_done(&self) -> bool {
        self.settled.iter().all(|&s| s)
    }

    /// The statistics so far (the final ones once [`is_done`](Self::is_done)).
    pub fn summary(&self, now: Instant) -> PingSummary {
        let received = self.rtts.len();
        let (min, max, avg) = if received == 0 {
            (Duration::ZERO, Duration::ZERO, Duration::ZERO)
        } else {
            let total: u64 = self.rtts.iter().map(|d| d.total_micros()).sum();
            (
                self.rtts.iter().copied().min().unwrap_or(Duration::ZERO),
                self.rtts.iter().copied().max().unwrap_or(Duration::ZERO),
                Duration::from_micros(total / received as u64),
            )
        };
        PingSummary {
            label: self.header_label(),
            target: self.target,
            transmitted: self.transmitted(),
            received,
            duplicates: self.duplicates,
            elapsed: now - self.started,
            min,
            avg,
            max,
        }
    }

    fn header_label(&self) -> String {
        let mut s = String::new();
        let _ = fmt::write(&mut s, format_args!("{}", Label(self)));
        s
    }
}

/// `node2 (10.10.0.2)`, or just the address when that is what was typed.
struct Label<'a>(&'a PingJob);

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let job = self.0;
        let mut addr = String::new();
        let _ = fmt::write(&mut addr, format_args!("{}", job.target));
        if job.label == addr || job.label.is_empty() {
            write!(f, "{addr}")
        } else {
            write!(f, "{} ({addr})", job.label)
        }
    }
}

impl fmt::Display for PingEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PingEvent::Reply {
                seq,
                bytes,
                from,
                rtt,
            } => write!(
                f,
                "{bytes} bytes from {from}: icmp_seq={seq} time={} ms",
                Millis(*rtt)
            ),
            PingEvent::Lost { seq } => write!(
                f,
                "no reply for icmp_seq={seq} (timeout {} s)",
                REPLY_TIMEOUT.total_millis() / 1000
            ),
        }
    }
}

/// The closing statistics of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingSummary {
    /// `node2 (10.10.0.2)` or `10.10.0.2`.
    pub label: String,
    pub target: Ipv4,
    pub transmitted: usize,
    pub received: usize,
    pub duplicates: u32,
    pub elapsed: Duration,
    pub min: Duration,
    pub avg: Duration,
    pub max: Duration,
}

impl PingSummary {
    /// Nothing came back (the peer is unreachable, down, or not there).
    pub fn all_lost(&self) -> bool {
        self.received == 0
    }

    pub fn loss_percent(&self) -> usize {
        ((self.transmitted - self.received.min(self.transmitted)) * 100)
            .checked_div(self.transmitted)
            .unwrap_or(0)
    }
}

/// The statistics lines (no trailing newline).
impl fmt::Display for PingSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- {} ping statistics ---", self.label)?;
        write!(
            f,
            "{} packets transmitted, {} received, ",
            self.transmitted, self.received
        )?;
        if self.duplicates > 0 {
            write!(f, "+{} duplicates, ", self.duplicates)?;
        }
        write!(
            f,
            "{}% packet loss, time {} ms",
            self.loss_percent(),
            self.elapsed.total_millis()
        )?;
        if self.received > 0 {
            write!(
                f,
                "\nrtt min/avg/max = {}/{}/{} ms",
                Millis(self.min),
                Millis(self.avg),
                Millis(self.max)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    const PEER: Ipv4 = Ipv4([10, 10, 0, 2]);

    fn ms(n: i64) -> Instant {
        Instant::from_millis(n)
    }

    #[test]
    fn counts_are_checked() {
        assert_eq!(
            PingJob::new(PEER, "node2", 0, 1, ms(0)).err(),
            Some(CountError::OutOfRange(0))
        );
        assert!(PingJob::new(PEER, "node2", MAX_COUNT + 1, 1, ms(0)).is_err());
        assert!(PingJob::new(PEER, "node2", MAX_COUNT, 1, ms(0)).is_ok());
        assert_eq!(
            CountError::OutOfRange(0).to_string(),
            "count 0 out of range: 1 to 1000"
        );
    }

    #[test]
    fn requests_are_paced_and_replies_matched() {
        let mut job = PingJob::new(PEER, "node2", 3, 7, ms(100)).unwrap();
        assert_eq!(job.header(), "PING node2 (10.10.0.2): 56 data bytes");
        assert_eq!(job.due(ms(100)), Some(1));
        job.mark_sent(1, ms(100));
        assert_eq!(job.due(ms(1099)), None);
        assert_eq!(job.due(ms(1100)), Some(2));
        // Replies for other identifiers, hosts, unsent or unknown sequence numbers are ignored.
        assert_eq!(job.on_reply(8, 1, 64, PEER, ms(101)), None);
        assert_eq!(job.on_reply(7, 1, 64, Ipv4([10, 10, 0, 3]), ms(101)), None);
        assert_eq!(job.on_reply(7, 2, 64, PEER, ms(101)), None);
        assert_eq!(job.on_reply(7, 0, 64, PEER, ms(101)), None);
        assert_eq!(job.on_reply(7, 999, 64, PEER, ms(101)), None);
        let ev = job
            .on_reply(7, 1, 64, PEER, Instant::from_micros(101_520))
            .unwrap();
        assert_eq!(
            ev.to_string(),
            "64 bytes from 10.10.0.2: icmp_seq=1 time=1.52 ms"
        );
        // A duplicate is counted, not printed.
        assert_eq!(job.on_reply(7, 1, 64, PEER, ms(102)), None);
        job.mark_sent(2, ms(1100));
        job.mark_sent(3, ms(2100));
        assert_eq!(job.due(ms(5000)), None, "all sent");
        assert!(job.on_reply(7, 3, 64, PEER, ms(2103)).is_some());
        assert!(!job.is_done());
        assert!(job.expire(ms(3099)).is_empty());
        assert_eq!(job.expire(ms(3100)), [PingEvent::Lost { seq: 2 }]);
        assert!(job.expire(ms(9000)).is_empty(), "reported once");
        assert!(job.is_done());
        let s = job.summary(ms(3100));
        assert_eq!((s.transmitted, s.received, s.duplicates), (3, 2, 1));
        assert_eq!(s.loss_percent(), 33);
        assert_eq!(
            s.to_string(),
            "--- node2 (10.10.0.2) ping statistics ---\n\
             3 packets transmitted, 2 received, +1 duplicates, 33% packet loss, time 3000 ms\n\
             rtt min/avg/max = 1.52/2.26/3.00 ms"
        );
        assert_eq!(
            PingEvent::Lost { seq: 2 }.to_string(),
            "no reply for icmp_seq=2 (timeout 2 s)"
        );
    }

    #[test]
    fn all_lost_and_cancelled_summaries() {
        let mut job = PingJob::new(PEER, "10.10.0.2", 2, 1, ms(0)).unwrap();
        assert_eq!(job.header(), "PING 10.10.0.2: 56 data bytes");
        job.mark_sent(1, ms(0));
        let s = job.summary(ms(500));
        assert_eq!(
            s.to_string(),
            "--- 10.10.0.2 ping statistics ---\n\
             1 packets transmitted, 0 received, 100% packet loss, time 500 ms"
        );
        assert!(s.all_lost());
        // Mark-sent of nonsense sequence numbers is ignored.
        job.mark_sent(0, ms(1));
        job.mark_sent(60000, ms(1));
        assert_eq!(job.summary(ms(1)).transmitted, 1);
    }

    #[test]
    fn millis_have_three_significant_digits() {
        for (us, text) in [
            (352, "0.352"),
            (1_520, "1.52"),
            (9_999, "9.99"),
            (15_340, "15.3"),
            (153_400, "153"),
            (0, "0.000"),
        ] {
            assert_eq!(Millis(Duration::from_micros(us)).to_string(), text);
        }
    }
}
