//! A snapshot compiled for the hot path: hash tables, URLs and headers
//! prebuilt. Plain data: the long-lived node services it draws on (token
//! caches, target health, rate-limit counters) are passed to `compile`.

use crate::caller::Caller;
use crate::credentials::{CredentialRegistry, TokenProvider};
use crate::http_client::HttpClient;
use crate::limits::{Limiter, Limits};
use crate::openai::{Operation, OPERATIONS};
use crate::response_ids::ResponseIds;
use crate::routing::{HealthRegistry, Pool, ProbeAuth, ProbeTarget, TargetHealth};
use aigw_shared::domain::{
    check_api_version, check_upstream, Credential, Fallbacks, HealthCheck, Model,
    Routing as RoutingPolicy, Target as ResolvedTarget,
};
use aigw_shared::snapshot::{ConfigSnapshot, SnapshotProviderKey as ProviderKey, SNAPSHOT_FORMAT};
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

/// A compiled snapshot.
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
    /// Targets with health probes (one each, the shortest interval asked).
    probes: Vec<ProbeTarget>,
    /// Seals and opens Responses API ids (`None`: the control plane sent
    /// no key, and the Responses API is unavailable).
    response_ids: Option<Arc<ResponseIds>>,
    /// A target of each provider key some model routes to: where calls
    /// about a stored response go (the resource matters, not the deployment).
    provider_targets: HashMap<String, Arc<Target>>,
}

/// The node services a snapshot is compiled against; each outlives snapshots.
#[derive(Clone, Copy)]
pub struct CompileWith<'a> {
    /// Entra ID token caches, the same while a credential is unchanged.
    pub credentials: &'a CredentialRegistry,
    /// Target health, carried over to the new snapshot's targets.
    pub health: &'a HealthRegistry,
    /// Rate-limit counters, carried over to the new snapshot's scopes.
    pub limiter: &'a Limiter,
}

/// A model route: an alias and the deployments (targets) that serve it.
#[derive(Debug)]
pub struct Route {
    pub alias: Arc<str>,
    /// Sorted by priority, lowest first.
    pub targets: Vec<Arc<Target>>,
    /// How attempts pick among `targets` (same indices).
    pub pool: Pool,
    /// The model's deadline for the whole call, retries included.
    pub timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub cache: Option<aigw_shared::domain::CacheConfig>,
    /// Bumped by an admin purge of this model's cache.
    pub cache_generation: u64,
    pub limits: Option<Limits>,
    /// Log prompts and completions (the model opted in).
    pub log_payloads: bool,
    /// Counts prompt tokens for token limits (from the first deployment's name).
    pub tokenizer: tiktoken_rs::tokenizer::Tokenizer,
    /// `context_windows[i]`: target `i`'s context window in tokens, if set.
    pub context_windows: Vec<Option<u64>>,
    /// Other aliases to try, by reason this one could not answer.
    pub fallbacks: Fallbacks,
    /// Longest wait for a target's first byte or first event.
    pub first_token_timeout: Option<Duration>,
    /// The model's `routing.health_check`, if any.
    pub health_check: Option<HealthCheck>,
}

pub enum TargetAuth {
    ApiKey(HeaderValue),
    /// Entra ID: `Authorization: Bearer` from the key's token cache.
    Entra(Arc<TokenProvider>),
}

impl std::fmt::Debug for TargetAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ApiKey(_) => f.write_str("ApiKey(***)"),
            Self::Entra(p) => write!(f, "Entra({})", p.kind()),
        }
    }
}

/// One deployment a model route sends attempts to (an upstream target).
#[derive(Debug)]
pub struct Target {
    pub provider_key_id: String,
    /// The provider key's display name, for messages (never the secret).
    pub provider_name: String,
    pub deployment: String,
    /// `x-aigw-served-by`: `<provider key>/<deployment>`.
    pub served_by: HeaderValue,
    pub auth: TargetAuth,
    pub host: String,
    /// The provider key's checked `api_base` (no trailing slash), for probes.
    pub base: String,
    /// A client trusting the provider key's extra CA, if it has one.
    pub client: Option<HttpClient>,
    /// Shared with every snapshot that routes to this deployment.
    pub health: Arc<TargetHealth>,
    /// By `Operation as usize`; `None` for operations Azure does not serve.
    uris: Vec<Option<Uri>>,
    /// The provider key's Responses API endpoint.
    responses: ResponsesEndpoint,
    /// Azure's v1 API (`api_version: v1`): the deployment goes in the
    /// body's `model`, not in the path.
    pub model_in_body: bool,
}

