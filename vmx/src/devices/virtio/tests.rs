//! Host tests of virtio-blk: a fake guest memory (the shared `test_ram::Ram`, with helpers), a
//! fake driver that sets the device up and fills its rings the way a real legacy driver does,
//! and a fake backend that holds the disk in a `Vec` and completes when the test says so (so
//! completions are really asynchronous).

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use super::blk::*;
use super::queue::{SplitQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use super::test_ram::Ram;
use super::*;
use crate::devices::pci::{PciFunction, COMMAND_INTX_DISABLE, COMMAND_IO};
use crate::guest_mem::GuestMemory;

impl Ram {
    fn new() -> Ram {
        Ram(vec![0; RAM_BYTES])
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        assert!(self.read(gpa, &mut b));
        u16::from_le_bytes(b)
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.read(gpa, &mut b));
        u32::from_le_bytes(b)
    }

    fn bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.0[gpa as usize..gpa as usize + len].to_vec()
    }
}

const RAM_BYTES: usize = 4 << 20;
const QUEUE_PFN: u32 = 0x10; // rings at 64 KiB
const HEADERS: u64 = 0x2_0000; // request headers, 16 bytes each
const STATUSES: u64 = 0x2_8000; // one status byte per request
const BUFFERS: u64 = 0x4_0000; // data
const CAPACITY: u64 = 2048; // 1 MiB disk

/// A legacy driver: just enough to set the device up and to put chains in its ring.
struct Driver {
    size: u16,
    queue: SplitQueue,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    /// Heads submitted and not yet returned, with the descriptors each holds.
    chains: BTreeMap<u16, Vec<u16>>,
}

/// One buffer of a request: (guest address, length, device writes it).
type Buf = (u64, u32, bool);

impl Driver {
    /// Resets the device, negotiates `features` (masked by what it offers), sets up queue 0
    /// and sets DRIVER_OK: the legacy sequence of virtio 1.x 4.1.5.1.1 / 3.1.
    fn init(dev: &mut VirtioBlk, mem: &mut Ram, features: u32) -> Driver {
        let mut out = Vec::new();
        dev.pci_mut().set_bar(0, 0xC000);
        dev.pci_mut().set_command(COMMAND_IO);
        dev.io_write(mem, REG_STATUS, 1, 0, &mut out);
        dev.io_write(mem, REG_STATUS, 1, u32::from(STATUS_ACKNOWLEDGE), &mut out);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        dev.io_write(mem, REG_STATUS, 1, u32::from(s), &mut out);
        let offered = dev.io_read(REG_HOST_FEATURES, 4);
        dev.io_write(mem, REG_GUEST_FEATURES, 4, offered & features, &mut out);
        dev.io_write(mem, REG_QUEUE_SEL, 2, 0, &mut out);
        let size = dev.io_read(REG_QUEUE_NUM, 2) as u16;
        assert!(size > 0);
        // Zero the ring pages, as a driver allocating them would.
        let bytes = SplitQueue::legacy_bytes(size) as usize;
        let base = u64::from(QUEUE_PFN) << 12;
        assert!(mem.write(base, &vec![0u8; bytes]));
        dev.io_write(mem, REG_QUEUE_PFN, 4, QUEUE_PFN, &mut out);
        dev.io_write(
            mem,
            REG_STATUS,
            1,
            u32::from(s | STATUS_DRIVER_OK),
            &mut out,
        );
        assert!(out.is_empty());
        Driver {
            size,
            queue: SplitQueue::legacy(QUEUE_PFN, size),
            free: (0..size).rev().collect(),
            avail_idx: 0,
            last_used: 0,
            chains: BTreeMap::new(),
        }
    }

    fn write_desc(mem: &mut Ram, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        assert!(mem.write(table + 16 * u64::from(i), &raw));
    }

