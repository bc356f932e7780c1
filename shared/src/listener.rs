//! One accept loop for every listener (proxy, metrics, admin REST, gRPC), so
//! one unauthenticated client cannot take a port, or the process's file
//! descriptors, for itself: a cap on open connections per listener, a
//! header-read timeout, an idle timeout, and HTTP/2 stream and header limits
//! ([`ConnectionsConfig`]).
//!
//! At the cap the loop closes the connection that has been idle longest (no
//! request in flight: a socket that sent nothing, partial headers, or a
//! kept-alive connection between requests) to make room, so a flood of idle
//! sockets cannot lock a real caller out; if every connection has a request
//! in flight, new connections wait in the kernel's backlog. Each time the cap
//! is met it is counted (`aigw_listener_limit_reached_total`) and logged at
//! most once per [`LOG_EVERY`].

use crate::config::ConnectionsConfig;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::fmt::Write;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tracing::{info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The cap-reached warning is logged at most this often per listener; the
/// counter has every occurrence.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a connection closed for idling may take to say goodbye (GOAWAY)
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// At the cap with nothing evictable, how often to look again.
const EVICT_RETRY: Duration = Duration::from_millis(50);
/// HTTP/2 pings find dead peers (long gRPC streams, pooled clients).
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);

/// Descriptors kept for everything but client sockets: upstream and NATS
/// connections, files, the runtime.
pub const FD_RESERVE: u64 = 1024;
/// The caps of every listener reserved in this process so far (standalone
/// runs both planes' listeners in one process).
static CAPS_RESERVED: AtomicU64 = AtomicU64::new(0);

/// Makes the process's open-file limit hold `gates`' caps (on top of those
/// reserved before) plus [`FD_RESERVE`]: raises the soft limit toward the
/// hard one when it is lower, and warns when even the hard limit cannot —
/// then a flood could exhaust descriptors before any cap is met.
pub fn reserve_open_files(gates: &[&Gate]) {
    let add: u64 = gates
        .iter()
        .map(|g| u64::try_from(g.max).unwrap_or(u64::MAX))
        .fold(0, u64::saturating_add);
    let caps = CAPS_RESERVED.fetch_add(add, Relaxed).saturating_add(add);
    let want = caps.saturating_add(FD_RESERVE);
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        // `None` is unlimited.
        let soft = limit.current.unwrap_or(u64::MAX);
        if soft >= want {
            return;
        }
        let raised = want.min(limit.maximum.unwrap_or(u64::MAX));
        let soft = if raised > soft
            && setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(raised),
                    maximum: limit.maximum,
                },
            )
            .is_ok()
        {
            info!(
                from = soft,
                to = raised,
                "raised the open-file limit to hold the listeners' connection caps"
            );
            raised
        } else {
            soft
        };
        if soft < want {
            warn!(
                open_file_limit = soft,
                connection_caps = caps,
                reserve = FD_RESERVE,
                "the open-file limit cannot hold every listener's connection cap: lower \
                 connections.max_per_listener or raise the limit (ulimit -n, LimitNOFILE)"
            );
        }
    }
}

/// One listener's connection cap and counters. Create it before serving and
/// keep it for `/metrics` ([`render_metrics`]).
pub struct Gate {
    name: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    epoch: Instant,
    limit_reached: AtomicU64,
    evicted: AtomicU64,
    timed_out: AtomicU64,
    accept_errors: AtomicU64,
    limit_log: Throttle,
    accept_log: Throttle,
}

/// At most one log line per [`LOG_EVERY`]; the rest are counted.
#[derive(Default)]
struct Throttle {
    /// Milliseconds since the gate's epoch of the last line, plus one (0: never).
    last_ms: AtomicU64,
    skipped: AtomicU64,
}

impl Throttle {
    /// `Some(lines skipped since the last one)` when a line is due now.
    fn due(&self, now_ms: u64) -> Option<u64> {
        let now = now_ms.saturating_add(1);
        let last = self.last_ms.load(Relaxed);
        let every = u64::try_from(LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        if (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.skipped.swap(0, Relaxed));
        }
        self.skipped.fetch_add(1, Relaxed);
        None
    }
}

