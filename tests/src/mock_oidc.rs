//! A local OpenID Connect issuer for caller-JWT tests: its discovery document
//! (`/.well-known/openid-configuration`) and JWKS (`/keys`) over http on
//! loopback, with test RSA (RS256) and EC P-256 (ES256) keys generated in the
//! test, and helpers that sign tokens — well-formed or deliberately bad
//! (`alg: none`, HS256 keyed with the public key, tampered payloads).
//!
//! With [`MockOidc::enable_code_flow`] it is also an authorization server
//! for browser sign-in (the console's SSO): `/authorize` signs in whoever
//! [`MockOidc::login_as`] names and redirects back with a code and the
//! `state`; `/token` checks the PKCE verifier against the challenge and
//! answers with an ID token carrying the `nonce` and a `roles` claim.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// base64url without padding, as JWTs use it.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A signing key with its `kid`.
pub struct TestKey {
    kid: String,
    pair: Pair,
}

impl TestKey {
    /// A fresh RSA 2048 key (RS256).
    pub fn rsa(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: Pair::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation")),
        }
    }

    /// A fresh EC P-256 key (ES256).
    pub fn ec(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: Pair::Ec(
                EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                    .expect("EC key generation"),
            ),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> &'static str {
        match self.pair {
            Pair::Rsa(_) => "RS256",
            Pair::Ec(_) => "ES256",
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        match &self.pair {
            Pair::Rsa(k) => {
                let c = PublicKeyComponents::<Vec<u8>>::from(k.public_key());
                json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                       "n": b64(&c.n), "e": b64(&c.e)})
            }
            Pair::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "use": "sig", "crv": "P-256", "kid": self.kid,
                       "x": b64(&p[1..33]), "y": b64(&p[33..65])})
            }
        }
    }

    /// A token with the usual header (`alg`, `typ`, `kid`).
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with(
            &json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    /// A token with any header, signed with this key's algorithm.
    pub fn sign_with(&self, header: &Value, claims: &Value) -> String {
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
                .expect("RSA signing");
                sig
            }
            Pair::Ec(k) => k
                .sign(&rng, input.as_bytes())
                .expect("EC signing")
                .as_ref()
                .to_vec(),
        };
        format!("{input}.{}", b64(&sig))
    }

    /// The algorithm-confusion attack: HS256 "signed" with this key's public
    /// JWK text as the HMAC secret, under this key's `kid`.
    pub fn hs256_with_public_key(&self, claims: &Value) -> String {
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            self.jwk().to_string().as_bytes(),
        );
        let mac = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", b64(mac.as_ref()))
    }
}

/// An unsigned token: `alg: none` and an empty signature.
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

/// `token` with its payload replaced by `claims`, the signature kept.
pub fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts.get(2).copied().unwrap_or_default()
    )
}

/// A code handed out by `/authorize`, waiting for `/token`.
struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: String,
    subject: String,
    roles: Vec<String>,
}

/// The code flow's state: the signing key, the client, who signs in next.
struct CodeFlow {
    key: TestKey,
    client_id: String,
    user: Mutex<(String, Vec<String>)>,
    grants: Mutex<std::collections::HashMap<String, Grant>>,
    /// `/token` answers refused for a PKCE verifier that does not match.
    pkce_refusals: AtomicUsize,
}

struct Shared {
    code_flow: Mutex<Option<Arc<CodeFlow>>>,
    issuer: String,
    jwks: Mutex<Value>,
    down: AtomicBool,
    discovery_requests: AtomicUsize,
    jwks_requests: AtomicUsize,
}

/// The issuer: `http://127.0.0.1:PORT` is both its address and its `iss`.
pub struct MockOidc {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for MockOidc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockOidc {
    /// Binds `127.0.0.1:0` and serves `keys` as its JWKS.
    pub async fn start(keys: &[&TestKey]) -> MockOidc {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock oidc: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock oidc: local addr");
        let shared = Arc::new(Shared {
            code_flow: Mutex::new(None),
            issuer: format!("http://{addr}"),
            jwks: Mutex::new(json!({"keys": []})),
            down: AtomicBool::new(false),
            discovery_requests: AtomicUsize::new(0),
            jwks_requests: AtomicUsize::new(0),
        });
        let server = shared.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set, so aborting this task closes them all.
            let mut connections = JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = server.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move {
                            let (status, body, location) = route(&shared, req).await;
                            let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(status).expect("status code");
                            resp.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static("application/json"),
                            );
                            if let Some(l) = location {
                                resp.headers_mut().insert(
                                    hyper::header::LOCATION,
                                    hyper::header::HeaderValue::from_str(&l).expect("location"),
                                );
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let oidc = MockOidc { shared, task };
        oidc.publish(keys);
        oidc
    }

    /// The `iss` of its tokens (and its base URL).
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/keys", self.shared.issuer)
    }

    /// Replaces the JWKS (key rotation).
    pub fn publish(&self, keys: &[&TestKey]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
        *self.shared.jwks.lock().unwrap_or_else(|e| e.into_inner()) = json!({ "keys": keys });
    }

    /// Serves `/authorize` and `/token` for `client_id`, signing ID tokens
    /// with `key` (also published in the JWKS).
    pub fn enable_code_flow(&self, key: TestKey, client_id: &str) {
        self.publish(&[&key]);
        *self
            .shared
            .code_flow
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(CodeFlow {
            key,
            client_id: client_id.into(),
            user: Mutex::new(("nobody".into(), Vec::new())),
            grants: Mutex::new(Default::default()),
            pkce_refusals: AtomicUsize::new(0),
        }));
    }

