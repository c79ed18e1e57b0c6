//! The VMCB (virtual machine control block) as a typed map over its 4 KiB page.
//!
//! Layout per AMD APM vol. 2 appendix B: table B-1 (control area, offsets 000h-3FFh) and table B-2
//! (state save area, offsets 400h onwards, given below relative to 400h as the APM does). Every
//! field's offset is checked at compile time, so a wrong padding size is a build error, not a
//! guest that misbehaves. Reserved ranges are explicit byte arrays named after their offset and
//! must stay zero (APM 15.5.1: VMRUN may check reserved fields, and future processors give them a
//! meaning).
//!
//! The struct is `#[repr(C, align(4096))]` and exactly one page: the kernel allocates a physical
//! frame for it and passes that frame's physical address to VMRUN.

#![forbid(unsafe_code)]

use core::mem::{offset_of, size_of};

/// A segment register in the state save area (APM table B-2): selector, 12-bit packed attributes
/// (see [`crate::state::SegmentAttributes::from_svm`]), 32-bit expanded limit, 64-bit base.
/// GDTR and IDTR use the same layout with only `limit` and `base` meaningful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct VmcbSegment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

/// Control area, VMCB offsets 000h-3FFh (APM table B-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct VmcbControl {
    /// 000h: bits 15:0 intercept reads of CR0-CR15, bits 31:16 writes ([`intercept::cr_read`],
    /// [`intercept::cr_write`]).
    pub intercept_cr: u32,
    /// 004h: bits 15:0 intercept reads of DR0-DR15, bits 31:16 writes.
    pub intercept_dr: u32,
    /// 008h: bit n intercepts exception vector n.
    pub intercept_exceptions: u32,
    /// 00Ch: [`intercept::misc1`] bits.
    pub intercept_misc1: u32,
    /// 010h: [`intercept::misc2`] bits.
    pub intercept_misc2: u32,
    /// 014h: [`intercept::misc3`] bits.
    pub intercept_misc3: u32,
    pub _reserved_0x018: [u8; 0x24],
    /// 03Ch: PAUSE filter threshold.
    pub pause_filter_threshold: u16,
    /// 03Eh: PAUSE filter count.
    pub pause_filter_count: u16,
    /// 040h: physical address of the 12 KiB I/O permission map (4 KiB aligned).
    pub iopm_base_pa: u64,
    /// 048h: physical address of the 8 KiB MSR permission map (4 KiB aligned).
    pub msrpm_base_pa: u64,
    /// 050h: added to the host TSC to form the guest TSC.
    pub tsc_offset: u64,
    /// 058h: the guest's ASID (never 0: ASID 0 is the host's, APM 15.16).
    pub guest_asid: u32,
    /// 05Ch: a [`TlbControl`] value.
    pub tlb_control: u8,
    pub _reserved_0x05d: [u8; 3],
    /// 060h: virtual interrupt control, [`int_ctl`] bits (V_TPR, V_IRQ, V_INTR_PRIO,
    /// V_IGN_TPR, V_INTR_MASKING, ...).
    pub int_ctl: u32,
    /// 064h: bits 7:0 V_INTR_VECTOR (bits 39:32 of the APM's 64-bit field at 060h).
    pub int_vector: u32,
    /// 068h: bit 0 INTERRUPT_SHADOW, bit 1 GUEST_INTERRUPT_MASK ([`int_state`]).
    pub int_state: u32,
    pub _reserved_0x06c: [u8; 4],
    /// 070h: EXITCODE (see `svm::exit_code`).
    pub exitcode: u64,
    /// 078h: EXITINFO1.
    pub exitinfo1: u64,
    /// 080h: EXITINFO2.
    pub exitinfo2: u64,
    /// 088h: EXITINTINFO: the event being delivered when the exit happened (EVENTINJ format).
    pub exitintinfo: u64,
    /// 090h: [`np_control`] bits (NP_ENABLE, SEV, ...).
    pub np_control: u64,
    /// 098h: AVIC APIC_BAR.
    pub avic_apic_bar: u64,
    /// 0A0h: guest physical address of the GHCB (SEV-ES).
    pub ghcb_gpa: u64,
    /// 0A8h: EVENTINJ, the event to inject on the next VMRUN (`svm::event`).
    pub event_inj: u64,
    /// 0B0h: N_CR3, nested page table root (host physical address of the NPT PML4).
    pub n_cr3: u64,
    /// 0B8h: bit 0 LBR virtualization, bit 1 virtualized VMSAVE/VMLOAD.
    pub virt_ext: u64,
    /// 0C0h: VMCB clean bits ([`clean`]): a set bit lets the CPU reuse its cached copy.
    pub clean: u32,
    pub _reserved_0x0c4: [u8; 4],
    /// 0C8h: nRIP, the address of the next instruction (only with the NRIPS feature).
    pub next_rip: u64,
    /// 0D0h: number of guest instruction bytes fetched (with decode assists).
    pub guest_insn_len: u8,
    /// 0D1h: the guest instruction bytes fetched.
    pub guest_insn_bytes: [u8; 15],
    /// 0E0h: AVIC backing page pointer.
    pub avic_backing_page: u64,
    pub _reserved_0x0e8: [u8; 8],
    /// 0F0h: AVIC logical table pointer.
    pub avic_logical_table: u64,
    /// 0F8h: AVIC physical table pointer and maximum index.
    pub avic_physical_table: u64,
    pub _reserved_0x100: [u8; 8],
    /// 108h: VMSA pointer (SEV-ES).
    pub vmsa_pa: u64,
    pub _reserved_0x110: [u8; 0x2D0],
    /// 3E0h-3FFh: reserved for the host's own use; the processor never touches it.
    pub reserved_for_host: [u8; 0x20],
}

