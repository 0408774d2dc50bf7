//! Helpers shared by the integration tests.

use std::sync::Arc;
use std::time::Duration;

use acode_ec2::driver::{Engine, EngineOptions};
use acode_ec2::effects::Effects;
use acode_ec2::request::ProvisionRequest;
use acode_ec2::store::{LeaseHolder, SqliteStore};

/// A lease holder whose process has exited: what a `kill -9` leaves behind.
pub fn dead_holder() -> LeaseHolder {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn `true`");
    let pid = child.id();
    child.wait().expect("reap `true`");
    LeaseHolder {
        owner_id: format!("dead-{pid}"),
        pid,
        host: acode_ec2::store::this_host(),
    }
}

/// A request from YAML, so tests read like the user's config files.
pub fn request(yaml_body: &str) -> ProvisionRequest {
    let text = format!("ec2Target:\n{yaml_body}");
    acode_ec2::config::parse(&text)
        .unwrap_or_else(|e| panic!("test config does not parse: {e}\n{text}"))
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub store: Arc<SqliteStore>,
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).expect("open store"));
        Harness { dir, store }
    }

    pub fn key_dir(&self) -> String {
        self.dir.path().join("keys").to_string_lossy().into_owned()
    }

    pub fn engine<E: Effects>(&self, effects: Arc<E>) -> Engine<E> {
        Engine::new(
            effects,
            self.store.clone(),
            EngineOptions {
                key_dir: self.key_dir(),
                lease_ttl: Duration::from_secs(30),
            },
        )
    }
}
