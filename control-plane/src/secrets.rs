//! Provider secrets at rest: AES-256-GCM with a fresh nonce per secret and the
//! owning resource id as associated data, so a ciphertext cannot be moved to
//! another provider key.

use crate::error::Error;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// An encrypted secret as stored in events and snapshots.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub nonce: String,
    pub ciphertext: String,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealed(***)")
    }
}

#[derive(Clone)]
pub struct Cipher {
    aead: Aes256Gcm,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(***)")
    }
}

/// Where the master key came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Config,
    ExistingFile(String),
    GeneratedFile(String),
}

impl Cipher {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            aead: Aes256Gcm::new(key.into()),
        }
    }

    /// Uses the configured key; otherwise, only when `generate` is allowed
    /// (standalone), a key file in the data dir, created with mode 0600.
    pub fn load(
        configured: Option<&str>,
        data_dir: &Path,
        generate: bool,
    ) -> Result<(Self, KeySource), Error> {
        if let Some(text) = configured {
            let key = aigw_shared::config::decode_master_key(text)
                .map_err(|m| Error::Crypto(format!("secrets.master_key: {m}")))?;
            return Ok((Self::new(&key), KeySource::Config));
        }
        let path = data_dir.join("master.key");
        if path.exists() {
            let text = std::fs::read_to_string(&path)?;
            let key = aigw_shared::config::decode_master_key(&text)
                .map_err(|m| Error::Crypto(format!("{}: {m}", path.display())))?;
            return Ok((Self::new(&key), KeySource::ExistingFile(path.display().to_string())));
        }
        if !generate {
            return Err(Error::Crypto(
                "secrets.master_key (or AIGW_MASTER_KEY) is required outside standalone mode"
                    .into(),
            ));
        }
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        std::fs::create_dir_all(data_dir)?;
        write_private(&path, B64.encode(key).as_bytes())?;
        Ok((Self::new(&key), KeySource::GeneratedFile(path.display().to_string())))
    }

    pub fn seal(&self, owner: &str, plaintext: &str) -> Result<Sealed, Error> {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: owner.as_bytes(),
                },
            )
            .map_err(|_| Error::Crypto("encryption failed".into()))?;
        Ok(Sealed {
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ct),
        })
    }

    pub fn open(&self, owner: &str, sealed: &Sealed) -> Result<String, Error> {
        let bad = || Error::Crypto(format!("cannot decrypt secret of `{owner}`: wrong master key or corrupted data"));
        let nonce = B64.decode(&sealed.nonce).map_err(|_| bad())?;
        let ct = B64.decode(&sealed.ciphertext).map_err(|_| bad())?;
        if nonce.len() != 12 {
            return Err(bad());
        }
        let pt = self
            .aead
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: owner.as_bytes(),
                },
            )
            .map_err(|_| bad())?;
        String::from_utf8(pt).map_err(|_| bad())
    }
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
        assert!(Cipher::load(None, dir.path(), false).is_err());
        let (c1, src) = Cipher::load(None, dir.path(), true).unwrap();
        assert!(matches!(src, KeySource::GeneratedFile(_)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("master.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (c2, src) = Cipher::load(None, dir.path(), true).unwrap();
        assert!(matches!(src, KeySource::ExistingFile(_)));
        let s = c1.seal("x", "y").unwrap();
        assert_eq!(c2.open("x", &s).unwrap(), "y");
    }
}
