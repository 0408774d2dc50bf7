//! Key pairs and private key files.
//!
//! Invariants:
//! - a private key lives only in memory as a [`PrivateKeyPem`] (zeroed when
//!   dropped, redacted from `{:?}`) and in its key file (mode 0600, written before the key is ever used); it never reaches a
//!   log, an event, an error or the database;
//! - `ensure` is idempotent and repairs a half-done earlier run: EC2 returns
//!   a created private key exactly once, so a pair whose key file is missing
//!   is deleted and created again, and a key file without its pair is
//!   replaced.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use ssh_key::rand_core::UnwrapErr;
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use zeroize::Zeroizing;

use super::api::Ec2Api;
use super::ec2::{failed, session_tags};
use super::guidance;
use crate::error_code::{AwsErrorCode, ErrorClass, LocalRefusal};
use crate::machine::{Input, KeyPairHandle, SessionContext, Timestamp};
use crate::request::{KeyAlgorithm, KeyPairMode};

/// A private key as PEM (OpenSSH) text: zeroed when dropped, and never
/// printed, `{:?}` included, so no log, assert or error can carry it.
pub struct PrivateKeyPem(Zeroizing<String>);

impl PrivateKeyPem {
    pub fn new(pem: Zeroizing<String>) -> PrivateKeyPem {
        PrivateKeyPem(pem)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKeyPem([redacted])")
    }
}

/// A key file in the key folder acode-ec2 manages.
fn file_failure(what: &str, path: &str, err: std::io::Error) -> Input {
    key_file_failure(what, path, err, "the key folder (--key-dir)")
}

/// A key file the config names: the fix is in the config, not the folder.
fn config_file_failure(key: &str, path: &str, err: std::io::Error) -> Input {
    key_file_failure("read", path, err, &format!("{key} in the config"))
}

fn key_file_failure(what: &str, path: &str, err: std::io::Error, check: &str) -> Input {
    Input::Rejected {
        code: LocalRefusal::KeyFile.into(),
        message: format!("cannot {what} key file {path}: {err}; check {check} and its permissions"),
    }
}

/// Writes a private key to a new file readable only by its owner.
pub fn write_private_key(path: &str, pem: &PrivateKeyPem) -> std::io::Result<()> {
    let pem = pem.as_str();
    let target = Path::new(path);
    if target.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "refusing to overwrite an existing key file",
        ));
    }
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // Write aside, then rename: a crash leaves either no key file or a whole one.
    let partial = partial_path(path);
    remove_file_if_present(&partial)?;
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(pem.as_bytes())?;
        if !pem.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        file.sync_all()?;
        std::fs::rename(&partial, target)
    })();
    if written.is_err() {
        // Key material must not linger beside a failed write.
        let _ = remove_file_if_present(&partial);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// Where a key file is written before it is renamed into place.
fn partial_path(path: &str) -> String {
    format!("{path}.partial")
}

/// Removes a file; one that is not there is fine, and so is a path through
/// something that is not a folder (it cannot hold the file), or cleanup of
/// a session whose key folder is a file would never end.
pub fn remove_file_if_present(path: &str) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Err(e)
        }
        _ => Ok(()),
    }
}

/// Generates a key locally: (private key in OpenSSH format, public key line).
pub fn generate(algorithm: KeyAlgorithm) -> Result<(PrivateKeyPem, String), ssh_key::Error> {
    let mut rng = UnwrapErr(ssh_key::getrandom::SysRng);
    let algorithm = match algorithm {
        KeyAlgorithm::Ed25519 => Algorithm::Ed25519,
        KeyAlgorithm::Rsa => Algorithm::Rsa { hash: None },
    };
    let key = PrivateKey::random(&mut rng, algorithm)?;
    let public = key.public_key().to_openssh()?;
    Ok((PrivateKeyPem::new(key.to_openssh(LineEnding::LF)?), public))
}

fn public_key_of(path: &str) -> Result<String, ssh_key::Error> {
    PrivateKey::read_openssh_file(Path::new(path))?
        .public_key()
        .to_openssh()
}

