//! A VM's PCI bus and its virtio-blk disk: the glue between the pure device models
//! (`vmx::devices::pci`, `vmx::devices::virtio::blk`), the VM's I/O exits, and the backend
//! that holds the disk's bytes.
//!
//! # The backend seam
//!
//! [`BlockBackend`] is everything the kernel needs of a disk: its size, `submit` a request,
//! `poll` for completions. The device model parses requests out of the guest's ring and hands
//! them over; completions go back into the guest through the model. Today's backend is
//! [`RamDisk`] (frames of this node, zeroed at creation, gone with the VM); the iSCSI LUN
//! backend (storage network, initiator in the `storage` crate) implements the same trait and
//! plugs in without touching the model or the exit path.
//!
//! # Asynchronous on purpose
//!
//! The RAM disk could answer at once, but it completes a request only at the second
//! [`Platform::poll`] after it was submitted, i.e. in a later pass of the main loop: the guest
//! always runs with requests in flight, which is the path an iSCSI backend takes, so it is the
//! path the tests exercise.
//!
//! # Writes by the device into guest RAM
//!
//! Completions write read data, status bytes and used-ring entries into guest RAM through the
//! host's physical window, which the nested page tables' dirty bits never see. [`DmaMemory`]
//! records those pages in [`Platform::dma_dirty`], which the VM's dirty harvest merges, so a
//! migration re-sends them like pages the guest wrote itself.
//!
//! # Quiescing
//!
//! The device takes requests from the ring only while the VM runs ([`Platform::poll`] pauses
//! its intake otherwise); completions are delivered whatever the VM's state. So a migration
//! pauses the VM and waits until [`Platform::in_flight`] is 0; then the device state saves.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use guest_abi::disk::DiskDigest;
use kernel::frames::FRAME_SIZE;
use storage::LunPath;
use vmx::devices::pci::{PciDevices, PciFunction, PciHost, COMMAND_BUS_MASTER, COMMAND_IO};
use vmx::devices::virtio::blk::{
    BlkConfig, BlockError, BlockRequest, BlockResult, CompleteError, RequestId, RequestKind,
    VirtioBlk, BAR_SIZE, ID_BYTES, SECTOR_SIZE,
};
use vmx::dirty::DirtyBitmap;
use vmx::guest_mem::GuestMemory;

use super::memory::GuestRam;

/// PCI slot (device number on bus 0) of the disk.
pub const DISK_SLOT: u8 = 4;
/// Where the "firmware" puts the disk's I/O BAR (the guest may move it).
pub const DISK_IO_BASE: u16 = 0xC000;
/// The interrupt line the firmware reports (the PC's usual PCI IRQ; not delivered yet).
const DISK_IRQ_LINE: u8 = 11;
/// Largest RAM disk `vm create ... disk=ram:<MiB>` accepts.
pub const MAX_RAM_DISK_MIB: u64 = 1024;

/// Which disk a VM gets (`vm create ... disk=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// A zeroed RAM disk of this many MiB, on this node only.
    Ram { mib: u64 },
    /// A LUN on the cluster's shared iSCSI storage (`<target iqn>/<lun>`).
    Iscsi(LunPath),
}

impl DiskSpec {
    /// Parses the value of `disk=`: `ram:<MiB>` (1..=[`MAX_RAM_DISK_MIB`]) or
    /// `<target iqn>/<lun>`.
    pub fn parse(value: &str) -> Result<DiskSpec, String> {
        let usage = || {
            format!(
                "disk must be ram:<MiB> (a RAM disk of 1 to {MAX_RAM_DISK_MIB} MiB) or \
                 <target iqn>/<lun> (a shared LUN, see 'disk list'), not '{value}'"
            )
        };
        if let Some(size) = value.strip_prefix("ram:") {
            let mib: u64 = size.parse().map_err(|_| usage())?;
            if !(1..=MAX_RAM_DISK_MIB).contains(&mib) {
                return Err(usage());
            }
            return Ok(DiskSpec::Ram { mib });
        }
        if value.contains('/') {
            return LunPath::parse(value)
                .map(DiskSpec::Iscsi)
                .map_err(|e| format!("disk '{value}': {e}"));
        }
        Err(usage())
    }

    /// Host memory the disk takes, in MiB.
    pub fn host_mib(&self) -> u64 {
        match self {
            DiskSpec::Ram { mib } => *mib,
            DiskSpec::Iscsi(_) => 0,
        }
    }
}

