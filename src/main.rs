//! `acode-ec2`: the command-line edge. Errors become `anyhow` here and only here.

/// Parts of the command line kept out of this file.
#[macro_use]
mod cli {
    #[macro_use]
    pub mod stderr;
    #[macro_use]
    pub mod stdout;
    pub mod cancel;
    pub mod fleet;

    /// A lock on the CLI's display and hook state, poison or not: a panic
    /// elsewhere leaves nothing torn that matters there.
    pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(|p| p.into_inner())
    }
}

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use acode_ec2::driver::{
    Engine, EngineError, EngineOptions, InterruptionHook, RecoverTally, WatchOptions, WatchedNotice,
};
use acode_ec2::effects::AwsEffects;
use acode_ec2::events::{InterruptedInstance, ProgressSink, ProvisionProgress, ReadyInstance};
use acode_ec2::machine::diagram;
use acode_ec2::machine::{PhaseKind, SpotRequestStatus, SpotSavings};
use acode_ec2::net_guard::ConnectGuard;
use acode_ec2::store::{CheckpointStore, PhaseSpan, SessionSummary, SqliteStore, phase_timeline};

/// Provision EC2 instances for coding-agent sessions: each session ends with
/// a Ready instance that accepted an SSH login, its host key checked against
/// the instance console or pinned fingerprints (unless the config says
/// insecure-accept-any), or with nothing left behind. Every step is checkpointed, so an interrupted session can be
/// resumed or cleaned up with `recover`.
///
/// Region, credentials and endpoint come from the AWS SDK's standard chain
/// (AWS_REGION, AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL_EC2, ...).
#[derive(Parser)]
#[command(name = "acode-ec2", version, about, long_about)]
struct Cli {
    /// SQLite file holding sessions and their event logs
    /// [default: state.db in this user's data folder, e.g.
    /// ~/.local/share/acode-ec2/state.db].
    #[arg(long, global = true, env = "ACODE_EC2_STATE_DB", value_name = "PATH")]
    state_db: Option<PathBuf>,

    /// Folder for private key files of key pairs acode-ec2 creates
    /// [default: `keys/` beside the state database].
    #[arg(long, global = true, env = "ACODE_EC2_KEY_DIR", value_name = "DIR")]
    key_dir: Option<PathBuf>,

    /// Log lines on stderr as text, or as JSON objects (one per line, with
    /// the session's id, phase and instance, and for each EC2 call its
    /// action, duration, request id and error code). JSON replaces the
    /// progress lines: ACODE_EC2_LOG=info logs each phase change (the
    /// filter is a tracing one; default warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Write metrics (Prometheus text) to PATH when the command ends, for
    /// node_exporter's textfile collector (written aside, then renamed).
    #[arg(long, global = true, value_name = "PATH")]
    metrics_file: Option<PathBuf>,

    /// Serve metrics (Prometheus text, /metrics) on ADDR while the command
    /// runs, e.g. 127.0.0.1:9464 for a long `recover`.
    #[arg(long, global = true, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,

