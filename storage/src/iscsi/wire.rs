//! One connection's bytes: PDUs queued for a non-blocking [`Pipe`] and PDUs decoded from it.
//!
//! Like `migrate`'s frame link, the wire decides nothing about the protocol. It keeps what the
//! pipe did not take yet, bounds how much one call reads (the kernel's loop also runs VMs), and
//! reports a pipe that takes nothing for too long as stalled: a peer that stops reading leaves a
//! zero TCP window that no retransmission timer ends.

use transport::{OutQueue, Pipe, PipeError};

use super::pdus::Pdu;
use super::stream::{encode_pdu, Digests, PduDecoder, StreamError};
use crate::pdu::{Bhs, PduError};

/// Most bytes one [`Wire::receive`] call reads: 512 KiB, a few milliseconds of data.
pub const RECEIVE_BUDGET: usize = 512 * 1024;

/// The bytes of one connection.
#[derive(Debug)]
pub struct Wire {
    /// Encoded PDUs the pipe has not taken yet (PDUs are encoded straight into it).
    out: OutQueue,
    out_digests: Digests,
    decoder: PduDecoder,
    stalled_since: Option<u64>,
    bytes_received: u64,
}

impl Wire {
    /// A wire whose decoder refuses data segments over `max_data_segment_length`, without
    /// digests (login never uses them).
    pub fn new(max_data_segment_length: u32) -> Self {
        Self {
            out: OutQueue::new(),
            out_digests: Digests::NONE,
            decoder: PduDecoder::new(max_data_segment_length),
            stalled_since: None,
            bytes_received: 0,
        }
    }

    /// Digests for every PDU from now on, both ways, and the new inbound data segment bound.
    pub fn enter_full_feature(&mut self, digests: Digests, max_data_segment_length: u32) {
        self.out_digests = digests;
        self.decoder.set_digests(digests);
        self.decoder
            .set_max_data_segment_length(max_data_segment_length);
    }

    /// Appends a PDU to the outbound queue; nothing is queued on error.
    pub fn queue(&mut self, bhs: &Bhs, data: &[u8]) -> Result<(), PduError> {
        self.out
            .push_with(|out| encode_pdu(bhs, &[], data, self.out_digests, out))
    }

    /// Appends a whole [`Pdu`].
    pub fn queue_pdu(&mut self, pdu: &Pdu) -> Result<(), PduError> {
        self.queue(&pdu.bhs, &pdu.data)
    }

    /// Bytes queued and not yet taken by the pipe.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    pub fn bytes_sent(&self) -> u64 {
        self.out.bytes_sent()
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// Reads what the pipe has, at most [`RECEIVE_BUDGET`] bytes. Bytes read before an error stay
    /// decodable: a response followed by a close is not lost.
    pub fn receive(&mut self, pipe: &mut impl Pipe) -> Result<(), PipeError> {
        let mut budget = RECEIVE_BUDGET;
        while budget > 0 {
            let got = self.decoder.push_with(|buf| pipe.recv(buf))?;
            if got == 0 {
                break;
            }
            self.bytes_received += got as u64;
            budget = budget.saturating_sub(got);
        }
        Ok(())
    }

    /// The next whole PDU received.
    pub fn next_pdu(&mut self) -> Result<Option<Pdu>, StreamError> {
        self.decoder.next_pdu()
    }

    /// Sends what the pipe takes. `Ok(true)` when the pipe has taken nothing for `stall_ms`
    /// while bytes were waiting.
    pub fn flush(
        &mut self,
        pipe: &mut impl Pipe,
        now_ms: u64,
        stall_ms: u64,
    ) -> Result<bool, PipeError> {
        let sent = self.out.flush(pipe)?;
        if self.out.is_empty() || sent > 0 {
            self.stalled_since = None;
            return Ok(false);
        }
        let since = *self.stalled_since.get_or_insert(now_ms);
        Ok(now_ms.saturating_sub(since) >= stall_ms)
    }
}
