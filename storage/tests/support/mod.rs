//! Support code for the `storage` crate's host integration tests.
//!
//! Each file under `tests/` is its own crate and pulls this module in with `mod support;`, using
//! only part of it, hence the `dead_code` allowance.
//!
//! - [`tgtd`]: a real Linux iSCSI target (tgt's `tgtd`) with file-backed LUNs, one private
//!   instance per test, stopped when dropped.

#![allow(dead_code)]

pub mod tgtd;
