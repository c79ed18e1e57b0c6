use alloc::string::ToString;
use alloc::vec::Vec;

use smoltcp::phy::{Device, RxToken, TxToken};
use smoltcp::time::Instant;

use super::fake::{device, FakeMem, FakeRegs, Model};
use super::*;
use crate::stack::TxFlush;
use alloc::rc::Rc;
use core::cell::RefCell;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x01, 0x01];

type Nic = E1000<FakeRegs, FakeMem>;

fn small() -> E1000Config {
    E1000Config {
        rx_descriptors: 8,
        tx_descriptors: 8,
    }
}

fn start(config: E1000Config) -> (Rc<RefCell<Model>>, Nic) {
    let (model, regs, rx, tx) = device(MAC, config.rx_descriptors, config.tx_descriptors);
    let nic = E1000::new(regs, rx, tx, config).unwrap();
    (model, nic)
}

/// A small NIC with interrupts on (not throttled), and a second window onto its registers, as
/// the kernel's interrupt handler has.
fn start_with_handler_window() -> (Rc<RefCell<Model>>, FakeRegs, Nic) {
    let (model, regs, rx, tx) = device(MAC, 8, 8);
    let handler_window = regs.clone();
    let mut nic = E1000::new(regs, rx, tx, small()).unwrap();
    nic.enable_interrupts(Duration::ZERO);
    (model, handler_window, nic)
}

fn now() -> Instant {
    Instant::from_millis(0)
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
}

/// Queues one frame, as smoltcp's egress does.
fn queue(nic: &mut Nic, data: &[u8]) -> bool {
    match nic.transmit(now()) {
        Some(tok) => {
            tok.consume(data.len(), |buf| buf.copy_from_slice(data));
            true
        }
        None => false,
    }
}

/// Queues one frame and hands it to the device, as `Stack::poll` does after its egress.
fn send(nic: &mut Nic, data: &[u8]) -> bool {
    let queued = queue(nic, data);
    nic.flush_tx();
    queued
}

fn recv(nic: &mut Nic) -> Option<Vec<u8>> {
    let (rx, _tx) = nic.receive(now())?;
    Some(rx.consume(|b| b.to_vec()))
}

/// A regression test: a full window of our TCP sockets, sent while the node sleeps until its
/// next tick, overran a 256-descriptor ring and stalled transfers for smoltcp's 1 s
/// retransmission timeout. The ring must hold a whole window of full-sized segments with room
/// to spare for other traffic.
#[test]
fn the_receive_ring_holds_a_whole_tcp_window() {
    const SEGMENT: usize = 1460;
    let window_frames = crate::bench::BUFFER.div_ceil(SEGMENT);
    assert!(DEFAULT_RX_RING_LEN >= 2 * window_frames);
}

#[test]
fn start_up_programs_the_device() {
    let (model, nic) = start(E1000Config::default());
    assert_eq!(nic.mac(), MAC);
    assert_eq!(nic.mac_source(), MacSource::Registers);
    assert_eq!(nic.ring_sizes(), (DEFAULT_RX_RING_LEN, DEFAULT_RING_LEN));
    assert!(nic.link_up());
    let m = model.borrow();
    assert_eq!(m.reg(regs::RDBAL), 0x10_0000);
    assert_eq!(m.reg(regs::RDLEN), DEFAULT_RX_RING_LEN as u32 * 16);
    assert_eq!(m.reg(regs::RDT), DEFAULT_RX_RING_LEN as u32 - 1);
    assert_eq!(m.reg(regs::TDBAL), 0x80_0000);
    assert_eq!((m.reg(regs::TDH), m.reg(regs::TDT)), (0, 0));
    let rctl = m.reg(regs::RCTL);
    assert_ne!(rctl & regs::rctl::EN, 0);
    assert_ne!(rctl & regs::rctl::BAM, 0);
    assert_ne!(rctl & regs::rctl::SECRC, 0);
    assert_ne!(m.reg(regs::TCTL) & regs::tctl::EN, 0);
    assert_ne!(m.reg(regs::CTRL) & regs::ctrl::SLU, 0);
    assert_eq!(m.reg(regs::CTRL) & regs::ctrl::RST, 0);
    assert_eq!(m.reg(regs::IMS), 0, "interrupts stay masked");
    // Receive descriptors point at their buffers, after the descriptor array.
    let rx = &m.memory[0];
    let buffers = 0x10_0000 + DEFAULT_RX_RING_LEN as u64 * 16;
    assert_eq!(rx.read_u64(0), buffers);
    assert_eq!(rx.read_u64(16), buffers + 2048);
    assert_eq!(rx.read_u64(8), 0);
}

