//! The test guest: a freestanding 64-bit program the hypervisor runs to prove that guest memory
//! survives everything (pause, migration) intact.
//!
//! It fills its RAM with self-describing pages (`guest_abi::page_word`), keeps a version table
//! of what every page must hold, rewrites pages at the configured dirty rate (cycling over its
//! hot set: the first `hot` data pages, or all of them; `guest_abi::HotSet`), checks a few
//! pages in the background on every pass, prints a heartbeat each second, and answers single-byte
//! commands on its serial port (`guest_abi::command`). It runs with interrupts disabled and
//! uses HLT to yield: the hypervisor resumes a halted vCPU at its next time slice.
//!
//! If the VM has a virtio-blk disk ([`virtio_blk`]), the guest also keeps writing
//! self-describing blocks to it and verifies them on request ([`disk_workload`]); it says
//! `disk: virtio-blk N sectors ...` or `disk: none` after its `ready` line, and its heartbeat
//! then ends with `disk writes=W` (and `errors=E` if some failed). Without a disk it does what
//! it always did. On request it also benchmarks the disk ([`disk_bench`]), on a region of the
//! disk the workload does not use.

#![no_std]
#![no_main]

mod disk_bench;
mod disk_workload;
mod port;
mod virtio_blk;

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};

use disk_workload::{DiskWorkload, Verdict};
use port::{inb, outb};

use guest_abi::{
    check_page, command, dirty_test_pages, fill_page, verify_pages, BootParams, DataLayout, HotSet,
    PageMismatch, VerifyReport, BOOT_PARAMS, IMAGE_BASE, PAGE_SIZE, STACK_TOP,
};

const COM1: u16 = 0x3F8;
const COM1_LSR: u16 = COM1 + 5;
/// Pages checked in the background per pass of the main loop.
const BACKGROUND_CHECKS: u64 = 4;
/// Most pages rewritten per pass, so a high dirty rate cannot starve the heartbeat.
const MAX_WRITES_PER_PASS: u64 = 4096;

global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "    mov rsp, {stack}",
    "    mov rdi, {params}",
    "    call {main}",
    "2:  hlt",
    "    jmp 2b",
    stack = const STACK_TOP,
    params = const BOOT_PARAMS,
    main = sym guest_main,
);

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the (hypervisor-offset) time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn halt() {
    // SAFETY: HLT yields to the hypervisor, which resumes us at the next slice.
    unsafe { asm!("hlt", options(nomem, nostack)) };
}

struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                outb(COM1, b'\r');
            }
            outb(COM1, b);
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{ let _ = writeln!(Serial, $($arg)*); }};
}

/// This guest's RAM, seen through its identity mapping.
struct Memory {
    layout: DataLayout,
}

impl Memory {
    fn page(&self, index: u64) -> &'static mut [u64; 512] {
        let gpa = self.layout.page_gpa(index);
        // SAFETY: data pages lie inside guest RAM (DataLayout keeps them below mem_bytes), are
        // identity-mapped, page-aligned, and only this single-threaded program touches them;
        // no two references to one page are alive at once.
        unsafe { &mut *(gpa as *mut [u64; 512]) }
    }

    fn version(&self, index: u64) -> u32 {
        // SAFETY: the version table has one u32 per data page, inside guest RAM.
        unsafe {
            core::ptr::read_volatile((self.layout.versions_gpa as *const u32).add(index as usize))
        }
    }

    fn set_version(&self, index: u64, version: u32) {
        // SAFETY: as in `version`.
        unsafe {
            core::ptr::write_volatile(
                (self.layout.versions_gpa as *mut u32).add(index as usize),
                version,
            )
        }
    }

    fn rewrite(&self, index: u64) {
        let version = self.version(index).wrapping_add(1);
        self.set_version(index, version);
        fill_page(self.page(index), index, version);
    }

    fn check(&self, index: u64) -> Result<(), PageMismatch> {
        check_page(self.page(index), index, self.version(index))
    }

    /// Checks every page and hashes the version table and all pages.
    fn verify_all(&self) -> VerifyReport {
        verify_pages(self.layout.pages, |i| self.version(i), |i| &*self.page(i))
    }
}

