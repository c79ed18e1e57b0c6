//! Discovery of the host CPU's identity and virtualization capabilities from CPUID and MSRs.
//!
//! The kernel shows the result in its `info` console command and uses it to choose the SVM or the
//! VMX backend. The raw instructions stay in the kernel behind [`CpuInfoSource`], so every rule
//! here runs in host tests against recorded values of real and emulated CPUs.
//!
//! Reading an MSR the CPU does not implement raises #GP, which on bare metal this early is a
//! crash, so [`discover`] reads an MSR only once CPUID (or another MSR) says it exists:
//!
//! | MSR | read only if |
//! |---|---|
//! | `VM_CR` | CPUID 8000_0001h ECX bit 2 (SVM) |
//! | `IA32_FEATURE_CONTROL`, `IA32_VMX_BASIC`, `IA32_VMX_PROCBASED_CTLS` | CPUID 1 ECX bit 5 (VMX) |
//! | `IA32_VMX_TRUE_PROCBASED_CTLS` | VMX, and `IA32_VMX_BASIC` bit 55 |
//! | `IA32_VMX_PROCBASED_CTLS2` | VMX, and secondary controls may be 1 (procbased allowed-1 bit 31) |
//! | `IA32_VMX_EPT_VPID_CAP` | VMX, and "enable EPT" or "enable VPID" may be 1 |
//!
//! CPUID leaves are read only up to the maximum leaf CPUID reports, since out-of-range leaves
//! return unrelated data (Intel repeats the highest basic leaf).
//!
//! Sources: AMD64 Architecture Programmer's Manual vol. 2 (15.4 "Enabling SVM") and vol. 3
//! (appendix E, CPUID); Intel SDM vol. 2A (CPUID), vol. 3C appendix A (VMX capability MSRs) and
//! vol. 4 (MSRs).

#![forbid(unsafe_code)]

use alloc::string::String;
use core::fmt;

/// The four registers CPUID returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Access to CPUID and MSRs: the real instructions in the kernel, recorded values in tests.
pub trait CpuInfoSource {
    /// CPUID with EAX = `leaf` and ECX = `subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;

    /// RDMSR of `msr`. [`discover`] only asks for MSRs that CPUID reports as implemented (see the
    /// module documentation), so an implementation may execute RDMSR without a #GP handler.
    fn read_msr(&self, msr: u32) -> u64;
}

/// Addresses of the MSRs [`discover`] reads.
pub mod msr {
    /// Intel: lock bit and the "enable VMX" bits that firmware sets.
    pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
    /// Intel: VMCS revision and size, and whether the TRUE control MSRs exist.
    pub const IA32_VMX_BASIC: u32 = 0x480;
    /// Intel: allowed settings of the primary processor-based VM-execution controls.
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    /// Intel: allowed settings of the secondary processor-based VM-execution controls.
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    /// Intel: EPT and VPID capabilities.
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    /// Intel: like `IA32_VMX_PROCBASED_CTLS`, also reporting which default-1 controls may be 0.
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    /// AMD: SVM lock and disable bits that firmware sets.
    pub const VM_CR: u32 = 0xC001_0114;
}

/// CPUID leaves [`discover`] reads.
mod leaf {
    pub const VENDOR: u32 = 0;
    pub const FEATURES: u32 = 1;
    pub const EXTENDED_MAX: u32 = 0x8000_0000;
    pub const EXTENDED_FEATURES: u32 = 0x8000_0001;
    pub const BRAND: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];
    pub const POWER_MANAGEMENT: u32 = 0x8000_0007;
    pub const ADDRESS_SIZES: u32 = 0x8000_0008;
    pub const SVM: u32 = 0x8000_000A;
}

/// Whether bit `index` of `value` is set.
const fn bit(value: u64, index: u32) -> bool {
    value & (1 << index) != 0
}

/// Whether bit `index` of the 32-bit register `value` is set.
const fn bit32(value: u32, index: u32) -> bool {
    bit(value as u64, index)
}

/// The CPU vendor, from the 12-byte identification string of CPUID leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// "AuthenticAMD"
    Amd,
    /// "GenuineIntel"
    Intel,
    /// Any other identification string (Hygon, Zhaoxin, emulators, ...), kept as read.
    Other([u8; 12]),
}

impl Vendor {
    /// The vendor with identification string `id`.
    pub fn from_id(id: [u8; 12]) -> Self {
        match &id {
            b"AuthenticAMD" => Vendor::Amd,
            b"GenuineIntel" => Vendor::Intel,
            _ => Vendor::Other(id),
        }
    }

