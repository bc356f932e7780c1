//! The write path: one command at a time is handled against the current
//! state, appended durably, then folded into the state that readers see.

use crate::error::Error;
use crate::events::{handle, Command, State, StoredEvent};
use crate::secrets::Cipher;
use crate::store::EventStore;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use time::OffsetDateTime;
use tokio::sync::{watch, Mutex};
use tracing::{info, instrument, warn};

const SNAPSHOT_FORMAT: u32 = 1;
const KEY_CHECK: &str = "key_check";
const KEY_CHECK_OWNER: &str = "aigw:key-check";

pub struct Engine {
    store: Arc<dyn EventStore>,
    state: RwLock<State>,
    /// Serialises handle → append → apply, so sequence numbers are gapless and
    /// every command is checked against the state its event follows.
    writer: Mutex<()>,
    cipher: Cipher,
    snapshot_every: u64,
    version: watch::Sender<u64>,
    /// Set when an append failed: memory and disk may disagree, so no more
    /// writes until a restart replays the log.
    failed: AtomicBool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotDoc {
    format: u32,
    state: State,
}

impl Engine {
    /// Opens the log: checks the master key, then rebuilds state from the
    /// newest snapshot plus the events after it.
    pub async fn open(
        store: Arc<dyn EventStore>,
        cipher: Cipher,
        snapshot_every: u64,
    ) -> Result<Arc<Self>, Error> {
        Ok(Self::open_rotating(store, cipher, None, snapshot_every)
            .await?
            .0)
    }

    /// Like [`open`](Self::open), also accepting a data dir written with
    /// `previous` (a master key rotation under way). Returns whether the data
    /// is still sealed with `previous`: then `secrets::finish_rotation` must
    /// re-seal it before anything reads a secret.
    pub async fn open_rotating(
        store: Arc<dyn EventStore>,
        cipher: Cipher,
        previous: Option<Cipher>,
        snapshot_every: u64,
    ) -> Result<(Arc<Self>, bool), Error> {
        let (state, cipher, rotating) = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || -> Result<_, Error> {
                let rotating = check_master_key(&*store, &cipher, previous.as_ref())?;
                Ok((replay(&*store)?, cipher, rotating))
            })
            .await
            .map_err(|e| Error::Storage(format!("replay task failed: {e}")))??
        };
        let (version, _) = watch::channel(state.version);
        let engine = Arc::new(Self {
            store,
            state: RwLock::new(state),
            writer: Mutex::new(()),
            cipher,
            snapshot_every: snapshot_every.max(1),
            version,
            failed: AtomicBool::new(false),
        });
        Ok((engine, rotating))
    }

    /// Finishes a master key rotation: every secret still sealed with
    /// `previous` is sealed again with the engine's key, one event each (actor
    /// `system:master-key-rotation`), then the data dir is marked as sealed with
    /// the new key. Safe to repeat after a crash: a secret already re-sealed
    /// opens with the new key and is left alone. Returns how many were re-sealed.
    pub async fn finish_rotation(&self, previous: &Cipher) -> Result<usize, Error> {
        let engine = self;
        use crate::events::{Command, ResourceValue};
        const ACTOR: &str = "system:master-key-rotation";
        let current = engine.cipher();
        let mut commands = Vec::new();
        {
            let state = engine.read();
            for (id, r) in &state.provider_keys {
                if current.open(id, &r.value.secret).is_ok() {
                    continue;
                }
                let plain = previous.open(id, &r.value.secret)?;
                let mut value = r.value.clone();
                value.secret = current.seal(id, &plain)?;
                commands.push(Command::Update {
                    id: id.clone(),
                    value: ResourceValue::ProviderKey(value),
                    expected_revision: Some(r.revision),
                    upsert: false,
                });
            }
            for (node_id, r) in &state.nodes {
                for c in &r.value.credentials {
                    let owner = crate::secrets::node_seal_owner(node_id, &c.id);
                    if current.open(&owner, &c.seal_key).is_ok() {
                        continue;
                    }
                    let plain = previous.open(&owner, &c.seal_key)?;
                    commands.push(Command::ResealNodeCredential {
                        node_id: node_id.clone(),
                        credential_id: c.id.clone(),
                        seal_key: current.seal(&owner, &plain)?,
                    });
                }
            }
        }
        let n = commands.len();
        for command in commands {
            engine.execute(command, ACTOR).await?;
        }
        engine.confirm_master_key()?;
        Ok(n)
    }

    /// Records that every secret is now sealed with this engine's master key.
    pub fn confirm_master_key(&self) -> Result<(), Error> {
        write_key_check(&*self.store, &self.cipher)
    }

    /// Handles, stores durably and applies one command; returns its events.
    #[instrument(skip_all, fields(actor = %actor, seq))]
    pub async fn execute(&self, command: Command, actor: &str) -> Result<Vec<StoredEvent>, Error> {
        let _guard = self.writer.lock().await;
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Storage(
                "an earlier write failed to reach the disk; restart the control plane to recover from the log".into(),
            ));
        }
        let (events, base) = {
            let state = self.read();
            (handle(&state, &command)?, state.version)
        };
        let at = OffsetDateTime::now_utc();
        let stored: Vec<StoredEvent> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| StoredEvent {
                seq: base + 1 + i as u64,
                at,
                actor: actor.to_string(),
                event,
            })
            .collect();
        let store = self.store.clone();
        let batch = stored.clone();
        let appended = tokio::task::spawn_blocking(move || store.append(&batch))
            .await
            .map_err(|e| Error::Storage(format!("append task failed: {e}")))
            .and_then(|r| r);
        if let Err(e) = appended {
            // The batch may or may not be on disk; refuse to guess.
            self.failed.store(true, Ordering::Release);
            tracing::error!(error = %e, "appending to the event log failed; refusing further writes");
            return Err(e);
        }
        let new_version = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            for e in &stored {
                state.apply(e);
            }
            state.version
        };
        tracing::Span::current().record("seq", new_version);
        let (resource, op) = command.describe();
        crate::metrics::METRICS.mutation(resource.collection(), op);
        if new_version / self.snapshot_every > base / self.snapshot_every {
            // Serialised and written on a blocking thread, not an async worker.
            let state = self.read().clone();
            let store = self.store.clone();
            let saved = tokio::task::spawn_blocking(move || save_snapshot(&*store, state)).await;
            if let Err(e) = saved
                .map_err(|e| Error::Storage(e.to_string()))
                .and_then(|r| r)
            {
                // The log is intact; only start-up gets slower.
                warn!(error = %e, "writing a state snapshot failed");
            }
        }
        self.version.send_replace(new_version);
        Ok(stored)
    }

    /// Writes a compacted snapshot of the current state.
    pub fn snapshot(&self) -> Result<u64, Error> {
        let state = self.read().clone();
        save_snapshot(&*self.store, state)
    }

    /// Read access to the current state. Hold it briefly: writers wait.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cipher(&self) -> &Cipher {
        &self.cipher
    }

    /// Watches the config version (sequence of the last applied event).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn store(&self) -> &dyn EventStore {
        &*self.store
    }
}

