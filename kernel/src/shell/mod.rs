//! The operator's console on COM1: read bytes, edit the line, run commands, print the prompt.

mod commands;
mod migrate;
mod net;
mod storage;
mod vm;

use kernel::config::NodeConfig;
use kernel::console::line::{LineEditor, LineEvent};
use kernel::console::shell;
use vmx::caps::Capabilities;

use crate::vm::VmTable;
use crate::{print, println, serial};

/// Ctrl-]: leaves an attached VM console (as telnet and socat users expect).
const DETACH: u8 = 0x1D;
/// Ctrl-C: stops a running job (`ping`, `net bench`).
const INTERRUPT: u8 = 0x03;

/// Longest command line accepted; longer ones are refused whole.
const MAX_LINE: usize = 1024;
const HISTORY: usize = 64;

/// What the commands act on: this node.
pub struct Node {
    pub config: NodeConfig,
    pub caps: Capabilities,
    pub vms: VmTable,
    pub net: crate::net::Net,
    pub migrations: crate::migration::Migrations,
    pub storage: crate::storage::Storage,
}

impl Node {
    /// A console job (`ping`, `net bench`) holds the console: no prompt until it ends.
    fn job_running(&self) -> bool {
        self.net.ping_active() || self.net.bench_active()
    }
}

/// Sink that lets commands write to the console through `fmt::Write`.
struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        serial::write_str(s);
        Ok(())
    }
}

fn prompt(node: &Node) {
    print!("{}> ", node.config.name);
}

/// Runs the console forever. Every round: console input, VM slices, one bounded network poll
/// and the output of a running job. When nothing is runnable the CPU sleeps until the next
/// interrupt: a NIC's, as soon as a frame arrives (see `net::irq`), or the timer's (1 kHz, faster
/// than a 115200-baud line can fill the UART's 16-byte FIFO; NICs without an interrupt line are
/// polled at that rate).
pub fn run(mut node: Node) -> ! {
    let mut editor = LineEditor::new(MAX_LINE, HISTORY);
    println!(
        "console ready on {} (type 'help' for commands)",
        node.config.name
    );
    prompt(&node);
    loop {
        while let Some(byte) = serial::try_read() {
            if node.job_running() {
                // The job owns the console: Ctrl-C stops it, other input is dropped.
                if byte == INTERRUPT {
                    println!("^C");
                    node.net.cancel_ping(&mut Console);
                    node.net.cancel_bench(&mut Console);
                    prompt(&node);
                }
                continue;
            }
            if let Some(name) = node.vms.attached.clone() {
                if byte == DETACH {
                    node.vms.attached = None;
                    println!("\n[detached from {name}]");
                    prompt(&node);
                } else if node.vms.send_input(&name, &[byte]).is_err() {
                    node.vms.attached = None;
                    prompt(&node);
                }
                continue;
            }
            let Some(event) = editor.feed(byte, &mut serial::write_bytes) else {
                continue;
            };
            match event {
                LineEvent::Submitted(line) => {
                    if let Err(err) =
                        shell::dispatch(commands::TABLE, &mut node, &line, &mut Console)
                    {
                        println!("{err}");
                    }
                }
                LineEvent::Cancelled => {}
                LineEvent::TooLong { max } => {
                    println!("error: line too long (more than {max} characters): discarded");
                }
            }
            if !node.job_running() {
                prompt(&node);
            }
        }
        run_vms(&mut node, &editor);
        // Disk completions go back to the guests once per pass; requests in flight keep the
        // loop from sleeping so they complete on the next pass.
        let disk_busy = node.vms.poll_disks();
        // Busy: frames still waiting, or a bench sending (the loop then does not halt; the VM
        // slices still run every round).
        let woken = crate::net::irq::wakeups();
        let net_busy = node.net.poll();
        let (lines, migrating) =
            node.migrations
                .poll(&mut node.net, &mut node.vms, &mut node.storage);
        print_above_prompt(&node, &editor, "migrate", &lines);
        let (lines, storage_busy) = node.storage.poll(&mut node.net);
        print_above_prompt(&node, &editor, "storage", &lines);
        let ping = node.net.ping_output(&mut Console);
        let bench = node.net.bench_output(&mut Console);
        if ping == crate::net::JobState::Finished || bench == crate::net::JobState::Finished {
            prompt(&node);
        }
        if !node.vms.any_runnable() && !net_busy && !migrating && !disk_busy && !storage_busy {
            sleep_unless_woken(woken);
        }
    }
}