    /// Chains `bufs` in free descriptors and makes the chain available (no notify).
    fn queue_chain(&mut self, mem: &mut Ram, bufs: &[Buf]) -> u16 {
        let descs: Vec<u16> = (0..bufs.len())
            .map(|_| self.free.pop().expect("ring full"))
            .collect();
        let (table, _, _) = self.queue.areas();
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if w { DESC_F_WRITE } else { 0 };
            let next = descs.get(k + 1).copied().unwrap_or(0);
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            Self::write_desc(mem, table, descs[k], addr, len, flags, next);
        }
        let head = descs[0];
        self.publish(mem, head);
        self.chains.insert(head, descs);
        head
    }

    /// Puts `head` in the available ring and bumps its index.
    fn publish(&mut self, mem: &mut Ram, head: u16) {
        let (_, avail, _) = self.queue.areas();
        let slot = avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        assert!(mem.write(slot, &head.to_le_bytes()));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        assert!(mem.write(avail + 2, &self.avail_idx.to_le_bytes()));
    }

    fn notify(dev: &mut VirtioBlk, mem: &mut Ram) -> Vec<BlockRequest> {
        let mut out = Vec::new();
        dev.io_write(mem, REG_QUEUE_NOTIFY, 2, 0, &mut out);
        out
    }

    /// Queues a request (header in slot `n`, status byte `n`) and notifies.
    fn submit(
        &mut self,
        dev: &mut VirtioBlk,
        mem: &mut Ram,
        n: u64,
        kind: u32,
        sector: u64,
        data: &[Buf],
    ) -> (u16, Vec<BlockRequest>) {
        let hdr = HEADERS + 16 * n;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        assert!(mem.write(hdr, &h));
        assert!(mem.write(STATUSES + n, &[0xEE]));
        let mut bufs = vec![(hdr, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUSES + n, 1, true));
        let head = self.queue_chain(mem, &bufs);
        (head, Self::notify(dev, mem))
    }

    /// Used elements the device returned since the last call: (head, len).
    fn reap(&mut self, mem: &Ram) -> Vec<(u16, u32)> {
        let (_, _, used) = self.queue.areas();
        let idx = mem.u16_at(used + 2);
        let mut done = Vec::new();
        while self.last_used != idx {
            let slot = used + 4 + 8 * u64::from(self.last_used % self.size);
            let head = mem.u32_at(slot) as u16;
            let len = mem.u32_at(slot + 4);
            if let Some(descs) = self.chains.remove(&head) {
                self.free.extend(descs);
            }
            done.push((head, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        done
    }
}

/// A disk in a `Vec`: does what a request asks, when the test says so.
struct Disk(Vec<u8>);

impl Disk {
    fn new() -> Disk {
        Disk(vec![0; (CAPACITY * 512) as usize])
    }

    fn run(&mut self, req: &BlockRequest) -> Result<Vec<u8>, BlockError> {
        match &req.kind {
            RequestKind::Read { sector, len } => {
                let at = (*sector * 512) as usize;
                Ok(self.0[at..at + *len as usize].to_vec())
            }
            RequestKind::Write { sector, data } => {
                let at = (*sector * 512) as usize;
                self.0[at..at + data.len()].copy_from_slice(data);
                Ok(Vec::new())
            }
            RequestKind::Flush => Ok(Vec::new()),
            RequestKind::GetId => Ok(b"hv-ramdisk-0001".to_vec()),
        }
    }

    /// Runs and completes every request.
    fn serve(&mut self, dev: &mut VirtioBlk, mem: &mut Ram, reqs: &[BlockRequest]) {
        for r in reqs {
            let result = self.run(r);
            dev.complete(mem, r.id, result.as_deref().map_err(|e| *e))
                .unwrap();
        }
    }
}

fn device() -> VirtioBlk {
    VirtioBlk::new(BlkConfig::new(CAPACITY)).unwrap()
}

fn setup() -> (VirtioBlk, Ram, Driver) {
    let mut dev = device();
    let mut mem = Ram::new();
    let drv = Driver::init(&mut dev, &mut mem, u32::MAX);
    (dev, mem, drv)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn pci_identity_and_bar() {
    let mut dev = device();
    assert_eq!(dev.config_read(0, 4), 0x1001_1AF4);
    assert_eq!(dev.config_read(0x2C, 4), 0x0002_1AF4);
    assert_eq!(dev.config_read(0x08, 4) >> 8, 0x01_0000);
    assert_eq!(dev.config_read(0x3D, 1), 1);
    // Not decoding until I/O is enabled and BAR0 assigned.
    assert_eq!(dev.io_base(), None);
    dev.config_write(0x10, 4, 0xFFFF_FFFF);
    assert_eq!(dev.config_read(0x10, 4), 0xFFC1);
    dev.config_write(0x04, 2, u32::from(COMMAND_IO));
    // Mid-sizing with decoding on, the BAR sits at its size mask, as on hardware (which is why
    // drivers size BARs with decoding off).
    assert_eq!(dev.io_base(), Some(0xFFC0));
    dev.config_write(0x10, 4, 0);
    assert_eq!(dev.io_base(), None);
    dev.config_write(0x10, 4, 0xC040);
    assert_eq!(dev.io_base(), Some(0xC040));
    dev.config_write(0x04, 2, 0);
    assert_eq!(dev.io_base(), None);
}

#[test]
fn register_file() {
    let mut dev = device();
    let mut mem = Ram::new();
    let mut out = Vec::new();
    let f = dev.io_read(REG_HOST_FEATURES, 4);
    assert_eq!(
        f,
        F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_RING_INDIRECT_DESC
    );
    assert_eq!(dev.io_read(REG_QUEUE_NUM, 2), 128);
    dev.io_write(&mut mem, REG_QUEUE_SEL, 2, 1, &mut out);
    assert_eq!(dev.io_read(REG_QUEUE_SEL, 2), 1);
    assert_eq!(dev.io_read(REG_QUEUE_NUM, 2), 0, "only queue 0 exists");
    // An address for a queue that does not exist is ignored.
    dev.io_write(&mut mem, REG_QUEUE_PFN, 4, 0x55, &mut out);
    assert_eq!(dev.io_read(REG_QUEUE_PFN, 4), 0);
    dev.io_write(&mut mem, REG_QUEUE_SEL, 2, 0, &mut out);
    // Guest features are cut to what is offered.
    dev.io_write(&mut mem, REG_GUEST_FEATURES, 4, u32::MAX, &mut out);
    assert_eq!(dev.io_read(REG_GUEST_FEATURES, 4), f);
    // Device configuration: capacity, size_max, seg_max, blk_size.
    let cap = u64::from(dev.io_read(REG_DEVICE_CONFIG, 4))
        | u64::from(dev.io_read(REG_DEVICE_CONFIG + 4, 4)) << 32;
    assert_eq!(cap, CAPACITY);
    assert_eq!(dev.io_read(REG_DEVICE_CONFIG + 8, 4), 65536);
    assert_eq!(dev.io_read(REG_DEVICE_CONFIG + 12, 4), 16);
    assert_eq!(dev.io_read(REG_DEVICE_CONFIG + 20, 4), 512);
    assert_eq!(
        dev.io_read(REG_DEVICE_CONFIG + 1, 1),
        (CAPACITY >> 8) as u32
    );
    // Config writes are ignored; past the BAR reads float.
    dev.io_write(&mut mem, REG_DEVICE_CONFIG, 4, 0, &mut out);
    assert_eq!(dev.io_read(REG_DEVICE_CONFIG, 4), CAPACITY as u32);
    assert_eq!(dev.io_read(BAR_SIZE - 2, 4), 0xFFFF_0000);
    // Status: NEEDS_RESET cannot be set by the driver; bits outside the spec are dropped.
    dev.io_write(&mut mem, REG_STATUS, 1, 0x7F, &mut out);
    assert_eq!(dev.io_read(REG_STATUS, 1), 0x0F);
    dev.io_write(&mut mem, REG_STATUS, 1, 0, &mut out);
    assert_eq!(dev.io_read(REG_STATUS, 1), 0);
    assert_eq!(dev.io_read(REG_GUEST_FEATURES, 4), 0);
    assert!(out.is_empty());
}

#[test]
fn write_then_read_back() {
    let (mut dev, mut mem, mut drv) = setup();
    let mut disk = Disk::new();
    let data = pattern(7, 4096);
    assert!(mem.write(BUFFERS, &data));
    let (head, reqs) = drv.submit(&mut dev, &mut mem, 0, T_OUT, 100, &[(BUFFERS, 4096, false)]);
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].kind,
        RequestKind::Write {
            sector: 100,
            data: data.clone()
        }
    );
    assert_eq!(dev.in_flight(), 1);
    // Nothing is returned before the backend completes.
    assert!(drv.reap(&mem).is_empty());
    assert_eq!(mem.bytes(STATUSES, 1), [0xEE]);
    disk.serve(&mut dev, &mut mem, &reqs);
    assert_eq!(dev.in_flight(), 0);
    assert_eq!(drv.reap(&mem), [(head, 1)]);
    assert_eq!(mem.bytes(STATUSES, 1), [S_OK]);
    assert_eq!(&disk.0[100 * 512..100 * 512 + 4096], &data[..]);
    assert!(dev.interrupt_pending());
    assert_eq!(dev.io_read(REG_ISR, 1), u32::from(ISR_QUEUE));
    assert_eq!(dev.io_read(REG_ISR, 1), 0, "reading the ISR clears it");
    assert!(!dev.interrupt_pending());

    // Read it back into two buffers.
    let dst = BUFFERS + 0x10000;
    let (head, reqs) = drv.submit(
        &mut dev,
        &mut mem,
        1,
        T_IN,
        100,
        &[(dst, 1024, true), (dst + 0x2000, 3072, true)],
    );
    assert_eq!(
        reqs[0].kind,
        RequestKind::Read {
            sector: 100,
            len: 4096
        }
    );
    disk.serve(&mut dev, &mut mem, &reqs);
    assert_eq!(drv.reap(&mem), [(head, 4097)]);
    assert_eq!(mem.bytes(STATUSES + 1, 1), [S_OK]);
    assert_eq!(mem.bytes(dst, 1024), data[..1024]);
    assert_eq!(mem.bytes(dst + 0x2000, 3072), data[1024..]);
    let s = dev.stats();
    assert_eq!(
        (s.reads, s.writes, s.read_bytes, s.write_bytes),
        (1, 1, 4096, 4096)
    );
}

#[test]
fn completions_out_of_order() {
    let (mut dev, mut mem, mut drv) = setup();
    let mut disk = Disk::new();
    let mut all = Vec::new();
    let mut heads = Vec::new();
    // Queue three chains before one notify, as a driver batching requests does.
    for n in 0..3u64 {
        let hdr = HEADERS + 16 * n;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&(n * 8).to_le_bytes());
        assert!(mem.write(hdr, &h));
        heads.push(drv.queue_chain(
            &mut mem,
            &[
                (hdr, 16, false),
                (BUFFERS + n * 4096, 4096, true),
                (STATUSES + n, 1, true),
            ],
        ));
    }
    all.extend(Driver::notify(&mut dev, &mut mem));
    assert_eq!(all.len(), 3);
    assert_eq!(dev.in_flight(), 3);
    assert_eq!(dev.in_flight_bytes(), 3 * 4096);
    // Complete 2, 0, 1.
    for &i in &[2usize, 0, 1] {
        disk.serve(&mut dev, &mut mem, &all[i..=i]);
    }
    let done: Vec<u16> = drv.reap(&mem).iter().map(|d| d.0).collect();
    assert_eq!(done, [heads[2], heads[0], heads[1]]);
    // A second completion of the same request is refused and changes nothing.
    let used_before = mem.bytes(0x11000, 64);
    assert_eq!(
        dev.complete(&mut mem, all[0].id, Ok(&[0u8; 4096])),
        Err(CompleteError::UnknownRequest { id: all[0].id })
    );
    assert_eq!(mem.bytes(0x11000, 64), used_before);
    // Ids are distinct.
    assert!(all[0].id != all[1].id && all[1].id != all[2].id);
}

