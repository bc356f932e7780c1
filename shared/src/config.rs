//! Process configuration: one YAML file, then `AIGW__SECTION__KEY` environment
//! overrides, deserialized into the process's own struct with unknown keys
//! rejected, then `validate()`d before anything starts.
//!
//! The sections are defined here, once; each process names the sections it
//! takes in its own [`ProcessConfig`] (control plane, data plane, and the
//! standalone binary, whose file is the union of the two).

use crate::domain::{is_loopback_host, HumanDuration};
use crate::error::Error;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Prefix of environment overrides: `AIGW__CONTROL_PLANE__DATA_DIR=/var/lib/aigw`.
pub const ENV_PREFIX: &str = "AIGW__";
/// Environment variable that may carry `secrets.master_key`.
pub const MASTER_KEY_ENV: &str = "AIGW_MASTER_KEY";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer keys accepted by the admin API.
    pub keys: Vec<String>,
    /// The web console on the admin listener (`/console/`).
    pub console: ConsoleConfig,
}

/// The admin console: pages served by the control plane under `/console/`,
/// signed in with an admin key or through OpenID Connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub enabled: bool,
    /// A console session ends this long after sign-in.
    pub session_ttl: HumanDuration,
    /// Base URL of a data plane for the playground (standalone: its own node).
    pub playground_url: Option<String>,
    /// Single sign-on (authorization code + PKCE) against an OpenID issuer.
    pub oidc: Option<ConsoleOidc>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            session_ttl: HumanDuration(std::time::Duration::from_secs(8 * 3600)),
            playground_url: None,
            oidc: None,
        }
    }
}

/// The console's OpenID Connect client. Roles come from one claim of the ID
/// token: a value in `admin_values` makes an admin, one in `viewer_values` a
/// viewer (reads only); anyone else is refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleOidc {
    /// `iss`; its `/.well-known/openid-configuration` is read at sign-in.
    pub issuer: String,
    pub client_id: String,
    /// For a confidential client; PKCE alone for a public one.
    pub client_secret: Option<String>,
    /// `https://<console host>/console/oidc/callback`, as registered at the issuer.
    pub redirect_url: String,
    pub scopes: Vec<String>,
    /// A string or list-of-strings claim (Entra ID app roles: `roles`).
    pub role_claim: String,
    pub admin_values: Vec<String>,
    pub viewer_values: Vec<String>,
    /// The claim naming the person in the audit log's `actor`
    /// (`sub` when absent from the token).
    pub identity_claim: String,
}

impl Default for ConsoleOidc {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            client_id: String::new(),
            client_secret: None,
            redirect_url: String::new(),
            scopes: vec!["openid".into(), "profile".into(), "email".into()],
            role_claim: "roles".into(),
            admin_values: Vec::new(),
            viewer_values: Vec::new(),
            identity_claim: "preferred_username".into(),
        }
    }
}

impl ConsoleConfig {
    pub fn validate(&self) -> Result<(), Error> {
        let ttl = self.session_ttl.0;
        if ttl < std::time::Duration::from_secs(60)
            || ttl > std::time::Duration::from_secs(7 * 86400)
        {
            return Err(invalid(
                "admin.console.session_ttl",
                "between 1 minute and 7 days",
            ));
        }
        if let Some(u) = &self.playground_url {
            let ok = url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
            if !ok {
                return Err(invalid(
                    "admin.console.playground_url",
                    "expected an http(s) URL of a data plane",
                ));
            }
        }
        let Some(o) = &self.oidc else { return Ok(()) };
        crate::domain::check_endpoint("issuer", &o.issuer)
            .map_err(|e| invalid("admin.console.oidc.issuer", e.to_string()))?;
        crate::domain::check_endpoint("redirect_url", &o.redirect_url)
            .map_err(|e| invalid("admin.console.oidc.redirect_url", e.to_string()))?;
        if !o
            .redirect_url
            .trim_end_matches('/')
            .ends_with("/console/oidc/callback")
        {
            return Err(invalid(
                "admin.console.oidc.redirect_url",
                "must end with /console/oidc/callback",
            ));
        }
        if o.client_id.trim().is_empty() {
            return Err(invalid("admin.console.oidc.client_id", "must not be empty"));
        }
        if !o.scopes.iter().any(|s| s == "openid") {
            return Err(invalid(
                "admin.console.oidc.scopes",
                "must include `openid`",
            ));
        }
        if o.role_claim.trim().is_empty() {
            return Err(invalid(
                "admin.console.oidc.role_claim",
                "must not be empty",
            ));
        }
        if o.admin_values.is_empty() && o.viewer_values.is_empty() {
            return Err(invalid(
                "admin.console.oidc.admin_values",
                "list the role claim values of admins (admin_values) or viewers (viewer_values)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// 32 bytes, base64. Falls back to `AIGW_MASTER_KEY`.
    pub master_key: Option<String>,
    /// The master key being rotated away from: at start, secrets still
    /// sealed with it are sealed again with `master_key`; then it can go.
    pub previous_master_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Write a compacted state snapshot every this many events.
    pub snapshot_every: u64,
    /// Largest admin request body accepted.
    pub max_body_bytes: usize,
    /// Bounds on the admin REST and gRPC listeners (each its own cap).
    pub connections: ConnectionsConfig,
    /// TLS on the gRPC listener (admin API and the config stream, which
    /// carries provider secrets).
    pub grpc_tls: GrpcServerTls,
    /// Who may read the admin port's `/metrics` (admin keys always may).
    pub metrics_auth: MetricsAuth,
    /// Several replicas over one log of record in NATS JetStream (the `nats`
    /// section's server); absent: this process's sled directory is the log.
    pub replication: Option<ReplicationConfig>,
}

/// `control_plane.replication`: the event log of record is a JetStream
/// stream; every replica keeps a local copy in sled and serves reads and
/// writes. All replicas share `secrets.master_key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// The stream holding the admin event log.
    pub stream: String,
    /// JetStream replicas of the stream and buckets (3 for a fault-tolerant
    /// cluster; 1 on a single server).
    pub replicas: usize,
    /// This replica's name, unique in the fleet: its usage consumer and its
    /// messages are named after it. Defaults to the host name.
    pub replica_id: Option<String>,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            stream: "AIGW_EVENTS".into(),
            replicas: 3,
            replica_id: None,
        }
    }
}

impl ReplicationConfig {
    /// The configured replica id, else the host name.
    pub fn replica_id(&self) -> String {
        let id = self
            .replica_id
            .clone()
            .unwrap_or_else(crate::node::hostname);
        // Host names may hold dots; consumer and key names may not.
        id.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    }

