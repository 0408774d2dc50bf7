//! Readiness to the letter of the specification, against the lab: EC2
//! status checks beside the SSH check, the address the check uses, and the
//! trust handed to the user's own OpenSSH client.

use std::process::Command;
use std::sync::{Arc, Mutex};

use acode_ec2::driver::EngineError;
use acode_ec2::events::{NoProgress, ReadyInstance};
use acode_ec2::machine::{CheckState, Input, PhaseKind};
use acode_ec2::store::CheckpointStore;
use serde_json::json;

use crate::common::{Harness, request};
use crate::lab::Lab;

/// The status reports and SSH answers the session's log recorded, in order:
/// `S` for a verified SSH login, the instance check's state for a report.
async fn readiness_trace(harness: &Harness, session_id: &str) -> Vec<String> {
    harness
        .outcomes(session_id)
        .await
        .into_iter()
        .filter_map(|input| match input {
            Input::SshReady { .. } => Some("S".to_string()),
            Input::StatusChecksReported { report } => Some(report.instance.as_str().to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn ready_waits_for_the_status_checks_polled_beside_ssh() {
    let lab = Lab::start();
    // SSH answers at once; the status checks stay initializing for 1.5 s.
    lab.configure(json!({"status_ok_delay_s": 1.5}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let ready = engine
        .provision(lab.request(""), &NoProgress)
        .await
        .expect("Ready");
    lab.assert_trusted(&ready);
    let trace = readiness_trace(&harness, &ready.session_id).await;
    // Initializing before and after the login, and Ready only on "ok".
    let login = trace.iter().position(|t| t == "S").expect("an SSH login");
    assert!(
        trace[..login].contains(&"initializing".to_string()),
        "the checks were not polled beside SSH: {trace:?}"
    );
    assert_eq!(trace.last().map(String::as_str), Some("ok"), "{trace:?}");
    assert!(
        lab.count("DescribeInstanceStatus") >= 2,
        "{:?}",
        lab.counters()
    );
}

/// The lab's request with 2 s to become Ready after running.
fn short_readiness(lab: &Lab) -> acode_ec2::request::ProvisionRequest {
    request(
        &lab.target_yaml("")
            .replace("sshTimeout: 30s", "sshTimeout: 2s"),
    )
}

#[tokio::test]
async fn status_checks_that_do_not_pass_fail_the_session_with_the_details_and_clean_up() {
    let lab = Lab::start();
    lab.configure(json!({"status_ok_delay_s": 0.2, "status_mode": "impaired"}));
    let harness = Harness::new();
    let err = harness
        .engine(lab.effects())
        .provision(short_readiness(&lab), &NoProgress)
        .await
        .unwrap_err();
    let EngineError::ProvisionFailed { session_id, reason } = err else {
        panic!("expected a failed session, got {err}");
    };
    assert!(
        reason.contains("status checks did not pass")
            && reason.contains("instance status impaired")
            && reason.contains("a new instance"),
        "{reason}"
    );
    assert!(lab.live_instances_of(&session_id).is_empty());

    // Checks still initializing at the deadline: the hint is the setting.
    lab.configure(json!({"status_ok_delay_s": 60.0, "status_mode": "ok"}));
    let err = harness
        .engine(lab.effects())
        .provision(short_readiness(&lab), &NoProgress)
        .await
        .unwrap_err();
    let EngineError::ProvisionFailed { session_id, reason } = err else {
        panic!("expected a failed session, got {err}");
    };
    assert!(
        reason.contains("instance status initializing")
            && reason.contains("statusChecks: not-impaired"),
        "{reason}"
    );
    assert!(lab.live_instances_of(&session_id).is_empty());
}

#[tokio::test]
async fn not_impaired_is_ready_while_the_checks_initialize_and_skip_never_asks() {
    let lab = Lab::start();
    // The checks would take a minute to pass.
    lab.configure(json!({"status_ok_delay_s": 60.0}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let ready = engine
        .provision(lab.request("  statusChecks: not-impaired\n"), &NoProgress)
        .await
        .expect("Ready");
    let trace = readiness_trace(&harness, &ready.session_id).await;
    assert!(trace.iter().all(|t| t != "ok"), "{trace:?}");
    assert!(
        trace.contains(&CheckState::Initializing.as_str().to_string()),
        "{trace:?}"
    );

    let before = lab.count("DescribeInstanceStatus");
    let ready = engine
        .provision(lab.request("  statusChecks: skip\n"), &NoProgress)
        .await
        .expect("Ready");
    lab.assert_trusted(&ready);
    assert_eq!(lab.count("DescribeInstanceStatus"), before);
}

/// A lab config for an instance without a public IP, reached (or not) by
/// the address `ssh.address` picks: no endpoint override.
fn private_target(lab: &Lab, address: &str) -> String {
    let yaml = lab.target_yaml("");
    let head = yaml
        .split("  ssh:\n")
        .next()
        .unwrap_or_default()
        .to_string();
    head + &format!(
        "  ssh:\n    user: {}\n    port: {}\n    address: {address}\n    retryInterval: 100ms\n",
        lab.info.ssh_user, lab.info.sshd_port
    )
}

#[tokio::test]
async fn a_private_only_instance_is_reached_through_its_private_address() {
    let lab = Lab::start();
    // The lab's private address is 127.0.0.1 (its sshd); there is no public IP.
    lab.configure(json!({"address_mode": "private-loopback"}));
    let harness = Harness::new();
    for address in ["auto", "private"] {
        let ready = harness
            .engine(lab.effects())
            .provision(request(&private_target(&lab, address)), &NoProgress)
            .await
            .unwrap_or_else(|e| panic!("ssh.address {address}: {e}"));
        lab.assert_trusted(&ready);
        assert_eq!(ready.public_ip, None);
        assert_eq!(ready.private_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            (ready.ssh_host.as_str(), ready.ssh_port),
            ("127.0.0.1", lab.info.sshd_port)
        );
        let summary = harness.store.summary(&ready.session_id).await.unwrap();
        assert_eq!(summary.ssh_host.as_deref(), Some("127.0.0.1"));
        assert_eq!(summary.ssh_port, Some(lab.info.sshd_port));
        assert_eq!(
            summary.ssh_user.as_deref(),
            Some(lab.info.ssh_user.as_str())
        );
        assert_eq!(
            summary.host_key_fingerprint.as_deref(),
            Some(ready.host_key_fingerprint.as_str())
        );
    }
}

#[tokio::test]
async fn no_usable_address_fails_with_the_fix_and_cleans_up() {
    let lab = Lab::start();
    lab.configure(json!({"address_mode": "private-only"}));
    let harness = Harness::new();
    let err = harness
        .engine(lab.effects())
        .provision(request(&private_target(&lab, "public")), &NoProgress)
        .await
        .unwrap_err();
    let EngineError::ProvisionFailed { session_id, reason } = err else {
        panic!("expected a failed session, got {err}");
    };
    assert!(
        reason.contains("no public IP") && reason.contains("ssh.address: private"),
        "{reason}"
    );
    assert!(lab.live_instances_of(&session_id).is_empty());
}

/// Runs the real OpenSSH client against the lab's sshd with only the
/// session's known_hosts file to trust; whether `true` ran.
fn openssh_login(ready: &ReadyInstance, known_hosts: &str) -> std::process::Output {
    Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-o", "StrictHostKeyChecking=yes", "-o"])
        .arg(format!("UserKnownHostsFile={known_hosts}"))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
        ])
        .arg("-i")
        .arg(ready.key_path.as_deref().expect("key file"))
        .arg("-p")
        .arg(ready.ssh_port.to_string())
        .arg(format!("{}@{}", ready.ssh_user, ready.ssh_host))
        .arg("true")
        .output()
        .expect("run ssh")
}

#[tokio::test]
async fn the_known_hosts_file_lets_openssh_in_and_refuses_another_key() {
    let lab = Lab::start();
    let harness = Harness::new();
    let ready_hook = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&ready_hook);
    let engine = harness
        .engine(lab.effects())
        .on_ready(move |ready| seen.lock().unwrap().push(ready.clone()));
    let ready = engine
        .provision(lab.request(""), &NoProgress)
        .await
        .expect("Ready");
    // The library hook fired once, with what the caller got back.
    assert_eq!(*ready_hook.lock().unwrap(), vec![ready.clone()]);

    let known_hosts = ready.known_hosts_path.clone().expect("a known_hosts file");
    let text = std::fs::read_to_string(&known_hosts).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with(&format!("[127.0.0.1]:{} ", lab.info.sshd_port)),
        "{text}"
    );
    assert!(
        ready.ssh_command().contains("StrictHostKeyChecking=yes"),
        "{}",
        ready.ssh_command()
    );
    let out = openssh_login(&ready, &known_hosts);
    assert!(
        out.status.success(),
        "ssh refused the verified key: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same file with another key for that host: OpenSSH must refuse.
    let other = tempfile::tempdir().unwrap();
    let keygen = other.path().join("other");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&keygen)
        .status()
        .unwrap();
    assert!(made.success());
    let other_key = std::fs::read_to_string(keygen.with_extension("pub")).unwrap();
    let other_key: Vec<&str> = other_key.split_whitespace().take(2).collect();
    let wrong = other.path().join("known_hosts");
    let host = text.split_whitespace().next().unwrap();
    std::fs::write(&wrong, format!("{host} {}\n", other_key.join(" "))).unwrap();
    let out = openssh_login(&ready, wrong.to_str().unwrap());
    assert!(!out.status.success(), "ssh accepted a key it was not given");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HOST IDENTIFICATION HAS CHANGED")
            || String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Teardown removes the trust with the instance.
    assert_eq!(
        engine
            .teardown(&ready.session_id, &NoProgress)
            .await
            .unwrap(),
        PhaseKind::TornDown
    );
    assert!(!std::path::Path::new(&known_hosts).exists());
    assert_eq!(ready_hook.lock().unwrap().len(), 1, "the hook fired again");
}
