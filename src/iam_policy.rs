//! The least-privilege IAM policy acode-ec2 needs (NFR-009): only the EC2
//! actions the engine calls; whatever it creates must carry the tag
//! `acode=true` at creation, and it may terminate or delete only what
//! carries that tag.
//!
//! Invariant: [`granted_actions`] is every action the engine calls, no
//! more (a test compares it with what the whole test suite called in the
//! lab).

use serde_json::{Value, json};

use crate::request::ProvisionRequest;

/// EC2 actions that only read, on any resource.
pub const READ_ACTIONS: &[&str] = &[
    "DescribeImages",
    "DescribeSubnets",
    "DescribeSecurityGroups",
    "DescribeInstanceTypeOfferings",
    "DescribeKeyPairs",
    "DescribeInstances",
    "DescribeInstanceStatus",
    "GetConsoleOutput",
    "GetSpotPlacementScores",
    "DescribeSpotPriceHistory",
    "DescribeSpotInstanceRequests",
];

/// EC2 actions that create; allowed only with the `acode=true` tag in the request.
pub const CREATE_ACTIONS: &[&str] = &["RunInstances", "CreateKeyPair", "ImportKeyPair"];

/// EC2 actions that remove; allowed only on resources tagged `acode=true`.
pub const REMOVE_ACTIONS: &[&str] = &[
    "TerminateInstances",
    "DeleteKeyPair",
    "CancelSpotInstanceRequests",
];

/// AWS Price List actions (on-demand prices, for spot savings).
pub const PRICING_ACTIONS: &[&str] = &["GetProducts"];

/// Granted, but never called by name: EC2 authorizes tags given at creation
/// (TagSpecifications) as `ec2:CreateTags`.
pub const IMPLIED_ACTIONS: &[&str] = &["CreateTags"];

/// Every action the engine calls, with its service prefix (`ec2:…`, `pricing:…`).
pub fn granted_actions() -> Vec<String> {
    [
        READ_ACTIONS,
        CREATE_ACTIONS,
        REMOVE_ACTIONS,
        PRICING_ACTIONS,
    ]
    .concat()
    .into_iter()
    .map(qualified)
    .collect()
}

/// An action as IAM names it: the Price List's under `pricing:`, the rest under `ec2:`.
pub fn qualified(action: &str) -> String {
    if PRICING_ACTIONS.contains(&action) {
        format!("pricing:{action}")
    } else {
        format!("ec2:{action}")
    }
}

fn ec2(actions: &[&str]) -> Vec<String> {
    actions.iter().map(|a| format!("ec2:{a}")).collect()
}

/// The role an instance profile ARN most likely passes: profiles and their
/// roles usually share a name (`arn:…:instance-profile/NAME` → `arn:…:role/NAME`).
fn role_of_profile(profile_arn: &str) -> Option<String> {
    let (prefix, path) = profile_arn.split_once(":instance-profile/")?;
    let name = path.rsplit('/').next()?;
    Some(format!("{prefix}:role/{name}"))
}

