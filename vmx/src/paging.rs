//! Nested page tables (AMD NPT, Intel EPT): guest-physical to host-physical translation, and the
//! dirty tracking live migration is built on.
//!
//! One vendor-neutral walker, [`NestedPageTable`], builds and edits 4-level tables; the two
//! vendors differ only in how an entry is encoded, which [`NptFormat`] and [`EptFormat`] keep in
//! small pure functions ([`EntryFormat`]). The tables live in host-physical frames the walker
//! reaches through [`TableMemory`]: the kernel implements it over its physical-memory window,
//! the tests over a map of fake frames, so every rule here runs on the host.
//!
//! # Decisions
//!
//! - **4 KiB leaves only.** Guest RAM is mapped page by page so a D bit names exactly one page
//!   (a 2 MiB leaf would report 512 pages for one write). The walker never creates large pages
//!   and treats every present non-leaf entry as a pointer to a table.
//! - **Guest-physical addresses below 2^48** (4-level tables, EPTP page-walk length 4);
//!   host-physical addresses below 2^52 (the architectural address field, bits 51:12).
//! - **Permissions always include read.** NPT cannot express a present page that is not readable
//!   (P=1 means readable); EPT treats write-without-read as a misconfiguration and
//!   execute-only as an optional capability (SDM vol. 3C 29.3.3.1, "EPT Misconfigurations").
//!   Such [`Perm`]s are refused with [`PagingError::InvalidPermissions`].
//! - **A software "mapping is writable" bit ([`SOFT_WRITABLE`], bit 52)** in every leaf: the
//!   write-protect fallback clears the hardware W bit, and [`NestedPageTable::restore_write`]
//!   must know whether the page may be made writable again or was read-only all along (a ROM
//!   write is a guest error, not a dirty page). Bit 52 is available to software in both formats
//!   (APM vol. 2 5.4.1: bits 58:52 available to software; SDM vol. 3C table "Format of an EPT
//!   Page-Table Entry that Maps a 4-KByte Page": bits 56:52 ignored).
//! - **Empty tables are freed** by [`NestedPageTable::unmap`], so a table exists only while it
//!   maps something; [`NestedPageTable::teardown`] frees all of them. Guest frames always belong
//!   to the caller and are never freed here.
//!
//! # Stale translations: who flushes
//!
//! The CPU caches nested translations (AMD: TLB entries tagged by ASID, APM vol. 2 15.16
//! "TLB Control" and 15.25 "Nested Paging"; Intel: guest-physical and combined mappings tagged
//! by EPTP, SDM vol. 3C 29.4 "Caching Translation Information"). Every operation that removes a
//! right or clears a D bit returns a [`PendingFlush`]: the backend owns the flush instruction
//! (SVM: `TLB_CONTROL` or a new ASID before the next VMRUN; VMX: INVEPT single-context with this
//! table's EPTP before the next VM entry) and consumes the token with [`PendingFlush::flushed`]
//! once it has flushed. Operations that only add rights ([`NestedPageTable::map`],
//! [`NestedPageTable::restore_write`]) need no flush: a stale cached "not present / read-only"
//! costs at most one spurious nested fault, which the handler resolves by repeating the call.
//!
//! # Concurrency
//!
//! All edits are plain read-modify-writes of entries. That is correct because in the
//! first-version concurrency model (one host core, see ARCHITECTURE.md) no vCPU of the VM runs
//! while its tables are edited, so the CPU cannot set A or D bits between our read and our write.
//! SMP will need, for [`NestedPageTable::harvest_dirty`] and
//! [`NestedPageTable::write_protect_range`], an atomic AND on the entry (`lock and` through a
//! `TableMemory::fetch_and_entry`) that acts on the value it returns, plus a flush on every core
//! that runs the VM (a shootdown) before the harvested set is trusted.

#![forbid(unsafe_code)]

use core::fmt;
use core::marker::PhantomData;
use core::ops::Range;

use crate::dirty::{DirtyBitmap, DirtyError};

/// Size of a guest page and of a table frame.
pub const PAGE_SIZE: u64 = 4096;
/// Entries per table (4 KiB of 8-byte entries).
pub const ENTRIES: usize = 512;
/// First guest-physical address a 4-level table cannot map (2^48).
pub const MAX_GPA: u64 = 1 << 48;
/// First host-physical address an entry cannot hold (its address field is bits 51:12).
pub const MAX_HPA: u64 = 1 << 52;
/// The address field of an entry, bits 51:12, in both formats.
pub const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Software bit recording that the mapping allows writes even while the hardware W bit is
/// cleared by write protection. Bit 52 is ignored by the hardware in both formats.
pub const SOFT_WRITABLE: u64 = 1 << 52;

/// Levels of a nested table: 3 = PML4, 2 = PDPT, 1 = PD, 0 = PT (holding the 4 KiB leaves).
const TOP_LEVEL: u32 = 3;

/// Host-physical memory holding the table frames.
///
/// Addresses are host-physical; the implementation knows how to reach them (the kernel through
/// its physical-memory window). Indices are always below [`ENTRIES`] and table addresses are
/// always ones `alloc_table` returned and `free_table` has not taken back.
pub trait TableMemory {
    /// A zeroed, 4 KiB-aligned frame for a table, or `None` when memory is exhausted.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Gives back a frame `alloc_table` returned. The table no longer references anything.
    fn free_table(&mut self, hpa: u64);
    /// Entry `index` of the table at `table_hpa`.
    fn read_entry(&self, table_hpa: u64, index: usize) -> u64;
    /// Stores `value` into entry `index` of the table at `table_hpa`. The kernel implementation
    /// must perform one aligned 8-byte store, so the CPU never walks a half-written entry.
    fn write_entry(&mut self, table_hpa: u64, index: usize, value: u64);
}

/// Access rights of a guest page. `read` is required (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Perm {
    /// Read, write and execute: ordinary guest RAM.
    pub const RWX: Perm = Perm {
        read: true,
        write: true,
        exec: true,
    };
    /// Read and write, no execute.
    pub const RW: Perm = Perm {
        read: true,
        write: true,
        exec: false,
    };
    /// Read and execute: guest ROM (firmware, the test guest's code if it wants it sealed).
    pub const RX: Perm = Perm {
        read: true,
        write: false,
        exec: true,
    };
    /// Read only.
    pub const R: Perm = Perm {
        read: true,
        write: false,
        exec: false,
    };
}

/// How one vendor encodes nested paging entries. Pure functions of entry values, so both
/// encodings are tested bit for bit against the manuals.
pub trait EntryFormat {
    /// Vendor name of the format, for messages.
    const NAME: &'static str;
    /// The hardware write-permission bit.
    const WRITE: u64;
    /// The accessed bit the CPU sets in every entry it uses for a translation.
    const ACCESSED: u64;
    /// The dirty bit the CPU sets in a leaf when it writes through it.
    const DIRTY: u64;

    /// An entry pointing to the next-level table at `table_hpa`, with all rights (the leaves
    /// alone decide what the guest may do).
    fn table_entry(table_hpa: u64) -> u64;
    /// A leaf mapping the 4 KiB frame at `hpa` with `perm` (`perm.read` must be set).
    fn leaf_entry(hpa: u64, perm: Perm) -> u64;
    /// Whether the CPU treats `entry` as present.
    fn is_present(entry: u64) -> bool;
    /// The rights a present leaf grants now (write protection included).
    fn permissions(entry: u64) -> Perm;

    /// Whether the hardware W bit is set.
    fn is_writable(entry: u64) -> bool {
        entry & Self::WRITE != 0
    }
    /// Whether the mapping allows writes, whether or not write protection has cleared W.
    fn mapping_writable(entry: u64) -> bool {
        entry & SOFT_WRITABLE != 0
    }
    /// Whether the accessed bit is set.
    fn accessed(entry: u64) -> bool {
        entry & Self::ACCESSED != 0
    }
    /// Whether the dirty bit is set.
    fn dirty(entry: u64) -> bool {
        entry & Self::DIRTY != 0
    }
    /// `entry` with the dirty bit cleared.
    fn clear_dirty(entry: u64) -> u64 {
        entry & !Self::DIRTY
    }
    /// `entry` with the hardware W bit set.
    fn set_write(entry: u64) -> u64 {
        entry | Self::WRITE
    }
    /// `entry` with the hardware W bit cleared.
    fn clear_write(entry: u64) -> u64 {
        entry & !Self::WRITE
    }
    /// The host-physical address in `entry` (a table or a guest frame).
    fn address(entry: u64) -> u64 {
        entry & ADDRESS_MASK
    }
}

/// AMD nested page tables: the long-mode page-table format (APM vol. 2 5.3.3 and 5.4,
/// used unchanged for nested paging per 15.25).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NptFormat;

impl NptFormat {
    /// P: present (and, in this format, readable).
    pub const PRESENT: u64 = 1 << 0;
    /// R/W: writes allowed.
    pub const WRITABLE: u64 = 1 << 1;
    /// U/S: user access allowed. Nested walks and guest accesses are checked as user accesses
    /// (APM vol. 2 15.25.5, "Nested Table Walk"), so U must be set at every level; QEMU's TCG
    /// faults otherwise.
    pub const USER: u64 = 1 << 2;
    /// A: accessed.
    pub const ACCESSED_BIT: u64 = 1 << 5;
    /// D: dirty (leaves).
    pub const DIRTY_BIT: u64 = 1 << 6;
    /// NX: no execute. Only valid when the host runs with EFER.NXE=1 (the nested walk uses the
    /// host's paging mode, APM vol. 2 15.25.4, "Nested Paging and VMRUN/#VMEXIT"); otherwise bit 63 is reserved and faults. Guest RAM
    /// is mapped executable, so NX appears only for pages mapped without `exec`.
    pub const NO_EXECUTE: u64 = 1 << 63;
}

