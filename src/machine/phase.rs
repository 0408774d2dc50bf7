//! The typed phases: each holds exactly the data its phase needs.

use std::fmt;

use serde::{Deserialize, Serialize};
use strum::{EnumDiscriminants, EnumIter, EnumString, IntoStaticStr};

use super::Timestamp;
use super::placement::{PlacementFacts, SpotSavings};
use super::token::ClientToken;

/// The key pair an instance is launched with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPairHandle {
    pub key_name: String,
    /// Created by this session, so cleanup deletes it (and its key file).
    pub owned: bool,
    /// Where the private key lives on this machine; never its contents.
    pub private_key_path: Option<String>,
    /// Whether that file is the session's to remove at cleanup (not when it
    /// is the user's own key).
    #[serde(default = "yes")]
    pub owns_key_file: bool,
}

fn yes() -> bool {
    true
}

/// The fingerprints (`SHA256:…`) that the instance's SSH server may present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleFingerprints(pub Vec<String>);

/// The image chosen at validation, with what RunInstances needs of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageChoice {
    pub ami_id: String,
    /// The root volume's device name (`/dev/xvda`, `/dev/sda1`), for sizing it.
    pub root_device_name: Option<String>,
    /// DescribeImages' `PlatformDetails` (`Linux/UNIX`, `Windows`, …): what
    /// spot prices and the Price List are filtered by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// One RunInstances attempt: a new attempt number means a new `ClientToken`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchAttempt {
    pub image: ImageChoice,
    pub key: KeyPairHandle,
    /// The availability zone of each configured subnet, in config order
    /// (empty in sessions stored before zones were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// What placement found: the order subnets are tried in follows from
    /// it (empty in sessions stored before placement: config order).
    #[serde(default)]
    pub placement: Box<PlacementFacts>,
    pub attempt: u32,
    /// Index into the configured subnets (not into the placement order).
    pub subnet_index: usize,
    pub client_token: ClientToken,
}

/// A spot request as DescribeSpotInstanceRequests last showed it (the
/// specification's `SpotRequestStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpotRequestStatus {
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<String>,
    /// The request's price (its maximum), as EC2 prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<String>,
}

/// An instance EC2 has accepted for this session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchedInstance {
    pub instance_id: String,
    pub key: KeyPairHandle,
    pub was_spot: bool,
    /// When RunInstances answered: until a while after, EC2 may not show
    /// the instance yet (`None` in checkpoints written before this was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<Timestamp>,
    /// The availability zone of the subnet it was launched in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The spot request behind a spot instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_request: Option<Box<SpotRequestStatus>>,
    /// What a spot instance saves, worked out at launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savings: Option<Box<SpotSavings>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validating;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparingKeyPair {
    pub image: ImageChoice,
    /// The availability zone of each configured subnet, in config order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// Their zone ids (`use1-az6`), which placement scores are given by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zone_ids: Vec<String>,
}

/// The key pair is ready: find out where to launch (placement scores,
/// prices, recent capacity failures) before the first launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoosingPlacement {
    pub image: ImageChoice,
    pub key: KeyPairHandle,
    pub zones: Vec<String>,
    pub zone_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestingSpot {
    pub launch: LaunchAttempt,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launching {
    pub launch: LaunchAttempt,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingForRunning {
    pub instance: LaunchedInstance,
    pub deadline: Timestamp,
    /// For a spot instance whose request allows fallback: the on-demand
    /// launch to make instead if it is not running by `deadline` (the spot
    /// request timeout) or is reclaimed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_fallback: Option<Box<LaunchAttempt>>,
}

/// A spot instance given up on before it ran: terminate it, then launch
/// `next` on demand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbandoningSpot {
    pub instance: LaunchedInstance,
    pub next: LaunchAttempt,
    /// Why, for the `SpotFallback` notice once the instance is gone.
    pub reason: String,
    /// The spot request is cancelled (or there is none to cancel): only
    /// the instance is left to terminate.
    #[serde(default)]
    pub request_cancelled: bool,
}

impl AbandoningSpot {
    /// The spot request still to cancel before the instance is terminated.
    pub fn request_to_cancel(&self) -> Option<&str> {
        let request = self.instance.spot_request.as_ref()?;
        (!self.request_cancelled).then_some(request.request_id.as_str())
    }
}

/// One EC2 status check (system or instance), as DescribeInstanceStatus says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckState {
    Ok,
    Initializing,
    Impaired,
    InsufficientData,
    NotApplicable,
    /// The instance is not listed (yet).
    NotReported,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Ok => "ok",
            CheckState::Initializing => "initializing",
            CheckState::Impaired => "impaired",
            CheckState::InsufficientData => "insufficient-data",
            CheckState::NotApplicable => "not-applicable",
            CheckState::NotReported => "not reported",
        }
    }
}

