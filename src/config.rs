//! The YAML config file (`ec2Target:` with camelCase keys) and its mapping to
//! a [`ProvisionRequest`].
//!
//! Invariant: a config either becomes a request that passes
//! [`ProvisionRequest::check`] or is refused with an error that names the
//! offending key; unknown keys are errors, never ignored.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::request::{
    AmiSelector, DEFAULT_SSH_RETRIES, DEFAULT_SSH_RETRY_INTERVAL, HostKeyPolicy,
    InterruptionPolicy, InvalidRequest, KeyAlgorithm, KeyPairMode, OsAlias, ProvisionRequest,
    SpotPolicy, SshAddress, SshSettings, StatusCheckMode, Timeouts,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The causes are part of the message and not `#[source]`s: a report
    // that prints the chain would say them twice.
    #[error("cannot read config {path}: {cause}; check the path and its permissions")]
    Read { path: String, cause: std::io::Error },
    #[error("config {path} is not valid: {message}")]
    Yaml { path: String, message: String },
    #[error("config {path}: {cause}")]
    Invalid { path: String, cause: InvalidRequest },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    ec2_target: Ec2Target,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Ec2Target {
    ami_id: String,
    instance_type: String,
    subnet_id: String,
    #[serde(default)]
    failover_subnet_ids: Vec<String>,
    #[serde(default)]
    security_group_ids: Vec<String>,
    key_name: Option<String>,
    private_key_path: Option<String>,
    key_pair: Option<KeyPairBlock>,
    ebs_size_gb: Option<u32>,
    user_data: Option<String>,
    #[serde(default)]
    use_spot: bool,
    spot_max_price: Option<String>,
    spot_fallback_to_on_demand: Option<bool>,
    spot_request_timeout: Option<String>,
    spot_interruption: Option<InterruptionBlock>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    enforce_imds_v2: Option<bool>,
    iam_instance_profile_arn: Option<String>,
    running_timeout: Option<String>,
    ssh_timeout: Option<String>,
    poll_interval: Option<String>,
    status_checks: Option<StatusCheckMode>,
    ssh: Option<SshBlock>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InterruptionBlock {
    shutdown_command: Option<String>,
    shutdown_timeout: Option<String>,
    metadata_url: Option<String>,
    #[serde(default)]
    replace: bool,
}

impl InterruptionBlock {
    fn into_policy(self) -> Result<InterruptionPolicy, InvalidRequest> {
        let defaults = InterruptionPolicy::default();
        Ok(InterruptionPolicy {
            shutdown_command: self.shutdown_command,
            shutdown_timeout: optional_duration(
                "spotInterruption.shutdownTimeout",
                self.shutdown_timeout.as_ref(),
                defaults.shutdown_timeout,
            )?,
            metadata_url: self.metadata_url.unwrap_or(defaults.metadata_url),
            replace: self.replace,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeyPairBlock {
    mode: KeyModeName,
    key_type: Option<KeyAlgorithm>,
    key_name: Option<String>,
    private_key_path: Option<String>,
    public_key_path: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum KeyModeName {
    Existing,
    Temporary,
    Import,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SshBlock {
    user: Option<String>,
    port: Option<u16>,
    endpoint_override: Option<String>,
    host_key_verification: Option<HostKeyModeName>,
    #[serde(default)]
    host_key_fingerprints: Vec<String>,
    retries: Option<u32>,
    retry_interval: Option<String>,
    address: Option<SshAddress>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum HostKeyModeName {
    Console,
    Pinned,
    InsecureAcceptAny,
}

fn invalid(key: &'static str, problem: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        key,
        problem: problem.into(),
    }
}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<ProvisionRequest, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: shown.clone(),
        cause,
    })?;
    parse(&text).map_err(|e| match e {
        ParseError::Yaml(message) => ConfigError::Yaml {
            path: shown,
            message,
        },
        ParseError::Invalid(cause) => ConfigError::Invalid { path: shown, cause },
    })
}

#[derive(Debug)]
pub enum ParseError {
    Yaml(String),
    Invalid(InvalidRequest),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Yaml(m) => f.write_str(m),
            ParseError::Invalid(e) => e.fmt(f),
        }
    }
}

/// Parses config text into a checked request.
pub fn parse(text: &str) -> Result<ProvisionRequest, ParseError> {
    let blank = text
        .lines()
        .all(|line| line.trim().is_empty() || line.trim_start().starts_with('#'));
    if blank {
        return Err(ParseError::Yaml(
            "missing field `ec2Target`: the file is empty; it needs `ec2Target:` with the \
             settings under it (fixtures/ec2-target.example.yaml shows them all)"
                .into(),
        ));
    }
    // YAML 1.2 booleans only: `yes`, `on` or a quoted `'yes'` would
    // otherwise read as true, so a typo or a string could turn spot on.
    let options = serde_saphyr::options! { strict_booleans: true };
    let file: ConfigFile = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        // The parser's advice is for programmers; the user needs the key.
        let message = e
            .to_string()
            .replace(
                ", set DuplicateKeyPolicy in Options if acceptable",
                " (given twice; keep one)",
            )
            .replace("(strict mode expects true/false)", "(write true or false)");
        // The CLI says "error:" once already.
        let message = message.strip_prefix("error: ").unwrap_or(&message);
        ParseError::Yaml(message.to_string())
    })?;
    let request = file
        .ec2_target
        .into_request()
        .map_err(ParseError::Invalid)?;
    request.check().map_err(ParseError::Invalid)?;
    Ok(request)
}

