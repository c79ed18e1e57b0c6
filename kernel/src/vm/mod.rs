//! The virtual machines of this node: creating them, running them time-sliced, and what the
//! console shows of them.
//!
//! One host core runs everything (ARCHITECTURE.md, concurrency model): the console loop calls
//! [`VmTable::run_slice`], which gives each runnable vCPU the rest of the current 1 ms timer
//! tick. A guest that halts yields until a later tick.

mod disk;
mod exits;
mod loader;
pub mod memory;
mod nested;
mod snapshot;

pub use disk::{BlockBackend, DiskKind, DiskSpec, DISK_SLOT as DISK_PCI_SLOT};
pub use snapshot::ClockState;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;
use kernel::frames::FRAME_SIZE;
use migrate::message::CpuVendor;
use vmx::devices::uart::Uart16550;
use vmx::dirty::DirtyBitmap;
use vmx::exit::ExitCounters;
use vmx::paging::{NestedPageTable, NptFormat, Perm};
use vmx::state::VcpuState;
use vmx::svm::SvmVcpu;
use vmx::vcpu::{HostPage, Vcpu};

use crate::{clock, mem, trap};
use memory::{GuestRam, NptFrames, StructurePages};
use nested::NestedTables;

/// Smallest and largest guest RAM accepted by `vm create`.
pub const MIN_MEM_MIB: u64 = guest_abi::MIN_MEM_BYTES >> 20;
pub const MAX_MEM_MIB: u64 = 4096;
/// Longest guest console line kept before it is printed anyway.
const MAX_GUEST_LINE: usize = 512;

/// Where a VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Created, or stopped: RAM holds a freshly loaded guest, nothing runs.
    Off,
    Running,
    Paused,
    /// Stopped by the hypervisor because the guest did something it cannot continue from.
    Crashed(String),
    /// Being built by an incoming migration: memory and state arrive, nothing runs yet.
    Incoming,
}

impl core::fmt::Display for VmState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // `pad` so that width and alignment flags work in tables (`vm list`).
        f.pad(match self {
            VmState::Off => "off",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Crashed(_) => "crashed",
            VmState::Incoming => "incoming",
        })
    }
}

/// How pages written by the guest are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Dirty bits of the nested page tables (cleared and harvested).
    DirtyBits,
    /// Write-protected nested entries; the first write to each page faults and is recorded
    /// (for CPUs without accessed/dirty bits in their nested paging).
    WriteProtect,
}

impl core::fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DirtyTracking::DirtyBits => write!(f, "dirty bits (NPT D flags, harvested)"),
            DirtyTracking::WriteProtect => write!(f, "write protection (nested page faults)"),
        }
    }
}

/// What `vm create` asks for.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub mem_mib: u64,
    pub dirty_pages_per_sec: u64,
    /// The test guest's hot set: how many data pages, from the first, its rewrites cycle over
    /// (0 = all; more than it has = all, which the guest says). A migrated guest keeps its hot
    /// set (it is in the guest's memory: its boot parameters), but the destination rebuilds
    /// this spec from the migration's VM configuration, which does not carry it yet: there it
    /// reads 0 until it does (migration/glue.rs).
    pub hot_pages: u64,
    pub tracking: DirtyTracking,
    /// The MAC of the VM's network identity, announced after a migration.
    pub mac: [u8; 6],
}

