//! Decoding the guest instruction behind a VM exit.
//!
//! On AMD SVM the CPU reports the address of the next instruction (`nRIP` in the VMCB) only with
//! the NRIPS feature (CPUID Fn8000_000A_EDX\[3\]; APM vol. 2 15.7.1 "State Saved on Exit"). QEMU's
//! TCG lacks it, so to skip an intercepted HLT, CPUID, RDMSR, WRMSR, VMMCALL, IN or OUT the
//! hypervisor reads the bytes at the guest's CS:RIP and decodes them. [`instruction_at`] does
//! that: it fetches through the guest's own paging ([`crate::guest_mem::translate`]) and decodes
//! with `iced-x86` in the code size of the guest's CS.
//!
//! # Decisions
//!
//! - **At most 15 bytes are fetched**: no x86 instruction is longer (APM vol. 3 1.1 "Instruction
//!   Byte Order"; SDM vol. 2A 2.3.11). A longer encoding (e.g. 15 redundant prefixes and an
//!   opcode) is [`DecodeError::Invalid`], as it is #GP on the CPU.
//! - **Each 4 KiB page of the fetch is translated separately**, since the two pages an
//!   instruction straddles may map anywhere. The fetch stops at the first page that does not
//!   translate or is not RAM; the instruction still decodes if it fits in the bytes before it
//!   (the CPU, too, fetches only the bytes it needs). If it does not fit, the walk error of that
//!   page is returned.
//! - **Fetch rights are checked as a supervisor fetch**: present, reserved bits and NX. The CPU
//!   already fetched these bytes, so this only guards against the guest changing its tables since;
//!   user-mode checks would need the CPL, which the VMCB has but the decoder does not need.
//! - **Linear addresses wrap at 4 GiB outside 64-bit code** (SDM vol. 3A 3.4 and 4.1: a 32-bit
//!   linear address space). In 64-bit code a fetch that would run past 2^64 stops there.
//! - **The guest may be changing the bytes as we read them** (another vCPU, later). The decoded
//!   length is then that of whatever was read; the result can be wrong but never unsafe: callers
//!   only use it to advance RIP, which the guest could have set to anything anyway.

#![forbid(unsafe_code)]

use core::fmt;

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, OpKind};

use crate::exit::IoSize;
use crate::guest_mem::{translate, Access, GuestMemory, PagingMode, WalkError};

/// The longest x86 instruction, in bytes (APM vol. 3 1.1; SDM vol. 2A 2.3.11).
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// The port operand of IN or OUT (SDM vol. 2A "IN", vol. 2B "OUT").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPort {
    /// `E4`-`E7`: the port is an 8-bit immediate.
    Imm(u8),
    /// `EC`-`EF`: the port is in DX.
    Dx,
}

/// What kind of instruction was decoded: the ones that cause exits the hypervisor handles by
/// emulating and skipping them, and `Other` for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstructionKind {
    /// `F4`.
    Hlt,
    /// `0F A2`.
    Cpuid,
    /// `0F 32`.
    Rdmsr,
    /// `0F 30`.
    Wrmsr,
    /// `0F 01 D9` (AMD).
    Vmmcall,
    /// `0F 01 C1` (Intel).
    Vmcall,
    /// `IN AL/AX/EAX, imm8|DX`; `size` from the opcode and operand-size prefix.
    In { port: IoPort, size: IoSize },
    /// `OUT imm8|DX, AL/AX/EAX`.
    Out { port: IoPort, size: IoSize },
    /// `INS` (`6C`/`6D`): port DX to ES:\[rDI\]. `rep`: F3 prefix; `addr_bits`: 16, 32 or 64,
    /// the width of rDI and rCX.
    Ins {
        size: IoSize,
        rep: bool,
        addr_bits: u8,
    },
    /// `OUTS` (`6E`/`6F`): DS:\[rSI\] (or a segment override) to port DX.
    Outs {
        size: IoSize,
        rep: bool,
        addr_bits: u8,
    },
    /// Any other valid instruction.
    Other,
}

/// A decoded guest instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedInstruction {
    /// Length in bytes, 1..=15: the amount to add to RIP to skip it.
    pub len: u64,
    /// What it is.
    pub kind: InstructionKind,
    /// The instruction bytes; only the first `len` are meaningful (the rest are zero).
    pub bytes: [u8; MAX_INSTRUCTION_LEN],
}

