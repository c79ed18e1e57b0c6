//! The operator's console on COM1: read bytes, edit the line, run commands, print the prompt.

mod commands;
mod vm;

use kernel::config::NodeConfig;
use kernel::console::line::{LineEditor, LineEvent};
use kernel::console::shell;
use vmx::caps::Capabilities;

use crate::vm::VmTable;
use crate::{print, println, serial};

/// Ctrl-]: leaves an attached VM console (as telnet and socat users expect).
const DETACH: u8 = 0x1D;

/// Longest command line accepted; longer ones are refused whole.
const MAX_LINE: usize = 1024;
const HISTORY: usize = 64;

/// What the commands act on: this node.
pub struct Node {
    pub config: NodeConfig,
    pub caps: Capabilities,
    pub vms: VmTable,
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

/// Runs the console forever. Between bytes the CPU sleeps until the next interrupt (the
/// timer ticks at 1 kHz, faster than a 115200-baud line can fill the UART's 16-byte FIFO).
pub fn run(mut node: Node) -> ! {
    let mut editor = LineEditor::new(MAX_LINE, HISTORY);
    println!(
        "console ready on {} (type 'help' for commands)",
        node.config.name
    );
    prompt(&node);
    loop {
        while let Some(byte) = serial::try_read() {
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
            prompt(&node);
        }
        run_vms(&mut node, &editor);
        if !node.vms.any_runnable() {
            x86_64::instructions::interrupts::enable_and_hlt();
        }
    }
}

/// Gives the VMs their slices and shows what they print: whole lines as `[name] line`
/// above the prompt (which is redrawn with what the operator was typing), or raw bytes for
/// the attached VM.
fn run_vms(node: &mut Node, editor: &LineEditor) {
    let attached = node.vms.attached.clone();
    let mut printed = false;
    node.vms.run_slice(&mut |name, bytes| {
        if attached.as_deref() == Some(name) {
            serial::write_bytes(bytes);
            return;
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
    if printed {
        prompt(node);
        serial::write_str(editor.line());
    }
}
