//! Negotiation of the operational parameters during login (RFC 7143 sections 6.2-6.6 and 13).
//!
//! We propose our values in the first request of the operational stage; the target answers each
//! key. A few keys are declarative (each side states its own value, nothing is answered):
//! MaxRecvDataSegmentLength is the most important, since ours bounds what the target sends us
//! and the target's bounds what we send. The target may also propose keys we did not offer;
//! those we answer in our next request. Results follow each key's function:
//!
//! - numerical minimum: MaxBurstLength, FirstBurstLength, MaxOutstandingR2T, MaxConnections,
//!   DefaultTime2Retain, ErrorRecoveryLevel; numerical maximum: DefaultTime2Wait;
//! - boolean OR: InitialR2T, DataPDUInOrder, DataSequenceInOrder; boolean AND: ImmediateData;
//! - list: HeaderDigest and DataDigest (the first value of the proposer's list that the other
//!   side supports).
//!
//! An answer of `Reject`, `Irrelevant` or `NotUnderstood` leaves the key at its default value
//! (section 6.2). Keys we do not know are answered `NotUnderstood`.

use alloc::format;
use alloc::string::String;
use core::fmt;

use super::stream::Digests;
use super::text::TextKeys;

/// Which digest we offer for headers or for data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestPolicy {
    /// Offer `None` only.
    None,
    /// Offer `CRC32C,None`: CRC32C when the target supports it.
    PreferCrc32c,
    /// Offer `CRC32C` only: login fails against a target without digests.
    RequireCrc32c,
}

impl DigestPolicy {
    fn offer(self) -> &'static str {
        match self {
            DigestPolicy::None => "None",
            DigestPolicy::PreferCrc32c => "CRC32C,None",
            DigestPolicy::RequireCrc32c => "CRC32C",
        }
    }

    fn accepts(self, value: &str) -> bool {
        match value {
            "None" => self != DigestPolicy::RequireCrc32c,
            "CRC32C" => self != DigestPolicy::None,
            _ => false,
        }
    }
}

/// Whether a session reads and writes LUNs or only lists targets (section 13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

/// What we propose. [`Default`] gives values for a hypervisor's disk traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegotiationConfig {
    pub header_digest: DigestPolicy,
    pub data_digest: DigestPolicy,
    /// Ours: the largest data segment the target may send us; also bounds the stream decoder.
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u16,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
}

impl Default for NegotiationConfig {
    fn default() -> Self {
        Self {
            header_digest: DigestPolicy::None,
            data_digest: DigestPolicy::None,
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            // Unsolicited data saves a round trip per write when the target allows it.
            initial_r2t: false,
            immediate_data: true,
            max_outstanding_r2t: 1,
            // ERL 0 reinstates a session at once; there is nothing to wait for or to retain.
            default_time2wait: 0,
            default_time2retain: 0,
        }
    }
}

/// Smallest and largest values of the data length keys (section 13.12-13.14).
const MIN_DATA_LENGTH: u32 = 512;
const MAX_DATA_LENGTH: u32 = 0x00FF_FFFF;

/// The parameters of a logged-in session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationalParams {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Ours: the longest data segment the target may send us.
    pub max_recv_data_segment_length: u32,
    /// The target's: the longest data segment we may send.
    pub max_xmit_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
    pub target_portal_group_tag: Option<u16>,
    pub target_alias: Option<String>,
}

impl OperationalParams {
    /// The values RFC 7143 section 13 defines for keys nobody negotiated; `ours` is our
    /// MaxRecvDataSegmentLength, which we always declare.
    pub fn defaults(ours: u32) -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_recv_data_segment_length: ours,
            max_xmit_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            target_portal_group_tag: None,
            target_alias: None,
        }
    }

    /// The digests of the full feature phase.
    pub fn digests(&self) -> Digests {
        Digests {
            header: self.header_digest,
            data: self.data_digest,
        }
    }
}

/// Why negotiation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegotiationError {
    /// The target's value for `key` is not a valid value of that key.
    InvalidValue { key: &'static str },
    /// The target chose a digest we did not offer (or refused the one we require).
    DigestRefused { key: &'static str },
    /// The target insists on error recovery level `level`; we implement level 0 only.
    ErrorRecoveryLevel { level: u8 },
}

impl fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NegotiationError::InvalidValue { key } => {
                write!(f, "the target's value of {key} is invalid")
            }
            NegotiationError::DigestRefused { key } => {
                write!(f, "no acceptable {key} could be agreed")
            }
            NegotiationError::ErrorRecoveryLevel { level } => {
                write!(
                    f,
                    "the target wants ErrorRecoveryLevel {level}; only 0 is implemented"
                )
            }
        }
    }
}

