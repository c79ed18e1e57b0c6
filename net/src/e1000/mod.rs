//! Driver for the Intel 82540EM gigabit Ethernet controller ("e1000": QEMU `-device e1000`,
//! Bochs `e1000`, and the 8254x family of real NICs), polled, behind smoltcp's `phy::Device`,
//! and optionally interrupt-driven to wake a sleeping owner.
//!
//! Registers are reached through [`Mmio`], descriptor rings and packet buffers through
//! [`DmaRegion`] (one region per ring: the descriptors, then one [`BUF_SIZE`] buffer per
//! descriptor). Frames never span descriptors: receive buffers hold 2048 bytes and long packets
//! are off, so a frame is one descriptor with end-of-packet set; anything else (errors, a
//! device that chains buffers anyway) is dropped and counted, never handed up.
//!
//! Interrupts stay masked unless the owner asks ([`E1000::enable_interrupts`]): then a stored
//! frame, a receive ring running low or overrun, and a link change raise the device's legacy
//! interrupt line until the interrupt causes are read ([`take_causes`], which an interrupt
//! handler calls through its own register window). Either way the owner polls: an interrupt
//! only says "poll now" (it wakes a CPU halted until the next timer tick). Receiving takes
//! completed descriptors in order and
//! gives each back at once (one tail write per frame); transmitting fills the descriptor at the
//! tail and writes the tail register, and reclaims sent descriptors lazily when it needs room.
//!
//! Start-up ([`E1000::new`]): reset, link up (auto speed), MAC from the receive-address
//! registers or, when those read zero (Bochs), from the EEPROM through EERD; multicast table
//! cleared; rings programmed; receive (broadcast accepted, CRC stripped) and transmit (short
//! frames padded) enabled. Every wait on the device is bounded.
//!
//! Under QEMU, the e1000 model refuses frames for one second after every write of the receive
//! control register (its `flush_queue_timer`) and queues them meanwhile: the first frames a
//! peer sends within a second of start-up arrive late (a first ping of ~0.9 s), none is lost.

pub mod desc;
pub mod regs;
pub mod ring;

#[cfg(test)]
pub(crate) mod fake;

use alloc::vec;
use core::fmt;
use core::sync::atomic::{fence, Ordering};
use core::time::Duration;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::hw::{DmaRegion, Mmio};
use desc::{RxDesc, TxDesc, DESC_SIZE};
use ring::{Ring, RingError, RxIndices, TxIndices};

/// Intel's PCI vendor ID.
pub const VENDOR_INTEL: u16 = 0x8086;

/// PCI device IDs this driver handles, with their names.
pub const SUPPORTED: &[(u16, &str)] = &[(0x100E, "82540EM"), (0x100F, "82545EM")];

/// The model name of a supported (vendor, device) pair.
pub fn model(vendor_id: u16, device_id: u16) -> Option<&'static str> {
    crate::pci::model_in(SUPPORTED, VENDOR_INTEL, vendor_id, device_id)
}

/// Bytes per packet buffer (receive and transmit).
pub const BUF_SIZE: usize = 2048;

/// Transmit descriptors unless the owner asks otherwise: 256 frames of 2 KiB queued.
pub const DEFAULT_RING_LEN: usize = 256;

/// Receive descriptors unless the owner asks otherwise. More than a whole TCP window of our
/// sockets ([`crate::bench::BUFFER`], 1 MiB = 720 full frames) plus room for other traffic:
/// the kernel polls the NIC and may sleep until the next timer tick, and a peer sending a full
/// window meanwhile must find a free descriptor for every frame. An overrun drops frames, and
/// smoltcp recovers a burst of lost segments only through its retransmission timer (1 s
/// minimum): measured under QEMU with 256 descriptors, an idle 64 MiB migration stalled 1 s of
/// its 2-3 s that way.
pub const DEFAULT_RX_RING_LEN: usize = 2048;

