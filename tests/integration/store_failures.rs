//! The state database failing under the engine, for real: a full disk (a
//! small tmpfs), a read-only filesystem, a file damaged in the middle, and
//! two `recover` processes on one file. Each gives a clear error or waits
//! its turn, and no effect ever runs without its intent committed first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acode_ec2::driver::{Engine, EngineError, EngineOptions};
use acode_ec2::effects::Effects;
use acode_ec2::events::{NoProgress, ProvisionProgress};
use acode_ec2::machine::{Effect, Input, PhaseKind, SessionContext, Timestamp};
use acode_ec2::store::{CheckpointStore, SqliteStore, StoreError};

use crate::cli::cli;
use crate::common::dead_holder;
use crate::lab::Lab;

/// A small tmpfs of its own, unmounted when dropped (the suite runs as
/// root, as CI does).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_kib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = format!("size={size_kib}k");
        run(
            "mount",
            &["-t", "tmpfs", "-o", &size, "tmpfs", path_str(dir.path())],
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk to the last byte.
    fn fill(&self) {
        let mut filler = std::fs::File::create(self.path().join("filler")).expect("filler");
        let chunk = vec![0u8; 4096];
        while filler.write_all(&chunk).is_ok() {}
        let _ = filler.write_all(&[0]);
        let _ = filler.flush();
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        status.success(),
        "{program} {args:?}: {status} (needs root)"
    );
}

/// Effects that check, before each one runs, that its intent is what the
/// database holds as pending (committed first), and that can run a hook
/// after a given effect (to break the disk at that moment).
struct Checked<E> {
    inner: Arc<E>,
    store: Arc<SqliteStore>,
    ran: Mutex<Vec<String>>,
    uncommitted: Mutex<Vec<String>>,
    after_key_pair: Box<dyn Fn() + Send + Sync>,
}

impl<E: Effects> Effects for Checked<E> {
    async fn run(&self, ctx: &SessionContext, created: Timestamp, effect: &Effect) -> Input {
        let pending = self
            .store
            .load(&ctx.session_id)
            .await
            .ok()
            .and_then(|s| s.pending);
        if pending.as_ref().map(|i| &i.effect) != Some(effect) {
            self.uncommitted.lock().unwrap().push(format!("{effect:?}"));
        }
        self.ran.lock().unwrap().push(effect.name().to_string());
        let input = self.inner.run(ctx, created, effect).await;
        if matches!(effect, Effect::EnsureKeyPair { .. }) {
            (self.after_key_pair)();
        }
        input
    }
}

