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

    /// A 32-byte key derived from this cipher's key for `label`: the same
    /// for every holder of the key (every control-plane replica shares the
    /// master key), independent for each label, and revealing nothing of
    /// the key. AES-GCM under a nonce reserved for the label (SHA-256 of
    /// it) over zeros is AES-CTR's keystream, a PRF of the key; that nonce
    /// only ever encrypts zeros, and `seal`'s random nonces meet it with
    /// probability 2⁻⁹⁶.
    pub fn derive_key(&self, label: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"aigw derived key v1\0")
            .chain_update(label.as_bytes())
            .finalize();
        let stream = self
            .aead
            .encrypt(
                Nonce::from_slice(&digest[..12]),
                Payload {
                    msg: &[0u8; 32],
                    aad: label.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut key = [0u8; 32];
        if let Some(k) = stream.get(..32) {
            key.copy_from_slice(k);
        }
        key
    }
}

/// A 32-byte secret key that never shows in logs (`Debug` masks it) and
/// travels as base64.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub [u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

impl SecretKey {
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    pub fn from_base64(text: &str) -> Option<Self> {
        B64.decode(text.trim())
            .ok()
            .and_then(|k| k.try_into().ok())
            .map(Self)
    }
}

impl Serialize for SecretKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for SecretKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::from_base64(&text).ok_or_else(|| serde::de::Error::custom("not a base64 32-byte key"))
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

    #[test]
    fn derived_keys_are_stable_per_key_and_label() {
        let a = Cipher::new(&[1u8; 32]);
        let k = a.derive_key("x");
        assert_eq!(k, Cipher::new(&[1u8; 32]).derive_key("x"));
        assert_ne!(k, a.derive_key("y"));
        assert_ne!(k, Cipher::new(&[2u8; 32]).derive_key("x"));
        assert_ne!(k, [0u8; 32]);
        let s = SecretKey(k);
        assert_eq!(format!("{s:?}"), "SecretKey(***)");
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<SecretKey>(&text).unwrap(), s);
    }
}
