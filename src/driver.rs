//! The driver: load, step, commit, execute, record, repeat.
//!
//! Invariants:
//! - an effect runs only after its intent is committed, under this engine's
//!   lease; its outcome is committed with the next phase change;
//! - a resumed session first re-runs the intent that has no outcome (effects
//!   are idempotent), so a crash anywhere costs a repeated call, never a
//!   second instance;
//! - outside inputs (a teardown, an interruption notice) enter through
//!   [`Engine::deliver`] and are committed by the same path as an effect's
//!   outcome; an effect that only looks may be abandoned for one, an effect
//!   that creates or removes something is always answered first;
//! - one engine drives a session at most once at a time (a registry of the
//!   sessions it drives), and one process at a time (the store's lease);
//! - the driver decides nothing: it runs what the machine asks, when it
//!   asks, and stops when it asks; it holds no state the log does not, so
//!   dropping an engine at any await point is a crash the next engine
//!   recovers from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tracing::{Instrument, info, warn};

use crate::clock::{Clock, SystemClock};
use crate::effects::Effects;
pub use crate::events::ReadyInstance;
use crate::events::{ProgressSink, ProvisionEvent};
use crate::lock;
use crate::machine::{
    self, Effect, Input, MachineError, OutsideInput, Pause, PhaseKind, ProvisionPhase,
    SessionContext, Timestamp,
};
use crate::observe::{
    EventChannel, Fanout, MetricsObserver, Observation, Observer, OnReady, ProgressObserver,
    TracingObserver,
};
use crate::request::{InvalidRequest, ProvisionRequest};
use crate::store::{
    Checkpoint, CheckpointStore, Heartbeat, Intent, LeaseHolder, LoadedSession, StoreError,
};

#[cfg(test)]
mod tests;
mod watcher;
pub use watcher::{InterruptionHook, WATCH_INTERVAL, WatchOptions, WatchedNotice};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Folder for private key files of key pairs the engine creates.
    pub key_dir: String,
    /// How long the engine's lease lasts without a heartbeat; its one
    /// heartbeat renews it every third of this while it drives sessions.
    pub lease_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("session {session_id} failed and was cleaned up: {reason}")]
    ProvisionFailed { session_id: String, reason: String },
    #[error("session {session_id} was torn down before it became ready")]
    TornDown { session_id: String },
    #[error("session {session_id} was interrupted and cleaned up: {reason}")]
    Interrupted { session_id: String, reason: String },
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
    #[error(
        "session {session_id} is already being driven by this process; wait for that to finish"
    )]
    AlreadyDriving { session_id: String },
    #[error(
        "the driver of session {session_id} stopped before the session settled: {reason}; \
         `acode-ec2 recover` resumes it"
    )]
    DriverStopped { session_id: String, reason: String },
}

impl EngineError {
    /// Another live process, or a drive of this one, holds the session:
    /// it is that driver's to finish, not a failure of this one.
    pub fn is_held_elsewhere(&self) -> bool {
        matches!(
            self,
            EngineError::AlreadyDriving { .. } | EngineError::Store(StoreError::Leased { .. })
        )
    }
}

/// How many EC2 calls, and apart from them how many SSH logins, `recover`
/// runs at once by default; sessions that wait hold none, so every session
/// is driven at once and none waits behind another's wait.
pub const RECOVER_CONCURRENCY: usize = 64;

/// How far a `recover` has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoverTally {
    /// Sessions to recover (not counting replacements started after).
    pub total: usize,
    /// Sessions whose drive ended, however it ended.
    pub done: usize,
    pub in_flight: usize,
    /// Drives that ended in an error (not sessions that failed and were
    /// cleaned up, nor those left to another driver).
    pub failed: usize,
    /// Sessions another live process (or drive) holds: left to it.
    pub left: usize,
}

impl RecoverTally {
    /// Counts a drive's end.
    fn ended(&mut self, result: &Result<PhaseKind, EngineError>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.done += 1;
        match result {
            Ok(_) | Err(EngineError::ProvisionFailed { .. }) => {}
            Err(e) if e.is_held_elsewhere() => self.left += 1,
            Err(_) => self.failed += 1,
        }
    }
}

/// What `recover` did with one session.
#[derive(Debug)]
pub struct Recovered {
    pub session_id: String,
    pub result: Result<PhaseKind, EngineError>,
}

/// An outside input on its way to the drive that owns the session.
struct Delivery {
    input: Input,
    /// The phase the input led to once committed, or why the machine refused it.
    reply: oneshot::Sender<Result<PhaseKind, MachineError>>,
}

/// What an inbox carries: boxed, because a channel allocates its slots in
/// blocks of 32 up front and a bare `Delivery` made that 3 KiB a session.
type Inbox = mpsc::UnboundedReceiver<Box<Delivery>>;

/// How a drive ended.
#[derive(Debug, Clone)]
enum Ended {
    Settled(PhaseKind),
    /// Stopped before the session settled, with the error it stopped on.
    Stopped(String),
}

