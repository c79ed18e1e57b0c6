//! A framed, non-blocking link: messages in and out over any byte pipe.
//!
//! The kernel runs its VMs and the migration on the same cores, so nothing here may block: a
//! [`Pipe`] takes or gives what it can right now, and the [`FrameLink`] keeps what the pipe did
//! not take (outbound) and what does not yet form a frame (inbound) until the next call. The link
//! never decides anything about the protocol; errors are returned for the driver above to turn
//! into aborts.

use core::fmt;

use crate::frame::{self, FrameDecoder, FrameError, FrameKind, Front};
use crate::message::{Message, MessageError, PageBatchView};
use crate::pending::{BatchError, PendingBatch};
use crate::source::SourceGuest;
use transport::OutQueue;

/// Most bytes [`FrameLink::receive`] pulls from the pipe in one call. A peer sending faster than
/// we decode must not make one call run (and buffer) without limit: the caller's loop also runs
/// VMs. 256 KiB is 64 raw pages, a few milliseconds of page writes.
pub const RECEIVE_BUDGET: usize = 256 * 1024;

/// Size of each read from the pipe (into the decoder's buffer, on the heap: kernel stacks are
/// small).
const RECEIVE_CHUNK: usize = 16 * 1024;

pub use transport::{Pipe, PipeError, Received};

/// Why the inbound stream cannot be read any further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The bytes do not form a valid frame: framing is lost.
    Frame(FrameError),
    /// A valid frame does not hold a valid message.
    Message(MessageError),
}

impl From<FrameError> for LinkError {
    fn from(error: FrameError) -> Self {
        LinkError::Frame(error)
    }
}

