//! The hypervisor node kernel: boot, then the console.
//!
//! Walk it from [`kernel_main`]: serial and logging first (so everything after can speak),
//! descriptor tables, memory, the node configuration, CPU capabilities, the local APIC timer,
//! the IOAPIC, PCI and the cluster network interface, and finally the console loop in
//! [`shell::run`].

#![no_std]
#![no_main]

extern crate alloc;
// Links the kernel's memcpy, memmove and memset (see the crate's docs for why).
extern crate memops;

mod arch;
mod clock;
mod fault;
mod logger;
mod mem;
mod migration;
mod net;
mod pci;
mod serial;
mod shell;
mod storage;
mod trap;
mod vm;

use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::{entry_point, BootInfo};
use kernel::config::{NodeConfig, OnPanic, MAX_FILE};
use log::LevelFilter;

/// Timer interrupts per second: wakes the idle console loop often enough to drain the UART.
const TICK_HZ: u64 = 1000;

const BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    // Keep the bootloader's dynamic mappings in the upper half; the lower half is ours.
    config.mappings.dynamic_range_start = Some(0xFFFF_8000_0000_0000);
    config.kernel_stack_size = 512 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    clock::mark_boot();
    serial::init();
    logger::init(LevelFilter::Info);
    println!();
    println!("hv kernel {} booting", env!("CARGO_PKG_VERSION"));

    arch::gdt::init();
    arch::idt::init();
    arch::pic::disable();

    // The ramdisk holds the node configuration; copy it out before memory is handed out.
    let mut config_bytes = [0u8; MAX_FILE + 1];
    let config_len = copy_ramdisk(boot_info, &mut config_bytes);

    if let Err(err) = mem::init(
        boot_info.physical_memory_offset.into_option(),
        &boot_info.memory_regions,
    ) {
        panic!("memory set-up failed: {err}");
    }

    let config = load_config(&config_bytes[..config_len]);
    fault::set_exit_on_fault(config.on_panic == OnPanic::Exit);
    log::set_max_level(config.log_level);

    let caps = vmx::caps::discover(&arch::cpu::HostCpu);
    let timer = arch::apic::init(caps.x2apic, TICK_HZ, mem::map_mmio);
    x86_64::instructions::interrupts::enable();
    log::info!(
        "clock: TSC {} MHz, {} timer {} kHz, tick {} Hz",
        clock::tsc_hz() / 1_000_000,
        timer.mode,
        timer.timer_hz / 1000,
        timer.tick_hz
    );
    let frames = mem::frame_stats();
    log::info!(
        "memory: {} MiB usable, {} MiB free",
        frames.total / 256,
        frames.free / 256
    );

    // The IOAPIC routes the NICs' interrupt lines; without it they are only polled.
    arch::ioapic::init(boot_info.rsdp_addr.into_option(), timer.apic_id);

    let functions = pci::init();
    log::info!("pci: {} functions", functions.len());
    let net = net::init(&config, functions);

    let vms = vm::VmTable::new(&caps);
    let migrations = migration::Migrations::new(&config.name);
    let mut storage = storage::Storage::new(&config.name, config.iscsi_portal);
    storage.set_peers(config.peers.iter().map(|p| p.name.clone()).collect());
    shell::run(shell::Node {
        config,
        caps,
        vms,
        net,
        migrations,
        storage,
    })
}

/// Copies the bootloader ramdisk (the node configuration file) into `buf`; returns its length.
/// A ramdisk larger than the buffer is cut to `MAX_FILE + 1` bytes so the parser reports it.
fn copy_ramdisk(boot_info: &BootInfo, buf: &mut [u8]) -> usize {
    let Some(addr) = boot_info.ramdisk_addr.into_option() else {
        return 0;
    };
    let len = (boot_info.ramdisk_len as usize).min(buf.len());
    // SAFETY: the bootloader mapped the ramdisk at `addr` for `ramdisk_len` bytes, and
    // nothing has reused that memory yet (the frame allocator does not exist before this).
    let ramdisk = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    buf[..len].copy_from_slice(ramdisk);
    len
}

fn load_config(bytes: &[u8]) -> NodeConfig {
    if bytes.is_empty() {
        log::warn!("no node configuration (ramdisk): using defaults");
        return NodeConfig::default();
    }
    match NodeConfig::parse(bytes) {
        Ok((config, warnings)) => {
            for warning in warnings {
                log::warn!("node configuration: {warning}");
            }
            config
        }
        Err(err) => {
            log::error!("node configuration rejected ({err}): using defaults");
            NodeConfig::default()
        }
    }
}
