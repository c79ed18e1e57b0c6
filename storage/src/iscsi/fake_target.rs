//! An in-memory iSCSI target for the session tests: enough of RFC 7143 to log in (with CHAP),
//! negotiate, answer SendTargets, and serve one LUN of RAM with READ/WRITE(16) (R2T and
//! unsolicited data included) and persistent reservations of type Write Exclusive - Registrants
//! Only (registrations bound to the connection, as tgt binds them to the I_T nexus), plus faults
//! on demand (drops, silence, UNIT ATTENTIONs, rejects, bad offsets, digest corruption,
//! asynchronous messages). It checks what the initiator sends and records every violation it
//! sees, so tests can assert the initiator kept the rules.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use transport::{Pipe, PipeError};

use super::chap;
use super::pdus::{
    AsyncEvent, AsyncMessage, DataIn, InitiatorPdu, LoginRequest, LoginResponse, LogoutResponse,
    NopIn, NopOut, ReadyToTransfer, Reject, RejectReason, Residual, ScsiCommand, ScsiResponse,
    Stage, TargetSequence, TextRequest, TextResponse, RESERVED_TAG,
};
use super::stream::{encode_pdu, Digests, PduDecoder};
use super::text::{TextAssembler, TextKeys};
use crate::pdu::{Bhs, Lun};

/// Both directions of an in-memory connection.
#[derive(Debug, Default)]
struct Channel {
    to_target: VecDeque<u8>,
    to_initiator: VecDeque<u8>,
    closed: bool,
}

/// One end of an in-memory connection.
#[derive(Debug, Clone)]
pub struct MemPipe {
    channel: Rc<RefCell<Channel>>,
    is_target: bool,
    /// Most bytes one `send` takes (0: the pipe is stuck).
    pub send_limit: usize,
}

/// A session configuration of `initiator` to the fake target's disk with the short timeouts
/// and reconnect delays the tests use (no NOP pings unless a test turns them on).
pub fn test_session_config(initiator: &str) -> super::SessionConfig {
    let mut config = super::SessionConfig::normal(
        initiator,
        "iqn.2026-01.test:disk",
        super::Isid::random_type(0x1234, 1),
    );
    config.timeouts.login_ms = 1_000;
    config.timeouts.command_ms = 2_000;
    config.timeouts.nop_interval_ms = 0;
    config.timeouts.logout_ms = 500;
    config.timeouts.stall_ms = 1_000;
    config.retry.reconnect_delay_ms = 10;
    config.retry.max_reconnect_delay_ms = 100;
    config.retry.command_deadline_ms = 20_000;
    config
}

/// A connected pair: the initiator's end, the target's end.
pub fn mem_pipe() -> (MemPipe, MemPipe) {
    let channel = Rc::new(RefCell::new(Channel::default()));
    (
        MemPipe {
            channel: channel.clone(),
            is_target: false,
            send_limit: usize::MAX,
        },
        MemPipe {
            channel,
            is_target: true,
            send_limit: usize::MAX,
        },
    )
}

impl MemPipe {
    /// A pipe that is already closed.
    pub fn dead() -> MemPipe {
        let (pipe, _) = mem_pipe();
        pipe.close();
        pipe
    }

    pub fn close(&self) {
        self.channel.borrow_mut().closed = true;
    }
}

impl Pipe for MemPipe {
    fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
        let mut channel = self.channel.borrow_mut();
        if channel.closed {
            return Err(PipeError::Closed);
        }
        let n = data.len().min(self.send_limit);
        let queue = if self.is_target {
            &mut channel.to_initiator
        } else {
            &mut channel.to_target
        };
        queue.extend(&data[..n]);
        Ok(n)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError> {
        let mut channel = self.channel.borrow_mut();
        let closed = channel.closed;
        let queue = if self.is_target {
            &mut channel.to_target
        } else {
            &mut channel.to_initiator
        };
        if queue.is_empty() && closed {
            return Err(PipeError::Closed);
        }
        let n = buf.len().min(queue.len());
        for (slot, byte) in buf.iter_mut().zip(queue.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }
}

/// The target's settings.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub target_name: String,
    /// The initiator must authenticate with this name and secret.
    pub chap: Option<(String, Vec<u8>)>,
    /// Our name and secret for mutual CHAP.
    pub mutual: Option<(String, Vec<u8>)>,
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Commands the target accepts at once (MaxCmdSN - ExpCmdSN + 1 when idle).
    pub window: u32,
    /// Carry GOOD status in the last Data-In rather than a SCSI Response.
    pub status_in_data_in: bool,
    /// Split login responses into pieces of this many bytes (C bit); 0 for whole.
    pub login_split: usize,
    /// Split text responses into pieces of this many bytes (C bit); 0 for whole.
    pub text_split: usize,
    /// Refuse every login with this status class and detail.
    pub refuse_login: Option<(u8, u8)>,
    /// Redirect every login to this TargetAddress.
    pub redirect: Option<String>,
    pub block_len: u32,
    pub blocks: u64,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            target_name: "iqn.2026-01.test:disk".to_string(),
            chap: None,
            mutual: None,
            header_digest: true,
            data_digest: true,
            max_recv_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            window: 32,
            status_in_data_in: false,
            login_split: 0,
            text_split: 0,
            refuse_login: None,
            redirect: None,
            block_len: 512,
            blocks: 2048,
        }
    }
}

