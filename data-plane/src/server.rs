//! Accept loops for the proxy and the health/metrics listener, with graceful
//! drain: on stop, no new connections; in-flight calls get `drain` to finish.

use crate::config::ConfigHandle;
use crate::node::Services;
use crate::proxy::{full, Proxy};
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    handler: F,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    what: &'static str,
) where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<crate::proxy::ProxyBody>> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        warn!(error = %e, "{what}: accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = crate::shutdown::stopped(&mut stop) => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => info!("{what}: all connections drained"),
        _ = tokio::time::sleep(drain) => warn!("{what}: drain limit reached; closing the remaining connections"),
    }
}

pub async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    stop: watch::Receiver<bool>,
    drain: Duration,
) {
    accept_loop(
        listener,
        move |req| {
            let proxy = proxy.clone();
            async move { proxy.serve(req).await }
        },
        stop,
        drain,
        "proxy",
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
    config: Arc<ConfigHandle>,
    services: Arc<Services>,
    stop: watch::Receiver<bool>,
) {
    accept_loop(
        listener,
        move |req: http::Request<hyper::body::Incoming>| {
            let (config, services) = (config.clone(), services.clone());
            async move {
                let (status, ctype, body) = match req.uri().path() {
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
                            + &services.limiter.render_metrics(),
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
                r
            }
        },
        stop,
        Duration::from_secs(1),
        "health",
    )
    .await
}