/// Why a VM operation was refused.
#[derive(Debug)]
pub enum VmError {
    NoVirtualization(&'static str),
    Exists(String),
    Unknown(String),
    NotEnoughMemory {
        need_mib: u64,
        free_mib: u64,
    },
    WrongState {
        name: String,
        state: String,
        wanted: &'static str,
    },
    NoAsid,
    TrackingUnsupported,
    Setup(String),
    /// A migration holds the VM; `migrate cancel` releases it.
    Migrating(String),
}

impl core::fmt::Display for VmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmError::NoVirtualization(why) => write!(f, "cannot run VMs on this node: {why}"),
            VmError::Exists(name) => write!(f, "a VM named '{name}' already exists"),
            VmError::Unknown(name) => write!(f, "no VM named '{name}' (see 'vm list')"),
            VmError::NotEnoughMemory { need_mib, free_mib } => write!(
                f,
                "not enough memory: the VM needs about {need_mib} MiB, {free_mib} MiB are free"
            ),
            VmError::WrongState {
                name,
                state,
                wanted,
            } => write!(f, "VM '{name}' is {state}; this needs it {wanted}"),
            VmError::NoAsid => write!(f, "no free address-space ID for another VM"),
            VmError::TrackingUnsupported => write!(
                f,
                "this CPU's nested paging has no dirty bits: use track=wp"
            ),
            VmError::Setup(why) => write!(f, "{why}"),
            VmError::Migrating(name) => write!(
                f,
                "VM '{name}' is being migrated (see 'migrate status'; 'migrate cancel {name}')"
            ),
        }
    }
}

/// One virtual machine.
pub struct Vm {
    pub spec: VmSpec,
    pub state: VmState,
    ram: GuestRam,
    npt: NestedTables,
    vcpu: Box<dyn Vcpu + Send>,
    /// ASID (SVM) or VPID (VMX): tags this guest's TLB entries.
    tag: u32,
    uart: Uart16550,
    line: String,
    pub exits: ExitCounters,
    /// Timer tick at which the vCPU halted; it runs again on a later tick.
    halted_at: Option<u64>,
    /// Pages recorded by write-protect faults since the last harvest.
    wp_dirty: DirtyBitmap,
    /// Uptime (ms) when it last started running, for exit rates.
    started_ms: u64,
    /// Guest TSC = host TSC + this.
    tsc_offset: i64,
    /// Host TSC when the VM was paused: guest time stands still while paused, as with
    /// QEMU/KVM, so a guest never sees a jump after a pause (or a migration).
    paused_at_tsc: Option<u64>,
    /// A migration holds the VM: operator state changes are refused.
    pub migrating: bool,
    /// Share of vCPU time taken away (auto-converge), 0-99 percent.
    throttle: Throttle,
    /// PCI bus and virtio-blk disk (see `disk`).
    devices: disk::Platform,
}

/// Auto-converge: the VM runs only on some timer ticks, so a guest that dirties memory faster
/// than the link carries it gets less CPU time and the migration converges.
#[derive(Debug, Default, Clone, Copy)]
struct Throttle {
    percent: u8,
    /// Tick of the last decision and its outcome (a slice may be resumed several times within
    /// one tick).
    tick: u64,
    run_this_tick: bool,
    /// Accumulated run share, in percent of a tick.
    credit: u32,
}

impl Throttle {
    /// Whether the VM may run during `tick`.
    fn allows(&mut self, tick: u64) -> bool {
        if self.percent == 0 {
            return true;
        }
        if tick != self.tick {
            self.tick = tick;
            self.credit += 100 - u32::from(self.percent);
            self.run_this_tick = self.credit >= 100;
            if self.run_this_tick {
                self.credit -= 100;
            }
        }
        self.run_this_tick
    }
}

impl Vm {
    /// Guest pages.
    fn pages(&self) -> u64 {
        self.ram.size() / FRAME_SIZE
    }

    /// Handles one byte of the guest's console output: whole lines go to `out` (without the
    /// line end), or every byte as it comes when `raw` (an attached console).
    fn console_byte(&mut self, byte: u8, raw: bool, out: &mut dyn FnMut(&str, &[u8])) {
        if raw {
            out(&self.spec.name, &[byte]);
            return;
        }
        match byte {
            b'\n' => self.flush_line(out),
            b'\r' => {}
            0x20..=0x7E => {
                self.line.push(byte as char);
                if self.line.len() >= MAX_GUEST_LINE {
                    self.flush_line(out);
                }
            }
            _ => self.line.push('.'),
        }
    }

    fn flush_line(&mut self, out: &mut dyn FnMut(&str, &[u8])) {
        let line = core::mem::take(&mut self.line);
        out(&self.spec.name, line.as_bytes());
    }

