//! EC2 error codes, parsed once into a type, and the one place that says
//! what each kind of code means for a session.
//!
//! Invariant: no other module matches code strings; an effect asks
//! [`AwsErrorCode::class`] (or compares variants). Refusals the engine makes
//! itself are [`LocalRefusal`]s and never wear an AWS-looking code.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use strum::{EnumString, IntoStaticStr};

/// An error code EC2 answered with. Codes the engine treats specially are
/// variants; any other is kept as it came.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EnumString, IntoStaticStr)]
pub enum AwsErrorCode {
    // Throttling and server trouble (with the codes the AWS SDK's standard
    // retries treat as throttling or transient, so that retrying them
    // here rather than in the SDK retries the same ones).
    RequestLimitExceeded,
    Throttling,
    ThrottlingException,
    ThrottledException,
    RequestThrottled,
    RequestThrottledException,
    #[strum(serialize = "EC2ThrottledException")]
    Ec2ThrottledException,
    BandwidthLimitExceeded,
    PriorRequestNotComplete,
    SlowDown,
    TooManyRequestsException,
    RequestTimeout,
    RequestTimeoutException,
    InternalError,
    InternalFailure,
    ServiceUnavailable,
    Unavailable,
    // No capacity for this attempt.
    InsufficientInstanceCapacity,
    InsufficientFreeAddressesInSubnet,
    InsufficientCapacity,
    SpotMaxPriceTooLow,
    /// The instance this attempt's token launched is gone.
    IdempotentInstanceTerminated,
    /// The instance type (or another setting) is not offered in this AZ.
    Unsupported,
    // Account quotas (vCPU based): another subnet will not help.
    VcpuLimitExceeded,
    InstanceLimitExceeded,
    MaxSpotInstanceCountExceeded,
    // Something named does not exist (or is not visible yet).
    #[strum(serialize = "InvalidInstanceID.NotFound")]
    InvalidInstanceIdNotFound,
    #[strum(serialize = "InvalidKeyPair.NotFound")]
    InvalidKeyPairNotFound,
    #[strum(serialize = "InvalidAMIID.NotFound")]
    InvalidAmiIdNotFound,
    #[strum(serialize = "InvalidSubnetID.NotFound")]
    InvalidSubnetIdNotFound,
    #[strum(serialize = "InvalidGroup.NotFound")]
    InvalidGroupNotFound,
    #[strum(serialize = "InvalidSpotInstanceRequestID.NotFound")]
    InvalidSpotInstanceRequestIdNotFound,
    // Refusals.
    #[strum(serialize = "InvalidKeyPair.Duplicate")]
    InvalidKeyPairDuplicate,
    #[strum(serialize = "InvalidAMIID.Malformed")]
    InvalidAmiIdMalformed,
    IdempotentParameterMismatch,
    UnauthorizedOperation,
    /// The credentials were not accepted (unknown, expired, signed wrong).
    AuthFailure,
    UnsupportedOperation,
    InvalidParameterValue,
    /// A dry run that would have succeeded.
    DryRunOperation,
    /// Any code not listed above.
    #[strum(default)]
    Other(String),
}

/// What a kind of failure means for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// May pass: throttling, 5xx, network. Retry later.
    Transient,
    /// No capacity for this attempt: another subnet, capacity type or later may work.
    Capacity,
    /// An account quota is reached: no subnet will help.
    Quota,
    /// What the call names does not exist (or, right after a create, is not visible yet).
    NotFound,
    /// The request cannot succeed as asked.
    Rejected,
}

/// The throttling codes, as one pattern: `is_throttle` and `class` both
/// match them, and the match in `class` stays exhaustive.
macro_rules! throttle_codes {
    () => {
        RequestLimitExceeded
            | Throttling
            | ThrottlingException
            | ThrottledException
            | RequestThrottled
            | RequestThrottledException
            | Ec2ThrottledException
            | BandwidthLimitExceeded
            | SlowDown
            | TooManyRequestsException
    };
}

