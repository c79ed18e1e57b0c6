//! Guest RAM as the hypervisor sees it, and a software walk of the guest's own page tables.
//!
//! [`GuestMemory`] is the one seam through which everything above the hardware reads and writes
//! guest-physical memory: the device models (DMA, virtio rings), the instruction decoder
//! ([`crate::decode`]) and, later, migration. The kernel implements it over its mapping of the
//! VM's RAM; host tests implement it over a map of fake pages. Nothing here holds a raw pointer
//! into the guest.
//!
//! [`translate`] turns a guest-linear address into a guest-physical one the way the guest's CPU
//! would, from the guest's CR0/CR3/CR4/EFER ([`PagingMode`]), following Intel SDM vol. 3A
//! chapter 4 "Paging" (AMD APM vol. 2 chapter 5 "Page Translation and Protection" describes the
//! same formats). All five paging modes of SDM vol. 3A 4.1.1 (table 4-1) are handled: paging
//! off, 32-bit, PAE, 4-level and 5-level.
//!
//! # Decisions
//!
//! - **No accessed or dirty bits are set.** The CPU sets A and D as part of a real access (SDM
//!   vol. 3A 4.8 "Accessed and Dirty Flags"). A walk here is the hypervisor peeking, e.g. at the
//!   instruction bytes behind a VM exit: the guest did not access anything new, and the CPU has
//!   already set the bits when it fetched the instruction. Writing them would also race with the
//!   guest's own use of the bits (an OS harvesting them) and dirty pages for migration for no
//!   reason. The walk therefore only reads: `mem` is `&impl GuestMemory`.
//! - **MAXPHYADDR is taken as 52**, the architectural maximum (SDM vol. 3A 4.1.4). The guest's
//!   real value lives in its CPUID, which [`PagingMode`] does not carry; so only the bits that are
//!   reserved whatever MAXPHYADDR is are checked (e.g. bit 21 of a 32-bit 4 MiB PDE, bits 20:13 of
//!   a 2 MiB PDE, NX when EFER.NXE = 0). An entry a stricter CPU would refuse may translate here:
//!   harmless for a peek, since the guest's CPU has already accepted it.
//! - **1 GiB pages and PSE-36 are assumed supported** (CPUID.80000001H:EDX.Page1GB\[26\],
//!   CPUID.01H:EDX.PSE-36\[17\]), as on every CPU this hypervisor targets.
//! - **Checked rights: present, writable, user, execute-disable.** CR0.WP is honoured for
//!   supervisor writes (SDM vol. 3A 4.6.1). SMEP, SMAP and protection keys are not checked: SMAP
//!   depends on RFLAGS.AC and protection keys on PKRU, neither of which is in [`PagingMode`], and
//!   SMEP would make a supervisor-mode peek at user code (the decoder does not know the CPL) fail
//!   although the guest's CPU legitimately fetched it in user mode.
//! - **PAE PDPTEs are read from memory at CR3** on every walk. An Intel CPU loads them into
//!   internal registers at MOV CR3 (SDM vol. 3A 4.4.1); a guest that edits its PDPT without
//!   reloading CR3 would see a difference, which no sane OS relies on. (With AMD nested paging the
//!   CPU also reads them from memory.)
//! - **Linear addresses are 32 bits outside long mode** (SDM vol. 3A 4.1): with paging off,
//!   32-bit or PAE paging, bits 63:32 of `gva` are dropped.
//! - **Errors are values, never panics**: any table content, any CR value, any address gives an
//!   `Ok` or a [`WalkError`].

#![forbid(unsafe_code)]

use core::fmt;

/// Guest-physical memory, as the hypervisor reaches it.
///
/// The seam through which device models, the instruction decoder and (later) migration see guest
/// RAM: they never hold pointers into it. An access is all or nothing: `false` means some byte of
/// the range lies outside guest RAM (an MMIO hole, beyond the end of RAM, or an address overflow)
/// and then nothing was read or written. Ranges may cross page boundaries.
pub trait GuestMemory {
    /// Copies `buf.len()` bytes starting at guest-physical `gpa` into `buf`. `false` if the range
    /// is not entirely guest RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;

    /// Copies `bytes` to guest-physical `gpa`. `false` if the range is not entirely guest RAM.
    fn write(&mut self, gpa: u64, bytes: &[u8]) -> bool;
}

/// The guest control registers that decide how its linear addresses translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingMode {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Which of the five paging modes of SDM vol. 3A 4.1.1 (table 4-1) a [`PagingMode`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingKind {
    /// CR0.PG = 0: linear addresses are physical addresses.
    Off,
    /// CR0.PG = 1, CR4.PAE = 0 (SDM vol. 3A 4.3).
    Bits32,
    /// CR0.PG = 1, CR4.PAE = 1, EFER.LME = 0 (SDM vol. 3A 4.4).
    Pae,
    /// CR0.PG = 1, CR4.PAE = 1, EFER.LME = 1, CR4.LA57 = 0 (SDM vol. 3A 4.5).
    FourLevel,
    /// CR0.PG = 1, CR4.PAE = 1, EFER.LME = 1, CR4.LA57 = 1 (SDM vol. 3A 4.5).
    FiveLevel,
}

impl PagingMode {
    /// CR0.WP (bit 16): supervisor writes honour read-only pages (SDM vol. 3A 2.5).
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0.PG (bit 31): paging enabled.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PSE (bit 4): 4 MiB pages in 32-bit paging.
    pub const CR4_PSE: u64 = 1 << 4;
    /// CR4.PAE (bit 5): 64-bit entries (PAE, 4- and 5-level paging).
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4.LA57 (bit 12): 5-level paging in long mode.
    pub const CR4_LA57: u64 = 1 << 12;
    /// EFER.LME (bit 8): long mode enable (SDM vol. 3A 2.2.1, APM vol. 2 3.1.7).
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.NXE (bit 11): execute-disable bit 63 of entries is honoured.
    pub const EFER_NXE: u64 = 1 << 11;

