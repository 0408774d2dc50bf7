//! The fault matrix (issue #14): every EC2 call the engine makes × twelve
//! kinds of fault, injected through the lab on the call's first use
//! ("once") and on every use ("always"), plus the SSH faults.
//!
//! Each cell provisions one session with the fault in place and, when it is
//! Ready, tears it down with the fault still in place; then it clears the
//! fault and tears down whatever is still tracked. It checks:
//! - the fault fired (a fault on a call never made proves nothing);
//! - the session ended as a user would want: Ready; or failed with an error
//!   naming the call or its code and cleaned up; or, when the fault is on a
//!   cleanup call, still tracked with the error that says what to do;
//! - nothing leaked at any point: a session its store calls finished has no
//!   live instance, no `acode-` key pair and no key file, and once the fault
//!   is gone none is left at all; no launch made twice;
//! - a fault that goes away on retry (throttling, 5xx, a reset, a hang past
//!   the call timeout, a lost answer) injected once never fails a session.
//!
//! Three labs share the cells; the table prints with `--nocapture`.
//! `ACODE_MATRIX_ONLY=TEXT` runs only the cells whose name holds TEXT
//! (`DeleteKeyPair`, `NotFound (once)`, `SSH`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use acode_ec2::driver::EngineError;
use acode_ec2::effects::{AwsEffects, CallBudget, Effects};
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{Effect, Input, PhaseKind, SessionContext, Timestamp};
use acode_ec2::store::CheckpointStore;
use serde_json::{Value, json};

use crate::common::{Harness, heavy_test};
use crate::lab::{Lab, http};

/// The CLI's budget, scaled down so a hang costs a fraction of a second:
/// two tries of 400 ms each per call.
const BUDGET: CallBudget = CallBudget {
    attempts: 2,
    connect: Duration::from_secs(1),
    attempt: Duration::from_millis(400),
    operation: Duration::from_millis(1_500),
    first_backoff: Duration::from_millis(10),
};
/// Longer than a try may take, so a hang outlasts the call timeout.
const HANG_MS: u64 = 1_200;
/// One login (sshd's fork, key exchange, the lab's splice) under CI load
/// takes well under this; a silent server is given up on after it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// "Always" faults fire on this many calls: more than any cell makes.
const ALWAYS: u32 = 10_000;
const LABS: usize = 3;
/// An existing key pair each lab holds for the `existing` scenario.
const EXISTING_KEY: &str = "matrix-key";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    /// A temporary key pair made by CreateKeyPair, on-demand.
    Temporary,
    /// A key made here and imported (ImportKeyPair).
    Import,
    /// A key pair that already exists in EC2 (DescribeKeyPairs).
    Existing,
    /// Spot, fulfilled at once.
    Spot,
    /// Spot never fulfilled in time: cancelled, then on-demand.
    SpotFallback,
}

impl Scenario {
    /// Config lines under `ec2Target:` (spot has a second zone, so it asks
    /// for placement scores).
    /// `private_key` is the existing pair's key file (or one EC2 never saw).
    fn yaml(self, lab: &Lab, private_key: &Path) -> String {
        let second_zone = format!("  failoverSubnetIds: [{}]\n", lab.subnet("us-east-1b"));
        match self {
            Scenario::Temporary => String::new(),
            Scenario::Import => "  keyPair:\n    mode: import\n".into(),
            Scenario::Existing => format!(
                "  keyPair:\n    mode: existing\n    keyName: {EXISTING_KEY}\n    privateKeyPath: {}\n",
                private_key.display()
            ),
            Scenario::Spot => {
                format!("  useSpot: true\n  spotFallbackToOnDemand: true\n{second_zone}")
            }
            Scenario::SpotFallback => format!(
                "  useSpot: true\n  spotFallbackToOnDemand: true\n  spotRequestTimeout: 5s\n{second_zone}"
            ),
        }
    }

    fn lab_config(self) -> Value {
        let fulfil_after = if self == Scenario::SpotFallback {
            600.0
        } else {
            0.0
        };
        json!({"spot_fulfill_delay_s": fulfil_after, "console_mode": "ok"})
    }
}

