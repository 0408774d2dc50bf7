use super::*;
use crate::clock::ManualClock;
use crate::machine::Timestamp;
use crate::store::SqliteStore;
use crate::store::sample::{context, first_checkpoint};

const TTL: Duration = Duration::from_secs(30);

fn holder(name: &str) -> LeaseHolder {
    LeaseHolder {
        owner_id: name.into(),
        pid: 1,
        host: "elsewhere".into(),
    }
}

/// The engine's lease lapses, another engine takes one session, and this
/// engine then takes another session before its heartbeat runs. Taking it
/// renews the engine's lease; the lapse it hid must still make the drive
/// of the first session ask the store, and stop.
#[tokio::test]
async fn a_lapse_renewed_away_by_taking_a_session_still_stops_the_drive_that_lost_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_at(Timestamp(1_700_000_000_000)));
    let store: Arc<dyn CheckpointStore> = Arc::new(
        SqliteStore::open_with_clock(&dir.path().join("state.db"), clock.clone()).unwrap(),
    );
    let (a, b) = (holder("engine-a"), holder("engine-b"));
    for id in ["s1", "s2"] {
        let ctx = context(id);
        let now = clock.now();
        let beat = store
            .create(&ctx, &first_checkpoint(&ctx), &a, TTL, now)
            .await
            .unwrap();
        assert!(!beat.lapsed, "a new engine's first lease is no lapse");
    }
    store.release_lease("s2", &a).await.unwrap();
    let engine_a = EngineLease::new(Arc::clone(&store), a.clone(), TTL, clock.clone());
    let mut first = engine_a.join("s1");
    first.still_held().await.unwrap();

    clock.advance(TTL + Duration::from_secs(1));
    store.acquire_lease("s1", &b, TTL).await.unwrap();
    let _second = engine_a.acquire("s2").await.unwrap();

    let lost = first.still_held().await.unwrap_err();
    assert!(
        matches!(lost, EngineError::Store(StoreError::LeaseLost(ref id)) if id == "s1"),
        "{lost}"
    );
}

/// Engine "engine-a" and the sessions s1 and s2 it created, in a store on
/// a manual clock.
struct EngineA {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    sqlite: Arc<SqliteStore>,
    store: Arc<dyn CheckpointStore>,
    a: LeaseHolder,
    engine: EngineLease,
}

async fn engine_a_with_two_sessions() -> EngineA {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_at(Timestamp(1_700_000_000_000)));
    let sqlite = Arc::new(
        SqliteStore::open_with_clock(&dir.path().join("state.db"), clock.clone()).unwrap(),
    );
    let store: Arc<dyn CheckpointStore> = sqlite.clone();
    let a = holder("engine-a");
    let engine = EngineLease::new(Arc::clone(&store), a.clone(), TTL, clock.clone());
    for id in ["s1", "s2"] {
        let ctx = context(id);
        let beat = store
            .create(&ctx, &first_checkpoint(&ctx), &a, TTL, clock.now())
            .await
            .unwrap();
        engine.noted(clock.now(), beat);
    }
    EngineA {
        _dir: dir,
        clock,
        sqlite,
        store,
        a,
        engine,
    }
}

/// A process stopped (Ctrl-Z, a suspended machine) runs no heartbeat.
/// Meanwhile its lease expired and another process took the session,
/// finished it and let it go. Woken, the drive must not run its next effect
/// (a create would leak): its renewal is overdue, so it renews, and the
/// store says the session is no longer its own.
#[tokio::test]
async fn a_drive_woken_after_its_lease_expired_asks_the_store_before_its_next_effect() {
    let EngineA {
        _dir,
        clock,
        sqlite,
        store,
        engine: engine_a,
        ..
    } = engine_a_with_two_sessions().await;
    let b = holder("engine-b");
    let mut taken = engine_a.join("s1");
    let mut kept = engine_a.join("s2");
    taken.still_held().await.unwrap();
    kept.still_held().await.unwrap();
    let writes = sqlite.write_transactions();
    // Within the heartbeat's rhythm nothing is asked.
    clock.advance(TTL / 3);
    taken.still_held().await.unwrap();
    assert_eq!(sqlite.write_transactions(), writes, "a renewal on time");

    // Stopped past the lease: another engine takes s1, ends, and lets go.
    clock.advance(TTL);
    store.acquire_lease("s1", &b, TTL).await.unwrap();
    store.release_lease("s1", &b).await.unwrap();

    let lost = taken.still_held().await.unwrap_err();
    assert!(
        matches!(lost, EngineError::Store(StoreError::LeaseLost(ref id)) if id == "s1"),
        "{lost}"
    );
    // The renewal made on waking keeps s2, which no one took, and from
    // then on no one can take it.
    kept.still_held().await.unwrap();
    let refused = store.acquire_lease("s2", &b, TTL).await;
    assert!(
        matches!(refused, Err(StoreError::Leased { .. })),
        "{refused:?}"
    );
}