/// Faults the next polls inject; tests set them between steps.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Read everything, answer nothing.
    pub mute: bool,
    /// Keep SCSI commands unanswered (they count as outstanding) until cleared.
    pub hold_commands: bool,
    /// The next this many SCSI commands end in CHECK CONDITION, UNIT ATTENTION `ua_code`.
    pub unit_attentions: u32,
    pub ua_code: (u8, u8),
    /// Close the connection once this many more SCSI commands or Data-Outs arrived.
    pub drop_after_pdus: Option<u32>,
    /// The next read gets a Data-In past its expected length.
    pub data_in_out_of_range: bool,
    /// The next SCSI command is rejected with this reason.
    pub reject_next_command: Option<RejectReason>,
    /// The next data digest we send is wrong.
    pub corrupt_next_data_digest: bool,
    /// Send an Asynchronous Message asking for a logout.
    pub async_logout_request: bool,
    /// Send a NOP-In ping that wants an answer.
    pub nop_in_ping: bool,
    /// Send Data-In PDUs in reverse order (the last, with F, still last).
    pub reverse_data_in: bool,
    /// Send these bytes as they are.
    pub garbage: Option<Vec<u8>>,
}

/// What the target saw.
#[derive(Debug, Clone, Default)]
pub struct TargetStats {
    pub logins: u32,
    pub connections: u32,
    /// Opcode (CDB byte 0) of every SCSI command, in arrival order.
    pub commands: Vec<u8>,
    pub max_outstanding: usize,
    pub data_out_pdus: u32,
    pub largest_data_out: usize,
    pub r2ts: u32,
    pub immediate_bytes: u64,
    pub unsolicited_bytes: u64,
    pub nop_pings_answered: u32,
    pub nop_answers_received: u32,
    pub logouts: u32,
    pub text_requests: u32,
    pub last_isid: [u8; 6],
    /// Every rule the initiator broke.
    pub violations: Vec<String>,
}

#[derive(Debug)]
struct WriteState {
    cdb: [u8; 16],
    lun: Lun,
    lba: u64,
    expected: u32,
    buf: Vec<u8>,
    received: u32,
    /// Unsolicited Data-Out still expected (the command had F=0).
    unsolicited_open: bool,
    unsolicited_data_sn: u32,
    /// The R2T being answered: TTT, offset, length, next DataSN, bytes received in it.
    r2t: Option<(u32, u32, u32, u32, u32)>,
    /// Next offset not yet asked for.
    next_r2t_offset: u32,
}

#[derive(Debug)]
enum ConnPhase {
    Login,
    Full,
}

#[derive(Debug)]
struct TargetConn {
    pipe: MemPipe,
    decoder: PduDecoder,
    out: Vec<u8>,
    digests: Digests,
    phase: ConnPhase,
    stat_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    initiator_mrdsl: u32,
    max_burst: u32,
    first_burst: u32,
    immediate_data: bool,
    initial_r2t: bool,
    pending_digests: Digests,
    login_text: TextAssembler,
    /// Rest of a split login response: bytes, then (transit, nsg, tsih).
    login_rest: Option<(Vec<u8>, bool, Stage, u16)>,
    chap_challenge: Option<(u8, Vec<u8>)>,
    authenticated: bool,
    writes: BTreeMap<u32, WriteState>,
    held: Vec<(ScsiCommand, Vec<u8>)>,
    text_rest: Option<(u32, Vec<u8>)>,
    next_ttt: u32,
    close_after_flush: bool,
}

/// The in-memory target.
#[derive(Debug)]
pub struct FakeTarget {
    pub config: TargetConfig,
    pub faults: Faults,
    pub stats: TargetStats,
    pub disk: Vec<u8>,
    /// Persistent reservations, as tgt keeps them: each key with the connection (I_T nexus)
    /// that registered it; the holder's key and type.
    pub keys: Vec<(u64, u32)>,
    pub reservation: Option<(u64, u8)>,
    conn: Option<TargetConn>,
    next_tsih: u16,
}

fn fixed_sense(key: u8, asc: u8, ascq: u8) -> Vec<u8> {
    let mut sense = vec![0u8; 18];
    sense[0] = 0x70;
    sense[2] = key;
    sense[7] = 10;
    sense[12] = asc;
    sense[13] = ascq;
    sense
}

impl FakeTarget {
    pub fn new(config: TargetConfig) -> Self {
        let size = (config.blocks * u64::from(config.block_len)) as usize;
        Self {
            config,
            faults: Faults::default(),
            stats: TargetStats::default(),
            disk: vec![0; size],
            keys: Vec::new(),
            reservation: None,
            conn: None,
            next_tsih: 1,
        }
    }

    /// A new connection from the initiator (the old one, if any, is gone).
    pub fn accept(&mut self, pipe: MemPipe) {
        self.stats.connections += 1;
        self.conn = Some(TargetConn {
            pipe,
            decoder: PduDecoder::new(self.config.max_recv_data_segment_length.max(8192)),
            out: Vec::new(),
            digests: Digests::NONE,
            phase: ConnPhase::Login,
            stat_sn: 0x1000,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            initiator_mrdsl: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            pending_digests: Digests::NONE,
            login_text: TextAssembler::new(),
            login_rest: None,
            chap_challenge: None,
            authenticated: false,
            writes: BTreeMap::new(),
            held: Vec::new(),
            text_rest: None,
            next_ttt: 0x100,
            close_after_flush: false,
        });
    }

