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

/// How long one probe may take, connect to login, unless the effects are
/// told otherwise ([`super::AwsEffects::with_probe_timeout`]).
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

/// One probe, given up after `timeout` (a server that accepts and never
/// says a word is not ready, not a hang).
pub async fn probe(guard: ConnectGuard, probe: Probe<'_>, timeout: Duration) -> Input {
    match tokio::time::timeout(timeout, probe_once(guard, probe, timeout)).await {
        Ok(input) => input,
        Err(_) => not_ready(format!(
            "no SSH answer from {} within {timeout:?}",
            probe.endpoint
        )),
    }
}

/// A login that worked, against a host key that was trusted first.
struct LoggedIn {
    session: client::Handle<HostKeyCheck>,
    host_key: Presented,
}

async fn probe_once(guard: ConnectGuard, probe: Probe<'_>, timeout: Duration) -> Input {
    let logged_in = match log_in(guard, probe, timeout).await {
        Ok(logged_in) => logged_in,
        Err(why) => return why,
    };
    // Closing politely is best effort: the verdict is already known.
    let _ = logged_in
        .session
        .disconnect(russh::Disconnect::ByApplication, "probe done", "en")
        .await;
    Input::SshReady {
        host_key_fingerprint: logged_in.host_key.fingerprint,
        host_key: logged_in.host_key.key,
    }
}

/// Connects where the guard allows, checks the host key, logs in; or the
/// input that says why not (never an attempt against an untrusted key).
async fn log_in(
    guard: ConnectGuard,
    probe: Probe<'_>,
    inactivity: Duration,
) -> Result<LoggedIn, Input> {
    let Probe {
        endpoint,
        user,
        private_key_path,
        trusted,
    } = probe;
    let Some((host, port)) = parse_host_port(endpoint) else {
        return Err(Input::Rejected {
            code: LocalRefusal::SshEndpoint.into(),
            message: format!("`{endpoint}` is not host:port"),
        });
    };
    if let Err(refused) = guard.check_host(&host) {
        return Err(Input::Rejected {
            code: LocalRefusal::LoopbackOnly.into(),
            message: refused.to_string(),
        });
    }
    let addrs = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(addrs) => addrs.collect::<Vec<_>>(),
        Err(e) => return Err(not_ready(format!("cannot resolve {host}: {e}"))),
    };
    let mut last_error = format!("{endpoint} resolved to no address");
    let mut stream = None;
    for addr in addrs {
        if let Err(refused) = guard.check(addr) {
            return Err(Input::Rejected {
                code: LocalRefusal::LoopbackOnly.into(),
                message: refused.to_string(),
            });
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
        return Err(not_ready(last_error));
    };
    let presented = Arc::new(Mutex::new(None));
    let check = HostKeyCheck {
        trusted: trusted.cloned(),
        presented: Arc::clone(&presented),
    };
    let config = Arc::new(client::Config {
        inactivity_timeout: Some(inactivity),
        ..Default::default()
    });
    let mut session = match client::connect_stream(config, stream, check).await {
        Ok(session) => session,
        Err(e) => {
            let seen = presented.lock().ok().and_then(|p| p.clone());
            return Err(match (seen, trusted) {
                (Some(seen), Some(t)) if !t.0.contains(&seen.fingerprint) => {
                    Input::HostKeyMismatch {
                        presented: seen.fingerprint,
                    }
                }
                _ => not_ready(format!("SSH handshake with {endpoint} failed: {e}")),
            });
        }
    };
    let Some(host_key) = presented.lock().ok().and_then(|p| p.clone()) else {
        return Err(not_ready(format!("{endpoint} presented no host key")));
    };
    let Some(path) = private_key_path else {
        return Err(Input::Rejected {
            code: LocalRefusal::SshKey.into(),
            message: "no private key path to log in with".into(),
        });
    };
    let key = match russh::keys::load_secret_key(path, None) {
        Ok(key) => Arc::new(key),
        Err(e) => {
            return Err(Input::Rejected {
                code: LocalRefusal::SshKey.into(),
                message: format!("cannot load private key {path}: {e}"),
            });
        }
    };
    let hash = match session.best_supported_rsa_hash().await {
        Ok(hash) => hash.flatten(),
        Err(_) => Some(HashAlg::Sha256),
    };
    match session
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
        .await
    {
        Ok(AuthResult::Success) => Ok(LoggedIn { session, host_key }),
        // cloud-init may not have installed the key yet: keep polling.
        Ok(AuthResult::Failure { .. }) => Err(not_ready(format!(
            "{endpoint} refused the key for user {user} (not installed yet?)"
        ))),
        Err(e) => Err(not_ready(format!("SSH login to {endpoint} failed: {e}"))),
    }
}

/// What a command run over SSH did. Its output is kept only for the
/// caller to parse, never logged.
#[derive(Debug)]
pub struct CommandRun {
    /// `None` when the server sent no exit status (killed by a signal).
    pub exit_status: Option<u32>,
    /// Standard output, at most [`OUTPUT_LIMIT`] bytes.
    pub stdout: Vec<u8>,
}

/// Output past this is dropped: the commands run here answer in a line.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// Why a command over SSH did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum SshCommandError {
    /// The login the command needs did not happen (the host key is checked
    /// first, as for a readiness probe).
    #[error("cannot log in: {reason}")]
    Login { reason: String },
    #[error("cannot open an SSH channel: {0}; the server may limit sessions, try again")]
    Channel(#[source] russh::Error),
    #[error("cannot start the command: {0}; the server refused to run it, check its sshd_config")]
    Exec(#[source] russh::Error),
    #[error("did not finish within {0:?}; the host may be overloaded, try again")]
    TimedOut(Duration),
}

/// Runs `command` on the host at `probe.endpoint` after the same checks as
/// a probe (the host key must be trusted before logging in), within
/// `timeout`; or why it could not run.
pub async fn run_command(
    guard: ConnectGuard,
    probe: Probe<'_>,
    command: &str,
    timeout: Duration,
) -> Result<CommandRun, SshCommandError> {
    let run = async {
        let logged_in = log_in(guard, probe, timeout.min(PROBE_TIMEOUT))
            .await
            .map_err(|why| SshCommandError::Login {
                reason: refusal(&why),
            })?;
        let session = &logged_in.session;
        let mut channel = session
            .channel_open_session()
            .await
            .map_err(SshCommandError::Channel)?;
        channel
            .exec(true, command)
            .await
            .map_err(SshCommandError::Exec)?;
        let mut run = CommandRun {
            exit_status: None,
            stdout: Vec::new(),
        };
        while let Some(message) = channel.wait().await {
            match message {
                russh::ChannelMsg::Data { data } => {
                    let room = OUTPUT_LIMIT.saturating_sub(run.stdout.len());
                    run.stdout.extend(data.iter().take(room));
                }
                russh::ChannelMsg::ExitStatus { exit_status } => {
                    run.exit_status = Some(exit_status);
                }
                _ => {}
            }
        }
        let _ = session
            .disconnect(russh::Disconnect::ByApplication, "command done", "en")
            .await;
        Ok(run)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(outcome) => outcome,
        Err(_) => Err(SshCommandError::TimedOut(timeout)),
    }
}

/// Why a login did not happen, in words.
fn refusal(input: &Input) -> String {
    match input {
        Input::SshNotReady { reason } => reason.clone(),
        Input::HostKeyMismatch { presented } => {
            format!("the host presented {presented}, not the key verified at readiness")
        }
        Input::Rejected { message, .. } => message.clone(),
        other => format!("{:?}", other.kind()),
    }
}
