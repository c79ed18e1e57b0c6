//! Intel VT-x backend: the pure, host-testable parts.
//!
//! - [`vmcs`]: VMCS field encodings (SDM vol. 3C appendix B) and the [`VmcsRead`] / [`VmcsWrite`]
//!   traits the VMREAD/VMWRITE glue implements.
//! - [`controls`]: pin-based, processor-based, exit and entry control bits and
//!   [`adjust_controls`] against the capability MSRs (appendix A.3-A.5).
//! - [`ept`]: EPTP construction and INVEPT/INVVPID operands.
//! - [`exit`]: basic exit reasons (appendix C) and [`exit_from_vmcs`] into the neutral
//!   [`crate::exit::VmExit`].
//! - [`error`]: VM-instruction error numbers with their SDM descriptions (31.4).
//! - [`state`]: [`save_to_state`] / [`load_from_state`] between the VMCS (+ [`GuestGprs`]) and
//!   the neutral [`crate::state::VcpuState`], and [`reinject_after_exit`].
//! - [`bitmap`]: MSR and I/O bitmap bit positions.
//!
//! Section numbers follow SDM editions from 2023 on (25 VMCS, 26 VMX non-root operation, 27 VM
//! entries, 28 VM exits, 29 address translation, 31 VMX instruction reference); editions before
//! that number these chapters one lower (so table 28-5 was table 27-5).
//!
//! - [`vcpu`]: the hardware glue on top of these: [`enable_vmx`] (VMXON) and [`VmxVcpu`]
//!   (VMCLEAR/VMPTRLD, VMREAD/VMWRITE, VMLAUNCH/VMRESUME, INVEPT/INVVPID in inline assembly).
//!   The only module here with `unsafe`; every other one forbids it.

pub mod bitmap;
pub mod controls;
pub mod ept;
pub mod error;
pub mod exit;
pub mod state;
pub mod vcpu;
pub mod vmcs;

pub use controls::{adjust_controls, ControlError, ControlProblem, ControlSet};
pub use ept::{make_eptp, EptMemoryType, EptpError};
pub use error::VmInstructionError;
pub use exit::{exit_from_vmcs, reason_name, VmxExitInfo};
pub use state::{
    entry_event, load_from_state, reinject_after_exit, save_to_state, GuestGprs, VmxLoadOptions,
    VmxStateError,
};
pub use vcpu::{enable_vmx, VmxError, VmxVcpu};
pub use vmcs::{field, VmcsAccessError, VmcsFailure, VmcsRead, VmcsWrite};
