//! The provisioning state machine: pure, sans-IO, clock passed in.
//!
//! Invariants:
//! - no async, no IO, no clock: `step(context, state, input, now)` is a pure
//!   function, so tests drive it deterministically;
//! - every step is a row of [`table::TRANSITIONS`]; an input a phase has no
//!   row for is [`MachineError::InputNotAllowed`] and changes nothing;
//! - the effect a phase needs is a function of the phase alone
//!   ([`effect_for`]), so the intent recorded with a phase is exactly what a
//!   resumed session re-executes;
//! - `Failed` and `TornDown` are reached only through cleanup
//!   (`TerminatingInstance`, `DeletingKeyPair`) or when there was nothing to
//!   clean; cleanup phases never give up on their own.

pub mod diagram;
pub mod effect;
pub mod phase;
pub mod table;
pub mod token;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use effect::{Effect, Input, InputKind};
pub use phase::*;
pub use token::ClientToken;

use crate::request::{HostKeyPolicy, KeyPairMode, ProvisionRequest};

/// Milliseconds since the Unix epoch, always passed in by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

/// Consecutive transient failures a non-cleanup phase tolerates before the
/// session is cleaned up. Cleanup phases retry without limit: giving up there
/// would leak the instance.
pub const MAX_TRANSIENT_FAILURES: u32 = 5;
/// Backoff after transient failures doubles from this, up to the cap.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
pub const RETRY_CAP: Duration = Duration::from_secs(30);

/// What a session is about, fixed at creation and stored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionContext {
    pub session_id: String,
    pub request: ProvisionRequest,
    /// Folder for private key files the session creates.
    pub key_dir: String,
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
            },
            KeyPairMode::Temporary { .. } | KeyPairMode::Import { .. } => KeyPairHandle {
                key_name: self.owned_key_name(),
                owned: true,
                private_key_path: Some(self.owned_key_path()),
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

/// Something callers are told about beside the phase change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    SpotFallback { reason: String },
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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    #[error(
        "input {input} is not accepted in phase {phase}; this is a bug in the caller \
         (or a teardown of a session that is already cleaning up: resume it instead)"
    )]
    InputNotAllowed { phase: PhaseKind, input: InputKind },
    #[error(
        "step {from} --{input}--> {to} is not in the transition table: a bug, please report it; \
         the session stays resumable, and `acode-ec2 teardown SESSION` removes what it created"
    )]
    OffTable {
        from: PhaseKind,
        input: InputKind,
        to: PhaseKind,
    },
}

/// The first step of a new session.
pub fn start(ctx: &SessionContext) -> Step {
    settle(
        ctx,
        SessionState::fresh(ProvisionPhase::Validating(Validating)),
        None,
    )
}

/// Advances the machine by one input.
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
    let Decision {
        next,
        wake_at,
        notices,
    } = decide(ctx, state, input, now).ok_or(MachineError::InputNotAllowed {
        phase: from,
        input: input_kind,
    })?;
    let to = next.phase.kind();
    if !table::contains(from, input_kind, to) {
        return Err(MachineError::OffTable {
            from,
            input: input_kind,
            to,
        });
    }
    let mut step = settle(ctx, next, wake_at);
    step.notices = notices;
    Ok(step)
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
        ProvisionPhase::RequestingSpot(RequestingSpot { launch })
        | ProvisionPhase::Launching(Launching { launch }) => Some(Effect::RunInstance {
            client_token: launch.client_token.clone(),
            spot: matches!(phase, ProvisionPhase::RequestingSpot(_)),
            subnet_id: subnet(ctx, launch.subnet_index),
            image: launch.image.clone(),
            key_name: launch.key.key_name.clone(),
        }),
        ProvisionPhase::WaitingForRunning(p) => Some(Effect::DescribeInstance {
            instance_id: p.instance.instance_id.clone(),
        }),
        ProvisionPhase::WaitingForSsh(p) => {
            let insecure = ctx.request.ssh.host_key_policy == HostKeyPolicy::InsecureAcceptAny;
            if p.trusted_host_keys.is_none() && !insecure {
                Some(Effect::ReadConsoleHostKeys {
                    instance_id: p.instance.instance_id.clone(),
                })
            } else {
                Some(Effect::ProbeSsh {
                    endpoint: p.ssh_endpoint.clone(),
                    user: ctx.request.ssh.user.clone(),
                    private_key_path: p.instance.key.private_key_path.clone(),
                    trusted: p.trusted_host_keys.clone(),
                })
            }
        }
        ProvisionPhase::TerminatingInstance(p) => Some(Effect::TerminateInstance {
            instance_id: p.instance_id.clone(),
            launched_at: p.launched_at,
        }),
        ProvisionPhase::AbandoningSpot(p) => Some(Effect::TerminateInstance {
            instance_id: Some(p.instance.instance_id.clone()),
            launched_at: p.instance.launched_at,
        }),
        ProvisionPhase::DeletingKeyPair(p) => Some(Effect::DeleteKeyPair {
            key_name: p.key.key_name.clone(),
            private_key_path: p.key.private_key_path.clone(),
        }),
        ProvisionPhase::Ready(_) | ProvisionPhase::Failed(_) | ProvisionPhase::TornDown(_) => None,
    }
}

