//! Deterministic tests of the pure machine, with a fake clock (plain numbers).

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use strum::IntoEnumIterator;

use super::table::{self, TRANSITIONS};
use super::*;
use crate::error_code::AwsErrorCode;
use crate::request::{InterruptionPolicy, KeyAlgorithm, SpotPolicy, sample};

const T0: Timestamp = Timestamp(1_700_000_000_000);

#[derive(Debug, Clone, Copy)]
struct Shape {
    spot: Option<bool>, // Some(fallback)
    subnets: usize,
    owned_key: bool,
    policy: u8, // 0 console, 1 pinned, 2 insecure
}

fn ctx(shape: Shape) -> SessionContext {
    let mut request = sample::request();
    // Spot sessions with a key of their own also have a shutdown command
    // and ask for a replacement when interrupted.
    let interruption = InterruptionPolicy {
        shutdown_command: shape.owned_key.then(|| "systemctl stop agent".into()),
        replace: shape.owned_key,
        ..InterruptionPolicy::default()
    };
    request.spot = shape.spot.map(|fallback| SpotPolicy {
        max_price: None,
        fallback_to_on_demand: fallback,
        request_timeout: Duration::from_secs(120),
        interruption: interruption.clone(),
    });
    request.subnet_ids = (0..shape.subnets).map(|i| format!("subnet-{i}")).collect();
    request.key_pair = if shape.owned_key {
        KeyPairMode::Temporary {
            algorithm: KeyAlgorithm::Ed25519,
        }
    } else {
        KeyPairMode::Existing {
            key_name: "team-key".into(),
            private_key_path: "/keys/team.pem".into(),
        }
    };
    request.ssh.host_key_policy = match shape.policy {
        0 => HostKeyPolicy::Console,
        1 => HostKeyPolicy::Pinned(vec!["SHA256:pinned".into()]),
        _ => HostKeyPolicy::InsecureAcceptAny,
    };
    SessionContext {
        session_id: "0f0e0d0c-0000-4000-8000-000000000001".into(),
        request,
        key_dir: "/var/lib/acode/keys".into(),
        replaces: None,
    }
}

fn shapes() -> Vec<Shape> {
    let mut all = Vec::new();
    for spot in [None, Some(true), Some(false)] {
        for subnets in [1, 2] {
            for owned_key in [true, false] {
                for policy in [0, 1, 2] {
                    all.push(Shape {
                        spot,
                        subnets,
                        owned_key,
                        policy,
                    });
                }
            }
        }
    }
    all
}

/// One availability zone per configured subnet.
fn zones(ctx: &SessionContext) -> Vec<String> {
    (0..ctx.request.subnet_ids.len())
        .map(|i| format!("us-east-1{}", (b'a' + i as u8) as char))
        .collect()
}

fn image() -> ImageChoice {
    ImageChoice {
        ami_id: "ami-1".into(),
        root_device_name: Some("/dev/xvda".into()),
        platform: Some("Linux/UNIX".into()),
    }
}

fn instance(ctx: &SessionContext) -> LaunchedInstance {
    LaunchedInstance {
        instance_id: "i-0123".into(),
        key: ctx.planned_key(),
        was_spot: false,
        launched_at: Some(T0),
        zone: Some("us-east-1a".into()),
        spot_request: None,
        savings: None,
    }
}

fn spot_instance(ctx: &SessionContext) -> LaunchedInstance {
    LaunchedInstance {
        was_spot: true,
        spot_request: Some(Box::new(SpotRequestStatus {
            request_id: "sir-1".into(),
            state: Some("open".into()),
            status_code: Some("pending-fulfillment".into()),
            price: None,
        })),
        savings: Some(Box::new(SpotSavings::Unknown {
            why: "no Price List client is configured".into(),
        })),
        ..instance(ctx)
    }
}

/// EC2 takes the instance back two minutes after T0.
fn notice() -> InterruptionNotice {
    InterruptionNotice {
        action: "terminate".into(),
        at: T0.plus(Duration::from_secs(120)),
        source: "the instance's metadata service".into(),
    }
}

fn verified() -> VerifiedHostKey {
    VerifiedHostKey {
        fingerprint: "SHA256:abc".into(),
        public_key: "ssh-ed25519 AAAA".into(),
    }
}

/// WaitingForSsh with each combination of what is known: host keys or not,
/// SSH verified or not (and one login short of `ssh.retries`), status
/// checks passed or awaited.
fn waiting_for_ssh_samples(ctx: &SessionContext) -> Vec<WaitingForSsh> {
    let base = WaitingForSsh {
        instance: instance(ctx),
        public_ip: Some("54.1.2.3".into()),
        private_ip: Some("10.0.0.5".into()),
        ssh_endpoint: "127.0.0.1:2222".into(),
        trusted_host_keys: None,
        deadline: T0.plus(Duration::from_secs(60)),
        ssh: SshTrack::default(),
        status: StatusTrack::Done,
        on_demand_fallback: None,
    };
    let mut all = Vec::new();
    for trusted in [None, Some(ConsoleFingerprints(vec!["SHA256:abc".into()]))] {
        for ssh in [
            SshTrack::default(),
            SshTrack {
                failures: ctx.request.ssh.retries - 1,
                ..SshTrack::default()
            },
            SshTrack {
                verified: Some(verified()),
                ..SshTrack::default()
            },
        ] {
            for status in [
                StatusTrack::Done,
                StatusTrack::Waiting {
                    due: T0,
                    last: None,
                },
                StatusTrack::Watching { due: T0 },
            ] {
                // Both checks done is Ready, never a waiting phase.
                if ssh.verified.is_some() && status.passed() {
                    continue;
                }
                all.push(WaitingForSsh {
                    trusted_host_keys: trusted.clone(),
                    ssh: ssh.clone(),
                    status,
                    ..base.clone()
                });
            }
        }
    }
    all
}

/// The sample phase of `kind` (see [`phases`]).
fn phase_of(ctx: &SessionContext, kind: PhaseKind) -> ProvisionPhase {
    phases(ctx)
        .into_iter()
        .find(|p| p.kind() == kind)
        .unwrap_or_else(|| panic!("no sample {kind:?} phase"))
}

/// Cleanup's terminate step for an instance (or, without an id, a sweep by
/// tag) launched at `launched_at`.
fn terminating(instance_id: Option<&str>, launched_at: Timestamp) -> SessionState {
    SessionState::fresh(ProvisionPhase::TerminatingInstance(TerminatingInstance {
        instance_id: instance_id.map(str::to_string),
        launched_at: Some(launched_at),
        key: None,
        cause: CleanupCause::Teardown,
    }))
}