#[test]
fn flush_and_get_id() {
    let (mut dev, mut mem, mut drv) = setup();
    let mut disk = Disk::new();
    let (h1, reqs) = drv.submit(&mut dev, &mut mem, 0, T_FLUSH, 0, &[]);
    assert_eq!(reqs[0].kind, RequestKind::Flush);
    disk.serve(&mut dev, &mut mem, &reqs);
    let (h2, reqs) = drv.submit(&mut dev, &mut mem, 1, T_GET_ID, 0, &[(BUFFERS, 20, true)]);
    assert_eq!(reqs[0].kind, RequestKind::GetId);
    assert!(mem.write(BUFFERS, &[0xAA; 20]));
    disk.serve(&mut dev, &mut mem, &reqs);
    assert_eq!(drv.reap(&mem), [(h1, 1), (h2, 21)]);
    let mut want = b"hv-ramdisk-0001".to_vec();
    want.resize(20, 0);
    assert_eq!(mem.bytes(BUFFERS, 20), want);
    assert_eq!(mem.bytes(STATUSES, 2), [S_OK, S_OK]);
    assert_eq!(dev.stats().flushes, 1);
    assert_eq!(dev.stats().get_ids, 1);
}

#[test]
fn unsupported_and_invalid_requests_complete_at_once() {
    let (mut dev, mut mem, mut drv) = setup();
    let b = BUFFERS;
    let cases: Vec<(u32, u64, Vec<Buf>, u8)> = vec![
        // Unknown types (discard, write zeroes, SCSI, legacy barrier flag).
        (11, 0, vec![(b, 512, false)], S_UNSUPP),
        (13, 0, vec![(b, 512, false)], S_UNSUPP),
        (2, 0, vec![], S_UNSUPP),
        (T_IN | 0x8000_0000, 0, vec![(b, 512, true)], S_UNSUPP),
        // Past the end, and straddling it.
        (T_IN, CAPACITY, vec![(b, 512, true)], S_IOERR),
        (T_OUT, CAPACITY - 1, vec![(b, 1024, false)], S_IOERR),
        (T_IN, u64::MAX, vec![(b, 512, true)], S_IOERR),
        // Not whole sectors.
        (T_IN, 0, vec![(b, 100, true)], S_IOERR),
        (T_OUT, 0, vec![(b, 513, false)], S_IOERR),
        // Larger than the largest request.
        (T_IN, 0, vec![(b, (1 << 20) + 512, true)], S_IOERR),
        // OUT data outside RAM.
        (T_OUT, 0, vec![(RAM_BYTES as u64, 512, false)], S_IOERR),
    ];
    for (n, (kind, sector, data, status)) in cases.iter().enumerate() {
        let (head, reqs) = drv.submit(&mut dev, &mut mem, n as u64, *kind, *sector, data);
        assert!(reqs.is_empty(), "case {n}: reached the backend");
        assert_eq!(drv.reap(&mem), [(head, 1)], "case {n}");
        assert_eq!(mem.bytes(STATUSES + n as u64, 1), [*status], "case {n}");
    }
    // A header shorter than 16 bytes.
    let head = drv.queue_chain(&mut mem, &[(HEADERS, 8, false), (STATUSES + 40, 1, true)]);
    assert!(Driver::notify(&mut dev, &mut mem).is_empty());
    assert_eq!(drv.reap(&mem), [(head, 1)]);
    assert_eq!(mem.bytes(STATUSES + 40, 1), [S_IOERR]);
    // A header split over descriptors is fine.
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_FLUSH.to_le_bytes());
    assert!(mem.write(HEADERS + 0x100, &h));
    drv.queue_chain(
        &mut mem,
        &[
            (HEADERS + 0x100, 4, false),
            (HEADERS + 0x104, 12, false),
            (STATUSES + 41, 1, true),
        ],
    );
    let reqs = Driver::notify(&mut dev, &mut mem);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].kind, RequestKind::Flush);
    assert!(dev.status() & STATUS_NEEDS_RESET == 0);
    let s = dev.stats();
    assert_eq!((s.unsupported, s.io_errors), (4, 8));
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut dev = VirtioBlk::new(BlkConfig {
        read_only: true,
        ..BlkConfig::new(CAPACITY)
    })
    .unwrap();
    let mut mem = Ram::new();
    let mut drv = Driver::init(&mut dev, &mut mem, u32::MAX);
    assert_ne!(dev.io_read(REG_HOST_FEATURES, 4) & F_RO, 0);
    let (_, reqs) = drv.submit(&mut dev, &mut mem, 0, T_OUT, 0, &[(BUFFERS, 512, false)]);
    assert!(reqs.is_empty());
    assert_eq!(mem.bytes(STATUSES, 1), [S_IOERR]);
    let (_, reqs) = drv.submit(&mut dev, &mut mem, 1, T_IN, 0, &[(BUFFERS, 512, true)]);
    assert_eq!(reqs.len(), 1);
}

