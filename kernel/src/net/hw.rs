//! The hardware seams of the NIC drivers in `net`: a BAR mapped uncached ([`BarMmio`]) and
//! physically contiguous frames seen through the physical-memory window ([`DmaMemory`]).
//! Every access is bounds-checked against what was mapped or allocated.

use core::ptr::NonNull;

use ::net::hw::{DmaRegion, Mmio};
use ::net::pci::{ConfigSpace, PciAddress};
use ::net::virtio_drivers;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
use x86_64::PhysAddr;

use crate::mem;
use crate::pci::PortConfig;

/// A device's register BAR, mapped uncached. A clone is a second window onto the same registers
/// (the NIC interrupt handler keeps one: it cannot reach the driver's).
#[derive(Clone)]
pub struct BarMmio {
    base: u64,
    len: usize,
}

impl BarMmio {
    /// Maps `len` bytes of registers at physical address `phys`.
    pub fn map(phys: u64, len: usize) -> Result<BarMmio, mem::MmioError> {
        let virt = mem::map_mmio_range(PhysAddr::new(phys), len as u64)?;
        Ok(BarMmio {
            base: virt.as_u64(),
            len,
        })
    }

    fn check(&self, offset: usize) {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "register offset {offset:#x} outside the {:#x}-byte BAR",
            self.len
        );
    }
}

impl Mmio for BarMmio {
    fn read32(&self, offset: usize) -> u32 {
        self.check(offset);
        // SAFETY: `base..base + len` maps the device's registers uncached (`map`), and the
        // offset was checked to lie inside it and be aligned.
        unsafe { core::ptr::read_volatile((self.base + offset as u64) as *const u32) }
    }

    fn write32(&self, offset: usize, value: u32) {
        self.check(offset);
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile((self.base + offset as u64) as *mut u32, value) }
    }
}

/// Zeroed, physically contiguous frames owned by one driver for its whole life.
pub struct DmaMemory {
    hpa: u64,
    ptr: *mut u8,
    len: usize,
}

impl DmaMemory {
    /// At least `bytes`, in whole frames; `None` if no contiguous run is free.
    pub fn alloc(bytes: usize) -> Option<DmaMemory> {
        let frames = bytes.div_ceil(4096).max(1);
        let hpa = mem::alloc_zeroed_contiguous(frames)?;
        Some(DmaMemory {
            hpa,
            ptr: mem::phys_to_virt(hpa),
            len: frames * 4096,
        })
    }

    /// Gives the frames back (the device must no longer use them).
    pub fn free(self) {
        if let Err(err) = mem::free_frames(self.hpa, self.len / 4096) {
            log::warn!("net: freeing DMA memory at {:#x}: {err:?}", self.hpa);
        }
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "DMA access {offset:#x}+{len:#x} outside the {:#x}-byte region",
            self.len
        );
    }
}

impl DmaRegion for DmaMemory {
    fn device_addr(&self) -> u64 {
        self.hpa
    }

    fn len(&self) -> usize {
        self.len
    }

    fn read_u64(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        assert!(offset % 8 == 0, "unaligned DMA word at {offset:#x}");
        // SAFETY: the region is `len` bytes of frames this value owns, mapped writable by the
        // physical-memory window; the offset is checked and aligned. Volatile: the device writes
        // descriptors behind the compiler's back.
        unsafe { core::ptr::read_volatile(self.ptr.add(offset) as *const u64) }
    }

    fn write_u64(&mut self, offset: usize, value: u64) {
        self.check(offset, 8);
        assert!(offset % 8 == 0, "unaligned DMA word at {offset:#x}");
        // SAFETY: as in `read_u64`.
        unsafe { core::ptr::write_volatile(self.ptr.add(offset) as *mut u64, value) }
    }

    fn with_bytes<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        self.check(offset, len);
        // SAFETY: checked range inside the region; the driver calls this only for a buffer the
        // device has finished with (descriptor done) and does not hand back until `f` returns.
        let bytes = unsafe { core::slice::from_raw_parts(self.ptr.add(offset), len) };
        f(bytes)
    }

    fn with_bytes_mut<R>(
        &mut self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        self.check(offset, len);
        // SAFETY: checked range inside the region; the driver calls this only for a buffer the
        // device does not own (not yet handed over by a tail write), and `&mut self` makes the
        // slice the only reference.
        let bytes = unsafe { core::slice::from_raw_parts_mut(self.ptr.add(offset), len) };
        f(bytes)
    }
}

/// The `virtio-drivers` HAL: DMA memory is physically contiguous zeroed frames seen through the
/// physical-memory window, device registers are mapped uncached, and sharing a buffer is an
/// address translation (buffers must lie in the physical-memory window: the virtio driver
/// keeps its packet buffers in [`DmaMemory`], never on the heap).
pub struct KernelHal;

// SAFETY: `dma_alloc` returns zeroed, physically contiguous frames owned by the caller, seen
// at `phys_to_virt`; `mmio_phys_to_virt` maps the asked range uncached; `share` returns the
// physical address of a buffer in the physical-memory window (checked), which is identity for
// the device (no IOMMU).
unsafe impl virtio_drivers::Hal for KernelHal {
    fn dma_alloc(
        pages: usize,
        _direction: virtio_drivers::BufferDirection,
    ) -> (virtio_drivers::PhysAddr, NonNull<u8>) {
        match mem::alloc_zeroed_contiguous(pages.max(1)) {
            Some(hpa) => (
                hpa,
                NonNull::new(mem::phys_to_virt(hpa)).expect("physical window at 0"),
            ),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(
        paddr: virtio_drivers::PhysAddr,
        _vaddr: NonNull<u8>,
        pages: usize,
    ) -> i32 {
        match mem::free_frames(paddr, pages.max(1)) {
            Ok(()) => 0,
            Err(err) => {
                log::warn!("net: freeing virtio DMA memory at {paddr:#x}: {err:?}");
                -1
            }
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: virtio_drivers::PhysAddr, size: usize) -> NonNull<u8> {
        let virt = mem::map_mmio_range(PhysAddr::new(paddr), size as u64)
            .unwrap_or_else(|e| panic!("mapping virtio registers at {paddr:#x}: {e}"));
        NonNull::new(virt.as_mut_ptr()).expect("MMIO mapping at 0")
    }

    unsafe fn share(
        buffer: NonNull<[u8]>,
        _direction: virtio_drivers::BufferDirection,
    ) -> virtio_drivers::PhysAddr {
        let base = mem::phys_to_virt(0) as u64;
        let virt = buffer.as_ptr() as *mut u8 as u64;
        assert!(
            virt >= base,
            "virtio buffer at {virt:#x} outside the physical-memory window"
        );
        virt - base
    }

    unsafe fn unshare(
        _paddr: virtio_drivers::PhysAddr,
        _buffer: NonNull<[u8]>,
        _direction: virtio_drivers::BufferDirection,
    ) {
    }
}

/// PCI configuration space for `virtio-drivers`: mechanism #1 (the kernel's [`PortConfig`]).
pub struct PortCam;

fn pci_address(df: DeviceFunction) -> PciAddress {
    PciAddress::new(df.bus, df.device, df.function)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, device_function: DeviceFunction, register_offset: u8) -> u32 {
        PortConfig.read32(pci_address(device_function), register_offset)
    }

    fn write_word(&mut self, device_function: DeviceFunction, register_offset: u8, data: u32) {
        PortConfig.write32(pci_address(device_function), register_offset, data)
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}