/// A sample of every phase a context can be in, with each kind of data.
fn phases(ctx: &SessionContext) -> Vec<ProvisionPhase> {
    let launch = |subnet_index| LaunchAttempt {
        image: image(),
        key: ctx.planned_key(),
        zones: zones(ctx),
        placement: Box::default(),
        attempt: 0,
        subnet_index,
        client_token: ClientToken::derive(&ctx.session_id, 0, true, "subnet-0"),
    };
    let mut all = vec![
        ProvisionPhase::Validating(Validating),
        ProvisionPhase::PreparingKeyPair(PreparingKeyPair {
            image: image(),
            zones: zones(ctx),
            zone_ids: Vec::new(),
        }),
        ProvisionPhase::ChoosingPlacement(ChoosingPlacement {
            image: image(),
            key: ctx.planned_key(),
            zones: zones(ctx),
            zone_ids: Vec::new(),
        }),
    ];
    for index in 0..ctx.request.subnet_ids.len() {
        all.push(ProvisionPhase::RequestingSpot(RequestingSpot {
            launch: launch(index),
        }));
        all.push(ProvisionPhase::Launching(Launching {
            launch: launch(index),
        }));
    }
    all.push(ProvisionPhase::WaitingForRunning(WaitingForRunning {
        instance: instance(ctx),
        deadline: T0.plus(Duration::from_secs(60)),
        on_demand_fallback: None,
    }));
    if ctx
        .request
        .spot
        .as_ref()
        .is_some_and(|s| s.fallback_to_on_demand)
    {
        let on_demand = LaunchAttempt {
            client_token: ClientToken::derive(&ctx.session_id, 1, false, "subnet-0"),
            attempt: 1,
            ..launch(0)
        };
        all.push(ProvisionPhase::WaitingForRunning(WaitingForRunning {
            instance: LaunchedInstance {
                was_spot: true,
                ..instance(ctx)
            },
            deadline: T0.plus(Duration::from_secs(60)),
            on_demand_fallback: Some(Box::new(on_demand.clone())),
        }));
        // Before and after its spot request is cancelled.
        for request_cancelled in [false, true] {
            all.push(ProvisionPhase::AbandoningSpot(AbandoningSpot {
                instance: spot_instance(ctx),
                next: on_demand.clone(),
                reason: "spot instance i-0123 went terminated before it was running".into(),
                request_cancelled,
            }));
        }
        for waiting in waiting_for_ssh_samples(ctx) {
            all.push(ProvisionPhase::WaitingForSsh(WaitingForSsh {
                instance: spot_instance(ctx),
                on_demand_fallback: Some(Box::new(on_demand.clone())),
                ..waiting
            }));
        }
    }
    for waiting in waiting_for_ssh_samples(ctx) {
        all.push(ProvisionPhase::WaitingForSsh(waiting));
    }
    all.push(ProvisionPhase::Ready(Ready {
        instance: instance(ctx),
        public_ip: None,
        private_ip: Some("10.0.0.5".into()),
        ssh_endpoint: "127.0.0.1:2222".into(),
        host_key_fingerprint: "SHA256:abc".into(),
        host_key: "ssh-ed25519 AAAA".into(),
    }));
    all.push(ProvisionPhase::Interrupting(Interrupting {
        instance: spot_instance(ctx),
        ssh_endpoint: "127.0.0.1:2222".into(),
        host_key_fingerprint: "SHA256:abc".into(),
        notice: notice(),
        command_deadline: T0.plus(Duration::from_secs(90)),
        replacement: None,
    }));
    let interrupted = Interrupted {
        reason: "EC2 gave notice".into(),
        replacement: Some(format!("{}-r1", ctx.session_id)),
    };
    for cause in [
        CleanupCause::Failure("x".into()),
        CleanupCause::Teardown,
        CleanupCause::Interruption(interrupted.clone()),
    ] {
        // A known instance, and a sweep for the instance of a lost launch answer.
        for instance_id in [Some("i-0123".to_string()), None] {
            all.push(ProvisionPhase::TerminatingInstance(TerminatingInstance {
                instance_id,
                launched_at: Some(T0),
                key: Some(ctx.planned_key()).filter(|k| k.owned),
                cause: cause.clone(),
            }));
        }
        all.push(ProvisionPhase::DeletingKeyPair(DeletingKeyPair {
            key: ctx.planned_key(),
            cause,
        }));
    }
    all.push(ProvisionPhase::Failed(Failed { reason: "x".into() }));
    all.push(ProvisionPhase::TornDown(TornDown));
    all.push(ProvisionPhase::Interrupted(interrupted));
    all
}

fn sample_input(kind: InputKind) -> Input {
    match kind {
        InputKind::Validated => Input::Validated {
            image: image(),
            zones: vec!["us-east-1a".into(), "us-east-1b".into()],
            zone_ids: vec!["use1-az6".into(), "use1-az1".into()],
        },
        InputKind::PlacementFound => Input::PlacementFound {
            facts: Box::default(),
        },
        InputKind::Rejected => Input::Rejected {
            code: AwsErrorCode::InvalidAmiIdNotFound.into(),
            message: "no such image".into(),
        },
        InputKind::LaunchRefused => Input::LaunchRefused {
            code: AwsErrorCode::UnauthorizedOperation.into(),
            message: "the credentials may not call ec2:RunInstances".into(),
        },
        InputKind::KeyPairReady => Input::KeyPairReady {
            key: KeyPairHandle {
                key_name: "acode-x".into(),
                owned: true,
                private_key_path: Some("/k".into()),
                owns_key_file: true,
            },
        },
        InputKind::Launched => Input::Launched {
            instance_id: "i-0123".into(),
            was_spot: true,
            spot_request_id: Some("sir-1".into()),
        },
        InputKind::CapacityUnavailable => Input::CapacityUnavailable {
            code: AwsErrorCode::InsufficientInstanceCapacity,
            message: "none".into(),
        },
        InputKind::QuotaExceeded => Input::QuotaExceeded {
            code: AwsErrorCode::VcpuLimitExceeded,
            message: "the account's vCPU quota is reached".into(),
        },
        InputKind::InstancePending => Input::InstancePending { spot_request: None },
        InputKind::InstanceRunning => Input::InstanceRunning {
            public_ip: Some("54.1.2.3".into()),
            private_ip: Some("10.0.0.5".into()),
            spot_request: None,
        },
        InputKind::InstanceNotVisible => Input::InstanceNotVisible,
        InputKind::InstanceGone => Input::InstanceGone {
            state: "terminated".into(),
        },
        InputKind::ConsoleHostKeys => Input::ConsoleHostKeys {
            fingerprints: ConsoleFingerprints(vec!["SHA256:abc".into()]),
        },
        InputKind::ConsoleNotReady => Input::ConsoleNotReady,
        InputKind::SshReady => Input::SshReady {
            host_key_fingerprint: "SHA256:abc".into(),
            host_key: "ssh-ed25519 AAAA".into(),
        },
        InputKind::StatusChecksReported => Input::StatusChecksReported {
            report: StatusReport {
                system: CheckState::Ok,
                instance: CheckState::Ok,
            },
        },
        InputKind::SshNotReady => Input::SshNotReady {
            reason: "connection refused".into(),
        },
        InputKind::HostKeyMismatch => Input::HostKeyMismatch {
            presented: "SHA256:evil".into(),
        },
        InputKind::InstanceTerminated => Input::InstanceTerminated,
        InputKind::InstanceNotFound => Input::InstanceNotFound,
        InputKind::NoInstanceFound => Input::NoInstanceFound,
        InputKind::InterruptionNoticed => Input::InterruptionNoticed { notice: notice() },
        InputKind::ShutdownCommandFinished => Input::ShutdownCommandFinished {
            outcome: "exited 0".into(),
        },
        InputKind::SpotRequestCancelled => Input::SpotRequestCancelled {
            state: Some("cancelled".into()),
            instance_id: Some("i-0123".into()),
        },
        InputKind::KeyPairDeleted => Input::KeyPairDeleted,
        InputKind::TransientFailure => Input::TransientFailure {
            message: "RequestLimitExceeded".into(),
        },
        InputKind::TeardownRequested => Input::TeardownRequested,
    }
}