/// Largest frame sent or received, without FCS: a 1500-byte payload plus the Ethernet header.
pub const MAX_FRAME: usize = 1514;

/// Bound on polls of a self-clearing bit (reset, EEPROM read).
const MAX_POLLS: u32 = 100_000;

/// The interrupt causes [`E1000::enable_interrupts`] unmasks: a frame stored (RXT0), free
/// receive descriptors down to half the ring (RXDMT0), a frame lost for want of one (RXO), and
/// a link change (LSC). Transmit completions stay masked: the driver reclaims sent descriptors
/// when it needs room, nothing waits for them.
pub const RX_INTERRUPTS: u32 =
    regs::int::RXT0 | regs::int::RXDMT0 | regs::int::RXO | regs::int::LSC;

/// Interrupt causes, as read (and thereby cleared) from ICR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Causes(pub u32);

impl Causes {
    /// No cause: the interrupt (if there was one) was not this device's.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// A cause [`E1000::enable_interrupts`] unmasks: one that raised the line. Others (transmit
    /// completions) are latched too, masked, and read along.
    pub fn unmasked(self) -> bool {
        self.0 & RX_INTERRUPTS != 0
    }

    /// Something for the receive path: a stored frame, a ring running low or overrun.
    pub fn received(self) -> bool {
        self.0 & (regs::int::RXT0 | regs::int::RXDMT0 | regs::int::RXO) != 0
    }

    /// A frame was lost because no receive descriptor was free.
    pub fn overrun(self) -> bool {
        self.0 & regs::int::RXO != 0
    }

    /// The link went up or down.
    pub fn link_changed(self) -> bool {
        self.0 & regs::int::LSC != 0
    }
}

/// Names of the causes, for logs: `RXT0+LSC`, `none`, unknown bits in hex.
impl fmt::Display for Causes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u32, &str); 7] = [
            (regs::int::TXDW, "TXDW"),
            (regs::int::TXQE, "TXQE"),
            (regs::int::LSC, "LSC"),
            (regs::int::RXSEQ, "RXSEQ"),
            (regs::int::RXDMT0, "RXDMT0"),
            (regs::int::RXO, "RXO"),
            (regs::int::RXT0, "RXT0"),
        ];
        if self.is_empty() {
            return write!(f, "none");
        }
        let mut rest = self.0;
        let mut first = true;
        for (bit, name) in NAMES {
            if rest & bit != 0 {
                write!(f, "{}{name}", if first { "" } else { "+" })?;
                rest &= !bit;
                first = false;
            }
        }
        if rest != 0 {
            write!(f, "{}{rest:#x}", if first { "" } else { "+" })?;
        }
        Ok(())
    }
}

/// Reads and clears the device's interrupt causes; on the 8254x this also deasserts its
/// level-triggered interrupt line. Takes any register window onto the device: an interrupt
/// handler cannot reach the driver (the network stack owns it), so it keeps a window of its own.
pub fn take_causes(regs: &impl Mmio) -> Causes {
    Causes(regs.read32(regs::ICR))
}

/// Masks every interrupt cause, through any register window (an interrupt handler's): the
/// device latches causes but keeps its line deasserted until [`arm_interrupts`]. Handlers
/// mask, the poll loop re-arms before it sleeps (NAPI's scheme), so a device that keeps
/// raising causes costs one interrupt per sleep, never a storm.
pub fn mask_interrupts(regs: &impl Mmio) {
    regs.write32(regs::IMC, u32::MAX);
}

/// Unmasks [`RX_INTERRUPTS`] again: a cause latched meanwhile raises the line at once, so a
/// frame that arrived while masked still wakes a sleeping CPU.
pub fn arm_interrupts(regs: &impl Mmio) {
    regs.write32(regs::IMS, RX_INTERRUPTS);
}

