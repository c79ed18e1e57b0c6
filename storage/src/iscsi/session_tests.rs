//! The session against the in-memory target: login and negotiation (CHAP, digests,
//! refusals), write splitting, read reassembly, the command window, NOP, timeouts, reconnection
//! with re-issue, UNIT ATTENTION retry, rejects, asynchronous messages, logout, discovery and
//! the disk layer. Time is simulated: each step is one millisecond.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use super::chap::{ChapConfig, ChapCredentials};
use super::discovery;
use super::disk::{Disk, DiskError, DiskEvent, DiskReply, RegistrationEvent};
use super::fake_target::{mem_pipe, test_session_config, FakeTarget, MemPipe, TargetConfig};
use super::login::{LoginError, LoginStatus};
use super::negotiate::DigestPolicy;
use super::pdus::{Isid, RejectReason, Residual};
use super::session::{
    ConnectionError, ProtocolError, Session, SessionConfig, SessionEvent, SessionState, SubmitError,
};
use super::stream::StreamError;
use super::task::{TaskError, TaskId, TaskReply};
use crate::pdu::Lun;
use crate::scsi::{Command, CommandError, ReservationKey, SenseKey, Status};

const INITIATOR: &str = "iqn.2026-01.test:node1";
const TARGET: &str = "iqn.2026-01.test:disk";

fn lun1() -> Lun {
    Lun::single_level(1).unwrap()
}

fn config() -> SessionConfig {
    test_session_config(INITIATOR)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// The session and the target, connected by in-memory pipes opened on demand.
struct Harness {
    session: Session,
    target: FakeTarget,
    pipe: Option<MemPipe>,
    dead: MemPipe,
    now: u64,
    events: Vec<SessionEvent>,
    connections: u32,
}

impl Harness {
    fn new(config: SessionConfig, target: TargetConfig) -> Self {
        Self {
            session: Session::new(config),
            target: FakeTarget::new(target),
            pipe: None,
            dead: MemPipe::dead(),
            now: 0,
            events: Vec::new(),
            connections: 0,
        }
    }

    fn step(&mut self) {
        if self.session.needs_connection(self.now) {
            let (initiator, target) = mem_pipe();
            self.target.accept(target);
            self.pipe = Some(initiator);
            self.connections += 1;
            assert!(self.session.connection_opened(self.now));
        }
        let pipe = self.pipe.as_mut().unwrap_or(&mut self.dead);
        let events = self.session.poll(pipe, self.now);
        for event in &events {
            if matches!(
                event,
                SessionEvent::ConnectionLost(_) | SessionEvent::LoggedOut { .. }
            ) {
                if let Some(pipe) = self.pipe.take() {
                    pipe.close();
                }
            }
        }
        self.events.extend(events);
        self.target.poll();
        self.now += 1;
    }

    fn run_until(&mut self, max_steps: u32, done: impl Fn(&Harness) -> bool) -> bool {
        for _ in 0..max_steps {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }

    fn logged_in(&mut self) {
        assert!(
            self.run_until(1_000, |h| h.session.state() == SessionState::FullFeature),
            "no login: {:?}",
            self.events
        );
    }

    fn completion(&self, id: TaskId) -> Option<&Result<TaskReply, TaskError>> {
        self.events.iter().find_map(|event| match event {
            SessionEvent::Completed(c) if c.task == id => Some(&c.result),
            _ => None,
        })
    }

    fn wait(&mut self, id: TaskId) -> Result<TaskReply, TaskError> {
        assert!(
            self.run_until(60_000, |h| h.completion(id).is_some()),
            "{id} never completed; events {:?}",
            self.events
        );
        self.completion(id).unwrap().clone()
    }

    fn scsi(&mut self, id: TaskId) -> super::task::ScsiReply {
        match self.wait(id) {
            Ok(TaskReply::Scsi(reply)) => reply,
            other => panic!("{id}: {other:?}"),
        }
    }

    fn write(&mut self, lba: u64, data: Vec<u8>) -> TaskId {
        let blocks = (data.len() / 512) as u32;
        self.session
            .submit(lun1(), &Command::write16(lba, blocks, 512), data, self.now)
            .unwrap()
    }

    fn read(&mut self, lba: u64, blocks: u32) -> TaskId {
        self.session
            .submit(
                lun1(),
                &Command::read16(lba, blocks, 512),
                Vec::new(),
                self.now,
            )
            .unwrap()
    }

    fn lost(&self) -> Vec<ConnectionError> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::ConnectionLost(error) => Some(error.clone()),
                _ => None,
            })
            .collect()
    }

    fn no_violations(&self) {
        assert!(
            self.target.stats.violations.is_empty(),
            "{:?}",
            self.target.stats.violations
        );
    }
}

