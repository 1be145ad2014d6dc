//! SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop, `kill`): the first asks the work in flight to stop at its next
//! safe point — the end of a training step, an evaluation batch — where it keeps what is finished; a second ends the
//! process at once. Either way the exit status is the shell's for the first signal: 130 for SIGINT, 143 for SIGTERM.
//! Ending at once touches no file: checkpoints and reports are written to a temporary name and renamed, so the
//! earlier ones stay whole.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

pub struct Interrupt {
    /// Set by the first signal; the work polls it.
    pub stop: Arc<AtomicBool>,
    code: Arc<AtomicI32>,
}

impl Interrupt {
    /// Listens for the signals on a thread of its own; `what` says what the first signal does ("finishing the
    /// current step and saving a checkpoint").
    pub fn install(what: &'static str) -> std::io::Result<Interrupt> {
        let stop = Arc::new(AtomicBool::new(false));
        let code = Arc::new(AtomicI32::new(0));
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let (flag, first) = (stop.clone(), code.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                let (name, status) = if sig == SIGTERM { ("SIGTERM", 143) } else { ("SIGINT", 130) };
                if flag.swap(true, Ordering::SeqCst) {
                    eprintln!("\n{name} again: quitting now");
                    std::process::exit(first.load(Ordering::SeqCst));
                }
                first.store(status, Ordering::SeqCst);
                eprintln!("\ninterrupted ({name}): {what} (Ctrl-C again to quit now)");
            }
        });
        Ok(Interrupt { stop, code })
    }

    /// The exit status for the signal that stopped the work (130 if none did).
    pub fn exit_code(&self) -> i32 {
        match self.code.load(Ordering::SeqCst) {
            0 => 130,
            c => c,
        }
    }
}