/// The ITR value for at least `min_interval` between two interrupts: 256 ns units, at most
/// 0xFFFF (16.8 ms); zero turns throttling off.
pub fn throttle_value(min_interval: Duration) -> u32 {
    (min_interval.as_nanos() / 256).min(0xFFFF) as u32
}

/// Bytes a [`DmaRegion`] must hold for a ring of `descriptors`.
pub fn region_bytes(descriptors: usize) -> usize {
    descriptors * (DESC_SIZE + BUF_SIZE)
}

/// Why the driver could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E1000Error {
    /// A ring length the device cannot take.
    Ring(RingError),
    /// A DMA region smaller than [`region_bytes`] asks.
    RegionTooSmall { need: usize, have: usize },
    /// A DMA region not 16-byte aligned (the device ignores the low address bits).
    RegionMisaligned { addr: u64 },
    /// The reset bit did not clear.
    ResetTimeout,
    /// An EEPROM read did not complete.
    EepromTimeout { word: u8 },
    /// Neither the registers nor the EEPROM hold a usable (unicast, non-zero) MAC address.
    NoMac { mac: [u8; 6] },
}

impl fmt::Display for E1000Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            E1000Error::Ring(RingError::BadLength(len)) => {
                write!(
                    f,
                    "ring of {len} descriptors: want a multiple of 8 in 8..=4096"
                )
            }
            E1000Error::RegionTooSmall { need, have } => {
                write!(f, "DMA region of {have} bytes, {need} needed")
            }
            E1000Error::RegionMisaligned { addr } => {
                write!(f, "DMA region at {addr:#x} is not 16-byte aligned")
            }
            E1000Error::ResetTimeout => write!(f, "device reset did not complete"),
            E1000Error::EepromTimeout { word } => {
                write!(f, "EEPROM read of word {word} did not complete")
            }
            E1000Error::NoMac { mac } => write!(f, "no usable MAC address (read {})", Mac(*mac)),
        }
    }
}

/// A MAC address as `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Where the MAC address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacSource {
    /// Receive-address register 0, as firmware or the device left it.
    Registers,
    /// EEPROM words 0..3 (the receive-address registers read zero).
    Eeprom,
}

/// Ring sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E1000Config {
    pub rx_descriptors: usize,
    pub tx_descriptors: usize,
}

impl Default for E1000Config {
    fn default() -> Self {
        E1000Config {
            rx_descriptors: DEFAULT_RX_RING_LEN,
            tx_descriptors: DEFAULT_RING_LEN,
        }
    }
}

/// Traffic counters since start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames the device marked bad, or that spanned descriptors: dropped.
    pub rx_errors: u64,
    /// Frames the device dropped for want of a free receive descriptor.
    pub rx_missed: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames not sent: transmit ring full when a reply had to go out, or bad length.
    pub tx_dropped: u64,
}

fn is_usable_mac(mac: &[u8; 6]) -> bool {
    mac.iter().any(|&b| b != 0) && mac[0] & 1 == 0
}

/// Receive descriptors given back per tail write at most (see [`RxRing::recycle`]); far below
/// the ring's length, so the device never runs short while a poll works through a burst.
const RX_FLUSH_BATCH: u16 = 32;

struct RxRing<M> {
    mem: M,
    ring: Ring,
    idx: RxIndices,
    /// Inside a frame that spans descriptors: drop until its end.
    discarding: bool,
    /// Descriptors given back since the tail was last written, and the tail to write.
    unflushed: u16,
    tail: u16,
    packets: u64,
    bytes: u64,
    errors: u64,
}

struct TxRing<M> {
    mem: M,
    ring: Ring,
    idx: TxIndices,
    /// Frames were queued since the tail was last written.
    unflushed: bool,
    packets: u64,
    bytes: u64,
    dropped: u64,
}

fn desc_offset(index: u16) -> usize {
    usize::from(index) * DESC_SIZE
}

fn buf_offset(ring: Ring, index: u16) -> usize {
    ring.len() * DESC_SIZE + usize::from(index) * BUF_SIZE
}

