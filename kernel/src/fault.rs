//! The end of the road: panics and fatal exceptions stop the node the way its configuration
//! says (`on_panic = halt` keeps the machine up for inspection, `exit` powers the emulator off
//! with a failure status, which is what tests want).

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::power;
use crate::serial;

static EXIT_ON_FAULT: AtomicBool = AtomicBool::new(false);

/// Chooses what [`stop_node`] does.
pub fn set_exit_on_fault(exit: bool) {
    EXIT_ON_FAULT.store(exit, Ordering::Relaxed);
}

/// Stops this node for good after a fault. Never returns.
pub fn stop_node(reason: &str) -> ! {
    if EXIT_ON_FAULT.load(Ordering::Relaxed) {
        serial::emergency_write(format_args!("{reason}: node exits (on_panic = exit)\n"));
        power::exit_emulator_failure();
    }
    serial::emergency_write(format_args!("{reason}: node halted (on_panic = halt)\n"));
    power::halt_forever()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    x86_64::instructions::interrupts::disable();
    match info.location() {
        Some(loc) => serial::emergency_write(format_args!(
            "PANIC at {}:{}:{}: {}\n",
            loc.file(),
            loc.line(),
            loc.column(),
            info.message()
        )),
        None => serial::emergency_write(format_args!("PANIC: {}\n", info.message())),
    }
    stop_node("panic")
}