    fn validate(&self) -> Result<(), Error> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !name_ok(&self.stream) {
            return Err(invalid(
                "control_plane.replication.stream",
                "1 to 64 letters, digits, `-` or `_`",
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(invalid(
                "control_plane.replication.replicas",
                "between 1 and 5 (3 tolerates one server down)",
            ));
        }
        if let Some(id) = &self.replica_id {
            if !name_ok(id) {
                return Err(invalid(
                    "control_plane.replication.replica_id",
                    "1 to 64 letters, digits, `-` or `_`",
                ));
            }
        }
        Ok(())
    }
}

/// The control plane's gRPC TLS. Without a certificate the listener speaks
/// plaintext, which is refused on a non-loopback address unless `insecure`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcServerTls {
    /// PEM certificate chain and private key.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Mutual TLS: every client presents a certificate signed by this CA
    /// (PEM), and a data plane may only claim a node id its certificate is
    /// valid for (a DNS name in its subject alternative names).
    pub client_ca_file: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address anyway (logged as a warning).
    pub insecure: bool,
}

/// How a data plane reaches the control plane's gRPC listener.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcClientTls {
    /// PEM CA the control plane's certificate must chain to (system roots
    /// otherwise); with an `https://` control_plane_url.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name to verify in the server certificate, when it differs from the URL's host.
    pub domain: Option<String>,
    /// Use an `http://` URL to a non-loopback host anyway (logged as a warning).
    pub insecure: bool,
}

/// Who may read `/metrics` (it names aliases, key ids and cost). With a
/// token, every scrape presents it (`Authorization: Bearer …`; Prometheus:
/// `authorization: {credentials: …}`); without one, only this machine may
/// scrape unless `public` says the network is trusted.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsAuth {
    pub token: Option<String>,
    pub public: bool,
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsAuth")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("public", &self.public)
            .finish()
    }
}

impl MetricsAuth {
    /// Whether a scrape from `peer` with this `Authorization` header may read.
    pub fn allows(&self, peer: Option<std::net::IpAddr>, authorization: Option<&str>) -> bool {
        use sha2::{Digest, Sha256};
        match &self.token {
            // Compared as digests, so the time taken says nothing of the token.
            Some(token) => authorization
                .and_then(|h| h.strip_prefix("Bearer "))
                .is_some_and(|t| Sha256::digest(t.trim()) == Sha256::digest(token.as_str())),
            None => self.public || peer.is_some_and(|p| p.is_loopback()),
        }
    }

    /// [`MetricsAuth::allows`] for a request served by `listener::serve`
    /// with connect info on (the peer address is on its extensions).
    pub fn allows_request<B>(&self, req: &http::Request<B>) -> bool {
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr)
            .map(|a| a.ip());
        let authorization = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.allows(peer, authorization)
    }

    fn validate(&self, key: &str) -> Result<(), Error> {
        if self.token.as_deref().is_some_and(|t| t.trim().len() < 16) {
            return Err(invalid(key, "a metrics token has at least 16 characters"));
        }
        Ok(())
    }
}