/// Where a provider key serves the Responses API: Azure's v1 form
/// `{api_base}/openai/v1/responses` (no api-version), or for a key pinned
/// to a dated preview version, `{api_base}/openai/responses?api-version=…`.
/// Either takes the deployment in the body's `model`.
#[derive(Debug)]
struct ResponsesEndpoint {
    /// `…/openai/v1/responses` or `…/openai/responses`.
    base: String,
    /// The preview form's `api-version`.
    api_version: Option<String>,
}

impl Target {
    pub fn uri(&self, op: Operation) -> Option<&Uri> {
        self.uris.get(op as usize)?.as_ref()
    }

    /// The Responses API URL for `op`: `…/responses` to create, else
    /// `…/responses/{upstream_id}{suffix}`; `query` is the caller's own
    /// (paging of input items, `include`), minus any `api-version` and
    /// `stream`.
    pub fn responses_uri(
        &self,
        op: Operation,
        upstream_id: Option<&str>,
        query: Option<&str>,
    ) -> Result<Uri, String> {
        let mut url = self.responses.base.clone();
        if let Some(id) = upstream_id {
            url.push('/');
            url.push_str(&path_segment(id));
            url.push_str(op.id_suffix());
        }
        let mut params: Vec<String> = query
            .unwrap_or_default()
            .split('&')
            // Ours, not the caller's: the key's api-version; and a stored
            // response is read as JSON, never streamed again.
            .filter(|kv| {
                !kv.is_empty() && !matches!(kv.split('=').next(), Some("api-version" | "stream"))
            })
            .map(query_param)
            .collect();
        if let Some(v) = &self.responses.api_version {
            params.push(format!("api-version={v}"));
        }
        if !params.is_empty() {
            url.push('?');
            url.push_str(&params.join("&"));
        }
        url.parse::<Uri>()
            .map_err(|e| format!("bad Responses API URL: {e}"))
    }
}

