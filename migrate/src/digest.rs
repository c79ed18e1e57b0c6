//! An order-independent digest of guest memory, so both nodes can check at switchover that the
//! destination holds exactly the source's memory.
//!
//! Hashing all of RAM inside the downtime would make the pause proportional to the VM's size, the
//! very thing pre-copy avoids. So the digest is a wrapping sum of per-page hashes, which each side
//! can keep up to date as pages move: the source hashing each page when it reads it for a batch,
//! the destination when it writes it. Replacing a page is a subtraction and an addition (the
//! destination keeps each page's content hash to know what to subtract), and a freshly created,
//! zeroed VM starts from [`MemoryDigest::zeroed`] without reading a byte.
//!
//! Each page's hash mixes the page's index into the hash of its contents, so a page landing at the
//! wrong index changes the sum even though addition does not care about order.
//!
//! Not cryptographic: this detects bugs and corruption (a lost batch, a page written at the wrong
//! index, a bit flipped in memory after the checksummed frame was decoded), not an adversary, who
//! could forge collisions easily. What it does guarantee: two pages that differ in exactly one
//! 8-byte word always have different content hashes, since every step of the hash is a bijection
//! of that word. Other differences collide with a probability of about 2^-64.
//!
//! The values travel between nodes, which may run different builds: the functions below are part
//! of the protocol and must not change without a protocol version (a test pins them).

use crate::message::PAGE_SIZE;

/// Words of 64 bits in a page.
const WORDS: usize = PAGE_SIZE / 8;

/// Four independent lanes, each taking every fourth word, so the multiplications of neighbouring
/// words overlap in the CPU instead of waiting for each other: about one cycle per word on x86.
const LANE_SEEDS: [u64; 4] = [
    0x243F_6A88_85A3_08D3,
    0x1319_8A2E_0370_7344,
    0xA409_3822_299F_31D0,
    0x082E_FA98_EC4E_6C89,
];

/// An odd multiplier (the golden ratio's 64-bit fraction), so multiplying is a bijection.
const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

/// Added to a page index before mixing, so that page 0 does not start from zero.
const INDEX_SEED: u64 = 0x4528_21E6_38D0_1377;

/// One lane step. Xor, multiplication by an odd number and rotation are each invertible, so the
/// lane's state after the step determines the word: a changed word always changes the lane.
/// The rotation brings the well-mixed high bits of the product down to where the next word's low
/// bits land.
const fn step(lane: u64, word: u64) -> u64 {
    (lane ^ word).wrapping_mul(MULTIPLIER).rotate_left(29)
}

/// MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit over the output.
const fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h
}

/// Folds the lanes into one value, in a chain that stays a bijection of each lane alone.
const fn finish(lanes: [u64; 4]) -> u64 {
    let mut h = fmix(lanes[0]);
    h = fmix(h ^ lanes[1]);
    h = fmix(h ^ lanes[2]);
    fmix(h ^ lanes[3])
}

const fn zero_content_hash() -> u64 {
    let mut lanes = LANE_SEEDS;
    let mut i = 0;
    while i < WORDS / 4 {
        lanes = [
            step(lanes[0], 0),
            step(lanes[1], 0),
            step(lanes[2], 0),
            step(lanes[3], 0),
        ];
        i += 1;
    }
    finish(lanes)
}

/// [`content_hash`] of an all-zero page.
pub const ZERO_PAGE_CONTENT_HASH: u64 = zero_content_hash();

/// [`ZERO_PAGE_CONTENT_HASH`]: the initial entry of a per-page table of content hashes for a
/// freshly created, zeroed VM.
pub const fn zero_page_hash() -> u64 {
    ZERO_PAGE_CONTENT_HASH
}

/// The hash of a page's contents alone, independent of where the page lies.
pub fn content_hash(data: &[u8; PAGE_SIZE]) -> u64 {
    let mut lanes = LANE_SEEDS;
    let (words, _) = data.as_chunks::<8>();
    let (quads, _) = words.as_chunks::<4>();
    for quad in quads {
        lanes[0] = step(lanes[0], u64::from_le_bytes(quad[0]));
        lanes[1] = step(lanes[1], u64::from_le_bytes(quad[1]));
        lanes[2] = step(lanes[2], u64::from_le_bytes(quad[2]));
        lanes[3] = step(lanes[3], u64::from_le_bytes(quad[3]));
    }
    finish(lanes)
}

