//! Active health probes: each data plane asks every target of a model with
//! `routing.health_check` whether its endpoint is up, on a jittered
//! interval, one probe in flight per target. The verdict lives in the
//! target's [`TargetHealth`] (shared with routing): `unhealthy_after` failed
//! probes in a row take it out of rotation, `healthy_after` good ones bring
//! it back, and a good probe closes a half-open circuit.
//!
//! Alive means the Azure front end answered for the endpoint: any 2xx, or a
//! 404 whose body is Azure's JSON error envelope (`{"error":{"code",
//! "message"}}`, what Azure answers for a path it does not serve).
//! Everything else — connect errors, timeouts, 5xx, 429, other statuses, a
//! 404 from something that is not Azure — is a failed probe.

use super::health::TargetHealth;
use crate::credentials::TokenProvider;
use crate::http_client::{error_chain, HttpClient};
use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, instrument, warn};

/// Largest probe answer read (to tell Azure's 404 from another's).
const MAX_PROBE_BODY: usize = 16 * 1024;

/// The credential a probe may carry.
#[derive(Clone)]
pub enum ProbeAuth {
    ApiKey(HeaderValue),
    Entra(Arc<TokenProvider>),
}

/// One target to probe, as a snapshot compiled it.
#[derive(Clone)]
pub struct ProbeTarget {
    pub provider_key_id: String,
    pub deployment: String,
    /// `{api_base}{path}`.
    pub uri: Uri,
    /// Sent only when the path needs it (under `/openai/`); the status
    /// path takes none.
    pub auth: Option<ProbeAuth>,
    /// The provider key's own client (extra CA), else the node's.
    pub client: Option<HttpClient>,
    pub health: Arc<TargetHealth>,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

impl std::fmt::Debug for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeTarget")
            .field("provider_key_id", &self.provider_key_id)
            .field("deployment", &self.deployment)
            .field("uri", &self.uri)
            .field("credential", &self.auth.is_some())
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl ProbeTarget {
    /// What, when it changes, restarts the target's probe loop.
    fn fingerprint(&self) -> (String, Duration, Duration, u32, u32, bool) {
        (
            self.uri.to_string(),
            self.interval,
            self.timeout,
            self.unhealthy_after,
            self.healthy_after,
            self.auth.is_some(),
        )
    }
}

type Key = (String, String);

struct Running {
    fingerprint: (String, Duration, Duration, u32, u32, bool),
    /// The latest compiled target (credentials, client) for the loop.
    target: watch::Sender<ProbeTarget>,
    cancel: CancellationToken,
    health: Arc<TargetHealth>,
}

/// The node's probe loops, one per probed target, replaced as snapshots
/// change and drained at shutdown.
pub struct Prober {
    http: HttpClient,
    running: Mutex<HashMap<Key, Running>>,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Bumped whenever a target's status changes: the config stream
    /// reports it to the control plane.
    changed: watch::Sender<u64>,
}

impl Prober {
    pub fn new(http: HttpClient) -> Self {
        Self {
            http,
            running: Mutex::default(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            changed: watch::channel(0).0,
        }
    }

    /// Runs exactly `targets`' probes: new ones start, changed ones restart,
    /// the rest stop (and their targets forget the probes' verdict).
    pub fn reconcile(&self, targets: Vec<ProbeTarget>) {
        let mut running = self.lock();
        let mut keep: HashMap<Key, Running> = HashMap::with_capacity(targets.len());
        for t in targets {
            let key = (t.provider_key_id.clone(), t.deployment.clone());
            if keep.contains_key(&key) {
                continue;
            }
            match running.remove(&key) {
                Some(r) if r.fingerprint == t.fingerprint() && !r.cancel.is_cancelled() => {
                    r.target.send_replace(t);
                    keep.insert(key, r);
                }
                old => {
                    if let Some(old) = old {
                        old.cancel.cancel();
                    }
                    keep.insert(key, self.start(t));
                }
            }
        }
        for (_, gone) in running.drain() {
            gone.cancel.cancel();
            if !keep.values().any(|k| Arc::ptr_eq(&k.health, &gone.health)) {
                gone.health.set_probed(None);
            }
        }
        *running = keep;
        drop(running);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn start(&self, t: ProbeTarget) -> Running {
        let cancel = self.stop.child_token();
        // Outside a runtime (a unit test compiling snapshots) nothing runs.
        if tokio::runtime::Handle::try_current().is_ok() {
            t.health.set_probed(Some(t.interval));
        } else {
            cancel.cancel();
        }
        let (tx, rx) = watch::channel(t.clone());
        let running = Running {
            fingerprint: t.fingerprint(),
            target: tx,
            cancel: cancel.clone(),
            health: t.health.clone(),
        };
        if cancel.is_cancelled() {
            return running;
        }
        let (http, changed) = (self.http.clone(), self.changed.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                () = probe_loop(rx, http, changed) => {}
                () = cancel.cancelled() => {}
            }
        });
        running
    }

