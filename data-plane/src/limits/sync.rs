//! Sharing rate-limit counters with the fleet over core NATS.
//!
//! Every [`SYNC_INTERVAL`] a node publishes the buckets it changed (absolute
//! counts) and its calls in flight; every [`FULL_EVERY`] all of them, which
//! doubles as a heartbeat and repairs anything a lost message left stale. A
//! node that (re)connects says hello and its peers answer with their full
//! state, and it enforces on the fleet's sum only once they had time to.
//! Peers silent for [`PEER_TIMEOUT`] stop counting as live nodes and their
//! calls in flight are forgotten; their past admissions stay in the windows.

use super::window::{Kind, Ring};
use super::{lock, Limiter, SYNC_INTERVAL};
use aigw_shared::proto::limits::v1::{InFlight, LimitSync, Measure, WindowCounts};
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

pub const SUBJECT: &str = "aigw.limits.v1";
const FULL_EVERY: Duration = Duration::from_secs(1);
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// After (re)connecting, how long to wait for peers' full states before
/// enforcing on the fleet's sum.
const SETTLE: Duration = Duration::from_millis(150);
/// Largest count a peer may report for one bucket, either sign (corrections
/// can make a bucket negative): far above any real limit, far below where
/// summing a few peers could wrap.
pub const MAX_BUCKET_COUNT: i64 = 1_000_000_000_000;
/// Largest number of calls in flight a peer may report for one scope.
pub const MAX_IN_FLIGHT: i64 = 1_000_000;
/// Clock skew tolerated between nodes.
const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
const MAX_ID_BYTES: usize = 256;

/// Why a peer's message is refused, as a short stable label; `None` when
/// it is plausible. NATS permissions decide who may publish (README,
/// "Security model"); this keeps one bad message from a credential holder
/// from wrapping the fleet's sums, switching limits off with negative
/// counts, or wiping windows with buckets from the far future.
pub(crate) fn refuse_reason(msg: &LimitSync, now_ms: u64) -> Option<&'static str> {
    if msg.node_id.is_empty()
        || msg.session.is_empty()
        || msg.node_id.len() > MAX_ID_BYTES
        || msg.session.len() > MAX_ID_BYTES
    {
        return Some("bad_identity");
    }
    if msg.sent_unix_ms.abs_diff(now_ms) > MAX_SKEW_MS {
        return Some("clock_skew");
    }
    for wc in &msg.windows {
        let Some(kind) = Measure::try_from(wc.measure)
            .ok()
            .and_then(Kind::from_measure)
        else {
            return Some("bad_measure");
        };
        let newest_allowed = kind.bucket_of(now_ms.saturating_add(MAX_SKEW_MS));
        let last = wc.first_bucket.checked_add(wc.counts.len() as u64);
        if wc.counts.len() > kind.buckets() || last.is_none_or(|l| l > newest_allowed + 1) {
            return Some("bucket_out_of_range");
        }
        if wc
            .counts
            .iter()
            .any(|c| c.unsigned_abs() > MAX_BUCKET_COUNT as u64)
        {
            return Some("count_out_of_bounds");
        }
    }
    if msg
        .in_flight
        .iter()
        .any(|f| !(0..=MAX_IN_FLIGHT).contains(&f.count))
    {
        return Some("in_flight_out_of_bounds");
    }
    None
}

