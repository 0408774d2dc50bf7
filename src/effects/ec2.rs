//! EC2 effects through `aws-sdk-ec2`.
//!
//! Invariant: every call maps its result to a machine [`Input`]; nothing
//! here decides what happens next. Re-running a call is safe: RunInstances
//! carries the recorded `ClientToken`, deletes and terminates treat NotFound
//! as done, and a freshly launched instance that is not yet visible is
//! "not visible", never "gone".

use std::collections::HashMap;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    Instance, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, InstanceType, MarketType, ResourceType,
    SpotInstanceType, SpotMarketOptions, Tag, TagSpecification, VolumeType,
};
use base64::Engine as _;

use super::console;
use crate::machine::{ClientToken, ImageChoice, Input, SessionContext, Timestamp};
use crate::request::{AmiSelector, ProvisionRequest};

/// Capacity errors: another subnet, another capacity type or later may work.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientFreeAddressesInSubnet",
    "InsufficientCapacity",
    "VcpuLimitExceeded",
    "InstanceLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    // The instance this attempt's token launched is gone: a new attempt
    // (new token) is the only way on.
    "IdempotentInstanceTerminated",
];

/// Errors that pass: throttling and server-side trouble.
const TRANSIENT_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
];

/// How an SDK error should steer the machine.
enum Failure {
    Transient(String),
    NotFound(String),
    Capacity { code: String, message: String },
    Rejected { code: String, message: String },
}

fn classify<E>(err: &SdkError<E, HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = err.code().unwrap_or_default().to_string();
    let message = err.message().unwrap_or_default().to_string();
    match err {
        SdkError::ServiceError(_) if code.ends_with(".NotFound") => {
            Failure::NotFound(format!("{code}: {message}"))
        }
        SdkError::ServiceError(_) if CAPACITY_CODES.contains(&code.as_str()) => {
            Failure::Capacity { code, message }
        }
        SdkError::ServiceError(_) if TRANSIENT_CODES.contains(&code.as_str()) => {
            Failure::Transient(format!("{code}: {message}"))
        }
        SdkError::ServiceError(service) if service.raw().status().is_server_error() => {
            Failure::Transient(format!(
                "HTTP {} {code} {message}",
                service.raw().status().as_u16()
            ))
        }
        SdkError::ServiceError(_) => Failure::Rejected { code, message },
        // Timeouts, dropped connections, unparsable answers: try again later.
        other => Failure::Transient(format!(
            "{}",
            aws_sdk_ec2::error::DisplayErrorContext(other)
        )),
    }
}

/// Whether EC2 answered with this error code.
pub fn has_code<E>(err: &SdkError<E, HttpResponse>, code: &str) -> bool
where
    E: ProvideErrorMetadata,
{
    err.code() == Some(code)
}

impl Failure {
    /// The input for a call whose NotFound is not expected.
    fn into_input(self) -> Input {
        match self {
            Failure::Transient(message) => Input::TransientFailure { message },
            Failure::NotFound(message) => Input::Rejected {
                code: "NotFound".into(),
                message,
            },
            Failure::Capacity { code, message } | Failure::Rejected { code, message } => {
                Input::Rejected { code, message }
            }
        }
    }
}

fn rejected(code: &str, message: impl Into<String>) -> Input {
    Input::Rejected {
        code: code.into(),
        message: message.into(),
    }
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

/// `acode=true`, the session id, the creation time and the caller's tags.
pub fn session_tags(ctx: &SessionContext, created: Timestamp) -> Vec<Tag> {
    let mut tags = vec![
        tag("acode", "true"),
        tag("acode-session-id", &ctx.session_id),
        tag("acode-timestamp", &created.0.to_string()),
    ];
    tags.extend(ctx.request.tags.iter().map(|(k, v)| tag(k, v)));
    tags
}

fn tag_spec(kind: ResourceType, tags: &[Tag]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags.to_vec()))
        .build()
}

