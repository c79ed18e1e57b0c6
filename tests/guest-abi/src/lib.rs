//! The contract between the hypervisor and its test guest (`tests/guest`).
//!
//! Both sides compile this crate: the node kernel to load and start the guest (and to check a
//! guest's memory from the outside, e.g. after a migration), the guest to find its parameters
//! and to write and verify its self-describing pages. It must never depend on anything but
//! `core`: the guest is a freestanding image with no allocator.
//!
//! Guest-physical layout (identity-mapped by the guest's own page tables, which the loader
//! builds):
//!
//! | GPA | what |
//! |---|---|
//! | `0x1000..0x7000` | guest page tables ([`PAGE_TABLES`]) |
//! | `0x8000` | [`BootParams`] |
//! | `0x10000..0x100000` | stack (grows down from [`STACK_TOP`]) |
//! | `0x100000..` | the guest image ([`IMAGE_BASE`]) |
//! | [`DATA_START`]`..` | version table, then the self-describing data pages |

#![no_std]
#![forbid(unsafe_code)]

/// Guest page tables built by the loader: PML4, PDPT, then page directories.
pub const PAGE_TABLES: core::ops::Range<u64> = 0x1000..0x8000;
/// Where the loader writes [`BootParams`]; the guest gets this address in RDI.
pub const BOOT_PARAMS: u64 = 0x8000;
/// Initial RSP.
pub const STACK_TOP: u64 = 0x10_0000;
/// Load address of the guest image (its linker script agrees).
pub const IMAGE_BASE: u64 = 0x10_0000;
/// First byte of the version table; the data pages follow it.
pub const DATA_START: u64 = 0x40_0000;
/// Smallest guest the layout fits: image, tables, and at least a few data pages.
pub const MIN_MEM_BYTES: u64 = 8 * 1024 * 1024;
/// How much guest-physical space the guest's page tables map (RAM and the hole above it, so
/// an access past RAM reaches the nested page tables and exits instead of faulting in the
/// guest): 4 GiB with 2 MiB pages, 4 page directories.
pub const IDENTITY_MAPPED: u64 = 4 << 30;

pub const PAGE_SIZE: u64 = 4096;
const WORDS_PER_PAGE: usize = 512;

/// "HVGUEST1" little-endian.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"HVGUEST1");

/// What the hypervisor tells the guest at start-up, as little-endian u64 words at
/// [`BOOT_PARAMS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootParams {
    /// Bytes of guest RAM, from GPA 0.
    pub mem_bytes: u64,
    /// Guest TSC frequency (the guest paces its heartbeat and dirty rate with it).
    pub tsc_hz: u64,
    /// Data pages the guest rewrites per second (0 = none).
    pub dirty_pages_per_sec: u64,
}

/// Why boot parameters were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamsError {
    BadMagic,
    TooSmall { mem_bytes: u64 },
    NoClock,
}

impl BootParams {
    pub const WORDS: usize = 4;

    /// The words the loader writes at [`BOOT_PARAMS`].
    pub fn to_words(&self) -> [u64; Self::WORDS] {
        [
            BOOT_MAGIC,
            self.mem_bytes,
            self.tsc_hz,
            self.dirty_pages_per_sec,
        ]
    }

    /// Reads the words back, checking them.
    pub fn from_words(words: [u64; Self::WORDS]) -> Result<Self, ParamsError> {
        if words[0] != BOOT_MAGIC {
            return Err(ParamsError::BadMagic);
        }
        let params = BootParams {
            mem_bytes: words[1],
            tsc_hz: words[2],
            dirty_pages_per_sec: words[3],
        };
        if params.mem_bytes < MIN_MEM_BYTES {
            return Err(ParamsError::TooSmall {
                mem_bytes: params.mem_bytes,
            });
        }
        if params.tsc_hz == 0 {
            return Err(ParamsError::NoClock);
        }
        Ok(params)
    }
}

/// Where the version table and the data pages are for a guest of `mem_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLayout {
    /// Number of self-describing data pages.
    pub pages: u64,
    /// GPA of the version table: one u32 per data page, the version the page must hold.
    pub versions_gpa: u64,
    /// GPA of data page 0.
    pub pages_gpa: u64,
}

impl DataLayout {
    pub fn for_memory(mem_bytes: u64) -> DataLayout {
        let room = mem_bytes.saturating_sub(DATA_START) / PAGE_SIZE;
        // Each data page costs a page plus 4 bytes of version table.
        let mut pages = room * PAGE_SIZE / (PAGE_SIZE + 4);
        while pages > 0 && table_pages(pages) + pages > room {
            pages -= 1;
        }
        DataLayout {
            pages,
            versions_gpa: DATA_START,
            pages_gpa: DATA_START + table_pages(pages) * PAGE_SIZE,
        }
    }

    /// GPA of data page `index`.
    pub fn page_gpa(&self, index: u64) -> u64 {
        self.pages_gpa + index * PAGE_SIZE
    }
}

fn table_pages(pages: u64) -> u64 {
    (pages * 4).div_ceil(PAGE_SIZE)
}

/// Word `word` of data page `page` at `version`: the page number and version are in words 0
/// and 1, every other word mixes both with its index, so a page holding another page's
/// contents, or an older version, fails [`check_page`].
pub fn page_word(page: u64, version: u32, word: usize) -> u64 {
    match word {
        0 => page,
        1 => u64::from(version),
        _ => {
            let seed = page.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ u64::from(version).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
            seed ^ (word as u64).wrapping_mul(0x1656_67B1_9E37_79F9)
        }
    }
}

/// Fills `words` (one page) with the contents of `page` at `version`.
pub fn fill_page(words: &mut [u64; WORDS_PER_PAGE], page: u64, version: u32) {
    for (i, w) in words.iter_mut().enumerate() {
        *w = page_word(page, version, i);
    }
}

