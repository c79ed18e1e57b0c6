//! virtio-net (QEMU `-device virtio-net-pci`), polled, behind smoltcp's `phy::Device`, on the
//! `virtio-drivers` crate's [`VirtIONetRaw`] (the virtqueues, feature negotiation, the net
//! header) over any virtio [`Transport`] (the kernel uses the modern PCI transport).
//!
//! Packet buffers live in one [`DmaRegion`] (one [`BUF_SIZE`] buffer per receive and per
//! transmit descriptor), never on the heap: the [`Hal`] the transport and queues use must
//! translate addresses inside that region (`Hal::share`), which the kernel's does through its
//! physical-memory window. Every receive buffer is posted at start-up; a received frame is
//! copied out and its buffer posted again at once, so the receive and transmit tokens of one
//! `receive` never share the device. Transmitting fills a free buffer (net header, then the
//! frame) and notifies the device; sent buffers are reclaimed lazily when room is needed.
//!
//! Interrupts stay off (the owner polls). Frames longer than [`MAX_FRAME`] or shorter than an
//! Ethernet header are dropped and counted.
//!
//! Host tests run the driver against a device model (`fake`: transport, virtqueues, HAL).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

use crate::e1000::Counters;
use crate::hw::DmaRegion;

/// The virtio vendor ID (Red Hat / Qumranet).
pub const VENDOR_VIRTIO: u16 = 0x1AF4;

/// PCI device IDs this driver handles: the transitional and the modern virtio-net.
pub const SUPPORTED: &[(u16, &str)] = &[(0x1000, "virtio-net"), (0x1041, "virtio-net")];

/// The model name of a supported (vendor, device) pair.
pub fn model(vendor_id: u16, device_id: u16) -> Option<&'static str> {
    crate::pci::model_in(SUPPORTED, VENDOR_VIRTIO, vendor_id, device_id)
}

/// Descriptors per virtqueue (QEMU offers 256).
pub const QUEUE_SIZE: usize = 256;

/// Bytes per packet buffer: the net header (10 or 12 bytes) and a full frame.
pub const BUF_SIZE: usize = 2048;

/// Largest frame sent or received, without FCS.
pub const MAX_FRAME: usize = 1514;

const ETH_HEADER: usize = 14;

/// Bytes the packet-buffer [`DmaRegion`] must hold.
pub fn region_bytes() -> usize {
    2 * QUEUE_SIZE * BUF_SIZE
}

fn rx_offset(slot: usize) -> usize {
    slot * BUF_SIZE
}

fn tx_offset(slot: usize) -> usize {
    (QUEUE_SIZE + slot) * BUF_SIZE
}

/// Why the driver could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioError {
    /// The device or the transport refused (negotiation, queue set-up, DMA memory).
    Device(virtio_drivers::Error),
    /// A packet-buffer region smaller than [`region_bytes`].
    RegionTooSmall { need: usize, have: usize },
    /// The device's MAC address is not a usable unicast one.
    NoMac { mac: [u8; 6] },
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VirtioError::Device(e) => write!(f, "virtio device: {e}"),
            VirtioError::RegionTooSmall { need, have } => {
                write!(f, "DMA region of {have} bytes, {need} needed")
            }
            VirtioError::NoMac { mac } => {
                write!(
                    f,
                    "no usable MAC address (read {})",
                    crate::e1000::Mac(*mac)
                )
            }
        }
    }
}

impl From<virtio_drivers::Error> for VirtioError {
    fn from(e: virtio_drivers::Error) -> Self {
        VirtioError::Device(e)
    }
}

/// A virtio-net device, polled.
pub struct VirtioNet<H: Hal, T: Transport, M: DmaRegion> {
    raw: VirtIONetRaw<H, T, QUEUE_SIZE>,
    mem: M,
    mac: [u8; 6],
    /// Receive buffer slot of each posted token (tokens are descriptor indices).
    rx_slot: Vec<Option<usize>>,
    /// The last received frame (copied out of its buffer).
    scratch: Vec<u8>,
    tx: TxState,
    counters: Counters,
}