#[test]
fn login_then_write_and_read_back() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    assert!(matches!(
        h.events[0],
        SessionEvent::LoggedIn {
            reconnected: false,
            ..
        }
    ));
    let params = h.session.params().unwrap().clone();
    assert!(!params.header_digest, "we offered None");
    assert_eq!(params.max_xmit_data_segment_length, 8192);
    assert_eq!(params.target_portal_group_tag, Some(1));
    assert_eq!(h.target.stats.last_isid, Isid::random_type(0x1234, 1).0);

    let data = pattern(3 * 512, 1);
    let write = h.write(10, data.clone());
    let reply = h.scsi(write);
    assert_eq!(reply.status, Status::Good);
    assert_eq!(reply.error(), None);
    assert_eq!(&h.target.disk[10 * 512..13 * 512], &data[..]);

    let read = h.read(10, 3);
    assert_eq!(h.scsi(read).data, data);
    h.no_violations();
}

#[test]
fn crc32c_digests_are_negotiated_used_and_checked() {
    let mut config = config();
    config.login.negotiation.header_digest = DigestPolicy::PreferCrc32c;
    config.login.negotiation.data_digest = DigestPolicy::RequireCrc32c;
    let mut h = Harness::new(config, TargetConfig::default());
    h.logged_in();
    let params = h.session.params().unwrap();
    assert!(params.header_digest && params.data_digest);
    let data = pattern(20 * 512, 7);
    let write = h.write(0, data.clone());
    h.scsi(write);
    let read = h.read(0, 20);
    assert_eq!(h.scsi(read).data, data);
    h.no_violations();

    // A damaged data digest ends the connection; the read is issued again and succeeds.
    h.target.faults.corrupt_next_data_digest = true;
    let read = h.read(0, 20);
    assert_eq!(h.scsi(read).data, data);
    assert!(matches!(
        h.lost()[..],
        [ConnectionError::Stream(StreamError::DataDigest { .. })]
    ));
    assert_eq!(h.connections, 2);
    assert_eq!(h.session.stats().commands_reissued, 1);
}

#[test]
fn required_digest_refused_by_target_fails_for_good() {
    let mut config = config();
    config.login.negotiation.header_digest = DigestPolicy::RequireCrc32c;
    let target = TargetConfig {
        header_digest: false,
        ..TargetConfig::default()
    };
    let mut h = Harness::new(config, target);
    let read = h.read(0, 1);
    assert!(h.run_until(1_000, |h| h.session.state() == SessionState::Failed));
    assert!(matches!(
        h.completion(read),
        Some(Err(TaskError::SessionFailed(LoginError::Negotiation(_))))
    ));
    assert_eq!(
        h.session.submit_text(Default::default(), 0),
        Err(SubmitError::Closed)
    );
}

fn chap_config(secret: &[u8], mutual: Option<&[u8]>) -> SessionConfig {
    let mut config = config();
    config.login.chap = Some(ChapConfig {
        initiator: ChapCredentials {
            name: "node1".to_string(),
            secret: secret.to_vec(),
        },
        target: mutual.map(|secret| ChapCredentials {
            name: "disk".to_string(),
            secret: secret.to_vec(),
        }),
    });
    config.entropy = 0xDEAD_BEEF;
    config
}

fn chap_target() -> TargetConfig {
    TargetConfig {
        chap: Some(("node1".to_string(), b"initiatorsecret".to_vec())),
        mutual: Some(("disk".to_string(), b"targetsecret12".to_vec())),
        ..TargetConfig::default()
    }
}

