//! The engine end to end against the lab: real aws-sdk-ec2 calls to moto,
//! real SSH handshakes with a real sshd, state in SQLite.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use acode_ec2::driver::{Engine, EngineError, ReadyInstance};
use acode_ec2::effects::api::{Ec2Api, Ec2Result, SubnetInfo};
use acode_ec2::effects::describe_batch::{BatchWindow, Batched};
use acode_ec2::effects::rate_limit::{BucketSize, CallFamily, RateLimits};
use acode_ec2::effects::sdk::SdkEc2;
use acode_ec2::effects::{AwsEffects, CallBudget, Effects};
use acode_ec2::error_code::ErrorClass;
use acode_ec2::events::{NoProgress, ProvisionEvent};
use acode_ec2::machine::{Effect, Input, PhaseKind, SessionContext, Timestamp};
use acode_ec2::net_guard::ConnectGuard;
use acode_ec2::store::CheckpointStore;
use serde_json::json;
use std::time::Duration;

use crate::common::{Harness, request};
use crate::crashing::{CrashPoint, is_crash};
use crate::lab::Lab;

async fn key_pair_exists(lab: &Lab, name: &str) -> bool {
    let out = lab
        .ec2()
        .describe_key_pairs()
        .send()
        .await
        .expect("DescribeKeyPairs");
    out.key_pairs().iter().any(|k| k.key_name() == Some(name))
}

/// A fresh engine over `harness` and a session it provisioned to Ready in
/// the lab with `extra` config lines.
async fn provision_ready(
    lab: &Lab,
    harness: &Harness,
    extra: &str,
) -> (Engine<AwsEffects>, ReadyInstance) {
    let engine = harness.engine(lab.effects());
    let ready = engine
        .provision(lab.request(extra), &NoProgress)
        .await
        .expect("Ready");
    (engine, ready)
}

/// No private key in the database: its file, its WAL, and the log as read back.
async fn assert_no_secrets_in(harness: &Harness) {
    let db = harness.dir.path().join("state.db");
    let mut bytes = std::fs::read(&db).expect("state.db exists");
    bytes.extend(std::fs::read(db.with_extension("db-wal")).unwrap_or_default());
    assert!(bytes.len() > 4096, "nothing to scan");
    assert!(
        !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
        "private key material on disk"
    );
    for session in harness.store.list().await.unwrap() {
        for event in harness.store.events(&session.session_id).await.unwrap() {
            let text = format!("{:?}", event.entry);
            assert!(
                !text.contains("PRIVATE KEY") && !text.contains("BEGIN OPENSSH"),
                "{text}"
            );
        }
    }
}

/// Everything the config asks of the launch, read back from EC2 (moto):
/// root volume size, gp3 and delete-on-termination (FR-016–019), IMDSv2
/// required (FR-020), the instance profile, userData, the session's tags
/// and the caller's on the instance and its volume (FR-011–013, AC-002),
/// and for spot the one-time request at the max price (FR-023/024).
#[tokio::test]
async fn the_launch_carries_every_setting_of_the_config() {
    use base64::Engine as _;
    // Unnoted: the reads back (DescribeVolumes, DescribeInstanceAttribute)
    // are this test's, not calls the engine makes.
    let lab = Lab::start().unnoted();
    let harness = Harness::new();
    let arn = lab.call(
        "POST",
        "/instance_profiles",
        Some(json!({"name": "acode-agent"})),
    )["arn"]
        .as_str()
        .expect("an instance profile ARN")
        .to_string();
    let script = "#!/bin/sh\necho acode-user-data\n";
    let settings = format!(
        "  ebsSizeGb: 33\n  userData: |\n    #!/bin/sh\n    echo acode-user-data\n  \
         iamInstanceProfileArn: {arn}\n  tags:\n    team: coding-agents\n"
    );
    let ec2 = lab.ec2();
    for spot in [false, true] {
        let extra = if spot {
            format!("{settings}  useSpot: true\n  spotMaxPrice: \"0.05\"\n")
        } else {
            settings.clone()
        };
        let before_ms = acode_ec2::clock::wall_clock().0;
        let (engine, ready) = provision_ready(&lab, &harness, &extra).await;
        assert_eq!(ready.was_spot, spot);
        let out = ec2
            .describe_instances()
            .instance_ids(&ready.instance_id)
            .send()
            .await
            .expect("DescribeInstances");
        let instance = &out.reservations()[0].instances()[0];
        assert_eq!(
            instance.metadata_options().and_then(|m| m.http_tokens()),
            Some(&aws_sdk_ec2::types::HttpTokensState::Required)
        );
        assert_eq!(
            instance.iam_instance_profile().and_then(|p| p.arn()),
            Some(arn.as_str())
        );
        let tags_of =
            |tags: &[aws_sdk_ec2::types::Tag]| -> std::collections::HashMap<String, String> {
                tags.iter()
                    .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                    .collect()
            };
        let check_tags = |tags: std::collections::HashMap<String, String>, what: &str| {
            assert_eq!(
                tags.get("acode").map(String::as_str),
                Some("true"),
                "{what}: {tags:?}"
            );
            assert_eq!(
                tags.get("acode-session-id"),
                Some(&ready.session_id),
                "{what}: {tags:?}"
            );
            assert_eq!(
                tags.get("team").map(String::as_str),
                Some("coding-agents"),
                "{what}: {tags:?}"
            );
            let at: u64 = tags
                .get("acode-timestamp")
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("{what}: no acode-timestamp in {tags:?}"));
            assert!(
                at >= before_ms && at <= acode_ec2::clock::wall_clock().0,
                "{what}: {at}"
            );
        };
        check_tags(tags_of(instance.tags()), "instance");
        let root = &instance.block_device_mappings()[0];
        assert_eq!(root.device_name(), instance.root_device_name());
        let ebs = root.ebs().expect("an EBS root volume");
        assert_eq!(ebs.delete_on_termination(), Some(true));
        let volumes = ec2
            .describe_volumes()
            .volume_ids(ebs.volume_id().expect("a volume id"))
            .send()
            .await
            .expect("DescribeVolumes");
        let volume = &volumes.volumes()[0];
        assert_eq!(volume.size(), Some(33));
        assert_eq!(
            volume.volume_type(),
            Some(&aws_sdk_ec2::types::VolumeType::Gp3)
        );
        check_tags(tags_of(volume.tags()), "volume");
        // Sent base64-encoded, as EC2 wants it, and shown the same way.
        let attribute = ec2
            .describe_instance_attribute()
            .instance_id(&ready.instance_id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .expect("DescribeInstanceAttribute");
        let decode = |text: &[u8]| {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .expect("base64")
        };
        let stored = attribute
            .user_data()
            .and_then(|u| u.value())
            .expect("userData");
        assert_eq!(decode(stored.as_bytes()), script.as_bytes());
        match instance.spot_instance_request_id() {
            Some(request_id) if spot => {
                let requests = ec2
                    .describe_spot_instance_requests()
                    .spot_instance_request_ids(request_id)
                    .send()
                    .await
                    .expect("DescribeSpotInstanceRequests");
                let request = &requests.spot_instance_requests()[0];
                assert_eq!(
                    request.r#type(),
                    Some(&aws_sdk_ec2::types::SpotInstanceType::OneTime)
                );
                let price: f64 = request
                    .spot_price()
                    .and_then(|p| p.parse().ok())
                    .expect("a max price");
                assert!((price - 0.05).abs() < 1e-9, "{price}");
            }
            None if !spot => {}
            other => panic!("spot {spot}, spot request {other:?}"),
        }
        let end = engine.teardown(&ready.session_id, &NoProgress).await;
        assert_eq!(end.expect("teardown"), PhaseKind::TornDown);
    }
}

