//! The SVM I/O permission map (IOPM) and MSR permission map (MSRPM), AMD APM vol. 2 15.10.1 and
//! 15.11. Both live in physically contiguous host memory the kernel allocates; these helpers work
//! on byte slices over that memory.
//!
//! - IOPM: 12 KiB, one bit per port; bit `p` set intercepts port `p`. An access of N bytes at
//!   port p checks the bits of p..p+N-1, which is why the map extends past 8 KiB: a 4-byte access
//!   at port FFFFh checks bits 10000h-10002h in the third page (APM 15.10.1).
//! - MSRPM: 8 KiB, two bits per MSR (the even bit intercepts RDMSR, the odd bit WRMSR), in three
//!   2 KiB vectors: 0000_0000h-0000_1FFFh at byte 0, C000_0000h-C000_1FFFh at byte 800h,
//!   C001_0000h-C001_1FFFh at byte 1000h; bytes 1800h-1FFFh are reserved. MSRs outside these
//!   ranges are always intercepted (APM 15.11).

#![forbid(unsafe_code)]

use core::fmt;

use crate::exit::IoSize;

/// Size of the IOPM in bytes.
pub const IOPM_SIZE: usize = 12 * 1024;
/// Size of the MSRPM in bytes.
pub const MSRPM_SIZE: usize = 8 * 1024;

/// A bit in a permission map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitPosition {
    /// Byte offset in the map.
    pub byte: usize,
    /// Bit within that byte (0-7).
    pub bit: u8,
}

impl BitPosition {
    const fn of(bit_index: usize) -> Self {
        Self {
            byte: bit_index / 8,
            bit: (bit_index % 8) as u8,
        }
    }

    fn get(self, map: &[u8]) -> bool {
        map[self.byte] & (1 << self.bit) != 0
    }

    fn set(self, map: &mut [u8], on: bool) {
        if on {
            map[self.byte] |= 1 << self.bit;
        } else {
            map[self.byte] &= !(1 << self.bit);
        }
    }
}

/// Why a permission-map operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapError {
    /// The slice is shorter than the map.
    TooSmall { len: usize, needed: usize },
    /// The MSR is outside the ranges the map covers: the CPU always intercepts it, so it cannot
    /// be passed through.
    MsrNotCovered(u32),
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooSmall { len, needed } => {
                write!(f, "permission map of {len} bytes, {needed} needed")
            }
            Self::MsrNotCovered(msr) => write!(
                f,
                "MSR {msr:#x} is outside the permission map and always intercepted"
            ),
        }
    }
}

fn check_len(map: &[u8], needed: usize) -> Result<(), BitmapError> {
    if map.len() < needed {
        Err(BitmapError::TooSmall {
            len: map.len(),
            needed,
        })
    } else {
        Ok(())
    }
}

/// The IOPM bit of `port`.
pub const fn iopm_position(port: u16) -> BitPosition {
    BitPosition::of(port as usize)
}

/// Fills the whole IOPM: `intercept_all` intercepts every port, `false` passes every port through.
pub fn iopm_fill(iopm: &mut [u8], intercept_all: bool) -> Result<(), BitmapError> {
    check_len(iopm, IOPM_SIZE)?;
    iopm[..IOPM_SIZE].fill(if intercept_all { 0xFF } else { 0 });
    Ok(())
}

/// Intercepts (or passes through) ports `first..first + count`, clamped at FFFFh.
pub fn iopm_set(
    iopm: &mut [u8],
    first: u16,
    count: u32,
    intercept: bool,
) -> Result<(), BitmapError> {
    check_len(iopm, IOPM_SIZE)?;
    let end = (u32::from(first) + count).min(0x1_0000);
    for port in u32::from(first)..end {
        BitPosition::of(port as usize).set(iopm, intercept);
    }
    Ok(())
}

