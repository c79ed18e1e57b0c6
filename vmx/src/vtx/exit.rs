//! VMX exit reasons (Intel SDM vol. 3C appendix C) and their decoding into [`VmExit`].
//!
//! The exit-reason field (SDM 25.9.1, table 25-17): bits 15:0 basic exit reason, bit 27 exit from
//! enclave mode, bit 28 pending MTF exit, bit 29 exit from VMX root operation, bit 31 VM-entry
//! failure.

#![forbid(unsafe_code)]

use super::vmcs::{field, VmcsAccessError, VmcsRead};
use crate::exit::{Backend, EntryFailure, IoDirection, IoSize, VmExit};

/// Basic exit reasons (SDM appendix C, table C-1).
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT: u16 = 3;
    pub const SIPI: u16 = 4;
    pub const IO_SMI: u16 = 5;
    pub const OTHER_SMI: u16 = 6;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const NMI_WINDOW: u16 = 8;
    pub const TASK_SWITCH: u16 = 9;
    pub const CPUID: u16 = 10;
    pub const GETSEC: u16 = 11;
    pub const HLT: u16 = 12;
    pub const INVD: u16 = 13;
    pub const INVLPG: u16 = 14;
    pub const RDPMC: u16 = 15;
    pub const RDTSC: u16 = 16;
    pub const RSM: u16 = 17;
    pub const VMCALL: u16 = 18;
    pub const VMCLEAR: u16 = 19;
    pub const VMLAUNCH: u16 = 20;
    pub const VMPTRLD: u16 = 21;
    pub const VMPTRST: u16 = 22;
    pub const VMREAD: u16 = 23;
    pub const VMRESUME: u16 = 24;
    pub const VMWRITE: u16 = 25;
    pub const VMXOFF: u16 = 26;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const MOV_DR: u16 = 29;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const ENTRY_FAILURE_GUEST_STATE: u16 = 33;
    pub const ENTRY_FAILURE_MSR_LOADING: u16 = 34;
    pub const MWAIT: u16 = 36;
    pub const MONITOR_TRAP_FLAG: u16 = 37;
    pub const MONITOR: u16 = 39;
    pub const PAUSE: u16 = 40;
    pub const ENTRY_FAILURE_MACHINE_CHECK: u16 = 41;
    pub const TPR_BELOW_THRESHOLD: u16 = 43;
    pub const APIC_ACCESS: u16 = 44;
    pub const VIRTUALIZED_EOI: u16 = 45;
    pub const GDTR_IDTR_ACCESS: u16 = 46;
    pub const LDTR_TR_ACCESS: u16 = 47;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const RDTSCP: u16 = 51;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const WBINVD: u16 = 54;
    pub const XSETBV: u16 = 55;
    pub const APIC_WRITE: u16 = 56;
    pub const RDRAND: u16 = 57;
    pub const INVPCID: u16 = 58;
    pub const VMFUNC: u16 = 59;
    pub const ENCLS: u16 = 60;
    pub const RDSEED: u16 = 61;
    pub const PML_FULL: u16 = 62;
    pub const XSAVES: u16 = 63;
    pub const XRSTORS: u16 = 64;
    pub const PCONFIG: u16 = 65;
    pub const SPP_EVENT: u16 = 66;
    pub const UMWAIT: u16 = 67;
    pub const TPAUSE: u16 = 68;
    pub const LOADIWKEY: u16 = 69;
    pub const ENCLV: u16 = 70;
    pub const ENQCMD_PASID_FAILURE: u16 = 72;
    pub const ENQCMDS_PASID_FAILURE: u16 = 73;
    pub const BUS_LOCK: u16 = 74;
    pub const INSTRUCTION_TIMEOUT: u16 = 75;
}

/// Exit-reason bit 31: the VM entry failed (SDM 27.8).
pub const REASON_ENTRY_FAILURE: u32 = 1 << 31;

