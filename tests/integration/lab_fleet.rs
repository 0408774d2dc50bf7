//! Fleet scale in one process, against the lab: EC2's request buckets
//! kept on our side, validation answers shared, recover side by side, and
//! one lease heartbeat per engine that another process takes over from.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acode_ec2::driver::RecoverTally;
use acode_ec2::events::{NoProgress, ProvisionProgress};
use acode_ec2::machine::PhaseKind;
use acode_ec2::store::CheckpointStore;
use serde_json::{Value, json};

use crate::cli::{cli, cli_command};
use crate::common::{Harness, dead_holder};
use crate::lab::Lab;

/// The lab's throttled calls, by action.
fn throttled(lab: &Lab) -> BTreeMap<String, u64> {
    serde_json::from_value(lab.call("GET", "/throttle", None)["throttled"].clone())
        .expect("throttled counts")
}

/// Minutes for every wait: the sessions queue for RunInstances tokens.
fn patient(lab: &Lab, extra: &str) -> acode_ec2::request::ProvisionRequest {
    let yaml = lab
        .target_yaml(extra)
        .replace("runningTimeout: 30s", "runningTimeout: 5m")
        .replace("sshTimeout: 30s", "sshTimeout: 5m");
    crate::common::request(&yaml)
}

// The guard keeps whole tests apart (no task of this test waits for it).
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sessions_launched_at_once_stay_within_ec2s_buckets() {
    // Not beside the kill campaign: each is load enough for two cores.
    let _alone = crate::common::heavy_test();
    let lab = Lab::start();
    // EC2's account buckets: RunInstances 5 then 2/s, mutating 50 then 5/s,
    // Describe 100 then 20/s.
    lab.configure(json!({"throttle": "ec2"}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let results = engine
        .provision_many(patient(&lab, ""), 200, &NoProgress)
        .await;
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(results.len(), 200);
    // Within the buckets, EC2 throttles next to nothing. It is not always
    // zero under load: calls our bucket spaced out can reach an overloaded
    // lab bunched together, after its bucket stopped refilling at full.
    // Without buckets, 195 of the first 200 launches alone would be
    // throttled (and before every retry took a token, 132 calls were).
    let throttled = throttled(&lab);
    let calls: u64 = lab.counters().values().sum();
    let throttled_calls: u64 = throttled.values().sum();
    eprintln!("200 sessions: {calls} calls, throttled: {throttled:?}");
    let launches_throttled = throttled.get("RunInstances").copied().unwrap_or(0);
    assert!(
        launches_throttled * 10 < 200,
        "{launches_throttled} launches throttled: {throttled:?}"
    );
    assert!(
        throttled_calls * 20 < calls,
        "{throttled_calls} of {calls} calls throttled: {throttled:?}"
    );
    // One instance per session: repeated RunInstances (a retried
    // transport error) carried the same ClientToken.
    let live = lab.instances().len();
    assert_eq!(live, 200, "{:?}", lab.counters());
}

#[tokio::test]
async fn fifty_sessions_from_one_config_make_each_validation_call_once() {
    let lab = Lab::start();
    let harness = Harness::new();
    // An existing key pair, so its check is a validation call too.
    let created = lab
        .ec2()
        .create_key_pair()
        .key_name("shared-key")
        .send()
        .await
        .expect("CreateKeyPair");
    let key_path = harness.dir.path().join("shared-key.pem");
    std::fs::write(&key_path, created.key_material().expect("key material")).expect("key file");
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    lab.call("POST", "/counters/reset", None);
    let extra = format!(
        "  keyPair:\n    mode: existing\n    keyName: shared-key\n    privateKeyPath: {}\n",
        key_path.display()
    );
    let engine = harness.engine(lab.effects());
    let results = engine
        .provision_many(patient(&lab, &extra), 50, &NoProgress)
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let validation = [
        "DescribeImages",
        "DescribeSubnets",
        "DescribeSecurityGroups",
        "DescribeKeyPairs",
    ];
    let calls: Vec<u64> = validation.iter().map(|a| lab.count(a)).collect();
    assert_eq!(calls, [1, 1, 1, 1], "{:?}", lab.counters());
    assert_eq!(lab.count("RunInstances"), 50);
}

#[tokio::test]
async fn twenty_spot_sessions_from_one_config_ask_the_spot_market_once() {
    let lab = Lab::start();
    let harness = Harness::new();
    let extra = format!(
        "  useSpot: true\n  failoverSubnetIds: [{}]\n",
        lab.subnet("us-east-1b")
    );
    let engine = harness.engine(lab.effects());
    let results = engine
        .provision_many(patient(&lab, &extra), 20, &NoProgress)
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let spot_market = ["GetSpotPlacementScores", "DescribeSpotPriceHistory"];
    let calls: Vec<u64> = spot_market.iter().map(|a| lab.count(a)).collect();
    assert_eq!(calls, [1, 1], "{:?}", lab.counters());
    assert_eq!(lab.count("RunInstances"), 20, "{:?}", lab.counters());
}

/// A free loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_finishes_a_fast_session_while_another_waits_on_a_dead_sshd() {
    let lab = Lab::start();
    let harness = Harness::new();
    // The slow one: its SSH endpoint never answers, for up to 20 s.
    let dead_sshd = crate::common::request(
        &lab.target_yaml("")
            .replace(
                &format!("127.0.0.1:{}", lab.info.sshd_port),
                &format!("127.0.0.1:{}", closed_port()),
            )
            .replace("sshTimeout: 30s", "sshTimeout: 20s"),
    );
    // Both interrupted by a process that died: the slow one while it
    // waits for SSH, the fast one right after it was recorded.
    let died = harness.engine(lab.effects()).with_holder(dead_holder());
    let slow_id = Arc::new(Mutex::new(None::<String>));
    let waiting = {
        let slow_id = Arc::clone(&slow_id);
        move |p: &ProvisionProgress| {
            if p.phase == PhaseKind::WaitingForSsh {
                *slow_id.lock().unwrap() = Some(p.session_id.clone());
            }
        }
    };
    let provision = died.provision(dead_sshd, &waiting);
    tokio::select! {
        _ = provision => panic!("the slow session settled"),
        _ = async { while slow_id.lock().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        } } => {}
    }
    let fast = Arc::new(Mutex::new(None::<String>));
    let recorded = {
        let fast = Arc::clone(&fast);
        move |p: &ProvisionProgress| {
            fast.lock()
                .unwrap()
                .get_or_insert_with(|| p.session_id.clone());
        }
    };
    tokio::select! {
        _ = died.provision(lab.request(""), &recorded) => panic!("the fast session settled"),
        _ = async { while fast.lock().unwrap().is_none() {
            tokio::task::yield_now().await;
        } } => {}
    }
    drop(died);
    let slow_id = slow_id.lock().unwrap().clone().expect("slow session");
    let fast_id = fast.lock().unwrap().clone().expect("fast session");

    // Recover, noting when each settles (its drive ends: done goes up).
    let settled_order = Arc::new(Mutex::new(Vec::new()));
    let engine = harness.engine(lab.effects());
    let order = Arc::clone(&settled_order);
    let store = harness.store.clone();
    let tally = move |t: &RecoverTally| {
        order.lock().unwrap().push(*t);
    };
    let watcher = {
        let store = store.clone();
        let fast_id = fast_id.clone();
        let slow_id = slow_id.clone();
        tokio::spawn(async move {
            // When the fast one is Ready, the slow one must still be waiting.
            loop {
                let fast = store.summary(&fast_id).await.expect("fast").phase;
                if fast == PhaseKind::Ready {
                    return store.summary(&slow_id).await.expect("slow").phase;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let report = engine
        .recover_with(64, &NoProgress, &tally)
        .await
        .expect("recover");
    let slow_when_fast_ready = watcher.await.expect("watcher");
    assert_eq!(
        slow_when_fast_ready,
        PhaseKind::WaitingForSsh,
        "the fast session waited for the slow one"
    );
    let outcome = |id: &str| {
        report
            .iter()
            .find(|r| r.session_id == id)
            .map(|r| match &r.result {
                Ok(phase) => Ok(*phase),
                Err(e) => Err(e.to_string()),
            })
    };
    assert_eq!(outcome(&fast_id), Some(Ok(PhaseKind::Ready)));
    // The slow one gave up on SSH and was cleaned up.
    assert_eq!(outcome(&slow_id), Some(Ok(PhaseKind::Failed)));
    assert!(lab.live_instances_of(&slow_id).is_empty());
    let tallies = settled_order.lock().unwrap().clone();
    // Both are driven from the start.
    assert_eq!(
        tallies.first().map(|t| (t.total, t.in_flight, t.done)),
        Some((2, 2, 0))
    );
    assert_eq!(tallies.last().map(|t| (t.done, t.failed)), Some((2, 0)));
}

fn sessions_json(db: &std::path::Path, lab: &Lab) -> Vec<Value> {
    let out = cli(db, Some(lab), &["sessions", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("sessions --json")
}

/// Whether a connection can take the database's write lock at once.
fn write_lock_is_free(db: &std::path::Path) -> bool {
    let conn = rusqlite::Connection::open(db).expect("open the state database");
    conn.busy_timeout(Duration::ZERO).expect("busy timeout");
    conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").is_ok()
}

#[test]
fn a_second_process_takes_over_a_frozen_engines_session_after_its_lease_and_not_before() {
    const TTL: Duration = Duration::from_secs(3);
    let lab = Lab::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state.db");
    let config = dir.path().join("target.yaml");
    let yaml = lab
        .target_yaml("")
        .replace("sshTimeout: 30s", "sshTimeout: 2m")
        // Mostly idle between tries.
        .replace("retryInterval: 100ms", "retryInterval: 5s");
    std::fs::write(&config, format!("ec2Target:\n{yaml}")).expect("config");
    // SSH refused: the first process waits for it.
    lab.call("POST", "/ssh", Some(json!({"mode": "closed"})));
    let mut first = cli_command(&db, Some(&lab), &["provision", "--config"])
        .arg(&config)
        .args(["--lease-ttl", "3s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn provision");
    let started = Instant::now();
    let session = loop {
        let waiting = sessions_json(&db, &lab)
            .into_iter()
            .find(|s| s["phase"] == "WaitingForSsh");
        if let Some(s) = waiting {
            break s["session_id"].as_str().expect("id").to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never waited for SSH"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Frozen, not gone: its PID lives, its heartbeat stops. Frozen between
    // two writes: frozen inside one, it would hold the database's write
    // lock, and no process could write until it ran again.
    let pid = first.id().to_string();
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {name} {pid}");
    };
    let frozen = loop {
        signal("-STOP");
        if write_lock_is_free(&db) {
            break Instant::now();
        }
        signal("-CONT");
        std::thread::sleep(Duration::from_millis(10));
    };
    lab.call("POST", "/ssh", Some(json!({"mode": "open"})));
    let mut refused = 0;
    let taken_after = loop {
        let tried = frozen.elapsed();
        let out = cli(&db, Some(&lab), &["--lease-ttl", "3s", "recover"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains(&format!("session {session} is Ready")) {
            break tried;
        }
        assert!(
            text.contains("being driven by another process"),
            "neither refused nor taken over: {out:?}"
        );
        // The last heartbeat was at most TTL/3 before the freeze.
        assert!(
            tried < TTL + Duration::from_secs(2),
            "not taken over in time"
        );
        refused += 1;
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = first.kill();
    let _ = first.wait();
    assert!(refused > 0, "taken over at once, while the lease was live");
    assert!(
        taken_after >= TTL * 2 / 3,
        "taken over {taken_after:?} after the freeze, before the lease could expire"
    );
    // One instance, now driven by the second process to Ready.
    assert_eq!(lab.live_instances_of(&session).len(), 1);
    assert_eq!(lab.count("RunInstances"), 1);
}
