//! What the hypervisor does on each VM exit: emulate (serial port, PCI configuration and the
//! virtio-blk disk's I/O BAR, CPUID, HLT), record (dirty pages under write protection), end the
//! slice (host interrupts), or stop the VM with a message (triple fault, access outside RAM,
//! anything it cannot emulate). A misbehaving guest never takes the node down.
//!
//! Every port access exits (the SVM I/O permission map intercepts all ports, VMX runs with
//! unconditional I/O exiting), so a port no device decodes reads as all ones, as on a PC bus.

use alloc::format;
use alloc::string::String;
use core::arch::x86_64::__cpuid_count;

use vmx::decode::instruction_at;
use vmx::exit::{IoDirection, VmExit};
use vmx::state::{PendingEvent, PendingEventKind};
use vmx::vcpu::Gpr;

use super::memory::NptFrames;
use super::{DirtyTracking, Vm, VmState};
use crate::trap;

/// The guest's COM1.
const COM1: core::ops::RangeInclusive<u16> = 0x3F8..=0x3FF;
/// CPUID leaf where hypervisors announce themselves.
const HYPERVISOR_LEAF: u32 = 0x4000_0000;
const HYPERVISOR_ID: &[u8; 12] = b"HVLIVEMIGRAT";
/// Exits handled within one slice before the slice ends anyway: bounds the time a guest that
/// exits in a tight loop can hold the CPU if timer interrupts stop reaching it.
const MAX_EXITS_PER_SLICE: u32 = 100_000;

/// What to do after an exit.
enum Next {
    Continue,
    EndSlice,
    Stop(String),
}

/// Runs `vm` until its slice ends (next timer tick, a HLT, or a stop).
pub(super) fn run_until_slice_end(vm: &mut Vm, raw: bool, out: &mut dyn FnMut(&str, &[u8])) {
    if vm.state != VmState::Running {
        return;
    }
    let tick = trap::timer_ticks();
    if !vm.throttle.allows(tick) {
        return;
    }
    if let Some(halted) = vm.halted_at {
        if tick <= halted {
            return;
        }
        vm.halted_at = None;
    }
    for _ in 0..MAX_EXITS_PER_SLICE {
        let exit = vm.vcpu.run();
        vm.exits.record(&exit);
        match handle(vm, &exit, raw, out) {
            Next::Continue if trap::timer_ticks() == tick => {}
            Next::Continue | Next::EndSlice => return,
            Next::Stop(reason) => {
                vm.crash(reason);
                return;
            }
        }
    }
}

/// Moves RIP past the instruction that exited. The hardware reports its length for most exits
/// (VMX always; SVM for I/O or with NRIPS); otherwise (SVM without NRIPS, as under QEMU TCG)
/// the instruction is fetched through the guest's page tables and decoded.
fn advance(vm: &mut Vm) -> Result<(), String> {
    let rip = vm.vcpu.rip();
    let len = match vm.vcpu.instruction_len() {
        Some(len) => len,
        None => {
            let ctx = vm
                .vcpu
                .fetch_context()
                .map_err(|e| format!("reading vCPU state: {e:?}"))?;
            // Outside 64-bit mode the CS base takes part in the linear address.
            let linear = if ctx.long {
                rip
            } else {
                ctx.cs_base.wrapping_add(rip) & 0xFFFF_FFFF
            };
            instruction_at(&vm.ram, &ctx.mode, ctx.long, ctx.db, linear)
                .map_err(|e| format!("decoding the instruction at rip {rip:#x}: {e}"))?
                .len
        }
    };
    vm.vcpu.set_rip(rip.wrapping_add(len));
    Ok(())
}