pub async fn ensure(
    api: &impl Ec2Api,
    ctx: &SessionContext,
    created: Timestamp,
    key_name: &str,
    path: Option<&str>,
) -> Input {
    let ready = Input::KeyPairReady {
        key: KeyPairHandle {
            key_name: key_name.to_string(),
            private_key_path: path.map(str::to_string),
            ..ctx.planned_key()
        },
    };
    // A temporary pair without its key file is useless (EC2 hands out the
    // private key once), so it is created at once: a pair by that name in
    // the way is replaced when CreateKeyPair reports it.
    let look_up = !matches!(ctx.request.key_pair, KeyPairMode::Temporary { .. })
        || path.is_some_and(holds_a_key);
    let exists = if look_up {
        match api.key_pair_exists(key_name).await {
            Ok(exists) => exists,
            Err(failure) => return failed(failure),
        }
    } else {
        false
    };
    let (algorithm, import) = match &ctx.request.key_pair {
        KeyPairMode::Existing {
            private_key_path, ..
        } => {
            if !exists {
                return Input::Rejected {
                    code: LocalRefusal::KeyPairMissing.into(),
                    message: guidance::missing_key_pair(key_name, &api.region()),
                };
            }
            if let Err(e) = std::fs::metadata(private_key_path) {
                return config_file_failure("privateKeyPath", private_key_path, e);
            }
            return ready;
        }
        KeyPairMode::ImportOwn {
            public_key_path,
            private_key_path,
        } => {
            if exists {
                // Imported by an earlier run of this same intent.
                return ready;
            }
            let public = match own_public_key(public_key_path, private_key_path) {
                Ok(public) => public,
                Err(input) => return input,
            };
            let tags = session_tags(ctx, created);
            return match import_pair(api, key_name, &public, &tags, false).await {
                Ok(()) => ready,
                Err(input) => input,
            };
        }
        KeyPairMode::Temporary { algorithm } => (*algorithm, false),
        KeyPairMode::Import { algorithm } => (*algorithm, true),
    };
    let Some(path) = path else {
        return Input::Rejected {
            code: LocalRefusal::KeyFile.into(),
            message: "an owned key pair needs a key file path".into(),
        };
    };
    let file_exists = holds_a_key(path);
    if exists && file_exists {
        return ready;
    }
    let tags = session_tags(ctx, created);
    // Import mode can finish a run that wrote the file but crashed before
    // the import; an unreadable file is no use and is started over.
    if import
        && file_exists
        && let Ok(public) = public_key_of(path)
    {
        return match import_pair(api, key_name, &public, &tags, false).await {
            Ok(()) => ready,
            Err(input) => input,
        };
    }
    let fresh = Fresh {
        key_name,
        path,
        algorithm,
        import,
        pair_exists: exists,
    };
    match create_afresh(api, &tags, fresh).await {
        Ok(()) => ready,
        Err(input) => input,
    }
}

/// A key file counts only if it holds a loadable key.
fn holds_a_key(path: &str) -> bool {
    Path::new(path).exists() && russh::keys::load_secret_key(path, None).is_ok()
}

/// The user's public key line, after checking it is ed25519 or RSA and
/// belongs to their private key (which the SSH check logs in with, so it
/// must load without a passphrase).
pub fn own_public_key(public_key_path: &str, private_key_path: &str) -> Result<String, Input> {
    let refuse = |message: String| Input::Rejected {
        code: LocalRefusal::KeyFile.into(),
        message,
    };
    let text = std::fs::read_to_string(public_key_path)
        .map_err(|e| config_file_failure("keyPair.publicKeyPath", public_key_path, e))?;
    let public = ssh_key::PublicKey::from_openssh(text.trim()).map_err(|e| {
        refuse(format!(
            "{public_key_path} is not an OpenSSH public key ({e}); give the .pub file"
        ))
    })?;
    if !matches!(
        public.algorithm(),
        Algorithm::Ed25519 | Algorithm::Rsa { .. }
    ) {
        return Err(refuse(format!(
            "{public_key_path} is a {} key; EC2 imports ed25519 and RSA keys",
            public.algorithm()
        )));
    }
    let private = russh::keys::load_secret_key(private_key_path, None).map_err(|e| {
        refuse(format!(
            "cannot use private key {private_key_path} ({e}); it must be readable and not \
             passphrase-protected, as the SSH check logs in with it"
        ))
    })?;
    if private.public_key().key_data() != public.key_data() {
        return Err(refuse(format!(
            "{public_key_path} is not the public half of {private_key_path}"
        )));
    }
    public
        .to_openssh()
        .map_err(|e| refuse(format!("cannot encode {public_key_path}: {e}")))
}

/// What `create_afresh` creates, and whether a stale pair must go first.
struct Fresh<'a> {
    key_name: &'a str,
    path: &'a str,
    algorithm: KeyAlgorithm,
    import: bool,
    pair_exists: bool,
}

/// Deletes whatever half exists, then creates pair and file afresh.
async fn create_afresh(
    api: &impl Ec2Api,
    tags: &[(String, String)],
    fresh: Fresh<'_>,
) -> Result<(), Input> {
    let Fresh {
        key_name,
        path,
        algorithm,
        import,
        pair_exists,
    } = fresh;
    if pair_exists {
        // Its private key is lost (EC2 hands it out once): the pair is useless.
        delete_pair(api, key_name).await?;
    }
    remove_file_if_present(path).map_err(|e| file_failure("remove stale", path, e))?;
    if import {
        let (private, public) = generate(algorithm).map_err(|e| Input::Rejected {
            code: LocalRefusal::KeyGeneration.into(),
            message: e.to_string(),
        })?;
        // File first: the pair is useless without it, and the import can be redone from it.
        write_private_key(path, &private).map_err(|e| file_failure("write", path, e))?;
        let imported = import_pair(api, key_name, &public, tags, pair_exists).await;
        if imported.is_err() && pair_exists {
            // The next try must not take the old pair for this file's: with
            // the file gone it deletes the pair and starts over again.
            remove_file_if_present(path).map_err(|e| file_failure("remove stale", path, e))?;
        }
        return imported;
    }
    let material = create_pair(api, key_name, algorithm, tags, pair_exists).await?;
    write_private_key(path, &material).map_err(|e| file_failure("write", path, e))
}

