//! Memory per in-flight session: 1,000 sessions parked mid-effect in one
//! process, measured with a counting allocator (live heap bytes).
//!
//! Run: `cargo bench --bench sessions_memory`. Target: < 64 KiB per session.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use acode_ec2::driver::{Engine, EngineOptions};
use acode_ec2::effects::Effects;
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{Effect, ImageChoice, Input, KeyPairHandle, SessionContext, Timestamp};
use acode_ec2::store::SqliteStore;

#[path = "support/heap.rs"]
mod heap;

#[global_allocator]
static GLOBAL: heap::Counting = heap::Counting;

/// Answers everything at once until DescribeInstance, which never returns:
/// every session stays in flight, waiting on EC2.
struct Parked {
    waiting: AtomicUsize,
}

impl Effects for Parked {
    async fn run(&self, ctx: &SessionContext, _: Timestamp, effect: &Effect) -> Input {
        match effect {
            Effect::ValidateRequest => Input::Validated {
                zones: vec!["us-east-1a".into()],
                zone_ids: vec!["use1-az6".into()],
                image: ImageChoice {
                    ami_id: "ami-0123".into(),
                    root_device_name: None,
                    platform: None,
                },
            },
            Effect::FindPlacement { .. } => Input::PlacementFound {
                facts: Box::default(),
            },
            Effect::EnsureKeyPair {
                key_name,
                private_key_path,
            } => Input::KeyPairReady {
                key: KeyPairHandle {
                    key_name: key_name.clone(),
                    owned: true,
                    private_key_path: private_key_path.clone(),
                    owns_key_file: true,
                },
            },
            Effect::RunInstance { .. } => Input::Launched {
                instance_id: format!("i-{}", &ctx.session_id[..8]),
                was_spot: false,
                spot_request_id: None,
            },
            _ => {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                std::future::pending().await
            }
        }
    }
}

fn main() {
    const SESSIONS: usize = 1_000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = "ec2Target:\n  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n  ssh:\n    endpointOverride: 127.0.0.1:22\n";
    let request = acode_ec2::config::parse(yaml).expect("config");
    runtime.block_on(async {
        let store = Arc::new(SqliteStore::open(&dir.path().join("mem.db")).expect("store"));
        let effects = Arc::new(Parked {
            waiting: AtomicUsize::new(0),
        });
        let engine = Arc::new(Engine::new(
            effects.clone(),
            store,
            EngineOptions {
                key_dir: dir.path().join("keys").to_string_lossy().into_owned(),
                lease_ttl: Duration::from_secs(30),
            },
        ));
        // Warm up once so one-time allocations (runtime, SQLite caches) are not billed per session.
        let warm = tokio::spawn({
            let (engine, request) = (engine.clone(), request.clone());
            async move { engine.provision(request, &NoProgress).await }
        });
        while effects.waiting.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = heap::live();
        let mut tasks = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            let (engine, request) = (engine.clone(), request.clone());
            tasks.push(tokio::spawn(async move {
                engine.provision(request, &NoProgress).await
            }));
        }
        while effects.waiting.load(Ordering::SeqCst) < SESSIONS + 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let after = heap::live();
        let per_session = (after.saturating_sub(before)) as f64 / SESSIONS as f64;
        println!("sessions in flight: {SESSIONS}");
        println!("live heap before: {before} B, after: {after} B");
        println!(
            "memory per in-flight session: {:.1} KiB (target < 64 KiB)",
            per_session / 1024.0
        );
        for task in tasks {
            task.abort();
        }
        warm.abort();
    });
}
