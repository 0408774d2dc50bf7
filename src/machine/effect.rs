//! What the machine asks the world to do (`Effect`) and what the world
//! answers (`Input`). Every EC2 and file effect is idempotent: re-running it
//! with the same fields (its token or deterministic name) has the same result,
//! which is what lets a resumed session re-execute an intent that has no
//! recorded outcome. The one exception is the user's own shutdown command
//! (`RunShutdownCommand`): resumed, it runs again, so it must be safe to repeat.

use std::fmt;

use serde::{Deserialize, Serialize};
use strum::{EnumDiscriminants, EnumIter, IntoStaticStr};

use super::Timestamp;
use super::phase::{
    ConsoleFingerprints, ImageChoice, InterruptionNotice, KeyPairHandle, SpotRequestStatus,
    StatusReport,
};
use super::placement::PlacementFacts;
use super::token::ClientToken;
use crate::error_code::{AwsErrorCode, RejectionCode};

/// One side effect, as recorded in the intent log before it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoStaticStr)]
#[serde(tag = "effect")]
pub enum Effect {
    /// Check the AMI (resolving an alias), subnets and security groups exist.
    ValidateRequest,
    /// Make sure the key pair `key_name` exists and, when owned, that its
    /// private key is on disk at `private_key_path`.
    EnsureKeyPair {
        key_name: String,
        private_key_path: Option<String>,
    },
    /// Gather what decides where to launch: the capacity failures this
    /// process saw lately in `zones`, and for spot the placement scores,
    /// recent spot prices and the on-demand price. Never fails: what it
    /// cannot learn it reports as a gap.
    FindPlacement {
        spot: bool,
        zones: Vec<String>,
        zone_ids: Vec<String>,
        platform: Option<String>,
    },
    /// RunInstances with this `ClientToken`; same token, same instance.
    RunInstance {
        client_token: ClientToken,
        spot: bool,
        subnet_id: String,
        image: ImageChoice,
        key_name: String,
        /// The subnet's zone, so a capacity failure is remembered for it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        zone: Option<String>,
    },
    /// DescribeInstances, and for a spot instance its request's status.
    DescribeInstance {
        instance_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spot_request_id: Option<String>,
    },
    /// CancelSpotInstanceRequests: no instance may come of the request
    /// after this (one that already did is terminated next).
    CancelSpotRequest { request_id: String },
    /// Read the host key fingerprints cloud-init printed to the console.
    ReadConsoleHostKeys { instance_id: String },
    /// Connect over SSH, check the host key against `trusted`, authenticate;
    /// on success, write the verified host key to `known_hosts_path`.
    ProbeSsh {
        endpoint: String,
        user: String,
        private_key_path: Option<String>,
        /// `None` only under the insecure accept-any policy.
        trusted: Option<ConsoleFingerprints>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        known_hosts_path: Option<String>,
    },
    /// DescribeInstanceStatus (system and instance status checks).
    DescribeInstanceStatus { instance_id: String },
    /// TerminateInstances on the instance, and on any other live instance
    /// tagged with the session (all of them when the id is unknown). It
    /// reports what EC2 said; whether "not found" means "gone" is the
    /// machine's call.
    TerminateInstance { instance_id: Option<String> },
    /// Run the configured shutdown command on the instance over SSH,
    /// trusting only the host key verified at readiness, ending by
    /// `deadline`. Whatever it answers, cleanup follows.
    RunShutdownCommand {
        endpoint: String,
        user: String,
        private_key_path: Option<String>,
        host_key_fingerprint: String,
        command: String,
        deadline: Timestamp,
    },
    /// DeleteKeyPair and remove the private key file; NotFound counts as
    /// done once DescribeKeyPairs agrees.
    DeleteKeyPair {
        key_name: String,
        private_key_path: Option<String>,
    },
}

/// The outcome of an effect, or an input from outside (a teardown request).
/// [`InputKind`] is derived from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, EnumDiscriminants)]
#[serde(tag = "input")]
#[strum_discriminants(
    name(InputKind),
    doc = "The name of an input without its data: what the table uses.",
    derive(Hash, PartialOrd, Ord, Serialize, Deserialize, EnumIter, IntoStaticStr)
)]
pub enum Input {
    Validated {
        image: ImageChoice,
        /// The availability zone of each configured subnet, in config order.
        #[serde(default)]
        zones: Vec<String>,
        /// Their zone ids (`use1-az6`), in the same order.
        #[serde(default)]
        zone_ids: Vec<String>,
    },
    PlacementFound {
        facts: Box<PlacementFacts>,
    },
    /// The request cannot succeed as asked (bad AMI, unknown subnet, …).
    Rejected {
        code: RejectionCode,
        message: String,
    },
    /// RunInstances was refused, and no try of it may have acted unseen (a
    /// timeout, a dropped connection): the launch made nothing. The driver
    /// reports a refusal of a launch an earlier driver may have sent as
    /// [`Input::Rejected`] (see [`Input::after_earlier_send`]).
    LaunchRefused {
        code: RejectionCode,
        message: String,
    },
    KeyPairReady {
        key: KeyPairHandle,
    },
    Launched {
        instance_id: String,
        was_spot: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spot_request_id: Option<String>,
    },
    /// No capacity for this attempt (`InsufficientInstanceCapacity`, …).
    CapacityUnavailable {
        code: AwsErrorCode,
        message: String,
    },
    /// An account quota is reached (`VcpuLimitExceeded`, …): no other
    /// subnet will help. The message says how to raise it.
    QuotaExceeded {
        code: AwsErrorCode,
        message: String,
    },
    InstancePending {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spot_request: Option<Box<SpotRequestStatus>>,
    },
    InstanceRunning {
        public_ip: Option<String>,
        private_ip: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spot_request: Option<Box<SpotRequestStatus>>,
    },
    /// Eventual consistency right after launch: not yet visible, not gone.
    InstanceNotVisible,
    /// The instance is shutting down or terminated without us asking.
    InstanceGone {
        state: String,
    },
    ConsoleHostKeys {
        fingerprints: ConsoleFingerprints,
    },
    ConsoleNotReady,
    SshReady {
        host_key_fingerprint: String,
        /// The presented key, `algorithm base64` (empty in logs written
        /// before it was kept).
        #[serde(default)]
        host_key: String,
    },
    StatusChecksReported {
        report: StatusReport,
    },
    SshNotReady {
        reason: String,
    },
    /// The server presented a key the console never printed.
    HostKeyMismatch {
        presented: String,
    },
    /// Every instance asked for (and every live one tagged with the
    /// session) acknowledged termination.
    InstanceTerminated,
    /// EC2 does not know the instance by its id: long gone, or launched so
    /// recently that EC2 does not show it yet.
    InstanceNotFound,
    /// A sweep by the session tag found no live instance: none was made, or
    /// one just made is not visible yet.
    NoInstanceFound,
    KeyPairDeleted,
    /// The spot request is cancelled (or was already closed or gone).
    SpotRequestCancelled {
        state: Option<String>,
        /// The instance the request produced, if it did.
        instance_id: Option<String>,
    },
    /// A failure that may pass (throttling, 5xx, network): retry later.
    TransientFailure {
        message: String,
    },
    /// From outside: the caller wants the session's resources gone.
    TeardownRequested,
    /// From outside: a watcher saw EC2's notice that it takes the spot
    /// instance back.
    InterruptionNoticed {
        notice: InterruptionNotice,
    },
    /// The shutdown command ran (or could not): how it went, for the record.
    ShutdownCommandFinished {
        outcome: String,
    },
}

