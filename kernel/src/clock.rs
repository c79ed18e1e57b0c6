//! The node's monotonic clock: the TSC, calibrated at boot against the PIT (see `arch::pit`).

use core::sync::atomic::{AtomicU64, Ordering};

static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC exists on every x86_64 CPU and only reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Marks "now" as uptime zero. Called first thing at boot.
pub fn mark_boot() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
}

/// Sets the calibrated TSC frequency; uptime reads 0 until this is called.
pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
}

/// The calibrated TSC frequency in Hz (0 before calibration).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Time since boot in `unit`s per second (1_000_000 for microseconds).
fn uptime_in(unit: u64) -> u64 {
    let hz = tsc_hz();
    if hz == 0 {
        return 0;
    }
    let ticks = rdtsc().saturating_sub(BOOT_TSC.load(Ordering::Relaxed));
    (u128::from(ticks) * u128::from(unit) / u128::from(hz)) as u64
}

/// Microseconds since boot.
pub fn uptime_us() -> u64 {
    uptime_in(1_000_000)
}

/// Milliseconds since boot.
pub fn uptime_ms() -> u64 {
    uptime_in(1_000)
}