#[test]
fn backend_errors_and_bad_read_data() {
    let (mut dev, mut mem, mut drv) = setup();
    let (_, r1) = drv.submit(&mut dev, &mut mem, 0, T_OUT, 0, &[(BUFFERS, 512, false)]);
    let (_, r2) = drv.submit(&mut dev, &mut mem, 1, T_IN, 0, &[(BUFFERS, 512, true)]);
    let (_, r3) = drv.submit(&mut dev, &mut mem, 2, T_FLUSH, 0, &[]);
    let (_, r4) = drv.submit(&mut dev, &mut mem, 3, T_IN, 0, &[(BUFFERS, 512, true)]);
    dev.complete(&mut mem, r1[0].id, Err(BlockError::Io))
        .unwrap();
    // A read completed with the wrong amount of data.
    dev.complete(&mut mem, r2[0].id, Ok(&[1u8; 100])).unwrap();
    dev.complete(&mut mem, r3[0].id, Err(BlockError::Unsupported))
        .unwrap();
    // A read whose buffer the guest placed outside RAM: IOERR at completion.
    dev.complete(&mut mem, r4[0].id, Ok(&[2u8; 512])).unwrap();
    assert_eq!(mem.bytes(STATUSES, 4), [S_IOERR, S_IOERR, S_UNSUPP, S_OK]);
    let mut far = drv.submit(
        &mut dev,
        &mut mem,
        4,
        T_IN,
        0,
        &[(RAM_BYTES as u64 - 256, 512, true)],
    );
    dev.complete(&mut mem, far.1.remove(0).id, Ok(&[3u8; 512]))
        .unwrap();
    assert_eq!(mem.bytes(STATUSES + 4, 1), [S_IOERR]);
    assert_eq!(drv.reap(&mem).len(), 5);
    assert_eq!(dev.in_flight(), 0);
}

#[test]
fn indirect_descriptors() {
    let (mut dev, mut mem, mut drv) = setup();
    let mut disk = Disk::new();
    assert!(mem.write(BUFFERS, &pattern(3, 1024)));
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&5u64.to_le_bytes());
    assert!(mem.write(HEADERS, &h));
    let table = 0x3_0000;
    Driver::write_desc(&mut mem, table, 0, HEADERS, 16, DESC_F_NEXT, 1);
    Driver::write_desc(&mut mem, table, 1, BUFFERS, 1024, DESC_F_NEXT, 2);
    Driver::write_desc(&mut mem, table, 2, STATUSES, 1, DESC_F_WRITE, 0);
    let head = drv.free.pop().unwrap();
    let (desc, _, _) = drv.queue.areas();
    Driver::write_desc(&mut mem, desc, head, table, 48, DESC_F_INDIRECT, 0);
    drv.publish(&mut mem, head);
    drv.chains.insert(head, vec![head]);
    let reqs = Driver::notify(&mut dev, &mut mem);
    assert_eq!(reqs.len(), 1);
    disk.serve(&mut dev, &mut mem, &reqs);
    assert_eq!(drv.reap(&mem), [(head, 1)]);
    assert_eq!(&disk.0[5 * 512..5 * 512 + 1024], &pattern(3, 1024)[..]);

    // Without the feature negotiated, an indirect descriptor breaks the device.
    let mut dev2 = device();
    let mut mem2 = Ram::new();
    let mut drv2 = Driver::init(&mut dev2, &mut mem2, !F_RING_INDIRECT_DESC);
    let head = drv2.free.pop().unwrap();
    Driver::write_desc(&mut mem2, desc, head, table, 48, DESC_F_INDIRECT, 0);
    drv2.publish(&mut mem2, head);
    assert!(Driver::notify(&mut dev2, &mut mem2).is_empty());
    assert_eq!(
        dev2.fault(),
        Some(DeviceFault::Queue(
            super::queue::QueueError::IndirectNotNegotiated
        ))
    );
}

/// Puts the device in NEEDS_RESET with `bufs`, checks the signs, resets and proves the device
/// works again.
fn assert_breaks(bufs: &[Buf], want: fn(DeviceFault) -> bool) {
    let (mut dev, mut mem, mut drv) = setup();
    // One good request in flight when the bad one arrives.
    let (_, good) = drv.submit(&mut dev, &mut mem, 0, T_FLUSH, 0, &[]);
    assert_eq!(dev.in_flight(), 1);
    drv.queue_chain(&mut mem, bufs);
    let reqs = Driver::notify(&mut dev, &mut mem);
    assert!(reqs.is_empty());
    let fault = dev.fault().expect("the device did not break");
    assert!(want(fault), "{fault:?}");
    assert!(!format!("{fault}").is_empty());
    assert_ne!(dev.io_read(REG_STATUS, 1) as u8 & STATUS_NEEDS_RESET, 0);
    assert_ne!(dev.io_read(REG_ISR, 1) as u8 & ISR_CONFIG, 0);
    // The in-flight request was forgotten: its completion does nothing.
    assert_eq!(dev.in_flight(), 0);
    let used = mem.bytes(0x11000, 16);
    assert!(dev.complete(&mut mem, good[0].id, Ok(&[])).is_err());
    assert_eq!(mem.bytes(0x11000, 16), used);
    // More notifies do nothing; the driver cannot clear NEEDS_RESET by writing the status.
    drv.submit(&mut dev, &mut mem, 1, T_FLUSH, 0, &[]);
    assert_eq!(dev.in_flight(), 0);
    let mut out = Vec::new();
    dev.io_write(&mut mem, REG_STATUS, 1, 0x0F, &mut out);
    assert_ne!(dev.status() & STATUS_NEEDS_RESET, 0);
    // A reset and a fresh set-up make it work again.
    let mut drv = Driver::init(&mut dev, &mut mem, u32::MAX);
    assert_eq!(dev.fault(), None);
    let (_, reqs) = drv.submit(&mut dev, &mut mem, 2, T_FLUSH, 0, &[]);
    assert_eq!(reqs.len(), 1);
}

