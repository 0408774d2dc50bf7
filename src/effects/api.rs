//! The EC2 calls the engine makes, as one trait, so layers can wrap them:
//! the SDK client at the bottom ([`super::sdk::SdkEc2`]), then batching
//! ([`super::describe_batch::Batched`]), and whatever comes next (rate
//! limits, caches, metrics) without touching the effects above.
//!
//! Invariant: a call answers what EC2 said, as data or as an
//! [`Ec2Failure`] whose class was decided once, by
//! [`AwsErrorCode::class`]; it never decides what the session does next.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use super::keys::PrivateKeyPem;

use crate::error_code::{AwsErrorCode, ErrorClass};
use crate::machine::{ImageChoice, MicroUsd, SpotRequestStatus, StatusReport};
use crate::request::{AmiSelector, Arch, KeyAlgorithm, ProvisionRequest};

/// A failed call: which action, EC2's code (none for timeouts and dropped
/// connections) and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Failure {
    pub action: &'static str,
    pub code: Option<AwsErrorCode>,
    pub class: ErrorClass,
    pub message: String,
    /// An earlier try of this call may have reached EC2 and lost its
    /// answer (a timeout, a dropped connection, a 5xx): a refusal now does
    /// not show that the call made nothing.
    pub answer_lost_before: bool,
}

impl Ec2Failure {
    pub fn is(&self, code: &AwsErrorCode) -> bool {
        self.code.as_ref() == Some(code)
    }

    /// Whether EC2 may have carried the call out although it failed: any
    /// transient failure but a throttle, which EC2 answers before it acts.
    pub fn may_have_acted(&self) -> bool {
        self.class == ErrorClass::Transient
            && !self.code.as_ref().is_some_and(AwsErrorCode::is_throttle)
    }
}

impl fmt::Display for Ec2Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{}: {code}: {}", self.action, self.message),
            None => write!(f, "{}: {}", self.action, self.message),
        }
    }
}

impl std::error::Error for Ec2Failure {}

pub type Ec2Result<T> = Result<T, Ec2Failure>;

/// An instance's state as EC2 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
    Other(String),
}

impl InstanceState {
    pub fn as_str(&self) -> &str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Other(name) => name,
        }
    }
}

/// What DescribeInstances says of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub state: InstanceState,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
}

/// A subnet as DescribeSubnets shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetInfo {
    pub id: String,
    pub zone: String,
    /// The zone's id (`use1-az6`): the same physical zone in every account.
    pub zone_id: String,
    pub vpc: String,
}

/// What RunInstances answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchedView {
    pub instance_id: String,
    /// The one-time spot request EC2 made for a spot launch.
    pub spot_request_id: Option<String>,
}

/// What DescribeInstanceStatus (`IncludeAllInstances`) says of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceHealth {
    pub report: StatusReport,
    pub state: InstanceState,
}

/// A spot request and the instance it produced, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotRequestView {
    pub status: SpotRequestStatus,
    pub instance_id: Option<String>,
}

/// Everything one RunInstances call sends.
#[derive(Debug, Clone, Copy)]
pub struct LaunchSpec<'a> {
    pub request: &'a ProvisionRequest,
    pub client_token: &'a str,
    pub spot: bool,
    pub subnet_id: &'a str,
    pub image: &'a ImageChoice,
    /// `None` only for a dry run before the session's key pair exists.
    pub key_name: Option<&'a str>,
    /// Set at creation on the instance, its volumes and any spot request.
    pub tags: &'a [(String, String)],
    /// Ask EC2 whether the call would succeed (permissions, parameters),
    /// launching nothing.
    pub dry_run: bool,
}

