//! Moving a vCPU's state between [`VcpuState`] and a VMCB (plus the GPRs VMRUN does not save).
//!
//! What lives where on SVM (AMD APM vol. 2 15.5 and appendix B):
//!
//! | state | home |
//! |---|---|
//! | RAX, RSP, RIP, RFLAGS, segments, GDTR/IDTR, CR0/2/3/4, EFER, DR6/7, STAR/LSTAR/CSTAR/SFMASK, KernelGSbase, SYSENTER_*, PAT | VMCB state save area (`G_PAT` is the guest PAT because we always use nested paging, APM 15.25.8) |
//! | CR8 | VMCB `V_TPR` (APM 15.21.4: with V_INTR_MASKING the guest's CR8 is the virtual TPR) |
//! | TSC offset, interrupt shadow, injected / interrupted event | VMCB control area |
//! | RBX RCX RDX RSI RDI RBP R8-R15 | [`GuestGprs`], saved and restored by the VMRUN glue |
//! | DR0-DR3, FPU/SSE/XSAVE, XCR0, TSC_AUX, NMI blocking, HLT state | the backend: the VMCB does not hold them; [`save_to_state`] leaves those fields of the `VcpuState` untouched and [`load_from_state`] ignores them |
//!
//! NMI blocking is software state on SVM (without vNMI the hypervisor tracks it by intercepting
//! IRET), and so is "halted" (HLT is intercepted), which is why the backend owns both.

#![forbid(unsafe_code)]

use core::fmt;
use core::mem::{offset_of, size_of};

use super::event::{SvmEvent, SvmEventError, SvmEventType};
use super::vmcb::{int_ctl, int_state, Vmcb, VmcbSegment, VmcbStateSave};
use crate::state::{
    efer, rflags, DescriptorTable, PendingEvent, PendingEventKind, Segment, SegmentAttributes,
    StateError, VcpuState,
};

/// The guest GPRs that VMRUN neither loads nor saves (RAX and RSP are in the VMCB). The VMRUN
/// glue stores and loads them at the offsets asserted below, in x86 register-number order
/// without RAX and RSP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct GuestGprs {
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

const _: () = {
    assert!(offset_of!(GuestGprs, rcx) == 0x00);
    assert!(offset_of!(GuestGprs, rdx) == 0x08);
    assert!(offset_of!(GuestGprs, rbx) == 0x10);
    assert!(offset_of!(GuestGprs, rbp) == 0x18);
    assert!(offset_of!(GuestGprs, rsi) == 0x20);
    assert!(offset_of!(GuestGprs, rdi) == 0x28);
    assert!(offset_of!(GuestGprs, r8) == 0x30);
    assert!(offset_of!(GuestGprs, r15) == 0x68);
    assert!(size_of::<GuestGprs>() == 0x70);
};

crate::vcpu::gpr_block! {
    GuestGprs {
        Rcx => rcx, Rdx => rdx, Rbx => rbx, Rbp => rbp, Rsi => rsi, Rdi => rdi, R8 => r8,
        R9 => r9, R10 => r10, R11 => r11, R12 => r12, R13 => r13, R14 => r14, R15 => r15,
    }
}

/// Why a state could not be moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvmStateError {
    /// EXITINTINFO or EVENTINJ holds a reserved encoding.
    Event(SvmEventError),
    /// The `VcpuState` to load is invalid.
    State(StateError),
}

impl fmt::Display for SvmStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Event(e) => write!(f, "{e}"),
            Self::State(e) => write!(f, "{e}"),
        }
    }
}

impl From<SvmEventError> for SvmStateError {
    fn from(e: SvmEventError) -> Self {
        Self::Event(e)
    }
}

impl From<StateError> for SvmStateError {
    fn from(e: StateError) -> Self {
        Self::State(e)
    }
}

fn to_vmcb_segment(s: &Segment) -> VmcbSegment {
    VmcbSegment {
        selector: s.selector,
        attrib: s.attributes.to_svm(),
        limit: s.limit,
        base: s.base,
    }
}

