//! Host memory for guests: guest RAM frames, nested page-table frames, and pages for hardware
//! structures (VMCB, bitmaps), all from the frame allocator and reached through the physical
//! window. Guest frames are never mapped anywhere else: the host touches them only through
//! the physical window, to load, inspect and (later) migrate them.

use alloc::vec::Vec;

use kernel::frames::FRAME_SIZE;
use vmx::guest_mem::GuestMemory;
use vmx::paging::TableMemory;
use vmx::vcpu::{HostPage, HostPages};

use crate::mem;

/// Frames for nested page tables.
pub struct NptFrames;

impl TableMemory for NptFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        mem::alloc_zeroed_contiguous(1)
    }

    fn free_table(&mut self, hpa: u64) {
        if let Err(err) = mem::free_frames(hpa, 1) {
            log::error!("freeing page-table frame {hpa:#x}: {err}");
        }
    }

    fn read_entry(&self, table_hpa: u64, index: usize) -> u64 {
        // SAFETY: table_hpa is a page-table frame this allocator handed out (the paging code
        // only passes its own tables) and index < 512, so the read stays inside it.
        unsafe { core::ptr::read_volatile((mem::phys_to_virt(table_hpa) as *const u64).add(index)) }
    }

    fn write_entry(&mut self, table_hpa: u64, index: usize, value: u64) {
        // SAFETY: as in read_entry; the CPU may read the entry concurrently only while a vCPU
        // runs, which it does not during kernel code on this single core.
        unsafe {
            core::ptr::write_volatile((mem::phys_to_virt(table_hpa) as *mut u64).add(index), value)
        }
    }
}

/// Pages for VMCBs, VMCSs and permission bitmaps.
pub struct StructurePages;

impl HostPages for StructurePages {
    fn alloc_zeroed(&mut self, count: usize) -> Option<HostPage> {
        let hpa = mem::alloc_zeroed_contiguous(count)?;
        Some(HostPage {
            hpa,
            ptr: mem::phys_to_virt(hpa),
            count,
        })
    }

    fn free(&mut self, page: HostPage) {
        if let Err(err) = mem::free_frames(page.hpa, page.count) {
            log::error!("freeing structure pages at {:#x}: {err}", page.hpa);
        }
    }
}

/// A guest's RAM: one host frame per 4 KiB guest page, GPA `i * 4096` in `frames[i]`.
pub struct GuestRam {
    frames: Vec<u64>,
}

/// Guest RAM could not be allocated.
#[derive(Debug)]
pub struct OutOfMemory;

impl GuestRam {
    /// Allocates and zeroes `bytes` of guest RAM (a multiple of 4 KiB).
    pub fn new(bytes: u64) -> Result<GuestRam, OutOfMemory> {
        let pages = (bytes / FRAME_SIZE) as usize;
        let mut frames = Vec::new();
        frames.try_reserve_exact(pages).map_err(|_| OutOfMemory)?;
        for _ in 0..pages {
            match mem::alloc_zeroed_contiguous(1) {
                Some(hpa) => frames.push(hpa),
                None => {
                    GuestRam { frames }.free();
                    return Err(OutOfMemory);
                }
            }
        }
        Ok(GuestRam { frames })
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.frames.len() as u64 * FRAME_SIZE
    }

    /// Host frame behind guest page `index`.
    pub fn frames(&self) -> &[u64] {
        &self.frames
    }

    /// Copies `bytes` into guest RAM at `gpa`; false if it does not fit.
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        self.access(gpa, bytes.len(), |host, offset, len| {
            // SAFETY: `host` is this guest's frame, reached through the physical window, and
            // [offset, offset + len) lies inside it.
            unsafe {
                core::ptr::copy_nonoverlapping(bytes[offset..].as_ptr(), host, len);
            }
        })
    }

    /// Copies guest RAM at `gpa` into `out`; false if outside RAM.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> bool {
        let len = out.len();
        let dst = out.as_mut_ptr();
        self.access(gpa, len, |host, offset, n| {
            // SAFETY: `host` is this guest's frame (through the physical window) with n bytes
            // left in it; `dst` has `len` bytes and offset + n <= len.
            unsafe { core::ptr::copy_nonoverlapping(host, dst.add(offset), n) };
        })
    }

    /// Guest page `index` as words (None past the end of RAM).
    pub fn page_words(&self, index: usize) -> Option<&[u64; 512]> {
        let hpa = *self.frames.get(index)?;
        // SAFETY: the frame belongs to this guest and is page-aligned; `&self` keeps the RAM
        // alive, and the guest does not run while the kernel holds the reference (single core).
        Some(unsafe { &*(mem::phys_to_virt(hpa) as *const [u64; 512]) })
    }

    /// Guest page `index` as bytes (None past the end of RAM).
    pub fn page_bytes(&self, index: usize) -> Option<&[u8; FRAME_SIZE as usize]> {
        let hpa = *self.frames.get(index)?;
        // SAFETY: as in `page_words`: the frame is this guest's and page-aligned, `&self` keeps
        // the RAM alive, and the guest does not run while the reference is held (single core).
        Some(unsafe { &*(mem::phys_to_virt(hpa) as *const [u8; FRAME_SIZE as usize]) })
    }

    /// Guest page `index` as writable words (None past the end of RAM).
    pub fn page_words_mut(&mut self, index: usize) -> Option<&mut [u64; 512]> {
        let hpa = *self.frames.get(index)?;
        // SAFETY: as in `page_words`; `&mut self` makes the reference unique.
        Some(unsafe { &mut *(mem::phys_to_virt(hpa) as *mut [u64; 512]) })
    }

    /// Walks the host frames covering [gpa, gpa + len), handing each piece to `f` as
    /// (host pointer, offset into the buffer, length).
    fn access(&self, gpa: u64, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) -> bool {
        let Some(end) = gpa.checked_add(len as u64) else {
            return false;
        };
        if end > self.size() {
            return false;
        }
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let page = (at / FRAME_SIZE) as usize;
            let in_page = (at % FRAME_SIZE) as usize;
            let n = (FRAME_SIZE as usize - in_page).min(len - done);
            f(
                mem::phys_to_virt(self.frames[page] + in_page as u64),
                done,
                n,
            );
            done += n;
        }
        true
    }

    /// Zeroes all of RAM (a fresh boot).
    pub fn clear(&mut self) {
        for &hpa in &self.frames {
            // SAFETY: each frame belongs to this guest; the window maps it writable.
            unsafe { core::ptr::write_bytes(mem::phys_to_virt(hpa), 0, FRAME_SIZE as usize) };
        }
    }

    /// Returns every frame to the allocator. The nested page tables must no longer map them
    /// (torn down and flushed).
    pub fn free(self) {
        for hpa in self.frames {
            if let Err(err) = mem::free_frames(hpa, 1) {
                log::error!("freeing guest frame {hpa:#x}: {err}");
            }
        }
    }
}

impl GuestMemory for GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        GuestRam::read(self, gpa, buf)
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        GuestRam::write(self, gpa, bytes)
    }
}
