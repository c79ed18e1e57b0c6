//! The vendor-neutral architectural state of one vCPU: [`VcpuState`].
//!
//! This is what live migration sends and what a paused VM is made of. It holds architectural
//! state only (registers, segments, control registers, MSRs, FPU/XSAVE image, pending event,
//! interruptibility, TSC offset), never a VMCB or VMCS image, so a state saved on an AMD host can
//! be restored on an Intel host and back (see `shared/ARCHITECTURE.md`, "Seams to hardware").
//!
//! The vendor backends translate: `svm::save_to_state` / `svm::load_from_state` for the VMCB,
//! `vtx::save_to_state` / `vtx::load_from_state` for the VMCS. Each backend also owns the pieces
//! its control block does not hold (for example DR0-DR3 and the FPU on both vendors); their module
//! documentation lists them.
//!
//! Segment attributes are the one place where the vendors disagree on format:
//! [`SegmentAttributes`] is the neutral form and converts to and from the SVM VMCB 12-bit packed
//! `attrib` (AMD APM vol. 2, 15.5.1 and appendix B, "segment attributes") and the VMX 32-bit
//! access-rights format (Intel SDM vol. 3C, 25.4.1, table 25-2).
//!
//! [`VcpuState::encode`] / [`VcpuState::decode`] define the migration wire form (see
//! [`FORMAT_VERSION`] for the layout).
//!
//! Intel SDM vol. 3C section numbers in this crate follow the editions from 2023 on (chapter 25
//! VMCS, 26 VMX non-root operation, 27 VM entries, 28 VM exits, 29 address translation, 31 VMX
//! instruction reference); older editions number these chapters one lower.

#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

/// CR0 bits (Intel SDM vol. 3A 2.5, AMD APM vol. 2 3.1.1).
pub mod cr0 {
    /// Protection enable: protected mode.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor: WAIT/FWAIT honour TS.
    pub const MP: u64 = 1 << 1;
    /// Emulation: x87 instructions raise #NM.
    pub const EM: u64 = 1 << 2;
    /// Task switched: lazy FPU switching.
    pub const TS: u64 = 1 << 3;
    /// Extension type: hard-wired to 1 on every x86-64 processor.
    pub const ET: u64 = 1 << 4;
    /// Numeric error: native x87 error reporting (#MF) instead of the legacy FERR# pin.
    pub const NE: u64 = 1 << 5;
    /// Write protect: supervisor writes honour read-only pages.
    pub const WP: u64 = 1 << 16;
    /// Alignment mask: enables #AC at CPL 3 when RFLAGS.AC is set.
    pub const AM: u64 = 1 << 18;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits (Intel SDM vol. 3A 2.5, AMD APM vol. 2 3.1.3).
pub mod cr4 {
    pub const VME: u64 = 1 << 0;
    pub const PVI: u64 = 1 << 1;
    pub const TSD: u64 = 1 << 2;
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    /// Physical address extension: required for long mode.
    pub const PAE: u64 = 1 << 5;
    pub const MCE: u64 = 1 << 6;
    pub const PGE: u64 = 1 << 7;
    pub const PCE: u64 = 1 << 8;
    /// The OS supports FXSAVE/FXRSTOR: without it SSE instructions raise #UD.
    pub const OSFXSR: u64 = 1 << 9;
    /// The OS handles #XM: without it unmasked SIMD exceptions raise #UD.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const UMIP: u64 = 1 << 11;
    pub const LA57: u64 = 1 << 12;
    /// VMX enable (Intel). Forced to 1 in a VMX guest's real CR4 (IA32_VMX_CR4_FIXED0).
    pub const VMXE: u64 = 1 << 13;
    pub const SMXE: u64 = 1 << 14;
    pub const FSGSBASE: u64 = 1 << 16;
    pub const PCIDE: u64 = 1 << 17;
    pub const OSXSAVE: u64 = 1 << 18;
    pub const SMEP: u64 = 1 << 20;
    pub const SMAP: u64 = 1 << 21;
    pub const PKE: u64 = 1 << 22;
    pub const CET: u64 = 1 << 23;
}

/// IA32_EFER bits (Intel SDM vol. 4 table 2-2, AMD APM vol. 2 3.1.7).
pub mod efer {
    /// System-call extensions (SYSCALL/SYSRET).
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active (set by the processor when LME and CR0.PG are both 1).
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
    /// SVM enable (AMD only; reserved on Intel). Never part of [`super::VcpuState::efer`].
    pub const SVME: u64 = 1 << 12;
}

/// RFLAGS bits (Intel SDM vol. 1 3.4.3).
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    /// Bit 1 is reserved and always reads as 1.
    pub const FIXED: u64 = 1 << 1;
    /// Trap flag (single step).
    pub const TF: u64 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u64 = 1 << 9;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
}

/// The general-purpose registers, including RSP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gprs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl Gprs {
    /// The registers in x86 encoding order (0 = RAX, 1 = RCX, ... 4 = RSP, ... 15 = R15), the
    /// order ModRM/REX register numbers use, so instruction emulation can index them directly.
    pub const fn to_array(&self) -> [u64; 16] {
        [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi,
            self.r8, self.r9, self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
        ]
    }

    /// The inverse of [`Gprs::to_array`].
    pub const fn from_array(r: [u64; 16]) -> Self {
        Self {
            rax: r[0],
            rcx: r[1],
            rdx: r[2],
            rbx: r[3],
            rsp: r[4],
            rbp: r[5],
            rsi: r[6],
            rdi: r[7],
            r8: r[8],
            r9: r[9],
            r10: r[10],
            r11: r[11],
            r12: r[12],
            r13: r[13],
            r14: r[14],
            r15: r[15],
        }
    }

    /// Register `index` in x86 encoding order, or `None` if `index > 15`.
    pub fn get(&self, index: u8) -> Option<u64> {
        self.to_array().get(usize::from(index)).copied()
    }

    /// Sets register `index` in x86 encoding order; `false` (and no change) if `index > 15`.
    pub fn set(&mut self, index: u8, value: u64) -> bool {
        let mut regs = self.to_array();
        match regs.get_mut(usize::from(index)) {
            Some(slot) => {
                *slot = value;
                *self = Self::from_array(regs);
                true
            }
            None => false,
        }
    }
}

/// The hidden attribute part of a segment register, in neither vendor's format.
///
/// The fields are those of the segment descriptor (Intel SDM vol. 3A 3.4.5, AMD APM vol. 2 4.7)
/// plus `unusable`, which VMX uses for a segment register loaded with a null selector (SDM vol.
/// 3C 25.4.1).
/// SVM has no such bit: there a null segment has P = 0 (APM 15.5.1 / 4.5.1), so the conversions
/// treat "not present" and "unusable" as the same thing (see [`SegmentAttributes::to_svm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentAttributes {
    /// Descriptor type, 4 bits (for code/data: accessed, write/read, expand-down/conforming, code).
    pub seg_type: u8,
    /// S: 1 for code/data, 0 for system descriptors (TSS, LDT, gates).
    pub s: bool,
    /// Descriptor privilege level, 2 bits.
    pub dpl: u8,
    /// P: segment present.
    pub present: bool,
    /// AVL: available to software.
    pub avl: bool,
    /// L: 64-bit code segment.
    pub long: bool,
    /// D/B: default operation size (1 = 32-bit).
    pub db: bool,
    /// G: limit granularity (1 = 4 KiB units). The limit in [`Segment`] is already expanded.
    pub granularity: bool,
    /// VMX "segment unusable" (SDM vol. 3C 25.4.1): a null selector was loaded.
    pub unusable: bool,
}

/// Bit positions in the SVM packed form (APM vol. 2 appendix B, VMCB segment `attrib`): bits 7:0
/// are descriptor bits 47:40 (type, S, DPL, P), bits 11:8 descriptor bits 55:52 (AVL, L, D/B, G).
mod svm_attr {
    pub const S: u16 = 1 << 4;
    pub const DPL_SHIFT: u16 = 5;
    pub const P: u16 = 1 << 7;
    pub const AVL: u16 = 1 << 8;
    pub const L: u16 = 1 << 9;
    pub const DB: u16 = 1 << 10;
    pub const G: u16 = 1 << 11;
}

