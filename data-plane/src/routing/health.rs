use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
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
    /// No first byte or event within `first_token_timeout`: the latency
    /// seen counts for least-latency choice, not toward the circuit.
    Slow(Duration),
}

/// Probe verdicts (`TargetHealth::probe_state`).
const UNPROBED: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// A target's probe status, for the node list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStatus {
    pub healthy: bool,
    /// Unix milliseconds of the last probe's end; 0 before the first.
    pub last_probe_ms: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
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
    pub attempts_slow: AtomicU64,
    pub circuit_opened: AtomicU64,
    /// `UNPROBED` without health probes; else the probes' verdict.
    probe_state: AtomicU8,
    /// Probe interval in ms while probes run (0: none): a half-open circuit
    /// waits for the next good probe instead of a caller's attempt.
    probe_interval_ms: AtomicU64,
    probe_ok_streak: AtomicU32,
    probe_fail_streak: AtomicU32,
    last_probe_ms: AtomicU64,
    last_probe_error: Mutex<Option<String>>,
}

impl TargetHealth {
    pub fn availability(&self, now: u64) -> Availability {
        let probe_every = self.probe_interval_ms.load(Acquire);
        // Marked down by probes: no live traffic until they see it back.
        if self.probe_state.load(Acquire) == DOWN {
            return Availability::Until(now.saturating_add(probe_every.max(1)));
        }
        let cool = self.cooldown_until.load(Acquire);
        if cool > now {
            return Availability::Until(cool);
        }
        match self.open_until.load(Acquire) {
            0 => Availability::Ready,
            t if t > now => Availability::Until(t),
            // With probes, the half-open circuit is the probe's to close.
            _ if probe_every > 0 => Availability::Until(now.saturating_add(probe_every)),
            _ if self.probing.load(Acquire) => Availability::Until(now.saturating_add(1)),
            _ => Availability::Probe,
        }
    }

    /// Probes start (`Some(interval)`) or stop (`None`) for this target;
    /// stopping forgets their verdict.
    pub fn set_probed(&self, interval: Option<Duration>) {
        match interval {
            Some(i) => {
                self.probe_interval_ms.store(millis(i).max(1), Release);
                let _ = self
                    .probe_state
                    .compare_exchange(UNPROBED, UP, AcqRel, Acquire);
            }
            None => {
                self.probe_interval_ms.store(0, Release);
                self.probe_state.store(UNPROBED, Release);
                self.probe_ok_streak.store(0, Release);
                self.probe_fail_streak.store(0, Release);
                self.last_probe_ms.store(0, Release);
                *self.probe_error() = None;
            }
        }
    }

    /// One probe's result; true when the target's status changed (in or
    /// out of rotation, or a different failure).
    pub fn probe_result(
        &self,
        error: Option<String>,
        unhealthy_after: u32,
        healthy_after: u32,
        now: u64,
        unix_ms: u64,
    ) -> bool {
        self.last_probe_ms.store(unix_ms, Release);
        let before = self.probe_state.load(Acquire);
        let changed = match &error {
            None => {
                self.probe_fail_streak.store(0, Release);
                let ok = self.probe_ok_streak.fetch_add(1, AcqRel).saturating_add(1);
                if before == DOWN && ok >= healthy_after {
                    self.probe_state.store(UP, Release);
                }
                // A circuit past its cooldown is half-open: a good probe closes it.
                let open = self.open_until.load(Acquire);
                if open != 0 && open <= now {
                    self.failures.store(0, Release);
                    self.open_until.store(0, Release);
                    self.probing.store(false, Release);
                }
                self.probe_error().take().is_some()
            }
            Some(_) => {
                self.probe_ok_streak.store(0, Release);
                let failed = self
                    .probe_fail_streak
                    .fetch_add(1, AcqRel)
                    .saturating_add(1);
                if before != DOWN && failed >= unhealthy_after {
                    self.probe_state.store(DOWN, Release);
                }
                let mut last = self.probe_error();
                let differs = *last != error;
                *last = error;
                differs
            }
        };
        changed || before != self.probe_state.load(Acquire)
    }

    /// The probes' view; `None` without probes.
    pub fn probe_status(&self) -> Option<ProbeStatus> {
        let state = self.probe_state.load(Acquire);
        (state != UNPROBED).then(|| ProbeStatus {
            healthy: state == UP,
            last_probe_ms: self.last_probe_ms.load(Acquire),
            consecutive_failures: self.probe_fail_streak.load(Acquire),
            last_error: self.probe_error().clone(),
        })
    }

    fn probe_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_probe_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
            Outcome::Slow(latency) => {
                self.attempts_slow.fetch_add(1, Relaxed);
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
                ("slow", &h.attempts_slow),
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
        let _ = writeln!(s, "# HELP aigw_target_healthy Whether health probes see a deployment up (1) or down (0); only probed deployments.");
        let _ = writeln!(s, "# TYPE aigw_target_healthy gauge");
        for (pk, dep, h) in &all {
            if let Some(p) = h.probe_status() {
                let _ = writeln!(
                    s,
                    "aigw_target_healthy{{provider_key=\"{pk}\",deployment=\"{dep}\"}} {}",
                    u8::from(p.healthy)
                );
            }
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
    fn probes_take_a_target_out_and_bring_it_back() {
        let h = TargetHealth::default();
        assert_eq!(h.probe_status(), None);
        h.set_probed(Some(Duration::from_secs(1)));
        let fail = || Some("HTTP 503".to_string());
        assert!(!h.probe_result(None, 3, 2, 0, 1), "healthy stays healthy");
        assert!(h.probe_result(fail(), 3, 2, 0, 2), "a new error is news");
        assert!(!h.probe_result(fail(), 3, 2, 0, 3));
        assert_eq!(h.availability(0), Availability::Ready, "two of three");
        assert!(h.probe_result(fail(), 3, 2, 0, 4), "out of rotation");
        assert_eq!(h.availability(10), Availability::Until(1010));
        let st = h.probe_status().unwrap();
        assert_eq!(
            (st.healthy, st.consecutive_failures, st.last_probe_ms),
            (false, 3, 4)
        );
        assert!(h.probe_result(None, 3, 2, 0, 5), "the error cleared");
        assert!(matches!(h.availability(10), Availability::Until(_)));
        assert!(
            h.probe_result(None, 3, 2, 0, 6),
            "back after two good probes"
        );
        assert_eq!(h.availability(10), Availability::Ready);
        h.set_probed(None);
        assert_eq!(h.probe_status(), None);
    }

    #[test]
    fn with_probes_a_half_open_circuit_waits_for_a_good_probe() {
        let h = TargetHealth::default();
        h.set_probed(Some(Duration::from_millis(500)));
        for _ in 0..FAILURES_TO_OPEN {
            h.start();
            h.record(Outcome::Failure, 0, COOL);
        }
        assert_eq!(h.availability(999), Availability::Until(1000));
        // Past the cooldown no caller gets the half-open attempt.
        assert_eq!(h.availability(1000), Availability::Until(1500));
        h.probe_result(None, 3, 2, 1000, 1);
        assert_eq!(h.availability(1001), Availability::Ready);
    }

    #[test]
    fn a_slow_target_scores_worse_without_opening_its_circuit() {
        let h = TargetHealth::default();
        for _ in 0..FAILURES_TO_OPEN + 1 {
            h.start();
            h.record(Outcome::Slow(Duration::from_secs(2)), 0, COOL);
        }
        assert!(!h.is_open());
        assert!(h.score() >= 2_000_000.0);
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
