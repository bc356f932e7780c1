use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Consecutive failures that open a target's circuit.
pub const FAILURES_TO_OPEN: u32 = 5;

/// What an attempt told us about its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered (any answer that is not its own fault).
    Success(Duration),
    /// Connect error, timeout or 5xx: counts toward opening the circuit.
    Failure,
    /// 429: cool down for the hinted time, or the route's default.
    RateLimited(Option<Duration>),
}

/// Whether a target may take an attempt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Ready,
    /// Circuit half-open: one probe may go.
    Probe,
    /// Not before this time (`clock::monotonic_ms`).
    Until(u64),
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
pub struct TargetHealth {
    cooldown_until: AtomicU64,
    open_until: AtomicU64,
    failures: AtomicU32,
    probing: AtomicBool,
    /// Peak-EWMA of time to response headers, microseconds (f64 bits).
    ewma_us: AtomicU64,
    inflight: AtomicU32,
    pub attempts_ok: AtomicU64,
    pub attempts_failed: AtomicU64,
    pub attempts_rate_limited: AtomicU64,
    pub circuit_opened: AtomicU64,
}

impl TargetHealth {
    pub fn availability(&self, now: u64) -> Availability {
        let cool = self.cooldown_until.load(Acquire);
        if cool > now {
            return Availability::Until(cool);
        }
        match self.open_until.load(Acquire) {
            0 => Availability::Ready,
            t if t > now => Availability::Until(t),
            _ if self.probing.load(Acquire) => Availability::Until(now.saturating_add(1)),
            _ => Availability::Probe,
        }
    }

    /// Claims the single half-open probe; false if another attempt has it.
    pub fn claim_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, AcqRel, Acquire)
            .is_ok()
    }

    pub fn is_open(&self) -> bool {
        self.open_until.load(Acquire) != 0
    }

    /// Latency score for least-latency choice: peak-EWMA weighted by load.
    pub fn score(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma_us.load(Relaxed));
        (ewma.max(1.0)) * f64::from(self.inflight.load(Relaxed) + 1)
    }

    pub fn start(&self) {
        self.inflight.fetch_add(1, Relaxed);
    }

    pub fn record(&self, outcome: Outcome, now: u64, cooldown: Duration) {
        self.inflight.fetch_sub(1, Relaxed);
        match outcome {
            Outcome::Success(latency) => {
                self.attempts_ok.fetch_add(1, Relaxed);
                self.failures.store(0, Release);
                self.open_until.store(0, Release);
                self.probing.store(false, Release);
                self.observe(latency);
            }
            Outcome::RateLimited(wait) => {
                self.attempts_rate_limited.fetch_add(1, Relaxed);
                let until = now.saturating_add(millis(wait.unwrap_or(cooldown)));
                self.cooldown_until.fetch_max(until, AcqRel);
                // Whatever the probe found, the target answered.
                self.probing.store(false, Release);
            }
            Outcome::Failure => {
                self.attempts_failed.fetch_add(1, Relaxed);
                let n = self.failures.fetch_add(1, AcqRel) + 1;
                let was_probe = self.probing.swap(false, AcqRel);
                if was_probe || n >= FAILURES_TO_OPEN {
                    if self.open_until.load(Acquire) == 0 || was_probe {
                        self.circuit_opened.fetch_add(1, Relaxed);
                    }
                    self.open_until
                        .store(now.saturating_add(millis(cooldown).max(1)), Release);
                }
            }
        }
    }

    /// Gives back a probe or in-flight slot when the attempt told us nothing.
    pub fn abandon(&self) {
        self.inflight.fetch_sub(1, Relaxed);
        self.probing.store(false, Release);
    }

    fn observe(&self, latency: Duration) {
        let sample = latency.as_micros() as f64;
        let old = f64::from_bits(self.ewma_us.load(Relaxed));
        // Peak: jump up at once, decay slowly.
        let new = if sample > old {
            sample
        } else {
            old * 0.9 + sample * 0.1
        };
        self.ewma_us.store(new.to_bits(), Relaxed);
    }
}

/// Health per deployment (provider key id, deployment), kept across snapshots
/// so a config change does not forget a broken target.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    targets: Mutex<HashMap<(String, String), Arc<TargetHealth>>>,
}

impl HealthRegistry {
    pub fn get(&self, provider_key_id: &str, deployment: &str) -> Arc<TargetHealth> {
        let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        t.entry((provider_key_id.to_string(), deployment.to_string()))
            .or_default()
            .clone()
    }

