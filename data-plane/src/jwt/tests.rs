//! Token verification and key caching against a local JWKS server with
//! test RSA and EC keys.

use super::*;
use crate::error::Error;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const AUD: &str = "api://aigw";
const OID: &str = "11111111-2222-3333-4444-555555555555";

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

struct TestKey {
    kid: String,
    pair: Pair,
}

impl TestKey {
    fn rsa(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: Pair::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).unwrap()),
        }
    }

    fn ec(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: Pair::Ec(
                EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
            ),
        }
    }

    fn alg(&self) -> &'static str {
        match self.pair {
            Pair::Rsa(_) => "RS256",
            Pair::Ec(_) => "ES256",
        }
    }

    fn jwk(&self) -> Value {
        match &self.pair {
            Pair::Rsa(k) => {
                let c = PublicKeyComponents::<Vec<u8>>::from(k.public_key());
                json!({"kty": "RSA", "use": "sig", "kid": self.kid, "n": b64(&c.n), "e": b64(&c.e)})
            }
            Pair::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid,
                       "x": b64(&p[1..33]), "y": b64(&p[33..65])})
            }
        }
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_with(
            &json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    fn sign_with(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let sig = match &self.pair {
            Pair::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                sig
            }
            Pair::Ec(k) => k.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
        };
        format!("{input}.{}", b64(&sig))
    }
}

/// A local OpenID issuer: discovery document and JWKS, with a fetch counter
/// and an outage switch.
struct Issuer {
    base: String,
    jwks: Arc<Mutex<Value>>,
    down: Arc<AtomicBool>,
    jwks_fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    async fn start(keys: &[&TestKey]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let jwks = Arc::new(Mutex::new(Value::Null));
        let down = Arc::new(AtomicBool::new(false));
        let jwks_fetches = Arc::new(AtomicUsize::new(0));
        let (j, d, f, b) = (
            jwks.clone(),
            down.clone(),
            jwks_fetches.clone(),
            base.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (j, d, f, b) = (j.clone(), d.clone(), f.clone(), b.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (status, body) = if d.load(Ordering::SeqCst) {
                            (503, json!({"error": "down"}))
                        } else {
                            match req.uri().path() {
                                "/.well-known/openid-configuration" => {
                                    (200, json!({"issuer": b, "jwks_uri": format!("{b}/keys")}))
                                }
                                "/keys" => {
                                    f.fetch_add(1, Ordering::SeqCst);
                                    (200, j.lock().unwrap().clone())
                                }
                                _ => (404, json!({})),
                            }
                        };
                        let mut resp =
                            hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let issuer = Self {
            base,
            jwks,
            down,
            jwks_fetches,
            task,
        };
        issuer.publish(keys);
        issuer
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.jwks.lock().unwrap() =
            json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    }

    fn fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }

    fn claims(&self) -> Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        json!({"iss": self.base, "aud": AUD, "oid": OID, "sub": "subject-1",
               "iat": now, "nbf": now - 5, "exp": now + 600})
    }
}

struct Setup {
    issuer: Issuer,
    auth: JwtAuth,
    registry: JwksRegistry,
}

fn settings() -> JwksSettings {
    JwksSettings {
        refresh_every: Duration::from_secs(3600),
        retry_min: Duration::from_secs(3600),
        retry_max: Duration::from_secs(3600),
        unknown_kid_interval: Duration::from_secs(3600),
        fetch_timeout: Duration::from_secs(5),
    }
}

