//! IPv4 addresses and prefixes as the node configuration and the console spell them:
//! `10.10.0.1` and `10.10.0.1/24`.
//!
//! Parsing is strict: four decimal numbers 0..=255 without leading zeros (`010` could mean octal
//! to a reader), a prefix 1..=32. An interface address must be unicast (not 0.0.0.0, loopback,
//! multicast, reserved or broadcast) and, in prefixes of /30 and shorter, neither the network
//! nor the broadcast address of its own subnet.
//!
//! An interface is configured with an [`Addressing`]: a static `a.b.c.d/nn`, or `dhcp`. A
//! service on another host is an [`Endpoint`]: `a.b.c.d` or `a.b.c.d:port` (an iSCSI portal).

use core::fmt;

/// An IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4(pub [u8; 4]);

/// An interface address with its prefix length: `10.10.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4,
    /// 1..=32.
    pub prefix: u8,
}

/// What is wrong with an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrError {
    /// Not four dot-separated decimal numbers 0..=255 (without leading zeros).
    Syntax,
    /// No `/prefix`, or a prefix outside 1..=32.
    Prefix,
    /// 0.0.0.0, 127.x, 224.x and above (multicast, reserved, broadcast), or 0.x.
    NotUnicast,
    /// The network or broadcast address of its own subnet.
    SubnetEdge,
    /// A `:port` that is not a decimal number 1..=65535.
    Port,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrError::Syntax => "not an IPv4 address (a.b.c.d, each 0..255)",
            AddrError::Prefix => "needs a prefix length /1 to /32 (e.g. 10.10.0.1/24)",
            AddrError::NotUnicast => "not a unicast address",
            AddrError::SubnetEdge => "the network or broadcast address of its subnet",
            AddrError::Port => "the port must be a number from 1 to 65535",
        })
    }
}

impl Ipv4 {
    /// Parses `a.b.c.d` (syntax only: any address).
    pub fn parse(text: &str) -> Result<Ipv4, AddrError> {
        let mut out = [0u8; 4];
        let mut parts = text.split('.');
        for byte in &mut out {
            let part = parts.next().ok_or(AddrError::Syntax)?;
            let digits_ok = !part.is_empty()
                && part.len() <= 3
                && part.bytes().all(|b| b.is_ascii_digit())
                && !(part.len() > 1 && part.starts_with('0'));
            if !digits_ok {
                return Err(AddrError::Syntax);
            }
            *byte = part.parse::<u8>().map_err(|_| AddrError::Syntax)?;
        }
        if parts.next().is_some() {
            return Err(AddrError::Syntax);
        }
        Ok(Ipv4(out))
    }

    /// Parses an address a host may use (see [`is_unicast`](Self::is_unicast)).
    pub fn parse_unicast(text: &str) -> Result<Ipv4, AddrError> {
        let ip = Ipv4::parse(text)?;
        if ip.is_unicast() {
            Ok(ip)
        } else {
            Err(AddrError::NotUnicast)
        }
    }

    pub fn to_u32(self) -> u32 {
        u32::from_be_bytes(self.0)
    }

    pub fn from_u32(value: u32) -> Ipv4 {
        Ipv4(value.to_be_bytes())
    }

    /// An address a host can have: not in 0/8 (this network), 127/8 (loopback) or 224/3
    /// (multicast, reserved, limited broadcast).
    pub fn is_unicast(self) -> bool {
        !matches!(self.0[0], 0 | 127 | 224..=255)
    }
}

/// A unicast address and a TCP port: `10.0.2.2:3260`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: Ipv4,
    pub port: u16,
}