struct TxState {
    /// Slots not handed to the device.
    free: Vec<usize>,
    /// In flight: token -> (slot, bytes handed over).
    inflight: Vec<Option<(usize, usize)>>,
}

impl<H: Hal, T: Transport, M: DmaRegion> VirtioNet<H, T, M> {
    /// Negotiates with the device, sets up both virtqueues and posts every receive buffer.
    /// `mem` holds the packet buffers (at least [`region_bytes`]; see the module docs).
    pub fn new(transport: T, mem: M) -> Result<Self, VirtioError> {
        if mem.len() < region_bytes() {
            return Err(VirtioError::RegionTooSmall {
                need: region_bytes(),
                have: mem.len(),
            });
        }
        let mut raw = VirtIONetRaw::<H, T, QUEUE_SIZE>::new(transport)?;
        raw.disable_interrupts();
        let mac = raw.mac_address();
        if mac.iter().all(|&b| b == 0) || mac[0] & 1 != 0 {
            return Err(VirtioError::NoMac { mac });
        }
        let mut nic = VirtioNet {
            raw,
            mem,
            mac,
            rx_slot: vec![None; QUEUE_SIZE],
            scratch: vec![0; BUF_SIZE],
            tx: TxState {
                free: (0..QUEUE_SIZE).rev().collect(),
                inflight: vec![None; QUEUE_SIZE],
            },
            counters: Counters::default(),
        };
        for slot in 0..QUEUE_SIZE {
            nic.post_rx(slot)?;
        }
        Ok(nic)
    }

    /// Hands receive buffer `slot` to the device.
    fn post_rx(&mut self, slot: usize) -> Result<(), VirtioError> {
        let raw = &mut self.raw;
        // SAFETY: the buffer lies in the driver's own DMA region and nothing reads or writes it
        // until the device returns its token (`receive`), where it is completed first.
        let token = self
            .mem
            .with_bytes_mut(rx_offset(slot), BUF_SIZE, |buf| unsafe {
                raw.receive_begin(buf)
            })?;
        self.rx_slot[usize::from(token)] = Some(slot);
        Ok(())
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Link state (the device's status field is not read: always up).
    pub fn link_up(&self) -> bool {
        true
    }

    /// Receive and transmit ring sizes.
    pub fn ring_sizes(&self) -> (usize, usize) {
        (QUEUE_SIZE, QUEUE_SIZE)
    }

    /// Counters since start-up.
    pub fn counters(&mut self) -> Counters {
        self.counters
    }

    /// True if a received frame waits.
    pub fn rx_pending(&self) -> bool {
        self.raw.poll_receive().is_some()
    }

    /// Takes the next received frame into `scratch`; its length, or `None` when nothing waits.
    /// Bad frames are dropped (counted) and the next one tried.
    fn next_frame(&mut self) -> Option<usize> {
        loop {
            let token = self.raw.poll_receive()?;
            let Some(slot) = self
                .rx_slot
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                // A token we never posted: the device is confused; stop receiving this poll.
                self.counters.rx_errors += 1;
                return None;
            };
            let raw = &mut self.raw;
            let scratch = &mut self.scratch;
            // SAFETY: the same buffer as `post_rx` gave for this token; the device is done.
            let got = self
                .mem
                .with_bytes_mut(rx_offset(slot), BUF_SIZE, |buf| {
                    let (hdr, len) = unsafe { raw.receive_complete(token, buf) }.ok()?;
                    let frame = buf.get(hdr..hdr.checked_add(len)?)?;
                    scratch[..frame.len().min(BUF_SIZE)].copy_from_slice(frame);
                    Some(frame.len())
                })
                .filter(|&len| (ETH_HEADER..=MAX_FRAME).contains(&len));
            if self.post_rx(slot).is_err() {
                self.counters.rx_errors += 1;
            }
            match got {
                Some(len) => {
                    self.counters.rx_packets += 1;
                    self.counters.rx_bytes += len as u64;
                    return Some(len);
                }
                None => self.counters.rx_errors += 1,
            }
        }
    }
}

/// Receives one frame (already copied out of the device's buffer).
pub struct VirtioRxToken<'a> {
    frame: &'a [u8],
}

