//! `storage`: shared disks for the cluster.
//!
//! It holds the iSCSI initiator (RFC 7143, [`iscsi`]: sans-IO and non-blocking, driven by the
//! kernel's loop), the iSCSI Basic Header Segment codec it builds on ([`pdu`]), the SCSI commands
//! the hypervisor issues including the persistent reservations that hand a VM's disk from one
//! node to another ([`scsi`]) and, with the `std` feature, a blocking client over TCP for host
//! tools and tests (`blocking`), how the hypervisor names a shared disk ([`path`]), and the
//! reservation procedures a node runs on a shared LUN to open, claim, take over, probe and give it
//! up ([`ownership`]). Later: the shared volume layout.
//!
//! Dependency rule: `storage` is plain `no_std + alloc` logic. It never depends on hardware, on the
//! kernel, or on `vmx`, `migrate` or `net`: it talks to the target through a byte-stream trait
//! that the kernel implements with a TCP socket and host tests with `std::net`.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(any(test, feature = "std"))]
extern crate std;

#[cfg(feature = "std")]
pub mod blocking;
pub mod iscsi;
pub mod ownership;
pub mod path;
pub mod pdu;
pub mod scsi;

pub use path::{LunPath, LunPathError};
pub use pdu::{Bhs, Lun, Opcode, PduError, SequenceField};
