//! aigw data plane: a stateless node that applies config snapshots from the
//! control plane and proxies OpenAI-API calls to Azure OpenAI.
//!
//! Where things live:
//! - `config/` — snapshots: compile (`runtime`), stream from the control plane
//!   (`watch`), the last one on disk (`snapshot_file`), and the lock-free
//!   `ConfigHandle` holding the compiled snapshot
//! - `node`    — the node's long-lived services (limiter, JWKS, target health,
//!   credentials, response caches, HTTP client) and applying snapshots to them
//! - `proxy/`  — the request pipeline (its order is documented in `proxy/mod.rs`),
//!   one `Call` object per call
//! - `openai/` — the OpenAI / Azure wire format: the operation table, request
//!   fields, answer and chunk types, Azure's filter annotations
//! - `server`  — accept loops and graceful drain
//! - `caller`  — an api key as the hot path checks it
//! - `cache/`  — the response cache (the only "cache" in this crate besides
//!   token and key caches named for what they hold)
//! - `routing/` — target health and picking a target per attempt
//! - `clock`   — wall-clock Unix milliseconds vs process-monotonic milliseconds
//! - `credentials` — Entra ID tokens for the upstream, cached across snapshots
//! - `jwt` — caller JWTs (Entra ID / OIDC): issuers' keys cached across
//!   snapshots, token verification, identity → api key
//! - `limits` — rate limits (requests, tokens, concurrency) per api key and
//!   per model, shared with the fleet over NATS
//! - `metrics` — `/metrics` counters
//! - `response_ids` — Responses API ids sealed with their provider key and
//!   caller, so any node routes a follow-up to the resource that stored it

pub mod cache;
pub mod caller;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod error;
pub mod http_client;
pub mod jwt;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod openai;
pub mod proxy;
pub mod response_ids;
pub mod routing;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod usage;

pub use error::Error;
pub use settings::{Config, Settings};

use config::{ConfigHandle, SnapshotFile, WatchSettings};
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
    services: Arc<node::Services>,
}

impl DataPlane {
    /// Binds both listeners, boots from the snapshot file if there is one,
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
        let services = Arc::new(node::Services::new(metrics.clone())?);
        let config = Arc::new(ConfigHandle::default());
        let node = Arc::new(node::Node {
            services: services.clone(),
            config: config.clone(),
        });
        let snapshot_file = Arc::new(SnapshotFile::new(&settings.snapshot_cache, &settings.token));
        let node_key = config::watch::NodeKey::new(&settings.token, &settings.node_id);
        config::watch::boot_from_file(&*node, &snapshot_file, &node_key);

        let (stop, stopped) = watch::channel(false);
        let tasks = TaskTracker::new();

        let bus: Arc<dyn usage::UsageBus> = match (&settings.usage_bus, &settings.nats) {
            (Some(bus), _) => bus.clone(),
            (None, Some(nats)) => {
                let nats = usage::NatsBus::connect(nats).await?;
                tasks.spawn(limits::run_sync(
                    services.limiter.clone(),
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

        let proxy = Arc::new(proxy::Proxy::new(
            config.clone(),
            services.clone(),
            settings.max_body_bytes,
            recorder,
        ));
        tasks.spawn(config::watch_control_plane(
            WatchSettings {
                control_plane_urls: settings.control_plane_urls.clone(),
                node_id: settings.node_id.clone(),
                token: settings.token.clone(),
                address: proxy_addr.to_string(),
                tls: settings.control_plane_tls.clone(),
                max_snapshot_bytes: settings.max_snapshot_bytes,
            },
            node,
            snapshot_file,
            stopped.clone(),
        ));
        let gates = server::Gates::new(&settings.connections);
        aigw_shared::listener::reserve_open_files(&[&gates.proxy, &gates.metrics]);
        tasks.spawn(server::serve_proxy(
            proxy_listener,
            gates.proxy.clone(),
            settings.connections,
            proxy,
            stopped.clone(),
            settings.drain,
        ));
        tasks.spawn(server::serve_health(
            health_listener,
            gates,
            settings.connections,
            settings.metrics_auth.clone(),
            config.clone(),
            services.clone(),
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
            services,
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
        self.services.probes.shutdown().await;
        self.tasks.wait().await;
        self.usage_stop.send_replace(true);
        let _ = self.publisher.await;
    }
}
