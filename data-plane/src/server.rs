//! The proxy and the health/metrics listener, each behind the shared
//! listener bounds (connection cap, header and idle timeouts, HTTP/2 limits),
//! with graceful drain: on stop, no new connections; in-flight calls get
//! `drain` to finish.

use crate::config::ConfigHandle;
use crate::node::Services;
use crate::proxy::{full, Proxy};
use aigw_shared::config::{ConnectionsConfig, MetricsAuth};
use aigw_shared::listener::{self, Gate, Protocol};
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::service::service_fn;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The node's two listeners' gates, for `/metrics`.
#[derive(Clone)]
pub struct Gates {
    pub proxy: Arc<Gate>,
    pub metrics: Arc<Gate>,
}

impl Gates {
    pub fn new(config: &ConnectionsConfig) -> Self {
        Self {
            proxy: Gate::new("proxy", config),
            metrics: Gate::new("metrics", config),
        }
    }
}

pub async fn serve_proxy(
    listener: TcpListener,
    gate: Arc<Gate>,
    connections: ConnectionsConfig,
    proxy: Arc<Proxy>,
    stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.serve(req).await) }
    });
    listener::serve(
        listener,
        gate,
        connections,
        Protocol::default(),
        svc,
        stop,
        drain,
    )
    .await
}

/// `/readyz`: ready once a snapshot is applied, and not while the node has
/// been unable to apply the control plane's newer ones for too long.
fn readyz(config: &ConfigHandle) -> (StatusCode, &'static str, String) {
    use crate::config::{Readiness, MAX_TIME_BEHIND, MAX_VERSIONS_BEHIND};
    let json = "application/json";
    match config.readiness(
        std::time::Instant::now(),
        MAX_VERSIONS_BEHIND,
        MAX_TIME_BEHIND,
    ) {
        Readiness::Ready { version } => (
            StatusCode::OK,
            json,
            format!(r#"{{"status":"ready","version":{version}}}"#),
        ),
        Readiness::Waiting => (
            StatusCode::SERVICE_UNAVAILABLE,
            json,
            r#"{"status":"waiting for a config snapshot"}"#.to_string(),
        ),
        Readiness::Stale {
            version,
            offered,
            secs,
            reason,
        } => (
            StatusCode::SERVICE_UNAVAILABLE,
            json,
            serde_json::json!({
                "status": "behind the control plane",
                "version": version,
                "offered_version": offered,
                "seconds_behind": secs,
                "last_error": reason,
            })
            .to_string(),
        ),
    }
}

/// `/livez`, `/readyz` (ready once a snapshot is applied) and `/metrics`.
pub async fn serve_health(
    listener: TcpListener,
    gates: Gates,
    connections: ConnectionsConfig,
    metrics_auth: MetricsAuth,
    config: Arc<ConfigHandle>,
    services: Arc<Services>,
    stop: watch::Receiver<bool>,
) {
    let gate = gates.metrics.clone();
    let metrics_auth = Arc::new(metrics_auth);
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (config, services, gates) = (config.clone(), services.clone(), gates.clone());
        let metrics_auth = metrics_auth.clone();
        async move {
            let (status, ctype, body) = match req.uri().path() {
                "/metrics" if !metrics_auth.allows_request(&req) => (
                    StatusCode::UNAUTHORIZED,
                    "application/json",
                    r#"{"error":"/metrics needs data_plane.metrics_auth.token as a bearer token (or a scrape from this machine)"}"#.to_string(),
                ),
                "/livez" => (
                    StatusCode::OK,
                    "application/json",
                    r#"{"status":"ok"}"#.to_string(),
                ),
                "/readyz" => readyz(&config),
                "/metrics" => (
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    services.metrics.render(config.version(), config.is_ready())
                        + &config.render_metrics()
                        + &services.health.render_metrics()
                        + &services.limiter.render_metrics()
                        + &listener::render_metrics(&[&gates.proxy, &gates.metrics]),
                ),
                _ => (
                    StatusCode::NOT_FOUND,
                    "application/json",
                    r#"{"error":"not found"}"#.to_string(),
                ),
            };
            let mut r = Response::new(full(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
            Ok::<_, Infallible>(r)
        }
    });
    listener::serve(
        listener,
        gate,
        connections,
        // The peer's address decides who may read /metrics without a token.
        Protocol {
            tonic_connect_info: true,
            ..Protocol::default()
        },
        svc,
        stop,
        Duration::from_secs(1),
    )
    .await
}
