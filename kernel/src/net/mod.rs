//! Host networking glue: finds the cluster NIC among the PCI functions, starts its driver over
//! the kernel's MMIO and DMA memory, puts a `net::stack::Stack` on it with the configured
//! address, and gives the console loop a bounded poll and the output of its jobs (`ping`,
//! `net bench`). Every node serves the bench port ([`::net::bench::PORT`]).
//!
//! The second NIC, if any, is the storage network's: its address is static or leased by DHCP
//! (`storage_addr = dhcp`); a lease gained or lost is logged.
//!
//! An e1000 is interrupt-driven when the IOAPIC can route its PCI interrupt line ([`irq`]): a
//! frame that arrives while the CPU halts wakes it at once instead of at the next timer tick.
//! The loop still polls; the interrupt only ends the halt. virtio-net NICs are polled only (their
//! INTx stays disabled). `net show` says which and why.
//!
//! Blocking TCP ([`Net::send_text`], over [`TcpTransport`]): the call polls the interface and
//! between two polls calls the caller's `idle` hook, which runs the VM slices (and halts until
//! the next tick when nothing is runnable): VMs are never stalled by more than one poll. The
//! console itself waits for the call, which every timeout bounds.

mod hw;
pub mod irq;
mod pipe;

pub use pipe::SocketPipe;

use alloc::format;
use alloc::string::String;
use core::fmt::Write;
use core::time::Duration;

use ::net::addr::{Addressing, Ipv4, Ipv4Net};
use ::net::bench::Limit;
use ::net::dhcp::DhcpState;
use ::net::e1000::{self, Counters, E1000Config, MacSource, E1000};
use ::net::neighbors::Neighbor;
use ::net::pci::{PciAddress, PciFunction};
use ::net::smoltcp::phy::{Device, DeviceCapabilities, RxToken, TxToken};
use ::net::smoltcp::time::Instant;
use ::net::stack::{PingError, Stack, TcpTransport, TxFlush};
use ::net::transport::{Transport, TransportError};
use ::net::virtio::{self, VirtioNet};
use ::net::virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};
use ::net::virtio_drivers::transport::pci::PciTransport;
use kernel::config::NodeConfig;
use kernel::irq::Route;

use crate::arch::ioapic;
use crate::{clock, pci};
use hw::{BarMmio, DmaMemory, KernelHal, PortCam};

/// Frames received per poll at most: bounds the time one poll takes under a flood.
const RX_BUDGET: usize = 64;
/// Timeouts of [`Net::send_text`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Minimum interval between two e1000 interrupts (ITR): at most 10 000 per second, so a NIC at
/// line rate on real hardware (80 000 frames/s) cannot drown the CPU in interrupts; the first
/// interrupt after a quiet spell is not delayed. Measured under QEMU (two nodes, `net bench`
/// and `ping`, two interleaved rounds each): ITR 0, 30 us and 100 us gave the same throughput
/// within noise (139-144 MB/s) and ping medians of 0.41-0.50 ms; the receiver takes about
/// 4 000 interrupts/s during a bench either way (the line stays asserted until the handler
/// reads ICR, and the loop drains the ring in batches), so the cap does not bind there.
const E1000_THROTTLE: Duration = Duration::from_micros(100);

type Virtio = VirtioNet<KernelHal, PciTransport, DmaMemory>;

/// A NIC of either model, one smoltcp `phy::Device`.
pub enum Nic {
    E1000(E1000<BarMmio, DmaMemory>),
    Virtio(alloc::boxed::Box<Virtio>),
}

/// Either driver's receive token.
pub enum NicRx<'a> {
    E1000(<E1000<BarMmio, DmaMemory> as Device>::RxToken<'a>),
    Virtio(<Virtio as Device>::RxToken<'a>),
}

/// Either driver's transmit token.
pub enum NicTx<'a> {
    E1000(<E1000<BarMmio, DmaMemory> as Device>::TxToken<'a>),
    Virtio(<Virtio as Device>::TxToken<'a>),
}

impl RxToken for NicRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match self {
            NicRx::E1000(t) => t.consume(f),
            NicRx::Virtio(t) => t.consume(f),
        }
    }
}

