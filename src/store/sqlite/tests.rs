use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::machine::{self, Effect, Input, ProvisionPhase, Validating};
use crate::store::Intent;
use crate::store::sample::{context, first_checkpoint};

const NOW: Timestamp = Timestamp(1_700_000_000_000);
const TTL: Duration = Duration::from_secs(30);

fn validated(ctx: &SessionContext) -> Checkpoint {
    let state = machine::start(ctx).state;
    let input = Input::Validated {
        zones: Vec::new(),
        zone_ids: Vec::new(),
        image: machine::ImageChoice {
            ami_id: "ami-1".into(),
            root_device_name: None,
            platform: None,
        },
    };
    let step = machine::step(ctx, &state, input.clone(), NOW).unwrap();
    Checkpoint {
        outcome: Some(input),
        state: step.state,
        intent: step.effect.map(|effect| Intent {
            effect,
            not_before: None,
        }),
    }
}

fn new_store(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("state.db")).unwrap()
}

#[test]
fn a_session_survives_closing_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context("s1");
    let holder = LeaseHolder::for_this_process();
    {
        let store = new_store(&dir);
        store
            .inner
            .create(&ctx, &first_checkpoint(&ctx), &holder, TTL, NOW)
            .unwrap();
        store
            .inner
            .commit("s1", &validated(&ctx), &holder, NOW)
            .unwrap();
    }
    let store = new_store(&dir);
    let loaded = store.inner.load("s1").unwrap();
    assert_eq!(loaded.context, ctx);
    assert_eq!(loaded.state.phase.kind(), PhaseKind::PreparingKeyPair);
    assert!(matches!(
        loaded.pending,
        Some(Intent {
            effect: Effect::EnsureKeyPair { .. },
            ..
        })
    ));
    assert_eq!(
        store.inner.summary("s1").unwrap().phase,
        PhaseKind::PreparingKeyPair
    );
    let kinds: Vec<&str> = store
        .inner
        .events("s1")
        .unwrap()
        .iter()
        .map(|e| kind_of(&e.entry))
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "transition",
            "intent",
            "outcome",
            "transition",
            "intent"
        ]
    );
}

#[test]
fn an_answered_intent_is_not_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let ctx = context("s1");
    let holder = LeaseHolder::for_this_process();
    store
        .inner
        .create(&ctx, &first_checkpoint(&ctx), &holder, TTL, NOW)
        .unwrap();
    assert_eq!(
        store.inner.load("s1").unwrap().pending.map(|i| i.effect),
        Some(Effect::ValidateRequest)
    );
    let settled = Checkpoint {
        outcome: Some(Input::Rejected {
            code: crate::error_code::AwsErrorCode::InvalidAmiIdNotFound.into(),
            message: "gone".into(),
        }),
        state: SessionState::fresh(ProvisionPhase::Failed(machine::Failed {
            reason: "gone".into(),
        })),
        intent: None,
    };
    store.inner.commit("s1", &settled, &holder, NOW).unwrap();
    let loaded = store.inner.load("s1").unwrap();
    assert_eq!(loaded.pending, None);
    assert_eq!(
        store.inner.summary("s1").unwrap().detail.as_deref(),
        Some("gone")
    );
}

#[test]
fn a_second_driver_is_refused_while_the_first_holds_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let ctx = context("s1");
    let first = LeaseHolder::for_this_process();
    let second = LeaseHolder::for_this_process();
    store
        .inner
        .create(&ctx, &first_checkpoint(&ctx), &first, TTL, NOW)
        .unwrap();
    let err = store.inner.acquire_lease("s1", &second, TTL).unwrap_err();
    assert!(matches!(err, StoreError::Leased { .. }), "{err}");
    assert!(err.to_string().contains("another process"), "{err}");
    // The second may not commit either: commits are fenced by the lease.
    let err = store
        .inner
        .commit("s1", &validated(&ctx), &second, NOW)
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost(_)), "{err}");
    // Once released, the second takes over and the first is fenced out.
    store.inner.release_lease("s1", &first).unwrap();
    store.inner.acquire_lease("s1", &second, TTL).unwrap();
    assert!(matches!(
        store.inner.commit("s1", &validated(&ctx), &first, NOW),
        Err(StoreError::LeaseLost(_))
    ));
}

