//! The EC2 effects: each runs calls on an [`Ec2Api`] and reports what EC2
//! said as a machine [`Input`].
//!
//! Invariant: facts, not conclusions. A NotFound is reported as
//! `InstanceNotFound`, an empty sweep as `NoInstanceFound`; whether that
//! means "gone" or "not visible yet" is the machine's call. Re-running an
//! effect is safe: RunInstances carries the recorded `ClientToken`, and
//! deletes and terminates of what is gone change nothing.

use super::api::{Ec2Api, Ec2Failure, InstanceState, InstanceView, LaunchSpec};
use super::{console, guidance, known_hosts};
use crate::error_code::{AwsErrorCode, ErrorClass, LocalRefusal, RejectionCode};
use crate::machine::{
    CheckState, ClientToken, ImageChoice, Input, SessionContext, StatusReport, Timestamp,
};
use crate::request::{AmiSelector, Arch, SESSION_TAG};

/// `acode=true`, the session id, the creation time and the caller's tags.
pub fn session_tags(ctx: &SessionContext, created: Timestamp) -> Vec<(String, String)> {
    let mut tags = vec![
        ("acode".to_string(), "true".to_string()),
        (SESSION_TAG.to_string(), ctx.session_id.clone()),
        ("acode-timestamp".to_string(), created.0.to_string()),
    ];
    tags.extend(ctx.request.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
    tags
}

/// The input for a failed call whose NotFound is not expected. A denied
/// call says how to find out why and what policy is needed.
pub fn failed(failure: Ec2Failure) -> Input {
    let message = guidance::for_caller(&failure).unwrap_or_else(|| failure.message.clone());
    match failure.class {
        ErrorClass::Transient => Input::TransientFailure {
            message: failure.to_string(),
        },
        ErrorClass::Capacity | ErrorClass::Quota | ErrorClass::NotFound | ErrorClass::Rejected => {
            Input::Rejected {
                code: failure.code.map_or(RejectionCode::NoCode, Into::into),
                message,
            }
        }
    }
}

/// A refusal with its guidance as the message.
fn guided(failure: Ec2Failure, message: String) -> Input {
    match failure.class {
        ErrorClass::Transient => failed(failure),
        _ => Input::Rejected {
            code: failure.code.map_or(RejectionCode::NoCode, Into::into),
            message,
        },
    }
}

fn local(refusal: LocalRefusal, message: impl Into<String>) -> Input {
    Input::Rejected {
        code: refusal.into(),
        message: message.into(),
    }
}

/// Checks, before anything is created, that the image, subnets and
/// security groups exist; a missing one is refused with what does exist.
pub async fn validate(api: &impl Ec2Api, ctx: &SessionContext) -> Input {
    let request = &ctx.request;
    let arch = Arch::of_instance_type(&request.instance_type);
    let image = match api.find_image(&request.ami, arch).await {
        Ok(Some(image)) => image,
        Ok(None) => {
            let refusal = match &request.ami {
                AmiSelector::Id(_) => LocalRefusal::ImageNotFound,
                AmiSelector::Alias(_) => LocalRefusal::NoImageForAlias,
            };
            let why = "DescribeImages listed none";
            return local(
                refusal,
                guidance::missing_image(api, &request.ami, arch, why).await,
            );
        }
        Err(failure) if is_missing_image(&failure) => {
            let text = guidance::missing_image(api, &request.ami, arch, &failure.to_string()).await;
            return guided(failure, text);
        }
        Err(failure) => return failed(failure),
    };
    let subnets = match api.describe_subnets(&request.subnet_ids).await {
        Ok(subnets) => subnets,
        Err(failure) if failure.class == ErrorClass::NotFound => {
            let why = failure.to_string();
            let text = guidance::missing_subnets(api, &request.subnet_ids, &why).await;
            return guided(failure, text);
        }
        Err(failure) => return failed(failure),
    };
    let subnet_of = |id: &String| subnets.iter().find(|s| &s.id == id);
    let zones = request
        .subnet_ids
        .iter()
        .map(|id| subnet_of(id).map(|s| s.zone.clone()).unwrap_or_default())
        .collect();
    let zone_ids = request
        .subnet_ids
        .iter()
        .map(|id| subnet_of(id).map(|s| s.zone_id.clone()).unwrap_or_default())
        .collect();
    if let Err(failure) = api.check_security_groups(&request.security_group_ids).await {
        if failure.class != ErrorClass::NotFound {
            return failed(failure);
        }
        let vpc = subnets.first().map(|s| s.vpc.as_str());
        let why = failure.to_string();
        let text = guidance::missing_groups(api, &request.security_group_ids, vpc, &why).await;
        return guided(failure, text);
    }
    Input::Validated {
        image,
        zones,
        zone_ids,
    }
}

fn is_missing_image(failure: &Ec2Failure) -> bool {
    failure.class == ErrorClass::NotFound || failure.is(&AwsErrorCode::InvalidAmiIdMalformed)
}

/// What RunInstance needs beside the session.
pub struct Launch<'a> {
    pub client_token: &'a ClientToken,
    pub spot: bool,
    pub subnet_id: &'a str,
    pub image: &'a ImageChoice,
    pub key_name: &'a str,
}

