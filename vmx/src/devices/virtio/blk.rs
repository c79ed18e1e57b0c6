#![forbid(unsafe_code)]
//! virtio-blk over PCI with the legacy interface (virtio 1.x spec, 5.2 "Block Device" and
//! 4.1.4.8 "Legacy Interfaces"): PCI 1AF4:1001, subsystem 1AF4:0002, class 01/00 (mass
//! storage), one request queue, BAR0 an I/O BAR of [`BAR_SIZE`] bytes.
//!
//! # The model does no I/O
//!
//! A guest notify makes the device walk its queue and hand back parsed [`BlockRequest`]s
//! (`take_requests`, or through [`VirtioBlk::io_write`]); the caller gives them to whatever
//! backend holds the disk (a RAM disk, an iSCSI LUN) and, whenever the backend is done, calls
//! [`VirtioBlk::complete`] with the request's id and result. The completion writes read data
//! into the guest's buffers, the status byte, the used ring, and raises the ISR bit. Requests
//! are tracked between the two ([`VirtioBlk::in_flight`]), and any number may be outstanding
//! and complete in any order, as virtio allows.
//!
//! # Quiescing for migration
//!
//! [`VirtioBlk::pause_intake`] stops the device from taking new requests from the ring (a
//! notify is remembered, not acted on); in-flight requests still complete. Once
//! [`VirtioBlk::in_flight`] is 0 the state can be saved ([`VirtioBlk::save`] refuses before).
//! Entries the guest queued meanwhile stay in its ring and are taken by the restored device
//! (the saved `last_avail` says where to continue), which re-scans its ring when it resumes.
//!
//! # Requests (5.2.6 "Device Operation")
//!
//! A request is one descriptor chain: the device-readable part starts with the 16-byte header
//! { type: u32, reserved: u32, sector: u64 }, followed (OUT) by the data; the device-writable
//! part holds the data (IN, GET_ID) and ends with the one-byte status. The model accepts any
//! split of these bytes into descriptors (what `VIRTIO_F_ANY_LAYOUT` would promise; legacy
//! drivers use one descriptor for the header and one for the status). Types: IN (0), OUT (1),
//! FLUSH (4), GET_ID (8); others complete at once with `VIRTIO_BLK_S_UNSUPP`.
//!
//! # What a misbehaving driver gets
//!
//! - Request-level faults complete at once with `VIRTIO_BLK_S_IOERR` and never reach the
//!   backend: a header shorter than 16 bytes, data not a multiple of 512 bytes or larger than
//!   [`BlkConfig::max_request_bytes`], sectors past the capacity, a write to a read-only disk,
//!   OUT data outside guest RAM. IN data that cannot be written (outside RAM) fails at completion
//!   with IOERR too.
//! - Queue-level faults (see [`QueueError`]: ring outside RAM, index jumps, loops, bad
//!   indirect tables), and chains without a writable status byte or with readable buffers after
//!   writable ones, put the device in `DEVICE_NEEDS_RESET` (status bit 6, plus a configuration
//!   interrupt): it stops processing and forgets its in-flight requests until the driver resets
//!   it. [`VirtioBlk::fault`] says why.
//!
//! Host memory is bounded whatever the guest does: at most [`BlkConfig::max_in_flight_bytes`]
//! of data (one request always fits) and at most `queue_size` requests are in flight; the
//! remaining entries wait in the guest's ring.
//!
//! # Interrupts
//!
//! The device raises ISR bit 0 on each completion (unless the driver set
//! `VRING_AVAIL_F_NO_INTERRUPT`), which [`VirtioBlk::interrupt_pending`] reports as its INTx
//! level until the guest reads the ISR. Delivering it needs an interrupt controller model,
//! which the platform does not have yet: drivers poll the used ring meanwhile.
//!
//! # Legacy quirks kept
//!
//! A notify is acted on once the queue has an address, even before `DRIVER_OK` (old Linux
//! drivers notify early, and QEMU accepts it too). Writing a queue address drops that queue's
//! in-flight requests (their completions are then ignored); so does a reset. Request ids are
//! never reused, so a backend completing a request the device no longer knows is harmless
//! ([`CompleteError::UnknownRequest`]).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use super::queue::{Chain, QueueError, Segment, SplitQueue};
use super::{
    F_RING_INDIRECT_DESC, ISR_CONFIG, ISR_QUEUE, PCI_VENDOR_ID, REG_DEVICE_CONFIG,
    REG_GUEST_FEATURES, REG_ISR, REG_QUEUE_NOTIFY, REG_QUEUE_PFN, REG_QUEUE_SEL, REG_STATUS,
    STATUS_NEEDS_RESET, STATUS_VALID,
};
use crate::devices::pci::{
    BarKind, PciConfig, PciFunction, PciIdentity, PciStateError, BAR_COUNT, CONFIG_STATE_LEN,
};
use crate::guest_mem::GuestMemory;