/// CreateKeyPair. A pair in the way (a create whose answer was lost, or a
/// pair not looked up first) is deleted and the create made once more;
/// still in the way after a delete, EC2 does not show the delete yet, and
/// the next try starts over.
async fn create_pair(
    api: &impl Ec2Api,
    key_name: &str,
    algorithm: KeyAlgorithm,
    tags: &[(String, String)],
    just_deleted: bool,
) -> Result<PrivateKeyPem, Input> {
    let mut deleted = just_deleted;
    loop {
        match api.create_key_pair(key_name, algorithm, tags).await {
            Ok(material) => return Ok(material),
            Err(failure) if failure.is(&AwsErrorCode::InvalidKeyPairDuplicate) && !deleted => {
                delete_pair(api, key_name).await?;
                deleted = true;
            }
            Err(failure) if failure.is(&AwsErrorCode::InvalidKeyPairDuplicate) => {
                return Err(Input::TransientFailure {
                    message: format!("key pair {key_name} still exists; making it again"),
                });
            }
            Err(failure) => return Err(failed(failure)),
        }
    }
}

/// ImportKeyPair. A Duplicate is a lost earlier answer of this same import,
/// unless the session just deleted a stale pair: then it is that old pair
/// (with another public key) still visible, and the import is tried again.
async fn import_pair(
    api: &impl Ec2Api,
    key_name: &str,
    public: &str,
    tags: &[(String, String)],
    just_deleted: bool,
) -> Result<(), Input> {
    match api.import_key_pair(key_name, public, tags).await {
        Ok(()) => Ok(()),
        Err(failure) if failure.is(&AwsErrorCode::InvalidKeyPairDuplicate) => {
            if just_deleted {
                return Err(Input::TransientFailure {
                    message: format!("key pair {key_name} still exists; importing it again"),
                });
            }
            Ok(())
        }
        Err(failure) => Err(failed(failure)),
    }
}

/// DeleteKeyPair; a pair already gone is success. "Not found" is believed
/// only when DescribeKeyPairs agrees: a pair EC2 still lists is deleted again.
async fn delete_pair(api: &impl Ec2Api, key_name: &str) -> Result<(), Input> {
    match api.delete_key_pair(key_name).await {
        Ok(()) => Ok(()),
        Err(failure) if failure.class == ErrorClass::NotFound => {
            match api.key_pair_exists(key_name).await {
                Ok(false) => Ok(()),
                Ok(true) => Err(Input::TransientFailure {
                    message: format!(
                        "{failure}; yet DescribeKeyPairs lists {key_name}, so it is deleted again"
                    ),
                }),
                Err(check) => Err(Input::TransientFailure {
                    message: check.to_string(),
                }),
            }
        }
        // Cleanup must not give up: anything else is retried.
        Err(failure) => Err(Input::TransientFailure {
            message: failure.to_string(),
        }),
    }
}

/// Deletes the pair and its key file; both already gone is success.
pub async fn delete(api: &impl Ec2Api, key_name: &str, path: Option<&str>) -> Input {
    if let Err(input) = delete_pair(api, key_name).await {
        return input;
    }
    // A write cut short by a crash may have left the key beside its path.
    for file in path
        .into_iter()
        .flat_map(|p| [p.to_string(), partial_path(p)])
    {
        if let Err(e) = remove_file_if_present(&file) {
            return Input::TransientFailure {
                message: format!("cannot remove key file {file}: {e}"),
            };
        }
    }
    Input::KeyPairDeleted
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A key folder that is a file cannot hold the key: removing it is done,
    /// or the cleanup of such a session would retry for ever.
    #[test]
    fn removing_a_file_under_a_file_is_done_and_other_failures_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let under = file.join("acode-s.pem");
        remove_file_if_present(under.to_str().unwrap()).unwrap();
        remove_file_if_present(dir.path().join("absent").to_str().unwrap()).unwrap();
        // A folder where the file should be is still an error.
        let folder = dir.path().join("folder.pem");
        std::fs::create_dir(&folder).unwrap();
        assert!(remove_file_if_present(folder.to_str().unwrap()).is_err());
    }

    #[test]
    fn generated_keys_round_trip_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::Rsa] {
            let (private, public) = generate(algorithm).unwrap();
            let path = dir.path().join(format!("{}.pem", algorithm.name()));
            let path = path.to_str().unwrap();
            write_private_key(path, &private).unwrap();
            assert_eq!(
                std::fs::metadata(path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(public_key_of(path).unwrap(), public);
            // Never overwrite: a second write of the same path is refused.
            assert!(write_private_key(path, &private).is_err());
        }
    }
}
