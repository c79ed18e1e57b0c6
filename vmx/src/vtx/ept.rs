//! The EPT pointer (Intel SDM vol. 3C 25.6.11, table 25-9) and the INVEPT/INVVPID operands
//! (SDM vol. 2C, INVEPT and INVVPID; vol. 3C 29.4.3).
//!
//! EPTP layout: bits 2:0 memory type of the paging structures (0 UC, 6 WB; A.10 says which the
//! CPU supports: IA32_VMX_EPT_VPID_CAP bit 8 UC, bit 14 WB), bits 5:3 page-walk length minus 1
//! (cap bit 6: 4 levels, bit 7: 5 levels), bit 6 enable accessed/dirty flags (cap bit 21), bit 7
//! supervisor shadow-stack enforcement, bits 11:8 reserved, bits N-1:12 physical address of the
//! PML4 (or PML5) table, bits 63:N reserved (N = MAXPHYADDR, at most 52).

#![forbid(unsafe_code)]

use core::fmt;

/// Memory type used to access the EPT paging structures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EptMemoryType {
    Uncacheable = 0,
    WriteBack = 6,
}

/// Why an EPTP cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EptpError {
    /// The root table address is not 4 KiB aligned.
    Misaligned(u64),
    /// The root table address has bits at or above bit 52 (beyond any MAXPHYADDR).
    AddressTooWide(u64),
    /// Walk lengths other than 4 and 5 levels do not exist.
    Levels(u8),
}

impl fmt::Display for EptpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned(a) => write!(f, "EPT root {a:#x} is not 4 KiB aligned"),
            Self::AddressTooWide(a) => write!(f, "EPT root {a:#x} is beyond 52 address bits"),
            Self::Levels(n) => write!(f, "EPT page-walk length {n} (only 4 or 5 exist)"),
        }
    }
}

/// EPTP bit 6.
pub const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;
const EPTP_WALK_SHIFT: u32 = 3;
const PHYS_ADDR_LIMIT: u64 = 1 << 52;

/// Builds an EPTP for the root table at host physical address `root`, walked with `levels`
/// levels (4 or 5), accessed through `memory_type`, with accessed/dirty flags when
/// `accessed_dirty` (required for D-bit dirty tracking; only if IA32_VMX_EPT_VPID_CAP bit 21).
pub fn make_eptp(
    root: u64,
    memory_type: EptMemoryType,
    levels: u8,
    accessed_dirty: bool,
) -> Result<u64, EptpError> {
    if root & 0xFFF != 0 {
        return Err(EptpError::Misaligned(root));
    }
    if root >= PHYS_ADDR_LIMIT {
        return Err(EptpError::AddressTooWide(root));
    }
    if !(4..=5).contains(&levels) {
        return Err(EptpError::Levels(levels));
    }
    let mut eptp = root | memory_type as u64 | (u64::from(levels) - 1) << EPTP_WALK_SHIFT;
    if accessed_dirty {
        eptp |= EPTP_ACCESSED_DIRTY;
    }
    Ok(eptp)
}

/// INVEPT types (register operand).
pub mod invept {
    /// Invalidate mappings tagged with the EPTP in the descriptor.
    pub const SINGLE_CONTEXT: u64 = 1;
    /// Invalidate mappings of every EPTP.
    pub const ALL_CONTEXT: u64 = 2;
}

/// INVVPID types (register operand).
pub mod invvpid {
    pub const INDIVIDUAL_ADDRESS: u64 = 0;
    pub const SINGLE_CONTEXT: u64 = 1;
    pub const ALL_CONTEXT: u64 = 2;
    pub const SINGLE_CONTEXT_RETAINING_GLOBALS: u64 = 3;
}

/// The 128-bit INVEPT descriptor: the EPTP in bits 63:0, bits 127:64 reserved (zero).
pub const fn invept_descriptor(eptp: u64) -> [u64; 2] {
    [eptp, 0]
}

/// The 128-bit INVVPID descriptor: VPID in bits 15:0, bits 63:16 reserved (zero), the linear
/// address in bits 127:64 (used by the individual-address type only).
pub const fn invvpid_descriptor(vpid: u16, linear_address: u64) -> [u64; 2] {
    [vpid as u64, linear_address]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_back_four_levels_with_ad() {
        assert_eq!(
            make_eptp(0x1234_5000, EptMemoryType::WriteBack, 4, true),
            Ok(0x1234_505E)
        );
        assert_eq!(
            make_eptp(0x1234_5000, EptMemoryType::WriteBack, 4, false),
            Ok(0x1234_501E)
        );
        assert_eq!(
            make_eptp(0x1000, EptMemoryType::Uncacheable, 5, false),
            Ok(0x1020)
        );
    }

    #[test]
    fn bad_roots_and_levels() {
        assert_eq!(
            make_eptp(0x1234_5008, EptMemoryType::WriteBack, 4, true),
            Err(EptpError::Misaligned(0x1234_5008))
        );
        assert_eq!(
            make_eptp(1 << 52, EptMemoryType::WriteBack, 4, true),
            Err(EptpError::AddressTooWide(1 << 52))
        );
        for levels in [0, 1, 2, 3, 6, 255] {
            assert_eq!(
                make_eptp(0, EptMemoryType::WriteBack, levels, false),
                Err(EptpError::Levels(levels))
            );
        }
    }

    #[test]
    fn descriptors() {
        assert_eq!(invept_descriptor(0x505E), [0x505E, 0]);
        assert_eq!(
            invvpid_descriptor(7, 0xFFFF_8000_0000_0000),
            [7, 0xFFFF_8000_0000_0000]
        );
    }
}
