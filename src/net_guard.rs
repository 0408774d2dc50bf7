//! The loopback guard: when on, every connection the engine opens must go to
//! 127.0.0.0/8 or ::1, so tests and the lab demo can never reach the fake
//! public IPs the EC2 emulator hands out, nor the metadata address.
//!
//! Invariant: with the guard on, the engine resolves only loopback names,
//! checks every address, and connects only to checked addresses; an AWS
//! endpoint that is not loopback, or a credential chain that could reach
//! the network (metadata, STS, SSO, container credentials), is refused
//! before any client is built, and the client is pinned to the checked
//! endpoint and the environment's static credentials.

use std::net::SocketAddr;

/// Environment switch for the guard (`1` = loopback only).
pub const LOOPBACK_ONLY_ENV: &str = "ACODE_EC2_LOOPBACK_ONLY";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error(
        "refused to connect to {addr}: {LOOPBACK_ONLY_ENV}=1 allows loopback addresses only; \
         point ssh.endpointOverride at the lab's sshd"
    )]
    NotLoopback { addr: SocketAddr },
    #[error(
        "refused to resolve {host:?}: {LOOPBACK_ONLY_ENV}=1 allows only loopback addresses and `localhost` \
         (a name lookup alone may leave the machine)"
    )]
    NotLoopbackHost { host: String },
    #[error(
        "refused to build an AWS client: {LOOPBACK_ONLY_ENV}=1 needs static test credentials in \
         AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (other credential sources reach STS, SSO or \
         a credentials endpoint)"
    )]
    StaticCredentialsMissing,
    #[error(
        "refused AWS endpoint {}: {LOOPBACK_ONLY_ENV}=1 needs AWS_ENDPOINT_URL_EC2 (or AWS_ENDPOINT_URL) \
         set to a loopback URL such as http://127.0.0.1:PORT",
        endpoint.as_deref().unwrap_or("(none set)")
    )]
    AwsEndpointNotLoopback { endpoint: Option<String> },
    #[error(
        "refused to build an AWS client: {LOOPBACK_ONLY_ENV}=1 needs AWS_EC2_METADATA_DISABLED=true so the \
         credential chain never probes 169.254.169.254"
    )]
    MetadataNotDisabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectGuard {
    loopback_only: bool,
}

impl ConnectGuard {
    pub fn loopback_only() -> ConnectGuard {
        ConnectGuard {
            loopback_only: true,
        }
    }

    pub fn open() -> ConnectGuard {
        ConnectGuard {
            loopback_only: false,
        }
    }

    /// On when `ACODE_EC2_LOOPBACK_ONLY=1`.
    pub fn from_env() -> ConnectGuard {
        ConnectGuard {
            loopback_only: std::env::var(LOOPBACK_ONLY_ENV).is_ok_and(|v| v == "1"),
        }
    }

    pub fn is_loopback_only(self) -> bool {
        self.loopback_only
    }

    pub fn check(self, addr: SocketAddr) -> Result<(), GuardError> {
        if self.loopback_only && !addr.ip().is_loopback() {
            return Err(GuardError::NotLoopback { addr });
        }
        Ok(())
    }

    /// Checked before a name is looked up: with the guard on, only a
    /// loopback address or `localhost` may be resolved at all.
    pub fn check_host(self, host: &str) -> Result<(), GuardError> {
        if self.loopback_only && !is_loopback_host(host) {
            return Err(GuardError::NotLoopbackHost {
                host: host.to_string(),
            });
        }
        Ok(())
    }

    /// Checks the AWS settings in the environment, the way the AWS SDK will
    /// read them. With the guard on, gives the loopback endpoint that the
    /// client must be pinned to; `None` with the guard off.
    pub fn check_aws_environment(self) -> Result<Option<String>, GuardError> {
        if !self.loopback_only {
            return Ok(None);
        }
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        if !std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Err(GuardError::MetadataNotDisabled);
        }
        if !set("AWS_ACCESS_KEY_ID") || !set("AWS_SECRET_ACCESS_KEY") {
            return Err(GuardError::StaticCredentialsMissing);
        }
        let endpoint = std::env::var("AWS_ENDPOINT_URL_EC2")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .ok();
        match endpoint.as_deref().and_then(url_host) {
            Some(host) if is_loopback_host(host) => Ok(endpoint),
            _ => Err(GuardError::AwsEndpointNotLoopback { endpoint }),
        }
    }
}

/// The host part of `scheme://host[:port][/path]`.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    Some(authority.split(':').next().unwrap_or(authority))
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_guard_refuses_public_and_metadata_addresses() {
        let guard = ConnectGuard::loopback_only();
        for ok in ["127.0.0.1:22", "127.8.9.10:2222", "[::1]:22"] {
            assert_eq!(guard.check(ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for bad in [
            "54.12.34.56:22",
            "169.254.169.254:80",
            "10.0.0.1:22",
            "[2600::1]:22",
            "0.0.0.0:22",
        ] {
            let err = guard.check(bad.parse().unwrap()).unwrap_err();
            assert!(err.to_string().contains("loopback"), "{err}");
        }
        assert_eq!(
            ConnectGuard::open().check("54.12.34.56:22".parse().unwrap()),
            Ok(())
        );
    }

    #[test]
    fn with_the_guard_on_only_loopback_names_are_looked_up() {
        let guard = ConnectGuard::loopback_only();
        for ok in ["localhost", "127.0.0.1", "::1"] {
            assert_eq!(guard.check_host(ok), Ok(()), "{ok}");
        }
        for bad in [
            "example.com",
            "ec2-54-1-2-3.compute.amazonaws.com",
            "10.0.0.1",
        ] {
            assert!(guard.check_host(bad).is_err(), "{bad}");
        }
        assert_eq!(ConnectGuard::open().check_host("example.com"), Ok(()));
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("http://127.0.0.1:5000"), Some("127.0.0.1"));
        assert_eq!(url_host("http://[::1]:5000/x"), Some("::1"));
        assert_eq!(
            url_host("https://ec2.us-east-1.amazonaws.com"),
            Some("ec2.us-east-1.amazonaws.com")
        );
        assert_eq!(url_host("nonsense"), None);
        assert!(is_loopback_host("localhost"));
        assert!(!is_loopback_host("ec2.us-east-1.amazonaws.com"));
    }
}
