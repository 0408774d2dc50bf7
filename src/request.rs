//! What a caller asks for: one validated, immutable provisioning request.
//!
//! Invariant: a `ProvisionRequest` only exists in a valid state (non-empty
//! instance type, at least one subnet, sane timeouts); `config` builds it from
//! YAML and library callers build it directly and call [`ProvisionRequest::check`].
//! It is stored once per session and never changes afterwards, so every
//! effect of a resumed session sees the same parameters (and EC2 sees the same
//! `ClientToken` parameters).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which machine image to boot: an explicit id or a well-known OS alias that
/// validation resolves to the newest matching public image.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum AmiSelector {
    Id(String),
    Alias(OsAlias),
}

/// OS aliases accepted in place of an AMI id.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::EnumString,
    strum::IntoStaticStr,
)]
pub enum OsAlias {
    #[serde(rename = "amazon-linux-2")]
    #[strum(serialize = "amazon-linux-2")]
    AmazonLinux2,
    #[serde(rename = "ubuntu-22.04")]
    #[strum(serialize = "ubuntu-22.04")]
    Ubuntu2204,
    #[serde(rename = "debian-11")]
    #[strum(serialize = "debian-11")]
    Debian11,
}

impl OsAlias {
    pub fn name(self) -> &'static str {
        self.into()
    }

    pub fn parse(text: &str) -> Option<OsAlias> {
        text.parse().ok()
    }

    /// "amazon-linux-2, ubuntu-22.04, debian-11", for messages.
    pub fn known() -> String {
        use strum::IntoEnumIterator;
        OsAlias::iter()
            .map(OsAlias::name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `(owner account, image name pattern)` of the publisher's official
    /// images for `arch`.
    pub fn image_filter(self, arch: Arch) -> (&'static str, &'static str) {
        match (self, arch) {
            (OsAlias::AmazonLinux2, Arch::X86_64) => ("amazon", "amzn2-ami-hvm-*-x86_64-gp2"),
            (OsAlias::AmazonLinux2, Arch::Arm64) => ("amazon", "amzn2-ami-hvm-*-arm64-gp2"),
            (OsAlias::Ubuntu2204, Arch::X86_64) => (
                "099720109477",
                "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*",
            ),
            (OsAlias::Ubuntu2204, Arch::Arm64) => (
                "099720109477",
                "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-arm64-server-*",
            ),
            (OsAlias::Debian11, Arch::X86_64) => ("136693071363", "debian-11-amd64-*"),
            (OsAlias::Debian11, Arch::Arm64) => ("136693071363", "debian-11-arm64-*"),
        }
    }
}

/// The CPU architecture an OS alias's image is picked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    X86_64,
    /// AWS Graviton.
    Arm64,
}

impl Arch {
    /// As EC2's images name it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// By EC2's naming: a `g` among the attribute letters after the
    /// generation digit marks Graviton (t4g, c7gn, im4gn, is4gen, hpc7g),
    /// as does the first Graviton family, a1. A `g` family (g5: GPUs on
    /// x86) has it before the digit.
    pub fn of_instance_type(instance_type: &str) -> Arch {
        let family = instance_type.split('.').next().unwrap_or_default();
        let attributes = family
            .trim_start_matches(|c: char| c.is_ascii_lowercase())
            .trim_start_matches(|c: char| c.is_ascii_digit());
        if family == "a1" || attributes.contains('g') {
            Arch::Arm64
        } else {
            Arch::X86_64
        }
    }
}

/// Key algorithm for key pairs the engine creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyAlgorithm {
    #[default]
    Ed25519,
    Rsa,
}

impl KeyAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::Rsa => "rsa",
        }
    }
}

