//! Form fields → the admin API's JSON values. Inputs are named after the
//! JSON paths they fill (`rate_limit.rpm`, `secret.tenant_id`), so an API
//! error naming a field is shown next to that input.

use crate::admin::Input;
use crate::error::Error;
use aigw_shared::domain::ResourceKind;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// Target rows on the model form.
pub const TARGET_ROWS: usize = 3;

/// A posted form: every value by name (checkbox groups repeat a name).
#[derive(Debug, Clone, Default)]
pub struct FormData {
    pairs: Vec<(String, String)>,
}

impl FormData {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }

    /// The first value of `name`, trimmed; empty when absent.
    pub fn get(&self, name: &str) -> &str {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .unwrap_or_default()
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim())
            .collect()
    }

    pub fn has(&self, name: &str) -> bool {
        !self.get(name).is_empty()
    }
}

/// What a page shows around its create form: values typed (on an error),
/// errors by input name, a message for the whole form.
#[derive(Debug, Clone, Default)]
pub struct FormState {
    pub values: FormData,
    pub errors: HashMap<String, String>,
    pub general: Option<String>,
    pub notice: Option<String>,
}

/// Inputs errors can be shown next to, per resource form.
const FIELDS: &[&str] = &[
    "display_name",
    "api_base",
    "api_version",
    "secret",
    "secret.tenant_id",
    "secret.client_id",
    "secret.client_secret",
    "secret.managed_identity.client_id",
    "ca_pem",
    "targets",
    "routing.strategy",
    "routing.retries",
    "routing.timeout",
    "rate_limit.rpm",
    "rate_limit.tpm",
    "cost.input_per_1k",
    "cost.output_per_1k",
    "cache.ttl_seconds",
    "allowed_models",
    "budget.max_usd",
    "expires_at",
    "jwt_provider_id",
    "jwt_subject",
    "issuer",
    "audiences",
    "jwks_uri",
    "claim_mappings.caller_id",
    "clock_skew",
];

impl FormState {
    /// `e` placed next to the input it names (`field: message`), else above the form.
    pub fn from_error(form: &FormData, e: &Error) -> Self {
        let text = e.to_string();
        let mut st = Self {
            values: form.clone(),
            ..Self::default()
        };
        // The longest known input that the error's field path starts with.
        let field = text.split_once(": ").map(|(f, _)| f).and_then(|f| {
            let f = f.trim_start_matches('.');
            FIELDS
                .iter()
                .filter(|name| {
                    f == **name
                        || f.starts_with(&format!("{name}."))
                        || f.starts_with(&format!("{name}["))
                })
                .max_by_key(|name| name.len())
                .map(|name| (*name, f))
        });
        match field {
            Some((name, _)) => {
                st.errors.insert(name.to_string(), text);
            }
            None => st.general = Some(text),
        }
        st
    }

    pub fn general_error(e: &Error) -> Self {
        Self {
            general: Some(e.to_string()),
            ..Self::default()
        }
    }

    pub fn notice(text: String) -> Self {
        Self {
            notice: Some(text),
            ..Self::default()
        }
    }

    pub fn error(&self, name: &str) -> Option<&str> {
        self.errors.get(name).map(String::as_str)
    }
}

fn invalid(field: &str, msg: &str) -> Error {
    Error::Invalid(format!("{field}: {msg}"))
}

/// An optional whole number.
fn int(form: &FormData, name: &str) -> Result<Option<u64>, Error> {
    match form.get(name) {
        "" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .map_err(|_| invalid(name, "expected a whole number")),
    }
}

/// An optional decimal number.
fn num(form: &FormData, name: &str) -> Result<Option<f64>, Error> {
    match form.get(name) {
        "" => Ok(None),
        v => v
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .map(Some)
            .ok_or_else(|| invalid(name, "expected a number")),
    }
}

fn opt_str(form: &FormData, name: &str) -> Value {
    match form.get(name) {
        "" => Value::Null,
        v => json!(v),
    }
}

