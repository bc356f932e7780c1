//! OpenID Connect sign-in for the console: discovery, authorization code
//! with PKCE (S256), `state` and `nonce`, the ID token's signature checked
//! against the issuer's JWKS, and the role read from one of its claims.

use super::session::{random_token, Role};
use crate::error::Error;
use aigw_shared::config::ConsoleOidc;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A sign-in started but not finished: the browser is at the issuer.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// Sign-ins in flight at most (each holds a verifier until it returns).
const MAX_PENDING: usize = 1_000;
/// How long discovery and keys are reused before being read again.
const CACHE_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

struct Pending {
    verifier: String,
    nonce: String,
    started: Instant,
}

pub struct Oidc {
    cfg: ConsoleOidc,
    http: reqwest::Client,
    discovery: Mutex<Option<(Discovery, Instant)>>,
    keys: Mutex<Option<(JwkSet, Instant)>>,
    pending: Mutex<HashMap<String, Pending>>,
}

fn fail(msg: impl std::fmt::Display) -> Error {
    Error::SignIn(format!("single sign-on: {msg}"))
}

/// PKCE S256: the challenge sent up front for the verifier sent with the code.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

impl Oidc {
    pub fn new(cfg: ConsoleOidc, http: reqwest::Client) -> Self {
        Self {
            cfg,
            http,
            discovery: Mutex::new(None),
            keys: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, Error> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| fail(format!("{url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(fail(format!("{url}: HTTP {}", resp.status())));
        }
        resp.json()
            .await
            .map_err(|e| fail(format!("{url}: unexpected answer: {e}")))
    }

    async fn discover(&self) -> Result<Discovery, Error> {
        if let Some((d, at)) = &*self.discovery.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < CACHE_TTL {
                return Ok(d.clone());
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let d: Discovery = self.get_json(&url).await?;
        // A document naming another issuer would let that issuer's tokens in.
        if d.issuer.trim_end_matches('/') != self.cfg.issuer.trim_end_matches('/') {
            return Err(fail(format!(
                "the discovery document names issuer `{}`, not the configured `{}`",
                d.issuer, self.cfg.issuer
            )));
        }
        for (name, u) in [
            ("authorization_endpoint", &d.authorization_endpoint),
            ("token_endpoint", &d.token_endpoint),
            ("jwks_uri", &d.jwks_uri),
        ] {
            aigw_shared::domain::check_endpoint(name, u).map_err(fail)?;
        }
        *self.discovery.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((d.clone(), Instant::now()));
        Ok(d)
    }

    /// The issuer's authorization URL for a new sign-in.
    pub async fn start(&self) -> Result<String, Error> {
        let d = self.discover().await?;
        let state = random_token();
        let nonce = random_token();
        let verifier = URL_SAFE_NO_PAD.encode(aigw_shared::crypto::new_data_key());
        let challenge = pkce_challenge(&verifier);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.retain(|_, p| p.started.elapsed() < PENDING_TTL);
            if pending.len() >= MAX_PENDING {
                return Err(fail("too many sign-ins in progress; try again shortly"));
            }
            pending.insert(
                state.clone(),
                Pending {
                    verifier,
                    nonce: nonce.clone(),
                    started: Instant::now(),
                },
            );
        }
        let mut url = url::Url::parse(&d.authorization_endpoint).map_err(fail)?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", &self.cfg.redirect_url)
            .append_pair("scope", &self.cfg.scopes.join(" "))
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url.to_string())
    }

    /// Finishes a sign-in: the identity and role of the ID token the code buys.
    pub async fn finish(&self, code: &str, state: &str) -> Result<(String, Role), Error> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(state)
            .filter(|p| p.started.elapsed() < PENDING_TTL)
            .ok_or_else(|| fail("unknown or expired sign-in (state); start again"))?;
        let d = self.discover().await?;
        // Built apart: the serializer is not `Send`, so it must not live across an await.
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "authorization_code")
                .append_pair("code", code)
                .append_pair("redirect_uri", &self.cfg.redirect_url)
                .append_pair("client_id", &self.cfg.client_id)
                .append_pair("code_verifier", &pending.verifier);
            if let Some(secret) = &self.cfg.client_secret {
                form.append_pair("client_secret", secret);
            }
            form.finish()
        };
        let resp = self
            .http
            .post(&d.token_endpoint)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| fail(format!("token endpoint: {e}")))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| fail(format!("token endpoint: unexpected answer: {e}")))?;
        if !status.is_success() {
            return Err(fail(format!(
                "token endpoint refused the code: {}",
                body.get("error").unwrap_or(&Value::Null)
            )));
        }
        let id_token = body
            .get("id_token")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("the token answer has no id_token"))?;
        let claims = self.verify(&d, id_token).await?;
        if !claims
            .get("nonce")
            .and_then(Value::as_str)
            .is_some_and(|n| super::session::same(n, &pending.nonce))
        {
            return Err(fail("the ID token's nonce does not match this sign-in"));
        }
        let role = role_of(&self.cfg, &claims).ok_or_else(|| {
            Error::Forbidden(format!(
                "your account has no console role: claim `{}` holds none of the configured values",
                self.cfg.role_claim
            ))
        })?;
        let who = claims
            .get(&self.cfg.identity_claim)
            .or_else(|| claims.get("sub"))
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        Ok((format!("oidc:{who}"), role))
    }

    /// The ID token's claims once its signature, issuer, audience and times check out.
    async fn verify(&self, d: &Discovery, token: &str) -> Result<Map<String, Value>, Error> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| fail(format!("ID token: {e}")))?;
        // Asymmetric algorithms only: an HMAC "signed" with public data proves nothing.
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
        ) {
            return Err(fail(format!(
                "ID token: algorithm {:?} refused",
                header.alg
            )));
        }
        let key = self.key(d, header.kid.as_deref()).await?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[d.issuer.as_str()]);
        v.set_audience(&[self.cfg.client_id.as_str()]);
        v.leeway = 60;
        jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v)
            .map(|t| t.claims)
            .map_err(|e| fail(format!("ID token: {e}")))
    }

    /// The issuer's key `kid`, reading the JWKS again when it is not known (rotation).
    async fn key(&self, d: &Discovery, kid: Option<&str>) -> Result<DecodingKey, Error> {
        let find = |set: &JwkSet| match kid {
            Some(kid) => set.find(kid).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let cached = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .and_then(|(set, _)| find(set));
        let jwk = match cached {
            Some(k) => k,
            None => {
                let set: JwkSet = self.get_json(&d.jwks_uri).await?;
                let k = find(&set);
                *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = Some((set, Instant::now()));
                k.ok_or_else(|| fail("ID token: no issuer key with its kid"))?
            }
        };
        DecodingKey::from_jwk(&jwk).map_err(|e| fail(format!("issuer key: {e}")))
    }
}