    /// How long sessions stay locked to this process after it stops
    /// without a word (kill -9, a frozen host): another process's
    /// `recover` takes them over once this process's heartbeat is this
    /// old (at once for a process gone on this host). At least 1s.
    #[arg(long, global = true, env = "ACODE_EC2_LEASE_TTL", value_name = "DURATION",
          default_value = "30s", value_parser = lease_ttl)]
    lease_ttl: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Launch an instance (or --count N) as the config file describes and wait until it is Ready.
    ///
    /// Ready means: the instance runs, an SSH login worked against a host
    /// key from its console (or pinned), and EC2's status checks pass
    /// (`statusChecks`). Defaults, after the specification: the instance
    /// state is polled every 5 s for at most 5 min (`pollInterval`,
    /// `runningTimeout`); SSH is tried up to 30 times, 10 s apart
    /// (`ssh.retries`, `ssh.retryInterval`), side by side with the status
    /// checks, all within 5 min (`sshTimeout`). On Ready it prints an `ssh`
    /// command that trusts only the verified host key.
    ///
    /// A Ready spot instance's interruption notice is acted on only while
    /// `acode-ec2 watch` runs (see `watch --help`); provision returns at Ready.
    ///
    /// Exit status: 0 when Ready; 1 when provisioning failed: everything it
    /// made is removed, unless the error says cleanup stalled (EC2 kept
    /// refusing it): then the session stays tracked and `acode-ec2
    /// teardown SESSION` finishes the job; 3 when the instance is Ready but
    /// the --on-ready command failed (the instance stays Ready and tracked);
    /// 130 after Ctrl-C.
    #[command(verbatim_doc_comment)]
    Provision {
        /// YAML file with a top-level `ec2Target:` (see fixtures/ec2-target.example.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print the ready instance as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Run CMD (with `sh -c`) once the instance is Ready, with ACODE_SESSION_ID,
        /// ACODE_INSTANCE_ID, ACODE_SSH_HOST, ACODE_SSH_PORT, ACODE_SSH_USER,
        /// ACODE_KEY_PATH, ACODE_KNOWN_HOSTS, ACODE_HOST_KEY_FINGERPRINT,
        /// ACODE_PUBLIC_IP, ACODE_PRIVATE_IP and ACODE_WAS_SPOT in its environment.
        /// Its failure is reported (exit status 3) but leaves the instance Ready.
        /// With --json, its output goes to stderr, so stdout stays JSON. With
        /// --count, each runs as its session turns Ready, side by side with
        /// the others.
        #[arg(long, value_name = "CMD")]
        on_ready: Option<String>,
        /// Start N sessions from the config, side by side in this process
        /// (one progress line each, then a summary). They share EC2 rate
        /// limits, batched polls, validation and spot price answers. Exit status 1 if
        /// any failed; with --json, an array of the Ready ones.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=1000))]
        count: u16,
    },
    /// Print an OpenSSH `Host` block for a Ready session (for ~/.ssh/config).
    SshConfig {
        /// The session's id (`acode-ec2 sessions` lists them).
        session: String,
    },
    /// Check a config against the account without creating anything.
    ///
    /// Checks everything `provision` checks before it creates anything (the
    /// config, the image, subnets, security groups and key pair), whether
    /// the subnets' zones offer the instance type, and asks EC2 whether the
    /// key pair and RunInstances calls would be allowed (DryRun). Prints
    /// what would be launched; exits 1 with what to fix.
    /// Writes no state.
    Validate {
        /// YAML file with a top-level `ec2Target:` (see fixtures/ec2-target.example.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the least-privilege IAM policy acode-ec2 needs.
    ///
    /// Creation calls are allowed only with the tag acode=true in the
    /// request, terminate/delete only on resources tagged acode=true. With
    /// --config, also iam:PassRole for the config's instance profile role.
    IamPolicy {
        /// The config to tailor the policy to (its instance profile's role).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show one session (the newest if none is named).
    Status {
        /// The session's id (`acode-ec2 sessions` lists them).
        session: Option<String>,
        /// Print it as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List all sessions.
    Sessions {
        /// Print them as a JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Terminate a session's instance and delete the key pair it created.
    Teardown {
        /// The session's id (`acode-ec2 sessions` lists them).
        session: String,
    },
    /// Resume or clean up every session that is neither Ready nor finished.
    ///
    /// Every session is driven side by side, each under its lease, with at
    /// most --concurrency of their EC2 calls, and apart from those as many
    /// SSH logins, running at once (polls go out batched and take no slot);
    /// a session waiting on a slow instance holds up no other. A line per
    /// session and a tally of done / in flight / failed. Sessions another
    /// live process drives are left to it.
    Recover {
        /// How many EC2 calls (polls aside: they go out batched) to run at
        /// once, and how many SSH logins.
        #[arg(long, value_name = "N", default_value_t = acode_ec2::driver::RECOVER_CONCURRENCY as u16,
              value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
    },
    /// Watch Ready spot sessions for EC2's two-minute interruption notice, and act on it.
    ///
    /// Every --interval, each watched session's instance metadata is read
    /// over its verified SSH connection (IMDSv2 spot/instance-action), or
    /// the EC2 API when SSH is down (spot request status, instance state).
    /// On a notice (committed first): --on-interruption runs here (sh -c,
    /// bounded by the time left, at least 5 s) with ACODE_SESSION_ID,
    /// ACODE_INSTANCE_ID, ACODE_ACTION, ACODE_NOTICE_TIME_MS,
    /// ACODE_NOTICE_SOURCE, ACODE_SSH_HOST, ACODE_SSH_PORT, ACODE_SSH_USER,
    /// ACODE_KEY_PATH and ACODE_KNOWN_HOSTS; meanwhile the config's
    /// spotInterruption.shutdownCommand runs on the instance (over SSH,
    /// ending 5 s before the notice time); then the instance
    /// is terminated (if EC2 has not) and the temporary key pair deleted, and
    /// the session ends Interrupted. With spotInterruption.replace, a new
    /// session from the same config starts at once.
    ///
    /// Runs until Ctrl-C, or with --until-idle until no watched session is
    /// Ready. A watcher killed mid-way leaves its sessions to
    /// `acode-ec2 recover` (or the next `watch`).
    #[command(verbatim_doc_comment)]
    Watch {
        /// Sessions to watch (default: every Ready spot session).
        sessions: Vec<String>,
        /// Run CMD (with `sh -c`) here when a notice arrives.
        #[arg(long, value_name = "CMD")]
        on_interruption: Option<String>,
        /// How often each session is looked at (250ms, 5s, 1m; at least 100ms).
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = watch_interval)]
        interval: Duration,
        /// Stop once no watched session is Ready and nothing is in flight.
        #[arg(long)]
        until_idle: bool,
    },
    /// Print the state diagram generated from the transition table.
    Diagram {
        #[arg(long, value_enum, default_value_t = DiagramFormat::Mermaid)]
        format: DiagramFormat,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum DiagramFormat {
    Mermaid,
    Dot,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ACODE_EC2_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only for a terminal: a log file or a pipe gets plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => {
            cli::stderr::use_json();
            logs.json()
                .with_current_span(true)
                .with_span_list(false)
                .init();
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let metrics = Metrics::install(&cli)?;
        let outcome = run(&cli).await;
        // Written whatever the command's outcome: a failure has metrics too.
        // A file that cannot be written must not hide that outcome (a
        // script would take a Ready instance for a failure).
        if let Err(e) = metrics.write_file(cli.metrics_file.as_deref()) {
            errln!("warning: {e:#}");
        }
        outcome
    });
    match outcome {
        // What the command printed did not all get out (said on stderr).
        Ok(code) if code == ExitCode::SUCCESS && cli::stdout::lost_output() => ExitCode::FAILURE,
        Ok(code) => code,
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

use cli::cancel::{CancelNotices, Cancellable, until_cancelled};
use cli::fleet::{FleetDisplay, FleetEnd, provision_fleet};

/// The `--on-ready` commands of `provision --count`, each started as its
/// session is committed Ready.
#[derive(Default, Clone)]
struct OnReadyHooks(Arc<Mutex<Vec<tokio::task::JoinHandle<Result<ExitCode>>>>>);

impl OnReadyHooks {
    fn run_on_ready(
        &self,
        engine: Engine<AwsEffects>,
        command: &str,
        json: bool,
    ) -> Engine<AwsEffects> {
        let (hooks, command) = (self.clone(), command.to_string());
        let runtime = tokio::runtime::Handle::current();
        engine.on_ready(move |ready| {
            let (command, ready) = (command.clone(), ready.clone());
            let hook = runtime.spawn(async move { run_on_ready(&command, &ready, json).await });
            cli::lock(&hooks.0).push(hook);
        })
    }

    /// Waits for every hook: exit status 3 if any failed.
    async fn finished(self) -> Result<ExitCode> {
        let hooks = std::mem::take(&mut *cli::lock(&self.0));
        let mut code = ExitCode::SUCCESS;
        for hook in hooks {
            if hook.await.context("an --on-ready command's task")?? != ExitCode::SUCCESS {
                code = ExitCode::from(3);
            }
        }
        Ok(code)
    }
}

/// Prints how `provision --count` ended: each Ready session (or a JSON
/// array of them), each failure, and a count; waits for the --on-ready
/// commands started as sessions turned Ready.
async fn fleet_summary(end: FleetEnd, json: bool, hooks: OnReadyHooks) -> Result<ExitCode> {
    let (results, cancelled) = match end {
        FleetEnd::Settled { results, cancelled } => (results, cancelled),
        FleetEnd::Stopped(sessions) => {
            errln!(
                "stopped at once: {} session(s) checkpointed with the cancel recorded; \
                 `acode-ec2 recover` finishes their cleanup",
                sessions.len()
            );
            return Ok(ExitCode::from(130));
        }
    };
    let total = results.len();
    let (ready, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let ready: Vec<ReadyInstance> = ready.into_iter().filter_map(Result::ok).collect();
    if json {
        outln!("{}", serde_json::to_string_pretty(&ready)?);
    } else {
        for instance in &ready {
            print_ready(instance);
        }
    }
    for failure in failed.iter().filter_map(|r| r.as_ref().err()) {
        errln!("{failure}");
    }
    errln!(
        "{} of {total} sessions Ready, {} failed",
        ready.len(),
        failed.len()
    );
    let code = hooks.finished().await?;
    if cancelled {
        return Ok(ExitCode::from(130));
    }
    Ok(if failed.is_empty() {
        code
    } else {
        ExitCode::FAILURE
    })
}

/// The Prometheus recorder, installed only when metrics are asked for.
struct Metrics(Option<metrics_exporter_prometheus::PrometheusHandle>);

impl Metrics {
    fn install(cli: &Cli) -> Result<Metrics> {
        if cli.metrics_file.is_none() && cli.metrics_listen.is_none() {
            return Ok(Metrics(None));
        }
        let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
        for (name, buckets) in acode_ec2::telemetry::HISTOGRAM_BUCKETS {
            builder = builder
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full((*name).to_string()),
                    buckets,
                )
                .context("histogram buckets")?;
        }
        if let Some(addr) = cli.metrics_listen {
            if ConnectGuard::from_env().is_loopback_only() && !addr.ip().is_loopback() {
                bail!(
                    "--metrics-listen {addr}: {}=1 allows loopback addresses only",
                    acode_ec2::net_guard::LOOPBACK_ONLY_ENV
                );
            }
            builder = builder.with_http_listener(addr);
        }
        let (recorder, exporter) = builder
            .build()
            .context("cannot set up the metrics exporter (--metrics-listen)")?;
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder)
            .context("a metrics recorder is already installed")?;
        tokio::spawn(async move {
            if let Err(e) = exporter.await {
                tracing::warn!(error = ?e, "the metrics listener stopped");
            }
        });
        Ok(Metrics(Some(handle)))
    }

    fn write_file(&self, path: Option<&Path>) -> Result<()> {
        let (Some(handle), Some(path)) = (&self.0, path) else {
            return Ok(());
        };
        let aside = path.with_extension("prom.partial");
        std::fs::write(&aside, handle.render())
            .and_then(|()| std::fs::rename(&aside, path))
            .with_context(|| format!("cannot write metrics to {}", path.display()))
    }
}

fn default_state_db() -> Result<PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "acode-ec2")
        .context("cannot find a data folder for this user; pass --state-db PATH")?;
    Ok(dirs.data_dir().join("state.db"))
}

fn state_db_path(cli: &Cli) -> Result<PathBuf> {
    match &cli.state_db {
        Some(p) => Ok(p.clone()),
        None => default_state_db(),
    }
}

/// What a command that only reads says when the state database is not
/// there: its path, so a mistyped one is not taken for "nothing here".
fn no_database(path: &Path) -> String {
    format!(
        "no state database at {} (one is made by the first provision; if sessions were made \
         with another, pass it with --state-db or ACODE_EC2_STATE_DB)",
        path.display()
    )
}

/// For commands that only read: a missing database means no sessions, and
/// is not created just to be read.
fn open_existing_store(cli: &Cli) -> Result<Option<Arc<SqliteStore>>> {
    let path = state_db_path(cli)?;
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(open_store(cli)?.0))
}