#[test]
fn a_lease_whose_holder_died_can_be_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    // Expiry is judged by the store's clock, not by whoever asks.
    let clock = Arc::new(crate::clock::ManualClock::starting_at(NOW));
    let store = SqliteStore::open_with_clock(&dir.path().join("state.db"), clock.clone()).unwrap();
    let ctx = context("s1");
    let alive_elsewhere = LeaseHolder {
        owner_id: "other".into(),
        pid: 1,
        host: "another-host".into(),
    };
    let me = LeaseHolder::for_this_process();
    store
        .inner
        .create(&ctx, &first_checkpoint(&ctx), &alive_elsewhere, TTL, NOW)
        .unwrap();
    assert!(store.inner.acquire_lease("s1", &me, TTL).is_err());
    clock.advance(TTL - Duration::from_millis(1));
    assert!(store.inner.acquire_lease("s1", &me, TTL).is_err());
    // After expiry the lease is free.
    clock.advance(Duration::from_millis(1));
    store.inner.acquire_lease("s1", &me, TTL).unwrap();

    // On this host, a holder whose process is gone is noticed at once.
    let ctx2 = context("s2");
    let dead_here = LeaseHolder {
        owner_id: "dead".into(),
        pid: u32::MAX - 1,
        host: this_host(),
    };
    store
        .inner
        .create(&ctx2, &first_checkpoint(&ctx2), &dead_here, TTL, NOW)
        .unwrap();
    store.inner.acquire_lease("s2", &me, TTL).unwrap();

    // So is one that died and was never reaped (a zombie: /proc/PID stays).
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let ctx3 = context("s3");
    let zombie = LeaseHolder {
        owner_id: "zombie".into(),
        pid: child.id(),
        host: this_host(),
    };
    store
        .inner
        .create(&ctx3, &first_checkpoint(&ctx3), &zombie, TTL, NOW)
        .unwrap();
    assert!(
        store.inner.acquire_lease("s3", &me, TTL).is_err(),
        "taken from a live process"
    );
    child.kill().unwrap();
    // Not reaped yet; wait until the kernel shows it as a zombie.
    let stat = format!("/proc/{}/stat", child.id());
    let since = std::time::Instant::now();
    while !std::fs::read_to_string(&stat).unwrap().contains(") Z") {
        assert!(since.elapsed() < Duration::from_secs(60), "never a zombie");
        std::thread::yield_now();
    }
    store.inner.acquire_lease("s3", &me, TTL).unwrap();
    child.wait().unwrap();
}

/// /proc that cannot say (hidden by `hidepid`, no file handles left) is
/// not taken for a dead holder: only "no such process" and a zombie are.
#[test]
fn only_a_missing_or_zombie_process_counts_as_gone() {
    use std::io::{Error, ErrorKind};
    let read = |kind: ErrorKind| Err(Error::from(kind));
    assert!(!stat_says_running(read(ErrorKind::NotFound)));
    assert!(stat_says_running(read(ErrorKind::PermissionDenied)));
    assert!(stat_says_running(read(ErrorKind::Other)));
    // The command may hold spaces and parentheses; the state follows the last `)`.
    for (stat, runs) in [
        ("42 (acode-ec2) S 1 42", true),
        ("42 (a) Z (b) R 1 42", true),
        ("42 (a) R (b) Z 1 42", false),
        ("42 (acode-ec2) X 1 42", false),
    ] {
        assert_eq!(stat_says_running(Ok(stat.into())), runs, "{stat}");
    }
}

