//! The VMX hardware glue: turning VMX on ([`enable_vmx`]), and [`VmxVcpu`], which runs a guest
//! with VMLAUNCH/VMRESUME over EPT. The only module of [`crate::vtx`] with `unsafe`.
//!
//! Section numbers follow SDM vol. 3C editions from 2023 on (see [`crate::vtx`]): 24.7-24.8
//! enabling VMX, 25 the VMCS, 27 VM entries, 28 VM exits, 29.4 TLB invalidation, 31 the VMX
//! instructions.
//!
//! One world switch (`world_switch`): save the host's RFLAGS, RBX, RBP and the GPR block pointer
//! on the stack, write that stack pointer and the landing address into HOST_RSP/HOST_RIP, load
//! the guest GPRs and VMLAUNCH (first entry) or VMRESUME. The VM exit lands with the host's
//! CR0/3/4, segments, descriptor tables, EFER, PAT and SYSENTER MSRs loaded from the VMCS
//! host-state area (SDM 28.5) but every GPR still the guest's and RFLAGS = 2 (IF clear, 28.5.3):
//! the landing code stores the guest GPRs and restores the host's, and POPFQ sets IF again, so a
//! host interrupt that caused an external-interrupt exit (not acknowledged on exit, so still
//! pending) is taken right there. Interrupts are off (CLI) from before the entry, so a timer
//! tick that arrives while the switch is prepared makes the guest exit immediately after entry
//! instead of being serviced before it. Besides the timer interrupt, the VMX-preemption timer
//! bounds each entry ([`Vcpu::set_time_slice`]): under Bochs a guest spinning with RFLAGS.IF
//! clear never took an external-interrupt exit, and held the node.
//!
//! Several vCPUs share the core: the current-VMCS pointer is per logical processor, so every
//! operation first makes this vCPU's VMCS current (VMPTRLD when [`CURRENT_VMCS`] names another).
//!
//! Not switched: FPU/SSE state (the node kernel and the test guest are soft-float, as for SVM),
//! DR0-DR3/DR6, STAR/LSTAR/CSTAR/SFMASK and KernelGSbase (the node kernel uses none of them;
//! every guest RDMSR/WRMSR exits). CR2 is switched by hand around the entry.

use core::arch::asm;
use core::fmt;
use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, FS, GS, SS};
use x86_64::instructions::tables::{sgdt, sidt};
use x86_64::registers::control::{Cr0, Cr3, Cr4};
use x86_64::registers::model_specific::{Efer, FsBase, GsBase, Msr};

use super::controls::{entry, exit, msr, pin, primary, secondary, ControlError, ControlSet};
use super::ept::{invept, invept_descriptor, invvpid, invvpid_descriptor};
use super::error::VmInstructionError;
use super::exit::{exit_from_vmcs, VmxExitInfo, REASON_ENTRY_FAILURE};
use super::state::{
    entry_event, load_from_state, reinject_after_exit, save_to_state, GuestGprs, VmxLoadOptions,
    VmxStateError,
};
use super::vmcs::{field, VmcsAccessError, VmcsFailure, VmcsRead, VmcsWrite};
use crate::caps::VmxCaps;
use crate::exit::{EntryFailure, VmExit};
use crate::state::{cr0, PendingEvent, VcpuState};
use crate::vcpu::{Gpr, GprBlock, HostPage, HostPages, Vcpu, VcpuError};

const PAGE: usize = 4096;

/// IA32_FEATURE_CONTROL (SDM 24.7, vol. 4 table 2-2): bit 0 lock, bit 2 VMXON outside SMX.
const IA32_FEATURE_CONTROL: u32 = 0x3A;
const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;
const IA32_PAT: u32 = 0x277;
/// CR4.VMXE (bit 13): VMXON is allowed only with it set (SDM 24.7).
const CR4_VMXE: u64 = 1 << 13;
/// IA32_VMX_MISC bits 4:0: the VMX-preemption timer counts once every 2^X TSC ticks (A.6).
const MISC_PREEMPTION_TIMER_RATE: u64 = 0x1F;
/// IA32_VMX_MISC bit 30: software interrupts/exceptions may be injected with length 0 (A.6).
const MISC_ZERO_LENGTH_INJECTION: u64 = 1 << 30;
/// IA32_VMX_EPT_VPID_CAP bits 41/42: single-context / all-context INVVPID (A.10).
const CAP_INVVPID_SINGLE: u64 = 1 << 41;
const CAP_INVVPID_ALL: u64 = 1 << 42;
/// IA32_VMX_EPT_VPID_CAP bit 8: uncacheable memory type for EPT structures (A.10).
const CAP_EPT_UC: u64 = 1 << 8;

/// Host-physical address of the VMCS that is current on this (the only) logical processor,
/// 0 when none is. VMPTRLD/VMCLEAR here keep it in step (SDM 25.1: one current VMCS per
/// logical processor). The node kernel runs on one core; a per-core variable would replace
/// this with SMP.
static CURRENT_VMCS: AtomicU64 = AtomicU64::new(0);

/// VMXON succeeded on this processor ([`enable_vmx`]); nothing turns VMX off again. Every VMX
/// instruction other than VMXON raises #UD outside VMX operation (SDM 31.3), so
/// [`VmxVcpu::new`] refuses to build a vCPU before this is set.
static VMX_ON: AtomicBool = AtomicBool::new(false);

/// Why VMX could not be turned on or a vCPU could not be built or changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmxError {
    /// IA32_FEATURE_CONTROL is locked without "VMXON outside SMX" (SDM 24.7): VMXON would #GP.
    DisabledByFirmware,
    /// The CPU lacks something this backend relies on.
    Unsupported(&'static str),
    /// Not enough host memory for a VMXON region or VMCS.
    OutOfMemory,
    /// A VMX instruction failed (SDM 31.2): VMfailInvalid ([`VmcsFailure::NoCurrentVmcs`]) or
    /// VMfailValid with its VM-instruction error.
    Instruction {
        instruction: &'static str,
        failure: VmcsFailure,
    },
    /// A control the backend needs is not allowed by the capability MSRs.
    Control(ControlError),
    /// VMREAD/VMWRITE of a field failed.
    Vmcs(VmcsAccessError),
    /// The vCPU state could not be loaded into the VMCS.
    State(VmxStateError),
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DisabledByFirmware => {
                f.write_str("VMX is disabled by the firmware (IA32_FEATURE_CONTROL locked)")
            }
            Self::Unsupported(what) => write!(f, "the CPU lacks {what}"),
            Self::OutOfMemory => f.write_str("no memory for a VMX structure"),
            Self::Instruction {
                instruction,
                failure: VmcsFailure::NoCurrentVmcs,
            } => write!(f, "{instruction} failed (VMfailInvalid)"),
            Self::Instruction {
                instruction,
                failure: VmcsFailure::Error(e),
            } => write!(f, "{instruction} failed: {e}"),
            Self::Control(e) => write!(f, "{e}"),
            Self::Vmcs(e) => write!(f, "{e}"),
            Self::State(e) => write!(f, "{e}"),
        }
    }
}