/// One connection's state, shared by its task, its requests and the gate.
struct Conn {
    in_flight: AtomicUsize,
    served: AtomicBool,
    /// Milliseconds since the gate's epoch when the connection last had no
    /// request in flight (accept time at first).
    idle_since_ms: AtomicU64,
    evicting: AtomicBool,
    evict: Notify,
}

impl Gate {
    /// `name`: the listener's label in metrics and logs (`proxy`, `admin`).
    pub fn new(name: &'static str, config: &ConnectionsConfig) -> Arc<Self> {
        let max = config.max_per_listener.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            name,
            max,
            permits: Arc::new(Semaphore::new(max)),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
            limit_reached: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            limit_log: Throttle::default(),
            accept_log: Throttle::default(),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }

    /// Times a new connection found the listener full.
    pub fn limit_reached(&self) -> u64 {
        self.limit_reached.load(Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch
            .checked_add(Duration::from_millis(ms))
            .unwrap_or(self.epoch)
    }

    fn register(&self) -> (u64, Arc<Conn>) {
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
        });
        let id = self.next_id.fetch_add(1, Relaxed);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn.clone());
        (id, conn)
    }

    fn unregister(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// The cap is met: count it, warn (throttled), and ask the longest-idle
    /// connection to close.
    fn make_room(&self) {
        self.limit_reached.fetch_add(1, Relaxed);
        self.log_limit_reached();
        self.evict_idle();
    }

    /// Asks the longest-idle connection to close; false when every
    /// connection has a request in flight (or is closing already).
    fn evict_idle(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Idle longest first; at equal times, the older connection.
        let victim = conns
            .iter()
            .filter(|(_, c)| c.in_flight.load(Relaxed) == 0 && !c.evicting.load(Relaxed))
            .min_by_key(|(id, c)| (c.idle_since_ms.load(Relaxed), **id));
        match victim {
            Some((_, c)) => {
                c.evicting.store(true, Relaxed);
                // notify_one keeps the wake-up if the task is not waiting yet.
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn log_limit_reached(&self) {
        if let Some(skipped) = self.limit_log.due(self.now_ms()) {
            warn!(
                listener = self.name,
                max_connections = self.max,
                not_logged_since_last = skipped,
                "connection limit reached: closing the longest-idle connection to make room \
                 (counted in aigw_listener_limit_reached_total; logged at most every {}s)",
                LOG_EVERY.as_secs()
            );
        }
    }

    /// Out of file descriptors and the like: counted, logged (throttled).
    fn accept_failed(&self, e: &std::io::Error) {
        self.accept_errors.fetch_add(1, Relaxed);
        if let Some(skipped) = self.accept_log.due(self.now_ms()) {
            warn!(
                listener = self.name,
                error = %e,
                not_logged_since_last = skipped,
                "accept failed (counted in aigw_listener_accept_errors_total)"
            );
        }
    }
}

/// A metric family: name, type, help, and its value for one gate.
type Family = (&'static str, &'static str, &'static str, fn(&Gate) -> u64);

/// Prometheus text for `gates`: open connections, the cap, and how often it
/// was met, with what it cost (idle connections closed, timeouts).
pub fn render_metrics(gates: &[&Gate]) -> String {
    let mut out = String::new();
    let families: [Family; 6] = [
        (
            "aigw_listener_connections",
            "gauge",
            "Connections open on the listener.",
            |g| u64::try_from(g.open()).unwrap_or(u64::MAX),
        ),
        (
            "aigw_listener_connections_max",
            "gauge",
            "The listener's connection cap (connections.max_per_listener).",
            |g| u64::try_from(g.max).unwrap_or(u64::MAX),
        ),
        (
            "aigw_listener_limit_reached_total",
            "counter",
            "New connections that found the listener at its connection cap.",
            |g| g.limit_reached.load(Relaxed),
        ),
        (
            "aigw_listener_evicted_total",
            "counter",
            "Idle connections closed to make room for a new one at the cap.",
            |g| g.evicted.load(Relaxed),
        ),
        (
            "aigw_listener_timed_out_total",
            "counter",
            "Connections closed for not sending headers in time or idling.",
            |g| g.timed_out.load(Relaxed),
        ),
        (
            "aigw_listener_accept_errors_total",
            "counter",
            "accept() failures (e.g. out of file descriptors).",
            |g| g.accept_errors.load(Relaxed),
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for g in gates {
            let _ = writeln!(out, "{name}{{listener=\"{}\"}} {}", g.name, value(g));
        }
    }
    out
}

/// How a listener speaks.
#[derive(Clone, Default)]
pub struct Protocol {
    /// gRPC: HTTP/2 only.
    pub http2_only: bool,
    /// Puts tonic's `TcpConnectInfo` on each request, for `remote_addr()`.
    pub tonic_connect_info: bool,
    /// TLS, handshaken within the header-read timeout; the client's
    /// certificates (mutual TLS) go on each request as [`PeerCertificates`].
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The certificate chain a TLS client presented (leaf first), on every
/// request of its connection.
#[derive(Debug, Clone)]
pub struct PeerCertificates(pub Arc<Vec<rustls::pki_types::CertificateDer<'static>>>);

/// Serves `service` on `listener` under `config`'s bounds until `stop` turns
/// true; then stops accepting and gives open connections `drain` to finish.
pub async fn serve<S, B>(
    listener: TcpListener,
    gate: Arc<Gate>,
    config: ConnectionsConfig,
    protocol: Protocol,
    service: S,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let builder = Arc::new(builder(&config, &protocol));
    let tls = protocol.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let timeouts = Timeouts {
        header: config.header_read_timeout.0,
        idle: config.idle_timeout.0,
    };
    let what = gate.name;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly, keep serving.
                gate.accept_failed(&e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let permit = match gate.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                gate.make_room();
                let mut retry = tokio::time::interval(EVICT_RETRY);
                retry.tick().await;
                let waited = loop {
                    tokio::select! {
                        p = gate.permits.clone().acquire_owned() => break p.ok(),
                        // The chosen connection got a request meanwhile: try another.
                        _ = retry.tick() => { gate.evict_idle(); }
                        _ = stop.wait_for(|s| *s) => break None,
                    }
                };
                match waited {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let connect_info =
            protocol
                .tonic_connect_info
                .then(|| tonic::transport::server::TcpConnectInfo {
                    local_addr: stream.local_addr().ok(),
                    remote_addr: Some(peer),
                });
        let (id, conn) = gate.register();
        let mut svc = Tracked {
            inner: service.clone(),
            conn: conn.clone(),
            gate: gate.clone(),
            connect_info,
            peer_certs: None,
        };
        let (gate, stop, builder, tls) = (gate.clone(), stop.clone(), builder.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => {
                    let connection = builder.serve_connection(TokioIo::new(stream), svc);
                    drive(connection, &gate, &conn, timeouts, stop).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(timeouts.header, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            svc.peer_certs = stream.get_ref().1.peer_certificates().map(|c| {
                                PeerCertificates(Arc::new(
                                    c.iter().map(|c| c.clone().into_owned()).collect(),
                                ))
                            });
                            let connection = builder.serve_connection(TokioIo::new(stream), svc);
                            drive(connection, &gate, &conn, timeouts, stop).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(listener = gate.name, %peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            gate.timed_out.fetch_add(1, Relaxed);
                        }
                    }
                }
            }
            gate.unregister(id);
            drop(permit);
        });
    }
    drop(listener);
    // Every permit back means every connection closed.
    let all = u32::try_from(gate.max).unwrap_or(u32::MAX);
    match tokio::time::timeout(drain, gate.permits.acquire_many(all)).await {
        Ok(_) => info!(listener = what, "all connections drained"),
        Err(_) => warn!(
            listener = what,
            open = gate.open(),
            "drain limit reached; closing the remaining connections"
        ),
    }
}

fn builder(config: &ConnectionsConfig, protocol: &Protocol) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout.0)
        .max_buf_size(usize::try_from(config.max_header_bytes).unwrap_or(usize::MAX));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .max_header_list_size(config.max_header_bytes)
        .keep_alive_interval(HTTP2_KEEPALIVE)
        .keep_alive_timeout(HTTP2_KEEPALIVE);
    if protocol.http2_only {
        builder = builder.http2_only();
    }
    builder
}

#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// Runs one connection to its end, closing it when it idles past its
/// deadline, when the gate evicts it, or (gracefully) at shutdown.
async fn drive<I, S, B>(
    connection: auto::Connection<'_, TokioIo<I>, Tracked<S>, TokioExecutor>,
    gate: &Gate,
    conn: &Conn,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    // Set once a graceful close has begun: the connection is dropped then.
    let mut close_by: Option<Instant> = None;
    // Counted once, whether hyper's header timer or ours saw it first.
    let mut timed_out = false;
    loop {
        let wake = close_by.unwrap_or_else(|| conn.deadline(gate, timeouts));
        tokio::select! {
            done = connection.as_mut() => {
                timed_out |= done.is_err_and(|e| is_timeout(&*e));
                break;
            }
            _ = tokio::time::sleep_until(wake) => {
                if close_by.is_some() {
                    if !stopping {
                        break;
                    }
                    // At shutdown the listener's drain limit decides.
                    close_by = None;
                    continue;
                }
                if conn.in_flight.load(Relaxed) == 0 && Instant::now() >= conn.deadline(gate, timeouts) {
                    timed_out = true;
                    connection.as_mut().graceful_shutdown();
                    close_by = Instant::now().checked_add(CLOSE_GRACE);
                    if close_by.is_none() {
                        break;
                    }
                }
            }
            _ = conn.evict.notified() => {
                // Nothing in flight (the gate checked): nothing to lose.
                if conn.in_flight.load(Relaxed) == 0 {
                    gate.evicted.fetch_add(1, Relaxed);
                    return;
                }
                conn.evicting.store(false, Relaxed);
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
                // Re-checked on wake; the drain limit is the listener's.
                close_by = Instant::now().checked_add(Duration::from_secs(3600));
            }
        }
    }
    if timed_out {
        gate.timed_out.fetch_add(1, Relaxed);
    }
}

impl Conn {
    /// When the connection will have idled too long if nothing happens: the
    /// header timeout before its first request, the idle timeout after;
    /// with a request in flight, the next time worth looking again.
    fn deadline(&self, gate: &Gate, t: Timeouts) -> Instant {
        let since = gate.at(self.idle_since_ms.load(Relaxed));
        let wait = if self.in_flight.load(Relaxed) > 0 {
            return Instant::now()
                .checked_add(t.idle)
                .unwrap_or_else(Instant::now);
        } else if self.served.load(Relaxed) {
            t.idle
        } else {
            t.header
        };
        since.checked_add(wait).unwrap_or(since)
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// Counts a connection's requests in flight: from the call until the
/// response body is done or dropped.
struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
    gate: Arc<Gate>,
    connect_info: Option<tonic::transport::server::TcpConnectInfo>,
    peer_certs: Option<PeerCertificates>,
}

impl<S: Clone> Clone for Tracked<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            conn: self.conn.clone(),
            gate: self.gate.clone(),
            connect_info: self.connect_info.clone(),
            peer_certs: self.peer_certs.clone(),
        }
    }
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.conn.served.store(true, Relaxed);
        self.conn.in_flight.fetch_add(1, Relaxed);
        if let Some(info) = &self.connect_info {
            req.extensions_mut().insert(info.clone());
        }
        if let Some(certs) = &self.peer_certs {
            req.extensions_mut().insert(certs.clone());
        }
        TrackedFuture {
            inner: self.inner.call(req),
            guard: Some(InFlight {
                conn: self.conn.clone(),
                gate: self.gate.clone(),
            }),
        }
    }
}

/// One request in flight; dropping it marks the connection idle if it was
/// the last.
struct InFlight {
    conn: Arc<Conn>,
    gate: Arc<Gate>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Idle-since first, so a reader seeing zero in flight sees a fresh time.
        self.conn.idle_since_ms.store(self.gate.now_ms(), Relaxed);
        self.conn.in_flight.fetch_sub(1, Relaxed);
    }
}

