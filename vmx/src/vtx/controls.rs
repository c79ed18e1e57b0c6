//! VM-execution, VM-exit and VM-entry control bits (Intel SDM vol. 3C 25.6-25.8, tables 25-5 to
//! 25-7, 25-13, 25-15) and their adjustment to what the CPU allows (appendix A.3-A.5).
//!
//! Each control set has a capability MSR (A.3.1-A.5): bits 31:0 are the allowed 0-settings (a 1
//! there means the control must be 1) and bits 63:32 the allowed 1-settings (a 0 there means the
//! control must be 0). When IA32_VMX_BASIC bit 55 is set, the "TRUE" MSRs report the same for the
//! default-1 controls that may actually be 0 (A.2); pass whichever MSR applies.

#![forbid(unsafe_code)]

use core::fmt;

/// Capability MSR addresses (SDM appendix A; vol. 4 table 2-2).
pub mod msr {
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_MISC: u32 = 0x485;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_VMCS_ENUM: u32 = 0x48A;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    pub const IA32_VMX_VMFUNC: u32 = 0x491;
    pub const IA32_VMX_PROCBASED_CTLS3: u32 = 0x492;
}

/// Pin-based VM-execution controls (SDM table 25-5).
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
    pub const ACTIVATE_PREEMPTION_TIMER: u32 = 1 << 6;
    pub const PROCESS_POSTED_INTERRUPTS: u32 = 1 << 7;
}

/// Primary processor-based VM-execution controls (SDM table 25-6).
pub mod primary {
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    pub const USE_TSC_OFFSETTING: u32 = 1 << 3;
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const INVLPG_EXITING: u32 = 1 << 9;
    pub const MWAIT_EXITING: u32 = 1 << 10;
    pub const RDPMC_EXITING: u32 = 1 << 11;
    pub const RDTSC_EXITING: u32 = 1 << 12;
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    pub const ACTIVATE_TERTIARY_CONTROLS: u32 = 1 << 17;
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    pub const USE_TPR_SHADOW: u32 = 1 << 21;
    pub const NMI_WINDOW_EXITING: u32 = 1 << 22;
    pub const MOV_DR_EXITING: u32 = 1 << 23;
    pub const UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const MONITOR_TRAP_FLAG: u32 = 1 << 27;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR_EXITING: u32 = 1 << 29;
    pub const PAUSE_EXITING: u32 = 1 << 30;
    pub const ACTIVATE_SECONDARY_CONTROLS: u32 = 1 << 31;
}

/// Secondary processor-based VM-execution controls (SDM table 25-7).
pub mod secondary {
    pub const VIRTUALIZE_APIC_ACCESSES: u32 = 1 << 0;
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const DESCRIPTOR_TABLE_EXITING: u32 = 1 << 2;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const VIRTUALIZE_X2APIC_MODE: u32 = 1 << 4;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const WBINVD_EXITING: u32 = 1 << 6;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const APIC_REGISTER_VIRTUALIZATION: u32 = 1 << 8;
    pub const VIRTUAL_INTERRUPT_DELIVERY: u32 = 1 << 9;
    pub const PAUSE_LOOP_EXITING: u32 = 1 << 10;
    pub const RDRAND_EXITING: u32 = 1 << 11;
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    pub const ENABLE_VM_FUNCTIONS: u32 = 1 << 13;
    pub const VMCS_SHADOWING: u32 = 1 << 14;
    pub const ENABLE_ENCLS_EXITING: u32 = 1 << 15;
    pub const RDSEED_EXITING: u32 = 1 << 16;
    pub const ENABLE_PML: u32 = 1 << 17;
    pub const EPT_VIOLATION_VE: u32 = 1 << 18;
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 19;
    pub const ENABLE_XSAVES_XRSTORS: u32 = 1 << 20;
    pub const MODE_BASED_EPT_EXECUTE: u32 = 1 << 22;
    pub const SUB_PAGE_WRITE_PERMISSIONS: u32 = 1 << 23;
    pub const PT_USES_GUEST_PHYSICAL: u32 = 1 << 24;
    pub const USE_TSC_SCALING: u32 = 1 << 25;
    pub const ENABLE_USER_WAIT_PAUSE: u32 = 1 << 26;
    pub const ENABLE_PCONFIG: u32 = 1 << 27;
    pub const ENABLE_ENCLV_EXITING: u32 = 1 << 28;
}

