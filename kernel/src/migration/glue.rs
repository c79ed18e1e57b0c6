//! The migration state machines' view of this node's VMs: the source reads a VM, the
//! destination builds one.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use migrate::destination::DestinationHost;
use migrate::digest::MemoryDigest;
use migrate::machine::GuestError;
use migrate::message::{Hello, RefuseReason, VmConfig, PAGE_SIZE};
use migrate::source::SourceGuest;

use ::storage::LunPath;

use crate::storage::Storage;
use crate::vm::{ClockState, DirtyTracking, DiskSpec, Vm, VmSpec, VmTable};

/// Logs a local failure with its detail (the protocol carries static texts only).
fn failed(vm: &str, what: &'static str, detail: &str) -> GuestError {
    log::error!("migration of {vm}: {what}: {detail}");
    GuestError::Failed(what)
}

/// The VM being sent, looked up by name at every call (the table owns it).
pub struct SourceVm<'a> {
    pub vms: &'a mut VmTable,
    pub name: &'a str,
    /// Whether the VM ran when the migration began (it is resumed on failure only then).
    pub was_running: bool,
}

impl SourceVm<'_> {
    fn vm(&self) -> Result<&Vm, GuestError> {
        self.vms
            .get(self.name)
            .map_err(|_| GuestError::Failed("the VM disappeared"))
    }

    fn vm_mut(&mut self) -> Result<&mut Vm, GuestError> {
        self.vms
            .get_mut(self.name)
            .map_err(|_| GuestError::Failed("the VM disappeared"))
    }
}

impl SourceGuest for SourceVm<'_> {
    fn page_count(&self) -> u64 {
        self.vm().map_or(0, Vm::page_count)
    }

    fn page(&self, page: u64) -> Result<&[u8; PAGE_SIZE], GuestError> {
        self.vm()?
            .page(page)
            .ok_or(GuestError::PageOutOfRange { page })
    }

    fn harvest_dirty(&mut self) -> Result<Vec<u64>, GuestError> {
        let name = self.name;
        self.vm_mut()?
            .harvest_dirty_pages()
            .map_err(|e| failed(name, "harvesting the dirty log failed", &e))
    }

    fn save_vcpus(&mut self) -> Result<Vec<Vec<u8>>, GuestError> {
        let name = self.name;
        let state = self
            .vm()?
            .save_vcpu()
            .map_err(|e| failed(name, "saving the vCPU failed", &e))?;
        Ok(alloc::vec![state])
    }

    fn save_devices(&mut self) -> Result<Vec<(u32, Vec<u8>)>, GuestError> {
        let running = self.was_running;
        let vm = self.vm()?;
        let name = vm.spec.name.clone();
        vm.try_save_devices(running)
            .map_err(|e| failed(&name, "a device state could not be saved", &e))
    }
}

/// The VM being received: created at admission, filled page by page.
pub struct IncomingVm {
    /// Set once admitted.
    pub name: Option<String>,
    pub clock: Option<ClockState>,
    /// The digest of the copy, kept up to date page by page, and each page's current hash.
    pub digest: MemoryDigest,
    hashes: Vec<u64>,
    /// The VM's MAC, announced once it runs here.
    pub mac: [u8; 6],
    /// The VM's shared disk, attached at admission and taken over at the commit.
    pub disk: Option<LunPath>,
}

impl IncomingVm {
    pub fn new() -> IncomingVm {
        IncomingVm {
            name: None,
            clock: None,
            digest: MemoryDigest::zeroed(0),
            hashes: Vec::new(),
            mac: [0; 6],
            disk: None,
        }
    }
}

/// The destination's host: the VM table plus the copy being built.
pub struct DestinationNode<'a> {
    pub vms: &'a mut VmTable,
    pub storage: &'a mut Storage,
    pub copy: &'a mut IncomingVm,
}

impl DestinationNode<'_> {
    fn vm_mut(&mut self) -> Result<&mut Vm, GuestError> {
        let name = self
            .copy
            .name
            .as_deref()
            .ok_or(GuestError::Failed("no VM was admitted"))?;
        self.vms
            .get_mut(name)
            .map_err(|_| GuestError::Failed("the incoming VM disappeared"))
    }
}