    /// The identification string.
    pub fn id(&self) -> [u8; 12] {
        match self {
            Vendor::Amd => *b"AuthenticAMD",
            Vendor::Intel => *b"GenuineIntel",
            Vendor::Other(id) => *id,
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.id() {
            write!(f, "{}", printable(byte))?;
        }
        Ok(())
    }
}

/// `byte` as a character safe to print on the console: printable ASCII as is, anything else '?'.
fn printable(byte: u8) -> char {
    if byte.is_ascii_graphic() || byte == b' ' {
        char::from(byte)
    } else {
        '?'
    }
}

/// AMD-V (SVM) capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SvmCaps {
    /// `VM_CR.SVMDIS` (bit 4): firmware turned SVM off; setting `EFER.SVME` would #GP.
    pub disabled_by_firmware: bool,
    /// SVM revision (CPUID 8000_000Ah EAX bits 7:0).
    pub revision: u8,
    /// Number of address space IDs (CPUID 8000_000Ah EBX).
    pub num_asids: u32,
    /// Nested paging, NPT (EDX bit 0).
    pub nested_paging: bool,
    /// LBR virtualization (EDX bit 1).
    pub lbr_virtualization: bool,
    /// SVM lock: `VM_CR.LOCK` can be unlocked with a key (EDX bit 2).
    pub svm_lock: bool,
    /// NRIP save: the VMCB reports the next RIP on intercepts (EDX bit 3).
    pub nrip_save: bool,
    /// TSC ratio MSR (EDX bit 4).
    pub tsc_rate_msr: bool,
    /// VMCB clean bits (EDX bit 5).
    pub vmcb_clean_bits: bool,
    /// TLB flush by ASID through the VMCB's TLB_CONTROL (EDX bit 6).
    pub flush_by_asid: bool,
    /// Decode assists: intercepts report decoded instruction information (EDX bit 7).
    pub decode_assists: bool,
    /// PAUSE intercept filter (EDX bit 10).
    pub pause_filter: bool,
    /// PAUSE filter cycle threshold (EDX bit 12).
    pub pause_filter_threshold: bool,
    /// Advanced virtual interrupt controller, AVIC (EDX bit 13).
    pub avic: bool,
    /// Virtualized VMSAVE/VMLOAD (EDX bit 15).
    pub vmsave_vmload_virtualization: bool,
    /// Virtual GIF (EDX bit 16).
    pub virtual_gif: bool,
}

/// EPT and VPID capabilities (`IA32_VMX_EPT_VPID_CAP`). All false when that MSR does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EptVpidCaps {
    /// Page walks of length 4 (bit 6).
    pub page_walk_length_4: bool,
    /// Write-back memory type for EPT paging structures (bit 14).
    pub write_back_memory_type: bool,
    /// 2 MiB EPT pages (bit 16).
    pub pages_2mib: bool,
    /// INVEPT (bit 20).
    pub invept: bool,
    /// Accessed and dirty flags in EPT entries (bit 21): the primary dirty-tracking mechanism.
    pub accessed_dirty_flags: bool,
    /// Single-context INVEPT (bit 25).
    pub invept_single_context: bool,
    /// All-context INVEPT (bit 26).
    pub invept_all_context: bool,
    /// INVVPID (bit 32).
    pub invvpid: bool,
}

/// Intel VT-x (VMX) capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmxCaps {
    /// `IA32_FEATURE_CONTROL` is locked without "VMX outside SMX" (bit 2): VMXON would #GP.
    /// When it is not locked, the kernel can enable VMX itself, so it is not disabled.
    pub disabled_by_firmware: bool,
    /// VMCS revision identifier (`IA32_VMX_BASIC` bits 30:0), written at the start of each VMCS.
    pub vmcs_revision_id: u32,
    /// Bytes to allocate for the VMXON region and each VMCS (`IA32_VMX_BASIC` bits 44:32).
    pub vmcs_region_size: u16,
    /// The TRUE control capability MSRs exist (`IA32_VMX_BASIC` bit 55).
    pub true_controls: bool,
    /// "Activate secondary controls" may be 1 (procbased allowed-1 bit 31).
    pub secondary_controls: bool,
    /// "Enable EPT" may be 1 (secondary allowed-1 bit 1).
    pub ept: bool,
    /// "Enable VPID" may be 1 (secondary allowed-1 bit 5).
    pub vpid: bool,
    /// "Unrestricted guest" may be 1 (secondary allowed-1 bit 7): real mode guests without
    /// emulation.
    pub unrestricted_guest: bool,
    /// "Enable PML" (page-modification logging) may be 1 (secondary allowed-1 bit 17).
    pub pml: bool,
    pub ept_vpid: EptVpidCaps,
}

impl VmxCaps {
    /// EPT with accessed/dirty flags, the prerequisite of dirty tracking by D bits.
    pub fn ept_accessed_dirty(&self) -> bool {
        self.ept && self.ept_vpid.accessed_dirty_flags
    }
}

/// The hardware virtualization the CPU offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Virtualization {
    /// AMD-V.
    Svm(SvmCaps),
    /// Intel VT-x.
    Vmx(VmxCaps),
    /// Neither (for example a nested guest whose hypervisor does not expose either).
    None,
}

/// What the kernel needs to know about the host CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub vendor: Vendor,
    /// Brand string (CPUID 8000_0002h..8000_0004h) up to its first NUL, without surrounding
    /// spaces, non-printable bytes replaced by '?'. Empty when the CPU has none.
    pub brand: String,
    /// Display family, with the extended family added when the base family is 0xF.
    pub family: u16,
    /// Display model, with the extended model included where the vendor's rule says so.
    pub model: u8,
    pub stepping: u8,
    /// x2APIC mode (CPUID 1 ECX bit 21).
    pub x2apic: bool,
    /// The TSC runs at a constant rate in every power state (CPUID 8000_0007h EDX bit 8).
    pub tsc_invariant: bool,
    /// Physical address width (MAXPHYADDR).
    pub phys_addr_bits: u8,
    pub virt: Virtualization,
}

