//! Crash injection at every intent boundary of provisioning, cleanup and
//! spot abandonment, against a scripted world that keeps EC2's token rules:
//! resume re-sends the same token, never makes a second instance, and
//! whatever was made is cleaned up.

use std::sync::Arc;

use acode_ec2::driver::{EngineError, ReadyInstance, WatchOptions};
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{CLEANUP_PATIENCE, PhaseKind};
use acode_ec2::store::{CheckpointStore, LeaseHolder};

use crate::common::{Harness, request};
use crate::crashing::{ALL_POINTS, CrashPoint, is_crash};
use crate::fake_world::FakeWorld;

const SPOT_WITH_FALLBACK: &str = "  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n  useSpot: true\n  pollInterval: 50ms\n  ssh:\n    endpointOverride: 127.0.0.1:22\n";

/// Effects a clean run performs; crashes are injected at each of them.
const EFFECTS_IN_A_CLEAN_RUN: u32 = 8;

async fn phase_of(harness: &Harness, session_id: &str) -> PhaseKind {
    harness.store.summary(session_id).await.unwrap().phase
}

/// A session provisioned to Ready without a crash.
async fn ready_in_a_fake_world(harness: &Harness) -> (Arc<FakeWorld>, ReadyInstance) {
    let world = Arc::new(FakeWorld::default());
    let ready = harness
        .fast_engine(world.clone())
        .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
        .await
        .expect("Ready");
    (world, ready)
}

/// A fresh process tears the session down, and nothing of it is left.
async fn tear_down_to_nothing(
    harness: &Harness,
    world: &Arc<FakeWorld>,
    session_id: &str,
    case: &str,
) {
    let end = harness
        .fast_engine(world.clone())
        .teardown(session_id, &NoProgress)
        .await
        .unwrap();
    assert_eq!(end, PhaseKind::TornDown, "{case}");
    assert!(
        world.live_instances().is_empty(),
        "{case}: an instance is left"
    );
    assert!(
        world.state.lock().unwrap().key_pairs.is_empty(),
        "{case}: a key pair is left"
    );
}

/// A fresh process recovers every session; each must end as `expected`.
async fn recover_all(harness: &Harness, world: &Arc<FakeWorld>, expected: PhaseKind, case: &str) {
    let report = harness
        .fast_engine(world.clone())
        .recover(&NoProgress)
        .await
        .unwrap();
    for item in &report {
        assert_eq!(
            item.result.as_ref().ok(),
            Some(&expected),
            "{case}: {report:?}"
        );
    }
}

#[tokio::test]
async fn a_crash_at_any_boundary_resumes_to_one_ready_instance_with_one_token() {
    for point in ALL_POINTS {
        for nth in 1..=EFFECTS_IN_A_CLEAN_RUN {
            let case = format!("{point:?} #{nth}");
            let harness = Harness::new();
            let world = Arc::new(FakeWorld::default());
            let crashing = harness.crashing_engine(world.clone(), point, nth);
            let first = crashing
                .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
                .await;
            assert!(
                first.as_ref().is_err_and(is_crash),
                "{case}: expected the injected crash, got {first:?}"
            );
            let session_id = harness.only_session().await;
            recover_all(&harness, &world, PhaseKind::Ready, &case).await;
            assert_eq!(
                phase_of(&harness, &session_id).await,
                PhaseKind::Ready,
                "{case}"
            );
            assert_eq!(
                world.instances_ever(),
                1,
                "{case}: a second instance was launched"
            );
            let tokens = world.state.lock().unwrap().run_instance_tokens.clone();
            assert!(
                !tokens.is_empty() && tokens.iter().all(|t| *t == tokens[0]),
                "{case}: {tokens:?}"
            );

            // And teardown leaves nothing.
            tear_down_to_nothing(&harness, &world, &session_id, &case).await;
        }
    }
}

#[tokio::test]
async fn the_crash_points_cover_every_effect_of_a_clean_run() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    harness
        .fast_engine(world.clone())
        .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        world.state.lock().unwrap().calls.len() as u32,
        EFFECTS_IN_A_CLEAN_RUN
    );
}

