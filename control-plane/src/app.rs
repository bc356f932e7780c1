//! Wires the control plane together: event store → engine → admin API served
//! over REST (`control_plane.admin_listen`) and gRPC with reflection
//! (`control_plane.grpc_listen`).

use crate::admin::{self, auth::AdminKeys, Admin};
use crate::config::Config;
use crate::config_stream::{ConfigStreamService, SnapshotCache};
use crate::engine::Engine;
use crate::error::Error;
use crate::metrics::Listeners;
use crate::nodes::NodeRegistry;
use crate::secrets::{Cipher, KeySource};
use crate::store::SledStore;
use aigw_shared::listener::{self, Gate, Protocol};
use aigw_shared::usage_bus::UsageBus;
use futures::FutureExt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// How long open admin and gRPC connections get to finish at shutdown.
const ADMIN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// A running control plane.
pub struct ControlPlane {
    pub admin_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub engine: Arc<Engine>,
    tasks: tokio::task::JoinSet<Result<(), Error>>,
    background: tokio_util::task::TaskTracker,
    stop: watch::Sender<bool>,
    node_token: Option<String>,
    in_process_bus: Option<Arc<crate::usage::InProcessBus>>,
}

impl ControlPlane {
    /// Opens the data dir, replays the log, binds both listeners and starts serving.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let cp = &config.control_plane;
        let (cipher, source) = crate::secrets::load_master_key(
            config.secrets.master_key.as_deref(),
            &cp.data_dir,
            config.embedded_node,
        )?;
        match source {
            KeySource::GeneratedFile(path) => warn!(
                %path,
                "no secrets.master_key configured: generated one (keep this file, or set AIGW_MASTER_KEY)"
            ),
            KeySource::ExistingFile(path) => {
                info!(%path, "using the master key file in the data dir")
            }
            KeySource::Config => {}
        }
        let store = Arc::new(SledStore::open(&cp.data_dir)?);
        let previous = match &config.secrets.previous_master_key {
            Some(text) => Some(Cipher::new(
                &aigw_shared::config::decode_master_key(text)
                    .map_err(|m| Error::Crypto(format!("secrets.previous_master_key: {m}")))?,
            )),
            None => None,
        };
        let (engine, rotating) =
            Engine::open_rotating(store, cipher, previous.clone(), cp.snapshot_every).await?;
        // The log of record in JetStream: in sync before anything reads the state.
        let log = match &cp.replication {
            Some(r) => {
                let log = crate::replication::Log::connect(&config.nats, r).await?;
                engine.replicate(log.clone()).await?;
                Some(log)
            }
            None => None,
        };
        if let (true, Some(previous)) = (rotating, &previous) {
            // Before anything reads a secret (snapshots, nodes).
            let n = match &log {
                Some(log) => crate::replica::rotate_once(&engine, log, previous).await?,
                None => engine.finish_rotation(previous).await?,
            };
            warn!(resealed = n, "master key rotated: every secret is sealed with the new key; remove secrets.previous_master_key");
        }
        if log.is_some() {
            crate::replica::check_master_key(&engine)?;
        }
        let nodes = Arc::new(NodeRegistry::default());
        let usage = crate::usage::Aggregator::open(&cp.data_dir, engine.clone())?;
        let admin = Admin::new(engine.clone(), nodes.clone(), usage.clone());
        let keys = AdminKeys::new(&config.admin.keys);
        // Before any listener answers: /readyz means the data dir is complete.
        let node_token = match &config.nodes.token {
            Some(t) => Some(t.clone()),
            None if config.embedded_node => {
                Some(crate::secrets::load_or_generate_token(&cp.data_dir)?)
            }
            None => {
                info!("no nodes.token: only node credentials issued by POST /admin/v1/nodes open the config stream");
                None
            }
        };

        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("{what} on {addr}: {e}"),
                ))
            })
        };
        let grpc_tls = aigw_shared::tls::grpc_server_config(&cp.grpc_tls)?;
        if grpc_tls.is_none() && !cp.grpc_listen.ip().is_loopback() {
            warn!(grpc_listen = %cp.grpc_listen, "control_plane.grpc_tls.insecure: the config stream, which carries provider secrets, is served without TLS");
        }
        let rest_listener = bind(cp.admin_listen, "control_plane.admin_listen").await?;
        let grpc_listener = bind(cp.grpc_listen, "control_plane.grpc_listen").await?;
        let admin_addr = rest_listener.local_addr()?;
        let grpc_addr = grpc_listener.local_addr()?;

        let (stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();

        // Both listeners' gates show on the admin port's `/metrics`.
        let gates = Listeners {
            admin: Gate::new("admin", &cp.connections),
            grpc: Gate::new("grpc", &cp.connections),
        };
        listener::reserve_open_files(&[&gates.admin, &gates.grpc]);
        let mut router = admin::rest::router(
            admin.clone(),
            keys.clone(),
            cp.max_body_bytes,
            gates.clone(),
            cp.metrics_auth.clone(),
        );
        if config.admin.console.enabled {
            router = router.merge(crate::console::router(
                admin.clone(),
                keys.clone(),
                &config.admin.console,
                cp.max_body_bytes,
            )?);
        }
        tasks.spawn(
            listener::serve(
                rest_listener,
                gates.admin.clone(),
                cp.connections,
                // The peer's address decides who may read /metrics without a token.
                Protocol {
                    tonic_connect_info: true,
                    ..Protocol::default()
                },
                hyper_util::service::TowerToHyperService::new(router),
                stopped.clone(),
                ADMIN_DRAIN,
            )
            .map(Ok),
        );

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(aigw_shared::proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Storage(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(aigw_shared::proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| Error::Storage(format!("reflection: {e}")))?;
        let background = tokio_util::task::TaskTracker::new();
        let cache = SnapshotCache::spawn(
            engine.clone(),
            usage.exceeded(),
            admin.purges(),
            &background,
        )?;
        // Budgets move with spend (on ingest), with config (a raised budget) and with the clock.
        {
            let (usage, mut versions, mut stop) =
                (usage.clone(), engine.subscribe(), stopped.clone());
            background.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        r = versions.changed() => if r.is_err() { break },
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    usage.refresh_budgets();
                }
            });
        }
        // Event ids leave the dedup table once older than its window.
        {
            let (usage, mut stop) = (usage.clone(), stopped.clone());
            background.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    let agg = usage.clone();
                    let now = crate::usage::unix_ms_now();
                    match tokio::task::spawn_blocking(move || agg.prune_seen(now)).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "usage dedup ids pruned"),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "pruning usage dedup ids failed"),
                        Err(e) => tracing::warn!(error = %e, "pruning usage dedup ids failed"),
                    }
                }
            });
        }
        if let Some(log) = &log {
            // Other replicas' writes, applied here and pushed to this replica's nodes.
            background.spawn(crate::replica::follow(
                engine.clone(),
                log.clone(),
                stopped.clone(),
            ));
            // Every node on every replica's /admin/v1/nodes.
            background.spawn(crate::replication::node_status::share(
                log.clone(),
                nodes.clone(),
                stopped.clone(),
            ));
        }
        let in_process_bus = match &config.nats.url {
            Some(_) => {
                // Replicated: every replica its own durable consumer and its
                // own complete aggregates (see usage::consumer).
                let (durable, replicas) = match &log {
                    Some(log) => (
                        format!("aigw-control-plane-{}", log.replica_id()),
                        log.replicas(),
                    ),
                    None => (crate::usage::DURABLE.to_string(), 1),
                };
                background.spawn(crate::usage::run_nats_consumer(
                    config.nats.clone(),
                    usage.clone(),
                    durable,
                    replicas,
                    stopped.clone(),
                ));
                None
            }
            None if config.embedded_node => Some(crate::usage::InProcessBus::start(
                usage.clone(),
                &background,
            )),
            None => {
                warn!("no nats.url: usage events from data planes are not aggregated");
                None
            }
        };
        let config_service = ConfigStreamService::new(
            cache,
            admin.engine().clone(),
            admin.nodes().clone(),
            node_token.clone(),
            cp.grpc_tls.client_ca_file.is_some(),
            background.clone(),
            stopped.clone(),
        );
        // Served by the same accept loop as REST (one set of connection
        // bounds), HTTP/2 only, with tonic's peer address on each request.
        let grpc =
            tonic::service::Routes::new(admin::grpc::service(admin, keys, cp.max_body_bytes))
                .add_service(config_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .prepare();
        tasks.spawn(
            listener::serve(
                grpc_listener,
                gates.grpc.clone(),
                cp.connections,
                Protocol {
                    http2_only: true,
                    tonic_connect_info: true,
                    tls: grpc_tls,
                },
                hyper_util::service::TowerToHyperService::new(grpc),
                stopped.clone(),
                ADMIN_DRAIN,
            )
            .map(Ok),
        );

        let version = engine.read().version;
        info!(%admin_addr, %grpc_addr, version, "control plane ready");

        Ok(Self {
            admin_addr,
            grpc_addr,
            engine,
            tasks,
            background,
            stop,
            node_token,
            in_process_bus,
        })
    }

    /// The token nodes present on the config stream (generated in the data
    /// dir when none is configured), for a node in this process.
    pub fn node_token(&self) -> Option<&str> {
        self.node_token.as_deref()
    }

    /// The bus an in-process node publishes usage to when there is no NATS.
    pub fn in_process_bus(&self) -> Option<Arc<dyn UsageBus>> {
        self.in_process_bus.clone().map(|b| b as Arc<dyn UsageBus>)
    }

    /// Serves until `shutdown` resolves or a server fails, then drains.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let result = tokio::select! {
            _ = shutdown => Ok(()),
            Some(done) = self.tasks.join_next() => match done {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Error::Io(std::io::Error::other(format!("server task: {e}")))),
            },
        };
        info!("shutting down: draining admin connections");
        self.stop.send_replace(true);
        self.background.close();
        // The in-process bus's feeder ends with its last sender.
        self.in_process_bus = None;
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(Err(e)) = done {
                warn!(error = %e, "server stopped with an error");
            }
        }
        self.background.wait().await;
        result
    }
}
