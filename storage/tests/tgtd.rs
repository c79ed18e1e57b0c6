//! The initiator against a real tgtd (issue item 2), through the blocking client: data round
//! trips of many sizes, discovery, CHAP, two initiators with persistent reservations (conflict,
//! preempt, UNIT ATTENTION), NOP keep-alive, and recovery after tgtd drops the connection; and
//! the reservation procedures of `storage::ownership` between two nodes, driven the way the
//! kernel's loop drives them.
//!
//! Each test starts its own tgtd through the shared harness (`support::tgtd`: a free loopback
//! port, a private control socket, sparse LUN files, stopped on drop). Without tgt installed the
//! tests fail, unless `HV_SKIP_TGTD=1` lets them skip.

#![cfg(feature = "std")]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use storage::blocking::{discover, BlockingError, Client};
use storage::iscsi::{
    ChapConfig, ChapCredentials, DigestPolicy, Disk, DiskError, DiskEvent, Isid, LoginError,
    LoginStatus, RegistrationEvent, Session, SessionConfig, SessionEvent,
};
use storage::ownership::{Outcome, Procedure, ProcedureError, Procedures, Ticket};
use storage::scsi::{CommandError, ReservationKey, ReservationType, SenseKey};
use support::tgtd::{start_or_skip, LunSpec, Tgtd};
use transport::{Pipe, PipeError, TcpPipe};

const TIMEOUT: Duration = Duration::from_secs(20);
const LUN_BYTES: u64 = 64 * 1024 * 1024;
const TID: u32 = 1;

/// A tgtd with target 1 and its LUN 1 of [`LUN_BYTES`], or `None` when skipping.
fn start(test: &str) -> Option<Tgtd> {
    start_or_skip(test, &[LunSpec::new(1, LUN_BYTES)])
}

/// Sets a parameter of target 1 (InitialR2T, MaxRecvDataSegmentLength, nop_interval, ...).
fn set(tgtd: &Tgtd, name: &str, value: &str) {
    let args = [
        "--lld", "iscsi", "--op", "update", "--mode", "target", "--tid", "1", "-n", name, "-v",
        value,
    ];
    tgtd.control()
        .run(&args)
        .unwrap_or_else(|e| panic!("set {name}={value}: {e}"));
}

fn initiator(node: &str) -> String {
    format!("iqn.2026-01.test.storage:{node}")
}

fn config(tgtd: &Tgtd, node: &str) -> SessionConfig {
    let name = initiator(node);
    let mut config = SessionConfig::normal(&name, &tgtd.iqn(TID), Isid::for_name(&name));
    config.timeouts.command_ms = 10_000;
    config.retry.reconnect_delay_ms = 20;
    config.retry.max_reconnect_delay_ms = 500;
    config
}

