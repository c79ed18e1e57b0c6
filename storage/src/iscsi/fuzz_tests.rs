//! Property tests with a seeded generator: random and mutated bytes, and every truncation of
//! valid PDUs, go through the stream decoder, the PDU parsers, the text and CHAP decoders, the
//! login and a live session. Nothing may panic; a prefix of a valid PDU must ask for more bytes,
//! never fail; and a session fed garbage must end the connection, not itself.

use alloc::vec;
use alloc::vec::Vec;

use super::chap;
use super::discovery;
use super::fake_target::{mem_pipe, MemPipe};
use super::login::{Login, LoginConfig};
use super::negotiate::{DigestPolicy, NegotiationConfig, SessionType};
use super::pdus::{
    AsyncEvent, AsyncMessage, DataIn, DataOut, InitiatorPdu, Isid, LoginResponse, LogoutResponse,
    NopIn, Pdu, ReadyToTransfer, Reject, RejectReason, Residual, ScsiCommand, ScsiResponse, Stage,
    TargetPdu, TargetSequence, TaskAttribute, TextResponse, RESERVED_TAG,
};
use super::session::{Session, SessionConfig, SessionState};
use super::stream::{encode_pdu, Digests, PduDecoder};
use super::text::{TextAssembler, TextKeys};
use crate::pdu::{Bhs, Lun};
use crate::scsi::Command;
use transport::Pipe;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn sequence() -> TargetSequence {
    TargetSequence {
        stat_sn: 5,
        exp_cmd_sn: 9,
        max_cmd_sn: 40,
    }
}

/// One valid PDU of every type, with data where the type has some.
fn corpus() -> Vec<(Bhs, Vec<u8>)> {
    let lun = Lun::single_level(1).unwrap();
    let mut keys = TextKeys::new();
    keys.push("TargetName", "iqn.2026-01.test:disk");
    keys.push("TargetAddress", "127.0.0.1:3260,1");
    let text = keys.encode();
    let response = ScsiResponse {
        itt: 3,
        response: 0,
        status: 2,
        residual: Residual::Underflow(4),
        sequence: sequence(),
        exp_data_sn: 1,
        sense: vec![0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2a, 4, 0, 0, 0, 0],
    };
    let message = AsyncMessage {
        lun,
        sequence: sequence(),
        event: AsyncEvent::ScsiEvent,
        vcode: 0,
        parameters: [1, 2, 3],
        sense: vec![0x70, 0, 6],
    };
    let command = ScsiCommand {
        immediate: false,
        final_: true,
        read: false,
        write: true,
        attribute: TaskAttribute::Simple,
        lun,
        itt: 4,
        expected_data_transfer_length: 512,
        cmd_sn: 9,
        exp_stat_sn: 5,
        cdb: [0x8a; 16],
    };
    let reject = Reject {
        reason: RejectReason::ProtocolError,
        sequence: sequence(),
        data_sn: 0,
        rejected: command.to_bhs(0).to_bytes().unwrap(),
    };
    vec![
        (
            NopIn {
                lun,
                itt: RESERVED_TAG,
                ttt: 7,
                sequence: sequence(),
            }
            .to_bhs(5),
            b"hello".to_vec(),
        ),
        (
            response.to_bhs(response.data_segment().len() as u32),
            response.data_segment(),
        ),
        (
            DataIn {
                final_: true,
                status: Some(0),
                residual: Residual::None,
                lun,
                itt: 3,
                ttt: RESERVED_TAG,
                sequence: sequence(),
                data_sn: 0,
                buffer_offset: 0,
            }
            .to_bhs(13),
            vec![0xAB; 13],
        ),
        (
            ReadyToTransfer {
                lun,
                itt: 4,
                ttt: 8,
                sequence: sequence(),
                r2t_sn: 0,
                buffer_offset: 0,
                desired_length: 512,
            }
            .to_bhs(),
            Vec::new(),
        ),
        (
            LoginResponse {
                transit: true,
                continue_: false,
                csg: Stage::Operational,
                nsg: Stage::FullFeature,
                version_max: 0,
                version_active: 0,
                isid: Isid::random_type(1, 2),
                tsih: 9,
                itt: 0,
                sequence: sequence(),
                status_class: 0,
                status_detail: 0,
            }
            .to_bhs(text.len() as u32),
            text.clone(),
        ),
        (
            TextResponse {
                final_: true,
                continue_: false,
                itt: 1,
                ttt: RESERVED_TAG,
                sequence: sequence(),
            }
            .to_bhs(text.len() as u32),
            text,
        ),
        (
            LogoutResponse {
                response: 0,
                itt: 2,
                sequence: sequence(),
                time2wait: 0,
                time2retain: 0,
            }
            .to_bhs(),
            Vec::new(),
        ),
        (reject.to_bhs(), reject.rejected.to_vec()),
        (
            message.to_bhs(message.data_segment().len() as u32),
            message.data_segment(),
        ),
        (command.to_bhs(512), vec![0x5A; 512]),
        (
            DataOut {
                final_: true,
                lun,
                itt: 4,
                ttt: 8,
                exp_stat_sn: 5,
                data_sn: 0,
                buffer_offset: 0,
            }
            .to_bhs(7),
            vec![1; 7],
        ),
    ]
}

