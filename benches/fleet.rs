//! Fleet scale in one process (issue 13), against the lab.
//!
//! `ready`: 200 sessions started at once through a lab that throttles like
//! EC2's account buckets (RunInstances 5 then 2/s, mutating 50 then 5/s,
//! Describe 100 then 20/s), with short boot timings (running at 2 s,
//! console keys at 2 s, status checks ok at 4 s) and 1 s polls. Reports:
//! EC2 calls per Ready instance without the key-pair calls (goal ≤ 3), time
//! to all Ready over the rate-limit floor (200 launches at 5 then 2/s:
//! 97.5 s; goal ≤ 1.1×), heap per session (peak live bytes over the
//! baseline, by a counting allocator), and write transactions (one fsync
//! each) per Ready session, leases included.
//!
//! `recover`: 1,000 sessions interrupted by a process that died, spread
//! over the phases (each stalls after 0–6 effects; a quarter then get a
//! teardown recorded), recovered by a new process; the lab without delays
//! and without throttling, and this process's buckets off (with EC2's,
//! the RunInstances bucket alone would set the floor). The engine runs on
//! a clock that skips a wait when every session still being driven is
//! asleep on it: the sessions whose sweep found nothing wait out
//! `SWEEP_SETTLE` (30 s) on it, and once nothing else is left to do, that
//! wait is skipped rather than slept. Reports the time (goal ≤ 10 s), the
//! time skipped, when the sessions settled (by the engine's clock), where
//! the time per effect went, and EC2 calls per recovered session (goal
//! ≤ 3). `--concurrency=N` changes how many EC2 calls, and apart from them
//! SSH logins, run at once (default: the engine's).
//!
//! `--before` runs both the way the engine worked before issue 13: no
//! rate limits of its own, no shared validation answers, recover one
//! session at a time (the lease heartbeat cannot be switched back; the
//! old per-session renewal is one write per session per 10 s).
//!
//! `--poll-interval=5s` polls at the specification's default instead of
//! every second.
//!
//! Run: `cargo bench --bench fleet [-- ready|recover] [--before]
//! [--poll-interval=5s] [--concurrency=N]`. Needs
//! the lab's venv (`scripts/setup.sh`); connects only to loopback.

// The engine's provision future is deeply nested; computing its layout
// needs more than the default query depth.
#![recursion_limit = "256"]

#[allow(dead_code)]
#[path = "../tests/integration/lab.rs"]
mod lab;

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acode_ec2::clock::SkippingClock;
use acode_ec2::driver::{Engine, EngineOptions, RecoverTally};
use acode_ec2::effects::describe_batch::{BatchWindow, Batched};
use acode_ec2::effects::rate_limit::RateLimits;
use acode_ec2::effects::sdk::SdkEc2;
use acode_ec2::effects::{AwsEffects, Effects};
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{Effect, Input, SessionContext, Timestamp};
use acode_ec2::net_guard::ConnectGuard;
use acode_ec2::store::{CheckpointStore, LeaseHolder, LogEntry, SqliteStore};
use lab::Lab;
use serde_json::json;

#[path = "support/heap.rs"]
mod heap;

#[global_allocator]
static GLOBAL: heap::Counting = heap::Counting;

const KEY_PAIR_ACTIONS: [&str; 4] = [
    "CreateKeyPair",
    "DescribeKeyPairs",
    "DeleteKeyPair",
    "ImportKeyPair",
];

/// The lab's effects, as the engine has them now or had them before.
fn effects(lab: &Lab, limits: RateLimits, before: bool) -> AwsEffects {
    let sdk = SdkEc2::with_rate_limits(lab.ec2(), limits);
    let mut batched = Batched::new(sdk, BatchWindow::default());
    if before {
        batched = batched.remembering_for(Duration::ZERO);
    }
    AwsEffects::over(batched, ConnectGuard::loopback_only())
}

fn engine<E: Effects>(effects: E, store: Arc<SqliteStore>, dir: &std::path::Path) -> Engine<E> {
    Engine::new(
        Arc::new(effects),
        store,
        EngineOptions {
            key_dir: dir.join("keys").to_string_lossy().into_owned(),
            lease_ttl: Duration::from_secs(30),
        },
    )
}

