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
//!
//! # Disk layout: workload, guest benchmark, host benchmark
//!
//! A disk of at least [`BENCH_MIN_DISK_BLOCKS`] blocks (16 MiB) is cut in three, so the
//! benchmark (`tests/tests/disk_bench.rs`) never touches a block the workload must find intact:
//!
//! | blocks (4 KiB) | who writes there |
//! |---|---|
//! | `0..`[`window_blocks`] | the self-verifying workload: the first half of the disk, at most [`MAX_WINDOW_BLOCKS`] |
//! | [`bench_region`] | the guest's `disk bench` command ([`crate::command::DISK_BENCH`]): from the middle, a quarter of the disk, at most [`MAX_BENCH_BLOCKS`] |
//! | [`host_bench_region`] | the host's reference run of the same benchmark through the iSCSI initiator: the last quarter, at most [`MAX_BENCH_BLOCKS`] |
//!
//! A smaller disk (e.g. an 8 MiB RAM disk) is the workload's alone, as it always was: no
//! benchmark runs on it. For the cluster's 64 MiB LUN: workload 0-32 MiB, guest benchmark
//! 32-48 MiB, host benchmark 48-64 MiB.
//!
//! The benchmarks write [`fill_bench_block`] blocks: their magic is [`BENCH_MAGIC`], not
//! [`BLOCK_MAGIC`], so they never count in a digest of the raw disk.

use core::fmt;
use core::ops::Range;

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

/// The smallest disk with room for the benchmarks (16 MiB): smaller disks are the workload's
/// alone.
pub const BENCH_MIN_DISK_BLOCKS: u64 = 4096;
/// Most blocks of one benchmark region (16 MiB): the guest's generation table of its region
/// is a fixed array.
pub const MAX_BENCH_BLOCKS: u64 = 4096;

/// Blocks the guest's workload covers on a disk of `capacity_sectors` (from block 0): the whole
/// disk below [`BENCH_MIN_DISK_BLOCKS`], else its first half; at most [`MAX_WINDOW_BLOCKS`].
pub fn window_blocks(capacity_sectors: u64) -> u64 {
    let blocks = capacity_sectors / SECTORS_PER_BLOCK;
    if blocks < BENCH_MIN_DISK_BLOCKS {
        blocks.min(MAX_WINDOW_BLOCKS)
    } else {
        (blocks / 2).min(MAX_WINDOW_BLOCKS)
    }
}

/// The blocks the guest's disk benchmark may write on a disk of `capacity_sectors`: a quarter
/// of the disk from its middle, at most [`MAX_BENCH_BLOCKS`]; `None` on a disk too small.
pub fn bench_region(capacity_sectors: u64) -> Option<Range<u64>> {
    let blocks = capacity_sectors / SECTORS_PER_BLOCK;
    if blocks < BENCH_MIN_DISK_BLOCKS {
        return None;
    }
    let start = blocks / 2;
    Some(start..start + (blocks / 4).min(MAX_BENCH_BLOCKS))
}

