//! The iSCSI initiator (RFC 7143), sans-IO and non-blocking.
//!
//! Layers, bottom up:
//! - [`pdus`]: typed PDUs over the Basic Header Segment codec of [`crate::pdu`];
//!   [`stream`]: whole PDUs (header, AHS, digests, padded data) to and from a byte stream;
//!   [`digest`]: CRC32C; [`wire`]: one connection's outbound queue and inbound decoder over a
//!   [`transport::Pipe`];
//! - [`text`]: `key=value` text and its continuation; [`negotiate`]: operational parameters;
//!   [`chap`]: CHAP authentication; [`login`]: the login phase;
//! - [`session`]: the full feature phase (command window, R2T and Data-Out, Data-In, NOP,
//!   timeouts, reconnection and retry, UNIT ATTENTION); [`task`]: what is submitted and what
//!   comes back;
//! - [`disk`]: block and persistent reservation operations on one LUN; [`discovery`]:
//!   SendTargets.
//!
//! Nothing here blocks or does I/O itself: the caller passes the connection's [`transport::Pipe`]
//! to [`Session::poll`] (or [`Disk::poll`]) from its loop with the current time in
//! milliseconds, opens a new connection when [`Session::needs_connection`] says so, and reads
//! results from the returned events. `crate::blocking` (feature `std`) wraps this into a blocking
//! client for host tools and tests. The kernel's loop, in outline:
//!
//! ```text
//! let mut disk = Disk::new(Session::new(SessionConfig::normal(node_iqn, target_iqn, isid)), 1)?;
//! loop {                                             // the host work of each round
//!     let now = clock.ms();
//!     if disk.session().needs_connection(now) {       // first time, and after every loss
//!         pipe = tcp.connect(portal);                 // non-blocking: sends return 0 until up
//!         disk.session_mut().connection_opened(now);  // login starts on this pipe
//!     }
//!     for event in disk.poll(&mut pipe, now) {        // never waits
//!         match event {
//!             DiskEvent::Completed { op, result } => complete_guest_request(op, result),
//!             DiskEvent::Session(SessionEvent::ConnectionLost(_)) => tcp.close(&mut pipe),
//!             DiskEvent::Session(SessionEvent::UnitAttention { sense, .. }) => note(sense),
//!             _ => {}
//!         }
//!     }
//!     let op = disk.write(lba, blocks, now)?;          // any time: queued, issued when possible
//! }
//! ```

pub mod chap;
pub mod digest;
pub mod discovery;
pub mod disk;
pub mod login;
pub mod negotiate;
pub mod pdus;
pub mod session;
pub mod stream;
pub mod task;
pub mod text;
pub mod wire;

#[cfg(test)]
pub(crate) mod fake_target;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod session_tests;

pub use chap::{ChapConfig, ChapCredentials};
pub use discovery::{DiscoveredTarget, Portal};
pub use disk::{Disk, DiskError, DiskEvent, DiskReply, OpId, RegistrationEvent, FENCE_RESERVATION};
pub use login::{LoginConfig, LoginError, LoginStatus};
pub use negotiate::{DigestPolicy, NegotiationConfig, OperationalParams, SessionType};
pub use pdus::Isid;
pub use session::{
    ConnectionError, ProtocolError, RetryPolicy, Session, SessionConfig, SessionEvent,
    SessionState, SessionStats, SubmitError, Timeouts,
};
pub use task::{Completion, ScsiReply, TaskError, TaskId, TaskReply};
pub use text::TextKeys;

impl SessionConfig {
    /// A normal session of `initiator_name` to `target_name`, with the default negotiation,
    /// timeouts and retries, and no CHAP.
    pub fn normal(initiator_name: &str, target_name: &str, isid: Isid) -> Self {
        Self::new(initiator_name, Some(target_name), SessionType::Normal, isid)
    }

    /// A discovery session of `initiator_name`.
    pub fn discovery(initiator_name: &str, isid: Isid) -> Self {
        Self::new(initiator_name, None, SessionType::Discovery, isid)
    }

    fn new(
        initiator_name: &str,
        target_name: Option<&str>,
        session_type: SessionType,
        isid: Isid,
    ) -> Self {
        SessionConfig {
            login: LoginConfig {
                initiator_name: alloc::string::String::from(initiator_name),
                target_name: target_name.map(alloc::string::String::from),
                session_type,
                isid,
                chap: None,
                negotiation: NegotiationConfig::default(),
            },
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
            entropy: 0,
        }
    }
}