#[test]
fn chap_login_one_way_and_mutual() {
    let mut h = Harness::new(chap_config(b"initiatorsecret", None), chap_target());
    h.logged_in();
    let mut h = Harness::new(
        chap_config(b"initiatorsecret", Some(b"targetsecret12")),
        chap_target(),
    );
    h.logged_in();
    h.no_violations();
}

#[test]
fn chap_failures_are_permanent() {
    // Wrong secret: the target refuses with 02/01.
    let mut h = Harness::new(chap_config(b"wrongsecret!!", None), chap_target());
    let task = h.read(0, 1);
    assert!(h.run_until(1_000, |h| h.session.state() == SessionState::Failed));
    assert_eq!(
        h.session.failure(),
        Some(&LoginError::Refused(LoginStatus::AuthenticationFailed))
    );
    assert!(matches!(
        h.completion(task),
        Some(Err(TaskError::SessionFailed(_)))
    ));
    assert_eq!(h.connections, 1, "no retry of a refused login");

    // The target does not know the mutual secret we expect.
    let mut h = Harness::new(
        chap_config(b"initiatorsecret", Some(b"anothersecret1")),
        chap_target(),
    );
    assert!(h.run_until(1_000, |h| h.session.state() == SessionState::Failed));
    assert!(matches!(h.session.failure(), Some(LoginError::Chap(_))));

    // No credentials for a target that wants CHAP.
    let mut h = Harness::new(config(), chap_target());
    assert!(h.run_until(1_000, |h| h.session.state() == SessionState::Failed));
}

#[test]
fn refused_and_redirected_logins() {
    let target = TargetConfig {
        refuse_login: Some((2, 3)),
        ..TargetConfig::default()
    };
    let mut h = Harness::new(config(), target);
    assert!(h.run_until(1_000, |h| h.session.state() == SessionState::Failed));
    assert_eq!(
        h.session.failure(),
        Some(&LoginError::Refused(LoginStatus::TargetNotFound))
    );

    // Service unavailable is worth retrying, with backoff.
    let target = TargetConfig {
        refuse_login: Some((3, 1)),
        ..TargetConfig::default()
    };
    let mut h = Harness::new(config(), target);
    let task = h.read(0, 1);
    h.run_until(2_000, |h| h.completion(task).is_some());
    assert!(matches!(
        h.completion(task),
        Some(Err(TaskError::ConnectionUnavailable(
            ConnectionError::Login(LoginError::Refused(LoginStatus::ServiceUnavailable))
        )))
    ));
    assert_eq!(h.connections, 6, "max_failed_logins attempts");
    assert_eq!(
        h.session.state(),
        SessionState::Disconnected,
        "still trying"
    );

    let target = TargetConfig {
        redirect: Some("127.0.0.9:3261,1".to_string()),
        ..TargetConfig::default()
    };
    let mut h = Harness::new(config(), target);
    h.run_until(10, |h| !h.lost().is_empty());
    assert_eq!(h.session.redirect_address(), Some("127.0.0.9:3261,1"));
    assert!(
        h.session.needs_connection(h.now),
        "redirects are followed at once"
    );
}

#[test]
fn split_login_and_text_responses_are_joined() {
    let target = TargetConfig {
        login_split: 20,
        text_split: 30,
        ..TargetConfig::default()
    };
    let mut config = SessionConfig::discovery(INITIATOR, Isid::random_type(9, 9));
    config.timeouts = self::config().timeouts;
    let mut h = Harness::new(config, target);
    h.logged_in();
    let task = h
        .session
        .submit_text(discovery::send_targets_request(), h.now)
        .unwrap();
    let Ok(TaskReply::Text(keys)) = h.wait(task) else {
        panic!("no text reply");
    };
    let targets = discovery::parse_send_targets(&keys).unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0].name, TARGET);
    assert_eq!(targets[0].portals.len(), 2);
    assert_eq!(targets[1].portals[0].host, "127.0.0.2");
    assert!(
        h.target.stats.text_requests > 3,
        "continued over several PDUs"
    );
    assert_eq!(
        h.session
            .submit(lun1(), &Command::test_unit_ready(), Vec::new(), 0),
        Err(SubmitError::DiscoverySession)
    );
    h.no_violations();
}