#[test]
fn malformed_chains_need_a_reset() {
    let st = STATUSES + 9;
    // Everything readable: nowhere to put the status.
    assert_breaks(&[(HEADERS, 16, false)], |f| {
        matches!(f, DeviceFault::NoStatusByte { .. })
    });
    // Readable after writable.
    assert_breaks(
        &[(HEADERS, 16, false), (st, 1, true), (BUFFERS, 512, false)],
        |f| matches!(f, DeviceFault::ReadableAfterWritable { .. }),
    );
    // Status byte outside RAM.
    assert_breaks(
        &[(HEADERS, 16, false), (RAM_BYTES as u64 + 10, 1, true)],
        |f| matches!(f, DeviceFault::StatusOutsideRam { .. }),
    );
    // Status at the very top of the address space (the end address would overflow).
    assert_breaks(&[(HEADERS, 16, false), (u64::MAX, 1, true)], |f| {
        matches!(f, DeviceFault::StatusOutsideRam { .. })
    });
}

#[test]
fn ring_corruption_needs_a_reset() {
    // A loop in the descriptor table.
    let (mut dev, mut mem, mut drv) = setup();
    let (desc, avail, _) = drv.queue.areas();
    Driver::write_desc(&mut mem, desc, 0, HEADERS, 16, DESC_F_NEXT, 1);
    Driver::write_desc(
        &mut mem,
        desc,
        1,
        STATUSES,
        1,
        DESC_F_WRITE | DESC_F_NEXT,
        0,
    );
    drv.publish(&mut mem, 0);
    assert!(Driver::notify(&mut dev, &mut mem).is_empty());
    assert!(matches!(dev.fault(), Some(DeviceFault::Queue(_))));
    // An available index far ahead.
    let (mut dev, mut mem, _) = setup();
    assert!(mem.write(avail + 2, &500u16.to_le_bytes()));
    assert!(Driver::notify(&mut dev, &mut mem).is_empty());
    assert!(matches!(
        dev.fault(),
        Some(DeviceFault::Queue(
            super::queue::QueueError::AvailIndexJump { .. }
        ))
    ));
    // A queue placed past the end of RAM.
    let mut dev = device();
    let mut mem = Ram::new();
    let mut out = Vec::new();
    dev.io_write(&mut mem, REG_QUEUE_PFN, 4, 0xFFFF_FFFF, &mut out);
    dev.io_write(&mut mem, REG_QUEUE_NOTIFY, 2, 0, &mut out);
    assert!(out.is_empty());
    assert!(matches!(
        dev.fault(),
        Some(DeviceFault::Queue(
            super::queue::QueueError::RingOutsideRam { .. }
        ))
    ));
}

#[test]
fn reset_with_requests_in_flight() {
    let (mut dev, mut mem, mut drv) = setup();
    let (_, r1) = drv.submit(&mut dev, &mut mem, 0, T_IN, 0, &[(BUFFERS, 4096, true)]);
    let (_, r2) = drv.submit(&mut dev, &mut mem, 1, T_OUT, 8, &[(BUFFERS, 512, false)]);
    assert_eq!(dev.in_flight(), 2);
    let mut out = Vec::new();
    dev.io_write(&mut mem, REG_STATUS, 1, 0, &mut out);
    assert_eq!(dev.in_flight(), 0);
    assert_eq!(dev.in_flight_bytes(), 0);
    assert_eq!(dev.status(), 0);
    assert_eq!(dev.io_read(REG_QUEUE_PFN, 4), 0);
    // The backend finishing later writes nothing into the guest.
    let snapshot = mem.0.clone();
    assert_eq!(
        dev.complete(&mut mem, r1[0].id, Ok(&[9u8; 4096])),
        Err(CompleteError::UnknownRequest { id: r1[0].id })
    );
    assert!(dev.complete(&mut mem, r2[0].id, Ok(&[])).is_err());
    assert!(mem.0 == snapshot);
    // Ids are not reused after the reset.
    let mut drv = Driver::init(&mut dev, &mut mem, u32::MAX);
    let (_, r3) = drv.submit(&mut dev, &mut mem, 2, T_FLUSH, 0, &[]);
    assert!(r3[0].id > r2[0].id);
    // A power cycle forgets everything, the PCI header too, but not the id counter.
    let (_, r5) = drv.submit(&mut dev, &mut mem, 4, T_FLUSH, 0, &[]);
    dev.power_cycle();
    assert_eq!(dev.in_flight(), 0);
    assert_eq!(dev.io_base(), None);
    assert!(dev.complete(&mut mem, r5[0].id, Ok(&[])).is_err());
    let mut drv = Driver::init(&mut dev, &mut mem, u32::MAX);
    let (_, r6) = drv.submit(&mut dev, &mut mem, 5, T_FLUSH, 0, &[]);
    assert!(r6[0].id > r5[0].id);
    // Moving the queue also drops what was in flight.
    let (_, r4) = drv.submit(&mut dev, &mut mem, 3, T_FLUSH, 0, &[]);
    assert_eq!(dev.in_flight(), 2);
    dev.io_write(&mut mem, REG_QUEUE_PFN, 4, 0, &mut out);
    assert_eq!(dev.in_flight(), 0);
    assert!(dev.complete(&mut mem, r4[0].id, Ok(&[])).is_err());
}

