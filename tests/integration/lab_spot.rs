//! Spot placement and accounting against the lab (#9): placement scores
//! and recent prices choose the subnet, a capacity failure steers later
//! sessions away for a while, the spot request is tracked and cancelled
//! (also when fulfilment races the cancel), savings are told, and a spot
//! instance reclaimed while waiting for SSH is replaced on demand.

use std::sync::Arc;

use acode_ec2::clock::{ManualClock, wall_clock};
use acode_ec2::driver::{EngineError, ReadyInstance};
use acode_ec2::effects::placement::SHORTAGE_MEMORY;
use acode_ec2::events::{NoProgress, ProvisionEvent};
use acode_ec2::machine::{Input, ProvisionPhase};
use acode_ec2::store::CheckpointStore;
use serde_json::{Value, json};
use tokio::sync::broadcast::Receiver;

use crate::cli::{cli, config_file};
use crate::common::{Harness, request};
use crate::crashing::{ALL_POINTS, is_crash};
use crate::lab::Lab;
use crate::lab_engine::spot_fallbacks;

/// Spot in the subnets of us-east-1a then us-east-1b (config order).
fn spot_yaml(lab: &Lab, extra: &str) -> String {
    lab.target_yaml(&format!(
        "  useSpot: true\n  failoverSubnetIds: [{}]\n{extra}",
        lab.subnet("us-east-1b")
    ))
}

/// The subnet the session's live instance runs in.
fn subnet_of(lab: &Lab, ready: &ReadyInstance) -> String {
    let live = lab.live_instances_of(&ready.session_id);
    assert_eq!(live.len(), 1, "{live:?}");
    live[0]["subnet_id"].as_str().expect("subnet").to_string()
}

fn drain(events: &mut Receiver<ProvisionEvent>) -> Vec<ProvisionEvent> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

#[tokio::test]
async fn the_best_scored_subnet_is_chosen_and_ties_go_to_the_cheaper_zone() {
    let lab = Lab::start();
    let harness = Harness::new();
    let (a, b) = (lab.subnet("us-east-1a"), lab.subnet("us-east-1b"));
    let cases = [
        // Config order says 1a; the score says 1b.
        (json!({"us-east-1a": 3, "us-east-1b": 9}), json!({}), &b),
        // Same score: the cheaper zone, whichever it is.
        (
            json!({"us-east-1a": 5, "us-east-1b": 5}),
            json!({"us-east-1a": 0.005, "us-east-1b": 0.002}),
            &b,
        ),
        (
            json!({"us-east-1a": 5, "us-east-1b": 5}),
            json!({"us-east-1a": 0.001, "us-east-1b": 0.009}),
            &a,
        ),
    ];
    for (scores, prices, expected) in cases {
        let mut settings = json!({"placement_scores": scores});
        if prices != json!({}) {
            settings["spot_prices"] = prices.clone();
        }
        lab.configure(settings);
        // An engine per market: one process shares spot answers for a minute.
        let engine = harness.engine(lab.effects());
        let ready = engine
            .provision(request(&spot_yaml(&lab, "")), &NoProgress)
            .await
            .expect("Ready");
        assert!(ready.was_spot);
        assert_eq!(&subnet_of(&lab, &ready), expected, "{scores} {prices}");
        engine
            .teardown(&ready.session_id, &NoProgress)
            .await
            .unwrap();
    }
}

