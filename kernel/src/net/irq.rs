//! NIC interrupts: which e1000 raises which vector, the handler that acknowledges them, and
//! how many each took.
//!
//! The handler does no network work: for every NIC on the vector it reads (and so clears) the
//! interrupt causes, which deasserts the NIC's level-triggered line, counts the interrupt if
//! the NIC had an unmasked cause, and signals the end of interrupt. The console loop polls as before; the
//! interrupt only ends its `hlt` as soon as a frame arrives instead of at the next timer tick.
//! A VM running when it arrives exits (SVM's INTR intercept, VMX's external-interrupt exiting,
//! as for the timer) and the host takes it.
//!
//! The handler takes no lock the rest of the kernel holds: each NIC's slot is filled once
//! ([`spin::Once`]) before its interrupts are unmasked, and the counts are atomics.
//!
//! A line that keeps interrupting with no NIC claiming it (another device asserting a shared
//! line that nobody acknowledges) is masked after [`STUCK_LIMIT`] interrupts in a row: its NICs
//! go back to being polled only, and `net show` says so.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use ::net::e1000;
use kernel::irq::{gsi_for_vector, VECTOR_GSIS};
use spin::Once;

use super::hw::BarMmio;
use crate::arch::{apic, ioapic};

/// NICs that can be interrupt-driven (the cluster and storage NICs, and room for two more).
const SLOTS: usize = 4;
/// Interrupts in a row on one line that no NIC claims before the line is masked.
pub const STUCK_LIMIT: u32 = 10_000;

struct Slot {
    regs: Once<BarMmio>,
    /// The vector its line arrives on; 0: not attached.
    vector: AtomicU8,
    taken: AtomicU64,
}

static NICS: [Slot; SLOTS] = [const {
    Slot {
        regs: Once::new(),
        vector: AtomicU8::new(0),
        taken: AtomicU64::new(0),
    }
}; SLOTS];
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// Interrupts any NIC claimed since boot: the console loop compares it across a pass to know
/// whether a frame arrived after it polled (then it must not halt).
static WAKEUPS: AtomicU64 = AtomicU64::new(0);

const LINES: usize = VECTOR_GSIS as usize;
/// Per GSI: interrupts in a row no NIC claimed, all of them, and whether the line was masked.
static UNCLAIMED_RUN: [AtomicU32; LINES] = [const { AtomicU32::new(0) }; LINES];
static UNCLAIMED: [AtomicU64; LINES] = [const { AtomicU64::new(0) }; LINES];
static STUCK: [AtomicBool; LINES] = [const { AtomicBool::new(false) }; LINES];

/// Attaches an e1000 (a window onto its registers) to `vector`; its slot, or `None` if all
/// are taken. Call before unmasking its interrupts.
pub fn attach(regs: BarMmio, vector: u8) -> Option<usize> {
    let slot = NEXT.fetch_add(1, Ordering::Relaxed);
    let nic = NICS.get(slot)?;
    nic.regs.call_once(|| regs);
    nic.vector.store(vector, Ordering::Release);
    Some(slot)
}

/// Interrupts the NIC in `slot` took (had a cause for).
pub fn taken(slot: usize) -> u64 {
    NICS.get(slot)
        .map_or(0, |nic| nic.taken.load(Ordering::Relaxed))
}

/// Interrupts on `gsi` that no NIC claimed, and whether the line was masked for it.
pub fn unclaimed(gsi: u32) -> (u64, bool) {
    let i = gsi as usize;
    if i >= LINES {
        return (0, false);
    }
    (
        UNCLAIMED[i].load(Ordering::Relaxed),
        STUCK[i].load(Ordering::Relaxed),
    )
}

/// Unmasks the receive interrupts of every attached NIC (masked by [`handle`] when it took
/// one). The console loop calls it, interrupts off, right before it halts: a frame that came
/// in since the last poll raises the line at once and ends the halt. Masked between halts, a
/// device that keeps raising causes costs one interrupt per sleep, never a storm.
pub fn arm() {
    for nic in &NICS {
        if nic.vector.load(Ordering::Acquire) == 0 {
            continue;
        }
        if let Some(regs) = nic.regs.get() {
            e1000::arm_interrupts(regs);
        }
    }
}

/// Interrupts claimed by any NIC since boot (see [`WAKEUPS`]).
pub fn wakeups() -> u64 {
    WAKEUPS.load(Ordering::Acquire)
}

/// The handler of the IOAPIC vectors (called by `trap::dispatch`, interrupts off).
pub fn handle(vector: u8) {
    let mut claimed = false;
    for nic in &NICS {
        if nic.vector.load(Ordering::Acquire) != vector {
            continue;
        }
        let Some(regs) = nic.regs.get() else {
            continue;
        };
        // Transmit completions are latched too (masked): only an unmasked cause raised the line.
        if e1000::take_causes(regs).unmasked() {
            nic.taken.fetch_add(1, Ordering::Relaxed);
            claimed = true;
            // Quiet until the loop has polled and sleeps again (see `arm`): one interrupt per
            // sleep at most, whatever the device keeps raising.
            e1000::mask_interrupts(regs);
        }
    }
    if claimed {
        WAKEUPS.fetch_add(1, Ordering::Release);
    }
    if let Some(gsi) = gsi_for_vector(vector) {
        let i = gsi as usize;
        if claimed {
            UNCLAIMED_RUN[i].store(0, Ordering::Relaxed);
        } else {
            UNCLAIMED[i].fetch_add(1, Ordering::Relaxed);
            if UNCLAIMED_RUN[i].fetch_add(1, Ordering::Relaxed) + 1 >= STUCK_LIMIT
                && !STUCK[i].swap(true, Ordering::Relaxed)
            {
                ioapic::mask(gsi);
            }
        }
    }
    apic::end_of_interrupt();
}