/// Bit positions in the VMX access-rights format (SDM vol. 3C 25.4.1, table 25-2): the
/// descriptor's bits 47:40 in 7:0, bits 55:52 in 15:12, bits 11:8 and 31:17 reserved.
mod vmx_ar {
    pub const S: u32 = 1 << 4;
    pub const DPL_SHIFT: u32 = 5;
    pub const P: u32 = 1 << 7;
    pub const AVL: u32 = 1 << 12;
    pub const L: u32 = 1 << 13;
    pub const DB: u32 = 1 << 14;
    pub const G: u32 = 1 << 15;
    pub const UNUSABLE: u32 = 1 << 16;
    /// Bits 11:8 and 31:17.
    pub const RESERVED: u32 = 0xFFFE_0F00;
}

impl SegmentAttributes {
    /// The attributes of an unusable (null) segment register.
    pub const UNUSABLE: Self = Self {
        seg_type: 0,
        s: false,
        dpl: 0,
        present: false,
        avl: false,
        long: false,
        db: false,
        granularity: false,
        unusable: true,
    };

    /// From the SVM VMCB `attrib` field. Bits 15:12 are not part of the format and are ignored.
    /// `unusable` is set exactly when P is 0, since SVM expresses a null segment that way.
    pub const fn from_svm(attrib: u16) -> Self {
        let present = attrib & svm_attr::P != 0;
        Self {
            seg_type: (attrib & 0xF) as u8,
            s: attrib & svm_attr::S != 0,
            dpl: ((attrib >> svm_attr::DPL_SHIFT) & 3) as u8,
            present,
            avl: attrib & svm_attr::AVL != 0,
            long: attrib & svm_attr::L != 0,
            db: attrib & svm_attr::DB != 0,
            granularity: attrib & svm_attr::G != 0,
            unusable: !present,
        }
    }

    /// To the SVM VMCB `attrib` field. An unusable segment is written with P = 0, the SVM way of
    /// saying "null segment"; the other bits are kept. Out-of-range `seg_type`/`dpl` are masked
    /// (use [`SegmentAttributes::validate`] to reject them instead).
    pub const fn to_svm(&self) -> u16 {
        self.svm_layout(self.present && !self.unusable)
    }

    /// The SVM `attrib` layout of these attributes, with P as given.
    const fn svm_layout(&self, present: bool) -> u16 {
        let mut a = (self.seg_type & 0xF) as u16;
        a |= ((self.dpl & 3) as u16) << svm_attr::DPL_SHIFT;
        if self.s {
            a |= svm_attr::S;
        }
        if present {
            a |= svm_attr::P;
        }
        if self.avl {
            a |= svm_attr::AVL;
        }
        if self.long {
            a |= svm_attr::L;
        }
        if self.db {
            a |= svm_attr::DB;
        }
        if self.granularity {
            a |= svm_attr::G;
        }
        a
    }

    /// From the VMX access-rights format. Reserved bits (11:8, 31:17) are ignored: the processor
    /// stores them as 0 and they carry no meaning.
    pub const fn from_vmx(ar: u32) -> Self {
        Self {
            seg_type: (ar & 0xF) as u8,
            s: ar & vmx_ar::S != 0,
            dpl: ((ar >> vmx_ar::DPL_SHIFT) & 3) as u8,
            present: ar & vmx_ar::P != 0,
            avl: ar & vmx_ar::AVL != 0,
            long: ar & vmx_ar::L != 0,
            db: ar & vmx_ar::DB != 0,
            granularity: ar & vmx_ar::G != 0,
            unusable: ar & vmx_ar::UNUSABLE != 0,
        }
    }

    /// To the VMX access-rights format, with reserved bits 0 as VM entry requires (SDM 27.3.1.2).
    /// Out-of-range `seg_type`/`dpl` are masked.
    pub const fn to_vmx(&self) -> u32 {
        let mut a = (self.seg_type & 0xF) as u32;
        a |= ((self.dpl & 3) as u32) << vmx_ar::DPL_SHIFT;
        if self.s {
            a |= vmx_ar::S;
        }
        if self.present {
            a |= vmx_ar::P;
        }
        if self.avl {
            a |= vmx_ar::AVL;
        }
        if self.long {
            a |= vmx_ar::L;
        }
        if self.db {
            a |= vmx_ar::DB;
        }
        if self.granularity {
            a |= vmx_ar::G;
        }
        if self.unusable {
            a |= vmx_ar::UNUSABLE;
        }
        a & !vmx_ar::RESERVED
    }

    /// The packed form used by the migration encoding: the SVM layout in bits 11:0 plus
    /// `unusable` in bit 12 (so both vendors' information survives).
    const fn to_wire(self) -> u16 {
        // Unlike `to_svm`, P is kept as is: `unusable` travels in its own bit.
        let mut a = self.svm_layout(self.present);
        if self.unusable {
            a |= WIRE_UNUSABLE;
        }
        a
    }

    fn from_wire(v: u16) -> Result<Self, StateError> {
        if v & !0x1FFF != 0 {
            return Err(StateError::InvalidValue {
                field: "segment attributes",
                value: u64::from(v),
            });
        }
        let mut a = Self::from_svm(v & 0x0FFF);
        a.present = v & svm_attr::P != 0;
        a.unusable = v & WIRE_UNUSABLE != 0;
        Ok(a)
    }

    /// Checks that `seg_type` fits in 4 bits and `dpl` in 2.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.seg_type > 0xF {
            return Err(StateError::InvalidValue {
                field: "segment type",
                value: u64::from(self.seg_type),
            });
        }
        if self.dpl > 3 {
            return Err(StateError::InvalidValue {
                field: "segment dpl",
                value: u64::from(self.dpl),
            });
        }
        Ok(())
    }
}

const WIRE_UNUSABLE: u16 = 1 << 12;

/// Reserved RFLAGS bits: 3, 5, 15 and 63:22.
const RFLAGS_RESERVED: u64 = (1 << 3) | (1 << 5) | (1 << 15) | !((1 << 22) - 1);

/// A segment register with its hidden part. `limit` is the expanded byte limit (both the VMCB and
/// the VMCS store it that way, already scaled by G).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub attributes: SegmentAttributes,
}

impl Segment {
    /// A null selector with unusable attributes.
    pub const NULL: Self = Self {
        selector: 0,
        base: 0,
        limit: 0,
        attributes: SegmentAttributes::UNUSABLE,
    };
}

/// GDTR or IDTR. The limit is 16 bits architecturally (SDM vol. 3A 2.4.1); both vendors store it
/// in a 32-bit field whose upper bits must be 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// MSRs that are part of the vCPU state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsrState {
    /// STAR (C000_0081h): SYSCALL/SYSRET selectors.
    pub star: u64,
    /// LSTAR (C000_0082h): 64-bit SYSCALL target.
    pub lstar: u64,
    /// CSTAR (C000_0083h): compatibility-mode SYSCALL target (unused on Intel, kept for AMD).
    pub cstar: u64,
    /// SFMASK (C000_0084h): RFLAGS mask on SYSCALL.
    pub sfmask: u64,
    /// KernelGSbase (C000_0102h): swapped with GS.base by SWAPGS.
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    /// IA32_PAT (277h).
    pub pat: u64,
    /// IA32_TSC_AUX (C000_0103h): what RDTSCP/RDPID return in ECX.
    pub tsc_aux: u64,
}

/// Power-on value of IA32_PAT (SDM vol. 3A "PAT Initialization", APM vol. 2 7.8.2): WB, WT,
/// UC-, UC, repeated.
pub const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;

/// Size of the legacy FXSAVE image (SDM vol. 1 10.5.1).
pub const FXSAVE_SIZE: usize = 512;
/// Size of the XSAVE header that follows the legacy region (SDM vol. 1 13.4.2).
pub const XSAVE_HEADER_SIZE: usize = 64;
/// Largest XSAVE extension accepted by [`VcpuState::decode`]. Today's largest standard-format
/// area (AMX) is about 11 KiB; the cap keeps a corrupt length from asking for gigabytes.
pub const MAX_XSAVE_EXTENSION: usize = 64 * 1024;

