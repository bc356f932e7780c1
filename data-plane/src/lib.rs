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
//! - `jwt` — caller JWTs (Entra ID / OIDC): issuers' keys cached across
//!   snapshots, token verification, identity → api key
//! - `limits` — rate limits (requests, tokens, concurrency) per api key and
//!   per model, shared with the fleet over NATS
//! - `metrics` — `/metrics` counters

pub mod cache;
pub mod config;
pub mod credentials;
pub mod error;
pub mod jwt;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod settings;
pub mod usage;

pub use error::Error;
pub use settings::{Config, Settings};

use config::{ConfigHandle, SnapshotCacheFile, WatchSettings};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Usage events buffered in memory before the publisher takes them.
const USAGE_BUFFER: usize = 65_536;

/// Stands in for a bus when none is configured: events stay in the spool.
struct NoBus;

impl usage::UsageBus for NoBus {
    fn publish<'a>(
        &'a self,
        _: &'a [usage::UsageEvent],
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("no usage bus configured (nats.url)".to_string()) })
    }
}

/// A running data-plane node.
pub struct DataPlane {
    pub proxy_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    config: Arc<ConfigHandle>,
    stop: watch::Sender<bool>,
    tasks: TaskTracker,
    usage_stop: watch::Sender<bool>,
    publisher: tokio::task::JoinHandle<()>,
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

        let (stop, stopped) = watch::channel(false);
        let tasks = TaskTracker::new();

        // Tokenizer tables load in the background: the first limited call
        // should not wait for them.
        tokio::task::spawn_blocking(limits::tokens::warm_up);
        let bus: Arc<dyn usage::UsageBus> = match (&settings.usage_bus, &settings.nats_url) {
            (Some(bus), _) => bus.clone(),
            (None, Some(url)) => {
                let nats = usage::NatsBus::connect(url).await.map_err(Error::Config)?;
                tasks.spawn(limits::run_sync(
                    config.limiter().clone(),
                    nats.client(),
                    settings.node_id.clone(),
                    stopped.clone(),
                ));
                Arc::new(nats)
            }
            (None, None) => {
                warn!(
                    "no nats.url: usage events are spooled to {} until a bus is configured",
                    settings.usage_spool.display()
                );
                Arc::new(NoBus)
            }
        };
        let (usage_tx, usage_rx) = tokio::sync::mpsc::channel(USAGE_BUFFER);
        let recorder = usage::UsageRecorder::new(usage_tx, &settings.node_id, metrics.clone());
        // The publisher stops last, after the proxy drained, so in-flight
        // calls still get their events out.
        let (usage_stop, usage_stopped) = watch::channel(false);
        let publisher = tokio::spawn(usage::run_publisher(
            usage_rx,
            bus,
            usage::Spool::new(&settings.usage_spool),
            metrics.clone(),
            usage_stopped,
        ));

        let upstream = proxy::UpstreamClient::new(&[])?;
        let proxy = Arc::new(proxy::Proxy::new(
            config.clone(),
            upstream,
            settings.max_body_bytes,
            metrics.clone(),
            recorder,
        ));
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
            usage_stop,
            publisher,
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
        self.usage_stop.send_replace(true);
        let _ = self.publisher.await;
    }
}
