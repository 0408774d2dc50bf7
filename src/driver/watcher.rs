//! The watcher (FR-032–035): looks after Ready spot sessions until EC2
//! gives notice of taking an instance back, then tells the caller (event
//! and hook), hands the notice to the machine and, with
//! `spotInterruption.replace`, starts the session that takes over.
//!
//! Invariants: a notice enters a session only as an outside input,
//! committed like any other, so a watcher killed at any point leaves a
//! session `recover` finishes; the replacement's id is derived by the
//! machine and a session is created at most once per id, so nothing a
//! watcher or `recover` repeats starts a second replacement.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::{info, warn};

use super::{Engine, EngineError, Recovered};
use crate::effects::Effects;
use crate::effects::interruption::InterruptionCheck;
use crate::events::{InterruptedInstance, ProgressSink, ProvisionEvent};
use crate::machine::{InterruptionNotice, OutsideInput, PhaseKind, ProvisionPhase, Ready};
use crate::store::{LoadedSession, SessionSummary, StoreError};

/// FR-032: how often each Ready spot session is looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// The least time an interruption hook gets, even past the notice time.
pub const MIN_HOOK_TIME: Duration = Duration::from_secs(5);

/// What the caller runs when a notice arrives (once it is committed,
/// beside the shutdown command); it is given the time left before EC2
/// acts, and at least [`MIN_HOOK_TIME`].
pub type InterruptionHook =
    Arc<dyn Fn(InterruptedInstance) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A notice being acted on (hook, shutdown command, cleanup, replacement).
type InFlight<'a> = Pin<Box<dyn Future<Output = WatchedNotice> + Send + 'a>>;

/// Which sessions to watch, how often, and for how long.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// These sessions only; all Ready spot sessions when empty (which
    /// includes replacements as they become Ready).
    pub sessions: Vec<String>,
    pub interval: Duration,
    /// Return once no watched session is Ready and nothing is in flight
    /// (else watch until the future is dropped).
    pub until_idle: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            sessions: Vec::new(),
            interval: WATCH_INTERVAL,
            until_idle: false,
        }
    }
}

/// Listings of the sessions that may fail in a row before the watch ends
/// with the error.
const LIST_FAILURES_TOLERATED: u32 = 3;

/// What became of one notice: where the session settled, and the
/// replacement, if one was asked for.
#[derive(Debug)]
pub struct WatchedNotice {
    pub session_id: String,
    /// `None` for an interruption an earlier watcher left mid-way.
    pub notice: Option<InterruptionNotice>,
    pub settled: Result<PhaseKind, EngineError>,
    pub replacement: Option<Recovered>,
}

impl<E: Effects> Engine<E> {
    /// Runs `hook` for each interruption notice this engine's watcher sees,
    /// before the session moves on (bounded by the time left).
    pub fn on_interruption(mut self, hook: InterruptionHook) -> Engine<E> {
        self.interruption_hook = Some(hook);
        self
    }

