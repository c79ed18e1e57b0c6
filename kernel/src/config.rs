//! The per-node configuration, read at boot from a small text file (the
//! bootloader's ramdisk) and overridable from the console.
//!
//! # Format
//!
//! ```text
//! # node configuration
//! name      = alpha
//! log_level = debug
//! on_panic  = exit
//! cluster_addr = 10.10.0.1/24
//! peer.node2   = 10.10.0.2
//! ```
//!
//! - UTF-8 text (a leading byte-order mark is skipped), at most
//!   [`MAX_FILE`] bytes; lines end in LF or CR LF.
//! - One `key = value` per line, at most [`MAX_LINE`] bytes per line (line
//!   ending excluded). The line is split at its first `=`; key and value are
//!   trimmed of surrounding whitespace. A value may be empty and may contain
//!   `=` and `#`, but no control characters.
//! - Keys are ASCII letters, digits, `_`, `.` and `-`, starting with a letter,
//!   and are case-sensitive. Each key may appear once.
//! - Blank lines and lines whose first non-blank character is `#` are
//!   ignored. There are no end-of-line comments: `name = a # b` sets `name`
//!   to `a # b` (which is then rejected as a bad node name).
//!
//! # Keys
//!
//! | key         | values                                             | default |
//! |-------------|----------------------------------------------------|---------|
//! | `name`      | 1 to 32 of `A-Z a-z 0-9 _ -`, starting with a letter | `node`  |
//! | `log_level` | `off`, `error`, `warn`, `info`, `debug`, `trace`   | `info`  |
//! | `on_panic`  | `halt` (stop the CPU) or `exit` (power the emulator off with a failure status, for tests) | `halt` |
//! | `cluster_addr` | this node's address on the cluster network, with prefix length (`10.10.0.1/24`); empty: none | none |
//! | `storage_addr` | this node's address on the storage network (the second NIC), with prefix length (QEMU user networking: `10.0.2.15/24`), or `dhcp` (a lease from the network's DHCP server); empty: none | none |
//! | `iscsi_portal` | the shared storage's iSCSI portal on the storage network, `a.b.c.d[:port]` (port 3260 if omitted; qemu-run.sh sets the host's tgtd, e.g. `10.0.2.2:32712`); empty: none | none |
//! | `peer.<node>` | the cluster-network address of node `<node>` (a node name), e.g. `peer.node2 = 10.10.0.2` | |
//! | `nic_interrupts` | `on`: e1000 NICs raise their PCI interrupt (through the IOAPIC) and wake a sleeping node as frames arrive; `off`: they are polled at every pass and timer tick, and a migration spins instead of sleeping between frames | `on` |
//!
//! Values of `log_level`, `on_panic` and `storage_addr = dhcp` are matched ignoring ASCII case.
//! Addresses are strict dotted quads (see [`net::addr`]): an interface address
//! must be unicast and not its subnet's network or broadcast address; a peer
//! address must be unicast. Peers are kept in file order.
//! Unknown keys (including `peer.` keys whose node name is not valid) are kept,
//! in file order, in [`NodeConfig::extra`] and reported as [`ConfigWarning`]s:
//! later features read them.
//!
//! [`NodeConfig`]'s `Display` writes the effective configuration in this same
//! format, and parsing that text gives back the same configuration.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use log::LevelFilter;
use net::addr::{Addressing, Endpoint, Ipv4, Ipv4Net};

/// Longest line accepted, in bytes, without its line ending.
pub const MAX_LINE: usize = 256;
/// Largest file accepted, in bytes.
pub const MAX_FILE: usize = 16 * 1024;
/// Longest node name, in characters.
pub const MAX_NAME: usize = 32;

/// The keys [`NodeConfig`] knows, in the order it prints them (then the
/// `peer.<node>` keys, see [`PEER_PREFIX`]).
pub const KNOWN_KEYS: [&str; 7] = [
    "name",
    "log_level",
    "on_panic",
    "cluster_addr",
    "storage_addr",
    "iscsi_portal",
    "nic_interrupts",
];

/// The iSCSI port when a portal names none (RFC 7143 section 13.1: 3260).
pub const ISCSI_DEFAULT_PORT: u16 = 3260;

/// Keys `peer.<node>` give a peer node's cluster-network address.
pub const PEER_PREFIX: &str = "peer.";

const LOG_LEVELS: [(&str, LevelFilter); 6] = [
    ("off", LevelFilter::Off),
    ("error", LevelFilter::Error),
    ("warn", LevelFilter::Warn),
    ("info", LevelFilter::Info),
    ("debug", LevelFilter::Debug),
    ("trace", LevelFilter::Trace),
];

/// What the node does after a panic or a fatal exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnPanic {
    /// Stop the CPU and wait (a person can read the console).
    #[default]
    Halt,
    /// Power off the emulator with a failure exit status (automated tests).
    Exit,
}

impl OnPanic {
    /// The configuration file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnPanic::Halt => "halt",
            OnPanic::Exit => "exit",
        }
    }

    /// Parses `halt` or `exit`, ignoring ASCII case.
    pub fn parse(value: &str) -> Option<Self> {
        [OnPanic::Halt, OnPanic::Exit]
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(value))
    }
}

/// Parses a log level name (`off` .. `trace`), ignoring ASCII case.
pub fn parse_log_level(value: &str) -> Option<LevelFilter> {
    LOG_LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|&(_, level)| level)
}

/// The configuration file spelling of a log level.
pub fn log_level_name(level: LevelFilter) -> &'static str {
    LOG_LEVELS
        .iter()
        .find(|&&(_, l)| l == level)
        .map_or("info", |&(name, _)| name)
}

