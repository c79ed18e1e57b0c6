//! Physical and virtual memory of the node: the frame allocator over the boot memory map, the
//! kernel's page-table mapper, the heap, and MMIO mappings.
//!
//! The bootloader maps all physical memory at a fixed offset; that window is how page tables
//! and frame contents are reached. Everything else (heap, MMIO) gets its own mapping here.

mod heap;

use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use kernel::frames::{self, FrameAllocator, FRAME_SIZE};
use spin::{Mutex, Once};
use x86_64::registers::control::Cr3;
use x86_64::registers::model_specific::{Efer, EferFlags};
use x86_64::structures::paging::{
    mapper::MapToError, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame,
    Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

pub use heap::heap_stats;

/// Frames below 1 MiB stay untouched: firmware data lives there and SMP start-up code will
/// need it.
const LOW_MEMORY_END: u64 = 0x10_0000;
/// Kernel-chosen virtual areas, in the lower half (the bootloader's are in the upper half).
const HEAP_START: u64 = 0x0000_4000_0000_0000;
const HEAP_SIZE: u64 = 32 * 1024 * 1024;
const MMIO_START: u64 = 0x0000_5000_0000_0000;
/// End of the MMIO window (1 TiB of virtual space: never the limit in practice).
const MMIO_END: u64 = 0x0000_5100_0000_0000;

static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);
static FRAMES: Mutex<Option<FrameAllocator<'static>>> = Mutex::new(None);
static MAPPER: Mutex<Option<OffsetPageTable<'static>>> = Mutex::new(None);
static NEXT_MMIO: AtomicU64 = AtomicU64::new(MMIO_START);
static REGIONS: Once<Vec<MapEntry>> = Once::new();

/// One region of the boot memory map, as `mem` shows it.
#[derive(Debug, Clone, Copy)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub kind: MemoryRegionKind,
}

/// Why memory set-up failed (each is fatal at boot).
#[derive(Debug)]
pub enum MemError {
    NoPhysicalMapping,
    NoRoomForBitmap { bytes: u64 },
    Frames(frames::FrameError),
    HeapMapping(MapToError<Size4KiB>),
}

impl core::fmt::Display for MemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MemError::NoPhysicalMapping => write!(f, "the bootloader did not map physical memory"),
            MemError::NoRoomForBitmap { bytes } => {
                write!(f, "no usable range holds the {bytes}-byte frame bitmap")
            }
            MemError::Frames(err) => write!(f, "frame allocator: {err:?}"),
            MemError::HeapMapping(err) => write!(f, "mapping the heap: {err:?}"),
        }
    }
}

/// Frame counts for `info` and `mem`.
#[derive(Debug, Clone, Copy)]
pub struct FrameStats {
    pub total: u64,
    pub free: u64,
}

fn usable_ranges(regions: &MemoryRegions) -> impl Iterator<Item = Range<u64>> + Clone + '_ {
    regions
        .iter()
        .filter(|r| r.kind == MemoryRegionKind::Usable)
        .map(|r| r.start.max(LOW_MEMORY_END)..r.end)
        .filter(|r| r.start < r.end)
}

