//! Starts the real `aigw-control-plane` binary (or, standalone, the `aigw`
//! binary: control plane plus one node) on free ports with its own data dir,
//! waits until it is ready, and can kill -9 and restart it.

use crate::grpc::{self, AdminGrpc};
use crate::process::{binary, free_addr, wait_healthy, Process};
use crate::rest::AdminClient;
use anyhow::{anyhow, Context, Result};
use base64::Engine as _;
use rand::RngCore;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use tempfile::TempDir;

/// Name of the control-plane binary in `target/<profile>/`.
pub const BINARY: &str = "aigw-control-plane";
/// Name of the standalone binary (control plane and one data plane).
pub const STANDALONE_BINARY: &str = "aigw";

/// Starts retried when a picked port was taken by someone else meanwhile.
const BIND_RETRIES: u32 = 3;

/// A fresh random token, e.g. for admin keys.
pub fn random_token(prefix: &str) -> String {
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

/// A fresh 32-byte master key, base64.
pub fn random_master_key() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// How to start a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run the standalone `aigw` binary (then no node token or master key
    /// is required, and the file has a `data_plane` section).
    pub standalone: bool,
    pub admin_keys: Vec<String>,
    /// `secrets.master_key`; `None` leaves it out of the file.
    pub master_key: Option<String>,
    /// `nodes.token`; `None` leaves it out of the file.
    pub node_token: Option<String>,
    /// Merged over the generated config file (objects key by key; any other
    /// value replaces), e.g. `{"control_plane": {"snapshot_every": 50}}`.
    pub config: Value,
    /// Extra environment for the process (`AIGW__…` overrides and the like).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments after `--config FILE`.
    pub args: Vec<String>,
    /// `RLIMIT_NOFILE` (soft, hard) for the process, set by `prlimit`: a
    /// test can then exhaust the binary's descriptors without exhausting
    /// its own.
    pub max_open_files: Option<(u64, u64)>,
}

impl Default for Options {
    /// Not standalone: random admin key, master key and node token.
    fn default() -> Self {
        Self {
            standalone: false,
            admin_keys: vec![random_token("admin")],
            master_key: Some(random_master_key()),
            node_token: Some(random_token("node")),
            config: json!({}),
            env: Vec::new(),
            args: Vec::new(),
            max_open_files: None,
        }
    }
}

impl Options {
    /// `standalone: true` with no master key (one is generated in the data dir).
    pub fn standalone() -> Self {
        Self {
            standalone: true,
            master_key: None,
            node_token: None,
            ..Self::default()
        }
    }

    pub fn with_config(mut self, patch: Value) -> Self {
        merge(&mut self.config, patch);
        self
    }

    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A complete, valid config for a process whose files live under `root`
    /// (data in `root/data`), listening on free loopback ports.
    pub fn render(&self, root: &Path) -> Value {
        let data_dir = root.join("data");
        let grpc = free_addr();
        let mut cfg = json!({
            "admin": { "keys": self.admin_keys },
            "control_plane": {
                "data_dir": data_dir,
                "admin_listen": free_addr().to_string(),
                "grpc_listen": grpc.to_string(),
            },
            "telemetry": { "log_format": "json", "log_level": "info" },
        });
        if self.standalone {
            // The in-process node; never the default public ports.
            cfg["data_plane"] = json!({
                "listen": free_addr().to_string(),
                "metrics_listen": free_addr().to_string(),
                "control_plane_url": format!("http://{grpc}"),
                "snapshot_cache": root.join("snapshot-cache.json"),
            });
        }
        if let Some(k) = &self.master_key {
            cfg["secrets"] = json!({ "master_key": k });
        }
        if let Some(t) = &self.node_token {
            cfg["nodes"] = json!({ "token": t });
        }
        merge(&mut cfg, self.config.clone());
        cfg
    }
}

/// Deep-merges `patch` into `base`: objects key by key, anything else replaces.
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// What a process that was expected to exit printed.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the control-plane binary with `config_yaml` (written to a temp file)
/// and `env`, and waits for it to exit. Fails if it is still running after
/// ~20 s (it was expected to reject its configuration).
pub async fn run_until_exit(
    config_yaml: &str,
    args: &[&str],
    env: &[(String, String)],
) -> Result<Exited> {
    run_binary_until_exit(BINARY, config_yaml, args, env).await
}

/// [`run_until_exit`] for any workspace binary (`aigw`, `aigw-data-plane`).
pub async fn run_binary_until_exit(
    name: &str,
    config_yaml: &str,
    args: &[&str],
    env: &[(String, String)],
) -> Result<Exited> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config_yaml)?;
    let mut cmd = Command::new(binary(name));
    cmd.arg("--config")
        .arg(&path)
        .args(args)
        .current_dir(dir.path());
    let mut p = Process::spawn(cmd, dir.path(), "control-plane", env)?;
    let status = p.wait_exit(1000).await?;
    Ok(Exited {
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
    })
}

