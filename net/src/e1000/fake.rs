//! A behavioural model of the 82540EM for host tests: registers, EEPROM, descriptor processing
//! over fake DMA memory. It follows the manual where the driver depends on it (self-clearing
//! reset, EERD, head/tail ownership, DD/EOP, the missed-packet counter, interrupt causes and
//! mask with the level-triggered line they drive), and can misbehave on request (stalled
//! transmit, damaged or chained frames, a reset that never ends).

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use std::collections::BTreeMap;

use super::desc::{rx_status, tx_status, DESC_SIZE};
use super::regs;
use crate::hw::{DmaRegion, Mmio};

/// DMA memory: bytes shared between the driver (through this handle) and the model.
#[derive(Clone)]
pub struct FakeMem {
    pub base: u64,
    pub bytes: Rc<RefCell<Vec<u8>>>,
}

impl FakeMem {
    pub fn new(base: u64, len: usize) -> Self {
        FakeMem {
            base,
            bytes: Rc::new(RefCell::new(vec![0xA5; len])),
        }
    }
}

impl DmaRegion for FakeMem {
    fn device_addr(&self) -> u64 {
        self.base
    }

    fn len(&self) -> usize {
        self.bytes.borrow().len()
    }

    fn read_u64(&self, offset: usize) -> u64 {
        let b = self.bytes.borrow();
        u64::from_le_bytes(b[offset..offset + 8].try_into().unwrap())
    }

    fn write_u64(&mut self, offset: usize, value: u64) {
        self.bytes.borrow_mut()[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn with_bytes<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.bytes.borrow()[offset..offset + len])
    }

    fn with_bytes_mut<R>(
        &mut self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        f(&mut self.bytes.borrow_mut()[offset..offset + len])
    }
}

/// The device's state.
pub struct Model {
    pub regs: BTreeMap<usize, u32>,
    pub eeprom: [u16; 64],
    /// The station address the device was built with.
    pub mac: [u8; 6],
    /// Bochs: the receive-address registers read 0 after reset (QEMU loads them from the EEPROM).
    pub ra_from_eeprom_on_reset: bool,
    /// Reads of CTRL before a reset completes (`u32::MAX`: never).
    pub reset_reads: u32,
    reset_left: u32,
    /// EERD never reports done.
    pub eeprom_stuck: bool,
    pub link_up: bool,
    /// Transmit descriptors are not processed (a stalled link).
    pub tx_stalled: bool,
    /// The next delivered frame is split over two descriptors.
    pub chain_next: bool,
    /// Error bits for the next delivered frame.
    pub error_next: u8,
    /// A bogus length for the next delivered frame's descriptor.
    pub bad_length_next: Option<u16>,
    pub memory: Vec<FakeMem>,
    /// Frames the device put on the wire.
    pub sent: Vec<Vec<u8>>,
    pub missed: u32,
    pub tdt_writes: usize,
    pub rdt_writes: usize,
}

