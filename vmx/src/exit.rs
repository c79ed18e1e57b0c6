//! Vendor-neutral VM exits: what the kernel's run loop matches on, and per-reason counters for
//! `vm show`.
//!
//! The backends decode their raw exit information into [`VmExit`]: `svm::exit_from_vmcb` (AMD APM
//! vol. 2 appendix C exit codes) and `vtx::exit_from_vmcs` (Intel SDM vol. 3C appendix C basic
//! exit reasons). Anything a backend cannot or need not express neutrally arrives as
//! [`VmExit::Other`] with the raw values, so the run loop can stop the VM with a precise message
//! instead of guessing.

#![forbid(unsafe_code)]

use core::fmt;

/// Which backend produced a raw exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// AMD SVM: codes are VMCB EXITCODE values.
    Svm,
    /// Intel VMX: codes are the full exit-reason field.
    Vmx,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Svm => "SVM",
            Self::Vmx => "VMX",
        })
    }
}

/// Direction of a port I/O access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDirection {
    /// IN / INS: the guest reads the port.
    In,
    /// OUT / OUTS: the guest writes the port.
    Out,
}

/// Operand size of a port I/O access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoSize {
    Byte = 1,
    Word = 2,
    Dword = 4,
}

impl IoSize {
    /// The size in bytes.
    pub const fn bytes(self) -> u8 {
        self as u8
    }

    /// From a size in bytes; `None` unless 1, 2 or 4.
    pub const fn from_bytes(n: u8) -> Option<Self> {
        match n {
            1 => Some(Self::Byte),
            2 => Some(Self::Word),
            4 => Some(Self::Dword),
            _ => None,
        }
    }
}

/// Why VMRUN / VM entry refused the guest state (the guest never ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryFailure {
    /// SVM VMEXIT_INVALID (-1): a VMRUN consistency check failed (APM vol. 2 15.5.1).
    SvmInvalidState,
    /// VMX basic reason 33: invalid guest state (SDM 27.3.1). The qualification says which
    /// check when the CPU knows: 2 = PDPTE loading, 3 = NMI injection blocked by STI, 4 = invalid
    /// VMCS link pointer; 0 otherwise (SDM 27.8 "VM-entry failures during or after
    /// loading guest state").
    VmxInvalidGuestState { qualification: u64 },
    /// VMX basic reason 34: loading MSR `entry` (1-based index) of the VM-entry MSR-load list
    /// failed.
    VmxMsrLoading { entry: u64 },
    /// VMX basic reason 41: a machine-check event during VM entry.
    VmxMachineCheck,
    /// VMX exit reason with bit 31 set and a basic reason not listed above.
    VmxOther { reason: u32 },
    /// VMLAUNCH/VMRESUME (or a VMCS access the entry depends on) failed as an instruction, so
    /// no VM exit happened (SDM 31.2): `error` is the VM-instruction error number of VMfailValid
    /// (SDM 31.4), 0 for VMfailInvalid (no current VMCS).
    VmxInstruction { error: u32 },
}

impl fmt::Display for EntryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SvmInvalidState => f.write_str("VMRUN rejected the VMCB guest state"),
            Self::VmxInvalidGuestState { qualification } => write!(
                f,
                "VM entry failed: invalid guest state (qualification {qualification})"
            ),
            Self::VmxMsrLoading { entry } => {
                write!(f, "VM entry failed loading MSR entry {entry}")
            }
            Self::VmxMachineCheck => f.write_str("VM entry failed: machine check"),
            Self::VmxOther { reason } => write!(f, "VM entry failed: exit reason {reason:#x}"),
            Self::VmxInstruction { error: 0 } => {
                f.write_str("VM entry failed: VMfailInvalid (no current VMCS)")
            }
            Self::VmxInstruction { error } => write!(
                f,
                "VM entry failed: {}",
                crate::vtx::VmInstructionError::from_number(*error)
            ),
        }
    }
}

/// One VM exit, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// CPUID: the hypervisor supplies the result (EAX/ECX hold the leaf/subleaf).
    Cpuid,
    /// HLT: the vCPU waits for an interrupt.
    Hlt,
    /// VMMCALL (AMD) or VMCALL (Intel).
    Hypercall,
    /// IN/OUT/INS/OUTS to a port the I/O bitmap intercepts.
    Io {
        port: u16,
        size: IoSize,
        direction: IoDirection,
        /// INS/OUTS.
        string: bool,
        /// With a REP prefix.
        rep: bool,
    },
    /// RDMSR of `index` (ECX).
    MsrRead { index: u32 },
    /// WRMSR of `index` (ECX); the value is in EDX:EAX.
    MsrWrite { index: u32 },
    /// A guest-physical access the nested page tables (NPT/EPT) do not allow.
    NestedPageFault {
        gpa: u64,
        /// The access was a write.
        write: bool,
        /// The access was an instruction fetch.
        fetch: bool,
        /// The translation existed but forbade the access (write-protect, no-execute); `false`
        /// means the page is not mapped at all (MMIO or outside guest RAM).
        present: bool,
    },
    /// VMX EPT misconfiguration (basic reason 49): an EPT entry the hypervisor wrote is invalid.
    /// Always a hypervisor bug; SVM reports the equivalent as a nested page fault with the
    /// reserved-bit flag.
    NestedPageMisconfig { gpa: u64 },
    /// A host interrupt arrived while the guest ran.
    ExternalInterrupt,
    /// The guest used up its time slice (the VMX-preemption timer): the host takes the CPU
    /// back whatever the guest does.
    SliceExpired,
    /// A host NMI arrived while the guest ran.
    Nmi,
    /// The guest shut down (SVM SHUTDOWN intercept, VMX triple fault): it is dead.
    Shutdown,
    /// An intercepted guest exception.
    Exception { vector: u8, error_code: Option<u32> },
    /// The guest state was refused at VMRUN / VM entry.
    EntryFailed { reason: EntryFailure },
    /// Anything else, with the raw values: the SVM exit code with EXITINFO1/EXITINFO2, or the VMX
    /// exit reason with the exit qualification and guest-physical address.
    Other {
        backend: Backend,
        code: u64,
        info1: u64,
        info2: u64,
    },
}