/// State save area, VMCB offsets 400h-FFFh (APM table B-2; offsets below are relative to 400h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct VmcbStateSave {
    pub es: VmcbSegment,
    pub cs: VmcbSegment,
    pub ss: VmcbSegment,
    pub ds: VmcbSegment,
    pub fs: VmcbSegment,
    pub gs: VmcbSegment,
    pub gdtr: VmcbSegment,
    pub ldtr: VmcbSegment,
    pub idtr: VmcbSegment,
    pub tr: VmcbSegment,
    pub _reserved_0x0a0: [u8; 0x2B],
    /// 0CBh: the current privilege level. VMRUN takes CPL from here, not from SS (APM 15.5.1).
    pub cpl: u8,
    pub _reserved_0x0cc: [u8; 4],
    /// 0D0h: guest EFER; SVME must be 1 or VMRUN fails (APM 15.5.1).
    pub efer: u64,
    pub _reserved_0x0d8: [u8; 0x70],
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    pub _reserved_0x180: [u8; 0x58],
    pub rsp: u64,
    pub s_cet: u64,
    pub ssp: u64,
    pub isst_addr: u64,
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    pub _reserved_0x248: [u8; 0x20],
    /// 268h: guest PAT, used for nested paging.
    pub g_pat: u64,
    pub dbgctl: u64,
    pub br_from: u64,
    pub br_to: u64,
    pub last_excp_from: u64,
    pub last_excp_to: u64,
    pub _reserved_0x298: [u8; 0x48],
    /// 2E0h: guest SPEC_CTRL.
    pub spec_ctrl: u64,
    pub _reserved_0x2e8: [u8; 0xC00 - 0x2E8],
}

/// The whole VMCB page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(4096))]
pub struct Vmcb {
    pub control: VmcbControl,
    pub save: VmcbStateSave,
}

impl Default for Vmcb {
    fn default() -> Self {
        Self::new()
    }
}

