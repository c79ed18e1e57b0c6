//! The test guest's disk contents: self-describing 4 KiB blocks, and the digest the guest prints
//! after a disk verification.
//!
//! When the VM has a virtio-blk disk, the guest keeps writing blocks over a window at the start
//! of it ([`window_blocks`]), and remembers, for each block, the generation of its last write
//! the device acknowledged. Each block says what it is, so a block found elsewhere, an older
//! write, or a torn or corrupted one are all told apart, by the guest and by anyone reading the
//! raw disk (a node's RAM disk, later the iSCSI LUN from the host):
//!
//! | words (u64 LE) | content |
//! |---|---|
//! | 0 | [`BLOCK_MAGIC`] (`"HVDISKB1"`) |
//! | 1 | LBA: the block's first 512-byte sector (block number x 8) |
//! | 2 | generation: 1 for the first write of this boot, +1 for each rewrite |
//! | 3..=510 | [`block_word`]`(lba, generation, i)` |
//! | 511 | check word: [`check_word`] of words 0..=510 |
//!
//! # The digest
//!
//! `disk verify ok blocks=N writes=W hash=0x...` reports `hash` = the wrapping sum, over every
//! block whose generation is known and non-zero, of [`block_digest`]`(lba, generation)`; `N` is
//! the number of such blocks. A sum does not depend on order, so the same number comes out of
//! a raw read of the disk in any order: [`DiskDigest::add_image`] parses each 4 KiB block of an
//! image, counts the valid ones (magic, LBA matching their position, body and check word right)
//! and adds their digests. The two agree when no write is in flight and the disk held nothing
//! from an earlier boot that this boot did not overwrite (a fresh disk, or the window written
//! once through) — the guest's `disk hold` command stops new writes and drains the others.

use core::fmt;

/// Bytes of one block.
pub const BLOCK_BYTES: usize = 4096;
/// Words of one block.
pub const BLOCK_WORDS: usize = BLOCK_BYTES / 8;
/// 512-byte sectors per block.
pub const SECTORS_PER_BLOCK: u64 = 8;
/// Word 0 of every block: "HVDISKB1" little-endian.
pub const BLOCK_MAGIC: u64 = u64::from_le_bytes(*b"HVDISKB1");
/// Most blocks the guest writes (64 MiB of disk): its generation table is a fixed array.
pub const MAX_WINDOW_BLOCKS: u64 = 16384;

/// Blocks the guest's workload covers on a disk of `capacity_sectors`: the whole disk, up to
/// [`MAX_WINDOW_BLOCKS`].
pub fn window_blocks(capacity_sectors: u64) -> u64 {
    (capacity_sectors / SECTORS_PER_BLOCK).min(MAX_WINDOW_BLOCKS)
}

/// A 64-bit mixer (splitmix64's finalizer): every input bit affects every output bit.
const fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Word `word` (3..=510) of the block at `lba` written with `generation`.
pub fn block_word(lba: u64, generation: u64, word: usize) -> u64 {
    mix(lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix(generation) ^ (word as u64) << 48)
}

/// Word 511: a hash of words 0..=510 (FNV-1a over the words, mixed).
pub fn check_word(words: &[u64]) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for &w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(h)
}

/// Fills `words` with the block at `lba` written with `generation`.
pub fn fill_block(words: &mut [u64; BLOCK_WORDS], lba: u64, generation: u64) {
    words[0] = BLOCK_MAGIC;
    words[1] = lba;
    words[2] = generation;
    for (i, w) in words.iter_mut().enumerate().take(BLOCK_WORDS - 1).skip(3) {
        *w = block_word(lba, generation, i);
    }
    words[BLOCK_WORDS - 1] = check_word(&words[..BLOCK_WORDS - 1]);
}

/// How a block read back differs from what it must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockMismatch {
    /// Word 0 is not the magic: never written (zeros), or overwritten by something else.
    NotABlock { word0: u64 },
    /// A block of another LBA: a write landed in the wrong place.
    WrongLba { found: u64 },
    /// Another generation: a lost (older) or phantom (newer) write.
    WrongGeneration { found: u64 },
    /// Header right, a body word wrong.
    Corrupt { word: usize },
    /// Body right, check word wrong.
    BadCheck,
}