/// Name of a basic exit reason for messages.
pub const fn reason_name(basic: u16) -> &'static str {
    match basic {
        0 => "exception or NMI",
        1 => "external interrupt",
        2 => "triple fault",
        3 => "INIT signal",
        4 => "start-up IPI",
        5 => "I/O SMI",
        6 => "other SMI",
        7 => "interrupt window",
        8 => "NMI window",
        9 => "task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        17 => "RSM",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "control-register access",
        29 => "MOV DR",
        30 => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "VM-entry failure: invalid guest state",
        34 => "VM-entry failure: MSR loading",
        36 => "MWAIT",
        37 => "monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "VM-entry failure: machine-check event",
        43 => "TPR below threshold",
        44 => "APIC access",
        45 => "virtualized EOI",
        46 => "access to GDTR or IDTR",
        47 => "access to LDTR or TR",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "VMX-preemption timer expired",
        53 => "INVVPID",
        54 => "WBINVD or WBNOINVD",
        55 => "XSETBV",
        56 => "APIC write",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "page-modification log full",
        63 => "XSAVES",
        64 => "XRSTORS",
        65 => "PCONFIG",
        66 => "SPP-related event",
        67 => "UMWAIT",
        68 => "TPAUSE",
        69 => "LOADIWKEY",
        70 => "ENCLV",
        72 => "ENQCMD PASID translation failure",
        73 => "ENQCMDS PASID translation failure",
        74 => "bus lock",
        75 => "instruction timeout",
        _ => "unknown exit reason",
    }
}

/// Bits of the exit qualification for I/O instructions (SDM 28.2.1 table 28-5; table 27-5 in
/// editions before 2023).
pub mod io_qualification {
    /// Bits 2:0: size of access minus one (0 = 1 byte, 1 = 2 bytes, 3 = 4 bytes).
    pub const SIZE_MASK: u64 = 0x7;
    /// Bit 3: 1 = IN, 0 = OUT.
    pub const DIRECTION_IN: u64 = 1 << 3;
    /// Bit 4: string instruction.
    pub const STRING: u64 = 1 << 4;
    /// Bit 5: REP prefix.
    pub const REP: u64 = 1 << 5;
    /// Bit 6: operand encoding, 1 = immediate port, 0 = DX.
    pub const IMMEDIATE: u64 = 1 << 6;
    /// Bits 31:16: port.
    pub const PORT_SHIFT: u32 = 16;
}

/// Bits of the exit qualification for EPT violations (SDM 28.2.1 table 28-7).
pub mod ept_qualification {
    /// The access was a data read.
    pub const READ: u64 = 1 << 0;
    /// The access was a data write.
    pub const WRITE: u64 = 1 << 1;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 1 << 2;
    /// The guest-physical address was readable (AND of bit 0 of every EPT entry on the walk).
    pub const READABLE: u64 = 1 << 3;
    /// ... writable.
    pub const WRITABLE: u64 = 1 << 4;
    /// ... executable (supervisor-mode executable with mode-based execute control).
    pub const EXECUTABLE: u64 = 1 << 5;
    /// ... user-mode executable (mode-based execute control only).
    pub const USER_EXECUTABLE: u64 = 1 << 6;
    /// The guest linear-address field is valid.
    pub const LINEAR_VALID: u64 = 1 << 7;
    /// With bit 7: the access was to the final translation, not a guest paging structure.
    pub const FINAL_TRANSLATION: u64 = 1 << 8;
    /// NMI unblocking due to IRET: with virtual NMIs, the hypervisor must set "blocking by NMI"
    /// again before resuming (SDM 28.2.3).
    pub const NMI_UNBLOCKING: u64 = 1 << 12;
}

/// Bits of the VM-exit interruption information and IDT-vectoring information fields (SDM
/// 25.9.2 tables 25-18 and 25-19); the VM-entry interruption information (table 25-16) uses the
/// same layout.
pub mod interruption {
    pub const VECTOR_MASK: u32 = 0xFF;
    pub const TYPE_SHIFT: u32 = 8;
    pub const TYPE_MASK: u32 = 0x7 << TYPE_SHIFT;
    pub const TYPE_EXTERNAL: u32 = 0;
    pub const TYPE_NMI: u32 = 2;
    pub const TYPE_HARDWARE_EXCEPTION: u32 = 3;
    pub const TYPE_SOFTWARE_INTERRUPT: u32 = 4;
    pub const TYPE_PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    pub const TYPE_SOFTWARE_EXCEPTION: u32 = 6;
    pub const TYPE_OTHER: u32 = 7;
    pub const ERROR_CODE_VALID: u32 = 1 << 11;
    pub const NMI_UNBLOCKING: u32 = 1 << 12;
    pub const VALID: u32 = 1 << 31;

