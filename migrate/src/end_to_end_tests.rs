//! Source and destination run against each other in memory, over real frames, with a fake guest
//! (a vector of pages plus a dirty bitmap) that keeps writing while it runs, and with a failure
//! injected at every step. The invariant checked after each run is the failure rule:
//! either the migration committed and the destination memory equals the source's, or the source
//! VM runs on, unpaused, unthrottled and untouched, and the destination discarded its copy.
//!
//! The fake guest, host and configurations come from [`crate::testing`].

use alloc::vec::Vec;

use crate::destination::{Destination, DestinationAction, DestinationConfig, DestinationState};
use crate::frame::FrameDecoder;
use crate::machine::{Failure, Output};
use crate::message::{AbortReason, Message, RefuseReason};
use crate::source::{Source, SourceAction, SourceConfig, SourceState};
use crate::testing::{
    check_outcome, destination_config, source_config, FakeGuest, FakeHost, Rng, TICK_US,
};

const PAGES: usize = 128;
const MAX_TICKS: u64 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Frame `at` (counting both directions) is lost and both transports report the cut.
    CutLink {
        at: usize,
    },
    /// From frame `at` on nothing arrives and nobody is told: only timeouts can end it.
    Blackhole {
        at: usize,
    },
    /// One bit of frame `at` flips on the way.
    Corrupt {
        at: usize,
        bit: usize,
    },
    /// The destination's `at`-th page write fails.
    WriteFails {
        at: u64,
    },
    /// The operator cancels at tick `at`.
    Cancel {
        at: u64,
    },
    /// The destination refuses the configuration.
    Refuse,
    /// The source cannot drain or flush the VM's disk.
    QuiesceFails,
    /// The destination's takeover of the disk fails; `after_preempt`: it had already
    /// preempted the source's reservation (the answer was lost, say).
    TakeoverFails {
        after_preempt: bool,
    },
    /// The destination's takeover never answers (a dying target): its deadline must fire.
    TakeoverHangs,
}

/// Which node holds the shared disk's reservation (the target's view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Source,
    Destination,
}

struct Link {
    fault: Fault,
    sent: usize,
    dead: bool,
    cut_now: bool,
}

impl Link {
    fn send(&mut self, message: &Message, to: &mut FrameDecoder) {
        if self.dead {
            return;
        }
        let k = self.sent;
        self.sent += 1;
        let mut bytes = Vec::new();
        message
            .encode(&mut bytes)
            .expect("machines send valid messages");
        match self.fault {
            Fault::CutLink { at } if at == k => {
                self.dead = true;
                self.cut_now = true;
                return;
            }
            Fault::Blackhole { at } if at == k => {
                self.dead = true;
                return;
            }
            Fault::Corrupt { at, bit } if at == k => {
                let bit = bit % (bytes.len() * 8);
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
            _ => {}
        }
        to.push(&bytes);
    }
}

struct Run {
    source: Source,
    destination: Destination,
    guest: FakeGuest,
    host: FakeHost,
    frames: usize,
    commit_acks: usize,
    ticks: u64,
    throttled: bool,
    /// With a shared disk: who holds it at the end.
    holder: Option<Holder>,
}

/// Delivers every complete frame in `decoder`; `Err` if the stream broke.
fn receive(decoder: &mut FrameDecoder) -> Result<Vec<Message>, ()> {
    let mut messages = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => messages.push(Message::decode(&frame).map_err(|_| ())?),
            Ok(None) => return Ok(messages),
            Err(_) => return Err(()),
        }
    }
}

fn migrate(seed: u64, writes_per_tick: u64, fault: Fault) -> Run {
    migrate_vm(seed, writes_per_tick, fault, false)
}