impl core::error::Error for NegotiationError {}

/// How a key's result is computed.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Digest(DigestPolicy),
    Min { ours: u32, lo: u32, hi: u32 },
    Max { ours: u32, lo: u32, hi: u32 },
    And(bool),
    Or(bool),
}

/// Parses a numerical value: decimal, or hexadecimal with a `0x` prefix (section 5.1).
fn parse_number(value: &str) -> Option<u32> {
    match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "Yes"
    } else {
        "No"
    }
}

/// The outcome of one key: a result to store (and to answer when the target proposed it).
enum Outcome {
    Number(u32),
    Bool(bool),
    Digest(bool),
}

impl Outcome {
    fn text(&self) -> String {
        match self {
            Outcome::Number(n) => format!("{n}"),
            Outcome::Bool(b) => String::from(yes_no(*b)),
            Outcome::Digest(true) => String::from("CRC32C"),
            Outcome::Digest(false) => String::from("None"),
        }
    }
}

/// The keys of one side's negotiation, from first request to last response.
#[derive(Debug, Clone)]
pub struct Negotiator {
    config: NegotiationConfig,
    session_type: SessionType,
    params: OperationalParams,
    /// Answers owed to keys the target proposed, for our next request.
    replies: TextKeys,
}

impl Negotiator {
    pub fn new(config: NegotiationConfig, session_type: SessionType) -> Self {
        Self {
            config,
            session_type,
            params: OperationalParams::defaults(config.max_recv_data_segment_length),
            replies: TextKeys::new(),
        }
    }

    /// Our proposals, for the first request of the operational stage. Discovery sessions offer
    /// only what matters to them (section 13: the others are Irrelevant there).
    pub fn offer(&self) -> TextKeys {
        let c = &self.config;
        let mut keys = TextKeys::new();
        keys.push("HeaderDigest", c.header_digest.offer());
        keys.push("DataDigest", c.data_digest.offer());
        keys.push(
            "MaxRecvDataSegmentLength",
            &format!("{}", c.max_recv_data_segment_length),
        );
        if self.session_type == SessionType::Discovery {
            return keys;
        }
        keys.push("MaxConnections", "1");
        keys.push("InitialR2T", yes_no(c.initial_r2t));
        keys.push("ImmediateData", yes_no(c.immediate_data));
        keys.push("MaxBurstLength", &format!("{}", c.max_burst_length));
        keys.push("FirstBurstLength", &format!("{}", c.first_burst_length));
        keys.push("DefaultTime2Wait", &format!("{}", c.default_time2wait));
        keys.push("DefaultTime2Retain", &format!("{}", c.default_time2retain));
        keys.push("MaxOutstandingR2T", &format!("{}", c.max_outstanding_r2t));
        keys.push("DataPDUInOrder", "Yes");
        keys.push("DataSequenceInOrder", "Yes");
        keys.push("ErrorRecoveryLevel", "0");
        keys
    }

    fn rule(&self, key: &str) -> Option<(&'static str, Rule)> {
        let c = &self.config;
        let data = |ours: u32| Rule::Min {
            ours,
            lo: MIN_DATA_LENGTH,
            hi: MAX_DATA_LENGTH,
        };
        Some(match key {
            "HeaderDigest" => ("HeaderDigest", Rule::Digest(c.header_digest)),
            "DataDigest" => ("DataDigest", Rule::Digest(c.data_digest)),
            "MaxConnections" => (
                "MaxConnections",
                Rule::Min {
                    ours: 1,
                    lo: 1,
                    hi: 65535,
                },
            ),
            "InitialR2T" => ("InitialR2T", Rule::Or(c.initial_r2t)),
            "ImmediateData" => ("ImmediateData", Rule::And(c.immediate_data)),
            "MaxBurstLength" => ("MaxBurstLength", data(c.max_burst_length)),
            "FirstBurstLength" => ("FirstBurstLength", data(c.first_burst_length)),
            "DefaultTime2Wait" => (
                "DefaultTime2Wait",
                Rule::Max {
                    ours: u32::from(c.default_time2wait),
                    lo: 0,
                    hi: 3600,
                },
            ),
            "DefaultTime2Retain" => (
                "DefaultTime2Retain",
                Rule::Min {
                    ours: u32::from(c.default_time2retain),
                    lo: 0,
                    hi: 3600,
                },
            ),
            "MaxOutstandingR2T" => (
                "MaxOutstandingR2T",
                Rule::Min {
                    ours: u32::from(c.max_outstanding_r2t),
                    lo: 1,
                    hi: 65535,
                },
            ),
            "DataPDUInOrder" => ("DataPDUInOrder", Rule::Or(true)),
            "DataSequenceInOrder" => ("DataSequenceInOrder", Rule::Or(true)),
            "ErrorRecoveryLevel" => (
                "ErrorRecoveryLevel",
                Rule::Min {
                    ours: 0,
                    lo: 0,
                    hi: 2,
                },
            ),
            _ => return None,
        })
    }