    /// The paging mode these registers select (SDM vol. 3A table 4-1). Long mode is decided by
    /// EFER.LME together with CR0.PG and CR4.PAE, as the table does (EFER.LMA is their result).
    pub fn kind(&self) -> PagingKind {
        if self.cr0 & Self::CR0_PG == 0 {
            PagingKind::Off
        } else if self.cr4 & Self::CR4_PAE == 0 {
            PagingKind::Bits32
        } else if self.efer & Self::EFER_LME == 0 {
            PagingKind::Pae
        } else if self.cr4 & Self::CR4_LA57 == 0 {
            PagingKind::FourLevel
        } else {
            PagingKind::FiveLevel
        }
    }

    fn nxe(&self) -> bool {
        self.efer & Self::EFER_NXE != 0
    }
}

/// The kind of access a translation is for (SDM vol. 3A 4.6 "Access Rights").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// A data write (otherwise a read or a fetch).
    pub write: bool,
    /// A user-mode access (CPL 3); otherwise supervisor-mode.
    pub user: bool,
    /// An instruction fetch.
    pub fetch: bool,
}

impl Access {
    /// A supervisor-mode data read: what the hypervisor uses to peek at guest data.
    pub const READ: Access = Access {
        write: false,
        user: false,
        fetch: false,
    };
    /// A supervisor-mode instruction fetch: what the decoder uses (checks present and NX).
    pub const FETCH: Access = Access {
        write: false,
        user: false,
        fetch: true,
    };
}

/// Why a guest-linear address does not translate. The guest's CPU would raise #PF for
/// `NotPresent`, `Protection` and `ReservedBits`, and #GP for `NonCanonical`; `OutOfRam` is the
/// guest pointing its tables outside its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at `level` (5 = PML5E, 4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE) has P = 0.
    NotPresent { level: u8, gva: u64 },
    /// The translation exists but does not allow `access` (user, write or NX).
    Protection { gva: u64 },
    /// In 4-level (5-level) paging, bits 63:47 (63:56) of the address are not all equal
    /// (SDM vol. 3A 3.3.7.1 "Canonical Addressing").
    NonCanonical,
    /// The entry at `level` (numbered as in `NotPresent`) has a reserved bit set
    /// (SDM vol. 3A 4.7, PFEC.RSVD).
    ReservedBits { level: u8 },
    /// A paging-structure entry at guest-physical `gpa` is not in guest RAM.
    OutOfRam { gpa: u64 },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NotPresent { level, gva } => {
                write!(f, "{gva:#x}: level-{level} entry not present")
            }
            WalkError::Protection { gva } => write!(f, "{gva:#x}: access not allowed"),
            WalkError::NonCanonical => write!(f, "non-canonical address"),
            WalkError::ReservedBits { level } => {
                write!(f, "reserved bit set in a level-{level} entry")
            }
            WalkError::OutOfRam { gpa } => {
                write!(f, "guest-physical {gpa:#x} is outside guest RAM")
            }
        }
    }
}

// Entry bits common to all formats (SDM vol. 3A tables 4-4 to 4-11 and 4-15 to 4-20).
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
/// PS: in a PDE (or PDPTE in long mode) the entry maps a page.
const PS: u64 = 1 << 7;
/// XD / NX (bit 63), honoured when EFER.NXE = 1, reserved otherwise (PAE and long mode).
const XD: u64 = 1 << 63;
/// Bits 51:12 of a 64-bit entry: the physical address of the next table or 4 KiB page.
const ADDR_4K: u64 = 0x000f_ffff_ffff_f000;
/// Bits 51:21: the physical address of a 2 MiB page.
const ADDR_2M: u64 = 0x000f_ffff_ffe0_0000;
/// Bits 51:30: the physical address of a 1 GiB page.
const ADDR_1G: u64 = 0x000f_ffff_c000_0000;
/// Bits 20:13 of a 2 MiB PDE: reserved (bit 12 is PAT).
const RSVD_2M: u64 = 0x001f_e000;
/// Bits 29:13 of a 1 GiB PDPTE: reserved (bit 12 is PAT).
const RSVD_1G: u64 = 0x3fff_e000;
/// PAE PDPTE reserved bits: 2:1, 8:5 and 63:52 (SDM vol. 3A table 4-8).
const RSVD_PAE_PDPTE: u64 = 0xfff0_0000_0000_01e6;
/// PAE PDE/PTE reserved bits 62:52 (SDM vol. 3A tables 4-9 to 4-11, M = 52 assumed); bit 63 is
/// XD, reserved only when EFER.NXE = 0.
const RSVD_PAE_HIGH: u64 = 0x7ff0_0000_0000_0000;

/// The rights accumulated down a walk: a page is writable (user-accessible) only if every entry
/// on the way allows it, and non-executable if any entry says so (SDM vol. 3A 4.6.1).
struct Rights {
    writable: bool,
    user: bool,
    no_exec: bool,
}

impl Rights {
    fn new() -> Self {
        Rights {
            writable: true,
            user: true,
            no_exec: false,
        }
    }

    /// Folds in an entry that controls access rights. `nxe`: bit 63 is XD.
    fn add(&mut self, entry: u64, nxe: bool) {
        self.writable &= entry & RW != 0;
        self.user &= entry & US != 0;
        self.no_exec |= nxe && entry & XD != 0;
    }

    /// The access-rights rules of SDM vol. 3A 4.6.1 (APM vol. 2 5.6), without SMEP/SMAP/PKE.
    fn check(&self, mode: &PagingMode, access: Access, gva: u64) -> Result<(), WalkError> {
        let denied = (access.user && !self.user)
            || (access.write
                && !self.writable
                && (access.user || mode.cr0 & PagingMode::CR0_WP != 0))
            || (access.fetch && self.no_exec);
        if denied {
            Err(WalkError::Protection { gva })
        } else {
            Ok(())
        }
    }
}