fn connect(tgtd: &Tgtd, node: &str) -> Client {
    Client::connect(tgtd.portal(), config(tgtd, node), 1, TIMEOUT)
        .unwrap_or_else(|e| panic!("{node} cannot log in: {e}"))
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

fn conflict(result: Result<(), BlockingError>) -> bool {
    matches!(
        result,
        Err(BlockingError::Disk(DiskError::Scsi(
            CommandError::ReservationConflict
        )))
    )
}

#[test]
fn reads_writes_and_flushes_of_many_sizes_round_trip() {
    let Some(tgtd) = start("sizes") else {
        return;
    };
    let mut client = connect(&tgtd, "sizes");
    let capacity = client.read_capacity().unwrap();
    assert_eq!(capacity.block_len, 512);
    assert_eq!(capacity.blocks(), LUN_BYTES / 512);
    let inquiry = client.inquiry().unwrap();
    assert!(inquiry.is_disk());
    assert_eq!(client.report_luns().unwrap(), [0, 1]);
    let params = client.disk().session().params().unwrap().clone();
    // tgt's defaults: 8 KiB segments, 256 KiB bursts, 64 KiB first burst, R2T for all.
    assert_eq!(params.max_xmit_data_segment_length, 8192);
    assert_eq!(params.max_burst_length, 262_144);
    assert_eq!(params.first_burst_length, 65_536);
    assert!(params.initial_r2t && params.immediate_data);

    // Unaligned to FirstBurstLength, equal to and beyond MaxBurstLength.
    let sizes = [
        512,
        4096,
        8192 + 512,
        65_536 + 1536,
        262_144,
        1024 * 1024 + 3584,
    ];
    let mut lba = 0;
    for (i, size) in sizes.into_iter().enumerate() {
        let data = pattern(size, i as u32 + 1);
        client.write(lba, &data).unwrap();
        client.flush().unwrap();
        assert_eq!(
            client.read(lba, (size / 512) as u32).unwrap(),
            data,
            "{size} bytes"
        );
        lba += (size / 512) as u64 + 7;
    }
    // What another session reads is what we wrote.
    let mut other = connect(&tgtd, "sizes-check");
    assert_eq!(other.read(0, 1).unwrap(), pattern(512, 1));
    other.logout().unwrap();
    let stats = client.stats();
    assert_eq!(stats.connection_losses, 0);
    client.logout().unwrap();
}

#[test]
fn digests_unsolicited_data_and_large_segments_with_tgt() {
    let Some(tgtd) = start("digests") else {
        return;
    };
    set(&tgtd, "HeaderDigest", "CRC32C,None");
    set(&tgtd, "DataDigest", "CRC32C,None");
    set(&tgtd, "InitialR2T", "No");
    set(&tgtd, "MaxRecvDataSegmentLength", "65536");
    let mut config = config(&tgtd, "digests");
    config.login.negotiation.header_digest = DigestPolicy::RequireCrc32c;
    config.login.negotiation.data_digest = DigestPolicy::RequireCrc32c;
    let mut client = Client::connect(tgtd.portal(), config, 1, TIMEOUT).unwrap();
    let params = client.disk().session().params().unwrap().clone();
    assert!(params.header_digest && params.data_digest);
    assert!(!params.initial_r2t);
    assert_eq!(params.max_xmit_data_segment_length, 65_536);
    for (i, size) in [512usize, 70_144, 300_032, 2 * 1024 * 1024 + 512]
        .into_iter()
        .enumerate()
    {
        let data = pattern(size, 100 + i as u32);
        client.write(4096, &data).unwrap();
        assert_eq!(
            client.read(4096, (size / 512) as u32).unwrap(),
            data,
            "{size} bytes"
        );
    }
    client.logout().unwrap();
}

#[test]
fn discovery_lists_the_target() {
    let Some(tgtd) = start("discovery") else {
        return;
    };
    let targets = discover(tgtd.portal(), &initiator("discoverer"), None, TIMEOUT).unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].name, tgtd.iqn(TID));
    let portal = &targets[0].portals[0];
    assert_eq!(
        (portal.host.as_str(), portal.port),
        ("127.0.0.1", tgtd.portal().port())
    );
}

fn chap(secret: &str, mutual: Option<&str>) -> ChapConfig {
    ChapConfig {
        initiator: ChapCredentials {
            name: "node-user".into(),
            secret: secret.as_bytes().to_vec(),
        },
        target: mutual.map(|secret| ChapCredentials {
            name: "target-user".into(),
            secret: secret.as_bytes().to_vec(),
        }),
    }
}

