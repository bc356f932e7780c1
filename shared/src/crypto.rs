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

/// The key a node's snapshot data keys are sealed with: derived from the
/// node's credential (its per-node token, or the shared token) and its id, so
/// neither the stream nor the node's snapshot file is readable without it.
/// Credentials are high-entropy tokens, so one domain-separated hash is a
/// sound derivation.
pub fn node_seal_key(token: &str, node_id: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::new()
        .chain_update(b"aigw node seal v1\0")
        .chain_update(node_id.as_bytes())
        .chain_update(b"\0")
        .chain_update(token.as_bytes())
        .finalize()
        .into()
}

/// Owner label binding a wrapped data key to its node and snapshot version,
/// so a wrapped key cannot be replayed for another node or version.
fn data_key_owner(node_id: &str, version: u64) -> String {
    format!("aigw:snapshot-data-key:{node_id}:{version}")
}

/// A fresh random key for one snapshot's secrets.
pub fn new_data_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    key
}

/// Wraps a snapshot's data key for one node.
pub fn seal_data_key(
    node_key: &Cipher,
    node_id: &str,
    version: u64,
    data_key: &[u8; 32],
) -> Result<Sealed, Error> {
    node_key.seal(&data_key_owner(node_id, version), &B64.encode(data_key))
}

/// Unwraps a snapshot's data key with the node's own key.
pub fn open_data_key(
    node_key: &Cipher,
    node_id: &str,
    version: u64,
    sealed: &Sealed,
) -> Result<Cipher, Error> {
    let text = node_key
        .open(&data_key_owner(node_id, version), sealed)
        .map_err(|_| {
            Error::Crypto(
                "the snapshot's secrets are not sealed for this node's credential and id".into(),
            )
        })?;
    let key: [u8; 32] = B64
        .decode(text)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| Error::Crypto("malformed snapshot data key".into()))?;
    Ok(Cipher::new(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keys_open_only_for_their_node_credential_and_version() {
        let dk = new_data_key();
        let node = Cipher::new(&node_seal_key("token-a", "node-1"));
        let sealed = seal_data_key(&node, "node-1", 7, &dk).unwrap();
        let opened = open_data_key(&node, "node-1", 7, &sealed).unwrap();
        let secret = Cipher::new(&dk).seal("pk", "sk-live").unwrap();
        assert_eq!(opened.open("pk", &secret).unwrap(), "sk-live");
        // Another version, node id or credential cannot open it.
        assert!(open_data_key(&node, "node-1", 8, &sealed).is_err());
        assert!(open_data_key(&node, "node-2", 7, &sealed).is_err());
        let other = Cipher::new(&node_seal_key("token-b", "node-1"));
        assert!(open_data_key(&other, "node-1", 7, &sealed).is_err());
        assert_ne!(node_seal_key("t", "a"), node_seal_key("t", "b"));
    }
}
