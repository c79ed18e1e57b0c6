//! Page batches whose raw pages are still in guest memory until they are encoded.
//!
//! The source decides each page's encoding when it makes a batch, but a page sent raw is read
//! from guest memory only when its driver encodes the batch: straight into the transport's own
//! buffer when it has room ([`PendingBatch::encode_into`]), else into the link's outbound queue.
//! A raw page is copied once (or twice) on its way to the transport instead of first into a
//! buffer of its own (under emulation each copy of a page was a measurable share of the
//! source's time per byte). The driver encodes the batch in the same step the machine made it, with the VM not
//! running in between, so the pages it reads are the ones the machine classified.

use alloc::vec::Vec;
use core::fmt;

use crate::frame::{self, FrameKind, HEADER_LEN};
use crate::machine::GuestError;
use crate::message::{self, Message, MessageError, PageBatch, PageData, PageEntry, SliceSink};
use crate::source::SourceGuest;

/// One page of a [`PendingBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingPage {
    /// Sent raw, read from guest memory when the batch is encoded.
    InGuest(u64),
    /// Sent in the compact encoding already decided (a zero marker or compressed bytes).
    Encoded(PageEntry),
}

impl PendingPage {
    /// Bytes this page adds to the batch's payload (as [`crate::message::PageEncoding::wire_len`]).
    pub fn wire_len(&self) -> usize {
        match self {
            PendingPage::InGuest(_) => message::RAW_ENTRY_LEN,
            PendingPage::Encoded(entry) => entry.encoding.wire_len(),
        }
    }
}

/// A page batch of one round, its raw pages still in guest memory: on the wire, exactly the
/// [`Message::PageBatch`] it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBatch {
    pub round: u32,
    /// In ascending page order.
    pub pages: Vec<PendingPage>,
}