#[test]
fn failing_placement_scores_keep_the_config_order_and_say_why() {
    let lab = Lab::start();
    lab.configure(json!({"placement_scores": {"us-east-1a": 3, "us-east-1b": 9}}));
    lab.fault(json!({"action": "GetSpotPlacementScores", "code": "InternalError", "count": 5}));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let config = config_file(dir.path(), "spot.yaml", &spot_yaml(&lab, ""));
    let out = cli(
        &db,
        Some(&lab),
        &["provision", "--json", "--config", config.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("placement chosen without every fact")
            && stderr.contains("GetSpotPlacementScores")
            && stderr.contains("InternalError"),
        "{stderr}"
    );
    let ready: Value = serde_json::from_slice(&out.stdout).unwrap();
    let session = ready["session_id"].as_str().unwrap();
    let live = lab.live_instances_of(session);
    assert_eq!(live[0]["subnet_id"], lab.subnet("us-east-1a").as_str());
    assert!(
        cli(&db, Some(&lab), &["teardown", session])
            .status
            .success()
    );
}

#[tokio::test]
async fn a_capacity_failure_steers_later_sessions_away_for_three_minutes() {
    let lab = Lab::start();
    lab.configure(json!({"placement_scores": {"us-east-1a": 3, "us-east-1b": 9}}));
    let (a, b) = (lab.subnet("us-east-1a"), lab.subnet("us-east-1b"));
    // One capacity failure in 1b. EC2 answers it with HTTP 500, yet the
    // call is not retried: another zone is the remedy, not the same one again.
    lab.fault(json!({"action": "RunInstances", "code": "InsufficientInstanceCapacity", "count": 1, "subnet_id": b}));
    let clock = Arc::new(ManualClock::starting_at(wall_clock()));
    let effects = Arc::new(lab.bare_effects().with_clock(clock.clone()));
    let harness = Harness::new();
    let engine = harness.engine(effects);
    let launches = || lab.count("RunInstances");

    // The best-scored zone runs out: the first session fails over to 1a.
    let first = engine
        .provision(request(&spot_yaml(&lab, "")), &NoProgress)
        .await
        .expect("Ready");
    assert_eq!(subnet_of(&lab, &first), a);
    let after_first = launches();
    // The next one starts where capacity was, not where the score points.
    let second = engine
        .provision(request(&spot_yaml(&lab, "")), &NoProgress)
        .await
        .expect("Ready");
    assert_eq!(subnet_of(&lab, &second), a);
    assert_eq!(
        launches(),
        after_first + 1,
        "the second session tried 1b again"
    );
    // Three minutes on, 1b is the best again.
    clock.advance(SHORTAGE_MEMORY);
    let third = engine
        .provision(request(&spot_yaml(&lab, "")), &NoProgress)
        .await
        .expect("Ready");
    assert_eq!(subnet_of(&lab, &third), b);
}

/// The spot request behind a session's first spot instance, as EC2 shows it.
async fn spot_request_of(lab: &Lab, request_id: &str) -> (String, String, Option<String>) {
    let out = lab
        .ec2()
        .describe_spot_instance_requests()
        .spot_instance_request_ids(request_id)
        .send()
        .await
        .expect("DescribeSpotInstanceRequests");
    let r = &out.spot_instance_requests()[0];
    (
        r.state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        r.status()
            .and_then(|s| s.code())
            .unwrap_or_default()
            .to_string(),
        r.instance_id().map(str::to_string),
    )
}

fn fallback_request_id(events: &[ProvisionEvent]) -> String {
    let ids: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ProvisionEvent::SpotFallback {
                spot_request_id,
                reason,
                ..
            } => Some((spot_request_id.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    match ids.as_slice() {
        [(Some(id), reason)] if reason.contains("pending-fulfillment") => id.clone(),
        other => panic!("expected one fallback with its request id: {other:?}"),
    }
}

#[tokio::test]
async fn a_spot_timeout_cancels_the_request_and_terminates_what_raced_the_cancel() {
    let lab = Lab::start();
    // Spot is slow to fulfil, and fulfilment wins the race with the cancel.
    lab.configure(json!({"spot_fulfill_delay_s": 30.0, "spot_cancel_race": true}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let yaml = spot_yaml(
        &lab,
        "  spotRequestTimeout: 1s\n  spotFallbackToOnDemand: true\n",
    );
    let ready = engine
        .provision(request(&yaml), &NoProgress)
        .await
        .expect("Ready on demand");
    assert!(!ready.was_spot);
    let request_id = fallback_request_id(&drain(&mut events));
    let (state, code, raced) = spot_request_of(&lab, &request_id).await;
    assert_eq!(
        (state.as_str(), code.as_str()),
        ("cancelled", "request-canceled-and-instance-running")
    );
    let raced = raced.expect("the race left an instance");
    let live = lab.live_instances_of(&ready.session_id);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0]["instance_id"], ready.instance_id.as_str());
    assert_ne!(raced, ready.instance_id);
    assert_eq!(lab.count("CancelSpotInstanceRequests"), 1);

    // Without fallback the session fails, and nothing at all is left.
    let yaml = spot_yaml(
        &lab,
        "  spotRequestTimeout: 1s\n  spotFallbackToOnDemand: false\n",
    );
    let failed = engine.provision(request(&yaml), &NoProgress).await;
    let Err(EngineError::ProvisionFailed { session_id, .. }) = failed else {
        panic!("{failed:?}")
    };
    assert!(lab.live_instances_of(&session_id).is_empty());
}

#[tokio::test]
async fn a_ready_spot_session_tells_its_savings_and_its_request() {
    let lab = Lab::start();
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let ready = engine
        .provision(lab.request("  useSpot: true\n"), &NoProgress)
        .await
        .expect("Ready");
    assert!(ready.was_spot);
    let savings: Vec<_> = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, ProvisionEvent::SpotSavings { .. }))
        .collect();
    let [
        ProvisionEvent::SpotSavings {
            spot_price: Some(spot),
            on_demand_price: Some(on_demand),
            savings_percent: Some(percent),
            ..
        },
    ] = savings.as_slice()
    else {
        panic!("expected one savings event with both prices: {savings:?}")
    };
    // The lab's defaults: t3.micro at $0.0104 on demand, $0.0035 spot in 1a.
    assert_eq!((*spot, *on_demand), (0.0035, 0.0104));
    assert!((percent - 66.3).abs() < 0.05, "{percent}");
    let line = ready.spot_savings.as_deref().expect("savings line");
    assert!(line.contains("66.3% saved"), "{line}");
    // The request is tracked as EC2 shows it.
    let session = harness.store.load(&ready.session_id).await.unwrap();
    let ProvisionPhase::Ready(phase) = &session.state.phase else {
        panic!("{:?}", session.state.phase)
    };
    let tracked = phase.instance.spot_request.as_deref().expect("request");
    assert_eq!(
        Some(tracked.request_id.as_str()),
        ready.spot_request_id.as_deref()
    );
    assert_eq!(tracked.status_code.as_deref(), Some("fulfilled"));
    // One zone: nothing to rank, so no placement scores; prices once each.
    let calls = lab.counters();
    eprintln!("EC2 and Price List calls of one spot session: {calls:?}");
    assert_eq!(calls.get("GetSpotPlacementScores"), None);
    assert_eq!(calls.get("DescribeSpotPriceHistory"), Some(&1));
    assert_eq!(calls.get("GetProducts"), Some(&1));
}

#[tokio::test]
async fn pricing_denied_says_savings_unknown_and_the_session_is_ready() {
    let lab = Lab::start();
    lab.fault(json!({"action": "GetProducts", "code": "AccessDeniedException", "count": 5}));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let ready = engine
        .provision(lab.request("  useSpot: true\n"), &NoProgress)
        .await
        .expect("Ready");
    let why = drain(&mut events).into_iter().find_map(|e| match e {
        ProvisionEvent::SpotSavings {
            unknown_reason,
            savings_percent: None,
            ..
        } => unknown_reason,
        _ => None,
    });
    let why = why.expect("a savings-unknown event");
    assert!(why.contains("AccessDeniedException"), "{why}");
    let line = ready.spot_savings.expect("savings line");
    assert!(line.starts_with("savings unknown"), "{line}");
}

#[tokio::test]
async fn a_spot_instance_reclaimed_while_waiting_for_ssh_is_replaced_on_demand() {
    let lab = Lab::start();
    // sshd answers only 2 s after a launch; spot is reclaimed 0.5 s after it runs.
    lab.configure(json!({
        "ssh_start_delay_s": 2.0,
        "spot_reclaim_after_running_s": 0.3,
        "spot_reclaim_notice_s": 0.2,
    }));
    let harness = Harness::new();
    let engine = harness.engine(lab.effects());
    let mut events = engine.subscribe();
    let ready = engine
        .provision(
            lab.request("  useSpot: true\n  spotFallbackToOnDemand: true\n"),
            &NoProgress,
        )
        .await
        .expect("Ready on demand");
    assert!(!ready.was_spot);
    let reasons = spot_fallbacks(&mut events);
    assert!(
        matches!(reasons.as_slice(), [r] if r.contains("reclaimed") && r.contains("before it was Ready")),
        "{reasons:?}"
    );
    // One instance at a time: the spot one was gone before the next launch.
    let outcomes = harness.outcomes(&ready.session_id).await;
    let gone = outcomes
        .iter()
        .position(|i| matches!(i, Input::InstanceTerminated))
        .expect("the spot instance was terminated");
    let relaunched = outcomes
        .iter()
        .rposition(|i| {
            matches!(
                i,
                Input::Launched {
                    was_spot: false,
                    ..
                }
            )
        })
        .expect("an on-demand launch");
    assert!(gone < relaunched, "{outcomes:?}");
    let live = lab.live_instances_of(&ready.session_id);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0]["lifecycle"], "on-demand");
}

#[tokio::test]
async fn a_crash_around_placement_resumes_to_one_instance_in_the_ranked_subnet() {
    for point in ALL_POINTS {
        let lab = Lab::start();
        lab.configure(json!({"placement_scores": {"us-east-1a": 3, "us-east-1b": 9}}));
        let harness = Harness::new();
        // Effect #3 is FindPlacement.
        let crashing = harness.crashing_engine(lab.effects(), point, 3);
        let first = crashing
            .provision(request(&spot_yaml(&lab, "")), &NoProgress)
            .await;
        assert!(first.as_ref().is_err_and(is_crash), "{point:?}: {first:?}");
        let report = harness
            .engine(lab.effects())
            .recover(&NoProgress)
            .await
            .unwrap();
        let session_id = &report[0].session_id;
        let live = lab.live_instances_of(session_id);
        assert_eq!(live.len(), 1, "{point:?}: {live:?}");
        assert_eq!(live[0]["subnet_id"], lab.subnet("us-east-1b").as_str());
        assert_eq!(lab.count("RunInstances"), 1, "{point:?}");
    }
}
