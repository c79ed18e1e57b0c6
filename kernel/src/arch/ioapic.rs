//! The I/O APIC(s): found through the ACPI MADT, every input masked at boot, and one input
//! programmed (level or edge, with the polarity the MADT gives, fixed delivery to the boot CPU's
//! local APIC) when a driver asks for its PCI interrupt line. The routing decisions are the
//! kernel library's ([`kernel::irq`], [`kernel::acpi`]); this is the register access under them.
//!
//! An IOAPIC is two registers, an index (IOREGSEL) and a window (IOWIN): one access is two, so
//! every access holds [`REGS`] with interrupts off (the NIC interrupt handler may mask an input
//! that another device holds asserted).
//!
//! Without an MADT, an IOAPIC, or a local APIC ID that fits an IOAPIC destination, nothing is
//! programmed and [`route_pci`] says why: drivers stay polled.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use kernel::acpi::{self, PhysMemory, SourceOverride};
use kernel::irq::{self, RedirectionEntry, Route, MASKED_ENTRY};
use spin::{Mutex, Once};
use x86_64::instructions::interrupts;
use x86_64::PhysAddr;

use crate::mem;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_REDIRECTION: u32 = 0x10;

/// One IOAPIC, its registers mapped uncached.
struct IoApic {
    id: u8,
    address: u32,
    gsi_base: u32,
    inputs: u32,
    regs: u64,
}

impl IoApic {
    fn read(&self, reg: u32) -> u32 {
        // SAFETY: `regs` maps this IOAPIC's register page uncached (`init`); IOREGSEL and IOWIN
        // lie in it. Callers hold REGS with interrupts off, so the index stays ours until the
        // window is read.
        unsafe {
            core::ptr::write_volatile((self.regs + IOREGSEL) as *mut u32, reg);
            core::ptr::read_volatile((self.regs + IOWIN) as *const u32)
        }
    }

    fn write(&self, reg: u32, value: u32) {
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::write_volatile((self.regs + IOREGSEL) as *mut u32, reg);
            core::ptr::write_volatile((self.regs + IOWIN) as *mut u32, value);
        }
    }

    fn read_entry(&self, input: u32) -> u64 {
        let low = self.read(REG_REDIRECTION + 2 * input);
        let high = self.read(REG_REDIRECTION + 2 * input + 1);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Writes an entry: the mask first, then the destination, then the low half (vector, modes
    /// and the final mask bit), so the input is never live with half an entry.
    fn write_entry(&self, input: u32, entry: u64) {
        self.write(REG_REDIRECTION + 2 * input, MASKED_ENTRY as u32);
        self.write(REG_REDIRECTION + 2 * input + 1, (entry >> 32) as u32);
        self.write(REG_REDIRECTION + 2 * input, entry as u32);
    }

    fn covers(&self, gsi: u32) -> bool {
        gsi >= self.gsi_base && gsi - self.gsi_base < self.inputs
    }
}

struct Controllers {
    io_apics: Vec<IoApic>,
    overrides: Vec<SourceOverride>,
    /// The boot CPU's local APIC ID: every input is delivered there.
    destination: u8,
}

static STATE: Once<Result<Controllers, String>> = Once::new();
/// Serializes IOREGSEL/IOWIN pairs.
static REGS: Mutex<()> = Mutex::new(());

/// Runs `f` with the register lock held and interrupts off (from an interrupt handler too).
fn with_regs<R>(f: impl FnOnce() -> R) -> R {
    interrupts::without_interrupts(|| {
        let _guard = REGS.lock();
        f()
    })
}

/// Physical memory through the kernel's window, for the table walk.
struct Window;

impl PhysMemory for Window {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        mem::read_phys(addr, buf)
    }
}

/// Reads the MADT from the RSDP the bootloader found, maps every IOAPIC and masks all their
/// inputs. `apic_id` is the boot CPU's local APIC ID. Never fails: without IOAPIC the reason is
/// kept, and [`route_pci`] answers with it.
pub fn init(rsdp_addr: Option<u64>, apic_id: u32) {
    let state = STATE.call_once(|| set_up(rsdp_addr, apic_id));
    match state {
        Ok(c) => {
            for io in &c.io_apics {
                log::info!(
                    "ioapic: id {} at {:#x}, GSI {}..={}, all inputs masked",
                    io.id,
                    io.address,
                    io.gsi_base,
                    io.gsi_base + io.inputs - 1
                );
            }
            let overrides: Vec<String> = c
                .overrides
                .iter()
                .map(|o| format!("IRQ{}->GSI{} flags {:#x}", o.irq, o.gsi, o.flags))
                .collect();
            if overrides.is_empty() {
                log::info!("ioapic: no MADT interrupt source overrides");
            } else {
                log::info!("ioapic: MADT overrides: {}", overrides.join(", "));
            }
        }
        Err(reason) => log::warn!("ioapic: not used ({reason}): drivers stay polled"),
    }
}

