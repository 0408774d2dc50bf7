//! `acode-ec2 validate`: everything provisioning checks before it creates
//! anything, plus EC2's own verdict on the calls it would make (DryRun).
//!
//! Invariant: creates nothing and writes nothing: Describe calls, and
//! CreateKeyPair/ImportKeyPair/RunInstances with `DryRun=true` only.

use super::api::{Ec2Api, Ec2Failure, LaunchSpec};
use super::ec2::{self, session_tags};
use super::{guidance, keys};
use crate::error_code::{ErrorClass, RejectionCode};
use crate::machine::{ImageChoice, Input, SessionContext};
use crate::request::{
    AmiSelector, InvalidRequest, KeyAlgorithm, KeyPairMode, ProvisionRequest, StatusCheckMode,
};

/// Why a request could not be provisioned, found before anything was
/// created; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(transparent)]
    Request(#[from] InvalidRequest),
    #[error("subnetId: missing; name the subnet to launch in")]
    NoSubnet,
    /// A check EC2 answered: the image, subnets or security groups.
    #[error("{code}: {message}")]
    Rejected {
        code: RejectionCode,
        message: String,
    },
    #[error(
        "instanceType: {instance_type} is not offered in the zones of your subnets ({}) in \
         {region}. Check its spelling (`aws ec2 describe-instance-types --instance-types \
         {instance_type} --region {region}`), or pick subnets in zones that offer it (`aws ec2 \
         describe-instance-type-offerings --location-type availability-zone --filters \
         Name=instance-type,Values={instance_type} --region {region}`)",
        .zones.join(", ")
    )]
    InstanceTypeNotOffered {
        instance_type: String,
        region: String,
        zones: Vec<String>,
    },
    /// A check that got no answer (EC2 unreachable or slow).
    #[error("the checks could not finish: {0}")]
    Unfinished(String),
    #[error("{}", guidance::missing_key_pair(.key_name, .region))]
    MissingKeyPair { key_name: String, region: String },
    #[error(
        "cannot read private key {path}: {source}; fix `privateKeyPath` or the file's permissions"
    )]
    PrivateKeyUnreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot generate a {algorithm} key: {source}")]
    KeyGeneration {
        algorithm: &'static str,
        source: ssh_key::Error,
    },
    /// The key files named by `importOwn` are unusable.
    #[error("{0}")]
    OwnKey(String),
    /// EC2 refused a call or its dry run: guidance for a denial, else EC2's words.
    #[error("{}", refusal(.0))]
    Refused(Ec2Failure),
}

/// What a session with this request would launch, line by line; or why it
/// could not, with what to do about it.
pub async fn check(
    api: &impl Ec2Api,
    request: &ProvisionRequest,
) -> Result<Vec<String>, PreflightError> {
    // What the engine would refuse before any call (an empty subnet list).
    request.check()?;
    let Some(subnet_id) = request.subnet_ids.first() else {
        return Err(PreflightError::NoSubnet);
    };
    let ctx = SessionContext {
        session_id: "validate".into(),
        request: request.clone(),
        key_dir: String::new(),
        replaces: None,
    };
    let (image, zones) = match ec2::validate(api, &ctx).await {
        Input::Validated { image, zones, .. } => (image, zones),
        Input::Rejected { code, message } => {
            return Err(PreflightError::Rejected { code, message });
        }
        other => return Err(PreflightError::Unfinished(describe(&other))),
    };
    let mut lines = describe_launch(api, request, &image, &zones);
    lines.extend(instance_type_offered(api, request, &zones).await?);
    let tags = session_tags(&ctx, crate::clock::wall_clock());
    let key_name = ctx.owned_key_name();
    let (key_line, launch_key) = match &request.key_pair {
        KeyPairMode::Existing {
            key_name,
            private_key_path,
        } => {
            match api.key_pair_exists(key_name).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(PreflightError::MissingKeyPair {
                        key_name: key_name.clone(),
                        region: api.region(),
                    });
                }
                Err(failure) => return Err(PreflightError::Refused(failure)),
            }
            std::fs::metadata(private_key_path).map_err(|source| {
                PreflightError::PrivateKeyUnreadable {
                    path: private_key_path.clone(),
                    source,
                }
            })?;
            (
                format!("existing key pair {key_name} ({private_key_path})"),
                Some(key_name.as_str()),
            )
        }
        KeyPairMode::Temporary { algorithm } => {
            dry_run_key(api, &key_name, None, &tags).await?;
            let line = format!(
                "a temporary {} key pair per session, made by EC2 (CreateKeyPair allowed)",
                algorithm.name()
            );
            (line, None)
        }
        KeyPairMode::Import { algorithm } => {
            let public = throwaway_public_key(*algorithm)?;
            dry_run_key(api, &key_name, Some(&public), &tags).await?;
            let line = format!(
                "a {} key pair per session, made here and imported (ImportKeyPair allowed)",
                algorithm.name()
            );
            (line, None)
        }
        KeyPairMode::ImportOwn {
            public_key_path,
            private_key_path,
        } => {
            let public = keys::own_public_key(public_key_path, private_key_path)
                .map_err(|input| PreflightError::OwnKey(describe(&input)))?;
            dry_run_key(api, &key_name, Some(&public), &tags).await?;
            (
                format!("your key {public_key_path}, imported per session (ImportKeyPair allowed)"),
                None,
            )
        }
    };
    lines.push(format!("key pair        {key_line}"));
    let spec = LaunchSpec {
        request,
        client_token: "acode-validate",
        spot: request.spot.is_some(),
        subnet_id,
        image: &image,
        key_name: launch_key,
        tags: &tags,
        dry_run: true,
    };
    api.run_instance(spec)
        .await
        .map_err(PreflightError::Refused)?;
    lines.push("RunInstances    allowed (dry run): EC2 would launch this".into());
    Ok(lines)
}

