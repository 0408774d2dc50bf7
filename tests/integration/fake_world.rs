//! A scripted EC2 world for crash tests of the driver's logic: it keeps
//! EC2's idempotency rules (same token, same instance) and counts what was
//! created, so a test can show a crash never yields a second instance. The
//! same properties are checked against the real lab in `lab_engine.rs`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use acode_ec2::effects::Effects;
use acode_ec2::effects::interruption::InterruptionCheck;
use acode_ec2::error_code::AwsErrorCode;
use acode_ec2::machine::{
    CheckState, ConsoleFingerprints, Effect, Input, InterruptionNotice, KeyPairHandle, Ready,
    SessionContext, StatusReport, Timestamp,
};

#[derive(Debug, Default)]
pub struct FakeInstance {
    pub id: String,
    /// The session it is tagged with.
    pub session: String,
    pub spot: bool,
    pub terminated: bool,
}

#[derive(Debug, Default)]
pub struct WorldState {
    /// token → the instance it launched
    pub instances: BTreeMap<String, FakeInstance>,
    pub key_pairs: BTreeMap<String, ()>,
    pub run_instance_tokens: Vec<String>,
    pub calls: Vec<&'static str>,
    /// While set, TerminateInstances fails as a missing permission would.
    pub terminate_refused: bool,
    /// While set, a spot instance is reclaimed before it runs.
    pub spot_reclaimed: bool,
    /// While set, SSH never answers.
    pub ssh_down: bool,
    /// The spot instance under an interruption notice, while it lives.
    pub interrupting: Option<String>,
    /// Shutdown commands run (on any instance).
    pub shutdown_runs: u32,
}

#[derive(Default)]
pub struct FakeWorld {
    pub state: Mutex<WorldState>,
    /// While a test holds it, RunInstances has acted but its answer waits.
    pub hold_launch: tokio::sync::Mutex<()>,
}

impl FakeWorld {
    pub fn live_instances(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .instances
            .values()
            .filter(|i| !i.terminated)
            .map(|i| i.id.clone())
            .collect()
    }

    pub fn instances_ever(&self) -> usize {
        self.state.lock().unwrap().instances.len()
    }

    /// How many times an effect ran.
    pub fn count(&self, effect: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.calls.iter().filter(|c| **c == effect).count()
    }
}

impl WorldState {
    fn instance(&self, id: &str) -> Option<&FakeInstance> {
        self.instances.values().find(|i| i.id == id)
    }

    fn run_instance(&mut self, session: &str, client_token: &str, spot: bool) -> Input {
        self.run_instance_tokens.push(client_token.to_string());
        let next_id = format!("i-{:04}", self.instances.len() + 1);
        let instance = self
            .instances
            .entry(client_token.to_string())
            .or_insert(FakeInstance {
                id: next_id,
                session: session.to_string(),
                spot,
                terminated: false,
            });
        if instance.terminated {
            return Input::CapacityUnavailable {
                code: AwsErrorCode::IdempotentInstanceTerminated,
                message: "terminated".into(),
            };
        }
        Input::Launched {
            instance_id: instance.id.clone(),
            was_spot: spot,
            spot_request_id: spot.then(|| format!("sir-{}", instance.id)),
        }
    }

    /// Like the real effect: the known id, and everything tagged with the
    /// session.
    fn terminate(&mut self, session: &str, instance_id: Option<&str>) -> Input {
        let known_exists = instance_id.is_none_or(|id| self.instance(id).is_some());
        let mut any = false;
        let tagged = |i: &&mut FakeInstance| !i.terminated && i.session == session;
        for instance in self.instances.values_mut().filter(tagged) {
            instance.terminated = true;
            any = true;
        }
        match instance_id {
            Some(_) if !known_exists => Input::InstanceNotFound,
            None if !any => Input::NoInstanceFound,
            _ => Input::InstanceTerminated,
        }
    }
}

impl Effects for FakeWorld {
    async fn run(&self, ctx: &SessionContext, _created: Timestamp, effect: &Effect) -> Input {
        let input = self.act(ctx, effect);
        if let Effect::RunInstance { .. } = effect {
            let _answer_may_go = self.hold_launch.lock().await;
        }
        input
    }

