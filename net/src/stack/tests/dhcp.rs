//! The DHCP client of a [`Stack`] against a fake server on the other end of the wire, in
//! simulated time: a lease is applied, renewed at T1, lost at expiry, replaced after a NAK; the
//! interface switches between static addresses and DHCP.

use alloc::vec::Vec;

use smoltcp::time::Duration;
use smoltcp::wire::{DhcpMessageType, Ipv4Address};

use super::*;
use crate::addr::Addressing;
use crate::dhcp::fake::FakeServer;
use crate::dhcp::{DhcpLine, DhcpState};

struct DhcpLink {
    node: Node,
    server: FakeServer,
    now: Instant,
}

impl DhcpLink {
    fn new(addr: Option<&str>, lease_secs: u32) -> DhcpLink {
        DhcpLink {
            node: node(1, addr),
            server: FakeServer::slirp_like(lease_secs),
            now: Instant::from_millis(0),
        }
    }

    fn stack(&mut self) -> &mut Stack<Nic> {
        &mut self.node.stack
    }

    /// `dt` of time: the node polls, the server answers what it sent.
    fn step(&mut self, dt: Duration) {
        self.now += dt;
        self.node.stack.poll(self.now, 64);
        let sent: Vec<Vec<u8>> = core::mem::take(&mut self.node.model.borrow_mut().sent);
        for frame in sent {
            for reply in self.server.handle(&frame) {
                self.node.model.borrow_mut().deliver(&reply);
            }
        }
    }

    /// Steps of 50 ms until `done` holds, for at most `limit` of simulated time.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut DhcpLink) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            self.step(Duration::from_millis(50));
            if done(self) {
                return true;
            }
        }
        false
    }

    fn lease(&self) -> Option<crate::dhcp::Lease> {
        self.node.stack.dhcp().and_then(|s| s.lease().cloned())
    }

    fn bound(&mut self) -> bool {
        self.lease().is_some()
    }
}

fn net(text: &str) -> Ipv4Net {
    Ipv4Net::parse(text).unwrap()
}

#[test]
fn a_lease_is_applied_renewed_and_lost_at_expiry() {
    let mut link = DhcpLink::new(None, 60);
    link.stack().set_addressing(Some(Addressing::Dhcp));
    assert_eq!(link.stack().dhcp(), Some(&DhcpState::Requesting));
    assert_eq!(link.stack().addressing(), Some(Addressing::Dhcp));
    assert_eq!(link.stack().address(), None);

    assert!(link.run_until(Duration::from_secs(30), DhcpLink::bound));
    let lease = link.lease().unwrap();
    let granted = link.now;
    assert_eq!(link.stack().address(), Some(net("10.0.2.15/24")));
    assert_eq!(lease.addr, net("10.0.2.15/24"));
    assert_eq!(lease.server, Ipv4([10, 0, 2, 2]));
    assert_eq!(lease.router, Some(Ipv4([10, 0, 2, 2])));
    assert_eq!(lease.duration, Some(Duration::from_secs(60)));
    assert_eq!(lease.renew_after, Some(Duration::from_secs(30)));
    assert_eq!((lease.renewals, lease.acked_at), (0, granted));
    assert_eq!(
        link.server.seen.iter().map(|s| s.kind).collect::<Vec<_>>(),
        [DhcpMessageType::Discover, DhcpMessageType::Request]
    );
    assert!(link
        .server
        .seen
        .iter()
        .all(|s| s.dst == Ipv4Address::BROADCAST));
    assert_eq!(
        DhcpLine {
            state: link.stack().dhcp().unwrap(),
            now: granted,
        }
        .to_string(),
        "dhcp: bound, server 10.0.2.2, router 10.0.2.2, lease 60 s, renews in 30 s, \
         expires in 60 s, renewed 0 times"
    );
    // The leased address is usable.
    assert!(link.stack().tcp_connect(Ipv4([10, 0, 2, 2]), 3260).is_ok());

    // At T1 the client asks its server directly (ARP first) and the lease is extended.
    assert!(link.run_until(Duration::from_secs(40), |l| l
        .lease()
        .is_some_and(|l| l.renewals == 1)));
    let renewed = link.lease().unwrap();
    let since_grant = renewed.acked_at - granted;
    assert!(
        since_grant >= Duration::from_secs(30) && since_grant < Duration::from_secs(31),
        "renewed {since_grant} after the grant"
    );
    let renew = link.server.seen[2];
    assert_eq!(renew.kind, DhcpMessageType::Request);
    assert_eq!(
        renew.dst,
        Ipv4Address::new(10, 0, 2, 2),
        "renewal is unicast"
    );
    assert_eq!(renew.client_ip, Ipv4Address::new(10, 0, 2, 15));
    assert_eq!(link.stack().address(), Some(net("10.0.2.15/24")));
    assert_eq!(
        renewed.expires_at(),
        Some(renewed.acked_at + Duration::from_secs(60))
    );

    // The server goes away: renewing, then rebinding, fail; at expiry the address goes.
    link.server.answering = false;
    let asked = link.server.seen.len();
    assert!(link.run_until(Duration::from_secs(70), |l| l.lease().is_none()));
    let lost = link.now - renewed.acked_at;
    assert!(
        lost >= Duration::from_secs(60) && lost < Duration::from_secs(61),
        "lease lost {lost} after the last ACK"
    );
    assert!(link.server.seen.len() > asked, "no renewal attempt");
    assert_eq!(link.stack().dhcp(), Some(&DhcpState::Requesting));
    assert_eq!(link.stack().address(), None);
    assert_eq!(
        link.stack().tcp_connect(Ipv4([10, 0, 2, 2]), 3260).err(),
        Some(ConnectError::NoLease)
    );
    assert_eq!(
        link.stack()
            .start_ping(Ipv4([10, 0, 2, 2]), "x", 1, Instant::from_millis(0))
            .err(),
        Some(PingError::NoLease)
    );

    // It comes back: a fresh lease.
    link.server.answering = true;
    assert!(link.run_until(Duration::from_secs(30), DhcpLink::bound));
    assert_eq!(link.lease().unwrap().renewals, 0);
    assert_eq!(link.stack().address(), Some(net("10.0.2.15/24")));
}

