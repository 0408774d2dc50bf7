//! Durable session state: an append-only event log per session (the truth)
//! and a session row (a cache for listing and status), after steno's saga log.
//!
//! Invariants:
//! - a phase change and the intent of the effect it needs commit in one
//!   transaction before the effect runs; the effect's outcome commits with the
//!   next phase change (one fsync per transition);
//! - a session has at most one live driver: every commit is fenced by the
//!   lease; a session's lease points at its engine, whose one row a single
//!   heartbeat renews (so lease writes do not grow with the sessions an
//!   engine drives), and a session whose engine died (its row expired by
//!   the store's clock, or its process is gone) may be taken over;
//! - nothing secret is stored: key pairs appear by name and file path only;
//! - the trait is backend-neutral: async, no database types in its API, and
//!   lease expiry judged by the store's own clock (one clock for every
//!   process sharing it), so a PostgreSQL store can follow without touching
//!   the driver.

mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use sqlite::SqliteStore;

use crate::machine::{Effect, Input, PhaseKind, SessionContext, SessionState, Timestamp};

/// An effect recorded before it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub effect: Effect,
    /// Not to be run before this time (polls and backoff).
    pub not_before: Option<Timestamp>,
}

/// One atomic checkpoint: what the last effect answered, the state it led
/// to, and the intent of the next effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub outcome: Option<Input>,
    pub state: SessionState,
    pub intent: Option<Intent>,
}

/// One entry of a session's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum LogEntry {
    Created { context: Box<SessionContext> },
    Outcome { input: Input },
    Transition { state: SessionState },
    Intent { intent: Intent },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub seq: i64,
    pub at: Timestamp,
    pub entry: LogEntry,
}

/// A session as the log says it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedSession {
    pub context: SessionContext,
    pub state: SessionState,
    /// The intent recorded last and not yet answered: resume re-runs it.
    pub pending: Option<Intent>,
    pub created_at: Timestamp,
}

/// What `sessions` and `status` show, from the cached row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionSummary {
    pub session_id: String,
    pub phase: PhaseKind,
    pub instance_id: Option<String>,
    pub public_ip: Option<String>,
    pub key_path: Option<String>,
    pub was_spot: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub detail: Option<String>,
    /// Where the SSH check reaches the instance, once it runs.
    pub ssh_host: Option<String>,
    pub ssh_port: Option<u16>,
    pub ssh_user: Option<String>,
    /// The host key an SSH login verified.
    pub host_key_fingerprint: Option<String>,
    /// The known_hosts file holding that key, while the session is Ready.
    pub known_hosts_path: Option<String>,
}

/// One stretch of a session in one phase, read from its event log: where
/// the time went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhaseSpan {
    pub phase: PhaseKind,
    pub entered_at_ms: u64,
    /// `None` for the phase the session is in now.
    pub duration_ms: Option<u64>,
    /// Answers recorded in the phase: effect runs (polls, retries) and outside inputs.
    pub attempts: u32,
}

/// The phases a session went through, in order, from its log.
pub fn phase_timeline(events: &[LoggedEvent]) -> Vec<PhaseSpan> {
    let mut spans: Vec<PhaseSpan> = Vec::new();
    for event in events {
        match &event.entry {
            LogEntry::Transition { state } => {
                let phase = state.phase.kind();
                if spans.last().is_some_and(|s| s.phase == phase) {
                    continue;
                }
                if let Some(open) = spans.last_mut() {
                    open.duration_ms = Some(Timestamp(open.entered_at_ms).millis_until(event.at));
                }
                spans.push(PhaseSpan {
                    phase,
                    entered_at_ms: event.at.0,
                    duration_ms: None,
                    attempts: 0,
                });
            }
            // An outcome answers the phase the session was in.
            LogEntry::Outcome { .. } => {
                if let Some(open) = spans.last_mut() {
                    open.attempts += 1;
                }
            }
            LogEntry::Created { .. } | LogEntry::Intent { .. } => {}
        }
    }
    spans
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The engine's lease had expired before this renewal: other engines
    /// may have taken some of its sessions meanwhile.
    pub lapsed: bool,
}

/// Who drives a session: one id per engine, plus where it runs so a dead
/// holder on this host is noticed without waiting for the lease to expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub owner_id: String,
    pub pid: u32,
    pub host: String,
}

impl LeaseHolder {
    /// A fresh holder for this process.
    pub fn for_this_process() -> LeaseHolder {
        LeaseHolder {
            owner_id: uuid::Uuid::new_v4().to_string(),
            pid: std::process::id(),
            host: this_host(),
        }
    }
}

