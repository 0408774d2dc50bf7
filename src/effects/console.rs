//! Parses the SSH host keys cloud-init prints to the instance console.
//!
//! Invariant: only complete blocks count (BEGIN and END both seen), so a
//! console caught mid-write yields nothing rather than half a set; the input
//! may hold kernel noise, syslog tag prefixes (`ec2: `), CRLF line ends and
//! bytes that are not UTF-8.

use ssh_key::{HashAlg, PublicKey};

use crate::machine::ConsoleFingerprints;

const FINGERPRINTS: (&str, &str) = (
    "-----BEGIN SSH HOST KEY FINGERPRINTS-----",
    "-----END SSH HOST KEY FINGERPRINTS-----",
);
const KEYS: (&str, &str) = (
    "-----BEGIN SSH HOST KEY KEYS-----",
    "-----END SSH HOST KEY KEYS-----",
);

/// The lines strictly between the markers, or `None` without a complete block.
fn block<'a>(lines: &[&'a str], (begin, end): (&str, &str)) -> Option<Vec<&'a str>> {
    let start = lines.iter().rposition(|l| l.contains(begin))?;
    let len = lines[start + 1..].iter().position(|l| l.contains(end))?;
    Some(lines[start + 1..start + 1 + len].to_vec())
}

/// The trusted fingerprints: the `SHA256:` tokens of the fingerprint block
/// and the fingerprints of the keys in the keys block. `None` until at least
/// one complete block with at least one entry is present.
pub fn host_key_fingerprints(console: &[u8]) -> Option<ConsoleFingerprints> {
    let text = String::from_utf8_lossy(console);
    let lines: Vec<&str> = text.split('\n').map(|l| l.trim_end_matches('\r')).collect();
    let mut prints: Vec<String> = Vec::new();
    let mut add = |print: String| {
        if !prints.contains(&print) {
            prints.push(print);
        }
    };
    for line in block(&lines, FINGERPRINTS).unwrap_or_default() {
        if let Some(token) = line
            .split_whitespace()
            .find(|t| t.starts_with("SHA256:") && t.len() > 7)
        {
            add(token.to_string());
        }
    }
    for line in block(&lines, KEYS).unwrap_or_default() {
        // Drop a syslog tag prefix such as `ec2: ` before the key type.
        let key_text = line
            .find("ssh-")
            .or_else(|| line.find("ecdsa-"))
            .map(|at| &line[at..]);
        if let Some(key) = key_text.and_then(|t| PublicKey::from_openssh(t.trim()).ok()) {
            add(key.fingerprint(HashAlg::Sha256).to_string());
        }
    }
    (!prints.is_empty()).then_some(ConsoleFingerprints(prints))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6QPEvF4eC+FxzI9P9MUtmHbUcENOgHu8Xt+wKqpwIl root@host";

    fn ed25519_print() -> String {
        PublicKey::from_openssh(ED25519)
            .unwrap()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    }

    fn realistic_console(print: &str) -> Vec<u8> {
        let mut out =
            b"[    0.000000] Linux version 5.10.0 (gcc)\r\n\xff\xfe garbage \x1b[0m\r\n".to_vec();
        out.extend_from_slice(
            format!(
                "ec2: #############################################################\r\n\
                 ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r\n\
                 ec2: 256 {print} root@ip-10-0-0-1 (ED25519)\r\n\
                 ec2: -----END SSH HOST KEY FINGERPRINTS-----\r\n\
                 ec2: #############################################################\r\n\
                 -----BEGIN SSH HOST KEY KEYS-----\r\n{ED25519}\r\n-----END SSH HOST KEY KEYS-----\r\n\
                 [   12.3] cloud-init[812]: Cloud-init v. 22.2 finished\r\n"
            )
            .as_bytes(),
        );
        out
    }

    #[test]
    fn parses_a_realistic_console_with_noise() {
        let print = ed25519_print();
        let found = host_key_fingerprints(&realistic_console(&print)).unwrap();
        assert_eq!(found.0, vec![print]);
    }

    #[test]
    fn fingerprint_block_alone_is_enough() {
        let text = "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n3072 SHA256:abcDEF root@h (RSA)\n\
                    -----END SSH HOST KEY FINGERPRINTS-----\n";
        assert_eq!(
            host_key_fingerprints(text.as_bytes()).unwrap().0,
            vec!["SHA256:abcDEF"]
        );
    }

    #[test]
    fn incomplete_or_missing_blocks_are_not_ready() {
        assert_eq!(host_key_fingerprints(b""), None);
        assert_eq!(host_key_fingerprints(b"[ 0.1] booting\n"), None);
        let cut = "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 SHA256:abc root@h (ED25519)\n";
        assert_eq!(host_key_fingerprints(cut.as_bytes()), None);
        let empty =
            "-----BEGIN SSH HOST KEY KEYS-----\nnot a key\n-----END SSH HOST KEY KEYS-----\n";
        assert_eq!(host_key_fingerprints(empty.as_bytes()), None);
    }

    proptest::proptest! {
        /// Garbage around a valid block changes nothing; garbage alone yields only SHA256 entries.
        #[test]
        fn garbage_is_survived(noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            if let Some(found) = host_key_fingerprints(&noise) {
                proptest::prop_assert!(found.0.iter().all(|p| p.starts_with("SHA256:")));
            }
            let print = ed25519_print();
            let mut framed = noise.clone();
            framed.push(b'\n');
            framed.extend(realistic_console(&print));
            framed.extend(&noise);
            proptest::prop_assert_eq!(host_key_fingerprints(&framed).map(|f| f.0), Some(vec![print]));
        }
    }
}
