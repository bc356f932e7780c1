//! The master key that seals provider secrets at rest (see `aigw_shared::crypto`).

use crate::error::Error;
pub use aigw_shared::crypto::{Cipher, Sealed};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use std::path::Path;

/// Where the master key came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Config,
    ExistingFile(String),
    GeneratedFile(String),
}

/// Uses the configured key; otherwise, only when `generate` is allowed
/// (standalone), a key file in the data dir, created with mode 0600.
pub fn load_master_key(
    configured: Option<&str>,
    data_dir: &Path,
    generate: bool,
) -> Result<(Cipher, KeySource), Error> {
    if let Some(text) = configured {
        let key = aigw_shared::config::decode_master_key(text)
            .map_err(|m| Error::Crypto(format!("secrets.master_key: {m}")))?;
        return Ok((Cipher::new(&key), KeySource::Config));
    }
    let path = data_dir.join("master.key");
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        let key = aigw_shared::config::decode_master_key(&text)
            .map_err(|m| Error::Crypto(format!("{}: {m}", path.display())))?;
        return Ok((
            Cipher::new(&key),
            KeySource::ExistingFile(path.display().to_string()),
        ));
    }
    if !generate {
        return Err(Error::Crypto(
            "secrets.master_key (or AIGW_MASTER_KEY) is required outside standalone mode".into(),
        ));
    }
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    std::fs::create_dir_all(data_dir)?;
    write_private(&path, B64.encode(key).as_bytes())?;
    Ok((
        Cipher::new(&key),
        KeySource::GeneratedFile(path.display().to_string()),
    ))
}

/// The node token of a standalone control plane that was given none: kept in
/// the data dir so the in-process node can read its snapshot cache after a restart.
pub fn load_or_generate_token(data_dir: &Path) -> Result<String, Error> {
    let path = data_dir.join("node.token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    std::fs::create_dir_all(data_dir)?;
    let _ = std::fs::remove_file(&path);
    write_private(&path, token.as_bytes())?;
    Ok(token)
}

/// Master-key sealing owner of a node credential's seal key.
pub fn node_seal_owner(node_id: &str, credential_id: &str) -> String {
    format!("aigw:node-seal-key:{node_id}:{credential_id}")
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let c = Cipher::new(&[7u8; 32]);
        let s = c.seal("pk-1", "hunter2").unwrap();
        assert!(!s.ciphertext.contains("hunter2"));
        assert_eq!(c.open("pk-1", &s).unwrap(), "hunter2");
        // Bound to its owner and to the key.
        assert!(c.open("pk-2", &s).is_err());
        assert!(Cipher::new(&[8u8; 32]).open("pk-1", &s).is_err());
        // Fresh nonce each time.
        assert_ne!(c.seal("pk-1", "hunter2").unwrap().nonce, s.nonce);
    }

    #[test]
    fn generates_private_key_file_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_master_key(None, dir.path(), false).is_err());
        let (c1, src) = load_master_key(None, dir.path(), true).unwrap();
        assert!(matches!(src, KeySource::GeneratedFile(_)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("master.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (c2, src) = load_master_key(None, dir.path(), true).unwrap();
        assert!(matches!(src, KeySource::ExistingFile(_)));
        let s = c1.seal("x", "y").unwrap();
        assert_eq!(c2.open("x", &s).unwrap(), "y");
    }
}