impl Vmcb {
    /// An all-zero VMCB: every intercept off, every reserved byte zero.
    pub const fn new() -> Self {
        const SEG: VmcbSegment = VmcbSegment {
            selector: 0,
            attrib: 0,
            limit: 0,
            base: 0,
        };
        Self {
            control: VmcbControl {
                intercept_cr: 0,
                intercept_dr: 0,
                intercept_exceptions: 0,
                intercept_misc1: 0,
                intercept_misc2: 0,
                intercept_misc3: 0,
                _reserved_0x018: [0; 0x24],
                pause_filter_threshold: 0,
                pause_filter_count: 0,
                iopm_base_pa: 0,
                msrpm_base_pa: 0,
                tsc_offset: 0,
                guest_asid: 0,
                tlb_control: 0,
                _reserved_0x05d: [0; 3],
                int_ctl: 0,
                int_vector: 0,
                int_state: 0,
                _reserved_0x06c: [0; 4],
                exitcode: 0,
                exitinfo1: 0,
                exitinfo2: 0,
                exitintinfo: 0,
                np_control: 0,
                avic_apic_bar: 0,
                ghcb_gpa: 0,
                event_inj: 0,
                n_cr3: 0,
                virt_ext: 0,
                clean: 0,
                _reserved_0x0c4: [0; 4],
                next_rip: 0,
                guest_insn_len: 0,
                guest_insn_bytes: [0; 15],
                avic_backing_page: 0,
                _reserved_0x0e8: [0; 8],
                avic_logical_table: 0,
                avic_physical_table: 0,
                _reserved_0x100: [0; 8],
                vmsa_pa: 0,
                _reserved_0x110: [0; 0x2D0],
                reserved_for_host: [0; 0x20],
            },
            save: VmcbStateSave {
                es: SEG,
                cs: SEG,
                ss: SEG,
                ds: SEG,
                fs: SEG,
                gs: SEG,
                gdtr: SEG,
                ldtr: SEG,
                idtr: SEG,
                tr: SEG,
                _reserved_0x0a0: [0; 0x2B],
                cpl: 0,
                _reserved_0x0cc: [0; 4],
                efer: 0,
                _reserved_0x0d8: [0; 0x70],
                cr4: 0,
                cr3: 0,
                cr0: 0,
                dr7: 0,
                dr6: 0,
                rflags: 0,
                rip: 0,
                _reserved_0x180: [0; 0x58],
                rsp: 0,
                s_cet: 0,
                ssp: 0,
                isst_addr: 0,
                rax: 0,
                star: 0,
                lstar: 0,
                cstar: 0,
                sfmask: 0,
                kernel_gs_base: 0,
                sysenter_cs: 0,
                sysenter_esp: 0,
                sysenter_eip: 0,
                cr2: 0,
                _reserved_0x248: [0; 0x20],
                g_pat: 0,
                dbgctl: 0,
                br_from: 0,
                br_to: 0,
                last_excp_from: 0,
                last_excp_to: 0,
                _reserved_0x298: [0; 0x48],
                spec_ctrl: 0,
                _reserved_0x2e8: [0; 0xC00 - 0x2E8],
            },
        }
    }

    /// Sets or clears intercept bits in the misc1 vector (offset 00Ch).
    pub fn set_misc1(&mut self, bits: u32, on: bool) {
        set_bits(&mut self.control.intercept_misc1, bits, on);
    }

    /// Sets or clears intercept bits in the misc2 vector (offset 010h).
    pub fn set_misc2(&mut self, bits: u32, on: bool) {
        set_bits(&mut self.control.intercept_misc2, bits, on);
    }

    /// Sets or clears the intercept of exception `vector` (0-31); `false` for other vectors.
    pub fn set_exception_intercept(&mut self, vector: u8, on: bool) -> bool {
        match 1u32.checked_shl(u32::from(vector)) {
            Some(bit) => {
                set_bits(&mut self.control.intercept_exceptions, bit, on);
                true
            }
            None => false,
        }
    }

    /// Enables nested paging with the NPT root at host physical address `n_cr3`.
    pub fn enable_nested_paging(&mut self, n_cr3: u64) {
        self.control.np_control |= np_control::NP_ENABLE;
        self.control.n_cr3 = n_cr3;
        self.control.clean &= !clean::NP;
    }
}

