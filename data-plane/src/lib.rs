//! aigw data plane: a stateless node that applies config snapshots from the
//! control plane and proxies OpenAI-API calls to Azure OpenAI.
//!
//! Where things live:
//! - `config/` — snapshots: compile (`runtime`), stream from the control plane
//!   (`watch`), on-disk cache (`cache`), and the lock-free `ConfigHandle`
//! - `proxy/`  — the request pipeline (its order is documented in `proxy/mod.rs`):
//!   caller auth (`auth`), body checks (`request`), the Azure call (`upstream`),
//!   stream adaptation (`sse`), error envelope (`edge`)
//! - `server`  — accept loops and graceful drain
//! - `credentials` — Entra ID tokens for the upstream, cached across snapshots
//! - `metrics` — `/metrics` counters

pub mod config;
pub mod credentials;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod server;

pub use error::Error;

use aigw_shared::config::Config;
use config::{ConfigHandle, SnapshotCacheFile, WatchSettings};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::info;

/// What a data-plane node needs to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub control_plane_url: String,
    pub node_id: String,
    pub token: String,
    pub snapshot_cache: PathBuf,
    pub max_body_bytes: usize,
    /// How long in-flight calls may take to finish at shutdown.
    pub drain: Duration,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Result<Self, Error> {
        let token = cfg.nodes.token.clone().ok_or_else(|| {
            Error::Config("nodes.token: required to join the control plane".into())
        })?;
        Ok(Self {
            listen: cfg.data_plane.listen,
            metrics_listen: cfg.data_plane.metrics_listen,
            control_plane_url: cfg.data_plane.control_plane_url.clone(),
            node_id: cfg.data_plane.node_id.clone().unwrap_or_else(hostname),
            token,
            snapshot_cache: cfg.data_plane.snapshot_cache.clone(),
            max_body_bytes: cfg.data_plane.max_body_bytes,
            drain: Duration::from_secs(30),
        })
    }
}

/// The host name, the default node id.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "aigw-node".into())
}

/// A running data-plane node.
pub struct DataPlane {
    pub proxy_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    config: Arc<ConfigHandle>,
    stop: watch::Sender<bool>,
    tasks: TaskTracker,
}

impl DataPlane {
    /// Binds both listeners, boots from the snapshot cache if there is one,
    /// and starts following the control plane.
    pub async fn start(settings: Settings) -> Result<Self, Error> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("{what} on {addr}: {e}"),
                ))
            })
        };
        let proxy_listener = bind(settings.listen, "data_plane.listen").await?;
        let health_listener = bind(settings.metrics_listen, "data_plane.metrics_listen").await?;
        let proxy_addr = proxy_listener.local_addr()?;
        let metrics_addr = health_listener.local_addr()?;

        let metrics = Arc::new(metrics::Metrics::default());
        let config = Arc::new(ConfigHandle::new(Arc::new(
            credentials::CredentialRegistry::new(metrics.clone()),
        )));
        let cache = Arc::new(SnapshotCacheFile::new(
            &settings.snapshot_cache,
            &settings.token,
        ));
        config::watch::boot_from_cache(&config, &cache);

        let upstream = proxy::UpstreamClient::new(&[])?;
        let proxy = Arc::new(proxy::Proxy::new(
            config.clone(),
            upstream,
            settings.max_body_bytes,
            metrics.clone(),
        ));

        let (stop, stopped) = watch::channel(false);
        let tasks = TaskTracker::new();
        tasks.spawn(config::watch_control_plane(
            WatchSettings {
                control_plane_url: settings.control_plane_url.clone(),
                node_id: settings.node_id.clone(),
                token: settings.token.clone(),
                address: proxy_addr.to_string(),
            },
            config.clone(),
            cache,
            stopped.clone(),
        ));
        tasks.spawn(server::serve_proxy(
            proxy_listener,
            proxy,
            stopped.clone(),
            settings.drain,
        ));
        tasks.spawn(server::serve_health(
            health_listener,
            config.clone(),
            metrics,
            stopped,
        ));
        tasks.close();
        info!(%proxy_addr, %metrics_addr, node_id = %settings.node_id, "data plane started");
        Ok(Self {
            proxy_addr,
            metrics_addr,
            config,
            stop,
            tasks,
        })
    }

    pub fn config(&self) -> &Arc<ConfigHandle> {
        &self.config
    }

    /// Serves until `shutdown` resolves, then stops accepting and drains.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.stop().await;
    }

    pub async fn stop(self) {
        info!("data plane shutting down: draining in-flight calls");
        self.stop.send_replace(true);
        self.tasks.wait().await;
    }
}