fn from_vmcb_segment(s: &VmcbSegment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        attributes: SegmentAttributes::from_svm(s.attrib),
    }
}

fn to_vmcb_table(t: &DescriptorTable) -> VmcbSegment {
    VmcbSegment {
        selector: 0,
        attrib: 0,
        limit: u32::from(t.limit),
        base: t.base,
    }
}

/// Queues `ev` in EVENTINJ for the next VMRUN.
///
/// A software interrupt (INT n) returns to the instruction after it, but SVM pushes the VMCB RIP
/// as return address unless NRIPS supplies nRIP (APM 15.20 and 15.7.1), and QEMU TCG has no
/// NRIPS. So RIP is advanced past the instruction here, and nRIP set to the same value for CPUs
/// that use it: the pushed address is right either way.
pub fn inject(vmcb: &mut Vmcb, ev: &PendingEvent) -> Result<(), SvmStateError> {
    ev.validate()?;
    if ev.kind == PendingEventKind::SoftwareInterrupt {
        let next = vmcb.save.rip.wrapping_add(u64::from(ev.instruction_len));
        vmcb.save.rip = next;
        vmcb.control.next_rip = next;
    }
    vmcb.control.event_inj = SvmEvent::from_pending(ev).encode();
    Ok(())
}

/// Loads `state` into the VMCB and `gprs`. See the module documentation for the fields that are
/// not loaded. Clears every VMCB clean bit, since all cached state changed (APM 15.15.3), and
/// EXITINTINFO, so that a stale interrupted event cannot reappear in [`save_to_state`].
pub fn load_from_state(
    vmcb: &mut Vmcb,
    gprs: &mut GuestGprs,
    state: &VcpuState,
) -> Result<(), SvmStateError> {
    state.validate()?;
    let g = &state.gprs;
    *gprs = GuestGprs {
        rcx: g.rcx,
        rdx: g.rdx,
        rbx: g.rbx,
        rbp: g.rbp,
        rsi: g.rsi,
        rdi: g.rdi,
        r8: g.r8,
        r9: g.r9,
        r10: g.r10,
        r11: g.r11,
        r12: g.r12,
        r13: g.r13,
        r14: g.r14,
        r15: g.r15,
    };

    let s = &mut vmcb.save;
    s.rax = g.rax;
    s.rsp = g.rsp;
    s.rip = state.rip;
    s.rflags = state.rflags;
    s.es = to_vmcb_segment(&state.es);
    s.cs = to_vmcb_segment(&state.cs);
    s.ss = to_vmcb_segment(&state.ss);
    s.ds = to_vmcb_segment(&state.ds);
    s.fs = to_vmcb_segment(&state.fs);
    s.gs = to_vmcb_segment(&state.gs);
    s.tr = to_vmcb_segment(&state.tr);
    s.ldtr = to_vmcb_segment(&state.ldtr);
    s.gdtr = to_vmcb_table(&state.gdtr);
    s.idtr = to_vmcb_table(&state.idtr);
    // VMRUN takes CPL from this field, not from SS (APM 15.5.1).
    s.cpl = state.cpl();
    // VMRUN fails with VMEXIT_INVALID if the guest's EFER.SVME is 0 (APM 15.5.1).
    s.efer = state.efer | efer::SVME;
    s.cr0 = state.cr0;
    s.cr2 = state.cr2;
    s.cr3 = state.cr3;
    s.cr4 = state.cr4;
    s.dr6 = state.dr6;
    s.dr7 = state.dr7;
    let m = &state.msrs;
    s.star = m.star;
    s.lstar = m.lstar;
    s.cstar = m.cstar;
    s.sfmask = m.sfmask;
    s.kernel_gs_base = m.kernel_gs_base;
    s.sysenter_cs = m.sysenter_cs;
    s.sysenter_esp = m.sysenter_esp;
    s.sysenter_eip = m.sysenter_eip;
    s.g_pat = m.pat;

    let c = &mut vmcb.control;
    c.tsc_offset = state.tsc_offset as u64;
    c.int_ctl = (c.int_ctl & !int_ctl::V_TPR_MASK) | (state.cr8 as u32 & int_ctl::V_TPR_MASK);
    // SVM has one interrupt-shadow bit for both STI and MOV SS (APM 15.21.5).
    let shadow = state.interruptibility.sti_blocking || state.interruptibility.mov_ss_blocking;
    if shadow {
        c.int_state |= int_state::INTERRUPT_SHADOW;
    } else {
        c.int_state &= !int_state::INTERRUPT_SHADOW;
    }
    c.exitintinfo = 0;
    c.event_inj = 0;
    c.clean = 0;
    if let Some(ev) = &state.pending_event {
        inject(vmcb, ev)?;
    }
    Ok(())
}

