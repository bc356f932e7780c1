//! AES-256-GCM sealing with a fresh nonce per value and the owner's name as
//! associated data, so a ciphertext cannot be moved to another owner.

use crate::error::Error;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

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

impl Cipher {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            aead: Aes256Gcm::new(key.into()),
        }
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
        let bad = || {
            Error::Crypto(format!(
                "cannot decrypt secret of `{owner}`: wrong master key or corrupted data"
            ))
        };
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
