use crate::credentials::{CredentialRegistry, TokenProvider};
use crate::limits::{Limiter, Scope};
use crate::routing::{HealthRegistry, TargetHealth};
use aigw_shared::domain::{resolve_api_base, Credential, RateLimit, RoutingStrategy};
use aigw_shared::snapshot::{ConfigSnapshot, SNAPSHOT_FORMAT};
use http::{HeaderValue, Uri};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

/// Default deadline for a whole call when the model sets none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Default longest silence inside a stream.
const DEFAULT_STREAM_IDLE: Duration = Duration::from_secs(120);
/// Default retries to other targets after the first attempt.
const DEFAULT_RETRIES: u32 = 2;
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// Default time a 429'd target rests (without a hint) and a circuit stays open.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5);

/// A compiled snapshot: hash tables for the hot path, URLs and headers prebuilt.
#[derive(Debug)]
pub struct Runtime {
    pub version: u64,
    callers: HashMap<[u8; 32], Arc<Caller>>,
    routes: HashMap<String, Arc<Route>>,
    aliases: Vec<String>,
    /// Entra ID token caches of the provider keys this snapshot routes to.
    token_providers: HashMap<String, Arc<TokenProvider>>,
    /// Trusted JWT issuers and the api keys bound to JWT identities.
    jwt: crate::jwt::JwtAuth,
}

#[derive(Debug)]
pub struct Caller {
    pub id: String,
    allow_all: bool,
    allowed: Vec<String>,
    pub disabled: bool,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// Spend reached the key's budget for the current period.
    pub budget_exceeded: bool,
    pub limits: Option<Limits>,
}

/// A scope's rate limits and the fleet-wide counters they are checked on.
#[derive(Debug)]
pub struct Limits {
    pub rate: RateLimit,
    pub scope: Arc<Scope>,
}

impl Limits {
    fn new(limiter: &Limiter, scope: String, rate: Option<RateLimit>) -> Option<Self> {
        let rate = rate.filter(|r| *r != RateLimit::default())?;
        Some(Self {
            scope: limiter.scope(&scope, &rate),
            rate,
        })
    }

    pub fn counts_tokens(&self) -> bool {
        self.rate.tpm.is_some() || self.rate.tpd.is_some()
    }
}

impl Caller {
    /// An api key as the hot path checks it.
    pub(crate) fn from_api_key(
        id: String,
        k: aigw_shared::domain::ApiKey,
        budget_exceeded: bool,
        limiter: &Limiter,
    ) -> Self {
        Self {
            budget_exceeded,
            limits: Limits::new(limiter, format!("key/{id}"), k.rate_limit),
            id,
            allow_all: k.allowed_models.iter().any(|m| m == "*"),
            allowed: k.allowed_models,
            disabled: k.disabled,
            expires_at: k.expires_at.map(|t| t.unix_timestamp()),
        }
    }

    pub fn allows(&self, alias: &str) -> bool {
        self.allow_all || self.allowed.iter().any(|a| a == alias)
    }
}

#[derive(Debug)]
pub struct Route {
    pub alias: Arc<str>,
    /// Sorted by priority, lowest first.
    pub targets: Vec<Arc<Upstream>>,
    /// `weights[i]` is `targets[i]`'s weight in this route.
    pub weights: Vec<u32>,
    /// Index ranges of `targets` with equal priority, in priority order.
    pub groups: Vec<Range<usize>>,
    pub strategy: RoutingStrategy,
    pub rr: AtomicUsize,
    /// The model's deadline for the whole call, retries included.
    pub timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub cooldown: Duration,
    pub cache: Option<aigw_shared::domain::CacheConfig>,
    /// Bumped by an admin purge of this model's cache.
    pub cache_generation: u64,
    pub limits: Option<Limits>,
    /// Log prompts and completions (the model opted in).
    pub log_payloads: bool,
    /// Counts prompt tokens for token limits (from the first deployment's name).
    pub tokenizer: tiktoken_rs::tokenizer::Tokenizer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Operation {
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat",
            Self::Completions => "text_completion",
            Self::Embeddings => "embeddings",
        }
    }
}

pub enum UpstreamAuth {
    ApiKey(HeaderValue),
    /// Entra ID: `Authorization: Bearer` from the key's token cache.
    Entra(Arc<TokenProvider>),
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ApiKey(_) => f.write_str("ApiKey(***)"),
            Self::Entra(p) => write!(f, "Entra({})", p.kind()),
        }
    }
}

