//! Caller authentication with JWTs (Entra ID, or any OpenID Connect issuer),
//! besides API keys.
//!
//! - [`JwtAuth`] — the part of a compiled snapshot that knows the trusted
//!   issuers (`jwt_providers`) and the api keys bound to JWT identities
//!   (`jwt_provider_id` + `jwt_subject` and/or `jwt_claims`).
//! - `keys` — [`JwksCache`], one issuer's signing keys: fetched from its JWKS
//!   (found through OpenID discovery unless `jwks_uri` is set), refreshed in
//!   the background, fetched again once on an unknown `kid` (rate-limited),
//!   and kept through an outage of the JWKS endpoint. The [`JwksRegistry`]
//!   lives in the `ConfigHandle`, outside any one snapshot, so a config change
//!   does not cost a fetch.
//! - `verify` — [`verify`]: `alg` (RS256 and ES256 only; `none` and HS* are
//!   refused before any key is looked at), issuer, signature, `aud`, `exp`
//!   and `nbf` with the provider's clock skew, then the identity → api key.

#[cfg(feature = "fuzz")]
pub mod fuzz;
mod keys;
mod verify;

pub use keys::{JwksCache, JwksRegistry, JwksSettings};
pub use verify::{looks_like_jwt, verify, Identity, JwtError, Refusal};

use crate::caller::Caller;
use aigw_shared::domain::{ApiKey, JwtProvider};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Where a provider's signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JwksSource {
    /// `jwks_uri` as configured.
    Uri(String),
    /// `jwks_uri` of the issuer's OpenID discovery document at `url`, whose
    /// `issuer` must be `issuer`.
    Discovery { url: String, issuer: String },
}

/// An api key bound to a JWT identity.
#[derive(Debug)]
struct Binding {
    /// Claims the token must carry (name, value).
    claims: Vec<(String, String)>,
    caller: Arc<Caller>,
}

impl Binding {
    fn matches(&self, claims: &Map<String, Value>) -> bool {
        self.claims
            .iter()
            .all(|(name, want)| claim_has(claims, name, want))
    }
}

/// A trusted issuer, compiled.
#[derive(Debug)]
pub struct Provider {
    pub id: String,
    pub issuer: String,
    audiences: Vec<String>,
    source: JwksSource,
    caller_id_claims: Vec<String>,
    /// Clock skew in seconds, for `exp` and `nbf`.
    leeway: u64,
    /// Identifies the key source, so a cache survives unrelated changes.
    fingerprint: [u8; 32],
    /// By exact caller id.
    subjects: HashMap<String, Binding>,
    /// Claims-only bindings, in api key id order.
    by_claims: Vec<Binding>,
}

impl Provider {
    fn compile(id: &str, p: &JwtProvider) -> Self {
        let source = match &p.jwks_uri {
            Some(uri) => JwksSource::Uri(uri.trim().to_string()),
            None => JwksSource::Discovery {
                url: p.discovery_url(),
                issuer: p.issuer.clone(),
            },
        };
        let mut h = Sha256::new();
        for part in [id, &p.issuer, &format!("{source:?}")] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        Self {
            id: id.to_string(),
            issuer: p.issuer.clone(),
            audiences: p.audiences.clone(),
            source,
            caller_id_claims: p.claim_mappings.caller_id.clone(),
            leeway: p.clock_skew.0.as_secs(),
            fingerprint: h.finalize().into(),
            subjects: HashMap::new(),
            by_claims: Vec::new(),
        }
    }

    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    /// The caller's id: the first configured claim the token has as text.
    fn caller_id<'c>(&self, claims: &'c Map<String, Value>) -> Option<&'c str> {
        self.caller_id_claims
            .iter()
            .find_map(|c| claims.get(c).and_then(Value::as_str))
            .filter(|s| !s.is_empty())
    }

    /// The api key this identity is bound to: its exact subject binding if
    /// the token also carries that binding's claims, else the first
    /// claims-only binding whose claims it carries.
    fn bound(&self, caller_id: &str, claims: &Map<String, Value>) -> Option<&Arc<Caller>> {
        self.subjects
            .get(caller_id)
            .filter(|b| b.matches(claims))
            .or_else(|| self.by_claims.iter().find(|b| b.matches(claims)))
            .map(|b| &b.caller)
    }
}

