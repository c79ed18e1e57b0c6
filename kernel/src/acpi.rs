//! The few ACPI tables the node reads: the RSDP, the RSDT or XSDT it points to, and the MADT
//! ("APIC"), of which only the I/O APIC and interrupt source override entries matter (where the
//! IOAPICs are, and how ISA IRQ numbers map to their inputs with which polarity and trigger).
//!
//! Why not the `acpi` crate (rust-osdev): its current line (6.x) needs the nightly
//! `allocator_api` feature, and its `Handler` trait asks for some thirty host services of the AML
//! interpreter (port and PCI I/O, mutexes, sleeping) that reading one static table does not use;
//! its previous line (5.x) fits, but its MADT entry iterator trusts every entry's length byte (a
//! zero length loops forever, a length past the table's end reads beyond it) and its walk goes
//! through raw pointers that host tests cannot exercise. What the node needs is three structures
//! (ACPI 6.x sections 5.2.5, 5.2.7/5.2.8 and 5.2.12): about two hundred lines of bounds-checked
//! parsing over byte slices, tested here on the layouts QEMU's and Bochs' firmware produce and on
//! broken ones. Firmware bytes can never make it hang or panic: every length is checked, every
//! loop bounded.
//!
//! The one hardware seam is [`PhysMemory`]: copy bytes from a physical address (the kernel reads
//! them through its physical-memory window; tests, from a fake memory image).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Reads physical memory for the table walk.
pub trait PhysMemory {
    /// Fills `buf` from physical address `addr`; false if those bytes cannot be read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

/// Largest table this parser reads (the MADT of a large server is a few KiB).
pub const MAX_TABLE: u32 = 64 * 1024;
/// Most entries of the RSDT/XSDT looked at.
const MAX_ROOT_ENTRIES: usize = 256;
/// Length of the common table header.
const HEADER: usize = 36;
/// The MADT's fixed part: header, local APIC address, flags.
const MADT_FIXED: usize = HEADER + 8;

/// Why the MADT could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcpiError {
    /// The bootloader found no RSDP.
    NoRsdp,
    /// Physical memory at this address could not be read.
    Unreadable { addr: u64 },
    /// A structure's signature is not what it must be.
    BadSignature { what: &'static str, addr: u64 },
    /// A structure's bytes do not sum to zero.
    BadChecksum { what: &'static str, addr: u64 },
    /// A table length below its fixed part or above [`MAX_TABLE`].
    BadLength {
        what: &'static str,
        addr: u64,
        len: u32,
    },
    /// The root table lists no MADT.
    NoMadt,
    /// An MADT entry's length is too short for its type or runs past the table's end.
    BadEntry { offset: usize, kind: u8, len: u8 },
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::NoRsdp => write!(f, "no ACPI RSDP (the bootloader found none)"),
            AcpiError::Unreadable { addr } => {
                write!(f, "ACPI: physical memory at {addr:#x} is not mapped")
            }
            AcpiError::BadSignature { what, addr } => {
                write!(f, "ACPI: no {what} signature at {addr:#x}")
            }
            AcpiError::BadChecksum { what, addr } => {
                write!(f, "ACPI: bad {what} checksum at {addr:#x}")
            }
            AcpiError::BadLength { what, addr, len } => {
                write!(
                    f,
                    "ACPI: {what} at {addr:#x} has an impossible length {len}"
                )
            }
            AcpiError::NoMadt => write!(f, "ACPI: no MADT (APIC table) in the RSDT/XSDT"),
            AcpiError::BadEntry { offset, kind, len } => write!(
                f,
                "ACPI: MADT entry of type {kind} at offset {offset} has a bad length {len}"
            ),
        }
    }
}

/// An I/O APIC, as the MADT declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApicEntry {
    pub id: u8,
    /// Physical address of its registers.
    pub address: u32,
    /// The global system interrupt of its input 0.
    pub gsi_base: u32,
}