#[derive(Debug)]
pub struct Upstream {
    pub provider_key_id: String,
    /// The provider key's display name, for messages (never the secret).
    pub provider_name: String,
    pub deployment: String,
    /// `x-aigw-served-by`: `<provider key>/<deployment>`.
    pub served_by: HeaderValue,
    pub auth: UpstreamAuth,
    pub host: String,
    /// A client trusting the provider key's extra CA, if it has one.
    pub client: Option<crate::proxy::UpstreamClient>,
    /// Shared with every snapshot that routes to this deployment.
    pub health: Arc<TargetHealth>,
    uris: [Uri; 3],
}

impl Upstream {
    pub fn uri(&self, op: Operation) -> &Uri {
        match op {
            Operation::ChatCompletions => &self.uris[0],
            Operation::Completions => &self.uris[1],
            Operation::Embeddings => &self.uris[2],
        }
    }
}

impl Runtime {
    /// Validates the whole snapshot and compiles it; any error rejects it all.
    /// Entra ID keys get their token cache from `credentials` (the same one
    /// as in the previous snapshot while the credential is unchanged).
    pub fn compile(
        snapshot: ConfigSnapshot,
        credentials: &CredentialRegistry,
    ) -> Result<Self, String> {
        Self::compile_with(
            snapshot,
            credentials,
            &HealthRegistry::default(),
            &Limiter::default(),
        )
    }

