//! Node status shared between replicas: each replica writes the status of
//! the nodes whose config stream it holds into the KV bucket `AIGW_NODES`
//! (key: the node id in hex, a TTL so a dead replica's entries expire) and
//! reads everyone's back, so `/admin/v1/nodes` on any replica lists every node.

use crate::nodes::{NodeRegistry, NodeStatus};
use crate::replication::bucket::Bucket;
use crate::replication::Log;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;

pub const BUCKET: &str = "AIGW_NODES";
/// An entry no replica refreshed for this long is gone.
const TTL: Duration = Duration::from_secs(30);
/// How often a replica writes its nodes and reads the others'.
const EVERY: Duration = Duration::from_secs(2);

/// Publishes this replica's nodes and mirrors the others' until `stop`.
pub async fn share(log: Arc<Log>, nodes: Arc<NodeRegistry>, mut stop: watch::Receiver<bool>) {
    let mut bucket = None;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if bucket.is_none() {
            match open(&log).await {
                Ok(b) => bucket = Some(b),
                Err(e) => {
                    warn!(error = %e, "node status bucket unavailable");
                    continue;
                }
            }
        }
        if let Some(b) = &bucket {
            if let Err(e) = exchange(b, &log, &nodes).await {
                warn!(error = %e, "sharing node status failed");
            }
        }
    }
}

async fn open(log: &Log) -> Result<Bucket, String> {
    Bucket::open(log, BUCKET, TTL)
        .await
        .map_err(|e| e.to_string())
}

async fn exchange(bucket: &Bucket, log: &Log, nodes: &NodeRegistry) -> Result<(), String> {
    let mine = nodes.connected_here();
    for mut status in mine.iter().cloned() {
        status.replica = Some(log.replica_id().to_string());
        let value = serde_json::to_vec(&status).map_err(|e| e.to_string())?;
        bucket
            .put(&hex::encode(&status.node_id), value.into())
            .await
            .map_err(|e| format!("{e:?}"))?;
    }
    let mut others = BTreeMap::new();
    for value in bucket.values().await.map_err(|e| e.to_string())? {
        let Ok(status) = serde_json::from_slice::<NodeStatus>(&value) else {
            continue;
        };
        if status.replica.as_deref() != Some(log.replica_id()) {
            others.insert(status.node_id.clone(), status);
        }
    }
    nodes.set_remote(others);
    Ok(())
}
