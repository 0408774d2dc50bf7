//! Starts the local EC2 lab (tests/lab/acode_lab.py: moto + sshd + IMDS)
//! for one test and stops it, sshd included, when the handle drops, even
//! when the test panics. The lab also exits when our end of its stdin closes,
//! so a killed test binary leaves nothing behind.
//!
//! Also compiled into `benches/time_to_ready.rs`, so it needs nothing else
//! from the test crate.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use acode_ec2::effects::describe_batch::{BatchWindow, Batched};
use acode_ec2::effects::sdk::SdkEc2;
use acode_ec2::effects::{AwsEffects, CallBudget};
use acode_ec2::net_guard::ConnectGuard;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use serde::Deserialize;
use serde_json::Value;

/// What the lab prints once it answers.
#[derive(Debug, Clone, Deserialize)]
pub struct LabInfo {
    pub ec2_endpoint: String,
    pub control_url: String,
    pub sshd_port: u16,
    pub ssh_user: String,
    pub imds_endpoint: String,
    pub region: String,
    pub subnets: BTreeMap<String, String>,
    pub security_group_id: String,
    pub ami_id: String,
    pub host_key_fingerprints: Vec<String>,
}

pub struct Lab {
    /// Whether its EC2 actions count as the engine's (see `note_actions`).
    noted: bool,
    child: Child,
    stdin: Option<ChildStdin>,
    pub info: LabInfo,
    _state_dir: tempfile::TempDir,
}

fn python() -> String {
    std::env::var("ACODE_EC2_LAB_PYTHON")
        .unwrap_or_else(|_| format!("{}/.lab/venv/bin/python", env!("CARGO_MANIFEST_DIR")))
}

impl Lab {
    /// Starts a lab with quick but non-zero boot timing.
    pub fn start() -> Lab {
        Lab::start_with(&[
            "--boot-delay-s",
            "0.3",
            "--status-ok-delay-s",
            "0.3",
            "--console-lag-s",
            "0.3",
            "--terminate-delay-s",
            "0.3",
        ])
    }

    pub fn start_with(args: &[&str]) -> Lab {
        let state_dir = tempfile::tempdir().expect("lab state dir");
        let python = python();
        assert!(
            std::path::Path::new(&python).exists(),
            "lab Python {python} is missing: run `scripts/setup.sh` (or set ACODE_EC2_LAB_PYTHON)"
        );
        let mut child = Command::new(&python)
            .arg(format!(
                "{}/tests/lab/acode_lab.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .arg("--state-dir")
            .arg(state_dir.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the lab");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("lab stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(line) if !line.trim().is_empty() => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the lab did not become ready: {other:?}");
            }
        };
        let info: LabInfo =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
        Lab {
            noted: true,
            child,
            stdin,
            info,
            _state_dir: state_dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client configured explicitly: static test credentials, region, lab endpoint.
    pub fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::from_conf(self.ec2_config().build())
    }

    fn ec2_config(&self) -> aws_sdk_ec2::config::Builder {
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.info.region.clone()))
            .credentials_provider(lab_credentials())
            .endpoint_url(&self.info.ec2_endpoint)
    }

    /// The Price List API the lab answers on its EC2 port.
    pub fn pricing(&self) -> aws_sdk_pricing::Client {
        aws_sdk_pricing::Client::from_conf(self.pricing_config().build())
    }

    fn pricing_config(&self) -> aws_sdk_pricing::config::Builder {
        aws_sdk_pricing::Config::builder()
            .behavior_version(aws_sdk_pricing::config::BehaviorVersion::latest())
            .region(aws_sdk_pricing::config::Region::new("us-east-1"))
            .credentials_provider(lab_credentials())
            .endpoint_url(&self.info.ec2_endpoint)
    }

