//! SendTargets discovery (RFC 7143 section 4.3 and appendix C, keys in 13.3 and 13.8).
//!
//! A discovery session (`SessionType=Discovery`) sends the Text Request `SendTargets=All`; the
//! answer lists each `TargetName`, followed by the `TargetAddress`es (`host[:port][,tag]`) it is
//! reachable at. [`send_targets_request`] builds the request for
//! [`super::Session::submit_text`]; [`parse_send_targets`] reads the answer.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::text::TextKeys;

/// The iSCSI well-known port (section 13.9).
pub const DEFAULT_PORT: u16 = 3260;

/// One address a target is reachable at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    /// A host name, an IPv4 address, or an IPv6 address without its brackets.
    pub host: String,
    pub port: u16,
    /// The target portal group tag (1 when the target does not say).
    pub group_tag: u16,
}

impl fmt::Display for Portal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A target and its portals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    pub portals: Vec<Portal>,
}

/// A SendTargets answer we cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryError {
    /// A TargetAddress before any TargetName.
    AddressWithoutTarget,
    /// A TargetAddress that is not `host[:port][,tag]`.
    BadAddress,
}

impl fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoveryError::AddressWithoutTarget => {
                f.write_str("SendTargets answer has a TargetAddress before any TargetName")
            }
            DiscoveryError::BadAddress => f.write_str("malformed TargetAddress"),
        }
    }
}

impl core::error::Error for DiscoveryError {}

/// `SendTargets=All`.
pub fn send_targets_request() -> TextKeys {
    let mut keys = TextKeys::new();
    keys.push("SendTargets", "All");
    keys
}

/// Parses a TargetAddress value: `host[:port][,portal-group-tag]`, IPv6 hosts in brackets.
pub fn parse_target_address(value: &str) -> Result<Portal, DiscoveryError> {
    let (address, tag) = match value.rsplit_once(',') {
        Some((address, tag)) => (
            address,
            tag.parse().map_err(|_| DiscoveryError::BadAddress)?,
        ),
        None => (value, 1),
    };
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(DiscoveryError::BadAddress)?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or(DiscoveryError::BadAddress)?),
        };
        (host, port)
    } else {
        match address.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        }
    };
    if host.is_empty() {
        return Err(DiscoveryError::BadAddress);
    }
    let port = match port {
        Some(port) => port.parse().map_err(|_| DiscoveryError::BadAddress)?,
        None => DEFAULT_PORT,
    };
    Ok(Portal {
        host: String::from(host),
        port,
        group_tag: tag,
    })
}

/// Reads a SendTargets answer. Keys other than TargetName and TargetAddress are ignored.
pub fn parse_send_targets(keys: &TextKeys) -> Result<Vec<DiscoveredTarget>, DiscoveryError> {
    let mut targets: Vec<DiscoveredTarget> = Vec::new();
    for (key, value) in keys.iter() {
        match key {
            "TargetName" => targets.push(DiscoveredTarget {
                name: String::from(value),
                portals: Vec::new(),
            }),
            "TargetAddress" => targets
                .last_mut()
                .ok_or(DiscoveryError::AddressWithoutTarget)?
                .portals
                .push(parse_target_address(value)?),
            _ => {}
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn addresses_of_every_shape() {
        let portal = |host: &str, port, group_tag| Portal {
            host: host.to_string(),
            port,
            group_tag,
        };
        assert_eq!(
            parse_target_address("127.0.0.1:3260,1"),
            Ok(portal("127.0.0.1", 3260, 1))
        );
        assert_eq!(
            parse_target_address("127.0.0.1"),
            Ok(portal("127.0.0.1", 3260, 1))
        );
        assert_eq!(
            parse_target_address("[::1]:3261,7"),
            Ok(portal("::1", 3261, 7))
        );
        assert_eq!(
            parse_target_address("[fe80::1]"),
            Ok(portal("fe80::1", 3260, 1))
        );
        assert_eq!(
            parse_target_address("storage.example:860"),
            Ok(portal("storage.example", 860, 1))
        );
        for bad in [
            "",
            ":3260",
            "host:port",
            "host:3260,x",
            "[::1",
            "[::1]x",
            "h:99999",
        ] {
            assert_eq!(
                parse_target_address(bad),
                Err(DiscoveryError::BadAddress),
                "{bad}"
            );
        }
        assert_eq!(portal("::1", 3260, 1).to_string(), "[::1]:3260");
        assert_eq!(portal("127.0.0.1", 3260, 1).to_string(), "127.0.0.1:3260");
    }

    #[test]
    fn targets_with_their_addresses() {
        let mut keys = TextKeys::new();
        keys.push("TargetName", "iqn.2026-01.test:a");
        keys.push("TargetAddress", "127.0.0.1:3260,1");
        keys.push("TargetAddress", "[::1]:3260,1");
        keys.push("TargetName", "iqn.2026-01.test:b");
        let targets = parse_send_targets(&keys).unwrap();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].portals.len(), 2);
        assert_eq!(targets[1].name, "iqn.2026-01.test:b");
        assert!(targets[1].portals.is_empty());

        let mut orphan = TextKeys::new();
        orphan.push("TargetAddress", "127.0.0.1");
        assert_eq!(
            parse_send_targets(&orphan),
            Err(DiscoveryError::AddressWithoutTarget)
        );
        assert_eq!(send_targets_request().get("SendTargets"), Some("All"));
    }
}
