//! Tests of the tgtd harness itself (`tests/support/tgtd.rs`), checked with libiscsi's command
//! line tools and a minimal hand-built iSCSI login, independent of the crate's own initiator.
//!
//! They need `tgtd` (package `tgt`) and `libiscsi-bin`, and root; without them they fail, unless
//! `HV_SKIP_TGTD=1`, in which case they print that they skipped. Every wait is bounded.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use support::tgtd::{parse_connections, run_tool, start_or_skip, HarnessError, LunSpec, Tgtd};

const MIB: u64 = 1 << 20;

/// Bound for one libiscsi tool run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound for socket reads in the hand-built login.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a libiscsi tool, treating its absence like tgtd's (fail, or skip with HV_SKIP_TGTD=1).
fn tool(program: &'static str, args: &[&str]) -> Option<String> {
    match run_tool(program, args, TOOL_TIMEOUT) {
        Ok(output) => Some(output),
        Err(error) if error.is_unavailable() && support::tgtd::skip_requested() => {
            support::tgtd::report_skip(&format!("the {program} check"), &error);
            None
        }
        Err(error) => panic!("{program} {args:?}: {error}"),
    }
}

#[test]
fn luns_of_two_targets_appear_with_their_sizes() {
    let Some(tgtd) = start_or_skip(
        "luns_of_two_targets_appear_with_their_sizes",
        &[
            LunSpec::new(1, 64 * MIB),
            LunSpec::new(2, 32 * MIB),
            LunSpec::new(1, 16 * MIB).on_target(2),
        ],
    ) else {
        return;
    };
    assert!(tgtd.portal().ip().is_loopback());
    assert_eq!(tgtd.tids(), vec![1, 2]);
    for (tid, lun, size) in [(1, 1, 64 * MIB), (1, 2, 32 * MIB), (2, 1, 16 * MIB)] {
        let path = tgtd.lun_path(tid, lun);
        assert_eq!(path.metadata().unwrap().len(), size, "{}", path.display());
        assert!(path.starts_with(tgtd.dir()));
    }

    let Some(listing) = tool("iscsi-ls", &["-s", &format!("iscsi://{}", tgtd.portal())]) else {
        return;
    };
    for tid in [1, 2] {
        assert!(
            listing.contains(&format!(
                "Target:{} Portal:{}",
                tgtd.iqn(tid),
                tgtd.portal()
            )),
            "{listing}"
        );
    }
    assert_eq!(listing.matches("Lun:1 ").count(), 2, "{listing}");
    assert_eq!(listing.matches("Lun:2 ").count(), 1, "{listing}");
    assert_eq!(listing.matches("DIRECT_ACCESS").count(), 3, "{listing}");

    for (tid, lun, size) in [(1, 1, 64 * MIB), (1, 2, 32 * MIB), (2, 1, 16 * MIB)] {
        let capacity = tool("iscsi-readcapacity16", &[&tgtd.url(tid, lun)]).unwrap();
        assert!(
            capacity.contains(&format!("Total size:{size}\n")),
            "target {tid} LUN {lun}: {capacity}"
        );
        assert!(capacity.contains("LOGICAL BLOCK LENGTH IN BYTES:512"));
    }
}

#[test]
fn two_instances_run_side_by_side() {
    // Started concurrently, as parallel tests do.
    let starters: Vec<_> = [8 * MIB, 12 * MIB]
        .into_iter()
        .map(|size| {
            thread::spawn(move || {
                start_or_skip("two_instances_run_side_by_side", &[LunSpec::new(1, size)])
            })
        })
        .collect();
    let instances: Vec<Option<Tgtd>> = starters.into_iter().map(|s| s.join().unwrap()).collect();
    let [Some(a), Some(b)] = <[Option<Tgtd>; 2]>::try_from(instances).unwrap() else {
        return;
    };
    assert_ne!(a.portal(), b.portal());
    assert_ne!(a.control().number(), b.control().number());
    assert_ne!(a.pid(), b.pid());
    assert_ne!(a.dir(), b.dir());

    // Each control socket manages its own daemon only.
    let shown_a = a
        .control()
        .run(&["--lld", "iscsi", "--op", "show", "--mode", "target"])
        .unwrap();
    assert!(
        shown_a.contains(a.lun_path(1, 1).to_str().unwrap()),
        "{shown_a}"
    );
    assert!(
        !shown_a.contains(b.lun_path(1, 1).to_str().unwrap()),
        "{shown_a}"
    );

    for (tgtd, size) in [(&a, 8 * MIB), (&b, 12 * MIB)] {
        let Some(capacity) = tool("iscsi-readcapacity16", &[&tgtd.url(1, 1)]) else {
            return;
        };
        assert!(
            capacity.contains(&format!("Total size:{size}\n")),
            "{capacity}"
        );
    }
}

