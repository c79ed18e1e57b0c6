//! Telling the network that a VM now lives on this host.
//!
//! After a VM resumes on a new host, the Ethernet switches between the hosts still forward frames
//! for the VM's MAC address to the port of the old host: they only learn the new port when a frame
//! *from* that MAC arrives on it. A silent guest would be unreachable until its entries age out
//! (minutes), so the new host sends a few broadcast frames with the VM's MAC as source on the
//! guest's behalf, right after the switchover.
//!
//! Two kinds of frames are in use:
//! - [`rarp_announce`]: a RARP "request reverse" frame, as QEMU sends (`qemu_announce_self`). It
//!   needs no IP address, which the host may not know for a guest, and nobody answers it.
//! - [`gratuitous_arp`]: an ARP announcement (RFC 5227 section 2.3: an ARP request whose sender and
//!   target protocol addresses are both the announced address), as Hyper-V and Linux bonding send.
//!   Besides the switches, it also refreshes the ARP caches of hosts on the segment.
//!
//! One frame can be lost, so they are repeated on QEMU's default schedule ([`AnnounceSchedule`]).
//! The builders return frames of exactly 60 bytes: the Ethernet minimum without the frame check
//! sequence, which the NIC appends.

#![forbid(unsafe_code)]

/// Length of every announcement frame: the Ethernet minimum frame size (64) minus the 4-byte FCS
/// that the NIC adds.
pub const ANNOUNCE_FRAME_LEN: usize = 60;

/// Destination of every announcement: every station on the segment has to see it.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// EtherType of ARP frames.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// EtherType of RARP frames (RFC 903).
pub const ETHERTYPE_RARP: u16 = 0x8035;

/// ARP hardware type of Ethernet.
const ARP_HARDWARE_ETHERNET: u16 = 1;
/// ARP protocol type of IPv4 (the IPv4 EtherType).
const ARP_PROTOCOL_IPV4: u16 = 0x0800;
/// ARP operation "request".
const ARP_OP_REQUEST: u16 = 1;
/// RARP operation "request reverse" (RFC 903).
const ARP_OP_REQUEST_REVERSE: u16 = 3;

/// The fields of an ARP/RARP frame for Ethernet and IPv4 that differ between announcements.
struct ArpFields {
    ethertype: u16,
    operation: u16,
    sender_mac: [u8; 6],
    sender_ip: [u8; 4],
    target_mac: [u8; 6],
    target_ip: [u8; 4],
}

/// Lays out a broadcast Ethernet frame carrying an ARP/RARP packet for Ethernet + IPv4, with the
/// sender MAC as the Ethernet source, zero-padded to [`ANNOUNCE_FRAME_LEN`].
fn arp_frame(fields: &ArpFields) -> [u8; ANNOUNCE_FRAME_LEN] {
    let mut frame = [0u8; ANNOUNCE_FRAME_LEN];
    // Ethernet header.
    frame[0..6].copy_from_slice(&BROADCAST_MAC);
    frame[6..12].copy_from_slice(&fields.sender_mac);
    frame[12..14].copy_from_slice(&fields.ethertype.to_be_bytes());
    // ARP packet (RFC 826 layout, also used by RARP).
    frame[14..16].copy_from_slice(&ARP_HARDWARE_ETHERNET.to_be_bytes());
    frame[16..18].copy_from_slice(&ARP_PROTOCOL_IPV4.to_be_bytes());
    frame[18] = 6; // hardware address length
    frame[19] = 4; // protocol address length
    frame[20..22].copy_from_slice(&fields.operation.to_be_bytes());
    frame[22..28].copy_from_slice(&fields.sender_mac);
    frame[28..32].copy_from_slice(&fields.sender_ip);
    frame[32..38].copy_from_slice(&fields.target_mac);
    frame[38..42].copy_from_slice(&fields.target_ip);
    // Bytes 42..60 stay zero: padding up to the Ethernet minimum.
    frame
}

/// A gratuitous ARP announcement of `ip` at `mac`.
///
/// Broadcast, EtherType 0x0806, ARP request with sender = target = `ip`. The target hardware
/// address is zero, as RFC 5227 asks for announcements and as Linux sends them.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> [u8; ANNOUNCE_FRAME_LEN] {
    arp_frame(&ArpFields {
        ethertype: ETHERTYPE_ARP,
        operation: ARP_OP_REQUEST,
        sender_mac: mac,
        sender_ip: ip,
        target_mac: [0; 6],
        target_ip: ip,
    })
}

