use super::snapshot_file::StoredSnapshot;
use super::SnapshotFile;
use aigw_shared::crypto::{Cipher, Sealed};
use aigw_shared::proto::config::v1 as pb;
use pb::config_service_client::ConfigServiceClient;
use pb::watch_request::Kind;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, instrument, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a node re-sends its targets' status when only probe times
/// moved (changes in health go at once).
const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// How long a node connected to a control plane that is behind it (a
/// replica still catching up) waits for it to reach the node's version
/// before taking the older snapshot as the truth (a control plane restored
/// from an older log).
const BEHIND_GRACE: Duration = Duration::from_secs(30);

pub struct WatchSettings {
    /// Control-plane replicas, tried in turn (at least one).
    pub control_plane_urls: Vec<String>,
    pub node_id: String,
    pub token: String,
    /// Address this node serves on, shown in the node list.
    pub address: String,
    /// TLS to the control plane (with an `https://` URL).
    pub tls: aigw_shared::config::GrpcClientTls,
    /// Largest snapshot message accepted.
    pub max_snapshot_bytes: usize,
}

/// The channel to the control plane: TLS for `https://` (system roots or
/// the configured CA, a client certificate for mutual TLS).
fn endpoint(settings: &WatchSettings, url: &str) -> Result<tonic::transport::Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    // A killed replica's socket resets at once; keep-alive finds one whose
    // host vanished. A dead address costs at most the connect timeout
    // before the next replica is tried.
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("data_plane.control_plane_url {url}: {e}"))?
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let tls = &settings.tls;
        let read = |path: &std::path::Path, key: &str| {
            std::fs::read(path).map_err(|e| {
                format!(
                    "data_plane.control_plane_tls.{key}: {}: {e}",
                    path.display()
                )
            })
        };
        let mut config = ClientTlsConfig::new();
        config = match &tls.ca_file {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca, "ca_file")?)),
            None => config.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            config = config.identity(Identity::from_pem(
                read(cert, "cert_file")?,
                read(key, "key_file")?,
            ));
        }
        if let Some(domain) = &tls.domain {
            config = config.domain_name(domain.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("data_plane.control_plane_tls: {e}"))?;
    }
    Ok(endpoint)
}

/// The node's own key, derived from its credential and id: what opens the
/// data key each snapshot carries (see `aigw_shared::snapshot`).
pub struct NodeKey {
    node_id: String,
    cipher: Cipher,
}

impl NodeKey {
    pub fn new(token: &str, node_id: &str) -> Self {
        Self {
            node_id: node_id.to_string(),
            cipher: Cipher::new(&aigw_shared::crypto::node_seal_key(token, node_id)),
        }
    }

    /// Opens the data key of snapshot `version`.
    pub fn open(&self, version: u64, sealed: Option<&Sealed>) -> Result<Cipher, String> {
        let sealed = sealed.ok_or("the snapshot carries no data key")?;
        aigw_shared::crypto::open_data_key(&self.cipher, &self.node_id, version, sealed)
            .map_err(|e| e.to_string())
    }
}

/// Where snapshots from the stream go (the node: compile, swap, tidy up).
pub trait Apply: Send + Sync + 'static {
    /// Decodes, opens (with the snapshot's `data_key`), validates and
    /// compiles a snapshot whole, then swaps it in; on error the node keeps
    /// its previous snapshot.
    fn apply(&self, body: &[u8], data_key: &Cipher) -> Result<u64, String>;

    /// Version of the applied snapshot, 0 before the first.
    fn version(&self) -> u64;

    /// The control plane's `version` could not be applied (`reason`): the
    /// node keeps its previous snapshot and reports how far behind it is.
    fn rejected(&self, version: u64, reason: &str);

    /// What the node's health probes see, for the control plane's node list.
    fn target_status(&self) -> Vec<pb::TargetHealth> {
        Vec::new()
    }

    /// Changes whenever [`Apply::target_status`] does (closed: never).
    fn status_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::channel(0).1
    }
}

/// Boots from the snapshot file if there is one.
pub fn boot_from_file(node: &dyn Apply, file: &SnapshotFile, key: &NodeKey) {
    match file.load() {
        Ok(Some(stored)) => match key
            .open(stored.version, Some(&stored.data_key))
            .and_then(|data_key| node.apply(&stored.body, &data_key))
        {
            Ok(v) => {
                info!(version = v, path = %file.path().display(), "booted from the snapshot file")
            }
            Err(e) => warn!(error = %e, "the snapshot file holds an unusable snapshot"),
        },
        Ok(None) => {}
        Err(e) => warn!(error = %e, "cannot read the snapshot file"),
    }
}

