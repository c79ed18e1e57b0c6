//! The IDT: all 256 vectors enter through one assembly stub each, which saves the general
//! registers into a [`TrapFrame`] and calls [`crate::trap::dispatch`]. One path for every
//! vector means an unexpected interrupt is reported like any exception instead of vanishing.

use core::arch::global_asm;
use core::mem::size_of;

use spin::Once;
use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::gdt;

/// Registers saved on entry, in the order the stub pushes them (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors that push none.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// Vectors for which the CPU pushes an error code: #DF 8, #TS 10, #NP 11, #SS 12, #GP 13,
// #PF 14, #AC 17, #CP 21, #VC 29, #SX 30. The others get a 0 so the frame has one shape.
global_asm!(
    r#"
.altmacro
.macro trap_stub n
    .align 16
trap_stub_\n:
    .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
        push 0
    .endif
    push \n
    jmp trap_common
.endm

.macro trap_stub_address n
    .long trap_stub_\n - trap_stub_table
.endm

.section .text.trap_stubs, "ax"
trap_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call {dispatch}
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

.set vec, 0
.rept 256
    trap_stub %vec
    .set vec, vec + 1
.endr

.section .rodata.trap_stubs, "a"
.align 4
.global trap_stub_table
trap_stub_table:
.set vec, 0
.rept 256
    trap_stub_address %vec
    .set vec, vec + 1
.endr
.noaltmacro
.text
"#,
    dispatch = sym crate::trap::dispatch,
);

// Offsets from the table itself: a position-independent kernel cannot hold absolute addresses
// in read-only data.
extern "C" {
    static trap_stub_table: [i32; 256];
}

/// One 16-byte interrupt gate.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    /// A present, ring-0, 64-bit interrupt gate (interrupts stay disabled in the handler).
    fn interrupt(handler: u64, selector: u16, ist: u8) -> Self {
        Gate {
            offset_low: handler as u16,
            selector,
            ist,
            type_attr: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

/// Builds and loads the IDT. Needs the GDT (for the code selector and the IST slots).
pub fn init() {
    let selector = gdt::kernel_code_selector();
    let idt = IDT.call_once(|| {
        let table = &raw const trap_stub_table;
        // SAFETY: trap_stub_table is the immutable table of 256 offsets emitted above.
        let offsets = unsafe { &*table };
        let base = table as u64;
        let mut gates = [Gate::default(); 256];
        for (vector, gate) in gates.iter_mut().enumerate() {
            let ist = match vector {
                2 => gdt::IST_NMI,
                8 => gdt::IST_DOUBLE_FAULT,
                18 => gdt::IST_MACHINE_CHECK,
                _ => 0,
            };
            let stub = base.wrapping_add_signed(i64::from(offsets[vector]));
            *gate = Gate::interrupt(stub, selector, ist);
        }
        Idt(gates)
    });
    let pointer = DescriptorTablePointer {
        limit: (size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt),
    };
    // SAFETY: the IDT lives in a static for the rest of the kernel's life and every gate
    // points at a stub above.
    unsafe { lidt(&pointer) };
}