#[test]
fn every_phase_kind_has_a_sample() {
    let sampled: BTreeSet<PhaseKind> = shapes()
        .into_iter()
        .flat_map(|shape| phases(&ctx(shape)))
        .map(|p| p.kind())
        .collect();
    for kind in PhaseKind::iter() {
        assert!(sampled.contains(&kind), "phases() has no sample of {kind}");
    }
}

/// Every row of the table, guards included, is taken by some (context,
/// phase, input, time), and every input a phase has no row for is refused
/// without a new state.
#[test]
fn every_table_row_is_exercised_and_nothing_else_happens() {
    let mut taken = BTreeSet::new();
    for shape in shapes() {
        let ctx = ctx(shape);
        for phase in phases(&ctx) {
            for failures in [0, MAX_TRANSIENT_FAILURES, CLEANUP_PATIENCE - 1] {
                let state = SessionState {
                    phase: phase.clone(),
                    transient_failures: failures,
                };
                for now in [T0, T0.plus(Duration::from_secs(3600))] {
                    // Every input kind, plus a running instance without any
                    // address, and status checks still initializing.
                    let no_ip = Input::InstanceRunning {
                        public_ip: None,
                        private_ip: None,
                        spot_request: None,
                    };
                    let initializing = Input::StatusChecksReported {
                        report: StatusReport {
                            system: CheckState::Ok,
                            instance: CheckState::Initializing,
                        },
                    };
                    // Spot ran out in every zone a moment ago.
                    let scarce = Input::PlacementFound {
                        facts: Box::new(PlacementFacts {
                            short_zones: zones(&ctx)
                                .into_iter()
                                .map(|zone| ShortZone { zone, spot: true })
                                .collect(),
                            ..PlacementFacts::default()
                        }),
                    };
                    let extra = [no_ip, initializing, scarce];
                    for input in InputKind::iter().map(sample_input).chain(extra) {
                        let kind = input.kind();
                        match step(&ctx, &state, input, now) {
                            Ok(out) => {
                                let row = (phase.kind(), kind, out.guards, out.state.phase.kind());
                                assert!(table::contains(row.0, row.1, row.2, row.3), "{row:?}");
                                taken.insert(row);
                            }
                            Err(MachineError::InputNotAllowed { phase: p, input }) => {
                                assert_eq!((p, input), (phase.kind(), kind));
                                assert!(!table::accepts(p, input), "{p} refused {input}");
                            }
                            Err(other) => panic!("{other}"),
                        }
                    }
                }
            }
        }
    }
    let all: BTreeSet<_> = TRANSITIONS
        .iter()
        .map(|r| (r.from, r.input, r.guards, r.to))
        .collect();
    let missed: Vec<_> = all.difference(&taken).collect();
    assert!(missed.is_empty(), "rows never taken: {missed:?}");
}

#[test]
fn table_has_no_duplicate_rows_and_terminal_phases_have_none() {
    let mut seen = BTreeSet::new();
    for row in TRANSITIONS {
        assert!(
            seen.insert((row.from, row.input, row.guards)),
            "two rows for the same guards: {row:?}"
        );
        assert!(!row.from.is_terminal(), "{row:?} leaves a terminal phase");
    }
    // Where one (phase, input) has several rows, each names what picks it.
    for row in TRANSITIONS {
        let siblings = TRANSITIONS
            .iter()
            .filter(|r| r.from == row.from && r.input == row.input)
            .count();
        assert!(
            siblings == 1 || !row.guards.is_empty(),
            "{row:?} shares its input with other rows but has no guard"
        );
    }
}

#[test]
fn spot_capacity_failure_falls_back_to_on_demand_with_a_new_token() {
    let ctx = ctx(Shape {
        spot: Some(true),
        subnets: 1,
        owned_key: true,
        policy: 0,
    });
    let s = first_launch(&ctx, PlacementFacts::default());
    let Some(Effect::RunInstance {
        client_token: spot_token,
        spot: true,
        ..
    }) = s.effect.clone()
    else {
        panic!("expected a spot RunInstance, got {:?}", s.effect)
    };
    let s = step(
        &ctx,
        &s.state,
        sample_input(InputKind::CapacityUnavailable),
        T0,
    )
    .unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::Launching);
    assert!(matches!(
        s.notices.as_slice(),
        [Notice::SpotFallback { .. }]
    ));
    let Some(Effect::RunInstance {
        client_token,
        spot: false,
        ..
    }) = s.effect
    else {
        panic!("expected an on-demand RunInstance")
    };
    assert_ne!(client_token, spot_token);
}

/// Validated, key pair ready, placement found: the first launch is next.
fn first_launch(ctx: &SessionContext, facts: PlacementFacts) -> Step {
    let s = start(ctx);
    let validated = Input::Validated {
        image: image(),
        zones: zones(ctx),
        zone_ids: Vec::new(),
    };
    let s = step(ctx, &s.state, validated, T0).unwrap();
    let s = step(ctx, &s.state, sample_input(InputKind::KeyPairReady), T0).unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::ChoosingPlacement);
    let s = step(
        ctx,
        &s.state,
        Input::PlacementFound {
            facts: Box::new(facts),
        },
        T0,
    )
    .unwrap();
    assert!(matches!(
        s.notices.as_slice(),
        [Notice::PlacementChosen { .. }]
    ));
    s
}

