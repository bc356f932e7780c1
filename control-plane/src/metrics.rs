//! Counters the control plane exposes on its admin port's `/metrics`
//! (Prometheus text, unauthenticated like `/livez`). None of these is on a
//! hot path: labelled series sit behind a mutex.

use crate::nodes::NodeRegistry;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex};

/// The control plane's listeners' gates, for `/metrics`.
#[derive(Clone)]
pub struct Listeners {
    pub admin: std::sync::Arc<aigw_shared::listener::Gate>,
    pub grpc: std::sync::Arc<aigw_shared::listener::Gate>,
}

#[derive(Default)]
pub struct CpMetrics {
    /// (resource collection, operation) → admin mutations applied.
    mutations: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Model alias → cost of counted usage, in nano-USD.
    cost_nanos: Mutex<BTreeMap<String, u64>>,
    snapshot_pushes: AtomicU64,
    usage_counted: AtomicU64,
    usage_duplicates: AtomicU64,
    usage_too_old: AtomicU64,
    /// Refusal reason → usage events from the bus refused as implausible.
    usage_rejected: Mutex<BTreeMap<&'static str, u64>>,
}

/// The process's control-plane metrics.
pub static METRICS: LazyLock<CpMetrics> = LazyLock::new(CpMetrics::default);

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl CpMetrics {
    /// An admin mutation (`create`, `update`, `delete`) reached the event log.
    pub fn mutation(&self, resource: &str, op: &'static str) {
        *self
            .mutations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((resource.to_string(), op))
            .or_default() += 1;
    }

    /// A config snapshot was sent to a data-plane node.
    pub fn snapshot_pushed(&self) {
        self.snapshot_pushes.fetch_add(1, Relaxed);
    }

    /// A usage batch was ingested: `counted` new events, `duplicates`
    /// dropped, `too_old` refused (older than the dedup window).
    pub fn usage_ingested(&self, counted: u64, duplicates: u64, too_old: u64) {
        self.usage_counted.fetch_add(counted, Relaxed);
        self.usage_duplicates.fetch_add(duplicates, Relaxed);
        self.usage_too_old.fetch_add(too_old, Relaxed);
    }

    /// A usage event from the bus failed the bounds in `usage::check`.
    pub fn usage_rejected(&self, reason: &'static str) {
        *self
            .usage_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Cost added to `model`'s usage, in nano-USD.
    pub fn cost(&self, model: &str, nanos: u64) {
        if nanos > 0 {
            let mut costs = self.cost_nanos.lock().unwrap_or_else(|p| p.into_inner());
            let c = costs.entry(model.to_string()).or_default();
            *c = c.saturating_add(nanos);
        }
    }

    pub fn render(&self, nodes: &NodeRegistry, state_version: u64) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# HELP aigw_cp_admin_mutations_total Admin mutations written to the event log, by resource and operation.");
        let _ = writeln!(s, "# TYPE aigw_cp_admin_mutations_total counter");
        for ((resource, op), n) in self
            .mutations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "aigw_cp_admin_mutations_total{{resource=\"{}\",op=\"{op}\"}} {n}",
                esc(resource)
            );
        }
        let _ = writeln!(
            s,
            "# HELP aigw_cp_cost_usd_total Cost of counted usage by model alias, in USD."
        );
        let _ = writeln!(s, "# TYPE aigw_cp_cost_usd_total counter");
        for (model, n) in self
            .cost_nanos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "aigw_cp_cost_usd_total{{model=\"{}\"}} {}",
                esc(model),
                *n as f64 / 1e9
            );
        }
        for (name, help, v) in [
            (
                "aigw_cp_snapshot_pushes_total",
                "Config snapshots sent to data-plane nodes.",
                &self.snapshot_pushes,
            ),
            (
                "aigw_cp_usage_events_total",
                "Usage events ingested and counted.",
                &self.usage_counted,
            ),
            (
                "aigw_cp_usage_duplicates_total",
                "Redelivered usage events dropped as duplicates.",
                &self.usage_duplicates,
            ),
            (
                "aigw_cp_usage_too_old_total",
                "Usage events refused for being older than the dedup window (8 days).",
                &self.usage_too_old,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            let _ = writeln!(s, "{name} {}", v.load(Relaxed));
        }
        let _ = writeln!(s, "# HELP aigw_cp_usage_rejected_total Usage events from the bus refused as implausible (forged or corrupt), by reason.");
        let _ = writeln!(s, "# TYPE aigw_cp_usage_rejected_total counter");
        for (reason, n) in self
            .usage_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(s, "aigw_cp_usage_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        let list = nodes.list();
        let connected = list.iter().filter(|n| n.connected).count();
        let _ = writeln!(
            s,
            "# HELP aigw_cp_nodes_connected Data-plane nodes on the config stream now."
        );
        let _ = writeln!(s, "# TYPE aigw_cp_nodes_connected gauge");
        let _ = writeln!(s, "aigw_cp_nodes_connected {connected}");
        let _ = writeln!(s, "# HELP aigw_cp_snapshot_version Config version (event sequence) of the control plane's state.");
        let _ = writeln!(s, "# TYPE aigw_cp_snapshot_version gauge");
        let _ = writeln!(s, "aigw_cp_snapshot_version {state_version}");
        let _ = writeln!(
            s,
            "# HELP aigw_cp_node_applied_version Config version each node applied."
        );
        let _ = writeln!(s, "# TYPE aigw_cp_node_applied_version gauge");
        for n in &list {
            let _ = writeln!(
                s,
                "aigw_cp_node_applied_version{{node_id=\"{}\"}} {}",
                esc(&n.node_id),
                n.applied_version
            );
        }
        s
    }
}