/// The policy document; with a request, `iam:PassRole` for its instance
/// profile's role (if it has one).
pub fn policy(request: Option<&ProvisionRequest>) -> Value {
    let tagged_request = json!({ "StringEquals": { "aws:RequestTag/acode": "true" } });
    let mut statements = vec![
        json!({
            "Sid": "AcodeRead",
            "Effect": "Allow",
            "Action": ec2(READ_ACTIONS),
            "Resource": "*"
        }),
        json!({
            "Sid": "AcodeLaunchTaggedInstances",
            "Effect": "Allow",
            "Action": ["ec2:RunInstances"],
            "Resource": [
                "arn:aws:ec2:*:*:instance/*",
                "arn:aws:ec2:*:*:volume/*",
                "arn:aws:ec2:*:*:spot-instances-request/*"
            ],
            "Condition": tagged_request
        }),
        json!({
            "Sid": "AcodeLaunchFromExistingResources",
            "Effect": "Allow",
            "Action": ["ec2:RunInstances"],
            "Resource": [
                "arn:aws:ec2:*::image/*",
                "arn:aws:ec2:*:*:subnet/*",
                "arn:aws:ec2:*:*:security-group/*",
                "arn:aws:ec2:*:*:key-pair/*",
                "arn:aws:ec2:*:*:network-interface/*"
            ]
        }),
        json!({
            "Sid": "AcodeCreateTaggedKeyPairs",
            "Effect": "Allow",
            "Action": ec2(&["CreateKeyPair", "ImportKeyPair"]),
            "Resource": "arn:aws:ec2:*:*:key-pair/*",
            "Condition": tagged_request
        }),
        json!({
            "Sid": "AcodeTagOnCreateOnly",
            "Effect": "Allow",
            "Action": ec2(IMPLIED_ACTIONS),
            "Resource": "*",
            "Condition": { "StringEquals": { "ec2:CreateAction": CREATE_ACTIONS } }
        }),
        json!({
            "Sid": "AcodeRemoveOwnResources",
            "Effect": "Allow",
            "Action": ec2(REMOVE_ACTIONS),
            "Resource": "*",
            "Condition": { "StringEquals": { "ec2:ResourceTag/acode": "true" } }
        }),
        json!({
            "Sid": "AcodeReadOnDemandPrices",
            "Effect": "Allow",
            "Action": PRICING_ACTIONS.iter().map(|a| qualified(a)).collect::<Vec<_>>(),
            "Resource": "*"
        }),
    ];
    if let Some(role) = request
        .and_then(|r| r.iam_instance_profile_arn.as_deref())
        .and_then(role_of_profile)
    {
        statements.push(json!({
            "Sid": "AcodePassInstanceRole",
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": role,
            "Condition": { "StringEquals": { "iam:PassedToService": "ec2.amazonaws.com" } }
        }));
    }
    json!({ "Version": "2012-10-17", "Statement": statements })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions_of(policy: &Value) -> Vec<String> {
        let mut all = Vec::new();
        for statement in policy["Statement"].as_array().unwrap() {
            match &statement["Action"] {
                Value::String(a) => all.push(a.clone()),
                Value::Array(list) => all.extend(list.iter().map(|a| a.as_str().unwrap().into())),
                other => panic!("{other}"),
            }
        }
        all
    }

    #[test]
    fn creates_need_the_tag_and_removes_need_it_on_the_resource() {
        let policy = policy(None);
        let statements = policy["Statement"].as_array().unwrap();
        for statement in statements {
            let actions = actions_of(&json!({ "Statement": [statement] }));
            let condition = statement["Condition"].to_string();
            if actions
                .iter()
                .any(|a| a.ends_with("KeyPair") && !a.contains("Describe") && !a.contains("Delete"))
            {
                assert!(condition.contains("aws:RequestTag/acode"), "{statement}");
            }
            if actions
                .iter()
                .any(|a| a == "ec2:TerminateInstances" || a == "ec2:DeleteKeyPair")
            {
                assert!(condition.contains("ec2:ResourceTag/acode"), "{statement}");
            }
        }
        assert!(
            !actions_of(&policy).iter().any(|a| a.contains('*')),
            "no wildcard actions"
        );
    }

    #[test]
    fn pass_role_only_for_the_configured_profile() {
        assert!(!policy(None).to_string().contains("iam:PassRole"));
        let mut request = crate::request::sample::request();
        request.iam_instance_profile_arn =
            Some("arn:aws:iam::123456789012:instance-profile/agents/coder".into());
        let text = policy(Some(&request)).to_string();
        assert!(
            text.contains("arn:aws:iam::123456789012:role/coder"),
            "{text}"
        );
        assert!(text.contains("ec2.amazonaws.com"), "{text}");
    }
}
