use crate::engine::Engine;
use crate::error::Error;
use crate::events::State;
use aigw_shared::crypto::{Cipher, SecretKey};
use aigw_shared::domain::Credential;
use aigw_shared::proto::config::v1 as pb;
use aigw_shared::snapshot::{ConfigSnapshot, SnapshotProviderKey, SNAPSHOT_FORMAT};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, instrument};

/// What the fleet's Responses API id key is derived for from the master key.
const RESPONSE_ID_KEY_LABEL: &str = "aigw:response-id-key";

/// One encoded snapshot, shared by every node: its provider credentials are
/// sealed with `data_key`, which each node receives wrapped for itself.
pub struct Published {
    pub version: u64,
    body: Vec<u8>,
    data_key: [u8; 32],
}

impl Published {
    /// The message for one node: the shared body and the data key sealed
    /// with that node's key.
    pub fn for_node(&self, node_key: &Cipher, node_id: &str) -> Result<pb::Snapshot, Error> {
        let sealed =
            aigw_shared::crypto::seal_data_key(node_key, node_id, self.version, &self.data_key)?;
        Ok(pb::Snapshot {
            version: self.version,
            body: self.body.clone(),
            data_key: Some(pb::SealedKey {
                nonce: sealed.nonce,
                ciphertext: sealed.ciphertext,
            }),
        })
    }

    pub fn body_len(&self) -> usize {
        self.body.len()
    }
}

/// The newest encoded snapshot, rebuilt whenever the config version moves or
/// the set of api keys over budget changes. Many quick changes coalesce: a
/// node always gets the newest, never a backlog.
#[derive(Clone)]
pub struct SnapshotCache {
    rx: watch::Receiver<Arc<Published>>,
}

impl SnapshotCache {
    /// Builds the current snapshot and keeps it fresh on a background task
    /// that ends when the engine is dropped.
    pub fn spawn(
        engine: Arc<Engine>,
        mut exceeded: watch::Receiver<Arc<BTreeSet<String>>>,
        mut purges: watch::Receiver<Arc<BTreeMap<String, u64>>>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Result<Self, Error> {
        let first = encode(
            &engine,
            &exceeded.borrow_and_update().clone(),
            &purges.borrow_and_update().clone(),
        )?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let mut versions = engine.subscribe();
        let weak = Arc::downgrade(&engine);
        drop(engine);
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    r = versions.changed() => if r.is_err() { break },
                    r = exceeded.changed() => if r.is_err() { break },
                    r = purges.changed() => if r.is_err() { break },
                }
                let Some(engine) = weak.upgrade() else { break };
                let over = exceeded.borrow_and_update().clone();
                let purged = purges.borrow_and_update().clone();
                match encode(&engine, &over, &purged) {
                    Ok(s) => {
                        tx.send_replace(Arc::new(s));
                    }
                    // Nodes stay on the previous snapshot; the next change retries.
                    Err(e) => error!(error = %e, "building a config snapshot failed"),
                }
            }
        });
        Ok(Self { rx })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.rx.clone()
    }
}

#[instrument(skip_all, fields(version))]
fn encode(
    engine: &Engine,
    exceeded: &BTreeSet<String>,
    purges: &BTreeMap<String, u64>,
) -> Result<Published, Error> {
    let snapshot = {
        let state = engine.read();
        let mut s = build_snapshot(&state, engine.cipher())?;
        s.cache_purges = purges.clone();
        s.budget_exceeded = exceeded
            .iter()
            .filter(|k| state.api_keys.contains_key(*k))
            .cloned()
            .collect();
        s
    };
    tracing::Span::current().record("version", snapshot.version);
    let version = snapshot.version;
    let data_key = aigw_shared::crypto::new_data_key();
    let wire = snapshot.seal(&Cipher::new(&data_key))?;
    let body = serde_json::to_vec(&wire).map_err(|e| Error::Storage(e.to_string()))?;
    crate::metrics::METRICS.snapshot_bytes(body.len());
    Ok(Published {
        version,
        body,
        data_key,
    })
}

/// Resolves the state into what a data plane needs, with secrets decrypted
/// (sealed again for the wire by `encode`).
pub fn build_snapshot(
    state: &State,
    cipher: &aigw_shared::crypto::Cipher,
) -> Result<ConfigSnapshot, Error> {
    let mut provider_keys = std::collections::BTreeMap::new();
    for (id, r) in &state.provider_keys {
        let secret = cipher.open(id, &r.value.secret)?;
        provider_keys.insert(
            id.clone(),
            SnapshotProviderKey {
                display_name: r.value.display_name.clone(),
                adapter: r.value.adapter.clone(),
                api_base: r.value.api_base.clone(),
                api_version: r.value.api_version.clone(),
                ca_pem: r.value.ca_pem.clone(),
                allow_insecure_upstream: r.value.allow_insecure_upstream,
                // Unchecked here: a secret stored before a check existed is
                // refused by the data plane, which reports why (`last_error`).
                credential: Credential::parse_stored(&secret)?,
            },
        );
    }
    Ok(ConfigSnapshot {
        format: SNAPSHOT_FORMAT,
        version: state.version,
        provider_keys,
        models: state
            .models
            .iter()
            .map(|(k, r)| (k.clone(), r.value.clone()))
            .collect(),
        api_keys: state
            .api_keys
            .iter()
            .map(|(k, r)| (k.clone(), r.value.clone()))
            .collect(),
        budget_exceeded: BTreeSet::new(),
        cache_purges: Default::default(),
        jwt_providers: state
            .jwt_providers
            .iter()
            .map(|(k, r)| (k.clone(), r.value.clone()))
            .collect(),
        // Derived, not stored: every replica holds the master key, so every
        // replica hands the fleet the same key.
        response_id_key: Some(SecretKey(cipher.derive_key(RESPONSE_ID_KEY_LABEL))),
    })
}
