//! The rules: one handler per phase (after rustls's `ExpectX` states and
//! quinn's `handle_*`), plus the inputs every phase treats alike
//! (transient failures, teardown, refusals). Each handler names the guards
//! it tested, so `step` can check the decision against the table.

use super::guard::{Guard, Guards};
use super::*;
use crate::error_code::RejectionCode;
use crate::request::{SshAddress, StatusCheckMode};

/// A handler's verdict before it is settled into a [`Step`].
pub(super) struct Decision {
    pub(super) next: SessionState,
    wake_at: Option<Timestamp>,
    notices: Vec<Notice>,
    pause: Option<Pause>,
    pub(super) guards: Guards,
}

impl Decision {
    pub(super) fn go(phase: ProvisionPhase) -> Decision {
        Decision {
            next: SessionState::fresh(phase),
            wake_at: None,
            notices: Vec::new(),
            pause: None,
            guards: Guards::NONE,
        }
    }

    /// The same phase again, its effect run no earlier than `at`.
    fn poll(phase: &ProvisionPhase, at: Timestamp) -> Decision {
        Decision {
            wake_at: Some(at),
            ..Decision::go(phase.clone())
        }
    }

    fn because(mut self, guards: impl Into<Guards>) -> Decision {
        self.guards = self.guards.with(guards.into());
        self
    }

    fn notice(mut self, notice: Notice) -> Decision {
        self.notices.push(notice);
        self
    }

    pub(super) fn settle(self, ctx: &SessionContext) -> Step {
        let effect = effect_for(ctx, &self.next.phase);
        Step {
            wake_at: effect.as_ref().and(self.wake_at),
            effect,
            state: self.next,
            notices: self.notices,
            pause: self.pause,
            guards: self.guards,
        }
    }
}

/// The next state for an input the table accepts; `None` if no rule covers
/// it (which `step` reports as a machine bug instead of guessing).
pub(super) fn decide(
    ctx: &SessionContext,
    state: &SessionState,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    let input = match input {
        Input::TransientFailure { message } => {
            return transient_failure(ctx, state, message, now);
        }
        Input::TeardownRequested => return teardown(ctx, &state.phase, now),
        Input::Rejected { code, message } => {
            return rejected(ctx, &state.phase, code, message, now);
        }
        Input::LaunchRefused { code, message } => {
            return launch_refused(ctx, state, code, message, now);
        }
        other => other,
    };
    match &state.phase {
        ProvisionPhase::Validating(_) => validating(input),
        ProvisionPhase::PreparingKeyPair(p) => preparing_key_pair(p, input),
        ProvisionPhase::ChoosingPlacement(p) => choosing_placement(ctx, p, input),
        ProvisionPhase::RequestingSpot(p) => requesting_spot(ctx, &p.launch, input, now),
        ProvisionPhase::Launching(p) => launching(ctx, &p.launch, input, now),
        ProvisionPhase::WaitingForRunning(p) => waiting_for_running(ctx, p, input, now),
        ProvisionPhase::AbandoningSpot(p) => abandoning_spot(ctx, p, input, now),
        ProvisionPhase::WaitingForSsh(p) => waiting_for_ssh(ctx, p, input, now),
        ProvisionPhase::TerminatingInstance(p) => terminating_instance(ctx, p, input, now),
        ProvisionPhase::DeletingKeyPair(p) => deleting_key_pair(p, input),
        ProvisionPhase::Ready(p) => ready(ctx, p, input, now),
        ProvisionPhase::Interrupting(p) => interrupting(p, input),
        ProvisionPhase::Failed(_)
        | ProvisionPhase::TornDown(_)
        | ProvisionPhase::Interrupted(_) => None,
    }
}

fn validating(input: Input) -> Option<Decision> {
    Some(match input {
        Input::Validated {
            image,
            zones,
            zone_ids,
        } => Decision::go(ProvisionPhase::PreparingKeyPair(PreparingKeyPair {
            image,
            zones,
            zone_ids,
        })),
        _ => return None,
    })
}

fn preparing_key_pair(p: &PreparingKeyPair, input: Input) -> Option<Decision> {
    let Input::KeyPairReady { key } = input else {
        return None;
    };
    Some(Decision::go(ProvisionPhase::ChoosingPlacement(
        ChoosingPlacement {
            image: p.image.clone(),
            key,
            zones: p.zones.clone(),
            zone_ids: p.zone_ids.clone(),
        },
    )))
}

