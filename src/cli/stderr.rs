//! Lines for the user on stderr: plain text, or with `--log-format json`
//! one JSON object per line shaped like the log lines beside them, so a
//! reader of the log stream never meets a line that does not parse.
//!
//! Invariant: every line the CLI itself writes to stderr goes through
//! [`say`] (or the tracing subscriber, or a progress bar, which exists
//! only without JSON logs). Not its own, so not JSON: the output of the
//! user's hook commands (`--on-ready` under `--json`, `--on-interruption`),
//! clap's usage errors (printed before the format is known) and panics.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use aws_sdk_ec2::primitives::{DateTime, DateTimeFormat};

static JSON: AtomicBool = AtomicBool::new(false);

/// Makes later lines JSON objects (`--log-format json`).
pub fn use_json() {
    JSON.store(true, Ordering::Relaxed);
}

/// Writes one line; an `error: ` or `warning: ` prefix sets its level
/// in JSON. A stderr that cannot be written is left alone: there is no
/// one left to tell.
pub fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    if !JSON.load(Ordering::Relaxed) {
        let _ = writeln!(err, "{line}");
        return;
    }
    let (level, message) = if let Some(rest) = line.strip_prefix("error: ") {
        ("ERROR", rest)
    } else if let Some(rest) = line.strip_prefix("warning: ") {
        ("WARN", rest)
    } else {
        ("INFO", line)
    };
    let timestamp = DateTime::from(std::time::SystemTime::now())
        .fmt(DateTimeFormat::DateTime)
        .unwrap_or_default();
    let object = serde_json::json!({
        "timestamp": timestamp,
        "level": level,
        "fields": {"message": message},
        "target": "acode_ec2::cli",
    });
    let _ = writeln!(err, "{object}");
}

/// `eprintln!` through [`say`].
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::stderr::say(&format!($($arg)*))
    };
}