/// The 82540EM, started and polled.
pub struct E1000<R: Mmio, M: DmaRegion> {
    regs: R,
    mac: [u8; 6],
    mac_source: MacSource,
    rx: RxRing<M>,
    tx: TxRing<M>,
    missed: u64,
}

impl<R: Mmio, M: DmaRegion> crate::stack::TxFlush for E1000<R, M> {
    /// Writes the transmit tail once for every frame queued since the last call.
    fn flush_tx(&mut self) {
        self.tx.flush(&self.regs);
    }
}

impl<R: Mmio, M: DmaRegion> E1000<R, M> {
    /// Resets and starts the device. `rx_mem` and `tx_mem` must hold [`region_bytes`] for their
    /// ring sizes; their contents are overwritten.
    pub fn new(regs: R, rx_mem: M, tx_mem: M, config: E1000Config) -> Result<Self, E1000Error> {
        let rx_ring = Ring::new(config.rx_descriptors).map_err(E1000Error::Ring)?;
        let tx_ring = Ring::new(config.tx_descriptors).map_err(E1000Error::Ring)?;
        for (mem, ring) in [(&rx_mem, rx_ring), (&tx_mem, tx_ring)] {
            let need = region_bytes(ring.len());
            if mem.len() < need {
                return Err(E1000Error::RegionTooSmall {
                    need,
                    have: mem.len(),
                });
            }
            if mem.device_addr() % 16 != 0 {
                return Err(E1000Error::RegionMisaligned {
                    addr: mem.device_addr(),
                });
            }
        }

        // Quiet and reset the device.
        regs.write32(regs::IMC, u32::MAX);
        regs.write32(regs::RCTL, 0);
        regs.write32(regs::TCTL, 0);
        regs.write32(regs::CTRL, regs.read32(regs::CTRL) | regs::ctrl::RST);
        wait_clear(&regs, regs::CTRL, regs::ctrl::RST).ok_or(E1000Error::ResetTimeout)?;
        regs.write32(regs::IMC, u32::MAX);
        let _ = regs.read32(regs::ICR);

        let ctrl = regs.read32(regs::CTRL);
        let ctrl = (ctrl | regs::ctrl::SLU | regs::ctrl::ASDE)
            & !(regs::ctrl::LRST | regs::ctrl::PHY_RST | regs::ctrl::ILOS | regs::ctrl::VME);
        regs.write32(regs::CTRL, ctrl);

        let (mac, mac_source) = read_mac(&regs)?;
        let ral = u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]);
        let rah = u32::from(mac[4]) | (u32::from(mac[5]) << 8) | regs::RAH_AV;
        regs.write32(regs::RAL0, ral);
        regs.write32(regs::RAH0, rah);
        for i in 0..regs::MTA_LEN {
            regs.write32(regs::MTA + 4 * i, 0);
        }

        let mut rx = RxRing {
            mem: rx_mem,
            ring: rx_ring,
            idx: RxIndices::new(rx_ring),
            discarding: false,
            unflushed: 0,
            tail: 0,
            packets: 0,
            bytes: 0,
            errors: 0,
        };
        let rx_base = rx.mem.device_addr();
        for i in 0..rx_ring.len() as u16 {
            let buf = rx_base + buf_offset(rx_ring, i) as u64;
            rx.mem.write_u64(desc_offset(i), buf);
            rx.mem.write_u64(desc_offset(i) + 8, 0);
        }
        let mut tx = TxRing {
            mem: tx_mem,
            ring: tx_ring,
            idx: TxIndices::new(tx_ring),
            unflushed: false,
            packets: 0,
            bytes: 0,
            dropped: 0,
        };
        let tx_base = tx.mem.device_addr();
        for i in 0..tx_ring.len() as u16 {
            let buf = tx_base + buf_offset(tx_ring, i) as u64;
            tx.mem.write_u64(desc_offset(i), buf);
            // Done, so that a reclaim before first use finds nothing odd.
            tx.mem
                .write_u64(desc_offset(i) + 8, TxDesc::default().encode());
        }
        fence(Ordering::SeqCst);

        regs.write32(regs::RDBAL, rx_base as u32);
        regs.write32(regs::RDBAH, (rx_base >> 32) as u32);
        regs.write32(regs::RDLEN, (rx_ring.len() * DESC_SIZE) as u32);
        regs.write32(regs::RDH, 0);
        regs.write32(regs::RDT, u32::from(rx.idx.initial_tail()));
        regs.write32(
            regs::RCTL,
            regs::rctl::EN | regs::rctl::BAM | regs::rctl::SECRC | regs::rctl::BSIZE_2048,
        );

        regs.write32(regs::TDBAL, tx_base as u32);
        regs.write32(regs::TDBAH, (tx_base >> 32) as u32);
        regs.write32(regs::TDLEN, (tx_ring.len() * DESC_SIZE) as u32);
        regs.write32(regs::TDH, 0);
        regs.write32(regs::TDT, 0);
        regs.write32(regs::TIPG, regs::TIPG_DEFAULT);
        regs.write32(
            regs::TCTL,
            regs::tctl::EN
                | regs::tctl::PSP
                | regs::tctl::CT_DEFAULT
                | regs::tctl::COLD_FULL_DUPLEX,
        );

        Ok(E1000 {
            regs,
            mac,
            mac_source,
            rx,
            tx,
            missed: 0,
        })
    }

    /// The station address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Where [`mac`](Self::mac) came from.
    pub fn mac_source(&self) -> MacSource {
        self.mac_source
    }

    /// Whether the device reports link up.
    pub fn link_up(&self) -> bool {
        self.regs.read32(regs::STATUS) & regs::status::LU != 0
    }

    /// Descriptor counts (receive, transmit).
    pub fn ring_sizes(&self) -> (usize, usize) {
        (self.rx.ring.len(), self.tx.ring.len())
    }

    /// Traffic counters (reads and accumulates the device's missed-packet counter).
    pub fn counters(&mut self) -> Counters {
        self.missed += u64::from(self.regs.read32(regs::MPC));
        Counters {
            rx_packets: self.rx.packets,
            rx_bytes: self.rx.bytes,
            rx_errors: self.rx.errors,
            rx_missed: self.missed,
            tx_packets: self.tx.packets,
            tx_bytes: self.tx.bytes,
            tx_dropped: self.tx.dropped,
        }
    }

    /// Unmasks [`RX_INTERRUPTS`], with at least `min_interval` between two interrupts (zero:
    /// no throttling). Causes latched while they were masked are cleared first, so the line
    /// starts deasserted: frames already waiting are the poll's, not an interrupt's.
    pub fn enable_interrupts(&mut self, min_interval: Duration) {
        self.regs.write32(regs::ITR, throttle_value(min_interval));
        let _ = take_causes(&self.regs);
        self.regs.write32(regs::IMS, RX_INTERRUPTS);
    }

    /// Masks every interrupt cause and clears the latched ones (the line deasserts).
    pub fn disable_interrupts(&mut self) {
        self.regs.write32(regs::IMC, u32::MAX);
        let _ = take_causes(&self.regs);
    }

    /// The causes that raise the interrupt line (the IMS register).
    pub fn interrupt_mask(&self) -> u32 {
        self.regs.read32(regs::IMS)
    }

    /// Reads and clears the interrupt causes (see [`take_causes`]).
    pub fn take_interrupt_causes(&self) -> Causes {
        take_causes(&self.regs)
    }

    /// Frames waiting in the receive ring (completed by the device, not yet taken).
    pub fn rx_pending(&self) -> bool {
        let index = self.rx.idx.next();
        RxDesc::decode(self.rx.mem.read_u64(desc_offset(index) + 8)).done()
    }
}

