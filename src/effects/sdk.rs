//! The bottom layer: [`Ec2Api`] over `aws-sdk-ec2`.
//!
//! Invariant: every SDK error becomes an [`Ec2Failure`] here, its code
//! parsed once and classed by [`AwsErrorCode::class`]; nothing above sees
//! an SDK type.

use std::collections::{HashMap, HashSet};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;
use aws_sdk_ec2::operation::describe_instance_status::DescribeInstanceStatusOutput;
use aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput;
use aws_sdk_ec2::operation::describe_spot_instance_requests::DescribeSpotInstanceRequestsOutput;
use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    Instance, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, InstanceStatusSummary, InstanceType,
    KeyFormat, KeyType, LocationType, MarketType, ResourceType, SpotInstanceType,
    SpotMarketOptions, SummaryStatus, Tag, TagSpecification, VolumeType,
};
use base64::Engine as _;
use zeroize::Zeroizing;

use super::keys::PrivateKeyPem;

use super::CallBudget;
use super::api::{
    Ec2Api, Ec2Failure, Ec2Result, InstanceHealth, InstanceState, InstanceView, LaunchSpec,
    LaunchedView, SpotRequestView, SubnetInfo, malformed,
};
use super::rate_limit::RateLimits;
use crate::error_code::{AwsErrorCode, ErrorClass};
use crate::machine::{CheckState, ImageChoice, MicroUsd, SpotRequestStatus, StatusReport};
use crate::request::{AmiSelector, Arch, KeyAlgorithm, SESSION_TAG};
use crate::telemetry::{self, CallResult};

/// aws-sdk-ec2, one client and one set of rate-limit buckets shared by
/// every session of a process (clones share both).
///
/// Invariant: the SDK never retries on its own. Every try of every call is
/// sent by [`SdkEc2::send`], after its bucket gave it a token, so retries
/// cannot take tokens the buckets promised to other calls.
#[derive(Clone)]
pub struct SdkEc2 {
    client: Client,
    limits: Arc<RateLimits>,
    budget: CallBudget,
}

impl SdkEc2 {
    /// DescribeInstanceStatus itself.
    async fn instance_statuses_of(
        &self,
        ids: &[String],
    ) -> Ec2Result<HashMap<String, InstanceHealth>> {
        let mut found = HashMap::new();
        let page = |token| {
            self.client
                .describe_instance_status()
                .set_instance_ids(Some(ids.to_vec()))
                .include_all_instances(true)
                .set_next_token(token)
                .send()
        };
        let next_token = DescribeInstanceStatusOutput::next_token;
        self.each_page("DescribeInstanceStatus", page, next_token, |page| {
            for status in page.instance_statuses() {
                if let Some(id) = status.instance_id() {
                    let report = StatusReport {
                        system: check_state(status.system_status()),
                        instance: check_state(status.instance_status()),
                    };
                    let state = state_of(status.instance_state().and_then(|s| s.name()));
                    found.insert(id.to_string(), InstanceHealth { report, state });
                }
            }
        })
        .await?;
        Ok(found)
    }

    /// Over `client`, within EC2's default account buckets and
    /// [`CallBudget::STANDARD`]: the client's own retry and timeout
    /// settings are replaced (no SDK retries; the budget's timeouts).
    pub fn new(client: Client) -> SdkEc2 {
        SdkEc2::with_rate_limits(client, RateLimits::ec2_defaults())
    }

    /// Over `client`, within `limits` (an account with raised limits, or none).
    pub fn with_rate_limits(client: Client, limits: RateLimits) -> SdkEc2 {
        SdkEc2 {
            client,
            limits: Arc::new(limits),
            budget: CallBudget::STANDARD,
        }
        .with_budget(CallBudget::STANDARD)
    }