/// Keeps the node's configuration in step with the control plane until
/// `stop` flips: the stream becomes snapshots applied to the node. When a
/// stream breaks the node moves to the next replica at once; once every
/// replica failed in a row it waits with jittered exponential backoff.
/// While away, the node keeps serving its last snapshot.
#[instrument(skip_all, fields(node_id = %settings.node_id))]
pub async fn watch_control_plane(
    settings: WatchSettings,
    node: Arc<dyn Apply>,
    file: Arc<SnapshotFile>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut last_error = None;
    let key = NodeKey::new(&settings.token, &settings.node_id);
    let urls = &settings.control_plane_urls;
    // Nodes start on different replicas so a fleet spreads over them.
    let mut at = start_index(&settings.node_id, urls.len());
    let mut failed_in_a_row = 0usize;
    loop {
        let url = &urls[at % urls.len().max(1)];
        let session = session(
            &settings,
            url,
            &key,
            &*node,
            &file,
            &mut backoff,
            &mut last_error,
        );
        tokio::select! {
            r = session => {
                if let Err(e) = r {
                    warn!(error = %e, control_plane = %url, "config stream unavailable; serving the last snapshot");
                }
            }
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
        at = at.wrapping_add(1);
        if backoff == BACKOFF_MIN {
            // The stream had worked (a snapshot came): a fresh round.
            failed_in_a_row = 0;
        }
        failed_in_a_row += 1;
        let wait = if failed_in_a_row < urls.len() {
            BACKOFF_MIN
        } else {
            let w = backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            w
        };
        let jittered = wait.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

fn grace_end() -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(BEHIND_GRACE).unwrap_or(now)
}

fn start_index(node_id: &str, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node_id.hash(&mut h);
    (h.finish() % n.max(1) as u64) as usize
}

/// What a node does with a snapshot of `incoming` version while it serves
/// `current`.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    Apply,
    /// The node has it already (another replica of the same log): ack only.
    Have,
    /// Older than what the node serves: a replica catching up. Held back
    /// until [`BEHIND_GRACE`] passes with nothing newer.
    Behind,
}

fn take(current: u64, incoming: u64) -> Take {
    match incoming.cmp(&current) {
        std::cmp::Ordering::Greater => Take::Apply,
        std::cmp::Ordering::Equal if current > 0 => Take::Have,
        std::cmp::Ordering::Equal => Take::Apply,
        std::cmp::Ordering::Less => Take::Behind,
    }
}

async fn session(
    settings: &WatchSettings,
    url: &str,
    key: &NodeKey,
    node: &dyn Apply,
    file: &Arc<SnapshotFile>,
    backoff: &mut Duration,
    last_error: &mut Option<String>,
) -> Result<(), String> {
    let channel = endpoint(settings, url)?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client =
        ConfigServiceClient::new(channel).max_decoding_message_size(settings.max_snapshot_bytes);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::WatchRequest {
        kind: Some(Kind::Hello(pb::Hello {
            node_id: settings.node_id.clone(),
            token: settings.token.clone(),
            version: node.version(),
            address: settings.address.clone(),
            last_error: last_error.take().unwrap_or_default(),
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| "request stream closed".to_string())?;
    let mut stream = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("watch: {}", s.message()))?
        .into_inner();
    info!(control_plane = %url, "connected to the config stream");
    let mut status = node.status_changes();
    let mut status_open = true;
    let mut refresh = tokio::time::interval(STATUS_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: Option<Vec<pb::TargetHealth>> = None;
    // An older snapshot held back, and until when.
    let mut behind: Option<(pb::Snapshot, tokio::time::Instant)> = None;
    loop {
        let held_until = behind.as_ref().map(|(_, until)| *until);
        let message = tokio::select! {
            m = stream.message() => m,
            () = async { if let Some(t) = held_until { tokio::time::sleep_until(t).await } }, if held_until.is_some() => {
                warn!(applied = node.version(), "the control plane stayed behind this node's version: taking its snapshot as the truth");
                Ok(behind.take().map(|(snap, _)| snap))
            }
            changed = status.changed(), if status_open => {
                status_open = changed.is_ok();
                report_status(node, &tx, &mut reported).await?;
                continue;
            }
            _ = refresh.tick() => {
                report_status(node, &tx, &mut reported).await?;
                continue;
            }
        };
        let Some(snap) = message.map_err(|s| {
        let message = format!("stream: {}", s.message());
        // tonic's answer to a message above max_decoding_message_size.
        if s.code() == tonic::Code::OutOfRange {
            // A snapshot this node cannot take: it stays on the last good
            // one, says so on /readyz, and tells the control plane when it
            // reconnects.
            let reason = format!(
                "a snapshot above data_plane.max_snapshot_bytes ({} bytes) could not be received: {}",
                settings.max_snapshot_bytes,
                s.message()
            );
            node.rejected(node.version().saturating_add(1), &reason);
            *last_error = Some(reason);
        }
        message
    })?
        else {
            break;
        };
        *backoff = BACKOFF_MIN;
        let forced = held_until.is_some() && behind.is_none();
        match take(node.version(), snap.version) {
            Take::Apply => behind = None,
            Take::Behind if forced => {}
            Take::Have => {
                behind = None;
                info!(
                    version = snap.version,
                    "the control plane is at this node's version; nothing to apply"
                );
                let ack = Kind::Ack(pb::Ack {
                    version: snap.version,
                });
                if tx.send(pb::WatchRequest { kind: Some(ack) }).await.is_err() {
                    break;
                }
                continue;
            }
            Take::Behind => {
                info!(
                    version = snap.version,
                    applied = node.version(),
                    "the control plane is behind this node; waiting for it to catch up"
                );
                let until = behind.as_ref().map_or_else(grace_end, |(_, u)| *u);
                behind = Some((snap, until));
                continue;
            }
        }
        let data_key = snap.data_key.map(|k| Sealed {
            nonce: k.nonce,
            ciphertext: k.ciphertext,
        });
        let applied = key
            .open(snap.version, data_key.as_ref())
            .and_then(|dk| node.apply(&snap.body, &dk));
        let reply = match applied {
            Ok(version) => {
                info!(version, "applied config snapshot");
                let (file, body) = (file.clone(), snap.body);
                // The body keeps its credentials sealed; the file keeps the
                // data key as sealed for this node.
                let stored = data_key.map(|data_key| StoredSnapshot {
                    version: snap.version,
                    body,
                    data_key,
                });
                let write = move || stored.map_or(Ok(()), |s| file.store(&s));
                match tokio::task::spawn_blocking(write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot write the snapshot file"),
                    Err(e) => warn!(error = %e, "snapshot file task failed"),
                }
                Kind::Ack(pb::Ack { version })
            }
            Err(reason) => {
                warn!(version = snap.version, %reason, "rejected config snapshot; serving the last good one");
                node.rejected(snap.version, &reason);
                Kind::Nack(pb::Nack {
                    version: snap.version,
                    reason,
                })
            }
        };
        if tx
            .send(pb::WatchRequest { kind: Some(reply) })
            .await
            .is_err()
        {
            break;
        }
    }
    Err("the control plane closed the stream".into())
}

/// Sends the node's targets' status when it differs from what was sent on
/// this stream (nothing while no target is probed).
async fn report_status(
    node: &dyn Apply,
    tx: &mpsc::Sender<pb::WatchRequest>,
    reported: &mut Option<Vec<pb::TargetHealth>>,
) -> Result<(), String> {
    let now = node.target_status();
    if reported.as_ref() == Some(&now) || (reported.is_none() && now.is_empty()) {
        return Ok(());
    }
    tx.send(pb::WatchRequest {
        kind: Some(Kind::Status(pb::Status {
            targets: now.clone(),
        })),
    })
    .await
    .map_err(|_| "request stream closed".to_string())?;
    *reported = Some(now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_applies_newer_acks_its_own_and_holds_back_older_versions() {
        assert_eq!(take(0, 1), Take::Apply);
        assert_eq!(take(0, 0), Take::Apply);
        assert_eq!(take(7, 8), Take::Apply);
        assert_eq!(take(7, 7), Take::Have);
        assert_eq!(take(7, 3), Take::Behind);
    }

    #[test]
    fn nodes_spread_over_replicas_from_a_stable_start() {
        assert_eq!(start_index("n1", 1), 0);
        assert_eq!(start_index("n1", 0), 0);
        assert_eq!(start_index("n1", 3), start_index("n1", 3));
        let starts: std::collections::HashSet<usize> = (0..64)
            .map(|i| start_index(&format!("node-{i}"), 3))
            .collect();
        assert_eq!(starts.len(), 3, "64 nodes should start on all 3 replicas");
    }
}