impl EntryFormat for NptFormat {
    const NAME: &'static str = "NPT";
    const WRITE: u64 = Self::WRITABLE;
    const ACCESSED: u64 = Self::ACCESSED_BIT;
    const DIRTY: u64 = Self::DIRTY_BIT;

    fn table_entry(table_hpa: u64) -> u64 {
        (table_hpa & ADDRESS_MASK) | Self::PRESENT | Self::WRITABLE | Self::USER
    }

    fn leaf_entry(hpa: u64, perm: Perm) -> u64 {
        let mut entry = (hpa & ADDRESS_MASK) | Self::PRESENT | Self::USER;
        if perm.write {
            entry |= Self::WRITABLE | SOFT_WRITABLE;
        }
        if !perm.exec {
            entry |= Self::NO_EXECUTE;
        }
        entry
    }

    fn is_present(entry: u64) -> bool {
        entry & Self::PRESENT != 0
    }

    fn permissions(entry: u64) -> Perm {
        Perm {
            read: Self::is_present(entry),
            write: entry & Self::WRITABLE != 0,
            exec: entry & Self::NO_EXECUTE == 0,
        }
    }
}

/// Intel extended page tables (SDM vol. 3C 29.3.2, "EPT Translation Mechanism", and the tables
/// "Format of an EPT ... Entry" there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptFormat;

impl EptFormat {
    /// Bit 0: reads allowed.
    pub const READ: u64 = 1 << 0;
    /// Bit 1: writes allowed.
    pub const WRITE_BIT: u64 = 1 << 1;
    /// Bit 2: instruction fetches allowed.
    pub const EXECUTE: u64 = 1 << 2;
    /// Bits 5:3 of a leaf: memory type 6, write-back (SDM vol. 3C 29.3.7, "EPT and Memory
    /// Typing").
    pub const MEMORY_TYPE_WB: u64 = 6 << 3;
    /// Bit 6 of a leaf: ignore the guest PAT. Guest RAM is host RAM the host also reaches
    /// write-back through its own mapping; forcing WB keeps the two aliases of a frame from
    /// having conflicting memory types whatever the guest programs into its PAT.
    pub const IGNORE_PAT: u64 = 1 << 6;
    /// Bit 8: accessed, set by the CPU only when EPTP bit 6 enables A/D (SDM vol. 3C 29.3.5).
    pub const ACCESSED_BIT: u64 = 1 << 8;
    /// Bit 9 of a leaf: dirty, set by the CPU only when EPTP bit 6 enables A/D.
    pub const DIRTY_BIT: u64 = 1 << 9;

    /// EPTP bits 2:0: the memory type the CPU uses to read the tables themselves (write-back).
    pub const EPTP_MEMORY_TYPE_WB: u64 = 6;
    /// EPTP bits 5:3: page-walk length minus one (4 levels).
    pub const EPTP_WALK_LENGTH_4: u64 = 3 << 3;
    /// EPTP bit 6: enable accessed and dirty flags (only if `IA32_VMX_EPT_VPID_CAP[21]`).
    pub const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;

    /// The EPT pointer for a 4-level table at `root_hpa` (SDM vol. 3C 25.6.11,
    /// "Extended-Page-Table Pointer (EPTP)"). With `accessed_dirty` false the CPU never sets
    /// A or D and dirty tracking must use write protection.
    pub fn eptp(root_hpa: u64, accessed_dirty: bool) -> u64 {
        let ad = if accessed_dirty {
            Self::EPTP_ACCESSED_DIRTY
        } else {
            0
        };
        (root_hpa & ADDRESS_MASK) | Self::EPTP_MEMORY_TYPE_WB | Self::EPTP_WALK_LENGTH_4 | ad
    }
}

impl EntryFormat for EptFormat {
    const NAME: &'static str = "EPT";
    const WRITE: u64 = Self::WRITE_BIT;
    const ACCESSED: u64 = Self::ACCESSED_BIT;
    const DIRTY: u64 = Self::DIRTY_BIT;

    fn table_entry(table_hpa: u64) -> u64 {
        (table_hpa & ADDRESS_MASK) | Self::READ | Self::WRITE_BIT | Self::EXECUTE
    }

    fn leaf_entry(hpa: u64, perm: Perm) -> u64 {
        let mut entry = (hpa & ADDRESS_MASK) | Self::MEMORY_TYPE_WB | Self::IGNORE_PAT;
        if perm.read {
            entry |= Self::READ;
        }
        if perm.write {
            entry |= Self::WRITE_BIT | SOFT_WRITABLE;
        }
        if perm.exec {
            entry |= Self::EXECUTE;
        }
        entry
    }

    /// An EPT entry is present when any of bits 2:0 is set (SDM vol. 3C 29.3.2).
    fn is_present(entry: u64) -> bool {
        entry & (Self::READ | Self::WRITE_BIT | Self::EXECUTE) != 0
    }

    fn permissions(entry: u64) -> Perm {
        Perm {
            read: entry & Self::READ != 0,
            write: entry & Self::WRITE_BIT != 0,
            exec: entry & Self::EXECUTE != 0,
        }
    }
}

/// Why a nested paging operation was refused. Nothing was changed when one is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingError {
    /// An address or range bound that must be 4 KiB-aligned is not.
    Unaligned { addr: u64 },
    /// A guest-physical address at or above [`MAX_GPA`].
    OutOfRange { gpa: u64 },
    /// A host-physical address (or the end of a host range) at or above [`MAX_HPA`].
    HpaOutOfRange { hpa: u64 },
    /// A range whose end is below its start.
    InvalidRange { start: u64, end: u64 },
    /// Rights the formats cannot express (no read).
    InvalidPermissions(Perm),
    /// The page already has a mapping.
    AlreadyMapped { gpa: u64 },
    /// The page has no mapping.
    NotMapped { gpa: u64 },
    /// [`NestedPageTable::restore_write`] on a page mapped read-only: a real guest error.
    NotWritable { gpa: u64 },
    /// [`TableMemory::alloc_table`] returned no frame.
    OutOfTableMemory,
    /// [`TableMemory::alloc_table`] returned a frame that is unaligned or beyond [`MAX_HPA`]
    /// (given back to it at once).
    BadTableFrame { hpa: u64 },
    /// The dirty bitmap has `pages` pages but the range needs `needed`.
    BitmapTooSmall { needed: u64, pages: u64 },
    /// The dirty bitmap refused a page.
    Dirty(DirtyError),
}

impl From<DirtyError> for PagingError {
    fn from(err: DirtyError) -> Self {
        PagingError::Dirty(err)
    }
}

impl fmt::Display for PagingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PagingError::Unaligned { addr } => write!(f, "address {addr:#x} is not 4 KiB-aligned"),
            PagingError::OutOfRange { gpa } => {
                write!(f, "guest-physical address {gpa:#x} is beyond {MAX_GPA:#x}")
            }
            PagingError::HpaOutOfRange { hpa } => {
                write!(f, "host-physical address {hpa:#x} is beyond {MAX_HPA:#x}")
            }
            PagingError::InvalidRange { start, end } => {
                write!(f, "range {start:#x}..{end:#x} ends before it starts")
            }
            PagingError::InvalidPermissions(perm) => {
                write!(
                    f,
                    "permissions {perm:?} are not expressible (read is required)"
                )
            }
            PagingError::AlreadyMapped { gpa } => write!(f, "page {gpa:#x} is already mapped"),
            PagingError::NotMapped { gpa } => write!(f, "page {gpa:#x} is not mapped"),
            PagingError::NotWritable { gpa } => write!(f, "page {gpa:#x} is mapped read-only"),
            PagingError::OutOfTableMemory => write!(f, "out of memory for nested page tables"),
            PagingError::BadTableFrame { hpa } => {
                write!(f, "table allocator returned an unusable frame {hpa:#x}")
            }
            PagingError::BitmapTooSmall { needed, pages } => write!(
                f,
                "dirty bitmap of {pages} pages is too small for {needed} pages"
            ),
            PagingError::Dirty(err) => write!(f, "dirty log: {err}"),
        }
    }
}

/// A nested TLB flush the caller owes the hardware before the guest runs again.
///
/// Returned by every operation that clears a D bit or removes a right. The backend flushes
/// (SVM: `TLB_CONTROL` = flush this ASID, or a fresh ASID, for the next VMRUN; VMX: INVEPT
/// single-context with this table's EPTP before the next VM entry) and then calls
/// [`PendingFlush::flushed`]. When [`PendingFlush::is_required`] is false nothing changed and the
/// flush may be skipped.
#[must_use = "flush the nested TLB (SVM: TLB_CONTROL or a new ASID; VMX: INVEPT single-context) \
              before the guest runs again, then call .flushed()"]
#[derive(Debug, PartialEq, Eq)]
pub struct PendingFlush {
    changed: usize,
}

impl PendingFlush {
    /// No flush owed: the starting point for [`PendingFlush::merge`].
    pub fn none() -> Self {
        PendingFlush { changed: 0 }
    }

    fn new(changed: usize) -> Self {
        PendingFlush { changed }
    }

    /// How many entries changed (for a harvest: how many dirty pages it found).
    pub fn changed(&self) -> usize {
        self.changed
    }

    /// Whether any cached translation may now be stale, so a flush is needed.
    pub fn is_required(&self) -> bool {
        self.changed != 0
    }

    /// One flush covering both tokens' changes.
    pub fn merge(self, other: PendingFlush) -> PendingFlush {
        PendingFlush::new(self.changed.saturating_add(other.changed))
    }

    /// Consumes the token: call it after the flush was performed. Returns [`Self::changed`].
    pub fn flushed(self) -> usize {
        self.changed
    }
}

