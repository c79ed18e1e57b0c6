//! What a migration reads from a VM on the source and writes into its copy on the destination:
//! pages, the dirty log, the vCPU state and the device state (the serial port, the guest's
//! clock, the PCI host and the virtio-blk device).
//!
//! The virtio-blk device saves only once its requests have drained (the VM paused, which stops
//! the disk from taking new ones, then `Vm::disk_in_flight` reaching 0). Its disk itself is not
//! migrated: a VM with a RAM disk is refused (`Vm::migration_blocker`); a disk on shared
//! storage will be handed over instead.
//! Guest time across a move: see `kernel::guest_clock`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use kernel::frames::FRAME_SIZE;
use vmx::devices::pci::PciHost;
use vmx::devices::uart::Uart16550;
use vmx::devices::virtio::blk::VirtioBlk;
use vmx::state::VcpuState;

use super::{Vm, VmState};
use crate::clock;
pub use kernel::guest_clock::ClockState;

/// Device ids of the device-state messages (opaque to the protocol).
pub const DEVICE_COM1: u32 = 1;
pub const DEVICE_CLOCK: u32 = 2;
/// The guest's console line not printed yet (no line end seen): it travels with the VM, so a
/// line the guest was writing when it was paused is printed whole on the destination instead
/// of being cut in two (or lost) at the switchover.
pub const DEVICE_CONSOLE_LINE: u32 = 3;
/// The virtio-blk device (`VirtioBlk::save`), present when the VM has a disk.
pub const DEVICE_VIRTIO_BLK: u32 = 4;
/// The PCI host: configuration address latch and host bridge (`PciHost::save`).
pub const DEVICE_PCI_HOST: u32 = 5;

impl Vm {
    /// Guest pages.
    pub fn page_count(&self) -> u64 {
        self.ram.size() / FRAME_SIZE
    }

    /// Guest page `page` where it lies in RAM (None past the end of RAM).
    pub fn page(&self, page: u64) -> Option<&[u8; 4096]> {
        self.ram.page_bytes(usize::try_from(page).ok()?)
    }

    /// Overwrites guest page `page`; false past the end of RAM.
    pub fn write_page(&mut self, page: u64, data: &[u8; 4096]) -> bool {
        page.checked_mul(FRAME_SIZE)
            .is_some_and(|gpa| self.ram.write(gpa, data))
    }

    /// Pages written since the previous harvest, ascending; clears the log.
    pub fn harvest_dirty_pages(&mut self) -> Result<Vec<u64>, String> {
        Ok(self.dirty_harvest()?.iter().collect())
    }

    /// The vCPU's state, encoded (vmx `VcpuState::encode`).
    pub fn save_vcpu(&self) -> Result<Vec<u8>, String> {
        let state = self
            .vcpu
            .save_state()
            .map_err(|e| format!("saving the vCPU: {e:?}"))?;
        let mut out = Vec::new();
        state.encode(&mut out);
        Ok(out)
    }

    /// Loads an encoded vCPU state (from another host: every field is checked by the decoder
    /// and the backend).
    pub fn load_vcpu(&mut self, bytes: &[u8]) -> Result<(), String> {
        let state = VcpuState::decode(bytes).map_err(|e| format!("vCPU state: {e:?}"))?;
        self.vcpu
            .load_state(&state)
            .map_err(|e| format!("loading the vCPU state: {e:?}"))
    }

    /// The device models' state as (device id, bytes). Called with the VM paused; `running`
    /// says whether it ran before the migration paused it. Refused while disk requests are in
    /// flight (wait for [`Vm::disk_in_flight`] to reach 0 first).
    pub fn try_save_devices(&self, running: bool) -> Result<Vec<(u32, Vec<u8>)>, String> {
        let mut devices = self.save_platform(running);
        if let Some(disk) = self.devices.disk.as_ref() {
            if disk.in_flight() > 0 {
                return Err(format!(
                    "{} disk requests are still in flight",
                    disk.in_flight()
                ));
            }
            let mut blk = Vec::new();
            disk.device
                .save(&mut blk)
                .map_err(|e| format!("virtio-blk: {e}"))?;
            devices.push((DEVICE_VIRTIO_BLK, blk));
        }
        Ok(devices)
    }

    /// Every device but the disk: they always save.
    fn save_platform(&self, running: bool) -> Vec<(u32, Vec<u8>)> {
        let mut com1 = Vec::new();
        self.uart.save(&mut com1);
        let now = self.paused_at_tsc.unwrap_or_else(clock::rdtsc);
        let clock = ClockState {
            guest_tsc: now.wrapping_add_signed(self.tsc_offset),
            tsc_hz: clock::tsc_hz(),
            running,
        };
        let mut pci = Vec::new();
        self.devices.pci.save(&mut pci);
        alloc::vec![
            (DEVICE_COM1, com1),
            (DEVICE_CLOCK, clock.encode()),
            (DEVICE_CONSOLE_LINE, self.line.as_bytes().to_vec()),
            (DEVICE_PCI_HOST, pci),
        ]
    }

    /// Loads one device model's state; the clock state is returned for [`Vm::finish_incoming`].
    pub fn load_device(&mut self, device: u32, bytes: &[u8]) -> Result<Option<ClockState>, String> {
        match device {
            DEVICE_COM1 => {
                self.uart = Uart16550::restore(bytes).map_err(|e| format!("COM1 state: {e:?}"))?;
                Ok(None)
            }
            DEVICE_CLOCK => ClockState::decode(bytes).map(Some).map_err(String::from),
            DEVICE_CONSOLE_LINE => {
                // What `console_byte` keeps: printable ASCII, shorter than a flushed line.
                if bytes.len() >= super::MAX_GUEST_LINE
                    || !bytes.iter().all(|b| (0x20..=0x7E).contains(b))
                {
                    return Err(String::from("console line state is not a partial line"));
                }
                self.line = bytes.iter().map(|&b| b as char).collect();
                Ok(None)
            }
            DEVICE_PCI_HOST => {
                self.devices.pci =
                    PciHost::restore(bytes).map_err(|e| format!("PCI host state: {e}"))?;
                Ok(None)
            }
            DEVICE_VIRTIO_BLK => {
                let Some(disk) = self.devices.disk.as_mut() else {
                    return Err(String::from(
                        "virtio-blk state for a VM that has no disk on this node",
                    ));
                };
                disk.device = VirtioBlk::restore(*disk.device.config(), bytes)
                    .map_err(|e| format!("virtio-blk state: {e}"))?;
                Ok(None)
            }
            other => Err(format!("unknown device {other}")),
        }
    }

    /// Ends an incoming migration: the guest TSC continues from where the source paused it,
    /// and the VM runs if it ran on the source (otherwise it stays paused).
    pub fn finish_incoming(&mut self, clock: ClockState) {
        let now = clock::rdtsc();
        self.tsc_offset = clock.guest_tsc.wrapping_sub(now) as i64;
        self.vcpu.set_tsc_offset(self.tsc_offset);
        self.migrating = false;
        self.halted_at = None;
        self.exits.reset();
        self.started_ms = clock::uptime_ms();
        if clock.running {
            self.paused_at_tsc = None;
            self.state = VmState::Running;
        } else {
            self.paused_at_tsc = Some(now);
            self.state = VmState::Paused;
        }
    }

    /// Sets the auto-converge throttle (0 lifts it).
    pub fn set_throttle(&mut self, percent: u8) {
        self.throttle.percent = percent.min(99);
        self.throttle.credit = 0;
    }

    /// The auto-converge throttle in percent.
    pub fn throttle_percent(&self) -> u8 {
        self.throttle.percent
    }
}
