//! The pure logic of the node kernel, tested on the host.
//!
//! The `kernel` binary (`src/main.rs` and its hardware modules) is thin glue: it
//! boots the machine, drives the devices and calls into this library for every
//! decision that can be made without touching hardware: editing the console
//! line, allocating physical frames from the boot memory map, parsing the node
//! configuration, reading the ACPI interrupt tables and routing PCI interrupts through the
//! IOAPIC. Because of that, everything here runs unchanged under
//! `cargo test -p kernel --lib` on the development machine.
//!
//! Rules for this library, so that it stays host-testable:
//! - no hardware access of any kind: no port or MMIO I/O, no control registers,
//!   no inline assembly, no physical addresses dereferenced;
//! - no `unsafe` code (enforced by `#![forbid(unsafe_code)]`);
//! - no dependency on the bootloader (`bootloader_api` types are converted by
//!   the binary before they reach this library) nor on other boot-time state;
//! - `no_std` + `alloc` only, and bad input yields a typed error, never a panic.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod acpi;
pub mod config;
pub mod console;
pub mod elf;
pub mod frames;
pub mod guest_clock;
pub mod guest_workload;
pub mod irq;
