//! A small legacy virtio-blk driver over PCI, written from the virtio spec (4.1.4.8 "Legacy
//! Interfaces", 2.7 "Split Virtqueues", 5.2 "Block Device"), independently of the hypervisor's
//! device model, so each checks the other.
//!
//! It finds 1AF4:1001 (subsystem 2) on PCI bus 0 through configuration mechanism #1, takes
//! BAR0 (an I/O BAR; assigned here if the firmware left it at 0), enables I/O decoding and bus
//! mastering, resets the device, negotiates nothing but FLUSH, sets up queue 0 in this image's
//! bss, and sets DRIVER_OK. Requests go in fixed slots: slot `s` owns descriptors `3s` (header),
//! `3s + 1` (data) and `3s + 2` (status), its header, status byte and a 64 KiB buffer. The
//! guest has no interrupts: it polls the used ring (and HLTs between polls).
//!
//! Everything the device touches is identity-mapped guest memory (GPA = address). The
//! compiler fences keep the ring writes before the notify and the used-ring reads after the
//! exits that may have completed requests: the device only runs while this vCPU is stopped in
//! an exit, so no CPU fence is needed.

use core::sync::atomic::{compiler_fence, Ordering};

use crate::port::{inb, inl, inw, outb, outl, outw};

const PCI_ADDRESS: u16 = 0xCF8;
const PCI_DATA: u16 = 0xCFC;
const VIRTIO_VENDOR: u16 = 0x1AF4;
const BLK_DEVICE: u16 = 0x1001;
const BLK_SUBSYSTEM: u16 = 2;
/// Where BAR0 goes when nobody assigned it (the usual PC range for PCI I/O).
const FALLBACK_IO_BASE: u32 = 0xC000;

// Legacy register offsets and bits.
const HOST_FEATURES: u16 = 0x00;
const GUEST_FEATURES: u16 = 0x04;
const QUEUE_PFN: u16 = 0x08;
const QUEUE_NUM: u16 = 0x0C;
const QUEUE_SEL: u16 = 0x0E;
const QUEUE_NOTIFY: u16 = 0x10;
const STATUS: u16 = 0x12;
const CONFIG: u16 = 0x14;
const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_NEEDS_RESET: u8 = 0x40;
const F_FLUSH: u32 = 1 << 9;

const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Status byte value before the device wrote it.
const STATUS_UNSET: u8 = 0xFF;
pub const STATUS_OK: u8 = 0;

/// Request slots (requests in flight at most).
pub const SLOTS: usize = 8;
/// Bytes of each slot's data buffer.
pub const SLOT_BUFFER: usize = 64 * 1024;
/// Largest queue this driver sets up (the legacy layout of 256 entries takes 3 pages).
const MAX_QUEUE: u16 = 256;
const QUEUE_BYTES: usize = 3 * 4096;

#[repr(C, align(4096))]
struct QueuePages([u8; QUEUE_BYTES]);
#[repr(C, align(4096))]
struct Buffers([[u8; SLOT_BUFFER]; SLOTS]);
#[repr(C, align(16))]
struct Headers([[u8; 16]; SLOTS]);

static mut QUEUE: QueuePages = QueuePages([0; QUEUE_BYTES]);
static mut BUFFERS: Buffers = Buffers([[0; SLOT_BUFFER]; SLOTS]);
static mut HEADERS: Headers = Headers([[0; 16]; SLOTS]);
static mut STATUSES: [u8; SLOTS] = [STATUS_UNSET; SLOTS];

/// Why a device was found but cannot be used.
#[derive(Debug, Clone, Copy)]
pub enum ProbeError {
    /// BAR0 is not an I/O BAR.
    NoIoBar { bar0: u32 },
    /// Queue 0 does not exist.
    NoQueue,
    /// A queue size this driver has no room for, or not a power of two.
    BadQueueSize { size: u16 },
}

impl core::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProbeError::NoIoBar { bar0 } => write!(f, "BAR0 {bar0:#x} is not an I/O BAR"),
            ProbeError::NoQueue => write!(f, "queue 0 does not exist"),
            ProbeError::BadQueueSize { size } => write!(f, "queue size {size} not usable"),
        }
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