fn list(form: &FormData, name: &str) -> Vec<String> {
    form.get(name)
        .split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Drops nulls and empty objects, so absent inputs stay absent in the value.
fn prune(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let m: Map<String, Value> = m
                .into_iter()
                .map(|(k, v)| (k, prune(v)))
                .filter(|(_, v)| !v.is_null() && !v.as_object().is_some_and(Map::is_empty))
                .collect();
            Value::Object(m)
        }
        other => other,
    }
}

/// The create form of `kind` as the API's value (`generated`: a new API key's secret).
pub fn input(kind: ResourceKind, form: &FormData, generated: Option<&str>) -> Result<Input, Error> {
    let value = match kind {
        ResourceKind::ProviderKey => provider_key(form)?,
        ResourceKind::Model => model(form)?,
        ResourceKind::ApiKey => api_key(form, generated)?,
        ResourceKind::JwtProvider => jwt_provider(form),
        ResourceKind::Node => return Err(Error::UnknownCollection("nodes".into())),
    };
    from_value(kind, prune(value))
}

fn provider_key(form: &FormData) -> Result<Value, Error> {
    let secret = match form.get("credential") {
        "client_secret" => json!({
            "tenant_id": form.get("secret.tenant_id"),
            "client_id": form.get("secret.client_id"),
            "client_secret": form.get("secret.client_secret"),
        })
        .to_string(),
        "managed_identity" => {
            json!({ "managed_identity": prune(json!({ "client_id": opt_str(form, "secret.managed_identity.client_id") })) })
                .to_string()
        }
        "workload_identity" => json!({ "workload_identity": {} }).to_string(),
        _ => form.get("secret").to_string(),
    };
    Ok(json!({
        "display_name": form.get("display_name"),
        "provider": "azure",
        "secret": secret,
        "api_base": form.get("api_base"),
        "api_version": opt_str(form, "api_version"),
        "ca_pem": opt_str(form, "ca_pem"),
        "allow_insecure_upstream": form.has("allow_insecure_upstream"),
    }))
}

fn model(form: &FormData) -> Result<Value, Error> {
    let mut targets = Vec::new();
    for i in 0..TARGET_ROWS {
        let f = |name: &str| format!("targets[{i}].{name}");
        if !form.has(&f("provider_key_id")) && !form.has(&f("model_name")) {
            continue;
        }
        let n = |name: &str| {
            int(form, &f(name)).map_err(|_| {
                invalid(
                    "targets",
                    &format!("row {}: {name} must be a whole number", i + 1),
                )
            })
        };
        targets.push(json!({
            "provider_key_id": form.get(&f("provider_key_id")),
            "model_name": form.get(&f("model_name")),
            "priority": n("priority")?.unwrap_or(0),
            "weight": n("weight")?.unwrap_or(1),
        }));
    }
    let cache_ttl = int(form, "cache.ttl_seconds")?;
    let cache = if form.has("cache.enabled") || cache_ttl.is_some() {
        json!({ "enabled": form.has("cache.enabled"), "ttl_seconds": cache_ttl })
    } else {
        Value::Null
    };
    let cost = match (
        num(form, "cost.input_per_1k")?,
        num(form, "cost.output_per_1k")?,
    ) {
        (None, None) => Value::Null,
        (i, o) => json!({ "input_per_1k": i.unwrap_or(0.0), "output_per_1k": o.unwrap_or(0.0) }),
    };
    Ok(json!({
        "display_name": form.get("display_name"),
        "provider": "azure",
        "targets": targets,
        "routing": {
            "strategy": opt_str(form, "routing.strategy"),
            "retries": int(form, "routing.retries")?,
            "timeout": opt_str(form, "routing.timeout"),
        },
        "rate_limit": { "rpm": int(form, "rate_limit.rpm")?, "tpm": int(form, "rate_limit.tpm")? },
        "cost": cost,
        "cache": cache,
    }))
}