fn open_store(cli: &Cli) -> Result<(Arc<SqliteStore>, String)> {
    let path = state_db_path(cli)?;
    let key_dir = match &cli.key_dir {
        Some(dir) => dir.clone(),
        None => path.parent().unwrap_or(Path::new(".")).join("keys"),
    };
    // A file there would fail the first key written, after EC2 made the pair.
    if key_dir.exists() && !key_dir.is_dir() {
        bail!(
            "the key folder {} is a file, not a folder; pass --key-dir with a folder (it is \
             created if missing)",
            key_dir.display()
        );
    }
    let store = SqliteStore::open(&path)?;
    Ok((Arc::new(store), key_dir.to_string_lossy().into_owned()))
}

/// The AWS effects, built only if the loopback guard agrees. Commands
/// build them before touching the state database, so a refused
/// environment leaves nothing on disk.
async fn aws_effects() -> Result<AwsEffects> {
    Ok(AwsEffects::from_environment(ConnectGuard::from_env()).await?)
}

/// The engine over the state database, created if missing.
fn engine(cli: &Cli, effects: AwsEffects) -> Result<Engine<AwsEffects>> {
    let (store, key_dir) = open_store(cli)?;
    Ok(Engine::new(
        Arc::new(effects),
        store,
        EngineOptions {
            key_dir,
            lease_ttl: cli.lease_ttl,
        },
    ))
}

async fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Diagram { format } => {
            out!(
                "{}",
                match format {
                    DiagramFormat::Mermaid => diagram::mermaid(),
                    DiagramFormat::Dot => diagram::dot(),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Provision {
            config,
            json,
            on_ready,
            count,
        } if *count > 1 => {
            let request = acode_ec2::config::load(config)?;
            let mut engine = engine(cli, aws_effects().await?)?;
            // Each hook starts as its session turns Ready, not once the last
            // session has settled.
            let hooks = OnReadyHooks::default();
            if let Some(command) = on_ready {
                engine = hooks.run_on_ready(engine, command, *json);
            }
            let display = FleetDisplay::new(cli.log_format == LogFormat::Text);
            let end = provision_fleet(&engine, request, usize::from(*count), &display).await;
            display.finish();
            fleet_summary(end?, *json, hooks).await
        }
        Command::Provision {
            config,
            json,
            on_ready,
            count: _,
        } => {
            let request = acode_ec2::config::load(config)?;
            let engine = engine(cli, aws_effects().await?)?;
            let display = ProgressDisplay::new(cli.log_format);
            let outcome = match provision_cancellable(&engine, request, &display).await? {
                Provisioned::Done(outcome) => outcome,
                Provisioned::Cancelled(end) => {
                    display.finish();
                    return cancelled(end, display.session());
                }
            };
            display.finish();
            let ready = outcome?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&ready)?);
            } else {
                print_ready(&ready);
            }
            match on_ready {
                Some(command) => run_on_ready(command, &ready, *json).await,
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Validate { config } => {
            let request = acode_ec2::config::load(config)?;
            let effects = aws_effects().await?;
            match acode_ec2::effects::preflight::check(effects.api(), &request).await {
                Ok(lines) => {
                    outln!("{} is valid; provision would launch:", config.display());
                    for line in lines {
                        outln!("  {line}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(problem) => bail!("{} cannot be provisioned: {problem}", config.display()),
            }
        }
        Command::IamPolicy { config } => {
            let request = config.as_deref().map(acode_ec2::config::load).transpose()?;
            let policy = acode_ec2::iam_policy::policy(request.as_ref());
            outln!("{}", serde_json::to_string_pretty(&policy)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::SshConfig { session } => {
            let Some(store) = open_existing_store(cli)? else {
                bail!(
                    "no session {session}: {}",
                    no_database(&state_db_path(cli)?)
                );
            };
            let summary = store.summary(session).await?;
            out!("{}", ssh_config_block(&summary)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { session, json } => {
            let no_sessions = "no sessions yet; start one with `acode-ec2 provision`";
            let (store, summary) = match (open_existing_store(cli)?, session) {
                (Some(store), Some(id)) => {
                    let summary = store.summary(id).await?;
                    (store, summary)
                }
                (Some(store), None) => {
                    let newest = store.list().await?.pop().context(no_sessions)?;
                    (store, newest)
                }
                (None, Some(id)) => bail!("no session {id}: {}", no_database(&state_db_path(cli)?)),
                (None, None) => bail!("no sessions yet: {}", no_database(&state_db_path(cli)?)),
            };
            let phases = phase_timeline(&store.events(&summary.session_id).await?);
            let session = store.load(&summary.session_id).await?;
            let instance = session.state.phase.instance();
            let spot = instance.and_then(|i| i.spot_request.as_deref());
            let savings = instance.and_then(|i| i.savings.as_deref());
            let replaces = session.context.replaces.as_deref();
            let replaced_by = session.state.phase.replacement();
            if *json {
                let view = StatusView {
                    summary: &summary,
                    phases: &phases,
                    spot,
                    spot_savings: savings,
                    replaces,
                    replaced_by,
                };
                outln!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print_summary(&summary);
                if let Some(request) = spot {
                    print_spot_request(request);
                }
                if let Some(savings) = savings {
                    outln!("savings   {savings}");
                }
                if let Some(old) = replaces {
                    outln!("replaces  {old} (interrupted)");
                }
                if let Some(new) = replaced_by {
                    outln!("replaced  by {new}");
                }
                print_phases(&phases);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sessions { json } => {
            let Some(store) = open_existing_store(cli)? else {
                if *json {
                    outln!("[]");
                } else {
                    outln!("no sessions: {}", no_database(&state_db_path(cli)?));
                }
                return Ok(ExitCode::SUCCESS);
            };
            let sessions = store.list().await?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&sessions)?);
            } else if sessions.is_empty() {
                outln!("no sessions");
            } else {
                outln!(
                    "{:<36}  {:<19}  {:<20}  PUBLIC IP",
                    "SESSION",
                    "PHASE",
                    "INSTANCE"
                );
                for s in &sessions {
                    outln!(
                        "{:<36}  {:<19}  {:<20}  {}",
                        s.session_id,
                        s.phase.name(),
                        s.instance_id.as_deref().unwrap_or("-"),
                        s.public_ip.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown { session } => {
            let effects = aws_effects().await?;
            // Without a database there is nothing to tear down: none is created.
            let path = state_db_path(cli)?;
            if !path.exists() {
                bail!("no session {session}: {}", no_database(&path));
            }
            let engine = engine(cli, effects)?;
            let display = ProgressDisplay::new(cli.log_format);
            let end = engine.teardown(session, &display).await;
            display.finish();
            outln!("session {session} is {}", end?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch {
            sessions,
            on_interruption,
            interval,
            until_idle,
        } => {
            let effects = aws_effects().await?;
            let path = state_db_path(cli)?;
            if !path.exists() {
                if let Some(session) = sessions.first() {
                    bail!("no session {session}: {}", no_database(&path));
                }
                if *until_idle {
                    outln!("no sessions to watch: {}", no_database(&path));
                    return Ok(ExitCode::SUCCESS);
                }
                // A watcher may well start before the first provision.
                errln!(
                    "watch: waiting for the first session: {}",
                    no_database(&path)
                );
                let appeared = async {
                    while !path.exists() {
                        tokio::time::sleep(*interval).await;
                    }
                };
                tokio::select! {
                    () = appeared => {}
                    _ = stop_signal() => return Ok(ExitCode::from(130)),
                }
            }
            let mut engine = engine(cli, effects)?;
            // A session named that does not exist is a typo, not "quiet";
            // one that will never get a notice is said, not silently skipped
            // (one still on its way is watched once it is Ready).
            for session in sessions {
                let summary = engine.store().summary(session).await?;
                let what = match summary.phase {
                    PhaseKind::Ready if !summary.was_spot => "Ready on demand".to_string(),
                    PhaseKind::Ready => continue,
                    phase if phase.is_settled() => phase.to_string(),
                    _ => continue,
                };
                errln!(
                    "watch: session {session} is {what}: only Ready spot sessions get \
                     interruption notices, so it is not watched"
                );
            }
            if let Some(command) = on_interruption {
                engine = engine.on_interruption(interruption_command(command.clone()));
            }
            let options = WatchOptions {
                sessions: sessions.clone(),
                interval: *interval,
                until_idle: *until_idle,
            };
            let display = ProgressDisplay::new(cli.log_format);
            let watched = tokio::select! {
                watched = engine.watch(&options, &display) => Some(watched),
                _ = stop_signal() => None,
            };
            display.finish();
            let Some(watched) = watched else {
                errln!("watch stopped; sessions mid-way are finished by `acode-ec2 recover`");
                return Ok(ExitCode::from(130));
            };
            for item in watched? {
                print_watched(&item);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Recover { concurrency } => {
            let effects = aws_effects().await?;
            let path = state_db_path(cli)?;
            if !path.exists() {
                outln!("nothing to recover: {}", no_database(&path));
                return Ok(ExitCode::SUCCESS);
            }
            let engine = engine(cli, effects)?;
            let display = FleetDisplay::new(cli.log_format == LogFormat::Text).with_tally();
            let tally = |t: &RecoverTally| display.tally(t);
            let report = engine
                .recover_with(usize::from(*concurrency), &display, &tally)
                .await;
            display.finish();
            let report = report?;
            if report.is_empty() {
                outln!("nothing to recover");
            }
            let mut failures = 0;
            for item in report {
                match item.result {
                    Ok(phase) => outln!("session {} is {phase}", item.session_id),
                    Err(EngineError::ProvisionFailed { reason, .. }) => {
                        outln!(
                            "session {} is Failed (cleaned up): {reason}",
                            item.session_id
                        )
                    }
                    // Another live process (a second recover, say) has it: its turn.
                    Err(e) if e.is_held_elsewhere() => {
                        outln!("left to its driver: {e}")
                    }
                    Err(e) => {
                        failures += 1;
                        outln!("session {} not recovered: {e}", item.session_id);
                    }
                }
            }
            if failures > 0 {
                bail!("{failures} session(s) could not be recovered; see above");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How a provision under Ctrl-C ended.
enum Provisioned {
    Done(Result<ReadyInstance, EngineError>),
    /// The user asked to stop: how far cleanup got (`None`: stopped at once).
    Cancelled(Option<Result<ReadyInstance, EngineError>>),
}

/// Provisions; the first SIGINT or SIGTERM cancels (the session is torn
/// down through the machine's cleanup, with progress shown), a second one
/// stops at once, leaving the session checkpointed.
async fn provision_cancellable(
    engine: &Engine<AwsEffects>,
    request: acode_ec2::request::ProvisionRequest,
    display: &ProgressDisplay,
) -> Result<Provisioned> {
    let work = engine.provision(request, display);
    let notice = "cancelling: tearing the session down (press Ctrl-C again to stop at once; \
                  the session stays checkpointed for `acode-ec2 recover`)";
    Ok(
        match until_cancelled(engine, work, display, notice).await? {
            Cancellable::Finished {
                outcome,
                cancelled: false,
            } => Provisioned::Done(outcome),
            Cancellable::Finished { outcome, .. } => Provisioned::Cancelled(Some(outcome)),
            Cancellable::Stopped(_) => Provisioned::Cancelled(None),
        },
    )
}

impl CancelNotices for ProgressDisplay {
    fn sessions(&self) -> Vec<String> {
        self.session().into_iter().collect()
    }

    fn say(&self, line: &str) {
        ProgressDisplay::say(self, line);
    }
}

/// The exit after a cancel: 130, with what became of the session.
fn cancelled(
    end: Option<Result<ReadyInstance, EngineError>>,
    session: Option<String>,
) -> Result<ExitCode> {
    let id = session.unwrap_or_else(|| "(not recorded yet)".into());
    match end {
        Some(Err(EngineError::TornDown { .. })) => {
            errln!("cancelled: session {id} was torn down; nothing is left");
        }
        Some(Err(EngineError::ProvisionFailed { reason, .. })) => {
            errln!("cancelled: session {id} failed and was cleaned up: {reason}");
        }
        Some(Ok(ready)) => {
            errln!(
                "cancelled too late: session {id} is Ready; `acode-ec2 teardown {}` removes it",
                ready.session_id
            );
        }
        Some(Err(e)) => {
            errln!("cancelled, but the cleanup stopped: {e}");
        }
        None => errln!(
            "stopped at once: session {id} is checkpointed with the cancel recorded; \
             `acode-ec2 recover` finishes its cleanup (as does `acode-ec2 teardown {id}`)"
        ),
    }
    Ok(ExitCode::from(130))
}

fn print_ready(ready: &ReadyInstance) {
    outln!("session {} is Ready", ready.session_id);
    outln!(
        "  instance  {}{}",
        ready.instance_id,
        if ready.was_spot { " (spot)" } else { "" }
    );
    outln!(
        "  ssh       {} (host key {})",
        ready.ssh_endpoint,
        ready.host_key_fingerprint
    );
    if let Some(path) = &ready.key_path {
        outln!("  key       {path}");
    }
    if let Some(savings) = &ready.spot_savings {
        outln!("  savings   {savings}");
    }
    outln!("  login     {}", ready.ssh_command());
}

/// `--lease-ttl`: a duration of at least 1 s.
fn lease_ttl(text: &str) -> std::result::Result<Duration, String> {
    let ttl = acode_ec2::config::parse_duration("--lease-ttl", text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(ttl)
}

/// `--interval`: a duration of at least 100 ms.
fn watch_interval(text: &str) -> std::result::Result<Duration, String> {
    let interval =
        acode_ec2::config::parse_duration("--interval", text).map_err(|e| e.to_string())?;
    if interval < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(interval)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        if let Ok(mut term) = term {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The --on-interruption hook: `sh -c CMD` with the instance in ACODE_* variables.
fn interruption_command(command: String) -> InterruptionHook {
    Arc::new(move |at: InterruptedInstance| {
        let command = command.clone();
        Box::pin(async move {
            let optional = |value: &Option<String>| value.clone().unwrap_or_default();
            let status = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .env("ACODE_SESSION_ID", &at.session_id)
                .env("ACODE_INSTANCE_ID", &at.instance_id)
                .env("ACODE_ACTION", &at.action)
                .env("ACODE_NOTICE_TIME_MS", at.time_ms.to_string())
                .env("ACODE_NOTICE_SOURCE", &at.source)
                .env("ACODE_SSH_HOST", &at.ssh_host)
                .env("ACODE_SSH_PORT", at.ssh_port.to_string())
                .env("ACODE_SSH_USER", &at.ssh_user)
                .env("ACODE_KEY_PATH", optional(&at.key_path))
                .env("ACODE_KNOWN_HOSTS", optional(&at.known_hosts_path))
                .kill_on_drop(true)
                .status()
                .await;
            match status {
                Ok(status) if status.success() => {}
                Ok(status) => errln!(
                    "warning: the --on-interruption command failed ({status}) for session {}; \
                     the session is cleaned up all the same",
                    at.session_id
                ),
                Err(e) => errln!("warning: cannot run the --on-interruption command: {e}"),
            }
        })
    })
}

fn print_watched(item: &WatchedNotice) {
    let outcome = match &item.settled {
        Ok(phase) => phase.to_string(),
        Err(e) => format!("not finished: {e}"),
    };
    match &item.notice {
        Some(notice) => outln!(
            "session {} got notice to {} (from {}): {outcome}",
            item.session_id,
            notice.action,
            notice.source
        ),
        None => outln!(
            "session {} (interrupted before this watcher): {outcome}",
            item.session_id
        ),
    }
    if let Some(replacement) = &item.replacement {
        match &replacement.result {
            Ok(phase) => outln!("  replaced by session {} ({phase})", replacement.session_id),
            Err(e) => outln!("  replacement {} failed: {e}", replacement.session_id),
        }
    }
}

/// Runs the --on-ready command with the Ready instance in its environment.
/// Runs the --on-ready command; with `json`, its output goes to stderr so
/// stdout stays the JSON a script parses.
async fn run_on_ready(command: &str, ready: &ReadyInstance, json: bool) -> Result<ExitCode> {
    let optional = |value: &Option<String>| value.clone().unwrap_or_default();
    let mut sh = tokio::process::Command::new("sh");
    // A hook still running when the command stops at once ends with it.
    sh.kill_on_drop(true);
    if json {
        sh.stdout(std::process::Stdio::from(std::io::stderr()));
    }
    let status = sh
        .arg("-c")
        .arg(command)
        .env("ACODE_SESSION_ID", &ready.session_id)
        .env("ACODE_INSTANCE_ID", &ready.instance_id)
        .env("ACODE_SSH_HOST", &ready.ssh_host)
        .env("ACODE_SSH_PORT", ready.ssh_port.to_string())
        .env("ACODE_SSH_USER", &ready.ssh_user)
        .env("ACODE_KEY_PATH", optional(&ready.key_path))
        .env("ACODE_KNOWN_HOSTS", optional(&ready.known_hosts_path))
        .env("ACODE_HOST_KEY_FINGERPRINT", &ready.host_key_fingerprint)
        .env("ACODE_PUBLIC_IP", optional(&ready.public_ip))
        .env("ACODE_PRIVATE_IP", optional(&ready.private_ip))
        .env("ACODE_WAS_SPOT", ready.was_spot.to_string())
        .status()
        .await
        .with_context(|| format!("cannot run the --on-ready command `{command}`"))?;
    if status.success() {
        return Ok(ExitCode::SUCCESS);
    }
    errln!(
        "warning: the --on-ready command failed ({status}); session {} is Ready and tracked \
         (`acode-ec2 teardown {}` removes it)",
        ready.session_id,
        ready.session_id
    );
    Ok(ExitCode::from(3))
}

/// An OpenSSH `Host` block that trusts only the verified host key.
fn ssh_config_block(s: &SessionSummary) -> Result<String> {
    let (Some(host), Some(port), Some(user), Some(known_hosts)) =
        (&s.ssh_host, s.ssh_port, &s.ssh_user, &s.known_hosts_path)
    else {
        bail!(
            "session {} is {}, not Ready with a verified host key; `acode-ec2 status {}` says more",
            s.session_id,
            s.phase,
            s.session_id
        );
    };
    let mut block = format!("Host acode-{}\n", s.session_id);
    block.push_str(&format!(
        "    HostName {host}\n    Port {port}\n    User {user}\n"
    ));
    if let Some(key) = &s.key_path {
        block.push_str(&format!("    IdentityFile {key}\n    IdentitiesOnly yes\n"));
    }
    block.push_str(&format!(
        "    UserKnownHostsFile {known_hosts}\n    StrictHostKeyChecking yes\n"
    ));
    Ok(block)
}

/// `status --json`: the summary's fields, and where the time went.
#[derive(serde::Serialize)]
struct StatusView<'a> {
    #[serde(flatten)]
    summary: &'a SessionSummary,
    phases: &'a [PhaseSpan],
    /// The spot request behind the current instance, as last polled.
    #[serde(skip_serializing_if = "Option::is_none")]
    spot: Option<&'a SpotRequestStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spot_savings: Option<&'a SpotSavings>,
    /// The interrupted session this one took over from.
    #[serde(skip_serializing_if = "Option::is_none")]
    replaces: Option<&'a str>,
    /// The session that took over after this one was interrupted.
    #[serde(skip_serializing_if = "Option::is_none")]
    replaced_by: Option<&'a str>,
}

fn print_spot_request(r: &SpotRequestStatus) {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    outln!(
        "spot req  {} (state {}, status {}, price {})",
        r.request_id,
        or_dash(&r.state),
        or_dash(&r.status_code),
        or_dash(&r.price)
    );
}

fn print_phases(phases: &[PhaseSpan]) {
    let Some(first) = phases.first() else {
        return;
    };
    outln!("phases");
    for span in phases {
        let start = Duration::from_millis(span.entered_at_ms.saturating_sub(first.entered_at_ms));
        let took = span.duration_ms.map_or_else(
            || "(now)".to_string(),
            |ms| format!("{:.1} s", ms as f64 / 1000.0),
        );
        let answers = match span.attempts {
            1 => "1 answer".to_string(),
            n => format!("{n} answers"),
        };
        outln!(
            "  +{:>6.1} s  {:<19} {:>9}  {answers}",
            start.as_secs_f64(),
            span.phase.name(),
            took
        );
    }
}

fn print_summary(s: &SessionSummary) {
    // A finished session's instance and key are history, not something to use.
    let gone = if s.phase.is_terminal() { " (gone)" } else { "" };
    outln!("session   {}", s.session_id);
    outln!("phase     {}", s.phase);
    outln!(
        "instance  {}{gone}",
        s.instance_id.as_deref().unwrap_or("-")
    );
    outln!("public ip {}", s.public_ip.as_deref().unwrap_or("-"));
    let key_gone = match &s.key_path {
        Some(path) if !Path::new(path).exists() => " (deleted)",
        _ => "",
    };
    outln!(
        "key       {}{key_gone}",
        s.key_path.as_deref().unwrap_or("-")
    );
    outln!("spot      {}", s.was_spot);
    if let (Some(host), Some(port)) = (&s.ssh_host, s.ssh_port) {
        let user = s.ssh_user.as_deref().unwrap_or("?");
        outln!("ssh       {user}@{host} port {port}{gone}");
    }
    if let Some(print) = &s.host_key_fingerprint {
        outln!("host key  {print} (verified){gone}");
    }
    if let Some(path) = &s.known_hosts_path {
        outln!("known     {path}");
    }
    if let Some(detail) = &s.detail {
        outln!("detail    {detail}");
    }
}

/// A live bar with phase and elapsed time on a terminal; plain lines otherwise.
struct ProgressDisplay {
    bar: Option<ProgressBar>,
    /// Plain lines when there is no bar (off beside JSON logs).
    lines: bool,
    last_line: Mutex<String>,
    session: Mutex<Option<String>>,
}

impl ProgressDisplay {
    /// A bar on a terminal, plain lines otherwise, nothing beside JSON logs.
    fn new(logs: LogFormat) -> ProgressDisplay {
        let bar = (logs == LogFormat::Text && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(100);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos:>3}% {prefix:<19} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        ProgressDisplay {
            bar,
            lines: logs == LogFormat::Text,
            last_line: Mutex::new(String::new()),
            session: Mutex::new(None),
        }
    }

    fn session(&self) -> Option<String> {
        self.session.lock().ok().and_then(|s| s.clone())
    }

    /// A line for the user beside the progress display.
    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => errln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl ProgressSink for ProgressDisplay {
    fn progress(&self, p: &ProvisionProgress) {
        if let Ok(mut slot) = self.session.lock() {
            slot.get_or_insert_with(|| p.session_id.clone());
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(u64::from(p.percent_complete));
                bar.set_prefix(p.phase.name());
                bar.set_message(p.message.clone());
            }
            None if !self.lines => {}
            None => {
                let line = format!("{:<19} {}", p.phase.name(), p.message);
                let mut last = cli::lock(&self.last_line);
                // Polls repeat the same line; print it once.
                if *last != line {
                    errln!("[{:>6.1}s] {line}", p.elapsed.as_secs_f64());
                    *last = line;
                }
            }
        }
    }
}
