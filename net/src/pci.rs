//! PCI enumeration: which devices sit on the buses, what they are, and where their registers are.
//!
//! The hardware seam is [`ConfigSpace`]: 32-bit reads and writes of a function's configuration
//! space. The kernel implements it with configuration mechanism #1 (I/O ports 0xCF8/0xCFC); host
//! tests implement it with an in-memory fake. Everything else here is plain logic:
//!
//! - [`scan`] walks bus 0 and every bus behind a PCI-to-PCI bridge (following the bridges'
//!   secondary bus numbers, each bus once), every device (0..32) and, for multi-function
//!   devices, every function (0..8);
//! - each function's BARs are decoded (memory or I/O, 32- or 64-bit, prefetchable) and sized by
//!   the usual write-all-ones probe, with memory and I/O decoding switched off meanwhile and the
//!   command register and BARs restored afterwards;
//! - [`enable_device`] turns on memory decoding and bus mastering (DMA) for a driver;
//!   [`set_intx`] lets a function raise its legacy interrupt line, or stops it.
//!
//! Nothing a device reports can make this panic: unknown header types, BARs that read as
//! garbage and bridges that point back at a bus already seen are all handled.

use alloc::vec::Vec;
use core::fmt;

/// Config-space offsets and bits (PCI Local Bus Specification 3.0, chapter 6).
pub mod reg {
    pub const VENDOR_DEVICE: u8 = 0x00;
    pub const COMMAND_STATUS: u8 = 0x04;
    pub const CLASS_REVISION: u8 = 0x08;
    /// Cache line size, latency timer, header type, BIST.
    pub const HEADER: u8 = 0x0C;
    pub const BAR0: u8 = 0x10;
    /// Type 1 (bridge) headers: primary, secondary, subordinate bus, secondary latency.
    pub const BRIDGE_BUSES: u8 = 0x18;
    /// Interrupt line, pin, min grant, max latency.
    pub const INTERRUPT: u8 = 0x3C;

    pub const COMMAND_IO: u32 = 1 << 0;
    pub const COMMAND_MEMORY: u32 = 1 << 1;
    pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
    /// Disables the function's legacy INTx interrupt (PCI 2.3).
    pub const COMMAND_INTX_DISABLE: u32 = 1 << 10;
}

/// Bus, device and function of one PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub bus: u8,
    /// 0..32.
    pub device: u8,
    /// 0..8.
    pub function: u8,
}

impl PciAddress {
    /// A function's address; `device` and `function` are masked to their 5 and 3 bits.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        PciAddress {
            bus,
            device: device & 0x1F,
            function: function & 0x07,
        }
    }

    /// The CONFIG_ADDRESS value of configuration mechanism #1 for the dword at `offset`.
    pub fn mechanism1(self, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.bus) << 16)
            | (u32::from(self.device & 0x1F) << 11)
            | (u32::from(self.function & 0x07) << 8)
            | u32::from(offset & 0xFC)
    }
}

/// `bb:dd.f` in hex, as lspci prints it.
impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Access to configuration space. Offsets are dword-aligned (the low two bits are ignored).
pub trait ConfigSpace {
    /// The dword at `offset` of `addr`'s configuration space; all ones where nothing answers.
    fn read32(&mut self, addr: PciAddress, offset: u8) -> u32;
    /// Writes the dword at `offset`.
    fn write32(&mut self, addr: PciAddress, offset: u8, value: u32);
}

/// One base address register, decoded and sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bar {
    /// Memory space.
    Memory {
        /// Physical base address (0 when firmware did not assign one).
        addr: u64,
        /// Size in bytes (a power of two; 0 if the probe made no sense).
        size: u64,
        prefetchable: bool,
        /// Occupies this BAR and the next.
        is_64bit: bool,
    },
    /// I/O space.
    Io { port: u32, size: u32 },
}

impl Bar {
    /// The memory base address, if this is an assigned memory BAR.
    pub fn memory_addr(&self) -> Option<u64> {
        match *self {
            Bar::Memory { addr, .. } if addr != 0 => Some(addr),
            _ => None,
        }
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        match *self {
            Bar::Memory { size, .. } => size,
            Bar::Io { size, .. } => u64::from(size),
        }
    }
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Bar::Memory {
                addr,
                size,
                prefetchable,
                is_64bit,
            } => {
                write!(f, "mem {addr:#x} {}", SizeText(size))?;
                if is_64bit {
                    write!(f, " 64-bit")?;
                }
                if prefetchable {
                    write!(f, " prefetchable")?;
                }
                Ok(())
            }
            Bar::Io { port, size } => write!(f, "io {port:#x} {}", SizeText(u64::from(size))),
        }
    }
}