/// A caller's query parameter, safe to put in the upstream URL: anything
/// but unreserved characters, `=` and existing percent escapes encoded.
fn query_param(kv: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(kv.len());
    for b in kv.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'=' | b'%' | b'+')
        {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

impl Runtime {
    /// Validates the whole snapshot and compiles it; any error rejects it all.
    pub fn compile(snapshot: ConfigSnapshot, with: CompileWith<'_>) -> Result<Self, String> {
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(format!(
                "snapshot format {} is not supported (expected {SNAPSHOT_FORMAT})",
                snapshot.format
            ));
        }
        let mut targets = TargetBuilder::new(&snapshot, with);
        let mut routes = HashMap::with_capacity(snapshot.models.len());
        for (model_id, m) in &snapshot.models {
            // The control plane's write checks, once more: a snapshot written
            // before a rule existed must not reach the hot path.
            m.validate()
                .map_err(|e| format!("model {model_id} ({}): {e}", m.display_name))?;
            let route = compile_route(model_id, m, &snapshot, &mut targets, with.limiter)?;
            routes.insert(m.display_name.clone(), Arc::new(route));
        }
        for (id, k) in &snapshot.api_keys {
            if let Some(rl) = &k.rate_limit {
                rl.validate("rate_limit")
                    .map_err(|e| format!("api key {id}: {e}"))?;
            }
        }
        let token_providers = targets.token_providers;
        let mut provider_targets: HashMap<String, Arc<Target>> = HashMap::new();
        let mut compiled: Vec<_> = targets.targets.into_iter().collect();
        compiled.sort_by(|a, b| a.0.cmp(&b.0));
        for ((pk, _), t) in compiled {
            provider_targets.entry(pk).or_insert(t);
        }
        let response_ids = snapshot
            .response_id_key
            .as_ref()
            .map(|k| Arc::new(ResponseIds::new(&k.0)));
        // JWT-bound api keys leave `api_keys` here; the rest are key hashes.
        let mut snapshot = snapshot;
        let jwt = crate::jwt::JwtAuth::compile(
            &snapshot.jwt_providers,
            &mut snapshot.api_keys,
            &snapshot.budget_exceeded,
            with.limiter,
        )?;
        let callers = compile_callers(&snapshot, with.limiter)?;
        let mut aliases: Vec<String> = routes.keys().cloned().collect();
        aliases.sort();
        let probes = probe_targets(&routes)?;
        Ok(Self {
            version: snapshot.version,
            callers,
            routes,
            aliases,
            token_providers,
            jwt,
            probes,
            response_ids,
            provider_targets,
        })
    }

    /// The targets to probe under this snapshot.
    pub fn probe_targets(&self) -> &[ProbeTarget] {
        &self.probes
    }

    /// The Responses API's id sealer, if the control plane sent its key.
    pub fn response_ids(&self) -> Option<&Arc<ResponseIds>> {
        self.response_ids.as_ref()
    }

    /// A target on `provider_key_id`, if any model still routes to it.
    pub fn provider_target(&self, provider_key_id: &str) -> Option<&Arc<Target>> {
        self.provider_targets.get(provider_key_id)
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

/// One probe per target of every model with a `health_check`; a target
/// several models probe differently gets the shortest interval.
fn probe_targets(routes: &HashMap<String, Arc<Route>>) -> Result<Vec<ProbeTarget>, String> {
    let mut by_target: HashMap<(String, String), ProbeTarget> = HashMap::new();
    let mut sorted: Vec<&Arc<Route>> = routes.values().collect();
    sorted.sort_by(|a, b| a.alias.cmp(&b.alias));
    for route in sorted {
        let Some(check) = &route.health_check else {
            continue;
        };
        for t in &route.targets {
            let path = check.path();
            let uri: Uri = format!("{}{path}", t.base)
                .parse()
                .map_err(|e| format!("model {}: bad health_check URL: {e}", route.alias))?;
            // Azure's API paths need the key's credential; its status path does not.
            let auth = path.starts_with("/openai/").then(|| match &t.auth {
                TargetAuth::ApiKey(k) => ProbeAuth::ApiKey(k.clone()),
                TargetAuth::Entra(p) => ProbeAuth::Entra(p.clone()),
            });
            let probe = ProbeTarget {
                provider_key_id: t.provider_key_id.clone(),
                deployment: t.deployment.clone(),
                uri,
                auth,
                client: t.client.clone(),
                health: t.health.clone(),
                interval: check.interval(),
                timeout: check.timeout(),
                unhealthy_after: check.unhealthy_after(),
                healthy_after: check.healthy_after(),
            };
            let key = (t.provider_key_id.clone(), t.deployment.clone());
            match by_target.get(&key) {
                Some(p) if p.interval <= probe.interval => {}
                _ => {
                    by_target.insert(key, probe);
                }
            }
        }
    }
    let mut v: Vec<ProbeTarget> = by_target.into_values().collect();
    v.sort_by(|a, b| (&a.provider_key_id, &a.deployment).cmp(&(&b.provider_key_id, &b.deployment)));
    Ok(v)
}

/// The api keys that authenticate by key hash.
fn compile_callers(
    snapshot: &ConfigSnapshot,
    limiter: &Limiter,
) -> Result<HashMap<[u8; 32], Arc<Caller>>, String> {
    let mut callers = HashMap::with_capacity(snapshot.api_keys.len());
    for (id, k) in &snapshot.api_keys {
        let hash: [u8; 32] = hex::decode(&k.key_hash)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("api key {id}: key_hash is not 64 hex characters"))?;
        let budget_exceeded = snapshot.budget_exceeded.contains(id);
        let caller = Caller::from_api_key(id.clone(), k.clone(), budget_exceeded, limiter);
        callers.insert(hash, Arc::new(caller));
    }
    Ok(callers)
}

/// A model's route: its targets in priority order and its routing policy.
fn compile_route(
    model_id: &str,
    m: &Model,
    snapshot: &ConfigSnapshot,
    targets: &mut TargetBuilder<'_>,
    limiter: &Limiter,
) -> Result<Route, String> {
    let mut resolved = m.resolved_targets();
    resolved.sort_by_key(|t| t.priority);
    let compiled = resolved
        .iter()
        .map(|t| targets.target(model_id, t))
        .collect::<Result<Vec<_>, _>>()?;
    let routing = m.routing.clone().unwrap_or_default();
    let tokenizer = crate::limits::tokens::tokenizer_for(
        compiled.first().map_or("", |u| u.deployment.as_str()),
    );
    Ok(Route {
        alias: Arc::from(m.display_name.as_str()),
        pool: pool(&resolved, &compiled, &routing),
        targets: compiled,
        timeout: routing.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0),
        stream_idle_timeout: routing
            .stream_idle_timeout
            .map_or(DEFAULT_STREAM_IDLE, |d| d.0),
        retries: routing.retries.unwrap_or(DEFAULT_RETRIES),
        retry_backoff: routing.retry_backoff.map_or(DEFAULT_RETRY_BACKOFF, |d| d.0),
        cache: m.cache,
        cache_generation: snapshot.cache_purges.get(model_id).copied().unwrap_or(0),
        limits: Limits::new(limiter, format!("model/{}", m.display_name), m.rate_limit),
        tokenizer,
        log_payloads: m.log_payloads,
        context_windows: resolved.iter().map(|t| t.context_window).collect(),
        fallbacks: (*m.fallbacks).clone(),
        first_token_timeout: routing.first_token_timeout.map(|d| d.0),
        health_check: routing.health_check.clone().map(|h| *h),
    })
}

