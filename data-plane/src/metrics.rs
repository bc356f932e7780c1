//! Counters the data plane exposes on `/metrics` (Prometheus text format).
//!
//! Recording is lock-free: fixed arrays of atomics, and for labelled series
//! (model, status, deployment) a copy-on-write map behind an `ArcSwap`, read
//! with one atomic load. A label set seen for the first time copies the map
//! under a mutex; label values come from the config (aliases, deployments)
//! and status codes, so that happens a bounded number of times.

use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Latency histogram buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// One latency histogram: cumulative-on-render bucket counts, sum in microseconds.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, s: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&self.buckets) {
            cum += c.load(Relaxed);
            let _ = writeln!(s, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(s, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(s, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(s, "{name}_count{{{labels}}} {count}");
    }
}

/// Series of one metric keyed by their rendered label set (`a="x",b="y"`).
pub struct Family<T> {
    map: ArcSwap<HashMap<String, Arc<T>>>,
    grow: Mutex<()>,
}

impl<T> Default for Family<T> {
    fn default() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            grow: Mutex::new(()),
        }
    }
}

impl<T: Default> Family<T> {
    /// The series for `labels`, created on first use.
    pub fn get(&self, labels: &str) -> Arc<T> {
        if let Some(v) = self.map.load().get(labels) {
            return v.clone();
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.map.load_full();
        if let Some(v) = cur.get(labels) {
            return v.clone();
        }
        let mut next = (*cur).clone();
        let v = Arc::new(T::default());
        next.insert(labels.to_string(), v.clone());
        self.map.store(Arc::new(next));
        v
    }

    fn sorted(&self) -> Vec<(String, Arc<T>)> {
        let mut v: Vec<_> = self
            .map
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// `name="value"` with the value escaped for the text format.
pub fn label(name: &str, value: &str) -> String {
    let mut s = String::with_capacity(name.len() + value.len() + 3);
    s.push_str(name);
    s.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// What one finished call adds to the per-model series.
pub struct CallRecord<'a> {
    pub model: &'a str,
    pub status: u16,
    pub latency: Duration,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `hit`, `miss`, `bypass`, or empty when the cache was not consulted.
    pub cache: &'static str,
}

/// Per-model and per-deployment series.
#[derive(Default)]
struct Labelled {
    calls: Family<AtomicU64>,
    call_latency: Family<Histogram>,
    input_tokens: Family<AtomicU64>,
    output_tokens: Family<AtomicU64>,
    cache: Family<AtomicU64>,
    upstream_latency: Family<Histogram>,
    retries: Family<AtomicU64>,
    rejections: Family<AtomicU64>,
    fallbacks: Family<AtomicU64>,
}

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
    usage_spool_damaged: AtomicU64,
    labelled: Labelled,
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
            usage_spool_damaged: AtomicU64::new(0),
            labelled: Labelled::default(),
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

    /// Damaged records skipped while replaying the usage spool.
    pub fn usage_spool_damaged(&self, n: usize) {
        self.usage_spool_damaged.fetch_add(n as u64, Relaxed);
    }

    pub fn record_status(&self, status: u16) {
        if let Some(c) = self.by_status.get(status as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// A call finished (stream ends included): counts, latency, tokens.
    pub fn record_call(&self, c: &CallRecord<'_>) {
        let l = &self.labelled;
        let model = label("model", c.model);
        let by_status = format!("{model},status=\"{}\"", c.status);
        l.calls.get(&by_status).fetch_add(1, Relaxed);
        l.call_latency.get(&by_status).observe(c.latency);
        if c.input_tokens > 0 {
            l.input_tokens
                .get(&model)
                .fetch_add(c.input_tokens, Relaxed);
        }
        if c.output_tokens > 0 {
            l.output_tokens
                .get(&model)
                .fetch_add(c.output_tokens, Relaxed);
        }
        if !c.cache.is_empty() {
            l.cache
                .get(&format!("{model},result=\"{}\"", c.cache))
                .fetch_add(1, Relaxed);
        }
    }

    /// One upstream attempt took `latency`; `outcome` is `success`,
    /// `failure`, `rate_limited` or `error`.
    pub fn record_upstream(&self, deployment: &str, outcome: &'static str, latency: Duration) {
        let key = format!("{},outcome=\"{outcome}\"", label("deployment", deployment));
        self.labelled.upstream_latency.get(&key).observe(latency);
    }

    /// Another target is tried for a call to `model`.
    pub fn record_retry(&self, model: &str) {
        self.labelled
            .retries
            .get(&label("model", model))
            .fetch_add(1, Relaxed);
    }

    /// A call moved from alias `from` to its fallback `to` for `reason`.
    pub fn record_fallback(&self, from: &str, to: &str, reason: &str) {
        let labels = format!(
            "{},{},{}",
            label("from", from),
            label("to", to),
            label("reason", reason)
        );
        self.labelled.fallbacks.get(&labels).fetch_add(1, Relaxed);
    }

    /// A call was refused before reaching Azure: `budget` or `rate_limit`.
    pub fn record_rejection(&self, reason: &'static str) {
        self.labelled
            .rejections
            .get(&label("reason", reason))
            .fetch_add(1, Relaxed);
    }

    fn render_labelled(&self, s: &mut String) {
        let l = &self.labelled;
        for (name, help, fam) in [
            (
                "aigw_model_requests_total",
                "Finished calls by model alias and HTTP status (streams count when they end).",
                &l.calls,
            ),
            (
                "aigw_input_tokens_total",
                "Prompt tokens by model alias (as Azure reported, else estimated).",
                &l.input_tokens,
            ),
            (
                "aigw_output_tokens_total",
                "Completion tokens by model alias (as Azure reported, else estimated).",
                &l.output_tokens,
            ),
            (
                "aigw_cache_results_total",
                "Response cache results by model alias.",
                &l.cache,
            ),
            (
                "aigw_retries_total",
                "Calls moved on to another target after a retryable failure.",
                &l.retries,
            ),
            (
                "aigw_rejections_total",
                "Calls refused by the gateway's budget or rate limits.",
                &l.rejections,
            ),
            (
                "aigw_fallbacks_total",
                "Calls moved to a fallback model alias, by alias from and to and reason.",
                &l.fallbacks,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            for (labels, v) in fam.sorted() {
                let _ = writeln!(s, "{name}{{{labels}}} {}", v.load(Relaxed));
            }
        }
        for (name, help, fam) in [
            (
                "aigw_request_duration_seconds",
                "Call latency, first byte in to last byte out, by model alias and status.",
                &l.call_latency,
            ),
            (
                "aigw_upstream_duration_seconds",
                "Latency of each upstream attempt until Azure's answer headers, by deployment and outcome.",
                &l.upstream_latency,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} histogram");
            for (labels, h) in fam.sorted() {
                h.render(s, name, &labels);
            }
        }
    }

    pub fn render(&self, config_version: u64, ready: bool) -> String {
        let mut s = String::new();
        self.render_labelled(&mut s);
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
            (
                "aigw_usage_spool_damaged_total",
                "Damaged usage spool records skipped on replay (each logged with its offset).",
                &self.usage_spool_damaged,
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
