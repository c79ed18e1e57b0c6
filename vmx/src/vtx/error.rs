//! VM-instruction error numbers (Intel SDM vol. 3C 31.4, table 31-1): what the VM-instruction
//! error field (VMCS 4400h) holds after a VMX instruction fails with VMfailValid.

#![forbid(unsafe_code)]

use core::fmt;

/// A VM-instruction error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmInstructionError {
    /// 1: VMCALL executed in VMX root operation.
    VmcallInRoot,
    /// 2: VMCLEAR with an invalid physical address.
    VmclearInvalidAddress,
    /// 3: VMCLEAR with the VMXON pointer.
    VmclearVmxonPointer,
    /// 4: VMLAUNCH with a non-clear VMCS.
    VmlaunchNonClear,
    /// 5: VMRESUME with a non-launched VMCS.
    VmresumeNonLaunched,
    /// 6: VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME).
    VmresumeAfterVmxoff,
    /// 7: VM entry with invalid control field(s).
    EntryInvalidControls,
    /// 8: VM entry with invalid host-state field(s).
    EntryInvalidHostState,
    /// 9: VMPTRLD with an invalid physical address.
    VmptrldInvalidAddress,
    /// 10: VMPTRLD with the VMXON pointer.
    VmptrldVmxonPointer,
    /// 11: VMPTRLD with an incorrect VMCS revision identifier.
    VmptrldBadRevision,
    /// 12: VMREAD/VMWRITE from/to an unsupported VMCS component.
    UnsupportedComponent,
    /// 13: VMWRITE to a read-only VMCS component.
    WriteToReadOnly,
    /// 15: VMXON executed in VMX root operation.
    VmxonInRoot,
    /// 16: VM entry with an invalid executive-VMCS pointer.
    EntryInvalidExecutiveVmcs,
    /// 17: VM entry with a non-launched executive VMCS.
    EntryNonLaunchedExecutiveVmcs,
    /// 18: VM entry with an executive-VMCS pointer that is not the VMXON pointer.
    EntryExecutiveVmcsNotVmxon,
    /// 19: VMCALL with a non-clear VMCS.
    VmcallNonClear,
    /// 20: VMCALL with invalid VM-exit control fields.
    VmcallInvalidExitControls,
    /// 22: VMCALL with an incorrect MSEG revision identifier.
    VmcallBadMsegRevision,
    /// 23: VMXOFF under dual-monitor treatment of SMIs and SMM.
    VmxoffDualMonitor,
    /// 24: VMCALL with invalid SMM-monitor features.
    VmcallInvalidSmmFeatures,
    /// 25: VM entry with invalid VM-execution control fields in the executive VMCS.
    EntryInvalidExecutiveControls,
    /// 26: VM entry with events blocked by MOV SS.
    EntryBlockedByMovSs,
    /// 28: invalid operand to INVEPT/INVVPID.
    InvalidInveptInvvpidOperand,
    /// A number table 31-1 does not list.
    Unknown(u32),
}

impl VmInstructionError {
    /// From the VM-instruction error field.
    pub const fn from_number(n: u32) -> Self {
        match n {
            1 => Self::VmcallInRoot,
            2 => Self::VmclearInvalidAddress,
            3 => Self::VmclearVmxonPointer,
            4 => Self::VmlaunchNonClear,
            5 => Self::VmresumeNonLaunched,
            6 => Self::VmresumeAfterVmxoff,
            7 => Self::EntryInvalidControls,
            8 => Self::EntryInvalidHostState,
            9 => Self::VmptrldInvalidAddress,
            10 => Self::VmptrldVmxonPointer,
            11 => Self::VmptrldBadRevision,
            12 => Self::UnsupportedComponent,
            13 => Self::WriteToReadOnly,
            15 => Self::VmxonInRoot,
            16 => Self::EntryInvalidExecutiveVmcs,
            17 => Self::EntryNonLaunchedExecutiveVmcs,
            18 => Self::EntryExecutiveVmcsNotVmxon,
            19 => Self::VmcallNonClear,
            20 => Self::VmcallInvalidExitControls,
            22 => Self::VmcallBadMsegRevision,
            23 => Self::VmxoffDualMonitor,
            24 => Self::VmcallInvalidSmmFeatures,
            25 => Self::EntryInvalidExecutiveControls,
            26 => Self::EntryBlockedByMovSs,
            28 => Self::InvalidInveptInvvpidOperand,
            n => Self::Unknown(n),
        }
    }

