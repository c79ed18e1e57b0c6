//! Every length up to a few blocks, at every alignment of source and destination, against
//! `core::ptr::copy` / `write_bytes` of the host's C library; overlaps in both directions.

use super::*;

/// Lengths that cover the head, block, word and tail loops and their boundaries.
fn lengths() -> impl Iterator<Item = usize> {
    (0..=3 * BLOCK + WORD + 1).chain([4096, 4096 + 7, 65536 + 3])
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn memcpy_copies_every_length_at_every_alignment() {
    for n in lengths() {
        for src_off in 0..WORD {
            for dst_off in 0..WORD {
                let src = pattern(n + src_off, 1);
                // Guard bytes around the destination catch writes outside it.
                let mut dst = vec![0xAA; n + dst_off + 16];
                let returned = unsafe {
                    memcpy(
                        dst.as_mut_ptr().add(dst_off).cast(),
                        src.as_ptr().add(src_off).cast(),
                        n,
                    )
                };
                assert_eq!(returned, unsafe { dst.as_mut_ptr().add(dst_off).cast() });
                assert_eq!(&dst[dst_off..dst_off + n], &src[src_off..], "n={n}");
                assert!(dst[..dst_off].iter().all(|&b| b == 0xAA), "n={n} head");
                assert!(dst[dst_off + n..].iter().all(|&b| b == 0xAA), "n={n} tail");
            }
        }
    }
}

#[test]
fn memmove_handles_overlaps_in_both_directions() {
    for n in (0..=2 * BLOCK + 9).chain([4096 + 5]) {
        // Destination below, equal to, and above the source, by up to two blocks.
        for shift in -(2 * BLOCK as isize + 1)..=(2 * BLOCK as isize + 1) {
            let base = 2 * BLOCK + 3;
            let mut ours = pattern(n + 2 * base + 8, 7);
            let mut reference = ours.clone();
            let from = base;
            let to = (base as isize + shift) as usize;
            unsafe {
                let p = ours.as_mut_ptr();
                memmove(p.add(to).cast(), p.add(from).cast(), n);
                let r = reference.as_mut_ptr();
                core::ptr::copy(r.add(from), r.add(to), n);
            }
            assert_eq!(ours, reference, "n={n} shift={shift}");
        }
    }
}

#[test]
fn memset_fills_every_length_at_every_alignment() {
    for n in lengths() {
        for off in 0..WORD {
            let mut ours = vec![0x55u8; n + off + 16];
            let mut reference = ours.clone();
            let returned = unsafe { memset(ours.as_mut_ptr().add(off).cast(), 0x1C3, n) };
            assert_eq!(returned, unsafe { ours.as_mut_ptr().add(off).cast() });
            // Like C, only the low byte of the value counts.
            unsafe { core::ptr::write_bytes(reference.as_mut_ptr().add(off), 0xC3, n) };
            assert_eq!(ours, reference, "n={n} off={off}");
        }
    }
}
