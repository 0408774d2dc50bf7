//! acode-ec2 provisions one EC2 instance per coding-agent session and leaves
//! either a Ready instance it tracks, or nothing at all, whatever happens
//! (a `kill -9` included).
//!
//! # Layout
//!
//! | module | what it is | the invariant it keeps |
//! |---|---|---|
//! | [`machine`] | phases, inputs, effects, the transition table | pure: no async, IO or clock; every step is a table row; `Failed` only after cleanup |
//! | [`store`] | `CheckpointStore`, SQLite event log + session row | intent commits before its effect; one live driver per session (lease); no secrets stored |
//! | [`driver`] | the engine: `provision`, `resume`, `teardown`, `recover` | load, step, commit, execute, record; a crash anywhere is resumable |
//! | [`effects`] | EC2 (aws-sdk-ec2), SSH probe (russh), key files, console parser; one DescribeInstances batcher per process | every failure becomes a machine input; every effect is idempotent |
//! | [`events`] | typed events and progress for library callers | never carry key material |
//! | [`request`], [`config`] | the request model and its YAML form | a request is valid or refused naming the key |
//! | [`net_guard`] | loopback-only guard for tests and the lab | with it on, nothing but 127.0.0.0/8 and ::1 is ever connected |
//!
//! # Flow
//!
//! ```text
//! cli ──▶ driver ──▶ machine   (pure)
//!            ├──▶ store        (SQLite: sessions + append-only event log)
//!            └──▶ effects      (EC2, SSH, key files)
//! ```
//!
//! A session starts in `Validating`; each step records the new phase and
//! the intent of the effect it needs (with its `ClientToken` or key pair
//! name) in one transaction, runs the effect, and records the outcome with
//! the next step. `recover` finishes every session that is neither Ready
//! nor finished.

pub mod config;
pub mod driver;
pub mod effects;
pub mod events;
pub mod machine;
pub mod net_guard;
pub mod request;
pub mod store;
