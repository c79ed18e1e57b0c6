//! The hardware seams of the NIC drivers in `net`: a BAR mapped uncached ([`BarMmio`]) and
//! physically contiguous frames seen through the physical-memory window ([`DmaMemory`]).
//! Every access is bounds-checked against what was mapped or allocated.

use ::net::hw::{DmaRegion, Mmio};
use x86_64::PhysAddr;

use crate::mem;

/// A device's register BAR, mapped uncached.
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
