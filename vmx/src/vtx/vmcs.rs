//! VMCS field encodings (Intel SDM vol. 3C appendix B) and the access trait the VMREAD/VMWRITE
//! glue implements.
//!
//! An encoding is a 32-bit value (SDM 25.11.2, table 25-21 in recent editions): bit 0 access
//! type (0 full, 1 high half of a 64-bit field), bits 9:1 index, bits 11:10 type (0 control,
//! 1 VM-exit information, 2 guest state, 3 host state), bits 14:13 width (0 16-bit, 1 64-bit,
//! 2 32-bit, 3 natural width). The tests check every constant below against the category it is
//! listed under, which catches most transcription slips.

#![forbid(unsafe_code)]

use core::fmt;

use super::error::VmInstructionError;

/// Width of a VMCS field (encoding bits 14:13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldWidth {
    Bits16,
    Bits64,
    Bits32,
    Natural,
}

/// Type of a VMCS field (encoding bits 11:10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Control,
    /// VM-exit information (read-only).
    ReadOnly,
    Guest,
    Host,
}

/// The width encoded in `field`.
pub const fn field_width(field: u32) -> FieldWidth {
    match (field >> 13) & 3 {
        0 => FieldWidth::Bits16,
        1 => FieldWidth::Bits64,
        2 => FieldWidth::Bits32,
        _ => FieldWidth::Natural,
    }
}

/// The type encoded in `field`.
pub const fn field_type(field: u32) -> FieldType {
    match (field >> 10) & 3 {
        0 => FieldType::Control,
        1 => FieldType::ReadOnly,
        2 => FieldType::Guest,
        _ => FieldType::Host,
    }
}

/// Field encodings (SDM vol. 3C appendix B, tables B-1 to B-14).
pub mod field {
    // B.1.1 16-bit control fields.
    pub const VPID: u32 = 0x0000;
    pub const POSTED_INTERRUPT_NOTIFICATION_VECTOR: u32 = 0x0002;
    pub const EPTP_INDEX: u32 = 0x0004;

    // B.1.2 16-bit guest-state fields.
    pub const GUEST_ES_SELECTOR: u32 = 0x0800;
    pub const GUEST_CS_SELECTOR: u32 = 0x0802;
    pub const GUEST_SS_SELECTOR: u32 = 0x0804;
    pub const GUEST_DS_SELECTOR: u32 = 0x0806;
    pub const GUEST_FS_SELECTOR: u32 = 0x0808;
    pub const GUEST_GS_SELECTOR: u32 = 0x080A;
    pub const GUEST_LDTR_SELECTOR: u32 = 0x080C;
    pub const GUEST_TR_SELECTOR: u32 = 0x080E;
    pub const GUEST_INTERRUPT_STATUS: u32 = 0x0810;
    pub const GUEST_PML_INDEX: u32 = 0x0812;

    // B.1.3 16-bit host-state fields.
    pub const HOST_ES_SELECTOR: u32 = 0x0C00;
    pub const HOST_CS_SELECTOR: u32 = 0x0C02;
    pub const HOST_SS_SELECTOR: u32 = 0x0C04;
    pub const HOST_DS_SELECTOR: u32 = 0x0C06;
    pub const HOST_FS_SELECTOR: u32 = 0x0C08;
    pub const HOST_GS_SELECTOR: u32 = 0x0C0A;
    pub const HOST_TR_SELECTOR: u32 = 0x0C0C;

