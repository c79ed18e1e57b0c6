//! A minimal ELF64 loader for static x86_64 executables: the test guest image.
//!
//! It validates an image completely before anything is copied into guest memory, so that a
//! damaged or hostile image ends in an [`ElfError`], never in a panic or in a write outside the
//! ranges the image declares. It understands exactly what a statically linked, non-relocatable
//! `ET_EXEC` file needs: the ELF header and the `PT_LOAD` program headers. Everything else
//! (sections, symbols, dynamic linking, relocations, the other program header types) is
//! ignored, because a static executable runs without it.
//!
//! Segments are placed at their physical address (`p_paddr`): the guest starts with paging set
//! up by the loader as an identity map, so for our guest `p_paddr == p_vaddr`, and `p_paddr`
//! is what the linker script pins to guest-physical memory.
//!
//! Error indices ([`ElfError::SegmentOutsideFile`] and friends) are positions in the program
//! header table, as `readelf -l` numbers them, so a report points at the right header.

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

/// Size of the ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of an ELF64 program header; `e_phentsize` may be larger (later ABI extensions), never
/// smaller.
const PHDR_SIZE: usize = 56;

const ELF_MAGIC: [u8; 4] = [0x7F, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EV_CURRENT: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// `e_phnum` value meaning "the real count is in section header 0": extended numbering, only
/// needed beyond 65534 program headers, which no guest image has.
const PN_XNUM: u16 = 0xFFFF;

// Offsets of the ELF header fields.
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const EI_VERSION: usize = 6;
const E_TYPE: usize = 16;
const E_MACHINE: usize = 18;
const E_VERSION: usize = 20;
const E_ENTRY: usize = 24;
const E_PHOFF: usize = 32;
const E_EHSIZE: usize = 52;
const E_PHENTSIZE: usize = 54;
const E_PHNUM: usize = 56;

// Offsets of the program header fields.
const P_TYPE: usize = 0;
const P_OFFSET: usize = 8;
const P_PADDR: usize = 24;
const P_FILESZ: usize = 32;
const P_MEMSZ: usize = 40;

/// Why an image was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than an ELF64 header.
    TooShort,
    /// Does not start with `\x7fELF`.
    BadMagic,
    /// An ELF file, but not ELF64.
    NotElf64,
    /// Big-endian.
    NotLittleEndian,
    /// Unknown ELF version (identification byte or `e_version`).
    BadVersion,
    /// Built for another machine than x86_64.
    NotX86_64,
    /// Not a fixed-address executable (`ET_EXEC`): relocatable objects, shared objects and
    /// position-independent executables need a dynamic loader.
    NotExecutable,
    /// Header sizes that are not ELF64's, or a program header table outside the file.
    BadHeader,
    /// A `PT_LOAD` whose file bytes are not all inside the file.
    SegmentOutsideFile { index: usize },
    /// A `PT_LOAD` with more file bytes than memory bytes, or whose memory range passes the
    /// end of the 64-bit address space.
    SegmentTooLarge { index: usize },
    /// Two `PT_LOAD` segments share memory (indices of both, `a < b`): loading one would
    /// overwrite the other.
    Overlap { a: usize, b: usize },
    /// Nothing to load.
    NoLoadSegments,
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::TooShort => write!(f, "file too short for an ELF header"),
            ElfError::BadMagic => write!(f, "not an ELF file (bad magic)"),
            ElfError::NotElf64 => write!(f, "not a 64-bit ELF file"),
            ElfError::NotLittleEndian => write!(f, "not a little-endian ELF file"),
            ElfError::BadVersion => write!(f, "unsupported ELF version"),
            ElfError::NotX86_64 => write!(f, "not an x86_64 ELF file"),
            ElfError::NotExecutable => write!(f, "not a static executable (ET_EXEC)"),
            ElfError::BadHeader => write!(f, "bad ELF header sizes or program header table"),
            ElfError::SegmentOutsideFile { index } => {
                write!(f, "program header {index}: segment data outside the file")
            }
            ElfError::SegmentTooLarge { index } => write!(
                f,
                "program header {index}: file size above memory size or address overflow"
            ),
            ElfError::Overlap { a, b } => {
                write!(f, "program headers {a} and {b}: segments overlap in memory")
            }
            ElfError::NoLoadSegments => write!(f, "no loadable segments"),
        }
    }
}

