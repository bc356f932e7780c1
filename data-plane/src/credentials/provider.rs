//! One provider key's token cache: a background task fetches, refreshes
//! ahead of expiry and retries with backoff; callers read the current token
//! lock-free from a watch channel and wait only when there is none.

use super::{FetchedToken, TokenError, TokenSource};
use crate::metrics::Metrics;
use http::HeaderValue;
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

/// Refresh this long before expiry at most (the Azure SDKs' own margin)...
const REFRESH_MARGIN_MAX: Duration = Duration::from_secs(300);
/// ...and at least a quarter of the lifetime before it, for short-lived tokens.
const REFRESH_MARGIN_DIVISOR: u32 = 4;
/// A token is no longer handed out this close to expiry (at most; a tenth of
/// its lifetime for short-lived tokens), so it cannot expire in flight.
const USABLE_MARGIN_MAX: Duration = Duration::from_secs(30);
const USABLE_MARGIN_DIVISOR: u32 = 10;
/// Backoff between failed attempts.
pub(super) const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A key no caller has used for this long is neither refreshed nor retried in
/// the background; its next caller fetches anew.
const IDLE: Duration = Duration::from_secs(15 * 60);
/// Longest a caller waits for a token.
const WAIT: Duration = Duration::from_secs(30);

/// A token as callers use it. Clones share the "accepted" mark.
#[derive(Clone)]
pub struct Bearer(Arc<TokenInner>);

struct TokenInner {
    /// Which fetch produced it (1, 2, ...).
    id: u64,
    /// `Bearer <token>`, marked sensitive.
    header: HeaderValue,
    fetched_at: Instant,
    refresh_at: Instant,
    usable_until: Instant,
    /// Azure answered a request carrying this token with something else than 401/403.
    accepted: AtomicBool,
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bearer(#{}, ***)", self.0.id)
    }
}

impl Bearer {
    fn new(id: u64, fetched: FetchedToken, now: Instant) -> Result<Self, TokenError> {
        let mut header =
            HeaderValue::try_from(format!("Bearer {}", fetched.secret)).map_err(|_| {
                TokenError::new("Entra ID returned a token that is not a valid header value")
            })?;
        header.set_sensitive(true);
        let life = fetched.expires_in;
        let expires_at = crate::clock::deadline_after(now, life);
        Ok(Self(Arc::new(TokenInner {
            id,
            header,
            fetched_at: now,
            refresh_at: expires_at - (life / REFRESH_MARGIN_DIVISOR).min(REFRESH_MARGIN_MAX),
            usable_until: expires_at - (life / USABLE_MARGIN_DIVISOR).min(USABLE_MARGIN_MAX),
            accepted: AtomicBool::new(false),
        })))
    }

    /// The `Authorization` header value.
    pub fn header(&self) -> &HeaderValue {
        &self.0.header
    }

    /// Which fetch produced this token (1 for the first).
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Azure accepted this token (answered with anything but 401/403).
    pub fn mark_accepted(&self) {
        self.0.accepted.store(true, Ordering::Relaxed);
    }

    pub fn was_accepted(&self) -> bool {
        self.0.accepted.load(Ordering::Relaxed)
    }

    /// When the background task refreshes it.
    pub fn refresh_at(&self) -> Instant {
        self.0.refresh_at
    }

    fn usable(&self, now: Instant) -> bool {
        now < self.0.usable_until
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    /// The task fetches as soon as a caller needs a token (or at refresh time).
    #[default]
    Idle,
    Fetching,
    /// The last attempt failed; the task retries at its own pace and callers
    /// without a usable token get the last error at once.
    Backoff,
}

#[derive(Clone, Default)]
struct Slot {
    /// Completed attempts, successful or not.
    generation: u64,
    token: Option<Bearer>,
    /// The last attempt's error; `None` after a success.
    error: Option<TokenError>,
    phase: Phase,
}

struct Shared {
    provider_key_id: String,
    source: Arc<dyn TokenSource>,
    slot: watch::Sender<Slot>,
    /// Wakes the task: a caller needs a token.
    demand: Notify,
    /// A caller needs a token and found none usable.
    wanted: AtomicBool,
    /// Milliseconds since `epoch` of the last caller.
    last_used: AtomicU64,
    epoch: Instant,
    started: AtomicBool,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_used.fetch_max(ms, Ordering::Relaxed);
    }