/// A spot instance launched with fallback allowed, waiting to run.
fn waiting_spot_instance(ctx: &SessionContext) -> (SessionState, ClientToken) {
    let s = first_launch(ctx, PlacementFacts::default());
    let Some(Effect::RunInstance { client_token, .. }) = s.effect.clone() else {
        panic!("expected a spot RunInstance, got {:?}", s.effect)
    };
    let s = step(ctx, &s.state, sample_input(InputKind::Launched), T0).unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::WaitingForRunning);
    (s.state, client_token)
}

#[test]
fn a_late_or_reclaimed_spot_instance_is_terminated_then_replaced_on_demand() {
    let ctx = ctx(Shape {
        spot: Some(true),
        subnets: 2,
        owned_key: true,
        policy: 0,
    });
    let spot_timeout = Duration::from_secs(120);
    let late = T0.plus(spot_timeout);
    let (waiting, spot_token) = waiting_spot_instance(&ctx);
    for (input, now, why) in [
        (
            Input::InstancePending { spot_request: None },
            late,
            "not running within",
        ),
        (Input::InstanceNotVisible, late, "not running within"),
        (sample_input(InputKind::InstanceGone), T0, "went terminated"),
    ] {
        let s = step(&ctx, &waiting, input, now).unwrap();
        let ProvisionPhase::AbandoningSpot(abandoning) = &s.state.phase else {
            panic!("{:?}", s.state.phase)
        };
        assert!(abandoning.reason.contains(why), "{}", abandoning.reason);
        // The request is cancelled first, so nothing more comes of it ...
        assert_eq!(
            s.effect,
            Some(Effect::CancelSpotRequest {
                request_id: "sir-1".into()
            })
        );
        let s = step(
            &ctx,
            &s.state,
            sample_input(InputKind::SpotRequestCancelled),
            now,
        )
        .unwrap();
        // ... then the spot instance goes, so there are never two.
        assert_eq!(
            s.effect,
            Some(Effect::TerminateInstance {
                instance_id: Some("i-0123".into()),
            })
        );
        assert!(s.notices.is_empty());
        let s = step(&ctx, &s.state, Input::InstanceTerminated, now).unwrap();
        assert!(matches!(
            s.notices.as_slice(),
            [Notice::SpotFallback { reason, request_id: Some(id) }]
                if reason.contains(why) && id == "sir-1"
        ));
        let Some(Effect::RunInstance {
            client_token,
            spot: false,
            subnet_id,
            ..
        }) = s.effect
        else {
            panic!("expected an on-demand RunInstance, got {:?}", s.effect)
        };
        assert_ne!(client_token, spot_token);
        assert_eq!(subnet_id, "subnet-0");
    }
    // Before the spot timeout, a pending spot instance is simply polled.
    let s = step(
        &ctx,
        &waiting,
        Input::InstancePending { spot_request: None },
        T0,
    )
    .unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::WaitingForRunning);
}

#[test]
fn the_first_spot_launch_goes_where_placement_ranks_first_and_fails_over_in_that_order() {
    let ctx = ctx(Shape {
        spot: Some(true),
        subnets: 3,
        owned_key: true,
        policy: 0,
    });
    let facts = PlacementFacts {
        scores: [("us-east-1b", 9), ("us-east-1c", 9), ("us-east-1a", 2)]
            .map(|(z, s)| (z.to_string(), s))
            .into(),
        spot_prices: [("us-east-1b", 50), ("us-east-1c", 40), ("us-east-1a", 10)]
            .map(|(z, p)| (z.to_string(), MicroUsd(p)))
            .into(),
        ..PlacementFacts::default()
    };
    let s = first_launch(&ctx, facts.clone());
    let subnet_of = |s: &Step| match &s.effect {
        Some(Effect::RunInstance {
            subnet_id,
            client_token,
            zone,
            ..
        }) => (subnet_id.clone(), client_token.clone(), zone.clone()),
        other => panic!("expected RunInstance, got {other:?}"),
    };
    let (subnet, token, zone) = subnet_of(&s);
    assert_eq!(
        (subnet.as_str(), zone.as_deref()),
        ("subnet-2", Some("us-east-1c"))
    );
    // The token is the one a resumed session derives from the same facts.
    assert_eq!(token, subnet_of(&first_launch(&ctx, facts)).1);
    let capacity = sample_input(InputKind::CapacityUnavailable);
    let s = step(&ctx, &s.state, capacity.clone(), T0).unwrap();
    assert_eq!(subnet_of(&s).0, "subnet-1");
    let s = step(&ctx, &s.state, capacity.clone(), T0).unwrap();
    assert_eq!(subnet_of(&s).0, "subnet-0");
    // Spot is spent everywhere: on-demand starts in config order.
    let s = step(&ctx, &s.state, capacity, T0).unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::Launching);
    assert_eq!(subnet_of(&s).0, "subnet-0");
}

/// A spot session with fallback, waiting for SSH after its instance ran.
fn spot_waiting_for_ssh(ctx: &SessionContext) -> SessionState {
    let (waiting, _) = waiting_spot_instance(ctx);
    let s = step(ctx, &waiting, sample_input(InputKind::InstanceRunning), T0).unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::WaitingForSsh);
    s.state
}

#[test]
fn a_spot_instance_reclaimed_while_waiting_for_ssh_falls_back_one_instance_at_a_time() {
    let with_fallback = ctx(Shape {
        spot: Some(true),
        subnets: 1,
        owned_key: true,
        policy: 0,
    });
    let waiting = spot_waiting_for_ssh(&with_fallback);
    let gone = sample_input(InputKind::InstanceGone);
    let s = step(&with_fallback, &waiting, gone.clone(), T0).unwrap();
    let ProvisionPhase::AbandoningSpot(abandoning) = &s.state.phase else {
        panic!("{:?}", s.state.phase)
    };
    assert!(
        abandoning.reason.contains("reclaimed"),
        "{}",
        abandoning.reason
    );
    assert!(matches!(s.effect, Some(Effect::CancelSpotRequest { .. })));
    let without = ctx(Shape {
        spot: Some(false),
        ..Shape {
            spot: None,
            subnets: 1,
            owned_key: true,
            policy: 0,
        }
    });
    let waiting = spot_waiting_for_ssh(&without);
    let s = step(&without, &waiting, gone, T0).unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::TerminatingInstance);
}