    /// Each call kept to `budget`: its tries, their timeouts, the backoff.
    #[must_use]
    pub fn with_budget(self, budget: CallBudget) -> SdkEc2 {
        let config = self
            .client
            .config()
            .to_builder()
            .retry_config(RetryConfig::disabled())
            .timeout_config(budget.try_timeout_config())
            .build();
        SdkEc2 {
            client: Client::from_conf(config),
            budget,
            ..self
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn rate_limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Sends the call `one_try` makes, retrying a transient failure
    /// (throttling, a 5xx other than a capacity error, a timeout, a dropped
    /// connection: [`ErrorClass::Transient`]) within the
    /// budget. Each try first waits for its bucket's token; the time spent
    /// waiting is not the budget's, the time spent sending and backing off is.
    async fn send<T, E, F>(&self, action: &'static str, one_try: impl Fn() -> F) -> Ec2Result<T>
    where
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        T: RequestId,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let budget = self.budget;
        // A try with less time than this left would mostly be thrown away.
        let least = budget.attempt.min(budget.operation / 10);
        let mut spent = Duration::ZERO;
        let mut tries = 0;
        // Whether a try may have reached EC2 without its answer reaching us.
        let mut answer_lost = false;
        loop {
            self.limits.wait_turn(action).await;
            tries += 1;
            let started = tokio::time::Instant::now();
            let left = budget.operation.saturating_sub(spent);
            let answer = match tokio::time::timeout(left, one_try()).await {
                Ok(answer) => settle(action, started.into_std(), answer),
                Err(_) => Err(out_of_budget(action, started.elapsed(), budget, tries)),
            };
            spent += started.elapsed();
            let answer = answer.map_err(|mut failure| {
                failure.answer_lost_before = answer_lost;
                answer_lost |= failure.may_have_acted();
                failure
            });
            match answer {
                Err(failure)
                    if failure.class == ErrorClass::Transient && tries < budget.attempts =>
                {
                    let backoff = budget.backoff(tries);
                    if spent + backoff + least > budget.operation {
                        return Err(failure);
                    }
                    tokio::time::sleep(backoff).await;
                    spent += backoff;
                }
                answer => return answer,
            }
        }
    }

    /// Every page of a paged call, in order, each page a call of its own
    /// (a token, retries); `page` makes the call for a page token.
    async fn each_page<P, E, F>(
        &self,
        action: &'static str,
        page: impl Fn(Option<String>) -> F,
        next_token: impl Fn(&P) -> Option<&str>,
        mut take: impl FnMut(P),
    ) -> Ec2Result<()>
    where
        F: Future<Output = Result<P, SdkError<E, HttpResponse>>>,
        P: RequestId,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut token: Option<String> = None;
        let mut seen = HashSet::new();
        loop {
            let out = self.send(action, || page(token.clone())).await?;
            let next = next_token(&out)
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            take(out);
            match next {
                None => return Ok(()),
                // Garbage that would page forever.
                Some(next) if !seen.insert(next.clone()) => {
                    return Err(malformed(action, "answered a page token it gave before"));
                }
                Some(next) => token = Some(next),
            }
        }
    }

    /// DescribeInstances with `filters`, every page; `visit` sees each
    /// instance of each reservation.
    async fn each_instance(
        &self,
        filters: Vec<Filter>,
        mut visit: impl FnMut(&Instance),
    ) -> Ec2Result<()> {
        let page = |token| {
            self.client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .set_next_token(token)
                .send()
        };
        let next_token = DescribeInstancesOutput::next_token;
        self.each_page("DescribeInstances", page, next_token, |page| {
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                visit(instance);
            }
        })
        .await
    }
}

/// A try the budget's whole-call limit cut short (the SDK's own per-try
/// timeout ends the others).
fn out_of_budget(
    action: &'static str,
    elapsed: Duration,
    budget: CallBudget,
    tries: u32,
) -> Ec2Failure {
    telemetry::ec2_call(action, elapsed, None, CallResult::NoCode);
    Ec2Failure {
        answer_lost_before: false,
        action,
        code: None,
        class: ErrorClass::Transient,
        message: format!(
            "no answer within the call's budget of {:?} ({tries} tries)",
            budget.operation
        ),
    }
}