/// Halts until the next interrupt, unless a NIC interrupted since `woken` was read (before the
/// NICs were polled): the frame that raised it may have come after the poll, and halting would
/// leave it waiting for the next tick.
fn sleep_unless_woken(woken: u64) {
    x86_64::instructions::interrupts::disable();
    crate::net::irq::arm();
    if crate::net::irq::wakeups() == woken {
        // `sti; hlt`: an interrupt that arrives from here on ends the halt.
        x86_64::instructions::interrupts::enable_and_hlt();
    } else {
        x86_64::instructions::interrupts::enable();
    }
}

/// What a console command that waits for the network does between two polls: the VM slices
/// (their lines go to the console) and their disk completions, or a halt until the next
/// interrupt when no VM is runnable. VMs never stall for longer than one poll while the
/// console waits.
///
/// It keeps the NIC wake-up count read after its last halt, before the caller polls again: a
/// frame whose interrupt came after that poll ends the next halt at once instead of waiting
/// for the timer tick.
struct Idler {
    woken: u64,
}

impl Idler {
    /// Made before the caller's first poll.
    fn new() -> Self {
        Idler {
            woken: crate::net::irq::wakeups(),
        }
    }

    fn idle(&mut self, vms: &mut crate::vm::VmTable) {
        vms.run_slice(&mut |name, bytes| {
            crate::print!("[{name}] ");
            serial::write_bytes(bytes);
            serial::write_bytes(b"\r\n");
        });
        vms.poll_disks();
        if !vms.any_runnable() {
            sleep_unless_woken(self.woken);
        }
        self.woken = crate::net::irq::wakeups();
    }
}

/// Prints lines of background work (migrations, storage) above the prompt, tagged
/// `[label]`, then redraws the prompt with what the operator was typing.
fn print_above_prompt(
    node: &Node,
    editor: &LineEditor,
    label: &str,
    lines: &[alloc::string::String],
) {
    if lines.is_empty() {
        return;
    }
    if node.vms.attached.is_some() {
        // The terminal belongs to the attached guest (see `run_vms`).
        for line in lines {
            log::info!("[{label}] {line}");
        }
        return;
    }
    serial::write_bytes(b"\r\x1b[K");
    for line in lines {
        println!("[{label}] {line}");
    }
    if !node.job_running() {
        prompt(node);
        serial::write_str(editor.line());
    }
}

/// Gives the VMs their slices and shows what they print: whole lines as `[name] line`
/// above the prompt (which is redrawn with what the operator was typing), or raw bytes for
/// the attached VM.
fn run_vms(node: &mut Node, editor: &LineEditor) {
    let attached = node.vms.attached.clone();
    let mut printed = false;
    node.vms.run_slice(&mut |name, bytes| {
        match attached.as_deref() {
            Some(a) if a == name => {
                serial::write_bytes(bytes);
                return;
            }
            // The terminal belongs to the attached guest: other VMs' lines would land in
            // the middle of its output, so they go to the log instead.
            Some(_) => {
                log::debug!("[{name}] {}", core::str::from_utf8(bytes).unwrap_or("?"));
                return;
            }
            None => {}
        }
        if !printed {
            // Clear the prompt line before the first guest line.
            serial::write_bytes(b"\r\x1b[K");
            printed = true;
        }
        print!("[{name}] ");
        serial::write_bytes(bytes);
        serial::write_bytes(b"\r\n");
    });
    if printed && !node.job_running() {
        prompt(node);
        serial::write_str(editor.line());
    }
}