impl TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        match self {
            NicTx::E1000(t) => t.consume(len, f),
            NicTx::Virtio(t) => t.consume(len, f),
        }
    }
}

impl TxFlush for Nic {
    fn flush_tx(&mut self) {
        match self {
            Nic::E1000(d) => d.flush_tx(),
            Nic::Virtio(d) => d.flush_tx(),
        }
    }
}

impl Device for Nic {
    type RxToken<'a> = NicRx<'a>;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, now: Instant) -> Option<(NicRx<'_>, NicTx<'_>)> {
        match self {
            Nic::E1000(d) => d
                .receive(now)
                .map(|(r, t)| (NicRx::E1000(r), NicTx::E1000(t))),
            Nic::Virtio(d) => d
                .receive(now)
                .map(|(r, t)| (NicRx::Virtio(r), NicTx::Virtio(t))),
        }
    }

    fn transmit(&mut self, now: Instant) -> Option<NicTx<'_>> {
        match self {
            Nic::E1000(d) => d.transmit(now).map(NicTx::E1000),
            Nic::Virtio(d) => d.transmit(now).map(NicTx::Virtio),
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        match self {
            Nic::E1000(d) => d.capabilities(),
            Nic::Virtio(d) => d.capabilities(),
        }
    }
}

impl Nic {
    fn mac(&self) -> [u8; 6] {
        match self {
            Nic::E1000(d) => d.mac(),
            Nic::Virtio(d) => d.mac(),
        }
    }

    fn link_up(&self) -> bool {
        match self {
            Nic::E1000(d) => d.link_up(),
            Nic::Virtio(d) => d.link_up(),
        }
    }

    fn counters(&mut self) -> Counters {
        match self {
            Nic::E1000(d) => d.counters(),
            Nic::Virtio(d) => d.counters(),
        }
    }

    fn ring_sizes(&self) -> (usize, usize) {
        match self {
            Nic::E1000(d) => d.ring_sizes(),
            Nic::Virtio(d) => d.ring_sizes(),
        }
    }
}

/// Which driver a PCI function takes, with the model name `net show` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    E1000,
    Virtio,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::E1000 => "e1000",
            Driver::Virtio => "virtio",
        }
    }
}

fn driver_for(f: &PciFunction) -> Option<(Driver, &'static str)> {
    e1000::model(f.vendor_id, f.device_id)
        .map(|m| (Driver::E1000, m))
        .or_else(|| virtio::model(f.vendor_id, f.device_id).map(|m| (Driver::Virtio, m)))
}

/// The cluster-network interface.
pub struct Iface {
    /// `eth0` (cluster network) or `eth1` (storage network).
    pub name: &'static str,
    /// `cluster network` or `storage network`.
    pub role: &'static str,
    /// The configuration key of its address.
    pub addr_key: &'static str,
    pub pci: PciAddress,
    /// `e1000` or `virtio`.
    pub driver: &'static str,
    pub model: &'static str,
    pub bar: u64,
    pub mac_source: MacSource,
    /// Interrupt-driven, or why not.
    pub irq: IrqMode,
    stack: Stack<Nic>,
}

/// Whether a NIC's interrupts wake the node.
pub enum IrqMode {
    /// Polled only (at every pass of the loop and every timer tick), and why.
    Polled(String),
    /// The NIC raises `route`'s IOAPIC input, on `vector`; [`irq::taken`]`(slot)` counts.
    Interrupts {
        route: Route,
        vector: u8,
        slot: usize,
    },
}

