//! The login phase of one connection (RFC 7143 sections 6.3 and 11.12-11.13), sans-IO.
//!
//! [`Login::start`] gives the first Login Request; each Login Response goes to
//! [`Login::on_response`], which returns the next request to send or the outcome. Stages:
//!
//! 1. security: `AuthMethod=None`, or `AuthMethod=CHAP` when credentials are configured, then
//!    `CHAP_A=5`, then `CHAP_N`/`CHAP_R` (and our own challenge for mutual CHAP);
//! 2. operational: our proposals ([`Negotiator`]) and answers to the target's;
//! 3. transit to the full feature phase, where the target assigns the TSIH.
//!
//! A response with the C bit is only part of the target's text: we ask for the rest with an
//! empty request. Non-zero status classes become typed errors: redirection (class 1) carries the
//! new address, initiator errors (class 2) and target errors (class 3) one variant per detail.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::chap::{self, ChapConfig, ChapError, CHALLENGE_LEN, CHAP_MD5};
use super::negotiate::{
    NegotiationConfig, NegotiationError, Negotiator, OperationalParams, SessionType,
};
use super::pdus::{Isid, LoginRequest, LoginResponse, Pdu, Stage};
use super::text::{TextAssembler, TextError, TextKeys};

/// Most request/response exchanges one login may take. A normal CHAP login takes four; a target
/// that keeps the exchange going beyond this is broken or hostile.
const MAX_EXCHANGES: u32 = 32;

/// Who logs in where, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginConfig {
    pub initiator_name: String,
    /// Required for a normal session, absent for discovery.
    pub target_name: Option<String>,
    pub session_type: SessionType,
    pub isid: Isid,
    pub chap: Option<ChapConfig>,
    pub negotiation: NegotiationConfig,
}

/// What a successful login established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginOutcome {
    /// The session handle the target assigned.
    pub tsih: u16,
    pub params: OperationalParams,
    /// The StatSN we expect next.
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// The next thing to do after a Login Response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginStep {
    /// Send this Login Request and wait for the next response.
    Send(Pdu),
    /// The connection is in the full feature phase.
    Complete(LoginOutcome),
}

/// A login refused by the target with status class 2 (initiator error) or 3 (target error),
/// section 11.13.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginStatus {
    /// 02/00
    InitiatorError,
    /// 02/01: the credentials were wrong.
    AuthenticationFailed,
    /// 02/02: we may not access this target.
    AuthorizationFailed,
    /// 02/03
    TargetNotFound,
    /// 02/04
    TargetRemoved,
    /// 02/05
    UnsupportedVersion,
    /// 02/06
    TooManyConnections,
    /// 02/07
    MissingParameter,
    /// 02/08
    CannotIncludeInSession,
    /// 02/09
    SessionTypeNotSupported,
    /// 02/0a
    SessionDoesNotExist,
    /// 02/0b
    InvalidDuringLogin,
    /// 03/00
    TargetError,
    /// 03/01: try again later.
    ServiceUnavailable,
    /// 03/02: try again later.
    OutOfResources,
    /// Any other class and detail.
    Other { class: u8, detail: u8 },
}

impl LoginStatus {
    pub fn from_codes(class: u8, detail: u8) -> Self {
        match (class, detail) {
            (2, 0x00) => LoginStatus::InitiatorError,
            (2, 0x01) => LoginStatus::AuthenticationFailed,
            (2, 0x02) => LoginStatus::AuthorizationFailed,
            (2, 0x03) => LoginStatus::TargetNotFound,
            (2, 0x04) => LoginStatus::TargetRemoved,
            (2, 0x05) => LoginStatus::UnsupportedVersion,
            (2, 0x06) => LoginStatus::TooManyConnections,
            (2, 0x07) => LoginStatus::MissingParameter,
            (2, 0x08) => LoginStatus::CannotIncludeInSession,
            (2, 0x09) => LoginStatus::SessionTypeNotSupported,
            (2, 0x0a) => LoginStatus::SessionDoesNotExist,
            (2, 0x0b) => LoginStatus::InvalidDuringLogin,
            (3, 0x00) => LoginStatus::TargetError,
            (3, 0x01) => LoginStatus::ServiceUnavailable,
            (3, 0x02) => LoginStatus::OutOfResources,
            (class, detail) => LoginStatus::Other { class, detail },
        }
    }