pub async fn run_instance(
    api: &impl Ec2Api,
    ctx: &SessionContext,
    created: Timestamp,
    launch: Launch<'_>,
) -> Input {
    let tags = session_tags(ctx, created);
    let spec = LaunchSpec {
        request: &ctx.request,
        client_token: launch.client_token.as_str(),
        spot: launch.spot,
        subnet_id: launch.subnet_id,
        image: launch.image,
        key_name: Some(launch.key_name),
        tags: &tags,
        dry_run: false,
    };
    match api.run_instance(spec).await {
        Ok(launched) => Input::Launched {
            instance_id: launched.instance_id,
            was_spot: launch.spot,
            spot_request_id: launched.spot_request_id,
        },
        // The session made (or checked) its key pair moments ago: EC2 being
        // eventually consistent, RunInstances may not see it yet.
        Err(failure) if failure.is(&AwsErrorCode::InvalidKeyPairNotFound) => {
            Input::TransientFailure {
                message: format!("{failure}; the key pair may not be visible yet"),
            }
        }
        Err(failure) => match (failure.class, failure.code.clone()) {
            (ErrorClass::Capacity, Some(code)) => Input::CapacityUnavailable {
                code,
                message: failure.message,
            },
            (ErrorClass::Quota, Some(code)) => Input::QuotaExceeded {
                message: guidance::quota(&code, &failure.message, launch.spot, &api.region()),
                code,
            },
            (ErrorClass::Transient, _) => failed(failure),
            _ => {
                // Proof that this launch made nothing: EC2's own refusal
                // (an error code, not a foreign page), no try before it
                // lost its answer, and not a token EC2 says it has seen.
                let proves_nothing = !failure.answer_lost_before
                    && failure.code.is_some()
                    && !failure.is(&AwsErrorCode::IdempotentParameterMismatch);
                match failed(failure) {
                    Input::Rejected { code, message } if proves_nothing => {
                        Input::LaunchRefused { code, message }
                    }
                    other => other,
                }
            }
        },
    }
}

/// What DescribeInstances said of the instance, with its spot request's
/// status when it has one.
pub async fn describe_instance(
    api: &impl Ec2Api,
    instance_id: &str,
    spot_request_id: Option<&str>,
) -> Input {
    match api.describe_instance(instance_id).await {
        Ok(Some(view)) => {
            let mut input = instance_input(view);
            if let Some(request_id) = spot_request_id {
                let status = spot_request_status(api, request_id).await;
                if let Input::InstancePending { spot_request }
                | Input::InstanceRunning { spot_request, .. } = &mut input
                {
                    *spot_request = status;
                }
            }
            input
        }
        // Absent from a filtered answer, or NotFound by id: EC2 does not
        // show it (yet).
        Ok(None) => Input::InstanceNotVisible,
        Err(failure) if failure.class == ErrorClass::NotFound => Input::InstanceNotVisible,
        Err(failure) => failed(failure),
    }
}

/// The spot request's status, for the record. It only informs (the
/// instance's own state decides), so a failed look is logged and skipped.
async fn spot_request_status(
    api: &impl Ec2Api,
    request_id: &str,
) -> Option<Box<crate::machine::SpotRequestStatus>> {
    match api.spot_request(request_id).await {
        Ok(view) => view.map(|v| Box::new(v.status)),
        Err(failure) => {
            tracing::debug!(%failure, request_id, "spot request status not read");
            None
        }
    }
}

fn instance_input(view: InstanceView) -> Input {
    match view.state {
        InstanceState::Running => Input::InstanceRunning {
            public_ip: view.public_ip,
            private_ip: view.private_ip,
            spot_request: None,
        },
        InstanceState::Pending => Input::InstancePending { spot_request: None },
        other => Input::InstanceGone {
            state: other.as_str().to_string(),
        },
    }
}

/// What EC2's status checks say; an instance not listed yet (or not
/// known yet) is reported as such, not as a failure.
pub async fn describe_instance_status(api: &impl Ec2Api, instance_id: &str) -> Input {
    let not_reported = StatusReport {
        system: CheckState::NotReported,
        instance: CheckState::NotReported,
    };
    match api.instance_status(instance_id).await {
        Ok(Some(health)) => match health.state {
            InstanceState::Pending | InstanceState::Running => Input::StatusChecksReported {
                report: health.report,
            },
            // Reclaimed (spot) or stopped by someone else: it will not be Ready.
            gone => Input::InstanceGone {
                state: gone.as_str().to_string(),
            },
        },
        Ok(None) => Input::StatusChecksReported {
            report: not_reported,
        },
        Err(failure) if failure.class == ErrorClass::NotFound => Input::StatusChecksReported {
            report: not_reported,
        },
        Err(failure) => failed(failure),
    }
}