/// The fetch context of the guest in `save` (see [`crate::vcpu::Vcpu::fetch_context`]): the
/// fields [`save_to_state`] would put in the state, without copying the rest.
pub fn fetch_context(save: &VmcbStateSave) -> crate::vcpu::FetchContext {
    let cs = SegmentAttributes::from_svm(save.cs.attrib);
    crate::vcpu::FetchContext {
        mode: crate::guest_mem::PagingMode {
            cr0: save.cr0,
            cr3: save.cr3,
            cr4: save.cr4,
            efer: save.efer & !efer::SVME,
        },
        cs_base: save.cs.base,
        long: cs.long,
        db: cs.db,
    }
}

/// Saves what the VMCB and `gprs` hold into `state`, leaving the backend-owned fields (module
/// documentation) as they are.
///
/// - SS.DPL is set to the VMCB CPL: the CPL field is authoritative on SVM (APM 15.5.1) while
///   VMX and the neutral state derive CPL from SS.DPL.
/// - A usable TR with an "available" TSS type gets the busy bit: a loaded TR always refers to a
///   busy TSS (LTR sets it, SDM vol. 3A, "TSS Descriptor"), VMX entry requires it (SDM
///   27.3.1.2), and some AMD processors save the type without it.
/// - The interrupt shadow becomes STI blocking when RFLAGS.IF = 1 and MOV-SS blocking otherwise:
///   VMX refuses STI blocking with IF = 0 (SDM 27.3.1.5), and STI only blocks when it set IF.
/// - The pending event is EXITINTINFO (an event whose delivery the exit interrupted, APM 15.7.2)
///   if valid, else a still-queued EVENTINJ. The backend must therefore clear EVENTINJ after each
///   #VMEXIT (an injected event that was not delivered appears in EXITINTINFO, APM 15.20).
pub fn save_to_state(
    vmcb: &Vmcb,
    gprs: &GuestGprs,
    state: &mut VcpuState,
) -> Result<(), SvmStateError> {
    let s = &vmcb.save;
    let c = &vmcb.control;

    let interrupted = SvmEvent::decode(c.exitintinfo)?;
    let queued = SvmEvent::decode(c.event_inj)?;
    let pending = match (interrupted, queued) {
        (Some(ev), _) => ev.to_pending_after_exit(),
        (None, Some(ev)) => Some(ev.to_pending_queued()),
        (None, None) => None,
    };

    let g = &mut state.gprs;
    g.rax = s.rax;
    g.rsp = s.rsp;
    g.rcx = gprs.rcx;
    g.rdx = gprs.rdx;
    g.rbx = gprs.rbx;
    g.rbp = gprs.rbp;
    g.rsi = gprs.rsi;
    g.rdi = gprs.rdi;
    g.r8 = gprs.r8;
    g.r9 = gprs.r9;
    g.r10 = gprs.r10;
    g.r11 = gprs.r11;
    g.r12 = gprs.r12;
    g.r13 = gprs.r13;
    g.r14 = gprs.r14;
    g.r15 = gprs.r15;
    state.rip = s.rip;
    state.rflags = s.rflags;

    state.es = from_vmcb_segment(&s.es);
    state.cs = from_vmcb_segment(&s.cs);
    state.ss = from_vmcb_segment(&s.ss);
    state.ds = from_vmcb_segment(&s.ds);
    state.fs = from_vmcb_segment(&s.fs);
    state.gs = from_vmcb_segment(&s.gs);
    state.tr = from_vmcb_segment(&s.tr);
    state.ldtr = from_vmcb_segment(&s.ldtr);
    state.ss.attributes.dpl = s.cpl & 3;
    let tr = &mut state.tr.attributes;
    if !tr.unusable && !tr.s && (tr.seg_type == 1 || tr.seg_type == 9) {
        tr.seg_type |= 2;
    }
    state.gdtr = DescriptorTable {
        base: s.gdtr.base,
        limit: s.gdtr.limit as u16,
    };
    state.idtr = DescriptorTable {
        base: s.idtr.base,
        limit: s.idtr.limit as u16,
    };

    state.cr0 = s.cr0;
    state.cr2 = s.cr2;
    state.cr3 = s.cr3;
    state.cr4 = s.cr4;
    state.cr8 = u64::from(c.int_ctl & int_ctl::V_TPR_MASK);
    state.efer = s.efer & !efer::SVME;
    state.dr6 = s.dr6;
    state.dr7 = s.dr7;

    let m = &mut state.msrs;
    m.star = s.star;
    m.lstar = s.lstar;
    m.cstar = s.cstar;
    m.sfmask = s.sfmask;
    m.kernel_gs_base = s.kernel_gs_base;
    m.sysenter_cs = s.sysenter_cs;
    m.sysenter_esp = s.sysenter_esp;
    m.sysenter_eip = s.sysenter_eip;
    m.pat = s.g_pat;
    state.tsc_offset = c.tsc_offset as i64;

    let shadow = c.int_state & int_state::INTERRUPT_SHADOW != 0;
    let if_set = s.rflags & rflags::IF != 0;
    state.interruptibility.sti_blocking = shadow && if_set;
    state.interruptibility.mov_ss_blocking = shadow && !if_set;
    state.pending_event = pending;
    Ok(())
}