/// Sets up frames, the mapper and the heap. After this `alloc` works.
pub fn init(phys_offset: Option<u64>, regions: &MemoryRegions) -> Result<(), MemError> {
    let offset = phys_offset.ok_or(MemError::NoPhysicalMapping)?;
    PHYS_OFFSET.store(offset, Ordering::Relaxed);

    // The bitmap lives in the first usable range big enough for it, and is reserved there.
    let words = frames::bitmap_words_for(usable_ranges(regions));
    let bytes = (words as u64 * 8).div_ceil(FRAME_SIZE) * FRAME_SIZE;
    let home = usable_ranges(regions)
        .map(|r| r.start.div_ceil(FRAME_SIZE) * FRAME_SIZE..r.end)
        .find(|r| r.end.saturating_sub(r.start) >= bytes)
        .ok_or(MemError::NoRoomForBitmap { bytes })?;
    // SAFETY: `home` is usable RAM nobody else owns yet, reached through the bootloader's
    // physical-memory window, and it is reserved in the allocator right below so it is never
    // handed out; the slice lives as long as the kernel.
    let bitmap =
        unsafe { core::slice::from_raw_parts_mut((offset + home.start) as *mut u64, words) };
    let mut allocator =
        FrameAllocator::new(usable_ranges(regions), bitmap).map_err(MemError::Frames)?;
    allocator
        .reserve(home.start..home.start + bytes)
        .map_err(MemError::Frames)?;
    *FRAMES.lock() = Some(allocator);

    // SAFETY: EFER.NXE makes the NO_EXECUTE bit valid in page tables; setting it is harmless
    // when the bootloader already did.
    unsafe { Efer::update(|f| f.insert(EferFlags::NO_EXECUTE_ENABLE)) };
    let (l4_frame, _) = Cr3::read();
    // SAFETY: CR3 holds the active level-4 table; the physical window maps it at `offset`,
    // and this is the only mutable reference made to it (kept in MAPPER under a lock).
    let mapper = unsafe {
        let l4 = &mut *((offset + l4_frame.start_address().as_u64()) as *mut PageTable);
        OffsetPageTable::new(l4, VirtAddr::new(offset))
    };
    *MAPPER.lock() = Some(mapper);

    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    for page in 0..HEAP_SIZE / FRAME_SIZE {
        let virt = HEAP_START + page * FRAME_SIZE;
        let frame =
            alloc_frame().ok_or(MemError::HeapMapping(MapToError::FrameAllocationFailed))?;
        map_page(virt, frame, flags).map_err(MemError::HeapMapping)?;
    }
    heap::init(HEAP_START, HEAP_SIZE as usize);

    REGIONS.call_once(|| {
        regions
            .iter()
            .map(|r| MapEntry {
                start: r.start,
                end: r.end,
                kind: r.kind,
            })
            .collect()
    });
    Ok(())
}

/// Adapts our allocator to the one the `x86_64` mapper wants for page-table frames.
struct TableFrames;

// SAFETY: frames come from FRAMES, which hands each free frame out once.
unsafe impl x86_64::structures::paging::FrameAllocator<Size4KiB> for TableFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame> {
        alloc_frame().map(|a| PhysFrame::containing_address(PhysAddr::new(a)))
    }
}

fn map_page(virt: u64, phys: u64, flags: PageTableFlags) -> Result<(), MapToError<Size4KiB>> {
    let mut mapper = MAPPER.lock();
    let mapper = mapper.as_mut().ok_or(MapToError::FrameAllocationFailed)?;
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt));
    let frame = PhysFrame::containing_address(PhysAddr::new(phys));
    // SAFETY: callers map fresh kernel-chosen virtual pages (heap, MMIO window) that nothing
    // references yet, to frames they own (new frames) or to device registers.
    let flush = unsafe { mapper.map_to(page, frame, flags, &mut TableFrames)? };
    flush.flush();
    Ok(())
}

/// One free physical frame (its address), if any.
pub fn alloc_frame() -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc()
}

/// Frame totals.
pub fn frame_stats() -> FrameStats {
    FRAMES
        .lock()
        .as_ref()
        .map_or(FrameStats { total: 0, free: 0 }, |f| FrameStats {
            total: f.total_frames(),
            free: f.free_frames(),
        })
}

/// The boot memory map.
pub fn memory_map() -> &'static [MapEntry] {
    REGIONS.get().map_or(&[], Vec::as_slice)
}

/// Why device registers could not be mapped.
#[derive(Debug)]
pub enum MmioError {
    /// A zero-length range, or one that wraps around the address space.
    BadRange {
        phys: u64,
        bytes: u64,
    },
    /// The MMIO window of the kernel's address space is used up.
    WindowFull,
    Map(MapToError<Size4KiB>),
}

impl core::fmt::Display for MmioError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MmioError::BadRange { phys, bytes } => {
                write!(f, "bad MMIO range {phys:#x} + {bytes:#x}")
            }
            MmioError::WindowFull => write!(f, "MMIO window full"),
            MmioError::Map(err) => write!(f, "mapping failed: {err:?}"),
        }
    }
}

/// Maps one page of device registers uncached and returns its virtual address.
pub fn map_mmio(phys: PhysAddr) -> VirtAddr {
    match map_mmio_range(phys, 1) {
        Ok(virt) => virt,
        Err(err) => panic!("cannot map MMIO page {phys:?}: {err}"),
    }
}