    /// The type field of `info`.
    pub const fn kind(info: u32) -> u32 {
        (info & TYPE_MASK) >> TYPE_SHIFT
    }
}

/// The VMCS values an exit decodes from. [`VmxExitInfo::read`] collects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmxExitInfo {
    /// Exit reason (4402h), all 32 bits.
    pub reason: u32,
    /// Exit qualification (6400h).
    pub qualification: u64,
    /// Guest-physical address (2400h), for EPT violations and misconfigurations.
    pub guest_physical: u64,
    /// VM-exit interruption information (4404h), for exceptions, NMIs and external interrupts.
    pub interruption_info: u32,
    /// VM-exit interruption error code (4406h).
    pub interruption_error_code: u32,
    /// Guest RCX: the MSR index of RDMSR/WRMSR (not in the VMCS).
    pub rcx: u64,
}

impl VmxExitInfo {
    /// The basic exit reason (bits 15:0).
    pub const fn basic_reason(&self) -> u16 {
        self.reason as u16
    }

    /// Reads the fields the exit's reason needs, and only those: VMREAD of a field the CPU does
    /// not implement fails (e.g. the guest-physical address without EPT).
    pub fn read(vmcs: &impl VmcsRead, rcx: u64) -> Result<Self, VmcsAccessError> {
        let reason = vmcs.read(field::VM_EXIT_REASON)? as u32;
        let mut info = Self {
            reason,
            rcx,
            ..Self::default()
        };
        let basic = reason as u16;
        if reason & REASON_ENTRY_FAILURE != 0
            || matches!(
                basic,
                reason::IO_INSTRUCTION
                    | reason::EPT_VIOLATION
                    | reason::EPT_MISCONFIG
                    | reason::ENTRY_FAILURE_GUEST_STATE
                    | reason::ENTRY_FAILURE_MSR_LOADING
                    | reason::CR_ACCESS
                    | reason::MOV_DR
            )
        {
            info.qualification = vmcs.read(field::EXIT_QUALIFICATION)?;
        }
        if matches!(basic, reason::EPT_VIOLATION | reason::EPT_MISCONFIG) {
            info.guest_physical = vmcs.read(field::GUEST_PHYSICAL_ADDRESS)?;
        }
        if matches!(basic, reason::EXCEPTION_OR_NMI | reason::EXTERNAL_INTERRUPT) {
            info.interruption_info = vmcs.read(field::VM_EXIT_INTERRUPTION_INFO)? as u32;
            if info.interruption_info & interruption::ERROR_CODE_VALID != 0 {
                info.interruption_error_code =
                    vmcs.read(field::VM_EXIT_INTERRUPTION_ERROR_CODE)? as u32;
            }
        }
        Ok(info)
    }
}