    /// Watches Ready spot sessions every `options.interval` and acts on
    /// each notice (see the module docs). Returns what it did when
    /// `until_idle` and nothing is left to watch; otherwise runs until the
    /// future is dropped (which is safe at any point).
    pub async fn watch(
        &self,
        options: &WatchOptions,
        progress: &dyn ProgressSink,
    ) -> Result<Vec<WatchedNotice>, EngineError> {
        let mut done = Vec::new();
        let mut noticed: HashSet<String> = HashSet::new();
        let mut in_flight: FuturesUnordered<InFlight<'_>> = FuturesUnordered::new();
        // What an earlier watcher left mid-way is finished first: an
        // interruption under way, or a replacement not yet settled.
        for summary in self.store.list().await? {
            let asked =
                options.sessions.is_empty() || options.sessions.contains(&summary.session_id);
            if !asked || summary.phase.is_settled() {
                continue;
            }
            let Some(session) = self.readable(&summary.session_id).await else {
                continue;
            };
            if session.state.phase.is_interruption_underway() {
                let resumed = self.finish_interruption(summary.session_id, None, progress);
                in_flight.push(Box::pin(resumed));
            } else if session.context.replaces.is_some() {
                in_flight.push(Box::pin(
                    self.finish_replacement(summary.session_id, progress),
                ));
            }
        }
        let mut failed_lists = 0;
        loop {
            let watched = match self.watched_sessions(options, &noticed).await {
                Ok(watched) => {
                    failed_lists = 0;
                    Some(watched)
                }
                // A busy database may recover: look again later, and let
                // what is in flight go on meanwhile. One that keeps failing
                // ends the watch with its error (a watcher blind for good
                // must not look as if it watched).
                Err(e) => {
                    failed_lists += 1;
                    if failed_lists >= LIST_FAILURES_TOLERATED {
                        return Err(e);
                    }
                    warn!(error = %e, "cannot list the sessions to watch; trying again");
                    None
                }
            };
            // Idle only when the store said so: a failed listing is not "none".
            let idle = watched.as_ref().is_some_and(Vec::is_empty);
            if options.until_idle && idle && in_flight.is_empty() {
                return Ok(done);
            }
            let watched = watched.unwrap_or_default();
            // Each look is acted on as it answers; what is in flight goes
            // on meanwhile, so a slow look never holds up a notice.
            let mut looks: FuturesUnordered<_> = watched
                .iter()
                .map(|(session, ready)| async move {
                    let check = self
                        .effects
                        .check_interruption(&session.context, ready)
                        .await;
                    (session, ready, check)
                })
                .collect();
            while !looks.is_empty() {
                tokio::select! {
                    Some((session, ready, check)) = looks.next() => {
                        let id = &session.context.session_id;
                        match check {
                            InterruptionCheck::Noticed(notice) => {
                                noticed.insert(id.clone());
                                let told = InterruptedInstance::new(&session.context, ready, &notice);
                                in_flight.push(Box::pin(self.act_on(told, notice, progress)));
                            }
                            InterruptionCheck::Quiet { .. } => {}
                            InterruptionCheck::Unknown(why) => {
                                warn!(session_id = %id, %why, "cannot tell whether the spot instance is being interrupted");
                            }
                        }
                    }
                    Some(finished) = in_flight.next(), if !in_flight.is_empty() => {
                        self.settle_notice(finished, &mut noticed, &mut done).await;
                    }
                }
            }
            drop(looks);
            let next_look = self
                .clock
                .sleep_until(self.clock.now().plus(options.interval));
            tokio::pin!(next_look);
            loop {
                tokio::select! {
                    () = &mut next_look => break,
                    Some(finished) = in_flight.next(), if !in_flight.is_empty() => {
                        self.settle_notice(finished, &mut noticed, &mut done).await;
                    }
                }
            }
        }
    }

    /// Records what became of a notice. A session still Ready (its notice
    /// could not be committed: a busy store, another driver) is looked at
    /// again, so no notice is dropped.
    async fn settle_notice(
        &self,
        finished: WatchedNotice,
        noticed: &mut HashSet<String>,
        done: &mut Vec<WatchedNotice>,
    ) {
        let still_ready = match self.store.summary(&finished.session_id).await {
            Ok(summary) => summary.phase == PhaseKind::Ready,
            Err(_) => true,
        };
        if still_ready {
            noticed.remove(&finished.session_id);
        }
        done.push(finished);
    }

    /// The session, or a warning and `None` when the store cannot read it:
    /// one damaged session must not stop the others being watched.
    async fn readable(&self, session_id: &str) -> Option<LoadedSession> {
        match self.store.load(session_id).await {
            Ok(session) => Some(session),
            Err(e) => {
                warn!(%session_id, error = %e, "cannot read the session; leaving it out of the watch");
                None
            }
        }
    }

    /// The Ready spot sessions to look at (those asked for, or all), less
    /// those whose notice is already being acted on.
    async fn watched_sessions(
        &self,
        options: &WatchOptions,
        noticed: &HashSet<String>,
    ) -> Result<Vec<(LoadedSession, Ready)>, EngineError> {
        let mut watched = Vec::new();
        for summary in self.store.list().await? {
            let asked =
                options.sessions.is_empty() || options.sessions.contains(&summary.session_id);
            if !asked
                || summary.phase != PhaseKind::Ready
                || !summary.was_spot
                || noticed.contains(&summary.session_id)
            {
                continue;
            }
            let Some(session) = self.readable(&summary.session_id).await else {
                continue;
            };
            if let ProvisionPhase::Ready(ready) = &session.state.phase {
                let ready = ready.clone();
                watched.push((session, ready));
            }
        }
        Ok(watched)
    }