/// While DescribeInstances fails, cleanup's sweep by tag cannot run; the
/// instance on record is terminated all the same, not left running until
/// EC2's reads come back.
#[tokio::test]
async fn the_instance_on_record_is_terminated_while_the_sweep_cannot_run() {
    let lab = Lab::start();
    let harness = Harness::new();
    let (engine, ready) = provision_ready(&lab, &harness, "").await;
    lab.fault(json!({"action": "DescribeInstances", "code": "InternalError", "http_status": 500, "count": 10000}));
    let state = || {
        lab.instances()
            .into_iter()
            .find(|i| i["instance_id"] == ready.instance_id.as_str())
            .and_then(|i| i["state"].as_str().map(str::to_string))
    };
    let terminated = async {
        while !matches!(state().as_deref(), Some("shutting-down" | "terminated")) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = engine.teardown(&ready.session_id, &NoProgress) => panic!("torn down without a sweep"),
        () = terminated => {}
        () = tokio::time::sleep(Duration::from_secs(60)) => panic!("still {:?}", state()),
    }
    // Every sweep so far failed, and the fault still holds.
    let remaining = lab.call("GET", "/faults", None)[0]["remaining"]
        .as_u64()
        .expect("the fault");
    assert!(remaining > 0 && remaining < 10000, "{remaining}");
    // EC2's reads are back: the cleanup finishes.
    lab.call("DELETE", "/faults", None);
    let end = engine.teardown(&ready.session_id, &NoProgress).await;
    assert_eq!(end.expect("teardown"), PhaseKind::TornDown);
    assert!(lab.live_instances_of(&ready.session_id).is_empty());
}

#[tokio::test]
async fn provisions_to_ready_with_a_verified_host_key_then_tears_down_to_nothing() {
    let lab = Lab::start();
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let progress_seen = std::sync::Mutex::new(Vec::new());
    let progress =
        |p: &acode_ec2::events::ProvisionProgress| progress_seen.lock().unwrap().push(p.phase);

    let ready = engine
        .provision(lab.request(""), &progress)
        .await
        .expect("Ready");

    lab.assert_trusted(&ready);
    assert_eq!(
        ready.ssh_endpoint,
        format!("127.0.0.1:{}", lab.info.sshd_port)
    );
    assert!(!ready.was_spot);
    let key_path = ready.key_path.clone().expect("temporary key file");
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(key_pair_exists(&lab, &format!("acode-{}", ready.session_id)).await);
    let live = lab.live_instances_of(&ready.session_id);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0]["state"], "running");
    assert_eq!(live[0]["tags"]["acode"], "true");
    assert_eq!(lab.count("RunInstances"), 1);
    assert_eq!(
        harness
            .store
            .summary(&ready.session_id)
            .await
            .unwrap()
            .phase,
        PhaseKind::Ready
    );
    assert_no_secrets_in(&harness).await;

    let phases = progress_seen.lock().unwrap().clone();
    for phase in [
        PhaseKind::PreparingKeyPair,
        PhaseKind::Launching,
        PhaseKind::WaitingForRunning,
        PhaseKind::WaitingForSsh,
        PhaseKind::Ready,
    ] {
        assert!(
            phases.contains(&phase),
            "no progress in {phase}: {phases:?}"
        );
    }
    let mut kinds = Vec::new();
    while let Ok(event) = events.try_recv() {
        assert_eq!(event.session_id(), ready.session_id);
        kinds.push(event);
    }
    assert!(
        matches!(kinds.first(), Some(ProvisionEvent::ProvisionStarted { .. })),
        "{kinds:?}"
    );
    assert!(
        matches!(
            kinds.last(),
            Some(ProvisionEvent::ProvisionCompleted { success: true, .. })
        ),
        "{kinds:?}"
    );

    let end = engine
        .teardown(&ready.session_id, &NoProgress)
        .await
        .unwrap();
    assert_eq!(end, PhaseKind::TornDown);
    assert!(lab.live_instances_of(&ready.session_id).is_empty());
    assert!(!key_pair_exists(&lab, &format!("acode-{}", ready.session_id)).await);
    assert!(
        !std::path::Path::new(&key_path).exists(),
        "key file left behind"
    );
    // A second teardown is a no-op.
    assert_eq!(
        engine
            .teardown(&ready.session_id, &NoProgress)
            .await
            .unwrap(),
        PhaseKind::TornDown
    );
}

