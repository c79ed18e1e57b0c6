//! The dirty log: one bit per 4 KiB guest page, over guest-physical pages `[0, pages)`.
//!
//! Live migration fills a [`DirtyBitmap`] from the nested page tables once per copy round
//! (`NestedPageTable::harvest_dirty` for the D-bit mode, nested page faults for the
//! write-protect mode), then hands the round's pages to the sender and starts the next round
//! with an empty log. [`DirtyBitmap::swap_out`] and [`DirtyBitmap::take`] do that hand-over in
//! one step, so no page recorded between "read the log" and "clear the log" can fall in the gap.
//!
//! The bitmap is plain data with no interior mutability: in the single-core model the vCPU is
//! not running while the log is filled or read. An SMP host that records write-protect faults
//! from several cores at once would need atomic words (`fetch_or`) instead.
//!
//! Invariant: the bits of the last word above `pages` are always zero, so [`DirtyBitmap::count`],
//! [`DirtyBitmap::iter`] and [`DirtyBitmap::merge`] never see pages that do not exist.

#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

/// Bits per storage word.
const WORD_BITS: u64 = u64::BITS as u64;

/// The largest log: one bit for every 4 KiB page below the 2^48 guest-physical limit of 4-level
/// nested paging (2^36 pages, an 8 GiB bitmap). Anything larger is a caller's mistake and is
/// refused rather than attempted.
pub const MAX_PAGES: u64 = 1 << 36;

/// Why a [`DirtyBitmap`] operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyError {
    /// `page` is not below the bitmap's `pages`.
    PageOutOfRange { page: u64, pages: u64 },
    /// Two bitmaps that must cover the same guest do not: `expected` is this bitmap's page
    /// count, `found` the other's.
    SizeMismatch { expected: u64, found: u64 },
    /// More pages than [`MAX_PAGES`] were asked for.
    TooLarge { pages: u64 },
    /// The heap could not provide the storage for `pages` bits.
    AllocFailed { pages: u64 },
}

impl fmt::Display for DirtyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyError::PageOutOfRange { page, pages } => {
                write!(f, "page {page} is outside the dirty log of {pages} pages")
            }
            DirtyError::SizeMismatch { expected, found } => write!(
                f,
                "dirty logs of different sizes: {expected} pages and {found} pages"
            ),
            DirtyError::TooLarge { pages } => {
                write!(
                    f,
                    "dirty log of {pages} pages exceeds the maximum of {MAX_PAGES}"
                )
            }
            DirtyError::AllocFailed { pages } => {
                write!(f, "out of memory for a dirty log of {pages} pages")
            }
        }
    }
}