#[test]
fn drop_stops_tgtd_and_removes_its_files() {
    let Some(tgtd) = start_or_skip(
        "drop_stops_tgtd_and_removes_its_files",
        &[LunSpec::new(1, MIB)],
    ) else {
        return;
    };
    let pid = tgtd.pid();
    let portal = tgtd.portal();
    let dir = tgtd.dir().to_path_buf();
    let proc_entry = format!("/proc/{pid}");
    let cmdline = std::fs::read(format!("{proc_entry}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("tgtd"),
        "PID {pid} is tgtd"
    );
    assert!(TcpStream::connect_timeout(&portal, IO_TIMEOUT).is_ok());

    tgtd.stop().unwrap();

    // The harness reaped its child, so the PID is gone (barring reuse by a process that is not
    // ours, which the cmdline check tells apart).
    let still_tgtd = std::fs::read(format!("{proc_entry}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&portal.to_string()));
    assert!(!still_tgtd, "tgtd PID {pid} is still running");
    assert!(TcpStream::connect_timeout(&portal, IO_TIMEOUT).is_err());
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn dropping_connections_closes_the_initiators_socket() {
    let Some(tgtd) = start_or_skip(
        "dropping_connections_closes_the_initiators_socket",
        &[LunSpec::new(1, MIB)],
    ) else {
        return;
    };
    let mut first = login(tgtd.portal(), &tgtd.iqn(1), 1).unwrap();
    let mut second = login(tgtd.portal(), &tgtd.iqn(1), 2).unwrap();
    let connections = tgtd.wait_for_connections(1, 2, IO_TIMEOUT).unwrap();
    assert!(connections
        .iter()
        .all(|c| c.initiator == INITIATOR && c.address == "127.0.0.1"));

    assert_eq!(tgtd.drop_connections(1).unwrap(), 2);
    assert_eq!(tgtd.connections(1).unwrap(), vec![]);
    for stream in [&mut first, &mut second] {
        assert_closed_by_peer(stream);
    }

    // The target still accepts logins: this is a dropped connection, not an outage.
    let _again = login(tgtd.portal(), &tgtd.iqn(1), 1).unwrap();
    assert_eq!(
        tgtd.wait_for_connections(1, 1, IO_TIMEOUT).unwrap().len(),
        1
    );
}

#[test]
fn offline_target_refuses_logins_and_keeps_sessions() {
    let Some(tgtd) = start_or_skip(
        "offline_target_refuses_logins_and_keeps_sessions",
        &[LunSpec::new(1, MIB)],
    ) else {
        return;
    };
    let _kept = login(tgtd.portal(), &tgtd.iqn(1), 1).unwrap();
    tgtd.set_target_online(1, false).unwrap();
    let refused = login(tgtd.portal(), &tgtd.iqn(1), 2).unwrap_err();
    assert!(refused.contains("status"), "{refused}");
    assert_eq!(
        tgtd.connections(1).unwrap().len(),
        1,
        "the old session stays"
    );

    tgtd.set_target_online(1, true).unwrap();
    let _back = login(tgtd.portal(), &tgtd.iqn(1), 3).unwrap();
    assert_eq!(tgtd.connections(1).unwrap().len(), 2);
}

#[test]
fn chap_account_is_enforced() {
    let Some(tgtd) = start_or_skip("chap_account_is_enforced", &[LunSpec::new(1, MIB)]) else {
        return;
    };
    tgtd.add_chap_account(1, "hvnode", "secretsecret1").unwrap();
    let refused = login(tgtd.portal(), &tgtd.iqn(1), 1).unwrap_err();
    assert!(refused.contains("status"), "{refused}");

    let url = |password: &str| {
        format!(
            "iscsi://hvnode%{password}@{}/{}/1",
            tgtd.portal(),
            tgtd.iqn(1)
        )
    };
    let Some(capacity) = tool("iscsi-readcapacity16", &[&url("secretsecret1")]) else {
        return;
    };
    assert!(
        capacity.contains(&format!("Total size:{MIB}\n")),
        "{capacity}"
    );
    match run_tool(
        "iscsi-readcapacity16",
        &[&url("wrongwrongwrong")],
        TOOL_TIMEOUT,
    ) {
        Err(HarnessError::Command { .. }) => {}
        other => panic!("a wrong CHAP secret logged in: {other:?}"),
    }
}

#[test]
fn tgtadm_errors_are_reported() {
    let Some(tgtd) = start_or_skip("tgtadm_errors_are_reported", &[LunSpec::new(1, MIB)]) else {
        return;
    };
    let error = tgtd
        .control()
        .run(&[
            "--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "99",
        ])
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("--tid 99") && text.contains("failed"),
        "{text}"
    );
}

#[test]
fn impossible_requests_are_refused_before_starting() {
    for luns in [
        vec![LunSpec::new(0, MIB)],
        vec![LunSpec::new(1, 0)],
        vec![LunSpec::new(1, MIB).on_target(0)],
        vec![LunSpec::new(1, MIB), LunSpec::new(1, 2 * MIB)],
    ] {
        match Tgtd::start(&luns) {
            Err(HarnessError::Invalid(_)) => {}
            other => panic!("{luns:?} gave {other:?}"),
        }
    }
}

#[test]
fn connection_listing_parses() {
    let output = "Session: 4\n    Connection: 0\n        Initiator: iqn.a:b\n        \
                  IP Address: 127.0.0.1\nSession: 7\n    Connection: 1\n        \
                  Initiator: iqn.c:d\n        IP Address: 127.0.0.1\n";
    let connections = parse_connections(output).unwrap();
    assert_eq!(connections.len(), 2);
    assert_eq!((connections[0].sid, connections[0].cid), (4, 0));
    assert_eq!((connections[1].sid, connections[1].cid), (7, 1));
    assert_eq!(connections[0].initiator, "iqn.a:b");
    assert_eq!(connections[1].address, "127.0.0.1");
    assert_eq!(parse_connections("").unwrap(), vec![]);
    assert!(parse_connections("    Connection: 0\n").is_err());
}

/// The initiator name of the hand-built logins.
const INITIATOR: &str = "iqn.2026-01.test.hv:harness";

/// Logs in to `target` through a minimal Login exchange (RFC 7143 section 11.12): security
/// stage with AuthMethod=None, then operational stage to full feature phase. `isid_tail` makes
/// the ISID distinct, so two logins are two sessions (the same ISID would reinstate the first).
/// Returns the connected stream, or the reason the target refused.
fn login(portal: SocketAddr, target: &str, isid_tail: u8) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect_timeout(&portal, IO_TIMEOUT).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let security = format!(
        "InitiatorName={INITIATOR}\0SessionType=Normal\0TargetName={target}\0AuthMethod=None\0"
    );
    // T=1, CSG=0 (security), NSG=1 (operational).
    send_login(&mut stream, 0x81, [0, 0], isid_tail, 0, &security);
    let (header, text) = receive(&mut stream).map_err(|e| format!("no login response: {e}"))?;
    check_login_response(&header, &text)?;
    let tsih = [header[14], header[15]];
    let stat_sn = u32::from_be_bytes([header[24], header[25], header[26], header[27]]);
    // T=1, CSG=1 (operational), NSG=3 (full feature phase).
    let operational = "HeaderDigest=None\0DataDigest=None\0";
    send_login(&mut stream, 0x87, tsih, isid_tail, stat_sn + 1, operational);
    let (header, text) = receive(&mut stream).map_err(|e| format!("no login response: {e}"))?;
    check_login_response(&header, &text)?;
    if header[1] & 0x83 != 0x83 {
        return Err(format!(
            "no transit to full feature phase: flags {:#04x}",
            header[1]
        ));
    }
    Ok(stream)
}

fn send_login(
    stream: &mut TcpStream,
    flags: u8,
    tsih: [u8; 2],
    isid_tail: u8,
    exp_stat_sn: u32,
    text: &str,
) {
    let mut pdu = [0u8; 48].to_vec();
    pdu[0] = 0x43; // I=1, Login Request
    pdu[1] = flags;
    pdu[5..8].copy_from_slice(&(text.len() as u32).to_be_bytes()[1..]);
    pdu[8..14].copy_from_slice(&[0x40, 0x00, 0x01, 0x37, 0x00, isid_tail]);
    pdu[14..16].copy_from_slice(&tsih);
    pdu[28..32].copy_from_slice(&exp_stat_sn.to_be_bytes());
    pdu.extend_from_slice(text.as_bytes());
    pdu.resize(pdu.len().next_multiple_of(4), 0);
    stream.write_all(&pdu).unwrap();
}

fn receive(stream: &mut TcpStream) -> std::io::Result<([u8; 48], String)> {
    let mut header = [0u8; 48];
    stream.read_exact(&mut header)?;
    let len = u32::from_be_bytes([0, header[5], header[6], header[7]]) as usize;
    let mut data = vec![0u8; len.next_multiple_of(4)];
    stream.read_exact(&mut data)?;
    data.truncate(len);
    Ok((header, String::from_utf8_lossy(&data).replace('\0', " ")))
}

fn check_login_response(header: &[u8; 48], text: &str) -> Result<(), String> {
    if header[0] & 0x3F != 0x23 {
        return Err(format!(
            "opcode {:#04x} instead of a Login Response",
            header[0]
        ));
    }
    match (header[36], header[37]) {
        (0, 0) => Ok(()),
        (class, detail) => Err(format!(
            "login refused with status {class:02x}{detail:02x} {text}"
        )),
    }
}

/// Asserts the target closed `stream`: a read returns end of file or a reset, within the bound.
fn assert_closed_by_peer(stream: &mut TcpStream) {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection still open: {other:?}"),
    }
}
