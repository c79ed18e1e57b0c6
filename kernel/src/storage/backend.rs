//! A VM's disk on an iSCSI LUN: the [`BlockBackend`] the VM's virtio-blk device talks to.
//!
//! The backend lives in the VM (the VM table owns it); the iSCSI session lives in the storage
//! service, which also owns the network. They meet in a [`Channel`]: the backend queues the
//! guest's requests there, the service's poll moves them into iSCSI commands and puts their
//! completions back, and the backend's poll hands those to the device. Nothing waits: a slow
//! target leaves requests in flight, never a stalled loop.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Mutex;
use vmx::devices::virtio::blk::{BlockRequest, BlockResult, RequestId, RequestKind, ID_BYTES};

use crate::vm::{BlockBackend, DiskKind};

/// Requests and completions between one VM's device and its LUN's session.
#[derive(Default)]
pub struct Channel {
    /// Requests the session has not taken yet.
    pub submitted: VecDeque<BlockRequest>,
    /// Completions the device has not taken yet: read data, or nothing, or the failure.
    pub completed: VecDeque<(RequestId, Result<Vec<u8>, ()>)>,
    /// Requests submitted and not completed (in the queue, at the target, or completed and not
    /// yet taken).
    pub in_flight: usize,
    /// While set the session takes no new requests: the node is making sure it still holds
    /// the disk's reservation (after a failed migration) before the guest writes again.
    pub hold: bool,
}

/// The shared end of a [`Channel`].
pub type SharedChannel = Arc<Mutex<Channel>>;

/// The VM's side: see the module documentation.
pub struct IscsiBackend {
    channel: SharedChannel,
    sectors: u64,
    serial: [u8; ID_BYTES],
}

impl IscsiBackend {
    pub fn new(channel: SharedChannel, sectors: u64, serial: &str) -> IscsiBackend {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        IscsiBackend {
            channel,
            sectors,
            serial: id,
        }
    }
}

impl BlockBackend for IscsiBackend {
    fn kind(&self) -> DiskKind {
        DiskKind::Shared
    }

    fn capacity_sectors(&self) -> u64 {
        self.sectors
    }

    fn submit(&mut self, request: BlockRequest) {
        let mut channel = self.channel.lock();
        channel.in_flight += 1;
        if request.kind == RequestKind::GetId {
            // The serial is ours: no need to ask the target, but still completed later.
            channel
                .completed
                .push_back((request.id, Ok(self.serial.to_vec())));
        } else {
            channel.submitted.push_back(request);
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(RequestId, BlockResult<'_>)) {
        // Taken out first: the device's completion must not run under the lock.
        let completed: Vec<_> = {
            let mut channel = self.channel.lock();
            let completed: Vec<_> = channel.completed.drain(..).collect();
            channel.in_flight = channel.in_flight.saturating_sub(completed.len());
            completed
        };
        for (id, result) in completed {
            match result {
                Ok(data) => done(id, Ok(&data)),
                Err(()) => done(id, Err(vmx::devices::virtio::blk::BlockError::Io)),
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.channel.lock().in_flight
    }

    fn inspect(&self, _sector: u64, _buf: &mut [u8]) -> bool {
        // Reading the LUN at once would block the loop: use the target's own tools.
        false
    }
}