/// Sending a call the measured way: timed, logged with its request id and
/// error code, counted (see [`telemetry`]), and its SDK error made an
/// [`Ec2Failure`].
pub(super) trait Measured<T, E>:
    Future<Output = Result<T, SdkError<E, HttpResponse>>> + Sized
{
    async fn measured(self, action: &'static str) -> Ec2Result<T>
    where
        T: RequestId,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let started = Instant::now();
        let answer = self.await;
        settle(action, started, answer)
    }
}

impl<T, E, F> Measured<T, E> for F where F: Future<Output = Result<T, SdkError<E, HttpResponse>>> {}

/// Logs and counts an answer that took since `started`.
fn settle<T, E>(
    action: &'static str,
    started: Instant,
    answer: Result<T, SdkError<E, HttpResponse>>,
) -> Ec2Result<T>
where
    T: RequestId,
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let elapsed = started.elapsed();
    match answer {
        Ok(out) => {
            telemetry::ec2_call(action, elapsed, out.request_id(), CallResult::Ok);
            Ok(out)
        }
        Err(e) => {
            let request_id = e.meta().request_id().map(str::to_string);
            let failure = failure(action, e);
            let result = failure
                .code
                .as_ref()
                .map_or(CallResult::NoCode, CallResult::Code);
            telemetry::ec2_call(action, elapsed, request_id.as_deref(), result);
            Err(failure)
        }
    }
}

/// An error and its causes as one readable line ("dispatch failure: io
/// error: …: Connection refused"), without the SDK's Debug dump, which
/// says the same again in type names.
fn causes(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        // Wrappers often repeat their source's text: say each thing once.
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    printable(&parts.join(": "))
}

fn failure<E>(action: &'static str, err: SdkError<E, HttpResponse>) -> Ec2Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let message = printable(err.message().unwrap_or_default());
            // The code is server text too: a foreign endpoint's is shown as it came.
            match err.code().map(|code| AwsErrorCode::parse(&printable(code))) {
                Some(code) => Ec2Failure {
                    answer_lost_before: false,
                    action,
                    class: code.class(status),
                    code: Some(code),
                    message,
                },
                None => not_ec2s_answer(action, status, &message),
            }
        }
        // A request the SDK could not even build will not build next time.
        SdkError::ConstructionFailure(_) => Ec2Failure {
            answer_lost_before: false,
            action,
            code: None,
            class: ErrorClass::Rejected,
            message: causes(&err),
        },
        // Neither sent nor timed out nor cut off (no credentials, no
        // endpoint): as the SDK's classifier, not worth another try.
        SdkError::DispatchFailure(dispatch)
            if !(dispatch.is_io() || dispatch.is_timeout() || dispatch.as_other().is_some()) =>
        {
            Ec2Failure {
                answer_lost_before: false,
                action,
                code: None,
                class: ErrorClass::Rejected,
                message: causes(&err),
            }
        }
        // Timeouts, dropped connections, unparsable answers: try again later.
        other => Ec2Failure {
            answer_lost_before: false,
            action,
            code: None,
            class: ErrorClass::Transient,
            message: match other {
                SdkError::DispatchFailure(_) => format!(
                    "could not reach EC2 ({}); check the network, the EC2 endpoint and any proxy",
                    causes(other)
                ),
                SdkError::ResponseError(_) => format!(
                    "the answer could not be read ({}); if this repeats, check the EC2 endpoint \
                     and any proxy on the way",
                    causes(other)
                ),
                _ => causes(other),
            },
        },
    }
}

/// An answer the SDK could not read as EC2's: a proxy's or captive
/// portal's page, a truncated or foreign body, an error without a code.
/// Only a 4xx is a refusal (but 408 and 429, "later", are not); anything
/// else may pass (the call is retried), but if it keeps coming the
/// endpoint is the likely cause.
fn not_ec2s_answer(action: &'static str, status: u16, message: &str) -> Ec2Failure {
    let what = if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    };
    Ec2Failure {
        answer_lost_before: false,
        action,
        code: None,
        class: if (400..500).contains(&status) && status != 408 && status != 429 {
            ErrorClass::Rejected
        } else {
            ErrorClass::Transient
        },
        message: format!(
            "HTTP {status} with an answer that is not EC2's{what}; if this repeats, check the \
             EC2 endpoint (AWS_ENDPOINT_URL_EC2, the profile's endpoint_url) and any proxy on \
             the way"
        ),
    }
}