    fn last_used(&self) -> Instant {
        crate::clock::deadline_after(
            self.epoch,
            Duration::from_millis(self.last_used.load(Ordering::Relaxed)),
        )
    }

    fn want(&self) {
        self.wanted.store(true, Ordering::SeqCst);
        self.demand.notify_one();
    }
}

/// The token cache of one provider key (one credential). The registry keeps
/// it across snapshots while the credential is unchanged; dropping the last
/// reference stops its background task.
pub struct TokenProvider {
    shared: Arc<Shared>,
    fingerprint: [u8; 32],
    _stop: DropGuard,
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("provider_key_id", &self.shared.provider_key_id)
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

impl TokenProvider {
    pub fn new(
        provider_key_id: &str,
        fingerprint: [u8; 32],
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let stop = CancellationToken::new();
        Self {
            shared: Arc::new(Shared {
                provider_key_id: provider_key_id.to_string(),
                source,
                slot: watch::channel(Slot::default()).0,
                demand: Notify::new(),
                wanted: AtomicBool::new(false),
                last_used: AtomicU64::new(0),
                epoch: Instant::now(),
                started: AtomicBool::new(false),
                stop: stop.clone(),
                metrics,
            }),
            fingerprint,
            _stop: stop.drop_guard(),
        }
    }

    pub fn provider_key_id(&self) -> &str {
        &self.shared.provider_key_id
    }

    /// What kind of credential this is, for messages.
    pub fn kind(&self) -> &'static str {
        self.shared.source.kind()
    }

    pub(super) fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    /// A usable token: the cached one, or the outcome of the one fetch that
    /// all waiting callers share. While the background task is backing off
    /// after a failure, callers without a usable token get that failure at once.
    pub async fn bearer(&self) -> Result<Bearer, TokenError> {
        let sh = &self.shared;
        sh.touch();
        self.start();
        let mut rx = sh.slot.subscribe();
        let g0 = {
            let s = rx.borrow_and_update();
            let now = Instant::now();
            if let Some(t) = s.token.as_ref().filter(|t| t.usable(now)) {
                if now >= t.0.refresh_at && s.phase == Phase::Idle {
                    // The task went quiet (no use at refresh time); wake it.
                    sh.want();
                }
                return Ok(t.clone());
            }
            match (&s.phase, &s.error) {
                (Phase::Backoff, Some(e)) => return Err(e.clone()),
                (Phase::Idle, _) => sh.want(),
                _ => {}
            }
            s.generation
        };
        let done = tokio::time::timeout(WAIT, rx.wait_for(|s| s.generation > g0)).await;
        match done {
            Err(_) => Err(TokenError::new(format!(
                "no token from Entra ID within {}s",
                WAIT.as_secs()
            ))),
            Ok(Err(_)) => Err(TokenError::new("the token cache was shut down")),
            Ok(Ok(s)) => match (&s.token, &s.error) {
                (Some(t), _) if t.usable(Instant::now()) => Ok(t.clone()),
                (_, Some(e)) => Err(e.clone()),
                _ => Err(TokenError::new(
                    "Entra ID returned a token that expires immediately",
                )),
            },
        }
    }

    /// Azure refused `used` although it accepted it before: drop it so the
    /// next [`bearer`](Self::bearer) fetches a new one. Only the first of many
    /// concurrent rejections of one token takes effect.
    pub fn reject(&self, used: &Bearer) {
        let dropped = self.shared.slot.send_if_modified(|s| {
            if s.token.as_ref().is_some_and(|t| t.0.id == used.0.id) {
                s.token = None;
                true
            } else {
                false
            }
        });
        if dropped {
            self.shared.metrics.entra_forced_refresh();
            info!(
                provider_key_id = %self.shared.provider_key_id,
                "Azure refused an Entra ID token it had accepted; fetching a new one"
            );
        }
    }