fn drain(decoder: &mut PduDecoder) -> usize {
    let mut parsed = 0;
    // Each PDU is at least 48 bytes, so this bounds the loop by the input.
    for _ in 0..10_000 {
        match decoder.next_pdu() {
            Ok(Some(pdu)) => {
                let _ = TargetPdu::parse(pdu.clone());
                let _ = InitiatorPdu::parse(pdu);
                parsed += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    parsed
}

#[test]
fn random_and_mutated_streams_never_panic_the_decoder_or_the_parsers() {
    let mut rng = Rng(0x5EED_0001);
    let corpus = corpus();
    let mut executions = 0u64;
    let mut parsed = 0usize;
    for round in 0..20_000 {
        let digests = Digests::ALL[round % Digests::ALL.len()];
        let mut input = Vec::new();
        if round % 3 == 0 {
            let len = rng.below(400);
            input = rng.bytes(len);
        } else {
            // Valid PDUs with a few bytes changed, so the decoder gets past the header.
            for _ in 0..1 + rng.below(3) {
                let (bhs, data) = &corpus[rng.below(corpus.len())];
                encode_pdu(bhs, &[], data, digests, &mut input).unwrap();
            }
            for _ in 0..rng.below(4) {
                let at = rng.below(input.len());
                input[at] = rng.next() as u8;
            }
        }
        let mut decoder = PduDecoder::new([512, 8192, 1 << 24][rng.below(3)]);
        decoder.set_digests(digests);
        let mut at = 0;
        while at < input.len() {
            let n = 1 + rng.below(64);
            decoder.push(&input[at..(at + n).min(input.len())]);
            at += n;
            parsed += drain(&mut decoder);
        }
        executions += 1;
    }
    std::println!("decoder: {executions} random or mutated streams, {parsed} PDUs parsed");
    assert!(parsed > 1_000, "mutations left most PDUs valid");
}

#[test]
fn every_truncation_of_a_valid_pdu_asks_for_more() {
    let mut executions = 0u64;
    for digests in Digests::ALL {
        for (bhs, data) in corpus() {
            let mut wire = Vec::new();
            encode_pdu(&bhs, &[], &data, digests, &mut wire).unwrap();
            for cut in 0..wire.len() {
                let mut decoder = PduDecoder::new(8192);
                decoder.set_digests(digests);
                decoder.push(&wire[..cut]);
                assert_eq!(
                    decoder.next_pdu(),
                    Ok(None),
                    "{:?} cut at {cut}",
                    bhs.opcode
                );
                decoder.push(&wire[cut..]);
                let pdu = decoder.next_pdu().unwrap().unwrap();
                assert_eq!(pdu.data, data);
                executions += 1;
            }
            // Typed parsing of the whole accepts it in the right direction.
            let pdu = Pdu::new(bhs, data.clone());
            assert!(
                TargetPdu::parse(pdu.clone()).is_ok() || InitiatorPdu::parse(pdu).is_ok(),
                "{:?}",
                bhs.opcode
            );
        }
    }
    std::println!("truncation: {executions} prefixes of valid PDUs");
}

#[test]
fn text_chap_and_address_decoders_take_any_input() {
    let mut rng = Rng(0x5EED_0002);
    let alphabet = b"=\0aZ09.-+@_:x,[]0b0x";
    let mut executions = 0u64;
    for _ in 0..50_000 {
        let len = rng.below(80);
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.below(4) == 0 {
                    rng.next() as u8
                } else {
                    alphabet[rng.below(alphabet.len())]
                }
            })
            .collect();
        if let Ok(keys) = TextKeys::decode(&bytes) {
            assert_eq!(TextKeys::decode(&keys.encode()), Ok(keys.clone()));
            let _ = discovery::parse_send_targets(&keys);
        }
        let mut assembler = TextAssembler::new();
        let cut = rng.below(bytes.len() + 1);
        let _ = assembler.push(&bytes[..cut]);
        let _ = assembler.push(&bytes[cut..]);
        let _ = assembler.finish();
        if let Ok(text) = core::str::from_utf8(&bytes) {
            let _ = chap::decode_binary(text);
            let _ = chap::parse_identifier(text);
            let _ = discovery::parse_target_address(text);
        }
        executions += 1;
    }
    std::println!("text/CHAP/address: {executions} inputs");
}

#[test]
fn random_login_responses_never_panic_the_login() {
    let mut rng = Rng(0x5EED_0003);
    let config = LoginConfig {
        initiator_name: "iqn.2026-01.test:node1".into(),
        target_name: Some("iqn.2026-01.test:disk".into()),
        session_type: SessionType::Normal,
        isid: Isid::random_type(1, 1),
        chap: Some(chap::ChapConfig {
            initiator: chap::ChapCredentials {
                name: "n".into(),
                secret: b"s".to_vec(),
            },
            target: Some(chap::ChapCredentials {
                name: "t".into(),
                secret: b"u".to_vec(),
            }),
        }),
        negotiation: NegotiationConfig {
            header_digest: DigestPolicy::PreferCrc32c,
            ..NegotiationConfig::default()
        },
    };
    let keys = [
        "AuthMethod=CHAP",
        "AuthMethod=None",
        "CHAP_A=5",
        "CHAP_I=3",
        "CHAP_C=0x0102",
        "CHAP_N=t",
        "CHAP_R=0x00",
        "HeaderDigest=CRC32C",
        "MaxBurstLength=512",
        "MaxRecvDataSegmentLength=100",
        "X-y=z",
        "TargetAddress=1.2.3.4",
    ];
    let mut executions = 0u64;
    for _ in 0..3_000 {
        let mut login = Login::new(config.clone(), 0, 0, 1, rng.next());
        login.start();
        for _ in 0..8 {
            let mut header = LoginResponse::from_bhs(
                &Bhs::decode(&rng.bytes(48)).unwrap_or(Bhs::new(crate::pdu::Opcode::LoginResponse)),
            );
            header.itt = if rng.below(8) == 0 { 1 } else { 0 };
            header.status_class = [0, 0, 0, 1, 2, 3][rng.below(6)];
            header.version_active = if rng.below(10) == 0 { 1 } else { 0 };
            let mut text = Vec::new();
            for _ in 0..rng.below(5) {
                text.extend_from_slice(keys[rng.below(keys.len())].as_bytes());
                text.push(0);
            }
            if rng.below(6) == 0 {
                let len = rng.below(30);
                text = rng.bytes(len);
            }
            executions += 1;
            if login.on_response(&header, &text).is_err() {
                break;
            }
        }
    }
    std::println!("login: {executions} random responses");
}

/// A session, logged in or logging in, fed random and mutated target PDUs.
#[test]
fn random_target_pdus_never_panic_a_session() {
    let mut rng = Rng(0x5EED_0004);
    let corpus = corpus();
    let mut executions = 0u64;
    let mut losses = 0u64;
    for round in 0..1_000 {
        let mut config = SessionConfig::normal("i", "t", Isid::random_type(1, 1));
        config.retry.max_failed_logins = 1_000;
        let mut session = Session::new(config);
        let mut dead = MemPipe::dead();
        let mut target_end: Option<MemPipe> = None;
        let mut pipe: Option<MemPipe> = None;
        // Every other round starts from a logged-in session: the fake login answer below.
        let logged_in = round % 2 == 0;
        for step in 0..60u64 {
            let now = step * 50;
            if session.needs_connection(now) {
                let (initiator, target) = mem_pipe();
                pipe = Some(initiator);
                target_end = Some(target);
                session.connection_opened(now);
                if logged_in {
                    let (bhs, data) = &corpus[4];
                    let mut bytes = Vec::new();
                    encode_pdu(bhs, &[], data, Digests::NONE, &mut bytes).unwrap();
                    // The login request's ITT is 0, as in the corpus response.
                    let _ = target_end.as_mut().unwrap().send(&bytes);
                }
            }
            if step % 7 == 0 {
                let _ = session.submit(
                    Lun::single_level(1).unwrap(),
                    &Command::read16(step, 1, 512),
                    Vec::new(),
                    now,
                );
                let _ = session.submit(
                    Lun::single_level(1).unwrap(),
                    &Command::write16(step, 1, 512),
                    vec![0; 512],
                    now,
                );
            }
            if let Some(target) = target_end.as_mut() {
                let mut bytes = Vec::new();
                if rng.below(3) == 0 {
                    let len = rng.below(120);
                    bytes = rng.bytes(len);
                } else {
                    let (bhs, data) = &corpus[rng.below(corpus.len())];
                    let mut bhs = *bhs;
                    // Point tasks at what the session likely issued.
                    bhs.initiator_task_tag = rng.below(6) as u32;
                    encode_pdu(&bhs, &[], data, Digests::NONE, &mut bytes).unwrap();
                    for _ in 0..rng.below(3) {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.next() as u8;
                    }
                }
                let _ = target.send(&bytes);
                let mut sink = [0u8; 4096];
                while matches!(target.recv(&mut sink), Ok(n) if n > 0) {}
            }
            let events = session.poll(pipe.as_mut().unwrap_or(&mut dead), now);
            for event in events {
                if let super::session::SessionEvent::ConnectionLost(_) = event {
                    losses += 1;
                    if let Some(p) = pipe.take() {
                        p.close();
                    }
                    target_end = None;
                }
            }
            executions += 1;
        }
        assert_ne!(session.state(), SessionState::Closed);
    }
    std::println!("session: {executions} polls with random PDUs, {losses} connections ended");
    assert!(losses > 1_000);
}
