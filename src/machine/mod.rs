//! The provisioning state machine: pure, sans-IO, clock passed in.
//!
//! Invariants:
//! - no async, no IO, no clock: `step(context, state, input, now)` is a pure
//!   function, so tests drive it deterministically;
//! - every decision is the machine's: effects report facts (`InstanceNotFound`,
//!   `TransientFailure`), and grace periods, give-up counts, fallbacks and
//!   teardown rules live here, with `now` passed in;
//! - every step is a row of [`table::TRANSITIONS`], guards included; an input
//!   a phase has no row for is [`MachineError::InputNotAllowed`] and changes
//!   nothing;
//! - the effect a phase needs is a function of the phase alone
//!   ([`effect_for`]), so the intent recorded with a phase is exactly what a
//!   resumed session re-executes;
//! - `Failed` and `TornDown` are reached only through cleanup
//!   (`TerminatingInstance`, `DeletingKeyPair`) or when there was nothing to
//!   clean; cleanup phases never give up on their own (they may ask the
//!   driver to stop and tell an operator, leaving the intent in place).

mod decide;
pub mod diagram;
pub mod effect;
pub mod guard;
pub mod phase;
pub mod placement;
pub mod table;
pub mod token;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use effect::{Effect, Input, InputKind, OutsideInput};
pub use guard::{Guard, Guards};
pub use phase::*;
pub use placement::{MicroUsd, PlacementFacts, ShortZone, SpotSavings};
pub use token::ClientToken;

use crate::request::{HostKeyPolicy, KeyPairMode, ProvisionRequest};

/// Milliseconds since the Unix epoch, always passed in by the caller.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    pub fn millis_until(self, later: Timestamp) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

/// `2026-11-26T10:00:00Z`: the UTC date and time, to the second, for
/// messages people read (the proleptic Gregorian calendar, from days since
/// the epoch by Howard Hinnant's `civil_from_days`).
impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.0 / 1000;
        let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
        let z = days + 719_468;
        let era = z / 146_097;
        let day_of_era = z % 146_097;
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let mp = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = year_of_era + era * 400 + u64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60
        )
    }
}

/// Consecutive transient failures a non-cleanup phase tolerates before the
/// session is cleaned up. Cleanup phases retry without limit: giving up there
/// would leak the instance.
pub const MAX_TRANSIENT_FAILURES: u32 = 5;
/// Consecutive failures of one cleanup step (about two minutes of backoff)
/// after which the machine asks the driver to stop and say why, instead of
/// retrying silently forever. The intent stays: `recover` or `teardown`
/// carries on from it.
pub const CLEANUP_PATIENCE: u32 = 8;
/// Backoff after transient failures doubles from this, up to the cap.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
pub const RETRY_CAP: Duration = Duration::from_secs(30);
/// How long after its launch an instance EC2 says it does not know may
/// still exist (EC2 is eventually consistent; seconds in practice). Past
/// this, NotFound means long gone: terminated instances stay listed for
/// about an hour, then vanish.
pub const LAUNCH_VISIBILITY_GRACE: Duration = Duration::from_secs(300);
/// How long after a launch whose answer was lost a sweep that finds
/// nothing is tried again before nothing is believed.
pub const SWEEP_SETTLE: Duration = Duration::from_secs(30);

/// What a session is about, fixed at creation and stored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionContext {
    pub session_id: String,
    pub request: ProvisionRequest,
    /// Folder for private key files the session creates.
    pub key_dir: String,
    /// The interrupted session this one took over from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

impl SessionContext {
    /// Deterministic name for key pairs this session creates.
    pub fn owned_key_name(&self) -> String {
        format!("acode-{}", self.session_id)
    }

    pub fn owned_key_path(&self) -> String {
        format!(
            "{}/acode-{}.pem",
            self.key_dir.trim_end_matches('/'),
            self.session_id
        )
    }

    /// The session's known_hosts file (beside its key file): the verified
    /// host key, for the user's own `ssh`.
    pub fn known_hosts_path(&self) -> String {
        format!(
            "{}/acode-{}.known_hosts",
            self.key_dir.trim_end_matches('/'),
            self.session_id
        )
    }

