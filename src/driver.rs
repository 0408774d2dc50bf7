//! The driver: load, step, commit, execute, record, repeat.
//!
//! Invariants:
//! - an effect runs only after its intent is committed, under this engine's
//!   lease; its outcome is committed with the next phase change;
//! - a resumed session first re-runs the intent that has no outcome (effects
//!   are idempotent), so a crash anywhere costs a repeated call, never a
//!   second instance;
//! - the driver holds no state of its own that the log does not: dropping an
//!   engine at any await point is a crash the next engine recovers from.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tracing::{Instrument, info, warn};

use crate::effects::{self, Effects};
use crate::events::{ProgressSink, ProvisionEvent, ProvisionProgress};
use crate::machine::{
    self, Effect, Input, MachineError, Notice, PhaseKind, ProvisionPhase, SessionContext,
    SessionState, Timestamp,
};
use crate::request::{InvalidRequest, ProvisionRequest};
use crate::store::{Checkpoint, CheckpointStore, Intent, LeaseHolder, LoadedSession, StoreError};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Folder for private key files of key pairs the engine creates.
    pub key_dir: String,
    /// How long a lease lasts without renewal; renewed at a third of this.
    pub lease_ttl: Duration,
}

/// Where a test may make the driver stop dead, as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The intent is committed; the effect has not run.
    AfterIntentCommit,
    /// The effect ran; its outcome is not committed.
    AfterEffect,
    /// The outcome and the next intent are committed.
    AfterOutcomeCommit,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
    #[error("session {session_id} failed and was cleaned up: {reason}")]
    ProvisionFailed { session_id: String, reason: String },
    #[error("session {session_id} was torn down before it became ready")]
    TornDown { session_id: String },
    #[error(
        "session {session_id} could not finish {phase} after {failures} tries (last: {last_error}); \
         it is still tracked: fix the cause (credentials, permissions, network), then run \
         `acode-ec2 recover` or `acode-ec2 teardown {session_id}`"
    )]
    CleanupStalled {
        session_id: String,
        phase: PhaseKind,
        failures: u32,
        last_error: String,
    },
    #[error("injected crash at {point:?} (test hook)")]
    InjectedCrash { point: CrashPoint },
}

/// Consecutive failures of one cleanup step (about two minutes of backoff)
/// after which the driver stops and says why, instead of retrying silently
/// forever. The machine itself never gives up on cleanup: `recover` or
/// `teardown` carries on from the same checkpoint.
pub const CLEANUP_PATIENCE: u32 = 8;

/// A session that reached Ready.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReadyInstance {
    pub session_id: String,
    pub instance_id: String,
    pub public_ip: Option<String>,
    pub ssh_endpoint: String,
    pub key_path: Option<String>,
    pub host_key_fingerprint: String,
    pub was_spot: bool,
}

/// What `recover` did with one session.
#[derive(Debug)]
pub struct Recovered {
    pub session_id: String,
    pub result: Result<PhaseKind, EngineError>,
}

struct CrashPlan {
    point: CrashPoint,
    /// Crash at the n-th time the point is passed (1 = first).
    nth: u32,
    passed: AtomicU32,
}

pub struct Engine<E: Effects> {
    effects: Arc<E>,
    store: Arc<dyn CheckpointStore>,
    holder: LeaseHolder,
    options: EngineOptions,
    events: broadcast::Sender<ProvisionEvent>,
    crash: Option<CrashPlan>,
}

impl<E: Effects> Engine<E> {
    pub fn new(
        effects: Arc<E>,
        store: Arc<dyn CheckpointStore>,
        options: EngineOptions,
    ) -> Engine<E> {
        let (events, _) = broadcast::channel(1024);
        Engine {
            effects,
            store,
            holder: LeaseHolder::for_this_process(),
            options,
            events,
            crash: None,
        }
    }

    /// Drives sessions as `holder` (tests simulate other processes with it).
    pub fn with_holder(mut self, holder: LeaseHolder) -> Engine<E> {
        self.holder = holder;
        self
    }

