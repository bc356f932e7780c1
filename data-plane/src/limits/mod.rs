//! Rate limits per api key and per model — requests and tokens per minute and
//! per day, and concurrency — enforced on the whole fleet's consumption.
//!
//! # Algorithm
//!
//! Each scope (`key/<id>`, `model/<alias>`) keeps sliding windows of absolute
//! time buckets (`window`): 100 ms buckets for a minute, 5 min buckets for a
//! day. A node counts its own admissions in its own ring, and mirrors every
//! peer's ring from what the peers broadcast on core NATS (`sync`) every
//! [`SYNC_INTERVAL`]: the counts of the buckets that changed, as absolute
//! values, and once a second all of them. A call is admitted when, for every
//! limit that applies,
//!
//! 1. `fleet view + cost ≤ limit`, where the fleet view is this node's ring
//!    plus its mirrors of the peers' rings; and
//! 2. `admitted since the last broadcast + cost ≤ max(cost, (limit − view at
//!    the interval's first admission) / N)`, N the live nodes.
//!
//! Rule 2 is what keeps the fleet honest while its views lag: inside one
//! sync interval the N nodes together take at most what was left when the
//! interval began, plus at most one call each beyond it. Hence the bound: a
//! window never holds more than `limit + (N − 1) × largest cost` (one request
//! for `rpm`/`rpd`, the largest call's tokens for `tpm`/`tpd`), plus whatever
//! NATS delivery takes beyond the interval (sub-millisecond on a LAN). The
//! trailing edge is one bucket coarse: a call leaves the window up to 100 ms
//! (minute) or 5 min (day) early. No call waits on the network: the check is
//! local and the broadcast runs in the background.
//!
//! Token cost is an estimate when the call is admitted (`tokens`: prompt
//! with the model's tokenizer plus `max_tokens` × `n`, as Azure estimates)
//! and is corrected with the real usage when the call ends, in the bucket
//! where it was reserved, streams and cache hits (0 tokens) included.
//!
//! Concurrency counts calls in flight, here and (from the broadcasts) on the
//! live peers; a permit releases its slot when the call ends however it ends,
//! since it lives in the call's accounting, which is dropped with the call.
//! On one node the limit is exact; across nodes it can be exceeded by calls
//! admitted elsewhere within the last sync interval.
//!
//! Without NATS (not configured, unreachable, or the connection lost) each
//! node enforces an even share, `limit / N` with N the fleet size it last
//! saw, on its own counts alone; `aigw_ratelimit_fleet_sync` is then 0.

mod bpe;
mod sync;
pub mod tokens;
pub mod window;

pub use sync::{run_sync, SUBJECT};

use aigw_shared::domain::RateLimit;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use window::{cost_of, Kind, Ring};

/// How often a node broadcasts its counts; the fleet's views lag by about this.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not stop limiting: the counters stay usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scope's rate limits and the fleet-wide counters they are checked on.
#[derive(Debug)]
pub struct Limits {
    pub rate: RateLimit,
    pub scope: Arc<Scope>,
}

impl Limits {
    pub fn new(limiter: &Limiter, scope: String, rate: Option<RateLimit>) -> Option<Self> {
        let rate = rate.filter(|r| *r != RateLimit::default())?;
        Some(Self {
            scope: limiter.scope(&scope, &rate),
            rate,
        })
    }

    pub fn counts_tokens(&self) -> bool {
        self.rate.tpm.is_some() || self.rate.tpd.is_some()
    }
}

/// What this node knows of the fleet.
#[derive(Debug)]
pub struct Fleet {
    /// Enforcing on the fleet's sum (NATS connected) rather than a local share.
    synced: AtomicBool,
    /// Live nodes, this one included; kept while NATS is away.
    nodes: AtomicU64,
    /// Bumped after every broadcast: admissions before it are visible to peers.
    epoch: AtomicU64,
    /// Reason → peers' messages refused (see `sync::refuse_reason`).
    rejected: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            synced: AtomicBool::new(false),
            nodes: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            rejected: Mutex::default(),
        }
    }
}