/// A 4-level nested page table (NPT with [`NptFormat`], EPT with [`EptFormat`]) mapping guest
/// RAM with 4 KiB leaves.
///
/// It holds the root's address and counters only; the tables are in [`TableMemory`], passed to
/// every call. The caller calls [`NestedPageTable::teardown`] to free the tables: dropping the
/// value without it leaks them.
#[derive(Debug)]
pub struct NestedPageTable<F: EntryFormat> {
    root: u64,
    leaves: usize,
    tables: usize,
    _format: PhantomData<fn() -> F>,
}

impl<F: EntryFormat> NestedPageTable<F> {
    /// An empty table: one zeroed root frame.
    pub fn new<M: TableMemory + ?Sized>(mem: &mut M) -> Result<Self, PagingError> {
        let root = alloc_table(mem)?;
        Ok(NestedPageTable {
            root,
            leaves: 0,
            tables: 1,
            _format: PhantomData,
        })
    }

    /// The root table's host-physical address: nCR3 for SVM, the address in the EPTP for VMX
    /// (see [`EptFormat::eptp`]).
    pub fn root_hpa(&self) -> u64 {
        self.root
    }

    /// Number of mapped 4 KiB pages.
    pub fn leaf_count(&self) -> usize {
        self.leaves
    }

    /// Number of table frames in use, the root included.
    pub fn table_count(&self) -> usize {
        self.tables
    }

    /// Maps the guest page at `gpa` to the host frame at `hpa` with `perm`, creating the tables
    /// on the way. On error nothing changed (tables created for this call are freed again).
    pub fn map<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        perm: Perm,
    ) -> Result<(), PagingError> {
        check_gpa_page(gpa)?;
        check_hpa_page(hpa)?;
        check_perm(perm)?;
        let pt = self.leaf_table(mem, gpa)?;
        // A freshly created table is empty, so AlreadyMapped only happens in an existing table
        // and there is nothing to roll back.
        self.install_leaf(mem, pt, gpa, hpa, perm)
    }

    /// Maps the guest pages of `gpa_range` to the host frames starting at `hpa`, page by page.
    /// Consecutive pages reuse the leaf table found for the previous one instead of walking from
    /// the root. All or nothing: on error the pages this call mapped are unmapped again.
    pub fn map_range<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa_range: Range<u64>,
        hpa: u64,
        perm: Perm,
    ) -> Result<(), PagingError> {
        check_range(&gpa_range)?;
        check_hpa_page(hpa)?;
        check_perm(perm)?;
        let len = gpa_range.end - gpa_range.start;
        match hpa.checked_add(len) {
            Some(end) if end <= MAX_HPA => {}
            _ => return Err(PagingError::HpaOutOfRange { hpa }),
        }

        // (gpa >> 21, leaf table): the table serving the current 2 MiB of guest space.
        let mut cached: Option<(u64, u64)> = None;
        let mut gpa = gpa_range.start;
        while gpa < gpa_range.end {
            let pt = match cached {
                Some((region, pt)) if region == gpa >> 21 => Ok(pt),
                _ => self.leaf_table(mem, gpa),
            };
            let result = pt.and_then(|pt| {
                cached = Some((gpa >> 21, pt));
                self.install_leaf(mem, pt, gpa, hpa + (gpa - gpa_range.start), perm)
            });
            if let Err(err) = result {
                self.unmap_fresh(mem, gpa_range.start..gpa);
                return Err(err);
            }
            gpa += PAGE_SIZE;
        }
        Ok(())
    }

    /// Removes the mapping of the guest page at `gpa` and frees the tables that become empty.
    /// Returns the host frame it mapped, which stays the caller's; the caller must not reuse
    /// that frame before performing the returned flush, since the guest may still reach it
    /// through a cached translation.
    pub fn unmap<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
    ) -> Result<(u64, PendingFlush), PagingError> {
        check_gpa_page(gpa)?;
        let hpa = self.remove_leaf(mem, gpa)?;
        Ok((hpa, PendingFlush::new(1)))
    }

    /// The host-physical address `gpa` translates to (page offset included) and the rights the
    /// leaf grants now, or `None` when unmapped or beyond [`MAX_GPA`].
    pub fn translate<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Option<(u64, Perm)> {
        let (_, _, leaf) = self.find_leaf(mem, gpa)?;
        Some((
            F::address(leaf) | (gpa & (PAGE_SIZE - 1)),
            F::permissions(leaf),
        ))
    }

    /// Write-protect fallback for CPUs without nested A/D bits: clears the hardware W bit of
    /// every writable leaf in `gpa_range`, so the guest's next write to each page exits (SVM:
    /// #NPF; VMX: EPT violation). The backend records the page and calls
    /// [`Self::restore_write`]. Read-only mappings are left alone.
    ///
    /// The returned flush is mandatory: a translation cached while the page was writable would
    /// let writes through without an exit, and the page would be missing from the log.
    pub fn write_protect_range<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa_range: Range<u64>,
    ) -> Result<PendingFlush, PagingError> {
        check_range(&gpa_range)?;
        let mut changed = 0;
        self.for_each_leaf_table(mem, &gpa_range, &mut |mem, pt, first, last, _| {
            for index in first..=last {
                let entry = mem.read_entry(pt, index);
                if F::is_present(entry) && F::is_writable(entry) {
                    mem.write_entry(pt, index, F::clear_write(entry));
                    changed += 1;
                }
            }
            Ok(())
        })?;
        Ok(PendingFlush::new(changed))
    }

    /// Makes the page containing `gpa` writable again after a write-protection fault. Takes the
    /// faulting address as reported (any offset). Idempotent: a second fault on the same page
    /// (a stale read-only translation, no flush needed for adding a right) returns `Ok` again.
    ///
    /// Errors: [`PagingError::NotMapped`] (the access was outside guest RAM: MMIO or a stray
    /// access) and [`PagingError::NotWritable`] (a write to a page mapped read-only).
    pub fn restore_write<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
    ) -> Result<(), PagingError> {
        if gpa >= MAX_GPA {
            return Err(PagingError::OutOfRange { gpa });
        }
        let page = gpa & !(PAGE_SIZE - 1);
        let (pt, index, entry) = self
            .find_leaf(mem, page)
            .ok_or(PagingError::NotMapped { gpa: page })?;
        if !F::mapping_writable(entry) {
            return Err(PagingError::NotWritable { gpa: page });
        }
        if !F::is_writable(entry) {
            mem.write_entry(pt, index, F::set_write(entry));
        }
        Ok(())
    }

    /// Collects the pages written since the last harvest: for every present leaf in
    /// `gpa_range` whose D bit is set, sets the page (gpa / 4 KiB) in `bitmap`, then clears D.
    /// [`PendingFlush::changed`] is the number of pages found. Tables are walked once, skipping
    /// subtrees whose upper-level entry is not present.
    ///
    /// # The caller MUST flush the nested TLB before the guest runs again
    ///
    /// This function does not flush. A CPU caches the dirty state with the translation: once a
    /// cached translation has D=1, further writes through it do not set D in memory again. If the
    /// guest runs after D was cleared but before a flush, its writes through translations cached
    /// before the harvest leave D clear and those pages are silently missing from the next
    /// harvest, i.e. never re-sent: a corrupted migration. Flush with SVM `TLB_CONTROL` (flush
    /// this guest's ASID) or a new ASID before the next VMRUN (APM vol. 2 15.16 "TLB Control";
    /// 15.25 "Nested Paging"), or VMX INVEPT single-context for this table's EPTP before the next
    /// VM entry (SDM vol. 3C 29.3.5 "Accessed and Dirty Flags for EPT"; 29.4.3.4 "Guidelines for
    /// Use of the INVEPT Instruction", which lists clearing bit 9 of a leaf; and vol. 3A 4.8 on
    /// clearing A/D flags under cached translations). QEMU sets D again without a flush, so tests
    /// under QEMU cannot catch a missing one: consume the returned [`PendingFlush`].
    ///
    /// # Atomicity
    ///
    /// Plain read-modify-write of each leaf, correct only while no vCPU of this VM runs (the
    /// single-core model). On SMP, a running vCPU could set A/D between the read and the write;
    /// the harvest must then use an atomic AND of `!D` on the entry and record the page from the
    /// value it returns.
    ///
    /// The bit of each page is set in `bitmap` before its D bit is cleared, so an error can never
    /// lose a page. With EPT, the CPU sets D only when the EPTP enables A/D (bit 6): without it,
    /// this finds nothing and the backend must use [`Self::write_protect_range`].
    pub fn harvest_dirty<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa_range: Range<u64>,
        bitmap: &mut DirtyBitmap,
    ) -> Result<PendingFlush, PagingError> {
        check_range(&gpa_range)?;
        let needed = gpa_range.end / PAGE_SIZE;
        if gpa_range.start < gpa_range.end && needed > bitmap.pages() {
            return Err(PagingError::BitmapTooSmall {
                needed,
                pages: bitmap.pages(),
            });
        }
        let mut found = 0;
        self.for_each_leaf_table(mem, &gpa_range, &mut |mem, pt, first, last, base| {
            for index in first..=last {
                let entry = mem.read_entry(pt, index);
                if F::is_present(entry) && F::dirty(entry) {
                    bitmap.set((base >> 12) + index as u64)?;
                    mem.write_entry(pt, index, F::clear_dirty(entry));
                    found += 1;
                }
            }
            Ok(())
        })?;
        Ok(PendingFlush::new(found))
    }

    /// Frees every table frame, the root last. Guest frames are the caller's and untouched.
    ///
    /// The returned flush is owed before this VM's ASID (SVM) or this root's EPTP (VMX) is used
    /// again: translations tagged with them may still name the freed tables and guest frames.
    pub fn teardown<M: TableMemory + ?Sized>(self, mem: &mut M) -> PendingFlush {
        free_subtree::<F, M>(mem, self.root, TOP_LEVEL);
        PendingFlush::new(self.leaves + self.tables)
    }

    /// The leaf table for `gpa`, creating missing tables. If a creation fails, the tables this
    /// call created are unlinked and freed again, so no empty table is left behind.
    fn leaf_table<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
    ) -> Result<u64, PagingError> {
        // (parent table, index in it, new table) for each table created by this call.
        let mut created = [(0u64, 0usize, 0u64); TOP_LEVEL as usize];
        let mut count = 0;
        let mut table = self.root;
        for level in (1..=TOP_LEVEL).rev() {
            let index = table_index(gpa, level);
            let entry = mem.read_entry(table, index);
            if F::is_present(entry) {
                table = F::address(entry);
                continue;
            }
            match alloc_table(mem) {
                Ok(child) => {
                    mem.write_entry(table, index, F::table_entry(child));
                    self.tables += 1;
                    created[count] = (table, index, child);
                    count += 1;
                    table = child;
                }
                Err(err) => {
                    for &(parent, index, child) in created[..count].iter().rev() {
                        mem.write_entry(parent, index, 0);
                        mem.free_table(child);
                        self.tables -= 1;
                    }
                    return Err(err);
                }
            }
        }
        Ok(table)
    }

    /// Writes the leaf for `gpa` into leaf table `pt`, unless the page is already mapped.
    fn install_leaf<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        pt: u64,
        gpa: u64,
        hpa: u64,
        perm: Perm,
    ) -> Result<(), PagingError> {
        let index = table_index(gpa, 0);
        if F::is_present(mem.read_entry(pt, index)) {
            return Err(PagingError::AlreadyMapped { gpa });
        }
        mem.write_entry(pt, index, F::leaf_entry(hpa, perm));
        self.leaves += 1;
        Ok(())
    }

    /// Clears the leaf of `gpa` and frees the tables that become empty (never the root).
    fn remove_leaf<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
    ) -> Result<u64, PagingError> {
        // path[level] = (table at that level, index of the entry used in it).
        let mut path = [(0u64, 0usize); TOP_LEVEL as usize + 1];
        let mut table = self.root;
        let mut leaf = 0;
        for level in (0..=TOP_LEVEL).rev() {
            let index = table_index(gpa, level);
            path[level as usize] = (table, index);
            let entry = mem.read_entry(table, index);
            if !F::is_present(entry) {
                return Err(PagingError::NotMapped { gpa });
            }
            if level == 0 {
                leaf = entry;
            } else {
                table = F::address(entry);
            }
        }
        let (pt, index) = path[0];
        mem.write_entry(pt, index, 0);
        self.leaves -= 1;

        // Walk up while the table just edited is empty: unlink it from its parent and free it.
        for level in 0..TOP_LEVEL as usize {
            let (table, _) = path[level];
            if !table_is_empty::<F, M>(mem, table) {
                break;
            }
            let (parent, index) = path[level + 1];
            mem.write_entry(parent, index, 0);
            mem.free_table(table);
            self.tables -= 1;
        }
        Ok(F::address(leaf))
    }

    /// Undoes the mappings a failed [`Self::map_range`] made over `range`. Those pages were
    /// mapped by this call while the guest was not running, so no translation of them can be
    /// cached and no flush is owed.
    fn unmap_fresh<M: TableMemory + ?Sized>(&mut self, mem: &mut M, range: Range<u64>) {
        let mut gpa = range.start;
        while gpa < range.end {
            // Cannot fail: this call mapped every page of `range` just before.
            let _ = self.remove_leaf(mem, gpa);
            gpa += PAGE_SIZE;
        }
    }

    /// The leaf table, index and entry mapping `gpa`, if present.
    fn find_leaf<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Option<(u64, usize, u64)> {
        if gpa >= MAX_GPA {
            return None;
        }
        let mut table = self.root;
        for level in (0..=TOP_LEVEL).rev() {
            let index = table_index(gpa, level);
            let entry = mem.read_entry(table, index);
            if !F::is_present(entry) {
                return None;
            }
            if level == 0 {
                return Some((table, index, entry));
            }
            table = F::address(entry);
        }
        None
    }

    /// Calls `visit(mem, leaf table, first index, last index, table's base gpa)` for every leaf
    /// table overlapping the non-empty, checked `range`, in ascending order, with the indices
    /// clipped to the range. Subtrees behind non-present entries are skipped without reads.
    fn for_each_leaf_table<M, V>(
        &self,
        mem: &mut M,
        range: &Range<u64>,
        visit: &mut V,
    ) -> Result<(), PagingError>
    where
        M: TableMemory + ?Sized,
        V: FnMut(&mut M, u64, usize, usize, u64) -> Result<(), PagingError>,
    {
        if range.start >= range.end {
            return Ok(());
        }
        walk_tables::<F, M, V>(mem, self.root, TOP_LEVEL, 0, range, visit)
    }
}

