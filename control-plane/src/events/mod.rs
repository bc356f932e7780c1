//! Event sourcing: commands are checked by the pure [`handle`] and become
//! [`DomainEvent`]s; state is the pure fold of [`State::apply`]. Events are
//! stored in a versioned envelope and upcast to the current schema on read.

mod command;
mod state;
#[cfg(test)]
mod tests;

pub use command::{handle, Command, ResourceValue};
pub use state::{
    NodeCredential, NodeCredentials, Record, State, StoredProviderKey, MAX_NODE_CREDENTIALS,
};

use crate::error::Error;
use aigw_shared::domain::{ApiKey, JwtProvider, Model, ResourceKind, MASKED};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// What happened to a resource. Serialized as `{"type": ..., "payload": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum DomainEvent {
    ProviderKeyCreated {
        id: String,
        value: StoredProviderKey,
    },
    ProviderKeyUpdated {
        id: String,
        value: StoredProviderKey,
    },
    ProviderKeyDeleted {
        id: String,
    },
    ModelCreated {
        id: String,
        value: Model,
    },
    ModelUpdated {
        id: String,
        value: Model,
    },
    ModelDeleted {
        id: String,
    },
    ApiKeyCreated {
        id: String,
        value: ApiKey,
    },
    ApiKeyUpdated {
        id: String,
        value: ApiKey,
    },
    ApiKeyDeleted {
        id: String,
    },
    JwtProviderCreated {
        id: String,
        value: JwtProvider,
    },
    JwtProviderUpdated {
        id: String,
        value: JwtProvider,
    },
    JwtProviderDeleted {
        id: String,
    },
    /// `id` is the node id.
    NodeCredentialIssued {
        id: String,
        credential: NodeCredential,
    },
    /// A credential's seal key sealed again, with a new master key.
    NodeCredentialResealed {
        id: String,
        credential_id: String,
        seal_key: crate::secrets::Sealed,
    },
    /// One credential of node `id`, or all of them (`credential_id: None`).
    NodeCredentialRevoked {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential_id: Option<String>,
    },
}

impl DomainEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::ProviderKeyCreated { .. } => "ProviderKeyCreated",
            Self::ProviderKeyUpdated { .. } => "ProviderKeyUpdated",
            Self::ProviderKeyDeleted { .. } => "ProviderKeyDeleted",
            Self::ModelCreated { .. } => "ModelCreated",
            Self::ModelUpdated { .. } => "ModelUpdated",
            Self::ModelDeleted { .. } => "ModelDeleted",
            Self::ApiKeyCreated { .. } => "ApiKeyCreated",
            Self::ApiKeyUpdated { .. } => "ApiKeyUpdated",
            Self::ApiKeyDeleted { .. } => "ApiKeyDeleted",
            Self::JwtProviderCreated { .. } => "JwtProviderCreated",
            Self::JwtProviderUpdated { .. } => "JwtProviderUpdated",
            Self::JwtProviderDeleted { .. } => "JwtProviderDeleted",
            Self::NodeCredentialIssued { .. } => "NodeCredentialIssued",
            Self::NodeCredentialRevoked { .. } => "NodeCredentialRevoked",
            Self::NodeCredentialResealed { .. } => "NodeCredentialResealed",
        }
    }

    /// The resource this event is about.
    pub fn resource(&self) -> (ResourceKind, &str) {
        match self {
            Self::ProviderKeyCreated { id, .. }
            | Self::ProviderKeyUpdated { id, .. }
            | Self::ProviderKeyDeleted { id } => (ResourceKind::ProviderKey, id),
            Self::ModelCreated { id, .. }
            | Self::ModelUpdated { id, .. }
            | Self::ModelDeleted { id } => (ResourceKind::Model, id),
            Self::ApiKeyCreated { id, .. }
            | Self::ApiKeyUpdated { id, .. }
            | Self::ApiKeyDeleted { id } => (ResourceKind::ApiKey, id),
            Self::JwtProviderCreated { id, .. }
            | Self::JwtProviderUpdated { id, .. }
            | Self::JwtProviderDeleted { id } => (ResourceKind::JwtProvider, id),
            Self::NodeCredentialIssued { id, .. }
            | Self::NodeCredentialResealed { id, .. }
            | Self::NodeCredentialRevoked { id, .. } => (ResourceKind::Node, id),
        }
    }
}

