//! `log` backend: one serial line per record, stamped with the node's uptime.

use log::{LevelFilter, Log, Metadata, Record};

use crate::{clock, serial};

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let micros = clock::uptime_us();
        serial::write_fmt(format_args!(
            "[{:>5}.{:06}] {:<5} {}: {}\n",
            micros / 1_000_000,
            micros % 1_000_000,
            record.level(),
            record.target(),
            record.args()
        ));
    }

    fn flush(&self) {}
}

/// Installs the logger with the given level filter.
pub fn init(level: LevelFilter) {
    // A second call fails harmlessly: the logger is already ours.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
