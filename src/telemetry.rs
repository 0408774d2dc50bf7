//! Metric names and the one place EC2 calls are logged and counted
//! (NFR-007, NFR-008). Metrics go through the `metrics` facade: without a
//! recorder they cost next to nothing, and a long-lived agent installs its
//! own; the CLI installs a Prometheus one on request.
//!
//! Invariant: labels carry actions, phases, codes and outcomes, never ids
//! of sessions or instances (unbounded cardinality) and never key material.

use std::time::Duration;

use tracing::info;

use crate::error_code::AwsErrorCode;

/// EC2 calls, by `action` and `result` (`ok` or the error code).
pub const EC2_CALLS: &str = "acode_ec2_ec2_calls_total";
/// EC2 call latency in seconds, by `action`.
pub const EC2_CALL_SECONDS: &str = "acode_ec2_ec2_call_seconds";
/// Calls EC2 throttled, by `action`.
pub const THROTTLES: &str = "acode_ec2_throttles_total";
/// Session creation to settling, in seconds, by `outcome` (ready, failed,
/// torn_down) and `capacity` (spot, on_demand).
pub const TIME_TO_SETTLE_SECONDS: &str = "acode_ec2_time_to_settle_seconds";
/// Time spent in a phase, in seconds, by `phase` and `capacity`.
pub const PHASE_SECONDS: &str = "acode_ec2_phase_seconds";
/// Transient failures retried, by `phase`.
pub const RETRIES: &str = "acode_ec2_retries_total";
pub const SPOT_FALLBACKS: &str = "acode_ec2_spot_fallbacks_total";
pub const SUBNET_FAILOVERS: &str = "acode_ec2_subnet_failovers_total";
/// Tag sweeps (after a launch whose answer was lost) that found an instance.
pub const ORPHAN_SWEEPS_FOUND: &str = "acode_ec2_orphan_sweeps_found_total";
/// Sessions this process is driving or holds Ready, by `phase`.
pub const SESSIONS: &str = "acode_ec2_sessions";
/// Seconds calls waited for a token of this process's EC2 buckets, by `family`.
pub const RATE_LIMIT_WAIT_SECONDS: &str = "acode_ec2_rate_limit_wait_seconds";

/// Histogram buckets (upper bounds, seconds) for each histogram above, sized
/// to what it measures: a recorder given them exports histograms, which
/// Prometheus can sum across hosts (quantile summaries cannot be).
pub const HISTOGRAM_BUCKETS: &[(&str, &[f64])] = &[
    (
        EC2_CALL_SECONDS,
        &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0],
    ),
    (
        TIME_TO_SETTLE_SECONDS,
        &[
            5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0,
        ],
    ),
    (
        PHASE_SECONDS,
        &[
            0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ],
    ),
    (
        RATE_LIMIT_WAIT_SECONDS,
        &[0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
    ),
];

/// How a call ended, for its log line and counters.
pub enum CallResult<'a> {
    Ok,
    /// EC2 answered with this code.
    Code(&'a AwsErrorCode),
    /// No code: a timeout, a dropped connection, an HTTP error without one.
    NoCode,
}

/// Logs and counts one EC2 call.
pub fn ec2_call(
    action: &'static str,
    elapsed: Duration,
    request_id: Option<&str>,
    result: CallResult<'_>,
) {
    let duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let (label, code) = match &result {
        CallResult::Ok => ("ok".to_string(), None),
        CallResult::Code(code) => (code.as_str().to_string(), Some(*code)),
        CallResult::NoCode => ("no-code".to_string(), None),
    };
    info!(
        target: "acode_ec2::ec2",
        action,
        duration_ms,
        request_id = request_id.unwrap_or(""),
        error_code = if label == "ok" { "" } else { label.as_str() },
        "EC2 call"
    );
    metrics::counter!(EC2_CALLS, "action" => action, "result" => label).increment(1);
    metrics::histogram!(EC2_CALL_SECONDS, "action" => action).record(elapsed.as_secs_f64());
    if code.is_some_and(|code| {
        matches!(
            code,
            AwsErrorCode::RequestLimitExceeded
                | AwsErrorCode::Throttling
                | AwsErrorCode::ThrottlingException
        )
    }) {
        metrics::counter!(THROTTLES, "action" => action).increment(1);
    }
}

/// Records a wait for a rate-limit token (see [`crate::effects::rate_limit`]).
pub fn rate_limit_wait(family: &'static str, wait: Duration) {
    metrics::histogram!(RATE_LIMIT_WAIT_SECONDS, "family" => family).record(wait.as_secs_f64());
}
