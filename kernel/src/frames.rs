//! The physical frame allocator: hands out 4 KiB frames of usable RAM.
//!
//! It is built from the boot memory map before any heap exists, so it
//! allocates nothing itself: the caller provides the bitmap storage (one bit
//! per frame over the span from the lowest to the highest usable frame, see
//! [`bitmap_words_for`]) and the list of usable ranges is kept in a fixed
//! array of [`MAX_RANGES`] entries.
//!
//! Usable ranges are byte ranges in any order, possibly unaligned, overlapping
//! or adjacent. They are merged first (touching or overlapping ranges become
//! one) and each merged range is then shrunk to whole frames (start rounded
//! up, end rounded down). Empty results are dropped. If more than
//! [`MAX_RANGES`] separate ranges remain, the smallest ones are left out and
//! counted ([`FrameAllocator::ignored_ranges`]): that memory is simply not
//! used.
//!
//! A set bit means "not available": allocated, reserved, or a hole between
//! usable ranges. Frames in holes are therefore never handed out, and
//! [`FrameAllocator::free`] refuses addresses outside the usable ranges.
//!
//! The allocator does not treat physical address 0 specially: if the memory
//! map says the first frame is usable, [`FrameAllocator::alloc`] may return
//! `Some(0)`. Callers that do not want it (or want the low megabyte for AP
//! start-up code) [`reserve`](FrameAllocator::reserve) it.

use core::fmt;
use core::ops::Range;

/// The size of a frame in bytes.
pub const FRAME_SIZE: u64 = 4096;

/// How many separate usable ranges the allocator manages.
pub const MAX_RANGES: usize = 64;

const BITS: u64 = u64::BITS as u64;

/// Why a frame allocator operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The memory map holds no whole usable frame.
    NoUsableMemory,
    /// The bitmap given to [`FrameAllocator::new`] has fewer words than
    /// [`bitmap_words_for`] asks for.
    BitmapTooSmall {
        /// Words needed.
        needed: usize,
        /// Words provided.
        provided: usize,
    },
    /// A byte range whose start lies after its end.
    InvalidRange {
        /// The range's start.
        start: u64,
        /// The range's end.
        end: u64,
    },
    /// An address that is not a multiple of [`FRAME_SIZE`].
    Unaligned {
        /// The address given.
        addr: u64,
    },
    /// A frame outside the usable memory the allocator manages.
    NotManaged {
        /// The first such frame's address.
        addr: u64,
    },
    /// A frame that is already free.
    DoubleFree {
        /// The first such frame's address.
        addr: u64,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FrameError::NoUsableMemory => write!(f, "the memory map has no usable frame"),
            FrameError::BitmapTooSmall { needed, provided } => write!(
                f,
                "frame bitmap too small: {needed} words needed, {provided} provided"
            ),
            FrameError::InvalidRange { start, end } => {
                write!(f, "invalid range {start:#x}..{end:#x}")
            }
            FrameError::Unaligned { addr } => write!(f, "address {addr:#x} is not frame-aligned"),
            FrameError::NotManaged { addr } => {
                write!(
                    f,
                    "frame {addr:#x} is not usable memory managed by the allocator"
                )
            }
            FrameError::DoubleFree { addr } => write!(f, "frame {addr:#x} is already free"),
        }
    }
}

/// Usable memory as sorted, disjoint, non-adjacent frame-number ranges.
#[derive(Debug, Clone, Copy)]
struct RangeSet {
    /// `(first frame, end frame)`, ascending.
    ranges: [(u64, u64); MAX_RANGES],
    len: usize,
    ignored: usize,
}

impl RangeSet {
    /// Merges the byte ranges of `usable` and aligns them to frames.
    ///
    /// Works without allocating by sweeping the (cloned) iterator once per
    /// step: each merged range costs one pass to find its start and one pass
    /// per input range it absorbs, so `O(n^2)` for `n` input ranges, which is
    /// nothing for memory maps of a few dozen entries.
    fn build<I: Iterator<Item = Range<u64>> + Clone>(usable: I) -> Self {
        let mut set = RangeSet {
            ranges: [(0, 0); MAX_RANGES],
            len: 0,
            ignored: 0,
        };
        let non_empty = usable.filter(|r| r.start < r.end);
        // End of the previous merged range: the next one starts above it.
        let mut previous_end: Option<u64> = None;
        loop {
            let start = non_empty
                .clone()
                .map(|r| r.start)
                .filter(|&s| previous_end.is_none_or(|p| s > p))
                .min();
            let Some(start) = start else {
                break;
            };
            let mut end = start;
            loop {
                let grown = non_empty
                    .clone()
                    .filter(|r| r.start >= start && r.start <= end)
                    .map(|r| r.end)
                    .max()
                    .unwrap_or(end)
                    .max(end);
                if grown == end {
                    break;
                }
                end = grown;
            }
            previous_end = Some(end);
            let first = start.div_ceil(FRAME_SIZE);
            let last = end / FRAME_SIZE;
            if first < last {
                set.push(first, last);
            }
        }
        set
    }