    /// Stops the guest for good with a message.
    fn crash(&mut self, reason: String) {
        log::error!("vm {}: stopped: {reason}", self.spec.name);
        self.state = VmState::Crashed(reason);
    }

    /// Clears the dirty state so the next harvest reports only pages written from now on.
    pub fn dirty_reset(&mut self) {
        let mut scratch = DirtyBitmap::new(self.pages()).ok();
        self.dirty_harvest_into(scratch.as_mut());
    }

    /// Pages written since the last harvest (or reset), ascending.
    pub fn dirty_harvest(&mut self) -> Result<DirtyBitmap, String> {
        let mut bitmap = DirtyBitmap::new(self.pages()).map_err(|e| format!("{e}"))?;
        self.dirty_harvest_into(Some(&mut bitmap));
        Ok(bitmap)
    }

    fn dirty_harvest_into(&mut self, into: Option<&mut DirtyBitmap>) {
        let range = 0..self.ram.size();
        let Some(into) = into else {
            self.devices.dma_dirty.clear_all();
            return;
        };
        match self.spec.tracking {
            DirtyTracking::DirtyBits => {
                match self.npt.harvest_dirty(&mut NptFrames, range, into) {
                    // Cleared D bits only count once the nested TLB forgets the old entries.
                    Ok(flush) => {
                        if flush.is_required() {
                            self.vcpu.flush_nested_tlb();
                        }
                        flush.flushed();
                    }
                    Err(err) => log::error!("vm {}: harvest: {err}", self.spec.name),
                }
            }
            DirtyTracking::WriteProtect => {
                let _ = self.wp_dirty.swap_out(into);
                match self.npt.write_protect_range(&mut NptFrames, range) {
                    Ok(flush) => {
                        if flush.is_required() {
                            self.vcpu.flush_nested_tlb();
                        }
                        flush.flushed();
                    }
                    Err(err) => log::error!("vm {}: write-protect: {err}", self.spec.name),
                }
            }
        }
        // Pages the devices wrote (disk completions): the nested dirty bits never see those.
        if let Err(err) = into.merge(&self.devices.dma_dirty) {
            log::error!("vm {}: device dirty log: {err}", self.spec.name);
        }
        self.devices.dma_dirty.clear_all();
    }

    /// Guest-physical range of RAM and its host frames, for `vm show`.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.size()
    }

    /// Guest exits per second since it last started.
    pub fn exit_rate(&self) -> u64 {
        let ms = clock::uptime_ms().saturating_sub(self.started_ms).max(1);
        self.exits.total() * 1000 / ms
    }

    /// The guest's RIP (for `vm show`).
    pub fn rip(&self) -> u64 {
        self.vcpu.rip()
    }

    /// The VM's disk: what it was created with and its device, if it has one.
    pub fn disk(&self) -> Option<(&DiskSpec, &vmx::devices::virtio::blk::VirtioBlk)> {
        self.devices.disk.as_ref().map(|d| (&d.spec, &d.device))
    }

    /// Where the VM's disk lives, if it has one.
    pub fn disk_kind(&self) -> Option<DiskKind> {
        self.devices.disk.as_ref().map(|d| d.kind())
    }

    /// Whether the VM has a disk that exists only on this node (a RAM disk).
    pub fn has_local_disk(&self) -> bool {
        self.disk_kind() == Some(DiskKind::Local)
    }

    /// Why this VM cannot be live-migrated, if it cannot: a disk that lives only on this
    /// node would be left behind (disks on shared storage are handed over instead).
    pub fn migration_blocker(&self) -> Option<String> {
        let disk = self.devices.disk.as_ref()?;
        (disk.kind() == DiskKind::Local).then(|| {
            format!(
                "VM '{}' cannot be migrated: its disk ({}) exists only on this node (only \
                 disks on shared storage move with a VM)",
                self.spec.name, disk.spec
            )
        })
    }

    /// Disk requests not completed yet: a migration pauses the VM (the disk then takes no
    /// new requests) and waits for 0 before it saves the device state.
    pub fn disk_in_flight(&self) -> usize {
        self.devices.in_flight()
    }

    /// The digest (`guest_abi::disk`) of the VM's whole disk as the node reads it; `None`
    /// without a disk or when the disk cannot be read at once.
    pub fn disk_digest(&self) -> Option<guest_abi::disk::DiskDigest> {
        self.devices.disk.as_ref()?.digest()
    }
}

