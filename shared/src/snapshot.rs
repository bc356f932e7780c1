//! The configuration snapshot the control plane pushes to data planes: every
//! resource a data plane needs, as one immutable document. On the wire and
//! on disk provider credentials are sealed ([`WireSnapshot`]) with a data key
//! of that snapshot, which reaches each node wrapped for its own credential
//! (`crypto::seal_data_key`); a node opens them into a [`ConfigSnapshot`].

use crate::crypto::{Cipher, Sealed, SecretKey};
use crate::domain::{ApiKey, Credential, JwtProvider, Model};
use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Current snapshot document format; a data plane rejects others.
/// v2: provider credentials sealed with the snapshot's data key.
pub const SNAPSHOT_FORMAT: u32 = 2;

/// A snapshot as it travels: credentials and keys sealed.
pub type WireSnapshot = ConfigSnapshot<Sealed, Sealed>;

/// `C`: a provider credential; `K`: a secret key of the fleet. Both are
/// plaintext in a node's memory, sealed on the wire and on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigSnapshot<C = Credential, K = SecretKey> {
    pub format: u32,
    /// Sequence number of the last event applied (the config version).
    pub version: u64,
    pub provider_keys: BTreeMap<String, SnapshotProviderKey<C>>,
    pub models: BTreeMap<String, Model>,
    pub api_keys: BTreeMap<String, ApiKey>,
    /// Api keys whose spend reached their budget in the current period.
    #[serde(default)]
    pub budget_exceeded: BTreeSet<String>,
    /// Purge generation per model id: a change empties that model's cache.
    #[serde(default)]
    pub cache_purges: BTreeMap<String, u64>,
    /// Trusted issuers of caller JWTs, by id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub jwt_providers: BTreeMap<String, JwtProvider>,
    /// The key every data plane seals Responses API ids with, so an id one
    /// node handed out opens on any other (derived from the master key by
    /// the control plane; absent from an older control plane).
    #[serde(default = "no_key", skip_serializing_if = "Option::is_none")]
    pub response_id_key: Option<K>,
}

/// A named default: `#[serde(default)]` would ask `K: Default`.
fn no_key<K>() -> Option<K> {
    None
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotProviderKey<C = Credential> {
    pub display_name: String,
    pub adapter: String,
    pub api_base: String,
    pub api_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_upstream: bool,
    pub credential: C,
}

impl<C> std::fmt::Debug for SnapshotProviderKey<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotProviderKey")
            .field("display_name", &self.display_name)
            .field("api_base", &self.api_base)
            .field("credential", &"***")
            .finish()
    }
}

// By hand: a derive would ask `C: Default`.
impl<C, K> Default for ConfigSnapshot<C, K> {
    fn default() -> Self {
        Self {
            format: 0,
            version: 0,
            provider_keys: BTreeMap::new(),
            models: BTreeMap::new(),
            api_keys: BTreeMap::new(),
            budget_exceeded: BTreeSet::new(),
            cache_purges: BTreeMap::new(),
            jwt_providers: BTreeMap::new(),
            response_id_key: None,
        }
    }
}

impl<C, K> ConfigSnapshot<C, K> {
    /// The same snapshot with each provider credential mapped by `f(id, c)`
    /// and the response id key by `g`.
    fn map_secrets<D, L>(
        self,
        mut f: impl FnMut(&str, C) -> Result<D, Error>,
        g: impl FnOnce(K) -> Result<L, Error>,
    ) -> Result<ConfigSnapshot<D, L>, Error> {
        let provider_keys = self
            .provider_keys
            .into_iter()
            .map(|(id, pk)| {
                let credential = f(&id, pk.credential)?;
                Ok((
                    id,
                    SnapshotProviderKey {
                        display_name: pk.display_name,
                        adapter: pk.adapter,
                        api_base: pk.api_base,
                        api_version: pk.api_version,
                        ca_pem: pk.ca_pem,
                        allow_insecure_upstream: pk.allow_insecure_upstream,
                        credential,
                    },
                ))
            })
            .collect::<Result<_, Error>>()?;
        Ok(ConfigSnapshot {
            format: self.format,
            version: self.version,
            provider_keys,
            models: self.models,
            api_keys: self.api_keys,
            budget_exceeded: self.budget_exceeded,
            cache_purges: self.cache_purges,
            jwt_providers: self.jwt_providers,
            response_id_key: self.response_id_key.map(g).transpose()?,
        })
    }
}

/// Sealing owner of the response id key in a snapshot.
const RESPONSE_ID_KEY_OWNER: &str = "aigw:snapshot-response-id-key";

/// Sealing owner of a provider key's credential in a snapshot.
fn credential_owner(provider_key_id: &str) -> String {
    format!("aigw:snapshot-credential:{provider_key_id}")
}

impl ConfigSnapshot {
    /// Seals every provider credential with the snapshot's data key.
    pub fn seal(self, data_key: &Cipher) -> Result<WireSnapshot, Error> {
        self.map_secrets(
            |id, c| {
                let text = serde_json::to_string(&c).map_err(|e| Error::Crypto(e.to_string()))?;
                data_key.seal(&credential_owner(id), &text)
            },
            |k| data_key.seal(RESPONSE_ID_KEY_OWNER, &k.to_base64()),
        )
    }
}

impl WireSnapshot {
    /// Opens every provider credential with the snapshot's data key.
    pub fn open(self, data_key: &Cipher) -> Result<ConfigSnapshot, Error> {
        self.map_secrets(
            |id, sealed| {
                let text = data_key.open(&credential_owner(id), &sealed)?;
                serde_json::from_str(&text).map_err(|e| {
                    Error::Crypto(format!("provider key {id}: undecodable credential: {e}"))
                })
            },
            |sealed| {
                let text = data_key.open(RESPONSE_ID_KEY_OWNER, &sealed)?;
                SecretKey::from_base64(&text)
                    .ok_or_else(|| Error::Crypto("malformed response id key".into()))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_sealed_on_the_wire_and_open_with_the_data_key() {
        let mut s = ConfigSnapshot {
            format: SNAPSHOT_FORMAT,
            version: 3,
            ..Default::default()
        };
        s.provider_keys.insert(
            "pk-1".into(),
            SnapshotProviderKey {
                display_name: "azure".into(),
                adapter: "azure-openai".into(),
                api_base: "https://x.openai.azure.com".into(),
                api_version: "2024-10-21".into(),
                ca_pem: None,
                allow_insecure_upstream: false,
                credential: Credential::ApiKey {
                    key: "sk-canary-123".into(),
                },
            },
        );
        s.response_id_key = Some(SecretKey([9u8; 32]));
        let dk = Cipher::new(&crate::crypto::new_data_key());
        let wire = s.clone().seal(&dk).unwrap();
        let text = serde_json::to_string(&wire).unwrap();
        assert!(!text.contains("sk-canary-123"), "{text}");
        assert!(!text.contains(&SecretKey([9u8; 32]).to_base64()), "{text}");
        let back: WireSnapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back.open(&dk).unwrap(), s);
        let other = Cipher::new(&crate::crypto::new_data_key());
        assert!(wire.open(&other).is_err());
    }
}
