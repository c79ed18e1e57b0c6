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
//! | `0x100000..` | the guest image ([`IMAGE_BASE`]); its bss holds the virtio-blk rings, buffers and generation table ([`disk`]) |
//! | [`DATA_START`]`..` | version table, then the self-describing data pages |

#![no_std]
#![forbid(unsafe_code)]

pub mod disk;

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
    /// How many data pages, from data page 0, the rewrites cycle over (0 = all): a hot set
    /// like a real workload's, so the dirty rate can be compared with a Linux guest rewriting
    /// one file. See [`HotSet`].
    pub hot_pages: u64,
}

/// Why boot parameters were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamsError {
    BadMagic,
    TooSmall { mem_bytes: u64 },
    NoClock,
}

impl BootParams {
    pub const WORDS: usize = 5;

    /// The words the loader writes at [`BOOT_PARAMS`].
    pub fn to_words(&self) -> [u64; Self::WORDS] {
        [
            BOOT_MAGIC,
            self.mem_bytes,
            self.tsc_hz,
            self.dirty_pages_per_sec,
            self.hot_pages,
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
            hot_pages: words[4],
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

    /// The data pages of `layout` the dirty workload cycles over.
    pub fn hot_set(&self, layout: &DataLayout) -> HotSet {
        HotSet::new(self.hot_pages, layout.pages)
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

/// The data pages the guest's dirty workload rewrites: `0..pages`, cycling. Every page keeps
/// its own version in the version table, so pages outside the hot set simply stay at the
/// version they were last written with and verify like the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotSet {
    /// Data pages cycled over, from data page 0.
    pub pages: u64,
    /// The hot set asked for when it was larger than the data pages (and so became all of
    /// them): the guest says so rather than silently doing something else.
    pub clamped_from: Option<u64>,
}

impl HotSet {
    /// The hot set for a request of `requested` pages (0 = all) among `data_pages`.
    pub fn new(requested: u64, data_pages: u64) -> HotSet {
        match requested {
            0 => HotSet {
                pages: data_pages,
                clamped_from: None,
            },
            r if r > data_pages => HotSet {
                pages: data_pages,
                clamped_from: Some(r),
            },
            r => HotSet {
                pages: r,
                clamped_from: None,
            },
        }
    }

    /// The page the workload rewrites after `page`: the next one, wrapping within the set.
    pub fn next_page(&self, page: u64) -> u64 {
        (page + 1) % self.pages.max(1)
    }

    /// Whether every data page is in the hot set (the workload of a guest without `hot=`).
    pub fn is_all(&self, data_pages: u64) -> bool {
        self.pages == data_pages
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

/// What a full verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    /// The first page that failed, and how.
    pub first_bad: Option<(u64, PageMismatch)>,
    /// Pages that failed.
    pub bad: u64,
    /// [`MemoryHash`] of the version table then every page, in order.
    pub hash: u64,
}

/// Checks `pages` data pages against their versions and hashes them: the guest's `verify`
/// command, and the node kernel's native run of the same loop (its benchmark reference).
pub fn verify_pages<'a>(
    pages: u64,
    version: impl Fn(u64) -> u32,
    page: impl Fn(u64) -> &'a [u64; WORDS_PER_PAGE],
) -> VerifyReport {
    let mut hash = MemoryHash::default();
    for index in 0..pages {
        hash.add_word(u64::from(version(index)));
    }
    let mut report = VerifyReport {
        first_bad: None,
        bad: 0,
        hash: 0,
    };
    for index in 0..pages {
        let words = page(index);
        if let Err(m) = check_page(words, index, version(index)) {
            report.bad += 1;
            report.first_bad.get_or_insert((index, m));
        }
        words.iter().for_each(|&w| hash.add_word(w));
    }
    report.hash = hash.value();
    report
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
    /// Print `spinning with interrupts off`, then loop forever without a single exit (no I/O,
    /// no HLT): a guest that would hold the CPU unless the host's timer preempts it.
    pub const SPIN: u8 = b's';
    /// Wait for the disk writes in flight, re-read every block written and check it against
    /// the generation table; print `disk verify ok blocks=N writes=W hash=0x..` (the digest of
    /// [`super::disk`]), `disk verify FAILED lba=.. expected gen G found ..`, or
    /// `disk verify: no disk`.
    pub const DISK_VERIFY: u8 = b'd';
    /// Stop the disk workload from starting writes and wait for those in flight; print
    /// `disk hold writes=W` (the disk then holds exactly what a verify's digest describes).
    pub const DISK_HOLD: u8 = b'h';
    /// Let the disk workload write again; print `disk run`.
    pub const DISK_RUN: u8 = b'r';
    /// Disk benchmark: hold the workload (wait for its writes in flight), then measure 4 KiB
    /// requests over the guest's benchmark region ([`super::disk::bench_region`]), timed with
    /// the guest's TSC: for each way of waiting ([`super::disk::BenchWait`]: spinning on the
    /// used ring, or HLT between polls), each queue depth of
    /// [`super::disk::BENCH_QUEUE_DEPTHS`], each [`super::disk::BenchPattern`], for
    /// [`super::disk::BENCH_MILLIS`] ms or [`super::disk::BENCH_MAX_OPS`] requests. Every read
    /// is checked against what the benchmark wrote there ([`super::disk::check_bench_block`]).
    /// Prints
    /// `disk bench region blocks=8192..12288 qd=1,8 wait=spin,hlt millis=2000 max_ops=50000`,
    /// then one line per measurement,
    /// `disk bench seq-write 4k qd8 spin: 1234 ops 2.010 s 2.51 MB/s 614 IOPS 13020 us/op`
    /// (MB = 10^6 bytes; us/op = mean time from submit to completion), then `disk bench done`;
    /// then lets the workload write again (unless it was held before). Failures end the
    /// benchmark with `disk bench FAILED <pattern> 4k qd<N> <wait>: <why>` (or
    /// `disk bench FAILED: <why>`); `disk bench: no disk` without a disk.
    pub const DISK_BENCH: u8 = b'b';
}

/// The data pages the dirty-tracking test command writes: every 7th page from page 3, at most
/// 200 of them (a known, irregular set that spans several page-table pages).
pub fn dirty_test_pages(layout: &DataLayout) -> impl Iterator<Item = u64> {
    (3..layout.pages).step_by(7).take(200)
}

// The guest's page-table pages inside PAGE_TABLES: the PML4, one PDPT, and one page directory
// per GiB of IDENTITY_MAPPED (2 MiB pages). 0x7000 is left spare.
const PML4_GPA: u64 = PAGE_TABLES.start;
const PDPT_GPA: u64 = PML4_GPA + PAGE_SIZE;
const PD_GPA: u64 = PDPT_GPA + PAGE_SIZE;
const LARGE_PAGE: u64 = 2 << 20;
const ENTRIES_PER_TABLE: u64 = 512;
const PD_COUNT: u64 = IDENTITY_MAPPED / (LARGE_PAGE * ENTRIES_PER_TABLE);

// Entry bits. Accessed (on every level) and dirty (on the 2 MiB leaves) are set up front so the
// CPU never has to write them back: the table pages then stay clean for the whole run and do
// not show up in the dirty-tracking test as pages nobody asked the guest to write. No user bit:
// the guest runs in ring 0 only.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_LARGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED;
const LEAF_FLAGS: u64 = TABLE_FLAGS | PTE_DIRTY | PTE_LARGE;

/// Builds the guest's 4-level identity map of [`IDENTITY_MAPPED`] (4 GiB, 2 MiB pages,
/// present + writable, supervisor only) inside [`PAGE_TABLES`]: PML4 at `0x1000`, PDPT at
/// `0x2000`, four page directories at `0x3000..0x7000`. Long mode needs nothing else from the
/// tables (PAE-format entries; NX is never set, so EFER.NXE does not matter).
///
/// Calls `write(gpa, value)` for every non-zero u64 of the guest page tables (the loader
/// zeroes the table pages first). Returns the CR3 value (PML4 GPA).
pub fn build_identity_page_tables(mut write: impl FnMut(u64, u64)) -> u64 {
    write(PML4_GPA, PDPT_GPA | TABLE_FLAGS);
    for pd in 0..PD_COUNT {
        let pd_gpa = PD_GPA + pd * PAGE_SIZE;
        write(PDPT_GPA + pd * 8, pd_gpa | TABLE_FLAGS);
        for entry in 0..ENTRIES_PER_TABLE {
            let gpa = (pd * ENTRIES_PER_TABLE + entry) * LARGE_PAGE;
            write(pd_gpa + entry * 8, gpa | LEAF_FLAGS);
        }
    }
    // CR3 holds the PML4 address with PWT/PCD clear: ordinary write-back caching.
    PML4_GPA
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
            hot_pages: 512,
        };
        assert_eq!(BootParams::from_words(p.to_words()), Ok(p));
        // Each field has its own word: none is lost or swapped on the way.
        assert_eq!(
            p.to_words(),
            [BOOT_MAGIC, 64 << 20, 2_000_000_000, 100, 512]
        );
        for hot_pages in [0, 1, u64::MAX] {
            let q = BootParams { hot_pages, ..p };
            assert_eq!(BootParams::from_words(q.to_words()), Ok(q));
        }
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
    fn hot_set_is_all_pages_by_default_and_clamped_to_them() {
        assert_eq!(
            HotSet::new(0, 3069),
            HotSet {
                pages: 3069,
                clamped_from: None
            }
        );
        assert_eq!(
            HotSet::new(512, 3069),
            HotSet {
                pages: 512,
                clamped_from: None
            }
        );
        assert_eq!(
            HotSet::new(3069, 3069),
            HotSet {
                pages: 3069,
                clamped_from: None
            }
        );
        assert_eq!(
            HotSet::new(3070, 3069),
            HotSet {
                pages: 3069,
                clamped_from: Some(3070)
            }
        );
        assert!(HotSet::new(0, 3069).is_all(3069));
        assert!(HotSet::new(u64::MAX, 3069).is_all(3069));
        assert!(!HotSet::new(1, 3069).is_all(3069));
    }

    /// Rewriting only the hot set, as the guest does, leaves every page verifiable: the hot
    /// pages at their new versions, the others at the version of their first fill.
    #[test]
    fn rewriting_a_hot_set_keeps_every_page_verifiable() {
        let data_pages = 10;
        let hot = HotSet::new(3, data_pages);
        let mut versions = std::vec![1u32; data_pages as usize];
        let mut pages = std::vec![[0u64; WORDS_PER_PAGE]; data_pages as usize];
        for (i, p) in pages.iter_mut().enumerate() {
            fill_page(p, i as u64, 1);
        }
        let mut cursor = 0;
        let mut touched = std::collections::BTreeSet::new();
        for _ in 0..7 {
            let i = cursor as usize;
            versions[i] += 1;
            fill_page(&mut pages[i], cursor, versions[i]);
            touched.insert(cursor);
            cursor = hot.next_page(cursor);
        }
        assert_eq!(touched, (0..3).collect());
        assert_eq!(versions, [4, 3, 3, 1, 1, 1, 1, 1, 1, 1]);
        let report = verify_pages(data_pages, |i| versions[i as usize], |i| &pages[i as usize]);
        assert_eq!(report.first_bad, None);
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
    fn verify_pages_reports_bad_pages_and_a_stable_hash() {
        let mut pages = std::vec![[0u64; WORDS_PER_PAGE]; 5];
        for (i, p) in pages.iter_mut().enumerate() {
            fill_page(p, i as u64, 1);
        }
        let clean = verify_pages(5, |_| 1, |i| &pages[i as usize]);
        assert_eq!(clean.bad, 0);
        assert_eq!(clean.first_bad, None);
        assert_eq!(verify_pages(5, |_| 1, |i| &pages[i as usize]), clean);
        pages[3][7] ^= 1;
        let broken = verify_pages(5, |_| 1, |i| &pages[i as usize]);
        assert_eq!(broken.bad, 1);
        assert_eq!(
            broken.first_bad,
            Some((3, PageMismatch::Corrupt { word: 7 }))
        );
        assert_ne!(broken.hash, clean.hash);
        let stale = verify_pages(5, |i| if i == 1 { 2 } else { 1 }, |i| &pages[i as usize]);
        assert_eq!(
            stale.first_bad,
            Some((1, PageMismatch::WrongVersion { found: 1 }))
        );
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

    /// The writes of [`build_identity_page_tables`], and the CR3 it returned.
    fn built_tables() -> (std::collections::BTreeMap<u64, u64>, u64) {
        let mut tables = std::collections::BTreeMap::new();
        let cr3 = build_identity_page_tables(|gpa, value| {
            assert!(
                tables.insert(gpa, value).is_none(),
                "{gpa:#x} written twice"
            );
        });
        (tables, cr3)
    }

    /// Walks the tables like the CPU does in long mode (4-level paging, CR4.PSE ignored), for a
    /// supervisor write. Entries never written read as zero (the loader zeroed the pages).
    fn translate(tables: &std::collections::BTreeMap<u64, u64>, cr3: u64, va: u64) -> Option<u64> {
        const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
        let read = |gpa: u64| tables.get(&gpa).copied().unwrap_or(0);
        let mut table = cr3 & ADDR;
        for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
            let entry = read(table + ((va >> shift) & 0x1FF) * 8);
            if entry & PTE_PRESENT == 0 || entry & PTE_WRITABLE == 0 {
                return None;
            }
            // No user bit anywhere: the guest's code runs in ring 0 only.
            assert_eq!(entry & (1 << 2), 0, "user bit at level {level}");
            // NX clear: the guest executes from anywhere.
            assert_eq!(entry >> 63, 0, "NX at level {level}");
            let large = entry & PTE_LARGE != 0;
            // A 1 GiB page at level 3 would need a CPU feature we do not rely on, and level 4
            // has no page-size bit.
            assert!(!(large && level > 2), "large page at level {level}");
            if large || level == 1 {
                let offset_mask = (1u64 << shift) - 1;
                let base = entry & ADDR & !offset_mask;
                return Some(base | (va & offset_mask));
            }
            table = entry & ADDR;
        }
        None
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let (tables, cr3) = built_tables();
        assert_eq!(cr3, PAGE_TABLES.start);
        let addrs = [
            0,
            0xFFF,
            1 << 20,
            PAGE_TABLES.start,
            BOOT_PARAMS,
            STACK_TOP - 8,
            IMAGE_BASE,
            DATA_START,
            DATA_START + 0x12_3456,
            (1 << 30) - 1,
            1 << 30,
            (3 << 30) + 0x1234_5678,
            IDENTITY_MAPPED - (10 << 20), // about 3.99 GiB
            IDENTITY_MAPPED - 1,
        ];
        for va in addrs {
            assert_eq!(translate(&tables, cr3, va), Some(va), "{va:#x}");
        }
        // Every 2 MiB page, at its first and last byte.
        for page in 0..IDENTITY_MAPPED / LARGE_PAGE {
            let va = page * LARGE_PAGE;
            assert_eq!(translate(&tables, cr3, va), Some(va), "{va:#x}");
            let last = va + LARGE_PAGE - 1;
            assert_eq!(translate(&tables, cr3, last), Some(last), "{last:#x}");
        }
        // Nothing beyond: an access past 4 GiB faults in the guest rather than aliasing.
        assert_eq!(translate(&tables, cr3, IDENTITY_MAPPED), None);
        assert_eq!(translate(&tables, cr3, 1 << 39), None);
    }

    #[test]
    fn page_tables_stay_inside_their_pages() {
        let (tables, _) = built_tables();
        // 1 PML4 entry, 4 PDPT entries, 4 * 512 PD entries.
        assert_eq!(tables.len(), 1 + 4 + 4 * 512);
        for (&gpa, &value) in &tables {
            assert!(
                PAGE_TABLES.contains(&gpa) && PAGE_TABLES.contains(&(gpa + 7)),
                "{gpa:#x}"
            );
            assert_eq!(gpa % 8, 0, "{gpa:#x} unaligned");
            assert_ne!(value, 0, "{gpa:#x}: zero written");
            // Flags the CPU would otherwise write back are already set.
            assert_eq!(value & PTE_ACCESSED, PTE_ACCESSED, "{gpa:#x}");
        }
        // The tables end below 0x7000, so BOOT_PARAMS (0x8000) is never touched.
        assert!(tables.keys().all(|&gpa| gpa < 0x7000));
        // The leaves are dirty already, so the guest never writes its own tables.
        for (&gpa, &value) in tables.range(0x3000..0x7000) {
            assert_eq!(value & PTE_DIRTY, PTE_DIRTY, "{gpa:#x}");
        }
    }
}