/// Server text as one safe line: control characters (line breaks,
/// terminal escapes) and bidirectional controls written out, so an answer
/// cannot forge progress lines, drive the terminal, or show text in an
/// order other than it holds.
fn printable(text: &str) -> String {
    let mut line = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            line.extend(c.escape_debug());
        } else if is_bidi_control(c) {
            line.extend(c.escape_unicode());
        } else {
            line.push(c);
        }
    }
    line
}

/// Unicode's bidirectional marks, embeddings, overrides and isolates: not
/// control characters to `char::is_control`, yet they reorder the rest of
/// a terminal line ("Trojan Source", CVE-2021-42574).
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

fn tags_of(tags: &[(String, String)]) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn tag_spec(kind: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags_of(tags)))
        .build()
}

/// A dry run that would have succeeded answers `DryRunOperation`.
fn dry_run_answer(answer: Ec2Result<()>) -> Ec2Result<()> {
    match answer {
        Err(failure) if failure.is(&AwsErrorCode::DryRunOperation) => Ok(()),
        Ok(()) => Err(malformed("DryRun", "a dry run answered as if it ran")),
        Err(failure) => Err(failure),
    }
}

fn subnet_info(subnet: &aws_sdk_ec2::types::Subnet) -> SubnetInfo {
    SubnetInfo {
        id: subnet.subnet_id().unwrap_or_default().to_string(),
        zone: subnet.availability_zone().unwrap_or_default().to_string(),
        zone_id: subnet
            .availability_zone_id()
            .unwrap_or_default()
            .to_string(),
        vpc: subnet.vpc_id().unwrap_or_default().to_string(),
    }
}

fn state_of(name: Option<&InstanceStateName>) -> InstanceState {
    match name {
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::Pending) | None => InstanceState::Pending,
        Some(InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        Some(other) => InstanceState::Other(other.as_str().to_string()),
    }
}

fn view_of(instance: &Instance) -> InstanceView {
    InstanceView {
        state: state_of(instance.state().and_then(|s| s.name())),
        public_ip: instance.public_ip_address().map(str::to_string),
        private_ip: instance.private_ip_address().map(str::to_string),
    }
}

fn check_state(summary: Option<&InstanceStatusSummary>) -> CheckState {
    match summary.and_then(|s| s.status()) {
        Some(SummaryStatus::Ok) => CheckState::Ok,
        Some(SummaryStatus::Initializing) => CheckState::Initializing,
        Some(SummaryStatus::Impaired) => CheckState::Impaired,
        Some(SummaryStatus::NotApplicable) => CheckState::NotApplicable,
        None => CheckState::NotReported,
        // `insufficient-data`, and any state this SDK does not know yet.
        Some(_) => CheckState::InsufficientData,
    }
}

impl Ec2Api for SdkEc2 {
    async fn find_image(&self, ami: &AmiSelector, arch: Arch) -> Ec2Result<Option<ImageChoice>> {
        let call = match ami {
            AmiSelector::Id(id) => self.client.describe_images().image_ids(id),
            AmiSelector::Alias(alias) => {
                let (owner, pattern) = alias.image_filter(arch);
                self.client
                    .describe_images()
                    .owners(owner)
                    .filters(Filter::builder().name("name").values(pattern).build())
                    .filters(Filter::builder().name("state").values("available").build())
            }
        };
        let out = self.send("DescribeImages", || call.clone().send()).await?;
        // The newest image wins for an alias; ISO 8601 dates sort as text.
        let newest = out
            .images()
            .iter()
            .filter(|i| i.image_id().is_some())
            .max_by(|a, b| {
                a.creation_date()
                    .unwrap_or_default()
                    .cmp(b.creation_date().unwrap_or_default())
            });
        Ok(newest.map(|image| ImageChoice {
            ami_id: image.image_id().unwrap_or_default().to_string(),
            root_device_name: image.root_device_name().map(str::to_string),
            platform: image.platform_details().map(str::to_string),
        }))
    }

