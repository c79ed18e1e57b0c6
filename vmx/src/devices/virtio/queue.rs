#![forbid(unsafe_code)]
//! The split virtqueue (virtio 1.x spec, section 2.7 "Split Virtqueues"), device side.
//!
//! Three areas in guest memory, all little-endian:
//!
//! | area | layout |
//! |---|---|
//! | descriptor table | `size` x { addr: u64, len: u32, flags: u16, next: u16 } |
//! | available ring (driver writes) | flags: u16, idx: u16, ring: `size` x u16, used_event: u16 |
//! | used ring (device writes) | flags: u16, idx: u16, ring: `size` x { id: u32, len: u32 }, avail_event: u16 |
//!
//! With the legacy interface the driver gives one page frame number; the descriptor table
//! starts there, the available ring follows it, and the used ring starts at the next 4096-byte
//! boundary ([`SplitQueue::legacy`]).
//!
//! Everything here reads guest memory through [`GuestMemory`] and trusts none of it: every
//! index is range-checked, chains are bounded (a loop in `next` pointers ends the walk after
//! at most `size` descriptors per table), indirect tables are checked for size, nesting and
//! placement, and an area outside guest RAM is an error value. A misbehaving driver gets a
//! [`QueueError`], which the device turns into "needs reset"; the host never panics.
//!
//! No memory barriers are needed between the writes of a completion (data, then the used
//! element, then the used index): the vCPU does not run while the host handles its exits and
//! completions on this single core, and x86 keeps stores in order anyway.

use alloc::vec::Vec;
use core::fmt;

use super::LEGACY_QUEUE_ALIGN;
use crate::guest_mem::GuestMemory;

/// This descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// The device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// The buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Available-ring flag: the driver does not want interrupts.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Bytes of one descriptor.
pub const DESC_SIZE: u64 = 16;
/// Largest queue size the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One buffer of a chain, in chain order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    /// The device writes it (`DESC_F_WRITE`).
    pub writable: bool,
}

/// A descriptor chain taken from the available ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor: what the used ring reports back.
    pub head: u16,
    /// The non-empty buffers, in chain order (indirect tables flattened).
    pub segments: Vec<Segment>,
}

/// How a driver broke the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// A ring or the descriptor table lies (partly) outside guest RAM.
    RingOutsideRam { gpa: u64 },
    /// The available index moved by more than the queue size since the last entry taken.
    AvailIndexJump { avail_idx: u16, last_avail: u16 },
    /// The available ring names a head descriptor past the table.
    HeadOutOfRange { head: u16 },
    /// A `next` field points past its table.
    NextOutOfRange { next: u16 },
    /// More descriptors than the table holds: a loop, or an over-long chain.
    ChainTooLong,
    /// An indirect descriptor while indirect descriptors were not negotiated.
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table.
    NestedIndirect,
    /// An indirect descriptor that also has `DESC_F_NEXT` (the spec forbids it).
    IndirectWithNext,
    /// An indirect table whose length is 0 or not a multiple of 16 bytes.
    IndirectBadLength { len: u32 },
    /// An indirect table outside guest RAM.
    IndirectOutsideRam { gpa: u64 },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::RingOutsideRam { gpa } => {
                write!(f, "virtqueue area at {gpa:#x} is outside guest RAM")
            }
            QueueError::AvailIndexJump {
                avail_idx,
                last_avail,
            } => write!(
                f,
                "available index jumped from {last_avail} to {avail_idx}, more than the queue size"
            ),
            QueueError::HeadOutOfRange { head } => {
                write!(f, "head descriptor {head} is past the descriptor table")
            }
            QueueError::NextOutOfRange { next } => {
                write!(f, "next descriptor {next} is past its table")
            }
            QueueError::ChainTooLong => {
                write!(f, "descriptor chain longer than its table (a loop?)")
            }
            QueueError::IndirectNotNegotiated => {
                write!(f, "indirect descriptor without the negotiated feature")
            }
            QueueError::NestedIndirect => write!(f, "indirect descriptor in an indirect table"),
            QueueError::IndirectWithNext => write!(f, "indirect descriptor with the NEXT flag"),
            QueueError::IndirectBadLength { len } => {
                write!(f, "indirect table of {len} bytes (not a multiple of 16)")
            }
            QueueError::IndirectOutsideRam { gpa } => {
                write!(f, "indirect table at {gpa:#x} is outside guest RAM")
            }
        }
    }
}