impl Model {
    pub fn new(mac: [u8; 6]) -> Self {
        let mut eeprom = [0u16; 64];
        for i in 0..3 {
            eeprom[i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
        }
        Model {
            regs: BTreeMap::new(),
            eeprom,
            mac,
            ra_from_eeprom_on_reset: true,
            reset_reads: 3,
            reset_left: 0,
            eeprom_stuck: false,
            link_up: true,
            tx_stalled: false,
            chain_next: false,
            error_next: 0,
            bad_length_next: None,
            memory: Vec::new(),
            sent: Vec::new(),
            missed: 0,
            tdt_writes: 0,
            rdt_writes: 0,
        }
    }

    pub fn reg(&self, offset: usize) -> u32 {
        self.regs.get(&offset).copied().unwrap_or(0)
    }

    /// Latches interrupt causes in ICR (as the device does whatever the mask says).
    pub fn raise(&mut self, causes: u32) {
        let icr = self.reg(regs::ICR);
        self.set(regs::ICR, icr | causes);
    }

    /// The level of the legacy interrupt line: asserted while an unmasked cause is latched.
    pub fn line_asserted(&self) -> bool {
        self.reg(regs::ICR) & self.reg(regs::IMS) != 0
    }

    /// The link goes up or down (a cable, or the peer's emulator): a link-change cause.
    pub fn set_link(&mut self, up: bool) {
        if up != self.link_up {
            self.link_up = up;
            self.raise(regs::int::LSC);
        }
    }

    /// Free receive descriptors: from the head up to (not including) the tail.
    fn rx_free(&self, len: u32) -> u32 {
        let head = self.reg(regs::RDH);
        let tail = self.reg(regs::RDT);
        if tail >= head {
            tail - head
        } else {
            len - head + tail
        }
    }

    fn set(&mut self, offset: usize, value: u32) {
        self.regs.insert(offset, value);
    }

    fn reset(&mut self) {
        self.regs.clear();
        if self.ra_from_eeprom_on_reset {
            let m = self.mac;
            self.set(regs::RAL0, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
            self.set(
                regs::RAH0,
                u32::from(m[4]) | (u32::from(m[5]) << 8) | regs::RAH_AV,
            );
        }
    }

    fn mem_for(&self, addr: u64, len: usize) -> (FakeMem, usize) {
        for m in &self.memory {
            let size = m.bytes.borrow().len() as u64;
            if addr >= m.base && addr + len as u64 <= m.base + size {
                return (m.clone(), (addr - m.base) as usize);
            }
        }
        panic!("device access to unmapped DMA address {addr:#x} ({len} bytes)");
    }

    fn dma_read(&self, addr: u64, len: usize) -> Vec<u8> {
        let (m, off) = self.mem_for(addr, len);
        let b = m.bytes.borrow();
        b[off..off + len].to_vec()
    }

    fn dma_write(&self, addr: u64, data: &[u8]) {
        let (m, off) = self.mem_for(addr, data.len());
        m.bytes.borrow_mut()[off..off + data.len()].copy_from_slice(data);
    }

    fn desc_addr(&self, base_lo: usize, base_hi: usize, index: u32) -> u64 {
        let base = u64::from(self.reg(base_lo)) | (u64::from(self.reg(base_hi)) << 32);
        base + u64::from(index) * DESC_SIZE as u64
    }

    fn process_tx(&mut self) {
        if self.tx_stalled || self.reg(regs::TCTL) & regs::tctl::EN == 0 {
            return;
        }
        let len = self.reg(regs::TDLEN) / DESC_SIZE as u32;
        if len == 0 {
            return;
        }
        let mut guard = 0;
        while self.reg(regs::TDH) != self.reg(regs::TDT) && guard < 10_000 {
            guard += 1;
            let head = self.reg(regs::TDH);
            let d = self.desc_addr(regs::TDBAL, regs::TDBAH, head);
            let words = self.dma_read(d, 16);
            let buf = u64::from_le_bytes(words[0..8].try_into().unwrap());
            let mut w1 = u64::from_le_bytes(words[8..16].try_into().unwrap());
            let length = (w1 & 0xFFFF) as usize;
            let frame = self.dma_read(buf, length);
            self.sent.push(frame);
            w1 |= u64::from(tx_status::DD) << 32;
            self.dma_write(d + 8, &w1.to_le_bytes());
            self.set(regs::TDH, (head + 1) % len);
        }
    }

    /// Completes stalled transmissions.
    pub fn unstall_tx(&mut self) {
        self.tx_stalled = false;
        self.process_tx();
    }

    /// A frame arrives from the wire. False if it was dropped (receive off or no descriptor).
    pub fn deliver(&mut self, frame: &[u8]) -> bool {
        if self.reg(regs::RCTL) & regs::rctl::EN == 0 || !self.link_up {
            return false;
        }
        let len = self.reg(regs::RDLEN) / DESC_SIZE as u32;
        let pieces: Vec<&[u8]> = if self.chain_next && frame.len() > 1 {
            self.chain_next = false;
            let (a, b) = frame.split_at(frame.len() / 2);
            vec![a, b]
        } else {
            vec![frame]
        };
        // Enough free descriptors for every piece?
        let free = if len == 0 { 0 } else { self.rx_free(len) };
        if len == 0 || (free as usize) < pieces.len() {
            self.missed += 1;
            self.raise(regs::int::RXO);
            return false;
        }
        let errors = core::mem::take(&mut self.error_next);
        let bad_length = self.bad_length_next.take();
        let count = pieces.len();
        for (i, piece) in pieces.into_iter().enumerate() {
            let head = self.reg(regs::RDH);
            let d = self.desc_addr(regs::RDBAL, regs::RDBAH, head);
            let words = self.dma_read(d, 8);
            let buf = u64::from_le_bytes(words[0..8].try_into().unwrap());
            self.dma_write(buf, piece);
            let mut status = rx_status::DD;
            if i + 1 == count {
                status |= rx_status::EOP;
            }
            let length = bad_length.unwrap_or(piece.len() as u16);
            let w1 = u64::from(length) | (u64::from(status) << 32) | (u64::from(errors) << 40);
            self.dma_write(d + 8, &w1.to_le_bytes());
            self.set(regs::RDH, (head + 1) % len);
        }
        // RXT0 at once (receive delay timer 0); RXDMT0 when the free descriptors fall to the
        // minimum threshold, half the ring (RCTL.RDMTS = 0).
        let threshold = len / 2;
        let mut causes = regs::int::RXT0;
        if free > threshold && self.rx_free(len) <= threshold {
            causes |= regs::int::RXDMT0;
        }
        self.raise(causes);
        true
    }
}

/// The register window.
#[derive(Clone)]
pub struct FakeRegs(pub Rc<RefCell<Model>>);

impl Mmio for FakeRegs {
    fn read32(&self, offset: usize) -> u32 {
        let mut m = self.0.borrow_mut();
        match offset {
            regs::CTRL => {
                let ctrl = m.reg(regs::CTRL);
                if ctrl & regs::ctrl::RST != 0 {
                    if m.reset_left == 0 {
                        m.reset();
                        let ctrl = ctrl & !regs::ctrl::RST;
                        m.set(regs::CTRL, ctrl);
                        return ctrl;
                    }
                    m.reset_left = m.reset_left.saturating_sub(1);
                }
                ctrl
            }
            regs::STATUS => {
                if m.link_up {
                    regs::status::LU | regs::status::FD
                } else {
                    0
                }
            }
            regs::MPC => core::mem::take(&mut m.missed),
            regs::ICR => {
                let v = m.reg(regs::ICR);
                m.set(regs::ICR, 0);
                v
            }
            _ => m.reg(offset),
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut m = self.0.borrow_mut();
        match offset {
            regs::CTRL => {
                if value & regs::ctrl::RST != 0 {
                    m.reset_left = if m.reset_reads == u32::MAX {
                        u32::MAX
                    } else {
                        m.reset_reads
                    };
                }
                m.set(regs::CTRL, value);
            }
            regs::EERD => {
                if value & regs::eerd::START != 0 && !m.eeprom_stuck {
                    let word = ((value >> regs::eerd::ADDR_SHIFT) & 0xFF) as usize;
                    let data = m.eeprom.get(word).copied().unwrap_or(0xFFFF);
                    let v = (u32::from(data) << regs::eerd::DATA_SHIFT)
                        | ((word as u32) << regs::eerd::ADDR_SHIFT)
                        | regs::eerd::DONE;
                    m.set(regs::EERD, v);
                } else {
                    m.set(regs::EERD, value & !regs::eerd::DONE);
                }
            }
            regs::TDT => {
                m.tdt_writes += 1;
                m.set(regs::TDT, value);
                m.process_tx();
            }
            regs::RDT => {
                m.rdt_writes += 1;
                m.set(regs::RDT, value);
            }
            // The mask accumulates; IMC clears bits of it; ICS raises causes.
            regs::IMS => {
                let mask = m.reg(regs::IMS);
                m.set(regs::IMS, mask | value);
            }
            regs::IMC => {
                let mask = m.reg(regs::IMS);
                m.set(regs::IMS, mask & !value);
            }
            regs::ICS => m.raise(value),
            // Cleared by reads; the driver never writes it.
            regs::ICR => {}
            _ => m.set(offset, value),
        }
    }
}

/// A model, its register window and two DMA regions sized for `rx` and `tx` descriptors.
pub fn device(
    mac: [u8; 6],
    rx: usize,
    tx: usize,
) -> (Rc<RefCell<Model>>, FakeRegs, FakeMem, FakeMem) {
    let model = Rc::new(RefCell::new(Model::new(mac)));
    let rx_mem = FakeMem::new(0x10_0000, super::region_bytes(rx));
    let tx_mem = FakeMem::new(0x80_0000, super::region_bytes(tx));
    model.borrow_mut().memory = vec![rx_mem.clone(), tx_mem.clone()];
    (model.clone(), FakeRegs(model), rx_mem, tx_mem)
}
