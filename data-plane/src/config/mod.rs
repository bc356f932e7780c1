//! Configuration on the data plane: the snapshot pushed by the control plane,
//! compiled into lookup tables ([`Runtime`]) and swapped atomically, so the hot
//! path reads it without a lock.
//!
//! - `runtime`       — compile a snapshot, validating it whole
//! - `watch`         — the stream from the control plane, with reconnect and backoff
//! - `snapshot_file` — the last good snapshot on disk, sealed with the node token

mod runtime;
mod snapshot_file;
pub mod watch;

pub use runtime::{CompileWith, Route, Runtime, Target, TargetAuth};
pub use snapshot_file::SnapshotFile;
pub use watch::{watch_control_plane, Apply, WatchSettings};

use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `/readyz` fails once the node has been unable to apply the control
/// plane's snapshots for this many versions...
pub const MAX_VERSIONS_BEHIND: u64 = 10;
/// ...or for this long, while it keeps serving its last good snapshot.
pub const MAX_TIME_BEHIND: Duration = Duration::from_secs(60);

/// The live compiled snapshot: readers `load` it lock-free; the node swaps
/// it in. Nothing else: the services a snapshot draws on are `node::Services`.
pub struct ConfigHandle {
    current: ArcSwapOption<Runtime>,
    version: tokio::sync::watch::Sender<u64>,
    /// Set while the newest offered snapshot could not be applied. Read by
    /// `/readyz` and `/metrics` only, never on the request path.
    behind: Mutex<Option<Behind>>,
    rejected: AtomicU64,
}

/// The node serves an older snapshot than the control plane offered.
#[derive(Debug, Clone)]
pub struct Behind {
    /// The newest version offered and refused.
    pub offered: u64,
    /// When the first refusal of this run happened.
    pub since: Instant,
    pub reason: String,
}

/// What `/readyz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// No snapshot applied yet.
    Waiting,
    Ready {
        version: u64,
    },
    /// Serving `version`, but the control plane's `offered` could not be
    /// applied for too long or too many versions.
    Stale {
        version: u64,
        offered: u64,
        secs: u64,
        reason: String,
    },
}

impl Default for ConfigHandle {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            version: tokio::sync::watch::channel(0).0,
            behind: Mutex::new(None),
            rejected: AtomicU64::new(0),
        }
    }
}

impl ConfigHandle {
    pub fn load(&self) -> Option<Arc<Runtime>> {
        self.current.load_full()
    }

    pub fn store(&self, runtime: Arc<Runtime>) {
        let v = runtime.version;
        self.current.store(Some(runtime));
        self.version.send_replace(v);
        let mut behind = self.behind();
        if behind.as_ref().is_some_and(|b| b.offered <= v) {
            *behind = None;
        }
    }

    /// The control plane offered `version` and it could not be applied; the
    /// last good snapshot stays in service.
    pub fn rejected(&self, version: u64, reason: &str) {
        self.rejected.fetch_add(1, Relaxed);
        let mut behind = self.behind();
        match behind.as_mut() {
            Some(b) => {
                b.offered = b.offered.max(version);
                b.reason = reason.to_string();
            }
            None => {
                *behind = Some(Behind {
                    offered: version,
                    since: Instant::now(),
                    reason: reason.to_string(),
                })
            }
        }
    }

    fn behind(&self) -> std::sync::MutexGuard<'_, Option<Behind>> {
        self.behind.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready once a snapshot is applied, unless the node has fallen more
    /// than `max_versions` or `max_time` behind what it was offered.
    pub fn readiness(&self, now: Instant, max_versions: u64, max_time: Duration) -> Readiness {
        if !self.is_ready() {
            return Readiness::Waiting;
        }
        let version = self.version();
        match self.behind().as_ref() {
            Some(b) => {
                let for_ = now.saturating_duration_since(b.since);
                if b.offered.saturating_sub(version) > max_versions || for_ > max_time {
                    Readiness::Stale {
                        version,
                        offered: b.offered,
                        secs: for_.as_secs(),
                        reason: b.reason.clone(),
                    }
                } else {
                    Readiness::Ready { version }
                }
            }
            None => Readiness::Ready { version },
        }
    }