    fn region(&self) -> String {
        self.client
            .config()
            .region()
            .map_or_else(|| "(no region set)".to_string(), |r| r.to_string())
    }

    async fn describe_subnets(&self, ids: &[String]) -> Ec2Result<Vec<SubnetInfo>> {
        let out = self
            .send("DescribeSubnets", || {
                self.client
                    .describe_subnets()
                    .set_subnet_ids(Some(ids.to_vec()))
                    .send()
            })
            .await?;
        Ok(out.subnets().iter().map(subnet_info).collect())
    }

    async fn some_subnets(&self, limit: usize) -> Ec2Result<Vec<SubnetInfo>> {
        let out = self
            .send("DescribeSubnets", || self.client.describe_subnets().send())
            .await?;
        Ok(out.subnets().iter().take(limit).map(subnet_info).collect())
    }

    async fn some_security_groups(
        &self,
        vpc: Option<&str>,
        limit: usize,
    ) -> Ec2Result<Vec<String>> {
        let mut call = self.client.describe_security_groups();
        if let Some(vpc) = vpc {
            call = call.filters(Filter::builder().name("vpc-id").values(vpc).build());
        }
        let out = self
            .send("DescribeSecurityGroups", || call.clone().send())
            .await?;
        Ok(out
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .take(limit)
            .map(str::to_string)
            .collect())
    }

