//! Index arithmetic of descriptor rings, free of any memory or register access.
//!
//! Receive: the device owns descriptors from its head up to (not including) the tail register;
//! the driver takes completed descriptors in order from `next` and gives each back by writing
//! its index to the tail. Transmit: the driver fills descriptors at `tail` and the device sends
//! from its head; `clean` is the oldest descriptor handed over and not yet seen done. One slot
//! always stays empty so that a full ring is distinguishable from an empty one.

/// Why a ring size is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// Not a multiple of 8 (the length register counts 128-byte units), or outside 8..=4096.
    BadLength(usize),
}

/// Smallest and largest descriptor counts accepted.
pub const MIN_LEN: usize = 8;
pub const MAX_LEN: usize = 4096;

/// A ring of `len` descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    len: u16,
}

impl Ring {
    pub fn new(len: usize) -> Result<Ring, RingError> {
        if !(MIN_LEN..=MAX_LEN).contains(&len) || len % 8 != 0 {
            return Err(RingError::BadLength(len));
        }
        Ok(Ring { len: len as u16 })
    }

    pub fn len(self) -> usize {
        usize::from(self.len)
    }

    /// Never true: rings have at least [`MIN_LEN`] descriptors.
    pub fn is_empty(self) -> bool {
        false
    }

    /// The index after `i`.
    pub fn next(self, i: u16) -> u16 {
        if i + 1 >= self.len {
            0
        } else {
            i + 1
        }
    }

    /// The index before `i`.
    pub fn prev(self, i: u16) -> u16 {
        if i == 0 {
            self.len - 1
        } else {
            i - 1
        }
    }

    /// How many steps from `from` forward to `to`.
    pub fn distance(self, from: u16, to: u16) -> u16 {
        let (from, to) = (from % self.len, to % self.len);
        if to >= from {
            to - from
        } else {
            self.len - from + to
        }
    }
}

/// Transmit ring bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxIndices {
    ring: Ring,
    tail: u16,
    clean: u16,
}

impl TxIndices {
    pub fn new(ring: Ring) -> Self {
        TxIndices {
            ring,
            tail: 0,
            clean: 0,
        }
    }

    /// The value for the tail register.
    pub fn tail(&self) -> u16 {
        self.tail
    }

    /// Descriptors handed to the device and not yet reclaimed.
    pub fn in_flight(&self) -> usize {
        usize::from(self.ring.distance(self.clean, self.tail))
    }

    /// Descriptors the driver may fill now.
    pub fn free(&self) -> usize {
        self.ring.len() - 1 - self.in_flight()
    }

    /// Takes the descriptor at the tail for a new frame and moves the tail past it; `None` when
    /// the ring is full.
    pub fn push(&mut self) -> Option<u16> {
        if self.free() == 0 {
            return None;
        }
        let index = self.tail;
        self.tail = self.ring.next(index);
        Some(index)
    }

    /// The oldest in-flight descriptor, to check for completion.
    pub fn oldest(&self) -> Option<u16> {
        (self.clean != self.tail).then_some(self.clean)
    }

    /// The oldest in-flight descriptor is done: reclaim it.
    pub fn reclaim(&mut self) {
        if self.clean != self.tail {
            self.clean = self.ring.next(self.clean);
        }
    }
}

/// Receive ring bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxIndices {
    ring: Ring,
    next: u16,
}

impl RxIndices {
    pub fn new(ring: Ring) -> Self {
        RxIndices { ring, next: 0 }
    }

    /// The initial tail register value: every descriptor but the last belongs to the device.
    pub fn initial_tail(&self) -> u16 {
        self.ring.prev(0)
    }

    /// The next descriptor the device completes.
    pub fn next(&self) -> u16 {
        self.next
    }

    /// The tail register's current value (the last descriptor given back).
    pub fn tail(&self) -> u16 {
        self.ring.prev(self.next)
    }

    /// The descriptor at `next` was taken and is given back: returns the new tail register
    /// value (that descriptor's index) and moves on.
    pub fn recycle(&mut self) -> u16 {
        let index = self.next;
        self.next = self.ring.next(index);
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn lengths() {
        for bad in [0, 1, 4, 7, 12, 4097, 4104, 65536] {
            assert_eq!(Ring::new(bad), Err(RingError::BadLength(bad)));
        }
        for good in [8, 16, 256, 4096] {
            assert_eq!(Ring::new(good).unwrap().len(), good);
        }
    }

    #[test]
    fn index_arithmetic_wraps() {
        let r = Ring::new(8).unwrap();
        assert_eq!(r.next(7), 0);
        assert_eq!(r.next(3), 4);
        assert_eq!(r.prev(0), 7);
        assert_eq!(r.distance(6, 1), 3);
        assert_eq!(r.distance(1, 6), 5);
        assert_eq!(r.distance(4, 4), 0);
    }

    #[test]
    fn tx_fills_to_len_minus_one_then_reclaims_in_order() {
        let mut tx = TxIndices::new(Ring::new(8).unwrap());
        assert_eq!((tx.free(), tx.in_flight(), tx.oldest()), (7, 0, None));
        let pushed: Vec<u16> = core::iter::from_fn(|| tx.push()).collect();
        assert_eq!(pushed, [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!((tx.free(), tx.in_flight(), tx.tail()), (0, 7, 7));
        assert_eq!(tx.oldest(), Some(0));
        tx.reclaim();
        tx.reclaim();
        assert_eq!((tx.free(), tx.oldest()), (2, Some(2)));
        assert_eq!(tx.push(), Some(7));
        assert_eq!(tx.push(), Some(0));
        assert_eq!(tx.push(), None);
        assert_eq!(tx.tail(), 1);
        for _ in 0..20 {
            tx.reclaim(); // extra reclaims on an empty ring do nothing
        }
        assert_eq!((tx.free(), tx.in_flight(), tx.oldest()), (7, 0, None));
    }

    #[test]
    fn tx_many_wraps() {
        let mut tx = TxIndices::new(Ring::new(16).unwrap());
        let mut expected = 0u16;
        for round in 0..100 {
            let n = (round % 15) + 1;
            for _ in 0..n {
                assert_eq!(tx.push(), Some(expected));
                expected = (expected + 1) % 16;
            }
            assert_eq!(tx.in_flight(), n);
            for _ in 0..n {
                tx.reclaim();
            }
            assert_eq!(tx.in_flight(), 0);
        }
    }

    #[test]
    fn rx_hands_back_in_order() {
        let mut rx = RxIndices::new(Ring::new(8).unwrap());
        assert_eq!(rx.initial_tail(), 7);
        assert_eq!(rx.tail(), 7);
        let tails: Vec<u16> = (0..10).map(|_| rx.recycle()).collect();
        assert_eq!(tails, [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]);
        assert_eq!(rx.next(), 2);
        assert_eq!(rx.tail(), 1);
    }
}
