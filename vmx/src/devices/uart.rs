#![forbid(unsafe_code)]
//! A 16550A UART as a guest sees it: eight byte-wide registers at a base I/O port.
//!
//! The model is what a guest driver (Linux's 8250 driver, a boot loader, our test guest) can
//! observe, with one deliberate simplification: there is no line and no baud clock. A byte the
//! guest writes to THR leaves at once (returned to the caller, which forwards it to the node
//! console), so THR and the transmitter are always empty (LSR THRE and TEMT are always set).
//! Bytes from the host wait in a queue of [`Uart16550::RX_CAPACITY`] bytes that stands for the
//! receive FIFO plus the wire feeding it; only when that queue is full is a byte refused, which
//! the guest sees as an overrun (LSR OE).
//!
//! | offset | DLAB=0 read | DLAB=0 write | DLAB=1 |
//! |---|---|---|---|
//! | 0 | RBR | THR | DLL |
//! | 1 | IER | IER | DLM |
//! | 2 | IIR | FCR | (as DLAB=0) |
//! | 3 | LCR | LCR | |
//! | 4 | MCR | MCR | |
//! | 5 | LSR | (ignored) | |
//! | 6 | MSR | (ignored) | |
//! | 7 | SCR | SCR | |
//!
//! Interrupts follow the datasheet's four priority levels (receiver line status, received data
//! or character timeout, THR empty, modem status); [`Uart16550::interrupt_pending`] is true
//! exactly when IIR bit 0 reads 0. On a PC the IRQ line is additionally gated by MCR OUT2; like
//! QEMU's model, this one leaves that board-level detail to the caller.
//!
//! The state is saved with [`Uart16550::save`] and restored with [`Uart16550::restore`] for live
//! migration; see [`STATE_VERSION`] for the format.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

// Register offsets from the base port.
const RBR_THR_DLL: u8 = 0;
const IER_DLM: u8 = 1;
const IIR_FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const MSR: u8 = 6;
const SCR: u8 = 7;

// IER: receive data, THR empty, receiver line status, modem status. Bits 7:4 read as 0 on a
// 16550A (Linux's probe relies on that: it writes 0x0F and expects exactly 0x0F back).
const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;
const IER_MASK: u8 = 0x0F;

// IIR identification codes (bits 3:0) and the FIFO-enabled bits 7:6.
const IIR_NONE: u8 = 0x01;
const IIR_LINE_STATUS: u8 = 0x06;
const IIR_RX_DATA: u8 = 0x04;
const IIR_RX_TIMEOUT: u8 = 0x0C;
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_MODEM_STATUS: u8 = 0x00;
const IIR_FIFO_ENABLED: u8 = 0xC0;

// FCR: bit 0 enables the FIFOs, bits 1 and 2 clear them (self-clearing, never stored), bit 3
// selects the DMA mode (stored, no effect here), bits 7:6 the receive trigger level. Bits 5:4
// are reserved on a 16550A (a 16750 uses bit 5 for its 64-byte FIFO; Linux probes for that
// and must see it ignored).
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
const FCR_STORED: u8 = 0xC9;

const LCR_DLAB: u8 = 0x80;

// MCR: DTR, RTS, OUT1, OUT2, LOOP. Bits 7:5 read as 0 on a 16550A.
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1F;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

// MSR: delta bits 3:0 (DCTS, DDSR, TERI, DDCD) and line states 7:4 (CTS, DSR, RI, DCD).
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
const MSR_TERI: u8 = 0x04;
const MSR_DELTA_MASK: u8 = 0x0F;

/// Version of the [`Uart16550::save`] format. Format version 1, all multi-byte fields
/// little-endian:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | magic `"U550"` |
/// | 4 | version |
/// | 5, 6 | DLL, DLM |
/// | 7, 8, 9, 10, 11 | IER, FCR (stored bits), LCR, MCR, SCR |
/// | 12 | MSR delta bits |
/// | 13 | flags: bit 0 overrun (LSR OE), bit 1 THR-empty interrupt latched |
/// | 14..16 | number of queued input bytes (u16) |
/// | 16.. | the queued input bytes, oldest first |
pub const STATE_VERSION: u8 = 1;
const STATE_MAGIC: [u8; 4] = *b"U550";
const STATE_HEADER_LEN: usize = 16;
const FLAG_OVERRUN: u8 = 0x01;
const FLAG_THRE_PENDING: u8 = 0x02;

/// Why saved UART state was refused by [`Uart16550::restore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UartStateError {
    /// Fewer bytes than the header, or than the queued input it announces.
    Truncated,
    /// Not UART state at all.
    BadMagic,
    /// Saved by a format this build does not know.
    UnsupportedVersion { version: u8 },
    /// A register byte has bits set that the device can never hold (offset into the state).
    InvalidValue { at: usize },
    /// More queued input than [`Uart16550::RX_CAPACITY`].
    QueueTooLong { len: usize },
    /// Bytes after the queued input: the state was not produced by [`Uart16550::save`].
    TrailingBytes,
}

impl fmt::Display for UartStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UartStateError::Truncated => write!(f, "UART state truncated"),
            UartStateError::BadMagic => write!(f, "not UART state (bad magic)"),
            UartStateError::UnsupportedVersion { version } => {
                write!(f, "unsupported UART state version {version}")
            }
            UartStateError::InvalidValue { at } => {
                write!(f, "invalid register value in UART state at byte {at}")
            }
            UartStateError::QueueTooLong { len } => write!(
                f,
                "UART state queues {len} input bytes, more than {}",
                Uart16550::RX_CAPACITY
            ),
            UartStateError::TrailingBytes => write!(f, "trailing bytes after UART state"),
        }
    }
}