/// Polls `reg` until `bit` reads clear; `None` after [`MAX_POLLS`] reads.
fn wait_clear(regs: &impl Mmio, reg: usize, bit: u32) -> Option<()> {
    (0..MAX_POLLS)
        .any(|_| regs.read32(reg) & bit == 0)
        .then_some(())
}

/// One 16-bit EEPROM word through EERD.
fn eeprom_word(regs: &impl Mmio, word: u8) -> Result<u16, E1000Error> {
    regs.write32(
        regs::EERD,
        regs::eerd::START | (u32::from(word) << regs::eerd::ADDR_SHIFT),
    );
    for _ in 0..MAX_POLLS {
        let value = regs.read32(regs::EERD);
        if value & regs::eerd::DONE != 0 {
            return Ok((value >> regs::eerd::DATA_SHIFT) as u16);
        }
    }
    Err(E1000Error::EepromTimeout { word })
}

fn read_mac(regs: &impl Mmio) -> Result<([u8; 6], MacSource), E1000Error> {
    let ral = regs.read32(regs::RAL0).to_le_bytes();
    let rah = regs.read32(regs::RAH0).to_le_bytes();
    let mac = [ral[0], ral[1], ral[2], ral[3], rah[0], rah[1]];
    if is_usable_mac(&mac) {
        return Ok((mac, MacSource::Registers));
    }
    let mut mac = [0u8; 6];
    for word in 0..3u8 {
        let [lo, hi] = eeprom_word(regs, word)?.to_le_bytes();
        mac[usize::from(word) * 2] = lo;
        mac[usize::from(word) * 2 + 1] = hi;
    }
    if is_usable_mac(&mac) {
        Ok((mac, MacSource::Eeprom))
    } else {
        Err(E1000Error::NoMac { mac })
    }
}

