//! acode-ec2 provisions one EC2 instance per coding-agent session and leaves
//! either a Ready instance it tracks, or nothing at all, whatever happens
//! (a `kill -9` included).
//!
//! # Layout
//!
//! | module | what it is | the invariant it keeps |
//! |---|---|---|
//! | [`machine`] | phases, inputs, guards, effects, the transition table; subnet ranking and spot savings ([`machine::placement`]) | pure: no async, IO or clock; every decision (grace periods, give-ups, fallbacks, teardown, where to launch) is a guarded table row or a function of checkpointed facts; `Failed` only after cleanup |
//! | [`store`] | `CheckpointStore` (async, backend-neutral), SQLite event log + session row | intent commits before its effect; one live driver per session (lease, judged by the store's clock); no secrets stored |
//! | [`driver`] | the engine: `provision`, `resume`, `deliver`, `teardown`, `recover`, and the spot interruption `watch` | load, step, commit, execute, record; outside inputs (teardown, interruption notices) take the same checkpoint path; a crash anywhere is resumable; a replacement is started at most once (its id is derived) |
//! | [`effects`] | EC2 call stack (SDK ▸ batching), interruption checks (IMDS over SSH, else the EC2 API) and the shutdown command, placement facts (scores, prices, recent capacity failures shared by a process), SSH probe (russh), key files, console parser | effects report facts, never conclusions; every effect is idempotent; placement never fails a launch |
//! | [`error_code`] | EC2 error codes parsed once, and their classes | no other module matches code strings |
//! | [`observe`] | one `Observer` fan-out: tracing, event channel, progress | observers see no key material and change nothing |
//! | [`telemetry`] | metric names; every EC2 call logged (action, duration, request id, code) and counted | labels never carry ids or key material |
//! | [`clock`] | `Clock`: the system clock, a manual one for tests, or one that skips idle waits for benches | the machine never reads a clock; the driver passes `now` in |
//! | [`events`] | typed events and progress for library callers | never carry key material |
//! | [`request`], [`config`] | the request model and its YAML form | a request is valid or refused naming the key |
//! | [`iam_policy`] | the least-privilege policy the engine needs | grants exactly the EC2 and Price List actions the engine calls |
//! | [`net_guard`] | loopback-only guard for tests and the lab | with it on, nothing but 127.0.0.0/8 and ::1 is ever connected |
//!
//! # Flow
//!
//! ```text
//! cli ──▶ driver ──▶ machine   (pure)
//!            ├──▶ store        (async trait; SQLite: sessions + append-only event log)
//!            ├──▶ effects      (SdkEc2 ▸ Batched ▸ AwsEffects; SSH; key files)
//!            └──▶ observers    (tracing, events, progress)
//! ```
//!
//! A session starts in `Validating`; each step records the new phase and
//! the intent of the effect it needs (with its `ClientToken` or key pair
//! name) in one transaction, runs the effect, and records the outcome with
//! the next step. `recover` finishes every session that is neither Ready
//! nor finished.
//!
//! # Adding a phase: five places, each checked by the compiler or a test
//!
//! 1. `machine/phase.rs`: the phase's struct and its variant in
//!    `ProvisionPhase` ([`machine::PhaseKind`], its name and parsing are
//!    derived from it), and its `percent_complete` (the match is exhaustive);
//! 2. `machine/table.rs`: its rows, each with the guards that pick it;
//! 3. `machine/decide.rs`: its handler, called from `decide`'s exhaustive match;
//! 4. `machine/mod.rs`: its effect in `effect_for` (exhaustive match);
//! 5. `machine/tests.rs`: a sample of it in `phases()` (a test fails if a
//!    kind has none, and another if a table row is never taken).
//!
//! Then regenerate the diagrams (`acode-ec2 diagram`), or a test fails.
//! Adding an input is the same list with `Input` in `machine/effect.rs`
//! (and `possible_outcomes` if an effect answers with it).

pub mod clock;
pub mod config;
pub mod driver;
pub mod effects;
pub mod error_code;
pub mod events;
pub mod iam_policy;
pub mod machine;
pub mod net_guard;
pub mod observe;
pub mod request;
pub mod store;
pub mod telemetry;

/// Locks `mutex`, poisoned or not: the crate's shared maps and counters are
/// written whole under their locks, so a panic elsewhere leaves none torn.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