    /// Real effects whose calls keep to `budget` (tries, timeouts,
    /// backoff), as the CLI's keep to [`CallBudget::STANDARD`]. The Price
    /// List client, which the SDK retries, draws on a retry quota of its
    /// own: the SDK's default one is shared by every client of the process
    /// (of every test), and faults on every call would drain it.
    pub fn effects_within(&self, budget: CallBudget) -> AwsEffects {
        use aws_sdk_ec2::config::retry::{RetryPartition, TokenBucket};
        let pricing = self
            .pricing_config()
            .retry_config(budget.retry_config())
            .timeout_config(budget.timeout_config())
            .retry_partition(
                RetryPartition::custom("acode-lab-within-budget")
                    .token_bucket(TokenBucket::unlimited())
                    .build(),
            )
            .build();
        let ec2 = SdkEc2::new(self.ec2()).with_budget(budget);
        AwsEffects::over(
            Batched::new(ec2, BatchWindow::default()),
            ConnectGuard::loopback_only(),
        )
        .with_price_list(aws_sdk_pricing::Client::from_conf(pricing))
    }

    /// Real effects against the lab (EC2 and the Price List), behind the
    /// loopback guard.
    pub fn effects(&self) -> Arc<AwsEffects> {
        Arc::new(self.bare_effects())
    }

    /// The same, not yet shared: for adding a clock before use.
    pub fn bare_effects(&self) -> AwsEffects {
        AwsEffects::new(self.ec2(), ConnectGuard::loopback_only()).with_price_list(self.pricing())
    }

    pub fn subnet(&self, az: &str) -> String {
        self.info
            .subnets
            .get(az)
            .cloned()
            .unwrap_or_else(|| panic!("lab has no subnet in {az}"))
    }

    /// A config body (under `ec2Target:`) that provisions in the lab.
    pub fn target_yaml(&self, extra: &str) -> String {
        format!(
            "  amiId: {ami}\n  instanceType: t3.micro\n  subnetId: {subnet}\n  securityGroupIds: [{sg}]\n  \
             pollInterval: 100ms\n  runningTimeout: 30s\n  sshTimeout: 30s\n{extra}",
            ami = self.info.ami_id,
            subnet = self.subnet("us-east-1a"),
            sg = self.info.security_group_id,
        ) + &format!(
            "  ssh:\n    user: {user}\n    endpointOverride: 127.0.0.1:{port}\n    retryInterval: 100ms\n",
            user = self.info.ssh_user,
            port = self.info.sshd_port
        )
    }

    /// A request that provisions in the lab (see `target_yaml`).
    pub fn request(&self, extra: &str) -> acode_ec2::request::ProvisionRequest {
        let text = format!("ec2Target:\n{}", self.target_yaml(extra));
        acode_ec2::config::parse(&text)
            .unwrap_or_else(|e| panic!("lab config does not parse: {e}\n{text}"))
    }

    /// The session trusted one of the lab sshd's real host keys.
    pub fn assert_trusted(&self, ready: &acode_ec2::driver::ReadyInstance) {
        assert!(
            self.info
                .host_key_fingerprints
                .contains(&ready.host_key_fingerprint),
            "host key {} is not the lab sshd's: {ready:?}",
            ready.host_key_fingerprint
        );
    }

    pub fn configure(&self, settings: Value) {
        self.call("POST", "/config", Some(settings));
    }

    pub fn fault(&self, rule: Value) {
        self.call("POST", "/faults", Some(rule));
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        serde_json::from_value(self.call("GET", "/counters", None)).expect("counters")
    }

    pub fn count(&self, action: &str) -> u64 {
        self.counters().get(action).copied().unwrap_or(0)
    }

    /// Every instance the lab knows, as `/_lab/instances` reports them.
    pub fn instances(&self) -> Vec<Value> {
        match self.call("GET", "/instances", None) {
            Value::Array(items) => items,
            other => panic!("unexpected /instances answer {other}"),
        }
    }

    /// Instances tagged with this session that are not terminated or shutting down.
    pub fn live_instances_of(&self, session_id: &str) -> Vec<Value> {
        self.instances()
            .into_iter()
            .filter(|i| i["tags"]["acode-session-id"] == session_id)
            .filter(|i| !matches!(i["state"].as_str(), Some("terminated" | "shutting-down")))
            .collect()
    }