/// A size as `128K`, `4M`, `256` (bytes).
struct SizeText(u64);

impl fmt::Display for SizeText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s >= 1 << 30 && s.is_multiple_of(1 << 30) {
            write!(f, "{}G", s >> 30)
        } else if s >= 1 << 20 && s.is_multiple_of(1 << 20) {
            write!(f, "{}M", s >> 20)
        } else if s >= 1 << 10 && s.is_multiple_of(1 << 10) {
            write!(f, "{}K", s >> 10)
        } else {
            write!(f, "{s}")
        }
    }
}

/// What [`scan`] found about one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    pub addr: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    /// Header layout (0 = device, 1 = PCI-to-PCI bridge, 2 = CardBus bridge), without the
    /// multi-function bit.
    pub header_type: u8,
    /// BAR slots 0..6 (a 64-bit BAR fills its slot; the next slot is `None`). Bridges have two.
    pub bars: [Option<Bar>; 6],
    pub interrupt_line: u8,
    /// 0 = none, 1..=4 = INTA#..INTD#.
    pub interrupt_pin: u8,
    /// For PCI-to-PCI bridges: the bus behind it.
    pub secondary_bus: Option<u8>,
}

impl PciFunction {
    /// True for the given vendor and device IDs.
    pub fn is(&self, vendor_id: u16, device_id: u16) -> bool {
        self.vendor_id == vendor_id && self.device_id == device_id
    }

    /// What the class code says this is.
    pub fn class_name(&self) -> &'static str {
        class_name(self.class, self.subclass)
    }
}

/// One line, as the `pci` console listing shows it:
/// `00:03.0 8086:100e rev 03 Ethernet controller [Intel 82540EM] irq 11 | bar0 mem ...`.
impl fmt::Display for PciFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x} rev {:02x} {}",
            self.addr,
            self.vendor_id,
            self.device_id,
            self.revision,
            self.class_name()
        )?;
        if let Some(name) = device_name(self.vendor_id, self.device_id) {
            write!(f, " [{name}]")?;
        } else if let Some(vendor) = vendor_name(self.vendor_id) {
            write!(f, " [{vendor}]")?;
        }
        if let Some(bus) = self.secondary_bus {
            write!(f, " -> bus {bus:02x}")?;
        }
        if self.interrupt_pin != 0 {
            write!(f, " irq {}", self.interrupt_line)?;
        }
        for (i, bar) in self.bars.iter().enumerate() {
            if let Some(bar) = bar {
                write!(f, " | bar{i} {bar}")?;
            }
        }
        Ok(())
    }
}

/// Most buses a scan visits (the PCI maximum).
const MAX_BUSES: usize = 256;

/// Finds every function on bus 0 and the buses behind its bridges, in bus/device/function order
/// of discovery. Sizes BARs (briefly switching off decoding of each function in turn).
pub fn scan(cfg: &mut impl ConfigSpace) -> Vec<PciFunction> {
    let mut found = Vec::new();
    let mut seen = [false; MAX_BUSES];
    let mut pending: Vec<u8> = Vec::new();
    // Several host bridges: function N of the host bridge at 00:00 owns bus N.
    let host = PciAddress::new(0, 0, 0);
    let host_id = cfg.read32(host, reg::VENDOR_DEVICE);
    if vendor_of(host_id).is_some() && header_byte(cfg, host) & 0x80 != 0 {
        for function in (0..8u8).rev() {
            if vendor_of(cfg.read32(PciAddress::new(0, 0, function), reg::VENDOR_DEVICE)).is_some()
            {
                pending.push(function);
            }
        }
    } else {
        pending.push(0);
    }
    while let Some(bus) = pending.pop() {
        let slot = &mut seen[usize::from(bus)];
        if *slot {
            continue;
        }
        *slot = true;
        let mut behind = Vec::new();
        for device in 0..32u8 {
            scan_device(cfg, bus, device, &mut found, &mut behind);
        }
        // Depth-first, in the order the bridges were found.
        for secondary in behind.into_iter().rev() {
            pending.push(secondary);
        }
    }
    found
}