impl From<ControlError> for VmxError {
    fn from(e: ControlError) -> Self {
        Self::Control(e)
    }
}

impl From<VmcsAccessError> for VmxError {
    fn from(e: VmcsAccessError) -> Self {
        Self::Vmcs(e)
    }
}

impl From<VmxStateError> for VmxError {
    fn from(e: VmxStateError) -> Self {
        Self::State(e)
    }
}

/// Executes one VMX instruction (SDM 31.2 "Conventions") and evaluates to the flags it reports
/// its outcome in, `(CF, ZF)`: `vmx_instruction!("vmclear [{p}]", p = in(reg) &hpa)`. The
/// operands follow the template as in `asm!`; the caller wraps the use in `unsafe`.
macro_rules! vmx_instruction {
    ($template:literal, $($operands:tt)+) => {{
        let (cf, zf): (u8, u8);
        asm!(
            $template,
            "setc {cf}",
            "setz {zf}",
            $($operands)+,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
        (cf, zf)
    }};
}

/// The failure a VMX instruction reports in RFLAGS (SDM 31.2 "Conventions"): CF set is
/// VMfailInvalid, ZF set VMfailValid (the error number is then in the current VMCS).
fn outcome((cf, zf): (u8, u8)) -> Result<(), VmcsFailure> {
    if cf != 0 {
        Err(VmcsFailure::NoCurrentVmcs)
    } else if zf != 0 {
        Err(VmcsFailure::Error(last_instruction_error()))
    } else {
        Ok(())
    }
}

/// The VM-instruction error field of the current VMCS (SDM 31.4), after a VMfailValid.
fn last_instruction_error() -> VmInstructionError {
    let value: u64;
    // SAFETY: only called after a VMX instruction returned VMfailValid, which happens only in
    // VMX root operation with a current VMCS; VMREAD then reads the VMCS and nothing else.
    let (cf, zf) = unsafe {
        vmx_instruction!(
            "vmread {v}, {f}",
            f = in(reg) u64::from(field::VM_INSTRUCTION_ERROR),
            v = out(reg) value
        )
    };
    if cf != 0 || zf != 0 {
        VmInstructionError::Unknown(0)
    } else {
        VmInstructionError::from_number(value as u32)
    }
}

fn instruction(name: &'static str, result: Result<(), VmcsFailure>) -> Result<(), VmxError> {
    result.map_err(|failure| VmxError::Instruction {
        instruction: name,
        failure,
    })
}

/// VMXON with the region at `hpa` (SDM 31.3 "VMXON").
///
/// # Safety
/// CR4.VMXE is set, CR0/CR4 satisfy the VMX fixed bits, IA32_FEATURE_CONTROL allows VMXON, and
/// `hpa` is a 4 KiB-aligned page holding the VMCS revision identifier that nothing else uses
/// while VMX is on.
unsafe fn vmxon(hpa: u64) -> Result<(), VmcsFailure> {
    // SAFETY: see the function's contract; the operand is the address of a local u64.
    outcome(unsafe { vmx_instruction!("vmxon [{p}]", p = in(reg) &hpa) })
}

/// VMCLEAR of the VMCS at `hpa` (SDM 31.3): writes its cached data back, marks it clear
/// (the next entry must be VMLAUNCH) and, if it was current, leaves no VMCS current.
///
/// # Safety
/// VMX is on and `hpa` is a VMCS region owned by the caller.
unsafe fn vmclear(hpa: u64) -> Result<(), VmcsFailure> {
    // SAFETY: see the function's contract.
    let flags = unsafe { vmx_instruction!("vmclear [{p}]", p = in(reg) &hpa) };
    let _ = CURRENT_VMCS.compare_exchange(hpa, 0, Ordering::Relaxed, Ordering::Relaxed);
    outcome(flags)
}

/// VMPTRLD: makes the VMCS at `hpa` current (SDM 31.3).
///
/// # Safety
/// VMX is on and `hpa` is a VMCS region owned by the caller, initialised with VMCLEAR.
unsafe fn vmptrld(hpa: u64) -> Result<(), VmcsFailure> {
    // SAFETY: see the function's contract.
    let result = outcome(unsafe { vmx_instruction!("vmptrld [{p}]", p = in(reg) &hpa) });
    CURRENT_VMCS.store(if result.is_ok() { hpa } else { 0 }, Ordering::Relaxed);
    result
}

/// INVEPT of `kind` (SDM 31.3 "INVEPT", 29.4.3.1).
///
/// # Safety
/// VMX is on and the CPU supports INVEPT of this type.
unsafe fn invept_raw(kind: u64, eptp: u64) -> Result<(), VmcsFailure> {
    let desc = invept_descriptor(eptp);
    // SAFETY: see the function's contract; the descriptor is a local 128-bit value.
    outcome(unsafe { vmx_instruction!("invept {k}, [{d}]", k = in(reg) kind, d = in(reg) &desc) })
}

/// INVVPID of `kind` for `vpid` (SDM 31.3 "INVVPID").
///
/// # Safety
/// VMX is on and the CPU supports INVVPID of this type.
unsafe fn invvpid_raw(kind: u64, vpid: u16) -> Result<(), VmcsFailure> {
    let desc = invvpid_descriptor(vpid, 0);
    // SAFETY: see the function's contract; the descriptor is a local 128-bit value.
    outcome(unsafe { vmx_instruction!("invvpid {k}, [{d}]", k = in(reg) kind, d = in(reg) &desc) })
}

fn read_msr(index: u32) -> u64 {
    // SAFETY: only architectural MSRs are read here (VMX capability MSRs, which exist once
    // CPUID reported VMX, and SYSENTER/PAT/FEATURE_CONTROL, which every VMX CPU has).
    unsafe { Msr::new(index).read() }
}

/// Turns VMX on for this CPU (SDM 24.7 "Enabling and Entering VMX Operation"): checks
/// IA32_FEATURE_CONTROL (locking it with VMXON outside SMX enabled when the firmware left it
/// unlocked), sets CR4.VMXE, brings CR0/CR4 to the IA32_VMX_CR0/CR4_FIXED0/1 constraints
/// (24.8), writes the revision identifier into a VMXON region (25.11.5) and executes VMXON.
/// Returns the VMXON region, which must stay allocated while VMX is on.
pub fn enable_vmx(pages: &mut dyn HostPages, caps: &VmxCaps) -> Result<HostPage, VmxError> {
    if caps.disabled_by_firmware {
        return Err(VmxError::DisabledByFirmware);
    }
    if usize::from(caps.vmcs_region_size) > PAGE || caps.vmcs_region_size == 0 {
        return Err(VmxError::Unsupported("a VMXON region of at most 4 KiB"));
    }
    let feature = read_msr(IA32_FEATURE_CONTROL);
    if feature & FEATURE_CONTROL_LOCK == 0 {
        // SAFETY: while the MSR is unlocked software may set its enable bits and lock it
        // (SDM 24.7); this only permits VMXON outside SMX.
        unsafe {
            Msr::new(IA32_FEATURE_CONTROL)
                .write(feature | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX)
        };
    } else if feature & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::DisabledByFirmware);
    }

    let region = pages.alloc_zeroed(1).ok_or(VmxError::OutOfMemory)?;
    // SAFETY: the page is ours, 4 KiB long and aligned; the first 4 bytes take the revision
    // identifier with bit 31 clear (SDM 25.11.5).
    unsafe { (region.ptr as *mut u32).write_volatile(caps.vmcs_revision_id & 0x7FFF_FFFF) };

    let old_cr0 = Cr0::read_raw();
    let old_cr4 = Cr4::read_raw();
    let cr0 = (old_cr0 | read_msr(msr::IA32_VMX_CR0_FIXED0)) & read_msr(msr::IA32_VMX_CR0_FIXED1);
    let cr4 = (old_cr4 | CR4_VMXE | read_msr(msr::IA32_VMX_CR4_FIXED0))
        & read_msr(msr::IA32_VMX_CR4_FIXED1);
    if cr0 & cr0::PG == 0 || cr4 & CR4_VMXE == 0 {
        pages.free(region);
        return Err(VmxError::Unsupported(
            "CR0/CR4 settings compatible with VMX",
        ));
    }
    // SAFETY: the fixed-1 bits a 64-bit kernel can be asked for are PE, NE and PG (already set
    // in long mode) and VMXE; the fixed-0 masks only clear bits the CPU cannot run with in VMX
    // operation, none of which long mode needs (checked: PG and VMXE survive).
    unsafe {
        Cr0::write_raw(cr0);
        Cr4::write_raw(cr4);
    }
    // SAFETY: CR4.VMXE and the fixed bits are set, IA32_FEATURE_CONTROL allows VMXON, and the
    // region is ours with the revision identifier written.
    if let Err(failure) = unsafe { vmxon(region.hpa) } {
        // SAFETY: VMX operation did not start, so CR4.VMXE may be cleared again and CR0 put back.
        unsafe {
            Cr4::write_raw(old_cr4);
            Cr0::write_raw(old_cr0);
        }
        pages.free(region);
        return Err(VmxError::Instruction {
            instruction: "VMXON",
            failure,
        });
    }
    VMX_ON.store(true, Ordering::Release);
    Ok(region)
}

