//! Admin JSON inputs: any body, read as each admin resource and validated,
//! must never panic; and whatever validation accepts must be usable by a
//! data plane: durations fit a deadline, names fit a URL path segment,
//! secrets fit a header, and the value survives a JSON round trip unchanged.

#![no_main]

use aigw_shared::domain::{
    check_upstream, ApiKey, Credential, JwtProvider, Model, ProviderKey, MAX_CALL_TIMEOUT,
    MAX_COOLDOWN, MAX_RATE_LIMIT, MAX_STREAM_IDLE_TIMEOUT,
};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

fn roundtrips<T>(v: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(v).expect("a validated value serializes");
    let back: T = serde_json::from_str(&text).expect("a validated value reads back");
    assert_eq!(&back, v, "round trip changed the value: {text}");
}

fn check_model(m: &Model) {
    let now = Instant::now();
    if let Some(r) = &m.routing {
        for (d, max) in [
            (r.timeout, MAX_CALL_TIMEOUT),
            (r.stream_idle_timeout, MAX_STREAM_IDLE_TIMEOUT),
            (r.cooldown, MAX_COOLDOWN),
        ] {
            if let Some(d) = d {
                assert!(d.0 <= max);
                assert!(now.checked_add(d.0).is_some());
            }
        }
    }
    if let Some(ttl) = m.cache.and_then(|c| c.ttl_seconds) {
        assert!(now.checked_add(Duration::from_secs(ttl)).is_some());
    }
    if let Some(rl) = &m.rate_limit {
        for v in [rl.rpm, rl.tpm, rl.rpd, rl.tpd, rl.concurrency].into_iter().flatten() {
            assert!((1..=MAX_RATE_LIMIT).contains(&v));
            assert!(i64::try_from(v).is_ok());
        }
    }
    for t in m.resolved_targets() {
        let uri = format!(
            "https://h.example/openai/deployments/{}/chat/completions?api-version=1",
            t.model_name
        );
        let uri: http::Uri = uri.parse().expect("a valid deployment name makes a valid URL");
        assert_eq!(uri.path().split('/').count(), 6, "{uri}");
        assert_eq!(uri.query(), Some("api-version=1"));
    }
    roundtrips(m);
}

fn check_provider_key(pk: &ProviderKey) {
    let credential = Credential::parse(&pk.secret).expect("validated secrets parse");
    if let Credential::ApiKey { key } = &credential {
        http::HeaderValue::from_str(key).expect("a validated API key is a header value");
    }
    credential.check().expect("parse checks what check checks");
    let base = check_upstream(&pk.api_base, pk.allow_insecure_upstream)
        .expect("a validated api_base resolves");
    let uri = format!(
        "{base}/openai/deployments/d/chat/completions?api-version={}",
        pk.api_version
    );
    uri.parse::<http::Uri>()
        .expect("a validated api_base and api_version make a valid URL");
    roundtrips(pk);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<Model>(data) {
        if m.validate().is_ok() {
            check_model(&m);
        }
    }
    if let Ok(pk) = serde_json::from_slice::<ProviderKey>(data) {
        if pk.validate().is_ok() {
            check_provider_key(&pk);
        }
    }
    if let Ok(mut k) = serde_json::from_slice::<ApiKey>(data) {
        if k.validate().is_ok() {
            if let Some(rl) = &k.rate_limit {
                rl.validate("rate_limit").expect("validated twice the same");
            }
            roundtrips(&k);
        }
    }
    if let Ok(p) = serde_json::from_slice::<JwtProvider>(data) {
        let _ = p.validate();
    }
    // The secret as its own input too: any text, parsed and checked.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Credential::parse(text) {
            if let Credential::ApiKey { key } = c {
                http::HeaderValue::from_str(&key).expect("a checked API key is a header value");
            }
        }
    }
});
