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
        )
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
                    tracing::warn!("rate limits: undecodable message on {SUBJECT}");
                    continue;
                };
                if sync.session == session {
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
