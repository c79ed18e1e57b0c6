//! Guest-visible device models.
//!
//! Each model is the register-level behaviour a guest sees (port or MMIO accesses in, bytes and
//! interrupt lines out) and nothing else: no port I/O, no host hardware, no `unsafe`. That keeps
//! them pure, so every rule a guest driver relies on is proved by host unit tests, and their
//! state can be saved and restored for live migration. The kernel glues them to VM exits.
//!
//! They live here while they are few and small; they move to a `devices/` crate when they grow
//! (see ARCHITECTURE.md).

pub mod pci;
pub mod uart;
pub mod virtio;