    /// One notice: tell (event), commit it, then run the hook (bounded by
    /// the time left) beside the drive of the session to its end and the
    /// replacement, if any. Committed first, so a watcher killed in the
    /// hook leaves a session `recover` finishes.
    async fn act_on(
        &self,
        told: InterruptedInstance,
        notice: InterruptionNotice,
        progress: &dyn ProgressSink,
    ) -> WatchedNotice {
        let id = told.session_id.clone();
        info!(session_id = %id, action = %notice.action, source = %notice.source, "spot interruption notice");
        let _ = self.events.send(ProvisionEvent::InterruptionNotice {
            session_id: id.clone(),
            instance_id: told.instance_id.clone(),
            action: notice.action.clone(),
            time_ms: notice.at.0,
            source: notice.source.clone(),
        });
        let input = OutsideInput::InterruptionNoticed(notice.clone());
        if let Err(e) = self.note(&id, input).await {
            // Another watcher may have committed it first: then finish it.
            let underway = self
                .store
                .load(&id)
                .await
                .is_ok_and(|s| s.state.phase.is_interruption_underway());
            if !underway {
                return WatchedNotice {
                    session_id: id,
                    notice: Some(notice),
                    settled: Err(e),
                    replacement: None,
                };
            }
        }
        let notice_at = notice.at;
        let hook = async {
            let Some(hook) = &self.interruption_hook else {
                return;
            };
            // It runs here, not on the instance: a few seconds even when
            // EC2 has already acted.
            let left =
                Duration::from_millis(self.clock.now().millis_until(notice_at)).max(MIN_HOOK_TIME);
            if tokio::time::timeout(left, hook(told)).await.is_err() {
                warn!(session_id = %id, "the interruption hook ran out of time");
            }
        };
        let (_, finished) = tokio::join!(
            hook,
            self.finish_interruption(id.clone(), Some(notice), progress)
        );
        finished
    }

    /// Drives a replacement an earlier watcher left unsettled.
    async fn finish_replacement(&self, id: String, progress: &dyn ProgressSink) -> WatchedNotice {
        let settled = Box::pin(self.resume_to_end(&id, progress))
            .await
            .map(|s| s.state.phase.kind());
        WatchedNotice {
            session_id: id,
            notice: None,
            settled,
            replacement: None,
        }
    }

    /// Drives an interrupted session to its end while its replacement (if
    /// one is named and not started yet) is provisioned beside it.
    async fn finish_interruption(
        &self,
        id: String,
        notice: Option<InterruptionNotice>,
        progress: &dyn ProgressSink,
    ) -> WatchedNotice {
        // Boxed: a drive is a deep future, and two of them side by side
        // would not fit a thread's stack in debug builds.
        let cleanup = Box::pin(async {
            self.resume_to_end(&id, progress)
                .await
                .map(|s| s.state.phase.kind())
        });
        let takeover = Box::pin(async {
            let summary = self.store.summary(&id).await.ok()?;
            self.start_missing_replacement(&summary, progress)
                .await
                .unwrap_or_else(|e| {
                    Some(Recovered {
                        session_id: format!("(replacement of {id})"),
                        result: Err(e),
                    })
                })
        });
        let (settled, replacement) = tokio::join!(cleanup, takeover);
        WatchedNotice {
            session_id: id,
            notice,
            settled,
            replacement,
        }
    }

    /// Starts the replacement an interruption named for `summary`'s session
    /// if it does not exist yet, and drives it until it settles.
    pub(super) async fn start_missing_replacement(
        &self,
        summary: &SessionSummary,
        progress: &dyn ProgressSink,
    ) -> Result<Option<Recovered>, EngineError> {
        let named = matches!(
            summary.phase,
            PhaseKind::Interrupting
                | PhaseKind::TerminatingInstance
                | PhaseKind::DeletingKeyPair
                | PhaseKind::Interrupted
        );
        if !named {
            return Ok(None);
        }
        let session = self.store.load(&summary.session_id).await?;
        let Some(replacement) = session.state.phase.replacement().map(str::to_string) else {
            return Ok(None);
        };
        match self.store.summary(&replacement).await {
            Err(StoreError::NotFound(_)) => {}
            Ok(_) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let _ = self.events.send(ProvisionEvent::SessionReplaced {
            session_id: summary.session_id.clone(),
            replacement: replacement.clone(),
        });
        info!(session_id = %summary.session_id, %replacement, "starting the replacement session");
        let request = session.context.request.clone();
        let started = self.start(
            replacement.clone(),
            request,
            Some(summary.session_id.clone()),
            progress,
        );
        let result = Box::pin(started).await.map(|s| s.state.phase.kind());
        Ok(Some(Recovered {
            session_id: replacement,
            result,
        }))
    }
}