/// The highest-priority pending interrupt, as IIR reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    LineStatus,
    RxData,
    RxTimeout,
    ThrEmpty,
    ModemStatus,
}

/// A 16550A UART model (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uart16550 {
    /// Host-to-guest bytes not yet read through RBR, oldest first.
    rx: VecDeque<u8>,
    dll: u8,
    dlm: u8,
    ier: u8,
    /// FCR bits that persist ([`FCR_STORED`]); 0 while the FIFOs are disabled.
    fcr: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    /// LSR OE: a byte was refused since the guest last read LSR.
    overrun: bool,
    /// The THR-empty interrupt latch: set when THR becomes empty (after every THR write, since
    /// transmission is instant) or when the guest enables it, cleared by an IIR read that
    /// reports it. A separate latch because the condition (THR empty) is always true.
    thre_pending: bool,
    /// MSR bits 3:0, set on modem line changes and cleared by reading MSR.
    msr_delta: u8,
}

impl Default for Uart16550 {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart16550 {
    /// Host-to-guest bytes queued at most; further input is refused as an overrun. Large
    /// enough for a console command line pasted at once, small enough that a guest that never
    /// reads its port cannot make the host hold much memory for it.
    pub const RX_CAPACITY: usize = 1024;

    /// The device after a hardware reset.
    pub fn new() -> Self {
        Uart16550 {
            rx: VecDeque::new(),
            // The datasheet leaves the divisor undefined after reset; a non-zero value
            // (115200 baud) keeps a guest that derives its baud rate from it from dividing by
            // zero.
            dll: 1,
            dlm: 0,
            ier: 0,
            fcr: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            overrun: false,
            thre_pending: false,
            msr_delta: 0,
        }
    }

    /// A guest read of the register at `offset` from the base port (0..=7; anything else reads
    /// 0xFF, like an unclaimed port). Reads have the datasheet's side effects: RBR pops a byte,
    /// IIR clears a reported THR-empty interrupt, LSR clears OE, MSR clears the delta bits.
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            RBR_THR_DLL if self.dlab() => self.dll,
            // Real hardware returns the last byte again when RBR is empty; nothing depends on
            // that, and 0 keeps the saved state free of a "last byte" field.
            RBR_THR_DLL => self.rx.pop_front().unwrap_or(0),
            IER_DLM if self.dlab() => self.dlm,
            IER_DLM => self.ier,
            IIR_FCR => {
                let source = self.source();
                if source == Some(Source::ThrEmpty) {
                    // Datasheet: reading IIR clears the THR-empty interrupt if it is the one
                    // IIR reports.
                    self.thre_pending = false;
                }
                let fifo = if self.fifo_enabled() {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                fifo | match source {
                    None => IIR_NONE,
                    Some(Source::LineStatus) => IIR_LINE_STATUS,
                    Some(Source::RxData) => IIR_RX_DATA,
                    Some(Source::RxTimeout) => IIR_RX_TIMEOUT,
                    Some(Source::ThrEmpty) => IIR_THR_EMPTY,
                    Some(Source::ModemStatus) => IIR_MODEM_STATUS,
                }
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let value = self.lsr();
                self.overrun = false;
                value
            }
            MSR => {
                let value = self.modem_lines() | self.msr_delta;
                self.msr_delta = 0;
                value
            }
            SCR => self.scr,
            _ => 0xFF,
        }
    }

    /// A guest write of `value` to the register at `offset` (0..=7; others are ignored).
    /// Returns `Some(byte)` when the guest transmitted `byte` (a THR write with DLAB=0 outside
    /// loopback mode); in loopback mode the byte is received by the device itself instead.
    pub fn write(&mut self, offset: u8, value: u8) -> Option<u8> {
        match offset {
            RBR_THR_DLL if self.dlab() => self.dll = value,
            RBR_THR_DLL => {
                // The write clears the THR-empty interrupt, and the instant transmission
                // empties THR again, which raises it anew: the net effect is "pending".
                self.thre_pending = true;
                if self.loopback() {
                    self.receive(value);
                } else {
                    return Some(value);
                }
            }
            IER_DLM if self.dlab() => self.dlm = value,
            IER_DLM => {
                let enabled = !self.ier & value & IER_THRI;
                self.ier = value & IER_MASK;
                // Enabling the THR-empty interrupt while THR is empty (always, here) raises it
                // at once; drivers (Linux's included) wait for that first interrupt to start
                // transmitting.
                if enabled != 0 {
                    self.thre_pending = true;
                }
            }
            IIR_FCR => self.write_fcr(value),
            LCR => self.lcr = value,
            MCR => {
                let before = self.modem_lines();
                self.mcr = value & MCR_MASK;
                self.note_modem_change(before, self.modem_lines());
            }
            SCR => self.scr = value,
            // LSR writes are for factory testing and MSR is read-only on a 16550A: a guest
            // cannot inject line errors or modem changes.
            _ => {}
        }
        None
    }

    /// Queues a byte from the host for the guest to read. Returns false, drops the byte and
    /// flags an overrun (LSR OE) when the queue already holds [`Self::RX_CAPACITY`] bytes.
    pub fn push_input(&mut self, byte: u8) -> bool {
        self.receive(byte)
    }

