//! A DHCP server for host tests, on the other end of a fake NIC's wire: it answers ARP for its
//! own address, DISCOVER with an OFFER and REQUEST with an ACK (or a NAK for an address it does
//! not offer), and records what it was asked. It can fall silent, like a server that went away.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, UdpPacket,
    UdpRepr, DHCP_CLIENT_PORT, DHCP_SERVER_PORT,
};

/// A message the server received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub kind: DhcpMessageType,
    /// The IPv4 destination: broadcast (discover, request, rebind) or the server (renew).
    pub dst: Ipv4Address,
    /// `ciaddr`: set when the client renews or rebinds a lease it holds.
    pub client_ip: Ipv4Address,
}

pub struct FakeServer {
    pub mac: [u8; 6],
    pub ip: Ipv4Address,
    /// The address it hands out, and the subnet's prefix length.
    pub offer: Ipv4Address,
    pub prefix: u8,
    pub router: Option<Ipv4Address>,
    /// The lease time it grants (`None`: no lease-time option).
    pub lease_secs: Option<u32>,
    /// False: it hears everything and answers nothing.
    pub answering: bool,
    pub seen: Vec<Seen>,
    pub acks: usize,
    pub naks: usize,
}

impl FakeServer {
    /// QEMU's user-network server: 10.0.2.2, handing out 10.0.2.15/24, router 10.0.2.2.
    pub fn slirp_like(lease_secs: u32) -> FakeServer {
        FakeServer {
            mac: [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02],
            ip: Ipv4Address::new(10, 0, 2, 2),
            offer: Ipv4Address::new(10, 0, 2, 15),
            prefix: 24,
            router: Some(Ipv4Address::new(10, 0, 2, 2)),
            lease_secs: Some(lease_secs),
            answering: true,
            seen: Vec::new(),
            acks: 0,
            naks: 0,
        }
    }

    /// The frames it sends in answer to `frame`.
    pub fn handle(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return Vec::new();
        };
        let client = eth.src_addr();
        match eth.ethertype() {
            EthernetProtocol::Arp => self.arp(client, eth.payload()),
            EthernetProtocol::Ipv4 => self.dhcp(client, eth.payload()),
            _ => None,
        }
        .into_iter()
        .collect()
    }

    fn arp(&mut self, client: EthernetAddress, payload: &[u8]) -> Option<Vec<u8>> {
        let packet = ArpPacket::new_checked(payload).ok()?;
        let ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = ArpRepr::parse(&packet).ok()?
        else {
            return None;
        };
        if target_protocol_addr != self.ip || !self.answering {
            return None;
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(self.mac),
            source_protocol_addr: self.ip,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let mut frame = vec![0u8; 14 + reply.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_dst_addr(client);
        eth.set_src_addr(EthernetAddress(self.mac));
        eth.set_ethertype(EthernetProtocol::Arp);
        reply.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        Some(frame)
    }

    fn dhcp(&mut self, client: EthernetAddress, payload: &[u8]) -> Option<Vec<u8>> {
        let ip = Ipv4Packet::new_checked(payload).ok()?;
        if ip.next_header() != IpProtocol::Udp {
            return None;
        }
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        if udp.dst_port() != DHCP_SERVER_PORT {
            return None;
        }
        let packet = DhcpPacket::new_checked(udp.payload()).ok()?;
        let request = DhcpRepr::parse(&packet).ok()?;
        self.seen.push(Seen {
            kind: request.message_type,
            dst: ip.dst_addr(),
            client_ip: request.client_ip,
        });
        if !self.answering {
            return None;
        }
        let wanted = request.requested_ip.unwrap_or(request.client_ip);
        let kind = match request.message_type {
            DhcpMessageType::Discover => DhcpMessageType::Offer,
            DhcpMessageType::Request if wanted == self.offer => {
                self.acks += 1;
                DhcpMessageType::Ack
            }
            DhcpMessageType::Request => {
                self.naks += 1;
                DhcpMessageType::Nak
            }
            _ => return None,
        };
        let granting = kind != DhcpMessageType::Nak;
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        let reply = DhcpRepr {
            message_type: kind,
            transaction_id: request.transaction_id,
            secs: 0,
            client_hardware_address: request.client_hardware_address,
            client_ip: Ipv4Address::UNSPECIFIED,
            your_ip: if granting {
                self.offer
            } else {
                Ipv4Address::UNSPECIFIED
            },
            server_ip: self.ip,
            router: self.router.filter(|_| granting),
            subnet_mask: granting.then_some(Ipv4Address::from_bits(mask)),
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast: false,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(self.ip),
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: self.lease_secs.filter(|_| granting),
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        // A renewal is answered to the client's address, the rest to everyone.
        let dst = if request.client_ip.is_unspecified() || !granting {
            Ipv4Address::BROADCAST
        } else {
            request.client_ip
        };
        Some(self.udp_frame(client, dst, &reply))
    }

    fn udp_frame(&self, client: EthernetAddress, dst: Ipv4Address, reply: &DhcpRepr) -> Vec<u8> {
        let dhcp_len = reply.buffer_len();
        let udp_len = 8 + dhcp_len;
        let ip_repr = Ipv4Repr {
            src_addr: self.ip,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: udp_len,
            hop_limit: 64,
        };
        let mut frame = vec![0u8; 14 + ip_repr.buffer_len() + udp_len];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_dst_addr(client);
        eth.set_src_addr(EthernetAddress(self.mac));
        eth.set_ethertype(EthernetProtocol::Ipv4);
        let caps = ChecksumCapabilities::default();
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip_repr.emit(&mut ip, &caps);
        let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
        UdpRepr {
            src_port: DHCP_SERVER_PORT,
            dst_port: DHCP_CLIENT_PORT,
        }
        .emit(
            &mut udp,
            &self.ip.into(),
            &dst.into(),
            dhcp_len,
            |buf| {
                // The buffer is exactly `buffer_len` bytes: emitting cannot run out of room.
                let _ = reply.emit(&mut DhcpPacket::new_unchecked(buf));
            },
            &caps,
        );
        frame
    }
}
