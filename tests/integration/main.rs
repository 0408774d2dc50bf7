//! Integration tests: the driver against a scripted world (crash injection)
//! and the whole engine and CLI against the local EC2 lab (moto + sshd).

mod cli;
mod common;
mod crash;
mod crashing;
mod deliver;
mod fake_world;
mod fault_matrix;
mod foreign_answers;
mod fuzz;
mod kill_campaign;
mod lab;
mod lab_behaviour;
mod lab_engine;
mod lab_fleet;
mod lab_guidance;
mod lab_interruption;
mod lab_readiness;
mod lab_spot;
mod live;
mod observability;
mod secrets;
mod store_failures;