/// The sessions' poll interval: 1 s, or `--poll-interval=5s` (the
/// specification's default), which batches more sessions per Describe call.
fn poll_interval() -> String {
    flag("--poll-interval").unwrap_or_else(|| "1s".into())
}

/// The value of `--name=value` on the command line.
fn flag(name: &str) -> Option<String> {
    std::env::args().find_map(|a| {
        a.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::to_string)
    })
}

fn request(lab: &Lab, extra: &str) -> acode_ec2::request::ProvisionRequest {
    let yaml = lab
        .target_yaml(extra)
        .replace(
            "pollInterval: 100ms",
            &format!("pollInterval: {}", poll_interval()),
        )
        .replace("retryInterval: 100ms", "retryInterval: 1s")
        .replace("runningTimeout: 30s", "runningTimeout: 5m")
        .replace("sshTimeout: 30s", "sshTimeout: 5m");
    acode_ec2::config::parse(&format!("ec2Target:\n{yaml}")).expect("config")
}

/// CPU seconds (user + system) a process has used itself.
fn own_cpu_seconds(pid: u32) -> f64 {
    stat_ticks(pid, 11..=12) as f64 / 100.0
}

/// Clock ticks (Linux's USER_HZ is 100 on every architecture) summed over
/// the `fields` of /proc/PID/stat counted after the command.
fn stat_ticks(pid: u32, fields: std::ops::RangeInclusive<usize>) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command is in parentheses and may hold spaces.
    let after: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    fields
        .filter_map(|i| after.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum()
}

/// CPU seconds (user + system) a process has used, with those of its
/// children and the children they reaped: the lab's sshd forks one process
/// per login and reaps it.
fn cpu_seconds(pid: u32) -> f64 {
    // utime, stime, cutime, cstime: fields 14–17, so 11–14 after the command.
    let ticks = stat_ticks(pid, 11..=14);
    let theirs: f64 = children(pid).into_iter().map(cpu_seconds).sum();
    ticks as f64 / 100.0 + theirs
}

/// The processes `pid` started (that are still there).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The processes `pid` started, by their command name.
fn children_named(pid: u32, name: &str) -> Vec<u32> {
    children(pid)
        .into_iter()
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// CPU seconds of the lab's sshd and the logins it forked.
fn sshd_cpu_seconds(lab: &Lab) -> f64 {
    children_named(lab.pid(), "sshd")
        .into_iter()
        .map(cpu_seconds)
        .sum()
}

fn engine_calls(lab: &Lab) -> (u64, u64) {
    let counters = lab.counters();
    let all: u64 = counters.values().sum();
    let key_pairs: u64 = KEY_PAIR_ACTIONS
        .iter()
        .filter_map(|a| counters.get(*a))
        .sum();
    (all, key_pairs)
}

async fn ready_fleet(before: bool) {
    const SESSIONS: usize = 200;
    let floor = (SESSIONS as f64 - 5.0) / 2.0;
    let lab = Lab::start_with(&[
        "--boot-delay-s",
        "2",
        "--console-lag-s",
        "0",
        "--status-ok-delay-s",
        "4",
        "--terminate-delay-s",
        "1",
    ]);
    lab.configure(json!({"throttle": "ec2"}));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).expect("store"));
    let limits = if before {
        RateLimits::unlimited()
    } else {
        RateLimits::ec2_defaults()
    };
    let engine = engine(effects(&lab, limits, before), store.clone(), dir.path());
    let request = request(&lab, "");
    let baseline = heap::reset_peak();
    let started = Instant::now();
    let results = engine.provision_many(request, SESSIONS, &NoProgress).await;
    let took = started.elapsed().as_secs_f64();
    let peak = heap::peak().saturating_sub(baseline);
    let ready = results.iter().filter(|r| r.is_ok()).count();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        let text = e.to_string();
        *failures
            .entry(text.chars().take(100).collect())
            .or_default() += 1;
    }
    let (all, key_pairs) = engine_calls(&lab);
    let throttled: BTreeMap<String, u64> =
        serde_json::from_value(lab.call("GET", "/throttle", None)["throttled"].clone())
            .expect("throttled");
    let per_ready = |n: f64| n / ready.max(1) as f64;
    println!(
        "fleet ready ({}): {ready}/{SESSIONS} Ready in {took:.1} s = {:.3}x the floor of {floor} s",
        if before { "before" } else { "after" },
        took / floor
    );
    println!(
        "  EC2 calls per Ready: {:.2} without key-pair calls ({:.2} with); throttled by the lab: {throttled:?}",
        per_ready((all - key_pairs) as f64),
        per_ready(all as f64)
    );
    println!("  calls: {:?}", lab.counters());
    println!(
        "  heap per session: {:.1} KiB (peak {:.1} MiB over the baseline)",
        peak as f64 / SESSIONS as f64 / 1024.0,
        peak as f64 / 1024.0 / 1024.0
    );
    println!(
        "  write transactions (fsyncs) per Ready session, leases included: {:.2}",
        per_ready(store.write_transactions() as f64)
    );
    if !failures.is_empty() {
        println!("  failures: {failures:?}");
    }
}

