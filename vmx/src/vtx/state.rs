//! Moving a vCPU's state between [`VcpuState`] and the VMCS guest-state area (plus the GPRs VM
//! entry does not load).
//!
//! What lives where on VMX (Intel SDM vol. 3C 25.4 "Guest-State Area"):
//!
//! | state | home |
//! |---|---|
//! | RSP, RIP, RFLAGS, segments, GDTR/IDTR, CR0/3/4, DR7, EFER, PAT, SYSENTER_*, interruptibility, activity | VMCS guest-state area (EFER and PAT need the "save/load IA32_EFER/PAT" exit and entry controls) |
//! | TSC offset, CR0/CR4 guest/host masks and read shadows, event injection | VMCS control fields |
//! | RAX RBX RCX RDX RSI RDI RBP R8-R15 | [`GuestGprs`], saved and restored by the VMLAUNCH/VMRESUME glue |
//! | CR2, CR8, DR0-DR3, DR6, STAR/LSTAR/CSTAR/SFMASK, KernelGSbase, TSC_AUX, FPU/SSE/XSAVE, XCR0 | the backend: VM entry and exit do not switch them (CR8 with a TPR shadow lives in the virtual-APIC page); [`save_to_state`] leaves them untouched, [`load_from_state`] ignores them |
//!
//! Event protocol: after every VM exit the glue calls [`reinject_after_exit`], which moves an
//! event whose delivery the exit interrupted (IDT-vectoring information) into the VM-entry
//! interruption information. [`save_to_state`] then reads only the VM-entry fields, whose valid
//! bit the CPU clears on every exit (SDM 28.2), so it never sees stale data.

#![forbid(unsafe_code)]

use core::fmt;
use core::mem::{offset_of, size_of};

use super::controls::entry;
use super::exit::interruption;
use super::vmcs::{field, VmcsAccessError, VmcsRead, VmcsWrite};
use crate::state::{
    cr0, rflags, ActivityState, DescriptorTable, PendingEvent, PendingEventKind, Segment,
    SegmentAttributes, StateError, VcpuState,
};

/// The guest GPRs VM entry/exit do not switch (RSP is in the VMCS). The VMLAUNCH/VMRESUME glue
/// stores and loads them at the offsets asserted below, in x86 register-number order without RSP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct GuestGprs {
    pub rax: u64,
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
    assert!(offset_of!(GuestGprs, rax) == 0x00);
    assert!(offset_of!(GuestGprs, rcx) == 0x08);
    assert!(offset_of!(GuestGprs, rdx) == 0x10);
    assert!(offset_of!(GuestGprs, rbx) == 0x18);
    assert!(offset_of!(GuestGprs, rbp) == 0x20);
    assert!(offset_of!(GuestGprs, rsi) == 0x28);
    assert!(offset_of!(GuestGprs, rdi) == 0x30);
    assert!(offset_of!(GuestGprs, r8) == 0x38);
    assert!(offset_of!(GuestGprs, r15) == 0x70);
    assert!(size_of::<GuestGprs>() == 0x78);
};

crate::vcpu::gpr_block! {
    GuestGprs {
        Rax => rax, Rcx => rcx, Rdx => rdx, Rbx => rbx, Rbp => rbp, Rsi => rsi, Rdi => rdi,
        R8 => r8, R9 => r9, R10 => r10, R11 => r11, R12 => r12, R13 => r13, R14 => r14,
        R15 => r15,
    }
}

/// Guest-state interruptibility bits (SDM 25.4.2 table 25-3).
pub mod interruptibility {
    pub const BLOCKING_BY_STI: u64 = 1 << 0;
    pub const BLOCKING_BY_MOV_SS: u64 = 1 << 1;
    pub const BLOCKING_BY_SMI: u64 = 1 << 2;
    pub const BLOCKING_BY_NMI: u64 = 1 << 3;
}

/// Guest activity states (SDM 25.4.2).
pub mod activity {
    pub const ACTIVE: u64 = 0;
    pub const HLT: u64 = 1;
    pub const SHUTDOWN: u64 = 2;
    pub const WAIT_FOR_SIPI: u64 = 3;
}

/// Pending debug exceptions bit 14 (BS): a single-step trap is pending.
pub const PENDING_DBG_BS: u64 = 1 << 14;

/// What [`load_from_state`] needs to know about the CPU and the chosen controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxLoadOptions {
    /// IA32_VMX_CR0_FIXED0: CR0 bits that must be 1 in VMX operation (SDM A.7).
    pub cr0_fixed0: u64,
    /// IA32_VMX_CR0_FIXED1: CR0 bits that may be 1.
    pub cr0_fixed1: u64,
    /// IA32_VMX_CR4_FIXED0 (A.8).
    pub cr4_fixed0: u64,
    /// IA32_VMX_CR4_FIXED1.
    pub cr4_fixed1: u64,
    /// The "unrestricted guest" control is on: CR0.PE and CR0.PG are exempt from CR0_FIXED0
    /// (SDM 27.3.1.1), so real mode and unpaged protected mode can run.
    pub unrestricted_guest: bool,
    /// IA32_VMX_MISC bit 30: software interrupts may be injected with instruction length 0.
    pub zero_length_injection: bool,
}