/// A RARP announcement of `mac`, byte for byte what QEMU sends after a migration.
///
/// Broadcast, EtherType 0x8035, operation 3 ("request reverse"), sender and target hardware
/// addresses both `mac`, protocol addresses zero (the host need not know the guest's IP).
pub fn rarp_announce(mac: [u8; 6]) -> [u8; ANNOUNCE_FRAME_LEN] {
    arp_frame(&ArpFields {
        ethertype: ETHERTYPE_RARP,
        operation: ARP_OP_REQUEST_REVERSE,
        sender_mac: mac,
        sender_ip: [0; 4],
        target_mac: mac,
        target_ip: [0; 4],
    })
}

/// How many announcement rounds to send and how far apart (QEMU's `announce-*` parameters).
///
/// One round is one set of frames (one per MAC of the VM). The first round goes out at once; the
/// delay after the n-th round (n counted from 1) is `initial_ms + (n - 1) * step_ms`, capped at
/// `max_ms`: the same formula as QEMU's `qemu_announce_timer_step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceParams {
    /// Delay between the first and the second round.
    pub initial_ms: u64,
    /// Upper bound of any delay.
    pub max_ms: u64,
    /// Number of rounds in total, the immediate first one included.
    pub rounds: u32,
    /// How much each delay grows over the previous one.
    pub step_ms: u64,
}

impl AnnounceParams {
    /// QEMU's defaults (`DEFAULT_MIGRATE_ANNOUNCE_*`): 5 rounds, 50 ms growing by 100 ms, at most
    /// 550 ms. Rounds go out at 0, 50, 200, 450 and 800 ms.
    pub const QEMU_DEFAULT: Self = Self {
        initial_ms: 50,
        max_ms: 550,
        rounds: 5,
        step_ms: 100,
    };

    /// The delay between round `rounds_sent` (counted from 1) and the next one.
    ///
    /// Saturating arithmetic: absurd parameters give long delays, never an overflow.
    pub fn delay_after_round(&self, rounds_sent: u32) -> u64 {
        let growth = u64::from(rounds_sent.saturating_sub(1)).saturating_mul(self.step_ms);
        self.initial_ms.saturating_add(growth).min(self.max_ms)
    }
}

impl Default for AnnounceParams {
    fn default() -> Self {
        Self::QEMU_DEFAULT
    }
}

/// When to send the announcement rounds for one migrated VM: a state machine driven by the
/// caller's millisecond clock, made for a polling loop.
///
/// Call [`poll`](Self::poll) with the current time whenever convenient (at the latest at
/// [`next_due_ms`](Self::next_due_ms)); each time it returns `true`, send one round. Like QEMU, the
/// next delay counts from the moment a round actually went out, so a late poll shifts the rest of
/// the schedule instead of bunching rounds together, and at most one round is due per poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceSchedule {
    params: AnnounceParams,
    rounds_sent: u32,
    next_due_ms: u64,
}

impl AnnounceSchedule {
    /// A schedule whose first round is due at `now_ms`.
    pub fn new(params: AnnounceParams, now_ms: u64) -> Self {
        Self {
            params,
            rounds_sent: 0,
            next_due_ms: now_ms,
        }
    }

    /// Returns `true` if a round is due at `now_ms`; the caller must then send it. The round is
    /// counted as sent and the next one scheduled.
    pub fn poll(&mut self, now_ms: u64) -> bool {
        if self.is_done() || now_ms < self.next_due_ms {
            return false;
        }
        self.rounds_sent += 1;
        if !self.is_done() {
            let delay = self.params.delay_after_round(self.rounds_sent);
            self.next_due_ms = now_ms.saturating_add(delay);
        }
        true
    }

    /// When the next round is due, or `None` once all rounds were sent.
    pub fn next_due_ms(&self) -> Option<u64> {
        (!self.is_done()).then_some(self.next_due_ms)
    }

    /// Whether every round was sent.
    pub fn is_done(&self) -> bool {
        self.rounds_sent >= self.params.rounds
    }

