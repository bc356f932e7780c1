//! The admin API: one transport-agnostic [`Admin`] used by the REST shim
//! (`rest`) and the gRPC service (`grpc`), admin-key checks (`auth`), and the
//! single place errors become HTTP answers or gRPC statuses (`edge`).

pub mod auth;
mod convert;
pub mod edge;
pub mod grpc;
pub mod rest;

use crate::engine::Engine;
use crate::error::Error;
use crate::events::{
    format_rfc3339, Command, ResourceValue, State, StoredEvent, StoredProviderKey,
};
use crate::events::{NodeCredential, NodeCredentials, Record};
use crate::nodes::{NodeRegistry, NodeStatus};
use aigw_shared::domain::{ApiKey, JwtProvider, Model, ProviderKey, ResourceKind, MASKED};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tracing::instrument;

/// A resource value as written by a user, before validation.
#[derive(Debug, Clone)]
pub enum Input {
    ProviderKey(ProviderKey),
    Model(Model),
    ApiKey(ApiKey),
    JwtProvider(JwtProvider),
}

impl Input {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Self::ProviderKey(_) => ResourceKind::ProviderKey,
            Self::Model(_) => ResourceKind::Model,
            Self::ApiKey(_) => ResourceKind::ApiKey,
            Self::JwtProvider(_) => ResourceKind::JwtProvider,
        }
    }
}

/// A resource value as every read shows it (secrets masked).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum View {
    ProviderKey(ProviderKey),
    Model(Model),
    ApiKey(ApiKey),
    JwtProvider(JwtProvider),
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordView {
    pub id: String,
    pub value: View,
    pub revision: u64,
}

/// One event as the audit API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub seq: u64,
    pub at: String,
    pub actor: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub version: u32,
    pub resource: String,
    pub resource_id: String,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub resource: Option<ResourceKind>,
    pub resource_id: Option<String>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub limit: Option<usize>,
}

pub const DEFAULT_EVENT_LIMIT: usize = 100;
pub const MAX_EVENT_LIMIT: usize = 10_000;

pub use crate::secrets::node_seal_owner;

/// A freshly issued node credential: the only time its token is shown.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedNodeCredential {
    pub node_id: String,
    pub credential_id: String,
    pub token: String,
    pub issued_at: String,
    pub revision: u64,
}

/// A credential as reads show it: no token, no digest, no key.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialView {
    pub id: String,
    pub issued_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One node in `GET /admin/v1/nodes`: its stream status and its credentials.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub status: NodeStatus,
    /// Credentials issued for this id; none means the shared token speaks for it.
    pub credentials: Vec<CredentialView>,
    /// Revision of the node's credentials (for `If-Match`), 0 without any.
    pub revision: u64,
}

impl NodeView {
    fn from_status(status: NodeStatus) -> Self {
        Self {
            status,
            credentials: Vec::new(),
            revision: 0,
        }
    }

    fn set_credentials(&mut self, record: &Record<NodeCredentials>) {
        self.revision = record.revision;
        self.credentials = record
            .value
            .credentials
            .iter()
            .map(|c| CredentialView {
                id: c.id.clone(),
                issued_at: c.issued_at.clone(),
                description: c.description.clone(),
            })
            .collect();
    }
}

#[derive(Clone)]
pub struct Admin {
    engine: Arc<Engine>,
    nodes: Arc<NodeRegistry>,
    usage: Arc<crate::usage::Aggregator>,
    /// Cache purge generation per model id, pushed in every snapshot.
    purges: tokio::sync::watch::Sender<Arc<std::collections::BTreeMap<String, u64>>>,
}

impl Admin {
    pub fn new(
        engine: Arc<Engine>,
        nodes: Arc<NodeRegistry>,
        usage: Arc<crate::usage::Aggregator>,
    ) -> Self {
        Self {
            engine,
            nodes,
            usage,
            purges: tokio::sync::watch::channel(Arc::default()).0,
        }
    }

    /// Cache purges for the snapshot cache to follow.
    pub fn purges(
        &self,
    ) -> tokio::sync::watch::Receiver<Arc<std::collections::BTreeMap<String, u64>>> {
        self.purges.subscribe()
    }