/// Secrets that appear in shipped files and docs (local-only defaults and
/// placeholders): refused on any listener beyond loopback, where anyone who
/// read the repository could use them.
pub const WELL_KNOWN_SECRETS: &[&str] = &[
    "admin-local-only-change-me",
    "compose-node-token-change-me",
    "change-me",
    "unused-on-data-planes",
    "REPLACE-ME-admin-key",
    "REPLACE-ME-node-token",
];

/// Refuses a well-known secret at `key` when `listen` is reachable from
/// other machines.
pub fn refuse_well_known(key: &str, secret: &str, listen: SocketAddr) -> Result<(), Error> {
    if !listen.ip().is_loopback() && WELL_KNOWN_SECRETS.contains(&secret.trim()) {
        return Err(invalid(
            key,
            format!(
                "{secret:?} is a published default; set your own (e.g. `openssl rand -hex 32`) \
                 before listening on {listen}"
            ),
        ));
    }
    Ok(())
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            grpc_listen: ([127, 0, 0, 1], 50051).into(),
            admin_listen: ([127, 0, 0, 1], 3001).into(),
            snapshot_every: 10_000,
            max_body_bytes: 1024 * 1024,
            connections: ConnectionsConfig::default(),
            grpc_tls: GrpcServerTls::default(),
            metrics_auth: MetricsAuth::default(),
            replication: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// The control plane's config stream (one URL; a DNS name may resolve to
    /// several replicas). Default `http://127.0.0.1:50051`.
    pub control_plane_url: Option<String>,
    /// Several control-plane replicas, tried in turn: on loss of one the node
    /// moves to the next. Set this or `control_plane_url`, not both.
    pub control_plane_urls: Vec<String>,
    /// Defaults to the host name.
    pub node_id: Option<String>,
    pub snapshot_cache: PathBuf,
    /// Usage events wait here while the bus (NATS) is unreachable; defaults
    /// to `usage-spool.bin` beside the snapshot cache.
    pub usage_spool: Option<PathBuf>,
    pub max_body_bytes: usize,
    /// Bounds on the proxy and metrics listeners (each its own cap).
    pub connections: ConnectionsConfig,
    /// TLS to the control plane (`https://` control_plane_url).
    pub control_plane_tls: GrpcClientTls,
    /// Largest config snapshot this node accepts from the stream.
    pub max_snapshot_bytes: usize,
    /// Who may read `/metrics` on `metrics_listen` (`/livez` and `/readyz`
    /// stay open for probes).
    pub metrics_auth: MetricsAuth,
}

/// Default [`DataPlaneConfig::max_snapshot_bytes`]: far above a large
/// fleet's configuration (20 MiB holds thousands of keys and hundreds of
/// models with long prompts), bounded so a broken stream cannot make a node
/// allocate without limit.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: usize = 256 * 1024 * 1024;

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 3000).into(),
            metrics_listen: ([0, 0, 0, 0], 9090).into(),
            control_plane_url: None,
            control_plane_urls: Vec::new(),
            node_id: None,
            snapshot_cache: PathBuf::from("./data/snapshot-cache.json"),
            usage_spool: None,
            max_body_bytes: 32 * 1024 * 1024,
            connections: ConnectionsConfig::default(),
            control_plane_tls: GrpcClientTls::default(),
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            metrics_auth: MetricsAuth::default(),
        }
    }
}

/// What one client may hold on a listener: every listener of a plane gets
/// these bounds, each with its own connection cap, so a flood on one port
/// leaves the others answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// Open connections per listener. At the cap, a new connection closes
    /// the longest-idle one (no request in flight); when every connection
    /// has a request in flight, new ones wait in the kernel's backlog.
    pub max_per_listener: usize,
    /// Time a client has to send a request's complete headers: counted from
    /// accept for the first request, and on HTTP/1.1 from the end of the
    /// previous response (hyper's header timer also bounds keep-alive waits).
    pub header_read_timeout: HumanDuration,
    /// An HTTP/2 connection (or one that already served a request) with no
    /// request in flight for this long is closed (GOAWAY on HTTP/2).
    pub idle_timeout: HumanDuration,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Largest request head (request line and headers) on HTTP/1.1 and
    /// largest header list on HTTP/2.
    pub max_header_bytes: u32,
}

/// Bounds of [`ConnectionsConfig`]: below them a listener is unusable,
/// above them the bound protects nothing.
pub const MAX_PER_LISTENER: std::ops::RangeInclusive<usize> = 1..=1_000_000;
pub const HEADER_READ_TIMEOUT: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(600);
pub const IDLE_TIMEOUT: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(3600);
pub const HTTP2_MAX_CONCURRENT_STREAMS: std::ops::RangeInclusive<u32> = 1..=10_000;
/// hyper refuses an HTTP/1.1 read buffer under 8 KiB.
pub const MAX_HEADER_BYTES: std::ops::RangeInclusive<u32> = 8192..=1024 * 1024;

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            max_per_listener: 10_000,
            header_read_timeout: HumanDuration(std::time::Duration::from_secs(10)),
            idle_timeout: HumanDuration(std::time::Duration::from_secs(60)),
            http2_max_concurrent_streams: 128,
            max_header_bytes: 64 * 1024,
        }
    }
}