    /// Token fetches completed so far (successful or not).
    pub fn attempts(&self) -> u64 {
        self.shared.slot.borrow().generation
    }

    /// Callers waiting for a fetch to finish.
    #[cfg(test)]
    pub(super) fn waiters(&self) -> usize {
        self.shared.slot.receiver_count()
    }

    fn start(&self) {
        if self
            .shared
            .started
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tokio::spawn(drive(self.shared.clone()));
        }
    }
}

/// What the background task does next.
enum Plan {
    Fetch,
    /// Wait for a caller or until the given time.
    Wait(Option<Instant>),
}

fn plan(sh: &Shared, now: Instant, retry_at: &mut Option<Instant>) -> Plan {
    let idle = now.saturating_duration_since(sh.last_used()) >= IDLE;
    if let Some(at) = *retry_at {
        if now < at {
            return Plan::Wait(Some(at));
        }
        if !idle {
            return Plan::Fetch;
        }
        // Nobody needs this key: stop retrying until someone does.
        *retry_at = None;
        sh.slot.send_modify(|s| s.phase = Phase::Idle);
    }
    let s = sh.slot.borrow();
    match s.token.as_ref().filter(|t| t.usable(now)) {
        Some(t) if now < t.0.refresh_at => {
            sh.wanted.store(false, Ordering::SeqCst);
            Plan::Wait(Some(t.0.refresh_at))
        }
        Some(t) if sh.last_used() > t.0.fetched_at || sh.wanted.load(Ordering::SeqCst) => {
            Plan::Fetch
        }
        Some(_) => Plan::Wait(None),
        None if sh.wanted.load(Ordering::SeqCst) => Plan::Fetch,
        None => Plan::Wait(None),
    }
}

/// The background task of one provider key: fetch when needed, refresh ahead
/// of expiry, retry failures with jittered exponential backoff.
async fn drive(sh: Arc<Shared>) {
    let mut backoff = BACKOFF_MIN;
    let mut retry_at: Option<Instant> = None;
    loop {
        loop {
            match plan(&sh, Instant::now(), &mut retry_at) {
                Plan::Fetch => break,
                Plan::Wait(until) => {
                    let sleep = async {
                        match until {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = sh.stop.cancelled() => return,
                        _ = sh.demand.notified() => {}
                        _ = sleep => {}
                    }
                }
            }
        }
        sh.wanted.store(false, Ordering::SeqCst);
        sh.slot.send_modify(|s| s.phase = Phase::Fetching);
        let fetched = tokio::select! {
            _ = sh.stop.cancelled() => return,
            r = sh.source.fetch() => r,
        };
        let now = Instant::now();
        let id = sh.slot.borrow().generation + 1;
        match fetched.and_then(|t| Bearer::new(id, t, now)) {
            Ok(token) => {
                sh.metrics.entra_token_refreshed();
                backoff = BACKOFF_MIN;
                retry_at = None;
                sh.slot.send_modify(|s| {
                    s.generation = id;
                    s.token = Some(token);
                    s.error = None;
                    s.phase = Phase::Idle;
                });
            }
            Err(e) => {
                sh.metrics.entra_token_failed();
                let wait = backoff.mul_f64(rand::thread_rng().gen_range(0.8..1.2));
                warn!(
                    provider_key_id = %sh.provider_key_id,
                    kind = sh.source.kind(),
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "Entra ID token request failed"
                );
                retry_at = Some(crate::clock::deadline_after(now, wait));
                backoff = (backoff * 2).min(BACKOFF_MAX);
                sh.slot.send_modify(|s| {
                    s.generation = id;
                    s.error = Some(e);
                    s.phase = Phase::Backoff;
                    if s.token.as_ref().is_some_and(|t| !t.usable(now)) {
                        s.token = None;
                    }
                });
            }
        }
    }
}
