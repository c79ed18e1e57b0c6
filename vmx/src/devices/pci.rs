#![forbid(unsafe_code)]
//! A minimal PCI bus as a guest sees it: configuration mechanism #1 (ports `0xCF8` and
//! `0xCFC..=0xCFF`) on bus 0, a host bridge at 00:00.0, and type-0 configuration headers for the
//! devices behind it.
//!
//! What a guest can do here is what an OS or a small driver needs to find and set up a device:
//! read the vendor, device, class and subsystem ids, size and assign BARs (write all-ones, read
//! back the size mask, write the address), switch I/O and memory decoding and bus mastering on in
//! the command register, and read the interrupt pin and line. Nothing else is modelled: no
//! capability list, no expansion ROM, no bridges behind the host bridge, no extended (PCIe)
//! configuration space, no multi-function devices. Every register a header does not implement
//! reads 0 and ignores writes, as the PCI spec asks of reserved registers.
//!
//! Writable bits follow a per-byte write mask (the approach QEMU takes): a write changes only
//! the bits the mask allows, so the read-only identity of a device (ids, class, BAR type bits,
//! the low bits that encode a BAR's size) can never be changed by a guest, nor by a restored
//! state (see [`PciConfig::restore`]).
//!
//! # Configuration mechanism #1 (PCI Local Bus spec 3.0, 3.2.2.3.2)
//!
//! A dword write to `0xCF8` latches an address: bit 31 enable, bits 23:16 bus, 15:11 device,
//! 10:8 function, 7:2 register (bits 1:0 read as 0). Accesses to `0xCFC..=0xCFF` (byte, word or
//! dword) then reach that register of that function, offset by the port's low two bits. With
//! the enable bit clear, or for a function that does not exist, reads return all ones (the bus
//! master abort a real host bridge turns into `0xFFFF_FFFF`) and writes are dropped. Byte and
//! word accesses to `0xCF8..=0xCFB` are not the address register (on a PC they reach other
//! chipset registers, e.g. the reset control at `0xCF9`): they read all ones and are ignored.

use alloc::vec::Vec;
use core::fmt;

/// The configuration address register port.
pub const CONFIG_ADDRESS: u16 = 0xCF8;
/// The first configuration data port (the data window is `0xCFC..=0xCFF`).
pub const CONFIG_DATA: u16 = 0xCFC;

/// Bytes of a type-0 configuration header (what this model implements of the 256).
pub const HEADER_LEN: usize = 64;

// Header offsets.
pub const VENDOR_ID: u8 = 0x00;
pub const DEVICE_ID: u8 = 0x02;
pub const COMMAND: u8 = 0x04;
pub const STATUS: u8 = 0x06;
pub const REVISION_ID: u8 = 0x08;
pub const CLASS_CODE: u8 = 0x09;
pub const CACHE_LINE_SIZE: u8 = 0x0C;
pub const LATENCY_TIMER: u8 = 0x0D;
pub const HEADER_TYPE: u8 = 0x0E;
pub const BAR0: u8 = 0x10;
pub const SUBSYSTEM_VENDOR_ID: u8 = 0x2C;
pub const SUBSYSTEM_ID: u8 = 0x2E;
pub const INTERRUPT_LINE: u8 = 0x3C;
pub const INTERRUPT_PIN: u8 = 0x3D;

/// Command register bits the model lets a guest set.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 =
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;

/// Bit 0 of an I/O BAR.
const BAR_IO: u32 = 0x1;
/// Number of BARs in a type-0 header.
pub const BAR_COUNT: usize = 6;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Not implemented: reads 0, ignores writes (sizing finds nothing).
    None,
    /// I/O space of `size` bytes (a power of two, 4..=256).
    Io { size: u32 },
    /// 32-bit non-prefetchable memory space of `size` bytes (a power of two, >= 16).
    Memory32 { size: u32 },
}

/// Why a configuration header could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciError {
    /// A BAR size that is not a power of two or outside the range its kind allows.
    BadBarSize { bar: usize, size: u32 },
    /// BAR index of 6 or more.
    NoSuchBar { bar: usize },
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PciError::BadBarSize { bar, size } => write!(f, "BAR{bar}: bad size {size:#x}"),
            PciError::NoSuchBar { bar } => write!(f, "no BAR{bar} in a type-0 header"),
        }
    }
}