impl VmExit {
    /// The counter slot of this exit.
    pub const fn kind(&self) -> ExitKind {
        match self {
            Self::Cpuid => ExitKind::Cpuid,
            Self::Hlt => ExitKind::Hlt,
            Self::Hypercall => ExitKind::Hypercall,
            Self::Io { .. } => ExitKind::Io,
            Self::MsrRead { .. } => ExitKind::MsrRead,
            Self::MsrWrite { .. } => ExitKind::MsrWrite,
            Self::NestedPageFault { .. } => ExitKind::NestedPageFault,
            Self::NestedPageMisconfig { .. } => ExitKind::NestedPageMisconfig,
            Self::ExternalInterrupt => ExitKind::ExternalInterrupt,
            Self::SliceExpired => ExitKind::SliceExpired,
            Self::Nmi => ExitKind::Nmi,
            Self::Shutdown => ExitKind::Shutdown,
            Self::Exception { .. } => ExitKind::Exception,
            Self::EntryFailed { .. } => ExitKind::EntryFailed,
            Self::Other { .. } => ExitKind::Other,
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                port,
                size,
                direction,
                string,
                rep,
            } => {
                let dir = match direction {
                    IoDirection::In => "in",
                    IoDirection::Out => "out",
                };
                write!(f, "io {dir} port {port:#x} size {}", size.bytes())?;
                if *string {
                    f.write_str(" string")?;
                }
                if *rep {
                    f.write_str(" rep")?;
                }
                Ok(())
            }
            Self::MsrRead { index } => write!(f, "rdmsr {index:#x}"),
            Self::MsrWrite { index } => write!(f, "wrmsr {index:#x}"),
            Self::NestedPageFault {
                gpa,
                write,
                fetch,
                present,
            } => {
                let access = if *fetch {
                    "fetch"
                } else if *write {
                    "write"
                } else {
                    "read"
                };
                let presence = if *present { "present" } else { "not present" };
                write!(
                    f,
                    "nested page fault at gpa {gpa:#x} ({access}, {presence})"
                )
            }
            Self::NestedPageMisconfig { gpa } => {
                write!(f, "nested page misconfiguration at gpa {gpa:#x}")
            }
            Self::Exception { vector, error_code } => {
                write!(f, "exception {vector}")?;
                if let Some(code) = error_code {
                    write!(f, " error code {code:#x}")?;
                }
                Ok(())
            }
            Self::EntryFailed { reason } => write!(f, "{reason}"),
            Self::Other {
                backend,
                code,
                info1,
                info2,
            } => write!(
                f,
                "unhandled {backend} exit {code:#x} (info {info1:#x}, {info2:#x})"
            ),
            other => f.write_str(other.kind().name()),
        }
    }
}

/// The exit categories counted by [`ExitCounters`], one per [`VmExit`] variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ExitKind {
    Cpuid,
    Hlt,
    Hypercall,
    Io,
    MsrRead,
    MsrWrite,
    NestedPageFault,
    NestedPageMisconfig,
    ExternalInterrupt,
    SliceExpired,
    Nmi,
    Shutdown,
    Exception,
    EntryFailed,
    Other,
}

impl ExitKind {
    /// Number of kinds.
    pub const COUNT: usize = 15;

    /// Every kind, in discriminant order.
    pub const ALL: [ExitKind; Self::COUNT] = [
        Self::Cpuid,
        Self::Hlt,
        Self::Hypercall,
        Self::Io,
        Self::MsrRead,
        Self::MsrWrite,
        Self::NestedPageFault,
        Self::NestedPageMisconfig,
        Self::ExternalInterrupt,
        Self::SliceExpired,
        Self::Nmi,
        Self::Shutdown,
        Self::Exception,
        Self::EntryFailed,
        Self::Other,
    ];

