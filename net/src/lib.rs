//! `net`: host networking for a node of the cluster.
//!
//! It will hold the NIC drivers, the smoltcp interfaces of the cluster and storage networks, the
//! TCP stream transport that `migrate` and `storage` use, and the announcements that move a
//! migrated VM's traffic to its new host. Today it holds the last of those: [`announce`].
//!
//! Dependency rule: `net` never depends on `vmx`, `migrate`, `storage` or the kernel. The others
//! reach the network through traits; the kernel wires the concrete types together.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod announce;

pub use announce::{gratuitous_arp, rarp_announce, AnnounceParams, AnnounceSchedule};