/// Recursive step of [`NestedPageTable::for_each_leaf_table`] (depth at most 4).
fn walk_tables<F, M, V>(
    mem: &mut M,
    table: u64,
    level: u32,
    base: u64,
    range: &Range<u64>,
    visit: &mut V,
) -> Result<(), PagingError>
where
    F: EntryFormat,
    M: TableMemory + ?Sized,
    V: FnMut(&mut M, u64, usize, usize, u64) -> Result<(), PagingError>,
{
    let span = entry_span(level);
    // Cannot overflow: base + 512 * span <= 2^48 for every table of a 4-level tree.
    let table_end = base + ENTRIES as u64 * span;
    let first = ((range.start.max(base) - base) / span) as usize;
    let last = ((range.end.min(table_end) - 1 - base) / span) as usize;
    if level == 0 {
        return visit(mem, table, first, last, base);
    }
    for index in first..=last {
        let entry = mem.read_entry(table, index);
        if F::is_present(entry) {
            let child_base = base + index as u64 * span;
            walk_tables::<F, M, V>(mem, F::address(entry), level - 1, child_base, range, visit)?;
        }
    }
    Ok(())
}

/// Frees `table` and, above the leaf level, every table below it.
fn free_subtree<F: EntryFormat, M: TableMemory + ?Sized>(mem: &mut M, table: u64, level: u32) {
    if level > 0 {
        for index in 0..ENTRIES {
            let entry = mem.read_entry(table, index);
            if F::is_present(entry) {
                free_subtree::<F, M>(mem, F::address(entry), level - 1);
            }
        }
    }
    mem.free_table(table);
}

/// Whether no entry of `table` is present.
fn table_is_empty<F: EntryFormat, M: TableMemory + ?Sized>(mem: &M, table: u64) -> bool {
    (0..ENTRIES).all(|index| !F::is_present(mem.read_entry(table, index)))
}

/// A table frame from `mem`, checked: an unusable frame would corrupt the entry that points
/// to it, so it is given back and refused.
fn alloc_table<M: TableMemory + ?Sized>(mem: &mut M) -> Result<u64, PagingError> {
    let hpa = mem.alloc_table().ok_or(PagingError::OutOfTableMemory)?;
    if !hpa.is_multiple_of(PAGE_SIZE) || hpa >= MAX_HPA {
        mem.free_table(hpa);
        return Err(PagingError::BadTableFrame { hpa });
    }
    Ok(hpa)
}

/// Index of `gpa`'s entry in its table at `level` (9 bits per level above the 12-bit offset).
fn table_index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * level)) & (ENTRIES as u64 - 1)) as usize
}

/// Bytes of guest-physical space one entry at `level` covers.
fn entry_span(level: u32) -> u64 {
    1 << (12 + 9 * level)
}

fn check_gpa_page(gpa: u64) -> Result<(), PagingError> {
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return Err(PagingError::Unaligned { addr: gpa });
    }
    if gpa >= MAX_GPA {
        return Err(PagingError::OutOfRange { gpa });
    }
    Ok(())
}

fn check_hpa_page(hpa: u64) -> Result<(), PagingError> {
    if !hpa.is_multiple_of(PAGE_SIZE) {
        return Err(PagingError::Unaligned { addr: hpa });
    }
    if hpa >= MAX_HPA {
        return Err(PagingError::HpaOutOfRange { hpa });
    }
    Ok(())
}

/// A guest-physical range with page-aligned bounds, `start <= end <= MAX_GPA`.
fn check_range(range: &Range<u64>) -> Result<(), PagingError> {
    for addr in [range.start, range.end] {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(PagingError::Unaligned { addr });
        }
    }
    if range.end < range.start {
        return Err(PagingError::InvalidRange {
            start: range.start,
            end: range.end,
        });
    }
    if range.end > MAX_GPA {
        return Err(PagingError::OutOfRange { gpa: range.end });
    }
    Ok(())
}

