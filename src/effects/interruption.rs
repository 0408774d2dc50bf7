//! Spot interruptions (FR-032–035): reading EC2's two-minute notice for a
//! Ready spot instance, and running the shutdown command inside it.
//!
//! Invariants: the notice is read first from the instance's own metadata
//! service (IMDSv2, asked over the session's SSH connection, which trusts
//! only the host key verified at readiness), and from the EC2 API when SSH
//! is down; a check never decides anything, it reports a notice, quiet, or
//! why it could not tell. The engine itself connects only where the
//! loopback guard allows: the metadata address is reached from the instance.

use std::time::Duration;

use aws_sdk_ec2::primitives::{DateTime, DateTimeFormat};

use super::api::{Ec2Api, Ec2Failure, InstanceState};
use super::placement::PlacementSources;
use super::ssh::{self, Probe};
use crate::machine::{
    ConsoleFingerprints, Input, InterruptionNotice, Ready, SessionContext, Timestamp,
};
use crate::net_guard::ConnectGuard;

/// How long one look at the metadata service over SSH may take.
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// What EC2 promises between a notice and its action.
pub const NOTICE_WINDOW: Duration = Duration::from_secs(120);

/// What one look found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterruptionCheck {
    Noticed(InterruptionNotice),
    /// No notice, as `via` says.
    Quiet {
        via: &'static str,
    },
    /// Neither the metadata service nor the EC2 API could say.
    Unknown(String),
}

/// The SSH login of a Ready session, trusting only its verified host key.
fn login<'a>(
    ctx: &'a SessionContext,
    ready: &'a Ready,
    trusted: &'a ConsoleFingerprints,
) -> Probe<'a> {
    Probe {
        endpoint: &ready.ssh_endpoint,
        user: &ctx.request.ssh.user,
        private_key_path: ready.instance.key.private_key_path.as_deref(),
        trusted: Some(trusted),
    }
}

/// Runs the shutdown command, ending by `deadline` (wall clock): how it
/// went, in a line that carries no output (it may hold anything).
pub async fn run_shutdown_command(
    guard: ConnectGuard,
    probe: Probe<'_>,
    command: &str,
    deadline: Timestamp,
    now: Timestamp,
) -> Input {
    let left = Duration::from_millis(now.millis_until(deadline));
    let outcome = if left.is_zero() {
        "not run: the notice time was too close".to_string()
    } else {
        match ssh::run_command(guard, probe, command, left).await {
            Ok(run) => match run.exit_status {
                Some(0) => "exited 0".to_string(),
                Some(code) => format!("exited {code}"),
                None => "ended without an exit status".to_string(),
            },
            Err(why) => format!("could not run: {why}"),
        }
    };
    Input::ShutdownCommandFinished { outcome }
}

/// Looks for a notice: the instance's metadata over SSH first, then the
/// EC2 API. A notice also marks the zone short of spot for a while, so a
/// replacement goes elsewhere (or on demand).
pub async fn check(
    api: &impl Ec2Api,
    guard: ConnectGuard,
    sources: &PlacementSources,
    ctx: &SessionContext,
    ready: &Ready,
) -> InterruptionCheck {
    let now = sources.clock.now();
    let check = match from_metadata(guard, ctx, ready, now).await {
        Ok(found) => found,
        Err(ssh_down) => match from_api(api, ready, now).await {
            Ok(found) => found,
            Err(api_down) => InterruptionCheck::Unknown(format!(
                "metadata over SSH: {ssh_down}; EC2 API: {api_down}"
            )),
        },
    };
    if let (InterruptionCheck::Noticed(_), Some(zone)) = (&check, &ready.instance.zone) {
        let instance_type = &ctx.request.instance_type;
        sources.shortages.note(instance_type, zone, true, now);
    }
    check
}

/// Why one way of looking for a notice gave no answer; the check then
/// tries the other way, and reports both when neither answers.
#[derive(Debug, thiserror::Error)]
pub enum NoticeQueryError {
    #[error("the session is not a spot session, so it gets no notices")]
    NotSpot,
    #[error("instance id {0:?} is not an EC2 id; the session's record is damaged")]
    NotAnInstanceId(String),
    #[error(transparent)]
    Ssh(#[from] ssh::SshCommandError),
    #[error(
        "the metadata query on the instance exited {0:?}; curl must be installed there and \
         the metadata service reachable (IMDS enabled, hop limit ≥ 1)"
    )]
    QueryExited(Option<u32>),
    #[error("instance-action is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("the metadata service answered HTTP {0:?}")]
    MetadataStatus(String),
    #[error(transparent)]
    Api(#[from] Ec2Failure),
}

