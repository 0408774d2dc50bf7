//! Checkpoint commit over the SQLite floor, measured interleaved.
//!
//! fsync latency on a VM drifts by ±20% over seconds, so two benchmarks run
//! one after the other (as criterion runs them) compare different disks.
//! Here every round times a batch of each in turn, and the figure is the
//! median over rounds of the per-round ratio. Goal: ≤ 1.5 (one fsync per
//! checkpoint, and about one page written, not several).
//!
//! Run: `cargo bench --bench commit_ratio [-- ROUNDS]`.

mod support;

use std::time::{Duration, Instant};

use acode_ec2::store::{CheckpointStore, LeaseHolder, SqliteStore};
use support::{Floor, NOW, context, poll_checkpoint};

const BATCH: u32 = 100;
/// Sessions in flight for the "among many" case, each with its own log.
const MANY: usize = 1_000;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Mean microseconds per call of `commit` over one batch.
fn time_batch(mut commit: impl FnMut(u32)) -> f64 {
    let start = Instant::now();
    for i in 0..BATCH {
        commit(i);
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(BATCH)
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(40);
    let dir = tempfile::tempdir().expect("tempdir");
    let holder = LeaseHolder::for_this_process();
    let ttl = Duration::from_secs(30);

    // One session: every commit appends at the end of the log.
    let ctx = context("bench-session");
    let poll = poll_checkpoint(&ctx);
    let one = SqliteStore::open(&dir.path().join("one.db")).expect("store");
    one.create(&ctx, &poll, &holder, ttl, NOW).expect("create");

    // Many sessions in flight: commits land inside the log, round robin.
    let many = SqliteStore::open(&dir.path().join("many.db")).expect("store");
    let many_ids: Vec<String> = (0..MANY).map(|i| format!("bench-{i:04}")).collect();
    for id in &many_ids {
        many.create(&context(id), &poll, &holder, ttl, NOW)
            .expect("create");
    }
    let mut next_many = 0usize;

    let mut floor = Floor::open(&dir.path().join("floor.db"));

    let (mut floor_us, mut one_us, mut many_us) = (Vec::new(), Vec::new(), Vec::new());
    let (mut one_ratio, mut many_ratio) = (Vec::new(), Vec::new());
    eprintln!("{rounds} rounds of {BATCH} commits each");
    for _ in 0..rounds {
        let f = time_batch(|_| floor.commit());
        let o = time_batch(|_| {
            one.commit(&ctx.session_id, &poll, &holder, NOW)
                .expect("commit")
        });
        let m = time_batch(|_| {
            next_many = (next_many + 1) % MANY;
            many.commit(&many_ids[next_many], &poll, &holder, NOW)
                .expect("commit")
        });
        floor_us.push(f);
        one_us.push(o);
        many_us.push(m);
        one_ratio.push(o / f);
        many_ratio.push(m / f);
    }
    println!(
        "sqlite_floor                    median {:7.1} µs",
        median(&mut floor_us)
    );
    println!(
        "checkpoint_commit               median {:7.1} µs   ratio to floor {:.2}",
        median(&mut one_us),
        median(&mut one_ratio)
    );
    println!(
        "checkpoint_commit ({MANY} sessions) median {:7.1} µs   ratio to floor {:.2}",
        median(&mut many_us),
        median(&mut many_ratio)
    );
}