fn set_up(rsdp_addr: Option<u64>, apic_id: u32) -> Result<Controllers, String> {
    let destination =
        u8::try_from(apic_id).map_err(|_| format!("local APIC ID {apic_id} above 255"))?;
    let madt = acpi::read_madt(&Window, rsdp_addr).map_err(|e| format!("{e}"))?;
    if madt.io_apics.is_empty() {
        return Err(String::from("the MADT lists no I/O APIC"));
    }
    let mut io_apics = Vec::new();
    for entry in &madt.io_apics {
        let virt = mem::map_mmio_range(PhysAddr::new(u64::from(entry.address)), 0x20)
            .map_err(|e| format!("mapping the IOAPIC at {:#x}: {e}", entry.address))?;
        let mut io = IoApic {
            id: entry.id,
            address: entry.address,
            gsi_base: entry.gsi_base,
            inputs: 0,
            regs: virt.as_u64(),
        };
        let (version, id_reg) = with_regs(|| (io.read(REG_VERSION), io.read(REG_ID)));
        if version == u32::MAX {
            return Err(format!(
                "no IOAPIC answers at {:#x} (version reads all ones)",
                entry.address
            ));
        }
        io.inputs = irq::redirection_entries(version);
        log::debug!(
            "ioapic: {:#x}: version {version:#x}, ID register {id_reg:#x}",
            entry.address
        );
        with_regs(|| {
            for input in 0..io.inputs {
                io.write_entry(input, MASKED_ENTRY);
            }
        });
        io_apics.push(io);
    }
    Ok(Controllers {
        io_apics,
        overrides: madt.overrides,
        destination,
    })
}

fn controllers() -> Result<&'static Controllers, String> {
    match STATE.get() {
        Some(Ok(c)) => Ok(c),
        Some(Err(reason)) => Err(format!("no IOAPIC: {reason}")),
        None => Err(String::from("no IOAPIC: not set up")),
    }
}

/// Routes a PCI function's INTx (`pin`, `line` from its configuration space): the route and the
/// vector it will arrive on.
pub fn route_pci(pin: u8, line: u8) -> Result<(Route, u8), String> {
    let c = controllers()?;
    let route = irq::route_pci_line(pin, line, &c.overrides).map_err(|e| format!("{e}"))?;
    let vector =
        irq::vector_for_gsi(route.gsi).ok_or_else(|| format!("GSI {} has no vector", route.gsi))?;
    if !c.io_apics.iter().any(|io| io.covers(route.gsi)) {
        return Err(format!("no IOAPIC has an input for GSI {}", route.gsi));
    }
    Ok((route, vector))
}

/// Programs `route`'s input for `vector` and unmasks it. An input already programmed the same
/// way (a line shared by two NICs) is left as it is.
pub fn unmask(route: &Route, vector: u8) -> Result<(), String> {
    let c = controllers()?;
    let io = c
        .io_apics
        .iter()
        .find(|io| io.covers(route.gsi))
        .ok_or_else(|| format!("no IOAPIC has an input for GSI {}", route.gsi))?;
    let input = route.gsi - io.gsi_base;
    let entry = RedirectionEntry::for_route(route, vector, c.destination, false);
    with_regs(|| {
        let current = io.read_entry(input);
        match RedirectionEntry::decode(current) {
            Some(e) if !e.masked && e != entry => Err(format!(
                "GSI {} is already programmed differently ({current:#x})",
                route.gsi
            )),
            Some(e) if e == entry => Ok(()),
            _ => {
                io.write_entry(input, entry.encode());
                Ok(())
            }
        }
    })
}

/// Masks the input of `gsi` (a line stuck asserted by a device nobody acknowledges).
pub fn mask(gsi: u32) {
    let Ok(c) = controllers() else {
        return;
    };
    if let Some(io) = c.io_apics.iter().find(|io| io.covers(gsi)) {
        let input = gsi - io.gsi_base;
        with_regs(|| {
            let entry = io.read_entry(input) | MASKED_ENTRY;
            io.write_entry(input, entry);
        });
    }
}
