//! One way out for everything a session does: the driver reports each
//! [`Observation`] once, and an [`Observer`] per audience turns it into
//! what that audience wants: tracing logs, typed events for subscribers,
//! the caller's progress display (and metrics, as another observer).
//!
//! Invariant: observers see ids, phases, addresses and reasons, never key
//! material, and cannot change what the driver does.

use std::time::Duration;

use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::events::{ProgressSink, ProvisionEvent, ProvisionProgress, ReadyInstance};
use crate::machine::{
    CleanupCause, Effect, Guard, Guards, Input, Notice, PhaseKind, ProvisionPhase, SessionContext,
    SessionState, SpotSavings, Timestamp,
};
use crate::store::{Checkpoint, Intent, LoadedSession};
use crate::telemetry;

/// Something that happened to a session, as the driver saw it.
pub enum Observation<'a> {
    /// A new session was recorded.
    Started {
        context: &'a SessionContext,
        at: Timestamp,
        /// The AWS region its calls go to, when the effects know it.
        region: Option<&'a str>,
    },
    /// A driver picked the session up from its log.
    Resumed {
        session: &'a LoadedSession,
        at: Timestamp,
    },
    /// A checkpoint was committed: an input, the state it led to, the next intent.
    Stepped {
        context: &'a SessionContext,
        before: &'a SessionState,
        checkpoint: &'a Checkpoint,
        notices: &'a [Notice],
        /// The guards the machine's decision tested.
        guards: Guards,
        created_at: Timestamp,
        at: Timestamp,
        /// Since this driver picked the session up.
        elapsed: Duration,
    },
    /// The session settled (Ready, Failed, TornDown or Interrupted) under this driver.
    Settled {
        context: &'a SessionContext,
        state: &'a SessionState,
        created_at: Timestamp,
        at: Timestamp,
    },
}

pub trait Observer: Send + Sync {
    fn observe(&self, observation: &Observation<'_>);
}

/// Several observers as one.
pub struct Fanout<'a>(pub Vec<&'a dyn Observer>);

impl Observer for Fanout<'_> {
    fn observe(&self, observation: &Observation<'_>) {
        for observer in &self.0 {
            observer.observe(observation);
        }
    }
}

/// Logs through `tracing`, inside the session's span.
pub struct TracingObserver;

impl Observer for TracingObserver {
    fn observe(&self, observation: &Observation<'_>) {
        match observation {
            Observation::Started { context, .. } => {
                info!(instance_type = %context.request.instance_type, "provisioning started")
            }
            Observation::Resumed { session, .. } => {
                let span = tracing::Span::current();
                span.record("phase", session.state.phase.kind().name());
                if let Some(id) = session.state.phase.instance_id() {
                    span.record("instance_id", id);
                }
                info!(
                    phase = %session.state.phase.kind(),
                    pending = session.pending.as_ref().map(|i| i.effect.name()),
                    "resuming"
                );
            }
            Observation::Stepped {
                before,
                checkpoint,
                notices,
                guards,
                ..
            } => {
                let (from, to) = (before.phase.kind(), checkpoint.state.phase.kind());
                if from != to {
                    let span = tracing::Span::current();
                    span.record("phase", to.name());
                    if let Some(id) = checkpoint.state.phase.instance_id() {
                        span.record("instance_id", id);
                    }
                    info!(%from, %to, "phase changed");
                }
                for notice in notices.iter() {
                    log_notice(notice);
                }
                if let Some(Input::TransientFailure { message }) = &checkpoint.outcome {
                    // Counted from before: a phase that gives up starts the next at zero.
                    let failures = before.transient_failures + 1;
                    if guards.contains(Guard::AskOperator) {
                        warn!(%message, failures, "transient failure; cleanup stops here for an operator");
                    } else if from == to {
                        warn!(%message, failures, "transient failure, will retry");
                    } else {
                        warn!(%message, failures, "transient failure, giving up on {from}");
                    }
                }
            }
            Observation::Settled { state, .. } => {
                let error = state.phase.end_reason();
                info!(phase = %state.phase.kind(), error, "session settled");
            }
        }
    }
}

fn log_notice(notice: &Notice) {
    match notice {
        Notice::SpotFallback { reason, request_id } => {
            warn!(%reason, request_id, "spot capacity given up, falling back to on-demand");
        }
        Notice::PlacementChosen {
            subnets,
            basis,
            gaps,
        } => {
            let order = subnets.join(", ");
            if gaps.is_empty() {
                info!(%order, %basis, "placement chosen");
            } else {
                let gaps = gaps.join("; ");
                warn!(%order, %basis, %gaps, "placement chosen without every fact");
            }
        }
        Notice::SpotSavings {
            instance_id,
            savings,
        } => info!(instance_id, %savings, "spot savings"),
    }
}