    /// Takes the keys of one login response (AuthMethod and CHAP keys already removed by the
    /// caller). `offered` says whether we proposed the operational keys already, i.e. whether
    /// the target's values are answers rather than proposals.
    pub fn on_keys(&mut self, keys: &TextKeys, offered: bool) -> Result<(), NegotiationError> {
        let offered_keys = if offered {
            self.offer()
        } else {
            TextKeys::new()
        };
        for (key, value) in keys.iter() {
            match key {
                "MaxRecvDataSegmentLength" => {
                    let n = parse_number(value)
                        .filter(|n| (MIN_DATA_LENGTH..=MAX_DATA_LENGTH).contains(n))
                        .ok_or(NegotiationError::InvalidValue {
                            key: "MaxRecvDataSegmentLength",
                        })?;
                    self.params.max_xmit_data_segment_length = n;
                    continue;
                }
                "TargetPortalGroupTag" => {
                    self.params.target_portal_group_tag =
                        parse_number(value).and_then(|n| u16::try_from(n).ok());
                    continue;
                }
                "TargetAlias" => {
                    self.params.target_alias = Some(String::from(value));
                    continue;
                }
                // Declarations we have no use for; TargetAddress matters only in a redirect,
                // which the login handles.
                "TargetAddress" | "TargetName" | "InitiatorName" | "InitiatorAlias"
                | "SessionType" => continue,
                _ => {}
            }
            let Some((name, rule)) = self.rule(key) else {
                self.replies.push(key, "NotUnderstood");
                continue;
            };
            let is_answer = offered_keys.get(key).is_some();
            if matches!(value, "Reject" | "Irrelevant" | "NotUnderstood") {
                // Section 6.2: the key keeps its default. A proposal of such a value is
                // meaningless; it is ignored too.
                continue;
            }
            match Self::apply(rule, value, is_answer) {
                Some(outcome) => {
                    if !is_answer {
                        self.replies.push(name, &outcome.text());
                    }
                    self.store(name, &outcome)?;
                }
                None if is_answer => {
                    return Err(match rule {
                        Rule::Digest(_) => NegotiationError::DigestRefused { key: name },
                        _ => NegotiationError::InvalidValue { key: name },
                    })
                }
                None => self.replies.push(name, "Reject"),
            }
        }
        Ok(())
    }

    /// The result of `rule` against the target's `value`; `None` when it is not acceptable.
    fn apply(rule: Rule, value: &str, is_answer: bool) -> Option<Outcome> {
        match rule {
            Rule::Digest(policy) => {
                if is_answer {
                    // An answer is one value, which must be one we offered.
                    policy
                        .accepts(value)
                        .then(|| Outcome::Digest(value == "CRC32C"))
                } else {
                    // A proposal is a list in the target's order of preference.
                    value
                        .split(',')
                        .find(|choice| policy.accepts(choice))
                        .map(|choice| Outcome::Digest(choice == "CRC32C"))
                }
            }
            Rule::Min { ours, lo, hi } => parse_number(value)
                .filter(|n| (lo..=hi).contains(n))
                .map(|n| Outcome::Number(n.min(ours))),
            Rule::Max { ours, lo, hi } => parse_number(value)
                .filter(|n| (lo..=hi).contains(n))
                .map(|n| Outcome::Number(n.max(ours))),
            Rule::And(ours) => parse_bool(value).map(|b| Outcome::Bool(b && ours)),
            Rule::Or(ours) => parse_bool(value).map(|b| Outcome::Bool(b || ours)),
        }
    }