impl SessionState {
    pub fn fresh(phase: ProvisionPhase) -> SessionState {
        SessionState {
            phase,
            transient_failures: 0,
        }
    }
}

fn settle(ctx: &SessionContext, state: SessionState, wake_at: Option<Timestamp>) -> Step {
    let effect = effect_for(ctx, &state.phase);
    Step {
        wake_at: effect.as_ref().and(wake_at),
        effect,
        state,
        notices: Vec::new(),
    }
}

struct Decision {
    next: SessionState,
    wake_at: Option<Timestamp>,
    notices: Vec<Notice>,
}

impl Decision {
    fn go(phase: ProvisionPhase) -> Decision {
        Decision {
            next: SessionState::fresh(phase),
            wake_at: None,
            notices: Vec::new(),
        }
    }

    fn poll(phase: ProvisionPhase, at: Timestamp) -> Decision {
        Decision {
            wake_at: Some(at),
            ..Decision::go(phase)
        }
    }
}

fn subnet(ctx: &SessionContext, index: usize) -> String {
    ctx.request
        .subnet_ids
        .get(index)
        .cloned()
        .unwrap_or_default()
}

fn launch_attempt(
    ctx: &SessionContext,
    image: ImageChoice,
    key: KeyPairHandle,
    attempt: u32,
    subnet_index: usize,
    spot: bool,
) -> LaunchAttempt {
    LaunchAttempt {
        client_token: ClientToken::derive(
            &ctx.session_id,
            attempt,
            spot,
            &subnet(ctx, subnet_index),
        ),
        image,
        key,
        attempt,
        subnet_index,
    }
}

/// Where a session goes to clean up: terminate first, then delete the key
/// pair it owns, then the terminal phase the cause asks for.
fn cleanup(launched: Launched, key: Option<KeyPairHandle>, cause: CleanupCause) -> ProvisionPhase {
    let owned_key = key.filter(|k| k.owned);
    let terminate = |instance_id, launched_at| {
        ProvisionPhase::TerminatingInstance(TerminatingInstance {
            instance_id,
            launched_at,
            key: owned_key.clone(),
            cause: cause.clone(),
        })
    };
    match launched {
        Launched::Known(instance) => terminate(Some(instance.instance_id), instance.launched_at),
        Launched::Unknown => terminate(None, None),
        Launched::Nothing => match owned_key {
            Some(key) => ProvisionPhase::DeletingKeyPair(DeletingKeyPair { key, cause }),
            None => finished(cause),
        },
    }
}

fn abandon_spot(
    instance: &LaunchedInstance,
    next: &LaunchAttempt,
    reason: String,
) -> ProvisionPhase {
    ProvisionPhase::AbandoningSpot(AbandoningSpot {
        instance: instance.clone(),
        next: next.clone(),
        reason,
    })
}