fn handle(vm: &mut Vm, exit: &VmExit, raw: bool, out: &mut dyn FnMut(&str, &[u8])) -> Next {
    match *exit {
        VmExit::Io {
            port,
            size,
            direction,
            string,
            rep,
        } => {
            if string || rep {
                return Next::Stop(format!(
                    "string I/O on port {port:#x} is not emulated (rip {:#x})",
                    vm.vcpu.rip()
                ));
            }
            let bytes = size.bytes();
            let mask = if bytes >= 8 {
                u64::MAX
            } else {
                (1u64 << (8 * bytes)) - 1
            };
            match direction {
                IoDirection::In => {
                    let value = if COM1.contains(&port) {
                        u64::from(vm.uart.read((port - *COM1.start()) as u8))
                    } else if let Some(value) = vm.devices.io_read(port, bytes) {
                        u64::from(value)
                    } else {
                        // Nothing decodes this port: the bus floats high.
                        mask
                    };
                    let rax = vm.vcpu.gpr(Gpr::Rax);
                    // IN AL/AX keep the rest of RAX; IN EAX writes EAX, which zero-extends
                    // into RAX like every 32-bit register write.
                    let kept = if bytes == 4 { 0 } else { rax & !mask };
                    vm.vcpu.set_gpr(Gpr::Rax, kept | (value & mask));
                }
                IoDirection::Out => {
                    let value = vm.vcpu.gpr(Gpr::Rax);
                    if COM1.contains(&port) {
                        if let Some(byte) = vm.uart.write((port - *COM1.start()) as u8, value as u8)
                        {
                            vm.console_byte(byte, raw, out);
                        }
                    } else {
                        // Writes nothing decodes are dropped, as on a PC bus.
                        let _ =
                            vm.devices
                                .io_write(&mut vm.ram, port, bytes, (value & mask) as u32);
                    }
                }
            }
            step(vm, Next::Continue)
        }
        VmExit::Hlt => {
            vm.halted_at = Some(trap::timer_ticks());
            step(vm, Next::EndSlice)
        }
        VmExit::Cpuid => {
            emulate_cpuid(vm);
            step(vm, Next::Continue)
        }
        VmExit::MsrRead { .. } | VmExit::MsrWrite { .. } => {
            // No MSR is emulated yet: what real hardware does for a missing MSR.
            inject_exception(vm, 13, Some(0))
        }
        VmExit::Hypercall => inject_exception(vm, 6, None),
        VmExit::NestedPageFault {
            gpa,
            write,
            present,
            ..
        } => {
            if gpa < vm.ram.size()
                && write
                && present
                && vm.spec.tracking == DirtyTracking::WriteProtect
            {
                let _ = vm.wp_dirty.set(gpa / 4096);
                match vm.npt.restore_write(&mut NptFrames, gpa & !0xFFF) {
                    Ok(()) => Next::Continue,
                    Err(err) => Next::Stop(format!("write-protect fault at {gpa:#x}: {err}")),
                }
            } else {
                Next::Stop(format!(
                    "guest accessed {gpa:#x}, outside its {} MiB of RAM (rip {:#x}, {})",
                    vm.ram.size() >> 20,
                    vm.vcpu.rip(),
                    if write { "write" } else { "read" }
                ))
            }
        }
        VmExit::Shutdown => Next::Stop(format!(
            "triple fault (shutdown) at rip {:#x}",
            vm.vcpu.rip()
        )),
        VmExit::ExternalInterrupt | VmExit::SliceExpired | VmExit::Nmi => Next::EndSlice,
        ref other => Next::Stop(format!(
            "unhandled exit {other} at rip {:#x} (raw {:x?})",
            vm.vcpu.rip(),
            vm.vcpu.raw_exit()
        )),
    }
}

/// Completes an emulated instruction: past it, then `next`.
fn step(vm: &mut Vm, next: Next) -> Next {
    match advance(vm) {
        Ok(()) => next,
        Err(reason) => Next::Stop(reason),
    }
}

fn inject_exception(vm: &mut Vm, vector: u8, error_code: Option<u32>) -> Next {
    let event = PendingEvent {
        kind: PendingEventKind::Exception,
        vector,
        error_code,
        instruction_len: 0,
    };
    match vm.vcpu.inject(&event) {
        Ok(()) => Next::Continue,
        Err(err) => Next::Stop(format!("cannot inject exception {vector}: {err:?}")),
    }
}

/// CPUID as the guest sees it: the host's, minus what the guest must not use (nested
/// virtualization, x2APIC, MONITOR: not emulated), plus the hypervisor leaves.
fn emulate_cpuid(vm: &mut Vm) {
    let leaf = vm.vcpu.gpr(Gpr::Rax) as u32;
    let subleaf = vm.vcpu.gpr(Gpr::Rcx) as u32;
    #[allow(unused_unsafe)]
    // SAFETY: CPUID only reads identification data.
    let host = unsafe { __cpuid_count(leaf, subleaf) };
    let (mut a, mut b, mut c, mut d) = (host.eax, host.ebx, host.ecx, host.edx);
    match leaf {
        1 => {
            c &= !((1 << 5) | (1 << 21) | (1 << 3)); // VMX, x2APIC, MONITOR
            c |= 1 << 31; // running under a hypervisor
            b &= 0x00FF_FFFF; // initial APIC ID 0
        }
        0x8000_0001 => c &= !(1 << 2), // SVM
        0x8000_000A => (a, b, c, d) = (0, 0, 0, 0),
        HYPERVISOR_LEAF => {
            let word =
                |i: usize| u32::from_le_bytes(HYPERVISOR_ID[i..i + 4].try_into().unwrap_or([0; 4]));
            (a, b, c, d) = (HYPERVISOR_LEAF, word(0), word(4), word(8));
        }
        _ => {}
    }
    vm.vcpu.set_gpr(Gpr::Rax, u64::from(a));
    vm.vcpu.set_gpr(Gpr::Rbx, u64::from(b));
    vm.vcpu.set_gpr(Gpr::Rcx, u64::from(c));
    vm.vcpu.set_gpr(Gpr::Rdx, u64::from(d));
}
