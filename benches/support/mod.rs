//! What the checkpoint benches share: a session parked in WaitingForRunning,
//! the checkpoint one poll of it commits, and the bare-SQLite floor.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use acode_ec2::machine::{
    self, Input, KeyPairHandle, LaunchedInstance, ProvisionPhase, SessionContext, SessionState,
    Timestamp, WaitingForRunning,
};
use acode_ec2::store::{Checkpoint, Intent};

pub const NOW: Timestamp = Timestamp(1_700_000_000_000);

pub fn context(session_id: &str) -> SessionContext {
    let yaml = "ec2Target:\n  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n  useSpot: true\n";
    SessionContext {
        session_id: session_id.into(),
        request: acode_ec2::config::parse(yaml).expect("bench config"),
        key_dir: "/tmp/acode-bench-keys".into(),
        replaces: None,
    }
}

pub fn waiting_for_running(ctx: &SessionContext) -> SessionState {
    SessionState::fresh(ProvisionPhase::WaitingForRunning(WaitingForRunning {
        instance: LaunchedInstance {
            instance_id: "i-0123456789abcdef0".into(),
            key: KeyPairHandle {
                key_name: ctx.owned_key_name(),
                owned: true,
                private_key_path: Some(ctx.owned_key_path()),
                owns_key_file: true,
            },
            was_spot: true,
            launched_at: Some(NOW),
            zone: None,
            spot_request: None,
            savings: None,
        },
        deadline: NOW.plus(Duration::from_secs(300)),
        on_demand_fallback: None,
    }))
}

/// What one "still pending" poll commits: its outcome, the unchanged phase
/// and the intent of the next poll.
pub fn poll_checkpoint(ctx: &SessionContext) -> Checkpoint {
    let state = waiting_for_running(ctx);
    let step = machine::step(
        ctx,
        &state,
        Input::InstancePending { spot_request: None },
        NOW,
    )
    .expect("step");
    Checkpoint {
        outcome: Some(Input::InstancePending { spot_request: None }),
        state: step.state,
        intent: step.effect.map(|effect| Intent {
            effect,
            not_before: step.wake_at,
        }),
    }
}

/// The physical floor: one single-row insert + commit with the durability
/// settings acode-ec2 ships (WAL, synchronous=FULL).
pub struct Floor {
    conn: Connection,
    next: i64,
}

impl Floor {
    pub fn open(path: &Path) -> Floor {
        let conn = Connection::open(path).expect("floor db");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.pragma_update(None, "synchronous", "FULL")
            .expect("sync");
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .expect("table");
        Floor { conn, next: 0 }
    }

    pub fn commit(&mut self) {
        self.next += 1;
        self.conn
            .prepare_cached("INSERT INTO t (k, v) VALUES (?1, 'x')")
            .expect("prepare")
            .execute([self.next])
            .expect("insert");
    }
}