    /// Each probed target's status, sorted.
    pub fn statuses(&self) -> Vec<(String, String, super::health::ProbeStatus)> {
        let running = self.lock();
        let mut v: Vec<_> = running
            .iter()
            .filter_map(|((pk, dep), r)| Some((pk.clone(), dep.clone(), r.health.probe_status()?)))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    /// Changes whenever a target's status does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Stops every probe loop and waits for them (an in-flight probe is
    /// dropped, not awaited).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Probes one target until cancelled: the first soon (jittered within a
/// tenth of the interval), then every interval ±10%. Sequential, so at most
/// one probe is in flight.
#[instrument(skip_all, fields(provider_key_id = tracing::field::Empty, deployment = tracing::field::Empty))]
async fn probe_loop(
    rx: watch::Receiver<ProbeTarget>,
    http: HttpClient,
    changed: watch::Sender<u64>,
) {
    let first = rx.borrow().clone();
    let span = tracing::Span::current();
    span.record("provider_key_id", first.provider_key_id.as_str());
    span.record("deployment", first.deployment.as_str());
    let mut wait = first
        .interval
        .mul_f64(rand::thread_rng().gen_range(0.0..0.1));
    loop {
        tokio::time::sleep(wait).await;
        let t = rx.borrow().clone();
        let error = probe_once(&t, &http).await.err();
        let now = crate::clock::monotonic_ms();
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let was_healthy = t.health.probe_status().is_none_or(|s| s.healthy);
        if let Some(e) = &error {
            debug!(error = %e, "health probe failed");
        }
        if t.health
            .probe_result(error, t.unhealthy_after, t.healthy_after, now, unix_ms)
        {
            let healthy = t.health.probe_status().is_some_and(|s| s.healthy);
            if healthy != was_healthy {
                if healthy {
                    info!("health probes see the target up: back in rotation");
                } else {
                    warn!("health probes see the target down: out of rotation");
                }
            }
            changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        wait = t.interval.mul_f64(rand::thread_rng().gen_range(0.9..1.1));
    }
}

/// One probe: `Ok` when the endpoint is alive (see the module docs).
async fn probe_once(t: &ProbeTarget, http: &HttpClient) -> Result<(), String> {
    let mut req = http::Request::builder()
        .method(Method::GET)
        .uri(t.uri.clone())
        .header(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("aigw-probe/", env!("CARGO_PKG_VERSION"))),
        )
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("building the probe: {e}"))?;
    match &t.auth {
        None => {}
        Some(ProbeAuth::ApiKey(key)) => {
            req.headers_mut().insert("api-key", key.clone());
        }
        Some(ProbeAuth::Entra(tokens)) => {
            let bearer = tokens
                .bearer()
                .await
                .map_err(|e| format!("no Entra ID token for the probe: {e}"))?;
            req.headers_mut()
                .insert(header::AUTHORIZATION, bearer.header().clone());
        }
    }
    let client = t.client.as_ref().unwrap_or(http);
    let answer = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("probe failed: {}", error_chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = Limited::new(resp.into_body(), MAX_PROBE_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        if status == StatusCode::NOT_FOUND && is_azure_error(&body) {
            return Ok(());
        }
        Err(format!("probe answered HTTP {}", status.as_u16()))
    };
    match tokio::time::timeout(t.timeout, answer).await {
        Ok(r) => r,
        Err(_) => Err(format!("no probe answer within {:?}", t.timeout)),
    }
}

/// Azure's error envelope: `{"error":{"code": …, "message": …}}`.
fn is_azure_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
        v.get("error")
            .is_some_and(|e| e.get("code").is_some() && e.get("message").is_some())
    })
}

/// `last_probe` as RFC 3339 (`None` before the first probe).
pub fn rfc3339_ms(unix_ms: u64) -> Option<String> {
    if unix_ms == 0 {
        return None;
    }
    let at =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000).ok()?;
    at.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_azure_shaped_404s_count_as_alive() {
        assert!(is_azure_error(
            br#"{"error":{"code":"404","message":"Resource not found"}}"#
        ));
        assert!(is_azure_error(
            br#"{"error":{"code":"DeploymentNotFound","message":"..."}}"#
        ));
        for not_azure in [
            &b"<html>404 Not Found</html>"[..],
            b"",
            br#"{"error":"nope"}"#,
            br#"{"message":"Resource not found"}"#,
        ] {
            assert!(!is_azure_error(not_azure));
        }
    }

    fn target(health: &Arc<TargetHealth>, port: u16) -> ProbeTarget {
        ProbeTarget {
            provider_key_id: "pk".into(),
            deployment: "d".into(),
            uri: format!("http://127.0.0.1:{port}/status-0123456789abcdef")
                .parse()
                .unwrap(),
            auth: None,
            client: None,
            health: health.clone(),
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            unhealthy_after: 2,
            healthy_after: 1,
        }
    }

    #[tokio::test]
    async fn a_refused_probe_takes_the_target_out_and_reconcile_stops_it() {
        // A port nothing listens on: connect errors.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let prober = Prober::new(HttpClient::new(&[]).unwrap());
        let health = Arc::new(TargetHealth::default());
        let mut changes = prober.subscribe();
        prober.reconcile(vec![target(&health, port)]);
        assert_eq!(prober.statuses().len(), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while health.probe_status().is_some_and(|s| s.healthy) {
            assert!(tokio::time::Instant::now() < deadline, "never marked down");
            let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
        }
        let status = health.probe_status().unwrap();
        assert!(status.consecutive_failures >= 2 && status.last_error.is_some());
        assert!(matches!(
            health.availability(crate::clock::monotonic_ms()),
            super::super::health::Availability::Until(_)
        ));
        // Same settings again: the loop is kept; none: it stops and forgets.
        prober.reconcile(vec![target(&health, port)]);
        assert!(health.probe_status().is_some());
        prober.reconcile(Vec::new());
        assert_eq!(health.probe_status(), None);
        assert!(prober.statuses().is_empty());
        tokio::time::timeout(Duration::from_secs(5), prober.shutdown())
            .await
            .expect("probe loops drain at shutdown");
    }

    #[test]
    fn last_probe_is_rfc3339() {
        assert_eq!(rfc3339_ms(0), None);
        assert_eq!(
            rfc3339_ms(1_700_000_000_123).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
    }
}