fn check_perm(perm: Perm) -> Result<(), PagingError> {
    if perm.read {
        Ok(())
    } else {
        Err(PagingError::InvalidPermissions(perm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;
    use alloc::vec::Vec;
    use core::cell::Cell;
    use std::collections::{BTreeSet, HashMap};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Table frames in a map, with the bookkeeping the tests check: frames allocated and freed,
    /// entry reads (to prove walks skip what they should). Reading or freeing a frame that is not
    /// a live table panics, which fails the test: that is how "never touches a freed table or a
    /// guest frame" is proven.
    struct FakeMemory {
        frames: HashMap<u64, Box<[u64; ENTRIES]>>,
        next: u64,
        allocated: usize,
        freed: usize,
        /// Most frames live at once; `alloc_table` fails beyond.
        limit: usize,
        /// When set, the next `alloc_table` returns this (unusable) address.
        bad_frame: Option<u64>,
        /// Bad frames given back through `free_table`.
        bad_returned: usize,
        reads: Cell<usize>,
    }

    impl FakeMemory {
        fn new() -> Self {
            FakeMemory {
                frames: HashMap::new(),
                // Above 4 GiB, so addresses use more than 32 bits of the address field.
                next: 0x0000_0001_0000_0000,
                allocated: 0,
                freed: 0,
                limit: usize::MAX,
                bad_frame: None,
                bad_returned: 0,
                reads: Cell::new(0),
            }
        }

        fn live(&self) -> usize {
            self.frames.len()
        }

        /// Entry reads since the last call.
        fn take_reads(&self) -> usize {
            self.reads.replace(0)
        }
    }

    impl TableMemory for FakeMemory {
        fn alloc_table(&mut self) -> Option<u64> {
            if let Some(bad) = self.bad_frame.take() {
                return Some(bad);
            }
            if self.frames.len() >= self.limit {
                return None;
            }
            let hpa = self.next;
            self.next += PAGE_SIZE;
            self.frames.insert(hpa, Box::new([0; ENTRIES]));
            self.allocated += 1;
            Some(hpa)
        }

        fn free_table(&mut self, hpa: u64) {
            if !hpa.is_multiple_of(PAGE_SIZE) || hpa >= MAX_HPA {
                self.bad_returned += 1;
                return;
            }
            assert!(
                self.frames.remove(&hpa).is_some(),
                "free of {hpa:#x}, which is not a live table"
            );
            self.freed += 1;
        }

        fn read_entry(&self, table_hpa: u64, index: usize) -> u64 {
            self.reads.set(self.reads.get() + 1);
            self.frames
                .get(&table_hpa)
                .unwrap_or_else(|| panic!("read of {table_hpa:#x}, which is not a live table"))
                [index]
        }

        fn write_entry(&mut self, table_hpa: u64, index: usize, value: u64) {
            self.frames
                .get_mut(&table_hpa)
                .unwrap_or_else(|| panic!("write to {table_hpa:#x}, which is not a live table"))
                [index] = value;
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Access {
        Read,
        Write,
        Fetch,
    }

    /// What the hardware reports for a failed nested translation (SVM #NPF, VMX EPT violation).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fault {
        NotPresent,
        Protection,
    }

    /// Emulates the CPU's nested walk for one guest access, as the manuals describe it with A/D
    /// enabled: every entry used must be present and allow the access; A is set in each entry
    /// used, and D in the leaf on a write. Returns the host-physical address.
    fn cpu_access<F: EntryFormat>(
        mem: &mut FakeMemory,
        root: u64,
        gpa: u64,
        access: Access,
    ) -> Result<u64, Fault> {
        let mut table = root;
        for level in (0..=TOP_LEVEL).rev() {
            let index = table_index(gpa, level);
            let entry = mem.read_entry(table, index);
            if !F::is_present(entry) {
                return Err(Fault::NotPresent);
            }
            let perm = F::permissions(entry);
            let allowed = match access {
                Access::Read => perm.read,
                Access::Write => perm.write,
                Access::Fetch => perm.exec,
            };
            if !allowed {
                return Err(Fault::Protection);
            }
            let mut updated = entry | F::ACCESSED;
            if level == 0 && access == Access::Write {
                updated |= F::DIRTY;
            }
            if updated != entry {
                mem.write_entry(table, index, updated);
            }
            if level == 0 {
                return Ok(F::address(entry) | (gpa & (PAGE_SIZE - 1)));
            }
            table = F::address(entry);
        }
        unreachable!("the loop returns at level 0")
    }

    /// A guest write (the test helper that emulates the CPU marking the leaf).
    fn guest_write<F: EntryFormat>(
        npt: &NestedPageTable<F>,
        mem: &mut FakeMemory,
        gpa: u64,
    ) -> Result<u64, Fault> {
        cpu_access::<F>(mem, npt.root_hpa(), gpa, Access::Write)
    }

    /// A TLB in front of [`cpu_access`], behaving as the manuals allow: a translation cached with
    /// W=1 and D=1 is used for writes without touching the tables again. Only [`Tlb::flush`]
    /// drops it. Anything else (miss, or cached D=0 / W=0) walks the tables.
    #[derive(Default)]
    struct Tlb {
        /// guest page -> (writable, dirty) as cached.
        entries: HashMap<u64, (bool, bool)>,
    }

    impl Tlb {
        fn write<F: EntryFormat>(
            &mut self,
            mem: &mut FakeMemory,
            root: u64,
            gpa: u64,
        ) -> Result<(), Fault> {
            let page = gpa >> 12;
            if self.entries.get(&page) == Some(&(true, true)) {
                return Ok(());
            }
            cpu_access::<F>(mem, root, gpa, Access::Write)?;
            self.entries.insert(page, (true, true));
            Ok(())
        }

        fn flush(&mut self) {
            self.entries.clear();
        }
    }

    /// Deterministic pseudo-random page numbers below `pages` (64-bit LCG), `count` distinct.
    fn scattered_pages(seed: u64, count: usize, pages: u64) -> BTreeSet<u64> {
        let mut state = seed;
        let mut set = BTreeSet::new();
        while set.len() < count {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            set.insert((state >> 33) % pages);
        }
        set
    }

    /// Host frame of guest page `page` in the tests (an arbitrary, recognisable pattern).
    fn frame_of(page: u64) -> u64 {
        0x0000_0040_0000_0000 + page * PAGE_SIZE
    }

    fn bitmap_pages(bitmap: &DirtyBitmap) -> BTreeSet<u64> {
        bitmap.iter().collect()
    }

    // ---- Entry encodings, bit for bit against the manuals ----

    /// APM vol. 2 5.4: P bit 0, R/W bit 1, U/S bit 2, address 51:12. Table entries get all
    /// three so only leaves restrict.
    #[test]
    fn npt_table_entry_encoding() {
        assert_eq!(
            NptFormat::table_entry(0x0000_0012_3456_7000),
            0x0000_0012_3456_7007
        );
        // Stray low or high bits in the address never leak into flag bits.
        assert_eq!(
            NptFormat::table_entry(0xfff0_0012_3456_7fff),
            0x0000_0012_3456_7007
        );
    }

    /// Leaves: P|U always, R/W + software bit 52 when writable, NX (bit 63) when not
    /// executable, A and D clear.
    #[test]
    fn npt_leaf_encodings() {
        let hpa = 0x0000_0012_3456_7000;
        assert_eq!(NptFormat::leaf_entry(hpa, Perm::RWX), 0x0010_0012_3456_7007);
        assert_eq!(NptFormat::leaf_entry(hpa, Perm::RW), 0x8010_0012_3456_7007);
        assert_eq!(NptFormat::leaf_entry(hpa, Perm::RX), 0x0000_0012_3456_7005);
        assert_eq!(NptFormat::leaf_entry(hpa, Perm::R), 0x8000_0012_3456_7005);
        // The highest frame the address field can hold.
        assert_eq!(
            NptFormat::leaf_entry(0x000f_ffff_ffff_f000, Perm::RWX),
            0x001f_ffff_ffff_f007
        );
        for perm in [Perm::RWX, Perm::RW, Perm::RX, Perm::R] {
            assert_eq!(
                NptFormat::permissions(NptFormat::leaf_entry(hpa, perm)),
                perm
            );
        }
    }

    /// A bit 5 (any level), D bit 6 (leaf); present is bit 0 alone.
    #[test]
    fn npt_flag_functions() {
        let leaf = NptFormat::leaf_entry(0x5000, Perm::RWX);
        let used = leaf | 0x20 | 0x40;
        assert!(NptFormat::accessed(used) && NptFormat::dirty(used));
        assert!(!NptFormat::accessed(leaf) && !NptFormat::dirty(leaf));
        assert_eq!(NptFormat::clear_dirty(used), leaf | 0x20);
        assert_eq!(NptFormat::clear_write(leaf), leaf & !0x2);
        assert!(!NptFormat::is_writable(NptFormat::clear_write(leaf)));
        assert!(NptFormat::mapping_writable(NptFormat::clear_write(leaf)));
        assert_eq!(NptFormat::set_write(NptFormat::clear_write(leaf)), leaf);
        assert_eq!(NptFormat::address(used), 0x5000);
        assert!(NptFormat::is_present(0x1));
        assert!(!NptFormat::is_present(0x8000_0000_0000_0006));
    }

    /// SDM vol. 3C 29.3.2: non-leaf EPT entries R|W|X (bits 2:0), address 51:12.
    #[test]
    fn ept_table_entry_encoding() {
        assert_eq!(
            EptFormat::table_entry(0x0000_0012_3456_7000),
            0x0000_0012_3456_7007
        );
    }

    /// Leaves: R/W/X bits 2:0, memory type WB (6) in bits 5:3 = 0x30, ignore-PAT bit 6 = 0x40,
    /// software bit 52 when writable; A (bit 8) and D (bit 9) clear.
    #[test]
    fn ept_leaf_encodings() {
        let hpa = 0x0000_0012_3456_7000;
        assert_eq!(EptFormat::leaf_entry(hpa, Perm::RWX), 0x0010_0012_3456_7077);
        assert_eq!(EptFormat::leaf_entry(hpa, Perm::RW), 0x0010_0012_3456_7073);
        assert_eq!(EptFormat::leaf_entry(hpa, Perm::RX), 0x0000_0012_3456_7075);
        assert_eq!(EptFormat::leaf_entry(hpa, Perm::R), 0x0000_0012_3456_7071);
        for perm in [Perm::RWX, Perm::RW, Perm::RX, Perm::R] {
            assert_eq!(
                EptFormat::permissions(EptFormat::leaf_entry(hpa, perm)),
                perm
            );
        }
    }

    /// A bit 8, D bit 9; present when any of bits 2:0 is set (execute-only counts).
    #[test]
    fn ept_flag_functions() {
        let leaf = EptFormat::leaf_entry(0x5000, Perm::RWX);
        let used = leaf | 0x100 | 0x200;
        assert!(EptFormat::accessed(used) && EptFormat::dirty(used));
        assert!(!EptFormat::accessed(leaf) && !EptFormat::dirty(leaf));
        assert_eq!(EptFormat::clear_dirty(used), leaf | 0x100);
        assert_eq!(EptFormat::clear_write(leaf), leaf & !0x2);
        assert_eq!(EptFormat::set_write(EptFormat::clear_write(leaf)), leaf);
        assert_eq!(EptFormat::address(used), 0x5000);
        assert!(EptFormat::is_present(0x4));
        assert!(
            !EptFormat::is_present(0x70),
            "memory type bits alone are not present"
        );
    }

    /// EPTP: memory type WB (6) in bits 2:0, walk length 4 - 1 = 3 in bits 5:3, A/D in bit 6.
    #[test]
    fn eptp_encoding() {
        assert_eq!(EptFormat::eptp(0x1234_5000, false), 0x1234_501e);
        assert_eq!(EptFormat::eptp(0x1234_5000, true), 0x1234_505e);
    }

    #[test]
    fn pending_flush_tokens() {
        let none = PendingFlush::none();
        assert!(!none.is_required());
        let merged = none.merge(PendingFlush::new(2)).merge(PendingFlush::new(3));
        assert!(merged.is_required());
        assert_eq!(merged.changed(), 5);
        assert_eq!(merged.flushed(), 5);
    }

    #[test]
    fn errors_display() {
        let errors = [
            PagingError::Unaligned { addr: 1 },
            PagingError::OutOfRange { gpa: MAX_GPA },
            PagingError::HpaOutOfRange { hpa: MAX_HPA },
            PagingError::InvalidRange { start: 2, end: 1 },
            PagingError::InvalidPermissions(Perm {
                read: false,
                write: true,
                exec: false,
            }),
            PagingError::AlreadyMapped { gpa: 0 },
            PagingError::NotMapped { gpa: 0 },
            PagingError::NotWritable { gpa: 0 },
            PagingError::OutOfTableMemory,
            PagingError::BadTableFrame { hpa: 3 },
            PagingError::BitmapTooSmall {
                needed: 2,
                pages: 1,
            },
            PagingError::Dirty(DirtyError::TooLarge { pages: 0 }),
        ];
        for err in errors {
            assert!(!alloc::format!("{err}").is_empty());
        }
    }

    // ---- The walker, run for both formats (see `for_both_formats!` at the end) ----

    fn new_table<F: EntryFormat>(mem: &mut FakeMemory) -> NestedPageTable<F> {
        NestedPageTable::<F>::new(mem).unwrap()
    }

    fn map_translate_unmap_round_trip<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        assert_eq!(npt.table_count(), 1);
        assert_eq!(mem.live(), 1);
        // Pages at table boundaries of every level, up to the last mappable page.
        let cases = [
            (0, 0x10_0000, Perm::RWX),
            (0x1000, 0x20_0000, Perm::RW),
            (2 * MIB - PAGE_SIZE, 0x30_0000, Perm::RX),
            (2 * MIB, 0x40_0000, Perm::R),
            (GIB, 0x000f_ffff_ffff_f000, Perm::RWX),
            (512 * GIB, 0x60_0000, Perm::RWX),
            (MAX_GPA - PAGE_SIZE, 0x70_0000, Perm::RW),
        ];
        for (gpa, hpa, perm) in cases {
            npt.map(&mut mem, gpa, hpa, perm).unwrap();
        }
        assert_eq!(npt.leaf_count(), cases.len());
        assert_eq!(npt.table_count(), mem.live());
        for (gpa, hpa, perm) in cases {
            assert_eq!(npt.translate(&mem, gpa), Some((hpa, perm)));
            assert_eq!(npt.translate(&mem, gpa + 0xabc), Some((hpa + 0xabc, perm)));
        }
        for gpa in [0x2000, 4 * MIB, 2 * GIB, 1024 * GIB, MAX_GPA, u64::MAX] {
            assert_eq!(npt.translate(&mem, gpa), None, "{gpa:#x}");
        }
        for (gpa, hpa, _) in cases {
            let (unmapped, flush) = npt.unmap(&mut mem, gpa).unwrap();
            assert_eq!(unmapped, hpa);
            assert!(flush.is_required());
            assert_eq!(flush.flushed(), 1);
            assert_eq!(npt.translate(&mem, gpa), None);
        }
        assert_eq!(npt.leaf_count(), 0);
        assert_eq!(npt.table_count(), 1, "every intermediate table was freed");
        assert_eq!(mem.live(), 1);
        assert!(npt.teardown(&mut mem).is_required());
        assert_eq!(mem.live(), 0);
    }

    fn unmap_keeps_tables_still_in_use<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        npt.map(&mut mem, 0x1000, 0x10_0000, Perm::RWX).unwrap();
        npt.map(&mut mem, 0x5000, 0x11_0000, Perm::RWX).unwrap(); // same leaf table
        npt.map(&mut mem, 4 * MIB, 0x12_0000, Perm::RWX).unwrap(); // same PD, other PT
        assert_eq!(npt.table_count(), 5); // PML4, PDPT, PD, 2 PTs
        npt.unmap(&mut mem, 0x1000).unwrap().1.flushed();
        assert_eq!(npt.table_count(), 5);
        assert_eq!(npt.translate(&mem, 0x5000), Some((0x11_0000, Perm::RWX)));
        npt.unmap(&mut mem, 0x5000).unwrap().1.flushed();
        assert_eq!(
            npt.table_count(),
            4,
            "the emptied PT is freed, its PD is not"
        );
        npt.unmap(&mut mem, 4 * MIB).unwrap().1.flushed();
        assert_eq!(npt.table_count(), 1);
        assert_eq!(mem.live(), 1);
        npt.teardown(&mut mem).flushed();
    }

    fn map_errors_change_nothing<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        npt.map(&mut mem, 0x3000, 0x10_0000, Perm::RX).unwrap();
        let live = mem.live();
        let no_read = [
            Perm {
                read: false,
                write: true,
                exec: false,
            },
            Perm {
                read: false,
                write: false,
                exec: true,
            },
            Perm {
                read: false,
                write: false,
                exec: false,
            },
        ];
        let cases = [
            (
                0x1234,
                0x20_0000,
                Perm::RWX,
                PagingError::Unaligned { addr: 0x1234 },
            ),
            (
                0x4000,
                0x20_0800,
                Perm::RWX,
                PagingError::Unaligned { addr: 0x20_0800 },
            ),
            (
                MAX_GPA,
                0x20_0000,
                Perm::RWX,
                PagingError::OutOfRange { gpa: MAX_GPA },
            ),
            (
                0xffff_ffff_ffff_f000,
                0x20_0000,
                Perm::RWX,
                PagingError::OutOfRange {
                    gpa: 0xffff_ffff_ffff_f000,
                },
            ),
            (
                0x4000,
                MAX_HPA,
                Perm::RWX,
                PagingError::HpaOutOfRange { hpa: MAX_HPA },
            ),
            (
                0x3000,
                0x20_0000,
                Perm::RWX,
                PagingError::AlreadyMapped { gpa: 0x3000 },
            ),
            (
                0x4000,
                0x20_0000,
                no_read[0],
                PagingError::InvalidPermissions(no_read[0]),
            ),
            (
                0x4000,
                0x20_0000,
                no_read[1],
                PagingError::InvalidPermissions(no_read[1]),
            ),
            (
                0x4000,
                0x20_0000,
                no_read[2],
                PagingError::InvalidPermissions(no_read[2]),
            ),
        ];
        for (gpa, hpa, perm, err) in cases {
            assert_eq!(npt.map(&mut mem, gpa, hpa, perm), Err(err));
        }
        assert_eq!(mem.live(), live);
        assert_eq!(npt.leaf_count(), 1);
        assert_eq!(npt.translate(&mem, 0x3000), Some((0x10_0000, Perm::RX)));
        npt.teardown(&mut mem).flushed();
        assert_eq!(mem.live(), 0);
    }

    fn unmap_errors<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        npt.map(&mut mem, 0x3000, 0x10_0000, Perm::RWX).unwrap();
        // Not mapped inside an existing leaf table, and where no table exists at all.
        for gpa in [0x4000, 5 * GIB] {
            assert_eq!(
                npt.unmap(&mut mem, gpa),
                Err(PagingError::NotMapped { gpa })
            );
        }
        assert_eq!(
            npt.unmap(&mut mem, 0x3008),
            Err(PagingError::Unaligned { addr: 0x3008 })
        );
        assert_eq!(
            npt.unmap(&mut mem, MAX_GPA),
            Err(PagingError::OutOfRange { gpa: MAX_GPA })
        );
        assert_eq!(npt.leaf_count(), 1);
        npt.teardown(&mut mem).flushed();
    }

    fn out_of_table_memory_rolls_back<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        mem.limit = 0;
        assert!(matches!(
            NestedPageTable::<F>::new(&mut mem),
            Err(PagingError::OutOfTableMemory)
        ));
        // Root and PDPT fit; the PD does not: the PDPT created for this call is freed again.
        mem.limit = 2;
        let mut npt = new_table::<F>(&mut mem);
        assert_eq!(
            npt.map(&mut mem, 0x1000, 0x10_0000, Perm::RWX),
            Err(PagingError::OutOfTableMemory)
        );
        assert_eq!(mem.live(), 1);
        assert_eq!(npt.table_count(), 1);
        assert_eq!(npt.translate(&mem, 0x1000), None);
        // Once memory is available the same call works.
        mem.limit = usize::MAX;
        npt.map(&mut mem, 0x1000, 0x10_0000, Perm::RWX).unwrap();
        assert_eq!(mem.live(), 4);
        npt.teardown(&mut mem).flushed();
        assert_eq!(mem.live(), 0);
        assert_eq!(mem.allocated, mem.freed);
    }

    fn bad_table_frame_is_refused<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        mem.bad_frame = Some(0x1234);
        assert!(matches!(
            NestedPageTable::<F>::new(&mut mem),
            Err(PagingError::BadTableFrame { hpa: 0x1234 })
        ));
        let mut npt = new_table::<F>(&mut mem);
        mem.bad_frame = Some(MAX_HPA);
        assert_eq!(
            npt.map(&mut mem, 0, 0x10_0000, Perm::RWX),
            Err(PagingError::BadTableFrame { hpa: MAX_HPA })
        );
        assert_eq!(
            mem.bad_returned, 2,
            "unusable frames go back to the allocator"
        );
        assert_eq!(mem.live(), 1);
        npt.teardown(&mut mem).flushed();
    }

    fn map_range_maps_contiguous_frames<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        // 1000 pages starting 4 pages below a 2 MiB boundary: spans three leaf tables.
        let start = 2 * MIB - 4 * PAGE_SIZE;
        let end = start + 1000 * PAGE_SIZE;
        npt.map_range(&mut mem, start..end, 0x80_0000, Perm::RW)
            .unwrap();
        assert_eq!(npt.leaf_count(), 1000);
        assert_eq!(npt.table_count(), 3 + 3);
        for i in 0..1000 {
            let gpa = start + i * PAGE_SIZE;
            assert_eq!(
                npt.translate(&mem, gpa),
                Some((0x80_0000 + i * PAGE_SIZE, Perm::RW))
            );
        }
        assert_eq!(npt.translate(&mem, start - PAGE_SIZE), None);
        assert_eq!(npt.translate(&mem, end), None);
        // An empty range maps nothing.
        npt.map_range(&mut mem, end..end, 0, Perm::RW).unwrap();
        assert_eq!(npt.leaf_count(), 1000);
        npt.teardown(&mut mem).flushed();
        assert_eq!(mem.live(), 0);
    }

    fn map_range_is_all_or_nothing<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        // A page in the middle of the range is taken, in a leaf table of its own.
        npt.map(&mut mem, 3 * MIB, 0x10_0000, Perm::RX).unwrap();
        let tables = npt.table_count();
        assert_eq!(
            npt.map_range(&mut mem, MIB..5 * MIB, 0x100_0000, Perm::RWX),
            Err(PagingError::AlreadyMapped { gpa: 3 * MIB })
        );
        assert_eq!(npt.leaf_count(), 1);
        assert_eq!(
            npt.table_count(),
            tables,
            "tables created for the range are freed"
        );
        assert_eq!(mem.live(), tables);
        assert_eq!(npt.translate(&mem, MIB), None);
        assert_eq!(npt.translate(&mem, 3 * MIB), Some((0x10_0000, Perm::RX)));

        // Running out of table memory half-way is undone the same way.
        // 4..8 MiB needs two new leaf tables; only one fits.
        mem.limit = mem.live() + 1;
        assert_eq!(
            npt.map_range(&mut mem, 4 * MIB..8 * MIB, 0x100_0000, Perm::RWX),
            Err(PagingError::OutOfTableMemory)
        );
        assert_eq!(npt.translate(&mem, 4 * MIB), None);
        assert_eq!(npt.leaf_count(), 1);
        assert_eq!(mem.live(), tables);
        npt.teardown(&mut mem).flushed();
        assert_eq!(mem.live(), 0);
    }

    fn map_range_errors<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        let cases = [
            (0x1000..0x2800, 0, PagingError::Unaligned { addr: 0x2800 }),
            (0x10..0x2000, 0, PagingError::Unaligned { addr: 0x10 }),
            #[allow(clippy::reversed_empty_ranges)] // the error under test
            (
                0x3000..0x1000,
                0,
                PagingError::InvalidRange {
                    start: 0x3000,
                    end: 0x1000,
                },
            ),
            (
                MAX_GPA - PAGE_SIZE..MAX_GPA + PAGE_SIZE,
                0,
                PagingError::OutOfRange {
                    gpa: MAX_GPA + PAGE_SIZE,
                },
            ),
            (
                0..2 * PAGE_SIZE,
                MAX_HPA - PAGE_SIZE,
                PagingError::HpaOutOfRange {
                    hpa: MAX_HPA - PAGE_SIZE,
                },
            ),
            (0..PAGE_SIZE, 0x800, PagingError::Unaligned { addr: 0x800 }),
        ];
        for (range, hpa, err) in cases {
            assert_eq!(npt.map_range(&mut mem, range, hpa, Perm::RWX), Err(err));
        }
        assert_eq!(npt.leaf_count(), 0);
        assert_eq!(mem.live(), 1);
        npt.teardown(&mut mem).flushed();
    }

    /// The migration scenario: a 64 MiB guest writes a known set of pages; harvest returns
    /// exactly that set, leaves every D bit clear, and the next harvest returns only the pages
    /// written after the first.
    fn harvest_returns_exactly_the_written_pages<F: EntryFormat>() {
        const PAGES: u64 = 16384;
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        for page in 0..PAGES {
            npt.map(&mut mem, page * PAGE_SIZE, frame_of(page), Perm::RWX)
                .unwrap();
        }
        let mut bitmap = DirtyBitmap::new(PAGES).unwrap();

        let mut written = scattered_pages(1, 700, PAGES);
        written.extend([0, 511, 512, PAGES - 1]); // table edges
        for &page in &written {
            let hpa = guest_write(&npt, &mut mem, page * PAGE_SIZE + 8).unwrap();
            assert_eq!(hpa, frame_of(page) + 8);
        }
        // Reads and fetches set A only: they are not dirty.
        for page in scattered_pages(2, 300, PAGES) {
            cpu_access::<F>(&mut mem, npt.root_hpa(), page * PAGE_SIZE, Access::Read).unwrap();
            cpu_access::<F>(&mut mem, npt.root_hpa(), page * PAGE_SIZE, Access::Fetch).unwrap();
        }

        let flush = npt
            .harvest_dirty(&mut mem, 0..PAGES * PAGE_SIZE, &mut bitmap)
            .unwrap();
        assert_eq!(flush.flushed(), written.len());
        assert_eq!(bitmap_pages(&bitmap), written);
        for page in 0..PAGES {
            let (pt, index, entry) = npt.find_leaf(&mem, page * PAGE_SIZE).unwrap();
            assert!(!F::dirty(entry), "page {page} still dirty");
            assert_eq!(mem.read_entry(pt, index), entry);
        }
        // A stays: harvest clears D only.
        let (_, _, leaf0) = npt.find_leaf(&mem, 0).unwrap();
        assert!(F::accessed(leaf0));

        // Second round: only pages written since, even ones written in round one again.
        bitmap.clear_all();
        let mut second = scattered_pages(3, 200, PAGES);
        second.extend(written.iter().take(20));
        for &page in &second {
            guest_write(&npt, &mut mem, page * PAGE_SIZE).unwrap();
        }
        let flush = npt
            .harvest_dirty(&mut mem, 0..PAGES * PAGE_SIZE, &mut bitmap)
            .unwrap();
        assert_eq!(flush.flushed(), second.len());
        assert_eq!(bitmap_pages(&bitmap), second);

        // Nothing written: nothing found, and no flush is owed.
        bitmap.clear_all();
        let flush = npt
            .harvest_dirty(&mut mem, 0..PAGES * PAGE_SIZE, &mut bitmap)
            .unwrap();
        assert!(!flush.is_required());
        flush.flushed();
        assert!(bitmap.is_empty());
        npt.teardown(&mut mem).flushed();
        assert_eq!(mem.live(), 0);
    }

    /// One read per entry of each table on the way, no walk per page: for 64 MiB that is
    /// 1 (PML4) + 1 (PDPT) + 32 (PD) + 32 * 512 (PTs).
    fn harvest_walks_each_table_once<F: EntryFormat>() {
        const PAGES: u64 = 16384;
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        npt.map_range(&mut mem, 0..PAGES * PAGE_SIZE, 0x1000_0000, Perm::RWX)
            .unwrap();
        let mut bitmap = DirtyBitmap::new(PAGES).unwrap();
        mem.take_reads();
        npt.harvest_dirty(&mut mem, 0..PAGES * PAGE_SIZE, &mut bitmap)
            .unwrap()
            .flushed();
        assert_eq!(mem.take_reads(), 1 + 1 + 32 + 32 * 512);

        // Sparse guest space: subtrees behind non-present entries cost nothing.
        let mut sparse = new_table::<F>(&mut mem);
        let gpas = [0, GIB, 300 * GIB + 5 * PAGE_SIZE];
        for (i, gpa) in gpas.into_iter().enumerate() {
            sparse
                .map(&mut mem, gpa, 0x10_0000 * (i as u64 + 1), Perm::RWX)
                .unwrap();
            guest_write(&sparse, &mut mem, gpa).unwrap();
        }
        let range = 0..512 * GIB;
        let mut big = DirtyBitmap::new(range.end / PAGE_SIZE).unwrap();
        mem.take_reads();
        let found = sparse
            .harvest_dirty(&mut mem, range, &mut big)
            .unwrap()
            .flushed();
        assert_eq!(found, 3);
        assert_eq!(
            big.iter().collect::<Vec<_>>(),
            gpas.map(|gpa| gpa / PAGE_SIZE)
        );
        // PML4: 1 entry; PDPT: 512; three PDs: 512 each; three PTs: 512 each.
        assert_eq!(mem.take_reads(), 1 + 512 + 3 * 512 + 3 * 512);
        npt.teardown(&mut mem).flushed();
        sparse.teardown(&mut mem).flushed();
        assert_eq!(mem.live(), 0);
    }

    fn harvest_respects_the_range<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        npt.map_range(&mut mem, 0..1024 * PAGE_SIZE, 0x1000_0000, Perm::RWX)
            .unwrap();
        for page in [0, 100, 511, 512, 700, 1023] {
            guest_write(&npt, &mut mem, page * PAGE_SIZE).unwrap();
        }
        let mut bitmap = DirtyBitmap::new(1024).unwrap();
        // Pages [100, 512): only 100 and 511; the others keep their D bits.
        let found = npt
            .harvest_dirty(&mut mem, 100 * PAGE_SIZE..512 * PAGE_SIZE, &mut bitmap)
            .unwrap()
            .flushed();
        assert_eq!(found, 2);
        assert_eq!(bitmap.iter().collect::<Vec<_>>(), [100, 511]);
        bitmap.clear_all();
        let found = npt
            .harvest_dirty(&mut mem, 0..1024 * PAGE_SIZE, &mut bitmap)
            .unwrap()
            .flushed();
        assert_eq!(found, 4);
        assert_eq!(bitmap.iter().collect::<Vec<_>>(), [0, 512, 700, 1023]);
        npt.teardown(&mut mem).flushed();
    }

    fn harvest_errors_lose_nothing<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        npt.map_range(&mut mem, 0..64 * PAGE_SIZE, 0x1000_0000, Perm::RWX)
            .unwrap();
        guest_write(&npt, &mut mem, 63 * PAGE_SIZE).unwrap();
        let mut small = DirtyBitmap::new(32).unwrap();
        assert_eq!(
            npt.harvest_dirty(&mut mem, 0..64 * PAGE_SIZE, &mut small),
            Err(PagingError::BitmapTooSmall {
                needed: 64,
                pages: 32
            })
        );
        assert_eq!(
            npt.harvest_dirty(&mut mem, 0..0x1800, &mut small),
            Err(PagingError::Unaligned { addr: 0x1800 })
        );
        let (_, _, leaf) = npt.find_leaf(&mem, 63 * PAGE_SIZE).unwrap();
        assert!(F::dirty(leaf), "a refused harvest clears nothing");
        let mut bitmap = DirtyBitmap::new(64).unwrap();
        let found = npt
            .harvest_dirty(&mut mem, 0..64 * PAGE_SIZE, &mut bitmap)
            .unwrap()
            .flushed();
        assert_eq!(found, 1);
        npt.teardown(&mut mem).flushed();
    }

    /// The fallback for CPUs without A/D: protect, fault, record, restore.
    fn write_protect_then_restore<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        npt.map_range(&mut mem, 0..8 * PAGE_SIZE, 0x1000_0000, Perm::RWX)
            .unwrap();
        npt.map(&mut mem, 8 * PAGE_SIZE, 0x2000_0000, Perm::RX)
            .unwrap(); // ROM
        let flush = npt
            .write_protect_range(&mut mem, 0..16 * PAGE_SIZE)
            .unwrap();
        assert_eq!(flush.flushed(), 8, "the read-only page needs no protection");
        for page in 0..8 {
            let (hpa, perm) = npt.translate(&mem, page * PAGE_SIZE).unwrap();
            assert_eq!((hpa, perm), (0x1000_0000 + page * PAGE_SIZE, Perm::RX));
        }

        // The guest writes pages 1 and 6: each write exits once, the backend records the page
        // and restores write access, and the retried write succeeds.
        let mut log = DirtyBitmap::new(16).unwrap();
        for page in [1u64, 6, 6, 1] {
            let gpa = page * PAGE_SIZE + 0x10;
            match guest_write(&npt, &mut mem, gpa) {
                Err(Fault::Protection) => {
                    log.set(page).unwrap();
                    npt.restore_write(&mut mem, gpa).unwrap();
                    guest_write(&npt, &mut mem, gpa).unwrap();
                }
                other => assert!(other.is_ok(), "{other:?}"),
            }
        }
        assert_eq!(log.iter().collect::<Vec<_>>(), [1, 6]);
        assert_eq!(npt.translate(&mem, PAGE_SIZE).unwrap().1, Perm::RWX);
        // Restoring twice is harmless (a spurious second fault).
        npt.restore_write(&mut mem, PAGE_SIZE).unwrap();

        // A write to ROM or outside RAM is not a dirty page.
        assert_eq!(
            guest_write(&npt, &mut mem, 8 * PAGE_SIZE),
            Err(Fault::Protection)
        );
        assert_eq!(
            npt.restore_write(&mut mem, 8 * PAGE_SIZE + 4),
            Err(PagingError::NotWritable { gpa: 8 * PAGE_SIZE })
        );
        assert_eq!(
            npt.restore_write(&mut mem, 9 * PAGE_SIZE),
            Err(PagingError::NotMapped { gpa: 9 * PAGE_SIZE })
        );
        assert_eq!(
            npt.restore_write(&mut mem, MAX_GPA),
            Err(PagingError::OutOfRange { gpa: MAX_GPA })
        );
        assert_eq!(npt.translate(&mem, 8 * PAGE_SIZE).unwrap().1, Perm::RX);

        // Next round: only the two restored pages need protecting again.
        let flush = npt
            .write_protect_range(&mut mem, 0..16 * PAGE_SIZE)
            .unwrap();
        assert_eq!(flush.flushed(), 2);
        let flush = npt
            .write_protect_range(&mut mem, 0..16 * PAGE_SIZE)
            .unwrap();
        assert!(!flush.is_required());
        flush.flushed();
        npt.teardown(&mut mem).flushed();
    }

    /// Why the flush is mandatory: with a translation cached before the harvest, a write
    /// after the harvest does not set D again and the page is missed, unless the TLB was
    /// flushed in between.
    fn harvest_without_flush_misses_writes<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        npt.map_range(&mut mem, 0..4 * PAGE_SIZE, 0x1000_0000, Perm::RWX)
            .unwrap();
        let root = npt.root_hpa();
        let mut tlb = Tlb::default();
        let mut bitmap = DirtyBitmap::new(4).unwrap();

        tlb.write::<F>(&mut mem, root, PAGE_SIZE).unwrap();
        let flush = npt
            .harvest_dirty(&mut mem, 0..4 * PAGE_SIZE, &mut bitmap)
            .unwrap();
        assert_eq!(flush.changed(), 1);
        // Deliberately not flushing: the next write goes through the cached translation.
        tlb.write::<F>(&mut mem, root, PAGE_SIZE).unwrap();
        bitmap.clear_all();
        let missed = npt
            .harvest_dirty(&mut mem, 0..4 * PAGE_SIZE, &mut bitmap)
            .unwrap()
            .flushed();
        assert_eq!(
            missed, 0,
            "the write was lost: this is the bug the flush prevents"
        );

        // Done right: flush after the harvest, and the write is seen.
        tlb.flush();
        flush.flushed();
        let flush = npt
            .harvest_dirty(&mut mem, 0..4 * PAGE_SIZE, &mut bitmap)
            .unwrap();
        tlb.flush();
        flush.flushed();
        tlb.write::<F>(&mut mem, root, PAGE_SIZE).unwrap();
        let found = npt
            .harvest_dirty(&mut mem, 0..4 * PAGE_SIZE, &mut bitmap)
            .unwrap()
            .flushed();
        assert_eq!(found, 1);
        assert_eq!(bitmap.iter().collect::<Vec<_>>(), [1]);

        // The same holds for write protection: without the flush the write gets through.
        let flush = npt.write_protect_range(&mut mem, 0..4 * PAGE_SIZE).unwrap();
        tlb.write::<F>(&mut mem, root, PAGE_SIZE).unwrap();
        tlb.flush();
        flush.flushed();
        assert_eq!(
            tlb.write::<F>(&mut mem, root, PAGE_SIZE),
            Err(Fault::Protection)
        );
        npt.teardown(&mut mem).flushed();
    }

    fn teardown_frees_every_table<F: EntryFormat>() {
        let mut mem = FakeMemory::new();
        let mut npt = new_table::<F>(&mut mem);
        // Guest RAM in several PML4 slots and PDPT slots, then some unmapped again.
        npt.map_range(&mut mem, 0..8 * MIB, 0x1000_0000, Perm::RWX)
            .unwrap();
        npt.map_range(
            &mut mem,
            3 * GIB..3 * GIB + 64 * PAGE_SIZE,
            0x2000_0000,
            Perm::RW,
        )
        .unwrap();
        for page in scattered_pages(4, 50, 1 << 24) {
            let gpa = 1024 * GIB + page * PAGE_SIZE;
            npt.map(&mut mem, gpa, 0x3000_0000, Perm::R).unwrap();
        }
        for page in 0..100 {
            npt.unmap(&mut mem, page * PAGE_SIZE).unwrap().1.flushed();
        }
        let tables = npt.table_count();
        assert_eq!(tables, mem.live());
        assert!(tables > 50);
        let flush = npt.teardown(&mut mem);
        assert!(flush.is_required());
        flush.flushed();
        assert_eq!(mem.live(), 0, "every table frame was freed");
        assert_eq!(mem.allocated, mem.freed);
        // Guest frames were never handed to free_table: the fake would have panicked.
    }

    macro_rules! for_both_formats {
        ($($name:ident),* $(,)?) => {
            mod npt {
                $(#[test] fn $name() { super::$name::<super::NptFormat>() })*
            }
            mod ept {
                $(#[test] fn $name() { super::$name::<super::EptFormat>() })*
            }
        };
    }

    for_both_formats!(
        map_translate_unmap_round_trip,
        unmap_keeps_tables_still_in_use,
        map_errors_change_nothing,
        unmap_errors,
        out_of_table_memory_rolls_back,
        bad_table_frame_is_refused,
        map_range_maps_contiguous_frames,
        map_range_is_all_or_nothing,
        map_range_errors,
        harvest_returns_exactly_the_written_pages,
        harvest_walks_each_table_once,
        harvest_respects_the_range,
        harvest_errors_lose_nothing,
        write_protect_then_restore,
        harvest_without_flush_misses_writes,
        teardown_frees_every_table,
    );
}