#[test]
fn writes_split_by_first_burst_max_burst_and_segment_length() {
    let target = TargetConfig {
        max_recv_data_segment_length: 8192,
        first_burst_length: 16_384,
        max_burst_length: 32_768,
        initial_r2t: false,
        ..TargetConfig::default()
    };
    let mut config = config();
    config.login.negotiation.max_recv_data_segment_length = 4096;
    let mut h = Harness::new(config, target);
    h.logged_in();
    let params = h.session.params().unwrap().clone();
    assert!(!params.initial_r2t && params.immediate_data);
    assert_eq!(
        (params.first_burst_length, params.max_burst_length),
        (16_384, 32_768)
    );

    // 100 KiB + 512: immediate 8 KiB, unsolicited to 16 KiB, then R2Ts of 32 KiB.
    let len = 100 * 1024 + 512;
    let data = pattern(len, 3);
    let write = h.write(100, data.clone());
    h.scsi(write);
    let stats = &h.target.stats;
    assert_eq!(stats.immediate_bytes, 8192);
    assert_eq!(stats.unsolicited_bytes, 8192);
    assert_eq!(stats.r2ts, (len as u32 - 16_384).div_ceil(32_768));
    assert!(stats.largest_data_out <= 8192);
    assert_eq!(&h.target.disk[100 * 512..100 * 512 + len], &data[..]);
    let read = h.read(100, (len / 512) as u32);
    assert_eq!(
        h.scsi(read).data,
        data,
        "Data-In of 4 KiB pieces reassembled"
    );
    h.no_violations();

    // A write smaller than the immediate limit is one PDU.
    let before = h.target.stats.data_out_pdus;
    let write = h.write(0, pattern(1024, 9));
    h.scsi(write);
    assert_eq!(h.target.stats.data_out_pdus, before);
}

#[test]
fn writes_without_immediate_data_wait_for_r2ts() {
    let target = TargetConfig {
        immediate_data: false,
        initial_r2t: true,
        max_burst_length: 16_384,
        ..TargetConfig::default()
    };
    let mut h = Harness::new(config(), target);
    h.logged_in();
    let data = pattern(40 * 1024, 5);
    let write = h.write(8, data.clone());
    h.scsi(write);
    assert_eq!(h.target.stats.immediate_bytes, 0);
    assert_eq!(h.target.stats.unsolicited_bytes, 0);
    assert_eq!(h.target.stats.r2ts, 3);
    assert_eq!(&h.target.disk[8 * 512..8 * 512 + data.len()], &data[..]);
    h.no_violations();
}

#[test]
fn data_in_is_placed_by_offset_and_status_may_ride_the_last_data_in() {
    let target = TargetConfig {
        status_in_data_in: true,
        ..TargetConfig::default()
    };
    let mut config = config();
    config.login.negotiation.max_recv_data_segment_length = 1024;
    let mut h = Harness::new(config, target);
    h.logged_in();
    let data = pattern(16 * 512, 11);
    h.target.disk[..data.len()].copy_from_slice(&data);
    h.target.faults.reverse_data_in = true;
    let read = h.read(0, 16);
    let reply = h.scsi(read);
    assert_eq!(reply.data, data);
    assert_eq!(reply.residual, Residual::None);

    // INQUIRY for 255 bytes of which the target has 36: an underflow.
    let inquiry = h
        .session
        .submit(lun1(), &Command::inquiry(255), Vec::new(), h.now)
        .unwrap();
    let reply = h.scsi(inquiry);
    assert_eq!(reply.residual, Residual::Underflow(219));
    assert_eq!(reply.data.len(), 36);
    assert_eq!(&reply.data[8..12], b"FAKE");
}

#[test]
fn out_of_range_data_in_ends_the_connection_and_the_read_is_retried() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    h.target.faults.data_in_out_of_range = true;
    let read = h.read(0, 2);
    assert_eq!(h.scsi(read).data.len(), 1024);
    assert!(matches!(
        h.lost()[..],
        [ConnectionError::Protocol(ProtocolError::DataInOutOfRange {
            offset: 1024,
            expected: 1024,
            ..
        })]
    ));
}