/// VMREAD/VMWRITE of the current VMCS. Only [`VmxVcpu::vmcs`] creates one, after making that
/// vCPU's VMCS current, so the accesses always reach the intended VMCS.
struct ActiveVmcs(());

impl VmcsRead for ActiveVmcs {
    fn read(&self, field: u32) -> Result<u64, VmcsAccessError> {
        let value: u64;
        // SAFETY: an ActiveVmcs exists only while VMX is on and a VMCS is current (see the
        // type); VMREAD only reads that VMCS into a register.
        let flags = unsafe {
            vmx_instruction!("vmread {v}, {f}", f = in(reg) u64::from(field), v = out(reg) value)
        };
        outcome(flags)
            .map(|()| value)
            .map_err(|failure| VmcsAccessError { field, failure })
    }
}

impl VmcsWrite for ActiveVmcs {
    fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsAccessError> {
        // SAFETY: as in `read`; VMWRITE changes only the current VMCS, which belongs to the
        // vCPU that created this handle through `&mut self` or during construction.
        let flags = unsafe {
            vmx_instruction!("vmwrite {f}, {v}", f = in(reg) u64::from(field), v = in(reg) value)
        };
        outcome(flags).map_err(|failure| VmcsAccessError { field, failure })
    }
}

/// The base address in a 16-byte system-segment descriptor (TSS) of IA-32e mode (SDM vol. 3A
/// 8.2.3 "TSS Descriptor in 64-bit mode"): bits 15:0 at 16, 23:16 at 32, 31:24 at 56 of the low
/// quadword, 63:32 in the low half of the high quadword.
pub const fn tss_descriptor_base(low: u64, high: u64) -> u64 {
    ((low >> 16) & 0xFF_FFFF) | (((low >> 56) & 0xFF) << 24) | ((high & 0xFFFF_FFFF) << 32)
}

/// A host data-segment selector usable in the host-state area: RPL and TI must be 0 (SDM
/// 27.2.3); anything else becomes the null selector, which 64-bit code does not mind.
const fn host_data_selector(sel: u16) -> u16 {
    if sel & 7 == 0 {
        sel
    } else {
        0
    }
}

/// The control values for a vCPU, from the desired bits and the capability MSRs (SDM A.3-A.5).
/// `allowed(set)` returns the capability MSR value; optional controls are requested only when
/// the MSR allows them to be 1.
struct Controls {
    pin: u32,
    primary: u32,
    secondary: u32,
    exit: u32,
    entry: u32,
}