impl ConnectionsConfig {
    /// `section`: where the block sits (`data_plane`, `control_plane`), for
    /// the error's key.
    pub fn validate(&self, section: &str) -> Result<(), Error> {
        fn check<T: PartialOrd + std::fmt::Debug>(
            section: &str,
            key: &str,
            value: T,
            range: std::ops::RangeInclusive<T>,
            show: impl Fn(&T) -> String,
        ) -> Result<(), Error> {
            if range.contains(&value) {
                return Ok(());
            }
            Err(invalid(
                &format!("{section}.connections.{key}"),
                format!(
                    "must be between {} and {}, got {}",
                    show(range.start()),
                    show(range.end()),
                    show(&value)
                ),
            ))
        }
        let n = |v: &usize| v.to_string();
        let d = |v: &std::time::Duration| HumanDuration(*v).to_string();
        let u = |v: &u32| v.to_string();
        check(
            section,
            "max_per_listener",
            self.max_per_listener,
            MAX_PER_LISTENER,
            n,
        )?;
        check(
            section,
            "header_read_timeout",
            self.header_read_timeout.0,
            HEADER_READ_TIMEOUT,
            d,
        )?;
        check(
            section,
            "idle_timeout",
            self.idle_timeout.0,
            IDLE_TIMEOUT,
            d,
        )?;
        check(
            section,
            "http2_max_concurrent_streams",
            self.http2_max_concurrent_streams,
            HTTP2_MAX_CONCURRENT_STREAMS,
            u,
        )?;
        check(
            section,
            "max_header_bytes",
            self.max_header_bytes,
            MAX_HEADER_BYTES,
            u,
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// Data plane: the credential it presents on the config stream, its own
    /// (`POST /admin/v1/nodes`) or the shared token. Control plane: the shared
    /// token; without one only node credentials are accepted.
    pub token: Option<String>,
}

/// The NATS connection both planes use (usage events, rate-limit sync).
/// At most one way to authenticate; see `nats::connect`.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: Option<String>,
    /// User and password (both or neither).
    pub user: Option<String>,
    pub password: Option<String>,
    /// A server token.
    pub token: Option<String>,
    /// An NKey seed (`SU…`).
    pub nkey_seed: Option<String>,
    /// A `.creds` file (user JWT and NKey seed), as `nsc` writes them.
    pub creds_file: Option<PathBuf>,
    pub tls: NatsTlsConfig,
}

/// Secrets stay out of `Debug` output (config dumps, panics, logs).
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| o.as_ref().map(|_| "<set>");
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &set(&self.password))
            .field("token", &set(&self.token))
            .field("nkey_seed", &set(&self.nkey_seed))
            .field("creds_file", &self.creds_file)
            .field("tls", &self.tls)
            .finish()
    }
}

