//! [`OutQueue`]: the outbound bytes of one connection, waiting for a non-blocking [`Pipe`].

use alloc::vec::Vec;

use crate::{Pipe, PipeError};

/// Bytes queued for a [`Pipe`] that may take only part of them at a time.
///
/// Protocol code appends whole messages ([`push`](Self::push), or encodes them in place with
/// [`push_with`](Self::push_with)) and calls [`flush`](Self::flush) whenever the pipe may have
/// room; what the pipe does not take stays queued, in order, for the next flush.
///
/// Sending advances a start offset instead of shifting the buffer, so a pipe taking a few bytes
/// at a time costs linear, not quadratic, time; the sent prefix is dropped when a push finds it
/// is at least half the buffer (amortised over the bytes sent), and all at once when the queue
/// empties. An emptied buffer keeps at most [`KEEP_CAPACITY`](Self::KEEP_CAPACITY) bytes of
/// capacity.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// Queued bytes; those before `start` were taken by the pipe already.
    buf: Vec<u8>,
    start: usize,
    bytes_sent: u64,
}

impl OutQueue {
    /// An emptied buffer keeps at most this much capacity, so one large burst does not pin
    /// megabytes for the rest of the connection.
    pub const KEEP_CAPACITY: usize = 1024 * 1024;