/// A library caller gives up on a drive (a timeout around `provision`):
/// the session is let go, so another process can resume it while this
/// engine, and its heartbeat, live on. A drive of the same session started
/// here meanwhile keeps its lease.
#[tokio::test]
async fn a_dropped_drive_lets_its_session_go_unless_a_new_drive_took_it() {
    let EngineA {
        _dir,
        store,
        a,
        engine: engine_a,
        ..
    } = engine_a_with_two_sessions().await;
    let b = holder("engine-b");
    drop(engine_a.join("s1"));
    let mut waited = 0;
    while store.holds_lease("s1", &a).await.unwrap() {
        waited += 1;
        assert!(
            waited < 1000,
            "the dropped drive's session was never let go"
        );
        tokio::task::yield_now().await;
    }
    store.acquire_lease("s1", &b, TTL).await.unwrap();

    drop(engine_a.acquire("s2").await.unwrap());
    let again = engine_a.acquire("s2").await.unwrap();
    // Let the dropped drive's release run; it must leave the new drive's lease.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(store.holds_lease("s2", &a).await.unwrap());
    again.release().await;
    assert!(!store.holds_lease("s2", &a).await.unwrap());
}

/// A recover's tally: a session held by another driver is left to it and a
/// session that failed and was cleaned up was recovered; neither is a
/// failed drive.
#[test]
fn the_recover_tally_counts_only_drives_that_went_wrong_as_failed() {
    let ends: [Result<PhaseKind, EngineError>; 5] = [
        Ok(PhaseKind::Ready),
        Err(EngineError::ProvisionFailed {
            session_id: "s2".into(),
            reason: "no capacity".into(),
        }),
        Err(EngineError::AlreadyDriving {
            session_id: "s3".into(),
        }),
        Err(EngineError::Store(StoreError::Leased {
            session_id: "s4".into(),
            pid: 7,
            host: "elsewhere boot=1".into(),
            remaining_ms: 1_500,
        })),
        Err(EngineError::DriverStopped {
            session_id: "s5".into(),
            reason: "the store is gone".into(),
        }),
    ];
    let mut tally = RecoverTally {
        total: ends.len(),
        in_flight: ends.len(),
        ..RecoverTally::default()
    };
    for end in &ends {
        tally.ended(end);
    }
    assert_eq!(
        tally,
        RecoverTally {
            total: 5,
            done: 5,
            in_flight: 0,
            failed: 1,
            left: 2,
        }
    );
    let Err(leased) = &ends[3] else {
        unreachable!()
    };
    assert_eq!(
        leased.to_string(),
        "session s4 is being driven by another process (pid 7 on elsewhere, its lease runs 2 s \
         more); wait for it to finish, or stop it and retry once its lease expires"
    );
}

/// `recover`'s slots: EC2 calls and SSH logins each have their own, so a
/// full pool of one leaves the other free; polls, which the effects layer
/// batches into one call for many sessions, take none.
#[test]
fn recover_bounds_ec2_calls_and_ssh_logins_apart_and_polls_not_at_all() {
    let slots = EffectSlots::new(1);
    let probe = Effect::ProbeSsh {
        endpoint: "127.0.0.1:22".into(),
        user: "ec2-user".into(),
        private_key_path: None,
        trusted: None,
        known_hosts_path: None,
    };
    let console = Effect::ReadConsoleHostKeys {
        instance_id: "i-1".into(),
    };
    let terminate = Effect::TerminateInstance { instance_id: None };
    let take = |effect: &Effect| slots.for_effect(effect).expect("a slot pool").try_acquire();

    let _call = take(&console).expect("a free EC2 slot");
    assert!(take(&terminate).is_err(), "a second EC2 call waits");
    let _login = take(&probe).expect("an SSH login does not wait for EC2 calls");
    assert!(take(&probe).is_err(), "a second SSH login waits");
    for poll in [
        Effect::DescribeInstance {
            instance_id: "i-1".into(),
            spot_request_id: None,
        },
        Effect::DescribeInstanceStatus {
            instance_id: "i-1".into(),
        },
    ] {
        assert!(slots.for_effect(&poll).is_none(), "{poll:?} takes a slot");
    }
}