fn set_bits(word: &mut u32, bits: u32, on: bool) {
    if on {
        *word |= bits;
    } else {
        *word &= !bits;
    }
}

/// Intercept vector bits (APM table B-1 and 15.9-15.13).
pub mod intercept {
    /// Bit in the CR intercept word (offset 000h) for reads of CR`n` (0-15).
    pub const fn cr_read(n: u8) -> u32 {
        1 << (n & 15)
    }
    /// Bit in the CR intercept word for writes of CR`n` (0-15).
    pub const fn cr_write(n: u8) -> u32 {
        1 << (16 + (n & 15))
    }
    /// Bit in the DR intercept word (offset 004h) for reads of DR`n` (0-15).
    pub const fn dr_read(n: u8) -> u32 {
        1 << (n & 15)
    }
    /// Bit in the DR intercept word for writes of DR`n` (0-15).
    pub const fn dr_write(n: u8) -> u32 {
        1 << (16 + (n & 15))
    }

    /// Offset 00Ch.
    pub mod misc1 {
        pub const INTR: u32 = 1 << 0;
        pub const NMI: u32 = 1 << 1;
        pub const SMI: u32 = 1 << 2;
        pub const INIT: u32 = 1 << 3;
        pub const VINTR: u32 = 1 << 4;
        /// Writes of CR0 that change bits other than TS or MP.
        pub const CR0_SEL_WRITE: u32 = 1 << 5;
        pub const IDTR_READ: u32 = 1 << 6;
        pub const GDTR_READ: u32 = 1 << 7;
        pub const LDTR_READ: u32 = 1 << 8;
        pub const TR_READ: u32 = 1 << 9;
        pub const IDTR_WRITE: u32 = 1 << 10;
        pub const GDTR_WRITE: u32 = 1 << 11;
        pub const LDTR_WRITE: u32 = 1 << 12;
        pub const TR_WRITE: u32 = 1 << 13;
        pub const RDTSC: u32 = 1 << 14;
        pub const RDPMC: u32 = 1 << 15;
        pub const PUSHF: u32 = 1 << 16;
        pub const POPF: u32 = 1 << 17;
        pub const CPUID: u32 = 1 << 18;
        pub const RSM: u32 = 1 << 19;
        pub const IRET: u32 = 1 << 20;
        pub const INTN: u32 = 1 << 21;
        pub const INVD: u32 = 1 << 22;
        pub const PAUSE: u32 = 1 << 23;
        pub const HLT: u32 = 1 << 24;
        pub const INVLPG: u32 = 1 << 25;
        pub const INVLPGA: u32 = 1 << 26;
        /// Port I/O through the IOPM.
        pub const IOIO_PROT: u32 = 1 << 27;
        /// RDMSR/WRMSR through the MSRPM.
        pub const MSR_PROT: u32 = 1 << 28;
        pub const TASK_SWITCH: u32 = 1 << 29;
        pub const FERR_FREEZE: u32 = 1 << 30;
        /// Shutdown (triple fault): without it the whole host would shut down.
        pub const SHUTDOWN: u32 = 1 << 31;
    }

    /// Offset 010h.
    pub mod misc2 {
        /// VMRUN must be intercepted, or VMRUN fails its consistency checks (APM 15.5.1).
        pub const VMRUN: u32 = 1 << 0;
        pub const VMMCALL: u32 = 1 << 1;
        pub const VMLOAD: u32 = 1 << 2;
        pub const VMSAVE: u32 = 1 << 3;
        pub const STGI: u32 = 1 << 4;
        pub const CLGI: u32 = 1 << 5;
        pub const SKINIT: u32 = 1 << 6;
        pub const RDTSCP: u32 = 1 << 7;
        pub const ICEBP: u32 = 1 << 8;
        pub const WBINVD: u32 = 1 << 9;
        pub const MONITOR: u32 = 1 << 10;
        pub const MWAIT: u32 = 1 << 11;
        pub const MWAIT_CONDITIONAL: u32 = 1 << 12;
        pub const XSETBV: u32 = 1 << 13;
        pub const RDPRU: u32 = 1 << 14;
        /// EFER write trap (after the write completes).
        pub const EFER_WRITE_TRAP: u32 = 1 << 15;
        /// CR`n` write trap (after the write completes), n = 0-15.
        pub const fn cr_write_trap(n: u8) -> u32 {
            1 << (16 + (n & 15))
        }
    }

