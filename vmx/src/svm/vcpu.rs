//! The SVM hardware glue: turning SVM on, and [`SvmVcpu`], which runs a guest with VMRUN.
//!
//! Each entry is `CLGI; VMSAVE host; VMLOAD guest; VMRUN; VMSAVE guest; VMLOAD host; STGI`:
//! VMRUN itself swaps only part of the state (APM 15.5.1), so VMSAVE/VMLOAD carry the rest
//! (FS, GS, TR, LDTR, KernelGSbase, STAR family, SYSENTER MSRs), most importantly the host's TR,
//! whose IST stacks the host's double-fault and NMI handlers need. GIF stays clear from before
//! the host's state is saved until it is restored, so a host interrupt is taken only after the
//! host is whole again: it is held pending through the world switch and delivered at STGI.
//!
//! Guest FPU/SSE state is not switched: the node kernel and the test guest are soft-float, so
//! the registers are never touched by anyone else. Real guests (Linux) will need
//! FXSAVE/XSAVE around VMRUN when several vCPUs share a core.

use core::arch::asm;
use core::mem::offset_of;

use x86_64::registers::model_specific::{Efer, EferFlags, Msr};

use super::bitmap::{iopm_fill, msrpm_fill, IOPM_SIZE, MSRPM_SIZE};
use super::state::{inject, load_from_state, save_to_state, GuestGprs};
use super::vmcb::{int_ctl, intercept, TlbControl, Vmcb};
use crate::exit::VmExit;
use crate::state::{PendingEvent, VcpuState};
use crate::vcpu::{FetchContext, Gpr, GprBlock, HostPage, HostPages, Vcpu, VcpuError};

/// VM_HSAVE_PA: where VMRUN saves host state (APM 15.30.4).
const VM_HSAVE_PA: u32 = 0xC001_0117;
const PAGE: usize = 4096;

/// Why SVM could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvmError {
    /// Not enough host memory for a hardware structure.
    OutOfMemory,
    /// A bitmap helper refused its buffer (a bug: sizes are fixed).
    Bitmap,
    /// The initial state could not be loaded into the VMCB.
    State(&'static str),
}

/// Turns SVM on for this CPU: EFER.SVME and a host save area. The caller has checked
/// `vmx::caps` (SVM present, not disabled by firmware). Returns the save area, which must stay
/// allocated while SVM is on.
pub fn enable_svm(pages: &mut dyn HostPages) -> Result<HostPage, SvmError> {
    let save_area = pages.alloc_zeroed(1).ok_or(SvmError::OutOfMemory)?;
    // SAFETY: the caller checked that SVM exists and is not locked off, so setting EFER.SVME
    // is architecturally allowed; VM_HSAVE_PA then names a page reserved for the CPU alone.
    unsafe {
        Efer::update(|f| f.insert(EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE));
        Msr::new(VM_HSAVE_PA).write(save_area.hpa);
    }
    Ok(save_area)
}

/// One guest CPU on AMD SVM.
pub struct SvmVcpu {
    vmcb: HostPage,
    host_vmcb: HostPage,
    iopm: HostPage,
    msrpm: HostPage,
    gprs: GuestGprs,
    /// Architectural state the VMCB does not hold (DR0-3, FPU, ...), kept for save/restore.
    shadow: VcpuState,
}

impl SvmVcpu {
    /// A vCPU in `state` (e.g. [`VcpuState::reset_64bit`]) with nested paging rooted at
    /// `npt_root`, tagged with `asid` (non-zero and unique per VM on this host). Every I/O port
    /// and MSR access exits, as do CPUID, HLT, VMMCALL, INTR, NMI and shutdown.
    pub fn new(
        pages: &mut dyn HostPages,
        asid: u32,
        npt_root: u64,
        state: &VcpuState,
    ) -> Result<SvmVcpu, SvmError> {
        let mut taken: [Option<HostPage>; 4] = [None, None, None, None];
        let sizes = [1, 1, IOPM_SIZE / PAGE, MSRPM_SIZE / PAGE];
        for (slot, &count) in taken.iter_mut().zip(&sizes) {
            match pages.alloc_zeroed(count) {
                Some(page) => *slot = Some(page),
                None => {
                    for page in taken.into_iter().flatten() {
                        pages.free(page);
                    }
                    return Err(SvmError::OutOfMemory);
                }
            }
        }
        let [Some(vmcb), Some(host_vmcb), Some(iopm), Some(msrpm)] = taken else {
            return Err(SvmError::OutOfMemory);
        };
        let mut vcpu = SvmVcpu {
            vmcb,
            host_vmcb,
            iopm,
            msrpm,
            gprs: GuestGprs::default(),
            shadow: state.clone(),
        };
        if let Err(err) = vcpu.init(asid, npt_root, state) {
            vcpu.free_pages(pages);
            return Err(err);
        }
        Ok(vcpu)
    }