/// This machine and PID namespace: hostname, boot id and PID namespace, so
/// "same host, process gone" is only concluded where a PID means the same
/// process (two containers may share a hostname but not their PIDs).
pub fn this_host() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .ok()
    };
    let hostname = read("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown-host".into());
    let boot = read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let pid_ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{hostname} boot={boot} {pid_ns}")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open state database {path}: {detail}; check the path (--state-db / ACODE_EC2_STATE_DB) and its permissions"
    )]
    Open { path: String, detail: String },
    #[error(
        "state database {path} has schema version {found}, newer than this acode-ec2 supports ({supported}); \
         use a newer acode-ec2 or another --state-db"
    )]
    NewerSchema {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error(
        "state database error: {0}; if it persists, check disk space and that no other program holds the file"
    )]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "the state database is full ({0}); finish its sessions with `acode-ec2 recover` and use a fresh --state-db"
    )]
    Full(String),
    #[error(
        "the disk holding the state database {path} is full, so nothing more was recorded (and nothing \
         was done that was not recorded first); free space there, then `acode-ec2 recover` resumes the sessions"
    )]
    DiskFull { path: String },
    #[error(
        "the state database {path} cannot be written (read-only file, folder or filesystem), so nothing more \
         was recorded (and nothing was done that was not recorded first); make it writable, then \
         `acode-ec2 recover` resumes the sessions"
    )]
    ReadOnly { path: String },
    #[error(
        "the state database {path} is damaged ({detail}); move it aside and restore a backup, or remove what \
         acode-ec2 created by the tag acode=true (instances, key pairs) and start with a fresh --state-db"
    )]
    Damaged { path: String, detail: String },
    #[error("no session {0} in the state database; `acode-ec2 sessions` lists them")]
    NotFound(String),
    #[error(
        "session {session_id} already exists in the state database; a new session needs a new id \
         (`acode-ec2 status {session_id}` shows the one there)"
    )]
    AlreadyExists { session_id: String },
    #[error(
        "session {session_id} is being driven by another process (pid {pid} on {}, its lease runs {} s more); \
         wait for it to finish, or stop it and retry once its lease expires",
        .host.split_whitespace().next().unwrap_or("another host"),
        .remaining_ms.div_ceil(1000)
    )]
    Leased {
        session_id: String,
        pid: u32,
        host: String,
        remaining_ms: u64,
    },
    #[error(
        "lost the lease on session {0} to another process; this driver stopped without touching it \
         further, and the other process drives it now (`acode-ec2 status {0}` shows where it is)"
    )]
    LeaseLost(String),
    #[error(
        "session {session_id} has an unreadable event log ({detail}); it was written by an incompatible \
         version or damaged: use the acode-ec2 that wrote it, or remove its resources by the tag \
         acode-session-id={session_id}"
    )]
    Corrupt { session_id: String, detail: String },
}

/// Durable storage of sessions. The SQLite store is the embedded default.
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// Records a new session with its first checkpoint, leased to `holder`,
    /// whose engine lease this renews (and says if it had lapsed). `now`
    /// dates the log entries; the lease runs by the store's clock.
    async fn create(
        &self,
        context: &SessionContext,
        first: &Checkpoint,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Heartbeat, StoreError>;

    /// Appends one checkpoint; refused unless `holder` still holds the lease
    /// (which the driver renews separately).
    async fn commit(
        &self,
        session_id: &str,
        checkpoint: &Checkpoint,
        holder: &LeaseHolder,
        now: Timestamp,
    ) -> Result<(), StoreError>;

    async fn load(&self, session_id: &str) -> Result<LoadedSession, StoreError>;

    async fn events(&self, session_id: &str) -> Result<Vec<LoggedEvent>, StoreError>;

    async fn summary(&self, session_id: &str) -> Result<SessionSummary, StoreError>;

    async fn list(&self) -> Result<Vec<SessionSummary>, StoreError>;

    /// Takes the lease for `ttl` by the store's clock, or explains who holds
    /// it. It renews `holder`'s engine lease, so it says, as a heartbeat
    /// does, whether that had lapsed: the engine's other sessions may have
    /// been taken over meanwhile.
    async fn acquire_lease(
        &self,
        session_id: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Heartbeat, StoreError>;

    /// Renews the lease of `holder`'s engine, which every session leased
    /// to it shares, for `ttl` by the store's clock.
    async fn heartbeat(&self, holder: &LeaseHolder, ttl: Duration)
    -> Result<Heartbeat, StoreError>;

    /// Whether `holder` still holds the session's lease (after a lapse of
    /// its engine's lease, another engine may have taken it).
    async fn holds_lease(&self, session_id: &str, holder: &LeaseHolder)
    -> Result<bool, StoreError>;

    async fn release_lease(&self, session_id: &str, holder: &LeaseHolder)
    -> Result<(), StoreError>;
}

/// Sessions as unit tests of the store and the driver start them.
#[cfg(test)]
pub(crate) mod sample {
    use super::{Checkpoint, Intent};
    use crate::machine::{self, SessionContext};

    /// A session of the sample request.
    pub fn context(id: &str) -> SessionContext {
        SessionContext {
            session_id: id.into(),
            request: crate::request::sample::request(),
            key_dir: "/tmp/keys".into(),
            replaces: None,
        }
    }

    /// The checkpoint a new session is created with.
    pub fn first_checkpoint(ctx: &SessionContext) -> Checkpoint {
        let step = machine::start(ctx);
        Checkpoint {
            outcome: None,
            state: step.state,
            intent: step.effect.map(|effect| Intent {
                effect,
                not_before: None,
            }),
        }
    }
}