#[test]
fn a_torn_write_leaves_the_previous_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let ctx = context("s1");
    let holder = LeaseHolder::for_this_process();
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .inner
            .create(&ctx, &first_checkpoint(&ctx), &holder, TTL, NOW)
            .unwrap();
    }
    {
        // A writer dies mid-transaction: the connection goes away uncommitted.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             INSERT INTO events (id, at_ms, kind, body_json)
                 VALUES (((SELECT session_no FROM sessions WHERE session_id = 's1') << 32) | 99,
                         0, 'transition', '{\"event\":\"Transition\",\"state\":{}}');
             UPDATE sessions SET phase = 'Ready' WHERE session_id = 's1';",
        )
        .unwrap();
        drop(conn);
    }
    let store = SqliteStore::open(&path).unwrap();
    let loaded = store.inner.load("s1").unwrap();
    assert_eq!(loaded.state.phase, ProvisionPhase::Validating(Validating));
    assert_eq!(
        loaded.pending.map(|i| i.effect),
        Some(Effect::ValidateRequest)
    );
    assert_eq!(
        store.inner.summary("s1").unwrap().phase,
        PhaseKind::Validating
    );
    assert_eq!(store.inner.events("s1").unwrap().len(), 3);
}

#[test]
fn the_database_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/state.db");
    let store = SqliteStore::open(&path).unwrap();
    let ctx = context("s1");
    store
        .inner
        .create(
            &ctx,
            &first_checkpoint(&ctx),
            &LeaseHolder::for_this_process(),
            TTL,
            NOW,
        )
        .unwrap();
    // The WAL and its index hold the same rows as the database, so they
    // must be as private (SQLite gives them the database file's mode).
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", path.display());
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
}

#[test]
fn a_newer_schema_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = SqliteStore::open(&path).err().unwrap();
    assert!(
        matches!(err, StoreError::NewerSchema { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn duplicate_and_unknown_sessions_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let ctx = context("s1");
    let holder = LeaseHolder::for_this_process();
    store
        .inner
        .create(&ctx, &first_checkpoint(&ctx), &holder, TTL, NOW)
        .unwrap();
    assert!(matches!(
        store
            .inner
            .create(&ctx, &first_checkpoint(&ctx), &holder, TTL, NOW),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.inner.load("nope"),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.inner.list().unwrap().len(), 1);
}

#[test]
fn interleaved_sessions_keep_separate_ordered_logs() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let holder = LeaseHolder::for_this_process();
    let (a, b) = (context("a"), context("b"));
    store
        .inner
        .create(&a, &first_checkpoint(&a), &holder, TTL, NOW)
        .unwrap();
    store
        .inner
        .create(&b, &first_checkpoint(&b), &holder, TTL, NOW)
        .unwrap();
    // `a` was created first, so its events sit below `b`'s: appending to it
    // inserts into the middle of the log, not at its end.
    store
        .inner
        .commit("a", &validated(&a), &holder, NOW)
        .unwrap();
    let seqs = |id: &str| -> Vec<i64> {
        store
            .inner
            .events(id)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(seqs("a"), [1, 2, 3, 4, 5, 6]);
    assert_eq!(seqs("b"), [1, 2, 3]);
    assert_eq!(
        store.inner.load("a").unwrap().state.phase.kind(),
        PhaseKind::PreparingKeyPair
    );
    assert_eq!(
        store.inner.load("b").unwrap().state.phase.kind(),
        PhaseKind::Validating
    );
    assert!(matches!(
        store.inner.events("nope"),
        Err(StoreError::NotFound(_))
    ));
}

/// A database as acode-ec2 wrote it before migration 2.
fn version_1_database(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(MIGRATIONS[0]).unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    conn
}

#[test]
fn processes_opening_an_old_database_together_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(version_1_database(&path));
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || SqliteStore::open(&path).map(|_| ()))
        })
        .collect();
    for opener in openers {
        opener.join().unwrap().unwrap();
    }
}

