//! The data plane's process configuration: the sections of the config file a
//! node takes ([`Config`]), and what it resolves to at start ([`Settings`]).

use crate::error::Error;
use crate::usage::UsageBus;
use aigw_shared::config::{
    ConnectionsConfig, DataPlaneConfig, NatsConfig, NodesConfig, ProcessConfig, Retired,
    TelemetryConfig,
};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A data-plane node's config file. The control plane's sections are refused
/// with a hint: a node has no use for admin keys or the event log.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_plane: DataPlaneConfig,
    pub nodes: NodesConfig,
    pub nats: NatsConfig,
    pub telemetry: TelemetryConfig,
}

impl ProcessConfig for Config {
    const RETIRED: &'static [Retired] = &[
        Retired {
            key: "admin",
            instead: "a data plane takes no admin keys (they belong to the control plane); remove this section",
        },
        Retired {
            key: "secrets",
            instead: "a data plane holds no master key (it belongs to the control plane); remove this section",
        },
        Retired {
            key: "control_plane",
            instead: "a data plane finds the control plane at data_plane.control_plane_url; remove this section",
        },
        Retired {
            key: "standalone",
            instead: "standalone mode is the `aigw` binary (control plane and one node in one process); remove this key",
        },
    ];

    fn validate(&self) -> Result<(), aigw_shared::Error> {
        self.data_plane.validate()?;
        self.nodes.validate(true)?;
        self.nats.validate()?;
        self.telemetry.validate()
    }
}

impl Config {
    /// The node id: configured, or the host name.
    pub fn node_id(&self) -> String {
        self.data_plane
            .node_id
            .clone()
            .unwrap_or_else(aigw_shared::node::hostname)
    }
}

/// What a data-plane node needs to run.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// Control-plane replicas, tried in turn.
    pub control_plane_urls: Vec<String>,
    pub control_plane_tls: aigw_shared::config::GrpcClientTls,
    pub max_snapshot_bytes: usize,
    pub metrics_auth: aigw_shared::config::MetricsAuth,
    pub node_id: String,
    pub token: String,
    pub snapshot_cache: PathBuf,
    pub max_body_bytes: usize,
    /// Bounds on the proxy and metrics listeners.
    pub connections: ConnectionsConfig,
    /// How long in-flight calls may take to finish at shutdown.
    pub drain: Duration,
    /// NATS for usage events (JetStream) and rate-limit sync, when `nats.url` is set.
    pub nats: Option<NatsConfig>,
    pub usage_spool: PathBuf,
    /// An in-process usage bus (standalone), used instead of NATS.
    pub usage_bus: Option<Arc<dyn UsageBus>>,
}

impl Settings {
    /// `token`: the node token, from `nodes.token` or (standalone) handed
    /// over by the control plane in the same process.
    pub fn new(cfg: &Config, token: Option<String>) -> Result<Self, Error> {
        let token = token.or_else(|| cfg.nodes.token.clone()).ok_or_else(|| {
            Error::Config("nodes.token: required to join the control plane".into())
        })?;
        let dp = &cfg.data_plane;
        Ok(Self {
            listen: dp.listen,
            metrics_listen: dp.metrics_listen,
            control_plane_urls: dp.control_plane_urls(),
            control_plane_tls: dp.control_plane_tls.clone(),
            max_snapshot_bytes: dp.max_snapshot_bytes,
            metrics_auth: dp.metrics_auth.clone(),
            node_id: cfg.node_id(),
            token,
            snapshot_cache: dp.snapshot_cache.clone(),
            max_body_bytes: dp.max_body_bytes,
            connections: dp.connections,
            drain: Duration::from_secs(30),
            nats: cfg.nats.url.is_some().then(|| cfg.nats.clone()),
            usage_spool: dp
                .usage_spool
                .clone()
                .unwrap_or_else(|| dp.snapshot_cache.with_file_name("usage-spool.bin")),
            usage_bus: None,
        })
    }
}