/// An EC2 call, in the scenario whose provision or teardown makes it.
#[derive(Debug, Clone, Copy)]
struct Call {
    action: &'static str,
    scenario: Scenario,
}

const CALLS: [Call; 18] = [
    call("DescribeImages", Scenario::Temporary),
    call("DescribeSubnets", Scenario::Temporary),
    call("DescribeSecurityGroups", Scenario::Temporary),
    call("DescribeKeyPairs", Scenario::Existing),
    call("CreateKeyPair", Scenario::Temporary),
    call("ImportKeyPair", Scenario::Import),
    call("RunInstances", Scenario::Temporary),
    call("RunInstances", Scenario::Spot),
    call("GetSpotPlacementScores", Scenario::Spot),
    call("DescribeSpotPriceHistory", Scenario::Spot),
    call("GetProducts", Scenario::Spot),
    call("DescribeSpotInstanceRequests", Scenario::Spot),
    call("CancelSpotInstanceRequests", Scenario::SpotFallback),
    call("DescribeInstances", Scenario::Temporary),
    call("DescribeInstanceStatus", Scenario::Temporary),
    call("GetConsoleOutput", Scenario::Temporary),
    call("TerminateInstances", Scenario::Temporary),
    call("DeleteKeyPair", Scenario::Temporary),
];

/// The calls teardown makes: a lasting fault on one of them may leave a
/// session tracked (with the error that says to run teardown again).
const CLEANUP_CALLS: [&str; 5] = [
    "DescribeInstances",
    "TerminateInstances",
    "DeleteKeyPair",
    "CancelSpotInstanceRequests",
    "DescribeSpotInstanceRequests",
];

const fn call(action: &'static str, scenario: Scenario) -> Call {
    Call { action, scenario }
}

impl Call {
    fn label(&self) -> String {
        match self.scenario {
            Scenario::Spot if self.action == "RunInstances" => "RunInstances (spot)".into(),
            _ => self.action.into(),
        }
    }

    /// The NotFound code EC2 gives for this call's object.
    fn not_found_code(&self) -> &'static str {
        match self.action {
            "DescribeImages" => "InvalidAMIID.NotFound",
            "DescribeSubnets" | "GetSpotPlacementScores" | "DescribeSpotPriceHistory" => {
                "InvalidSubnetID.NotFound"
            }
            "DescribeSecurityGroups" => "InvalidGroup.NotFound",
            // For RunInstances: a new key pair EC2 does not show yet.
            "DescribeKeyPairs" | "CreateKeyPair" | "ImportKeyPair" | "DeleteKeyPair"
            | "RunInstances" => "InvalidKeyPair.NotFound",
            "DescribeSpotInstanceRequests" | "CancelSpotInstanceRequests" => {
                "InvalidSpotInstanceRequestID.NotFound"
            }
            "GetProducts" => "NotFoundException",
            _ => "InvalidInstanceID.NotFound",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, strum::EnumIter)]
enum FaultKind {
    Throttled,
    InternalError,
    Unavailable,
    ConnectionReset,
    Hang,
    LostAnswer,
    Unauthorized,
    InvalidParameter,
    NoCapacity,
    OverQuota,
    NotFound,
    IdempotentMismatch,
}

