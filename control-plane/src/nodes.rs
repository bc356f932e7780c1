//! Data-plane nodes seen on the config stream, with the version each applied.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeStatus {
    pub node_id: String,
    pub address: String,
    pub applied_version: u64,
    /// RFC 3339.
    pub last_seen: String,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
pub struct NodeRegistry {
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
}

impl NodeRegistry {
    pub fn list(&self) -> Vec<NodeStatus> {
        self.lock().values().cloned().collect()
    }

    pub fn update(&self, node_id: &str, f: impl FnOnce(&mut NodeStatus)) {
        let mut nodes = self.lock();
        let entry = nodes
            .entry(node_id.to_string())
            .or_insert_with(|| NodeStatus {
                node_id: node_id.to_string(),
                address: String::new(),
                applied_version: 0,
                last_seen: String::new(),
                connected: false,
                last_error: None,
            });
        f(entry);
        entry.last_seen = crate::events::format_rfc3339(time::OffsetDateTime::now_utc());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeStatus>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }
}
