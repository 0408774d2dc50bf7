//! Side effects behind one small trait: EC2, SSH, key files.
//!
//! Layers, bottom up: [`sdk::SdkEc2`] (aws-sdk-ec2, each call within EC2's
//! request buckets, [`rate_limit`]) ▸ [`describe_batch::Batched`] (polls
//! shared by the sessions of a process, validation and spot market answers
//! remembered for 60 s, [`remembered`]) ▸ [`AwsEffects`],
//! which maps each [`Effect`] to calls and their answers to machine inputs.
//! Beside the EC2 stack, [`placement::PlacementSources`] keeps what every
//! session of a process shares for placement (recent capacity failures,
//! on-demand prices).
//!
//! Invariant: an effect never fails the driver and never decides; every
//! answer becomes an [`Input`] that states a fact (rejected, transient, not
//! found, not ready, …), and running the same effect twice has the same
//! result.

pub mod api;
pub mod console;
pub mod describe_batch;
pub mod ec2;
pub mod guidance;
pub mod interruption;
pub mod keys;
pub mod known_hosts;
pub mod placement;
pub mod preflight;
pub mod rate_limit;
pub mod remembered;
pub mod sdk;
pub mod ssh;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;

use crate::clock::Clock;
use crate::error_code::LocalRefusal;
use crate::machine::{ConsoleFingerprints, Effect, Input, Ready, SessionContext, Timestamp};
use crate::net_guard::{ConnectGuard, GuardError};
use api::Ec2Api;
use describe_batch::{BatchWindow, Batched};
use interruption::InterruptionCheck;
use placement::{OnDemandPrices, PlacementQuery, PlacementSources};
use sdk::SdkEc2;

/// Runs effects for the driver.
pub trait Effects: Send + Sync + 'static {
    /// Runs `effect` for the session created at `created` (the creation
    /// time goes into tags, so re-runs send identical parameters).
    fn run(
        &self,
        ctx: &SessionContext,
        created: Timestamp,
        effect: &Effect,
    ) -> impl Future<Output = Input> + Send;

    /// The AWS region effects reach, for events and logs.
    fn region(&self) -> Option<String> {
        None
    }

    /// Whether EC2 has given notice of taking back the Ready spot instance
    /// (see [`interruption`]). Effects that cannot look say so.
    fn check_interruption(
        &self,
        _ctx: &SessionContext,
        _ready: &Ready,
    ) -> impl Future<Output = InterruptionCheck> + Send {
        async { InterruptionCheck::Unknown("these effects do not look for interruptions".into()) }
    }
}

/// How long one EC2 call may take, and how it is retried within that.
///
/// Invariant: a call ends (answered or failed) within `operation` of time
/// spent sending and backing off, well inside the session lease (30 s), so
/// a hung connection cannot hold a session forever; what is left to retry
/// after that, the machine retries. Time queued for a rate-limit token is
/// not counted: the queue moves at EC2's pace, not the call's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallBudget {
    /// Tries per call, the first included.
    pub attempts: u32,
    pub connect: Duration,
    /// One try, sent to answered.
    pub attempt: Duration,
    /// All tries of one call.
    pub operation: Duration,
    /// The first backoff's ceiling; later ones double it.
    pub first_backoff: Duration,
}

/// Why no AWS client could be built from the environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error(
        "no AWS region is set: set AWS_REGION (or `region` in ~/.aws/config for your profile) \
         to the region the subnets are in"
    )]
    NoRegion,
}

/// The SDK's cap on one backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(20);

impl CallBudget {
    /// What the CLI and [`AwsEffects::from_environment`] use.
    pub const STANDARD: CallBudget = CallBudget {
        attempts: 4,
        connect: Duration::from_secs(5),
        attempt: Duration::from_secs(8),
        operation: Duration::from_secs(20),
        first_backoff: Duration::from_secs(1),
    };

    /// The SDK's standard retries within this budget, for clients the SDK
    /// retries itself (the Price List); [`SdkEc2`] retries EC2 calls itself.
    pub fn retry_config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.attempts)
            .with_initial_backoff(self.first_backoff)
    }

    /// How long to back off after `tries` failed tries: "full jitter", a
    /// uniform pick below a ceiling that doubles per try (as the SDK's
    /// standard retries), so callers throttled together do not retry together.
    pub fn backoff(&self, tries: u32) -> Duration {
        let ceiling = self
            .first_backoff
            .saturating_mul(1 << tries.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        ceiling.mul_f64(fastrand::f64())
    }

    /// Connect and per-try timeouts, for a client whose tries
    /// [`SdkEc2`] sends one by one (the whole-call limit is its own).
    pub fn try_timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.attempt)
            .build()
    }

    /// Connect, per-try and whole-call timeouts, for a client the SDK
    /// retries itself (the Price List).
    pub fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.attempt)
            .operation_timeout(self.operation)
            .build()
    }
}