    /// Appends a range above all the others; when full, the smallest range
    /// (possibly this one) is left out.
    fn push(&mut self, first: u64, end: u64) {
        if self.len < MAX_RANGES {
            self.ranges[self.len] = (first, end);
            self.len += 1;
            return;
        }
        self.ignored += 1;
        let size = end - first;
        let smallest = self
            .ranges
            .iter()
            .enumerate()
            .min_by_key(|(_, &(s, e))| e - s)
            .map(|(i, &(s, e))| (i, e - s));
        if let Some((index, smallest_size)) = smallest {
            if size > smallest_size {
                self.ranges.copy_within(index + 1.., index);
                self.ranges[MAX_RANGES - 1] = (first, end);
            }
        }
    }

    fn as_slice(&self) -> &[(u64, u64)] {
        self.ranges.get(..self.len).unwrap_or(&[])
    }

    /// The managed range holding `frame`.
    fn find(&self, frame: u64) -> Option<(u64, u64)> {
        self.as_slice()
            .iter()
            .copied()
            .find(|&(s, e)| s <= frame && frame < e)
    }

    /// `(first frame, frame count)` of the bitmap's span.
    fn span(&self) -> Option<(u64, u64)> {
        let (first, _) = *self.as_slice().first()?;
        let (_, end) = *self.as_slice().last()?;
        Some((first, end - first))
    }

    fn words(&self) -> usize {
        self.span().map_or(0, |(_, frames)| {
            usize::try_from(frames.div_ceil(BITS)).unwrap_or(usize::MAX)
        })
    }
}

/// The number of `u64` words the bitmap for `usable` needs: one bit per frame
/// from the lowest to the highest usable frame (holes included). `usable` is
/// interpreted exactly as by [`FrameAllocator::new`].
pub fn bitmap_words_for(usable: impl Iterator<Item = Range<u64>> + Clone) -> usize {
    RangeSet::build(usable).words()
}

/// The lowest frame-aligned range of `bytes` bytes (rounded up to whole
/// frames) that lies in usable memory at or above `min_addr`: a home for the
/// allocator's own bitmap before the allocator exists. `usable` is
/// interpreted exactly as by [`FrameAllocator::new`]. Remember to
/// [`reserve`](FrameAllocator::reserve) the range once the allocator is built.
pub fn find_region(
    usable: impl Iterator<Item = Range<u64>> + Clone,
    bytes: u64,
    min_addr: u64,
) -> Option<Range<u64>> {
    let frames = bytes.div_ceil(FRAME_SIZE).max(1);
    let min_frame = min_addr.div_ceil(FRAME_SIZE);
    let set = RangeSet::build(usable);
    set.as_slice().iter().find_map(|&(s, e)| {
        let start = s.max(min_frame);
        let end = start.checked_add(frames)?;
        (end <= e).then(|| start * FRAME_SIZE..end * FRAME_SIZE)
    })
}

/// The physical frame allocator. See the [module docs](self).
#[derive(Debug)]
pub struct FrameAllocator<'a> {
    /// One bit per frame from `base`; exactly as many words as needed.
    bitmap: &'a mut [u64],
    set: RangeSet,
    /// Frame number of bit 0.
    base: u64,
    total: u64,
    free: u64,
    /// Word where the last allocation was found (next-fit).
    hint: usize,
}

impl<'a> FrameAllocator<'a> {
    /// Builds the allocator over the usable byte ranges in `usable` (any
    /// order; unaligned, overlapping, empty and reversed ranges are fine),
    /// keeping its state in `bitmap`, which must hold at least
    /// [`bitmap_words_for`] words (extra words are left untouched).
    pub fn new(
        usable: impl Iterator<Item = Range<u64>> + Clone,
        bitmap: &'a mut [u64],
    ) -> Result<Self, FrameError> {
        let set = RangeSet::build(usable);
        let Some((base, _)) = set.span() else {
            return Err(FrameError::NoUsableMemory);
        };
        let needed = set.words();
        let provided = bitmap.len();
        let bitmap = bitmap
            .get_mut(..needed)
            .ok_or(FrameError::BitmapTooSmall { needed, provided })?;
        bitmap.fill(u64::MAX);
        let mut allocator = FrameAllocator {
            bitmap,
            set,
            base,
            total: 0,
            free: 0,
            hint: 0,
        };
        for &(s, e) in set.as_slice() {
            let freed = allocator.clear_bits(s - base, e - base);
            allocator.total += e - s;
            allocator.free += freed;
        }
        Ok(allocator)
    }