/// Trusted issuers by `iss`, with the api keys bound to their identities.
#[derive(Debug, Default)]
pub struct JwtAuth {
    by_issuer: HashMap<String, Arc<Provider>>,
}

impl JwtAuth {
    /// Every api key bound to a JWT identity.
    pub fn callers(&self) -> impl Iterator<Item = &Arc<Caller>> {
        self.by_issuer.values().flat_map(|p| {
            p.subjects
                .values()
                .chain(p.by_claims.iter())
                .map(|b| &b.caller)
        })
    }

    /// Compiles the providers and takes the JWT-bound api keys out of
    /// `api_keys` (the rest are key hashes). Any inconsistency rejects the
    /// snapshot.
    pub fn compile(
        providers: &BTreeMap<String, JwtProvider>,
        api_keys: &mut BTreeMap<String, ApiKey>,
        budget_exceeded: &BTreeSet<String>,
        limiter: &crate::limits::Limiter,
    ) -> Result<Self, String> {
        let mut compiled: BTreeMap<&str, Provider> = providers
            .iter()
            .map(|(id, p)| (id.as_str(), Provider::compile(id, p)))
            .collect();
        let bound: Vec<String> = api_keys
            .iter()
            .filter(|(_, k)| k.is_jwt())
            .map(|(id, _)| id.clone())
            .collect();
        for id in bound {
            let Some(k) = api_keys.remove(&id) else {
                continue;
            };
            let pid = k.jwt_provider_id.clone().unwrap_or_default();
            let provider = compiled
                .get_mut(pid.as_str())
                .ok_or_else(|| format!("api key {id}: jwt provider {pid} is missing"))?;
            let subject = k.jwt_subject.clone();
            let claims: Vec<(String, String)> = k
                .jwt_claims
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            let binding = Binding {
                claims,
                caller: Arc::new(Caller::from_api_key(
                    id.clone(),
                    k,
                    budget_exceeded.contains(&id),
                    limiter,
                )),
            };
            match subject {
                Some(s) => {
                    if provider.subjects.insert(s, binding).is_some() {
                        return Err(format!(
                            "api key {id}: another api key binds the same jwt_subject"
                        ));
                    }
                }
                None => provider.by_claims.push(binding),
            }
        }
        let mut by_issuer = HashMap::with_capacity(compiled.len());
        for (id, p) in compiled {
            if by_issuer.insert(p.issuer.clone(), Arc::new(p)).is_some() {
                return Err(format!(
                    "jwt provider {id}: another provider has its issuer"
                ));
            }
        }
        Ok(Self { by_issuer })
    }

    /// The provider trusting `iss`.
    pub fn provider(&self, iss: &str) -> Option<&Arc<Provider>> {
        self.by_issuer.get(iss)
    }

    pub fn providers(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.by_issuer.values()
    }

    pub fn is_empty(&self) -> bool {
        self.by_issuer.is_empty()
    }
}

/// Whether the token's claim `name` holds `want`: equal text, one word of a
/// space-separated text (`scp`), or one item of a list (`roles`, `groups`).
pub fn claim_has(claims: &Map<String, Value>, name: &str, want: &str) -> bool {
    match claims.get(name) {
        Some(Value::String(s)) => s == want || s.split_whitespace().any(|w| w == want),
        Some(Value::Array(items)) => items.iter().any(|v| match v {
            Value::String(s) => s == want,
            Value::Number(n) => n.to_string() == want,
            _ => false,
        }),
        Some(Value::Number(n)) => n.to_string() == want,
        Some(Value::Bool(b)) => b.to_string() == want,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