#[test]
fn a_full_database_refuses_new_sessions_and_events_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let holder = LeaseHolder::for_this_process();
    let ctx = context("s1");
    store
        .inner
        .create(&ctx, &first_checkpoint(&ctx), &holder, TTL, NOW)
        .unwrap();
    // Session numbers exhausted: the next session is refused.
    store
        .inner
        .conn()
        .execute(
            "UPDATE sessions SET session_no = ?1 WHERE session_id = 's1'",
            [MAX_SESSION_NO],
        )
        .unwrap();
    let s2 = context("s2");
    let err = store
        .inner
        .create(&s2, &first_checkpoint(&s2), &holder, TTL, NOW)
        .unwrap_err();
    assert!(matches!(err, StoreError::Full(_)), "{err}");
    assert_eq!(store.inner.list().unwrap().len(), 1);
    // A session whose last event id is taken cannot append another.
    let last = SessionKey::new("s1", Some(MAX_SESSION_NO))
        .unwrap()
        .event_ids()
        .1;
    store
        .inner
        .conn()
        .execute(
            "INSERT INTO events (id, at_ms, kind, body_json) VALUES (?1, 0, 'outcome', '{}')",
            [last],
        )
        .unwrap();
    let err = store
        .inner
        .commit("s1", &validated(&ctx), &holder, NOW)
        .unwrap_err();
    assert!(matches!(err, StoreError::Full(_)), "{err}");
    assert!(err.to_string().contains("fresh --state-db"), "{err}");
}

#[test]
fn a_version_1_database_is_migrated_with_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let ctx = context("old");
    let first = first_checkpoint(&ctx);
    {
        let conn = version_1_database(&path);
        conn.execute(
            "INSERT INTO sessions (session_id, created_at_ms, updated_at_ms, context_json, phase)
             VALUES ('old', ?1, ?1, '{}', 'Validating')",
            [NOW.0 as i64],
        )
        .unwrap();
        let entries = [
            LogEntry::Created {
                context: Box::new(ctx.clone()),
            },
            LogEntry::Transition {
                state: first.state.clone(),
            },
            LogEntry::Intent {
                intent: first.intent.clone().unwrap(),
            },
        ];
        for (seq, entry) in entries.iter().enumerate() {
            conn.execute(
                "INSERT INTO events (session_id, seq, at_ms, kind, body_json) VALUES ('old', ?1, ?2, ?3, ?4)",
                params![seq as i64 + 1, NOW.0 as i64, kind_of(entry), to_json(entry).unwrap()],
            )
            .unwrap();
        }
    }
    let store = SqliteStore::open(&path).unwrap();
    let loaded = store.inner.load("old").unwrap();
    assert_eq!(loaded.context, ctx);
    assert_eq!(loaded.state, first.state);
    assert_eq!(loaded.pending, first.intent);
    // The migrated session goes on, and a new one gets its own log.
    let holder = LeaseHolder::for_this_process();
    store.inner.acquire_lease("old", &holder, TTL).unwrap();
    store
        .inner
        .commit("old", &validated(&ctx), &holder, NOW)
        .unwrap();
    let new = context("new");
    store
        .inner
        .create(&new, &first_checkpoint(&new), &holder, TTL, NOW)
        .unwrap();
    assert_eq!(store.inner.events("old").unwrap().len(), 6);
    assert_eq!(store.inner.events("new").unwrap().len(), 3);
    let version: i64 = store
        .inner
        .conn()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
}

