//! Fuzzing by long proptest runs: the three parsers that read bytes from
//! outside (the instance console, the config file, the event log in the
//! state database) never panic on any input, and every config error names
//! the key or the line it is about.
//!
//! CI runs a smoke of 2,000 inputs per target. The long run (README,
//! "Fuzzing"): `ACODE_FUZZ_CASES=1000000 scripts/test.sh --test integration
//! fuzz` (a debug build takes 2–10 minutes per target).

use acode_ec2::config::{self, ParseError};
use acode_ec2::effects::console::host_key_fingerprints;
use acode_ec2::store::LogEntry;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Inputs per target: `ACODE_FUZZ_CASES`, or a CI-sized smoke.
fn cases() -> u32 {
    std::env::var("ACODE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        // Failures are minimized but not written beside the sources.
        failure_persistence: None,
        ..Config::default()
    })
}

/// A valid input mutated: bytes replaced, deleted, or spliced in.
fn mutated(seed: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 0..12);
    edits.prop_map(move |edits| {
        let mut bytes = seed.as_bytes().to_vec();
        for (at, kind, byte) in edits {
            if bytes.is_empty() {
                bytes.push(byte);
                continue;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = byte,
                1 => {
                    bytes.remove(i);
                }
                _ => bytes.insert(i, byte),
            }
        }
        bytes
    })
}

/// Structured inputs and raw ones, half each.
fn inputs(seed: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![mutated(seed), prop::collection::vec(any::<u8>(), 0..512)]
}

const CONSOLE: &str = "[   12.3] cloud-init[801]: ok\r\n\
ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n\
ec2: 256 SHA256:kPYpdLKD6tVMXIF9YUc3B5uggYz54+pai/dLRRN4TZE root@ip-10-0-0-1 (ED25519)\n\
ec2: -----END SSH HOST KEY FINGERPRINTS-----\n\
-----BEGIN SSH HOST KEY KEYS-----\n\
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl root@ip\n\
-----END SSH HOST KEY KEYS-----\n";

#[test]
fn fuzz_console_parser() {
    runner()
        .run(&inputs(CONSOLE), |bytes| {
            if let Some(prints) = host_key_fingerprints(&bytes) {
                prop_assert!(!prints.0.is_empty());
                prop_assert!(prints.0.iter().all(|p| p.starts_with("SHA256:")));
            }
            Ok(())
        })
        .expect("console parser");
}

const CONFIG: &str = "ec2Target:\n  amiId: ami-0123\n  instanceType: t3.micro\n  \
subnetId: subnet-1\n  securityGroupIds: [sg-1]\n  useSpot: true\n  spotMaxPrice: \"0.05\"\n  \
ebsSizeGb: 20\n  pollInterval: 5s\n  sshTimeout: 5m\n  tags:\n    team: x\n  ssh:\n    \
user: ec2-user\n    retries: 30\n";

#[test]
fn fuzz_config_loader() {
    runner()
        .run(&inputs(CONFIG), |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            match config::parse(&text) {
                Ok(request) => prop_assert!(request.check().is_ok()),
                // YAML that does not fit: the parser says where.
                Err(ParseError::Yaml(message)) => prop_assert!(
                    message.contains("line") || message.contains("missing field"),
                    "no line or key in {message:?} for {text:?}"
                ),
                // A value that is wrong: the key it belongs to.
                Err(ParseError::Invalid(invalid)) => prop_assert!(!invalid.key.is_empty()),
            }
            Ok(())
        })
        .expect("config loader");
}

const EVENT: &str = r#"{"event":"Intent","intent":{"effect":{"DescribeInstance":{"instance_id":"i-0123","spot_request_id":null}},"not_before":1700000005000}}"#;

#[test]
fn fuzz_event_log_decoder() {
    runner()
        .run(&inputs(EVENT), |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            // What the store does with a row's body; a decoded entry
            // encodes back to itself.
            if let Ok(entry) = serde_json::from_str::<LogEntry>(&text) {
                let again = serde_json::to_string(&entry).expect("encode");
                prop_assert_eq!(serde_json::from_str::<LogEntry>(&again).ok(), Some(entry));
            }
            Ok(())
        })
        .expect("event log decoder");
}