    /// Test hook: stop dead the `nth` time `point` is passed.
    #[doc(hidden)]
    pub fn with_crash(mut self, point: CrashPoint, nth: u32) -> Engine<E> {
        self.crash = Some(CrashPlan {
            point,
            nth,
            passed: AtomicU32::new(0),
        });
        self
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ProvisionEvent> {
        self.events.subscribe()
    }

    pub fn store(&self) -> &Arc<dyn CheckpointStore> {
        &self.store
    }

    /// Starts a new session and drives it to Ready (or Failed, after cleanup).
    pub async fn provision(
        &self,
        request: ProvisionRequest,
        progress: &dyn ProgressSink,
    ) -> Result<ReadyInstance, EngineError> {
        request.check()?;
        let session_id = uuid::Uuid::new_v4().to_string();
        let span = tracing::info_span!("session", session_id = %session_id);
        async {
            let ctx = SessionContext {
                session_id: session_id.clone(),
                request,
                key_dir: self.options.key_dir.clone(),
            };
            let first = machine::start(&ctx);
            let now = effects::now();
            let checkpoint = Checkpoint {
                outcome: None,
                state: first.state.clone(),
                intent: first.effect.map(|effect| Intent {
                    effect,
                    not_before: None,
                }),
            };
            self.store
                .create(&ctx, &checkpoint, &self.holder, self.options.lease_ttl, now)?;
            let renewal = self.hold_lease(&session_id);
            info!(instance_type = %ctx.request.instance_type, "provisioning started");
            self.emit(ProvisionEvent::ProvisionStarted {
                session_id: session_id.clone(),
                instance_type: ctx.request.instance_type.clone(),
                use_spot: ctx.request.spot.is_some(),
                at_ms: now.0,
            });
            let loaded = LoadedSession {
                context: ctx,
                state: checkpoint.state,
                pending: checkpoint.intent,
                created_at: now,
            };
            let end = self.drive(loaded, renewal, progress).await?;
            ready_or_error(&session_id, end)
        }
        .instrument(span)
        .await
    }

    /// Continues a session from its last checkpoint.
    pub async fn resume(
        &self,
        session_id: &str,
        progress: &dyn ProgressSink,
    ) -> Result<ReadyInstance, EngineError> {
        let end = self.resume_to_end(session_id, progress).await?;
        ready_or_error(session_id, end)
    }

    async fn resume_to_end(
        &self,
        session_id: &str,
        progress: &dyn ProgressSink,
    ) -> Result<SessionState, EngineError> {
        let span = tracing::info_span!("session", session_id = %session_id);
        async {
            let renewal = self.take_lease(session_id)?;
            let loaded = self.store.load(session_id)?;
            info!(phase = %loaded.state.phase.kind(), pending = loaded.pending.as_ref().map(|i| i.effect.name()), "resuming");
            self.drive(loaded, renewal, progress).await
        }
        .instrument(span)
        .await
    }

    /// Terminates the session's instance and deletes the key pair it created.
    /// A session that is already gone is fine.
    pub async fn teardown(
        &self,
        session_id: &str,
        progress: &dyn ProgressSink,
    ) -> Result<PhaseKind, EngineError> {
        let span = tracing::info_span!("session", session_id = %session_id);
        async {
            // Held (and renewed) through the pre-steps below too.
            let renewal = self.take_lease(session_id)?;
            let mut loaded = self.store.load(session_id)?;
            // An explicit teardown acts now, not after a recorded backoff.
            if let Some(intent) = loaded.pending.as_mut() {
                intent.not_before = None;
            }
            let kind = loaded.state.phase.kind();
            if kind.is_terminal() {
                self.store.release_lease(session_id, &self.holder)?;
                return Ok(kind);
            }
            if !kind.is_cleanup() {
                // An unanswered create must be answered first, so that what it
                // made (if anything) is known and cleaned up.
                if let Some(intent) = loaded
                    .pending
                    .clone()
                    .filter(|i| creates_something(&i.effect))
                {
                    let input = self
                        .effects
                        .run(&loaded.context, loaded.created_at, &intent.effect)
                        .await;
                    loaded = self.record(loaded, input, progress, Instant::now())?;
                }
                if !loaded.state.phase.kind().is_cleanup()
                    && !loaded.state.phase.kind().is_terminal()
                {
                    loaded =
                        self.record(loaded, Input::TeardownRequested, progress, Instant::now())?;
                }
            }
            Ok(self.drive(loaded, renewal, progress).await?.phase.kind())
        }
        .instrument(span)
        .await
    }

    /// Resumes every session that is neither Ready nor finished: each ends
    /// Ready or cleaned up. Sessions another live process drives are left
    /// to it and reported as such.
    pub async fn recover(
        &self,
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Recovered>, EngineError> {
        let mut report = Vec::new();
        for summary in self.store.list()? {
            if summary.phase.is_settled() {
                continue;
            }
            let result = self
                .resume_to_end(&summary.session_id, progress)
                .await
                .map(|s| s.phase.kind());
            report.push(Recovered {
                session_id: summary.session_id,
                result,
            });
        }
        Ok(report)
    }

    /// Commits one input's step and returns the session as it now stands.
    fn record(
        &self,
        loaded: LoadedSession,
        input: Input,
        progress: &dyn ProgressSink,
        started: Instant,
    ) -> Result<LoadedSession, EngineError> {
        let now = effects::now();
        let step = machine::step(&loaded.context, &loaded.state, input.clone(), now)?;
        let checkpoint = Checkpoint {
            outcome: Some(input),
            state: step.state.clone(),
            intent: step.effect.map(|effect| Intent {
                effect,
                not_before: step.wake_at,
            }),
        };
        self.store
            .commit(&loaded.context.session_id, &checkpoint, &self.holder, now)?;
        self.announce(
            &loaded.context,
            &loaded.state,
            &checkpoint,
            &step.notices,
            now,
            started,
            progress,
        );
        Ok(LoadedSession {
            state: checkpoint.state,
            pending: checkpoint.intent,
            ..loaded
        })
    }

    /// Takes the session's lease (or explains who holds it) and keeps it renewed.
    fn take_lease(&self, session_id: &str) -> Result<LeaseRenewal, EngineError> {
        let ttl = self.options.lease_ttl;
        self.store
            .acquire_lease(session_id, &self.holder, ttl, effects::now())?;
        Ok(self.hold_lease(session_id))
    }

    /// Keeps a lease this engine already holds renewed until dropped.
    fn hold_lease(&self, session_id: &str) -> LeaseRenewal {
        LeaseRenewal::start(
            Arc::clone(&self.store),
            session_id,
            &self.holder,
            self.options.lease_ttl,
        )
    }

    async fn drive(
        &self,
        session: LoadedSession,
        renewal: LeaseRenewal,
        progress: &dyn ProgressSink,
    ) -> Result<SessionState, EngineError> {
        let session_id = session.context.session_id.clone();
        let result = self.drive_to_end(session, renewal, progress).await;
        if let Err(e) = &result
            && !matches!(e, EngineError::InjectedCrash { .. })
        {
            // Let another driver (or a retry) take over at once; best effort,
            // a lease of a process that died expires anyway.
            if let Err(release) = self.store.release_lease(&session_id, &self.holder) {
                warn!(%session_id, error = %release, "could not release the lease after an error");
            }
        }
        result
    }

    async fn drive_to_end(
        &self,
        mut session: LoadedSession,
        renewal: LeaseRenewal,
        progress: &dyn ProgressSink,
    ) -> Result<SessionState, EngineError> {
        let started = Instant::now();
        let session_id = session.context.session_id.clone();
        self.report(&session, "resuming", started, progress);
        while let Some(intent) = session.pending.clone() {
            self.crash_point(CrashPoint::AfterIntentCommit)?;
            if let Some(at) = intent.not_before {
                let wait = effects::now().millis_until(at);
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
            let input = self
                .effects
                .run(&session.context, session.created_at, &intent.effect)
                .await;
            self.crash_point(CrashPoint::AfterEffect)?;
            let last_error = match &input {
                Input::TransientFailure { message } => Some(message.clone()),
                _ => None,
            };
            session = self.record(session, input, progress, started)?;
            self.crash_point(CrashPoint::AfterOutcomeCommit)?;
            let (phase, failures) = (session.state.phase.kind(), session.state.transient_failures);
            if let Some(last_error) =
                last_error.filter(|_| phase.is_cleanup() && failures >= CLEANUP_PATIENCE)
            {
                return Err(EngineError::CleanupStalled {
                    session_id: session.context.session_id.clone(),
                    phase,
                    failures,
                    last_error,
                });
            }
        }
        drop(renewal);
        self.store.release_lease(&session_id, &self.holder)?;
        self.complete(&session, started);
        Ok(session.state)
    }

    fn crash_point(&self, point: CrashPoint) -> Result<(), EngineError> {
        match &self.crash {
            Some(plan)
                if plan.point == point
                    && plan.passed.fetch_add(1, Ordering::SeqCst) + 1 == plan.nth =>
            {
                Err(EngineError::InjectedCrash { point })
            }
            _ => Ok(()),
        }
    }

    fn emit(&self, event: ProvisionEvent) {
        // No subscribers is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    #[allow(clippy::too_many_arguments)]
    fn announce(
        &self,
        ctx: &SessionContext,
        before: &SessionState,
        checkpoint: &Checkpoint,
        notices: &[Notice],
        now: Timestamp,
        started: Instant,
        progress: &dyn ProgressSink,
    ) {
        let (from, to) = (before.phase.kind(), checkpoint.state.phase.kind());
        let session_id = ctx.session_id.clone();
        if from != to {
            info!(%from, %to, "phase changed");
            self.emit(ProvisionEvent::ProvisionPhaseChanged {
                session_id: session_id.clone(),
                from,
                to,
                at_ms: now.0,
            });
        }
        for notice in notices {
            match notice {
                Notice::SpotFallback { reason } => {
                    warn!(%reason, "no spot capacity, falling back to on-demand");
                    self.emit(ProvisionEvent::SpotFallback {
                        session_id: session_id.clone(),
                        reason: reason.clone(),
                        at_ms: now.0,
                    });
                }
            }
        }
        if let Some(Input::TransientFailure { message }) = &checkpoint.outcome {
            warn!(%message, failures = checkpoint.state.transient_failures, "transient failure, will retry");
        }
        let message = match (&checkpoint.intent, &checkpoint.state.phase) {
            (Some(intent), _) => describe(&intent.effect),
            (None, ProvisionPhase::Ready(r)) => {
                format!(
                    "{} answers SSH at {}",
                    r.instance.instance_id, r.ssh_endpoint
                )
            }
            (None, ProvisionPhase::Failed(f)) => format!("cleaned up after: {}", f.reason),
            (None, _) => "instance and key pair removed".to_string(),
        };
        progress.progress(&ProvisionProgress {
            session_id,
            phase: to,
            message,
            percent_complete: to.percent_complete(),
            instance_id: checkpoint.state.phase.instance_id().map(str::to_string),
            elapsed: started.elapsed(),
        });
    }

    fn report(
        &self,
        session: &LoadedSession,
        what: &str,
        started: Instant,
        progress: &dyn ProgressSink,
    ) {
        let phase = session.state.phase.kind();
        progress.progress(&ProvisionProgress {
            session_id: session.context.session_id.clone(),
            phase,
            message: session
                .pending
                .as_ref()
                .map_or_else(|| what.to_string(), |i| describe(&i.effect)),
            percent_complete: phase.percent_complete(),
            instance_id: session.state.phase.instance_id().map(str::to_string),
            elapsed: started.elapsed(),
        });
    }

    fn complete(&self, session: &LoadedSession, started: Instant) {
        let phase = &session.state.phase;
        let error = match phase {
            ProvisionPhase::Failed(f) => Some(f.reason.clone()),
            _ => None,
        };
        info!(phase = %phase.kind(), error = error.as_deref(), "session settled");
        self.emit(ProvisionEvent::ProvisionCompleted {
            session_id: session.context.session_id.clone(),
            success: phase.kind() == PhaseKind::Ready,
            phase: phase.kind(),
            instance_id: phase.instance_id().map(str::to_string),
            public_ip: phase.public_ip().map(str::to_string),
            was_spot: phase.was_spot(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error,
        });
    }
}

/// Effects whose outcome tells what exists: teardown must learn it first.
fn creates_something(effect: &Effect) -> bool {
    matches!(
        effect,
        Effect::RunInstance { .. } | Effect::EnsureKeyPair { .. }
    )
}

fn ready_or_error(session_id: &str, state: SessionState) -> Result<ReadyInstance, EngineError> {
    match state.phase {
        ProvisionPhase::Ready(ready) => Ok(ReadyInstance {
            session_id: session_id.to_string(),
            instance_id: ready.instance.instance_id,
            public_ip: ready.public_ip,
            ssh_endpoint: ready.ssh_endpoint,
            key_path: ready.instance.key.private_key_path,
            host_key_fingerprint: ready.host_key_fingerprint,
            was_spot: ready.instance.was_spot,
        }),
        ProvisionPhase::Failed(failed) => Err(EngineError::ProvisionFailed {
            session_id: session_id.to_string(),
            reason: failed.reason,
        }),
        _ => Err(EngineError::TornDown {
            session_id: session_id.to_string(),
        }),
    }
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
        Effect::DescribeInstance { instance_id } => format!("waiting for {instance_id} to run"),
        Effect::ReadConsoleHostKeys { instance_id } => {
            format!("reading SSH host keys from {instance_id}'s console")
        }
        Effect::ProbeSsh { endpoint, .. } => format!("checking SSH at {endpoint}"),
        Effect::TerminateInstance {
            instance_id: Some(id),
            ..
        } => format!("terminating {id}"),
        Effect::TerminateInstance {
            instance_id: None, ..
        } => "terminating any instance tagged with this session".into(),
        Effect::DeleteKeyPair { key_name, .. } => format!("deleting key pair {key_name}"),
    }
}

/// Renews a session's lease in the background while it is driven.
struct LeaseRenewal(tokio::task::JoinHandle<()>);

impl LeaseRenewal {
    fn start(
        store: Arc<dyn CheckpointStore>,
        session_id: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> LeaseRenewal {
        let (session_id, holder) = (session_id.to_string(), holder.clone());
        let every = (ttl / 3).max(Duration::from_millis(100));
        LeaseRenewal(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match store.renew_lease(&session_id, &holder, ttl, effects::now()) {
                    Ok(()) => {}
                    // Another driver owns the session now; our next commit is
                    // refused (commits are fenced by the lease) and we stop.
                    Err(e @ StoreError::LeaseLost(_)) => {
                        warn!(%session_id, error = %e, "lease lost");
                        return;
                    }
                    // A busy or failing database may recover before the lease expires.
                    Err(e) => warn!(%session_id, error = %e, "lease renewal failed; retrying"),
                }
            }
        }))
    }
}

impl Drop for LeaseRenewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}