    /// Who the next `/authorize` signs in: `preferred_username` and `roles`.
    pub fn login_as(&self, subject: &str, roles: &[&str]) {
        let flow = self.code_flow();
        *flow.user.lock().unwrap_or_else(|e| e.into_inner()) = (
            subject.into(),
            roles.iter().map(|r| r.to_string()).collect(),
        );
    }

    /// `/token` requests refused for a wrong PKCE verifier.
    pub fn pkce_refusals(&self) -> usize {
        self.code_flow().pkce_refusals.load(Ordering::SeqCst)
    }

    fn code_flow(&self) -> Arc<CodeFlow> {
        self.shared
            .code_flow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .expect("enable_code_flow first")
    }

    /// While down, every request gets a 503.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Requests for the JWKS so far (answered or not).
    pub fn jwks_requests(&self) -> usize {
        self.shared.jwks_requests.load(Ordering::SeqCst)
    }

    /// Requests for the discovery document so far (answered or not).
    pub fn discovery_requests(&self) -> usize {
        self.shared.discovery_requests.load(Ordering::SeqCst)
    }

    /// Claims of a token valid for ten minutes, for `aud` and caller `oid`.
    pub fn claims(&self, aud: &str, oid: &str) -> Value {
        let now = now();
        json!({
            "iss": self.shared.issuer,
            "aud": aud,
            "oid": oid,
            "sub": format!("sub-{oid}"),
            "tid": "00000000-0000-0000-0000-0000000000aa",
            "iat": now,
            "nbf": now - 5,
            "exp": now + 600,
        })
    }
}

/// Answers one request: the code flow's endpoints, or discovery and keys.
async fn route(
    shared: &Shared,
    req: hyper::Request<hyper::body::Incoming>,
) -> (u16, String, Option<String>) {
    use http_body_util::BodyExt;
    let flow = shared
        .code_flow
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let path = req.uri().path().to_string();
    let query: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    match (path.as_str(), flow) {
        ("/authorize", Some(flow)) => {
            let q = |k: &str| query.get(k).cloned().unwrap_or_default();
            if q("response_type") != "code"
                || q("client_id") != flow.client_id
                || q("code_challenge_method") != "S256"
                || q("code_challenge").is_empty()
                || q("state").is_empty()
            {
                return (400, json!({"error": "invalid_request"}).to_string(), None);
            }
            let code = format!("code-{}", rand_hex());
            let (subject, roles) = flow.user.lock().unwrap_or_else(|e| e.into_inner()).clone();
            flow.grants
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    code.clone(),
                    Grant {
                        client_id: q("client_id"),
                        redirect_uri: q("redirect_uri"),
                        challenge: q("code_challenge"),
                        nonce: q("nonce"),
                        subject,
                        roles,
                    },
                );
            let mut back = url::Url::parse(&q("redirect_uri")).expect("redirect_uri");
            back.query_pairs_mut()
                .append_pair("code", &code)
                .append_pair("state", &q("state"));
            (302, String::new(), Some(back.to_string()))
        }
        ("/token", Some(flow)) => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let form: std::collections::HashMap<String, String> =
                url::form_urlencoded::parse(&body).into_owned().collect();
            let f = |k: &str| form.get(k).cloned().unwrap_or_default();
            let grant = flow
                .grants
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&f("code"));
            let Some(grant) = grant else {
                return (400, json!({"error": "invalid_grant"}).to_string(), None);
            };
            use sha2::Digest;
            let computed = b64(&sha2::Sha256::digest(f("code_verifier").as_bytes()));
            if computed != grant.challenge {
                flow.pkce_refusals.fetch_add(1, Ordering::SeqCst);
                return (
                    400,
                    json!({"error": "invalid_grant", "error_description": "PKCE"}).to_string(),
                    None,
                );
            }
            if f("grant_type") != "authorization_code"
                || f("client_id") != grant.client_id
                || f("redirect_uri") != grant.redirect_uri
            {
                return (400, json!({"error": "invalid_request"}).to_string(), None);
            }
            let now = now();
            let id_token = flow.key.sign(&json!({
                "iss": shared.issuer,
                "aud": grant.client_id,
                "sub": format!("sub-{}", grant.subject),
                "preferred_username": grant.subject,
                "roles": grant.roles,
                "nonce": grant.nonce,
                "iat": now,
                "exp": now + 600,
            }));
            (
                200,
                json!({"access_token": "opaque", "token_type": "Bearer", "expires_in": 600, "id_token": id_token}).to_string(),
                None,
            )
        }
        _ => {
            let (status, body) = answer(shared, &path);
            (status, body, None)
        }
    }
}

fn rand_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn answer(shared: &Shared, path: &str) -> (u16, String) {
    let counter = match path {
        "/.well-known/openid-configuration" => Some(&shared.discovery_requests),
        "/keys" => Some(&shared.jwks_requests),
        _ => None,
    };
    if let Some(c) = counter {
        c.fetch_add(1, Ordering::SeqCst);
    }
    if shared.down.load(Ordering::SeqCst) {
        return (503, json!({"error": "temporarily_unavailable"}).to_string());
    }
    match path {
        "/.well-known/openid-configuration" => (
            200,
            json!({
                "issuer": shared.issuer,
                "jwks_uri": format!("{}/keys", shared.issuer),
                "authorization_endpoint": format!("{}/authorize", shared.issuer),
                "token_endpoint": format!("{}/token", shared.issuer),
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            })
            .to_string(),
        ),
        "/keys" => (
            200,
            shared
                .jwks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .to_string(),
        ),
        _ => (404, json!({"error": "not_found"}).to_string()),
    }
}