/// How a page failed its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageMismatch {
    /// Word 0 names another page: contents from elsewhere.
    WrongPage { found: u64 },
    /// Word 1 holds another version: stale (or future) contents.
    WrongVersion { found: u64 },
    /// Header right, body wrong: corrupted.
    Corrupt { word: usize },
}

/// Checks one page against the page number and version it must hold.
pub fn check_page(
    words: &[u64; WORDS_PER_PAGE],
    page: u64,
    version: u32,
) -> Result<(), PageMismatch> {
    if words[0] != page {
        return Err(PageMismatch::WrongPage { found: words[0] });
    }
    if words[1] != u64::from(version) {
        return Err(PageMismatch::WrongVersion { found: words[1] });
    }
    for (i, &w) in words.iter().enumerate().skip(2) {
        if w != page_word(page, version, i) {
            return Err(PageMismatch::Corrupt { word: i });
        }
    }
    Ok(())
}

/// A running 64-bit hash of memory contents (FNV-1a over 64-bit words): the guest prints it
/// after a verification so that two copies of a VM can be compared.
#[derive(Debug, Clone, Copy)]
pub struct MemoryHash(u64);

impl Default for MemoryHash {
    fn default() -> Self {
        MemoryHash(0xCBF2_9CE4_8422_2325)
    }
}

impl MemoryHash {
    pub fn add_word(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(0x0000_0100_0000_01B3);
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Single-byte commands the guest reads from its serial port.
pub mod command {
    /// Verify every page, print the result and the memory hash.
    pub const VERIFY: u8 = b'v';
    /// Write the dirty-tracking test set ([`super::dirty_test_pages`]) once.
    pub const DIRTY_TEST: u8 = b't';
    /// Execute an invalid opcode (with no IDT: a triple fault).
    pub const INVALID_OPCODE: u8 = b'u';
    /// Read guest-physical memory past the end of RAM.
    pub const OUTSIDE_RAM: u8 = b'o';
}

/// The data pages the dirty-tracking test command writes: every 7th page from page 3, at most
/// 200 of them (a known, irregular set that spans several page-table pages).
pub fn dirty_test_pages(layout: &DataLayout) -> impl Iterator<Item = u64> {
    (3..layout.pages).step_by(7).take(200)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn params_round_trip_and_refusals() {
        let p = BootParams {
            mem_bytes: 64 << 20,
            tsc_hz: 2_000_000_000,
            dirty_pages_per_sec: 100,
        };
        assert_eq!(BootParams::from_words(p.to_words()), Ok(p));
        let mut w = p.to_words();
        w[0] ^= 1;
        assert_eq!(BootParams::from_words(w), Err(ParamsError::BadMagic));
        let mut w = p.to_words();
        w[1] = MIN_MEM_BYTES - 1;
        assert!(matches!(
            BootParams::from_words(w),
            Err(ParamsError::TooSmall { .. })
        ));
        let mut w = p.to_words();
        w[2] = 0;
        assert_eq!(BootParams::from_words(w), Err(ParamsError::NoClock));
    }

    #[test]
    fn layout_fits_in_memory() {
        for mib in [8u64, 9, 16, 64, 100, 256] {
            let mem = mib << 20;
            let l = DataLayout::for_memory(mem);
            assert!(l.pages > 0);
            assert!(l.versions_gpa + l.pages * 4 <= l.pages_gpa);
            assert!(l.page_gpa(l.pages - 1) + PAGE_SIZE <= mem, "{mib} MiB");
            // Not wasteful: at most one spare page.
            assert!(
                mem - (l.page_gpa(l.pages - 1) + PAGE_SIZE) <= 2 * PAGE_SIZE,
                "{mib} MiB"
            );
        }
    }

    #[test]
    fn pages_detect_foreign_stale_and_corrupt_contents() {
        let mut page = [0u64; WORDS_PER_PAGE];
        fill_page(&mut page, 42, 7);
        assert_eq!(check_page(&page, 42, 7), Ok(()));
        assert_eq!(
            check_page(&page, 43, 7),
            Err(PageMismatch::WrongPage { found: 42 })
        );
        assert_eq!(
            check_page(&page, 42, 8),
            Err(PageMismatch::WrongVersion { found: 7 })
        );
        page[300] ^= 1 << 9;
        assert_eq!(
            check_page(&page, 42, 7),
            Err(PageMismatch::Corrupt { word: 300 })
        );
        // Bodies differ between versions and pages, not only headers.
        let mut a = [0u64; WORDS_PER_PAGE];
        let mut b = [0u64; WORDS_PER_PAGE];
        fill_page(&mut a, 1, 1);
        fill_page(&mut b, 1, 2);
        assert!(a[2..].iter().zip(&b[2..]).all(|(x, y)| x != y));
    }

    #[test]
    fn hash_depends_on_order_and_content() {
        let hash = |words: &[u64]| {
            let mut h = MemoryHash::default();
            words.iter().for_each(|&w| h.add_word(w));
            h.value()
        };
        assert_ne!(hash(&[1, 2]), hash(&[2, 1]));
        assert_ne!(hash(&[1, 2]), hash(&[1, 3]));
        assert_eq!(hash(&[5, 6]), hash(&[5, 6]));
    }

    #[test]
    fn dirty_test_set_is_known_and_bounded() {
        let l = DataLayout::for_memory(16 << 20);
        let set: std::vec::Vec<u64> = dirty_test_pages(&l).collect();
        assert_eq!(set[0], 3);
        assert_eq!(set[1], 10);
        assert!(set.len() <= 200);
        assert!(set.iter().all(|&p| p < l.pages));
    }
}
