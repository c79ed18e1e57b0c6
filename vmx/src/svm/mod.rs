//! AMD SVM backend: the pure, host-testable parts.
//!
//! - [`vmcb`]: the VMCB page layout, intercept bits, TLB control, clean bits (APM vol. 2
//!   appendix B, 15.9-15.16).
//! - [`exit`]: exit codes (appendix C) and [`exit_from_vmcb`] into the neutral
//!   [`crate::exit::VmExit`].
//! - [`event`]: the EVENTINJ / EXITINTINFO format (15.20).
//! - [`state`]: [`save_to_state`] / [`load_from_state`] between the VMCB (+ [`GuestGprs`]) and the
//!   neutral [`crate::state::VcpuState`].
//! - [`bitmap`]: IOPM and MSRPM bit positions (15.10.1, 15.11).
//!
//! - [`vcpu`]: the hardware glue: enabling SVM, the host save area, [`SvmVcpu`] and its VMRUN
//!   loop. The only module here with `unsafe`; every other one forbids it.

pub mod bitmap;
pub mod event;
pub mod exit;
pub mod state;
pub mod vcpu;
pub mod vmcb;

pub use bitmap::{
    iopm_fill, iopm_intercepts, iopm_position, iopm_set, msrpm_fill, msrpm_intercepts,
    msrpm_position, msrpm_set, BitPosition, BitmapError, IOPM_SIZE, MSRPM_SIZE,
};
pub use event::{SvmEvent, SvmEventError, SvmEventType};
pub use exit::{exception_has_error_code, exit_code, exit_from_vmcb};
pub use state::{inject, load_from_state, save_to_state, GuestGprs, SvmStateError};
pub use vcpu::{enable_svm, SvmError, SvmVcpu};
pub use vmcb::{TlbControl, Vmcb, VmcbControl, VmcbSegment, VmcbStateSave};

impl Vmcb {
    /// Decodes this VMCB's exit (see [`exit_from_vmcb`]); `gprs` supplies RCX for MSR exits.
    pub fn exit(&self, gprs: &GuestGprs) -> crate::exit::VmExit {
        exit_from_vmcb(
            self.control.exitcode,
            self.control.exitinfo1,
            self.control.exitinfo2,
            gprs.rcx,
        )
    }
}
