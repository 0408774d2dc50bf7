//! What library callers hear while sessions run: typed events for
//! subscribers, and progress updates for whoever started the work.
//!
//! Invariant: events carry ids, phases, addresses and reasons only: never
//! key material.

use std::time::Duration;

use serde::Serialize;

use crate::machine::{InterruptionNotice, PhaseKind, Ready, SessionContext};
use crate::request::parse_host_port;

/// A session that reached Ready: everything needed to use the instance
/// with the host key that was verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadyInstance {
    pub session_id: String,
    pub instance_id: String,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    /// `host:port`, as the SSH check reached it.
    pub ssh_endpoint: String,
    pub ssh_host: String,
    pub ssh_port: u16,
    pub ssh_user: String,
    pub key_path: Option<String>,
    pub host_key_fingerprint: String,
    /// A file holding exactly the verified host key, for `ssh -o
    /// UserKnownHostsFile=…` (absent for sessions made before it existed).
    pub known_hosts_path: Option<String>,
    pub was_spot: bool,
    /// The spot request behind a spot instance.
    pub spot_request_id: Option<String>,
    /// What a spot instance saves against on-demand, in one line (or why
    /// that is unknown).
    pub spot_savings: Option<String>,
}

impl ReadyInstance {
    pub fn new(ctx: &SessionContext, ready: &Ready) -> ReadyInstance {
        let (ssh_host, ssh_port) = parse_host_port(&ready.ssh_endpoint)
            .unwrap_or_else(|| (ready.ssh_endpoint.clone(), 22));
        ReadyInstance {
            session_id: ctx.session_id.clone(),
            instance_id: ready.instance.instance_id.clone(),
            public_ip: ready.public_ip.clone(),
            private_ip: ready.private_ip.clone(),
            ssh_endpoint: ready.ssh_endpoint.clone(),
            ssh_host,
            ssh_port,
            ssh_user: ctx.request.ssh.user.clone(),
            key_path: ready.instance.key.private_key_path.clone(),
            host_key_fingerprint: ready.host_key_fingerprint.clone(),
            known_hosts_path: (!ready.host_key.is_empty()).then(|| ctx.known_hosts_path()),
            was_spot: ready.instance.was_spot,
            spot_request_id: (ready.instance.spot_request.as_ref()).map(|r| r.request_id.clone()),
            spot_savings: ready.instance.savings.as_ref().map(ToString::to_string),
        }
    }

    /// A command line that logs in trusting only the verified host key.
    pub fn ssh_command(&self) -> String {
        let mut parts = vec!["ssh".to_string()];
        if let Some(key) = &self.key_path {
            parts.push(format!("-i {key}"));
        }
        if let Some(known_hosts) = &self.known_hosts_path {
            parts.push(format!(
                "-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
            ));
        }
        if self.ssh_port != 22 {
            parts.push(format!("-p {}", self.ssh_port));
        }
        parts.push(format!("{}@{}", self.ssh_user, self.ssh_host));
        parts.join(" ")
    }
}

/// A Ready spot instance EC2 gave notice on: what an interruption hook
/// (and `watch --on-interruption`) is told, while it can still act.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterruptedInstance {
    pub session_id: String,
    pub instance_id: String,
    /// `terminate`, `stop` or `hibernate`.
    pub action: String,
    /// When EC2 acts, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Where the notice was read.
    pub source: String,
    pub ssh_host: String,
    pub ssh_port: u16,
    pub ssh_user: String,
    pub key_path: Option<String>,
    pub known_hosts_path: Option<String>,
}

impl InterruptedInstance {
    pub fn new(ctx: &SessionContext, ready: &Ready, notice: &InterruptionNotice) -> Self {
        let at = ReadyInstance::new(ctx, ready);
        InterruptedInstance {
            session_id: at.session_id,
            instance_id: at.instance_id,
            action: notice.action.clone(),
            time_ms: notice.at.0,
            source: notice.source.clone(),
            ssh_host: at.ssh_host,
            ssh_port: at.ssh_port,
            ssh_user: at.ssh_user,
            key_path: at.key_path,
            known_hosts_path: at.known_hosts_path,
        }
    }
}

/// Broadcast to every subscriber of an engine.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event")]
pub enum ProvisionEvent {
    ProvisionStarted {
        session_id: String,
        instance_type: String,
        /// The AWS region the session's calls go to, when known.
        region: Option<String>,
        use_spot: bool,
        at_ms: u64,
    },
    ProvisionPhaseChanged {
        session_id: String,
        from: PhaseKind,
        to: PhaseKind,
        at_ms: u64,
    },
    /// The specification's `SpotFallbackEvent`.
    SpotFallback {
        session_id: String,
        /// The spot request given up (cancelled first), when there was one.
        spot_request_id: Option<String>,
        reason: String,
        at_ms: u64,
    },
    /// FR-036: a spot session is Ready; what it saves against on-demand.
    SpotSavings {
        session_id: String,
        instance_id: String,
        /// USD per hour; `None` when unknown (see `unknown_reason`).
        spot_price: Option<f64>,
        on_demand_price: Option<f64>,
        savings_percent: Option<f64>,
        unknown_reason: Option<String>,
        /// One line for people: "spot $0.003100/h against …: 70.1% saved".
        summary: String,
    },
    /// FR-033/034: EC2 gave notice of taking a Ready spot instance back.
    InterruptionNotice {
        session_id: String,
        instance_id: String,
        action: String,
        time_ms: u64,
        source: String,
    },
    /// A new session takes over from an interrupted one.
    SessionReplaced {
        session_id: String,
        replacement: String,
    },
    ProvisionCompleted {
        session_id: String,
        success: bool,
        phase: PhaseKind,
        instance_id: Option<String>,
        public_ip: Option<String>,
        was_spot: bool,
        /// From the session's creation to now, whoever drove it.
        duration_ms: u64,
        error: Option<String>,
    },
}

impl ProvisionEvent {
    pub fn session_id(&self) -> &str {
        match self {
            ProvisionEvent::ProvisionStarted { session_id, .. }
            | ProvisionEvent::ProvisionPhaseChanged { session_id, .. }
            | ProvisionEvent::SpotFallback { session_id, .. }
            | ProvisionEvent::SpotSavings { session_id, .. }
            | ProvisionEvent::InterruptionNotice { session_id, .. }
            | ProvisionEvent::SessionReplaced { session_id, .. }
            | ProvisionEvent::ProvisionCompleted { session_id, .. } => session_id,
        }
    }
}

/// A progress update for the caller driving one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProvisionProgress {
    pub session_id: String,
    pub phase: PhaseKind,
    pub message: String,
    pub percent_complete: u8,
    pub instance_id: Option<String>,
    pub elapsed: Duration,
}

/// Receives progress updates; closures work too.
pub trait ProgressSink: Send + Sync {
    fn progress(&self, update: &ProvisionProgress);
}

impl<F: Fn(&ProvisionProgress) + Send + Sync> ProgressSink for F {
    fn progress(&self, update: &ProvisionProgress) {
        self(update)
    }
}

/// For callers who do not want progress.
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn progress(&self, _: &ProvisionProgress) {}
}