    /// Empties the response cache of model `id` on every node, through the
    /// next snapshot. Kept in memory only: a restarted control plane starts
    /// every generation over, which empties the caches once more (harmless).
    #[instrument(skip_all, fields(id = %id))]
    pub fn purge_cache(&self, id: &str) -> Result<u64, Error> {
        if !self.engine.read().models.contains_key(id) {
            return Err(Error::NotFound {
                kind: ResourceKind::Model,
                id: id.to_string(),
            });
        }
        let mut generation = 0;
        self.purges.send_modify(|p| {
            let mut next = (**p).clone();
            let g = next.entry(id.to_string()).or_insert(0);
            *g += 1;
            generation = *g;
            *p = Arc::new(next);
        });
        tracing::info!(generation, "model cache purge requested");
        Ok(generation)
    }

    /// Usage aggregates for `GET /admin/v1/usage` and `QueryUsage`.
    pub fn usage(
        &self,
        group_by: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Vec<crate::usage::UsageRow>, Error> {
        Ok(self.usage.query(&parse_usage_query(group_by, from, to)?))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn nodes(&self) -> &Arc<NodeRegistry> {
        &self.nodes
    }

    #[instrument(skip_all, fields(resource = %input.kind().collection(), id))]
    pub async fn create(&self, actor: &str, input: Input) -> Result<RecordView, Error> {
        let id = uuid::Uuid::now_v7().to_string();
        tracing::Span::current().record("id", id.as_str());
        let value = self.prepare(&id, input)?;
        let kind = value.kind();
        self.engine
            .execute(
                Command::Create {
                    id: id.clone(),
                    value,
                },
                actor,
            )
            .await?;
        self.get(kind, &id)
    }

    /// Full replace; with `upsert` a missing id is created. Returns whether it was created.
    #[instrument(skip_all, fields(resource = %input.kind().collection(), id = %id))]
    pub async fn update(
        &self,
        actor: &str,
        id: &str,
        input: Input,
        expected_revision: Option<u64>,
        upsert: bool,
    ) -> Result<(RecordView, bool), Error> {
        check_id(id)?;
        let kind = input.kind();
        let value = self.prepare(id, input)?;
        let events = self
            .engine
            .execute(
                Command::Update {
                    id: id.to_string(),
                    value,
                    expected_revision,
                    upsert,
                },
                actor,
            )
            .await?;
        let created = events
            .iter()
            .any(|e| e.event.type_name().ends_with("Created"));
        Ok((self.get(kind, id)?, created))
    }

    #[instrument(skip_all, fields(resource = %kind.collection(), id = %id))]
    pub async fn delete(
        &self,
        actor: &str,
        kind: ResourceKind,
        id: &str,
        expected_revision: Option<u64>,
    ) -> Result<(), Error> {
        self.engine
            .execute(
                Command::Delete {
                    kind,
                    id: id.to_string(),
                    expected_revision,
                },
                actor,
            )
            .await?;
        Ok(())
    }

    pub fn get(&self, kind: ResourceKind, id: &str) -> Result<RecordView, Error> {
        view(&self.engine.read(), kind, id).ok_or_else(|| Error::NotFound {
            kind,
            id: id.to_string(),
        })
    }

    pub fn list(&self, kind: ResourceKind) -> Vec<RecordView> {
        let state = self.engine.read();
        let ids: Vec<&String> = match kind {
            ResourceKind::ProviderKey => state.provider_keys.keys().collect(),
            ResourceKind::Model => state.models.keys().collect(),
            ResourceKind::ApiKey => state.api_keys.keys().collect(),
            ResourceKind::JwtProvider => state.jwt_providers.keys().collect(),
            ResourceKind::Node => Vec::new(),
        };
        ids.into_iter()
            .filter_map(|id| view(&state, kind, id))
            .collect()
    }

    /// Issues a credential for data-plane node `node_id`: the token is
    /// returned once; the log keeps its digest and the node's seal key,
    /// sealed with the master key.
    #[instrument(skip_all, fields(node_id = %node_id))]
    pub async fn issue_node_credential(
        &self,
        actor: &str,
        node_id: &str,
        description: Option<String>,
    ) -> Result<IssuedNodeCredential, Error> {
        check_id(node_id)?;
        if let Some(d) = &description {
            if d.chars().count() > 256 {
                return Err(Error::Invalid("description: at most 256 characters".into()));
            }
        }
        let token = format!(
            "aigw-node-{}",
            hex::encode(aigw_shared::crypto::new_data_key())
        );
        let credential_id = uuid::Uuid::now_v7().to_string();
        let seal_key = aigw_shared::crypto::node_seal_key(&token, node_id);
        let credential = NodeCredential {
            id: credential_id.clone(),
            token_sha256: hex::encode(Sha256::digest(token.as_bytes())),
            seal_key: self.engine.cipher().seal(
                &node_seal_owner(node_id, &credential_id),
                &B64.encode(seal_key),
            )?,
            issued_at: format_rfc3339(time::OffsetDateTime::now_utc()),
            description,
        };
        let issued_at = credential.issued_at.clone();
        self.engine
            .execute(
                Command::IssueNodeCredential {
                    node_id: node_id.to_string(),
                    credential,
                },
                actor,
            )
            .await?;
        let revision = self.engine.read().revision(ResourceKind::Node, node_id);
        Ok(IssuedNodeCredential {
            node_id: node_id.to_string(),
            credential_id,
            token,
            issued_at,
            revision: revision.unwrap_or(1),
        })
    }

    /// Revokes one credential of a node; its live config stream ends.
    #[instrument(skip_all, fields(node_id = %node_id, credential_id = %credential_id))]
    pub async fn revoke_node_credential(
        &self,
        actor: &str,
        node_id: &str,
        credential_id: &str,
        expected_revision: Option<u64>,
    ) -> Result<(), Error> {
        self.engine
            .execute(
                Command::RevokeNodeCredential {
                    node_id: node_id.to_string(),
                    credential_id: credential_id.to_string(),
                    expected_revision,
                },
                actor,
            )
            .await?;
        Ok(())
    }

    /// Every node seen on the config stream or holding a credential.
    pub fn node_list(&self) -> Vec<NodeView> {
        let state = self.engine.read();
        let mut seen: std::collections::BTreeMap<String, NodeView> = self
            .nodes
            .list()
            .into_iter()
            .map(|status| (status.node_id.clone(), NodeView::from_status(status)))
            .collect();
        for (id, record) in &state.nodes {
            let view = seen
                .entry(id.clone())
                .or_insert_with(|| NodeView::from_status(NodeStatus::unseen(id)));
            view.set_credentials(record);
        }
        seen.into_values().collect()
    }

    pub fn node(&self, node_id: &str) -> Result<NodeView, Error> {
        self.node_list()
            .into_iter()
            .find(|n| n.status.node_id == node_id)
            .ok_or_else(|| Error::NotFound {
                kind: ResourceKind::Node,
                id: node_id.to_string(),
            })
    }

    /// Events from the log, secrets masked.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<EventView>, Error> {
        let limit = filter
            .limit
            .unwrap_or(DEFAULT_EVENT_LIMIT)
            .clamp(1, MAX_EVENT_LIMIT);
        let mut out = Vec::new();
        for e in self
            .engine
            .store()
            .read_from(filter.from_seq.unwrap_or(1).max(1))
        {
            let e = e?;
            if filter.to_seq.is_some_and(|to| e.seq > to) || out.len() >= limit {
                break;
            }
            let (kind, id) = e.event.resource();
            if filter.resource.is_some_and(|k| k != kind)
                || filter.resource_id.as_deref().is_some_and(|r| r != id)
            {
                continue;
            }
            out.push(event_view(&e));
        }
        Ok(out)
    }

    /// Validates a value on its own and seals its secret for `id`.
    fn prepare(&self, id: &str, input: Input) -> Result<ResourceValue, Error> {
        Ok(match input {
            Input::ProviderKey(pk) => {
                pk.validate()?;
                let sealed = if pk.secret == MASKED {
                    // A read-modify-write sends back the mask: the stored
                    // secret is kept, but only for the destination it was
                    // given for.
                    let state = self.engine.read();
                    let stored = state.provider_keys.get(id).map(|r| &r.value);
                    kept_secret(stored, &pk)?
                } else {
                    self.engine.cipher().seal(id, &pk.secret)?
                };
                ResourceValue::ProviderKey(StoredProviderKey::new(pk, sealed))
            }
            Input::Model(m) => {
                m.validate()?;
                ResourceValue::Model(m)
            }
            Input::ApiKey(mut k) => {
                k.validate()?;
                ResourceValue::ApiKey(k)
            }
            Input::JwtProvider(p) => {
                p.validate()?;
                ResourceValue::JwtProvider(p)
            }
        })
    }
}

/// The stored secret for a write that sent the mask in its place: refused
/// when there is none, or when the write moves it to another destination
/// (`api_base`, `ca_pem`), where the old key must not follow unasked.
fn kept_secret(
    stored: Option<&StoredProviderKey>,
    pk: &ProviderKey,
) -> Result<crate::secrets::Sealed, Error> {
    let Some(stored) = stored else {
        return Err(Error::Invalid(format!(
            "secret: `{MASKED}` stands for a stored secret and this provider key has none; \
             give the secret"
        )));
    };
    let base = |b: &str| aigw_shared::domain::resolve_api_base(b).unwrap_or_else(|_| b.to_string());
    let moved = [
        ("api_base", base(&stored.api_base) != base(&pk.api_base)),
        ("ca_pem", stored.ca_pem != pk.ca_pem),
        (
            "allow_insecure_upstream",
            stored.allow_insecure_upstream != pk.allow_insecure_upstream,
        ),
    ]
    .into_iter()
    .find_map(|(field, changed)| changed.then_some(field));
    if let Some(field) = moved {
        return Err(Error::Invalid(format!(
            "secret: changing {field} requires the secret in the same request \
             (`{MASKED}` would send the stored one to the new destination)"
        )));
    }
    Ok(stored.secret.clone())
}

fn view(state: &State, kind: ResourceKind, id: &str) -> Option<RecordView> {
    let (value, revision) = match kind {
        ResourceKind::ProviderKey => state
            .provider_keys
            .get(id)
            .map(|r| (View::ProviderKey(r.value.masked()), r.revision))?,
        ResourceKind::Model => state
            .models
            .get(id)
            .map(|r| (View::Model(r.value.clone()), r.revision))?,
        ResourceKind::ApiKey => state
            .api_keys
            .get(id)
            .map(|r| (View::ApiKey(r.value.clone()), r.revision))?,
        ResourceKind::JwtProvider => state
            .jwt_providers
            .get(id)
            .map(|r| (View::JwtProvider(r.value.clone()), r.revision))?,
        // Nodes have their own view (`Admin::node`).
        ResourceKind::Node => return None,
    };
    Some(RecordView {
        id: id.to_string(),
        value,
        revision,
    })
}

fn event_view(e: &StoredEvent) -> EventView {
    let (kind, id) = e.event.resource();
    EventView {
        seq: e.seq,
        at: format_rfc3339(e.at),
        actor: e.actor.clone(),
        type_name: e.event.type_name().to_string(),
        version: crate::events::schema_version(e.event.type_name()),
        resource: kind.collection().to_string(),
        resource_id: id.to_string(),
        payload: e.masked_payload(),
    }
}

/// Ids chosen by callers (REST `PUT` upsert) must be path-safe.
fn check_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(
            "id: 1 to 128 characters of letters, digits, `-`, `_` or `.`".into(),
        ))
    }
}

