//! Register offsets and bits of the 8254x family (Intel PCI/PCI-X Family of Gigabit Ethernet
//! Controllers Software Developer's Manual, section 13), as far as this driver uses them.

/// Device control.
pub const CTRL: usize = 0x0000;
/// Device status.
pub const STATUS: usize = 0x0008;
/// EEPROM read (82540EM and later): start a word read, poll for done.
pub const EERD: usize = 0x0014;
/// Interrupt cause read (clear on read: reading it also deasserts the interrupt line).
pub const ICR: usize = 0x00C0;
/// Interrupt throttling: the minimum interval between two interrupts, in 256 ns units (0: no
/// throttling).
pub const ITR: usize = 0x00C4;
/// Interrupt cause set (writing 1s raises those causes, as the device would).
pub const ICS: usize = 0x00C8;
/// Interrupt mask set (writing 1s unmasks those causes; reads return the mask).
pub const IMS: usize = 0x00D0;
/// Interrupt mask clear (writing 1s masks those causes).
pub const IMC: usize = 0x00D8;
/// Receive control.
pub const RCTL: usize = 0x0100;
/// Transmit control.
pub const TCTL: usize = 0x0400;
/// Transmit inter-packet gap.
pub const TIPG: usize = 0x0410;
pub const RDBAL: usize = 0x2800;
pub const RDBAH: usize = 0x2804;
pub const RDLEN: usize = 0x2808;
pub const RDH: usize = 0x2810;
pub const RDT: usize = 0x2818;
pub const TDBAL: usize = 0x3800;
pub const TDBAH: usize = 0x3804;
pub const TDLEN: usize = 0x3808;
pub const TDH: usize = 0x3810;
pub const TDT: usize = 0x3818;
/// Missed packets count (no receive descriptor free; clear on read).
pub const MPC: usize = 0x4010;
/// Multicast table array: 128 dwords.
pub const MTA: usize = 0x5200;
pub const MTA_LEN: usize = 128;
/// Receive address 0, low and high.
pub const RAL0: usize = 0x5400;
pub const RAH0: usize = 0x5404;

/// How many bytes of register space the driver reaches (the 82540EM BAR0 is 128 KiB).
pub const BAR_SIZE: usize = 0x2_0000;

pub mod ctrl {
    /// Auto-speed detection enable.
    pub const ASDE: u32 = 1 << 5;
    /// Set link up.
    pub const SLU: u32 = 1 << 6;
    /// Link reset.
    pub const LRST: u32 = 1 << 3;
    /// Invert loss-of-signal.
    pub const ILOS: u32 = 1 << 7;
    /// Device reset (self-clearing).
    pub const RST: u32 = 1 << 26;
    /// VLAN mode enable.
    pub const VME: u32 = 1 << 30;
    /// PHY reset.
    pub const PHY_RST: u32 = 1 << 31;
}

pub mod status {
    /// Link up.
    pub const LU: u32 = 1 << 1;
    /// Full duplex.
    pub const FD: u32 = 1 << 0;
}

pub mod eerd {
    pub const START: u32 = 1 << 0;
    pub const DONE: u32 = 1 << 4;
    pub const ADDR_SHIFT: u32 = 8;
    pub const DATA_SHIFT: u32 = 16;
}

/// Interrupt causes: the same bit in ICR, ICS, IMS and IMC.
pub mod int {
    /// Transmit descriptor written back.
    pub const TXDW: u32 = 1 << 0;
    /// Transmit queue empty.
    pub const TXQE: u32 = 1 << 1;
    /// Link status change.
    pub const LSC: u32 = 1 << 2;
    /// Receive sequence error.
    pub const RXSEQ: u32 = 1 << 3;
    /// Receive descriptors free fell to the minimum threshold (RCTL.RDMTS: half the ring).
    pub const RXDMT0: u32 = 1 << 4;
    /// Receiver overrun: a frame arrived and no descriptor was free.
    pub const RXO: u32 = 1 << 6;
    /// Receiver timer: a frame was stored (at once, with the receive delay timer at 0).
    pub const RXT0: u32 = 1 << 7;
}

pub mod rctl {
    pub const EN: u32 = 1 << 1;
    /// Broadcast accept.
    pub const BAM: u32 = 1 << 15;
    /// Strip the Ethernet CRC from received frames.
    pub const SECRC: u32 = 1 << 26;
    /// Buffer size 2048 (BSIZE = 00, BSEX = 0).
    pub const BSIZE_2048: u32 = 0;
}

pub mod tctl {
    pub const EN: u32 = 1 << 1;
    /// Pad short packets.
    pub const PSP: u32 = 1 << 3;
    /// Collision threshold (the manual's recommended 0x0F).
    pub const CT_DEFAULT: u32 = 0x0F << 4;
    /// Collision distance for full duplex (0x40).
    pub const COLD_FULL_DUPLEX: u32 = 0x40 << 12;
}

/// Receive address high: address valid.
pub const RAH_AV: u32 = 1 << 31;

/// IPGT 10, IPGR1 8, IPGR2 6: the manual's values for the 82540EM on copper.
pub const TIPG_DEFAULT: u32 = 10 | (8 << 10) | (6 << 20);
