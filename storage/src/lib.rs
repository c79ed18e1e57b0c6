//! `storage`: shared disks for the cluster.
//!
//! It will hold the iSCSI initiator (RFC 7143), the SCSI commands the hypervisor issues (including
//! the persistent reservations that hand a VM's disk from one node to another) and, later, the
//! shared volume layout. Today it holds the iSCSI Basic Header Segment codec: [`pdu`].
//!
//! Dependency rule: `storage` is plain `no_std + alloc` logic. It never depends on hardware, on the
//! kernel, or on `vmx`, `migrate` or `net`: it talks to the target through a byte-stream trait
//! that the kernel implements with a TCP socket and host tests with `std::net`.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod pdu;

pub use pdu::{Bhs, Lun, Opcode, PduError, SequenceField};
