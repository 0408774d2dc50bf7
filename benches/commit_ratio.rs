//! Checkpoint commit over the SQLite floor, measured interleaved.
//!
//! fsync latency on a VM drifts by ±20% over seconds, so two benchmarks run
//! one after the other (as criterion runs them) compare different disks.
//! Here every round times a batch of each in turn, and the figure is the
//! median over rounds of the per-round ratio. Goal: ≤ 1.5 (one fsync per
//! checkpoint, and about one page written, not several). It also counts the
//! WAL frames (pages) a commit writes, from the growth of the `-wal` file.
//!
//! Run: `cargo bench --bench commit_ratio [-- ROUNDS]`.

mod support;

use std::path::Path;
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

/// The same through the async store API, awaited in one task.
fn time_batch_async<'a, F>(rt: &tokio::runtime::Runtime, mut commit: impl FnMut(u32) -> F) -> f64
where
    F: std::future::Future<Output = Result<(), acode_ec2::store::StoreError>> + 'a,
{
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..BATCH {
            commit(i).await.expect("commit");
        }
        start.elapsed().as_secs_f64() * 1e6 / f64::from(BATCH)
    })
}

/// Pages written to the WAL per call of `commit`, over `FRAME_COMMITS` calls:
/// few enough that the WAL is not checkpointed (and reused) meanwhile.
fn wal_frames_per_commit(db: &Path, mut commit: impl FnMut()) -> f64 {
    const FRAME_COMMITS: u32 = 200;
    let wal = db.with_file_name(format!(
        "{}-wal",
        db.file_name().and_then(|n| n.to_str()).unwrap_or_default()
    ));
    let page_size: i64 = rusqlite::Connection::open(db)
        .and_then(|c| c.pragma_query_value(None, "page_size", |r| r.get(0)))
        .expect("page size");
    let size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let before = size();
    for _ in 0..FRAME_COMMITS {
        commit();
    }
    // Each frame is a 24-byte header and one page.
    (size() - before) as f64 / (page_size + 24) as f64 / f64::from(FRAME_COMMITS)
}

fn main() {
    // The engine's own path: the async store, whose SQLite work runs on
    // tokio's blocking pool, driven from a current-thread runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(40)
        .max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let holder = LeaseHolder::for_this_process();
    let ttl = Duration::from_secs(30);

    // One session: every commit appends at the end of the log.
    let ctx = context("bench-session");
    let poll = poll_checkpoint(&ctx);
    let one = SqliteStore::open(&dir.path().join("one.db")).expect("store");
    rt.block_on(one.create(&ctx, &poll, &holder, ttl, NOW))
        .expect("create");

    // Many sessions in flight: commits land inside the log, round robin.
    let many = SqliteStore::open(&dir.path().join("many.db")).expect("store");
    let many_ids: Vec<String> = (0..MANY).map(|i| format!("bench-{i:04}")).collect();
    for id in &many_ids {
        rt.block_on(many.create(&context(id), &poll, &holder, ttl, NOW))
            .expect("create");
    }
    let mut next_many = 0usize;

    let mut floor = Floor::open(&dir.path().join("floor.db"));

    // Frames first, on fresh files, before the timed rounds fill their WALs.
    let frames_db = dir.path().join("frames.db");
    let frames = SqliteStore::open(&frames_db).expect("store");
    rt.block_on(frames.create(&ctx, &poll, &holder, ttl, NOW))
        .expect("create");
    let checkpoint_frames = wal_frames_per_commit(&frames_db, || {
        rt.block_on(frames.commit(&ctx.session_id, &poll, &holder, NOW))
            .expect("commit")
    });
    let floor_frames_db = dir.path().join("floor-frames.db");
    let mut floor_for_frames = Floor::open(&floor_frames_db);
    let floor_frames = wal_frames_per_commit(&floor_frames_db, || floor_for_frames.commit());

    let (mut floor_us, mut one_us, mut many_us) = (Vec::new(), Vec::new(), Vec::new());
    let (mut one_ratio, mut many_ratio) = (Vec::new(), Vec::new());
    eprintln!("{rounds} rounds of {BATCH} commits each");
    for _ in 0..rounds {
        let f = time_batch(|_| floor.commit());
        let o = time_batch_async(&rt, |_| one.commit(&ctx.session_id, &poll, &holder, NOW));
        let m = time_batch_async(&rt, |_| {
            next_many = (next_many + 1) % MANY;
            many.commit(&many_ids[next_many], &poll, &holder, NOW)
        });
        floor_us.push(f);
        one_us.push(o);
        many_us.push(m);
        one_ratio.push(o / f);
        many_ratio.push(m / f);
    }
    println!(
        "sqlite_floor                    median {:7.1} µs   {floor_frames:.2} WAL frames per commit",
        median(&mut floor_us)
    );
    println!("checkpoint_commit               {checkpoint_frames:.2} WAL frames per commit");
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
