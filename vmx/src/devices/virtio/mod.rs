//! Virtio devices over PCI with the legacy (virtio 0.9.5, "transitional") interface.
//!
//! The legacy interface is all port I/O: BAR0 is an I/O BAR holding a 20-byte common header
//! (features, queue selection and address, notify, status, ISR) followed by the device-specific
//! configuration. A guest therefore needs no MMIO decoding from the hypervisor, and every
//! driver ever written for virtio (Linux since 2.6.25, SeaBIOS, the BSDs, our test guest)
//! speaks it. The modern (1.x) capability-based interface can be added beside it later.
//!
//! - [`queue`]: the split virtqueue in guest memory, walked through [`crate::guest_mem`];
//! - [`blk`]: virtio-blk, whose requests go to a backend the caller owns and complete later.
//!
//! Register offsets and bits below are those of the virtio 1.x spec, section 4.1.4.8 "Legacy
//! Interfaces: A Note on PCI Device Layout", and 2.1 "Device Status Field".

pub mod blk;
pub mod queue;
#[cfg(test)]
mod test_ram;
#[cfg(test)]
mod tests;

/// PCI vendor id of every virtio device.
pub const PCI_VENDOR_ID: u16 = 0x1AF4;

// Legacy common header (offsets into BAR0).
/// Device (host) features, 32 bits, read-only.
pub const REG_HOST_FEATURES: u16 = 0x00;
/// Driver (guest) features, 32 bits.
pub const REG_GUEST_FEATURES: u16 = 0x04;
/// Page frame number (address >> 12) of the selected queue, 32 bits; 0 disables the queue.
pub const REG_QUEUE_PFN: u16 = 0x08;
/// Size of the selected queue, 16 bits, read-only (0: no such queue).
pub const REG_QUEUE_NUM: u16 = 0x0C;
/// Queue selector, 16 bits.
pub const REG_QUEUE_SEL: u16 = 0x0E;
/// Queue notify: the driver writes a queue index, 16 bits.
pub const REG_QUEUE_NOTIFY: u16 = 0x10;
/// Device status, 8 bits; writing 0 resets the device.
pub const REG_STATUS: u16 = 0x12;
/// Interrupt status, 8 bits; reading it clears it.
pub const REG_ISR: u16 = 0x13;
/// Start of the device-specific configuration (without MSI-X, which these devices lack).
pub const REG_DEVICE_CONFIG: u16 = 0x14;

// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
/// Every bit the status register can hold.
pub const STATUS_VALID: u8 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

// ISR bits.
/// A used buffer was added to a queue.
pub const ISR_QUEUE: u8 = 1;
/// The device configuration changed (also: the device needs a reset).
pub const ISR_CONFIG: u8 = 2;

/// Feature bit 28: descriptors may point to a table of descriptors.
pub const F_RING_INDIRECT_DESC: u32 = 1 << 28;

/// Legacy virtqueues are laid out with the used ring at the next 4096-byte boundary.
pub const LEGACY_QUEUE_ALIGN: u64 = 4096;
