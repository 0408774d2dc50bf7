//! Helpers shared by the integration tests.

use std::sync::Arc;
use std::time::Duration;

use acode_ec2::clock::{Clock, ManualClock, wall_clock};
use acode_ec2::driver::{Engine, EngineOptions};
use acode_ec2::effects::Effects;
use acode_ec2::request::ProvisionRequest;
use acode_ec2::store::{CheckpointStore, LeaseHolder, SqliteStore};

use crate::crashing::{CrashPoint, CrashSwitch, CrashingEffects, CrashingStore};

/// Held by the tests that load both cores on their own (200 sessions at
/// once, the kill campaign), so they do not run beside each other.
pub fn heavy_test() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that panicked holding it leaves nothing to repair.
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A lease holder whose process has exited: what a `kill -9` leaves behind.
pub fn dead_holder() -> LeaseHolder {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn `true`");
    let pid = child.id();
    child.wait().expect("reap `true`");
    LeaseHolder {
        owner_id: format!("dead-{pid}"),
        pid,
        host: acode_ec2::store::this_host(),
    }
}

/// A request from YAML, so tests read like the user's config files.
pub fn request(yaml_body: &str) -> ProvisionRequest {
    let text = format!("ec2Target:\n{yaml_body}");
    acode_ec2::config::parse(&text)
        .unwrap_or_else(|e| panic!("test config does not parse: {e}\n{text}"))
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub store: Arc<SqliteStore>,
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).expect("open store"));
        Harness { dir, store }
    }

    pub fn key_dir(&self) -> String {
        self.dir.path().join("keys").to_string_lossy().into_owned()
    }

    fn options(&self) -> EngineOptions {
        EngineOptions {
            key_dir: self.key_dir(),
            lease_ttl: Duration::from_secs(30),
        }
    }

    pub fn engine<E: Effects>(&self, effects: Arc<E>) -> Engine<E> {
        Engine::new(effects, self.store.clone(), self.options())
    }

    /// An engine whose waits (polls, backoff, grace periods) pass at once.
    pub fn fast_engine<E: Effects>(&self, effects: Arc<E>) -> Engine<E> {
        self.engine(effects).with_clock(manual_clock())
    }

    /// An engine in a process that dies (as `kill -9` would) the `nth` time
    /// it passes `point`, leaving its lease to a dead process. Its waits
    /// pass at once.
    pub fn crashing_engine<E: Effects>(
        &self,
        effects: Arc<E>,
        point: CrashPoint,
        nth: u32,
    ) -> Engine<CrashingEffects<E>> {
        let switch = CrashSwitch::new(point, nth);
        let store: Arc<dyn CheckpointStore> = Arc::new(CrashingStore {
            inner: self.store.clone(),
            switch: switch.clone(),
        });
        Engine::new(
            Arc::new(CrashingEffects::new(effects, switch)),
            store,
            self.options(),
        )
        .with_holder(dead_holder())
        .with_clock(manual_clock())
    }

    /// The inputs the session's log recorded, in order.
    pub async fn outcomes(&self, session_id: &str) -> Vec<acode_ec2::machine::Input> {
        acode_ec2::store::CheckpointStore::events(self.store.as_ref(), session_id)
            .await
            .expect("events")
            .into_iter()
            .filter_map(|e| match e.entry {
                acode_ec2::store::LogEntry::Outcome { input } => Some(input),
                _ => None,
            })
            .collect()
    }

    /// The only session in the store.
    pub async fn only_session(&self) -> String {
        let sessions = acode_ec2::store::CheckpointStore::list(self.store.as_ref())
            .await
            .expect("list");
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        sessions[0].session_id.clone()
    }
}

pub fn manual_clock() -> Arc<dyn Clock> {
    Arc::new(ManualClock::starting_at(wall_clock()))
}