/// Placement is in: the first launch goes to the subnet it ranks first.
fn choosing_placement(
    ctx: &SessionContext,
    p: &ChoosingPlacement,
    input: Input,
) -> Option<Decision> {
    let Input::PlacementFound { facts } = input else {
        return None;
    };
    let fallback = ctx
        .request
        .spot
        .as_ref()
        .is_some_and(|s| s.fallback_to_on_demand);
    let scarce = fallback && facts.spot_short_everywhere(&p.zones);
    let spot = ctx.request.spot.is_some() && !scarce;
    let order = facts.order(&p.zones, ctx.request.subnet_ids.len(), spot);
    let first = order.first().copied().unwrap_or(0);
    let notice = Notice::PlacementChosen {
        subnets: order
            .iter()
            .map(|&i| subnet_named(ctx, &p.zones, i))
            .collect(),
        basis: facts.basis(spot),
        gaps: facts.gaps.clone(),
    };
    let launch = LaunchAttempt {
        image: p.image.clone(),
        key: p.key.clone(),
        zones: p.zones.clone(),
        placement: facts,
        attempt: 0,
        subnet_index: first,
        client_token: ClientToken::derive(&ctx.session_id, 0, spot, &subnet(ctx, first)),
    };
    let decision = if spot {
        Decision::go(ProvisionPhase::RequestingSpot(RequestingSpot { launch }))
            .because(Guard::SpotRequested)
    } else {
        let guard = if scarce {
            Guard::SpotScarce
        } else {
            Guard::OnDemandOnly
        };
        Decision::go(ProvisionPhase::Launching(Launching { launch })).because(guard)
    };
    Some(decision.notice(notice))
}

fn requesting_spot(
    ctx: &SessionContext,
    launch: &LaunchAttempt,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    let fallback = ctx
        .request
        .spot
        .as_ref()
        .is_some_and(|s| s.fallback_to_on_demand);
    let fall_back = |reason: String, guards: Guards| {
        let next = on_demand_attempt(ctx, launch);
        Decision::go(ProvisionPhase::Launching(Launching { launch: next }))
            .notice(Notice::SpotFallback {
                reason,
                request_id: None,
            })
            .because(guards.and(Guard::FallbackAllowed))
    };
    let give_up =
        |reason: String| cleanup(Launched::Nothing, Some(launch.key.clone()), failure(reason));
    match input {
        Input::CapacityUnavailable { code, message } => {
            if let Some(next) = next_subnet(ctx, launch, true) {
                let phase = ProvisionPhase::RequestingSpot(RequestingSpot { launch: next });
                return Some(Decision::go(phase).because(Guard::MoreSubnets));
            }
            let last = Guards::from(Guard::LastSubnet);
            if fallback {
                return Some(fall_back(format!("{code}: {message}"), last));
            }
            let reason = format!(
                "no spot capacity in the subnets tried ({}) and spotFallbackToOnDemand is off; \
                 last: {code}: {message}; try another instance type, a subnet in another \
                 availability zone (failoverSubnetIds), or spotFallbackToOnDemand: true",
                subnets_tried(ctx, launch, true)
            );
            Some(give_up(reason).because(last.and(Guard::NoFallback)))
        }
        // A quota holds in every subnet: no point walking them.
        Input::QuotaExceeded { code, message } if fallback => {
            Some(fall_back(format!("{code}: {message}"), Guards::NONE))
        }
        Input::QuotaExceeded { message, .. } => Some(give_up(message).because(Guard::NoFallback)),
        other => launched(ctx, launch, other, now),
    }
}

fn launching(
    ctx: &SessionContext,
    launch: &LaunchAttempt,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    let give_up =
        |reason: String| cleanup(Launched::Nothing, Some(launch.key.clone()), failure(reason));
    match input {
        Input::CapacityUnavailable { code, message } => {
            if let Some(next) = next_subnet(ctx, launch, false) {
                let phase = ProvisionPhase::Launching(Launching { launch: next });
                return Some(Decision::go(phase).because(Guard::MoreSubnets));
            }
            let reason = format!(
                "no on-demand capacity in the subnets tried ({}); last: {code}: {message}; \
                 try another instance type (instanceType), a subnet in another availability \
                 zone (failoverSubnetIds), or spot capacity (useSpot: true)",
                subnets_tried(ctx, launch, false)
            );
            Some(give_up(reason).because(Guard::LastSubnet))
        }
        Input::QuotaExceeded { message, .. } => Some(give_up(message)),
        other => launched(ctx, launch, other, now),
    }
}

/// The order placement gave for this kind of capacity: indices into the
/// configured subnets, best first.
fn subnet_order(ctx: &SessionContext, launch: &LaunchAttempt, spot: bool) -> Vec<usize> {
    launch
        .placement
        .order(&launch.zones, ctx.request.subnet_ids.len(), spot)
}

/// The same launch in the next subnet of the placement order (a new
/// attempt, so a new `ClientToken`), if there is one.
fn next_subnet(ctx: &SessionContext, launch: &LaunchAttempt, spot: bool) -> Option<LaunchAttempt> {
    let order = subnet_order(ctx, launch, spot);
    let at = order.iter().position(|&i| i == launch.subnet_index)?;
    let index = *order.get(at + 1)?;
    Some(next_attempt(ctx, launch, index, spot))
}

/// The first on-demand launch after spot: the subnet on-demand ranks first.
fn on_demand_attempt(ctx: &SessionContext, from: &LaunchAttempt) -> LaunchAttempt {
    let first = subnet_order(ctx, from, false).first().copied().unwrap_or(0);
    next_attempt(ctx, from, first, false)
}

/// The attempt after `from`: same image, key and zones, a new token.
fn next_attempt(
    ctx: &SessionContext,
    from: &LaunchAttempt,
    subnet_index: usize,
    spot: bool,
) -> LaunchAttempt {
    let attempt = from.attempt + 1;
    LaunchAttempt {
        client_token: ClientToken::derive(
            &ctx.session_id,
            attempt,
            spot,
            &subnet(ctx, subnet_index),
        ),
        attempt,
        subnet_index,
        ..from.clone()
    }
}