fn choose_controls(
    caps: &VmxCaps,
    vpid: bool,
    allowed: impl Fn(ControlSet) -> u64,
) -> Result<Controls, VmxError> {
    let may_be_one = |set: ControlSet, bits: u32| bits & (allowed(set) >> 32) as u32;
    // The VMX-preemption timer bounds every entry (see `Vcpu::set_time_slice`), when the CPU
    // has it.
    let pin = ControlSet::PinBased.adjust(
        pin::EXTERNAL_INTERRUPT_EXITING
            | pin::NMI_EXITING
            | may_be_one(ControlSet::PinBased, pin::ACTIVATE_PREEMPTION_TIMER),
        allowed(ControlSet::PinBased),
    )?;
    // Every I/O access exits (unconditional I/O exiting, no I/O bitmaps) and so does every
    // RDMSR/WRMSR ("use MSR bitmaps" 0, SDM 26.1.3).
    let primary = ControlSet::Primary.adjust(
        primary::HLT_EXITING
            | primary::UNCONDITIONAL_IO_EXITING
            | primary::USE_TSC_OFFSETTING
            | primary::ACTIVATE_SECONDARY_CONTROLS,
        allowed(ControlSet::Primary),
    )?;
    let mut want2 = secondary::ENABLE_EPT;
    if vpid && caps.vpid {
        want2 |= secondary::ENABLE_VPID;
    }
    if caps.unrestricted_guest {
        want2 |= secondary::UNRESTRICTED_GUEST;
    }
    let secondary = ControlSet::Secondary.adjust(want2, allowed(ControlSet::Secondary))?;
    let exit = ControlSet::Exit.adjust(
        exit::HOST_ADDRESS_SPACE_SIZE
            | exit::SAVE_EFER
            | exit::LOAD_EFER
            | may_be_one(ControlSet::Exit, exit::SAVE_PAT | exit::LOAD_PAT),
        allowed(ControlSet::Exit),
    )?;
    // "IA-32e mode guest" follows the state (load_from_state sets it).
    let entry = ControlSet::Entry.adjust(
        entry::LOAD_EFER | may_be_one(ControlSet::Entry, entry::LOAD_PAT),
        allowed(ControlSet::Entry),
    )?;
    Ok(Controls {
        pin,
        primary,
        secondary,
        exit,
        entry,
    })
}

/// One guest CPU on Intel VMX with EPT.
pub struct VmxVcpu {
    vmcs: HostPage,
    gprs: GuestGprs,
    eptp: u64,
    /// 0 when VPID is off.
    vpid: u16,
    opts: VmxLoadOptions,
    /// INVEPT type used to flush this guest's EPT-derived translations.
    invept_kind: u64,
    /// INVVPID type for the first entry (a reused VPID), if INVVPID exists.
    invvpid_kind: Option<u64>,
    /// VMLAUNCH done: the VMCS is in the launched state and the next entry is VMRESUME.
    launched: bool,
    /// INVEPT before the next entry (always before the first one).
    flush_pending: bool,
    /// Architectural state the VMCS does not hold (CR2, DR0-3, FPU, ...), for save/restore.
    shadow: VcpuState,
    /// Raw values of the last exit: exit reason, qualification, guest-physical address
    /// (for a failed VMLAUNCH/VMRESUME: u64::MAX, the VM-instruction error, 0).
    raw: [u64; 3],
    /// A VMWRITE that failed in a method that cannot report it; the next `run` reports it.
    deferred: Option<VmcsAccessError>,
    /// The VMX-preemption timer is on (see `Vcpu::set_time_slice`), and its rate shift.
    preemption_timer: bool,
    preemption_timer_shift: u32,
}

impl VmxVcpu {
    /// A vCPU in `state` (e.g. [`VcpuState::reset_64bit`]) over the EPT named by `eptp` (see
    /// [`crate::paging::EptFormat::eptp`]), tagged with `vpid` (non-zero and unique per VM on
    /// this host; 0 turns VPID off). Every I/O port and MSR access exits, as do CPUID (always),
    /// HLT, external interrupts, NMIs, triple faults and EPT violations.
    ///
    /// VMX must be on ([`enable_vmx`]); before that this returns [`VmxError::Unsupported`].
    pub fn new(
        pages: &mut dyn HostPages,
        vpid: u16,
        eptp: u64,
        state: &VcpuState,
        caps: &VmxCaps,
    ) -> Result<VmxVcpu, VmxError> {
        if !VMX_ON.load(Ordering::Acquire) {
            return Err(VmxError::Unsupported(
                "VMX operation (enable_vmx has not succeeded)",
            ));
        }
        if !caps.secondary_controls || !caps.ept {
            return Err(VmxError::Unsupported("EPT"));
        }
        if usize::from(caps.vmcs_region_size) > PAGE || caps.vmcs_region_size == 0 {
            return Err(VmxError::Unsupported("a VMCS region of at most 4 KiB"));
        }
        let ept_caps = read_msr(msr::IA32_VMX_EPT_VPID_CAP);
        Self::check_eptp(eptp, caps, ept_caps)?;
        let e = &caps.ept_vpid;
        let invept_kind = if e.invept && e.invept_single_context {
            invept::SINGLE_CONTEXT
        } else if e.invept && e.invept_all_context {
            invept::ALL_CONTEXT
        } else {
            return Err(VmxError::Unsupported("INVEPT"));
        };
        let use_vpid = vpid != 0 && caps.vpid;
        let invvpid_kind = if !use_vpid || !e.invvpid {
            None
        } else if ept_caps & CAP_INVVPID_SINGLE != 0 {
            Some(invvpid::SINGLE_CONTEXT)
        } else if ept_caps & CAP_INVVPID_ALL != 0 {
            Some(invvpid::ALL_CONTEXT)
        } else {
            None
        };

        let vmcs = pages.alloc_zeroed(1).ok_or(VmxError::OutOfMemory)?;
        // SAFETY: the page is ours and 4 KiB long; bits 30:0 of the first word are the VMCS
        // revision identifier, bit 31 clear for an ordinary (not shadow) VMCS (SDM 25.2).
        unsafe { (vmcs.ptr as *mut u32).write_volatile(caps.vmcs_revision_id & 0x7FFF_FFFF) };
        let mut vcpu = VmxVcpu {
            vmcs,
            gprs: GuestGprs::default(),
            eptp,
            vpid: if use_vpid { vpid } else { 0 },
            opts: VmxLoadOptions {
                cr0_fixed0: read_msr(msr::IA32_VMX_CR0_FIXED0),
                cr0_fixed1: read_msr(msr::IA32_VMX_CR0_FIXED1),
                cr4_fixed0: read_msr(msr::IA32_VMX_CR4_FIXED0),
                cr4_fixed1: read_msr(msr::IA32_VMX_CR4_FIXED1),
                unrestricted_guest: caps.unrestricted_guest,
                zero_length_injection: read_msr(msr::IA32_VMX_MISC) & MISC_ZERO_LENGTH_INJECTION
                    != 0,
            },
            invept_kind,
            invvpid_kind,
            launched: false,
            flush_pending: true,
            shadow: state.clone(),
            raw: [0; 3],
            deferred: None,
            preemption_timer: false,
            preemption_timer_shift: (read_msr(msr::IA32_VMX_MISC) & MISC_PREEMPTION_TIMER_RATE)
                as u32,
        };
        if let Err(err) = vcpu.init(state, caps) {
            vcpu.free_pages(pages);
            return Err(err);
        }
        Ok(vcpu)
    }