    // B.2.1 64-bit control fields.
    pub const IO_BITMAP_A: u32 = 0x2000;
    pub const IO_BITMAP_B: u32 = 0x2002;
    pub const MSR_BITMAPS: u32 = 0x2004;
    pub const VM_EXIT_MSR_STORE_ADDR: u32 = 0x2006;
    pub const VM_EXIT_MSR_LOAD_ADDR: u32 = 0x2008;
    pub const VM_ENTRY_MSR_LOAD_ADDR: u32 = 0x200A;
    pub const EXECUTIVE_VMCS_POINTER: u32 = 0x200C;
    pub const PML_ADDRESS: u32 = 0x200E;
    pub const TSC_OFFSET: u32 = 0x2010;
    pub const VIRTUAL_APIC_PAGE_ADDR: u32 = 0x2012;
    pub const APIC_ACCESS_ADDR: u32 = 0x2014;
    pub const POSTED_INTERRUPT_DESC_ADDR: u32 = 0x2016;
    pub const VM_FUNCTION_CONTROLS: u32 = 0x2018;
    pub const EPT_POINTER: u32 = 0x201A;
    pub const EOI_EXIT_BITMAP_0: u32 = 0x201C;
    pub const EOI_EXIT_BITMAP_1: u32 = 0x201E;
    pub const EOI_EXIT_BITMAP_2: u32 = 0x2020;
    pub const EOI_EXIT_BITMAP_3: u32 = 0x2022;
    pub const EPTP_LIST_ADDR: u32 = 0x2024;
    pub const VMREAD_BITMAP: u32 = 0x2026;
    pub const VMWRITE_BITMAP: u32 = 0x2028;
    pub const VIRTUALIZATION_EXCEPTION_INFO_ADDR: u32 = 0x202A;
    pub const XSS_EXITING_BITMAP: u32 = 0x202C;
    pub const ENCLS_EXITING_BITMAP: u32 = 0x202E;
    pub const SUBPAGE_PERMISSION_TABLE_POINTER: u32 = 0x2030;
    pub const TSC_MULTIPLIER: u32 = 0x2032;
    pub const TERTIARY_PROC_BASED_VM_EXEC_CONTROL: u32 = 0x2034;

    // B.2.2 64-bit read-only data field.
    pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;

    // B.2.3 64-bit guest-state fields.
    pub const VMCS_LINK_POINTER: u32 = 0x2800;
    pub const GUEST_IA32_DEBUGCTL: u32 = 0x2802;
    pub const GUEST_IA32_PAT: u32 = 0x2804;
    pub const GUEST_IA32_EFER: u32 = 0x2806;
    pub const GUEST_IA32_PERF_GLOBAL_CTRL: u32 = 0x2808;
    pub const GUEST_PDPTE0: u32 = 0x280A;
    pub const GUEST_PDPTE1: u32 = 0x280C;
    pub const GUEST_PDPTE2: u32 = 0x280E;
    pub const GUEST_PDPTE3: u32 = 0x2810;
    pub const GUEST_IA32_BNDCFGS: u32 = 0x2812;

    // B.2.4 64-bit host-state fields.
    pub const HOST_IA32_PAT: u32 = 0x2C00;
    pub const HOST_IA32_EFER: u32 = 0x2C02;
    pub const HOST_IA32_PERF_GLOBAL_CTRL: u32 = 0x2C04;

    // B.3.1 32-bit control fields.
    pub const PIN_BASED_VM_EXEC_CONTROL: u32 = 0x4000;
    pub const CPU_BASED_VM_EXEC_CONTROL: u32 = 0x4002;
    pub const EXCEPTION_BITMAP: u32 = 0x4004;
    pub const PAGE_FAULT_ERROR_CODE_MASK: u32 = 0x4006;
    pub const PAGE_FAULT_ERROR_CODE_MATCH: u32 = 0x4008;
    pub const CR3_TARGET_COUNT: u32 = 0x400A;
    pub const VM_EXIT_CONTROLS: u32 = 0x400C;
    pub const VM_EXIT_MSR_STORE_COUNT: u32 = 0x400E;
    pub const VM_EXIT_MSR_LOAD_COUNT: u32 = 0x4010;
    pub const VM_ENTRY_CONTROLS: u32 = 0x4012;
    pub const VM_ENTRY_MSR_LOAD_COUNT: u32 = 0x4014;
    pub const VM_ENTRY_INTERRUPTION_INFO: u32 = 0x4016;
    pub const VM_ENTRY_EXCEPTION_ERROR_CODE: u32 = 0x4018;
    pub const VM_ENTRY_INSTRUCTION_LEN: u32 = 0x401A;
    pub const TPR_THRESHOLD: u32 = 0x401C;
    pub const SECONDARY_VM_EXEC_CONTROL: u32 = 0x401E;
    pub const PLE_GAP: u32 = 0x4020;
    pub const PLE_WINDOW: u32 = 0x4022;