/// An interrupt source override: ISA IRQ `irq` is wired to `gsi`, with these MPS INTI flags
/// (decoded by [`crate::irq::IntiFlags`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceOverride {
    /// The bus (0: ISA, the only one the specification defines).
    pub bus: u8,
    pub irq: u8,
    pub gsi: u32,
    pub flags: u16,
}

/// What the node takes from the MADT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Madt {
    /// The local APIC's physical address (32-bit field).
    pub local_apic_address: u32,
    /// PCAT_COMPAT: the machine also has dual 8259 PICs (to be masked).
    pub pcat_compat: bool,
    pub io_apics: Vec<IoApicEntry>,
    pub overrides: Vec<SourceOverride>,
    /// Local APIC entries (type 0 and 9), counted.
    pub processors: usize,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

fn sums_to_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
}

fn read(mem: &impl PhysMemory, addr: u64, len: usize) -> Result<Vec<u8>, AcpiError> {
    let mut buf = vec![0u8; len];
    if mem.read(addr, &mut buf) {
        Ok(buf)
    } else {
        Err(AcpiError::Unreadable { addr })
    }
}

/// Reads a whole table (header, then the length it states) and checks its signature and
/// checksum.
fn read_table(
    mem: &impl PhysMemory,
    addr: u64,
    signature: &[u8; 4],
    what: &'static str,
    min_len: usize,
) -> Result<Vec<u8>, AcpiError> {
    let header = read(mem, addr, HEADER)?;
    if &header[..4] != signature {
        return Err(AcpiError::BadSignature { what, addr });
    }
    let len = u32_at(&header, 4);
    if (len as usize) < min_len || len > MAX_TABLE {
        return Err(AcpiError::BadLength { what, addr, len });
    }
    let table = read(mem, addr, len as usize)?;
    if !sums_to_zero(&table) {
        return Err(AcpiError::BadChecksum { what, addr });
    }
    Ok(table)
}

/// The physical addresses of the tables the root table lists: the XSDT's 64-bit entries when
/// the RSDP (revision 2 or later) names one, else the RSDT's 32-bit entries.
fn root_entries(mem: &impl PhysMemory, rsdp_addr: u64) -> Result<Vec<u64>, AcpiError> {
    let rsdp = read(mem, rsdp_addr, 20)?;
    if &rsdp[..8] != b"RSD PTR " {
        return Err(AcpiError::BadSignature {
            what: "RSDP",
            addr: rsdp_addr,
        });
    }
    if !sums_to_zero(&rsdp) {
        return Err(AcpiError::BadChecksum {
            what: "RSDP",
            addr: rsdp_addr,
        });
    }
    let revision = rsdp[15];
    let rsdt = u64::from(u32_at(&rsdp, 16));
    let xsdt = if revision >= 2 {
        let ext = read(mem, rsdp_addr, 36)?;
        let len = u32_at(&ext, 20);
        if !(36..=MAX_TABLE).contains(&len) {
            return Err(AcpiError::BadLength {
                what: "RSDP",
                addr: rsdp_addr,
                len,
            });
        }
        let ext = read(mem, rsdp_addr, len as usize)?;
        if !sums_to_zero(&ext) {
            return Err(AcpiError::BadChecksum {
                what: "extended RSDP",
                addr: rsdp_addr,
            });
        }
        u64_at(&ext, 24)
    } else {
        0
    };
    let (table, width) = if xsdt != 0 {
        (read_table(mem, xsdt, b"XSDT", "XSDT", HEADER)?, 8)
    } else {
        (read_table(mem, rsdt, b"RSDT", "RSDT", HEADER)?, 4)
    };
    Ok(table[HEADER..]
        .chunks_exact(width)
        .take(MAX_ROOT_ENTRIES)
        .map(|c| {
            if width == 8 {
                u64_at(c, 0)
            } else {
                u64::from(u32_at(c, 0))
            }
        })
        .collect())
}

