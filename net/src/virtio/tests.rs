//! The virtio-net driver against the fake device ([`super::fake`]): start-up and negotiation,
//! frames through smoltcp's `phy::Device` tokens both ways, counters, bad frames, a full
//! transmit ring, and two interfaces pinging each other over it.

use alloc::rc::Rc;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::phy::{Device as _, RxToken as _, TxToken as _};
use smoltcp::time::Instant;
use virtio_drivers::transport::DeviceStatus;

use super::fake::{self, device, feature, shared_buffers, FakeTransport, HostHal, HostMem};
use super::*;
use crate::addr::{Ipv4, Ipv4Net};
use crate::stack::Stack;

type Nic = VirtioNet<HostHal, FakeTransport, HostMem>;
type Dev = Rc<RefCell<fake::Device>>;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 1, 1];
const T0: Instant = Instant::ZERO;

fn start(mac: [u8; 6]) -> (Dev, Nic) {
    let (dev, transport) = device(mac);
    let nic = VirtioNet::new(transport, HostMem::new(region_bytes())).unwrap();
    (dev, nic)
}

/// An Ethernet frame of `len` bytes to `MAC` (local experimental ethertype), its payload
/// derived from `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    f
}

fn send(nic: &mut Nic, f: &[u8]) {
    let token = nic.transmit(T0).expect("a free transmit buffer");
    token.consume(f.len(), |buf| buf.copy_from_slice(f));
}

/// The next received frame, through the receive token.
fn recv(nic: &mut Nic) -> Option<Vec<u8>> {
    let (rx, _tx) = nic.receive(T0)?;
    Some(rx.consume(|b| b.to_vec()))
}

#[test]
fn starts_negotiates_and_posts_every_receive_buffer() {
    let (dev, mut nic) = start(MAC);
    assert_eq!(nic.mac(), MAC);
    let d = dev.borrow();
    assert!(d.status.contains(
        DeviceStatus::ACKNOWLEDGE
            | DeviceStatus::DRIVER
            | DeviceStatus::FEATURES_OK
            | DeviceStatus::DRIVER_OK
    ));
    // Of what QEMU offers, only what the driver handles: no checksum offload, no merged
    // receive buffers, no control queue.
    assert_eq!(
        d.driver_features,
        feature::MAC
            | feature::STATUS
            | feature::RING_INDIRECT_DESC
            | feature::RING_EVENT_IDX
            | feature::VERSION_1
    );
    assert_eq!(d.queues[fake::RX].size, QUEUE_SIZE as u32);
    assert_eq!(d.queues[fake::TX].size, QUEUE_SIZE as u32);
    assert_eq!(d.pending(fake::RX), QUEUE_SIZE as u16);
    assert_eq!(d.pending(fake::TX), 0);
    drop(d);
    assert_eq!(shared_buffers(), QUEUE_SIZE as isize);
    assert_eq!(nic.ring_sizes(), (QUEUE_SIZE, QUEUE_SIZE));
    assert!(nic.link_up());
    assert_eq!(nic.counters(), Counters::default());
    let caps = nic.capabilities();
    assert_eq!(caps.medium, Medium::Ethernet);
    assert_eq!(caps.max_transmission_unit, MAX_FRAME);
    assert!(!nic.rx_pending());
    assert!(nic.receive(T0).is_none());
}

#[test]
fn refuses_unusable_macs_and_small_regions() {
    for mac in [[0; 6], [0x01, 0, 0x5e, 0, 0, 1], [0xff; 6]] {
        let (_, transport) = device(mac);
        let err = VirtioNet::<HostHal, _, _>::new(transport, HostMem::new(region_bytes()))
            .err()
            .unwrap();
        assert_eq!(err, VirtioError::NoMac { mac });
        assert!(err.to_string().contains("no usable MAC address"));
    }
    let (_, transport) = device(MAC);
    let err = VirtioNet::<HostHal, _, _>::new(transport, HostMem::new(4096))
        .err()
        .unwrap();
    assert_eq!(
        err,
        VirtioError::RegionTooSmall {
            need: region_bytes(),
            have: 4096
        }
    );
    // A device offering smaller queues than the driver's.
    let (dev, transport) = device(MAC);
    dev.borrow_mut().max_queue_size = 64;
    let err = VirtioNet::<HostHal, _, _>::new(transport, HostMem::new(region_bytes()))
        .err()
        .unwrap();
    assert!(matches!(err, VirtioError::Device(_)), "{err:?}");
}

