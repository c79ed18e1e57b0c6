//! A host micro-benchmark of the per-page pipeline, ignored by default. Run it in release mode:
//!
//! ```text
//! cargo test -p migrate --release bench_page_pipeline -- --ignored --nocapture
//! ```
//!
//! Send side: a [`Source`] in its first pre-copy round reads, encodes and queues batches of 32
//! pages into a [`FrameLink`] flushed into a pipe that takes everything. Receive side: the same
//! bytes pulled from a pipe into a [`FrameLink`], decoded and written by a [`Destination`] into
//! host memory. Both report nanoseconds per page (best and median of several passes).
//!
//! The figures are host figures: the kernel target has no SIMD, and under emulation every
//! memory pass costs far more, so they show relative costs (copies, passes, allocations) rather
//! than what a node sees.

use alloc::boxed::Box;
use alloc::string::ToString;
use alloc::vec::Vec;
use std::println;
use std::time::Instant;

use crate::destination::{Destination, DestinationHost};
use crate::link::{FrameLink, Incoming, Pipe, PipeError};
use crate::machine::{GuestError, Output};
use crate::message::{
    Capabilities, ConfigReply, CpuVendor, Hello, Message, RefuseReason, VmConfig, PAGE_SIZE,
};
use crate::source::Source;
use crate::testing::{destination_config, source_config, Page, PagesGuest, Rng};

const PAGES: usize = 4096;
const BATCH: usize = 32;
const PASSES: usize = 15;

struct Host {
    pages: Vec<Page>,
}

impl DestinationHost for Host {
    fn admit(&mut self, _config: &VmConfig, _peer: &Hello) -> Result<(), RefuseReason> {
        Ok(())
    }
    fn write_page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), GuestError> {
        self.pages[page as usize].copy_from_slice(data);
        Ok(())
    }
    fn load_vcpu(&mut self, _vcpu: u32, _state: &[u8]) -> Result<(), GuestError> {
        Ok(())
    }
    fn load_device(&mut self, _device: u32, _state: &[u8]) -> Result<(), GuestError> {
        Ok(())
    }
}

/// Takes everything; keeps a copy only when asked to.
struct Sink {
    capture: Option<Vec<u8>>,
}

impl Pipe for Sink {
    fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
        if let Some(c) = &mut self.capture {
            c.extend_from_slice(data);
        }
        Ok(data.len())
    }
    fn recv(&mut self, _buf: &mut [u8]) -> Result<usize, PipeError> {
        Ok(0)
    }
}

/// Gives back recorded bytes, as a socket would, copying them into the caller's buffer.
struct Replay<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Pipe for Replay<'_> {
    fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
        Ok(data.len())
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError> {
        let n = buf.len().min(self.bytes.len() - self.pos);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn peer_hello() -> Message {
    Message::Hello(Hello {
        min_version: crate::frame::PROTOCOL_VERSION,
        max_version: crate::frame::PROTOCOL_VERSION,
        node_name: "node2".to_string(),
        capabilities: Capabilities::KNOWN,
        cpu_vendor: CpuVendor::Intel,
        cpu_features: 0,
    })
}

/// One first round of the source; returns its time per page and, if asked, the stream.
fn send_pass(guest: &mut PagesGuest, capture: bool) -> (f64, Option<Vec<u8>>) {
    let mut source = Source::new(source_config(PAGES, BATCH)).unwrap();
    let mut link = FrameLink::new();
    let mut pipe = Sink {
        capture: capture.then(Vec::new),
    };
    source.start(0);
    source.on_message(1, peer_hello(), guest);
    source.on_message(2, Message::VmConfigReply(ConfigReply::Accept), guest);
    // As the source driver does: page batches encoded from guest memory, the rest as messages.
    let queue_all =
        |source: &mut Source, guest: &PagesGuest, link: &mut FrameLink, pipe: &mut Sink| {
            while let Some(output) = source.poll_output() {
                match output {
                    Output::Send(message) => link.queue(&message).unwrap(),
                    Output::SendPages(batch) => link.queue_pending(&batch, guest).unwrap(),
                    Output::Do(_) => {}
                }
            }
            link.flush(pipe).unwrap();
        };
    queue_all(&mut source, guest, &mut link, &mut pipe);
    let start = Instant::now();
    while source.round_pages_left() > 0 {
        source.on_tick(3, guest);
        queue_all(&mut source, guest, &mut link, &mut pipe);
    }
    let ns = start.elapsed().as_nanos() as f64 / PAGES as f64;
    (ns, pipe.capture)
}

/// Receives `stream` into a fresh destination; returns the time per page.
fn receive_pass(stream: &[u8], host: &mut Host) -> f64 {
    let mut destination = Destination::new(destination_config(), 0).unwrap();
    let mut link = FrameLink::new();
    let mut pipe = Replay {
        bytes: stream,
        pos: 0,
    };
    let start = Instant::now();
    while pipe.pos < stream.len() {
        link.receive(&mut pipe).unwrap();
        // As the destination driver does: page batches read in place, the rest decoded.
        while let Some(incoming) = link.next_incoming().unwrap() {
            match incoming {
                Incoming::Pages(batch) => destination.on_page_batch(4, &batch, host),
                Incoming::Message(message) => destination.on_message(4, message, host),
            }
            while destination.poll_output().is_some() {}
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / PAGES as f64;
    assert!(
        destination.failure().is_none(),
        "{:?}",
        destination.failure()
    );
    assert_eq!(destination.pages_received(), PAGES as u64);
    ns
}

fn best_and_median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn run(label: &str, pages: Vec<Page>) {
    let mut guest = PagesGuest(pages);
    let (_, stream) = send_pass(&mut guest, true);
    let stream = stream.unwrap();
    let send: Vec<f64> = (0..PASSES)
        .map(|_| send_pass(&mut guest, false).0)
        .collect();
    let mut host = Host {
        pages: (0..PAGES).map(|_| Box::new([0xEE; PAGE_SIZE])).collect(),
    };
    let receive: Vec<f64> = (0..PASSES)
        .map(|_| receive_pass(&stream, &mut host))
        .collect();
    assert!(host.pages == guest.0, "destination memory differs");
    let (send_best, send_median) = best_and_median(send);
    let (receive_best, receive_median) = best_and_median(receive);
    println!(
        "bench_page_pipeline {label}: {} bytes/page on the wire (stream XXH64 {:016x}); send \
         {send_best:.0} ns/page (median {send_median:.0}), receive {receive_best:.0} ns/page \
         (median {receive_median:.0})",
        stream.len() / PAGES,
        xxhash_rust::xxh64::xxh64(&stream, 0),
    );
}

#[test]
#[ignore = "benchmark: run in release mode with --ignored --nocapture"]
fn bench_page_pipeline() {
    let mut rng = Rng::seeded(7);
    run("random pages", (0..PAGES).map(|_| rng.page()).collect());
    // A quarter zero pages, a quarter pages of runs, half random.
    let mixed = (0..PAGES)
        .map(|i| match i % 4 {
            0 => Box::new([0; PAGE_SIZE]),
            1 => {
                let mut page: Page = Box::new([0; PAGE_SIZE]);
                for (j, chunk) in page.chunks_mut(256).enumerate() {
                    chunk.fill(rng.below(4) as u8 + j as u8);
                }
                page
            }
            _ => rng.page(),
        })
        .collect();
    run("mixed pages", mixed);
}