    /// The error number.
    pub const fn number(self) -> u32 {
        match self {
            Self::VmcallInRoot => 1,
            Self::VmclearInvalidAddress => 2,
            Self::VmclearVmxonPointer => 3,
            Self::VmlaunchNonClear => 4,
            Self::VmresumeNonLaunched => 5,
            Self::VmresumeAfterVmxoff => 6,
            Self::EntryInvalidControls => 7,
            Self::EntryInvalidHostState => 8,
            Self::VmptrldInvalidAddress => 9,
            Self::VmptrldVmxonPointer => 10,
            Self::VmptrldBadRevision => 11,
            Self::UnsupportedComponent => 12,
            Self::WriteToReadOnly => 13,
            Self::VmxonInRoot => 15,
            Self::EntryInvalidExecutiveVmcs => 16,
            Self::EntryNonLaunchedExecutiveVmcs => 17,
            Self::EntryExecutiveVmcsNotVmxon => 18,
            Self::VmcallNonClear => 19,
            Self::VmcallInvalidExitControls => 20,
            Self::VmcallBadMsegRevision => 22,
            Self::VmxoffDualMonitor => 23,
            Self::VmcallInvalidSmmFeatures => 24,
            Self::EntryInvalidExecutiveControls => 25,
            Self::EntryBlockedByMovSs => 26,
            Self::InvalidInveptInvvpidOperand => 28,
            Self::Unknown(n) => n,
        }
    }

    /// The SDM's description.
    pub const fn description(self) -> &'static str {
        match self {
            Self::VmcallInRoot => "VMCALL executed in VMX root operation",
            Self::VmclearInvalidAddress => "VMCLEAR with invalid physical address",
            Self::VmclearVmxonPointer => "VMCLEAR with VMXON pointer",
            Self::VmlaunchNonClear => "VMLAUNCH with non-clear VMCS",
            Self::VmresumeNonLaunched => "VMRESUME with non-launched VMCS",
            Self::VmresumeAfterVmxoff => "VMRESUME after VMXOFF",
            Self::EntryInvalidControls => "VM entry with invalid control field(s)",
            Self::EntryInvalidHostState => "VM entry with invalid host-state field(s)",
            Self::VmptrldInvalidAddress => "VMPTRLD with invalid physical address",
            Self::VmptrldVmxonPointer => "VMPTRLD with VMXON pointer",
            Self::VmptrldBadRevision => "VMPTRLD with incorrect VMCS revision identifier",
            Self::UnsupportedComponent => "VMREAD/VMWRITE from/to unsupported VMCS component",
            Self::WriteToReadOnly => "VMWRITE to read-only VMCS component",
            Self::VmxonInRoot => "VMXON executed in VMX root operation",
            Self::EntryInvalidExecutiveVmcs => "VM entry with invalid executive-VMCS pointer",
            Self::EntryNonLaunchedExecutiveVmcs => "VM entry with non-launched executive VMCS",
            Self::EntryExecutiveVmcsNotVmxon => {
                "VM entry with executive-VMCS pointer not VMXON pointer"
            }
            Self::VmcallNonClear => "VMCALL with non-clear VMCS",
            Self::VmcallInvalidExitControls => "VMCALL with invalid VM-exit control fields",
            Self::VmcallBadMsegRevision => "VMCALL with incorrect MSEG revision identifier",
            Self::VmxoffDualMonitor => "VMXOFF under dual-monitor treatment of SMIs and SMM",
            Self::VmcallInvalidSmmFeatures => "VMCALL with invalid SMM-monitor features",
            Self::EntryInvalidExecutiveControls => {
                "VM entry with invalid VM-execution control fields in executive VMCS"
            }
            Self::EntryBlockedByMovSs => "VM entry with events blocked by MOV SS",
            Self::InvalidInveptInvvpidOperand => "invalid operand to INVEPT/INVVPID",
            Self::Unknown(_) => "unknown VM-instruction error",
        }
    }
}

impl fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VM-instruction error {}: {}",
            self.number(),
            self.description()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn numbers_round_trip() {
        for n in 0..64 {
            assert_eq!(VmInstructionError::from_number(n).number(), n);
        }
        for n in [0, 14, 21, 27, 29, 1000] {
            assert_eq!(
                VmInstructionError::from_number(n),
                VmInstructionError::Unknown(n)
            );
        }
    }

    #[test]
    fn messages_name_the_error() {
        assert_eq!(
            VmInstructionError::from_number(7).to_string(),
            "VM-instruction error 7: VM entry with invalid control field(s)"
        );
        assert_eq!(
            VmInstructionError::from_number(8).to_string(),
            "VM-instruction error 8: VM entry with invalid host-state field(s)"
        );
        assert!(VmInstructionError::from_number(99)
            .to_string()
            .contains("99"));
    }
}