/// The role a token's claims give: admin wins over viewer; none without a match.
pub fn role_of(cfg: &ConsoleOidc, claims: &Map<String, Value>) -> Option<Role> {
    let values: Vec<&str> = match claims.get(&cfg.role_claim) {
        Some(Value::String(s)) => s.split(' ').collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let has = |wanted: &[String]| values.iter().any(|v| wanted.iter().any(|w| w == v));
    if has(&cfg.admin_values) {
        Some(Role::Admin)
    } else if has(&cfg.viewer_values) {
        Some(Role::Viewer)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pkce_challenge_is_base64url_sha256() {
        // Expected value computed apart (Python: urlsafe_b64encode(sha256(v)) without `=`).
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mJ0kzbhMUCC1mCLv_5A1XXq0a4oXwk"),
            "EE40WYNCbk6o6ebd7FRNoMSGAeU01Sy-8ZyYBkgpnvI"
        );
    }

    #[test]
    fn roles_come_from_the_claim() {
        let cfg: ConsoleOidc = serde_json::from_value(json!({
            "issuer": "https://login.example", "client_id": "c",
            "redirect_url": "https://gw.example/console/oidc/callback",
            "admin_values": ["gw.admin"], "viewer_values": ["gw.viewer"],
        }))
        .unwrap();
        let claims = |v: Value| json!({ "roles": v }).as_object().unwrap().clone();
        assert_eq!(
            role_of(&cfg, &claims(json!(["x", "gw.admin"]))),
            Some(Role::Admin)
        );
        assert_eq!(
            role_of(&cfg, &claims(json!("gw.viewer"))),
            Some(Role::Viewer)
        );
        assert_eq!(
            role_of(&cfg, &claims(json!(["gw.viewer", "gw.admin"]))),
            Some(Role::Admin)
        );
        assert_eq!(role_of(&cfg, &claims(json!(["other"]))), None);
        assert_eq!(role_of(&cfg, &Map::new()), None);
    }
}