/// Why saved PCI state was refused by a `restore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciStateError {
    /// Fewer bytes than the format needs.
    Truncated,
    /// Not PCI state at all.
    BadMagic,
    /// Saved by a format this build does not know.
    UnsupportedVersion { version: u8 },
    /// A read-only bit differs from this device's: the state is another device's.
    ReadOnlyMismatch { offset: usize },
    /// A value no register can hold (byte offset into the state).
    InvalidValue { at: usize },
    /// Bytes after the state.
    TrailingBytes,
}

impl fmt::Display for PciStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PciStateError::Truncated => write!(f, "PCI state truncated"),
            PciStateError::BadMagic => write!(f, "not PCI state (bad magic)"),
            PciStateError::UnsupportedVersion { version } => {
                write!(f, "unsupported PCI state version {version}")
            }
            PciStateError::ReadOnlyMismatch { offset } => write!(
                f,
                "PCI state is for another device (read-only configuration byte {offset:#x} differs)"
            ),
            PciStateError::InvalidValue { at } => {
                write!(f, "invalid value in PCI state at byte {at}")
            }
            PciStateError::TrailingBytes => write!(f, "trailing bytes after PCI state"),
        }
    }
}

/// The identity of a PCI function: what its read-only registers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class, subclass, programming interface.
    pub class: [u8; 3],
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 none, 1..=4 INTA#..INTD#.
    pub interrupt_pin: u8,
}

/// The type-0 configuration header of one function (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciConfig {
    bytes: [u8; HEADER_LEN],
    /// Bits a write may change, per byte.
    wmask: [u8; HEADER_LEN],
}

/// Version of [`PciConfig::save`]: magic `"PCIC"`, version, then the 64 header bytes.
pub const CONFIG_STATE_VERSION: u8 = 1;
const CONFIG_MAGIC: [u8; 4] = *b"PCIC";
/// Bytes [`PciConfig::save`] appends.
pub const CONFIG_STATE_LEN: usize = 5 + HEADER_LEN;

impl PciConfig {
    /// A header with `identity` and `bars`; everything else at its reset value (command 0:
    /// no decoding until the guest, or firmware acting for it, enables it).
    pub fn new(identity: PciIdentity, bars: [BarKind; BAR_COUNT]) -> Result<PciConfig, PciError> {
        let mut c = PciConfig {
            bytes: [0; HEADER_LEN],
            wmask: [0; HEADER_LEN],
        };
        c.put16(VENDOR_ID, identity.vendor_id);
        c.put16(DEVICE_ID, identity.device_id);
        c.bytes[REVISION_ID as usize] = identity.revision;
        c.bytes[CLASS_CODE as usize] = identity.class[2];
        c.bytes[CLASS_CODE as usize + 1] = identity.class[1];
        c.bytes[CLASS_CODE as usize + 2] = identity.class[0];
        c.put16(SUBSYSTEM_VENDOR_ID, identity.subsystem_vendor_id);
        c.put16(SUBSYSTEM_ID, identity.subsystem_id);
        c.bytes[INTERRUPT_PIN as usize] = identity.interrupt_pin;
        let cmd = COMMAND_WRITABLE.to_le_bytes();
        c.wmask[COMMAND as usize] = cmd[0];
        c.wmask[COMMAND as usize + 1] = cmd[1];
        c.wmask[CACHE_LINE_SIZE as usize] = 0xFF;
        c.wmask[LATENCY_TIMER as usize] = 0xFF;
        c.wmask[INTERRUPT_LINE as usize] = 0xFF;
        for (i, bar) in bars.iter().enumerate() {
            let (mask, type_bits) = match *bar {
                BarKind::None => (0u32, 0u32),
                BarKind::Io { size } => {
                    if !size.is_power_of_two() || !(4..=256).contains(&size) {
                        return Err(PciError::BadBarSize { bar: i, size });
                    }
                    // x86 I/O space is 16 bits: the upper half of an I/O BAR reads as 0.
                    (!(size - 1) & 0xFFFC, BAR_IO)
                }
                BarKind::Memory32 { size } => {
                    if !size.is_power_of_two() || size < 16 {
                        return Err(PciError::BadBarSize { bar: i, size });
                    }
                    (!(size - 1) & 0xFFFF_FFF0, 0)
                }
            };
            let at = BAR0 as usize + 4 * i;
            c.bytes[at..at + 4].copy_from_slice(&type_bits.to_le_bytes());
            c.wmask[at..at + 4].copy_from_slice(&mask.to_le_bytes());
        }
        Ok(c)
    }