/// PCI device id of a transitional virtio-blk device.
pub const PCI_DEVICE_ID: u16 = 0x1001;
/// PCI subsystem id: the virtio device type (2 = block).
pub const PCI_SUBSYSTEM_ID: u16 = 2;
/// Size of the I/O BAR: the 20-byte legacy header and the 32-byte block configuration,
/// rounded up to a power of two.
pub const BAR_SIZE: u16 = 0x40;
/// Bytes per sector: the unit of `capacity` and of request sectors, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes GET_ID returns at most (the device serial, zero-padded).
pub const ID_BYTES: usize = 20;

// Feature bits (5.2.3).
/// `size_max` is valid: the largest single segment.
pub const F_SIZE_MAX: u32 = 1 << 1;
/// `seg_max` is valid: the most data segments in a request.
pub const F_SEG_MAX: u32 = 1 << 2;
/// The disk is read-only.
pub const F_RO: u32 = 1 << 5;
/// `blk_size` is valid.
pub const F_BLK_SIZE: u32 = 1 << 6;
/// FLUSH requests are supported (the cache is write-back until flushed).
pub const F_FLUSH: u32 = 1 << 9;

// Request types and statuses (5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Bytes of the request header.
const HEADER_LEN: usize = 16;
/// Largest segment the device announces (`size_max`).
const SIZE_MAX: u32 = 64 * 1024;

/// What the caller decides about a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// Queue size: a power of two, 2..=1024.
    pub queue_size: u16,
    /// Largest request data (a multiple of 512, at least 512); `seg_max` is derived from it.
    pub max_request_bytes: u32,
    /// Data bytes in flight at most (writes hold a copy; reads a buffer in the backend).
    pub max_in_flight_bytes: u64,
}

impl BlkConfig {
    /// A writable disk of `capacity_sectors` with the default queue and limits.
    pub fn new(capacity_sectors: u64) -> BlkConfig {
        BlkConfig {
            capacity_sectors,
            read_only: false,
            queue_size: 128,
            max_request_bytes: 1 << 20,
            max_in_flight_bytes: 2 << 20,
        }
    }

    /// The features the device offers.
    pub fn host_features(&self) -> u32 {
        let mut f = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_RING_INDIRECT_DESC;
        if self.read_only {
            f |= F_RO;
        }
        f
    }

    /// `seg_max`: segments of up to `size_max` bytes that fit the largest request, and at most
    /// the queue size minus the header and status descriptors.
    fn seg_max(&self) -> u32 {
        (self.max_request_bytes / SIZE_MAX)
            .max(1)
            .min(u32::from(self.queue_size).saturating_sub(2).max(1))
    }
}

/// Why a device could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkConfigError {
    BadQueueSize { size: u16 },
    BadMaxRequest { bytes: u32 },
}

impl fmt::Display for BlkConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkConfigError::BadQueueSize { size } => {
                write!(f, "queue size {size}: a power of two from 2 to 1024")
            }
            BlkConfigError::BadMaxRequest { bytes } => {
                write!(
                    f,
                    "largest request {bytes} bytes: a multiple of 512, at least 512"
                )
            }
        }
    }
}

/// Identifies a request between [`VirtioBlk::take_requests`] and [`VirtioBlk::complete`];
/// never reused by a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// What the backend is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes (a multiple of 512) from `sector`; complete with exactly `len` bytes.
    Read { sector: u64, len: u32 },
    /// Write `data` (a multiple of 512 bytes, copied from the guest) at `sector`.
    Write { sector: u64, data: Vec<u8> },
    /// Make every completed write durable.
    Flush,
    /// The disk's serial (complete with up to [`ID_BYTES`] bytes).
    GetId,
}

/// A request for the backend. Sector ranges are already checked against the capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    pub id: RequestId,
    pub kind: RequestKind,
}

/// Why a backend failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// The I/O failed (`VIRTIO_BLK_S_IOERR`).
    Io,
    /// The backend cannot do this (`VIRTIO_BLK_S_UNSUPP`).
    Unsupported,
}

/// A backend's answer to a request: the data of a read or GET_ID (nothing for writes and
/// flushes), or why it failed.
pub type BlockResult<'a> = Result<&'a [u8], BlockError>;

/// Why [`VirtioBlk::complete`] did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteError {
    /// The device does not know this id: never issued, completed already, or dropped by a
    /// reset or a queue change (then the completion is expected and harmless).
    UnknownRequest { id: RequestId },
}

impl fmt::Display for CompleteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompleteError::UnknownRequest { id } => {
                write!(f, "virtio-blk: no request {} in flight", id.0)
            }
        }
    }
}

/// Why the device stopped (it is in `DEVICE_NEEDS_RESET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFault {
    Queue(QueueError),
    /// A chain with no writable byte for the status.
    NoStatusByte {
        head: u16,
    },
    /// The status byte lies outside guest RAM.
    StatusOutsideRam {
        head: u16,
    },
    /// A device-readable buffer after a device-writable one.
    ReadableAfterWritable {
        head: u16,
    },
}

