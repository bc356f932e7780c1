//! Configuration on the data plane: the snapshot pushed by the control plane,
//! compiled into lookup tables ([`Runtime`]) and swapped atomically, so the hot
//! path reads it without a lock.
//!
//! - `runtime` — compile a snapshot, validating it whole
//! - `watch`   — the stream from the control plane, with reconnect and backoff
//! - `cache`   — the last good snapshot on disk, sealed with the node token

mod cache;
mod runtime;
pub mod watch;

pub use cache::SnapshotCacheFile;
pub use runtime::{Caller, Limits, Operation, Route, Runtime, Upstream, UpstreamAuth};
pub use watch::{watch_control_plane, WatchSettings};

use crate::credentials::CredentialRegistry;
use crate::routing::HealthRegistry;
use arc_swap::ArcSwapOption;
use std::sync::Arc;

/// The live configuration: readers `load` it lock-free; the watch task swaps it.
/// It also keeps the Entra ID token caches, which outlive any one snapshot.
pub struct ConfigHandle {
    current: ArcSwapOption<Runtime>,
    version: tokio::sync::watch::Sender<u64>,
    credentials: Arc<CredentialRegistry>,
    health: HealthRegistry,
    /// Rate-limit counters, kept across snapshots.
    limiter: Arc<crate::limits::Limiter>,
    /// Signing keys of the trusted JWT issuers, kept across snapshots.
    jwks: crate::jwt::JwksRegistry,
}

impl Default for ConfigHandle {
    fn default() -> Self {
        Self::new(Arc::new(CredentialRegistry::new(Arc::default())))
    }
}

impl ConfigHandle {
    pub fn new(credentials: Arc<CredentialRegistry>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            version: tokio::sync::watch::channel(0).0,
            credentials,
            health: HealthRegistry::default(),
            limiter: Arc::default(),
            jwks: crate::jwt::JwksRegistry::default(),
        }
    }

    /// The JWT issuers' key caches that compiled snapshots draw on.
    pub fn jwks(&self) -> &crate::jwt::JwksRegistry {
        &self.jwks
    }

    /// The token caches that compiled snapshots draw on.
    pub fn credentials(&self) -> &Arc<CredentialRegistry> {
        &self.credentials
    }

    /// Rate-limit counters, kept across snapshots.
    pub fn limiter(&self) -> &Arc<crate::limits::Limiter> {
        &self.limiter
    }

    /// Deployment health, kept across snapshots.
    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    pub fn load(&self) -> Option<Arc<Runtime>> {
        self.current.load_full()
    }

    pub fn store(&self, runtime: Runtime) {
        let v = runtime.version;
        self.credentials
            .retain_only(runtime.token_providers().clone());
        self.jwks.retain(runtime.jwt());
        let live: std::collections::HashSet<(&str, &str)> = runtime
            .routes()
            .flat_map(|r| {
                r.targets
                    .iter()
                    .map(|t| (t.provider_key_id.as_str(), t.deployment.as_str()))
            })
            .collect();
        self.health.retain(&|pk, dep| live.contains(&(pk, dep)));
        let scopes: std::collections::HashSet<&str> = runtime
            .routes()
            .filter_map(|r| r.limits.as_ref())
            .chain(runtime.callers().filter_map(|c| c.limits.as_ref()))
            .map(|l| l.scope.name())
            .collect();
        self.limiter.retain(&scopes);
        self.current.store(Some(Arc::new(runtime)));
        self.version.send_replace(v);
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Version of the applied snapshot, 0 before the first.
    pub fn version(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |r| r.version)
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }
}
