//! A virtio-net device for host tests: a [`Transport`] (feature negotiation, status, queue
//! addresses, the configuration space with the MAC), the device side of the two split
//! virtqueues (virtio 1.2, 2.7) over host memory, and a [`Hal`] whose "physical" addresses are
//! host addresses.
//!
//! virtio-drivers 0.13 has a fake transport and HAL of its own, but only under its own
//! `cfg(test)`: dependents cannot use them, hence this one. The HAL shares every buffer through
//! a bounce copy (as Linux's swiotlb does): a driver that read a receive buffer before
//! completing it, or wrote a transmit buffer after handing it over, would see stale bytes. Shares are counted per thread (one test, one thread) so a test can check none
//! leaks.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};
use std::alloc::{alloc_zeroed, dealloc, Layout};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::hw::DmaRegion;

/// Feature bits (virtio 1.2, 5.1.3 and 6).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    /// What QEMU's virtio-net-pci offers, among others.
    pub const QEMU: u64 = CSUM
        | GUEST_CSUM
        | MAC
        | MRG_RXBUF
        | STATUS
        | CTRL_VQ
        | RING_INDIRECT_DESC
        | RING_EVENT_IDX
        | VERSION_1;
}

/// `virtio_net_hdr` with VERSION_1: 12 bytes.
pub const NET_HDR: usize = 12;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

std::thread_local! {
    static SHARED: Cell<isize> = const { Cell::new(0) };
}

/// Buffers shared with the device and not yet unshared, on this thread.
pub fn shared_buffers() -> isize {
    SHARED.with(Cell::get)
}

/// A HAL over host memory: DMA pages from the host allocator, addresses are pointers.
pub struct HostHal;

// SAFETY: allocations are zeroed, page-aligned and owned by the caller until `dma_dealloc`;
// `share` hands out a fresh allocation of the buffer's length that `unshare` frees.
unsafe impl Hal for HostHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: the layout has a non-zero size (virtqueues are never empty).
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("host memory");
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: allocated by `dma_alloc` with this layout (the caller's promise).
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("the fake transport has no MMIO")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let mut bounce = vec![0u8; buffer.len()].into_boxed_slice();
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the caller promises `buffer` is valid and untouched during the call.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    buffer.as_ptr().cast::<u8>(),
                    bounce.as_mut_ptr(),
                    buffer.len(),
                )
            };
        }
        SHARED.with(|c| c.set(c.get() + 1));
        Box::into_raw(bounce).cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        // SAFETY: `paddr` came from `share` for a buffer of this length (the caller's promise).
        let bounce = unsafe {
            Box::from_raw(core::ptr::slice_from_raw_parts_mut(
                paddr as *mut u8,
                buffer.len(),
            ))
        };
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: as in `share`.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    bounce.as_ptr(),
                    buffer.as_ptr().cast::<u8>(),
                    buffer.len(),
                )
            };
        }
        SHARED.with(|c| c.set(c.get() - 1));
    }
}

/// The packet-buffer region: host memory, its address as the device address.
pub struct HostMem {
    ptr: NonNull<u8>,
    len: usize,
}

impl HostMem {
    pub fn new(len: usize) -> HostMem {
        let layout = Layout::from_size_align(len.max(1), 8).unwrap();
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("host memory");
        HostMem { ptr, len }
    }

    fn bytes(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(offset + len <= self.len, "DMA access out of the region");
        // SAFETY: inside the allocation (checked above).
        unsafe { self.ptr.as_ptr().add(offset) }
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), 8).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl DmaRegion for HostMem {
    fn device_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn len(&self) -> usize {
        self.len
    }

    fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: in bounds (checked by `bytes`); unaligned reads are fine on the host.
        unsafe { self.bytes(offset, 8).cast::<u64>().read_unaligned() }
    }

    fn write_u64(&mut self, offset: usize, value: u64) {
        // SAFETY: as in `read_u64`.
        unsafe { self.bytes(offset, 8).cast::<u64>().write_unaligned(value) }
    }

    fn with_bytes<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        // SAFETY: in bounds; the device only reaches bounce copies, never this memory.
        f(unsafe { core::slice::from_raw_parts(self.bytes(offset, len), len) })
    }

    fn with_bytes_mut<R>(
        &mut self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        // SAFETY: as in `with_bytes`, and `&mut self` makes the slice unique.
        f(unsafe { core::slice::from_raw_parts_mut(self.bytes(offset, len), len) })
    }
}