fn read_u32(mem: &impl GuestMemory, gpa: u64) -> Result<u64, WalkError> {
    let mut b = [0u8; 4];
    if mem.read(gpa, &mut b) {
        Ok(u64::from(u32::from_le_bytes(b)))
    } else {
        Err(WalkError::OutOfRam { gpa })
    }
}

fn read_u64(mem: &impl GuestMemory, gpa: u64) -> Result<u64, WalkError> {
    let mut b = [0u8; 8];
    if mem.read(gpa, &mut b) {
        Ok(u64::from_le_bytes(b))
    } else {
        Err(WalkError::OutOfRam { gpa })
    }
}

/// Translates guest-linear `gva` to a guest-physical address for `access`, walking the guest's
/// page tables in software (SDM vol. 3A chapter 4). Reads paging structures through `mem` and
/// never writes: no accessed or dirty bit is set (see the module documentation).
pub fn translate(
    mem: &impl GuestMemory,
    mode: &PagingMode,
    gva: u64,
    access: Access,
) -> Result<u64, WalkError> {
    match mode.kind() {
        // SDM vol. 3A 4.1.1: with CR0.PG = 0 "linear addresses are treated as physical".
        PagingKind::Off => Ok(gva & 0xffff_ffff),
        PagingKind::Bits32 => walk_32bit(mem, mode, gva & 0xffff_ffff, access),
        PagingKind::Pae => walk_pae(mem, mode, gva & 0xffff_ffff, access),
        PagingKind::FourLevel => walk_long(mem, mode, gva, access, 4),
        PagingKind::FiveLevel => walk_long(mem, mode, gva, access, 5),
    }
}

/// 32-bit paging (SDM vol. 3A 4.3): CR3 bits 31:12 locate a page directory of 1024 4-byte PDEs;
/// a PDE maps a 4 MiB page (PS = 1 and CR4.PSE = 1) or locates a page table of 1024 PTEs.
fn walk_32bit(
    mem: &impl GuestMemory,
    mode: &PagingMode,
    gva: u64,
    access: Access,
) -> Result<u64, WalkError> {
    let mut rights = Rights::new();
    let pde_addr = (mode.cr3 & 0xffff_f000) | ((gva >> 22) & 0x3ff) << 2;
    let pde = read_u32(mem, pde_addr)?;
    if pde & P == 0 {
        return Err(WalkError::NotPresent { level: 2, gva });
    }
    // Without CR4.PSE the PS bit is ignored (SDM vol. 3A table 4-5).
    if pde & PS != 0 && mode.cr4 & PagingMode::CR4_PSE != 0 {
        // Table 4-4: bits 31:22 are address bits 31:22, bits 20:13 address bits 39:32 (PSE-36,
        // at most 40 address bits), bit 21 is reserved.
        if pde & (1 << 21) != 0 {
            return Err(WalkError::ReservedBits { level: 2 });
        }
        rights.add(pde, false);
        rights.check(mode, access, gva)?;
        let base = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
        return Ok(base | (gva & 0x003f_ffff));
    }
    rights.add(pde, false);
    let pte_addr = (pde & 0xffff_f000) | ((gva >> 12) & 0x3ff) << 2;
    let pte = read_u32(mem, pte_addr)?;
    if pte & P == 0 {
        return Err(WalkError::NotPresent { level: 1, gva });
    }
    rights.add(pte, false);
    rights.check(mode, access, gva)?;
    Ok((pte & 0xffff_f000) | (gva & 0xfff))
}

/// PAE paging (SDM vol. 3A 4.4): CR3 bits 31:5 locate four PDPTEs; each locates a page
/// directory of 512 8-byte PDEs, which map 2 MiB pages or locate page tables of 512 PTEs.
/// PDPTEs carry no access rights (table 4-8).
fn walk_pae(
    mem: &impl GuestMemory,
    mode: &PagingMode,
    gva: u64,
    access: Access,
) -> Result<u64, WalkError> {
    let nxe = mode.nxe();
    let rsvd_high = if nxe {
        RSVD_PAE_HIGH
    } else {
        RSVD_PAE_HIGH | XD
    };
    let mut rights = Rights::new();

    let pdpte_addr = (mode.cr3 & 0xffff_ffe0) | ((gva >> 30) & 0x3) << 3;
    let pdpte = read_u64(mem, pdpte_addr)?;
    if pdpte & P == 0 {
        return Err(WalkError::NotPresent { level: 3, gva });
    }
    if pdpte & RSVD_PAE_PDPTE != 0 {
        return Err(WalkError::ReservedBits { level: 3 });
    }

    let pde_addr = (pdpte & ADDR_4K) | ((gva >> 21) & 0x1ff) << 3;
    let pde = read_u64(mem, pde_addr)?;
    if pde & P == 0 {
        return Err(WalkError::NotPresent { level: 2, gva });
    }
    if pde & PS != 0 {
        // 2 MiB page (table 4-9).
        if pde & (rsvd_high | RSVD_2M) != 0 {
            return Err(WalkError::ReservedBits { level: 2 });
        }
        rights.add(pde, nxe);
        rights.check(mode, access, gva)?;
        return Ok((pde & ADDR_2M) | (gva & 0x1f_ffff));
    }
    if pde & rsvd_high != 0 {
        return Err(WalkError::ReservedBits { level: 2 });
    }
    rights.add(pde, nxe);

    let pte_addr = (pde & ADDR_4K) | ((gva >> 12) & 0x1ff) << 3;
    let pte = read_u64(mem, pte_addr)?;
    if pte & P == 0 {
        return Err(WalkError::NotPresent { level: 1, gva });
    }
    if pte & rsvd_high != 0 {
        return Err(WalkError::ReservedBits { level: 1 });
    }
    rights.add(pte, nxe);
    rights.check(mode, access, gva)?;
    Ok((pte & ADDR_4K) | (gva & 0xfff))
}