impl Limiter {
    /// This node's counts for a broadcast: the changed buckets, or all.
    pub(crate) fn collect(&self, full: bool) -> (Vec<WindowCounts>, Vec<InFlight>) {
        let mut windows = Vec::new();
        let mut in_flight = Vec::new();
        let now = crate::clock::unix_ms_now();
        for scope in self.all() {
            let mut st = lock(&scope.state);
            for w in st.windows.iter_mut().flatten() {
                let from = if full {
                    w.local.first_nonzero()
                } else {
                    w.dirty_from
                };
                w.dirty_from = None;
                if let Some(from) = from {
                    w.local.advance(w.kind.bucket_of(now));
                    let (first_bucket, counts) = w.local.range(from);
                    if !counts.is_empty() {
                        windows.push(WindowCounts {
                            scope: scope.name.to_string(),
                            measure: w.kind.measure() as i32,
                            first_bucket,
                            counts,
                        });
                    }
                }
            }
            if full || st.in_flight_dirty {
                st.in_flight_dirty = false;
                if full && st.in_flight == 0 {
                    continue;
                }
                in_flight.push(InFlight {
                    scope: scope.name.to_string(),
                    count: st.in_flight,
                });
            }
        }
        (windows, in_flight)
    }

    /// Mirrors a peer's counts.
    pub(crate) fn apply(&self, peer: &Arc<str>, msg: &LimitSync) {
        for wc in &msg.windows {
            let Some(kind) = Measure::try_from(wc.measure)
                .ok()
                .and_then(Kind::from_measure)
            else {
                continue;
            };
            // Scopes this node's snapshot does not have yet are learnt from
            // the next full state, once it does.
            let Some(scope) = self.get(&wc.scope) else {
                continue;
            };
            let mut st = lock(&scope.state);
            let Some(w) = st.windows[kind.index()].as_mut() else {
                continue;
            };
            let ring = w
                .peers
                .entry(peer.clone())
                .or_insert_with(|| Ring::new(kind));
            if msg.full {
                *ring = Ring::new(kind);
            }
            for (i, &c) in wc.counts.iter().enumerate() {
                // A peer's bucket numbers are not trusted to stay in range.
                let Some(bucket) = wc.first_bucket.checked_add(i as u64) else {
                    break;
                };
                ring.set(bucket, c);
            }
        }
        let mut seen: Vec<&str> = Vec::with_capacity(msg.in_flight.len());
        for f in &msg.in_flight {
            if let Some(scope) = self.get(&f.scope) {
                lock(&scope.state)
                    .peers_in_flight
                    .insert(peer.clone(), f.count);
                seen.push(&f.scope);
            }
        }
        if msg.full {
            // A full state lists every scope with calls in flight.
            for scope in self.all() {
                if !seen.contains(&scope.name()) {
                    lock(&scope.state).peers_in_flight.remove(peer);
                }
            }
        }
    }

    /// A peer went silent: its calls in flight no longer count. Its past
    /// admissions do, until they leave the windows (see [`Limiter::prune`]).
    pub(crate) fn forget_peer(&self, peer: &Arc<str>) {
        for scope in self.all() {
            lock(&scope.state).peers_in_flight.remove(peer);
        }
    }

    /// Drops the mirrors of peers that are gone and whose counts have all
    /// left the windows, so restarts do not accumulate them.
    pub(crate) fn prune(&self, live: &impl Fn(&Arc<str>) -> bool, now: u64) {
        for scope in self.all() {
            let mut st = lock(&scope.state);
            for w in st.windows.iter_mut().flatten() {
                let bucket = w.kind.bucket_of(now);
                w.peers.retain(|p, r| {
                    r.advance(bucket);
                    live(p) || r.total() > 0
                });
            }
        }
    }