#[test]
fn the_command_window_bounds_outstanding_commands() {
    let target = TargetConfig {
        window: 3,
        ..TargetConfig::default()
    };
    let mut h = Harness::new(config(), target);
    h.logged_in();
    h.target.faults.hold_commands = true;
    let reads: Vec<TaskId> = (0..8).map(|i| h.read(i, 1)).collect();
    h.run_until(50, |_| false);
    assert_eq!(
        h.target.held_commands(),
        3,
        "only the window's worth issued"
    );
    h.target.faults.hold_commands = false;
    for read in reads {
        h.scsi(read);
    }
    assert_eq!(h.target.stats.commands.len(), 8);
    assert_eq!(
        h.target.stats.max_outstanding, 3,
        "several outstanding at once"
    );
    h.no_violations();
}

#[test]
fn nop_pings_both_ways() {
    let mut config = config();
    config.timeouts.nop_interval_ms = 100;
    config.timeouts.nop_timeout_ms = 50;
    let mut h = Harness::new(config, TargetConfig::default());
    h.logged_in();
    // The target's ping is answered with its TTT and data.
    h.target.faults.nop_in_ping = true;
    h.run_until(10, |_| false);
    assert_eq!(h.target.stats.nop_answers_received, 1);
    // Our pings keep an idle connection checked; answered pings lose nothing.
    h.run_until(1_000, |_| false);
    assert!(h.target.stats.nop_pings_answered >= 8);
    assert!(h.lost().is_empty());
    // A target that stops answering is declared dead, and we reconnect.
    h.target.faults.mute = true;
    assert!(h.run_until(300, |h| !h.lost().is_empty()));
    assert_eq!(h.lost(), [ConnectionError::NopTimeout]);
    h.target.faults.mute = false;
    h.logged_in();
    h.no_violations();
}

#[test]
fn a_command_timeout_reconnects_and_reissues() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    h.target.faults.hold_commands = true;
    let data = pattern(4 * 512, 21);
    let write = h.write(40, data.clone());
    h.run_until(2_100, |h| !h.lost().is_empty());
    assert_eq!(h.lost(), [ConnectionError::CommandTimeout { task: write }]);
    h.target.faults.hold_commands = false;
    h.scsi(write);
    assert_eq!(&h.target.disk[40 * 512..44 * 512], &data[..]);
    assert!(h.events.iter().any(|e| matches!(
        e,
        SessionEvent::LoggedIn {
            reconnected: true,
            ..
        }
    )));
}

#[test]
fn retries_and_deadlines_are_bounded() {
    // A target that never answers: the command rides max_attempts connections, then fails.
    let mut config = config();
    config.timeouts.command_ms = 100;
    config.retry.max_attempts = 3;
    let mut h = Harness::new(config.clone(), TargetConfig::default());
    h.logged_in();
    h.target.faults.hold_commands = true;
    let read = h.read(0, 1);
    assert!(matches!(
        h.wait(read),
        Err(TaskError::RetriesExhausted(
            ConnectionError::CommandTimeout { .. }
        ))
    ));
    assert_eq!(h.lost().len(), 3);

    // A target that is silent during login: login timeouts, then the deadline.
    config.retry.command_deadline_ms = 2_500;
    config.retry.max_failed_logins = 100;
    let mut h = Harness::new(config.clone(), TargetConfig::default());
    h.target.faults.mute = true;
    let read = h.read(0, 1);
    assert_eq!(h.wait(read), Err(TaskError::DeadlineExceeded));
    assert!(h.lost().iter().all(|e| *e == ConnectionError::LoginTimeout));
    assert!(h.now <= 2_600);

    // A closed window is a wait with a deadline too.
    let target = TargetConfig {
        window: 1,
        ..TargetConfig::default()
    };
    config.timeouts.command_ms = 100_000;
    let mut h = Harness::new(config, target);
    h.logged_in();
    h.target.faults.hold_commands = true;
    let first = h.read(0, 1);
    h.run_until(1_000, |_| false);
    let second = h.read(1, 1);
    h.run_until(100, |_| false);
    assert_eq!(
        h.target.held_commands(),
        1,
        "the second waits outside the window"
    );
    assert_eq!(h.wait(first), Err(TaskError::DeadlineExceeded));
    assert_eq!(h.wait(second), Err(TaskError::DeadlineExceeded));
}