    /// The EPTP fields the CPU must support (SDM 27.2.1.1): memory type, 4-level walk, A/D.
    fn check_eptp(eptp: u64, caps: &VmxCaps, ept_caps: u64) -> Result<(), VmxError> {
        let e = &caps.ept_vpid;
        let memory_type_ok = match eptp & 7 {
            6 => e.write_back_memory_type,
            0 => ept_caps & CAP_EPT_UC != 0,
            _ => false,
        };
        if !memory_type_ok {
            return Err(VmxError::Unsupported(
                "the EPT paging-structure memory type",
            ));
        }
        if (eptp >> 3) & 7 != 3 || !e.page_walk_length_4 {
            return Err(VmxError::Unsupported("4-level EPT"));
        }
        if eptp & (1 << 6) != 0 && !e.accessed_dirty_flags {
            return Err(VmxError::Unsupported("EPT accessed/dirty flags"));
        }
        Ok(())
    }

    /// Initialises the VMCS (SDM 25.11.3: VMCLEAR, VMPTRLD, then VMWRITE of every field used).
    fn init(&mut self, state: &VcpuState, caps: &VmxCaps) -> Result<(), VmxError> {
        let hpa = self.vmcs.hpa;
        // SAFETY: VMX is on (`new` checked VMX_ON) and the region is this vCPU's, with its revision identifier.
        instruction("VMCLEAR", unsafe { vmclear(hpa) })?;
        // SAFETY: as above; VMCLEAR has initialised the region.
        instruction("VMPTRLD", unsafe { vmptrld(hpa) })?;
        let controls = choose_controls(caps, self.vpid != 0, |set| {
            read_msr(set.capability_msr(caps.true_controls))
        })?;
        let mut v = ActiveVmcs(());
        v.write(field::PIN_BASED_VM_EXEC_CONTROL, controls.pin.into())?;
        self.preemption_timer = controls.pin & pin::ACTIVATE_PREEMPTION_TIMER != 0;
        if self.preemption_timer {
            // Until the owner sets a slice: long enough never to matter.
            v.write(field::VMX_PREEMPTION_TIMER_VALUE, u64::from(u32::MAX))?;
        }
        v.write(field::CPU_BASED_VM_EXEC_CONTROL, controls.primary.into())?;
        v.write(field::SECONDARY_VM_EXEC_CONTROL, controls.secondary.into())?;
        v.write(field::VM_EXIT_CONTROLS, controls.exit.into())?;
        v.write(field::VM_ENTRY_CONTROLS, controls.entry.into())?;
        if controls.secondary & secondary::UNRESTRICTED_GUEST == 0 {
            self.opts.unrestricted_guest = false;
        }
        // Fields whose value after VMCLEAR is not architecturally defined (25.11.3).
        v.write(field::EXCEPTION_BITMAP, 0)?;
        v.write(field::PAGE_FAULT_ERROR_CODE_MASK, 0)?;
        v.write(field::PAGE_FAULT_ERROR_CODE_MATCH, 0)?;
        v.write(field::CR3_TARGET_COUNT, 0)?;
        v.write(field::VM_EXIT_MSR_STORE_COUNT, 0)?;
        v.write(field::VM_EXIT_MSR_LOAD_COUNT, 0)?;
        v.write(field::VM_ENTRY_MSR_LOAD_COUNT, 0)?;
        v.write(field::VM_ENTRY_INTERRUPTION_INFO, 0)?;
        // No shadow VMCS (25.4.2; all ones is required, 27.3.1.5).
        v.write(field::VMCS_LINK_POINTER, u64::MAX)?;
        v.write(field::GUEST_IA32_DEBUGCTL, 0)?;
        v.write(field::EPT_POINTER, self.eptp)?;
        if self.vpid != 0 {
            v.write(field::VPID, self.vpid.into())?;
        }
        write_host_state(&mut v)?;
        let mut gprs = GuestGprs::default();
        load_from_state(&mut v, &mut gprs, state, &self.opts)?;
        self.gprs = gprs;
        Ok(())
    }

    /// Makes this vCPU's VMCS current (VMPTRLD if another is) and returns the access handle.
    fn vmcs(&self) -> Result<ActiveVmcs, VmcsAccessError> {
        let hpa = self.vmcs.hpa;
        if CURRENT_VMCS.load(Ordering::Relaxed) != hpa {
            // SAFETY: VMX is on (a VmxVcpu exists only after `new` succeeded, which needs it)
            // and the region is this vCPU's VMCS, initialised by `init`.
            unsafe { vmptrld(hpa) }.map_err(|failure| VmcsAccessError {
                field: field::VM_INSTRUCTION_ERROR,
                failure,
            })?;
        }
        Ok(ActiveVmcs(()))
    }

    fn read(&self, field: u32) -> Result<u64, VmcsAccessError> {
        self.vmcs()?.read(field)
    }

    /// VMWRITE from a method that cannot fail: a failure is kept and reported by `run`.
    fn write_or_defer(&mut self, field: u32, value: u64) {
        if let Err(e) = self.vmcs().and_then(|mut v| v.write(field, value)) {
            self.deferred.get_or_insert(e);
        }
    }

    fn free_pages(self, pages: &mut dyn HostPages) {
        // SAFETY: VMX is on and the region is this vCPU's. VMCLEAR writes back whatever the CPU
        // cached of it (SDM 25.11.1), after which the memory may be reused.
        let _ = unsafe { vmclear(self.vmcs.hpa) };
        pages.free(self.vmcs);
    }

    /// The exit for a VMX instruction failure before or at VM entry.
    fn entry_failed(&mut self, failure: VmcsFailure) -> VmExit {
        let error = match failure {
            VmcsFailure::NoCurrentVmcs => 0,
            VmcsFailure::Error(e) => e.number(),
        };
        self.raw = [u64::MAX, u64::from(error), 0];
        VmExit::EntryFailed {
            reason: EntryFailure::VmxInstruction { error },
        }
    }

    /// Flushes what the TLBs may hold for this guest before an entry (SDM 29.4.3.1): INVEPT for
    /// the EPT-derived guest-physical and combined mappings, and on the first entry INVVPID for
    /// linear mappings a previous user of the same VPID left behind.
    fn flush(&mut self) -> Result<(), VmcsFailure> {
        // SAFETY: VMX is on; `new` chose a type the CPU reports as supported.
        unsafe { invept_raw(self.invept_kind, self.eptp) }?;
        if !self.launched {
            if let Some(kind) = self.invvpid_kind {
                // SAFETY: as above, for INVVPID.
                unsafe { invvpid_raw(kind, self.vpid) }?;
            }
        }
        self.flush_pending = false;
        Ok(())
    }
}