/// Longest run of a guest between two returns to the host loop: one timer tick (1 kHz).
const SLICES_PER_SEC: u64 = 1000;

/// All VMs of this node.
pub struct VmTable {
    vms: HashMap<String, Vm>,
    /// Creation order, for listing and round-robin.
    order: Vec<String>,
    next_first: usize,
    backend: Backend,
    /// VM whose console is attached to the node console.
    pub attached: Option<String>,
}

impl VmTable {
    /// Turns virtualization on if the CPU allows it.
    pub fn new(caps: &vmx::Capabilities) -> VmTable {
        let backend = Backend::enable(caps);
        match &backend {
            Backend::Unavailable(why) => log::warn!("virtualization unavailable: {why}"),
            Backend::Svm { max_asid, .. } => {
                log::info!("AMD SVM enabled ({max_asid} guest ASIDs)")
            }
            Backend::Vmx { .. } => log::info!("Intel VT-x enabled"),
        }
        VmTable {
            vms: HashMap::new(),
            order: Vec::new(),
            next_first: 0,
            backend,
            attached: None,
        }
    }

    pub fn get(&self, name: &str) -> Result<&Vm, VmError> {
        self.vms
            .get(name)
            .ok_or_else(|| VmError::Unknown(name.into()))
    }

    pub fn get_mut(&mut self, name: &str) -> Result<&mut Vm, VmError> {
        self.vms
            .get_mut(name)
            .ok_or_else(|| VmError::Unknown(name.into()))
    }

    /// VMs in creation order.
    pub fn iter(&self) -> impl Iterator<Item = &Vm> {
        self.order.iter().filter_map(|n| self.vms.get(n))
    }

    fn free_tag(&self) -> Option<u32> {
        (1..=self.backend.max_tag()).find(|t| self.vms.values().all(|vm| vm.tag != *t))
    }

    /// Creates a VM (off, guest loaded), with a virtio-blk disk if `disk` says so, after
    /// checking every refusal up front.
    pub fn create(&mut self, spec: VmSpec, disk: Option<DiskSpec>) -> Result<(), VmError> {
        self.build(spec, disk.map(|d| (d, None)), false)
    }

    /// Creates a VM whose disk `spec` is served by `backend` (a shared LUN the storage service
    /// attached).
    pub fn create_attached(
        &mut self,
        spec: VmSpec,
        disk: DiskSpec,
        backend: Box<dyn disk::BlockBackend>,
    ) -> Result<(), VmError> {
        self.build(spec, Some((disk, Some(backend))), false)
    }

    /// Creates the empty shell of a VM arriving by migration: zeroed RAM, a placeholder vCPU
    /// state, state [`VmState::Incoming`], held by the migration. Refuses as `create` does.
    pub fn create_incoming(
        &mut self,
        spec: VmSpec,
        disk: Option<(DiskSpec, Box<dyn disk::BlockBackend>)>,
    ) -> Result<(), VmError> {
        self.build(spec, disk.map(|(d, b)| (d, Some(b))), true)
    }

    /// Frames a VM of `mem_mib` would take, and the frames free now.
    pub fn memory_check(&self, mem_mib: u64) -> Result<(), VmError> {
        let pages = (mem_mib << 20) / FRAME_SIZE;
        // RAM, one NPT leaf table per 512 pages (+ upper levels), bitmaps, VMCBs, slack.
        let need_frames = pages + pages / 512 + 64;
        let free = mem::frame_stats().free;
        if need_frames > free {
            return Err(VmError::NotEnoughMemory {
                need_mib: need_frames.div_ceil(256),
                free_mib: free / 256,
            });
        }
        Ok(())
    }

