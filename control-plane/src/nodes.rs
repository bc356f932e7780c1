//! Data-plane nodes seen on the config stream, with the version each applied.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub node_id: String,
    pub address: String,
    pub applied_version: u64,
    /// RFC 3339.
    pub last_seen: String,
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// What the node's health probes found, per target (empty without probes).
    pub targets: Vec<TargetStatus>,
    /// The control-plane replica holding its config stream (replicated
    /// control plane only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// One target's probe status as a node reported it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetStatus {
    pub provider_key_id: String,
    pub deployment: String,
    pub healthy: bool,
    /// RFC 3339; absent before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<String>,
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
pub struct NodeRegistry {
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
    /// Node id → the config-stream session holding it.
    live: Mutex<HashMap<String, u64>>,
    sessions: AtomicU64,
    /// Nodes other replicas hold (replicated control plane), refreshed
    /// from the shared bucket by `replication::node_status`.
    remote: Mutex<BTreeMap<String, NodeStatus>>,
}

/// A config-stream session's hold on its node id: while it lives no other
/// connection may speak for that node, so only the node itself writes its
/// status. Dropping it (the stream ended) marks the node disconnected.
#[derive(Debug)]
pub struct Claim {
    registry: Arc<NodeRegistry>,
    node_id: String,
    session: u64,
}

impl Claim {
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Updates the claimed node's status.
    pub fn update(&self, f: impl FnOnce(&mut NodeStatus)) {
        self.registry.update(&self.node_id, f);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut live = self.registry.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(&self.node_id) == Some(&self.session) {
            live.remove(&self.node_id);
            drop(live);
            self.registry.update(&self.node_id, |n| n.connected = false);
        }
    }
}

impl NodeStatus {
    /// A node with a credential that has not connected yet.
    pub fn unseen(node_id: &str) -> Self {
        Self {
            node_id: node_id.to_string(),
            address: String::new(),
            applied_version: 0,
            last_seen: String::new(),
            connected: false,
            last_error: None,
            targets: Vec::new(),
            replica: None,
        }
    }
}

impl NodeRegistry {
    /// Every node this replica saw, and those other replicas hold now: a
    /// node connected elsewhere shows as they report it.
    pub fn list(&self) -> Vec<NodeStatus> {
        let mut all = self.lock().clone();
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        for (id, status) in remote.iter() {
            match all.get(id) {
                Some(local) if local.connected => {}
                _ => {
                    all.insert(id.clone(), status.clone());
                }
            }
        }
        all.into_values().collect()
    }

    /// The nodes whose config stream this replica holds now.
    pub fn connected_here(&self) -> Vec<NodeStatus> {
        self.lock()
            .values()
            .filter(|n| n.connected)
            .cloned()
            .collect()
    }

    /// Replaces what other replicas report.
    pub fn set_remote(&self, nodes: BTreeMap<String, NodeStatus>) {
        *self.remote.lock().unwrap_or_else(|p| p.into_inner()) = nodes;
    }

    /// Takes `node_id` for a new config-stream session; `None` while another
    /// live session holds it (a second process, or someone with a stolen
    /// token, claiming to be that node).
    pub fn claim(self: &Arc<Self>, node_id: &str) -> Option<Claim> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.contains_key(node_id) {
            return None;
        }
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        live.insert(node_id.to_string(), session);
        Some(Claim {
            registry: self.clone(),
            node_id: node_id.to_string(),
            session,
        })
    }

    fn update(&self, node_id: &str, f: impl FnOnce(&mut NodeStatus)) {
        let mut nodes = self.lock();
        let entry = nodes
            .entry(node_id.to_string())
            .or_insert_with(|| NodeStatus::unseen(node_id));
        f(entry);
        entry.last_seen = crate::events::format_rfc3339(time::OffsetDateTime::now_utc());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeStatus>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_node_id_cannot_be_claimed_twice() {
        let registry = Arc::new(NodeRegistry::default());
        let first = registry.claim("node-a").unwrap();
        first.update(|n| {
            n.connected = true;
            n.applied_version = 7;
        });
        assert!(registry.claim("node-a").is_none());
        assert!(registry.claim("node-b").is_some());
        let shown = registry.list();
        assert_eq!((shown[0].applied_version, shown[0].connected), (7, true));

        // Once the holder's stream ends the id is free again.
        drop(first);
        assert!(!registry.list()[0].connected);
        let again = registry.claim("node-a").unwrap();
        assert_eq!(again.node_id(), "node-a");
    }
}