#[test]
fn a_nak_at_renewal_moves_the_interface_to_a_new_address() {
    let mut link = DhcpLink::new(None, 20);
    link.stack().set_addressing(Some(Addressing::Dhcp));
    assert!(link.run_until(Duration::from_secs(30), DhcpLink::bound));
    link.server.offer = Ipv4Address::new(10, 0, 2, 16);
    assert!(link.run_until(Duration::from_secs(30), |l| l
        .lease()
        .is_some_and(|l| l.addr.addr == Ipv4([10, 0, 2, 16]))));
    assert_eq!(link.server.naks, 1);
    assert_eq!(link.stack().address(), Some(net("10.0.2.16/24")));
    assert_eq!(link.lease().unwrap().renewals, 0);
}

#[test]
fn a_lease_without_a_lease_time_gets_smoltcps_default() {
    let mut link = DhcpLink::new(None, 0);
    link.server.lease_secs = None;
    link.stack().set_addressing(Some(Addressing::Dhcp));
    assert!(link.run_until(Duration::from_secs(30), DhcpLink::bound));
    let lease = link.lease().unwrap();
    assert_eq!(lease.duration, Some(crate::dhcp::DEFAULT_LEASE));
    assert_eq!(lease.renew_after, Some(crate::dhcp::DEFAULT_LEASE / 2));
}

#[test]
fn the_interface_switches_between_static_and_dhcp() {
    let mut link = DhcpLink::new(Some("10.10.0.1/24"), 3600);
    assert_eq!(
        link.stack().addressing(),
        Some(Addressing::Static(net("10.10.0.1/24")))
    );
    assert_eq!(link.stack().dhcp(), None);
    // Static: no DHCP traffic at all.
    link.run_until(Duration::from_secs(5), |_| false);
    assert!(link.server.seen.is_empty());

    link.stack().set_addressing(Some(Addressing::Dhcp));
    assert_eq!(
        link.stack().address(),
        None,
        "the static address is dropped"
    );
    assert!(link.run_until(Duration::from_secs(30), DhcpLink::bound));
    assert_eq!(link.stack().address(), Some(net("10.0.2.15/24")));
    // Asking for DHCP again keeps the lease (no new exchange).
    let asked = link.server.seen.len();
    link.stack().set_addressing(Some(Addressing::Dhcp));
    link.run_until(Duration::from_secs(2), |_| false);
    assert_eq!(link.server.seen.len(), asked);
    assert!(link.bound());

    // Back to static: the client stops, and stays quiet past the lease's T1.
    link.stack()
        .set_addressing(Some(Addressing::Static(net("10.0.2.30/24"))));
    assert_eq!(link.stack().dhcp(), None);
    assert_eq!(link.stack().address(), Some(net("10.0.2.30/24")));
    link.run_until(Duration::from_secs(2000), |_| false);
    assert_eq!(link.server.seen.len(), asked);

    // And DHCP again: the parked client starts over from DISCOVER.
    link.stack().set_addressing(Some(Addressing::Dhcp));
    assert_eq!(link.stack().dhcp(), Some(&DhcpState::Requesting));
    assert!(link.run_until(Duration::from_secs(30), DhcpLink::bound));
    assert_eq!(link.server.seen[asked].kind, DhcpMessageType::Discover);
    assert_eq!(link.stack().address(), Some(net("10.0.2.15/24")));

    link.stack().set_addressing(None);
    assert_eq!((link.stack().address(), link.stack().dhcp()), (None, None));
    assert_eq!(link.stack().addressing(), None);
}