/// Current schema version of each event type. Bump it when a payload changes
/// shape and add a step to [`upcast`].
pub fn schema_version(type_name: &str) -> u32 {
    match type_name {
        // v2: `expires_at` is RFC 3339 text (v1 stored epoch seconds).
        "ApiKeyCreated" | "ApiKeyUpdated" => 2,
        // v2: plain-http `api_base` needs `allow_insecure_upstream`.
        "ProviderKeyCreated" | "ProviderKeyUpdated" => 2,
        _ => 1,
    }
}

/// Brings a stored payload from `version` up to the current schema, one step
/// at a time.
pub fn upcast(type_name: &str, mut version: u32, mut payload: Value) -> Result<Value, Error> {
    let current = schema_version(type_name);
    if version > current {
        return Err(Error::Storage(format!(
            "event {type_name} has schema version {version}, newer than this build ({current})"
        )));
    }
    while version < current {
        match (type_name, version) {
            ("ApiKeyCreated" | "ApiKeyUpdated", 1) => {
                if let Some(v) = payload.pointer_mut("/value/expires_at") {
                    if let Some(secs) = v.as_i64() {
                        let at = OffsetDateTime::from_unix_timestamp(secs).map_err(|e| {
                            Error::Storage(format!("upcasting {type_name} v1: {e}"))
                        })?;
                        *v = Value::String(format_rfc3339(at));
                    }
                }
            }
            ("ProviderKeyCreated" | "ProviderKeyUpdated", 1) => {
                // Keys written before the rule keep working as they did.
                let http = payload
                    .pointer("/value/api_base")
                    .and_then(Value::as_str)
                    .is_some_and(|b| b.trim().to_ascii_lowercase().starts_with("http://"));
                if let Some(Value::Object(value)) = payload.get_mut("value") {
                    if http {
                        value.insert("allow_insecure_upstream".into(), Value::Bool(true));
                    }
                }
            }
            _ => {
                return Err(Error::Storage(format!(
                    "no upcaster for {type_name} v{version}"
                )))
            }
        }
        version += 1;
    }
    Ok(payload)
}

/// An event as stored: its place in the log, who caused it, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: u64,
    pub at: OffsetDateTime,
    pub actor: String,
    pub event: DomainEvent,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
    actor: String,
    #[serde(rename = "type")]
    type_name: String,
    version: u32,
    payload: Value,
}

impl StoredEvent {
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let mut v = serde_json::to_value(&self.event).map_err(|e| Error::Storage(e.to_string()))?;
        let payload = v.get_mut("payload").map(Value::take).unwrap_or(Value::Null);
        let type_name = self.event.type_name();
        serde_json::to_vec(&Envelope {
            seq: self.seq,
            at: self.at,
            actor: self.actor.clone(),
            type_name: type_name.to_string(),
            version: schema_version(type_name),
            payload,
        })
        .map_err(|e| Error::Storage(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let env: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| Error::Storage(format!("undecodable event: {e}")))?;
        let payload = upcast(&env.type_name, env.version, env.payload)?;
        let event = serde_json::from_value(serde_json::json!({
            "type": env.type_name,
            "payload": payload,
        }))
        .map_err(|e| Error::Storage(format!("event {} ({}): {e}", env.seq, env.type_name)))?;
        Ok(Self {
            seq: env.seq,
            at: env.at,
            actor: env.actor,
            event,
        })
    }

    /// The payload as the audit API shows it: secrets replaced by `"***"`.
    pub fn masked_payload(&self) -> Value {
        let mut v = serde_json::to_value(&self.event).unwrap_or(Value::Null);
        let mut payload = v.get_mut("payload").map(Value::take).unwrap_or(Value::Null);
        for path in [
            "/value/secret",
            "/credential/token_sha256",
            "/credential/seal_key",
            "/seal_key",
        ] {
            if let Some(secret) = payload.pointer_mut(path) {
                *secret = Value::String(MASKED.into());
            }
        }
        payload
    }
}

pub fn format_rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
