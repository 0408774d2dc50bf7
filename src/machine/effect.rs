//! What the machine asks the world to do (`Effect`) and what the world
//! answers (`Input`). Every effect is idempotent: re-running it with the same
//! fields (its token or deterministic name) has the same result, which is what
//! lets a resumed session re-execute an intent that has no recorded outcome.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Timestamp;
use super::phase::{ConsoleFingerprints, ImageChoice, KeyPairHandle};
use super::token::ClientToken;

/// One side effect, as recorded in the intent log before it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// RunInstances with this `ClientToken`; same token, same instance.
    RunInstance {
        client_token: ClientToken,
        spot: bool,
        subnet_id: String,
        image: ImageChoice,
        key_name: String,
    },
    DescribeInstance {
        instance_id: String,
    },
    /// Read the host key fingerprints cloud-init printed to the console.
    ReadConsoleHostKeys {
        instance_id: String,
    },
    /// Connect over SSH, check the host key against `trusted`, authenticate.
    ProbeSsh {
        endpoint: String,
        user: String,
        private_key_path: Option<String>,
        /// `None` only under the insecure accept-any policy.
        trusted: Option<ConsoleFingerprints>,
    },
    /// TerminateInstances on the instance, and on any other live instance
    /// tagged with the session (all of them when the id is unknown);
    /// NotFound counts as done.
    TerminateInstance {
        instance_id: Option<String>,
        /// When that instance was launched: shortly after, EC2 may answer
        /// NotFound for an instance that exists, which is then not "done".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        launched_at: Option<Timestamp>,
    },
    /// DeleteKeyPair and remove the private key file; NotFound counts as done.
    DeleteKeyPair {
        key_name: String,
        private_key_path: Option<String>,
    },
}

/// The outcome of an effect, or a request from the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input")]
pub enum Input {
    Validated {
        image: ImageChoice,
    },
    /// The request cannot succeed as asked (bad AMI, unknown subnet, …).
    Rejected {
        code: String,
        message: String,
    },
    KeyPairReady {
        key: KeyPairHandle,
    },
    Launched {
        instance_id: String,
        was_spot: bool,
    },
    /// No capacity for this attempt (`InsufficientInstanceCapacity`, …).
    CapacityUnavailable {
        code: String,
        message: String,
    },
    InstancePending,
    InstanceRunning {
        public_ip: Option<String>,
        private_ip: Option<String>,
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
    },
    SshNotReady {
        reason: String,
    },
    /// The server presented a key the console never printed.
    HostKeyMismatch {
        presented: String,
    },
    InstanceTerminated,
    KeyPairDeleted,
    /// A failure that may pass (throttling, 5xx, network): retry later.
    TransientFailure {
        message: String,
    },
    TeardownRequested,
}

/// The name of an input without its data: what the table uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum InputKind {
    Validated,
    Rejected,
    KeyPairReady,
    Launched,
    CapacityUnavailable,
    InstancePending,
    InstanceRunning,
    InstanceNotVisible,
    InstanceGone,
    ConsoleHostKeys,
    ConsoleNotReady,
    SshReady,
    SshNotReady,
    HostKeyMismatch,
    InstanceTerminated,
    KeyPairDeleted,
    TransientFailure,
    TeardownRequested,
}

impl Input {
    pub fn kind(&self) -> InputKind {
        match self {
            Input::Validated { .. } => InputKind::Validated,
            Input::Rejected { .. } => InputKind::Rejected,
            Input::KeyPairReady { .. } => InputKind::KeyPairReady,
            Input::Launched { .. } => InputKind::Launched,
            Input::CapacityUnavailable { .. } => InputKind::CapacityUnavailable,
            Input::InstancePending => InputKind::InstancePending,
            Input::InstanceRunning { .. } => InputKind::InstanceRunning,
            Input::InstanceNotVisible => InputKind::InstanceNotVisible,
            Input::InstanceGone { .. } => InputKind::InstanceGone,
            Input::ConsoleHostKeys { .. } => InputKind::ConsoleHostKeys,
            Input::ConsoleNotReady => InputKind::ConsoleNotReady,
            Input::SshReady { .. } => InputKind::SshReady,
            Input::SshNotReady { .. } => InputKind::SshNotReady,
            Input::HostKeyMismatch { .. } => InputKind::HostKeyMismatch,
            Input::InstanceTerminated => InputKind::InstanceTerminated,
            Input::KeyPairDeleted => InputKind::KeyPairDeleted,
            Input::TransientFailure { .. } => InputKind::TransientFailure,
            Input::TeardownRequested => InputKind::TeardownRequested,
        }
    }
}

impl InputKind {
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Validated => "Validated",
            InputKind::Rejected => "Rejected",
            InputKind::KeyPairReady => "KeyPairReady",
            InputKind::Launched => "Launched",
            InputKind::CapacityUnavailable => "CapacityUnavailable",
            InputKind::InstancePending => "InstancePending",
            InputKind::InstanceRunning => "InstanceRunning",
            InputKind::InstanceNotVisible => "InstanceNotVisible",
            InputKind::InstanceGone => "InstanceGone",
            InputKind::ConsoleHostKeys => "ConsoleHostKeys",
            InputKind::ConsoleNotReady => "ConsoleNotReady",
            InputKind::SshReady => "SshReady",
            InputKind::SshNotReady => "SshNotReady",
            InputKind::HostKeyMismatch => "HostKeyMismatch",
            InputKind::InstanceTerminated => "InstanceTerminated",
            InputKind::KeyPairDeleted => "KeyPairDeleted",
            InputKind::TransientFailure => "TransientFailure",
            InputKind::TeardownRequested => "TeardownRequested",
        }
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
        match self {
            Effect::ValidateRequest => "ValidateRequest",
            Effect::EnsureKeyPair { .. } => "EnsureKeyPair",
            Effect::RunInstance { .. } => "RunInstance",
            Effect::DescribeInstance { .. } => "DescribeInstance",
            Effect::ReadConsoleHostKeys { .. } => "ReadConsoleHostKeys",
            Effect::ProbeSsh { .. } => "ProbeSsh",
            Effect::TerminateInstance { .. } => "TerminateInstance",
            Effect::DeleteKeyPair { .. } => "DeleteKeyPair",
        }
    }

    /// The inputs this effect may answer with; scripted fakes and property
    /// tests draw from exactly this set.
    pub fn possible_outcomes(&self) -> &'static [InputKind] {
        use InputKind::*;
        match self {
            Effect::ValidateRequest => &[Validated, Rejected, TransientFailure],
            Effect::EnsureKeyPair { .. } => &[KeyPairReady, Rejected, TransientFailure],
            Effect::RunInstance { .. } => {
                &[Launched, CapacityUnavailable, Rejected, TransientFailure]
            }
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
            Effect::TerminateInstance { .. } => &[InstanceTerminated, TransientFailure],
            Effect::DeleteKeyPair { .. } => &[KeyPairDeleted, TransientFailure],
        }
    }
}