/// VM-exit controls (SDM table 25-13).
pub mod exit {
    pub const SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
    /// The host runs in 64-bit mode after the exit.
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const LOAD_PERF_GLOBAL_CTRL: u32 = 1 << 12;
    pub const ACK_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_EFER: u32 = 1 << 21;
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
    pub const CLEAR_BNDCFGS: u32 = 1 << 23;
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 24;
    pub const CLEAR_RTIT_CTL: u32 = 1 << 25;
    pub const LOAD_CET_STATE: u32 = 1 << 28;
    pub const LOAD_PKRS: u32 = 1 << 29;
}

/// VM-entry controls (SDM table 25-15).
pub mod entry {
    pub const LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
    /// The guest is in IA-32e mode after entry; must equal guest EFER.LMA (SDM 27.3.1.1).
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const ENTRY_TO_SMM: u32 = 1 << 10;
    pub const DEACTIVATE_DUAL_MONITOR: u32 = 1 << 11;
    pub const LOAD_PERF_GLOBAL_CTRL: u32 = 1 << 13;
    pub const LOAD_PAT: u32 = 1 << 14;
    pub const LOAD_EFER: u32 = 1 << 15;
    pub const LOAD_BNDCFGS: u32 = 1 << 16;
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 17;
    pub const LOAD_RTIT_CTL: u32 = 1 << 18;
    pub const LOAD_CET_STATE: u32 = 1 << 20;
    pub const LOAD_PKRS: u32 = 1 << 22;
}

/// One of the five 32-bit control sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlSet {
    PinBased,
    Primary,
    Secondary,
    Exit,
    Entry,
}

impl ControlSet {
    /// The capability MSR to read for this set; `true_ctls` is IA32_VMX_BASIC bit 55. The
    /// secondary controls have no TRUE variant (A.3.3).
    pub const fn capability_msr(self, true_ctls: bool) -> u32 {
        match (self, true_ctls) {
            (Self::PinBased, false) => msr::IA32_VMX_PINBASED_CTLS,
            (Self::PinBased, true) => msr::IA32_VMX_TRUE_PINBASED_CTLS,
            (Self::Primary, false) => msr::IA32_VMX_PROCBASED_CTLS,
            (Self::Primary, true) => msr::IA32_VMX_TRUE_PROCBASED_CTLS,
            (Self::Secondary, _) => msr::IA32_VMX_PROCBASED_CTLS2,
            (Self::Exit, false) => msr::IA32_VMX_EXIT_CTLS,
            (Self::Exit, true) => msr::IA32_VMX_TRUE_EXIT_CTLS,
            (Self::Entry, false) => msr::IA32_VMX_ENTRY_CTLS,
            (Self::Entry, true) => msr::IA32_VMX_TRUE_ENTRY_CTLS,
        }
    }

    /// The VMCS field that holds this set.
    pub const fn field(self) -> u32 {
        use super::vmcs::field;
        match self {
            Self::PinBased => field::PIN_BASED_VM_EXEC_CONTROL,
            Self::Primary => field::CPU_BASED_VM_EXEC_CONTROL,
            Self::Secondary => field::SECONDARY_VM_EXEC_CONTROL,
            Self::Exit => field::VM_EXIT_CONTROLS,
            Self::Entry => field::VM_ENTRY_CONTROLS,
        }
    }