/// A sweep for the instance of a launch whose answer may have been lost
/// (a transient failure, or teardown before the answer) is dated now: EC2
/// may not show that instance for a few seconds, so finding nothing soon
/// after does not yet mean there is nothing.
fn after_unanswered_launch(mut cleanup: ProvisionPhase, now: Timestamp) -> ProvisionPhase {
    if let ProvisionPhase::TerminatingInstance(t) = &mut cleanup
        && t.instance_id.is_none()
    {
        t.launched_at = Some(now);
    }
    cleanup
}

/// What cleanup must terminate.
enum Launched {
    Known(LaunchedInstance),
    /// A RunInstances may have succeeded without us hearing the answer.
    Unknown,
    /// Every launch attempt was answered and none made an instance.
    Nothing,
}

fn finished(cause: CleanupCause) -> ProvisionPhase {
    match cause {
        CleanupCause::Failure(reason) => ProvisionPhase::Failed(Failed { reason }),
        CleanupCause::Teardown => ProvisionPhase::TornDown(TornDown),
    }
}

fn failure(text: impl Into<String>) -> CleanupCause {
    CleanupCause::Failure(text.into())
}

/// Backoff after `n` consecutive transient failures (n ≥ 1).
pub fn retry_delay(n: u32) -> Duration {
    let factor = 1u32 << n.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(factor).min(RETRY_CAP)
}

/// The session's own cleanup when the current phase cannot go on.
fn cleanup_from(
    ctx: &SessionContext,
    phase: &ProvisionPhase,
    cause: CleanupCause,
) -> ProvisionPhase {
    let key = match phase {
        // The key pair may exist even though EnsureKeyPair did not answer ready.
        ProvisionPhase::PreparingKeyPair(_) => Some(ctx.planned_key()),
        other => other.key().cloned(),
    };
    let launched = match phase {
        ProvisionPhase::RequestingSpot(_) | ProvisionPhase::Launching(_) => Launched::Unknown,
        other => other
            .instance()
            .map_or(Launched::Nothing, |i| Launched::Known(i.clone())),
    };
    cleanup(launched, key, cause)
}

