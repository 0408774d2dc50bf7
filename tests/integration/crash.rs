//! Crash injection at every intent boundary, against a scripted world that
//! keeps EC2's token rules: resume re-sends the same token and never makes a
//! second instance.

use std::sync::Arc;

use acode_ec2::driver::{CrashPoint, EngineError};
use acode_ec2::events::NoProgress;
use acode_ec2::machine::PhaseKind;
use acode_ec2::store::CheckpointStore;

use crate::common::{Harness, dead_holder, request};
use crate::fake_world::FakeWorld;

const SPOT_WITH_FALLBACK: &str = "  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  useSpot: true\n  pollInterval: 50ms\n  ssh:\n    endpointOverride: 127.0.0.1:22\n";

/// Effects a clean run performs; crashes are injected at each of them.
const EFFECTS_IN_A_CLEAN_RUN: u32 = 6;

#[tokio::test]
async fn a_crash_at_any_boundary_resumes_to_one_ready_instance_with_one_token() {
    for point in [
        CrashPoint::AfterIntentCommit,
        CrashPoint::AfterEffect,
        CrashPoint::AfterOutcomeCommit,
    ] {
        for nth in 1..=EFFECTS_IN_A_CLEAN_RUN {
            let harness = Harness::new();
            let world = Arc::new(FakeWorld::default());
            let crashing = harness
                .engine(world.clone())
                .with_holder(dead_holder())
                .with_crash(point, nth);
            let first = crashing
                .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
                .await;
            let session_id = match first {
                Err(EngineError::InjectedCrash { .. }) => {
                    harness.store.list().unwrap()[0].session_id.clone()
                }
                other => panic!("{point:?} #{nth}: expected the injected crash, got {other:?}"),
            };
            drop(crashing);

            // A new process recovers the session: the dead holder's lease is void.
            let recovering = harness.engine(world.clone());
            let already_ready =
                harness.store.summary(&session_id).unwrap().phase == PhaseKind::Ready;
            let report = recovering.recover(&NoProgress).await.unwrap();
            if already_ready {
                // Crashed after the final commit: nothing left to recover.
                assert!(report.is_empty(), "{point:?} #{nth}: {report:?}");
            } else {
                assert_eq!(report.len(), 1, "{point:?} #{nth}: {report:?}");
                assert_eq!(
                    report[0].result.as_ref().ok(),
                    Some(&PhaseKind::Ready),
                    "{point:?} #{nth}: {report:?}"
                );
            }

            assert_eq!(
                world.instances_ever(),
                1,
                "{point:?} #{nth}: a second instance was launched"
            );
            let tokens = world.state.lock().unwrap().run_instance_tokens.clone();
            assert!(
                !tokens.is_empty() && tokens.iter().all(|t| *t == tokens[0]),
                "{point:?} #{nth}: {tokens:?}"
            );
            assert_eq!(
                harness.store.summary(&session_id).unwrap().phase,
                PhaseKind::Ready
            );

            // And teardown leaves nothing.
            let end = recovering.teardown(&session_id, &NoProgress).await.unwrap();
            assert_eq!(end, PhaseKind::TornDown);
            assert!(world.live_instances().is_empty(), "{point:?} #{nth}");
            assert!(
                world.state.lock().unwrap().key_pairs.is_empty(),
                "{point:?} #{nth}"
            );
        }
    }
}

#[tokio::test]
async fn the_crash_points_cover_every_effect_of_a_clean_run() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    harness
        .engine(world.clone())
        .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        world.state.lock().unwrap().calls.len() as u32,
        EFFECTS_IN_A_CLEAN_RUN
    );
}

#[tokio::test]
async fn teardown_of_a_session_crashed_mid_launch_terminates_what_the_launch_made() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    // Crash right after RunInstances ran (effect #3) but before its outcome was recorded.
    let crashing = harness
        .engine(world.clone())
        .with_holder(dead_holder())
        .with_crash(CrashPoint::AfterEffect, 3);
    assert!(
        crashing
            .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
            .await
            .is_err()
    );
    let session_id = harness.store.list().unwrap()[0].session_id.clone();
    assert_eq!(
        harness.store.summary(&session_id).unwrap().phase,
        PhaseKind::RequestingSpot
    );
    assert_eq!(
        world.live_instances().len(),
        1,
        "the launch happened; the log does not know its id yet"
    );

    let end = harness
        .engine(world.clone())
        .teardown(&session_id, &NoProgress)
        .await
        .unwrap();
    assert_eq!(end, PhaseKind::TornDown);
    assert!(
        world.live_instances().is_empty(),
        "teardown left the instance running"
    );
    assert_eq!(world.instances_ever(), 1);
}

#[tokio::test]
async fn a_live_driver_blocks_a_second_one() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    // Stops dead while still holding a lease of a live process (this one).
    let first = harness
        .engine(world.clone())
        .with_crash(CrashPoint::AfterOutcomeCommit, 2);
    assert!(
        first
            .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
            .await
            .is_err()
    );
    let session_id = harness.store.list().unwrap()[0].session_id.clone();
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

/// A cleanup step that fails on every try: the driver stops with advice
/// after `CLEANUP_PATIENCE` failures, and the session stays recoverable.
/// (The session is written one failure short of the limit, so the test does
/// not sit through minutes of backoff.)
#[tokio::test]
async fn a_cleanup_that_keeps_failing_stops_with_advice_and_stays_recoverable() {
    use acode_ec2::driver::CLEANUP_PATIENCE;
    use acode_ec2::machine::{
        CleanupCause, ProvisionPhase, SessionContext, SessionState, TerminatingInstance,
    };
    use acode_ec2::store::{Checkpoint, Intent};

    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    let ready = harness
        .engine(world.clone())
        .provision(request(SPOT_WITH_FALLBACK), &NoProgress)
        .await
        .unwrap();
    let context = SessionContext {
        session_id: "stalled-cleanup".into(),
        request: request(SPOT_WITH_FALLBACK),
        key_dir: harness.key_dir(),
    };
    let terminating = ProvisionPhase::TerminatingInstance(TerminatingInstance {
        instance_id: Some(ready.instance_id.clone()),
        launched_at: None,
        key: None,
        cause: CleanupCause::Teardown,
    });
    let checkpoint = Checkpoint {
        outcome: None,
        state: SessionState {
            phase: terminating.clone(),
            transient_failures: CLEANUP_PATIENCE - 1,
        },
        intent: acode_ec2::machine::effect_for(&context, &terminating).map(|effect| Intent {
            effect,
            not_before: None,
        }),
    };
    let now = acode_ec2::effects::now();
    harness
        .store
        .create(
            &context,
            &checkpoint,
            &dead_holder(),
            std::time::Duration::from_secs(30),
            now,
        )
        .unwrap();
    world.state.lock().unwrap().terminate_refused = true;

    let err = harness
        .engine(world.clone())
        .teardown("stalled-cleanup", &NoProgress)
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
    assert_eq!(
        harness.store.summary("stalled-cleanup").unwrap().phase,
        PhaseKind::TerminatingInstance
    );
    assert_eq!(
        world.live_instances().len(),
        1,
        "nothing was terminated yet"
    );

    // Once the cause is fixed, another driver (the lease was released) finishes it.
    world.state.lock().unwrap().terminate_refused = false;
    let end = harness
        .engine(world.clone())
        .teardown("stalled-cleanup", &NoProgress)
        .await
        .unwrap();
    assert_eq!(end, PhaseKind::TornDown);
    assert!(world.live_instances().is_empty());
}