#[test]
fn a_ready_spot_instance_tells_its_savings_and_its_request_is_tracked() {
    let ctx = ctx(Shape {
        spot: Some(true),
        subnets: 1,
        owned_key: true,
        policy: 0,
    });
    let facts = PlacementFacts {
        spot_prices: [("us-east-1a".to_string(), MicroUsd(3_100))].into(),
        on_demand_price: Some(MicroUsd(10_400)),
        ..PlacementFacts::default()
    };
    let s = first_launch(&ctx, facts);
    let s = step(&ctx, &s.state, sample_input(InputKind::Launched), T0).unwrap();
    assert_eq!(
        s.effect,
        Some(Effect::DescribeInstance {
            instance_id: "i-0123".into(),
            spot_request_id: Some("sir-1".into()),
        })
    );
    let polled = SpotRequestStatus {
        request_id: "sir-1".into(),
        state: Some("active".into()),
        status_code: Some("fulfilled".into()),
        price: Some("0.0104".into()),
    };
    let running = Input::InstanceRunning {
        public_ip: Some("54.1.2.3".into()),
        private_ip: None,
        spot_request: Some(Box::new(polled.clone())),
    };
    let mut s = step(&ctx, &s.state, running, T0).unwrap();
    assert_eq!(
        s.state
            .phase
            .instance()
            .and_then(|i| i.spot_request.as_deref().cloned()),
        Some(polled)
    );
    for input in [
        sample_input(InputKind::ConsoleHostKeys),
        sample_input(InputKind::SshReady),
        sample_input(InputKind::StatusChecksReported),
    ] {
        s = step(&ctx, &s.state, input, T0).unwrap();
    }
    assert_eq!(s.state.phase.kind(), PhaseKind::Ready);
    let [Notice::SpotSavings { savings, .. }] = s.notices.as_slice() else {
        panic!("expected the savings notice, got {:?}", s.notices)
    };
    assert_eq!(savings.savings_percent(), Some(70.1));
}

#[test]
fn without_fallback_a_late_spot_instance_is_cleaned_up() {
    let ctx = ctx(Shape {
        spot: Some(false),
        subnets: 1,
        owned_key: true,
        policy: 0,
    });
    let (waiting, _) = waiting_spot_instance(&ctx);
    let late = T0.plus(Duration::from_secs(120));
    let s = step(
        &ctx,
        &waiting,
        Input::InstancePending { spot_request: None },
        late,
    )
    .unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::TerminatingInstance);
}

#[test]
fn sessions_polling_at_different_moments_poll_at_the_same_instants() {
    let ctx = ctx(shapes()[0]);
    let every = ctx.request.timeouts.poll_interval;
    let state = SessionState::fresh(phase_of(&ctx, PhaseKind::WaitingForRunning));
    let wake = |now: Timestamp| {
        step(
            &ctx,
            &state,
            Input::InstancePending { spot_request: None },
            now,
        )
        .unwrap()
        .wake_at
        .expect("a poll")
    };
    // Launched 1.3 s and 3.9 s into one interval: both poll at its end, so
    // their Describe calls batch into one; then every interval on the grid.
    let first = wake(T0.plus(Duration::from_millis(1300)));
    assert_eq!(first, wake(T0.plus(Duration::from_millis(3900))));
    assert_eq!(first, T0.plus(every));
    assert_eq!(wake(first), first.plus(every));
}

#[test]
fn polls_wait_for_the_poll_interval_and_give_up_at_the_deadline() {
    let ctx = ctx(shapes()[0]);
    let phase = phase_of(&ctx, PhaseKind::WaitingForRunning);
    let state = SessionState::fresh(phase);
    let s = step(
        &ctx,
        &state,
        Input::InstancePending { spot_request: None },
        T0,
    )
    .unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::WaitingForRunning);
    assert_eq!(s.wake_at, Some(T0.plus(ctx.request.timeouts.poll_interval)));
    let late = T0.plus(Duration::from_secs(61));
    let s = step(
        &ctx,
        &state,
        Input::InstancePending { spot_request: None },
        late,
    )
    .unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::TerminatingInstance);
    assert_eq!(
        s.effect,
        Some(Effect::TerminateInstance {
            instance_id: Some("i-0123".into()),
        })
    );
}

/// A sample WaitingForSsh whose console host keys are already trusted.
fn waiting_for_trusted_ssh(ctx: &SessionContext) -> ProvisionPhase {
    phases(ctx)
        .into_iter()
        .find(|p| matches!(p, ProvisionPhase::WaitingForSsh(w) if w.trusted_host_keys.is_some()))
        .unwrap()
}

/// FR-053: a failed SSH login is tried again `ssh.retryInterval` later.
#[test]
fn a_failed_ssh_login_is_tried_again_after_the_retry_interval() {
    let ctx = ctx(shapes()[0]);
    let phase = waiting_for_trusted_ssh(&ctx);
    let s = step(
        &ctx,
        &SessionState::fresh(phase),
        Input::SshNotReady {
            reason: "connection refused".into(),
        },
        T0,
    )
    .unwrap();
    let ProvisionPhase::WaitingForSsh(w) = &s.state.phase else {
        panic!("{:?}", s.state.phase)
    };
    assert_eq!(w.ssh.due, T0.plus(ctx.request.ssh.retry_interval));
    assert_eq!(w.ssh.failures, 1);
}

#[test]
fn host_key_mismatch_terminates_and_names_the_presented_key() {
    let ctx = ctx(shapes()[0]);
    let phase = waiting_for_trusted_ssh(&ctx);
    let s = step(
        &ctx,
        &SessionState::fresh(phase),
        sample_input(InputKind::HostKeyMismatch),
        T0,
    )
    .unwrap();
    let ProvisionPhase::TerminatingInstance(t) = &s.state.phase else {
        panic!("{:?}", s.state.phase)
    };
    let CleanupCause::Failure(reason) = &t.cause else {
        panic!()
    };
    assert!(
        reason.contains("SHA256:evil") && reason.contains("man in the middle"),
        "{reason}"
    );
}

#[test]
fn transient_failures_back_off_then_clean_up() {
    assert_eq!(retry_delay(1), Duration::from_secs(1));
    assert_eq!(retry_delay(3), Duration::from_secs(4));
    assert_eq!(retry_delay(40), RETRY_CAP);
    let ctx = ctx(shapes()[0]);
    let mut state = start(&ctx).state;
    for n in 1..=MAX_TRANSIENT_FAILURES {
        let s = step(&ctx, &state, sample_input(InputKind::TransientFailure), T0).unwrap();
        assert_eq!(s.state.transient_failures, n);
        assert_eq!(s.wake_at, Some(T0.plus(retry_delay(n))));
        state = s.state;
    }
    let s = step(&ctx, &state, sample_input(InputKind::TransientFailure), T0).unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::Failed);
}

#[test]
fn a_sweep_after_a_launch_that_may_have_been_lost_is_dated() {
    let ctx = ctx(shapes()[0]);
    let launching = phase_of(&ctx, PhaseKind::Launching);
    let sweep_of = |state: &SessionState, input: Input| {
        let s = step(&ctx, state, input, T0).unwrap();
        let ProvisionPhase::TerminatingInstance(t) = s.state.phase else {
            panic!("{:?}", s.state.phase)
        };
        assert_eq!(t.instance_id, None);
        t.launched_at
    };
    let exhausted = SessionState {
        phase: launching.clone(),
        transient_failures: MAX_TRANSIENT_FAILURES,
    };
    let fresh = SessionState::fresh(launching);
    // The answer may have been lost: EC2 may not show the instance yet.
    assert_eq!(
        sweep_of(&exhausted, sample_input(InputKind::TransientFailure)),
        Some(T0)
    );
    assert_eq!(sweep_of(&fresh, Input::TeardownRequested), Some(T0));
    // A refused try made nothing, but an earlier try of the same token may
    // have, its answer lost: that sweep is dated too.
    assert_eq!(
        sweep_of(&fresh, sample_input(InputKind::Rejected)),
        Some(T0)
    );
}

