//! Machine step and checkpoint commit costs.
//!
//! `checkpoint_commit` is one transition + intent (+ the previous outcome) on
//! a file-backed SQLite database with the settings acode-ec2 ships (WAL,
//! synchronous=FULL); `sqlite_floor` is a bare single-row insert + commit
//! with the same settings: the physical floor of one fsync'd commit.
//! Criterion runs them one after the other, so on a VM whose fsync drifts
//! the ratio of their medians drifts too; `commit_ratio` interleaves them.

mod support;

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

use acode_ec2::machine::{self, Input};
use acode_ec2::store::{Checkpoint, CheckpointStore, Intent, LeaseHolder, SqliteStore};
use support::{Floor, NOW, context, poll_checkpoint, waiting_for_running};

fn machine_step(c: &mut Criterion) {
    let ctx = context("bench-session");
    let state = waiting_for_running(&ctx);
    c.bench_function("machine_step", |b| {
        b.iter(|| {
            machine::step(
                &ctx,
                std::hint::black_box(&state),
                Input::InstancePending { spot_request: None },
                NOW,
            )
        })
    });
}

fn commits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = context("bench-session");
    let store = SqliteStore::open(&dir.path().join("bench.db")).expect("store");
    let holder = LeaseHolder::for_this_process();
    let poll = poll_checkpoint(&ctx);
    rt.block_on(store.create(&ctx, &poll, &holder, Duration::from_secs(30), NOW))
        .expect("create");
    c.bench_function("checkpoint_commit", |b| {
        b.iter(|| {
            rt.block_on(store.commit(&ctx.session_id, &poll, &holder, NOW))
                .expect("commit")
        })
    });

    // A commit that also changes what the session row shows (a phase change).
    let running = Input::InstanceRunning {
        public_ip: Some("54.0.0.1".into()),
        private_ip: None,
        spot_request: None,
    };
    let ssh =
        machine::step(&ctx, &waiting_for_running(&ctx), running.clone(), NOW).expect("running");
    let to_ssh = Checkpoint {
        outcome: Some(running),
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
            let checkpoint = if flip { &to_ssh } else { &poll };
            rt.block_on(store.commit(&ctx.session_id, checkpoint, &holder, NOW))
                .expect("commit")
        })
    });

    let mut floor = Floor::open(&dir.path().join("floor.db"));
    c.bench_function("sqlite_floor", |b| b.iter(|| floor.commit()));
}

criterion_group!(benches, machine_step, commits);
criterion_main!(benches);