/// x87/SSE/AVX state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FpuState {
    /// The 512-byte legacy region in FXSAVE layout (SDM vol. 1 table 10-2): FCW at 0, FSW at 2,
    /// abridged FTW at 4, FOP at 6, FIP at 8, FDP at 16, MXCSR at 24, MXCSR_MASK at 28, ST/MM
    /// registers from 32, XMM registers from 160. Every x86-64 CPU has FXSAVE, so this part alone
    /// moves between any two hosts.
    pub fxsave: [u8; FXSAVE_SIZE],
    /// The XSAVE area beyond the legacy region, in the standard (non-compacted) format: the
    /// 64-byte XSAVE header followed by the extended components at their CPUID-enumerated
    /// offsets minus 512. Empty when the source saved with FXSAVE only. The compacted format is
    /// refused because its offsets depend on the source CPU's XCOMP_BV.
    pub xsave: Vec<u8>,
    /// XCR0: the state components the guest enabled with XSETBV. Bit 0 (x87) is always 1.
    pub xcr0: u64,
}

impl FpuState {
    /// State after FNINIT plus the SSE power-on MXCSR: FCW = 037Fh, FTW all empty, MXCSR = 1F80h
    /// (all exceptions masked) (SDM vol. 1 8.1.5 and 10.2.3). XCR0 = 1, its reset value.
    pub fn reset() -> Self {
        let mut fxsave = [0u8; FXSAVE_SIZE];
        fxsave[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        fxsave[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        Self {
            fxsave,
            xsave: Vec::new(),
            xcr0: 1,
        }
    }

    /// MXCSR from the FXSAVE image. FXRSTOR raises #GP if it has a bit set that the restoring
    /// CPU's MXCSR_MASK clears, so the destination host must check this against its own mask
    /// before restoring.
    pub fn mxcsr(&self) -> u32 {
        u32::from_le_bytes([
            self.fxsave[24],
            self.fxsave[25],
            self.fxsave[26],
            self.fxsave[27],
        ])
    }

    /// Checks what would make the host's own FXRSTOR/XRSTOR fault (a host crash, not a guest
    /// one): MXCSR bits 31:16 (reserved on every CPU), XCR0 bit 0 clear or AVX without SSE (XSETBV
    /// rules, SDM vol. 1 13.3), and a malformed XSAVE header (SDM vol. 1 13.8.1: XSTATE_BV bits
    /// outside XCR0, compacted format, non-zero reserved header bytes).
    pub fn validate(&self) -> Result<(), StateError> {
        let mxcsr = self.mxcsr();
        if mxcsr & 0xFFFF_0000 != 0 {
            return Err(StateError::InvalidValue {
                field: "mxcsr",
                value: u64::from(mxcsr),
            });
        }
        if self.xcr0 & 1 == 0 || (self.xcr0 & 0b100 != 0 && self.xcr0 & 0b10 == 0) {
            return Err(StateError::InvalidValue {
                field: "xcr0",
                value: self.xcr0,
            });
        }
        if self.xsave.is_empty() {
            return Ok(());
        }
        if self.xsave.len() < XSAVE_HEADER_SIZE || self.xsave.len() > MAX_XSAVE_EXTENSION {
            return Err(StateError::InvalidValue {
                field: "xsave length",
                value: self.xsave.len() as u64,
            });
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.xsave[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let xstate_bv = word(0);
        if xstate_bv & !self.xcr0 != 0 {
            return Err(StateError::InvalidValue {
                field: "xsave xstate_bv",
                value: xstate_bv,
            });
        }
        let xcomp_bv = word(1);
        if xcomp_bv != 0 {
            return Err(StateError::InvalidValue {
                field: "xsave xcomp_bv (compacted format)",
                value: xcomp_bv,
            });
        }
        if let Some(i) = (2..8).find(|&i| word(i) != 0) {
            return Err(StateError::InvalidValue {
                field: "xsave header reserved bytes",
                value: word(i),
            });
        }
        Ok(())
    }
}

impl Default for FpuState {
    fn default() -> Self {
        Self::reset()
    }
}

/// What kind of event is pending delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingEventKind {
    /// A maskable external interrupt (vector 32-255).
    ExternalInterrupt,
    /// A non-maskable interrupt (vector 2).
    Nmi,
    /// A hardware exception (vector 0-31), possibly with an error code.
    Exception,
    /// INT n: `rip` points at the instruction and [`PendingEvent::instruction_len`] is its length,
    /// so the handler returns to `rip + instruction_len`.
    SoftwareInterrupt,
}

/// An event that must be delivered to the guest before it executes its next instruction:
/// either an event whose delivery a VM exit interrupted (SVM EXITINTINFO, VMX IDT-vectoring
/// information) or one the hypervisor queued for injection.
///
/// Software exceptions and interrupts whose delivery was interrupted are not represented here:
/// the backends leave RIP on the INT n / INT3 / INTO instruction and let the guest execute it
/// again, which re-raises the same event (AMD and Intel agree on that RIP; it is also why no
/// length is needed for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingEvent {
    pub kind: PendingEventKind,
    pub vector: u8,
    /// Only for [`PendingEventKind::Exception`] vectors that push one.
    pub error_code: Option<u32>,
    /// Length of the INT n instruction at `rip` for [`PendingEventKind::SoftwareInterrupt`]
    /// (1-15, or 0 when `rip` already points past it); 0 for the other kinds.
    pub instruction_len: u8,
}

impl PendingEvent {
    /// Checks the combinations both vendors' injection mechanisms accept: NMI uses vector 2,
    /// exceptions vectors 0-31 (VMX refuses others, SDM 27.2.1.3), only exceptions carry an error
    /// code, only software interrupts a length. External interrupts may use any vector: a
    /// real-mode guest's 8259 PIC delivers IRQ 0-7 on vectors 8-15.
    pub fn validate(&self) -> Result<(), StateError> {
        let bad = |field: &'static str, value: u64| Err(StateError::InvalidValue { field, value });
        match self.kind {
            PendingEventKind::Nmi if self.vector != 2 => {
                return bad("nmi vector", u64::from(self.vector))
            }
            PendingEventKind::Exception if self.vector > 31 => {
                return bad("exception vector", u64::from(self.vector))
            }
            _ => {}
        }
        if let Some(code) = self.error_code {
            if self.kind != PendingEventKind::Exception {
                return bad("error code on a non-exception event", u64::from(code));
            }
        }
        let len_ok = match self.kind {
            PendingEventKind::SoftwareInterrupt => self.instruction_len <= 15,
            _ => self.instruction_len == 0,
        };
        if !len_ok {
            return bad("event instruction length", u64::from(self.instruction_len));
        }
        Ok(())
    }
}

/// Interrupt and NMI blocking (SDM vol. 3C 25.4.2 table 25-3; APM vol. 2 15.21.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interruptibility {
    /// The instruction after STI: interrupts blocked for one instruction.
    pub sti_blocking: bool,
    /// The instruction after MOV SS / POP SS: interrupts and debug traps blocked for one.
    pub mov_ss_blocking: bool,
    /// An NMI handler is running: further NMIs blocked until IRET.
    pub nmi_blocked: bool,
}

/// Whether the vCPU executes or waits for an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivityState {
    #[default]
    Active,
    /// Executed HLT; resumes on the next unmasked interrupt, NMI or reset.
    Halted,
}

/// The complete architectural state of one vCPU. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    pub gprs: Gprs,
    pub rip: u64,
    pub rflags: u64,

    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,

    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// CR8, the task-priority register (bits 3:0).
    pub cr8: u64,
    /// The guest-visible EFER. Never holds [`efer::SVME`]: the SVM backend adds it for VMRUN.
    pub efer: u64,
    /// DR0-DR3.
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,

    pub msrs: MsrState,
    /// Guest TSC = host TSC + `tsc_offset` (wrapping). The hypervisor recomputes it on the
    /// destination of a migration so that the guest's TSC continues where it stopped.
    pub tsc_offset: i64,

    pub fpu: FpuState,

    pub pending_event: Option<PendingEvent>,
    pub interruptibility: Interruptibility,
    pub activity: ActivityState,
}

