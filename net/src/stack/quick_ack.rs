//! Quick acknowledgements while a TCP connection opens its window.
//!
//! [`Stack::poll`](super::Stack::poll) takes a batch of frames and then transmits, so a busy
//! receiver acknowledges once per poll: one ACK for dozens of full segments. Senders in slow
//! start (smoltcp's Reno and Cubic among them) grow their congestion window by one segment
//! per ACK, not by the bytes an ACK covers, so such stretch ACKs open a fresh connection's
//! window dozens of times slower: measured with two QEMU nodes, an idle 64 MiB migration
//! spent its first ~60 ms at a fraction of the link's speed. Like Linux's quick-ACK mode, a
//! connection is acknowledged for every full segment while its window opens (the sender's
//! window then doubles each round trip; a socket that keeps smoltcp's delayed ACKs still
//! acknowledges every second one), and only for its first [`QUICK_BYTES`]: for a whole bulk
//! transfer, an ACK per segment would double the frames it costs.

use alloc::vec::Vec;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

/// Received bytes that call for an acknowledgement in quick-ACK mode: a full-sized segment on
/// Ethernet (MSS 1460).
pub const ACK_EVERY: usize = 1460;

/// Bytes a connection receives in quick-ACK mode. Each ACK of a segment opens the sender's
/// window by a segment, so the window reaches its full size (the receive buffer,
/// [`crate::bench::BUFFER`]) after about that many bytes; twice that leaves a margin.
pub const QUICK_BYTES: usize = 2 * crate::bench::BUFFER;

#[derive(Debug)]
struct Entry {
    handle: SocketHandle,
    /// Bytes still to receive in quick-ACK mode.
    left: usize,
    /// The socket's receive queue when its bytes were last acknowledged.
    acked_queue: usize,
}

/// The TCP sockets of a [`Stack`](super::Stack) still in quick-ACK mode.
#[derive(Debug, Default)]
pub struct QuickAcks {
    entries: Vec<Entry>,
}

impl QuickAcks {
    /// Adds a new TCP socket to `sockets`, in quick-ACK mode; it leaves both through
    /// [`remove_socket`](Self::remove_socket).
    pub fn add_socket(
        &mut self,
        sockets: &mut SocketSet<'static>,
        socket: tcp::Socket<'static>,
    ) -> SocketHandle {
        let handle = sockets.add(socket);
        self.entries.push(Entry {
            handle,
            left: QUICK_BYTES,
            acked_queue: 0,
        });
        handle
    }

    /// Removes a socket from `sockets`, forgetting it here first (the set may reuse its handle).
    pub fn remove_socket(&mut self, sockets: &mut SocketSet<'static>, handle: SocketHandle) {
        self.entries.retain(|e| e.handle != handle);
        sockets.remove(handle);
    }

    /// Before a poll receives: the last poll's transmission acknowledged everything queued,
    /// and the owners may have read since. Sockets done with quick-ACK mode leave it.
    pub fn begin(&mut self, sockets: &SocketSet<'_>) {
        self.entries.retain_mut(|e| {
            e.acked_queue = sockets.get::<tcp::Socket>(e.handle).recv_queue();
            e.left > 0
        });
    }

    /// After a frame was received: whether a socket in quick-ACK mode holds [`ACK_EVERY`] or
    /// more unacknowledged bytes, in which case the caller transmits now (smoltcp
    /// acknowledges everything received when it transmits) and this counts them as acknowledged.
    pub fn due(&mut self, sockets: &SocketSet<'_>) -> bool {
        let fresh = |e: &Entry| {
            sockets
                .get::<tcp::Socket>(e.handle)
                .recv_queue()
                .saturating_sub(e.acked_queue)
        };
        if !self
            .entries
            .iter()
            .any(|e| e.left > 0 && fresh(e) >= ACK_EVERY)
        {
            return false;
        }
        for e in &mut self.entries {
            let queued = sockets.get::<tcp::Socket>(e.handle).recv_queue();
            e.left = e.left.saturating_sub(queued.saturating_sub(e.acked_queue));
            e.acked_queue = queued;
        }
        true
    }
}