impl Fleet {
    pub fn is_synced(&self) -> bool {
        self.synced.load(Relaxed)
    }

    pub fn nodes(&self) -> u64 {
        self.nodes.load(Relaxed).max(1)
    }

    pub(crate) fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Relaxed);
    }

    pub(crate) fn set_nodes(&self, n: u64) {
        self.nodes.store(n.max(1), Relaxed);
    }

    pub(crate) fn rejected(&self, reason: &'static str) {
        *lock(&self.rejected).entry(reason).or_default() += 1;
    }

    /// Messages refused so far, by reason.
    pub fn rejected_counts(&self) -> Vec<(&'static str, u64)> {
        lock(&self.rejected).iter().map(|(r, n)| (*r, *n)).collect()
    }

    pub(crate) fn next_epoch(&self) {
        self.epoch.fetch_add(1, Relaxed);
    }
}

#[derive(Clone, Copy)]
enum Mode {
    /// Enforce on the fleet's sum; `epoch` is the current sync interval.
    Fleet { nodes: u64, epoch: u64 },
    /// Enforce `limit / nodes` on this node's own counts.
    Local { nodes: u64 },
}

/// Every scope's counters, kept across config snapshots.
#[derive(Default)]
pub struct Limiter {
    scopes: Mutex<HashMap<Arc<str>, Arc<Scope>>>,
    pub fleet: Fleet,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("scopes", &lock(&self.scopes).len())
            .finish()
    }
}

impl Limiter {
    /// The scope's counters, created on first use, with a window for every
    /// limit in `limits` (so peers' counts are mirrored before the first call).
    pub fn scope(&self, name: &str, limits: &RateLimit) -> Arc<Scope> {
        let scope = lock(&self.scopes)
            .entry(Arc::from(name))
            .or_insert_with(|| {
                Arc::new(Scope {
                    name: Arc::from(name),
                    state: Mutex::default(),
                })
            })
            .clone();
        {
            let mut st = lock(&scope.state);
            for kind in Kind::ALL {
                if limit_of(limits, kind).is_some() {
                    st.windows[kind.index()].get_or_insert_with(|| Window::new(kind));
                }
            }
        }
        scope
    }

    /// Drops scopes no snapshot uses any more.
    pub fn retain(&self, live: &std::collections::HashSet<&str>) {
        lock(&self.scopes).retain(|name, _| live.contains(name.as_ref()));
    }

    fn get(&self, name: &str) -> Option<Arc<Scope>> {
        lock(&self.scopes).get(name).cloned()
    }

    fn all(&self) -> Vec<Arc<Scope>> {
        lock(&self.scopes).values().cloned().collect()
    }

    fn mode(&self) -> Mode {
        let nodes = self.fleet.nodes();
        if self.fleet.is_synced() {
            Mode::Fleet {
                nodes,
                epoch: self.fleet.epoch.load(Relaxed),
            }
        } else {
            Mode::Local { nodes }
        }
    }

