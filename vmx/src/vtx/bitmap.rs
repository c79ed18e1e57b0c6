//! The VMX MSR bitmap and I/O bitmaps (Intel SDM vol. 3C 25.6.9 and 25.6.4), as bit positions
//! over byte slices the kernel allocates (each a 4 KiB page).
//!
//! - MSR bitmap (4 KiB, "use MSR bitmaps" control): one bit per MSR in four 1 KiB parts: read
//!   low (MSRs 0000_0000h-0000_1FFFh) at byte 0, read high (C000_0000h-C000_1FFFh) at 400h,
//!   write low at 800h, write high at C00h. A set bit makes RDMSR/WRMSR exit; MSRs outside both
//!   ranges always exit (SDM 26.1.3).
//! - I/O bitmaps A (ports 0000h-7FFFh) and B (8000h-FFFFh), 4 KiB each ("use I/O bitmaps"): a
//!   set bit makes IN/OUT of that port exit; an access whose bytes span a set bit, or that wraps
//!   past FFFFh, exits (SDM 26.1.3).

#![forbid(unsafe_code)]

use crate::exit::IoSize;
pub use crate::svm::bitmap::{BitPosition, BitmapError};

/// Size of the MSR bitmap and of each I/O bitmap.
pub const BITMAP_PAGE: usize = 4096;

/// Which I/O bitmap holds a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBitmap {
    /// Ports 0000h-7FFFh.
    A,
    /// Ports 8000h-FFFFh.
    B,
}

/// The bitmap and bit of `port`.
pub const fn io_position(port: u16) -> (IoBitmap, BitPosition) {
    let which = if port < 0x8000 {
        IoBitmap::A
    } else {
        IoBitmap::B
    };
    let index = (port & 0x7FFF) as usize;
    (
        which,
        BitPosition {
            byte: index / 8,
            bit: (index % 8) as u8,
        },
    )
}

fn check(map: &[u8]) -> Result<(), BitmapError> {
    if map.len() < BITMAP_PAGE {
        Err(BitmapError::TooSmall {
            len: map.len(),
            needed: BITMAP_PAGE,
        })
    } else {
        Ok(())
    }
}

fn set_bit(map: &mut [u8], p: BitPosition, on: bool) {
    if on {
        map[p.byte] |= 1 << p.bit;
    } else {
        map[p.byte] &= !(1 << p.bit);
    }
}

fn get_bit(map: &[u8], p: BitPosition) -> bool {
    map[p.byte] & (1 << p.bit) != 0
}

/// Sets whether `port` exits, in whichever of `a` / `b` holds it.
pub fn io_set(a: &mut [u8], b: &mut [u8], port: u16, intercept: bool) -> Result<(), BitmapError> {
    check(a)?;
    check(b)?;
    let (which, p) = io_position(port);
    set_bit(if which == IoBitmap::A { a } else { b }, p, intercept);
    Ok(())
}

/// Whether an access of `size` at `port` exits: any of its ports' bits set, or the access wraps
/// past FFFFh.
pub fn io_intercepts(a: &[u8], b: &[u8], port: u16, size: IoSize) -> Result<bool, BitmapError> {
    check(a)?;
    check(b)?;
    let last = u32::from(port) + u32::from(size.bytes()) - 1;
    if last > 0xFFFF {
        return Ok(true);
    }
    Ok((u32::from(port)..=last).any(|p| {
        let (which, pos) = io_position(p as u16);
        get_bit(if which == IoBitmap::A { a } else { b }, pos)
    }))
}

/// The read-exit and write-exit bits of `msr` in the MSR bitmap, or `None` outside the two
/// covered ranges.
pub const fn msr_position(msr: u32) -> Option<(BitPosition, BitPosition)> {
    let (read_base, offset) = match msr {
        0x0000_0000..=0x0000_1FFF => (0x000, msr),
        0xC000_0000..=0xC000_1FFF => (0x400, msr - 0xC000_0000),
        _ => return None,
    };
    let byte = read_base + offset as usize / 8;
    let bit = (offset % 8) as u8;
    Some((
        BitPosition { byte, bit },
        BitPosition {
            byte: byte + 0x800,
            bit,
        },
    ))
}