/// One provider trusting the local issuer; api keys `ak-oid` (bound to
/// `OID`) and `ak-role` (any token with role `Aigw.Caller`).
async fn setup(keys: &[&TestKey]) -> Setup {
    let issuer = Issuer::start(keys).await;
    let providers = BTreeMap::from([(
        "jp1".to_string(),
        serde_json::from_value::<JwtProvider>(
            json!({"display_name": "local", "issuer": issuer.base, "audiences": [AUD, "other"],
                   "clock_skew": "30s"}),
        )
        .unwrap(),
    )]);
    let mut api_keys: BTreeMap<String, ApiKey> = BTreeMap::from([
        (
            "ak-oid".to_string(),
            serde_json::from_value(json!({"jwt_provider_id": "jp1", "jwt_subject": OID,
                                          "allowed_models": ["*"]}))
            .unwrap(),
        ),
        (
            "ak-role".to_string(),
            serde_json::from_value(json!({"jwt_provider_id": "jp1",
                                          "jwt_claims": {"roles": "Aigw.Caller"}}))
            .unwrap(),
        ),
        (
            "ak-plain".to_string(),
            serde_json::from_value(json!({"key_hash": "a".repeat(64)})).unwrap(),
        ),
    ]);
    let auth = JwtAuth::compile(
        &providers,
        &mut api_keys,
        &BTreeSet::new(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        api_keys.keys().collect::<Vec<_>>(),
        ["ak-plain"],
        "only key hashes stay behind"
    );
    let registry = JwksRegistry::new(settings());
    Setup {
        issuer,
        auth,
        registry,
    }
}

fn jwt_code(r: Result<Identity, Refusal>) -> String {
    match r.map_err(Error::from) {
        Err(Error::Jwt(e)) => e.code().to_string(),
        Err(Error::InvalidApiKey(m)) => format!("invalid_api_key: {m}"),
        Err(e) => format!("other: {e}"),
        Ok(i) => format!("ok: {}", i.caller.id),
    }
}

#[tokio::test]
async fn valid_rs256_and_es256_tokens_resolve_to_their_api_keys() {
    let (rsa, ec) = (TestKey::rsa("r1"), TestKey::ec("e1"));
    let s = setup(&[&rsa, &ec]).await;
    s.registry.retain(&s.auth);
    let id = verify(&s.auth, &s.registry, &rsa.sign(&s.issuer.claims()))
        .await
        .unwrap();
    assert_eq!(
        (id.caller.id.as_str(), id.caller_id.as_str()),
        ("ak-oid", OID)
    );
    assert_eq!(id.provider_id, "jp1");
    // Another identity with the role gets the claims-bound key.
    let mut c = s.issuer.claims();
    c["oid"] = json!("someone-else");
    c["roles"] = json!(["Reader", "Aigw.Caller"]);
    let id = verify(&s.auth, &s.registry, &ec.sign(&c)).await.unwrap();
    assert_eq!(
        (id.caller.id.as_str(), id.caller_id.as_str()),
        ("ak-role", "someone-else")
    );
    // A valid token of an identity no key binds looks like a bad key.
    c["roles"] = json!(["Reader"]);
    assert_eq!(
        jwt_code(verify(&s.auth, &s.registry, &ec.sign(&c)).await),
        "invalid_api_key: invalid API key or token"
    );
    assert_eq!(s.issuer.fetches(), 1, "one fetch served every token");
}

#[tokio::test]
async fn bad_tokens_get_their_codes() {
    let rsa = TestKey::rsa("r1");
    let s = setup(&[&rsa]).await;
    s.registry.retain(&s.auth);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let check = |claims: Value, want: &'static str| {
        let token = rsa.sign(&claims);
        let (auth, registry) = (&s.auth, &s.registry);
        async move {
            assert_eq!(
                jwt_code(verify(auth, registry, &token).await),
                want,
                "{claims}"
            );
        }
    };
    let mut c = s.issuer.claims();
    c["exp"] = json!(now - 31);
    check(c.clone(), "jwt_expired").await;
    // Within the provider's 30 s clock skew.
    c["exp"] = json!(now - 20);
    check(c, "ok: ak-oid").await;
    let mut c = s.issuer.claims();
    c["nbf"] = json!(now + 120);
    check(c, "jwt_not_yet_valid").await;
    let mut c = s.issuer.claims();
    c["aud"] = json!("api://someone-else");
    check(c.clone(), "jwt_wrong_audience").await;
    c["aud"] = json!(["api://x", "other"]);
    check(c.clone(), "ok: ak-oid").await;
    c.as_object_mut().unwrap().remove("aud");
    check(c, "jwt_wrong_audience").await;
    let mut c = s.issuer.claims();
    c["iss"] = json!("https://evil.example");
    check(c, "jwt_unknown_issuer").await;

    // Tampered payload: the signature no longer holds.
    let token = rsa.sign(&s.issuer.claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut c = s.issuer.claims();
    c["oid"] = json!("admin");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(c.to_string().as_bytes()),
        parts[2]
    );
    assert_eq!(
        jwt_code(verify(&s.auth, &s.registry, &forged).await),
        "jwt_invalid_signature"
    );
    // A key of another issuer under a known kid.
    let impostor = TestKey::rsa("r1");
    assert_eq!(
        jwt_code(verify(&s.auth, &s.registry, &impostor.sign(&s.issuer.claims())).await),
        "jwt_invalid_signature"
    );
    // alg none, and HS256 keyed with the issuer's public key.
    let claims = b64(s.issuer.claims().to_string().as_bytes());
    let none = format!("{}.{claims}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
    assert!(looks_like_jwt(&none));
    assert_eq!(
        jwt_code(verify(&s.auth, &s.registry, &none).await),
        "jwt_invalid_signature"
    );
    let header = b64(br#"{"alg":"HS256","typ":"JWT","kid":"r1"}"#);
    let input = format!("{header}.{claims}");
    let public = rsa.jwk().to_string();
    let mac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, public.as_bytes()),
        input.as_bytes(),
    );
    let hs = format!("{input}.{}", b64(mac.as_ref()));
    assert_eq!(
        jwt_code(verify(&s.auth, &s.registry, &hs).await),
        "jwt_invalid_signature"
    );
    // Not JWTs at all: API keys.
    for key in ["sk-123", "a.b", "x.y.z", "e30.e30.e30"] {
        assert!(!looks_like_jwt(key), "{key}");
    }
}