#[test]
fn foreign_dhcp_answers_are_ignored() {
    let mut link = DhcpLink::new(None, 3600);
    link.stack().set_addressing(Some(Addressing::Dhcp));
    assert!(link.run_until(Duration::from_secs(30), DhcpLink::bound));
    let before = link.lease().unwrap();
    let received = link.stack().device_mut().counters().rx_packets;
    // A second server ACKs requests the node never made: one for another client, one for this
    // node's MAC under a transaction it never started.
    let mut rogue = FakeServer::slirp_like(60);
    rogue.ip = Ipv4Address::new(10, 0, 2, 3);
    rogue.offer = Ipv4Address::new(10, 0, 2, 99);
    for mac in [[0x52, 0x54, 0, 0, 9, 9], [0x52, 0x54, 0, 0, 1, 1]] {
        for reply in rogue.handle(&request_from(mac, rogue.offer)) {
            link.node.model.borrow_mut().deliver(&reply);
        }
    }
    assert_eq!(rogue.acks, 2);
    link.step(Duration::from_millis(1));
    assert_eq!(
        link.stack().device_mut().counters().rx_packets,
        received + 2
    );
    assert_eq!(link.lease(), Some(before));
    assert_eq!(link.stack().address(), Some(net("10.0.2.15/24")));
}

/// A DHCP REQUEST for `wanted` from `mac`, transaction 0xdead.
fn request_from(mac: [u8; 6], wanted: Ipv4Address) -> Vec<u8> {
    use smoltcp::wire::{DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame, EthernetProtocol};
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};
    let repr = DhcpRepr {
        message_type: DhcpMessageType::Request,
        transaction_id: 0xdead,
        secs: 0,
        client_hardware_address: EthernetAddress(mac),
        client_ip: Ipv4Address::UNSPECIFIED,
        your_ip: Ipv4Address::UNSPECIFIED,
        server_ip: Ipv4Address::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        broadcast: false,
        requested_ip: Some(wanted),
        client_identifier: None,
        server_identifier: None,
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let udp_len = 8 + repr.buffer_len();
    let ip_repr = Ipv4Repr {
        src_addr: Ipv4Address::UNSPECIFIED,
        dst_addr: Ipv4Address::BROADCAST,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let mut frame = alloc::vec![0u8; 14 + 20 + udp_len];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.set_src_addr(EthernetAddress(mac));
    eth.set_dst_addr(EthernetAddress::BROADCAST);
    eth.set_ethertype(EthernetProtocol::Ipv4);
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip_repr.emit(&mut ip, &caps);
    let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
    UdpRepr {
        src_port: 68,
        dst_port: 67,
    }
    .emit(
        &mut udp,
        &Ipv4Address::UNSPECIFIED.into(),
        &Ipv4Address::BROADCAST.into(),
        repr.buffer_len(),
        |buf| {
            let _ = repr.emit(&mut DhcpPacket::new_unchecked(buf));
        },
        &caps,
    );
    frame
}

#[test]
fn discovery_is_retried_every_four_seconds_while_no_server_answers() {
    let mut link = DhcpLink::new(None, 60);
    link.server.answering = false;
    link.stack().set_addressing(Some(Addressing::Dhcp));
    link.run_until(Duration::from_millis(12_500), |_| false);
    assert_eq!(link.server.seen.len(), 4, "{:?}", link.server.seen);
    assert!(link
        .server
        .seen
        .iter()
        .all(|s| s.kind == DhcpMessageType::Discover));
    assert_eq!(link.stack().dhcp(), Some(&DhcpState::Requesting));
    link.server.answering = true;
    assert!(link.run_until(Duration::from_secs(5), DhcpLink::bound));
}
