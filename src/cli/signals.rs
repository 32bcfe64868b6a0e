//! Stopping on Ctrl-C or SIGTERM without leaving anything behind.
//!
//! The GPU call cannot be cancelled halfway, and the process may sit in it for minutes, so a
//! signal is answered at once by a watcher thread: it waits for any file being written to
//! finish ([`writing`] holds the lock for exactly that window, temporary file included), says
//! so on stderr, and ends the process as the signal's default action would, so the shell sees
//! an interrupted program. Nothing else needs undoing: the output's temporary file exists only
//! while that lock is held.

use std::sync::{Mutex, MutexGuard};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::CliError;

/// Held while an output file is being written, from its temporary file to its rename.
static WRITING: Mutex<()> = Mutex::new(());

/// Starts the watcher. Call once, before any work.
pub fn install() -> Result<(), CliError> {
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| CliError::Usage(format!("cannot watch for Ctrl-C: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                // A panicked writer poisons the lock; its temporary file is gone either way.
                let _guard = WRITING.lock().unwrap_or_else(|e| e.into_inner());
                let name = if signal == SIGINT {
                    "Ctrl-C"
                } else {
                    "SIGTERM"
                };
                eprintln!("\ninterrupted by {name}; no output file was left half-written");
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                std::process::exit(128 + signal);
            }
        })
        .map_err(|e| CliError::Usage(format!("cannot watch for Ctrl-C: {e}")))?;
    Ok(())
}

/// Holds off a signal's exit until the returned guard is dropped.
pub fn writing() -> MutexGuard<'static, ()> {
    WRITING.lock().unwrap_or_else(|e| e.into_inner())
}