/// Why a state could not be moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmxStateError {
    /// VMREAD or VMWRITE failed.
    Access(VmcsAccessError),
    /// The `VcpuState` to load is invalid.
    State(StateError),
    /// The guest is in an activity state the neutral state has no name for (shutdown,
    /// wait-for-SIPI).
    UnsupportedActivity(u64),
    /// VM-entry interruption information holding an event type the neutral state does not
    /// carry (a reserved type, or a software exception the hypervisor queued itself).
    UnsupportedEvent(u32),
    /// A software interrupt with instruction length 0, which this CPU cannot inject
    /// (IA32_VMX_MISC bit 30 clear, SDM 27.2.1.3).
    ZeroLengthSoftwareInterrupt,
    /// An exception whose error-code presence is not what VM entry requires for its vector
    /// (SDM 27.2.1.3: deliver-error-code iff #DF, #TS, #NP, #SS, #GP, #PF, #AC or #CP in
    /// protected mode).
    ErrorCodeMismatch { vector: u8 },
    /// CR0.PE or CR0.PG is 0 but unrestricted guest is off: VMX cannot run that mode.
    NeedsUnrestrictedGuest { cr0: u64 },
}

impl fmt::Display for VmxStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Access(e) => write!(f, "{e}"),
            Self::State(e) => write!(f, "{e}"),
            Self::UnsupportedActivity(a) => {
                write!(f, "guest activity state {a} cannot be saved")
            }
            Self::UnsupportedEvent(info) => {
                write!(f, "queued VMX event {info:#x} cannot be saved")
            }
            Self::ZeroLengthSoftwareInterrupt => {
                f.write_str("this CPU cannot inject a software interrupt with instruction length 0")
            }
            Self::ErrorCodeMismatch { vector } => write!(
                f,
                "exception {vector}: error code presence does not match the vector"
            ),
            Self::NeedsUnrestrictedGuest { cr0 } => write!(
                f,
                "guest CR0 {cr0:#x} (real mode or paging off) needs the unrestricted-guest control"
            ),
        }
    }
}

impl From<VmcsAccessError> for VmxStateError {
    fn from(e: VmcsAccessError) -> Self {
        Self::Access(e)
    }
}

impl From<StateError> for VmxStateError {
    fn from(e: StateError) -> Self {
        Self::State(e)
    }
}

/// Selector, limit, access-rights and base fields of ES, CS, SS, DS, FS, GS, LDTR, TR.
const SEGMENT_FIELDS: [(u32, u32, u32, u32); 8] = [
    (
        field::GUEST_ES_SELECTOR,
        field::GUEST_ES_LIMIT,
        field::GUEST_ES_AR,
        field::GUEST_ES_BASE,
    ),
    (
        field::GUEST_CS_SELECTOR,
        field::GUEST_CS_LIMIT,
        field::GUEST_CS_AR,
        field::GUEST_CS_BASE,
    ),
    (
        field::GUEST_SS_SELECTOR,
        field::GUEST_SS_LIMIT,
        field::GUEST_SS_AR,
        field::GUEST_SS_BASE,
    ),
    (
        field::GUEST_DS_SELECTOR,
        field::GUEST_DS_LIMIT,
        field::GUEST_DS_AR,
        field::GUEST_DS_BASE,
    ),
    (
        field::GUEST_FS_SELECTOR,
        field::GUEST_FS_LIMIT,
        field::GUEST_FS_AR,
        field::GUEST_FS_BASE,
    ),
    (
        field::GUEST_GS_SELECTOR,
        field::GUEST_GS_LIMIT,
        field::GUEST_GS_AR,
        field::GUEST_GS_BASE,
    ),
    (
        field::GUEST_LDTR_SELECTOR,
        field::GUEST_LDTR_LIMIT,
        field::GUEST_LDTR_AR,
        field::GUEST_LDTR_BASE,
    ),
    (
        field::GUEST_TR_SELECTOR,
        field::GUEST_TR_LIMIT,
        field::GUEST_TR_AR,
        field::GUEST_TR_BASE,
    ),
];

fn segments(state: &VcpuState) -> [Segment; 8] {
    [
        state.es, state.cs, state.ss, state.ds, state.fs, state.gs, state.ldtr, state.tr,
    ]
}

fn set_segment(state: &mut VcpuState, index: usize, seg: Segment) {
    match index {
        0 => state.es = seg,
        1 => state.cs = seg,
        2 => state.ss = seg,
        3 => state.ds = seg,
        4 => state.fs = seg,
        5 => state.gs = seg,
        6 => state.ldtr = seg,
        _ => state.tr = seg,
    }
}

/// The real CR value and the guest/host mask for a guest-visible `value` (SDM 25.6.6): bits the
/// CPU forces (FIXED0 = 1 or FIXED1 = 0) are owned by the host, so guest reads of them come from
/// the read shadow and show the guest's own value. Bits 63:32 of CR0/CR4 are reserved anyway and
/// left out of the mask.
fn forced_cr(value: u64, fixed0: u64, fixed1: u64) -> (u64, u64) {
    let real = (value | fixed0) & fixed1;
    let mask = (fixed0 | !fixed1) & 0xFFFF_FFFF;
    (real, mask)
}

/// Vectors for which VMX requires an error code on injection of a hardware exception
/// (SDM 27.2.1.3): #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP.
const fn vmx_exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21)
}