    /// The host bridge of bus 0 (an Intel 440FX's ids, which every PC OS knows: class 06/00).
    pub fn host_bridge() -> PciConfig {
        let identity = PciIdentity {
            vendor_id: 0x8086,
            device_id: 0x1237,
            revision: 0x02,
            class: [0x06, 0x00, 0x00],
            subsystem_vendor_id: 0x1AF4,
            subsystem_id: 0x1100,
            interrupt_pin: 0,
        };
        let mut bridge = PciConfig::new(identity, [BarKind::None; BAR_COUNT])
            .unwrap_or_else(|_| unreachable!("a header without BARs is always valid"));
        // A host bridge always forwards memory and I/O cycles.
        bridge.put16(COMMAND, COMMAND_IO | COMMAND_MEMORY);
        bridge
    }

    fn put16(&mut self, offset: u8, value: u16) {
        let at = offset as usize;
        self.bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn get16(&self, offset: u8) -> u16 {
        let at = offset as usize;
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    fn get32(&self, offset: u8) -> u32 {
        let at = offset as usize;
        u32::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ])
    }

    /// Reads `size` (1, 2 or 4) bytes at `offset`, little-endian. Bytes past the implemented
    /// header (and past 255) read 0.
    pub fn read(&self, offset: u8, size: u8) -> u32 {
        let mut value = 0u32;
        for i in 0..u32::from(size.min(4)) {
            let at = usize::from(offset) + i as usize;
            let byte = self.bytes.get(at).copied().unwrap_or(0);
            value |= u32::from(byte) << (8 * i);
        }
        value
    }

    /// Writes the low `size` (1, 2 or 4) bytes of `value` at `offset`; only bits the write mask
    /// allows change.
    pub fn write(&mut self, offset: u8, size: u8, value: u32) {
        for i in 0..u32::from(size.min(4)) {
            let at = usize::from(offset) + i as usize;
            if at >= HEADER_LEN {
                break;
            }
            let byte = (value >> (8 * i)) as u8;
            let mask = self.wmask[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (byte & mask);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    /// Whether the function decodes I/O space (command bit 0).
    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO != 0
    }

    /// Whether the function may master the bus (command bit 2): DMA into guest RAM.
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Whether INTx is disabled (command bit 10).
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// The base address BAR `bar` holds (type bits removed), or `None` for an unimplemented
    /// BAR. A BAR in the middle of sizing (all ones written) holds its size mask: callers that
    /// decode addresses should also check the command register, as hardware does.
    pub fn bar_address(&self, bar: usize) -> Option<u32> {
        if bar >= BAR_COUNT {
            return None;
        }
        let offset = BAR0 + 4 * bar as u8;
        let mask = u32::from_le_bytes(
            self.wmask[offset as usize..offset as usize + 4]
                .try_into()
                .unwrap_or([0; 4]),
        );
        (mask != 0).then(|| self.get32(offset) & mask)
    }

    /// Places BAR `bar` at `address` (what firmware does at boot; the guest may move it).
    /// Bits the BAR cannot hold are dropped.
    pub fn set_bar(&mut self, bar: usize, address: u32) {
        if bar < BAR_COUNT {
            self.write(BAR0 + 4 * bar as u8, 4, address);
        }
    }

    /// Sets the command register (what firmware does at boot); only writable bits change.
    pub fn set_command(&mut self, command: u16) {
        self.write(COMMAND, 2, u32::from(command));
    }

    /// Sets the interrupt line register (the firmware's routing note to the OS).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.write(INTERRUPT_LINE, 1, u32::from(line));
    }

    /// Appends the header to `out` (format [`CONFIG_STATE_VERSION`]).
    pub fn save(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&CONFIG_MAGIC);
        out.push(CONFIG_STATE_VERSION);
        out.extend_from_slice(&self.bytes);
    }

