//! The local APIC: x2APIC (MSRs) when the CPU has it, xAPIC (MMIO) otherwise. It provides the
//! periodic timer that wakes the idle loop (and later preempts vCPUs).

use spin::Once;
use x86_64::registers::model_specific::Msr;
use x86_64::{PhysAddr, VirtAddr};

use crate::{clock, trap};

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_16: u32 = 0b0011;

/// How this CPU's local APIC is reached.
#[derive(Debug, Clone, Copy)]
pub enum ApicMode {
    X2Apic,
    XApic { registers: VirtAddr },
}

impl core::fmt::Display for ApicMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ApicMode::X2Apic => write!(f, "x2APIC"),
            ApicMode::XApic { .. } => write!(f, "xAPIC"),
        }
    }
}

/// What the boot-time calibration found.
#[derive(Debug, Clone, Copy)]
pub struct TimerInfo {
    pub mode: ApicMode,
    pub apic_id: u32,
    /// Local APIC timer input frequency after the divider.
    pub timer_hz: u64,
    pub tick_hz: u64,
}

static MODE: Once<ApicMode> = Once::new();
static INFO: Once<TimerInfo> = Once::new();

fn read(reg: u32) -> u32 {
    match MODE.get() {
        // SAFETY: x2APIC registers are MSRs 0x800 + reg/16; the mode says x2APIC is enabled.
        Some(ApicMode::X2Apic) => unsafe { Msr::new(0x800 + (reg >> 4)).read() as u32 },
        // SAFETY: `registers` maps the APIC page uncached; reg is a register offset in it.
        Some(ApicMode::XApic { registers }) => unsafe {
            core::ptr::read_volatile((registers.as_u64() + u64::from(reg)) as *const u32)
        },
        None => 0,
    }
}

fn write(reg: u32, value: u32) {
    match MODE.get() {
        // SAFETY: as in `read`.
        Some(ApicMode::X2Apic) => unsafe { Msr::new(0x800 + (reg >> 4)).write(u64::from(value)) },
        // SAFETY: as in `read`.
        Some(ApicMode::XApic { registers }) => unsafe {
            core::ptr::write_volatile((registers.as_u64() + u64::from(reg)) as *mut u32, value)
        },
        None => {}
    }
}

/// Signals the end of the interrupt being handled.
pub fn end_of_interrupt() {
    write(REG_EOI, 0);
}

/// Enables the local APIC (x2APIC when `x2apic` is true, else through `map_mmio`), calibrates
/// the TSC and the APIC timer against the PIT and starts a periodic `tick_hz` timer.
pub fn init(x2apic: bool, tick_hz: u64, map_mmio: impl FnOnce(PhysAddr) -> VirtAddr) -> TimerInfo {
    let mut base_msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; setting the enable (and x2APIC)
    // bits is the documented way to switch modes from xAPIC.
    let base = unsafe { base_msr.read() };
    let mode = if x2apic {
        // SAFETY: see above; the CPU reported x2APIC support.
        unsafe { base_msr.write(base | APIC_BASE_ENABLE | APIC_BASE_X2APIC) };
        ApicMode::X2Apic
    } else {
        // SAFETY: see above.
        unsafe { base_msr.write(base | APIC_BASE_ENABLE) };
        let phys = PhysAddr::new(base & 0x000F_FFFF_FFFF_F000);
        ApicMode::XApic {
            registers: map_mmio(phys),
        }
    };
    MODE.call_once(|| mode);

    write(REG_TPR, 0);
    write(REG_SVR, 0x100 | u32::from(trap::VECTOR_SPURIOUS));
    let apic_id = match mode {
        ApicMode::X2Apic => read(REG_ID),
        ApicMode::XApic { .. } => read(REG_ID) >> 24,
    };

    // Free-running one-shot countdown, masked, as the thing to calibrate.
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_INITIAL, u32::MAX);
    let window = crate::arch::pit::measure_window(|| (clock::rdtsc(), read(REG_TIMER_CURRENT)));
    let (tsc_hz, timer_hz) = match window {
        Ok(((tsc0, apic0), (tsc1, apic1))) => {
            let per_second = 1_000_000 / crate::arch::pit::WINDOW_US;
            (
                (tsc1 - tsc0) * per_second,
                u64::from(apic0.wrapping_sub(apic1)) * per_second,
            )
        }
        Err(err) => {
            // Without a reference clock, assume the common 1 GHz / 62.5 MHz and say so.
            log::warn!("PIT calibration failed ({err:?}): assuming TSC 1 GHz, APIC timer 62.5 MHz");
            (1_000_000_000, 62_500_000)
        }
    };
    clock::set_tsc_hz(tsc_hz.max(1));

    let initial = (timer_hz / tick_hz).clamp(1, u64::from(u32::MAX)) as u32;
    write(REG_LVT_TIMER, u32::from(trap::VECTOR_TIMER) | LVT_PERIODIC);
    write(REG_TIMER_INITIAL, initial);

    *INFO.call_once(|| TimerInfo {
        mode,
        apic_id,
        timer_hz,
        tick_hz,
    })
}

/// The calibration result, once `init` ran.
pub fn info() -> Option<TimerInfo> {
    INFO.get().copied()
}
