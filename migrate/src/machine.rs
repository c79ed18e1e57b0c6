//! What the source and destination state machines share: outputs, timeouts, the local failure
//! type, and how a migration ended.
//!
//! Both machines are sans-IO: they never touch a transport or a clock. The driver (the kernel's
//! migration task, or a host test) feeds them received messages, timer ticks and local events with
//! the current time in microseconds, and drains [`Output`]s: messages to send and actions to
//! perform. That keeps every protocol decision in host-testable code, and lets a test run both
//! ends against each other with failures injected at any step.

use alloc::string::String;
use core::fmt;

use crate::message::{Abort, AbortReason, Capabilities, CpuVendor, Hello, Message, RefuseReason};

/// One thing a state machine wants done, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<A> {
    /// Send this message to the peer.
    Send(Message),
    /// Send this page batch, its raw pages read from guest memory as it is encoded (only a
    /// source sends these; see [`crate::pending`]).
    SendPages(crate::pending::PendingBatch),
    /// Perform this local action before feeding the machine anything else that depends on it.
    Do(A),
}

/// How long each wait may last, in microseconds. Every state that waits for the peer or for a
/// local event has a deadline; passing it aborts the migration, so a dead peer or a silent link
/// can never leave a VM paused or a copy half-built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Waiting for the peer's hello and for the answer to the VM configuration.
    pub handshake_us: u64,
    /// Waiting for the local VM to pause after asking for it.
    pub pause_us: u64,
    /// Destination: the longest silence from the source while pages and state arrive.
    pub idle_us: u64,
    /// Source: waiting for the destination's commit acknowledgement.
    pub commit_us: u64,
    /// Waiting for the local node's disk work of the switchover: the source's quiesce (guest
    /// I/O drained and the target's cache flushed), the destination's takeover of the
    /// reservation. Shorter than `commit_us`, so a destination that cannot take the disk
    /// aborts before the source gives up waiting for the acknowledgement.
    pub disk_us: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake_us: 10_000_000,
            pause_us: 5_000_000,
            idle_us: 30_000_000,
            commit_us: 10_000_000,
            disk_us: 5_000_000,
        }
    }
}

/// A local operation on the VM or its memory failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestError {
    /// The page is outside the VM's memory.
    PageOutOfRange { page: u64 },
    /// A vCPU index the VM does not have.
    NoSuchVcpu { vcpu: u32 },
    /// Saving or loading state failed; the text says what.
    Failed(&'static str),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::PageOutOfRange { page } => write!(f, "page {page} is outside the VM"),
            GuestError::NoSuchVcpu { vcpu } => write!(f, "the VM has no vCPU {vcpu}"),
            GuestError::Failed(what) => write!(f, "{what}"),
        }
    }
}

impl core::error::Error for GuestError {}

/// Why a migration did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The destination refused the VM configuration.
    Refused(RefuseReason),
    /// The migration was aborted; `by_peer` says whether the peer sent the abort.
    Aborted {
        by_peer: bool,
        reason: AbortReason,
        text: String,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused(reason) => write!(f, "refused by the destination: {reason:?}"),
            Failure::Aborted {
                by_peer,
                reason,
                text,
            } => {
                let who = if *by_peer { "peer" } else { "this node" };
                write!(f, "aborted by {who} ({reason:?}): {text}")
            }
        }
    }
}

/// True if `peer` accepts the protocol version this build speaks.
pub(crate) fn version_compatible(min: u16, max: u16) -> bool {
    (min..=max).contains(&crate::frame::PROTOCOL_VERSION)
}

/// This node's hello: both ends open with the same message from their settings.
pub(crate) fn hello(
    node_name: &str,
    capabilities: Capabilities,
    cpu_vendor: CpuVendor,
    cpu_features: u64,
) -> Hello {
    Hello {
        min_version: crate::frame::PROTOCOL_VERSION,
        max_version: crate::frame::PROTOCOL_VERSION,
        node_name: String::from(node_name),
        capabilities,
        cpu_vendor,
        cpu_features,
    }
}

/// An abort whose text (for logs) is cut to what the wire allows, at a character boundary.
pub(crate) fn abort_message(reason: AbortReason, text: &str) -> Message {
    let mut end = text.len().min(crate::message::MAX_TEXT_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Message::Abort(Abort {
        reason,
        text: String::from(&text[..end]),
    })
}
