//! Machine step and checkpoint commit costs.
//!
//! `checkpoint_commit` is one transition + intent (+ the previous outcome) on
//! a file-backed SQLite database with the settings acode-ec2 ships (WAL,
//! synchronous=FULL); `sqlite_floor` is a bare single-row insert + commit
//! with the same settings: the physical floor of one fsync'd commit.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rusqlite::Connection;

use acode_ec2::machine::{
    self, Input, KeyPairHandle, LaunchedInstance, ProvisionPhase, SessionContext, SessionState,
    Timestamp, WaitingForRunning,
};
use acode_ec2::store::{Checkpoint, CheckpointStore, Intent, LeaseHolder, SqliteStore};

const NOW: Timestamp = Timestamp(1_700_000_000_000);

fn context() -> SessionContext {
    let yaml = "ec2Target:\n  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  useSpot: true\n";
    SessionContext {
        session_id: "bench-session".into(),
        request: acode_ec2::config::parse(yaml).expect("bench config"),
        key_dir: "/tmp/acode-bench-keys".into(),
    }
}

fn waiting_for_running(ctx: &SessionContext) -> SessionState {
    SessionState::fresh(ProvisionPhase::WaitingForRunning(WaitingForRunning {
        instance: LaunchedInstance {
            instance_id: "i-0123456789abcdef0".into(),
            key: KeyPairHandle {
                key_name: ctx.owned_key_name(),
                owned: true,
                private_key_path: Some(ctx.owned_key_path()),
            },
            was_spot: true,
        },
        deadline: NOW.plus(Duration::from_secs(300)),
    }))
}

fn machine_step(c: &mut Criterion) {
    let ctx = context();
    let state = waiting_for_running(&ctx);
    c.bench_function("machine_step", |b| {
        b.iter(|| {
            machine::step(
                &ctx,
                std::hint::black_box(&state),
                Input::InstancePending,
                NOW,
            )
        })
    });
}

fn commits(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = context();
    let store = SqliteStore::open(&dir.path().join("bench.db")).expect("store");
    let holder = LeaseHolder::for_this_process();
    let state = waiting_for_running(&ctx);
    let step = machine::step(&ctx, &state, Input::InstancePending, NOW).expect("step");
    let poll = Checkpoint {
        outcome: Some(Input::InstancePending),
        state: step.state,
        intent: step.effect.map(|effect| Intent {
            effect,
            not_before: step.wake_at,
        }),
    };
    store
        .create(&ctx, &poll, &holder, Duration::from_secs(30), NOW)
        .expect("create");
    c.bench_function("checkpoint_commit", |b| {
        b.iter(|| {
            store
                .commit(&ctx.session_id, &poll, &holder, NOW)
                .expect("commit")
        })
    });

    // A commit that also changes what the session row shows (a phase change).
    let ssh = machine::step(
        &ctx,
        &state,
        Input::InstanceRunning {
            public_ip: Some("54.0.0.1".into()),
            private_ip: None,
        },
        NOW,
    )
    .expect("running");
    let to_ssh = Checkpoint {
        outcome: Some(Input::InstanceRunning {
            public_ip: Some("54.0.0.1".into()),
            private_ip: None,
        }),
        state: ssh.state,
        intent: ssh.effect.map(|effect| Intent {
            effect,
            not_before: None,
        }),
    };
    let mut flip = false;
    c.bench_function("checkpoint_commit_phase_change", |b| {
        b.iter(|| {
            flip = !flip;
            store
                .commit(
                    &ctx.session_id,
                    if flip { &to_ssh } else { &poll },
                    &holder,
                    NOW,
                )
                .expect("commit")
        })
    });

    let floor = Connection::open(dir.path().join("floor.db")).expect("floor db");
    floor
        .pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    floor
        .pragma_update(None, "synchronous", "FULL")
        .expect("sync");
    floor
        .execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .expect("table");
    let mut k = 0i64;
    c.bench_function("sqlite_floor", |b| {
        b.iter(|| {
            k += 1;
            floor
                .execute("INSERT INTO t (k, v) VALUES (?1, 'x')", [k])
                .expect("insert")
        })
    });
}

criterion_group!(benches, machine_step, commits);
criterion_main!(benches);