impl Input {
    pub fn kind(&self) -> InputKind {
        self.into()
    }

    /// This answer to an intent an earlier driver may already have sent
    /// (a resumed session): its send may have launched, so a refusal now
    /// no longer shows the launch made nothing.
    #[must_use]
    pub fn after_earlier_send(self) -> Input {
        match self {
            Input::LaunchRefused { code, message } => Input::Rejected { code, message },
            other => other,
        }
    }
}

/// The inputs that come from outside a session rather than from its own
/// effects: the only ones a caller may deliver (an effect's answer forged
/// by a caller could, say, declare an instance terminated that is not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutsideInput {
    TeardownRequested,
    InterruptionNoticed(InterruptionNotice),
}

impl From<OutsideInput> for Input {
    fn from(input: OutsideInput) -> Input {
        match input {
            OutsideInput::TeardownRequested => Input::TeardownRequested,
            OutsideInput::InterruptionNoticed(notice) => Input::InterruptionNoticed { notice },
        }
    }
}

impl InputKind {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Effect {
    /// A short name for logs and the CLI.
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Effects that talk to the instance over SSH rather than to EC2's
    /// API: the two are different resources, bounded apart.
    pub fn over_ssh(&self) -> bool {
        matches!(
            self,
            Effect::ProbeSsh { .. } | Effect::RunShutdownCommand { .. }
        )
    }

    /// Effects that only look: a driver may abandon one mid-way (for an
    /// outside input) without losing track of anything. Effects that
    /// create or remove something always run to their answer.
    pub fn only_looks(&self) -> bool {
        matches!(
            self,
            Effect::ValidateRequest
                | Effect::FindPlacement { .. }
                | Effect::DescribeInstance { .. }
                | Effect::DescribeInstanceStatus { .. }
                | Effect::ReadConsoleHostKeys { .. }
                | Effect::ProbeSsh { .. }
        )
    }

    /// The inputs this effect may answer with; scripted fakes and property
    /// tests draw from exactly this set.
    pub fn possible_outcomes(&self) -> &'static [InputKind] {
        use InputKind::*;
        match self {
            Effect::ValidateRequest => &[Validated, Rejected, TransientFailure],
            Effect::EnsureKeyPair { .. } => &[KeyPairReady, Rejected, TransientFailure],
            Effect::FindPlacement { .. } => &[PlacementFound],
            Effect::CancelSpotRequest { .. } => &[SpotRequestCancelled, TransientFailure],
            Effect::RunInstance { .. } => &[
                Launched,
                CapacityUnavailable,
                QuotaExceeded,
                LaunchRefused,
                Rejected,
                TransientFailure,
            ],
            Effect::DescribeInstance { .. } => &[
                InstancePending,
                InstanceRunning,
                InstanceNotVisible,
                InstanceGone,
                Rejected,
                TransientFailure,
            ],
            Effect::ReadConsoleHostKeys { .. } => {
                &[ConsoleHostKeys, ConsoleNotReady, Rejected, TransientFailure]
            }
            Effect::ProbeSsh { .. } => &[
                SshReady,
                SshNotReady,
                HostKeyMismatch,
                Rejected,
                TransientFailure,
            ],
            Effect::DescribeInstanceStatus { .. } => &[
                StatusChecksReported,
                InstanceGone,
                Rejected,
                TransientFailure,
            ],
            Effect::TerminateInstance {
                instance_id: Some(_),
            } => &[InstanceTerminated, InstanceNotFound, TransientFailure],
            Effect::TerminateInstance { instance_id: None } => {
                &[InstanceTerminated, NoInstanceFound, TransientFailure]
            }
            Effect::DeleteKeyPair { .. } => &[KeyPairDeleted, TransientFailure],
            Effect::RunShutdownCommand { .. } => &[ShutdownCommandFinished],
        }
    }
}