/// Reads the CPU's identity and virtualization capabilities from `src`.
pub fn discover(src: &impl CpuInfoSource) -> Capabilities {
    let vendor_leaf = src.cpuid(leaf::VENDOR, 0);
    let max_basic_leaf = vendor_leaf.eax;
    let mut vendor_id = [0u8; 12];
    // The identification string is in EBX, EDX, ECX order.
    vendor_id[0..4].copy_from_slice(&vendor_leaf.ebx.to_le_bytes());
    vendor_id[4..8].copy_from_slice(&vendor_leaf.edx.to_le_bytes());
    vendor_id[8..12].copy_from_slice(&vendor_leaf.ecx.to_le_bytes());
    let vendor = Vendor::from_id(vendor_id);

    let features = if max_basic_leaf >= leaf::FEATURES {
        src.cpuid(leaf::FEATURES, 0)
    } else {
        CpuidResult::default()
    };
    let (family, model, stepping) = decode_signature(features.eax, &vendor);

    // A CPU without extended leaves answers leaf 8000_0000h with unrelated data; a real maximum
    // is in 8000_0000h..=8000_FFFFh.
    let max_extended_leaf = match src.cpuid(leaf::EXTENDED_MAX, 0).eax {
        max @ 0x8000_0000..=0x8000_FFFF => max,
        _ => 0,
    };
    let has_extended = |leaf: u32| max_extended_leaf >= leaf;

    let extended_features = if has_extended(leaf::EXTENDED_FEATURES) {
        src.cpuid(leaf::EXTENDED_FEATURES, 0)
    } else {
        CpuidResult::default()
    };

    let brand = if has_extended(leaf::BRAND[2]) {
        brand_string(src)
    } else {
        String::new()
    };

    let tsc_invariant =
        has_extended(leaf::POWER_MANAGEMENT) && bit32(src.cpuid(leaf::POWER_MANAGEMENT, 0).edx, 8);

    let phys_addr_bits = if has_extended(leaf::ADDRESS_SIZES) {
        src.cpuid(leaf::ADDRESS_SIZES, 0).eax as u8
    } else if bit32(features.edx, 6) {
        // Intel SDM: without leaf 8000_0008h the width is 36 bits if PAE is supported.
        36
    } else {
        32
    };

    let virt = if bit32(features.ecx, 5) {
        Virtualization::Vmx(discover_vmx(src))
    } else if bit32(extended_features.ecx, 2) {
        let svm_leaf = if has_extended(leaf::SVM) {
            src.cpuid(leaf::SVM, 0)
        } else {
            CpuidResult::default()
        };
        Virtualization::Svm(discover_svm(src, svm_leaf))
    } else {
        Virtualization::None
    };

    Capabilities {
        vendor,
        brand,
        family,
        model,
        stepping,
        x2apic: bit32(features.ecx, 21),
        tsc_invariant,
        phys_addr_bits,
        virt,
    }
}

/// Family, model and stepping from CPUID 1 EAX.
///
/// Both vendors add the extended family only when the base family is 0xF. Intel also includes
/// the extended model for base family 6; AMD only for 0xF (APM vol. 3, CPUID Fn0000_0001_EAX).
/// Other vendors (Zhaoxin, VIA) follow Intel's rule, Hygon reports family 0x18 and so gets AMD's
/// result either way.
fn decode_signature(eax: u32, vendor: &Vendor) -> (u16, u8, u8) {
    let stepping = (eax & 0xF) as u8;
    let base_model = ((eax >> 4) & 0xF) as u8;
    let base_family = ((eax >> 8) & 0xF) as u16;
    let extended_model = ((eax >> 16) & 0xF) as u8;
    let extended_family = ((eax >> 20) & 0xFF) as u16;

    let family = if base_family == 0xF {
        base_family + extended_family
    } else {
        base_family
    };
    let uses_extended_model = base_family == 0xF || (base_family == 6 && *vendor != Vendor::Amd);
    let model = if uses_extended_model {
        (extended_model << 4) | base_model
    } else {
        base_model
    };
    (family, model, stepping)
}