impl FaultKind {
    fn column(self) -> &'static str {
        match self {
            FaultKind::Throttled => "throttle",
            FaultKind::InternalError => "500",
            FaultKind::Unavailable => "503",
            FaultKind::ConnectionReset => "reset",
            FaultKind::Hang => "hang",
            FaultKind::LostAnswer => "lost",
            FaultKind::Unauthorized => "unauth",
            FaultKind::InvalidParameter => "param",
            FaultKind::NoCapacity => "capac",
            FaultKind::OverQuota => "quota",
            FaultKind::NotFound => "notfnd",
            FaultKind::IdempotentMismatch => "idemp",
        }
    }

    /// Gone by the next try: a session meeting it once must still be Ready.
    fn passes_on_retry(self) -> bool {
        matches!(
            self,
            FaultKind::Throttled
                | FaultKind::InternalError
                | FaultKind::Unavailable
                | FaultKind::ConnectionReset
                | FaultKind::Hang
                | FaultKind::LostAnswer
        )
    }

    /// The lab's fault rule (without action and count), and the EC2 code
    /// it answers with, if any.
    fn rule(self, call: &Call) -> (Value, Option<&'static str>) {
        let code = |code: &'static str| (json!({ "code": code }), Some(code));
        match self {
            FaultKind::Throttled => code("RequestLimitExceeded"),
            FaultKind::InternalError => code("InternalError"),
            FaultKind::Unavailable => code("Unavailable"),
            FaultKind::ConnectionReset => (json!({"drop_connection": true}), None),
            // No answer within the call timeout, and none ever (EC2 did not act).
            FaultKind::Hang => (
                json!({ "latency_ms": HANG_MS, "drop_connection": true }),
                None,
            ),
            // EC2 acted on the call; its answer never arrived.
            FaultKind::LostAnswer => (json!({"drop_connection": true, "when": "after"}), None),
            FaultKind::Unauthorized => (
                json!({"code": "UnauthorizedOperation", "http_status": 403}),
                Some("UnauthorizedOperation"),
            ),
            FaultKind::InvalidParameter => code("InvalidParameterValue"),
            FaultKind::NoCapacity => code("InsufficientInstanceCapacity"),
            FaultKind::OverQuota => code("VcpuLimitExceeded"),
            FaultKind::NotFound => code(call.not_found_code()),
            FaultKind::IdempotentMismatch => code("IdempotentParameterMismatch"),
        }
    }
}

/// A fault on the SSH login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SshFault {
    Refused,
    ResetAtConnect,
    ResetMidHandshake,
    BannerTimeout,
    /// The instance does not accept the session's key.
    AuthRefused,
    /// The console shows host keys the server does not have.
    WrongHostKey,
}

impl SshFault {
    const ALL: [SshFault; 6] = [
        SshFault::Refused,
        SshFault::ResetAtConnect,
        SshFault::ResetMidHandshake,
        SshFault::BannerTimeout,
        SshFault::AuthRefused,
        SshFault::WrongHostKey,
    ];

    fn label(self) -> &'static str {
        match self {
            SshFault::Refused => "connection refused",
            SshFault::ResetAtConnect => "reset at connect",
            SshFault::ResetMidHandshake => "reset mid-handshake",
            SshFault::BannerTimeout => "banner timeout",
            SshFault::AuthRefused => "auth refused",
            SshFault::WrongHostKey => "wrong host key",
        }
    }

    /// The lab's SSH gate mode, for the faults the gate makes.
    fn gate_mode(self) -> Option<&'static str> {
        match self {
            SshFault::Refused => Some("closed"),
            SshFault::ResetAtConnect => Some("reset"),
            SshFault::ResetMidHandshake => Some("reset-mid-handshake"),
            SshFault::BannerTimeout => Some("silent"),
            SshFault::AuthRefused | SshFault::WrongHostKey => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Ec2(FaultKind),
    Ssh(SshFault),
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    /// `None` for SSH faults (the temporary-key scenario).
    call: Option<Call>,
    fault: Fault,
    once: bool,
}

impl Cell {
    fn name(&self) -> String {
        let when = if self.once { "once" } else { "always" };
        match (self.call, self.fault) {
            (Some(call), Fault::Ec2(kind)) => format!("{} × {kind:?} ({when})", call.label()),
            (_, fault) => format!("SSH {fault:?} ({when})"),
        }
    }

    fn scenario(&self) -> Scenario {
        match self.fault {
            Fault::Ssh(SshFault::AuthRefused) => Scenario::Existing,
            _ => self.call.map_or(Scenario::Temporary, |c| c.scenario),
        }
    }
}

fn cells() -> Vec<Cell> {
    use strum::IntoEnumIterator;
    let mut cells = Vec::new();
    for call in CALLS {
        for kind in FaultKind::iter() {
            for once in [true, false] {
                cells.push(Cell {
                    call: Some(call),
                    fault: Fault::Ec2(kind),
                    once,
                });
            }
        }
    }
    for fault in SshFault::ALL {
        // A login that fails once for these reasons is not a fault the
        // server gets over: they are only tried always.
        let onces: &[bool] = match fault {
            SshFault::AuthRefused | SshFault::WrongHostKey => &[false],
            _ => &[true, false],
        };
        for &once in onces {
            cells.push(Cell {
                call: None,
                fault: Fault::Ssh(fault),
                once,
            });
        }
    }
    cells
}