/// TLS to NATS: on when `ca_file` is set or the URL is `tls://`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTlsConfig {
    /// PEM CA bundle the server's certificate must chain to (system roots otherwise).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub otlp_endpoint: Option<String>,
    pub sample_ratio: f64,
    /// `json` (default) or `text`.
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info,aigw_control_plane=debug`.
    pub log_level: String,
    /// Longest an access-log line waits to be written with the lines after
    /// it (nginx's `access_log ... flush=`); 0 writes each line at once.
    /// Other log lines never wait.
    pub access_log_flush_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            log_format: LogFormat::Json,
            log_level: "info".into(),
            access_log_flush_ms: 25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

/// A top-level key a process no longer takes, with the one line that says
/// what to do instead (e.g. `admin` on a data plane).
#[derive(Debug, Clone, Copy)]
pub struct Retired {
    pub key: &'static str,
    pub instead: &'static str,
}

/// A process's configuration file: one serde struct with unknown keys
/// rejected, checked by [`ProcessConfig::validate`] before anything starts.
pub trait ProcessConfig: DeserializeOwned {
    /// Top-level keys that belong to another process, each with its hint.
    const RETIRED: &'static [Retired] = &[];

    /// Cross-field rules serde cannot express.
    fn validate(&self) -> Result<(), Error>;

    /// Reads `path` (if given), applies environment overrides from `env`,
    /// deserializes and validates.
    fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let config: Self = load(path, env, Self::RETIRED)?;
        config.validate()?;
        Ok(config)
    }
}

/// Reads `path` (if given), applies environment overrides from `env`, and
/// deserializes into `T`; a key listed in `retired` is refused with its hint.
/// Validation is the caller's (see [`ProcessConfig::load`]).
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    retired: &[Retired],
) -> Result<T, Error> {
    let root = read_file(path)?;
    let overrides = env_overrides(env)?;
    // Env values are YAML scalars (so `true`, `8080`, `[a, b]` work), except
    // where the target is a string: those paths are retried as plain text.
    let mut as_text: Vec<bool> = vec![false; overrides.len()];
    loop {
        let mut doc = root.clone();
        for ((path, raw), text) in overrides.iter().zip(&as_text) {
            let value = if *text {
                Value::String(raw.clone())
            } else {
                serde_yaml::from_str(raw).unwrap_or_else(|_| Value::String(raw.clone()))
            };
            set_path(&mut doc, path, value).map_err(|message| Error::ConfigInvalid {
                key: path.join("."),
                message,
            })?;
        }
        if let Some(r) = retired
            .iter()
            .find(|r| doc.as_mapping().is_some_and(|m| m.contains_key(r.key)))
        {
            return Err(Error::ConfigInvalid {
                key: r.key.into(),
                message: r.instead.into(),
            });
        }
        match serde_path_to_error::deserialize::<_, T>(doc) {
            Ok(cfg) => return Ok(cfg),
            Err(err) => {
                let key = err.path().to_string();
                let retry = overrides
                    .iter()
                    .zip(as_text.iter_mut())
                    .find(|((p, raw), text)| {
                        !**text
                            && p.join(".") == key
                            && !matches!(serde_yaml::from_str::<Value>(raw), Ok(Value::String(_)))
                    });
                if let Some((_, text)) = retry {
                    *text = true;
                    continue;
                }
                return Err(Error::ConfigInvalid {
                    key: if key == "." { "config".into() } else { key },
                    message: err.into_inner().to_string(),
                });
            }
        }
    }
}

fn read_file(path: Option<&Path>) -> Result<Value, Error> {
    let Some(p) = path else {
        return Ok(Value::Mapping(Mapping::new()));
    };
    let text = std::fs::read_to_string(p).map_err(|e| Error::ConfigRead {
        path: p.display().to_string(),
        source: e,
    })?;
    if text.trim().is_empty() {
        return Ok(Value::Mapping(Mapping::new()));
    }
    let root: Value = serde_yaml::from_str(&text).map_err(|e| Error::ConfigSyntax {
        path: p.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(if root.is_null() {
        Value::Mapping(Mapping::new())
    } else {
        root
    })
}

/// `AIGW__SECTION__KEY=value` (and `AIGW_MASTER_KEY`) as key paths.
fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(Vec<String>, String)>, Error> {
    let mut overrides = Vec::new();
    for (name, raw) in env {
        if name == MASTER_KEY_ENV {
            overrides.push((vec!["secrets".into(), "master_key".into()], raw));
            continue;
        }
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            return Err(Error::ConfigInvalid {
                key: name,
                message: "malformed environment override".into(),
            });
        }
        overrides.push((path, raw));
    }
    Ok(overrides)
}

pub(crate) fn invalid(key: &str, message: impl Into<String>) -> Error {
    Error::ConfigInvalid {
        key: key.into(),
        message: message.into(),
    }
}

impl AdminConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.keys.is_empty() {
            return Err(invalid("admin.keys", "list at least one admin key"));
        }
        if self.keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("admin.keys", "admin keys must not be empty"));
        }
        self.console.validate()
    }
}

impl SecretsConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(k) = &self.master_key {
            decode_master_key(k).map_err(|m| invalid("secrets.master_key", &m))?;
        }
        if let Some(k) = &self.previous_master_key {
            decode_master_key(k).map_err(|m| invalid("secrets.previous_master_key", &m))?;
            if self.master_key.is_none() {
                return Err(invalid(
                    "secrets.previous_master_key",
                    "rotating needs the new key in secrets.master_key (or AIGW_MASTER_KEY)",
                ));
            }
        }
        Ok(())
    }
}

impl ControlPlaneConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.snapshot_every == 0 {
            return Err(invalid(
                "control_plane.snapshot_every",
                "must be at least 1",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(invalid(
                "control_plane.max_body_bytes",
                "must be at least 1",
            ));
        }
        self.grpc_tls.validate(self.grpc_listen)?;
        self.metrics_auth
            .validate("control_plane.metrics_auth.token")?;
        if let Some(r) = &self.replication {
            r.validate()?;
        }
        self.connections.validate("control_plane")
    }
}

impl GrpcServerTls {
    fn validate(&self, listen: SocketAddr) -> Result<(), Error> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(invalid(
                "control_plane.grpc_tls.key_file",
                "cert_file and key_file go together",
            ));
        }
        if self.client_ca_file.is_some() && self.cert_file.is_none() {
            return Err(invalid(
                "control_plane.grpc_tls.client_ca_file",
                "mutual TLS needs the server's own cert_file and key_file",
            ));
        }
        if self.cert_file.is_none() && !listen.ip().is_loopback() && !self.insecure {
            return Err(invalid(
                "control_plane.grpc_tls",
                "the config stream carries provider secrets: on a non-loopback grpc_listen \
                 set grpc_tls.cert_file and key_file, or grpc_tls.insecure: true for a \
                 trusted network",
            ));
        }
        Ok(())
    }
}

/// Default [`DataPlaneConfig::control_plane_url`].
pub const DEFAULT_CONTROL_PLANE_URL: &str = "http://127.0.0.1:50051";

impl DataPlaneConfig {
    /// The control-plane URLs to try, in order.
    pub fn control_plane_urls(&self) -> Vec<String> {
        match &self.control_plane_url {
            _ if !self.control_plane_urls.is_empty() => self.control_plane_urls.clone(),
            Some(url) => vec![url.clone()],
            None => vec![DEFAULT_CONTROL_PLANE_URL.to_string()],
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        if self.max_body_bytes == 0 {
            return Err(invalid("data_plane.max_body_bytes", "must be at least 1"));
        }
        let key = if self.control_plane_urls.is_empty() {
            "data_plane.control_plane_url"
        } else {
            "data_plane.control_plane_urls"
        };
        if self.control_plane_url.is_some() && !self.control_plane_urls.is_empty() {
            return Err(invalid(
                key,
                "set control_plane_url (one) or control_plane_urls (several), not both",
            ));
        }
        if self.control_plane_urls.len() > MAX_CONTROL_PLANE_URLS {
            return Err(invalid(
                key,
                format!("at most {MAX_CONTROL_PLANE_URLS} URLs"),
            ));
        }
        let urls = self.control_plane_urls();
        for url in &urls {
            self.validate_control_plane_url(key, url)?;
        }
        if self.max_snapshot_bytes < 64 * 1024 {
            return Err(invalid(
                "data_plane.max_snapshot_bytes",
                "must be at least 65536",
            ));
        }
        self.metrics_auth
            .validate("data_plane.metrics_auth.token")?;
        let tls = &self.control_plane_tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(invalid(
                "data_plane.control_plane_tls.key_file",
                "cert_file and key_file go together",
            ));
        }
        let any_tls = urls.iter().any(|u| u.starts_with("https://"));
        if !any_tls && (tls.ca_file.is_some() || tls.cert_file.is_some()) {
            return Err(invalid(
                "data_plane.control_plane_tls",
                format!(
                    "TLS settings need an https:// {}",
                    &key["data_plane.".len()..]
                ),
            ));
        }
        self.connections.validate("data_plane")
    }

    fn validate_control_plane_url(&self, key: &str, url: &str) -> Result<(), Error> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(key, format!("{url:?} must be an http(s) URL")));
        }
        if url.starts_with("http://") {
            let loopback = url::Url::parse(url)
                .ok()
                .is_some_and(|u| u.host().is_some_and(is_loopback_host));
            if !loopback && !self.control_plane_tls.insecure {
                return Err(invalid(
                    key,
                    "plaintext to a control plane on another host would carry provider \
                     secrets in clear: use https:// (with control_plane_tls.ca_file for a \
                     private CA), or set control_plane_tls.insecure: true for a trusted network",
                ));
            }
        }
        Ok(())
    }
}

/// Bound on [`DataPlaneConfig::control_plane_urls`]: replicas, not a scan list.
const MAX_CONTROL_PLANE_URLS: usize = 16;

impl NodesConfig {
    /// `required`: data planes present the token, so only a process that
    /// generates its own (standalone) may go without one.
    pub fn validate(&self, required: bool) -> Result<(), Error> {
        match &self.token {
            Some(t) if t.trim().is_empty() => Err(invalid("nodes.token", "must not be empty")),
            None if required => Err(invalid(
                "nodes.token",
                "required unless standalone: data planes present it on the config stream",
            )),
            _ => Ok(()),
        }
    }
}

impl NatsConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(url) = &self.url {
            let ok = url.split(',').all(|u| {
                let u = u.trim();
                ["nats://", "tls://", "ws://", "wss://"]
                    .iter()
                    .any(|p| u.starts_with(p))
                    || (!u.is_empty() && !u.contains("://"))
            });
            if !ok {
                return Err(invalid(
                    "nats.url",
                    "must be nats://, tls://, ws:// or wss:// URLs, comma-separated",
                ));
            }
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid(
                "nats.password",
                "nats.user and nats.password go together",
            ));
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.creds_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(invalid(
                "nats",
                "set one of user/password, token, nkey_seed or creds_file",
            ));
        }
        for (key, v) in [
            ("nats.password", &self.password),
            ("nats.token", &self.token),
            ("nats.nkey_seed", &self.nkey_seed),
        ] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(invalid(
                "nats.tls.key_file",
                "nats.tls.cert_file and nats.tls.key_file go together",
            ));
        }
        Ok(())
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        if self.access_log_flush_ms > 60_000 {
            return Err(invalid(
                "telemetry.access_log_flush_ms",
                "must be at most 60000 (a minute)",
            ));
        }
        Ok(())
    }
}

/// Decodes a base64 master key that must be exactly 32 bytes.
pub fn decode_master_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not valid base64: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("must decode to 32 bytes, got {}", b.len()))
}

fn set_path(doc: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = doc;
    for seg in parents {
        let map = cur
            .as_mapping_mut()
            .ok_or_else(|| format!("`{seg}` is not a section"))?;
        cur = map
            .entry(Value::String(seg.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if cur.is_null() {
            *cur = Value::Mapping(Mapping::new());
        }
    }
    let map = cur.as_mapping_mut().ok_or("parent is not a section")?;
    map.insert(Value::String(last.clone()), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section, as the standalone binary takes them.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Union {
        standalone: bool,
        admin: AdminConfig,
        secrets: SecretsConfig,
        control_plane: ControlPlaneConfig,
        data_plane: DataPlaneConfig,
        nodes: NodesConfig,
        nats: NatsConfig,
        telemetry: TelemetryConfig,
    }

    impl ProcessConfig for Union {
        fn validate(&self) -> Result<(), Error> {
            self.admin.validate()?;
            self.secrets.validate()?;
            self.control_plane.validate()?;
            self.data_plane.validate()?;
            self.nodes.validate(!self.standalone)?;
            self.telemetry.validate()
        }
    }

    /// Only the data plane's sections, with `admin` retired.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Node {
        data_plane: DataPlaneConfig,
        nodes: NodesConfig,
    }

    impl ProcessConfig for Node {
        const RETIRED: &'static [Retired] = &[Retired {
            key: "admin",
            instead: "a data plane takes no admin keys; remove this section",
        }];
        fn validate(&self) -> Result<(), Error> {
            self.data_plane.validate()?;
            self.nodes.validate(true)
        }
    }

    fn write(yaml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, yaml).unwrap();
        (dir, file)
    }

    fn load<T: ProcessConfig>(yaml: &str, env: &[(&str, &str)]) -> Result<T, Error> {
        let (_dir, file) = write(yaml);
        super::load(
            Some(&file),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            T::RETIRED,
        )
    }

    #[test]
    fn metrics_need_the_token_or_a_local_peer() {
        let local = Some(std::net::IpAddr::from([127, 0, 0, 1]));
        let remote = Some(std::net::IpAddr::from([10, 1, 2, 3]));
        let default = MetricsAuth::default();
        assert!(default.allows(local, None));
        assert!(!default.allows(remote, None));
        assert!(!default.allows(None, None));
        let public = MetricsAuth {
            token: None,
            public: true,
        };
        assert!(public.allows(remote, None));
        let token = MetricsAuth {
            token: Some("scrape-0123456789abcdef".into()),
            public: false,
        };
        assert!(token.allows(remote, Some("Bearer scrape-0123456789abcdef")));
        assert!(!token.allows(local, None));
        assert!(!token.allows(remote, Some("Bearer wrong")));
        assert!(!token.allows(remote, Some("scrape-0123456789abcdef")));
    }

    #[test]
    fn defaults_fill_missing_sections() {
        let cfg: Union = load("admin:\n  keys: [k]\nstandalone: true\n", &[]).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.control_plane.admin_listen.port(), 3001);
        assert_eq!(cfg.control_plane.grpc_listen.port(), 50051);
        assert_eq!(cfg.data_plane.listen.port(), 3000);
        assert_eq!(cfg.data_plane.max_body_bytes, 32 * 1024 * 1024);
    }

    #[test]
    fn connection_bounds_are_validated_with_their_key() {
        let cfg: Union = load(
            "admin: {keys: [k]}\nstandalone: true\ndata_plane:\n  connections:\n    max_per_listener: 512\n    header_read_timeout: 750ms\n",
            &[("AIGW__CONTROL_PLANE__CONNECTIONS__IDLE_TIMEOUT", "5s")],
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.data_plane.connections.max_per_listener, 512);
        assert_eq!(
            cfg.data_plane.connections.header_read_timeout.0,
            std::time::Duration::from_millis(750)
        );
        // Unset keys keep their production defaults.
        assert_eq!(cfg.data_plane.connections.max_header_bytes, 64 * 1024);
        assert_eq!(
            cfg.control_plane.connections.idle_timeout.0,
            std::time::Duration::from_secs(5)
        );
        for (yaml, key) in [
            (
                "data_plane: {connections: {max_per_listener: 0}}",
                "data_plane.connections.max_per_listener",
            ),
            (
                "data_plane: {connections: {header_read_timeout: 0s}}",
                "data_plane.connections.header_read_timeout",
            ),
            (
                "control_plane: {connections: {idle_timeout: 300000000000years}}",
                "control_plane.connections.idle_timeout",
            ),
            (
                "control_plane: {connections: {http2_max_concurrent_streams: 0}}",
                "control_plane.connections.http2_max_concurrent_streams",
            ),
            (
                "data_plane: {connections: {max_header_bytes: 100}}",
                "data_plane.connections.max_header_bytes",
            ),
        ] {
            let err = load::<Union>(
                &format!("admin: {{keys: [k]}}\nstandalone: true\n{yaml}\n"),
                &[],
            )
            .and_then(|c| c.validate().map(|_| c))
            .unwrap_err()
            .to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
        let err = load::<Union>("data_plane: {connections: {max_conections: 5}}\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load::<Union>("admin:\n  kyes: [k]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin") && err.contains("kyes"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = load::<Union>("control_plane:\n  admin_listen: nope\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("control_plane.admin_listen"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let cfg: Union = load(
            "admin:\n  keys: [k]\nnodes:\n  token: fromfile\n",
            &[
                ("AIGW__CONTROL_PLANE__ADMIN_LISTEN", "127.0.0.1:4001"),
                ("AIGW__STANDALONE", "true"),
                ("AIGW__NODES__TOKEN", "12345"),
                ("AIGW__ADMIN__KEYS", "[a, b]"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.control_plane.admin_listen.port(), 4001);
        assert!(cfg.standalone);
        // A numeric-looking value for a string key stays text.
        assert_eq!(cfg.nodes.token.as_deref(), Some("12345"));
        assert_eq!(cfg.admin.keys, vec!["a", "b"]);
    }

    #[test]
    fn env_unknown_key_is_rejected() {
        let err = load::<Union>("admin:\n  keys: [k]\n", &[("AIGW__ADMIN__NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn validate_rejects_bad_master_key_and_missing_admin_keys() {
        let cfg: Union = load("standalone: true\n", &[]).unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("admin.keys"));
        let cfg: Union = load(
            "standalone: true\nadmin: {keys: [k]}\nsecrets: {master_key: c2hvcnQ=}\n",
            &[],
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("secrets.master_key") && err.contains("32 bytes"),
            "{err}"
        );
    }

    #[test]
    fn token_required_without_standalone() {
        let cfg: Union = load("admin: {keys: [k]}\n", &[]).unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("nodes.token"));
    }

    #[test]
    fn a_process_takes_only_its_sections() {
        let (_dir, file) = write("nodes: {token: t}\n");
        let node = Node::load(Some(&file), Vec::new()).unwrap();
        assert_eq!(node.nodes.token.as_deref(), Some("t"));

        // A retired section, from the file or the environment, gets its hint.
        for (yaml, env) in [
            ("nodes: {token: t}\nadmin: {keys: [k]}\n", vec![]),
            (
                "nodes: {token: t}\n",
                vec![("AIGW__ADMIN__KEYS".to_string(), "[k]".to_string())],
            ),
        ] {
            let (_dir, file) = write(yaml);
            let err = Node::load(Some(&file), env).unwrap_err().to_string();
            assert_eq!(
                err,
                "config: admin: a data plane takes no admin keys; remove this section"
            );
        }
        // Any other foreign section is an unknown key.
        let (_dir, file) = write("nodes: {token: t}\ncontrol_plane: {}\n");
        let err = Node::load(Some(&file), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("control_plane"), "{err}");
    }
}

#[cfg(test)]
mod control_plane_url_tests {
    use super::*;

    fn key_of(dp: &DataPlaneConfig) -> String {
        match dp.validate() {
            Err(Error::ConfigInvalid { key, message }) => format!("{key}: {message}"),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn one_url_or_a_list_of_replicas_each_checked() {
        let mut dp = DataPlaneConfig::default();
        assert_eq!(dp.control_plane_urls(), vec![DEFAULT_CONTROL_PLANE_URL]);
        dp.control_plane_urls = vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()];
        assert!(dp.validate().is_ok());
        assert_eq!(dp.control_plane_urls().len(), 2);

        dp.control_plane_url = Some("http://127.0.0.1:3".into());
        assert!(key_of(&dp).contains("not both"), "{}", key_of(&dp));

        dp.control_plane_url = None;
        dp.control_plane_urls = vec!["http://127.0.0.1:1".into(), "ftp://x".into()];
        let err = key_of(&dp);
        assert!(
            err.starts_with("data_plane.control_plane_urls:") && err.contains("ftp://x"),
            "{err}"
        );

        dp.control_plane_urls = vec!["http://10.0.0.7:50051".into()];
        assert!(key_of(&dp).contains("plaintext"), "{}", key_of(&dp));
        dp.control_plane_tls.insecure = true;
        assert!(dp.validate().is_ok());

        dp.control_plane_urls = (0..17).map(|i| format!("http://127.0.0.1:{i}")).collect();
        assert!(key_of(&dp).contains("at most 16"), "{}", key_of(&dp));
    }
}