    /// `aigw_ratelimit_*` gauges.
    pub fn render_metrics(&self) -> String {
        let mut scopes: Vec<(String, (i64, i64))> = self
            .all()
            .iter()
            .map(|s| (crate::metrics::label("scope", s.name()), s.in_flight()))
            .filter(|(_, (_, peak))| *peak > 0)
            .collect();
        scopes.sort();
        let mut s = String::from(
            "# HELP aigw_ratelimit_in_flight Calls in flight on this node, per scope with a concurrency limit.\n\
             # TYPE aigw_ratelimit_in_flight gauge\n",
        );
        for (l, (now, _)) in &scopes {
            s.push_str(&format!("aigw_ratelimit_in_flight{{{l}}} {now}\n"));
        }
        s.push_str(
            "# HELP aigw_ratelimit_in_flight_peak The most calls ever in flight at once on this node, per scope.\n\
             # TYPE aigw_ratelimit_in_flight_peak gauge\n",
        );
        for (l, (_, peak)) in &scopes {
            s.push_str(&format!("aigw_ratelimit_in_flight_peak{{{l}}} {peak}\n"));
        }
        s + &format!(
            "# HELP aigw_ratelimit_fleet_sync 1 when rate limits are enforced on the fleet's sum over NATS, 0 when on an even local share.\n\
             # TYPE aigw_ratelimit_fleet_sync gauge\n\
             aigw_ratelimit_fleet_sync {}\n\
             # HELP aigw_ratelimit_fleet_nodes Data planes sharing rate limits, this one included (last known).\n\
             # TYPE aigw_ratelimit_fleet_nodes gauge\n\
             aigw_ratelimit_fleet_nodes {}\n",
            u8::from(self.fleet.is_synced()),
            self.fleet.nodes()
        ) + &self.render_rejected()
    }

    fn render_rejected(&self) -> String {
        let mut s = String::from(
            "# HELP aigw_ratelimit_sync_rejected_total Peers' rate-limit messages refused as implausible (forged or corrupt), by reason.\n\
             # TYPE aigw_ratelimit_sync_rejected_total counter\n",
        );
        for (reason, n) in self.fleet.rejected_counts() {
            s.push_str(&format!(
                "aigw_ratelimit_sync_rejected_total{{reason=\"{reason}\"}} {n}\n"
            ));
        }
        s
    }
}