/// The brand string from leaves 8000_0002h..8000_0004h: 48 bytes of ASCII, NUL-terminated when
/// shorter, and right-aligned with leading spaces on some Intel CPUs.
fn brand_string(src: &impl CpuInfoSource) -> String {
    // Each leaf holds 16 characters in EAX, EBX, ECX, EDX, little-endian within each register.
    let characters = leaf::BRAND
        .into_iter()
        .flat_map(|brand_leaf| {
            let regs = src.cpuid(brand_leaf, 0);
            [regs.eax, regs.ebx, regs.ecx, regs.edx]
        })
        .flat_map(u32::to_le_bytes);
    let mut bytes = [0u8; 48];
    for (slot, character) in bytes.iter_mut().zip(characters) {
        *slot = character;
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text: String = bytes[..end].iter().map(|&b| printable(b)).collect();
    String::from(text.trim_matches(' '))
}

/// SVM details; the caller checked CPUID 8000_0001h ECX[SVM], which makes `VM_CR` exist.
fn discover_svm(src: &impl CpuInfoSource, svm_leaf: CpuidResult) -> SvmCaps {
    let vm_cr = src.read_msr(msr::VM_CR);
    let features = svm_leaf.edx;
    SvmCaps {
        disabled_by_firmware: bit(vm_cr, 4),
        revision: svm_leaf.eax as u8,
        num_asids: svm_leaf.ebx,
        nested_paging: bit32(features, 0),
        lbr_virtualization: bit32(features, 1),
        svm_lock: bit32(features, 2),
        nrip_save: bit32(features, 3),
        tsc_rate_msr: bit32(features, 4),
        vmcb_clean_bits: bit32(features, 5),
        flush_by_asid: bit32(features, 6),
        decode_assists: bit32(features, 7),
        pause_filter: bit32(features, 10),
        pause_filter_threshold: bit32(features, 12),
        avic: bit32(features, 13),
        vmsave_vmload_virtualization: bit32(features, 15),
        virtual_gif: bit32(features, 16),
    }
}

/// The allowed-1 settings of a VMX control capability MSR: a control may be 1 only if its bit is
/// set in the high half (SDM vol. 3C, A.3).
fn allowed_1(capability_msr: u64) -> u32 {
    (capability_msr >> 32) as u32
}

/// VMX details; the caller checked CPUID 1 ECX[VMX], which makes the basic VMX MSRs exist.
fn discover_vmx(src: &impl CpuInfoSource) -> VmxCaps {
    let feature_control = src.read_msr(msr::IA32_FEATURE_CONTROL);
    let locked = bit(feature_control, 0);
    let vmx_outside_smx = bit(feature_control, 2);

    let basic = src.read_msr(msr::IA32_VMX_BASIC);
    let true_controls = bit(basic, 55);
    let procbased_msr = if true_controls {
        msr::IA32_VMX_TRUE_PROCBASED_CTLS
    } else {
        msr::IA32_VMX_PROCBASED_CTLS
    };
    let secondary_controls = bit32(allowed_1(src.read_msr(procbased_msr)), 31);

    let mut caps = VmxCaps {
        disabled_by_firmware: locked && !vmx_outside_smx,
        vmcs_revision_id: (basic & 0x7FFF_FFFF) as u32,
        vmcs_region_size: ((basic >> 32) & 0x1FFF) as u16,
        true_controls,
        secondary_controls,
        ..VmxCaps::default()
    };
    if !secondary_controls {
        return caps;
    }

    let secondary = allowed_1(src.read_msr(msr::IA32_VMX_PROCBASED_CTLS2));
    caps.ept = bit32(secondary, 1);
    caps.vpid = bit32(secondary, 5);
    caps.unrestricted_guest = bit32(secondary, 7);
    caps.pml = bit32(secondary, 17);
    if !(caps.ept || caps.vpid) {
        return caps;
    }

    let ept_vpid = src.read_msr(msr::IA32_VMX_EPT_VPID_CAP);
    caps.ept_vpid = EptVpidCaps {
        page_walk_length_4: bit(ept_vpid, 6),
        write_back_memory_type: bit(ept_vpid, 14),
        pages_2mib: bit(ept_vpid, 16),
        invept: bit(ept_vpid, 20),
        accessed_dirty_flags: bit(ept_vpid, 21),
        invept_single_context: bit(ept_vpid, 25),
        invept_all_context: bit(ept_vpid, 26),
        invvpid: bit(ept_vpid, 32),
    };
    caps
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// One console line, `virtualization: ...`. End-to-end tests look for `AMD-V (SVM)` with
/// `NPT yes` and for `Intel VT-x (VMX)` with `EPT yes`: keep that wording.
impl fmt::Display for Virtualization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Virtualization::Svm(svm) => {
                write!(
                    f,
                    "virtualization: AMD-V (SVM) rev {}, {} ASIDs, NPT {}, NRIPS {}, \
                     flush-by-ASID {}, decode assists {}",
                    svm.revision,
                    svm.num_asids,
                    yes_no(svm.nested_paging),
                    yes_no(svm.nrip_save),
                    yes_no(svm.flush_by_asid),
                    yes_no(svm.decode_assists),
                )?;
                if svm.disabled_by_firmware {
                    f.write_str(", disabled by firmware")?;
                }
                Ok(())
            }
            Virtualization::Vmx(vmx) => {
                write!(
                    f,
                    "virtualization: Intel VT-x (VMX) EPT {}, EPT A/D {}, unrestricted guest {}, \
                     VPID {}, PML {}",
                    yes_no(vmx.ept),
                    yes_no(vmx.ept_accessed_dirty()),
                    yes_no(vmx.unrestricted_guest),
                    yes_no(vmx.vpid),
                    yes_no(vmx.pml),
                )?;
                if vmx.disabled_by_firmware {
                    f.write_str(", disabled by firmware")?;
                }
                Ok(())
            }
            Virtualization::None => f.write_str("virtualization: none"),
        }
    }
}

