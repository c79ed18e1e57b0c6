//! The x86_64 hardware seam of the node kernel: descriptor tables, interrupt controllers,
//! timers, CPU identification and power control. Everything with `unsafe` lives here, in
//! `serial`, or in `mem`.

pub mod apic;
pub mod cpu;
pub mod deliberate;
pub mod gdt;
pub mod idt;
pub mod ioapic;
pub mod pic;
pub mod pit;
pub mod power;
