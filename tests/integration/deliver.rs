//! One way in: outside inputs reach a session through `Engine::deliver`,
//! committed like an effect's outcome, whether or not this engine is
//! driving the session at that moment.

use std::sync::Arc;
use std::time::Duration;

use acode_ec2::driver::{Engine, EngineError};
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{Input, MachineError, PhaseKind};
use acode_ec2::store::CheckpointStore;

use crate::common::{Harness, request};
use crate::fake_world::FakeWorld;

/// On demand, SSH polled every 50 ms for up to 5 minutes.
const WAITS_FOR_SSH: &str = "  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  pollInterval: 50ms\n  sshTimeout: 5m\n  ssh:\n    endpointOverride: 127.0.0.1:22\n";

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
            .deliver(&id, Input::TeardownRequested, &NoProgress)
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
async fn a_finished_session_refuses_inputs_but_teardown_is_a_no_op() {
    let harness = Harness::new();
    let world = Arc::new(FakeWorld::default());
    let engine = harness.fast_engine(world.clone());
    let ready = engine
        .provision(request(WAITS_FOR_SSH), &NoProgress)
        .await
        .unwrap();
    // The second teardown finds nothing to do.
    let mut calls = Vec::new();
    for _ in 0..2 {
        let end = engine.teardown(&ready.session_id, &NoProgress).await;
        assert_eq!(end.unwrap(), PhaseKind::TornDown);
        calls.push(world.state.lock().unwrap().calls.len());
    }
    assert_eq!(calls[0], calls[1], "a second teardown ran effects");
    let calls = calls[1];
    let refused = engine
        .deliver(&ready.session_id, Input::InstancePending, &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            EngineError::Machine(MachineError::InputNotAllowed {
                phase: PhaseKind::TornDown,
                ..
            })
        ),
        "{refused}"
    );
    assert_eq!(
        world.state.lock().unwrap().calls.len(),
        calls,
        "nothing ran"
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