#[test]
fn a_sent_frame_appears_in_the_transmit_queue() {
    let (dev, mut nic) = start(MAC);
    let f = frame(60, 1);
    send(&mut nic, &f);
    assert_eq!(dev.borrow().pending(fake::TX), 1);
    assert!(
        dev.borrow().notifications[fake::TX] >= 1,
        "device not notified"
    );
    assert_eq!(dev.borrow_mut().process_tx(), 1);
    let d = dev.borrow();
    assert_eq!(d.sent, [f]);
    assert_eq!(
        d.sent_headers,
        [vec![0u8; fake::NET_HDR]],
        "no offload asked"
    );
    drop(d);
    let c = nic.counters();
    assert_eq!((c.tx_packets, c.tx_bytes, c.tx_dropped), (1, 60, 0));
    // The sent buffer comes back (and its share ends) when room is next looked for.
    assert_eq!(shared_buffers(), QUEUE_SIZE as isize + 1);
    assert!(nic.transmit(T0).is_some());
    assert_eq!(shared_buffers(), QUEUE_SIZE as isize);
    // A full-size frame.
    let big = frame(MAX_FRAME, 2);
    send(&mut nic, &big);
    dev.borrow_mut().process_tx();
    assert_eq!(dev.borrow().sent[1], big);
}

#[test]
fn received_frames_come_through_the_rx_tokens() {
    let (dev, mut nic) = start(MAC);
    let (a, b) = (frame(60, 1), frame(1514, 2));
    assert!(dev.borrow_mut().deliver(&a));
    assert!(dev.borrow_mut().deliver(&b));
    assert!(nic.rx_pending());
    // The transmit token that comes with a receive token sends (smoltcp answers ARP so).
    let (rx, tx) = nic.receive(T0).unwrap();
    assert_eq!(rx.consume(|f| f.to_vec()), a);
    let reply = frame(42, 3);
    tx.consume(reply.len(), |buf| buf.copy_from_slice(&reply));
    assert_eq!(recv(&mut nic), Some(b.clone()));
    assert_eq!(recv(&mut nic), None);
    assert_eq!(dev.borrow_mut().process_tx(), 1);
    assert_eq!(dev.borrow().sent, [reply]);
    let c = nic.counters();
    assert_eq!((c.rx_packets, c.rx_bytes, c.rx_errors), (2, 60 + 1514, 0));
    assert_eq!(c.tx_packets, 1);
    // Every buffer went straight back to the device.
    assert_eq!(dev.borrow().pending(fake::RX), QUEUE_SIZE as u16);

    // Many times round the ring (the 16-bit ring indices too), one frame at a time and in
    // bursts of a full ring.
    for i in 0..1000u32 {
        let f = frame(60 + (i as usize % 1400), i as u8);
        assert!(dev.borrow_mut().deliver(&f));
        assert_eq!(recv(&mut nic).as_ref(), Some(&f), "frame {i}");
    }
    for round in 0..300u32 {
        let frames: Vec<Vec<u8>> = (0..QUEUE_SIZE)
            .map(|i| frame(60 + i, (round as usize + i) as u8))
            .collect();
        for f in &frames {
            assert!(dev.borrow_mut().deliver(f));
        }
        // The ring is full: the next frame finds no buffer.
        assert!(!dev.borrow_mut().deliver(&frame(60, 0)));
        for f in &frames {
            assert_eq!(recv(&mut nic).as_ref(), Some(f), "round {round}");
        }
    }
    assert_eq!(dev.borrow().missed, 300);
    let c = nic.counters();
    assert_eq!(c.rx_packets, 2 + 1000 + 300 * QUEUE_SIZE as u64);
    assert_eq!(c.rx_errors, 0);
    // Every receive buffer is shared, the reply's transmit buffer until it is reclaimed.
    assert_eq!(shared_buffers(), QUEUE_SIZE as isize + 1);
    assert!(nic.transmit(T0).is_some());
    assert_eq!(shared_buffers(), QUEUE_SIZE as isize);
}

#[test]
fn bad_frames_are_dropped_and_counted() {
    let (dev, mut nic) = start(MAC);
    let good = frame(60, 9);
    let header = vec![0u8; fake::NET_HDR];
    let with_header = |f: &[u8]| [header.as_slice(), f].concat();
    // A runt, a frame over the MTU, a length beyond the buffer, a length shorter than the
    // net header: each dropped and counted, and the good frame behind it still arrives.
    let runt = frame(14, 1)[..10].to_vec();
    let jumbo = frame(1600, 2);
    let cases: [(Vec<u8>, Option<u32>); 4] = [
        (with_header(&runt), None),
        (with_header(&jumbo), None),
        (with_header(&good), Some(5000)),
        (with_header(&good), Some(4)),
    ];
    for (i, (bytes, used_len)) in cases.iter().enumerate() {
        let len = used_len.unwrap_or(bytes.len() as u32);
        assert!(dev.borrow_mut().deliver_raw(bytes, len));
        assert!(dev.borrow_mut().deliver(&good));
        assert_eq!(recv(&mut nic), Some(good.clone()), "case {i}");
        assert_eq!(nic.counters().rx_errors, i as u64 + 1);
    }
    let c = nic.counters();
    assert_eq!((c.rx_packets, c.rx_bytes), (4, 4 * 60));
    assert_eq!(dev.borrow().pending(fake::RX), QUEUE_SIZE as u16);
}