impl VcpuState {
    /// A vCPU that starts directly in 64-bit long mode at `entry_rip` with RSP = `stack` and the
    /// guest's own PML4 at `cr3`, skipping real and protected mode (the guest image need not
    /// contain a mode-switch trampoline).
    ///
    /// - CR0 = PE | MP | ET | NE | WP | PG. PE and PG: long mode needs protected mode with paging
    ///   (SDM vol. 3A "Initializing IA-32e Mode"). ET reads as 1 on every x86-64 CPU. NE: native
    ///   #MF error reporting, and VMX requires NE = 1 (IA32_VMX_CR0_FIXED0, SDM A.7). MP: WAIT
    ///   honours TS, the setting every protected-mode OS uses with an FPU. WP: supervisor writes
    ///   respect read-only pages, as every modern OS expects.
    /// - CR4 = PAE (required for long mode) | OSFXSR | OSXMMEXCPT (without them SSE instructions
    ///   raise #UD, SDM vol. 3A 2.5). No PGE, PCIDE, OSXSAVE: the guest enables what it uses.
    /// - EFER = LME | LMA: long mode enabled and already active, as the processor would have set
    ///   LMA when paging was turned on (same section). No SCE (the guest enables SYSCALL itself),
    ///   no NXE (a host without NX would refuse it), never SVME (added by the SVM backend).
    /// - CS: selector 08h, base 0, limit 4 GiB, type 0Bh (execute/read, accessed), S, DPL 0, P,
    ///   L = 1 and D = 0 (64-bit code; L and D both 1 is reserved, SDM vol. 3A 3.4.5).
    /// - SS/DS/ES/FS/GS: selector 10h, flat read/write accessed data (type 3), D/B = 1, G = 1.
    ///   SS must be usable with DPL = CPL = 0 (SDM 27.3.1.2).
    /// - TR: selector 18h, type 0Bh (busy 64-bit TSS), limit 67h: VMX requires a usable busy TSS
    ///   in IA-32e mode (SDM 27.3.1.2) even if the guest never switches stacks.
    /// - LDTR unusable; GDTR and IDTR empty (base 0, limit 0). The guest must load its own GDT
    ///   and IDT before reloading a selector or enabling interrupts: the hidden parts above work
    ///   until then, and RFLAGS.IF = 0 keeps interrupts out.
    /// - RFLAGS = 2 (bit 1 always reads 1). DR6 = FFFF0FF0h and DR7 = 400h, their reset values
    ///   (SDM vol. 3A "Debug Registers"). PAT at its power-on value. FPU as after FNINIT with
    ///   MXCSR = 1F80h.
    pub fn reset_64bit(entry_rip: u64, stack: u64, cr3: u64) -> Self {
        let flat_data = Segment {
            selector: 0x10,
            base: 0,
            limit: 0xFFFF_FFFF,
            attributes: SegmentAttributes {
                seg_type: 0x3,
                s: true,
                dpl: 0,
                present: true,
                avl: false,
                long: false,
                db: true,
                granularity: true,
                unusable: false,
            },
        };
        let code64 = Segment {
            selector: 0x08,
            base: 0,
            limit: 0xFFFF_FFFF,
            attributes: SegmentAttributes {
                seg_type: 0xB,
                s: true,
                dpl: 0,
                present: true,
                avl: false,
                long: true,
                db: false,
                granularity: true,
                unusable: false,
            },
        };
        let tss = Segment {
            selector: 0x18,
            base: 0,
            limit: 0x67,
            attributes: SegmentAttributes {
                seg_type: 0xB,
                s: false,
                dpl: 0,
                present: true,
                avl: false,
                long: false,
                db: false,
                granularity: false,
                unusable: false,
            },
        };
        Self {
            gprs: Gprs {
                rsp: stack,
                ..Gprs::default()
            },
            rip: entry_rip,
            rflags: rflags::FIXED,
            cs: code64,
            ss: flat_data,
            ds: flat_data,
            es: flat_data,
            fs: flat_data,
            gs: flat_data,
            tr: tss,
            ldtr: Segment::NULL,
            gdtr: DescriptorTable::default(),
            idtr: DescriptorTable::default(),
            cr0: cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG,
            cr2: 0,
            cr3,
            cr4: cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT,
            cr8: 0,
            efer: efer::LME | efer::LMA,
            dr: [0; 4],
            dr6: 0xFFFF_0FF0,
            dr7: 0x400,
            msrs: MsrState {
                pat: PAT_POWER_ON,
                ..MsrState::default()
            },
            tsc_offset: 0,
            fpu: FpuState::reset(),
            pending_event: None,
            interruptibility: Interruptibility::default(),
            activity: ActivityState::Active,
        }
    }

    /// The current privilege level implied by the state: 0 in real mode, 3 in virtual-8086 mode,
    /// otherwise SS.DPL (SDM vol. 3C 25.4.1 note: SS.DPL always equals CPL).
    pub fn cpl(&self) -> u8 {
        if self.cr0 & cr0::PE == 0 {
            0
        } else if self.rflags & rflags::VM != 0 {
            3
        } else {
            self.ss.attributes.dpl & 3
        }
    }

    /// The segment registers with their names, in wire order.
    fn segments(&self) -> [(&'static str, &Segment); 8] {
        [
            ("cs", &self.cs),
            ("ss", &self.ss),
            ("ds", &self.ds),
            ("es", &self.es),
            ("fs", &self.fs),
            ("gs", &self.gs),
            ("tr", &self.tr),
            ("ldtr", &self.ldtr),
        ]
    }

    /// Checks the invariants [`VcpuState::decode`] enforces, so a source host can refuse to send
    /// a state the destination would reject: segment fields in range, RFLAGS/CR8/DR6/DR7
    /// reserved bits clear, EFER without SVME, a consistent pending event, a restorable FPU
    /// image.
    pub fn validate(&self) -> Result<(), StateError> {
        for (_, seg) in self.segments() {
            seg.attributes.validate()?;
        }
        // RFLAGS bit 1 reads as 1 and bits 3, 5, 15, 63:22 are reserved (SDM vol. 1 3.4.3);
        // both vendors refuse VM entry otherwise.
        if self.rflags & rflags::FIXED == 0 || self.rflags & RFLAGS_RESERVED != 0 {
            return Err(StateError::InvalidValue {
                field: "rflags",
                value: self.rflags,
            });
        }
        // CR8 is the 4-bit TPR; DR6/DR7 bits 63:32 must be 0 (MOV to DR raises #GP otherwise).
        if self.cr8 > 0xF {
            return Err(StateError::InvalidValue {
                field: "cr8",
                value: self.cr8,
            });
        }
        for (field, value) in [("dr6", self.dr6), ("dr7", self.dr7)] {
            if value >> 32 != 0 {
                return Err(StateError::InvalidValue { field, value });
            }
        }
        if self.efer & efer::SVME != 0 {
            return Err(StateError::InvalidValue {
                field: "efer.svme",
                value: self.efer,
            });
        }
        if let Some(ev) = &self.pending_event {
            ev.validate()?;
        }
        if self.interruptibility.sti_blocking && self.interruptibility.mov_ss_blocking {
            return Err(StateError::InvalidValue {
                field: "sti and mov-ss blocking both set",
                value: 3,
            });
        }
        self.fpu.validate()
    }
}

/// Version of the encoding [`VcpuState::encode`] writes and the only one
/// [`VcpuState::decode`] reads.
///
/// All integers are little-endian. Layout:
///
/// ```text
/// header   magic "VCPU" | version u16 | flags u16 (0) | body length u32
/// body     sections, each: tag u16 | payload length u32 | payload, in this order, each once:
///   1 GPRS       16 x u64 (x86 order: rax rcx rdx rbx rsp rbp rsi rdi r8..r15), rip, rflags
///   2 SEGMENTS   cs ss ds es fs gs tr ldtr, each selector u16 | attributes u16 | limit u32 |
///                base u64 (attributes: SVM packed layout in bits 11:0, unusable in bit 12);
///                then gdtr, idtr, each base u64 | limit u16
///   3 CONTROL    cr0 cr2 cr3 cr4 cr8 efer dr0 dr1 dr2 dr3 dr6 dr7 (u64 each)
///   4 MSRS       star lstar cstar sfmask kernel_gs_base sysenter_cs sysenter_esp sysenter_eip
///                pat tsc_aux (u64 each), tsc_offset i64
///   5 FPU        xcr0 u64 | fxsave 512 bytes | xsave length u32 | xsave bytes
///   6 EVENTS     pending u8 | kind u8 | vector u8 | has error code u8 | error code u32 |
///                instruction length u8 | sti u8 | mov-ss u8 | nmi blocked u8 | activity u8
/// ```
///
/// Sections make a damaged or mismatched stream fail with a message naming the part; unknown
/// sections are refused rather than skipped, because silently dropping state would corrupt the
/// guest. A later version that adds state bumps the version number.
pub const FORMAT_VERSION: u16 = 1;

/// First bytes of an encoded [`VcpuState`].
pub const MAGIC: [u8; 4] = *b"VCPU";

const HEADER_LEN: usize = 12;

/// Section tags of the encoding (see [`FORMAT_VERSION`]).
mod section {
    pub const GPRS: u16 = 1;
    pub const SEGMENTS: u16 = 2;
    pub const CONTROL: u16 = 3;
    pub const MSRS: u16 = 4;
    pub const FPU: u16 = 5;
    pub const EVENTS: u16 = 6;