    /// Loads a header saved by [`Self::save`] into this one. Every read-only bit of the saved
    /// header must equal this device's (same ids, same BAR sizes): a state cannot turn one
    /// device into another. Exactly [`CONFIG_STATE_LEN`] bytes.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), PciStateError> {
        if bytes.len() < CONFIG_STATE_LEN {
            return Err(PciStateError::Truncated);
        }
        if bytes.len() > CONFIG_STATE_LEN {
            return Err(PciStateError::TrailingBytes);
        }
        if bytes[0..4] != CONFIG_MAGIC {
            return Err(PciStateError::BadMagic);
        }
        if bytes[4] != CONFIG_STATE_VERSION {
            return Err(PciStateError::UnsupportedVersion { version: bytes[4] });
        }
        let saved = &bytes[5..];
        for (i, (&s, (&mine, &mask))) in saved
            .iter()
            .zip(self.bytes.iter().zip(self.wmask.iter()))
            .enumerate()
        {
            if (s ^ mine) & !mask != 0 {
                return Err(PciStateError::ReadOnlyMismatch { offset: i });
            }
        }
        self.bytes.copy_from_slice(saved);
        Ok(())
    }
}

/// One function's configuration space as the bus reaches it.
pub trait PciFunction {
    /// A configuration read of `size` bytes at `offset` (never crossing a dword).
    fn config_read(&self, offset: u8, size: u8) -> u32;
    /// A configuration write of `size` bytes at `offset` (never crossing a dword).
    fn config_write(&mut self, offset: u8, size: u8, value: u32);
}

impl PciFunction for PciConfig {
    fn config_read(&self, offset: u8, size: u8) -> u32 {
        self.read(offset, size)
    }

    fn config_write(&mut self, offset: u8, size: u8, value: u32) {
        self.write(offset, size, value)
    }
}

/// The devices on bus 0 other than the host bridge, as the caller owns them.
pub trait PciDevices {
    /// Function `function` of device `device` (1..=31), if present.
    fn function(&mut self, device: u8, function: u8) -> Option<&mut dyn PciFunction>;
}

/// No device but the host bridge.
pub struct NoDevices;

impl PciDevices for NoDevices {
    fn function(&mut self, _device: u8, _function: u8) -> Option<&mut dyn PciFunction> {
        None
    }
}

/// The host side of bus 0: the configuration address latch and the host bridge (00:00.0).
/// Devices behind it are passed in on each access ([`PciDevices`]), so their owner keeps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciHost {
    address: u32,
    bridge: PciConfig,
}

/// Bits of the configuration address register that hold a value: enable, bus, device,
/// function, register (bits 30:24 are reserved and bits 1:0 read as 0).
const ADDRESS_MASK: u32 = 0x80FF_FFFC;

/// Version of [`PciHost::save`]: magic `"PCIH"`, version, the address latch (u32 LE), then the
/// host bridge's [`PciConfig::save`].
pub const HOST_STATE_VERSION: u8 = 1;
const HOST_MAGIC: [u8; 4] = *b"PCIH";

impl Default for PciHost {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHost {
    pub fn new() -> PciHost {
        PciHost {
            address: 0,
            bridge: PciConfig::host_bridge(),
        }
    }

    /// Whether a `size`-byte access at `port` touches the configuration ports.
    pub fn claims(port: u16, size: u8) -> bool {
        let end = u32::from(port) + u32::from(size);
        u32::from(port) <= 0xCFF && end > u32::from(CONFIG_ADDRESS)
    }

    /// The configuration address latch.
    pub fn address(&self) -> u32 {
        self.address
    }

    /// A guest `IN` of `size` bytes at `port` (a port [`Self::claims`]).
    pub fn read(&mut self, port: u16, size: u8, devices: &mut dyn PciDevices) -> u32 {
        if port == CONFIG_ADDRESS && size == 4 {
            return self.address;
        }
        let mut value = 0u32;
        for i in 0..size.min(4) {
            let byte = match port.checked_add(u16::from(i)) {
                Some(p @ CONFIG_DATA..=0xCFF) => self
                    .target(p)
                    .and_then(|(dev, func, offset)| {
                        self.with_function(dev, func, devices, |f| f.config_read(offset, 1))
                    })
                    .unwrap_or(0xFF) as u8,
                _ => 0xFF,
            };
            value |= u32::from(byte) << (8 * i);
        }
        value
    }

