//! The two hardware seams of a NIC driver: its registers and the memory it reaches by DMA.
//!
//! The kernel implements both over real hardware (an uncached mapping of a BAR; physically
//! contiguous frames seen through the physical-memory window); host tests implement them with a
//! fake device model. Drivers never touch a raw pointer.

/// A device's memory-mapped registers (a BAR, mapped uncached). Offsets are in bytes.
///
/// Methods take `&self`: register access has no Rust-visible state, and a receive token and a
/// transmit token both need to write tail registers at the same time.
pub trait Mmio {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: usize) -> u32;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: usize, value: u32);
}

/// Physically contiguous memory shared with a device (descriptor rings and packet buffers).
///
/// Word accessors are volatile in real implementations: the device changes descriptors behind
/// the CPU's back. Offsets must lie inside [`len`](Self::len); implementations check them (an
/// out-of-range offset is a driver bug and stops there, it never reaches other memory).
pub trait DmaRegion {
    /// The address the device uses for byte 0 (a host-physical address).
    fn device_addr(&self) -> u64;
    /// Size in bytes.
    fn len(&self) -> usize;
    /// True when the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads the 8-byte little-endian word at `offset` (8-byte aligned).
    fn read_u64(&self, offset: usize) -> u64;
    /// Writes the 8-byte little-endian word at `offset` (8-byte aligned).
    fn write_u64(&mut self, offset: usize, value: u64);
    /// Calls `f` with the bytes `offset..offset + len`.
    fn with_bytes<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R;
    /// Calls `f` with the bytes `offset..offset + len`, writable.
    fn with_bytes_mut<R>(&mut self, offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R)
        -> R;
}
