//! Standard output that a reader going away cannot crash: `acode-ec2
//! sessions | head -1` ends quietly, and a provision whose reader left
//! still finishes (and records) its work. `println!` panics instead.
//!
//! Invariant: writing here never panics; once stdout fails, later writes
//! are skipped. A closed pipe is the reader's choice; any other failure
//! (a full disk under `> ready.json`) is said once on stderr and makes the
//! command exit 1 ([`lost_output`]).

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static GONE: AtomicBool = AtomicBool::new(false);
static LOST: AtomicBool = AtomicBool::new(false);

/// Whether output was lost for a reason other than a reader that left.
pub fn lost_output() -> bool {
    LOST.load(Ordering::Relaxed)
}

/// Writes `text` to stdout and flushes it, unless stdout already failed.
pub fn write(text: fmt::Arguments<'_>) {
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        GONE.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
            LOST.store(true, Ordering::Relaxed);
            super::stderr::say(&format!(
                "warning: cannot write to standard output: {e}; the rest is not printed"
            ));
        }
    }
}

/// `println!` through [`write`].
macro_rules! outln {
    () => {
        $crate::cli::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`write`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!($($arg)*))
    };
}