/// Weights and priority groups of targets sorted by priority.
fn pool(resolved: &[ResolvedTarget], compiled: &[Arc<Target>], routing: &RoutingPolicy) -> Pool {
    let mut groups: Vec<Range<usize>> = Vec::new();
    for (i, t) in resolved.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if resolved.get(g.start).map(|s| s.priority) == Some(t.priority) => {
                g.end = i + 1
            }
            _ => groups.push(i..i + 1),
        }
    }
    Pool {
        health: compiled.iter().map(|t| t.health.clone()).collect(),
        weights: resolved.iter().map(|t| t.weight.max(1)).collect(),
        groups,
        strategy: routing.strategy,
        rr: AtomicUsize::new(0),
        cooldown: routing.cooldown.map_or(DEFAULT_COOLDOWN, |d| d.0),
    }
}

/// Compiles each (provider key, deployment) once per snapshot, however many
/// models route to it, and each provider key's credential and CA once.
struct TargetBuilder<'a> {
    snapshot: &'a ConfigSnapshot,
    with: CompileWith<'a>,
    targets: HashMap<(String, String), Arc<Target>>,
    /// Clients trusting a provider key's extra CA, by PEM.
    clients: HashMap<String, HttpClient>,
    token_providers: HashMap<String, Arc<TokenProvider>>,
}

impl<'a> TargetBuilder<'a> {
    fn new(snapshot: &'a ConfigSnapshot, with: CompileWith<'a>) -> Self {
        Self {
            snapshot,
            with,
            targets: HashMap::new(),
            clients: HashMap::new(),
            token_providers: HashMap::new(),
        }
    }

    fn target(&mut self, model_id: &str, t: &ResolvedTarget) -> Result<Arc<Target>, String> {
        let key = (t.provider_key_id.clone(), t.model_name.clone());
        if let Some(u) = self.targets.get(&key) {
            return Ok(u.clone());
        }
        let snapshot = self.snapshot;
        let pk = snapshot
            .provider_keys
            .get(&t.provider_key_id)
            .ok_or_else(|| {
                format!(
                    "model {model_id}: provider key {} is missing",
                    t.provider_key_id
                )
            })?;
        pk.credential
            .check()
            .and_then(|()| check_api_version(&pk.api_version))
            .map_err(|e| format!("provider key {}: {e}", t.provider_key_id))?;
        let base = check_upstream(&pk.api_base, pk.allow_insecure_upstream)
            .map_err(|e| format!("provider key {}: {e}", t.provider_key_id))?;
        let uris = uris(model_id, t, pk)?;
        let responses = responses_endpoint(t, pk)?;
        let host = uris
            .iter()
            .flatten()
            .next()
            .and_then(Uri::host)
            .unwrap_or_default()
            .to_string();
        let served_by = HeaderValue::from_str(&format!("{}/{}", pk.display_name, t.model_name))
            .unwrap_or_else(|_| HeaderValue::from_static("upstream"));
        let target = Arc::new(Target {
            provider_key_id: t.provider_key_id.clone(),
            provider_name: pk.display_name.clone(),
            deployment: t.model_name.clone(),
            served_by,
            auth: self.auth(&t.provider_key_id, pk)?,
            host,
            base: base.trim_end_matches('/').to_string(),
            client: self.client(pk)?,
            health: self.health(t),
            uris,
            responses,
            model_in_body: pk.api_version == V1_API,
        });
        self.targets.insert(key, target.clone());
        Ok(target)
    }