#[test]
fn mac_comes_from_the_eeprom_when_the_registers_read_zero() {
    let (model, regs, rx, tx) = device(MAC, 8, 8);
    model.borrow_mut().ra_from_eeprom_on_reset = false;
    let nic = E1000::new(regs, rx, tx, small()).unwrap();
    assert_eq!(nic.mac(), MAC);
    assert_eq!(nic.mac_source(), MacSource::Eeprom);
    let m = model.borrow();
    assert_eq!(m.reg(regs::RAL0), 0x0000_5452);
    assert_eq!(m.reg(regs::RAH0), 0x8000_0101);
}

#[test]
fn start_up_failures_are_errors() {
    // Blank EEPROM.
    let (model, regs, rx, tx) = device(MAC, 8, 8);
    model.borrow_mut().ra_from_eeprom_on_reset = false;
    model.borrow_mut().eeprom = [0; 64];
    assert!(matches!(
        E1000::new(regs, rx, tx, small()),
        Err(E1000Error::NoMac {
            mac: [0, 0, 0, 0, 0, 0]
        })
    ));
    // Multicast MAC in the EEPROM.
    let (model, regs, rx, tx) = device([0x01, 0, 0, 0, 0, 1], 8, 8);
    model.borrow_mut().ra_from_eeprom_on_reset = false;
    assert!(matches!(
        E1000::new(regs, rx, tx, small()),
        Err(E1000Error::NoMac { .. })
    ));
    // EEPROM that never answers.
    let (model, regs, rx, tx) = device(MAC, 8, 8);
    model.borrow_mut().ra_from_eeprom_on_reset = false;
    model.borrow_mut().eeprom_stuck = true;
    assert_eq!(
        E1000::new(regs, rx, tx, small()).err(),
        Some(E1000Error::EepromTimeout { word: 0 })
    );
    // Reset that never completes.
    let (model, regs, rx, tx) = device(MAC, 8, 8);
    model.borrow_mut().reset_reads = u32::MAX;
    assert_eq!(
        E1000::new(regs, rx, tx, small()).err(),
        Some(E1000Error::ResetTimeout)
    );
    // Bad ring sizes and regions.
    let (_, regs, rx, tx) = device(MAC, 8, 8);
    let bad = E1000Config {
        rx_descriptors: 12,
        tx_descriptors: 8,
    };
    assert_eq!(
        E1000::new(regs.clone(), rx.clone(), tx.clone(), bad).err(),
        Some(E1000Error::Ring(RingError::BadLength(12)))
    );
    assert_eq!(
        E1000::new(regs.clone(), rx.clone(), tx.clone(), E1000Config::default()).err(),
        Some(E1000Error::RegionTooSmall {
            need: region_bytes(DEFAULT_RX_RING_LEN),
            have: region_bytes(8)
        })
    );
    let odd = FakeMem::new(0x10_0008, region_bytes(8));
    assert_eq!(
        E1000::new(regs, odd, tx, small()).err(),
        Some(E1000Error::RegionMisaligned { addr: 0x10_0008 })
    );
    for e in [
        E1000Error::ResetTimeout,
        E1000Error::NoMac { mac: MAC },
        E1000Error::Ring(RingError::BadLength(3)),
    ] {
        assert!(!alloc::format!("{e}").is_empty());
    }
}

#[test]
fn transmit_puts_frames_on_the_wire_in_order() {
    let (model, mut nic) = start(small());
    for i in 0..20u8 {
        assert!(send(&mut nic, &frame(i, 60 + usize::from(i))));
    }
    let m = model.borrow();
    assert_eq!(m.sent.len(), 20);
    for (i, f) in m.sent.iter().enumerate() {
        assert_eq!(f, &frame(i as u8, 60 + i));
    }
    // 20 frames through an 8-descriptor ring: the tail wrapped.
    assert_eq!(m.reg(regs::TDT), 20 % 8);
    assert_eq!(m.tdt_writes, 1 + 20, "one at start-up, one per frame");
    drop(m);
    let c = nic.counters();
    assert_eq!(c.tx_packets, 20);
    assert_eq!(c.tx_bytes, (0..20).map(|i| 60 + i).sum::<u64>());
    assert_eq!(c.tx_dropped, 0);
}