impl Endpoint {
    /// Parses `a.b.c.d[:port]`; without a port, `default_port`. The address must be unicast.
    pub fn parse(text: &str, default_port: u16) -> Result<Endpoint, AddrError> {
        let (addr, port) = match text.split_once(':') {
            Some((addr, port)) => {
                let digits_ok = !port.is_empty()
                    && port.len() <= 5
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && !port.starts_with('0');
                let port = if digits_ok {
                    port.parse::<u16>().ok()
                } else {
                    None
                };
                (addr, port.ok_or(AddrError::Port)?)
            }
            None => (text, default_port),
        };
        Ok(Endpoint {
            addr: Ipv4::parse_unicast(addr)?,
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

impl fmt::Display for Ipv4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

impl Ipv4Net {
    /// Parses an interface address `a.b.c.d/len`.
    pub fn parse(text: &str) -> Result<Ipv4Net, AddrError> {
        let (addr, prefix) = text.split_once('/').ok_or(AddrError::Prefix)?;
        let addr = Ipv4::parse(addr)?;
        let prefix_ok = !prefix.is_empty()
            && prefix.len() <= 2
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && !(prefix.len() > 1 && prefix.starts_with('0'));
        let prefix: u8 = if prefix_ok {
            prefix.parse().map_err(|_| AddrError::Prefix)?
        } else {
            return Err(AddrError::Prefix);
        };
        Ipv4Net::new(addr, prefix)
    }

    /// Checks an interface address.
    pub fn new(addr: Ipv4, prefix: u8) -> Result<Ipv4Net, AddrError> {
        if !(1..=32).contains(&prefix) {
            return Err(AddrError::Prefix);
        }
        if !addr.is_unicast() {
            return Err(AddrError::NotUnicast);
        }
        let net = Ipv4Net { addr, prefix };
        if prefix <= 30 && (addr == net.network() || addr == net.broadcast()) {
            return Err(AddrError::SubnetEdge);
        }
        Ok(net)
    }

    pub fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix.clamp(1, 32)))
    }

    pub fn network(&self) -> Ipv4 {
        Ipv4::from_u32(self.addr.to_u32() & self.mask())
    }

    pub fn broadcast(&self) -> Ipv4 {
        Ipv4::from_u32(self.addr.to_u32() | !self.mask())
    }

    /// Whether `ip` is in this subnet.
    pub fn contains(&self, ip: Ipv4) -> bool {
        ip.to_u32() & self.mask() == self.addr.to_u32() & self.mask()
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How an interface gets its address: configured, or leased from a DHCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Addressing {
    Static(Ipv4Net),
    Dhcp,
}

/// The configuration spelling of [`Addressing::Dhcp`].
pub const DHCP: &str = "dhcp";

impl Addressing {
    /// Parses `dhcp` (ignoring ASCII case) or an interface address `a.b.c.d/len`.
    pub fn parse(text: &str) -> Result<Addressing, AddrError> {
        if text.eq_ignore_ascii_case(DHCP) {
            Ok(Addressing::Dhcp)
        } else {
            Ipv4Net::parse(text).map(Addressing::Static)
        }
    }

    /// The configured address (`None` for DHCP).
    pub fn static_net(self) -> Option<Ipv4Net> {
        match self {
            Addressing::Static(net) => Some(net),
            Addressing::Dhcp => None,
        }
    }
}

impl From<Ipv4Net> for Addressing {
    fn from(net: Ipv4Net) -> Addressing {
        Addressing::Static(net)
    }
}

impl fmt::Display for Addressing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addressing::Static(net) => write!(f, "{net}"),
            Addressing::Dhcp => f.write_str(DHCP),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn addressing_is_dhcp_or_a_static_address() {
        assert_eq!(Addressing::parse("dhcp"), Ok(Addressing::Dhcp));
        assert_eq!(Addressing::parse("DHCP"), Ok(Addressing::Dhcp));
        let net = Ipv4Net::parse("10.0.2.15/24").unwrap();
        assert_eq!(
            Addressing::parse("10.0.2.15/24"),
            Ok(Addressing::Static(net))
        );
        assert_eq!(Addressing::Static(net).static_net(), Some(net));
        assert_eq!(Addressing::Dhcp.static_net(), None);
        assert_eq!(Addressing::from(net), Addressing::Static(net));
        assert_eq!(Addressing::Dhcp.to_string(), "dhcp");
        assert_eq!(Addressing::Static(net).to_string(), "10.0.2.15/24");
        for bad in ["dhcp4", " dhcp", "dhcp/24", "bootp", "", "10.0.2.15"] {
            assert!(Addressing::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_addresses_strictly() {
        assert_eq!(Ipv4::parse("10.10.0.2"), Ok(Ipv4([10, 10, 0, 2])));
        assert_eq!(Ipv4::parse("0.0.0.0"), Ok(Ipv4([0; 4])));
        assert_eq!(Ipv4::parse("255.255.255.255"), Ok(Ipv4([255; 4])));
        for bad in [
            "",
            "10",
            "10.0.0",
            "10.0.0.1.",
            "10.0.0.1.5",
            "256.0.0.1",
            "1.2.3.-4",
            "01.2.3.4",
            "1.2.3.4 ",
            " 1.2.3.4",
            "1..3.4",
            "a.b.c.d",
            "1.2.3.4/24",
            "1000.2.3.4",
            "+1.2.3.4",
            "١.2.3.4",
        ] {
            assert_eq!(Ipv4::parse(bad), Err(AddrError::Syntax), "{bad:?}");
        }
        assert_eq!(Ipv4([10, 10, 0, 2]).to_string(), "10.10.0.2");
    }

    #[test]
    fn unicast_rules() {
        for good in ["10.10.0.1", "192.168.1.1", "1.1.1.1", "223.255.255.254"] {
            assert!(Ipv4::parse_unicast(good).is_ok(), "{good}");
        }
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "239.1.1.1",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert_eq!(
                Ipv4::parse_unicast(bad),
                Err(AddrError::NotUnicast),
                "{bad}"
            );
        }
        assert_eq!(Ipv4::parse_unicast("x"), Err(AddrError::Syntax));
    }

    #[test]
    fn parses_interface_addresses() {
        let net = Ipv4Net::parse("10.10.0.1/24").unwrap();
        assert_eq!(net.addr, Ipv4([10, 10, 0, 1]));
        assert_eq!(net.prefix, 24);
        assert_eq!(net.network(), Ipv4([10, 10, 0, 0]));
        assert_eq!(net.broadcast(), Ipv4([10, 10, 0, 255]));
        assert_eq!(net.mask(), 0xFFFF_FF00);
        assert!(net.contains(Ipv4([10, 10, 0, 77])));
        assert!(!net.contains(Ipv4([10, 10, 1, 1])));
        assert_eq!(net.to_string(), "10.10.0.1/24");
        let host = Ipv4Net::parse("10.1.2.3/32").unwrap();
        assert!(host.contains(Ipv4([10, 1, 2, 3])) && !host.contains(Ipv4([10, 1, 2, 4])));
        assert!(
            Ipv4Net::parse("10.0.0.0/31").is_ok(),
            "RFC 3021 point-to-point"
        );
        assert!(Ipv4Net::parse("11.0.0.0/1").is_ok());

        for (bad, err) in [
            ("10.10.0.1", AddrError::Prefix),
            ("10.10.0.1/", AddrError::Prefix),
            ("10.10.0.1/0", AddrError::Prefix),
            ("10.10.0.1/33", AddrError::Prefix),
            ("10.10.0.1/024", AddrError::Prefix),
            ("10.10.0.1/2x", AddrError::Prefix),
            ("10.10.0.1/24/1", AddrError::Prefix),
            ("10.10.0/24", AddrError::Syntax),
            ("127.0.0.1/8", AddrError::NotUnicast),
            ("10.10.0.0/24", AddrError::SubnetEdge),
            ("10.10.0.255/24", AddrError::SubnetEdge),
        ] {
            assert_eq!(Ipv4Net::parse(bad), Err(err), "{bad}");
        }
        for e in [
            AddrError::Syntax,
            AddrError::Prefix,
            AddrError::NotUnicast,
            AddrError::SubnetEdge,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn endpoints_with_and_without_port() {
        let e = Endpoint::parse("10.0.2.2:3261", 3260).unwrap();
        assert_eq!((e.addr, e.port), (Ipv4([10, 0, 2, 2]), 3261));
        assert_eq!(e.to_string(), "10.0.2.2:3261");
        assert_eq!(Endpoint::parse("10.0.2.2", 3260).unwrap().port, 3260);
        for bad in [
            "10.0.2.2:",
            "10.0.2.2:0",
            "10.0.2.2:65536",
            "10.0.2.2:03260",
            "10.0.2.2:x",
        ] {
            assert_eq!(Endpoint::parse(bad, 3260), Err(AddrError::Port), "{bad}");
        }
        assert_eq!(Endpoint::parse("10.0.2:1", 3260), Err(AddrError::Syntax));
        assert_eq!(
            Endpoint::parse("127.0.0.1:3260", 3260),
            Err(AddrError::NotUnicast)
        );
        assert_eq!(Endpoint::parse("", 3260), Err(AddrError::Syntax));
    }
}
