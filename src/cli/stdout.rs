//! Standard output that a reader going away cannot crash: `acode-ec2
//! sessions | head -1` ends quietly, and a provision whose reader left
//! still finishes (and records) its work. `println!` panics instead.
//!
//! Invariant: writing here never panics; once stdout fails, later writes
//! are skipped, and a failure other than a closed pipe is said once on
//! stderr.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static GONE: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout and flushes it, unless stdout already failed.
pub fn write(text: fmt::Arguments<'_>) {
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        GONE.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
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