impl DecodedInstruction {
    /// The `len` bytes of the instruction, e.g. for a log line.
    pub fn bytes(&self) -> &[u8] {
        let len = usize::try_from(self.len).map_or(0, |l| l.min(MAX_INSTRUCTION_LEN));
        &self.bytes[..len]
    }
}

/// Why no instruction could be decoded at the guest's RIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The first page of the fetch does not translate (or is not RAM), or the instruction runs
    /// into a second page that does not.
    Walk(WalkError),
    /// The bytes are not a valid instruction in this code size (the CPU would raise #UD or #GP).
    Invalid,
    /// The instruction runs past the end of the linear address space.
    Truncated,
}

impl From<WalkError> for DecodeError {
    fn from(err: WalkError) -> Self {
        DecodeError::Walk(err)
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Walk(err) => write!(f, "instruction fetch failed: {err}"),
            DecodeError::Invalid => write!(f, "invalid instruction"),
            DecodeError::Truncated => write!(f, "instruction runs past the address space"),
        }
    }
}

/// Fetches and decodes the guest instruction at linear address `rip_linear` (CS.base + RIP).
///
/// The code size comes from the CS descriptor as the CPU takes it (SDM vol. 3A 5.2.1, APM vol. 2
/// 4.8): `cs_long` (CS.L, in long mode) selects 64-bit code; otherwise `cs_db` (CS.D) selects
/// 32-bit, else 16-bit (real mode, virtual-8086 mode and 16-bit protected mode).
pub fn instruction_at(
    mem: &impl GuestMemory,
    mode: &PagingMode,
    cs_long: bool,
    cs_db: bool,
    rip_linear: u64,
) -> Result<DecodedInstruction, DecodeError> {
    let bitness = if cs_long {
        64
    } else if cs_db {
        32
    } else {
        16
    };
    let mut bytes = [0u8; MAX_INSTRUCTION_LEN];
    let (fetched, stop) = fetch(mem, mode, cs_long, rip_linear, &mut bytes);
    if fetched == 0 {
        // Nothing at all could be read: the walk error of the first page.
        return Err(stop.map_or(DecodeError::Truncated, DecodeError::Walk));
    }

    let mut decoder =
        Decoder::try_with_ip(bitness, &bytes[..fetched], rip_linear, DecoderOptions::NONE)
            .map_err(|_| DecodeError::Invalid)?;
    let instr = decoder.decode();
    match decoder.last_error() {
        DecoderError::None => {}
        // The bytes ran out: blame the page that stopped the fetch, if any.
        DecoderError::NoMoreBytes => {
            return Err(stop.map_or(DecodeError::Truncated, DecodeError::Walk));
        }
        _ => return Err(DecodeError::Invalid),
    }
    let len = instr.len();
    if len == 0 || len > fetched {
        return Err(DecodeError::Invalid);
    }
    let mut out = [0u8; MAX_INSTRUCTION_LEN];
    out[..len].copy_from_slice(&bytes[..len]);
    Ok(DecodedInstruction {
        len: len as u64,
        kind: classify(&instr),
        bytes: out,
    })
}

/// Reads up to 15 bytes from `rip_linear`, page by page. Returns how many bytes were read and,
/// if it stopped early, why (`None`: the end of the linear address space).
fn fetch(
    mem: &impl GuestMemory,
    mode: &PagingMode,
    cs_long: bool,
    rip_linear: u64,
    bytes: &mut [u8; MAX_INSTRUCTION_LEN],
) -> (usize, Option<WalkError>) {
    let mut linear = if cs_long {
        rip_linear
    } else {
        rip_linear & 0xffff_ffff
    };
    let mut have = 0usize;
    while have < MAX_INSTRUCTION_LEN {
        // Bytes left in this 4 KiB page (1..=4096), capped by what is still wanted.
        let in_page = 0x1000 - (linear & 0xfff);
        let want = MAX_INSTRUCTION_LEN - have;
        let chunk = usize::try_from(in_page).map_or(want, |p| p.min(want));
        let gpa = match translate(mem, mode, linear, Access::FETCH) {
            Ok(gpa) => gpa,
            Err(err) => return (have, Some(err)),
        };
        if !mem.read(gpa, &mut bytes[have..have + chunk]) {
            return (have, Some(WalkError::OutOfRam { gpa }));
        }
        have += chunk;
        let step = chunk as u64;
        linear = if cs_long {
            match linear.checked_add(step) {
                Some(next) => next,
                None => return (have, None),
            }
        } else {
            linear.wrapping_add(step) & 0xffff_ffff
        };
    }
    (have, None)
}