impl fmt::Display for DeviceFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceFault::Queue(e) => write!(f, "{e}"),
            DeviceFault::NoStatusByte { head } => {
                write!(f, "request {head} has no writable status byte")
            }
            DeviceFault::StatusOutsideRam { head } => {
                write!(f, "request {head}: status byte outside guest RAM")
            }
            DeviceFault::ReadableAfterWritable { head } => {
                write!(f, "request {head}: readable buffer after a writable one")
            }
        }
    }
}

/// Why [`VirtioBlk::save`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveError {
    /// Requests are still with the backend: quiesce first (pause intake, let them complete).
    RequestsInFlight { count: usize },
}

impl fmt::Display for SaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SaveError::RequestsInFlight { count } => write!(
                f,
                "virtio-blk has {count} requests in flight: quiesce before saving"
            ),
        }
    }
}

/// Why saved virtio-blk state was refused by [`VirtioBlk::restore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkStateError {
    Truncated,
    BadMagic,
    UnsupportedVersion {
        version: u8,
    },
    /// The PCI header part was refused.
    Pci(PciStateError),
    /// The saved device describes another disk (capacity, features, queue size).
    ConfigMismatch {
        what: &'static str,
    },
    /// A field no device can hold (byte offset into the state).
    InvalidValue {
        at: usize,
    },
    TrailingBytes,
}

impl fmt::Display for BlkStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkStateError::Truncated => write!(f, "virtio-blk state truncated"),
            BlkStateError::BadMagic => write!(f, "not virtio-blk state (bad magic)"),
            BlkStateError::UnsupportedVersion { version } => {
                write!(f, "unsupported virtio-blk state version {version}")
            }
            BlkStateError::Pci(e) => write!(f, "virtio-blk PCI header: {e}"),
            BlkStateError::ConfigMismatch { what } => {
                write!(f, "virtio-blk state is for another disk: {what} differs")
            }
            BlkStateError::InvalidValue { at } => {
                write!(f, "invalid value in virtio-blk state at byte {at}")
            }
            BlkStateError::TrailingBytes => write!(f, "trailing bytes after virtio-blk state"),
        }
    }
}

/// Requests handled since the device was created (not part of the saved state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Completed with IOERR (at once or from the backend).
    pub io_errors: u64,
    /// Completed with UNSUPP.
    pub unsupported: u64,
}

/// What the device must do when a request completes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// IN: scatter `len` bytes into `buffers`.
    Read {
        buffers: Vec<Segment>,
        len: u32,
    },
    Write {
        len: u32,
    },
    Flush,
    /// GET_ID: copy up to 20 bytes into `buffers`.
    GetId {
        buffers: Vec<Segment>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    head: u16,
    status_gpa: u64,
    pending: Pending,
    /// Data bytes counted against the in-flight budget.
    bytes: u64,
}

/// The virtio-blk device (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioBlk {
    config: BlkConfig,
    pci: PciConfig,
    guest_features: u32,
    status: u8,
    isr: u8,
    queue_sel: u16,
    queue_pfn: u32,
    queue: Option<SplitQueue>,
    in_flight: BTreeMap<u64, InFlight>,
    in_flight_bytes: u64,
    next_id: u64,
    /// The ring may hold entries not taken yet: a notify came, or limits stopped the last
    /// walk early.
    kick: bool,
    intake_paused: bool,
    fault: Option<DeviceFault>,
    stats: BlkStats,
}

/// Version of [`VirtioBlk::save`]. Format version 1, little-endian:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | magic `"VBLK"` |
/// | 4 | version |
/// | 5..74 | PCI header ([`PciConfig::save`]) |
/// | 74..82 | capacity in sectors (must match the restoring device) |
/// | 82..86 | host features (must match) |
/// | 86..88 | queue size (must match) |
/// | 88..92 | guest features |
/// | 92 | device status |
/// | 93 | ISR |
/// | 94..96 | queue select |
/// | 96..100 | queue PFN |
/// | 100..102 | last available index taken |
/// | 102..104 | next used index (equals the previous unless the device needs a reset: nothing is in flight) |
/// | 104..112 | next request id |
pub const STATE_VERSION: u8 = 1;
const STATE_MAGIC: [u8; 4] = *b"VBLK";
const PCI_AT: usize = 5;
const FIELDS_AT: usize = PCI_AT + CONFIG_STATE_LEN;
/// Bytes of a saved device.
pub const STATE_LEN: usize = FIELDS_AT + 38;

