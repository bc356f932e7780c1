use super::{DomainEvent, NodeCredential, State, StoredProviderKey, MAX_NODE_CREDENTIALS};
use crate::error::Error;
use aigw_shared::domain::{ApiKey, JwtProvider, Model, ResourceKind, MAX_FALLBACK_DEPTH};
use std::collections::{BTreeMap, BTreeSet};

/// A value ready to store: validated on its own, secrets already sealed.
#[derive(Debug, Clone, PartialEq)]
pub enum ResourceValue {
    ProviderKey(StoredProviderKey),
    Model(Model),
    ApiKey(ApiKey),
    JwtProvider(JwtProvider),
}

impl ResourceValue {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Self::ProviderKey(_) => ResourceKind::ProviderKey,
            Self::Model(_) => ResourceKind::Model,
            Self::ApiKey(_) => ResourceKind::ApiKey,
            Self::JwtProvider(_) => ResourceKind::JwtProvider,
        }
    }
}

/// An admin mutation. Ids are chosen by the caller of `handle` so that
/// `handle` stays pure.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Create {
        id: String,
        value: ResourceValue,
    },
    /// Full replace. With `upsert`, a missing id is created (REST `PUT`).
    Update {
        id: String,
        value: ResourceValue,
        expected_revision: Option<u64>,
        upsert: bool,
    },
    /// For `ResourceKind::Node`: revokes every credential of the node.
    Delete {
        kind: ResourceKind,
        id: String,
        expected_revision: Option<u64>,
    },
    /// A new credential for data-plane node `node_id` (token generated and
    /// hashed by the caller).
    IssueNodeCredential {
        node_id: String,
        credential: NodeCredential,
    },
    /// Replaces a credential's sealed seal key (master key rotation).
    ResealNodeCredential {
        node_id: String,
        credential_id: String,
        seal_key: crate::secrets::Sealed,
    },
    /// Revokes one credential of a node.
    RevokeNodeCredential {
        node_id: String,
        credential_id: String,
        expected_revision: Option<u64>,
    },
}

impl Command {
    /// The resource kind and the operation, for metrics.
    pub fn describe(&self) -> (ResourceKind, &'static str) {
        match self {
            Self::Create { value, .. } => (value.kind(), "create"),
            Self::Update { value, .. } => (value.kind(), "update"),
            Self::Delete { kind, .. } => (*kind, "delete"),
            Self::IssueNodeCredential { .. } => (ResourceKind::Node, "issue"),
            Self::RevokeNodeCredential { .. } => (ResourceKind::Node, "revoke"),
            Self::ResealNodeCredential { .. } => (ResourceKind::Node, "reseal"),
        }
    }
}