/// One migration; `disk`: the VM has a shared disk, which the source holds at the start.
fn migrate_vm(seed: u64, writes_per_tick: u64, fault: Fault, disk: bool) -> Run {
    let mut rng = Rng::seeded(seed);
    let mut guest = FakeGuest::new(&mut rng, PAGES, writes_per_tick);
    let mut host = FakeHost::default();
    if let Fault::WriteFails { at } = fault {
        host.fail_write_at = Some(at);
    }
    if fault == Fault::Refuse {
        host.refuse = Some(RefuseReason::NotEnoughMemory { free_bytes: 4096 });
    }
    let mut config = SourceConfig {
        cpu_features: 0xF,
        ..source_config(PAGES, 8)
    };
    if disk {
        config.vm.disk = Some(crate::message::SharedDisk {
            id: "iqn.2026-11.test.hv:cluster/1".into(),
            sectors: 2048,
        });
    }
    let mut source = Source::new(config).expect("valid source config");
    let mut holder = disk.then_some(Holder::Source);
    let mut quiesce_requested = false;
    let mut takeover_requested = false;
    let mut destination = Destination::new(
        DestinationConfig {
            cpu_features: 0xFF,
            ..destination_config()
        },
        0,
    )
    .expect("valid destination config");
    let mut link = Link {
        fault,
        sent: 0,
        dead: false,
        cut_now: false,
    };
    let mut to_destination = FrameDecoder::new();
    let mut to_source = FrameDecoder::new();
    let mut pause_requested = false;
    let mut in_doubt = false;
    let mut commit_acks = 0;
    let mut throttled = false;
    source.start(0);

    let mut tick = 0;
    while tick < MAX_TICKS {
        let now = tick * TICK_US;
        if fault == (Fault::Cancel { at: tick }) {
            source.cancel(now);
        }
        source.on_tick(now, &mut guest);
        destination.on_tick(now);
        if pause_requested && guest.paused {
            pause_requested = false;
            source.on_paused(now, &mut guest);
        }
        if core::mem::take(&mut quiesce_requested) {
            let result = match fault {
                Fault::QuiesceFails => Err("flush failed".into()),
                _ => Ok(()),
            };
            source.on_disk_quiesced(now, &mut guest, result);
        }
        if takeover_requested && fault != Fault::TakeoverHangs {
            takeover_requested = false;
            let result = match fault {
                Fault::TakeoverFails { after_preempt } => {
                    if after_preempt {
                        holder = Some(Holder::Destination);
                    }
                    Err("preempt failed".into())
                }
                _ => {
                    holder = Some(Holder::Destination);
                    Ok(())
                }
            };
            destination.on_disk_taken(result);
        }
        if in_doubt {
            // The shared authority (owner record / disk reservation): did the destination commit?
            in_doubt = false;
            source.resolve_in_doubt(now, destination.state() == DestinationState::Done);
        }
        // Pump messages until both sides are quiet.
        for _ in 0..8 {
            while let Some(output) = source.poll_output() {
                match output {
                    Output::Send(m) => link.send(&m, &mut to_destination),
                    Output::SendPages(batch) => {
                        let m = batch
                            .to_message(&guest)
                            .expect("the fake guest has every page");
                        link.send(&m, &mut to_destination)
                    }
                    Output::Do(SourceAction::SetThrottle(level)) => {
                        throttled |= level > 0;
                        guest.throttle = level;
                    }
                    Output::Do(SourceAction::PauseVm) => {
                        guest.paused = true;
                        pause_requested = true;
                    }
                    Output::Do(SourceAction::ResumeVm) => {
                        if disk {
                            assert_eq!(holder, Some(Holder::Source), "resumed without the disk");
                        }
                        guest.paused = false;
                        pause_requested = false;
                    }
                    Output::Do(SourceAction::DestroyVm) => guest.destroyed = true,
                    Output::Do(SourceAction::ResolveInDoubt) => in_doubt = true,
                    Output::Do(SourceAction::QuiesceDisk) => {
                        assert!(disk && guest.paused, "quiesce of a running VM");
                        quiesce_requested = true;
                    }
                    Output::Do(SourceAction::ReclaimDisk) => {
                        assert!(disk);
                        holder = Some(Holder::Source);
                    }
                }
            }
            // This harness's link takes every message at once, as a driver's flush would.
            source.on_final_sent(now);
            match receive(&mut to_destination) {
                Ok(messages) => {
                    for m in messages {
                        destination.on_message(now, m, &mut host);
                    }
                }
                Err(()) => destination.fail(AbortReason::ProtocolError, "bad frame"),
            }
            while let Some(output) = destination.poll_output() {
                match output {
                    Output::Send(m) => {
                        if m == Message::CommitAck {
                            commit_acks += 1;
                        }
                        link.send(&m, &mut to_source)
                    }
                    Output::Do(DestinationAction::ResumeVm) => {
                        if disk {
                            assert_eq!(holder, Some(Holder::Destination), "resumed without disk");
                        }
                        host.resumed = true;
                    }
                    Output::Do(DestinationAction::TakeDisk) => {
                        assert!(disk, "takeover without a disk");
                        takeover_requested = true;
                    }
                    Output::Do(DestinationAction::DiscardCopy) => host.discarded = true,
                    Output::Do(DestinationAction::AnnounceMac(mac)) => host.announced = Some(mac),
                    Output::SendPages(_) => panic!("the destination made a page batch"),
                }
            }
            match receive(&mut to_source) {
                Ok(messages) => {
                    for m in messages {
                        source.on_message(now, m, &mut guest);
                    }
                }
                Err(()) => source.fail(now, AbortReason::ProtocolError, "bad frame"),
            }
            if link.cut_now {
                link.cut_now = false;
                source.fail(now, AbortReason::TransportError, "link cut");
                destination.fail(AbortReason::TransportError, "link cut");
            }
        }
        guest.run_slice(&mut rng);
        let source_done = matches!(source.state(), SourceState::Done | SourceState::Failed);
        let destination_done = matches!(
            destination.state(),
            DestinationState::Done | DestinationState::Failed
        );
        if source_done && destination_done && !in_doubt && !pause_requested {
            break;
        }
        tick += 1;
    }
    Run {
        source,
        destination,
        guest,
        host,
        frames: link.sent,
        commit_acks,
        ticks: tick,
        throttled,
        holder,
    }
}