    /// Whether trying again later can succeed: target errors (class 3) and too many connections
    /// (the old session may still be closing) are passing; the other initiator errors repeat.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            LoginStatus::TargetError
                | LoginStatus::ServiceUnavailable
                | LoginStatus::OutOfResources
                | LoginStatus::TooManyConnections
                | LoginStatus::Other { class: 3, .. }
        )
    }
}

/// A login exchange that broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginProtocolError {
    /// The response answers another task.
    WrongTask { itt: u32 },
    /// The response is for another stage than our request's.
    WrongStage { ours: Stage, theirs: Stage },
    /// The target transits to a stage we did not ask for.
    WrongTransit { asked: Stage, got: Stage },
    /// The target speaks a protocol version other than 0.
    UnsupportedVersion { active: u8 },
    /// The exchange went on for more than 32 requests.
    TooManyExchanges,
    /// The target answered AuthMethod with something we did not offer.
    AuthMethodNotOffered,
    /// A response arrived after the login completed or failed.
    AfterEnd,
}

/// Why a login did not reach the full feature phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// Status class 1: the target is at another address (`permanent` for 01/02, "moved
    /// permanently"); log in there. `address` is the TargetAddress value, `host:port,tag`.
    Redirected {
        permanent: bool,
        address: Option<String>,
    },
    /// Status class 2 or 3.
    Refused(LoginStatus),
    /// The target refused our AuthMethod (it wants CHAP and we have no credentials, or the
    /// reverse).
    AuthMethodRefused,
    Chap(ChapError),
    Negotiation(NegotiationError),
    Text(TextError),
    Protocol(LoginProtocolError),
}

impl LoginError {
    /// Whether logging in again (later, on a new connection) cannot succeed without a change of
    /// configuration: the session should give up rather than retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            LoginError::Redirected { .. } => false,
            LoginError::Refused(status) => !status.is_transient(),
            LoginError::AuthMethodRefused | LoginError::Chap(_) | LoginError::Negotiation(_) => {
                true
            }
            LoginError::Text(_) | LoginError::Protocol(_) => false,
        }
    }
}

impl From<ChapError> for LoginError {
    fn from(error: ChapError) -> Self {
        LoginError::Chap(error)
    }
}

impl From<NegotiationError> for LoginError {
    fn from(error: NegotiationError) -> Self {
        LoginError::Negotiation(error)
    }
}

impl From<TextError> for LoginError {
    fn from(error: TextError) -> Self {
        LoginError::Text(error)
    }
}

impl From<LoginProtocolError> for LoginError {
    fn from(error: LoginProtocolError) -> Self {
        LoginError::Protocol(error)
    }
}

impl fmt::Display for LoginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoginError::Redirected { permanent, address } => write!(
                f,
                "login redirected {} to {}",
                if *permanent {
                    "permanently"
                } else {
                    "temporarily"
                },
                address.as_deref().unwrap_or("an unnamed address")
            ),
            LoginError::Refused(status) => write!(f, "login refused: {status:?}"),
            LoginError::AuthMethodRefused => {
                f.write_str("the target refused our authentication method")
            }
            LoginError::Chap(e) => write!(f, "CHAP: {e}"),
            LoginError::Negotiation(e) => write!(f, "negotiation: {e}"),
            LoginError::Text(e) => write!(f, "login text: {e}"),
            LoginError::Protocol(e) => write!(f, "login protocol error: {e:?}"),
        }
    }
}