/// How a cell ended, in the table's letters.
#[derive(Debug, Clone)]
struct Outcome {
    /// R: Ready; F: failed and cleaned up; S: failed, cleanup stalled under
    /// the fault (still tracked); t: the teardown under the fault stalled
    /// (still tracked), and finished once the fault was gone.
    letters: String,
    /// The error a user saw, if any.
    error: Option<String>,
    fired: u64,
    took: Duration,
}

/// Real effects; when armed, the session's first SSH probe meets the lab's
/// SSH gate in `mode`, and the gate is back to normal just after it.
struct FirstProbeFaulted {
    inner: AwsEffects,
    control_url: String,
    mode: Option<&'static str>,
    armed: AtomicBool,
    /// The faulted probe did not log in: the fault fired.
    met: AtomicBool,
}

fn set_gate(control_url: &str, mode: &str) {
    let body = json!({ "mode": mode }).to_string();
    let (status, answer) = http(
        control_url,
        "POST",
        "/ssh",
        &[("Content-Type", "application/json")],
        &body,
    );
    assert_eq!(status, 200, "POST /ssh {body}: {answer}");
}

impl Effects for FirstProbeFaulted {
    async fn run(&self, ctx: &SessionContext, created: Timestamp, effect: &Effect) -> Input {
        let first = matches!(effect, Effect::ProbeSsh { .. })
            && self.mode.is_some()
            && self.armed.swap(false, Ordering::SeqCst);
        if let (true, Some(mode)) = (first, self.mode) {
            set_gate(&self.control_url, mode);
        }
        let input = self.inner.run(ctx, created, effect).await;
        if first {
            set_gate(&self.control_url, "auto");
            let logged_in = matches!(input, Input::SshReady { .. });
            self.met.store(!logged_in, Ordering::SeqCst);
        }
        input
    }

    fn region(&self) -> Option<String> {
        self.inner.region()
    }
}

/// One lab and what its cells share.
struct Bench {
    lab: Lab,
    /// Holds the key files below.
    _keys: tempfile::TempDir,
    /// The private key of the lab's existing key pair.
    existing_key: PathBuf,
    /// A key EC2 has never seen, for the auth-refused cell.
    stranger_key: PathBuf,
}

impl Bench {
    fn start() -> Bench {
        let lab = Lab::start_with(&[]);
        let keys = tempfile::tempdir().expect("key dir");
        let existing_key = lab.existing_key_pair(EXISTING_KEY, keys.path());
        let stranger_key = keys.path().join("stranger");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f"])
            .arg(&stranger_key)
            .status()
            .expect("run ssh-keygen");
        assert!(made.success(), "ssh-keygen failed");
        Bench {
            lab,
            _keys: keys,
            existing_key,
            stranger_key,
        }
    }

    fn request_yaml(&self, cell: &Cell) -> String {
        let private_key = if cell.fault == Fault::Ssh(SshFault::AuthRefused) {
            &self.stranger_key
        } else {
            &self.existing_key
        };
        let extra = cell.scenario().yaml(&self.lab, private_key);
        // The lab's ssh block comes last, so these lines join it: five
        // failed logins end a session, as the CLI's 30 would. Polls every
        // 5 s (the default) of the manual clock: a wait that runs out (EC2
        // never showing the instance) costs tens of calls, not thousands.
        format!(
            "ec2Target:\n{}    retries: 5\n",
            self.lab.target_yaml(&extra)
        )
        .replace("pollInterval: 100ms", "pollInterval: 5s")
    }

    fn reset_lab(&self, scenario: Scenario) {
        self.lab.call("DELETE", "/faults", None);
        set_gate(&self.lab.info.control_url, "auto");
        self.lab.configure(scenario.lab_config());
    }

