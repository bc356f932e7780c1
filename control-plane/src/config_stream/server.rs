use super::SnapshotCache;
use crate::engine::Engine;
use crate::events::State;
use crate::nodes::NodeRegistry;
use crate::secrets::node_seal_owner;
use aigw_shared::crypto::Cipher;
use aigw_shared::listener::PeerCertificates;
use aigw_shared::proto::config::v1 as pb;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures::{Stream, StreamExt};
use pb::config_service_server::{ConfigService, ConfigServiceServer};
use pb::watch_request::Kind;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Weak;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};

/// Longest error a node's hello may put in the node list.
const MAX_NODE_ERROR_CHARS: usize = 1024;

/// Most targets a node's status may list, and longest text in one.
const MAX_STATUS_TARGETS: usize = 4096;
const MAX_STATUS_TEXT: usize = 256;

/// A node's probe status as the node list shows it, bounded.
fn target_statuses(status: pb::Status) -> Vec<crate::nodes::TargetStatus> {
    let cut = |s: String| -> String { s.chars().take(MAX_STATUS_TEXT).collect() };
    status
        .targets
        .into_iter()
        .take(MAX_STATUS_TARGETS)
        .map(|t| crate::nodes::TargetStatus {
            provider_key_id: cut(t.provider_key_id),
            deployment: cut(t.deployment),
            healthy: t.healthy,
            last_probe: (!t.last_probe.is_empty()).then(|| cut(t.last_probe)),
            consecutive_failures: t.consecutive_failures,
            last_error: (!t.last_error.is_empty()).then(|| cut(t.last_error)),
        })
        .collect()
}

/// How long a node has to say hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves snapshots from the cache to nodes that present their credential.
pub struct ConfigStreamService {
    cache: SnapshotCache,
    engine: Weak<Engine>,
    nodes: Arc<NodeRegistry>,
    /// The shared node token and its digest, if one is configured.
    shared: Option<(String, [u8; 32])>,
    /// Mutual TLS: a node may only claim an id its certificate is valid for.
    node_certs: bool,
    tasks: tokio_util::task::TaskTracker,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// What a hello's token proved.
#[derive(Debug, Clone, PartialEq)]
enum Credential {
    /// The node's own credential with this id.
    Issued(String),
    /// The shared token, for an id without credentials of its own.
    Shared,
}

impl Credential {
    /// Whether the credential still speaks for `node_id`: an issued one
    /// until it is revoked, the shared token until the id gets its own.
    fn holds(&self, state: &State, node_id: &str) -> bool {
        let own = state.nodes.get(node_id);
        match self {
            Self::Issued(id) => {
                own.is_some_and(|r| r.value.credentials.iter().any(|c| &c.id == id))
            }
            Self::Shared => own.is_none(),
        }
    }
}

impl ConfigStreamService {
    pub fn new(
        cache: SnapshotCache,
        engine: Arc<Engine>,
        nodes: Arc<NodeRegistry>,
        shared_token: Option<String>,
        node_certs: bool,
        tasks: tokio_util::task::TaskTracker,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> ConfigServiceServer<Self> {
        ConfigServiceServer::new(Self {
            cache,
            engine: Arc::downgrade(&engine),
            nodes,
            shared: shared_token.map(|t| {
                let digest = Sha256::digest(t.as_bytes()).into();
                (t, digest)
            }),
            node_certs,
            tasks,
            stop,
        })
        .max_decoding_message_size(64 * 1024)
    }

    /// Checks a hello's token for `node_id`; returns what it proved and the
    /// node's seal key. A node id with credentials of its own takes only
    /// those; the shared token speaks for the others.
    fn authenticate(&self, node_id: &str, token: &str) -> Result<(Credential, Cipher), String> {
        let engine = self
            .engine
            .upgrade()
            .ok_or("the control plane is stopping")?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let state = engine.read();
        if let Some(record) = state.nodes.get(node_id) {
            for c in &record.value.credentials {
                let Ok(stored) =
                    <[u8; 32]>::try_from(hex::decode(&c.token_sha256).unwrap_or_default())
                else {
                    continue;
                };
                if bool::from(presented.ct_eq(&stored)) {
                    let key = engine
                        .cipher()
                        .open(&node_seal_owner(node_id, &c.id), &c.seal_key)
                        .ok()
                        .and_then(|k| B64.decode(k).ok())
                        .and_then(|k| <[u8; 32]>::try_from(k).ok())
                        .ok_or("the node's seal key cannot be opened with the master key")?;
                    return Ok((Credential::Issued(c.id.clone()), Cipher::new(&key)));
                }
            }
            return Err("not one of this node id's credentials (the shared token does not speak for an id with its own)".into());
        }
        match &self.shared {
            Some((shared, digest)) if bool::from(presented.ct_eq(digest)) => Ok((
                Credential::Shared,
                Cipher::new(&aigw_shared::crypto::node_seal_key(shared, node_id)),
            )),
            Some(_) => Err("wrong node token".into()),
            None => {
                Err("no shared node token is configured and this node id has no credential".into())
            }
        }
    }
}

/// Resolves once `credential` no longer speaks for `node_id` (revoked, or
/// the id got its own credentials); never while the engine is gone.
async fn revoked(engine: Weak<Engine>, node_id: String, credential: Credential) {
    let Some(mut versions) = engine.upgrade().map(|e| e.subscribe()) else {
        return std::future::pending().await;
    };
    while versions.changed().await.is_ok() {
        let Some(engine) = engine.upgrade() else {
            break;
        };
        if !credential.holds(&engine.read(), &node_id) {
            return;
        }
    }
    std::future::pending().await
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
        if hello.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id must not be empty"));
        }
        let (credential, node_key) = match self.authenticate(&hello.node_id, &hello.token) {
            Ok(c) => c,
            Err(why) => {
                warn!(node_id = %hello.node_id, %peer, %why, "config stream: credential refused");
                return Err(Status::unauthenticated(format!(
                    "the node credential is not valid for node id {}",
                    hello.node_id
                )));
            }
        };
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
        info!(node_id = %claim.node_id(), version = hello.version, ?credential, "node connected to the config stream");