#[test]
fn cleanup_never_gives_up_on_its_own() {
    let ctx = ctx(shapes()[0]);
    let mut state = SessionState::fresh(ProvisionPhase::TerminatingInstance(TerminatingInstance {
        instance_id: Some("i-1".into()),
        launched_at: None,
        key: None,
        cause: CleanupCause::Teardown,
    }));
    for n in 1..=50u32 {
        let s = step(&ctx, &state, sample_input(InputKind::TransientFailure), T0).unwrap();
        assert_eq!(s.state.phase.kind(), PhaseKind::TerminatingInstance);
        assert!(s.effect.is_some(), "the intent stays");
        // Every CLEANUP_PATIENCE-th failure asks the driver to stop and
        // say why (a resumed cleanup gets as many tries again); the machine
        // itself never gives up.
        match s.pause {
            Some(Pause::CleanupStalled {
                failures,
                last_error,
                ..
            }) => {
                assert!(n.is_multiple_of(CLEANUP_PATIENCE), "paused after {n}");
                assert_eq!(failures, n);
                assert_eq!(last_error, "RequestLimitExceeded");
            }
            None => assert!(!n.is_multiple_of(CLEANUP_PATIENCE), "no pause after {n}"),
        }
        state = s.state;
    }
}

/// A cleanup step that sweeps or terminates and hears "nothing there": soon
/// after a launch that is EC2 not showing it yet, later it is the truth.
#[test]
fn not_found_during_cleanup_is_believed_only_after_the_grace() {
    let ctx = ctx(shapes()[0]);
    for (state, input, grace) in [
        (
            terminating(Some("i-1"), T0),
            Input::InstanceNotFound,
            LAUNCH_VISIBILITY_GRACE,
        ),
        (terminating(None, T0), Input::NoInstanceFound, SWEEP_SETTLE),
    ] {
        let early = T0.plus(grace - Duration::from_millis(1));
        let s = step(&ctx, &state, input.clone(), early).unwrap();
        assert_eq!(s.state.phase.kind(), PhaseKind::TerminatingInstance);
        assert_eq!(s.guards, Guards::from(Guard::JustLaunched));
        let every = ctx.request.timeouts.poll_interval;
        let wake = s.wake_at.expect("a poll");
        // The next point of the poll grid: within one interval.
        assert!(wake > early && wake <= early.plus(every), "{wake:?}");
        assert_eq!(wake.0 % every.as_millis() as u64, 0);
        let s = step(&ctx, &state, input, T0.plus(grace)).unwrap();
        assert_eq!(s.state.phase.kind(), PhaseKind::TornDown);
        assert!(
            s.guards.iter().any(|g| g == Guard::GraceOver),
            "{:?}",
            s.guards
        );
    }
    // A sweep with no launch time (a refused launch made nothing) is believed at once.
    let mut refused = terminating(None, T0);
    if let ProvisionPhase::TerminatingInstance(t) = &mut refused.phase {
        t.launched_at = None;
    }
    let s = step(&ctx, &refused, Input::NoInstanceFound, T0).unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::TornDown);
}

/// Cleanup looks again for an instance EC2 may not show yet 1, 2, 4, 8
/// and 16 s after the launch, then at most 30 s apart, and last when the
/// grace ends, not every poll interval; on a coarser poll grid, at its
/// next points. A launch time ahead of the clock counts from the clock.
/// A spot instance being given up for on-demand is looked for the same way.
#[test]
fn cleanup_looks_again_at_doubling_spans_until_the_grace_ends() {
    let swept = (terminating(None, T0), Input::NoInstanceFound);
    let by_id = (terminating(Some("i-1"), T0), Input::InstanceNotFound);
    let ahead = (
        terminating(None, T0.plus(Duration::from_secs(3))),
        Input::NoInstanceFound,
    );
    // A spot instance being given up for on-demand, launched at T0, its
    // request cancelled (the terminate comes after the cancel).
    let spot = ctx(Shape {
        spot: Some(true),
        subnets: 1,
        owned_key: true,
        policy: 0,
    });
    let cancelled = phases(&spot)
        .into_iter()
        .find(|p| matches!(p, ProvisionPhase::AbandoningSpot(a) if a.request_cancelled));
    let abandoning = (
        SessionState::fresh(cancelled.expect("a sample AbandoningSpot, request cancelled")),
        Input::InstanceNotFound,
    );
    let by_id_looks = vec![
        1, 2, 4, 8, 16, 32, 62, 92, 122, 152, 182, 212, 242, 272, 300,
    ];
    for ((state, input), every, expected) in [
        (swept.clone(), 1, vec![1, 2, 4, 8, 16, 30]),
        (swept.clone(), 5, vec![5, 10, 20, 30]),
        (swept.clone(), 10, vec![10, 20, 30]),
        // A poll interval longer than the grace: one look, past it.
        (swept, 50, vec![50]),
        (by_id, 1, by_id_looks.clone()),
        // Every second until the clock reaches the launch time, then doubling.
        (ahead, 1, vec![1, 2, 3, 4, 5, 7, 11, 19, 33]),
        (abandoning, 1, by_id_looks),
    ] {
        let mut ctx = spot.clone();
        ctx.request.timeouts.poll_interval = Duration::from_secs(every);
        let (mut now, mut looks) = (T0, Vec::new());
        loop {
            let s = step(&ctx, &state, input.clone(), now).unwrap();
            let Some(wake) = s.wake_at else {
                // Cleanup ends the session; a spot instance given up, in
                // the on-demand launch after it.
                let end = match state.phase {
                    ProvisionPhase::AbandoningSpot(_) => PhaseKind::Launching,
                    _ => PhaseKind::TornDown,
                };
                assert_eq!(s.state.phase.kind(), end);
                break;
            };
            assert!(wake > now, "{wake:?} after {now:?}");
            looks.push((wake.0 - T0.0) / 1000);
            now = wake;
        }
        assert_eq!(looks, expected, "{input:?} at {every} s polls: s after T0");
    }
}