/// Maps `bytes` of device registers from `phys` (any alignment) uncached, on fresh virtual pages;
/// returns the virtual address of `phys`.
pub fn map_mmio_range(phys: PhysAddr, bytes: u64) -> Result<VirtAddr, MmioError> {
    let bad = || MmioError::BadRange {
        phys: phys.as_u64(),
        bytes,
    };
    let first = phys.align_down(FRAME_SIZE).as_u64();
    let end = phys
        .as_u64()
        .checked_add(bytes)
        .filter(|_| bytes > 0)
        .ok_or_else(bad)?;
    let pages = end.div_ceil(FRAME_SIZE) - first / FRAME_SIZE;
    let span = pages * FRAME_SIZE;
    let virt = NEXT_MMIO.fetch_add(span, Ordering::Relaxed);
    if virt.checked_add(span).is_none_or(|e| e > MMIO_END) {
        return Err(MmioError::WindowFull);
    }
    let flags = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | PageTableFlags::NO_CACHE
        | PageTableFlags::WRITE_THROUGH
        | PageTableFlags::NO_EXECUTE;
    for page in 0..pages {
        map_page(virt + page * FRAME_SIZE, first + page * FRAME_SIZE, flags)
            .map_err(MmioError::Map)?;
    }
    Ok(VirtAddr::new(virt + (phys.as_u64() - first)))
}

/// Whether a virtual address is mapped (used by the deliberate-fault debug command to pick an
/// address that really faults).
pub fn is_mapped(virt: u64) -> bool {
    use x86_64::structures::paging::Translate;
    MAPPER
        .lock()
        .as_ref()
        .is_some_and(|m| m.translate_addr(VirtAddr::new(virt)).is_some())
}

/// Copies `buf.len()` bytes of physical memory from `hpa` (firmware tables) through the
/// physical-memory window; false, and nothing read, if part of it is not mapped there.
pub fn read_phys(hpa: u64, buf: &mut [u8]) -> bool {
    let Some(end) = hpa.checked_add(buf.len() as u64) else {
        return false;
    };
    if buf.is_empty() {
        return true;
    }
    let offset = PHYS_OFFSET.load(Ordering::Relaxed);
    let first = hpa / FRAME_SIZE;
    let last = (end - 1) / FRAME_SIZE;
    let page_mapped = |page: u64| {
        offset
            .checked_add(page * FRAME_SIZE)
            .and_then(|virt| VirtAddr::try_new(virt).ok())
            .is_some_and(|virt| is_mapped(virt.as_u64()))
    };
    if !(first..=last).all(page_mapped) {
        return false;
    }
    // SAFETY: every page of the range is mapped by the physical-memory window (checked just
    // above), `buf` is a distinct kernel buffer, and the bytes are only copied (firmware
    // tables: nobody writes them).
    unsafe { core::ptr::copy_nonoverlapping(phys_to_virt(hpa), buf.as_mut_ptr(), buf.len()) };
    true
}

/// Where the kernel sees host-physical address `hpa` (the bootloader's physical-memory window).
pub fn phys_to_virt(hpa: u64) -> *mut u8 {
    (PHYS_OFFSET.load(Ordering::Relaxed) + hpa) as *mut u8
}

/// `count` physically contiguous free frames, zeroed; returns the first one's address.
pub fn alloc_zeroed_contiguous(count: usize) -> Option<u64> {
    let hpa = {
        let mut frames = FRAMES.lock();
        let frames = frames.as_mut()?;
        // A single frame takes the next-fit path, not a run search from the bottom: guest RAM
        // is allocated frame by frame, and a search per frame would make that quadratic.
        if count == 1 {
            frames.alloc()?
        } else {
            frames.alloc_contiguous(count, 1)?
        }
    };
    // SAFETY: the frames were just handed out to the caller alone, and the physical window
    // maps them writable.
    unsafe { core::ptr::write_bytes(phys_to_virt(hpa), 0, count * FRAME_SIZE as usize) };
    Some(hpa)
}

/// Gives back frames from [`alloc_zeroed_contiguous`] or [`alloc_frame`].
pub fn free_frames(hpa: u64, count: usize) -> Result<(), frames::FrameError> {
    match FRAMES.lock().as_mut() {
        Some(frames) => frames.free_contiguous(hpa, count),
        None => Err(frames::FrameError::NotManaged { addr: hpa }),
    }
}