    /// Creates key pair `name` in the lab, as a user's existing one, and
    /// writes its private key to `dir/NAME.pem` (mode 0600); the path. Call
    /// it outside any async context.
    pub fn existing_key_pair(&self, name: &str, dir: &std::path::Path) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let created = rt
            .block_on(self.ec2().create_key_pair().key_name(name).send())
            .expect("CreateKeyPair");
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, created.key_material().expect("key material")).expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        path
    }

    /// Sessions (of `session_id`, or all) that launched more than one
    /// instance of one lifecycle, in any state: the lab answers a known
    /// ClientToken with its instance, as EC2 does, so only a launch retried
    /// under a new token shows here. (A spot session's on-demand fallback is
    /// the other lifecycle.)
    pub fn launched_twice(&self, session_id: Option<&str>) -> Vec<String> {
        let mut launches: BTreeMap<(String, String), u32> = BTreeMap::new();
        for instance in self.instances() {
            let Some(session) = instance["tags"]["acode-session-id"].as_str() else {
                continue;
            };
            if session_id.is_some_and(|id| id != session) {
                continue;
            }
            let lifecycle = instance["lifecycle"].as_str().unwrap_or("").to_string();
            *launches
                .entry((session.to_string(), lifecycle))
                .or_default() += 1;
        }
        launches
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|((session, lifecycle), n)| format!("{session}: {n} {lifecycle} instances"))
            .collect()
    }

    /// A JSON call to the control API.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, payload) = http(
            &self.info.control_url,
            method,
            path,
            &[("Content-Type", "application/json")],
            &body,
        );
        assert!(
            (200..300).contains(&status),
            "{method} {path}: HTTP {status}\n{payload}"
        );
        serde_json::from_str(&payload).unwrap_or(Value::Null)
    }
}

/// A minimal blocking HTTP/1.1 request to a loopback URL: (status, body).
pub fn http(
    base_url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let base = base_url.trim_start_matches("http://");
    let (host, prefix) = base.split_once('/').map_or((base, ""), |(h, p)| (h, p));
    let mut stream = TcpStream::connect(host).expect("connect to the lab");
    assert!(
        stream.peer_addr().expect("peer").ip().is_loopback(),
        "lab calls stay on loopback"
    );
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("/{prefix}")
    };
    write!(
        stream,
        "{method} {prefix}{path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read answer");
    let (head, payload) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, payload.to_string())
}

/// Where labs note the EC2 actions they were called with, when set (the
/// IAM policy check compares the whole suite's calls with the policy).
pub const ACTIONS_LOG_ENV: &str = "ACODE_EC2_ACTIONS_LOG";

impl Lab {
    /// A lab whose calls check the lab itself (raw SDK calls the engine
    /// never makes), so they do not count toward the IAM policy check.
    pub fn unnoted(mut self) -> Lab {
        self.noted = false;
        self
    }

    /// Notes every EC2 action this lab was called with, one file per lab.
    fn note_actions(&self) {
        let Ok(dir) = std::env::var(ACTIONS_LOG_ENV) else {
            return;
        };
        if !self.noted {
            return;
        }
        // Best effort: a lab that no longer answers has nothing to add.
        let Ok(counters) =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.counters()))
        else {
            return;
        };
        let actions: Vec<&str> = counters.keys().map(String::as_str).collect();
        let _ = std::fs::create_dir_all(&dir);
        let file = format!("{dir}/lab-{}-{}.txt", std::process::id(), self.child.id());
        let _ = std::fs::write(file, actions.join("\n"));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.note_actions();
        // Closing stdin asks the lab to stop (and stop sshd); kill if it lingers.
        drop(self.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The static test credentials every lab client uses (moto's default
/// account); never a credential chain that could probe the metadata address.
fn lab_credentials() -> Credentials {
    Credentials::new("testing", "testing", None, None, "acode-lab")
}
