//! Time to Ready against the lab with EC2-like timings, as medians over
//! several sessions run one after another (the lab's sshd window follows
//! the newest launch, so sessions must not overlap).
//!
//! The lab's schedule, from each launch: running at 8 s, console host keys
//! at 15 s, sshd up at 18 s, status checks ok at 20 s. So the earliest a
//! session can be Ready is 20 s after RunInstances (the floor). Reported:
//! - engine overhead: time to Ready − floor, with 100 ms poll and SSH
//!   cadences (goal ≤ 100 ms);
//! - with the specified cadences (5 s polls, 10 s between SSH logins):
//!   time to Ready and what the cadence costs over the floor;
//! - NFR-001 (Ready < 3 min after provisioning starts) and NFR-002 (SSH
//!   < 2 min after running), checked on every session.
//!
//! Run: `cargo bench --bench time_to_ready [-- RUNS]` (default 3 runs per
//! cadence). Needs the lab's venv (`scripts/setup.sh`); connects only to
//! loopback.

// The engine's provision future is deeply nested; computing its layout
// needs more than the default query depth.
#![recursion_limit = "256"]

#[allow(dead_code)]
#[path = "../tests/integration/lab.rs"]
mod lab;

use std::time::{Duration, Instant};

use acode_ec2::clock::wall_clock;
use acode_ec2::driver::{Engine, EngineOptions};
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{Input, Timestamp};
use acode_ec2::store::{CheckpointStore, LogEntry, SqliteStore};
use lab::Lab;

const RUNNING_S: f64 = 8.0;
const CONSOLE_S: f64 = 15.0;
const SSHD_S: f64 = 18.0;
const STATUS_OK_S: f64 = 20.0;

struct Sample {
    /// Provision start → Ready.
    total: Duration,
    /// RunInstances answered → Ready, less the lab's 20 s schedule.
    over_floor: Duration,
    /// Running (8 s after launch) → SSH login verified.
    ssh_after_running: Duration,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn millis(at: Timestamp, later: Timestamp) -> Duration {
    Duration::from_millis(at.millis_until(later))
}

/// The lab's request, with minutes to reach running and Ready; at the
/// lab's 100 ms cadences, or the specified ones (5 s polls, 10 s SSH).
fn request(lab: &Lab, specified_cadence: bool) -> acode_ec2::request::ProvisionRequest {
    let mut yaml = lab
        .target_yaml("")
        .replace("runningTimeout: 30s", "runningTimeout: 5m")
        .replace("sshTimeout: 30s", "sshTimeout: 5m");
    if specified_cadence {
        yaml = yaml
            .replace("  pollInterval: 100ms\n", "")
            .replace("    retryInterval: 100ms\n", "");
    }
    acode_ec2::config::parse(&format!("ec2Target:\n{yaml}")).expect("config")
}

async fn one_session(lab: &Lab, dir: &std::path::Path, specified_cadence: bool) -> Sample {
    let store = std::sync::Arc::new(SqliteStore::open(&dir.join("state.db")).expect("store"));
    let engine = Engine::new(
        lab.effects(),
        store.clone(),
        EngineOptions {
            key_dir: dir.join("keys").to_string_lossy().into_owned(),
            lease_ttl: Duration::from_secs(30),
        },
    );
    let started = Instant::now();
    let ready = engine
        .provision(request(lab, specified_cadence), &NoProgress)
        .await
        .expect("Ready");
    let total = started.elapsed();
    let ready_at = wall_clock();
    let events = store.events(&ready.session_id).await.expect("events");
    let at = |wanted: fn(&Input) -> bool| {
        events
            .iter()
            .find(|e| matches!(&e.entry, LogEntry::Outcome { input } if wanted(input)))
            .map(|e| e.at)
            .expect("logged")
    };
    let launched = at(|i| matches!(i, Input::Launched { .. }));
    let verified = at(|i| matches!(i, Input::SshReady { .. }));
    let sample = Sample {
        total,
        over_floor: millis(launched, ready_at).saturating_sub(Duration::from_secs_f64(STATUS_OK_S)),
        ssh_after_running: millis(launched, verified)
            .saturating_sub(Duration::from_secs_f64(RUNNING_S)),
    };
    engine
        .teardown(&ready.session_id, &NoProgress)
        .await
        .expect("teardown");
    sample
}

fn report(name: &str, samples: &[Sample]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let total = median(samples.iter().map(|s| ms(s.total)).collect());
    let over = median(samples.iter().map(|s| ms(s.over_floor)).collect());
    let ssh = median(samples.iter().map(|s| ms(s.ssh_after_running)).collect());
    let nfr1 = samples.iter().all(|s| s.total < Duration::from_secs(180));
    let nfr2 = samples
        .iter()
        .all(|s| s.ssh_after_running < Duration::from_secs(120));
    println!(
        "{name:<34} time to Ready median {:>7.1} s   over the 20 s floor {:>8.1} ms   SSH after running {:>5.1} s   NFR-001 {}   NFR-002 {}",
        total / 1000.0,
        over,
        ssh / 1000.0,
        if nfr1 { "met" } else { "MISSED" },
        if nfr2 { "met" } else { "MISSED" },
    );
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(3)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let lab = Lab::start_with(&[
        "--boot-delay-s",
        &RUNNING_S.to_string(),
        "--console-lag-s",
        &(CONSOLE_S - RUNNING_S).to_string(),
        "--status-ok-delay-s",
        &(STATUS_OK_S - RUNNING_S).to_string(),
        "--terminate-delay-s",
        "0.5",
    ]);
    lab.configure(serde_json::json!({ "ssh_start_delay_s": SSHD_S }));
    let dir = tempfile::tempdir().expect("tempdir");
    eprintln!(
        "{runs} sessions per cadence, one after another (about {} s each)",
        STATUS_OK_S + 5.0
    );
    runtime.block_on(async {
        for (name, specified) in [
            ("100 ms polls and SSH retries", false),
            ("specified: 5 s polls, 10 s SSH", true),
        ] {
            let mut samples = Vec::new();
            for _ in 0..runs {
                samples.push(one_session(&lab, dir.path(), specified).await);
            }
            report(name, &samples);
        }
    });
}
