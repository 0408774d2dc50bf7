//! A random `kill -9` campaign against the CLI: provisions (temporary and
//! existing key pairs, spot that falls back to on-demand), teardowns and
//! recovers killed at seeded random moments, each followed by a `recover`
//! that is let finish. After every point: no session left mid-way, none
//! with a live instance unless Ready, and then one; at the end, once every
//! Ready session is torn down: no instance, no key pair but the existing
//! one, no key file left, and no session that launched twice.
//!
//! `ACODE_KILL_POINTS` (default 200) and `ACODE_KILL_SEED` (default 1) size
//! and pick the campaign; `ACODE_KILL_WORKERS` (default 8) workers run side
//! by side, each with its own state database, against one lab.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use acode_ec2::store::{CheckpointStore, SqliteStore};

use crate::cli::{cli, cli_command};
use crate::lab::Lab;

/// xorshift64*: seeded, so a failing campaign can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What a point kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    ProvisionTemporaryKey,
    ProvisionExistingKey,
    ProvisionSpotFallingBack,
    Teardown,
    Recover,
}

struct Worker<'a> {
    lab: &'a Lab,
    db: PathBuf,
    configs: [PathBuf; 3],
}

impl Worker<'_> {
    /// The worker's sessions, read from its database (as `sessions --json`
    /// shows them, without a process per look).
    fn sessions(&self) -> Vec<Value> {
        if !self.db.exists() {
            return Vec::new();
        }
        let store = SqliteStore::open(&self.db).expect("open state db");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let list = rt.block_on(store.list()).expect("list sessions");
        list.into_iter()
            .map(|s| serde_json::to_value(s).expect("summary json"))
            .collect()
    }

    /// Starts `args`, kills it with SIGKILL after `after`; whether it was
    /// still running then.
    fn kill_after(&self, args: &[&str], after: Duration) -> bool {
        let mut child = cli_command(&self.db, Some(self.lab), args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn acode-ec2");
        let started = Instant::now();
        while started.elapsed() < after {
            if child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        true
    }

    fn recover(&self) {
        let out = cli(&self.db, Some(self.lab), &["recover"]);
        assert!(out.status.success(), "recover failed: {out:?}");
    }

    fn point(&self, rng: &mut Rng) -> (Target, bool) {
        let target = match rng.below(10) {
            0..=2 => Target::ProvisionTemporaryKey,
            3..=4 => Target::ProvisionExistingKey,
            5..=6 => Target::ProvisionSpotFallingBack,
            7..=8 => Target::Teardown,
            _ => Target::Recover,
        };
        // A provision in this lab takes about 1.5 s: kills land all over it.
        let after = Duration::from_millis(rng.below(1_600));
        let provision = |config: &Path| {
            let config = config.to_str().expect("utf-8");
            self.kill_after(&["provision", "--config", config], after)
        };
        let killed = match target {
            Target::ProvisionTemporaryKey => provision(&self.configs[0]),
            Target::ProvisionExistingKey => provision(&self.configs[1]),
            Target::ProvisionSpotFallingBack => provision(&self.configs[2]),
            Target::Teardown => {
                let ready: Vec<String> = self
                    .sessions()
                    .into_iter()
                    .filter(|s| s["phase"] == "Ready")
                    .filter_map(|s| s["session_id"].as_str().map(str::to_string))
                    .collect();
                match ready.first() {
                    Some(id) => self.kill_after(&["teardown", id], after / 3),
                    None => provision(&self.configs[0]),
                }
            }
            Target::Recover => {
                // Something to recover first: a provision killed early.
                provision(&self.configs[0]);
                self.kill_after(&["recover"], after / 2)
            }
        };
        self.recover();
        (target, killed)
    }

    /// After a recover: every session settled, none with two live instances.
    fn check(&self, context: &str) {
        // One look at the lab per point, not one per session: both grow
        // with the campaign.
        let mut live: HashMap<String, usize> = HashMap::new();
        for i in self.lab.instances() {
            if !matches!(i["state"].as_str(), Some("terminated" | "shutting-down"))
                && let Some(id) = i["tags"]["acode-session-id"].as_str()
            {
                *live.entry(id.to_string()).or_default() += 1;
            }
        }
        for s in self.sessions() {
            let phase = s["phase"].as_str().unwrap_or_default();
            assert!(
                matches!(phase, "Ready" | "Failed" | "TornDown" | "Interrupted"),
                "{context}: left mid-way: {s}"
            );
            let id = s["session_id"].as_str().unwrap_or_default();
            let live = live.get(id).copied().unwrap_or(0);
            let expected = usize::from(phase == "Ready");
            assert_eq!(
                live, expected,
                "{context}: {phase} session {id} has {live} live instances"
            );
        }
    }

    fn tear_down_all(&self) {
        for s in self.sessions() {
            if s["phase"] == "Ready" {
                let id = s["session_id"].as_str().expect("id");
                let out = cli(&self.db, Some(self.lab), &["teardown", id]);
                assert!(out.status.success(), "{out:?}");
            }
        }
    }
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).expect("write");
    path.to_path_buf()
}