fn options(dir: &Path) -> EngineOptions {
    EngineOptions {
        key_dir: dir.join("keys").to_string_lossy().into_owned(),
        lease_ttl: Duration::from_secs(30),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_session_before_its_next_effect_and_recover_finishes_it() {
    let lab = Lab::start();
    let disk = Arc::new(SmallDisk::mount(4096));
    let keys = tempfile::tempdir().expect("key dir");
    let store = Arc::new(SqliteStore::open(&disk.path().join("state.db")).expect("store"));
    let filled = Arc::clone(&disk);
    let once = std::sync::atomic::AtomicBool::new(false);
    let effects = Arc::new(Checked {
        inner: lab.effects(),
        store: Arc::clone(&store),
        ran: Mutex::new(Vec::new()),
        uncommitted: Mutex::new(Vec::new()),
        // The key pair is made; then the disk fills before its answer is
        // recorded (once: the resumed session runs the effect again).
        after_key_pair: Box::new(move || {
            if !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                filled.fill();
            }
        }),
    });
    let engine = Engine::new(Arc::clone(&effects), store.clone(), options(keys.path()));
    let session = Mutex::new(None::<String>);
    let seen = |p: &ProvisionProgress| {
        session
            .lock()
            .unwrap()
            .get_or_insert_with(|| p.session_id.clone());
    };
    let err = engine
        .provision(lab.request(""), &seen)
        .await
        .expect_err("the disk is full");
    let text = err.to_string();
    assert!(
        matches!(err, EngineError::Store(StoreError::DiskFull { .. })),
        "{text}"
    );
    assert!(
        text.contains("is full") && text.contains("acode-ec2 recover"),
        "{text}"
    );
    // Nothing ran after the answer that could not be recorded.
    assert_eq!(lab.count("RunInstances"), 0, "{:?}", lab.counters());
    assert_eq!(
        effects.ran.lock().unwrap().last().map(String::as_str),
        Some("EnsureKeyPair")
    );

    // Space again: the same process recovers the session to Ready.
    disk.free();
    let report = engine.recover(&NoProgress).await.expect("recover");
    let id = session.lock().unwrap().clone().expect("session id");
    let ended: Vec<_> = report
        .iter()
        .map(|r| {
            (
                r.session_id.clone(),
                r.result.as_ref().map_err(ToString::to_string).cloned(),
            )
        })
        .collect();
    assert_eq!(ended, [(id.clone(), Ok(PhaseKind::Ready))]);
    assert_eq!(lab.live_instances_of(&id).len(), 1);
    assert_eq!(
        effects.uncommitted.lock().unwrap().clone(),
        Vec::<String>::new()
    );
}

#[test]
fn a_full_disk_or_a_read_only_filesystem_at_the_start_creates_nothing() {
    let lab = Lab::start();
    let config_dir = tempfile::tempdir().expect("tempdir");
    let config = config_dir.path().join("target.yaml");
    std::fs::write(&config, format!("ec2Target:\n{}", lab.target_yaml(""))).expect("config");
    let config = path_str(&config);

    // Full: the database cannot even be set up.
    let full = SmallDisk::mount(1024);
    full.fill();
    let out = cli(
        &full.path().join("state.db"),
        Some(&lab),
        &["provision", "--config", config],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("full"), "{stderr}");

    // Read-only: a read-only view of a folder.
    let folder = tempfile::tempdir().expect("tempdir");
    let view = tempfile::tempdir().expect("tempdir");
    run(
        "mount",
        &["--bind", path_str(folder.path()), path_str(view.path())],
    );
    let read_only = Command::new("mount")
        .args(["-o", "remount,ro,bind", path_str(view.path())])
        .status();
    let out = cli(
        &view.path().join("state.db"),
        Some(&lab),
        &["provision", "--config", config],
    );
    let _ = Command::new("umount").arg("-l").arg(view.path()).status();
    assert!(read_only.is_ok_and(|s| s.success()), "remount read-only");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(
        stderr.contains("--state-db"),
        "says what to change: {stderr}"
    );

    assert_eq!(lab.count("RunInstances"), 0);
    assert_eq!(lab.count("CreateKeyPair"), 0);
}

/// Overwrites the middle half of a file with 0xFF.
fn damage_middle(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read db");
    let len = bytes.len();
    for b in &mut bytes[len / 4..len * 3 / 4] {
        *b = 0xFF;
    }
    std::fs::write(path, bytes).expect("write db");
}

#[tokio::test]
async fn a_database_damaged_in_the_middle_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db: PathBuf = dir.path().join("state.db");
    {
        let store = SqliteStore::open(&db).expect("store");
        let holder = dead_holder();
        for i in 0..200 {
            let ctx = SessionContext {
                session_id: format!("session-{i:03}"),
                request: crate::common::request(
                    "  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  securityGroupIds: [sg-1]\n",
                ),
                key_dir: "/tmp/keys".into(),
                replaces: None,
            };
            let first = acode_ec2::machine::start(&ctx);
            let checkpoint = acode_ec2::store::Checkpoint {
                outcome: None,
                state: first.state,
                intent: first.effect.map(|effect| acode_ec2::store::Intent {
                    effect,
                    not_before: None,
                }),
            };
            store
                .create(
                    &ctx,
                    &checkpoint,
                    &holder,
                    Duration::from_secs(30),
                    Timestamp(1),
                )
                .await
                .expect("create");
        }
    }
    // Closed: the WAL is folded into the file, which is then damaged.
    assert!(!dir.path().join("state.db-wal").exists());
    damage_middle(&db);
    for args in [
        &["sessions"][..],
        &["status"][..],
        &["sessions", "--json"][..],
    ] {
        let out = cli(&db, None, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} on a damaged file succeeded"
        );
        assert!(stderr.contains("is damaged"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("acode=true"),
            "{args:?} says what to do: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_recovers_at_once_share_the_sessions_and_launch_each_once() {
    let lab = Lab::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state.db");
    let store = Arc::new(SqliteStore::open(&db).expect("store"));
    // Six sessions interrupted right after they were recorded.
    let died =
        Engine::new(lab.effects(), store.clone(), options(dir.path())).with_holder(dead_holder());
    for _ in 0..6 {
        let recorded = Mutex::new(false);
        let seen = |_: &ProvisionProgress| *recorded.lock().unwrap() = true;
        tokio::select! {
            _ = died.provision(lab.request(""), &seen) => panic!("settled"),
            _ = async { while !*recorded.lock().unwrap() {
                tokio::task::yield_now().await;
            } } => {}
        }
    }
    drop(died);
    let spawn = || {
        crate::cli::cli_command(&db, Some(&lab), &["recover"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn recover")
    };
    let (first, second) = (spawn(), spawn());
    let outputs = [first, second].map(|c| c.wait_with_output().expect("recover output"));
    for out in &outputs {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(!text.contains("not recovered"), "{text}");
        // A session the other recover drives is left to it, not a failure.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rfind(|l| l.starts_with("recover: "));
        assert!(
            last.is_some_and(|l| l.starts_with("recover: 6/6 done, 0 in flight, 0 failed")),
            "{stderr}"
        );
    }
    let sessions = store.list().await.expect("list");
    assert_eq!(sessions.len(), 6);
    for s in &sessions {
        assert_eq!(s.phase, PhaseKind::Ready, "{s:?}");
        assert_eq!(lab.live_instances_of(&s.session_id).len(), 1, "{s:?}");
    }
    assert_eq!(lab.count("RunInstances"), 6, "{:?}", lab.counters());
}