#[test]
fn chap_logins_and_a_bad_password_refused() {
    let Some(tgtd) = start("chap") else {
        return;
    };
    tgtd.add_chap_account(TID, "node-user", "initiator-secret")
        .unwrap();
    tgtd.add_outgoing_chap_account(TID, "target-user", "target-secret1")
        .unwrap();
    let attempt = |chap: Option<ChapConfig>| {
        let mut config = config(&tgtd, "chap");
        config.login.chap = chap;
        Client::connect(tgtd.portal(), config, 1, TIMEOUT)
    };
    let mut client = attempt(Some(chap("initiator-secret", None))).expect("one-way CHAP");
    client.test_unit_ready().unwrap();
    client.logout().unwrap();
    let client =
        attempt(Some(chap("initiator-secret", Some("target-secret1")))).expect("mutual CHAP");
    client.logout().unwrap();

    let refused = |result: Result<Client, BlockingError>| match result {
        Err(BlockingError::Login(error)) => error,
        other => panic!("expected a refused login, got {other:?}"),
    };
    assert_eq!(
        refused(attempt(Some(chap("wrong-password", None)))),
        LoginError::Refused(LoginStatus::AuthenticationFailed)
    );
    // tgt refuses AuthMethod=None with the same status when an account is bound.
    assert_eq!(
        refused(attempt(None)),
        LoginError::Refused(LoginStatus::AuthenticationFailed)
    );
    assert!(matches!(
        refused(attempt(Some(chap(
            "initiator-secret",
            Some("not-the-target's")
        )))),
        LoginError::Chap(_)
    ));
}

#[test]
fn two_initiators_register_reserve_conflict_and_preempt() {
    let Some(tgtd) = start("reservations") else {
        return;
    };
    let mut a = connect(&tgtd, "node-a");
    let mut b = connect(&tgtd, "node-b");
    let mut outsider = connect(&tgtd, "node-c");
    assert_ne!(a.disk().session().tsih(), b.disk().session().tsih());
    let key_a = ReservationKey::for_node("node-a");
    let key_b = ReservationKey::for_node("node-b");

    a.register(ReservationKey::NONE, key_a).unwrap();
    b.register_and_ignore(key_b).unwrap();
    a.reserve(key_a).unwrap();
    let keys = b.read_keys().unwrap();
    assert!(keys.contains(key_a) && keys.contains(key_b));
    let status = b.read_reservation().unwrap();
    assert_eq!(
        status.holder,
        Some((key_a, ReservationType::WriteExclusiveRegistrantsOnly))
    );

    // Registrants write; the unregistered initiator is refused writes, not reads.
    a.write(0, &pattern(4096, 1)).unwrap();
    b.write(8, &pattern(4096, 2)).unwrap();
    assert!(conflict(outsider.write(16, &pattern(4096, 3))));
    assert_eq!(outsider.read(0, 8).unwrap(), pattern(4096, 1));

    // A write of no blocks is the harmless probe of whether a node may write: allowed to a
    // registrant, refused to the unregistered.
    a.write(0, &[]).unwrap();
    assert!(conflict(outsider.write(0, &[])));

    // Node b fences node a.
    b.preempt(key_b, key_a).unwrap();
    assert!(
        conflict(a.write(0, &[])),
        "a's probe is refused once fenced"
    );
    assert!(conflict(a.write(0, &pattern(4096, 4))), "a is fenced");
    b.write(0, &pattern(4096, 5)).unwrap();
    assert_eq!(b.read(0, 8).unwrap(), pattern(4096, 5));
    let status = b.read_reservation().unwrap();
    assert_eq!(
        status.holder,
        Some((key_b, ReservationType::WriteExclusiveRegistrantsOnly))
    );
    assert!(!b.read_keys().unwrap().contains(key_a));
    // a learnt it was preempted from a UNIT ATTENTION (2A/03 or 2A/05) before the conflict.
    assert!(a
        .unit_attentions()
        .iter()
        .any(|sense| sense.key == SenseKey::UnitAttention && sense.asc == 0x2A));

    // PREEMPT AND ABORT: tgt 1.0.85 does not implement it (its service action table has it
    // commented out) and answers ILLEGAL REQUEST, INVALID FIELD IN CDB; the error is typed.
    let result = b.preempt_and_abort(key_b, key_a);
    match result {
        Ok(()) => {}
        Err(BlockingError::Disk(DiskError::Scsi(CommandError::CheckCondition(sense)))) => {
            assert_eq!(sense.key, SenseKey::IllegalRequest);
            assert_eq!((sense.asc, sense.ascq), (0x24, 0x00));
        }
        Err(other) => panic!("unexpected {other}"),
    }

    b.release(key_b).unwrap();
    b.clear(key_b).unwrap();
    assert!(b.read_keys().unwrap().keys.is_empty());
    assert!(b.read_reservation().unwrap().holder.is_none());
    outsider.write(16, &pattern(4096, 6)).unwrap();
}