/// The real effects over an EC2 API stack (by default the SDK client with
/// DescribeInstances batching), russh for SSH, and key files on disk.
/// Clones share the stack, so sessions driven together poll together.
#[derive(Clone)]
pub struct AwsEffects<A = Batched<SdkEc2>> {
    api: A,
    guard: ConnectGuard,
    placement: Arc<PlacementSources>,
    probe_timeout: Duration,
}

impl AwsEffects {
    pub fn new(ec2: aws_sdk_ec2::Client, guard: ConnectGuard) -> AwsEffects {
        AwsEffects::with_batch_window(ec2, guard, BatchWindow::default())
    }

    pub fn with_batch_window(
        ec2: aws_sdk_ec2::Client,
        guard: ConnectGuard,
        window: BatchWindow,
    ) -> AwsEffects {
        AwsEffects::over(Batched::new(SdkEc2::new(ec2), window), guard)
    }

    /// Builds a client from the AWS SDK's own chain (`AWS_REGION`,
    /// `AWS_PROFILE`, `AWS_ENDPOINT_URL_EC2`, …), within
    /// [`CallBudget::STANDARD`], after the loopback guard agrees.
    /// With the guard on, the client is pinned to the checked loopback
    /// endpoint and to the environment's static credentials, whatever
    /// profiles or other settings say.
    pub async fn from_environment(guard: ConnectGuard) -> Result<AwsEffects, EnvironmentError> {
        let pinned_endpoint = guard.check_aws_environment()?;
        let budget = CallBudget::STANDARD;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(budget.retry_config())
            .timeout_config(budget.timeout_config());
        if let Some(endpoint) = pinned_endpoint {
            loader = loader.endpoint_url(endpoint).credentials_provider(
                aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
            );
        }
        let config = loader.load().await;
        // Without one, every call fails late, after a session is recorded.
        if config.region().is_none() {
            return Err(EnvironmentError::NoRegion);
        }
        // The Price List API answers in us-east-1 (and two other regions),
        // whatever region the instances are in.
        let pricing = aws_sdk_pricing::config::Builder::from(&config)
            .region(aws_config::Region::new("us-east-1"))
            .build();
        Ok(AwsEffects::new(aws_sdk_ec2::Client::new(&config), guard)
            .with_price_list(aws_sdk_pricing::Client::from_conf(pricing)))
    }
}

impl<A: Ec2Api> AwsEffects<A> {
    /// Effects over any EC2 API stack.
    pub fn over(api: A, guard: ConnectGuard) -> AwsEffects<A> {
        AwsEffects {
            api,
            guard,
            placement: Arc::new(PlacementSources::default()),
            probe_timeout: ssh::PROBE_TIMEOUT,
        }
    }

    /// How long one SSH probe may take before it counts as not ready
    /// (tests with a silent server shorten it).
    #[must_use]
    pub fn with_probe_timeout(mut self, timeout: Duration) -> AwsEffects<A> {
        self.probe_timeout = timeout;
        self
    }

    /// On-demand prices (for spot savings) from this Price List client.
    /// Call before cloning: clones share one price cache.
    #[must_use]
    pub fn with_price_list(self, client: aws_sdk_pricing::Client) -> AwsEffects<A> {
        self.with_sources(|s| s.prices = OnDemandPrices::new(Some(client)))
    }

    /// The clock recent capacity failures are dated by (a manual one in tests).
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> AwsEffects<A> {
        self.with_sources(|s| s.clock = clock)
    }

    fn with_sources(mut self, change: impl FnOnce(&mut PlacementSources)) -> AwsEffects<A> {
        // Shared already (cloned): keep what it has, as far as it can be kept.
        let mut sources = Arc::try_unwrap(self.placement).unwrap_or_else(|shared| shared.copy());
        change(&mut sources);
        self.placement = Arc::new(sources);
        self
    }

    pub fn api(&self) -> &A {
        &self.api
    }
}

