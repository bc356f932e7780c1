//! Caller authentication. A bearer that parses as a JWT is verified against
//! the snapshot's trusted issuers (`crate::jwt`) and resolves to the api key
//! bound to its identity; anything else is an API key: hashed (sha256) and
//! looked up among the snapshot's api keys, of which only hashes are held.
//! Either way the same allowlists, limits and budgets apply.

use crate::caller::Caller;
use crate::config::Runtime;
use crate::error::Error;
use crate::jwt::JwksRegistry;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use std::sync::Arc;

/// The verified JWT caller's id, sent upstream (APIM's `caller-objectid`).
/// Set only from a verified token; a caller's own header is dropped.
pub static CALLER_OBJECT_ID: HeaderName = HeaderName::from_static("caller-objectid");

/// The key from `Authorization: Bearer …`, `api-key` or `x-api-key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some((scheme, rest)) = v.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
                return Some(rest.trim());
            }
        }
    }
    ["api-key", "x-api-key"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// An authenticated caller: its api key, and for a JWT caller its id.
/// Derefs to the api key's [`Caller`] (allowlist, budget, id).
#[derive(Debug, Clone)]
pub struct Authenticated {
    key: Arc<Caller>,
    caller_id: Option<HeaderValue>,
}

impl std::ops::Deref for Authenticated {
    type Target = Caller;

    fn deref(&self) -> &Caller {
        &self.key
    }
}

impl Authenticated {
    /// The JWT caller's id (per the provider's claim mappings); empty for
    /// API-key callers.
    pub fn caller_id(&self) -> &str {
        self.caller_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Puts the verified caller id in `caller-objectid` on the inbound
    /// headers (which `upstream` forwards), dropping any the caller sent.
    pub fn stamp(&self, headers: &mut HeaderMap) {
        headers.remove(&CALLER_OBJECT_ID);
        if let Some(v) = &self.caller_id {
            headers.insert(CALLER_OBJECT_ID.clone(), v.clone());
        }
    }
}

pub async fn authenticate(
    rt: &Runtime,
    jwks: &JwksRegistry,
    headers: &HeaderMap,
) -> Result<Authenticated, Error> {
    let key = presented_key(headers).ok_or(Error::InvalidApiKey(
        "missing API key: send `Authorization: Bearer <key>` or an `api-key` header",
    ))?;
    let span = tracing::Span::current();
    if crate::jwt::looks_like_jwt(key) {
        let identity = crate::jwt::verify(rt.jwt(), jwks, key).await?;
        span.record("api_key_id", identity.caller.id.as_str());
        span.record("caller_id", identity.caller_id.as_str());
        // A disabled or expired binding answers like an unbound identity.
        if identity.caller.disabled || expired(&identity.caller) {
            return Err(Error::InvalidApiKey("invalid API key or token"));
        }
        let mut id = HeaderValue::from_str(&identity.caller_id)
            .map_err(|_| Error::InvalidApiKey("invalid API key or token"))?;
        id.set_sensitive(true);
        return Ok(Authenticated {
            key: identity.caller,
            caller_id: Some(id),
        });
    }
    let caller = rt
        .caller(key)
        .ok_or(Error::InvalidApiKey("invalid API key"))?;
    span.record("api_key_id", caller.id.as_str());
    if caller.disabled {
        return Err(Error::InvalidApiKey("this API key is disabled"));
    }
    if expired(caller) {
        return Err(Error::InvalidApiKey("this API key has expired"));
    }
    Ok(Authenticated {
        key: caller.clone(),
        caller_id: None,
    })
}

fn expired(caller: &Caller) -> bool {
    caller
        .expires_at
        .is_some_and(|exp| time::OffsetDateTime::now_utc().unix_timestamp() >= exp)
}