    pub const GPRS_LEN: u32 = 18 * 8;
    pub const SEGMENTS_LEN: u32 = 8 * 16 + 2 * 10;
    pub const CONTROL_LEN: u32 = 12 * 8;
    pub const MSRS_LEN: u32 = 11 * 8;
    pub const EVENTS_LEN: u32 = 13;
}

/// Why a byte string is not a [`VcpuState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The input ends before `needed` bytes at offset `offset` could be read.
    Truncated { offset: usize, needed: usize },
    /// The first four bytes are not [`MAGIC`].
    BadMagic([u8; 4]),
    /// A version this code does not read.
    UnsupportedVersion(u16),
    /// Bytes after the declared body.
    TrailingBytes(usize),
    /// Sections out of order, missing or unknown.
    UnexpectedSection { expected: u16, found: u16 },
    /// A section whose length is not what its content needs.
    SectionLength {
        section: u16,
        expected: u32,
        found: u32,
    },
    /// A field holds a value the state cannot have.
    InvalidValue { field: &'static str, value: u64 },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { offset, needed } => write!(
                f,
                "vCPU state truncated: {needed} more byte(s) needed at offset {offset}"
            ),
            Self::BadMagic(m) => write!(f, "not a vCPU state (magic {m:02x?})"),
            Self::UnsupportedVersion(v) => write!(
                f,
                "vCPU state version {v} is not supported (this host reads version {FORMAT_VERSION})"
            ),
            Self::TrailingBytes(n) => write!(f, "vCPU state followed by {n} unexpected byte(s)"),
            Self::UnexpectedSection { expected, found } => write!(
                f,
                "vCPU state section {found} found where section {expected} was expected"
            ),
            Self::SectionLength {
                section,
                expected,
                found,
            } => write!(
                f,
                "vCPU state section {section} is {found} byte(s) long, expected {expected}"
            ),
            Self::InvalidValue { field, value } => {
                write!(f, "vCPU state field {field} has invalid value {value:#x}")
            }
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a section header with a length placeholder; returns where the payload starts.
fn begin_section(out: &mut Vec<u8>, tag: u16) -> usize {
    put_u16(out, tag);
    put_u32(out, 0);
    out.len()
}

/// Patches the length of the section whose payload started at `start`.
fn end_section(out: &mut [u8], start: usize) {
    let len = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
    out[start - 4..start].copy_from_slice(&len.to_le_bytes());
}

/// A bounds-checked little-endian reader: every read either succeeds or returns
/// [`StateError::Truncated`], so no input can make decoding panic.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Offset of `bytes[0]` in the whole input, for error messages.
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], base: usize) -> Self {
        Self {
            bytes,
            pos: 0,
            base,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.remaining() < n {
            return Err(StateError::Truncated {
                offset: self.base + self.pos,
                needed: n - self.remaining(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(StateError::InvalidValue {
                field,
                value: u64::from(v),
            }),
        }
    }

    /// Reads the next section header, checks its tag (and length, when `fixed_len` is given),
    /// and returns a reader over exactly its payload.
    fn section(&mut self, tag: u16, fixed_len: Option<u32>) -> Result<Reader<'a>, StateError> {
        let found = self.u16()?;
        if found != tag {
            return Err(StateError::UnexpectedSection {
                expected: tag,
                found,
            });
        }
        let len = self.u32()?;
        if let Some(expected) = fixed_len {
            if len != expected {
                return Err(StateError::SectionLength {
                    section: tag,
                    expected,
                    found: len,
                });
            }
        }
        let base = self.base + self.pos;
        let payload = self.take(len as usize)?;
        Ok(Reader::new(payload, base))
    }

    /// Fails unless the section payload was consumed exactly.
    fn finish(&self, tag: u16) -> Result<(), StateError> {
        if self.remaining() != 0 {
            return Err(StateError::SectionLength {
                section: tag,
                expected: self.pos as u32,
                found: self.bytes.len() as u32,
            });
        }
        Ok(())
    }
}

const KIND_EXTERNAL: u8 = 0;
const KIND_NMI: u8 = 1;
const KIND_EXCEPTION: u8 = 2;
const KIND_SOFTWARE: u8 = 3;

impl VcpuState {
    /// Appends the versioned encoding of this state to `out` (layout at [`FORMAT_VERSION`]).
    ///
    /// Values are written as they are; [`VcpuState::decode`] rejects invalid ones, so call
    /// [`VcpuState::validate`] first to find out on the source rather than the destination.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        put_u16(out, FORMAT_VERSION);
        put_u16(out, 0);
        put_u32(out, 0);
        let body = out.len();

        let s = begin_section(out, section::GPRS);
        for r in self.gprs.to_array() {
            put_u64(out, r);
        }
        put_u64(out, self.rip);
        put_u64(out, self.rflags);
        end_section(out, s);

        let s = begin_section(out, section::SEGMENTS);
        for (_, seg) in self.segments() {
            put_u16(out, seg.selector);
            put_u16(out, seg.attributes.to_wire());
            put_u32(out, seg.limit);
            put_u64(out, seg.base);
        }
        for dt in [&self.gdtr, &self.idtr] {
            put_u64(out, dt.base);
            put_u16(out, dt.limit);
        }
        end_section(out, s);

        let s = begin_section(out, section::CONTROL);
        for v in [self.cr0, self.cr2, self.cr3, self.cr4, self.cr8, self.efer] {
            put_u64(out, v);
        }
        for v in self.dr {
            put_u64(out, v);
        }
        put_u64(out, self.dr6);
        put_u64(out, self.dr7);
        end_section(out, s);

        let s = begin_section(out, section::MSRS);
        let m = &self.msrs;
        for v in [
            m.star,
            m.lstar,
            m.cstar,
            m.sfmask,
            m.kernel_gs_base,
            m.sysenter_cs,
            m.sysenter_esp,
            m.sysenter_eip,
            m.pat,
            m.tsc_aux,
        ] {
            put_u64(out, v);
        }
        out.extend_from_slice(&self.tsc_offset.to_le_bytes());
        end_section(out, s);

        let s = begin_section(out, section::FPU);
        put_u64(out, self.fpu.xcr0);
        out.extend_from_slice(&self.fpu.fxsave);
        put_u32(out, u32::try_from(self.fpu.xsave.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&self.fpu.xsave);
        end_section(out, s);

        let s = begin_section(out, section::EVENTS);
        match &self.pending_event {
            None => out.extend_from_slice(&[0; 9]),
            Some(ev) => {
                let kind = match ev.kind {
                    PendingEventKind::ExternalInterrupt => KIND_EXTERNAL,
                    PendingEventKind::Nmi => KIND_NMI,
                    PendingEventKind::Exception => KIND_EXCEPTION,
                    PendingEventKind::SoftwareInterrupt => KIND_SOFTWARE,
                };
                out.extend_from_slice(&[1, kind, ev.vector, u8::from(ev.error_code.is_some())]);
                put_u32(out, ev.error_code.unwrap_or(0));
                out.push(ev.instruction_len);
            }
        }
        let i = &self.interruptibility;
        out.extend_from_slice(&[
            u8::from(i.sti_blocking),
            u8::from(i.mov_ss_blocking),
            u8::from(i.nmi_blocked),
            match self.activity {
                ActivityState::Active => 0,
                ActivityState::Halted => 1,
            },
        ]);
        end_section(out, s);

        let body_len = u32::try_from(out.len() - body).unwrap_or(u32::MAX);
        out[start + 8..start + 12].copy_from_slice(&body_len.to_le_bytes());
    }

    /// Reads a state written by [`VcpuState::encode`]. Never panics: truncated input, an unknown
    /// version, misplaced sections and invalid values are all reported as [`StateError`].
    pub fn decode(bytes: &[u8]) -> Result<VcpuState, StateError> {
        let mut r = Reader::new(bytes, 0);
        let magic = r.array::<4>()?;
        if magic != MAGIC {
            return Err(StateError::BadMagic(magic));
        }
        let version = r.u16()?;
        if version != FORMAT_VERSION {
            return Err(StateError::UnsupportedVersion(version));
        }
        let flags = r.u16()?;
        if flags != 0 {
            return Err(StateError::InvalidValue {
                field: "header flags",
                value: u64::from(flags),
            });
        }
        let body_len = r.u32()? as usize;
        if body_len > r.remaining() {
            return Err(StateError::Truncated {
                offset: bytes.len(),
                needed: body_len - r.remaining(),
            });
        }
        if body_len < r.remaining() {
            return Err(StateError::TrailingBytes(r.remaining() - body_len));
        }
        let mut body = Reader::new(r.take(body_len)?, HEADER_LEN);

        let mut s = body.section(section::GPRS, Some(section::GPRS_LEN))?;
        let mut regs = [0u64; 16];
        for reg in &mut regs {
            *reg = s.u64()?;
        }
        let gprs = Gprs::from_array(regs);
        let rip = s.u64()?;
        let rflags = s.u64()?;
        s.finish(section::GPRS)?;

        let mut s = body.section(section::SEGMENTS, Some(section::SEGMENTS_LEN))?;
        let mut segs = [Segment::default(); 8];
        for seg in &mut segs {
            let selector = s.u16()?;
            let attributes = SegmentAttributes::from_wire(s.u16()?)?;
            let limit = s.u32()?;
            let base = s.u64()?;
            *seg = Segment {
                selector,
                base,
                limit,
                attributes,
            };
        }
        let mut tables = [DescriptorTable::default(); 2];
        for t in &mut tables {
            t.base = s.u64()?;
            t.limit = s.u16()?;
        }
        s.finish(section::SEGMENTS)?;

        let mut s = body.section(section::CONTROL, Some(section::CONTROL_LEN))?;
        let mut c = [0u64; 12];
        for v in &mut c {
            *v = s.u64()?;
        }
        s.finish(section::CONTROL)?;

        let mut s = body.section(section::MSRS, Some(section::MSRS_LEN))?;
        let mut m = [0u64; 10];
        for v in &mut m {
            *v = s.u64()?;
        }
        let tsc_offset = i64::from_le_bytes(s.array()?);
        s.finish(section::MSRS)?;

        let mut s = body.section(section::FPU, None)?;
        let xcr0 = s.u64()?;
        let fxsave = s.array::<FXSAVE_SIZE>()?;
        let xsave_len = s.u32()? as usize;
        if xsave_len > MAX_XSAVE_EXTENSION {
            return Err(StateError::InvalidValue {
                field: "xsave length",
                value: xsave_len as u64,
            });
        }
        let xsave = s.take(xsave_len)?.to_vec();
        s.finish(section::FPU)?;

        let mut s = body.section(section::EVENTS, Some(section::EVENTS_LEN))?;
        let pending = s.bool("pending event flag")?;
        let kind = s.u8()?;
        let vector = s.u8()?;
        let has_error = s.bool("error code flag")?;
        let error_code = s.u32()?;
        let instruction_len = s.u8()?;
        let pending_event = if pending {
            let kind = match kind {
                KIND_EXTERNAL => PendingEventKind::ExternalInterrupt,
                KIND_NMI => PendingEventKind::Nmi,
                KIND_EXCEPTION => PendingEventKind::Exception,
                KIND_SOFTWARE => PendingEventKind::SoftwareInterrupt,
                k => {
                    return Err(StateError::InvalidValue {
                        field: "pending event kind",
                        value: u64::from(k),
                    })
                }
            };
            Some(PendingEvent {
                kind,
                vector,
                error_code: has_error.then_some(error_code),
                instruction_len,
            })
        } else {
            if kind != 0 || vector != 0 || has_error || error_code != 0 || instruction_len != 0 {
                return Err(StateError::InvalidValue {
                    field: "fields of an absent pending event",
                    value: u64::from(kind) | u64::from(vector) << 8,
                });
            }
            None
        };
        let interruptibility = Interruptibility {
            sti_blocking: s.bool("sti blocking")?,
            mov_ss_blocking: s.bool("mov-ss blocking")?,
            nmi_blocked: s.bool("nmi blocked")?,
        };
        let activity = match s.u8()? {
            0 => ActivityState::Active,
            1 => ActivityState::Halted,
            v => {
                return Err(StateError::InvalidValue {
                    field: "activity state",
                    value: u64::from(v),
                })
            }
        };
        s.finish(section::EVENTS)?;

        if body.remaining() != 0 {
            let found = body.u16().unwrap_or(0);
            return Err(StateError::UnexpectedSection { expected: 0, found });
        }

        let [cs, ss, ds, es, fs, gs, tr, ldtr] = segs;
        let state = VcpuState {
            gprs,
            rip,
            rflags,
            cs,
            ss,
            ds,
            es,
            fs,
            gs,
            tr,
            ldtr,
            gdtr: tables[0],
            idtr: tables[1],
            cr0: c[0],
            cr2: c[1],
            cr3: c[2],
            cr4: c[3],
            cr8: c[4],
            efer: c[5],
            dr: [c[6], c[7], c[8], c[9]],
            dr6: c[10],
            dr7: c[11],
            msrs: MsrState {
                star: m[0],
                lstar: m[1],
                cstar: m[2],
                sfmask: m[3],
                kernel_gs_base: m[4],
                sysenter_cs: m[5],
                sysenter_esp: m[6],
                sysenter_eip: m[7],
                pat: m[8],
                tsc_aux: m[9],
            },
            tsc_offset,
            fpu: FpuState {
                fxsave,
                xsave,
                xcr0,
            },
            pending_event,
            interruptibility,
            activity,
        };
        state.validate()?;
        Ok(state)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;

    /// A deterministic xorshift64* generator: tests must be reproducible without a crate.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    /// A state with every field different from the reset state.
    pub(crate) fn busy_state() -> VcpuState {
        let mut s = VcpuState::reset_64bit(0xFFFF_8000_0010_0000, 0x7000, 0x1000);
        s.gprs = Gprs::from_array(core::array::from_fn(|i| 0x1111_1111_1111_1111 * i as u64));
        s.rflags = rflags::FIXED | rflags::IF | rflags::CF;
        s.fs.base = 0x7FFF_0000_1000;
        s.gs.base = 0xFFFF_8880_0000_0000;
        s.ds = Segment::NULL;
        s.ldtr = Segment {
            selector: 0x28,
            base: 0x5000,
            limit: 0xFFF,
            attributes: SegmentAttributes {
                seg_type: 2,
                present: true,
                ..SegmentAttributes::default()
            },
        };
        s.gdtr = DescriptorTable {
            base: 0xFFFF_FE00_0000_0000,
            limit: 0x7F,
        };
        s.idtr = DescriptorTable {
            base: 0xFFFF_FE00_0000_1000,
            limit: 0xFFF,
        };
        s.cr2 = 0xDEAD_B000;
        s.cr4 |= cr4::OSXSAVE | cr4::PGE;
        s.cr8 = 0xF;
        s.efer |= efer::SCE | efer::NXE;
        s.dr = [1, 2, 3, 4];
        s.dr6 = 0xFFFF_4FF0;
        s.dr7 = 0x0000_0401;
        s.msrs = MsrState {
            star: 0x0023_0010_0000_0000,
            lstar: 0xFFFF_FFFF_8100_0000,
            cstar: 0xFFFF_FFFF_8100_1000,
            sfmask: 0x4_7700,
            kernel_gs_base: 0xFFFF_8880_1000_0000,
            sysenter_cs: 0x10,
            sysenter_esp: 0xFFFF_FE00_0000_2000,
            sysenter_eip: 0xFFFF_FFFF_8100_2000,
            pat: 0x0407_0504_0007_0406,
            tsc_aux: 3,
        };
        s.tsc_offset = -123_456_789;
        for (i, b) in s.fpu.fxsave.iter_mut().enumerate().skip(32) {
            *b = i as u8;
        }
        s.fpu.xcr0 = 0b111;
        let mut xsave = vec![0u8; 64 + 256];
        xsave[0] = 0b111;
        xsave[64..].fill(0xAB);
        s.fpu.xsave = xsave;
        s.pending_event = Some(PendingEvent {
            kind: PendingEventKind::Exception,
            vector: 14,
            error_code: Some(0x6),
            instruction_len: 0,
        });
        s.interruptibility = Interruptibility {
            sti_blocking: false,
            mov_ss_blocking: true,
            nmi_blocked: true,
        };
        s.activity = ActivityState::Halted;
        s
    }

    fn encoded(s: &VcpuState) -> Vec<u8> {
        let mut v = Vec::new();
        s.encode(&mut v);
        v
    }

    #[test]
    fn svm_attrib_round_trips_every_12_bit_value() {
        for a in 0..=0x0FFFu16 {
            let n = SegmentAttributes::from_svm(a);
            assert_eq!(n.to_svm(), a, "{a:#x}");
            assert_eq!(n.unusable, !n.present);
        }
    }

    #[test]
    fn svm_attrib_ignores_bits_above_11() {
        assert_eq!(
            SegmentAttributes::from_svm(0xF09B),
            SegmentAttributes::from_svm(0x009B)
        );
    }

    #[test]
    fn vmx_access_rights_round_trip_every_defined_bit_pattern() {
        // Bits 7:0, 15:12 and 16 are defined: 13 bits.
        for low in 0..=0xFFu32 {
            for high in 0..=0x1Fu32 {
                let ar = low | (high << 12);
                assert_eq!(SegmentAttributes::from_vmx(ar).to_vmx(), ar, "{ar:#x}");
            }
        }
    }

    #[test]
    fn vmx_access_rights_drop_reserved_bits() {
        let a = SegmentAttributes::from_vmx(0xFFFE_0F00 | 0xA09B);
        assert_eq!(a.to_vmx(), 0xA09B);
    }

    #[test]
    fn neutral_round_trips_through_both_formats() {
        // Every field combination where unusable == !present (the only ones SVM can express).
        for bits in 0..(1u16 << 12) {
            let present = bits & 0x80 != 0;
            let a = SegmentAttributes {
                seg_type: (bits & 0xF) as u8,
                s: bits & 0x10 != 0,
                dpl: ((bits >> 5) & 3) as u8,
                present,
                avl: bits & 0x100 != 0,
                long: bits & 0x200 != 0,
                db: bits & 0x400 != 0,
                granularity: bits & 0x800 != 0,
                unusable: !present,
            };
            assert_eq!(SegmentAttributes::from_svm(a.to_svm()), a);
            assert_eq!(SegmentAttributes::from_vmx(a.to_vmx()), a);
            assert_eq!(SegmentAttributes::from_wire(a.to_wire()), Ok(a));
        }
    }

    #[test]
    fn known_descriptor_encodings() {
        // 64-bit ring-0 code: descriptor access byte 9Bh, flags nibble Ah (G, L).
        let code = VcpuState::reset_64bit(0, 0, 0).cs.attributes;
        assert_eq!(code.to_svm(), 0x0A9B);
        assert_eq!(code.to_vmx(), 0xA09B);
        // Flat data: access byte 93h, flags Ch (G, D/B).
        let data = VcpuState::reset_64bit(0, 0, 0).ss.attributes;
        assert_eq!(data.to_svm(), 0x0C93);
        assert_eq!(data.to_vmx(), 0xC093);
        // Busy 64-bit TSS.
        let tss = VcpuState::reset_64bit(0, 0, 0).tr.attributes;
        assert_eq!(tss.to_svm(), 0x008B);
        assert_eq!(tss.to_vmx(), 0x008B);
    }

    #[test]
    fn unusable_crosses_vendors() {
        // VMX null segment -> SVM P = 0 -> back to unusable.
        let vmx = SegmentAttributes::from_vmx(0x1_0000);
        assert_eq!(vmx.to_svm() & 0x80, 0);
        assert!(SegmentAttributes::from_svm(vmx.to_svm()).unusable);
        // An unusable segment that still says present is written not-present to SVM.
        let odd = SegmentAttributes {
            present: true,
            unusable: true,
            seg_type: 3,
            s: true,
            ..SegmentAttributes::default()
        };
        assert_eq!(odd.to_svm(), 0x13);
        // SVM not-present data segment -> VMX unusable.
        assert_eq!(
            SegmentAttributes::from_svm(0x0C13).to_vmx(),
            0x1_C013,
            "P clear, unusable set"
        );
    }

    #[test]
    fn gprs_index_in_x86_order() {
        let mut g = Gprs::default();
        assert!(g.set(4, 0x1234));
        assert_eq!(g.rsp, 0x1234);
        assert!(g.set(3, 7));
        assert_eq!(g.rbx, 7);
        assert!(g.set(15, 9));
        assert_eq!(g.r15, 9);
        assert_eq!(g.get(4), Some(0x1234));
        assert_eq!(g.get(16), None);
        assert!(!g.set(16, 1));
        assert_eq!(Gprs::from_array(g.to_array()), g);
    }

    #[test]
    fn reset_64bit_is_long_mode() {
        let s = VcpuState::reset_64bit(0x10_0000, 0x8000, 0x2000);
        assert_eq!(s.rip, 0x10_0000);
        assert_eq!(s.gprs.rsp, 0x8000);
        assert_eq!(s.cr3, 0x2000);
        assert_eq!(s.cr0, 0x8001_0033);
        assert_eq!(s.cr4, 0x620);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.rflags, 2);
        assert_eq!(s.cpl(), 0);
        assert!(s.cs.attributes.long && !s.cs.attributes.db);
        assert!(s.ldtr.attributes.unusable);
        assert_eq!(s.fpu.mxcsr(), 0x1F80);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn cpl_follows_mode() {
        let mut s = VcpuState::reset_64bit(0, 0, 0);
        s.ss.attributes.dpl = 3;
        assert_eq!(s.cpl(), 3);
        s.cr0 = 0;
        assert_eq!(s.cpl(), 0);
        s.cr0 = cr0::PE;
        s.ss.attributes.dpl = 0;
        s.rflags |= rflags::VM;
        assert_eq!(s.cpl(), 3);
    }

    #[test]
    fn encoding_round_trips() {
        for s in [VcpuState::reset_64bit(1, 2, 3), busy_state()] {
            let bytes = encoded(&s);
            assert_eq!(&bytes[..4], b"VCPU");
            assert_eq!(VcpuState::decode(&bytes), Ok(s));
        }
    }

    #[test]
    fn encoding_round_trips_every_pending_event_kind() {
        let events = [
            PendingEvent {
                kind: PendingEventKind::ExternalInterrupt,
                vector: 0x30,
                error_code: None,
                instruction_len: 0,
            },
            PendingEvent {
                kind: PendingEventKind::Nmi,
                vector: 2,
                error_code: None,
                instruction_len: 0,
            },
            PendingEvent {
                kind: PendingEventKind::Exception,
                vector: 6,
                error_code: None,
                instruction_len: 0,
            },
            PendingEvent {
                kind: PendingEventKind::SoftwareInterrupt,
                vector: 0x80,
                error_code: None,
                instruction_len: 2,
            },
        ];
        for ev in events {
            let mut s = busy_state();
            s.pending_event = Some(ev);
            assert_eq!(VcpuState::decode(&encoded(&s)), Ok(s));
        }
    }

    #[test]
    fn encoding_appends() {
        let s = busy_state();
        let mut v = vec![0xEE; 3];
        s.encode(&mut v);
        assert_eq!(&v[..3], &[0xEE; 3]);
        assert_eq!(VcpuState::decode(&v[3..]), Ok(s));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encoded(&busy_state());
        for n in 0..bytes.len() {
            match VcpuState::decode(&bytes[..n]) {
                Err(StateError::Truncated { .. }) => {}
                other => panic!("prefix of {n} bytes decoded as {other:?}"),
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encoded(&busy_state());
        bytes.push(0);
        assert_eq!(VcpuState::decode(&bytes), Err(StateError::TrailingBytes(1)));
    }

    #[test]
    fn header_errors() {
        let good = encoded(&busy_state());
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            VcpuState::decode(&b),
            Err(StateError::BadMagic(_))
        ));
        let mut b = good.clone();
        b[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            VcpuState::decode(&b),
            Err(StateError::UnsupportedVersion(2))
        );
        let mut b = good;
        b[6] = 1;
        assert!(matches!(
            VcpuState::decode(&b),
            Err(StateError::InvalidValue {
                field: "header flags",
                ..
            })
        ));
    }

    /// Offset of the payload of section `tag` in an encoding.
    fn section_payload(bytes: &[u8], tag: u16) -> usize {
        let mut pos = HEADER_LEN;
        loop {
            let t = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]);
            let len = u32::from_le_bytes(bytes[pos + 2..pos + 6].try_into().unwrap()) as usize;
            if t == tag {
                return pos + 6;
            }
            pos += 6 + len;
        }
    }

    #[test]
    fn section_errors() {
        let good = encoded(&busy_state());
        // Swap the tag of the first section.
        let mut b = good.clone();
        b[HEADER_LEN] = 9;
        assert_eq!(
            VcpuState::decode(&b),
            Err(StateError::UnexpectedSection {
                expected: 1,
                found: 9
            })
        );
        // A fixed-size section with a wrong length.
        let mut b = good;
        let p = section_payload(&b, section::CONTROL);
        b[p - 4] = b[p - 4].wrapping_add(1);
        assert!(matches!(
            VcpuState::decode(&b),
            Err(StateError::SectionLength { section: 3, .. }) | Err(StateError::Truncated { .. })
        ));
    }

    #[test]
    fn invalid_values_are_rejected() {
        let good = encoded(&busy_state());
        let events = section_payload(&good, section::EVENTS);
        let segs = section_payload(&good, section::SEGMENTS);
        let fpu = section_payload(&good, section::FPU);
        let control = section_payload(&good, section::CONTROL);
        let gprs = section_payload(&good, section::GPRS);
        let cases: [(usize, u8, &str); 11] = [
            (gprs + 17 * 8, 0, "rflags"),
            (control + 4 * 8, 0x10, "cr8"),
            (control + 11 * 8 + 4, 1, "dr7"),
            (events, 2, "pending event flag"),
            (events + 1, 7, "pending event kind"),
            (events + 3, 5, "error code flag"),
            (events + 9, 2, "sti blocking"),
            (events + 12, 3, "activity state"),
            (segs + 3, 0x20, "segment attributes"),
            (fpu, 0, "xcr0"),
            (control + 5 * 8 + 1, 0x10, "efer.svme"),
        ];
        for (offset, value, field) in cases {
            let mut b = good.clone();
            b[offset] = value;
            match VcpuState::decode(&b) {
                Err(StateError::InvalidValue { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn fpu_images_that_would_fault_the_host_are_rejected() {
        let mut s = busy_state();
        s.fpu.fxsave[26] = 1; // MXCSR bit 16
        assert!(s.validate().is_err());
        assert!(VcpuState::decode(&encoded(&s)).is_err());

        let mut s = busy_state();
        s.fpu.xsave[0] = 0b1111; // XSTATE_BV bit 3 not in XCR0
        assert!(s.validate().is_err());

        let mut s = busy_state();
        s.fpu.xsave[15] = 0x80; // XCOMP_BV bit 63: compacted format
        assert!(s.validate().is_err());

        let mut s = busy_state();
        s.fpu.xsave[40] = 1; // reserved header bytes
        assert!(s.validate().is_err());

        let mut s = busy_state();
        s.fpu.xsave.truncate(10); // shorter than the header
        assert!(s.validate().is_err());

        let mut s = busy_state();
        s.fpu.xcr0 = 0b101; // AVX without SSE
        s.fpu.xsave[0] = 0b101;
        assert!(s.validate().is_err());
    }

    #[test]
    fn oversized_xsave_length_is_rejected_before_allocating() {
        let mut b = encoded(&busy_state());
        let fpu = section_payload(&b, section::FPU);
        let len_at = fpu + 8 + FXSAVE_SIZE;
        b[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            VcpuState::decode(&b),
            Err(StateError::InvalidValue {
                field: "xsave length",
                ..
            })
        ));
    }

    #[test]
    fn pending_event_rules() {
        let ok = |kind, vector, error_code, instruction_len| {
            PendingEvent {
                kind,
                vector,
                error_code,
                instruction_len,
            }
            .validate()
            .is_ok()
        };
        use PendingEventKind::*;
        assert!(ok(Nmi, 2, None, 0));
        assert!(!ok(Nmi, 3, None, 0));
        assert!(ok(Exception, 13, Some(0), 0));
        assert!(!ok(Exception, 32, None, 0));
        assert!(ok(ExternalInterrupt, 8, None, 0), "real-mode PIC vector");
        assert!(!ok(ExternalInterrupt, 32, Some(1), 0));
        assert!(ok(SoftwareInterrupt, 0x80, None, 2));
        assert!(!ok(SoftwareInterrupt, 0x80, None, 16));
        assert!(!ok(Exception, 3, None, 1));
    }

    #[test]
    fn absent_event_must_be_all_zero() {
        let mut s = busy_state();
        s.pending_event = None;
        let mut b = encoded(&s);
        let events = section_payload(&b, section::EVENTS);
        b[events + 2] = 0x20;
        assert!(matches!(
            VcpuState::decode(&b),
            Err(StateError::InvalidValue { .. })
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let len = (rng.next() % 1200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = VcpuState::decode(&bytes);
        }
    }

    #[test]
    fn mutated_encodings_never_panic() {
        // Random bytes rarely get past the magic; mutating a valid encoding reaches every field.
        let good = encoded(&busy_state());
        let mut rng = Rng(42);
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() as usize) % b.len();
                b[i] = rng.next() as u8;
            }
            if rng.next() % 4 == 0 {
                b.truncate((rng.next() as usize) % (good.len() + 1));
            }
            if let Ok(s) = VcpuState::decode(&b) {
                // Whatever decodes must be valid and re-encode to the same bytes.
                assert_eq!(s.validate(), Ok(()));
                assert_eq!(encoded(&s), b);
            }
        }
    }

    #[test]
    fn errors_display() {
        use alloc::string::ToString;
        let e = StateError::UnsupportedVersion(9).to_string();
        assert!(e.contains("version 9"), "{e}");
        let e = StateError::Truncated {
            offset: 12,
            needed: 4,
        }
        .to_string();
        assert!(e.contains("offset 12"), "{e}");
    }
}
