//! Caller authentication: the presented key is hashed (sha256) and looked up
//! among the snapshot's api keys; only hashes are ever held.

use crate::config::{Caller, Runtime};
use crate::error::Error;
use http::{header, HeaderMap};
use std::sync::Arc;

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

pub fn authenticate<'a>(rt: &'a Runtime, headers: &HeaderMap) -> Result<&'a Arc<Caller>, Error> {
    let key = presented_key(headers).ok_or(Error::InvalidApiKey(
        "missing API key: send `Authorization: Bearer <key>` or an `api-key` header",
    ))?;
    let caller = rt
        .caller(key)
        .ok_or(Error::InvalidApiKey("invalid API key"))?;
    if caller.disabled {
        return Err(Error::InvalidApiKey("this API key is disabled"));
    }
    if let Some(exp) = caller.expires_at {
        if time::OffsetDateTime::now_utc().unix_timestamp() >= exp {
            return Err(Error::InvalidApiKey("this API key has expired"));
        }
    }
    Ok(caller)
}
