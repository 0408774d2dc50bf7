//! The transition table: the one source of truth for which `(from, input, to)`
//! steps exist. `step` refuses any input a phase has no row for, checks every
//! step it takes against this table, and the diagrams in `state-diagrams/`
//! are generated from it.

use super::effect::InputKind;
use super::phase::PhaseKind;

use InputKind as I;
use PhaseKind as P;

/// One row: in phase `from`, input `input` may lead to phase `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: PhaseKind,
    pub input: InputKind,
    pub to: PhaseKind,
}

const fn t(from: PhaseKind, input: InputKind, to: PhaseKind) -> Transition {
    Transition { from, input, to }
}

/// Every step the machine can take. Where one `(from, input)` has several
/// rows, the phase data decides (deadline passed, retry budget spent, a spot
/// fallback allowed, an owned key pair to delete).
pub const TRANSITIONS: &[Transition] = &[
    t(P::Validating, I::Validated, P::PreparingKeyPair),
    t(P::Validating, I::Rejected, P::Failed),
    t(P::Validating, I::TransientFailure, P::Validating),
    t(P::Validating, I::TransientFailure, P::Failed),
    t(P::Validating, I::TeardownRequested, P::TornDown),
    //
    t(P::PreparingKeyPair, I::KeyPairReady, P::RequestingSpot),
    t(P::PreparingKeyPair, I::KeyPairReady, P::Launching),
    t(P::PreparingKeyPair, I::Rejected, P::DeletingKeyPair),
    t(P::PreparingKeyPair, I::Rejected, P::Failed),
    t(
        P::PreparingKeyPair,
        I::TransientFailure,
        P::PreparingKeyPair,
    ),
    t(P::PreparingKeyPair, I::TransientFailure, P::DeletingKeyPair),
    t(P::PreparingKeyPair, I::TransientFailure, P::Failed),
    t(
        P::PreparingKeyPair,
        I::TeardownRequested,
        P::DeletingKeyPair,
    ),
    t(P::PreparingKeyPair, I::TeardownRequested, P::TornDown),
    //
    t(P::RequestingSpot, I::Launched, P::WaitingForRunning),
    t(P::RequestingSpot, I::CapacityUnavailable, P::RequestingSpot),
    t(P::RequestingSpot, I::CapacityUnavailable, P::Launching),
    t(
        P::RequestingSpot,
        I::CapacityUnavailable,
        P::DeletingKeyPair,
    ),
    t(P::RequestingSpot, I::CapacityUnavailable, P::Failed),
    // An unanswered launch may have made an instance: cleanup sweeps by tag.
    t(P::RequestingSpot, I::Rejected, P::TerminatingInstance),
    t(P::RequestingSpot, I::TransientFailure, P::RequestingSpot),
    t(
        P::RequestingSpot,
        I::TransientFailure,
        P::TerminatingInstance,
    ),
    t(
        P::RequestingSpot,
        I::TeardownRequested,
        P::TerminatingInstance,
    ),
    //
    t(P::Launching, I::Launched, P::WaitingForRunning),
    t(P::Launching, I::CapacityUnavailable, P::Launching),
    t(P::Launching, I::CapacityUnavailable, P::DeletingKeyPair),
    t(P::Launching, I::CapacityUnavailable, P::Failed),
    t(P::Launching, I::Rejected, P::TerminatingInstance),
    t(P::Launching, I::TransientFailure, P::Launching),
    t(P::Launching, I::TransientFailure, P::TerminatingInstance),
    t(P::Launching, I::TeardownRequested, P::TerminatingInstance),
    //
    t(
        P::WaitingForRunning,
        I::InstancePending,
        P::WaitingForRunning,
    ),
    t(
        P::WaitingForRunning,
        I::InstancePending,
        P::TerminatingInstance,
    ),
    t(
        P::WaitingForRunning,
        I::InstanceNotVisible,
        P::WaitingForRunning,
    ),
    t(
        P::WaitingForRunning,
        I::InstanceNotVisible,
        P::TerminatingInstance,
    ),
    t(P::WaitingForRunning, I::InstanceRunning, P::WaitingForSsh),
    // Running but unreachable: no public IP and no endpoint override.
    t(
        P::WaitingForRunning,
        I::InstanceRunning,
        P::TerminatingInstance,
    ),
    t(
        P::WaitingForRunning,
        I::InstanceGone,
        P::TerminatingInstance,
    ),
    t(P::WaitingForRunning, I::Rejected, P::TerminatingInstance),
    t(
        P::WaitingForRunning,
        I::TransientFailure,
        P::WaitingForRunning,
    ),
    t(
        P::WaitingForRunning,
        I::TransientFailure,
        P::TerminatingInstance,
    ),
    t(
        P::WaitingForRunning,
        I::TeardownRequested,
        P::TerminatingInstance,
    ),
    // A spot instance that is late or reclaimed, when fallback is allowed.
    t(P::WaitingForRunning, I::InstancePending, P::AbandoningSpot),
    t(
        P::WaitingForRunning,
        I::InstanceNotVisible,
        P::AbandoningSpot,
    ),
    t(P::WaitingForRunning, I::InstanceGone, P::AbandoningSpot),
    //
    t(P::AbandoningSpot, I::InstanceTerminated, P::Launching),
    t(P::AbandoningSpot, I::TransientFailure, P::AbandoningSpot),
    t(
        P::AbandoningSpot,
        I::TransientFailure,
        P::TerminatingInstance,
    ),
    t(
        P::AbandoningSpot,
        I::TeardownRequested,
        P::TerminatingInstance,
    ),
    //
    t(P::WaitingForSsh, I::ConsoleHostKeys, P::WaitingForSsh),
    t(P::WaitingForSsh, I::ConsoleNotReady, P::WaitingForSsh),
    t(P::WaitingForSsh, I::ConsoleNotReady, P::TerminatingInstance),
    t(P::WaitingForSsh, I::SshReady, P::Ready),
    t(P::WaitingForSsh, I::SshNotReady, P::WaitingForSsh),
    t(P::WaitingForSsh, I::SshNotReady, P::TerminatingInstance),
    t(P::WaitingForSsh, I::HostKeyMismatch, P::TerminatingInstance),
    t(P::WaitingForSsh, I::Rejected, P::TerminatingInstance),
    t(P::WaitingForSsh, I::TransientFailure, P::WaitingForSsh),
    t(
        P::WaitingForSsh,
        I::TransientFailure,
        P::TerminatingInstance,
    ),
    t(
        P::WaitingForSsh,
        I::TeardownRequested,
        P::TerminatingInstance,
    ),
    //
    t(P::Ready, I::TeardownRequested, P::TerminatingInstance),
    //
    t(
        P::TerminatingInstance,
        I::InstanceTerminated,
        P::DeletingKeyPair,
    ),
    t(P::TerminatingInstance, I::InstanceTerminated, P::Failed),
    t(P::TerminatingInstance, I::InstanceTerminated, P::TornDown),
    t(
        P::TerminatingInstance,
        I::TransientFailure,
        P::TerminatingInstance,
    ),
    //
    t(P::DeletingKeyPair, I::KeyPairDeleted, P::Failed),
    t(P::DeletingKeyPair, I::KeyPairDeleted, P::TornDown),
    t(P::DeletingKeyPair, I::TransientFailure, P::DeletingKeyPair),
];

/// Whether the phase has any row for this input.
pub fn accepts(from: PhaseKind, input: InputKind) -> bool {
    TRANSITIONS
        .iter()
        .any(|r| r.from == from && r.input == input)
}

pub fn contains(from: PhaseKind, input: InputKind, to: PhaseKind) -> bool {
    TRANSITIONS.contains(&t(from, input, to))
}

/// The inputs a phase accepts, in table order.
pub fn inputs_of(from: PhaseKind) -> Vec<InputKind> {
    let mut inputs: Vec<InputKind> = Vec::new();
    for row in TRANSITIONS.iter().filter(|r| r.from == from) {
        if !inputs.contains(&row.input) {
            inputs.push(row.input);
        }
    }
    inputs
}