    /// From the control API: DescribeKeyPairs may be the faulted call.
    fn key_pairs(&self) -> Vec<String> {
        serde_json::from_value(self.lab.call("GET", "/key_pairs", None)).expect("key pair names")
    }

    /// What of the session is left in EC2 and on disk, in words.
    fn leftovers(&self, harness: &Harness, session_id: &str) -> Vec<String> {
        let mut left: Vec<String> = self
            .lab
            .live_instances_of(session_id)
            .iter()
            .map(|i| format!("instance {}", i["instance_id"]))
            .collect();
        let key_name = format!("acode-{session_id}");
        if self.key_pairs().contains(&key_name) {
            left.push(format!("key pair {key_name}"));
        }
        for file in ["pem", "known_hosts"] {
            let path = harness.dir.path().join(format!("keys/{key_name}.{file}"));
            if path.exists() {
                left.push(format!("file {}", path.display()));
            }
        }
        left
    }

    fn fired(&self, action: &str, count: u32) -> u64 {
        let rules = self.lab.call("GET", "/faults", None);
        let remaining = rules
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["action"] == action)
            .map(|r| r["remaining"].as_u64().unwrap_or(0))
            .sum::<u64>();
        u64::from(count) - remaining
    }

    async fn run(&self, cell: &Cell) -> Outcome {
        let started = std::time::Instant::now();
        let scenario = cell.scenario();
        self.reset_lab(scenario);
        let count = if cell.once { 1 } else { ALWAYS };
        let mut gate_mode = None;
        let mut code = None;
        match cell.fault {
            Fault::Ec2(kind) => {
                let call = cell.call.expect("an EC2 fault has a call");
                let (mut rule, its_code) = kind.rule(&call);
                rule["action"] = json!(call.action);
                rule["count"] = json!(count);
                self.lab.fault(rule);
                code = its_code;
            }
            Fault::Ssh(SshFault::WrongHostKey) => {
                self.lab
                    .configure(json!({"console_mode": "wrong-fingerprint"}));
            }
            Fault::Ssh(SshFault::AuthRefused) => {}
            Fault::Ssh(fault) => gate_mode = fault.gate_mode(),
        }
        if let (false, Some(mode)) = (cell.once, gate_mode) {
            set_gate(&self.lab.info.control_url, mode);
        }
        let harness = Harness::new();
        let effects = FirstProbeFaulted {
            inner: self
                .lab
                .effects_within(BUDGET)
                .with_probe_timeout(PROBE_TIMEOUT),
            control_url: self.lab.info.control_url.clone(),
            mode: gate_mode,
            armed: AtomicBool::new(cell.once),
            met: AtomicBool::new(false),
        };
        let effects = Arc::new(effects);
        let engine = harness.fast_engine(Arc::clone(&effects));
        let request = acode_ec2::config::parse(&self.request_yaml(cell))
            .unwrap_or_else(|e| panic!("{}: config: {e}", cell.name()));

        let provision = tokio::time::timeout(
            Duration::from_secs(120),
            engine.provision(request, &NoProgress),
        )
        .await
        .unwrap_or_else(|_| panic!("{}: provision did not end within 120 s", cell.name()));
        let session_id = harness.only_session().await;
        let mut error = None;
        let mut letters = match provision {
            Ok(_) => "R".to_string(),
            Err(EngineError::ProvisionFailed { reason, .. }) => {
                error = Some(reason);
                "F".into()
            }
            Err(e @ EngineError::CleanupStalled { .. }) => {
                error = Some(e.to_string());
                "S".into()
            }
            Err(other) => panic!("{}: provision ended in {other}", cell.name()),
        };
        let phase = |harness: &Harness| {
            let store = Arc::clone(&harness.store);
            let id = session_id.clone();
            async move {
                store
                    .list()
                    .await
                    .expect("list")
                    .into_iter()
                    .find(|s| s.session_id == id)
                    .expect("the session")
                    .phase
            }
        };
        if !phase(&harness).await.is_terminal() {
            match engine.teardown(&session_id, &NoProgress).await {
                // Failed: a failed session whose stalled cleanup finished.
                Ok(end) => assert!(
                    matches!(end, PhaseKind::TornDown | PhaseKind::Failed),
                    "{}: {end:?}",
                    cell.name()
                ),
                Err(e @ EngineError::CleanupStalled { .. }) => {
                    letters.push('t');
                    error.get_or_insert(e.to_string());
                }
                Err(other) => panic!("{}: teardown ended in {other}", cell.name()),
            }
        }
        // Under the fault: whatever the store calls finished left nothing.
        if phase(&harness).await.is_terminal() {
            let left = self.leftovers(&harness, &session_id);
            assert!(
                left.is_empty(),
                "{}: finished, but left {left:?}",
                cell.name()
            );
        }
        let fired = match (cell.fault, cell.call) {
            (Fault::Ec2(_), Some(call)) => self.fired(call.action, count),
            // Once: the faulted login failed. Always: the session failed
            // (checked with the table), so some login did.
            _ if cell.once => u64::from(effects.met.load(Ordering::SeqCst)),
            _ => 1,
        };

        self.reset_lab(scenario);
        if !phase(&harness).await.is_terminal() {
            let end = engine
                .teardown(&session_id, &NoProgress)
                .await
                .unwrap_or_else(|e| panic!("{}: teardown after the fault: {e}", cell.name()));
            // Failed: a failed session whose cleanup has now finished.
            assert!(
                matches!(end, PhaseKind::TornDown | PhaseKind::Failed),
                "{}: {end:?}",
                cell.name()
            );
        }
        let left = self.leftovers(&harness, &session_id);
        assert!(left.is_empty(), "{}: left {left:?}", cell.name());
        let twice = self.lab.launched_twice(Some(&session_id));
        assert!(
            twice.is_empty(),
            "{}: launched twice: {twice:?}",
            cell.name()
        );
        if let Some(error) = &error {
            // The call or its code, or in the user's terms what EC2's answer
            // meant: a wait that ran out, or an object that is missing.
            let not_found = cell.fault == Fault::Ec2(FaultKind::NotFound);
            let named = match (cell.call, code) {
                (Some(call), code) => {
                    error.contains(call.action)
                        || code.is_some_and(|code| error.contains(code))
                        || (not_found
                            && (error.contains("in time") || error.contains("does not exist")))
                }
                (None, _) => error.to_lowercase().contains("ssh"),
            };
            assert!(
                named,
                "{}: the error does not say what failed: {error}",
                cell.name()
            );
        }
        Outcome {
            letters,
            error,
            fired,
            took: started.elapsed(),
        }
    }
}

