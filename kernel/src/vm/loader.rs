//! Puts the test guest into a VM's RAM: its ELF segments, identity-mapping page tables, boot
//! parameters, and the 64-bit start state. The guest image is built with the kernel (see
//! build.rs) and embedded, so every node can start it without a disk.

use guest_abi::{
    build_identity_page_tables, BootParams, BOOT_PARAMS, DATA_START, IMAGE_BASE, STACK_TOP,
};
use kernel::elf::{ElfError, ElfImage};
use vmx::state::VcpuState;

use super::memory::GuestRam;
use super::VmSpec;

/// The test guest's ELF file.
static TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));

/// Why the guest could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    Elf(ElfError),
    /// A segment lies outside the image area of the guest layout.
    SegmentOutsideImageArea {
        start: u64,
        end: u64,
    },
    /// Writing into guest RAM failed (RAM too small).
    DoesNotFit,
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LoadError::Elf(err) => write!(f, "test guest image: {err}"),
            LoadError::SegmentOutsideImageArea { start, end } => write!(
                f,
                "test guest segment {start:#x}..{end:#x} outside {IMAGE_BASE:#x}..{DATA_START:#x}"
            ),
            LoadError::DoesNotFit => write!(f, "guest RAM too small for the test guest"),
        }
    }
}

/// Loads the test guest into `ram`, which must be all zeroes (fresh, or cleared for a reboot),
/// with the workload `spec` asks for, and returns the vCPU state to start it with.
pub fn load_test_guest(
    ram: &mut GuestRam,
    tsc_hz: u64,
    spec: &VmSpec,
) -> Result<VcpuState, LoadError> {
    let image = ElfImage::parse(TEST_GUEST).map_err(LoadError::Elf)?;
    let span = image.span();
    if span.start < IMAGE_BASE || span.end > DATA_START {
        return Err(LoadError::SegmentOutsideImageArea {
            start: span.start,
            end: span.end,
        });
    }
    for segment in image.segments() {
        // The rest of each segment (bss) is already zero.
        if !ram.write(segment.paddr, segment.data) {
            return Err(LoadError::DoesNotFit);
        }
    }
    let mut fits = true;
    let cr3 = build_identity_page_tables(|gpa, value| {
        fits &= ram.write(gpa, &value.to_le_bytes());
    });
    let params = BootParams {
        mem_bytes: ram.size(),
        tsc_hz,
        dirty_pages_per_sec: spec.dirty_pages_per_sec,
        hot_pages: spec.hot_pages,
    };
    for (i, word) in params.to_words().iter().enumerate() {
        fits &= ram.write(BOOT_PARAMS + 8 * i as u64, &word.to_le_bytes());
    }
    if !fits {
        return Err(LoadError::DoesNotFit);
    }
    Ok(VcpuState::reset_64bit(image.entry, STACK_TOP, cr3))
}
