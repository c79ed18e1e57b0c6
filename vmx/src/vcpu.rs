//! The vendor-neutral seams between the hypervisor and a CPU's virtualization extensions.
//!
//! The kernel's VM loop only ever sees these traits and the neutral types ([`VmExit`],
//! [`VcpuState`]); the AMD ([`crate::svm`]) and Intel ([`crate::vtx`]) backends implement
//! them. Hardware structures (VMCB, VMCS, permission bitmaps, save areas) live in host pages
//! the kernel hands out through [`HostPages`].

use crate::exit::VmExit;
use crate::guest_mem::PagingMode;
use crate::state::{PendingEvent, VcpuState};

/// Physically contiguous, zeroed host pages for a hardware structure.
#[derive(Debug)]
pub struct HostPage {
    /// Host-physical address (what the CPU is told).
    pub hpa: u64,
    /// Where the kernel sees the same bytes.
    pub ptr: *mut u8,
    /// Number of 4 KiB pages.
    pub count: usize,
}

// SAFETY: a HostPage is an exclusive claim on physical memory; whoever holds it is the only
// user of those bytes, so moving it to another thread moves that exclusive use with it.
unsafe impl Send for HostPage {}

/// The kernel's supply of host pages for hardware structures.
pub trait HostPages {
    /// `count` zeroed, physically contiguous pages, 4 KiB aligned.
    fn alloc_zeroed(&mut self, count: usize) -> Option<HostPage>;
    /// Gives pages back.
    fn free(&mut self, page: HostPage);
}

/// General-purpose registers by x86 register number (RAX = 0 ... R15 = 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

/// A backend's block of guest GPRs, the ones its world switch loads and stores, addressed by
/// register number. The registers the hardware structure holds instead (RSP in the VMCS; RAX
/// and RSP in the VMCB) have no slot. Implemented with `gpr_block!`.
pub(crate) trait GprBlock {
    /// `reg`'s slot, or `None` if the VMCB/VMCS holds it.
    fn slot(&self, reg: Gpr) -> Option<&u64>;
    /// `reg`'s slot for writing, or `None` if the VMCB/VMCS holds it.
    fn slot_mut(&mut self, reg: Gpr) -> Option<&mut u64>;
}

/// Implements [`GprBlock`] for a GPR struct from its `Register => field` pairs, e.g.
/// `gpr_block! { GuestGprs { Rcx => rcx, Rdx => rdx } }`; registers not named have no slot.
macro_rules! gpr_block {
    ($ty:ty { $($reg:ident => $field:ident),+ $(,)? }) => {
        impl $crate::vcpu::GprBlock for $ty {
            fn slot(&self, reg: $crate::vcpu::Gpr) -> Option<&u64> {
                match reg {
                    $($crate::vcpu::Gpr::$reg => Some(&self.$field),)+
                    _ => None,
                }
            }

            fn slot_mut(&mut self, reg: $crate::vcpu::Gpr) -> Option<&mut u64> {
                match reg {
                    $($crate::vcpu::Gpr::$reg => Some(&mut self.$field),)+
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use gpr_block;

/// Why a vCPU operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuError {
    /// The state cannot be expressed on this backend or is invalid.
    InvalidState(&'static str),
    /// The event cannot be injected.
    BadEvent,
}

/// One virtual CPU. `run` enters the guest until something the hypervisor must handle
/// happens; the handler then reads or changes registers and calls `run` again.
/// The guest's paging mode and code segment: how RIP becomes an address to fetch from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchContext {
    pub mode: PagingMode,
    pub cs_base: u64,
    /// CS.L: 64-bit code.
    pub long: bool,
    /// CS.D/B: 32-bit default operand size outside 64-bit mode.
    pub db: bool,
}

pub trait Vcpu {
    /// Runs the guest until the next exit.
    fn run(&mut self) -> VmExit;
    /// Reads a general-purpose register.
    fn gpr(&self, reg: Gpr) -> u64;
    /// Writes a general-purpose register.
    fn set_gpr(&mut self, reg: Gpr, value: u64);
    /// The guest's instruction pointer.
    fn rip(&self) -> u64;
    /// Moves the guest's instruction pointer (e.g. past an emulated instruction).
    fn set_rip(&mut self, rip: u64);
    /// Length of the instruction that caused the last exit, when the hardware reports it (VMX
    /// always; SVM for I/O exits, or with NRIPS). `None` means the caller must know or decode it.
    fn instruction_len(&self) -> Option<u64>;
    /// Queues an event for delivery at the next entry.
    fn inject(&mut self, event: &PendingEvent) -> Result<(), VcpuError>;
    /// Guest TSC = host TSC + offset.
    fn set_tsc_offset(&mut self, offset: i64);
    /// Bounds each entry to about `tsc_ticks` of host TSC, after which the guest exits with
    /// [`VmExit::SliceExpired`] whatever it does (the VMX-preemption timer). The host's timer
    /// interrupt ends slices too; this is the bound that needs no interrupt delivery at all.
    /// A no-op where the hardware has no such timer (SVM: host interrupts always exit there,
    /// with V_INTR_MASKING).
    fn set_time_slice(&mut self, tsc_ticks: u64) {
        let _ = tsc_ticks;
    }
    /// Makes the next entry flush this guest's nested-paging TLB entries (needed after D bits
    /// were cleared or permissions removed in the nested page tables).
    fn flush_nested_tlb(&mut self);
    /// The complete architectural state, vendor-neutral.
    fn save_state(&self) -> Result<VcpuState, VcpuError>;
    /// What fetching the instruction at RIP needs (to decode its length when the hardware did
    /// not report it). Backends read the few fields directly: the provided version copies the
    /// whole state, too slow for an exit that happens a thousand times a second.
    fn fetch_context(&self) -> Result<FetchContext, VcpuError> {
        let state = self.save_state()?;
        Ok(FetchContext {
            mode: PagingMode {
                cr0: state.cr0,
                cr3: state.cr3,
                cr4: state.cr4,
                efer: state.efer,
            },
            cs_base: state.cs.base,
            long: state.cs.attributes.long,
            db: state.cs.attributes.db,
        })
    }
    /// Replaces the architectural state.
    fn load_state(&mut self, state: &VcpuState) -> Result<(), VcpuError>;
    /// The backend's raw exit information (exit code/reason and its qualifiers), for messages.
    fn raw_exit(&self) -> [u64; 3];
    /// Returns the vCPU's hardware structures to `pages`; it never runs again.
    fn release(self: alloc::boxed::Box<Self>, pages: &mut dyn HostPages);
}
