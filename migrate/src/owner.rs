//! Settling a migration in doubt: asking the destination whether it runs the VM.
//!
//! When the source sent `Commit` and the acknowledgement never came, only the destination
//! knows whether it took the VM over (see [`crate::source`]). The source keeps the VM paused
//! and asks, on a fresh connection, with an [`Message::OwnerQuery`]; the destination answers
//! from its own state ([`Ownership`]). `Runs` means the destination committed: the source
//! destroys its copy. `Absent` means it did not and never will (a failed destination ignores
//! everything after): the source resumes the VM. `Receiving` (the commit may still be on its
//! way) and no answer at all mean: ask again later. So the VM never runs on two nodes, and
//! never stays on neither once the destination can be reached.
//!
//! Both ends are small sans-IO machines over a [`Pipe`], like the migration drivers.

use alloc::string::{String, ToString};

use crate::link::{FrameLink, Pipe};
use crate::message::{Message, Ownership};

/// How long one query may take before it counts as unanswered.
pub const QUERY_TIMEOUT_US: u64 = 5_000_000;

/// Where one query stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryState {
    Waiting,
    Answered(Ownership),
    /// No usable answer (connection lost, timeout, malformed or foreign reply): ask again.
    Failed(String),
}

/// The source's side: one query for one VM on one connection.
#[derive(Debug)]
pub struct OwnerQueryClient {
    vm: String,
    link: FrameLink,
    deadline: u64,
    state: QueryState,
}

impl OwnerQueryClient {
    /// A query for `vm`, opened at `now` (the connection may still be being set up).
    pub fn new(vm: &str, now: u64) -> Self {
        let mut link = FrameLink::new();
        let state = match link.queue(&Message::OwnerQuery { vm: vm.to_string() }) {
            Ok(()) => QueryState::Waiting,
            Err(e) => QueryState::Failed(alloc::format!("cannot encode the query: {e}")),
        };
        Self {
            vm: vm.to_string(),
            link,
            deadline: now.saturating_add(QUERY_TIMEOUT_US),
            state,
        }
    }

    pub fn state(&self) -> &QueryState {
        &self.state
    }

    /// Sends, receives and checks the answer; returns where the query stands.
    pub fn step(&mut self, now: u64, pipe: &mut impl Pipe) -> &QueryState {
        if self.state != QueryState::Waiting {
            return &self.state;
        }
        let io = self.link.flush(pipe).and_then(|()| self.link.receive(pipe));
        match self.link.next_message() {
            Ok(Some(Message::OwnerReply { vm, ownership })) if vm == self.vm => {
                self.state = QueryState::Answered(ownership);
            }
            Ok(Some(other)) => {
                self.state =
                    QueryState::Failed(alloc::format!("unexpected {:?} reply", other.kind()));
            }
            Ok(None) => {
                if let Err(e) = io {
                    self.state = QueryState::Failed(alloc::format!("{e}"));
                } else if now >= self.deadline {
                    self.state = QueryState::Failed("no answer in time".to_string());
                }
            }
            Err(e) => self.state = QueryState::Failed(alloc::format!("{e}")),
        }
        &self.state
    }
}

/// The destination's side: answers one query on one accepted connection.
#[derive(Debug)]
pub struct OwnerResponder {
    link: FrameLink,
    deadline: u64,
    answered: bool,
    done: bool,
}

impl OwnerResponder {
    /// A responder for a connection accepted at `now`.
    pub fn new(now: u64) -> Self {
        Self {
            link: FrameLink::new(),
            deadline: now.saturating_add(QUERY_TIMEOUT_US),
            answered: false,
            done: false,
        }
    }

    /// Reads the query, answers it with `lookup(vm)`, sends the answer. Returns true once the
    /// connection can be closed (answered and sent, or hopeless: error, garbage, timeout).
    pub fn step(
        &mut self,
        now: u64,
        pipe: &mut impl Pipe,
        lookup: impl FnOnce(&str) -> Ownership,
    ) -> bool {
        if self.done {
            return true;
        }
        if !self.answered {
            if self.link.receive(pipe).is_err() {
                self.done = true;
                return true;
            }
            match self.link.next_message() {
                Ok(Some(Message::OwnerQuery { vm })) => {
                    let ownership = lookup(&vm);
                    self.answered = self
                        .link
                        .queue(&Message::OwnerReply { vm, ownership })
                        .is_ok();
                    self.done = !self.answered;
                }
                Ok(None) => {}
                // Anything else on this port is not ours to serve.
                Ok(Some(_)) | Err(_) => self.done = true,
            }
        }
        if self.answered && !self.done {
            self.done = self.link.flush(pipe).is_err() || self.link.queued() == 0;
        }
        if now >= self.deadline {
            self.done = true;
        }
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Net;
    use alloc::vec::Vec;

    /// The client on the source's end of the connection, the responder on the destination's.
    fn run(answer: Ownership) -> QueryState {
        let mut net = Net::unlimited();
        let mut client = OwnerQueryClient::new("vm1", 0);
        let mut responder = OwnerResponder::new(0);
        let mut asked = Vec::new();
        for t in 0..10 {
            client.step(t, &mut net.source_end());
            responder.step(t, &mut net.destination_end(), |vm| {
                asked.push(vm.to_string());
                answer
            });
        }
        assert_eq!(asked, ["vm1"]);
        client.state().clone()
    }

    #[test]
    fn every_answer_reaches_the_client() {
        for answer in [Ownership::Runs, Ownership::Receiving, Ownership::Absent] {
            assert_eq!(run(answer), QueryState::Answered(answer));
        }
    }

    #[test]
    fn a_lost_connection_or_silence_fails_the_query() {
        let mut net = Net::unlimited();
        net.each(|c| c.cut = true);
        let mut client = OwnerQueryClient::new("vm1", 0);
        let state = client.step(1, &mut net.source_end()).clone();
        assert!(matches!(state, QueryState::Failed(_)), "{state:?}");

        let mut net = Net::unlimited();
        let mut client = OwnerQueryClient::new("vm1", 0);
        let mut end = net.source_end();
        assert_eq!(client.step(1, &mut end), &QueryState::Waiting);
        let state = client.step(QUERY_TIMEOUT_US, &mut end).clone();
        assert_eq!(state, QueryState::Failed("no answer in time".to_string()));
    }

    #[test]
    fn a_reply_about_another_vm_or_garbage_is_no_answer() {
        let mut net = Net::unlimited();
        let mut link = FrameLink::new();
        link.queue(&Message::OwnerReply {
            vm: "other".to_string(),
            ownership: Ownership::Runs,
        })
        .unwrap();
        link.flush(&mut net.destination_end()).unwrap();
        let mut client = OwnerQueryClient::new("vm1", 0);
        let state = client.step(1, &mut net.source_end()).clone();
        assert!(matches!(state, QueryState::Failed(_)), "{state:?}");

        let mut net = Net::unlimited();
        net.to_destination
            .bytes
            .extend(b"GET / HTTP/1.0\r\n\r\n".iter().copied());
        let mut responder = OwnerResponder::new(0);
        let done = responder.step(1, &mut net.destination_end(), |_| {
            panic!("garbage must not be answered")
        });
        assert!(done);
        assert!(net.to_source.bytes.is_empty());
    }

    #[test]
    fn a_silent_client_is_dropped_at_the_deadline() {
        let mut net = Net::unlimited();
        let mut responder = OwnerResponder::new(0);
        let mut end = net.destination_end();
        assert!(!responder.step(1, &mut end, |_| Ownership::Absent));
        assert!(responder.step(QUERY_TIMEOUT_US, &mut end, |_| Ownership::Absent));
    }
}