/// How to reach a session this engine is driving.
#[derive(Clone)]
struct DriveHandle {
    inbox: mpsc::UnboundedSender<Box<Delivery>>,
    /// `None` until the drive ends.
    ended: watch::Receiver<Option<Ended>>,
}

/// This engine's right to drive one session; unregistered when dropped.
struct DriveClaim<'a> {
    registry: &'a Mutex<HashMap<String, DriveHandle>>,
    session_id: String,
    inbox: Inbox,
    ended: watch::Sender<Option<Ended>>,
    /// Slots this drive's EC2 calls and SSH logins take one of while they
    /// run (`recover` bounds those, not drives, so a drive that waits holds
    /// none).
    effect_slots: Option<Arc<EffectSlots>>,
}

/// What `recover` bounds: EC2 calls and SSH logins, each with slots of
/// their own. They load different things (EC2's API, the instances'
/// sshd), so a wave of logins must not leave the API idle, nor the reverse.
/// Polls take none: the effects layer folds the polls of many sessions
/// into one batched call of up to 200 ids (under the engine's rate limits),
/// so a slot per session would only bound how many wait for the batch, and
/// keep other calls waiting behind them.
struct EffectSlots {
    ec2_calls: Semaphore,
    ssh_logins: Semaphore,
}

impl EffectSlots {
    fn new(each: usize) -> EffectSlots {
        EffectSlots {
            ec2_calls: Semaphore::new(each.max(1)),
            ssh_logins: Semaphore::new(each.max(1)),
        }
    }

    fn for_effect(&self, effect: &Effect) -> Option<&Semaphore> {
        match effect {
            Effect::DescribeInstance { .. } | Effect::DescribeInstanceStatus { .. } => None,
            effect if effect.over_ssh() => Some(&self.ssh_logins),
            _ => Some(&self.ec2_calls),
        }
    }
}

impl Drop for DriveClaim<'_> {
    fn drop(&mut self) {
        lock(self.registry).remove(&self.session_id);
    }
}

/// Either the claim, or the handle of the drive that already has it.
enum Claim<'a> {
    Mine(DriveClaim<'a>),
    Busy(DriveHandle),
}

/// Where an outside input went: committed by the running drive (the phase
/// it led to), or to this caller, who now owns the session.
enum Routed<'a> {
    Committed(PhaseKind, DriveHandle),
    Mine(DriveClaim<'a>),
}

pub struct Engine<E: Effects> {
    effects: Arc<E>,
    store: Arc<dyn CheckpointStore>,
    clock: Arc<dyn Clock>,
    holder: LeaseHolder,
    options: EngineOptions,
    events: broadcast::Sender<ProvisionEvent>,
    observers: Vec<Arc<dyn Observer>>,
    driving: Mutex<HashMap<String, DriveHandle>>,
    lease: EngineLease,
    interruption_hook: Option<InterruptionHook>,
}

impl<E: Effects> Engine<E> {
    pub fn new(
        effects: Arc<E>,
        store: Arc<dyn CheckpointStore>,
        options: EngineOptions,
    ) -> Engine<E> {
        let (events, _) = broadcast::channel(1024);
        let holder = LeaseHolder::for_this_process();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        Engine {
            effects,
            lease: EngineLease::new(
                Arc::clone(&store),
                holder.clone(),
                options.lease_ttl,
                Arc::clone(&clock),
            ),
            store,
            clock,
            holder,
            options,
            observers: vec![
                Arc::new(TracingObserver),
                Arc::new(EventChannel(events.clone())),
                Arc::new(MetricsObserver::default()),
            ],
            events,
            driving: Mutex::new(HashMap::new()),
            interruption_hook: None,
        }
    }

    /// Drives sessions as `holder` (tests simulate other processes with it).
    pub fn with_holder(mut self, holder: LeaseHolder) -> Engine<E> {
        self.lease = EngineLease::new(
            Arc::clone(&self.store),
            holder.clone(),
            self.options.lease_ttl,
            Arc::clone(&self.clock),
        );
        self.holder = holder;
        self
    }

