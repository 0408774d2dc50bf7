//! The SQLite checkpoint store: WAL, `synchronous=FULL`, a busy timeout,
//! versioned migrations, a file created mode 0600.
//!
//! The event log is one rowid table; a session's events are the contiguous
//! ids `session_no << 32 | seq`, so a checkpoint dirties one log page and
//! costs about one WAL frame besides its single fsync.

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{
    Checkpoint, CheckpointStore, Heartbeat, LeaseHolder, LoadedSession, LogEntry, LoggedEvent,
    SessionSummary, StoreError, this_host,
};
use crate::clock::{Clock, SystemClock};
use crate::machine::{PhaseKind, SessionContext, SessionState, Timestamp};
use crate::request::parse_host_port;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Backend(Box::new(e))
    }
}

/// Names a failing disk or file for what it is, with what to do: a full
/// disk, a read-only database, a damaged file. Other errors pass as they are.
fn explain(error: StoreError, path: &Path) -> StoreError {
    use rusqlite::ErrorCode;
    let StoreError::Backend(inner) = &error else {
        return error;
    };
    let Some(rusqlite::Error::SqliteFailure(failure, message)) =
        inner.downcast_ref::<rusqlite::Error>()
    else {
        return error;
    };
    let path = path.display().to_string();
    match failure.code {
        ErrorCode::DiskFull => StoreError::DiskFull { path },
        ErrorCode::ReadOnly => StoreError::ReadOnly { path },
        ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => StoreError::Damaged {
            path,
            detail: message.clone().unwrap_or_else(|| failure.to_string()),
        },
        _ => error,
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` counts them.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sessions (
    session_id      TEXT PRIMARY KEY,
    created_at_ms   INTEGER NOT NULL,
    updated_at_ms   INTEGER NOT NULL,
    context_json    TEXT NOT NULL,
    -- Cache of the newest transition in `events`, for listing and status.
    phase           TEXT NOT NULL,
    detail          TEXT,
    instance_id     TEXT,
    public_ip       TEXT,
    key_path        TEXT,
    was_spot        INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_pid       INTEGER,
    lease_host      TEXT,
    lease_expires_ms INTEGER
) STRICT;
-- (Replaced by migration 2, which drops the (session_id, seq) index.)
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    session_id  TEXT NOT NULL REFERENCES sessions(session_id),
    seq         INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('created', 'outcome', 'transition', 'intent')),
    body_json   TEXT NOT NULL,
    UNIQUE (session_id, seq)
) STRICT;
"#,
    r#"
-- One B-tree for the log: a session's events are the contiguous rowid range
-- session_no << 32 | seq, so a checkpoint appends to one table page where
-- the table plus its (session_id, seq) index dirtied two. Each extra page is
-- an extra WAL frame to fsync (benches/commit_ratio.rs measures the effect).
ALTER TABLE sessions ADD COLUMN session_no INTEGER;
UPDATE sessions SET session_no = rowid;
CREATE UNIQUE INDEX sessions_by_no ON sessions (session_no);
CREATE TABLE session_events (
    id          INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('created', 'outcome', 'transition', 'intent')),
    body_json   TEXT NOT NULL
) STRICT;
INSERT INTO session_events (id, at_ms, kind, body_json)
    SELECT (s.session_no << 32) | e.seq, e.at_ms, e.kind, e.body_json
    FROM events e JOIN sessions s USING (session_id);
DROP TABLE events;
ALTER TABLE session_events RENAME TO events;
"#,
    r#"
-- How to reach a Ready instance, for `status` and `ssh-config`.
ALTER TABLE sessions ADD COLUMN ssh_endpoint TEXT;
ALTER TABLE sessions ADD COLUMN ssh_user TEXT;
ALTER TABLE sessions ADD COLUMN host_key_fingerprint TEXT;
ALTER TABLE sessions ADD COLUMN known_hosts_path TEXT;
UPDATE sessions SET ssh_user = json_extract(context_json, '$.request.ssh.user');
"#,
    r#"
-- One lease row per engine (a process driving sessions), renewed by one
-- heartbeat however many sessions it drives; a session's lease_owner points
-- at its engine. The sessions' own lease_pid/host/expires columns are only
-- read for leases written by older versions (which have no engine row).
CREATE TABLE engines (
    owner_id    TEXT PRIMARY KEY,
    pid         INTEGER NOT NULL,
    host        TEXT NOT NULL,
    expires_ms  INTEGER NOT NULL
) STRICT;
"#,
];

/// How long the row of an engine whose lease expired is kept (if it leads
/// no session): long past any lease, so `status` can still say who held one.
const ENGINE_ROW_KEPT_MS: i64 = 24 * 3600 * 1000;

/// Bits of an event id that hold the sequence number within its session.
const SEQ_BITS: u32 = 32;
/// The largest session number whose event ids still fit in an `i64`.
const MAX_SESSION_NO: i64 = (i64::MAX >> SEQ_BITS) - 1;

/// A session's id and its number, which places its events in the log.
struct SessionKey<'a> {
    id: &'a str,
    no: i64,
}

impl<'a> SessionKey<'a> {
    fn new(id: &'a str, no: Option<i64>) -> Result<SessionKey<'a>, StoreError> {
        match no {
            Some(no) if (1..=MAX_SESSION_NO).contains(&no) => Ok(SessionKey { id, no }),
            other => Err(corrupt(
                id,
                format!("session number {other:?} out of range"),
            )),
        }
    }

    /// The ids its events may take, `(first, last)`: event `seq` is `first + seq`.
    fn event_ids(&self) -> (i64, i64) {
        (self.no << SEQ_BITS, ((self.no + 1) << SEQ_BITS) - 1)
    }
}

/// The SQLite store: one connection, calls one at a time (SQLite has one
/// writer anyway), each run in place (see [`SqliteStore::run`]).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Judges lease expiry: one clock for every process on this file.
    clock: Arc<dyn Clock>,
    /// Write transactions committed through this handle: each is one WAL
    /// fsync (`synchronous=FULL`), which is what benches count.
    writes: AtomicU64,
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600, parent folder 0700) and migrates.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with_clock(path, Arc::new(SystemClock))
    }

    /// As [`SqliteStore::open`], with leases judged by `clock` (tests).
    pub fn open_with_clock(path: &Path, clock: Arc<dyn Clock>) -> Result<SqliteStore, StoreError> {
        let shown = path.display().to_string();
        let open_err = |detail: String| StoreError::Open {
            path: shown.clone(),
            detail,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| open_err(e.to_string()))?;
        }
        // Create the file ourselves so it is never world-readable, even briefly.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_err(e.to_string()))?;
        let mut conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        let setup = |conn: &mut Connection| -> Result<(), StoreError> {
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            // FULL: the WAL is fsynced at every commit, so a checkpoint survives power loss.
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            migrate(conn, &shown)
        };
        setup(&mut conn).map_err(|e| explain(e, path))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
                clock,
                writes: AtomicU64::new(0),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Write transactions this handle committed (one fsync each).
    pub fn write_transactions(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// Runs `work` in place: on a multi-thread runtime inside
    /// `block_in_place` (the worker's other tasks move to another thread
    /// while SQLite fsyncs), on a current-thread runtime directly (there is
    /// no other thread to move them to). Measured against handing the work
    /// to the blocking pool, this saves a thread hop per commit: 1.25× the
    /// bare-SQLite floor instead of 1.45–1.6× (`benches/commit_ratio`).
    fn run<T>(&self, work: impl FnOnce(&Inner) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let result = if multi_thread {
            tokio::task::block_in_place(|| work(&self.inner))
        } else {
            work(&self.inner)
        };
        result.map_err(|e| explain(e, &self.inner.path))
    }
}

impl Inner {
    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the
        // transaction rolls back on drop), so a poisoned lock is safe to reuse.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    let supported = MIGRATIONS.len() as i64;
    // Read the version inside the write transaction: two processes opening
    // an old file at once must not both run the same migration.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > supported {
        return Err(StoreError::NewerSchema {
            path: path.to_string(),
            found,
            supported,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

/// A value as the JSON text the log keeps; a failure (no known type can
/// fail, but a stand-in must never reach the log) rolls the write back.
fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(Box::new(e)))
}

fn kind_of(entry: &LogEntry) -> &'static str {
    match entry {
        LogEntry::Created { .. } => "created",
        LogEntry::Outcome { .. } => "outcome",
        LogEntry::Transition { .. } => "transition",
        LogEntry::Intent { .. } => "intent",
    }
}

/// Appends `entry` after event id `last` (which it advances).
fn append(
    tx: &Transaction<'_>,
    session: &SessionKey<'_>,
    last: &mut i64,
    now: Timestamp,
    entry: &LogEntry,
) -> Result<(), StoreError> {
    *last += 1;
    if *last > session.event_ids().1 {
        return Err(StoreError::Full(format!(
            "session {} has 2^32 - 1 events",
            session.id
        )));
    }
    // Cached statements: preparing one costs about as much as running it.
    tx.prepare_cached("INSERT INTO events (id, at_ms, kind, body_json) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![
            *last,
            now.0 as i64,
            kind_of(entry),
            to_json(entry)?
        ])?;
    Ok(())
}

fn detail_of(state: &SessionState) -> Option<String> {
    state.phase.end_reason().map(str::to_string)
}

/// Appends the checkpoint's entries and refreshes the cached row.
fn write_checkpoint(
    tx: &Transaction<'_>,
    session: &SessionKey<'_>,
    checkpoint: &Checkpoint,
    now: Timestamp,
) -> Result<(), StoreError> {
    let (first, last) = session.event_ids();
    let mut seq: i64 = tx
        .prepare_cached("SELECT COALESCE(MAX(id), ?1) FROM events WHERE id BETWEEN ?1 AND ?2")?
        .query_row([first, last], |r| r.get(0))?;
    if let Some(input) = &checkpoint.outcome {
        append(
            tx,
            session,
            &mut seq,
            now,
            &LogEntry::Outcome {
                input: input.clone(),
            },
        )?;
    }
    append(
        tx,
        session,
        &mut seq,
        now,
        &LogEntry::Transition {
            state: checkpoint.state.clone(),
        },
    )?;
    if let Some(intent) = &checkpoint.intent {
        append(
            tx,
            session,
            &mut seq,
            now,
            &LogEntry::Intent {
                intent: intent.clone(),
            },
        )?;
    }
    let phase = &checkpoint.state.phase;
    // Keep the last known instance and key in the row even once cleanup
    // phases stop carrying them, so `status` still shows what existed. The
    // row is only written when what it shows changes: a poll that changes
    // nothing costs one page (the log's), not two.
    tx.prepare_cached(
        "UPDATE sessions SET updated_at_ms = ?2, phase = ?3, detail = ?4,
             instance_id = COALESCE(?5, instance_id), public_ip = COALESCE(?6, public_ip),
             key_path = COALESCE(?7, key_path), was_spot = COALESCE(?8, was_spot),
             ssh_endpoint = COALESCE(?9, ssh_endpoint),
             host_key_fingerprint = COALESCE(?10, host_key_fingerprint)
         WHERE session_id = ?1 AND (phase IS NOT ?3 OR detail IS NOT ?4
             OR (?5 IS NOT NULL AND instance_id IS NOT ?5) OR (?6 IS NOT NULL AND public_ip IS NOT ?6)
             OR (?7 IS NOT NULL AND key_path IS NOT ?7) OR (?8 IS NOT NULL AND was_spot IS NOT ?8)
             OR (?9 IS NOT NULL AND ssh_endpoint IS NOT ?9)
             OR (?10 IS NOT NULL AND host_key_fingerprint IS NOT ?10))")?
    .execute(params![
            session.id,
            now.0 as i64,
            phase.kind().name(),
            detail_of(&checkpoint.state),
            phase.instance_id(),
            phase.public_ip(),
            phase.key().and_then(|k| k.private_key_path.clone()),
            // Only a phase that knows its instance says what it was.
            phase.instance().map(|i| i.was_spot),
            phase.ssh_endpoint(),
            phase.host_key_fingerprint(),
        ])?;
    Ok(())
}

/// Whether the recorded holder can no longer be driving the session.
fn holder_is_gone(
    pid: Option<i64>,
    host: Option<&str>,
    expires_ms: Option<i64>,
    now: Timestamp,
) -> bool {
    if expires_ms.is_none_or(|e| e <= now.0 as i64) {
        return true;
    }
    // Same host and the process is gone: no need to wait for expiry.
    host == Some(this_host().as_str()) && pid.is_some_and(|pid| !process_runs(pid))
}

/// Whether process `pid` of this host runs. A zombie does not: it died
/// and waits for its parent to reap it, which a container whose PID 1 is
/// not an init may never do. When /proc cannot say (hidden by `hidepid`,
/// no file handles left), it is taken to run: a lease waits out its
/// expiry rather than risk two drivers.
fn process_runs(pid: i64) -> bool {
    stat_says_running(std::fs::read_to_string(format!("/proc/{pid}/stat")))
}

/// What a read of `/proc/PID/stat` says: see [`process_runs`].
fn stat_says_running(read: std::io::Result<String>) -> bool {
    let stat = match read {
        Ok(stat) => stat,
        Err(e) => return e.kind() != std::io::ErrorKind::NotFound,
    };
    // `pid (command) state ...`; the command may hold spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

fn lease_check(
    tx: &Transaction<'_>,
    session_id: &str,
    holder: &LeaseHolder,
    now: Timestamp,
) -> Result<(), StoreError> {
    type Row = (Option<String>, Option<i64>, Option<String>, Option<i64>);
    // The holder's engine row says whether it is alive; a lease written by
    // an older version has none, and its own columns say.
    let row: Option<Row> = tx
        .prepare_cached(
            "SELECT s.lease_owner, COALESCE(e.pid, s.lease_pid), COALESCE(e.host, s.lease_host),
                    COALESCE(e.expires_ms, s.lease_expires_ms)
             FROM sessions s LEFT JOIN engines e ON e.owner_id = s.lease_owner
             WHERE s.session_id = ?1",
        )?
        .query_row([session_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((owner, pid, host, expires)) = row else {
        return Err(StoreError::NotFound(session_id.to_string()));
    };
    let free = owner.is_none() || owner.as_deref() == Some(holder.owner_id.as_str());
    if free || holder_is_gone(pid, host.as_deref(), expires, now) {
        return Ok(());
    }
    Err(StoreError::Leased {
        session_id: session_id.to_string(),
        pid: pid.unwrap_or_default() as u32,
        host: host.unwrap_or_default(),
        remaining_ms: (expires.unwrap_or_default() - now.0 as i64).max(0) as u64,
    })
}

/// Points the session's lease at `holder`'s engine, and renews the engine's
/// (saying whether it had lapsed).
fn set_lease(
    tx: &Transaction<'_>,
    session_id: &str,
    holder: &LeaseHolder,
    ttl: Duration,
    now: Timestamp,
) -> Result<Heartbeat, StoreError> {
    tx.prepare_cached(
        "UPDATE sessions SET lease_owner = ?2, lease_pid = NULL, lease_host = NULL, lease_expires_ms = NULL
         WHERE session_id = ?1",
    )?
    .execute(params![session_id, holder.owner_id])?;
    // No row yet is a new engine, not a lapsed one.
    let before = renew_engine(tx, holder, ttl, now)?;
    Ok(Heartbeat {
        lapsed: before.is_some_and(|expires| expires <= now.0 as i64),
    })
}

/// Registers or renews `holder`'s engine row until `now + ttl`; what it
/// expired at before, if there was a row.
fn renew_engine(
    tx: &Transaction<'_>,
    holder: &LeaseHolder,
    ttl: Duration,
    now: Timestamp,
) -> Result<Option<i64>, StoreError> {
    let before: Option<i64> = tx
        .prepare_cached("SELECT expires_ms FROM engines WHERE owner_id = ?1")?
        .query_row([&holder.owner_id], |r| r.get(0))
        .optional()?;
    tx.prepare_cached(
        "INSERT INTO engines (owner_id, pid, host, expires_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (owner_id) DO UPDATE SET pid = ?2, host = ?3, expires_ms = ?4",
    )?
    .execute(params![
        holder.owner_id,
        holder.pid,
        holder.host,
        now.plus(ttl).0 as i64
    ])?;
    Ok(before)
}

/// The session's key, or `LeaseLost` unless `holder` holds its lease right now.
fn require_own_lease<'a>(
    tx: &Transaction<'_>,
    session_id: &'a str,
    holder: &LeaseHolder,
) -> Result<SessionKey<'a>, StoreError> {
    let row: Option<(Option<String>, Option<i64>)> = tx
        .prepare_cached("SELECT lease_owner, session_no FROM sessions WHERE session_id = ?1")?
        .query_row([session_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match row {
        None => Err(StoreError::NotFound(session_id.to_string())),
        Some((Some(owner), no)) if owner == holder.owner_id => SessionKey::new(session_id, no),
        Some(_) => Err(StoreError::LeaseLost(session_id.to_string())),
    }
}

/// The session's key and creation time.
fn session_key<'a>(
    conn: &Connection,
    session_id: &'a str,
) -> Result<(SessionKey<'a>, Timestamp), StoreError> {
    let row: Option<(Option<i64>, i64)> = conn
        .prepare_cached("SELECT session_no, created_at_ms FROM sessions WHERE session_id = ?1")?
        .query_row([session_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (no, created_at) = row.ok_or_else(|| StoreError::NotFound(session_id.to_string()))?;
    Ok((
        SessionKey::new(session_id, no)?,
        Timestamp(created_at as u64),
    ))
}

fn corrupt(session_id: &str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        session_id: session_id.to_string(),
        detail: detail.into(),
    }
}

fn summary_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(SessionSummary, String)> {
    let phase_name: String = row.get(1)?;
    let ssh_endpoint: Option<String> = row.get(9)?;
    let (ssh_host, ssh_port) = ssh_endpoint
        .as_deref()
        .and_then(parse_host_port)
        .map_or((None, None), |(host, port)| (Some(host), Some(port)));
    Ok((
        SessionSummary {
            session_id: row.get(0)?,
            phase: PhaseKind::Validating,
            instance_id: row.get(2)?,
            public_ip: row.get(3)?,
            key_path: row.get(4)?,
            was_spot: row.get(5)?,
            created_at_ms: row.get::<_, i64>(6)? as u64,
            updated_at_ms: row.get::<_, i64>(7)? as u64,
            detail: row.get(8)?,
            ssh_host,
            ssh_port,
            ssh_user: row.get(10)?,
            host_key_fingerprint: row.get(11)?,
            known_hosts_path: row.get(12)?,
        },
        phase_name,
    ))
}

fn with_phase((mut summary, name): (SessionSummary, String)) -> Result<SessionSummary, StoreError> {
    summary.phase = PhaseKind::parse(&name)
        .ok_or_else(|| corrupt(&summary.session_id, format!("unknown phase {name}")))?;
    // The file is written once a login verified the host key, and removed
    // with the instance.
    if summary.phase != PhaseKind::Ready || summary.host_key_fingerprint.is_none() {
        summary.known_hosts_path = None;
    }
    Ok(summary)
}

const SUMMARY_COLUMNS: &str = "session_id, phase, instance_id, public_ip, key_path, was_spot, \
    created_at_ms, updated_at_ms, detail, ssh_endpoint, ssh_user, host_key_fingerprint, known_hosts_path";

impl Inner {
    fn create(
        &self,
        context: &SessionContext,
        first: &Checkpoint,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Heartbeat, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = &context.session_id;
        let no: Option<i64> = tx
            .query_row(
                "INSERT OR IGNORE INTO sessions (session_id, session_no, created_at_ms, updated_at_ms,
                     context_json, phase, ssh_user, known_hosts_path)
                 VALUES (?1, (SELECT COALESCE(MAX(session_no), 0) + 1 FROM sessions), ?2, ?2, ?3, ?4, ?5, ?6)
                 RETURNING session_no",
                params![
                    id,
                    now.0 as i64,
                    to_json(context)?,
                    first.state.phase.kind().name(),
                    context.request.ssh.user,
                    context.known_hosts_path(),
                ],
                |r| r.get(0),
            )
            .optional()?;
        let Some(no) = no else {
            return Err(StoreError::AlreadyExists {
                session_id: id.clone(),
            });
        };
        if no > MAX_SESSION_NO {
            return Err(StoreError::Full(format!("{MAX_SESSION_NO} sessions")));
        }
        let session = SessionKey::new(id, Some(no))?;
        append(
            &tx,
            &session,
            &mut session.event_ids().0,
            now,
            &LogEntry::Created {
                context: Box::new(context.clone()),
            },
        )?;
        let beat = set_lease(&tx, id, holder, lease_ttl, self.clock.now())?;
        write_checkpoint(&tx, &session, first, now)?;
        tx.commit()?;
        self.wrote();
        Ok(beat)
    }

    fn commit(
        &self,
        session_id: &str,
        checkpoint: &Checkpoint,
        holder: &LeaseHolder,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Fenced, not renewed: renewal is the driver's background job, so a
        // commit writes the log page and nothing else that did not change.
        let session = require_own_lease(&tx, session_id, holder)?;
        write_checkpoint(&tx, &session, checkpoint, now)?;
        tx.commit()?;
        self.wrote();
        Ok(())
    }

    fn load(&self, session_id: &str) -> Result<LoadedSession, StoreError> {
        let guard = self.conn();
        // One read transaction: a consistent snapshot even if another process writes.
        let conn = guard.unchecked_transaction()?;
        let (session, created_at) = session_key(&conn, session_id)?;
        let (first, last) = session.event_ids();
        // The newest event of a kind: a short backward walk, as every
        // checkpoint writes a transition and most write an intent.
        let body = |kind: &str| -> Result<Option<(i64, String)>, StoreError> {
            Ok(conn
                .query_row(
                    "SELECT id, body_json FROM events WHERE id BETWEEN ?1 AND ?2 AND kind = ?3 ORDER BY id DESC LIMIT 1",
                    params![first, last, kind],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
        };
        let parse = |text: &str| {
            serde_json::from_str::<LogEntry>(text).map_err(|e| corrupt(session_id, e.to_string()))
        };
        let created: Option<String> = conn
            .query_row(
                "SELECT body_json FROM events WHERE id BETWEEN ?1 AND ?2 ORDER BY id LIMIT 1",
                [first, last],
                |r| r.get(0),
            )
            .optional()?;
        let Some(created) = created else {
            return Err(corrupt(session_id, "no creation event"));
        };
        let LogEntry::Created { context } = parse(&created)? else {
            return Err(corrupt(session_id, "creation event of another kind"));
        };
        let Some((_, transition)) = body("transition")? else {
            return Err(corrupt(session_id, "no transition event"));
        };
        let LogEntry::Transition { state } = parse(&transition)? else {
            return Err(corrupt(session_id, "transition event of another kind"));
        };
        // The newest intent is pending unless an outcome was logged after it.
        let pending = match (body("intent")?, body("outcome")?) {
            (Some((intent_seq, text)), outcome)
                if outcome.as_ref().is_none_or(|(seq, _)| *seq < intent_seq) =>
            {
                let LogEntry::Intent { intent } = parse(&text)? else {
                    return Err(corrupt(session_id, "intent event of another kind"));
                };
                Some(intent)
            }
            _ => None,
        };
        Ok(LoadedSession {
            context: *context,
            state,
            pending,
            created_at,
        })
    }

    fn events(&self, session_id: &str) -> Result<Vec<LoggedEvent>, StoreError> {
        let conn = self.conn();
        let (session, _) = session_key(&conn, session_id)?;
        let (first, last) = session.event_ids();
        let mut stmt = conn.prepare(
            "SELECT id - ?1, at_ms, body_json FROM events WHERE id BETWEEN ?1 AND ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map([first, last], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut events = Vec::new();
        for row in rows {
            let (seq, at, body) = row?;
            let entry =
                serde_json::from_str(&body).map_err(|e| corrupt(session_id, e.to_string()))?;
            events.push(LoggedEvent {
                seq,
                at: Timestamp(at as u64),
                entry,
            });
        }
        Ok(events)
    }

    fn summary(&self, session_id: &str) -> Result<SessionSummary, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!("SELECT {SUMMARY_COLUMNS} FROM sessions WHERE session_id = ?1"),
                [session_id],
                summary_from_row,
            )
            .optional()?;
        with_phase(row.ok_or_else(|| StoreError::NotFound(session_id.to_string()))?)
    }

    fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM sessions ORDER BY created_at_ms, session_id"
        ))?;
        let rows = stmt.query_map([], summary_from_row)?;
        rows.map(|row| with_phase(row?)).collect()
    }

    fn acquire_lease(
        &self,
        session_id: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Heartbeat, StoreError> {
        let now = self.clock.now();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        lease_check(&tx, session_id, holder, now)?;
        let beat = set_lease(&tx, session_id, holder, ttl, now)?;
        tx.commit()?;
        self.wrote();
        Ok(beat)
    }

    fn heartbeat(&self, holder: &LeaseHolder, ttl: Duration) -> Result<Heartbeat, StoreError> {
        let now = self.clock.now();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // A heartbeat runs only after a lease was taken: no row means it
        // was removed, which is a lapse too.
        let before = renew_engine(&tx, holder, ttl, now)?;
        let lapsed = before.is_none_or(|expires| expires <= now.0 as i64);
        // Rows of engines long gone that lead no session: a day is beyond
        // any lease, and keeps the table as small as the live engines.
        tx.prepare_cached(
            "DELETE FROM engines WHERE expires_ms < ?1
             AND NOT EXISTS (SELECT 1 FROM sessions WHERE lease_owner = engines.owner_id)",
        )?
        .execute([now.0 as i64 - ENGINE_ROW_KEPT_MS])?;
        tx.commit()?;
        self.wrote();
        Ok(Heartbeat { lapsed })
    }

    fn holds_lease(&self, session_id: &str, holder: &LeaseHolder) -> Result<bool, StoreError> {
        let owner: Option<Option<String>> = self
            .conn()
            .prepare_cached("SELECT lease_owner FROM sessions WHERE session_id = ?1")?
            .query_row([session_id], |r| r.get(0))
            .optional()?;
        match owner {
            None => Err(StoreError::NotFound(session_id.to_string())),
            Some(owner) => Ok(owner.as_deref() == Some(holder.owner_id.as_str())),
        }
    }

    fn release_lease(&self, session_id: &str, holder: &LeaseHolder) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE sessions SET lease_owner = NULL, lease_pid = NULL, lease_host = NULL, lease_expires_ms = NULL
             WHERE session_id = ?1 AND lease_owner = ?2",
            params![session_id, holder.owner_id],
        )?;
        // A statement that changed nothing writes nothing to the WAL.
        if changed > 0 {
            self.wrote();
        }
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for SqliteStore {
    async fn create(
        &self,
        context: &SessionContext,
        first: &Checkpoint,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Heartbeat, StoreError> {
        self.run(|s| s.create(context, first, holder, lease_ttl, now))
    }

    async fn commit(
        &self,
        session_id: &str,
        checkpoint: &Checkpoint,
        holder: &LeaseHolder,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.run(|s| s.commit(session_id, checkpoint, holder, now))
    }

    async fn load(&self, session_id: &str) -> Result<LoadedSession, StoreError> {
        self.run(|s| s.load(session_id))
    }

    async fn events(&self, session_id: &str) -> Result<Vec<LoggedEvent>, StoreError> {
        self.run(|s| s.events(session_id))
    }

    async fn summary(&self, session_id: &str) -> Result<SessionSummary, StoreError> {
        self.run(|s| s.summary(session_id))
    }

    async fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        self.run(|s| s.list())
    }

    async fn acquire_lease(
        &self,
        session_id: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Heartbeat, StoreError> {
        self.run(|s| s.acquire_lease(session_id, holder, ttl))
    }

    async fn heartbeat(
        &self,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Heartbeat, StoreError> {
        self.run(|s| s.heartbeat(holder, ttl))
    }

    async fn holds_lease(
        &self,
        session_id: &str,
        holder: &LeaseHolder,
    ) -> Result<bool, StoreError> {
        self.run(|s| s.holds_lease(session_id, holder))
    }

    async fn release_lease(
        &self,
        session_id: &str,
        holder: &LeaseHolder,
    ) -> Result<(), StoreError> {
        self.run(|s| s.release_lease(session_id, holder))
    }
}

#[cfg(test)]
mod tests;