    /// `aigw_config_*` series: refusals and how far behind the node is.
    pub fn render_metrics(&self) -> String {
        let behind = self.behind();
        let (versions, secs) = behind.as_ref().map_or((0, 0), |b| {
            (
                b.offered.saturating_sub(self.version()),
                b.since.elapsed().as_secs(),
            )
        });
        format!(
            "# HELP aigw_config_rejected_total Snapshots from the control plane this node could not apply.\n\
             # TYPE aigw_config_rejected_total counter\n\
             aigw_config_rejected_total {}\n\
             # HELP aigw_config_versions_behind Versions between the applied snapshot and the newest refused one.\n\
             # TYPE aigw_config_versions_behind gauge\n\
             aigw_config_versions_behind {versions}\n\
             # HELP aigw_config_seconds_behind Seconds since the node first failed to apply the newest offered snapshot.\n\
             # TYPE aigw_config_seconds_behind gauge\n\
             aigw_config_seconds_behind {secs}\n",
            self.rejected.load(Relaxed)
        )
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Version of the applied snapshot, 0 before the first.
    pub fn version(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |r| r.version)
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigw_shared::domain::Model;
    use aigw_shared::snapshot::{ConfigSnapshot, SnapshotProviderKey, SNAPSHOT_FORMAT};

    /// A snapshot with one model on deployment `deployment`.
    fn snapshot(version: u64, deployment: &str) -> ConfigSnapshot {
        let mut s = ConfigSnapshot {
            format: SNAPSHOT_FORMAT,
            version,
            ..Default::default()
        };
        s.provider_keys.insert(
            "pk".into(),
            SnapshotProviderKey {
                display_name: "azure".into(),
                adapter: "azure-openai".into(),
                api_base: "https://acme.openai.azure.com".into(),
                api_version: "2024-10-21".into(),
                ca_pem: None,
                allow_insecure_upstream: false,
                credential: aigw_shared::domain::Credential::ApiKey { key: "k".into() },
            },
        );
        s.models.insert(
            "m".into(),
            Model {
                display_name: "m".into(),
                provider: String::new(),
                model_name: Some(deployment.into()),
                provider_key_id: Some("pk".into()),
                targets: vec![],
                routing: None,
                rate_limit: None,
                cost: None,
                cache: None,
                log_payloads: false,
                context_window: None,
                fallbacks: Default::default(),
            },
        );
        s
    }

    /// Sends `s` through the wire format, as the control plane would.
    fn apply(node: &crate::node::Node, s: &ConfigSnapshot) -> Result<u64, String> {
        let data_key = aigw_shared::crypto::Cipher::new(&aigw_shared::crypto::new_data_key());
        let wire = s.clone().seal(&data_key).map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(&wire).map_err(|e| e.to_string())?;
        node.apply(&body, &data_key)
            .inspect_err(|e| node.rejected(s.version, e))
    }

    #[tokio::test]
    async fn a_node_that_cannot_apply_snapshots_keeps_serving_and_stops_being_ready() {
        let node = crate::node::Node {
            installed: Default::default(),
            services: Arc::new(crate::node::Services::new(Arc::default()).unwrap()),
            config: Arc::default(),
        };
        let h = &node.config;
        let minute = Duration::from_secs(60);
        assert_eq!(h.readiness(Instant::now(), 2, minute), Readiness::Waiting);
        apply(&node, &snapshot(5, "gpt-4o")).unwrap();
        assert_eq!(
            h.readiness(Instant::now(), 2, minute),
            Readiness::Ready { version: 5 }
        );

        // Given snapshot 6 carries a deployment name the write checks refuse
        // (stored by an older control plane), it is refused whole,
        let err = apply(&node, &snapshot(6, "gpt 4o")).unwrap_err();
        assert!(err.contains("model_name"), "{err}");
        // the node stays ready for a while, serving version 5,
        let now = Instant::now();
        assert_eq!(h.readiness(now, 2, minute), Readiness::Ready { version: 5 });
        assert!(h.load().unwrap().route("m").is_some());
        // but not once it is more than 2 versions behind,
        apply(&node, &snapshot(8, "../x")).unwrap_err();
        assert!(matches!(
            h.readiness(now, 2, minute),
            Readiness::Stale { version: 5, offered: 8, ref reason, .. } if reason.contains("model_name")
        ));
        // or behind for longer than the limit.
        assert!(matches!(
            h.readiness(now + Duration::from_secs(61), 10, minute),
            Readiness::Stale { .. }
        ));
        let metrics = h.render_metrics();
        assert!(
            metrics.contains("aigw_config_rejected_total 2\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("aigw_config_versions_behind 3\n"),
            "{metrics}"
        );

        // The next good snapshot is applied and the node is ready again.
        apply(&node, &snapshot(9, "gpt-4o-mini")).unwrap();
        assert_eq!(
            h.readiness(Instant::now(), 2, minute),
            Readiness::Ready { version: 9 }
        );
        assert!(h
            .render_metrics()
            .contains("aigw_config_versions_behind 0\n"));
    }
}