    fn init(&mut self, asid: u32, npt_root: u64, state: &VcpuState) -> Result<(), SvmError> {
        // SAFETY: the bitmap pages were allocated with exactly these sizes for this vCPU.
        let (iopm, msrpm) = unsafe {
            (
                core::slice::from_raw_parts_mut(self.iopm.ptr, IOPM_SIZE),
                core::slice::from_raw_parts_mut(self.msrpm.ptr, MSRPM_SIZE),
            )
        };
        iopm_fill(iopm, true).map_err(|_| SvmError::Bitmap)?;
        msrpm_fill(msrpm, true).map_err(|_| SvmError::Bitmap)?;
        let (iopm_hpa, msrpm_hpa) = (self.iopm.hpa, self.msrpm.hpa);
        let vmcb = self.vmcb_mut();
        *vmcb = Vmcb::new();
        set_controls(vmcb, asid, iopm_hpa, msrpm_hpa);
        vmcb.control.tlb_control = TlbControl::FlushGuest as u8;
        vmcb.enable_nested_paging(npt_root);
        let mut gprs = GuestGprs::default();
        load_from_state(vmcb, &mut gprs, state).map_err(|_| SvmError::State("initial state"))?;
        self.gprs = gprs;
        Ok(())
    }

    fn free_pages(self, pages: &mut dyn HostPages) {
        pages.free(self.vmcb);
        pages.free(self.host_vmcb);
        pages.free(self.iopm);
        pages.free(self.msrpm);
    }

    fn vmcb(&self) -> &Vmcb {
        // SAFETY: the VMCB page is 4 KiB aligned, owned by this vCPU, and Vmcb is exactly one
        // page of plain data; the CPU only writes it during VMRUN, when no reference exists.
        unsafe { &*(self.vmcb.ptr as *const Vmcb) }
    }

    fn vmcb_mut(&mut self) -> &mut Vmcb {
        // SAFETY: as in `vmcb`, and `&mut self` makes the reference unique.
        unsafe { &mut *(self.vmcb.ptr as *mut Vmcb) }
    }
}

/// What every guest of this hypervisor runs with: the intercepts (every port and MSR through
/// the bitmaps, CPUID, HLT, host interrupts and NMIs, shutdown, VMRUN and VMMCALL), its ASID,
/// and host interrupts kept under host control.
fn set_controls(vmcb: &mut Vmcb, asid: u32, iopm_hpa: u64, msrpm_hpa: u64) {
    vmcb.set_misc1(
        intercept::misc1::INTR
            | intercept::misc1::NMI
            | intercept::misc1::CPUID
            | intercept::misc1::HLT
            | intercept::misc1::IOIO_PROT
            | intercept::misc1::MSR_PROT
            | intercept::misc1::SHUTDOWN,
        true,
    );
    // VMRUN must be intercepted or VMRUN fails (APM 15.5.1).
    vmcb.set_misc2(intercept::misc2::VMRUN | intercept::misc2::VMMCALL, true);
    vmcb.control.iopm_base_pa = iopm_hpa;
    vmcb.control.msrpm_base_pa = msrpm_hpa;
    vmcb.control.guest_asid = asid;
    // Host interrupts must reach the host whatever the guest's RFLAGS.IF: without
    // V_INTR_MASKING a guest running with interrupts off masks the timer that ends its slice
    // and holds the CPU until it exits by itself (APM 15.21.1). The guest's IF and CR8 then
    // govern virtual interrupts only (CR8 is V_TPR, see state.rs).
    vmcb.control.int_ctl |= int_ctl::V_INTR_MASKING;
}

