//! A smoltcp TCP socket as a non-blocking [`Pipe`]: the migration stream on the cluster network
//! and the iSCSI connections on the storage network both ride on it.

use ::net::smoltcp::socket::tcp::{Socket, State};
use transport::{Pipe, PipeError, Received};

/// Borrows a connection's socket for one step of its protocol's loop.
pub struct SocketPipe<'a>(pub &'a mut Socket<'static>);

/// Whether the connection is still being set up (nothing to send or receive yet, not an error).
fn opening(state: State) -> bool {
    matches!(state, State::Listen | State::SynSent | State::SynReceived)
}

/// Why a socket can no longer carry data. smoltcp shows a reset, a retransmission timeout and
/// a keep-alive timeout all as `Closed`: the connection was lost, not ended in order.
fn ended(state: State) -> PipeError {
    if state == State::Closed {
        PipeError::Reset
    } else {
        PipeError::Closed
    }
}

impl SocketPipe<'_> {
    /// Whether data may be written now: false while the connection is being set up, an error
    /// once it can no longer carry data out.
    fn writable(&self) -> Result<bool, PipeError> {
        let state = self.0.state();
        if opening(state) {
            return Ok(false);
        }
        if !self.0.may_send() {
            return Err(ended(state));
        }
        Ok(true)
    }
}

impl Pipe for SocketPipe<'_> {
    /// The send buffer holds bytes until the peer acknowledged them.
    fn in_flight(&self) -> usize {
        self.0.send_queue()
    }

    fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
        if !self.writable()? {
            return Ok(0);
        }
        self.0.send_slice(data).map_err(|_| PipeError::Other)
    }

    /// The free space at the end of the socket's send ring: all of it once the ring emptied
    /// (smoltcp then starts it over at the front), less near its end.
    fn send_in_place(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> Result<bool, PipeError> {
        if !self.writable()? {
            return Ok(false);
        }
        self.0
            .send(|free| match free.get_mut(..len).map(&mut *fill) {
                Some(true) => (len, true),
                _ => (0, false),
            })
            .map_err(|_| PipeError::Other)
    }

    /// The received bytes from the socket's ring up to its end (or to the last byte).
    fn recv_in_place(
        &mut self,
        take: &mut dyn FnMut(Received<'_>) -> usize,
    ) -> Result<usize, PipeError> {
        if !self.0.can_recv() {
            return self.recv(&mut []);
        }
        let waiting = self.0.recv_queue();
        let capacity = self.0.recv_capacity();
        self.0
            .recv(|bytes| {
                let wrapped = bytes.len() < waiting;
                let n = take(Received {
                    bytes,
                    wrapped,
                    capacity,
                })
                .min(bytes.len());
                (n, n)
            })
            .map_err(|_| PipeError::Other)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError> {
        if self.0.can_recv() {
            return self.0.recv_slice(buf).map_err(|_| PipeError::Other);
        }
        let state = self.0.state();
        if opening(state) || self.0.may_recv() {
            Ok(0)
        } else {
            Err(ended(state))
        }
    }
}