/// "subnet-a (us-east-1a), subnet-b (us-east-1b)": the subnets tried so
/// far, in the order they were tried.
fn subnets_tried(ctx: &SessionContext, launch: &LaunchAttempt, spot: bool) -> String {
    let order = subnet_order(ctx, launch, spot);
    let tried = order
        .iter()
        .position(|&i| i == launch.subnet_index)
        .map_or(order.len(), |at| at + 1);
    order[..tried]
        .iter()
        .map(|&i| subnet_named(ctx, &launch.zones, i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "subnet-a (us-east-1a)", or the id alone when the zone is unknown.
fn subnet_named(ctx: &SessionContext, zones: &[String], index: usize) -> String {
    let id = subnet(ctx, index);
    match zones.get(index) {
        Some(zone) if !zone.is_empty() => format!("{id} ({zone})"),
        _ => id,
    }
}

/// What RequestingSpot and Launching share: the launch went through.
fn launched(
    ctx: &SessionContext,
    launch: &LaunchAttempt,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    Some(match input {
        Input::Launched {
            instance_id,
            was_spot,
            spot_request_id,
        } => {
            let spot = ctx.request.spot.as_ref().filter(|_| was_spot);
            let timeout = spot.map_or(ctx.request.timeouts.running, |spot| {
                spot.request_timeout.min(ctx.request.timeouts.running)
            });
            let on_demand_fallback = spot
                .filter(|s| s.fallback_to_on_demand)
                .map(|_| Box::new(on_demand_attempt(ctx, launch)));
            let zone = launch
                .zones
                .get(launch.subnet_index)
                .filter(|z| !z.is_empty())
                .cloned();
            // First look on the poll grid, with the other sessions' polls:
            // no instance runs the moment it is launched.
            let next = ProvisionPhase::WaitingForRunning(WaitingForRunning {
                instance: LaunchedInstance {
                    instance_id,
                    key: launch.key.clone(),
                    was_spot,
                    launched_at: Some(now),
                    savings: was_spot
                        .then(|| Box::new(launch.placement.savings_in(zone.as_deref()))),
                    zone,
                    spot_request: spot_request_id.map(|request_id| {
                        Box::new(SpotRequestStatus {
                            request_id,
                            state: None,
                            status_code: None,
                            price: None,
                        })
                    }),
                },
                deadline: now.plus(timeout),
                on_demand_fallback,
            });
            Decision::poll(&next, poll_at(ctx, now))
        }
        _ => return None,
    })
}

fn waiting_for_running(
    ctx: &SessionContext,
    p: &WaitingForRunning,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    let mut p = p.clone();
    if let Input::InstancePending {
        spot_request: Some(request),
    }
    | Input::InstanceRunning {
        spot_request: Some(request),
        ..
    } = &input
    {
        p.instance.spot_request = Some(request.clone());
    }
    let p = &p;
    let id = &p.instance.instance_id;
    let give_up = |reason: String| instance_cleanup(&p.instance, failure(reason));
    Some(match input {
        Input::InstancePending { .. } | Input::InstanceNotVisible if now < p.deadline => {
            Decision::poll(
                &ProvisionPhase::WaitingForRunning(p.clone()),
                poll_at(ctx, now),
            )
            .because(Guard::BeforeDeadline)
        }
        Input::InstancePending { .. } | Input::InstanceNotVisible => {
            let past = Guards::from(Guard::PastDeadline);
            match &p.on_demand_fallback {
                Some(next) => {
                    let status = p
                        .instance
                        .spot_request
                        .as_ref()
                        .and_then(|r| r.status_code.as_deref())
                        .map(|code| format!(" (spot request status: {code})"))
                        .unwrap_or_default();
                    let reason = format!(
                        "spot instance {id} was not running within the spot request timeout{status}"
                    );
                    abandon_spot(&p.instance, next, reason)
                        .because(past.and(Guard::FallbackAllowed))
                }
                None => give_up(format!("instance {id} did not reach running in time"))
                    .because(past.and(Guard::NoFallback)),
            }
        }
        Input::InstanceRunning {
            public_ip,
            private_ip,
            ..
        } => running(ctx, p, public_ip, private_ip, now),
        Input::InstanceGone { state } => match &p.on_demand_fallback {
            Some(next) => {
                let reason = format!("spot instance {id} went {state} before it was running");
                abandon_spot(&p.instance, next, reason).because(Guard::FallbackAllowed)
            }
            None => give_up(format!("instance {id} went {state} before it was ready"))
                .because(Guard::NoFallback),
        },
        _ => return None,
    })
}

/// The instance runs: check SSH where it can be reached, and its status
/// checks, side by side.
fn running(
    ctx: &SessionContext,
    p: &WaitingForRunning,
    public_ip: Option<String>,
    private_ip: Option<String>,
    now: Timestamp,
) -> Decision {
    let ssh_endpoint = match ssh_endpoint(ctx, public_ip.as_deref(), private_ip.as_deref()) {
        Ok(endpoint) => endpoint,
        Err(missing) => {
            let reason = format!("instance {} {missing}", p.instance.instance_id);
            return instance_cleanup(&p.instance, failure(reason)).because(Guard::Unreachable);
        }
    };
    let trusted_host_keys = match &ctx.request.ssh.host_key_policy {
        HostKeyPolicy::Pinned(prints) => Some(ConsoleFingerprints(prints.clone())),
        HostKeyPolicy::Console | HostKeyPolicy::InsecureAcceptAny => None,
    };
    let status = match ctx.request.status_checks {
        // Not looked at at all, as asked (a reclaim then shows as failed SSH).
        StatusCheckMode::Skip => StatusTrack::Done,
        // On the poll grid, batched with other sessions: checks that pass
        // take minutes, so the first look need not be at once.
        StatusCheckMode::Ok | StatusCheckMode::NotImpaired => StatusTrack::Waiting {
            due: poll_at(ctx, now),
            last: None,
        },
    };
    Decision::go(ProvisionPhase::WaitingForSsh(WaitingForSsh {
        instance: p.instance.clone(),
        public_ip,
        private_ip,
        ssh_endpoint,
        trusted_host_keys,
        deadline: now.plus(ctx.request.timeouts.ssh),
        ssh: SshTrack {
            due: now,
            ..SshTrack::default()
        },
        status,
        on_demand_fallback: p.on_demand_fallback.clone(),
    }))
    .because(Guard::Reachable)
}

fn abandoning_spot(
    ctx: &SessionContext,
    p: &AbandoningSpot,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    let replace = || {
        Decision::go(ProvisionPhase::Launching(Launching {
            launch: p.next.clone(),
        }))
        .notice(Notice::SpotFallback {
            reason: p.reason.clone(),
            request_id: p
                .instance
                .spot_request
                .as_ref()
                .map(|r| r.request_id.clone()),
        })
    };
    Some(match input {
        Input::SpotRequestCancelled { .. } => {
            let mut next = p.clone();
            next.request_cancelled = true;
            Decision::go(ProvisionPhase::AbandoningSpot(next))
        }
        Input::InstanceTerminated => replace(),
        // EC2 does not know the id: a new instance may not be visible yet.
        Input::InstanceNotFound => {
            match next_look(ctx, p.instance.launched_at, LAUNCH_VISIBILITY_GRACE, now) {
                Some(at) => Decision::poll(&ProvisionPhase::AbandoningSpot(p.clone()), at)
                    .because(Guard::JustLaunched),
                None => replace().because(Guard::GraceOver),
            }
        }
        _ => return None,
    })
}

fn waiting_for_ssh(
    ctx: &SessionContext,
    p: &WaitingForSsh,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    let id = &p.instance.instance_id;
    let give_up = |reason: String| instance_cleanup(&p.instance, failure(reason));
    let mut next = p.clone();
    Some(match input {
        Input::ConsoleHostKeys { fingerprints } => {
            next.trusted_host_keys = Some(fingerprints);
            next.ssh.due = now;
            still_waiting(next)
        }
        Input::ConsoleNotReady if now < p.deadline => {
            next.ssh.due = poll_at(ctx, now);
            still_waiting(next).because(Guard::BeforeDeadline)
        }
        Input::ConsoleNotReady => give_up(format!(
            "instance {id} printed no SSH host keys to its console in time{}",
            status_note(p)
        ))
        .because(Guard::PastDeadline),
        Input::SshNotReady { reason } => ssh_failed(ctx, next, reason, now),
        Input::SshReady {
            host_key_fingerprint,
            host_key,
        } => {
            next.ssh.verified = Some(VerifiedHostKey {
                fingerprint: host_key_fingerprint,
                public_key: host_key,
            });
            let checks = match next.status.passed() {
                true => Guard::ChecksPassed,
                false => Guard::ChecksPending,
            };
            ready_or_waiting(next).because(checks)
        }
        Input::HostKeyMismatch { presented } => give_up(format!(
            "SSH host key {presented} at {} is not one the instance printed to its console: \
             possible man in the middle, instance {id} terminated",
            p.ssh_endpoint
        )),
        Input::StatusChecksReported { report } => status_reported(ctx, next, report, now),
        Input::InstanceGone { state } => match &p.on_demand_fallback {
            Some(fallback) => {
                let reason =
                    format!("spot instance {id} went {state} (reclaimed) before it was Ready");
                abandon_spot(&p.instance, fallback, reason).because(Guard::FallbackAllowed)
            }
            None => give_up(format!("instance {id} went {state} before it was Ready"))
                .because(Guard::NoFallback),
        },
        _ => return None,
    })
}

/// A login failed: try again after `ssh.retryInterval`, until `ssh.retries`
/// logins have failed or the readiness deadline passes.
fn ssh_failed(
    ctx: &SessionContext,
    mut next: WaitingForSsh,
    reason: String,
    now: Timestamp,
) -> Decision {
    let ssh = &ctx.request.ssh;
    next.ssh.failures += 1;
    let id = &next.instance.instance_id;
    if next.ssh.failures >= ssh.retries {
        let why = format!(
            "SSH to instance {id} failed {} times (ssh.retries), last: {reason}{}",
            next.ssh.failures,
            status_note(&next)
        );
        return instance_cleanup(&next.instance, failure(why)).because(Guard::ProbesSpent);
    }
    let tries_left = Guards::from(Guard::ProbesLeft);
    if now >= next.deadline {
        let why = format!(
            "instance {id} did not accept SSH in time (last: {reason}){}",
            status_note(&next)
        );
        return instance_cleanup(&next.instance, failure(why))
            .because(tries_left.and(Guard::PastDeadline));
    }
    next.ssh.due = now.plus(ssh.retry_interval);
    next.ssh.last_error = Some(reason);
    still_waiting(next).because(tries_left.and(Guard::BeforeDeadline))
}

/// EC2's status checks answered: passed as `statusChecks` asks, or polled
/// again until the readiness deadline.
fn status_reported(
    ctx: &SessionContext,
    mut next: WaitingForSsh,
    report: StatusReport,
    now: Timestamp,
) -> Decision {
    let passed = next.status.passed()
        || match ctx.request.status_checks {
            StatusCheckMode::Ok => {
                report.system == CheckState::Ok && report.instance == CheckState::Ok
            }
            StatusCheckMode::NotImpaired => {
                report.system != CheckState::Impaired && report.instance != CheckState::Impaired
            }
            StatusCheckMode::Skip => true,
        };
    if passed {
        next.status = after_checks(next.on_demand_fallback.is_some(), ctx, now);
        let ssh = match next.ssh.verified {
            Some(_) => Guard::SshVerified,
            None => Guard::SshPending,
        };
        return ready_or_waiting(next).because(Guards::from(Guard::ChecksPassed).and(ssh));
    }
    let pending = Guards::from(Guard::ChecksPending);
    if now >= next.deadline {
        let hint =
            if report.system == CheckState::Impaired || report.instance == CheckState::Impaired {
                "EC2 found a problem with the instance or its host: try again (a new instance), \
             or another instance type"
            } else {
                "they usually pass one to three minutes after boot: raise sshTimeout, or set \
             statusChecks: not-impaired (or skip) not to wait for them"
            };
        // SSH may have failed meanwhile too: say so, it may be the same cause.
        let ssh_note = match (&next.ssh.verified, &next.ssh.last_error) {
            (None, Some(last)) => format!("; SSH had not worked either (last: {last})"),
            _ => String::new(),
        };
        let why = format!(
            "instance {}'s EC2 status checks did not pass in time ({report}); {hint}{ssh_note}",
            next.instance.instance_id
        );
        return instance_cleanup(&next.instance, failure(why))
            .because(pending.and(Guard::PastDeadline));
    }
    next.status = StatusTrack::Waiting {
        due: poll_at(ctx, now),
        last: Some(report),
    };
    still_waiting(next).because(pending.and(Guard::BeforeDeadline))
}

/// Once the status checks pass: done, or, for a spot instance that may
/// fall back, still watched (until Ready) so a reclaim is seen.
fn after_checks(watch: bool, ctx: &SessionContext, now: Timestamp) -> StatusTrack {
    match watch {
        true => StatusTrack::Watching {
            due: poll_at(ctx, now),
        },
        false => StatusTrack::Done,
    }
}

/// Ready once both checks have passed (telling what a spot instance
/// saves); else the next check when it is due.
fn ready_or_waiting(next: WaitingForSsh) -> Decision {
    let (Some(verified), true) = (&next.ssh.verified, next.status.passed()) else {
        return still_waiting(next);
    };
    let instance = &next.instance;
    let ready = Decision::go(ProvisionPhase::Ready(Ready {
        instance: instance.clone(),
        public_ip: next.public_ip.clone(),
        private_ip: next.private_ip.clone(),
        ssh_endpoint: next.ssh_endpoint.clone(),
        host_key_fingerprint: verified.fingerprint.clone(),
        host_key: verified.public_key.clone(),
    }));
    if !instance.was_spot {
        return ready;
    }
    let savings = instance
        .savings
        .as_deref()
        .cloned()
        .unwrap_or_else(|| SpotSavings::Unknown {
            why: "the session was launched before savings were tracked".into(),
        });
    ready.notice(Notice::SpotSavings {
        instance_id: instance.instance_id.clone(),
        savings,
    })
}

fn still_waiting(next: WaitingForSsh) -> Decision {
    let (_, due) = next.next_check();
    Decision::poll(&ProvisionPhase::WaitingForSsh(next), due)
}

/// What the status checks said last, for an error about the SSH side.
fn status_note(p: &WaitingForSsh) -> String {
    match &p.status {
        StatusTrack::Waiting {
            last: Some(report), ..
        } => format!(" (EC2 status checks: {report})"),
        _ => String::new(),
    }
}

fn terminating_instance(
    ctx: &SessionContext,
    p: &TerminatingInstance,
    input: Input,
    now: Timestamp,
) -> Option<Decision> {
    let grace = match input {
        Input::InstanceTerminated => return Some(next_cleanup_step(p, Guards::NONE)),
        // EC2 does not know the id: a new instance may not be visible yet.
        Input::InstanceNotFound => LAUNCH_VISIBILITY_GRACE,
        // The tag sweep after a lost launch answer found nothing, yet.
        Input::NoInstanceFound => SWEEP_SETTLE,
        _ => return None,
    };
    let Some(next) = next_look(ctx, p.launched_at, grace, now) else {
        return Some(next_cleanup_step(p, Guard::GraceOver.into()));
    };
    let phase = ProvisionPhase::TerminatingInstance(p.clone());
    Some(Decision::poll(&phase, next).because(Guard::JustLaunched))
}

/// When cleanup (or giving up a spot instance) looks again for an
/// instance EC2 may not show yet: 1, 2, 4, 8 and 16 s after its launch,
/// then every [`SWEEP_SETTLE`] at most, and last when `grace` ends; each
/// on the poll grid (so the looks of a process's sessions batch) and never
/// sooner than its next point. `None` once `grace` has passed since the
/// launch, or with no launch time: then EC2's answer is believed. EC2
/// shows most new instances within seconds; looking every poll interval
/// for the whole grace spent a call per interval (from the account's
/// shared bucket) and two checkpoints each. A launch time ahead of `now`
/// (another host's clock) counts from `now`.
fn next_look(
    ctx: &SessionContext,
    launched_at: Option<Timestamp>,
    grace: Duration,
    now: Timestamp,
) -> Option<Timestamp> {
    let launched_at = launched_at.filter(|at| now < at.plus(grace))?;
    let from = launched_at.min(now);
    let mut after = Duration::from_secs(1);
    while after < grace && from.plus(after) <= now {
        after += after.min(SWEEP_SETTLE);
    }
    let at = from.plus(after).min(launched_at.plus(grace));
    // The grid point at or after `at`: `poll_at` gives the one after its argument.
    Some(poll_at(ctx, Timestamp(at.0.saturating_sub(1))).max(poll_at(ctx, now)))
}

/// How long before EC2 acts on a notice the shutdown command must have
/// ended, so the cleanup that follows still runs inside the window.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// Ready and tracked: only a notice of interruption (or a teardown) moves it.
fn ready(ctx: &SessionContext, p: &Ready, input: Input, now: Timestamp) -> Option<Decision> {
    let Input::InterruptionNoticed { notice } = input else {
        return None;
    };
    let policy = ctx.request.spot.as_ref().map(|s| &s.interruption);
    let replacement = policy
        .filter(|policy| policy.replace)
        .map(|_| replacement_id(&ctx.session_id));
    let deadline = policy
        .map_or(now, |policy| now.plus(policy.shutdown_timeout))
        .min(Timestamp(
            notice.at.0.saturating_sub(millis(SHUTDOWN_MARGIN)),
        ));
    let command = policy.and_then(|policy| policy.shutdown_command.as_ref());
    if command.is_some() && deadline > now {
        return Some(
            Decision::go(ProvisionPhase::Interrupting(Interrupting {
                instance: p.instance.clone(),
                ssh_endpoint: p.ssh_endpoint.clone(),
                host_key_fingerprint: p.host_key_fingerprint.clone(),
                notice,
                command_deadline: deadline,
                replacement,
            }))
            .because(Guard::ShutdownCommand),
        );
    }
    let cause = CleanupCause::Interruption(Interrupted {
        reason: interruption_reason(&p.instance, &notice, None),
        replacement,
    });
    Some(instance_cleanup(&p.instance, cause).because(Guard::NoShutdownCommand))
}

/// The shutdown command has run (or could not): clean up.
fn interrupting(p: &Interrupting, input: Input) -> Option<Decision> {
    let Input::ShutdownCommandFinished { outcome } = input else {
        return None;
    };
    let cause = CleanupCause::Interruption(Interrupted {
        reason: interruption_reason(&p.instance, &p.notice, Some(&outcome)),
        replacement: p.replacement.clone(),
    });
    Some(instance_cleanup(&p.instance, cause))
}

fn interruption_reason(
    instance: &LaunchedInstance,
    notice: &InterruptionNotice,
    shutdown: Option<&str>,
) -> String {
    let mut reason = format!(
        "EC2 gave notice to {} spot instance {} at {} (read from {})",
        notice.action, instance.instance_id, notice.at, notice.source
    );
    if let Some(outcome) = shutdown {
        reason.push_str(&format!("; shutdown command: {outcome}"));
    }
    reason
}

/// The session that takes over from `session_id` after an interruption.
/// Derived, not drawn: a watcher that dies and is resumed finds the same
/// one instead of starting a second. `…-r1`, then `…-r2` for its own
/// replacement, and so on.
pub fn replacement_id(session_id: &str) -> String {
    let (base, n) = match session_id.rsplit_once("-r") {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (base, n.parse::<u64>().unwrap_or(0))
        }
        _ => (session_id, 0),
    };
    format!("{base}-r{}", n + 1)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn deleting_key_pair(p: &DeletingKeyPair, input: Input) -> Option<Decision> {
    match input {
        Input::KeyPairDeleted => {
            Some(Decision::go(finished(&p.cause)).because(cause_guard(&p.cause)))
        }
        _ => None,
    }
}

/// Shared by every phase: retry with backoff while tries are left, then
/// clean up. Cleanup phases never give up, but after `CLEANUP_PATIENCE`
/// failures in a row they ask the driver to stop and tell an operator.
fn transient_failure(
    ctx: &SessionContext,
    state: &SessionState,
    message: String,
    now: Timestamp,
) -> Option<Decision> {
    let phase = &state.phase;
    let kind = phase.kind();
    let failures = state.transient_failures + 1;
    let retry = |guard: Guard| Decision {
        next: SessionState {
            phase: phase.clone(),
            transient_failures: failures,
        },
        wake_at: Some(now.plus(retry_delay(failures))),
        ..Decision::go(phase.clone()).because(guard)
    };
    if kind.is_cleanup() {
        // Paused every CLEANUP_PATIENCE failures: a resumed cleanup gets
        // as many tries again before it stops to say why.
        if !failures.is_multiple_of(CLEANUP_PATIENCE) {
            return Some(retry(Guard::KeepTrying));
        }
        let mut stalled = retry(Guard::AskOperator);
        stalled.pause = Some(Pause::CleanupStalled {
            phase: kind,
            failures,
            last_error: message,
        });
        return Some(stalled);
    }
    if failures <= MAX_TRANSIENT_FAILURES {
        return Some(retry(Guard::TriesLeft));
    }
    let reason = format!("{kind} failed {failures} times in a row, last: {message}");
    Some(cleanup_from(ctx, phase, failure(reason), now).because(Guard::TriesSpent))
}

/// Shared by every phase: an outside request to remove everything. It acts
/// at once (no recorded backoff) and never creates anything: a launch or key
/// pair whose answer is missing is found by its tag or name, not re-run.
fn teardown(ctx: &SessionContext, phase: &ProvisionPhase, now: Timestamp) -> Option<Decision> {
    Some(match phase {
        ProvisionPhase::Validating(_) => Decision::go(ProvisionPhase::TornDown(TornDown)),
        ProvisionPhase::TerminatingInstance(_) | ProvisionPhase::DeletingKeyPair(_) => {
            Decision::go(phase.clone()).because(Guard::AlreadyCleaningUp)
        }
        ProvisionPhase::Failed(_)
        | ProvisionPhase::TornDown(_)
        | ProvisionPhase::Interrupted(_) => return None,
        other => cleanup_from(ctx, other, CleanupCause::Teardown, now),
    })
}

/// Shared by every phase whose effect can be refused: the session cannot
/// go on as asked, so it cleans up. A refused launch made nothing, but an
/// earlier try's answer may be lost: cleanup sweeps by tag (see
/// [`cleanup_from`]).
fn rejected(
    ctx: &SessionContext,
    phase: &ProvisionPhase,
    code: RejectionCode,
    message: String,
    now: Timestamp,
) -> Option<Decision> {
    let said = match code {
        RejectionCode::NoCode => message,
        code => format!("{code}: {message}"),
    };
    let reason = failure(format!("{} rejected: {said}", phase.kind()));
    if phase.kind() == PhaseKind::Ready || phase.kind().is_cleanup() {
        return None;
    }
    Some(cleanup_from(ctx, phase, reason, now))
}

/// A refused launch. Cleanup still sweeps by tag, but when no try of the
/// launch may have acted unseen (none lost its answer, none failed before
/// in this phase, and no earlier attempt, in another subnet or capacity
/// type, could have lost one) the sweep is believed at once: nothing can
/// be on its way. Otherwise it waits out [`SWEEP_SETTLE`] as for any lost
/// answer.
fn launch_refused(
    ctx: &SessionContext,
    state: &SessionState,
    code: RejectionCode,
    message: String,
    now: Timestamp,
) -> Option<Decision> {
    let (ProvisionPhase::Launching(Launching { launch })
    | ProvisionPhase::RequestingSpot(RequestingSpot { launch })) = &state.phase
    else {
        return None;
    };
    let first_attempt = launch.attempt == 0;
    let mut decision = rejected(ctx, &state.phase, code, message, now)?;
    if state.transient_failures > 0 || !first_attempt {
        return Some(decision.because(Guard::AnswerMayBeLost));
    }
    if let ProvisionPhase::TerminatingInstance(t) = &mut decision.next.phase {
        t.launched_at = None;
    }
    Some(decision.because(Guard::EveryTryAnswered))
}

/// What cleanup must terminate.
enum Launched {
    Known(Box<LaunchedInstance>),
    /// A RunInstances may have succeeded without us hearing the answer.
    Unknown,
    /// Every launch attempt was answered and none made an instance.
    Nothing,
}

/// The session's own cleanup when the current phase cannot go on. A sweep
/// for a launch whose answer may be lost is dated `now`: EC2 may not show
/// that instance for a few seconds.
fn cleanup_from(
    ctx: &SessionContext,
    phase: &ProvisionPhase,
    cause: CleanupCause,
    now: Timestamp,
) -> Decision {
    match phase {
        ProvisionPhase::Validating(_) => Decision::go(finished(&cause)),
        // The key pair may exist even though EnsureKeyPair did not answer ready.
        ProvisionPhase::PreparingKeyPair(_) => {
            cleanup(Launched::Nothing, Some(ctx.planned_key()), cause)
        }
        ProvisionPhase::ChoosingPlacement(p) => {
            cleanup(Launched::Nothing, Some(p.key.clone()), cause)
        }
        ProvisionPhase::RequestingSpot(RequestingSpot { launch })
        | ProvisionPhase::Launching(Launching { launch }) => {
            let mut decision = cleanup(Launched::Unknown, Some(launch.key.clone()), cause);
            if let ProvisionPhase::TerminatingInstance(t) = &mut decision.next.phase {
                t.launched_at = Some(now);
            }
            decision
        }
        other => match other.instance() {
            Some(instance) => instance_cleanup(instance, cause),
            None => Decision::go(finished(&cause)),
        },
    }
}

fn instance_cleanup(instance: &LaunchedInstance, cause: CleanupCause) -> Decision {
    cleanup(
        Launched::Known(Box::new(instance.clone())),
        Some(instance.key.clone()),
        cause,
    )
}

/// Where cleanup goes: terminate first, then delete the key pair the session
/// owns, then the terminal phase the cause asks for.
fn cleanup(launched: Launched, key: Option<KeyPairHandle>, cause: CleanupCause) -> Decision {
    let owned_key = key.filter(|k| k.owned);
    let terminate = |instance_id, launched_at| {
        Decision::go(ProvisionPhase::TerminatingInstance(TerminatingInstance {
            instance_id,
            launched_at,
            key: owned_key.clone(),
            cause: cause.clone(),
        }))
    };
    match launched {
        Launched::Known(instance) => terminate(Some(instance.instance_id), instance.launched_at),
        Launched::Unknown => terminate(None, None),
        Launched::Nothing => match owned_key {
            Some(key) => Decision::go(ProvisionPhase::DeletingKeyPair(DeletingKeyPair {
                key,
                cause,
            }))
            .because(Guard::OwnsKeyPair),
            None => Decision::go(finished(&cause)).because(Guard::KeyPairNotOurs),
        },
    }
}

/// After the instance is gone: delete the key pair, or finish.
fn next_cleanup_step(p: &TerminatingInstance, guards: Guards) -> Decision {
    let decision = cleanup(Launched::Nothing, p.key.clone(), p.cause.clone()).because(guards);
    if decision.next.phase.kind().is_terminal() {
        return decision.because(cause_guard(&p.cause));
    }
    decision
}

fn abandon_spot(instance: &LaunchedInstance, next: &LaunchAttempt, reason: String) -> Decision {
    Decision::go(ProvisionPhase::AbandoningSpot(AbandoningSpot {
        instance: instance.clone(),
        next: next.clone(),
        reason,
        request_cancelled: false,
    }))
}

fn finished(cause: &CleanupCause) -> ProvisionPhase {
    match cause {
        CleanupCause::Failure(reason) => ProvisionPhase::Failed(Failed {
            reason: reason.clone(),
        }),
        CleanupCause::Teardown => ProvisionPhase::TornDown(TornDown),
        CleanupCause::Interruption(end) => ProvisionPhase::Interrupted(end.clone()),
    }
}

fn cause_guard(cause: &CleanupCause) -> Guard {
    match cause {
        CleanupCause::Failure(_) => Guard::OnFailure,
        CleanupCause::Teardown => Guard::OnTeardown,
        CleanupCause::Interruption(_) => Guard::OnInterruption,
    }
}

fn failure(text: impl Into<String>) -> CleanupCause {
    CleanupCause::Failure(text.into())
}

/// The next poll: the next point of the poll interval's grid on the clock
/// (a whole multiple of the interval after `now`), so the sessions of a
/// process poll at the same instants and their Describe calls go out as
/// one batched call, however their launches were spread. The first poll
/// comes up to one interval sooner; the cadence after it is the interval.
fn poll_at(ctx: &SessionContext, now: Timestamp) -> Timestamp {
    let every = u64::try_from(ctx.request.timeouts.poll_interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Timestamp((now.0 / every).saturating_add(1).saturating_mul(every))
}

/// `host:port` to probe: the override, else the address `ssh.address`
/// picks; or what is missing, and what to do about it.
fn ssh_endpoint(
    ctx: &SessionContext,
    public_ip: Option<&str>,
    private_ip: Option<&str>,
) -> Result<String, String> {
    let ssh = &ctx.request.ssh;
    if let Some(endpoint) = &ssh.endpoint_override {
        return Ok(endpoint.clone());
    }
    let host = match ssh.address {
        SshAddress::Auto => public_ip.or(private_ip).ok_or(
            "has neither a public nor a private IP address; check the subnet, or set \
             ssh.endpointOverride",
        ),
        SshAddress::Public => public_ip.ok_or(
            "has no public IP (its subnet does not assign one); set ssh.address: private if \
             this machine reaches the VPC (VPN, peering), use a subnet that assigns public IPs, \
             or set ssh.endpointOverride to a bastion or port forward",
        ),
        SshAddress::Private => private_ip
            .ok_or("has no private IP address; set ssh.address: public or ssh.endpointOverride"),
    }?;
    Ok(if host.contains(':') {
        format!("[{host}]:{}", ssh.port)
    } else {
        format!("{host}:{}", ssh.port)
    })
}