impl core::error::Error for LoginError {}

/// Where the exchange is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Sent the AuthMethod offer.
    AuthMethod,
    /// Sent `CHAP_A`.
    ChapAlgorithm,
    /// Sent `CHAP_R`; with mutual CHAP, our identifier and challenge too.
    ChapResponse,
    /// Security done on our side, waiting for the target to transit.
    SecurityEnd,
    /// Sent the operational keys (or answers), waiting for the transit to full feature.
    Operational,
    /// Complete or failed: nothing more is accepted.
    Ended,
}

/// One connection's login.
#[derive(Debug)]
pub struct Login {
    config: LoginConfig,
    itt: u32,
    cid: u16,
    cmd_sn: u32,
    exp_stat_sn: u32,
    phase: Phase,
    negotiator: Negotiator,
    operational_offered: bool,
    /// The text of a response continued over several PDUs.
    text: TextAssembler,
    /// The request we are waiting an answer to: its stage, and the stage we asked to move to.
    current: Stage,
    next: Stage,
    exchanges: u32,
    /// Mutual CHAP: our identifier and challenge.
    our_challenge: Option<(u8, Vec<u8>)>,
    /// Seeds our mutual CHAP challenge.
    entropy: u64,
}

/// splitmix64: spreads a seed over challenge bytes. The caller supplies the seed from a real
/// entropy source; this only stretches it.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Login {
    /// A login for a new session (TSIH 0) on connection `cid`, with task tag `itt` and initial
    /// CmdSN `cmd_sn`. `entropy` seeds our mutual CHAP challenge.
    pub fn new(config: LoginConfig, itt: u32, cid: u16, cmd_sn: u32, entropy: u64) -> Self {
        let negotiator = Negotiator::new(config.negotiation, config.session_type);
        Self {
            config,
            itt,
            cid,
            cmd_sn,
            exp_stat_sn: 0,
            phase: Phase::AuthMethod,
            negotiator,
            operational_offered: false,
            text: TextAssembler::new(),
            current: Stage::Security,
            next: Stage::Operational,
            exchanges: 0,
            our_challenge: None,
            entropy,
        }
    }

    /// The first Login Request.
    pub fn start(&mut self) -> Pdu {
        let c = &self.config;
        let mut keys = TextKeys::new();
        keys.push("InitiatorName", &c.initiator_name);
        keys.push(
            "SessionType",
            match c.session_type {
                SessionType::Normal => "Normal",
                SessionType::Discovery => "Discovery",
            },
        );
        if let Some(target) = &c.target_name {
            keys.push("TargetName", target);
        }
        let with_chap = c.chap.is_some();
        keys.push("AuthMethod", if with_chap { "CHAP" } else { "None" });
        self.phase = Phase::AuthMethod;
        // Without CHAP the security stage is this one exchange: ask to move on at once.
        self.request(Stage::Security, !with_chap, keys)
    }

    /// The CmdSN the session continues with.
    pub fn cmd_sn(&self) -> u32 {
        self.cmd_sn
    }

    fn request(&mut self, csg: Stage, transit: bool, keys: TextKeys) -> Pdu {
        self.current = csg;
        self.next = match csg {
            Stage::Security => Stage::Operational,
            _ => Stage::FullFeature,
        };
        let header = LoginRequest {
            transit,
            continue_: false,
            csg,
            nsg: self.next,
            isid: self.config.isid,
            tsih: 0,
            itt: self.itt,
            cid: self.cid,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        let data = keys.encode();
        Pdu::new(header.to_bhs(data.len() as u32), data)
    }

    /// Takes a Login Response.
    pub fn on_response(
        &mut self,
        response: &LoginResponse,
        data: &[u8],
    ) -> Result<LoginStep, LoginError> {
        let result = self.handle(response, data);
        match &result {
            Ok(LoginStep::Complete(_)) | Err(_) => self.phase = Phase::Ended,
            Ok(LoginStep::Send(_)) => {}
        }
        result
    }

    fn handle(&mut self, response: &LoginResponse, data: &[u8]) -> Result<LoginStep, LoginError> {
        if self.phase == Phase::Ended {
            return Err(LoginProtocolError::AfterEnd.into());
        }
        if response.itt != self.itt {
            return Err(LoginProtocolError::WrongTask { itt: response.itt }.into());
        }
        self.exp_stat_sn = response.sequence.stat_sn.wrapping_add(1);
        match response.status_class {
            0 => {}
            1 => {
                self.text.push(data)?;
                let keys = self.text.finish()?;
                return Err(LoginError::Redirected {
                    permanent: response.status_detail == 0x02,
                    address: keys.get("TargetAddress").map(String::from),
                });
            }
            class => {
                return Err(LoginError::Refused(LoginStatus::from_codes(
                    class,
                    response.status_detail,
                )))
            }
        }
        if response.version_active != 0 {
            return Err(LoginProtocolError::UnsupportedVersion {
                active: response.version_active,
            }
            .into());
        }
        if response.csg != self.current {
            return Err(LoginProtocolError::WrongStage {
                ours: self.current,
                theirs: response.csg,
            }
            .into());
        }
        self.exchanges += 1;
        if self.exchanges > MAX_EXCHANGES {
            return Err(LoginProtocolError::TooManyExchanges.into());
        }
        self.text.push(data)?;
        if response.continue_ {
            // Ask for the rest of the target's text (section 11.13.2): an empty request, no T.
            let header = LoginRequest {
                transit: false,
                continue_: false,
                csg: self.current,
                nsg: self.next,
                isid: self.config.isid,
                tsih: 0,
                itt: self.itt,
                cid: self.cid,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            };
            return Ok(LoginStep::Send(Pdu::new(header.to_bhs(0), Vec::new())));
        }
        let keys = self.text.finish()?;
        if response.transit && response.nsg != self.next {
            return Err(LoginProtocolError::WrongTransit {
                asked: self.next,
                got: response.nsg,
            }
            .into());
        }
        let (auth, other) = split_auth_keys(&keys);
        self.negotiator.on_keys(&other, self.operational_offered)?;
        match self.phase {
            Phase::AuthMethod => self.after_auth_method(response, &auth),
            Phase::ChapAlgorithm => self.after_chap_algorithm(&auth),
            Phase::ChapResponse => self.after_chap_response(response, &auth),
            Phase::SecurityEnd => self.security_end(response),
            Phase::Operational => self.after_operational(response),
            Phase::Ended => Err(LoginProtocolError::AfterEnd.into()),
        }
    }

    fn after_auth_method(
        &mut self,
        response: &LoginResponse,
        auth: &TextKeys,
    ) -> Result<LoginStep, LoginError> {
        let wanted = if self.config.chap.is_some() {
            "CHAP"
        } else {
            "None"
        };
        match auth.get("AuthMethod") {
            Some(method) if method == wanted => {}
            // A target that needs no authentication may just transit without answering.
            None if wanted == "None" && response.transit => {}
            Some("Reject") | Some("None") | Some("CHAP") | None => {
                return Err(LoginError::AuthMethodRefused)
            }
            Some(_) => return Err(LoginProtocolError::AuthMethodNotOffered.into()),
        }
        if wanted == "None" {
            self.phase = Phase::SecurityEnd;
            return self.security_end(response);
        }
        self.phase = Phase::ChapAlgorithm;
        let mut keys = self.negotiator.take_replies();
        keys.push("CHAP_A", "5");
        Ok(LoginStep::Send(self.request(Stage::Security, false, keys)))
    }

    fn after_chap_algorithm(&mut self, auth: &TextKeys) -> Result<LoginStep, LoginError> {
        let Some(chap) = self.config.chap.clone() else {
            return Err(LoginError::AuthMethodRefused);
        };
        let algorithm = auth
            .get("CHAP_A")
            .ok_or(ChapError::MissingKey { key: "CHAP_A" })?;
        if algorithm.parse::<u8>() != Ok(CHAP_MD5) {
            return Err(ChapError::UnsupportedAlgorithm.into());
        }
        let identifier = chap::parse_identifier(
            auth.get("CHAP_I")
                .ok_or(ChapError::MissingKey { key: "CHAP_I" })?,
        )?;
        let challenge = chap::decode_binary(
            auth.get("CHAP_C")
                .ok_or(ChapError::MissingKey { key: "CHAP_C" })?,
        )?;
        let answer = chap::response(identifier, &chap.initiator.secret, &challenge);
        let mut keys = self.negotiator.take_replies();
        keys.push("CHAP_N", &chap.initiator.name);
        keys.push("CHAP_R", &chap::encode_hex(&answer));
        if chap.target.is_some() {
            let mut our_challenge = Vec::with_capacity(CHALLENGE_LEN);
            while our_challenge.len() < CHALLENGE_LEN {
                our_challenge.extend_from_slice(&next_random(&mut self.entropy).to_be_bytes());
            }
            our_challenge.truncate(CHALLENGE_LEN);
            if our_challenge == challenge {
                // Astronomically unlikely, but an identical challenge would let a target reflect
                // our own answer back.
                our_challenge[0] ^= 0xFF;
            }
            let our_identifier = next_random(&mut self.entropy) as u8;
            keys.push("CHAP_I", &alloc::format!("{our_identifier}"));
            keys.push("CHAP_C", &chap::encode_hex(&our_challenge));
            self.our_challenge = Some((our_identifier, our_challenge));
        }
        self.phase = Phase::ChapResponse;
        Ok(LoginStep::Send(self.request(Stage::Security, true, keys)))
    }

    fn after_chap_response(
        &mut self,
        response: &LoginResponse,
        auth: &TextKeys,
    ) -> Result<LoginStep, LoginError> {
        let target = self.config.chap.as_ref().and_then(|c| c.target.clone());
        if let (Some(target), Some((identifier, challenge))) = (target, &self.our_challenge) {
            let name = auth
                .get("CHAP_N")
                .ok_or(ChapError::MissingKey { key: "CHAP_N" })?;
            let proof = chap::decode_binary(
                auth.get("CHAP_R")
                    .ok_or(ChapError::MissingKey { key: "CHAP_R" })?,
            )?;
            let expected = chap::response(*identifier, &target.secret, challenge);
            if name != target.name || proof != expected {
                return Err(ChapError::TargetNotAuthenticated.into());
            }
        }
        self.phase = Phase::SecurityEnd;
        self.security_end(response)
    }

    /// Our side of the security stage is done: move to the operational stage once the target
    /// transits, or ask it to.
    fn security_end(&mut self, response: &LoginResponse) -> Result<LoginStep, LoginError> {
        if !response.transit {
            let keys = self.negotiator.take_replies();
            return Ok(LoginStep::Send(self.request(Stage::Security, true, keys)));
        }
        self.phase = Phase::Operational;
        let mut keys = self.negotiator.take_replies();
        keys.extend(self.negotiator.offer());
        self.operational_offered = true;
        Ok(LoginStep::Send(self.request(
            Stage::Operational,
            true,
            keys,
        )))
    }

    fn after_operational(&mut self, response: &LoginResponse) -> Result<LoginStep, LoginError> {
        if !response.transit {
            let keys = self.negotiator.take_replies();
            return Ok(LoginStep::Send(self.request(
                Stage::Operational,
                true,
                keys,
            )));
        }
        let params = self.negotiator.finish()?;
        Ok(LoginStep::Complete(LoginOutcome {
            tsih: response.tsih,
            params,
            exp_stat_sn: self.exp_stat_sn,
            exp_cmd_sn: response.sequence.exp_cmd_sn,
            max_cmd_sn: response.sequence.max_cmd_sn,
        }))
    }
}