/// The VM-entry interruption information (and error code, instruction length) for `ev`:
/// what [`load_from_state`] writes for a pending event, and the VMX glue for an injection.
pub fn entry_event(
    ev: &PendingEvent,
    protected_mode: bool,
    opts: &VmxLoadOptions,
) -> Result<(u32, Option<u32>, u32), VmxStateError> {
    let (ty, len) = match ev.kind {
        PendingEventKind::ExternalInterrupt => (interruption::TYPE_EXTERNAL, 0),
        PendingEventKind::Nmi => (interruption::TYPE_NMI, 0),
        PendingEventKind::Exception => {
            let needed = protected_mode && vmx_exception_has_error_code(ev.vector);
            if needed != ev.error_code.is_some() {
                return Err(VmxStateError::ErrorCodeMismatch { vector: ev.vector });
            }
            (interruption::TYPE_HARDWARE_EXCEPTION, 0)
        }
        PendingEventKind::SoftwareInterrupt => {
            if ev.instruction_len == 0 && !opts.zero_length_injection {
                return Err(VmxStateError::ZeroLengthSoftwareInterrupt);
            }
            (
                interruption::TYPE_SOFTWARE_INTERRUPT,
                u32::from(ev.instruction_len),
            )
        }
    };
    let mut info = u32::from(ev.vector) | ty << interruption::TYPE_SHIFT | interruption::VALID;
    if ev.error_code.is_some() {
        info |= interruption::ERROR_CODE_VALID;
    }
    Ok((info, ev.error_code, len))
}

