//! Deterministic RunInstances idempotency tokens.
//!
//! Invariant: the token is a pure function of (session, attempt, capacity
//! type, subnet), at most 64 ASCII characters, so a resumed session re-sends
//! the very token it recorded and EC2 answers with the same instance, while a
//! changed parameter (spot → on-demand, another subnet) always comes with a
//! new attempt and so a new token (EC2 would answer
//! `IdempotentParameterMismatch` otherwise).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientToken(String);

/// EC2's limit on `ClientToken`.
pub const MAX_CLIENT_TOKEN_LEN: usize = 64;

impl ClientToken {
    pub fn derive(session_id: &str, attempt: u32, spot: bool, subnet_id: &str) -> ClientToken {
        let capacity = if spot { "spot" } else { "od" };
        let digest = Sha256::new()
            .chain_update(session_id.as_bytes())
            .chain_update([0])
            .chain_update(attempt.to_be_bytes())
            .chain_update(capacity.as_bytes())
            .chain_update([0])
            .chain_update(subnet_id.as_bytes())
            .finalize();
        let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
        // Readable prefix for operators reading CloudTrail; the digest makes it unique.
        ClientToken(format!("acode-{attempt}-{capacity}-{hex}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_parameters_same_token() {
        let a = ClientToken::derive("s-1", 0, true, "subnet-a");
        assert_eq!(a, ClientToken::derive("s-1", 0, true, "subnet-a"));
    }

    #[test]
    fn any_changed_parameter_changes_the_token() {
        let base = ClientToken::derive("s-1", 0, true, "subnet-a");
        for other in [
            ClientToken::derive("s-2", 0, true, "subnet-a"),
            ClientToken::derive("s-1", 1, true, "subnet-a"),
            ClientToken::derive("s-1", 0, false, "subnet-a"),
            ClientToken::derive("s-1", 0, true, "subnet-b"),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn token_fits_ec2_limit_even_for_huge_attempts() {
        let t = ClientToken::derive(&"x".repeat(500), u32::MAX, true, &"y".repeat(300));
        assert!(
            t.as_str().len() <= MAX_CLIENT_TOKEN_LEN,
            "{}",
            t.as_str().len()
        );
        assert!(t.as_str().is_ascii());
    }
}
