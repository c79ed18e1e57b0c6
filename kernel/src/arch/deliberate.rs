//! Deliberate faults for the console's hidden `debug fault` command: end-to-end tests trigger
//! them to prove that exceptions are reported with the right vector, error code, RIP and CR2.
//! Each fault site is a labelled instruction so the caller can print where it will fault.

use core::arch::global_asm;

global_asm!(
    r#"
.section .text.deliberate, "ax"
.global deliberate_ud_site
deliberate_ud_site:
    ud2
    ret
.global deliberate_bp_site
deliberate_bp_site:
    int3
.global deliberate_bp_resume
deliberate_bp_resume:
    ret
.global deliberate_de
deliberate_de:
    xor edx, edx
    xor ecx, ecx
    mov eax, 1
.global deliberate_de_site
deliberate_de_site:
    div ecx
    ret
.text
"#
);

extern "C" {
    fn deliberate_ud_site();
    fn deliberate_bp_site();
    fn deliberate_bp_resume();
    fn deliberate_de();
    fn deliberate_de_site();
}

/// A fault the console can cause on purpose.
#[derive(Debug, Clone, Copy)]
pub enum FaultKind {
    /// Invalid opcode (UD2).
    InvalidOpcode,
    /// Divide by zero.
    DivideError,
    /// INT3: reported, then execution continues.
    Breakpoint,
    /// A read of the given unmapped, canonical address.
    PageFault(u64),
    /// A read of a non-canonical address.
    GeneralProtection,
}

impl FaultKind {
    /// Where the fault will be raised: RIP for instruction faults, CR2 for a page fault; the
    /// breakpoint reports the address after INT3, where it resumes.
    pub fn expected_address(self) -> u64 {
        match self {
            FaultKind::InvalidOpcode => deliberate_ud_site as *const () as u64,
            FaultKind::DivideError => deliberate_de_site as *const () as u64,
            FaultKind::Breakpoint => deliberate_bp_resume as *const () as u64,
            FaultKind::PageFault(addr) => addr,
            FaultKind::GeneralProtection => NON_CANONICAL,
        }
    }

    /// Raises the fault. Only the breakpoint returns.
    pub fn raise(self) {
        // SAFETY: each site is a complete function following the C ABI (the faulting
        // instruction then RET); the reads target addresses that are unmapped or
        // non-canonical, so they fault instead of reading anything. Faulting is the purpose.
        unsafe {
            match self {
                FaultKind::InvalidOpcode => deliberate_ud_site(),
                FaultKind::DivideError => deliberate_de(),
                FaultKind::Breakpoint => deliberate_bp_site(),
                FaultKind::PageFault(addr) => {
                    core::ptr::read_volatile(addr as *const u64);
                }
                FaultKind::GeneralProtection => {
                    core::ptr::read_volatile(NON_CANONICAL as *const u64);
                }
            }
        }
    }
}

impl core::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FaultKind::InvalidOpcode => write!(f, "invalid opcode (ud2)"),
            FaultKind::DivideError => write!(f, "divide error (div by 0)"),
            FaultKind::Breakpoint => write!(f, "breakpoint (int3)"),
            FaultKind::PageFault(addr) => write!(f, "page fault (read of unmapped {addr:#x})"),
            FaultKind::GeneralProtection => {
                write!(
                    f,
                    "general protection (read of non-canonical {NON_CANONICAL:#x})"
                )
            }
        }
    }
}

const NON_CANONICAL: u64 = 0xDEAD_BEEF_0000_0000;