/// The failure rule of the issue, checked on a finished run.
fn check(run: &Run, fault: Fault) {
    let ctx = alloc::format!("{fault:?}, ended at tick {}", run.ticks);
    assert!(run.ticks < MAX_TICKS, "run did not finish: {ctx}");
    assert!(run.commit_acks <= 1, "{ctx}");
    check_outcome(&run.source, &run.destination, &run.guest, &run.host, &ctx);
    if let Some(holder) = run.holder {
        // The disk belongs to whichever node runs the VM.
        let expected = match run.source.state() {
            SourceState::Done => Holder::Destination,
            _ => Holder::Source,
        };
        assert_eq!(holder, expected, "disk held by the wrong node: {ctx}");
    }
}

#[test]
fn idle_and_busy_guests_migrate_and_memory_matches() {
    for seed in 1..=8 {
        for writes in [0, 4, 12] {
            let run = migrate(seed, writes, Fault::None);
            check(&run, Fault::None);
            assert_eq!(run.source.state(), SourceState::Done);
            let s = run.source.summary();
            assert!(s.pages_zero > 0 && s.pages_raw > 0 && s.pages_compressed > 0);
            // The last byte leaves before the acknowledgement comes back.
            let (full, send) = (s.downtime_us().unwrap(), s.send_downtime_us().unwrap());
            assert!(send <= full, "{send} > {full}");
            assert!(s.final_sent_us.unwrap() >= s.paused_us.unwrap());
            assert_eq!(run.destination.pages_received(), {
                s.pages_zero + s.pages_raw + s.pages_compressed
            });
        }
    }
}

#[test]
fn guest_dirtying_faster_than_the_link_is_throttled_and_completes() {
    // 8 pages per tick go out; the guest writes up to 64 a tick.
    let run = migrate(3, 64, Fault::None);
    check(&run, Fault::None);
    assert_eq!(run.source.state(), SourceState::Done);
    assert!(run.throttled, "never throttled");
}

