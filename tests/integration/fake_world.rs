//! A scripted EC2 world for crash tests of the driver's pure logic: it keeps
//! EC2's idempotency rules (same token, same instance) and counts what was
//! created, so a test can show a crash never yields a second instance. The
//! same properties are checked against the real lab in `lab_engine.rs`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use acode_ec2::effects::Effects;
use acode_ec2::machine::{
    ConsoleFingerprints, Effect, Input, KeyPairHandle, SessionContext, Timestamp,
};

#[derive(Debug, Default)]
pub struct WorldState {
    /// token → (instance id, terminated)
    pub instances: BTreeMap<String, (String, bool)>,
    pub key_pairs: BTreeMap<String, ()>,
    pub run_instance_tokens: Vec<String>,
    pub calls: Vec<&'static str>,
    /// While set, TerminateInstances fails as a missing permission would.
    pub terminate_refused: bool,
}

#[derive(Default)]
pub struct FakeWorld {
    pub state: Mutex<WorldState>,
}

impl FakeWorld {
    pub fn live_instances(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .instances
            .values()
            .filter(|(_, gone)| !gone)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn instances_ever(&self) -> usize {
        self.state.lock().unwrap().instances.len()
    }
}

impl Effects for FakeWorld {
    async fn run(&self, ctx: &SessionContext, _created: Timestamp, effect: &Effect) -> Input {
        let mut world = self.state.lock().unwrap();
        world.calls.push(effect.name());
        match effect {
            Effect::ValidateRequest => Input::Validated {
                image: acode_ec2::machine::ImageChoice {
                    ami_id: "ami-0123".into(),
                    root_device_name: Some("/dev/xvda".into()),
                },
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
                    },
                }
            }
            Effect::RunInstance {
                client_token, spot, ..
            } => {
                world.run_instance_tokens.push(client_token.to_string());
                let next_id = format!("i-{:04}", world.instances.len() + 1);
                let (id, terminated) = world
                    .instances
                    .entry(client_token.to_string())
                    .or_insert((next_id, false))
                    .clone();
                if terminated {
                    return Input::CapacityUnavailable {
                        code: "IdempotentInstanceTerminated".into(),
                        message: "terminated".into(),
                    };
                }
                Input::Launched {
                    instance_id: id,
                    was_spot: *spot,
                }
            }
            Effect::DescribeInstance { .. } => Input::InstanceRunning {
                public_ip: Some("54.0.0.1".into()),
                private_ip: None,
            },
            Effect::ReadConsoleHostKeys { .. } => Input::ConsoleHostKeys {
                fingerprints: ConsoleFingerprints(vec!["SHA256:fake".into()]),
            },
            Effect::ProbeSsh { .. } => Input::SshReady {
                host_key_fingerprint: "SHA256:fake".into(),
            },
            Effect::TerminateInstance { .. } if world.terminate_refused => {
                Input::TransientFailure {
                    message: "UnauthorizedOperation: not allowed to terminate".into(),
                }
            }
            Effect::TerminateInstance { instance_id, .. } => {
                // Like the real effect: the known id, and everything tagged
                // with the session (here: everything).
                for (id, gone) in world.instances.values_mut() {
                    if instance_id.is_none() || instance_id.as_deref() == Some(id.as_str()) {
                        *gone = true;
                    }
                }
                Input::InstanceTerminated
            }
            Effect::DeleteKeyPair { key_name, .. } => {
                world.key_pairs.remove(key_name);
                Input::KeyPairDeleted
            }
        }
    }
}