#[test]
fn in_flight_limits_hold_back_requests() {
    let mut dev = VirtioBlk::new(BlkConfig {
        max_in_flight_bytes: 64 * 1024,
        ..BlkConfig::new(CAPACITY)
    })
    .unwrap();
    let mut mem = Ram::new();
    let mut drv = Driver::init(&mut dev, &mut mem, u32::MAX);
    let mut disk = Disk::new();
    // Ten 32 KiB reads queued at once: only two fit the budget.
    for n in 0..10u64 {
        let hdr = HEADERS + 16 * n;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&(n * 64).to_le_bytes());
        assert!(mem.write(hdr, &h));
        drv.queue_chain(
            &mut mem,
            &[
                (hdr, 16, false),
                (BUFFERS + n * 32768, 32768, true),
                (STATUSES + n, 1, true),
            ],
        );
    }
    let mut reqs = Driver::notify(&mut dev, &mut mem);
    assert_eq!(reqs.len(), 2);
    let mut total = reqs.len();
    let mut out = Vec::new();
    // Without completions, polling takes nothing more.
    dev.take_requests(&mut mem, &mut out);
    assert!(out.is_empty());
    for _ in 0..20 {
        disk.serve(&mut dev, &mut mem, &reqs);
        reqs.clear();
        dev.take_requests(&mut mem, &mut reqs);
        assert!(dev.in_flight_bytes() <= 64 * 1024);
        total += reqs.len();
        if reqs.is_empty() {
            break;
        }
    }
    assert_eq!(total, 10);
    assert_eq!(drv.reap(&mem).len(), 10);
    // One request larger than the whole budget still goes (alone).
    let (_, r) = drv.submit(
        &mut dev,
        &mut mem,
        20,
        T_IN,
        0,
        &[(BUFFERS, 128 * 1024, true)],
    );
    assert_eq!(r.len(), 1);
}

#[test]
fn paused_intake_holds_requests_until_resumed() {
    let (mut dev, mut mem, mut drv) = setup();
    let mut disk = Disk::new();
    let (_, r1) = drv.submit(&mut dev, &mut mem, 0, T_FLUSH, 0, &[]);
    dev.pause_intake();
    assert!(dev.intake_paused());
    let (h2, r2) = drv.submit(&mut dev, &mut mem, 1, T_OUT, 0, &[(BUFFERS, 512, false)]);
    assert!(r2.is_empty(), "taken while paused");
    // What was in flight still completes: the device drains.
    disk.serve(&mut dev, &mut mem, &r1);
    assert_eq!(dev.in_flight(), 0);
    let mut out = Vec::new();
    dev.take_requests(&mut mem, &mut out);
    assert!(out.is_empty());
    dev.resume_intake();
    dev.take_requests(&mut mem, &mut out);
    assert_eq!(out.len(), 1);
    disk.serve(&mut dev, &mut mem, &out);
    assert_eq!(drv.reap(&mem).last().map(|d| d.0), Some(h2));
}

#[test]
fn interrupt_suppression_and_intx_disable() {
    let (mut dev, mut mem, mut drv) = setup();
    let (_, avail, _) = drv.queue.areas();
    assert!(mem.write(avail, &1u16.to_le_bytes()));
    let (_, r) = drv.submit(&mut dev, &mut mem, 0, T_FLUSH, 0, &[]);
    dev.complete(&mut mem, r[0].id, Ok(&[])).unwrap();
    assert!(!dev.interrupt_pending());
    assert!(mem.write(avail, &0u16.to_le_bytes()));
    let (_, r) = drv.submit(&mut dev, &mut mem, 1, T_FLUSH, 0, &[]);
    dev.pci_mut().set_command(COMMAND_IO | COMMAND_INTX_DISABLE);
    dev.complete(&mut mem, r[0].id, Ok(&[])).unwrap();
    assert!(!dev.interrupt_pending());
    dev.pci_mut().set_command(COMMAND_IO);
    assert!(dev.interrupt_pending());
}

#[test]
fn save_and_restore_mid_life() {
    let (mut dev, mut mem, mut drv) = setup();
    let mut disk = Disk::new();
    // Some history: the indices are not at zero.
    for n in 0..5u64 {
        let (_, r) = drv.submit(
            &mut dev,
            &mut mem,
            n,
            T_OUT,
            n * 8,
            &[(BUFFERS, 4096, false)],
        );
        disk.serve(&mut dev, &mut mem, &r);
    }
    drv.reap(&mem);
    // In flight: refused.
    let (_, r) = drv.submit(&mut dev, &mut mem, 5, T_IN, 0, &[(BUFFERS, 512, true)]);
    let mut bytes = Vec::new();
    assert_eq!(
        dev.save(&mut bytes),
        Err(SaveError::RequestsInFlight { count: 1 })
    );
    assert!(bytes.is_empty());
    assert!(!format!("{}", SaveError::RequestsInFlight { count: 1 }).is_empty());
    // Quiesce: stop intake, queue one more (it stays in the ring), drain.
    dev.pause_intake();
    let (queued_head, none) = drv.submit(
        &mut dev,
        &mut mem,
        6,
        T_IN,
        8,
        &[(BUFFERS + 8192, 4096, true)],
    );
    assert!(none.is_empty());
    disk.serve(&mut dev, &mut mem, &r);
    dev.save(&mut bytes).unwrap();
    assert_eq!(bytes.len(), STATE_LEN);

    // The "destination": same disk, same guest memory, a restored device.
    let mut moved = VirtioBlk::restore(BlkConfig::new(CAPACITY), &bytes).unwrap();
    assert_eq!(moved.io_base(), dev.io_base());
    assert_eq!(moved.status(), dev.status());
    assert_eq!(moved.guest_features(), dev.guest_features());
    let mut again = Vec::new();
    moved.save(&mut again).unwrap();
    assert_eq!(again, bytes);
    // The request queued while paused is taken by the restored device.
    let mut reqs = Vec::new();
    moved.take_requests(&mut mem, &mut reqs);
    assert_eq!(
        reqs.iter().map(|r| &r.kind).collect::<Vec<_>>(),
        [&RequestKind::Read {
            sector: 8,
            len: 4096
        }]
    );
    disk.serve(&mut moved, &mut mem, &reqs);
    let done = drv.reap(&mem);
    assert_eq!(done.last(), Some(&(queued_head, 4097)));
    assert_eq!(mem.bytes(BUFFERS + 8192, 4096), disk.0[4096..8192]);
    // And new requests after that.
    let (h, r) = drv.submit(&mut moved, &mut mem, 7, T_FLUSH, 0, &[]);
    disk.serve(&mut moved, &mut mem, &r);
    assert_eq!(drv.reap(&mem), [(h, 1)]);
}