pub async fn validate(ec2: &Client, request: &ProvisionRequest) -> Input {
    let image = match resolve_image(ec2, &request.ami).await {
        Ok(image) => image,
        Err(input) => return input,
    };
    if let Err(e) = ec2
        .describe_subnets()
        .set_subnet_ids(Some(request.subnet_ids.clone()))
        .send()
        .await
    {
        return match classify(&e) {
            Failure::NotFound(message) => rejected("InvalidSubnetID.NotFound", message),
            other => other.into_input(),
        };
    }
    if !request.security_group_ids.is_empty()
        && let Err(e) = ec2
            .describe_security_groups()
            .set_group_ids(Some(request.security_group_ids.clone()))
            .send()
            .await
    {
        return match classify(&e) {
            Failure::NotFound(message) => rejected("InvalidGroup.NotFound", message),
            other => other.into_input(),
        };
    }
    Input::Validated { image }
}

async fn resolve_image(ec2: &Client, ami: &AmiSelector) -> Result<ImageChoice, Input> {
    let call = match ami {
        AmiSelector::Id(id) => ec2.describe_images().image_ids(id),
        AmiSelector::Alias(alias) => {
            let (owner, pattern) = alias.image_filter();
            ec2.describe_images()
                .owners(owner)
                .filters(Filter::builder().name("name").values(pattern).build())
                .filters(Filter::builder().name("state").values("available").build())
        }
    };
    let images = match call.send().await {
        Ok(out) => out.images.unwrap_or_default(),
        Err(e) => {
            return Err(match classify(&e) {
                Failure::NotFound(message) => rejected("InvalidAMIID.NotFound", message),
                other => other.into_input(),
            });
        }
    };
    // The newest image wins for an alias; ISO 8601 dates sort as text.
    let newest = images
        .iter()
        .filter(|i| i.image_id().is_some())
        .max_by(|a, b| {
            a.creation_date()
                .unwrap_or_default()
                .cmp(b.creation_date().unwrap_or_default())
        });
    match newest {
        Some(image) => Ok(ImageChoice {
            ami_id: image.image_id().unwrap_or_default().to_string(),
            root_device_name: image.root_device_name().map(str::to_string),
        }),
        None => Err(rejected(
            "InvalidAMIID.NotFound",
            match ami {
                AmiSelector::Id(id) => format!("image {id} does not exist in this region"),
                AmiSelector::Alias(alias) => {
                    format!("no image found for OS alias {}", alias.name())
                }
            },
        )),
    }
}

pub struct Launch<'a> {
    pub client_token: &'a ClientToken,
    pub spot: bool,
    pub subnet_id: &'a str,
    pub image: &'a ImageChoice,
    pub key_name: &'a str,
}