fn vendor_of(id: u32) -> Option<u16> {
    let vendor = (id & 0xFFFF) as u16;
    (vendor != 0xFFFF && vendor != 0).then_some(vendor)
}

fn header_byte(cfg: &mut impl ConfigSpace, addr: PciAddress) -> u8 {
    (cfg.read32(addr, reg::HEADER) >> 16) as u8
}

fn scan_device(
    cfg: &mut impl ConfigSpace,
    bus: u8,
    device: u8,
    found: &mut Vec<PciFunction>,
    behind: &mut Vec<u8>,
) {
    let first = PciAddress::new(bus, device, 0);
    if vendor_of(cfg.read32(first, reg::VENDOR_DEVICE)).is_none() {
        return;
    }
    let functions = if header_byte(cfg, first) & 0x80 != 0 {
        8
    } else {
        1
    };
    for function in 0..functions {
        let addr = PciAddress::new(bus, device, function);
        if let Some(f) = read_function(cfg, addr) {
            if let Some(secondary) = f.secondary_bus {
                // A bridge whose secondary bus is 0 (unconfigured) or its own bus leads nowhere.
                if secondary != 0 && secondary != bus {
                    behind.push(secondary);
                }
            }
            found.push(f);
        }
    }
}

/// Reads and decodes one function's header; `None` if nothing answers at `addr`.
pub fn read_function(cfg: &mut impl ConfigSpace, addr: PciAddress) -> Option<PciFunction> {
    let id = cfg.read32(addr, reg::VENDOR_DEVICE);
    let vendor_id = vendor_of(id)?;
    let class_rev = cfg.read32(addr, reg::CLASS_REVISION);
    let header_type = header_byte(cfg, addr) & 0x7F;
    let interrupt = cfg.read32(addr, reg::INTERRUPT);
    let bar_count = match header_type {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    let bars = read_bars(cfg, addr, bar_count);
    let secondary_bus =
        (header_type == 1).then(|| (cfg.read32(addr, reg::BRIDGE_BUSES) >> 8) as u8);
    Some(PciFunction {
        addr,
        vendor_id,
        device_id: (id >> 16) as u16,
        class: (class_rev >> 24) as u8,
        subclass: (class_rev >> 16) as u8,
        prog_if: (class_rev >> 8) as u8,
        revision: class_rev as u8,
        header_type,
        bars,
        interrupt_line: interrupt as u8,
        interrupt_pin: (interrupt >> 8) as u8,
        secondary_bus,
    })
}

/// Decodes and sizes the first `count` BARs, with decoding off meanwhile.
fn read_bars(cfg: &mut impl ConfigSpace, addr: PciAddress, count: u8) -> [Option<Bar>; 6] {
    let mut bars = [None; 6];
    if count == 0 {
        return bars;
    }
    let command = cfg.read32(addr, reg::COMMAND_STATUS);
    // Status bits are write-one-to-clear: write back only the command half.
    let command_only = command & 0xFFFF;
    cfg.write32(
        addr,
        reg::COMMAND_STATUS,
        command_only & !(reg::COMMAND_IO | reg::COMMAND_MEMORY),
    );
    let mut index = 0u8;
    while index < count {
        let offset = reg::BAR0 + 4 * index;
        let original = cfg.read32(addr, offset);
        let probe = |cfg: &mut _| size_probe(cfg, addr, offset, original);
        if original & 1 == 1 {
            let mask = probe(cfg) & !0x3;
            let size = if mask == 0 {
                0
            } else {
                (!mask).wrapping_add(1) & 0xFFFF
            };
            if mask != 0 {
                bars[usize::from(index)] = Some(Bar::Io {
                    port: original & !0x3,
                    size,
                });
            }
            index += 1;
            continue;
        }
        let kind = (original >> 1) & 0x3;
        let prefetchable = original & 0x8 != 0;
        if kind == 0x2 && index + 1 < count {
            let high_offset = offset + 4;
            let high = cfg.read32(addr, high_offset);
            let low_mask = probe(cfg) & !0xF;
            let high_mask = size_probe(cfg, addr, high_offset, high);
            let mask = (u64::from(high_mask) << 32) | u64::from(low_mask);
            if mask != 0 {
                bars[usize::from(index)] = Some(Bar::Memory {
                    addr: (u64::from(high) << 32) | u64::from(original & !0xF),
                    size: (!mask).wrapping_add(1),
                    prefetchable,
                    is_64bit: true,
                });
            }
            index += 2;
        } else {
            let mask = probe(cfg) & !0xF;
            if mask != 0 {
                bars[usize::from(index)] = Some(Bar::Memory {
                    addr: u64::from(original & !0xF),
                    size: u64::from((!mask).wrapping_add(1)),
                    prefetchable,
                    is_64bit: false,
                });
            }
            index += 1;
        }
    }
    cfg.write32(addr, reg::COMMAND_STATUS, command_only);
    bars
}

/// Writes all ones to a BAR, reads back which bits stick, restores it.
fn size_probe(cfg: &mut impl ConfigSpace, addr: PciAddress, offset: u8, original: u32) -> u32 {
    cfg.write32(addr, offset, 0xFFFF_FFFF);
    let mask = cfg.read32(addr, offset);
    cfg.write32(addr, offset, original);
    mask
}

/// Turns on memory-space decoding and bus mastering for a driver, and (when `no_intx`) switches
/// the legacy interrupt off. Returns the new command register.
pub fn enable_device(cfg: &mut impl ConfigSpace, addr: PciAddress, no_intx: bool) -> u16 {
    let mut command = cfg.read32(addr, reg::COMMAND_STATUS) & 0xFFFF;
    command |= reg::COMMAND_MEMORY | reg::COMMAND_BUS_MASTER;
    if no_intx {
        command |= reg::COMMAND_INTX_DISABLE;
    }
    cfg.write32(addr, reg::COMMAND_STATUS, command);
    (cfg.read32(addr, reg::COMMAND_STATUS) & 0xFFFF) as u16
}

/// Lets the function assert its legacy INTx line (`enabled`) or stops it (the command
/// register's Interrupt Disable bit, PCI 2.3). Returns the new command register.
pub fn set_intx(cfg: &mut impl ConfigSpace, addr: PciAddress, enabled: bool) -> u16 {
    let mut command = cfg.read32(addr, reg::COMMAND_STATUS) & 0xFFFF;
    if enabled {
        command &= !reg::COMMAND_INTX_DISABLE;
    } else {
        command |= reg::COMMAND_INTX_DISABLE;
    }
    cfg.write32(addr, reg::COMMAND_STATUS, command);
    (cfg.read32(addr, reg::COMMAND_STATUS) & 0xFFFF) as u16
}

/// The class/subclass names of the PCI code and ID assignment specification (common ones).
pub fn class_name(class: u8, subclass: u8) -> &'static str {
    match (class, subclass) {
        (0x00, _) => "Unclassified device",
        (0x01, 0x00) => "SCSI storage controller",
        (0x01, 0x01) => "IDE interface",
        (0x01, 0x06) => "SATA controller",
        (0x01, 0x08) => "Non-Volatile memory controller",
        (0x01, _) => "Mass storage controller",
        (0x02, 0x00) => "Ethernet controller",
        (0x02, _) => "Network controller",
        (0x03, 0x00) => "VGA compatible controller",
        (0x03, _) => "Display controller",
        (0x04, _) => "Multimedia controller",
        (0x05, _) => "Memory controller",
        (0x06, 0x00) => "Host bridge",
        (0x06, 0x01) => "ISA bridge",
        (0x06, 0x04) => "PCI bridge",
        (0x06, 0x80) => "Bridge",
        (0x06, _) => "Bridge",
        (0x07, _) => "Communication controller",
        (0x08, _) => "System peripheral",
        (0x0C, 0x03) => "USB controller",
        (0x0C, 0x05) => "SMBus",
        (0x0C, _) => "Serial bus controller",
        (0xFF, _) => "Unassigned class",
        _ => "Device",
    }
}