    /// How many rounds were sent so far.
    pub fn rounds_sent(&self) -> u32 {
        self.rounds_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn gratuitous_arp_is_byte_exact() {
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            // Ethernet: broadcast destination, VM MAC source, EtherType ARP.
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x08, 0x06,
            // ARP: Ethernet, IPv4, lengths 6 and 4, request.
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01,
            // Sender: VM MAC, 10.0.2.15.
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 0, 2, 15,
            // Target: zero MAC, 10.0.2.15 again.
            0, 0, 0, 0, 0, 0, 10, 0, 2, 15,
            // Padding to 60 bytes.
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(gratuitous_arp(VM_MAC, [10, 0, 2, 15]), expected);
    }

    #[test]
    fn rarp_announce_is_byte_exact() {
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            // Ethernet: broadcast destination, VM MAC source, EtherType RARP.
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x80, 0x35,
            // RARP: Ethernet, IPv4, lengths 6 and 4, request reverse.
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03,
            // Sender: VM MAC, no IP.
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0,
            // Target: VM MAC, no IP.
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0,
            // Padding to 60 bytes.
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(rarp_announce(VM_MAC), expected);
    }

    /// Polls `schedule` every millisecond from `start_ms` and returns the times rounds went out.
    fn send_times(mut schedule: AnnounceSchedule, start_ms: u64) -> Vec<u64> {
        let mut times = Vec::new();
        let mut now = start_ms;
        while !schedule.is_done() {
            if schedule.poll(now) {
                times.push(now);
            }
            now += 1;
        }
        times
    }

    #[test]
    fn qemu_default_parameters() {
        assert_eq!(
            AnnounceParams::default(),
            AnnounceParams {
                initial_ms: 50,
                max_ms: 550,
                rounds: 5,
                step_ms: 100
            }
        );
    }

    #[test]
    fn default_schedule_matches_qemu_timing() {
        let schedule = AnnounceSchedule::new(AnnounceParams::QEMU_DEFAULT, 1000);
        // QEMU sends the first round at once, then waits 50, 150, 250, 350 ms.
        assert_eq!(send_times(schedule, 1000), [1000, 1050, 1200, 1450, 1800]);
    }

    #[test]
    fn delays_grow_by_step_and_are_capped_at_max() {
        let params = AnnounceParams {
            rounds: 9,
            ..AnnounceParams::QEMU_DEFAULT
        };
        let delays: Vec<u64> = (1..params.rounds)
            .map(|n| params.delay_after_round(n))
            .collect();
        assert_eq!(delays, [50, 150, 250, 350, 450, 550, 550, 550]);
    }

    #[test]
    fn next_due_and_done_state() {
        let mut schedule = AnnounceSchedule::new(AnnounceParams::QEMU_DEFAULT, 0);
        assert_eq!(schedule.next_due_ms(), Some(0));
        assert!(schedule.poll(0));
        assert_eq!(schedule.rounds_sent(), 1);
        assert_eq!(schedule.next_due_ms(), Some(50));
        assert!(!schedule.poll(49), "not due before its time");
        assert!(schedule.poll(50));
        assert!(!schedule.poll(50), "one round per due time");
        for now in [200, 450, 800] {
            assert!(schedule.poll(now));
        }
        assert!(schedule.is_done());
        assert_eq!(schedule.next_due_ms(), None);
        assert!(!schedule.poll(u64::MAX));
        assert_eq!(schedule.rounds_sent(), 5);
    }

    #[test]
    fn late_poll_shifts_the_rest_of_the_schedule() {
        let mut schedule = AnnounceSchedule::new(AnnounceParams::QEMU_DEFAULT, 0);
        assert!(schedule.poll(0));
        // The loop was busy until 500 ms: one round goes out, the next is 150 ms after it.
        assert!(schedule.poll(500));
        assert!(!schedule.poll(501));
        assert_eq!(schedule.next_due_ms(), Some(650));
    }

    #[test]
    fn zero_rounds_sends_nothing() {
        let params = AnnounceParams {
            rounds: 0,
            ..AnnounceParams::QEMU_DEFAULT
        };
        let mut schedule = AnnounceSchedule::new(params, 0);
        assert!(schedule.is_done());
        assert_eq!(schedule.next_due_ms(), None);
        assert!(!schedule.poll(0));
    }

    #[test]
    fn extreme_parameters_do_not_overflow() {
        let params = AnnounceParams {
            initial_ms: u64::MAX,
            max_ms: u64::MAX,
            rounds: u32::MAX,
            step_ms: u64::MAX,
        };
        assert_eq!(params.delay_after_round(u32::MAX), u64::MAX);
        let mut schedule = AnnounceSchedule::new(params, u64::MAX - 1);
        assert!(schedule.poll(u64::MAX - 1));
        assert_eq!(schedule.next_due_ms(), Some(u64::MAX));
    }
}