/// Sends one frame.
pub struct VirtioTxToken<'a, H: Hal, T: Transport, M: DmaRegion> {
    raw: &'a mut VirtIONetRaw<H, T, QUEUE_SIZE>,
    mem: &'a mut M,
    tx: &'a mut TxState,
    counters: &'a mut Counters,
}

impl phy::RxToken for VirtioRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

impl<H: Hal, T: Transport, M: DmaRegion> phy::TxToken for VirtioTxToken<'_, H, T, M> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        send(self.raw, self.mem, self.tx, self.counters, len, f)
    }
}

/// Takes back the buffers the device has sent.
fn reclaim<H: Hal, T: Transport, M: DmaRegion>(
    raw: &mut VirtIONetRaw<H, T, QUEUE_SIZE>,
    mem: &M,
    tx: &mut TxState,
) {
    while let Some(token) = raw.poll_transmit() {
        let Some((slot, total)) = tx
            .inflight
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            break;
        };
        // SAFETY: the same buffer and length handed over with this token.
        let _ = mem.with_bytes(tx_offset(slot), total, |buf| unsafe {
            raw.transmit_complete(token, buf)
        });
        tx.free.push(slot);
    }
}

/// Sends one frame of `len` bytes that `f` fills; drops it (counted) when no buffer is free.
/// Works on the device's parts: the transmit token handed out next to a receive token cannot
/// borrow the scratch buffer the receive token reads.
fn send<H: Hal, T: Transport, M: DmaRegion, R>(
    raw: &mut VirtIONetRaw<H, T, QUEUE_SIZE>,
    mem: &mut M,
    tx: &mut TxState,
    counters: &mut Counters,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    reclaim(raw, mem, tx);
    let slot = match tx.free.pop() {
        Some(slot) if len <= MAX_FRAME => slot,
        other => {
            if let Some(slot) = other {
                tx.free.push(slot);
            }
            counters.tx_dropped += 1;
            let mut junk = vec![0; len];
            return f(&mut junk);
        }
    };
    let (result, token) = mem.with_bytes_mut(tx_offset(slot), BUF_SIZE, |buf| {
        let hdr = raw.fill_buffer_header(buf).unwrap_or(0);
        let result = f(&mut buf[hdr..hdr + len]);
        // SAFETY: the buffer stays untouched until its token is completed (reclaim above).
        let token = unsafe { raw.transmit_begin(&buf[..hdr + len]) };
        (result, token.map(|t| (t, hdr + len)))
    });
    match token {
        Ok((token, total)) => {
            tx.inflight[usize::from(token)] = Some((slot, total));
            counters.tx_packets += 1;
            counters.tx_bytes += len as u64;
        }
        Err(_) => {
            tx.free.push(slot);
            counters.tx_dropped += 1;
        }
    }
    result
}

impl<H: Hal, T: Transport, M: DmaRegion> crate::stack::TxFlush for VirtioNet<H, T, M> {
    /// Nothing to do: each frame notifies the device as it is queued.
    fn flush_tx(&mut self) {}
}

impl<H: Hal, T: Transport, M: DmaRegion> phy::Device for VirtioNet<H, T, M> {
    type RxToken<'a>
        = VirtioRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = VirtioTxToken<'a, H, T, M>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let len = self.next_frame()?;
        Some((
            VirtioRxToken {
                frame: &self.scratch[..len],
            },
            VirtioTxToken {
                raw: &mut self.raw,
                mem: &mut self.mem,
                tx: &mut self.tx,
                counters: &mut self.counters,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        reclaim(&mut self.raw, &self.mem, &mut self.tx);
        if self.tx.free.is_empty() {
            return None;
        }
        Some(VirtioTxToken {
            raw: &mut self.raw,
            mem: &mut self.mem,
            tx: &mut self.tx,
            counters: &mut self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
