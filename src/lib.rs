//! acode-ec2: provisions one EC2 instance per coding-agent session and leaves
//! either a Ready instance it tracks, or nothing at all.
pub mod config;
pub mod driver;
pub mod effects;
pub mod events;
pub mod machine;
pub mod net_guard;
pub mod request;
pub mod store;