#[test]
fn a_burst_is_handed_over_with_one_tail_write() {
    let (model, mut nic) = start(small());
    for i in 0..5u8 {
        assert!(queue(&mut nic, &frame(i, 60)));
    }
    assert!(model.borrow().sent.is_empty(), "sent before the flush");
    assert_eq!(model.borrow().tdt_writes, 1);
    nic.flush_tx();
    assert_eq!(model.borrow().sent.len(), 5);
    assert_eq!(model.borrow().tdt_writes, 2);
    nic.flush_tx();
    assert_eq!(
        model.borrow().tdt_writes,
        2,
        "nothing queued, nothing written"
    );
    // More than the ring holds: a full ring is flushed to make room, nothing is lost.
    for i in 0..20u8 {
        assert!(queue(&mut nic, &frame(i, 64)));
    }
    nic.flush_tx();
    let m = model.borrow();
    assert_eq!(m.sent.len(), 25);
    for (i, f) in m.sent[5..].iter().enumerate() {
        assert_eq!(f, &frame(i as u8, 64));
    }
    assert!(m.tdt_writes < 2 + 20, "{} tail writes", m.tdt_writes);
}

#[test]
fn a_full_transmit_ring_refuses_then_recovers() {
    let (model, mut nic) = start(small());
    model.borrow_mut().tx_stalled = true;
    let mut accepted = 0;
    while send(&mut nic, &frame(1, 64)) {
        accepted += 1;
        assert!(accepted < 100);
    }
    assert_eq!(accepted, 7, "one slot stays empty");
    // A reply token obtained with a received frame still drops cleanly when the ring is full.
    model.borrow_mut().deliver(&frame(9, 64));
    let (rx, tx) = nic.receive(now()).unwrap();
    rx.consume(|_| ());
    tx.consume(64, |buf| buf.fill(0));
    assert_eq!(nic.counters().tx_dropped, 1);
    model.borrow_mut().unstall_tx();
    assert_eq!(model.borrow().sent.len(), 7);
    assert!(send(&mut nic, &frame(2, 64)));
    assert_eq!(model.borrow().sent.len(), 8);
}

#[test]
fn bad_transmit_lengths_are_dropped_not_sent() {
    let (model, mut nic) = start(small());
    let tok = nic.transmit(now()).unwrap();
    tok.consume(0, |buf| assert!(buf.is_empty()));
    let tok = nic.transmit(now()).unwrap();
    tok.consume(BUF_SIZE + 1, |buf| assert_eq!(buf.len(), BUF_SIZE + 1));
    assert!(model.borrow().sent.is_empty());
    assert_eq!(nic.counters().tx_dropped, 2);
    assert!(send(&mut nic, &frame(3, 1514)));
    assert_eq!(model.borrow().sent[0].len(), 1514);
}

#[test]
fn receive_hands_up_frames_and_gives_descriptors_back() {
    let (model, mut nic) = start(small());
    assert!(recv(&mut nic).is_none());
    assert!(!nic.rx_pending());
    // Many more frames than descriptors, in batches.
    let mut expected = 0u32;
    for batch in 0..50u32 {
        let n = batch % 7 + 1;
        for k in 0..n {
            let f = frame((expected + k) as u8, 60 + ((expected + k) % 1400) as usize);
            assert!(model.borrow_mut().deliver(&f));
        }
        assert!(nic.rx_pending());
        for _ in 0..n {
            let got = recv(&mut nic).unwrap();
            assert_eq!(got, frame(expected as u8, 60 + (expected % 1400) as usize));
            expected += 1;
        }
        assert!(recv(&mut nic).is_none());
    }
    let c = nic.counters();
    assert_eq!(c.rx_packets, u64::from(expected));
    assert_eq!(c.rx_errors, 0);
    // One tail write at start-up, then one per drained burst, not one per frame.
    assert_eq!(model.borrow().rdt_writes, 1 + 50);
}

#[test]
fn a_full_receive_ring_counts_missed_frames() {
    let (model, mut nic) = start(small());
    let delivered = (0..10)
        .filter(|&i| model.borrow_mut().deliver(&frame(i, 64)))
        .count();
    assert_eq!(delivered, 7);
    let c = nic.counters();
    assert_eq!(c.rx_missed, 3);
    for i in 0..7 {
        assert_eq!(recv(&mut nic).unwrap(), frame(i, 64));
    }
    assert!(recv(&mut nic).is_none());
    // Room again.
    assert!(model.borrow_mut().deliver(&frame(42, 64)));
    assert_eq!(recv(&mut nic).unwrap(), frame(42, 64));
    assert_eq!(nic.counters().rx_missed, 3);
}