/// The event a notice is told as, if any (placement is only logged).
fn notice_event(session_id: &str, notice: &Notice, at: Timestamp) -> Option<ProvisionEvent> {
    let session_id = session_id.to_string();
    match notice {
        Notice::SpotFallback { reason, request_id } => Some(ProvisionEvent::SpotFallback {
            session_id,
            spot_request_id: request_id.clone(),
            reason: reason.clone(),
            at_ms: at.0,
        }),
        Notice::PlacementChosen { .. } => None,
        Notice::SpotSavings {
            instance_id,
            savings,
        } => {
            let (spot_price, on_demand_price, unknown) = match savings {
                SpotSavings::Known {
                    spot_price,
                    on_demand_price,
                    ..
                } => (
                    Some(spot_price.as_dollars()),
                    Some(on_demand_price.as_dollars()),
                    None,
                ),
                SpotSavings::Unknown { why } => (None, None, Some(why.clone())),
            };
            Some(ProvisionEvent::SpotSavings {
                session_id,
                instance_id: instance_id.clone(),
                spot_price,
                on_demand_price,
                savings_percent: savings.savings_percent(),
                unknown_reason: unknown,
                summary: savings.to_string(),
            })
        }
    }
}

/// Typed events on a broadcast channel, for library subscribers.
pub struct EventChannel(pub broadcast::Sender<ProvisionEvent>);

impl EventChannel {
    fn emit(&self, event: ProvisionEvent) {
        // No subscribers is fine: events are for whoever listens.
        let _ = self.0.send(event);
    }
}

impl Observer for EventChannel {
    fn observe(&self, observation: &Observation<'_>) {
        match observation {
            Observation::Started {
                context,
                at,
                region,
            } => self.emit(ProvisionEvent::ProvisionStarted {
                session_id: context.session_id.clone(),
                instance_type: context.request.instance_type.clone(),
                region: region.map(str::to_string),
                use_spot: context.request.spot.is_some(),
                at_ms: at.0,
            }),
            Observation::Resumed { .. } => {}
            Observation::Stepped {
                context,
                before,
                checkpoint,
                notices,
                at,
                ..
            } => {
                let (from, to) = (before.phase.kind(), checkpoint.state.phase.kind());
                if from != to {
                    self.emit(ProvisionEvent::ProvisionPhaseChanged {
                        session_id: context.session_id.clone(),
                        from,
                        to,
                        at_ms: at.0,
                    });
                }
                for notice in notices.iter() {
                    if let Some(event) = notice_event(&context.session_id, notice, *at) {
                        self.emit(event);
                    }
                }
            }
            Observation::Settled {
                context,
                state,
                created_at,
                at,
            } => {
                let phase = &state.phase;
                self.emit(ProvisionEvent::ProvisionCompleted {
                    session_id: context.session_id.clone(),
                    success: phase.kind() == PhaseKind::Ready,
                    phase: phase.kind(),
                    instance_id: phase.instance_id().map(str::to_string),
                    public_ip: phase.public_ip().map(str::to_string),
                    was_spot: phase.was_spot(),
                    // From the session's creation, whoever drove it.
                    duration_ms: created_at.millis_until(*at),
                    error: phase.end_reason().map(str::to_string),
                });
            }
        }
    }
}

/// Metrics through the `metrics` facade (see [`crate::telemetry`] for the
/// names): phase durations, time to settle, retries, fallbacks, failovers,
/// and a gauge of sessions per phase. Keeps, per session it has seen, the
/// phase it is in and since when.
#[derive(Default)]
pub struct MetricsObserver {
    phases: std::sync::Mutex<std::collections::HashMap<String, (PhaseKind, Timestamp)>>,
}

fn capacity(context: &SessionContext, phase: &ProvisionPhase) -> &'static str {
    let spot = phase
        .instance()
        .map_or(context.request.spot.is_some(), |i| i.was_spot);
    if spot { "spot" } else { "on_demand" }
}

impl MetricsObserver {
    /// Moves the session's gauge and clock to `phase` (or off the books).
    fn enter(
        &self,
        session_id: &str,
        phase: Option<PhaseKind>,
        at: Timestamp,
    ) -> Option<(PhaseKind, Timestamp)> {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        let before = match phase {
            Some(phase) => phases.insert(session_id.to_string(), (phase, at)),
            None => phases.remove(session_id),
        };
        if let Some((old, _)) = before {
            metrics::gauge!(telemetry::SESSIONS, "phase" => old.name()).decrement(1.0);
        }
        if let Some(phase) = phase {
            metrics::gauge!(telemetry::SESSIONS, "phase" => phase.name()).increment(1.0);
        }
        before
    }
}

