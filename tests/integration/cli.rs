//! The `acode-ec2` binary: its contract from DESIGN.md section 4.

use std::process::{Command, Output};

use serde_json::Value;

use crate::lab::Lab;

pub fn cli(state_db: &std::path::Path, lab: Option<&Lab>, args: &[&str]) -> Output {
    cli_command(state_db, lab, args)
        .output()
        .expect("run acode-ec2")
}

/// `acode-ec2 ARGS` with test credentials, the loopback guard and the lab.
pub fn cli_command(state_db: &std::path::Path, lab: Option<&Lab>, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_acode-ec2"));
    command
        .args(args)
        .env("ACODE_EC2_STATE_DB", state_db)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("ACODE_EC2_LOOPBACK_ONLY", "1")
        // Would make the SDK drop AWS_ENDPOINT_URL_EC2 and go to real AWS:
        // the guard pins the checked endpoint, so every test here proves it.
        .env("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
        .env_remove("AWS_PROFILE");
    match lab {
        Some(lab) => command.env("AWS_ENDPOINT_URL_EC2", &lab.info.ec2_endpoint),
        None => command.env_remove("AWS_ENDPOINT_URL_EC2"),
    };
    command
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_command_of_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&dir.path().join("s.db"), None, &["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in [
        "provision",
        "status",
        "sessions",
        "teardown",
        "recover",
        "diagram",
        "--state-db",
        "ACODE_EC2_STATE_DB",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }
}

/// `acode-ec2 sessions | head -1`: a reader that left before the output
/// ends the command quietly, not with a panic (Rust ignores SIGPIPE, so
/// `println!` would panic on the closed pipe).
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    for args in [
        &["diagram", "--format", "dot"][..],
        &["iam-policy"],
        &["sessions"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        // Closed before the command starts: its first write fails for sure.
        drop(reader);
        let out = cli_command(&db, None, args)
            .stdout(writer)
            .output()
            .expect("run acode-ec2");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Output lost another way (a full disk) is a failure, said once.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = cli_command(&db, None, &["diagram", "--format", "dot"])
        .stdout(full)
        .output()
        .expect("run acode-ec2");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("cannot write to standard output").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_config_with_an_unknown_key_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(&config, "ec2Target:\n  amiId: ami-1\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n  colour: blue\n").unwrap();
    let db = dir.path().join("s.db");
    let out = cli(
        &db,
        None,
        &["provision", "--config", config.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("colour"),
        "{}",
        text(&out.stderr)
    );
    assert!(!db.exists(), "a refused config created the state database");
}

#[test]
fn without_a_loopback_endpoint_the_guard_refuses_to_build_a_client() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ok.yaml");
    std::fs::write(
        &config,
        "ec2Target:\n  amiId: ami-1\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n",
    )
    .unwrap();
    let out = cli(
        &dir.path().join("s.db"),
        None,
        &["provision", "--config", config.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("AWS_ENDPOINT_URL_EC2"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn without_static_test_credentials_the_guard_refuses_to_build_a_client() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let out = Command::new(env!("CARGO_BIN_EXE_acode-ec2"))
        .args(["recover"])
        .env("ACODE_EC2_STATE_DB", &db)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("ACODE_EC2_LOOPBACK_ONLY", "1")
        .env("AWS_ENDPOINT_URL_EC2", &lab.info.ec2_endpoint)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("run acode-ec2");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    assert!(!db.exists());
}

#[test]
fn reading_commands_do_not_create_a_state_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never.db");
    let out = cli(&db, None, &["sessions", "--json"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "[]");
    let out = cli(&db, None, &["status"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no sessions yet"),
        "{}",
        text(&out.stderr)
    );
    assert!(!db.exists());
}

#[test]
fn teardown_and_recover_without_a_state_database_create_none() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("typo/never.db");
    let out = cli(&db, Some(&lab), &["teardown", "no-such-session"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("no session no-such-session") && err.contains("never.db"),
        "{err}"
    );
    let out = cli(&db, Some(&lab), &["recover"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("nothing to recover"));
    // Commands that only read name the path they looked at: a mistyped
    // one is not taken for "nothing here".
    for (args, ok) in [
        (&["sessions"][..], true),
        (&["status"], false),
        (&["status", "s1"], false),
        (&["ssh-config", "s1"], false),
        (&["recover"], true),
        (&["watch", "--until-idle"], true),
    ] {
        let out = cli(&db, Some(&lab), args);
        assert_eq!(out.status.success(), ok, "{args:?}: {out:?}");
        let said = text(&out.stdout) + &text(&out.stderr);
        assert!(
            said.contains("no state database at") && said.contains("never.db"),
            "{args:?}: {said}"
        );
    }
    let out = cli(&db, Some(&lab), &["sessions", "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");
    // A watcher started before the first provision waits for it.
    let mut watch = cli_command(&db, Some(&lab), &["watch", "--interval", "100ms"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(watch.stderr.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.contains("waiting for the first session"), "{first}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(watch.try_wait().unwrap().is_none(), "watch ended: {first}");
    let sent = Command::new("kill")
        .args(["-TERM", &watch.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    assert_eq!(watch.wait().unwrap().code(), Some(130));
    assert!(!db.exists() && !db.parent().unwrap().exists());
}

#[test]
fn diagram_prints_the_checked_in_files() {
    let dir = tempfile::tempdir().unwrap();
    for (format, file) in [("mermaid", "provision.mmd"), ("dot", "provision.dot")] {
        let out = cli(
            &dir.path().join("s.db"),
            None,
            &["diagram", "--format", format],
        );
        let on_disk = std::fs::read_to_string(format!(
            "{}/state-diagrams/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert_eq!(text(&out.stdout), on_disk);
    }
}

#[test]
fn provision_status_sessions_teardown_against_the_lab() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = dir.path().join("target.yaml");
    std::fs::write(&config, format!("ec2Target:\n{}", lab.target_yaml(""))).unwrap();

    let out = cli(
        &db,
        Some(&lab),
        &["provision", "--config", config.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let progress = text(&out.stderr);
    assert!(
        progress.contains("WaitingForRunning") && progress.contains("WaitingForSsh"),
        "no progress lines:\n{progress}"
    );
    assert!(!progress.contains("PRIVATE KEY") && !text(&out.stdout).contains("PRIVATE KEY"));

    let out = cli(&db, Some(&lab), &["status", "--json"]);
    assert!(out.status.success());
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(status["phase"], "Ready");
    for field in [
        "session_id",
        "instance_id",
        "public_ip",
        "key_path",
        "was_spot",
    ] {
        assert!(
            !status[field].is_null(),
            "status --json lacks {field}: {status}"
        );
    }
    let session = status["session_id"].as_str().unwrap().to_string();

    let out = cli(&db, Some(&lab), &["sessions", "--json"]);
    let sessions: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sessions.as_array().map(|a| a.len()), Some(1));

    let out = cli(&db, Some(&lab), &["teardown", &session]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&db, Some(&lab), &["status", &session, "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["phase"], "TornDown");
    assert!(lab.live_instances_of(&session).is_empty());
    // Only a finished session in the database: no tally of nothing.
    let out = cli(&db, Some(&lab), &["recover"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "nothing to recover");
    assert!(!text(&out.stderr).contains("0/0"), "{}", text(&out.stderr));
    // Shown as history: nothing in it reads as usable.
    let shown = text(&cli(&db, Some(&lab), &["status", &session]).stdout);
    for line in ["instance ", "key ", "ssh ", "host key "] {
        let found = shown
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_default();
        assert!(
            found.ends_with("(gone)") || found.ends_with("(deleted)"),
            "{line}: {shown}"
        );
    }

    let out = cli(&db, Some(&lab), &["status", "no-such-session"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no session no-such-session"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn on_ready_gets_the_instance_and_ssh_config_trusts_only_the_verified_key() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = dir.path().join("target.yaml");
    std::fs::write(&config, format!("ec2Target:\n{}", lab.target_yaml(""))).unwrap();
    let seen = dir.path().join("on-ready.env");
    let hook = format!("env | grep ^ACODE_ | sort > {}", seen.display());
    let out = cli(
        &db,
        Some(&lab),
        &[
            "provision",
            "--config",
            config.to_str().unwrap(),
            "--on-ready",
            &hook,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("StrictHostKeyChecking=yes"),
        "no ssh line: {}",
        text(&out.stdout)
    );
    let env = std::fs::read_to_string(&seen).expect("the hook ran");
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing:\n{env}"))
            .to_string()
    };
    let session = var("ACODE_SESSION_ID");
    assert_eq!(var("ACODE_SSH_HOST"), "127.0.0.1");
    assert_eq!(var("ACODE_SSH_PORT"), lab.info.sshd_port.to_string());
    assert_eq!(var("ACODE_SSH_USER"), lab.info.ssh_user);
    assert!(
        lab.info
            .host_key_fingerprints
            .contains(&var("ACODE_HOST_KEY_FINGERPRINT"))
    );
    assert!(std::path::Path::new(&var("ACODE_KEY_PATH")).exists());
    assert!(std::path::Path::new(&var("ACODE_KNOWN_HOSTS")).exists());
    assert!(var("ACODE_INSTANCE_ID").starts_with("i-"));

    let out = cli(&db, Some(&lab), &["status", &session, "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["ssh_host", "ssh_port", "ssh_user", "host_key_fingerprint"] {
        assert!(
            !status[field].is_null(),
            "status --json lacks {field}: {status}"
        );
    }

    // The Host block works as is with OpenSSH, trusting only that key.
    let out = cli(&db, Some(&lab), &["ssh-config", &session]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let block = text(&out.stdout);
    assert!(block.contains("StrictHostKeyChecking yes"), "{block}");
    let ssh_config = dir.path().join("ssh_config");
    std::fs::write(&ssh_config, &block).unwrap();
    let login = Command::new("ssh")
        .arg("-F")
        .arg(&ssh_config)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ])
        .arg(format!("acode-{session}"))
        .arg("true")
        .output()
        .expect("run ssh");
    assert!(login.status.success(), "{}", text(&login.stderr));

    // Watching an on-demand session is said to watch nothing.
    let out = cli(&db, Some(&lab), &["watch", &session, "--until-idle"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!(
            "session {session} is Ready on demand: only Ready spot sessions get interruption \
             notices"
        )),
        "{}",
        text(&out.stderr)
    );

    // A failing hook is reported with exit status 3; the instance stays
    // Ready. With --json, what the hook prints goes to stderr: stdout parses.
    let out = cli(
        &db,
        Some(&lab),
        &[
            "provision",
            "--config",
            config.to_str().unwrap(),
            "--json",
            "--on-ready",
            "echo hook-noise; exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let ready: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON alone");
    assert_eq!(ready["ssh_user"], lab.info.ssh_user.as_str());
    assert!(text(&out.stderr).contains("hook-noise"));
    assert!(
        text(&out.stderr).contains("is Ready and tracked"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&db, Some(&lab), &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["phase"], "Ready");

    let out = cli(&db, Some(&lab), &["ssh-config", "no-such-session"]);
    assert!(!out.status.success());
    for id in [session, status["session_id"].as_str().unwrap().to_string()] {
        let out = cli(&db, Some(&lab), &["teardown", &id]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
}

/// `provision --count 2 --on-ready`: a session's hook runs as soon as it is
/// Ready, while the other (its launch held back 3 s) is still on its way.
#[test]
fn each_on_ready_hook_runs_when_its_session_is_ready() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = config_file(dir.path(), "fleet.yaml", &lab.target_yaml(""));
    let log = dir.path().join("hooks.log");
    lab.fault(serde_json::json!({"action": "RunInstances", "latency_ms": 3000, "count": 1}));
    let hook = format!(
        "echo \"$ACODE_SESSION_ID $(date +%s%3N)\" >> {}",
        log.display()
    );
    let out = cli(
        &db,
        Some(&lab),
        &[
            "provision",
            "--config",
            config.to_str().unwrap(),
            "--count",
            "2",
            "--json",
            "--on-ready",
            &hook,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ready: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON array");
    assert_eq!(ready.len(), 2);
    let hooks: Vec<(String, u64)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| {
            let (id, ms) = line.split_once(' ').unwrap();
            (id.to_string(), ms.parse().unwrap())
        })
        .collect();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    let out = cli(&db, Some(&lab), &["sessions", "--json"]);
    let sessions: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let settled = |id: &str| {
        sessions
            .iter()
            .find(|s| s["session_id"] == id)
            .and_then(|s| s["updated_at_ms"].as_u64())
            .unwrap()
    };
    let (first, second) = (&hooks[0], &hooks[1]);
    assert!(
        first.1 < settled(&second.0),
        "the first hook waited for the other session: {hooks:?} {sessions:?}"
    );
    for id in [&first.0, &second.0] {
        let out = cli(&db, Some(&lab), &["teardown", id]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
}

/// Writes `ec2Target:` + `body` to a config file in `dir`.
pub fn config_file(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("ec2Target:\n{body}")).unwrap();
    path
}

#[test]
fn validate_checks_everything_and_creates_nothing() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let good = config_file(
        dir.path(),
        "good.yaml",
        &lab.target_yaml("  useSpot: true\n"),
    );
    // `validate CONFIG`, which must pass: its report.
    let valid = |config: &std::path::Path| {
        let out = cli(
            &db,
            Some(&lab),
            &["validate", "--config", config.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let report = valid(&good);
    for part in [
        lab.info.ami_id.as_str(),
        "us-east-1a",
        "spot",
        "RunInstances    allowed (dry run)",
        "CreateKeyPair allowed",
    ] {
        assert!(report.contains(part), "{part} missing:\n{report}");
    }
    assert!(
        lab.instances().is_empty(),
        "validate launched: {:?}",
        lab.instances()
    );
    assert_eq!(
        lab.call("GET", "/authorized_keys", None),
        serde_json::json!([])
    );
    assert!(!db.exists(), "validate wrote state");

    // Logs to a pipe are plain text: no colour codes for a file to keep.
    let out = cli_command(
        &db,
        Some(&lab),
        &["validate", "--config", good.to_str().unwrap()],
    )
    .env("ACODE_EC2_LOG", "debug")
    .env_remove("NO_COLOR")
    .output()
    .expect("run acode-ec2");
    let logs = text(&out.stderr);
    assert!(logs.contains("DEBUG"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "colour codes in a pipe: {logs}");

    // A failover subnet in a zone without the type (us-east-1e has no t3 in
    // EC2's offerings, and in moto's): valid, with a note naming it.
    let east_1e = lab.subnet("us-east-1e");
    let partly = config_file(
        dir.path(),
        "partly.yaml",
        &lab.target_yaml(&format!("  failoverSubnetIds: [{east_1e}]\n")),
    );
    let report = valid(&partly);
    assert!(
        report.contains(&format!("{east_1e} (us-east-1e) does not offer t3.micro")),
        "{report}"
    );
    assert!(!report.contains("us-east-1a) does not offer"), "{report}");

    // A policy from before validate asked for the offerings: a note, not a
    // refusal of a config that provisions fine.
    lab.fault(
        serde_json::json!({"action": "DescribeInstanceTypeOfferings",
        "code": "UnauthorizedOperation", "count": 1}),
    );
    let report = valid(&good);
    assert!(
        report.contains("the instance type's zones were not checked")
            && report.contains("ec2:DescribeInstanceTypeOfferings"),
        "{report}"
    );

    // Each bad config: exit 1 with what is wrong and what to do.
    let yaml = lab.target_yaml("");
    let subnet = lab.subnet("us-east-1a");
    let cases = [
        (
            yaml.replace(&lab.info.ami_id, "ami-00000000deadbeef0"),
            vec![
                "ami-00000000deadbeef0 was not found in us-east-1",
                "amazon-linux-2",
            ],
        ),
        (
            yaml.replace(&subnet, "subnet-0000000000deadbee"),
            vec![
                "subnet subnet-0000000000deadbee does not exist",
                "subnets that do: subnet-",
            ],
        ),
        (
            yaml.replace(&lab.info.security_group_id, "sg-0000000000deadbee"),
            vec![
                "security group sg-0000000000deadbee does not exist",
                "groups that do: sg-",
            ],
        ),
        (
            yaml.replace("instanceType: t3.micro", "instanceType: t3.bogus"),
            vec![
                "instanceType: t3.bogus is not offered in the zones of your subnets (us-east-1a)",
                "aws ec2 describe-instance-types --instance-types t3.bogus",
            ],
        ),
        (
            format!("{yaml}  keyName: team-key\n  privateKeyPath: /nonexistent\n"),
            vec![
                "key pair team-key does not exist in us-east-1",
                "mode: temporary",
            ],
        ),
    ];
    for (i, (body, expected)) in cases.into_iter().enumerate() {
        let bad = config_file(dir.path(), &format!("bad{i}.yaml"), &body);
        let out = cli(
            &db,
            Some(&lab),
            &["validate", "--config", bad.to_str().unwrap()],
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "case {i}: {}",
            text(&out.stdout)
        );
        let err = text(&out.stderr);
        for part in expected {
            assert!(err.contains(part), "case {i}: {part} missing:\n{err}");
        }
    }

    // Denied: what was denied, how to decode it, where the policy is.
    lab.fault(serde_json::json!({"action": "RunInstances", "code": "UnauthorizedOperation", "count": 1,
        "message": "You are not authorized to perform this operation. Encoded authorization failure message: Zm9vYmFy"}));
    let out = cli(
        &db,
        Some(&lab),
        &["validate", "--config", good.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for part in [
        "ec2:RunInstances",
        "decode-authorization-message --encoded-message Zm9vYmFy",
        "acode-ec2 iam-policy",
    ] {
        assert!(err.contains(part), "{part} missing:\n{err}");
    }
    assert!(lab.instances().is_empty());
    assert!(!db.exists());
}

#[test]
fn iam_policy_prints_a_policy_document() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&dir.path().join("s.db"), None, &["iam-policy"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let policy: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let printed = policy.to_string();
    assert!(printed.contains("ec2:ResourceTag/acode") && printed.contains("aws:RequestTag/acode"));
}

/// Starts `acode-ec2 provision`, waits until its progress shows `phase`,
/// sends it SIGINT `signals` times; its exit code and everything it said.
fn provision_interrupted(
    lab: &Lab,
    db: &std::path::Path,
    config: &std::path::Path,
    phase: &str,
    signals: usize,
    extra: &[&str],
) -> (Option<i32>, String) {
    // A progress line "[  1.2s] Launching …", or "[  1.2s] 1a2b3c4d Launching …" for a fleet.
    let reached = |line: &str| {
        line.starts_with('[') && line.split_whitespace().take(4).any(|word| word == phase)
    };
    provision_interrupted_after(lab, db, config, &reached, signals, extra)
}

/// Starts `acode-ec2 provision`, waits for a line on its stderr that
/// `reached` accepts, sends it SIGINT `signals` times; its exit code and
/// everything it said.
fn provision_interrupted_after(
    lab: &Lab,
    db: &std::path::Path,
    config: &std::path::Path,
    reached: &dyn Fn(&str) -> bool,
    signals: usize,
    extra: &[&str],
) -> (Option<i32>, String) {
    use std::io::BufRead;
    let mut args = vec!["provision", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut child = cli_command(db, Some(lab), &args)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start acode-ec2");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut said = String::new();
    loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("never reached the line awaited:\n{said}"));
        said.push_str(&line);
        said.push('\n');
        if reached(&line) {
            break;
        }
    }
    for _ in 0..signals {
        let sent = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let status = child.wait().expect("wait");
    while let Ok(line) = lines.recv_timeout(std::time::Duration::from_secs(5)) {
        said.push_str(&line);
        said.push('\n');
    }
    (status.code(), said)
}

#[test]
fn a_first_ctrl_c_tears_every_session_of_a_fleet_down() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = config_file(dir.path(), "target.yaml", &lab.target_yaml(""));
    // Launches answer slowly: the signal comes while they are in flight.
    lab.fault(serde_json::json!({"action": "RunInstances", "latency_ms": 3000, "count": 3}));
    let (code, said) = provision_interrupted(&lab, &db, &config, "Launching", 1, &["--count", "3"]);
    assert_eq!(code, Some(130), "{said}");
    assert!(said.contains("tearing every session down"), "{said}");
    assert_nothing_left(&lab, dir.path(), "fleet");
    let out = cli(&db, Some(&lab), &["sessions", "--json"]);
    let sessions: Value = serde_json::from_slice(&out.stdout).unwrap();
    let phases: Vec<&str> = sessions
        .as_array()
        .expect("a list of sessions")
        .iter()
        .filter_map(|s| s["phase"].as_str())
        .collect();
    assert_eq!(phases, ["TornDown"; 3], "{sessions}");
}

/// A second Ctrl-C stops at once, and an --on-ready command still running
/// stops with it rather than outlive the process that started it.
#[test]
fn a_second_ctrl_c_also_ends_a_running_on_ready_command() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = config_file(dir.path(), "target.yaml", &lab.target_yaml(""));
    // One session turns Ready and starts its hook; the other's launch is held.
    lab.fault(serde_json::json!({"action": "RunInstances", "latency_ms": 10000, "count": 1}));
    let hook = "echo \"hook started $$\" >&2; exec sleep 120";
    // The hook writes beside the progress lines, maybe into one.
    let started = |line: &str| line.contains("hook started ");
    let (code, said) = provision_interrupted_after(
        &lab,
        &db,
        &config,
        &started,
        2,
        &["--count", "2", "--on-ready", hook],
    );
    let pid: u32 = said
        .lines()
        .find_map(|l| l.split_once("hook started ").map(|(_, pid)| pid))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hook pid:\n{said}"));
    // The hook's `sleep` is gone, or a zombie no one reaped yet.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(str::to_string)
        });
    if matches!(state.as_deref(), Some(s) if s != "Z" && s != "X") {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("the --on-ready command outlived acode-ec2 (state {state:?}):\n{said}");
    }
    assert_eq!(code, Some(130), "{said}");
    assert!(said.contains("stopped at once"), "{said}");
    let out = cli(&db, Some(&lab), &["recover"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_nothing_left(&lab, dir.path(), "after recover");
}

/// Nothing of any session is left in the lab, and no key file on disk.
fn assert_nothing_left(lab: &Lab, dir: &std::path::Path, context: &str) {
    let live: Vec<_> = lab
        .instances()
        .into_iter()
        .filter(|i| !matches!(i["state"].as_str(), Some("terminated" | "shutting-down")))
        .collect();
    assert!(live.is_empty(), "{context}: instances left: {live:?}");
    let pairs = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(lab.ec2().describe_key_pairs().send())
        .expect("DescribeKeyPairs");
    assert!(
        pairs.key_pairs().is_empty(),
        "{context}: key pairs left: {pairs:?}"
    );
    let keys = dir.join("keys");
    let files: Vec<_> = std::fs::read_dir(&keys)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        files.is_empty(),
        "{context}: files left in {}: {files:?}",
        keys.display()
    );
}

#[test]
fn a_first_ctrl_c_in_any_phase_tears_the_session_down_and_exits_130() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), "target.yaml", &lab.target_yaml(""));
    let slow_call =
        |action: &str| lab.fault(serde_json::json!({"action": action, "latency_ms": 3000}));
    type SlowDown<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, SlowDown); 5] = [
        ("Validating", Box::new(|| slow_call("DescribeImages"))),
        ("PreparingKeyPair", Box::new(|| slow_call("CreateKeyPair"))),
        ("Launching", Box::new(|| slow_call("RunInstances"))),
        (
            "WaitingForRunning",
            Box::new(|| lab.configure(serde_json::json!({"boot_delay_s": 5.0}))),
        ),
        (
            "WaitingForSsh",
            Box::new(|| {
                lab.configure(serde_json::json!({"boot_delay_s": 0.3, "ssh_start_delay_s": 30.0}))
            }),
        ),
    ];
    for (i, (phase, slow_down)) in cases.iter().enumerate() {
        slow_down();
        let db = dir.path().join(format!("state-{i}.db"));
        let (code, said) = provision_interrupted(&lab, &db, &config, phase, 1, &[]);
        assert_eq!(code, Some(130), "{phase}:\n{said}");
        assert!(said.contains("cancelling"), "{phase}:\n{said}");
        assert!(
            said.contains("was torn down; nothing is left"),
            "{phase}:\n{said}"
        );
        assert_nothing_left(&lab, dir.path(), phase);
        let out = cli(&db, Some(&lab), &["status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["phase"], "TornDown", "{phase}");
    }
}

#[test]
fn a_second_ctrl_c_stops_at_once_and_recover_cleans_up() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = config_file(dir.path(), "target.yaml", &lab.target_yaml(""));
    // The launch answers slowly: the first Ctrl-C's teardown waits for it.
    lab.fault(serde_json::json!({"action": "RunInstances", "latency_ms": 3000}));
    let (code, said) = provision_interrupted(&lab, &db, &config, "Launching", 2, &[]);
    assert_eq!(code, Some(130), "{said}");
    assert!(
        said.contains("stopped at once") && said.contains("acode-ec2 recover"),
        "{said}"
    );
    let out = cli(&db, Some(&lab), &["recover"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_nothing_left(&lab, dir.path(), "after recover");
}

/// What would fail only after a session is recorded (or never end) is
/// refused first, with what to do, and writes no state: no region, a key
/// folder that is a file, a session to watch that does not exist.
#[test]
fn the_cli_refuses_what_would_fail_late_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = config_file(
        dir.path(),
        "c.yaml",
        "  amiId: ami-0abc\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n",
    );
    let config = config.to_str().unwrap();
    // Nothing is called in these cases; the guard wants a loopback endpoint.
    let run = |args: &[&str], region: bool| {
        let mut command = cli_command(&db, None, args);
        command.env("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:9");
        if !region {
            command
                .env_remove("AWS_REGION")
                .env_remove("AWS_DEFAULT_REGION")
                .env("AWS_CONFIG_FILE", dir.path().join("no-aws-config"));
        }
        command.output().expect("run acode-ec2")
    };
    let out = run(&["provision", "--config", config], false);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no AWS region is set: set AWS_REGION"),
        "{}",
        text(&out.stderr)
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let out = run(
        &[
            "--key-dir",
            file.to_str().unwrap(),
            "provision",
            "--config",
            config,
        ],
        true,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is a file, not a folder"),
        "{}",
        text(&out.stderr)
    );
    assert!(!db.exists(), "state written");

    // Without a state database, then with an empty one.
    for said in [
        "no session nope: no state database at",
        "no session nope in the state database",
    ] {
        let out = run(&["watch", "nope", "--until-idle"], true);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(said), "{}", text(&out.stderr));
        acode_ec2::store::SqliteStore::open(&db).unwrap();
    }
}