#[test]
fn a_random_kill_9_campaign_leaves_no_orphan_and_no_duplicate_launch() {
    let _alone = crate::common::heavy_test();
    let points = env_number("ACODE_KILL_POINTS", 200);
    let seed = env_number("ACODE_KILL_SEED", 1).max(1);
    let lab = Lab::start();
    // Spot is never fulfilled within its 1 s timeout: every spot session
    // goes through AbandoningSpot and falls back to on-demand.
    lab.configure(json!({"spot_fulfill_delay_s": 600.0}));
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let key_path = lab.existing_key_pair("campaign-key", dir.path());
    let existing = format!(
        "  keyPair:\n    mode: existing\n    keyName: campaign-key\n    privateKeyPath: {}\n",
        key_path.display()
    );
    let spot = "  useSpot: true\n  spotRequestTimeout: 1s\n  spotFallbackToOnDemand: true\n";

    let workers = env_number("ACODE_KILL_WORKERS", 8).max(1);
    let started = Instant::now();
    let tallies: Vec<BTreeMap<Target, (u64, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (lab, dir) = (&lab, dir.path());
                let existing = &existing;
                scope.spawn(move || {
                    let home = dir.join(format!("worker-{w}"));
                    std::fs::create_dir_all(&home).expect("worker dir");
                    let config = |name: &str, extra: &str| {
                        write(
                            &home.join(name),
                            &format!("ec2Target:\n{}", lab.target_yaml(extra)),
                        )
                    };
                    let worker = Worker {
                        lab,
                        db: home.join("state.db"),
                        configs: [
                            config("temporary.yaml", ""),
                            config("existing.yaml", existing),
                            config("spot.yaml", spot),
                        ],
                    };
                    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (w + 1));
                    let mut tally: BTreeMap<Target, (u64, u64)> = BTreeMap::new();
                    for i in 0..points.div_ceil(workers) {
                        let (target, killed) = worker.point(&mut rng);
                        let entry = tally.entry(target).or_default();
                        entry.0 += 1;
                        entry.1 += u64::from(killed);
                        worker.check(&format!("seed {seed} worker {w} point {i} ({target:?})"));
                    }
                    worker.tear_down_all();
                    worker.check(&format!("seed {seed} worker {w} after teardown"));
                    tally
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });

    // Nothing left: no live instance, no key pair but the existing one.
    let live: Vec<Value> = lab
        .instances()
        .into_iter()
        .filter(|i| !matches!(i["state"].as_str(), Some("terminated" | "shutting-down")))
        .collect();
    assert!(live.is_empty(), "orphan instances: {live:?}");
    let pairs = rt
        .block_on(lab.ec2().describe_key_pairs().send())
        .expect("DescribeKeyPairs");
    let names: Vec<&str> = pairs
        .key_pairs()
        .iter()
        .filter_map(|k| k.key_name())
        .collect();
    assert_eq!(names, ["campaign-key"], "orphan key pairs");
    // No key file but the existing one's.
    for w in 0..workers {
        let keys = dir.path().join(format!("worker-{w}")).join("keys");
        let files: Vec<_> = std::fs::read_dir(&keys)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            files.is_empty(),
            "orphan key files in {}: {files:?}",
            keys.display()
        );
    }
    // No session launched twice.
    let twice = lab.launched_twice(None);
    assert!(twice.is_empty(), "launched twice: {twice:?}");

    let mut total: BTreeMap<Target, (u64, u64)> = BTreeMap::new();
    for tally in tallies {
        for (target, (n, k)) in tally {
            let e = total.entry(target).or_default();
            e.0 += n;
            e.1 += k;
        }
    }
    let killed: u64 = total.values().map(|(_, k)| k).sum();
    let run: u64 = total.values().map(|(n, _)| n).sum();
    eprintln!(
        "kill -9 campaign, seed {seed}: {run} points ({killed} killed mid-way, the rest had finished) \
         in {:.0} s, {} instances launched; by target (points, killed): {total:?}; \
         0 orphan instances, key pairs or key files, 0 duplicate launches",
        started.elapsed().as_secs_f64(),
        lab.instances().len()
    );
    assert!(run >= points);
}