    /// A guest `OUT` of `size` bytes of `value` at `port` (a port [`Self::claims`]).
    pub fn write(&mut self, port: u16, size: u8, value: u32, devices: &mut dyn PciDevices) {
        if port == CONFIG_ADDRESS && size == 4 {
            self.address = value & ADDRESS_MASK;
            return;
        }
        // Byte by byte: a word or dword in the data window reaches consecutive registers; bytes
        // past 0xCFF belong to no configuration register.
        for i in 0..size.min(4) {
            if let Some(p @ CONFIG_DATA..=0xCFF) = port.checked_add(u16::from(i)) {
                if let Some((dev, func, offset)) = self.target(p) {
                    let byte = (value >> (8 * i)) & 0xFF;
                    self.with_function(dev, func, devices, |f| {
                        f.config_write(offset, 1, byte);
                    });
                }
            }
        }
    }

    /// (device, function, register offset) the data port `port` reaches now, if enabled and on
    /// bus 0.
    fn target(&self, port: u16) -> Option<(u8, u8, u8)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xFF != 0 {
            return None;
        }
        let device = ((a >> 11) & 0x1F) as u8;
        let function = ((a >> 8) & 0x7) as u8;
        let offset = (a & 0xFC) as u8 | (port - CONFIG_DATA) as u8;
        Some((device, function, offset))
    }

    fn with_function<R>(
        &mut self,
        device: u8,
        function: u8,
        devices: &mut dyn PciDevices,
        f: impl FnOnce(&mut dyn PciFunction) -> R,
    ) -> Option<R> {
        if device == 0 {
            return (function == 0).then(|| f(&mut self.bridge));
        }
        devices.function(device, function).map(f)
    }

