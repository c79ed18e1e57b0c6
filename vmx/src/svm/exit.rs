//! SVM exit codes (AMD APM vol. 2 appendix C, table C-1) and their decoding into [`VmExit`].

#![forbid(unsafe_code)]

use crate::exit::{Backend, EntryFailure, IoDirection, IoSize, VmExit};

/// EXITCODE values (APM table C-1).
pub mod exit_code {
    /// Read of CR`n`: `CR0_READ + n`.
    pub const CR0_READ: u64 = 0x00;
    /// Write of CR`n`: `CR0_WRITE + n`.
    pub const CR0_WRITE: u64 = 0x10;
    /// Read of DR`n`: `DR0_READ + n`.
    pub const DR0_READ: u64 = 0x20;
    /// Write of DR`n`: `DR0_WRITE + n`.
    pub const DR0_WRITE: u64 = 0x30;
    /// Exception vector `n`: `EXCP_BASE + n` (n = 0-31).
    pub const EXCP_BASE: u64 = 0x40;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const SMI: u64 = 0x62;
    pub const INIT: u64 = 0x63;
    pub const VINTR: u64 = 0x64;
    pub const CR0_SEL_WRITE: u64 = 0x65;
    pub const IDTR_READ: u64 = 0x66;
    pub const GDTR_READ: u64 = 0x67;
    pub const LDTR_READ: u64 = 0x68;
    pub const TR_READ: u64 = 0x69;
    pub const IDTR_WRITE: u64 = 0x6A;
    pub const GDTR_WRITE: u64 = 0x6B;
    pub const LDTR_WRITE: u64 = 0x6C;
    pub const TR_WRITE: u64 = 0x6D;
    pub const RDTSC: u64 = 0x6E;
    pub const RDPMC: u64 = 0x6F;
    pub const PUSHF: u64 = 0x70;
    pub const POPF: u64 = 0x71;
    pub const CPUID: u64 = 0x72;
    pub const RSM: u64 = 0x73;
    pub const IRET: u64 = 0x74;
    pub const SWINT: u64 = 0x75;
    pub const INVD: u64 = 0x76;
    pub const PAUSE: u64 = 0x77;
    pub const HLT: u64 = 0x78;
    pub const INVLPG: u64 = 0x79;
    pub const INVLPGA: u64 = 0x7A;
    pub const IOIO: u64 = 0x7B;
    pub const MSR: u64 = 0x7C;
    pub const TASK_SWITCH: u64 = 0x7D;
    pub const FERR_FREEZE: u64 = 0x7E;
    pub const SHUTDOWN: u64 = 0x7F;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const VMLOAD: u64 = 0x82;
    pub const VMSAVE: u64 = 0x83;
    pub const STGI: u64 = 0x84;
    pub const CLGI: u64 = 0x85;
    pub const SKINIT: u64 = 0x86;
    pub const RDTSCP: u64 = 0x87;
    pub const ICEBP: u64 = 0x88;
    pub const WBINVD: u64 = 0x89;
    pub const MONITOR: u64 = 0x8A;
    pub const MWAIT: u64 = 0x8B;
    pub const MWAIT_CONDITIONAL: u64 = 0x8C;
    pub const XSETBV: u64 = 0x8D;
    pub const RDPRU: u64 = 0x8E;
    pub const EFER_WRITE_TRAP: u64 = 0x8F;
    /// CR`n` write trap: `CR0_WRITE_TRAP + n`.
    pub const CR0_WRITE_TRAP: u64 = 0x90;
    pub const INVLPGB: u64 = 0xA0;
    pub const INVLPGB_ILLEGAL: u64 = 0xA1;
    pub const INVPCID: u64 = 0xA2;
    pub const MCOMMIT: u64 = 0xA3;
    pub const TLBSYNC: u64 = 0xA4;
    /// Nested page fault.
    pub const NPF: u64 = 0x400;
    pub const AVIC_INCOMPLETE_IPI: u64 = 0x401;
    pub const AVIC_NOACCEL: u64 = 0x402;
    pub const VMGEXIT: u64 = 0x403;
    /// VMRUN found invalid guest state (-1).
    pub const INVALID: u64 = u64::MAX;
    /// VMRUN of a busy VMSA (-2, SEV-ES).
    pub const BUSY: u64 = u64::MAX - 1;
}