/// One `PT_LOAD` segment, ready to copy: `data` goes to `paddr..paddr + data.len()`, and the
/// bytes after it up to `mem_size` (the bss) must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment<'a> {
    pub paddr: u64,
    pub data: &'a [u8],
    pub mem_size: u64,
}

/// A validated executable: every [`LoadSegment`] lies inside the file, fits in the address
/// space and overlaps no other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage<'a> {
    /// Where execution starts (`e_entry`).
    pub entry: u64,
    /// The `PT_LOAD` segments in file order.
    loads: Vec<LoadSegment<'a>>,
    span: Range<u64>,
}

impl<'a> ElfImage<'a> {
    /// Validates `bytes` as a static x86_64 ELF64 executable (see [`ElfError`] for what is
    /// checked). The image borrows the segment data from `bytes`: nothing is copied.
    pub fn parse(bytes: &'a [u8]) -> Result<ElfImage<'a>, ElfError> {
        if bytes.len() < EHDR_SIZE {
            return Err(ElfError::TooShort);
        }
        if bytes[..4] != ELF_MAGIC {
            return Err(ElfError::BadMagic);
        }
        if bytes[EI_CLASS] != ELFCLASS64 {
            return Err(ElfError::NotElf64);
        }
        if bytes[EI_DATA] != ELFDATA2LSB {
            return Err(ElfError::NotLittleEndian);
        }
        // The header is all there (length checked above), so the field reads cannot fail; the
        // fallbacks only keep the code free of panicking paths.
        let u16_at = |at| read_u16(bytes, at).ok_or(ElfError::TooShort);
        let u32_at = |at| read_u32(bytes, at).ok_or(ElfError::TooShort);
        let u64_at = |at| read_u64(bytes, at).ok_or(ElfError::TooShort);
        if bytes[EI_VERSION] != EV_CURRENT || u32_at(E_VERSION)? != u32::from(EV_CURRENT) {
            return Err(ElfError::BadVersion);
        }
        if u16_at(E_MACHINE)? != EM_X86_64 {
            return Err(ElfError::NotX86_64);
        }
        if u16_at(E_TYPE)? != ET_EXEC {
            return Err(ElfError::NotExecutable);
        }
        let entry = u64_at(E_ENTRY)?;
        let ehsize = usize::from(u16_at(E_EHSIZE)?);
        let phentsize = usize::from(u16_at(E_PHENTSIZE)?);
        let phnum = u16_at(E_PHNUM)?;
        if ehsize < EHDR_SIZE || ehsize > bytes.len() || phnum == PN_XNUM {
            return Err(ElfError::BadHeader);
        }
        let phnum = usize::from(phnum);
        if phnum == 0 {
            return Err(ElfError::NoLoadSegments);
        }
        if phentsize < PHDR_SIZE {
            return Err(ElfError::BadHeader);
        }
        // The whole program header table must be inside the file, computed without overflow
        // (e_phoff is attacker-controlled and may be near u64::MAX).
        let phoff = usize::try_from(u64_at(E_PHOFF)?).map_err(|_| ElfError::BadHeader)?;
        let table_end = phentsize
            .checked_mul(phnum)
            .and_then(|size| size.checked_add(phoff))
            .ok_or(ElfError::BadHeader)?;
        if table_end > bytes.len() {
            return Err(ElfError::BadHeader);
        }

        let mut loads = Vec::new();
        // Program header indices of `loads`, for the overlap report.
        let mut indices = Vec::new();
        for index in 0..phnum {
            // In range: index < phnum, so the header ends at or before table_end.
            let ph = phoff + index * phentsize;
            let field = |at: usize| read_u64(bytes, ph + at).ok_or(ElfError::BadHeader);
            if read_u32(bytes, ph + P_TYPE).ok_or(ElfError::BadHeader)? != PT_LOAD {
                continue;
            }
            let offset = field(P_OFFSET)?;
            let paddr = field(P_PADDR)?;
            let filesz = field(P_FILESZ)?;
            let memsz = field(P_MEMSZ)?;
            let outside = ElfError::SegmentOutsideFile { index };
            let start = usize::try_from(offset).map_err(|_| outside)?;
            let len = usize::try_from(filesz).map_err(|_| outside)?;
            let data = start
                .checked_add(len)
                .and_then(|end| bytes.get(start..end))
                .ok_or(outside)?;
            if filesz > memsz || paddr.checked_add(memsz).is_none() {
                return Err(ElfError::SegmentTooLarge { index });
            }
            loads.push(LoadSegment {
                paddr,
                data,
                mem_size: memsz,
            });
            indices.push(index);
        }
        if loads.is_empty() {
            return Err(ElfError::NoLoadSegments);
        }
        check_overlaps(&loads, &indices)?;

        let low = loads.iter().map(|s| s.paddr).min().unwrap_or(0);
        // No overflow: every paddr + mem_size was checked above.
        let high = loads
            .iter()
            .map(|s| s.paddr.saturating_add(s.mem_size))
            .max()
            .unwrap_or(0);
        Ok(ElfImage {
            entry,
            loads,
            span: low..high,
        })
    }

    /// The `PT_LOAD` segments, in file order.
    pub fn segments(&self) -> impl Iterator<Item = LoadSegment<'a>> + '_ {
        self.loads.iter().copied()
    }

    /// The guest-physical range the image occupies: from the lowest segment start to the
    /// highest segment end (bss included), holes between segments included.
    pub fn span(&self) -> Range<u64> {
        self.span.clone()
    }
}

/// Refuses segments that share memory. Sorting by start address and comparing each segment
/// with the furthest end seen so far finds an overlap in O(n log n): a quadratic pairwise
/// check over a crafted table of 65534 headers would stall the node. Empty segments occupy
/// no memory and never overlap.
fn check_overlaps(loads: &[LoadSegment<'_>], indices: &[usize]) -> Result<(), ElfError> {
    let mut order: Vec<(u64, u64, usize)> = loads
        .iter()
        .zip(indices)
        .filter(|(s, _)| s.mem_size > 0)
        .map(|(s, &index)| (s.paddr, s.paddr.saturating_add(s.mem_size), index))
        .collect();
    order.sort_unstable();
    // (end, index) of the segment reaching furthest among those starting earlier.
    let mut furthest: Option<(u64, usize)> = None;
    for &(start, end, index) in &order {
        if let Some((far_end, far_index)) = furthest {
            if start < far_end {
                return Err(ElfError::Overlap {
                    a: far_index.min(index),
                    b: far_index.max(index),
                });
            }
        }
        if furthest.is_none_or(|(far_end, _)| end > far_end) {
            furthest = Some((end, index));
        }
    }
    Ok(())
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;
    use alloc::vec::Vec;

    const PT_NOTE: u32 = 4;
    const PT_GNU_STACK: u32 = 0x6474_E551;

    /// One program header as the builder writes it. `offset` is relative to the builder's body
    /// (the bytes after the program header table) unless `absolute` is set.
    #[derive(Clone, Copy)]
    struct Ph {
        p_type: u32,
        offset: u64,
        absolute: bool,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    /// Builds ELF64 files byte by byte: a header, the program header table right after it,
    /// then a body holding the segment data.
    struct ElfBuilder {
        entry: u64,
        e_type: u16,
        phentsize: u16,
        phs: Vec<Ph>,
        body: Vec<u8>,
    }

    impl ElfBuilder {
        fn new() -> Self {
            ElfBuilder {
                entry: 0x10_0000,
                e_type: ET_EXEC,
                phentsize: PHDR_SIZE as u16,
                phs: Vec::new(),
                body: Vec::new(),
            }
        }

        /// A PT_LOAD of `data` at `paddr`, `memsz` bytes in memory.
        fn load(mut self, paddr: u64, data: &[u8], memsz: u64) -> Self {
            let offset = self.body.len() as u64;
            self.body.extend_from_slice(data);
            self.phs.push(Ph {
                p_type: PT_LOAD,
                offset,
                absolute: false,
                paddr,
                filesz: data.len() as u64,
                memsz,
            });
            self
        }

        /// A header with raw values (file offset absolute).
        fn raw(mut self, p_type: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64) -> Self {
            self.phs.push(Ph {
                p_type,
                offset,
                absolute: true,
                paddr,
                filesz,
                memsz,
            });
            self
        }

        fn build(&self) -> Vec<u8> {
            let phentsize = usize::from(self.phentsize);
            let body_start = EHDR_SIZE + self.phs.len() * phentsize;
            let mut f = vec![0u8; body_start];
            f[..4].copy_from_slice(&ELF_MAGIC);
            f[EI_CLASS] = ELFCLASS64;
            f[EI_DATA] = ELFDATA2LSB;
            f[EI_VERSION] = EV_CURRENT;
            f[E_TYPE..E_TYPE + 2].copy_from_slice(&self.e_type.to_le_bytes());
            f[E_MACHINE..E_MACHINE + 2].copy_from_slice(&EM_X86_64.to_le_bytes());
            f[E_VERSION..E_VERSION + 4].copy_from_slice(&1u32.to_le_bytes());
            f[E_ENTRY..E_ENTRY + 8].copy_from_slice(&self.entry.to_le_bytes());
            f[E_PHOFF..E_PHOFF + 8].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
            f[E_EHSIZE..E_EHSIZE + 2].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
            f[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&self.phentsize.to_le_bytes());
            f[E_PHNUM..E_PHNUM + 2].copy_from_slice(&(self.phs.len() as u16).to_le_bytes());
            for (i, ph) in self.phs.iter().enumerate() {
                let at = EHDR_SIZE + i * phentsize;
                let offset = if ph.absolute {
                    ph.offset
                } else {
                    ph.offset + body_start as u64
                };
                let put = |f: &mut Vec<u8>, field: usize, v: u64| {
                    f[at + field..at + field + 8].copy_from_slice(&v.to_le_bytes())
                };
                f[at..at + 4].copy_from_slice(&ph.p_type.to_le_bytes());
                f[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X, ignored
                put(&mut f, P_OFFSET, offset);
                put(&mut f, 16, ph.paddr); // p_vaddr, ignored
                put(&mut f, P_PADDR, ph.paddr);
                put(&mut f, P_FILESZ, ph.filesz);
                put(&mut f, P_MEMSZ, ph.memsz);
                put(&mut f, 48, 0x1000); // p_align, ignored
            }
            f.extend_from_slice(&self.body);
            f
        }
    }

    fn set_u16(f: &mut [u8], at: usize, v: u16) {
        f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u64(f: &mut [u8], at: usize, v: u64) {
        f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A typical guest: text, a non-load header, data with bss.
    fn guest() -> Vec<u8> {
        ElfBuilder::new()
            .load(0x10_0000, b"\xF4\xEB\xFD", 0x1000)
            .raw(PT_GNU_STACK, 0, 0, 0, 0)
            .load(0x10_1000, b"data", 0x3000)
            .build()
    }

    #[test]
    fn parses_a_static_executable() {
        let file = guest();
        let image = ElfImage::parse(&file).expect("parse");
        assert_eq!(image.entry, 0x10_0000);
        let segs: Vec<LoadSegment<'_>> = image.segments().collect();
        assert_eq!(
            segs,
            vec![
                LoadSegment {
                    paddr: 0x10_0000,
                    data: b"\xF4\xEB\xFD",
                    mem_size: 0x1000
                },
                LoadSegment {
                    paddr: 0x10_1000,
                    data: b"data",
                    mem_size: 0x3000
                },
            ]
        );
        assert_eq!(image.span(), 0x10_0000..0x10_4000);
        // The data borrows from the file.
        let text_at = EHDR_SIZE + 3 * PHDR_SIZE;
        assert!(core::ptr::eq(segs[0].data.as_ptr(), &file[text_at]));
    }

    #[test]
    fn segments_keep_file_order_and_span_covers_all() {
        let file = ElfBuilder::new()
            .load(0x20_0000, b"high", 0x10)
            .load(0x1000, b"low", 3)
            .load(0x8000, b"", 0x100) // pure bss
            .build();
        let image = ElfImage::parse(&file).unwrap();
        let addrs: Vec<u64> = image.segments().map(|s| s.paddr).collect();
        assert_eq!(addrs, vec![0x20_0000, 0x1000, 0x8000]);
        assert_eq!(image.span(), 0x1000..0x20_0010);
        // Calling twice gives the same answer.
        assert_eq!(image.segments().count(), 3);
    }

    #[test]
    fn larger_program_header_entries_are_strided() {
        let mut b = ElfBuilder::new()
            .load(0x10_0000, b"one", 3)
            .load(0x20_0000, b"two", 3);
        b.phentsize = 64;
        let file = b.build();
        let image = ElfImage::parse(&file).unwrap();
        let segs: Vec<LoadSegment<'_>> = image.segments().collect();
        assert_eq!(segs[0].data, b"one");
        assert_eq!(segs[1].data, b"two");
        assert_eq!(segs[1].paddr, 0x20_0000);
    }

    #[test]
    fn header_errors() {
        let good = guest();
        assert_eq!(ElfImage::parse(&[]), Err(ElfError::TooShort));
        assert_eq!(ElfImage::parse(&good[..63]), Err(ElfError::TooShort));
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut f = good.clone();
            edit(&mut f);
            ElfImage::parse(&f).map(|_| ())
        };
        assert_eq!(with(&|f| f[0] = 0x7E), Err(ElfError::BadMagic));
        assert_eq!(with(&|f| f[3] = b'f'), Err(ElfError::BadMagic));
        assert_eq!(with(&|f| f[EI_CLASS] = 1), Err(ElfError::NotElf64));
        assert_eq!(with(&|f| f[EI_DATA] = 2), Err(ElfError::NotLittleEndian));
        assert_eq!(with(&|f| f[EI_VERSION] = 0), Err(ElfError::BadVersion));
        assert_eq!(with(&|f| f[E_VERSION] = 2), Err(ElfError::BadVersion));
        assert_eq!(
            with(&|f| set_u16(f, E_MACHINE, 3)),
            Err(ElfError::NotX86_64)
        );
        assert_eq!(
            with(&|f| set_u16(f, E_MACHINE, 183)),
            Err(ElfError::NotX86_64)
        );
        assert_eq!(
            with(&|f| set_u16(f, E_TYPE, 1)),
            Err(ElfError::NotExecutable)
        );
        assert_eq!(
            with(&|f| set_u16(f, E_TYPE, 3)),
            Err(ElfError::NotExecutable)
        );
        assert_eq!(
            with(&|f| set_u16(f, E_TYPE, 4)),
            Err(ElfError::NotExecutable)
        );
    }

    #[test]
    fn bad_header_sizes_and_tables() {
        let good = guest();
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut f = good.clone();
            edit(&mut f);
            ElfImage::parse(&f).map(|_| ())
        };
        // ELF32 sizes in an ELF64 file.
        assert_eq!(
            with(&|f| set_u16(f, E_EHSIZE, 52)),
            Err(ElfError::BadHeader)
        );
        assert_eq!(
            with(&|f| set_u16(f, E_PHENTSIZE, 32)),
            Err(ElfError::BadHeader)
        );
        assert_eq!(
            with(&|f| set_u16(f, E_PHENTSIZE, 0)),
            Err(ElfError::BadHeader)
        );
        // A header larger than the file.
        assert_eq!(
            with(&|f| set_u16(f, E_EHSIZE, 0xFFFF)),
            Err(ElfError::BadHeader)
        );
        // Extended numbering.
        assert_eq!(
            with(&|f| set_u16(f, E_PHNUM, PN_XNUM)),
            Err(ElfError::BadHeader)
        );
        // Table past the end, partly or wholly, and offsets that overflow.
        assert_eq!(
            with(&|f| set_u16(f, E_PHNUM, 200)),
            Err(ElfError::BadHeader)
        );
        let len = good.len() as u64;
        assert_eq!(
            with(&|f| set_u64(f, E_PHOFF, len)),
            Err(ElfError::BadHeader)
        );
        assert_eq!(
            with(&|f| set_u64(f, E_PHOFF, len - 10)),
            Err(ElfError::BadHeader)
        );
        assert_eq!(
            with(&|f| set_u64(f, E_PHOFF, u64::MAX)),
            Err(ElfError::BadHeader)
        );
        assert_eq!(
            with(&|f| set_u64(f, E_PHOFF, u64::MAX - 100)),
            Err(ElfError::BadHeader)
        );
        assert_eq!(
            with(&|f| set_u16(f, E_PHENTSIZE, 0xFFFF)),
            Err(ElfError::BadHeader)
        );
    }

    #[test]
    fn segment_outside_file() {
        let b = || ElfBuilder::new().load(0x10_0000, b"text", 0x1000);
        // The length of the files below: one more program header, no more body.
        let len = b().raw(PT_LOAD, 0, 0, 0, 0).build().len() as u64;
        // Offset just past the end, data running past the end, offset overflow, size overflow.
        for (offset, filesz) in [
            (len, 1),
            (len - 2, 4),
            (u64::MAX, 1),
            (8, u64::MAX),
            (u64::MAX - 3, 8),
        ] {
            let file = b()
                .raw(PT_LOAD, offset, 0x20_0000, filesz, u64::MAX / 2)
                .build();
            assert_eq!(
                ElfImage::parse(&file).map(|_| ()),
                Err(ElfError::SegmentOutsideFile { index: 1 }),
                "offset {offset:#x} filesz {filesz:#x}"
            );
        }
        // Exactly up to the end is fine, and so is an empty segment at the end.
        let file = b().raw(PT_LOAD, len - 4, 0x20_0000, 4, 4).build();
        assert!(ElfImage::parse(&file).is_ok());
        let file = b().raw(PT_LOAD, len, 0x20_0000, 0, 16).build();
        assert!(ElfImage::parse(&file).is_ok());
    }

    #[test]
    fn segment_too_large() {
        // More file bytes than memory bytes.
        let file = ElfBuilder::new().load(0x10_0000, b"text", 3).build();
        assert_eq!(
            ElfImage::parse(&file).map(|_| ()),
            Err(ElfError::SegmentTooLarge { index: 0 })
        );
        // paddr + memsz passes 2^64.
        let file = ElfBuilder::new()
            .load(0x10_0000, b"text", 4)
            .raw(PT_NOTE, 0, 0, 0, 0)
            .load(u64::MAX - 10, b"", 11)
            .build();
        assert_eq!(
            ElfImage::parse(&file).map(|_| ()),
            Err(ElfError::SegmentTooLarge { index: 2 })
        );
        // Ending exactly at the last byte of the address space is fine.
        let file = ElfBuilder::new().load(u64::MAX - 10, b"", 10).build();
        assert_eq!(
            ElfImage::parse(&file).unwrap().span(),
            u64::MAX - 10..u64::MAX
        );
    }

    #[test]
    fn overlapping_segments() {
        let parse = |b: ElfBuilder| ElfImage::parse(&b.build()).map(|_| ());
        // Partly overlapping, in either file order.
        assert_eq!(
            parse(
                ElfBuilder::new()
                    .load(0x1000, b"a", 0x1000)
                    .load(0x1FFF, b"b", 0x10)
            ),
            Err(ElfError::Overlap { a: 0, b: 1 })
        );
        assert_eq!(
            parse(
                ElfBuilder::new()
                    .load(0x1FFF, b"b", 0x10)
                    .raw(PT_NOTE, 0, 0x1000, 0, 0x5000)
                    .load(0x1000, b"a", 0x1000)
            ),
            Err(ElfError::Overlap { a: 0, b: 2 })
        );
        // One inside another, found even past a segment in between.
        assert_eq!(
            parse(
                ElfBuilder::new()
                    .load(0x1000, b"big", 0x10_0000)
                    .load(0x20_0000, b"far", 0x10)
                    .load(0x5000, b"in", 0x10)
            ),
            Err(ElfError::Overlap { a: 0, b: 2 })
        );
        // A segment contained in an earlier long one, with a short one between them in
        // address order: the furthest end is remembered, not only the previous one.
        assert_eq!(
            parse(
                ElfBuilder::new()
                    .load(0x1000, b"long", 0x10_0000)
                    .load(0x1000, b"", 0)
                    .load(0x8000, b"x", 0x10)
            ),
            Err(ElfError::Overlap { a: 0, b: 2 })
        );
        // Same start.
        assert_eq!(
            parse(
                ElfBuilder::new()
                    .load(0x1000, b"a", 1)
                    .load(0x1000, b"b", 1)
            ),
            Err(ElfError::Overlap { a: 0, b: 1 })
        );
        // Adjacent is fine; empty segments occupy nothing; non-load headers do not count.
        assert_eq!(
            parse(
                ElfBuilder::new()
                    .load(0x1000, b"a", 0x1000)
                    .load(0x2000, b"b", 0x1000)
                    .load(0x1800, b"", 0)
                    .raw(PT_NOTE, 0, 0x1000, 0, 0x5000)
            ),
            Ok(())
        );
    }

    #[test]
    fn no_load_segments() {
        assert_eq!(
            ElfImage::parse(&ElfBuilder::new().build()).map(|_| ()),
            Err(ElfError::NoLoadSegments)
        );
        let file = ElfBuilder::new()
            .raw(PT_NOTE, 0, 0, 0, 0)
            .raw(PT_GNU_STACK, 0, 0, 0, 0)
            .build();
        assert_eq!(
            ElfImage::parse(&file).map(|_| ()),
            Err(ElfError::NoLoadSegments)
        );
    }

    #[test]
    fn non_load_headers_are_not_validated() {
        // Garbage in a header we do not use must not refuse the image.
        let file = ElfBuilder::new()
            .raw(PT_NOTE, u64::MAX, u64::MAX, u64::MAX, 1)
            .load(0x10_0000, b"text", 4)
            .build();
        let image = ElfImage::parse(&file).unwrap();
        assert_eq!(image.segments().count(), 1);
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        let file = guest();
        for len in 0..file.len() {
            assert!(ElfImage::parse(&file[..len]).is_err(), "length {len}");
        }
        assert!(ElfImage::parse(&file).is_ok());
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = guest();
        for round in 0..20_000 {
            let mut f = if round % 2 == 0 {
                good.clone()
            } else {
                let len = (next() % 400) as usize;
                let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                // Often keep a valid identification so the deeper checks run.
                if f.len() >= EHDR_SIZE && round % 3 != 0 {
                    f[..EHDR_SIZE].copy_from_slice(&good[..EHDR_SIZE]);
                }
                f
            };
            let flips = 1 + next() % 4;
            for _ in 0..flips {
                if f.is_empty() {
                    break;
                }
                let at = (next() as usize) % f.len().min(EHDR_SIZE + 3 * PHDR_SIZE);
                f[at] = next() as u8;
            }
            if let Ok(image) = ElfImage::parse(&f) {
                // Whatever is accepted keeps the promises the loader relies on.
                let span = image.span();
                for s in image.segments() {
                    assert!(s.data.len() as u64 <= s.mem_size);
                    let end = s.paddr.checked_add(s.mem_size).unwrap();
                    assert!(span.start <= s.paddr && end <= span.end);
                }
            }
        }
    }

    #[test]
    fn errors_explain_themselves() {
        let all = [
            ElfError::TooShort,
            ElfError::BadMagic,
            ElfError::NotElf64,
            ElfError::NotLittleEndian,
            ElfError::BadVersion,
            ElfError::NotX86_64,
            ElfError::NotExecutable,
            ElfError::BadHeader,
            ElfError::SegmentOutsideFile { index: 3 },
            ElfError::SegmentTooLarge { index: 4 },
            ElfError::Overlap { a: 1, b: 2 },
            ElfError::NoLoadSegments,
        ];
        let texts: Vec<_> = all.iter().map(|e| format!("{e}")).collect();
        for (i, t) in texts.iter().enumerate() {
            assert!(!t.is_empty());
            assert!(texts[..i].iter().all(|u| u != t), "{t}");
        }
        assert!(texts[8].contains('3'));
        assert!(texts[10].contains('1') && texts[10].contains('2'));
    }
}
