//! Logging set-up: tracing to stderr, text or JSON, level from `RUST_LOG` or the configuration.
//! Nothing logs credentials: upstream passwords are `Secret`s and tokens are never formatted.
//!
//! Lines are formatted where they are logged and written by a thread of their own, in batches:
//! a request never waits for a `write(2)` to stderr (a pipe to journald, a file), and a burst of
//! access lines costs one write, not one per line. Nothing is dropped: when the queue is full,
//! loggers wait for it.

use crate::config::LogFormat;
use std::io::{BufWriter, IsTerminal};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines queued for the writer thread before loggers wait.
const QUEUED_LINES: usize = 16 * 1024;
/// Bytes gathered into one write.
const WRITE_BUFFER: usize = 64 * 1024;

/// Keeps the writer thread running; dropping it writes out every line still queued.
#[must_use = "logging stops (and queued lines may be lost) when the guard is dropped"]
pub struct LogGuard {
    _writer: WorkerGuard,
}

/// Installs the global subscriber; hold the guard until the process ends.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into journald or a log file.
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("regmirror-log")
        .finish(BufWriter::with_capacity(WRITE_BUFFER, std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    LogGuard { _writer: guard }
}