/// Maps iced's `Code` to the kinds the exit handlers care about.
fn classify(instr: &Instruction) -> InstructionKind {
    use InstructionKind as K;
    let code = instr.code();
    match code {
        Code::Hlt => K::Hlt,
        Code::Cpuid => K::Cpuid,
        Code::Rdmsr => K::Rdmsr,
        Code::Wrmsr => K::Wrmsr,
        Code::Vmmcall => K::Vmmcall,
        Code::Vmcall => K::Vmcall,
        Code::In_AL_imm8
        | Code::In_AX_imm8
        | Code::In_EAX_imm8
        | Code::In_AL_DX
        | Code::In_AX_DX
        | Code::In_EAX_DX => K::In {
            port: io_port(instr),
            size: io_size(code),
        },
        Code::Out_imm8_AL
        | Code::Out_imm8_AX
        | Code::Out_imm8_EAX
        | Code::Out_DX_AL
        | Code::Out_DX_AX
        | Code::Out_DX_EAX => K::Out {
            port: io_port(instr),
            size: io_size(code),
        },
        Code::Insb_m8_DX | Code::Insw_m16_DX | Code::Insd_m32_DX => K::Ins {
            size: io_size(code),
            rep: instr.has_rep_prefix(),
            addr_bits: string_addr_bits(instr.op0_kind()),
        },
        Code::Outsb_DX_m8 | Code::Outsw_DX_m16 | Code::Outsd_DX_m32 => K::Outs {
            size: io_size(code),
            rep: instr.has_rep_prefix(),
            addr_bits: string_addr_bits(instr.op1_kind()),
        },
        _ => K::Other,
    }
}

/// The port of IN or OUT: the 8-bit immediate of `E4`-`E7`, else DX (`EC`-`EF`).
fn io_port(instr: &Instruction) -> IoPort {
    match instr.code() {
        Code::In_AL_imm8
        | Code::In_AX_imm8
        | Code::In_EAX_imm8
        | Code::Out_imm8_AL
        | Code::Out_imm8_AX
        | Code::Out_imm8_EAX => IoPort::Imm(instr.immediate8()),
        _ => IoPort::Dx,
    }
}

/// The data size of IN, OUT, INS or OUTS: AL/m8, AX/m16, else EAX/m32.
fn io_size(code: Code) -> IoSize {
    match code {
        Code::In_AL_imm8
        | Code::In_AL_DX
        | Code::Out_imm8_AL
        | Code::Out_DX_AL
        | Code::Insb_m8_DX
        | Code::Outsb_DX_m8 => IoSize::Byte,
        Code::In_AX_imm8
        | Code::In_AX_DX
        | Code::Out_imm8_AX
        | Code::Out_DX_AX
        | Code::Insw_m16_DX
        | Code::Outsw_DX_m16 => IoSize::Word,
        _ => IoSize::Dword,
    }
}

