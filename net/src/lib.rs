//! `net`: host networking for a node of the cluster.
//!
//! It holds the NIC drivers, the smoltcp interfaces of the cluster and storage networks, the
//! TCP stream transport that `migrate` and `storage` use (to come), and the announcements that
//! move a migrated VM's traffic to its new host:
//!
//! - [`pci`]: PCI enumeration over a [`pci::ConfigSpace`] (the kernel's I/O ports, or a fake);
//! - [`hw`]: the two hardware seams of a driver, registers ([`hw::Mmio`]) and DMA memory
//!   ([`hw::DmaRegion`]);
//! - [`e1000`]: the Intel 82540EM driver, a smoltcp `phy::Device`;
//! - [`virtio`]: the virtio-net driver (on the `virtio-drivers` crate), a smoltcp `phy::Device`;
//! - [`stack`]: one smoltcp interface with its sockets, a mirror of its neighbor cache
//!   ([`neighbors`]), the `ping` job ([`ping`]) and its address, static or from the DHCP
//!   client ([`dhcp`]), driven by a bounded poll;
//! - [`transport`]: the byte-stream [`Transport`] (timeouts, typed errors) over smoltcp TCP
//!   ([`stack::TcpTransport`]) or, with the `std` feature, `std::net::TcpStream`;
//! - [`bench`]: the `net bench` / `net send` job and the bench listener (TCP port 5001);
//! - [`addr`]: IPv4 addresses and prefixes as the node configuration spells them;
//! - [`announce`]: gratuitous ARP / RARP for migrated VMs.
//!
//! Everything here is `no_std + alloc` and tested on the host: the drivers against device
//! models, the stack with two interfaces wired back to back.
//!
//! Dependency rule: `net` never depends on `vmx`, `migrate`, `storage` or the kernel. The others
//! reach the network through traits; the kernel wires the concrete types together.

#![no_std]

extern crate alloc;
#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod addr;
pub mod announce;
pub mod bench;
pub mod dhcp;
pub mod e1000;
pub mod hw;
pub mod neighbors;
pub mod pci;
pub mod ping;
pub mod stack;
pub mod transport;
pub mod virtio;

/// The TCP/IP stack this crate builds on (its `time` types appear in the APIs here).
pub use smoltcp;
/// The virtio transport and device crate under [`virtio`] (the kernel implements its `Hal`).
pub use virtio_drivers;

pub use addr::Addressing;
pub use announce::{gratuitous_arp, rarp_announce, AnnounceParams, AnnounceSchedule};
pub use transport::{Transport, TransportError};