    // B.3.2 32-bit read-only data fields.
    pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
    pub const VM_EXIT_REASON: u32 = 0x4402;
    pub const VM_EXIT_INTERRUPTION_INFO: u32 = 0x4404;
    pub const VM_EXIT_INTERRUPTION_ERROR_CODE: u32 = 0x4406;
    pub const IDT_VECTORING_INFO: u32 = 0x4408;
    pub const IDT_VECTORING_ERROR_CODE: u32 = 0x440A;
    pub const VM_EXIT_INSTRUCTION_LEN: u32 = 0x440C;
    pub const VM_EXIT_INSTRUCTION_INFO: u32 = 0x440E;

    // B.3.3 32-bit guest-state fields.
    pub const GUEST_ES_LIMIT: u32 = 0x4800;
    pub const GUEST_CS_LIMIT: u32 = 0x4802;
    pub const GUEST_SS_LIMIT: u32 = 0x4804;
    pub const GUEST_DS_LIMIT: u32 = 0x4806;
    pub const GUEST_FS_LIMIT: u32 = 0x4808;
    pub const GUEST_GS_LIMIT: u32 = 0x480A;
    pub const GUEST_LDTR_LIMIT: u32 = 0x480C;
    pub const GUEST_TR_LIMIT: u32 = 0x480E;
    pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
    pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
    pub const GUEST_ES_AR: u32 = 0x4814;
    pub const GUEST_CS_AR: u32 = 0x4816;
    pub const GUEST_SS_AR: u32 = 0x4818;
    pub const GUEST_DS_AR: u32 = 0x481A;
    pub const GUEST_FS_AR: u32 = 0x481C;
    pub const GUEST_GS_AR: u32 = 0x481E;
    pub const GUEST_LDTR_AR: u32 = 0x4820;
    pub const GUEST_TR_AR: u32 = 0x4822;
    pub const GUEST_INTERRUPTIBILITY_STATE: u32 = 0x4824;
    pub const GUEST_ACTIVITY_STATE: u32 = 0x4826;
    pub const GUEST_SMBASE: u32 = 0x4828;
    pub const GUEST_IA32_SYSENTER_CS: u32 = 0x482A;
    pub const VMX_PREEMPTION_TIMER_VALUE: u32 = 0x482E;

    // B.3.4 32-bit host-state field.
    pub const HOST_IA32_SYSENTER_CS: u32 = 0x4C00;

    // B.4.1 natural-width control fields.
    pub const CR0_GUEST_HOST_MASK: u32 = 0x6000;
    pub const CR4_GUEST_HOST_MASK: u32 = 0x6002;
    pub const CR0_READ_SHADOW: u32 = 0x6004;
    pub const CR4_READ_SHADOW: u32 = 0x6006;
    pub const CR3_TARGET_VALUE0: u32 = 0x6008;
    pub const CR3_TARGET_VALUE1: u32 = 0x600A;
    pub const CR3_TARGET_VALUE2: u32 = 0x600C;
    pub const CR3_TARGET_VALUE3: u32 = 0x600E;

    // B.4.2 natural-width read-only data fields.
    pub const EXIT_QUALIFICATION: u32 = 0x6400;
    pub const IO_RCX: u32 = 0x6402;
    pub const IO_RSI: u32 = 0x6404;
    pub const IO_RDI: u32 = 0x6406;
    pub const IO_RIP: u32 = 0x6408;
    pub const GUEST_LINEAR_ADDRESS: u32 = 0x640A;