/// Finds and parses the MADT from the RSDP at `rsdp_addr`.
pub fn read_madt(mem: &impl PhysMemory, rsdp_addr: Option<u64>) -> Result<Madt, AcpiError> {
    let rsdp_addr = rsdp_addr.ok_or(AcpiError::NoRsdp)?;
    for addr in root_entries(mem, rsdp_addr)? {
        let mut signature = [0u8; 4];
        // A root entry that points at unreadable memory is skipped: another may be the MADT.
        if !mem.read(addr, &mut signature) || &signature != b"APIC" {
            continue;
        }
        let table = read_table(mem, addr, b"APIC", "MADT", MADT_FIXED)?;
        return parse_madt(&table);
    }
    Err(AcpiError::NoMadt)
}

/// Parses a whole MADT (header included; signature and checksum already checked).
pub fn parse_madt(table: &[u8]) -> Result<Madt, AcpiError> {
    if table.len() < MADT_FIXED {
        return Err(AcpiError::BadLength {
            what: "MADT",
            addr: 0,
            len: table.len() as u32,
        });
    }
    let mut madt = Madt {
        local_apic_address: u32_at(table, HEADER),
        pcat_compat: u32_at(table, HEADER + 4) & 1 != 0,
        ..Madt::default()
    };
    let mut offset = MADT_FIXED;
    // Every entry is at least 2 bytes long, so this ends within the table's length.
    while offset + 2 <= table.len() {
        let kind = table[offset];
        let len = table[offset + 1];
        let end = offset + usize::from(len);
        let min = match kind {
            1 => 12,
            2 => 10,
            0 => 8,
            9 => 16,
            _ => 2,
        };
        if usize::from(len) < min || end > table.len() {
            return Err(AcpiError::BadEntry { offset, kind, len });
        }
        let e = &table[offset..end];
        match kind {
            0 | 9 => madt.processors += 1,
            1 => madt.io_apics.push(IoApicEntry {
                id: e[2],
                address: u32_at(e, 4),
                gsi_base: u32_at(e, 8),
            }),
            2 => madt.overrides.push(SourceOverride {
                bus: e[2],
                irq: e[3],
                gsi: u32_at(e, 4),
                flags: u16_at(e, 8),
            }),
            _ => {}
        }
        offset = end;
    }
    Ok(madt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Physical memory made of a few byte runs.
    #[derive(Default)]
    pub struct FakeMemory(pub BTreeMap<u64, Vec<u8>>);

    impl PhysMemory for FakeMemory {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            for (&start, bytes) in &self.0 {
                let end = start + bytes.len() as u64;
                if addr >= start && addr + buf.len() as u64 <= end {
                    let at = (addr - start) as usize;
                    buf.copy_from_slice(&bytes[at..at + buf.len()]);
                    return true;
                }
            }
            false
        }
    }

    fn fix_checksum(bytes: &mut [u8], at: usize) {
        bytes[at] = 0;
        let sum = bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        bytes[at] = 0u8.wrapping_sub(sum);
    }

    fn table(signature: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; HEADER];
        t[..4].copy_from_slice(signature);
        t[4..8].copy_from_slice(&((HEADER + body.len()) as u32).to_le_bytes());
        t[8] = 1;
        t[10..16].copy_from_slice(b"BOCHS ");
        t.extend_from_slice(body);
        fix_checksum(&mut t, 9);
        t
    }

    pub fn io_apic(id: u8, address: u32, gsi_base: u32) -> Vec<u8> {
        let mut e = vec![1, 12, id, 0];
        e.extend_from_slice(&address.to_le_bytes());
        e.extend_from_slice(&gsi_base.to_le_bytes());
        e
    }

    pub fn source_override(irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
        let mut e = vec![2, 10, 0, irq];
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e
    }

    fn local_apic(uid: u8, id: u8) -> Vec<u8> {
        vec![0, 8, uid, id, 1, 0, 0, 0]
    }

    /// The MADT of QEMU's pc machine (SeaBIOS): one CPU, the IOAPIC at 0xFEC00000, IRQ 0 on
    /// GSI 2, and the PCI IRQs 5, 9, 10, 11 level-triggered, active-high.
    pub fn qemu_madt() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&0xFEE0_0000u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend(local_apic(0, 0));
        body.extend(io_apic(0, 0xFEC0_0000, 0));
        body.extend(source_override(0, 2, 0));
        for irq in [5, 9, 10, 11] {
            body.extend(source_override(irq, u32::from(irq), 0x000D));
        }
        body.extend([4, 6, 0xFF, 0, 0, 1]); // local APIC NMI on LINT1
        table(b"APIC", &body)
    }

    fn rsdp_v0(rsdt: u32) -> Vec<u8> {
        let mut r = b"RSD PTR ".to_vec();
        r.push(0);
        r.extend_from_slice(b"BOCHS ");
        r.push(0);
        r.extend_from_slice(&rsdt.to_le_bytes());
        fix_checksum(&mut r, 8);
        r
    }

    fn rsdp_v2(rsdt: u32, xsdt: u64) -> Vec<u8> {
        let mut r = b"RSD PTR ".to_vec();
        r.push(0);
        r.extend_from_slice(b"OVMF  ");
        r.push(2);
        r.extend_from_slice(&rsdt.to_le_bytes());
        r.extend_from_slice(&36u32.to_le_bytes());
        r.extend_from_slice(&xsdt.to_le_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        fix_checksum(&mut r[..20], 8);
        fix_checksum(&mut r, 32);
        r
    }

    /// RSDP (v0) at 0xF5A00 -> RSDT at 0x7FE0000 -> FACP, then the MADT at 0x7FE1000.
    fn bios_memory(madt: Vec<u8>) -> FakeMemory {
        let mut m = FakeMemory::default();
        m.0.insert(0xF5A00, rsdp_v0(0x7FE_0000));
        let mut entries = Vec::new();
        entries.extend_from_slice(&0x7FE_2000u32.to_le_bytes());
        entries.extend_from_slice(&0x7FE_1000u32.to_le_bytes());
        m.0.insert(0x7FE_0000, table(b"RSDT", &entries));
        m.0.insert(0x7FE_1000, madt);
        m.0.insert(0x7FE_2000, table(b"FACP", &[0u8; 80]));
        m
    }

    #[test]
    fn reads_qemus_madt_through_the_rsdt() {
        let madt = read_madt(&bios_memory(qemu_madt()), Some(0xF5A00)).unwrap();
        assert_eq!(madt.local_apic_address, 0xFEE0_0000);
        assert!(madt.pcat_compat);
        assert_eq!(madt.processors, 1);
        assert_eq!(
            madt.io_apics,
            [IoApicEntry {
                id: 0,
                address: 0xFEC0_0000,
                gsi_base: 0
            }]
        );
        assert_eq!(madt.overrides.len(), 5);
        assert_eq!(
            madt.overrides[4],
            SourceOverride {
                bus: 0,
                irq: 11,
                gsi: 11,
                flags: 0xD
            }
        );
    }

    #[test]
    fn prefers_the_xsdt_of_a_revision_2_rsdp() {
        let mut m = FakeMemory::default();
        m.0.insert(0xE0000, rsdp_v2(0xDEAD_0000, 0x1_0000_0000));
        let mut entries = Vec::new();
        entries.extend_from_slice(&0x1_0000_1000u64.to_le_bytes());
        m.0.insert(0x1_0000_0000, table(b"XSDT", &entries));
        m.0.insert(0x1_0000_1000, qemu_madt());
        let madt = read_madt(&m, Some(0xE0000)).unwrap();
        assert_eq!(madt.io_apics.len(), 1);
    }

    #[test]
    fn missing_pieces_are_errors() {
        let m = bios_memory(qemu_madt());
        assert_eq!(read_madt(&m, None), Err(AcpiError::NoRsdp));
        assert_eq!(
            read_madt(&m, Some(0x1234)),
            Err(AcpiError::Unreadable { addr: 0x1234 })
        );
        assert_eq!(
            read_madt(&m, Some(0x7FE_2000)),
            Err(AcpiError::BadSignature {
                what: "RSDP",
                addr: 0x7FE_2000
            })
        );
        // A root table without an MADT.
        let mut m = bios_memory(qemu_madt());
        m.0.insert(0x7FE_1000, table(b"HPET", &[0u8; 20]));
        assert_eq!(read_madt(&m, Some(0xF5A00)), Err(AcpiError::NoMadt));
        // Unreadable root entries are skipped, not fatal.
        let mut m = bios_memory(qemu_madt());
        m.0.remove(&0x7FE_2000);
        assert!(read_madt(&m, Some(0xF5A00)).is_ok());
    }

    #[test]
    fn bad_checksums_are_refused() {
        let mut m = bios_memory(qemu_madt());
        m.0.get_mut(&0xF5A00).unwrap()[9] ^= 1;
        assert!(matches!(
            read_madt(&m, Some(0xF5A00)),
            Err(AcpiError::BadChecksum { what: "RSDP", .. })
        ));
        let mut madt = qemu_madt();
        madt[50] ^= 0x40;
        let m = bios_memory(madt);
        assert!(matches!(
            read_madt(&m, Some(0xF5A00)),
            Err(AcpiError::BadChecksum { what: "MADT", .. })
        ));
    }

    #[test]
    fn impossible_lengths_are_refused() {
        let mut madt = qemu_madt();
        madt[4..8].copy_from_slice(&(MAX_TABLE + 1).to_le_bytes());
        let m = bios_memory(madt);
        assert!(matches!(
            read_madt(&m, Some(0xF5A00)),
            Err(AcpiError::BadLength { what: "MADT", .. })
        ));
        let madt = table(b"APIC", &[0, 0]);
        let m = bios_memory(madt);
        assert!(matches!(
            read_madt(&m, Some(0xF5A00)),
            Err(AcpiError::BadLength { .. })
        ));
    }

    #[test]
    fn broken_entries_never_hang_nor_read_past_the_table() {
        let fixed = [0u8; 8];
        for entry in [
            vec![2, 0],                   // zero length: would loop forever
            vec![1, 1],                   // shorter than its header
            vec![1, 8, 0, 0, 0, 0, 0, 0], // an IOAPIC entry cut short
            vec![2, 40, 0, 11, 0, 0],     // runs past the end
            vec![0x80, 200, 1, 2, 3, 4],  // OEM entry longer than the table
        ] {
            let mut body = fixed.to_vec();
            body.extend_from_slice(&entry);
            let t = table(b"APIC", &body);
            assert!(
                matches!(parse_madt(&t), Err(AcpiError::BadEntry { offset: 44, .. })),
                "{entry:?}"
            );
        }
        // A trailing odd byte is ignored; unknown entry types are skipped.
        let mut body = fixed.to_vec();
        body.extend([0x11, 4, 0, 0]);
        body.extend(io_apic(2, 0xFEC0_1000, 24));
        body.push(7);
        let madt = parse_madt(&table(b"APIC", &body)).unwrap();
        assert_eq!(madt.io_apics[0].gsi_base, 24);
    }

    #[test]
    fn errors_read_well() {
        let e = AcpiError::BadEntry {
            offset: 44,
            kind: 2,
            len: 0,
        };
        assert_eq!(
            e.to_string(),
            "ACPI: MADT entry of type 2 at offset 44 has a bad length 0"
        );
        assert!(AcpiError::NoRsdp.to_string().contains("RSDP"));
    }
}