fn api_key(form: &FormData, generated: Option<&str>) -> Result<Value, Error> {
    use sha2::{Digest, Sha256};
    let budget = match num(form, "budget.max_usd")? {
        Some(max) => json!({ "max_usd": max, "period": opt_str(form, "budget.period") }),
        None => Value::Null,
    };
    // A date means the end of that day (UTC); a full RFC 3339 time is taken as is.
    let expires = match form.get("expires_at") {
        "" => Value::Null,
        d if d.len() == 10 => json!(format!("{d}T23:59:59Z")),
        t => json!(t),
    };
    let claims: Map<String, Value> = list(form, "jwt_claims")
        .iter()
        .filter_map(|c| c.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), json!(v.trim())))
        .collect();
    Ok(json!({
        "key_hash": generated.map(|k| hex::encode(Sha256::digest(k.as_bytes()))),
        "display_name": opt_str(form, "display_name"),
        "allowed_models": form.all("allowed_models"),
        "rate_limit": { "rpm": int(form, "rate_limit.rpm")?, "tpm": int(form, "rate_limit.tpm")? },
        "budget": budget,
        "expires_at": expires,
        "disabled": form.has("disabled"),
        "jwt_provider_id": opt_str(form, "jwt_provider_id"),
        "jwt_subject": opt_str(form, "jwt_subject"),
        "jwt_claims": claims,
    }))
}

fn jwt_provider(form: &FormData) -> Value {
    json!({
        "display_name": form.get("display_name"),
        "issuer": form.get("issuer"),
        "audiences": list(form, "audiences"),
        "jwks_uri": opt_str(form, "jwks_uri"),
        "claim_mappings": { "caller_id": list(form, "claim_mappings.caller_id") },
        "clock_skew": opt_str(form, "clock_skew"),
    })
}

/// The edit form's JSON text as the API's value (the same parse as a REST body).
pub fn json_input(kind: ResourceKind, text: &str) -> Result<Input, Error> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("malformed JSON: {e}")))?;
    from_value(kind, value)
}

fn from_value(kind: ResourceKind, value: Value) -> Result<Input, Error> {
    fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Error> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            if path == "." || path == "?" {
                Error::Invalid(format!("invalid value: {}", e.into_inner()))
            } else {
                Error::Invalid(format!("{path}: invalid value: {}", e.into_inner()))
            }
        })
    }
    Ok(match kind {
        ResourceKind::ProviderKey => Input::ProviderKey(parse(value)?),
        ResourceKind::Model => Input::Model(parse(value)?),
        ResourceKind::ApiKey => Input::ApiKey(parse(value)?),
        ResourceKind::JwtProvider => Input::JwtProvider(parse(value)?),
        ResourceKind::Node => return Err(Error::UnknownCollection("nodes".into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> FormData {
        FormData::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_model_form_becomes_targets_and_limits() {
        let f = form(&[
            ("display_name", "gpt"),
            ("targets[0].provider_key_id", "pk1"),
            ("targets[0].model_name", "dep"),
            ("targets[0].weight", "3"),
            ("rate_limit.rpm", "10"),
            ("routing.strategy", ""),
        ]);
        let Input::Model(m) = input(ResourceKind::Model, &f, None).unwrap() else {
            panic!("not a model")
        };
        assert_eq!(m.targets.len(), 1);
        assert_eq!(m.targets[0].weight, 3);
        assert_eq!(m.rate_limit.unwrap().rpm, Some(10));
        assert!(m.cache.is_none() && m.cost.is_none());
    }

    #[test]
    fn errors_land_next_to_their_input() {
        let f = form(&[("rate_limit.rpm", "ten")]);
        let e = input(ResourceKind::ApiKey, &f, Some("k")).unwrap_err();
        let st = FormState::from_error(&f, &e);
        assert!(st.error("rate_limit.rpm").is_some(), "{st:?}");
        let st = FormState::from_error(&f, &Error::Invalid("secret.tenant_id: must be".into()));
        assert!(st.error("secret.tenant_id").is_some());
        let st = FormState::from_error(&f, &Error::Invalid("something else".into()));
        assert_eq!(st.general.as_deref(), Some("something else"));
    }

    #[test]
    fn an_api_key_form_stores_only_the_hash() {
        let f = form(&[
            ("allowed_models", "a"),
            ("allowed_models", "b"),
            ("expires_at", "2030-01-02"),
        ]);
        let Input::ApiKey(k) = input(ResourceKind::ApiKey, &f, Some("sk-1")).unwrap() else {
            panic!("not an api key")
        };
        assert_eq!(k.allowed_models, ["a", "b"]);
        assert_eq!(k.key_hash.len(), 64);
        assert!(k.expires_at.is_some());
    }
}