/// What EC2's status checks say of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub system: CheckState,
    pub instance: CheckState,
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "system status {}, instance status {}",
            self.system.as_str(),
            self.instance.as_str()
        )
    }
}

/// The host key an SSH login was made with, after it matched a trusted fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedHostKey {
    pub fingerprint: String,
    /// `algorithm base64`, as a known_hosts line carries it.
    pub public_key: String,
}

/// The SSH side of readiness: host keys from the console, then a login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SshTrack {
    /// Set once a login worked against a trusted host key.
    pub verified: Option<VerifiedHostKey>,
    /// Failed logins so far (at most `ssh.retries`).
    pub failures: u32,
    /// When the next console read or login runs (`Timestamp(0)`: at once).
    pub due: Timestamp,
    /// Why the last login failed, for the error if readiness runs out of time.
    pub last_error: Option<String>,
}

/// The EC2 status-check side of readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "checks", rename_all = "snake_case")]
pub enum StatusTrack {
    /// Passed, or not asked for (`statusChecks: skip`, or a session stored
    /// before status checks existed).
    #[default]
    Done,
    Waiting {
        due: Timestamp,
        last: Option<StatusReport>,
    },
    /// Passed (or skipped), but a spot instance that may fall back is
    /// still looked at until it is Ready: a reclaim shows here first.
    Watching { due: Timestamp },
}

impl StatusTrack {
    /// Whether the checks are no reason to wait any more.
    pub fn passed(&self) -> bool {
        !matches!(self, StatusTrack::Waiting { .. })
    }
}

/// The two checks readiness needs, polled side by side: SSH (console host
/// keys, then a verified login) and EC2's status checks. Each has its own
/// cadence; the one due first runs next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingForSsh {
    pub instance: LaunchedInstance,
    pub public_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// `host:port` the probe connects to.
    pub ssh_endpoint: String,
    /// Known once the console (or the pinned config) has told us.
    pub trusted_host_keys: Option<ConsoleFingerprints>,
    /// FR-058: readiness must be reached by then.
    pub deadline: Timestamp,
    #[serde(default)]
    pub ssh: SshTrack,
    #[serde(default)]
    pub status: StatusTrack,
    /// For a spot instance that may fall back: the on-demand launch to make
    /// if it is reclaimed before it is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_fallback: Option<Box<LaunchAttempt>>,
}

/// Which of the two readiness checks runs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadinessCheck {
    Ssh,
    StatusChecks,
}

impl WaitingForSsh {
    /// The check to run next and when: the one due first (SSH on a tie).
    pub fn next_check(&self) -> (ReadinessCheck, Timestamp) {
        let ssh = self
            .ssh
            .verified
            .is_none()
            .then_some((ReadinessCheck::Ssh, self.ssh.due));
        let status = match &self.status {
            StatusTrack::Waiting { due, .. } | StatusTrack::Watching { due } => {
                Some((ReadinessCheck::StatusChecks, *due))
            }
            StatusTrack::Done => None,
        };
        match (ssh, status) {
            (Some(s), Some(c)) if c.1 < s.1 => c,
            (Some(s), _) => s,
            (None, Some(c)) => c,
            // Both done is Ready; never a waiting phase.
            (None, None) => (ReadinessCheck::Ssh, self.ssh.due),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub instance: LaunchedInstance,
    pub public_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    pub ssh_endpoint: String,
    /// The fingerprint of the host key the server presented and we trusted.
    pub host_key_fingerprint: String,
    /// That key itself (`algorithm base64`); empty in sessions stored
    /// before it was kept.
    #[serde(default)]
    pub host_key: String,
}

/// EC2's notice that it takes a spot instance back (FR-032/033).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptionNotice {
    /// `terminate`, `stop` or `hibernate`.
    pub action: String,
    /// When EC2 acts.
    pub at: Timestamp,
    /// Where the notice was read (the instance's metadata over SSH, or the
    /// EC2 API), for people.
    pub source: String,
}

/// A spot instance under notice: the shutdown command runs on it (over the
/// verified SSH connection) before cleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interrupting {
    pub instance: LaunchedInstance,
    pub ssh_endpoint: String,
    pub host_key_fingerprint: String,
    pub notice: InterruptionNotice,
    /// The command must end by then: its timeout, and before the notice time.
    pub command_deadline: Timestamp,
    /// The session started from the same request to take over, if any.
    pub replacement: Option<String>,
}

