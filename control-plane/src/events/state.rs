use super::{DomainEvent, StoredEvent};
use crate::secrets::Sealed;
use aigw_shared::domain::{ApiKey, JwtProvider, Model, ProviderKey, ResourceKind, MASKED};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A provider key as stored: everything but the secret in clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProviderKey {
    pub display_name: String,
    pub provider: String,
    pub adapter: String,
    pub secret: Sealed,
    pub api_base: String,
    pub api_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_upstream: bool,
}

impl StoredProviderKey {
    pub fn new(value: ProviderKey, secret: Sealed) -> Self {
        Self {
            display_name: value.display_name,
            provider: value.provider,
            adapter: value.adapter,
            secret,
            api_base: value.api_base,
            api_version: value.api_version,
            ca_pem: value.ca_pem,
            allow_insecure_upstream: value.allow_insecure_upstream,
        }
    }

    /// The value as every read shows it.
    pub fn masked(&self) -> ProviderKey {
        ProviderKey {
            display_name: self.display_name.clone(),
            provider: self.provider.clone(),
            adapter: self.adapter.clone(),
            secret: MASKED.into(),
            api_base: self.api_base.clone(),
            api_version: self.api_version.clone(),
            ca_pem: self.ca_pem.clone(),
            allow_insecure_upstream: self.allow_insecure_upstream,
        }
    }
}

/// Most credentials one node holds at once: the current one and its
/// replacement during a rotation.
pub const MAX_NODE_CREDENTIALS: usize = 2;

/// A credential issued to one data-plane node (`POST /admin/v1/nodes`). The
/// token itself is shown once and never stored.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeCredential {
    pub id: String,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    /// The node's seal key (`crypto::node_seal_key` of the token), sealed
    /// with the master key: what the control plane wraps snapshot data keys with.
    pub seal_key: Sealed,
    /// RFC 3339.
    pub issued_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl std::fmt::Debug for NodeCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredential")
            .field("id", &self.id)
            .field("issued_at", &self.issued_at)
            .finish_non_exhaustive()
    }
}

/// The credentials of one node id. A node id with any has its own identity:
/// the shared node token no longer speaks for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeCredentials {
    pub credentials: Vec<NodeCredential>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record<T> {
    pub value: T,
    pub revision: u64,
}

/// The projection of the event log: every live resource with its revision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Sequence number of the last applied event (the config version).
    pub version: u64,
    pub provider_keys: BTreeMap<String, Record<StoredProviderKey>>,
    pub models: BTreeMap<String, Record<Model>>,
    pub api_keys: BTreeMap<String, Record<ApiKey>>,
    #[serde(default)]
    pub jwt_providers: BTreeMap<String, Record<JwtProvider>>,
    /// Node id → its issued credentials.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, Record<NodeCredentials>>,
    #[serde(skip)]
    pub(super) index: Index,
}

/// Unique-value lookups, derived from the maps and rebuilt after loading.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Index {
    pub names: HashMap<(ResourceKind, String), String>,
    pub key_hashes: HashMap<String, String>,
}

impl State {
    /// Folds one event into the state. Total: events were checked by `handle`
    /// before they were stored, so applying never fails.
    pub fn apply(&mut self, stored: &StoredEvent) {
        self.version = stored.seq;
        match &stored.event {
            DomainEvent::ProviderKeyCreated { id, value }
            | DomainEvent::ProviderKeyUpdated { id, value } => {
                self.unindex(ResourceKind::ProviderKey, id);
                self.index.names.insert(
                    (ResourceKind::ProviderKey, value.display_name.clone()),
                    id.clone(),
                );
                upsert(&mut self.provider_keys, id, value.clone());
            }
            DomainEvent::ModelCreated { id, value } | DomainEvent::ModelUpdated { id, value } => {
                self.unindex(ResourceKind::Model, id);
                self.index.names.insert(
                    (ResourceKind::Model, value.display_name.clone()),
                    id.clone(),
                );
                upsert(&mut self.models, id, value.clone());
            }
            DomainEvent::ApiKeyCreated { id, value } | DomainEvent::ApiKeyUpdated { id, value } => {
                self.unindex(ResourceKind::ApiKey, id);
                if let Some(name) = &value.display_name {
                    self.index
                        .names
                        .insert((ResourceKind::ApiKey, name.clone()), id.clone());
                }
                if !value.key_hash.is_empty() {
                    self.index
                        .key_hashes
                        .insert(value.key_hash.clone(), id.clone());
                }
                upsert(&mut self.api_keys, id, value.clone());
            }
            DomainEvent::JwtProviderCreated { id, value }
            | DomainEvent::JwtProviderUpdated { id, value } => {
                self.unindex(ResourceKind::JwtProvider, id);
                self.index.names.insert(
                    (ResourceKind::JwtProvider, value.display_name.clone()),
                    id.clone(),
                );
                upsert(&mut self.jwt_providers, id, value.clone());
            }
            DomainEvent::JwtProviderDeleted { id } => {
                self.unindex(ResourceKind::JwtProvider, id);
                self.jwt_providers.remove(id);
            }
            DomainEvent::ProviderKeyDeleted { id } => {
                self.unindex(ResourceKind::ProviderKey, id);
                self.provider_keys.remove(id);
            }
            DomainEvent::ModelDeleted { id } => {
                self.unindex(ResourceKind::Model, id);
                self.models.remove(id);
            }
            DomainEvent::ApiKeyDeleted { id } => {
                self.unindex(ResourceKind::ApiKey, id);
                self.api_keys.remove(id);
            }
            DomainEvent::NodeCredentialIssued { id, credential } => {
                let mut value = self
                    .nodes
                    .get(id)
                    .map(|r| r.value.clone())
                    .unwrap_or_default();
                value.credentials.push(credential.clone());
                upsert(&mut self.nodes, id, value);
            }
            DomainEvent::NodeCredentialResealed {
                id,
                credential_id,
                seal_key,
            } => {
                if let Some(record) = self.nodes.get_mut(id) {
                    for c in &mut record.value.credentials {
                        if &c.id == credential_id {
                            c.seal_key = seal_key.clone();
                        }
                    }
                    record.revision += 1;
                }
            }
            DomainEvent::NodeCredentialRevoked { id, credential_id } => {
                let Some(record) = self.nodes.get_mut(id) else {
                    return;
                };
                match credential_id {
                    Some(cid) => record.value.credentials.retain(|c| &c.id != cid),
                    None => record.value.credentials.clear(),
                }
                record.revision += 1;
                if record.value.credentials.is_empty() {
                    self.nodes.remove(id);
                }
            }
        }
    }