/// Where the instance's SSH key pair comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum KeyPairMode {
    /// A key pair that already exists in EC2; the engine never deletes it.
    Existing {
        key_name: String,
        private_key_path: String,
    },
    /// EC2 generates the pair (`CreateKeyPair`); the engine writes the private
    /// key file and deletes both at cleanup.
    Temporary { algorithm: KeyAlgorithm },
    /// The engine generates the pair locally, writes the private key file and
    /// imports the public half (`ImportKeyPair`); deleted at cleanup. The
    /// private key never crosses the network.
    Import { algorithm: KeyAlgorithm },
    /// The user's own key (FR-073): its public half is imported as the
    /// session's pair (deleted at cleanup); the key files are the user's and
    /// are never written or removed.
    ImportOwn {
        public_key_path: String,
        private_key_path: String,
    },
}

impl KeyPairMode {
    /// Whether the engine created the pair and so must delete it at cleanup.
    pub fn is_owned(&self) -> bool {
        !matches!(self, KeyPairMode::Existing { .. })
    }
}

/// Spot settings; `None` in the request means on-demand only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpotPolicy {
    pub max_price: Option<String>,
    pub fallback_to_on_demand: bool,
    /// How long a spot instance may take to reach `running`.
    #[serde(with = "duration_ms")]
    pub request_timeout: Duration,
    /// What a watcher does when EC2 gives notice of taking the instance back.
    #[serde(default)]
    pub interruption: InterruptionPolicy,
}

/// FR-035: what happens in the two minutes between a spot interruption
/// notice and EC2 taking the instance back (`spotInterruption:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptionPolicy {
    /// Run on the instance over SSH inside the notice window (save work,
    /// stop services); its failure does not stop the cleanup.
    pub shutdown_command: Option<String>,
    /// At most this long, and always ending before the notice time.
    #[serde(with = "duration_ms")]
    pub shutdown_timeout: Duration,
    /// Where the instance's metadata service answers (asked from the
    /// instance, over SSH; a lab points it at its own).
    pub metadata_url: String,
    /// Provision a new session from the same request as soon as a notice
    /// arrives (on-demand when spot is known to be short everywhere and
    /// fallback is allowed).
    pub replace: bool,
}

/// FR-035's window: the notice comes two minutes ahead; leave room to clean up.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(90);
/// The instance metadata service, as every EC2 instance reaches it.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";

impl Default for InterruptionPolicy {
    fn default() -> Self {
        InterruptionPolicy {
            shutdown_command: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            metadata_url: DEFAULT_METADATA_URL.into(),
            replace: false,
        }
    }
}

impl InterruptionPolicy {
    fn check(&self) -> Result<(), InvalidRequest> {
        // The URL goes into a command line on the instance: only plain
        // http://host[:port][/path] characters, so nothing can be injected.
        let url = &self.metadata_url;
        let rest = url.strip_prefix("http://").unwrap_or("");
        let plain = |c: char| c.is_ascii_alphanumeric() || ".-_:/[]".contains(c);
        if rest.is_empty() || !rest.chars().all(plain) {
            return Err(invalid(
                "spotInterruption.metadataUrl",
                format!("`{url}` is not a plain http://host[:port] URL"),
            ));
        }
        if self.shutdown_timeout.is_zero() {
            return Err(invalid(
                "spotInterruption.shutdownTimeout",
                "must be longer than zero",
            ));
        }
        if self
            .shutdown_command
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(invalid(
                "spotInterruption.shutdownCommand",
                "must not be empty (leave it out for none)",
            ));
        }
        Ok(())
    }
}

/// How the SSH host key the instance presents is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", content = "fingerprints", rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    /// Trust only the fingerprints cloud-init printed to the instance console.
    #[default]
    Console,
    /// Trust only these `SHA256:…` fingerprints.
    Pinned(Vec<String>),
    /// Accept any host key. Vulnerable to a man in the middle; for labs only.
    InsecureAcceptAny,
}

/// Which of the instance's addresses the SSH check (and the user) connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SshAddress {
    /// The public IP when there is one, else the private IP.
    #[default]
    Auto,
    Public,
    /// For a machine that reaches the VPC (VPN, peering, a host inside it).
    Private,
}

