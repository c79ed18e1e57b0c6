//! `vmx`: runs guest CPUs.
//!
//! It will hold the vendor-neutral vCPU and nested-paging traits, their AMD SVM and Intel VMX
//! implementations, NPT/EPT and dirty logging. Today it holds what picks between them:
//! [`caps`], the discovery of the host CPU's virtualization capabilities.
//!
//! Dependency rule: `vmx` never depends on `net`, `migrate` or `storage`, nor on the kernel. It
//! reaches the hardware it does not own (CPUID and MSRs here, later physical memory) through
//! small traits the kernel implements, so its logic runs in host unit tests.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod caps;
pub mod devices;

pub use caps::{
    discover, Capabilities, CpuInfoSource, CpuidResult, EptVpidCaps, SvmCaps, Vendor,
    Virtualization, VmxCaps,
};
pub mod decode;
pub mod dirty;
pub mod exit;
pub mod guest_mem;
pub mod paging;
pub mod state;
pub mod svm;
pub mod vcpu;
pub mod vtx;

pub use dirty::{DirtyBitmap, DirtyError, DirtyPages};
pub use paging::{
    EntryFormat, EptFormat, NestedPageTable, NptFormat, PagingError, PendingFlush, Perm,
    TableMemory,
};

// The vendor-neutral vCPU state and exits the run loop and migration use.
pub use exit::{Backend, EntryFailure, ExitCounters, ExitKind, IoDirection, IoSize, VmExit};
pub use state::{
    ActivityState, DescriptorTable, FpuState, Gprs, Interruptibility, MsrState, PendingEvent,
    PendingEventKind, Segment, SegmentAttributes, StateError, VcpuState,
};