/// Effects that stop answering a session after its budget of effects (0
/// to 6, by its id), as if its process froze there; the drive is then
/// dropped, which is the crash.
struct StallAfter<E> {
    inner: E,
    runs: Mutex<HashMap<String, u32>>,
    stalled: Arc<AtomicUsize>,
}

impl<E: Effects> Effects for StallAfter<E> {
    async fn run(&self, ctx: &SessionContext, created: Timestamp, effect: &Effect) -> Input {
        let mut hasher = DefaultHasher::new();
        ctx.session_id.hash(&mut hasher);
        let budget = (hasher.finish() % 7) as u32;
        let run = {
            let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
            let n = runs.entry(ctx.session_id.clone()).or_default();
            *n += 1;
            *n - 1
        };
        if run >= budget {
            self.stalled.fetch_add(1, Ordering::SeqCst);
            return std::future::pending().await;
        }
        self.inner.run(ctx, created, effect).await
    }
}

async fn recover_fleet(before: bool) {
    const SESSIONS: usize = 1000;
    let lab = Lab::start_with(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).expect("store"));
    // Interrupt them: a dead process's engine, half spot, half on-demand.
    let dead = LeaseHolder {
        owner_id: "dead".into(),
        pid: u32::MAX - 1,
        host: acode_ec2::store::this_host(),
    };
    let stalled_count = Arc::new(AtomicUsize::new(0));
    let stalling = StallAfter {
        inner: effects(&lab, RateLimits::unlimited(), false),
        runs: Mutex::new(HashMap::new()),
        stalled: Arc::clone(&stalled_count),
    };
    let died = Arc::new(engine(stalling, store.clone(), dir.path()).with_holder(dead.clone()));
    let setup = Instant::now();
    let fleets = [
        (request(&lab, ""), SESSIONS / 2),
        (request(&lab, "  useSpot: true\n"), SESSIONS / 2),
    ];
    let all = futures::future::join_all(
        fleets
            .into_iter()
            .map(|(request, n)| died.provision_many(request, n, &NoProgress)),
    );
    let stalled = async {
        // Every session recorded, and each stalled or settled (failed early).
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let sessions = store.list().await.expect("list");
            let settled = sessions.iter().filter(|s| s.phase.is_settled()).count();
            if sessions.len() == SESSIONS
                && settled + stalled_count.load(Ordering::SeqCst) >= SESSIONS
            {
                return;
            }
        }
    };
    tokio::select! {
        _ = all => {}
        _ = stalled => {}
        _ = tokio::time::sleep(Duration::from_secs(300)) => println!("  (some sessions neither stalled nor settled)"),
    }
    drop(died);
    // A quarter of them had a teardown recorded before the process died:
    // they resume in the cleanup phases.
    let noter = engine(
        effects(&lab, RateLimits::unlimited(), false),
        store.clone(),
        dir.path(),
    )
    .with_holder(dead);
    for (i, summary) in store.list().await.expect("list").iter().enumerate() {
        if i % 4 == 0 && !summary.phase.is_settled() {
            let _ = noter
                .note(
                    &summary.session_id,
                    acode_ec2::machine::OutsideInput::TeardownRequested,
                )
                .await;
        }
    }
    drop(noter);
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    for summary in store.list().await.expect("list") {
        *phases.entry(summary.phase.to_string()).or_default() += 1;
    }
    println!(
        "fleet recover ({}): {SESSIONS} sessions interrupted in {:.1} s: {phases:?}",
        if before { "before" } else { "after" },
        setup.elapsed().as_secs_f64()
    );

    lab.call("POST", "/counters/reset", None);
    // Waits nobody needs to sit through: when every session still being
    // driven is asleep on the clock, the clock skips to the first wake-up
    // instead (the skips are reported: which waits they were, and when).
    // `--before` skips nothing, as the engine before issue 13 ran.
    let clock = Arc::new(SkippingClock::default());
    let engine = engine(
        effects(&lab, RateLimits::unlimited(), before).with_clock(clock.clone()),
        store.clone(),
        dir.path(),
    )
    .with_clock(clock.clone());
    let concurrency = if before {
        1
    } else {
        flag("--concurrency")
            .and_then(|n| n.parse().ok())
            .unwrap_or(acode_ec2::driver::RECOVER_CONCURRENCY)
    };
    // This process's own CPU: the lab is its child.
    let cpu_before = (
        own_cpu_seconds(std::process::id()),
        cpu_seconds(lab.pid()),
        sshd_cpu_seconds(&lab),
    );
    let writes_before = store.write_transactions();
    let started_ms = unix_ms();
    let started = Instant::now();
    let in_flight = AtomicUsize::new(usize::MAX);
    let tally = |tally: &RecoverTally| in_flight.store(tally.in_flight, Ordering::SeqCst);
    let recover = engine.recover_with(concurrency, &NoProgress, &tally);
    let skips = Mutex::new(Vec::new());
    let report = if before {
        recover.await
    } else {
        tokio::select! {
            report = recover => report,
            _ = skip_idle_waits(&clock, &in_flight, &skips) => unreachable!("skips until recover ends"),
        }
    }
    .expect("recover");
    let took = started.elapsed().as_secs_f64();
    let engine_cpu = own_cpu_seconds(std::process::id()) - cpu_before.0;
    let lab_cpu = cpu_seconds(lab.pid()) - cpu_before.1;
    let sshd_cpu = sshd_cpu_seconds(&lab) - cpu_before.2;
    let (all, key_pairs) = engine_calls(&lab);
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for item in &report {
        let end = match &item.result {
            Ok(phase) => phase.to_string(),
            Err(e) => format!(
                "error: {}",
                e.to_string().chars().take(80).collect::<String>()
            ),
        };
        *ends.entry(end).or_default() += 1;
    }
    let n = report.len().max(1) as f64;
    println!(
        "  recovered {} sessions in {took:.2} s ({concurrency} EC2 calls and SSH logins at once); EC2 calls per session {:.2} ({:.2} without key-pair calls)",
        report.len(),
        all as f64 / n,
        (all - key_pairs) as f64 / n
    );
    println!(
        "  CPU while recovering: this process {engine_cpu:.1} s, the lab {lab_cpu:.1} s (sshd and \
         its logins {sshd_cpu:.1} s, the rest moto and the SSH gate), on 2 cores over {took:.1} s; \
         {} write transactions (fsyncs)",
        store.write_transactions() - writes_before
    );
    let skips = skips.into_inner().unwrap_or_else(|e| e.into_inner());
    println!(
        "  the clock skipped {:.1} s in {} skips, the first {:.1} s into the recover with {} \
         sessions left, all asleep on it",
        clock.skipped().as_secs_f64(),
        skips.len(),
        skips.first().map_or(0.0, |s: &Skip| s.at.as_secs_f64()),
        skips.first().map_or(0, |s| s.sessions)
    );
    println!("  ends: {ends:?}");
    println!("  calls: {:?}", lab.counters());
    settle_times(&store, started_ms).await;
    time_per_effect(&store, started_ms).await;
}