/// What EC2's status checks must say before a session is Ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StatusCheckMode {
    /// System status and instance status both `ok` (FR-046–048).
    #[default]
    Ok,
    /// Neither check `impaired` (`initializing` is fine): Ready sooner.
    NotImpaired,
    /// Do not look at status checks.
    Skip,
}

/// FR-052: failed SSH logins tolerated before the session is cleaned up.
pub const DEFAULT_SSH_RETRIES: u32 = 30;
/// FR-053: the wait between SSH logins.
pub const DEFAULT_SSH_RETRY_INTERVAL: Duration = Duration::from_secs(10);

fn default_ssh_retries() -> u32 {
    DEFAULT_SSH_RETRIES
}

fn default_ssh_retry_interval() -> Duration {
    DEFAULT_SSH_RETRY_INTERVAL
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshSettings {
    pub user: String,
    pub port: u16,
    /// `host:port` to probe instead of the instance's address (labs,
    /// bastions, port forwards).
    pub endpoint_override: Option<String>,
    pub host_key_policy: HostKeyPolicy,
    /// Failed logins tolerated (sessions stored before this was kept get the default).
    #[serde(default = "default_ssh_retries")]
    pub retries: u32,
    #[serde(default = "default_ssh_retry_interval", with = "duration_ms")]
    pub retry_interval: Duration,
    #[serde(default)]
    pub address: SshAddress,
}

/// How long each waiting phase may take before the session is cleaned up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    #[serde(with = "duration_ms")]
    pub running: Duration,
    #[serde(with = "duration_ms")]
    pub ssh: Duration,
    #[serde(with = "duration_ms")]
    pub poll_interval: Duration,
}

impl Default for Timeouts {
    /// FR-043/044: poll every 5 s for at most 5 min; FR-058: readiness
    /// (console keys, SSH, status checks) within 5 min of running.
    fn default() -> Self {
        Timeouts {
            running: Duration::from_secs(300),
            ssh: Duration::from_secs(300),
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// A complete request to provision one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionRequest {
    pub ami: AmiSelector,
    pub instance_type: String,
    /// Primary subnet first, then failover subnets in order.
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
    pub key_pair: KeyPairMode,
    pub ebs_size_gb: u32,
    pub user_data: Option<String>,
    pub spot: Option<SpotPolicy>,
    pub tags: BTreeMap<String, String>,
    pub enforce_imds_v2: bool,
    pub iam_instance_profile_arn: Option<String>,
    pub ssh: SshSettings,
    pub timeouts: Timeouts,
    #[serde(default)]
    pub status_checks: StatusCheckMode,
}

/// A request field that cannot work, named as in the YAML config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{key}`: {problem}")]
pub struct InvalidRequest {
    pub key: &'static str,
    pub problem: String,
}

fn invalid(key: &'static str, problem: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        key,
        problem: problem.into(),
    }
}

/// The tag that names an instance's or key pair's session: cleanup finds
/// what a lost answer created by it.
pub const SESSION_TAG: &str = "acode-session-id";

/// Tag keys the engine sets itself; callers may not override them.
pub const RESERVED_TAG_KEYS: [&str; 3] = ["acode", SESSION_TAG, "acode-timestamp"];

/// EC2's limit on user data, before base64.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

impl ProvisionRequest {
    /// EC2's rules for tags (RunInstances would refuse the launch late).
    fn check_tags(&self) -> Result<(), InvalidRequest> {
        for (key, value) in &self.tags {
            let problem = if RESERVED_TAG_KEYS.contains(&key.as_str()) {
                format!("`{key}` is set by acode-ec2 itself")
            } else if key.trim().is_empty() {
                "a tag key must not be empty".to_string()
            } else if key.to_ascii_lowercase().starts_with("aws:") {
                format!("`{key}`: keys starting with aws: are reserved for AWS")
            } else if key.chars().count() > 128 {
                format!("`{key}` is longer than EC2's 128 characters for a key")
            } else if value.chars().count() > 256 {
                format!("the value of `{key}` is longer than EC2's 256 characters")
            } else {
                continue;
            };
            return Err(invalid("tags", problem));
        }
        Ok(())
    }

