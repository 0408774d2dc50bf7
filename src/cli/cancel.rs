//! Ctrl-C for the commands that provision: the first SIGINT or SIGTERM
//! tears down every session the work has recorded (and each it records
//! later) through the machine's cleanup, with progress still shown; a
//! second stops at once and leaves the cancel on record, so `recover`
//! finishes the cleanup instead of the provisioning.
//!
//! Invariant: a cancel goes in only by the engine's one way in
//! (`deliver`, or `note` when stopping), and never twice for a session.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::signal::unix::{SignalKind, signal};

use acode_ec2::driver::Engine;
use acode_ec2::effects::AwsEffects;
use acode_ec2::events::NoProgress;
use acode_ec2::machine::OutsideInput;

/// How work under [`until_cancelled`] ended.
pub enum Cancellable<T> {
    /// It ran to its end (after a cancel, if `cancelled`).
    Finished { outcome: T, cancelled: bool },
    /// A second signal: stopped at once, the cancel recorded on these sessions.
    Stopped(Vec<String>),
}

/// What [`until_cancelled`] tells the user, and where.
pub trait CancelNotices {
    /// The sessions the work has recorded so far.
    fn sessions(&self) -> Vec<String>;
    /// A line for the user beside the progress display.
    fn say(&self, line: &str);
}

/// Drives `work` to its end under SIGINT and SIGTERM (see the module doc);
/// `first_notice` is what the first signal prints.
pub async fn until_cancelled<T>(
    engine: &Engine<AwsEffects>,
    work: impl Future<Output = T>,
    notices: &impl CancelNotices,
    first_notice: &str,
) -> Result<Cancellable<T>> {
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    // Boxed, not pinned in place: a second signal drops it mid-way.
    let mut work = Box::pin(work);
    let mut cancelling = false;
    let mut cancelled: HashSet<String> = HashSet::new();
    let mut deliveries = FuturesUnordered::new();
    loop {
        if cancelling {
            for id in notices.sessions() {
                if cancelled.insert(id.clone()) {
                    deliveries.push(Box::pin(async move {
                        let answer = engine
                            .deliver(&id, OutsideInput::TeardownRequested, &NoProgress)
                            .await;
                        (id, answer)
                    }));
                }
            }
        }
        let mut signalled = false;
        tokio::select! {
            outcome = &mut work => {
                return Ok(Cancellable::Finished { outcome, cancelled: cancelling });
            }
            _ = interrupt.recv() => signalled = true,
            _ = terminate.recv() => signalled = true,
            Some((id, answer)) = deliveries.next(), if !deliveries.is_empty() => {
                if let Err(e) = answer {
                    notices.say(&format!("session {id}: the teardown was not taken: {e}"));
                }
            }
            // Sessions not recorded yet: look again shortly.
            _ = tokio::time::sleep(Duration::from_millis(50)), if cancelling => {}
        }
        if !signalled {
            continue;
        }
        if cancelling {
            drop(work);
            drop(deliveries);
            let sessions = notices.sessions();
            for id in &sessions {
                if let Err(e) = engine.note(id, OutsideInput::TeardownRequested).await {
                    notices.say(&format!("session {id}: could not record the cancel: {e}"));
                }
            }
            return Ok(Cancellable::Stopped(sessions));
        }
        cancelling = true;
        notices.say(first_notice);
    }
}