    /// Index into counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Short name for the console.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cpuid => "cpuid",
            Self::Hlt => "hlt",
            Self::Hypercall => "hypercall",
            Self::Io => "io",
            Self::MsrRead => "rdmsr",
            Self::MsrWrite => "wrmsr",
            Self::NestedPageFault => "npf",
            Self::NestedPageMisconfig => "np-misconfig",
            Self::ExternalInterrupt => "intr",
            Self::SliceExpired => "slice",
            Self::Nmi => "nmi",
            Self::Shutdown => "shutdown",
            Self::Exception => "exception",
            Self::EntryFailed => "entry-failed",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Exit counts per [`ExitKind`], for `vm show`. Counters saturate instead of wrapping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExitCounters {
    counts: [u64; ExitKind::COUNT],
}

impl ExitCounters {
    /// All zero.
    pub const fn new() -> Self {
        Self {
            counts: [0; ExitKind::COUNT],
        }
    }

    /// Counts one exit.
    pub fn record(&mut self, exit: &VmExit) {
        self.record_kind(exit.kind());
    }

    /// Counts one exit of `kind`.
    pub fn record_kind(&mut self, kind: ExitKind) {
        let c = &mut self.counts[kind.index()];
        *c = c.saturating_add(1);
    }

    /// The count of `kind`.
    pub const fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind.index()]
    }

    /// The sum of all counts (saturating).
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, &c| a.saturating_add(c))
    }

    /// Every kind with its count, in [`ExitKind::ALL`] order (zeros included).
    pub fn iter(&self) -> impl Iterator<Item = (ExitKind, u64)> + '_ {
        ExitKind::ALL.iter().map(move |&k| (k, self.get(k)))
    }

    /// Sets all counts to zero.
    pub fn reset(&mut self) {
        self.counts = [0; ExitKind::COUNT];
    }
}

/// `name=count` for every non-zero count, space-separated, e.g. `hlt=12 io=340`; `none` if all
/// are zero.
impl fmt::Display for ExitCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (kind, count) in self.iter().filter(|&(_, c)| c != 0) {
            if !first {
                f.write_str(" ")?;
            }
            write!(f, "{kind}={count}")?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn kinds_are_dense_and_named_uniquely() {
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        for a in ExitKind::ALL {
            for b in ExitKind::ALL {
                if a != b {
                    assert_ne!(a.name(), b.name());
                }
            }
        }
    }

    #[test]
    fn counters_count_by_kind() {
        let mut c = ExitCounters::new();
        assert_eq!(c.to_string(), "none");
        c.record(&VmExit::Hlt);
        c.record(&VmExit::Hlt);
        c.record(&VmExit::Io {
            port: 0x3F8,
            size: IoSize::Byte,
            direction: IoDirection::Out,
            string: false,
            rep: false,
        });
        c.record(&VmExit::Other {
            backend: Backend::Svm,
            code: 0x7E,
            info1: 0,
            info2: 0,
        });
        assert_eq!(c.get(ExitKind::Hlt), 2);
        assert_eq!(c.get(ExitKind::Io), 1);
        assert_eq!(c.get(ExitKind::Cpuid), 0);
        assert_eq!(c.total(), 4);
        assert_eq!(c.to_string(), "hlt=2 io=1 other=1");
        assert_eq!(c.iter().count(), ExitKind::COUNT);
        c.reset();
        assert_eq!(c.total(), 0);
    }

    #[test]
    fn counters_saturate() {
        let mut c = ExitCounters::new();
        c.counts[ExitKind::Nmi.index()] = u64::MAX;
        c.counts[ExitKind::Hlt.index()] = 5;
        c.record_kind(ExitKind::Nmi);
        assert_eq!(c.get(ExitKind::Nmi), u64::MAX);
        assert_eq!(c.total(), u64::MAX);
    }

    #[test]
    fn io_size_bytes() {
        for n in 0..=255u8 {
            match IoSize::from_bytes(n) {
                Some(s) => assert_eq!(s.bytes(), n),
                None => assert!(![1, 2, 4].contains(&n)),
            }
        }
    }

    #[test]
    fn exits_display() {
        let io = VmExit::Io {
            port: 0x3F8,
            size: IoSize::Word,
            direction: IoDirection::In,
            string: true,
            rep: true,
        };
        assert_eq!(io.to_string(), "io in port 0x3f8 size 2 string rep");
        let npf = VmExit::NestedPageFault {
            gpa: 0x1000,
            write: true,
            fetch: false,
            present: true,
        };
        assert_eq!(
            npf.to_string(),
            "nested page fault at gpa 0x1000 (write, present)"
        );
        assert_eq!(VmExit::Hlt.to_string(), "hlt");
        let e = VmExit::Exception {
            vector: 13,
            error_code: Some(0x18),
        };
        assert_eq!(e.to_string(), "exception 13 error code 0x18");
        let f = VmExit::EntryFailed {
            reason: EntryFailure::VmxInvalidGuestState { qualification: 0 },
        };
        assert!(f.to_string().contains("invalid guest state"));
        let f = VmExit::EntryFailed {
            reason: EntryFailure::VmxInstruction { error: 7 },
        };
        assert!(f.to_string().contains("invalid control field"), "{f}");
        let f = VmExit::EntryFailed {
            reason: EntryFailure::VmxInstruction { error: 0 },
        };
        assert!(f.to_string().contains("VMfailInvalid"), "{f}");
    }
}