pin_project_lite::pin_project! {
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                this.guard.take();
                Poll::Ready(Err(e))
            }
            Poll::Ready(Ok(resp)) => {
                let guard = this.guard.take();
                Poll::Ready(Ok(resp.map(|inner| TrackedBody {
                    inner,
                    _guard: guard,
                })))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted until it is done.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::HumanDuration;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::TokioExecutor;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn small() -> ConnectionsConfig {
        ConnectionsConfig {
            max_per_listener: 4,
            header_read_timeout: HumanDuration(Duration::from_secs(5)),
            idle_timeout: HumanDuration(Duration::from_secs(5)),
            http2_max_concurrent_streams: 1,
            max_header_bytes: 8192,
        }
    }

    /// Serves `small()` with a handler that holds each request until a
    /// second one is in at the same time (or 500 ms pass), recording the
    /// most seen at once.
    async fn start() -> (SocketAddr, Arc<Gate>, Arc<AtomicUsize>, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate::new("test", &small());
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let arrived = Arc::new(Notify::new());
        let (m, n) = (most.clone(), now.clone());
        let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
            let (now, most, arrived) = (n.clone(), m.clone(), arrived.clone());
            async move {
                let at_once = now.fetch_add(1, Relaxed) + 1;
                most.fetch_max(at_once, Relaxed);
                arrived.notify_waiters();
                if at_once < 2 {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(500), arrived.notified()).await;
                }
                now.fetch_sub(1, Relaxed);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            gate.clone(),
            small(),
            Protocol::default(),
            svc,
            stopped,
            Duration::from_secs(1),
        ));
        (addr, gate, most, stop)
    }

    #[tokio::test]
    async fn http2_streams_per_connection_are_capped() {
        let (addr, _gate, most, _stop) = start().await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let calls = (0..3).map(|_| {
            let mut send = send.clone();
            async move {
                let req = Request::get("http://x/")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                match send.send_request(req).await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                }
            }
        });
        let statuses = futures::future::join_all(calls).await;
        assert!(statuses.contains(&200), "{statuses:?}");
        assert_eq!(
            most.load(Relaxed),
            1,
            "streams served at once on one connection"
        );
    }

    #[tokio::test]
    async fn oversized_request_heads_are_refused_on_http1_and_http2() {
        let (addr, _gate, _most, _stop) = start().await;
        let big = "a".repeat(16 * 1024);
        // HTTP/1.1: hyper answers 431 once the head outgrows the buffer.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
        // HTTP/2: the header list is over SETTINGS_MAX_HEADER_LIST_SIZE.
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://x/")
            .header("x-big", big)
            .body(Empty::<Bytes>::new())
            .unwrap();
        // Or refused outright (stream reset) before any handler ran.
        if let Ok(r) = send.send_request(req).await {
            assert_eq!(r.status(), 431);
        }
        // Small heads still go through on both.
        let req = Request::get("http://x/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let r = send.send_request(req).await.unwrap();
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "ok");
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_connection_makes_room() {
        let (addr, gate, _most, _stop) = start().await;
        let mut idle = Vec::new();
        for _ in 0..small().max_per_listener {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // The fifth connection gets served; the first (longest idle) is closed.
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://x/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), 200);
        // Well before the 5 s header timeout could have closed it.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), idle[0].read(&mut buf))
            .await
            .expect("the longest-idle connection is still open")
            .unwrap_or(0);
        assert_eq!(n, 0, "the longest-idle connection was closed");
        assert_eq!(gate.limit_reached(), 1);
        assert!(gate.open() <= small().max_per_listener);
        let text = render_metrics(&[&gate]);
        assert!(
            text.contains("aigw_listener_evicted_total{listener=\"test\"} 1"),
            "{text}"
        );
    }
}