/// The world switch. `gprs` holds the guest's registers other than RAX/RSP (in the VMCB).
///
/// # Safety
/// SVM is enabled with a host save area; both VMCBs are valid, page-aligned and owned by the
/// caller; the nested page tables named in the guest VMCB map only memory given to this guest.
unsafe fn world_switch(guest_vmcb: u64, host_vmcb: u64, gprs: *mut GuestGprs) {
    // SAFETY: see the function's contract. RBX and RBP cannot be named as clobbers, so they are
    // saved on the stack by hand; every other register is declared clobbered.
    unsafe {
        asm!(
            "push rbp",
            "push rbx",
            "push rdi",          // [rsp+16] gprs
            "push rsi",          // [rsp+8]  host VMCB
            "push rdx",          // [rsp]    guest VMCB
            "clgi",
            "mov rax, [rsp + 8]",
            "vmsave rax",
            "mov rax, [rsp + 16]",
            "mov rcx, [rax + {rcx}]",
            "mov rdx, [rax + {rdx}]",
            "mov rbx, [rax + {rbx}]",
            "mov rbp, [rax + {rbp}]",
            "mov rsi, [rax + {rsi}]",
            "mov rdi, [rax + {rdi}]",
            "mov r8, [rax + {r8}]",
            "mov r9, [rax + {r9}]",
            "mov r10, [rax + {r10}]",
            "mov r11, [rax + {r11}]",
            "mov r12, [rax + {r12}]",
            "mov r13, [rax + {r13}]",
            "mov r14, [rax + {r14}]",
            "mov r15, [rax + {r15}]",
            "mov rax, [rsp]",
            "vmload rax",
            "vmrun rax",
            "vmsave rax",
            "mov rax, [rsp + 16]",
            "mov [rax + {rcx}], rcx",
            "mov [rax + {rdx}], rdx",
            "mov [rax + {rbx}], rbx",
            "mov [rax + {rbp}], rbp",
            "mov [rax + {rsi}], rsi",
            "mov [rax + {rdi}], rdi",
            "mov [rax + {r8}], r8",
            "mov [rax + {r9}], r9",
            "mov [rax + {r10}], r10",
            "mov [rax + {r11}], r11",
            "mov [rax + {r12}], r12",
            "mov [rax + {r13}], r13",
            "mov [rax + {r14}], r14",
            "mov [rax + {r15}], r15",
            "mov rax, [rsp + 8]",
            "vmload rax",
            "stgi",
            "add rsp, 24",
            "pop rbx",
            "pop rbp",
            rcx = const offset_of!(GuestGprs, rcx),
            rdx = const offset_of!(GuestGprs, rdx),
            rbx = const offset_of!(GuestGprs, rbx),
            rbp = const offset_of!(GuestGprs, rbp),
            rsi = const offset_of!(GuestGprs, rsi),
            rdi = const offset_of!(GuestGprs, rdi),
            r8 = const offset_of!(GuestGprs, r8),
            r9 = const offset_of!(GuestGprs, r9),
            r10 = const offset_of!(GuestGprs, r10),
            r11 = const offset_of!(GuestGprs, r11),
            r12 = const offset_of!(GuestGprs, r12),
            r13 = const offset_of!(GuestGprs, r13),
            r14 = const offset_of!(GuestGprs, r14),
            r15 = const offset_of!(GuestGprs, r15),
            inout("rdi") gprs => _,
            inout("rsi") host_vmcb => _,
            inout("rdx") guest_vmcb => _,
            out("rax") _,
            out("rcx") _,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            out("r12") _,
            out("r13") _,
            out("r14") _,
            out("r15") _,
        );
    }
}

impl Vcpu for SvmVcpu {
    fn run(&mut self) -> VmExit {
        let (guest, host) = (self.vmcb.hpa, self.host_vmcb.hpa);
        let gprs: *mut GuestGprs = &mut self.gprs;
        // SAFETY: SvmVcpu::new built both VMCBs and the bitmaps, and the kernel enabled SVM
        // before creating any vCPU; the NPT root was given by the VM owning this vCPU.
        unsafe { world_switch(guest, host, gprs) };
        let vmcb = self.vmcb_mut();
        // One-shot requests: a flush and an injected event apply to one entry only.
        vmcb.control.tlb_control = TlbControl::Nothing as u8;
        vmcb.control.event_inj = 0;
        self.vmcb().exit(&self.gprs)
    }