/// Decides, against the current state, which events a command produces.
/// Pure: no I/O, no clock, no randomness.
pub fn handle(state: &State, command: &Command) -> Result<Vec<DomainEvent>, Error> {
    match command {
        Command::Create { id, value } => {
            if state.revision(value.kind(), id).is_some() {
                return Err(Error::Duplicate(format!(
                    "{} id `{id}` already exists",
                    value.kind()
                )));
            }
            check_value(state, id, value)?;
            Ok(vec![created(id, value)])
        }
        Command::Update {
            id,
            value,
            expected_revision,
            upsert,
        } => {
            let kind = value.kind();
            match (state.revision(kind, id), expected_revision) {
                (None, Some(_)) | (None, None) if !upsert => {
                    return Err(Error::NotFound {
                        kind,
                        id: id.clone(),
                    })
                }
                (None, Some(expected)) => {
                    return Err(Error::StaleRevision {
                        expected: *expected,
                        current: 0,
                    })
                }
                (Some(current), Some(expected)) if current != *expected => {
                    return Err(Error::StaleRevision {
                        expected: *expected,
                        current,
                    })
                }
                _ => {}
            }
            check_value(state, id, value)?;
            Ok(vec![if state.revision(kind, id).is_some() {
                updated(id, value)
            } else {
                created(id, value)
            }])
        }
        Command::Delete {
            kind,
            id,
            expected_revision,
        } => {
            let current = state.revision(*kind, id).ok_or_else(|| Error::NotFound {
                kind: *kind,
                id: id.clone(),
            })?;
            if let Some(expected) = expected_revision {
                if *expected != current {
                    return Err(Error::StaleRevision {
                        expected: *expected,
                        current,
                    });
                }
            }
            if *kind == ResourceKind::ProviderKey {
                if let Some((mid, m)) = state
                    .models
                    .iter()
                    .find(|(_, m)| m.value.provider_key_ids().any(|p| p == id))
                {
                    return Err(Error::Reference(format!(
                        "provider key `{id}` is still used by model `{}` (id {mid})",
                        m.value.display_name
                    )));
                }
            }
            if *kind == ResourceKind::Model {
                if let Some(name) = state.models.get(id).map(|r| &r.value.display_name) {
                    if let Some((mid, m)) = state.models.iter().find(|(mid, m)| {
                        *mid != id && m.value.fallbacks.aliases().contains(name.as_str())
                    }) {
                        return Err(Error::Reference(format!(
                            "model `{name}` is a fallback of model `{}` (id {mid})",
                            m.value.display_name
                        )));
                    }
                }
            }
            if *kind == ResourceKind::JwtProvider {
                if let Some((kid, k)) = state
                    .api_keys
                    .iter()
                    .find(|(_, k)| k.value.jwt_provider_id.as_deref() == Some(id.as_str()))
                {
                    let name = k
                        .value
                        .display_name
                        .as_deref()
                        .map(|n| format!(" `{n}`"))
                        .unwrap_or_default();
                    return Err(Error::Reference(format!(
                        "jwt provider `{id}` is still used by api key{name} (id {kid})"
                    )));
                }
            }
            let id = id.clone();
            Ok(vec![match kind {
                ResourceKind::ProviderKey => DomainEvent::ProviderKeyDeleted { id },
                ResourceKind::Model => DomainEvent::ModelDeleted { id },
                ResourceKind::ApiKey => DomainEvent::ApiKeyDeleted { id },
                ResourceKind::JwtProvider => DomainEvent::JwtProviderDeleted { id },
                ResourceKind::Node => DomainEvent::NodeCredentialRevoked {
                    id,
                    credential_id: None,
                },
            }])
        }
        Command::IssueNodeCredential {
            node_id,
            credential,
        } => {
            let held = state
                .nodes
                .get(node_id)
                .map(|r| r.value.credentials.as_slice())
                .unwrap_or_default();
            if held.len() >= MAX_NODE_CREDENTIALS {
                return Err(Error::Invalid(format!(
                    "node `{node_id}` already holds {MAX_NODE_CREDENTIALS} credentials; \
                     revoke one (DELETE /admin/v1/nodes/{node_id}/credentials/<id>) first"
                )));
            }
            let reused = state.nodes.values().any(|r| {
                r.value
                    .credentials
                    .iter()
                    .any(|c| c.id == credential.id || c.token_sha256 == credential.token_sha256)
            });
            if reused {
                return Err(Error::Duplicate(
                    "a node credential with this id or token already exists".into(),
                ));
            }
            Ok(vec![DomainEvent::NodeCredentialIssued {
                id: node_id.clone(),
                credential: credential.clone(),
            }])
        }
        Command::ResealNodeCredential {
            node_id,
            credential_id,
            seal_key,
        } => {
            let held = state
                .nodes
                .get(node_id)
                .is_some_and(|r| r.value.credentials.iter().any(|c| &c.id == credential_id));
            if !held {
                return Err(Error::NotFound {
                    kind: ResourceKind::Node,
                    id: format!("{node_id}/credentials/{credential_id}"),
                });
            }
            Ok(vec![DomainEvent::NodeCredentialResealed {
                id: node_id.clone(),
                credential_id: credential_id.clone(),
                seal_key: seal_key.clone(),
            }])
        }
        Command::RevokeNodeCredential {
            node_id,
            credential_id,
            expected_revision,
        } => {
            let not_found = || Error::NotFound {
                kind: ResourceKind::Node,
                id: node_id.clone(),
            };
            let record = state.nodes.get(node_id).ok_or_else(not_found)?;
            if let Some(expected) = expected_revision {
                if *expected != record.revision {
                    return Err(Error::StaleRevision {
                        expected: *expected,
                        current: record.revision,
                    });
                }
            }
            if !record
                .value
                .credentials
                .iter()
                .any(|c| &c.id == credential_id)
            {
                return Err(Error::NotFound {
                    kind: ResourceKind::Node,
                    id: format!("{node_id}/credentials/{credential_id}"),
                });
            }
            Ok(vec![DomainEvent::NodeCredentialRevoked {
                id: node_id.clone(),
                credential_id: Some(credential_id.clone()),
            }])
        }
    }
}

/// Rules that depend on other resources: unique names and hashes, references.
fn check_value(state: &State, id: &str, value: &ResourceValue) -> Result<(), Error> {
    let kind = value.kind();
    let unique_name = |name: &str| -> Result<(), Error> {
        match state.id_by_name(kind, name) {
            Some(other) if other != id => Err(Error::Duplicate(format!(
                "display_name: a {kind} named `{name}` already exists (id {other})"
            ))),
            _ => Ok(()),
        }
    };
    match value {
        ResourceValue::ProviderKey(pk) => unique_name(&pk.display_name),
        ResourceValue::Model(m) => {
            unique_name(&m.display_name)?;
            for pk in m.provider_key_ids() {
                if !state.provider_keys.contains_key(pk) {
                    return Err(Error::Reference(format!(
                        "provider_key_id: provider key `{pk}` does not exist"
                    )));
                }
            }
            check_fallbacks(state, id, m)
        }
        ResourceValue::ApiKey(k) => {
            if let Some(name) = &k.display_name {
                unique_name(name)?;
            }
            if let Some(provider) = &k.jwt_provider_id {
                return check_jwt_binding(state, id, k, provider);
            }
            match state.id_by_key_hash(&k.key_hash) {
                Some(other) if other != id => Err(Error::Duplicate(format!(
                    "key_hash: another api key already has this hash (id {other})"
                ))),
                _ => Ok(()),
            }
        }
        ResourceValue::JwtProvider(p) => {
            unique_name(&p.display_name)?;
            match state
                .jwt_providers
                .iter()
                .find(|(other, r)| *other != id && r.value.issuer == p.issuer)
            {
                Some((other, _)) => Err(Error::Duplicate(format!(
                    "issuer: jwt provider {other} already trusts this issuer; \
                     add the audience to it instead"
                ))),
                None => Ok(()),
            }
        }
    }
}