/// Host-state area (SDM 25.5, checked by 27.2.3, loaded on exit by 28.5): the current control
/// registers, the kernel's GDT selectors, the bases of FS/GS/TR/GDTR/IDTR, SYSENTER, EFER, PAT.
/// HOST_RSP and HOST_RIP are written by the world switch.
fn write_host_state(v: &mut ActiveVmcs) -> Result<(), VmcsAccessError> {
    v.write(field::HOST_CR0, Cr0::read_raw())?;
    let (frame, flags) = Cr3::read_raw();
    v.write(
        field::HOST_CR3,
        frame.start_address().as_u64() | u64::from(flags),
    )?;
    v.write(field::HOST_CR4, Cr4::read_raw())?;
    v.write(field::HOST_CS_SELECTOR, CS::get_reg().0.into())?;
    for (selector_field, selector) in [
        (field::HOST_SS_SELECTOR, SS::get_reg()),
        (field::HOST_DS_SELECTOR, DS::get_reg()),
        (field::HOST_ES_SELECTOR, ES::get_reg()),
        (field::HOST_FS_SELECTOR, FS::get_reg()),
        (field::HOST_GS_SELECTOR, GS::get_reg()),
    ] {
        v.write(selector_field, host_data_selector(selector.0).into())?;
    }
    let tr: u16;
    // SAFETY: STR only reads the task register's selector.
    unsafe { asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    v.write(field::HOST_TR_SELECTOR, tr.into())?;
    let gdt = sgdt();
    let desc = gdt.base.as_u64() + u64::from(tr & !7);
    // SAFETY: TR names a 16-byte TSS descriptor inside the loaded GDT (the kernel loaded TR
    // from its own GDT, which stays mapped for the kernel's lifetime); reading it has no effect.
    let (low, high) = unsafe {
        (
            core::ptr::read_volatile(desc as *const u64),
            core::ptr::read_volatile((desc + 8) as *const u64),
        )
    };
    v.write(field::HOST_TR_BASE, tss_descriptor_base(low, high))?;
    v.write(field::HOST_GDTR_BASE, gdt.base.as_u64())?;
    v.write(field::HOST_IDTR_BASE, sidt().base.as_u64())?;
    v.write(field::HOST_FS_BASE, FsBase::read().as_u64())?;
    v.write(field::HOST_GS_BASE, GsBase::read().as_u64())?;
    v.write(field::HOST_IA32_SYSENTER_CS, read_msr(IA32_SYSENTER_CS))?;
    v.write(field::HOST_IA32_SYSENTER_ESP, read_msr(IA32_SYSENTER_ESP))?;
    v.write(field::HOST_IA32_SYSENTER_EIP, read_msr(IA32_SYSENTER_EIP))?;
    v.write(field::HOST_IA32_EFER, Efer::read_raw())?;
    v.write(field::HOST_IA32_PAT, read_msr(IA32_PAT))?;
    Ok(())
}

/// What `world_switch` reports.
const SWITCH_EXITED: u64 = 0;
const SWITCH_FAIL_INVALID: u64 = 1;
const SWITCH_FAIL_VALID: u64 = 2;

/// The world switch: VMLAUNCH (`launched` false) or VMRESUME of the current VMCS with the guest
/// GPRs from `gprs`, which receives them back at the exit. Returns `SWITCH_EXITED` after a VM
/// exit (also a VM-entry failure exit, SDM 27.8), or `SWITCH_FAIL_INVALID`/`SWITCH_FAIL_VALID`
/// when the instruction itself (or the VMWRITE of HOST_RSP/HOST_RIP) failed with
/// VMfailInvalid/VMfailValid (SDM 31.3 "VMLAUNCH/VMRESUME") and the guest never ran.
///
/// # Safety
/// VMX is on; the current VMCS belongs to the caller and holds complete, valid control and
/// host state; its EPT maps only memory given to this guest.
unsafe fn world_switch(gprs: *mut GuestGprs, launched: bool) -> u64 {
    let result: u64;
    // SAFETY: see the function's contract. RBX and RBP cannot be asm operands, so they are
    // pushed and popped by hand; every other GPR is an output or clobber. The host RSP stored
    // in the VMCS points at the pushed `gprs` pointer, so the exit lands with the stack exactly
    // as it was before the entry; RFLAGS (IF, DF) is restored by POPFQ on both paths.
    unsafe {
        asm!(
            "pushfq",
            "cli",
            "push rbp",
            "push rbx",
            "push rdi",                 // [rsp] = gprs: the host RSP of the exit
            "mov rax, {host_rsp}",
            "vmwrite rax, rsp",
            "jbe 7f",
            "lea rdx, [rip + 3f]",
            "mov rax, {host_rip}",
            "vmwrite rax, rdx",
            "jbe 7f",
            "test rsi, rsi",            // ZF = !launched; MOV below does not change flags
            "mov rax, [rdi + {rax}]",
            "mov rcx, [rdi + {rcx}]",
            "mov rdx, [rdi + {rdx}]",
            "mov rbx, [rdi + {rbx}]",
            "mov rbp, [rdi + {rbp}]",
            "mov rsi, [rdi + {rsi}]",
            "mov r8, [rdi + {r8}]",
            "mov r9, [rdi + {r9}]",
            "mov r10, [rdi + {r10}]",
            "mov r11, [rdi + {r11}]",
            "mov r12, [rdi + {r12}]",
            "mov r13, [rdi + {r13}]",
            "mov r14, [rdi + {r14}]",
            "mov r15, [rdi + {r15}]",
            "mov rdi, [rdi + {rdi}]",
            "jnz 2f",
            "vmlaunch",
            "jmp 7f",
            "2:",
            "vmresume",
            // Falling through: VMLAUNCH/VMRESUME failed (CF = VMfailInvalid, ZF = VMfailValid).
            "7:",
            "mov eax, {fail_valid}",
            "jz 8f",
            "mov eax, {fail_invalid}",
            "8:",
            "add rsp, 8",
            "jmp 9f",
            // VM exit: host state loaded from the VMCS, GPRs still the guest's.
            "3:",
            "push rax",
            "mov rax, [rsp + 8]",
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
            "pop qword ptr [rax + {rax}]",
            "add rsp, 8",
            "xor eax, eax",
            "9:",
            "pop rbx",
            "pop rbp",
            "popfq",
            host_rsp = const field::HOST_RSP,
            host_rip = const field::HOST_RIP,
            fail_valid = const SWITCH_FAIL_VALID,
            fail_invalid = const SWITCH_FAIL_INVALID,
            rax = const offset_of!(GuestGprs, rax),
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
            inout("rsi") u64::from(launched) => _,
            out("rax") result,
            out("rcx") _,
            out("rdx") _,
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
    result
}

fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> VmExit {
        if let Some(e) = self.deferred.take() {
            return self.entry_failed(e.failure);
        }
        if let Err(e) = self.vmcs() {
            return self.entry_failed(e.failure);
        }
        if self.flush_pending || !self.launched {
            if let Err(failure) = self.flush() {
                return self.entry_failed(failure);
            }
        }
        // CR2 is not part of the VMCS: the guest's value goes into the register for the entry
        // and comes back from it after the exit (SDM 27.3.2 / 28.5 do not touch CR2).
        let guest_cr2 = self.shadow.cr2;
        if read_cr2() != guest_cr2 {
            // SAFETY: CR2 only holds the last page-fault address; the host reads it only in
            // its page-fault handler, about a fault it just took.
            unsafe { asm!("mov cr2, {}", in(reg) guest_cr2, options(nomem, nostack)) };
        }
        let gprs: *mut GuestGprs = &mut self.gprs;
        // SAFETY: `vmcs()` made this vCPU's VMCS current; `new` filled its controls, host and
        // guest state; VMX stays on while any vCPU exists; the EPT was given by the VM owning
        // this vCPU and maps only its RAM.
        let result = unsafe { world_switch(gprs, self.launched) };
        self.shadow.cr2 = read_cr2();
        let v = ActiveVmcs(());
        match result {
            SWITCH_EXITED => {}
            SWITCH_FAIL_INVALID => return self.entry_failed(VmcsFailure::NoCurrentVmcs),
            _ => return self.entry_failed(VmcsFailure::Error(last_instruction_error())),
        }
        let info = match VmxExitInfo::read(&v, self.gprs.rcx) {
            Ok(info) => info,
            Err(e) => return self.entry_failed(e.failure),
        };
        self.raw = [
            u64::from(info.reason),
            info.qualification,
            info.guest_physical,
        ];
        if info.reason & REASON_ENTRY_FAILURE == 0 {
            // A VM exit that is not an entry failure leaves the VMCS launched (SDM 31.3).
            self.launched = true;
            // An event whose delivery the exit interrupted is queued again (SDM 28.2.4).
            let mut v = v;
            if let Err(VmxStateError::Access(e)) = reinject_after_exit(&mut v) {
                return self.entry_failed(e.failure);
            }
        }
        exit_from_vmcs(&info)
    }

    fn gpr(&self, reg: Gpr) -> u64 {
        match self.gprs.slot(reg) {
            Some(&value) => value,
            // RSP, which the VMCS holds.
            None => self.read(field::GUEST_RSP).unwrap_or(0),
        }
    }

    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        match self.gprs.slot_mut(reg) {
            Some(slot) => *slot = value,
            // RSP, which the VMCS holds.
            None => self.write_or_defer(field::GUEST_RSP, value),
        }
    }

    fn rip(&self) -> u64 {
        self.read(field::GUEST_RIP).unwrap_or(0)
    }

    fn set_rip(&mut self, rip: u64) {
        self.write_or_defer(field::GUEST_RIP, rip);
    }

    fn instruction_len(&self) -> Option<u64> {
        // VM-exit instruction length (SDM 28.2.5): valid for exits caused by instructions
        // (I/O, CPUID, HLT, RDMSR/WRMSR, ...), the ones the kernel advances RIP over.
        match self.read(field::VM_EXIT_INSTRUCTION_LEN) {
            Ok(len @ 1..=15) => Some(len),
            _ => None,
        }
    }

    fn inject(&mut self, event: &PendingEvent) -> Result<(), VcpuError> {
        event.validate().map_err(|_| VcpuError::BadEvent)?;
        let mut v = self.vmcs().map_err(|_| VcpuError::BadEvent)?;
        // Error-code delivery depends on CR0.PE of the guest (SDM 27.2.1.3).
        let cr0 = v.read(field::GUEST_CR0).map_err(|_| VcpuError::BadEvent)?;
        let (info, error_code, len) =
            entry_event(event, cr0 & cr0::PE != 0, &self.opts).map_err(|_| VcpuError::BadEvent)?;
        // VM-entry event injection (SDM 25.8.3, delivered by 27.6).
        let written = v
            .write(
                field::VM_ENTRY_EXCEPTION_ERROR_CODE,
                u64::from(error_code.unwrap_or(0)),
            )
            .and_then(|()| v.write(field::VM_ENTRY_INSTRUCTION_LEN, u64::from(len)))
            .and_then(|()| v.write(field::VM_ENTRY_INTERRUPTION_INFO, u64::from(info)));
        written.map_err(|_| VcpuError::BadEvent)
    }

    fn set_tsc_offset(&mut self, offset: i64) {
        // "Use TSC offsetting" is on: guest RDTSC/RDTSCP/RDMSR(TSC) return host TSC + TSC_OFFSET
        // (SDM 26.3, "Changes to Instruction Behavior in VMX Non-Root Operation").
        self.write_or_defer(field::TSC_OFFSET, offset as u64);
        self.shadow.tsc_offset = offset;
    }

    fn set_time_slice(&mut self, tsc_ticks: u64) {
        if !self.preemption_timer {
            return;
        }
        // The timer counts down at the TSC's rate divided by 2^IA32_VMX_MISC[4:0] (SDM 26.5.1),
        // from the value loaded at each entry (the exit does not save it: the full slice again).
        let value = (tsc_ticks >> self.preemption_timer_shift).clamp(1, u64::from(u32::MAX));
        self.write_or_defer(field::VMX_PREEMPTION_TIMER_VALUE, value);
    }

    fn flush_nested_tlb(&mut self) {
        self.flush_pending = true;
    }

    fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let mut state = self.shadow.clone();
        let v = self
            .vmcs()
            .map_err(|_| VcpuError::InvalidState("no current VMCS"))?;
        save_to_state(&v, &self.gprs, &mut state)
            .map_err(|_| VcpuError::InvalidState("VMCS state"))?;
        Ok(state)
    }

    fn load_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        let mut v = self
            .vmcs()
            .map_err(|_| VcpuError::InvalidState("no current VMCS"))?;
        let mut gprs = GuestGprs::default();
        load_from_state(&mut v, &mut gprs, state, &self.opts)
            .map_err(|_| VcpuError::InvalidState("not loadable on VMX"))?;
        self.gprs = gprs;
        self.shadow = state.clone();
        self.deferred = None;
        Ok(())
    }

    fn raw_exit(&self) -> [u64; 3] {
        self.raw
    }

    fn release(self: alloc::boxed::Box<Self>, pages: &mut dyn HostPages) {
        (*self).free_pages(pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoPages;

    impl HostPages for NoPages {
        fn alloc_zeroed(&mut self, _count: usize) -> Option<HostPage> {
            panic!("nothing may be allocated before VMX is on")
        }
        fn free(&mut self, _page: HostPage) {}
    }

    #[test]
    fn no_vcpu_before_vmxon() {
        // On the test host VMX is never turned on: `new` must refuse before executing any VMX
        // instruction or reading an MSR (either would fault here).
        let state = VcpuState::reset_64bit(0x10_0000, 0x8000, 0x2000);
        let err = VmxVcpu::new(&mut NoPages, 1, 0x1000 | 0x1E, &state, &caps())
            .err()
            .unwrap();
        assert!(matches!(err, VmxError::Unsupported(_)), "{err}");
    }

    #[test]
    fn tss_base_from_descriptor() {
        // Base 0xFFFF_8000_1234_5678, limit 0x67, type 9 (available 64-bit TSS), present.
        let low = 0x1200_8934_5678_0067_u64;
        let high = 0xFFFF_8000u64;
        assert_eq!(tss_descriptor_base(low, high), 0xFFFF_8000_1234_5678);
        assert_eq!(tss_descriptor_base(0x0000_8900_0000_0067, 0), 0);
    }

    #[test]
    fn host_selectors_need_rpl0_gdt() {
        assert_eq!(host_data_selector(0x10), 0x10);
        assert_eq!(host_data_selector(0x13), 0);
        assert_eq!(host_data_selector(0x14), 0);
        assert_eq!(host_data_selector(0), 0);
    }

    /// Capability MSRs of a Skylake-like CPU with TRUE controls.
    fn skylake(set: ControlSet) -> u64 {
        match set {
            ControlSet::PinBased => 0x0000_007F_0000_0016,
            ControlSet::Primary => 0xFFF9_FFFE_0400_6172,
            ControlSet::Secondary => 0x0057_CFFF_0000_0000,
            ControlSet::Exit => 0x01FF_FFFF_0003_6DFB,
            ControlSet::Entry => 0x0003_FFFF_0000_11FB,
        }
    }

    fn caps() -> VmxCaps {
        VmxCaps {
            true_controls: true,
            secondary_controls: true,
            ept: true,
            vpid: true,
            unrestricted_guest: true,
            ..VmxCaps::default()
        }
    }

    #[test]
    fn controls_have_what_the_kernel_relies_on() {
        let c = choose_controls(&caps(), true, skylake).unwrap();
        let required = [
            ("pin", c.pin, pin::EXTERNAL_INTERRUPT_EXITING),
            ("pin", c.pin, pin::NMI_EXITING),
            ("primary", c.primary, primary::HLT_EXITING),
            ("primary", c.primary, primary::UNCONDITIONAL_IO_EXITING),
            ("primary", c.primary, primary::USE_TSC_OFFSETTING),
            ("primary", c.primary, primary::ACTIVATE_SECONDARY_CONTROLS),
            ("exit", c.exit, exit::HOST_ADDRESS_SPACE_SIZE),
            ("exit", c.exit, exit::SAVE_EFER),
            ("exit", c.exit, exit::LOAD_EFER),
            ("exit", c.exit, exit::SAVE_PAT),
            ("exit", c.exit, exit::LOAD_PAT),
            ("entry", c.entry, entry::LOAD_EFER),
            ("entry", c.entry, entry::LOAD_PAT),
        ];
        for (set, value, bit) in required {
            assert_ne!(value & bit, 0, "{set} {bit:#x}");
        }
        // No MSR bitmaps: every RDMSR/WRMSR exits.
        assert_eq!(c.primary & primary::USE_MSR_BITMAPS, 0);
        // The TRUE MSR allows CR3 exiting off.
        assert_eq!(c.primary & primary::CR3_LOAD_EXITING, 0);
        assert_eq!(
            c.secondary,
            secondary::ENABLE_EPT | secondary::ENABLE_VPID | secondary::UNRESTRICTED_GUEST
        );
        assert_eq!(c.exit & exit::ACK_INTERRUPT_ON_EXIT, 0);
        assert_eq!(c.entry & entry::IA32E_MODE_GUEST, 0);
    }

    #[test]
    fn optional_controls_are_dropped_not_refused() {
        let no_pat = |set| match set {
            ControlSet::Exit => skylake(set) & !(u64::from(exit::SAVE_PAT | exit::LOAD_PAT) << 32),
            ControlSet::Entry => skylake(set) & !(u64::from(entry::LOAD_PAT) << 32),
            _ => skylake(set),
        };
        let c = choose_controls(
            &VmxCaps {
                vpid: false,
                unrestricted_guest: false,
                ..caps()
            },
            true,
            no_pat,
        )
        .unwrap();
        assert_eq!(c.exit & (exit::SAVE_PAT | exit::LOAD_PAT), 0);
        assert_eq!(c.entry & entry::LOAD_PAT, 0);
        assert_eq!(c.secondary, secondary::ENABLE_EPT);
        // Without EPT in the capability MSR the vCPU cannot be built.
        let no_ept = |set| match set {
            ControlSet::Secondary => 0,
            _ => skylake(set),
        };
        assert!(matches!(
            choose_controls(&caps(), false, no_ept),
            Err(VmxError::Control(_))
        ));
    }

    #[test]
    fn eptp_checked_against_caps() {
        let mut c = caps();
        c.ept_vpid.write_back_memory_type = true;
        c.ept_vpid.page_walk_length_4 = true;
        let ad = crate::paging::EptFormat::eptp(0x1000, true);
        let plain = crate::paging::EptFormat::eptp(0x1000, false);
        assert_eq!(VmxVcpu::check_eptp(plain, &c, 0), Ok(()));
        assert!(VmxVcpu::check_eptp(ad, &c, 0).is_err());
        c.ept_vpid.accessed_dirty_flags = true;
        assert_eq!(VmxVcpu::check_eptp(ad, &c, 0), Ok(()));
        c.ept_vpid.write_back_memory_type = false;
        assert!(VmxVcpu::check_eptp(ad, &c, 0).is_err());
    }
}
