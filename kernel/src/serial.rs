//! COM1: the node's console and log sink.
//!
//! Everything the kernel prints goes through [`write_str`], which turns `\n` into `\r\n` for
//! serial terminals. Panics and fatal exceptions use [`emergency_write`], which never waits for
//! the lock (the interrupted code may hold it).

use core::fmt;

use spin::Mutex;
use uart_16550::SerialPort;

const COM1_BASE: u16 = 0x3F8;

static COM1: Mutex<Option<SerialPort>> = Mutex::new(None);

/// Programs the UART (115200 8N1, FIFOs on). Call once, first thing at boot.
pub fn init() {
    // SAFETY: 0x3F8 is the architectural COM1 base; nothing else in the kernel drives it.
    let mut port = unsafe { SerialPort::new(COM1_BASE) };
    port.init();
    *COM1.lock() = Some(port);
}

fn put_text(port: &mut SerialPort, text: &str) {
    for byte in text.bytes() {
        if byte == b'\n' {
            port.send_raw(b'\r');
        }
        port.send_raw(byte);
    }
}

/// Writes text (with `\n` -> `\r\n`).
pub fn write_str(text: &str) {
    if let Some(port) = COM1.lock().as_mut() {
        put_text(port, text);
    }
}

/// Writes raw bytes, untranslated (terminal control sequences from the line editor).
pub fn write_bytes(bytes: &[u8]) {
    if let Some(port) = COM1.lock().as_mut() {
        for &byte in bytes {
            port.send_raw(byte);
        }
    }
}

/// Formats straight to the port.
pub fn write_fmt(args: fmt::Arguments) {
    if let Some(port) = COM1.lock().as_mut() {
        let _ = fmt::Write::write_fmt(&mut TextSink(port), args);
    }
}

/// The next received byte, if any (never blocks).
pub fn try_read() -> Option<u8> {
    COM1.lock().as_mut()?.try_receive().ok()
}

/// Waits until the UART has shifted out every byte (Bochs drops what is still queued when it
/// stops, and so would a real machine that powers off).
pub fn drain() {
    // SAFETY: reading the line status register has no side effects on a 16550.
    let mut lsr = x86_64::instructions::port::PortReadOnly::<u8>::new(COM1_BASE + 5);
    for _ in 0..1_000_000 {
        // SAFETY: see above.
        if unsafe { lsr.read() } & 0x40 != 0 {
            return;
        }
    }
}

struct TextSink<'a>(&'a mut SerialPort);

impl fmt::Write for TextSink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        put_text(self.0, s);
        Ok(())
    }
}

/// Output for panics and fatal exceptions: bypasses the lock, which the failing code may hold.
pub fn emergency_write(args: fmt::Arguments) {
    // SAFETY: the caller is on the way to stopping the node; sharing the UART with a frozen
    // holder of the lock can at worst interleave bytes, which beats printing nothing.
    let mut port = unsafe { SerialPort::new(COM1_BASE) };
    let _ = fmt::Write::write_fmt(&mut TextSink(&mut port), args);
    drain();
}

/// `print!` to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!($($arg)*)) };
}

/// `println!` to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_str("\n") };
    ($($arg:tt)*) => {{
        $crate::serial::write_fmt(format_args!($($arg)*));
        $crate::serial::write_str("\n");
    }};
}