    /// [`Runtime::compile`], with deployment health carried over from
    /// `health` and rate-limit counters from `limiter`.
    pub fn compile_with(
        snapshot: ConfigSnapshot,
        credentials: &CredentialRegistry,
        health: &HealthRegistry,
        limiter: &Limiter,
    ) -> Result<Self, String> {
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(format!(
                "snapshot format {} is not supported (expected {SNAPSHOT_FORMAT})",
                snapshot.format
            ));
        }
        let mut upstreams: HashMap<(String, String), Arc<Upstream>> = HashMap::new();
        let mut clients: HashMap<String, crate::proxy::UpstreamClient> = HashMap::new();
        let mut routes = HashMap::new();
        let mut token_providers: HashMap<String, Arc<TokenProvider>> = HashMap::new();
        for (model_id, m) in &snapshot.models {
            let mut targets = m.resolved_targets();
            targets.sort_by_key(|t| t.priority);
            let mut compiled = Vec::with_capacity(targets.len());
            let weights: Vec<u32> = targets.iter().map(|t| t.weight.max(1)).collect();
            let mut groups: Vec<Range<usize>> = Vec::new();
            for (i, t) in targets.iter().enumerate() {
                match groups.last_mut() {
                    Some(g) if targets[g.start].priority == t.priority => g.end = i + 1,
                    _ => groups.push(i..i + 1),
                }
            }
            for t in targets {
                let key = (t.provider_key_id.clone(), t.model_name.clone());
                if let Some(u) = upstreams.get(&key) {
                    compiled.push(u.clone());
                    continue;
                }
                let pk = snapshot
                    .provider_keys
                    .get(&t.provider_key_id)
                    .ok_or_else(|| {
                        format!(
                            "model {model_id}: provider key {} is missing",
                            t.provider_key_id
                        )
                    })?;
                let base = resolve_api_base(&pk.api_base)
                    .map_err(|e| format!("provider key {}: {e}", t.provider_key_id))?;
                let uri = |op: Operation| -> Result<Uri, String> {
                    format!(
                        "{base}/openai/deployments/{}/{}?api-version={}",
                        t.model_name,
                        op.path(),
                        pk.api_version
                    )
                    .parse()
                    .map_err(|e| format!("model {model_id}: bad upstream URL: {e}"))
                };
                let uris = [
                    uri(Operation::ChatCompletions)?,
                    uri(Operation::Completions)?,
                    uri(Operation::Embeddings)?,
                ];
                let auth = match &pk.credential {
                    Credential::ApiKey { key } => {
                        let mut v = HeaderValue::from_str(key).map_err(|_| {
                            format!(
                                "provider key {}: the API key is not a valid header value",
                                pk.display_name
                            )
                        })?;
                        v.set_sensitive(true);
                        UpstreamAuth::ApiKey(v)
                    }
                    Credential::ClientSecret { .. }
                    | Credential::ManagedIdentity { .. }
                    | Credential::WorkloadIdentity => {
                        let provider = match token_providers.get(&t.provider_key_id) {
                            Some(p) => p.clone(),
                            None => {
                                let p = credentials.resolve(&t.provider_key_id, pk)?;
                                token_providers.insert(t.provider_key_id.clone(), p.clone());
                                p
                            }
                        };
                        UpstreamAuth::Entra(provider)
                    }
                };
                let client = match &pk.ca_pem {
                    None => None,
                    Some(pem) => Some(match clients.get(pem) {
                        Some(c) => c.clone(),
                        None => {
                            let ders = aigw_shared::domain::parse_ca_pem(pem).map_err(|e| {
                                format!("provider key {}: ca_pem {e}", pk.display_name)
                            })?;
                            let c = crate::proxy::UpstreamClient::new(&ders)
                                .map_err(|e| format!("provider key {}: {e}", pk.display_name))?;
                            clients.insert(pem.clone(), c.clone());
                            c
                        }
                    }),
                };
                let served_by =
                    HeaderValue::from_str(&format!("{}/{}", pk.display_name, t.model_name))
                        .unwrap_or_else(|_| HeaderValue::from_static("upstream"));
                let up = Arc::new(Upstream {
                    provider_key_id: t.provider_key_id.clone(),
                    provider_name: pk.display_name.clone(),
                    deployment: t.model_name.clone(),
                    served_by,
                    auth,
                    host: uris[0].host().unwrap_or_default().to_string(),
                    client,
                    health: health.get(&t.provider_key_id, &t.model_name),
                    uris,
                });
                upstreams.insert(key, up.clone());
                compiled.push(up);
            }
            let routing = m.routing.clone().unwrap_or_default();
            let tokenizer = crate::limits::tokens::tokenizer_for(
                compiled.first().map_or("", |u| u.deployment.as_str()),
            );
            routes.insert(
                m.display_name.clone(),
                Arc::new(Route {
                    alias: Arc::from(m.display_name.as_str()),
                    targets: compiled,
                    weights,
                    groups,
                    strategy: routing.strategy,
                    rr: AtomicUsize::new(0),
                    timeout: routing.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0),
                    stream_idle_timeout: routing
                        .stream_idle_timeout
                        .map_or(DEFAULT_STREAM_IDLE, |d| d.0),
                    retries: routing.retries.unwrap_or(DEFAULT_RETRIES),
                    retry_backoff: routing.retry_backoff.map_or(DEFAULT_RETRY_BACKOFF, |d| d.0),
                    cooldown: routing.cooldown.map_or(DEFAULT_COOLDOWN, |d| d.0),
                    cache: m.cache,
                    cache_generation: snapshot.cache_purges.get(model_id).copied().unwrap_or(0),
                    limits: Limits::new(limiter, format!("model/{}", m.display_name), m.rate_limit),
                    tokenizer,
                    log_payloads: m.log_payloads,
                }),
            );
        }
        // JWT-bound api keys leave `api_keys` here; the rest are key hashes.
        let mut snapshot = snapshot;
        let jwt = crate::jwt::JwtAuth::compile(
            &snapshot.jwt_providers,
            &mut snapshot.api_keys,
            &snapshot.budget_exceeded,
            limiter,
        )?;
        let exceeded = snapshot.budget_exceeded;
        let mut callers = HashMap::with_capacity(snapshot.api_keys.len());
        for (id, k) in snapshot.api_keys {
            let hash: [u8; 32] = hex::decode(&k.key_hash)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("api key {id}: key_hash is not 64 hex characters"))?;
            let budget_exceeded = exceeded.contains(&id);
            callers.insert(
                hash,
                Arc::new(Caller::from_api_key(id, k, budget_exceeded, limiter)),
            );
        }
        let mut aliases: Vec<String> = routes.keys().cloned().collect();
        aliases.sort();
        Ok(Self {
            version: snapshot.version,
            callers,
            routes,
            aliases,
            token_providers,
            jwt,
        })
    }

    /// Trusted JWT issuers and the api keys bound to JWT identities.
    pub fn jwt(&self) -> &crate::jwt::JwtAuth {
        &self.jwt
    }

    /// The Entra ID token caches this snapshot uses, by provider key id.
    pub fn token_providers(&self) -> &HashMap<String, Arc<TokenProvider>> {
        &self.token_providers
    }

    /// The caller whose key hashes to an api key's `key_hash`.
    pub fn caller(&self, presented_key: &str) -> Option<&Arc<Caller>> {
        let digest: [u8; 32] = Sha256::digest(presented_key.as_bytes()).into();
        self.callers.get(&digest)
    }

    /// Every api key, hashed and JWT-bound.
    pub fn callers(&self) -> impl Iterator<Item = &Arc<Caller>> {
        self.callers.values().chain(self.jwt.callers())
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }

    pub fn route(&self, alias: &str) -> Option<&Arc<Route>> {
        self.routes.get(alias)
    }

    /// Every alias, sorted.
    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }
}