/// How an interrupted session ended: why, and who took over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interrupted {
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
}

/// Why cleanup runs: it decides where cleanup ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", content = "reason", rename_all = "snake_case")]
pub enum CleanupCause {
    /// Provisioning failed: cleanup ends in `Failed`.
    Failure(String),
    /// The caller asked for teardown: cleanup ends in `TornDown`.
    Teardown,
    /// EC2 took (or is taking) a spot instance back: cleanup ends in `Interrupted`.
    Interruption(Interrupted),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminatingInstance {
    /// `None`: a launch may have made an instance whose id was never
    /// answered; the terminate effect finds it by the session tag.
    pub instance_id: Option<String>,
    /// When the known instance was launched (see `LaunchedInstance`), or,
    /// with no id, when the launch whose answer was lost was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<Timestamp>,
    pub key: Option<KeyPairHandle>,
    pub cause: CleanupCause,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletingKeyPair {
    pub key: KeyPairHandle,
    pub cause: CleanupCause,
}

/// Terminal: provisioning failed and everything it created is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub reason: String,
}

/// Terminal: a teardown removed everything the session created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TornDown;

/// Every phase of a provisioning session. [`PhaseKind`] is derived from it,
/// so a new phase can never be missing from the list of kinds (and from
/// what a stored session may be read back as).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, EnumDiscriminants)]
#[serde(tag = "phase")]
#[strum_discriminants(
    name(PhaseKind),
    doc = "The name of a phase without its data: what the table and diagrams use.",
    derive(
        Hash,
        PartialOrd,
        Ord,
        Serialize,
        Deserialize,
        EnumIter,
        EnumString,
        IntoStaticStr
    )
)]
pub enum ProvisionPhase {
    Validating(Validating),
    PreparingKeyPair(PreparingKeyPair),
    ChoosingPlacement(ChoosingPlacement),
    RequestingSpot(RequestingSpot),
    Launching(Launching),
    WaitingForRunning(WaitingForRunning),
    AbandoningSpot(AbandoningSpot),
    WaitingForSsh(WaitingForSsh),
    Ready(Ready),
    Interrupting(Interrupting),
    TerminatingInstance(TerminatingInstance),
    DeletingKeyPair(DeletingKeyPair),
    Failed(Failed),
    TornDown(TornDown),
    Interrupted(Interrupted),
}

impl PhaseKind {
    pub fn name(self) -> &'static str {
        self.into()
    }

    pub fn parse(name: &str) -> Option<PhaseKind> {
        name.parse().ok()
    }

    /// No input leaves these phases.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PhaseKind::Failed | PhaseKind::TornDown | PhaseKind::Interrupted
        )
    }

    /// A session that `recover` leaves alone: finished, or Ready and tracked.
    pub fn is_settled(self) -> bool {
        self.is_terminal() || self == PhaseKind::Ready
    }

    pub fn is_cleanup(self) -> bool {
        matches!(
            self,
            PhaseKind::TerminatingInstance | PhaseKind::DeletingKeyPair
        )
    }

    /// A rough share of the work done when this phase starts, for progress bars.
    pub fn percent_complete(self) -> u8 {
        match self {
            PhaseKind::Validating => 5,
            PhaseKind::PreparingKeyPair => 15,
            PhaseKind::ChoosingPlacement => 22,
            PhaseKind::RequestingSpot | PhaseKind::Launching | PhaseKind::AbandoningSpot => 30,
            PhaseKind::WaitingForRunning => 50,
            PhaseKind::WaitingForSsh => 75,
            PhaseKind::Interrupting => 70,
            PhaseKind::TerminatingInstance => 80,
            PhaseKind::DeletingKeyPair => 90,
            PhaseKind::Ready | PhaseKind::Failed | PhaseKind::TornDown | PhaseKind::Interrupted => {
                100
            }
        }
    }
}