    /// Reads `now` from, and waits on, `clock` (tests and benches run
    /// without real sleeps on a [`crate::clock::ManualClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Engine<E> {
        self.lease = EngineLease::new(
            Arc::clone(&self.store),
            self.holder.clone(),
            self.options.lease_ttl,
            Arc::clone(&clock),
        );
        self.clock = clock;
        self
    }

    /// Adds an observer beside the built-in tracing and event channel.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Engine<E> {
        self.observers.push(observer);
        self
    }

    /// Calls `hook` once for each session this engine drives to Ready (a
    /// provision, or a resumed session), as soon as Ready is committed.
    pub fn on_ready(self, hook: impl Fn(&ReadyInstance) + Send + Sync + 'static) -> Engine<E> {
        self.with_observer(Arc::new(OnReady(hook)))
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
        let session_id = uuid::Uuid::new_v4().to_string();
        let end = self.start(session_id, request, None, progress).await?;
        ready_or_error(end)
    }

    /// Starts the session `session_id` (which must not exist) and drives it
    /// until it settles.
    async fn start(
        &self,
        session_id: String,
        request: ProvisionRequest,
        replaces: Option<String>,
        progress: &dyn ProgressSink,
    ) -> Result<LoadedSession, EngineError> {
        request.check()?;
        let span = session_span(&session_id);
        async {
            let Claim::Mine(claim) = self.claim(&session_id) else {
                return Err(EngineError::AlreadyDriving { session_id });
            };
            let ctx = SessionContext {
                session_id: session_id.clone(),
                request,
                key_dir: self.options.key_dir.clone(),
                replaces,
            };
            let first = machine::start(&ctx);
            let now = self.clock.now();
            let checkpoint = Checkpoint {
                outcome: None,
                state: first.state,
                intent: first.effect.map(|effect| Intent {
                    effect,
                    not_before: None,
                }),
            };
            let ttl = self.options.lease_ttl;
            let beat = self
                .store
                .create(&ctx, &checkpoint, &self.holder, ttl, now)
                .await?;
            self.lease.noted(now, beat);
            let lease = self.lease.join(&session_id);
            let progress = ProgressObserver(progress);
            let observers = self.fanout(&progress);
            let region = self.effects.region();
            observers.observe(&Observation::Started {
                context: &ctx,
                at: now,
                region: region.as_deref(),
            });
            let loaded = LoadedSession {
                context: ctx,
                state: checkpoint.state,
                pending: checkpoint.intent,
                created_at: now,
            };
            self.drive(loaded, claim, lease, &observers).await
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
        ready_or_error(end)
    }

    async fn resume_to_end(
        &self,
        session_id: &str,
        progress: &dyn ProgressSink,
    ) -> Result<LoadedSession, EngineError> {
        self.resume_within(session_id, progress, None).await
    }

    /// Resumes the session; with `effect_slots`, each of its effects runs
    /// only while it holds one of them.
    async fn resume_within(
        &self,
        session_id: &str,
        progress: &dyn ProgressSink,
        effect_slots: Option<Arc<EffectSlots>>,
    ) -> Result<LoadedSession, EngineError> {
        let span = session_span(session_id);
        async {
            let Claim::Mine(mut claim) = self.claim(session_id) else {
                return Err(EngineError::AlreadyDriving {
                    session_id: session_id.to_string(),
                });
            };
            claim.effect_slots = effect_slots;
            let lease = self.take_lease(session_id).await?;
            let progress = ProgressObserver(progress);
            let observers = self.fanout(&progress);
            match self.store.load(session_id).await {
                Ok(loaded) => self.drive(loaded, claim, lease, &observers).await,
                Err(e) => {
                    lease.release().await;
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Commits an outside input (such as [`OutsideInput::TeardownRequested`])
    /// through the checkpoint path, and returns the phase it led to.
    ///
    /// If this engine is driving the session, the input goes to that drive,
    /// which commits it at its next step (abandoning an effect that only
    /// looks, letting one that creates or removes something answer first)
    /// and carries on. Otherwise this call takes the session's lease,
    /// commits the input and drives the session until it settles; the phase
    /// returned is then where it settled.
    pub async fn deliver(
        &self,
        session_id: &str,
        input: OutsideInput,
        progress: &dyn ProgressSink,
    ) -> Result<PhaseKind, EngineError> {
        self.deliver_then(session_id, input.into(), progress, false)
            .await
    }

    /// Terminates the session's instance and deletes the key pair it
    /// created: [`Engine::deliver`] of `TeardownRequested`, waiting until
    /// the session settles. A session that is already finished is fine, and
    /// teardown never creates anything (an unanswered launch is found by
    /// its tag, not re-run).
    pub async fn teardown(
        &self,
        session_id: &str,
        progress: &dyn ProgressSink,
    ) -> Result<PhaseKind, EngineError> {
        self.deliver_then(session_id, Input::TeardownRequested, progress, true)
            .await
    }

    /// Commits an outside input without driving the session on: for a
    /// process about to stop (a second Ctrl-C) that wants its last word on
    /// record for `recover`. An effect this engine was running is abandoned
    /// first (the caller dropped its drive); its answer is not waited for,
    /// which cleanup covers (a launch without an answer is swept by tag).
    pub async fn note(
        &self,
        session_id: &str,
        input: OutsideInput,
    ) -> Result<PhaseKind, EngineError> {
        let Claim::Mine(claim) = self.claim(session_id) else {
            return Err(EngineError::AlreadyDriving {
                session_id: session_id.to_string(),
            });
        };
        // A drive share like any other: a dropped drive's release of this
        // session must not undo the lease taken here.
        let lease = self.take_lease(session_id).await?;
        let input: Input = input.into();
        let noted = async {
            let mut loaded = self.store.load(session_id).await?;
            let phase = loaded.state.phase.kind();
            if phase.is_terminal() && input == Input::TeardownRequested {
                return Ok(phase);
            }
            let observers = Fanout(self.observers.iter().map(|o| o.as_ref()).collect());
            self.record(&mut loaded, input, &observers, Instant::now())
                .await?;
            Ok(loaded.state.phase.kind())
        }
        .await;
        lease.release().await;
        drop(claim);
        noted
    }

    /// Delivers `input`; with `until_settled`, a drive this engine already
    /// runs is also waited for until the session settles.
    async fn deliver_then(
        &self,
        session_id: &str,
        input: Input,
        progress: &dyn ProgressSink,
        until_settled: bool,
    ) -> Result<PhaseKind, EngineError> {
        let span = session_span(session_id);
        async {
            match self.hand_over_or_claim(session_id, &input).await? {
                Routed::Committed(phase, _) if !until_settled => Ok(phase),
                Routed::Committed(_, mut handle) => {
                    let ended = handle.ended.wait_for(Option::is_some).await;
                    let stopped = |reason: String| EngineError::DriverStopped {
                        session_id: session_id.to_string(),
                        reason,
                    };
                    match ended.ok().and_then(|ended| ended.clone()) {
                        Some(Ended::Settled(phase)) => Ok(phase),
                        Some(Ended::Stopped(reason)) => Err(stopped(reason)),
                        None => Err(stopped("its engine was dropped".into())),
                    }
                }
                Routed::Mine(claim) => Ok(self
                    .deliver_here(claim, input, progress)
                    .await?
                    .state
                    .phase
                    .kind()),
            }
        }
        .instrument(span)
        .await
    }

    /// Gives `input` to the drive of this engine that owns the session, or
    /// claims the session when there is none (or it ended before taking
    /// the input, which is then not committed and safe to deliver here).
    async fn hand_over_or_claim(
        &self,
        session_id: &str,
        input: &Input,
    ) -> Result<Routed<'_>, EngineError> {
        loop {
            let handle = match self.claim(session_id) {
                Claim::Mine(claim) => return Ok(Routed::Mine(claim)),
                Claim::Busy(handle) => handle,
            };
            let (reply, answer) = oneshot::channel();
            let delivery = Box::new(Delivery {
                input: input.clone(),
                reply,
            });
            if handle.inbox.send(delivery).is_err() {
                continue;
            }
            match answer.await {
                Ok(Ok(phase)) => return Ok(Routed::Committed(phase, handle)),
                Ok(Err(refused)) => return Err(refused.into()),
                // The drive ended without taking it: wait for its claim to go.
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }

    /// Resumes every session that is neither Ready nor finished: each ends
    /// Ready or cleaned up. Sessions another live process drives are left
    /// to it and reported as such. [`RECOVER_CONCURRENCY`] EC2 calls and
    /// as many SSH logins at once.
    pub async fn recover(
        &self,
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Recovered>, EngineError> {
        self.recover_with(RECOVER_CONCURRENCY, progress, &|_| {})
            .await
    }

    /// As [`Engine::recover`], driving every session side by side with at
    /// most `concurrency` of their EC2 calls, and as many SSH logins,
    /// running at once: a session in a
    /// long wait (a poll interval, a backoff, EC2's 30 s to show an
    /// instance) holds no slot, so it delays no other. Each is under its
    /// lease. `tally` hears how many are done, in flight and failed
    /// whenever that changes. The report lists sessions in the store's order.
    pub async fn recover_with(
        &self,
        concurrency: usize,
        progress: &dyn ProgressSink,
        tally: &(dyn Fn(&RecoverTally) + Sync),
    ) -> Result<Vec<Recovered>, EngineError> {
        let unsettled: Vec<String> = (self.store.list().await?)
            .into_iter()
            .filter(|summary| !summary.phase.is_settled())
            .map(|summary| summary.session_id)
            .collect();
        // Every drive starts at once (effects wait for slots, not drives).
        let counts = Mutex::new(RecoverTally {
            total: unsettled.len(),
            in_flight: unsettled.len(),
            ..RecoverTally::default()
        });
        if !unsettled.is_empty() {
            tally(&lock(&counts));
        }
        let update = |change: &dyn Fn(&mut RecoverTally)| {
            let mut counts = lock(&counts);
            change(&mut counts);
            tally(&counts);
        };
        let slots = Arc::new(EffectSlots::new(concurrency));
        let drives = unsettled.into_iter().map(|session_id| {
            let (update, slots) = (&update, Arc::clone(&slots));
            async move {
                // Boxed: a drive is a deep future, and recover's own would
                // not fit a test thread's stack in debug builds.
                let result = Box::pin(self.resume_within(&session_id, progress, Some(slots)))
                    .await
                    .map(|s| s.state.phase.kind());
                update(&|t| t.ended(&result));
                Recovered { session_id, result }
            }
        });
        let mut report = futures_util::future::join_all(drives).await;
        // Then a replacement an interruption named but never started (its
        // watcher died first) is started, once: its id is derived.
        for summary in self.store.list().await? {
            let started = Box::pin(self.start_missing_replacement(&summary, progress)).await;
            match started {
                Ok(Some(started)) => report.push(started),
                Ok(None) => {}
                Err(e) => report.push(Recovered {
                    session_id: format!("(replacement of {})", summary.session_id),
                    result: Err(e),
                }),
            }
        }
        Ok(report)
    }

    /// Starts `count` sessions from one request, side by side, and drives
    /// each until it settles: one result per session, in start order. The
    /// sessions share this engine's rate limits, batched polls and
    /// validation and spot market answers, so N sessions cost far less
    /// than N provisions.
    pub async fn provision_many(
        &self,
        request: ProvisionRequest,
        count: usize,
        progress: &dyn ProgressSink,
    ) -> Vec<Result<ReadyInstance, EngineError>> {
        let sessions = (0..count).map(|_| {
            let request = request.clone();
            // Boxed, as in recover.
            Box::pin(self.provision(request, progress))
        });
        futures_util::future::join_all(sessions).await
    }

    /// Takes the lease, commits `input`, drives to the end. A finished
    /// session takes no input: it is reported as it stands.
    async fn deliver_here(
        &self,
        claim: DriveClaim<'_>,
        input: Input,
        progress: &dyn ProgressSink,
    ) -> Result<LoadedSession, EngineError> {
        let session_id = claim.session_id.clone();
        let lease = self.take_lease(&session_id).await?;
        let progress = ProgressObserver(progress);
        let observers = self.fanout(&progress);
        let committed = async {
            let mut loaded = self.store.load(&session_id).await?;
            if loaded.state.phase.kind().is_terminal() && input == Input::TeardownRequested {
                return Ok(Err(loaded));
            }
            // A pause asked for here is moot: the drive below runs the intent once more.
            let _pause = self
                .record(&mut loaded, input, &observers, Instant::now())
                .await?;
            Ok::<_, EngineError>(Ok(loaded))
        }
        .await;
        match committed {
            Ok(Ok(loaded)) => self.drive(loaded, claim, lease, &observers).await,
            Ok(Err(finished)) => {
                lease.release().await;
                Ok(finished)
            }
            Err(e) => {
                lease.release().await;
                Err(e)
            }
        }
    }

    /// Registers this engine as the session's driver, unless it already is.
    fn claim(&self, session_id: &str) -> Claim<'_> {
        let mut driving = lock(&self.driving);
        if let Some(handle) = driving.get(session_id) {
            return Claim::Busy(handle.clone());
        }
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (ended, ended_rx) = watch::channel(None);
        driving.insert(
            session_id.to_string(),
            DriveHandle {
                inbox: inbox_tx,
                ended: ended_rx,
            },
        );
        Claim::Mine(DriveClaim {
            registry: &self.driving,
            session_id: session_id.to_string(),
            inbox,
            ended,
            effect_slots: None,
        })
    }

    fn fanout<'a>(&'a self, progress: &'a ProgressObserver<'a>) -> Fanout<'a> {
        let mut all: Vec<&dyn Observer> = self.observers.iter().map(|o| o.as_ref()).collect();
        all.push(progress);
        Fanout(all)
    }

    /// Commits one input's step and moves `session` on to it; returns the
    /// machine's request to pause, if any. On error `session` is unchanged.
    async fn record(
        &self,
        session: &mut LoadedSession,
        input: Input,
        observers: &Fanout<'_>,
        started: Instant,
    ) -> Result<Option<Pause>, EngineError> {
        let now = self.clock.now();
        let step = machine::step(&session.context, &session.state, input.clone(), now)?;
        let checkpoint = Checkpoint {
            outcome: Some(input),
            state: step.state,
            intent: step.effect.map(|effect| Intent {
                effect,
                not_before: step.wake_at,
            }),
        };
        self.store
            .commit(&session.context.session_id, &checkpoint, &self.holder, now)
            .await?;
        observers.observe(&Observation::Stepped {
            context: &session.context,
            before: &session.state,
            checkpoint: &checkpoint,
            notices: &step.notices,
            guards: step.guards,
            created_at: session.created_at,
            at: now,
            elapsed: started.elapsed(),
        });
        session.state = checkpoint.state;
        session.pending = checkpoint.intent;
        Ok(step.pause)
    }

    /// Leases the session to this engine (or explains who holds it); the
    /// engine's heartbeat keeps it.
    async fn take_lease(&self, session_id: &str) -> Result<SessionLease<'_>, EngineError> {
        Ok(self.lease.acquire(session_id).await?)
    }

    /// Drives the session until it settles (or stops); the session as it ends.
    async fn drive(
        &self,
        mut session: LoadedSession,
        mut claim: DriveClaim<'_>,
        mut lease: SessionLease<'_>,
        observers: &Fanout<'_>,
    ) -> Result<LoadedSession, EngineError> {
        let started = Instant::now();
        observers.observe(&Observation::Resumed {
            session: &session,
            at: self.clock.now(),
        });
        let result = self
            .drive_loop(
                &mut session,
                &mut claim.inbox,
                &mut lease,
                claim.effect_slots.as_deref(),
                observers,
                started,
            )
            .await;
        lease.release().await;
        match &result {
            Ok(()) => {
                observers.observe(&Observation::Settled {
                    context: &session.context,
                    state: &session.state,
                    created_at: session.created_at,
                    at: self.clock.now(),
                });
                let phase = session.state.phase.kind();
                claim.ended.send_replace(Some(Ended::Settled(phase)));
            }
            Err(e) => {
                // The caller gets the error and says it: logged once, quietly.
                info!(error = %e, "driving stopped");
                claim
                    .ended
                    .send_replace(Some(Ended::Stopped(e.to_string())));
            }
        }
        result.map(|()| session)
    }

    async fn drive_loop(
        &self,
        session: &mut LoadedSession,
        inbox: &mut Inbox,
        lease: &mut SessionLease<'_>,
        effect_slots: Option<&EffectSlots>,
        observers: &Fanout<'_>,
        started: Instant,
    ) -> Result<(), EngineError> {
        let mut first_intent = true;
        loop {
            // Inputs that arrived meanwhile go first: a teardown must be
            // committed before the next intent (perhaps a launch) runs.
            if let Ok(delivery) = inbox.try_recv() {
                self.accept(session, delivery, observers, started).await?;
                continue;
            }
            let Some(intent) = session.pending.clone() else {
                return Ok(());
            };
            if let Some(at) = intent.not_before {
                tokio::select! {
                    biased;
                    Some(delivery) = inbox.recv() => {
                        self.accept(session, delivery, observers, started).await?;
                        continue;
                    }
                    _ = self.clock.sleep_until(at) => {}
                }
            }
            // Closed only when its engine is dropped, which ends this drive anyway.
            let slot = match effect_slots.and_then(|slots| slots.for_effect(&intent.effect)) {
                Some(pool) => pool.acquire().await.ok(),
                None => None,
            };
            // Checked after any wait for a slot, right before the effect:
            // another process that took the session over runs it now.
            lease.still_held().await?;
            let (input, delivered) = self.run_effect(session, &intent, inbox).await;
            drop(slot);
            // The drive's first intent may be one an earlier driver sent
            // before it stopped: what it did then is not in this answer.
            let input = if first_intent {
                input.map(Input::after_earlier_send)
            } else {
                input
            };
            first_intent = false;
            let mut pause = None;
            if let Some(input) = input {
                pause = self.record(session, input, observers, started).await?;
            }
            let any_delivered = !delivered.is_empty();
            for delivery in delivered {
                self.accept(session, delivery, observers, started).await?;
            }
            // An outside input (a teardown) answers the pause: carry on.
            if let Some(Pause::CleanupStalled {
                phase,
                failures,
                last_error,
            }) = pause.filter(|_| !any_delivered)
            {
                return Err(EngineError::CleanupStalled {
                    session_id: session.context.session_id.clone(),
                    phase,
                    failures,
                    last_error,
                });
            }
        }
    }

    /// Runs the intent's effect; outside inputs that arrive meanwhile are
    /// returned for committing after it. An effect that only looks is
    /// abandoned for them (its answer would be stale); one that creates or
    /// removes something is always answered.
    async fn run_effect(
        &self,
        session: &LoadedSession,
        intent: &Intent,
        inbox: &mut Inbox,
    ) -> (Option<Input>, Vec<Box<Delivery>>) {
        // On the heap: an effect's future holds every kind of call (SDK
        // requests, SSH sessions), and inline it would make every drive
        // (and what awaits one) too deep for a thread's stack in debug builds.
        let mut effect = Box::pin(self.effects.run(
            &session.context,
            session.created_at,
            &intent.effect,
        ));
        let mut delivered = Vec::new();
        loop {
            tokio::select! {
                biased;
                input = &mut effect => return (Some(input), delivered),
                Some(delivery) = inbox.recv() => {
                    delivered.push(delivery);
                    if intent.effect.only_looks() {
                        return (None, delivered);
                    }
                }
            }
        }
    }

    /// Commits an outside input and answers whoever delivered it. A refusal
    /// by the machine leaves the session as it was; a teardown of a session
    /// that has just finished is answered with where it finished.
    async fn accept(
        &self,
        session: &mut LoadedSession,
        delivery: Box<Delivery>,
        observers: &Fanout<'_>,
        started: Instant,
    ) -> Result<(), EngineError> {
        let Delivery { input, reply } = *delivery;
        let phase = session.state.phase.kind();
        if phase.is_terminal() && input == Input::TeardownRequested {
            let _ = reply.send(Ok(phase));
            return Ok(());
        }
        match self.record(session, input, observers, started).await {
            Ok(_pause) => {
                let _ = reply.send(Ok(session.state.phase.kind()));
                Ok(())
            }
            Err(EngineError::Machine(refused)) => {
                let _ = reply.send(Err(refused));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// One span per session: its id, and its phase and instance as they change.
fn session_span(session_id: &str) -> tracing::Span {
    tracing::info_span!(
        "session",
        session_id = %session_id,
        phase = tracing::field::Empty,
        instance_id = tracing::field::Empty
    )
}

fn ready_or_error(end: LoadedSession) -> Result<ReadyInstance, EngineError> {
    let session_id = end.context.session_id.clone();
    match &end.state.phase {
        ProvisionPhase::Ready(ready) => Ok(ReadyInstance::new(&end.context, ready)),
        ProvisionPhase::Failed(failed) => Err(EngineError::ProvisionFailed {
            session_id,
            reason: failed.reason.clone(),
        }),
        ProvisionPhase::Interrupted(end) => Err(EngineError::Interrupted {
            session_id,
            reason: end.reason.clone(),
        }),
        _ => Err(EngineError::TornDown { session_id }),
    }
}

/// This engine's one lease: a heartbeat renews its row in the store while
/// it drives any session (one write per `ttl / 3`, however many), and the
/// drives learn from it when the lease lapsed and a session may have been
/// taken over. A drive about to run an effect while the last renewal is
/// older than the heartbeat allows (the process was stopped or the machine
/// slept, so no heartbeat could run) renews first and asks the store.
struct EngineLease {
    store: Arc<dyn CheckpointStore>,
    holder: LeaseHolder,
    ttl: Duration,
    /// The engine's clock, which dates renewals.
    clock: Arc<dyn Clock>,
    state: Arc<LeaseState>,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct LeaseState {
    /// How many times the heartbeat found the lease lapsed.
    lapses: AtomicU64,
    /// When (ms, by the engine's clock) a renewal last began that worked.
    renewed_at_ms: AtomicU64,
    /// Drives under way, by session: the heartbeat writes only while
    /// there are some.
    by_session: Mutex<HashMap<String, usize>>,
    /// Held while a session's lease is taken for a drive here, and while a
    /// dropped drive's lease is let go: the second must not undo the first.
    gate: tokio::sync::Mutex<()>,
}

impl LeaseState {
    /// Whether a drive of `session_id` is under way here.
    fn driving(&self, session_id: &str) -> bool {
        lock(&self.by_session).contains_key(session_id)
    }

    /// A renewal that began at `at` worked; one that lapsed counts as a lapse.
    fn renewed(&self, at: Timestamp, beat: Heartbeat) {
        // Stored, not maxed: a clock stepped back must not hide overdue renewals.
        self.renewed_at_ms.store(at.0, Ordering::SeqCst);
        if beat.lapsed {
            warn!("this engine's lease had lapsed; its drives check their sessions");
            self.lapses.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl EngineLease {
    fn new(
        store: Arc<dyn CheckpointStore>,
        holder: LeaseHolder,
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> EngineLease {
        EngineLease {
            store,
            holder,
            ttl,
            clock,
            state: Arc::default(),
            heartbeat: Mutex::new(None),
        }
    }

    /// Whether the last renewal is older than half the lease: the heartbeat
    /// renews every third of it, so it has missed a beat, and by the time
    /// this process runs again the store may have let another take over.
    fn renewal_overdue(&self) -> bool {
        let renewed = self.state.renewed_at_ms.load(Ordering::SeqCst);
        let half = u64::try_from((self.ttl / 2).as_millis()).unwrap_or(u64::MAX);
        self.clock.now().0.saturating_sub(renewed) > half
    }

    /// Leases the session to this engine: a drive's share of the lease.
    async fn acquire(&self, session_id: &str) -> Result<SessionLease<'_>, StoreError> {
        let _gate = self.state.gate.lock().await;
        let began = self.clock.now();
        let beat = self
            .store
            .acquire_lease(session_id, &self.holder, self.ttl)
            .await?;
        self.noted(began, beat);
        Ok(self.join(session_id))
    }

    /// What a renewal of the engine's lease outside the heartbeat (taking
    /// or creating a session, begun at `began`) found. A lapse it hides
    /// would keep the next heartbeat from seeing it, so it counts as the
    /// heartbeat's would: the drives ask the store whether their sessions
    /// are still theirs.
    fn noted(&self, began: Timestamp, beat: Heartbeat) {
        self.state.renewed(began, beat);
    }

    /// A drive's share of the lease, for the session just leased to this
    /// engine; starts the heartbeat if it is not running.
    fn join(&self, session_id: &str) -> SessionLease<'_> {
        *lock(&self.state.by_session)
            .entry(session_id.to_string())
            .or_default() += 1;
        let mut heartbeat = lock(&self.heartbeat);
        if heartbeat.is_none() {
            *heartbeat = Some(self.start_heartbeat());
        }
        SessionLease {
            engine: self,
            session_id: session_id.to_string(),
            checked_lapses: self.state.lapses.load(Ordering::SeqCst),
            released: false,
        }
    }

    fn start_heartbeat(&self) -> tokio::task::JoinHandle<()> {
        let (store, holder, ttl) = (Arc::clone(&self.store), self.holder.clone(), self.ttl);
        let (state, clock) = (Arc::clone(&self.state), Arc::clone(&self.clock));
        let every = (ttl / 3).max(Duration::from_millis(100));
        tokio::spawn(async move {
            // Since when the heartbeat has failed, and whether that already
            // counted as a lapse.
            let mut failing: Option<(tokio::time::Instant, bool)> = None;
            loop {
                tokio::time::sleep(every).await;
                if lock(&state.by_session).is_empty() {
                    continue;
                }
                let began = clock.now();
                match store.heartbeat(&holder, ttl).await {
                    Ok(beat) => {
                        failing = None;
                        state.renewed(began, beat);
                    }
                    // A busy or failing database may recover before the
                    // lease expires; past a whole `ttl` of failures it may
                    // have expired, so the drives check their sessions.
                    Err(e) => {
                        warn!(error = %e, "lease heartbeat failed; retrying");
                        let (since, counted) =
                            failing.get_or_insert((tokio::time::Instant::now(), false));
                        if !*counted && since.elapsed() + every >= ttl {
                            *counted = true;
                            state.lapses.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        })
    }
}

impl Drop for EngineLease {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.heartbeat).take() {
            task.abort();
        }
    }
}

/// One drive's view of its engine's lease. A drive ends by releasing it;
/// one dropped before that (its caller gave up on it: a timeout, a select)
/// has the session let go in the background, or the engine's heartbeat
/// would keep it from every other process for as long as the engine lives.
struct SessionLease<'a> {
    engine: &'a EngineLease,
    session_id: String,
    /// The engine's lapse count this drive last checked its session at.
    checked_lapses: u64,
    released: bool,
}

impl SessionLease<'_> {
    /// Lets another driver take over at once; best effort, as the lease of
    /// a process that died expires anyway.
    async fn release(mut self) {
        let engine = self.engine;
        let released = engine
            .store
            .release_lease(&self.session_id, &engine.holder)
            .await;
        // Dropped before the store answered, the drop lets go instead.
        self.released = true;
        if let Err(e) = released {
            warn!(session_id = %self.session_id, error = %e, "could not release the lease");
        }
    }

    /// Whether the session is still this engine's to drive: after a lapse
    /// of the engine's lease, asked of the store once; otherwise known. A
    /// renewal overdue (this process was stopped, or the machine slept)
    /// is made first: from then on no one can take the session, and the
    /// store says whether someone already did.
    async fn still_held(&mut self) -> Result<(), EngineError> {
        let mut unrenewed = false;
        if self.engine.renewal_overdue() {
            let began = self.engine.clock.now();
            match (self.engine.store)
                .heartbeat(&self.engine.holder, self.engine.ttl)
                .await
            {
                Ok(beat) => self.engine.noted(began, beat),
                // Not renewed: the lease may have lapsed, so ask as after one.
                Err(e) => {
                    warn!(error = %e, "lease renewal failed; asking the store about the session");
                    unrenewed = true;
                }
            }
        }
        let lapses = self.engine.state.lapses.load(Ordering::SeqCst);
        if lapses == self.checked_lapses && !unrenewed {
            return Ok(());
        }
        let store = &self.engine.store;
        if store
            .holds_lease(&self.session_id, &self.engine.holder)
            .await?
        {
            self.checked_lapses = lapses;
            return Ok(());
        }
        // Another engine drives the session now: it runs the effects.
        Err(StoreError::LeaseLost(self.session_id.clone()).into())
    }
}

impl Drop for SessionLease<'_> {
    fn drop(&mut self) {
        let state = &self.engine.state;
        {
            let mut by_session = lock(&state.by_session);
            if let Some(n) = by_session.get_mut(&self.session_id) {
                *n -= 1;
                if *n == 0 {
                    by_session.remove(&self.session_id);
                }
            }
        }
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (state, store) = (Arc::clone(state), Arc::clone(&self.engine.store));
        let (holder, session_id) = (self.engine.holder.clone(), self.session_id.clone());
        runtime.spawn(async move {
            let _gate = state.gate.lock().await;
            // A new drive here took the session meanwhile: it is its lease now.
            if state.driving(&session_id) {
                return;
            }
            if let Err(e) = store.release_lease(&session_id, &holder).await {
                warn!(%session_id, error = %e, "could not release a dropped drive's lease");
            }
        });
    }
}