    /// Name of the set for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PinBased => "pin-based",
            Self::Primary => "primary processor-based",
            Self::Secondary => "secondary processor-based",
            Self::Exit => "VM-exit",
            Self::Entry => "VM-entry",
        }
    }

    /// The SDM name of control `bit` in this set, if it has one.
    pub const fn bit_name(self, bit: u8) -> Option<&'static str> {
        let name = match (self, bit) {
            (Self::PinBased, 0) => "external-interrupt exiting",
            (Self::PinBased, 3) => "NMI exiting",
            (Self::PinBased, 5) => "virtual NMIs",
            (Self::PinBased, 6) => "activate VMX-preemption timer",
            (Self::PinBased, 7) => "process posted interrupts",
            (Self::Primary, 2) => "interrupt-window exiting",
            (Self::Primary, 3) => "use TSC offsetting",
            (Self::Primary, 7) => "HLT exiting",
            (Self::Primary, 9) => "INVLPG exiting",
            (Self::Primary, 10) => "MWAIT exiting",
            (Self::Primary, 11) => "RDPMC exiting",
            (Self::Primary, 12) => "RDTSC exiting",
            (Self::Primary, 15) => "CR3-load exiting",
            (Self::Primary, 16) => "CR3-store exiting",
            (Self::Primary, 17) => "activate tertiary controls",
            (Self::Primary, 19) => "CR8-load exiting",
            (Self::Primary, 20) => "CR8-store exiting",
            (Self::Primary, 21) => "use TPR shadow",
            (Self::Primary, 22) => "NMI-window exiting",
            (Self::Primary, 23) => "MOV-DR exiting",
            (Self::Primary, 24) => "unconditional I/O exiting",
            (Self::Primary, 25) => "use I/O bitmaps",
            (Self::Primary, 27) => "monitor trap flag",
            (Self::Primary, 28) => "use MSR bitmaps",
            (Self::Primary, 29) => "MONITOR exiting",
            (Self::Primary, 30) => "PAUSE exiting",
            (Self::Primary, 31) => "activate secondary controls",
            (Self::Secondary, 0) => "virtualize APIC accesses",
            (Self::Secondary, 1) => "enable EPT",
            (Self::Secondary, 2) => "descriptor-table exiting",
            (Self::Secondary, 3) => "enable RDTSCP",
            (Self::Secondary, 4) => "virtualize x2APIC mode",
            (Self::Secondary, 5) => "enable VPID",
            (Self::Secondary, 6) => "WBINVD exiting",
            (Self::Secondary, 7) => "unrestricted guest",
            (Self::Secondary, 8) => "APIC-register virtualization",
            (Self::Secondary, 9) => "virtual-interrupt delivery",
            (Self::Secondary, 10) => "PAUSE-loop exiting",
            (Self::Secondary, 11) => "RDRAND exiting",
            (Self::Secondary, 12) => "enable INVPCID",
            (Self::Secondary, 13) => "enable VM functions",
            (Self::Secondary, 14) => "VMCS shadowing",
            (Self::Secondary, 15) => "enable ENCLS exiting",
            (Self::Secondary, 16) => "RDSEED exiting",
            (Self::Secondary, 17) => "enable PML",
            (Self::Secondary, 18) => "EPT-violation #VE",
            (Self::Secondary, 19) => "conceal VMX from PT",
            (Self::Secondary, 20) => "enable XSAVES/XRSTORS",
            (Self::Secondary, 22) => "mode-based execute control for EPT",
            (Self::Secondary, 23) => "sub-page write permissions for EPT",
            (Self::Secondary, 24) => "Intel PT uses guest physical addresses",
            (Self::Secondary, 25) => "use TSC scaling",
            (Self::Secondary, 26) => "enable user wait and pause",
            (Self::Secondary, 27) => "enable PCONFIG",
            (Self::Secondary, 28) => "enable ENCLV exiting",
            (Self::Exit, 2) => "save debug controls",
            (Self::Exit, 9) => "host address-space size",
            (Self::Exit, 12) => "load IA32_PERF_GLOBAL_CTRL",
            (Self::Exit, 15) => "acknowledge interrupt on exit",
            (Self::Exit, 18) => "save IA32_PAT",
            (Self::Exit, 19) => "load IA32_PAT",
            (Self::Exit, 20) => "save IA32_EFER",
            (Self::Exit, 21) => "load IA32_EFER",
            (Self::Exit, 22) => "save VMX-preemption timer value",
            (Self::Exit, 23) => "clear IA32_BNDCFGS",
            (Self::Exit, 24) => "conceal VMX from PT",
            (Self::Exit, 25) => "clear IA32_RTIT_CTL",
            (Self::Exit, 28) => "load CET state",
            (Self::Exit, 29) => "load PKRS",
            (Self::Entry, 2) => "load debug controls",
            (Self::Entry, 9) => "IA-32e mode guest",
            (Self::Entry, 10) => "entry to SMM",
            (Self::Entry, 11) => "deactivate dual-monitor treatment",
            (Self::Entry, 13) => "load IA32_PERF_GLOBAL_CTRL",
            (Self::Entry, 14) => "load IA32_PAT",
            (Self::Entry, 15) => "load IA32_EFER",
            (Self::Entry, 16) => "load IA32_BNDCFGS",
            (Self::Entry, 17) => "conceal VMX from PT",
            (Self::Entry, 18) => "load IA32_RTIT_CTL",
            (Self::Entry, 20) => "load CET state",
            (Self::Entry, 22) => "load PKRS",
            _ => return None,
        };
        Some(name)
    }

    /// [`adjust_controls`] with errors that name this set and the control.
    pub fn adjust(self, desired: u32, capability_msr: u64) -> Result<u32, ControlError> {
        adjust_controls(desired, capability_msr).map_err(|e| ControlError {
            set: Some(self),
            ..e
        })
    }
}