impl AwsErrorCode {
    pub fn parse(code: &str) -> AwsErrorCode {
        // `#[strum(default)]` makes parsing infallible.
        AwsErrorCode::from_str(code).unwrap_or_else(|_| AwsErrorCode::Other(code.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            AwsErrorCode::Other(code) => code,
            known => known.into(),
        }
    }

    /// A throttle: EC2 refused the call before acting on it.
    pub fn is_throttle(&self) -> bool {
        use AwsErrorCode::*;
        matches!(self, throttle_codes!())
    }

    /// The class of an error EC2 answered with this code and HTTP status.
    pub fn class(&self, http_status: u16) -> ErrorClass {
        use AwsErrorCode::*;
        match self {
            throttle_codes!()
            | PriorRequestNotComplete
            | RequestTimeout
            | RequestTimeoutException
            | InternalError
            | InternalFailure
            | ServiceUnavailable
            | Unavailable => ErrorClass::Transient,
            InsufficientInstanceCapacity
            | InsufficientFreeAddressesInSubnet
            | InsufficientCapacity
            | SpotMaxPriceTooLow
            | IdempotentInstanceTerminated
            | Unsupported => ErrorClass::Capacity,
            VcpuLimitExceeded | InstanceLimitExceeded | MaxSpotInstanceCountExceeded => {
                ErrorClass::Quota
            }
            InvalidInstanceIdNotFound
            | InvalidKeyPairNotFound
            | InvalidAmiIdNotFound
            | InvalidSubnetIdNotFound
            | InvalidGroupNotFound
            | InvalidSpotInstanceRequestIdNotFound => ErrorClass::NotFound,
            InvalidKeyPairDuplicate
            | InvalidAmiIdMalformed
            | IdempotentParameterMismatch
            | UnauthorizedOperation
            | AuthFailure
            | UnsupportedOperation
            | InvalidParameterValue
            | DryRunOperation => ErrorClass::Rejected,
            Other(_) if (500..600).contains(&http_status) => ErrorClass::Transient,
            Other(_) => ErrorClass::Rejected,
        }
    }
}

impl fmt::Display for AwsErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal the engine makes itself, before or without asking AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumString, IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "kebab-case")]
pub enum LocalRefusal {
    /// A private key file cannot be read, written or removed.
    KeyFile,
    /// A key pair could not be generated locally.
    KeyGeneration,
    /// The SSH endpoint is not `host:port`.
    SshEndpoint,
    /// No usable private key to log in with.
    SshKey,
    /// The loopback guard refused an address.
    LoopbackOnly,
    /// No image matches the OS alias in this region.
    NoImageForAlias,
    /// EC2 listed no image for the AMI id.
    ImageNotFound,
    /// An existing key pair named in the config does not exist.
    KeyPairMissing,
}

/// Why a step was refused: EC2's code, or the engine's own reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RejectionCode {
    Aws(AwsErrorCode),
    /// AWS refused with an HTTP error that carried no code.
    NoCode,
    Local(LocalRefusal),
}

/// How [`RejectionCode::NoCode`] is written.
const NO_CODE: &str = "no-code";

impl RejectionCode {
    pub fn aws(&self) -> Option<&AwsErrorCode> {
        match self {
            RejectionCode::Aws(code) => Some(code),
            RejectionCode::NoCode | RejectionCode::Local(_) => None,
        }
    }
}

impl fmt::Display for RejectionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectionCode::Aws(code) => f.write_str(code.as_str()),
            RejectionCode::NoCode => f.write_str(NO_CODE),
            RejectionCode::Local(refusal) => f.write_str(refusal.into()),
        }
    }
}

impl From<AwsErrorCode> for RejectionCode {
    fn from(code: AwsErrorCode) -> RejectionCode {
        RejectionCode::Aws(code)
    }
}

impl From<LocalRefusal> for RejectionCode {
    fn from(refusal: LocalRefusal) -> RejectionCode {
        RejectionCode::Local(refusal)
    }
}

// Stored as the plain string (as event logs written before codes were typed
// hold them): AWS codes are CamelCase, local refusals kebab-case.
impl Serialize for AwsErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AwsErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| AwsErrorCode::parse(&s))
    }
}

impl Serialize for RejectionCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RejectionCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match LocalRefusal::from_str(&text) {
            Ok(local) => RejectionCode::Local(local),
            Err(_) if text == NO_CODE => RejectionCode::NoCode,
            Err(_) => RejectionCode::Aws(AwsErrorCode::parse(&text)),
        })
    }
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    #[test]
    fn codes_round_trip_through_their_text() {
        for text in [
            "InvalidAMIID.NotFound",
            "RequestLimitExceeded",
            "EC2ThrottledException",
            "VcpuLimitExceeded",
            "SomethingNew",
        ] {
            assert_eq!(AwsErrorCode::parse(text).as_str(), text);
        }
        assert_eq!(
            AwsErrorCode::parse("InvalidInstanceID.NotFound"),
            AwsErrorCode::InvalidInstanceIdNotFound
        );
    }

    #[test]
    fn classes_follow_the_code_then_the_http_status() {
        let class = |code: &str, status| AwsErrorCode::parse(code).class(status);
        assert_eq!(class("RequestLimitExceeded", 503), ErrorClass::Transient);
        // A 4xx the SDK's standard retries would have retried.
        assert_eq!(class("EC2ThrottledException", 400), ErrorClass::Transient);
        assert_eq!(class("RequestTimeout", 400), ErrorClass::Transient);
        assert_eq!(
            class("InsufficientInstanceCapacity", 500),
            ErrorClass::Capacity
        );
        assert_eq!(class("VcpuLimitExceeded", 400), ErrorClass::Quota);
        assert_eq!(class("InvalidGroup.NotFound", 400), ErrorClass::NotFound);
        assert_eq!(class("UnauthorizedOperation", 403), ErrorClass::Rejected);
        assert_eq!(class("Brand.New", 502), ErrorClass::Transient);
        assert_eq!(class("Brand.New", 400), ErrorClass::Rejected);
    }

    #[test]
    fn local_refusals_never_look_like_aws_codes_and_round_trip() {
        for refusal in LocalRefusal::iter() {
            let code = RejectionCode::Local(refusal);
            let text = code.to_string();
            assert!(
                text.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{text}"
            );
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(serde_json::from_str::<RejectionCode>(&json).unwrap(), code);
        }
        let aws: RejectionCode = serde_json::from_str("\"InvalidAMIID.NotFound\"").unwrap();
        assert_eq!(aws, RejectionCode::Aws(AwsErrorCode::InvalidAmiIdNotFound));
    }
}
