use super::health::Availability;
use crate::config::Route;
use aigw_shared::domain::RoutingStrategy;
use rand::Rng;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

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
pub fn pick(route: &Route, tried: &[usize], now: u64) -> Result<Choice, Unavailable> {
    let mut soonest: Option<u64> = None;
    let mut candidates: Vec<usize> = Vec::with_capacity(route.targets.len());
    for group in &route.groups {
        candidates.clear();
        for i in group.clone() {
            if tried.contains(&i) {
                continue;
            }
            let health = &route.targets[i].health;
            match health.availability(now) {
                Availability::Ready => candidates.push(i),
                Availability::Probe if health.claim_probe() => {
                    return Ok(Choice {
                        index: i,
                        probe: true,
                    })
                }
                Availability::Probe => soonest = Some(soonest.map_or(now + 1, |s| s.min(now + 1))),
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
            soonest.map_or(route.cooldown.as_millis() as u64, |t| t.saturating_sub(now)),
        ),
    })
}

fn choose(route: &Route, candidates: &[usize]) -> usize {
    if candidates.len() == 1 {
        return candidates[0];
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
            candidates[candidates.len() - 1]
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
            if route.targets[a].health.score() <= route.targets[b].health.score() {
                a
            } else {
                b
            }
        }
    }
}