#[test]
fn damaged_and_chained_frames_are_dropped_and_counted() {
    let (model, mut nic) = start(small());
    {
        let mut m = model.borrow_mut();
        m.error_next = desc::rx_errors::CE;
        assert!(m.deliver(&frame(1, 64)));
        m.chain_next = true;
        assert!(m.deliver(&frame(2, 200)));
        m.bad_length_next = Some(4000);
        assert!(m.deliver(&frame(3, 64)));
        m.bad_length_next = Some(0);
        assert!(m.deliver(&frame(4, 64)));
        // Checksum-offload error bits alone: still a good frame.
        m.error_next = 0x60;
        assert!(m.deliver(&frame(5, 64)));
    }
    assert_eq!(recv(&mut nic).unwrap(), frame(5, 64));
    assert!(recv(&mut nic).is_none());
    let c = nic.counters();
    assert_eq!((c.rx_packets, c.rx_errors), (1, 4));
    // Every descriptor came back: the ring takes a full load again.
    for i in 0..7 {
        assert!(model.borrow_mut().deliver(&frame(i, 64)));
    }
    for i in 0..7 {
        assert_eq!(recv(&mut nic).unwrap(), frame(i, 64));
    }
}

#[test]
fn garbage_in_every_descriptor_never_panics() {
    let (model, mut nic) = start(small());
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..200 {
        // The device (or a bug) scribbles over descriptor word 1 of every receive slot.
        {
            let m = model.borrow();
            let mut rx = m.memory[0].clone();
            for i in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                rx.write_u64(i * 16 + 8, x);
            }
        }
        for _ in 0..20 {
            match nic.receive(now()) {
                Some((rx, _)) => {
                    let len = rx.consume(|b| b.len());
                    assert!((1..=BUF_SIZE).contains(&len), "round {round}: {len}");
                }
                None => break,
            }
        }
    }
}

#[test]
fn capabilities_are_ethernet() {
    let (_, nic) = start(small());
    let caps = nic.capabilities();
    assert_eq!(caps.medium, Medium::Ethernet);
    assert_eq!(caps.max_transmission_unit, 1514);
    assert_eq!(model(0x8086, 0x100E), Some("82540EM"));
    assert_eq!(model(0x8086, 0x10D3), None);
    assert_eq!(model(0x1AF4, 0x100E), None);
    assert_eq!(Mac(MAC).to_string(), "52:54:00:00:01:01");
}

#[test]
fn interrupts_stay_masked_until_the_owner_asks() {
    let (model, mut nic) = start(small());
    assert_eq!(nic.interrupt_mask(), 0);
    assert!(model.borrow_mut().deliver(&frame(1, 64)));
    // The cause is latched, but masked: the line stays low.
    assert!(!model.borrow().line_asserted());
    assert_eq!(recv(&mut nic).unwrap(), frame(1, 64));
}

#[test]
fn a_stored_frame_raises_the_line_until_the_causes_are_read() {
    let (model, mut nic) = start(small());
    nic.enable_interrupts(Duration::ZERO);
    assert_eq!(nic.interrupt_mask(), RX_INTERRUPTS);
    assert_eq!(model.borrow().reg(regs::ITR), 0);
    assert!(!model.borrow().line_asserted());

    assert!(model.borrow_mut().deliver(&frame(1, 64)));
    assert!(model.borrow().line_asserted());
    // A second frame before the acknowledgement: still one level, one cause.
    assert!(model.borrow_mut().deliver(&frame(2, 64)));
    let causes = nic.take_interrupt_causes();
    assert_eq!(causes, Causes(regs::int::RXT0));
    assert!(causes.received() && !causes.overrun() && !causes.link_changed());
    assert!(!model.borrow().line_asserted());
    assert!(nic.take_interrupt_causes().is_empty());
    // The frames are the poll's, as before.
    assert_eq!(recv(&mut nic).unwrap(), frame(1, 64));
    assert_eq!(recv(&mut nic).unwrap(), frame(2, 64));
}

/// The kernel's interrupt handler cannot reach the driver: it reads ICR through a second
/// window onto the same registers.
#[test]
fn an_interrupt_handler_acknowledges_through_its_own_window() {
    let (model, handler_window, mut nic) = start_with_handler_window();
    assert!(model.borrow_mut().deliver(&frame(1, 64)));
    assert!(model.borrow().line_asserted());
    assert!(take_causes(&handler_window).received());
    assert!(!model.borrow().line_asserted());
    assert!(take_causes(&handler_window).is_empty());
    assert_eq!(recv(&mut nic).unwrap(), frame(1, 64));
}

