//! Counters the data plane exposes on `/metrics` (Prometheus text format).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Status codes 100..=599, one counter each: a fixed array keeps recording
/// to one atomic add on the hot path.
pub struct Metrics {
    by_status: Vec<AtomicU64>,
    entra_token_refreshes: AtomicU64,
    entra_token_failures: AtomicU64,
    entra_forced_refreshes: AtomicU64,
    usage_buffer: AtomicU64,
    usage_published: AtomicU64,
    usage_spooled: AtomicU64,
    usage_dropped: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
            entra_token_refreshes: AtomicU64::new(0),
            entra_token_failures: AtomicU64::new(0),
            entra_forced_refreshes: AtomicU64::new(0),
            usage_buffer: AtomicU64::new(0),
            usage_published: AtomicU64::new(0),
            usage_spooled: AtomicU64::new(0),
            usage_dropped: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// An Entra ID token was fetched (first fetch or refresh).
    pub fn entra_token_refreshed(&self) {
        self.entra_token_refreshes.fetch_add(1, Relaxed);
    }

    /// An Entra ID token request failed.
    pub fn entra_token_failed(&self) {
        self.entra_token_failures.fetch_add(1, Relaxed);
    }

    /// Azure refused a token it had accepted; a new one is fetched.
    pub fn entra_forced_refresh(&self) {
        self.entra_forced_refreshes.fetch_add(1, Relaxed);
    }

    pub fn usage_buffered(&self) {
        self.usage_buffer.fetch_add(1, Relaxed);
    }

    pub fn usage_unbuffered(&self, n: usize) {
        self.usage_buffer.fetch_sub(n as u64, Relaxed);
    }

    pub fn usage_published(&self, n: usize) {
        self.usage_published.fetch_add(n as u64, Relaxed);
    }

    pub fn usage_spooled(&self, n: usize) {
        self.usage_spooled.fetch_add(n as u64, Relaxed);
    }

    pub fn usage_dropped(&self) {
        self.usage_dropped_n(1);
    }

    pub fn usage_dropped_n(&self, n: usize) {
        self.usage_dropped.fetch_add(n as u64, Relaxed);
    }

    pub fn record_status(&self, status: u16) {
        if let Some(c) = self.by_status.get(status as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn render(&self, config_version: u64, ready: bool) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP aigw_requests_total Proxy responses by HTTP status."
        );
        let _ = writeln!(s, "# TYPE aigw_requests_total counter");
        for (code, c) in self.by_status.iter().enumerate() {
            let n = c.load(Relaxed);
            if n > 0 {
                let _ = writeln!(s, "aigw_requests_total{{status=\"{code}\"}} {n}");
            }
        }
        let _ = writeln!(
            s,
            "# HELP aigw_config_version Version of the applied config snapshot."
        );
        let _ = writeln!(s, "# TYPE aigw_config_version gauge");
        let _ = writeln!(s, "aigw_config_version {config_version}");
        let _ = writeln!(
            s,
            "# HELP aigw_ready Whether the node has a config snapshot."
        );
        let _ = writeln!(s, "# TYPE aigw_ready gauge");
        let _ = writeln!(s, "aigw_ready {}", u8::from(ready));
        for (name, help, v) in [
            (
                "aigw_entra_token_refreshes_total",
                "Entra ID tokens fetched for the Azure upstream (first fetches and refreshes).",
                &self.entra_token_refreshes,
            ),
            (
                "aigw_entra_token_failures_total",
                "Entra ID token requests that failed.",
                &self.entra_token_failures,
            ),
            (
                "aigw_entra_forced_refreshes_total",
                "Entra ID tokens dropped because Azure refused them after accepting them.",
                &self.entra_forced_refreshes,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            let _ = writeln!(s, "{name} {}", v.load(Relaxed));
        }
        for (name, help, v) in [
            (
                "aigw_usage_buffer_depth",
                "Usage events waiting in the in-memory buffer.",
                &self.usage_buffer,
            ),
            (
                "aigw_usage_published_total",
                "Usage events acknowledged by the bus.",
                &self.usage_published,
            ),
            (
                "aigw_usage_spooled_total",
                "Usage events written to the disk spool while the bus was away.",
                &self.usage_spooled,
            ),
            (
                "aigw_usage_dropped_total",
                "Usage events lost because buffer and spool were both unavailable.",
                &self.usage_dropped,
            ),
        ] {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} {kind}");
            let _ = writeln!(s, "{name} {}", v.load(Relaxed));
        }
        s
    }
}