/// Vendors seen on the emulated and common real machines.
pub fn vendor_name(vendor_id: u16) -> Option<&'static str> {
    Some(match vendor_id {
        0x8086 => "Intel",
        0x1022 => "AMD",
        0x1AF4 => "Red Hat virtio",
        0x1B36 => "Red Hat",
        0x1234 => "QEMU/Bochs",
        0x10EC => "Realtek",
        0x14E4 => "Broadcom",
        0x15B3 => "Mellanox",
        _ => return None,
    })
}

/// Device names for the functions this kernel drives or commonly sees.
pub fn device_name(vendor_id: u16, device_id: u16) -> Option<&'static str> {
    Some(match (vendor_id, device_id) {
        (0x8086, 0x100E) => "Intel 82540EM Gigabit Ethernet (e1000)",
        (0x8086, 0x100F) => "Intel 82545EM Gigabit Ethernet",
        (0x8086, 0x10D3) => "Intel 82574L Gigabit Ethernet",
        (0x8086, 0x1237) => "Intel 440FX host bridge",
        (0x8086, 0x7000) => "Intel PIIX3 ISA bridge",
        (0x8086, 0x7010) => "Intel PIIX3 IDE",
        (0x8086, 0x7020) => "Intel PIIX3 USB",
        (0x8086, 0x7113) => "Intel PIIX4 ACPI",
        (0x8086, 0x29C0) => "Intel Q35 host bridge",
        (0x1AF4, 0x1000) => "virtio-net (legacy)",
        (0x1AF4, 0x1041) => "virtio-net",
        (0x1234, 0x1111) => "QEMU/Bochs VGA",
        (0x10EC, 0x8139) => "Realtek RTL8139",
        _ => return None,
    })
}