    /// The CPU vendor VMs run on here, if virtualization is on.
    pub fn vendor(&self) -> Option<CpuVendor> {
        match self.backend {
            Backend::Svm { .. } => Some(CpuVendor::Amd),
            Backend::Vmx { .. } => Some(CpuVendor::Intel),
            Backend::Unavailable(_) => None,
        }
    }

    /// Whether this CPU's nested paging has dirty bits (else write protection tracks writes).
    pub fn has_dirty_bits(&self) -> bool {
        self.backend.has_dirty_bits()
    }

    fn build(
        &mut self,
        spec: VmSpec,
        disk: Option<(DiskSpec, Option<Box<dyn disk::BlockBackend>>)>,
        incoming: bool,
    ) -> Result<(), VmError> {
        if let Backend::Unavailable(why) = &self.backend {
            return Err(VmError::NoVirtualization(why));
        }
        if spec.tracking == DirtyTracking::DirtyBits && !self.backend.has_dirty_bits() {
            return Err(VmError::TrackingUnsupported);
        }
        if self.vms.contains_key(&spec.name) {
            return Err(VmError::Exists(spec.name));
        }
        let bytes = spec.mem_mib << 20;
        let pages = bytes / FRAME_SIZE;
        let disk_mib = disk.as_ref().map_or(0, |(d, _)| d.host_mib());
        self.memory_check(spec.mem_mib + disk_mib)?;
        let need_frames = pages + pages / 512 + 64;
        let tag = self.free_tag().ok_or(VmError::NoAsid)?;
        // The devices first: a disk that cannot be had refuses the VM before anything else
        // is allocated (and is freed with the platform if a later step fails).
        let backend = match disk {
            Some((spec_disk, Some(backend))) => Some((spec_disk, backend)),
            Some((spec_disk @ DiskSpec::Ram { .. }, None)) => {
                let mib = spec_disk.host_mib();
                let serial = format!("hvram-{}", spec.name);
                let ram_disk =
                    disk::RamDisk::new(mib, &serial).map_err(|_| VmError::NotEnoughMemory {
                        need_mib: need_frames.div_ceil(256) + mib,
                        free_mib: mem::frame_stats().free / 256,
                    })?;
                Some((spec_disk, Box::new(ram_disk) as Box<dyn disk::BlockBackend>))
            }
            Some((other, None)) => {
                return Err(VmError::Setup(format!(
                    "disk {other} needs its storage attached"
                )))
            }
            None => None,
        };
        let devices = disk::Platform::new(pages, backend).map_err(VmError::Setup)?;

        let mut ram = GuestRam::new(bytes).map_err(|_| VmError::NotEnoughMemory {
            need_mib: need_frames.div_ceil(256),
            free_mib: mem::frame_stats().free / 256,
        })?;
        let mut npt = match self.backend.new_nested_tables() {
            Ok(npt) => npt,
            Err(err) => {
                ram.free();
                return Err(VmError::Setup(format!("nested page table: {err}")));
            }
        };
        let mapped = ram.frames().iter().enumerate().try_for_each(|(i, &hpa)| {
            npt.map(&mut NptFrames, i as u64 * FRAME_SIZE, hpa, Perm::RWX)
        });
        let state = mapped
            .map_err(|err| format!("mapping guest RAM: {err}"))
            .and_then(|()| {
                if incoming {
                    // Memory and vCPU state arrive from the source; any valid state will do
                    // until then.
                    return Ok(VcpuState::reset_64bit(0, 0, 0));
                }
                loader::load_test_guest(&mut ram, clock::tsc_hz(), &spec)
                    .map_err(|err| format!("{err}"))
            });
        let vcpu = state.and_then(|state| self.backend.new_vcpu(tag, &npt, &state));
        let wp_dirty = DirtyBitmap::new(pages).map_err(|e| format!("{e}"));
        let (mut vcpu, wp_dirty) = match (vcpu, wp_dirty) {
            (Ok(vcpu), Ok(wp)) => (vcpu, wp),
            (vcpu, wp) => {
                let why = match (&vcpu, &wp) {
                    (Err(e), _) | (_, Err(e)) => e.clone(),
                    _ => String::new(),
                };
                if let Ok(vcpu) = vcpu {
                    vcpu.release(&mut StructurePages);
                }
                npt.teardown(&mut NptFrames).flushed();
                ram.free();
                return Err(VmError::Setup(why));
            }
        };
        // No entry runs longer than one timer tick, even if no host interrupt reaches the
        // guest (see `Vcpu::set_time_slice`).
        vcpu.set_time_slice(clock::tsc_hz() / SLICES_PER_SEC);
        let name = spec.name.clone();
        let mut vm = Vm {
            spec,
            state: if incoming {
                VmState::Incoming
            } else {
                VmState::Off
            },
            ram,
            npt,
            vcpu,
            tag,
            uart: Uart16550::new(),
            line: String::new(),
            exits: ExitCounters::new(),
            halted_at: None,
            wp_dirty,
            started_ms: 0,
            tsc_offset: 0,
            paused_at_tsc: None,
            migrating: incoming,
            throttle: Throttle::default(),
            devices,
        };
        vm.dirty_reset();
        log::info!(
            "vm {name}: {} ({} MiB, TLB tag {tag}{})",
            if incoming { "incoming" } else { "created" },
            vm.spec.mem_mib,
            match vm.devices.disk.as_ref() {
                Some(d) => format!(", {}", d.spec),
                None => String::new(),
            }
        );
        self.order.push(name.clone());
        self.vms.insert(name, vm);
        Ok(())
    }