/// Why a [`PendingBatch`] could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// A raw page could not be read from the guest.
    Guest(GuestError),
    /// The batch breaks a limit of the protocol.
    Message(MessageError),
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchError::Guest(e) => write!(f, "{e}"),
            BatchError::Message(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for BatchError {}

impl From<MessageError> for BatchError {
    fn from(error: MessageError) -> Self {
        BatchError::Message(error)
    }
}

impl From<frame::FrameError> for BatchError {
    fn from(error: frame::FrameError) -> Self {
        BatchError::Message(MessageError::from(error))
    }
}

impl PendingBatch {
    /// Bytes of the whole frame on the wire.
    pub fn wire_len(&self) -> usize {
        self.pages
            .iter()
            .fold(HEADER_LEN + 8, |sum, page| sum + page.wire_len())
    }

    /// Each page's data: raw pages where they lie in `guest`.
    fn data<'a>(
        &'a self,
        guest: &'a (impl SourceGuest + ?Sized),
    ) -> Result<Vec<(u64, PageData<'a>)>, GuestError> {
        self.pages
            .iter()
            .map(|page| {
                Ok(match page {
                    PendingPage::InGuest(number) => (*number, PageData::Raw(guest.page(*number)?)),
                    PendingPage::Encoded(entry) => (entry.page, entry.data()),
                })
            })
            .collect()
    }

    /// Appends the batch to `out` as one whole frame, raw pages read from `guest` (the copy
    /// into `out` is their only one). On error `out` is left as it was.
    pub fn encode(
        &self,
        guest: &(impl SourceGuest + ?Sized),
        out: &mut Vec<u8>,
    ) -> Result<(), BatchError> {
        let data = self.data(guest).map_err(BatchError::Guest)?;
        out.reserve(self.wire_len());
        frame::encode_with(FrameKind::PageBatch, out, |out| {
            message::encode_page_batch(out, self.round, data.len(), data.iter().copied())
                .map_err(BatchError::from)
        })
    }

    /// Writes the batch as one whole frame into `frame`, space of exactly
    /// [`wire_len`](Self::wire_len) bytes (a pipe's own buffer), raw pages read from `guest`
    /// (the copy into `frame` is their only one). On error `frame` holds no valid frame.
    pub fn encode_into(
        &self,
        guest: &(impl SourceGuest + ?Sized),
        frame: &mut [u8],
    ) -> Result<(), BatchError> {
        let wrong_length = MessageError::InvalidValue {
            field: "page batch frame length",
            value: frame.len() as u64,
        };
        if frame.len() != self.wire_len() {
            return Err(wrong_length.into());
        }
        let Some((header, payload)) = frame.split_first_chunk_mut::<HEADER_LEN>() else {
            return Err(wrong_length.into());
        };
        let data = self.data(guest).map_err(BatchError::Guest)?;
        frame::encode_into(FrameKind::PageBatch, header, payload, |payload| {
            let mut sink = SliceSink::new(payload);
            message::encode_page_batch(&mut sink, self.round, data.len(), data.iter().copied())?;
            sink.finish().map_err(BatchError::from)
        })
    }

    /// The batch as the message the peer decodes (its raw pages copied out of `guest`).
    pub fn to_message(&self, guest: &(impl SourceGuest + ?Sized)) -> Result<Message, GuestError> {
        let entries = self
            .data(guest)?
            .into_iter()
            .map(|(page, data)| PageEntry {
                page,
                encoding: data.to_encoding(),
            })
            .collect();
        Ok(Message::PageBatch(PageBatch {
            round: self.round,
            entries,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use crate::message::{compact_encoding, Capabilities, PageEncoding, PAGE_SIZE};
    use crate::testing::PagesGuest;
    use alloc::boxed::Box;
    use alloc::vec;

    /// Pages 0..4: noise (raw), zeros, one repeated byte after a word (compressible), noise.
    fn guest() -> PagesGuest {
        let mut pages = vec![Box::new([0u8; PAGE_SIZE]); 4];
        for (i, b) in pages[0].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
        }
        pages[2].fill(0x11);
        pages[2][..8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        for (i, b) in pages[3].iter_mut().enumerate() {
            *b = (i as u32 ^ 0x5bd1_e995).wrapping_mul(40_503).to_le_bytes()[1];
        }
        PagesGuest(pages)
    }

    /// The batch a source makes of `pages`: compact pages encoded, the rest left in the guest.
    fn batch(guest: &PagesGuest, pages: &[u64]) -> PendingBatch {
        let pages = pages
            .iter()
            .map(
                |&page| match compact_encoding(guest.page(page).unwrap(), Capabilities::KNOWN) {
                    Some(encoding) => PendingPage::Encoded(PageEntry { page, encoding }),
                    None => PendingPage::InGuest(page),
                },
            )
            .collect();
        PendingBatch { round: 3, pages }
    }

    #[test]
    fn a_pending_batch_encodes_as_the_page_batch_it_stands_for() {
        let guest = guest();
        let batch = batch(&guest, &[0, 1, 2, 3]);
        assert!(matches!(batch.pages[0], PendingPage::InGuest(0)));
        assert!(
            matches!(&batch.pages[1], PendingPage::Encoded(e) if e.encoding == PageEncoding::Zero)
        );
        assert!(matches!(
            &batch.pages[2],
            PendingPage::Encoded(e) if matches!(e.encoding, PageEncoding::Compressed(_))
        ));
        let mut out = vec![9u8; 5];
        batch.encode(&guest, &mut out).unwrap();
        assert_eq!(&out[..5], &[9; 5], "what was queued before stays");
        assert_eq!(out.len() - 5, batch.wire_len());
        // Byte for byte the frame of the message, which decodes to the guest's pages.
        let message = batch.to_message(&guest).unwrap();
        let mut expected = Vec::new();
        message.encode(&mut expected).unwrap();
        assert_eq!(&out[5..], &expected[..]);
        let mut decoder = FrameDecoder::new();
        decoder.push(&out[5..]);
        let (kind, payload) = decoder.next_payload().unwrap().unwrap();
        let Message::PageBatch(decoded) = Message::decode_payload(kind, payload).unwrap() else {
            panic!("not a page batch");
        };
        assert_eq!(decoded.round, 3);
        for (entry, page) in decoded.entries.iter().zip(0..) {
            assert_eq!(entry.page, page);
            assert_eq!(*entry.encoding.to_page().unwrap(), *guest.0[page as usize]);
        }
    }

    #[test]
    fn a_page_the_guest_cannot_give_fails_the_batch_and_queues_nothing() {
        let guest = guest();
        let mut batch = batch(&guest, &[0, 1]);
        batch.pages.push(PendingPage::InGuest(9));
        let mut out = vec![1u8, 2, 3];
        assert_eq!(
            batch.encode(&guest, &mut out),
            Err(BatchError::Guest(GuestError::PageOutOfRange { page: 9 }))
        );
        assert_eq!(out, [1, 2, 3]);
        // Out of order: the protocol's own check, and again nothing is left behind.
        let unordered = PendingBatch {
            round: 1,
            pages: vec![PendingPage::InGuest(3), PendingPage::InGuest(0)],
        };
        assert!(matches!(
            unordered.encode(&guest, &mut out),
            Err(BatchError::Message(_))
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn a_batch_encoded_in_place_is_the_frame_it_queues() {
        let guest = guest();
        let batch = batch(&guest, &[0, 1, 2, 3]);
        let mut queued = Vec::new();
        batch.encode(&guest, &mut queued).unwrap();
        let mut frame = vec![0xAAu8; batch.wire_len()];
        batch.encode_into(&guest, &mut frame).unwrap();
        assert_eq!(frame, queued);
    }

    #[test]
    fn in_place_encoding_refuses_space_of_another_length_and_unreadable_pages() {
        let guest = guest();
        let batch = batch(&guest, &[0, 1, 2, 3]);
        for len in [0, 7, batch.wire_len() - 1, batch.wire_len() + 1] {
            let mut frame = vec![0u8; len];
            assert!(
                matches!(
                    batch.encode_into(&guest, &mut frame),
                    Err(BatchError::Message(MessageError::InvalidValue { .. }))
                ),
                "{len} bytes"
            );
        }
        let mut bad = batch.clone();
        bad.pages.push(PendingPage::InGuest(9));
        let mut frame = vec![0u8; bad.wire_len()];
        assert_eq!(
            bad.encode_into(&guest, &mut frame),
            Err(BatchError::Guest(GuestError::PageOutOfRange { page: 9 }))
        );
    }
}