#[tokio::test]
async fn imported_rsa_key_pair_works_and_is_deleted() {
    let lab = Lab::start();
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let yaml = lab.target_yaml("  keyPair:\n    mode: import\n    keyType: rsa\n");
    let ready = engine
        .provision(request(&yaml), &NoProgress)
        .await
        .expect("Ready");
    let installed = lab.call("GET", "/authorized_keys", None);
    assert!(installed.to_string().contains("ssh-rsa"), "{installed}");
    engine
        .teardown(&ready.session_id, &NoProgress)
        .await
        .unwrap();
    assert!(!key_pair_exists(&lab, &format!("acode-{}", ready.session_id)).await);
    assert_no_secrets_in(&harness).await;
}

#[tokio::test]
async fn spot_without_capacity_falls_back_to_on_demand() {
    let lab = Lab::start();
    lab.configure(json!({"spot_mode": "capacity-not-available"}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let ready = engine
        .provision(lab.request("  useSpot: true\n"), &NoProgress)
        .await
        .expect("Ready");
    assert!(!ready.was_spot);
    let mut fell_back = false;
    while let Ok(event) = events.try_recv() {
        if let ProvisionEvent::SpotFallback { reason, .. } = event {
            assert!(reason.contains("InsufficientInstanceCapacity"), "{reason}");
            fell_back = true;
        }
    }
    assert!(fell_back, "no SpotFallback event");
    let live = lab.live_instances_of(&ready.session_id);
    assert_eq!(live.len(), 1);
    assert_ne!(live[0]["lifecycle"], "spot");
}

/// The `SpotFallback` reasons among the events received so far.
/// The reasons of the `SpotFallback` events received so far.
pub fn spot_fallbacks(
    events: &mut tokio::sync::broadcast::Receiver<ProvisionEvent>,
) -> Vec<String> {
    let mut reasons = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let ProvisionEvent::SpotFallback { reason, .. } = event {
            reasons.push(reason);
        }
    }
    reasons
}

/// The session's instances as the lab sees them: (lifecycle, state) pairs.
fn lifecycles_of(lab: &Lab, session_id: &str) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = lab
        .instances()
        .into_iter()
        .filter(|i| i["tags"]["acode-session-id"] == session_id)
        .map(|i| {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (text(&i["lifecycle"]), text(&i["state"]))
        })
        .collect();
    all.sort();
    all
}