    /// Marks every frame touched by the byte range `range` as in use (the
    /// start is rounded down, the end up), e.g. the bitmap's own storage or
    /// early page tables. Frames already in use and parts of the range outside
    /// managed memory are fine; only a reversed range is an error.
    pub fn reserve(&mut self, range: Range<u64>) -> Result<(), FrameError> {
        if range.start > range.end {
            return Err(FrameError::InvalidRange {
                start: range.start,
                end: range.end,
            });
        }
        let first = range.start / FRAME_SIZE;
        let end = range.end.div_ceil(FRAME_SIZE);
        let set = self.set;
        for &(s, e) in set.as_slice() {
            let (lo, hi) = (s.max(first), e.min(end));
            if lo < hi {
                let taken = self.set_bits(lo - self.base, hi - self.base);
                self.free -= taken;
            }
        }
        Ok(())
    }

    /// Allocates one frame and returns its physical address, or `None` when
    /// memory is exhausted. Scans the bitmap a word at a time, starting where
    /// the previous allocation was found.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let words = self.bitmap.len();
        let hint = self.hint.min(words);
        for index in (hint..words).chain(0..hint) {
            let Some(word) = self.bitmap.get_mut(index) else {
                continue;
            };
            if *word != u64::MAX {
                let bit = word.trailing_ones();
                *word |= 1 << bit;
                self.free -= 1;
                self.hint = index;
                let frame = self.base + index as u64 * BITS + u64::from(bit);
                return Some(frame * FRAME_SIZE);
            }
        }
        None
    }

    /// Allocates `count` physically contiguous frames whose first frame
    /// number is a multiple of `align_frames` (0 counts as 1), and returns the
    /// first frame's address. The run never spans a hole in the memory map.
    /// `None` when `count` is 0 or no such run is free.
    pub fn alloc_contiguous(&mut self, count: usize, align_frames: usize) -> Option<u64> {
        let count = u64::try_from(count).ok()?;
        if count == 0 || count > self.free {
            return None;
        }
        let align = u64::try_from(align_frames.max(1)).ok()?;
        let set = self.set;
        for &(s, e) in set.as_slice() {
            let mut candidate = s.checked_next_multiple_of(align)?;
            while let Some(end) = candidate.checked_add(count) {
                if end > e {
                    break;
                }
                match self.first_with(candidate - self.base, end - self.base, true) {
                    None => {
                        let taken = self.set_bits(candidate - self.base, end - self.base);
                        self.free -= taken;
                        return Some(candidate * FRAME_SIZE);
                    }
                    Some(used) => {
                        let Some(next) = (self.base + used + 1).checked_next_multiple_of(align)
                        else {
                            break;
                        };
                        candidate = next;
                    }
                }
            }
        }
        None
    }

    /// Returns the frame at `addr` to the free pool.
    pub fn free(&mut self, addr: u64) -> Result<(), FrameError> {
        self.free_contiguous(addr, 1)
    }

    /// Returns `count` frames starting at `addr` to the free pool. Every frame
    /// is checked first: on any error nothing is changed.
    pub fn free_contiguous(&mut self, addr: u64, count: usize) -> Result<(), FrameError> {
        if !addr.is_multiple_of(FRAME_SIZE) {
            return Err(FrameError::Unaligned { addr });
        }
        if count == 0 {
            return Ok(());
        }
        let first = addr / FRAME_SIZE;
        let (_, range_end) = self
            .set
            .find(first)
            .ok_or(FrameError::NotManaged { addr })?;
        let end = u64::try_from(count)
            .ok()
            .and_then(|c| first.checked_add(c))
            .filter(|&end| end <= range_end)
            .ok_or(FrameError::NotManaged {
                addr: range_end * FRAME_SIZE,
            })?;
        if let Some(idle) = self.first_with(first - self.base, end - self.base, false) {
            return Err(FrameError::DoubleFree {
                addr: (self.base + idle) * FRAME_SIZE,
            });
        }
        let freed = self.clear_bits(first - self.base, end - self.base);
        self.free += freed;
        Ok(())
    }

    /// Frames of usable memory managed (free or not).
    pub fn total_frames(&self) -> u64 {
        self.total
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// The managed usable memory as frame-aligned byte ranges, ascending.
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.set
            .as_slice()
            .iter()
            .map(|&(s, e)| s * FRAME_SIZE..e * FRAME_SIZE)
    }

    /// How many separate usable ranges were left out because there were more
    /// than [`MAX_RANGES`].
    pub fn ignored_ranges(&self) -> usize {
        self.set.ignored
    }

    /// True if the frame holding `addr` is managed usable memory.
    pub fn contains(&self, addr: u64) -> bool {
        self.set.find(addr / FRAME_SIZE).is_some()
    }

    /// True if the frame holding `addr` is managed and free.
    pub fn is_free(&self, addr: u64) -> bool {
        let frame = addr / FRAME_SIZE;
        self.set.find(frame).is_some()
            && self
                .first_with(frame - self.base, frame - self.base + 1, true)
                .is_none()
    }

    /// Sets bits `lo..hi` and returns how many were clear before.
    fn set_bits(&mut self, lo: u64, hi: u64) -> u64 {
        self.update_bits(lo, hi, true)
    }

    /// Clears bits `lo..hi` and returns how many were set before.
    fn clear_bits(&mut self, lo: u64, hi: u64) -> u64 {
        self.update_bits(lo, hi, false)
    }

    fn update_bits(&mut self, lo: u64, hi: u64, set: bool) -> u64 {
        let mut changed = 0;
        for_each_word(lo, hi, |index, mask| {
            if let Some(word) = self.bitmap.get_mut(index) {
                if set {
                    changed += u64::from((mask & !*word).count_ones());
                    *word |= mask;
                } else {
                    changed += u64::from((mask & *word).count_ones());
                    *word &= !mask;
                }
            }
            true
        });
        changed
    }

    /// The first bit in `lo..hi` that is set (`set == true`) or clear.
    fn first_with(&self, lo: u64, hi: u64, set: bool) -> Option<u64> {
        let mut found = None;
        for_each_word(lo, hi, |index, mask| {
            let word = self.bitmap.get(index).copied().unwrap_or(u64::MAX);
            let hits = if set { word & mask } else { !word & mask };
            if hits != 0 {
                found = Some(index as u64 * BITS + u64::from(hits.trailing_zeros()));
                return false;
            }
            true
        });
        found
    }
}

