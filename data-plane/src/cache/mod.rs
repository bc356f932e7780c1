//! Exact-match response cache for deterministic requests (`temperature: 0`,
//! `n` of 1), opt-in per model: in memory, size-bounded, TTL'd, per node.
//! Concurrent identical misses make one upstream call (moka coalesces the
//! insert). Cached answers are stored as JSON and replayed as SSE when the
//! caller asked for a stream.

mod replay;

pub use replay::sse_from_json;

use crate::openai::request::{STREAM, STREAM_OPTIONS};
use aigw_shared::domain::CacheConfig;
use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_MAX_ENTRIES: u64 = 10_000;
/// Fields that do not change the answer.
const IGNORED_FIELDS: [&str; 3] = [STREAM, STREAM_OPTIONS, "user"];

/// A cached upstream answer.
#[derive(Debug)]
pub struct Answer {
    /// The adapted JSON body, `model` already the alias.
    pub body: Bytes,
    pub served_by: HeaderValue,
}

pub type Store = moka::future::Cache<[u8; 32], Arc<Answer>>;

/// One cache per model alias, kept across snapshots while its settings and
/// purge generation stay the same.
#[derive(Default)]
pub struct ResponseCaches {
    caches: Mutex<HashMap<String, (CacheConfig, u64, Store)>>,
}

impl ResponseCaches {
    /// The cache for `alias`, if caching is enabled for it.
    pub fn get(&self, alias: &str, cfg: Option<&CacheConfig>, generation: u64) -> Option<Store> {
        let cfg = cfg.filter(|c| c.enabled)?;
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        match caches.get(alias) {
            Some((c, g, store)) if c == cfg && *g == generation => Some(store.clone()),
            _ => {
                let store = build(cfg);
                caches.insert(alias.to_string(), (*cfg, generation, store.clone()));
                Some(store)
            }
        }
    }

    /// Drops caches of aliases that no longer exist or cache.
    pub fn retain(&self, keep: &dyn Fn(&str) -> bool) {
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        caches.retain(|alias, _| keep(alias));
    }
}

fn build(cfg: &CacheConfig) -> Store {
    let ttl = cfg.ttl_seconds.map_or(DEFAULT_TTL, Duration::from_secs);
    let builder = moka::future::Cache::builder().time_to_live(ttl);
    match (cfg.max_bytes, cfg.max_entries) {
        (Some(bytes), _) => builder
            .weigher(|_k, v: &Arc<Answer>| u32::try_from(v.body.len()).unwrap_or(u32::MAX))
            .max_capacity(bytes)
            .build(),
        (None, entries) => builder
            .max_capacity(entries.unwrap_or(DEFAULT_MAX_ENTRIES))
            .build(),
    }
}

/// Whether a request body is deterministic enough to cache: `temperature`
/// exactly 0 and `n` absent or 1.
pub fn cacheable(body: &Map<String, Value>) -> bool {
    crate::openai::request::deterministic(body)
}

/// sha256 of the alias and the canonical body: keys sorted at every level,
/// `stream`, `stream_options` and `user` left out.
pub fn key(alias: &str, body: &Map<String, Value>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(alias.as_bytes());
    h.update([0]);
    let mut keys: Vec<&String> = body
        .keys()
        .filter(|k| !IGNORED_FIELDS.contains(&k.as_str()))
        .collect();
    keys.sort();
    h.update(b"{");
    for k in keys {
        canonical(&Value::String(k.clone()), &mut h);
        h.update(b":");
        canonical(&body[k], &mut h);
        h.update(b",");
    }
    h.update(b"}");
    h.finalize().into()
}

fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            h.update(b"{");
            for k in keys {
                canonical(&Value::String(k.clone()), h);
                h.update(b":");
                canonical(&o[k], h);
                h.update(b",");
            }
            h.update(b"}");
        }
        Value::Array(a) => {
            h.update(b"[");
            for x in a {
                canonical(x, h);
                h.update(b",");
            }
            h.update(b"]");
        }
        // `0` and `0.0` ask for the same thing.
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => h.update(i.to_string().as_bytes()),
            (_, Some(u), _) => h.update(u.to_string().as_bytes()),
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => {
                h.update((f as i64).to_string().as_bytes())
            }
            _ => h.update(n.to_string().as_bytes()),
        },
        other => h.update(other.to_string().as_bytes()),
    }
}

/// The request body for the upstream fetch of a cacheable call: never a
/// stream, so the answer can be stored whole.
pub fn json_body(body: &Map<String, Value>) -> Bytes {
    let mut b = body.clone();
    b.remove(STREAM);
    b.remove(STREAM_OPTIONS);
    Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn key_ignores_order_stream_and_user() {
        let a = obj(
            json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}], "stream": true, "user": "u1"}),
        );
        let b = obj(
            json!({"messages": [{"content": "hi", "role": "user"}], "temperature": 0, "model": "m", "stream_options": {"include_usage": true}}),
        );
        assert_eq!(key("alias", &a), key("alias", &b));
        assert_ne!(key("alias", &a), key("other", &a));
        let f = obj(
            json!({"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(
            key("alias", &a),
            key("alias", &f),
            "0 and 0.0 are the same temperature"
        );
        let c = obj(
            json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi!"}]}),
        );
        assert_ne!(key("alias", &a), key("alias", &c));
    }

    #[test]
    fn only_deterministic_requests_are_cacheable() {
        assert!(cacheable(&obj(json!({"temperature": 0}))));
        assert!(cacheable(&obj(json!({"temperature": 0.0, "n": 1}))));
        assert!(!cacheable(&obj(json!({"temperature": 0.7}))));
        assert!(
            !cacheable(&obj(json!({}))),
            "the default temperature is not 0"
        );
        assert!(!cacheable(&obj(json!({"temperature": 0, "n": 2}))));
    }

    #[tokio::test]
    async fn registry_keeps_a_cache_until_settings_or_generation_change() {
        let r = ResponseCaches::default();
        let cfg = CacheConfig {
            enabled: true,
            ttl_seconds: Some(60),
            max_entries: Some(10),
            max_bytes: None,
        };
        assert!(r.get("a", None, 0).is_none());
        assert!(r
            .get(
                "a",
                Some(&CacheConfig {
                    enabled: false,
                    ..cfg
                }),
                0
            )
            .is_none());
        let s1 = r.get("a", Some(&cfg), 0).unwrap();
        s1.insert(
            [1; 32],
            Arc::new(Answer {
                body: Bytes::from_static(b"{}"),
                served_by: HeaderValue::from_static("x"),
            }),
        )
        .await;
        assert!(r
            .get("a", Some(&cfg), 0)
            .unwrap()
            .get(&[1; 32])
            .await
            .is_some());
        assert!(
            r.get("a", Some(&cfg), 1)
                .unwrap()
                .get(&[1; 32])
                .await
                .is_none(),
            "a purge starts empty"
        );
    }
}