pub trait Ec2Api: Send + Sync + 'static {
    /// The newest image the selector names (`None`: no such image listed).
    /// An OS alias picks the image built for `arch`; an AMI id is itself.
    fn find_image(
        &self,
        ami: &AmiSelector,
        arch: Arch,
    ) -> impl Future<Output = Ec2Result<Option<ImageChoice>>> + Send;

    /// The region the calls go to, for messages.
    fn region(&self) -> String;

    /// DescribeSubnets of `ids`; NotFound if one does not exist.
    fn describe_subnets(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Ec2Result<Vec<SubnetInfo>>> + Send;

    /// Up to `limit` subnets of the region, for suggestions.
    fn some_subnets(&self, limit: usize)
    -> impl Future<Output = Ec2Result<Vec<SubnetInfo>>> + Send;

    fn check_security_groups(&self, ids: &[String]) -> impl Future<Output = Ec2Result<()>> + Send;

    /// The zones among `zones` where EC2 offers `instance_type`; none for a
    /// type that does not exist (DescribeInstanceTypeOfferings).
    fn instance_type_zones(
        &self,
        instance_type: &str,
        zones: &[String],
    ) -> impl Future<Output = Ec2Result<Vec<String>>> + Send;

    /// Up to `limit` security group ids (of `vpc`, if given), for suggestions.
    fn some_security_groups(
        &self,
        vpc: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Ec2Result<Vec<String>>> + Send;

    fn key_pair_exists(&self, name: &str) -> impl Future<Output = Ec2Result<bool>> + Send;

    /// CreateKeyPair: EC2 hands out the private key this once.
    fn create_key_pair(
        &self,
        name: &str,
        algorithm: KeyAlgorithm,
        tags: &[(String, String)],
    ) -> impl Future<Output = Ec2Result<PrivateKeyPem>> + Send;

    fn import_key_pair(
        &self,
        name: &str,
        public_key: &str,
        tags: &[(String, String)],
    ) -> impl Future<Output = Ec2Result<()>> + Send;

    fn delete_key_pair(&self, name: &str) -> impl Future<Output = Ec2Result<()>> + Send;

    /// CreateKeyPair (or ImportKeyPair of `public_key`) with DryRun: EC2
    /// answers whether it would be allowed, and creates nothing.
    fn dry_run_key_pair(
        &self,
        name: &str,
        public_key: Option<&str>,
        tags: &[(String, String)],
    ) -> impl Future<Output = Ec2Result<()>> + Send;

    /// RunInstances; the instance it made (or made before, for the same
    /// `ClientToken`).
    fn run_instance(
        &self,
        spec: LaunchSpec<'_>,
    ) -> impl Future<Output = Ec2Result<LaunchedView>> + Send;

    /// GetSpotPlacementScores for one instance of `instance_type` in a
    /// single zone of this region: score (1–10) by zone id.
    fn spot_placement_scores(
        &self,
        instance_type: &str,
    ) -> impl Future<Output = Ec2Result<HashMap<String, u8>>> + Send;

    /// DescribeSpotPriceHistory of the last hours: the latest price by zone
    /// name, for the zones asked.
    fn spot_prices(
        &self,
        instance_type: &str,
        product_description: &str,
        zones: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, MicroUsd>>> + Send;

    /// DescribeSpotInstanceRequests of `ids`, by filter: a request EC2 does
    /// not show (yet, or any more) is absent, not an error.
    fn spot_requests(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, SpotRequestView>>> + Send;

    /// One spot request; layers may share the call with other sessions.
    fn spot_request(
        &self,
        request_id: &str,
    ) -> impl Future<Output = Ec2Result<Option<SpotRequestView>>> + Send {
        let ids = [request_id.to_string()];
        async move { Ok(self.spot_requests(&ids).await?.remove(&ids[0])) }
    }

    /// CancelSpotInstanceRequests; the request's state after it.
    fn cancel_spot_request(
        &self,
        request_id: &str,
    ) -> impl Future<Output = Ec2Result<Option<String>>> + Send;

    /// What EC2 shows of each of `ids`; an id EC2 does not show yet is
    /// absent, not an error.
    fn describe_instances(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, InstanceView>>> + Send;

    /// One instance; layers may share the call with other sessions.
    fn describe_instance(
        &self,
        id: &str,
    ) -> impl Future<Output = Ec2Result<Option<InstanceView>>> + Send {
        let ids = [id.to_string()];
        async move { Ok(self.describe_instances(&ids).await?.remove(&ids[0])) }
    }

    /// DescribeInstanceStatus (`IncludeAllInstances`) for each of `ids`; an
    /// id EC2 does not list is absent.
    fn describe_instance_statuses(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, InstanceHealth>>> + Send;

    /// One instance's status checks; layers may share the call.
    fn instance_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Ec2Result<Option<InstanceHealth>>> + Send {
        let ids = [id.to_string()];
        async move { Ok(self.describe_instance_statuses(&ids).await?.remove(&ids[0])) }
    }

    /// Ids of instances tagged with each of `session_ids` that are not (yet)
    /// shutting down or terminated; a session with none is absent.
    fn live_instances_of_sessions(
        &self,
        session_ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, Vec<String>>>> + Send;

    /// One session's live instances (cleanup's sweep); layers may share the
    /// call with other sessions.
    fn live_instances_of_session(
        &self,
        session_id: &str,
    ) -> impl Future<Output = Ec2Result<Vec<String>>> + Send {
        let ids = [session_id.to_string()];
        async move {
            let mut found = self.live_instances_of_sessions(&ids).await?;
            Ok(found.remove(&ids[0]).unwrap_or_default())
        }
    }

    fn terminate_instance(&self, id: &str) -> impl Future<Output = Ec2Result<()>> + Send;

    /// The console output, decoded; `None` while there is none.
    /// `latest` asks for live output (Nitro only).
    fn console_output(
        &self,
        id: &str,
        latest: bool,
    ) -> impl Future<Output = Ec2Result<Option<Vec<u8>>>> + Send;
}

/// A failure made here, for answers EC2 gave that make no sense.
pub fn malformed(action: &'static str, message: impl Into<String>) -> Ec2Failure {
    Ec2Failure {
        answer_lost_before: false,
        action,
        code: None,
        class: ErrorClass::Transient,
        message: message.into(),
    }
}