/// Calls `f(word index, mask)` for each bitmap word covering bits `lo..hi`,
/// in order, until `f` returns false.
fn for_each_word(lo: u64, hi: u64, mut f: impl FnMut(usize, u64) -> bool) {
    let mut bit = lo;
    while bit < hi {
        let offset = bit % BITS;
        let n = (hi - bit).min(BITS - offset);
        let mask = if n == BITS {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << offset
        };
        let index = usize::try_from(bit / BITS).unwrap_or(usize::MAX);
        if !f(index, mask) {
            return;
        }
        bit += n;
    }
}

#[cfg(test)]
// One-element arrays of ranges are memory maps with one usable range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;
    use alloc::vec;
    use alloc::vec::Vec;

    const MIB: u64 = 1 << 20;

    /// Usable ranges of a QEMU `-m 512M` BIOS boot as the bootloader reports
    /// them: low memory below the EBDA, then the extended memory with the
    /// bootloader's own allocations (kernel, page tables, boot info) carved
    /// out, in the (unsorted) order the map lists them.
    fn qemu_512m() -> Vec<Range<u64>> {
        vec![
            0x0..0x9_fc00,        // below the EBDA, not page-aligned at the end
            0x100_000..0x40_0000, // 1 MiB .. 4 MiB
            0x80_0000..0x1ffe_0000,
            0x40_0000..0x40_0000, // an empty entry
        ]
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn qemu_map_ranges_counts_and_bitmap_size() {
        let map = qemu_512m();
        let words = bitmap_words_for(map.iter().cloned());
        // Span: frame 0 up to 0x1ffe0 frames -> 131040 bits -> 2048 words (16 KiB).
        assert_eq!(words, 2048);
        let mut bitmap = vec![0u64; words];
        let fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let ranges: Vec<_> = fa.ranges().collect();
        assert_eq!(
            ranges,
            [0x0..0x9_f000, 0x10_0000..0x40_0000, 0x80_0000..0x1ffe_0000]
        );
        assert_eq!(fa.total_frames(), 0x9f + 0x300 + 0x1_f7e0);
        assert_eq!(fa.free_frames(), fa.total_frames());
        assert_eq!(fa.ignored_ranges(), 0);
        assert!(fa.contains(0x9_e000));
        assert!(
            !fa.contains(0x9_f000),
            "the partial frame under the EBDA is not used"
        );
        assert!(!fa.contains(0xa_0000));
        assert!(!fa.contains(0x50_0000));
        assert!(fa.contains(0x1ffd_f000));
        assert!(!fa.contains(0x1ffe_0000));
    }

    #[test]
    fn qemu_map_exhaust_never_touches_holes_then_free_all() {
        let map = qemu_512m();
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let total = fa.total_frames();
        let mut seen = BTreeSet::new();
        while let Some(addr) = fa.alloc() {
            assert_eq!(addr % FRAME_SIZE, 0);
            assert!(fa.contains(addr), "{addr:#x} is in a hole");
            assert!(!fa.is_free(addr));
            assert!(seen.insert(addr), "{addr:#x} handed out twice");
        }
        assert_eq!(seen.len() as u64, total);
        assert_eq!(fa.free_frames(), 0);
        assert_eq!(fa.alloc(), None);
        assert_eq!(fa.alloc_contiguous(1, 1), None);
        for &addr in &seen {
            fa.free(addr).unwrap();
        }
        assert_eq!(fa.free_frames(), total);
    }

    #[test]
    fn unaligned_ranges_are_shrunk_to_whole_frames() {
        let map = [0x1234..0x5678];
        let mut bitmap = [0u64; 1];
        let fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        assert_eq!(fa.ranges().collect::<Vec<_>>(), [0x2000..0x5000]);
        assert_eq!(fa.total_frames(), 3);
        // A range smaller than a frame, or straddling a boundary without a
        // whole frame, gives nothing.
        let mut bitmap = [0u64; 1];
        assert_eq!(
            FrameAllocator::new([0x1800..0x2800, 0x10..0x20].into_iter(), &mut bitmap).err(),
            Some(FrameError::NoUsableMemory)
        );
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge_before_alignment() {
        let map = [
            0x8000..0x9000,
            0x3000..0x8000,
            0x1000..0x5000,
            0x2000..0x3000,
            // Two unaligned halves that together hold whole frames.
            0x10_1800..0x10_2800,
            0x10_2800..0x10_4000,
            // Reversed and empty entries are ignored.
            #[allow(clippy::reversed_empty_ranges)]
            (0x50_0000..0x40_0000),
            0x60_0000..0x60_0000,
        ];
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        assert_eq!(
            fa.ranges().collect::<Vec<_>>(),
            [0x1000..0x9000, 0x10_2000..0x10_4000]
        );
        assert_eq!(fa.total_frames(), 8 + 2);
    }

    #[test]
    fn bitmap_size_is_checked_and_extra_words_untouched() {
        let map = qemu_512m();
        let words = bitmap_words_for(map.iter().cloned());
        let mut small = vec![0u64; words - 1];
        assert_eq!(
            FrameAllocator::new(map.iter().cloned(), &mut small).err(),
            Some(FrameError::BitmapTooSmall {
                needed: words,
                provided: words - 1
            })
        );
        let mut big = vec![0x5555_5555_5555_5555u64; words + 3];
        {
            let fa = FrameAllocator::new(map.iter().cloned(), &mut big).unwrap();
            assert_eq!(fa.free_frames(), fa.total_frames());
        }
        assert!(big[words..].iter().all(|&w| w == 0x5555_5555_5555_5555));
        assert_eq!(bitmap_words_for(core::iter::empty()), 0);
        let mut none: [u64; 0] = [];
        assert_eq!(
            FrameAllocator::new(core::iter::empty(), &mut none).err(),
            Some(FrameError::NoUsableMemory)
        );
        // A huge span asks for a bitmap nobody can provide, without overflow.
        let sparse = [0..0x1000, (1 << 50)..(1 << 50) + 0x1000];
        let needed = bitmap_words_for(sparse.iter().cloned());
        assert_eq!(needed, (1 << 32) + 1);
        let mut one = [0u64; 1];
        assert!(matches!(
            FrameAllocator::new(sparse.iter().cloned(), &mut one),
            Err(FrameError::BitmapTooSmall { .. })
        ));
    }

    #[test]
    fn ranges_at_the_top_of_the_address_space() {
        let map = [u64::MAX - 0x3000..u64::MAX];
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        assert_eq!(fa.total_frames(), 2);
        let a = fa.alloc().unwrap();
        let b = fa.alloc().unwrap();
        assert_eq!((a, b), (0xffff_ffff_ffff_d000, 0xffff_ffff_ffff_e000));
        assert_eq!(fa.alloc(), None);
        fa.free_contiguous(a, 2).unwrap();
        assert_eq!(
            fa.alloc_contiguous(2, 2),
            None,
            "no 2-aligned pair up there"
        );
        assert_eq!(fa.alloc_contiguous(2, usize::MAX), None);
        assert_eq!(fa.alloc_contiguous(usize::MAX, 1), None);
        assert_eq!(fa.alloc_contiguous(2, 1), Some(a));
        assert_eq!(
            fa.free_contiguous(a, usize::MAX),
            Err(FrameError::NotManaged {
                addr: 0xffff_ffff_ffff_f000
            })
        );
        fa.reserve(u64::MAX..u64::MAX).unwrap();
        fa.reserve(0..u64::MAX).unwrap();
    }

    #[test]
    fn more_ranges_than_capacity_keeps_the_largest() {
        // 70 separate ranges: 1..=70 frames each, with one-frame holes between.
        let mut map = Vec::new();
        let mut at = 0x10_0000;
        for frames in 1..=70u64 {
            map.push(at..at + frames * FRAME_SIZE);
            at += (frames + 1) * FRAME_SIZE;
        }
        // Present them in a scrambled order.
        map.reverse();
        map.swap(3, 40);
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        assert_eq!(fa.ignored_ranges(), 6);
        assert_eq!(fa.ranges().count(), MAX_RANGES);
        let sizes: Vec<u64> = fa
            .ranges()
            .map(|r| (r.end - r.start) / FRAME_SIZE)
            .collect();
        assert_eq!(sizes, (7..=70).collect::<Vec<_>>());
        assert_eq!(fa.total_frames(), (7..=70).sum::<u64>());
        // The ignored ranges are not managed.
        assert!(!fa.contains(0x10_0000));
        let ranges: Vec<_> = fa.ranges().collect();
        assert!(ranges.windows(2).all(|w| w[0].end < w[1].start));
    }

    #[test]
    fn reserve_marks_frames_used_idempotently() {
        let map = qemu_512m();
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let total = fa.total_frames();
        // The first frame (null) and a partial range rounded outwards: 3 frames.
        fa.reserve(0..1).unwrap();
        fa.reserve(0x10_0800..0x10_2001).unwrap();
        assert_eq!(fa.free_frames(), total - 1 - 3);
        // Again: nothing changes.
        fa.reserve(0x10_0000..0x10_3000).unwrap();
        assert_eq!(fa.free_frames(), total - 4);
        // Partly in the hole under 1 MiB: only the managed part counts.
        fa.reserve(0x9_e000..0x10_0000).unwrap();
        assert_eq!(fa.free_frames(), total - 5);
        // Wholly unmanaged (the bootloader's area, or above RAM): fine.
        fa.reserve(0x40_0000..0x80_0000).unwrap();
        fa.reserve(0x1_0000_0000..0x2_0000_0000).unwrap();
        fa.reserve(0x5000..0x5000).unwrap();
        assert_eq!(fa.free_frames(), total - 5);
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 0x6000..0x5000;
        assert_eq!(
            fa.reserve(reversed),
            Err(FrameError::InvalidRange {
                start: 0x6000,
                end: 0x5000
            })
        );
        assert!(!fa.is_free(0));
        assert!(!fa.is_free(0x10_2000));
        assert!(fa.is_free(0x10_3000));
        // Reserved frames are never handed out.
        let mut handed = BTreeSet::new();
        while let Some(a) = fa.alloc() {
            handed.insert(a);
        }
        assert_eq!(handed.len() as u64, total - 5);
        for reserved in [0, 0x10_0000, 0x10_1000, 0x10_2000, 0x9_e000] {
            assert!(!handed.contains(&reserved));
        }
    }

    #[test]
    fn alloc_is_next_fit() {
        let map = [0x1000..0x11000];
        let mut bitmap = [0u64; 1];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let a = fa.alloc().unwrap();
        let b = fa.alloc().unwrap();
        assert_eq!((a, b), (0x1000, 0x2000));
        fa.free(a).unwrap();
        // The hint stays on the word; the lowest free bit in it is reused.
        assert_eq!(fa.alloc(), Some(0x1000));
    }

    #[test]
    fn next_fit_wraps_around() {
        // Three words' worth of frames.
        let map = [0..192 * FRAME_SIZE];
        let mut bitmap = [0u64; 3];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let all: Vec<u64> = (0..192).map(|_| fa.alloc().unwrap()).collect();
        assert_eq!(all.last(), Some(&(191 * FRAME_SIZE)));
        fa.free(5 * FRAME_SIZE).unwrap();
        assert_eq!(fa.alloc(), Some(5 * FRAME_SIZE));
    }

    #[test]
    fn contiguous_respects_alignment_and_holes() {
        // Frames 1..4 usable, hole at 4, frames 5..13 usable, hole, 16..48.
        let map = [
            FRAME_SIZE..4 * FRAME_SIZE,
            5 * FRAME_SIZE..13 * FRAME_SIZE,
            16 * FRAME_SIZE..48 * FRAME_SIZE,
        ];
        let mut bitmap = [0u64; 1];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        // 4 frames do not fit in 1..4 and must not span the hole at 4.
        assert_eq!(fa.alloc_contiguous(4, 1), Some(5 * FRAME_SIZE));
        // Aligned to 8 frames: 8..13 is too short (5 frames) for 6 -> 16.
        assert_eq!(fa.alloc_contiguous(6, 8), Some(16 * FRAME_SIZE));
        // Aligned to 4: the first candidates are taken -> next free at 24.
        assert_eq!(fa.alloc_contiguous(4, 4), Some(24 * FRAME_SIZE));
        // Non-power-of-two alignment is fine: multiples of 3.
        assert_eq!(fa.alloc_contiguous(3, 3), Some(9 * FRAME_SIZE));
        assert_eq!(fa.alloc_contiguous(2, 0), Some(FRAME_SIZE));
        // 20 contiguous: only 28..48 has room.
        assert_eq!(fa.alloc_contiguous(20, 1), Some(28 * FRAME_SIZE));
        // Left: 3, 12, 22, 23; the only pair is 22..24.
        assert_eq!(fa.free_frames(), 4);
        assert_eq!(fa.alloc_contiguous(2, 1), Some(22 * FRAME_SIZE));
        assert_eq!(
            fa.alloc_contiguous(2, 1),
            None,
            "only scattered frames left"
        );
        assert_eq!(fa.alloc_contiguous(0, 1), None);
        // Whatever is left is reachable one frame at a time.
        let rest: Vec<u64> = core::iter::from_fn(|| fa.alloc()).collect();
        assert_eq!(rest, [3 * FRAME_SIZE, 12 * FRAME_SIZE]);
        assert_eq!(fa.free_frames(), 0);
    }

    #[test]
    fn contiguous_runs_never_cover_a_hole_on_the_qemu_map() {
        let map = qemu_512m();
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let ranges: Vec<_> = fa.ranges().collect();
        // 2 MiB-aligned 2 MiB runs (for large pages): all must lie inside one range.
        let mut runs = 0;
        while let Some(addr) = fa.alloc_contiguous(512, 512) {
            assert_eq!(addr % (2 * MIB), 0);
            let end = addr + 2 * MIB;
            assert!(ranges.iter().any(|r| r.start <= addr && end <= r.end));
            runs += 1;
        }
        // 1 MiB..4 MiB holds one aligned run (2..4 MiB), 8 MiB..0x1ffe0000 holds 251.
        assert_eq!(runs, 1 + 251);
    }

    #[test]
    fn free_errors() {
        let map = qemu_512m();
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let a = fa.alloc().unwrap();
        assert_eq!(fa.free(a + 8), Err(FrameError::Unaligned { addr: a + 8 }));
        assert_eq!(
            fa.free(0xa_0000),
            Err(FrameError::NotManaged { addr: 0xa_0000 })
        );
        assert_eq!(
            fa.free(0x2000_0000),
            Err(FrameError::NotManaged { addr: 0x2000_0000 })
        );
        assert_eq!(
            fa.free(u64::MAX - 0xfff),
            Err(FrameError::NotManaged {
                addr: u64::MAX - 0xfff
            })
        );
        fa.free(a).unwrap();
        assert_eq!(fa.free(a), Err(FrameError::DoubleFree { addr: a }));
        let never = 0x1000_0000;
        assert_eq!(fa.free(never), Err(FrameError::DoubleFree { addr: never }));
        assert_eq!(fa.free_frames(), fa.total_frames());
    }

    #[test]
    fn free_contiguous_is_all_or_nothing() {
        let map = qemu_512m();
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let run = fa.alloc_contiguous(8, 1).unwrap();
        let free_before = fa.free_frames();
        // One frame in the middle already freed: the whole call fails.
        fa.free(run + 3 * FRAME_SIZE).unwrap();
        assert_eq!(
            fa.free_contiguous(run, 8),
            Err(FrameError::DoubleFree {
                addr: run + 3 * FRAME_SIZE
            })
        );
        assert_eq!(fa.free_frames(), free_before + 1);
        assert!(!fa.is_free(run));
        // Running off the end of a range into a hole: NotManaged at the hole.
        let last = 0x9_e000;
        fa.reserve(last..last + FRAME_SIZE).unwrap();
        assert_eq!(
            fa.free_contiguous(last, 2),
            Err(FrameError::NotManaged { addr: 0x9_f000 })
        );
        assert!(!fa.is_free(last));
        assert_eq!(
            fa.free_contiguous(run + 1, 2),
            Err(FrameError::Unaligned { addr: run + 1 })
        );
        assert_eq!(fa.free_contiguous(0xa_0000, 0), Ok(()));
        // The intact parts free fine.
        fa.free_contiguous(run, 3).unwrap();
        fa.free_contiguous(run + 4 * FRAME_SIZE, 4).unwrap();
        fa.free_contiguous(last, 1).unwrap();
        assert_eq!(fa.free_frames(), fa.total_frames());
    }

    #[test]
    fn find_region_places_the_bitmap() {
        let map = qemu_512m();
        let words = bitmap_words_for(map.iter().cloned()) as u64;
        let home = find_region(map.iter().cloned(), words * 8, MIB).unwrap();
        assert_eq!(home, 0x10_0000..0x10_4000);
        assert_eq!(
            find_region(map.iter().cloned(), 4 * MIB, 0),
            Some(0x80_0000..0xc0_0000),
            "skips ranges that are too small"
        );
        assert_eq!(find_region(map.iter().cloned(), 1 << 40, 0), None);
        assert_eq!(find_region(map.iter().cloned(), 1, u64::MAX), None);
        assert_eq!(find_region(core::iter::empty(), 1, 0), None);
        // The usual sequence: place, build, reserve the bitmap's own frames.
        let mut bitmap = vec![0u64; words as usize];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        fa.reserve(home.clone()).unwrap();
        assert_eq!(fa.free_frames(), fa.total_frames() - 4);
        assert!(!fa.is_free(home.start));
    }

    /// Random alloc / alloc_contiguous / free / free_contiguous / reserve
    /// against a set of allocated frames.
    #[test]
    fn random_operations_match_a_model() {
        let map = [
            0x3000..0x9_f800,
            0x10_0000..0x18_0000,
            0x17_f000..0x20_1234, // overlaps the previous one
            0x40_0000..0x40_1000,
        ];
        let mut bitmap = vec![0u64; bitmap_words_for(map.iter().cloned())];
        let mut fa = FrameAllocator::new(map.iter().cloned(), &mut bitmap).unwrap();
        let ranges: Vec<_> = fa.ranges().collect();
        let managed: Vec<u64> = ranges
            .iter()
            .flat_map(|r| (r.start / FRAME_SIZE..r.end / FRAME_SIZE).map(|f| f * FRAME_SIZE))
            .collect();
        assert_eq!(managed.len() as u64, fa.total_frames());
        let mut used: BTreeSet<u64> = BTreeSet::new();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for step in 0..20_000 {
            match rng.below(10) {
                0..=3 => match fa.alloc() {
                    Some(a) => {
                        assert!(fa.contains(a));
                        assert!(used.insert(a), "step {step}: {a:#x} handed out twice");
                    }
                    None => assert_eq!(used.len(), managed.len()),
                },
                4 => {
                    let count = 1 + rng.below(20) as usize;
                    let align = [0, 1, 2, 4, 8, 3][rng.below(6) as usize];
                    if let Some(a) = fa.alloc_contiguous(count, align) {
                        assert_eq!((a / FRAME_SIZE) % align.max(1) as u64, 0);
                        let end = a + count as u64 * FRAME_SIZE;
                        assert!(ranges.iter().any(|r| r.start <= a && end <= r.end));
                        for f in (a..end).step_by(FRAME_SIZE as usize) {
                            assert!(used.insert(f), "step {step}: {f:#x} handed out twice");
                        }
                    }
                }
                5..=7 => {
                    // Free a random managed frame; the model predicts the outcome.
                    let a = managed[rng.below(managed.len() as u64) as usize];
                    let expected = if used.remove(&a) {
                        Ok(())
                    } else {
                        Err(FrameError::DoubleFree { addr: a })
                    };
                    assert_eq!(fa.free(a), expected);
                }
                8 => {
                    let a = managed[rng.below(managed.len() as u64) as usize];
                    let count = 1 + rng.below(6);
                    let frames: Vec<u64> = (0..count).map(|i| a + i * FRAME_SIZE).collect();
                    let result = fa.free_contiguous(a, count as usize);
                    let unmanaged = frames.iter().find(|f| !managed.contains(f));
                    let idle = frames.iter().find(|f| !used.contains(f));
                    match (unmanaged, idle) {
                        (Some(&u), _) => {
                            assert_eq!(result, Err(FrameError::NotManaged { addr: u }))
                        }
                        (None, Some(&i)) => {
                            assert_eq!(result, Err(FrameError::DoubleFree { addr: i }))
                        }
                        (None, None) => {
                            assert_eq!(result, Ok(()));
                            for f in &frames {
                                used.remove(f);
                            }
                        }
                    }
                }
                _ => {
                    let start = rng.below(0x50_0000);
                    let len = rng.below(0x8000);
                    fa.reserve(start..start + len).unwrap();
                    let first = start / FRAME_SIZE * FRAME_SIZE;
                    let mut f = first;
                    while f < start + len {
                        if managed.binary_search(&f).is_ok() {
                            used.insert(f);
                        }
                        f += FRAME_SIZE;
                    }
                }
            }
            assert_eq!(
                fa.free_frames(),
                fa.total_frames() - used.len() as u64,
                "step {step}"
            );
        }
        // Final state: exactly the model's frames are in use.
        for &a in &managed {
            assert_eq!(fa.is_free(a), !used.contains(&a), "{a:#x}");
        }
    }
}