/// A running control plane, killed on drop.
pub struct ControlPlane {
    opts: Options,
    root: Option<TempDir>,
    config_path: PathBuf,
    process: Option<Process>,
    runs: u32,
    config: Value,
    admin_addr: SocketAddr,
    grpc_addr: SocketAddr,
}

impl ControlPlane {
    /// Starts with [`Options::default`].
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Result<Self> {
        let root = tempfile::Builder::new().prefix("aigw-cp-").tempdir()?;
        let mut cp = Self {
            config_path: root.path().join("config.yaml"),
            root: Some(root),
            opts,
            process: None,
            runs: 0,
            config: Value::Null,
            admin_addr: ([127, 0, 0, 1], 0).into(),
            grpc_addr: ([127, 0, 0, 1], 0).into(),
        };
        cp.launch().await?;
        Ok(cp)
    }

    /// The temp dir holding the config file, logs and `data/`.
    pub fn root(&self) -> &Path {
        self.root.as_ref().expect("root dir").path()
    }

    /// `control_plane.data_dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.root().join("data")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The first configured admin key.
    pub fn admin_key(&self) -> &str {
        &self.opts.admin_keys[0]
    }

    /// The config file of the current run, as written.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The options this control plane was started with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// `nodes.token` as configured, if any (standalone generates its own).
    pub fn node_token(&self) -> Option<&str> {
        self.opts.node_token.as_deref()
    }

    /// `http://<data_plane.listen>`: the proxy of the in-process data plane
    /// (standalone only).
    pub fn proxy_url(&self) -> String {
        format!(
            "http://{}",
            self.config["data_plane"]["listen"]
                .as_str()
                .unwrap_or_default()
        )
    }

    /// `http://<data_plane.metrics_listen>`: health and metrics of the
    /// in-process data plane (standalone only).
    pub fn data_plane_metrics_url(&self) -> String {
        format!(
            "http://{}",
            self.config["data_plane"]["metrics_listen"]
                .as_str()
                .unwrap_or_default()
        )
    }

    /// Options used by the next [`ControlPlane::restart`].
    pub fn options_mut(&mut self) -> &mut Options {
        &mut self.opts
    }

    /// A REST client authenticated with the admin key.
    pub fn rest(&self) -> AdminClient {
        AdminClient::new(&self.admin_url(), Some(self.admin_key()))
    }

    /// A gRPC `AdminService` client sending `authorization: Bearer <admin key>`.
    pub async fn grpc_admin(&self) -> Result<AdminGrpc> {
        grpc::admin_client(&self.grpc_url(), Some(self.admin_key())).await
    }

    /// The current run's process, if started.
    pub fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }

    pub fn process_mut(&mut self) -> Option<&mut Process> {
        self.process.as_mut()
    }

    pub fn stdout(&self) -> String {
        self.process
            .as_ref()
            .map(Process::stdout)
            .unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        self.process
            .as_ref()
            .map(Process::stderr)
            .unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    /// SIGKILL, then reap: the process gets no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill();
        }
    }

    /// Starts again on the same data dir (new ports), killing a running
    /// process first. Fails, with its output, if it does not become ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.launch().await
    }

    async fn launch(&mut self) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.launch_once().await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < BIND_RETRIES && self.stderr().contains("in use") => {
                    eprintln!("control plane lost a port race, retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn launch_once(&mut self) -> Result<()> {
        self.runs += 1;
        let root = self.root().to_path_buf();
        let config = self.opts.render(&root);
        let addr = |key: &str| -> Result<SocketAddr> {
            config["control_plane"][key]
                .as_str()
                .ok_or_else(|| anyhow!("control_plane.{key} is not set"))?
                .parse()
                .with_context(|| format!("control_plane.{key}"))
        };
        self.admin_addr = addr("admin_listen")?;
        self.grpc_addr = addr("grpc_listen")?;
        std::fs::write(&self.config_path, serde_yaml::to_string(&config)?)?;
        self.config = config;

        // Drop (and so kill) the previous run's process before starting anew.
        self.process = None;
        let name = if self.opts.standalone {
            STANDALONE_BINARY
        } else {
            BINARY
        };
        let mut cmd = match self.opts.max_open_files {
            Some((soft, hard)) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={soft}:{hard}"))
                    .arg("--")
                    .arg(binary(name));
                cmd
            }
            None => Command::new(binary(name)),
        };
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(&self.opts.args)
            .current_dir(&root);
        let label = format!("control-plane-run{}", self.runs);
        self.process = Some(Process::spawn(cmd, &root, &label, &self.opts.env)?);

        let url = format!("{}/readyz", self.admin_url());
        let process = self.process.as_mut().expect("just spawned");
        wait_healthy(process, &url, "the control plane").await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Kill first (this also prints the logs into the captured test output).
        self.process = None;
        if std::thread::panicking() {
            if let Some(root) = self.root.take() {
                eprintln!(
                    "keeping the control plane's files for inspection: {}",
                    root.keep().display()
                );
            }
        }
    }
}