/// The blocks the host's reference benchmark may write (the last quarter of the disk, at most
/// [`MAX_BENCH_BLOCKS`]); `None` on a disk too small.
pub fn host_bench_region(capacity_sectors: u64) -> Option<Range<u64>> {
    let blocks = capacity_sectors / SECTORS_PER_BLOCK;
    if blocks < BENCH_MIN_DISK_BLOCKS {
        return None;
    }
    let start = blocks / 2 + blocks / 4;
    Some(start..start + (blocks - start).min(MAX_BENCH_BLOCKS))
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

/// Word 0 of every benchmark block: "HVBENCH1" little-endian.
pub const BENCH_MAGIC: u64 = u64::from_le_bytes(*b"HVBENCH1");

/// Body word `word` (3..512) of the benchmark block at `lba` written with `generation`: cheap
/// (one multiply a word, so that filling and checking cost little next to the I/O being
/// measured) yet different for every block, generation and word.
pub fn bench_word(lba: u64, generation: u64, word: usize) -> u64 {
    mix(lba ^ mix(generation)) ^ (word as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Fills `words` with the benchmark block at `lba` written with `generation`: [`BENCH_MAGIC`],
/// the LBA, the generation, then [`bench_word`]s.
pub fn fill_bench_block(words: &mut [u64; BLOCK_WORDS], lba: u64, generation: u64) {
    words[0] = BENCH_MAGIC;
    words[1] = lba;
    words[2] = generation;
    let seed = mix(lba ^ mix(generation));
    for (i, w) in words.iter_mut().enumerate().skip(3) {
        *w = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Checks a benchmark block read back against the LBA and generation it must hold.
pub fn check_bench_block(
    words: &[u64; BLOCK_WORDS],
    lba: u64,
    generation: u64,
) -> Result<(), BlockMismatch> {
    if words[0] != BENCH_MAGIC {
        return Err(BlockMismatch::NotABlock { word0: words[0] });
    }
    if words[1] != lba {
        return Err(BlockMismatch::WrongLba { found: words[1] });
    }
    if words[2] != generation {
        return Err(BlockMismatch::WrongGeneration { found: words[2] });
    }
    let seed = mix(lba ^ mix(generation));
    for (i, &w) in words.iter().enumerate().skip(3) {
        if w != seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) {
            return Err(BlockMismatch::Corrupt { word: i });
        }
    }
    Ok(())
}

/// The access patterns of the disk benchmark, in the order it runs them at each queue depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchPattern {
    /// 4 KiB writes, block after block from the region's start (wrapping at its end).
    SeqWrite,
    /// 4 KiB reads, block after block over the blocks written so far (wrapping).
    SeqRead,
    /// 4 KiB writes at random blocks among those written so far ([`bench_random`]).
    RandWrite,
    /// 4 KiB reads at random blocks among those written so far.
    RandRead,
}

impl BenchPattern {
    pub const ALL: [BenchPattern; 4] = [
        BenchPattern::SeqWrite,
        BenchPattern::SeqRead,
        BenchPattern::RandWrite,
        BenchPattern::RandRead,
    ];

    /// The name in the output lines: `seq-write`, `seq-read`, `rand-write`, `rand-read`.
    pub fn name(self) -> &'static str {
        match self {
            BenchPattern::SeqWrite => "seq-write",
            BenchPattern::SeqRead => "seq-read",
            BenchPattern::RandWrite => "rand-write",
            BenchPattern::RandRead => "rand-read",
        }
    }

    pub fn from_name(name: &str) -> Option<BenchPattern> {
        BenchPattern::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn writes(self) -> bool {
        matches!(self, BenchPattern::SeqWrite | BenchPattern::RandWrite)
    }

    pub fn random(self) -> bool {
        matches!(self, BenchPattern::RandWrite | BenchPattern::RandRead)
    }
}

/// Queue depths the benchmark measures, in order: one request at a time, then eight in flight
/// (the guest driver's slots).
pub const BENCH_QUEUE_DEPTHS: [usize; 2] = [1, 8];

/// How the guest waits for completions during a measurement (it has no interrupts: it polls
/// the used ring either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchWait {
    /// Spin on the used ring without leaving the guest: no exit while waiting, except a check
    /// of the device status every 10 ms.
    Spin,
    /// HLT whenever nothing completed and nothing could be started: the vCPU yields until the
    /// hypervisor's next time slice, as the workload does (and as an idle guest would).
    Hlt,
}

impl BenchWait {
    /// In the order the benchmark runs them.
    pub const ALL: [BenchWait; 2] = [BenchWait::Spin, BenchWait::Hlt];

    /// The name in the output lines: `spin`, `hlt`.
    pub fn name(self) -> &'static str {
        match self {
            BenchWait::Spin => "spin",
            BenchWait::Hlt => "hlt",
        }
    }

    pub fn from_name(name: &str) -> Option<BenchWait> {
        BenchWait::ALL.into_iter().find(|w| w.name() == name)
    }
}
/// Each measurement (one pattern at one queue depth) starts requests for this long...
pub const BENCH_MILLIS: u64 = 2000;
/// ...or until it has started this many, whichever comes first; then it waits for those in
/// flight, which count.
pub const BENCH_MAX_OPS: u64 = 50_000;
/// Seed of [`bench_random`] at the start of each random measurement.
pub const BENCH_SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// The next value of the benchmark's xorshift64 generator (state must not be 0).
pub fn bench_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
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

    const MIB: u64 = 2048; // sectors

    #[test]
    fn workload_and_benchmarks_never_share_a_block() {
        // Small disks: the workload's alone, as before.
        for mib in [1, 8, 15] {
            assert_eq!(window_blocks(mib * MIB), mib * 256);
            assert_eq!(bench_region(mib * MIB), None);
            assert_eq!(host_bench_region(mib * MIB), None);
        }
        // The cluster's 64 MiB LUN: 0-32, 32-48, 48-64 MiB.
        assert_eq!(window_blocks(64 * MIB), 8192);
        assert_eq!(bench_region(64 * MIB), Some(8192..12288));
        assert_eq!(host_bench_region(64 * MIB), Some(12288..16384));
        for sectors in [
            16 * MIB,
            16 * MIB + 7,
            17 * MIB + 8,
            64 * MIB,
            100 * MIB,
            1 << 30,
        ] {
            let blocks = sectors / SECTORS_PER_BLOCK;
            let w = window_blocks(sectors);
            let g = bench_region(sectors).unwrap();
            let h = host_bench_region(sectors).unwrap();
            assert!(w > 0 && w <= g.start, "{sectors}: {w} {g:?}");
            assert!(!g.is_empty() && g.end <= h.start, "{sectors}: {g:?} {h:?}");
            assert!(!h.is_empty() && h.end <= blocks, "{sectors}: {h:?}");
            assert!(g.end - g.start <= MAX_BENCH_BLOCKS && h.end - h.start <= MAX_BENCH_BLOCKS);
        }
    }

    #[test]
    fn bench_blocks_check_and_stay_out_of_digests() {
        let mut w = [0u64; BLOCK_WORDS];
        fill_bench_block(&mut w, 800, 5);
        assert_eq!(check_bench_block(&w, 800, 5), Ok(()));
        assert_eq!(w[7], bench_word(800, 5, 7));
        assert_eq!(
            check_bench_block(&w, 808, 5),
            Err(BlockMismatch::WrongLba { found: 800 })
        );
        assert_eq!(
            check_bench_block(&w, 800, 6),
            Err(BlockMismatch::WrongGeneration { found: 5 })
        );
        let mut c = w;
        c[511] ^= 1 << 40;
        assert_eq!(
            check_bench_block(&c, 800, 5),
            Err(BlockMismatch::Corrupt { word: 511 })
        );
        let mut other = [0u64; BLOCK_WORDS];
        fill_bench_block(&mut other, 800, 6);
        assert!(w[3..].iter().zip(&other[3..]).all(|(a, b)| a != b));
        // A workload block is not a bench block, and a bench block never counts in a digest.
        let mut workload = [0u64; BLOCK_WORDS];
        fill_block(&mut workload, 800, 5);
        assert!(check_bench_block(&workload, 800, 5).is_err());
        assert_eq!(parse_block(&w, 800), None);
        let image: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut d = DiskDigest::default();
        d.add_image(800, &image);
        assert_eq!(d, DiskDigest::default());
    }

    #[test]
    fn bench_patterns_and_random_blocks() {
        for p in BenchPattern::ALL {
            assert_eq!(BenchPattern::from_name(p.name()), Some(p));
        }
        assert_eq!(BenchPattern::from_name("seq"), None);
        for w in BenchWait::ALL {
            assert_eq!(BenchWait::from_name(w.name()), Some(w));
        }
        assert_eq!(BenchWait::from_name("poll"), None);
        assert!(BenchPattern::SeqWrite.writes() && !BenchPattern::SeqWrite.random());
        assert!(BenchPattern::RandRead.random() && !BenchPattern::RandRead.writes());
        let mut s = BENCH_SEED;
        let draws: Vec<u64> = (0..1000).map(|_| bench_random(&mut s) % 4096).collect();
        let distinct: std::collections::BTreeSet<u64> = draws.iter().copied().collect();
        assert!(distinct.len() > 800, "{}", distinct.len());
        let mut again = BENCH_SEED;
        assert_eq!(bench_random(&mut again) % 4096, draws[0]);
    }
}