    pub fn held_commands(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.held.len())
    }

    fn violation(&mut self, text: String) {
        self.stats.violations.push(text);
    }

    /// One step: injects faults, reads and answers, sends.
    pub fn poll(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let mut closed = false;
        let mut buf = [0u8; 4096];
        loop {
            match conn.pipe.recv(&mut buf) {
                Ok(0) => break,
                Ok(n) => conn.decoder.push(&buf[..n]),
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if matches!(conn.phase, ConnPhase::Full) && !self.faults.mute {
            self.inject(&mut conn);
        }
        loop {
            match conn.decoder.next_pdu() {
                Ok(Some(pdu)) => {
                    if self.faults.mute {
                        continue;
                    }
                    match InitiatorPdu::parse(pdu) {
                        Ok(pdu) => self.handle(&mut conn, pdu),
                        Err(e) => self.violation(format!("unparsable PDU: {e}")),
                    }
                    if conn.close_after_flush {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.violation(format!("bad stream: {e}"));
                    closed = true;
                    break;
                }
            }
        }
        if !self.faults.hold_commands && !conn.held.is_empty() {
            for (command, data) in core::mem::take(&mut conn.held) {
                self.execute(&mut conn, command, data);
            }
        }
        if !conn.out.is_empty() {
            match conn.pipe.send(&conn.out) {
                Ok(n) => {
                    conn.out.drain(..n);
                }
                Err(_) => closed = true,
            }
        }
        if conn.close_after_flush && conn.out.is_empty() {
            closed = true;
        }
        if closed {
            conn.pipe.close();
        } else {
            self.conn = Some(conn);
        }
    }

    fn inject(&mut self, conn: &mut TargetConn) {
        if let Some(bytes) = self.faults.garbage.take() {
            conn.out.extend_from_slice(&bytes);
        }
        if core::mem::take(&mut self.faults.async_logout_request) {
            let message = AsyncMessage {
                lun: Lun::default(),
                sequence: self.status(conn),
                event: AsyncEvent::LogoutRequested,
                vcode: 0,
                parameters: [0, 0, 0],
                sense: Vec::new(),
            };
            self.send(conn, &message.to_bhs(0), &[]);
        }
        if core::mem::take(&mut self.faults.nop_in_ping) {
            let nop = NopIn {
                lun: Lun::default(),
                itt: RESERVED_TAG,
                ttt: 0x77,
                sequence: self.peek(conn),
            };
            self.send(conn, &nop.to_bhs(4), b"ping");
        }
    }

    /// Sequence numbers for a PDU that consumes a StatSN.
    fn status(&mut self, conn: &mut TargetConn) -> TargetSequence {
        let sequence = self.peek(conn);
        conn.stat_sn = conn.stat_sn.wrapping_add(1);
        sequence
    }

    /// Sequence numbers for a PDU that does not consume one.
    fn peek(&mut self, conn: &mut TargetConn) -> TargetSequence {
        let outstanding = (conn.held.len() + conn.writes.len()) as u32;
        let max = conn
            .exp_cmd_sn
            .wrapping_add(self.config.window.saturating_sub(1 + outstanding));
        // MaxCmdSN never goes back (section 4.2.2.1).
        if max.wrapping_sub(conn.max_cmd_sn) < 0x8000_0000 {
            conn.max_cmd_sn = max;
        }
        TargetSequence {
            stat_sn: conn.stat_sn,
            exp_cmd_sn: conn.exp_cmd_sn,
            max_cmd_sn: conn.max_cmd_sn,
        }
    }

    fn send(&mut self, conn: &mut TargetConn, bhs: &Bhs, data: &[u8]) {
        encode_pdu(bhs, &[], data, conn.digests, &mut conn.out).unwrap();
        if conn.digests.data
            && !data.is_empty()
            && core::mem::take(&mut self.faults.corrupt_next_data_digest)
        {
            let last = conn.out.len() - 1;
            conn.out[last] ^= 0x01;
        }
    }

    fn handle(&mut self, conn: &mut TargetConn, pdu: InitiatorPdu) {
        match (&conn.phase, pdu) {
            (ConnPhase::Login, InitiatorPdu::LoginRequest(request, data)) => {
                self.login(conn, request, &data)
            }
            (ConnPhase::Login, other) => self.violation(format!("before login: {other:?}")),
            (ConnPhase::Full, InitiatorPdu::ScsiCommand(command, data)) => {
                self.command(conn, command, data)
            }
            (ConnPhase::Full, InitiatorPdu::DataOut(header, data)) => {
                self.data_out(conn, header, data)
            }
            (ConnPhase::Full, InitiatorPdu::NopOut(nop, data)) => self.nop_out(conn, nop, data),
            (ConnPhase::Full, InitiatorPdu::TextRequest(request, data)) => {
                self.text(conn, request, &data)
            }
            (ConnPhase::Full, InitiatorPdu::LogoutRequest(request)) => {
                self.stats.logouts += 1;
                let response = LogoutResponse {
                    response: 0,
                    itt: request.itt,
                    sequence: self.status(conn),
                    time2wait: 0,
                    time2retain: 0,
                };
                self.send(conn, &response.to_bhs(), &[]);
                conn.close_after_flush = true;
            }
            (ConnPhase::Full, other) => self.violation(format!("unexpected: {other:?}")),
        }
    }

    fn login_response(
        &mut self,
        conn: &mut TargetConn,
        request: &LoginRequest,
        transit: bool,
        nsg: Stage,
        keys: &TextKeys,
        tsih: u16,
    ) {
        let mut data = keys.encode();
        let split = self.config.login_split;
        let mut continue_ = false;
        if split > 0 && data.len() > split {
            let rest = data.split_off(split);
            conn.login_rest = Some((rest, transit, nsg, tsih));
            continue_ = true;
        }
        let response = LoginResponse {
            transit: transit && !continue_,
            continue_,
            csg: request.csg,
            nsg,
            version_max: 0,
            version_active: 0,
            isid: request.isid,
            tsih: if transit && !continue_ { tsih } else { 0 },
            itt: request.itt,
            sequence: self.status(conn),
            status_class: 0,
            status_detail: 0,
        };
        self.send(conn, &response.to_bhs(data.len() as u32), &data);
        if response.transit && nsg == Stage::FullFeature {
            conn.phase = ConnPhase::Full;
            conn.digests = conn.pending_digests;
            conn.decoder.set_digests(conn.pending_digests);
            self.stats.logins += 1;
        }
    }

    fn refuse(
        &mut self,
        conn: &mut TargetConn,
        request: &LoginRequest,
        class: u8,
        detail: u8,
        data: &[u8],
    ) {
        let response = LoginResponse {
            transit: false,
            continue_: false,
            csg: request.csg,
            nsg: Stage::Security,
            version_max: 0,
            version_active: 0,
            isid: request.isid,
            tsih: 0,
            itt: request.itt,
            sequence: self.status(conn),
            status_class: class,
            status_detail: detail,
        };
        self.send(conn, &response.to_bhs(data.len() as u32), data);
        conn.close_after_flush = true;
    }

    fn login(&mut self, conn: &mut TargetConn, request: LoginRequest, data: &[u8]) {
        self.stats.last_isid = request.isid.0;
        if request.tsih != 0 {
            self.violation("login with a non-zero TSIH".to_string());
        }
        conn.exp_cmd_sn = request.cmd_sn;
        if let Some((mut rest, transit, nsg, tsih)) = conn.login_rest.take() {
            if !data.is_empty() || request.transit {
                self.violation("continuation request with data or T".to_string());
            }
            let split = self.config.login_split;
            let more = rest.len() > split;
            let tail = if more {
                rest.split_off(split)
            } else {
                Vec::new()
            };
            let piece = rest;
            let last = !more;
            let response = LoginResponse {
                transit: transit && last,
                continue_: more,
                csg: request.csg,
                nsg,
                version_max: 0,
                version_active: 0,
                isid: request.isid,
                tsih: if transit && last { tsih } else { 0 },
                itt: request.itt,
                sequence: self.status(conn),
                status_class: 0,
                status_detail: 0,
            };
            if more {
                conn.login_rest = Some((tail, transit, nsg, tsih));
            }
            self.send(conn, &response.to_bhs(piece.len() as u32), &piece);
            if response.transit && nsg == Stage::FullFeature {
                conn.phase = ConnPhase::Full;
                conn.digests = conn.pending_digests;
                conn.decoder.set_digests(conn.pending_digests);
                self.stats.logins += 1;
            }
            return;
        }
        if let Err(e) = conn.login_text.push(data) {
            self.violation(format!("login text: {e}"));
        }
        if request.continue_ {
            return;
        }
        let keys = match conn.login_text.finish() {
            Ok(keys) => keys,
            Err(e) => {
                self.violation(format!("login text: {e}"));
                return;
            }
        };
        if let Some((class, detail)) = self.config.refuse_login {
            self.refuse(conn, &request, class, detail, &[]);
            return;
        }
        if let Some(address) = self.config.redirect.clone() {
            let mut keys = TextKeys::new();
            keys.push("TargetAddress", &address);
            self.refuse(conn, &request, 1, 1, &keys.encode());
            return;
        }
        let mut answer = TextKeys::new();
        match request.csg {
            Stage::Security => {
                if let Some(name) = keys.get("TargetName") {
                    if name != self.config.target_name {
                        self.refuse(conn, &request, 2, 3, &[]);
                        return;
                    }
                }
                if let Some(method) = keys.get("AuthMethod") {
                    let wants_chap = self.config.chap.is_some();
                    let offered: Vec<&str> = method.split(',').collect();
                    if wants_chap && offered.contains(&"CHAP") {
                        answer.push("AuthMethod", "CHAP");
                    } else if !wants_chap && offered.contains(&"None") {
                        answer.push("AuthMethod", "None");
                        conn.authenticated = true;
                    } else {
                        self.refuse(conn, &request, 2, 1, &[]);
                        return;
                    }
                    answer.push("TargetPortalGroupTag", "1");
                }
                if keys.get("CHAP_A").is_some() {
                    let challenge: Vec<u8> = (0..16).map(|i| 0xA0 ^ i).collect();
                    answer.push("CHAP_A", "5");
                    answer.push("CHAP_I", "7");
                    answer.push("CHAP_C", &chap::encode_hex(&challenge));
                    conn.chap_challenge = Some((7, challenge));
                }
                if let (Some(name), Some(response)) = (keys.get("CHAP_N"), keys.get("CHAP_R")) {
                    let (expected_name, secret) = self.config.chap.clone().unwrap_or_default();
                    let (id, challenge) = conn.chap_challenge.clone().unwrap_or_default();
                    let expected = chap::response(id, &secret, &challenge);
                    if name != expected_name
                        || chap::decode_binary(response).ok().as_deref() != Some(&expected[..])
                    {
                        self.refuse(conn, &request, 2, 1, &[]);
                        return;
                    }
                    conn.authenticated = true;
                    if let (Some(their_id), Some(their_challenge)) =
                        (keys.get("CHAP_I"), keys.get("CHAP_C"))
                    {
                        let Some((our_name, our_secret)) = self.config.mutual.clone() else {
                            self.refuse(conn, &request, 2, 1, &[]);
                            return;
                        };
                        let id = chap::parse_identifier(their_id).unwrap_or(0);
                        let challenge = chap::decode_binary(their_challenge).unwrap_or_default();
                        answer.push("CHAP_N", &our_name);
                        answer.push(
                            "CHAP_R",
                            &chap::encode_hex(&chap::response(id, &our_secret, &challenge)),
                        );
                    }
                }
                let transit = request.transit && conn.authenticated;
                self.login_response(conn, &request, transit, Stage::Operational, &answer, 0);
            }
            Stage::Operational => {
                if !conn.authenticated {
                    self.refuse(conn, &request, 2, 1, &[]);
                    return;
                }
                self.operational_keys(conn, &keys, &mut answer);
                let tsih = self.next_tsih;
                if request.transit {
                    self.next_tsih = self.next_tsih.wrapping_add(1).max(1);
                }
                self.login_response(
                    conn,
                    &request,
                    request.transit,
                    Stage::FullFeature,
                    &answer,
                    tsih,
                );
            }
            _ => self.violation("login in a reserved stage".to_string()),
        }
    }

    fn operational_keys(&mut self, conn: &mut TargetConn, keys: &TextKeys, answer: &mut TextKeys) {
        let c = self.config.clone();
        let number = |v: &str| v.parse::<u32>().unwrap_or(0);
        let yes = |v: &str| v == "Yes";
        let yn = |b: bool| if b { "Yes" } else { "No" };
        for (key, value) in keys.iter() {
            match key {
                "HeaderDigest" | "DataDigest" => {
                    let supported = if key == "HeaderDigest" {
                        c.header_digest
                    } else {
                        c.data_digest
                    };
                    let choice = value
                        .split(',')
                        .find(|v| *v == "None" || (*v == "CRC32C" && supported))
                        .unwrap_or("Reject");
                    answer.push(key, choice);
                    if key == "HeaderDigest" {
                        conn.pending_digests.header = choice == "CRC32C";
                    } else {
                        conn.pending_digests.data = choice == "CRC32C";
                    }
                }
                "MaxRecvDataSegmentLength" => conn.initiator_mrdsl = number(value),
                "MaxBurstLength" => {
                    conn.max_burst = number(value).min(c.max_burst_length);
                    answer.push(key, &format!("{}", conn.max_burst));
                }
                "FirstBurstLength" => {
                    conn.first_burst = number(value).min(c.first_burst_length);
                    answer.push(key, &format!("{}", conn.first_burst));
                }
                "InitialR2T" => {
                    conn.initial_r2t = yes(value) || c.initial_r2t;
                    answer.push(key, yn(conn.initial_r2t));
                }
                "ImmediateData" => {
                    conn.immediate_data = yes(value) && c.immediate_data;
                    answer.push(key, yn(conn.immediate_data));
                }
                "MaxOutstandingR2T" | "MaxConnections" | "ErrorRecoveryLevel" => {
                    answer.push(key, &format!("{}", number(value).min(1)))
                }
                "DefaultTime2Wait" | "DefaultTime2Retain" => answer.push(key, "0"),
                "DataPDUInOrder" | "DataSequenceInOrder" => answer.push(key, "Yes"),
                _ => answer.push(key, "NotUnderstood"),
            }
        }
        answer.push(
            "MaxRecvDataSegmentLength",
            &format!("{}", c.max_recv_data_segment_length),
        );
        if conn.first_burst > conn.max_burst {
            conn.first_burst = conn.max_burst;
        }
    }

    fn check_window(&mut self, conn: &mut TargetConn, immediate: bool, cmd_sn: u32) {
        if immediate {
            return;
        }
        if cmd_sn != conn.exp_cmd_sn {
            self.violation(format!("CmdSN {cmd_sn}, expected {}", conn.exp_cmd_sn));
        }
        if cmd_sn.wrapping_sub(conn.max_cmd_sn) < 0x8000_0000 && cmd_sn != conn.max_cmd_sn {
            self.violation(format!(
                "CmdSN {cmd_sn} beyond MaxCmdSN {}",
                conn.max_cmd_sn
            ));
        }
        conn.exp_cmd_sn = cmd_sn.wrapping_add(1);
    }

    fn count_pdu_for_drop(&mut self, conn: &mut TargetConn) -> bool {
        if let Some(left) = self.faults.drop_after_pdus.as_mut() {
            if *left == 0 {
                self.faults.drop_after_pdus = None;
                conn.out.clear();
                conn.close_after_flush = true;
                return true;
            }
            *left -= 1;
        }
        false
    }

    fn command(&mut self, conn: &mut TargetConn, command: ScsiCommand, data: Vec<u8>) {
        self.check_window(conn, command.immediate, command.cmd_sn);
        self.stats.commands.push(command.cdb[0]);
        if self.count_pdu_for_drop(conn) {
            return;
        }
        if let Some(reason) = self.faults.reject_next_command.take() {
            let reject = Reject {
                reason,
                sequence: self.status(conn),
                data_sn: 0,
                rejected: command.to_bhs(data.len() as u32).to_bytes().unwrap(),
            };
            self.send(conn, &reject.to_bhs(), &reject.rejected);
            return;
        }
        if data.len() > self.config.max_recv_data_segment_length as usize {
            self.violation(format!("immediate data of {} bytes", data.len()));
        }
        self.stats.immediate_bytes += data.len() as u64;
        if self.faults.hold_commands {
            conn.held.push((command, data));
            let outstanding = conn.held.len() + conn.writes.len();
            self.stats.max_outstanding = self.stats.max_outstanding.max(outstanding);
            return;
        }
        self.execute(conn, command, data);
    }

    fn respond(
        &mut self,
        conn: &mut TargetConn,
        itt: u32,
        status: u8,
        sense: Vec<u8>,
        residual: Residual,
    ) {
        let response = ScsiResponse {
            itt,
            response: 0,
            status,
            residual,
            sequence: TargetSequence::default(),
            exp_data_sn: 0,
            sense,
        };
        let data = response.data_segment();
        let response = ScsiResponse {
            sequence: self.status(conn),
            ..response
        };
        self.send(conn, &response.to_bhs(data.len() as u32), &data);
    }

    fn check_condition(&mut self, conn: &mut TargetConn, itt: u32, key: u8, asc: u8, ascq: u8) {
        self.respond(conn, itt, 0x02, fixed_sense(key, asc, ascq), Residual::None);
    }

    fn execute(&mut self, conn: &mut TargetConn, command: ScsiCommand, data: Vec<u8>) {
        let cdb = command.cdb;
        let itt = command.itt;
        let opcode = cdb[0];
        if self.faults.unit_attentions > 0 && opcode != 0x12 && opcode != 0xA0 {
            self.faults.unit_attentions -= 1;
            let (asc, ascq) = self.faults.ua_code;
            self.check_condition(conn, itt, 0x06, asc, ascq);
            return;
        }
        let block_len = self.config.block_len as usize;
        let lba = u64::from_be_bytes(cdb[2..10].try_into().unwrap());
        let count = u32::from_be_bytes(cdb[10..14].try_into().unwrap()) as usize;
        let expected = command.expected_data_transfer_length as usize;
        match opcode {
            // Write Exclusive - Registrants Only: writes, and SYNCHRONIZE CACHE like them (SBC-3),
            // of a nexus that is not registered conflict.
            0x8A | 0x91 if self.write_conflicts() => {
                self.respond(conn, itt, 0x18, Vec::new(), Residual::None);
            }
            0x00 | 0x91 => self.respond(conn, itt, 0, Vec::new(), Residual::None),
            0x12 => {
                let mut inquiry = vec![0u8; 36];
                inquiry[2] = 0x06;
                inquiry[3] = 0x02;
                inquiry[4] = 31;
                inquiry[8..16].copy_from_slice(b"FAKE    ");
                inquiry[16..32].copy_from_slice(b"MEMORY TARGET   ");
                inquiry[32..36].copy_from_slice(b"0001");
                self.data_in(conn, &command, &inquiry);
            }
            0x9E => {
                let mut capacity = vec![0u8; 32];
                capacity[..8].copy_from_slice(&(self.config.blocks - 1).to_be_bytes());
                capacity[8..12].copy_from_slice(&self.config.block_len.to_be_bytes());
                self.data_in(conn, &command, &capacity);
            }
            0xA0 => {
                let mut luns = vec![0u8; 8];
                luns[..4].copy_from_slice(&16u32.to_be_bytes());
                luns.extend_from_slice(&[0; 8]);
                luns.extend_from_slice(&Lun::single_level(1).unwrap().0);
                self.data_in(conn, &command, &luns);
            }
            0x88 => {
                let start = lba as usize * block_len;
                let end = start + count * block_len;
                if end > self.disk.len() || expected != count * block_len {
                    self.check_condition(conn, itt, 0x05, 0x21, 0x00);
                    return;
                }
                let bytes = self.disk[start..end].to_vec();
                self.data_in(conn, &command, &bytes);
            }
            0x8A | 0x5F => {
                let expected = command.expected_data_transfer_length;
                if opcode == 0x8A
                    && ((lba as usize + count) * block_len > self.disk.len()
                        || expected as usize != count * block_len)
                {
                    self.check_condition(conn, itt, 0x05, 0x21, 0x00);
                    return;
                }
                let mut write = WriteState {
                    cdb,
                    lun: command.lun,
                    lba,
                    expected,
                    buf: vec![0; expected as usize],
                    received: 0,
                    unsolicited_open: !command.final_,
                    unsolicited_data_sn: 0,
                    r2t: None,
                    next_r2t_offset: 0,
                };
                let n = data.len().min(expected as usize);
                write.buf[..n].copy_from_slice(&data[..n]);
                write.received = n as u32;
                write.next_r2t_offset = n as u32;
                if !command.final_ && conn.initial_r2t {
                    self.violation("unsolicited Data-Out with InitialR2T=Yes".to_string());
                }
                conn.writes.insert(itt, write);
                let outstanding = conn.held.len() + conn.writes.len();
                self.stats.max_outstanding = self.stats.max_outstanding.max(outstanding);
                self.advance_write(conn, itt);
            }
            0x5E => {
                let bytes = match cdb[1] & 0x1F {
                    0 => {
                        let mut out = vec![0u8; 8];
                        out[4..8].copy_from_slice(&((self.keys.len() * 8) as u32).to_be_bytes());
                        for (key, _) in &self.keys {
                            out.extend_from_slice(&key.to_be_bytes());
                        }
                        out
                    }
                    _ => {
                        let mut out = vec![0u8; 8];
                        if let Some((key, kind)) = self.reservation {
                            out[7] = 16;
                            out.extend_from_slice(&key.to_be_bytes());
                            out.extend_from_slice(&[0, 0, 0, 0, 0, kind, 0, 0]);
                        }
                        out
                    }
                };
                self.data_in(conn, &command, &bytes);
            }
            _ => self.check_condition(conn, itt, 0x05, 0x20, 0x00),
        }
    }

    /// After write data arrived: ask for more, or finish.
    fn advance_write(&mut self, conn: &mut TargetConn, itt: u32) {
        let Some(write) = conn.writes.get_mut(&itt) else {
            return;
        };
        if write.unsolicited_open || write.r2t.is_some() {
            return;
        }
        if write.received >= write.expected {
            let write = conn.writes.remove(&itt).unwrap();
            let status = if write.cdb[0] == 0x8A {
                let start = write.lba as usize * self.config.block_len as usize;
                self.disk[start..start + write.buf.len()].copy_from_slice(&write.buf);
                0
            } else {
                self.pr_out(write.cdb, &write.buf)
            };
            self.respond(conn, itt, status, Vec::new(), Residual::None);
            return;
        }
        let offset = write.next_r2t_offset;
        let len = (write.expected - offset).min(conn.max_burst);
        let ttt = conn.next_ttt;
        conn.next_ttt += 1;
        write.r2t = Some((ttt, offset, len, 0, 0));
        write.next_r2t_offset = offset + len;
        let lun = write.lun;
        let r2t = ReadyToTransfer {
            lun,
            itt,
            ttt,
            sequence: self.peek(conn),
            r2t_sn: 0,
            buffer_offset: offset,
            desired_length: len,
        };
        self.stats.r2ts += 1;
        self.send(conn, &r2t.to_bhs(), &[]);
    }

    /// PERSISTENT RESERVE OUT with the SPC-4 5.13 rules the cluster relies on; returns the
    /// status (GOOD, or 0x18 RESERVATION CONFLICT). The RESERVATION KEY must be the nexus'
    /// registered key (0 for REGISTER from an unregistered nexus; REGISTER AND IGNORE EXISTING
    /// KEY skips the check); RESERVE while another key holds it, and PREEMPT of a key nobody
    /// registered, conflict; RELEASE by a registrant that does not hold the reservation does
    /// nothing; the holder unregistering releases it.
    fn pr_out(&mut self, cdb: [u8; 16], params: &[u8]) -> u8 {
        const GOOD: u8 = 0;
        const CONFLICT: u8 = 0x18;
        let key = u64::from_be_bytes(params[0..8].try_into().unwrap());
        let sa_key = u64::from_be_bytes(params[8..16].try_into().unwrap());
        let kind = cdb[2] & 0x0F;
        let nexus = self.stats.connections;
        let registered = self
            .keys
            .iter()
            .find(|(_, owner)| *owner == nexus)
            .map(|(k, _)| *k);
        let action = cdb[1] & 0x1F;
        let key_ok = match action {
            6 => true,
            0 => key == registered.unwrap_or(0),
            _ => registered == Some(key),
        };
        if !key_ok {
            return CONFLICT;
        }
        match action {
            0 | 6 => {
                self.keys.retain(|(_, owner)| *owner != nexus);
                if sa_key != 0 {
                    self.keys.push((sa_key, nexus));
                }
                let holder_left = self.reservation.is_some_and(|(holder, _)| {
                    Some(holder) == registered && !self.keys.iter().any(|(k, _)| *k == holder)
                });
                if holder_left {
                    self.reservation = None;
                }
            }
            1 => match self.reservation {
                None => self.reservation = Some((key, kind)),
                Some((holder, _)) if holder == key => {}
                Some(_) => return CONFLICT,
            },
            2 => {
                if self.reservation.is_some_and(|(holder, _)| holder == key) {
                    self.reservation = None;
                }
            }
            3 => {
                self.keys.clear();
                self.reservation = None;
            }
            _ => {
                if !self.keys.iter().any(|(k, _)| *k == sa_key) {
                    return CONFLICT;
                }
                self.keys.retain(|(k, _)| *k != sa_key);
                if self.reservation.is_some_and(|(holder, _)| holder == sa_key) {
                    self.reservation = Some((key, kind));
                }
            }
        }
        GOOD
    }

    /// Write Exclusive - Registrants Only, with registrations bound to the connection.
    fn write_conflicts(&self) -> bool {
        let nexus = self.stats.connections;
        self.reservation.is_some() && !self.keys.iter().any(|(_, owner)| *owner == nexus)
    }

    fn data_out(&mut self, conn: &mut TargetConn, header: super::pdus::DataOut, data: Vec<u8>) {
        self.stats.data_out_pdus += 1;
        self.stats.largest_data_out = self.stats.largest_data_out.max(data.len());
        if self.count_pdu_for_drop(conn) {
            return;
        }
        if data.len() > self.config.max_recv_data_segment_length as usize {
            self.violation(format!("Data-Out of {} bytes", data.len()));
        }
        let Some(write) = conn.writes.get_mut(&header.itt) else {
            self.violation(format!("Data-Out for unknown ITT {:#x}", header.itt));
            return;
        };
        let offset = header.buffer_offset;
        let end = offset as usize + data.len();
        let mut problems = Vec::new();
        if end > write.buf.len() {
            problems.push(format!("Data-Out past the end: {offset}+{}", data.len()));
        } else {
            write.buf[offset as usize..end].copy_from_slice(&data);
            write.received += data.len() as u32;
        }
        if header.ttt == RESERVED_TAG {
            if !write.unsolicited_open {
                problems.push("unsolicited Data-Out not announced".to_string());
            }
            if header.data_sn != write.unsolicited_data_sn {
                problems.push(format!("unsolicited DataSN {}", header.data_sn));
            }
            write.unsolicited_data_sn += 1;
            self.stats.unsolicited_bytes += data.len() as u64;
            if end as u32 > conn.first_burst {
                problems.push("unsolicited data beyond FirstBurstLength".to_string());
            }
            if header.final_ {
                write.unsolicited_open = false;
                write.next_r2t_offset = write.next_r2t_offset.max(end as u32);
            }
        } else {
            match write.r2t.as_mut() {
                Some((ttt, r2t_offset, len, data_sn, got)) if *ttt == header.ttt => {
                    if header.data_sn != *data_sn {
                        problems.push(format!("DataSN {} expected {}", header.data_sn, data_sn));
                    }
                    if offset != *r2t_offset + *got {
                        problems.push(format!("Data-Out offset {offset} out of order"));
                    }
                    *data_sn += 1;
                    *got += data.len() as u32;
                    let done = *got >= *len;
                    if header.final_ != done {
                        problems.push("F bit does not end the R2T's sequence".to_string());
                    }
                    if header.final_ {
                        write.r2t = None;
                    }
                }
                _ => problems.push(format!("Data-Out with unknown TTT {:#x}", header.ttt)),
            }
        }
        for problem in problems {
            self.violation(problem);
        }
        self.advance_write(conn, header.itt);
    }

    fn data_in(&mut self, conn: &mut TargetConn, command: &ScsiCommand, bytes: &[u8]) {
        let expected = command.expected_data_transfer_length as usize;
        let n = bytes.len().min(expected);
        let residual = if bytes.len() < expected {
            Residual::Underflow((expected - bytes.len()) as u32)
        } else if bytes.len() > expected {
            Residual::Overflow((bytes.len() - expected) as u32)
        } else {
            Residual::None
        };
        let max = conn.initiator_mrdsl.max(512) as usize;
        let mut pieces: Vec<(usize, usize)> =
            (0..n).step_by(max).map(|o| (o, (o + max).min(n))).collect();
        if core::mem::take(&mut self.faults.data_in_out_of_range) {
            pieces.push((expected, expected + 512));
        }
        if pieces.is_empty() {
            self.respond(conn, command.itt, 0, Vec::new(), residual);
            return;
        }
        if core::mem::take(&mut self.faults.reverse_data_in) && pieces.len() > 1 {
            let last = pieces.pop().unwrap();
            pieces.reverse();
            pieces.push(last);
        }
        let with_status = self.config.status_in_data_in;
        let count = pieces.len();
        for (sn, (start, end)) in pieces.into_iter().enumerate() {
            let last = sn + 1 == count;
            let status = (last && with_status).then_some(0u8);
            let chunk: Vec<u8> = if end <= n {
                bytes[start..end].to_vec()
            } else {
                vec![0xEE; end - start]
            };
            let header = DataIn {
                final_: last,
                status,
                residual: if status.is_some() {
                    residual
                } else {
                    Residual::None
                },
                lun: command.lun,
                itt: command.itt,
                ttt: RESERVED_TAG,
                sequence: if status.is_some() {
                    self.status(conn)
                } else {
                    self.peek(conn)
                },
                data_sn: sn as u32,
                buffer_offset: start as u32,
            };
            self.send(conn, &header.to_bhs(chunk.len() as u32), &chunk);
        }
        if !with_status {
            self.respond(conn, command.itt, 0, Vec::new(), residual);
        }
    }

    fn nop_out(&mut self, conn: &mut TargetConn, nop: NopOut, data: Vec<u8>) {
        if !nop.immediate {
            self.check_window(conn, false, nop.cmd_sn);
        }
        if nop.ttt != RESERVED_TAG {
            if nop.ttt == 0x77 && data == b"ping" {
                self.stats.nop_answers_received += 1;
            } else {
                self.violation(format!("NOP-Out answer {nop:?} {data:?}"));
            }
            return;
        }
        if nop.itt == RESERVED_TAG {
            self.violation("NOP-Out with neither ITT nor TTT".to_string());
            return;
        }
        self.stats.nop_pings_answered += 1;
        let answer = NopIn {
            lun: nop.lun,
            itt: nop.itt,
            ttt: RESERVED_TAG,
            sequence: self.status(conn),
        };
        self.send(conn, &answer.to_bhs(data.len() as u32), &data);
    }

    fn text(&mut self, conn: &mut TargetConn, request: TextRequest, data: &[u8]) {
        self.check_window(conn, request.immediate, request.cmd_sn);
        self.stats.text_requests += 1;
        let mut bytes = if request.ttt == RESERVED_TAG {
            let keys = TextKeys::decode(data).unwrap_or_default();
            let mut answer = TextKeys::new();
            if keys.get("SendTargets") == Some("All") {
                answer.push("TargetName", &self.config.target_name);
                answer.push("TargetAddress", "127.0.0.1:3260,1");
                answer.push("TargetAddress", "[::1]:3260,1");
                answer.push("TargetName", "iqn.2026-01.test:other");
                answer.push("TargetAddress", "127.0.0.2,2");
            }
            answer.encode()
        } else {
            match conn.text_rest.take() {
                Some((ttt, rest)) if ttt == request.ttt => rest,
                _ => {
                    self.violation(format!("text continuation with TTT {:#x}", request.ttt));
                    Vec::new()
                }
            }
        };
        let split = self.config.text_split;
        let (final_, ttt) = if split > 0 && bytes.len() > split {
            let rest = bytes.split_off(split);
            let ttt = conn.next_ttt;
            conn.next_ttt += 1;
            conn.text_rest = Some((ttt, rest));
            (false, ttt)
        } else {
            (true, RESERVED_TAG)
        };
        let response = TextResponse {
            final_,
            continue_: !final_,
            itt: request.itt,
            ttt,
            sequence: self.status(conn),
        };
        self.send(conn, &response.to_bhs(bytes.len() as u32), &bytes);
    }
}
