//! Spot interruptions against the lab (#10): the watcher reads the notice
//! from the instance's metadata service over the real sshd, or from the EC2
//! API when SSH is down; the hook and the shutdown command run before the
//! notice time; the session ends Interrupted with nothing left; a
//! replacement is started and linked; a watcher killed during the shutdown
//! command is finished by `recover`, with no orphan and no second
//! replacement.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acode_ec2::clock::wall_clock;
use acode_ec2::driver::{Engine, InterruptionHook, ReadyInstance, WatchOptions};
use acode_ec2::effects::AwsEffects;
use acode_ec2::effects::ssh::{self, Probe};
use acode_ec2::events::{InterruptedInstance, NoProgress, ProvisionEvent};
use acode_ec2::machine::{ConsoleFingerprints, PhaseKind, ProvisionPhase};
use acode_ec2::net_guard::ConnectGuard;
use acode_ec2::store::CheckpointStore;
use serde_json::{Value, json};

use crate::cli::{cli, cli_command, config_file};
use crate::common::{Harness, request};
use crate::lab::Lab;

/// A spot session's config with a shutdown command that leaves `marker`.
fn interrupt_yaml(lab: &Lab, marker: &str, extra: &str) -> String {
    lab.target_yaml(&format!(
        "  useSpot: true\n  spotInterruption:\n    metadataUrl: {imds}\n    \
         shutdownCommand: \"echo $(date +%s%3N) > {marker}\"\n{extra}",
        imds = lab.info.imds_endpoint,
    ))
}

fn watch_fast() -> WatchOptions {
    WatchOptions {
        interval: Duration::from_millis(200),
        until_idle: true,
        ..WatchOptions::default()
    }
}

/// EC2 gives notice on the instance, `notice_s` ahead.
fn interrupt(lab: &Lab, instance_id: &str, notice_s: f64) -> Value {
    lab.call(
        "POST",
        "/spot/interrupt",
        Some(json!({"instance_id": instance_id, "notice_s": notice_s})),
    )
}

/// Reads a file on "the instance" over SSH, trusting only the verified key.
async fn read_over_ssh(ready: &ReadyInstance, path: &str) -> String {
    let trusted = ConsoleFingerprints(vec![ready.host_key_fingerprint.clone()]);
    let probe = Probe {
        endpoint: &ready.ssh_endpoint,
        user: &ready.ssh_user,
        private_key_path: ready.key_path.as_deref(),
        trusted: Some(&trusted),
    };
    let run = ssh::run_command(
        ConnectGuard::loopback_only(),
        probe,
        &format!("cat {path}"),
        Duration::from_secs(10),
    )
    .await
    .expect("ssh cat");
    assert_eq!(run.exit_status, Some(0), "cat {path}");
    String::from_utf8_lossy(&run.stdout).trim().to_string()
}

/// What the hook was told, and when (ms since the epoch).
type HookCalls = Arc<Mutex<Vec<(InterruptedInstance, u64)>>>;

/// Records the hook's calls.
fn recording_hook() -> (InterruptionHook, HookCalls) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let hook: InterruptionHook = Arc::new(move |at: InterruptedInstance| {
        let seen = seen.clone();
        Box::pin(async move {
            seen.lock().unwrap().push((at, wall_clock().0));
        })
    });
    (hook, calls)
}

/// An on-demand session (not watched): an SSH login to the lab's host.
async fn provision_on_demand(lab: &Lab, engine: &Engine<AwsEffects>) -> ReadyInstance {
    engine
        .provision(lab.request(""), &NoProgress)
        .await
        .expect("Ready")
}

async fn provision(lab: &Lab, engine: &Engine<AwsEffects>, yaml: &str) -> ReadyInstance {
    let ready = engine
        .provision(request(yaml), &NoProgress)
        .await
        .expect("Ready");
    assert!(ready.was_spot);
    lab.assert_trusted(&ready);
    ready
}