#[test]
fn reservations_released_unit_attention_is_retried() {
    let Some(tgtd) = start("unit-attention") else {
        return;
    };
    let mut a = connect(&tgtd, "ua-a");
    let mut b = connect(&tgtd, "ua-b");
    let key_a = ReservationKey::for_node("ua-a");
    let key_b = ReservationKey::for_node("ua-b");
    a.register_and_ignore(key_a).unwrap();
    b.register_and_ignore(key_b).unwrap();
    b.reserve(key_b).unwrap();
    let released = |client: &Client| {
        client
            .unit_attentions()
            .iter()
            .filter(|sense| (sense.asc, sense.ascq) == (0x2A, 0x04))
            .count()
    };
    assert_eq!(released(&a) + released(&b), 0);
    // The holder unregisters: the reservation goes, and tgt raises 2A/04 (RESERVATIONS
    // RELEASED). tgt 1.0.85 queues it for every I_T nexus except the remaining registrant,
    // so here the holder itself gets it, on its next command.
    b.register(key_b, ReservationKey::NONE).unwrap();
    a.test_unit_ready().unwrap();
    b.test_unit_ready().unwrap();
    a.write(0, &pattern(512, 9)).unwrap();
    b.read(0, 1).unwrap();
    assert!(released(&a) + released(&b) >= 1, "no 2A/04 seen");
    // Every command above succeeded: the UNIT ATTENTION was retried transparently.
    assert!(b.read_reservation().unwrap().holder.is_none());
}

#[test]
fn nop_keep_alive_both_ways() {
    let Some(tgtd) = start("nop") else {
        return;
    };
    // tgt pings every second with a TTT that wants an answer.
    set(&tgtd, "nop_interval", "1");
    set(&tgtd, "nop_count", "3");
    let mut config = config(&tgtd, "nop");
    config.timeouts.nop_interval_ms = 300;
    config.timeouts.nop_timeout_ms = 2_000;
    let mut client = Client::connect(tgtd.portal(), config, 1, TIMEOUT).unwrap();
    client.poll_for(Duration::from_millis(3_500));
    let stats = client.stats();
    assert!(stats.nop_answers_sent >= 2, "{stats:?}");
    assert!(stats.nop_pings_sent >= 2, "{stats:?}");
    assert_eq!(stats.connection_losses, 0, "{:?}", client.events());
    client.test_unit_ready().unwrap();
}