/// The trait's async path, on both kinds of runtime (in place on a
/// current-thread one, inside `block_in_place` on a multi-thread one).
#[tokio::test]
async fn the_async_api_commits_and_reads_back() {
    async_api_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_api_works_on_a_multi_thread_runtime() {
    async_api_round_trip().await;
}

async fn async_api_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn CheckpointStore> = Arc::new(new_store(&dir));
    let ctx = context("s1");
    let holder = LeaseHolder::for_this_process();
    store
        .create(&ctx, &first_checkpoint(&ctx), &holder, TTL, NOW)
        .await
        .unwrap();
    store
        .commit("s1", &validated(&ctx), &holder, NOW)
        .await
        .unwrap();
    let loaded = store.load("s1").await.unwrap();
    assert_eq!(loaded.state.phase.kind(), PhaseKind::PreparingKeyPair);
    let other = LeaseHolder::for_this_process();
    assert!(matches!(
        store.acquire_lease("s1", &other, TTL).await,
        Err(StoreError::Leased { .. })
    ));
    store.release_lease("s1", &holder).await.unwrap();
    store.acquire_lease("s1", &other, TTL).await.unwrap();
    assert!(store.holds_lease("s1", &other).await.unwrap());
    assert!(!store.holds_lease("s1", &holder).await.unwrap());
    store.heartbeat(&other, TTL).await.unwrap();
    assert_eq!(store.list().await.unwrap().len(), 1);
}

#[test]
fn one_heartbeat_keeps_every_session_of_an_engine_and_says_when_it_lapsed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(crate::clock::ManualClock::starting_at(NOW));
    let store = SqliteStore::open_with_clock(&dir.path().join("state.db"), clock.clone()).unwrap();
    let engine = LeaseHolder {
        owner_id: "engine-a".into(),
        pid: 1,
        host: "another-host".into(),
    };
    let other = LeaseHolder::for_this_process();
    for id in ["s1", "s2", "s3"] {
        let ctx = context(id);
        store
            .inner
            .create(&ctx, &first_checkpoint(&ctx), &engine, TTL, NOW)
            .unwrap();
    }
    // Heartbeats well within the lease keep all three, one write each.
    let writes = store.write_transactions();
    for _ in 0..4 {
        clock.advance(TTL / 2);
        let beat = store.inner.heartbeat(&engine, TTL).unwrap();
        assert!(!beat.lapsed);
    }
    assert_eq!(store.write_transactions() - writes, 4);
    for id in ["s1", "s2", "s3"] {
        let err = store.inner.acquire_lease(id, &other, TTL).unwrap_err();
        assert!(matches!(err, StoreError::Leased { .. }), "{err}");
    }
    // A missed heartbeat: the sessions may be taken, and the next
    // heartbeat says the lease lapsed.
    clock.advance(TTL);
    store.inner.acquire_lease("s2", &other, TTL).unwrap();
    assert!(store.inner.heartbeat(&engine, TTL).unwrap().lapsed);
    assert!(!store.inner.holds_lease("s2", &engine).unwrap());
    assert!(store.inner.holds_lease("s1", &engine).unwrap());
    // Renewed again, the sessions it kept are its own once more.
    assert!(matches!(
        store.inner.acquire_lease("s1", &other, TTL),
        Err(StoreError::Leased { .. })
    ));
    assert!(matches!(
        store
            .inner
            .commit("s2", &validated(&context("s2")), &engine, NOW),
        Err(StoreError::LeaseLost(_))
    ));
}

#[test]
fn a_lease_written_by_an_older_version_is_judged_by_its_own_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(crate::clock::ManualClock::starting_at(NOW));
    let store = SqliteStore::open_with_clock(&dir.path().join("state.db"), clock.clone()).unwrap();
    let ctx = context("s1");
    let me = LeaseHolder::for_this_process();
    store
        .inner
        .create(&ctx, &first_checkpoint(&ctx), &me, TTL, NOW)
        .unwrap();
    // As an older acode-ec2 leaves it: owner and expiry on the row, no engine.
    store
        .inner
        .conn()
        .execute(
            "UPDATE sessions SET lease_owner = 'old', lease_pid = 1, lease_host = 'elsewhere',
                 lease_expires_ms = ?1 WHERE session_id = 's1'",
            [NOW.plus(TTL).0 as i64],
        )
        .unwrap();
    let err = store.inner.acquire_lease("s1", &me, TTL).unwrap_err();
    assert!(err.to_string().contains("elsewhere"), "{err}");
    clock.advance(TTL);
    store.inner.acquire_lease("s1", &me, TTL).unwrap();
}