    fn store(&mut self, key: &'static str, outcome: &Outcome) -> Result<(), NegotiationError> {
        let p = &mut self.params;
        let number = |outcome: &Outcome| match outcome {
            Outcome::Number(n) => *n,
            _ => 0,
        };
        let boolean = |outcome: &Outcome| matches!(outcome, Outcome::Bool(true));
        let narrow = |n: u32| u16::try_from(n).map_err(|_| NegotiationError::InvalidValue { key });
        match key {
            "HeaderDigest" => p.header_digest = matches!(outcome, Outcome::Digest(true)),
            "DataDigest" => p.data_digest = matches!(outcome, Outcome::Digest(true)),
            "MaxConnections" => p.max_connections = narrow(number(outcome))?,
            "InitialR2T" => p.initial_r2t = boolean(outcome),
            "ImmediateData" => p.immediate_data = boolean(outcome),
            "MaxBurstLength" => p.max_burst_length = number(outcome),
            "FirstBurstLength" => p.first_burst_length = number(outcome),
            "DefaultTime2Wait" => p.default_time2wait = narrow(number(outcome))?,
            "DefaultTime2Retain" => p.default_time2retain = narrow(number(outcome))?,
            "MaxOutstandingR2T" => p.max_outstanding_r2t = narrow(number(outcome))?,
            "DataPDUInOrder" => p.data_pdu_in_order = boolean(outcome),
            "DataSequenceInOrder" => p.data_sequence_in_order = boolean(outcome),
            "ErrorRecoveryLevel" => p.error_recovery_level = number(outcome) as u8,
            _ => {}
        }
        Ok(())
    }

    /// Answers owed to the target's proposals; empty once taken.
    pub fn take_replies(&mut self) -> TextKeys {
        core::mem::take(&mut self.replies)
    }