fn table(results: &BTreeMap<(String, Fault, bool), Outcome>) -> String {
    use strum::IntoEnumIterator;
    let mut out = String::new();
    let width = 29;
    let _ = write!(out, "{:width$}", "call \\ fault (once/always)");
    for kind in FaultKind::iter() {
        let _ = write!(out, " {:>7}", kind.column());
    }
    out.push('\n');
    for call in CALLS {
        let _ = write!(out, "{:width$}", call.label());
        for kind in FaultKind::iter() {
            let cell = |once| {
                results
                    .get(&(call.label(), Fault::Ec2(kind), once))
                    .map_or("?", |o| o.letters.as_str())
                    .to_string()
            };
            let _ = write!(out, " {:>7}", format!("{}/{}", cell(true), cell(false)));
        }
        out.push('\n');
    }
    out.push('\n');
    for fault in SshFault::ALL {
        let cell = |once| {
            results
                .get(&("SSH".to_string(), Fault::Ssh(fault), once))
                .map_or("-", |o| o.letters.as_str())
                .to_string()
        };
        let _ = writeln!(
            out,
            "{:width$} {:>7}",
            format!("SSH {}", fault.label()),
            format!("{}/{}", cell(true), cell(false))
        );
    }
    out.push_str(
        "\nR Ready (then torn down under the fault); F failed, cleaned up; S failed, its cleanup \
         stalled under the fault (tracked, error says to run teardown); t teardown stalled under \
         the fault (tracked), finished once it cleared; X broke an invariant (listed below the \
         errors); - not tried\n",
    );
    out
}