impl fmt::Display for BlockMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockMismatch::NotABlock { word0 } => write!(f, "no block (word 0 {word0:#x})"),
            BlockMismatch::WrongLba { found } => write!(f, "the block of lba {found}"),
            BlockMismatch::WrongGeneration { found } => write!(f, "gen {found}"),
            BlockMismatch::Corrupt { word } => write!(f, "corrupt word {word}"),
            BlockMismatch::BadCheck => write!(f, "a bad check word"),
        }
    }
}

/// Checks a block against the LBA and generation it must hold.
pub fn check_block(
    words: &[u64; BLOCK_WORDS],
    lba: u64,
    generation: u64,
) -> Result<(), BlockMismatch> {
    if words[0] != BLOCK_MAGIC {
        return Err(BlockMismatch::NotABlock { word0: words[0] });
    }
    if words[1] != lba {
        return Err(BlockMismatch::WrongLba { found: words[1] });
    }
    if words[2] != generation {
        return Err(BlockMismatch::WrongGeneration { found: words[2] });
    }
    for (i, &w) in words.iter().enumerate().take(BLOCK_WORDS - 1).skip(3) {
        if w != block_word(lba, generation, i) {
            return Err(BlockMismatch::Corrupt { word: i });
        }
    }
    if words[BLOCK_WORDS - 1] != check_word(&words[..BLOCK_WORDS - 1]) {
        return Err(BlockMismatch::BadCheck);
    }
    Ok(())
}

/// The (LBA, generation) a block read from position `lba` claims, if it is a whole, valid
/// block of that position with a non-zero generation.
pub fn parse_block(words: &[u64; BLOCK_WORDS], lba: u64) -> Option<u64> {
    let generation = words[2];
    (generation != 0 && check_block(words, lba, generation).is_ok()).then_some(generation)
}