extern "C" fn guest_main(params_gpa: u64) -> ! {
    // SAFETY: the loader wrote BootParams::WORDS words at BOOT_PARAMS, inside guest RAM.
    let words = unsafe { core::ptr::read_volatile(params_gpa as *const [u64; BootParams::WORDS]) };
    let params = match BootParams::from_words(words) {
        Ok(p) => p,
        Err(err) => {
            say!("boot parameters rejected: {err:?}");
            loop {
                halt();
            }
        }
    };
    let memory = Memory {
        layout: DataLayout::for_memory(params.mem_bytes),
    };
    let pages = memory.layout.pages;
    let hot = params.hot_set(&memory.layout);
    say!(
        "test guest: {} MiB, {pages} data pages at {:#x}, dirty {} pages/s over {} pages{}",
        params.mem_bytes >> 20,
        memory.layout.pages_gpa,
        params.dirty_pages_per_sec,
        hot.pages,
        ClampNote(hot)
    );
    for index in 0..pages {
        memory.set_version(index, 1);
        fill_page(memory.page(index), index, 1);
    }
    let image_end = {
        extern "C" {
            static __image_end: u8;
        }
        &raw const __image_end as u64
    };
    say!(
        "ready image={IMAGE_BASE:#x}-{image_end:#x} stack={:#x}-{STACK_TOP:#x} versions={:#x}",
        STACK_TOP - 16 * PAGE_SIZE,
        memory.layout.versions_gpa
    );

    let mut disk = match virtio_blk::VirtioBlk::probe() {
        Ok(Some(blk)) => {
            let w = DiskWorkload::new(blk, rdtsc(), params.tsc_hz);
            say!(
                "disk: virtio-blk {} sectors at port {:#x}, writing {} blocks of 4 KiB",
                w.capacity_sectors(),
                w.io_base(),
                w.window_blocks()
            );
            Some(w)
        }
        Ok(None) => {
            say!("disk: none");
            None
        }
        Err(err) => {
            say!("disk: virtio-blk unusable: {err}");
            None
        }
    };

    let start = rdtsc();
    let mut next_heartbeat = start + params.tsc_hz;
    let mut heartbeat = 0u64;
    let mut written = 0u64;
    let mut write_cursor = 0u64;
    let mut check_cursor = 0u64;
    let mut status: Result<(), (u64, PageMismatch)> = Ok(());
    loop {
        let now = rdtsc();
        if now >= next_heartbeat {
            heartbeat += 1;
            next_heartbeat += params.tsc_hz;
            let disk_part = heartbeat_disk(disk.as_ref());
            match status {
                Ok(()) => say!("heartbeat {heartbeat} ok{disk_part}"),
                Err((page, m)) => say!("heartbeat {heartbeat} FAIL page {page}: {m:?}{disk_part}"),
            }
        }

        // Rewrite what the dirty rate owes by now.
        let elapsed = now - start;
        let owed = (u128::from(params.dirty_pages_per_sec) * u128::from(elapsed)
            / u128::from(params.tsc_hz)) as u64;
        let burst = owed.saturating_sub(written).min(MAX_WRITES_PER_PASS);
        for _ in 0..burst {
            memory.rewrite(write_cursor);
            write_cursor = hot.next_page(write_cursor);
        }
        written += burst;
        // A backlog of more than one second's writes is forgotten, as the dirtier of QEMU's
        // reference guest does (tests/tests/qemu_migration.rs): a throttled guest falls behind,
        // and catching up in a burst is not the workload. It also keeps a guest that fell far
        // behind (say, after a long pause) from bursting for long.
        let rate = params.dirty_pages_per_sec;
        if owed > written.saturating_add(rate) {
            written = owed - rate;
        }

        for _ in 0..BACKGROUND_CHECKS {
            if status.is_ok() {
                if let Err(m) = memory.check(check_cursor) {
                    status = Err((check_cursor, m));
                }
            }
            check_cursor = (check_cursor + 1) % pages;
        }

        if inb(COM1_LSR) & 1 != 0 {
            match inb(COM1) {
                command::VERIFY => {
                    let t0 = rdtsc();
                    let report = memory.verify_all();
                    let cycles = rdtsc() - t0;
                    let (bad, hash) = (report.bad, report.hash);
                    match report.first_bad {
                        None => say!("verify ok pages={pages} hash={hash:#018x} cycles={cycles}"),
                        Some((page, m)) => {
                            status = Err((page, m));
                            say!("verify FAILED bad={bad} first page {page}: {m:?} hash={hash:#018x}")
                        }
                    }
                }
                command::DIRTY_TEST => {
                    let mut count = 0;
                    for index in dirty_test_pages(&memory.layout) {
                        memory.rewrite(index);
                        count += 1;
                    }
                    say!("dirtytest wrote {count} pages");
                }
                command::INVALID_OPCODE => {
                    say!("executing an invalid opcode");
                    // SAFETY: faulting is the point: with no IDT the hypervisor sees a
                    // triple fault and must stop this VM cleanly.
                    unsafe { asm!("ud2") };
                }
                command::OUTSIDE_RAM => {
                    let gpa = params.mem_bytes + 0x10_0000;
                    say!("reading {gpa:#x}, past the end of RAM");
                    // SAFETY: the identity map covers this address; it is outside RAM, so the
                    // access reaches the nested page tables and must end in a handled exit.
                    let value = unsafe { core::ptr::read_volatile(gpa as *const u64) };
                    say!("read {value:#x} past the end of RAM");
                }
                command::SPIN => {
                    // Every byte already left through an exit of its own (the port is emulated).
                    say!("spinning with interrupts off");
                    loop {
                        core::hint::spin_loop();
                    }
                }
                command::DISK_VERIFY => match disk.as_mut() {
                    None => say!("disk verify: no disk"),
                    Some(w) => {
                        let t0 = rdtsc();
                        let verdict = w.verify();
                        let cycles = rdtsc() - t0;
                        let writes = w.writes();
                        match verdict {
                            Verdict::Ok { digest } => say!(
                                "disk verify ok blocks={} writes={writes} hash={:#018x} cycles={cycles}",
                                digest.blocks,
                                digest.hash
                            ),
                            Verdict::Mismatch {
                                lba,
                                expected,
                                found,
                            } => say!(
                                "disk verify FAILED lba={lba} expected gen {expected} found {found}"
                            ),
                            Verdict::ReadError { lba, status } => {
                                say!("disk verify FAILED lba={lba} read status {status}")
                            }
                            Verdict::Stuck { in_flight } => say!(
                                "disk verify FAILED: {in_flight} requests never completed{}",
                                if w.broken() { " (device needs reset)" } else { "" }
                            ),
                        }
                    }
                },
                command::DISK_HOLD => match disk.as_mut() {
                    None => say!("disk hold: no disk"),
                    Some(w) => {
                        if w.hold() {
                            say!("disk hold writes={}", w.writes());
                        } else {
                            say!("disk hold FAILED: requests never completed");
                        }
                    }
                },
                command::DISK_RUN => match disk.as_mut() {
                    None => say!("disk run: no disk"),
                    Some(w) => {
                        w.run(rdtsc());
                        say!("disk run");
                    }
                },
                command::DISK_BENCH => match disk.as_mut() {
                    None => say!("disk bench: no disk"),
                    Some(w) => {
                        let was_held = w.held();
                        if w.hold() {
                            disk_bench::run(w.device(), params.tsc_hz, &mut Serial);
                        } else {
                            say!("disk bench FAILED: the workload's requests never completed");
                        }
                        if !was_held {
                            w.run(rdtsc());
                        }
                    }
                },
                other => say!("unknown command byte {other:#04x}"),
            }
        }
        if let Some(w) = disk.as_mut() {
            w.pass(rdtsc());
        }
        halt();
    }
}