/// IMDSv2 asked from the instance: a token, then `spot/instance-action`
/// (404: no notice). The instance id goes along as `X-Acode-Instance-Id`,
/// which EC2's metadata service ignores and the lab answers by.
async fn from_metadata(
    guard: ConnectGuard,
    ctx: &SessionContext,
    ready: &Ready,
    now: Timestamp,
) -> Result<InterruptionCheck, NoticeQueryError> {
    let Some(policy) = ctx.request.spot.as_ref().map(|s| &s.interruption) else {
        return Err(NoticeQueryError::NotSpot);
    };
    let id = &ready.instance.instance_id;
    // Both go into a command line: only what EC2 ids and the checked URL hold.
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(NoticeQueryError::NotAnInstanceId(id.clone()));
    }
    let url = policy.metadata_url.trim_end_matches('/');
    // Quoted, and `-g` so curl does not glob an IPv6 literal's brackets;
    // `-f` so an error page is never taken for a token.
    let command = format!(
        "t=$(curl -sSfg -m 3 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
         -H 'X-Acode-Instance-Id: {id}' '{url}/latest/api/token') || exit 97; \
         curl -sSg -m 3 -w '\\n%{{http_code}}' -H \"X-aws-ec2-metadata-token: $t\" \
         -H 'X-Acode-Instance-Id: {id}' '{url}/latest/meta-data/spot/instance-action'"
    );
    let trusted = ConsoleFingerprints(vec![ready.host_key_fingerprint.clone()]);
    let run = ssh::run_command(
        guard,
        login(ctx, ready, &trusted),
        &command,
        METADATA_TIMEOUT,
    )
    .await?;
    if run.exit_status != Some(0) {
        return Err(NoticeQueryError::QueryExited(run.exit_status));
    }
    parse_instance_action(&String::from_utf8_lossy(&run.stdout), now)
}

/// The answer printed as `BODY\nHTTP_CODE`.
fn parse_instance_action(out: &str, now: Timestamp) -> Result<InterruptionCheck, NoticeQueryError> {
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    match code.trim() {
        "404" => Ok(InterruptionCheck::Quiet {
            via: "instance metadata",
        }),
        "200" => {
            let doc: serde_json::Value =
                serde_json::from_str(body.trim()).map_err(NoticeQueryError::NotJson)?;
            let action = doc["action"].as_str().unwrap_or("terminate").to_string();
            let at = doc["time"]
                .as_str()
                .and_then(|t| DateTime::from_str(t, DateTimeFormat::DateTime).ok())
                .and_then(|t| u64::try_from(t.to_millis().ok()?).ok())
                .map_or(now.plus(NOTICE_WINDOW), Timestamp);
            Ok(InterruptionCheck::Noticed(InterruptionNotice {
                action,
                at,
                source: "the instance's metadata service".into(),
            }))
        }
        other => Err(NoticeQueryError::MetadataStatus(other.to_string())),
    }
}

/// The EC2 API's view: the spot request's status code, then the instance state.
async fn from_api(
    api: &impl Ec2Api,
    ready: &Ready,
    now: Timestamp,
) -> Result<InterruptionCheck, NoticeQueryError> {
    let notice = |action: &str, at: Timestamp, source: String| {
        InterruptionCheck::Noticed(InterruptionNotice {
            action: action.to_string(),
            at,
            source,
        })
    };
    if let Some(request) = &ready.instance.spot_request {
        let view = api.spot_request(&request.request_id).await?;
        let code = view.and_then(|v| v.status.status_code).unwrap_or_default();
        let source = format!("the EC2 API (spot request status {code})");
        // EC2 may skip `marked-for-…` and go straight to `instance-…-by-…`.
        if let Some(action) = code.strip_prefix("marked-for-") {
            let action = match action {
                "termination" => "terminate",
                "hibernation" => "hibernate",
                other => other,
            };
            return Ok(notice(action, now.plus(NOTICE_WINDOW), source));
        }
        if code.starts_with("instance-terminated-") || code.starts_with("instance-stopped-") {
            return Ok(notice("terminate", now, source));
        }
    }
    let id = &ready.instance.instance_id;
    let view = api.describe_instance(id).await?;
    match view.map(|v| v.state) {
        Some(InstanceState::Running | InstanceState::Pending) => {
            Ok(InterruptionCheck::Quiet { via: "EC2 API" })
        }
        Some(state) => Ok(notice(
            "terminate",
            now,
            format!("the EC2 API (instance {})", state.as_str()),
        )),
        None => Ok(notice(
            "terminate",
            now,
            "the EC2 API (instance no longer listed)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_action_answers_are_read_and_garbage_is_refused() {
        let now = Timestamp(1_000);
        assert!(matches!(
            parse_instance_action("\n404", now),
            Ok(InterruptionCheck::Quiet {
                via: "instance metadata"
            })
        ));
        let found = parse_instance_action(
            "{\"action\": \"stop\", \"time\": \"2026-11-26T10:00:00Z\"}\n200",
            now,
        );
        let Ok(InterruptionCheck::Noticed(notice)) = found else {
            panic!("{found:?}")
        };
        assert_eq!(notice.action, "stop");
        assert_eq!(notice.at, Timestamp(1_795_687_200_000));
        assert!(matches!(
            parse_instance_action("not json\n200", now),
            Err(NoticeQueryError::NotJson(_))
        ));
        assert!(matches!(
            parse_instance_action("<html>\n500", now),
            Err(NoticeQueryError::MetadataStatus(code)) if code == "500"
        ));
        assert!(matches!(
            parse_instance_action("", now),
            Err(NoticeQueryError::MetadataStatus(code)) if code.is_empty()
        ));
    }
}
