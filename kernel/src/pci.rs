//! PCI configuration space through configuration mechanism #1 (I/O ports 0xCF8/0xCFC), and the
//! list of functions found at boot. The scan itself (buses behind bridges, BAR sizing) is
//! `net::pci`, tested on the host; this is the port I/O under it.

use alloc::vec::Vec;

use net::pci::{self, ConfigSpace, PciAddress, PciFunction};
use spin::{Mutex, Once};
use x86_64::instructions::port::Port;

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Serializes the address/data port pair (one access = two port operations).
static PORTS: Mutex<()> = Mutex::new(());
static FUNCTIONS: Once<Vec<PciFunction>> = Once::new();

/// Configuration mechanism #1.
pub struct PortConfig;

impl ConfigSpace for PortConfig {
    fn read32(&mut self, addr: PciAddress, offset: u8) -> u32 {
        let _guard = PORTS.lock();
        // SAFETY: 0xCF8/0xCFC are the PC's PCI configuration ports; writing an enabled
        // configuration address and reading the data port has no effect beyond the read, and
        // the lock keeps the two operations together.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(addr.mechanism1(offset));
            Port::<u32>::new(CONFIG_DATA).read()
        }
    }

    fn write32(&mut self, addr: PciAddress, offset: u8, value: u32) {
        let _guard = PORTS.lock();
        // SAFETY: as in `read32`; callers (the scan and drivers) write only registers whose
        // effect they own: BAR probes restored at once, command bits of their own device.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(addr.mechanism1(offset));
            Port::<u32>::new(CONFIG_DATA).write(value);
        }
    }
}

/// Scans the buses once (at boot); returns what was found.
pub fn init() -> &'static [PciFunction] {
    FUNCTIONS.call_once(|| pci::scan(&mut PortConfig))
}

/// The functions found at boot (empty before [`init`]).
pub fn functions() -> &'static [PciFunction] {
    FUNCTIONS.get().map_or(&[], Vec::as_slice)
}
