//! `transport`: the byte-stream seam between protocol code and the network.
//!
//! `migrate` (the live-migration stream) and `storage` (the iSCSI initiator) both talk to their
//! peer through a [`Pipe`]: a non-blocking byte pipe that takes or gives what it can right now.
//! The kernel implements it over a smoltcp TCP socket; host tests over memory or, with the `std`
//! feature, over a `std::net::TcpStream` ([`TcpPipe`]). Nothing above a pipe may block: the
//! kernel's one loop also runs the VMs. What a pipe cannot take yet waits in an [`OutQueue`].
//!
//! Dependency rule: plain `no_std + alloc` (std only behind the `std` feature, for host use). It
//! never depends on hardware, the kernel, or any other crate of the workspace.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

use core::fmt;

mod queue;
#[cfg(feature = "std")]
mod tcp;

pub use queue::OutQueue;
#[cfg(feature = "std")]
pub use tcp::TcpPipe;

/// A non-blocking byte pipe.
///
/// `recv` should return everything the peer sent before reporting [`PipeError::Closed`], so that
/// a last message followed by an orderly close (a migration's `CommitAck`, an iSCSI Logout
/// Response) is not lost.
pub trait Pipe {
    /// Sends a prefix of `data` without blocking; Ok(0) when the pipe cannot take more now
    /// (including a connection not yet established).
    fn send(&mut self, data: &[u8]) -> Result<usize, PipeError>;
    /// Receives without blocking; Ok(0) when nothing is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError>;
    /// Bytes the pipe accepted that the peer has not received yet (a TCP socket's unacknowledged
    /// send queue). The migration source ends a pre-copy round only once this is zero: otherwise
    /// the pause would start with a send buffer's worth of old pages ahead of the final ones, all
    /// of it downtime, and its policy would measure how fast a buffer fills, not the link.
    fn in_flight(&self) -> usize {
        0
    }
    /// Sends `len` bytes written in place into the pipe's own buffer, sparing them a copy
    /// through the caller's. If the pipe has `len` contiguous bytes free now, it calls `fill`
    /// with exactly that space and keeps the bytes if `fill` returns true (it must then have
    /// written all of them); it returns whether it kept them. Nothing is sent when `fill`
    /// returns false, or when the pipe has no such room (`fill` is then not called): the caller
    /// sends the bytes the ordinary way. Pipes without a buffer of their own keep this default.
    fn send_in_place(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> Result<bool, PipeError> {
        let _ = (len, fill);
        Ok(false)
    }
    /// Lets `take` read received bytes where they lie in the pipe's own buffer, sparing them a
    /// copy: `take` gets the first contiguous run of them ([`Received`]) and returns how many it
    /// consumed from its start (counts above the run's length are taken as all of it); those
    /// are removed from the pipe. Returns that count: Ok(0) when nothing waits, and always for a
    /// pipe without a buffer of its own (this default; the caller then uses `recv`). Errors as
    /// `recv`: only once everything received was taken.
    fn recv_in_place(
        &mut self,
        take: &mut dyn FnMut(Received<'_>) -> usize,
    ) -> Result<usize, PipeError> {
        let _ = take;
        Ok(0)
    }
}

/// Received bytes as [`Pipe::recv_in_place`] offers them.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The first contiguous run of the bytes waiting.
    pub bytes: &'a [u8],
    /// More bytes wait after `bytes` (the pipe's ring buffer wrapped): they will never be
    /// contiguous with these.
    pub wrapped: bool,
    /// The most bytes the pipe's buffer can hold: a message longer than this is never whole in
    /// it.
    pub capacity: usize,
}

/// A pipe that is always closed: what a protocol is polled with while it has no connection (it
/// then notices the loss, or that a connect attempt failed, and backs off).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClosedPipe;

impl Pipe for ClosedPipe {
    fn send(&mut self, _: &[u8]) -> Result<usize, PipeError> {
        Err(PipeError::Closed)
    }

    fn recv(&mut self, _: &mut [u8]) -> Result<usize, PipeError> {
        Err(PipeError::Closed)
    }
}

/// Why a pipe can no longer carry bytes. Every variant is final for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeError {
    /// The peer closed the connection.
    Closed,
    /// The connection was reset (by the peer, or by the stack after retransmissions failed).
    Reset,
    /// Any other failure of the underlying transport.
    Other,
}

impl fmt::Display for PipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PipeError::Closed => "connection closed by the peer",
            PipeError::Reset => "connection reset",
            PipeError::Other => "connection failed",
        })
    }
}

impl core::error::Error for PipeError {}
