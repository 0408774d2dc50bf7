//! What an operator sees: metrics (file and scrape), JSON logs, where the
//! time went, and a scan for private key material in all of it.

use std::io::BufRead;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::cli::{cli, cli_command, config_file, text};
use crate::lab::{Lab, http};

#[test]
fn a_provision_writes_its_metrics_and_json_logs_and_status_shows_the_phases() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = config_file(dir.path(), "target.yaml", &lab.target_yaml(""));
    let metrics = dir.path().join("acode.prom");
    let out = cli_command(
        &db,
        Some(&lab),
        &[
            "--log-format",
            "json",
            "--metrics-file",
            metrics.to_str().unwrap(),
            "provision",
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .env("ACODE_EC2_LOG", "info")
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Every log line is a JSON object; the session's span names it, its
    // phase and instance; each EC2 call says its action, duration, request
    // id and error code.
    let lines: Vec<Value> = text(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let call = lines
        .iter()
        .find(|l| l["fields"]["action"] == "RunInstances")
        .expect("a RunInstances log line");
    for field in ["duration_ms", "request_id", "error_code"] {
        assert!(!call["fields"][field].is_null(), "{field} missing: {call}");
    }
    assert_eq!(call["span"]["name"], "session");
    assert!(call["span"]["session_id"].is_string(), "{call}");
    let late = lines
        .iter()
        .rev()
        .find(|l| l["span"]["instance_id"].is_string())
        .expect("a line with the instance in its span");
    assert!(late["span"]["phase"].is_string(), "{late}");

    // The CLI's own lines (an error here) are JSON objects too.
    let out = cli(&db, Some(&lab), &["--log-format", "json", "status", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let error: Value = serde_json::from_str(text(&out.stderr).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stderr)));
    assert_eq!(error["level"], "ERROR");
    assert!(
        error["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("no session nope")),
        "{error}"
    );

    let text_metrics = std::fs::read_to_string(&metrics).expect("metrics file");
    for part in [
        "acode_ec2_time_to_settle_seconds_count{outcome=\"ready\",capacity=\"on_demand\"} 1",
        "acode_ec2_phase_seconds_count{phase=\"WaitingForSsh\"",
        "acode_ec2_ec2_calls_total{action=\"RunInstances\",result=\"ok\"} 1",
        "acode_ec2_sessions{phase=\"Ready\"} 1",
        // Histograms, as the README says, not quantile summaries.
        "# TYPE acode_ec2_time_to_settle_seconds histogram",
        "# TYPE acode_ec2_phase_seconds histogram",
        "# TYPE acode_ec2_ec2_call_seconds histogram",
        "acode_ec2_ec2_call_seconds_bucket{action=\"RunInstances\",le=\"0.5\"}",
    ] {
        assert!(
            text_metrics.contains(part),
            "{part} missing:\n{text_metrics}"
        );
    }

    // Where the time went, read from the event log.
    let out = cli(&db, Some(&lab), &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let phases = status["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().filter_map(|p| p["phase"].as_str()).collect();
    assert_eq!(
        names,
        [
            "Validating",
            "PreparingKeyPair",
            "ChoosingPlacement",
            "Launching",
            "WaitingForRunning",
            "WaitingForSsh",
            "Ready"
        ]
    );
    assert!(
        phases[..6]
            .iter()
            .all(|p| p["duration_ms"].is_u64() && p["attempts"].as_u64() >= Some(1))
    );
    assert!(
        phases[6]["duration_ms"].is_null(),
        "the phase it is in has no end yet"
    );
    let out = cli(&db, Some(&lab), &["status"]);
    let shown = text(&out.stdout);
    assert!(
        shown.contains("phases") && shown.contains("WaitingForRunning"),
        "{shown}"
    );
    let session = status["session_id"].as_str().unwrap().to_string();
    assert!(
        cli(&db, Some(&lab), &["teardown", &session])
            .status
            .success()
    );
}

/// A free loopback port, for a listener the test starts next.
fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

#[test]
fn a_long_recover_serves_its_metrics_on_loopback() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    // SSH is tried every second (so 30 tries outlast the wait).
    let yaml = lab
        .target_yaml("")
        .replace("retryInterval: 100ms", "retryInterval: 1s");
    let config = config_file(dir.path(), "target.yaml", &yaml);
    // sshd comes up 8 s after the launch: the session waits for it.
    lab.configure(serde_json::json!({"ssh_start_delay_s": 8.0}));
    let mut provision = cli_command(
        &db,
        Some(&lab),
        &["provision", "--config", config.to_str().unwrap()],
    )
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let stderr = provision.stderr.take().unwrap();
    for line in std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
    {
        if line.contains("s] WaitingForSsh ") {
            break;
        }
    }
    // kill -9: the session is left mid-way for recover.
    provision.kill().unwrap();
    provision.wait().unwrap();

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let recover = cli_command(&db, Some(&lab), &["--metrics-listen", &listen, "recover"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut scraped = String::new();
    for _ in 0..100 {
        if std::net::TcpStream::connect(&listen).is_ok() {
            let (status, body) = http(&format!("http://{listen}"), "GET", "/metrics", &[], "");
            if status == 200 && body.contains("acode_ec2_sessions{phase=\"WaitingForSsh\"} 1") {
                scraped = body;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = recover.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    // What recover still has to call depends on where the kill landed; the
    // live gauge is what only a serving endpoint can show.
    assert!(!scraped.is_empty(), "no scrape showed the waiting session");
    let out = cli(&db, Some(&lab), &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["phase"], "Ready");
    let session = status["session_id"].as_str().unwrap().to_string();
    assert!(
        cli(&db, Some(&lab), &["teardown", &session])
            .status
            .success()
    );
}
