//! Counters the data plane exposes on `/metrics` (Prometheus text format).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Status codes 100..=599, one counter each: a fixed array keeps recording
/// to one atomic add on the hot path.
pub struct Metrics {
    by_status: Vec<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Metrics {
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
        s
    }
}