#[test]
fn restore_refuses_bad_state() {
    let (mut dev, _mem, _drv) = setup();
    let mut good = Vec::new();
    dev.save(&mut good).unwrap();
    let cfg = BlkConfig::new(CAPACITY);
    assert!(VirtioBlk::restore(cfg, &good).is_ok());
    let f = STATE_LEN - 38; // start of the fields after the PCI header
    let bad = |at: usize, v: u8| {
        let mut b = good.clone();
        b[at] = v;
        VirtioBlk::restore(cfg, &b)
    };
    assert_eq!(
        VirtioBlk::restore(cfg, &good[..20]),
        Err(BlkStateError::Truncated)
    );
    assert_eq!(
        VirtioBlk::restore(cfg, b"nope"),
        Err(BlkStateError::BadMagic)
    );
    let mut long = good.clone();
    long.push(0);
    assert_eq!(
        VirtioBlk::restore(cfg, &long),
        Err(BlkStateError::TrailingBytes)
    );
    assert_eq!(bad(0, b'X'), Err(BlkStateError::BadMagic));
    assert_eq!(
        bad(4, 2),
        Err(BlkStateError::UnsupportedVersion { version: 2 })
    );
    // PCI header of another device (device id byte).
    assert!(matches!(bad(5 + 5 + 2, 0x42), Err(BlkStateError::Pci(_))));
    // Another disk.
    assert_eq!(
        VirtioBlk::restore(BlkConfig::new(CAPACITY * 2), &good),
        Err(BlkStateError::ConfigMismatch { what: "capacity" })
    );
    let ro = BlkConfig {
        read_only: true,
        ..cfg
    };
    assert_eq!(
        VirtioBlk::restore(ro, &good),
        Err(BlkStateError::ConfigMismatch { what: "features" })
    );
    let q = BlkConfig {
        queue_size: 256,
        ..cfg
    };
    assert_eq!(
        VirtioBlk::restore(q, &good),
        Err(BlkStateError::ConfigMismatch { what: "queue size" })
    );
    // Impossible values.
    assert!(matches!(
        bad(f + 17, 0x01),
        Err(BlkStateError::InvalidValue { .. })
    )); // feature 24
    assert!(matches!(
        bad(f + 18, 0x10),
        Err(BlkStateError::InvalidValue { .. })
    )); // status
    assert!(matches!(
        bad(f + 19, 0x04),
        Err(BlkStateError::InvalidValue { .. })
    )); // ISR
    assert!(matches!(
        bad(f + 26, 0x07),
        Err(BlkStateError::InvalidValue { .. })
    )); // indices
    let mut zero_id = good.clone();
    zero_id[f + 30..f + 38].fill(0);
    assert!(matches!(
        VirtioBlk::restore(cfg, &zero_id),
        Err(BlkStateError::InvalidValue { .. })
    ));
    // Every error has a message.
    for e in [
        BlkStateError::Truncated,
        BlkStateError::BadMagic,
        BlkStateError::UnsupportedVersion { version: 3 },
        BlkStateError::Pci(crate::devices::pci::PciStateError::Truncated),
        BlkStateError::ConfigMismatch { what: "x" },
        BlkStateError::InvalidValue { at: 1 },
        BlkStateError::TrailingBytes,
    ] {
        assert!(!format!("{e}").is_empty());
    }
    // Broken config.
    assert!(VirtioBlk::new(BlkConfig {
        queue_size: 100,
        ..cfg
    })
    .is_err());
    assert!(VirtioBlk::new(BlkConfig {
        max_request_bytes: 1000,
        ..cfg
    })
    .is_err());
    let _ = dev.io_read(REG_ISR, 1);
}

/// xorshift64: deterministic garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes a request chain at random descriptor indices of the legacy queue at `pfn`: a header
/// of a random (mostly known) type and sector, random data buffers, a status byte, each part
/// sometimes broken (wrong direction, outside RAM, odd length, a bad `next`, an indirect
/// flag), and makes it available (sometimes with a jump of the available index).
fn plausible_request(rng: &mut Rng, mem: &mut Ram, pfn: u32, size: u16) {
    let q = SplitQueue::legacy(pfn, size);
    let (desc, avail, _) = q.areas();
    let ram = mem.0.len() as u64;
    let area = 0x2_0000 + rng.below(ram - 0x3_0000);
    let kind = [T_IN, T_OUT, T_FLUSH, T_GET_ID, 11, rng.next() as u32][rng.below(6) as usize];
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&rng.below(5000).to_le_bytes());
    let _ = mem.write(area, &h);
    let writes = kind == T_IN || kind == T_GET_ID;
    let mut bufs: Vec<Buf> = vec![(area, 16, false)];
    for _ in 0..rng.below(4) {
        let len = [512u32, 4096, 1024, 100, 65536][rng.below(5) as usize];
        bufs.push((0x2_0000 + rng.below(ram - 0x2_0000), len, writes));
    }
    bufs.push((area + 16 + rng.below(64), 1, true));
    // Break something, sometimes.
    let i = rng.below(bufs.len() as u64) as usize;
    match rng.below(8) {
        0 => bufs[i].2 = !bufs[i].2,
        1 => bufs[i].0 = ram - 8 + rng.below(64),
        2 => bufs[i].1 = rng.next() as u32,
        _ => {}
    }
    let n = bufs.len() as u16;
    let first = rng.below(u64::from(size)) as u16;
    for (k, &(addr, len, w)) in bufs.iter().enumerate() {
        let k = k as u16;
        let index = (first + k) % size;
        let mut flags = if w { DESC_F_WRITE } else { 0 };
        let mut next = (first + k + 1) % size;
        if k + 1 < n {
            flags |= DESC_F_NEXT;
        }
        match rng.below(40) {
            0 => next = rng.next() as u16,
            1 => flags |= DESC_F_INDIRECT,
            _ => {}
        }
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write(desc + 16 * u64::from(index), &raw);
    }
    let mut idx = [0u8; 2];
    if !mem.read(avail + 2, &mut idx) {
        return;
    }
    let idx = u16::from_le_bytes(idx);
    let _ = mem.write(avail + 4 + 2 * u64::from(idx % size), &first.to_le_bytes());
    let step = if rng.below(50) == 0 {
        rng.next() as u16
    } else {
        1
    };
    let _ = mem.write(avail + 2, &idx.wrapping_add(step).to_le_bytes());
}

