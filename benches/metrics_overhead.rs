//! What metrics cost a provision: whole provisions (validate to Ready, 8
//! effects answered at once, every checkpoint committed to SQLite on
//! tmpfs so fsync does not drown the difference), with and without a
//! Prometheus recorder, in alternating batches; the figure is the median of
//! the per-round ratios.
//!
//! Run: `cargo bench --bench metrics_overhead [-- ROUNDS]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use acode_ec2::clock::{ManualClock, wall_clock};
use acode_ec2::driver::{Engine, EngineOptions};
use acode_ec2::effects::Effects;
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{
    CheckState, ConsoleFingerprints, Effect, ImageChoice, Input, SessionContext, StatusReport,
    Timestamp,
};
use acode_ec2::store::SqliteStore;

const BATCH: usize = 20;

/// Answers every effect at once, as a healthy EC2 and sshd would.
struct Healthy;

impl Effects for Healthy {
    async fn run(&self, ctx: &SessionContext, _: Timestamp, effect: &Effect) -> Input {
        match effect {
            Effect::ValidateRequest => Input::Validated {
                image: ImageChoice {
                    ami_id: "ami-0123".into(),
                    root_device_name: None,
                    platform: None,
                },
                zones: vec!["us-east-1a".into()],
                zone_ids: vec!["use1-az6".into()],
            },
            Effect::FindPlacement { .. } => Input::PlacementFound {
                facts: Box::default(),
            },
            Effect::EnsureKeyPair { .. } => Input::KeyPairReady {
                key: ctx.planned_key(),
            },
            Effect::RunInstance { .. } => Input::Launched {
                instance_id: format!("i-{}", &ctx.session_id[..8]),
                was_spot: false,
                spot_request_id: None,
            },
            Effect::DescribeInstance { .. } => Input::InstanceRunning {
                public_ip: Some("54.0.0.1".into()),
                private_ip: None,
                spot_request: None,
            },
            Effect::ReadConsoleHostKeys { .. } => Input::ConsoleHostKeys {
                fingerprints: ConsoleFingerprints(vec!["SHA256:x".into()]),
            },
            Effect::ProbeSsh { .. } => Input::SshReady {
                host_key_fingerprint: "SHA256:x".into(),
                host_key: "ssh-ed25519 AAAA".into(),
            },
            Effect::DescribeInstanceStatus { .. } => Input::StatusChecksReported {
                report: StatusReport {
                    system: CheckState::Ok,
                    instance: CheckState::Ok,
                },
            },
            Effect::CancelSpotRequest { .. } => Input::SpotRequestCancelled {
                state: None,
                instance_id: None,
            },
            Effect::RunShutdownCommand { .. } => Input::ShutdownCommandFinished {
                outcome: "exited 0".into(),
            },
            Effect::TerminateInstance { .. } => Input::InstanceTerminated,
            Effect::DeleteKeyPair { .. } => Input::KeyPairDeleted,
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn batch(engine: &Engine<Healthy>) -> Duration {
    let yaml = "ec2Target:\n  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n  ssh:\n    endpointOverride: 127.0.0.1:22\n";
    let request = acode_ec2::config::parse(yaml).expect("config");
    let started = Instant::now();
    for _ in 0..BATCH {
        engine
            .provision(request.clone(), &NoProgress)
            .await
            .expect("Ready");
    }
    started.elapsed()
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(30)
        .max(1);
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let engine = Engine::new(
        Arc::new(Healthy),
        Arc::new(SqliteStore::open(&dir.path().join("state.db")).expect("store")),
        EngineOptions {
            key_dir: dir.path().join("keys").to_string_lossy().into_owned(),
            lease_ttl: Duration::from_secs(30),
        },
    )
    .with_clock(Arc::new(ManualClock::starting_at(wall_clock())));
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let (mut without, mut with, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    runtime.block_on(async {
        batch(&engine).await; // warm up
        for _ in 0..rounds {
            let plain = batch(&engine).await.as_secs_f64();
            let measured = {
                let _recording = metrics::set_default_local_recorder(&recorder);
                batch(&engine).await.as_secs_f64()
            };
            without.push(plain * 1e6 / BATCH as f64);
            with.push(measured * 1e6 / BATCH as f64);
            ratios.push(measured / plain);
        }
    });
    let rendered = recorder.handle().render();
    assert!(
        rendered.contains("acode_ec2_time_to_settle_seconds"),
        "the recorder saw nothing"
    );
    println!(
        "{rounds} rounds of {BATCH} provisions each (validate to Ready, 7 effects, SQLite on tmpfs)"
    );
    println!(
        "without a recorder   median {:8.1} µs per provision",
        median(&mut without)
    );
    println!(
        "with Prometheus      median {:8.1} µs per provision",
        median(&mut with)
    );
    println!("ratio                median {:8.3}", median(&mut ratios));
}
