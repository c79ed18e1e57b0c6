//! `migrate`: moves a running VM from one node to another.
//!
//! It will hold the versioned migration wire protocol, the source and destination state machines
//! and the convergence policy. Today it holds the lowest layer of the protocol: [`frame`], which
//! cuts a byte stream into checked, typed frames, and the [`crc32c`] checksum those frames carry.
//!
//! Dependency rule: `migrate` is plain `no_std + alloc` logic. It never depends on hardware, on the
//! kernel, or on `vmx`, `net` or `storage`: byte streams, guest memory, vCPU state and the disk
//! handoff reach it through traits, so every line of it runs in host unit tests.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod crc32c;
pub mod frame;

pub use frame::{encode, Frame, FrameDecoder, FrameError, FrameKind};