/// Whether an access of `size` at `port` is intercepted: any of its bytes' bits set, including
/// the bits past FFFFh in the third page (APM 15.10.1).
pub fn iopm_intercepts(iopm: &[u8], port: u16, size: IoSize) -> Result<bool, BitmapError> {
    check_len(iopm, IOPM_SIZE)?;
    let first = usize::from(port);
    Ok((first..first + usize::from(size.bytes())).any(|b| BitPosition::of(b).get(iopm)))
}

/// The MSRPM bits of `msr`: (read bit, write bit), or `None` outside the three covered ranges.
pub const fn msrpm_position(msr: u32) -> Option<(BitPosition, BitPosition)> {
    let (range_base_byte, offset) = match msr {
        0x0000_0000..=0x0000_1FFF => (0x000, msr),
        0xC000_0000..=0xC000_1FFF => (0x800, msr - 0xC000_0000),
        0xC001_0000..=0xC001_1FFF => (0x1000, msr - 0xC001_0000),
        _ => return None,
    };
    let bit_index = range_base_byte * 8 + offset as usize * 2;
    Some((BitPosition::of(bit_index), BitPosition::of(bit_index + 1)))
}

/// Fills the whole MSRPM: `intercept_all` intercepts every covered MSR.
pub fn msrpm_fill(msrpm: &mut [u8], intercept_all: bool) -> Result<(), BitmapError> {
    check_len(msrpm, MSRPM_SIZE)?;
    msrpm[..MSRPM_SIZE].fill(if intercept_all { 0xFF } else { 0 });
    Ok(())
}

/// Sets whether RDMSR and WRMSR of `msr` are intercepted. Asking to intercept an MSR outside the
/// map is accepted (the CPU always does); asking to pass one through is
/// [`BitmapError::MsrNotCovered`].
pub fn msrpm_set(
    msrpm: &mut [u8],
    msr: u32,
    intercept_read: bool,
    intercept_write: bool,
) -> Result<(), BitmapError> {
    check_len(msrpm, MSRPM_SIZE)?;
    match msrpm_position(msr) {
        Some((r, w)) => {
            r.set(msrpm, intercept_read);
            w.set(msrpm, intercept_write);
            Ok(())
        }
        None if intercept_read && intercept_write => Ok(()),
        None => Err(BitmapError::MsrNotCovered(msr)),
    }
}