/// The next state for an input the table accepts; `None` if no rule covers it
/// (which `step` reports instead of guessing).
fn decide(
    ctx: &SessionContext,
    state: &SessionState,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    let phase = &state.phase;
    let poll_at = now.plus(ctx.request.timeouts.poll_interval);
    let decision = match (phase, input) {
        (_, Input::TransientFailure { message }) => {
            let failures = state.transient_failures + 1;
            if !phase.kind().is_cleanup() && failures > MAX_TRANSIENT_FAILURES {
                let reason = format!(
                    "{} failed {failures} times in a row, last: {message}",
                    phase.kind()
                );
                let cleanup = cleanup_from(ctx, phase, failure(reason));
                return Some(Decision::go(after_unanswered_launch(cleanup, now)));
            }
            Decision {
                next: SessionState {
                    phase: phase.clone(),
                    transient_failures: failures,
                },
                wake_at: Some(now.plus(retry_delay(failures))),
                notices: Vec::new(),
            }
        }
        (_, Input::TeardownRequested) => {
            let cleanup = cleanup_from(ctx, phase, CleanupCause::Teardown);
            Decision::go(after_unanswered_launch(cleanup, now))
        }
        (_, Input::Rejected { code, message }) => {
            let reason = format!("{} rejected: {code}: {message}", phase.kind());
            Decision::go(cleanup_from(ctx, phase, failure(reason)))
        }

        (ProvisionPhase::Validating(_), Input::Validated { image }) => {
            Decision::go(ProvisionPhase::PreparingKeyPair(PreparingKeyPair { image }))
        }

        (ProvisionPhase::PreparingKeyPair(p), Input::KeyPairReady { key }) => {
            let image = p.image.clone();
            Decision::go(if ctx.request.spot.is_some() {
                ProvisionPhase::RequestingSpot(RequestingSpot {
                    launch: launch_attempt(ctx, image.clone(), key.clone(), 0, 0, true),
                })
            } else {
                ProvisionPhase::Launching(Launching {
                    launch: launch_attempt(ctx, image, key, 0, 0, false),
                })
            })
        }

        (
            ProvisionPhase::RequestingSpot(RequestingSpot { launch }),
            Input::Launched {
                instance_id,
                was_spot,
            },
        )
        | (
            ProvisionPhase::Launching(Launching { launch }),
            Input::Launched {
                instance_id,
                was_spot,
            },
        ) => {
            let spot = ctx.request.spot.as_ref().filter(|_| was_spot);
            let timeout = spot.map_or(ctx.request.timeouts.running, |spot| {
                spot.request_timeout.min(ctx.request.timeouts.running)
            });
            let on_demand_fallback = spot.filter(|s| s.fallback_to_on_demand).map(|_| {
                let (image, key) = (launch.image.clone(), launch.key.clone());
                launch_attempt(ctx, image, key, launch.attempt + 1, 0, false)
            });
            Decision::go(ProvisionPhase::WaitingForRunning(WaitingForRunning {
                instance: LaunchedInstance {
                    instance_id,
                    key: launch.key.clone(),
                    was_spot,
                    launched_at: Some(now),
                },
                deadline: now.plus(timeout),
                on_demand_fallback,
            }))
        }

        (
            ProvisionPhase::RequestingSpot(RequestingSpot { launch }),
            Input::CapacityUnavailable { code, message },
        ) => {
            let next_subnet = launch.subnet_index + 1;
            let (ami, key, attempt) =
                (launch.image.clone(), launch.key.clone(), launch.attempt + 1);
            if next_subnet < ctx.request.subnet_ids.len() {
                return Some(Decision::go(ProvisionPhase::RequestingSpot(
                    RequestingSpot {
                        launch: launch_attempt(ctx, ami, key, attempt, next_subnet, true),
                    },
                )));
            }
            if ctx
                .request
                .spot
                .as_ref()
                .is_some_and(|s| s.fallback_to_on_demand)
            {
                let mut decision = Decision::go(ProvisionPhase::Launching(Launching {
                    launch: launch_attempt(ctx, ami, key, attempt, 0, false),
                }));
                decision.notices.push(Notice::SpotFallback {
                    reason: format!("{code}: {message}"),
                });
                return Some(decision);
            }
            let reason = format!(
                "no spot capacity in any subnet and fallback is off; last: {code}: {message}"
            );
            Decision::go(cleanup(
                Launched::Nothing,
                Some(launch.key.clone()),
                failure(reason),
            ))
        }

        (
            ProvisionPhase::Launching(Launching { launch }),
            Input::CapacityUnavailable { code, message },
        ) => {
            let next_subnet = launch.subnet_index + 1;
            if next_subnet < ctx.request.subnet_ids.len() {
                let (ami, key, attempt) =
                    (launch.image.clone(), launch.key.clone(), launch.attempt + 1);
                return Some(Decision::go(ProvisionPhase::Launching(Launching {
                    launch: launch_attempt(ctx, ami, key, attempt, next_subnet, false),
                })));
            }
            let reason = format!("no on-demand capacity in any subnet; last: {code}: {message}");
            Decision::go(cleanup(
                Launched::Nothing,
                Some(launch.key.clone()),
                failure(reason),
            ))
        }

        (
            ProvisionPhase::WaitingForRunning(p),
            Input::InstancePending | Input::InstanceNotVisible,
        ) => {
            if now >= p.deadline {
                let id = &p.instance.instance_id;
                if let Some(next) = &p.on_demand_fallback {
                    let reason = format!(
                        "spot instance {id} was not running within the spot request timeout"
                    );
                    return Some(Decision::go(abandon_spot(&p.instance, next, reason)));
                }
                let reason = format!("instance {id} did not reach running in time");
                return Some(Decision::go(cleanup_from(ctx, phase, failure(reason))));
            }
            Decision::poll(phase.clone(), poll_at)
        }
        (ProvisionPhase::WaitingForRunning(p), Input::InstanceRunning { public_ip, .. }) => {
            let ssh = &ctx.request.ssh;
            let ssh_endpoint = match (&ssh.endpoint_override, &public_ip) {
                (Some(endpoint), _) => endpoint.clone(),
                (None, Some(ip)) if ip.contains(':') => format!("[{ip}]:{}", ssh.port),
                (None, Some(ip)) => format!("{ip}:{}", ssh.port),
                (None, None) => {
                    let reason = format!(
                        "instance {} has no public IP and no ssh.endpointOverride is set",
                        p.instance.instance_id
                    );
                    return Some(Decision::go(cleanup_from(ctx, phase, failure(reason))));
                }
            };
            let trusted_host_keys = match &ssh.host_key_policy {
                HostKeyPolicy::Pinned(prints) => Some(ConsoleFingerprints(prints.clone())),
                HostKeyPolicy::Console | HostKeyPolicy::InsecureAcceptAny => None,
            };
            Decision::go(ProvisionPhase::WaitingForSsh(WaitingForSsh {
                instance: p.instance.clone(),
                public_ip,
                ssh_endpoint,
                trusted_host_keys,
                deadline: now.plus(ctx.request.timeouts.ssh),
            }))
        }
        (ProvisionPhase::WaitingForRunning(p), Input::InstanceGone { state }) => {
            let id = &p.instance.instance_id;
            if let Some(next) = &p.on_demand_fallback {
                let reason = format!("spot instance {id} went {state} before it was running");
                return Some(Decision::go(abandon_spot(&p.instance, next, reason)));
            }
            let reason = format!("instance {id} went {state} before it was ready");
            Decision::go(cleanup_from(ctx, phase, failure(reason)))
        }
        (ProvisionPhase::AbandoningSpot(p), Input::InstanceTerminated) => {
            let mut decision = Decision::go(ProvisionPhase::Launching(Launching {
                launch: p.next.clone(),
            }));
            decision.notices.push(Notice::SpotFallback {
                reason: p.reason.clone(),
            });
            decision
        }

        (ProvisionPhase::WaitingForSsh(p), Input::ConsoleHostKeys { fingerprints }) => {
            Decision::go(ProvisionPhase::WaitingForSsh(WaitingForSsh {
                trusted_host_keys: Some(fingerprints),
                ..p.clone()
            }))
        }
        (ProvisionPhase::WaitingForSsh(p), Input::ConsoleNotReady | Input::SshNotReady { .. }) => {
            if now >= p.deadline {
                let what = if p.trusted_host_keys.is_none() {
                    "printed no SSH host keys to its console"
                } else {
                    "did not accept SSH"
                };
                let reason = format!("instance {} {what} in time", p.instance.instance_id);
                return Some(Decision::go(cleanup_from(ctx, phase, failure(reason))));
            }
            Decision::poll(phase.clone(), poll_at)
        }
        (
            ProvisionPhase::WaitingForSsh(p),
            Input::SshReady {
                host_key_fingerprint,
            },
        ) => Decision::go(ProvisionPhase::Ready(Ready {
            instance: p.instance.clone(),
            public_ip: p.public_ip.clone(),
            ssh_endpoint: p.ssh_endpoint.clone(),
            host_key_fingerprint,
        })),
        (ProvisionPhase::WaitingForSsh(p), Input::HostKeyMismatch { presented }) => {
            let reason = format!(
                "SSH host key {presented} at {} is not one the instance printed to its console: \
                 possible man in the middle, instance {} terminated",
                p.ssh_endpoint, p.instance.instance_id
            );
            Decision::go(cleanup_from(ctx, phase, failure(reason)))
        }

        (ProvisionPhase::TerminatingInstance(p), Input::InstanceTerminated) => {
            Decision::go(cleanup(Launched::Nothing, p.key.clone(), p.cause.clone()))
        }
        (ProvisionPhase::DeletingKeyPair(p), Input::KeyPairDeleted) => {
            Decision::go(finished(p.cause.clone()))
        }

        _ => return None,
    };
    Some(decision)
}

#[cfg(test)]
mod tests;
