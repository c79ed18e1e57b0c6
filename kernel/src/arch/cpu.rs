//! The running CPU as a source of CPUID leaves and MSRs for `vmx::caps` discovery.

use core::arch::x86_64::__cpuid_count;

use vmx::caps::{CpuInfoSource, CpuidResult};
use x86_64::registers::model_specific::Msr;

/// The CPU this code runs on.
pub struct HostCpu;

impl CpuInfoSource for HostCpu {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86_64 CPU and only reads identification data.
        let r = unsafe { __cpuid_count(leaf, subleaf) };
        CpuidResult {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        }
    }

    fn read_msr(&self, msr: u32) -> u64 {
        // SAFETY: `vmx::caps::discover` only asks for MSRs whose existence CPUID has already
        // confirmed, so RDMSR cannot fault.
        unsafe { Msr::new(msr).read() }
    }
}