    /// Admits a call costing one request and `tokens` (estimated) against
    /// every limit of every scope in `checks`, or says which limit refused it
    /// and when to retry. Nothing is counted unless everything passes.
    pub fn acquire(&self, checks: &[Check<'_>], tokens: u64) -> Result<Permit, Rejection> {
        self.acquire_at(checks, tokens, crate::clock::unix_ms_now())
    }

    fn acquire_at(&self, checks: &[Check<'_>], tokens: u64, now: u64) -> Result<Permit, Rejection> {
        let mode = self.mode();
        // Scopes are always locked key first, then model: no lock-order cycles.
        let mut guards: Vec<MutexGuard<'_, ScopeState>> =
            checks.iter().map(|c| lock(&c.scope.state)).collect();
        let mut headers = RateHeaders::default();
        for (c, st) in checks.iter().zip(guards.iter_mut()) {
            st.check(c, tokens, now, mode, &mut headers)?;
        }
        let mut held = Vec::with_capacity(checks.len());
        for (c, st) in checks.iter().zip(guards.iter_mut()) {
            held.push(st.commit(c, tokens, now));
        }
        drop(guards);
        Ok(Permit {
            held,
            estimate: tokens,
            settled: false,
            headers,
        })
    }
}

/// One scope with the limits the current snapshot gives it.
pub struct Check<'a> {
    pub scope: &'a Arc<Scope>,
    pub limits: &'a RateLimit,
    /// `api key` or `model`, for the caller's message.
    pub what: &'static str,
    pub id: &'a str,
}

/// A limit as a count; limits beyond `i64` are as good as unlimited.
fn as_count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn limit_of(l: &RateLimit, kind: Kind) -> Option<u64> {
    match kind {
        Kind::RequestsPerMinute => l.rpm,
        Kind::TokensPerMinute => l.tpm,
        Kind::RequestsPerDay => l.rpd,
        Kind::TokensPerDay => l.tpd,
    }
}

/// Counters of one api key or one model.
pub struct Scope {
    name: Arc<str>,
    state: Mutex<ScopeState>,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scope({})", self.name)
    }
}

impl Scope {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls in flight on this node, and the most there ever were.
    pub fn in_flight(&self) -> (i64, i64) {
        let st = lock(&self.state);
        (st.in_flight, st.peak_in_flight)
    }
}

#[derive(Default)]
struct ScopeState {
    windows: [Option<Window>; 4],
    in_flight: i64,
    /// The most calls ever in flight here at once (a gauge for operators).
    peak_in_flight: i64,
    peers_in_flight: HashMap<Arc<str>, i64>,
    in_flight_dirty: bool,
}

struct Window {
    kind: Kind,
    local: Ring,
    peers: HashMap<Arc<str>, Ring>,
    /// The oldest bucket changed since the last broadcast.
    dirty_from: Option<u64>,
    /// Sync interval of `unsynced` and `base`.
    epoch: u64,
    /// Admitted in this interval, not yet broadcast.
    unsynced: i64,
    /// The fleet view at the interval's first admission.
    base: i64,
}