#[test]
fn a_full_transmit_ring_holds_back_then_recovers() {
    let (dev, mut nic) = start(MAC);
    for i in 0..QUEUE_SIZE {
        send(&mut nic, &frame(60, i as u8));
    }
    // No buffer left: smoltcp gets no token (and keeps its data for later).
    assert!(nic.transmit(T0).is_none());
    // A reply through a receive's transmit token has nowhere to go: dropped, counted.
    dev.borrow_mut().deliver(&frame(60, 0));
    let (rx, tx) = nic.receive(T0).unwrap();
    rx.consume(|_| ());
    let filled = tx.consume(42, |buf| {
        buf.fill(7);
        buf.len()
    });
    assert_eq!(filled, 42);
    assert_eq!(nic.counters().tx_dropped, 1);
    // The device catches up; the ring is usable again.
    assert_eq!(dev.borrow_mut().process_tx(), QUEUE_SIZE);
    send(&mut nic, &frame(61, 1));
    assert_eq!(dev.borrow_mut().process_tx(), 1);
    let d = dev.borrow();
    assert_eq!(d.sent.len(), QUEUE_SIZE + 1);
    assert!(d
        .sent
        .iter()
        .take(QUEUE_SIZE)
        .enumerate()
        .all(|(i, f)| *f == frame(60, i as u8)));
    drop(d);
    // A frame over the MTU is dropped, not truncated.
    let token = nic.transmit(T0).unwrap();
    token.consume(MAX_FRAME + 1, |buf| buf.fill(1));
    let c = nic.counters();
    assert_eq!((c.tx_packets, c.tx_dropped), (QUEUE_SIZE as u64 + 1, 2));
    assert_eq!(dev.borrow_mut().process_tx(), 0);
}

#[test]
fn two_interfaces_on_virtio_ping_each_other() {
    let mac_b = [0x52, 0x54, 0, 0, 1, 2];
    let (dev_a, nic_a) = start(MAC);
    let (dev_b, nic_b) = start(mac_b);
    let net = |s| Some(Ipv4Net::parse(s).unwrap());
    let mut a = Stack::new(nic_a, MAC, net("10.10.0.1/24"), T0, 1);
    let mut b = Stack::new(nic_b, mac_b, net("10.10.0.2/24"), T0, 2);
    a.start_ping(Ipv4([10, 10, 0, 2]), "node2", 3, T0).unwrap();
    let mut now = T0;
    let summary = (0..60_000)
        .find_map(|_| {
            now += smoltcp::time::Duration::from_millis(1);
            a.poll(now, 64);
            b.poll(now, 64);
            for (from, to) in [(&dev_a, &dev_b), (&dev_b, &dev_a)] {
                from.borrow_mut().process_tx();
                let frames = core::mem::take(&mut from.borrow_mut().sent);
                for f in frames {
                    to.borrow_mut().deliver(&f);
                }
            }
            a.ping_output(now).1
        })
        .expect("the ping ends");
    assert_eq!((summary.transmitted, summary.received), (3, 3));
    // ARP request and reply, three echo requests and replies.
    let (ca, cb) = (a.device_mut().counters(), b.device_mut().counters());
    assert_eq!((ca.tx_packets, ca.rx_packets), (4, 4));
    assert_eq!((cb.tx_packets, cb.rx_packets), (4, 4));
    assert_eq!(
        ca.rx_errors + cb.rx_errors + ca.tx_dropped + cb.tx_dropped,
        0
    );
}

#[test]
fn models_and_layout() {
    assert_eq!(model(0x1AF4, 0x1000), Some("virtio-net"));
    assert_eq!(model(0x1AF4, 0x1041), Some("virtio-net"));
    assert_eq!(model(0x1AF4, 0x1001), None);
    assert_eq!(model(0x8086, 0x1000), None);
    assert_eq!(tx_offset(0), rx_offset(QUEUE_SIZE));
    assert_eq!(tx_offset(QUEUE_SIZE - 1) + BUF_SIZE, region_bytes());
}