    // B.4.3 natural-width guest-state fields.
    pub const GUEST_CR0: u32 = 0x6800;
    pub const GUEST_CR3: u32 = 0x6802;
    pub const GUEST_CR4: u32 = 0x6804;
    pub const GUEST_ES_BASE: u32 = 0x6806;
    pub const GUEST_CS_BASE: u32 = 0x6808;
    pub const GUEST_SS_BASE: u32 = 0x680A;
    pub const GUEST_DS_BASE: u32 = 0x680C;
    pub const GUEST_FS_BASE: u32 = 0x680E;
    pub const GUEST_GS_BASE: u32 = 0x6810;
    pub const GUEST_LDTR_BASE: u32 = 0x6812;
    pub const GUEST_TR_BASE: u32 = 0x6814;
    pub const GUEST_GDTR_BASE: u32 = 0x6816;
    pub const GUEST_IDTR_BASE: u32 = 0x6818;
    pub const GUEST_DR7: u32 = 0x681A;
    pub const GUEST_RSP: u32 = 0x681C;
    pub const GUEST_RIP: u32 = 0x681E;
    pub const GUEST_RFLAGS: u32 = 0x6820;
    pub const GUEST_PENDING_DBG_EXCEPTIONS: u32 = 0x6822;
    pub const GUEST_IA32_SYSENTER_ESP: u32 = 0x6824;
    pub const GUEST_IA32_SYSENTER_EIP: u32 = 0x6826;
    pub const GUEST_S_CET: u32 = 0x6828;
    pub const GUEST_SSP: u32 = 0x682A;
    pub const GUEST_INTERRUPT_SSP_TABLE_ADDR: u32 = 0x682C;

    // B.4.4 natural-width host-state fields.
    pub const HOST_CR0: u32 = 0x6C00;
    pub const HOST_CR3: u32 = 0x6C02;
    pub const HOST_CR4: u32 = 0x6C04;
    pub const HOST_FS_BASE: u32 = 0x6C06;
    pub const HOST_GS_BASE: u32 = 0x6C08;
    pub const HOST_TR_BASE: u32 = 0x6C0A;
    pub const HOST_GDTR_BASE: u32 = 0x6C0C;
    pub const HOST_IDTR_BASE: u32 = 0x6C0E;
    pub const HOST_IA32_SYSENTER_ESP: u32 = 0x6C10;
    pub const HOST_IA32_SYSENTER_EIP: u32 = 0x6C12;
    pub const HOST_RSP: u32 = 0x6C14;
    pub const HOST_RIP: u32 = 0x6C16;
}

/// How a VMREAD/VMWRITE failed (SDM 31.2 "Conventions": VMfailInvalid when there is no current
/// VMCS, VMfailValid with an error number in the VM-instruction error field otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmcsFailure {
    /// VMfailInvalid: no current VMCS.
    NoCurrentVmcs,
    /// VMfailValid with this error.
    Error(VmInstructionError),
}

/// A failed VMREAD or VMWRITE of `field`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmcsAccessError {
    pub field: u32,
    pub failure: VmcsFailure,
}

impl fmt::Display for VmcsAccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.failure {
            VmcsFailure::NoCurrentVmcs => {
                write!(f, "VMCS field {:#06x}: no current VMCS", self.field)
            }
            VmcsFailure::Error(e) => write!(f, "VMCS field {:#06x}: {e}", self.field),
        }
    }
}

/// VMREAD of the current VMCS. Implemented by the kernel with the instruction, by a map in tests.
pub trait VmcsRead {
    /// The value of `field`, zero-extended to 64 bits.
    fn read(&self, field: u32) -> Result<u64, VmcsAccessError>;
}

/// VMWRITE of the current VMCS.
pub trait VmcsWrite {
    /// Writes `value` (truncated by the CPU to the field's width).
    fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsAccessError>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::field::*;
    use super::*;
    use alloc::collections::BTreeMap;

    /// An in-memory VMCS: fields that were never written read as unsupported, like fields the
    /// CPU does not implement.
    #[derive(Default, Debug, Clone)]
    pub(crate) struct FakeVmcs(pub BTreeMap<u32, u64>);

    impl VmcsRead for FakeVmcs {
        fn read(&self, field: u32) -> Result<u64, VmcsAccessError> {
            self.0.get(&field).copied().ok_or(VmcsAccessError {
                field,
                failure: VmcsFailure::Error(VmInstructionError::UnsupportedComponent),
            })
        }
    }

