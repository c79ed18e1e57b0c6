//! A mirror of smoltcp's neighbor (ARP) cache, for `net arp`.
//!
//! smoltcp keeps its cache private, so the stack shows every received frame to a
//! [`NeighborTable`] that applies smoltcp's own rules (smoltcp 0.14, `iface/interface/ipv4.rs`
//! and `iface/neighbor.rs`):
//! - an ARP request or reply *for our address* from a unicast sender in our subnet fills the
//!   entry for the sender (60 s lifetime), replacing an older one;
//! - an IPv4 packet to our address refreshes the sender's entry when it came from the same MAC;
//! - a full table evicts the entry that expires first;
//! - changing the interface address flushes everything.
//!
//! Malformed frames are ignored: parsing never trusts a length it has not checked.

use alloc::string::ToString;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::time::{Duration, Instant};

use crate::addr::{Ipv4, Ipv4Net};
use crate::e1000::Mac;

/// How long an entry lives after it was filled or refreshed (smoltcp's `ENTRY_LIFETIME`).
pub const ENTRY_LIFETIME: Duration = Duration::from_millis(60_000);

/// Entries kept (the `iface-neighbor-cache-count-*` feature smoltcp is built with).
pub const CAPACITY: usize = 128;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;

/// One neighbor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbor {
    pub ip: Ipv4,
    pub mac: [u8; 6],
    pub expires_at: Instant,
}

/// `10.10.0.2 at 52:54:00:00:01:02, expires in 58 s`.
pub struct NeighborLine<'a> {
    pub neighbor: &'a Neighbor,
    pub now: Instant,
}

impl fmt::Display for NeighborLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let left = (self.neighbor.expires_at - self.now).total_millis();
        write!(
            f,
            "{:<15} {}  expires in {}.{} s",
            self.neighbor.ip.to_string(),
            Mac(self.neighbor.mac),
            left / 1000,
            left % 1000 / 100
        )
    }
}

/// The mirrored cache.
#[derive(Debug, Clone, Default)]
pub struct NeighborTable {
    entries: Vec<Neighbor>,
}

