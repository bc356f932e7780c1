use super::SnapshotCache;
use crate::nodes::NodeRegistry;
use aigw_shared::proto::config::v1 as pb;
use futures::{Stream, StreamExt};
use pb::config_service_server::{ConfigService, ConfigServiceServer};
use pb::watch_request::Kind;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};

/// How long a node has to say hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves snapshots from the cache to nodes that present the node token.
pub struct ConfigStreamService {
    cache: SnapshotCache,
    nodes: Arc<NodeRegistry>,
    token: [u8; 32],
    tasks: tokio_util::task::TaskTracker,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl ConfigStreamService {
    pub fn new(
        cache: SnapshotCache,
        nodes: Arc<NodeRegistry>,
        token: &str,
        tasks: tokio_util::task::TaskTracker,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> ConfigServiceServer<Self> {
        ConfigServiceServer::new(Self {
            cache,
            nodes,
            token: Sha256::digest(token.as_bytes()).into(),
            tasks,
            stop,
        })
        .max_decoding_message_size(64 * 1024)
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigService for ConfigStreamService {
    type WatchStream = SnapshotStream;

    #[instrument(skip_all, fields(node_id))]
    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::WatchRequest {
                kind: Some(Kind::Hello(h)),
            }))) => h,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no hello within 10s")),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ))
            }
        };
        let presented: [u8; 32] = Sha256::digest(hello.token.as_bytes()).into();
        if !bool::from(presented.ct_eq(&self.token)) {
            warn!(node_id = %hello.node_id, %peer, "config stream: wrong node token");
            return Err(Status::unauthenticated("wrong node token"));
        }
        if hello.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id must not be empty"));
        }
        let node_id = hello.node_id.clone();
        tracing::Span::current().record("node_id", node_id.as_str());
        let address = if hello.address.is_empty() {
            peer
        } else {
            hello.address
        };
        self.nodes.update(&node_id, |n| {
            n.address = address;
            n.connected = true;
            n.applied_version = n.applied_version.max(hello.version);
        });
        info!(node_id = %node_id, version = hello.version, "node connected to the config stream");

        // Acks and nacks arrive on the inbound half; the node list records them.
        let nodes = self.nodes.clone();
        self.tasks.spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                match msg.kind {
                    Some(Kind::Ack(a)) => nodes.update(&node_id, |n| {
                        n.applied_version = a.version;
                        n.last_error = None;
                    }),
                    Some(Kind::Nack(n)) => {
                        warn!(node_id = %node_id, version = n.version, reason = %n.reason, "node rejected a snapshot");
                        nodes.update(&node_id, |s| s.last_error = Some(format!("v{}: {}", n.version, n.reason)));
                    }
                    _ => {}
                }
            }
            nodes.update(&node_id, |n| n.connected = false);
            info!(node_id = %node_id, "node left the config stream");
        });

        // The current snapshot at once, then every newer one.
        // Streams end at shutdown so the server can drain.
        let mut stop = self.stop.clone();
        let out = WatchStream::new(self.cache.subscribe())
            .map(|s| {
                crate::metrics::METRICS.snapshot_pushed();
                Ok((*s).clone())
            })
            .take_until(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        Ok(Response::new(Box::pin(out)))
    }
}