/// Broadcasts this node's counters and mirrors the peers' until `stop`.
pub async fn run_sync(
    limiter: Arc<Limiter>,
    client: async_nats::Client,
    node_id: String,
    mut stop: watch::Receiver<bool>,
) {
    let session = uuid::Uuid::new_v4().simple().to_string();
    let mut sub = match client.subscribe(SUBJECT).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "rate limits: cannot subscribe to {SUBJECT}; enforcing an even local share");
            return;
        }
    };
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peers: HashMap<Arc<str>, Instant> = HashMap::new();
    let mut connected_at: Option<Instant> = None;
    let mut last_full = Instant::now();
    let mut hello = true;
    let mut asked_full = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            msg = futures::StreamExt::next(&mut sub) => {
                let Some(msg) = msg else { break };
                let Ok(sync) = LimitSync::decode(msg.payload) else {
                    limiter.fleet.rejected("undecodable");
                    tracing::warn!("rate limits: undecodable message on {SUBJECT}");
                    continue;
                };
                if sync.session == session {
                    continue;
                }
                if let Some(reason) = refuse_reason(&sync, crate::clock::unix_ms_now()) {
                    limiter.fleet.rejected(reason);
                    tracing::warn!(%reason, node_id = %sync.node_id.escape_debug(), "rate limits: implausible message on {SUBJECT} refused");
                    continue;
                }
                let peer: Arc<str> = Arc::from(format!("{}/{}", sync.node_id, sync.session));
                peers.insert(peer.clone(), Instant::now());
                asked_full |= sync.hello;
                limiter.apply(&peer, &sync);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let up = client.connection_state() == async_nats::connection::State::Connected;
                if !up {
                    if connected_at.take().is_some() {
                        tracing::warn!(nodes = limiter.fleet.nodes(), "rate limits: NATS lost; enforcing an even local share");
                    }
                    limiter.fleet.set_synced(false);
                    hello = true;
                    continue;
                }
                let since = *connected_at.get_or_insert(now);
                peers.retain(|p, seen| {
                    let live = now.duration_since(*seen) < PEER_TIMEOUT;
                    if !live {
                        limiter.forget_peer(p);
                    }
                    live
                });
                limiter.fleet.set_nodes(1 + peers.len() as u64);
                let full = hello || asked_full || now.duration_since(last_full) >= FULL_EVERY;
                let (windows, in_flight) = limiter.collect(full);
                if full || !windows.is_empty() || !in_flight.is_empty() {
                    let msg = LimitSync {
                        node_id: node_id.clone(),
                        session: session.clone(),
                        sent_unix_ms: crate::clock::unix_ms_now(),
                        full,
                        hello,
                        windows,
                        in_flight,
                    };
                    if let Err(e) = client.publish(SUBJECT, msg.encode_to_vec().into()).await {
                        tracing::warn!(error = %e, "rate limits: publish failed");
                        hello = true;
                        continue;
                    }
                    if full {
                        last_full = now;
                        asked_full = false;
                        limiter.prune(&|p| peers.contains_key(p), crate::clock::unix_ms_now());
                    }
                    if hello {
                        hello = false;
                        tracing::info!(peers = peers.len(), "rate limits: sharing counters with the fleet over NATS");
                    }
                }
                limiter.fleet.next_epoch();
                if now.duration_since(since) >= SETTLE && !limiter.fleet.is_synced() {
                    limiter.fleet.set_synced(true);
                }
            }
        }
    }
    limiter.fleet.set_synced(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn msg(counts: Vec<i64>, first_bucket: u64) -> LimitSync {
        LimitSync {
            node_id: "peer".into(),
            session: "s1".into(),
            sent_unix_ms: NOW,
            full: true,
            hello: false,
            windows: vec![WindowCounts {
                scope: "key/k1".into(),
                measure: Measure::TokensPerMinute as i32,
                first_bucket,
                counts,
            }],
            in_flight: vec![InFlight {
                scope: "key/k1".into(),
                count: 3,
            }],
        }
    }

    fn now_bucket() -> u64 {
        Kind::TokensPerMinute.bucket_of(NOW)
    }

    #[test]
    fn a_peers_real_counts_pass() {
        // Corrections can make a bucket negative; that is a real count.
        let m = msg(vec![900, -120, 40], now_bucket() - 2);
        assert_eq!(refuse_reason(&m, NOW), None);
    }

    #[test]
    fn forged_messages_are_refused_with_their_reason() {
        let b = now_bucket();
        let cases: Vec<(LimitSync, &str)> = vec![
            (msg(vec![i64::MAX], b), "count_out_of_bounds"),
            (msg(vec![i64::MIN], b), "count_out_of_bounds"),
            (msg(vec![1], u64::MAX), "bucket_out_of_range"),
            (msg(vec![1], b + 10 * 60 * 10), "bucket_out_of_range"),
            (msg(vec![0; 601], b - 600), "bucket_out_of_range"),
            (
                LimitSync {
                    in_flight: vec![InFlight {
                        scope: "key/k1".into(),
                        count: -1_000,
                    }],
                    ..msg(vec![1], b)
                },
                "in_flight_out_of_bounds",
            ),
            (
                LimitSync {
                    sent_unix_ms: NOW + 3_600_000,
                    ..msg(vec![1], b)
                },
                "clock_skew",
            ),
            (
                LimitSync {
                    node_id: String::new(),
                    ..msg(vec![1], b)
                },
                "bad_identity",
            ),
        ];
        for (m, reason) in cases {
            assert_eq!(refuse_reason(&m, NOW), Some(reason), "{m:?}");
        }
    }

    #[test]
    fn a_refused_message_is_counted_in_the_metrics() {
        let limiter = Limiter::default();
        limiter.fleet.rejected("count_out_of_bounds");
        limiter.fleet.rejected("count_out_of_bounds");
        let text = limiter.render_metrics();
        assert!(
            text.contains("aigw_ratelimit_sync_rejected_total{reason=\"count_out_of_bounds\"} 2"),
            "{text}"
        );
    }
}
