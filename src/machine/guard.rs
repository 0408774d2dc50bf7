//! Named guards: where one `(phase, input)` can lead to several phases, each
//! row of the table says which condition picks it, and the diagrams print it.
//!
//! Invariant: a decision names the guards it tested; `step` accepts it only
//! if the table has the row with exactly those guards.

use std::fmt;

use strum::{EnumIter, IntoEnumIterator};

use super::{CLEANUP_PATIENCE, MAX_TRANSIENT_FAILURES};

/// In declaration order is how labels read: "after 6 failures and owns key pair".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, EnumIter)]
pub enum Guard {
    /// At most `MAX_TRANSIENT_FAILURES` transient failures in a row: retry.
    TriesLeft,
    /// One more than that: the phase gives up.
    TriesSpent,
    /// Cleanup keeps trying, however long it takes.
    KeepTrying,
    /// Every `CLEANUP_PATIENCE`-th failure in a row: stop and tell an operator.
    AskOperator,
    /// The phase's deadline has not passed.
    BeforeDeadline,
    PastDeadline,
    /// A NotFound or empty sweep soon after a launch may be EC2 not showing
    /// the instance yet.
    JustLaunched,
    GraceOver,
    /// A refused launch none of whose tries may have acted unseen (and
    /// none before it in this phase): it made nothing, and the sweep after
    /// it is believed at once.
    EveryTryAnswered,
    AnswerMayBeLost,
    /// The request asks for spot capacity.
    SpotRequested,
    OnDemandOnly,
    /// Another configured subnet is left to try.
    MoreSubnets,
    LastSubnet,
    /// The request allows falling back from spot to on-demand.
    FallbackAllowed,
    NoFallback,
    /// The instance has an address to probe (or an endpoint override is set).
    Reachable,
    Unreachable,
    /// Fewer failed SSH logins than `ssh.retries`.
    ProbesLeft,
    ProbesSpent,
    /// EC2's status checks say what `statusChecks` asks (or are skipped).
    ChecksPassed,
    ChecksPending,
    /// An SSH login worked against a trusted host key.
    SshVerified,
    SshPending,
    /// Teardown asked of a session that is already cleaning up.
    AlreadyCleaningUp,
    /// The session created the key pair, so cleanup deletes it.
    OwnsKeyPair,
    KeyPairNotOurs,
    /// Cleanup started because provisioning failed, or because the caller asked.
    OnFailure,
    OnTeardown,
    /// Cleanup after EC2 gave notice of taking the spot instance back.
    OnInterruption,
    /// A shutdown command is configured and there is time to run it.
    ShutdownCommand,
    NoShutdownCommand,
    /// Spot is requested, fallback is allowed, and every zone just ran out
    /// of spot capacity.
    SpotScarce,
}

impl Guard {
    pub fn label(self) -> String {
        match self {
            Guard::SpotRequested => "spot requested".into(),
            Guard::OnDemandOnly => "on-demand only".into(),
            Guard::MoreSubnets => "more subnets".into(),
            Guard::LastSubnet => "last subnet".into(),
            Guard::FallbackAllowed => "fallback allowed".into(),
            Guard::NoFallback => "no fallback".into(),
            Guard::BeforeDeadline => "before deadline".into(),
            Guard::PastDeadline => "past deadline".into(),
            Guard::TriesLeft => format!("under {} failures", MAX_TRANSIENT_FAILURES + 1),
            Guard::TriesSpent => format!("after {} failures", MAX_TRANSIENT_FAILURES + 1),
            Guard::KeepTrying => "keep trying".into(),
            Guard::AskOperator => format!("every {CLEANUP_PATIENCE}th try (stop for an operator)"),
            Guard::OwnsKeyPair => "owns key pair".into(),
            Guard::KeyPairNotOurs => "key pair not ours".into(),
            Guard::OnFailure => "on failure".into(),
            Guard::OnTeardown => "on teardown".into(),
            Guard::Reachable => "has an address".into(),
            Guard::Unreachable => "no address".into(),
            Guard::ProbesLeft => "SSH tries left".into(),
            Guard::ProbesSpent => "ssh.retries spent".into(),
            Guard::ChecksPassed => "status checks passed".into(),
            Guard::ChecksPending => "status checks pending".into(),
            Guard::SshVerified => "SSH verified".into(),
            Guard::SshPending => "SSH pending".into(),
            Guard::JustLaunched => "just launched".into(),
            Guard::GraceOver => "grace over".into(),
            Guard::EveryTryAnswered => "every try answered".into(),
            Guard::AnswerMayBeLost => "an answer may be lost".into(),
            Guard::AlreadyCleaningUp => "already cleaning up".into(),
            Guard::OnInterruption => "on interruption".into(),
            Guard::ShutdownCommand => "shutdown command".into(),
            Guard::NoShutdownCommand => "no shutdown command or no time".into(),
            Guard::SpotScarce => "spot short everywhere, fallback allowed".into(),
        }
    }

    const fn bit(self) -> u64 {
        1 << self as u64
    }
}

/// The guards a row (or a decision) requires, all at once. A bit set, so
/// rows stay `const` and a step allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guards(u64);

impl Guards {
    pub const NONE: Guards = Guards(0);

    pub const fn of(guards: &[Guard]) -> Guards {
        let mut bits = 0;
        let mut i = 0;
        while i < guards.len() {
            bits |= guards[i].bit();
            i += 1;
        }
        Guards(bits)
    }

    #[must_use]
    pub const fn and(self, guard: Guard) -> Guards {
        Guards(self.0 | guard.bit())
    }

    #[must_use]
    pub const fn with(self, other: Guards) -> Guards {
        Guards(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, guard: Guard) -> bool {
        self.0 & guard.bit() != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Guard> {
        Guard::iter().filter(move |g| self.0 & g.bit() != 0)
    }
}

impl From<Guard> for Guards {
    fn from(guard: Guard) -> Guards {
        Guards(guard.bit())
    }
}

impl fmt::Display for Guards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<String> = self.iter().map(Guard::label).collect();
        f.write_str(&labels.join(" and "))
    }
}

impl fmt::Debug for Guards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guard_fits_the_bit_set_and_has_its_own_label() {
        let all: Vec<Guard> = Guard::iter().collect();
        assert!(all.len() <= 64);
        let labels: std::collections::BTreeSet<String> = all.iter().map(|g| g.label()).collect();
        assert_eq!(labels.len(), all.len(), "two guards share a label");
        let set = Guards::of(&[Guard::TriesSpent, Guard::OwnsKeyPair]);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [Guard::TriesSpent, Guard::OwnsKeyPair]
        );
        assert_eq!(
            set.to_string(),
            format!(
                "after {} failures and owns key pair",
                MAX_TRANSIENT_FAILURES + 1
            )
        );
    }
}
