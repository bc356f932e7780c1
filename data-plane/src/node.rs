//! The node's long-lived services: what outlives any one snapshot and is
//! shared by every call. Snapshots are compiled against them (`apply`);
//! the proxy reads them next to the snapshot of the moment.

use crate::cache::ResponseCaches;
use crate::config::{CompileWith, ConfigHandle, Runtime};
use crate::credentials::CredentialRegistry;
use crate::http_client::HttpClient;
use crate::jwt::JwksRegistry;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::routing::{HealthRegistry, Prober};
use aigw_shared::crypto::Cipher;
use aigw_shared::snapshot::{ConfigSnapshot, WireSnapshot, SNAPSHOT_FORMAT};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

pub struct Services {
    pub metrics: Arc<Metrics>,
    /// Entra ID token caches of the provider keys.
    pub credentials: Arc<CredentialRegistry>,
    /// Per-deployment health: cooldowns, circuits, latency.
    pub health: HealthRegistry,
    /// Rate-limit counters, shared with the fleet.
    pub limiter: Arc<Limiter>,
    /// Signing keys of the trusted JWT issuers.
    pub jwks: JwksRegistry,
    /// Response caches, per model alias.
    pub caches: ResponseCaches,
    /// The client for targets without their own CA.
    pub http: HttpClient,
    /// Health probe loops of the live snapshot's probed targets.
    pub probes: Prober,
}

impl Services {
    pub fn new(metrics: Arc<Metrics>) -> Result<Self, crate::Error> {
        let http = HttpClient::new(&[]).map_err(crate::Error::Config)?;
        Ok(Self {
            credentials: Arc::new(CredentialRegistry::new(metrics.clone())),
            metrics,
            health: HealthRegistry::default(),
            limiter: Arc::default(),
            jwks: JwksRegistry::default(),
            caches: ResponseCaches::default(),
            probes: Prober::new(http.clone()),
            http,
        })
    }

    /// What a snapshot is compiled against.
    pub fn compile_with(&self) -> CompileWith<'_> {
        CompileWith {
            credentials: &self.credentials,
            health: &self.health,
            limiter: &self.limiter,
        }
    }

    /// Forgets what the live snapshot no longer uses.
    fn retain(&self, runtime: &Runtime) {
        self.credentials
            .retain_only(runtime.token_providers().clone());
        self.jwks.retain(runtime.jwt());
        let live: HashSet<(&str, &str)> = runtime
            .routes()
            .flat_map(|r| {
                r.targets
                    .iter()
                    .map(|t| (t.provider_key_id.as_str(), t.deployment.as_str()))
            })
            .collect();
        self.health.retain(&|pk, dep| live.contains(&(pk, dep)));
        let scopes: HashSet<&str> = runtime
            .routes()
            .filter_map(|r| r.limits.as_ref())
            .chain(runtime.callers().filter_map(|c| c.limits.as_ref()))
            .map(|l| l.scope.name())
            .collect();
        self.limiter.retain(&scopes);
        self.caches.retain(&|alias| runtime.route(alias).is_some());
    }
}

/// A node: its services and its live snapshot.
pub struct Node {
    pub services: Arc<Services>,
    pub config: Arc<ConfigHandle>,
    /// What the live snapshot was made of, to know a snapshot the node has
    /// already (another control-plane replica sends the same version).
    pub installed: Installed,
}

/// A snapshot's identity beyond its version: the budget and cache-purge
/// state the control plane adds at the same version.
#[derive(Default)]
pub struct Installed(std::sync::Mutex<Option<Identity>>);

#[derive(PartialEq)]
struct Identity {
    version: u64,
    budget_exceeded: BTreeSet<String>,
    cache_purges: BTreeMap<String, u64>,
}

impl Identity {
    fn of<C, K>(s: &ConfigSnapshot<C, K>) -> Self {
        Self {
            version: s.version,
            budget_exceeded: s.budget_exceeded.clone(),
            cache_purges: s.cache_purges.clone(),
        }
    }
}

impl Node {
    /// Compiles `snapshot` against the node's services and swaps it in.
    pub fn install(&self, snapshot: ConfigSnapshot) -> Result<u64, String> {
        crate::limits::tokens::warm_up_for(&snapshot);
        let runtime = Runtime::compile(snapshot, self.services.compile_with())?;
        let version = runtime.version;
        self.services.retain(&runtime);
        self.services
            .probes
            .reconcile(runtime.probe_targets().to_vec());
        self.config.store(Arc::new(runtime));
        Ok(version)
    }
}

impl Installed {
    fn get(&self) -> std::sync::MutexGuard<'_, Option<Identity>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, identity: Identity) {
        *self.get() = Some(identity);
    }
}

impl crate::config::Apply for Node {
    fn apply(&self, body: &[u8], data_key: &Cipher) -> Result<u64, String> {
        #[derive(serde::Deserialize)]
        struct Format {
            format: u32,
        }
        // Named first: a snapshot of another format fails to decode below
        // with a less helpful message.
        let format = serde_json::from_slice::<Format>(body)
            .map_err(|e| format!("undecodable snapshot: {e}"))?
            .format;
        if format != SNAPSHOT_FORMAT {
            return Err(format!(
                "snapshot format {format}, this node reads format {SNAPSHOT_FORMAT}: \
                 run control plane and data planes of the same release"
            ));
        }
        let wire: WireSnapshot =
            serde_json::from_slice(body).map_err(|e| format!("undecodable snapshot: {e}"))?;
        let identity = Identity::of(&wire);
        if self.installed.get().as_ref() == Some(&identity) {
            tracing::info!(
                version = identity.version,
                "the snapshot is the one this node serves; nothing to compile"
            );
            return Ok(identity.version);
        }
        let snapshot = wire.open(data_key).map_err(|e| e.to_string())?;
        let version = self.install(snapshot)?;
        self.installed.set(identity);
        Ok(version)
    }

    fn version(&self) -> u64 {
        self.config.version()
    }

    fn rejected(&self, version: u64, reason: &str) {
        self.config.rejected(version, reason);
    }

    fn target_status(&self) -> Vec<aigw_shared::proto::config::v1::TargetHealth> {
        self.services
            .probes
            .statuses()
            .into_iter()
            .map(
                |(provider_key_id, deployment, s)| aigw_shared::proto::config::v1::TargetHealth {
                    provider_key_id,
                    deployment,
                    healthy: s.healthy,
                    last_probe: crate::routing::rfc3339_ms(s.last_probe_ms).unwrap_or_default(),
                    consecutive_failures: s.consecutive_failures,
                    last_error: s.last_error.unwrap_or_default(),
                },
            )
            .collect()
    }

    fn status_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.services.probes.subscribe()
    }
}
