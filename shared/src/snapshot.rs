//! The configuration snapshot the control plane pushes to data planes: every
//! resource a data plane needs, secrets decrypted, as one immutable document.

use crate::domain::{ApiKey, Credential, JwtProvider, Model};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Current snapshot document format; a data plane rejects others.
pub const SNAPSHOT_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConfigSnapshot {
    pub format: u32,
    /// Sequence number of the last event applied (the config version).
    pub version: u64,
    pub provider_keys: BTreeMap<String, SnapshotProviderKey>,
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
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotProviderKey {
    pub display_name: String,
    pub adapter: String,
    pub api_base: String,
    pub api_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_upstream: bool,
    pub credential: Credential,
}

impl std::fmt::Debug for SnapshotProviderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotProviderKey")
            .field("display_name", &self.display_name)
            .field("api_base", &self.api_base)
            .field("credential", &"***")
            .finish()
    }
}
