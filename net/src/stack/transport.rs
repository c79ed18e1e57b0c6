//! [`Transport`] over a smoltcp TCP socket of a [`Stack`].
//!
//! The node has one loop and no threads, so a blocking call cannot simply wait: while the
//! operation cannot proceed, each round polls the interface once (a bounded poll, see
//! [`Stack::poll`]) and then calls the owner's `idle` hook, which runs one round of the rest of
//! the node's loop (in the kernel: the vCPU slices, and a halt until the next tick when nothing
//! is runnable). VMs are therefore never held up for more than one poll, whatever the timeout.
//! The clock comes from the owner too (`clock`), so the same code runs in simulated time in tests.

use core::time::Duration;

use smoltcp::iface::SocketHandle;
use smoltcp::phy::Device;
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Instant;

use super::{Stack, TxFlush};
use crate::addr::Ipv4;
use crate::transport::{Transport, TransportError};

/// Frames received per poll while a call waits.
const BUDGET: usize = 64;

/// An open TCP connection of a [`Stack`], borrowed for the connection's life. Dropping it
/// closes the connection (queued data is still sent; the stack forgets the socket later).
pub struct TcpTransport<'s, D: Device + TxFlush, C: FnMut() -> Instant, I: FnMut()> {
    stack: &'s mut Stack<D>,
    handle: SocketHandle,
    clock: C,
    idle: I,
}

fn to_smol(d: Duration) -> smoltcp::time::Duration {
    smoltcp::time::Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

/// Progress of an operation: done, failed, or not yet.
type Step<R> = Option<Result<R, TransportError>>;

/// The error for a socket that can neither send nor receive any more.
fn ended(socket: &tcp::Socket) -> TransportError {
    match socket.state() {
        // Orderly close: the peer's FIN was received.
        State::CloseWait | State::LastAck | State::Closing | State::TimeWait => {
            TransportError::Closed
        }
        // Closed without our close: a reset, or the socket's timeout.
        _ => TransportError::Reset,
    }
}

impl<'s, D: Device + TxFlush, C: FnMut() -> Instant, I: FnMut()> TcpTransport<'s, D, C, I> {
    /// Connects to `target:port` within `timeout`.
    pub fn connect(
        stack: &'s mut Stack<D>,
        target: Ipv4,
        port: u16,
        timeout: Duration,
        clock: C,
        idle: I,
    ) -> Result<Self, TransportError> {
        let handle = stack.tcp_connect(target, port)?;
        let mut t = TcpTransport {
            stack,
            handle,
            clock,
            idle,
        };
        t.wait(timeout, |s| match s.state() {
            State::Established | State::CloseWait => Some(Ok(())),
            // An RST answers our SYN: nothing listens there.
            State::Closed => Some(Err(TransportError::Refused)),
            _ => None,
        })
        .map_err(|e| match e {
            TransportError::Timeout => TransportError::Unreachable,
            e => e,
        })?;
        Ok(t)
    }

    /// The local and remote ports (the remote one as given to `connect`).
    pub fn ports(&mut self) -> (u16, u16) {
        let s = self.stack.tcp_socket(self.handle);
        (
            s.local_endpoint().map_or(0, |e| e.port),
            s.remote_endpoint().map_or(0, |e| e.port),
        )
    }

    /// Runs `op` until it completes, polling and idling in between, for at most `timeout`.
    fn wait<R>(
        &mut self,
        timeout: Duration,
        mut op: impl FnMut(&mut tcp::Socket<'static>) -> Step<R>,
    ) -> Result<R, TransportError> {
        let deadline = (self.clock)() + to_smol(timeout);
        loop {
            if let Some(r) = op(self.stack.tcp_socket(self.handle)) {
                return r;
            }
            let now = (self.clock)();
            if now >= deadline {
                return Err(TransportError::Timeout);
            }
            let more = self.stack.poll(now, BUDGET).more;
            if let Some(r) = op(self.stack.tcp_socket(self.handle)) {
                return r;
            }
            if !more {
                (self.idle)();
            }
        }
    }
}

impl<D: Device + TxFlush, C: FnMut() -> Instant, I: FnMut()> Transport
    for TcpTransport<'_, D, C, I>
{
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.wait(timeout, |s| {
            if s.can_recv() {
                return match s.recv_slice(buf) {
                    Ok(n) if n > 0 => Some(Ok(n)),
                    Ok(_) => None,
                    Err(_) => Some(Err(ended(s))),
                };
            }
            (!s.may_recv() && s.state() != State::SynSent).then(|| Err(ended(s)))
        })
    }

    fn write(&mut self, buf: &[u8], timeout: Duration) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.wait(timeout, |s| {
            if !s.may_send() {
                return Some(Err(match s.state() {
                    State::Closed => TransportError::Reset,
                    _ => TransportError::Closed,
                }));
            }
            match s.send_slice(buf) {
                Ok(0) => None,
                Ok(n) => Some(Ok(n)),
                Err(_) => Some(Err(TransportError::Closed)),
            }
        })
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), TransportError> {
        self.wait(timeout, |s| {
            if s.send_queue() == 0 {
                Some(Ok(()))
            } else if s.state() == State::Closed {
                Some(Err(TransportError::Reset))
            } else {
                None
            }
        })
    }
}

impl<D: Device + TxFlush, C: FnMut() -> Instant, I: FnMut()> Drop for TcpTransport<'_, D, C, I> {
    fn drop(&mut self) {
        self.stack.tcp_release(self.handle);
    }
}