impl core::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DiskSpec::Ram { mib } => write!(f, "{mib} MiB RAM disk"),
            DiskSpec::Iscsi(path) => write!(f, "iSCSI {path}"),
        }
    }
}

/// Where a disk's bytes live, as migration sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// Only on this node (a RAM disk): a VM with one cannot move.
    Local,
    /// On storage every node reaches (an iSCSI LUN): the disk is handed over, not copied.
    Shared,
}

/// What holds a disk's bytes (see the module documentation).
pub trait BlockBackend: Send {
    fn kind(&self) -> DiskKind;
    /// Size in 512-byte sectors.
    fn capacity_sectors(&self) -> u64;
    /// Takes a request; its completion comes out of a later [`BlockBackend::poll`], never out
    /// of this call.
    fn submit(&mut self, request: BlockRequest);
    /// Hands every completion that is ready to `done`: the data of a read (exactly the bytes
    /// asked for) or of GET_ID, nothing for writes and flushes.
    fn poll(&mut self, done: &mut dyn FnMut(RequestId, BlockResult<'_>));
    /// Requests submitted and not completed: a migration waits for 0.
    fn in_flight(&self) -> usize;
    /// Reads `buf.len()` bytes at `sector` at once, for diagnostics (`vm disk ... digest`);
    /// false if the backend cannot (a remote disk) or the range is outside the disk.
    fn inspect(&self, sector: u64, buf: &mut [u8]) -> bool;
}

/// A disk in this node's memory: one frame per 4 KiB, zeroed at creation, freed with the VM.
pub struct RamDisk {
    /// `None` only while being dropped.
    store: Option<GuestRam>,
    serial: [u8; ID_BYTES],
    /// Requests with the number of polls done when they were submitted.
    queue: VecDeque<(BlockRequest, u64)>,
    polls: u64,
    /// Reused buffer for read data.
    scratch: Vec<u8>,
}

impl RamDisk {
    /// A zeroed RAM disk of `mib` MiB whose GET_ID answers `serial` (cut to 20 bytes).
    pub fn new(mib: u64, serial: &str) -> Result<RamDisk, String> {
        let store = GuestRam::new(mib << 20)
            .map_err(|_| format!("not enough memory for a {mib} MiB RAM disk"))?;
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(RamDisk {
            store: Some(store),
            serial: id,
            queue: VecDeque::new(),
            polls: 0,
            scratch: Vec::new(),
        })
    }

    fn bytes(&self) -> u64 {
        self.store.as_ref().map_or(0, GuestRam::size)
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            store.free();
        }
    }
}

impl BlockBackend for RamDisk {
    fn kind(&self) -> DiskKind {
        DiskKind::Local
    }

    fn capacity_sectors(&self) -> u64 {
        self.bytes() / SECTOR_SIZE
    }

    fn submit(&mut self, request: BlockRequest) {
        self.queue.push_back((request, self.polls));
    }

    fn poll(&mut self, done: &mut dyn FnMut(RequestId, BlockResult<'_>)) {
        self.polls += 1;
        let Some(store) = self.store.as_mut() else {
            return;
        };
        // Only requests submitted before the previous poll: those of this pass wait for the
        // next one (see the module documentation).
        while self
            .queue
            .front()
            .is_some_and(|(_, at)| *at + 1 < self.polls)
        {
            let Some((request, _)) = self.queue.pop_front() else {
                break;
            };
            match request.kind {
                RequestKind::Read { sector, len } => {
                    self.scratch.clear();
                    self.scratch.resize(len as usize, 0);
                    let ok = store.read(sector * SECTOR_SIZE, &mut self.scratch);
                    let result = if ok {
                        Ok(&self.scratch[..])
                    } else {
                        Err(BlockError::Io)
                    };
                    done(request.id, result);
                }
                RequestKind::Write { sector, data } => {
                    let ok = store.write(sector * SECTOR_SIZE, &data);
                    done(request.id, if ok { Ok(&[]) } else { Err(BlockError::Io) });
                }
                // Every write is in RAM as soon as it completes: nothing to flush.
                RequestKind::Flush => done(request.id, Ok(&[])),
                RequestKind::GetId => done(request.id, Ok(&self.serial)),
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn inspect(&self, sector: u64, buf: &mut [u8]) -> bool {
        let Some(store) = self.store.as_ref() else {
            return false;
        };
        sector
            .checked_mul(SECTOR_SIZE)
            .is_some_and(|at| store.read(at, buf))
    }
}

/// Guest RAM as the devices write it: every page written is recorded for migration.
pub struct DmaMemory<'a> {
    pub ram: &'a mut GuestRam,
    pub dirty: &'a mut DirtyBitmap,
}

impl GuestMemory for DmaMemory<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.ram.read(gpa, buf)
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        if !self.ram.write(gpa, bytes) {
            return false;
        }
        if !bytes.is_empty() {
            let last = (gpa + bytes.len() as u64 - 1) / FRAME_SIZE;
            for page in gpa / FRAME_SIZE..=last {
                // In range: the write to RAM just succeeded.
                let _ = self.dirty.set(page);
            }
        }
        true
    }
}

/// A VM's virtio-blk disk: the device model and its backend.
pub struct VmDisk {
    pub spec: DiskSpec,
    pub device: VirtioBlk,
    backend: Box<dyn BlockBackend>,
    /// Reused list of requests taken from the ring.
    taken: Vec<BlockRequest>,
    /// The fault last logged, so a broken device is logged once.
    logged_fault: bool,
}

impl VmDisk {
    fn config(backend: &dyn BlockBackend) -> BlkConfig {
        BlkConfig::new(backend.capacity_sectors())
    }