/// Where the recovered sessions' time went, from their logs: for each
/// effect, the time its intents waited for their `not_before` (polls,
/// backoff, the settle) and the time from then until the answer was
/// logged (the call, its slot and rate-limit waits, the commit).
async fn time_per_effect(store: &SqliteStore, started_ms: u64) {
    let mut spent: BTreeMap<&'static str, (usize, f64, f64)> = BTreeMap::new();
    for summary in store.list().await.expect("list") {
        let events = store.events(&summary.session_id).await.expect("events");
        for pair in events.windows(2) {
            let (LogEntry::Intent { intent }, next) = (&pair[0].entry, &pair[1]) else {
                continue;
            };
            if pair[0].at.0 < started_ms {
                continue;
            }
            let from = intent
                .not_before
                .map_or(pair[0].at.0, |nb| nb.0.max(pair[0].at.0));
            let entry = spent.entry(intent.effect.name()).or_default();
            entry.0 += 1;
            entry.1 += from.saturating_sub(pair[0].at.0) as f64 / 1000.0;
            entry.2 += next.at.0.saturating_sub(from) as f64 / 1000.0;
        }
    }
    println!("  time per effect (count, mean wait before, mean run until answered):");
    for (name, (n, waited, ran)) in spent {
        println!(
            "    {name}: {n}, {:.3} s, {:.3} s",
            waited / n as f64,
            ran / n as f64
        );
    }
}