    /// Off or crashed -> running (a fresh boot); paused -> running is `resume`.
    pub fn start(&mut self, name: &str) -> Result<(), VmError> {
        let vm = self.get_mut(name)?;
        match vm.state {
            VmState::Off => {}
            VmState::Crashed(_) => vm.reload()?,
            _ => {
                return Err(VmError::WrongState {
                    name: name.into(),
                    state: format!("{}", vm.state),
                    wanted: "off or crashed",
                })
            }
        }
        // Guest time starts at zero.
        vm.tsc_offset = -(clock::rdtsc() as i64);
        vm.vcpu.set_tsc_offset(vm.tsc_offset);
        vm.paused_at_tsc = None;
        vm.state = VmState::Running;
        vm.started_ms = clock::uptime_ms();
        vm.exits.reset();
        Ok(())
    }

    /// Running/paused/crashed -> off, with a freshly loaded guest for the next start.
    pub fn stop(&mut self, name: &str) -> Result<(), VmError> {
        let vm = self.get_mut(name)?;
        if vm.state == VmState::Off {
            return Err(VmError::WrongState {
                name: name.into(),
                state: "off".into(),
                wanted: "running, paused or crashed",
            });
        }
        vm.reload()?;
        vm.state = VmState::Off;
        Ok(())
    }

    pub fn pause(&mut self, name: &str) -> Result<(), VmError> {
        self.transition(name, VmState::Running, VmState::Paused, "running")?;
        self.get_mut(name)?.paused_at_tsc = Some(clock::rdtsc());
        Ok(())
    }

    pub fn resume(&mut self, name: &str) -> Result<(), VmError> {
        self.transition(name, VmState::Paused, VmState::Running, "paused")?;
        let vm = self.get_mut(name)?;
        if let Some(paused) = vm.paused_at_tsc.take() {
            // Take the paused interval out of guest time.
            let stopped = clock::rdtsc().saturating_sub(paused) as i64;
            vm.tsc_offset = vm.tsc_offset.wrapping_sub(stopped);
            vm.vcpu.set_tsc_offset(vm.tsc_offset);
        }
        Ok(())
    }

    fn transition(
        &mut self,
        name: &str,
        from: VmState,
        to: VmState,
        wanted: &'static str,
    ) -> Result<(), VmError> {
        let vm = self.get_mut(name)?;
        if vm.state != from {
            return Err(VmError::WrongState {
                name: name.into(),
                state: format!("{}", vm.state),
                wanted,
            });
        }
        vm.state = to;
        Ok(())
    }