impl<M: DmaRegion> RxRing<M> {
    /// Gives the descriptor at `next` back to the device. The tail is written once the ring
    /// is drained or every [`RX_FLUSH_BATCH`] descriptors, not per frame: under emulation each
    /// write is a trip into the emulator under its global lock.
    fn recycle(&mut self, regs: &impl Mmio) {
        let index = self.idx.next();
        self.mem.write_u64(desc_offset(index) + 8, 0);
        self.tail = self.idx.recycle();
        self.unflushed += 1;
        if self.unflushed >= RX_FLUSH_BATCH {
            self.flush(regs);
        }
    }

    /// Writes the tail past every descriptor given back.
    fn flush(&mut self, regs: &impl Mmio) {
        if self.unflushed > 0 {
            fence(Ordering::SeqCst);
            regs.write32(regs::RDT, u32::from(self.tail));
            self.unflushed = 0;
        }
    }

    /// The length of the next good frame, dropping bad descriptors on the way (at most one
    /// ring's worth); `None` when nothing is ready.
    fn next_frame(&mut self, regs: &impl Mmio) -> Option<usize> {
        for _ in 0..self.ring.len() {
            let index = self.idx.next();
            let desc = RxDesc::decode(self.mem.read_u64(desc_offset(index) + 8));
            if !desc.done() {
                // Drained: the device gets every descriptor back before the node may sleep.
                self.flush(regs);
                return None;
            }
            // The descriptor's contents are valid once DD reads set.
            fence(Ordering::Acquire);
            let len = usize::from(desc.length);
            if self.discarding {
                // The rest of a frame that spanned descriptors (counted at its start).
                self.discarding = !desc.end_of_packet();
            } else if !desc.end_of_packet() {
                self.errors += 1;
                self.discarding = true;
            } else if desc.has_errors() || !(1..=BUF_SIZE).contains(&len) {
                self.errors += 1;
            } else {
                return Some(len);
            }
            self.recycle(regs);
        }
        None
    }
}