/// Teardown commits the request, then terminates and deletes the key pair:
/// a crash at any of those points is finished by `recover`.
#[tokio::test]
async fn a_crash_inside_cleanup_is_finished_by_recover() {
    for point in ALL_POINTS {
        for nth in 1..=3 {
            let case = format!("{point:?} #{nth}");
            let harness = Harness::new();
            let (world, ready) = ready_in_a_fake_world(&harness).await;
            let crashing = harness.crashing_engine(world.clone(), point, nth);
            let first = crashing.teardown(&ready.session_id, &NoProgress).await;
            // Teardown makes two effects and three commits: some points are never passed.
            match first {
                Err(e) if is_crash(&e) => {
                    let phase = phase_of(&harness, &ready.session_id).await;
                    assert!(
                        phase.is_cleanup() || phase == PhaseKind::TornDown,
                        "{case}: {phase}"
                    );
                    recover_all(&harness, &world, PhaseKind::TornDown, &case).await;
                }
                Ok(end) => assert_eq!(end, PhaseKind::TornDown, "{case}"),
                Err(other) => panic!("{case}: {other}"),
            }
            assert_eq!(
                phase_of(&harness, &ready.session_id).await,
                PhaseKind::TornDown,
                "{case}"
            );
            assert!(world.live_instances().is_empty(), "{case}");
            assert!(world.state.lock().unwrap().key_pairs.is_empty(), "{case}");
        }
    }
}

/// A spot instance reclaimed before it runs is terminated, then replaced on
/// demand: a crash at any point of that leaves one on-demand instance.
#[tokio::test]
async fn a_crash_while_abandoning_spot_still_ends_with_one_on_demand_instance() {
    // Validate, key pair, placement, spot launch, describe (gone), cancel
    // the spot request, terminate, on-demand launch, describe, console,
    // SSH, status checks.
    const EFFECTS: u32 = 12;
    for point in ALL_POINTS {
        for nth in 1..=EFFECTS {
            let case = format!("{point:?} #{nth}");
            let harness = Harness::new();
            let world = Arc::new(FakeWorld::default());
            world.state.lock().unwrap().spot_reclaimed = true;
            let crashing = harness.crashing_engine(world.clone(), point, nth);
            let first = crashing
                .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
                .await;
            assert!(first.as_ref().is_err_and(is_crash), "{case}: {first:?}");
            recover_all(&harness, &world, PhaseKind::Ready, &case).await;
            let state = world.state.lock().unwrap();
            let live: Vec<_> = state.instances.values().filter(|i| !i.terminated).collect();
            assert_eq!(live.len(), 1, "{case}: {:?}", state.instances);
            assert!(!live[0].spot, "{case}: the spot instance survived");
            assert_eq!(state.instances.len(), 2, "{case}: {:?}", state.instances);
        }
    }
}

#[tokio::test]
async fn the_spot_abandoning_run_has_the_effects_the_crash_test_counts() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    world.state.lock().unwrap().spot_reclaimed = true;
    let ready = harness
        .fast_engine(world.clone())
        .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
        .await
        .unwrap();
    assert!(!ready.was_spot);
    assert_eq!(
        world.state.lock().unwrap().calls,
        [
            "ValidateRequest",
            "EnsureKeyPair",
            "FindPlacement",
            "RunInstance",
            "DescribeInstance",
            "CancelSpotRequest",
            "TerminateInstance",
            "RunInstance",
            "DescribeInstance",
            "ReadConsoleHostKeys",
            "ProbeSsh",
            "DescribeInstanceStatus"
        ]
    );
}

/// The process died right after recording that it would launch (or create
/// the key pair): teardown must not launch (or create) it only to remove it.
#[tokio::test]
async fn teardown_after_a_crash_before_a_create_creates_nothing() {
    for (nth, create) in [(2, "EnsureKeyPair"), (4, "RunInstance")] {
        let harness = Harness::new();
        let world = Arc::new(FakeWorld::default());
        let crashing = harness.crashing_engine(world.clone(), CrashPoint::IntentCommitted, nth);
        let first = crashing
            .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
            .await;
        assert!(first.as_ref().is_err_and(is_crash), "{first:?}");
        let before = world.count(create);
        let session_id = harness.only_session().await;
        tear_down_to_nothing(&harness, &world, &session_id, create).await;
        assert_eq!(world.count(create), before, "teardown ran {create}");
        assert_eq!(world.count("RunInstance"), 0);
    }
}

#[tokio::test]
async fn teardown_of_a_session_crashed_mid_launch_terminates_what_the_launch_made() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    // Crash right after RunInstances ran (effect #4) but before its outcome was recorded.
    let crashing = harness.crashing_engine(world.clone(), CrashPoint::EffectRan, 4);
    assert!(
        crashing
            .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
            .await
            .is_err()
    );
    let session_id = harness.only_session().await;
    assert_eq!(
        phase_of(&harness, &session_id).await,
        PhaseKind::RequestingSpot
    );
    assert_eq!(
        world.live_instances().len(),
        1,
        "the launch happened; the log does not know its id yet"
    );

    tear_down_to_nothing(&harness, &world, &session_id, "mid-launch").await;
    assert_eq!(world.instances_ever(), 1);
}