#[test]
fn every_call_under_every_fault_ends_ready_or_clean_and_leaks_nothing() {
    let _heavy = heavy_test();
    let only = std::env::var("ACODE_MATRIX_ONLY").unwrap_or_default();
    let cells: Vec<Cell> = cells()
        .into_iter()
        .filter(|c| c.name().contains(&only))
        .collect();
    let started = std::time::Instant::now();
    let runs: Vec<(Cell, Result<Outcome, String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..LABS)
            .map(|w| {
                let mine: Vec<Cell> = cells.iter().copied().skip(w).step_by(LABS).collect();
                scope.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    let bench = Bench::start();
                    mine.into_iter()
                        .map(|cell| {
                            // One cell's failure is reported with the others'.
                            let run =
                                std::panic::AssertUnwindSafe(|| rt.block_on(bench.run(&cell)));
                            let outcome = std::panic::catch_unwind(run).map_err(|panic| {
                                panic
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default()
                            });
                            (cell, outcome)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a matrix worker panicked"))
            .collect()
    });

    let mut broken = Vec::new();
    let results: Vec<(Cell, Outcome)> = runs
        .into_iter()
        .map(|(cell, run)| {
            let outcome = run.unwrap_or_else(|panic| {
                broken.push(format!("{}: {panic}", cell.name()));
                Outcome {
                    letters: "X".into(),
                    error: None,
                    fired: 1,
                    took: Duration::ZERO,
                }
            });
            (cell, outcome)
        })
        .collect();
    let mut by_cell = BTreeMap::new();
    let mut unfired = Vec::new();
    let mut failed_on_retryable = Vec::new();
    for (cell, outcome) in &results {
        if outcome.fired == 0 {
            unfired.push(cell.name());
        }
        if let (true, Fault::Ec2(kind)) = (cell.once, cell.fault)
            && kind.passes_on_retry()
            && outcome.letters != "R"
        {
            failed_on_retryable.push(format!("{}: {outcome:?}", cell.name()));
        }
        let row = cell.call.map_or("SSH".to_string(), |c| c.label());
        by_cell.insert((row, cell.fault, cell.once), outcome.clone());
    }
    println!(
        "fault matrix: {} cells in {:.0} s\n{}",
        results.len(),
        started.elapsed().as_secs_f64(),
        table(&by_cell)
    );
    let mut slowest: Vec<&(Cell, Outcome)> = results.iter().collect();
    slowest.sort_by_key(|(_, o)| std::cmp::Reverse(o.took));
    for (cell, outcome) in slowest.iter().take(12) {
        println!("slow: {} {:.1} s", cell.name(), outcome.took.as_secs_f64());
    }
    for (cell, outcome) in &results {
        if let Some(error) = &outcome.error {
            println!("{} [{}]: {error}", cell.name(), outcome.letters);
        }
    }
    // Only a fault on a call cleanup makes may leave a session tracked.
    let stalled_elsewhere: Vec<String> = results
        .iter()
        .filter(|(_, o)| o.letters.contains(['S', 't']))
        .filter(|(c, _)| {
            !c.call
                .is_some_and(|call| CLEANUP_CALLS.contains(&call.action))
        })
        .map(|(c, o)| format!("{} [{}]", c.name(), o.letters))
        .collect();
    assert!(
        broken.is_empty(),
        "cells that broke an invariant: {broken:#?}"
    );
    assert!(
        stalled_elsewhere.is_empty(),
        "left tracked by a fault on a call cleanup does not make: {stalled_elsewhere:#?}"
    );
    assert!(unfired.is_empty(), "faults that never fired: {unfired:#?}");
    assert!(
        failed_on_retryable.is_empty(),
        "a fault that passes on retry failed a session: {failed_on_retryable:#?}"
    );
    // The SSH faults the server gets over once are waited out; the lasting
    // ones fail the session (and it is cleaned up, checked per cell).
    for ((row, fault, once), outcome) in &by_cell {
        if let Fault::Ssh(_) = fault {
            let expected = if *once { "R" } else { "F" };
            assert_eq!(outcome.letters, expected, "{row} {fault:?} once={once}");
        }
    }
}
