//! Progress of the long operator commands (`warm`, `verify`, `gc`): a bar on a terminal (bytes
//! and objects done of the total known so far, rate, time left; drawn by `indicatif`), a plain
//! line every few seconds and at the end when stderr is not a terminal (logs, CI). The work
//! reports through [`Report`], which knows nothing of terminals.

use crate::config::format_byte_size;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A plain line at most this often.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// What long work tells about its progress.
pub trait Report: Sync {
    /// More work became known: `objects` more, of `bytes` more.
    fn planned(&self, objects: u64, bytes: u64);
    /// Work done: `objects` more, `bytes` more.
    fn done(&self, objects: u64, bytes: u64);
}

/// Reports to nobody.
pub struct Silent;

impl Report for Silent {
    fn planned(&self, _: u64, _: u64) {}
    fn done(&self, _: u64, _: u64) {}
}

/// Progress shown to the person running a command.
pub struct Progress {
    what: &'static str,
    bar: Option<ProgressBar>,
    objects: AtomicU64,
    objects_planned: AtomicU64,
    bytes: AtomicU64,
    bytes_planned: AtomicU64,
    started: Instant,
    last_line: Mutex<Instant>,
    /// A spinner: cleared when done.
    quiet: bool,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn start(what: &'static str) -> Progress {
        Progress::new(what, std::io::stderr().is_terminal())
    }

    fn new(what: &'static str, terminal: bool) -> Progress {
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30.cyan/blue}] {binary_bytes}/{binary_total_bytes} · {msg} · {binary_bytes_per_sec} · {eta} left",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Progress {
            what,
            bar,
            objects: AtomicU64::new(0),
            objects_planned: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            bytes_planned: AtomicU64::new(0),
            started: now,
            last_line: Mutex::new(now),
            quiet: false,
        }
    }

    /// A spinner with the time elapsed on a terminal (work whose size is not known here, such
    /// as a command a server runs), nothing otherwise.
    pub fn waiting(what: &'static str) -> Progress {
        let mut progress = Progress::new(what, false);
        progress.quiet = true;
        if std::io::stderr().is_terminal() {
            let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            spinner.set_style(
                ProgressStyle::with_template("{spinner} {prefix} · {elapsed}")
                    .expect("a valid template"),
            );
            spinner.set_prefix(what);
            spinner.enable_steady_tick(Duration::from_millis(120));
            progress.bar = Some(spinner);
        }
        progress
    }

    /// Prints a line (above the bar on a terminal).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn objects_text(&self) -> String {
        format!(
            "{}/{} objects",
            self.objects.load(Ordering::Relaxed),
            self.objects_planned.load(Ordering::Relaxed)
        )
    }

    /// The plain line: objects and bytes done of those planned, and the rate.
    fn line(&self) -> String {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{}: {}, {} of {}, {}/s",
            self.what,
            self.objects_text(),
            format_byte_size(bytes),
            format_byte_size(self.bytes_planned.load(Ordering::Relaxed)),
            format_byte_size((bytes as f64 / seconds) as u64)
        )
    }

    /// The bar's last state stays on the terminal; a plain run prints its last line.
    pub fn finish(&self) {
        match &self.bar {
            Some(bar) if self.quiet => bar.finish_and_clear(),
            Some(bar) => {
                // As far as it got (`finish` would fill the bar even after a failure).
                bar.set_message(self.objects_text());
                bar.abandon();
            }
            None if self.quiet => {}
            None => eprintln!("{}", self.line()),
        }
    }
}

impl Report for Progress {
    fn planned(&self, objects: u64, bytes: u64) {
        self.objects_planned.fetch_add(objects, Ordering::Relaxed);
        let total = self
            .bytes_planned
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_message(self.objects_text());
        }
    }

    fn done(&self, objects: u64, bytes: u64) {
        self.objects.fetch_add(objects, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        match &self.bar {
            Some(bar) => {
                bar.inc(bytes);
                if objects > 0 {
                    bar.set_message(self.objects_text());
                }
            }
            None => {
                let mut last = self
                    .last_line
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if last.elapsed() >= PLAIN_EVERY {
                    *last = Instant::now();
                    eprintln!("{}", self.line());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_was_planned_and_done() {
        let progress = Progress::new("verify", false);
        progress.planned(2, 3 << 20);
        progress.done(1, 1 << 20);
        assert!(progress
            .line()
            .starts_with("verify: 1/2 objects, 1.0 MiB of 3.0 MiB, "));
    }
}
