//! The lab's EC2 behaviour as the real aws-sdk-ec2 client sees it: what
//! the engine relies on (timing, token idempotency, IMDS, placement scores)
//! and that the lab leaves no process behind. The lab's own self-test
//! (tests/lab/test_lab.py) covers every control knob with boto3.

use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, InstanceStateName, SummaryStatus};
use serde_json::json;

use crate::lab::{Lab, http};

async fn run(lab: &Lab, token: &str, instance_type: &str) -> Result<String, String> {
    let out = lab
        .ec2()
        .run_instances()
        .image_id(&lab.info.ami_id)
        .instance_type(instance_type.into())
        .min_count(1)
        .max_count(1)
        .subnet_id(lab.subnet("us-east-1a"))
        .client_token(token)
        .send()
        .await
        .map_err(|e| e.code().unwrap_or("no code").to_string())?;
    Ok(out.instances()[0].instance_id().unwrap().to_string())
}

async fn state(lab: &Lab, id: &str) -> InstanceStateName {
    let out = lab
        .ec2()
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    out.reservations()[0].instances()[0]
        .state()
        .unwrap()
        .name()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn client_tokens_behave_like_ec2() {
    let lab = Lab::start().unnoted();
    let first = run(&lab, "token-1", "t3.micro").await.unwrap();
    assert_eq!(
        run(&lab, "token-1", "t3.micro").await.unwrap(),
        first,
        "same token, same instance"
    );
    assert_eq!(
        run(&lab, "token-1", "t3.large").await.unwrap_err(),
        "IdempotentParameterMismatch"
    );
    let found = lab
        .ec2()
        .describe_instances()
        .filters(
            Filter::builder()
                .name("client-token")
                .values("token-1")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = found
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id())
        .collect();
    assert_eq!(ids, vec![first.as_str()]);
    lab.ec2()
        .terminate_instances()
        .instance_ids(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(
        run(&lab, "token-1", "t3.micro").await.unwrap_err(),
        "IdempotentInstanceTerminated"
    );
}

#[tokio::test]
async fn instances_boot_pass_checks_and_terminate_with_delays() {
    let lab = Lab::start_with(&[
        "--boot-delay-s",
        "1",
        "--status-ok-delay-s",
        "1",
        "--terminate-delay-s",
        "1",
    ])
    .unnoted();
    let id = run(&lab, "boot", "t3.micro").await.unwrap();
    assert_eq!(state(&lab, &id).await, InstanceStateName::Pending);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(state(&lab, &id).await, InstanceStateName::Running);
    let status = |lab: &Lab| {
        let ec2 = lab.ec2();
        let id = id.clone();
        async move {
            let out = ec2
                .describe_instance_status()
                .instance_ids(id)
                .send()
                .await
                .unwrap();
            out.instance_statuses()[0]
                .instance_status()
                .unwrap()
                .status()
                .unwrap()
                .clone()
        }
    };
    assert_eq!(status(&lab).await, SummaryStatus::Initializing);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(status(&lab).await, SummaryStatus::Ok);
    lab.ec2()
        .terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(state(&lab, &id).await, InstanceStateName::ShuttingDown);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(state(&lab, &id).await, InstanceStateName::Terminated);
    assert!(lab.count("DescribeInstances") >= 4, "{:?}", lab.counters());
}

#[tokio::test]
async fn imds_announces_a_spot_interruption_only_after_the_trigger() {
    let lab = Lab::start().unnoted();
    let base = &lab.info.imds_endpoint;
    let path = "/latest/meta-data/spot/instance-action";
    let (status, token) = http(
        base,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(
        http(base, "GET", path, &[], "").0,
        401,
        "IMDSv2 needs the token"
    );
    assert_eq!(
        http(
            base,
            "GET",
            path,
            &[("X-aws-ec2-metadata-token", &token)],
            ""
        )
        .0,
        404
    );
    lab.call("POST", "/spot/interrupt", Some(json!({})));
    let (status, body) = http(
        base,
        "GET",
        path,
        &[("X-aws-ec2-metadata-token", &token)],
        "",
    );
    assert_eq!(status, 200);
    assert!(
        body.contains("\"action\"") && body.contains("terminate"),
        "{body}"
    );
}

#[tokio::test]
async fn spot_placement_scores_are_per_zone() {
    let lab = Lab::start().unnoted();
    lab.configure(json!({"placement_scores": {"us-east-1a": 7, "us-east-1b": 2}}));
    let out = lab
        .ec2()
        .get_spot_placement_scores()
        .instance_types("t3.micro")
        .target_capacity(1)
        .single_availability_zone(true)
        .region_names("us-east-1")
        .send()
        .await
        .expect("GetSpotPlacementScores");
    let mut scores: Vec<i32> = out
        .spot_placement_scores()
        .iter()
        .filter_map(|s| s.score())
        .collect();
    scores.sort();
    assert_eq!(scores, vec![2, 7]);
}

#[test]
fn the_lab_and_its_sshd_stop_when_the_handle_drops() {
    let lab = Lab::start().unnoted();
    let pid = lab.pid();
    let sshd = format!("127.0.0.1:{}", lab.info.sshd_port);
    assert!(
        std::net::TcpStream::connect(&sshd).is_ok(),
        "sshd answers while the lab runs"
    );
    drop(lab);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "lab process {pid} outlived its handle"
    );
    assert!(
        std::net::TcpStream::connect(&sshd).is_err(),
        "sshd outlived the lab"
    );
}