/// Fallback aliases must name models, form no cycle and chain at most
/// [`MAX_FALLBACK_DEPTH`] deep, over every model with `m` written as `id`
/// (a rename must not strand another model's fallback either).
fn check_fallbacks(state: &State, id: &str, m: &Model) -> Result<(), Error> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = state
        .models
        .iter()
        .filter(|(mid, _)| *mid != id)
        .map(|(_, r)| (r.value.display_name.as_str(), r.value.fallbacks.aliases()))
        .collect();
    graph.insert(m.display_name.as_str(), m.fallbacks.aliases());
    for (from, to) in &graph {
        if let Some(missing) = to.iter().find(|a| !graph.contains_key(**a)) {
            return Err(Error::Reference(if *from == m.display_name {
                format!("fallbacks: model `{missing}` does not exist")
            } else {
                format!("model `{from}` falls back to `{missing}`, which would no longer exist")
            }));
        }
    }
    let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
    for start in graph.keys() {
        let d = chain_depth(&graph, start, &mut depth, &mut Vec::new())?;
        if d > MAX_FALLBACK_DEPTH {
            return Err(Error::Invalid(format!(
                "fallbacks: the chain from `{start}` is {d} deep; at most {MAX_FALLBACK_DEPTH}"
            )));
        }
    }
    Ok(())
}

/// Longest fallback chain from `alias` (edges); a cycle is an error.
fn chain_depth<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    alias: &'a str,
    memo: &mut BTreeMap<&'a str, usize>,
    path: &mut Vec<&'a str>,
) -> Result<usize, Error> {
    if let Some(d) = memo.get(alias) {
        return Ok(*d);
    }
    if path.contains(&alias) {
        path.push(alias);
        return Err(Error::Invalid(format!(
            "fallbacks: cycle {}",
            path.join(" → ")
        )));
    }
    path.push(alias);
    let mut longest = 0;
    for next in graph.get(alias).into_iter().flatten() {
        longest = longest.max(chain_depth(graph, next, memo, path)? + 1);
        // Past the bound already: no need to walk further.
        if longest > MAX_FALLBACK_DEPTH + 1 {
            break;
        }
    }
    path.pop();
    memo.insert(alias, longest);
    Ok(longest)
}

/// The provider must exist, and one identity (provider, subject) binds one key.
fn check_jwt_binding(state: &State, id: &str, k: &ApiKey, provider: &str) -> Result<(), Error> {
    if !state.jwt_providers.contains_key(provider) {
        return Err(Error::Reference(format!(
            "jwt_provider_id: jwt provider `{provider}` does not exist"
        )));
    }
    let Some(subject) = &k.jwt_subject else {
        return Ok(());
    };
    match state.api_keys.iter().find(|(other, r)| {
        *other != id
            && r.value.jwt_provider_id.as_deref() == Some(provider)
            && r.value.jwt_subject.as_ref() == Some(subject)
    }) {
        Some((other, _)) => Err(Error::Duplicate(format!(
            "jwt_subject: api key {other} already binds this identity"
        ))),
        None => Ok(()),
    }
}

fn created(id: &str, value: &ResourceValue) -> DomainEvent {
    let id = id.to_string();
    match value.clone() {
        ResourceValue::ProviderKey(value) => DomainEvent::ProviderKeyCreated { id, value },
        ResourceValue::Model(value) => DomainEvent::ModelCreated { id, value },
        ResourceValue::ApiKey(value) => DomainEvent::ApiKeyCreated { id, value },
        ResourceValue::JwtProvider(value) => DomainEvent::JwtProviderCreated { id, value },
    }
}

fn updated(id: &str, value: &ResourceValue) -> DomainEvent {
    let id = id.to_string();
    match value.clone() {
        ResourceValue::ProviderKey(value) => DomainEvent::ProviderKeyUpdated { id, value },
        ResourceValue::Model(value) => DomainEvent::ModelUpdated { id, value },
        ResourceValue::ApiKey(value) => DomainEvent::ApiKeyUpdated { id, value },
        ResourceValue::JwtProvider(value) => DomainEvent::JwtProviderUpdated { id, value },
    }
}