    /// The key pair as this session will use it, before it exists.
    pub fn planned_key(&self) -> KeyPairHandle {
        match &self.request.key_pair {
            KeyPairMode::Existing {
                key_name,
                private_key_path,
            } => KeyPairHandle {
                key_name: key_name.clone(),
                owned: false,
                private_key_path: Some(private_key_path.clone()),
                owns_key_file: false,
            },
            KeyPairMode::Temporary { .. } | KeyPairMode::Import { .. } => KeyPairHandle {
                key_name: self.owned_key_name(),
                owned: true,
                private_key_path: Some(self.owned_key_path()),
                owns_key_file: true,
            },
            KeyPairMode::ImportOwn {
                private_key_path, ..
            } => KeyPairHandle {
                key_name: self.owned_key_name(),
                owned: true,
                private_key_path: Some(private_key_path.clone()),
                owns_key_file: false,
            },
        }
    }
}

/// The checkpointed state: the phase plus the retry count that belongs to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub phase: ProvisionPhase,
    /// Consecutive transient failures in this phase; reset on any progress.
    pub transient_failures: u32,
}

impl SessionState {
    pub fn fresh(phase: ProvisionPhase) -> SessionState {
        SessionState {
            phase,
            transient_failures: 0,
        }
    }
}

/// Something callers are told about beside the phase change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// Spot was given up for on-demand (after the spot request, if any,
    /// was cancelled).
    SpotFallback {
        reason: String,
        request_id: Option<String>,
    },
    /// The order subnets will be tried in, what it rests on, and what
    /// placement could not learn.
    PlacementChosen {
        subnets: Vec<String>,
        basis: String,
        gaps: Vec<String>,
    },
    /// A spot instance is Ready: what it saves, or why that is unknown.
    SpotSavings {
        instance_id: String,
        savings: SpotSavings,
    },
}

/// Why the machine asks the driver to stop driving for now. The intent
/// stays recorded; whoever resumes the session runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pause {
    /// A cleanup step failed `CLEANUP_PATIENCE` times in a row.
    CleanupStalled {
        phase: PhaseKind,
        failures: u32,
        last_error: String,
    },
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub state: SessionState,
    /// The effect to run next (the phase's intent); `None` in a settled phase.
    pub effect: Option<Effect>,
    /// Run the effect no earlier than this; `None` means now.
    pub wake_at: Option<Timestamp>,
    pub notices: Vec<Notice>,
    /// Stop driving after committing this step (the intent stays).
    pub pause: Option<Pause>,
    /// The guards the decision tested: with the phases and the input, the
    /// table row it took.
    pub guards: Guards,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    #[error(
        "phase {phase} does not take {input}; nothing was changed \
         (a session that is finished takes no input: check `acode-ec2 status`)"
    )]
    InputNotAllowed { phase: PhaseKind, input: InputKind },
    #[error(
        "bug in acode-ec2's state machine: the table lets {phase} take {input} but no rule \
         decides it; please report it. The session is unchanged and resumable, and \
         `acode-ec2 teardown SESSION` removes what it created"
    )]
    NoRule { phase: PhaseKind, input: InputKind },
    #[error(
        "bug in acode-ec2's state machine: it decided {from} --{input} [{guards}]--> {to}, \
         which is not in its transition table; please report it. The session is unchanged \
         and resumable, and `acode-ec2 teardown SESSION` removes what it created"
    )]
    OffTable {
        from: PhaseKind,
        input: InputKind,
        guards: Guards,
        to: PhaseKind,
    },
}

/// The first step of a new session.
pub fn start(ctx: &SessionContext) -> Step {
    decide::Decision::go(ProvisionPhase::Validating(Validating)).settle(ctx)
}

/// Advances the machine by one input: an effect's outcome or an outside input.
pub fn step(
    ctx: &SessionContext,
    state: &SessionState,
    input: Input,
    now: Timestamp,
) -> Result<Step, MachineError> {
    let from = state.phase.kind();
    let input_kind = input.kind();
    if !table::accepts(from, input_kind) {
        return Err(MachineError::InputNotAllowed {
            phase: from,
            input: input_kind,
        });
    }
    let decision = decide::decide(ctx, state, input, now).ok_or(MachineError::NoRule {
        phase: from,
        input: input_kind,
    })?;
    let to = decision.next.phase.kind();
    if !table::contains(from, input_kind, decision.guards, to) {
        return Err(MachineError::OffTable {
            from,
            input: input_kind,
            guards: decision.guards,
            to,
        });
    }
    Ok(decision.settle(ctx))
}