impl Window {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            local: Ring::new(kind),
            peers: HashMap::new(),
            dirty_from: None,
            epoch: u64::MAX,
            unsynced: 0,
            base: 0,
        }
    }

    fn fleet_view(&mut self, bucket: u64) -> i64 {
        self.local.advance(bucket);
        let mut sum = self.local.total();
        for r in self.peers.values_mut() {
            r.advance(bucket);
            sum = sum.saturating_add(r.total());
        }
        sum
    }

    /// Used and allowed, as this node enforces it in `mode`.
    fn usage(&mut self, limit: u64, bucket: u64, mode: Mode) -> (i64, i64) {
        match mode {
            Mode::Fleet { .. } => (self.fleet_view(bucket), as_count(limit)),
            Mode::Local { nodes } => {
                self.local.advance(bucket);
                (self.local.total(), as_count(limit / nodes.max(1)))
            }
        }
    }

    /// What would remain after `cost`, if this window admits it.
    fn admits(&mut self, limit: u64, cost: i64, bucket: u64, mode: Mode) -> Option<i64> {
        let (used, allowed) = self.usage(limit, bucket, mode);
        let fits = if cost == 0 {
            used < allowed
        } else {
            used.saturating_add(cost) <= allowed
        };
        if !fits {
            return None;
        }
        if let Mode::Fleet { nodes, epoch } = mode {
            if self.epoch != epoch {
                self.epoch = epoch;
                self.unsynced = 0;
                self.base = used;
            }
            let share = as_count(limit).saturating_sub(self.base) / as_count(nodes).max(1);
            if self.unsynced.saturating_add(cost) > share.max(cost) {
                return None;
            }
        }
        Some(allowed - used - cost)
    }

    /// When enough of the window's count will have expired for `cost` to fit.
    fn retry_after_ms(&mut self, limit: u64, cost: i64, now: u64, mode: Mode) -> u64 {
        let bucket = self.kind.bucket_of(now);
        let (used, allowed) = self.usage(limit, bucket, mode);
        let excess = used.saturating_add(cost.max(1)).saturating_sub(allowed);
        if excess <= 0 {
            // Refused by the sync-interval share: the next interval has room.
            return SYNC_INTERVAL.as_millis() as u64;
        }
        let local_only = matches!(mode, Mode::Local { .. });
        let mut freed: i64 = 0;
        for b in self.local.oldest()..=bucket {
            freed = freed.saturating_add(self.local.get(b));
            if !local_only {
                freed = self
                    .peers
                    .values()
                    .fold(freed, |f, r| f.saturating_add(r.get(b)));
            }
            if freed >= excess {
                let leaves_at = b
                    .saturating_add(self.kind.buckets() as u64)
                    .saturating_mul(self.kind.bucket_ms());
                return leaves_at.saturating_sub(now).max(1);
            }
        }
        // More than the window ever holds (a call bigger than the limit).
        self.kind.buckets() as u64 * self.kind.bucket_ms()
    }

    fn record(&mut self, bucket: u64, delta: i64) {
        if self.local.add(bucket, delta) {
            self.dirty_from = Some(self.dirty_from.map_or(bucket, |d| d.min(bucket)));
        }
    }
}

impl ScopeState {
    fn check(
        &mut self,
        c: &Check<'_>,
        tokens: u64,
        now: u64,
        mode: Mode,
        headers: &mut RateHeaders,
    ) -> Result<(), Rejection> {
        for kind in Kind::ALL {
            let Some(limit) = limit_of(c.limits, kind) else {
                continue;
            };
            let w = self.windows[kind.index()].get_or_insert_with(|| Window::new(kind));
            let cost = if kind.is_tokens() { cost_of(tokens) } else { 1 };
            let bucket = kind.bucket_of(now);
            let Some(remaining) = w.admits(limit, cost, bucket, mode) else {
                return Err(Rejection {
                    what: c.what,
                    id: c.id.to_string(),
                    limit: kind.name(),
                    value: limit,
                    retry_after: Duration::from_millis(w.retry_after_ms(limit, cost, now, mode)),
                });
            };
            headers.offer(kind.is_tokens(), limit, remaining);
        }
        if let Some(max) = c.limits.concurrency {
            let (used, allowed) = match mode {
                Mode::Fleet { .. } => (
                    self.peers_in_flight
                        .values()
                        .fold(self.in_flight, |n, p| n.saturating_add(*p)),
                    as_count(max),
                ),
                Mode::Local { nodes } => (self.in_flight, as_count(max / nodes.max(1)).max(1)),
            };
            if used >= allowed {
                return Err(Rejection {
                    what: c.what,
                    id: c.id.to_string(),
                    limit: "concurrency",
                    value: max,
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        Ok(())
    }

    fn commit(&mut self, c: &Check<'_>, tokens: u64, now: u64) -> Held {
        let mut token_buckets = Vec::new();
        for kind in Kind::ALL {
            if limit_of(c.limits, kind).is_none() {
                continue;
            }
            let Some(w) = self.windows[kind.index()].as_mut() else {
                continue;
            };
            let bucket = kind.bucket_of(now);
            let cost = if kind.is_tokens() { cost_of(tokens) } else { 1 };
            w.record(bucket, cost);
            w.unsynced = w.unsynced.saturating_add(cost);
            if kind.is_tokens() {
                token_buckets.push((kind, bucket));
            }
        }
        let in_flight = c.limits.concurrency.is_some();
        if in_flight {
            self.in_flight += 1;
            self.peak_in_flight = self.peak_in_flight.max(self.in_flight);
            self.in_flight_dirty = true;
        }
        Held {
            scope: c.scope.clone(),
            token_buckets,
            in_flight,
        }
    }
}

/// The most constraining limit and what is left of it, per resource, for
/// the `x-ratelimit-*` response headers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<(u64, u64)>,
    pub tokens: Option<(u64, u64)>,
}

impl RateHeaders {
    fn offer(&mut self, tokens: bool, limit: u64, remaining: i64) {
        let remaining = remaining.max(0) as u64;
        let slot = if tokens {
            &mut self.tokens
        } else {
            &mut self.requests
        };
        if slot.is_none_or(|(_, r)| remaining < r) {
            *slot = Some((limit, remaining));
        }
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        use http::HeaderName;
        static NAMES: [[HeaderName; 2]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
            ],
        ];
        for (names, v) in NAMES.iter().zip([self.requests, self.tokens]) {
            if let Some((limit, remaining)) = v {
                headers.insert(names[0].clone(), limit.into());
                headers.insert(names[1].clone(), remaining.into());
            }
        }
    }
}

/// A refused call: which limit, and when there will be room.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub what: &'static str,
    pub id: String,
    /// `rpm`, `tpm`, `rpd`, `tpd` or `concurrency`.
    pub limit: &'static str,
    pub value: u64,
    pub retry_after: Duration,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.limit {
            "rpm" => "requests per minute",
            "tpm" => "tokens per minute",
            "rpd" => "requests per day",
            "tpd" => "tokens per day",
            _ => "calls in flight",
        };
        write!(
            f,
            "Rate limit reached for {} `{}`: {} {} ({}). Please retry after {} seconds.",
            self.what,
            self.id,
            self.value,
            unit,
            self.limit,
            crate::clock::retry_after_secs(self.retry_after)
        )
    }
}

