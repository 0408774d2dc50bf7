//! What library callers hear while sessions run: typed events for
//! subscribers, and progress updates for whoever started the work.
//!
//! Invariant: events carry ids, phases, addresses and reasons only: never
//! key material.

use std::time::Duration;

use serde::Serialize;

use crate::machine::PhaseKind;

/// Broadcast to every subscriber of an engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event")]
pub enum ProvisionEvent {
    ProvisionStarted {
        session_id: String,
        instance_type: String,
        use_spot: bool,
        at_ms: u64,
    },
    ProvisionPhaseChanged {
        session_id: String,
        from: PhaseKind,
        to: PhaseKind,
        at_ms: u64,
    },
    SpotFallback {
        session_id: String,
        reason: String,
        at_ms: u64,
    },
    ProvisionCompleted {
        session_id: String,
        success: bool,
        phase: PhaseKind,
        instance_id: Option<String>,
        public_ip: Option<String>,
        was_spot: bool,
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