/// One block's share of the digest.
pub fn block_digest(lba: u64, generation: u64) -> u64 {
    mix(mix(lba) ^ generation.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// The order-independent digest of a set of blocks (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskDigest {
    /// Blocks counted.
    pub blocks: u64,
    /// Wrapping sum of their [`block_digest`]s.
    pub hash: u64,
}

impl DiskDigest {
    /// Counts the block at `lba` holding `generation` (0: nothing written, not counted).
    pub fn add(&mut self, lba: u64, generation: u64) {
        if generation != 0 {
            self.blocks += 1;
            self.hash = self.hash.wrapping_add(block_digest(lba, generation));
        }
    }

    /// Counts the valid blocks of a raw disk image (or a part of one starting at sector
    /// `first_lba`, a multiple of 8): what a host computes from a raw read of the disk. A
    /// trailing partial block is ignored.
    pub fn add_image(&mut self, first_lba: u64, image: &[u8]) {
        let mut words = [0u64; BLOCK_WORDS];
        let (blocks, _) = image.as_chunks::<BLOCK_BYTES>();
        for (i, block) in blocks.iter().enumerate() {
            let (block_words, _) = block.as_chunks::<8>();
            for (w, bytes) in words.iter_mut().zip(block_words) {
                *w = u64::from_le_bytes(*bytes);
            }
            let lba = first_lba + i as u64 * SECTORS_PER_BLOCK;
            if let Some(generation) = parse_block(&words, lba) {
                self.add(lba, generation);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn block_bytes(lba: u64, generation: u64) -> Vec<u8> {
        let mut w = [0u64; BLOCK_WORDS];
        fill_block(&mut w, lba, generation);
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn blocks_describe_themselves() {
        let mut w = [0u64; BLOCK_WORDS];
        fill_block(&mut w, 80, 3);
        assert_eq!(check_block(&w, 80, 3), Ok(()));
        assert_eq!(parse_block(&w, 80), Some(3));
        assert_eq!(
            check_block(&w, 88, 3),
            Err(BlockMismatch::WrongLba { found: 80 })
        );
        assert_eq!(parse_block(&w, 88), None);
        assert_eq!(
            check_block(&w, 80, 4),
            Err(BlockMismatch::WrongGeneration { found: 3 })
        );
        let mut c = w;
        c[200] ^= 1;
        assert_eq!(
            check_block(&c, 80, 3),
            Err(BlockMismatch::Corrupt { word: 200 })
        );
        let mut c = w;
        c[511] ^= 1;
        assert_eq!(check_block(&c, 80, 3), Err(BlockMismatch::BadCheck));
        let zero = [0u64; BLOCK_WORDS];
        assert_eq!(
            check_block(&zero, 0, 1),
            Err(BlockMismatch::NotABlock { word0: 0 })
        );
        assert_eq!(parse_block(&zero, 0), None);
        // A torn write: the first half new, the second old.
        let mut old = [0u64; BLOCK_WORDS];
        fill_block(&mut old, 80, 2);
        let mut torn = w;
        torn[256..].copy_from_slice(&old[256..]);
        assert!(check_block(&torn, 80, 3).is_err());
        assert!(check_block(&torn, 80, 2).is_err());
        // Generation 0 is "never written".
        let mut g0 = [0u64; BLOCK_WORDS];
        fill_block(&mut g0, 0, 0);
        assert_eq!(parse_block(&g0, 0), None);
        for m in [
            BlockMismatch::NotABlock { word0: 1 },
            BlockMismatch::WrongLba { found: 1 },
            BlockMismatch::WrongGeneration { found: 1 },
            BlockMismatch::Corrupt { word: 3 },
            BlockMismatch::BadCheck,
        ] {
            assert!(!std::format!("{m}").is_empty());
        }
    }

    #[test]
    fn digest_of_the_table_equals_digest_of_the_image() {
        // A 64-block disk; blocks 0..40 written, some several times.
        let gens: Vec<u64> = (0..64u64)
            .map(|b| if b < 40 { 1 + b % 5 } else { 0 })
            .collect();
        let mut image = std::vec![0u8; 64 * BLOCK_BYTES];
        let mut from_table = DiskDigest::default();
        for (b, &g) in gens.iter().enumerate() {
            let lba = b as u64 * SECTORS_PER_BLOCK;
            from_table.add(lba, g);
            if g != 0 {
                image[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES].copy_from_slice(&block_bytes(lba, g));
            }
        }
        let mut from_image = DiskDigest::default();
        from_image.add_image(0, &image);
        assert_eq!(from_image, from_table);
        assert_eq!(from_table.blocks, 40);
        // Order does not matter: two halves in either order.
        let mut halves = DiskDigest::default();
        halves.add_image(32 * SECTORS_PER_BLOCK, &image[32 * BLOCK_BYTES..]);
        halves.add_image(0, &image[..32 * BLOCK_BYTES]);
        assert_eq!(halves, from_table);
        // A stale block changes it; a block copied to the wrong place is not counted.
        let mut stale = image.clone();
        stale[5 * BLOCK_BYTES..6 * BLOCK_BYTES].copy_from_slice(&block_bytes(40, 9));
        let mut d = DiskDigest::default();
        d.add_image(0, &stale);
        assert_ne!(d, from_table);
        let mut moved = image.clone();
        moved[50 * BLOCK_BYTES..51 * BLOCK_BYTES].copy_from_slice(&block_bytes(8, 2));
        let mut d = DiskDigest::default();
        d.add_image(0, &moved);
        assert_eq!(d, from_table);
        // Different generations, different digests.
        assert_ne!(block_digest(8, 1), block_digest(8, 2));
        assert_ne!(block_digest(8, 1), block_digest(16, 1));
    }

    #[test]
    fn window() {
        assert_eq!(window_blocks(16384), 2048);
        assert_eq!(window_blocks(7), 0);
        assert_eq!(window_blocks(u64::MAX), MAX_WINDOW_BLOCKS);
    }
}