/// The handler masks what it acknowledged; a frame that arrives while masked raises no line
/// until the poll loop re-arms, and then at once (so a frame that came while masked still
/// wakes a sleeping node).
#[test]
fn a_masked_nic_raises_its_line_again_only_when_rearmed() {
    let (model, handler_window, mut nic) = start_with_handler_window();
    assert!(model.borrow_mut().deliver(&frame(1, 64)));
    assert!(take_causes(&handler_window).received());
    mask_interrupts(&handler_window);
    assert!(model.borrow_mut().deliver(&frame(2, 64)));
    assert!(!model.borrow().line_asserted(), "masked: no line");
    arm_interrupts(&handler_window);
    assert!(
        model.borrow().line_asserted(),
        "re-armed with a latched cause: the line at once"
    );
    assert!(take_causes(&handler_window).received());
    assert!(!model.borrow().line_asserted());
    assert_eq!(recv(&mut nic).unwrap(), frame(1, 64));
    assert_eq!(recv(&mut nic).unwrap(), frame(2, 64));
}

#[test]
fn causes_latched_before_enabling_do_not_raise_the_line() {
    let (model, mut nic) = start(small());
    assert!(model.borrow_mut().deliver(&frame(1, 64)));
    nic.enable_interrupts(Duration::ZERO);
    assert!(!model.borrow().line_asserted());
    // The frame is still there for the poll.
    assert!(nic.rx_pending());
    assert_eq!(recv(&mut nic).unwrap(), frame(1, 64));
}

#[test]
fn a_filling_ring_and_an_overrun_are_causes() {
    let (model, mut nic) = start(small());
    nic.enable_interrupts(Duration::ZERO);
    // 8 descriptors, 7 free: the third frame leaves 4 free, half the ring.
    for i in 0..2 {
        assert!(model.borrow_mut().deliver(&frame(i, 64)));
    }
    assert_eq!(nic.take_interrupt_causes(), Causes(regs::int::RXT0));
    assert!(model.borrow_mut().deliver(&frame(2, 64)));
    assert_eq!(
        nic.take_interrupt_causes(),
        Causes(regs::int::RXT0 | regs::int::RXDMT0)
    );
    for i in 3..7 {
        assert!(model.borrow_mut().deliver(&frame(i, 64)));
    }
    assert_eq!(nic.take_interrupt_causes(), Causes(regs::int::RXT0));
    assert!(!model.borrow_mut().deliver(&frame(7, 64)));
    let causes = nic.take_interrupt_causes();
    assert_eq!(causes, Causes(regs::int::RXO));
    assert!(causes.overrun() && causes.received(), "{causes}");
    assert_eq!(nic.counters().rx_missed, 1);
}

#[test]
fn a_link_change_is_a_cause() {
    let (model, mut nic) = start(small());
    nic.enable_interrupts(Duration::ZERO);
    model.borrow_mut().set_link(false);
    assert!(model.borrow().line_asserted());
    let causes = nic.take_interrupt_causes();
    assert!(causes.link_changed() && !causes.received());
    assert!(!nic.link_up());
}

#[test]
fn disabling_masks_every_cause_and_clears_the_latched_ones() {
    let (model, mut nic) = start(small());
    nic.enable_interrupts(Duration::ZERO);
    assert!(model.borrow_mut().deliver(&frame(1, 64)));
    assert!(model.borrow().line_asserted());
    nic.disable_interrupts();
    assert!(!model.borrow().line_asserted());
    assert_eq!(nic.interrupt_mask(), 0);
    assert!(model.borrow_mut().deliver(&frame(2, 64)));
    assert!(!model.borrow().line_asserted());
    // The device's own interrupt cause set register (ICS) is masked just the same.
    FakeRegs(model.clone()).write32(regs::ICS, regs::int::RXT0);
    assert!(!model.borrow().line_asserted());
}

#[test]
fn throttling_is_programmed_in_256_ns_units() {
    assert_eq!(throttle_value(Duration::ZERO), 0);
    assert_eq!(throttle_value(Duration::from_nanos(255)), 0);
    assert_eq!(throttle_value(Duration::from_micros(100)), 390);
    assert_eq!(throttle_value(Duration::from_secs(1)), 0xFFFF);
    let (model, mut nic) = start(small());
    nic.enable_interrupts(Duration::from_micros(50));
    assert_eq!(model.borrow().reg(regs::ITR), 195);
}

#[test]
fn causes_have_names_for_the_log() {
    assert_eq!(Causes(0).to_string(), "none");
    assert!(!Causes(regs::int::TXDW | regs::int::TXQE).unmasked());
    assert!(Causes(regs::int::TXDW | regs::int::LSC).unmasked());
    assert_eq!(
        Causes(regs::int::RXT0 | regs::int::LSC).to_string(),
        "LSC+RXT0"
    );
    assert_eq!(Causes(regs::int::RXO | 1 << 20).to_string(), "RXO+0x100000");
}
