//! What to do about a refusal: the text a user reads when EC2 says no.
//! Each message names the problem and the fix once; where a suggestion
//! needs a look (the images, subnets or security groups that do exist), the
//! look is made here, and a look that fails leaves the suggestion out.
//!
//! Invariant: guidance only reads (Describe calls); it never creates.

use super::api::{Ec2Api, Ec2Failure};
use crate::error_code::AwsErrorCode;
use crate::request::{AmiSelector, Arch, OsAlias};

/// How many existing ids a message lists.
const SUGGESTIONS: usize = 5;

/// The Service Quotas quota behind a quota error.
fn quota_name(spot: bool) -> (&'static str, &'static str) {
    if spot {
        (
            "L-34B43A08",
            "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests",
        )
    } else {
        (
            "L-1216C47A",
            "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
        )
    }
}

pub fn quota(code: &AwsErrorCode, message: &str, spot: bool, region: &str) -> String {
    let (id, name) = quota_name(spot);
    format!(
        "the account's vCPU quota is reached in {region} ({code}: {message}); another subnet \
         will not help. Request an increase of quota {id} \"{name}\" in Service Quotas \
         (console, or `aws service-quotas request-service-quota-increase --service-code ec2 \
         --quota-code {id} --desired-value N --region {region}`), or stop instances you do not need"
    )
}

pub fn unauthorized(action: &str, message: &str) -> String {
    let encoded = message
        .split("Encoded authorization failure message:")
        .nth(1)
        .map(str::trim)
        .filter(|m| !m.is_empty());
    let decode = match encoded {
        Some(encoded) => format!(
            "`aws sts decode-authorization-message --encoded-message {encoded}` shows which \
             statement denied it"
        ),
        None => format!("EC2 said: {message}"),
    };
    format!(
        "the credentials may not call ec2:{action} (UnauthorizedOperation). `acode-ec2 \
         iam-policy --config FILE` prints the least-privilege policy acode-ec2 needs; {decode}"
    )
}

/// The guidance for a refusal of who is calling (a missing permission,
/// credentials AWS does not accept), else `None`: EC2's words will do.
pub fn for_caller(failure: &Ec2Failure) -> Option<String> {
    if failure.is(&AwsErrorCode::UnauthorizedOperation) {
        Some(unauthorized(failure.action, &failure.message))
    } else if failure.is(&AwsErrorCode::AuthFailure) {
        Some(auth_failure(&failure.message))
    } else {
        None
    }
}

/// AWS did not accept who signed the call (not a missing permission).
pub fn auth_failure(message: &str) -> String {
    format!(
        "AWS did not accept the credentials (AuthFailure: {message}). Check which ones the SDK \
         picked (`aws sts get-caller-identity` with the same profile and environment), that \
         they are current (a session token expires), that this machine's clock is right, \
         and that the region is one the account may use"
    )
}

pub fn missing_key_pair(key_name: &str, region: &str) -> String {
    format!(
        "key pair {key_name} does not exist in {region}. Create it (`aws ec2 create-key-pair \
         --key-name {key_name} --region {region}`), or let acode-ec2 make one per session:\n  \
         keyPair:\n    mode: temporary\nor import your own public key:\n  keyPair:\n    mode: \
         import\n    publicKeyPath: ~/.ssh/id_ed25519.pub\n    privateKeyPath: ~/.ssh/id_ed25519"
    )
}

/// An AMI that does not exist here: the newest image of each OS alias in
/// this region (for `arch`), so the user can pick one.
pub async fn missing_image(api: &impl Ec2Api, ami: &AmiSelector, arch: Arch, why: &str) -> String {
    use strum::IntoEnumIterator;
    let region = api.region();
    let asked = match ami {
        AmiSelector::Id(id) => format!("image {id}"),
        AmiSelector::Alias(alias) => {
            format!("no {} image for OS alias {}", arch.name(), alias.name())
        }
    };
    let mut found = Vec::new();
    for alias in OsAlias::iter() {
        if let Ok(Some(image)) = api.find_image(&AmiSelector::Alias(alias), arch).await {
            found.push(format!("{} ({})", image.ami_id, alias.name()));
        }
    }
    let suggestion = if found.is_empty() {
        format!(
            "AMI ids are per region: look the image up in {region}, or use an OS alias ({})",
            OsAlias::known()
        )
    } else {
        format!(
            "the newest images in {region}: {}; or set amiId to an OS alias ({})",
            found.join(", "),
            OsAlias::known()
        )
    };
    format!("{asked} was not found in {region} ({why}); {suggestion}")
}

/// Which of `wanted` do not exist, and some that do.
pub async fn missing_subnets(api: &impl Ec2Api, wanted: &[String], why: &str) -> String {
    let region = api.region();
    let mut missing = Vec::new();
    for id in wanted {
        if api
            .describe_subnets(std::slice::from_ref(id))
            .await
            .is_err()
        {
            missing.push(id.clone());
        }
    }
    let existing = match api.some_subnets(SUGGESTIONS).await {
        Ok(subnets) if !subnets.is_empty() => {
            let listed: Vec<String> = subnets
                .iter()
                .map(|s| format!("{} ({}, {})", s.id, s.zone, s.vpc))
                .collect();
            format!("; subnets that do: {}", listed.join(", "))
        }
        _ => String::new(),
    };
    format!(
        "subnet {} does not exist in {region} ({why}); check subnetId and failoverSubnetIds{existing}",
        if missing.is_empty() {
            wanted.join(", ")
        } else {
            missing.join(", ")
        }
    )
}

/// Which of `wanted` do not exist, and some that do in the subnet's VPC.
pub async fn missing_groups(
    api: &impl Ec2Api,
    wanted: &[String],
    vpc: Option<&str>,
    why: &str,
) -> String {
    let region = api.region();
    let mut missing = Vec::new();
    for id in wanted {
        if api
            .check_security_groups(std::slice::from_ref(id))
            .await
            .is_err()
        {
            missing.push(id.clone());
        }
    }
    let place = vpc.map_or_else(|| region.clone(), |vpc| format!("{vpc} ({region})"));
    let existing = match api.some_security_groups(vpc, SUGGESTIONS).await {
        Ok(groups) if !groups.is_empty() => format!("; groups that do: {}", groups.join(", ")),
        _ => String::new(),
    };
    format!(
        "security group {} does not exist in {place} ({why}); check securityGroupIds{existing}",
        if missing.is_empty() {
            wanted.join(", ")
        } else {
            missing.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_says_what_was_denied_and_how_to_decode_it() {
        let text = unauthorized(
            "RunInstances",
            "You are not authorized to perform this operation. Encoded authorization failure message: AbC123",
        );
        assert!(text.contains("ec2:RunInstances"), "{text}");
        assert!(
            text.contains("aws sts decode-authorization-message --encoded-message AbC123"),
            "{text}"
        );
        assert!(text.contains("acode-ec2 iam-policy"), "{text}");
        let plain = unauthorized("TerminateInstances", "denied");
        assert!(plain.contains("EC2 said: denied"), "{plain}");
    }

    #[test]
    fn quota_names_the_quota_region_and_the_way_to_raise_it() {
        let text = quota(
            &AwsErrorCode::VcpuLimitExceeded,
            "limit 32",
            false,
            "eu-west-1",
        );
        for part in [
            "L-1216C47A",
            "eu-west-1",
            "Service Quotas",
            "another subnet will not help",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(
            quota(&AwsErrorCode::MaxSpotInstanceCountExceeded, "x", true, "r")
                .contains("L-34B43A08")
        );
    }
}