/// True if `name` is a valid node name: 1 to [`MAX_NAME`] of
/// `A-Z a-z 0-9 _ -`, starting with a letter.
pub fn is_valid_node_name(name: &str) -> bool {
    name.len() <= MAX_NAME
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// True if `key` is a well-formed key: ASCII letters, digits, `_`, `.`, `-`,
/// starting with a letter.
pub fn is_valid_key(key: &str) -> bool {
    key.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// True if `key` is one of [`KNOWN_KEYS`] or `peer.<node>` with a valid node
/// name.
pub fn is_known_key(key: &str) -> bool {
    KNOWN_KEYS.contains(&key) || peer_key_name(key).is_some()
}

/// The node name of a `peer.<node>` key.
fn peer_key_name(key: &str) -> Option<&str> {
    key.strip_prefix(PEER_PREFIX)
        .filter(|name| is_valid_node_name(name))
}

/// What is wrong with a line or a setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// A line that is neither blank, a comment, nor `key = value`.
    MissingEquals,
    /// Nothing before the `=`.
    EmptyKey,
    /// A key with characters other than ASCII letters, digits, `_`, `.`, `-`,
    /// or not starting with a letter.
    BadKey {
        /// The key.
        key: String,
    },
    /// A value the key does not accept (or, for any key, control characters).
    BadValue {
        /// The key.
        key: String,
    },
    /// The key was already set earlier in the file.
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A line longer than [`MAX_LINE`] bytes.
    LineTooLong,
    /// A file larger than [`MAX_FILE`] bytes (for [`NodeConfig::set`]: the
    /// configuration would no longer print as a file that size).
    FileTooLarge,
    /// The file is not valid UTF-8.
    NotUtf8,
}

impl fmt::Display for ConfigErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigErrorKind::MissingEquals => write!(f, "expected `key = value`"),
            ConfigErrorKind::EmptyKey => write!(f, "missing key before `=`"),
            ConfigErrorKind::BadKey { key } => write!(
                f,
                "bad key `{key}`: use letters, digits, `_`, `.`, `-`, starting with a letter"
            ),
            ConfigErrorKind::BadValue { key } => match key.as_str() {
                "name" => write!(
                    f,
                    "bad value for `name`: 1 to {MAX_NAME} of A-Z a-z 0-9 _ -, starting with a letter"
                ),
                "log_level" => write!(
                    f,
                    "bad value for `log_level`: off, error, warn, info, debug or trace"
                ),
                "on_panic" => write!(f, "bad value for `on_panic`: halt or exit"),
                "nic_interrupts" => write!(f, "bad value for `nic_interrupts`: on or off"),
                "cluster_addr" => write!(
                    f,
                    "bad value for `cluster_addr`: a unicast IPv4 address with prefix length, \
                     e.g. 10.10.0.1/24 (or empty for none)"
                ),
                "storage_addr" => write!(
                    f,
                    "bad value for `storage_addr`: a unicast IPv4 address with prefix length, \
                     e.g. 10.0.2.15/24, or dhcp (or empty for none)"
                ),
                "iscsi_portal" => write!(
                    f,
                    "bad value for `iscsi_portal`: a unicast IPv4 address and optional port, \
                     e.g. 10.0.2.2:3260 (or empty for none)"
                ),
                k if peer_key_name(k).is_some() => write!(
                    f,
                    "bad value for `{k}`: a unicast IPv4 address, e.g. 10.10.0.2"
                ),
                _ => write!(f, "bad value for `{key}`: control characters are not allowed"),
            },
            ConfigErrorKind::DuplicateKey { key } => write!(f, "`{key}` is set twice"),
            ConfigErrorKind::LineTooLong => write!(f, "line longer than {MAX_LINE} bytes"),
            ConfigErrorKind::FileTooLarge => write!(f, "file larger than {MAX_FILE} bytes"),
            ConfigErrorKind::NotUtf8 => write!(f, "not valid UTF-8"),
        }
    }
}

/// A configuration file that could not be used, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line number. For [`ConfigErrorKind::FileTooLarge`] the line
    /// holding the first byte beyond the limit; for
    /// [`ConfigErrorKind::NotUtf8`] the line holding the first bad byte.
    pub line: usize,
    /// What is wrong.
    pub kind: ConfigErrorKind,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.kind)
    }
}

/// Something in a configuration file the caller should tell a person about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigWarning {
    /// A key this kernel does not know; kept in [`NodeConfig::extra`].
    UnknownKey {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
    },
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWarning::UnknownKey { line, key } => {
                write!(f, "line {line}: unknown key `{key}` (kept)")
            }
        }
    }
}

/// Another node of the cluster, as the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its node name (as in `peer.<name>`).
    pub name: String,
    /// Its cluster-network address.
    pub addr: Ipv4,
}

