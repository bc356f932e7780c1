//! One issuer's signing keys, and the registry that keeps them across
//! snapshots.
//!
//! Readers take the current key set lock-free (an `Arc` swap under a short
//! lock); fetches are single-flight under an async mutex. A background task
//! refreshes the set every `refresh_every` (retrying with backoff after a
//! failure); a token whose `kid` is unknown triggers one more fetch, at most
//! once per `unknown_kid_interval`. A failed fetch never drops keys that were
//! good before: an outage of the JWKS endpoint keeps callers working.

use super::{JwksSource, JwtAuth, Provider};
use crate::http_client::error_chain;
use aigw_shared::domain::check_endpoint;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

/// Largest discovery document or JWKS we read.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// Timings of the key caches.
#[derive(Debug, Clone, Copy)]
pub struct JwksSettings {
    /// Background refresh of a good key set.
    pub refresh_every: Duration,
    /// Backoff after a failed background fetch: from `retry_min`, doubling, up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// At most one fetch per this long because of an unknown `kid`.
    pub unknown_kid_interval: Duration,
    /// Whole-request deadline of one HTTP fetch.
    pub fetch_timeout: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        Self {
            refresh_every: Duration::from_secs(10 * 60),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(5 * 60),
            unknown_kid_interval: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
}

impl Family {
    fn of(alg: Algorithm) -> Option<Self> {
        match alg {
            Algorithm::RS256 => Some(Self::Rsa),
            Algorithm::ES256 => Some(Self::Ec),
            _ => None,
        }
    }
}

/// One verification key from a JWKS.
pub struct SigningKey {
    kid: Option<String>,
    family: Family,
    pub(super) key: DecodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct KeySet {
    /// Successful fetches so far; 0 = never loaded.
    generation: u64,
    keys: Vec<Arc<SigningKey>>,
}

impl KeySet {
    /// Keys for a token with this `kid` (any key, without one) and `alg`.
    fn matching(&self, kid: Option<&str>, alg: Algorithm) -> Vec<Arc<SigningKey>> {
        let Some(family) = Family::of(alg) else {
            return Vec::new();
        };
        self.keys
            .iter()
            .filter(|k| k.family == family && (kid.is_none() || k.kid.as_deref() == kid))
            .cloned()
            .collect()
    }
}

#[derive(Debug, Default)]
struct FetchState {
    last_unknown_kid_fetch: Option<Instant>,
}

/// One provider's signing keys.
pub struct JwksCache {
    provider_id: String,
    fingerprint: [u8; 32],
    source: JwksSource,
    http: reqwest::Client,
    settings: JwksSettings,
    keys: RwLock<Arc<KeySet>>,
    /// Held by whoever fetches: one fetch at a time.
    fetch: Arc<tokio::sync::Mutex<FetchState>>,
    fetches: std::sync::atomic::AtomicU64,
    _stop: Option<DropGuard>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("provider_id", &self.provider_id)
            .field("source", &self.source)
            .field("generation", &self.current().generation)
            .finish_non_exhaustive()
    }
}

impl JwksCache {
    /// A cache for `provider`. With `background` (and inside a tokio
    /// runtime) a task fetches at once and keeps the keys fresh until the
    /// cache is dropped; without, keys are fetched when a token needs them.
    fn new(
        provider: &Provider,
        http: reqwest::Client,
        settings: JwksSettings,
        background: bool,
    ) -> Arc<Self> {
        let stop = CancellationToken::new();
        let spawn = background && tokio::runtime::Handle::try_current().is_ok();
        let cache = Arc::new(Self {
            provider_id: provider.id.clone(),
            fingerprint: provider.fingerprint,
            source: provider.source.clone(),
            http,
            settings,
            keys: RwLock::new(Arc::default()),
            fetch: Arc::new(tokio::sync::Mutex::new(FetchState::default())),
            fetches: Default::default(),
            _stop: spawn.then(|| stop.clone().drop_guard()),
        });
        if spawn {
            // The task makes the first fetch under the lock taken here, so
            // tokens arriving before it is done wait for it rather than
            // fetching too.
            if let Ok(first) = cache.fetch.clone().try_lock_owned() {
                tokio::spawn(refresh_loop(Arc::downgrade(&cache), stop, first));
            }
        }
        cache
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetch attempts so far (for tests and logs).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Number of usable keys held now.
    pub fn len(&self) -> usize {
        self.current().keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The keys that may have signed a token with `kid` and `alg`. An unknown
    /// `kid` (or no keys yet) waits for a fetch in flight, else fetches once
    /// more if the last such fetch is at least `unknown_kid_interval` ago.
    pub async fn keys_for(&self, kid: Option<&str>, alg: Algorithm) -> Vec<Arc<SigningKey>> {
        let seen = self.current();
        let found = seen.matching(kid, alg);
        if !found.is_empty() {
            return found;
        }
        let mut state = self.fetch.lock().await;
        let now = self.current();
        if now.generation != seen.generation {
            let found = now.matching(kid, alg);
            if !found.is_empty() {
                return found;
            }
        }
        let at = Instant::now();
        if state
            .last_unknown_kid_fetch
            .is_some_and(|t| at.duration_since(t) < self.settings.unknown_kid_interval)
        {
            debug!(provider = %self.provider_id, kid, "unknown kid: a fetch was made recently");
            return Vec::new();
        }
        state.last_unknown_kid_fetch = Some(at);
        if let Err(e) = self.fetch_locked().await {
            warn!(provider = %self.provider_id, kid, error = %e, "fetching the JWKS for an unknown kid failed; keeping the cached keys");
        }
        self.current().matching(kid, alg)
    }

    /// One fetch now (single flight with any other).
    pub async fn refresh(&self) -> Result<usize, String> {
        let _state = self.fetch.lock().await;
        self.fetch_locked().await
    }

    /// Fetches and, if the set holds at least one usable key, swaps it in.
    /// The caller holds `self.fetch`.
    async fn fetch_locked(&self) -> Result<usize, String> {
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let jwks_url = match &self.source {
            JwksSource::Uri(u) => u.clone(),
            JwksSource::Discovery { url, issuer } => {
                let doc = self.get_json(url).await?;
                if doc.get("issuer").and_then(Value::as_str) != Some(issuer.as_str()) {
                    return Err(format!(
                        "the discovery document at {url} names another issuer than `{issuer}`"
                    ));
                }
                let uri = doc
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("the discovery document at {url} has no jwks_uri"))?;
                check_endpoint("jwks_uri", uri)
                    .map_err(|e| format!("discovery document at {url}: {e}"))?;
                uri.to_string()
            }
        };
        let jwks = self.get_json(&jwks_url).await?;
        self.install(&jwks, &jwks_url)
    }

    /// Swaps in the usable keys of the JWKS `jwks` (fetched from `jwks_url`)
    /// if there is at least one.
    pub(super) fn install(&self, jwks: &Value, jwks_url: &str) -> Result<usize, String> {
        let keys = parse_jwks(jwks, jwks_url)?;
        let n = keys.len();
        let mut slot = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let generation = slot.generation.saturating_add(1);
        *slot = Arc::new(KeySet { generation, keys });
        drop(slot);
        info!(provider = %self.provider_id, keys = n, generation, "JWKS loaded");
        Ok(n)
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let work = async {
            let mut resp = self
                .http
                .get(url)
                .header("accept", "application/json")
                .send()
                .await
                .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
            if !resp.status().is_success() {
                return Err(format!("GET {url}: HTTP {}", resp.status().as_u16()));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?
            {
                if body.len() + chunk.len() > MAX_DOCUMENT {
                    return Err(format!("GET {url}: larger than {MAX_DOCUMENT} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            serde_json::from_slice::<Value>(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
        };
        tokio::time::timeout(self.settings.fetch_timeout, work)
            .await
            .map_err(|_| {
                format!(
                    "GET {url}: no answer within {:?}",
                    self.settings.fetch_timeout
                )
            })?
    }
}

/// The usable keys of a JWKS document (fetched from `jwks_url`); an error
/// when it holds none.
pub(super) fn parse_jwks(jwks: &Value, jwks_url: &str) -> Result<Vec<Arc<SigningKey>>, String> {
    let entries = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{jwks_url} is not a JWKS (no `keys` array)"))?;
    let keys: Vec<Arc<SigningKey>> = entries.iter().filter_map(parse_jwk).map(Arc::new).collect();
    if keys.is_empty() {
        return Err(format!("{jwks_url} holds no RS256 or ES256 signing key"));
    }
    Ok(keys)
}

/// A JWK we can verify RS256 or ES256 with; anything else (encryption keys,
/// other curves or algorithms, symmetric keys) is skipped.
fn parse_jwk(v: &Value) -> Option<SigningKey> {
    let text = |name: &str| v.get(name).and_then(Value::as_str);
    if text("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let (family, key) = match text("kty")? {
        "RSA" => (
            Family::Rsa,
            DecodingKey::from_rsa_components(text("n")?, text("e")?).ok()?,
        ),
        "EC" if text("crv")? == "P-256" => (
            Family::Ec,
            DecodingKey::from_ec_components(text("x")?, text("y")?).ok()?,
        ),
        _ => return None,
    };
    match (text("alg"), family) {
        (None, _) | (Some("RS256"), Family::Rsa) | (Some("ES256"), Family::Ec) => {}
        _ => return None,
    }
    Some(SigningKey {
        kid: text("kid").map(str::to_string),
        family,
        key,
    })
}

async fn refresh_loop(
    cache: std::sync::Weak<JwksCache>,
    stop: CancellationToken,
    first: tokio::sync::OwnedMutexGuard<FetchState>,
) {
    let mut failures = 0u32;
    let mut first = Some(first);
    loop {
        let delay = {
            let Some(cache) = cache.upgrade() else { return };
            let result = match first.take() {
                Some(guard) => {
                    let r = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = cache.fetch_locked() => r,
                    };
                    drop(guard);
                    r
                }
                None => tokio::select! {
                    _ = stop.cancelled() => return,
                    r = cache.refresh() => r,
                },
            };
            match result {
                Ok(_) => {
                    failures = 0;
                    cache.settings.refresh_every
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let backoff = cache
                        .settings
                        .retry_min
                        .saturating_mul(1 << (failures - 1).min(16))
                        .min(cache.settings.retry_max);
                    warn!(
                        provider = %cache.provider_id,
                        error = %e,
                        cached_keys = cache.len(),
                        retry_in = ?backoff,
                        "fetching the JWKS failed; keeping the cached keys"
                    );
                    backoff
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Key caches by provider id, shared by successive snapshots.
pub struct JwksRegistry {
    caches: Mutex<HashMap<String, Arc<JwksCache>>>,
    http: reqwest::Client,
    settings: JwksSettings,
}

impl std::fmt::Debug for JwksRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksRegistry")
            .field("caches", &self.caches().len())
            .finish_non_exhaustive()
    }
}

/// Most redirects a JWKS or discovery fetch follows.
const MAX_REDIRECTS: usize = 3;

/// A redirect is followed only to where the configured URL could have
/// pointed: https (http on loopback), no user info, and only a few hops.
pub(super) fn redirect_allowed(to: &reqwest::Url, hops_so_far: usize) -> Result<(), String> {
    if hops_so_far >= MAX_REDIRECTS {
        return Err(format!("more than {MAX_REDIRECTS} redirects"));
    }
    check_endpoint("redirect", to.as_str())
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Default for JwksRegistry {
    fn default() -> Self {
        Self::new(JwksSettings::default())
    }
}

impl JwksRegistry {
    pub fn new(settings: JwksSettings) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.fetch_timeout)
            .read_timeout(settings.fetch_timeout)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                match redirect_allowed(attempt.url(), attempt.previous().len()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            }))
            .build()
            .unwrap_or_else(|e| {
                warn!(error = %e, "cannot build the JWKS HTTP client with its settings; using defaults");
                reqwest::Client::new()
            });
        Self {
            caches: Mutex::new(HashMap::new()),
            http,
            settings,
        }
    }

    fn caches(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JwksCache>>> {
        self.caches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registered cache of `provider` if its key source is unchanged;
    /// else (a call on a snapshot being replaced) an unregistered one that
    /// fetches on demand.
    pub fn cache(&self, provider: &Provider) -> Arc<JwksCache> {
        if let Some(c) = self.caches().get(&provider.id) {
            if c.fingerprint == provider.fingerprint {
                return c.clone();
            }
        }
        JwksCache::new(provider, self.http.clone(), self.settings, false)
    }

    /// Makes the providers of an applied snapshot the registered set: new or
    /// changed ones get a cache that starts fetching now, removed ones are
    /// dropped (their refresh task stops).
    pub fn retain(&self, auth: &JwtAuth) {
        let mut caches = self.caches();
        let mut next = HashMap::with_capacity(auth.by_issuer.len());
        for p in auth.providers() {
            let cache = match caches.remove(&p.id) {
                Some(c) if c.fingerprint == p.fingerprint => c,
                _ => JwksCache::new(p, self.http.clone(), self.settings, true),
            };
            next.insert(p.id.clone(), cache);
        }
        let old = std::mem::replace(&mut *caches, next);
        drop(caches);
        drop(old);
    }

    pub fn get(&self, provider_id: &str) -> Option<Arc<JwksCache>> {
        self.caches().get(provider_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.caches().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