impl Rejection {
    /// `retry-after-ms` and the refused limit at zero, as Azure answers a 429.
    pub fn apply_headers(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            http::HeaderName::from_static("retry-after-ms"),
            u64::try_from(self.retry_after.as_millis())
                .unwrap_or(u64::MAX)
                .into(),
        );
        let tokens = matches!(self.limit, "tpm" | "tpd");
        let mut h = RateHeaders::default();
        h.offer(tokens, self.value, 0);
        h.apply(headers);
    }
}

struct Held {
    scope: Arc<Scope>,
    /// Token windows that got the estimate, and in which bucket.
    token_buckets: Vec<(Kind, u64)>,
    in_flight: bool,
}

/// An admitted call's hold on its limits. `settle` swaps the token estimate
/// for the real count; dropping it frees the concurrency slot.
pub struct Permit {
    held: Vec<Held>,
    estimate: u64,
    settled: bool,
    headers: RateHeaders,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("estimate", &self.estimate)
            .finish()
    }
}

impl Permit {
    pub fn headers(&self) -> RateHeaders {
        self.headers
    }

    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// Corrects the reserved tokens to what the call really used.
    pub fn settle(&mut self, actual_tokens: u64) {
        if self.settled {
            return;
        }
        self.settled = true;
        // Both sides clamped as they were counted: a huge or bogus usage
        // report cannot wrap the windows.
        let delta = cost_of(actual_tokens) - cost_of(self.estimate);
        if delta == 0 {
            return;
        }
        for h in &self.held {
            let mut st = lock(&h.scope.state);
            for &(kind, bucket) in &h.token_buckets {
                if let Some(w) = st.windows[kind.index()].as_mut() {
                    w.record(bucket, delta);
                }
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        for h in self.held.iter().filter(|h| h.in_flight) {
            let mut st = lock(&h.scope.state);
            st.in_flight -= 1;
            st.in_flight_dirty = true;
        }
    }
}

#[cfg(test)]
mod tests;