/// The host keys cloud-init printed. `Latest=true` gives live output but
/// only on Nitro types; older (Xen) types refuse it, so a refusal is asked
/// again for the buffered output, which is all they have.
pub async fn read_console_host_keys(api: &impl Ec2Api, instance_id: &str) -> Input {
    let output = match api.console_output(instance_id, true).await {
        Err(failure) if failure.class == ErrorClass::Rejected => {
            api.console_output(instance_id, false).await
        }
        other => other,
    };
    match output {
        Ok(Some(text)) => match console::host_key_fingerprints(&text) {
            Some(fingerprints) => Input::ConsoleHostKeys { fingerprints },
            None => Input::ConsoleNotReady,
        },
        Ok(None) => Input::ConsoleNotReady,
        Err(failure) if failure.class == ErrorClass::NotFound => Input::ConsoleNotReady,
        Err(failure) => failed(failure),
    }
}

/// Terminates the instance, and any other live instance tagged with this
/// session: all of them when the id is unknown (a launch whose answer was
/// lost), and a second line of defence otherwise. Tags are set at creation,
/// so a launched instance always carries them.
///
/// Cleanup must not give up, so every failure here is reported as
/// transient; NotFound for the known id is `InstanceNotFound` unless the
/// sweep lists it as live (then EC2 is behind, and it is retried), and a
/// sweep without an id that finds nothing is `NoInstanceFound`.
pub async fn terminate(
    api: &impl Ec2Api,
    ctx: &SessionContext,
    instance_id: Option<&str>,
) -> Input {
    let mut ids: Vec<String> = instance_id.map(str::to_string).into_iter().collect();
    let listed_live = match api.live_instances_of_session(&ctx.session_id).await {
        Ok(tagged) => tagged,
        Err(failure) => {
            // The instance on record need not wait for the sweep (while
            // DescribeInstances fails it would wait forever): it goes now,
            // and the next try sweeps.
            if let Some(id) = instance_id
                && let Err(e) = api.terminate_instance(id).await
                && e.class != ErrorClass::NotFound
            {
                return keep_trying(e);
            }
            return keep_trying(failure);
        }
    };
    for id in &listed_live {
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    if ids.is_empty() {
        return Input::NoInstanceFound;
    }
    if instance_id.is_none() {
        // An instance whose launch answer was lost: the sweep earned its keep.
        metrics::counter!(crate::telemetry::ORPHAN_SWEEPS_FOUND).increment(1);
    }
    let mut known_not_found = false;
    for id in ids {
        match api.terminate_instance(&id).await {
            Ok(()) => {}
            Err(failure) if failure.class == ErrorClass::NotFound => {
                if instance_id == Some(id.as_str()) && !listed_live.contains(&id) {
                    known_not_found = true;
                } else {
                    // The sweep just listed it as live: EC2 has not caught up,
                    // and "not found" must not end the cleanup of a live instance.
                    return Input::TransientFailure {
                        message: format!(
                            "{failure}; instance {id} is tagged with this session and listed \
                             as live, so it is not visible to TerminateInstances yet"
                        ),
                    };
                }
            }
            Err(failure) => return keep_trying(failure),
        }
    }
    // The instance's host key is trusted no more; an instance EC2 no longer
    // knows is gone as surely as a terminated one.
    if let Err(e) = known_hosts::remove(&ctx.known_hosts_path()) {
        return Input::TransientFailure {
            message: format!("cannot remove {}: {e}", ctx.known_hosts_path()),
        };
    }
    if known_not_found {
        return Input::InstanceNotFound;
    }
    Input::InstanceTerminated
}

/// Cancels a spot request, then reads which instance it produced (one may
/// have been fulfilled as the cancel went in). A request EC2 no longer
/// knows is as good as cancelled. Failures are transient: the machine
/// retries, then cleans up.
pub async fn cancel_spot_request(api: &impl Ec2Api, request_id: &str) -> Input {
    let state = match api.cancel_spot_request(request_id).await {
        Ok(state) => state,
        Err(failure) if failure.class == ErrorClass::NotFound => None,
        Err(failure) => return keep_trying(failure),
    };
    let instance_id = match api.spot_request(request_id).await {
        Ok(view) => view.and_then(|v| v.instance_id),
        Err(failure) => return keep_trying(failure),
    };
    Input::SpotRequestCancelled { state, instance_id }
}

/// Cleanup retries whatever went wrong (a missing permission may be fixed).
fn keep_trying(failure: Ec2Failure) -> Input {
    Input::TransientFailure {
        message: failure.to_string(),
    }
}