/// Combines a page's index with the [`content_hash`] of its data: a bijection of the content hash
/// for each index, so different contents at one index always give different page hashes.
pub const fn mix_index(page_index: u64, content_hash: u64) -> u64 {
    fmix(content_hash ^ fmix(page_index.wrapping_add(INDEX_SEED)))
}

/// The hash of page `page_index` holding `data`: `mix_index(page_index, content_hash(data))`.
/// Fast and not cryptographic (see the module documentation).
pub fn page_hash(page_index: u64, data: &[u8; PAGE_SIZE]) -> u64 {
    mix_index(page_index, content_hash(data))
}

/// The wrapping sum of [`page_hash`] over every page of a VM's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct MemoryDigest {
    sum: u64,
}

impl MemoryDigest {
    /// The digest of no pages at all, to build a full one with [`add`](Self::add).
    pub const fn empty() -> Self {
        Self { sum: 0 }
    }

    /// A digest received from the peer (the value of its [`value`](Self::value)).
    pub const fn from_value(value: u64) -> Self {
        Self { sum: value }
    }

    /// The digest of `pages` all-zero pages, what a freshly created VM holds. Mixes each index
    /// with the one zero-page content hash instead of reading any memory.
    pub fn zeroed(pages: u64) -> Self {
        let sum = (0..pages).fold(0u64, |sum, page| {
            sum.wrapping_add(mix_index(page, ZERO_PAGE_CONTENT_HASH))
        });
        Self { sum }
    }

