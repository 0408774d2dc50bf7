//! Many sessions in one command: `provision --count N` and `recover`.
//! One progress line per session (a bar each on a terminal), a tally of
//! done / in flight / failed, and Ctrl-C that tears down every session.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use acode_ec2::driver::{Engine, EngineError, RecoverTally};
use acode_ec2::effects::AwsEffects;
use acode_ec2::events::{ProgressSink, ProvisionProgress, ReadyInstance};
use acode_ec2::request::ProvisionRequest;

use super::cancel::{CancelNotices, Cancellable, until_cancelled};
use super::lock;

/// What a line shows of a session id: enough to tell sessions apart.
fn short(session_id: &str) -> &str {
    session_id.get(..8).unwrap_or(session_id)
}

/// Progress of many sessions: bars on a terminal, plain lines otherwise,
/// nothing beside JSON logs.
pub struct FleetDisplay {
    bars: Option<MultiProgress>,
    lines: bool,
    /// The bar (terminal) or the last line printed (plain) of each session.
    rows: Mutex<HashMap<String, Row>>,
    /// Sessions in the order they were first seen.
    seen: Mutex<Vec<String>>,
    tally: Option<ProgressBar>,
    last_tally: Mutex<Option<RecoverTally>>,
}

enum Row {
    Bar(ProgressBar),
    Line(String),
}

impl FleetDisplay {
    /// `text_logs`: logs go to stderr as text (not JSON), so progress may too.
    pub fn new(text_logs: bool) -> FleetDisplay {
        let terminal = text_logs && std::io::stderr().is_terminal();
        FleetDisplay {
            bars: terminal.then(MultiProgress::new),
            lines: text_logs,
            rows: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
            tally: None,
            last_tally: Mutex::new(None),
        }
    }

    /// With a tally line (recover): done / in flight / failed.
    pub fn with_tally(mut self) -> FleetDisplay {
        if let Some(bars) = &self.bars {
            let bar = bars.add(ProgressBar::new(0));
            let style = ProgressStyle::with_template("recover {bar:30} {pos}/{len} done {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            self.tally = Some(bar);
        }
        self
    }

    /// Sessions seen so far, in order.
    pub fn sessions(&self) -> Vec<String> {
        lock(&self.seen).clone()
    }

    pub fn say(&self, line: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => errln!("{line}"),
        }
    }

    /// Shows how far a recover has got (each change of done or failed as
    /// a line when there is no terminal).
    pub fn tally(&self, t: &RecoverTally) {
        let mut text = format!("{} in flight, {} failed", t.in_flight, t.failed);
        if t.left > 0 {
            text.push_str(&format!(", {} left to another driver", t.left));
        }
        if let Some(bar) = &self.tally {
            bar.set_length(t.total as u64);
            bar.set_position(t.done as u64);
            bar.set_message(text);
            return;
        }
        let mut last = lock(&self.last_tally);
        let changed = last.is_none_or(|l| l.done != t.done);
        if self.lines && changed {
            errln!("recover: {}/{} done, {text}", t.done, t.total);
        }
        *last = Some(*t);
    }

    pub fn finish(&self) {
        for row in lock(&self.rows).values() {
            if let Row::Bar(bar) = row {
                bar.finish();
            }
        }
        if let Some(bar) = &self.tally {
            bar.finish();
        }
    }

    fn new_bar(&self, bars: &MultiProgress, session_id: &str) -> ProgressBar {
        let bar = bars.add(ProgressBar::new(100));
        let style =
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:20} {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(short(session_id).to_string());
        bar
    }
}

impl ProgressSink for FleetDisplay {
    fn progress(&self, p: &ProvisionProgress) {
        let mut rows = lock(&self.rows);
        if !rows.contains_key(&p.session_id) {
            lock(&self.seen).push(p.session_id.clone());
            let row = match &self.bars {
                Some(bars) => Row::Bar(self.new_bar(bars, &p.session_id)),
                None => Row::Line(String::new()),
            };
            rows.insert(p.session_id.clone(), row);
        }
        let line = format!("{:<19} {}", p.phase.name(), p.message);
        match rows.get_mut(&p.session_id) {
            Some(Row::Bar(bar)) => {
                bar.set_position(u64::from(p.percent_complete));
                bar.set_message(line);
            }
            // Polls repeat the same line; print it once.
            Some(Row::Line(last)) if self.lines && *last != line => {
                errln!(
                    "[{:>6.1}s] {} {line}",
                    p.elapsed.as_secs_f64(),
                    short(&p.session_id)
                );
                *last = line;
            }
            _ => {}
        }
    }
}

/// How `provision --count` ended.
pub enum FleetEnd {
    /// Every session settled (after a cancel, if `cancelled`).
    Settled {
        results: Vec<Result<ReadyInstance, EngineError>>,
        cancelled: bool,
    },
    /// A second Ctrl-C: stopped at once, the cancel recorded on these sessions.
    Stopped(Vec<String>),
}

/// Provisions `count` sessions; the first SIGINT or SIGTERM tears every one
/// of them down (sessions recorded later too), a second stops at once and
/// leaves the cancel on record for `recover` (see [`super::cancel`]).
pub async fn provision_fleet(
    engine: &Engine<AwsEffects>,
    request: ProvisionRequest,
    count: usize,
    display: &FleetDisplay,
) -> Result<FleetEnd> {
    let work = engine.provision_many(request, count, display);
    let notice = "cancelling: tearing every session down (press Ctrl-C again to stop at once; \
                  the sessions stay checkpointed for `acode-ec2 recover`)";
    Ok(
        match until_cancelled(engine, work, display, notice).await? {
            Cancellable::Finished { outcome, cancelled } => FleetEnd::Settled {
                results: outcome,
                cancelled,
            },
            Cancellable::Stopped(sessions) => FleetEnd::Stopped(sessions),
        },
    )
}

impl CancelNotices for FleetDisplay {
    fn sessions(&self) -> Vec<String> {
        FleetDisplay::sessions(self)
    }

    fn say(&self, line: &str) {
        FleetDisplay::say(self, line);
    }
}