    fn health(&self, t: &ResolvedTarget) -> Arc<TargetHealth> {
        self.with.health.get(&t.provider_key_id, &t.model_name)
    }

    fn auth(&mut self, provider_key_id: &str, pk: &ProviderKey) -> Result<TargetAuth, String> {
        match &pk.credential {
            Credential::ApiKey { key } => {
                let mut v = HeaderValue::from_str(key).map_err(|_| {
                    format!(
                        "provider key {}: the API key is not a valid header value",
                        pk.display_name
                    )
                })?;
                v.set_sensitive(true);
                Ok(TargetAuth::ApiKey(v))
            }
            Credential::ClientSecret { .. }
            | Credential::ManagedIdentity { .. }
            | Credential::WorkloadIdentity => {
                if let Some(p) = self.token_providers.get(provider_key_id) {
                    return Ok(TargetAuth::Entra(p.clone()));
                }
                let p = self.with.credentials.resolve(provider_key_id, pk)?;
                self.token_providers
                    .insert(provider_key_id.to_string(), p.clone());
                Ok(TargetAuth::Entra(p))
            }
        }
    }

    /// A client trusting the key's extra CA; `None`: the node's own client.
    fn client(&mut self, pk: &ProviderKey) -> Result<Option<HttpClient>, String> {
        let Some(pem) = &pk.ca_pem else {
            return Ok(None);
        };
        if let Some(c) = self.clients.get(pem) {
            return Ok(Some(c.clone()));
        }
        let ders = aigw_shared::domain::parse_ca_pem(pem)
            .map_err(|e| format!("provider key {}: ca_pem {e}", pk.display_name))?;
        let c =
            HttpClient::new(&ders).map_err(|e| format!("provider key {}: {e}", pk.display_name))?;
        self.clients.insert(pem.clone(), c.clone());
        Ok(Some(c))
    }
}

/// `api_version` of a provider key on Azure's v1 API (no dated versions).
pub const V1_API: &str = "v1";

/// The target's URL for every operation Azure serves: the deployment-path
/// form with the key's `api-version`, or Azure's v1 form
/// (`{api_base}/openai/v1/{op}`, deployment in the body).
fn uris(model_id: &str, t: &ResolvedTarget, pk: &ProviderKey) -> Result<Vec<Option<Uri>>, String> {
    let base = check_upstream(&pk.api_base, pk.allow_insecure_upstream)
        .map_err(|e| format!("provider key {}: {e}", t.provider_key_id))?;
    OPERATIONS
        .iter()
        .map(|row| {
            row.azure_path
                .map(|path| {
                    if pk.api_version == V1_API {
                        format!("{base}/openai/v1/{path}")
                    } else {
                        format!(
                            "{base}/openai/deployments/{}/{path}?api-version={}",
                            path_segment(&t.model_name),
                            pk.api_version
                        )
                    }
                    .parse::<Uri>()
                    .map_err(|e| format!("model {model_id}: bad upstream URL: {e}"))
                })
                .transpose()
        })
        .collect()
}

/// The provider key's Responses API endpoint: the preview form for a dated
/// `-preview` version (the only versions Azure serves it under), else Azure's
/// v1 form — `v1`, and GA versions, which have no Responses API of their own.
fn responses_endpoint(t: &ResolvedTarget, pk: &ProviderKey) -> Result<ResponsesEndpoint, String> {
    let base = check_upstream(&pk.api_base, pk.allow_insecure_upstream)
        .map_err(|e| format!("provider key {}: {e}", t.provider_key_id))?;
    Ok(if pk.api_version.ends_with("-preview") {
        ResponsesEndpoint {
            base: format!("{base}/openai/responses"),
            api_version: Some(pk.api_version.clone()),
        }
    } else {
        ResponsesEndpoint {
            base: format!("{base}/openai/v1/responses"),
            api_version: None,
        }
    })
}