/// The node's configuration. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's name in the cluster and on the console prompt.
    pub name: String,
    /// The most verbose log level printed.
    pub log_level: LevelFilter,
    /// What happens after a panic or fatal exception.
    pub on_panic: OnPanic,
    /// This node's address on the cluster network.
    pub cluster_addr: Option<Ipv4Net>,
    /// How this node gets its address on the storage network (`storage_addr`): static or DHCP.
    pub storage_addr: Option<Addressing>,
    /// The shared storage's iSCSI portal (`iscsi_portal`).
    pub iscsi_portal: Option<Endpoint>,
    /// Whether e1000 NICs raise interrupts (`nic_interrupts`).
    pub nic_interrupts: bool,
    /// Other nodes by name, in file order (names are unique).
    pub peers: Vec<Peer>,
    /// Keys this kernel does not know, with their values, in file order.
    pub extra: Vec<(String, String)>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: String::from("node"),
            log_level: LevelFilter::Info,
            on_panic: OnPanic::Halt,
            cluster_addr: None,
            storage_addr: None,
            iscsi_portal: None,
            nic_interrupts: true,
            peers: Vec::new(),
            extra: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// Parses a configuration file. Keys the file does not set keep their
    /// defaults. Unknown keys are kept in [`extra`](Self::extra) and
    /// reported as warnings.
    pub fn parse(text: &[u8]) -> Result<(NodeConfig, Vec<ConfigWarning>), ConfigError> {
        let line_of = |offset: usize| {
            1 + text
                .get(..offset)
                .unwrap_or(text)
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
        };
        if text.len() > MAX_FILE {
            return Err(ConfigError {
                line: line_of(MAX_FILE),
                kind: ConfigErrorKind::FileTooLarge,
            });
        }
        let text = core::str::from_utf8(text).map_err(|e| ConfigError {
            line: line_of(e.valid_up_to()),
            kind: ConfigErrorKind::NotUtf8,
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);

        let mut config = NodeConfig::default();
        let mut warnings = Vec::new();
        let mut seen = BTreeSet::new();
        for (index, raw) in text.split('\n').enumerate() {
            let line = index + 1;
            let error = |kind| ConfigError { line, kind };
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            if raw.len() > MAX_LINE {
                return Err(error(ConfigErrorKind::LineTooLong));
            }
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (key, value) = trimmed
                .split_once('=')
                .ok_or(error(ConfigErrorKind::MissingEquals))?;
            let (key, value) = (key.trim(), value.trim());
            check_key(key).map_err(error)?;
            if !seen.insert(key) {
                return Err(error(ConfigErrorKind::DuplicateKey {
                    key: key.to_string(),
                }));
            }
            if !is_known_key(key) {
                warnings.push(ConfigWarning::UnknownKey {
                    line,
                    key: key.to_string(),
                });
            }
            config.apply(key, value).map_err(error)?;
        }
        Ok((config, warnings))
    }

    /// Sets `key` to `value` (both trimmed), as a console override: known
    /// keys are validated as in a file, unknown ones are kept in
    /// [`extra`](Self::extra) (replacing an earlier value; use
    /// [`is_known_key`] to warn about them). On error nothing changes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigErrorKind> {
        let (key, value) = (key.trim(), value.trim());
        check_key(key)?;
        if key.len() + 1 + value.len() > MAX_LINE {
            return Err(ConfigErrorKind::LineTooLong);
        }
        let mut updated = self.clone();
        if let Some(slot) = updated.extra.iter_mut().find(|(k, _)| k == key) {
            check_extra_value(key, value)?;
            slot.1 = value.to_string();
        } else {
            updated.apply(key, value)?;
        }
        if updated.compact_len() > MAX_FILE {
            return Err(ConfigErrorKind::FileTooLarge);
        }
        *self = updated;
        Ok(())
    }

    /// The value of `key` as the file would spell it.
    pub fn get(&self, key: &str) -> Option<String> {
        self.entries()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Every key and its effective value: `name`, `log_level` and `on_panic`
    /// (always present), `cluster_addr`, `storage_addr` and `iscsi_portal` (when set),
    /// `nic_interrupts` (when off), the peers, then
    /// [`extra`](Self::extra) in order.
    pub fn entries(&self) -> Vec<(String, String)> {
        let mut entries = Vec::with_capacity(4 + self.peers.len() + self.extra.len());
        entries.push(("name".into(), self.name.clone()));
        entries.push(("log_level".into(), log_level_name(self.log_level).into()));
        entries.push(("on_panic".into(), self.on_panic.as_str().into()));
        if let Some(addr) = self.cluster_addr {
            entries.push(("cluster_addr".into(), addr.to_string()));
        }
        if let Some(addr) = self.storage_addr {
            entries.push(("storage_addr".into(), addr.to_string()));
        }
        if let Some(portal) = self.iscsi_portal {
            entries.push(("iscsi_portal".into(), portal.to_string()));
        }
        if !self.nic_interrupts {
            entries.push(("nic_interrupts".into(), "off".into()));
        }
        for peer in &self.peers {
            entries.push((format!("{PEER_PREFIX}{}", peer.name), peer.addr.to_string()));
        }
        entries.extend(self.extra.iter().cloned());
        entries
    }

    /// The lines [`Display`](fmt::Display) writes, without line endings.
    pub fn lines(&self) -> Vec<String> {
        let spaced = self.spaced_len() <= MAX_FILE;
        self.entries()
            .iter()
            .map(|(k, v)| Entry::new(k, v, spaced).to_string())
            .collect()
    }

    /// The cluster-network address of the peer called `name`.
    pub fn peer_addr(&self, name: &str) -> Option<Ipv4> {
        self.peers.iter().find(|p| p.name == name).map(|p| p.addr)
    }

    /// The name of the peer at `addr` (the first one, if several share it).
    pub fn peer_name(&self, addr: Ipv4) -> Option<&str> {
        self.peers
            .iter()
            .find(|p| p.addr == addr)
            .map(|p| p.name.as_str())
    }

    /// Sets a known key from its file spelling, or stores an unknown one.
    fn apply(&mut self, key: &str, value: &str) -> Result<(), ConfigErrorKind> {
        let bad = || ConfigErrorKind::BadValue {
            key: key.to_string(),
        };
        match key {
            "name" => {
                if !is_valid_node_name(value) {
                    return Err(bad());
                }
                self.name = value.to_string();
            }
            "log_level" => self.log_level = parse_log_level(value).ok_or_else(bad)?,
            "on_panic" => self.on_panic = OnPanic::parse(value).ok_or_else(bad)?,
            "nic_interrupts" => {
                self.nic_interrupts = match value.to_ascii_lowercase().as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad()),
                };
            }
            "cluster_addr" => {
                self.cluster_addr = if value.is_empty() {
                    None
                } else {
                    Some(Ipv4Net::parse(value).map_err(|_| bad())?)
                };
            }
            "storage_addr" => {
                self.storage_addr = if value.is_empty() {
                    None
                } else {
                    Some(Addressing::parse(value).map_err(|_| bad())?)
                };
            }
            "iscsi_portal" => {
                self.iscsi_portal = if value.is_empty() {
                    None
                } else {
                    Some(Endpoint::parse(value, ISCSI_DEFAULT_PORT).map_err(|_| bad())?)
                };
            }
            _ if peer_key_name(key).is_some() => {
                let name = peer_key_name(key).unwrap_or_default();
                let addr = Ipv4::parse_unicast(value).map_err(|_| bad())?;
                match self.peers.iter_mut().find(|p| p.name == name) {
                    Some(peer) => peer.addr = addr,
                    None => self.peers.push(Peer {
                        name: name.to_string(),
                        addr,
                    }),
                }
            }
            _ => {
                check_extra_value(key, value)?;
                self.extra.push((key.to_string(), value.to_string()));
            }
        }
        Ok(())
    }

    /// Length of the text with every line as `key = value`.
    fn spaced_len(&self) -> usize {
        self.entries()
            .iter()
            .map(|(k, v)| Entry::new(k, v, true).len() + 1)
            .sum()
    }

    /// Length of the text with every line as `key=value` (the shortest form).
    fn compact_len(&self) -> usize {
        self.entries()
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum()
    }
}