impl core::fmt::Display for IrqMode {
    /// `1234 taken (vector 0x4b, GSI 11, ...)`, or `none, polled only: <why>`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IrqMode::Polled(why) => write!(f, "none, polled only: {why}"),
            IrqMode::Interrupts {
                route,
                vector,
                slot,
            } => {
                write!(
                    f,
                    "{} taken (vector {vector:#04x}, {route})",
                    irq::taken(*slot)
                )?;
                let (unclaimed, stuck) = irq::unclaimed(route.gsi);
                if stuck {
                    write!(
                        f,
                        "; line masked after {} interrupts in a row no NIC claimed (another \
                         device holds it?): polled only",
                        irq::STUCK_LIMIT
                    )
                } else if unclaimed > 0 {
                    write!(f, "; {unclaimed} on the line unclaimed")
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// What `net show` prints about an interface.
pub struct IfaceStatus {
    pub mac: [u8; 6],
    pub link_up: bool,
    pub addr: Option<Ipv4Net>,
    /// The DHCP client's state (`None`: the address is static).
    pub dhcp: Option<DhcpState>,
    pub counters: Counters,
    pub rings: (usize, usize),
}

/// The node's networking: the cluster interface (or the reason there is none) and, if the
/// node has a second NIC, the storage interface.
pub struct Net {
    iface: Option<Iface>,
    missing: String,
    storage: Option<Iface>,
}

/// Where the ping job is, for the console loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Idle,
    Running,
    /// It ended during this call (its summary was printed).
    Finished,
}

/// The smoltcp clock: microseconds since boot.
pub fn now() -> Instant {
    Instant::from_micros(clock::uptime_us() as i64)
}

/// Finds and starts the cluster NIC. Never fails: without a usable NIC the node runs without
/// networking, and `net show` says why.
pub fn init(config: &NodeConfig, functions: &[PciFunction]) -> Net {
    let nics: alloc::vec::Vec<(&PciFunction, (Driver, &'static str))> = functions
        .iter()
        .filter_map(|f| driver_for(f).map(|m| (f, m)))
        .collect();
    let mut net = match nics.first() {
        Some(&(function, model)) => {
            let addressing = config.cluster_addr.map(Addressing::Static);
            match start(
                function,
                model,
                "eth0",
                CLUSTER,
                addressing,
                config.nic_interrupts,
            ) {
                Ok(mut iface) => {
                    iface.stack.start_bench_listener();
                    Net {
                        iface: Some(iface),
                        missing: String::new(),
                        storage: None,
                    }
                }
                Err(reason) => Net::without(reason),
            }
        }
        None => Net::without(no_nic_reason(functions)),
    };
    // The second NIC (in PCI order) is the storage network's.
    if let Some(&(function, model)) = nics.get(1) {
        match start(
            function,
            model,
            "eth1",
            STORAGE,
            config.storage_addr,
            config.nic_interrupts,
        ) {
            Ok(iface) => net.storage = Some(iface),
            Err(reason) => log::warn!("net: storage network interface: {reason}"),
        }
    }
    net
}

fn log_iface(iface: &Iface) {
    log::info!(
        "net: {} ({}) {} {} at {}, MAC {} ({}), {}",
        iface.name,
        iface.role,
        iface.driver,
        iface.model,
        iface.pci,
        e1000::Mac(iface.stack.mac()),
        mac_source_name(iface.mac_source),
        match (iface.stack.address(), iface.stack.dhcp()) {
            (_, Some(_)) => String::from("address by DHCP"),
            (Some(a), None) => format!("{a}"),
            (None, None) => String::from("no address"),
        }
    );
}

fn no_nic_reason(functions: &[PciFunction]) -> String {
    let others: String = functions
        .iter()
        .filter(|f| f.class == 0x02)
        .map(|f| format!(" {} {:04x}:{:04x}", f.addr, f.vendor_id, f.device_id))
        .collect();
    if others.is_empty() {
        String::from("no network controller on the PCI buses")
    } else {
        format!("no driver for the network controller(s){others} (e1000 and virtio-net only)")
    }
}

/// An interface's role: what `net show` calls it, and its address's configuration key.
type Role = (&'static str, &'static str);
const CLUSTER: Role = ("cluster network", "cluster_addr");
const STORAGE: Role = ("storage network", "storage_addr");

impl Net {
    fn without(reason: String) -> Net {
        log::warn!("net: no network interface: {reason}");
        Net {
            iface: None,
            missing: reason,
            storage: None,
        }
    }
}

fn mac_source_name(source: MacSource) -> &'static str {
    match source {
        MacSource::Registers => "from the receive-address registers",
        MacSource::Eeprom => "from the EEPROM",
    }
}

fn start(
    function: &PciFunction,
    (driver, model): (Driver, &'static str),
    name: &'static str,
    role: Role,
    addressing: Option<Addressing>,
    interrupts: bool,
) -> Result<Iface, String> {
    let (nic, mac_source, bar_addr, irq) = match driver {
        Driver::E1000 => start_e1000(function, interrupts)?,
        Driver::Virtio => {
            let (nic, mac_source, bar) = start_virtio(function)?;
            let why = String::from("the virtio-net driver is polled (its INTx stays disabled)");
            (nic, mac_source, bar, IrqMode::Polled(why))
        }
    };
    let mac = nic.mac();
    let mut stack = Stack::new(nic, mac, None, now(), clock::rdtsc());
    stack.set_addressing(addressing);
    let iface = Iface {
        name,
        role: role.0,
        addr_key: role.1,
        pci: function.addr,
        driver: driver.name(),
        model,
        bar: bar_addr,
        mac_source,
        irq,
        stack,
    };
    log_iface(&iface);
    Ok(iface)
}

/// Starts the virtio driver on the modern PCI transport (its capabilities name the BARs).
fn start_virtio(function: &PciFunction) -> Result<(Nic, MacSource, u64), String> {
    let command = ::net::pci::enable_device(&mut pci::PortConfig, function.addr, true);
    log::debug!("net: {} command register {command:#06x}", function.addr);
    let mut root = PciRoot::new(PortCam);
    let df = DeviceFunction {
        bus: function.addr.bus,
        device: function.addr.device,
        function: function.addr.function,
    };
    let transport = PciTransport::new::<KernelHal, _>(&mut root, df)
        .map_err(|e| format!("virtio transport: {e}"))?;
    let mem = DmaMemory::alloc(virtio::region_bytes())
        .ok_or("no contiguous memory for the packet buffers")?;
    // On failure the buffers' frames and the register mappings stay allocated: a boot-time
    // loss, once.
    let nic = VirtioNet::new(transport, mem).map_err(|e| format!("virtio-net: {e}"))?;
    // The last memory BAR: QEMU's virtio structures (BAR 4), after the MSI-X table (BAR 1).
    let bar = function
        .bars
        .iter()
        .rev()
        .flatten()
        .find_map(|b| b.memory_addr())
        .unwrap_or(0);
    // The MAC comes from the device's configuration registers.
    Ok((
        Nic::Virtio(alloc::boxed::Box::new(nic)),
        MacSource::Registers,
        bar,
    ))
}

fn start_e1000(
    function: &PciFunction,
    interrupts: bool,
) -> Result<(Nic, MacSource, u64, IrqMode), String> {
    let bar = function
        .bars
        .first()
        .copied()
        .flatten()
        .and_then(|b| b.memory_addr().map(|addr| (addr, b.size())))
        .ok_or_else(|| format!("{} has no memory BAR 0", function.addr))?;
    let (bar_addr, bar_size) = bar;
    let map_len = (bar_size as usize).max(e1000::regs::BAR_SIZE);
    let command = ::net::pci::enable_device(&mut pci::PortConfig, function.addr, true);
    log::debug!("net: {} command register {command:#06x}", function.addr);
    let regs = BarMmio::map(bar_addr, map_len).map_err(|e| format!("BAR 0: {e}"))?;
    let irq_window = regs.clone();

    let rings = E1000Config::default();
    let rx = DmaMemory::alloc(e1000::region_bytes(rings.rx_descriptors))
        .ok_or("no contiguous memory for the receive ring")?;
    let Some(tx) = DmaMemory::alloc(e1000::region_bytes(rings.tx_descriptors)) else {
        rx.free();
        return Err("no contiguous memory for the transmit ring".into());
    };
    // On failure the rings' frames and the BAR mapping stay allocated: a boot-time loss, once.
    let mut nic = E1000::new(regs, rx, tx, rings).map_err(|e| format!("e1000: {e}"))?;
    let mac_source = nic.mac_source();
    let irq = if interrupts {
        enable_e1000_interrupts(function, &mut nic, irq_window)
    } else {
        IrqMode::Polled(String::from(
            "off in the node configuration (nic_interrupts = off)",
        ))
    };
    Ok((Nic::E1000(nic), mac_source, bar_addr, irq))
}

/// Routes the e1000's INTx through the IOAPIC and unmasks its receive interrupts; on any
/// obstacle the NIC stays polled only, and the reason is kept for `net show`.
fn enable_e1000_interrupts(
    function: &PciFunction,
    nic: &mut E1000<BarMmio, DmaMemory>,
    window: BarMmio,
) -> IrqMode {
    let polled = |why: String| {
        log::warn!("net: {}: polled only: {why}", function.addr);
        IrqMode::Polled(why)
    };
    let (route, vector) = match ioapic::route_pci(function.interrupt_pin, function.interrupt_line) {
        Ok(found) => found,
        Err(why) => return polled(why),
    };
    let Some(slot) = irq::attach(window, vector) else {
        return polled(String::from("no free NIC interrupt slot"));
    };
    nic.enable_interrupts(E1000_THROTTLE);
    ::net::pci::set_intx(&mut pci::PortConfig, function.addr, true);
    if let Err(why) = ioapic::unmask(&route, vector) {
        nic.disable_interrupts();
        ::net::pci::set_intx(&mut pci::PortConfig, function.addr, false);
        return polled(why);
    }
    log::info!(
        "net: {}: interrupts on vector {vector:#04x}, {route}",
        function.addr
    );
    IrqMode::Interrupts {
        route,
        vector,
        slot,
    }
}

fn iface_status(iface: &mut Iface) -> IfaceStatus {
    let addr = iface.stack.address();
    let dhcp = iface.stack.dhcp().cloned();
    let nic = iface.stack.device_mut();
    IfaceStatus {
        mac: nic.mac(),
        link_up: nic.link_up(),
        addr,
        dhcp,
        counters: nic.counters(),
        rings: nic.ring_sizes(),
    }
}

impl Net {
    /// The interface, if there is one.
    pub fn iface(&self) -> Option<&Iface> {
        self.iface.as_ref()
    }

    /// The cluster interface's stack, for the connections of other modules (migration).
    pub fn cluster_stack(&mut self) -> Option<&mut Stack<Nic>> {
        self.iface.as_mut().map(|i| &mut i.stack)
    }

    /// Sends one raw Ethernet frame on the cluster NIC (announcements); false if the transmit
    /// ring is full or there is no NIC.
    pub fn send_cluster_frame(&mut self, frame: &[u8]) -> bool {
        let Some(iface) = self.iface.as_mut() else {
            return false;
        };
        match iface.stack.device_mut().transmit(now()) {
            Some(token) => {
                token.consume(frame.len(), |buf| buf.copy_from_slice(frame));
                iface.stack.device_mut().flush_tx();
                true
            }
            None => false,
        }
    }

    /// Why there is no interface.
    pub fn missing_reason(&self) -> &str {
        &self.missing
    }

    /// One bounded round of network work. True if frames are probably still waiting (poll
    /// again before sleeping).
    pub fn poll(&mut self) -> bool {
        let mut more = false;
        for iface in self.iface.iter_mut().chain(self.storage.iter_mut()) {
            let before = iface.stack.address();
            more |= iface.stack.poll(now(), RX_BUDGET).more;
            let after = iface.stack.address();
            if after != before {
                match after {
                    Some(addr) => log::info!("net: {} leased {addr} by DHCP", iface.name),
                    None => log::warn!("net: {} lost its DHCP lease", iface.name),
                }
            }
        }
        more
    }

    /// Whether the cluster NIC wakes the node when a frame arrives (else it is polled at
    /// each pass and timer tick).
    pub fn cluster_interrupts(&self) -> bool {
        self.iface
            .as_ref()
            .is_some_and(|i| matches!(i.irq, IrqMode::Interrupts { .. }))
    }

    /// The storage interface's stack, for the connections of other modules (iSCSI).
    pub fn storage_stack(&mut self) -> Option<&mut Stack<Nic>> {
        self.storage.as_mut().map(|i| &mut i.stack)
    }

    /// The storage-network interface, if the node has one.
    pub fn storage(&self) -> Option<&Iface> {
        self.storage.as_ref()
    }

    /// The storage interface's details and counters.
    pub fn storage_status(&mut self) -> Option<IfaceStatus> {
        self.storage.as_mut().map(iface_status)
    }

    /// The storage interface's neighbor cache.
    pub fn storage_neighbors(&self) -> alloc::vec::Vec<Neighbor> {
        self.storage
            .as_ref()
            .map(|i| i.stack.neighbors(now()))
            .unwrap_or_default()
    }

    /// Interface details and counters.
    pub fn status(&mut self) -> Option<IfaceStatus> {
        self.iface.as_mut().map(iface_status)
    }

    /// The neighbor cache.
    pub fn neighbors(&self) -> alloc::vec::Vec<Neighbor> {
        self.iface
            .as_ref()
            .map(|i| i.stack.neighbors(now()))
            .unwrap_or_default()
    }

    /// Applies a new cluster address (from `config set`).
    pub fn set_address(&mut self, addr: Option<Ipv4Net>) {
        if let Some(iface) = self.iface.as_mut() {
            iface.stack.set_address(addr);
        }
    }

    /// Applies a new storage-network address or DHCP (from `config set`).
    pub fn set_storage_address(&mut self, addressing: Option<Addressing>) {
        if let Some(iface) = self.storage.as_mut() {
            iface.stack.set_addressing(addressing);
        }
    }

    /// Starts a ping job; returns the header line.
    pub fn start_ping(&mut self, target: Ipv4, label: &str, count: u32) -> Result<String, String> {
        let Some(iface) = self.iface.as_mut() else {
            return Err(format!("no network interface: {}", self.missing));
        };
        iface
            .stack
            .start_ping(target, label, count, now())
            .map_err(|e: PingError| format!("{e}"))
    }

    /// True while a ping job runs.
    pub fn ping_active(&self) -> bool {
        self.iface.as_ref().is_some_and(|i| i.stack.ping_active())
    }

    /// Prints what the ping job has to say; at its end the summary too.
    pub fn ping_output(&mut self, out: &mut dyn Write) -> JobState {
        let Some(iface) = self.iface.as_mut() else {
            return JobState::Idle;
        };
        if !iface.stack.ping_active() {
            return JobState::Idle;
        }
        let (events, summary) = iface.stack.ping_output(now());
        for event in events {
            let _ = writeln!(out, "{event}");
        }
        match summary {
            Some(summary) => {
                let _ = writeln!(out, "{summary}");
                if summary.all_lost() {
                    let _ = writeln!(
                        out,
                        "error: ping: no reply from {}: host unreachable or down",
                        summary.label
                    );
                }
                JobState::Finished
            }
            None => JobState::Running,
        }
    }

    /// Connections the bench listener served to the end.
    pub fn bench_served(&self) -> Option<u64> {
        self.iface.as_ref().and_then(|i| i.stack.bench_served())
    }

    /// Starts a `net bench` / `net send` job; returns the header line.
    pub fn start_bench(
        &mut self,
        target: Ipv4,
        label: &str,
        limit: Limit,
    ) -> Result<String, String> {
        let Some(iface) = self.iface.as_mut() else {
            return Err(format!("no network interface: {}", self.missing));
        };
        iface
            .stack
            .start_bench(target, label, limit, now())
            .map_err(|e| format!("{e}"))
    }

    /// True while a bench job runs.
    pub fn bench_active(&self) -> bool {
        self.iface.as_ref().is_some_and(|i| i.stack.bench_active())
    }

    /// Prints the bench job's progress; at its end the summary (or the error).
    pub fn bench_output(&mut self, out: &mut dyn Write) -> JobState {
        let Some(iface) = self.iface.as_mut() else {
            return JobState::Idle;
        };
        if !iface.stack.bench_active() {
            return JobState::Idle;
        }
        let (lines, outcome) = iface.stack.bench_output();
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
        match outcome {
            Some(Ok(summary)) => {
                let _ = writeln!(out, "{summary}");
                JobState::Finished
            }
            Some(Err(error)) => {
                let _ = writeln!(out, "error: {error}");
                JobState::Finished
            }
            None => JobState::Running,
        }
    }

    /// Stops the bench job (Ctrl-C) and prints what it did.
    pub fn cancel_bench(&mut self, out: &mut dyn Write) {
        if let Some(line) = self
            .iface
            .as_mut()
            .and_then(|i| i.stack.cancel_bench(now()))
        {
            let _ = writeln!(out, "{line}");
        }
    }

    /// Connects to `target:port`, sends `text`, waits until the peer acknowledged it, then
    /// waits up to `reply_wait` for an answer; returns the local port and the answer (if any).
    /// Blocking: `idle` runs between polls (see the module documentation).
    pub fn send_text(
        &mut self,
        target: Ipv4,
        port: u16,
        text: &[u8],
        reply_wait: Duration,
        idle: &mut dyn FnMut(),
    ) -> Result<(u16, Option<String>), String> {
        // The storage network for its subnet, the cluster network otherwise.
        let on_storage = self
            .storage
            .as_ref()
            .and_then(|i| i.stack.address())
            .is_some_and(|net| net.contains(target));
        let on_cluster = self
            .iface
            .as_ref()
            .and_then(|i| i.stack.address())
            .is_some_and(|net| net.contains(target));
        let storage_waits = self
            .storage
            .as_ref()
            .is_some_and(|i| i.stack.dhcp() == Some(&DhcpState::Requesting));
        if !on_cluster && storage_waits {
            return Err(format!(
                "no route to {target}: the storage network has no DHCP lease yet"
            ));
        }
        let iface = if on_storage {
            self.storage.as_mut()
        } else {
            self.iface.as_mut()
        };
        let Some(iface) = iface else {
            return Err(format!("no network interface: {}", self.missing));
        };
        let fail = |what: &str, e: TransportError| format!("{what} {target}:{port}: {e}");
        let mut t =
            TcpTransport::connect(&mut iface.stack, target, port, CONNECT_TIMEOUT, now, idle)
                .map_err(|e| fail("connecting to", e))?;
        t.write_all(text, IO_TIMEOUT)
            .and_then(|()| t.flush(IO_TIMEOUT))
            .map_err(|e| fail("sending to", e))?;
        let (local, _) = t.ports();
        let mut buf = [0u8; 256];
        let reply = match t.read(&mut buf, reply_wait) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(TransportError::Timeout | TransportError::Closed) => None,
            Err(e) => return Err(fail("reading from", e)),
        };
        Ok((local, reply))
    }

    /// Stops the ping job (Ctrl-C) and prints its summary.
    pub fn cancel_ping(&mut self, out: &mut dyn Write) {
        if let Some(summary) = self.iface.as_mut().and_then(|i| i.stack.cancel_ping(now())) {
            let _ = writeln!(out, "{summary}");
        }
    }
}