    /// Appends the latch and the host bridge's header to `out` (format [`HOST_STATE_VERSION`]).
    pub fn save(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&HOST_MAGIC);
        out.push(HOST_STATE_VERSION);
        out.extend_from_slice(&self.address.to_le_bytes());
        self.bridge.save(out);
    }

    /// Rebuilds the host from bytes produced by [`Self::save`], checking every field.
    pub fn restore(bytes: &[u8]) -> Result<PciHost, PciStateError> {
        let head = bytes.get(..9).ok_or(PciStateError::Truncated)?;
        if head[0..4] != HOST_MAGIC {
            return Err(PciStateError::BadMagic);
        }
        if head[4] != HOST_STATE_VERSION {
            return Err(PciStateError::UnsupportedVersion { version: head[4] });
        }
        let address = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        if address & !ADDRESS_MASK != 0 {
            return Err(PciStateError::InvalidValue { at: 5 });
        }
        let mut host = PciHost::new();
        host.address = address;
        host.bridge.restore(&bytes[9..])?;
        Ok(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    fn addr(device: u8, function: u8, offset: u8) -> u32 {
        0x8000_0000 | u32::from(device) << 11 | u32::from(function) << 8 | u32::from(offset)
    }

    fn test_identity() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1AF4,
            device_id: 0x1001,
            revision: 0,
            class: [0x01, 0x00, 0x00],
            subsystem_vendor_id: 0x1AF4,
            subsystem_id: 2,
            interrupt_pin: 1,
        }
    }

    fn test_device() -> PciConfig {
        let mut bars = [BarKind::None; BAR_COUNT];
        bars[0] = BarKind::Io { size: 0x40 };
        bars[1] = BarKind::Memory32 { size: 0x1000 };
        PciConfig::new(test_identity(), bars).unwrap()
    }

    /// Bus 0 with one device at slot 3.
    struct OneDevice(PciConfig);

    impl PciDevices for OneDevice {
        fn function(&mut self, device: u8, function: u8) -> Option<&mut dyn PciFunction> {
            (device == 3 && function == 0).then_some(&mut self.0 as &mut dyn PciFunction)
        }
    }

    fn cfg_read(host: &mut PciHost, devs: &mut dyn PciDevices, a: u32, size: u8) -> u32 {
        host.write(CONFIG_ADDRESS, 4, a & !3, devs);
        host.read(CONFIG_DATA + (a & 3) as u16, size, devs)
    }

    fn cfg_write(host: &mut PciHost, devs: &mut dyn PciDevices, a: u32, size: u8, v: u32) {
        host.write(CONFIG_ADDRESS, 4, a & !3, devs);
        host.write(CONFIG_DATA + (a & 3) as u16, size, v, devs);
    }

    #[test]
    fn identity_registers() {
        let mut host = PciHost::new();
        let mut devs = OneDevice(test_device());
        let d = &mut devs;
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 0), 4), 0x1001_1AF4);
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 0), 2), 0x1AF4);
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 2), 2), 0x1001);
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 1), 1), 0x1A);
        // Class 01/00/00, revision 0.
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 8), 4), 0x0100_0000);
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 0x2C), 4), 0x0002_1AF4);
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 0x3D), 1), 1);
        // Header type 0, single function.
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 0x0E), 1), 0);
        // Beyond the header and unimplemented registers: 0.
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 0x40), 4), 0);
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 0xFC), 4), 0);
        assert_eq!(cfg_read(&mut host, d, addr(3, 0, 0x30), 4), 0);
        // Host bridge at 00:00.0.
        assert_eq!(cfg_read(&mut host, d, addr(0, 0, 0), 4), 0x1237_8086);
        assert_eq!(cfg_read(&mut host, d, addr(0, 0, 8), 4) >> 8, 0x06_0000);
    }

    #[test]
    fn absent_functions_and_disabled_access_read_all_ones() {
        let mut host = PciHost::new();
        let mut devs = OneDevice(test_device());
        let d = &mut devs;
        for a in [addr(4, 0, 0), addr(3, 1, 0), addr(0, 1, 0), addr(31, 7, 0)] {
            assert_eq!(cfg_read(&mut host, d, a, 4), 0xFFFF_FFFF, "{a:#x}");
            assert_eq!(cfg_read(&mut host, d, a, 2), 0xFFFF, "{a:#x}");
        }
        // Bus 1 does not exist.
        assert_eq!(
            cfg_read(&mut host, d, addr(3, 0, 0) | 1 << 16, 4),
            0xFFFF_FFFF
        );
        // Enable bit clear.
        assert_eq!(
            cfg_read(&mut host, d, addr(3, 0, 0) & !0x8000_0000, 4),
            u32::MAX
        );
        // Writes there go nowhere.
        cfg_write(&mut host, d, addr(4, 0, 4), 2, 0xFFFF);
        assert_eq!(devs.0, test_device());
    }

    #[test]
    fn address_register() {
        let mut host = PciHost::new();
        let d = &mut NoDevices;
        host.write(CONFIG_ADDRESS, 4, 0xFFFF_FFFF, d);
        assert_eq!(host.read(CONFIG_ADDRESS, 4, d), ADDRESS_MASK);
        // Byte and word accesses to 0xCF8..0xCFB are other chipset registers: not the latch.
        host.write(CONFIG_ADDRESS, 4, 0x8000_0000, d);
        host.write(CONFIG_ADDRESS + 1, 1, 0x55, d);
        host.write(CONFIG_ADDRESS, 2, 0x1234, d);
        assert_eq!(host.read(CONFIG_ADDRESS, 4, d), 0x8000_0000);
        assert_eq!(host.read(CONFIG_ADDRESS, 1, d), 0xFF);
        assert_eq!(host.read(CONFIG_ADDRESS + 3, 1, d), 0xFF);
        // Linux's mechanism #1 probe: save, write the enable bit alone, read it back.
        host.write(CONFIG_ADDRESS, 4, 0x8000_0000, d);
        assert_eq!(host.read(CONFIG_ADDRESS, 4, d), 0x8000_0000);
        assert!(PciHost::claims(0xCF8, 4));
        assert!(PciHost::claims(0xCFF, 1));
        assert!(PciHost::claims(0xCF6, 4));
        assert!(!PciHost::claims(0xCF4, 4));
        assert!(!PciHost::claims(0xD00, 1));
    }

    #[test]
    fn data_port_offsets_and_crossing_the_window() {
        let mut host = PciHost::new();
        let mut devs = OneDevice(test_device());
        host.write(CONFIG_ADDRESS, 4, addr(3, 0, 0), &mut devs);
        assert_eq!(host.read(0xCFE, 2, &mut devs), 0x1001);
        assert_eq!(host.read(0xCFD, 1, &mut devs), 0x1A);
        // A dword at 0xCFE: two bytes of the register, two past the window (float high).
        assert_eq!(host.read(0xCFE, 4, &mut devs), 0xFFFF_1001);
        // Starting below the window: the bytes below are not configuration data, the ones in
        // it are.
        assert_eq!(host.read(0xCFA, 4, &mut devs), 0x1AF4_FFFF);
    }

    #[test]
    fn bar_sizing_and_assignment() {
        let mut host = PciHost::new();
        let mut devs = OneDevice(test_device());
        let d = &mut devs;
        let bar0 = addr(3, 0, 0x10);
        let bar1 = addr(3, 0, 0x14);
        assert_eq!(cfg_read(&mut host, d, bar0, 4), 0x1);
        cfg_write(&mut host, d, bar0, 4, 0xFFFF_FFFF);
        let mask = cfg_read(&mut host, d, bar0, 4);
        assert_eq!(mask, 0x0000_FFC1);
        // What a driver computes: the lowest set address bit is the size.
        let m = mask & !3;
        assert_eq!(m.isolate_lowest_one(), 0x40);
        cfg_write(&mut host, d, bar0, 4, 0xC040);
        assert_eq!(cfg_read(&mut host, d, bar0, 4), 0xC041);
        // Misaligned bits are dropped.
        cfg_write(&mut host, d, bar0, 4, 0xC05F);
        assert_eq!(devs.0.bar_address(0), Some(0xC040));
        let d = &mut devs;
        cfg_write(&mut host, d, bar1, 4, 0xFFFF_FFFF);
        assert_eq!(cfg_read(&mut host, d, bar1, 4), 0xFFFF_F000);
        cfg_write(&mut host, d, bar1, 4, 0xFEBF_1000);
        assert_eq!(cfg_read(&mut host, d, bar1, 4), 0xFEBF_1000);
        // Unimplemented BARs size to nothing.
        let bar2 = addr(3, 0, 0x18);
        cfg_write(&mut host, d, bar2, 4, 0xFFFF_FFFF);
        assert_eq!(cfg_read(&mut host, d, bar2, 4), 0);
        assert_eq!(devs.0.bar_address(2), None);
        assert_eq!(devs.0.bar_address(6), None);
        // Byte writes reach single BAR bytes.
        let d = &mut devs;
        cfg_write(&mut host, d, bar0 + 1, 1, 0xD0);
        assert_eq!(devs.0.bar_address(0), Some(0xD040));
    }

    #[test]
    fn command_register_and_read_only_bytes() {
        let mut c = test_device();
        assert!(!c.io_enabled() && !c.bus_master() && !c.intx_disabled());
        c.write(COMMAND, 2, 0xFFFF);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert!(c.io_enabled() && c.bus_master() && c.intx_disabled());
        c.write(COMMAND, 1, 0x01);
        assert_eq!(c.command(), COMMAND_IO | COMMAND_INTX_DISABLE);
        // Ids, class, status, header type, pin: read-only.
        let before = c.clone();
        for offset in [0u8, 2, 6, 8, 0x0E, 0x2C, 0x2E, 0x3D] {
            c.write(offset, 2, 0xA5A5);
        }
        assert_eq!(c, before);
        c.write(INTERRUPT_LINE, 1, 11);
        assert_eq!(c.read(INTERRUPT_LINE, 1), 11);
        c.write(LATENCY_TIMER, 1, 0x40);
        assert_eq!(c.read(LATENCY_TIMER, 1), 0x40);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut bars = [BarKind::None; BAR_COUNT];
        bars[0] = BarKind::Io { size: 0x30 };
        assert_eq!(
            PciConfig::new(test_identity(), bars),
            Err(PciError::BadBarSize { bar: 0, size: 0x30 })
        );
        bars[0] = BarKind::Io { size: 0x200 };
        assert!(PciConfig::new(test_identity(), bars).is_err());
        bars[0] = BarKind::Memory32 { size: 8 };
        assert!(PciConfig::new(test_identity(), bars).is_err());
        assert!(!format!("{}", PciError::NoSuchBar { bar: 7 }).is_empty());
    }

    #[test]
    fn config_save_restore() {
        let mut c = test_device();
        c.set_bar(0, 0xC000);
        c.set_command(COMMAND_IO | COMMAND_BUS_MASTER);
        c.set_interrupt_line(11);
        let mut bytes = Vec::new();
        c.save(&mut bytes);
        assert_eq!(bytes.len(), CONFIG_STATE_LEN);
        let mut fresh = test_device();
        fresh.restore(&bytes).unwrap();
        assert_eq!(fresh, c);
        // Another device's state: refused, nothing changed.
        let mut other = PciConfig::host_bridge();
        let before = other.clone();
        assert_eq!(
            other.restore(&bytes),
            Err(PciStateError::ReadOnlyMismatch { offset: 0 })
        );
        assert_eq!(other, before);
        // A BAR's size bits cannot be forged.
        let mut forged = bytes.clone();
        forged[5 + 0x10] = 0x21; // an I/O BAR address with bit 5 set: a 32-byte BAR
        assert_eq!(
            test_device().restore(&forged),
            Err(PciStateError::ReadOnlyMismatch { offset: 0x10 })
        );
        let mut t = test_device();
        assert_eq!(t.restore(&bytes[..10]), Err(PciStateError::Truncated));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(t.restore(&long), Err(PciStateError::TrailingBytes));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(t.restore(&magic), Err(PciStateError::BadMagic));
        let mut version = bytes;
        version[4] = 9;
        assert_eq!(
            t.restore(&version),
            Err(PciStateError::UnsupportedVersion { version: 9 })
        );
    }

    #[test]
    fn host_save_restore() {
        let mut host = PciHost::new();
        let d = &mut NoDevices;
        host.write(CONFIG_ADDRESS, 4, addr(0, 0, 0x0C), d);
        host.write(CONFIG_DATA + 1, 1, 0x20, d); // latency timer
        let mut bytes = Vec::new();
        host.save(&mut bytes);
        let back = PciHost::restore(&bytes).unwrap();
        assert_eq!(back, host);
        let mut bad = bytes.clone();
        bad[5] = 0x01; // bit 0 of the latch never holds a value
        assert_eq!(
            PciHost::restore(&bad),
            Err(PciStateError::InvalidValue { at: 5 })
        );
        assert_eq!(PciHost::restore(&bytes[..4]), Err(PciStateError::Truncated));
        let mut v = bytes.clone();
        v[4] = 2;
        assert!(matches!(
            PciHost::restore(&v),
            Err(PciStateError::UnsupportedVersion { version: 2 })
        ));
        let mut m = bytes;
        m[1] = 0;
        assert_eq!(PciHost::restore(&m), Err(PciStateError::BadMagic));
        for e in [
            PciStateError::Truncated,
            PciStateError::BadMagic,
            PciStateError::UnsupportedVersion { version: 1 },
            PciStateError::ReadOnlyMismatch { offset: 1 },
            PciStateError::InvalidValue { at: 1 },
            PciStateError::TrailingBytes,
        ] {
            assert!(!format!("{e}").is_empty());
        }
    }

    #[test]
    fn random_port_traffic_never_panics() {
        let mut host = PciHost::new();
        let mut devs = OneDevice(test_device());
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..50_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let port = 0xCF6 + (s % 12) as u16;
            let size = [1u8, 2, 4][(s >> 8) as usize % 3];
            let value = (s >> 32) as u32;
            if s & (1 << 20) != 0 {
                host.write(port, size, value, &mut devs);
            } else {
                host.read(port, size, &mut devs);
            }
        }
        // The identity survived whatever was written.
        assert_eq!(devs.0.read(0, 4), 0x1001_1AF4);
    }
}