/// The address size of a string operand: which of rSI/rDI (and rCX for REP) it uses.
fn string_addr_bits(kind: OpKind) -> u8 {
    match kind {
        OpKind::MemorySegSI | OpKind::MemoryESDI => 16,
        OpKind::MemorySegESI | OpKind::MemoryESEDI => 32,
        _ => 64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_mem::fake::{FakeMemory, LongTables};

    const OFF: PagingMode = PagingMode {
        cr0: 0,
        cr3: 0,
        cr4: 0,
        efer: 0,
    };

    /// Decodes `bytes` placed at 0x7000 with paging off, in `bits`-bit code.
    fn dec(bits: u32, bytes: &[u8]) -> Result<DecodedInstruction, DecodeError> {
        let mut m = FakeMemory::new();
        m.poke(0x7000, bytes);
        instruction_at(&m, &OFF, bits == 64, bits == 32, 0x7000)
    }

    fn kind(bits: u32, bytes: &[u8]) -> (u64, InstructionKind) {
        let d = dec(bits, bytes).unwrap();
        assert_eq!(d.bytes(), &bytes[..d.len as usize]);
        (d.len, d.kind)
    }

    use InstructionKind as K;

    #[test]
    fn exit_instructions_in_every_mode() {
        for bits in [16, 32, 64] {
            assert_eq!(kind(bits, &[0xf4]), (1, K::Hlt));
            assert_eq!(kind(bits, &[0x0f, 0xa2]), (2, K::Cpuid));
            assert_eq!(kind(bits, &[0x0f, 0x32]), (2, K::Rdmsr));
            assert_eq!(kind(bits, &[0x0f, 0x30]), (2, K::Wrmsr));
            assert_eq!(kind(bits, &[0x0f, 0x01, 0xd9]), (3, K::Vmmcall));
            assert_eq!(kind(bits, &[0x0f, 0x01, 0xc1]), (3, K::Vmcall));
            assert_eq!(kind(bits, &[0x90]), (1, K::Other));
        }
    }

    #[test]
    fn trailing_bytes_do_not_count() {
        assert_eq!(kind(64, &[0xf4, 0x0f, 0xa2, 0xcc]), (1, K::Hlt));
    }

    #[test]
    fn in_out_all_forms() {
        let dx = IoPort::Dx;
        let (b, w, d) = (IoSize::Byte, IoSize::Word, IoSize::Dword);
        for bits in [32, 64] {
            let cases: [(&[u8], u64, InstructionKind); 14] = [
                (&[0xec], 1, K::In { port: dx, size: b }),
                (&[0xed], 1, K::In { port: dx, size: d }),
                (&[0x66, 0xed], 2, K::In { port: dx, size: w }),
                (&[0xee], 1, K::Out { port: dx, size: b }),
                (&[0xef], 1, K::Out { port: dx, size: d }),
                (&[0x66, 0xef], 2, K::Out { port: dx, size: w }),
                (
                    &[0xe4, 0x60],
                    2,
                    K::In {
                        port: IoPort::Imm(0x60),
                        size: b,
                    },
                ),
                (
                    &[0xe5, 0x71],
                    2,
                    K::In {
                        port: IoPort::Imm(0x71),
                        size: d,
                    },
                ),
                (
                    &[0x66, 0xe5, 0x71],
                    3,
                    K::In {
                        port: IoPort::Imm(0x71),
                        size: w,
                    },
                ),
                (
                    &[0xe6, 0x80],
                    2,
                    K::Out {
                        port: IoPort::Imm(0x80),
                        size: b,
                    },
                ),
                (
                    &[0xe7, 0xf8],
                    2,
                    K::Out {
                        port: IoPort::Imm(0xf8),
                        size: d,
                    },
                ),
                (
                    &[0x66, 0xe7, 0xf8],
                    3,
                    K::Out {
                        port: IoPort::Imm(0xf8),
                        size: w,
                    },
                ),
                // A REX prefix does not widen port I/O past 32 bits.
                (&[0x48, 0xed], 2, K::In { port: dx, size: d }),
                (&[0x2e, 0x66, 0xee], 3, K::Out { port: dx, size: b }),
            ];
            for (bytes, len, want) in cases {
                if bits == 32 && bytes[0] == 0x48 {
                    continue; // 48 is DEC EAX outside 64-bit mode
                }
                assert_eq!(kind(bits, bytes), (len, want), "{bits}-bit {bytes:02x?}");
            }
        }
        // In 16-bit code the operand-size prefix selects 32 bits.
        assert_eq!(kind(16, &[0xed]), (1, K::In { port: dx, size: w }));
        assert_eq!(kind(16, &[0x66, 0xed]), (2, K::In { port: dx, size: d }));
        assert_eq!(kind(16, &[0xef]), (1, K::Out { port: dx, size: w }));
        assert_eq!(
            kind(16, &[0x66, 0xe7, 0x10]),
            (
                3,
                K::Out {
                    port: IoPort::Imm(0x10),
                    size: d
                }
            )
        );
    }

    #[test]
    fn string_io() {
        assert_eq!(
            kind(64, &[0xf3, 0x6c]),
            (
                2,
                K::Ins {
                    size: IoSize::Byte,
                    rep: true,
                    addr_bits: 64
                }
            )
        );
        assert_eq!(
            kind(64, &[0x67, 0x6f]),
            (
                2,
                K::Outs {
                    size: IoSize::Dword,
                    rep: false,
                    addr_bits: 32
                }
            )
        );
        assert_eq!(
            kind(16, &[0xf3, 0x6f]),
            (
                2,
                K::Outs {
                    size: IoSize::Word,
                    rep: true,
                    addr_bits: 16
                }
            )
        );
        assert_eq!(
            kind(32, &[0x66, 0x6d]),
            (
                2,
                K::Ins {
                    size: IoSize::Word,
                    rep: false,
                    addr_bits: 32
                }
            )
        );
    }

    #[test]
    fn redundant_prefixes_count_in_the_length() {
        assert_eq!(kind(64, &[0x66, 0xf4]), (2, K::Hlt));
        assert_eq!(kind(32, &[0x2e, 0xf4]), (2, K::Hlt));
        assert_eq!(kind(64, &[0x2e, 0x3e, 0x66, 0x0f, 0xa2]), (5, K::Cpuid));
        // 14 prefixes + opcode = 15 bytes: still an instruction.
        let mut long = [0x2e; 15];
        long[14] = 0xf4;
        assert_eq!(kind(64, &long), (15, K::Hlt));
        // 15 prefixes + opcode = 16 bytes: #GP on the CPU.
        let too_long = [0x2e; 16];
        let mut too_long = too_long;
        too_long[15] = 0xf4;
        assert_eq!(dec(64, &too_long), Err(DecodeError::Invalid));
    }

    #[test]
    fn code_size_changes_lengths() {
        // MOV rAX, imm: 16-bit imm16, 32-bit imm32, 64-bit with REX.W imm64.
        let mov = [0xb8, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(kind(16, &mov), (3, K::Other));
        assert_eq!(kind(32, &mov), (5, K::Other));
        assert_eq!(kind(64, &mov), (5, K::Other));
        let mut movabs = [0u8; 10];
        movabs[0] = 0x48;
        movabs[1] = 0xb8;
        assert_eq!(kind(64, &movabs), (10, K::Other));
        // ModRM 06 is [disp16] in 16-bit addressing, [esi] in 32-bit; 05 is [di] and [disp32].
        let lea = [0x8d, 0x06, 0x34, 0x12, 0x00, 0x00];
        assert_eq!(kind(16, &lea), (4, K::Other));
        assert_eq!(kind(32, &lea), (2, K::Other));
        let lea = [0x8d, 0x05, 0x34, 0x12, 0x00, 0x00];
        assert_eq!(kind(16, &lea), (2, K::Other));
        assert_eq!(kind(32, &lea), (6, K::Other));
        // 67 switches the address size: [disp32] in 16-bit code.
        assert_eq!(
            kind(16, &[0x67, 0x8d, 0x05, 0x34, 0x12, 0x00, 0x00]),
            (7, K::Other)
        );
    }

    #[test]
    fn invalid_bytes() {
        // 0F 04: undefined opcode.
        assert_eq!(dec(64, &[0x0f, 0x04]), Err(DecodeError::Invalid));
        // PUSH ES (06) does not exist in 64-bit mode, but does in 32-bit mode.
        assert_eq!(dec(64, &[0x06]), Err(DecodeError::Invalid));
        assert_eq!(kind(32, &[0x06]), (1, K::Other));
        // LOCK HLT: LOCK on a non-lockable instruction is #UD.
        assert_eq!(dec(64, &[0xf0, 0xf4]), Err(DecodeError::Invalid));
    }

    #[test]
    fn fetch_stops_at_end_of_ram() {
        // Only one byte of an instruction that needs two, then memory that is not RAM.
        let mut m = FakeMemory::new();
        m.poke(0x7fff, &[0x0f]);
        assert_eq!(
            instruction_at(&m, &OFF, true, false, 0x7fff),
            Err(DecodeError::Walk(WalkError::OutOfRam { gpa: 0x8000 }))
        );
        // A one-byte instruction there is fine.
        m.poke(0x7fff, &[0xf4]);
        assert_eq!(
            instruction_at(&m, &OFF, true, false, 0x7fff).map(|d| d.kind),
            Ok(K::Hlt)
        );
        // Nothing at RIP at all.
        assert_eq!(
            instruction_at(&m, &OFF, true, false, 0x1_0000),
            Err(DecodeError::Walk(WalkError::OutOfRam { gpa: 0x1_0000 }))
        );
    }

    /// Two virtually adjacent pages at 0x40_0000 and 0x40_1000, mapped (4-level paging) to
    /// physically distant frames 0x9_0000 and 0x5_0000.
    fn two_pages() -> (LongTables, PagingMode) {
        let mut t = LongTables::new(4);
        t.map(0x40_0000, 1, 0x9_0000, 0b010);
        t.map(0x40_1000, 1, 0x5_0000, 0b010);
        t.mem.add_page(0x9_0000);
        t.mem.add_page(0x5_0000);
        let mode = t.mode(true);
        (t, mode)
    }

    #[test]
    fn straddling_instruction_reads_both_pages() {
        let (mut t, mode) = two_pages();
        // VMMCALL split 0F 01 | D9 across the boundary.
        t.mem.poke(0x9_0ffe, &[0x0f, 0x01]);
        t.mem.poke(0x5_0000, &[0xd9]);
        let d = instruction_at(&t.mem, &mode, true, false, 0x40_0ffe).unwrap();
        assert_eq!((d.len, d.kind), (3, K::Vmmcall));
        assert_eq!(d.bytes(), &[0x0f, 0x01, 0xd9]);
        // OUT imm8 with the immediate on the second page.
        t.mem.poke(0x9_0fff, &[0xe6]);
        t.mem.poke(0x5_0000, &[0x80]);
        let d = instruction_at(&t.mem, &mode, true, false, 0x40_0fff).unwrap();
        assert_eq!(
            d.kind,
            K::Out {
                port: IoPort::Imm(0x80),
                size: IoSize::Byte
            }
        );
    }

    #[test]
    fn straddling_into_unmapped_page() {
        let (mut t, mode) = two_pages();
        let gva = 0x40_2000;
        // The page after 0x40_1000 is not mapped.
        t.mem.poke(0x5_0ffe, &[0x0f, 0xa2]);
        let d = instruction_at(&t.mem, &mode, true, false, 0x40_1ffe).unwrap();
        assert_eq!((d.len, d.kind), (2, K::Cpuid));
        t.mem.poke(0x5_0fff, &[0x0f]);
        assert_eq!(
            instruction_at(&t.mem, &mode, true, false, 0x40_1fff),
            Err(DecodeError::Walk(WalkError::NotPresent { level: 1, gva }))
        );
        // RIP itself unmapped.
        assert_eq!(
            instruction_at(&t.mem, &mode, true, false, gva),
            Err(DecodeError::Walk(WalkError::NotPresent { level: 1, gva }))
        );
    }

    #[test]
    fn fetch_honours_no_execute() {
        let mut t = LongTables::new(4);
        t.map(0x40_0000, 1, 0x9_0000, 1 << 63);
        t.mem.poke(0x9_0000, &[0xf4]);
        assert_eq!(
            instruction_at(&t.mem, &t.mode(true), true, false, 0x40_0000),
            Err(DecodeError::Walk(WalkError::Protection { gva: 0x40_0000 }))
        );
    }

    #[test]
    fn legacy_fetch_wraps_at_4_gib() {
        let mut m = FakeMemory::new();
        m.poke(0xffff_ffff, &[0x0f]);
        m.poke(0, &[0xa2]);
        let d = instruction_at(&m, &OFF, false, true, 0xffff_ffff).unwrap();
        assert_eq!((d.len, d.kind), (2, K::Cpuid));
    }

    #[test]
    fn long_fetch_past_2_pow_64_is_truncated() {
        let mut t = LongTables::new(4);
        t.map(0xffff_ffff_ffff_f000, 1, 0x9_0000, 0);
        t.mem.poke(0x9_0fff, &[0x0f]);
        let mode = t.mode(true);
        assert_eq!(
            instruction_at(&t.mem, &mode, true, false, u64::MAX),
            Err(DecodeError::Truncated)
        );
        t.mem.poke(0x9_0fff, &[0xf4]);
        assert_eq!(
            instruction_at(&t.mem, &mode, true, false, u64::MAX).map(|d| d.len),
            Ok(1)
        );
    }

    #[test]
    fn fetch_through_32bit_and_pae_paging() {
        // 32-bit paging: PD at 0x1000, PT at 0x2000, 0x0040_0000 -> 0x3000.
        let mut m = FakeMemory::new();
        m.poke_u32(0x1000 + 4, 0x2000 | 0b011);
        m.poke_u32(0x2000, 0x3000 | 0b011);
        m.poke(0x3000, &[0x66, 0xed]);
        let mode = PagingMode {
            cr0: PagingMode::CR0_PG | 1,
            cr3: 0x1000,
            ..OFF
        };
        let d = instruction_at(&m, &mode, false, true, 0x0040_0000).unwrap();
        assert_eq!(
            d.kind,
            K::In {
                port: IoPort::Dx,
                size: IoSize::Word
            }
        );
        // PAE: PDPT at 0x4000 -> PD 0x5000 -> PT 0x6000, 0x0000_0000 -> 0x7000.
        m.poke_u64(0x4000, 0x5000 | 1);
        m.poke_u64(0x5000, 0x6000 | 0b011);
        m.poke_u64(0x6000, 0x7000 | 0b011);
        m.poke(0x7000, &[0xf4]);
        let pae = PagingMode {
            cr0: PagingMode::CR0_PG | 1,
            cr3: 0x4000,
            cr4: PagingMode::CR4_PAE,
            efer: 0,
        };
        let d = instruction_at(&m, &pae, false, false, 0).unwrap();
        assert_eq!((d.len, d.kind), (1, K::Hlt));
    }

    #[test]
    fn errors_display() {
        for e in [
            DecodeError::Walk(WalkError::NonCanonical),
            DecodeError::Invalid,
            DecodeError::Truncated,
        ] {
            assert!(!std::format!("{e}").is_empty());
        }
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut s = 0x2545_f491_4f6c_dd1d;
        let mut m = FakeMemory::new();
        // Two RAM pages, 0x0000 and 0x1000; 0x2000 is not RAM.
        m.add_page(0x0);
        m.add_page(0x1000);
        let mut valid = 0;
        for i in 0..50_000 {
            let mut bytes = [0u8; 16];
            for b in bytes.iter_mut() {
                *b = xorshift(&mut s) as u8;
            }
            let r = xorshift(&mut s);
            // Across the page boundary at 0x1000, or up to the end of RAM at 0x2000.
            let base = if r & 1 == 0 { 0x1000 - 16 } else { 0x2000 - 20 };
            let rip = base + (r >> 1) % 24;
            assert!(m.write(rip.min(0x2000 - 16), &bytes));
            let bits = [16, 32, 64][i % 3];
            match instruction_at(&m, &OFF, bits == 64, bits == 32, rip) {
                Ok(d) => {
                    assert!((1..=15).contains(&d.len));
                    assert_eq!(d.bytes().len() as u64, d.len);
                    valid += 1;
                }
                Err(DecodeError::Invalid | DecodeError::Walk(_)) => {}
                Err(DecodeError::Truncated) => panic!("no truncation below 4 GiB"),
            }
        }
        // Most random byte strings are some instruction.
        assert!(valid > 25_000, "{valid}");
    }

    #[test]
    fn random_paging_never_panics() {
        let mut s = 0x9e37_79b9_7f4a_7c15;
        let mut m = FakeMemory::new();
        for p in 0..16u64 {
            let mut page = [0u8; 4096];
            for b in page.iter_mut() {
                *b = xorshift(&mut s) as u8;
            }
            m.poke(p << 12, &page);
        }
        for _ in 0..20_000 {
            let mode = PagingMode {
                cr0: xorshift(&mut s),
                cr3: xorshift(&mut s) & 0xf000,
                cr4: xorshift(&mut s),
                efer: xorshift(&mut s),
            };
            let r = xorshift(&mut s);
            let rip = xorshift(&mut s);
            let _ = instruction_at(&m, &mode, r & 1 != 0, r & 2 != 0, rip);
        }
    }
}