impl<M: DmaRegion> TxRing<M> {
    /// Reclaims descriptors the device has sent.
    fn reclaim(&mut self) {
        while let Some(index) = self.idx.oldest() {
            if !TxDesc::decode(self.mem.read_u64(desc_offset(index) + 8)).done() {
                break;
            }
            self.idx.reclaim();
        }
    }

    /// Queues a frame of `len` bytes that `f` writes; [`flush`](Self::flush) hands it to the
    /// device (a full ring is flushed first, so its frames can complete).
    fn send<T>(&mut self, regs: &impl Mmio, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
        if !(1..=BUF_SIZE).contains(&len) {
            return self.drop_frame(len, f);
        }
        if self.idx.free() == 0 {
            self.make_room(regs);
        }
        let Some(index) = self.idx.push() else {
            return self.drop_frame(len, f);
        };
        let result = self
            .mem
            .with_bytes_mut(buf_offset(self.ring, index), len, f);
        self.mem
            .write_u64(desc_offset(index) + 8, TxDesc::frame(len as u16).encode());
        self.unflushed = true;
        self.packets += 1;
        self.bytes += len as u64;
        result
    }

    /// Takes back the descriptors the device is done with; if the ring is still full, hands the
    /// queued frames over first (the device has not been told about them) and takes back again.
    fn make_room(&mut self, regs: &impl Mmio) {
        self.reclaim();
        if self.idx.free() == 0 {
            self.flush(regs);
            self.reclaim();
        }
    }

    /// Moves the tail past every queued frame: one register write for the burst.
    fn flush(&mut self, regs: &impl Mmio) {
        if self.unflushed {
            fence(Ordering::SeqCst);
            regs.write32(regs::TDT, u32::from(self.idx.tail()));
            self.unflushed = false;
        }
    }

    /// `f` still has to run (smoltcp expects its closure called): into a scratch buffer.
    fn drop_frame<T>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
        self.dropped += 1;
        let mut scratch = vec![0u8; len];
        f(&mut scratch)
    }
}

/// Receives one frame (see [`phy::Device::receive`]).
pub struct E1000RxToken<'a, R: Mmio, M: DmaRegion> {
    regs: &'a R,
    rx: &'a mut RxRing<M>,
    len: usize,
}

/// Sends one frame.
pub struct E1000TxToken<'a, R: Mmio, M: DmaRegion> {
    regs: &'a R,
    tx: &'a mut TxRing<M>,
}

impl<R: Mmio, M: DmaRegion> phy::RxToken for E1000RxToken<'_, R, M> {
    fn consume<T, F>(self, f: F) -> T
    where
        F: FnOnce(&[u8]) -> T,
    {
        let index = self.rx.idx.next();
        let result = self
            .rx
            .mem
            .with_bytes(buf_offset(self.rx.ring, index), self.len, f);
        self.rx.packets += 1;
        self.rx.bytes += self.len as u64;
        self.rx.recycle(self.regs);
        result
    }
}

impl<R: Mmio, M: DmaRegion> phy::TxToken for E1000TxToken<'_, R, M> {
    fn consume<T, F>(self, len: usize, f: F) -> T
    where
        F: FnOnce(&mut [u8]) -> T,
    {
        self.tx.send(self.regs, len, f)
    }
}

impl<R: Mmio, M: DmaRegion> phy::Device for E1000<R, M> {
    type RxToken<'a>
        = E1000RxToken<'a, R, M>
    where
        Self: 'a;
    type TxToken<'a>
        = E1000TxToken<'a, R, M>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let len = self.rx.next_frame(&self.regs)?;
        Some((
            E1000RxToken {
                regs: &self.regs,
                rx: &mut self.rx,
                len,
            },
            E1000TxToken {
                regs: &self.regs,
                tx: &mut self.tx,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.tx.make_room(&self.regs);
        if self.tx.idx.free() == 0 {
            return None;
        }
        Some(E1000TxToken {
            regs: &self.regs,
            tx: &mut self.tx,
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
mod tests;