    /// Offset 014h.
    pub mod misc3 {
        pub const INVLPGB: u32 = 1 << 0;
        pub const INVLPGB_ILLEGAL: u32 = 1 << 1;
        pub const INVPCID: u32 = 1 << 2;
        pub const MCOMMIT: u32 = 1 << 3;
        pub const TLBSYNC: u32 = 1 << 4;
    }
}

/// TLB_CONTROL values (offset 05Ch, APM 15.16.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TlbControl {
    /// Do nothing.
    Nothing = 0,
    /// Flush the entire TLB, all ASIDs (use only when the hardware has no FlushByAsid).
    FlushAll = 1,
    /// Flush this guest's ASID.
    FlushGuest = 3,
    /// Flush this guest's non-global translations.
    FlushGuestNonGlobal = 7,
}

/// Bits of `int_ctl` (offset 060h, APM table B-1 and 15.21).
pub mod int_ctl {
    /// V_TPR: the virtual TPR, i.e. guest CR8 (bits 3:0 used).
    pub const V_TPR_MASK: u32 = 0xF;
    /// V_IRQ: a virtual interrupt is pending.
    pub const V_IRQ: u32 = 1 << 8;
    /// V_GIF: virtual global interrupt flag.
    pub const V_GIF: u32 = 1 << 9;
    /// V_NMI: a virtual NMI is pending (vNMI).
    pub const V_NMI_PENDING: u32 = 1 << 11;
    /// V_NMI_MASK: virtual NMIs are blocked (vNMI).
    pub const V_NMI_MASK: u32 = 1 << 12;
    /// V_INTR_PRIO, bits 19:16: priority of the virtual interrupt.
    pub const V_INTR_PRIO_SHIFT: u32 = 16;
    pub const V_INTR_PRIO_MASK: u32 = 0xF << V_INTR_PRIO_SHIFT;
    /// V_IGN_TPR: the virtual interrupt ignores the TPR.
    pub const V_IGN_TPR: u32 = 1 << 20;
    /// V_INTR_MASKING: guest RFLAGS.IF and CR8 control virtual interrupts only; host interrupts
    /// stay under host control.
    pub const V_INTR_MASKING: u32 = 1 << 24;
    /// Virtual GIF enable.
    pub const V_GIF_ENABLE: u32 = 1 << 25;
    /// Virtual NMI enable.
    pub const V_NMI_ENABLE: u32 = 1 << 26;
    /// AVIC enable.
    pub const AVIC_ENABLE: u32 = 1 << 31;
}

/// Bits of `int_state` (offset 068h).
pub mod int_state {
    /// The guest is in an interrupt shadow (after STI or MOV SS).
    pub const INTERRUPT_SHADOW: u32 = 1 << 0;
    /// The guest's RFLAGS.IF at the exit, when V_INTR_MASKING is set.
    pub const GUEST_INTERRUPT_MASK: u32 = 1 << 1;
}

/// Bits of `np_control` (offset 090h).
pub mod np_control {
    pub const NP_ENABLE: u64 = 1 << 0;
    pub const SEV_ENABLE: u64 = 1 << 1;
    pub const SEV_ES_ENABLE: u64 = 1 << 2;
}