/// A skip of the clock: when, into the recover, and how many sessions
/// were left, all asleep.
struct Skip {
    at: Duration,
    sessions: usize,
}

/// Skips the clock to the next wake-up whenever every drive of the
/// recover is asleep on it (three checks running, 2 ms apart, then once
/// more under the clock's lock): then no call is in flight and no session
/// can move before that wake-up. After a skip it waits for a sleeper to
/// wake before looking again.
async fn skip_idle_waits(clock: &SkippingClock, in_flight: &AtomicUsize, skips: &Mutex<Vec<Skip>>) {
    let started = Instant::now();
    let driving = || Some(in_flight.load(Ordering::SeqCst)).filter(|n| *n > 0 && *n != usize::MAX);
    let all_asleep = || driving().is_some_and(|n| clock.asleep() == n);
    let mut idle_checks = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        idle_checks = if all_asleep() { idle_checks + 1 } else { 0 };
        if idle_checks < 3 {
            continue;
        }
        idle_checks = 0;
        let Some(sessions) = driving() else { continue };
        if clock.skip_if_all_asleep(sessions).is_zero() {
            continue;
        }
        let at = started.elapsed();
        skips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Skip { at, sessions });
        let woken = Instant::now();
        while all_asleep() && woken.elapsed() < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When the sessions settled: those whose cleanup swept for a launch of
/// unknown outcome and found nothing wait `SWEEP_SETTLE` before believing
/// it (EC2 may not show a new instance yet), which no speed can shorten.
async fn settle_times(store: &SqliteStore, started_ms: u64) {
    let (mut waited, mut others) = (Vec::new(), Vec::new());
    for summary in store.list().await.expect("list") {
        let at = summary.updated_at_ms.saturating_sub(started_ms) as f64 / 1000.0;
        let events = store.events(&summary.session_id).await.expect("events");
        let swept_empty = events.iter().any(|e| {
            matches!(
                e.entry,
                LogEntry::Outcome {
                    input: Input::NoInstanceFound
                }
            )
        });
        if swept_empty {
            &mut waited
        } else {
            &mut others
        }
        .push(at);
    }
    others.sort_by(f64::total_cmp);
    let at = |q: f64| others[((others.len() - 1) as f64 * q) as usize];
    let last = |times: &[f64]| times.iter().copied().fold(0.0, f64::max);
    println!(
        "  settled, by the engine's clock: {} sessions, half by {:.1} s, 90% by {:.1} s, all by {:.1} s; {} whose sweep \
         found nothing waited out the {} s settle, until {:.1} s",
        others.len(),
        at(0.5),
        at(0.9),
        last(&others),
        waited.len(),
        acode_ec2::machine::SWEEP_SETTLE.as_secs(),
        last(&waited)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let before = args.iter().any(|a| a == "--before");
    let only = args.iter().find(|a| *a == "ready" || *a == "recover");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if only.is_none_or(|a| a == "ready") {
            ready_fleet(before).await;
        }
        if only.is_none_or(|a| a == "recover") {
            recover_fleet(before).await;
        }
    });
}