    /// Rejects values EC2 or the engine could never accept, naming the key.
    pub fn check(&self) -> Result<(), InvalidRequest> {
        if let AmiSelector::Id(id) = &self.ami
            && !id.starts_with("ami-")
        {
            return Err(invalid(
                "amiId",
                format!(
                    "`{id}` is neither an AMI id (ami-…) nor a known OS alias ({})",
                    OsAlias::known()
                ),
            ));
        }
        if self.instance_type.trim().is_empty() {
            return Err(invalid("instanceType", "must not be empty"));
        }
        if self.instance_type.contains(char::is_whitespace) {
            return Err(invalid(
                "instanceType",
                format!(
                    "`{}` holds spaces; write it as EC2 names it, e.g. t3.micro",
                    self.instance_type
                ),
            ));
        }
        if self.subnet_ids.is_empty() {
            return Err(invalid("subnetId", "at least one subnet is required"));
        }
        if let Some(bad) = self.subnet_ids.iter().find(|s| !s.starts_with("subnet-")) {
            return Err(invalid(
                "subnetId",
                format!("`{bad}` is not a subnet id (subnet-…)"),
            ));
        }
        // FR-007. EC2 would put the instance in the VPC's default group,
        // which rarely lets SSH in: the session would fail only when its
        // SSH wait runs out.
        if self.security_group_ids.is_empty() {
            return Err(invalid(
                "securityGroupIds",
                "at least one security group is required, one that lets this machine reach the \
                 instance's SSH port; e.g. securityGroupIds: [sg-0123456789abcdef0]",
            ));
        }
        if let Some(bad) = self
            .security_group_ids
            .iter()
            .find(|s| !s.starts_with("sg-"))
        {
            return Err(invalid(
                "securityGroupIds",
                format!("`{bad}` is not a security group id (sg-…)"),
            ));
        }
        if !(1..=16_384).contains(&self.ebs_size_gb) {
            return Err(invalid("ebsSizeGb", "must be between 1 and 16384 GiB"));
        }
        if let Some(spot) = &self.spot {
            if let Some(price) = &spot.max_price
                && !price.parse::<f64>().is_ok_and(|p| p > 0.0)
            {
                return Err(invalid(
                    "spotMaxPrice",
                    format!("`{price}` is not a positive price"),
                ));
            }
            if spot.request_timeout.is_zero() {
                return Err(invalid("spotRequestTimeout", "must be longer than zero"));
            }
            spot.interruption.check()?;
        }
        self.check_tags()?;
        if let Some(arn) = &self.iam_instance_profile_arn
            && !arn.starts_with("arn:")
        {
            return Err(invalid(
                "iamInstanceProfileArn",
                format!(
                    "`{arn}` is not an ARN (arn:aws:iam::ACCOUNT:instance-profile/NAME); leave the key out for none"
                ),
            ));
        }
        if let Some(user_data) = &self.user_data
            && user_data.len() > MAX_USER_DATA_BYTES
        {
            return Err(invalid(
                "userData",
                format!(
                    "is {} bytes; EC2 takes at most {MAX_USER_DATA_BYTES} (16 KiB) before base64: \
                     have it fetch a larger script instead",
                    user_data.len()
                ),
            ));
        }
        if self.ssh.user.trim().is_empty() {
            return Err(invalid("ssh.user", "must not be empty"));
        }
        if self.ssh.port == 0 {
            return Err(invalid("ssh.port", "must be 1–65535"));
        }
        if let Some(endpoint) = &self.ssh.endpoint_override
            && parse_host_port(endpoint).is_none()
        {
            return Err(invalid(
                "ssh.endpointOverride",
                format!("`{endpoint}` is not host:port (a name or IPv4 address, or [IPv6]:port)"),
            ));
        }
        if let HostKeyPolicy::Pinned(prints) = &self.ssh.host_key_policy {
            if prints.is_empty() {
                return Err(invalid(
                    "ssh.hostKeyFingerprints",
                    "pinned mode needs at least one",
                ));
            }
            if let Some(bad) = prints.iter().find(|p| !is_sha256_fingerprint(p)) {
                return Err(invalid(
                    "ssh.hostKeyFingerprints",
                    format!(
                        "`{bad}` is not an OpenSSH fingerprint: `SHA256:` and 43 base64 \
                         characters, as `ssh-keygen -lf` prints it"
                    ),
                ));
            }
        }
        if self.timeouts.running.is_zero() {
            return Err(invalid("runningTimeout", "must be longer than zero"));
        }
        if self.timeouts.ssh.is_zero() {
            return Err(invalid("sshTimeout", "must be longer than zero"));
        }
        if self.timeouts.poll_interval < Duration::from_millis(50) {
            return Err(invalid("pollInterval", "must be at least 50ms"));
        }
        if self.ssh.retries == 0 {
            return Err(invalid("ssh.retries", "must be at least 1"));
        }
        if self.ssh.retry_interval < Duration::from_millis(50) {
            return Err(invalid("ssh.retryInterval", "must be at least 50ms"));
        }
        Ok(())
    }
}

/// Splits `host:port`: a DNS name or IPv4 address, or an IPv6 address in
/// brackets (`[::1]:22`). Anything else (a scheme, a path, a bare IPv6
/// address) is refused here rather than at connect time, after a launch.
pub fn parse_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().ok()?.to_string(),
        None if is_dns_name(host) => host.to_string(),
        None => return None,
    };
    Some((host, port))
}