/// 4-level and 5-level paging (SDM vol. 3A 4.5; APM vol. 2 5.3): CR3 bits 51:12 locate the
/// top table; each level indexes 9 bits of the address; a PDPTE may map a 1 GiB page and a PDE
/// a 2 MiB page. `levels` is 4 or 5.
fn walk_long(
    mem: &impl GuestMemory,
    mode: &PagingMode,
    gva: u64,
    access: Access,
    levels: u8,
) -> Result<u64, WalkError> {
    // Canonical: bits 63:(N-1) equal for N = 48 or 57 linear-address bits (SDM vol. 3A 4.5).
    let shift = if levels == 5 { 64 - 57 } else { 64 - 48 };
    if (((gva << shift) as i64) >> shift) as u64 != gva {
        return Err(WalkError::NonCanonical);
    }
    let nxe = mode.nxe();
    // Bits 51:M are reserved (none with M = 52); bit 63 unless EFER.NXE (tables 4-15 to 4-20).
    let rsvd_xd = if nxe { 0 } else { XD };
    let mut rights = Rights::new();
    let mut table = mode.cr3 & ADDR_4K;

    for level in (1..=levels).rev() {
        let index = (gva >> (12 + 9 * u32::from(level - 1))) & 0x1ff;
        let entry = read_u64(mem, table | index << 3)?;
        if entry & P == 0 {
            return Err(WalkError::NotPresent { level, gva });
        }
        let leaf = (level == 3 || level == 2) && entry & PS != 0;
        let rsvd = rsvd_xd
            | match (level, leaf) {
                // PML5E and PML4E: PS (bit 7) must be 0 (tables 4-14 and 4-15).
                (4 | 5, _) => PS,
                (3, true) => RSVD_1G,
                (2, true) => RSVD_2M,
                _ => 0,
            };
        if entry & rsvd != 0 {
            return Err(WalkError::ReservedBits { level });
        }
        rights.add(entry, nxe);
        if leaf || level == 1 {
            rights.check(mode, access, gva)?;
            let (addr, offset) = match level {
                3 => (ADDR_1G, 0x3fff_ffff),
                2 => (ADDR_2M, 0x1f_ffff),
                _ => (ADDR_4K, 0xfff),
            };
            return Ok((entry & addr) | (gva & offset));
        }
        table = entry & ADDR_4K;
    }
    // The loop always returns at level 1; kept total rather than `unreachable!`.
    Err(WalkError::NotPresent { level: 1, gva })
}

/// Fake guest memory for host tests: sparse 4 KiB pages; a page never written is not RAM.
#[cfg(test)]
pub(crate) mod fake {
    use super::GuestMemory;
    use std::collections::HashMap;
    use std::vec;
    use std::vec::Vec;

    #[derive(Default)]
    pub(crate) struct FakeMemory {
        pages: HashMap<u64, Vec<u8>>,
    }

    impl FakeMemory {
        pub(crate) fn new() -> Self {
            Self::default()
        }

        /// Makes the page holding `gpa` RAM (zero-filled) if it is not yet.
        pub(crate) fn add_page(&mut self, gpa: u64) {
            self.pages.entry(gpa >> 12).or_insert_with(|| vec![0; 4096]);
        }

        /// Writes bytes, making the pages RAM as needed.
        pub(crate) fn poke(&mut self, gpa: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                let a = gpa + i as u64;
                self.add_page(a);
                self.pages.get_mut(&(a >> 12)).unwrap()[(a & 0xfff) as usize] = *b;
            }
        }

        pub(crate) fn poke_u32(&mut self, gpa: u64, v: u32) {
            self.poke(gpa, &v.to_le_bytes());
        }

        pub(crate) fn poke_u64(&mut self, gpa: u64, v: u64) {
            self.poke(gpa, &v.to_le_bytes());
        }

