//! `migrate`: moves a running VM from one node to another.
//!
//! Layers, bottom up:
//! - [`frame`]: cut a byte stream into checked (XXH64), typed frames;
//! - [`message`]: the protocol's messages, one per frame kind, with strict decoding, and the
//!   per-page encodings (raw, zero marker, run-length compressed);
//! - [`policy`]: the convergence policy (downtime target, round cap, auto-converge throttle);
//! - [`source`] and [`destination`]: the two ends as sans-IO state machines (shared types in
//!   [`machine`]) in which every wait has a deadline;
//! - [`link`]: messages over a non-blocking byte [`link::Pipe`] (the kernel's TCP socket), with an
//!   outbound queue for what the pipe cannot take yet;
//! - [`driver`]: each machine over a link, one non-blocking step at a time, with backpressure on
//!   pre-copy and transport failures fed to the machine as aborts;
//! - [`digest`]: an order-independent digest of guest memory, kept up to date page by page, so
//!   both ends can compare memory at switchover without hashing all of it during the pause;
//! - [`owner`]: after a lost commit acknowledgement, the query that asks the destination
//!   whether it runs the VM, and its answer.
//!
//! Dependency rule: `migrate` is plain `no_std + alloc` logic. It never depends on hardware, on the
//! kernel, or on `vmx`, `net` or `storage`: byte streams, guest memory, vCPU state and the disk
//! handoff reach it through traits, so every line of it runs in host unit tests.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod destination;
pub mod digest;
pub mod driver;
pub mod frame;
pub mod link;
pub mod machine;
pub mod message;
pub mod owner;
pub mod pending;
pub mod policy;
pub mod source;

#[cfg(test)]
mod bench_tests;
#[cfg(test)]
mod end_to_end_tests;
#[cfg(test)]
mod testing;

pub use frame::{encode, Frame, FrameDecoder, FrameError, FrameKind};