/// Bits of EXITINFO1 for an IOIO intercept (APM 15.10.2, figure 15-2).
pub mod ioio {
    /// 1 = IN, 0 = OUT.
    pub const TYPE_IN: u64 = 1 << 0;
    /// INS/OUTS.
    pub const STR: u64 = 1 << 2;
    /// REP prefix.
    pub const REP: u64 = 1 << 3;
    /// 8-bit operand.
    pub const SZ8: u64 = 1 << 4;
    /// 16-bit operand.
    pub const SZ16: u64 = 1 << 5;
    /// 32-bit operand.
    pub const SZ32: u64 = 1 << 6;
    /// 16/32/64-bit address size (bits 7-9).
    pub const A16: u64 = 1 << 7;
    pub const A32: u64 = 1 << 8;
    pub const A64: u64 = 1 << 9;
    /// Effective segment of INS/OUTS, bits 12:10.
    pub const SEG_SHIFT: u32 = 10;
    /// Port number, bits 31:16.
    pub const PORT_SHIFT: u32 = 16;
}

/// Bits of EXITINFO1 for a nested page fault (APM 15.25.6): the #PF error code format plus two
/// SVM-specific bits.
pub mod npf {
    /// The page was present (a protection violation, not a missing translation).
    pub const P: u64 = 1 << 0;
    /// The access was a write.
    pub const RW: u64 = 1 << 1;
    /// The access was at CPL 3 (always reported as user for guest page-table walks).
    pub const US: u64 = 1 << 2;
    /// A reserved bit was set in a nested page-table entry (a hypervisor bug).
    pub const RSV: u64 = 1 << 3;
    /// The access was an instruction fetch.
    pub const ID: u64 = 1 << 4;
    /// The fault happened on the final guest-physical address of the access.
    pub const FINAL_ADDRESS: u64 = 1 << 32;
    /// The fault happened while the CPU read the guest's own page tables.
    pub const PAGE_TABLE_WALK: u64 = 1 << 33;
}