        pub(crate) fn peek_u64(&self, gpa: u64) -> u64 {
            let mut b = [0; 8];
            assert!(self.read(gpa, &mut b));
            u64::from_le_bytes(b)
        }
    }

    impl GuestMemory for FakeMemory {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let in_ram = (0..buf.len() as u64).all(|i| {
                gpa.checked_add(i)
                    .is_some_and(|a| self.pages.contains_key(&(a >> 12)))
            });
            if !in_ram {
                return false;
            }
            for (i, b) in buf.iter_mut().enumerate() {
                let a = gpa + i as u64;
                *b = self.pages[&(a >> 12)][(a & 0xfff) as usize];
            }
            true
        }

        fn write(&mut self, gpa: u64, bytes: &[u8]) -> bool {
            let in_ram = (0..bytes.len() as u64).all(|i| {
                gpa.checked_add(i)
                    .is_some_and(|a| self.pages.contains_key(&(a >> 12)))
            });
            if in_ram {
                self.poke(gpa, bytes);
            }
            in_ram
        }
    }

    /// Builds 4- or 5-level tables in a [`FakeMemory`], allocating table frames from `next`.
    pub(crate) struct LongTables {
        pub(crate) mem: FakeMemory,
        pub(crate) root: u64,
        pub(crate) levels: u8,
        next: u64,
    }

    impl LongTables {
        pub(crate) fn new(levels: u8) -> Self {
            let mut mem = FakeMemory::new();
            let root = 0x1000;
            mem.add_page(root);
            LongTables {
                mem,
                root,
                levels,
                next: 0x2000,
            }
        }

        pub(crate) fn mode(&self, nxe: bool) -> super::PagingMode {
            use super::PagingMode as M;
            super::PagingMode {
                cr0: M::CR0_PG | M::CR0_WP | 1,
                cr3: self.root,
                cr4: M::CR4_PAE | if self.levels == 5 { M::CR4_LA57 } else { 0 },
                efer: M::EFER_LME | (1 << 10) | if nxe { M::EFER_NXE } else { 0 },
            }
        }

        /// Maps `gva` with a leaf at `leaf_level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB) to `phys` with
        /// `flags` on the leaf (P added); non-leaf entries get P|RW|US. Returns the guest-physical
        /// address of each entry on the path, top level first.
        pub(crate) fn map(&mut self, gva: u64, leaf_level: u8, phys: u64, flags: u64) -> Vec<u64> {
            let mut path = Vec::new();
            let mut table = self.root;
            for level in (leaf_level..=self.levels).rev() {
                let index = (gva >> (12 + 9 * u32::from(level - 1))) & 0x1ff;
                let at = table + index * 8;
                path.push(at);
                if level == leaf_level {
                    let ps = if leaf_level > 1 { 1 << 7 } else { 0 };
                    self.mem.poke_u64(at, phys | flags | ps | 1);
                } else {
                    let entry = self.mem.peek_u64(at);
                    if entry & 1 == 0 {
                        let frame = self.next;
                        self.next += 0x1000;
                        self.mem.add_page(frame);
                        self.mem.poke_u64(at, frame | 0b111);
                    }
                    table = self.mem.peek_u64(at) & 0x000f_ffff_ffff_f000;
                }
            }
            path
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeMemory, LongTables};
    use super::*;
    use std::vec::Vec;

    const RW_US: u64 = RW | US;
    const SUP_READ: Access = Access::READ;
    const SUP_WRITE: Access = Access {
        write: true,
        user: false,
        fetch: false,
    };
    const USER_READ: Access = Access {
        write: false,
        user: true,
        fetch: false,
    };
    const USER_WRITE: Access = Access {
        write: true,
        user: true,
        fetch: false,
    };
    const USER_FETCH: Access = Access {
        write: false,
        user: true,
        fetch: true,
    };

    #[test]
    fn fake_memory_is_all_or_nothing() {
        let mut m = FakeMemory::new();
        m.add_page(0x1000);
        let mut b = [0u8; 4];
        assert!(m.write(0x1ffe, &[1, 2]));
        assert!(!m.write(0x1ffe, &[1, 2, 3]));
        assert!(m.read(0x1ffe, &mut b[..2]));
        assert_eq!(&b[..2], &[1, 2]);
        assert!(!m.read(0x1ffe, &mut b));
        assert!(!m.read(u64::MAX, &mut b));
    }

    #[test]
    fn kind_follows_table_4_1() {
        let m = |cr0, cr4, efer| PagingMode {
            cr0,
            cr3: 0,
            cr4,
            efer,
        };
        let pg = PagingMode::CR0_PG;
        let pae = PagingMode::CR4_PAE;
        let lme = PagingMode::EFER_LME;
        let la57 = PagingMode::CR4_LA57;
        assert_eq!(m(0, pae, lme).kind(), PagingKind::Off);
        assert_eq!(m(pg, la57, lme).kind(), PagingKind::Bits32);
        assert_eq!(m(pg, pae | la57, 0).kind(), PagingKind::Pae);
        assert_eq!(m(pg, pae, lme).kind(), PagingKind::FourLevel);
        assert_eq!(m(pg, pae | la57, lme).kind(), PagingKind::FiveLevel);
    }

    #[test]
    fn paging_off_is_identity_on_32_bits() {
        let mem = FakeMemory::new();
        let mode = PagingMode::default();
        assert_eq!(translate(&mem, &mode, 0xb8000, SUP_WRITE), Ok(0xb8000));
        assert_eq!(
            translate(&mem, &mode, 0x1_2345_6789, USER_FETCH),
            Ok(0x2345_6789)
        );
    }

    // ---- 32-bit paging ----

    fn mode32(cr4: u64) -> PagingMode {
        PagingMode {
            cr0: PagingMode::CR0_PG | PagingMode::CR0_WP | 1,
            cr3: 0x1000,
            cr4,
            efer: 0,
        }
    }

    /// Page directory at 0x1000, page table at 0x2000 mapping 0x0040_3000 -> 0x7_7000.
    fn tables32() -> FakeMemory {
        let mut m = FakeMemory::new();
        m.add_page(0x1000);
        m.add_page(0x2000);
        m.poke_u32(0x1000 + 4, 0x2000 | 0b111); // PDE 1 (0x0040_0000..)
        m.poke_u32(0x2000 + 3 * 4, 0x7_7000 | 0b111); // PTE 3
        m
    }

    #[test]
    fn bits32_4k_page() {
        let m = tables32();
        let mode = mode32(0);
        assert_eq!(translate(&m, &mode, 0x0040_3abc, USER_WRITE), Ok(0x7_7abc));
        // Upper bits of the linear address are dropped outside long mode.
        assert_eq!(
            translate(&m, &mode, 0xdead_0000_0040_3abc, SUP_READ),
            Ok(0x7_7abc)
        );
    }

    #[test]
    fn bits32_4m_page_with_pse_and_pse36() {
        let mut m = tables32();
        // PDE 3 (0x00c0_0000..): 4 MiB page at physical 0x12_0440_0000 (address bits 39:32 =
        // 0x12 in PDE bits 20:13).
        m.poke_u32(
            0x1000 + 3 * 4,
            0x0440_0000 | (0x12 << 13) | PS as u32 | 0b011,
        );
        let mode = mode32(PagingMode::CR4_PSE);
        assert_eq!(
            translate(&m, &mode, 0x00c1_2345, SUP_WRITE),
            Ok(0x12_0441_2345)
        );
        // Without CR4.PSE, PS is ignored and the PDE points to a (missing) page table.
        assert_eq!(
            translate(&m, &mode32(0), 0x00c1_2345, SUP_READ),
            Err(WalkError::OutOfRam { gpa: 0x0442_4048 })
        );
        // Bit 21 is reserved in a 4 MiB PDE.
        m.poke_u32(0x1000 + 3 * 4, 0x0440_0000 | (1 << 21) | PS as u32 | 0b011);
        assert_eq!(
            translate(&m, &mode, 0x00c1_2345, SUP_READ),
            Err(WalkError::ReservedBits { level: 2 })
        );
    }

    #[test]
    fn bits32_not_present_and_rights() {
        let mut m = tables32();
        let mode = mode32(0);
        assert_eq!(
            translate(&m, &mode, 0x0080_0000, SUP_READ),
            Err(WalkError::NotPresent {
                level: 2,
                gva: 0x0080_0000
            })
        );
        assert_eq!(
            translate(&m, &mode, 0x0040_4000, SUP_READ),
            Err(WalkError::NotPresent {
                level: 1,
                gva: 0x0040_4000
            })
        );
        // Supervisor-only, read-only PTE.
        m.poke_u32(0x2000 + 3 * 4, 0x7_7000 | 0b001);
        let gva = 0x0040_3000;
        assert_eq!(translate(&m, &mode, gva, SUP_READ), Ok(0x7_7000));
        assert_eq!(
            translate(&m, &mode, gva, USER_READ),
            Err(WalkError::Protection { gva })
        );
        assert_eq!(
            translate(&m, &mode, gva, SUP_WRITE),
            Err(WalkError::Protection { gva })
        );
        // CR0.WP = 0: supervisor writes ignore R/W.
        let no_wp = PagingMode {
            cr0: PagingMode::CR0_PG,
            ..mode
        };
        assert_eq!(translate(&m, &no_wp, gva, SUP_WRITE), Ok(0x7_7000));
        // 32-bit paging has no execute-disable: fetches are allowed even with EFER.NXE.
        let nxe = PagingMode {
            efer: PagingMode::EFER_NXE,
            ..mode
        };
        assert_eq!(translate(&m, &nxe, gva, Access::FETCH), Ok(0x7_7000));
    }

    #[test]
    fn bits32_page_directory_outside_ram() {
        let m = FakeMemory::new();
        assert_eq!(
            translate(&m, &mode32(0), 0x0040_0000, SUP_READ),
            Err(WalkError::OutOfRam { gpa: 0x1004 })
        );
    }

    // ---- PAE paging ----

    fn mode_pae(nxe: bool) -> PagingMode {
        PagingMode {
            cr0: PagingMode::CR0_PG | PagingMode::CR0_WP | 1,
            cr3: 0x1020, // 32-byte-aligned PDPT inside the page at 0x1000
            cr4: PagingMode::CR4_PAE,
            efer: if nxe { PagingMode::EFER_NXE } else { 0 },
        }
    }

    /// PDPT at 0x1020; PDPTE 1 -> PD at 0x2000; PDE 2 -> PT at 0x3000; PTE 5 -> 0x1_2345_6000
    /// (above 4 GiB: PAE reaches 52-bit physical addresses); PDE 3 maps a 2 MiB page.
    fn tables_pae() -> FakeMemory {
        let mut m = FakeMemory::new();
        for p in [0x1000, 0x2000, 0x3000] {
            m.add_page(p);
        }
        m.poke_u64(0x1020 + 8, 0x2000 | P);
        m.poke_u64(0x2000 + 2 * 8, 0x3000 | P | RW_US);
        m.poke_u64(0x3000 + 5 * 8, 0x1_2345_6000 | P | RW_US);
        m.poke_u64(0x2000 + 3 * 8, 0x8_0060_0000 | PS | P | RW_US);
        m
    }

    const PAE_4K: u64 = 0x4000_0000 | 2 << 21 | 5 << 12;
    const PAE_2M: u64 = 0x4000_0000 | 3 << 21;

    #[test]
    fn pae_4k_and_2m_pages() {
        let m = tables_pae();
        let mode = mode_pae(true);
        assert_eq!(
            translate(&m, &mode, PAE_4K | 0x123, USER_WRITE),
            Ok(0x1_2345_6123)
        );
        assert_eq!(
            translate(&m, &mode, PAE_2M | 0x1_2345, USER_FETCH),
            Ok(0x8_0061_2345)
        );
    }

    #[test]
    fn pae_pdpte_not_present_and_reserved() {
        let mut m = tables_pae();
        let mode = mode_pae(false);
        assert_eq!(
            translate(&m, &mode, 0xc000_0000, SUP_READ),
            Err(WalkError::NotPresent {
                level: 3,
                gva: 0xc000_0000
            })
        );
        // PDPTE bit 1 (R/W position) is reserved in PAE paging.
        m.poke_u64(0x1020 + 8, 0x2000 | P | RW);
        assert_eq!(
            translate(&m, &mode, PAE_4K, SUP_READ),
            Err(WalkError::ReservedBits { level: 3 })
        );
    }

    #[test]
    fn pae_pde_pte_not_present_and_reserved() {
        let mut m = tables_pae();
        let mode = mode_pae(false);
        let gva = 0x4000_0000 | 7 << 21;
        assert_eq!(
            translate(&m, &mode, gva, SUP_READ),
            Err(WalkError::NotPresent { level: 2, gva })
        );
        let gva = PAE_4K + 0x1000;
        assert_eq!(
            translate(&m, &mode, gva, SUP_READ),
            Err(WalkError::NotPresent { level: 1, gva })
        );
        // XD without EFER.NXE is a reserved bit, at any level.
        m.poke_u64(0x3000 + 5 * 8, 0x1_2345_6000 | P | XD);
        assert_eq!(
            translate(&m, &mode, PAE_4K, SUP_READ),
            Err(WalkError::ReservedBits { level: 1 })
        );
        m.poke_u64(0x2000 + 2 * 8, 0x3000 | P | (1 << 52));
        assert_eq!(
            translate(&m, &mode, PAE_4K, SUP_READ),
            Err(WalkError::ReservedBits { level: 2 })
        );
        // Bits 20:13 of a 2 MiB PDE are reserved.
        m.poke_u64(0x2000 + 3 * 8, 0x8_0060_0000 | (1 << 13) | PS | P);
        assert_eq!(
            translate(&m, &mode, PAE_2M, SUP_READ),
            Err(WalkError::ReservedBits { level: 2 })
        );
    }

    #[test]
    fn pae_execute_disable() {
        let mut m = tables_pae();
        m.poke_u64(0x2000 + 2 * 8, 0x3000 | P | RW_US | XD);
        let mode = mode_pae(true);
        assert_eq!(
            translate(&m, &mode, PAE_4K, USER_FETCH),
            Err(WalkError::Protection { gva: PAE_4K })
        );
        assert_eq!(translate(&m, &mode, PAE_4K, USER_WRITE), Ok(0x1_2345_6000));
    }

    // ---- 4-level paging ----

    #[test]
    fn four_level_4k_2m_1g_pages() {
        let mut t = LongTables::new(4);
        let gva_4k = 0xffff_8000_1234_5000;
        let gva_2m = 0x0000_7f00_0020_0000;
        let gva_1g = 0x0000_0040_0000_0000;
        t.map(gva_4k, 1, 0x9_8765_4000, RW | XD);
        t.map(gva_2m, 2, 0x4_0020_0000, RW_US);
        t.map(gva_1g, 3, 0xf_c000_0000, US);
        let mode = t.mode(true);
        assert_eq!(
            translate(&t.mem, &mode, gva_4k | 0xabc, SUP_WRITE),
            Ok(0x9_8765_4abc)
        );
        assert_eq!(
            translate(&t.mem, &mode, gva_2m | 0x1f_fff0, USER_FETCH),
            Ok(0x4_003f_fff0)
        );
        assert_eq!(
            translate(&t.mem, &mode, gva_1g | 0x3fff_ffff, USER_READ),
            Ok(0xf_ffff_ffff)
        );
        // The PAT bit (12) of a large page is not an address bit.
        let path = t.map(gva_2m, 2, 0x4_0020_0000 | (1 << 12), RW_US);
        assert_eq!(t.mem.peek_u64(*path.last().unwrap()) & (1 << 12), 1 << 12);
        assert_eq!(
            translate(&t.mem, &mode, gva_2m, USER_READ),
            Ok(0x4_0020_0000)
        );
    }

    #[test]
    fn four_level_non_canonical() {
        let t = LongTables::new(4);
        let mode = t.mode(false);
        for gva in [
            0x0000_8000_0000_0000,
            0xffff_7fff_ffff_ffff,
            0x0100_0000_0000_0000,
        ] {
            assert_eq!(
                translate(&t.mem, &mode, gva, SUP_READ),
                Err(WalkError::NonCanonical)
            );
        }
    }

    #[test]
    fn four_level_not_present_at_each_level() {
        let mut t = LongTables::new(4);
        let gva = 0x0000_1234_5678_9000;
        let path = t.map(gva, 1, 0x5000_0000, RW);
        let mode = t.mode(false);
        assert_eq!(translate(&t.mem, &mode, gva, SUP_READ), Ok(0x5000_0000));
        // Clear P from the bottom up: each level reports itself.
        for (i, at) in path.iter().enumerate().rev() {
            let level = 4 - i as u8;
            let entry = t.mem.peek_u64(*at);
            t.mem.poke_u64(*at, entry & !P);
            assert_eq!(
                translate(&t.mem, &mode, gva, SUP_READ),
                Err(WalkError::NotPresent { level, gva })
            );
        }
    }

    #[test]
    fn four_level_reserved_bits() {
        let mut t = LongTables::new(4);
        let gva = 0x0000_0080_0000_0000;
        let path = t.map(gva, 1, 0x5000_0000, RW | XD);
        // XD with EFER.NXE = 0.
        assert_eq!(
            translate(&t.mem, &t.mode(false), gva, SUP_READ),
            Err(WalkError::ReservedBits { level: 1 })
        );
        assert_eq!(
            translate(&t.mem, &t.mode(true), gva, SUP_READ),
            Ok(0x5000_0000)
        );
        // PS in a PML4E.
        let pml4e = t.mem.peek_u64(path[0]);
        t.mem.poke_u64(path[0], pml4e | PS);
        assert_eq!(
            translate(&t.mem, &t.mode(true), gva, SUP_READ),
            Err(WalkError::ReservedBits { level: 4 })
        );
        t.mem.poke_u64(path[0], pml4e);
        // Bits 29:13 of a 1 GiB PDPTE and bits 20:13 of a 2 MiB PDE.
        let g1 = 0x0000_0100_0000_0000;
        t.map(g1, 3, 0x4000_0000 | (1 << 20), RW);
        assert_eq!(
            translate(&t.mem, &t.mode(true), g1, SUP_READ),
            Err(WalkError::ReservedBits { level: 3 })
        );
        let g2 = 0x0000_0180_0000_0000;
        t.map(g2, 2, 0x20_0000 | (1 << 13), RW);
        assert_eq!(
            translate(&t.mem, &t.mode(true), g2, SUP_READ),
            Err(WalkError::ReservedBits { level: 2 })
        );
    }

    #[test]
    fn four_level_rights_combine_across_levels() {
        let mut t = LongTables::new(4);
        let gva = 0x0000_0000_4000_0000;
        let path = t.map(gva, 1, 0x6000, RW_US);
        let mode = t.mode(true);
        assert_eq!(translate(&t.mem, &mode, gva, USER_WRITE), Ok(0x6000));
        // Read-only PDPTE: the page is read-only though the PTE says R/W.
        let pdpte = t.mem.peek_u64(path[1]);
        t.mem.poke_u64(path[1], pdpte & !RW);
        let prot = Err(WalkError::Protection { gva });
        assert_eq!(translate(&t.mem, &mode, gva, USER_WRITE), prot);
        assert_eq!(translate(&t.mem, &mode, gva, SUP_WRITE), prot);
        assert_eq!(translate(&t.mem, &mode, gva, USER_READ), Ok(0x6000));
        // CR0.WP = 0: a supervisor write goes through, a user write does not.
        let no_wp = PagingMode {
            cr0: mode.cr0 & !PagingMode::CR0_WP,
            ..mode
        };
        assert_eq!(translate(&t.mem, &no_wp, gva, SUP_WRITE), Ok(0x6000));
        assert_eq!(translate(&t.mem, &no_wp, gva, USER_WRITE), prot);
        // Supervisor-only PML4E.
        let pml4e = t.mem.peek_u64(path[0]);
        t.mem.poke_u64(path[0], pml4e & !US);
        assert_eq!(translate(&t.mem, &mode, gva, USER_READ), prot);
        assert_eq!(translate(&t.mem, &mode, gva, SUP_READ), Ok(0x6000));
        // XD in the PDE forbids fetches only.
        let pde = t.mem.peek_u64(path[2]);
        t.mem.poke_u64(path[2], pde | XD);
        assert_eq!(translate(&t.mem, &mode, gva, Access::FETCH), prot);
        assert_eq!(translate(&t.mem, &mode, gva, SUP_READ), Ok(0x6000));
    }

    #[test]
    fn four_level_table_outside_ram() {
        let mut t = LongTables::new(4);
        let gva = 0x0000_0000_0040_0000;
        let path = t.map(gva, 1, 0x6000, RW);
        // Point the PDE at a page table that is not RAM.
        t.mem.poke_u64(path[2], 0x7777_0000 | P | RW);
        assert_eq!(
            translate(&t.mem, &t.mode(false), gva, SUP_READ),
            Err(WalkError::OutOfRam { gpa: 0x7777_0000 })
        );
        // CR3 itself outside RAM.
        let mode = PagingMode {
            cr3: 0x9999_0000,
            ..t.mode(false)
        };
        assert_eq!(
            translate(&t.mem, &mode, 0, SUP_READ),
            Err(WalkError::OutOfRam { gpa: 0x9999_0000 })
        );
    }

    #[test]
    fn walk_never_writes_accessed_or_dirty() {
        let mut t = LongTables::new(4);
        let gva = 0x0000_0000_0040_0000;
        let path = t.map(gva, 1, 0x6000, RW);
        let before: Vec<u64> = path.iter().map(|a| t.mem.peek_u64(*a)).collect();
        assert_eq!(
            translate(&t.mem, &t.mode(false), gva, SUP_WRITE),
            Ok(0x6000)
        );
        let after: Vec<u64> = path.iter().map(|a| t.mem.peek_u64(*a)).collect();
        assert_eq!(before, after);
    }

    // ---- 5-level paging ----

    #[test]
    fn five_level_pages_and_canonical() {
        let mut t = LongTables::new(5);
        // Canonical with 57 bits, not with 48.
        let gva = 0x00ff_0000_0000_1000;
        let path = t.map(gva, 1, 0xabc_d000, RW);
        assert_eq!(path.len(), 5);
        let mode = t.mode(false);
        assert_eq!(
            translate(&t.mem, &mode, gva | 0x10, SUP_READ),
            Ok(0xabc_d010)
        );
        let g2 = 0xff00_0000_0020_0000;
        t.map(g2, 2, 0x40_0000, RW);
        assert_eq!(translate(&t.mem, &mode, g2 + 5, SUP_READ), Ok(0x40_0005));
        let g1 = 0x0000_0001_0000_0000;
        t.map(g1, 3, 0x1_4000_0000, RW);
        assert_eq!(
            translate(&t.mem, &mode, g1 + 7, SUP_READ),
            Ok(0x1_4000_0007)
        );
        assert_eq!(
            translate(&t.mem, &mode, 0x0100_0000_0000_0000, SUP_READ),
            Err(WalkError::NonCanonical)
        );
        // The same address is non-canonical under 4-level paging.
        let four = PagingMode {
            cr4: mode.cr4 & !PagingMode::CR4_LA57,
            ..mode
        };
        assert_eq!(
            translate(&t.mem, &four, gva, SUP_READ),
            Err(WalkError::NonCanonical)
        );
        // Not present at the PML5E; PS reserved in a PML5E.
        let far = 0x0080_0000_0000_0000 | 0xff00_0000_0000_0000;
        assert_eq!(
            translate(&t.mem, &mode, far, SUP_READ),
            Err(WalkError::NotPresent { level: 5, gva: far })
        );
        let pml5e = t.mem.peek_u64(path[0]);
        t.mem.poke_u64(path[0], pml5e | PS);
        assert_eq!(
            translate(&t.mem, &mode, gva, SUP_READ),
            Err(WalkError::ReservedBits { level: 5 })
        );
    }

    #[test]
    fn errors_display() {
        let errors = [
            WalkError::NotPresent { level: 2, gva: 1 },
            WalkError::Protection { gva: 1 },
            WalkError::NonCanonical,
            WalkError::ReservedBits { level: 3 },
            WalkError::OutOfRam { gpa: 1 },
        ];
        for e in errors {
            assert!(!std::format!("{e}").is_empty());
        }
    }

    /// Memory whose every byte is pseudo-random; some pages are not RAM.
    struct RandomMemory(u64);

    impl GuestMemory for RandomMemory {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            if (gpa >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60 == 0 {
                return false;
            }
            for (i, b) in buf.iter_mut().enumerate() {
                let mut x = gpa.wrapping_add(i as u64) ^ self.0;
                x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
                x ^= x >> 33;
                *b = x as u8;
            }
            true
        }

        fn write(&mut self, _gpa: u64, _bytes: &[u8]) -> bool {
            false
        }
    }

    #[test]
    fn random_tables_never_panic() {
        let mut s: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20_000 {
            let mem = RandomMemory(next());
            let mode = PagingMode {
                cr0: next(),
                cr3: next(),
                cr4: next(),
                efer: next(),
            };
            let r = next();
            let access = Access {
                write: r & 1 != 0,
                user: r & 2 != 0,
                fetch: r & 4 != 0,
            };
            let _ = translate(&mem, &mode, next(), access);
        }
    }
}