pub async fn run_instance(
    ec2: &Client,
    ctx: &SessionContext,
    created: Timestamp,
    launch: Launch<'_>,
) -> Input {
    let request = &ctx.request;
    let tags = session_tags(ctx, created);
    let mut call = ec2
        .run_instances()
        .client_token(launch.client_token.as_str())
        .image_id(&launch.image.ami_id)
        .instance_type(InstanceType::from(request.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .subnet_id(launch.subnet_id)
        .set_security_group_ids(
            (!request.security_group_ids.is_empty()).then(|| request.security_group_ids.clone()),
        )
        .key_name(launch.key_name)
        .tag_specifications(tag_spec(ResourceType::Instance, &tags))
        .tag_specifications(tag_spec(ResourceType::Volume, &tags));
    if let Some(device) = &launch.image.root_device_name {
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
        call =
            call.iam_instance_profile(IamInstanceProfileSpecification::builder().arn(arn).build());
    }
    if launch.spot {
        let mut spot = SpotMarketOptions::builder().spot_instance_type(SpotInstanceType::OneTime);
        if let Some(price) = request.spot.as_ref().and_then(|s| s.max_price.as_ref()) {
            spot = spot.max_price(price);
        }
        call = call.tag_specifications(tag_spec(ResourceType::SpotInstancesRequest, &tags));
        call = call.instance_market_options(
            InstanceMarketOptionsRequest::builder()
                .market_type(MarketType::Spot)
                .spot_options(spot.build())
                .build(),
        );
    }
    match call.send().await {
        Ok(out) => match out.instances().first().and_then(|i| i.instance_id()) {
            Some(id) => Input::Launched {
                instance_id: id.to_string(),
                was_spot: launch.spot,
            },
            None => Input::TransientFailure {
                message: "RunInstances answered without an instance id".into(),
            },
        },
        // The session made (or checked) its key pair moments ago: EC2 being
        // eventually consistent, RunInstances may not see it yet.
        Err(e) if has_code(&e, "InvalidKeyPair.NotFound") => Input::TransientFailure {
            message: format!(
                "{}; the key pair may not be visible yet",
                describe(classify(&e))
            ),
        },
        Err(e) => match classify(&e) {
            Failure::Capacity { code, message } => Input::CapacityUnavailable { code, message },
            other => other.into_input(),
        },
    }
}

/// What EC2 says of each of `ids`, in one DescribeInstances (paged). The
/// `instance-id` filter, unlike `InstanceIds`, does not fail the whole call
/// when one id is not visible yet: that id is simply absent from the map.
/// A failed call gives the one input every id gets.
pub async fn describe_instances(
    ec2: &Client,
    ids: &[String],
) -> Result<HashMap<String, Input>, Input> {
    let filter = Filter::builder()
        .name("instance-id")
        .set_values(Some(ids.to_vec()))
        .build();
    let mut pages = ec2
        .describe_instances()
        .filters(filter)
        .into_paginator()
        .send();
    let mut found = HashMap::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| match classify(&e) {
            Failure::NotFound(_) => Input::InstanceNotVisible,
            other => other.into_input(),
        })?;
        for instance in page.reservations().iter().flat_map(|r| r.instances()) {
            if let Some(id) = instance.instance_id() {
                found.insert(id.to_string(), instance_input(instance));
            }
        }
    }
    Ok(found)
}

fn instance_input(instance: &Instance) -> Input {
    match instance.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Running) => Input::InstanceRunning {
            public_ip: instance.public_ip_address().map(str::to_string),
            private_ip: instance.private_ip_address().map(str::to_string),
        },
        Some(InstanceStateName::Pending) | None => Input::InstancePending,
        Some(other) => Input::InstanceGone {
            state: other.as_str().to_string(),
        },
    }
}

/// The host keys cloud-init printed. `Latest=true` gives live output but
/// only on Nitro types; older (Xen) types refuse it, so a refusal is asked
/// again for the buffered output, which is all they have.
pub async fn read_console_host_keys(ec2: &Client, instance_id: &str) -> Input {
    let output = match console_output(ec2, instance_id, true).await {
        Err(Failure::Rejected { .. }) => console_output(ec2, instance_id, false).await,
        other => other,
    };
    match output {
        Ok(decoded) => match console::host_key_fingerprints(&decoded) {
            Some(fingerprints) => Input::ConsoleHostKeys { fingerprints },
            None => Input::ConsoleNotReady,
        },
        Err(Failure::NotFound(_)) => Input::ConsoleNotReady,
        Err(other) => other.into_input(),
    }
}

async fn console_output(ec2: &Client, instance_id: &str, latest: bool) -> Result<Vec<u8>, Failure> {
    let out = ec2
        .get_console_output()
        .instance_id(instance_id)
        .latest(latest)
        .send()
        .await
        .map_err(|e| classify(&e))?;
    Ok(out
        .output()
        .and_then(|text| {
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .ok()
        })
        .unwrap_or_default())
}