    /// Removes a VM in any state and frees everything it held.
    pub fn destroy(&mut self, name: &str) -> Result<(), VmError> {
        let vm = self
            .vms
            .remove(name)
            .ok_or_else(|| VmError::Unknown(name.into()))?;
        self.order.retain(|n| n != name);
        if self.attached.as_deref() == Some(name) {
            self.attached = None;
        }
        let Vm { ram, npt, vcpu, .. } = vm;
        vcpu.release(&mut StructurePages);
        // The TLB tag is reused by a later VM, whose first entry flushes it (SvmVcpu and
        // VmxVcpu both flush on their first entry), so no stale translation to these frames
        // can survive.
        npt.teardown(&mut NptFrames).flushed();
        ram.free();
        log::info!("vm {name}: destroyed, memory freed");
        Ok(())
    }

    /// Queues bytes for a VM's serial input.
    pub fn send_input(&mut self, name: &str, bytes: &[u8]) -> Result<usize, VmError> {
        let vm = self.get_mut(name)?;
        Ok(bytes.iter().take_while(|&&b| vm.uart.push_input(b)).count())
    }

    /// Whether any VM could use the CPU now.
    pub fn any_runnable(&self) -> bool {
        let now = trap::timer_ticks();
        self.vms
            .values()
            .any(|vm| vm.state == VmState::Running && vm.halted_at.is_none_or(|t| now > t))
    }

    /// Delivers disk completions to every VM (whatever its state: a paused VM drains) and
    /// hands running VMs' queued disk requests to their backends. Called once per pass of the
    /// main loop; returns whether some disk still has requests in flight.
    pub fn poll_disks(&mut self) -> bool {
        let mut busy = false;
        for vm in self.vms.values_mut() {
            let running = vm.state == VmState::Running;
            let poll = vm.devices.poll(&mut vm.ram, running, &vm.spec.name);
            if poll.delivered {
                // The guest halted to wait: it runs at the next pass, not the next tick.
                vm.halted_at = None;
            }
            busy |= poll.in_flight;
        }
        busy
    }

    /// Gives every runnable VM the rest of the current timer tick, in turn. Guest console
    /// output goes to `out(vm name, bytes)`.
    pub fn run_slice(&mut self, out: &mut dyn FnMut(&str, &[u8])) {
        let count = self.order.len();
        if count == 0 {
            return;
        }
        let first = self.next_first % count;
        self.next_first = self.next_first.wrapping_add(1);
        for i in 0..count {
            let name = &self.order[(first + i) % count];
            let raw = self.attached.as_deref() == Some(name.as_str());
            if let Some(vm) = self.vms.get_mut(name) {
                exits::run_until_slice_end(vm, raw, out);
            }
        }
    }
}

impl Vm {
    /// Reloads the guest into RAM and resets the vCPU (a power cycle).
    fn reload(&mut self) -> Result<(), VmError> {
        // A power cycle: nothing of the old run may survive (bss and data pages start at zero).
        self.ram.clear();
        let state = loader::load_test_guest(&mut self.ram, clock::tsc_hz(), &self.spec)
            .map_err(|e| VmError::Setup(format!("{e}")))?;
        self.vcpu
            .load_state(&state)
            .map_err(|e| VmError::Setup(format!("vCPU reset: {e:?}")))?;
        self.uart = Uart16550::new();
        self.devices.reset();
        self.line.clear();
        self.halted_at = None;
        self.dirty_reset();
        Ok(())
    }
}