/// Three console lines separated by `\n` (no trailing newline):
///
/// ```text
/// cpu: AuthenticAMD family 0x17 model 0x1 stepping 2 "AMD EPYC Processor"
/// cpu features: x2APIC no, invariant TSC no, physical address bits 40
/// virtualization: AMD-V (SVM) rev 1, 16 ASIDs, NPT yes, NRIPS no, flush-by-ASID no, decode assists no
/// ```
impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu: {} family {:#x} model {:#x} stepping {}",
            self.vendor, self.family, self.model, self.stepping
        )?;
        if !self.brand.is_empty() {
            write!(f, " \"{}\"", self.brand)?;
        }
        writeln!(
            f,
            "\ncpu features: x2APIC {}, invariant TSC {}, physical address bits {}",
            yes_no(self.x2apic),
            yes_no(self.tsc_invariant),
            self.phys_addr_bits
        )?;
        write!(f, "{}", self.virt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;
    use core::cell::RefCell;
    use std::collections::BTreeMap;

    /// A CPU made of recorded CPUID leaves and MSR values. Reading a leaf or an MSR it does not
    /// have panics: that is how the tests prove `discover` never reads an MSR that would #GP, or a
    /// leaf above the reported maximum.
    #[derive(Default)]
    struct FakeCpu {
        leaves: BTreeMap<u32, CpuidResult>,
        msrs: BTreeMap<u32, u64>,
        msr_reads: RefCell<Vec<u32>>,
    }

    impl FakeCpu {
        fn leaf(mut self, leaf: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> Self {
            self.leaves.insert(leaf, CpuidResult { eax, ebx, ecx, edx });
            self
        }

        fn without_leaf(mut self, leaf: u32) -> Self {
            self.leaves.remove(&leaf);
            self
        }

        /// Leaf 0: the maximum basic leaf and the vendor string (in EBX, EDX, ECX order).
        fn vendor(self, max_basic_leaf: u32, id: &[u8; 12]) -> Self {
            let word = |i: usize| u32::from_le_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
            self.leaf(0, max_basic_leaf, word(0), word(8), word(4))
        }

        /// Leaves 8000_0002h..8000_0004h holding `brand`, NUL-padded to 48 bytes.
        fn brand(mut self, brand: &[u8]) -> Self {
            let mut bytes = [0u8; 48];
            bytes[..brand.len()].copy_from_slice(brand);
            let word =
                |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
            for (n, brand_leaf) in leaf::BRAND.into_iter().enumerate() {
                let base = n * 16;
                self = self.leaf(
                    brand_leaf,
                    word(base),
                    word(base + 4),
                    word(base + 8),
                    word(base + 12),
                );
            }
            self
        }

        fn msr(mut self, msr: u32, value: u64) -> Self {
            self.msrs.insert(msr, value);
            self
        }

        fn without_msr(mut self, msr: u32) -> Self {
            self.msrs.remove(&msr);
            self
        }

        fn msr_reads(&self) -> Vec<u32> {
            self.msr_reads.borrow().clone()
        }
    }

    impl CpuInfoSource for FakeCpu {
        fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
            assert_eq!(subleaf, 0, "no leaf read here has subleaves");
            *self
                .leaves
                .get(&leaf)
                .unwrap_or_else(|| panic!("CPUID leaf {leaf:#x} read but not reported"))
        }

        fn read_msr(&self, msr: u32) -> u64 {
            self.msr_reads.borrow_mut().push(msr);
            *self
                .msrs
                .get(&msr)
                .unwrap_or_else(|| panic!("RDMSR {msr:#x} would #GP on this CPU"))
        }
    }

    /// CPUID 1 ECX bits of a QEMU `-cpu EPYC` guest under TCG: SSE3, PCLMULQDQ, SSSE3, FMA, CX16,
    /// SSE4.1, SSE4.2, MOVBE, POPCNT, AES, XSAVE, AVX, F16C, RDRAND, hypervisor. No x2APIC, no VMX.
    const EPYC_LEAF1_ECX: u32 = (1 << 0)
        | (1 << 1)
        | (1 << 9)
        | (1 << 12)
        | (1 << 13)
        | (1 << 19)
        | (1 << 20)
        | (1 << 22)
        | (1 << 23)
        | (1 << 25)
        | (1 << 26)
        | (1 << 28)
        | (1 << 29)
        | (1 << 30)
        | (1 << 31);

    /// QEMU `-cpu EPYC` under TCG: family 0x17 model 1 stepping 2, SVM revision 1 with 16 ASIDs,
    /// and of the SVM features only NPT (TCG drops the model's NRIPS).
    fn qemu_epyc() -> FakeCpu {
        FakeCpu::default()
            .vendor(0xD, b"AuthenticAMD")
            .leaf(1, 0x0080_0F12, 0x0000_0800, EPYC_LEAF1_ECX, 0x078B_FBFF)
            .leaf(
                0x8000_0000,
                0x8000_001E,
                0x6874_7541,
                0x444D_4163,
                0x6974_6E65,
            )
            .leaf(0x8000_0001, 0x0080_0F12, 0, 0x0000_0375, 0x2FD3_FBFF)
            .brand(b"AMD EPYC Processor")
            .leaf(0x8000_0007, 0, 0, 0, 0)
            .leaf(0x8000_0008, 0x0000_3028, 0, 0, 0)
            .leaf(0x8000_000A, 1, 16, 0, 0x0000_0001)
            .msr(msr::VM_CR, 0)
    }

    /// A bare-metal Skylake client (Core i7-6700): family 6 model 0x5E stepping 3, VMX enabled
    /// and locked by firmware, EPT with A/D, VPID, unrestricted guest, PML.
    fn skylake() -> FakeCpu {
        FakeCpu::default()
            .vendor(0x16, b"GenuineIntel")
            .leaf(1, 0x0005_06E3, 0x0010_0800, 0x7FFA_FBBF, 0xBFEB_FBFF)
            .leaf(0x8000_0000, 0x8000_0008, 0, 0, 0)
            .leaf(0x8000_0001, 0, 0, 0x0000_0121, 0x2C10_0800)
            .brand(b"Intel(R) Core(TM) i7-6700 CPU @ 3.40GHz")
            .leaf(0x8000_0007, 0, 0, 0, 0x0000_0100)
            .leaf(0x8000_0008, 0x0000_3027, 0, 0, 0)
            .msr(msr::IA32_FEATURE_CONTROL, 0x5)
            .msr(msr::IA32_VMX_BASIC, 0x00DA_0400_0000_0004)
            .msr(msr::IA32_VMX_TRUE_PROCBASED_CTLS, 0xFFF9_FFFE_0400_6172)
            .msr(msr::IA32_VMX_PROCBASED_CTLS2, 0x001F_FCFF_0000_0000)
            .msr(msr::IA32_VMX_EPT_VPID_CAP, 0x0000_0F01_0673_4141)
    }

    fn vmx_caps(caps: &Capabilities) -> VmxCaps {
        match caps.virt {
            Virtualization::Vmx(vmx) => vmx,
            other => panic!("expected VMX, got {other:?}"),
        }
    }

    fn svm_caps(caps: &Capabilities) -> SvmCaps {
        match caps.virt {
            Virtualization::Svm(svm) => svm,
            other => panic!("expected SVM, got {other:?}"),
        }
    }

    #[test]
    fn qemu_epyc_identity_and_svm() {
        let cpu = qemu_epyc();
        let caps = discover(&cpu);
        assert_eq!(caps.vendor, Vendor::Amd);
        assert_eq!(caps.brand, "AMD EPYC Processor");
        assert_eq!((caps.family, caps.model, caps.stepping), (0x17, 0x1, 2));
        assert!(!caps.x2apic);
        assert!(!caps.tsc_invariant);
        assert_eq!(caps.phys_addr_bits, 40);
        assert_eq!(
            svm_caps(&caps),
            SvmCaps {
                revision: 1,
                num_asids: 16,
                nested_paging: true,
                ..SvmCaps::default()
            }
        );
        assert_eq!(cpu.msr_reads(), [msr::VM_CR]);
    }

    #[test]
    fn qemu_epyc_console_lines() {
        let text = discover(&qemu_epyc()).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "cpu: AuthenticAMD family 0x17 model 0x1 stepping 2 \"AMD EPYC Processor\"",
                "cpu features: x2APIC no, invariant TSC no, physical address bits 40",
                "virtualization: AMD-V (SVM) rev 1, 16 ASIDs, NPT yes, NRIPS no, \
                 flush-by-ASID no, decode assists no",
            ]
        );
    }

    #[test]
    fn svm_feature_bits() {
        // Every named bit set, plus undefined bits that must not leak into any field.
        let features = 0b1_1011_0100_1111_1111 | (1 << 31);
        let cpu = qemu_epyc().leaf(0x8000_000A, 0x0000_0001, 0x8000, 0, features);
        let svm = svm_caps(&discover(&cpu));
        assert_eq!(
            svm,
            SvmCaps {
                disabled_by_firmware: false,
                revision: 1,
                num_asids: 0x8000,
                nested_paging: true,
                lbr_virtualization: true,
                svm_lock: true,
                nrip_save: true,
                tsc_rate_msr: true,
                vmcb_clean_bits: true,
                flush_by_asid: true,
                decode_assists: true,
                pause_filter: true,
                pause_filter_threshold: true,
                avic: true,
                vmsave_vmload_virtualization: true,
                virtual_gif: true,
            }
        );
        let nrips_only = qemu_epyc().leaf(0x8000_000A, 1, 16, 0, 1 << 3);
        let svm = svm_caps(&discover(&nrips_only));
        assert!(svm.nrip_save && !svm.nested_paging && !svm.decode_assists);
    }

    #[test]
    fn svm_disabled_by_firmware() {
        // VM_CR: SVMDIS (bit 4) and LOCK (bit 3), as a BIOS that turned AMD-V off leaves it.
        let caps = discover(&qemu_epyc().msr(msr::VM_CR, 0x18));
        assert!(svm_caps(&caps).disabled_by_firmware);
        assert!(caps
            .virt
            .to_string()
            .ends_with("decode assists no, disabled by firmware"));
    }

    #[test]
    fn skylake_identity_and_vmx() {
        let cpu = skylake();
        let caps = discover(&cpu);
        assert_eq!(caps.vendor, Vendor::Intel);
        assert_eq!(caps.brand, "Intel(R) Core(TM) i7-6700 CPU @ 3.40GHz");
        assert_eq!((caps.family, caps.model, caps.stepping), (6, 0x5E, 3));
        assert!(caps.x2apic);
        assert!(caps.tsc_invariant);
        assert_eq!(caps.phys_addr_bits, 39);
        assert_eq!(
            vmx_caps(&caps),
            VmxCaps {
                disabled_by_firmware: false,
                vmcs_revision_id: 4,
                vmcs_region_size: 0x400,
                true_controls: true,
                secondary_controls: true,
                ept: true,
                vpid: true,
                unrestricted_guest: true,
                pml: true,
                ept_vpid: EptVpidCaps {
                    page_walk_length_4: true,
                    write_back_memory_type: true,
                    pages_2mib: true,
                    invept: true,
                    accessed_dirty_flags: true,
                    invept_single_context: true,
                    invept_all_context: true,
                    invvpid: true,
                },
            }
        );
        assert_eq!(
            cpu.msr_reads(),
            [
                msr::IA32_FEATURE_CONTROL,
                msr::IA32_VMX_BASIC,
                msr::IA32_VMX_TRUE_PROCBASED_CTLS,
                msr::IA32_VMX_PROCBASED_CTLS2,
                msr::IA32_VMX_EPT_VPID_CAP,
            ]
        );
    }

    #[test]
    fn skylake_console_lines() {
        let text = discover(&skylake()).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "cpu: GenuineIntel family 0x6 model 0x5e stepping 3 \
                 \"Intel(R) Core(TM) i7-6700 CPU @ 3.40GHz\"",
                "cpu features: x2APIC yes, invariant TSC yes, physical address bits 39",
                "virtualization: Intel VT-x (VMX) EPT yes, EPT A/D yes, unrestricted guest yes, \
                 VPID yes, PML yes",
            ]
        );
    }

    #[test]
    fn vmx_without_pml() {
        // Secondary allowed-1: EPT, VPID, unrestricted guest; no PML.
        let cpu = skylake().msr(msr::IA32_VMX_PROCBASED_CTLS2, 0x0000_00A2_0000_0000);
        let caps = discover(&cpu);
        assert!(!vmx_caps(&caps).pml);
        assert_eq!(
            caps.virt.to_string(),
            "virtualization: Intel VT-x (VMX) EPT yes, EPT A/D yes, unrestricted guest yes, \
             VPID yes, PML no"
        );
    }

    #[test]
    fn ept_without_accessed_dirty_flags() {
        // IA32_VMX_EPT_VPID_CAP with bit 21 clear, as on CPUs before Haswell.
        let cpu = skylake().msr(msr::IA32_VMX_EPT_VPID_CAP, 0x0000_0F01_0611_4141);
        let caps = discover(&cpu);
        let vmx = vmx_caps(&caps);
        assert!(vmx.ept && !vmx.ept_vpid.accessed_dirty_flags && !vmx.ept_accessed_dirty());
        assert!(vmx.ept_vpid.invept && vmx.ept_vpid.pages_2mib);
        assert!(caps.virt.to_string().contains("EPT yes, EPT A/D no,"));
    }

    #[test]
    fn vmx_locked_off_by_firmware() {
        // Locked, "VMX outside SMX" clear: VMXON would #GP.
        let caps = discover(&skylake().msr(msr::IA32_FEATURE_CONTROL, 0x1));
        let vmx = vmx_caps(&caps);
        assert!(vmx.disabled_by_firmware);
        assert!(vmx.ept, "capabilities are still reported");
        assert!(caps
            .virt
            .to_string()
            .ends_with("PML yes, disabled by firmware"));
    }

    #[test]
    fn vmx_unlocked_is_not_disabled() {
        // Not locked: the kernel may set bit 2 and lock it itself.
        let caps = discover(&skylake().msr(msr::IA32_FEATURE_CONTROL, 0x0));
        assert!(!vmx_caps(&caps).disabled_by_firmware);
    }

    #[test]
    fn vmx_without_true_controls_reads_the_plain_procbased_msr() {
        let cpu = skylake()
            .msr(msr::IA32_VMX_BASIC, 0x0058_1000_0000_000D)
            .without_msr(msr::IA32_VMX_TRUE_PROCBASED_CTLS)
            .msr(msr::IA32_VMX_PROCBASED_CTLS, 0xFFF9_FFFE_0401_E172);
        let vmx = vmx_caps(&discover(&cpu));
        assert!(!vmx.true_controls);
        assert_eq!(vmx.vmcs_revision_id, 0xD);
        assert_eq!(vmx.vmcs_region_size, 0x1000);
        assert!(vmx.ept);
        assert_eq!(cpu.msr_reads()[2], msr::IA32_VMX_PROCBASED_CTLS);
    }

    #[test]
    fn vmx_without_secondary_controls_never_reads_their_msrs() {
        // Allowed-1 bit 31 clear; the fake has neither secondary nor EPT/VPID MSR and would panic.
        let cpu = skylake()
            .msr(msr::IA32_VMX_TRUE_PROCBASED_CTLS, 0x7FF9_FFFE_0400_6172)
            .without_msr(msr::IA32_VMX_PROCBASED_CTLS2)
            .without_msr(msr::IA32_VMX_EPT_VPID_CAP);
        let caps = discover(&cpu);
        assert_eq!(
            vmx_caps(&caps),
            VmxCaps {
                vmcs_revision_id: 4,
                vmcs_region_size: 0x400,
                true_controls: true,
                ..VmxCaps::default()
            }
        );
        assert_eq!(cpu.msr_reads().len(), 3);
        assert_eq!(
            caps.virt.to_string(),
            "virtualization: Intel VT-x (VMX) EPT no, EPT A/D no, unrestricted guest no, \
             VPID no, PML no"
        );
    }

    #[test]
    fn vmx_secondary_without_ept_or_vpid_never_reads_ept_vpid_cap() {
        // Secondary controls allow only "virtualize APIC accesses" (bit 0) and RDTSCP (bit 3).
        let cpu = skylake()
            .msr(msr::IA32_VMX_PROCBASED_CTLS2, 0x0000_0009_0000_0000)
            .without_msr(msr::IA32_VMX_EPT_VPID_CAP);
        let vmx = vmx_caps(&discover(&cpu));
        assert!(vmx.secondary_controls);
        assert!(!vmx.ept && !vmx.vpid && !vmx.unrestricted_guest && !vmx.pml);
        assert_eq!(vmx.ept_vpid, EptVpidCaps::default());
        assert_eq!(cpu.msr_reads().len(), 4);
    }

    #[test]
    fn vpid_alone_reads_ept_vpid_cap() {
        let cpu = skylake()
            .msr(msr::IA32_VMX_PROCBASED_CTLS2, 0x0000_0020_0000_0000)
            .msr(msr::IA32_VMX_EPT_VPID_CAP, 1 << 32);
        let vmx = vmx_caps(&discover(&cpu));
        assert!(vmx.vpid && !vmx.ept && vmx.ept_vpid.invvpid);
        assert_eq!(cpu.msr_reads().len(), 5);
    }

    #[test]
    fn no_virtualization_reads_no_msr() {
        // An Intel guest whose hypervisor hides VMX: CPUID 1 ECX[5] clear, no MSRs at all.
        let cpu = FakeCpu {
            msrs: BTreeMap::new(),
            ..skylake()
        }
        .leaf(
            1,
            0x0005_06E3,
            0x0010_0800,
            0x7FFA_FBBF & !(1 << 5),
            0xBFEB_FBFF,
        );
        let caps = discover(&cpu);
        assert_eq!(caps.virt, Virtualization::None);
        assert!(cpu.msr_reads().is_empty());
        assert_eq!(
            caps.to_string().lines().last(),
            Some("virtualization: none")
        );
    }

    #[test]
    fn amd_without_svm_reads_no_msr() {
        let cpu = qemu_epyc()
            .leaf(
                0x8000_0001,
                0x0080_0F12,
                0,
                0x0000_0375 & !(1 << 2),
                0x2FD3_FBFF,
            )
            .without_leaf(0x8000_000A)
            .without_msr(msr::VM_CR);
        assert_eq!(discover(&cpu).virt, Virtualization::None);
        assert!(cpu.msr_reads().is_empty());
    }

    #[test]
    fn brand_with_leading_spaces_and_nul_padding() {
        // Older Intel CPUs right-align the brand string with spaces.
        let cpu = skylake().brand(b"       Intel(R) Xeon(R) CPU  E5345  @ 2.33GHz");
        assert_eq!(
            discover(&cpu).brand,
            "Intel(R) Xeon(R) CPU  E5345  @ 2.33GHz"
        );
    }

    #[test]
    fn brand_ends_at_the_first_nul_and_hides_control_bytes() {
        let cpu = skylake().brand(b"Fake\x07CPU  \0garbage after the terminator");
        assert_eq!(discover(&cpu).brand, "Fake?CPU");
        let all_nul = skylake().brand(b"");
        assert_eq!(discover(&all_nul).brand, "");
    }

    #[test]
    fn brand_of_48_bytes_without_terminator() {
        let full = [b'x'; 48];
        let caps = discover(&skylake().brand(&full));
        assert_eq!(caps.brand.len(), 48);
    }

    #[test]
    fn extended_leaves_are_read_only_up_to_the_reported_maximum() {
        // Only 8000_0001h exists: no brand, no invariant TSC, address width from PAE.
        let cpu = skylake()
            .leaf(0x8000_0000, 0x8000_0001, 0, 0, 0)
            .without_leaf(0x8000_0002)
            .without_leaf(0x8000_0003)
            .without_leaf(0x8000_0004)
            .without_leaf(0x8000_0007)
            .without_leaf(0x8000_0008);
        let caps = discover(&cpu);
        assert_eq!(caps.brand, "");
        assert!(!caps.tsc_invariant);
        assert_eq!(caps.phys_addr_bits, 36);
        assert_eq!(
            caps.to_string().lines().next(),
            Some("cpu: GenuineIntel family 0x6 model 0x5e stepping 3")
        );
    }

    #[test]
    fn garbage_extended_maximum_means_no_extended_leaves() {
        // Leaf 8000_0000h answering with basic-leaf data, and a CPU without PAE.
        let mut cpu = skylake().leaf(0x8000_0000, 0x0000_0016, 0, 0, 0).leaf(
            1,
            0x0005_06E3,
            0x0010_0800,
            0x7FFA_FBBF,
            0xBFEB_FBFF & !(1 << 6),
        );
        for leaf in [
            0x8000_0001,
            0x8000_0002,
            0x8000_0003,
            0x8000_0004,
            0x8000_0007,
            0x8000_0008,
        ] {
            cpu = cpu.without_leaf(leaf);
        }
        let caps = discover(&cpu);
        assert_eq!(caps.phys_addr_bits, 32);
        assert!(matches!(caps.virt, Virtualization::Vmx(_)));
    }

    #[test]
    fn svm_bit_without_svm_leaf_still_reads_vm_cr_only() {
        let cpu = qemu_epyc()
            .leaf(0x8000_0000, 0x8000_0008, 0, 0, 0)
            .without_leaf(0x8000_000A);
        let svm = svm_caps(&discover(&cpu));
        assert_eq!(svm, SvmCaps::default());
        assert_eq!(cpu.msr_reads(), [msr::VM_CR]);
    }

    #[test]
    fn max_basic_leaf_zero_skips_leaf_one() {
        let cpu = skylake().vendor(0, b"GenuineIntel").without_leaf(1);
        let caps = discover(&cpu);
        assert_eq!((caps.family, caps.model, caps.stepping), (0, 0, 0));
        assert_eq!(caps.virt, Virtualization::None);
    }

    #[test]
    fn family_and_model_rules() {
        let signature = |eax, vendor| decode_signature(eax, &vendor);
        // AMD EPYC 7003 (Milan): base family 0xF + extended 0xA, extended model 0.
        assert_eq!(signature(0x00A0_0F11, Vendor::Amd), (0x19, 0x01, 1));
        // AMD Zen 2 (Rome): family 0x17 model 0x31.
        assert_eq!(signature(0x0083_0F10, Vendor::Amd), (0x17, 0x31, 0));
        // AMD base family 6 (K7): the extended model field is reserved and ignored.
        assert_eq!(signature(0x0001_0662, Vendor::Amd), (6, 0x6, 2));
        // Intel family 6 uses the extended model.
        assert_eq!(signature(0x0005_06E3, Vendor::Intel), (6, 0x5E, 3));
        assert_eq!(signature(0x0001_0662, Vendor::Intel), (6, 0x16, 2));
        // Intel Pentium 4: base family 0xF, extended family 0.
        assert_eq!(signature(0x0000_0F43, Vendor::Intel), (0xF, 0x4, 3));
        // Intel family 5 ignores both extended fields.
        assert_eq!(signature(0x0FF0_0543, Vendor::Intel), (5, 0x4, 3));
    }

    #[test]
    fn other_vendor_is_kept_and_printed_safely() {
        let cpu = qemu_epyc().vendor(0xD, b"HygonGenuine");
        let caps = discover(&cpu);
        assert_eq!(caps.vendor, Vendor::Other(*b"HygonGenuine"));
        assert_eq!(caps.vendor.to_string(), "HygonGenuine");
        assert_eq!(
            Vendor::Other(*b"Odd\0\x01vendor!").to_string(),
            "Odd??vendor!"
        );
        assert_eq!(Vendor::from_id(*b"GenuineIntel"), Vendor::Intel);
        assert_eq!(Vendor::Amd.id(), *b"AuthenticAMD");
    }
}