/// One virtqueue as the driver set it up, and how far the device has read its available ring.
#[derive(Debug, Default, Clone, Copy)]
pub struct Queue {
    pub size: u32,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub next_avail: u16,
}

/// The device's state, shared between the transport (the driver's side) and the test.
pub struct Device {
    pub mac: [u8; 6],
    /// The configuration space's status field (bit 0: link up).
    pub link_status: u16,
    pub offered: u64,
    pub driver_features: u64,
    pub status: DeviceStatus,
    pub max_queue_size: u32,
    pub queues: [Queue; 2],
    pub notifications: [usize; 2],
    /// Frames taken from the transmit queue (without the net header), and their headers.
    pub sent: Vec<Vec<u8>>,
    pub sent_headers: Vec<Vec<u8>>,
    /// Frames that found no receive buffer.
    pub missed: usize,
}

pub const RX: usize = 0;
pub const TX: usize = 1;

/// A descriptor: guest address, length, flags, next.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The device's side of ring memory. Addresses are host pointers (see [`HostHal`]).
fn read_u16(addr: u64) -> u16 {
    fence(Ordering::SeqCst);
    // SAFETY: an address inside a virtqueue the driver allocated and still owns.
    unsafe { (addr as *const u16).read_volatile() }
}

fn write_u16(addr: u64, value: u16) {
    // SAFETY: as in `read_u16`.
    unsafe { (addr as *mut u16).write_volatile(value) };
    fence(Ordering::SeqCst);
}

fn write_u32(addr: u64, value: u32) {
    // SAFETY: as in `read_u16`.
    unsafe { (addr as *mut u32).write_volatile(value) };
}

fn read_desc(table: u64, index: u16) -> Desc {
    let at = table + 16 * u64::from(index);
    // SAFETY: inside the descriptor table (the index is below the queue size).
    unsafe {
        Desc {
            addr: (at as *const u64).read_volatile(),
            len: ((at + 8) as *const u32).read_volatile(),
            flags: ((at + 12) as *const u16).read_volatile(),
            next: ((at + 14) as *const u16).read_volatile(),
        }
    }
}

impl Device {
    pub fn new(mac: [u8; 6]) -> Device {
        Device {
            mac,
            link_status: 1,
            offered: feature::QEMU,
            driver_features: 0,
            status: DeviceStatus::empty(),
            max_queue_size: 256,
            queues: [Queue::default(); 2],
            notifications: [0; 2],
            sent: Vec::new(),
            sent_headers: Vec::new(),
            missed: 0,
        }
    }

    fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&self.link_status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&1500u16.to_le_bytes()); // mtu
        c
    }

    /// The available ring's index (how many buffers the driver has offered, mod 2^16).
    pub fn avail_idx(&self, queue: usize) -> u16 {
        read_u16(self.queues[queue].driver + 2)
    }

    /// The used ring's index.
    pub fn used_idx(&self, queue: usize) -> u16 {
        read_u16(self.queues[queue].device + 2)
    }

    /// Buffers offered and not yet taken by the device.
    pub fn pending(&self, queue: usize) -> u16 {
        self.avail_idx(queue)
            .wrapping_sub(self.queues[queue].next_avail)
    }

    /// Takes the next offered descriptor chain: its head and its buffers (indirect tables
    /// followed).
    fn pop_avail(&mut self, queue: usize) -> Option<(u16, Vec<Desc>)> {
        let q = self.queues[queue];
        assert!(q.size > 0, "queue {queue} not set up");
        if self.avail_idx(queue) == q.next_avail {
            return None;
        }
        let slot = u64::from(q.next_avail) % u64::from(q.size);
        let head = read_u16(q.driver + 4 + 2 * slot);
        self.queues[queue].next_avail = q.next_avail.wrapping_add(1);
        let mut chain = Vec::new();
        let mut index = head;
        for _ in 0..q.size {
            let d = read_desc(q.desc, index);
            if d.flags & DESC_F_INDIRECT != 0 {
                for i in 0..(d.len / 16) as u16 {
                    let e = read_desc(d.addr, i);
                    chain.push(e);
                    if e.flags & DESC_F_NEXT == 0 {
                        break;
                    }
                }
            } else {
                chain.push(d);
            }
            if d.flags & DESC_F_NEXT == 0 {
                return Some((head, chain));
            }
            index = d.next;
        }
        panic!("descriptor chain longer than the queue: a loop");
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    fn push_used(&mut self, queue: usize, head: u16, len: u32) {
        let q = self.queues[queue];
        let idx = self.used_idx(queue);
        let slot = u64::from(idx) % u64::from(q.size);
        write_u32(q.device + 4 + 8 * slot, u32::from(head));
        write_u32(q.device + 8 + 8 * slot, len);
        write_u16(q.device + 2, idx.wrapping_add(1));
    }

    /// Transmits everything the driver queued; returns how many frames.
    pub fn process_tx(&mut self) -> usize {
        let mut n = 0;
        while let Some((head, chain)) = self.pop_avail(TX) {
            let mut bytes = Vec::new();
            for d in chain.iter().filter(|d| d.flags & DESC_F_WRITE == 0) {
                // SAFETY: a buffer the driver shared for reading (a bounce copy).
                bytes.extend_from_slice(unsafe {
                    core::slice::from_raw_parts(d.addr as *const u8, d.len as usize)
                });
            }
            let split = NET_HDR.min(bytes.len());
            self.sent_headers.push(bytes[..split].to_vec());
            self.sent.push(bytes[split..].to_vec());
            self.push_used(TX, head, 0);
            n += 1;
        }
        n
    }

    /// Receives `frame`: writes a net header and the frame into the next receive buffer. False
    /// (and counted missed) when the driver offered none.
    pub fn deliver(&mut self, frame: &[u8]) -> bool {
        let mut bytes = vec![0u8; NET_HDR];
        bytes[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
        bytes.extend_from_slice(frame);
        let len = bytes.len() as u32;
        self.deliver_raw(&bytes, len)
    }

    /// Writes `bytes` (header included) into the next receive buffer and reports `used_len`
    /// bytes written, which a faulty device may get wrong.
    pub fn deliver_raw(&mut self, bytes: &[u8], used_len: u32) -> bool {
        let Some((head, chain)) = self.pop_avail(RX) else {
            self.missed += 1;
            return false;
        };
        let mut rest = bytes;
        for d in chain.iter().filter(|d| d.flags & DESC_F_WRITE != 0) {
            let n = rest.len().min(d.len as usize);
            // SAFETY: a buffer the driver shared for writing (a bounce copy of `d.len` bytes).
            unsafe { core::ptr::copy_nonoverlapping(rest.as_ptr(), d.addr as *mut u8, n) };
            rest = &rest[n..];
        }
        assert!(rest.is_empty(), "frame larger than the receive buffer");
        self.push_used(RX, head, used_len);
        true
    }
}

/// The driver's view of [`Device`].
pub struct FakeTransport {
    pub dev: Rc<RefCell<Device>>,
}

/// A device with `mac` and its transport.
pub fn device(mac: [u8; 6]) -> (Rc<RefCell<Device>>, FakeTransport) {
    let dev = Rc::new(RefCell::new(Device::new(mac)));
    (dev.clone(), FakeTransport { dev })
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Network
    }

    fn read_device_features(&mut self) -> u64 {
        self.dev.borrow().offered
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.dev.borrow_mut().driver_features = driver_features;
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.dev.borrow().max_queue_size
    }

    fn notify(&mut self, queue: u16) {
        self.dev.borrow_mut().notifications[usize::from(queue)] += 1;
    }

    fn get_status(&self) -> DeviceStatus {
        self.dev.borrow().status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.dev.borrow_mut().status = status;
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.dev.borrow_mut().queues[usize::from(queue)] = Queue {
            size,
            desc: descriptors,
            driver: driver_area,
            device: device_area,
            next_avail: 0,
        };
    }

    fn queue_unset(&mut self, queue: u16) {
        self.dev.borrow_mut().queues[usize::from(queue)] = Queue::default();
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.dev.borrow().queues[usize::from(queue)].desc != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let config = self.dev.borrow().config_space();
        let bytes = config
            .get(offset..offset + core::mem::size_of::<T>())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        T::read_from_bytes(bytes).map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> virtio_drivers::Result<()> {
        Err(virtio_drivers::Error::Unsupported)
    }
}