    /// Forgets deployments no snapshot routes to any more.
    pub fn retain(&self, keep: &dyn Fn(&str, &str) -> bool) {
        let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        t.retain(|(pk, dep), _| keep(pk, dep));
    }

    /// (provider key id, deployment, health) of every known deployment.
    pub fn all(&self) -> Vec<(String, String, Arc<TargetHealth>)> {
        let t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = t
            .iter()
            .map(|((p, d), h)| (p.clone(), d.clone(), h.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }
}

impl HealthRegistry {
    /// Prometheus text: attempts by deployment and outcome, circuit state.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let all = self.all();
        let _ = writeln!(
            s,
            "# HELP aigw_upstream_attempts_total Upstream attempts by deployment and outcome."
        );
        let _ = writeln!(s, "# TYPE aigw_upstream_attempts_total counter");
        for (pk, dep, h) in &all {
            for (outcome, c) in [
                ("ok", &h.attempts_ok),
                ("failed", &h.attempts_failed),
                ("rate_limited", &h.attempts_rate_limited),
            ] {
                let _ = writeln!(
                    s,
                    "aigw_upstream_attempts_total{{provider_key=\"{pk}\",deployment=\"{dep}\",outcome=\"{outcome}\"}} {}",
                    c.load(Relaxed)
                );
            }
        }
        let _ = writeln!(s, "# HELP aigw_upstream_circuit_open Whether a deployment's circuit is open (1) or closed (0).");
        let _ = writeln!(s, "# TYPE aigw_upstream_circuit_open gauge");
        for (pk, dep, h) in &all {
            let _ = writeln!(
                s,
                "aigw_upstream_circuit_open{{provider_key=\"{pk}\",deployment=\"{dep}\"}} {}",
                u8::from(h.is_open())
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_millis(1000);

    #[test]
    fn circuit_opens_after_consecutive_failures_and_a_probe_closes_it() {
        let h = TargetHealth::default();
        for i in 0..FAILURES_TO_OPEN {
            assert_eq!(h.availability(100), Availability::Ready, "failure {i}");
            h.start();
            h.record(Outcome::Failure, 100, COOL);
        }
        assert_eq!(h.availability(100), Availability::Until(1100));
        assert_eq!(h.availability(1100), Availability::Probe);
        assert!(h.claim_probe());
        assert!(!h.claim_probe(), "one probe at a time");
        assert!(matches!(h.availability(1100), Availability::Until(_)));
        h.start();
        h.record(Outcome::Success(Duration::from_millis(5)), 1100, COOL);
        assert_eq!(h.availability(1101), Availability::Ready);
        assert!(!h.is_open());
    }

    #[test]
    fn a_failed_probe_reopens_and_success_resets_the_count() {
        let h = TargetHealth::default();
        for _ in 0..FAILURES_TO_OPEN {
            h.start();
            h.record(Outcome::Failure, 0, COOL);
        }
        assert!(h.claim_probe());
        h.start();
        h.record(Outcome::Failure, 2000, COOL);
        assert_eq!(h.availability(2000), Availability::Until(3000));
        assert_eq!(h.circuit_opened.load(Relaxed), 2);
        // Fewer than the threshold after a success never opens it.
        let h = TargetHealth::default();
        for _ in 0..FAILURES_TO_OPEN - 1 {
            h.start();
            h.record(Outcome::Failure, 0, COOL);
        }
        h.start();
        h.record(Outcome::Success(Duration::ZERO), 0, COOL);
        h.start();
        h.record(Outcome::Failure, 0, COOL);
        assert_eq!(h.availability(0), Availability::Ready);
    }

    #[test]
    fn rate_limit_cools_for_the_hint_or_the_default() {
        let h = TargetHealth::default();
        h.start();
        h.record(
            Outcome::RateLimited(Some(Duration::from_millis(2000))),
            10,
            COOL,
        );
        assert_eq!(h.availability(10), Availability::Until(2010));
        assert_eq!(h.availability(2010), Availability::Ready);
        h.start();
        h.record(Outcome::RateLimited(None), 3000, COOL);
        assert_eq!(h.availability(3000), Availability::Until(4000));
        assert!(!h.is_open(), "429 is not a failure");
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays() {
        let h = TargetHealth::default();
        h.start();
        h.record(Outcome::Success(Duration::from_millis(100)), 0, COOL);
        let peak = h.score();
        h.start();
        h.record(Outcome::Success(Duration::from_millis(10)), 0, COOL);
        assert!(h.score() < peak && h.score() > 10_000.0);
        h.start();
        assert!(
            h.score() > 2.0 * 10_000.0,
            "in-flight work raises the score"
        );
    }
}