    fn gpr(&self, reg: Gpr) -> u64 {
        match self.gprs.slot(reg) {
            Some(&value) => value,
            // RAX and RSP, which the VMCB holds.
            None if reg == Gpr::Rax => self.vmcb().save.rax,
            None => self.vmcb().save.rsp,
        }
    }

    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        if let Some(slot) = self.gprs.slot_mut(reg) {
            *slot = value;
        } else if reg == Gpr::Rax {
            self.vmcb_mut().save.rax = value;
        } else {
            self.vmcb_mut().save.rsp = value;
        }
    }

    fn rip(&self) -> u64 {
        self.vmcb().save.rip
    }

    fn set_rip(&mut self, rip: u64) {
        self.vmcb_mut().save.rip = rip;
    }

    fn instruction_len(&self) -> Option<u64> {
        let c = &self.vmcb().control;
        let rip = self.vmcb().save.rip;
        // For IOIO intercepts EXITINFO2 is the next RIP on every SVM CPU (APM 15.10.2); nRIP
        // exists only with NRIPS and reads 0 without it.
        let next = if c.exitcode == super::exit_code::IOIO {
            c.exitinfo2
        } else {
            c.next_rip
        };
        (next > rip && next - rip <= 15).then(|| next - rip)
    }

    fn inject(&mut self, event: &PendingEvent) -> Result<(), VcpuError> {
        inject(self.vmcb_mut(), event).map_err(|_| VcpuError::BadEvent)
    }

    fn set_tsc_offset(&mut self, offset: i64) {
        self.vmcb_mut().control.tsc_offset = offset as u64;
        self.shadow.tsc_offset = offset;
    }

    fn flush_nested_tlb(&mut self) {
        self.vmcb_mut().control.tlb_control = TlbControl::FlushGuest as u8;
    }

    fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let mut state = self.shadow.clone();
        save_to_state(self.vmcb(), &self.gprs, &mut state)
            .map_err(|_| VcpuError::InvalidState("VMCB state"))?;
        state.tsc_offset = self.vmcb().control.tsc_offset as i64;
        Ok(state)
    }

    fn fetch_context(&self) -> Result<FetchContext, VcpuError> {
        Ok(super::state::fetch_context(&self.vmcb().save))
    }

    fn raw_exit(&self) -> [u64; 3] {
        let c = &self.vmcb().control;
        [c.exitcode, c.exitinfo1, c.exitinfo2]
    }

    fn release(self: alloc::boxed::Box<Self>, pages: &mut dyn HostPages) {
        (*self).free_pages(pages);
    }

    fn load_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        let mut gprs = GuestGprs::default();
        load_from_state(self.vmcb_mut(), &mut gprs, state)
            .map_err(|_| VcpuError::InvalidState("not loadable on SVM"))?;
        self.gprs = gprs;
        self.vmcb_mut().control.tsc_offset = state.tsc_offset as u64;
        self.shadow = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;

    /// A guest running with interrupts off must still lose the CPU at the host's timer: host
    /// interrupts exit (INTR intercept) and the guest's IF does not mask them (V_INTR_MASKING).
    /// Without the latter a spinning guest held a node until it exited by itself.
    #[test]
    fn host_interrupts_preempt_a_guest_whatever_its_if() {
        let mut vmcb = Box::new(Vmcb::new());
        set_controls(&mut vmcb, 7, 0x1000, 0x3000);
        assert_ne!(vmcb.control.intercept_misc1 & intercept::misc1::INTR, 0);
        assert_ne!(vmcb.control.intercept_misc1 & intercept::misc1::NMI, 0);
        assert_ne!(vmcb.control.int_ctl & int_ctl::V_INTR_MASKING, 0);
        assert_ne!(vmcb.control.intercept_misc2 & intercept::misc2::VMRUN, 0);
        assert_eq!(vmcb.control.guest_asid, 7);
        assert_eq!(
            (vmcb.control.iopm_base_pa, vmcb.control.msrpm_base_pa),
            (0x1000, 0x3000)
        );
    }
}