#[tokio::test]
async fn a_notice_read_over_ssh_runs_the_hook_and_the_shutdown_command_then_cleans_up() {
    let lab = Lab::start();
    let harness = Harness::new();
    let marker = harness.dir.path().join("shutdown-ran");
    let marker = marker.to_str().unwrap();
    let (hook, calls) = recording_hook();
    let engine = harness.engine(lab.effects()).on_interruption(hook);
    let mut events = engine.subscribe();
    let ready = provision(&lab, &engine, &interrupt_yaml(&lab, marker, "")).await;

    let options = watch_fast();
    let watching = engine.watch(&options, &NoProgress);
    let noticed_at = Arc::new(Mutex::new(None));
    let give_notice = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let answer = interrupt(&lab, &ready.instance_id, 30.0);
        *noticed_at.lock().unwrap() = Some((Instant::now(), wall_clock().0));
        answer
    };
    let (watched, _) = tokio::join!(watching, give_notice);
    let watched = watched.expect("watch");
    let (given, given_ms) = noticed_at.lock().unwrap().expect("notice given");

    assert_eq!(watched.len(), 1, "{watched:?}");
    let item = &watched[0];
    let notice = item.notice.as_ref().expect("a notice");
    assert_eq!(notice.source, "the instance's metadata service");
    assert_eq!(notice.action, "terminate");
    assert!(
        matches!(item.settled, Ok(PhaseKind::Interrupted)),
        "{item:?}"
    );
    // The event came through the metadata service, well before EC2 acts.
    let seen = std::iter::from_fn(|| events.try_recv().ok()).find_map(|e| match e {
        ProvisionEvent::InterruptionNotice { time_ms, .. } => Some(time_ms),
        _ => None,
    });
    let time_ms = seen.expect("an InterruptionNotice event");
    eprintln!(
        "notice seen {:?} after it was given (watch interval 200 ms)",
        given.elapsed()
    );
    // The hook ran before the notice time, with the instance to act on.
    let calls = calls.lock().unwrap().clone();
    let [(told, hook_at)] = calls.as_slice() else {
        panic!("{calls:?}")
    };
    assert_eq!(told.instance_id, ready.instance_id);
    assert_eq!(told.time_ms, time_ms);
    assert!(*hook_at < time_ms);
    // So did the shutdown command, on the instance. Its key is gone with
    // the cleanup, so the marker is read over SSH as another session of the
    // same lab host (sshd) sees it.
    let other = provision_on_demand(&lab, &engine).await;
    let ran_at: u64 = read_over_ssh(&other, marker)
        .await
        .parse()
        .expect("the shutdown command left its time");
    assert!(
        ran_at >= given_ms && ran_at < time_ms,
        "{ran_at} {given_ms} {time_ms}"
    );
    // Nothing is left: instance, key pair, key file.
    assert!(lab.live_instances_of(&ready.session_id).is_empty());
    assert!(!std::path::Path::new(ready.key_path.as_deref().unwrap()).exists());
    let session = harness.store.load(&ready.session_id).await.unwrap();
    let ProvisionPhase::Interrupted(end) = &session.state.phase else {
        panic!("{:?}", session.state.phase)
    };
    assert!(
        end.reason.contains("shutdown command: exited 0"),
        "{}",
        end.reason
    );
    assert_eq!(end.replacement, None);
}

#[tokio::test]
async fn with_sshd_down_the_notice_comes_through_the_ec2_api() {
    let lab = Lab::start();
    let harness = Harness::new();
    let marker = harness.dir.path().join("never");
    let engine = harness.engine(lab.effects());
    let yaml = interrupt_yaml(&lab, marker.to_str().unwrap(), "");
    let ready = provision(&lab, &engine, &yaml).await;
    // Proof the SSH path works before it is taken away: read over SSH.
    assert!(!read_over_ssh(&ready, "/etc/hostname").await.is_empty());
    lab.call(
        "POST",
        "/ssh",
        Some(json!({"mode": "closed", "drop_sessions": true})),
    );
    interrupt(&lab, &ready.instance_id, 30.0);
    let watched = engine.watch(&watch_fast(), &NoProgress).await.unwrap();
    let notice = watched[0].notice.as_ref().expect("notice");
    assert!(
        notice.source.contains("EC2 API") && notice.source.contains("marked-for-termination"),
        "{notice:?}"
    );
    assert!(matches!(watched[0].settled, Ok(PhaseKind::Interrupted)));
    // The command could not run with SSH down; cleanup went on regardless.
    assert!(!marker.exists());
    assert!(lab.live_instances_of(&ready.session_id).is_empty());
}