/// Whether exception `vector` pushes an error code (SDM vol. 3A table 6-1, APM vol. 2 8.2):
/// #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX. SVM puts it in EXITINFO1 for intercepted
/// exceptions (APM 15.12); for other vectors EXITINFO1 holds nothing useful.
pub const fn exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Decodes a #VMEXIT. `rcx` is the guest's RCX (outside the VMCB): the MSR index of RDMSR/WRMSR
/// is in ECX and the VMCB does not repeat it.
///
/// - IOIO (7Bh): EXITINFO1 per APM 15.10.2: bit 0 IN, bit 2 string, bit 3 REP, bits 4-6 operand
///   size (exactly one set), bits 31:16 port. EXITINFO2 holds the RIP of the next instruction
///   (useful without NRIPS; the backend reads it from the VMCB).
/// - MSR (7Ch): EXITINFO1 = 0 for RDMSR, 1 for WRMSR (APM 15.11).
/// - NPF (400h): EXITINFO2 = faulting guest-physical address, EXITINFO1 = error code (APM
///   15.25.6): bit 0 P, bit 1 write, bit 4 fetch. Bits 32/33 (final address / page-table walk)
///   are ignored: QEMU TCG reports bit 32 together with P and RW for a write to a
///   write-protected NPT page, as hardware does, and neither changes what the access was.
/// - Exceptions (40h + vector): the error code from EXITINFO1 for vectors that push one.
/// - VMEXIT_INVALID (-1): the guest never ran.
///
/// Malformed information (no or several operand-size bits, an unknown MSR direction) and every
/// other code give [`VmExit::Other`] with the raw values.
pub fn exit_from_vmcb(exitcode: u64, exitinfo1: u64, exitinfo2: u64, rcx: u64) -> VmExit {
    let other = VmExit::Other {
        backend: Backend::Svm,
        code: exitcode,
        info1: exitinfo1,
        info2: exitinfo2,
    };
    match exitcode {
        exit_code::CPUID => VmExit::Cpuid,
        exit_code::HLT => VmExit::Hlt,
        exit_code::VMMCALL => VmExit::Hypercall,
        exit_code::INTR => VmExit::ExternalInterrupt,
        exit_code::NMI => VmExit::Nmi,
        exit_code::SHUTDOWN => VmExit::Shutdown,
        exit_code::INVALID => VmExit::EntryFailed {
            reason: EntryFailure::SvmInvalidState,
        },
        exit_code::IOIO => {
            let size = match exitinfo1 & (ioio::SZ8 | ioio::SZ16 | ioio::SZ32) {
                ioio::SZ8 => IoSize::Byte,
                ioio::SZ16 => IoSize::Word,
                ioio::SZ32 => IoSize::Dword,
                _ => return other,
            };
            VmExit::Io {
                port: (exitinfo1 >> ioio::PORT_SHIFT) as u16,
                size,
                direction: if exitinfo1 & ioio::TYPE_IN != 0 {
                    IoDirection::In
                } else {
                    IoDirection::Out
                },
                string: exitinfo1 & ioio::STR != 0,
                rep: exitinfo1 & ioio::REP != 0,
            }
        }
        exit_code::MSR => match exitinfo1 {
            0 => VmExit::MsrRead { index: rcx as u32 },
            1 => VmExit::MsrWrite { index: rcx as u32 },
            _ => other,
        },
        exit_code::NPF => VmExit::NestedPageFault {
            gpa: exitinfo2,
            write: exitinfo1 & npf::RW != 0,
            fetch: exitinfo1 & npf::ID != 0,
            present: exitinfo1 & npf::P != 0,
        },
        c if (exit_code::EXCP_BASE..exit_code::EXCP_BASE + 32).contains(&c) => {
            let vector = (c - exit_code::EXCP_BASE) as u8;
            VmExit::Exception {
                vector,
                error_code: if exception_has_error_code(vector) {
                    Some(exitinfo1 as u32)
                } else {
                    None
                },
            }
        }
        _ => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::Rng;

    fn exit(code: u64, i1: u64, i2: u64) -> VmExit {
        exit_from_vmcb(code, i1, i2, 0)
    }

    #[test]
    fn simple_exits() {
        assert_eq!(exit(0x72, 0, 0), VmExit::Cpuid);
        assert_eq!(exit(0x78, 0, 0), VmExit::Hlt);
        assert_eq!(exit(0x81, 0, 0), VmExit::Hypercall);
        assert_eq!(exit(0x60, 0, 0), VmExit::ExternalInterrupt);
        assert_eq!(exit(0x61, 0, 0), VmExit::Nmi);
        assert_eq!(exit(0x7F, 0, 0), VmExit::Shutdown);
        assert_eq!(
            exit(u64::MAX, 0, 0),
            VmExit::EntryFailed {
                reason: EntryFailure::SvmInvalidState
            }
        );
    }

    #[test]
    fn ioio_out_byte_to_serial() {
        // OUT DX, AL with DX = 3F8h, 64-bit address size.
        let info1 = (0x3F8 << 16) | ioio::A64 | ioio::SZ8;
        assert_eq!(
            exit(0x7B, info1, 0x1234),
            VmExit::Io {
                port: 0x3F8,
                size: IoSize::Byte,
                direction: IoDirection::Out,
                string: false,
                rep: false
            }
        );
    }

    #[test]
    fn ioio_rep_insw_and_in_dword() {
        let info1 = (0x1F0 << 16) | ioio::A32 | ioio::SZ16 | ioio::REP | ioio::STR | ioio::TYPE_IN;
        assert_eq!(
            exit(0x7B, info1, 0),
            VmExit::Io {
                port: 0x1F0,
                size: IoSize::Word,
                direction: IoDirection::In,
                string: true,
                rep: true
            }
        );
        let info1 = (0xCFC << 16) | ioio::SZ32 | ioio::TYPE_IN;
        assert!(matches!(
            exit(0x7B, info1, 0),
            VmExit::Io {
                port: 0xCFC,
                size: IoSize::Dword,
                direction: IoDirection::In,
                ..
            }
        ));
    }

    #[test]
    fn ioio_with_bad_size_is_other() {
        for sz in [
            0,
            ioio::SZ8 | ioio::SZ16,
            ioio::SZ8 | ioio::SZ16 | ioio::SZ32,
        ] {
            assert!(matches!(
                exit(0x7B, (0x60 << 16) | sz, 0),
                VmExit::Other { code: 0x7B, .. }
            ));
        }
    }

    #[test]
    fn msr_direction_and_index_from_rcx() {
        assert_eq!(
            exit_from_vmcb(0x7C, 0, 0, 0xFFFF_FFFF_C000_0080),
            VmExit::MsrRead { index: 0xC000_0080 }
        );
        assert_eq!(
            exit_from_vmcb(0x7C, 1, 0, 0x1B),
            VmExit::MsrWrite { index: 0x1B }
        );
        assert!(matches!(exit(0x7C, 2, 0), VmExit::Other { .. }));
    }

    #[test]
    fn npf_as_qemu_tcg_reports_a_write_protect_fault() {
        // Bit 32 (final address) with P and RW: a write to a present, read-only NPT page.
        let info1 = npf::FINAL_ADDRESS | npf::RW | npf::P | npf::US;
        assert_eq!(
            exit(0x400, info1, 0x0012_3000),
            VmExit::NestedPageFault {
                gpa: 0x0012_3000,
                write: true,
                fetch: false,
                present: true
            }
        );
    }

    #[test]
    fn npf_not_present_fetch_and_page_walk() {
        assert_eq!(
            exit(0x400, npf::FINAL_ADDRESS | npf::ID, 0xFEE0_0000),
            VmExit::NestedPageFault {
                gpa: 0xFEE0_0000,
                write: false,
                fetch: true,
                present: false
            }
        );
        // A read of a missing page while walking the guest's page tables.
        assert_eq!(
            exit(0x400, npf::PAGE_TABLE_WALK | npf::US, 0x5000),
            VmExit::NestedPageFault {
                gpa: 0x5000,
                write: false,
                fetch: false,
                present: false
            }
        );
    }

    #[test]
    fn exceptions_with_and_without_error_codes() {
        assert_eq!(
            exit(0x40 + 13, 0xFFFF_FFFF_0000_0018, 0),
            VmExit::Exception {
                vector: 13,
                error_code: Some(0x18)
            }
        );
        assert_eq!(
            exit(0x40 + 6, 0x55, 0),
            VmExit::Exception {
                vector: 6,
                error_code: None
            }
        );
        assert_eq!(
            exit(0x40 + 31, 0, 0),
            VmExit::Exception {
                vector: 31,
                error_code: None
            }
        );
        assert!(matches!(exit(0x60, 0, 0), VmExit::ExternalInterrupt));
    }

    #[test]
    fn unknown_codes_keep_raw_values() {
        assert_eq!(
            exit(0x7E, 1, 2),
            VmExit::Other {
                backend: Backend::Svm,
                code: 0x7E,
                info1: 1,
                info2: 2
            }
        );
        assert!(matches!(exit(0x403, 0, 0), VmExit::Other { .. }));
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = Rng(7);
        for _ in 0..50_000 {
            let code = match rng.next() % 4 {
                0 => rng.next(),
                1 => rng.next() % 0xA8,
                2 => 0x7B,
                _ => 0x400,
            };
            let _ = exit_from_vmcb(code, rng.next(), rng.next(), rng.next());
        }
    }
}