impl From<MessageError> for LinkError {
    fn from(error: MessageError) -> Self {
        LinkError::Message(error)
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Frame(e) => write!(f, "{e}"),
            LinkError::Message(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for LinkError {}

/// Messages queued as frames for a [`Pipe`], and frames received from it decoded as messages.
///
/// Like the [`FrameDecoder`] it wraps, the inbound side fails for good on the first bad frame or
/// message: the protocol has no way to skip one, so every later call returns the same error.
#[derive(Debug)]
pub struct FrameLink {
    /// Encoded frames the pipe has not taken yet (frames are encoded straight into it).
    out: OutQueue,
    /// Bytes written straight into the pipe's buffer ([`FrameLink::send_pending`]).
    sent_in_place: u64,
    decoder: FrameDecoder,
    bytes_received: u64,
    failure: Option<LinkError>,
}

impl Default for FrameLink {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameLink {
    /// A link with nothing queued or received.
    pub fn new() -> Self {
        Self {
            out: OutQueue::new(),
            sent_in_place: 0,
            decoder: FrameDecoder::new(),
            bytes_received: 0,
            failure: None,
        }
    }

    /// Encodes `message` as one whole frame at the end of the outbound queue. On error nothing is
    /// queued, so the stream never holds half a frame.
    pub fn queue(&mut self, message: &Message) -> Result<(), MessageError> {
        self.out.push_with(|out| message.encode(out))
    }

    /// Encodes a page batch as one whole frame at the end of the outbound queue, its raw pages
    /// read from `guest` straight into the queue. On error nothing is queued.
    pub fn queue_pending(
        &mut self,
        batch: &PendingBatch,
        guest: &(impl SourceGuest + ?Sized),
    ) -> Result<(), BatchError> {
        self.out.push_with(|out| batch.encode(guest, out))
    }

    /// Sends a page batch as one whole frame, its raw pages read from `guest`: written straight
    /// into the pipe's own buffer ([`Pipe::send_in_place`]) when nothing waits in the outbound
    /// queue and the pipe has room for the whole frame, which spares each raw page a copy; else
    /// queued as by [`queue_pending`](Self::queue_pending). On error nothing is sent or queued.
    pub fn send_pending(
        &mut self,
        batch: &PendingBatch,
        guest: &(impl SourceGuest + ?Sized),
        pipe: &mut dyn Pipe,
    ) -> Result<(), BatchError> {
        if self.out.is_empty() {
            let len = batch.wire_len();
            let mut encoded = Ok(());
            let fill = &mut |frame: &mut [u8]| {
                encoded = batch.encode_into(guest, frame);
                encoded.is_ok()
            };
            // A pipe error is the flush's to report; the frame then waits in the queue.
            if pipe.send_in_place(len, fill) == Ok(true) {
                self.sent_in_place += len as u64;
                return Ok(());
            }
            encoded?;
        }
        self.queue_pending(batch, guest)
    }

    /// Bytes queued but not yet accepted by the pipe.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Total bytes the pipe accepted.
    pub fn bytes_sent(&self) -> u64 {
        self.out.bytes_sent() + self.sent_in_place
    }

    /// Total bytes read from the pipe.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// Bytes received that do not yet form a complete frame (or were not yet taken as messages).
    pub fn buffered(&self) -> usize {
        self.decoder.buffered_len()
    }

    /// Sends as much of the queue as the pipe takes now.
    pub fn flush(&mut self, pipe: &mut impl Pipe) -> Result<(), PipeError> {
        self.out.flush(pipe).map(|_| ())
    }

    /// Pulls what is waiting in the pipe, at most [`RECEIVE_BUDGET`] bytes, into the decoder.
    /// The pipe writes straight into the decoder's buffer: no bytes are copied on the way.
    ///
    /// Bytes read before a pipe error stay in the decoder, so messages the peer sent just before
    /// closing can still be taken with [`next_message`](Self::next_message).
    pub fn receive(&mut self, pipe: &mut impl Pipe) -> Result<(), PipeError> {
        let mut budget = RECEIVE_BUDGET;
        while budget > 0 {
            let want = budget.min(RECEIVE_CHUNK);
            let got = self.decoder.push_with(want, |buf| pipe.recv(buf))?;
            if got == 0 {
                break;
            }
            self.bytes_received += got as u64;
            budget -= got;
        }
        Ok(())
    }

    /// Receives what is waiting, at most about [`RECEIVE_BUDGET`] bytes, and hands each whole
    /// frame to `on_frame` as it comes (a stream error once, then nothing more: the link has
    /// failed, as with [`next_incoming`](Self::next_incoming)).
    ///
    /// Frames that lie whole in the pipe's own buffer are read there
    /// ([`Pipe::recv_in_place`]): a page travelling through is not copied on the way. A frame
    /// that is not whole yet waits there for its rest, unless it cannot be whole in one piece
    /// there (the buffer wrapped in it) or should not (it is larger than half the buffer); only
    /// such a frame is received into the decoder's buffer, and no byte past its end, so the
    /// next frame is read in place again.
    ///
    /// Bytes received before a pipe error are handed on before the error is returned, so
    /// messages the peer sent just before closing still arrive.
    pub fn receive_frames(
        &mut self,
        pipe: &mut impl Pipe,
        on_frame: &mut dyn FnMut(Result<Incoming<'_>, LinkError>),
    ) -> Result<(), PipeError> {
        let mut budget = RECEIVE_BUDGET;
        loop {
            if self.failure.is_some() {
                // A failed stream: what arrives is read and dropped, as `receive` does.
                return self.receive(pipe);
            }
            // Whatever the decoder holds whole goes first.
            loop {
                match self.next_incoming() {
                    Ok(Some(incoming)) => on_frame(Ok(incoming)),
                    Ok(None) => break,
                    Err(error) => {
                        on_frame(Err(error));
                        break;
                    }
                }
            }
            if self.failure.is_some() || budget == 0 {
                return Ok(());
            }
            let mut copy = self.decoder.buffered_len() > 0;
            if !copy {
                let mut stop = None;
                let taken = pipe.recv_in_place(&mut |received| {
                    let (taken, why) = take_whole_frames(received, budget, on_frame);
                    stop = Some(why);
                    taken
                })?;
                self.bytes_received += taken as u64;
                budget = budget.saturating_sub(taken);
                match stop {
                    // Nothing offered: nothing waits, or the pipe has no buffer to read in.
                    None => copy = true,
                    Some(InPlaceStop::Failed(error)) => {
                        self.failure = Some(error);
                        return Ok(());
                    }
                    // More may follow the wrap, or the budget is spent: the loop decides.
                    Some(InPlaceStop::Budget | InPlaceStop::Wrapped) if taken > 0 => continue,
                    Some(InPlaceStop::Wrapped | InPlaceStop::NeverWhole) => copy = true,
                    Some(InPlaceStop::Budget | InPlaceStop::Empty | InPlaceStop::Partial) => {
                        return Ok(())
                    }
                }
            }
            if copy {
                // Only up to the end of the frame at the front: then the decoder is empty again.
                let want = self.decoder.wanted().clamp(1, RECEIVE_CHUNK);
                let got = self.decoder.push_with(want, |buf| pipe.recv(buf))?;
                if got == 0 {
                    return Ok(());
                }
                self.bytes_received += got as u64;
                budget = budget.saturating_sub(got);
            }
        }
    }

    /// The next complete message received: `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, LinkError> {
        Ok(self.next_incoming()?.map(Incoming::into_message))
    }

    /// Like [`next_message`](Self::next_message), with a page batch left where it lies in the
    /// receive buffer (see [`PageBatchView`]) instead of decoded into page-sized allocations.
    pub fn next_incoming(&mut self) -> Result<Option<Incoming<'_>>, LinkError> {
        if let Some(error) = &self.failure {
            return Err(error.clone());
        }
        // Every payload is decoded where it lies in the decoder's buffer.
        let result = match self.decoder.next_payload() {
            Ok(None) => Ok(None),
            Ok(Some((kind, payload))) => Incoming::decode(kind, payload)
                .map(Some)
                .map_err(LinkError::from),
            Err(error) => Err(LinkError::from(error)),
        };
        if let Err(error) = &result {
            self.failure = Some(error.clone());
        }
        result
    }
}

/// Why [`take_whole_frames`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum InPlaceStop {
    /// Nothing more is there.
    Empty,
    /// The budget is spent.
    Budget,
    /// A frame has begun and its rest may arrive after it: wait for it.
    Partial,
    /// A frame has begun and the pipe's buffer wrapped after it: it must be copied.
    Wrapped,
    /// A frame has begun that is larger than half the pipe's buffer: it is copied, since
    /// waiting for all of it there would keep the peer's window (rounded down by TCP's window
    /// scaling) nearly or wholly closed.
    NeverWhole,
    /// The stream is bad (reported to the frame handler already).
    Failed(LinkError),
}

/// Hands the whole frames at the start of `received` to `on_frame`, until `budget` bytes were
/// taken (at least one frame) or no whole frame is left; returns the bytes taken and why it
/// stopped.
fn take_whole_frames(
    received: Received<'_>,
    budget: usize,
    on_frame: &mut dyn FnMut(Result<Incoming<'_>, LinkError>),
) -> (usize, InPlaceStop) {
    let mut taken = 0;
    loop {
        if taken >= budget {
            return (taken, InPlaceStop::Budget);
        }
        let rest = &received.bytes[taken..];
        let failed = |error: LinkError, on_frame: &mut dyn FnMut(_)| {
            on_frame(Err(error.clone()));
            (taken, InPlaceStop::Failed(error))
        };
        match frame::front(rest) {
            Err(error) => return failed(LinkError::from(error), on_frame),
            Ok(Front::Partial { len }) => {
                let stop = if rest.is_empty() && !received.wrapped {
                    InPlaceStop::Empty
                } else if len.is_some_and(|len| len > received.capacity / 2) {
                    InPlaceStop::NeverWhole
                } else if received.wrapped {
                    InPlaceStop::Wrapped
                } else {
                    InPlaceStop::Partial
                };
                return (taken, stop);
            }
            Ok(Front::Frame { kind, payload, len }) => {
                match Incoming::decode(kind, payload) {
                    Ok(incoming) => on_frame(Ok(incoming)),
                    Err(error) => return failed(LinkError::from(error), on_frame),
                }
                taken += len;
            }
        }
    }
}

/// A received frame, as [`FrameLink::next_incoming`] gives it.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A page batch, read in place.
    Pages(PageBatchView<'a>),
    /// Any other message, decoded.
    Message(Message),
}

impl<'a> Incoming<'a> {
    /// A checked frame's payload where it lies: a page batch read in place, any other message
    /// decoded.
    fn decode(kind: FrameKind, payload: &'a [u8]) -> Result<Self, MessageError> {
        match kind {
            FrameKind::PageBatch => PageBatchView::parse(payload).map(Incoming::Pages),
            kind => Message::decode_payload(kind, payload).map(Incoming::Message),
        }
    }

    /// The frame as an owned message.
    pub fn into_message(self) -> Message {
        match self {
            Incoming::Pages(view) => Message::PageBatch(view.to_batch()),
            Incoming::Message(message) => message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Abort, AbortReason, PageBatch, PageEncoding, PageEntry, PAGE_SIZE};
    use crate::pending::BatchError;
    use alloc::boxed::Box;
    use alloc::collections::VecDeque;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A pipe over memory that accepts at most `send_limit` bytes per `send` call and returns at
    /// most `recv_limit` bytes per `recv` call.
    struct MemPipe {
        wire: VecDeque<u8>,
        send_limit: usize,
        recv_limit: usize,
        /// Returned by every call once set.
        error: Option<PipeError>,
        sends: usize,
        /// Frames written in place.
        in_place: usize,
    }

    impl MemPipe {
        fn new(send_limit: usize, recv_limit: usize) -> Self {
            Self {
                wire: VecDeque::new(),
                send_limit,
                recv_limit,
                error: None,
                sends: 0,
                in_place: 0,
            }
        }
    }

    impl Pipe for MemPipe {
        fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
            if let Some(e) = self.error {
                return Err(e);
            }
            self.sends += 1;
            let n = data.len().min(self.send_limit);
            self.wire.extend(&data[..n]);
            Ok(n)
        }

        /// In place only for a frame within one send's limit, as a ring with that much room.
        fn send_in_place(
            &mut self,
            len: usize,
            fill: &mut dyn FnMut(&mut [u8]) -> bool,
        ) -> Result<bool, PipeError> {
            if let Some(e) = self.error {
                return Err(e);
            }
            if len > self.send_limit {
                return Ok(false);
            }
            let mut space = vec![0u8; len];
            if !fill(&mut space) {
                return Ok(false);
            }
            self.in_place += 1;
            self.wire.extend(&space);
            Ok(true)
        }

        fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError> {
            let n = buf.len().min(self.recv_limit).min(self.wire.len());
            if n == 0 {
                if let Some(e) = self.error {
                    return Err(e);
                }
            }
            for (slot, byte) in buf.iter_mut().zip(self.wire.drain(..n)) {
                *slot = byte;
            }
            Ok(n)
        }
    }

    fn samples() -> Vec<Message> {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        vec![
            Message::Switchover,
            Message::PageBatch(PageBatch {
                round: 1,
                entries: vec![
                    PageEntry {
                        page: 0,
                        encoding: PageEncoding::Zero,
                    },
                    PageEntry {
                        page: 9,
                        encoding: PageEncoding::Raw(page),
                    },
                ],
            }),
            Message::Commit,
            Message::Abort(Abort {
                reason: AbortReason::Timeout,
                text: "late".to_string(),
            }),
            Message::CommitAck,
        ]
    }

    fn stream_of(messages: &[Message]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for m in messages {
            m.encode(&mut bytes).unwrap();
        }
        bytes
    }

    fn drain(link: &mut FrameLink) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = link.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn frames_split_at_every_byte_boundary() {
        let messages = samples();
        let stream = stream_of(&messages);
        for split in 0..=stream.len() {
            let mut pipe = MemPipe::new(usize::MAX, usize::MAX);
            let mut link = FrameLink::new();
            let mut got = Vec::new();
            for piece in [&stream[..split], &stream[split..]] {
                pipe.wire.extend(piece);
                link.receive(&mut pipe).unwrap();
                got.extend(drain(&mut link));
            }
            assert_eq!(got, messages, "split at {split}");
            assert_eq!(link.buffered(), 0);
            assert_eq!(link.bytes_received(), stream.len() as u64);
        }
    }

    #[test]
    fn one_byte_pipes_in_both_directions() {
        let messages = samples();
        let mut sender = FrameLink::new();
        for m in &messages {
            sender.queue(m).unwrap();
        }
        let total = stream_of(&messages).len();
        assert_eq!(sender.queued(), total);

        let mut pipe = MemPipe::new(1, 1);
        let mut receiver = FrameLink::new();
        let mut got = Vec::new();
        // One flush drains the whole queue one byte per send call.
        sender.flush(&mut pipe).unwrap();
        assert_eq!(pipe.sends, total);
        assert_eq!(sender.queued(), 0);
        assert_eq!(sender.bytes_sent(), total as u64);
        while !pipe.wire.is_empty() {
            receiver.receive(&mut pipe).unwrap();
            got.extend(drain(&mut receiver));
        }
        assert_eq!(got, messages);
    }

    #[test]
    fn queue_accounting_follows_what_the_pipe_takes() {
        let messages = samples();
        let mut link = FrameLink::new();
        let mut pipe = MemPipe::new(7, usize::MAX);
        let mut expected_total = 0;
        let mut sent_so_far = 0u64;
        // Queue while earlier frames are only partly sent, so compaction runs mid-stream.
        for (i, m) in messages.iter().cycle().take(40).enumerate() {
            let mut one = Vec::new();
            m.encode(&mut one).unwrap();
            expected_total += one.len();
            link.queue(m).unwrap();
            assert_eq!(link.queued() as u64 + sent_so_far, expected_total as u64);
            if i % 3 == 0 {
                // A pipe that is full takes nothing.
                let before = link.queued();
                pipe.send_limit = 0;
                link.flush(&mut pipe).unwrap();
                assert_eq!(link.queued(), before);
                pipe.send_limit = 7;
            }
            // A pipe taking 7 bytes per call, three calls per flush.
            let mut limited = Limited {
                inner: &mut pipe,
                calls_left: 3,
            };
            link.flush(&mut limited).unwrap();
            sent_so_far = link.bytes_sent();
            assert_eq!(link.queued() as u64 + sent_so_far, expected_total as u64);
        }
        link.flush(&mut pipe).unwrap();
        assert_eq!(link.queued(), 0);
        assert_eq!(link.bytes_sent(), expected_total as u64);
        let mut receiver = FrameLink::new();
        receiver.receive(&mut pipe).unwrap();
        let expected: Vec<Message> = messages.iter().cycle().take(40).cloned().collect();
        assert_eq!(drain(&mut receiver), expected);
    }

    /// Forwards a limited number of sends, then reports a full pipe.
    struct Limited<'a> {
        inner: &'a mut MemPipe,
        calls_left: usize,
    }

    impl Pipe for Limited<'_> {
        fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
            if self.calls_left == 0 {
                return Ok(0);
            }
            self.calls_left -= 1;
            self.inner.send(data)
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError> {
            self.inner.recv(buf)
        }
    }

    /// Two pages of distinct bytes, as a guest to read batches from.
    fn pages_guest() -> crate::testing::PagesGuest {
        crate::testing::PagesGuest(vec![
            Box::new([0x5A; PAGE_SIZE]),
            Box::new([0xA5; PAGE_SIZE]),
        ])
    }

    fn pending(round: u32, pages: &[u64]) -> PendingBatch {
        PendingBatch {
            round,
            pages: pages
                .iter()
                .map(|&p| crate::pending::PendingPage::InGuest(p))
                .collect(),
        }
    }

    #[test]
    fn page_batches_go_into_the_pipe_in_place_only_with_nothing_queued_before_them() {
        let guest = pages_guest();
        let mut link = FrameLink::new();
        let mut pipe = MemPipe::new(usize::MAX, usize::MAX);
        let batch = pending(1, &[0, 1]);
        let len = batch.wire_len() as u64;
        let mut expected = Vec::new();

        // A message waits in the queue: the batch queues behind it, in order.
        link.queue(&Message::Commit).unwrap();
        expected.push(Message::Commit);
        let commit_len = link.queued() as u64;
        link.send_pending(&batch, &guest, &mut pipe).unwrap();
        expected.push(batch.to_message(&guest).unwrap());
        assert_eq!(link.queued() as u64, commit_len + len);
        assert_eq!(pipe.in_place, 0);
        link.flush(&mut pipe).unwrap();

        // Nothing queued and room in the pipe: in place, nothing through the queue.
        let sends = pipe.sends;
        link.send_pending(&pending(2, &[1]), &guest, &mut pipe)
            .unwrap();
        expected.push(pending(2, &[1]).to_message(&guest).unwrap());
        assert_eq!((pipe.in_place, pipe.sends, link.queued()), (1, sends, 0));
        let in_place_len = pending(2, &[1]).wire_len() as u64;
        assert_eq!(link.bytes_sent(), commit_len + len + in_place_len);

        // No room for the whole frame: queued, sent by the flush.
        pipe.send_limit = 100;
        link.send_pending(&batch, &guest, &mut pipe).unwrap();
        expected.push(batch.to_message(&guest).unwrap());
        assert_eq!((pipe.in_place, link.queued() as u64), (1, len));
        pipe.send_limit = usize::MAX;
        link.flush(&mut pipe).unwrap();

        // A page the guest cannot give: nothing sent, nothing queued.
        let before = (pipe.wire.len(), link.bytes_sent());
        assert!(matches!(
            link.send_pending(&pending(3, &[0, 7]), &guest, &mut pipe),
            Err(BatchError::Guest(_))
        ));
        assert_eq!(
            (pipe.wire.len(), link.bytes_sent(), link.queued()),
            (before.0, before.1, 0)
        );

        let mut receiver = FrameLink::new();
        receiver.receive(&mut pipe).unwrap();
        assert_eq!(drain(&mut receiver), expected);

        // A broken pipe: the frame waits in the queue for the flush, which reports the error.
        pipe.error = Some(PipeError::Reset);
        link.send_pending(&batch, &guest, &mut pipe).unwrap();
        assert_eq!(link.queued() as u64, len);
        assert_eq!(link.flush(&mut pipe), Err(PipeError::Reset));
    }

    /// A pipe whose received bytes sit in a ring buffer of `capacity` bytes that wraps at
    /// stream offset `wrap_at`: what `recv_in_place` offers stops there.
    struct RingPipe {
        wire: VecDeque<u8>,
        /// Stream offset of the next byte to read.
        offset: usize,
        wrap_at: Option<usize>,
        capacity: usize,
        /// Bytes read by `recv` (copied), not in place.
        copied: usize,
    }

    impl RingPipe {
        fn new(bytes: &[u8], capacity: usize, wrap_at: Option<usize>) -> Self {
            Self {
                wire: bytes.iter().copied().collect(),
                offset: 0,
                wrap_at,
                capacity,
                copied: 0,
            }
        }
    }

    impl Pipe for RingPipe {
        fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
            Ok(data.len())
        }

        fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError> {
            let n = buf.len().min(self.wire.len()).min(self.capacity);
            for (slot, byte) in buf.iter_mut().zip(self.wire.drain(..n)) {
                *slot = byte;
            }
            self.offset += n;
            self.copied += n;
            Ok(n)
        }

        fn recv_in_place(
            &mut self,
            take: &mut dyn FnMut(Received<'_>) -> usize,
        ) -> Result<usize, PipeError> {
            // The peer cannot have sent more than the ring holds.
            let waiting = self.wire.len().min(self.capacity);
            if waiting == 0 {
                return Ok(0);
            }
            let run = match self.wrap_at {
                Some(at) if at > self.offset => (at - self.offset).min(waiting),
                _ => waiting,
            };
            let n = take(Received {
                bytes: &self.wire.make_contiguous()[..run],
                wrapped: run < waiting,
                capacity: self.capacity,
            })
            .min(run);
            self.wire.drain(..n);
            self.offset += n;
            Ok(n)
        }
    }

    /// Receives everything `pipe` holds through `receive_frames`, as messages.
    fn frames_of(link: &mut FrameLink, pipe: &mut RingPipe) -> Vec<Message> {
        let mut got = Vec::new();
        for _ in 0..100 {
            link.receive_frames(pipe, &mut |frame| got.push(frame.unwrap().into_message()))
                .unwrap();
        }
        got
    }

    #[test]
    fn whole_frames_are_read_where_they_lie_in_the_pipe() {
        let messages = samples();
        let stream = stream_of(&messages);
        let mut pipe = RingPipe::new(&stream, 1 << 20, None);
        let mut link = FrameLink::new();
        assert_eq!(frames_of(&mut link, &mut pipe), messages);
        assert_eq!(
            (pipe.copied, link.bytes_received()),
            (0, stream.len() as u64)
        );
    }

    #[test]
    fn a_frame_waits_in_the_pipe_for_its_rest_unless_it_cannot_or_should_not_be_whole_there() {
        let messages = samples();
        let stream = stream_of(&messages);
        let first = stream_of(&messages[..1]).len();
        let batch_end = stream_of(&messages[..2]).len();

        // The page batch arrives in two parts: nothing of it is taken until it is whole.
        let mut pipe = RingPipe::new(&stream[..first + 100], 1 << 20, None);
        let mut link = FrameLink::new();
        assert_eq!(frames_of(&mut link, &mut pipe), messages[..1]);
        assert_eq!((pipe.wire.len(), pipe.copied), (100, 0));
        pipe.wire.extend(&stream[first + 100..]);
        assert_eq!(frames_of(&mut link, &mut pipe), messages[1..]);
        assert_eq!(pipe.copied, 0);

        // The ring wraps inside the batch: that frame, and only it, is copied.
        let mut pipe = RingPipe::new(&stream, 1 << 20, Some(first + 100));
        let mut link = FrameLink::new();
        assert_eq!(frames_of(&mut link, &mut pipe), messages);
        assert_eq!(pipe.copied, batch_end - first);

        // A partial batch larger than half the ring is copied as it arrives, though nothing
        // wrapped.
        let mut pipe = RingPipe::new(&stream[..first + 100], 2 * (batch_end - first) - 1, None);
        let mut link = FrameLink::new();
        assert_eq!(frames_of(&mut link, &mut pipe), messages[..1]);
        assert_eq!(pipe.copied, 100);
        pipe.wire.extend(&stream[first + 100..]);
        assert_eq!(frames_of(&mut link, &mut pipe), messages[1..]);
        assert_eq!(pipe.copied, batch_end - first);
    }

    #[test]
    fn receiving_in_place_stops_after_the_budget_and_at_the_first_bad_frame() {
        let batch = &samples()[1];
        let one = stream_of(core::slice::from_ref(batch)).len();
        let count = RECEIVE_BUDGET / one + 3;
        let stream = stream_of(&vec![batch.clone(); count]);
        let mut pipe = RingPipe::new(&stream, 1 << 30, None);
        let mut link = FrameLink::new();
        let mut got = 0;
        link.receive_frames(&mut pipe, &mut |frame| {
            frame.unwrap();
            got += 1;
        })
        .unwrap();
        assert_eq!(got, RECEIVE_BUDGET.div_ceil(one));
        assert!(got < count);

        let mut bad = stream_of(&samples()[..1]);
        bad.extend_from_slice(b"HVMG\x03\x00\x63\x00garbage that is no frame");
        bad.extend_from_slice(&stream_of(&samples()[..1]));
        let mut pipe = RingPipe::new(&bad, 1 << 20, None);
        let mut link = FrameLink::new();
        let mut results = Vec::new();
        for _ in 0..3 {
            link.receive_frames(&mut pipe, &mut |frame| results.push(frame.map(|_| ())))
                .unwrap();
        }
        assert_eq!(results.len(), 2, "{results:?}");
        assert!(results[0].is_ok());
        assert!(matches!(
            results[1],
            Err(LinkError::Frame(FrameError::UnknownKind { code: 0x63 }))
        ));
        assert!(link.next_message().is_err(), "the link stays failed");
    }

    #[test]
    fn unencodable_message_queues_nothing() {
        let mut link = FrameLink::new();
        link.queue(&Message::Commit).unwrap();
        let before = link.queued();
        let too_long = Message::Abort(Abort {
            reason: AbortReason::Cancelled,
            text: "x".repeat(crate::message::MAX_TEXT_LEN + 1),
        });
        assert!(matches!(
            link.queue(&too_long),
            Err(MessageError::TooLong { .. })
        ));
        assert_eq!(link.queued(), before);
    }

    #[test]
    fn receive_is_bounded_per_call() {
        let mut bytes = Vec::new();
        while bytes.len() < 3 * RECEIVE_BUDGET {
            Message::CommitAck.encode(&mut bytes).unwrap();
        }
        let mut pipe = MemPipe::new(usize::MAX, usize::MAX);
        pipe.wire.extend(&bytes);
        let mut link = FrameLink::new();
        link.receive(&mut pipe).unwrap();
        assert_eq!(link.bytes_received(), RECEIVE_BUDGET as u64);
        assert_eq!(pipe.wire.len(), bytes.len() - RECEIVE_BUDGET);
    }

    #[test]
    fn bytes_before_a_close_are_kept() {
        let mut pipe = MemPipe::new(usize::MAX, 5);
        pipe.wire.extend(stream_of(&[Message::CommitAck]));
        pipe.error = Some(PipeError::Closed);
        let mut link = FrameLink::new();
        assert_eq!(link.receive(&mut pipe), Err(PipeError::Closed));
        assert_eq!(drain(&mut link), [Message::CommitAck]);
        assert_eq!(
            link.flush(&mut pipe),
            Ok(()),
            "an empty queue sends nothing"
        );
        link.queue(&Message::Commit).unwrap();
        assert_eq!(link.flush(&mut pipe), Err(PipeError::Closed));
    }

    #[test]
    fn garbage_yields_a_lasting_error_not_a_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for round in 0..300 {
            let len = (next() % 200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // A valid frame with a broken payload: the frame layer passes, the message layer
            // must refuse.
            if round % 3 == 0 {
                bytes.clear();
                crate::frame::encode(crate::frame::FrameKind::Commit, b"junk", &mut bytes).unwrap();
            }
            let mut pipe = MemPipe::new(usize::MAX, 1 + (next() % 64) as usize);
            pipe.wire.extend(&bytes);
            let mut link = FrameLink::new();
            while !pipe.wire.is_empty() {
                link.receive(&mut pipe).unwrap();
                loop {
                    match link.next_message() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(error) => {
                            assert_eq!(link.next_message(), Err(error));
                            break;
                        }
                    }
                }
            }
            if round % 3 == 0 {
                assert!(matches!(
                    link.next_message(),
                    Err(LinkError::Message(MessageError::TrailingBytes { count: 4 }))
                ));
            }
        }
        let mut pipe = MemPipe::new(usize::MAX, usize::MAX);
        pipe.wire.extend(b"GET / HTTP/1.1\r\n");
        let mut link = FrameLink::new();
        link.receive(&mut pipe).unwrap();
        assert!(matches!(
            link.next_message(),
            Err(LinkError::Frame(FrameError::BadMagic { .. }))
        ));
    }

    #[test]
    fn errors_display_as_sentences() {
        assert_eq!(
            PipeError::Closed.to_string(),
            "connection closed by the peer"
        );
        assert_eq!(
            LinkError::Frame(FrameError::BadMagic { found: *b"GET " }).to_string(),
            "not a migration frame (magic 47 45 54 20)"
        );
    }
}