impl VirtioBlk {
    /// A device after power-on: PCI decoding off, no driver, no queue.
    pub fn new(config: BlkConfig) -> Result<VirtioBlk, BlkConfigError> {
        if !config.queue_size.is_power_of_two() || !(2..=1024).contains(&config.queue_size) {
            return Err(BlkConfigError::BadQueueSize {
                size: config.queue_size,
            });
        }
        if config.max_request_bytes < 512 || config.max_request_bytes % 512 != 0 {
            return Err(BlkConfigError::BadMaxRequest {
                bytes: config.max_request_bytes,
            });
        }
        let identity = PciIdentity {
            vendor_id: PCI_VENDOR_ID,
            device_id: PCI_DEVICE_ID,
            revision: 0,
            class: [0x01, 0x00, 0x00],
            subsystem_vendor_id: PCI_VENDOR_ID,
            subsystem_id: PCI_SUBSYSTEM_ID,
            interrupt_pin: 1,
        };
        let mut bars = [BarKind::None; BAR_COUNT];
        bars[0] = BarKind::Io {
            size: u32::from(BAR_SIZE),
        };
        let pci = PciConfig::new(identity, bars)
            .unwrap_or_else(|_| unreachable!("BAR_SIZE is a valid I/O BAR size"));
        Ok(VirtioBlk {
            config,
            pci,
            guest_features: 0,
            status: 0,
            isr: 0,
            queue_sel: 0,
            queue_pfn: 0,
            queue: None,
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            next_id: 1,
            kick: false,
            intake_paused: false,
            fault: None,
            stats: BlkStats::default(),
        })
    }

    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// The PCI configuration header.
    pub fn pci(&self) -> &PciConfig {
        &self.pci
    }

    /// The PCI header, for firmware-like set-up (assigning BAR0, enabling I/O decoding).
    pub fn pci_mut(&mut self) -> &mut PciConfig {
        &mut self.pci
    }