    /// A device after power-on, set up by [`Self::firmware_setup`].
    fn fresh_device(backend: &dyn BlockBackend) -> VirtioBlk {
        let mut device = VirtioBlk::new(Self::config(backend))
            .unwrap_or_else(|_| unreachable!("the default block configuration is valid"));
        Self::firmware_setup(&mut device);
        device
    }

    /// What PC firmware does before the guest runs: BAR0 at [`DISK_IO_BASE`], I/O decoding
    /// and bus mastering on, the interrupt line noted.
    fn firmware_setup(device: &mut VirtioBlk) {
        let pci = device.pci_mut();
        pci.set_bar(0, u32::from(DISK_IO_BASE));
        pci.set_command(COMMAND_IO | COMMAND_BUS_MASTER);
        pci.set_interrupt_line(DISK_IRQ_LINE);
    }

    pub fn kind(&self) -> DiskKind {
        self.backend.kind()
    }

    /// Requests with the backend (including any the device forgot in a reset).
    pub fn in_flight(&self) -> usize {
        self.backend.in_flight()
    }

    /// The digest (`guest_abi::disk`) of the whole disk, read through the backend; `None`
    /// if the backend cannot be read at once.
    pub fn digest(&self) -> Option<DiskDigest> {
        let mut digest = DiskDigest::default();
        let mut chunk = alloc::vec![0u8; 64 * 1024];
        let sectors = self.backend.capacity_sectors();
        let per_chunk = chunk.len() as u64 / SECTOR_SIZE;
        let mut sector = 0;
        while sector < sectors {
            let n = per_chunk.min(sectors - sector);
            let buf = &mut chunk[..(n * SECTOR_SIZE) as usize];
            if !self.backend.inspect(sector, buf) {
                return None;
            }
            digest.add_image(sector, buf);
            sector += n;
        }
        Some(digest)
    }
}

/// The buses behind the PCI host: the disk at [`DISK_SLOT`].
struct Slots<'a> {
    disk: Option<&'a mut VirtioBlk>,
}

impl PciDevices for Slots<'_> {
    fn function(&mut self, device: u8, function: u8) -> Option<&mut dyn PciFunction> {
        if device == DISK_SLOT && function == 0 {
            return self.disk.as_deref_mut().map(|d| d as &mut dyn PciFunction);
        }
        None
    }
}

/// What one [`Platform::poll`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskPoll {
    /// Requests are still with the backend (the main loop keeps polling rather than sleeping).
    pub in_flight: bool,
    /// Completions reached the guest (a guest halted waiting for them should run now, as an
    /// interrupt would wake it on real hardware).
    pub delivered: bool,
}

/// A VM's platform devices beyond the serial port: the PCI host and bus, and the disk.
pub struct Platform {
    pub pci: PciHost,
    pub disk: Option<VmDisk>,
    /// Guest pages the devices wrote since the last dirty harvest.
    pub dma_dirty: DirtyBitmap,
}