/// Parses a usage query's parameters (shared by REST and gRPC): dimensions,
/// and the inclusive day range as `YYYY-MM-DD`.
pub fn parse_usage_query(
    group_by: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<crate::usage::UsageQuery, Error> {
    let mut dims = Vec::new();
    for g in group_by
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let d = crate::usage::Dimension::parse(g).ok_or_else(|| {
            Error::Invalid(format!(
                "group_by: unknown dimension `{g}`; use api_key, model, deployment, day"
            ))
        })?;
        if !dims.contains(&d) {
            dims.push(d);
        }
    }
    let day = |name: &str, v: Option<&str>| -> Result<Option<String>, Error> {
        let Some(v) = v.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let date_fmt = time::macros::format_description!("[year]-[month]-[day]");
        if let Ok(t) =
            time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        {
            return Ok(Some(crate::usage::day_of(t.unix_timestamp() * 1000)));
        }
        time::Date::parse(v, date_fmt)
            .map(|_| Some(v.to_string()))
            .map_err(|_| {
                Error::Invalid(format!(
                    "{name}: expected an RFC 3339 time or a YYYY-MM-DD date"
                ))
            })
    };
    Ok(crate::usage::UsageQuery {
        group_by: dims,
        from: day("from", from)?,
        to: day("to", to)?,
    })
}