/// Sets whether RDMSR and WRMSR of `msr` exit. Asking to intercept an uncovered MSR is accepted
/// (it always exits); asking to pass one through is [`BitmapError::MsrNotCovered`].
pub fn msr_set(
    map: &mut [u8],
    msr: u32,
    intercept_read: bool,
    intercept_write: bool,
) -> Result<(), BitmapError> {
    check(map)?;
    match msr_position(msr) {
        Some((r, w)) => {
            set_bit(map, r, intercept_read);
            set_bit(map, w, intercept_write);
            Ok(())
        }
        None if intercept_read && intercept_write => Ok(()),
        None => Err(BitmapError::MsrNotCovered(msr)),
    }
}

/// Whether RDMSR (`write == false`) or WRMSR of `msr` exits.
pub fn msr_intercepts(map: &[u8], msr: u32, write: bool) -> Result<bool, BitmapError> {
    check(map)?;
    Ok(match msr_position(msr) {
        Some((r, w)) => get_bit(map, if write { w } else { r }),
        None => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn msr_positions_per_sdm_layout() {
        // EFER C000_0080h: read-high byte 400h + 10h, write-high C10h, bit 0.
        let (r, w) = msr_position(0xC000_0080).unwrap();
        assert_eq!(
            r,
            BitPosition {
                byte: 0x410,
                bit: 0
            }
        );
        assert_eq!(
            w,
            BitPosition {
                byte: 0xC10,
                bit: 0
            }
        );
        // IA32_APIC_BASE 1Bh: byte 3, bit 3; write at 803h.
        let (r, w) = msr_position(0x1B).unwrap();
        assert_eq!(r, BitPosition { byte: 3, bit: 3 });
        assert_eq!(
            w,
            BitPosition {
                byte: 0x803,
                bit: 3
            }
        );
        assert_eq!(msr_position(0x1FFF).unwrap().0.byte, 0x3FF);
        assert_eq!(msr_position(0xC000_1FFF).unwrap().1.byte, 0xFFF);
        assert_eq!(msr_position(0x2000), None);
        assert_eq!(msr_position(0xC001_0000), None);
    }

    #[test]
    fn msr_set_and_query() {
        let mut m = vec![0u8; BITMAP_PAGE];
        msr_set(&mut m, 0x277, false, true).unwrap();
        assert!(!msr_intercepts(&m, 0x277, false).unwrap());
        assert!(msr_intercepts(&m, 0x277, true).unwrap());
        assert!(msr_intercepts(&m, 0xC001_0015, false).unwrap());
        assert_eq!(
            msr_set(&mut m, 0xC001_0015, false, false),
            Err(BitmapError::MsrNotCovered(0xC001_0015))
        );
        assert!(msr_set(&mut [0u8; 10], 0, true, true).is_err());
    }

    #[test]
    fn io_positions_and_queries() {
        assert_eq!(
            io_position(0x3F8),
            (IoBitmap::A, BitPosition { byte: 0x7F, bit: 0 })
        );
        assert_eq!(
            io_position(0x8000),
            (IoBitmap::B, BitPosition { byte: 0, bit: 0 })
        );
        assert_eq!(
            io_position(0xFFFF),
            (
                IoBitmap::B,
                BitPosition {
                    byte: 0xFFF,
                    bit: 7
                }
            )
        );
        let mut a = vec![0u8; BITMAP_PAGE];
        let mut b = vec![0u8; BITMAP_PAGE];
        io_set(&mut a, &mut b, 0x8000, true).unwrap();
        assert_eq!(b[0], 1);
        // A dword at 7FFEh spans both bitmaps and reaches 8000h.
        assert!(io_intercepts(&a, &b, 0x7FFE, IoSize::Dword).unwrap());
        assert!(!io_intercepts(&a, &b, 0x7FFE, IoSize::Word).unwrap());
        // Wrapping past FFFFh always exits.
        assert!(io_intercepts(&a, &b, 0xFFFF, IoSize::Word).unwrap());
        assert!(!io_intercepts(&a, &b, 0xFFFF, IoSize::Byte).unwrap());
        assert!(io_intercepts(&a[..5], &b, 0, IoSize::Byte).is_err());
    }
}