/// Loads `state` into the current VMCS and `gprs`. See the module documentation for what is not
/// loaded. Besides the guest-state area it writes the CR0/CR4 masks and read shadows, the TSC
/// offset, the VM-entry event fields, and the "IA-32e mode guest" entry control (which must
/// equal EFER.LMA, SDM 27.2.1.3), keeping the other entry controls.
///
/// Normalisations VM entry needs (SDM 27.3.1):
/// - An unusable TR is written as a usable busy TSS (type 11 in IA-32e mode, 3 otherwise):
///   VMX requires a usable TR, and a guest can only observe TR's hidden attributes through a
///   task switch. This happens for states saved on SVM before the guest loaded TR.
/// - Pending debug exceptions: BS is set exactly when STI/MOV-SS blocking or HLT coincide with
///   RFLAGS.TF (27.3.1.5, assuming IA32_DEBUGCTL.BTF = 0); other pending debug state is not part
///   of the neutral state.
pub fn load_from_state<V: VmcsRead + VmcsWrite>(
    vmcs: &mut V,
    gprs: &mut GuestGprs,
    state: &VcpuState,
    opts: &VmxLoadOptions,
) -> Result<(), VmxStateError> {
    state.validate()?;
    let mut cr0_fixed0 = opts.cr0_fixed0;
    if opts.unrestricted_guest {
        cr0_fixed0 &= !(cr0::PE | cr0::PG);
    }
    if cr0_fixed0 & (cr0::PE | cr0::PG) & !state.cr0 != 0 {
        return Err(VmxStateError::NeedsUnrestrictedGuest { cr0: state.cr0 });
    }
    let protected_mode = state.cr0 & cr0::PE != 0;
    let event = match &state.pending_event {
        Some(ev) => Some(entry_event(ev, protected_mode, opts)?),
        None => None,
    };

    let g = &state.gprs;
    *gprs = GuestGprs {
        rax: g.rax,
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
    vmcs.write(field::GUEST_RSP, g.rsp)?;
    vmcs.write(field::GUEST_RIP, state.rip)?;
    vmcs.write(field::GUEST_RFLAGS, state.rflags)?;

    let ia32e = state.efer & crate::state::efer::LMA != 0;
    for (i, seg) in segments(state).iter().enumerate() {
        let (sel, limit, ar, base) = SEGMENT_FIELDS[i];
        let mut attributes = seg.attributes;
        if i == 7 && attributes.unusable {
            attributes = SegmentAttributes {
                seg_type: if ia32e { 11 } else { 3 },
                present: true,
                unusable: false,
                ..SegmentAttributes::default()
            };
        }
        vmcs.write(sel, u64::from(seg.selector))?;
        vmcs.write(limit, u64::from(seg.limit))?;
        vmcs.write(ar, u64::from(attributes.to_vmx()))?;
        vmcs.write(base, seg.base)?;
    }
    vmcs.write(field::GUEST_GDTR_BASE, state.gdtr.base)?;
    vmcs.write(field::GUEST_GDTR_LIMIT, u64::from(state.gdtr.limit))?;
    vmcs.write(field::GUEST_IDTR_BASE, state.idtr.base)?;
    vmcs.write(field::GUEST_IDTR_LIMIT, u64::from(state.idtr.limit))?;

    let (real_cr0, cr0_mask) = forced_cr(state.cr0, cr0_fixed0, opts.cr0_fixed1);
    vmcs.write(field::GUEST_CR0, real_cr0)?;
    vmcs.write(field::CR0_GUEST_HOST_MASK, cr0_mask)?;
    vmcs.write(field::CR0_READ_SHADOW, state.cr0)?;
    let (real_cr4, cr4_mask) = forced_cr(state.cr4, opts.cr4_fixed0, opts.cr4_fixed1);
    vmcs.write(field::GUEST_CR4, real_cr4)?;
    vmcs.write(field::CR4_GUEST_HOST_MASK, cr4_mask)?;
    vmcs.write(field::CR4_READ_SHADOW, state.cr4)?;
    vmcs.write(field::GUEST_CR3, state.cr3)?;
    vmcs.write(field::GUEST_DR7, state.dr7)?;
    vmcs.write(field::GUEST_IA32_EFER, state.efer)?;
    vmcs.write(field::GUEST_IA32_PAT, state.msrs.pat)?;
    vmcs.write(field::GUEST_IA32_SYSENTER_CS, state.msrs.sysenter_cs)?;
    vmcs.write(field::GUEST_IA32_SYSENTER_ESP, state.msrs.sysenter_esp)?;
    vmcs.write(field::GUEST_IA32_SYSENTER_EIP, state.msrs.sysenter_eip)?;
    vmcs.write(field::TSC_OFFSET, state.tsc_offset as u64)?;

    let entry_controls = vmcs.read(field::VM_ENTRY_CONTROLS)?;
    let entry_controls = if ia32e {
        entry_controls | u64::from(entry::IA32E_MODE_GUEST)
    } else {
        entry_controls & !u64::from(entry::IA32E_MODE_GUEST)
    };
    vmcs.write(field::VM_ENTRY_CONTROLS, entry_controls)?;

    let i = &state.interruptibility;
    let mut bits = 0;
    if i.sti_blocking {
        bits |= interruptibility::BLOCKING_BY_STI;
    }
    if i.mov_ss_blocking {
        bits |= interruptibility::BLOCKING_BY_MOV_SS;
    }
    if i.nmi_blocked {
        bits |= interruptibility::BLOCKING_BY_NMI;
    }
    vmcs.write(field::GUEST_INTERRUPTIBILITY_STATE, bits)?;
    let halted = state.activity == ActivityState::Halted;
    vmcs.write(
        field::GUEST_ACTIVITY_STATE,
        if halted {
            activity::HLT
        } else {
            activity::ACTIVE
        },
    )?;
    let single_step = state.rflags & rflags::TF != 0;
    let shadowed = i.sti_blocking || i.mov_ss_blocking || halted;
    vmcs.write(
        field::GUEST_PENDING_DBG_EXCEPTIONS,
        if single_step && shadowed {
            PENDING_DBG_BS
        } else {
            0
        },
    )?;

    match event {
        Some((info, error_code, len)) => {
            vmcs.write(
                field::VM_ENTRY_EXCEPTION_ERROR_CODE,
                u64::from(error_code.unwrap_or(0)),
            )?;
            vmcs.write(field::VM_ENTRY_INSTRUCTION_LEN, u64::from(len))?;
            vmcs.write(field::VM_ENTRY_INTERRUPTION_INFO, u64::from(info))?;
        }
        None => vmcs.write(field::VM_ENTRY_INTERRUPTION_INFO, 0)?,
    }
    Ok(())
}

/// Saves what the VMCS and `gprs` hold into `state`, leaving the backend-owned fields (module
/// documentation) as they are. CR0 and CR4 are what the guest sees: host-owned bits come from
/// the read shadows (SDM 25.6.6). The pending event is the VM-entry interruption information
/// (see the event protocol in the module documentation).
///
/// On error `state` is unchanged: the values are collected into a copy first.
pub fn save_to_state(
    vmcs: &impl VmcsRead,
    gprs: &GuestGprs,
    state: &mut VcpuState,
) -> Result<(), VmxStateError> {
    let mut next = state.clone();
    save_into(vmcs, gprs, &mut next)?;
    *state = next;
    Ok(())
}

fn save_into(
    vmcs: &impl VmcsRead,
    gprs: &GuestGprs,
    state: &mut VcpuState,
) -> Result<(), VmxStateError> {
    let act = vmcs.read(field::GUEST_ACTIVITY_STATE)?;
    let activity_state = match act {
        activity::ACTIVE => ActivityState::Active,
        activity::HLT => ActivityState::Halted,
        other => return Err(VmxStateError::UnsupportedActivity(other)),
    };
    let info = vmcs.read(field::VM_ENTRY_INTERRUPTION_INFO)? as u32;
    let pending_event = if info & interruption::VALID != 0 {
        let vector = (info & interruption::VECTOR_MASK) as u8;
        let kind = match interruption::kind(info) {
            interruption::TYPE_EXTERNAL => PendingEventKind::ExternalInterrupt,
            interruption::TYPE_NMI => PendingEventKind::Nmi,
            interruption::TYPE_HARDWARE_EXCEPTION => PendingEventKind::Exception,
            interruption::TYPE_SOFTWARE_INTERRUPT => PendingEventKind::SoftwareInterrupt,
            _ => return Err(VmxStateError::UnsupportedEvent(info)),
        };
        let error_code = if info & interruption::ERROR_CODE_VALID != 0 {
            Some(vmcs.read(field::VM_ENTRY_EXCEPTION_ERROR_CODE)? as u32)
        } else {
            None
        };
        let instruction_len = if kind == PendingEventKind::SoftwareInterrupt {
            vmcs.read(field::VM_ENTRY_INSTRUCTION_LEN)? as u8
        } else {
            0
        };
        let ev = PendingEvent {
            kind,
            vector,
            error_code,
            instruction_len,
        };
        ev.validate()?;
        Some(ev)
    } else {
        None
    };

    let g = &mut state.gprs;
    g.rax = gprs.rax;
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
    g.rsp = vmcs.read(field::GUEST_RSP)?;
    state.rip = vmcs.read(field::GUEST_RIP)?;
    state.rflags = vmcs.read(field::GUEST_RFLAGS)?;

    for (i, &(sel, limit, ar, base)) in SEGMENT_FIELDS.iter().enumerate() {
        let seg = Segment {
            selector: vmcs.read(sel)? as u16,
            limit: vmcs.read(limit)? as u32,
            attributes: SegmentAttributes::from_vmx(vmcs.read(ar)? as u32),
            base: vmcs.read(base)?,
        };
        set_segment(state, i, seg);
    }
    state.gdtr = DescriptorTable {
        base: vmcs.read(field::GUEST_GDTR_BASE)?,
        limit: vmcs.read(field::GUEST_GDTR_LIMIT)? as u16,
    };
    state.idtr = DescriptorTable {
        base: vmcs.read(field::GUEST_IDTR_BASE)?,
        limit: vmcs.read(field::GUEST_IDTR_LIMIT)? as u16,
    };

    let visible = |real: u64, mask: u64, shadow: u64| (real & !mask) | (shadow & mask);
    state.cr0 = visible(
        vmcs.read(field::GUEST_CR0)?,
        vmcs.read(field::CR0_GUEST_HOST_MASK)?,
        vmcs.read(field::CR0_READ_SHADOW)?,
    );
    state.cr4 = visible(
        vmcs.read(field::GUEST_CR4)?,
        vmcs.read(field::CR4_GUEST_HOST_MASK)?,
        vmcs.read(field::CR4_READ_SHADOW)?,
    );
    state.cr3 = vmcs.read(field::GUEST_CR3)?;
    state.dr7 = vmcs.read(field::GUEST_DR7)?;
    state.efer = vmcs.read(field::GUEST_IA32_EFER)?;
    state.msrs.pat = vmcs.read(field::GUEST_IA32_PAT)?;
    state.msrs.sysenter_cs = vmcs.read(field::GUEST_IA32_SYSENTER_CS)?;
    state.msrs.sysenter_esp = vmcs.read(field::GUEST_IA32_SYSENTER_ESP)?;
    state.msrs.sysenter_eip = vmcs.read(field::GUEST_IA32_SYSENTER_EIP)?;
    state.tsc_offset = vmcs.read(field::TSC_OFFSET)? as i64;

    let bits = vmcs.read(field::GUEST_INTERRUPTIBILITY_STATE)?;
    state.interruptibility.sti_blocking = bits & interruptibility::BLOCKING_BY_STI != 0;
    state.interruptibility.mov_ss_blocking = bits & interruptibility::BLOCKING_BY_MOV_SS != 0;
    state.interruptibility.nmi_blocked = bits & interruptibility::BLOCKING_BY_NMI != 0;
    state.activity = activity_state;
    state.pending_event = pending_event;
    Ok(())
}

/// After a VM exit: if the exit interrupted the delivery of an event (IDT-vectoring information
/// valid, SDM 28.2.4 "Information for VM Exits During Event Delivery"), queue it again in
/// the VM-entry interruption information (with its error code) and return it.
///
/// Software interrupts and software exceptions (types 4-6) are not re-queued: the guest RIP still
/// points at the INT n / INT3 / INTO / INT1 instruction, so resuming executes it again and raises
/// the same event, the same rule the SVM backend follows.
pub fn reinject_after_exit<V: VmcsRead + VmcsWrite>(
    vmcs: &mut V,
) -> Result<Option<PendingEvent>, VmxStateError> {
    let info = vmcs.read(field::IDT_VECTORING_INFO)? as u32;
    if info & interruption::VALID == 0 {
        return Ok(None);
    }
    let vector = (info & interruption::VECTOR_MASK) as u8;
    let kind = match interruption::kind(info) {
        interruption::TYPE_EXTERNAL => PendingEventKind::ExternalInterrupt,
        interruption::TYPE_NMI => PendingEventKind::Nmi,
        interruption::TYPE_HARDWARE_EXCEPTION => PendingEventKind::Exception,
        interruption::TYPE_SOFTWARE_INTERRUPT
        | interruption::TYPE_PRIVILEGED_SOFTWARE_EXCEPTION
        | interruption::TYPE_SOFTWARE_EXCEPTION => return Ok(None),
        _ => return Err(VmxStateError::UnsupportedEvent(info)),
    };
    let error_code = if info & interruption::ERROR_CODE_VALID != 0 {
        let code = vmcs.read(field::IDT_VECTORING_ERROR_CODE)? as u32;
        vmcs.write(field::VM_ENTRY_EXCEPTION_ERROR_CODE, u64::from(code))?;
        Some(code)
    } else {
        None
    };
    // Bits 30:12 are undefined in IDT-vectoring information and reserved in the VM-entry field.
    let entry_info = info
        & (interruption::VALID
            | interruption::ERROR_CODE_VALID
            | interruption::TYPE_MASK
            | interruption::VECTOR_MASK);
    vmcs.write(field::VM_ENTRY_INTERRUPTION_INFO, u64::from(entry_info))?;
    Ok(Some(PendingEvent {
        kind,
        vector,
        error_code,
        instruction_len: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::busy_state;
    use crate::state::{cr4, efer, Gprs, Interruptibility};
    use crate::svm;
    use crate::vtx::vmcs::tests::FakeVmcs;
    use alloc::boxed::Box;

    /// Typical values: CR0 must have PE, NE, PG; CR4 must have VMXE; CR4 bits above 22 refused.
    const OPTS: VmxLoadOptions = VmxLoadOptions {
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xFFFF_FFFF,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x003F_FFFF,
        unrestricted_guest: true,
        zero_length_injection: false,
    };

    fn fresh_vmcs() -> FakeVmcs {
        let mut v = FakeVmcs::default();
        // Controls the setup code would have written.
        v.0.insert(field::VM_ENTRY_CONTROLS, u64::from(entry::LOAD_EFER));
        v
    }

    fn target_for(s: &VcpuState) -> VcpuState {
        let mut t = VcpuState::reset_64bit(0xBAD, 0xBAD, 0xBAD);
        t.gprs = Gprs::from_array([0xBAD; 16]);
        t.dr = s.dr;
        t.dr6 = s.dr6;
        t.cr2 = s.cr2;
        t.cr8 = s.cr8;
        t.msrs.star = s.msrs.star;
        t.msrs.lstar = s.msrs.lstar;
        t.msrs.cstar = s.msrs.cstar;
        t.msrs.sfmask = s.msrs.sfmask;
        t.msrs.kernel_gs_base = s.msrs.kernel_gs_base;
        t.msrs.tsc_aux = s.msrs.tsc_aux;
        t.fpu = s.fpu.clone();
        t
    }

    #[test]
    fn reset_state_loads_as_the_sdm_requires() {
        let s = VcpuState::reset_64bit(0x10_0000, 0x8000, 0x2000);
        let mut v = fresh_vmcs();
        let mut g = GuestGprs::default();
        load_from_state(&mut v, &mut g, &s, &OPTS).unwrap();
        let r = |f| v.read(f).unwrap();
        assert_eq!(r(field::GUEST_RIP), 0x10_0000);
        assert_eq!(r(field::GUEST_RSP), 0x8000);
        assert_eq!(r(field::GUEST_CS_AR), 0xA09B);
        assert_eq!(r(field::GUEST_SS_AR), 0xC093);
        assert_eq!(r(field::GUEST_TR_AR), 0x008B);
        assert_eq!(r(field::GUEST_LDTR_AR), 0x1_0000);
        assert_eq!(r(field::GUEST_CS_SELECTOR), 8);
        assert_eq!(r(field::GUEST_CS_LIMIT), 0xFFFF_FFFF);
        // Real CR4 has VMXE, the guest sees its own value through the shadow.
        assert_eq!(r(field::GUEST_CR4), s.cr4 | cr4::VMXE);
        assert_eq!(r(field::CR4_READ_SHADOW), s.cr4);
        assert_ne!(r(field::CR4_GUEST_HOST_MASK) & cr4::VMXE, 0);
        assert_eq!(r(field::GUEST_CR0), s.cr0);
        assert_eq!(
            r(field::VM_ENTRY_CONTROLS),
            u64::from(entry::LOAD_EFER | entry::IA32E_MODE_GUEST)
        );
        assert_eq!(r(field::GUEST_IA32_EFER), efer::LME | efer::LMA);
        assert_eq!(r(field::GUEST_INTERRUPTIBILITY_STATE), 0);
        assert_eq!(r(field::GUEST_ACTIVITY_STATE), 0);
        assert_eq!(r(field::VM_ENTRY_INTERRUPTION_INFO), 0);
        assert_eq!(r(field::GUEST_PENDING_DBG_EXCEPTIONS), 0);
    }

    #[test]
    fn load_then_save_round_trips() {
        for s in [VcpuState::reset_64bit(1, 2, 3), busy_state()] {
            let mut v = fresh_vmcs();
            let mut g = GuestGprs::default();
            load_from_state(&mut v, &mut g, &s, &OPTS).unwrap();
            let mut out = target_for(&s);
            save_to_state(&v, &g, &mut out).unwrap();
            assert_eq!(out, s);
        }
    }

    #[test]
    fn ia32e_entry_control_follows_lma() {
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.efer = 0;
        s.cs.attributes.long = false;
        s.cs.attributes.db = true;
        let mut v = fresh_vmcs();
        v.0.insert(
            field::VM_ENTRY_CONTROLS,
            u64::from(entry::IA32E_MODE_GUEST | entry::LOAD_PAT),
        );
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        assert_eq!(
            v.read(field::VM_ENTRY_CONTROLS),
            Ok(u64::from(entry::LOAD_PAT))
        );
    }

    #[test]
    fn real_mode_needs_unrestricted_guest() {
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.cr0 = cr0::ET | cr0::NE;
        s.efer = 0;
        let restricted = VmxLoadOptions {
            unrestricted_guest: false,
            ..OPTS
        };
        assert!(matches!(
            load_from_state(
                &mut fresh_vmcs(),
                &mut GuestGprs::default(),
                &s,
                &restricted
            ),
            Err(VmxStateError::NeedsUnrestrictedGuest { .. })
        ));
        let mut v = fresh_vmcs();
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        // NE is forced, PE/PG are not (unrestricted guest).
        assert_eq!(v.read(field::GUEST_CR0), Ok(cr0::ET | cr0::NE));
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(out.cr0, cr0::ET | cr0::NE);
    }

    #[test]
    fn guest_sees_its_own_cr0_ne() {
        // A guest that cleared CR0.NE: the real CR0 keeps NE (fixed), the guest reads 0.
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.cr0 &= !cr0::NE;
        let mut v = fresh_vmcs();
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        assert_ne!(v.read(field::GUEST_CR0).unwrap() & cr0::NE, 0);
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(out.cr0 & cr0::NE, 0);
    }

    #[test]
    fn event_injection_fields() {
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.pending_event = Some(PendingEvent {
            kind: PendingEventKind::Exception,
            vector: 13,
            error_code: Some(0x10),
            instruction_len: 0,
        });
        let mut v = fresh_vmcs();
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        assert_eq!(v.read(field::VM_ENTRY_INTERRUPTION_INFO), Ok(0x8000_0B0D));
        assert_eq!(v.read(field::VM_ENTRY_EXCEPTION_ERROR_CODE), Ok(0x10));

        s.pending_event = Some(PendingEvent {
            kind: PendingEventKind::SoftwareInterrupt,
            vector: 0x80,
            error_code: None,
            instruction_len: 2,
        });
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        assert_eq!(v.read(field::VM_ENTRY_INTERRUPTION_INFO), Ok(0x8000_0480));
        assert_eq!(v.read(field::VM_ENTRY_INSTRUCTION_LEN), Ok(2));
        let mut out = VcpuState::reset_64bit(0, 0, 0);
        save_to_state(&v, &GuestGprs::default(), &mut out).unwrap();
        assert_eq!(out.pending_event, s.pending_event);
    }

    #[test]
    fn injection_rules_are_checked_before_writing() {
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.pending_event = Some(PendingEvent {
            kind: PendingEventKind::Exception,
            vector: 13,
            error_code: None,
            instruction_len: 0,
        });
        let mut v = fresh_vmcs();
        assert_eq!(
            load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS),
            Err(VmxStateError::ErrorCodeMismatch { vector: 13 })
        );
        assert!(v.read(field::GUEST_RIP).is_err(), "nothing written");
        s.pending_event = Some(PendingEvent {
            kind: PendingEventKind::SoftwareInterrupt,
            vector: 0x80,
            error_code: None,
            instruction_len: 0,
        });
        assert_eq!(
            load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS),
            Err(VmxStateError::ZeroLengthSoftwareInterrupt)
        );
        let lenient = VmxLoadOptions {
            zero_length_injection: true,
            ..OPTS
        };
        assert_eq!(
            load_from_state(&mut v, &mut GuestGprs::default(), &s, &lenient),
            Ok(())
        );
    }

    #[test]
    fn single_step_in_shadow_sets_bs() {
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.rflags |= rflags::TF | rflags::IF;
        s.interruptibility = Interruptibility {
            sti_blocking: true,
            ..Interruptibility::default()
        };
        let mut v = fresh_vmcs();
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        assert_eq!(
            v.read(field::GUEST_PENDING_DBG_EXCEPTIONS),
            Ok(PENDING_DBG_BS)
        );
        assert_eq!(v.read(field::GUEST_INTERRUPTIBILITY_STATE), Ok(1));
    }

    #[test]
    fn unusable_tr_becomes_a_busy_tss() {
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.tr = Segment::NULL;
        let mut v = fresh_vmcs();
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        assert_eq!(v.read(field::GUEST_TR_AR), Ok(0x8B));
        s.efer = 0;
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        assert_eq!(v.read(field::GUEST_TR_AR), Ok(0x83));
    }

    #[test]
    fn unsupported_activity_and_events_are_errors() {
        let s = VcpuState::reset_64bit(0, 0, 0);
        let mut v = fresh_vmcs();
        load_from_state(&mut v, &mut GuestGprs::default(), &s, &OPTS).unwrap();
        let mut out = s.clone();
        v.0.insert(field::GUEST_ACTIVITY_STATE, activity::WAIT_FOR_SIPI);
        assert_eq!(
            save_to_state(&v, &GuestGprs::default(), &mut out),
            Err(VmxStateError::UnsupportedActivity(3))
        );
        v.0.insert(field::GUEST_ACTIVITY_STATE, activity::ACTIVE);
        v.0.insert(field::VM_ENTRY_INTERRUPTION_INFO, 0x8000_0603);
        assert_eq!(
            save_to_state(&v, &GuestGprs::default(), &mut out),
            Err(VmxStateError::UnsupportedEvent(0x8000_0603))
        );
        // A failed save leaves the state untouched, even when it fails half-way.
        assert_eq!(out, s);
        v.0.insert(field::VM_ENTRY_INTERRUPTION_INFO, 0);
        v.0.remove(&field::GUEST_TR_BASE);
        assert!(matches!(
            save_to_state(
                &v,
                &GuestGprs {
                    rax: 5,
                    ..GuestGprs::default()
                },
                &mut out
            ),
            Err(VmxStateError::Access(_))
        ));
        assert_eq!(out, s);
    }

    #[test]
    fn reinjection_after_exit() {
        let mut v = fresh_vmcs();
        v.0.insert(field::IDT_VECTORING_INFO, 0x0000_0000);
        assert_eq!(reinject_after_exit(&mut v), Ok(None));

        // #PF interrupted by an EPT violation on the IDT: re-queued with its error code; the
        // undefined bit 12 is not copied.
        v.0.insert(field::IDT_VECTORING_INFO, 0x8000_1B0E);
        v.0.insert(field::IDT_VECTORING_ERROR_CODE, 0x2);
        let ev = reinject_after_exit(&mut v).unwrap().unwrap();
        assert_eq!(ev.kind, PendingEventKind::Exception);
        assert_eq!(ev.error_code, Some(2));
        assert_eq!(v.read(field::VM_ENTRY_INTERRUPTION_INFO), Ok(0x8000_0B0E));
        assert_eq!(v.read(field::VM_ENTRY_EXCEPTION_ERROR_CODE), Ok(2));

        // INT 80h interrupted: not re-queued, the instruction runs again.
        v.0.insert(field::VM_ENTRY_INTERRUPTION_INFO, 0);
        v.0.insert(field::IDT_VECTORING_INFO, 0x8000_0480);
        assert_eq!(reinject_after_exit(&mut v), Ok(None));
        assert_eq!(v.read(field::VM_ENTRY_INTERRUPTION_INFO), Ok(0));

        v.0.insert(field::IDT_VECTORING_INFO, 0x8000_0102);
        assert_eq!(
            reinject_after_exit(&mut v),
            Err(VmxStateError::UnsupportedEvent(0x8000_0102))
        );
    }

    /// Each backend's GPR block has a slot for exactly the registers its hardware structure
    /// does not hold (VMCS: RSP; VMCB: RAX, RSP), each slot holds the register `load_from_state`
    /// put there, and writes through `slot_mut` land where `slot` reads.
    #[test]
    fn gpr_block_slots_by_register_number() {
        use crate::vcpu::{Gpr, GprBlock};
        #[rustfmt::skip]
        const ALL: [Gpr; 16] = [
            Gpr::Rax, Gpr::Rcx, Gpr::Rdx, Gpr::Rbx, Gpr::Rsp, Gpr::Rbp, Gpr::Rsi, Gpr::Rdi,
            Gpr::R8, Gpr::R9, Gpr::R10, Gpr::R11, Gpr::R12, Gpr::R13, Gpr::R14, Gpr::R15,
        ];
        let mut s = busy_state();
        s.gprs = Gprs::from_array(core::array::from_fn(|n| 0x100 + n as u64));
        let mut vg = GuestGprs::default();
        load_from_state(&mut fresh_vmcs(), &mut vg, &s, &OPTS).unwrap();
        let mut sg = svm::GuestGprs::default();
        svm::load_from_state(&mut Box::new(svm::Vmcb::new()), &mut sg, &s).unwrap();
        for (n, reg) in ALL.into_iter().enumerate() {
            assert_eq!(usize::from(reg as u8), n);
            let loaded = 0x100 + n as u64;
            let on_vmx = (reg != Gpr::Rsp).then_some(loaded);
            let on_svm = (!matches!(reg, Gpr::Rax | Gpr::Rsp)).then_some(loaded);
            let slots = (vg.slot(reg).copied(), sg.slot(reg).copied());
            assert_eq!(slots, (on_vmx, on_svm), "{reg:?}");
            if let Some(slot) = vg.slot_mut(reg) {
                *slot = !(n as u64);
            }
            if let Some(slot) = sg.slot_mut(reg) {
                *slot = !(n as u64);
            }
        }
        for (n, reg) in ALL.into_iter().enumerate() {
            assert!(vg.slot(reg).is_none_or(|&v| v == !(n as u64)), "{reg:?}");
            assert!(sg.slot(reg).is_none_or(|&v| v == !(n as u64)), "{reg:?}");
        }
    }

    /// The architecture's promise: a state saved on AMD restores on Intel and back.
    #[test]
    fn state_crosses_vendors() {
        let mut s = busy_state();
        // What both vendors express exactly: SVM has one shadow bit (STI when IF = 1) and no
        // NMI-blocking or HLT state of its own, which the SVM backend carries in software.
        s.interruptibility = Interruptibility {
            sti_blocking: true,
            mov_ss_blocking: false,
            nmi_blocked: true,
        };

        // Intel -> AMD.
        let mut vmcs = fresh_vmcs();
        let mut vg = GuestGprs::default();
        load_from_state(&mut vmcs, &mut vg, &s, &OPTS).unwrap();
        let mut on_intel = target_for(&s);
        save_to_state(&vmcs, &vg, &mut on_intel).unwrap();
        assert_eq!(on_intel, s);

        let mut vmcb = Box::new(svm::Vmcb::new());
        let mut sg = svm::GuestGprs::default();
        svm::load_from_state(&mut vmcb, &mut sg, &on_intel).unwrap();
        let mut on_amd = on_intel.clone();
        on_amd.gprs = Gprs::default();
        on_amd.cs = Segment::NULL;
        svm::save_to_state(&vmcb, &sg, &mut on_amd).unwrap();
        assert_eq!(on_amd, s);

        // AMD -> Intel, through the wire format.
        let mut bytes = alloc::vec::Vec::new();
        on_amd.encode(&mut bytes);
        let received = VcpuState::decode(&bytes).unwrap();
        let mut vmcs = fresh_vmcs();
        load_from_state(&mut vmcs, &mut vg, &received, &OPTS).unwrap();
        let mut back = target_for(&s);
        save_to_state(&vmcs, &vg, &mut back).unwrap();
        assert_eq!(back, s);
    }
}