/// VMCB clean bits (offset 0C0h, APM 15.15.3): when the hypervisor changes a field it must clear
/// the bit that covers it before the next VMRUN, or the CPU may keep using its cached copy.
pub mod clean {
    /// Intercept vectors, TSC offset, PAUSE filter.
    pub const INTERCEPTS: u32 = 1 << 0;
    /// IOPM_BASE, MSRPM_BASE.
    pub const IOPM: u32 = 1 << 1;
    /// ASID.
    pub const ASID: u32 = 1 << 2;
    /// V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING, V_INTR_VECTOR.
    pub const TPR: u32 = 1 << 3;
    /// Nested paging: NP_ENABLE, N_CR3, G_PAT.
    pub const NP: u32 = 1 << 4;
    /// CR0, CR3, CR4, EFER.
    pub const CRX: u32 = 1 << 5;
    /// DR6, DR7.
    pub const DRX: u32 = 1 << 6;
    /// GDTR, IDTR.
    pub const DT: u32 = 1 << 7;
    /// CS, DS, SS, ES and CPL.
    pub const SEG: u32 = 1 << 8;
    /// CR2.
    pub const CR2: u32 = 1 << 9;
    /// DbgCtlMsr, br_from/to, lastint_from/to.
    pub const LBR: u32 = 1 << 10;
    /// AVIC APIC_BAR, backing page, logical and physical tables.
    pub const AVIC: u32 = 1 << 11;
    /// S_CET, SSP, ISST_ADDR.
    pub const CET: u32 = 1 << 12;
}

// Compile-time layout checks against APM appendix B. Control area (table B-1):
const _: () = {
    assert!(size_of::<VmcbSegment>() == 16);
    assert!(offset_of!(VmcbSegment, selector) == 0);
    assert!(offset_of!(VmcbSegment, attrib) == 2);
    assert!(offset_of!(VmcbSegment, limit) == 4);
    assert!(offset_of!(VmcbSegment, base) == 8);

    assert!(offset_of!(VmcbControl, intercept_cr) == 0x000);
    assert!(offset_of!(VmcbControl, intercept_dr) == 0x004);
    assert!(offset_of!(VmcbControl, intercept_exceptions) == 0x008);
    assert!(offset_of!(VmcbControl, intercept_misc1) == 0x00C);
    assert!(offset_of!(VmcbControl, intercept_misc2) == 0x010);
    assert!(offset_of!(VmcbControl, intercept_misc3) == 0x014);
    assert!(offset_of!(VmcbControl, _reserved_0x018) == 0x018);
    assert!(offset_of!(VmcbControl, pause_filter_threshold) == 0x03C);
    assert!(offset_of!(VmcbControl, pause_filter_count) == 0x03E);
    assert!(offset_of!(VmcbControl, iopm_base_pa) == 0x040);
    assert!(offset_of!(VmcbControl, msrpm_base_pa) == 0x048);
    assert!(offset_of!(VmcbControl, tsc_offset) == 0x050);
    assert!(offset_of!(VmcbControl, guest_asid) == 0x058);
    assert!(offset_of!(VmcbControl, tlb_control) == 0x05C);
    assert!(offset_of!(VmcbControl, _reserved_0x05d) == 0x05D);
    assert!(offset_of!(VmcbControl, int_ctl) == 0x060);
    assert!(offset_of!(VmcbControl, int_vector) == 0x064);
    assert!(offset_of!(VmcbControl, int_state) == 0x068);
    assert!(offset_of!(VmcbControl, _reserved_0x06c) == 0x06C);
    assert!(offset_of!(VmcbControl, exitcode) == 0x070);
    assert!(offset_of!(VmcbControl, exitinfo1) == 0x078);
    assert!(offset_of!(VmcbControl, exitinfo2) == 0x080);
    assert!(offset_of!(VmcbControl, exitintinfo) == 0x088);
    assert!(offset_of!(VmcbControl, np_control) == 0x090);
    assert!(offset_of!(VmcbControl, avic_apic_bar) == 0x098);
    assert!(offset_of!(VmcbControl, ghcb_gpa) == 0x0A0);
    assert!(offset_of!(VmcbControl, event_inj) == 0x0A8);
    assert!(offset_of!(VmcbControl, n_cr3) == 0x0B0);
    assert!(offset_of!(VmcbControl, virt_ext) == 0x0B8);
    assert!(offset_of!(VmcbControl, clean) == 0x0C0);
    assert!(offset_of!(VmcbControl, _reserved_0x0c4) == 0x0C4);
    assert!(offset_of!(VmcbControl, next_rip) == 0x0C8);
    assert!(offset_of!(VmcbControl, guest_insn_len) == 0x0D0);
    assert!(offset_of!(VmcbControl, guest_insn_bytes) == 0x0D1);
    assert!(offset_of!(VmcbControl, avic_backing_page) == 0x0E0);
    assert!(offset_of!(VmcbControl, _reserved_0x0e8) == 0x0E8);
    assert!(offset_of!(VmcbControl, avic_logical_table) == 0x0F0);
    assert!(offset_of!(VmcbControl, avic_physical_table) == 0x0F8);
    assert!(offset_of!(VmcbControl, _reserved_0x100) == 0x100);
    assert!(offset_of!(VmcbControl, vmsa_pa) == 0x108);
    assert!(offset_of!(VmcbControl, _reserved_0x110) == 0x110);
    assert!(offset_of!(VmcbControl, reserved_for_host) == 0x3E0);
    assert!(size_of::<VmcbControl>() == 0x400);
};