/// Whether RDMSR (`write == false`) or WRMSR of `msr` is intercepted.
pub fn msrpm_intercepts(msrpm: &[u8], msr: u32, write: bool) -> Result<bool, BitmapError> {
    check_len(msrpm, MSRPM_SIZE)?;
    Ok(match msrpm_position(msr) {
        Some((r, w)) => (if write { w } else { r }).get(msrpm),
        None => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn iopm_positions() {
        assert_eq!(iopm_position(0), BitPosition { byte: 0, bit: 0 });
        assert_eq!(iopm_position(0x3F8), BitPosition { byte: 0x7F, bit: 0 });
        assert_eq!(iopm_position(0x3FD), BitPosition { byte: 0x7F, bit: 5 });
        assert_eq!(
            iopm_position(0xFFFF),
            BitPosition {
                byte: 0x1FFF,
                bit: 7
            }
        );
    }

    #[test]
    fn iopm_set_and_query() {
        let mut m = vec![0u8; IOPM_SIZE];
        iopm_set(&mut m, 0x3F8, 8, true).unwrap();
        assert!(iopm_intercepts(&m, 0x3F8, IoSize::Byte).unwrap());
        assert!(iopm_intercepts(&m, 0x3FF, IoSize::Byte).unwrap());
        assert!(!iopm_intercepts(&m, 0x400, IoSize::Byte).unwrap());
        // A word access at 3F7h touches 3F8h.
        assert!(iopm_intercepts(&m, 0x3F7, IoSize::Word).unwrap());
        assert!(!iopm_intercepts(&m, 0x3F6, IoSize::Word).unwrap());
        iopm_set(&mut m, 0x3F8, 8, false).unwrap();
        assert!(m.iter().all(|&b| b == 0));
    }

    #[test]
    fn iopm_third_page_covers_wrap() {
        let mut m = vec![0u8; IOPM_SIZE];
        // Only the bits past FFFFh set: a dword at FFFFh is intercepted, a byte is not.
        m[0x2000] = 0x07;
        assert!(iopm_intercepts(&m, 0xFFFF, IoSize::Dword).unwrap());
        assert!(!iopm_intercepts(&m, 0xFFFF, IoSize::Byte).unwrap());
        // Setting a range is clamped at FFFFh and never touches the third page.
        let mut m = vec![0u8; IOPM_SIZE];
        iopm_set(&mut m, 0xFFFE, 100, true).unwrap();
        assert_eq!(m[0x1FFF], 0xC0);
        assert!(m[0x2000..].iter().all(|&b| b == 0));
        iopm_fill(&mut m, true).unwrap();
        assert!(m.iter().all(|&b| b == 0xFF));
    }

    #[test]
    fn msrpm_positions_per_apm_ranges() {
        // EFER (C000_0080h): second vector, MSR offset 80h -> bits 100h/101h -> byte 820h.
        let (r, w) = msrpm_position(0xC000_0080).unwrap();
        assert_eq!(
            r,
            BitPosition {
                byte: 0x820,
                bit: 0
            }
        );
        assert_eq!(
            w,
            BitPosition {
                byte: 0x820,
                bit: 1
            }
        );
        // IA32_APIC_BASE (1Bh): bits 36h/37h -> byte 6, bits 6/7.
        let (r, w) = msrpm_position(0x1B).unwrap();
        assert_eq!(r, BitPosition { byte: 6, bit: 6 });
        assert_eq!(w, BitPosition { byte: 6, bit: 7 });
        // Last MSR of each vector ends its 2 KiB.
        assert_eq!(msrpm_position(0x1FFF).unwrap().1.byte, 0x7FF);
        assert_eq!(msrpm_position(0xC000_1FFF).unwrap().1.byte, 0xFFF);
        let (r, w) = msrpm_position(0xC001_1FFF).unwrap();
        assert_eq!((r.byte, r.bit, w.bit), (0x17FF, 6, 7));
        assert_eq!(msrpm_position(0xC001_0000).unwrap().0.byte, 0x1000);
        // Gaps.
        assert_eq!(msrpm_position(0x2000), None);
        assert_eq!(msrpm_position(0xC000_2000), None);
        assert_eq!(msrpm_position(0xC001_2000), None);
        assert_eq!(msrpm_position(0xBFFF_FFFF), None);
    }

    #[test]
    fn msrpm_set_and_query() {
        let mut m = vec![0u8; MSRPM_SIZE];
        msrpm_set(&mut m, 0xC000_0080, false, true).unwrap();
        assert!(!msrpm_intercepts(&m, 0xC000_0080, false).unwrap());
        assert!(msrpm_intercepts(&m, 0xC000_0080, true).unwrap());
        assert!(
            msrpm_intercepts(&m, 0x4000_0000, false).unwrap(),
            "uncovered"
        );
        assert_eq!(
            msrpm_set(&mut m, 0x4000_0000, false, false),
            Err(BitmapError::MsrNotCovered(0x4000_0000))
        );
        assert_eq!(msrpm_set(&mut m, 0x4000_0000, true, true), Ok(()));
        msrpm_fill(&mut m, false).unwrap();
        assert!(!msrpm_intercepts(&m, 0xC000_0080, true).unwrap());
    }

    #[test]
    fn short_slices_are_errors_not_panics() {
        let mut m = vec![0u8; 100];
        assert_eq!(
            iopm_set(&mut m, 0, 1, true),
            Err(BitmapError::TooSmall {
                len: 100,
                needed: IOPM_SIZE
            })
        );
        assert!(iopm_intercepts(&m, 0, IoSize::Byte).is_err());
        assert!(iopm_fill(&mut m, true).is_err());
        assert!(msrpm_set(&mut m, 0, true, true).is_err());
        assert!(msrpm_intercepts(&m, 0, true).is_err());
        assert!(msrpm_fill(&mut m, true).is_err());
    }
}
