//! Exact-match response cache for deterministic requests (`temperature: 0`,
//! `n` of 1), opt-in per model: in memory, size-bounded, TTL'd, per node.
//! Concurrent identical misses make one upstream call (moka coalesces the
//! insert). Cached answers are stored as JSON and replayed as SSE when the
//! caller asked for a stream.

mod replay;

pub use replay::sse_from_json;

use crate::openai::raw::{self, Field, RawObject};
use crate::openai::request::{self, STREAM, STREAM_OPTIONS};
use crate::openai::Shape;
use aigw_shared::domain::CacheConfig;
use bytes::Bytes;
use http::HeaderValue;
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
    /// The adapted JSON body, in the shape its caller got (OpenAI's: `model`
    /// already the alias).
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

/// sha256 of the alias and the canonical body: keys sorted at every level,
/// strings and numbers in one spelling, `stream`, `stream_options` and
/// `user` left out. Read off the raw text, without building a tree. The
/// answer's shape is part of the key: an entry holds the answer as its
/// caller got it (Azure's keeps the filter annotations, OpenAI's does not).
pub fn key(alias: &str, shape: Shape, body: &RawObject<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(alias.as_bytes());
    h.update([0]);
    if shape == Shape::Azure {
        h.update(b"azure\0");
    }
    let mut fields: Vec<(&str, &Field<'_>)> = body
        .fields()
        .filter(|(k, _)| !IGNORED_FIELDS.contains(k))
        .collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    h.update(b"{");
    for (k, v) in fields {
        canonical_str(k, &mut h);
        h.update(b":");
        match v {
            Field::Raw(text) => canonical(text, &mut h),
            Field::Json(text) => canonical(text, &mut h),
            Field::Str(text) => canonical_str(text, &mut h),
            Field::Objects(_) => h.update(format!("{v:?}").as_bytes()),
        }
        h.update(b",");
    }
    h.update(b"}");
    h.finalize().into()
}

/// Objects wider than this are hashed as sent (a possible miss, never a
/// wrong hit) rather than sorted: sorting keeps every key in memory.
const MAX_SORTED_FIELDS: usize = 1024;

fn canonical_str(s: &str, h: &mut Sha256) {
    h.update(serde_json::to_string(s).unwrap_or_default().as_bytes());
}

fn canonical(raw_text: &str, h: &mut Sha256) {
    match raw_text.as_bytes().first() {
        Some(b'{') => match RawObject::parse_text(raw_text, MAX_SORTED_FIELDS) {
            Ok(o) => {
                let mut fields: Vec<(&str, &Field<'_>)> = o.fields().collect();
                fields.sort_by(|a, b| a.0.cmp(b.0));
                h.update(b"{");
                for (k, v) in fields {
                    canonical_str(k, h);
                    h.update(b":");
                    canonical(v.raw().unwrap_or_default(), h);
                    h.update(b",");
                }
                h.update(b"}");
            }
            Err(_) => h.update(raw_text.as_bytes()),
        },
        Some(b'[') => {
            h.update(b"[");
            for item in raw::items(raw_text) {
                canonical(item, h);
                h.update(b",");
            }
            h.update(b"]");
        }
        Some(b'"') => match request::string(raw_text) {
            Some(s) => canonical_str(&s, h),
            None => h.update(raw_text.as_bytes()),
        },
        // `0` and `0.0` ask for the same thing.
        Some(b'-' | b'0'..=b'9') => match serde_json::from_str::<serde_json::Number>(raw_text) {
            Ok(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => h.update(i.to_string().as_bytes()),
                (_, Some(u), _) => h.update(u.to_string().as_bytes()),
                (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => {
                    h.update((f as i64).to_string().as_bytes())
                }
                _ => h.update(n.to_string().as_bytes()),
            },
            Err(_) => h.update(raw_text.as_bytes()),
        },
        _ => h.update(raw_text.as_bytes()),
    }
}

/// The request body for the upstream fetch of a cacheable call: never a
/// stream, so the answer can be stored whole.
pub fn json_body(body: &RawObject<'_>) -> Bytes {
    let mut b = body.clone();
    b.remove(STREAM);
    b.remove(STREAM_OPTIONS);
    Bytes::from(b.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The cache key of a JSON value's text.
    fn key_of(alias: &str, v: Value) -> [u8; 32] {
        let text = v.to_string();
        key(
            alias,
            Shape::OpenAi,
            &RawObject::parse(text.as_bytes()).unwrap(),
        )
    }

    #[test]
    fn key_ignores_order_stream_and_user() {
        let a = json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}], "stream": true, "user": "u1"});
        let b = json!({"messages": [{"content": "hi", "role": "user"}], "temperature": 0, "model": "m", "stream_options": {"include_usage": true}});
        assert_eq!(key_of("alias", a.clone()), key_of("alias", b));
        assert_ne!(key_of("alias", a.clone()), key_of("other", a.clone()));
        let f = json!({"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(
            key_of("alias", a.clone()),
            key_of("alias", f),
            "0 and 0.0 are the same temperature"
        );
        let c = json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi!"}]});
        assert_ne!(key_of("alias", a.clone()), key_of("alias", c));
        // Spacing and escapes do not matter either.
        let spaced = r#"{ "model" : "m", "temperature" : 0, "messages" : [ { "content" : "h\u0069", "role" : "user" } ] }"#;
        assert_eq!(
            key_of("alias", a),
            key(
                "alias",
                Shape::OpenAi,
                &RawObject::parse(spaced.as_bytes()).unwrap()
            )
        );
    }

    #[test]
    fn the_answer_shape_is_part_of_the_key() {
        let text = json!({"model": "m", "temperature": 0, "input": "x"}).to_string();
        let body = RawObject::parse(text.as_bytes()).unwrap();
        assert_ne!(
            key("alias", Shape::OpenAi, &body),
            key("alias", Shape::Azure, &body)
        );
    }

    #[test]
    fn the_fetch_body_is_never_a_stream() {
        let text =
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"x":[1, 2]}"#;
        let body = json_body(&RawObject::parse(text.as_bytes()).unwrap());
        assert_eq!(&body[..], br#"{"model":"m","x":[1, 2]}"#);
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