/// The start line's note on a hot set larger than the data pages: empty when it fits.
struct ClampNote(HotSet);

impl fmt::Display for ClampNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.clamped_from {
            Some(asked) => write!(f, " (hot={asked} is more than the data pages: all of them)"),
            None => Ok(()),
        }
    }
}

/// The disk part of a heartbeat line: empty without a disk.
fn heartbeat_disk(disk: Option<&DiskWorkload>) -> DiskText {
    let mut t = DiskText::default();
    if let Some(w) = disk {
        let _ = write!(t, " disk writes={}", w.writes());
        if w.errors() > 0 {
            let _ = write!(t, " errors={}", w.errors());
        }
        if w.broken() {
            let _ = write!(t, " broken");
        }
    }
    t
}

/// A short line fragment built without an allocator.
struct DiskText {
    buf: [u8; 64],
    len: usize,
}

impl Default for DiskText {
    fn default() -> Self {
        DiskText {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl Write for DiskText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = (self.len + s.len()).min(self.buf.len());
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&s.as_bytes()[..n]);
        self.len = end;
        Ok(())
    }
}

impl fmt::Display for DiskText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only ASCII is ever written, so the cut never splits a character.
        f.write_str(core::str::from_utf8(&self.buf[..self.len]).unwrap_or(""))
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("guest panic: {}", info.message());
    loop {
        halt();
    }
}