#[tokio::test]
async fn replace_starts_a_linked_session_that_takes_over() {
    let lab = Lab::start();
    let harness = Harness::new();
    let marker = harness.dir.path().join("shutdown-ran");
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let yaml = interrupt_yaml(&lab, marker.to_str().unwrap(), "    replace: true\n");
    let ready = provision(&lab, &engine, &yaml).await;
    interrupt(&lab, &ready.instance_id, 30.0);
    let watched = engine.watch(&watch_fast(), &NoProgress).await.unwrap();
    let replacement = watched[0].replacement.as_ref().expect("a replacement");
    assert_eq!(replacement.session_id, format!("{}-r1", ready.session_id));
    assert!(
        matches!(replacement.result, Ok(PhaseKind::Ready)),
        "{replacement:?}"
    );
    assert!(
        std::iter::from_fn(|| events.try_recv().ok()).any(|e| matches!(
            e,
            ProvisionEvent::SessionReplaced { replacement: r, .. } if r == replacement.session_id
        ))
    );
    // Linked both ways in `status --json`.
    let db = harness.dir.path().join("state.db");
    let status = |id: &str| -> Value {
        let out = cli(&db, Some(&lab), &["status", id, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let old = status(&ready.session_id);
    assert_eq!(old["phase"], "Interrupted");
    assert_eq!(old["replaced_by"], replacement.session_id.as_str());
    let new = status(&replacement.session_id);
    assert_eq!(new["phase"], "Ready");
    assert_eq!(new["replaces"], ready.session_id.as_str());
    // Spot just ran out in the only zone and fallback is allowed: on demand.
    let live = lab.live_instances_of(&replacement.session_id);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0]["lifecycle"], "on-demand");
    assert!(lab.live_instances_of(&ready.session_id).is_empty());
    engine
        .teardown(&replacement.session_id, &NoProgress)
        .await
        .unwrap();
}

#[test]
fn a_watcher_killed_during_the_shutdown_command_is_finished_by_recover() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let marker = dir.path().join("shutdown-ran");
    // The shutdown command takes 3 s: long enough to kill the watcher in it.
    let yaml = lab.target_yaml(&format!(
        "  useSpot: true\n  spotInterruption:\n    metadataUrl: {imds}\n    \
         shutdownCommand: \"sleep 3; echo done >> {marker}\"\n    replace: true\n",
        imds = lab.info.imds_endpoint,
        marker = marker.display(),
    ));
    let config = config_file(dir.path(), "spot.yaml", &yaml);
    let out = cli(
        &db,
        Some(&lab),
        &["provision", "--json", "--config", config.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ready: Value = serde_json::from_slice(&out.stdout).unwrap();
    let session = ready["session_id"].as_str().unwrap().to_string();
    let instance = ready["instance_id"].as_str().unwrap().to_string();

    let mut watcher = cli_command(
        &db,
        Some(&lab),
        &["watch", "--until-idle", "--interval", "200ms"],
    )
    .env("ACODE_EC2_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    interrupt(&lab, &instance, 60.0);
    // Wait until the shutdown command is running, then kill -9 the watcher.
    let stderr = watcher.stderr.take().unwrap();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("Interrupting") && line.contains("running the shutdown command") {
            break;
        }
    }
    watcher.kill().unwrap();
    watcher.wait().unwrap();
    let status = cli(&db, Some(&lab), &["status", &session, "--json"]);
    let phase: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(phase["phase"], "Interrupting", "killed mid-command");

    let out = cli(&db, Some(&lab), &["recover"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = |id: &str| -> Value {
        let out = cli(&db, Some(&lab), &["status", id, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(status(&session)["phase"], "Interrupted");
    let replacement = format!("{session}-r1");
    assert_eq!(status(&replacement)["phase"], "Ready");
    // Exactly two sessions: no second replacement.
    let sessions: Value =
        serde_json::from_slice(&cli(&db, Some(&lab), &["sessions", "--json"]).stdout).unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 2, "{sessions}");
    // No orphan: only the replacement's instance is alive.
    assert!(lab.live_instances_of(&session).is_empty());
    assert_eq!(lab.live_instances_of(&replacement).len(), 1);
    // The command finished on the resumed run (it ran again from the start).
    assert!(std::fs::read_to_string(&marker).unwrap().contains("done"));
    assert!(
        cli(&db, Some(&lab), &["teardown", &replacement])
            .status
            .success()
    );
}

/// A session the store cannot read (its row damaged) is skipped with a
/// warning; the watcher still acts on the others' notices.
#[tokio::test]
async fn a_damaged_session_does_not_stop_the_watcher_acting_on_another() {
    let lab = Lab::start();
    let harness = Harness::new();
    let marker = harness.dir.path().join("never");
    let engine = harness.engine(lab.effects());
    let yaml = interrupt_yaml(&lab, marker.to_str().unwrap(), "");
    let damaged = provision(&lab, &engine, &yaml).await;
    let noticed = provision(&lab, &engine, &yaml).await;
    rusqlite::Connection::open(harness.dir.path().join("state.db"))
        .unwrap()
        .execute(
            "UPDATE events SET body_json = '{' WHERE kind = 'transition' AND body_json LIKE ?1",
            [format!("%{}%", damaged.instance_id)],
        )
        .unwrap();
    assert!(harness.store.load(&damaged.session_id).await.is_err());
    interrupt(&lab, &noticed.instance_id, 30.0);
    let watched = engine.watch(&watch_fast(), &NoProgress).await.unwrap();
    assert_eq!(watched.len(), 1, "{watched:?}");
    assert_eq!(watched[0].session_id, noticed.session_id);
    assert!(matches!(watched[0].settled, Ok(PhaseKind::Interrupted)));
    assert!(lab.live_instances_of(&noticed.session_id).is_empty());
}