fn describe_launch(
    api: &impl Ec2Api,
    request: &ProvisionRequest,
    image: &ImageChoice,
    zones: &[String],
) -> Vec<String> {
    let source = match &request.ami {
        AmiSelector::Id(_) => String::new(),
        AmiSelector::Alias(alias) => format!(" (newest {} image)", alias.name()),
    };
    let subnets: Vec<String> = request
        .subnet_ids
        .iter()
        .zip(zones)
        .map(|(id, zone)| format!("{id} ({zone})"))
        .collect();
    let mut lines = vec![
        format!("region          {}", api.region()),
        format!("image           {}{source}", image.ami_id),
        format!("instance type   {}", request.instance_type),
        format!(
            "subnets         {} (tried in this order)",
            subnets.join(", ")
        ),
        format!("security groups {}", request.security_group_ids.join(", ")),
        match &image.root_device_name {
            Some(device) => format!(
                "root volume     {device}: {} GiB gp3, deleted with the instance",
                request.ebs_size_gb
            ),
            // Without a device to name, the launch cannot resize it.
            None => format!(
                "root volume     the image's own: it names no root device, so ebsSizeGb ({} GiB) \
                 cannot apply",
                request.ebs_size_gb
            ),
        },
    ];
    lines.push(match &request.spot {
        Some(spot) => format!(
            "capacity        spot (max price {}, {}), one-time request",
            spot.max_price.as_deref().unwrap_or("the on-demand price"),
            if spot.fallback_to_on_demand {
                "falls back to on-demand"
            } else {
                "no fallback"
            }
        ),
        None => "capacity        on-demand".into(),
    });
    let checks = match request.status_checks {
        StatusCheckMode::Ok => "and EC2 status checks ok",
        StatusCheckMode::NotImpaired => "and EC2 status checks not impaired",
        StatusCheckMode::Skip => "(status checks skipped)",
    };
    lines.push(format!(
        "ready when      SSH login as {} with a verified host key {checks}, within {:?}",
        request.ssh.user, request.timeouts.ssh
    ));
    lines
}

/// Refuses an instance type no subnet's zone offers (a misspelt one is
/// offered nowhere); a line per subnet whose zone lacks it, where
/// launches are refused and go on to the next subnet; a note instead when
/// EC2 does not answer.
async fn instance_type_offered(
    api: &impl Ec2Api,
    request: &ProvisionRequest,
    zones: &[String],
) -> Result<Vec<String>, PreflightError> {
    let mut distinct = zones.to_vec();
    distinct.sort();
    distinct.dedup();
    // Only validate asks this: a policy from before it was added lacks
    // the read, which must not fail a config that provisions fine.
    let offered = match api
        .instance_type_zones(&request.instance_type, &distinct)
        .await
    {
        Ok(offered) => offered,
        Err(failure) => {
            return Ok(vec![format!(
                "note            the instance type's zones were not checked: {}",
                refusal(&failure)
            )]);
        }
    };
    if offered.is_empty() {
        return Err(PreflightError::InstanceTypeNotOffered {
            instance_type: request.instance_type.clone(),
            region: api.region(),
            zones: distinct,
        });
    }
    Ok(request
        .subnet_ids
        .iter()
        .zip(zones)
        .filter(|(_, zone)| !offered.contains(zone))
        .map(|(subnet, zone)| {
            format!(
                "note            {subnet} ({zone}) does not offer {}: launches there are \
                 refused and go on to the next subnet",
                request.instance_type
            )
        })
        .collect())
}

async fn dry_run_key(
    api: &impl Ec2Api,
    name: &str,
    public: Option<&str>,
    tags: &[(String, String)],
) -> Result<(), PreflightError> {
    api.dry_run_key_pair(name, public, tags)
        .await
        .map_err(PreflightError::Refused)
}

/// A public key for a dry-run import; its private half is dropped at once.
fn throwaway_public_key(algorithm: KeyAlgorithm) -> Result<String, PreflightError> {
    keys::generate(algorithm)
        .map(|(_, public)| public)
        .map_err(|source| PreflightError::KeyGeneration {
            algorithm: algorithm.name(),
            source,
        })
}

/// A failed check as the user reads it: the guidance for a denial, else
/// EC2's words.
fn refusal(failure: &Ec2Failure) -> String {
    if let Some(guidance) = guidance::for_caller(failure) {
        return format!("{}: {guidance}", failure.action);
    }
    if failure.class == ErrorClass::Transient {
        return format!("{failure}; this may pass: try again");
    }
    failure.to_string()
}

fn describe(input: &Input) -> String {
    match input {
        Input::Rejected {
            code: RejectionCode::NoCode,
            message,
        } => message.clone(),
        Input::Rejected { code, message } => format!("{code}: {message}"),
        Input::TransientFailure { message } => format!("{message}; this may pass: try again"),
        other => format!("{other:?}"),
    }
}