    /// Bytes queued for the guest and not yet read.
    pub fn input_len(&self) -> usize {
        self.rx.len()
    }

    /// Whether the device asserts its interrupt: some cause is both present and enabled in IER
    /// (exactly when IIR bit 0 would read 0).
    pub fn interrupt_pending(&self) -> bool {
        self.source().is_some()
    }

    /// Appends the device state (all registers, interrupt latches and queued input) to `out`,
    /// in the format of [`STATE_VERSION`].
    pub fn save(&self, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.overrun {
            flags |= FLAG_OVERRUN;
        }
        if self.thre_pending {
            flags |= FLAG_THRE_PENDING;
        }
        out.extend_from_slice(&STATE_MAGIC);
        out.push(STATE_VERSION);
        out.extend_from_slice(&[
            self.dll,
            self.dlm,
            self.ier,
            self.fcr,
            self.lcr,
            self.mcr,
            self.scr,
            self.msr_delta,
            flags,
        ]);
        // The queue never exceeds RX_CAPACITY (1024), so the length always fits in a u16.
        let len = u16::try_from(self.rx.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend(self.rx.iter().copied());
    }

    /// Rebuilds a device from bytes produced by [`Self::save`]. Everything is checked: the
    /// bytes come from another host over the network and must not be able to create a state
    /// the real device could never be in.
    pub fn restore(bytes: &[u8]) -> Result<Uart16550, UartStateError> {
        let header = bytes
            .get(..STATE_HEADER_LEN)
            .ok_or(UartStateError::Truncated)?;
        if header[0..4] != STATE_MAGIC {
            return Err(UartStateError::BadMagic);
        }
        if header[4] != STATE_VERSION {
            return Err(UartStateError::UnsupportedVersion { version: header[4] });
        }
        // Each register byte with the bits it may hold.
        let checked = |at: usize, allowed: u8| -> Result<u8, UartStateError> {
            let value = header[at];
            if value & !allowed != 0 {
                return Err(UartStateError::InvalidValue { at });
            }
            Ok(value)
        };
        let dll = header[5];
        let dlm = header[6];
        let ier = checked(7, IER_MASK)?;
        let fcr = checked(8, FCR_STORED)?;
        // Other FCR bits are only programmed while the FIFOs are enabled (see write_fcr).
        if fcr != 0 && fcr & FCR_ENABLE == 0 {
            return Err(UartStateError::InvalidValue { at: 8 });
        }
        let lcr = header[9];
        let mcr = checked(10, MCR_MASK)?;
        let scr = header[11];
        let msr_delta = checked(12, MSR_DELTA_MASK)?;
        let flags = checked(13, FLAG_OVERRUN | FLAG_THRE_PENDING)?;
        let len = usize::from(u16::from_le_bytes([header[14], header[15]]));
        if len > Self::RX_CAPACITY {
            return Err(UartStateError::QueueTooLong { len });
        }
        let rest = &bytes[STATE_HEADER_LEN..];
        let queued = rest.get(..len).ok_or(UartStateError::Truncated)?;
        if rest.len() > len {
            return Err(UartStateError::TrailingBytes);
        }
        Ok(Uart16550 {
            rx: queued.iter().copied().collect(),
            dll,
            dlm,
            ier,
            fcr,
            lcr,
            mcr,
            scr,
            overrun: flags & FLAG_OVERRUN != 0,
            thre_pending: flags & FLAG_THRE_PENDING != 0,
            msr_delta,
        })
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    /// Queues a received byte (from the host or looped back), or records an overrun.
    fn receive(&mut self, byte: u8) -> bool {
        if self.rx.len() >= Self::RX_CAPACITY {
            self.overrun = true;
            return false;
        }
        self.rx.push_back(byte);
        true
    }

    fn write_fcr(&mut self, value: u8) {
        let was_enabled = self.fifo_enabled();
        let enable = value & FCR_ENABLE != 0;
        // Datasheet: changing FCR bit 0 resets both FIFOs, and the other FCR bits are only
        // programmed when bit 0 is written as 1.
        if enable != was_enabled || (enable && value & FCR_CLEAR_RX != 0) {
            self.rx.clear();
        }
        // Clearing the transmit FIFO (bit 2) has nothing to do: it is always empty.
        self.fcr = if enable { value & FCR_STORED } else { 0 };
    }

    /// Receive trigger level from FCR bits 7:6 (bytes).
    fn rx_trigger(&self) -> usize {
        match self.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    fn lsr(&self) -> u8 {
        let mut value = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            value |= LSR_DR;
        }
        if self.overrun {
            value |= LSR_OE;
        }
        value
    }

    /// MSR bits 7:4. In loopback the modem control outputs drive the inputs (RTS->CTS,
    /// DTR->DSR, OUT1->RI, OUT2->DCD), which is what Linux's probe checks. Otherwise the
    /// virtual line is always ready (CTS, DSR, DCD; no ring), so guests that wait for clear to
    /// send before transmitting do transmit.
    fn modem_lines(&self) -> u8 {
        if self.loopback() {
            let m = self.mcr;
            ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
        } else {
            MSR_CTS | MSR_DSR | MSR_DCD
        }
    }

    /// Latches MSR delta bits for the lines that changed: DCTS, DDSR and DDCD on any change,
    /// TERI only when RI goes from on to off (the trailing edge, as the datasheet says).
    fn note_modem_change(&mut self, before: u8, after: u8) {
        let changed = before ^ after;
        self.msr_delta |= (changed & (MSR_CTS | MSR_DSR | MSR_DCD)) >> 4;
        if before & MSR_RI != 0 && after & MSR_RI == 0 {
            self.msr_delta |= MSR_TERI;
        }
    }

    /// The highest-priority interrupt that is both present and enabled.
    fn source(&self) -> Option<Source> {
        if self.ier & IER_RLSI != 0 && self.overrun {
            return Some(Source::LineStatus);
        }
        if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            // In FIFO mode, data below the trigger level is reported as a character timeout.
            // The model has no character clock, so the timeout counts as already expired:
            // otherwise a guest that set a trigger of 14 would never hear of a 1-byte command.
            if self.fifo_enabled() && self.rx.len() < self.rx_trigger() {
                return Some(Source::RxTimeout);
            }
            return Some(Source::RxData);
        }
        if self.ier & IER_THRI != 0 && self.thre_pending {
            return Some(Source::ThrEmpty);
        }
        if self.ier & IER_MSI != 0 && self.msr_delta != 0 {
            return Some(Source::ModemStatus);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;
    use alloc::vec::Vec;

    fn set_dlab(u: &mut Uart16550, on: bool) {
        let lcr = u.read(LCR);
        u.write(LCR, if on { lcr | LCR_DLAB } else { lcr & !LCR_DLAB });
    }

    /// A deterministic xorshift generator for the fuzz-style tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    #[test]
    fn reset_values() {
        let mut u = Uart16550::default();
        assert_eq!(u, Uart16550::new());
        assert_eq!(u.read(IER_DLM), 0);
        assert_eq!(u.read(IIR_FCR), IIR_NONE);
        assert_eq!(u.read(LCR), 0);
        assert_eq!(u.read(MCR), 0);
        assert_eq!(u.read(LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(u.read(MSR), MSR_CTS | MSR_DSR | MSR_DCD);
        assert_eq!(u.read(SCR), 0);
        assert_eq!(u.input_len(), 0);
        assert!(!u.interrupt_pending());
        // Empty RBR reads 0 and has no other effect.
        assert_eq!(u.read(RBR_THR_DLL), 0);
        assert_eq!(u.read(LSR) & LSR_DR, 0);
    }

    #[test]
    fn out_of_range_offsets() {
        let mut u = Uart16550::new();
        for offset in [8u8, 9, 0x10, 0x80, 0xFF] {
            assert_eq!(u.read(offset), 0xFF);
            assert_eq!(u.write(offset, 0x41), None);
        }
        assert_eq!(u, Uart16550::new());
    }

    #[test]
    fn thr_write_transmits() {
        let mut u = Uart16550::new();
        assert_eq!(u.write(RBR_THR_DLL, b'h'), Some(b'h'));
        assert_eq!(u.write(RBR_THR_DLL, 0), Some(0));
        assert_eq!(u.write(RBR_THR_DLL, 0xFF), Some(0xFF));
        // Transmission is instant: THR and the shift register stay empty.
        assert_eq!(u.read(LSR), LSR_THRE | LSR_TEMT);
        // Nothing was looped back.
        assert_eq!(u.input_len(), 0);
        // Other registers never transmit.
        for offset in 1..=7 {
            assert_eq!(u.write(offset, b'x'), None, "offset {offset}");
        }
    }

    #[test]
    fn dlab_switches_offsets_0_and_1() {
        let mut u = Uart16550::new();
        u.write(IER_DLM, IER_RDI);
        u.push_input(b'a');
        set_dlab(&mut u, true);
        // Divisor latch writes are not transmissions and do not touch IER.
        assert_eq!(u.write(RBR_THR_DLL, 0x0C), None);
        assert_eq!(u.write(IER_DLM, 0x34), None);
        assert_eq!(u.read(RBR_THR_DLL), 0x0C);
        assert_eq!(u.read(IER_DLM), 0x34);
        // Reading DLL did not consume input.
        assert_eq!(u.input_len(), 1);
        // Offsets 2..=7 are unaffected by DLAB.
        u.write(SCR, 0x77);
        assert_eq!(u.read(SCR), 0x77);
        assert_eq!(u.read(LCR), LCR_DLAB);
        assert_eq!(u.read(IIR_FCR), IIR_RX_DATA);
        set_dlab(&mut u, false);
        assert_eq!(u.read(IER_DLM), IER_RDI);
        assert_eq!(u.read(RBR_THR_DLL), b'a');
        set_dlab(&mut u, true);
        assert_eq!(u.read(RBR_THR_DLL), 0x0C);
        assert_eq!(u.read(IER_DLM), 0x34);
    }

    #[test]
    fn lcr_and_scr_hold_any_value_ier_and_mcr_only_defined_bits() {
        let mut u = Uart16550::new();
        for v in [0x00u8, 0x03, 0x1B, 0x7F] {
            u.write(LCR, v);
            assert_eq!(u.read(LCR), v);
        }
        for v in [0x00u8, 0xA5, 0x5A, 0xFF] {
            u.write(SCR, v);
            assert_eq!(u.read(SCR), v);
        }
        u.write(LCR, 0);
        u.write(IER_DLM, 0xFF);
        assert_eq!(u.read(IER_DLM), 0x0F);
        u.write(MCR, 0xEF);
        assert_eq!(u.read(MCR), 0x0F);
        u.write(MCR, 0xFF);
        assert_eq!(u.read(MCR), 0x1F);
    }

    #[test]
    fn receive_in_order_and_data_ready() {
        let mut u = Uart16550::new();
        for &b in b"abc" {
            assert!(u.push_input(b));
        }
        assert_eq!(u.input_len(), 3);
        assert_eq!(u.read(LSR), LSR_DR | LSR_THRE | LSR_TEMT);
        assert_eq!(u.read(RBR_THR_DLL), b'a');
        assert_eq!(u.read(RBR_THR_DLL), b'b');
        assert_eq!(u.input_len(), 1);
        assert_eq!(u.read(LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read(RBR_THR_DLL), b'c');
        assert_eq!(u.read(LSR) & LSR_DR, 0);
        assert_eq!(u.input_len(), 0);
    }

    #[test]
    fn rx_interrupt_follows_ier_and_data() {
        let mut u = Uart16550::new();
        u.push_input(b'x');
        // Not enabled: no interrupt, IIR says none.
        assert!(!u.interrupt_pending());
        assert_eq!(u.read(IIR_FCR), IIR_NONE);
        u.write(IER_DLM, IER_RDI);
        assert!(u.interrupt_pending());
        assert_eq!(u.read(IIR_FCR), IIR_RX_DATA);
        // Reading IIR does not clear a data interrupt; reading the data does.
        assert!(u.interrupt_pending());
        assert_eq!(u.read(RBR_THR_DLL), b'x');
        assert!(!u.interrupt_pending());
        assert_eq!(u.read(IIR_FCR), IIR_NONE);
    }

    #[test]
    fn fifo_mode_iir_bits_trigger_and_timeout() {
        let mut u = Uart16550::new();
        u.write(IER_DLM, IER_RDI);
        // Enable with a trigger level of 14 (the usual 0xC7 also clears both FIFOs).
        u.write(IIR_FCR, 0xC7);
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        for i in 0..13u8 {
            u.push_input(i);
        }
        // Below the trigger level: a character timeout, still a receive interrupt.
        assert!(u.interrupt_pending());
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_RX_TIMEOUT);
        u.push_input(13);
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_RX_DATA);
        u.read(RBR_THR_DLL);
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_RX_TIMEOUT);
        // Each trigger level.
        for (bits, level) in [(0x00u8, 1usize), (0x40, 4), (0x80, 8), (0xC0, 14)] {
            u.write(IIR_FCR, bits | FCR_ENABLE | FCR_CLEAR_RX);
            for i in 0..level {
                let expected = if i == 0 { IIR_NONE } else { IIR_RX_TIMEOUT };
                assert_eq!(u.read(IIR_FCR) & 0x0F, expected, "level {level} at {i}");
                u.push_input(0);
            }
            assert_eq!(u.read(IIR_FCR) & 0x0F, IIR_RX_DATA, "level {level}");
        }
        // Without FIFOs there is no timeout indication and IIR bits 7:6 are clear.
        u.write(IIR_FCR, 0);
        u.push_input(1);
        assert_eq!(u.read(IIR_FCR), IIR_RX_DATA);
    }

    #[test]
    fn fcr_other_bits_need_enable() {
        let mut u = Uart16550::new();
        // Bit 0 clear: nothing is programmed, IIR shows no FIFO.
        u.write(IIR_FCR, 0xC0);
        assert_eq!(u.read(IIR_FCR), IIR_NONE);
        // Reserved bits 5:4 (the 16750's 64-byte FIFO) are ignored.
        u.write(IIR_FCR, 0x31);
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        let mut saved = Vec::new();
        u.save(&mut saved);
        assert_eq!(saved[8], FCR_ENABLE);
    }

    #[test]
    fn fifo_clear() {
        let mut u = Uart16550::new();
        u.write(IIR_FCR, FCR_ENABLE);
        for &b in b"hello" {
            u.push_input(b);
        }
        // Clearing the transmit FIFO only leaves the input alone.
        u.write(IIR_FCR, FCR_ENABLE | 0x04);
        assert_eq!(u.input_len(), 5);
        u.write(IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(u.input_len(), 0);
        assert_eq!(u.read(LSR) & LSR_DR, 0);
        // The clear bits are self-clearing: later input stays.
        u.push_input(b'!');
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        assert_eq!(u.input_len(), 1);
        // Rewriting FCR with the enable bit unchanged and no clear keeps the input.
        u.write(IIR_FCR, FCR_ENABLE | 0x80);
        assert_eq!(u.input_len(), 1);
        // Changing the enable bit resets the FIFOs, both ways.
        u.write(IIR_FCR, 0);
        assert_eq!(u.input_len(), 0);
        u.push_input(b'?');
        u.write(IIR_FCR, 0);
        assert_eq!(u.input_len(), 1, "disabled stays disabled: no reset");
        u.write(IIR_FCR, FCR_ENABLE);
        assert_eq!(u.input_len(), 0);
        // A clear bit written without the enable bit is not programmed: with the FIFOs
        // already disabled, nothing is reset.
        u.write(IIR_FCR, 0);
        u.push_input(b'.');
        u.write(IIR_FCR, FCR_CLEAR_RX);
        assert_eq!(u.input_len(), 1);
    }

    #[test]
    fn thr_empty_interrupt_rules() {
        let mut u = Uart16550::new();
        // Enabling it while THR is empty raises it at once.
        u.write(IER_DLM, IER_THRI);
        assert!(u.interrupt_pending());
        assert_eq!(u.read(IIR_FCR), IIR_THR_EMPTY);
        // Reading IIR that reported it cleared it.
        assert!(!u.interrupt_pending());
        assert_eq!(u.read(IIR_FCR), IIR_NONE);
        // A THR write transmits and empties THR again: pending anew.
        assert_eq!(u.write(RBR_THR_DLL, b'z'), Some(b'z'));
        assert!(u.interrupt_pending());
        // Rewriting IER with the bit already set does not raise it again.
        u.read(IIR_FCR);
        u.write(IER_DLM, IER_THRI);
        assert!(!u.interrupt_pending());
        // Disabling masks it; re-enabling raises it.
        u.write(IER_DLM, 0);
        u.write(IER_DLM, IER_THRI);
        assert_eq!(u.read(IIR_FCR), IIR_THR_EMPTY);
        // With THR-empty disabled, a THR write raises no interrupt...
        u.write(IER_DLM, 0);
        u.write(RBR_THR_DLL, b'a');
        assert!(!u.interrupt_pending());
        // ...and an IIR read while it is masked does not consume the latch.
        assert_eq!(u.read(IIR_FCR), IIR_NONE);
        u.write(IER_DLM, IER_THRI);
        assert_eq!(u.read(IIR_FCR), IIR_THR_EMPTY);
    }

    #[test]
    fn iir_read_does_not_clear_thr_empty_when_a_higher_priority_is_reported() {
        let mut u = Uart16550::new();
        u.write(IER_DLM, IER_THRI | IER_RDI);
        u.push_input(b'k');
        assert_eq!(u.read(IIR_FCR), IIR_RX_DATA);
        assert_eq!(u.read(RBR_THR_DLL), b'k');
        assert_eq!(u.read(IIR_FCR), IIR_THR_EMPTY);
        assert_eq!(u.read(IIR_FCR), IIR_NONE);
    }

    #[test]
    fn interrupt_priority_order() {
        let mut u = Uart16550::new();
        // Modem status change (enter loopback with all outputs off: CTS, DSR, DCD drop).
        u.write(MCR, MCR_LOOP);
        // Overrun: loop back RX_CAPACITY + 1 bytes.
        for _ in 0..=Uart16550::RX_CAPACITY {
            u.write(RBR_THR_DLL, 0x55);
        }
        u.write(IER_DLM, IER_MASK);
        assert_eq!(u.read(IIR_FCR), IIR_LINE_STATUS);
        assert_eq!(
            u.read(IIR_FCR),
            IIR_LINE_STATUS,
            "IIR read leaves line status"
        );
        assert_eq!(u.read(LSR) & LSR_OE, LSR_OE);
        assert_eq!(u.read(IIR_FCR), IIR_RX_DATA);
        u.write(IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_THR_EMPTY);
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_MODEM_STATUS);
        assert!(u.interrupt_pending());
        assert_eq!(u.read(MSR), 0x0B);
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        assert!(!u.interrupt_pending());
    }

    #[test]
    fn overrun_sets_and_lsr_read_clears_oe() {
        let mut u = Uart16550::new();
        for i in 0..Uart16550::RX_CAPACITY {
            assert!(u.push_input(i as u8), "byte {i}");
        }
        assert_eq!(u.read(LSR), LSR_DR | LSR_THRE | LSR_TEMT);
        assert!(!u.push_input(0xEE));
        assert_eq!(u.input_len(), Uart16550::RX_CAPACITY);
        // Line status interrupt only when enabled.
        assert!(!u.interrupt_pending());
        u.write(IER_DLM, IER_RLSI);
        assert!(u.interrupt_pending());
        assert_eq!(u.read(LSR), LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT);
        assert_eq!(u.read(LSR), LSR_DR | LSR_THRE | LSR_TEMT);
        assert!(!u.interrupt_pending());
        // The dropped byte is gone; the queued ones arrive intact and in order.
        for i in 0..Uart16550::RX_CAPACITY {
            assert_eq!(u.read(RBR_THR_DLL), i as u8);
        }
        assert_eq!(u.input_len(), 0);
        // Room again.
        assert!(u.push_input(1));
    }

    #[test]
    fn loopback_feeds_transmitted_bytes_back() {
        let mut u = Uart16550::new();
        u.write(MCR, MCR_LOOP);
        assert_eq!(u.write(RBR_THR_DLL, b'L'), None);
        assert_eq!(u.input_len(), 1);
        assert_eq!(u.read(LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read(RBR_THR_DLL), b'L');
        // Leaving loopback transmits again.
        u.write(MCR, 0);
        assert_eq!(u.write(RBR_THR_DLL, b'T'), Some(b'T'));
        assert_eq!(u.input_len(), 0);
        // A full queue in loopback is an overrun too.
        u.write(MCR, MCR_LOOP);
        for _ in 0..Uart16550::RX_CAPACITY {
            u.push_input(0);
        }
        assert_eq!(u.write(RBR_THR_DLL, 1), None);
        assert_eq!(u.read(LSR) & LSR_OE, LSR_OE);
    }

    #[test]
    fn msr_lines_and_deltas() {
        let mut u = Uart16550::new();
        // Outside loopback: always ready, no deltas, MCR outputs do not show.
        u.write(MCR, 0x0F);
        assert_eq!(u.read(MSR), MSR_CTS | MSR_DSR | MSR_DCD);
        u.write(MCR, 0);
        // Loopback: outputs map to inputs, one at a time.
        u.write(MCR, MCR_LOOP);
        assert_eq!(u.read(MSR), 0x0B, "CTS, DSR, DCD fell entering loopback");
        assert_eq!(u.read(MSR), 0x00, "deltas cleared by the read");
        u.write(MCR, MCR_LOOP | 0x01); // DTR -> DSR
        assert_eq!(u.read(MSR), MSR_DSR | 0x02);
        u.write(MCR, MCR_LOOP | 0x02); // RTS -> CTS
        assert_eq!(u.read(MSR), MSR_CTS | 0x03);
        u.write(MCR, MCR_LOOP | 0x04); // OUT1 -> RI, rising edge: no TERI
        assert_eq!(u.read(MSR), MSR_RI | 0x01);
        u.write(MCR, MCR_LOOP | 0x08); // OUT2 -> DCD; RI trailing edge: TERI
        assert_eq!(u.read(MSR), MSR_DCD | 0x0C);
        // Leaving loopback: CTS and DSR rise, DCD stays.
        u.write(MCR, 0);
        assert_eq!(u.read(MSR), MSR_CTS | MSR_DSR | MSR_DCD | 0x03);
        // Modem status interrupt follows IER bit 3 and the deltas.
        u.write(IER_DLM, IER_MSI);
        assert!(!u.interrupt_pending());
        u.write(MCR, MCR_LOOP);
        assert!(u.interrupt_pending());
        assert_eq!(u.read(IIR_FCR), IIR_MODEM_STATUS);
        u.read(MSR);
        assert!(!u.interrupt_pending());
        // MSR and LSR writes are ignored.
        u.write(MSR, 0xFF);
        u.write(LSR, 0xFF);
        assert_eq!(u.read(MSR), 0);
        assert_eq!(u.read(LSR), LSR_THRE | LSR_TEMT);
    }

    /// The checks Linux's 8250 driver makes when it probes a port, in its order.
    #[test]
    fn linux_style_probe() {
        let mut u = Uart16550::new();
        // IER test: clear, read back 0; write 0x0F, read back exactly 0x0F.
        let saved_ier = u.read(IER_DLM);
        u.write(IER_DLM, 0);
        assert_eq!(u.read(IER_DLM) & 0x0F, 0);
        u.write(IER_DLM, 0x0F);
        assert_eq!(u.read(IER_DLM) & 0x0F, 0x0F);
        u.write(IER_DLM, saved_ier);
        // Scratch register: a 16450 or better.
        u.write(SCR, 0xA5);
        assert_eq!(u.read(SCR), 0xA5);
        u.write(SCR, 0x5A);
        assert_eq!(u.read(SCR), 0x5A);
        // Loopback test: LOOP | OUT2 | RTS must read back CTS | DCD in MSR.
        let saved_mcr = u.read(MCR);
        u.write(MCR, MCR_LOOP | 0x0A);
        assert_eq!(u.read(MSR) & 0xF0, 0x90);
        u.write(MCR, saved_mcr);
        // FIFO detection: enabling FIFOs shows 3 in IIR bits 7:6, a 16550A.
        u.write(IIR_FCR, FCR_ENABLE);
        assert_eq!(u.read(IIR_FCR) >> 6, 3);
        // Not a 16650: with LCR = 0xBF, offset 2 (EFR there) reads as the non-zero IIR.
        u.write(LCR, 0xBF);
        assert_ne!(u.read(IIR_FCR), 0);
        // Not a 16750: FCR bit 5 does not show in IIR bit 5.
        u.write(LCR, 0);
        u.write(IIR_FCR, FCR_ENABLE | 0x20);
        assert_eq!(u.read(IIR_FCR) >> 5, 0b110);
        // Baud rate: DLAB, divisor, 8N1; then a loopback transfer of a byte.
        u.write(LCR, LCR_DLAB);
        u.write(RBR_THR_DLL, 1);
        u.write(IER_DLM, 0);
        u.write(LCR, 0x03);
        u.write(IIR_FCR, 0xC7);
        u.write(MCR, MCR_LOOP);
        assert_eq!(u.write(RBR_THR_DLL, 0x5A), None);
        assert_eq!(u.read(LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read(RBR_THR_DLL), 0x5A);
        // Normal operation: DTR | RTS | OUT2, receive and transmit interrupts.
        u.write(MCR, 0x0B);
        u.write(IER_DLM, IER_RDI | IER_THRI);
        assert_eq!(u.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_THR_EMPTY);
        assert_eq!(u.write(RBR_THR_DLL, b'O'), Some(b'O'));
    }

    fn busy_device() -> Uart16550 {
        let mut u = Uart16550::new();
        u.write(LCR, LCR_DLAB);
        u.write(RBR_THR_DLL, 0x0C);
        u.write(IER_DLM, 0x01);
        u.write(LCR, 0x1B);
        u.write(IER_DLM, IER_RDI | IER_THRI | IER_MSI);
        u.write(IIR_FCR, 0x89);
        u.write(SCR, 0x42);
        u.write(MCR, MCR_LOOP | 0x05);
        for i in 0..Uart16550::RX_CAPACITY {
            u.push_input((i * 7) as u8);
        }
        u.push_input(0);
        u
    }

    #[test]
    fn save_restore_round_trip() {
        for mut u in [Uart16550::new(), busy_device()] {
            let mut saved = vec![0xEE, 0xEE];
            u.save(&mut saved);
            // save appends.
            assert_eq!(&saved[..2], &[0xEE, 0xEE]);
            let mut r = Uart16550::restore(&saved[2..]).expect("restore");
            assert_eq!(r, u);
            // The restored device behaves the same from here on, register by register.
            for offset in [2u8, 5, 6, 0, 0, 2, 1, 3, 4, 7] {
                assert_eq!(r.read(offset), u.read(offset), "offset {offset}");
            }
            assert_eq!(r.interrupt_pending(), u.interrupt_pending());
            assert_eq!(r.input_len(), u.input_len());
        }
        // The layout is the documented one.
        let mut saved = Vec::new();
        busy_device().save(&mut saved);
        assert_eq!(&saved[..5], b"U550\x01");
        assert_eq!(saved.len(), STATE_HEADER_LEN + Uart16550::RX_CAPACITY);
        assert_eq!(saved[13], FLAG_OVERRUN | FLAG_THRE_PENDING);
    }

    #[test]
    fn every_truncation_is_an_error() {
        for u in [Uart16550::new(), busy_device()] {
            let mut saved = Vec::new();
            u.save(&mut saved);
            for len in 0..saved.len() {
                assert_eq!(
                    Uart16550::restore(&saved[..len]),
                    Err(UartStateError::Truncated),
                    "length {len}"
                );
            }
            let mut longer = saved.clone();
            longer.push(0);
            assert_eq!(
                Uart16550::restore(&longer),
                Err(UartStateError::TrailingBytes)
            );
        }
    }

    #[test]
    fn bad_state_is_refused() {
        let mut saved = Vec::new();
        Uart16550::new().save(&mut saved);
        let with = |at: usize, value: u8| {
            let mut s = saved.clone();
            s[at] = value;
            Uart16550::restore(&s)
        };
        assert_eq!(with(0, b'X'), Err(UartStateError::BadMagic));
        assert_eq!(
            with(4, 2),
            Err(UartStateError::UnsupportedVersion { version: 2 })
        );
        assert_eq!(with(7, 0x10), Err(UartStateError::InvalidValue { at: 7 }));
        assert_eq!(with(8, 0x02), Err(UartStateError::InvalidValue { at: 8 }));
        assert_eq!(with(8, 0xC0), Err(UartStateError::InvalidValue { at: 8 }));
        assert_eq!(with(10, 0x20), Err(UartStateError::InvalidValue { at: 10 }));
        assert_eq!(with(12, 0x10), Err(UartStateError::InvalidValue { at: 12 }));
        assert_eq!(with(13, 0x04), Err(UartStateError::InvalidValue { at: 13 }));
        // Any DLL, DLM, LCR, SCR value is a valid state.
        for at in [5usize, 6, 9, 11] {
            assert!(with(at, 0xFF).is_ok(), "byte {at}");
        }
        // A queue longer than the device can hold, even with the bytes present.
        let mut s = saved.clone();
        s[14..16].copy_from_slice(&1025u16.to_le_bytes());
        s.extend(core::iter::repeat_n(0, 1025));
        assert_eq!(
            Uart16550::restore(&s),
            Err(UartStateError::QueueTooLong { len: 1025 })
        );
        // Every error explains itself.
        for e in [
            UartStateError::Truncated,
            UartStateError::BadMagic,
            UartStateError::UnsupportedVersion { version: 9 },
            UartStateError::InvalidValue { at: 3 },
            UartStateError::QueueTooLong { len: 2000 },
            UartStateError::TrailingBytes,
        ] {
            assert!(!format!("{e}").is_empty());
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut valid = Vec::new();
        busy_device().save(&mut valid);
        for round in 0..20_000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                // Pure noise, sometimes with a valid prefix so the deeper checks are reached.
                let len = (rng.next() % 64) as usize;
                let mut b: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
                if round % 4 == 0 && b.len() >= 5 {
                    b[..5].copy_from_slice(b"U550\x01");
                }
                b
            } else {
                // A valid state with a few bytes mutated.
                let mut b = valid.clone();
                for _ in 0..1 + rng.next() % 3 {
                    let at = (rng.next() % 20) as usize;
                    b[at] = rng.byte();
                }
                b
            };
            if let Ok(mut u) = Uart16550::restore(&bytes) {
                // Whatever was accepted is a device that works and saves back identically.
                let mut again = Vec::new();
                u.save(&mut again);
                assert_eq!(again, bytes);
                for offset in 0..8 {
                    u.read(offset);
                    u.write(offset, rng.byte());
                }
                u.interrupt_pending();
            }
        }
    }

    #[test]
    fn random_register_traffic_keeps_invariants() {
        let mut rng = Rng(12345);
        let mut u = Uart16550::new();
        for _ in 0..100_000 {
            let offset = (rng.next() % 10) as u8;
            match rng.next() % 4 {
                0 => {
                    u.read(offset);
                }
                1 => {
                    u.write(offset, rng.byte());
                }
                2 => {
                    u.push_input(rng.byte());
                }
                _ => {
                    let pending = u.interrupt_pending();
                    let iir = u.read(IIR_FCR);
                    assert_eq!(pending, iir & 1 == 0);
                }
            }
            assert!(u.input_len() <= Uart16550::RX_CAPACITY);
            assert_eq!(u.read(IER_DLM) & 0xF0 & !u.dlab_mask(), 0);
        }
        let mut saved = Vec::new();
        u.save(&mut saved);
        assert_eq!(Uart16550::restore(&saved).as_ref(), Ok(&u));
    }

    impl Uart16550 {
        /// With DLAB set, offset 1 is DLM, which may hold any value.
        fn dlab_mask(&self) -> u8 {
            if self.dlab() {
                0xFF
            } else {
                0
            }
        }
    }
}