/// Separates the authentication keys (for the login) from the rest (for the negotiator).
fn split_auth_keys(keys: &TextKeys) -> (TextKeys, TextKeys) {
    let mut auth = TextKeys::new();
    let mut other = TextKeys::new();
    for (key, value) in keys.iter() {
        if key == "AuthMethod" || key.starts_with("CHAP_") {
            auth.push(key, value);
        } else {
            other.push(key, value);
        }
    }
    (auth, other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::chap::ChapCredentials;
    use crate::iscsi::negotiate::DigestPolicy;
    use crate::iscsi::pdus::TargetSequence;
    use alloc::string::ToString;

    fn config(chap: Option<ChapConfig>) -> LoginConfig {
        LoginConfig {
            initiator_name: "iqn.2026-01.test:node1".to_string(),
            target_name: Some("iqn.2026-01.test:disk".to_string()),
            session_type: SessionType::Normal,
            isid: Isid::random_type(1, 2),
            chap,
            negotiation: NegotiationConfig {
                header_digest: DigestPolicy::PreferCrc32c,
                ..NegotiationConfig::default()
            },
        }
    }

    fn response(csg: Stage, nsg: Option<Stage>, stat_sn: u32) -> LoginResponse {
        LoginResponse {
            transit: nsg.is_some(),
            continue_: false,
            csg,
            nsg: nsg.unwrap_or(Stage::Security),
            version_max: 0,
            version_active: 0,
            isid: Isid::random_type(1, 2),
            tsih: 0,
            itt: 1,
            sequence: TargetSequence {
                stat_sn,
                exp_cmd_sn: 5,
                max_cmd_sn: 36,
            },
            status_class: 0,
            status_detail: 0,
        }
    }

    fn keys_of(pdu: &Pdu) -> TextKeys {
        TextKeys::decode(&pdu.data).unwrap()
    }

    fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut keys = TextKeys::new();
        for (k, v) in pairs {
            keys.push(k, v);
        }
        keys.encode()
    }

    fn sent(step: Result<LoginStep, LoginError>) -> Pdu {
        match step {
            Ok(LoginStep::Send(pdu)) => pdu,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn login_without_authentication() {
        let mut login = Login::new(config(None), 1, 0, 5, 0);
        let first = login.start();
        let request = LoginRequest::from_bhs(&first.bhs);
        assert!(request.transit);
        assert_eq!(
            (request.csg, request.nsg),
            (Stage::Security, Stage::Operational)
        );
        assert_eq!(request.tsih, 0);
        assert_eq!(request.cmd_sn, 5);
        let keys = keys_of(&first);
        assert_eq!(keys.get("AuthMethod"), Some("None"));
        assert_eq!(keys.get("SessionType"), Some("Normal"));
        assert_eq!(keys.get("TargetName"), Some("iqn.2026-01.test:disk"));

        let r = response(Stage::Security, Some(Stage::Operational), 7);
        let data = text(&[("AuthMethod", "None"), ("TargetPortalGroupTag", "1")]);
        let second = sent(login.on_response(&r, &data));
        let request = LoginRequest::from_bhs(&second.bhs);
        assert_eq!(
            (request.csg, request.nsg),
            (Stage::Operational, Stage::FullFeature)
        );
        assert_eq!(request.exp_stat_sn, 8);
        assert_eq!(keys_of(&second).get("HeaderDigest"), Some("CRC32C,None"));

        let mut r = response(Stage::Operational, Some(Stage::FullFeature), 8);
        r.tsih = 0x77;
        let data = text(&[
            ("HeaderDigest", "CRC32C"),
            ("MaxRecvDataSegmentLength", "8192"),
        ]);
        let Ok(LoginStep::Complete(outcome)) = login.on_response(&r, &data) else {
            panic!("login should be complete");
        };
        assert_eq!(outcome.tsih, 0x77);
        assert_eq!(outcome.exp_stat_sn, 9);
        assert_eq!((outcome.exp_cmd_sn, outcome.max_cmd_sn), (5, 36));
        assert!(outcome.params.header_digest);
        assert_eq!(outcome.params.max_xmit_data_segment_length, 8192);
        assert_eq!(outcome.params.target_portal_group_tag, Some(1));
        assert_eq!(
            login.on_response(&r, &data),
            Err(LoginError::Protocol(LoginProtocolError::AfterEnd))
        );
    }

    fn chap(mutual: bool) -> ChapConfig {
        ChapConfig {
            initiator: ChapCredentials {
                name: "node1".to_string(),
                secret: b"initiatorsecret".to_vec(),
            },
            target: mutual.then(|| ChapCredentials {
                name: "disk".to_string(),
                secret: b"targetsecret12".to_vec(),
            }),
        }
    }

    #[test]
    fn login_with_mutual_chap() {
        let mut login = Login::new(config(Some(chap(true))), 1, 0, 1, 42);
        let first = login.start();
        assert!(!LoginRequest::from_bhs(&first.bhs).transit);
        assert_eq!(keys_of(&first).get("AuthMethod"), Some("CHAP"));

        let r = response(Stage::Security, None, 0);
        let second = sent(login.on_response(&r, &text(&[("AuthMethod", "CHAP")])));
        assert_eq!(keys_of(&second).get("CHAP_A"), Some("5"));

        let challenge = [0xAAu8; 16];
        let data = text(&[
            ("CHAP_A", "5"),
            ("CHAP_I", "9"),
            ("CHAP_C", &chap::encode_hex(&challenge)),
        ]);
        let third = sent(login.on_response(&response(Stage::Security, None, 1), &data));
        let keys = keys_of(&third);
        assert!(LoginRequest::from_bhs(&third.bhs).transit);
        assert_eq!(keys.get("CHAP_N"), Some("node1"));
        let expected = chap::response(9, b"initiatorsecret", &challenge);
        assert_eq!(
            keys.get("CHAP_R"),
            Some(chap::encode_hex(&expected).as_str())
        );
        let our_id = chap::parse_identifier(keys.get("CHAP_I").unwrap()).unwrap();
        let our_challenge = chap::decode_binary(keys.get("CHAP_C").unwrap()).unwrap();
        assert_eq!(our_challenge.len(), CHALLENGE_LEN);

        // A wrong proof from the target fails the login.
        let mut wrong = Login::new(config(Some(chap(true))), 1, 0, 1, 42);
        wrong.start();
        sent(wrong.on_response(
            &response(Stage::Security, None, 0),
            &text(&[("AuthMethod", "CHAP")]),
        ));
        sent(wrong.on_response(&response(Stage::Security, None, 1), &data));
        let bad = text(&[("CHAP_N", "disk"), ("CHAP_R", "0x00112233")]);
        assert_eq!(
            wrong.on_response(
                &response(Stage::Security, Some(Stage::Operational), 2),
                &bad
            ),
            Err(LoginError::Chap(ChapError::TargetNotAuthenticated))
        );

        let proof = chap::response(our_id, b"targetsecret12", &our_challenge);
        let good = text(&[("CHAP_N", "disk"), ("CHAP_R", &chap::encode_hex(&proof))]);
        let fourth = sent(login.on_response(
            &response(Stage::Security, Some(Stage::Operational), 2),
            &good,
        ));
        assert_eq!(LoginRequest::from_bhs(&fourth.bhs).csg, Stage::Operational);
    }

    #[test]
    fn refusals_and_redirects_are_typed() {
        let mut login = Login::new(config(None), 1, 0, 1, 0);
        login.start();
        let mut r = response(Stage::Security, None, 0);
        r.status_class = 2;
        r.status_detail = 1;
        let error = login.on_response(&r, &[]).unwrap_err();
        assert_eq!(
            error,
            LoginError::Refused(LoginStatus::AuthenticationFailed)
        );
        assert!(error.is_permanent());

        let mut login = Login::new(config(None), 1, 0, 1, 0);
        login.start();
        r.status_class = 1;
        r.status_detail = 2;
        let error = login
            .on_response(&r, &text(&[("TargetAddress", "127.0.0.2:3261,1")]))
            .unwrap_err();
        assert_eq!(
            error,
            LoginError::Redirected {
                permanent: true,
                address: Some("127.0.0.2:3261,1".to_string())
            }
        );
        assert!(!error.is_permanent());

        assert!(LoginStatus::from_codes(3, 1).is_transient());
        assert!(!LoginStatus::from_codes(2, 3).is_transient());
        assert_eq!(
            LoginStatus::from_codes(2, 0x42),
            LoginStatus::Other {
                class: 2,
                detail: 0x42
            }
        );
    }

    #[test]
    fn a_target_that_wants_chap_from_an_initiator_without_credentials() {
        let mut login = Login::new(config(None), 1, 0, 1, 0);
        login.start();
        assert_eq!(
            login.on_response(
                &response(Stage::Security, None, 0),
                &text(&[("AuthMethod", "Reject")])
            ),
            Err(LoginError::AuthMethodRefused)
        );
    }

    #[test]
    fn continued_responses_are_joined() {
        let mut login = Login::new(config(None), 1, 0, 1, 0);
        login.start();
        let data = text(&[("AuthMethod", "None"), ("TargetAlias", "the-disk")]);
        let (a, b) = data.split_at(15);
        let mut part = response(Stage::Security, None, 0);
        part.continue_ = true;
        let ask = sent(login.on_response(&part, a));
        assert!(ask.data.is_empty());
        assert!(!LoginRequest::from_bhs(&ask.bhs).transit);
        let next =
            sent(login.on_response(&response(Stage::Security, Some(Stage::Operational), 1), b));
        assert_eq!(LoginRequest::from_bhs(&next.bhs).csg, Stage::Operational);
        let Ok(LoginStep::Complete(outcome)) = login.on_response(
            &response(Stage::Operational, Some(Stage::FullFeature), 2),
            &[],
        ) else {
            panic!("not complete");
        };
        assert_eq!(outcome.params.target_alias.as_deref(), Some("the-disk"));
    }

    #[test]
    fn protocol_violations() {
        let mut login = Login::new(config(None), 1, 0, 1, 0);
        login.start();
        let mut r = response(Stage::Security, Some(Stage::Operational), 0);
        r.itt = 2;
        assert_eq!(
            login.on_response(&r, &[]),
            Err(LoginError::Protocol(LoginProtocolError::WrongTask {
                itt: 2
            }))
        );
        let mut login = Login::new(config(None), 1, 0, 1, 0);
        login.start();
        let r = response(Stage::Security, Some(Stage::FullFeature), 0);
        assert_eq!(
            login.on_response(&r, &text(&[("AuthMethod", "None")])),
            Err(LoginError::Protocol(LoginProtocolError::WrongTransit {
                asked: Stage::Operational,
                got: Stage::FullFeature
            }))
        );
        // A target that never transits runs out of exchanges.
        let mut login = Login::new(config(None), 1, 0, 1, 0);
        login.start();
        let r = response(Stage::Security, Some(Stage::Operational), 0);
        sent(login.on_response(&r, &text(&[("AuthMethod", "None")])));
        let stuck = response(Stage::Operational, None, 0);
        let mut result = Ok(LoginStep::Send(Pdu::new(r.to_bhs(0), Vec::new())));
        for _ in 0..MAX_EXCHANGES {
            result = login.on_response(&stuck, &[]);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(
            result,
            Err(LoginError::Protocol(LoginProtocolError::TooManyExchanges))
        );
    }
}