/// The effect a phase runs: derived from the phase alone, so recording the
/// phase records the intent.
pub fn effect_for(ctx: &SessionContext, phase: &ProvisionPhase) -> Option<Effect> {
    match phase {
        ProvisionPhase::Validating(_) => Some(Effect::ValidateRequest),
        ProvisionPhase::PreparingKeyPair(_) => {
            let key = ctx.planned_key();
            Some(Effect::EnsureKeyPair {
                key_name: key.key_name,
                private_key_path: key.private_key_path,
            })
        }
        ProvisionPhase::ChoosingPlacement(p) => Some(Effect::FindPlacement {
            spot: ctx.request.spot.is_some(),
            zones: p.zones.clone(),
            zone_ids: p.zone_ids.clone(),
            platform: p.image.platform.clone(),
        }),
        ProvisionPhase::RequestingSpot(RequestingSpot { launch })
        | ProvisionPhase::Launching(Launching { launch }) => Some(Effect::RunInstance {
            client_token: launch.client_token.clone(),
            spot: matches!(phase, ProvisionPhase::RequestingSpot(_)),
            subnet_id: subnet(ctx, launch.subnet_index),
            image: launch.image.clone(),
            key_name: launch.key.key_name.clone(),
            zone: launch
                .zones
                .get(launch.subnet_index)
                .filter(|z| !z.is_empty())
                .cloned(),
        }),
        ProvisionPhase::WaitingForRunning(p) => Some(Effect::DescribeInstance {
            instance_id: p.instance.instance_id.clone(),
            spot_request_id: p
                .instance
                .spot_request
                .as_ref()
                .map(|r| r.request_id.clone()),
        }),
        ProvisionPhase::WaitingForSsh(p) => {
            let insecure = ctx.request.ssh.host_key_policy == HostKeyPolicy::InsecureAcceptAny;
            let instance_id = p.instance.instance_id.clone();
            Some(match p.next_check().0 {
                ReadinessCheck::StatusChecks => Effect::DescribeInstanceStatus { instance_id },
                ReadinessCheck::Ssh if p.trusted_host_keys.is_none() && !insecure => {
                    Effect::ReadConsoleHostKeys { instance_id }
                }
                ReadinessCheck::Ssh => Effect::ProbeSsh {
                    endpoint: p.ssh_endpoint.clone(),
                    user: ctx.request.ssh.user.clone(),
                    private_key_path: p.instance.key.private_key_path.clone(),
                    trusted: p.trusted_host_keys.clone(),
                    known_hosts_path: Some(ctx.known_hosts_path()),
                },
            })
        }
        ProvisionPhase::TerminatingInstance(p) => Some(Effect::TerminateInstance {
            instance_id: p.instance_id.clone(),
        }),
        ProvisionPhase::AbandoningSpot(p) => Some(match p.request_to_cancel() {
            Some(request_id) => Effect::CancelSpotRequest {
                request_id: request_id.to_string(),
            },
            None => Effect::TerminateInstance {
                instance_id: Some(p.instance.instance_id.clone()),
            },
        }),
        ProvisionPhase::Interrupting(p) => Some(Effect::RunShutdownCommand {
            endpoint: p.ssh_endpoint.clone(),
            user: ctx.request.ssh.user.clone(),
            private_key_path: p.instance.key.private_key_path.clone(),
            host_key_fingerprint: p.host_key_fingerprint.clone(),
            command: ctx
                .request
                .spot
                .as_ref()
                .and_then(|s| s.interruption.shutdown_command.clone())
                .unwrap_or_default(),
            deadline: p.command_deadline,
        }),
        ProvisionPhase::DeletingKeyPair(p) => Some(Effect::DeleteKeyPair {
            key_name: p.key.key_name.clone(),
            // The user's own key file is never removed.
            private_key_path: p
                .key
                .private_key_path
                .clone()
                .filter(|_| p.key.owns_key_file),
        }),
        ProvisionPhase::Ready(_)
        | ProvisionPhase::Failed(_)
        | ProvisionPhase::TornDown(_)
        | ProvisionPhase::Interrupted(_) => None,
    }
}

/// Backoff after `n` consecutive transient failures (n ≥ 1).
pub fn retry_delay(n: u32) -> Duration {
    let factor = 1u32 << n.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(factor).min(RETRY_CAP)
}

fn subnet(ctx: &SessionContext, index: usize) -> String {
    ctx.request
        .subnet_ids
        .get(index)
        .cloned()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