/// Whether an EVENTINJ value queues a software interrupt (for callers that keep their own
/// injection bookkeeping).
pub fn queued_software_interrupt(vmcb: &Vmcb) -> bool {
    matches!(
        SvmEvent::decode(vmcb.control.event_inj),
        Ok(Some(SvmEvent {
            event_type: SvmEventType::Software,
            ..
        }))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::busy_state;
    use crate::state::{ActivityState, FpuState, Interruptibility};
    use alloc::boxed::Box;

    /// A target state whose VMCB-held fields are all garbage but whose backend-owned fields
    /// match `s`, so a correct save makes it equal to `s`.
    fn target_for(s: &VcpuState) -> VcpuState {
        let mut t = VcpuState::reset_64bit(0xBAD, 0xBAD, 0xBAD);
        t.gprs = crate::state::Gprs::from_array([0xBAD; 16]);
        t.cr2 = 0xBAD;
        t.pending_event = Some(PendingEvent {
            kind: PendingEventKind::Nmi,
            vector: 2,
            error_code: None,
            instruction_len: 0,
        });
        t.dr = s.dr;
        t.fpu = s.fpu.clone();
        t.msrs.tsc_aux = s.msrs.tsc_aux;
        t.interruptibility.nmi_blocked = s.interruptibility.nmi_blocked;
        t.activity = s.activity;
        t
    }

    /// `busy_state` adjusted to what SVM can express exactly (one shadow bit: STI when IF = 1).
    fn svm_exact_state() -> VcpuState {
        let mut s = busy_state();
        s.interruptibility = Interruptibility {
            sti_blocking: true,
            mov_ss_blocking: false,
            nmi_blocked: true,
        };
        s
    }

    #[test]
    fn fetch_context_matches_the_saved_state() {
        for state in [
            VcpuState::reset_64bit(0x10_0000, 0x8000, 0x2000),
            busy_state(),
        ] {
            let mut v = Box::new(Vmcb::new());
            let mut g = GuestGprs::default();
            load_from_state(&mut v, &mut g, &state).unwrap();
            let mut saved = state.clone();
            save_to_state(&v, &g, &mut saved).unwrap();
            let ctx = fetch_context(&v.save);
            assert_eq!(ctx.mode.cr0, saved.cr0);
            assert_eq!(ctx.mode.cr3, saved.cr3);
            assert_eq!(ctx.mode.cr4, saved.cr4);
            assert_eq!(ctx.mode.efer, saved.efer);
            assert_eq!(ctx.cs_base, saved.cs.base);
            assert_eq!(
                (ctx.long, ctx.db),
                (saved.cs.attributes.long, saved.cs.attributes.db)
            );
        }
    }

    #[test]
    fn reset_state_loads_as_apm_expects() {
        let s = VcpuState::reset_64bit(0x10_0000, 0x8000, 0x2000);
        let mut v = Box::new(Vmcb::new());
        v.control.clean = u32::MAX;
        v.control.exitintinfo = 0x8000_0030;
        let mut g = GuestGprs::default();
        load_from_state(&mut v, &mut g, &s).unwrap();
        assert_eq!(v.save.rip, 0x10_0000);
        assert_eq!(v.save.rsp, 0x8000);
        assert_eq!(v.save.cr3, 0x2000);
        assert_eq!(v.save.efer, efer::LME | efer::LMA | efer::SVME);
        assert_eq!(v.save.cs.attrib, 0x0A9B);
        assert_eq!(v.save.ss.attrib, 0x0C93);
        assert_eq!(v.save.tr.attrib, 0x008B);
        assert_eq!(v.save.ldtr.attrib & 0x80, 0, "null LDTR is not present");
        assert_eq!(v.save.cpl, 0);
        assert_eq!(v.save.g_pat, crate::state::PAT_POWER_ON);
        assert_eq!(v.control.clean, 0);
        assert_eq!(v.control.exitintinfo, 0);
        assert_eq!(v.control.event_inj, 0);
    }

    #[test]
    fn load_then_save_round_trips() {
        for s in [VcpuState::reset_64bit(1, 2, 3), svm_exact_state()] {
            let mut v = Box::new(Vmcb::new());
            let mut g = GuestGprs::default();
            load_from_state(&mut v, &mut g, &s).unwrap();
            let mut out = target_for(&s);
            save_to_state(&v, &g, &mut out).unwrap();
            assert_eq!(out, s);
        }
    }

    #[test]
    fn save_leaves_backend_fields_alone() {
        let s = svm_exact_state();
        let mut v = Box::new(Vmcb::new());
        let mut g = GuestGprs::default();
        load_from_state(&mut v, &mut g, &s).unwrap();
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        out.dr = [9, 9, 9, 9];
        out.activity = ActivityState::Halted;
        out.interruptibility.nmi_blocked = true;
        out.msrs.tsc_aux = 77;
        save_to_state(&v, &g, &mut out).unwrap();
        assert_eq!(out.dr, [9, 9, 9, 9]);
        assert_eq!(out.activity, ActivityState::Halted);
        assert!(out.interruptibility.nmi_blocked);
        assert_eq!(out.msrs.tsc_aux, 77);
        assert_eq!(out.fpu, FpuState::reset());
    }

    #[test]
    fn efer_svme_is_hidden_from_the_neutral_state() {
        let mut v = Box::new(Vmcb::new());
        v.save.efer = efer::SVME | efer::LME | efer::LMA | efer::NXE;
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(out.efer, efer::LME | efer::LMA | efer::NXE);
    }

    #[test]
    fn cpl_field_is_authoritative_for_ss_dpl() {
        let mut v = Box::new(Vmcb::new());
        v.save.ss.attrib = 0x0C93; // DPL 0
        v.save.cpl = 3;
        v.save.cr0 = crate::state::cr0::PE;
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(out.ss.attributes.dpl, 3);
        assert_eq!(out.cpl(), 3);
    }

    #[test]
    fn available_tss_is_saved_busy() {
        let mut v = Box::new(Vmcb::new());
        v.save.tr.attrib = 0x0089;
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(out.tr.attributes.seg_type, 0xB);
        assert_eq!(out.tr.attributes.to_vmx(), 0x008B);
    }

    #[test]
    fn interrupt_shadow_maps_by_if() {
        let mut v = Box::new(Vmcb::new());
        v.control.int_state = int_state::INTERRUPT_SHADOW;
        v.save.rflags = rflags::FIXED;
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert!(out.interruptibility.mov_ss_blocking && !out.interruptibility.sti_blocking);
        v.save.rflags |= rflags::IF;
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert!(out.interruptibility.sti_blocking && !out.interruptibility.mov_ss_blocking);
        // Loading either kind sets the one SVM bit.
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.interruptibility.mov_ss_blocking = true;
        load_from_state(&mut v, &mut GuestGprs::default(), &s).unwrap();
        assert_eq!(v.control.int_state & int_state::INTERRUPT_SHADOW, 1);
        s.interruptibility.mov_ss_blocking = false;
        load_from_state(&mut v, &mut GuestGprs::default(), &s).unwrap();
        assert_eq!(v.control.int_state & int_state::INTERRUPT_SHADOW, 0);
    }

    #[test]
    fn cr8_is_v_tpr_and_other_int_ctl_bits_survive() {
        let mut v = Box::new(Vmcb::new());
        v.control.int_ctl = int_ctl::V_INTR_MASKING | 0x3;
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.cr8 = 0xA;
        load_from_state(&mut v, &mut GuestGprs::default(), &s).unwrap();
        assert_eq!(v.control.int_ctl, int_ctl::V_INTR_MASKING | 0xA);
    }

    #[test]
    fn interrupted_event_wins_over_queued_one() {
        let mut v = Box::new(Vmcb::new());
        v.control.exitintinfo = 0x0000_0000_8000_0041; // external interrupt 41h
        v.control.event_inj = 0x8000_0202; // NMI
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(
            out.pending_event,
            Some(PendingEvent {
                kind: PendingEventKind::ExternalInterrupt,
                vector: 0x41,
                error_code: None,
                instruction_len: 0
            })
        );
        v.control.exitintinfo = 0;
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(
            out.pending_event.map(|e| e.kind),
            Some(PendingEventKind::Nmi)
        );
    }

    #[test]
    fn interrupted_software_interrupt_is_re_executed() {
        let mut v = Box::new(Vmcb::new());
        v.control.exitintinfo = 0x8000_0480; // INT 80h
        v.save.rip = 0x4000;
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(out.pending_event, None);
        assert_eq!(out.rip, 0x4000);
    }

    #[test]
    fn queued_software_interrupt_advances_rip_once() {
        let mut s = VcpuState::reset_64bit(0x4000, 0, 0);
        s.pending_event = Some(PendingEvent {
            kind: PendingEventKind::SoftwareInterrupt,
            vector: 0x80,
            error_code: None,
            instruction_len: 2,
        });
        let mut v = Box::new(Vmcb::new());
        let mut g = GuestGprs::default();
        load_from_state(&mut v, &mut g, &s).unwrap();
        assert_eq!(v.save.rip, 0x4002);
        assert_eq!(v.control.next_rip, 0x4002);
        assert!(queued_software_interrupt(&v));
        // Saved again before running: same return address, expressed with length 0.
        let mut out = target_for(&s);
        save_to_state(&v, &g, &mut out).unwrap();
        assert_eq!(out.rip, 0x4002);
        assert_eq!(
            out.pending_event.map(|e| (e.kind, e.instruction_len)),
            Some((PendingEventKind::SoftwareInterrupt, 0))
        );
        // And loading that does not advance again.
        load_from_state(&mut v, &mut g, &out).unwrap();
        assert_eq!(v.save.rip, 0x4002);
    }

    #[test]
    fn reserved_event_encodings_are_errors() {
        let mut v = Box::new(Vmcb::new());
        v.control.exitintinfo = 0x8000_0500;
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        assert_eq!(
            save_to_state(&v, &GuestGprs::default(), &mut out),
            Err(SvmStateError::Event(SvmEventError::ReservedType(5)))
        );
    }

    #[test]
    fn invalid_state_is_not_loaded() {
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.cs.attributes.dpl = 4;
        let mut v = Box::new(Vmcb::new());
        assert!(matches!(
            load_from_state(&mut v, &mut GuestGprs::default(), &s),
            Err(SvmStateError::State(_))
        ));
    }
}
