//! Crash injection as decorators: a store and effects that "die" at a chosen
//! point, the way `kill -9` would stop the driver there. Once dead, every
//! store call fails (so nothing more is committed and no lease is released)
//! and no effect runs; the engine itself knows nothing of crashes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use acode_ec2::driver::EngineError;
use acode_ec2::effects::Effects;
use acode_ec2::machine::{Effect, Input, SessionContext, Timestamp};
use acode_ec2::store::{
    Checkpoint, CheckpointStore, Heartbeat, LeaseHolder, LoadedSession, LoggedEvent,
    SessionSummary, StoreError,
};
use async_trait::async_trait;

/// Where the process dies: right after this happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// An intent is committed; its effect has not run.
    IntentCommitted,
    /// The effect ran; its outcome is not committed.
    EffectRan,
    /// The outcome and the next intent are committed.
    OutcomeCommitted,
}

pub const ALL_POINTS: [CrashPoint; 3] = [
    CrashPoint::IntentCommitted,
    CrashPoint::EffectRan,
    CrashPoint::OutcomeCommitted,
];

/// Dies the `nth` time `point` is passed (1 = the first).
pub struct CrashSwitch {
    point: CrashPoint,
    nth: u32,
    passed: AtomicU32,
    dead: AtomicBool,
}

impl CrashSwitch {
    pub fn new(point: CrashPoint, nth: u32) -> Arc<CrashSwitch> {
        Arc::new(CrashSwitch {
            point,
            nth,
            passed: AtomicU32::new(0),
            dead: AtomicBool::new(false),
        })
    }

    /// Counts a pass of `point`; true when this pass is the crash.
    fn pass(&self, point: CrashPoint) -> bool {
        if point != self.point {
            return false;
        }
        let crash = self.passed.fetch_add(1, Ordering::SeqCst) + 1 == self.nth;
        if crash {
            self.dead.store(true, Ordering::SeqCst);
        }
        crash
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn check_alive(&self) -> Result<(), StoreError> {
        if self.is_dead() {
            return Err(died());
        }
        Ok(())
    }
}

fn died() -> StoreError {
    StoreError::Backend("injected crash: the process is dead".into())
}

/// Whether an engine error is the injected crash.
pub fn is_crash(err: &EngineError) -> bool {
    matches!(err, EngineError::Store(StoreError::Backend(e)) if e.to_string().starts_with("injected crash"))
}

pub struct CrashingStore {
    pub inner: Arc<dyn CheckpointStore>,
    pub switch: Arc<CrashSwitch>,
}

impl CrashingStore {
    fn after_commit(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        let intent = checkpoint.intent.is_some() && self.switch.pass(CrashPoint::IntentCommitted);
        let outcome =
            checkpoint.outcome.is_some() && self.switch.pass(CrashPoint::OutcomeCommitted);
        if intent || outcome {
            return Err(died());
        }
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for CrashingStore {
    async fn create(
        &self,
        context: &SessionContext,
        first: &Checkpoint,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Heartbeat, StoreError> {
        self.switch.check_alive()?;
        let beat = self
            .inner
            .create(context, first, holder, lease_ttl, now)
            .await?;
        self.after_commit(first)?;
        Ok(beat)
    }

    async fn commit(
        &self,
        session_id: &str,
        checkpoint: &Checkpoint,
        holder: &LeaseHolder,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.switch.check_alive()?;
        self.inner
            .commit(session_id, checkpoint, holder, now)
            .await?;
        self.after_commit(checkpoint)
    }

    async fn load(&self, session_id: &str) -> Result<LoadedSession, StoreError> {
        self.switch.check_alive()?;
        self.inner.load(session_id).await
    }

    async fn events(&self, session_id: &str) -> Result<Vec<LoggedEvent>, StoreError> {
        self.switch.check_alive()?;
        self.inner.events(session_id).await
    }

    async fn summary(&self, session_id: &str) -> Result<SessionSummary, StoreError> {
        self.switch.check_alive()?;
        self.inner.summary(session_id).await
    }

    async fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        self.switch.check_alive()?;
        self.inner.list().await
    }

    async fn acquire_lease(
        &self,
        session_id: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Heartbeat, StoreError> {
        self.switch.check_alive()?;
        self.inner.acquire_lease(session_id, holder, ttl).await
    }

    async fn heartbeat(
        &self,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Heartbeat, StoreError> {
        self.switch.check_alive()?;
        self.inner.heartbeat(holder, ttl).await
    }

    async fn holds_lease(
        &self,
        session_id: &str,
        holder: &LeaseHolder,
    ) -> Result<bool, StoreError> {
        self.switch.check_alive()?;
        self.inner.holds_lease(session_id, holder).await
    }

    async fn release_lease(
        &self,
        session_id: &str,
        holder: &LeaseHolder,
    ) -> Result<(), StoreError> {
        self.switch.check_alive()?;
        self.inner.release_lease(session_id, holder).await
    }
}

pub struct CrashingEffects<E> {
    pub inner: Arc<E>,
    pub switch: Arc<CrashSwitch>,
    /// Effects that ran, by name, in order (the crashing one included).
    pub ran: std::sync::Mutex<Vec<&'static str>>,
}

impl<E> CrashingEffects<E> {
    pub fn new(inner: Arc<E>, switch: Arc<CrashSwitch>) -> CrashingEffects<E> {
        CrashingEffects {
            inner,
            switch,
            ran: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl<E: Effects> Effects for CrashingEffects<E> {
    async fn run(&self, ctx: &SessionContext, created: Timestamp, effect: &Effect) -> Input {
        // A dead process runs nothing: the driver stops at its failed commit.
        assert!(
            !self.switch.is_dead(),
            "{} ran after the injected crash",
            effect.name()
        );
        self.ran.lock().unwrap().push(effect.name());
        let input = self.inner.run(ctx, created, effect).await;
        self.switch.pass(CrashPoint::EffectRan);
        input
    }

    async fn check_interruption(
        &self,
        ctx: &SessionContext,
        ready: &acode_ec2::machine::Ready,
    ) -> acode_ec2::effects::interruption::InterruptionCheck {
        self.inner.check_interruption(ctx, ready).await
    }
}
