//! The 8254 PIT as a known clock: channel 2 counts a fixed interval (1.193182 MHz input) while
//! the caller samples the counters it wants to calibrate.

use x86_64::instructions::port::Port;

const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 50 ms is close to the 16-bit counter's limit (~54.9 ms).
pub const WINDOW_US: u64 = 50_000;

/// Why the PIT could not serve as a reference.
#[derive(Debug, Clone, Copy)]
pub enum PitError {
    /// OUT2 never rose: no PIT (some modern machines) or its gate is not wired to port 0x61.
    NoOutput,
}

/// Runs `sample` right before and right after a [`WINDOW_US`] interval measured by PIT
/// channel 2 and returns both samples.
pub fn measure_window<T>(mut sample: impl FnMut() -> T) -> Result<(T, T), PitError> {
    let count = (PIT_HZ * WINDOW_US / 1_000_000) as u16;
    let mut control = Port::<u8>::new(0x61);
    let mut mode = Port::<u8>::new(0x43);
    let mut channel2 = Port::<u8>::new(0x42);
    // SAFETY: port 0x61 bit 0 gates channel 2 and bit 1 drives the speaker (kept off); 0x43
    // and 0x42 program channel 2, which nothing else in this kernel uses.
    unsafe {
        let gate = control.read() & !0x03;
        control.write(gate);
        // Channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count: OUT2 rises at 0).
        mode.write(0b1011_0000);
        channel2.write(count as u8);
        channel2.write((count >> 8) as u8);
        let before = sample();
        control.write(gate | 0x01);
        for _ in 0..50_000_000u64 {
            if control.read() & 0x20 != 0 {
                let after = sample();
                control.write(gate);
                return Ok((before, after));
            }
        }
        control.write(gate);
    }
    Err(PitError::NoOutput)
}