/// What [`adjust_controls`] could not satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlProblem {
    /// Desired controls the CPU does not allow to be 1.
    NotAllowed,
    /// The capability MSR requires bits to be 1 that it does not allow to be 1: a corrupt or
    /// misread MSR.
    InconsistentCapability,
}

/// A control setting the CPU cannot provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlError {
    /// The control set, when known ([`ControlSet::adjust`]).
    pub set: Option<ControlSet>,
    pub problem: ControlProblem,
    /// The lowest offending bit.
    pub bit: u8,
    /// All offending bits.
    pub bits: u32,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.set.map_or("VMX", ControlSet::name);
        let name = self.set.and_then(|s| s.bit_name(self.bit));
        match self.problem {
            ControlProblem::NotAllowed => {
                write!(f, "{set} control bit {}", self.bit)?;
                if let Some(name) = name {
                    write!(f, " ({name})")?;
                }
                f.write_str(" is not supported by this CPU")?;
            }
            ControlProblem::InconsistentCapability => write!(
                f,
                "{set} capability MSR requires bit {} to be 1 but does not allow it",
                self.bit
            )?,
        }
        if self.bits.count_ones() > 1 {
            write!(f, " (unsupported bits {:#010x})", self.bits)?;
        }
        Ok(())
    }
}