/// One raw descriptor.
#[derive(Debug, Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The device's view of one split virtqueue: where its areas are and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Next available-ring entry to take (free-running, wraps at 2^16 like the ring's idx).
    last_avail: u16,
    /// Next used-ring entry to fill (free-running).
    next_used: u16,
}

fn read_u16<M: GuestMemory + ?Sized>(mem: &M, gpa: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    mem.read(gpa, &mut b).then(|| u16::from_le_bytes(b))
}

impl SplitQueue {
    /// A queue of `size` entries (a power of two, 1..=32768) with its areas at the given
    /// guest-physical addresses.
    pub fn new(size: u16, desc: u64, avail: u64, used: u64) -> SplitQueue {
        SplitQueue {
            size: size.clamp(1, MAX_QUEUE_SIZE),
            desc,
            avail,
            used,
            last_avail: 0,
            next_used: 0,
        }
    }

    /// The legacy layout from a page frame number: descriptors at `pfn * 4096`, the
    /// available ring right after them, the used ring at the next 4096-byte boundary.
    pub fn legacy(pfn: u32, size: u16) -> SplitQueue {
        let size = size.clamp(1, MAX_QUEUE_SIZE);
        let desc = u64::from(pfn) * LEGACY_QUEUE_ALIGN;
        let avail = desc + DESC_SIZE * u64::from(size);
        let avail_end = avail + 6 + 2 * u64::from(size);
        let used = avail_end.div_ceil(LEGACY_QUEUE_ALIGN) * LEGACY_QUEUE_ALIGN;
        SplitQueue::new(size, desc, avail, used)
    }