    /// The negotiated parameters, checked for what this initiator requires.
    pub fn finish(&self) -> Result<OperationalParams, NegotiationError> {
        let mut params = self.params.clone();
        if params.error_recovery_level != 0 {
            return Err(NegotiationError::ErrorRecoveryLevel {
                level: params.error_recovery_level,
            });
        }
        for (policy, agreed, key) in [
            (
                self.config.header_digest,
                params.header_digest,
                "HeaderDigest",
            ),
            (self.config.data_digest, params.data_digest, "DataDigest"),
        ] {
            if policy == DigestPolicy::RequireCrc32c && !agreed {
                return Err(NegotiationError::DigestRefused { key });
            }
        }
        // Section 13.14: FirstBurstLength never exceeds MaxBurstLength.
        params.first_burst_length = params.first_burst_length.min(params.max_burst_length);
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> TextKeys {
        let mut keys = TextKeys::new();
        for (k, v) in pairs {
            keys.push(k, v);
        }
        keys
    }

    #[test]
    fn offer_lists_every_operational_key_once() {
        let negotiator = Negotiator::new(NegotiationConfig::default(), SessionType::Normal);
        let offer = negotiator.offer();
        assert_eq!(offer.get("HeaderDigest"), Some("None"));
        assert_eq!(offer.get("InitialR2T"), Some("No"));
        assert_eq!(offer.get("ErrorRecoveryLevel"), Some("0"));
        assert_eq!(offer.len(), 14);
        let discovery = Negotiator::new(NegotiationConfig::default(), SessionType::Discovery);
        assert_eq!(discovery.offer().len(), 3);
    }

    #[test]
    fn answers_follow_each_keys_function() {
        let config = NegotiationConfig {
            header_digest: DigestPolicy::PreferCrc32c,
            data_digest: DigestPolicy::PreferCrc32c,
            ..NegotiationConfig::default()
        };
        let mut negotiator = Negotiator::new(config, SessionType::Normal);
        negotiator
            .on_keys(
                &keys(&[
                    ("HeaderDigest", "CRC32C"),
                    ("DataDigest", "None"),
                    ("MaxRecvDataSegmentLength", "8192"),
                    ("InitialR2T", "Yes"),
                    ("ImmediateData", "Yes"),
                    ("MaxBurstLength", "262144"),
                    ("FirstBurstLength", "0x10000"),
                    ("DefaultTime2Wait", "2"),
                    ("DefaultTime2Retain", "0"),
                    ("MaxOutstandingR2T", "1"),
                    ("DataPDUInOrder", "Yes"),
                    ("DataSequenceInOrder", "Yes"),
                    ("ErrorRecoveryLevel", "0"),
                    ("MaxConnections", "1"),
                    ("TargetPortalGroupTag", "1"),
                    ("TargetAlias", "disk"),
                ]),
                true,
            )
            .unwrap();
        assert!(
            negotiator.take_replies().is_empty(),
            "answers need no reply"
        );
        let params = negotiator.finish().unwrap();
        assert!(params.header_digest);
        assert!(!params.data_digest);
        assert_eq!(params.max_xmit_data_segment_length, 8192);
        assert_eq!(params.max_recv_data_segment_length, 256 * 1024);
        assert!(params.initial_r2t, "OR: the target wants R2Ts");
        assert!(params.immediate_data);
        assert_eq!(params.max_burst_length, 262_144);
        assert_eq!(params.first_burst_length, 65_536);
        assert_eq!(params.default_time2wait, 2);
        assert_eq!(params.target_portal_group_tag, Some(1));
        assert_eq!(params.target_alias.as_deref(), Some("disk"));
    }

    #[test]
    fn boolean_and_numeric_functions_protect_our_side() {
        let config = NegotiationConfig {
            immediate_data: false,
            max_burst_length: 65536,
            ..NegotiationConfig::default()
        };
        let mut negotiator = Negotiator::new(config, SessionType::Normal);
        // A sloppy target answering more than we offered does not get it.
        negotiator
            .on_keys(
                &keys(&[
                    ("ImmediateData", "Yes"),
                    ("MaxBurstLength", "1048576"),
                    ("FirstBurstLength", "262144"),
                ]),
                true,
            )
            .unwrap();
        let params = negotiator.finish().unwrap();
        assert!(!params.immediate_data);
        assert_eq!(params.max_burst_length, 65536);
        assert_eq!(
            params.first_burst_length, 65536,
            "clamped to MaxBurstLength"
        );
    }

    #[test]
    fn special_answers_keep_defaults_and_unknown_keys_are_not_understood() {
        let mut negotiator = Negotiator::new(NegotiationConfig::default(), SessionType::Normal);
        negotiator
            .on_keys(
                &keys(&[
                    ("InitialR2T", "Reject"),
                    ("MaxBurstLength", "Irrelevant"),
                    ("ImmediateData", "NotUnderstood"),
                    ("X-com.example.Feature", "1"),
                ]),
                true,
            )
            .unwrap();
        let replies = negotiator.take_replies();
        assert_eq!(replies.get("X-com.example.Feature"), Some("NotUnderstood"));
        let params = negotiator.finish().unwrap();
        assert!(params.initial_r2t, "default Yes");
        assert_eq!(params.max_burst_length, 262_144);
    }

    #[test]
    fn target_proposals_are_answered() {
        let config = NegotiationConfig {
            header_digest: DigestPolicy::PreferCrc32c,
            ..NegotiationConfig::default()
        };
        let mut negotiator = Negotiator::new(config, SessionType::Normal);
        negotiator
            .on_keys(
                &keys(&[
                    ("HeaderDigest", "CRC32C,None"),
                    ("DataDigest", "CRC32C"),
                    ("MaxOutstandingR2T", "8"),
                    ("DefaultTime2Wait", "5"),
                    ("MaxBurstLength", "nonsense"),
                ]),
                false,
            )
            .unwrap();
        let replies = negotiator.take_replies();
        assert_eq!(replies.get("HeaderDigest"), Some("CRC32C"));
        assert_eq!(
            replies.get("DataDigest"),
            Some("Reject"),
            "we offer None only"
        );
        assert_eq!(replies.get("MaxOutstandingR2T"), Some("1"));
        assert_eq!(replies.get("DefaultTime2Wait"), Some("5"));
        assert_eq!(replies.get("MaxBurstLength"), Some("Reject"));
        let params = negotiator.finish().unwrap();
        assert!(params.header_digest);
        assert!(!params.data_digest);
    }

    #[test]
    fn invalid_answers_fail() {
        let mut negotiator = Negotiator::new(NegotiationConfig::default(), SessionType::Normal);
        assert_eq!(
            negotiator.on_keys(&keys(&[("HeaderDigest", "CRC32C")]), true),
            Err(NegotiationError::DigestRefused {
                key: "HeaderDigest"
            })
        );
        assert_eq!(
            negotiator.on_keys(&keys(&[("MaxRecvDataSegmentLength", "100")]), true),
            Err(NegotiationError::InvalidValue {
                key: "MaxRecvDataSegmentLength"
            })
        );
        assert_eq!(
            negotiator.on_keys(&keys(&[("MaxBurstLength", "99999999")]), true),
            Err(NegotiationError::InvalidValue {
                key: "MaxBurstLength"
            })
        );
        let config = NegotiationConfig {
            data_digest: DigestPolicy::RequireCrc32c,
            ..NegotiationConfig::default()
        };
        let negotiator = Negotiator::new(config, SessionType::Normal);
        assert_eq!(
            negotiator.finish(),
            Err(NegotiationError::DigestRefused { key: "DataDigest" }),
            "never answered: the default None is not acceptable"
        );
    }
}
