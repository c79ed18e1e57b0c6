//! DHCP on an interface: smoltcp's DHCPv4 client socket does the protocol (discover, request,
//! renew at T1, rebind at T2, give up at expiry); this module keeps what `net show` tells about
//! it, the [`DhcpState`].
//!
//! smoltcp reports a lease only when it changes, unless the socket has a receive-packet buffer:
//! then every accepted ACK is reported with its packet. [`Client`] gives the socket one, so a
//! renewal is seen (and counted) and the lease time read from the ACK itself.

use alloc::boxed::Box;
use alloc::vec;
use core::fmt;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::dhcpv4;
use smoltcp::socket::Socket;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{DhcpMessageType, DhcpPacket, DhcpRepr};

use crate::addr::{Ipv4, Ipv4Net};

#[cfg(test)]
pub(crate) mod fake;

/// The lease time smoltcp assumes when an ACK carries none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);

/// Time between two DISCOVERs while no server answers.
pub const DISCOVER_RETRY: Duration = Duration::from_secs(4);

/// Bytes kept of the last DHCP packet (a DHCP message fits an Ethernet frame's payload).
const PACKET_BUFFER: usize = 1500;

/// The current lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub addr: Ipv4Net,
    /// The default gateway the server named (shown only: the storage network is on-link).
    pub router: Option<Ipv4>,
    /// The server that granted the lease (renewals go to it).
    pub server: Ipv4,
    /// The lease time of the last ACK (`None`: that ACK could not be read back).
    pub duration: Option<Duration>,
    /// The renewal time T1 of the last ACK.
    pub renew_after: Option<Duration>,
    /// When the last ACK arrived.
    pub acked_at: Instant,
    /// ACKs since the lease was first granted.
    pub renewals: u32,
}

impl Lease {
    pub fn expires_at(&self) -> Option<Instant> {
        self.duration.map(|d| self.acked_at + d)
    }

    pub fn renews_at(&self) -> Option<Instant> {
        self.renew_after.map(|d| self.acked_at + d)
    }
}

/// What the DHCP client of an interface has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpState {
    /// No lease: discovering a server or requesting an address.
    Requesting,
    Bound(Lease),
}

impl DhcpState {
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            DhcpState::Requesting => None,
            DhcpState::Bound(lease) => Some(lease),
        }
    }
}

/// `net show`'s line for a [`DhcpState`] at `now`, e.g. `dhcp: bound, server 10.0.2.2, router
/// 10.0.2.2, lease 86400 s, renews in 43199 s, expires in 86399 s, renewed 0 times`.
pub struct DhcpLine<'a> {
    pub state: &'a DhcpState,
    pub now: Instant,
}

impl fmt::Display for DhcpLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lease = match self.state {
            DhcpState::Requesting => return write!(f, "dhcp: requesting"),
            DhcpState::Bound(lease) => lease,
        };
        let secs_until = |t: Instant| {
            if t > self.now {
                (t - self.now).secs()
            } else {
                0
            }
        };
        let renewing = lease.renews_at().is_some_and(|t| t <= self.now);
        write!(
            f,
            "dhcp: {}, server {}",
            if renewing { "renewing" } else { "bound" },
            lease.server
        )?;
        if let Some(router) = lease.router {
            write!(f, ", router {router}")?;
        }
        match lease.duration {
            Some(d) => write!(f, ", lease {} s", d.secs())?,
            None => write!(f, ", lease time unknown")?,
        }
        if let Some(t) = lease.renews_at().filter(|_| !renewing) {
            write!(f, ", renews in {} s", secs_until(t))?;
        }
        if let Some(t) = lease.expires_at() {
            write!(f, ", expires in {} s", secs_until(t))?;
        }
        match lease.renewals {
            1 => write!(f, ", renewed once"),
            n => write!(f, ", renewed {n} times"),
        }
    }
}

/// What a [`Client::poll`] asks of the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressChange {
    None,
    /// Use this address (a new lease, or a renewal that moved it).
    Set(Ipv4Net),
    /// The lease is gone: drop the address.
    Clear,
}

impl AddressChange {
    /// The address to install, if it changes.
    pub(crate) fn new_address(self) -> Option<Option<Ipv4Net>> {
        match self {
            AddressChange::None => None,
            AddressChange::Set(net) => Some(Some(net)),
            AddressChange::Clear => Some(None),
        }
    }
}

/// The DHCP client of one interface: its socket in the interface's socket set while running,
/// parked (kept for the next start, with its packet buffer) while the interface is static.
pub(crate) struct Client {
    running: Option<(SocketHandle, DhcpState)>,
    parked: Option<dhcpv4::Socket<'static>>,
}

impl Client {
    pub(crate) fn new() -> Client {
        Client {
            running: None,
            parked: None,
        }
    }

    pub(crate) fn state(&self) -> Option<&DhcpState> {
        self.running.as_ref().map(|(_, state)| state)
    }