fn is_unicast_mac(mac: &[u8]) -> bool {
    mac[0] & 1 == 0 && mac.iter().any(|&b| b != 0)
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

fn ip_at(bytes: &[u8], at: usize) -> Option<Ipv4> {
    let b = bytes.get(at..at + 4)?;
    Some(Ipv4([b[0], b[1], b[2], b[3]]))
}

fn mac_at(bytes: &[u8], at: usize) -> Option<[u8; 6]> {
    let b = bytes.get(at..at + 6)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(b);
    Some(mac)
}

impl NeighborTable {
    pub fn new() -> Self {
        NeighborTable::default()
    }

    /// Looks at one received Ethernet frame; `own` is the interface address.
    pub fn observe(&mut self, frame: &[u8], own: Option<Ipv4Net>, now: Instant) {
        let Some(own) = own else { return };
        let Some(ethertype) = be16(frame, 12) else {
            return;
        };
        let payload = &frame[14.min(frame.len())..];
        match ethertype {
            ETHERTYPE_ARP => self.observe_arp(payload, own, now),
            ETHERTYPE_IPV4 => {
                let Some(src_mac) = mac_at(frame, 6) else {
                    return;
                };
                let (Some(src), Some(dst)) = (ip_at(payload, 12), ip_at(payload, 16)) else {
                    return;
                };
                // smoltcp only gets this far for a well-formed header addressed to us.
                let version_ok = payload.first().is_some_and(|b| b >> 4 == 4);
                if version_ok && dst == own.addr {
                    if let Some(e) = self
                        .entries
                        .iter_mut()
                        .find(|e| e.ip == src && e.mac == src_mac)
                    {
                        e.expires_at = now + ENTRY_LIFETIME;
                    }
                }
            }
            _ => {}
        }
    }

    fn observe_arp(&mut self, arp: &[u8], own: Ipv4Net, now: Instant) {
        // Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4.
        if be16(arp, 0) != Some(1)
            || be16(arp, 2) != Some(ETHERTYPE_IPV4)
            || arp.get(4) != Some(&6)
            || arp.get(5) != Some(&4)
        {
            return;
        }
        let operation = be16(arp, 6);
        let (Some(sender_mac), Some(sender_ip), Some(target_ip)) =
            (mac_at(arp, 8), ip_at(arp, 14), ip_at(arp, 24))
        else {
            return;
        };
        if target_ip != own.addr
            || !matches!(operation, Some(1) | Some(2))
            || !sender_ip.is_unicast()
            || !is_unicast_mac(&sender_mac)
            || !own.contains(sender_ip)
        {
            return;
        }
        self.fill(sender_ip, sender_mac, now);
    }

    /// Adds or replaces the entry for `ip`.
    pub fn fill(&mut self, ip: Ipv4, mac: [u8; 6], now: Instant) {
        let entry = Neighbor {
            ip,
            mac,
            expires_at: now + ENTRY_LIFETIME,
        };
        if let Some(e) = self.entries.iter_mut().find(|e| e.ip == ip) {
            *e = entry;
            return;
        }
        if self.entries.len() >= CAPACITY {
            if let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.expires_at)
                .map(|(i, _)| i)
            {
                self.entries.swap_remove(oldest);
            }
        }
        self.entries.push(entry);
    }

    /// Forgets everything (the interface address changed).
    pub fn flush(&mut self) {
        self.entries.clear();
    }

    /// The entries smoltcp would still use at `now`, sorted by address.
    pub fn valid(&self, now: Instant) -> Vec<Neighbor> {
        let mut v: Vec<Neighbor> = self
            .entries
            .iter()
            .filter(|e| e.expires_at > now)
            .copied()
            .collect();
        v.sort_by_key(|e| e.ip);
        v
    }

    /// The MAC of `ip`, if known and not expired.
    pub fn lookup(&self, ip: Ipv4, now: Instant) -> Option<[u8; 6]> {
        self.entries
            .iter()
            .find(|e| e.ip == ip && e.expires_at > now)
            .map(|e| e.mac)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    const OWN_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 1, 1];
    const PEER_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 1, 2];

    fn own() -> Option<Ipv4Net> {
        Some(Ipv4Net::parse("10.10.0.1/24").unwrap())
    }

    pub fn arp(op: u16, sender_mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xFF; 6];
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&sender);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f
    }

    fn ipv4(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut f = OWN_MAC.to_vec();
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f
    }

    fn t(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn arp_for_us_fills_and_ip_refreshes() {
        let mut table = NeighborTable::new();
        table.observe(
            &arp(1, PEER_MAC, [10, 10, 0, 2], [10, 10, 0, 1]),
            own(),
            t(1000),
        );
        let v = table.valid(t(1000));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].ip, Ipv4([10, 10, 0, 2]));
        assert_eq!(v[0].mac, PEER_MAC);
        assert_eq!(v[0].expires_at, t(61_000));
        // A packet to us from the same MAC refreshes it; from another MAC it does not.
        table.observe(
            &ipv4(PEER_MAC, [10, 10, 0, 2], [10, 10, 0, 1]),
            own(),
            t(30_000),
        );
        assert_eq!(table.valid(t(0))[0].expires_at, t(90_000));
        table.observe(
            &ipv4([2; 6], [10, 10, 0, 2], [10, 10, 0, 1]),
            own(),
            t(50_000),
        );
        assert_eq!(table.valid(t(0))[0].expires_at, t(90_000));
        assert_eq!(
            table.lookup(Ipv4([10, 10, 0, 2]), t(89_999)),
            Some(PEER_MAC)
        );
        assert_eq!(table.lookup(Ipv4([10, 10, 0, 2]), t(90_000)), None);
        assert!(table.valid(t(90_000)).is_empty());
        // A reply replaces the MAC.
        table.observe(
            &arp(2, [6; 6], [10, 10, 0, 2], [10, 10, 0, 1]),
            own(),
            t(100_000),
        );
        assert_eq!(table.lookup(Ipv4([10, 10, 0, 2]), t(100_000)), Some([6; 6]));
        let line = format!(
            "{}",
            NeighborLine {
                neighbor: &table.valid(t(0))[0],
                now: t(100_500)
            }
        );
        assert_eq!(line, "10.10.0.2       06:06:06:06:06:06  expires in 59.5 s");
    }

    #[test]
    fn arp_not_for_us_is_ignored() {
        let mut table = NeighborTable::new();
        let cases = [
            arp(1, PEER_MAC, [10, 10, 0, 2], [10, 10, 0, 3]), // for someone else
            arp(3, PEER_MAC, [10, 10, 0, 2], [10, 10, 0, 1]), // RARP-style operation
            arp(1, PEER_MAC, [10, 10, 1, 2], [10, 10, 0, 1]), // sender outside our subnet
            arp(1, [1, 0, 0, 0, 0, 1], [10, 10, 0, 2], [10, 10, 0, 1]), // multicast sender
            arp(1, [0; 6], [10, 10, 0, 2], [10, 10, 0, 1]),   // zero sender MAC
            arp(1, PEER_MAC, [0, 0, 0, 0], [10, 10, 0, 1]),   // probe from 0.0.0.0
        ];
        for f in &cases {
            table.observe(f, own(), t(0));
        }
        assert!(table.valid(t(0)).is_empty());
        // No address on the interface: nothing is learned.
        table.observe(
            &arp(1, PEER_MAC, [10, 10, 0, 2], [10, 10, 0, 1]),
            None,
            t(0),
        );
        assert!(table.valid(t(0)).is_empty());
    }

    #[test]
    fn full_table_evicts_the_first_to_expire() {
        let mut table = NeighborTable::new();
        for i in 0..CAPACITY {
            let ip = Ipv4([10, 10, 0, 2 + i as u8]);
            table.fill(ip, PEER_MAC, t(i as i64));
        }
        table.fill(Ipv4([10, 10, 0, 250]), PEER_MAC, t(10_000));
        let v = table.valid(t(0));
        assert_eq!(v.len(), CAPACITY);
        assert!(v.iter().all(|e| e.ip != Ipv4([10, 10, 0, 2])));
        table.flush();
        assert!(table.valid(t(0)).is_empty());
    }

    #[test]
    fn truncated_and_garbage_frames_are_ignored() {
        let mut table = NeighborTable::new();
        let full = arp(1, PEER_MAC, [10, 10, 0, 2], [10, 10, 0, 1]);
        for len in 0..full.len() {
            table.observe(&full[..len], own(), t(0));
        }
        assert!(table.valid(t(0)).is_empty());
        let ip = ipv4(PEER_MAC, [10, 10, 0, 2], [10, 10, 0, 1]);
        for len in 0..ip.len() {
            table.observe(&ip[..len], own(), t(0));
        }
        let mut x = 88172645463325252u64;
        for _ in 0..2000 {
            let len = (x % 80) as usize;
            let mut f = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f.push(x as u8);
            }
            if f.len() > 13 && x % 2 == 0 {
                f[12] = 0x08;
                f[13] = 0x06;
            }
            table.observe(&f, own(), t(0));
        }
    }
}