    /// The digest of the given `(index, data)` pages: the source's full pass, or a check in tests.
    pub fn from_pages<'a>(pages: impl IntoIterator<Item = (u64, &'a [u8; PAGE_SIZE])>) -> Self {
        let mut digest = Self::empty();
        for (page, data) in pages {
            digest.add(page, data);
        }
        digest
    }

    /// Adds page `page` holding `data`.
    pub fn add(&mut self, page: u64, data: &[u8; PAGE_SIZE]) {
        self.add_content(page, content_hash(data));
    }

    /// Adds page `page` whose [`content_hash`] is already known.
    pub fn add_content(&mut self, page: u64, content_hash: u64) {
        self.sum = self.sum.wrapping_add(mix_index(page, content_hash));
    }

    /// Page `page` changed from contents hashing to `old_hash` to contents hashing to `new_hash`
    /// (both [`content_hash`] values, not page hashes: the index is mixed in here).
    pub fn replace(&mut self, page: u64, old_hash: u64, new_hash: u64) {
        self.sum = self
            .sum
            .wrapping_sub(mix_index(page, old_hash))
            .wrapping_add(mix_index(page, new_hash));
    }

    /// The digest as a number, to send to the peer or compare.
    pub const fn value(&self) -> u64 {
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Page, Rng};
    use alloc::boxed::Box;
    use alloc::vec;
    use alloc::vec::Vec;

    #[test]
    fn zero_page_constant_matches_hashing_a_zero_page() {
        assert_eq!(content_hash(&[0; PAGE_SIZE]), ZERO_PAGE_CONTENT_HASH);
        assert_eq!(zero_page_hash(), ZERO_PAGE_CONTENT_HASH);
    }

    #[test]
    fn zeroed_equals_summing_zero_pages() {
        let zero = [0u8; PAGE_SIZE];
        for n in [0u64, 1, 2, 7, 300] {
            let summed = MemoryDigest::from_pages((0..n).map(|i| (i, &zero)));
            assert_eq!(MemoryDigest::zeroed(n), summed, "{n} pages");
            let by_hash = (0..n).fold(0u64, |s, i| s.wrapping_add(page_hash(i, &zero)));
            assert_eq!(MemoryDigest::zeroed(n).value(), by_hash);
        }
        assert_eq!(MemoryDigest::zeroed(0), MemoryDigest::empty());
        assert_ne!(MemoryDigest::zeroed(5), MemoryDigest::zeroed(6));
    }

    #[test]
    fn replace_is_consistent_with_recomputation() {
        const PAGES: usize = 32;
        let mut rng = Rng(0x0123_4567_89AB_CDEF);
        let mut memory: Vec<Page> = (0..PAGES).map(|_| Box::new([0; PAGE_SIZE])).collect();
        let mut hashes = vec![ZERO_PAGE_CONTENT_HASH; PAGES];
        let mut digest = MemoryDigest::zeroed(PAGES as u64);
        for step in 0..300 {
            let page = (rng.next_u64() % PAGES as u64) as usize;
            match step % 3 {
                0 => memory[page] = rng.page(),
                1 => memory[page][(rng.next_u64() % PAGE_SIZE as u64) as usize] ^= 0x40,
                _ => memory[page].fill(0),
            }
            let new = content_hash(&memory[page]);
            digest.replace(page as u64, hashes[page], new);
            hashes[page] = new;
            let full =
                MemoryDigest::from_pages(memory.iter().enumerate().map(|(i, p)| (i as u64, &**p)));
            assert_eq!(digest, full, "step {step}");
        }
        // Replacing a page by itself changes nothing.
        let before = digest;
        digest.replace(3, hashes[3], hashes[3]);
        assert_eq!(digest, before);
    }

    #[test]
    fn any_changed_word_changes_the_content_hash() {
        let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
        let base = rng.page();
        let hash = content_hash(&base);
        for word in 0..WORDS {
            let mut changed = base.clone();
            let flip = rng.next_u64() | 1;
            for (byte, mask) in changed[word * 8..word * 8 + 8]
                .iter_mut()
                .zip(flip.to_le_bytes())
            {
                *byte ^= mask;
            }
            assert_ne!(content_hash(&changed), hash, "word {word}");
        }
        // Swapped words within and across lanes, and a zero page with one bit set.
        let mut swapped = base.clone();
        swapped.copy_within(0..8, 4088);
        swapped[0..8].copy_from_slice(&base[4088..4096]);
        assert_ne!(content_hash(&swapped), hash);
        let mut neighbours = base.clone();
        neighbours.copy_within(0..8, 8);
        neighbours[0..8].copy_from_slice(&base[8..16]);
        assert_ne!(content_hash(&neighbours), hash);
        let mut one_bit = [0u8; PAGE_SIZE];
        one_bit[4095] = 0x80;
        assert_ne!(content_hash(&one_bit), ZERO_PAGE_CONTENT_HASH);
    }

    #[test]
    fn pages_at_the_wrong_index_change_the_digest() {
        let mut rng = Rng(7);
        let a = rng.page();
        let b = rng.page();
        let right = MemoryDigest::from_pages([(0, &*a), (1, &*b)]);
        let swapped = MemoryDigest::from_pages([(0, &*b), (1, &*a)]);
        let doubled = MemoryDigest::from_pages([(0, &*a), (1, &*a)]);
        assert_ne!(right, swapped);
        assert_ne!(right, doubled);
        // Order of adding does not matter.
        assert_eq!(right, MemoryDigest::from_pages([(1, &*b), (0, &*a)]));
    }

    /// The values cross the wire between builds: changing them needs a protocol version.
    #[test]
    fn hash_values_are_pinned() {
        let mut counting = [0u8; PAGE_SIZE];
        for (i, b) in counting.iter_mut().enumerate() {
            *b = i as u8;
        }
        assert_eq!(ZERO_PAGE_CONTENT_HASH, 0xF504_F129_B27E_DC41);
        assert_eq!(content_hash(&counting), 0xF1B3_175B_1A38_E6A5);
        assert_eq!(page_hash(12345, &counting), 0x2952_ACEC_976B_773F);
        assert_eq!(MemoryDigest::zeroed(16384).value(), 0xCF56_427E_39FE_0789);
    }
}
