//! One way in: outside inputs reach a session through `Engine::deliver`,
//! committed like an effect's outcome, whether or not this engine is
//! driving the session at that moment.

use std::sync::Arc;
use std::time::Duration;

use acode_ec2::driver::{Engine, EngineError};
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{Input, OutsideInput, PhaseKind};
use acode_ec2::store::CheckpointStore;

use crate::common::{Harness, request};
use crate::fake_world::FakeWorld;

/// On demand, SSH polled every 50 ms for up to 5 minutes.
const WAITS_FOR_SSH: &str = "  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n  pollInterval: 50ms\n  sshTimeout: 5m\n  ssh:\n    endpointOverride: 127.0.0.1:22\n";

/// Waits until the engine's only session polls SSH; its id.
async fn waiting_for_ssh(harness: &Harness) -> String {
    for _ in 0..200 {
        if let Some(s) = harness.store.list().await.unwrap().first()
            && s.phase == PhaseKind::WaitingForSsh
        {
            return s.session_id.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the session never reached WaitingForSsh");
}

fn world_without_ssh() -> Arc<FakeWorld> {
    let world = Arc::new(FakeWorld::default());
    world.state.lock().unwrap().ssh_down = true;
    world
}

#[tokio::test]
async fn a_teardown_delivered_to_a_session_being_provisioned_cleans_it_up() {
    let harness = Harness::new();
    let world = world_without_ssh();
    let engine: Engine<FakeWorld> = harness.engine(world.clone());
    let cancel = async {
        let id = waiting_for_ssh(&harness).await;
        // Only one drive per session: this engine refuses to start a second.
        let second = engine.resume(&id, &NoProgress).await.unwrap_err();
        assert!(
            matches!(second, EngineError::AlreadyDriving { .. }),
            "{second}"
        );
        engine
            .deliver(&id, OutsideInput::TeardownRequested, &NoProgress)
            .await
    };
    let (provisioned, delivered) = tokio::join!(
        engine.provision(request(WAITS_FOR_SSH), &NoProgress),
        cancel
    );
    assert_eq!(delivered.unwrap(), PhaseKind::TerminatingInstance);
    assert!(
        matches!(provisioned, Err(EngineError::TornDown { .. })),
        "{provisioned:?}"
    );
    assert!(world.live_instances().is_empty());
    assert!(world.state.lock().unwrap().key_pairs.is_empty());
    let id = harness.only_session().await;
    assert!(
        harness
            .outcomes(&id)
            .await
            .contains(&Input::TeardownRequested),
        "the outside input was not checkpointed"
    );
}

#[tokio::test]
async fn teardown_from_another_task_waits_until_the_session_is_gone() {
    let harness = Harness::new();
    let world = world_without_ssh();
    let engine = harness.engine(world.clone());
    let teardown = async {
        let id = waiting_for_ssh(&harness).await;
        engine.teardown(&id, &NoProgress).await
    };
    let (provisioned, torn_down) = tokio::join!(
        engine.provision(request(WAITS_FOR_SSH), &NoProgress),
        teardown
    );
    assert_eq!(torn_down.unwrap(), PhaseKind::TornDown);
    assert!(provisioned.is_err());
    assert!(world.live_instances().is_empty());
}

#[tokio::test]
async fn a_teardown_of_a_finished_session_changes_nothing() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    let engine = harness.fast_engine(world.clone());
    let ready = engine
        .provision(request(WAITS_FOR_SSH), &NoProgress)
        .await
        .unwrap();
    let first = engine.teardown(&ready.session_id, &NoProgress).await;
    assert_eq!(first.unwrap(), PhaseKind::TornDown);
    let snapshot = async || {
        let calls = world.state.lock().unwrap().calls.len();
        let events = harness.store.events(&ready.session_id).await.unwrap().len();
        (calls, events)
    };
    let before = snapshot().await;
    // A second teardown, and a delivered one, find nothing to do.
    let again = engine.teardown(&ready.session_id, &NoProgress).await;
    assert_eq!(again.unwrap(), PhaseKind::TornDown);
    let delivered = engine
        .deliver(
            &ready.session_id,
            OutsideInput::TeardownRequested,
            &NoProgress,
        )
        .await;
    assert_eq!(delivered.unwrap(), PhaseKind::TornDown);
    assert_eq!(
        snapshot().await,
        before,
        "(effects run, events logged) changed"
    );
    // The lease was given back: another engine can take the session.
    harness
        .store
        .acquire_lease(
            &ready.session_id,
            &acode_ec2::store::LeaseHolder::for_this_process(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
}

/// A launch in flight when the teardown arrives is answered first (its
/// instance must be known to be terminated), then the teardown is committed.
#[tokio::test]
async fn a_teardown_during_a_launch_waits_for_its_answer_then_terminates_it() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    let engine = harness.engine(world.clone());
    let held = world.hold_launch.lock().await;
    let cancel = async {
        // RunInstances has been made; its answer is held back.
        while world.count("RunInstance") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let id = harness.only_session().await;
        let release = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(held);
        };
        let (delivered, ()) = tokio::join!(
            engine.deliver(&id, OutsideInput::TeardownRequested, &NoProgress),
            release
        );
        delivered
    };
    let (provisioned, delivered) = tokio::join!(
        engine.provision(request(WAITS_FOR_SSH), &NoProgress),
        cancel
    );
    // The launch's answer was recorded, so the teardown knew the instance.
    assert_eq!(delivered.unwrap(), PhaseKind::TerminatingInstance);
    assert!(
        matches!(provisioned, Err(EngineError::TornDown { .. })),
        "{provisioned:?}"
    );
    assert_eq!(world.count("RunInstance"), 1);
    assert_eq!(world.instances_ever(), 1);
    assert!(world.live_instances().is_empty());
    let id = harness.only_session().await;
    let outcomes = harness.outcomes(&id).await;
    let launched = outcomes
        .iter()
        .position(|i| matches!(i, Input::Launched { .. }));
    let teardown = outcomes.iter().position(|i| *i == Input::TeardownRequested);
    assert!(launched < teardown && launched.is_some(), "{outcomes:?}");
}