/// How long after its launch an instance EC2 says it does not know may
/// still exist (EC2 is eventually consistent; seconds in practice). Past
/// this, NotFound means long gone: terminated instances stay listed for
/// about an hour, then vanish.
pub const LAUNCH_VISIBILITY_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// How long after a launch whose answer was lost a sweep that finds
/// nothing is tried again before nothing is believed.
pub const SWEEP_SETTLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Terminates the instance, and any other live instance tagged with this
/// session: all of them when the id is unknown (a launch whose answer was
/// lost), and a second line of defence otherwise. Tags are set at creation,
/// so a launched instance always carries them. NotFound for the known
/// instance counts as done only once it is `LAUNCH_VISIBILITY_GRACE` old.
pub async fn terminate(
    ec2: &Client,
    ctx: &SessionContext,
    instance_id: Option<&str>,
    launched_at: Option<Timestamp>,
) -> Input {
    let maybe_not_visible_yet = |id: &str| {
        instance_id == Some(id)
            && launched_at.is_some_and(|at| super::now() < at.plus(LAUNCH_VISIBILITY_GRACE))
    };
    let mut ids: Vec<String> = instance_id.map(str::to_string).into_iter().collect();
    let tagged = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:acode-session-id")
                .values(&ctx.session_id)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build(),
        )
        .send()
        .await;
    match tagged {
        Ok(out) => {
            let others = out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter_map(|i| i.instance_id());
            for id in others {
                if !ids.iter().any(|known| known == id) {
                    ids.push(id.to_string());
                }
            }
        }
        Err(e) => return Failure::Transient(describe(classify(&e))).into_input(),
    }
    if ids.is_empty()
        && let Some(at) = launched_at
        && super::now() < at.plus(SWEEP_SETTLE)
    {
        return Input::TransientFailure {
            message: "no instance tagged with this session yet; one made by the launch whose \
                      answer was lost may not be visible for a few seconds: looking again"
                .into(),
        };
    }
    for id in ids {
        if let Err(e) = ec2.terminate_instances().instance_ids(&id).send().await {
            match classify(&e) {
                Failure::NotFound(message) if maybe_not_visible_yet(&id) => {
                    return Input::TransientFailure {
                        message: format!(
                            "TerminateInstances {id}: {message}; launched moments ago, so EC2 \
                             may not show it yet: trying again"
                        ),
                    };
                }
                Failure::NotFound(_) => {}
                Failure::Transient(message) => return Input::TransientFailure { message },
                // Cleanup must not give up: anything else is retried too.
                Failure::Capacity { code, message } | Failure::Rejected { code, message } => {
                    return Input::TransientFailure {
                        message: format!("TerminateInstances {id}: {code}: {message}"),
                    };
                }
            }
        }
    }
    Input::InstanceTerminated
}

/// Whether a key pair exists; `Err` carries the input for a failed lookup.
pub async fn key_pair_exists(ec2: &Client, key_name: &str) -> Result<bool, Input> {
    match ec2.describe_key_pairs().key_names(key_name).send().await {
        Ok(out) => Ok(out
            .key_pairs()
            .iter()
            .any(|k| k.key_name() == Some(key_name))),
        Err(e) => match classify(&e) {
            Failure::NotFound(_) => Ok(false),
            other => Err(other.into_input()),
        },
    }
}

pub async fn delete_key_pair(ec2: &Client, key_name: &str) -> Result<(), Input> {
    match ec2.delete_key_pair().key_name(key_name).send().await {
        Ok(_) => Ok(()),
        Err(e) => match classify(&e) {
            Failure::NotFound(_) => Ok(()),
            other => Err(Input::TransientFailure {
                message: format!("DeleteKeyPair {key_name}: {}", describe(other)),
            }),
        },
    }
}

fn describe(failure: Failure) -> String {
    match failure {
        Failure::Transient(m) | Failure::NotFound(m) => m,
        Failure::Capacity { code, message } | Failure::Rejected { code, message } => {
            format!("{code}: {message}")
        }
    }
}

/// Tag specification for key pairs this session creates.
pub fn key_pair_tags(ctx: &SessionContext, created: Timestamp) -> TagSpecification {
    tag_spec(ResourceType::KeyPair, &session_tags(ctx, created))
}

/// Maps an SDK error from a key pair call to an input.
pub fn key_call_failure<E>(err: &SdkError<E, HttpResponse>) -> Input
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    classify(err).into_input()
}
