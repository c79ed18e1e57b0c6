//! The byte-stream [`Transport`] that migration and storage talk to: an ordered, reliable
//! stream of bytes with timeouts on every blocking operation and typed errors.
//!
//! Two implementations:
//!
//! - [`StdTcp`] (cargo feature `std`): a `std::net::TcpStream`, for host tests and tools;
//! - [`crate::stack::TcpTransport`]: a smoltcp TCP socket of a [`crate::stack::Stack`], for the
//!   kernel. The kernel runs one loop (console, vCPU slices, network), so a blocking call there
//!   may not simply spin: while it waits it polls the interface once (a bounded poll) and then
//!   calls the owner's `idle` hook, which runs one round of the rest of the loop (the VM slices).
//!   No VM is ever stalled for more than one network poll, whatever the timeout.
//!
//! Conventions shared by every implementation:
//!
//! - `read` returns at least one byte, or an error; an orderly end of the peer's stream is
//!   [`TransportError::Closed`] (never `Ok(0)`, except for an empty `buf`);
//! - `write` accepts at least one byte (the rest is the caller's to retry), or fails;
//! - `flush` returns once every byte written so far was acknowledged by the peer (smoltcp) or
//!   handed to the operating system (std);
//! - a timeout leaves the stream usable: nothing was lost, the call can be repeated.

use core::fmt;
use core::time::Duration;

/// Why a transport operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    /// Nothing happened before the timeout; the stream is still usable.
    Timeout,
    /// The peer closed its side in order (end of stream), or the stream was closed here.
    Closed,
    /// The peer (or the stack, after too many retransmissions) reset the connection.
    Reset,
    /// The peer refused the connection: nothing listens on that port.
    Refused,
    /// No route to the peer, or it never answered (ARP, SYN).
    Unreachable,
    /// Bad arguments (address, port) or a state the operation cannot run in.
    Invalid,
    /// Some other failure of the underlying stack or operating system.
    Other,
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportError::Timeout => "timed out",
            TransportError::Closed => "connection closed",
            TransportError::Reset => "connection reset by peer",
            TransportError::Refused => "connection refused",
            TransportError::Unreachable => "peer unreachable",
            TransportError::Invalid => "invalid argument or state",
            TransportError::Other => "transport failure",
        })
    }
}

/// An ordered, reliable byte stream with timeouts (see the module documentation).
pub trait Transport {
    /// Reads at least one byte into `buf` within `timeout`; returns how many.
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, TransportError>;

    /// Writes at least one byte of `buf` within `timeout`; returns how many.
    fn write(&mut self, buf: &[u8], timeout: Duration) -> Result<usize, TransportError>;

    /// Waits until everything written so far has left (see the module documentation).
    fn flush(&mut self, timeout: Duration) -> Result<(), TransportError>;

    /// Writes all of `buf`; `timeout` bounds each step that makes no progress.
    fn write_all(&mut self, mut buf: &[u8], timeout: Duration) -> Result<(), TransportError> {
        while !buf.is_empty() {
            let n = self.write(buf, timeout)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Fills `buf`; `timeout` bounds each step that makes no progress. A stream that ends
    /// before `buf` is full is [`TransportError::Closed`].
    fn read_exact(&mut self, mut buf: &mut [u8], timeout: Duration) -> Result<(), TransportError> {
        while !buf.is_empty() {
            let n = self.read(buf, timeout)?;
            buf = &mut buf[n..];
        }
        Ok(())
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, TransportError> {
        (**self).read(buf, timeout)
    }
    fn write(&mut self, buf: &[u8], timeout: Duration) -> Result<usize, TransportError> {
        (**self).write(buf, timeout)
    }
    fn flush(&mut self, timeout: Duration) -> Result<(), TransportError> {
        (**self).flush(timeout)
    }
}

#[cfg(any(test, feature = "std"))]
mod std_tcp;
#[cfg(any(test, feature = "std"))]
pub use std_tcp::StdTcp;
