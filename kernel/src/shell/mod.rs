//! The operator's console on COM1: read bytes, edit the line, run commands, print the prompt.

mod commands;

use kernel::config::NodeConfig;
use kernel::console::line::{LineEditor, LineEvent};
use kernel::console::shell;
use vmx::caps::Capabilities;

use crate::{print, println, serial};

/// Longest command line accepted; longer ones are refused whole.
const MAX_LINE: usize = 1024;
const HISTORY: usize = 64;

/// What the commands act on: this node.
pub struct Node {
    pub config: NodeConfig,
    pub caps: Capabilities,
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
        x86_64::instructions::interrupts::enable_and_hlt();
    }
}