/// One bit per 4 KiB guest page; a set bit means "written since the log was last emptied".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// An empty log for guest pages `[0, pages)`.
    ///
    /// The storage is reserved fallibly: a guest size that the heap cannot hold is an error the
    /// console reports, not an abort of the whole node.
    pub fn new(pages: u64) -> Result<Self, DirtyError> {
        if pages > MAX_PAGES {
            return Err(DirtyError::TooLarge { pages });
        }
        // Cannot truncate: MAX_PAGES / 64 = 2^30 fits in usize on the 64-bit targets we build.
        let len = pages.div_ceil(WORD_BITS) as usize;
        let mut words = Vec::new();
        words
            .try_reserve_exact(len)
            .map_err(|_| DirtyError::AllocFailed { pages })?;
        words.resize(len, 0);
        Ok(DirtyBitmap { words, pages })
    }

    /// The number of pages the log covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The storage words, page `64 * i + b` in bit `b` of word `i`: the layout a migration
    /// stream can send as is.
    pub fn as_words(&self) -> &[u64] {
        &self.words
    }

    /// Marks `page` dirty.
    pub fn set(&mut self, page: u64) -> Result<(), DirtyError> {
        let (word, mask) = self.locate(page)?;
        self.words[word] |= mask;
        Ok(())
    }

    /// Whether `page` is marked dirty.
    pub fn test(&self, page: u64) -> Result<bool, DirtyError> {
        let (word, mask) = self.locate(page)?;
        Ok(self.words[word] & mask != 0)
    }

    /// Marks `page` clean.
    pub fn clear(&mut self, page: u64) -> Result<(), DirtyError> {
        let (word, mask) = self.locate(page)?;
        self.words[word] &= !mask;
        Ok(())
    }

    /// The number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The dirty pages in ascending order. Runs of clean pages cost one comparison per 64 pages.
    pub fn iter(&self) -> DirtyPages<'_> {
        DirtyPages {
            words: &self.words,
            index: 0,
            current: self.words.first().copied().unwrap_or(0),
        }
    }

    /// Adds every page dirty in `other` (for example the pages a round could not send, merged
    /// back into the next round). Both logs must cover the same guest.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), DirtyError> {
        if other.pages != self.pages {
            return Err(DirtyError::SizeMismatch {
                expected: self.pages,
                found: other.pages,
            });
        }
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= theirs;
        }
        Ok(())
    }

    /// Marks every page clean.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Marks every page dirty: the first migration round sends all of guest RAM.
    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
        // Restore the invariant: no bits for pages that do not exist.
        let tail = self.pages % WORD_BITS;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last = (1u64 << tail) - 1;
            }
        }
    }

    /// Moves this log's contents into `into` and leaves this log empty, without allocating:
    /// the harvest loop keeps two bitmaps and swaps them every round. `into`'s previous contents
    /// are discarded. Both logs must cover the same guest.
    pub fn swap_out(&mut self, into: &mut DirtyBitmap) -> Result<(), DirtyError> {
        if into.pages != self.pages {
            return Err(DirtyError::SizeMismatch {
                expected: self.pages,
                found: into.pages,
            });
        }
        core::mem::swap(&mut self.words, &mut into.words);
        self.clear_all();
        Ok(())
    }

    /// Returns this log's contents as a new bitmap and leaves this log empty. Allocates the
    /// replacement storage; prefer [`DirtyBitmap::swap_out`] in a loop.
    pub fn take(&mut self) -> Result<DirtyBitmap, DirtyError> {
        let mut taken = DirtyBitmap::new(self.pages)?;
        core::mem::swap(&mut self.words, &mut taken.words);
        Ok(taken)
    }

    /// The word index and bit mask of `page`, or the range error.
    fn locate(&self, page: u64) -> Result<(usize, u64), DirtyError> {
        if page >= self.pages {
            return Err(DirtyError::PageOutOfRange {
                page,
                pages: self.pages,
            });
        }
        // Cannot truncate: page < pages <= MAX_PAGES, and words.len() is a usize.
        Ok(((page / WORD_BITS) as usize, 1u64 << (page % WORD_BITS)))
    }
}

/// Iterator over the dirty pages of a [`DirtyBitmap`], ascending. See [`DirtyBitmap::iter`].
#[derive(Debug, Clone)]
pub struct DirtyPages<'a> {
    words: &'a [u64],
    /// Index of the word `current` came from.
    index: usize,
    /// The bits of `words[index]` not yet returned.
    current: u64,
}

impl Iterator for DirtyPages<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.current == 0 {
            self.index += 1;
            self.current = *self.words.get(self.index)?;
        }
        let bit = u64::from(self.current.trailing_zeros());
        // Clear the lowest set bit: the next call finds the next page of this word.
        self.current &= self.current - 1;
        Some(self.index as u64 * WORD_BITS + bit)
    }
}

impl<'a> IntoIterator for &'a DirtyBitmap {
    type Item = u64;
    type IntoIter = DirtyPages<'a>;

    fn into_iter(self) -> DirtyPages<'a> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use std::collections::BTreeSet;

    fn pages_of(bitmap: &DirtyBitmap) -> Vec<u64> {
        bitmap.iter().collect()
    }

    #[test]
    fn new_bitmap_is_empty() {
        for pages in [0, 1, 63, 64, 65, 16384] {
            let bitmap = DirtyBitmap::new(pages).unwrap();
            assert_eq!(bitmap.pages(), pages);
            assert_eq!(bitmap.count(), 0);
            assert!(bitmap.is_empty());
            assert_eq!(bitmap.iter().next(), None);
            assert_eq!(bitmap.as_words().len() as u64, pages.div_ceil(64));
        }
    }

    #[test]
    fn set_test_clear_round_trip() {
        let mut bitmap = DirtyBitmap::new(200).unwrap();
        for page in [0, 1, 63, 64, 127, 128, 199] {
            assert!(!bitmap.test(page).unwrap());
            bitmap.set(page).unwrap();
            assert!(bitmap.test(page).unwrap());
        }
        assert_eq!(bitmap.count(), 7);
        // Setting twice does not count twice.
        bitmap.set(64).unwrap();
        assert_eq!(bitmap.count(), 7);
        bitmap.clear(64).unwrap();
        assert!(!bitmap.test(64).unwrap());
        assert!(bitmap.test(63).unwrap());
        assert_eq!(bitmap.count(), 6);
        assert!(!bitmap.is_empty());
    }

