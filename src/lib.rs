//! acode-ec2: provisions one EC2 instance per coding-agent session and leaves
//! either a Ready instance it tracks, or nothing at all.
pub mod machine;
pub mod request;
pub mod config;
pub mod store;
pub mod effects;
pub mod net_guard;
pub mod driver;
pub mod events;
