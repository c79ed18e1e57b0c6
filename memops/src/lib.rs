//! `memcpy`, `memmove` and `memset` for the bare-metal kernel, in place of the `rep movsq` /
//! `rep stosq` versions of `compiler_builtins` (weak symbols: these win at link time).
//!
//! Why: under QEMU's TCG, the emulator the nodes run on in CI and in `./qemu-run.sh`, every
//! iteration of a `rep` string instruction runs as its own translated block. Measured on a node
//! (4 MiB, TSC-timed): `copy_from_slice` through the `rep movsq` memcpy 390 MB/s, this crate's
//! loop of eight 64-bit loads then eight stores 2.1 GB/s. Every byte a node moves goes through
//! several copies (NIC buffers, socket buffers, migration frames, guest memory), so copy speed
//! bounds the migration stream and the NIC throughput. On hardware the word loop keeps up with
//! `rep movsq` for the page-sized copies that dominate here.
//!
//! The symbols are exported only when building for bare metal (`target_os = "none"`); on the
//! host the same functions are ordinary ones, tested against a reference byte by byte.
//! The stores are volatile, and the crate is `no_builtins`, so that LLVM cannot recognise the
//! loops as a copy or a fill and turn them back into calls to the functions they implement.
//!
//! Must never depend on anything (not even `alloc`): everything else calls into it.

#![cfg_attr(not(test), no_std)]
#![no_builtins]

#[cfg(test)]
mod tests;

use core::ffi::{c_int, c_void};

const WORD: usize = core::mem::size_of::<u64>();
/// Words moved per loop iteration: fewer iterations is what makes the loop fast under TCG.
const UNROLL: usize = 8;
const BLOCK: usize = WORD * UNROLL;

/// Copies `n` bytes forwards, `dest` at or below `src` when they overlap.
///
/// # Safety
/// `src` readable and `dest` writable for `n` bytes; if they overlap, `dest <= src`.
pub unsafe fn copy_forward(dest: *mut u8, src: *const u8, n: usize) {
    let mut i = 0;
    // SAFETY (every access below): i + size <= n, and the caller's ranges cover n bytes.
    // Word stores are aligned (the head loop aligns `dest`); word loads may be unaligned.
    // Overlap with dest <= src is safe forwards: each block is loaded whole before it is stored,
    // and a store never reaches a byte that a later load still needs.
    while i < n && !(dest as usize + i).is_multiple_of(WORD) {
        unsafe { dest.add(i).write_volatile(src.add(i).read()) };
        i += 1;
    }
    while i + BLOCK <= n {
        unsafe {
            let s = src.add(i).cast::<u64>();
            let d = dest.add(i).cast::<u64>();
            let w: [u64; UNROLL] = core::array::from_fn(|k| s.add(k).read_unaligned());
            for (k, word) in w.into_iter().enumerate() {
                d.add(k).write_volatile(word);
            }
        }
        i += BLOCK;
    }
    while i + WORD <= n {
        unsafe {
            let word = src.add(i).cast::<u64>().read_unaligned();
            dest.add(i).cast::<u64>().write_volatile(word);
        }
        i += WORD;
    }
    while i < n {
        unsafe { dest.add(i).write_volatile(src.add(i).read()) };
        i += 1;
    }
}

/// Copies `n` bytes backwards (from the end), for overlaps with `dest` above `src`.
///
/// # Safety
/// `src` readable and `dest` writable for `n` bytes.
pub unsafe fn copy_backward(dest: *mut u8, src: *const u8, n: usize) {
    let mut end = n;
    // SAFETY (every access below): end - size >= 0 and the caller's ranges cover n bytes; each
    // block is loaded whole before it is stored, so bytes still to be read are never overwritten.
    while end > 0 && !(dest as usize + end).is_multiple_of(WORD) {
        end -= 1;
        unsafe { dest.add(end).write_volatile(src.add(end).read()) };
    }
    while end >= BLOCK {
        end -= BLOCK;
        unsafe {
            let s = src.add(end).cast::<u64>();
            let d = dest.add(end).cast::<u64>();
            let w: [u64; UNROLL] = core::array::from_fn(|k| s.add(k).read_unaligned());
            for (k, word) in w.into_iter().enumerate().rev() {
                d.add(k).write_volatile(word);
            }
        }
    }
    while end >= WORD {
        end -= WORD;
        unsafe {
            let word = src.add(end).cast::<u64>().read_unaligned();
            dest.add(end).cast::<u64>().write_volatile(word);
        }
    }
    while end > 0 {
        end -= 1;
        unsafe { dest.add(end).write_volatile(src.add(end).read()) };
    }
}

/// # Safety
/// The C contract: `src` readable and `dest` writable for `n` bytes, not overlapping.
#[cfg_attr(target_os = "none", unsafe(no_mangle))]
pub unsafe extern "C" fn memcpy(dest: *mut c_void, src: *const c_void, n: usize) -> *mut c_void {
    // SAFETY: the caller's contract is copy_forward's (non-overlapping ranges are a special case).
    unsafe { copy_forward(dest.cast(), src.cast(), n) };
    dest
}

/// # Safety
/// The C contract: `src` readable and `dest` writable for `n` bytes; they may overlap.
#[cfg_attr(target_os = "none", unsafe(no_mangle))]
pub unsafe extern "C" fn memmove(dest: *mut c_void, src: *const c_void, n: usize) -> *mut c_void {
    let (to, from) = (dest.cast::<u8>(), src.cast::<u8>());
    // SAFETY: the caller's contract; the direction is chosen so overlapping bytes are read
    // before they are overwritten.
    unsafe {
        if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
            copy_forward(to, from, n);
        } else {
            copy_backward(to, from, n);
        }
    }
    dest
}

/// # Safety
/// The C contract: `dest` writable for `n` bytes.
#[cfg_attr(target_os = "none", unsafe(no_mangle))]
pub unsafe extern "C" fn memset(s: *mut c_void, value: c_int, n: usize) -> *mut c_void {
    let dest = s.cast::<u8>();
    let byte = value as u8;
    let word = u64::from_ne_bytes([byte; WORD]);
    let mut i = 0;
    // SAFETY (every store below): i + size <= n and the caller's range covers n bytes; word
    // stores are aligned by the head loop.
    while i < n && !(dest as usize + i).is_multiple_of(WORD) {
        unsafe { dest.add(i).write_volatile(byte) };
        i += 1;
    }
    while i + BLOCK <= n {
        let d = unsafe { dest.add(i).cast::<u64>() };
        for k in 0..UNROLL {
            unsafe { d.add(k).write_volatile(word) };
        }
        i += BLOCK;
    }
    while i + WORD <= n {
        unsafe { dest.add(i).cast::<u64>().write_volatile(word) };
        i += WORD;
    }
    while i < n {
        unsafe { dest.add(i).write_volatile(byte) };
        i += 1;
    }
    s
}
