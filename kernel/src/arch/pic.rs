//! The legacy 8259 PIC pair: remapped away from the exception vectors, then fully masked. The
//! local APIC is the interrupt controller this kernel uses.

use x86_64::instructions::port::Port;

/// Remaps IRQ 0-15 to vectors 0x20-0x2F (so a stray one cannot pose as an exception) and masks
/// every line.
pub fn disable() {
    let mut cmd1 = Port::<u8>::new(0x20);
    let mut data1 = Port::<u8>::new(0x21);
    let mut cmd2 = Port::<u8>::new(0xA0);
    let mut data2 = Port::<u8>::new(0xA1);
    // SAFETY: the standard ICW1-ICW4 initialisation sequence of the two 8259s, at their
    // architectural ports, followed by masking all lines.
    unsafe {
        cmd1.write(0x11);
        cmd2.write(0x11);
        data1.write(0x20);
        data2.write(0x28);
        data1.write(0x04);
        data2.write(0x02);
        data1.write(0x01);
        data2.write(0x01);
        data1.write(0xFF);
        data2.write(0xFF);
    }
}