/// `name` as one URL path segment: every byte but RFC 3986's unreserved ones
/// percent-encoded, and a segment of dots encoded whole, so a deployment name
/// can never step out of `/openai/deployments/` or start a query. Names are
/// checked at the write too; this holds whatever a snapshot carries.
fn path_segment(name: &str) -> String {
    use std::fmt::Write;
    let dots_only = name.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') || (b == b'.' && !dots_only)
        {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(api_version: &str) -> Target {
        let t = ResolvedTarget {
            provider_key_id: "pk".into(),
            model_name: "dep".into(),
            priority: 0,
            weight: 1,
            context_window: None,
        };
        let pk = ProviderKey {
            display_name: "azure".into(),
            adapter: "azure-openai".into(),
            api_base: "https://res.openai.azure.com".into(),
            api_version: api_version.into(),
            ca_pem: None,
            allow_insecure_upstream: false,
            credential: aigw_shared::domain::Credential::ApiKey { key: "k".into() },
        };
        Target {
            provider_key_id: "pk".into(),
            provider_name: "azure".into(),
            deployment: "dep".into(),
            served_by: HeaderValue::from_static("azure/dep"),
            auth: TargetAuth::ApiKey(HeaderValue::from_static("k")),
            host: "res.openai.azure.com".into(),
            base: "https://res.openai.azure.com".into(),
            client: None,
            health: HealthRegistry::default().get("pk", "dep"),
            uris: Vec::new(),
            responses: responses_endpoint(&t, &pk).unwrap(),
            model_in_body: false,
        }
    }

    #[test]
    fn responses_go_to_the_v1_form_or_a_dated_preview() {
        let v1 = target("v1");
        let uri = |t: &Target, op, id, q| t.responses_uri(op, id, q).unwrap().to_string();
        assert_eq!(
            uri(&v1, Operation::Responses, None, None),
            "https://res.openai.azure.com/openai/v1/responses"
        );
        assert_eq!(
            uri(&target("2024-10-21"), Operation::Responses, None, None),
            "https://res.openai.azure.com/openai/v1/responses",
            "GA versions have no Responses API: the v1 form"
        );
        let preview = target("2025-04-01-preview");
        assert_eq!(
            uri(&preview, Operation::Responses, None, Some("api-version=1")),
            "https://res.openai.azure.com/openai/responses?api-version=2025-04-01-preview"
        );
        assert_eq!(
            uri(&preview, Operation::ListInputItems, Some("resp_1"), Some("limit=2&include[]=x&api-version=9")),
            "https://res.openai.azure.com/openai/responses/resp_1/input_items?limit=2&include%5B%5D=x&api-version=2025-04-01-preview"
        );
        assert_eq!(
            uri(&v1, Operation::CancelResponse, Some("../x?y"), None),
            "https://res.openai.azure.com/openai/v1/responses/..%2Fx%3Fy/cancel"
        );
        assert_eq!(
            uri(
                &v1,
                Operation::DeleteResponse,
                Some("resp_1"),
                Some("a=<b>#")
            ),
            "https://res.openai.azure.com/openai/v1/responses/resp_1?a=%3Cb%3E%23"
        );
    }

    #[test]
    fn a_deployment_name_stays_one_path_segment() {
        assert_eq!(path_segment("gpt-4o_prod.v2"), "gpt-4o_prod.v2");
        assert_eq!(
            path_segment("../../../../x?api-version=1#"),
            "..%2F..%2F..%2F..%2Fx%3Fapi-version%3D1%23"
        );
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("gpt 4o"), "gpt%204o");
        assert_eq!(path_segment("é"), "%C3%A9");
        for name in ["../../../../x?api-version=1#", "..", "a/b", "a%2Fb", "é?#"] {
            let uri: http::Uri = format!(
                "https://h.example/openai/deployments/{}/chat/completions?api-version=1",
                path_segment(name)
            )
            .parse()
            .unwrap();
            assert_eq!(
                uri.path().split('/').count(),
                6,
                "{name} must stay one segment: {uri}"
            );
            assert_eq!(uri.query(), Some("api-version=1"), "{name}: {uri}");
        }
    }
}