/// A refused launch: believed at once when every try was answered, swept
/// with the settle when an earlier try in the phase failed (its answer
/// may be lost) or the refusal answers a send an earlier driver made.
#[test]
fn a_refused_launch_is_swept_once_unless_an_answer_may_be_lost() {
    let ctx = ctx(shapes()[0]);
    let launching = phase_of(&ctx, PhaseKind::Launching);
    let refused = sample_input(InputKind::LaunchRefused);
    let launched_at = |state: &SessionState| match &state.phase {
        ProvisionPhase::TerminatingInstance(t) => t.launched_at,
        other => panic!("{other:?}"),
    };
    let mut state = SessionState::fresh(launching);
    let s = step(&ctx, &state, refused.clone(), T0).unwrap();
    assert_eq!(launched_at(&s.state), None);
    assert_eq!(s.guards, Guards::from(Guard::EveryTryAnswered));
    state.transient_failures = 1;
    let s = step(&ctx, &state, refused.clone(), T0).unwrap();
    assert_eq!(launched_at(&s.state), Some(T0));
    assert_eq!(s.guards, Guards::from(Guard::AnswerMayBeLost));
    // A later attempt (another subnet, on-demand after spot): an earlier
    // attempt's lost answer is not in this phase's count.
    state.transient_failures = 0;
    if let ProvisionPhase::Launching(Launching { launch }) = &mut state.phase {
        launch.attempt = 1;
    }
    let s = step(&ctx, &state, refused.clone(), T0).unwrap();
    assert_eq!(launched_at(&s.state), Some(T0));
    assert_eq!(s.guards, Guards::from(Guard::AnswerMayBeLost));
    assert_eq!(
        refused.after_earlier_send().kind(),
        InputKind::Rejected,
        "a resumed launch's refusal proves nothing"
    );
}

#[test]
fn teardown_during_cleanup_acts_at_once_with_fresh_patience() {
    let ctx = ctx(shapes()[0]);
    let state = SessionState {
        phase: ProvisionPhase::DeletingKeyPair(DeletingKeyPair {
            key: ctx.planned_key(),
            cause: CleanupCause::Failure("x".into()),
        }),
        transient_failures: CLEANUP_PATIENCE + 3,
    };
    let s = step(&ctx, &state, Input::TeardownRequested, T0).unwrap();
    assert_eq!(s.state.phase, state.phase, "the cause and key stay");
    assert_eq!(s.state.transient_failures, 0);
    assert_eq!(s.wake_at, None);
    assert_eq!(s.guards, Guards::from(Guard::AlreadyCleaningUp));
}

#[test]
fn refused_input_reports_phase_and_input() {
    let ctx = ctx(shapes()[0]);
    let err = step(&ctx, &start(&ctx).state, Input::KeyPairDeleted, T0).unwrap_err();
    assert_eq!(
        err,
        MachineError::InputNotAllowed {
            phase: PhaseKind::Validating,
            input: InputKind::KeyPairDeleted
        }
    );
}

/// What the world has left behind so far, tracked from the effects' answers.
#[derive(Debug, Default)]
struct World {
    /// Tokens whose RunInstances made an instance that is still alive.
    launched_tokens: BTreeSet<String>,
    key_may_exist: bool,
}

fn outcome_for(effect: &Effect, kind: InputKind) -> Input {
    match (effect, kind) {
        (
            Effect::EnsureKeyPair {
                key_name,
                private_key_path,
            },
            InputKind::KeyPairReady,
        ) => Input::KeyPairReady {
            key: KeyPairHandle {
                key_name: key_name.clone(),
                owned: key_name.starts_with("acode-"),
                owns_key_file: true,
                private_key_path: private_key_path.clone(),
            },
        },
        (Effect::RunInstance { spot, .. }, InputKind::Launched) => Input::Launched {
            instance_id: "i-0123".into(),
            was_spot: *spot,
            spot_request_id: spot.then(|| "sir-1".to_string()),
        },
        _ => sample_input(kind),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random outcomes (and random stray inputs) never take a step outside
    /// the table, and every run ends Ready (instance tracked) or Failed /
    /// TornDown with nothing left behind, within a bounded number of steps.
    #[test]
    fn random_runs_stay_in_the_table_and_end_clean(
        shape_index in 0usize..36,
        choices in prop::collection::vec((0usize..8, 0u64..90_000, 0usize..40), 600),
        teardown_when_ready in any::<bool>(),
    ) {
        let ctx = ctx(shapes()[shape_index]);
        let mut now = T0;
        let mut current = start(&ctx);
        let mut world = World::default();
        let mut cleanup_failures_in_a_row = 0;
        let mut steps = 0;
        for (pick, advance, stray) in choices {
            let Some(effect) = current.effect.clone() else { break };
            now = now.plus(Duration::from_millis(advance)).max(current.wake_at.unwrap_or(now));
            // A stray input now and then: refused unless the table has a row.
            if stray == 0 {
                let all: Vec<InputKind> = InputKind::iter().collect();
                let kind = all[pick % all.len()];
                let from = current.state.phase.kind();
                match step(&ctx, &current.state, sample_input(kind), now) {
                    Err(MachineError::InputNotAllowed { .. }) => prop_assert!(!table::accepts(from, kind)),
                    Err(e) => prop_assert!(false, "{e}"),
                    // An outside teardown, mid-way, is taken: the run must still end clean.
                    Ok(next) if kind == InputKind::TeardownRequested => {
                        prop_assert!(table::accepts(from, kind));
                        current = next;
                        continue;
                    }
                    Ok(_) => prop_assert!(table::accepts(from, kind)),
                }
            }
            let outcomes = effect.possible_outcomes();
            let mut kind = outcomes[pick % outcomes.len()];
            // The world answers cleanup eventually: no more than 3 failures in a row.
            if current.state.phase.kind().is_cleanup() && kind == InputKind::TransientFailure {
                cleanup_failures_in_a_row += 1;
                if cleanup_failures_in_a_row > 3 {
                    kind = outcomes[0];
                    cleanup_failures_in_a_row = 0;
                }
            }
            // A sweep finds what the world has (once EC2 shows it).
            if kind == InputKind::NoInstanceFound && !world.launched_tokens.is_empty() {
                kind = InputKind::InstanceTerminated;
            }
            // EC2's token rule: a token that made an instance always answers with it.
            if let Effect::RunInstance { client_token, .. } = &effect
                && world.launched_tokens.contains(client_token.as_str())
                && kind != InputKind::TransientFailure
            {
                kind = InputKind::Launched;
            }
            match (&effect, kind) {
                (Effect::EnsureKeyPair { .. }, _) if ctx.request.key_pair.is_owned() => world.key_may_exist = true,
                (Effect::RunInstance { client_token, .. }, InputKind::Launched) => {
                    world.launched_tokens.insert(client_token.to_string());
                }
                // A lost answer: the instance may have been made after all.
                (Effect::RunInstance { client_token, .. }, InputKind::TransientFailure) if advance % 2 == 0 => {
                    world.launched_tokens.insert(client_token.to_string());
                }
                // Terminate also sweeps every instance tagged with the session;
                // "not found" answers mean nothing of the session is left.
                (
                    Effect::TerminateInstance { .. },
                    InputKind::InstanceTerminated | InputKind::InstanceNotFound | InputKind::NoInstanceFound,
                ) => world.launched_tokens.clear(),
                (Effect::DeleteKeyPair { .. }, InputKind::KeyPairDeleted) => world.key_may_exist = false,
                _ => {}
            }
            let from = current.state.phase.kind();
            let next = step(&ctx, &current.state, outcome_for(&effect, kind), now);
            prop_assert!(next.is_ok(), "{from} refused its own effect's outcome {kind}: {next:?}");
            let next = next.unwrap();
            prop_assert!(table::contains(from, kind, next.guards, next.state.phase.kind()));
            current = next;
            steps += 1;
            if current.state.phase.kind() == PhaseKind::Ready && teardown_when_ready {
                prop_assert_eq!(world.launched_tokens.len(), 1, "Ready needs exactly one live instance");
                current = step(&ctx, &current.state, Input::TeardownRequested, now).unwrap();
            }
        }
        let end = current.state.phase.kind();
        prop_assert!(end.is_settled(), "not settled after {steps} steps: {end}");
        match end {
            PhaseKind::Ready => prop_assert_eq!(world.launched_tokens.len(), 1),
            _ => {
                prop_assert!(world.launched_tokens.is_empty(), "{end} left an instance running");
                prop_assert!(!world.key_may_exist, "{end} left a key pair behind");
            }
        }
    }
}

/// A Ready spot session of the given shape.
fn ready_spot(ctx: &SessionContext) -> SessionState {
    SessionState::fresh(ProvisionPhase::Ready(Ready {
        instance: spot_instance(ctx),
        public_ip: Some("54.1.2.3".into()),
        private_ip: None,
        ssh_endpoint: "127.0.0.1:2222".into(),
        host_key_fingerprint: "SHA256:abc".into(),
        host_key: "ssh-ed25519 AAAA".into(),
    }))
}

#[test]
fn a_notice_runs_the_shutdown_command_in_the_window_then_cleans_up_to_interrupted() {
    let ctx = ctx(Shape {
        spot: Some(true),
        subnets: 1,
        owned_key: true,
        policy: 0,
    });
    let s = step(
        &ctx,
        &ready_spot(&ctx),
        sample_input(InputKind::InterruptionNoticed),
        T0,
    )
    .unwrap();
    let ProvisionPhase::Interrupting(p) = &s.state.phase else {
        panic!("{:?}", s.state.phase)
    };
    // 90 s of shutdown timeout, ending 5 s before EC2 acts at T0 + 120 s.
    assert_eq!(p.command_deadline, T0.plus(Duration::from_secs(90)));
    let Some(Effect::RunShutdownCommand {
        host_key_fingerprint,
        command,
        deadline,
        ..
    }) = &s.effect
    else {
        panic!("{:?}", s.effect)
    };
    assert_eq!(host_key_fingerprint, "SHA256:abc");
    assert_eq!(command, "systemctl stop agent");
    assert_eq!(*deadline, p.command_deadline);
    let mut s = step(
        &ctx,
        &s.state,
        sample_input(InputKind::ShutdownCommandFinished),
        T0,
    )
    .unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::TerminatingInstance);
    for input in [Input::InstanceTerminated, Input::KeyPairDeleted] {
        s = step(&ctx, &s.state, input, T0).unwrap();
    }
    let ProvisionPhase::Interrupted(end) = &s.state.phase else {
        panic!("{:?}", s.state.phase)
    };
    assert!(
        end.reason.contains("shutdown command: exited 0"),
        "{}",
        end.reason
    );
    assert_eq!(end.replacement, Some(format!("{}-r1", ctx.session_id)));
    assert_eq!(s.effect, None);
}