/// Decodes a VM exit.
///
/// - 0 exception or NMI: the interruption information (valid bit 31 set) says which; type 2 is
///   an NMI, types 3/5/6 exceptions with the error code when bit 11 is set.
/// - 30 I/O: qualification per table 28-5 (size field 0/1/3; 2 is not a size).
/// - 31/32 RDMSR/WRMSR: the index is guest ECX.
/// - 33/34/41 with bit 31 set: the VM entry failed (SDM 27.8); any reason with bit 31 set is an
///   entry failure.
/// - 48 EPT violation: bits 1 and 2 of the qualification give write/fetch; the translation was
///   present when any of bits 3-5 (readable, writable, executable) is set.
/// - 49 EPT misconfiguration.
///
/// Everything else, and malformed information, gives [`VmExit::Other`] with the full reason, the
/// qualification and the guest-physical address.
pub fn exit_from_vmcs(info: &VmxExitInfo) -> VmExit {
    let q = info.qualification;
    let other = VmExit::Other {
        backend: Backend::Vmx,
        code: u64::from(info.reason),
        info1: q,
        info2: info.guest_physical,
    };
    let basic = info.basic_reason();
    if info.reason & REASON_ENTRY_FAILURE != 0 {
        let reason = match basic {
            reason::ENTRY_FAILURE_GUEST_STATE => {
                EntryFailure::VmxInvalidGuestState { qualification: q }
            }
            reason::ENTRY_FAILURE_MSR_LOADING => EntryFailure::VmxMsrLoading { entry: q },
            reason::ENTRY_FAILURE_MACHINE_CHECK => EntryFailure::VmxMachineCheck,
            _ => EntryFailure::VmxOther {
                reason: info.reason,
            },
        };
        return VmExit::EntryFailed { reason };
    }
    match basic {
        reason::EXCEPTION_OR_NMI => {
            let ii = info.interruption_info;
            if ii & interruption::VALID == 0 {
                return other;
            }
            let vector = (ii & interruption::VECTOR_MASK) as u8;
            match interruption::kind(ii) {
                interruption::TYPE_NMI => VmExit::Nmi,
                interruption::TYPE_HARDWARE_EXCEPTION
                | interruption::TYPE_PRIVILEGED_SOFTWARE_EXCEPTION
                | interruption::TYPE_SOFTWARE_EXCEPTION => VmExit::Exception {
                    vector,
                    error_code: if ii & interruption::ERROR_CODE_VALID != 0 {
                        Some(info.interruption_error_code)
                    } else {
                        None
                    },
                },
                _ => other,
            }
        }
        reason::EXTERNAL_INTERRUPT => VmExit::ExternalInterrupt,
        reason::PREEMPTION_TIMER => VmExit::SliceExpired,
        reason::TRIPLE_FAULT => VmExit::Shutdown,
        reason::CPUID => VmExit::Cpuid,
        reason::HLT => VmExit::Hlt,
        reason::VMCALL => VmExit::Hypercall,
        reason::IO_INSTRUCTION => {
            let size = match q & io_qualification::SIZE_MASK {
                0 => IoSize::Byte,
                1 => IoSize::Word,
                3 => IoSize::Dword,
                _ => return other,
            };
            VmExit::Io {
                port: (q >> io_qualification::PORT_SHIFT) as u16,
                size,
                direction: if q & io_qualification::DIRECTION_IN != 0 {
                    IoDirection::In
                } else {
                    IoDirection::Out
                },
                string: q & io_qualification::STRING != 0,
                rep: q & io_qualification::REP != 0,
            }
        }
        reason::RDMSR => VmExit::MsrRead {
            index: info.rcx as u32,
        },
        reason::WRMSR => VmExit::MsrWrite {
            index: info.rcx as u32,
        },
        reason::EPT_VIOLATION => VmExit::NestedPageFault {
            gpa: info.guest_physical,
            write: q & ept_qualification::WRITE != 0,
            fetch: q & ept_qualification::FETCH != 0,
            present: q
                & (ept_qualification::READABLE
                    | ept_qualification::WRITABLE
                    | ept_qualification::EXECUTABLE)
                != 0,
        },
        reason::EPT_MISCONFIG => VmExit::NestedPageMisconfig {
            gpa: info.guest_physical,
        },
        _ => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::Rng;
    use crate::vtx::vmcs::tests::FakeVmcs;
    use crate::vtx::vmcs::VmcsWrite;

    fn with(reason: u32, qualification: u64) -> VmxExitInfo {
        VmxExitInfo {
            reason,
            qualification,
            ..VmxExitInfo::default()
        }
    }

    #[test]
    fn simple_reasons() {
        assert_eq!(exit_from_vmcs(&with(10, 0)), VmExit::Cpuid);
        assert_eq!(exit_from_vmcs(&with(12, 0)), VmExit::Hlt);
        assert_eq!(exit_from_vmcs(&with(18, 0)), VmExit::Hypercall);
        assert_eq!(exit_from_vmcs(&with(1, 0)), VmExit::ExternalInterrupt);
        assert_eq!(exit_from_vmcs(&with(52, 0)), VmExit::SliceExpired);
        assert_eq!(exit_from_vmcs(&with(2, 0)), VmExit::Shutdown);
    }

    #[test]
    fn io_qualification_per_table_28_5() {
        // OUT DX, AL to 3F8h.
        assert_eq!(
            exit_from_vmcs(&with(30, 0x03F8_0000)),
            VmExit::Io {
                port: 0x3F8,
                size: IoSize::Byte,
                direction: IoDirection::Out,
                string: false,
                rep: false
            }
        );
        // REP INSW from 1F0h.
        assert_eq!(
            exit_from_vmcs(&with(30, 0x01F0_0000 | 0x38 | 1)),
            VmExit::Io {
                port: 0x1F0,
                size: IoSize::Word,
                direction: IoDirection::In,
                string: true,
                rep: true
            }
        );
        // IN EAX, 0x71 (immediate).
        assert!(matches!(
            exit_from_vmcs(&with(30, 0x0071_0000 | 0x40 | 0x8 | 3)),
            VmExit::Io {
                port: 0x71,
                size: IoSize::Dword,
                direction: IoDirection::In,
                ..
            }
        ));
        // Size encoding 2 does not exist.
        assert!(matches!(
            exit_from_vmcs(&with(30, 2)),
            VmExit::Other { code: 30, .. }
        ));
    }

    #[test]
    fn msr_index_from_rcx() {
        let mut i = with(31, 0);
        i.rcx = 0xDEAD_0000_C000_0100;
        assert_eq!(exit_from_vmcs(&i), VmExit::MsrRead { index: 0xC000_0100 });
        i.reason = 32;
        assert_eq!(exit_from_vmcs(&i), VmExit::MsrWrite { index: 0xC000_0100 });
    }

    #[test]
    fn ept_violation_bits() {
        // A write to a page mapped read+execute: present, write.
        let mut i = with(48, 0x2 | 0x8 | 0x20 | 0x80 | 0x100);
        i.guest_physical = 0x0012_3000;
        assert_eq!(
            exit_from_vmcs(&i),
            VmExit::NestedPageFault {
                gpa: 0x0012_3000,
                write: true,
                fetch: false,
                present: true
            }
        );
        // A fetch from an unmapped page.
        i.qualification = 0x4 | 0x80 | 0x100;
        i.guest_physical = 0xFEE0_0000;
        assert_eq!(
            exit_from_vmcs(&i),
            VmExit::NestedPageFault {
                gpa: 0xFEE0_0000,
                write: false,
                fetch: true,
                present: false
            }
        );
        i.reason = 49;
        assert_eq!(
            exit_from_vmcs(&i),
            VmExit::NestedPageMisconfig { gpa: 0xFEE0_0000 }
        );
    }

    #[test]
    fn exceptions_and_nmi() {
        let mut i = with(0, 0);
        i.interruption_info = 0x8000_0B0E; // #PF, hardware exception, error code valid
        i.interruption_error_code = 0x6;
        assert_eq!(
            exit_from_vmcs(&i),
            VmExit::Exception {
                vector: 14,
                error_code: Some(6)
            }
        );
        i.interruption_info = 0x8000_0606; // #UD
        assert_eq!(
            exit_from_vmcs(&i),
            VmExit::Exception {
                vector: 6,
                error_code: None
            }
        );
        i.interruption_info = 0x8000_0603; // INT3: software exception
        assert_eq!(
            exit_from_vmcs(&i),
            VmExit::Exception {
                vector: 3,
                error_code: None
            }
        );
        i.interruption_info = 0x8000_0202;
        assert_eq!(exit_from_vmcs(&i), VmExit::Nmi);
        i.interruption_info = 0x0000_0202; // not valid
        assert!(matches!(exit_from_vmcs(&i), VmExit::Other { .. }));
        i.interruption_info = 0x8000_0730; // type 7: not an exception
        assert!(matches!(exit_from_vmcs(&i), VmExit::Other { .. }));
    }

    #[test]
    fn entry_failures() {
        assert_eq!(
            exit_from_vmcs(&with(REASON_ENTRY_FAILURE | 33, 0)),
            VmExit::EntryFailed {
                reason: EntryFailure::VmxInvalidGuestState { qualification: 0 }
            }
        );
        assert_eq!(
            exit_from_vmcs(&with(REASON_ENTRY_FAILURE | 34, 3)),
            VmExit::EntryFailed {
                reason: EntryFailure::VmxMsrLoading { entry: 3 }
            }
        );
        assert_eq!(
            exit_from_vmcs(&with(REASON_ENTRY_FAILURE | 41, 0)),
            VmExit::EntryFailed {
                reason: EntryFailure::VmxMachineCheck
            }
        );
        assert_eq!(
            exit_from_vmcs(&with(REASON_ENTRY_FAILURE | 12, 0)),
            VmExit::EntryFailed {
                reason: EntryFailure::VmxOther {
                    reason: REASON_ENTRY_FAILURE | 12
                }
            }
        );
    }

    #[test]
    fn other_keeps_raw_values_and_flag_bits_do_not_confuse_decoding() {
        let mut i = with(28, 0x13);
        i.guest_physical = 5;
        assert_eq!(
            exit_from_vmcs(&i),
            VmExit::Other {
                backend: Backend::Vmx,
                code: 28,
                info1: 0x13,
                info2: 5
            }
        );
        // Bit 28 (pending MTF) does not change the basic reason.
        assert_eq!(exit_from_vmcs(&with((1 << 28) | 12, 0)), VmExit::Hlt);
    }

    #[test]
    fn reason_names() {
        assert_eq!(reason_name(48), "EPT violation");
        assert_eq!(reason_name(33), "VM-entry failure: invalid guest state");
        assert_eq!(reason_name(35), "unknown exit reason");
        assert_eq!(reason_name(u16::MAX), "unknown exit reason");
    }

    fn fake_with(fields: &[(u32, u64)]) -> FakeVmcs {
        let mut v = FakeVmcs::default();
        for &(f, val) in fields {
            v.0.insert(f, val);
        }
        v
    }

    #[test]
    fn read_collects_only_needed_fields() {
        // An HLT exit on a VMCS without a guest-physical field: nothing else is read.
        let v = fake_with(&[(field::VM_EXIT_REASON, 12)]);
        assert_eq!(
            exit_from_vmcs(&VmxExitInfo::read(&v, 0).unwrap()),
            VmExit::Hlt
        );
        // EPT violation reads qualification and guest-physical address.
        let v = fake_with(&[
            (field::VM_EXIT_REASON, 48),
            (field::EXIT_QUALIFICATION, 0x2 | 0x8),
            (field::GUEST_PHYSICAL_ADDRESS, 0x7000),
        ]);
        assert_eq!(
            exit_from_vmcs(&VmxExitInfo::read(&v, 0).unwrap()),
            VmExit::NestedPageFault {
                gpa: 0x7000,
                write: true,
                fetch: false,
                present: true
            }
        );
        // An exception with an error code reads the error-code field.
        let v = fake_with(&[
            (field::VM_EXIT_REASON, 0),
            (field::VM_EXIT_INTERRUPTION_INFO, 0x8000_0B0D),
            (field::VM_EXIT_INTERRUPTION_ERROR_CODE, 0x10),
        ]);
        assert_eq!(
            exit_from_vmcs(&VmxExitInfo::read(&v, 0).unwrap()),
            VmExit::Exception {
                vector: 13,
                error_code: Some(0x10)
            }
        );
        // A missing field is an error, not a panic.
        let v = fake_with(&[(field::VM_EXIT_REASON, 48)]);
        assert!(VmxExitInfo::read(&v, 0).is_err());
        let mut w = FakeVmcs::default();
        assert!(w.write(field::VM_EXIT_REASON, 0).is_err());
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = Rng(11);
        for _ in 0..50_000 {
            let reason = match rng.next() % 3 {
                0 => rng.next() as u32,
                1 => (rng.next() % 80) as u32,
                _ => (rng.next() % 80) as u32 | REASON_ENTRY_FAILURE,
            };
            let info = VmxExitInfo {
                reason,
                qualification: rng.next(),
                guest_physical: rng.next(),
                interruption_info: rng.next() as u32,
                interruption_error_code: rng.next() as u32,
                rcx: rng.next(),
            };
            let _ = exit_from_vmcs(&info);
        }
    }
}