#[tokio::test]
async fn a_live_driver_blocks_a_second_one() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    // Stops dead while still holding a lease of a live process (this one).
    let first = harness
        .crashing_engine(world.clone(), CrashPoint::OutcomeCommitted, 2)
        .with_holder(LeaseHolder::for_this_process());
    assert!(
        first
            .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
            .await
            .is_err()
    );
    let session_id = harness.only_session().await;
    let err = harness
        .engine(world.clone())
        .resume(&session_id, &NoProgress)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("being driven by another process"),
        "{err}"
    );
    let report = harness.engine(world).recover(&NoProgress).await.unwrap();
    assert!(
        report[0].result.is_err(),
        "recover must leave a live driver's session alone"
    );
}

/// A cleanup step that fails on every try: after `CLEANUP_PATIENCE`
/// failures (their backoff passed on a manual clock) the machine asks the
/// driver to stop with advice, and the session stays recoverable.
#[tokio::test]
async fn a_cleanup_that_keeps_failing_stops_with_advice_and_stays_recoverable() {
    let harness = Harness::new();
    let (world, ready) = ready_in_a_fake_world(&harness).await;
    world.state.lock().unwrap().terminate_refused = true;

    let err = harness
        .fast_engine(world.clone())
        .teardown(&ready.session_id, &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::CleanupStalled { failures, .. } if failures == CLEANUP_PATIENCE),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("UnauthorizedOperation") && message.contains("acode-ec2 recover"),
        "{message}"
    );
    assert_eq!(world.count("TerminateInstance"), CLEANUP_PATIENCE as usize);
    assert_eq!(
        phase_of(&harness, &ready.session_id).await,
        PhaseKind::TerminatingInstance
    );
    assert_eq!(
        world.live_instances().len(),
        1,
        "nothing was terminated yet"
    );

    // Once the cause is fixed, another driver (the lease was released) finishes it.
    world.state.lock().unwrap().terminate_refused = false;
    tear_down_to_nothing(&harness, &world, &ready.session_id, "after the fix").await;
}

/// A spot session whose interruption runs a shutdown command and starts a
/// replacement.
const SPOT_REPLACED_ON_INTERRUPTION: &str = "  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n  useSpot: true\n  pollInterval: 50ms\n  spotInterruption:\n    shutdownCommand: sync\n    replace: true\n  ssh:\n    endpointOverride: 127.0.0.1:22\n";

/// A watcher that dies at any point of acting on a notice (committing it,
/// the shutdown command, the terminate, the key pair delete, any step of
/// the replacement) leaves what `recover` finishes: the interrupted session
/// cleaned up, exactly one replacement Ready, one live instance.
#[tokio::test]
async fn a_watcher_crash_at_any_point_of_an_interruption_is_finished_by_recover() {
    let mut crashed = 0;
    let mut ran_through = false;
    for point in ALL_POINTS {
        for nth in 1..=24 {
            let case = format!("{point:?} #{nth}");
            let harness = Harness::new();
            let world = Arc::new(FakeWorld::default());
            let ready = harness
                .fast_engine(world.clone())
                .provision(request(SPOT_REPLACED_ON_INTERRUPTION), &NoProgress)
                .await
                .unwrap();
            world.state.lock().unwrap().interrupting = Some(ready.instance_id.clone());
            // This session only: its replacement is a Ready spot session too.
            let options = WatchOptions {
                sessions: vec![ready.session_id.clone()],
                until_idle: true,
                ..WatchOptions::default()
            };
            let crashing = harness.crashing_engine(world.clone(), point, nth);
            let watched = crashing.watch(&options, &NoProgress).await;
            let died = match &watched {
                Err(e) => is_crash(e),
                Ok(items) => items.iter().any(|i| {
                    i.settled.as_ref().is_err_and(is_crash)
                        || i.replacement
                            .as_ref()
                            .is_some_and(|r| r.result.as_ref().is_err_and(is_crash))
                }),
            };
            if died {
                crashed += 1;
            } else {
                ran_through = true;
            }
            drop(crashing);
            harness
                .fast_engine(world.clone())
                .recover(&NoProgress)
                .await
                .unwrap();
            let replacement = format!("{}-r1", ready.session_id);
            assert_eq!(
                phase_of(&harness, &ready.session_id).await,
                PhaseKind::Interrupted,
                "{case}"
            );
            assert_eq!(
                phase_of(&harness, &replacement).await,
                PhaseKind::Ready,
                "{case}"
            );
            assert_eq!(
                harness.store.list().await.unwrap().len(),
                2,
                "{case}: a second replacement"
            );
            let live = world.live_instances();
            assert_eq!(live.len(), 1, "{case}: {live:?}");
            assert_eq!(world.instances_ever(), 2, "{case}: a duplicate launch");
            assert!(world.count("RunShutdownCommand") >= 1, "{case}");
        }
    }
    // About eleven of each kind of point: the notice, the shutdown command,
    // terminate, key pair delete, and the replacement's eight effects.
    assert!(crashed >= 33, "only {crashed} crashes injected");
    assert!(ran_through, "no run got through: raise the nth range");
}