/// The host CPU's virtualization extension, switched on.
enum Backend {
    Svm {
        /// VM_HSAVE_PA page: must stay allocated while SVM is on.
        _save_area: HostPage,
        max_asid: u32,
    },
    Vmx {
        /// VMXON region: must stay allocated while VMX is on.
        _vmxon: HostPage,
        caps: vmx::VmxCaps,
    },
    Unavailable(&'static str),
}

impl Backend {
    fn enable(caps: &vmx::Capabilities) -> Backend {
        match &caps.virt {
            vmx::Virtualization::Svm(svm) if svm.disabled_by_firmware => {
                Backend::Unavailable("SVM is disabled by the firmware (VM_CR.SVMDIS)")
            }
            vmx::Virtualization::Svm(svm) if !svm.nested_paging => {
                Backend::Unavailable("the CPU has SVM but no nested paging")
            }
            vmx::Virtualization::Svm(svm) => match vmx::svm::enable_svm(&mut StructurePages) {
                Ok(page) => Backend::Svm {
                    _save_area: page,
                    max_asid: svm.num_asids.saturating_sub(1),
                },
                Err(_) => Backend::Unavailable("no memory for the SVM host save area"),
            },
            vmx::Virtualization::Vmx(vmx_caps) => enable_vmx(vmx_caps),
            vmx::Virtualization::None => Backend::Unavailable("the CPU has no SVM or VMX"),
        }
    }

    /// Largest TLB tag (ASID/VPID) a guest may use; tags start at 1.
    fn max_tag(&self) -> u32 {
        match self {
            Backend::Svm { max_asid, .. } => *max_asid,
            // VPIDs are 16 bits; without VPID the tag only names the VM.
            Backend::Vmx { .. } => 0xFFFF,
            Backend::Unavailable(_) => 0,
        }
    }

    fn has_dirty_bits(&self) -> bool {
        match self {
            // AMD nested paging always sets accessed/dirty bits.
            Backend::Svm { .. } => true,
            Backend::Vmx { caps, .. } => caps.ept_accessed_dirty(),
            Backend::Unavailable(_) => false,
        }
    }

    fn new_nested_tables(&self) -> Result<NestedTables, vmx::paging::PagingError> {
        match self {
            Backend::Vmx { .. } => NestedPageTable::<vmx::paging::EptFormat>::new(&mut NptFrames)
                .map(NestedTables::Ept),
            _ => NestedPageTable::<NptFormat>::new(&mut NptFrames).map(NestedTables::Npt),
        }
    }

    fn new_vcpu(
        &self,
        tag: u32,
        nested: &NestedTables,
        state: &VcpuState,
    ) -> Result<Box<dyn Vcpu + Send>, String> {
        match self {
            Backend::Svm { .. } => SvmVcpu::new(&mut StructurePages, tag, nested.root_hpa(), state)
                .map(|v| Box::new(v) as Box<dyn Vcpu + Send>)
                .map_err(|err| format!("vCPU: {err:?}")),
            Backend::Vmx { caps, .. } => new_vmx_vcpu(caps, tag, nested.root_hpa(), state),
            Backend::Unavailable(why) => Err((*why).into()),
        }
    }
}

/// Turns VMX on (VMXON) for the Intel backend.
fn enable_vmx(caps: &vmx::VmxCaps) -> Backend {
    if !caps.ept {
        return Backend::Unavailable("the CPU has VMX but no EPT");
    }
    match vmx::vtx::enable_vmx(&mut StructurePages, caps) {
        Ok(region) => Backend::Vmx {
            _vmxon: region,
            caps: *caps,
        },
        Err(err) => {
            log::error!("VMX: {err}");
            Backend::Unavailable(match err {
                vmx::vtx::VmxError::DisabledByFirmware => {
                    "VMX is disabled by the firmware (IA32_FEATURE_CONTROL)"
                }
                vmx::vtx::VmxError::OutOfMemory => "no memory for the VMXON region",
                _ => "VMXON failed (see the log line above)",
            })
        }
    }
}

/// A VMX vCPU over the EPT rooted at `ept_root`.
fn new_vmx_vcpu(
    caps: &vmx::VmxCaps,
    tag: u32,
    ept_root: u64,
    state: &VcpuState,
) -> Result<Box<dyn Vcpu + Send>, String> {
    let vpid = u16::try_from(tag).map_err(|_| format!("VPID {tag} out of range"))?;
    let eptp = vmx::paging::EptFormat::eptp(ept_root, caps.ept_accessed_dirty());
    vmx::vtx::VmxVcpu::new(&mut StructurePages, vpid, eptp, state, caps)
        .map(|v| Box::new(v) as Box<dyn Vcpu + Send>)
        .map_err(|err| format!("vCPU: {err}"))
}
