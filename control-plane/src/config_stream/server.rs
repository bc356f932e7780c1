use super::SnapshotCache;
use crate::nodes::NodeRegistry;
use aigw_shared::listener::PeerCertificates;
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

/// Longest error a node's hello may put in the node list.
const MAX_NODE_ERROR_CHARS: usize = 1024;

/// How long a node has to say hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves snapshots from the cache to nodes that present the node token.
pub struct ConfigStreamService {
    cache: SnapshotCache,
    nodes: Arc<NodeRegistry>,
    token: [u8; 32],
    /// Mutual TLS: a node may only claim an id its certificate is valid for.
    node_certs: bool,
    tasks: tokio_util::task::TaskTracker,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl ConfigStreamService {
    pub fn new(
        cache: SnapshotCache,
        nodes: Arc<NodeRegistry>,
        token: &str,
        node_certs: bool,
        tasks: tokio_util::task::TaskTracker,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> ConfigServiceServer<Self> {
        ConfigServiceServer::new(Self {
            cache,
            nodes,
            token: Sha256::digest(token.as_bytes()).into(),
            node_certs,
            tasks,
            stop,
        })
        .max_decoding_message_size(64 * 1024)
    }
}

/// Whether the client's leaf certificate names `node_id` (a DNS name in its
/// subject alternative names): with mutual TLS that is the node's identity.
fn cert_names_node(certs: Option<&PeerCertificates>, node_id: &str) -> bool {
    let Some(leaf) = certs.and_then(|c| c.0.first()) else {
        return false;
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(node_id) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
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
        let certs = req.extensions().get::<PeerCertificates>().cloned();
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
        if self.node_certs && !cert_names_node(certs.as_ref(), &hello.node_id) {
            warn!(node_id = %hello.node_id, %peer, "config stream: client certificate is not for this node id");
            return Err(Status::permission_denied(format!(
                "the client certificate is not valid for node id {}",
                hello.node_id
            )));
        }
        let Some(claim) = self.nodes.claim(&hello.node_id) else {
            warn!(node_id = %hello.node_id, %peer, "config stream: node id already held by a live connection");
            return Err(Status::already_exists(format!(
                "node id {} is held by a live connection; node ids must be unique",
                hello.node_id
            )));
        };
        tracing::Span::current().record("node_id", claim.node_id());
        let address = if hello.address.is_empty() {
            peer
        } else {
            hello.address
        };
        let reported: String = hello
            .last_error
            .chars()
            .take(MAX_NODE_ERROR_CHARS)
            .collect();
        claim.update(|n| {
            n.address = address;
            n.connected = true;
            n.applied_version = n.applied_version.max(hello.version);
            if !reported.is_empty() {
                n.last_error = Some(reported);
            }
        });
        info!(node_id = %claim.node_id(), version = hello.version, "node connected to the config stream");

        // Acks and nacks arrive on the inbound half; the node list records
        // them. The claim lives as long as this task: the node's stream.
        self.tasks.spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                match msg.kind {
                    Some(Kind::Ack(a)) => claim.update(|n| {
                        n.applied_version = a.version;
                        n.last_error = None;
                    }),
                    Some(Kind::Nack(n)) => {
                        warn!(node_id = %claim.node_id(), version = n.version, reason = %n.reason, "node rejected a snapshot");
                        claim.update(|s| s.last_error = Some(format!("v{}: {}", n.version, n.reason)));
                    }
                    _ => {}
                }
            }
            info!(node_id = %claim.node_id(), "node left the config stream");
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