#[test]
fn recovery_after_tgtd_drops_the_connection() {
    let Some(tgtd) = start("drop") else {
        return;
    };
    let mut client = connect(&tgtd, "drop");
    let key = ReservationKey::for_node("drop");
    client.register_and_ignore(key).unwrap();
    client.reserve(key).unwrap();
    client.keep_registration(Some(key));

    // tgtd drops the connection at once, then every 25 ms while writes of 1 MiB run back to
    // back.
    let chunk = 1024 * 1024;
    let total = 16 * chunk;
    let data = pattern(total, 77);
    let writing = AtomicBool::new(true);
    let during_writes = thread::scope(|scope| {
        let dropper = scope.spawn(|| {
            let mut dropped = 0;
            for _ in 0..40 {
                dropped += tgtd.drop_connections(TID).unwrap();
                thread::sleep(Duration::from_millis(25));
                if !writing.load(Ordering::SeqCst) {
                    break;
                }
            }
            dropped
        });
        for (i, piece) in data.chunks(chunk).enumerate() {
            client.write((i * chunk / 512) as u64, piece).unwrap();
        }
        writing.store(false, Ordering::SeqCst);
        dropper.join().unwrap()
    });
    assert!(during_writes >= 1);
    // One more drop before reading (once logged in again), so the read path recovers too.
    client.test_unit_ready().unwrap();
    let dropped = during_writes + tgtd.drop_connections(TID).unwrap();
    assert!(dropped > during_writes);
    client.flush().unwrap();
    assert_eq!(client.read(0, (total / 512) as u32).unwrap(), data);

    let losses = client
        .events()
        .iter()
        .filter(|e| matches!(e, SessionEvent::ConnectionLost(_)))
        .count();
    let relogins = client
        .events()
        .iter()
        .filter(|e| {
            matches!(
                e,
                SessionEvent::LoggedIn {
                    reconnected: true,
                    ..
                }
            )
        })
        .count();
    eprintln!(
        "{dropped} drops, {losses} connections lost, {relogins} re-logins, {} commands reissued",
        client.stats().commands_reissued
    );
    assert!(losses >= 1 && relogins >= 1, "{:?}", client.events());
    assert!(client
        .registration_events()
        .iter()
        .all(|e| *e == RegistrationEvent::Restored { key }));
    assert_eq!(client.registration_events().len(), relogins);
    // Another session sees the same data.
    let mut other = connect(&tgtd, "drop-check");
    assert_eq!(other.read(0, (total / 512) as u32).unwrap(), data);
}

/// What the session gets while it has no TCP connection.
struct NoConnection;

impl Pipe for NoConnection {
    fn send(&mut self, _: &[u8]) -> Result<usize, PipeError> {
        Err(PipeError::Closed)
    }

    fn recv(&mut self, _: &mut [u8]) -> Result<usize, PipeError> {
        Err(PipeError::Closed)
    }
}

/// One node's session to the LUN and its reservation procedures, polled by hand as the
/// kernel's loop polls an attachment.
struct Node {
    name: &'static str,
    disk: Disk,
    procedures: Procedures,
    portal: SocketAddr,
    pipe: Option<TcpPipe>,
    start: Instant,
    next_ticket: u64,
}

impl Node {
    fn new(tgtd: &Tgtd, name: &'static str) -> Node {
        Node {
            name,
            disk: Disk::new(Session::new(config(tgtd, name)), 1).unwrap(),
            procedures: Procedures::new(ReservationKey::for_node(name)),
            portal: tgtd.portal(),
            pipe: None,
            start: Instant::now(),
            next_ticket: 1,
        }
    }

    fn key(&self) -> ReservationKey {
        self.procedures.key()
    }

    /// One round: connect if asked, start procedures, poll, hand completions over.
    fn poll(&mut self) {
        let now = self.start.elapsed().as_millis() as u64;
        if self.disk.session().needs_connection(now) {
            self.pipe = TcpPipe::connect(self.portal, TIMEOUT).ok();
            self.disk.session_mut().connection_opened(now);
        }
        self.procedures.run(&mut self.disk, now);
        let events = match self.pipe.as_mut() {
            Some(pipe) => self.disk.poll(pipe, now),
            None => self.disk.poll(&mut NoConnection, now),
        };
        for event in events {
            match event {
                DiskEvent::Completed { op, result } => assert!(
                    self.procedures
                        .on_completion(op, &result, &mut self.disk, now),
                    "{}: a completion that is not the procedures': {result:?}",
                    self.name
                ),
                DiskEvent::Session(
                    SessionEvent::ConnectionLost(_)
                    | SessionEvent::LoggedOut { .. }
                    | SessionEvent::Failed(_),
                ) => self.pipe = None,
                _ => {}
            }
        }
        self.procedures.run(&mut self.disk, now);
    }

