//! Stopping and restarting the machine.

use x86_64::instructions::port::Port;
use x86_64::instructions::{hlt, interrupts};

use crate::serial;

/// QEMU's `isa-debug-exit` device (the launcher always adds it at this port).
const QEMU_DEBUG_EXIT_PORT: u16 = 0xF4;
/// Bochs' ACPI PM1a control block; SLP_EN with SLP_TYP 0 is its soft-off.
const BOCHS_PM1A_CNT: u16 = 0xB004;
const SLP_EN: u16 = 1 << 13;

/// Stops the CPU for good (interrupts off, HLT in a loop: an NMI would only wake it briefly).
pub fn halt_forever() -> ! {
    serial::drain();
    interrupts::disable();
    loop {
        hlt();
    }
}

/// Leaves the emulator with a failure status: QEMU exits with (1 << 1) | 1 = 3, Bochs with 1.
/// Only used when the node configuration asks for it (`on_panic = exit`), i.e. under test.
pub fn exit_emulator_failure() -> ! {
    serial::drain();
    // SAFETY: writes to the emulator's test devices, requested by the node configuration;
    // on a machine without them these ports are unused and the writes are ignored.
    unsafe {
        Port::<u32>::new(QEMU_DEBUG_EXIT_PORT).write(1);
        Port::<u16>::new(BOCHS_PM1A_CNT).write(SLP_EN);
    }
    halt_forever()
}

/// Resets the machine: the keyboard controller's reset line, then a triple fault.
pub fn reboot() -> ! {
    serial::drain();
    interrupts::disable();
    let mut status = Port::<u8>::new(0x64);
    for _ in 0..100_000 {
        // SAFETY: the 8042 status port; reading it has no side effects.
        if unsafe { status.read() } & 0x02 == 0 {
            break;
        }
    }
    // SAFETY: 0xFE on the 8042 command port pulses the CPU reset line: the intended effect.
    unsafe { status.write(0xFE) };
    for _ in 0..1_000_000 {
        core::hint::spin_loop();
    }
    // Still here: an empty IDT turns the next exception into a triple fault, i.e. a reset.
    let empty = x86_64::structures::DescriptorTablePointer {
        limit: 0,
        base: x86_64::VirtAddr::zero(),
    };
    // SAFETY: resetting the machine is the intent; nothing runs after this.
    unsafe {
        x86_64::instructions::tables::lidt(&empty);
        core::arch::asm!("int3");
    }
    halt_forever()
}