impl Observer for MetricsObserver {
    fn observe(&self, observation: &Observation<'_>) {
        match observation {
            Observation::Started { context, at, .. } => {
                self.enter(&context.session_id, Some(PhaseKind::Validating), *at);
            }
            Observation::Resumed { session, at } => {
                let phase = session.state.phase.kind();
                self.enter(&session.context.session_id, Some(phase), *at);
            }
            Observation::Stepped {
                context,
                before,
                checkpoint,
                notices,
                guards,
                created_at,
                at,
                ..
            } => {
                let from = before.phase.kind();
                let phase = &checkpoint.state.phase;
                if let Some(Input::TransientFailure { .. }) = &checkpoint.outcome {
                    metrics::counter!(telemetry::RETRIES, "phase" => from.name()).increment(1);
                }
                let fallbacks = notices
                    .iter()
                    .filter(|n| matches!(n, Notice::SpotFallback { .. }))
                    .count();
                if fallbacks > 0 {
                    metrics::counter!(telemetry::SPOT_FALLBACKS).increment(fallbacks as u64);
                }
                if guards.iter().any(|g| g == Guard::MoreSubnets) {
                    metrics::counter!(telemetry::SUBNET_FAILOVERS).increment(1);
                }
                if from == phase.kind() {
                    return;
                }
                let left = capacity(context, &before.phase);
                let entered = self.enter(&context.session_id, Some(phase.kind()), *at);
                if let Some((_, since)) = entered {
                    metrics::histogram!(telemetry::PHASE_SECONDS, "phase" => from.name(), "capacity" => left)
                        .record(since.millis_until(*at) as f64 / 1000.0);
                }
                let outcome = match phase.kind() {
                    PhaseKind::Ready => "ready",
                    PhaseKind::Failed => "failed",
                    PhaseKind::TornDown if from != PhaseKind::Ready => "torn_down",
                    _ => return,
                };
                let settled = capacity(context, phase);
                metrics::histogram!(telemetry::TIME_TO_SETTLE_SECONDS, "outcome" => outcome, "capacity" => settled)
                    .record(created_at.millis_until(*at) as f64 / 1000.0);
            }
            Observation::Settled { context, state, .. } => {
                // A finished session is off the books; a Ready one stays counted.
                if state.phase.kind().is_terminal() {
                    self.enter(&context.session_id, None, Timestamp::default());
                }
            }
        }
    }
}

/// Calls a hook when a session becomes Ready (the step into Ready happens
/// once per session).
pub struct OnReady<F>(pub F);

impl<F: Fn(&ReadyInstance) + Send + Sync> Observer for OnReady<F> {
    fn observe(&self, observation: &Observation<'_>) {
        if let Observation::Stepped {
            context,
            before,
            checkpoint,
            ..
        } = observation
            && let ProvisionPhase::Ready(ready) = &checkpoint.state.phase
            && before.phase.kind() != PhaseKind::Ready
        {
            (self.0)(&ReadyInstance::new(context, ready));
        }
    }
}

/// The caller's progress display: one update per step, saying what runs next.
pub struct ProgressObserver<'a>(pub &'a dyn ProgressSink);

impl Observer for ProgressObserver<'_> {
    fn observe(&self, observation: &Observation<'_>) {
        let (session_id, state, intent, elapsed, at, guards) = match observation {
            Observation::Started { .. } | Observation::Settled { .. } => return,
            Observation::Resumed { session, at } => (
                &session.context.session_id,
                &session.state,
                session.pending.as_ref(),
                Duration::ZERO,
                *at,
                Guards::NONE,
            ),
            Observation::Stepped {
                context,
                checkpoint,
                elapsed,
                at,
                guards,
                ..
            } => (
                &context.session_id,
                &checkpoint.state,
                checkpoint.intent.as_ref(),
                *elapsed,
                *at,
                *guards,
            ),
        };
        let next = intent.map(|i| &i.effect);
        let phase = state.phase.kind();
        let message = match (next, &state.phase) {
            // The first line of a failure's cleanup says what failed: the
            // sweep after a refused or unanswered launch can take 30 s.
            (Some(effect), ProvisionPhase::TerminatingInstance(t)) => match &t.cause {
                // A refused launch whose every try was answered made nothing: one look.
                CleanupCause::Failure(reason)
                    if t.instance_id.is_none() && t.launched_at.is_none() =>
                {
                    format!("{reason}; making sure the launch left no instance")
                }
                CleanupCause::Failure(reason) if t.instance_id.is_none() => format!(
                    "{reason}; making sure the launch left no instance (EC2 can take 30 s to \
                     show one)"
                ),
                CleanupCause::Failure(reason) => {
                    format!("{} (cleaning up after: {reason})", describe(effect))
                }
                _ => describe(effect),
            },
            (Some(effect), _) => describe(effect),
            (None, ProvisionPhase::Ready(r)) => {
                format!(
                    "{} answers SSH at {}",
                    r.instance.instance_id, r.ssh_endpoint
                )
            }
            (None, ProvisionPhase::Failed(f)) => format!("cleaned up after: {}", f.reason),
            (None, ProvisionPhase::Interrupted(i)) => {
                format!("cleaned up after an interruption: {}", i.reason)
            }
            (None, _) => "nothing of the session is left running (EC2 may list a terminated \
                          instance as shutting-down for a minute)"
                .to_string(),
        };
        // A cleanup stopping for an operator waits for no timer: the
        // driver's error says what to do.
        let stalled = guards.contains(Guard::AskOperator);
        let message = if stalled {
            message
        } else {
            message + &backoff_note(state, intent, at)
        };
        self.0.progress(&ProvisionProgress {
            session_id: session_id.clone(),
            phase,
            message,
            percent_complete: phase.percent_complete(),
            instance_id: state.phase.instance_id().map(str::to_string),
            elapsed,
        });
    }
}