impl<A: Ec2Api> Effects for AwsEffects<A> {
    fn region(&self) -> Option<String> {
        Some(self.api.region())
    }

    async fn check_interruption(&self, ctx: &SessionContext, ready: &Ready) -> InterruptionCheck {
        interruption::check(&self.api, self.guard, &self.placement, ctx, ready).await
    }

    async fn run(&self, ctx: &SessionContext, created: Timestamp, effect: &Effect) -> Input {
        let api = &self.api;
        match effect {
            Effect::ValidateRequest => ec2::validate(api, ctx).await,
            Effect::EnsureKeyPair {
                key_name,
                private_key_path,
            } => keys::ensure(api, ctx, created, key_name, private_key_path.as_deref()).await,
            Effect::FindPlacement {
                spot,
                zones,
                zone_ids,
                platform,
            } => {
                let query = PlacementQuery {
                    spot: *spot,
                    zones,
                    zone_ids,
                    platform: platform.as_deref(),
                };
                placement::find(api, &self.placement, ctx, query).await
            }
            Effect::RunInstance {
                client_token,
                spot,
                subnet_id,
                image,
                key_name,
                zone,
            } => {
                let launch = ec2::Launch {
                    client_token,
                    spot: *spot,
                    subnet_id,
                    image,
                    key_name,
                };
                let input = ec2::run_instance(api, ctx, created, launch).await;
                if let (Input::CapacityUnavailable { .. }, Some(zone)) = (&input, zone) {
                    let now = self.placement.clock.now();
                    let instance_type = &ctx.request.instance_type;
                    (self.placement.shortages).note(instance_type, zone, *spot, now);
                }
                input
            }
            Effect::DescribeInstance {
                instance_id,
                spot_request_id,
            } => ec2::describe_instance(api, instance_id, spot_request_id.as_deref()).await,
            Effect::CancelSpotRequest { request_id } => {
                ec2::cancel_spot_request(api, request_id).await
            }
            Effect::DescribeInstanceStatus { instance_id } => {
                ec2::describe_instance_status(api, instance_id).await
            }
            Effect::ReadConsoleHostKeys { instance_id } => {
                ec2::read_console_host_keys(api, instance_id).await
            }
            Effect::ProbeSsh {
                endpoint,
                user,
                private_key_path,
                trusted,
                known_hosts_path,
            } => {
                let probe = ssh::Probe {
                    endpoint,
                    user,
                    private_key_path: private_key_path.as_deref(),
                    trusted: trusted.as_ref(),
                };
                let input = ssh::probe(self.guard, probe, self.probe_timeout).await;
                if let (Input::SshReady { host_key, .. }, Some(path)) = (&input, known_hosts_path)
                    && let Err(e) = known_hosts::write(path, endpoint, host_key)
                {
                    return Input::Rejected {
                        code: LocalRefusal::KeyFile.into(),
                        message: format!(
                            "cannot write known_hosts file {path}: {e}; check the key folder and its permissions"
                        ),
                    };
                }
                input
            }
            Effect::TerminateInstance { instance_id } => {
                ec2::terminate(api, ctx, instance_id.as_deref()).await
            }
            Effect::DeleteKeyPair {
                key_name,
                private_key_path,
            } => keys::delete(api, key_name, private_key_path.as_deref()).await,
            Effect::RunShutdownCommand {
                endpoint,
                user,
                private_key_path,
                host_key_fingerprint,
                command,
                deadline,
            } => {
                let trusted = ConsoleFingerprints(vec![host_key_fingerprint.clone()]);
                let probe = ssh::Probe {
                    endpoint,
                    user,
                    private_key_path: private_key_path.as_deref(),
                    trusted: Some(&trusted),
                };
                let now = self.placement.clock.now();
                interruption::run_shutdown_command(self.guard, probe, command, *deadline, now).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_a_ceiling_that_doubles_per_try_up_to_the_cap() {
        let budget = CallBudget::STANDARD;
        for (tries, ceiling) in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 20), (40, 20)] {
            let ceiling = Duration::from_secs(ceiling);
            let picks: Vec<Duration> = (0..200).map(|_| budget.backoff(tries)).collect();
            assert!(picks.iter().all(|d| *d <= ceiling), "{tries}: {picks:?}");
            // Jittered: spread below the ceiling, not all at one point.
            assert!(picks.iter().any(|d| *d < ceiling / 2), "{tries}");
            assert!(picks.iter().any(|d| *d > ceiling / 2), "{tries}");
        }
    }
}