    #[test]
    fn out_of_range_pages_are_errors() {
        let mut bitmap = DirtyBitmap::new(100).unwrap();
        let err = DirtyError::PageOutOfRange {
            page: 100,
            pages: 100,
        };
        assert_eq!(bitmap.set(100), Err(err));
        assert_eq!(bitmap.test(100), Err(err));
        assert_eq!(bitmap.clear(100), Err(err));
        assert!(bitmap.set(u64::MAX).is_err());
        // Page 100..127 share the last word with valid pages: nothing leaked into it.
        assert!(bitmap.is_empty());
        assert!(DirtyBitmap::new(0).unwrap().set(0).is_err());
    }

    #[test]
    fn oversized_bitmap_is_refused() {
        assert_eq!(
            DirtyBitmap::new(MAX_PAGES + 1),
            Err(DirtyError::TooLarge {
                pages: MAX_PAGES + 1
            })
        );
        assert!(DirtyBitmap::new(u64::MAX).is_err());
    }

    #[test]
    fn iteration_is_ascending_and_skips_empty_words() {
        let mut bitmap = DirtyBitmap::new(64 * 100 + 5).unwrap();
        let wanted = [
            0u64,
            5,
            63,
            64,
            65,
            640,
            3000,
            64 * 100 - 1,
            64 * 100,
            64 * 100 + 4,
        ];
        // Set in a scrambled order: the iterator must sort by position, not by insertion.
        for &page in wanted.iter().rev() {
            bitmap.set(page).unwrap();
        }
        assert_eq!(pages_of(&bitmap), wanted);
        assert_eq!(bitmap.count(), wanted.len() as u64);
        let via_into_iter: Vec<u64> = (&bitmap).into_iter().collect();
        assert_eq!(via_into_iter, wanted);
    }

    #[test]
    fn iteration_matches_a_reference_set() {
        // A deterministic pseudo-random pattern (64-bit LCG) against a BTreeSet.
        let pages = 16384;
        let mut bitmap = DirtyBitmap::new(pages).unwrap();
        let mut reference = BTreeSet::new();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let page = (state >> 33) % pages;
            bitmap.set(page).unwrap();
            reference.insert(page);
        }
        assert_eq!(
            pages_of(&bitmap),
            reference.iter().copied().collect::<Vec<_>>()
        );
        assert_eq!(bitmap.count(), reference.len() as u64);
    }

    #[test]
    fn merge_ors_and_checks_size() {
        let mut a = DirtyBitmap::new(130).unwrap();
        let mut b = DirtyBitmap::new(130).unwrap();
        a.set(1).unwrap();
        a.set(129).unwrap();
        b.set(1).unwrap();
        b.set(64).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(pages_of(&a), vec![1, 64, 129]);
        assert_eq!(pages_of(&b), vec![1, 64], "the source is unchanged");

        let other = DirtyBitmap::new(131).unwrap();
        assert_eq!(
            a.merge(&other),
            Err(DirtyError::SizeMismatch {
                expected: 130,
                found: 131
            })
        );
    }

    #[test]
    fn clear_all_and_set_all_respect_the_tail() {
        let mut bitmap = DirtyBitmap::new(70).unwrap();
        bitmap.set_all();
        assert_eq!(bitmap.count(), 70);
        assert_eq!(pages_of(&bitmap), (0..70).collect::<Vec<_>>());
        bitmap.clear_all();
        assert!(bitmap.is_empty());

        let mut exact = DirtyBitmap::new(128).unwrap();
        exact.set_all();
        assert_eq!(exact.count(), 128);
    }

    #[test]
    fn take_returns_contents_and_leaves_empty() {
        let mut log = DirtyBitmap::new(300).unwrap();
        log.set(7).unwrap();
        log.set(299).unwrap();
        let round = log.take().unwrap();
        assert_eq!(pages_of(&round), vec![7, 299]);
        assert_eq!(round.pages(), 300);
        assert!(log.is_empty());
        assert_eq!(log.pages(), 300);
        // The emptied log keeps working for the next round.
        log.set(8).unwrap();
        assert_eq!(pages_of(&log), vec![8]);
    }

    #[test]
    fn swap_out_hands_over_without_losing_pages() {
        let mut log = DirtyBitmap::new(100).unwrap();
        let mut spare = DirtyBitmap::new(100).unwrap();
        spare.set(50).unwrap(); // stale contents of the previous round: discarded
        log.set(3).unwrap();
        log.set(99).unwrap();
        log.swap_out(&mut spare).unwrap();
        assert_eq!(pages_of(&spare), vec![3, 99]);
        assert!(log.is_empty());

        let mut wrong = DirtyBitmap::new(99).unwrap();
        assert_eq!(
            log.swap_out(&mut wrong),
            Err(DirtyError::SizeMismatch {
                expected: 100,
                found: 99
            })
        );
    }
}