/// One printed line. `key = value` normally; `key=value` when the file would
/// otherwise exceed [`MAX_FILE`], or the line [`MAX_LINE`] (an entry read from
/// a file always fits in its compact form).
struct Entry<'a> {
    key: &'a str,
    value: &'a str,
    spaced: bool,
}

impl<'a> Entry<'a> {
    fn new(key: &'a str, value: &'a str, spaced: bool) -> Self {
        let spaced = spaced && key.len() + 3 + value.len() <= MAX_LINE;
        Entry { key, value, spaced }
    }

    fn len(&self) -> usize {
        self.key.len() + self.value.len() + if self.spaced { 3 } else { 1 }
    }
}

impl fmt::Display for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.spaced {
            write!(f, "{} = {}", self.key, self.value)
        } else {
            write!(f, "{}={}", self.key, self.value)
        }
    }
}

/// The effective configuration in the file format, one `key = value` line
/// each (known keys first).
impl fmt::Display for NodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spaced = self.spaced_len() <= MAX_FILE;
        for (k, v) in self.entries() {
            writeln!(f, "{}", Entry::new(&k, &v, spaced))?;
        }
        Ok(())
    }
}

fn check_extra_value(key: &str, value: &str) -> Result<(), ConfigErrorKind> {
    if value.chars().any(char::is_control) {
        Err(ConfigErrorKind::BadValue {
            key: key.to_string(),
        })
    } else {
        Ok(())
    }
}