/// Parses `30s`, `5m`, `1h`, `250ms`.
pub fn parse_duration(key: &'static str, text: &str) -> Result<Duration, InvalidRequest> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        invalid(
            key,
            format!("`{text}` is not a duration like 250ms, 30s, 5m or 1h"),
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let unit_ms = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

fn optional_duration(
    key: &'static str,
    text: Option<&String>,
    default: Duration,
) -> Result<Duration, InvalidRequest> {
    text.map_or(Ok(default), |t| parse_duration(key, t))
}

impl Ec2Target {
    fn into_request(self) -> Result<ProvisionRequest, InvalidRequest> {
        let ami = match OsAlias::parse(&self.ami_id) {
            Some(alias) => AmiSelector::Alias(alias),
            None => AmiSelector::Id(self.ami_id.clone()),
        };
        let default_user = match &ami {
            AmiSelector::Alias(OsAlias::Ubuntu2204) => "ubuntu",
            AmiSelector::Alias(OsAlias::Debian11) => "admin",
            _ => "ec2-user",
        };
        let key_pair = with_home_expanded(key_pair_mode(
            self.key_name,
            self.private_key_path,
            self.key_pair,
        )?)?;
        let spot = if self.use_spot {
            Some(SpotPolicy {
                max_price: self.spot_max_price,
                fallback_to_on_demand: self.spot_fallback_to_on_demand.unwrap_or(true),
                request_timeout: optional_duration(
                    "spotRequestTimeout",
                    self.spot_request_timeout.as_ref(),
                    Duration::from_secs(300),
                )?,
                interruption: self
                    .spot_interruption
                    .map(InterruptionBlock::into_policy)
                    .transpose()?
                    .unwrap_or_default(),
            })
        } else if self.spot_max_price.is_some()
            || self.spot_request_timeout.is_some()
            || self.spot_fallback_to_on_demand.is_some()
            || self.spot_interruption.is_some()
        {
            return Err(invalid(
                "useSpot",
                "spot settings are given but useSpot is not true",
            ));
        } else {
            None
        };
        let defaults = Timeouts::default();
        let timeouts = Timeouts {
            running: optional_duration(
                "runningTimeout",
                self.running_timeout.as_ref(),
                defaults.running,
            )?,
            ssh: optional_duration("sshTimeout", self.ssh_timeout.as_ref(), defaults.ssh)?,
            poll_interval: optional_duration(
                "pollInterval",
                self.poll_interval.as_ref(),
                defaults.poll_interval,
            )?,
        };
        let ssh_block = self.ssh.unwrap_or(SshBlock {
            user: None,
            port: None,
            endpoint_override: None,
            host_key_verification: None,
            host_key_fingerprints: Vec::new(),
            retries: None,
            retry_interval: None,
            address: None,
        });
        let host_key_policy = match (
            ssh_block.host_key_verification,
            ssh_block.host_key_fingerprints,
        ) {
            (None | Some(HostKeyModeName::Console), prints) if prints.is_empty() => {
                HostKeyPolicy::Console
            }
            (None | Some(HostKeyModeName::Pinned), prints) => HostKeyPolicy::Pinned(prints),
            (Some(HostKeyModeName::InsecureAcceptAny), prints) if prints.is_empty() => {
                HostKeyPolicy::InsecureAcceptAny
            }
            (Some(_), _) => {
                return Err(invalid(
                    "ssh.hostKeyFingerprints",
                    "fingerprints only go with hostKeyVerification: pinned",
                ));
            }
        };
        let mut subnet_ids = vec![self.subnet_id];
        subnet_ids.extend(self.failover_subnet_ids);
        Ok(ProvisionRequest {
            ami,
            instance_type: self.instance_type,
            subnet_ids,
            security_group_ids: self.security_group_ids,
            key_pair,
            ebs_size_gb: self.ebs_size_gb.unwrap_or(20),
            user_data: self.user_data,
            spot,
            tags: self.tags,
            enforce_imds_v2: self.enforce_imds_v2.unwrap_or(true),
            iam_instance_profile_arn: self.iam_instance_profile_arn,
            ssh: SshSettings {
                user: ssh_block.user.unwrap_or_else(|| default_user.to_string()),
                port: ssh_block.port.unwrap_or(22),
                endpoint_override: ssh_block.endpoint_override,
                host_key_policy,
                retries: ssh_block.retries.unwrap_or(DEFAULT_SSH_RETRIES),
                retry_interval: optional_duration(
                    "ssh.retryInterval",
                    ssh_block.retry_interval.as_ref(),
                    DEFAULT_SSH_RETRY_INTERVAL,
                )?,
                address: ssh_block.address.unwrap_or_default(),
            },
            timeouts,
            status_checks: self.status_checks.unwrap_or_default(),
        })
    }
}

/// Key paths as a shell would read them: users write `~/.ssh/…` in YAML,
/// where no shell expands it.
fn with_home_expanded(mode: KeyPairMode) -> Result<KeyPairMode, InvalidRequest> {
    Ok(match mode {
        KeyPairMode::Existing {
            key_name,
            private_key_path,
        } => KeyPairMode::Existing {
            key_name,
            private_key_path: expand_home("privateKeyPath", private_key_path)?,
        },
        KeyPairMode::ImportOwn {
            public_key_path,
            private_key_path,
        } => KeyPairMode::ImportOwn {
            public_key_path: expand_home("keyPair.publicKeyPath", public_key_path)?,
            private_key_path: expand_home("keyPair.privateKeyPath", private_key_path)?,
        },
        other => other,
    })
}

fn expand_home(key: &'static str, path: String) -> Result<String, InvalidRequest> {
    let Some(rest) = path.strip_prefix("~/") else {
        return Ok(path);
    };
    let home = directories::BaseDirs::new().ok_or_else(|| {
        invalid(
            key,
            format!("`{path}` starts with ~/ but this user has no home folder (HOME); give the full path"),
        )
    })?;
    Ok(home.home_dir().join(rest).display().to_string())
}

fn key_pair_mode(
    key_name: Option<String>,
    private_key_path: Option<String>,
    block: Option<KeyPairBlock>,
) -> Result<KeyPairMode, InvalidRequest> {
    match (key_name, block) {
        (Some(_), Some(_)) => Err(invalid(
            "keyName",
            "give either keyName or a keyPair block, not both",
        )),
        (Some(key_name), None) => {
            let private_key_path = private_key_path.ok_or_else(|| {
                invalid(
                    "privateKeyPath",
                    "keyName needs the path of its private key for the SSH check",
                )
            })?;
            Ok(KeyPairMode::Existing {
                key_name,
                private_key_path,
            })
        }
        (None, None) => {
            if private_key_path.is_some() {
                return Err(invalid("privateKeyPath", "only goes with keyName"));
            }
            Ok(KeyPairMode::Temporary {
                algorithm: KeyAlgorithm::default(),
            })
        }
        (None, Some(block)) => {
            if private_key_path.is_some() {
                return Err(invalid("privateKeyPath", "put it inside the keyPair block"));
            }
            let algorithm = block.key_type.unwrap_or_default();
            match block.mode {
                KeyModeName::Existing => {
                    if block.public_key_path.is_some() {
                        return Err(invalid(
                            "keyPair.publicKeyPath",
                            "an existing key pair is already in EC2; publicKeyPath goes with mode import",
                        ));
                    }
                    if block.key_type.is_some() {
                        return Err(invalid(
                            "keyPair.keyType",
                            "an existing key pair has its own type",
                        ));
                    }
                    Ok(KeyPairMode::Existing {
                        key_name: block.key_name.ok_or_else(|| {
                            invalid("keyPair.keyName", "mode existing needs keyName")
                        })?,
                        private_key_path: block.private_key_path.ok_or_else(|| {
                            invalid(
                                "keyPair.privateKeyPath",
                                "mode existing needs privateKeyPath",
                            )
                        })?,
                    })
                }
                KeyModeName::Import
                    if block.public_key_path.is_some() || block.private_key_path.is_some() =>
                {
                    if block.key_type.is_some() {
                        return Err(invalid(
                            "keyPair.keyType",
                            "your own key has its own type; leave keyType out",
                        ));
                    }
                    if block.key_name.is_some() {
                        return Err(invalid(
                            "keyPair.keyName",
                            "an imported pair is named acode-{session} by acode-ec2",
                        ));
                    }
                    Ok(KeyPairMode::ImportOwn {
                        public_key_path: block.public_key_path.ok_or_else(|| {
                            invalid(
                                "keyPair.publicKeyPath",
                                "importing your own key needs publicKeyPath and privateKeyPath",
                            )
                        })?,
                        private_key_path: block.private_key_path.ok_or_else(|| {
                            invalid(
                                "keyPair.privateKeyPath",
                                "importing your own key needs publicKeyPath and privateKeyPath",
                            )
                        })?,
                    })
                }
                KeyModeName::Temporary | KeyModeName::Import => {
                    if block.key_name.is_some()
                        || block.private_key_path.is_some()
                        || block.public_key_path.is_some()
                    {
                        return Err(invalid(
                            "keyPair.keyName",
                            "temporary pairs are named and stored by acode-ec2",
                        ));
                    }
                    Ok(match block.mode {
                        KeyModeName::Temporary => KeyPairMode::Temporary { algorithm },
                        _ => KeyPairMode::Import { algorithm },
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "ec2Target:\n  amiId: ami-0abc\n  instanceType: t3.micro\n  \
                           subnetId: subnet-1\n  securityGroupIds: [sg-1]\n";

    #[test]
    fn example_fixture_parses() {
        let text = include_str!("../fixtures/ec2-target.example.yaml");
        let request = parse(text).unwrap();
        assert_eq!(request.ami, AmiSelector::Alias(OsAlias::AmazonLinux2));
        assert_eq!(request.subnet_ids.len(), 2);
        assert!(
            request
                .spot
                .as_ref()
                .is_some_and(|s| s.fallback_to_on_demand)
        );
        assert_eq!(request.ssh.user, "ec2-user");
    }

    #[test]
    fn key_paths_under_the_home_folder_are_expanded() {
        let home = directories::BaseDirs::new()
            .unwrap()
            .home_dir()
            .display()
            .to_string();
        let existing = parse(&format!(
            "{MINIMAL}  keyName: team\n  privateKeyPath: ~/.ssh/team.pem\n"
        ))
        .unwrap();
        assert_eq!(
            existing.key_pair,
            KeyPairMode::Existing {
                key_name: "team".into(),
                private_key_path: format!("{home}/.ssh/team.pem"),
            }
        );
        let own = parse(&format!(
            "{MINIMAL}  keyPair:\n    mode: import\n    publicKeyPath: ~/.ssh/id.pub\n    \
             privateKeyPath: /keys/id\n"
        ))
        .unwrap();
        assert_eq!(
            own.key_pair,
            KeyPairMode::ImportOwn {
                public_key_path: format!("{home}/.ssh/id.pub"),
                private_key_path: "/keys/id".into(),
            }
        );
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let r = parse(MINIMAL).unwrap();
        assert_eq!(r.ebs_size_gb, 20);
        assert!(r.enforce_imds_v2);
        assert!(r.spot.is_none());
        assert_eq!(
            r.key_pair,
            KeyPairMode::Temporary {
                algorithm: KeyAlgorithm::Ed25519
            }
        );
        assert_eq!(r.ssh.port, 22);
        assert_eq!(r.ssh.host_key_policy, HostKeyPolicy::Console);
        // The specification's readiness defaults (FR-043/044, FR-052/053).
        assert_eq!(r.timeouts.poll_interval, Duration::from_secs(5));
        assert_eq!(r.timeouts.running, Duration::from_secs(300));
        assert_eq!(r.ssh.retries, 30);
        assert_eq!(r.ssh.retry_interval, Duration::from_secs(10));
        assert_eq!(r.ssh.address, SshAddress::Auto);
        assert_eq!(r.status_checks, StatusCheckMode::Ok);
        // Spot's (FR-027, FR-029/030): 5 min to running, fallback on, the
        // on-demand price as the ceiling (no max price sent).
        let spot = parse(&format!("{MINIMAL}  useSpot: true\n"))
            .unwrap()
            .spot
            .expect("spot");
        assert_eq!(spot.request_timeout, Duration::from_secs(300));
        assert!(spot.fallback_to_on_demand);
        assert_eq!(spot.max_price, None);
    }

    #[test]
    fn own_key_import_needs_both_paths() {
        let block =
            "  keyPair:\n    mode: import\n    publicKeyPath: /k.pub\n    privateKeyPath: /k\n";
        let r = parse(&format!("{MINIMAL}{block}")).unwrap();
        assert_eq!(
            r.key_pair,
            KeyPairMode::ImportOwn {
                public_key_path: "/k.pub".into(),
                private_key_path: "/k".into()
            }
        );
        for (block, key) in [
            (
                "  keyPair:\n    mode: import\n    publicKeyPath: /k.pub\n",
                "keyPair.privateKeyPath",
            ),
            (
                "  keyPair:\n    mode: import\n    privateKeyPath: /k\n",
                "keyPair.publicKeyPath",
            ),
            (
                "  keyPair:\n    mode: import\n    keyType: rsa\n    publicKeyPath: /k.pub\n    privateKeyPath: /k\n",
                "keyPair.keyType",
            ),
            (
                "  keyPair:\n    mode: temporary\n    publicKeyPath: /k.pub\n",
                "keyPair.keyName",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{block}")).unwrap_err().to_string();
            assert!(err.contains(key), "{block}: {err}");
        }
        // Without paths, import still means: generated here, imported.
        let r = parse(&format!("{MINIMAL}  keyPair:\n    mode: import\n")).unwrap();
        assert!(matches!(r.key_pair, KeyPairMode::Import { .. }));
    }

    #[test]
    fn readiness_settings_parse() {
        let text = format!(
            "{MINIMAL}  statusChecks: not-impaired
  ssh:
    retries: 3
    retryInterval: 2s
    address: private
"
        );
        let r = parse(&text).unwrap();
        assert_eq!(r.status_checks, StatusCheckMode::NotImpaired);
        assert_eq!(r.ssh.retries, 3);
        assert_eq!(r.ssh.retry_interval, Duration::from_secs(2));
        assert_eq!(r.ssh.address, SshAddress::Private);
        for (extra, key) in [
            (
                "  statusChecks: sometimes
",
                "statusChecks",
            ),
            (
                "  ssh:
    address: ipv6
",
                "address",
            ),
            (
                "  ssh:
    retries: 0
",
                "ssh.retries",
            ),
            (
                "  ssh:
    retryInterval: 1ms
",
                "ssh.retryInterval",
            ),
            (
                "  ssh:
    retries: -1
",
                "retries",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        for (text, key) in [
            (format!("{MINIMAL}  instanceTyp: t3.large\n"), "instanceTyp"),
            (format!("{MINIMAL}  ssh:\n    usr: x\n"), "usr"),
            ("ec2Targets:\n  amiId: x\n".to_string(), "ec2Targets"),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        assert!(matches!(
            parse("ec2Target: [unclosed"),
            Err(ParseError::Yaml(_))
        ));
        assert!(matches!(parse(""), Err(ParseError::Yaml(_))));
        let empty = parse("# nothing yet\n\n").unwrap_err().to_string();
        assert!(empty.contains("ec2Target:"), "{empty}");
        let twice = parse(&format!("{MINIMAL}  instanceType: t3.large\n"))
            .unwrap_err()
            .to_string();
        assert!(
            twice.contains("instanceType") && twice.contains("given twice"),
            "{twice}"
        );
        assert!(!twice.contains("DuplicateKeyPolicy"), "{twice}");
    }

    #[test]
    fn booleans_are_true_or_false_only() {
        for value in ["yes", "'yes'", "on", "\"no\"", "1"] {
            let err = parse(&format!("{MINIMAL}  useSpot: {value}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("useSpot") && err.contains("write true or false"),
                "{value}: {err}"
            );
        }
        let spot = parse(&format!("{MINIMAL}  useSpot: true\n")).unwrap();
        assert!(spot.spot.is_some());
        let on_demand = parse(&format!("{MINIMAL}  useSpot: false\n")).unwrap();
        assert!(on_demand.spot.is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (extra, key) in [
            ("  ebsSizeGb: 0\n", "ebsSizeGb"),
            (
                "  useSpot: true\n  spotRequestTimeout: soon\n",
                "spotRequestTimeout",
            ),
            ("  spotMaxPrice: \"0.1\"\n", "useSpot"),
            ("  spotFallbackToOnDemand: false\n", "useSpot"),
            ("  runningTimeout: 0s\n", "runningTimeout"),
            ("  sshTimeout: 0s\n", "sshTimeout"),
            (
                "  ssh:\n    endpointOverride: http://127.0.0.1:22\n",
                "ssh.endpointOverride",
            ),
            (
                "  ssh:\n    hostKeyVerification: pinned\n    hostKeyFingerprints: [\"SHA256:x\"]\n",
                "ssh.hostKeyFingerprints",
            ),
            ("  keyName: mine\n", "privateKeyPath"),
            ("  pollInterval: 1ms\n", "pollInterval"),
            (
                "  ssh:\n    hostKeyVerification: pinned\n",
                "ssh.hostKeyFingerprints",
            ),
            ("  instanceType: \" t3.micro \"\n", "instanceType"),
            ("  tags:\n    \"aws:team\": x\n", "tags"),
            ("  tags:\n    \"\": x\n", "tags"),
            ("  iamInstanceProfileArn: \"\"\n", "iamInstanceProfileArn"),
        ] {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        // FR-007: no security group is refused, not left to the VPC's default.
        let without_groups = MINIMAL.replace("  securityGroupIds: [sg-1]\n", "");
        let err = parse(&without_groups).unwrap_err().to_string();
        assert!(
            err.contains("securityGroupIds") && err.contains("at least one security group"),
            "{err}"
        );
        let long = |n| "x".repeat(n);
        for (extra, problem) in [
            (format!("  tags:\n    {}: v\n", long(129)), "128 characters"),
            (format!("  tags:\n    k: {}\n", long(257)), "256 characters"),
            (format!("  userData: {}\n", long(16 * 1024 + 1)), "16 KiB"),
        ] {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
            assert!(err.contains(problem), "{err}");
        }
        // At the limits, accepted.
        parse(&format!(
            "{MINIMAL}  tags:\n    {}: {}\n  userData: {}\n",
            long(128),
            long(256),
            long(16 * 1024)
        ))
        .unwrap();
        let err = parse(&format!("{MINIMAL}  ebsSizeGb: -3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ebsSizeGb"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("k", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("k", "5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("k", "5").is_err());
        assert!(parse_duration("k", "m").is_err());
        assert!(parse_duration("k", "99999999999999999999h").is_err());
    }
}
