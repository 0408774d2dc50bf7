//! Many sessions from one config in one process, through the library:
//! `Engine::provision_many` with one progress line per session, then a
//! summary. The sessions share the engine's EC2 rate limits, batched polls
//! and validation answers, and its one lease heartbeat.
//!
//! ```sh
//! cargo run --example fleet -- CONFIG.yaml COUNT [STATE_DB]
//! ```
//!
//! Region, credentials and endpoint come from the AWS SDK's chain, as for
//! the CLI (`scripts/demo.sh` shows the lab's settings).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use acode_ec2::driver::{Engine, EngineOptions};
use acode_ec2::effects::AwsEffects;
use acode_ec2::events::ProvisionProgress;
use acode_ec2::net_guard::ConnectGuard;
use acode_ec2::store::SqliteStore;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, count, rest @ ..] = args.as_slice() else {
        bail!("usage: fleet CONFIG.yaml COUNT [STATE_DB]");
    };
    let count: usize = count.parse().context("COUNT must be a number")?;
    let db = rest.first().map_or("fleet-state.db", String::as_str);
    let request = acode_ec2::config::load(std::path::Path::new(config))?;
    let effects = AwsEffects::from_environment(ConnectGuard::from_env()).await?;
    let store = Arc::new(SqliteStore::open(std::path::Path::new(db))?);
    let engine = Engine::new(
        Arc::new(effects),
        store,
        EngineOptions {
            key_dir: "fleet-keys".into(),
            lease_ttl: Duration::from_secs(30),
        },
    );
    // One line per session whenever its phase changes.
    let last_phase = Mutex::new(HashMap::new());
    let progress = |p: &ProvisionProgress| {
        let mut seen = last_phase.lock().unwrap_or_else(|e| e.into_inner());
        if seen.insert(p.session_id.clone(), p.phase) != Some(p.phase) {
            let short = p.session_id.get(..8).unwrap_or(&p.session_id);
            eprintln!("[{:>6.1}s] {short} {}", p.elapsed.as_secs_f64(), p.phase);
        }
    };
    let results = engine.provision_many(request, count, &progress).await;
    let mut ready = 0;
    for result in &results {
        match result {
            Ok(instance) => {
                ready += 1;
                println!("{} Ready: {}", instance.session_id, instance.ssh_command());
            }
            Err(e) => println!("{e}"),
        }
    }
    println!("{ready} of {count} sessions Ready");
    if ready < count {
        bail!("{} session(s) failed", count - ready);
    }
    Ok(())
}