impl Platform {
    /// The platform of a VM of `pages` guest pages, with `disk` if given.
    pub fn new(
        pages: u64,
        disk: Option<(DiskSpec, Box<dyn BlockBackend>)>,
    ) -> Result<Platform, String> {
        let dma_dirty = DirtyBitmap::new(pages).map_err(|e| format!("{e}"))?;
        let disk = disk.map(|(spec, backend)| VmDisk {
            spec,
            device: VmDisk::fresh_device(backend.as_ref()),
            backend,
            taken: Vec::new(),
            logged_fault: false,
        });
        Ok(Platform {
            pci: PciHost::new(),
            disk,
            dma_dirty,
        })
    }

    /// Power cycle: every device back to its state after power-on. The disk keeps its
    /// contents; requests still with the backend complete into nothing (the device's request
    /// ids keep counting across the cycle, so none can be mistaken for a new one).
    pub fn reset(&mut self) {
        self.pci = PciHost::new();
        if let Some(disk) = self.disk.as_mut() {
            disk.device.power_cycle();
            VmDisk::firmware_setup(&mut disk.device);
            disk.logged_fault = false;
        }
    }

    /// A guest `IN`; `None` if no device here decodes `port`.
    pub fn io_read(&mut self, port: u16, size: u8) -> Option<u32> {
        if PciHost::claims(port, size) {
            let mut slots = Slots {
                disk: self.disk.as_mut().map(|d| &mut d.device),
            };
            return Some(self.pci.read(port, size, &mut slots));
        }
        let disk = self.disk.as_mut()?;
        let offset = bar_offset(&disk.device, port)?;
        Some(disk.device.io_read(offset, size))
    }

    /// A guest `OUT`; false if no device here decodes `port`. A disk notify hands the
    /// requests it finds to the backend.
    pub fn io_write(&mut self, ram: &mut GuestRam, port: u16, size: u8, value: u32) -> bool {
        if PciHost::claims(port, size) {
            let mut slots = Slots {
                disk: self.disk.as_mut().map(|d| &mut d.device),
            };
            self.pci.write(port, size, value, &mut slots);
            return true;
        }
        let Some(disk) = self.disk.as_mut() else {
            return false;
        };
        let Some(offset) = bar_offset(&disk.device, port) else {
            return false;
        };
        let mut mem = DmaMemory {
            ram,
            dirty: &mut self.dma_dirty,
        };
        disk.device
            .io_write(&mut mem, offset, size, value, &mut disk.taken);
        for request in disk.taken.drain(..) {
            disk.backend.submit(request);
        }
        true
    }

    /// Delivers the backend's completions into the guest and, while the VM runs, hands the
    /// requests still waiting in the ring to the backend.
    pub fn poll(&mut self, ram: &mut GuestRam, running: bool, vm: &str) -> DiskPoll {
        let Some(disk) = self.disk.as_mut() else {
            return DiskPoll::default();
        };
        let mut delivered = false;
        let mut mem = DmaMemory {
            ram,
            dirty: &mut self.dma_dirty,
        };
        let device = &mut disk.device;
        disk.backend.poll(&mut |id, result| {
            match device.complete(&mut mem, id, result) {
                Ok(()) => delivered = true,
                // Dropped by a reset or a queue change: expected, nothing to deliver.
                Err(CompleteError::UnknownRequest { .. }) => {
                    log::debug!("vm {vm}: disk request {} completed after a reset", id.0)
                }
            }
        });
        if running {
            disk.device.resume_intake();
            disk.device.take_requests(&mut mem, &mut disk.taken);
            for request in disk.taken.drain(..) {
                disk.backend.submit(request);
            }
        } else {
            disk.device.pause_intake();
        }
        match disk.device.fault() {
            Some(fault) if !disk.logged_fault => {
                log::warn!("vm {vm}: virtio-blk stopped until the guest resets it: {fault}");
                disk.logged_fault = true;
            }
            Some(_) => {}
            None => disk.logged_fault = false,
        }
        DiskPoll {
            in_flight: disk.backend.in_flight() > 0,
            delivered,
        }
    }

    /// Requests the disk's backend still holds.
    pub fn in_flight(&self) -> usize {
        self.disk.as_ref().map_or(0, VmDisk::in_flight)
    }
}

/// The offset into the disk's I/O BAR of `port`, if the device decodes it.
fn bar_offset(device: &VirtioBlk, port: u16) -> Option<u16> {
    let base = device.io_base()?;
    let offset = port.checked_sub(base)?;
    (offset < BAR_SIZE).then_some(offset)
}