    /// Bytes a legacy queue of `size` entries occupies from its first page.
    pub fn legacy_bytes(size: u16) -> u64 {
        let q = SplitQueue::legacy(0, size);
        q.used + 6 + 8 * u64::from(q.size)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn areas(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// The next available-ring entry the device will take.
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    /// The next used-ring entry the device will fill.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Sets both positions (restoring a saved device).
    pub fn set_positions(&mut self, last_avail: u16, next_used: u16) {
        self.last_avail = last_avail;
        self.next_used = next_used;
    }

    /// Entries the driver made available and the device has not taken yet.
    pub fn available<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, QueueError> {
        let avail_idx =
            read_u16(mem, self.avail + 2).ok_or(QueueError::RingOutsideRam { gpa: self.avail })?;
        let pending = avail_idx.wrapping_sub(self.last_avail);
        if pending > self.size {
            return Err(QueueError::AvailIndexJump {
                avail_idx,
                last_avail: self.last_avail,
            });
        }
        Ok(pending)
    }

    /// Whether the driver asked for no interrupts (`AVAIL_F_NO_INTERRUPT`). A ring outside
    /// RAM reads as "interrupts wanted".
    pub fn interrupts_suppressed<M: GuestMemory + ?Sized>(&self, mem: &M) -> bool {
        read_u16(mem, self.avail).is_some_and(|f| f & AVAIL_F_NO_INTERRUPT != 0)
    }

    /// Takes the next available chain, if any. `indirect` says whether indirect descriptors
    /// were negotiated. On an error the entry is consumed all the same: the queue is broken
    /// and the device must be reset by the driver.
    pub fn pop<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        indirect: bool,
    ) -> Result<Option<Chain>, QueueError> {
        if self.available(mem)? == 0 {
            return Ok(None);
        }
        let slot = self.avail + 4 + 2 * u64::from(self.last_avail % self.size);
        let head = read_u16(mem, slot).ok_or(QueueError::RingOutsideRam { gpa: slot })?;
        self.last_avail = self.last_avail.wrapping_add(1);
        if head >= self.size {
            return Err(QueueError::HeadOutOfRange { head });
        }
        self.walk(mem, head, indirect).map(Some)
    }

    /// Follows the chain from `head` (see the module documentation for the bounds).
    fn walk<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        head: u16,
        indirect: bool,
    ) -> Result<Chain, QueueError> {
        let mut segments = Vec::new();
        // The table being walked: the ring's own, or an indirect one.
        let mut table = self.desc;
        let mut table_len = u32::from(self.size);
        let mut in_indirect = false;
        // Descriptors left to visit in this table: a chain can hold each at most once, so
        // more visits mean a loop.
        let mut budget = table_len;
        let mut index = head;
        loop {
            if budget == 0 {
                return Err(QueueError::ChainTooLong);
            }
            budget -= 1;
            let d = self.descriptor(mem, table, index, in_indirect)?;
            if d.flags & DESC_F_INDIRECT != 0 {
                if !indirect {
                    return Err(QueueError::IndirectNotNegotiated);
                }
                if in_indirect {
                    return Err(QueueError::NestedIndirect);
                }
                if d.flags & DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext);
                }
                if d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 {
                    return Err(QueueError::IndirectBadLength { len: d.len });
                }
                let entries = d.len / DESC_SIZE as u32;
                // A chain may not be longer than the queue (virtio 1.x 2.7.5.3.1), indirect
                // tables included; this also bounds the walk of a huge table.
                if entries > u32::from(self.size) {
                    return Err(QueueError::ChainTooLong);
                }
                let end = d.addr.checked_add(u64::from(d.len));
                let mut probe = [0u8; 1];
                if end.is_none() || !mem.read(d.addr + u64::from(d.len) - 1, &mut probe) {
                    return Err(QueueError::IndirectOutsideRam { gpa: d.addr });
                }
                table = d.addr;
                table_len = entries;
                budget = entries;
                in_indirect = true;
                index = 0;
                continue;
            }
            if d.len > 0 {
                segments.push(Segment {
                    addr: d.addr,
                    len: d.len,
                    writable: d.flags & DESC_F_WRITE != 0,
                });
            }
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(Chain { head, segments });
            }
            if u32::from(d.next) >= table_len {
                return Err(QueueError::NextOutOfRange { next: d.next });
            }
            index = d.next;
        }
    }

    fn descriptor<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        table: u64,
        index: u16,
        in_indirect: bool,
    ) -> Result<Descriptor, QueueError> {
        let gpa = table.wrapping_add(DESC_SIZE * u64::from(index));
        let mut raw = [0u8; 16];
        if !mem.read(gpa, &mut raw) {
            return Err(if in_indirect {
                QueueError::IndirectOutsideRam { gpa }
            } else {
                QueueError::RingOutsideRam { gpa }
            });
        }
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&raw[0..8]);
        Ok(Descriptor {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        })
    }

    /// Returns the chain with head `head` to the driver, `len` bytes written into it: the used
    /// element first, then the used index, so the driver never sees an index before its
    /// element.
    pub fn push_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let slot = self.used + 4 + 8 * u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&len.to_le_bytes());
        if !mem.write(slot, &elem) {
            return Err(QueueError::RingOutsideRam { gpa: slot });
        }
        let next = self.next_used.wrapping_add(1);
        if !mem.write(self.used + 2, &next.to_le_bytes()) {
            return Err(QueueError::RingOutsideRam { gpa: self.used });
        }
        self.next_used = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_ram::Ram;
    use alloc::format;
    use alloc::vec;

    impl Ram {
        fn desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = table + 16 * u64::from(i);
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            assert!(self.write(at, &raw));
        }

        fn offer(&mut self, q: &SplitQueue, heads: &[u16]) {
            let idx = read_u16(self, q.avail + 2).unwrap();
            for (k, &h) in heads.iter().enumerate() {
                let slot = q.avail + 4 + 2 * u64::from(idx.wrapping_add(k as u16) % q.size);
                assert!(self.write(slot, &h.to_le_bytes()));
            }
            let new = idx.wrapping_add(heads.len() as u16);
            assert!(self.write(q.avail + 2, &new.to_le_bytes()));
        }
    }

    const PFN: u32 = 1;

    fn setup() -> (Ram, SplitQueue) {
        (Ram(vec![0; 64 * 1024]), SplitQueue::legacy(PFN, 8))
    }

    #[test]
    fn legacy_layout() {
        let q = SplitQueue::legacy(2, 128);
        assert_eq!(q.areas(), (0x2000, 0x2000 + 2048, 0x3000));
        assert_eq!(SplitQueue::legacy_bytes(128), 0x1000 + 6 + 8 * 128);
        // 256 entries: 4 KiB of descriptors, the avail ring spills into the next page.
        let q = SplitQueue::legacy(0, 256);
        assert_eq!(q.areas(), (0, 4096, 8192));
        assert_eq!(SplitQueue::new(0, 0, 0, 0).size(), 1);
    }

    #[test]
    fn direct_chain_in_order() {
        let (mut m, mut q) = setup();
        let t = q.desc;
        m.desc(t, 3, 0x8000, 16, DESC_F_NEXT, 5);
        m.desc(t, 5, 0x9000, 512, DESC_F_NEXT | DESC_F_WRITE, 0);
        m.desc(t, 0, 0x9200, 1, DESC_F_WRITE, 0);
        m.offer(&q, &[3]);
        assert_eq!(q.available(&m), Ok(1));
        let chain = q.pop(&m, false).unwrap().unwrap();
        assert_eq!(chain.head, 3);
        assert_eq!(
            chain.segments,
            vec![
                Segment {
                    addr: 0x8000,
                    len: 16,
                    writable: false
                },
                Segment {
                    addr: 0x9000,
                    len: 512,
                    writable: true
                },
                Segment {
                    addr: 0x9200,
                    len: 1,
                    writable: true
                },
            ]
        );
        assert_eq!(q.pop(&m, false), Ok(None));
        assert_eq!(q.last_avail(), 1);
        q.push_used(&mut m, 3, 513).unwrap();
        assert_eq!(read_u16(&m, q.used + 2), Some(1));
        let mut elem = [0u8; 8];
        assert!(m.read(q.used + 4, &mut elem));
        assert_eq!(elem, [3, 0, 0, 0, 1, 2, 0, 0]);
    }

    #[test]
    fn zero_length_descriptors_are_skipped() {
        let (mut m, mut q) = setup();
        m.desc(q.desc, 0, 0x8000, 0, DESC_F_NEXT, 1);
        m.desc(q.desc, 1, 0x8100, 4, 0, 0);
        m.offer(&q, &[0]);
        let chain = q.pop(&m, false).unwrap().unwrap();
        assert_eq!(chain.segments.len(), 1);
    }

    #[test]
    fn loops_and_bad_indices() {
        let (mut m, mut q) = setup();
        let t = q.desc;
        // 0 -> 1 -> 0 ...
        m.desc(t, 0, 0x8000, 4, DESC_F_NEXT, 1);
        m.desc(t, 1, 0x8000, 4, DESC_F_NEXT, 0);
        m.offer(&q, &[0]);
        assert_eq!(q.pop(&m, false), Err(QueueError::ChainTooLong));
        // A self-loop.
        m.desc(t, 2, 0x8000, 4, DESC_F_NEXT, 2);
        m.offer(&q, &[2]);
        assert_eq!(q.pop(&m, false), Err(QueueError::ChainTooLong));
        // next past the table.
        m.desc(t, 3, 0x8000, 4, DESC_F_NEXT, 8);
        m.offer(&q, &[3]);
        assert_eq!(
            q.pop(&m, false),
            Err(QueueError::NextOutOfRange { next: 8 })
        );
        // head past the table.
        m.offer(&q, &[9]);
        assert_eq!(
            q.pop(&m, false),
            Err(QueueError::HeadOutOfRange { head: 9 })
        );
        // Every error consumed its entry.
        assert_eq!(q.last_avail(), 4);
        assert_eq!(q.available(&m), Ok(0));
    }

    #[test]
    fn avail_index_jump() {
        let (mut m, q) = setup();
        assert!(m.write(q.avail + 2, &9u16.to_le_bytes()));
        assert_eq!(
            q.available(&m),
            Err(QueueError::AvailIndexJump {
                avail_idx: 9,
                last_avail: 0
            })
        );
        // Wrapping: last 0xFFFE, idx 2 -> 4 pending.
        let mut q2 = q.clone();
        q2.set_positions(0xFFFE, 0xFFFE);
        assert!(m.write(q.avail + 2, &2u16.to_le_bytes()));
        assert_eq!(q2.available(&m), Ok(4));
    }

    #[test]
    fn rings_outside_ram() {
        let m = Ram(vec![0; 4096]);
        let mut q = SplitQueue::legacy(0x100, 8);
        assert!(matches!(
            q.available(&m),
            Err(QueueError::RingOutsideRam { .. })
        ));
        assert!(matches!(
            q.pop(&m, true),
            Err(QueueError::RingOutsideRam { .. })
        ));
        let mut m = m;
        assert!(matches!(
            q.push_used(&mut m, 0, 0),
            Err(QueueError::RingOutsideRam { .. })
        ));
        assert!(!q.interrupts_suppressed(&m));
    }

    #[test]
    fn indirect_tables() {
        let (mut m, mut q) = setup();
        let table = 0xA000;
        m.desc(q.desc, 0, table, 3 * 16, DESC_F_INDIRECT, 0);
        m.desc(table, 0, 0x8000, 16, DESC_F_NEXT, 1);
        m.desc(table, 1, 0x9000, 4096, DESC_F_NEXT | DESC_F_WRITE, 2);
        m.desc(table, 2, 0xB000, 1, DESC_F_WRITE, 0);
        m.offer(&q, &[0]);
        let chain = q.pop(&m, true).unwrap().unwrap();
        assert_eq!(chain.head, 0);
        assert_eq!(chain.segments.len(), 3);
        assert_eq!(chain.segments[1].len, 4096);

        // Not negotiated.
        m.offer(&q, &[0]);
        assert_eq!(q.pop(&m, false), Err(QueueError::IndirectNotNegotiated));
        // Indirect + next.
        m.desc(q.desc, 1, table, 48, DESC_F_INDIRECT | DESC_F_NEXT, 2);
        m.offer(&q, &[1]);
        assert_eq!(q.pop(&m, true), Err(QueueError::IndirectWithNext));
        // Bad lengths.
        for len in [0u32, 17, 40] {
            m.desc(q.desc, 2, table, len, DESC_F_INDIRECT, 0);
            m.offer(&q, &[2]);
            assert_eq!(q.pop(&m, true), Err(QueueError::IndirectBadLength { len }));
        }
        // Longer than the queue.
        m.desc(q.desc, 2, table, 16 * 9, DESC_F_INDIRECT, 0);
        m.offer(&q, &[2]);
        assert_eq!(q.pop(&m, true), Err(QueueError::ChainTooLong));
        // Nested.
        m.desc(table, 2, 0xC000, 16, DESC_F_INDIRECT, 0);
        m.desc(q.desc, 2, table, 48, DESC_F_INDIRECT, 0);
        m.offer(&q, &[2]);
        assert_eq!(q.pop(&m, true), Err(QueueError::NestedIndirect));
        // A loop inside the table.
        m.desc(table, 2, 0xB000, 1, DESC_F_WRITE | DESC_F_NEXT, 0);
        m.offer(&q, &[2]);
        assert_eq!(q.pop(&m, true), Err(QueueError::ChainTooLong));
        // next past the indirect table (3 entries).
        m.desc(table, 2, 0xB000, 1, DESC_F_WRITE | DESC_F_NEXT, 3);
        m.offer(&q, &[2]);
        assert_eq!(q.pop(&m, true), Err(QueueError::NextOutOfRange { next: 3 }));
        // Outside RAM, and wrapping the address space.
        m.desc(q.desc, 3, 0xFFF0, 32, DESC_F_INDIRECT, 0);
        m.offer(&q, &[3]);
        assert_eq!(
            q.pop(&m, true),
            Err(QueueError::IndirectOutsideRam { gpa: 0xFFF0 })
        );
        m.desc(q.desc, 3, u64::MAX - 15, 32, DESC_F_INDIRECT, 0);
        m.offer(&q, &[3]);
        assert!(matches!(
            q.pop(&m, true),
            Err(QueueError::IndirectOutsideRam { .. })
        ));
    }

    #[test]
    fn interrupt_suppression_flag() {
        let (mut m, q) = setup();
        assert!(!q.interrupts_suppressed(&m));
        assert!(m.write(q.avail, &AVAIL_F_NO_INTERRUPT.to_le_bytes()));
        assert!(q.interrupts_suppressed(&m));
    }

    #[test]
    fn errors_display() {
        for e in [
            QueueError::RingOutsideRam { gpa: 1 },
            QueueError::AvailIndexJump {
                avail_idx: 1,
                last_avail: 2,
            },
            QueueError::HeadOutOfRange { head: 1 },
            QueueError::NextOutOfRange { next: 1 },
            QueueError::ChainTooLong,
            QueueError::IndirectNotNegotiated,
            QueueError::NestedIndirect,
            QueueError::IndirectWithNext,
            QueueError::IndirectBadLength { len: 1 },
            QueueError::IndirectOutsideRam { gpa: 1 },
        ] {
            assert!(!format!("{e}").is_empty());
        }
    }
}