#[test]
fn a_notice_too_close_to_act_on_goes_straight_to_cleanup() {
    let ctx = ctx(Shape {
        spot: Some(true),
        subnets: 1,
        owned_key: true,
        policy: 0,
    });
    let late = InterruptionNotice {
        at: T0.plus(Duration::from_secs(4)),
        ..notice()
    };
    let s = step(
        &ctx,
        &ready_spot(&ctx),
        Input::InterruptionNoticed { notice: late },
        T0,
    )
    .unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::TerminatingInstance);
    assert_eq!(s.guards, Guards::from(Guard::NoShutdownCommand));
}

#[test]
fn replacements_are_named_from_the_session_they_replace() {
    assert_eq!(decide::replacement_id("abc"), "abc-r1");
    assert_eq!(decide::replacement_id("abc-r1"), "abc-r2");
    assert_eq!(decide::replacement_id("abc-r9"), "abc-r10");
    assert_eq!(decide::replacement_id("a-rx"), "a-rx-r1");
}

#[test]
fn spot_short_in_every_zone_with_fallback_launches_on_demand_at_once() {
    let ctx = ctx(Shape {
        spot: Some(true),
        subnets: 2,
        owned_key: true,
        policy: 0,
    });
    let facts = PlacementFacts {
        short_zones: zones(&ctx)
            .into_iter()
            .map(|zone| ShortZone { zone, spot: true })
            .collect(),
        ..PlacementFacts::default()
    };
    let s = start(&ctx);
    let validated = Input::Validated {
        image: image(),
        zones: zones(&ctx),
        zone_ids: Vec::new(),
    };
    let s = step(&ctx, &s.state, validated, T0).unwrap();
    let s = step(&ctx, &s.state, sample_input(InputKind::KeyPairReady), T0).unwrap();
    let s = step(
        &ctx,
        &s.state,
        Input::PlacementFound {
            facts: Box::new(facts),
        },
        T0,
    )
    .unwrap();
    assert_eq!(s.state.phase.kind(), PhaseKind::Launching);
    assert!(matches!(
        s.effect,
        Some(Effect::RunInstance { spot: false, .. })
    ));
}

#[test]
fn timestamps_read_as_utc_dates() {
    assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
    assert_eq!(
        Timestamp(1_795_687_200_000).to_string(),
        "2026-11-26T10:00:00Z"
    );
    assert_eq!(
        Timestamp(1_709_210_096_999).to_string(),
        "2024-02-29T12:34:56Z"
    );
}

proptest! {
    /// The same text as the SDK's date formatting, to the second, up to
    /// the year 9999.
    #[test]
    fn timestamps_format_as_the_sdk_does(ms in 0u64..253_402_300_800_000) {
        let sdk = aws_sdk_ec2::primitives::DateTime::from_secs((ms / 1000) as i64)
            .fmt(aws_sdk_ec2::primitives::DateTimeFormat::DateTime)
            .unwrap();
        prop_assert_eq!(Timestamp(ms).to_string(), sdk);
    }
}