// State save area (table B-2), offsets relative to 400h:
const _: () = {
    assert!(offset_of!(VmcbStateSave, es) == 0x000);
    assert!(offset_of!(VmcbStateSave, cs) == 0x010);
    assert!(offset_of!(VmcbStateSave, ss) == 0x020);
    assert!(offset_of!(VmcbStateSave, ds) == 0x030);
    assert!(offset_of!(VmcbStateSave, fs) == 0x040);
    assert!(offset_of!(VmcbStateSave, gs) == 0x050);
    assert!(offset_of!(VmcbStateSave, gdtr) == 0x060);
    assert!(offset_of!(VmcbStateSave, ldtr) == 0x070);
    assert!(offset_of!(VmcbStateSave, idtr) == 0x080);
    assert!(offset_of!(VmcbStateSave, tr) == 0x090);
    assert!(offset_of!(VmcbStateSave, _reserved_0x0a0) == 0x0A0);
    assert!(offset_of!(VmcbStateSave, cpl) == 0x0CB);
    assert!(offset_of!(VmcbStateSave, _reserved_0x0cc) == 0x0CC);
    assert!(offset_of!(VmcbStateSave, efer) == 0x0D0);
    assert!(offset_of!(VmcbStateSave, _reserved_0x0d8) == 0x0D8);
    assert!(offset_of!(VmcbStateSave, cr4) == 0x148);
    assert!(offset_of!(VmcbStateSave, cr3) == 0x150);
    assert!(offset_of!(VmcbStateSave, cr0) == 0x158);
    assert!(offset_of!(VmcbStateSave, dr7) == 0x160);
    assert!(offset_of!(VmcbStateSave, dr6) == 0x168);
    assert!(offset_of!(VmcbStateSave, rflags) == 0x170);
    assert!(offset_of!(VmcbStateSave, rip) == 0x178);
    assert!(offset_of!(VmcbStateSave, _reserved_0x180) == 0x180);
    assert!(offset_of!(VmcbStateSave, rsp) == 0x1D8);
    assert!(offset_of!(VmcbStateSave, s_cet) == 0x1E0);
    assert!(offset_of!(VmcbStateSave, ssp) == 0x1E8);
    assert!(offset_of!(VmcbStateSave, isst_addr) == 0x1F0);
    assert!(offset_of!(VmcbStateSave, rax) == 0x1F8);
    assert!(offset_of!(VmcbStateSave, star) == 0x200);
    assert!(offset_of!(VmcbStateSave, lstar) == 0x208);
    assert!(offset_of!(VmcbStateSave, cstar) == 0x210);
    assert!(offset_of!(VmcbStateSave, sfmask) == 0x218);
    assert!(offset_of!(VmcbStateSave, kernel_gs_base) == 0x220);
    assert!(offset_of!(VmcbStateSave, sysenter_cs) == 0x228);
    assert!(offset_of!(VmcbStateSave, sysenter_esp) == 0x230);
    assert!(offset_of!(VmcbStateSave, sysenter_eip) == 0x238);
    assert!(offset_of!(VmcbStateSave, cr2) == 0x240);
    assert!(offset_of!(VmcbStateSave, _reserved_0x248) == 0x248);
    assert!(offset_of!(VmcbStateSave, g_pat) == 0x268);
    assert!(offset_of!(VmcbStateSave, dbgctl) == 0x270);
    assert!(offset_of!(VmcbStateSave, br_from) == 0x278);
    assert!(offset_of!(VmcbStateSave, br_to) == 0x280);
    assert!(offset_of!(VmcbStateSave, last_excp_from) == 0x288);
    assert!(offset_of!(VmcbStateSave, last_excp_to) == 0x290);
    assert!(offset_of!(VmcbStateSave, _reserved_0x298) == 0x298);
    assert!(offset_of!(VmcbStateSave, spec_ctrl) == 0x2E0);
    assert!(offset_of!(VmcbStateSave, _reserved_0x2e8) == 0x2E8);
    assert!(size_of::<VmcbStateSave>() == 0xC00);

    assert!(offset_of!(Vmcb, control) == 0x000);
    assert!(offset_of!(Vmcb, save) == 0x400);
    assert!(size_of::<Vmcb>() == 4096);
    assert!(core::mem::align_of::<Vmcb>() == 4096);
};

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;

    #[test]
    fn new_is_all_zero() {
        let v = Box::new(Vmcb::new());
        assert_eq!(*v, Vmcb::default());
        assert_eq!(v.control.intercept_misc1, 0);
        assert!(v.save._reserved_0x2e8.iter().all(|&b| b == 0));
    }

    #[test]
    fn intercept_bits() {
        assert_eq!(intercept::cr_read(0), 1);
        assert_eq!(intercept::cr_write(0), 1 << 16);
        assert_eq!(intercept::cr_write(8), 1 << 24);
        assert_eq!(intercept::dr_write(7), 1 << 23);
        assert_eq!(intercept::misc2::cr_write_trap(3), 1 << 19);
        let mut v = Box::new(Vmcb::new());
        v.set_misc1(intercept::misc1::CPUID | intercept::misc1::HLT, true);
        v.set_misc2(intercept::misc2::VMRUN, true);
        assert_eq!(v.control.intercept_misc1, (1 << 18) | (1 << 24));
        v.set_misc1(intercept::misc1::HLT, false);
        assert_eq!(v.control.intercept_misc1, 1 << 18);
        assert_eq!(v.control.intercept_misc2, 1);
        assert!(v.set_exception_intercept(14, true));
        assert!(!v.set_exception_intercept(32, true));
        assert_eq!(v.control.intercept_exceptions, 1 << 14);
    }

    #[test]
    fn nested_paging_clears_np_clean_bit() {
        let mut v = Box::new(Vmcb::new());
        v.control.clean = u32::MAX;
        v.enable_nested_paging(0x1234_5000);
        assert_eq!(v.control.np_control & np_control::NP_ENABLE, 1);
        assert_eq!(v.control.n_cr3, 0x1234_5000);
        assert_eq!(v.control.clean & clean::NP, 0);
    }

    #[test]
    fn tlb_control_values() {
        assert_eq!(TlbControl::Nothing as u8, 0);
        assert_eq!(TlbControl::FlushAll as u8, 1);
        assert_eq!(TlbControl::FlushGuest as u8, 3);
        assert_eq!(TlbControl::FlushGuestNonGlobal as u8, 7);
    }
}
