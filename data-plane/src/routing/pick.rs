use super::health::{Availability, TargetHealth};
use aigw_shared::domain::RoutingStrategy;
use rand::Rng;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// A model's targets as routing sees them: their health, weights and
/// priority groups; index `i` is the model route's target `i`.
#[derive(Debug)]
pub struct Pool {
    pub health: Vec<Arc<TargetHealth>>,
    /// `weights[i]` is target `i`'s weight.
    pub weights: Vec<u32>,
    /// Index ranges of targets with equal priority, in priority order.
    pub groups: Vec<Range<usize>>,
    pub strategy: RoutingStrategy,
    pub rr: AtomicUsize,
    /// How long a 429'd target rests without a hint, and a circuit stays open.
    pub cooldown: Duration,
}

/// The target for the next attempt; `probe` when it is the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub index: usize,
    pub probe: bool,
}

/// No target can take an attempt now; the first returns after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    pub retry_after: Duration,
}

/// Picks a target that has not been `tried` in this call: the first priority
/// group with an available target wins; inside it, the route's strategy.
pub fn pick(route: &Pool, tried: &[usize], now: u64) -> Result<Choice, Unavailable> {
    let mut soonest: Option<u64> = None;
    let mut candidates: Vec<usize> = Vec::with_capacity(route.health.len());
    for group in &route.groups {
        candidates.clear();
        for i in group.clone() {
            if tried.contains(&i) {
                continue;
            }
            let health = &route.health[i];
            match health.availability(now) {
                Availability::Ready => candidates.push(i),
                Availability::Probe if health.claim_probe() => {
                    return Ok(Choice {
                        index: i,
                        probe: true,
                    })
                }
                Availability::Probe => {
                    let next = now.saturating_add(1);
                    soonest = Some(soonest.map_or(next, |s| s.min(next)));
                }
                Availability::Until(t) => soonest = Some(soonest.map_or(t, |s| s.min(t))),
            }
        }
        if !candidates.is_empty() {
            return Ok(Choice {
                index: choose(route, &candidates),
                probe: false,
            });
        }
    }
    Err(Unavailable {
        retry_after: Duration::from_millis(
            soonest.map_or(millis(route.cooldown), |t| t.saturating_sub(now)),
        ),
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn choose(route: &Pool, candidates: &[usize]) -> usize {
    if let [only] = candidates {
        return *only;
    }
    match route.strategy {
        RoutingStrategy::Weighted => {
            let total: u64 = candidates
                .iter()
                .map(|&i| u64::from(route.weights[i]))
                .sum();
            let mut r = rand::thread_rng().gen_range(0..total.max(1));
            for &i in candidates {
                let w = u64::from(route.weights[i]);
                if r < w {
                    return i;
                }
                r -= w;
            }
            candidates.last().copied().unwrap_or_default()
        }
        RoutingStrategy::RoundRobin => {
            candidates[route.rr.fetch_add(1, Relaxed) % candidates.len()]
        }
        RoutingStrategy::LeastLatency => {
            // Power of two choices: two at random, the lower load-weighted latency wins.
            let mut rng = rand::thread_rng();
            let a = rng.gen_range(0..candidates.len());
            let mut b = rng.gen_range(0..candidates.len() - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            if route.health[a].score() <= route.health[b].score() {
                a
            } else {
                b
            }
        }
    }
}