#[tokio::test]
async fn a_spot_instance_not_running_in_time_is_replaced_on_demand() {
    let lab = Lab::start();
    // Every instance boots in 1.5 s; spot may take only 0.5 s.
    lab.configure(json!({"boot_delay_s": 1.5}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let ready = engine
        .provision(
            lab.request("  useSpot: true\n  spotRequestTimeout: 500ms\n"),
            &NoProgress,
        )
        .await
        .expect("Ready");
    assert!(!ready.was_spot);
    lab.assert_trusted(&ready);
    let reasons = spot_fallbacks(&mut events);
    assert!(
        matches!(reasons.as_slice(), [r] if r.contains("not running within")),
        "{reasons:?}"
    );
    // The spot instance was terminated before the on-demand one was launched.
    let instances = lifecycles_of(&lab, &ready.session_id);
    assert_eq!(instances.len(), 2, "{instances:?}");
    assert_eq!(instances[0].0, "on-demand");
    assert_eq!(instances[1].0, "spot");
    assert!(
        ["shutting-down", "terminated"].contains(&instances[1].1.as_str()),
        "{instances:?}"
    );
    assert_eq!(lab.live_instances_of(&ready.session_id).len(), 1);
    let summary = harness.store.summary(&ready.session_id).await.unwrap();
    assert!(
        !summary.was_spot,
        "status must describe the on-demand instance"
    );
    assert_eq!(
        summary.instance_id.as_deref(),
        Some(ready.instance_id.as_str())
    );
}

#[tokio::test]
async fn a_spot_instance_reclaimed_while_booting_is_replaced_on_demand() {
    let lab = Lab::start();
    lab.configure(json!({"boot_delay_s": 2.0}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let mut watch = engine.subscribe();
    let reclaim = async {
        // EC2 takes the spot instance back while it is still pending.
        loop {
            match watch.recv().await {
                Ok(ProvisionEvent::ProvisionPhaseChanged {
                    session_id,
                    to: PhaseKind::WaitingForRunning,
                    ..
                }) => {
                    let live = lab.live_instances_of(&session_id);
                    let id = live[0]["instance_id"].as_str().expect("id").to_string();
                    assert_eq!(live[0]["lifecycle"], "spot");
                    lab.ec2()
                        .terminate_instances()
                        .instance_ids(&id)
                        .send()
                        .await
                        .expect("TerminateInstances");
                    return id;
                }
                Ok(_) => {}
                Err(e) => panic!("events ended before WaitingForRunning: {e}"),
            }
        }
    };
    let (ready, reclaimed) = tokio::join!(
        engine.provision(lab.request("  useSpot: true\n"), &NoProgress),
        reclaim
    );
    let ready = ready.expect("Ready");
    assert!(!ready.was_spot);
    assert_ne!(ready.instance_id, reclaimed);
    let reasons = spot_fallbacks(&mut events);
    assert!(
        matches!(reasons.as_slice(), [r] if r.contains(&reclaimed) && r.contains("before it was running")),
        "{reasons:?}"
    );
    let live = lab.live_instances_of(&ready.session_id);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0]["lifecycle"], "on-demand");
}

#[tokio::test]
async fn sessions_driven_together_share_describe_instances_calls() {
    const SESSIONS: usize = 8;
    let lab = Lab::start();
    lab.configure(json!({"boot_delay_s": 2.0}));
    let harness = Harness::new();
    // Karpenter's window, so that the batches do not depend on this
    // machine's speed; the default window is shorter.
    let window = BatchWindow {
        idle: std::time::Duration::from_millis(100),
        max_wait: std::time::Duration::from_secs(1),
        max_ids: 200,
    };
    let effects = AwsEffects::with_batch_window(lab.ec2(), ConnectGuard::loopback_only(), window);
    let engine = harness.engine(Arc::new(effects));
    let runs = (0..SESSIONS).map(|_| engine.provision(lab.request(""), &NoProgress));
    let ready: Vec<_> = futures::future::join_all(runs).await;
    let calls = lab.count("DescribeInstances");
    let mut polls = 0;
    for ready in ready {
        let ready = ready.expect("Ready");
        assert_eq!(lab.live_instances_of(&ready.session_id).len(), 1);
        polls += harness
            .outcomes(&ready.session_id)
            .await
            .into_iter()
            .filter(|input| {
                matches!(
                    input,
                    Input::InstancePending { .. }
                        | Input::InstanceRunning { .. }
                        | Input::InstanceNotVisible
                )
            })
            .count() as u64;
    }
    eprintln!("{SESSIONS} sessions: {calls} DescribeInstances calls for {polls} polls");
    // Every session polled until its instance ran, 2 s after launch.
    assert!(polls >= SESSIONS as u64 * 5, "only {polls} polls");
    assert!(
        calls * 3 <= polls,
        "{calls} DescribeInstances calls for {polls} polls: not batched"
    );
}

#[tokio::test]
async fn a_batch_larger_than_a_filter_takes_is_sent_in_parts() {
    let lab = Lab::start();
    let window = BatchWindow {
        max_ids: 2,
        ..BatchWindow::default()
    };
    let batched = Batched::new(SdkEc2::new(lab.ec2()), window);
    // On this single-threaded runtime all five join the batch before its
    // sender task first runs: more ids than one call may carry.
    let ids: Vec<String> = (0..5).map(|i| format!("i-{i:017x}")).collect();
    let answers =
        futures::future::join_all(ids.iter().map(|id| batched.describe_instance(id))).await;
    assert!(answers.iter().all(|a| *a == Ok(None)), "{answers:?}");
    assert_eq!(lab.count("DescribeInstances"), 3, "{:?}", lab.counters());
}

#[tokio::test]
async fn teardowns_at_once_share_one_sweep_that_lists_each_sessions_instances() {
    const SESSIONS: usize = 4;
    let lab = Lab::start();
    let harness = Harness::new();
    let window = BatchWindow {
        idle: Duration::from_millis(100),
        max_wait: Duration::from_secs(1),
        max_ids: 200,
    };
    let effects = AwsEffects::with_batch_window(lab.ec2(), ConnectGuard::loopback_only(), window);
    let engine = harness.engine(Arc::new(effects));
    let runs = (0..SESSIONS).map(|_| engine.provision(lab.request(""), &NoProgress));
    let ready: Vec<ReadyInstance> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.expect("Ready"))
        .collect();
    let (torn, kept) = ready.split_at(SESSIONS - 1);

    let before = lab.count("DescribeInstances");
    let teardowns = torn
        .iter()
        .map(|r| engine.teardown(&r.session_id, &NoProgress));
    for end in futures::future::join_all(teardowns).await {
        assert_eq!(end.expect("teardown"), PhaseKind::TornDown);
    }
    let sweeps = lab.count("DescribeInstances") - before;
    // Unbatched, each teardown sweeps on its own.
    assert!(
        (1..torn.len() as u64).contains(&sweeps),
        "{sweeps} sweeps for {} teardowns",
        torn.len()
    );
    for r in torn {
        assert!(lab.live_instances_of(&r.session_id).is_empty());
    }

    // The call itself: only live instances, by session, and no entry for a
    // session without one.
    let mut asked: Vec<String> = ready.iter().map(|r| r.session_id.clone()).collect();
    asked.push("never-launched".into());
    let found = SdkEc2::new(lab.ec2())
        .live_instances_of_sessions(&asked)
        .await
        .expect("DescribeInstances by session tag");
    let expected = std::collections::HashMap::from([(
        kept[0].session_id.clone(),
        vec![kept[0].instance_id.clone()],
    )]);
    assert_eq!(found, expected);
}

/// The CLI's budget, with 10 ms backoffs so retries cost no real time.
const QUICK_RETRIES: CallBudget = CallBudget {
    first_backoff: Duration::from_millis(10),
    ..CallBudget::STANDARD
};

/// One DescribeSubnets call (with its retries) for the lab's first subnet.
async fn ask_for_a_subnet(lab: &Lab, sdk: &SdkEc2) -> Ec2Result<Vec<SubnetInfo>> {
    sdk.describe_subnets(&[lab.subnet("us-east-1a")]).await
}

#[tokio::test]
async fn every_try_of_a_call_takes_its_own_rate_limit_token() {
    let lab = Lab::start();
    // Throttled twice, then answered: three tries of one call.
    lab.fault(json!({"action": "DescribeSubnets", "code": "RequestLimitExceeded", "count": 2}));
    let sdk = SdkEc2::new(lab.ec2()).with_budget(QUICK_RETRIES);
    let subnets = ask_for_a_subnet(&lab, &sdk)
        .await
        .expect("the third try is answered");
    assert_eq!(subnets.len(), 1);
    assert_eq!(lab.count("DescribeSubnets"), 3, "{:?}", lab.counters());
    // Had the SDK retried on its own, the bucket would have seen one call.
    assert_eq!(sdk.rate_limits().granted(CallFamily::Describe), 3);
}

#[tokio::test]
async fn a_call_gives_up_after_its_budgets_tries() {
    let lab = Lab::start();
    lab.fault(json!({"action": "DescribeSubnets", "code": "InternalError", "count": 100}));
    let budget = CallBudget {
        attempts: 3,
        ..QUICK_RETRIES
    };
    let sdk = SdkEc2::new(lab.ec2()).with_budget(budget);
    let failure = ask_for_a_subnet(&lab, &sdk)
        .await
        .expect_err("every try fails");
    assert_eq!(failure.class, ErrorClass::Transient, "{failure:?}");
    assert_eq!(lab.count("DescribeSubnets"), 3, "{:?}", lab.counters());
}

#[tokio::test]
async fn time_queued_for_a_token_is_not_the_calls_budget() {
    let lab = Lab::start();
    lab.fault(json!({"action": "DescribeSubnets", "code": "RequestLimitExceeded", "count": 2}));
    // A token every 2 s, and 1 s for the whole call: each retry queues
    // longer than the budget, which counts only sending and backing off.
    let slow = RateLimits::with(|_| BucketSize {
        burst: 1.0,
        per_second: 0.5,
    });
    let budget = CallBudget {
        attempts: 3,
        operation: Duration::from_secs(1),
        ..QUICK_RETRIES
    };
    let sdk = SdkEc2::with_rate_limits(lab.ec2(), slow).with_budget(budget);
    let subnets = ask_for_a_subnet(&lab, &sdk)
        .await
        .expect("the third try is answered");
    assert_eq!(subnets.len(), 1);
    assert_eq!(lab.count("DescribeSubnets"), 3, "{:?}", lab.counters());
}

#[tokio::test]
async fn a_call_that_outlasts_its_budget_is_cut_off() {
    let lab = Lab::start();
    lab.fault(json!({"action": "DescribeSubnets", "latency_ms": 3000}));
    let budget = CallBudget {
        operation: Duration::from_millis(500),
        ..CallBudget::STANDARD
    };
    let sdk = SdkEc2::new(lab.ec2()).with_budget(budget);
    let failure = ask_for_a_subnet(&lab, &sdk)
        .await
        .expect_err("no answer within 500 ms");
    assert_eq!(failure.class, ErrorClass::Transient, "{failure:?}");
    assert!(
        failure
            .message
            .contains("no answer within the call's budget"),
        "{failure:?}"
    );
    assert_eq!(lab.count("DescribeSubnets"), 1, "{:?}", lab.counters());
}

#[tokio::test]
async fn spot_capacity_is_used_when_there_is_some() {
    let lab = Lab::start();
    let harness = Harness::new();
    let (_, ready) = provision_ready(&lab, &harness, "  useSpot: true\n").await;
    assert!(ready.was_spot);
    assert_eq!(
        lab.live_instances_of(&ready.session_id)[0]["lifecycle"],
        "spot"
    );
    assert!(
        harness
            .store
            .summary(&ready.session_id)
            .await
            .unwrap()
            .was_spot
    );
}

#[tokio::test]
async fn a_subnet_without_capacity_fails_over_to_the_next() {
    let lab = Lab::start();
    let first = lab.subnet("us-east-1a");
    let second = lab.subnet("us-east-1b");
    lab.fault(json!({"action": "RunInstances", "code": "InsufficientInstanceCapacity", "count": 10, "subnet_id": first}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let yaml = lab.target_yaml(&format!("  failoverSubnetIds: [{second}]\n"));
    let ready = engine
        .provision(request(&yaml), &NoProgress)
        .await
        .expect("Ready");
    let live = lab.live_instances_of(&ready.session_id);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0]["subnet_id"], second.as_str());
}

#[tokio::test]
async fn a_host_key_the_console_never_printed_fails_and_cleans_up() {
    let lab = Lab::start();
    lab.configure(json!({"console_mode": "wrong-fingerprint"}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let err = engine
        .provision(lab.request(""), &NoProgress)
        .await
        .unwrap_err();
    let EngineError::ProvisionFailed { session_id, reason } = err else {
        panic!("expected a failed session, got {err}");
    };
    assert!(reason.contains("man in the middle"), "{reason}");
    assert!(
        lab.live_instances_of(&session_id).is_empty(),
        "instance left running"
    );
    assert!(
        !key_pair_exists(&lab, &format!("acode-{session_id}")).await,
        "key pair left behind"
    );
    assert_eq!(
        harness.store.summary(&session_id).await.unwrap().phase,
        PhaseKind::Failed
    );
}

#[tokio::test]
async fn a_slow_console_a_late_sshd_and_a_refusing_sshd_are_waited_out() {
    let lab = Lab::start();
    lab.configure(json!({"console_lag_s": 1.0, "ssh_start_delay_s": 1.5}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let ready = engine
        .provision(lab.request(""), &NoProgress)
        .await
        .expect("late sshd");
    lab.assert_trusted(&ready);

    lab.configure(json!({"console_lag_s": 0.2, "ssh_start_delay_s": 0, "ssh_refuse_s": 1.5}));
    let ready = engine
        .provision(lab.request(""), &NoProgress)
        .await
        .expect("refusing sshd");
    let ssh_polls = harness
        .outcomes(&ready.session_id)
        .await
        .into_iter()
        .filter(|input| matches!(input, Input::SshNotReady { .. }))
        .count();
    assert!(ssh_polls >= 1, "the refusing sshd was never seen");
}

#[tokio::test]
async fn teardown_right_after_launch_waits_for_ec2_to_show_the_instance() {
    let lab = Lab::start();
    let harness = Harness::new();
    let (engine, ready) = provision_ready(&lab, &harness, "").await;
    // EC2 does not show the new instance to TerminateInstances yet: that is
    // not "already gone", or the session would end TornDown with it running.
    lab.fault(
        json!({"action": "TerminateInstances", "code": "InvalidInstanceID.NotFound", "count": 2}),
    );
    // What a crash in the middle of writing the key file would leave.
    let key_path = ready.key_path.clone().expect("temporary key");
    let partial = format!("{key_path}.partial");
    std::fs::write(&partial, "key material").unwrap();
    let end = engine
        .teardown(&ready.session_id, &NoProgress)
        .await
        .unwrap();
    assert_eq!(end, PhaseKind::TornDown);
    assert!(lab.live_instances_of(&ready.session_id).is_empty());
    assert_eq!(lab.count("TerminateInstances"), 3, "{:?}", lab.counters());
    assert!(!std::path::Path::new(&key_path).exists());
    assert!(
        !std::path::Path::new(&partial).exists(),
        "{partial} left behind"
    );
}

#[tokio::test]
async fn a_new_key_pair_not_yet_visible_is_retried_not_failed() {
    let lab = Lab::start();
    // EC2's eventual consistency around a key pair this session makes:
    // CreateKeyPair says it exists, RunInstances says it does not.
    lab.fault(json!({"action": "CreateKeyPair", "code": "InvalidKeyPair.Duplicate", "count": 1}));
    lab.fault(json!({"action": "RunInstances", "code": "InvalidKeyPair.NotFound", "count": 1}));
    let harness = Harness::new();
    let (_, ready) = provision_ready(&lab, &harness, "").await;
    assert_eq!(lab.count("CreateKeyPair"), 2, "{:?}", lab.counters());
    assert_eq!(lab.live_instances_of(&ready.session_id).len(), 1);
}

#[tokio::test]
async fn an_instance_type_without_live_console_output_is_read_buffered() {
    let lab = Lab::start();
    // What Xen instance types answer to GetConsoleOutput with Latest=true.
    lab.fault(json!({"action": "GetConsoleOutput", "code": "UnsupportedOperation", "count": 1}));
    let harness = Harness::new();
    let (_, ready) = provision_ready(&lab, &harness, "").await;
    lab.assert_trusted(&ready);
    assert!(lab.count("GetConsoleOutput") >= 2, "{:?}", lab.counters());
}

/// EC2 refuses a whole DescribeInstanceStatus for one id it does not know:
/// the id is left out and the rest answered, so one instance not visible
/// yet does not blind the others in its batch.
#[tokio::test]
async fn a_status_batch_with_an_unknown_id_still_answers_the_known_ones() {
    let lab = Lab::start();
    let harness = Harness::new();
    let (_, ready) = provision_ready(&lab, &harness, "").await;
    let unknown = "i-0123456789abcdef0".to_string();
    let sdk = SdkEc2::new(lab.ec2());
    let alone = sdk
        .describe_instance_statuses(std::slice::from_ref(&unknown))
        .await;
    assert_eq!(alone.unwrap_err().class, ErrorClass::NotFound);
    let calls = lab.count("DescribeInstanceStatus");
    let found = sdk
        .describe_instance_statuses(&[unknown.clone(), ready.instance_id.clone()])
        .await
        .expect("the known id answered");
    assert!(found.contains_key(&ready.instance_id), "{found:?}");
    assert!(!found.contains_key(&unknown));
    assert_eq!(lab.count("DescribeInstanceStatus") - calls, 2);
}

/// Console output that is not base64 is garbage from the network, said as
/// such and asked again, not taken for "no host keys yet".
#[tokio::test]
async fn console_output_that_is_not_base64_is_a_transient_failure_that_says_so() {
    let lab = Lab::start();
    let harness = Harness::new();
    let (_, ready) = provision_ready(&lab, &harness, "").await;
    lab.configure(json!({"console_mode": "not-base64"}));
    let effects = lab.effects();
    let input =
        acode_ec2::effects::ec2::read_console_host_keys(effects.api(), &ready.instance_id).await;
    match input {
        Input::TransientFailure { message } => {
            assert!(message.contains("not base64"), "{message}")
        }
        other => panic!("expected a transient failure, got {other:?}"),
    }
}

#[tokio::test]
async fn throttling_and_an_invisible_new_instance_are_retried() {
    let lab = Lab::start();
    lab.fault(
        json!({"action": "DescribeInstances", "code": "InvalidInstanceID.NotFound", "count": 2}),
    );
    // More throttles than a call's 4 tries absorb: the machine's own
    // backoff has to carry the session through.
    lab.fault(json!({"action": "RunInstances", "code": "RequestLimitExceeded", "count": 5}));
    let harness = Harness::new();
    let (_, ready) = provision_ready(&lab, &harness, "").await;
    assert_eq!(lab.live_instances_of(&ready.session_id).len(), 1);
    assert!(lab.count("RunInstances") >= 6, "{:?}", lab.counters());
    let retried = harness
        .outcomes(&ready.session_id)
        .await
        .iter()
        .any(|input| matches!(input, Input::TransientFailure { .. }));
    assert!(retried, "the machine never saw the throttling");
}

#[tokio::test]
async fn an_unknown_ami_fails_before_anything_is_created() {
    let lab = Lab::start();
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let yaml = lab
        .target_yaml("")
        .replace(&lab.info.ami_id, "ami-00000000deadbeef0");
    let err = engine
        .provision(request(&yaml), &NoProgress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("InvalidAMIID.NotFound"), "{err}");
    assert_eq!(lab.count("RunInstances"), 0);
    assert_eq!(lab.count("CreateKeyPair"), 0);
}

#[tokio::test]
async fn the_loopback_guard_stops_a_probe_of_the_fake_public_ip() {
    let lab = Lab::start();
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    // No endpointOverride: the probe would go to moto's 54.x address.
    let yaml = lab.target_yaml("");
    let yaml = yaml.split("  ssh:\n").next().unwrap().to_string()
        + &format!("  ssh:\n    user: {}\n", lab.info.ssh_user);
    let err = engine
        .provision(request(&yaml), &NoProgress)
        .await
        .unwrap_err();
    let EngineError::ProvisionFailed { session_id, reason } = err else {
        panic!("{err}")
    };
    assert!(reason.contains("loopback"), "{reason}");
    assert!(lab.live_instances_of(&session_id).is_empty());
}

/// Provisions until `point` is passed the `nth` time, then "dies" (kill -9
/// style: no cleanup, a lease of a dead process left behind); returns the
/// session.
async fn crash_at(lab: &Lab, harness: &Harness, point: CrashPoint, nth: u32) -> String {
    let crashing = harness.crashing_engine(lab.effects(), point, nth);
    let first = crashing.provision(lab.request(""), &NoProgress).await;
    assert!(first.as_ref().is_err_and(is_crash), "{first:?}");
    harness.only_session().await
}

async fn crash_after_effect(lab: &Lab, harness: &Harness, nth: u32) -> String {
    crash_at(lab, harness, CrashPoint::EffectRan, nth).await
}

#[tokio::test]
async fn a_crash_after_run_instances_resumes_with_the_same_token_and_one_instance() {
    let lab = Lab::start();
    let harness = Harness::new();
    // Effect #4 is RunInstances: crash after it ran, before its outcome was recorded.
    let session_id = crash_after_effect(&lab, &harness, 4).await;
    assert_eq!(lab.live_instances_of(&session_id).len(), 1);

    let report = harness
        .engine(lab.effects())
        .recover(&NoProgress)
        .await
        .unwrap();
    assert_eq!(
        report[0].result.as_ref().ok(),
        Some(&PhaseKind::Ready),
        "{report:?}"
    );
    assert_eq!(lab.count("RunInstances"), 2, "the intent was re-sent once");
    let all: Vec<_> = lab
        .instances()
        .into_iter()
        .filter(|i| i["tags"]["acode-session-id"] == session_id.as_str())
        .collect();
    assert_eq!(all.len(), 1, "a second instance was launched: {all:?}");
}

/// The session's cleanup after its launch was refused, once recorded: the
/// outcome recorded for the launch, and whether the sweep that follows
/// waits out `SWEEP_SETTLE` (a launch time) or is believed at once.
async fn cleanup_after_refusal(
    harness: &Harness,
    session_id: &str,
) -> (acode_ec2::machine::InputKind, Option<Timestamp>) {
    use acode_ec2::machine::ProvisionPhase;
    use acode_ec2::store::LogEntry;
    for _ in 0..600 {
        let loaded = harness.store.load(session_id).await.expect("load");
        if let ProvisionPhase::TerminatingInstance(t) = &loaded.state.phase {
            let events = harness.store.events(session_id).await.expect("events");
            let refusal = events
                .iter()
                .find_map(|e| match &e.entry {
                    LogEntry::Outcome { input }
                        if matches!(
                            input,
                            Input::Rejected { .. } | Input::LaunchRefused { .. }
                        ) =>
                    {
                        Some(input.kind())
                    }
                    _ => None,
                })
                .expect("the refusal recorded");
            return (refusal, t.launched_at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no cleanup after the refusal");
}

/// A refused launch whose every try was answered made nothing: its sweep
/// is believed at once. After a try that lost its answer, or re-sent after
/// a crash (the dead process may have launched), it waits out the settle.
#[tokio::test]
async fn a_refused_launch_is_settled_at_once_only_when_no_try_may_have_launched() {
    use acode_ec2::machine::InputKind;
    let lab = Lab::start();
    let denied = json!({"action": "RunInstances", "code": "UnauthorizedOperation", "http_status": 403, "count": 1});

    // Every try answered: refused, one sweep, Failed, nothing left.
    let harness = Harness::new();
    lab.fault(denied.clone());
    let engine = harness.engine(lab.effects());
    let failed = engine.provision(lab.request(""), &NoProgress).await;
    assert!(failed.is_err(), "{failed:?}");
    let session = harness.only_session().await;
    let events = harness.store.events(&session).await.expect("events");
    let outcomes: Vec<InputKind> = events
        .iter()
        .filter_map(|e| match &e.entry {
            acode_ec2::store::LogEntry::Outcome { input } => Some(input.kind()),
            _ => None,
        })
        .collect();
    assert!(outcomes.contains(&InputKind::LaunchRefused), "{outcomes:?}");
    assert_eq!(
        outcomes
            .iter()
            .filter(|k| **k == InputKind::NoInstanceFound)
            .count(),
        1,
        "believed at the first sweep: {outcomes:?}"
    );
    assert!(lab.live_instances_of(&session).is_empty());

    // A try whose connection dropped, then the refusal: it may have launched.
    let harness = Harness::new();
    lab.fault(json!({"action": "RunInstances", "drop_connection": true, "count": 1}));
    lab.fault(denied.clone());
    let engine = harness.engine(lab.effects());
    let session = {
        let provision = engine.provision(lab.request(""), &NoProgress);
        tokio::pin!(provision);
        let session = loop {
            tokio::select! {
                end = &mut provision => panic!("settled before the sweep could wait: {end:?}"),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if let Ok(sessions) = harness.store.list().await
                && let Some(s) = sessions.first()
                && s.phase == PhaseKind::TerminatingInstance
            {
                break s.session_id.clone();
            }
        };
        let (refusal, launched_at) = cleanup_after_refusal(&harness, &session).await;
        assert_eq!(refusal, InputKind::Rejected);
        assert!(launched_at.is_some(), "the sweep must wait out the settle");
        session
    };
    drop(engine);
    assert!(lab.live_instances_of(&session).is_empty());

    // Re-sent by a new process after a crash left the launch unanswered.
    let harness = Harness::new();
    let session = crash_at(&lab, &harness, CrashPoint::IntentCommitted, 4).await;
    lab.fault(denied);
    let engine = harness.engine(lab.effects());
    let resumed = engine.resume(&session, &NoProgress);
    tokio::select! {
        end = resumed => panic!("settled before the sweep could wait: {end:?}"),
        (refusal, launched_at) = cleanup_after_refusal(&harness, &session) => {
            assert_eq!(refusal, InputKind::Rejected);
            assert!(launched_at.is_some(), "the sweep must wait out the settle");
        }
    }
}

#[tokio::test]
async fn a_crash_between_create_key_pair_and_the_key_file_is_repaired() {
    let lab = Lab::start();
    let harness = Harness::new();
    // Effect #2 is EnsureKeyPair.
    let session_id = crash_after_effect(&lab, &harness, 2).await;
    // Simulate the lost write: the pair exists in EC2, its private key file does not.
    let key_file = harness
        .dir
        .path()
        .join(format!("keys/acode-{session_id}.pem"));
    std::fs::remove_file(&key_file).expect("key file written by the crashed run");
    let ready = harness
        .engine(lab.effects())
        .resume(&session_id, &NoProgress)
        .await
        .expect("Ready");
    assert!(key_file.exists());
    // Without a key file the pair is not looked up: the create reports it
    // in the way, it is deleted, and the create is made again.
    assert_eq!(lab.count("DescribeKeyPairs"), 0, "{:?}", lab.counters());
    assert_eq!(lab.count("CreateKeyPair"), 3, "the pair was recreated");
    assert_eq!(
        lab.count("DeleteKeyPair"),
        1,
        "the orphaned pair was deleted"
    );
    lab.assert_trusted(&ready);
}

/// Runs every effect twice and checks that creating and deleting effects
/// answer the same both times (steno/omicron style idempotency).
struct TwiceEffects(Arc<AwsEffects>, std::sync::Mutex<Vec<String>>);

impl Effects for TwiceEffects {
    async fn run(&self, ctx: &SessionContext, created: Timestamp, effect: &Effect) -> Input {
        let first = self.0.run(ctx, created, effect).await;
        let second = self.0.run(ctx, created, effect).await;
        let must_match = matches!(
            effect,
            Effect::ValidateRequest
                | Effect::EnsureKeyPair { .. }
                | Effect::RunInstance { .. }
                | Effect::TerminateInstance { .. }
                | Effect::DeleteKeyPair { .. }
        );
        if must_match && first != second {
            self.1
                .lock()
                .unwrap()
                .push(format!("{}: {first:?} then {second:?}", effect.name()));
        }
        second
    }
}

#[tokio::test]
async fn every_effect_run_twice_has_the_same_outcome() {
    let lab = Lab::start();
    let harness = Harness::new();
    let twice = Arc::new(TwiceEffects(
        lab.effects(),
        std::sync::Mutex::new(Vec::new()),
    ));
    let engine = harness.engine(twice.clone());
    let ready = engine
        .provision(lab.request("  useSpot: true\n"), &NoProgress)
        .await
        .expect("Ready");
    assert_eq!(lab.live_instances_of(&ready.session_id).len(), 1);
    assert_eq!(
        engine
            .teardown(&ready.session_id, &NoProgress)
            .await
            .unwrap(),
        PhaseKind::TornDown
    );
    let mismatches = twice.1.lock().unwrap().clone();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert!(lab.live_instances_of(&ready.session_id).is_empty());
}

#[tokio::test]
async fn teardown_finds_an_instance_whose_launch_answer_was_lost() {
    let lab = Lab::start();
    // As EC2 may: the new instance is missing from DescribeInstances for a
    // while, so a sweep right after the launch finds nothing.
    lab.configure(json!({"visibility_delay_s": 3.0}));
    let harness = Harness::new();
    // RunInstances ran (effect #4) and the process died before recording it.
    let session_id = crash_after_effect(&lab, &harness, 4).await;
    assert_eq!(lab.live_instances_of(&session_id).len(), 1);
    // From now on every RunInstances answer is lost after EC2 acted on it.
    lab.fault(
        json!({"action": "RunInstances", "code": "InternalError", "count": 50, "when": "after"}),
    );

    let end = harness
        .engine(lab.effects())
        .teardown(&session_id, &NoProgress)
        .await
        .unwrap();
    assert_eq!(end, PhaseKind::TornDown);
    assert!(
        lab.live_instances_of(&session_id).is_empty(),
        "the instance whose id was never recorded is still running"
    );
}

/// The process died right after committing its RunInstances intent (the
/// call never went out): teardown sweeps by tag and creates nothing.
#[tokio::test]
async fn teardown_after_a_crash_before_the_launch_creates_nothing_in_ec2() {
    let lab = Lab::start();
    let harness = Harness::new();
    // Intent #4 is RunInstances (after ValidateRequest, EnsureKeyPair, FindPlacement).
    let session_id = crash_at(&lab, &harness, CrashPoint::IntentCommitted, 4).await;
    let key_name = format!("acode-{session_id}");
    assert!(key_pair_exists(&lab, &key_name).await);
    let before = lab.counters();
    let end = harness
        .fast_engine(lab.effects())
        .teardown(&session_id, &NoProgress)
        .await
        .unwrap();
    assert_eq!(end, PhaseKind::TornDown);
    let after = lab.counters();
    let calls = |counters: &std::collections::BTreeMap<String, u64>, action: &str| {
        counters.get(action).copied().unwrap_or(0)
    };
    for create in ["RunInstances", "CreateKeyPair", "ImportKeyPair"] {
        assert_eq!(
            calls(&after, create),
            calls(&before, create),
            "teardown called {create}: {after:?}"
        );
    }
    assert_eq!(calls(&after, "RunInstances"), 0);
    assert!(lab.instances().is_empty(), "{:?}", lab.instances());
    assert!(!key_pair_exists(&lab, &key_name).await);
    let key_file = harness.dir.path().join(format!("keys/{key_name}.pem"));
    assert!(!key_file.exists(), "key file left behind");
}

/// A tag sweep (after a lost launch answer) lists the instance, but
/// TerminateInstances does not know it yet: that is EC2 catching up, not
/// "already gone", and the instance is terminated once it is visible.
#[tokio::test]
async fn a_swept_instance_terminate_does_not_know_yet_is_terminated_later() {
    let lab = Lab::start();
    let harness = Harness::new();
    // RunInstances ran (effect #4) and the process died before recording it.
    let session_id = crash_after_effect(&lab, &harness, 4).await;
    assert_eq!(lab.live_instances_of(&session_id).len(), 1);
    lab.fault(
        json!({"action": "TerminateInstances", "code": "InvalidInstanceID.NotFound", "count": 2}),
    );
    let end = harness
        .fast_engine(lab.effects())
        .teardown(&session_id, &NoProgress)
        .await
        .unwrap();
    assert_eq!(end, PhaseKind::TornDown);
    assert!(
        lab.live_instances_of(&session_id).is_empty(),
        "the swept instance was left running"
    );
    assert_eq!(lab.count("TerminateInstances"), 3, "{:?}", lab.counters());
}