    /// An empty queue (allocates nothing until the first push).
    pub const fn new() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            bytes_sent: 0,
        }
    }

    /// Bytes queued and not yet taken by the pipe.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether the pipe has taken everything queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total bytes the pipe took, over the queue's life.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Appends `bytes` at the end of the queue.
    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Lets `encode` append one message in place at the end of the queue: no copy through a
    /// scratch buffer.
    ///
    /// `encode` gets the queue's buffer, which holds the unsent bytes before the end: it may
    /// only append to it (and `reserve`), never change or remove what is there. On error
    /// everything it appended is dropped, so the queue never holds half a message.
    pub fn push_with<E>(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.compact();
        let end = self.buf.len();
        let result = encode(&mut self.buf);
        debug_assert!(
            self.buf.len() >= end,
            "OutQueue::push_with: the encoder removed queued bytes"
        );
        if result.is_err() {
            self.buf.truncate(end);
        }
        result
    }

    /// Sends as much of the queue as the pipe takes now; returns how many bytes it took.
    ///
    /// A pipe claiming to take more than it was given is held to what it was given. On a pipe
    /// error, the bytes taken before it stay counted and the rest stays queued.
    pub fn flush(&mut self, pipe: &mut impl Pipe) -> Result<usize, PipeError> {
        let mut sent = 0;
        while self.start < self.buf.len() {
            let pending = &self.buf[self.start..];
            let taken = pipe.send(pending)?.min(pending.len());
            if taken == 0 {
                break;
            }
            self.start += taken;
            self.bytes_sent += taken as u64;
            sent += taken;
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > Self::KEEP_CAPACITY {
                self.buf.shrink_to(Self::KEEP_CAPACITY);
            }
        }
        Ok(sent)
    }

    /// Drops the sent prefix once it is at least half the buffer, so moving the unsent tail is
    /// paid for by the bytes that were sent.
    fn compact(&mut self) {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const KEEP_CAPACITY: usize = OutQueue::KEEP_CAPACITY;

    /// Takes at most `limit` bytes per `send`, and nothing once `calls_left` sends were made;
    /// reports `claim` instead of what it took when set; fails with `error` once set.
    struct TestPipe {
        taken: Vec<u8>,
        limit: usize,
        calls_left: usize,
        claim: Option<usize>,
        error: Option<PipeError>,
        calls: usize,
    }

    impl TestPipe {
        fn new(limit: usize) -> Self {
            Self {
                taken: Vec::new(),
                limit,
                calls_left: usize::MAX,
                claim: None,
                error: None,
                calls: 0,
            }
        }
    }

    impl Pipe for TestPipe {
        fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
            if let Some(error) = self.error {
                return Err(error);
            }
            self.calls += 1;
            if self.calls_left == 0 {
                return Ok(0);
            }
            self.calls_left -= 1;
            let n = data.len().min(self.limit);
            self.taken.extend_from_slice(&data[..n]);
            Ok(self.claim.unwrap_or(n))
        }

        fn recv(&mut self, _buf: &mut [u8]) -> Result<usize, PipeError> {
            Ok(0)
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn partial_sends_keep_order_and_count() {
        let mut queue = OutQueue::new();
        let mut pipe = TestPipe::new(7);
        let mut expected = Vec::new();
        let (mut compacted, mut kept) = (0, 0);
        for round in 0..60u8 {
            let bytes = pattern(usize::from(round) % 23 + 1, round);
            expected.extend_from_slice(&bytes);
            let start_before = queue.start;
            queue.push(&bytes);
            // A sent prefix of half the buffer or more is dropped on push; a shorter one stays.
            if start_before > 0 && queue.start == 0 {
                compacted += 1;
            } else if queue.start > 0 {
                assert!(queue.start * 2 < queue.buf.len());
                kept += 1;
            }
            assert_eq!(
                queue.len() as u64 + queue.bytes_sent(),
                expected.len() as u64
            );
            // A pipe that is full takes nothing, and nothing moves.
            if round % 4 == 0 {
                pipe.calls_left = 0;
                let before = queue.len();
                assert_eq!(queue.flush(&mut pipe), Ok(0));
                assert_eq!(queue.len(), before);
            }
            // Two sends of at most 7 bytes per flush: the rest waits for the next one.
            pipe.calls_left = 2;
            let sent_before = queue.bytes_sent();
            let queued_before = queue.len();
            let sent = queue.flush(&mut pipe).unwrap();
            assert_eq!(sent, queued_before.min(14));
            assert_eq!(queue.bytes_sent(), sent_before + sent as u64);
            assert_eq!(queue.len(), queued_before - sent);
        }
        assert!(compacted > 0 && kept > 0, "{compacted} {kept}");
        pipe.calls_left = usize::MAX;
        queue.flush(&mut pipe).unwrap();
        assert!(queue.is_empty());
        assert_eq!(pipe.taken, expected);
        assert_eq!(queue.bytes_sent(), expected.len() as u64);
    }

    #[test]
    fn a_pipe_claiming_too_much_does_not_move_past_the_data() {
        let mut queue = OutQueue::new();
        queue.push(b"hello");
        let mut pipe = TestPipe::new(usize::MAX);
        pipe.claim = Some(1000);
        assert_eq!(queue.flush(&mut pipe), Ok(5));
        assert_eq!(queue.bytes_sent(), 5);
        assert!(queue.is_empty());
        assert_eq!(pipe.calls, 1);
        // The queue still works afterwards.
        queue.push(b"world");
        pipe.claim = None;
        assert_eq!(queue.flush(&mut pipe), Ok(5));
        assert_eq!(pipe.taken, b"helloworld");
        assert_eq!(queue.bytes_sent(), 10);
    }

    #[test]
    fn capacity_shrinks_once_a_burst_is_sent() {
        let mut queue = OutQueue::new();
        queue.push(&vec![0xA5; 4 * KEEP_CAPACITY]);
        let mut pipe = TestPipe::new(KEEP_CAPACITY / 2);
        pipe.calls_left = 3;
        queue.flush(&mut pipe).unwrap();
        assert!(!queue.is_empty());
        assert!(
            queue.buf.capacity() >= 4 * KEEP_CAPACITY,
            "kept while bytes wait"
        );
        pipe.calls_left = usize::MAX;
        queue.flush(&mut pipe).unwrap();
        assert!(queue.is_empty());
        assert!(queue.buf.capacity() <= KEEP_CAPACITY);
        assert_eq!(queue.bytes_sent(), 4 * KEEP_CAPACITY as u64);
        assert_eq!(pipe.taken.len(), 4 * KEEP_CAPACITY);
    }

    #[test]
    fn push_with_appends_in_place_and_rolls_back_on_error() {
        let mut queue = OutQueue::new();
        queue.push(b"ab");
        queue
            .push_with(|out| {
                out.extend_from_slice(b"cd");
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(queue.len(), 4);
        // Half a message, then a failure: none of it stays.
        assert_eq!(
            queue.push_with(|out| {
                out.extend_from_slice(b"half");
                Err("too long")
            }),
            Err("too long")
        );
        assert_eq!(queue.len(), 4);
        let mut pipe = TestPipe::new(usize::MAX);
        queue.flush(&mut pipe).unwrap();
        assert_eq!(pipe.taken, b"abcd");
    }

    #[test]
    fn errors_keep_what_was_taken_counted_and_the_rest_queued() {
        let mut queue = OutQueue::new();
        queue.push(b"0123456789");
        let mut pipe = TestPipe::new(4);
        pipe.calls_left = 1;
        assert_eq!(queue.flush(&mut pipe), Ok(4));
        pipe.error = Some(PipeError::Reset);
        assert_eq!(queue.flush(&mut pipe), Err(PipeError::Reset));
        assert_eq!(queue.bytes_sent(), 4);
        assert_eq!(queue.len(), 6);
        // An empty queue does not touch the pipe.
        let mut empty = OutQueue::new();
        assert_eq!(empty.flush(&mut pipe), Ok(0));
    }
}
