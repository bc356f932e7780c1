//! Starts the real `aigw-data-plane` binary on free ports with its own temp
//! dir (config file, logs, snapshot cache), and talks to data planes: health
//! (`/readyz` with the applied version), an OpenAI-API client for the proxy,
//! and checks for the OpenAI error envelope and SSE streams.
//!
//! The same helpers work for the in-process node of a standalone control
//! plane ([`ControlPlane::proxy_url`], [`ControlPlane::data_plane_metrics_url`]).

use crate::control_plane::{merge, ControlPlane};
use crate::process::{binary, free_addr, poll_until, wait_healthy, Process, READY_ATTEMPTS};
use crate::rest::{AdminClient, Resp};
use anyhow::{anyhow, ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

/// Name of the data-plane binary in `target/<profile>/`.
pub const BINARY: &str = "aigw-data-plane";

/// Starts retried when a picked port was taken by someone else meanwhile.
const BIND_RETRIES: u32 = 3;

/// How to start a data plane.
#[derive(Debug, Clone)]
pub struct DataPlaneOptions {
    /// `data_plane.node_id`.
    pub node_id: String,
    /// `data_plane.control_plane_url`, e.g. `http://127.0.0.1:50051`.
    pub control_plane_url: String,
    /// `data_plane.control_plane_urls` (replicas); when set,
    /// `control_plane_url` is left out of the file.
    pub control_plane_urls: Vec<String>,
    /// `nodes.token`; must equal the control plane's.
    pub node_token: String,
    /// Merged over the generated config file, e.g.
    /// `{"data_plane": {"max_body_bytes": 4096}}`.
    pub config: Value,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
}

impl DataPlaneOptions {
    /// A node of `cp` (its gRPC address and node token).
    ///
    /// # Panics
    /// If `cp` was started without a `nodes.token` (standalone).
    pub fn for_control_plane(cp: &ControlPlane, node_id: &str) -> Self {
        Self {
            node_id: node_id.to_string(),
            control_plane_url: cp.grpc_url(),
            control_plane_urls: Vec::new(),
            node_token: cp
                .node_token()
                .expect("the control plane has no nodes.token")
                .to_string(),
            config: json!({}),
            env: Vec::new(),
        }
    }

    pub fn with_config(mut self, patch: Value) -> Self {
        merge(&mut self.config, patch);
        self
    }

    /// A complete config for a node whose files live under `root`, listening
    /// on free loopback ports.
    pub fn render(&self, root: &Path) -> Value {
        let mut cfg = json!({
            "data_plane": {
                "listen": free_addr().to_string(),
                "metrics_listen": free_addr().to_string(),
                "control_plane_url": self.control_plane_url,
                "node_id": self.node_id,
                "snapshot_cache": root.join("snapshot-cache.json"),
            },
            "nodes": { "token": self.node_token },
            "telemetry": { "log_format": "json", "log_level": "info" },
        });
        if !self.control_plane_urls.is_empty() {
            let dp = &mut cfg["data_plane"];
            dp["control_plane_urls"] = json!(self.control_plane_urls);
            if let Some(o) = dp.as_object_mut() {
                o.remove("control_plane_url");
            }
        }
        merge(&mut cfg, self.config.clone());
        cfg
    }
}

/// A running `aigw-data-plane` process, killed on drop.
pub struct DataPlane {
    opts: DataPlaneOptions,
    root: Option<TempDir>,
    config_path: PathBuf,
    process: Option<Process>,
    runs: u32,
    config: Value,
    proxy_addr: SocketAddr,
    metrics_addr: SocketAddr,
}

impl DataPlane {
    /// Starts the node and waits until it is live (`/livez`); it may not be
    /// ready yet (no snapshot). See [`DataPlane::wait_ready`].
    pub async fn start(opts: DataPlaneOptions) -> Result<Self> {
        let root = tempfile::Builder::new().prefix("aigw-dp-").tempdir()?;
        let mut dp = Self {
            config_path: root.path().join("config.yaml"),
            root: Some(root),
            opts,
            process: None,
            runs: 0,
            config: Value::Null,
            proxy_addr: ([127, 0, 0, 1], 0).into(),
            metrics_addr: ([127, 0, 0, 1], 0).into(),
        };
        dp.launch().await?;
        Ok(dp)
    }

    /// Starts the node and waits until it has applied a snapshot.
    pub async fn start_ready(opts: DataPlaneOptions) -> Result<Self> {
        let dp = Self::start(opts).await?;
        dp.wait_ready().await?;
        Ok(dp)
    }

    pub fn node_id(&self) -> &str {
        &self.opts.node_id
    }

    /// The temp dir holding the config file, logs and the snapshot cache.
    pub fn root(&self) -> &Path {
        self.root.as_ref().expect("root dir").path()
    }

    /// `data_plane.snapshot_cache`.
    pub fn snapshot_cache(&self) -> PathBuf {
        self.root().join("snapshot-cache.json")
    }

    /// The config file of the current run, as written.
    pub fn config(&self) -> &Value {
        &self.config
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// `http://<data_plane.listen>`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    /// `http://<data_plane.metrics_listen>`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}", self.metrics_addr)
    }

    /// A proxy client presenting `key`.
    pub fn client(&self, key: Option<&str>) -> ProxyClient {
        ProxyClient::new(&self.proxy_url(), key)
    }

    /// The current run's process, if started.
    pub fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    pub fn logs(&self) -> String {
        self.process.as_ref().map(Process::logs).unwrap_or_default()
    }

    /// `GET /readyz` → (status, applied version when ready).
    pub async fn readyz(&self) -> Result<(u16, Option<u64>)> {
        readyz(&self.metrics_url()).await
    }

    /// Waits until the node has applied a snapshot; returns its version.
    pub async fn wait_ready(&self) -> Result<u64> {
        wait_version(&self.metrics_url(), 0)
            .await
            .map_err(|e| anyhow!("{e:#}\n{}", self.logs()))
    }

    /// Waits until the node has applied version `at_least` or newer.
    pub async fn wait_version(&self, at_least: u64) -> Result<u64> {
        wait_version(&self.metrics_url(), at_least)
            .await
            .map_err(|e| anyhow!("{e:#}\n{}", self.logs()))
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill();
        }
    }

    /// Graceful stop: SIGTERM, then waits (at most ~40 s: the node drains
    /// in-flight calls for up to 30 s, then flushes usage) for the process to
    /// exit; returns its exit status.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let p = self
            .process
            .as_mut()
            .context("the data plane is not started")?;
        p.terminate(2000)
            .await
            .map_err(|e| anyhow!("{e:#}\n{}", p.logs()))
    }

    /// Starts a stopped node again with the very same config file (same
    /// ports, node id and snapshot cache), as a supervisor restarting it
    /// would. Waits only for `/livez`.
    pub async fn start_again(&mut self) -> Result<()> {
        ensure!(!self.is_running(), "the data plane is still running");
        self.launch_with(false).await
    }

    /// Starts again with the same node id and snapshot cache file (new
    /// ports), killing a running process first. Waits only for `/livez`.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.launch().await
    }

    async fn launch(&mut self) -> Result<()> {
        self.launch_with(true).await
    }

    /// `fresh_config`: render a new config (new free ports); otherwise reuse
    /// the current one, falling back to fresh ports if one was taken meanwhile.
    async fn launch_with(&mut self, fresh_config: bool) -> Result<()> {
        let mut fresh = fresh_config;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.launch_once(fresh).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if attempt < BIND_RETRIES
                        && self
                            .process
                            .as_ref()
                            .is_some_and(|p| p.stderr().contains("in use")) =>
                {
                    eprintln!("data plane lost a port race, retrying: {e:#}");
                    fresh = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn launch_once(&mut self, fresh_config: bool) -> Result<()> {
        self.runs += 1;
        let root = self.root().to_path_buf();
        let config = if fresh_config || self.config.is_null() {
            self.opts.render(&root)
        } else {
            self.config.clone()
        };
        let addr = |key: &str| -> Result<SocketAddr> {
            config["data_plane"][key]
                .as_str()
                .ok_or_else(|| anyhow!("data_plane.{key} is not set"))?
                .parse()
                .with_context(|| format!("data_plane.{key}"))
        };
        self.proxy_addr = addr("listen")?;
        self.metrics_addr = addr("metrics_listen")?;
        std::fs::write(&self.config_path, serde_yaml::to_string(&config)?)?;
        self.config = config;

        self.process = None;
        let mut cmd = Command::new(binary(BINARY));
        cmd.arg("--config")
            .arg(&self.config_path)
            .current_dir(&root);
        let label = format!("data-plane-{}-run{}", self.opts.node_id, self.runs);
        self.process = Some(Process::spawn(cmd, &root, &label, &self.opts.env)?);

        let url = format!("{}/livez", self.metrics_url());
        let process = self.process.as_mut().expect("just spawned");
        wait_healthy(process, &url, "the data plane").await
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.process = None;
        if std::thread::panicking() {
            if let Some(root) = self.root.take() {
                eprintln!(
                    "keeping the data plane's files for inspection: {}",
                    root.keep().display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Health and versions
// ---------------------------------------------------------------------------

fn health_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("building the HTTP client")
}

/// `GET <metrics_url>/readyz` → (status, applied version when ready).
pub async fn readyz(metrics_url: &str) -> Result<(u16, Option<u64>)> {
    let r = health_client()
        .get(format!("{metrics_url}/readyz"))
        .send()
        .await
        .context("GET /readyz")?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Ok((status, body["version"].as_u64()))
}

/// Waits (at most ~30 s) until the node behind `metrics_url` is ready with
/// version `at_least` or newer; returns the version.
pub async fn wait_version(metrics_url: &str, at_least: u64) -> Result<u64> {
    let http = health_client();
    let url = format!("{metrics_url}/readyz");
    poll_until(
        &format!("{metrics_url} to apply version {at_least}"),
        READY_ATTEMPTS * 2,
        Duration::from_millis(25),
        || {
            let req = http.get(&url).send();
            async move {
                let Ok(r) = req.await else { return Ok(None) };
                if !r.status().is_success() {
                    return Ok(None);
                }
                let body: Value = r.json().await.unwrap_or(Value::Null);
                Ok(body["version"].as_u64().filter(|v| *v >= at_least))
            }
        },
    )
    .await
}

/// The control plane's config version: the sequence number of its last event.
pub async fn control_plane_version(admin: &AdminClient) -> Result<u64> {
    let events = admin.all_events().await?;
    Ok(events.last().and_then(|e| e["seq"].as_u64()).unwrap_or(0))
}

/// Starts `n` data planes (`node-0`, `node-1`, …) following `cp`, one after
/// the other, with usage events on the NATS server at `nats_url`, and waits
/// until each has applied the control plane's current version.
pub async fn start_fleet(cp: &ControlPlane, nats_url: &str, n: usize) -> Result<Vec<DataPlane>> {
    start_fleet_with_nats(cp, json!({"url": nats_url}), n).await
}

/// [`start_fleet`] with a whole `nats` config section (credentials, TLS).
pub async fn start_fleet_with_nats(
    cp: &ControlPlane,
    nats: Value,
    n: usize,
) -> Result<Vec<DataPlane>> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let opts = DataPlaneOptions::for_control_plane(cp, &format!("node-{i}"))
            .with_config(json!({ "nats": nats.clone() }));
        nodes.push(DataPlane::start_ready(opts).await?);
    }
    let version = control_plane_version(&cp.rest()).await?;
    for dp in &nodes {
        dp.wait_version(version).await?;
    }
    Ok(nodes)
}

/// Waits until the standalone control plane's in-process node has applied
/// everything written so far.
pub async fn wait_standalone_synced(cp: &ControlPlane) -> Result<u64> {
    let v = control_plane_version(&cp.rest()).await?;
    wait_version(&cp.data_plane_metrics_url(), v).await
}

// ---------------------------------------------------------------------------
// The proxy API
// ---------------------------------------------------------------------------

/// An OpenAI-API client for a data plane's proxy. Sends
/// `Authorization: Bearer <key>` when it has a key; the same HTTP client as
/// the admin API's, with proxy calls on top.
#[derive(Clone)]
pub struct ProxyClient {
    inner: AdminClient,
}

impl ProxyClient {
    pub fn new(base: &str, key: Option<&str>) -> Self {
        Self {
            inner: AdminClient::new(base, key),
        }
    }

    /// The same client (sharing connections) with another key, or none.
    pub fn with_key(&self, key: Option<&str>) -> Self {
        Self {
            inner: self.inner.with_key(key),
        }
    }

    pub fn base(&self) -> &str {
        self.inner.base()
    }

    /// A request to `path` (e.g. `/v1/chat/completions`) with the key attached.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.inner.request(method, path)
    }

    /// Sends a request built with [`ProxyClient::request`]; reads it whole.
    pub async fn send(rb: reqwest::RequestBuilder) -> Result<Resp> {
        AdminClient::send(rb).await
    }

    /// POST a JSON body (`content-type: application/json`).
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Resp> {
        AdminClient::send(self.request(Method::POST, path).json(body)).await
    }

    /// `POST /v1/chat/completions`.
    pub async fn chat(&self, body: &Value) -> Result<Resp> {
        self.post_json("/v1/chat/completions", body).await
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<Resp> {
        AdminClient::send(self.request(Method::GET, "/v1/models")).await
    }
}

impl ProxyClient {
    /// Sends `n` chat calls to `alias`, `concurrency` at a time; every one
    /// must succeed. Returns how many each deployment served (from
    /// `x-aigw-served-by`).
    pub async fn served_by_counts(
        &self,
        alias: &str,
        n: usize,
        concurrency: usize,
    ) -> Result<std::collections::HashMap<String, usize>> {
        use futures::StreamExt;
        let results: Vec<Result<String>> = futures::stream::iter(0..n)
            .map(|i| async move {
                let r = self.chat(&chat_body(alias, &format!("call {i}"))).await?;
                ensure!(
                    r.status.as_u16() == 200,
                    "call {i}: {} {}",
                    r.status,
                    r.text
                );
                let served = r.header("x-aigw-served-by").unwrap_or_default();
                Ok(served.rsplit('/').next().unwrap_or_default().to_string())
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut by = std::collections::HashMap::new();
        for r in results {
            *by.entry(r?).or_insert(0) += 1;
        }
        Ok(by)
    }
}

/// A chat request body for `model` with one user message.
pub fn chat_body(model: &str, text: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": text}]
    })
}

/// Asserts an OpenAI error answer: status `status`, an `x-request-id`
/// header, and a body that is exactly `{"error": {"message", "type",
/// "param", "code"}}` (plus `content_filter_result` for content-filter
/// errors) with a non-empty message and the given `code`. Returns the inner
/// `error` object.
pub fn expect_openai_error(resp: &Resp, status: u16, code: &str) -> Result<Value> {
    let err = expect_openai_envelope(resp, status)?;
    ensure!(
        err["code"].as_str() == Some(code),
        "expected code {code:?}: {err}"
    );
    Ok(err)
}

/// Like [`expect_openai_error`] with any string `code`.
pub fn expect_openai_envelope(resp: &Resp, status: u16) -> Result<Value> {
    ensure!(
        resp.status.as_u16() == status,
        "expected HTTP {status}, got {}: {}",
        resp.status,
        resp.text
    );
    let rid = resp.header("x-request-id").unwrap_or_default();
    ensure!(
        !rid.is_empty(),
        "no x-request-id on a {status} answer: {:?}",
        resp.headers
    );
    let ct = resp.header("content-type").unwrap_or_default();
    ensure!(
        ct.starts_with("application/json"),
        "error content-type is {ct:?}"
    );
    let body = resp.json()?;
    let outer = body.as_object().context("error body is not an object")?;
    ensure!(
        outer.len() == 1 && outer.contains_key("error"),
        "error body must hold only `error`: {body}"
    );
    let err = outer["error"]
        .as_object()
        .with_context(|| format!("`error` is not an object: {body}"))?;
    for field in ["message", "type", "param", "code"] {
        ensure!(err.contains_key(field), "error has no `{field}`: {body}");
    }
    for field in err.keys() {
        ensure!(
            ["message", "type", "param", "code", "content_filter_result"].contains(&field.as_str()),
            "unexpected error field `{field}`: {body}"
        );
    }
    let message = err["message"].as_str().unwrap_or_default();
    ensure!(!message.trim().is_empty(), "error message is empty: {body}");
    ensure!(
        err["type"].as_str().is_some_and(|t| !t.is_empty()),
        "error type is not a non-empty string: {body}"
    );
    ensure!(
        err["param"].is_null() || err["param"].is_string(),
        "error param is neither null nor a string: {body}"
    );
    ensure!(
        err["code"].as_str().is_some_and(|c| !c.is_empty()),
        "error code is not a non-empty string: {body}"
    );
    Ok(outer["error"].clone())
}

/// The `data:` payloads of an SSE body, in order (`[DONE]` included).
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}