/// Executions of the random-ring test (devices driven through garbage rings).
const GARBAGE_RUNS: u64 = 10_000;
/// Operations per execution.
const GARBAGE_OPS: u64 = 100;

/// Garbage in the rings and descriptors (mostly pointing into RAM, sometimes anywhere), random
/// register traffic, completions of real, stale and invented ids in any order: the device never
/// panics, never holds more than its limits, and its state always saves and restores once
/// drained.
#[test]
fn random_garbage_rings_never_panic() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut requests_seen = 0u64;
    let mut faults = 0u64;
    let mut completed_ok = 0u64;
    for run in 0..GARBAGE_RUNS {
        let cfg = BlkConfig {
            queue_size: [2u16, 8, 128][run as usize % 3],
            max_in_flight_bytes: 64 * 1024,
            ..BlkConfig::new(1 + rng.below(4096))
        };
        let mut dev = VirtioBlk::new(cfg).unwrap();
        let mut mem = Ram(vec![0; 256 * 1024]);
        let mut out = Vec::new();
        let mut pending: Vec<(RequestId, usize)> = Vec::new();
        let pfn = 1 + rng.below(60) as u32;
        dev.io_write(&mut mem, REG_GUEST_FEATURES, 4, rng.next() as u32, &mut out);
        dev.io_write(&mut mem, REG_QUEUE_PFN, 4, pfn, &mut out);
        dev.io_write(&mut mem, REG_STATUS, 1, 7, &mut out);
        for _ in 0..GARBAGE_OPS {
            let was_broken = dev.fault().is_some();
            match rng.below(12) {
                // Scribble over the ring area and nearby memory.
                0 => {
                    let base = u64::from(pfn) << 12;
                    for _ in 0..1 + rng.below(32) {
                        let at = (base + rng.below(12 * 1024)) as usize % mem.0.len();
                        let v = rng.next();
                        // Descriptor-ish values: small addresses, small lengths, real flags.
                        let bytes = match rng.below(3) {
                            0 => (v % (300 * 1024)).to_le_bytes(),
                            1 => (v & 0x0007_0000_0000_FFFF).to_le_bytes(),
                            _ => v.to_le_bytes(),
                        };
                        let end = (at + 8).min(mem.0.len());
                        mem.0[at..end].copy_from_slice(&bytes[..end - at]);
                    }
                }
                // A plausible request with random flaws: what a buggy driver would send.
                1..=3 => plausible_request(&mut rng, &mut mem, pfn, cfg.queue_size),
                4 | 5 => dev.io_write(&mut mem, REG_QUEUE_NOTIFY, 2, 0, &mut out),
                6 => dev.take_requests(&mut mem, &mut out),
                7 => {
                    // Complete something: a real id, or an invented one.
                    let (id, len) = if !pending.is_empty() && rng.below(4) != 0 {
                        pending.swap_remove(rng.below(pending.len() as u64) as usize)
                    } else {
                        (RequestId(rng.below(64)), 0)
                    };
                    // Mostly the length asked for, sometimes not.
                    let len = if rng.below(4) == 0 {
                        rng.below(70_000) as usize
                    } else {
                        len
                    };
                    let data = vec![0xA5u8; len];
                    let result = match rng.below(4) {
                        0 => Err(BlockError::Io),
                        1 => Err(BlockError::Unsupported),
                        _ => Ok(&data[..]),
                    };
                    if dev.complete(&mut mem, id, result).is_ok() {
                        completed_ok += 1;
                    }
                }
                8 => {
                    let offset = rng.below(0x48) as u16;
                    let size = [1u8, 2, 4][rng.below(3) as usize];
                    if rng.below(2) == 0 {
                        dev.io_read(offset, size);
                    } else {
                        // Keep the queue address mostly where the garbage is.
                        let v = if offset == REG_QUEUE_PFN {
                            pfn
                        } else {
                            rng.next() as u32
                        };
                        dev.io_write(&mut mem, offset, size, v, &mut out);
                    }
                }
                9 => {}
                _ => {
                    // A driver resets a device that needs it (and sometimes one that does not).
                    if dev.fault().is_some() || rng.below(8) == 0 {
                        dev.io_write(&mut mem, REG_STATUS, 1, 0, &mut out);
                        dev.io_write(&mut mem, REG_QUEUE_PFN, 4, pfn, &mut out);
                        dev.io_write(&mut mem, REG_STATUS, 1, 7, &mut out);
                    }
                }
            }
            for r in out.drain(..) {
                requests_seen += 1;
                // Whatever reached the backend is within the disk.
                match &r.kind {
                    RequestKind::Read { sector, len } => {
                        assert!(sector + u64::from(*len) / 512 <= cfg.capacity_sectors)
                    }
                    RequestKind::Write { sector, data } => {
                        assert!(sector + data.len() as u64 / 512 <= cfg.capacity_sectors);
                        assert!(data.len() as u32 <= cfg.max_request_bytes);
                    }
                    _ => {}
                }
                let len = match &r.kind {
                    RequestKind::Read { len, .. } => *len as usize,
                    RequestKind::GetId => ID_BYTES,
                    _ => 0,
                };
                pending.push((r.id, len));
            }
            assert!(dev.in_flight() <= usize::from(cfg.queue_size));
            assert!(
                dev.in_flight_bytes() <= cfg.max_in_flight_bytes + u64::from(cfg.max_request_bytes)
            );
            assert_eq!(dev.status() & !STATUS_VALID, 0);
            if !was_broken && dev.fault().is_some() {
                faults += 1;
            }
        }
        // Drain, then the state must round-trip.
        for (id, _) in pending.drain(..) {
            let _ = dev.complete(&mut mem, id, Err(BlockError::Io));
        }
        assert_eq!(dev.in_flight(), 0);
        let mut saved = Vec::new();
        dev.save(&mut saved).unwrap();
        let back = VirtioBlk::restore(cfg, &saved).unwrap();
        let mut again = Vec::new();
        back.save(&mut again).unwrap();
        assert_eq!(saved, again);
    }
    // The garbage reached both outcomes: requests for the backend, and broken devices.
    assert!(requests_seen > 100, "{requests_seen}");
    assert!(faults > 100, "{faults}");
    assert!(completed_ok > 100, "{completed_ok}");
    std::eprintln!(
        "random rings: {GARBAGE_RUNS} executions x {GARBAGE_OPS} operations, \
         {requests_seen} requests reached the backend, {completed_ok} completed, \
         the device broke {faults} times"
    );
}