fn pci_address(device: u8, offset: u8) -> u32 {
    0x8000_0000 | u32::from(device) << 11 | u32::from(offset & 0xFC)
}

fn pci_read(device: u8, offset: u8) -> u32 {
    outl(PCI_ADDRESS, pci_address(device, offset));
    inl(PCI_DATA)
}

fn pci_write(device: u8, offset: u8, value: u32) {
    outl(PCI_ADDRESS, pci_address(device, offset));
    outl(PCI_DATA, value);
}

/// Writes `value` to guest memory at `addr` (ring fields the device reads).
fn poke<T>(addr: u64, value: T) {
    // SAFETY: callers pass addresses inside this image's queue pages or slot headers (static,
    // identity-mapped, suitably aligned for T); the device reads them only during exits.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}

/// Reads guest memory at `addr` (ring fields and status bytes the device writes).
fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: as in `poke`.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// A set-up virtio-blk device.
pub struct VirtioBlk {
    io: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
    busy: [bool; SLOTS],
    capacity: u64,
    /// The used ring named a chain this driver never made: stop using the device.
    confused: bool,
}

impl VirtioBlk {
    /// Scans bus 0 for a virtio-blk device and sets it up; `Ok(None)` if there is none.
    pub fn probe() -> Result<Option<VirtioBlk>, ProbeError> {
        for device in 0..32u8 {
            let id = pci_read(device, 0);
            if id as u16 != VIRTIO_VENDOR || (id >> 16) as u16 != BLK_DEVICE {
                continue;
            }
            if (pci_read(device, 0x2C) >> 16) as u16 != BLK_SUBSYSTEM {
                continue;
            }
            return Self::setup(device).map(Some);
        }
        Ok(None)
    }

    fn setup(device: u8) -> Result<VirtioBlk, ProbeError> {
        let bar0 = pci_read(device, 0x10);
        if bar0 & 1 == 0 {
            return Err(ProbeError::NoIoBar { bar0 });
        }
        let mut base = bar0 & 0xFFFC;
        if base == 0 {
            // Unassigned: size it with decoding off, then place it.
            pci_write(device, 0x10, 0xFFFF_FFFF);
            let mask = pci_read(device, 0x10) & 0xFFFC;
            let size = mask.isolate_lowest_one();
            base = FALLBACK_IO_BASE.next_multiple_of(size.max(4));
            pci_write(device, 0x10, base | 1);
        }
        // I/O decoding and bus mastering on (the status half of the dword is read-only or
        // write-1-to-clear: writing 0 there changes nothing).
        let command = pci_read(device, 0x04) & 0xFFFF;
        pci_write(device, 0x04, command | 0x5);
        let io = base as u16;

        // Legacy initialisation: reset, ACKNOWLEDGE, DRIVER, features, queue, DRIVER_OK.
        outb(io + STATUS, 0);
        outb(io + STATUS, S_ACKNOWLEDGE);
        outb(io + STATUS, S_ACKNOWLEDGE | S_DRIVER);
        let offered = inl(io + HOST_FEATURES);
        outl(io + GUEST_FEATURES, offered & F_FLUSH);
        outw(io + QUEUE_SEL, 0);
        let size = inw(io + QUEUE_NUM);
        if size == 0 {
            return Err(ProbeError::NoQueue);
        }
        if !size.is_power_of_two() || size > MAX_QUEUE || usize::from(size) < 3 * SLOTS {
            return Err(ProbeError::BadQueueSize { size });
        }
        let ring = &raw mut QUEUE as u64;
        // SAFETY: QUEUE is this driver's, not in use by a device yet (the reset above stopped
        // any earlier one), QUEUE_BYTES long.
        unsafe { core::ptr::write_bytes(ring as *mut u8, 0, QUEUE_BYTES) };
        let desc = ring;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
        compiler_fence(Ordering::SeqCst);
        outl(io + QUEUE_PFN, (ring >> 12) as u32);
        outb(io + STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
        let capacity = u64::from(inl(io + CONFIG)) | u64::from(inl(io + CONFIG + 4)) << 32;
        Ok(VirtioBlk {
            io,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            busy: [false; SLOTS],
            capacity,
            confused: false,
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// The device's first I/O port.
    pub fn io_base(&self) -> u16 {
        self.io
    }

    /// A slot with no request in flight.
    pub fn free_slot(&self) -> Option<usize> {
        self.busy.iter().position(|b| !b)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.busy.iter().filter(|b| **b).count()
    }

    /// Whether the device stopped (NEEDS_RESET) or returned nonsense.
    pub fn broken(&self) -> bool {
        self.confused || inb(self.io + STATUS) & S_NEEDS_RESET != 0
    }

    /// 4 KiB block `index` of slot `slot`'s buffer, as words. Only while the slot is free or
    /// its request has completed: the device writes the buffer during a read.
    pub fn block_words(&mut self, slot: usize, index: usize) -> &mut [u64; 512] {
        assert!(slot < SLOTS && index < SLOT_BUFFER / 4096);
        let addr = &raw mut BUFFERS as u64 + (slot * SLOT_BUFFER + index * 4096) as u64;
        // SAFETY: inside BUFFERS (checked above), 4096-aligned; `&mut self` keeps a second
        // reference from this driver away, and callers only use free or completed slots, so the
        // device does not write it meanwhile.
        unsafe { &mut *(addr as *mut [u64; 512]) }
    }

    /// Puts a request in slot `slot` (which must be free) and makes it available; the device
    /// hears of it at the next [`Self::notify`]. `len` bytes of the slot's buffer are the data
    /// (ignored for a flush).
    pub fn submit(&mut self, slot: usize, op: Op, sector: u64, len: u32) {
        assert!(slot < SLOTS && !self.busy[slot] && len as usize <= SLOT_BUFFER);
        let header = &raw mut HEADERS as u64 + 16 * slot as u64;
        let status = &raw mut STATUSES as u64 + slot as u64;
        let buffer = &raw mut BUFFERS as u64 + (slot * SLOT_BUFFER) as u64;
        let kind = match op {
            Op::Read => T_IN,
            Op::Write => T_OUT,
            Op::Flush => T_FLUSH,
        };
        poke(header, kind);
        poke(header + 4, 0u32);
        poke(header + 8, sector);
        poke(status, STATUS_UNSET);
        let d = 3 * slot as u16;
        if op == Op::Flush {
            self.descriptor(d, header, 16, DESC_NEXT, d + 2);
        } else {
            self.descriptor(d, header, 16, DESC_NEXT, d + 1);
            let flags = if op == Op::Read { DESC_WRITE } else { 0 };
            self.descriptor(d + 1, buffer, len, flags | DESC_NEXT, d + 2);
        }
        self.descriptor(d + 2, status, 1, DESC_WRITE, 0);
        let slot_at = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        poke(slot_at, d);
        // The entry before the index that publishes it.
        compiler_fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        poke(self.avail + 2, self.avail_idx);
        self.busy[slot] = true;
    }

    fn descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(index);
        poke(at, addr);
        poke(at + 8, len);
        poke(at + 12, flags);
        poke(at + 14, next);
    }

    /// Tells the device that requests are available.
    pub fn notify(&self) {
        compiler_fence(Ordering::SeqCst);
        outw(self.io + QUEUE_NOTIFY, 0);
        compiler_fence(Ordering::SeqCst);
    }

    /// The next completed request: (slot, status byte).
    pub fn poll(&mut self) -> Option<(usize, u8)> {
        compiler_fence(Ordering::SeqCst);
        if self.confused {
            return None;
        }
        let idx: u16 = peek(self.used + 2);
        if idx == self.last_used {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = peek(elem);
        self.last_used = self.last_used.wrapping_add(1);
        let slot = (id / 3) as usize;
        if id % 3 != 0 || slot >= SLOTS || !self.busy[slot] {
            self.confused = true;
            return None;
        }
        self.busy[slot] = false;
        let status = &raw mut STATUSES as u64 + slot as u64;
        Some((slot, peek(status)))
    }
}
