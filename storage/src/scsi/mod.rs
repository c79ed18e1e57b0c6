//! SCSI commands the hypervisor issues, and the data they return (SPC-4, SBC-3).
//!
//! The iSCSI initiator ([`crate::iscsi`]) carries SCSI commands to the shared disk; this module
//! says what those commands are, byte for byte, and what their answers mean. It is pure encoding
//! and decoding, with no I/O, so it is tested on the host:
//!
//! - [`Command`] builds the CDB and the expected data transfer of each command: TEST UNIT READY,
//!   INQUIRY, REPORT LUNS, READ CAPACITY(16), READ(16), WRITE(16), SYNCHRONIZE CACHE(16),
//!   PERSISTENT RESERVE IN and OUT ([`command`]);
//! - [`Status`] and [`CommandError`] classify how a command completed ([`status`]);
//! - [`Sense`] decodes sense data in both formats and names the UNIT ATTENTIONs that persistent
//!   reservations raise ([`sense`]);
//! - [`ReservationKey`], [`PrOutAction`], [`RegisteredKeys`] and [`ReservationStatus`] implement
//!   the cluster's use of persistent reservations: one key per node, Write Exclusive - Registrants
//!   Only, fencing by PREEMPT ([`pr`]);
//! - [`StandardInquiry`], [`Capacity`] and [`parse_report_luns`] decode the remaining answers
//!   ([`data`]).
//!
//! Every decoder returns an error rather than panicking on any input (property-tested with random
//! and truncated buffers), because the bytes come from the network.

pub mod command;
pub mod data;
pub mod pr;
pub mod sense;
pub mod status;

#[cfg(test)]
mod fuzz;

pub use command::{Cdb, Command, DataDirection, TransferTooLong, MAX_CDB_LEN};
pub use data::{parse_report_luns, Capacity, DataError, StandardInquiry};
pub use pr::{
    PrCapabilities, PrInAction, PrOutAction, RegisteredKeys, ReservationKey, ReservationStatus,
    ReservationType, PR_OUT_PARAMETER_LIST_LEN,
};
pub use sense::{Sense, SenseError, SenseFormat, SenseKey};
pub use status::{CommandError, Status};