#[test]
fn refusal_ends_before_any_page() {
    let run = migrate(1, 4, Fault::Refuse);
    check(&run, Fault::Refuse);
    assert!(matches!(
        run.source.failure(),
        Some(Failure::Refused(RefuseReason::NotEnoughMemory { .. }))
    ));
    assert!(!run.host.created);
    assert_eq!(run.destination.pages_received(), 0);
}

/// A failure at every frame of a migration, three ways, for several guests.
#[test]
fn failure_at_any_frame_leaves_one_running_copy() {
    let mut runs = 0;
    let mut committed = 0;
    for seed in 1..=2 {
        for writes in [2, 40] {
            let frames = migrate(seed, writes, Fault::None).frames;
            for at in 0..=frames {
                for fault in [
                    Fault::CutLink { at },
                    Fault::Blackhole { at },
                    Fault::Corrupt {
                        at,
                        bit: (seed as usize * 7919 + at * 31) % 4096,
                    },
                ] {
                    let run = migrate(seed, writes, fault);
                    check(&run, fault);
                    runs += 1;
                    if run.source.state() == SourceState::Done {
                        committed += 1;
                    }
                }
            }
        }
    }
    // Failures on the last frames (the commit acknowledgement) still commit.
    assert!(committed > 0 && committed < runs, "{committed} of {runs}");
    std::eprintln!("{runs} failure runs, {committed} committed");
}

#[test]
fn local_failures_and_cancel_at_any_point_leave_the_source_running() {
    let reference = migrate(5, 8, Fault::None);
    let writes = reference.destination.pages_received();
    for at in 0..writes {
        let fault = Fault::WriteFails { at };
        let run = migrate(5, 8, fault);
        check(&run, fault);
        assert_eq!(run.source.state(), SourceState::Failed);
    }
    for at in 0..=reference.ticks {
        let fault = Fault::Cancel { at };
        let run = migrate(5, 8, fault);
        check(&run, fault);
    }
}

#[test]
fn a_shared_disk_moves_with_the_vm() {
    for seed in 1..=4 {
        for writes in [0, 12] {
            let run = migrate_vm(seed, writes, Fault::None, true);
            check(&run, Fault::None);
            assert_eq!(run.source.state(), SourceState::Done);
            assert_eq!(run.holder, Some(Holder::Destination));
        }
    }
}

#[test]
fn disk_failures_at_the_switchover_leave_vm_and_disk_on_the_source() {
    for fault in [
        Fault::QuiesceFails,
        Fault::TakeoverFails {
            after_preempt: false,
        },
        Fault::TakeoverFails {
            after_preempt: true,
        },
        Fault::TakeoverHangs,
    ] {
        let run = migrate_vm(2, 4, fault, true);
        check(&run, fault);
        assert_eq!(run.source.state(), SourceState::Failed, "{fault:?}");
        assert_eq!(run.holder, Some(Holder::Source), "{fault:?}");
        let text = alloc::format!("{:?}", run.source.failure());
        assert!(text.contains("disk") || text.contains("Timeout"), "{text}");
    }
}

/// Every frame lost, blackholed or corrupted, with a shared disk: the disk always ends with the
/// node that runs the VM, and neither node ever runs it without the disk.
#[test]
fn failure_at_any_frame_with_a_shared_disk() {
    let frames = migrate_vm(3, 6, Fault::None, true).frames;
    let mut runs = 0;
    for at in 0..=frames {
        for fault in [
            Fault::CutLink { at },
            Fault::Blackhole { at },
            Fault::Corrupt {
                at,
                bit: (at * 131) % 4096,
            },
        ] {
            let run = migrate_vm(3, 6, fault, true);
            check(&run, fault);
            runs += 1;
        }
    }
    std::eprintln!("{runs} failure runs with a shared disk");
}