#[test]
fn a_dropped_connection_mid_write_is_recovered_with_data_intact() {
    let target = TargetConfig {
        max_burst_length: 8192,
        ..TargetConfig::default()
    };
    let mut h = Harness::new(config(), target);
    h.logged_in();
    let first = pattern(64 * 1024, 1);
    let second = pattern(16 * 512, 2);
    // The connection drops after the command and two Data-Outs of the first write.
    h.target.faults.drop_after_pdus = Some(3);
    let a = h.write(0, first.clone());
    let b = h.write(200, second.clone());
    h.scsi(a);
    h.scsi(b);
    assert_eq!(
        h.lost(),
        [ConnectionError::Pipe(transport::PipeError::Closed)]
    );
    assert_eq!(&h.target.disk[..first.len()], &first[..]);
    assert_eq!(&h.target.disk[200 * 512..216 * 512], &second[..]);
    let read = h.read(0, 128);
    assert_eq!(h.scsi(read).data, first);
    assert_eq!(h.connections, 2);
    assert_eq!(h.target.stats.logins, 2);
    h.no_violations();
}

#[test]
fn unit_attentions_are_retried_and_reported() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    h.target.faults.unit_attentions = 2;
    h.target.faults.ua_code = (0x2A, 0x04);
    let tur = h
        .session
        .submit(lun1(), &Command::test_unit_ready(), Vec::new(), h.now)
        .unwrap();
    let reply = h.scsi(tur);
    assert_eq!(reply.status, Status::Good);
    assert_eq!(reply.unit_attentions_retried, 2);
    let attentions: Vec<_> = h
        .events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::UnitAttention { task, sense, .. } => Some((*task, *sense)),
            _ => None,
        })
        .collect();
    assert_eq!(attentions.len(), 2);
    assert_eq!(attentions[0].0, Some(tur));
    assert!(attentions[0].1.is_reservations_released());
    assert_eq!(h.session.stats().unit_attentions, 2);

    // More attentions than retries: the command completes with the CHECK CONDITION.
    h.target.faults.unit_attentions = 100;
    h.target.faults.ua_code = (0x29, 0x00);
    let tur = h
        .session
        .submit(lun1(), &Command::test_unit_ready(), Vec::new(), h.now)
        .unwrap();
    let reply = h.scsi(tur);
    assert_eq!(reply.status, Status::CheckCondition);
    assert_eq!(reply.unit_attentions_retried, 8);
    let Some(CommandError::CheckCondition(sense)) = reply.error() else {
        panic!("no check condition");
    };
    assert_eq!(sense.key, SenseKey::UnitAttention);
    assert_eq!((sense.asc, sense.ascq), (0x29, 0x00));
}

#[test]
fn rejects_fail_the_command_or_the_connection() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    h.target.faults.reject_next_command = Some(RejectReason::CommandNotSupported);
    let read = h.read(0, 1);
    assert_eq!(
        h.wait(read),
        Err(TaskError::Rejected(RejectReason::CommandNotSupported))
    );
    assert!(h.lost().is_empty());
    // A reject that asks for a resend is an ERL 0 connection restart.
    h.target.faults.reject_next_command = Some(RejectReason::DataDigestError);
    let read = h.read(0, 1);
    h.scsi(read);
    assert_eq!(
        h.lost(),
        [ConnectionError::Rejected(RejectReason::DataDigestError)]
    );
}

#[test]
fn the_target_may_ask_for_a_logout() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    h.target.faults.async_logout_request = true;
    h.run_until(50, |h| !h.lost().is_empty());
    assert_eq!(
        h.lost(),
        [ConnectionError::TargetRequestedLogout { time2wait_s: 0 }]
    );
    assert_eq!(h.target.stats.logouts, 1);
    let read = h.read(0, 1);
    h.scsi(read);
    assert_eq!(h.target.stats.logins, 2);
}