    fn unindex(&mut self, kind: ResourceKind, id: &str) {
        let name = match kind {
            ResourceKind::ProviderKey => self
                .provider_keys
                .get(id)
                .map(|r| r.value.display_name.clone()),
            ResourceKind::Model => self.models.get(id).map(|r| r.value.display_name.clone()),
            ResourceKind::ApiKey => self.api_keys.get(id).and_then(|r| {
                self.index.key_hashes.remove(&r.value.key_hash);
                r.value.display_name.clone()
            }),
            ResourceKind::JwtProvider => self
                .jwt_providers
                .get(id)
                .map(|r| r.value.display_name.clone()),
            ResourceKind::Node => None,
        };
        if let Some(name) = name {
            self.index.names.remove(&(kind, name));
        }
    }

    /// Rebuilds the derived index, after deserializing a snapshot.
    pub fn reindex(&mut self) {
        let mut index = Index::default();
        for (id, r) in &self.provider_keys {
            index.names.insert(
                (ResourceKind::ProviderKey, r.value.display_name.clone()),
                id.clone(),
            );
        }
        for (id, r) in &self.models {
            index.names.insert(
                (ResourceKind::Model, r.value.display_name.clone()),
                id.clone(),
            );
        }
        for (id, r) in &self.api_keys {
            if let Some(n) = &r.value.display_name {
                index
                    .names
                    .insert((ResourceKind::ApiKey, n.clone()), id.clone());
            }
            if !r.value.key_hash.is_empty() {
                index
                    .key_hashes
                    .insert(r.value.key_hash.clone(), id.clone());
            }
        }
        for (id, r) in &self.jwt_providers {
            index.names.insert(
                (ResourceKind::JwtProvider, r.value.display_name.clone()),
                id.clone(),
            );
        }
        self.index = index;
    }

    /// Id of the resource of `kind` named `name`, if any.
    pub fn id_by_name(&self, kind: ResourceKind, name: &str) -> Option<&str> {
        self.index
            .names
            .get(&(kind, name.to_string()))
            .map(String::as_str)
    }

    pub fn id_by_key_hash(&self, hash: &str) -> Option<&str> {
        self.index.key_hashes.get(hash).map(String::as_str)
    }

    pub fn revision(&self, kind: ResourceKind, id: &str) -> Option<u64> {
        match kind {
            ResourceKind::ProviderKey => self.provider_keys.get(id).map(|r| r.revision),
            ResourceKind::Model => self.models.get(id).map(|r| r.revision),
            ResourceKind::ApiKey => self.api_keys.get(id).map(|r| r.revision),
            ResourceKind::JwtProvider => self.jwt_providers.get(id).map(|r| r.revision),
            ResourceKind::Node => self.nodes.get(id).map(|r| r.revision),
        }
    }
}

fn upsert<T>(map: &mut BTreeMap<String, Record<T>>, id: &str, value: T) {
    match map.get_mut(id) {
        Some(r) => {
            r.value = value;
            r.revision += 1;
        }
        None => {
            map.insert(id.to_string(), Record { value, revision: 1 });
        }
    }
}