    impl VmcsWrite for FakeVmcs {
        fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsAccessError> {
            if field_type(field) == FieldType::ReadOnly {
                return Err(VmcsAccessError {
                    field,
                    failure: VmcsFailure::Error(VmInstructionError::WriteToReadOnly),
                });
            }
            let v = match field_width(field) {
                FieldWidth::Bits16 => value & 0xFFFF,
                FieldWidth::Bits32 => value & 0xFFFF_FFFF,
                _ => value,
            };
            self.0.insert(field, v);
            Ok(())
        }
    }

    use FieldType::*;
    use FieldWidth::*;

    const TABLE: &[(&[u32], FieldWidth, FieldType)] = &[
        (
            &[VPID, POSTED_INTERRUPT_NOTIFICATION_VECTOR, EPTP_INDEX],
            Bits16,
            Control,
        ),
        (
            &[
                GUEST_ES_SELECTOR,
                GUEST_CS_SELECTOR,
                GUEST_SS_SELECTOR,
                GUEST_DS_SELECTOR,
                GUEST_FS_SELECTOR,
                GUEST_GS_SELECTOR,
                GUEST_LDTR_SELECTOR,
                GUEST_TR_SELECTOR,
                GUEST_INTERRUPT_STATUS,
                GUEST_PML_INDEX,
            ],
            Bits16,
            Guest,
        ),
        (
            &[
                HOST_ES_SELECTOR,
                HOST_CS_SELECTOR,
                HOST_SS_SELECTOR,
                HOST_DS_SELECTOR,
                HOST_FS_SELECTOR,
                HOST_GS_SELECTOR,
                HOST_TR_SELECTOR,
            ],
            Bits16,
            Host,
        ),
        (
            &[
                IO_BITMAP_A,
                IO_BITMAP_B,
                MSR_BITMAPS,
                VM_EXIT_MSR_STORE_ADDR,
                VM_EXIT_MSR_LOAD_ADDR,
                VM_ENTRY_MSR_LOAD_ADDR,
                EXECUTIVE_VMCS_POINTER,
                PML_ADDRESS,
                TSC_OFFSET,
                VIRTUAL_APIC_PAGE_ADDR,
                APIC_ACCESS_ADDR,
                POSTED_INTERRUPT_DESC_ADDR,
                VM_FUNCTION_CONTROLS,
                EPT_POINTER,
                EOI_EXIT_BITMAP_0,
                EOI_EXIT_BITMAP_1,
                EOI_EXIT_BITMAP_2,
                EOI_EXIT_BITMAP_3,
                EPTP_LIST_ADDR,
                VMREAD_BITMAP,
                VMWRITE_BITMAP,
                VIRTUALIZATION_EXCEPTION_INFO_ADDR,
                XSS_EXITING_BITMAP,
                ENCLS_EXITING_BITMAP,
                SUBPAGE_PERMISSION_TABLE_POINTER,
                TSC_MULTIPLIER,
                TERTIARY_PROC_BASED_VM_EXEC_CONTROL,
            ],
            Bits64,
            Control,
        ),
        (&[GUEST_PHYSICAL_ADDRESS], Bits64, ReadOnly),
        (
            &[
                VMCS_LINK_POINTER,
                GUEST_IA32_DEBUGCTL,
                GUEST_IA32_PAT,
                GUEST_IA32_EFER,
                GUEST_IA32_PERF_GLOBAL_CTRL,
                GUEST_PDPTE0,
                GUEST_PDPTE1,
                GUEST_PDPTE2,
                GUEST_PDPTE3,
                GUEST_IA32_BNDCFGS,
            ],
            Bits64,
            Guest,
        ),
        (
            &[HOST_IA32_PAT, HOST_IA32_EFER, HOST_IA32_PERF_GLOBAL_CTRL],
            Bits64,
            Host,
        ),
        (
            &[
                PIN_BASED_VM_EXEC_CONTROL,
                CPU_BASED_VM_EXEC_CONTROL,
                EXCEPTION_BITMAP,
                PAGE_FAULT_ERROR_CODE_MASK,
                PAGE_FAULT_ERROR_CODE_MATCH,
                CR3_TARGET_COUNT,
                VM_EXIT_CONTROLS,
                VM_EXIT_MSR_STORE_COUNT,
                VM_EXIT_MSR_LOAD_COUNT,
                VM_ENTRY_CONTROLS,
                VM_ENTRY_MSR_LOAD_COUNT,
                VM_ENTRY_INTERRUPTION_INFO,
                VM_ENTRY_EXCEPTION_ERROR_CODE,
                VM_ENTRY_INSTRUCTION_LEN,
                TPR_THRESHOLD,
                SECONDARY_VM_EXEC_CONTROL,
                PLE_GAP,
                PLE_WINDOW,
            ],
            Bits32,
            Control,
        ),
        (
            &[
                VM_INSTRUCTION_ERROR,
                VM_EXIT_REASON,
                VM_EXIT_INTERRUPTION_INFO,
                VM_EXIT_INTERRUPTION_ERROR_CODE,
                IDT_VECTORING_INFO,
                IDT_VECTORING_ERROR_CODE,
                VM_EXIT_INSTRUCTION_LEN,
                VM_EXIT_INSTRUCTION_INFO,
            ],
            Bits32,
            ReadOnly,
        ),
        (
            &[
                GUEST_ES_LIMIT,
                GUEST_CS_LIMIT,
                GUEST_SS_LIMIT,
                GUEST_DS_LIMIT,
                GUEST_FS_LIMIT,
                GUEST_GS_LIMIT,
                GUEST_LDTR_LIMIT,
                GUEST_TR_LIMIT,
                GUEST_GDTR_LIMIT,
                GUEST_IDTR_LIMIT,
                GUEST_ES_AR,
                GUEST_CS_AR,
                GUEST_SS_AR,
                GUEST_DS_AR,
                GUEST_FS_AR,
                GUEST_GS_AR,
                GUEST_LDTR_AR,
                GUEST_TR_AR,
                GUEST_INTERRUPTIBILITY_STATE,
                GUEST_ACTIVITY_STATE,
                GUEST_SMBASE,
                GUEST_IA32_SYSENTER_CS,
                VMX_PREEMPTION_TIMER_VALUE,
            ],
            Bits32,
            Guest,
        ),
        (&[HOST_IA32_SYSENTER_CS], Bits32, Host),
        (
            &[
                CR0_GUEST_HOST_MASK,
                CR4_GUEST_HOST_MASK,
                CR0_READ_SHADOW,
                CR4_READ_SHADOW,
                CR3_TARGET_VALUE0,
                CR3_TARGET_VALUE1,
                CR3_TARGET_VALUE2,
                CR3_TARGET_VALUE3,
            ],
            Natural,
            Control,
        ),
        (
            &[
                EXIT_QUALIFICATION,
                IO_RCX,
                IO_RSI,
                IO_RDI,
                IO_RIP,
                GUEST_LINEAR_ADDRESS,
            ],
            Natural,
            ReadOnly,
        ),
        (
            &[
                GUEST_CR0,
                GUEST_CR3,
                GUEST_CR4,
                GUEST_ES_BASE,
                GUEST_CS_BASE,
                GUEST_SS_BASE,
                GUEST_DS_BASE,
                GUEST_FS_BASE,
                GUEST_GS_BASE,
                GUEST_LDTR_BASE,
                GUEST_TR_BASE,
                GUEST_GDTR_BASE,
                GUEST_IDTR_BASE,
                GUEST_DR7,
                GUEST_RSP,
                GUEST_RIP,
                GUEST_RFLAGS,
                GUEST_PENDING_DBG_EXCEPTIONS,
                GUEST_IA32_SYSENTER_ESP,
                GUEST_IA32_SYSENTER_EIP,
                GUEST_S_CET,
                GUEST_SSP,
                GUEST_INTERRUPT_SSP_TABLE_ADDR,
            ],
            Natural,
            Guest,
        ),
        (
            &[
                HOST_CR0,
                HOST_CR3,
                HOST_CR4,
                HOST_FS_BASE,
                HOST_GS_BASE,
                HOST_TR_BASE,
                HOST_GDTR_BASE,
                HOST_IDTR_BASE,
                HOST_IA32_SYSENTER_ESP,
                HOST_IA32_SYSENTER_EIP,
                HOST_RSP,
                HOST_RIP,
            ],
            Natural,
            Host,
        ),
    ];

