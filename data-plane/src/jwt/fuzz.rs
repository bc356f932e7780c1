//! Entry points for the `jwt` fuzz target (tests/fuzz): bearer tokens through
//! the same checks a call's goes through, against one provider trusting
//! [`ISSUER`] whose keys come from a JWKS document loaded as a fetch loads
//! it; and JWKS documents through the same parser a fetch uses.

use super::keys::parse_jwks;
use super::{verify, Identity, JwksRegistry, JwksSettings, JwtAuth, Refusal};
use aigw_shared::domain::{ApiKey, JwtProvider};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub const ISSUER: &str = "https://issuer.fuzz.test/v2.0";
pub const AUDIENCE: &str = "api://aigw";
/// Any token carrying this role is bound to an api key, so a token that
/// passed without a valid signature would come back `Ok`.
pub const ROLE: &str = "Aigw.Fuzz";
/// Nothing listens there: an unknown `kid` costs one refused fetch per run.
const JWKS_URI: &str = "http://127.0.0.1:9/jwks";

/// A provider, its bound api key and its key cache, on a runtime of its own.
pub struct Verifier {
    auth: JwtAuth,
    keys: JwksRegistry,
    rt: tokio::runtime::Runtime,
}

impl Verifier {
    /// `jwks`: the provider's JWKS document.
    pub fn new(jwks: &Value) -> Result<Self, String> {
        let provider: JwtProvider = serde_json::from_value(json!({
            "display_name": "fuzz", "issuer": ISSUER, "audiences": [AUDIENCE],
            "jwks_uri": JWKS_URI,
        }))
        .map_err(|e| e.to_string())?;
        let key: ApiKey = serde_json::from_value(json!({
            "jwt_provider_id": "jp", "jwt_claims": {"roles": ROLE}, "allowed_models": ["*"],
        }))
        .map_err(|e| e.to_string())?;
        let mut api_keys = BTreeMap::from([("ak".to_string(), key)]);
        let auth = JwtAuth::compile(
            &BTreeMap::from([("jp".to_string(), provider)]),
            &mut api_keys,
            &BTreeSet::new(),
            &Default::default(),
        )?;
        let keys = JwksRegistry::new(JwksSettings {
            refresh_every: Duration::from_secs(3600),
            retry_min: Duration::from_secs(3600),
            retry_max: Duration::from_secs(3600),
            unknown_kid_interval: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(1),
        });
        // Outside a runtime: the cache starts no background refresh.
        keys.retain(&auth);
        keys.get("jp")
            .ok_or("the provider has no key cache")?
            .install(jwks, JWKS_URI)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { auth, keys, rt })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        self.rt.block_on(verify(&self.auth, &self.keys, token))
    }
}

/// Parses `doc` as a fetched JWKS: how many usable keys it holds, or why
/// none.
pub fn jwks_keys(doc: &[u8]) -> Result<usize, String> {
    let v: Value = serde_json::from_slice(doc).map_err(|e| e.to_string())?;
    parse_jwks(&v, JWKS_URI).map(|k| k.len())
}