        // Acks and nacks arrive on the inbound half; the node list records
        // them. The claim lives as long as this task: the node's stream,
        // which a revocation of its credential cuts.
        let cut = CancellationToken::new();
        let revocation = revoked(self.engine.clone(), hello.node_id.clone(), credential);
        let cutter = cut.clone();
        self.tasks.spawn(async move {
            tokio::pin!(revocation);
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(m)) => m,
                        _ => break,
                    },
                    () = &mut revocation => {
                        warn!(node_id = %claim.node_id(), "node credential revoked; ending its config stream");
                        cutter.cancel();
                        break;
                    }
                };
                match msg.kind {
                    Some(Kind::Ack(a)) => claim.update(|n| {
                        n.applied_version = a.version;
                        n.last_error = None;
                    }),
                    Some(Kind::Nack(n)) => {
                        warn!(node_id = %claim.node_id(), version = n.version, reason = %n.reason, "node rejected a snapshot");
                        claim.update(|s| s.last_error = Some(format!("v{}: {}", n.version, n.reason)));
                    }
                    Some(Kind::Status(s)) => {
                        let targets = target_statuses(s);
                        claim.update(|n| n.targets = targets);
                    }
                    _ => {}
                }
            }
            info!(node_id = %claim.node_id(), "node left the config stream");
        });

        // The current snapshot at once, then every newer one, its data key
        // sealed for this node. Streams end at shutdown so the server can
        // drain, and with an error when the credential is revoked.
        let mut stop = self.stop.clone();
        let node_id = hello.node_id;
        let ended = cut.clone();
        // A node that has the version already (from its snapshot file, or
        // from another replica) is not sent it again.
        let has = hello.version;
        let out = WatchStream::new(self.cache.subscribe())
            .filter(move |s| futures::future::ready(has == 0 || s.version != has))
            .map(move |s| {
                crate::metrics::METRICS.snapshot_pushed();
                s.for_node(&node_key, &node_id).map_err(|e| {
                    tracing::error!(error = %e, "sealing a snapshot for a node failed");
                    Status::internal(format!("sealing the snapshot: {e}"))
                })
            })
            .take_until(async move {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    () = cut.cancelled() => {}
                }
            })
            .chain(
                futures::stream::once(async move { ended.is_cancelled() }).filter_map(
                    |revoked| async move {
                        revoked.then(|| {
                            Err(Status::unauthenticated("the node credential was revoked"))
                        })
                    },
                ),
            );
        Ok(Response::new(Box::pin(out)))
    }
}
