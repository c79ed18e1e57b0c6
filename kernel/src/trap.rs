//! What happens on every interrupt and exception (entered from the stubs in `arch::idt`).
//!
//! Exceptions are reported on serial with vector, error code, RIP and CR2, then stop the node
//! (see [`crate::fault`]) except the two that are informational: NMI and breakpoint.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::registers::control::Cr2;

use crate::arch::apic;
use crate::arch::idt::TrapFrame;
use crate::fault;

/// First vector past the exceptions and the remapped legacy PIC (0x20..0x2F). The IOAPIC's
/// inputs follow from 0x40 ([`kernel::irq::VECTOR_BASE`]).
pub const VECTOR_TIMER: u8 = 0x30;
pub const VECTOR_SPURIOUS: u8 = 0xFF;
const PIC_VECTORS: core::ops::Range<u64> = 0x20..0x30;

static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);

/// Timer interrupts taken since boot.
pub fn timer_ticks() -> u64 {
    TIMER_TICKS.load(Ordering::Relaxed)
}

/// Interrupts that arrived on a vector nobody owns.
pub fn unexpected_interrupts() -> u64 {
    UNEXPECTED.load(Ordering::Relaxed)
}

const EXCEPTION_NAMES: [(&str, &str); 32] = [
    ("#DE", "divide error"),
    ("#DB", "debug"),
    ("NMI", "non-maskable interrupt"),
    ("#BP", "breakpoint"),
    ("#OF", "overflow"),
    ("#BR", "bound range exceeded"),
    ("#UD", "invalid opcode"),
    ("#NM", "device not available"),
    ("#DF", "double fault"),
    ("#CSO", "coprocessor segment overrun"),
    ("#TS", "invalid TSS"),
    ("#NP", "segment not present"),
    ("#SS", "stack-segment fault"),
    ("#GP", "general protection"),
    ("#PF", "page fault"),
    ("#15", "reserved"),
    ("#MF", "x87 floating-point error"),
    ("#AC", "alignment check"),
    ("#MC", "machine check"),
    ("#XM", "SIMD floating-point"),
    ("#VE", "virtualization exception"),
    ("#CP", "control protection"),
    ("#22", "reserved"),
    ("#23", "reserved"),
    ("#24", "reserved"),
    ("#25", "reserved"),
    ("#26", "reserved"),
    ("#27", "reserved"),
    ("#HV", "hypervisor injection"),
    ("#VC", "VMM communication"),
    ("#SX", "security exception"),
    ("#31", "reserved"),
];

/// Called by the common stub with interrupts disabled.
pub extern "C" fn dispatch(frame: &mut TrapFrame) {
    match frame.vector {
        0..=31 => exception(frame),
        v if v == u64::from(VECTOR_TIMER) => {
            TIMER_TICKS.fetch_add(1, Ordering::Relaxed);
            apic::end_of_interrupt();
        }
        // IOAPIC inputs (GSI n on VECTOR_BASE + n): only NICs use them so far.
        v if kernel::irq::gsi_for_vector(v as u8).is_some() => crate::net::irq::handle(v as u8),
        // The legacy PIC is masked, but it can still raise spurious IRQ 7/15; the local APIC's
        // spurious vector needs no EOI.
        v if PIC_VECTORS.contains(&v) || v == u64::from(VECTOR_SPURIOUS) => {}
        _ => {
            UNEXPECTED.fetch_add(1, Ordering::Relaxed);
            apic::end_of_interrupt();
        }
    }
}

fn exception(frame: &mut TrapFrame) {
    let (mnemonic, name) = EXCEPTION_NAMES[frame.vector as usize];
    let cr2 = Cr2::read_raw();
    let report = format_args!(
        "EXCEPTION {mnemonic} {name} (vector {}) error={:#x} rip={:#x} cr2={:#x}\n",
        frame.vector, frame.error_code, frame.rip, cr2
    );
    crate::serial::emergency_write(report);
    crate::serial::emergency_write(format_args!(
        "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x} rsp={:#018x}\n  r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n  cs={:#x} ss={:#x} rflags={:#x}\n",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp, frame.rsp,
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15,
        frame.cs, frame.ss, frame.rflags
    ));
    match frame.vector {
        // Both leave the interrupted code intact: report and carry on. INT3 leaves RIP past
        // itself, so returning resumes after the breakpoint.
        2 | 3 => crate::serial::emergency_write(format_args!("  (not fatal: continuing)\n")),
        _ => fault::stop_node("fatal exception"),
    }
}