    /// The first port of BAR0 while the device decodes I/O; `None` when decoding is off or
    /// BAR0 is unassigned (0). (Sized with decoding on, the BAR decodes at its size mask,
    /// `0xFFC0`, as real hardware would.)
    pub fn io_base(&self) -> Option<u16> {
        if !self.pci.io_enabled() {
            return None;
        }
        let base = self.pci.bar_address(0)?;
        let end = base.checked_add(u32::from(BAR_SIZE))?;
        (base != 0 && end <= 0x1_0000).then_some(base as u16)
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Features the driver accepted.
    pub fn guest_features(&self) -> u32 {
        self.guest_features
    }

    /// Requests handed out and not completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Data bytes of the requests in flight.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// Why the device needs a reset, if it does.
    pub fn fault(&self) -> Option<DeviceFault> {
        self.fault
    }

    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// Power-on reset (the VM is power-cycled): the device and its PCI header as after
    /// [`Self::new`], except that request ids keep counting, so a backend completing a request
    /// of the previous power cycle can never complete one of this cycle by mistake.
    pub fn power_cycle(&mut self) {
        let next_id = self.next_id;
        let config = self.config;
        *self = VirtioBlk::new(config)
            .unwrap_or_else(|_| unreachable!("the configuration was accepted before"));
        self.next_id = next_id;
    }

    /// Stops taking requests from the ring (a notify is remembered); completions go on.
    pub fn pause_intake(&mut self) {
        self.intake_paused = true;
    }

    /// Takes requests again (the next [`Self::take_requests`] re-scans the ring).
    pub fn resume_intake(&mut self) {
        if self.intake_paused {
            self.intake_paused = false;
            self.kick = self.queue.is_some();
        }
    }

    pub fn intake_paused(&self) -> bool {
        self.intake_paused
    }

    /// Whether the device asserts INTx: an ISR bit is set and INTx is not disabled.
    pub fn interrupt_pending(&self) -> bool {
        self.isr != 0 && !self.pci.intx_disabled()
    }

    /// A guest `IN` of `size` bytes at `offset` into BAR0. Reading the ISR byte clears it.
    /// Bytes past the BAR read as all ones.
    pub fn io_read(&mut self, offset: u16, size: u8) -> u32 {
        let mut value = 0u32;
        let mut read_isr = false;
        for i in 0..u16::from(size.min(4)) {
            let at = offset.saturating_add(i);
            read_isr |= at == REG_ISR;
            value |= u32::from(self.register_byte(at)) << (8 * i);
        }
        if read_isr {
            self.isr = 0;
        }
        value
    }

    /// One byte of the register file as reads see it.
    fn register_byte(&self, at: u16) -> u8 {
        let queue_num = if self.queue_sel == 0 {
            self.config.queue_size
        } else {
            0
        };
        let le32 = |v: u32, i: u16| v.to_le_bytes()[usize::from(i)];
        let le16 = |v: u16, i: u16| v.to_le_bytes()[usize::from(i)];
        match at {
            0x00..=0x03 => le32(self.config.host_features(), at),
            0x04..=0x07 => le32(self.guest_features, at - 0x04),
            0x08..=0x0B => le32(self.queue_pfn, at - 0x08),
            0x0C..=0x0D => le16(queue_num, at - 0x0C),
            0x0E..=0x0F => le16(self.queue_sel, at - 0x0E),
            0x10..=0x11 => 0,
            REG_STATUS => self.status,
            REG_ISR => self.isr,
            _ if at < BAR_SIZE => {
                let i = usize::from(at - REG_DEVICE_CONFIG);
                self.device_config().get(i).copied().unwrap_or(0)
            }
            _ => 0xFF,
        }
    }

    /// `struct virtio_blk_config` up to `opt_io_size` (32 bytes): capacity, size_max,
    /// seg_max, geometry (0: not offered), blk_size, topology (0: not offered).
    fn device_config(&self) -> [u8; 32] {
        let mut c = [0u8; 32];
        c[0..8].copy_from_slice(&self.config.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&self.config.seg_max().to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// A guest `OUT` of the low `size` bytes of `value` at `offset` into BAR0. Registers are
    /// written at their first byte (with any access size; the value is cut to the register's
    /// width); other writes, and all writes to the device configuration, are ignored. A notify
    /// takes what the ring holds: the requests for the backend are appended to `out`.
    pub fn io_write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        offset: u16,
        size: u8,
        value: u32,
        out: &mut Vec<BlockRequest>,
    ) {
        let value = match size {
            1 => value & 0xFF,
            2 => value & 0xFFFF,
            _ => value,
        };
        match offset {
            REG_GUEST_FEATURES => self.guest_features = value & self.config.host_features(),
            REG_QUEUE_PFN => {
                if self.queue_sel == 0 {
                    self.set_queue_pfn(value);
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value as u16,
            REG_QUEUE_NOTIFY => {
                if value as u16 == 0 {
                    self.kick = true;
                    self.take_requests(mem, out);
                }
            }
            REG_STATUS => {
                let status = value as u8;
                if status == 0 {
                    self.reset();
                } else {
                    // NEEDS_RESET is the device's: the driver can only clear it by a reset.
                    self.status = (status & STATUS_VALID & !STATUS_NEEDS_RESET)
                        | (self.status & STATUS_NEEDS_RESET);
                }
            }
            _ => {}
        }
    }

    fn set_queue_pfn(&mut self, pfn: u32) {
        self.drop_in_flight();
        self.queue_pfn = pfn;
        self.queue = (pfn != 0).then(|| SplitQueue::legacy(pfn, self.config.queue_size));
        self.kick = false;
    }

    /// Device reset (status 0 written): everything but the PCI header back to power-on;
    /// requests in flight are forgotten.
    fn reset(&mut self) {
        self.drop_in_flight();
        self.guest_features = 0;
        self.status = 0;
        self.isr = 0;
        self.queue_sel = 0;
        self.queue_pfn = 0;
        self.queue = None;
        self.kick = false;
        self.fault = None;
    }

    fn drop_in_flight(&mut self) {
        self.in_flight.clear();
        self.in_flight_bytes = 0;
    }

    /// Enters `DEVICE_NEEDS_RESET` (virtio 1.x 2.1.2): stop, tell the driver through a
    /// configuration interrupt, forget the requests in flight (their completions would write
    /// into a queue the driver must rebuild anyway).
    fn break_device(&mut self, fault: DeviceFault) {
        self.status |= STATUS_NEEDS_RESET;
        self.isr |= ISR_CONFIG;
        self.fault = Some(fault);
        self.drop_in_flight();
        self.kick = false;
    }

    fn broken(&self) -> bool {
        self.status & STATUS_NEEDS_RESET != 0
    }

    /// Takes the requests waiting in the ring (after a notify, or left over by the limits) and
    /// appends those for the backend to `out`; malformed ones complete at once. Does nothing
    /// while intake is paused, the device is broken or no notify is pending. Call it again
    /// after completions: requests held back by the in-flight limits are taken then.
    pub fn take_requests<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        out: &mut Vec<BlockRequest>,
    ) {
        if !self.kick || self.intake_paused || self.broken() {
            return;
        }
        let Some(mut queue) = self.queue.take() else {
            self.kick = false;
            return;
        };
        let indirect = self.guest_features & F_RING_INDIRECT_DESC != 0;
        let limit = usize::from(queue.size());
        loop {
            let room = self.in_flight.len() < limit
                && (self.in_flight.is_empty()
                    || self.in_flight_bytes < self.config.max_in_flight_bytes);
            if !room {
                // The rest waits for completions; `kick` stays set.
                break;
            }
            match queue.pop(mem, indirect) {
                Ok(Some(chain)) => {
                    if let Err(fault) = self.start(mem, &mut queue, chain, out) {
                        self.break_device(fault);
                        break;
                    }
                }
                Ok(None) => {
                    self.kick = false;
                    break;
                }
                Err(e) => {
                    self.break_device(DeviceFault::Queue(e));
                    break;
                }
            }
        }
        self.queue = Some(queue);
    }

    /// Parses one chain: a request for the backend, an immediate completion, or a fault.
    fn start<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        queue: &mut SplitQueue,
        chain: Chain,
        out: &mut Vec<BlockRequest>,
    ) -> Result<(), DeviceFault> {
        let head = chain.head;
        let first_writable = chain
            .segments
            .iter()
            .position(|s| s.writable)
            .ok_or(DeviceFault::NoStatusByte { head })?;
        let (readable, writable) = chain.segments.split_at(first_writable);
        if writable.iter().any(|s| !s.writable) {
            return Err(DeviceFault::ReadableAfterWritable { head });
        }
        // The status byte is the last writable byte; the rest of the writable part is data.
        let mut data_in: Vec<Segment> = writable.to_vec();
        let last = data_in
            .last_mut()
            .ok_or(DeviceFault::NoStatusByte { head })?;
        // A buffer running past the top of the address space has no last byte to write.
        let status_gpa = last
            .addr
            .checked_add(u64::from(last.len) - 1)
            .ok_or(DeviceFault::StatusOutsideRam { head })?;
        last.len -= 1;
        if last.len == 0 {
            data_in.pop();
        }
        let mut probe = [0u8; 1];
        if !mem.read(status_gpa, &mut probe) {
            return Err(DeviceFault::StatusOutsideRam { head });
        }
        let in_len = data_in
            .iter()
            .try_fold(0u64, |a, s| a.checked_add(u64::from(s.len)));

        let mut header = [0u8; HEADER_LEN];
        let (header_ok, data_out) = split_readable(mem, readable, &mut header);
        if !header_ok {
            return self.finish_now(mem, queue, head, status_gpa, S_IOERR);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let max = u64::from(self.config.max_request_bytes);

        let (pending, kind) = match kind {
            T_IN => {
                let Some(len) = in_len.filter(|&l| l <= max && l % SECTOR_SIZE == 0) else {
                    return self.finish_now(mem, queue, head, status_gpa, S_IOERR);
                };
                if !self.in_range(sector, len) {
                    return self.finish_now(mem, queue, head, status_gpa, S_IOERR);
                }
                let len = len as u32;
                (
                    Pending::Read {
                        buffers: data_in,
                        len,
                    },
                    RequestKind::Read { sector, len },
                )
            }
            T_OUT => {
                let len = data_out
                    .iter()
                    .try_fold(0u64, |a, s| a.checked_add(u64::from(s.len)));
                let Some(len) = len.filter(|&l| l <= max && l % SECTOR_SIZE == 0) else {
                    return self.finish_now(mem, queue, head, status_gpa, S_IOERR);
                };
                if self.config.read_only || !self.in_range(sector, len) {
                    return self.finish_now(mem, queue, head, status_gpa, S_IOERR);
                }
                let Some(data) = gather(mem, &data_out, len as usize) else {
                    return self.finish_now(mem, queue, head, status_gpa, S_IOERR);
                };
                (
                    Pending::Write { len: len as u32 },
                    RequestKind::Write { sector, data },
                )
            }
            T_FLUSH => (Pending::Flush, RequestKind::Flush),
            T_GET_ID => (Pending::GetId { buffers: data_in }, RequestKind::GetId),
            _ => return self.finish_now(mem, queue, head, status_gpa, S_UNSUPP),
        };
        let bytes = match &kind {
            RequestKind::Read { len, .. } => u64::from(*len),
            RequestKind::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight.insert(
            id,
            InFlight {
                head,
                status_gpa,
                pending,
                bytes,
            },
        );
        self.in_flight_bytes += bytes;
        out.push(BlockRequest {
            id: RequestId(id),
            kind,
        });
        Ok(())
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_add(len / SECTOR_SIZE)
            .is_some_and(|end| end <= self.config.capacity_sectors)
    }

    /// Completes a request that never reached the backend.
    fn finish_now<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        queue: &mut SplitQueue,
        head: u16,
        status_gpa: u64,
        status: u8,
    ) -> Result<(), DeviceFault> {
        self.count_status(status);
        self.finish(mem, queue, head, status_gpa, status, 1)
            .map_err(DeviceFault::Queue)
    }

    fn count_status(&mut self, status: u8) {
        match status {
            S_IOERR => self.stats.io_errors += 1,
            S_UNSUPP => self.stats.unsupported += 1,
            _ => {}
        }
    }

    /// Writes the status byte, returns the chain through the used ring, raises the ISR bit.
    fn finish<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        queue: &mut SplitQueue,
        head: u16,
        status_gpa: u64,
        status: u8,
        used_len: u32,
    ) -> Result<(), QueueError> {
        // The status byte was checked to be RAM when the request was parsed; if the guest
        // has since moved its RAM around (it cannot), the used element still goes back.
        let _ = mem.write(status_gpa, &[status]);
        queue.push_used(mem, head, used_len)?;
        if !queue.interrupts_suppressed(mem) {
            self.isr |= ISR_QUEUE;
        }
        Ok(())
    }

    /// Completes request `id` with the backend's `result`: for a read, `Ok(data)` must hold
    /// exactly the bytes asked for (otherwise the guest gets IOERR); for GET_ID, up to 20 bytes
    /// of serial; writes and flushes ignore the data.
    pub fn complete<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        id: RequestId,
        result: BlockResult<'_>,
    ) -> Result<(), CompleteError> {
        let request = self
            .in_flight
            .remove(&id.0)
            .ok_or(CompleteError::UnknownRequest { id })?;
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(request.bytes);
        let (status, used_len) = match (&request.pending, result) {
            (_, Err(BlockError::Io)) => (S_IOERR, 1),
            (_, Err(BlockError::Unsupported)) => (S_UNSUPP, 1),
            (Pending::Read { buffers, len }, Ok(data)) => {
                if data.len() != *len as usize {
                    (S_IOERR, 1)
                } else if scatter(mem, buffers, data) {
                    self.stats.reads += 1;
                    self.stats.read_bytes += u64::from(*len);
                    (S_OK, len + 1)
                } else {
                    (S_IOERR, 1)
                }
            }
            (Pending::GetId { buffers }, Ok(data)) => {
                let mut id_bytes = [0u8; ID_BYTES];
                let n = data.len().min(ID_BYTES);
                id_bytes[..n].copy_from_slice(&data[..n]);
                let room = buffers.iter().map(|s| s.len as usize).sum::<usize>();
                let n = room.min(ID_BYTES);
                if scatter(mem, buffers, &id_bytes[..n]) {
                    self.stats.get_ids += 1;
                    (S_OK, n as u32 + 1)
                } else {
                    (S_IOERR, 1)
                }
            }
            (Pending::Write { len }, Ok(_)) => {
                self.stats.writes += 1;
                self.stats.write_bytes += u64::from(*len);
                (S_OK, 1)
            }
            (Pending::Flush, Ok(_)) => {
                self.stats.flushes += 1;
                (S_OK, 1)
            }
        };
        self.count_status(status);
        let Some(mut queue) = self.queue.take() else {
            return Ok(());
        };
        if let Err(e) = self.finish(
            mem,
            &mut queue,
            request.head,
            request.status_gpa,
            status,
            used_len,
        ) {
            self.break_device(DeviceFault::Queue(e));
        }
        self.queue = Some(queue);
        Ok(())
    }

    /// Appends the device state to `out` (format [`STATE_VERSION`]). Refused while requests
    /// are in flight: their completions could not be delivered by the restored device.
    pub fn save(&self, out: &mut Vec<u8>) -> Result<(), SaveError> {
        if !self.in_flight.is_empty() {
            return Err(SaveError::RequestsInFlight {
                count: self.in_flight.len(),
            });
        }
        let (last_avail, next_used) = self
            .queue
            .as_ref()
            .map_or((0, 0), |q| (q.last_avail(), q.next_used()));
        out.extend_from_slice(&STATE_MAGIC);
        out.push(STATE_VERSION);
        self.pci.save(out);
        out.extend_from_slice(&self.config.capacity_sectors.to_le_bytes());
        out.extend_from_slice(&self.config.host_features().to_le_bytes());
        out.extend_from_slice(&self.config.queue_size.to_le_bytes());
        out.extend_from_slice(&self.guest_features.to_le_bytes());
        out.push(self.status);
        out.push(self.isr);
        out.extend_from_slice(&self.queue_sel.to_le_bytes());
        out.extend_from_slice(&self.queue_pfn.to_le_bytes());
        out.extend_from_slice(&last_avail.to_le_bytes());
        out.extend_from_slice(&next_used.to_le_bytes());
        out.extend_from_slice(&self.next_id.to_le_bytes());
        Ok(())
    }

    /// Rebuilds a device for the disk `config` from bytes produced by [`Self::save`]. Every
    /// field is checked: the bytes come from another host and must describe this disk.
    /// The restored device re-scans its ring for entries queued while the source was paused.
    pub fn restore(config: BlkConfig, bytes: &[u8]) -> Result<VirtioBlk, BlkStateError> {
        let mut dev = VirtioBlk::new(config).map_err(|_| BlkStateError::ConfigMismatch {
            what: "device configuration",
        })?;
        if bytes.len() < STATE_LEN {
            // Tell a foreign blob from a short one.
            if bytes.len() >= 4 && bytes[0..4] != STATE_MAGIC {
                return Err(BlkStateError::BadMagic);
            }
            return Err(BlkStateError::Truncated);
        }
        if bytes.len() > STATE_LEN {
            return Err(BlkStateError::TrailingBytes);
        }
        if bytes[0..4] != STATE_MAGIC {
            return Err(BlkStateError::BadMagic);
        }
        if bytes[4] != STATE_VERSION {
            return Err(BlkStateError::UnsupportedVersion { version: bytes[4] });
        }
        dev.pci
            .restore(&bytes[PCI_AT..FIELDS_AT])
            .map_err(BlkStateError::Pci)?;
        let f = &bytes[FIELDS_AT..];
        let u16_at = |i: usize| u16::from_le_bytes([f[i], f[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([f[i], f[i + 1], f[i + 2], f[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&f[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if u64_at(0) != config.capacity_sectors {
            return Err(BlkStateError::ConfigMismatch { what: "capacity" });
        }
        if u32_at(8) != config.host_features() {
            return Err(BlkStateError::ConfigMismatch { what: "features" });
        }
        if u16_at(12) != config.queue_size {
            return Err(BlkStateError::ConfigMismatch { what: "queue size" });
        }
        let guest_features = u32_at(14);
        if guest_features & !config.host_features() != 0 {
            return Err(BlkStateError::InvalidValue { at: FIELDS_AT + 14 });
        }
        let status = f[18];
        if status & !STATUS_VALID != 0 {
            return Err(BlkStateError::InvalidValue { at: FIELDS_AT + 18 });
        }
        let isr = f[19];
        if isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(BlkStateError::InvalidValue { at: FIELDS_AT + 19 });
        }
        let queue_sel = u16_at(20);
        let queue_pfn = u32_at(22);
        let last_avail = u16_at(26);
        let next_used = u16_at(28);
        // Nothing was in flight: every entry taken was returned, unless the device broke (the
        // entry that broke it is consumed and never returned).
        let broken = status & STATUS_NEEDS_RESET != 0;
        if (last_avail != next_used && !broken) || (queue_pfn == 0 && last_avail != 0) {
            return Err(BlkStateError::InvalidValue { at: FIELDS_AT + 26 });
        }
        let next_id = u64_at(30);
        if next_id == 0 {
            return Err(BlkStateError::InvalidValue { at: FIELDS_AT + 30 });
        }
        dev.guest_features = guest_features;
        dev.status = status;
        dev.isr = isr;
        dev.queue_sel = queue_sel;
        dev.queue_pfn = queue_pfn;
        dev.queue = (queue_pfn != 0).then(|| {
            let mut q = SplitQueue::legacy(queue_pfn, config.queue_size);
            q.set_positions(last_avail, next_used);
            q
        });
        dev.next_id = next_id;
        // A broken device stays broken (the driver must reset it); why it broke stayed on the
        // source, so `fault` is None here.
        dev.kick = dev.queue.is_some();
        Ok(dev)
    }
}

impl PciFunction for VirtioBlk {
    fn config_read(&self, offset: u8, size: u8) -> u32 {
        self.pci.read(offset, size)
    }

    fn config_write(&mut self, offset: u8, size: u8, value: u32) {
        self.pci.write(offset, size, value)
    }
}

/// Reads the 16-byte header from the start of the readable buffers into `header`; returns
/// whether it was all there and readable, and the buffers (trimmed) that follow it.
fn split_readable<M: GuestMemory + ?Sized>(
    mem: &M,
    readable: &[Segment],
    header: &mut [u8; HEADER_LEN],
) -> (bool, Vec<Segment>) {
    let mut filled = 0usize;
    let mut rest = Vec::new();
    for s in readable {
        if filled < HEADER_LEN {
            let take = (HEADER_LEN - filled).min(s.len as usize);
            if !mem.read(s.addr, &mut header[filled..filled + take]) {
                return (false, rest);
            }
            filled += take;
            if take < s.len as usize {
                // Never wraps: the read of `take` bytes at `s.addr` just succeeded.
                rest.push(Segment {
                    addr: s.addr + take as u64,
                    len: s.len - take as u32,
                    writable: false,
                });
            }
        } else {
            rest.push(*s);
        }
    }
    (filled == HEADER_LEN, rest)
}

/// Copies `len` bytes out of the guest's buffers; `None` if some lie outside RAM or memory
/// for the copy is short.
fn gather<M: GuestMemory + ?Sized>(mem: &M, segments: &[Segment], len: usize) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    data.try_reserve_exact(len).ok()?;
    data.resize(len, 0);
    let mut at = 0usize;
    for s in segments {
        let n = s.len as usize;
        if !mem.read(s.addr, &mut data[at..at + n]) {
            return None;
        }
        at += n;
    }
    Some(data)
}

/// Copies `data` into the guest's buffers in order (stopping when `data` ends); false if a
/// buffer lies outside RAM.
fn scatter<M: GuestMemory + ?Sized>(mem: &mut M, segments: &[Segment], data: &[u8]) -> bool {
    let mut at = 0usize;
    for s in segments {
        if at >= data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - at);
        if !mem.write(s.addr, &data[at..at + n]) {
            return false;
        }
        at += n;
    }
    true
}