/// Letters, digits and hyphens in dot-separated labels (IPv4 addresses too).
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `SHA256:` and the 43 unpadded base64 characters of a SHA-256 digest.
fn is_sha256_fingerprint(text: &str) -> bool {
    text.strip_prefix("SHA256:").is_some_and(|digest| {
        digest.len() == 43
            && digest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
    })
}

/// Durations stored as whole milliseconds, so the JSON is readable and exact.
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
pub(crate) mod sample {
    use super::*;

    /// A valid request for unit tests of pure logic.
    pub fn request() -> ProvisionRequest {
        ProvisionRequest {
            ami: AmiSelector::Id("ami-12345678".into()),
            instance_type: "t3.micro".into(),
            subnet_ids: vec!["subnet-aaaa".into(), "subnet-bbbb".into()],
            security_group_ids: vec!["sg-1234".into()],
            key_pair: KeyPairMode::Temporary {
                algorithm: KeyAlgorithm::Ed25519,
            },
            ebs_size_gb: 20,
            user_data: None,
            spot: Some(SpotPolicy {
                max_price: None,
                fallback_to_on_demand: true,
                request_timeout: Duration::from_secs(300),
                interruption: InterruptionPolicy::default(),
            }),
            tags: BTreeMap::new(),
            enforce_imds_v2: true,
            iam_instance_profile_arn: None,
            ssh: SshSettings {
                user: "ec2-user".into(),
                port: 22,
                endpoint_override: None,
                host_key_policy: HostKeyPolicy::Console,
                retries: DEFAULT_SSH_RETRIES,
                retry_interval: DEFAULT_SSH_RETRY_INTERVAL,
                address: SshAddress::Auto,
            },
            timeouts: Timeouts::default(),
            status_checks: StatusCheckMode::Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An OS alias picks the image for the instance type's CPU: Graviton
    /// types get arm64 images, every other type x86_64.
    #[test]
    fn graviton_types_get_arm64_images() {
        for arm in [
            "t4g.micro",
            "a1.large",
            "c7gn.xlarge",
            "m6gd.large",
            "im4gn.large",
            "is4gen.large",
            "hpc7g.4xlarge",
            "x2gd.medium",
            "c8g.large",
        ] {
            assert_eq!(Arch::of_instance_type(arm), Arch::Arm64, "{arm}");
        }
        for x86 in [
            "t3.micro",
            "g5.xlarge",
            "g4dn.xlarge",
            "m5zn.large",
            "c5n.large",
            "p4d.24xlarge",
            "inf2.xlarge",
            "mac1.metal",
            "u-6tb1.metal",
            "m7i-flex.large",
        ] {
            assert_eq!(Arch::of_instance_type(x86), Arch::X86_64, "{x86}");
        }
        let (_, arm) = OsAlias::Ubuntu2204.image_filter(Arch::Arm64);
        assert!(arm.contains("arm64") && !arm.contains("amd64"), "{arm}");
        for alias in [
            OsAlias::AmazonLinux2,
            OsAlias::Ubuntu2204,
            OsAlias::Debian11,
        ] {
            assert_ne!(
                alias.image_filter(Arch::Arm64),
                alias.image_filter(Arch::X86_64)
            );
        }
    }

    #[test]
    fn sample_request_is_valid() {
        assert_eq!(sample::request().check(), Ok(()));
    }

    #[test]
    fn each_impossible_value_names_its_key() {
        type Spoil = Box<dyn Fn(&mut ProvisionRequest)>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "amiId",
                Box::new(|r| r.ami = AmiSelector::Id("centos".into())),
            ),
            ("instanceType", Box::new(|r| r.instance_type = " ".into())),
            ("subnetId", Box::new(|r| r.subnet_ids.clear())),
            (
                "subnetId",
                Box::new(|r| r.subnet_ids = vec!["vpc-1".into()]),
            ),
            (
                "securityGroupIds",
                Box::new(|r| r.security_group_ids = vec!["x".into()]),
            ),
            ("ebsSizeGb", Box::new(|r| r.ebs_size_gb = 0)),
            (
                "spotMaxPrice",
                Box::new(|r| {
                    if let Some(s) = r.spot.as_mut() {
                        s.max_price = Some("-1".into())
                    }
                }),
            ),
            (
                "tags",
                Box::new(|r| {
                    r.tags.insert("acode-session-id".into(), "x".into());
                }),
            ),
            ("ssh.port", Box::new(|r| r.ssh.port = 0)),
            (
                "ssh.endpointOverride",
                Box::new(|r| r.ssh.endpoint_override = Some("nohost".into())),
            ),
            (
                "ssh.hostKeyFingerprints",
                Box::new(|r| r.ssh.host_key_policy = HostKeyPolicy::Pinned(vec!["MD5:aa".into()])),
            ),
            (
                "pollInterval",
                Box::new(|r| r.timeouts.poll_interval = Duration::from_millis(1)),
            ),
            ("ssh.retries", Box::new(|r| r.ssh.retries = 0)),
            (
                "ssh.retryInterval",
                Box::new(|r| r.ssh.retry_interval = Duration::ZERO),
            ),
        ];
        for (key, spoil) in cases {
            let mut request = sample::request();
            spoil(&mut request);
            let err = request.check().expect_err(key);
            assert_eq!(err.key, key, "{err}");
        }
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            parse_host_port("127.0.0.1:2222"),
            Some(("127.0.0.1".into(), 2222))
        );
        assert_eq!(parse_host_port("[::1]:22"), Some(("::1".into(), 22)));
        assert_eq!(
            parse_host_port("bastion.example.com:2222"),
            Some(("bastion.example.com".into(), 2222))
        );
        for bad in [
            "host",
            "host:0",
            ":22",
            "http://h:22",
            "a:b:22",
            "::1:22",
            "[not-v6]:22",
            "h/x:22",
            "h st:22",
            "-h:22",
        ] {
            assert_eq!(parse_host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn fingerprints_must_be_whole_sha256_digests() {
        let good = "SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8";
        assert!(is_sha256_fingerprint(good));
        for bad in [
            "SHA256:x",
            "SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8=",
            "MD5:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8",
            "SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5S_8",
        ] {
            assert!(!is_sha256_fingerprint(bad), "{bad}");
        }
    }
}