/// Whether this node can take `config` from `peer`; nothing is created here.
fn admission(vms: &VmTable, config: &VmConfig, peer: &Hello) -> Result<VmSpec, RefuseReason> {
    let Some(vendor) = vms.vendor() else {
        return Err(RefuseReason::IncompatibleCpu {
            detail: String::from("this node cannot run VMs (no SVM or VMX)"),
        });
    };
    if vendor != peer.cpu_vendor {
        // The vCPU state is vendor-neutral, but nothing proves yet that a guest survives the
        // change of CPUID and MSRs: refuse until that is tested.
        return Err(RefuseReason::IncompatibleCpu {
            detail: format!(
                "the source runs on {:?}, this node on {vendor:?}: cross-vendor migration is not enabled",
                peer.cpu_vendor
            ),
        });
    }
    if vms.get(&config.name).is_ok() {
        return Err(RefuseReason::NameExists);
    }
    if config.vcpus != 1 {
        return Err(RefuseReason::Other(format!(
            "{} vCPUs: this node runs 1 vCPU per VM",
            config.vcpus
        )));
    }
    let mib = config.mem_bytes >> 20;
    if config.mem_bytes & ((1 << 20) - 1) != 0
        || !(crate::vm::MIN_MEM_MIB..=crate::vm::MAX_MEM_MIB).contains(&mib)
    {
        return Err(RefuseReason::Other(format!(
            "memory of {} bytes: this node takes whole MiB from {} to {}",
            config.mem_bytes,
            crate::vm::MIN_MEM_MIB,
            crate::vm::MAX_MEM_MIB
        )));
    }
    if !kernel::config::is_valid_node_name(&config.name) {
        return Err(RefuseReason::Other(String::from(
            "the VM name is not valid here",
        )));
    }
    if let Err(crate::vm::VmError::NotEnoughMemory { free_mib, .. }) = vms.memory_check(mib) {
        return Err(RefuseReason::NotEnoughMemory {
            free_bytes: free_mib << 20,
        });
    }
    Ok(VmSpec {
        name: config.name.clone(),
        mem_mib: mib,
        dirty_pages_per_sec: config.dirty_rate,
        hot_pages: config.hot_pages,
        tracking: if vms.has_dirty_bits() {
            DirtyTracking::DirtyBits
        } else {
            DirtyTracking::WriteProtect
        },
        mac: config.mac,
    })
}

impl DestinationHost for DestinationNode<'_> {
    fn admit(&mut self, config: &VmConfig, peer: &Hello) -> Result<(), RefuseReason> {
        let spec = admission(self.vms, config, peer)?;
        let pages = config.mem_bytes / PAGE_SIZE as u64;
        let mut hashes = Vec::new();
        if hashes.try_reserve_exact(pages as usize).is_err() {
            return Err(RefuseReason::NotEnoughMemory { free_bytes: 0 });
        }
        hashes.resize(pages as usize, migrate::digest::zero_page_hash());
        // The shared disk: a session to it now (it logs in while the pages arrive); the
        // reservation is taken only at the commit.
        let disk = match &config.disk {
            None => None,
            Some(shared) => {
                let path = LunPath::parse(&shared.id)
                    .map_err(|e| RefuseReason::Other(format!("disk '{}': {e}", shared.id)))?;
                self.storage
                    .attach(&path, &config.name)
                    .map_err(|e| RefuseReason::Other(format!("{e}")))?;
                let Some(backend) = self.storage.backend(&path, shared.sectors) else {
                    self.storage.detach(&path);
                    return Err(RefuseReason::Other(format!("disk {path}: not attached")));
                };
                Some((path, backend))
            }
        };
        let path = disk.as_ref().map(|(path, _)| path.clone());
        let created = self.vms.create_incoming(
            spec,
            disk.map(|(path, backend)| (DiskSpec::Iscsi(path), backend)),
        );
        if let Err(e) = created {
            if let Some(path) = path.as_ref() {
                self.storage.detach(path);
            }
            return Err(RefuseReason::Other(format!("{e}")));
        }
        self.copy.disk = path;
        self.copy.name = Some(config.name.clone());
        self.copy.mac = config.mac;
        self.copy.digest = MemoryDigest::zeroed(pages);
        self.copy.hashes = hashes;
        Ok(())
    }

    fn write_page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), GuestError> {
        if !self.vm_mut()?.write_page(page, data) {
            return Err(GuestError::PageOutOfRange { page });
        }
        let new = migrate::digest::content_hash(data);
        if let Some(old) = self.copy.hashes.get_mut(page as usize) {
            self.copy.digest.replace(page, *old, new);
            *old = new;
        }
        Ok(())
    }

    fn load_vcpu(&mut self, vcpu: u32, state: &[u8]) -> Result<(), GuestError> {
        if vcpu != 0 {
            return Err(GuestError::NoSuchVcpu { vcpu });
        }
        let vm = self.vm_mut()?;
        let name = vm.spec.name.clone();
        vm.load_vcpu(state)
            .map_err(|e| failed(&name, "the vCPU state was refused", &e))
    }

    fn load_device(&mut self, device: u32, state: &[u8]) -> Result<(), GuestError> {
        let vm = self.vm_mut()?;
        let name = vm.spec.name.clone();
        if let Some(clock) = vm
            .load_device(device, state)
            .map_err(|e| failed(&name, "a device state was refused", &e))?
        {
            self.copy.clock = Some(clock);
        }
        Ok(())
    }
}