/// The name of `(vendor_id, device_id)` in a driver's table of the device IDs it supports for
/// `vendor`; `None` when the driver does not handle the device.
pub fn model_in(
    supported: &[(u16, &'static str)],
    vendor: u16,
    vendor_id: u16,
    device_id: u16,
) -> Option<&'static str> {
    if vendor_id != vendor {
        return None;
    }
    supported
        .iter()
        .find(|&&(id, _)| id == device_id)
        .map(|&(_, name)| name)
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory configuration space with BAR sizing semantics.

    use super::*;
    use std::collections::BTreeMap;

    /// One fake function: its 64 dwords, and for each BAR the mask of writable bits.
    #[derive(Clone)]
    pub struct FakeFunction {
        pub regs: [u32; 64],
        pub bar_masks: [u32; 6],
        /// BAR slots holding the upper half of a 64-bit BAR (no flag bits).
        pub upper: [bool; 6],
    }

    impl FakeFunction {
        pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, header: u8) -> Self {
            let mut regs = [0u32; 64];
            regs[0] = u32::from(vendor) | (u32::from(device) << 16);
            regs[2] = (u32::from(class) << 24) | (u32::from(subclass) << 16) | 0x03;
            regs[3] = u32::from(header) << 16;
            FakeFunction {
                regs,
                bar_masks: [0; 6],
                upper: [false; 6],
            }
        }

        /// A memory BAR of `size` bytes (power of two) at `addr`.
        pub fn mem_bar(mut self, index: usize, addr: u32, size: u32, flags: u32) -> Self {
            self.regs[4 + index] = addr | flags;
            self.bar_masks[index] = !(size - 1) | flags;
            self
        }

        pub fn io_bar(mut self, index: usize, port: u32, size: u32) -> Self {
            self.regs[4 + index] = port | 1;
            self.bar_masks[index] = (!(size - 1) & 0xFFFF) | 1;
            self
        }

        /// A 64-bit memory BAR pair at index, index+1.
        pub fn mem64_bar(mut self, index: usize, addr: u64, size: u64) -> Self {
            let mask = !(size - 1);
            self.regs[4 + index] = (addr as u32) | 0x4;
            self.regs[5 + index] = (addr >> 32) as u32;
            self.bar_masks[index] = (mask as u32) | 0x4;
            self.bar_masks[index + 1] = (mask >> 32) as u32;
            self.upper[index + 1] = true;
            self
        }

        pub fn secondary(mut self, bus: u8) -> Self {
            self.regs[6] = u32::from(bus) << 8;
            self
        }
    }

    #[derive(Default)]
    pub struct FakeConfig {
        pub functions: BTreeMap<PciAddress, FakeFunction>,
        pub reads: usize,
        pub writes: Vec<(PciAddress, u8, u32)>,
    }

    impl FakeConfig {
        pub fn add(&mut self, addr: PciAddress, f: FakeFunction) {
            self.functions.insert(addr, f);
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read32(&mut self, addr: PciAddress, offset: u8) -> u32 {
            self.reads += 1;
            self.functions
                .get(&addr)
                .map_or(0xFFFF_FFFF, |f| f.regs[usize::from(offset / 4)])
        }

        fn write32(&mut self, addr: PciAddress, offset: u8, value: u32) {
            self.writes.push((addr, offset, value));
            let Some(f) = self.functions.get_mut(&addr) else {
                return;
            };
            let index = usize::from(offset / 4);
            match index {
                4..=9 => {
                    let bar = index - 4;
                    let mask = f.bar_masks[bar];
                    // Read-only low flag bits keep their value.
                    let flags = if f.regs[index] & 1 == 1 { 0x3 } else { 0xF };
                    let flags = if mask == 0 || f.upper[bar] { 0 } else { flags };
                    f.regs[index] = (value & mask & !flags) | (f.regs[index] & flags);
                }
                1 => f.regs[1] = (f.regs[1] & 0xFFFF_0000) | (value & 0xFFFF),
                0 | 2 | 3 => {}
                _ => f.regs[index] = value,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use alloc::format;
    use alloc::string::ToString;

    fn qemu_like() -> FakeConfig {
        let mut cfg = FakeConfig::default();
        cfg.add(
            PciAddress::new(0, 0, 0),
            FakeFunction::new(0x8086, 0x1237, 0x06, 0x00, 0),
        );
        // PIIX3: multi-function ISA bridge + IDE.
        cfg.add(
            PciAddress::new(0, 1, 0),
            FakeFunction::new(0x8086, 0x7000, 0x06, 0x01, 0x80),
        );
        cfg.add(
            PciAddress::new(0, 1, 1),
            FakeFunction::new(0x8086, 0x7010, 0x01, 0x01, 0).io_bar(4, 0xC040, 16),
        );
        let mut nic = FakeFunction::new(0x8086, 0x100E, 0x02, 0x00, 0)
            .mem_bar(0, 0xFEBC_0000, 0x2_0000, 0)
            .io_bar(1, 0xC000, 64);
        nic.regs[15] = 0x0000_010B; // pin INTA, line 11
        nic.regs[1] = 0x0000_0103; // io + memory + ... decoding on
        cfg.add(PciAddress::new(0, 3, 0), nic);
        cfg
    }

    #[test]
    fn mechanism1_address_layout() {
        assert_eq!(PciAddress::new(0, 3, 0).mechanism1(0x10), 0x8000_1810);
        assert_eq!(PciAddress::new(0xFF, 31, 7).mechanism1(0xFF), 0x80FF_FFFC);
        assert_eq!(PciAddress::new(1, 2, 3).to_string(), "01:02.3");
        // Out-of-range device/function numbers are masked, never spill into other fields.
        assert_eq!(PciAddress::new(0, 0xFF, 0xFF), PciAddress::new(0, 31, 7));
    }

    #[test]
    fn scan_finds_functions_and_sizes_bars() {
        let mut cfg = qemu_like();
        let found = scan(&mut cfg);
        let addrs: Vec<_> = found.iter().map(|f| f.addr.to_string()).collect();
        assert_eq!(addrs, ["00:00.0", "00:01.0", "00:01.1", "00:03.0"]);
        let nic = &found[3];
        assert!(nic.is(0x8086, 0x100E));
        assert_eq!(nic.class_name(), "Ethernet controller");
        assert_eq!(
            nic.bars[0],
            Some(Bar::Memory {
                addr: 0xFEBC_0000,
                size: 0x2_0000,
                prefetchable: false,
                is_64bit: false
            })
        );
        assert_eq!(
            nic.bars[1],
            Some(Bar::Io {
                port: 0xC000,
                size: 64
            })
        );
        assert_eq!(nic.bars[2], None);
        assert_eq!((nic.interrupt_line, nic.interrupt_pin), (11, 1));
        assert_eq!(
            found[2].bars[4],
            Some(Bar::Io {
                port: 0xC040,
                size: 16
            })
        );
        // BARs and command were restored after sizing.
        let f = &cfg.functions[&PciAddress::new(0, 3, 0)];
        assert_eq!(f.regs[4], 0xFEBC_0000);
        assert_eq!(f.regs[5], 0xC001);
        assert_eq!(f.regs[1] & 0xFFFF, 0x0103);
        let line = nic.to_string();
        assert!(line.starts_with("00:03.0 8086:100e rev 03 Ethernet controller [Intel 82540EM"));
        assert!(line.contains("irq 11"), "{line}");
        assert!(line.contains("bar0 mem 0xfebc0000 128K"), "{line}");
        assert!(line.contains("bar1 io 0xc000 64"), "{line}");
    }

    #[test]
    fn decoding_is_off_while_bars_are_probed() {
        let mut cfg = qemu_like();
        scan(&mut cfg);
        let nic = PciAddress::new(0, 3, 0);
        let writes: Vec<_> = cfg.writes.iter().filter(|w| w.0 == nic).collect();
        // First write switches decoding off, last restores it; all-ones probes in between.
        assert_eq!(writes.first().map(|w| (w.1, w.2 & 0x3)), Some((0x04, 0)));
        assert_eq!(writes.last().map(|w| (w.1, w.2)), Some((0x04, 0x0103)));
        assert!(writes.iter().any(|w| w.1 == 0x10 && w.2 == 0xFFFF_FFFF));
    }

    #[test]
    fn sixty_four_bit_and_prefetchable_bars() {
        let mut cfg = FakeConfig::default();
        cfg.add(
            PciAddress::new(0, 0, 0),
            FakeFunction::new(0x1AF4, 0x1041, 0x02, 0x00, 0)
                .mem64_bar(4, 0x8_0000_0000, 0x4000)
                .mem_bar(1, 0xFE00_0000, 0x1000, 0x8),
        );
        let found = scan(&mut cfg);
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].bars[4],
            Some(Bar::Memory {
                addr: 0x8_0000_0000,
                size: 0x4000,
                prefetchable: false,
                is_64bit: true
            })
        );
        assert_eq!(found[0].bars[5], None);
        assert_eq!(found[0].bars[4].unwrap().memory_addr(), Some(0x8_0000_0000));
        assert!(matches!(
            found[0].bars[1],
            Some(Bar::Memory {
                prefetchable: true,
                ..
            })
        ));
        assert!(found[0]
            .to_string()
            .contains("bar4 mem 0x800000000 16K 64-bit"));
    }

    #[test]
    fn bridges_lead_to_their_secondary_buses_once() {
        let mut cfg = FakeConfig::default();
        cfg.add(
            PciAddress::new(0, 0, 0),
            FakeFunction::new(0x8086, 0x29C0, 0x06, 0x00, 0),
        );
        cfg.add(
            PciAddress::new(0, 2, 0),
            FakeFunction::new(0x1B36, 0x0001, 0x06, 0x04, 1).secondary(1),
        );
        cfg.add(
            PciAddress::new(0, 4, 0),
            FakeFunction::new(0x1B36, 0x0001, 0x06, 0x04, 1).secondary(2),
        );
        cfg.add(
            PciAddress::new(1, 0, 0),
            FakeFunction::new(0x8086, 0x100E, 0x02, 0x00, 0),
        );
        // A bridge on bus 1 pointing back to bus 0 (a loop) and one to bus 3.
        cfg.add(
            PciAddress::new(1, 1, 0),
            FakeFunction::new(0x1B36, 0x0001, 0x06, 0x04, 1).secondary(0),
        );
        cfg.add(
            PciAddress::new(1, 2, 0),
            FakeFunction::new(0x1B36, 0x0001, 0x06, 0x04, 1).secondary(3),
        );
        cfg.add(
            PciAddress::new(3, 5, 0),
            FakeFunction::new(0x1AF4, 0x1000, 0x02, 0x00, 0),
        );
        cfg.add(
            PciAddress::new(2, 0, 0),
            FakeFunction::new(0x10EC, 0x8139, 0x02, 0x00, 0),
        );
        let found = scan(&mut cfg);
        let addrs: Vec<_> = found.iter().map(|f| f.addr.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "00:00.0", "00:02.0", "00:04.0", "01:00.0", "01:01.0", "01:02.0", "03:05.0",
                "02:00.0"
            ]
        );
        assert_eq!(found[1].secondary_bus, Some(1));
        assert!(found[1].to_string().contains("PCI bridge"));
        assert!(found[1].to_string().contains("-> bus 01"));
    }

    #[test]
    fn multiple_host_bridges_own_buses_by_function() {
        let mut cfg = FakeConfig::default();
        cfg.add(
            PciAddress::new(0, 0, 0),
            FakeFunction::new(0x8086, 0x1237, 0x06, 0x00, 0x80),
        );
        cfg.add(
            PciAddress::new(0, 0, 1),
            FakeFunction::new(0x8086, 0x1237, 0x06, 0x00, 0),
        );
        cfg.add(
            PciAddress::new(1, 7, 0),
            FakeFunction::new(0x8086, 0x100E, 0x02, 0x00, 0),
        );
        let found = scan(&mut cfg);
        let addrs: Vec<_> = found.iter().map(|f| f.addr.to_string()).collect();
        assert_eq!(addrs, ["00:00.0", "00:00.1", "01:07.0"]);
    }

    #[test]
    fn empty_and_garbage_spaces_do_not_panic() {
        let mut cfg = FakeConfig::default();
        assert!(scan(&mut cfg).is_empty());
        // 32 devices x 1 function probed on bus 0, nothing more.
        assert!(cfg.reads <= 40, "{}", cfg.reads);

        // A function with an unknown header type and garbage everywhere else.
        let mut f = FakeFunction::new(0x1234, 0x5678, 0xAB, 0xCD, 0x7F);
        for r in f.regs.iter_mut().skip(4) {
            *r = 0xDEAD_BEEF;
        }
        cfg.add(PciAddress::new(0, 9, 0), f);
        // A 64-bit BAR in the last slot (no room for its upper half), and all-ones masks.
        let mut g = FakeFunction::new(0x1234, 0x0001, 0x02, 0x00, 0);
        g.regs[9] = 0x4;
        g.bar_masks[9 - 4] = 0xFFFF_FFFF;
        cfg.add(PciAddress::new(0, 10, 0), g);
        let found = scan(&mut cfg);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].bars, [None; 6]);
        for f in &found {
            let _ = format!("{f}");
        }
    }

    #[test]
    fn enable_device_sets_memory_and_bus_master() {
        let mut cfg = qemu_like();
        let nic = PciAddress::new(0, 3, 0);
        cfg.functions.get_mut(&nic).unwrap().regs[1] = 0xFFFF_0000; // status bits set
        let command = enable_device(&mut cfg, nic, true);
        assert_eq!(
            u32::from(command),
            reg::COMMAND_MEMORY | reg::COMMAND_BUS_MASTER | reg::COMMAND_INTX_DISABLE
        );
        // Status (write-one-to-clear) was written as zeros.
        assert!(cfg.writes.iter().all(|w| w.1 != 0x04 || w.2 >> 16 == 0));
    }

    #[test]
    fn set_intx_toggles_only_the_interrupt_disable_bit() {
        let mut cfg = qemu_like();
        let nic = PciAddress::new(0, 3, 0);
        cfg.functions.get_mut(&nic).unwrap().regs[1] = 0xFFFF_0000; // status bits set
        let on = u32::from(enable_device(&mut cfg, nic, true));
        assert_eq!(
            u32::from(set_intx(&mut cfg, nic, true)),
            on & !reg::COMMAND_INTX_DISABLE
        );
        assert_eq!(u32::from(set_intx(&mut cfg, nic, false)), on);
        // Status (write-one-to-clear) was written as zeros.
        assert!(cfg.writes.iter().all(|w| w.1 != 0x04 || w.2 >> 16 == 0));
    }

    #[test]
    fn names() {
        assert_eq!(class_name(0x06, 0x04), "PCI bridge");
        assert_eq!(class_name(0x42, 0x00), "Device");
        assert_eq!(vendor_name(0x8086), Some("Intel"));
        assert_eq!(vendor_name(0x0001), None);
        assert!(device_name(0x8086, 0x100E).unwrap().contains("82540EM"));
        assert_eq!(SizeText(0x2_0000).to_string(), "128K");
        assert_eq!(SizeText(3 << 20).to_string(), "3M");
        assert_eq!(SizeText(1 << 30).to_string(), "1G");
        assert_eq!(SizeText(100).to_string(), "100");
    }
}