/// How long a retry waits, when it does: the line would otherwise claim
/// work while nothing is sent (a resumed session may wait out the backoff
/// its earlier driver chose).
fn backoff_note(state: &SessionState, intent: Option<&Intent>, at: Timestamp) -> String {
    let wait = intent
        .and_then(|i| i.not_before)
        .map_or(0, |due| due.0.saturating_sub(at.0));
    if state.transient_failures == 0 || wait < 1000 {
        return String::new();
    }
    let tries = match state.transient_failures {
        1 => "1 failed try".to_string(),
        n => format!("{n} failed tries"),
    };
    format!("; after {tries}, the next in {} s", wait.div_ceil(1000))
}

/// A human line for what an effect is doing.
pub fn describe(effect: &Effect) -> String {
    match effect {
        Effect::ValidateRequest => "checking image, subnets and security groups".into(),
        Effect::EnsureKeyPair { key_name, .. } => format!("preparing key pair {key_name}"),
        Effect::RunInstance {
            spot, subnet_id, ..
        } => {
            format!(
                "launching {} instance in {subnet_id}",
                if *spot { "a spot" } else { "an on-demand" }
            )
        }
        Effect::FindPlacement { spot: true, .. } => {
            "choosing a subnet by spot placement scores and prices".into()
        }
        Effect::FindPlacement { spot: false, .. } => "choosing a subnet".into(),
        Effect::DescribeInstance { instance_id, .. } => {
            format!("waiting for {instance_id} to run")
        }
        Effect::CancelSpotRequest { request_id } => format!("cancelling spot request {request_id}"),
        Effect::DescribeInstanceStatus { instance_id } => {
            format!("waiting for {instance_id}'s EC2 status checks")
        }
        Effect::ReadConsoleHostKeys { instance_id } => {
            format!("reading SSH host keys from {instance_id}'s console")
        }
        Effect::ProbeSsh { endpoint, .. } => format!("checking SSH at {endpoint}"),
        Effect::TerminateInstance {
            instance_id: Some(id),
        } => format!("terminating {id}"),
        Effect::TerminateInstance { instance_id: None } => {
            "terminating any instance tagged with this session".into()
        }
        Effect::DeleteKeyPair { key_name, .. } => format!("deleting key pair {key_name}"),
        Effect::RunShutdownCommand { endpoint, .. } => {
            format!("running the shutdown command at {endpoint} before the interruption")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Validating;

    #[test]
    fn a_retry_says_how_long_it_waits_and_a_poll_says_nothing() {
        let at = Timestamp(1_700_000_000_000);
        let intent = |wait_ms: u64| Intent {
            effect: Effect::ValidateRequest,
            not_before: Some(Timestamp(at.0 + wait_ms)),
        };
        let mut state = SessionState::fresh(ProvisionPhase::Validating(Validating));
        // A poll's wait (no failure) is the cadence, not news.
        assert_eq!(backoff_note(&state, Some(&intent(5_000)), at), "");
        state.transient_failures = 3;
        assert_eq!(
            backoff_note(&state, Some(&intent(26_001)), at),
            "; after 3 failed tries, the next in 27 s"
        );
        assert_eq!(backoff_note(&state, Some(&intent(400)), at), "");
        state.transient_failures = 1;
        assert_eq!(
            backoff_note(&state, Some(&intent(1_000)), at),
            "; after 1 failed try, the next in 1 s"
        );
        assert_eq!(backoff_note(&state, None, at), "");
    }
}
