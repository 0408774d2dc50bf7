//! The transition table: the one source of truth for which steps exist.
//! A row is `(from, input, guards, to)`: in phase `from`, input `input`
//! leads to `to` when all of `guards` hold. `step` refuses any input a phase
//! has no row for, checks every decision against this table, and the
//! diagrams in `state-diagrams/` are generated from it.

use super::effect::InputKind;
use super::guard::{Guard, Guards};
use super::phase::PhaseKind;

use Guard as G;
use InputKind as I;
use PhaseKind as P;

/// One row: in phase `from`, input `input` leads to phase `to` when `guards` hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: PhaseKind,
    pub input: InputKind,
    pub guards: Guards,
    pub to: PhaseKind,
}

const fn t(from: PhaseKind, input: InputKind, guards: &[Guard], to: PhaseKind) -> Transition {
    Transition {
        from,
        input,
        guards: Guards::of(guards),
        to,
    }
}

/// Every step the machine can take. Kept one row a line, as a table.
#[rustfmt::skip]
pub const TRANSITIONS: &[Transition] = &[
    t(P::Validating, I::Validated, &[], P::PreparingKeyPair),
    t(P::Validating, I::Rejected, &[], P::Failed),
    t(P::Validating, I::TransientFailure, &[G::TriesLeft], P::Validating),
    t(P::Validating, I::TransientFailure, &[G::TriesSpent], P::Failed),
    t(P::Validating, I::TeardownRequested, &[], P::TornDown),
    //
    t(P::PreparingKeyPair, I::KeyPairReady, &[], P::ChoosingPlacement),
    // The pair may exist even though EnsureKeyPair did not answer ready.
    t(P::PreparingKeyPair, I::Rejected, &[G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::PreparingKeyPair, I::Rejected, &[G::KeyPairNotOurs], P::Failed),
    t(P::PreparingKeyPair, I::TransientFailure, &[G::TriesLeft], P::PreparingKeyPair),
    t(P::PreparingKeyPair, I::TransientFailure, &[G::TriesSpent, G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::PreparingKeyPair, I::TransientFailure, &[G::TriesSpent, G::KeyPairNotOurs], P::Failed),
    t(P::PreparingKeyPair, I::TeardownRequested, &[G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::PreparingKeyPair, I::TeardownRequested, &[G::KeyPairNotOurs], P::TornDown),
    //
    // Placement never fails: what it cannot learn leaves the config order.
    t(P::ChoosingPlacement, I::PlacementFound, &[G::SpotRequested], P::RequestingSpot),
    // Spot just ran out in every zone (a replacement after a reclaim): on-demand at once.
    t(P::ChoosingPlacement, I::PlacementFound, &[G::SpotScarce], P::Launching),
    t(P::ChoosingPlacement, I::PlacementFound, &[G::OnDemandOnly], P::Launching),
    t(P::ChoosingPlacement, I::TeardownRequested, &[G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::ChoosingPlacement, I::TeardownRequested, &[G::KeyPairNotOurs], P::TornDown),
    //
    t(P::RequestingSpot, I::Launched, &[], P::WaitingForRunning),
    t(P::RequestingSpot, I::CapacityUnavailable, &[G::MoreSubnets], P::RequestingSpot),
    t(P::RequestingSpot, I::CapacityUnavailable, &[G::LastSubnet, G::FallbackAllowed], P::Launching),
    t(P::RequestingSpot, I::CapacityUnavailable, &[G::LastSubnet, G::NoFallback, G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::RequestingSpot, I::CapacityUnavailable, &[G::LastSubnet, G::NoFallback, G::KeyPairNotOurs], P::Failed),
    // A quota holds in every subnet: fall back at once, or give up.
    t(P::RequestingSpot, I::QuotaExceeded, &[G::FallbackAllowed], P::Launching),
    t(P::RequestingSpot, I::QuotaExceeded, &[G::NoFallback, G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::RequestingSpot, I::QuotaExceeded, &[G::NoFallback, G::KeyPairNotOurs], P::Failed),
    // An unanswered launch may have made an instance: cleanup sweeps by tag.
    t(P::RequestingSpot, I::Rejected, &[], P::TerminatingInstance),
    // Refused with every try answered: the sweep is believed at once.
    t(P::RequestingSpot, I::LaunchRefused, &[G::EveryTryAnswered], P::TerminatingInstance),
    t(P::RequestingSpot, I::LaunchRefused, &[G::AnswerMayBeLost], P::TerminatingInstance),
    t(P::RequestingSpot, I::TransientFailure, &[G::TriesLeft], P::RequestingSpot),
    t(P::RequestingSpot, I::TransientFailure, &[G::TriesSpent], P::TerminatingInstance),
    t(P::RequestingSpot, I::TeardownRequested, &[], P::TerminatingInstance),
    //
    t(P::Launching, I::Launched, &[], P::WaitingForRunning),
    t(P::Launching, I::CapacityUnavailable, &[G::MoreSubnets], P::Launching),
    t(P::Launching, I::CapacityUnavailable, &[G::LastSubnet, G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::Launching, I::CapacityUnavailable, &[G::LastSubnet, G::KeyPairNotOurs], P::Failed),
    t(P::Launching, I::QuotaExceeded, &[G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::Launching, I::QuotaExceeded, &[G::KeyPairNotOurs], P::Failed),
    t(P::Launching, I::Rejected, &[], P::TerminatingInstance),
    t(P::Launching, I::LaunchRefused, &[G::EveryTryAnswered], P::TerminatingInstance),
    t(P::Launching, I::LaunchRefused, &[G::AnswerMayBeLost], P::TerminatingInstance),
    t(P::Launching, I::TransientFailure, &[G::TriesLeft], P::Launching),
    t(P::Launching, I::TransientFailure, &[G::TriesSpent], P::TerminatingInstance),
    t(P::Launching, I::TeardownRequested, &[], P::TerminatingInstance),
    //
    t(P::WaitingForRunning, I::InstancePending, &[G::BeforeDeadline], P::WaitingForRunning),
    t(P::WaitingForRunning, I::InstancePending, &[G::PastDeadline, G::FallbackAllowed], P::AbandoningSpot),
    t(P::WaitingForRunning, I::InstancePending, &[G::PastDeadline, G::NoFallback], P::TerminatingInstance),
    t(P::WaitingForRunning, I::InstanceNotVisible, &[G::BeforeDeadline], P::WaitingForRunning),
    t(P::WaitingForRunning, I::InstanceNotVisible, &[G::PastDeadline, G::FallbackAllowed], P::AbandoningSpot),
    t(P::WaitingForRunning, I::InstanceNotVisible, &[G::PastDeadline, G::NoFallback], P::TerminatingInstance),
    t(P::WaitingForRunning, I::InstanceRunning, &[G::Reachable], P::WaitingForSsh),
    t(P::WaitingForRunning, I::InstanceRunning, &[G::Unreachable], P::TerminatingInstance),
    // A spot instance reclaimed before it ran is replaced when fallback is allowed.
    t(P::WaitingForRunning, I::InstanceGone, &[G::FallbackAllowed], P::AbandoningSpot),
    t(P::WaitingForRunning, I::InstanceGone, &[G::NoFallback], P::TerminatingInstance),
    t(P::WaitingForRunning, I::Rejected, &[], P::TerminatingInstance),
    t(P::WaitingForRunning, I::TransientFailure, &[G::TriesLeft], P::WaitingForRunning),
    t(P::WaitingForRunning, I::TransientFailure, &[G::TriesSpent], P::TerminatingInstance),
    t(P::WaitingForRunning, I::TeardownRequested, &[], P::TerminatingInstance),
    //
    // Cancel the spot request first, so no instance comes of it later.
    t(P::AbandoningSpot, I::SpotRequestCancelled, &[], P::AbandoningSpot),
    t(P::AbandoningSpot, I::InstanceTerminated, &[], P::Launching),
    t(P::AbandoningSpot, I::InstanceNotFound, &[G::JustLaunched], P::AbandoningSpot),
    t(P::AbandoningSpot, I::InstanceNotFound, &[G::GraceOver], P::Launching),
    t(P::AbandoningSpot, I::TransientFailure, &[G::TriesLeft], P::AbandoningSpot),
    t(P::AbandoningSpot, I::TransientFailure, &[G::TriesSpent], P::TerminatingInstance),
    t(P::AbandoningSpot, I::TeardownRequested, &[], P::TerminatingInstance),
    //
    // SSH and status checks are polled side by side; the last to pass makes Ready.
    t(P::WaitingForSsh, I::ConsoleHostKeys, &[], P::WaitingForSsh),
    t(P::WaitingForSsh, I::ConsoleNotReady, &[G::BeforeDeadline], P::WaitingForSsh),
    t(P::WaitingForSsh, I::ConsoleNotReady, &[G::PastDeadline], P::TerminatingInstance),
    t(P::WaitingForSsh, I::SshReady, &[G::ChecksPassed], P::Ready),
    t(P::WaitingForSsh, I::SshReady, &[G::ChecksPending], P::WaitingForSsh),
    t(P::WaitingForSsh, I::SshNotReady, &[G::BeforeDeadline, G::ProbesLeft], P::WaitingForSsh),
    t(P::WaitingForSsh, I::SshNotReady, &[G::PastDeadline, G::ProbesLeft], P::TerminatingInstance),
    t(P::WaitingForSsh, I::SshNotReady, &[G::ProbesSpent], P::TerminatingInstance),
    t(P::WaitingForSsh, I::StatusChecksReported, &[G::ChecksPassed, G::SshVerified], P::Ready),
    t(P::WaitingForSsh, I::StatusChecksReported, &[G::ChecksPassed, G::SshPending], P::WaitingForSsh),
    t(P::WaitingForSsh, I::StatusChecksReported, &[G::BeforeDeadline, G::ChecksPending], P::WaitingForSsh),
    t(P::WaitingForSsh, I::StatusChecksReported, &[G::PastDeadline, G::ChecksPending], P::TerminatingInstance),
    t(P::WaitingForSsh, I::HostKeyMismatch, &[], P::TerminatingInstance),
    // A spot instance reclaimed before it is Ready is replaced when fallback is allowed.
    t(P::WaitingForSsh, I::InstanceGone, &[G::FallbackAllowed], P::AbandoningSpot),
    t(P::WaitingForSsh, I::InstanceGone, &[G::NoFallback], P::TerminatingInstance),
    t(P::WaitingForSsh, I::Rejected, &[], P::TerminatingInstance),
    t(P::WaitingForSsh, I::TransientFailure, &[G::TriesLeft], P::WaitingForSsh),
    t(P::WaitingForSsh, I::TransientFailure, &[G::TriesSpent], P::TerminatingInstance),
    t(P::WaitingForSsh, I::TeardownRequested, &[], P::TerminatingInstance),
    //
    t(P::Ready, I::TeardownRequested, &[], P::TerminatingInstance),
    // A spot interruption notice: the shutdown command in the window, then cleanup.
    t(P::Ready, I::InterruptionNoticed, &[G::ShutdownCommand], P::Interrupting),
    t(P::Ready, I::InterruptionNoticed, &[G::NoShutdownCommand], P::TerminatingInstance),
    //
    t(P::Interrupting, I::ShutdownCommandFinished, &[], P::TerminatingInstance),
    t(P::Interrupting, I::TeardownRequested, &[], P::TerminatingInstance),
    //
    t(P::TerminatingInstance, I::InstanceTerminated, &[G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::TerminatingInstance, I::InstanceTerminated, &[G::KeyPairNotOurs, G::OnFailure], P::Failed),
    t(P::TerminatingInstance, I::InstanceTerminated, &[G::KeyPairNotOurs, G::OnTeardown], P::TornDown),
    t(P::TerminatingInstance, I::InstanceTerminated, &[G::KeyPairNotOurs, G::OnInterruption], P::Interrupted),
    // NotFound right after a launch is EC2 not showing the instance yet.
    t(P::TerminatingInstance, I::InstanceNotFound, &[G::JustLaunched], P::TerminatingInstance),
    t(P::TerminatingInstance, I::InstanceNotFound, &[G::GraceOver, G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::TerminatingInstance, I::InstanceNotFound, &[G::GraceOver, G::KeyPairNotOurs, G::OnFailure], P::Failed),
    t(P::TerminatingInstance, I::InstanceNotFound, &[G::GraceOver, G::KeyPairNotOurs, G::OnTeardown], P::TornDown),
    t(P::TerminatingInstance, I::InstanceNotFound, &[G::GraceOver, G::KeyPairNotOurs, G::OnInterruption], P::Interrupted),
    t(P::TerminatingInstance, I::NoInstanceFound, &[G::JustLaunched], P::TerminatingInstance),
    t(P::TerminatingInstance, I::NoInstanceFound, &[G::GraceOver, G::OwnsKeyPair], P::DeletingKeyPair),
    t(P::TerminatingInstance, I::NoInstanceFound, &[G::GraceOver, G::KeyPairNotOurs, G::OnFailure], P::Failed),
    t(P::TerminatingInstance, I::NoInstanceFound, &[G::GraceOver, G::KeyPairNotOurs, G::OnTeardown], P::TornDown),
    t(P::TerminatingInstance, I::NoInstanceFound, &[G::GraceOver, G::KeyPairNotOurs, G::OnInterruption], P::Interrupted),
    // Cleanup never gives up: it retries, and now and then stops to say why.
    t(P::TerminatingInstance, I::TransientFailure, &[G::KeepTrying], P::TerminatingInstance),
    t(P::TerminatingInstance, I::TransientFailure, &[G::AskOperator], P::TerminatingInstance),
    t(P::TerminatingInstance, I::TeardownRequested, &[G::AlreadyCleaningUp], P::TerminatingInstance),
    //
    t(P::DeletingKeyPair, I::KeyPairDeleted, &[G::OnFailure], P::Failed),
    t(P::DeletingKeyPair, I::KeyPairDeleted, &[G::OnTeardown], P::TornDown),
    t(P::DeletingKeyPair, I::KeyPairDeleted, &[G::OnInterruption], P::Interrupted),
    t(P::DeletingKeyPair, I::TransientFailure, &[G::KeepTrying], P::DeletingKeyPair),
    t(P::DeletingKeyPair, I::TransientFailure, &[G::AskOperator], P::DeletingKeyPair),
    t(P::DeletingKeyPair, I::TeardownRequested, &[G::AlreadyCleaningUp], P::DeletingKeyPair),
];

/// Whether the phase has any row for this input.
pub fn accepts(from: PhaseKind, input: InputKind) -> bool {
    TRANSITIONS
        .iter()
        .any(|r| r.from == from && r.input == input)
}

pub fn contains(from: PhaseKind, input: InputKind, guards: Guards, to: PhaseKind) -> bool {
    TRANSITIONS.contains(&Transition {
        from,
        input,
        guards,
        to,
    })
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