    async fn check_interruption(&self, _ctx: &SessionContext, ready: &Ready) -> InterruptionCheck {
        let state = self.state.lock().unwrap();
        let id = &ready.instance.instance_id;
        let live_spot = state.instance(id).is_some_and(|i| i.spot && !i.terminated);
        if state.interrupting.as_ref() == Some(id) && live_spot {
            return InterruptionCheck::Noticed(InterruptionNotice {
                action: "terminate".into(),
                // Far enough ahead for the shutdown command to be run.
                at: Timestamp(acode_ec2::clock::wall_clock().0 + 120_000),
                source: "the fake world".into(),
            });
        }
        InterruptionCheck::Quiet {
            via: "the fake world",
        }
    }
}

impl FakeWorld {
    /// What the world does and answers, at once.
    fn act(&self, ctx: &SessionContext, effect: &Effect) -> Input {
        let mut world = self.state.lock().unwrap();
        world.calls.push(effect.name());
        match effect {
            Effect::ValidateRequest => Input::Validated {
                zones: vec!["us-east-1a".into()],
                zone_ids: vec!["use1-az6".into()],
                image: acode_ec2::machine::ImageChoice {
                    ami_id: "ami-0123".into(),
                    root_device_name: Some("/dev/xvda".into()),
                    platform: None,
                },
            },
            Effect::FindPlacement { .. } => Input::PlacementFound {
                facts: Default::default(),
            },
            Effect::CancelSpotRequest { .. } => Input::SpotRequestCancelled {
                state: Some("cancelled".into()),
                instance_id: None,
            },
            Effect::EnsureKeyPair {
                key_name,
                private_key_path,
            } => {
                world.key_pairs.insert(key_name.clone(), ());
                Input::KeyPairReady {
                    key: KeyPairHandle {
                        key_name: key_name.clone(),
                        owned: ctx.request.key_pair.is_owned(),
                        private_key_path: private_key_path.clone(),
                        owns_key_file: true,
                    },
                }
            }
            Effect::RunInstance {
                client_token, spot, ..
            } => world.run_instance(&ctx.session_id, client_token.as_str(), *spot),
            Effect::DescribeInstance { instance_id, .. } => match world.instance(instance_id) {
                Some(i) if i.terminated => Input::InstanceGone {
                    state: "terminated".into(),
                },
                Some(i) if i.spot && world.spot_reclaimed => Input::InstanceGone {
                    state: "terminated".into(),
                },
                Some(_) => Input::InstanceRunning {
                    public_ip: Some("54.0.0.1".into()),
                    private_ip: None,
                    spot_request: None,
                },
                None => Input::InstanceNotVisible,
            },
            Effect::ReadConsoleHostKeys { .. } => Input::ConsoleHostKeys {
                fingerprints: ConsoleFingerprints(vec!["SHA256:fake".into()]),
            },
            Effect::ProbeSsh { .. } if world.ssh_down => Input::SshNotReady {
                reason: "connection refused".into(),
            },
            Effect::ProbeSsh { .. } => Input::SshReady {
                host_key_fingerprint: "SHA256:fake".into(),
                host_key: "ssh-ed25519 AAAAfake".into(),
            },
            Effect::DescribeInstanceStatus { .. } => Input::StatusChecksReported {
                report: StatusReport {
                    system: CheckState::Ok,
                    instance: CheckState::Ok,
                },
            },
            Effect::TerminateInstance { .. } if world.terminate_refused => {
                Input::TransientFailure {
                    message: "UnauthorizedOperation: not allowed to terminate".into(),
                }
            }
            Effect::TerminateInstance { instance_id } => {
                world.terminate(&ctx.session_id, instance_id.as_deref())
            }
            Effect::DeleteKeyPair { key_name, .. } => {
                world.key_pairs.remove(key_name);
                Input::KeyPairDeleted
            }
            Effect::RunShutdownCommand { .. } => {
                world.shutdown_runs += 1;
                Input::ShutdownCommandFinished {
                    outcome: "exited 0".into(),
                }
            }
        }
    }
}
