//! Side effects behind one small trait: EC2, SSH, key files.
//!
//! Invariant: an effect never fails the driver; every error becomes an
//! [`Input`] the machine understands (rejected, transient, not ready, …),
//! and running the same effect twice has the same result.

pub mod console;
pub mod describe_batch;
pub mod ec2;
pub mod keys;
pub mod ssh;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;

use crate::machine::{Effect, Input, SessionContext, Timestamp};
use crate::net_guard::{ConnectGuard, GuardError};
use describe_batch::{BatchWindow, DescribeBatcher};

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
}

/// The wall clock, read only by the driver, never by the machine.
pub fn now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    Timestamp(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// The real effects: aws-sdk-ec2 for EC2, russh for SSH. Clones share one
/// DescribeInstances batcher, so sessions driven together poll together.
#[derive(Clone)]
pub struct AwsEffects {
    ec2: aws_sdk_ec2::Client,
    guard: ConnectGuard,
    describe: Arc<DescribeBatcher>,
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
        AwsEffects {
            describe: DescribeBatcher::new(ec2.clone(), window),
            ec2,
            guard,
        }
    }

    /// Builds a client from the AWS SDK's own chain (`AWS_REGION`,
    /// `AWS_PROFILE`, `AWS_ENDPOINT_URL_EC2`, …), with the SDK's standard
    /// retries for throttling and 5xx, after the loopback guard agrees.
    /// With the guard on, the client is pinned to the checked loopback
    /// endpoint and to the environment's static credentials, whatever
    /// profiles or other settings say.
    pub async fn from_environment(guard: ConnectGuard) -> Result<AwsEffects, GuardError> {
        let pinned_endpoint = guard.check_aws_environment()?;
        // Bounded calls: an effect must finish well within the session lease
        // (30 s), so a hung connection cannot hold a session forever.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(8))
            .operation_timeout(Duration::from_secs(20))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(4))
            .timeout_config(timeouts);
        if let Some(endpoint) = pinned_endpoint {
            loader = loader.endpoint_url(endpoint).credentials_provider(
                aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
            );
        }
        let config = loader.load().await;
        Ok(AwsEffects::new(aws_sdk_ec2::Client::new(&config), guard))
    }

    pub fn client(&self) -> &aws_sdk_ec2::Client {
        &self.ec2
    }
}

impl Effects for AwsEffects {
    async fn run(&self, ctx: &SessionContext, created: Timestamp, effect: &Effect) -> Input {
        let ec2 = &self.ec2;
        match effect {
            Effect::ValidateRequest => ec2::validate(ec2, &ctx.request).await,
            Effect::EnsureKeyPair {
                key_name,
                private_key_path,
            } => keys::ensure(ec2, ctx, created, key_name, private_key_path.as_deref()).await,
            Effect::RunInstance {
                client_token,
                spot,
                subnet_id,
                image,
                key_name,
            } => {
                let launch = ec2::Launch {
                    client_token,
                    spot: *spot,
                    subnet_id,
                    image,
                    key_name,
                };
                ec2::run_instance(ec2, ctx, created, launch).await
            }
            Effect::DescribeInstance { instance_id } => self.describe.describe(instance_id).await,
            Effect::ReadConsoleHostKeys { instance_id } => {
                ec2::read_console_host_keys(ec2, instance_id).await
            }
            Effect::ProbeSsh {
                endpoint,
                user,
                private_key_path,
                trusted,
            } => {
                ssh::probe(
                    self.guard,
                    endpoint,
                    user,
                    private_key_path.as_deref(),
                    trusted.as_ref(),
                )
                .await
            }
            Effect::TerminateInstance {
                instance_id,
                launched_at,
            } => ec2::terminate(ec2, ctx, instance_id.as_deref(), *launched_at).await,
            Effect::DeleteKeyPair {
                key_name,
                private_key_path,
            } => keys::delete(ec2, key_name, private_key_path.as_deref()).await,
        }
    }
}