impl fmt::Display for PhaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl ProvisionPhase {
    pub fn kind(&self) -> PhaseKind {
        self.into()
    }

    /// The instance this phase knows of, if any.
    pub fn instance(&self) -> Option<&LaunchedInstance> {
        match self {
            ProvisionPhase::WaitingForRunning(p) => Some(&p.instance),
            ProvisionPhase::AbandoningSpot(p) => Some(&p.instance),
            ProvisionPhase::WaitingForSsh(p) => Some(&p.instance),
            ProvisionPhase::Ready(p) => Some(&p.instance),
            ProvisionPhase::Interrupting(p) => Some(&p.instance),
            _ => None,
        }
    }

    pub fn instance_id(&self) -> Option<&str> {
        match self {
            ProvisionPhase::TerminatingInstance(p) => p.instance_id.as_deref(),
            other => other.instance().map(|i| i.instance_id.as_str()),
        }
    }

    pub fn public_ip(&self) -> Option<&str> {
        match self {
            ProvisionPhase::WaitingForSsh(p) => p.public_ip.as_deref(),
            ProvisionPhase::Ready(p) => p.public_ip.as_deref(),
            _ => None,
        }
    }

    /// `host:port` the session reaches the instance's SSH at, once known.
    pub fn ssh_endpoint(&self) -> Option<&str> {
        match self {
            ProvisionPhase::WaitingForSsh(p) => Some(&p.ssh_endpoint),
            ProvisionPhase::Ready(p) => Some(&p.ssh_endpoint),
            _ => None,
        }
    }

    /// The verified host key's fingerprint, once an SSH login worked.
    pub fn host_key_fingerprint(&self) -> Option<&str> {
        match self {
            ProvisionPhase::WaitingForSsh(p) => {
                p.ssh.verified.as_ref().map(|v| v.fingerprint.as_str())
            }
            ProvisionPhase::Ready(p) => Some(&p.host_key_fingerprint),
            _ => None,
        }
    }

    pub fn key(&self) -> Option<&KeyPairHandle> {
        match self {
            ProvisionPhase::ChoosingPlacement(p) => Some(&p.key),
            ProvisionPhase::RequestingSpot(p) => Some(&p.launch.key),
            ProvisionPhase::Launching(p) => Some(&p.launch.key),
            ProvisionPhase::TerminatingInstance(p) => p.key.as_ref(),
            ProvisionPhase::DeletingKeyPair(p) => Some(&p.key),
            other => other.instance().map(|i| &i.key),
        }
    }

    pub fn was_spot(&self) -> bool {
        self.instance().is_some_and(|i| i.was_spot)
    }

    /// Why a finished session ended as it did (`Failed`, `Interrupted`).
    pub fn end_reason(&self) -> Option<&str> {
        match self {
            ProvisionPhase::Failed(f) => Some(&f.reason),
            ProvisionPhase::Interrupted(i) => Some(&i.reason),
            _ => None,
        }
    }

    /// Interrupted and not finished yet: the shutdown command or the
    /// cleanup after it.
    pub fn is_interruption_underway(&self) -> bool {
        match self {
            ProvisionPhase::Interrupting(_) => true,
            ProvisionPhase::TerminatingInstance(p) => {
                matches!(p.cause, CleanupCause::Interruption(_))
            }
            ProvisionPhase::DeletingKeyPair(p) => matches!(p.cause, CleanupCause::Interruption(_)),
            _ => false,
        }
    }

    /// The session that takes over after an interruption, once one is named.
    pub fn replacement(&self) -> Option<&str> {
        let cause = match self {
            ProvisionPhase::Interrupting(p) => return p.replacement.as_deref(),
            ProvisionPhase::Interrupted(p) => return p.replacement.as_deref(),
            ProvisionPhase::TerminatingInstance(p) => &p.cause,
            ProvisionPhase::DeletingKeyPair(p) => &p.cause,
            _ => return None,
        };
        match cause {
            CleanupCause::Interruption(end) => end.replacement.as_deref(),
            CleanupCause::Failure(_) | CleanupCause::Teardown => None,
        }
    }
}
