//! Responses API ids as callers see them: the upstream's id sealed together
//! with the provider key that stored the response, the api key that created
//! it and the model alias, under a key every data plane shares (the
//! snapshot's `response_id_key`).
//!
//! Why sealed ids rather than a shared map: a stored response lives in one
//! Azure resource, so every later call about it (`previous_response_id`,
//! `GET|DELETE /v1/responses/{id}`, cancel, input items) must reach the
//! provider key that created it — from any node, after the first node is
//! gone. An id that carries its own route needs no shared state, no lookup
//! and nothing to lose or expire; AES-GCM makes it unforgeable (a caller
//! cannot point an id at another key) and binding the api key means a
//! caller can open only its own responses (anyone else's id is unknown: 404).
//!
//! The nonce is synthetic (a hash of key and plaintext), so one response has
//! one id for its creator: the id in `response.created` and the one in
//! `response.completed` are equal, as clients expect.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// What every id callers see starts with, as OpenAI's do.
pub const PREFIX: &str = "resp_";
/// Longest id accepted from a caller (ours are ~200 characters): bounds what
/// a hostile id costs.
pub const MAX_ID_LEN: usize = 2048;
const VERSION: u8 = 1;
const AAD: &[u8] = b"aigw:response-id:v1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What a sealed id says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseRef {
    /// The provider key (Azure resource) that stores the response.
    pub provider_key_id: String,
    /// The api key that created it: the only one that may use it.
    pub api_key_id: String,
    /// The model alias it was created through (usage of later calls).
    pub alias: String,
    /// Azure's own id.
    pub upstream_id: String,
}

/// Seals and opens ids with the fleet's key.
pub struct ResponseIds {
    aead: Aes256Gcm,
    key: [u8; 32],
}

impl std::fmt::Debug for ResponseIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseIds(***)")
    }
}

impl ResponseIds {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            aead: Aes256Gcm::new(key.into()),
            key: *key,
        }
    }

    /// The id the caller gets for `r`; `None` only if a field is too long
    /// to encode (no real id or name is).
    pub fn seal(&self, r: &ResponseRef) -> Option<String> {
        let mut plain = vec![VERSION];
        for field in [&r.provider_key_id, &r.api_key_id, &r.alias] {
            let len = u16::try_from(field.len()).ok()?;
            plain.extend_from_slice(&len.to_be_bytes());
            plain.extend_from_slice(field.as_bytes());
        }
        plain.extend_from_slice(r.upstream_id.as_bytes());
        let digest = Sha256::new()
            .chain_update(b"aigw response id nonce\0")
            .chain_update(self.key)
            .chain_update(&plain)
            .finalize();
        let nonce = digest.get(..NONCE_LEN)?;
        let sealed = self
            .aead
            .encrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: &plain,
                    aad: AAD,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&sealed);
        Some(format!("{PREFIX}{}", B64.encode(out)))
    }

    /// What `id` says, if this fleet sealed it for `api_key_id`. Forged,
    /// truncated, tampered, foreign or another caller's: `None`, all alike,
    /// so nobody learns whether an id exists.
    pub fn open(&self, id: &str, api_key_id: &str) -> Option<ResponseRef> {
        if id.len() > MAX_ID_LEN {
            return None;
        }
        let bytes = B64.decode(id.strip_prefix(PREFIX)?).ok()?;
        if bytes.len() < NONCE_LEN + TAG_LEN + 1 {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let plain = self
            .aead
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: AAD,
                },
            )
            .ok()?;
        let r = decode(&plain)?;
        (r.api_key_id == api_key_id).then_some(r)
    }
}

fn decode(plain: &[u8]) -> Option<ResponseRef> {
    let (&version, mut rest) = plain.split_first()?;
    if version != VERSION {
        return None;
    }
    let mut field = || -> Option<String> {
        let (len, tail) = rest.split_at_checked(2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let (value, tail) = tail.split_at_checked(len)?;
        rest = tail;
        String::from_utf8(value.to_vec()).ok()
    };
    let provider_key_id = field()?;
    let api_key_id = field()?;
    let alias = field()?;
    let upstream_id = String::from_utf8(rest.to_vec()).ok()?;
    (!upstream_id.is_empty()).then_some(ResponseRef {
        provider_key_id,
        api_key_id,
        alias,
        upstream_id,
    })
}

/// The ids of one call's answer: every response id in it is sealed for the
/// target that answered and the caller that asked.
#[derive(Debug, Clone)]
pub struct IdScope {
    pub ids: Arc<ResponseIds>,
    pub provider_key_id: String,
    pub api_key_id: String,
    pub alias: String,
}

impl IdScope {
    /// The caller's id for Azure's `upstream_id` (unchanged if it cannot be
    /// sealed, which no real id triggers).
    pub fn seal(&self, upstream_id: &str) -> String {
        self.ids
            .seal(&ResponseRef {
                provider_key_id: self.provider_key_id.clone(),
                api_key_id: self.api_key_id.clone(),
                alias: self.alias.clone(),
                upstream_id: upstream_id.to_string(),
            })
            .unwrap_or_else(|| upstream_id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ResponseRef {
        ResponseRef {
            provider_key_id: "pk-west".into(),
            api_key_id: "key-1".into(),
            alias: "gpt-4o".into(),
            upstream_id: "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b".into(),
        }
    }

    #[test]
    fn an_id_opens_for_its_caller_only() {
        let ids = ResponseIds::new(&[3u8; 32]);
        let id = ids.seal(&sample()).unwrap();
        assert!(id.starts_with(PREFIX), "{id}");
        assert!(
            !id.contains("pk-west") && !id.contains("67ccd2bed1ec"),
            "{id}"
        );
        assert_eq!(ids.open(&id, "key-1"), Some(sample()));
        assert_eq!(ids.open(&id, "key-2"), None, "another caller");
        // Deterministic: one response, one id for its caller.
        assert_eq!(ids.seal(&sample()), Some(id.clone()));
        let mut other = sample();
        other.api_key_id = "key-2".into();
        assert_ne!(ids.seal(&other), Some(id.clone()));
        // Another fleet's key opens nothing.
        assert_eq!(ResponseIds::new(&[4u8; 32]).open(&id, "key-1"), None);
    }

    #[test]
    fn tampered_truncated_and_forged_ids_open_nothing() {
        let ids = ResponseIds::new(&[3u8; 32]);
        let id = ids.seal(&sample()).unwrap();
        let body = id.strip_prefix(PREFIX).unwrap();
        // Every single-character change anywhere in the id.
        for i in 0..body.len() {
            let mut chars: Vec<char> = body.chars().collect();
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            let tampered: String = chars.into_iter().collect();
            assert_eq!(
                ids.open(&format!("{PREFIX}{tampered}"), "key-1"),
                None,
                "{i}"
            );
        }
        for cut in [0, 1, 10, body.len() / 2, body.len() - 1] {
            assert_eq!(
                ids.open(&format!("{PREFIX}{}", &body[..cut]), "key-1"),
                None
            );
        }
        for forged in [
            "",
            "resp_",
            "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
            "resp_!!!",
            body,
            &format!("{PREFIX}{}", "A".repeat(MAX_ID_LEN)),
        ] {
            assert_eq!(ids.open(forged, "key-1"), None, "{forged}");
        }
    }
}
