//! The SSH readiness probe: a real SSH handshake (russh) that only proceeds
//! when the server's host key is one we trust, then a public-key login.
//!
//! Invariant: authentication is never attempted against an untrusted host
//! key; the probe connects only to addresses the [`ConnectGuard`] allows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, AuthResult};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use crate::error_code::LocalRefusal;
use crate::machine::{ConsoleFingerprints, Input};
use crate::net_guard::ConnectGuard;
use crate::request::parse_host_port;

/// How long one probe may take, connect to login.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// The key the server presented: its fingerprint, and `algorithm base64`.
#[derive(Clone)]
struct Presented {
    fingerprint: String,
    key: String,
}

struct HostKeyCheck {
    trusted: Option<ConsoleFingerprints>,
    presented: Arc<Mutex<Option<Presented>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        let print = key.fingerprint(HashAlg::Sha256).to_string();
        let accepted = self.trusted.as_ref().is_none_or(|t| t.0.contains(&print));
        // known_hosts wants the key without its comment.
        let line = key.to_openssh().unwrap_or_default();
        let key = line
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        if let Ok(mut slot) = self.presented.lock() {
            *slot = Some(Presented {
                fingerprint: print,
                key,
            });
        }
        Ok(accepted)
    }
}

fn not_ready(reason: impl Into<String>) -> Input {
    Input::SshNotReady {
        reason: reason.into(),
    }
}

/// One SSH readiness check.
#[derive(Debug, Clone, Copy)]
pub struct Probe<'a> {
    pub endpoint: &'a str,
    pub user: &'a str,
    pub private_key_path: Option<&'a str>,
    /// `None` only under the insecure accept-any policy.
    pub trusted: Option<&'a ConsoleFingerprints>,
}

pub async fn probe(guard: ConnectGuard, probe: Probe<'_>) -> Input {
    match tokio::time::timeout(PROBE_TIMEOUT, probe_once(guard, probe)).await {
        Ok(input) => input,
        Err(_) => not_ready(format!(
            "no SSH answer from {} within {PROBE_TIMEOUT:?}",
            probe.endpoint
        )),
    }
}

async fn probe_once(guard: ConnectGuard, probe: Probe<'_>) -> Input {
    let Probe {
        endpoint,
        user,
        private_key_path,
        trusted,
    } = probe;
    let Some((host, port)) = parse_host_port(endpoint) else {
        return Input::Rejected {
            code: LocalRefusal::SshEndpoint.into(),
            message: format!("`{endpoint}` is not host:port"),
        };
    };
    if let Err(refused) = guard.check_host(&host) {
        return Input::Rejected {
            code: LocalRefusal::LoopbackOnly.into(),
            message: refused.to_string(),
        };
    }
    let addrs = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(addrs) => addrs.collect::<Vec<_>>(),
        Err(e) => return not_ready(format!("cannot resolve {host}: {e}")),
    };
    let mut last_error = format!("{endpoint} resolved to no address");
    let mut stream = None;
    for addr in addrs {
        if let Err(refused) = guard.check(addr) {
            return Input::Rejected {
                code: LocalRefusal::LoopbackOnly.into(),
                message: refused.to_string(),
            };
        }
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = format!("connect {addr}: {e}"),
        }
    }
    let Some(stream) = stream else {
        return not_ready(last_error);
    };
    let presented = Arc::new(Mutex::new(None));
    let check = HostKeyCheck {
        trusted: trusted.cloned(),
        presented: Arc::clone(&presented),
    };
    let config = Arc::new(client::Config {
        inactivity_timeout: Some(PROBE_TIMEOUT),
        ..Default::default()
    });
    let mut session = match client::connect_stream(config, stream, check).await {
        Ok(session) => session,
        Err(e) => {
            let seen = presented.lock().ok().and_then(|p| p.clone());
            return match (seen, trusted) {
                (Some(seen), Some(t)) if !t.0.contains(&seen.fingerprint) => {
                    Input::HostKeyMismatch {
                        presented: seen.fingerprint,
                    }
                }
                _ => not_ready(format!("SSH handshake with {endpoint} failed: {e}")),
            };
        }
    };
    let Some(host_key) = presented.lock().ok().and_then(|p| p.clone()) else {
        return not_ready(format!("{endpoint} presented no host key"));
    };
    let Some(path) = private_key_path else {
        return Input::Rejected {
            code: LocalRefusal::SshKey.into(),
            message: "no private key path to log in with".into(),
        };
    };
    let key = match russh::keys::load_secret_key(path, None) {
        Ok(key) => Arc::new(key),
        Err(e) => {
            return Input::Rejected {
                code: LocalRefusal::SshKey.into(),
                message: format!("cannot load private key {path}: {e}"),
            };
        }
    };
    let hash = match session.best_supported_rsa_hash().await {
        Ok(hash) => hash.flatten(),
        Err(_) => Some(HashAlg::Sha256),
    };
    let outcome = session
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
        .await;
    // Closing politely is best effort: the verdict is already known.
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "probe done", "en")
        .await;
    match outcome {
        Ok(AuthResult::Success) => Input::SshReady {
            host_key_fingerprint: host_key.fingerprint,
            host_key: host_key.key,
        },
        // cloud-init may not have installed the key yet: keep polling.
        Ok(AuthResult::Failure { .. }) => not_ready(format!(
            "{endpoint} refused the key for user {user} (not installed yet?)"
        )),
        Err(e) => not_ready(format!("SSH login to {endpoint} failed: {e}")),
    }
}