    /// Runs `procedure` to its outcome, and lets any command it still has (the unregister
    /// after a refused claim) finish before the other node acts.
    fn run(&mut self, procedure: Procedure) -> Result<Outcome, ProcedureError> {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.procedures.start(ticket, procedure);
        let deadline = Instant::now() + TIMEOUT;
        let mut outcome = None;
        while outcome.is_none() || self.procedures.busy() {
            assert!(
                Instant::now() < deadline,
                "{}: {procedure} did not finish",
                self.name
            );
            self.poll();
            if outcome.is_none() {
                outcome = self.procedures.take_result(ticket);
            }
            thread::sleep(Duration::from_micros(200));
        }
        outcome.unwrap()
    }

    fn probe(&mut self) -> bool {
        match self.run(Procedure::Probe) {
            Ok(Outcome::Probed { write_allowed }) => write_allowed,
            other => panic!("{}: probe: {other:?}", self.name),
        }
    }
}

#[test]
fn ownership_procedures_hand_a_lun_between_two_nodes() {
    let Some(tgtd) = start("ownership") else {
        return;
    };
    let mut a = Node::new(&tgtd, "owner-a");
    let mut b = Node::new(&tgtd, "owner-b");
    let (key_a, key_b) = (a.key(), b.key());
    // An unregistered third session watches the registrations and the reservation.
    let mut observer = connect(&tgtd, "owner-observer");
    let mut state = || {
        let keys = observer.read_keys().unwrap().keys;
        let holder = observer.read_reservation().unwrap().holder;
        (keys, holder.map(|(key, _)| key))
    };

    assert_eq!(
        a.run(Procedure::Open),
        Ok(Outcome::Opened {
            sectors: LUN_BYTES / 512
        })
    );
    assert_eq!(
        a.run(Procedure::Claim { takeover: false }),
        Ok(Outcome::Claimed { previous: None })
    );
    assert_eq!(state(), (vec![key_a], Some(key_a)));
    assert!(a.probe());

    // B may not take what A holds without a takeover, and leaves no registration behind.
    assert_eq!(
        b.run(Procedure::Claim { takeover: false }),
        Err(ProcedureError::HeldBy(key_a))
    );
    assert_eq!(state(), (vec![key_a], Some(key_a)));
    assert!(!b.probe(), "B is not registered");

    // B takes over (a migration's destination): A is fenced.
    assert_eq!(
        b.run(Procedure::Claim { takeover: true }),
        Ok(Outcome::Claimed {
            previous: Some(key_a)
        })
    );
    assert_eq!(state(), (vec![key_b], Some(key_b)));
    assert!(b.probe());
    assert!(!a.probe(), "A is fenced");
    // SBC-3: SYNCHRONIZE CACHE conflicts like a write for a node that is not registered.
    assert!(matches!(
        a.run(Procedure::Flush),
        Err(ProcedureError::Command {
            error: DiskError::Scsi(CommandError::ReservationConflict),
            ..
        })
    ));

    // A takes its disk back (a failed migration): B is fenced.
    assert_eq!(
        a.run(Procedure::Claim { takeover: true }),
        Ok(Outcome::Claimed {
            previous: Some(key_b)
        })
    );
    assert_eq!(state(), (vec![key_a], Some(key_a)));
    assert!(a.probe());
    assert!(!b.probe(), "B is fenced");

    // B, fenced, gives up what it no longer has: no error, nothing changes.
    assert_eq!(b.run(Procedure::Release), Ok(Outcome::Released));
    assert_eq!(state(), (vec![key_a], Some(key_a)));

    // A gives the disk up; B claims it fresh.
    assert_eq!(a.run(Procedure::Release), Ok(Outcome::Released));
    assert_eq!(state(), (vec![], None));
    assert_eq!(
        b.run(Procedure::Claim { takeover: false }),
        Ok(Outcome::Claimed { previous: None })
    );
    assert_eq!(state(), (vec![key_b], Some(key_b)));
    assert!(b.probe());
    assert!(!a.probe(), "A is no longer registered");
}