fn save_snapshot(store: &dyn EventStore, state: State) -> Result<u64, Error> {
    let seq = state.version;
    let doc = SnapshotDoc {
        format: SNAPSHOT_FORMAT,
        state,
    };
    let bytes = serde_json::to_vec(&doc).map_err(|e| Error::Storage(e.to_string()))?;
    store.save_snapshot(seq, &bytes)?;
    Ok(seq)
}

/// Rebuilds state from the newest readable snapshot and the log after it,
/// checking that sequence numbers have no gap.
pub fn replay(store: &dyn EventStore) -> Result<State, Error> {
    let started = std::time::Instant::now();
    let mut state = State::default();
    if let Some((seq, bytes)) = store.latest_snapshot()? {
        match serde_json::from_slice::<SnapshotDoc>(&bytes) {
            Ok(doc) if doc.format == SNAPSHOT_FORMAT && doc.state.version == seq => {
                state = doc.state;
                state.reindex();
            }
            Ok(_) => warn!(
                seq,
                "ignoring a snapshot of another format; replaying the whole log"
            ),
            Err(e) => {
                warn!(seq, error = %e, "ignoring an unreadable snapshot; replaying the whole log")
            }
        }
    }
    let from_snapshot = state.version;
    for event in store.read_from(state.version + 1) {
        let event = event?;
        if event.seq != state.version + 1 {
            return Err(Error::Storage(format!(
                "event log has a gap: expected seq {}, found {}",
                state.version + 1,
                event.seq
            )));
        }
        state.apply(&event);
    }
    info!(
        version = state.version,
        from_snapshot,
        replayed = state.version - from_snapshot,
        ms = started.elapsed().as_millis() as u64,
        "state rebuilt from the event log"
    );
    Ok(state)
}

/// Refuses to start with a master key other than the one the data was
/// written with, unless it was written with `previous` (returns `true`: a
/// rotation to finish).
fn check_master_key(
    store: &dyn EventStore,
    cipher: &Cipher,
    previous: Option<&Cipher>,
) -> Result<bool, Error> {
    let Some(bytes) = store.meta_get(KEY_CHECK)? else {
        write_key_check(store, cipher)?;
        return Ok(false);
    };
    let sealed = serde_json::from_slice(&bytes).map_err(|e| Error::Storage(e.to_string()))?;
    if cipher.open(KEY_CHECK_OWNER, &sealed).is_ok() {
        if previous.is_some() {
            info!("secrets.previous_master_key is no longer needed: the data is sealed with the current key");
        }
        return Ok(false);
    }
    if previous.is_some_and(|p| p.open(KEY_CHECK_OWNER, &sealed).is_ok()) {
        return Ok(true);
    }
    Err(Error::Crypto(
        "the master key does not match the one this data directory was written with \
         (to rotate it, set the old one as secrets.previous_master_key)"
            .into(),
    ))
}

fn write_key_check(store: &dyn EventStore, cipher: &Cipher) -> Result<(), Error> {
    let sealed = cipher.seal(KEY_CHECK_OWNER, "aigw")?;
    store.meta_put(
        KEY_CHECK,
        &serde_json::to_vec(&sealed).map_err(|e| Error::Storage(e.to_string()))?,
    )
}
