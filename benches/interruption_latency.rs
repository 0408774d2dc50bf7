//! How long a spot interruption notice takes to reach the caller, in the
//! lab: from the moment EC2 (the lab) gives notice on a Ready spot
//! instance to the moment the watcher's hook runs. The notice is read from
//! the instance's metadata service over the session's verified SSH
//! connection (IMDSv2, `curl` on the instance), or from the EC2 API with
//! sshd closed. Notices are given at offsets spread over the watch
//! interval, so the median includes the wait for the next look.
//!
//! Run: `cargo bench --bench interruption_latency [-- RUNS]` (default 5
//! notices per case). Needs the lab's venv (`scripts/setup.sh`); connects
//! only to loopback.

// The watcher's future is deeply nested; computing its layout needs more
// than the default query depth.
#![recursion_limit = "256"]

#[allow(dead_code)]
#[path = "../tests/integration/lab.rs"]
mod lab;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acode_ec2::driver::{Engine, EngineOptions, InterruptionHook, WATCH_INTERVAL, WatchOptions};
use acode_ec2::events::{InterruptedInstance, NoProgress};
use acode_ec2::store::SqliteStore;
use lab::Lab;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One notice: provision a spot session, watch it, give notice after
/// `offset`, and time the hook; returns the latency and where it was read.
async fn one_notice(
    lab: &Lab,
    dir: &std::path::Path,
    interval: Duration,
    offset: Duration,
    ssh_down: bool,
) -> (Duration, String) {
    let store = Arc::new(SqliteStore::open(&dir.join("state.db")).expect("store"));
    let heard: Arc<Mutex<Option<(Instant, String)>>> = Arc::new(Mutex::new(None));
    let slot = heard.clone();
    let hook: InterruptionHook = Arc::new(move |at: InterruptedInstance| {
        *slot.lock().expect("slot") = Some((Instant::now(), at.source));
        Box::pin(async {})
    });
    let engine = Engine::new(
        lab.effects(),
        store,
        EngineOptions {
            key_dir: dir.join("keys").to_string_lossy().into_owned(),
            lease_ttl: Duration::from_secs(30),
        },
    )
    .on_interruption(hook);
    let yaml = format!(
        "ec2Target:\n{}",
        lab.target_yaml(&format!(
            "  useSpot: true\n  spotInterruption:\n    metadataUrl: {}\n",
            lab.info.imds_endpoint
        ))
    );
    let request = acode_ec2::config::parse(&yaml).expect("config");
    let ready = engine.provision(request, &NoProgress).await.expect("Ready");
    let options = WatchOptions {
        sessions: vec![ready.session_id.clone()],
        interval,
        until_idle: true,
    };
    let given = Arc::new(Mutex::new(None));
    let give = async {
        tokio::time::sleep(offset).await;
        if ssh_down {
            lab.call("POST", "/ssh", Some(serde_json::json!({"mode": "closed"})));
        }
        lab.call(
            "POST",
            "/spot/interrupt",
            Some(serde_json::json!({"instance_id": ready.instance_id, "notice_s": 60})),
        );
        *given.lock().expect("given") = Some(Instant::now());
    };
    let (watched, ()) = tokio::join!(engine.watch(&options, &NoProgress), give);
    watched.expect("watch");
    lab.call("POST", "/ssh", Some(serde_json::json!({"mode": "auto"})));
    let given = given.lock().expect("given").expect("notice given");
    let (at, source) = heard.lock().expect("heard").clone().expect("hook ran");
    (at.saturating_duration_since(given), source)
}

fn main() {
    let runs: u32 = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(5)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let lab = Lab::start();
    let dir = tempfile::tempdir().expect("tempdir");
    runtime.block_on(async {
        for (name, interval, ssh_down) in [
            ("specified 5 s interval, metadata over SSH", WATCH_INTERVAL, false),
            ("specified 5 s interval, EC2 API (sshd down)", WATCH_INTERVAL, true),
            ("200 ms interval, metadata over SSH", Duration::from_millis(200), false),
        ] {
            let mut latencies = Vec::new();
            let mut sources = Vec::new();
            for i in 0..runs {
                // Offsets spread over the interval (after the first look).
                let offset = Duration::from_millis(300) + interval.mul_f64(f64::from(i) / f64::from(runs));
                let (latency, source) = one_notice(&lab, dir.path(), interval, offset, ssh_down).await;
                latencies.push(latency.as_secs_f64() * 1000.0);
                sources.push(source);
            }
            sources.dedup();
            let max = latencies.iter().copied().fold(0.0, f64::max);
            println!(
                "{name:<46} notice to hook: median {:>7.0} ms, max {max:>7.0} ms ({runs} notices; read from {})",
                median(latencies),
                sources.join(", ")
            );
        }
    });
}
