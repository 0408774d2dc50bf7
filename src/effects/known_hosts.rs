//! The session's known_hosts file: the host key an SSH login verified,
//! for the user's own `ssh -o UserKnownHostsFile=… -o StrictHostKeyChecking=yes`.
//!
//! Invariant: the file holds exactly the verified key, is written whole
//! (aside, then renamed) with mode 0600, and goes when the instance does.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::request::parse_host_port;

/// The known_hosts line for `key` (`algorithm base64`) at `endpoint`
/// (`host:port`): a non-standard port is written `[host]:port`.
pub fn line(endpoint: &str, key: &str) -> Option<String> {
    let (host, port) = parse_host_port(endpoint)?;
    let pattern = if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    };
    Some(format!("{pattern} {key}\n"))
}

/// Writes the file, replacing an earlier one (a re-run after a crash).
pub fn write(path: &str, endpoint: &str, key: &str) -> std::io::Result<()> {
    let text = line(endpoint, key).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{endpoint}` is not host:port"),
        )
    })?;
    if let Some(dir) = Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let partial = format!("{path}.partial");
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Removes the file (and a write a crash cut short); gone already is fine.
pub fn remove(path: &str) -> std::io::Result<()> {
    for file in [path.to_string(), format!("{path}.partial")] {
        super::keys::remove_file_if_present(&file)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn lines_name_non_standard_ports_in_brackets() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE";
        assert_eq!(
            line("127.0.0.1:2222", key).unwrap(),
            format!("[127.0.0.1]:2222 {key}\n")
        );
        assert_eq!(
            line("10.0.0.5:22", key).unwrap(),
            format!("10.0.0.5 {key}\n")
        );
        assert_eq!(
            line("[::1]:2222", key).unwrap(),
            format!("[::1]:2222 {key}\n")
        );
        assert_eq!(line("nonsense", key), None);
    }

    #[test]
    fn the_file_is_private_replaced_whole_and_removable() {
        let dir = tempfile::tempdir().unwrap();
        // The key folder may not exist yet (the user's own key lives elsewhere).
        let path = dir.path().join("keys/s.known_hosts");
        let path = path.to_str().unwrap();
        write(path, "127.0.0.1:2222", "ssh-ed25519 AAAA1").unwrap();
        write(path, "127.0.0.1:2222", "ssh-ed25519 AAAA2").unwrap();
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            "[127.0.0.1]:2222 ssh-ed25519 AAAA2\n"
        );
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        remove(path).unwrap();
        assert!(!Path::new(path).exists());
        remove(path).unwrap();
    }
}