fn check_key(key: &str) -> Result<(), ConfigErrorKind> {
    if key.is_empty() {
        Err(ConfigErrorKind::EmptyKey)
    } else if !is_valid_key(key) {
        Err(ConfigErrorKind::BadKey {
            key: key.to_string(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    fn parse(text: &str) -> Result<(NodeConfig, Vec<ConfigWarning>), ConfigError> {
        NodeConfig::parse(text.as_bytes())
    }

    fn error(text: &str) -> ConfigError {
        parse(text).expect_err(text)
    }

    fn err(line: usize, kind: ConfigErrorKind) -> ConfigError {
        ConfigError { line, kind }
    }

    fn bad_value(key: &str) -> ConfigErrorKind {
        ConfigErrorKind::BadValue {
            key: key.to_string(),
        }
    }

    #[test]
    fn nic_interrupts_are_on_unless_turned_off() {
        let (config, _) = NodeConfig::parse(b"nic_interrupts = ON\n").unwrap();
        assert!(config.nic_interrupts);
        let (config, _) = NodeConfig::parse(b"nic_interrupts = Off\n").unwrap();
        assert!(!config.nic_interrupts);
        assert!(config
            .entries()
            .contains(&("nic_interrupts".into(), "off".into())));
        let err = NodeConfig::parse(b"nic_interrupts = maybe\n").unwrap_err();
        assert!(format!("{err}").contains("on or off"), "{err}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        for text in ["", "\n", "  \n\t\n", "# only a comment\n", "\u{feff}"] {
            let (config, warnings) = parse(text).unwrap();
            assert_eq!(config, NodeConfig::default());
            assert!(warnings.is_empty());
        }
        let d = NodeConfig::default();
        assert_eq!(d.name, "node");
        assert_eq!(d.log_level, LevelFilter::Info);
        assert_eq!(d.on_panic, OnPanic::Halt);
        assert!(d.nic_interrupts);
        assert!(d.extra.is_empty());
    }

    #[test]
    fn full_file_with_comments_blank_lines_and_spacing() {
        let text = "# node configuration\n\
                    \n\
                    name      = alpha-1\n\
                    \t log_level=debug   \n\
                    \x20  # indented comment\n\
                    on_panic =   exit\n";
        let (config, warnings) = parse(text).unwrap();
        assert_eq!(config.name, "alpha-1");
        assert_eq!(config.log_level, LevelFilter::Debug);
        assert_eq!(config.on_panic, OnPanic::Exit);
        assert!(config.extra.is_empty());
        assert!(warnings.is_empty());
    }

    #[test]
    fn crlf_line_endings_and_bom() {
        let text = "\u{feff}name = beta\r\nlog_level = warn\r\n\r\non_panic = halt\r\n";
        let (config, _) = parse(text).unwrap();
        assert_eq!(config.name, "beta");
        assert_eq!(config.log_level, LevelFilter::Warn);
        // No trailing newline at the end of the file is fine too.
        let (config, _) = parse("name = gamma").unwrap();
        assert_eq!(config.name, "gamma");
    }

    #[test]
    fn every_log_level() {
        for (text, level) in [
            ("off", LevelFilter::Off),
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("debug", LevelFilter::Debug),
            ("TRACE", LevelFilter::Trace),
            ("Debug", LevelFilter::Debug),
        ] {
            let (config, _) = parse(&format!("log_level = {text}")).unwrap();
            assert_eq!(config.log_level, level);
            assert_eq!(log_level_name(level), text.to_ascii_lowercase());
        }
        for bad in ["", "warning", "verbose", "5", "in fo"] {
            assert_eq!(
                error(&format!("log_level = {bad}")),
                err(1, bad_value("log_level"))
            );
        }
    }

    #[test]
    fn on_panic_values() {
        assert_eq!(parse("on_panic=EXIT").unwrap().0.on_panic, OnPanic::Exit);
        assert_eq!(parse("on_panic=halt").unwrap().0.on_panic, OnPanic::Halt);
        for bad in ["", "reboot", "exit now"] {
            assert_eq!(
                error(&format!("on_panic = {bad}")),
                err(1, bad_value("on_panic"))
            );
        }
    }

    #[test]
    fn node_name_rules() {
        let longest = "a".repeat(MAX_NAME);
        for good in ["a", "Node_7", "n-1", "x0-_", longest.as_str()] {
            assert!(is_valid_node_name(good), "{good}");
            assert_eq!(parse(&format!("name = {good}")).unwrap().0.name, good);
        }
        let too_long = "a".repeat(MAX_NAME + 1);
        for bad in [
            "",
            "1node",
            "_node",
            "-node",
            "no de",
            "nöde",
            "node.1",
            "node#1",
            "alpha # comment",
            too_long.as_str(),
        ] {
            assert!(!is_valid_node_name(bad), "{bad}");
            assert_eq!(error(&format!("name = {bad}")), err(1, bad_value("name")));
        }
    }

    #[test]
    fn unknown_keys_are_kept_in_order_with_warnings() {
        let text = "cluster.addr = 10.0.0.1/24\nname = n1\npeer-1 = 10.0.0.2:7000\nnote =\n";
        let (config, warnings) = parse(text).unwrap();
        assert_eq!(config.name, "n1");
        assert_eq!(
            config.extra,
            vec![
                ("cluster.addr".to_string(), "10.0.0.1/24".to_string()),
                ("peer-1".to_string(), "10.0.0.2:7000".to_string()),
                ("note".to_string(), String::new()),
            ]
        );
        assert_eq!(
            warnings,
            vec![
                ConfigWarning::UnknownKey {
                    line: 1,
                    key: "cluster.addr".to_string()
                },
                ConfigWarning::UnknownKey {
                    line: 3,
                    key: "peer-1".to_string()
                },
                ConfigWarning::UnknownKey {
                    line: 4,
                    key: "note".to_string()
                },
            ]
        );
        assert_eq!(
            warnings[1].to_string(),
            "line 3: unknown key `peer-1` (kept)"
        );
        // Values keep inner `=` and `#`; keys are case-sensitive.
        let (config, warnings) = parse("secret = a=b#c\nName = x").unwrap();
        assert_eq!(config.get("secret").as_deref(), Some("a=b#c"));
        assert_eq!(config.get("Name").as_deref(), Some("x"));
        assert_eq!(config.name, "node");
        assert_eq!(warnings.len(), 2);
    }

    #[test]
    fn syntax_errors_carry_line_numbers() {
        assert_eq!(
            error("name = a\njust words\n"),
            err(2, ConfigErrorKind::MissingEquals)
        );
        assert_eq!(error("\n\n = value"), err(3, ConfigErrorKind::EmptyKey));
        assert_eq!(error("="), err(1, ConfigErrorKind::EmptyKey));
        for bad_key in ["two words", "1st", "k:v", "_x", "ключ"] {
            assert_eq!(
                error(&format!("# c\n{bad_key} = 1")),
                err(
                    2,
                    ConfigErrorKind::BadKey {
                        key: bad_key.to_string()
                    }
                ),
                "{bad_key}"
            );
        }
        assert_eq!(
            error("x = a\u{1b}[31m"),
            err(1, bad_value("x")),
            "control characters in values"
        );
        assert_eq!(error("x = a\rb"), err(1, bad_value("x")));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        assert_eq!(
            error("name = a\nlog_level = info\nname = b"),
            err(
                3,
                ConfigErrorKind::DuplicateKey {
                    key: "name".to_string()
                }
            )
        );
        assert_eq!(
            error("peer = a\npeer = a"),
            err(
                2,
                ConfigErrorKind::DuplicateKey {
                    key: "peer".to_string()
                }
            )
        );
    }

    #[test]
    fn line_length_limit() {
        let ok = format!("k = {}", "v".repeat(MAX_LINE - 4));
        assert_eq!(ok.len(), MAX_LINE);
        assert!(parse(&ok).is_ok());
        // The CR of a CR LF ending does not count.
        assert!(parse(&format!("{ok}\r\n")).is_ok());
        let long = format!("k = {}", "v".repeat(MAX_LINE - 3));
        assert_eq!(
            error(&format!("name = a\n{long}\n")),
            err(2, ConfigErrorKind::LineTooLong)
        );
        // Comments are lines too.
        let comment = format!("#{}", "c".repeat(MAX_LINE));
        assert_eq!(error(&comment), err(1, ConfigErrorKind::LineTooLong));
    }

    #[test]
    fn file_size_limit() {
        let line = format!("# {}\n", "c".repeat(98)); // 101 bytes
        let mut text = line.repeat(MAX_FILE / line.len());
        text.push_str(&"#".repeat(MAX_FILE - text.len()));
        assert_eq!(text.len(), MAX_FILE);
        assert!(parse(&text).is_ok());
        text.push('#');
        let lines_before = MAX_FILE / line.len();
        assert_eq!(
            error(&text),
            err(lines_before + 1, ConfigErrorKind::FileTooLarge)
        );
        // A megabyte of garbage is refused before anything else is looked at.
        let garbage = vec![0xffu8; 1 << 20];
        assert_eq!(
            NodeConfig::parse(&garbage),
            Err(err(1, ConfigErrorKind::FileTooLarge))
        );
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let mut text = b"name = a\nlog_level = info\nx = ".to_vec();
        text.extend_from_slice(&[0xc3, 0x28]);
        assert_eq!(
            NodeConfig::parse(&text),
            Err(err(3, ConfigErrorKind::NotUtf8))
        );
        assert_eq!(
            NodeConfig::parse(&[0x80]),
            Err(err(1, ConfigErrorKind::NotUtf8))
        );
        // Valid non-ASCII UTF-8 is fine in values of unknown keys.
        let (config, _) = NodeConfig::parse("location = Zürich".as_bytes()).unwrap();
        assert_eq!(config.get("location").as_deref(), Some("Zürich"));
    }

    #[test]
    fn errors_display_readably() {
        assert_eq!(
            err(4, bad_value("log_level")).to_string(),
            "line 4: bad value for `log_level`: off, error, warn, info, debug or trace"
        );
        assert_eq!(
            err(1, ConfigErrorKind::MissingEquals).to_string(),
            "line 1: expected `key = value`"
        );
        for kind in [
            ConfigErrorKind::EmptyKey,
            ConfigErrorKind::BadKey { key: "k k".into() },
            bad_value("name"),
            bad_value("on_panic"),
            bad_value("other"),
            ConfigErrorKind::DuplicateKey { key: "name".into() },
            ConfigErrorKind::LineTooLong,
            ConfigErrorKind::FileTooLarge,
            ConfigErrorKind::NotUtf8,
        ] {
            assert!(!kind.to_string().is_empty());
        }
    }

    #[test]
    fn set_overrides_with_validation() {
        let mut config = NodeConfig::default();
        config.set("name", " delta ").unwrap();
        config.set("log_level", "trace").unwrap();
        config.set("on_panic", "exit").unwrap();
        assert_eq!(config.name, "delta");
        assert_eq!(config.log_level, LevelFilter::Trace);
        assert_eq!(config.on_panic, OnPanic::Exit);
        let before = config.clone();
        assert_eq!(config.set("name", "9lives"), Err(bad_value("name")));
        assert_eq!(config.set("log_level", "loud"), Err(bad_value("log_level")));
        assert_eq!(config.set("on_panic", ""), Err(bad_value("on_panic")));
        assert_eq!(config.set("", "x"), Err(ConfigErrorKind::EmptyKey));
        assert_eq!(
            config.set("a=b", "x"),
            Err(ConfigErrorKind::BadKey { key: "a=b".into() })
        );
        assert_eq!(
            config.set("#x", "1"),
            Err(ConfigErrorKind::BadKey { key: "#x".into() })
        );
        assert_eq!(config.set("peer", "a\nname = evil"), Err(bad_value("peer")));
        assert_eq!(
            config.set("peer", &"p".repeat(MAX_LINE)),
            Err(ConfigErrorKind::LineTooLong)
        );
        assert_eq!(config, before, "failed sets change nothing");
        // Unknown keys are added, then replaced in place.
        assert!(!is_known_key("peer"));
        assert!(is_known_key("on_panic"));
        config.set("peer", "10.0.0.2").unwrap();
        config.set("addr", "10.0.0.1").unwrap();
        config.set("peer", "10.0.0.3").unwrap();
        assert_eq!(
            config.extra,
            vec![
                ("peer".to_string(), "10.0.0.3".to_string()),
                ("addr".to_string(), "10.0.0.1".to_string()),
            ]
        );
        assert_eq!(config.get("peer").as_deref(), Some("10.0.0.3"));
        assert_eq!(config.get("log_level").as_deref(), Some("trace"));
        assert_eq!(config.get("missing"), None);
    }

    #[test]
    fn set_refuses_to_outgrow_the_file_limit() {
        let mut config = NodeConfig::default();
        let value = "v".repeat(200);
        let mut added = 0;
        loop {
            match config.set(&format!("k{added}"), &value) {
                Ok(()) => added += 1,
                Err(e) => {
                    assert_eq!(e, ConfigErrorKind::FileTooLarge);
                    break;
                }
            }
        }
        assert!(added > 70);
        let text = config.to_string();
        assert!(text.len() <= MAX_FILE);
        assert_eq!(NodeConfig::parse(text.as_bytes()).unwrap().0, config);
    }

    #[test]
    fn display_prints_the_file_format() {
        let mut config = NodeConfig::default();
        assert_eq!(
            config.to_string(),
            "name = node\nlog_level = info\non_panic = halt\n"
        );
        config.set("peer", "10.0.0.2").unwrap();
        let lines: Vec<String> = config.lines();
        assert_eq!(
            lines,
            [
                "name = node",
                "log_level = info",
                "on_panic = halt",
                "peer = 10.0.0.2"
            ]
        );
    }

    #[test]
    fn round_trip() {
        let text = "# a node\nname=Alpha_2\nlog_level = OFF\n\nz.last = 1\non_panic = exit\npeer-a = x = y\nempty =\n";
        let (config, _) = parse(text).unwrap();
        let printed = config.to_string();
        assert_eq!(
            printed,
            "name = Alpha_2\nlog_level = off\non_panic = exit\nz.last = 1\npeer-a = x = y\nempty = \n"
        );
        let (again, warnings) = parse(&printed).unwrap();
        assert_eq!(again, config);
        assert_eq!(warnings.len(), 3);
        assert_eq!(again.to_string(), printed);
        // A maximal line read compactly is printed compactly so it still fits.
        let long = format!("k={}", "v".repeat(MAX_LINE - 2));
        let (config, _) = parse(&long).unwrap();
        let printed = config.to_string();
        assert!(printed.lines().all(|l| l.len() <= MAX_LINE));
        assert!(printed.contains(&long));
        assert_eq!(parse(&printed).unwrap().0, config);
    }

    #[test]
    fn round_trip_of_a_nearly_full_compact_file() {
        // Compact lines filling the file: spaced output would not fit, so the
        // whole file is printed compactly.
        let mut text = String::from("name=n\nlog_level=info\non_panic=halt\n");
        let mut i = 0;
        loop {
            let line = format!("k{i}=v\n");
            if text.len() + line.len() > MAX_FILE {
                break;
            }
            text.push_str(&line);
            i += 1;
        }
        let (config, _) = parse(&text).unwrap();
        let printed = config.to_string();
        assert!(printed.len() <= MAX_FILE);
        assert_eq!(printed, text);
        assert_eq!(parse(&printed).unwrap().0, config);
    }

    #[test]
    fn iscsi_portal() {
        let (config, warnings) = parse("iscsi_portal = 10.0.2.2:32712\n").unwrap();
        assert!(warnings.is_empty());
        let portal = config.iscsi_portal.unwrap();
        assert_eq!((portal.addr, portal.port), (Ipv4([10, 0, 2, 2]), 32712));
        assert_eq!(
            config.get("iscsi_portal").as_deref(),
            Some("10.0.2.2:32712")
        );
        let (config, _) = parse("iscsi_portal = 10.0.2.2\n").unwrap();
        assert_eq!(config.iscsi_portal.unwrap().port, ISCSI_DEFAULT_PORT);
        assert_eq!(parse("iscsi_portal =\n").unwrap().0.iscsi_portal, None);
        assert!(error("iscsi_portal = 10.0.2.2:0")
            .to_string()
            .contains("iscsi_portal"));
        assert!(is_known_key("iscsi_portal"));
    }

    #[test]
    fn storage_address() {
        let (config, warnings) = parse("storage_addr = 10.0.2.15/24\n").unwrap();
        assert!(warnings.is_empty());
        assert_eq!(
            config.storage_addr,
            Some(Addressing::Static(Ipv4Net::parse("10.0.2.15/24").unwrap()))
        );
        assert_eq!(config.get("storage_addr").as_deref(), Some("10.0.2.15/24"));
        assert!(is_known_key("storage_addr"));
        assert_eq!(parse("storage_addr =\n").unwrap().0.storage_addr, None);
        assert_eq!(
            error("storage_addr = 10.0.2.15"),
            err(1, bad_value("storage_addr"))
        );
        assert!(bad_value("storage_addr")
            .to_string()
            .contains("10.0.2.15/24"));
        let mut config = NodeConfig::default();
        config.set("storage_addr", "10.0.2.16/24").unwrap();
        assert_eq!(config.storage_addr.unwrap().to_string(), "10.0.2.16/24");
        config.set("storage_addr", "").unwrap();
        assert_eq!(config.storage_addr, None);
    }

    #[test]
    fn storage_address_by_dhcp() {
        for spelling in ["dhcp", "DHCP", "Dhcp"] {
            let (config, warnings) = parse(&format!("storage_addr = {spelling}\n")).unwrap();
            assert!(warnings.is_empty());
            assert_eq!(config.storage_addr, Some(Addressing::Dhcp), "{spelling}");
            // Printed in one spelling, and read back the same.
            assert_eq!(config.get("storage_addr").as_deref(), Some("dhcp"));
            assert!(config.to_string().contains("\nstorage_addr = dhcp\n"));
            assert_eq!(parse(&config.to_string()).unwrap().0, config);
        }
        for bad in ["dhcp4", "dhcp/24", "dhcp dhcp", "auto", "bootp"] {
            assert_eq!(
                error(&format!("storage_addr = {bad}")),
                err(1, bad_value("storage_addr")),
                "{bad}"
            );
        }
        assert!(bad_value("storage_addr").to_string().contains("or dhcp"));
        // A live node switches to DHCP and back to a static address.
        let mut config = NodeConfig::default();
        config.set("storage_addr", "10.0.2.16/24").unwrap();
        config.set("storage_addr", " dhcp ").unwrap();
        assert_eq!(config.storage_addr, Some(Addressing::Dhcp));
        let before = config.clone();
        assert_eq!(
            config.set("storage_addr", "dhcp6"),
            Err(bad_value("storage_addr"))
        );
        assert_eq!(config, before);
        config.set("storage_addr", "10.0.2.15/24").unwrap();
        assert_eq!(
            config.storage_addr.and_then(Addressing::static_net),
            Some(Ipv4Net::parse("10.0.2.15/24").unwrap())
        );
        // DHCP is for the storage network only: the cluster network needs fixed addresses that
        // the peers' configurations name.
        assert_eq!(
            error("cluster_addr = dhcp"),
            err(1, bad_value("cluster_addr"))
        );
    }

    #[test]
    fn cluster_address_and_peers() {
        let text = "name = node1\ncluster_addr = 10.10.0.1/24\npeer.node2 = 10.10.0.2\n\
                    note = x\npeer.node3 = 10.10.0.3\n";
        let (config, warnings) = parse(text).unwrap();
        assert_eq!(
            warnings,
            vec![ConfigWarning::UnknownKey {
                line: 4,
                key: "note".into()
            }]
        );
        assert_eq!(
            config.cluster_addr,
            Some(Ipv4Net::parse("10.10.0.1/24").unwrap())
        );
        assert_eq!(
            config.peers,
            vec![
                Peer {
                    name: "node2".into(),
                    addr: Ipv4([10, 10, 0, 2])
                },
                Peer {
                    name: "node3".into(),
                    addr: Ipv4([10, 10, 0, 3])
                },
            ]
        );
        assert_eq!(config.peer_addr("node3"), Some(Ipv4([10, 10, 0, 3])));
        assert_eq!(config.peer_addr("node9"), None);
        assert_eq!(config.peer_name(Ipv4([10, 10, 0, 2])), Some("node2"));
        assert_eq!(config.peer_name(Ipv4([10, 10, 0, 1])), None);
        assert_eq!(config.get("cluster_addr").as_deref(), Some("10.10.0.1/24"));
        assert_eq!(config.get("peer.node2").as_deref(), Some("10.10.0.2"));
        // Printed in the file format: known keys, peers, then unknown keys.
        let printed = config.to_string();
        assert_eq!(
            printed,
            "name = node1\nlog_level = info\non_panic = halt\ncluster_addr = 10.10.0.1/24\n\
             peer.node2 = 10.10.0.2\npeer.node3 = 10.10.0.3\nnote = x\n"
        );
        assert_eq!(parse(&printed).unwrap().0, config);
        // An empty cluster_addr means none (and is not printed).
        let (config, _) = parse("cluster_addr =\n").unwrap();
        assert_eq!(config.cluster_addr, None);
        assert_eq!(config, NodeConfig::default());
        assert!(is_known_key("peer.node-2_b"));
        assert!(is_known_key("cluster_addr"));
    }

    #[test]
    fn bad_addresses_are_refused() {
        for bad in [
            "10.10.0.1",
            "10.10.0.1/",
            "10.10.0.1/33",
            "10.10.0.0/24",
            "10.10.0.255/24",
            "300.1.1.1/24",
            "127.0.0.1/8",
            "10.10.0.1/24 extra",
            "node1",
        ] {
            assert_eq!(
                error(&format!("cluster_addr = {bad}")),
                err(1, bad_value("cluster_addr")),
                "{bad}"
            );
        }
        for bad in [
            "10.10.0.2/24",
            "",
            "224.0.0.1",
            "0.0.0.0",
            "10.10.0",
            "node2",
        ] {
            assert_eq!(
                error(&format!("name = a\npeer.node2 = {bad}")),
                err(2, bad_value("peer.node2")),
                "{bad:?}"
            );
        }
        assert!(bad_value("peer.node2").to_string().contains("10.10.0.2"));
        assert!(bad_value("cluster_addr").to_string().contains("/24"));
        assert_eq!(
            error("peer.node2 = 10.10.0.2\npeer.node2 = 10.10.0.3"),
            err(
                2,
                ConfigErrorKind::DuplicateKey {
                    key: "peer.node2".into()
                }
            )
        );
        // `peer.` with something that is not a node name is an unknown key, kept.
        let (config, warnings) = parse("peer.2bad = 10.10.0.2\npeer. = x").unwrap();
        assert!(config.peers.is_empty());
        assert_eq!(warnings.len(), 2);
        assert_eq!(config.get("peer.2bad").as_deref(), Some("10.10.0.2"));
    }

    #[test]
    fn addresses_can_be_overridden() {
        let mut config = NodeConfig::default();
        config.set("cluster_addr", "10.10.0.7/16").unwrap();
        config.set("peer.node2", "10.10.0.2").unwrap();
        config.set("peer.node3", "10.10.0.3").unwrap();
        config.set("peer.node2", "10.10.0.22").unwrap();
        assert_eq!(config.cluster_addr.unwrap().to_string(), "10.10.0.7/16");
        assert_eq!(config.peer_addr("node2"), Some(Ipv4([10, 10, 0, 22])));
        assert_eq!(config.peers.len(), 2);
        let before = config.clone();
        assert_eq!(
            config.set("cluster_addr", "10.10.0.7"),
            Err(bad_value("cluster_addr"))
        );
        assert_eq!(config.set("peer.node2", "x"), Err(bad_value("peer.node2")));
        assert_eq!(config, before);
        assert!(config.extra.is_empty());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x243F_6A88_85A3_08D3u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const ALPHABET: &[u8] = b"name=log_level on_panic#\n\r\t =abc09_-.\xff\xc3\xa9";
        for _ in 0..2_000 {
            let len = (next() % 600) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            if let Ok((config, _)) = NodeConfig::parse(&bytes) {
                let printed = config.to_string();
                assert_eq!(NodeConfig::parse(printed.as_bytes()).unwrap().0, config);
            }
        }
    }
}