    /// Starts the client (from no lease); nothing if it already runs.
    pub(crate) fn start(&mut self, sockets: &mut SocketSet<'static>) {
        if self.running.is_some() {
            return;
        }
        let socket = match self.parked.take() {
            Some(mut socket) => {
                socket.reset();
                socket
            }
            None => {
                let mut socket = dhcpv4::Socket::new();
                // RFC 2131 suggests 4 s before the first retransmission (smoltcp waits 10 s): a
                // DISCOVER sent while the link still comes up after the NIC's reset is lost.
                let mut retry = socket.get_retry_config();
                retry.discover_timeout = DISCOVER_RETRY;
                socket.set_retry_config(retry);
                // One buffer for the interface's lifetime: the socket keeps it while parked.
                socket.set_receive_packet_buffer(Box::leak(
                    vec![0u8; PACKET_BUFFER].into_boxed_slice(),
                ));
                socket
            }
        };
        let handle = sockets.add(socket);
        self.running = Some((handle, DhcpState::Requesting));
    }

    /// Stops the client (the lease is forgotten, not released: smoltcp has no RELEASE).
    pub(crate) fn stop(&mut self, sockets: &mut SocketSet<'static>) {
        if let Some((handle, _)) = self.running.take() {
            if let Socket::Dhcpv4(socket) = sockets.remove(handle) {
                self.parked = Some(socket);
            }
        }
    }

    /// Takes the socket's news, if any.
    pub(crate) fn poll(&mut self, sockets: &mut SocketSet<'static>, now: Instant) -> AddressChange {
        let Some((handle, state)) = self.running.as_mut() else {
            return AddressChange::None;
        };
        let socket = sockets.get_mut::<dhcpv4::Socket>(*handle);
        match socket.poll() {
            None => AddressChange::None,
            Some(dhcpv4::Event::Deconfigured) => {
                let had = matches!(state, DhcpState::Bound(_));
                *state = DhcpState::Requesting;
                if had {
                    AddressChange::Clear
                } else {
                    AddressChange::None
                }
            }
            Some(dhcpv4::Event::Configured(config)) => {
                let addr = Ipv4Net {
                    addr: Ipv4(config.address.address().octets()),
                    prefix: config.address.prefix_len(),
                };
                let server = Ipv4(config.server.address.octets());
                let (duration, renew_after) = config
                    .packet
                    .as_ref()
                    .and_then(ack_times)
                    .map_or((None, None), |(d, t1)| (Some(d), Some(t1)));
                let previous = state.lease();
                let renewals = match previous {
                    Some(old) if old.addr == addr && old.server == server => old.renewals + 1,
                    _ => 0,
                };
                let change = if previous.is_some_and(|old| old.addr == addr) {
                    AddressChange::None
                } else {
                    AddressChange::Set(addr)
                };
                *state = DhcpState::Bound(Lease {
                    addr,
                    router: config.router.map(|r| Ipv4(r.octets())),
                    server,
                    duration,
                    renew_after,
                    acked_at: now,
                    renewals,
                });
                change
            }
        }
    }
}

/// The lease time and T1 of an ACK, as smoltcp derives them (RFC 2131 defaults: T1 half the
/// lease, T2 seven eighths; T1 and T2 from the server only when T1 < T2 < lease).
fn ack_times(packet: &DhcpPacket<&[u8]>) -> Option<(Duration, Duration)> {
    let repr = DhcpRepr::parse(packet).ok()?;
    if repr.message_type != DhcpMessageType::Ack {
        return None;
    }
    let lease = repr
        .lease_duration
        .map_or(DEFAULT_LEASE, |s| Duration::from_secs(s.into()));
    let secs = |s: u32| Duration::from_secs(s.into());
    let t1 = match (
        repr.renew_duration.map(secs),
        repr.rebind_duration.map(secs),
    ) {
        (Some(t1), Some(t2)) if t1 < t2 && t2 < lease => t1,
        (Some(t1), None) if t1 < lease => t1,
        (None, Some(t2)) if t2 < lease => (lease / 2).min(t2),
        _ => lease / 2,
    };
    Some((lease, t1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn lease(renewals: u32) -> Lease {
        Lease {
            addr: Ipv4Net::parse("10.0.2.15/24").unwrap(),
            router: Some(Ipv4([10, 0, 2, 2])),
            server: Ipv4([10, 0, 2, 2]),
            duration: Some(Duration::from_secs(86400)),
            renew_after: Some(Duration::from_secs(43200)),
            acked_at: Instant::from_secs(10),
            renewals,
        }
    }

    #[test]
    fn status_lines() {
        let line = |state: &DhcpState, now: u64| {
            DhcpLine {
                state,
                now: Instant::from_secs(now as i64),
            }
            .to_string()
        };
        assert_eq!(line(&DhcpState::Requesting, 0), "dhcp: requesting");
        let bound = DhcpState::Bound(lease(0));
        assert_eq!(
            line(&bound, 11),
            "dhcp: bound, server 10.0.2.2, router 10.0.2.2, lease 86400 s, renews in 43199 s, \
             expires in 86399 s, renewed 0 times"
        );
        // Past T1 the client is renewing; past expiry nothing is left to count down.
        assert_eq!(
            line(&DhcpState::Bound(lease(2)), 43300),
            "dhcp: renewing, server 10.0.2.2, router 10.0.2.2, lease 86400 s, \
             expires in 43110 s, renewed 2 times"
        );
        let unknown = Lease {
            router: None,
            duration: None,
            renew_after: None,
            ..lease(1)
        };
        assert_eq!(
            line(&DhcpState::Bound(unknown), 20),
            "dhcp: bound, server 10.0.2.2, lease time unknown, renewed once"
        );
        assert_eq!(
            bound.lease().unwrap().expires_at(),
            Some(Instant::from_secs(86410))
        );
        assert_eq!(DhcpState::Requesting.lease(), None);
    }
}