    #[test]
    fn every_encoding_matches_its_table() {
        let mut all = alloc::vec::Vec::new();
        for (fields, width, ty) in TABLE {
            for (i, &f) in fields.iter().enumerate() {
                assert_eq!(field_width(f), *width, "{f:#06x}");
                assert_eq!(field_type(f), *ty, "{f:#06x}");
                assert_eq!(f & 1, 0, "{f:#06x} must be a full-access encoding");
                assert_eq!(f & !0x6FFF, 0, "{f:#06x} has reserved bits");
                // Within a table, indices (bits 9:1) are consecutive in listing order, except
                // where appendix B skips an index (noted per table in the SDM).
                if i > 0 {
                    assert!(f > fields[i - 1], "{f:#06x} out of order");
                }
                all.push(f);
            }
        }
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate encodings");
    }

    #[test]
    fn segment_field_families_are_parallel() {
        // Selector, limit, access rights and base of ES..TR have consecutive indices in the same
        // order (SDM B.1.2, B.3.3, B.4.3), which is what lets the state code handle segments in
        // a table.
        let sels = [
            GUEST_ES_SELECTOR,
            GUEST_CS_SELECTOR,
            GUEST_SS_SELECTOR,
            GUEST_DS_SELECTOR,
            GUEST_FS_SELECTOR,
            GUEST_GS_SELECTOR,
            GUEST_LDTR_SELECTOR,
            GUEST_TR_SELECTOR,
        ];
        let limits = [
            GUEST_ES_LIMIT,
            GUEST_CS_LIMIT,
            GUEST_SS_LIMIT,
            GUEST_DS_LIMIT,
            GUEST_FS_LIMIT,
            GUEST_GS_LIMIT,
            GUEST_LDTR_LIMIT,
            GUEST_TR_LIMIT,
        ];
        let ars = [
            GUEST_ES_AR,
            GUEST_CS_AR,
            GUEST_SS_AR,
            GUEST_DS_AR,
            GUEST_FS_AR,
            GUEST_GS_AR,
            GUEST_LDTR_AR,
            GUEST_TR_AR,
        ];
        let bases = [
            GUEST_ES_BASE,
            GUEST_CS_BASE,
            GUEST_SS_BASE,
            GUEST_DS_BASE,
            GUEST_FS_BASE,
            GUEST_GS_BASE,
            GUEST_LDTR_BASE,
            GUEST_TR_BASE,
        ];
        for i in 0..8 {
            let step = 2 * i as u32;
            assert_eq!(sels[i], sels[0] + step);
            assert_eq!(limits[i], limits[0] + step);
            assert_eq!(ars[i], ars[0] + step);
            assert_eq!(bases[i], bases[0] + step);
        }
        // GDTR/IDTR limits follow TR's limit; access rights follow IDTR's limit.
        assert_eq!(GUEST_GDTR_LIMIT, GUEST_TR_LIMIT + 2);
        assert_eq!(GUEST_ES_AR, GUEST_IDTR_LIMIT + 2);
        assert_eq!(GUEST_GDTR_BASE, GUEST_TR_BASE + 2);
    }

    #[test]
    fn fake_vmcs_behaves_like_vmread_vmwrite() {
        let mut v = FakeVmcs::default();
        v.write(GUEST_CS_SELECTOR, 0x1_0008).unwrap();
        assert_eq!(v.read(GUEST_CS_SELECTOR), Ok(8));
        assert!(v.write(VM_EXIT_REASON, 1).is_err());
        assert!(v.read(GUEST_RIP).is_err());
    }

    #[test]
    fn access_error_display() {
        use alloc::string::ToString;
        let e = VmcsAccessError {
            field: GUEST_RIP,
            failure: VmcsFailure::Error(VmInstructionError::UnsupportedComponent),
        };
        let s = e.to_string();
        assert!(s.contains("0x681e") && s.contains("unsupported"), "{s}");
    }
}