    async fn check_security_groups(&self, ids: &[String]) -> Ec2Result<()> {
        self.send("DescribeSecurityGroups", || {
            self.client
                .describe_security_groups()
                .set_group_ids(Some(ids.to_vec()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn instance_type_zones(
        &self,
        instance_type: &str,
        zones: &[String],
    ) -> Ec2Result<Vec<String>> {
        let mut offered = Vec::new();
        self.each_page(
            "DescribeInstanceTypeOfferings",
            |token| {
                self.client
                    .describe_instance_type_offerings()
                    .location_type(LocationType::AvailabilityZone)
                    .filters(
                        Filter::builder()
                            .name("instance-type")
                            .values(instance_type)
                            .build(),
                    )
                    .filters(
                        Filter::builder()
                            .name("location")
                            .set_values(Some(zones.to_vec()))
                            .build(),
                    )
                    .set_next_token(token)
                    .send()
            },
            |page| page.next_token(),
            |page| {
                let zones = page
                    .instance_type_offerings()
                    .iter()
                    .filter_map(|offering| offering.location());
                offered.extend(zones.map(str::to_string));
            },
        )
        .await?;
        Ok(offered)
    }

    async fn key_pair_exists(&self, name: &str) -> Ec2Result<bool> {
        match self
            .send("DescribeKeyPairs", || {
                self.client.describe_key_pairs().key_names(name).send()
            })
            .await
        {
            Ok(out) => Ok(out.key_pairs().iter().any(|k| k.key_name() == Some(name))),
            Err(failure) if failure.class == ErrorClass::NotFound => Ok(false),
            Err(failure) => Err(failure),
        }
    }

    async fn create_key_pair(
        &self,
        name: &str,
        algorithm: KeyAlgorithm,
        tags: &[(String, String)],
    ) -> Ec2Result<PrivateKeyPem> {
        let key_type = match algorithm {
            KeyAlgorithm::Ed25519 => KeyType::Ed25519,
            KeyAlgorithm::Rsa => KeyType::Rsa,
        };
        let out = self
            .send("CreateKeyPair", || {
                self.client
                    .create_key_pair()
                    .key_name(name)
                    .key_type(key_type.clone())
                    .key_format(KeyFormat::Pem)
                    .tag_specifications(tag_spec(ResourceType::KeyPair, tags))
                    .send()
            })
            .await?;
        let material = PrivateKeyPem::new(Zeroizing::new(out.key_material.unwrap_or_default()));
        if material.as_str().is_empty() {
            return Err(malformed("CreateKeyPair", "answered without key material"));
        }
        Ok(material)
    }

    async fn import_key_pair(
        &self,
        name: &str,
        public_key: &str,
        tags: &[(String, String)],
    ) -> Ec2Result<()> {
        self.send("ImportKeyPair", || {
            self.client
                .import_key_pair()
                .key_name(name)
                .public_key_material(Blob::new(public_key.as_bytes().to_vec()))
                .tag_specifications(tag_spec(ResourceType::KeyPair, tags))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn dry_run_key_pair(
        &self,
        name: &str,
        public_key: Option<&str>,
        tags: &[(String, String)],
    ) -> Ec2Result<()> {
        let spec = tag_spec(ResourceType::KeyPair, tags);
        let answer = match public_key {
            Some(public_key) => self
                .send("ImportKeyPair", || {
                    self.client
                        .import_key_pair()
                        .dry_run(true)
                        .key_name(name)
                        .public_key_material(Blob::new(public_key.as_bytes().to_vec()))
                        .tag_specifications(spec.clone())
                        .send()
                })
                .await
                .map(|_| ()),
            None => self
                .send("CreateKeyPair", || {
                    self.client
                        .create_key_pair()
                        .dry_run(true)
                        .key_name(name)
                        .tag_specifications(spec.clone())
                        .send()
                })
                .await
                .map(|_| ()),
        };
        dry_run_answer(answer)
    }

    async fn delete_key_pair(&self, name: &str) -> Ec2Result<()> {
        self.send("DeleteKeyPair", || {
            self.client.delete_key_pair().key_name(name).send()
        })
        .await
        .map(|_| ())
    }

    async fn run_instance(&self, spec: LaunchSpec<'_>) -> Ec2Result<LaunchedView> {
        let request = spec.request;
        let mut call = self
            .client
            .run_instances()
            .client_token(spec.client_token)
            .dry_run(spec.dry_run)
            .image_id(&spec.image.ami_id)
            .instance_type(InstanceType::from(request.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .subnet_id(spec.subnet_id)
            .set_security_group_ids(Some(request.security_group_ids.clone()))
            .set_key_name(spec.key_name.map(str::to_string))
            .tag_specifications(tag_spec(ResourceType::Instance, spec.tags))
            .tag_specifications(tag_spec(ResourceType::Volume, spec.tags));
        if let Some(device) = &spec.image.root_device_name {
            call = call.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(i32::try_from(request.ebs_size_gb).unwrap_or(i32::MAX))
                            .volume_type(VolumeType::Gp3)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        if let Some(data) = &request.user_data {
            call = call.user_data(base64::engine::general_purpose::STANDARD.encode(data));
        }
        if request.enforce_imds_v2 {
            call = call.metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            );
        }
        if let Some(arn) = &request.iam_instance_profile_arn {
            call = call
                .iam_instance_profile(IamInstanceProfileSpecification::builder().arn(arn).build());
        }
        if spec.spot {
            let mut spot =
                SpotMarketOptions::builder().spot_instance_type(SpotInstanceType::OneTime);
            if let Some(price) = request.spot.as_ref().and_then(|s| s.max_price.as_ref()) {
                spot = spot.max_price(price);
            }
            call = call
                .tag_specifications(tag_spec(ResourceType::SpotInstancesRequest, spec.tags))
                .instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(spot.build())
                        .build(),
                );
        }
        if spec.dry_run {
            let answer = self
                .send("RunInstances", || call.clone().send())
                .await
                .map(|_| ());
            return dry_run_answer(answer).map(|()| LaunchedView {
                instance_id: String::new(),
                spot_request_id: None,
            });
        }
        let out = self.send("RunInstances", || call.clone().send()).await?;
        let instance = out.instances().first();
        let instance_id = instance
            .and_then(|i| i.instance_id())
            .map(str::to_string)
            .ok_or_else(|| malformed("RunInstances", "answered without an instance id"))?;
        Ok(LaunchedView {
            instance_id,
            spot_request_id: instance
                .and_then(|i| i.spot_instance_request_id())
                .map(str::to_string),
        })
    }

    async fn spot_placement_scores(&self, instance_type: &str) -> Ec2Result<HashMap<String, u8>> {
        let out = self
            .send("GetSpotPlacementScores", || {
                self.client
                    .get_spot_placement_scores()
                    .instance_types(instance_type)
                    .target_capacity(1)
                    .single_availability_zone(true)
                    .region_names(self.region())
                    .send()
            })
            .await?;
        Ok(out
            .spot_placement_scores()
            .iter()
            .filter_map(|s| {
                let zone = s.availability_zone_id()?.to_string();
                let score = u8::try_from(s.score()?.clamp(0, 10)).ok()?;
                Some((zone, score))
            })
            .collect())
    }

    async fn spot_prices(
        &self,
        instance_type: &str,
        product_description: &str,
        zones: &[String],
    ) -> Ec2Result<HashMap<String, MicroUsd>> {
        // Prices change at most every few minutes; three hours is "recent".
        let since = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 3600);
        let out = self
            .send("DescribeSpotPriceHistory", || {
                self.client
                    .describe_spot_price_history()
                    .instance_types(InstanceType::from(instance_type))
                    .product_descriptions(product_description)
                    .start_time(aws_sdk_ec2::primitives::DateTime::from(since))
                    .filters(
                        Filter::builder()
                            .name("availability-zone")
                            .set_values(Some(zones.to_vec()))
                            .build(),
                    )
                    .send()
            })
            .await?;
        // The newest entry per zone; the answer is not promised to be sorted.
        let mut latest: HashMap<String, (aws_sdk_ec2::primitives::DateTime, MicroUsd)> =
            HashMap::new();
        for entry in out.spot_price_history() {
            let (Some(zone), Some(price), Some(at)) = (
                entry.availability_zone(),
                entry.spot_price().and_then(MicroUsd::parse),
                entry.timestamp(),
            ) else {
                continue;
            };
            let newer = latest
                .get(zone)
                .is_none_or(|(seen, _)| at.secs() > seen.secs());
            if newer {
                latest.insert(zone.to_string(), (*at, price));
            }
        }
        Ok(latest.into_iter().map(|(z, (_, p))| (z, p)).collect())
    }

    /// By filter, like DescribeInstances: with `SpotInstanceRequestIds`
    /// one unknown id would fail the whole call.
    async fn spot_requests(&self, ids: &[String]) -> Ec2Result<HashMap<String, SpotRequestView>> {
        let filter = Filter::builder()
            .name("spot-instance-request-id")
            .set_values(Some(ids.to_vec()))
            .build();
        let mut found = HashMap::new();
        let page = |token| {
            self.client
                .describe_spot_instance_requests()
                .filters(filter.clone())
                .set_next_token(token)
                .send()
        };
        let next_token = DescribeSpotInstanceRequestsOutput::next_token;
        self.each_page("DescribeSpotInstanceRequests", page, next_token, |page| {
            for r in page.spot_instance_requests() {
                let Some(id) = r.spot_instance_request_id() else {
                    continue;
                };
                let view = SpotRequestView {
                    status: SpotRequestStatus {
                        request_id: id.to_string(),
                        state: r.state().map(|s| s.as_str().to_string()),
                        status_code: r.status().and_then(|s| s.code()).map(str::to_string),
                        price: r.spot_price().map(str::to_string),
                    },
                    instance_id: r.instance_id().map(str::to_string),
                };
                found.insert(id.to_string(), view);
            }
        })
        .await?;
        Ok(found)
    }

    async fn cancel_spot_request(&self, request_id: &str) -> Ec2Result<Option<String>> {
        let out = self
            .send("CancelSpotInstanceRequests", || {
                self.client
                    .cancel_spot_instance_requests()
                    .spot_instance_request_ids(request_id)
                    .send()
            })
            .await?;
        Ok(out
            .cancelled_spot_instance_requests()
            .first()
            .and_then(|r| r.state())
            .map(|s| s.as_str().to_string()))
    }

    /// One DescribeInstances (paged) with an `instance-id` filter, which,
    /// unlike `InstanceIds`, does not fail the whole call when one id is not
    /// visible yet: that id is simply absent.
    async fn describe_instances(&self, ids: &[String]) -> Ec2Result<HashMap<String, InstanceView>> {
        let filter = Filter::builder()
            .name("instance-id")
            .set_values(Some(ids.to_vec()))
            .build();
        let mut found = HashMap::new();
        self.each_instance(vec![filter], |instance| {
            if let Some(id) = instance.instance_id() {
                found.insert(id.to_string(), view_of(instance));
            }
        })
        .await?;
        Ok(found)
    }

    /// EC2 refuses the whole call for one id it does not know (the ids
    /// have no filter form here, unlike DescribeInstances), so the ids its
    /// error names are left out and the rest asked again: one instance not
    /// visible yet must not blind a whole batch.
    async fn describe_instance_statuses(
        &self,
        ids: &[String],
    ) -> Ec2Result<HashMap<String, InstanceHealth>> {
        let mut asked = ids.to_vec();
        loop {
            match self.instance_statuses_of(&asked).await {
                Err(failure) if failure.class == ErrorClass::NotFound && asked.len() > 1 => {
                    let named: HashSet<&str> = failure
                        .message
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                        .collect();
                    let before = asked.len();
                    asked.retain(|id| !named.contains(id.as_str()));
                    if asked.len() == before {
                        return Err(failure);
                    }
                }
                answer => return answer,
            }
        }
    }

    /// One DescribeInstances (paged) whose tag filter names every session:
    /// EC2 takes up to 200 values in a filter, and the batching layer sends
    /// no more.
    async fn live_instances_of_sessions(
        &self,
        session_ids: &[String],
    ) -> Ec2Result<HashMap<String, Vec<String>>> {
        let by_session = Filter::builder()
            .name(format!("tag:{SESSION_TAG}"))
            .set_values(Some(session_ids.to_vec()))
            .build();
        let live = Filter::builder()
            .name("instance-state-name")
            .values("pending")
            .values("running")
            .values("stopping")
            .values("stopped")
            .build();
        let mut found: HashMap<String, Vec<String>> = HashMap::new();
        self.each_instance(vec![by_session, live], |instance| {
            let session = instance
                .tags()
                .iter()
                .find(|t| t.key() == Some(SESSION_TAG))
                .and_then(|t| t.value());
            if let (Some(session), Some(id)) = (session, instance.instance_id()) {
                found
                    .entry(session.to_string())
                    .or_default()
                    .push(id.to_string());
            }
        })
        .await?;
        Ok(found)
    }

    async fn terminate_instance(&self, id: &str) -> Ec2Result<()> {
        self.send("TerminateInstances", || {
            self.client.terminate_instances().instance_ids(id).send()
        })
        .await
        .map(|_| ())
    }

    async fn console_output(&self, id: &str, latest: bool) -> Ec2Result<Option<Vec<u8>>> {
        let out = self
            .send("GetConsoleOutput", || {
                self.client
                    .get_console_output()
                    .instance_id(id)
                    .latest(latest)
                    .send()
            })
            .await?;
        // Garbage is not "no host keys yet": said as such, and asked again.
        out.output()
            .map(|text| base64::engine::general_purpose::STANDARD.decode(text.trim()))
            .transpose()
            .map_err(|e| Ec2Failure {
                answer_lost_before: false,
                action: "GetConsoleOutput",
                code: None,
                class: ErrorClass::Transient,
                message: format!("the console output EC2 answered is not base64 ({e})"),
            })
    }
}