#[test]
fn logout_closes_the_session() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    h.target.faults.hold_commands = true;
    let issued = h.read(0, 1);
    h.run_until(5, |_| false);
    h.session.logout(h.now);
    assert_eq!(
        h.session
            .submit(lun1(), &Command::test_unit_ready(), Vec::new(), h.now),
        Err(SubmitError::Closed)
    );
    // The issued read completes first, then the logout goes out.
    h.target.faults.hold_commands = false;
    h.scsi(issued);
    assert!(h.run_until(100, |h| h.session.state() == SessionState::Closed));
    assert!(h.events.contains(&SessionEvent::LoggedOut { clean: true }));
    assert_eq!(h.target.stats.logouts, 1);
    assert!(!h.session.needs_connection(h.now + 1_000_000));

    // Logging out while disconnected closes at once; queued commands fail.
    let mut h = Harness::new(config(), TargetConfig::default());
    let queued = h.read(0, 1);
    h.session.logout(0);
    assert_eq!(h.completion(queued), None, "reported by the next poll");
    h.step();
    assert_eq!(h.completion(queued), Some(&Err(TaskError::LoggedOut)));
    assert_eq!(h.session.state(), SessionState::Closed);
}

#[test]
fn malformed_pdus_end_the_connection_not_the_session() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    // A reserved opcode.
    let mut garbage = vec![0u8; 48];
    garbage[0] = 0x07;
    h.target.faults.garbage = Some(garbage);
    let read = h.read(0, 1);
    h.scsi(read);
    assert!(matches!(h.lost()[..], [ConnectionError::Stream(_)]));
    // A SCSI Response whose sense length runs past its data.
    let mut bad = vec![0u8; 52];
    bad[0] = 0x21;
    bad[7] = 4;
    bad[48] = 0x00;
    bad[49] = 0x20;
    h.target.faults.garbage = Some(bad);
    let read = h.read(0, 1);
    h.scsi(read);
    assert!(matches!(h.lost()[1], ConnectionError::Parse(_)));
}

#[test]
fn a_pipe_that_takes_nothing_is_a_stall() {
    let mut h = Harness::new(config(), TargetConfig::default());
    h.logged_in();
    h.pipe.as_mut().unwrap().send_limit = 0;
    let write = h.write(0, pattern(512, 0));
    h.run_until(1_100, |h| !h.lost().is_empty());
    assert_eq!(h.lost(), [ConnectionError::Stalled]);
    h.scsi(write);
}

/// A [`Disk`] over the in-memory target, reconnecting when asked.
struct DiskRig {
    disk: Disk,
    target: FakeTarget,
    pipe: MemPipe,
    now: u64,
    registration: Vec<RegistrationEvent>,
}

impl DiskRig {
    fn new() -> Self {
        DiskRig {
            disk: Disk::new(Session::new(config()), 1).unwrap(),
            target: FakeTarget::new(TargetConfig::default()),
            pipe: MemPipe::dead(),
            now: 0,
            registration: Vec::new(),
        }
    }

    fn run(&mut self, op: TaskId) -> Result<DiskReply, DiskError> {
        for _ in 0..10_000 {
            if self.disk.session().needs_connection(self.now) {
                let (initiator, target) = mem_pipe();
                self.target.accept(target);
                self.pipe = initiator;
                self.disk.session_mut().connection_opened(self.now);
            }
            let mut done = None;
            for event in self.disk.poll(&mut self.pipe, self.now) {
                match event {
                    DiskEvent::Completed { op: id, result } if id == op => done = Some(result),
                    DiskEvent::Registration(event) => self.registration.push(event),
                    _ => {}
                }
            }
            self.target.poll();
            self.now += 1;
            if let Some(result) = done {
                return result;
            }
        }
        panic!("operation never completed");
    }
}

