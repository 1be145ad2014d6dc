//! Progress that tells the truth on a terminal and in a log. Each phase (loading, evaluating N of M, training steps)
//! has its own count and its own ETA: on a terminal a bar per phase, replaced when the phase changes; without one
//! (output to a file, CI), a plain line when a phase starts, at least every `LOG_EVERY` while it runs, and when it
//! ends, with the time since the command started.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(15);

pub struct Display {
    start: Instant,
    tty: bool,
    phase: String,
    phase_start: Instant,
    bar: Option<ProgressBar>,
    last_line: Instant,
    /// The last update of the phase, for its closing line.
    last: (u64, u64, String),
}

impl Display {
    pub fn new() -> Display {
        Display::with_terminal(std::io::stderr().is_terminal())
    }

    /// Plain lines even on a terminal (several displays sharing one).
    pub fn plain() -> Display {
        Display::with_terminal(false)
    }

    fn with_terminal(tty: bool) -> Display {
        let now = Instant::now();
        Display {
            start: now,
            tty,
            phase: String::new(),
            phase_start: now,
            bar: None,
            last_line: now,
            last: (0, 0, String::new()),
        }
    }

    /// `done` of `total` in `phase` (a new phase closes the current one), with a short status `msg`.
    pub fn update(&mut self, phase: &str, done: u64, total: u64, msg: &str) {
        if phase != self.phase {
            self.finish();
            self.phase = phase.to_string();
            self.phase_start = Instant::now();
            if self.tty {
                let bar = ProgressBar::new(total);
                bar.set_style(
                    ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len}  {msg}  {elapsed} (eta {eta})")
                        .expect("valid template"),
                );
                bar.set_prefix(phase.to_string());
                bar.set_position(done);
                // The ETA counts from here: a phase resumed part-way (training after an evaluation) does not
                // count its earlier part as instant.
                bar.reset_eta();
                self.bar = Some(bar);
            } else {
                self.line(phase, done, total, msg);
            }
        }
        self.last = (done, total, msg.to_string());
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(msg.to_string());
            }
            None if self.last_line.elapsed() >= LOG_EVERY => self.line(phase, done, total, msg),
            None => {}
        }
    }

    /// Closes the current phase with a line saying how long it took.
    pub fn finish(&mut self) {
        if self.phase.is_empty() {
            return;
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let (done, total, msg) = self.last.clone();
        let took = self.phase_start.elapsed().as_secs_f64();
        let phase = std::mem::take(&mut self.phase);
        self.line(&format!("{phase} ({took:.0} s)"), done, total, &msg);
    }

    /// A one-off message, above the bar.
    pub fn say(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn line(&mut self, phase: &str, done: u64, total: u64, msg: &str) {
        let t = self.start.elapsed().as_secs();
        let msg = if msg.is_empty() { String::new() } else { format!("  {msg}") };
        eprintln!("[{:>2}:{:02}:{:02}] {phase}: {done}/{total}{msg}", t / 3600, t / 60 % 60, t % 60);
        self.last_line = Instant::now();
    }
}