#[tokio::test]
async fn a_new_kid_is_fetched_once_and_unknown_kids_are_rate_limited() {
    let (old, new) = (TestKey::rsa("old"), TestKey::ec("new"));
    let s = setup(&[&old]).await;
    s.registry.retain(&s.auth);
    verify(&s.auth, &s.registry, &old.sign(&s.issuer.claims()))
        .await
        .unwrap();
    let cache = s.registry.get("jp1").unwrap();
    assert_eq!(s.issuer.fetches(), 1);
    // The issuer rotates: the first token with the new kid fetches again.
    s.issuer.publish(&[&old, &new]);
    let id = verify(&s.auth, &s.registry, &new.sign(&s.issuer.claims()))
        .await
        .unwrap();
    assert_eq!(id.caller.id, "ak-oid");
    assert_eq!((s.issuer.fetches(), cache.len()), (2, 2));
    // Another unknown kid within the interval does not fetch.
    let stranger = TestKey::rsa("stranger");
    assert_eq!(
        jwt_code(verify(&s.auth, &s.registry, &stranger.sign(&s.issuer.claims())).await),
        "jwt_invalid_signature"
    );
    assert_eq!(s.issuer.fetches(), 2);
    // The same provider in the next snapshot keeps its cache.
    s.registry.retain(&s.auth);
    assert!(Arc::ptr_eq(&cache, &s.registry.get("jp1").unwrap()));
    s.registry.retain(&JwtAuth::default());
    assert!(s.registry.is_empty());
}

#[tokio::test]
async fn an_outage_keeps_the_cached_keys() {
    let key = TestKey::ec("k1");
    let s = setup(&[&key]).await;
    s.registry.retain(&s.auth);
    let cache = s.registry.get("jp1").unwrap();
    assert_eq!(cache.refresh().await, Ok(1));
    s.issuer.down.store(true, Ordering::SeqCst);
    let err = cache.refresh().await.unwrap_err();
    assert!(err.contains("HTTP 503"), "{err}");
    assert_eq!(cache.len(), 1);
    verify(&s.auth, &s.registry, &key.sign(&s.issuer.claims()))
        .await
        .unwrap();
    // A JWKS without a usable key does not replace a good one either.
    s.issuer.down.store(false, Ordering::SeqCst);
    *s.issuer.jwks.lock().unwrap() = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
    assert!(cache
        .refresh()
        .await
        .unwrap_err()
        .contains("no RS256 or ES256"));
    assert_eq!(cache.len(), 1);
}

#[tokio::test]
async fn discovery_must_name_the_configured_issuer() {
    let key = TestKey::rsa("k1");
    let s = setup(&[&key]).await;
    let mut p: JwtProvider = serde_json::from_value(
        json!({"display_name": "x", "issuer": format!("{}/", s.issuer.base), "audiences": [AUD]}),
    )
    .unwrap();
    p.jwks_uri = None;
    let auth = JwtAuth::compile(
        &BTreeMap::from([("jp2".to_string(), p)]),
        &mut BTreeMap::new(),
        &BTreeSet::new(),
        &Default::default(),
    )
    .unwrap();
    let registry = JwksRegistry::new(settings());
    let provider = auth.providers().next().unwrap();
    let err = registry.cache(provider).refresh().await.unwrap_err();
    assert!(err.contains("names another issuer"), "{err}");
}

#[test]
fn claims_match_text_words_and_lists() {
    let c: Map<String, Value> = serde_json::from_value(json!({
        "scp": "chat.read chat.write", "roles": ["A", "B"], "tid": "t1", "n": 3, "ok": true
    }))
    .unwrap();
    assert!(claim_has(&c, "scp", "chat.write"));
    assert!(claim_has(&c, "roles", "B"));
    assert!(claim_has(&c, "tid", "t1"));
    assert!(claim_has(&c, "n", "3") && claim_has(&c, "ok", "true"));
    assert!(!claim_has(&c, "roles", "C"));
    assert!(!claim_has(&c, "missing", "x"));
}

#[test]
fn redirects_are_held_to_the_rules_of_the_configured_url() {
    use super::keys::redirect_allowed;
    let url = |u: &str| reqwest::Url::parse(u).unwrap();
    assert!(redirect_allowed(&url("https://login.example/keys"), 0).is_ok());
    assert!(redirect_allowed(&url("http://127.0.0.1:8080/keys"), 1).is_ok());
    // Plain http off loopback, user info, or a fourth hop: refused.
    for (to, hops) in [
        ("http://attacker.example/keys", 0),
        ("https://u:p@login.example/keys", 0),
        ("file:///etc/passwd", 0),
        ("https://login.example/keys", 3),
    ] {
        let err = redirect_allowed(&url(to), hops).unwrap_err();
        assert!(!err.is_empty(), "{to}");
    }
}