#[test]
fn disk_operations_decode_their_answers() {
    let mut rig = DiskRig::new();
    let op = rig.disk.read_capacity(0).unwrap();
    let Ok(DiskReply::Capacity(capacity)) = rig.run(op) else {
        panic!("no capacity");
    };
    assert_eq!((capacity.last_lba, capacity.block_len), (2047, 512));
    assert_eq!(rig.disk.block_len(), 512);
    let op = rig.disk.inquiry(0).unwrap();
    assert!(matches!(rig.run(op), Ok(DiskReply::Inquiry(_))));
    let op = rig.disk.report_luns(0).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Luns(vec![0, 1])));
    let data = pattern(2048, 4);
    let op = rig.disk.write(5, data.clone(), 0).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Done));
    let op = rig.disk.read(5, 4, 0).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Data(data)));
    let op = rig.disk.flush(0).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Done));
    assert!(matches!(
        rig.disk.write(0, vec![0; 100], 0),
        Err(DiskError::Unaligned { .. })
    ));

    let key = ReservationKey::for_node("node1");
    let op = rig.disk.register_and_ignore(key, 0).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Done));
    let op = rig.disk.reserve(key, 0).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Done));
    let op = rig.disk.read_keys(0).unwrap();
    let Ok(DiskReply::Keys(keys)) = rig.run(op) else {
        panic!("no keys");
    };
    assert_eq!(keys.keys, [key]);
    let op = rig.disk.read_reservation(0).unwrap();
    let Ok(DiskReply::Reservation(status)) = rig.run(op) else {
        panic!("no reservation");
    };
    assert_eq!(status.holder.map(|(k, _)| k), Some(key));
    assert_eq!(
        rig.target.reservation,
        Some((key.0, super::disk::FENCE_RESERVATION.code()))
    );

    // A failing status is a typed error.
    rig.target.faults.unit_attentions = 100;
    let op = rig.disk.test_unit_ready(0).unwrap();
    assert!(matches!(
        rig.run(op),
        Err(DiskError::Scsi(CommandError::CheckCondition(_)))
    ));
}

#[test]
fn a_kept_registration_is_restored_after_reconnection_unless_fenced() {
    let mut rig = DiskRig::new();
    let key = ReservationKey::for_node("node1");
    let op = rig.disk.register_and_ignore(key, 0).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Done));
    let op = rig.disk.reserve(key, 0).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Done));
    rig.disk.keep_registration(Some(key));

    // Registrations are bound to the connection, as in tgt: after a reconnection the disk
    // registers again before the queued write runs.
    rig.target.faults.drop_after_pdus = Some(0);
    let data = pattern(4096, 8);
    let op = rig.disk.write(64, data.clone(), rig.now).unwrap();
    assert_eq!(rig.run(op), Ok(DiskReply::Done));
    assert_eq!(rig.registration, [RegistrationEvent::Restored { key }]);
    assert_eq!(&rig.target.disk[64 * 512..64 * 512 + 4096], &data[..]);
    assert_eq!(
        rig.target.keys.len(),
        2,
        "the old nexus' registration stays, as in tgt"
    );

    // Without the restore, the same reconnection fences us by accident.
    let mut plain = DiskRig::new();
    let op = plain.disk.register_and_ignore(key, 0).unwrap();
    plain.run(op).unwrap();
    let op = plain.disk.reserve(key, 0).unwrap();
    plain.run(op).unwrap();
    plain.target.faults.drop_after_pdus = Some(0);
    let op = plain.disk.write(64, data.clone(), plain.now).unwrap();
    assert_eq!(
        plain.run(op),
        Err(DiskError::Scsi(CommandError::ReservationConflict))
    );

    // Fenced meanwhile: another node preempted our key. We stay out.
    rig.registration.clear();
    rig.target.keys = vec![(7, 999)];
    rig.target.reservation = Some((7, super::disk::FENCE_RESERVATION.code()));
    rig.target.faults.drop_after_pdus = Some(0);
    let op = rig.disk.write(64, data, rig.now).unwrap();
    assert_eq!(
        rig.run(op),
        Err(DiskError::Scsi(CommandError::ReservationConflict))
    );
    assert_eq!(rig.registration, [RegistrationEvent::Fenced { key }]);
}