/// The control value to write for `desired` given the capability MSR (SDM A.3.1): bits the CPU
/// requires (low half of the MSR) are added; a desired bit the CPU does not allow (0 in the high
/// half) is an error naming it rather than being silently dropped, since every control we ask for
/// is one the hypervisor relies on.
pub fn adjust_controls(desired: u32, capability_msr: u64) -> Result<u32, ControlError> {
    let must_be_one = capability_msr as u32;
    let may_be_one = (capability_msr >> 32) as u32;
    let inconsistent = must_be_one & !may_be_one;
    if inconsistent != 0 {
        return Err(ControlError {
            set: None,
            problem: ControlProblem::InconsistentCapability,
            bit: inconsistent.trailing_zeros() as u8,
            bits: inconsistent,
        });
    }
    let refused = desired & !may_be_one;
    if refused != 0 {
        return Err(ControlError {
            set: None,
            problem: ControlProblem::NotAllowed,
            bit: refused.trailing_zeros() as u8,
            bits: refused,
        });
    }
    Ok(desired | must_be_one)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// An illustrative primary-controls capability value: allowed-0 0401E172h (the default-1
    /// class of the primary controls, SDM A.2), allowed-1 FFF9FFFEh (bits 0, 17, 18 refused).
    const SKYLAKE_PROC: u64 = 0xFFF9_FFFE_0401_E172;

    #[test]
    fn adds_required_bits() {
        let want = primary::HLT_EXITING
            | primary::USE_IO_BITMAPS
            | primary::USE_MSR_BITMAPS
            | primary::ACTIVATE_SECONDARY_CONTROLS;
        let got = adjust_controls(want, SKYLAKE_PROC).unwrap();
        assert_eq!(got, want | 0x0401_E172);
        assert_eq!(got & want, want);
    }

    #[test]
    fn refuses_unsupported_bits_and_names_them() {
        // Bit 0 is not allowed to be 1 in SKYLAKE_PROC.
        let e = ControlSet::Primary
            .adjust(1 | (1 << 17), SKYLAKE_PROC)
            .unwrap_err();
        assert_eq!(e.problem, ControlProblem::NotAllowed);
        assert_eq!(e.bit, 0);
        assert_eq!(e.bits, 1 | (1 << 17));
        assert_eq!(e.set, Some(ControlSet::Primary));
        let msg = e.to_string();
        assert!(
            msg.contains("primary processor-based control bit 0"),
            "{msg}"
        );
        // Bit 17 (tertiary controls) is refused too, and has a name.
        let e = ControlSet::Primary
            .adjust(1 << 17, SKYLAKE_PROC)
            .unwrap_err();
        assert!(e.to_string().contains("activate tertiary controls"));
    }

    #[test]
    fn unrestricted_guest_missing_is_an_error() {
        let cap = 0x0000_0022_0000_0000; // only EPT and VPID may be 1
        let e = ControlSet::Secondary
            .adjust(secondary::ENABLE_EPT | secondary::UNRESTRICTED_GUEST, cap)
            .unwrap_err();
        assert_eq!(e.bit, 7);
        assert!(e.to_string().contains("unrestricted guest"));
        assert_eq!(
            ControlSet::Secondary.adjust(secondary::ENABLE_EPT | secondary::ENABLE_VPID, cap),
            Ok(0x22)
        );
    }

    #[test]
    fn inconsistent_msr_is_detected() {
        let e = adjust_controls(0, 0x0000_0000_0000_0010).unwrap_err();
        assert_eq!(e.problem, ControlProblem::InconsistentCapability);
        assert_eq!(e.bit, 4);
    }

    #[test]
    fn all_zero_and_all_one_msrs() {
        assert_eq!(adjust_controls(0, 0), Ok(0));
        assert!(adjust_controls(1, 0).is_err());
        assert_eq!(adjust_controls(0, u64::MAX), Ok(u32::MAX));
        assert_eq!(adjust_controls(0x1234, 0xFFFF_FFFF_0000_0000), Ok(0x1234));
    }

    #[test]
    fn capability_msrs_and_fields() {
        assert_eq!(ControlSet::PinBased.capability_msr(false), 0x481);
        assert_eq!(ControlSet::PinBased.capability_msr(true), 0x48D);
        assert_eq!(ControlSet::Primary.capability_msr(true), 0x48E);
        assert_eq!(ControlSet::Secondary.capability_msr(true), 0x48B);
        assert_eq!(ControlSet::Exit.capability_msr(true), 0x48F);
        assert_eq!(ControlSet::Entry.capability_msr(false), 0x484);
        assert_eq!(ControlSet::Entry.field(), 0x4012);
        assert_eq!(ControlSet::Secondary.field(), 0x401E);
    }

    #[test]
    fn every_named_constant_has_a_name() {
        let sets: [(ControlSet, &[u32]); 5] = [
            (
                ControlSet::PinBased,
                &[
                    pin::EXTERNAL_INTERRUPT_EXITING,
                    pin::NMI_EXITING,
                    pin::VIRTUAL_NMIS,
                ],
            ),
            (
                ControlSet::Primary,
                &[
                    primary::HLT_EXITING,
                    primary::USE_IO_BITMAPS,
                    primary::USE_MSR_BITMAPS,
                    primary::ACTIVATE_SECONDARY_CONTROLS,
                    primary::USE_TSC_OFFSETTING,
                ],
            ),
            (
                ControlSet::Secondary,
                &[
                    secondary::ENABLE_EPT,
                    secondary::ENABLE_VPID,
                    secondary::UNRESTRICTED_GUEST,
                    secondary::ENABLE_PML,
                ],
            ),
            (
                ControlSet::Exit,
                &[
                    exit::HOST_ADDRESS_SPACE_SIZE,
                    exit::SAVE_EFER,
                    exit::LOAD_EFER,
                    exit::SAVE_PAT,
                    exit::LOAD_PAT,
                ],
            ),
            (
                ControlSet::Entry,
                &[entry::IA32E_MODE_GUEST, entry::LOAD_EFER, entry::LOAD_PAT],
            ),
        ];
        for (set, bits) in sets {
            for b in bits {
                assert_eq!(b.count_ones(), 1);
                assert!(set.bit_name(b.trailing_zeros() as u8).is_some());
            }
        }
        assert_eq!(ControlSet::Entry.bit_name(9), Some("IA-32e mode guest"));
        assert_eq!(ControlSet::Entry.bit_name(0), None);
    }
}
