//! The write path: one command at a time is handled against the current
//! state, appended durably, then folded into the state that readers see.

use crate::error::Error;
use crate::events::{handle, Command, State, StoredEvent};
use crate::replication::log::{AppendError, Entry, Log};
use crate::secrets::Cipher;
use crate::store::EventStore;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::{watch, Mutex, Notify};
use tracing::{info, instrument, warn};

/// Meta key: stream sequence of the last replicated-log message in sled.
const KEY_STREAM_SEQ: &str = "replication.stream_seq";
/// How long one write keeps trying to reach the replicated log.
const WRITE_DEADLINE: Duration = Duration::from_secs(20);
/// Largest batch of events in one message when publishing a sled history.
const MIGRATION_CHUNK: usize = 256;

const SNAPSHOT_FORMAT: u32 = 1;
const KEY_CHECK: &str = "key_check";
const KEY_CHECK_OWNER: &str = "aigw:key-check";

pub struct Engine {
    store: Arc<dyn EventStore>,
    state: RwLock<State>,
    /// Serialises handle → append → apply, so sequence numbers are gapless and
    /// every command is checked against the state its event follows.
    writer: Mutex<Writer>,
    /// The log of record when replicated (`control_plane.replication`).
    log: OnceLock<Arc<Log>>,
    /// Wakes the follower (a reader waits for a sequence).
    kick: Notify,
    /// Commands waiting for the next replicated batch.
    queue: std::sync::Mutex<Vec<Pending>>,
    /// `Writer::stream_seq`, for readers that do not take the writer lock.
    stream_seq: std::sync::atomic::AtomicU64,
    cipher: Cipher,
    snapshot_every: u64,
    version: watch::Sender<u64>,
    /// Set when an append failed: memory and disk may disagree, so no more
    /// writes until a restart replays the log.
    failed: AtomicBool,
}

/// Most commands in one replicated message (group commit).
const MAX_BATCH: usize = 64;

/// A command waiting for the next replicated batch.
struct Pending {
    command: Command,
    actor: String,
    reply: tokio::sync::oneshot::Sender<Result<Vec<StoredEvent>, Error>>,
}

/// The same failure for every command of a batch.
fn same_error(e: &Error) -> Error {
    match e {
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::Invalid(m) => Error::Invalid(m.clone()),
        other => Error::Storage(other.to_string()),
    }
}

/// What the writer lock guards besides the order of writes.
#[derive(Debug, Default)]
struct Writer {
    /// Stream sequence of the last replicated-log message applied.
    stream_seq: u64,
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
            writer: Mutex::new(Writer::default()),
            log: OnceLock::new(),
            kick: Notify::new(),
            stream_seq: std::sync::atomic::AtomicU64::new(0),
            queue: std::sync::Mutex::new(Vec::new()),
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
            match engine.execute(command, ACTOR).await {
                Ok(_) => {}
                // Another replica re-sealed it first (replicated log).
                Err(Error::StaleRevision { .. } | Error::NotFound { .. })
                    if engine.log.get().is_some() => {}
                Err(e) => return Err(e),
            }
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
        let (resource, op) = command.describe();
        let stored = match self.log.get() {
            Some(log) => self.execute_grouped(log, command, actor).await?,
            None => {
                let _writer = self.writer.lock().await;
                self.check_failed()?;
                let stored = {
                    let state = self.read();
                    stamp(handle(&state, &command)?, state.version, actor)
                };
                let store = self.store.clone();
                let batch = stored.clone();
                let appended = tokio::task::spawn_blocking(move || store.append(&batch))
                    .await
                    .map_err(|e| Error::Storage(format!("append task failed: {e}")))
                    .and_then(|r| r);
                if let Err(e) = appended {
                    return Err(self.fail(e));
                }
                self.apply_local(&stored).await;
                stored
            }
        };
        tracing::Span::current().record("seq", self.read().version);
        crate::metrics::METRICS.mutation(resource.collection(), op);
        Ok(stored)
    }

    /// Group commit on the replicated log: a command waits in the queue;
    /// whoever holds the writer lock takes every queued command (up to a
    /// bound), validates them in order, and appends their events as one
    /// message, answering each. A caller whose command a batch already
    /// answered returns that answer.
    async fn execute_grouped(
        &self,
        log: &Log,
        command: Command,
        actor: &str,
    ) -> Result<Vec<StoredEvent>, Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue().push(Pending {
            command,
            actor: actor.to_string(),
            reply,
        });
        self.await_queued(log, answer).await
    }

    /// Runs batches until the one holding `answer`'s command has run.
    async fn await_queued(
        &self,
        log: &Log,
        mut answer: tokio::sync::oneshot::Receiver<Result<Vec<StoredEvent>, Error>>,
    ) -> Result<Vec<StoredEvent>, Error> {
        loop {
            let mut writer = self.writer.lock().await;
            if let Ok(r) = answer.try_recv() {
                return r;
            }
            let batch: Vec<Pending> = {
                let mut queue = self.queue();
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            if let Err(e) = self.check_failed() {
                for p in batch {
                    let _ = p.reply.send(Err(same_error(&e)));
                }
            } else {
                self.run_batch(&mut writer, log, batch).await;
            }
            drop(writer);
            match answer.try_recv() {
                Ok(r) => return r,
                // Still queued behind a full batch: take the lock again.
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
                Err(e) => return Err(Error::Storage(format!("write batch dropped: {e}"))),
            }
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One replicated write of `batch`: every command validated against
    /// this replica's state at stream sequence N (and the batch's earlier
    /// commands), the events appended as one message with "expected last
    /// sequence N", kept once JetStream acknowledged it. On a conflict:
    /// catch up, validate again, retry (callers see only their own
    /// validation errors). Answers every command of the batch.
    async fn run_batch(&self, writer: &mut Writer, log: &Log, batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        let outcome = self.replicate_batch(writer, log, &batch).await;
        match outcome {
            Ok(results) => {
                for (p, r) in batch.into_iter().zip(results) {
                    let _ = p.reply.send(r);
                }
            }
            Err(e) => {
                for p in batch {
                    let _ = p.reply.send(Err(same_error(&e)));
                }
            }
        }
    }

    #[instrument(skip_all, fields(commands = batch.len(), stream_seq))]
    async fn replicate_batch(
        &self,
        writer: &mut Writer,
        log: &Log,
        batch: &[Pending],
    ) -> Result<Vec<Result<Vec<StoredEvent>, Error>>, Error> {
        let now = Instant::now();
        let deadline = now.checked_add(WRITE_DEADLINE).unwrap_or(now);
        let mut backoff = Duration::from_millis(25);
        loop {
            let (results, events) = self.validate(batch);
            if events.is_empty() {
                return Ok(results);
            }
            let body = crate::replication::log::encode(&events)?;
            let msg_id = log.next_msg_id();
            let expected = writer.stream_seq;
            // The same id and expectation on every retry: a message whose
            // ack was lost is answered as a duplicate with its sequence.
            let landed = loop {
                match log.append(body.clone(), &msg_id, expected).await {
                    Ok(seq) => break Some(seq),
                    Err(AppendError::Conflict) => break None,
                    Err(AppendError::Fatal(e)) => return Err(e),
                    Err(AppendError::Transient(e)) => {
                        if Instant::now() >= deadline {
                            return Err(Error::Unavailable(format!(
                                "the replicated event log did not acknowledge the write within {}s (it may still land): {e}",
                                WRITE_DEADLINE.as_secs()
                            )));
                        }
                        warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "appending to the replicated log: retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            };
            match landed {
                Some(seq) if seq == expected + 1 => {
                    tracing::Span::current().record("stream_seq", seq);
                    self.commit(writer, seq, &events).await?;
                    return Ok(results);
                }
                Some(seq) => {
                    // Cannot be with "expected last sequence"; trust the log.
                    warn!(
                        seq,
                        expected, "the log acknowledged at an unexpected sequence; catching up"
                    );
                    self.catch_up_locked(writer, log).await?;
                    if self.read_entry_events(log, seq, &msg_id).await?.is_some() {
                        return Ok(results);
                    }
                }
                None => {
                    self.catch_up_locked(writer, log).await?;
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(
                    "the replicated event log kept moving ahead of this write; retry".into(),
                ));
            }
        }
    }

    /// Each command of `batch` handled in order against the current state
    /// and the events of the commands before it: per command its events or
    /// its validation error, and all events in log order.
    fn validate(
        &self,
        batch: &[Pending],
    ) -> (Vec<Result<Vec<StoredEvent>, Error>>, Vec<StoredEvent>) {
        let mut results = Vec::with_capacity(batch.len());
        let mut all = Vec::new();
        let state = self.read();
        if let [one] = batch {
            match handle(&state, &one.command) {
                Ok(events) => {
                    let stored = stamp(events, state.version, &one.actor);
                    all.extend(stored.iter().cloned());
                    results.push(Ok(stored));
                }
                Err(e) => results.push(Err(e)),
            }
            return (results, all);
        }
        let mut work = state.clone();
        drop(state);
        for p in batch {
            match handle(&work, &p.command) {
                Ok(events) => {
                    let stored = stamp(events, work.version, &p.actor);
                    for e in &stored {
                        work.apply(e);
                    }
                    all.extend(stored.iter().cloned());
                    results.push(Ok(stored));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        (results, all)
    }

    /// The events of message `seq` if it carries `msg_id`.
    async fn read_entry_events(
        &self,
        log: &Log,
        seq: u64,
        msg_id: &str,
    ) -> Result<Option<Vec<StoredEvent>>, Error> {
        Ok(log
            .get(seq)
            .await?
            .filter(|e| e.msg_id.as_deref() == Some(msg_id))
            .map(|e| e.events))
    }

    /// Keeps events the log acknowledged at stream sequence `stream_seq`:
    /// sled (with the sequence), then memory, then readers.
    async fn commit(
        &self,
        writer: &mut Writer,
        stream_seq: u64,
        events: &[StoredEvent],
    ) -> Result<(), Error> {
        let store = self.store.clone();
        let batch = events.to_vec();
        let appended = tokio::task::spawn_blocking(move || {
            store.append_marked(&batch, KEY_STREAM_SEQ, &stream_seq.to_be_bytes())
        })
        .await
        .map_err(|e| Error::Storage(format!("append task failed: {e}")))
        .and_then(|r| r);
        if let Err(e) = appended {
            return Err(self.fail(e));
        }
        writer.stream_seq = stream_seq;
        self.stream_seq.store(stream_seq, Ordering::Release);
        self.apply_local(events).await;
        Ok(())
    }

    /// Folds events already on disk into the state, writes a snapshot when
    /// one is due, and tells readers.
    async fn apply_local(&self, events: &[StoredEvent]) {
        if events.is_empty() {
            return;
        }
        let (base, new_version) = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            let base = state.version;
            for e in events {
                state.apply(e);
            }
            (base, state.version)
        };
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
    }

    fn check_failed(&self) -> Result<(), Error> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Storage(
                "an earlier write failed to reach the disk; restart the control plane to recover from the log".into(),
            ));
        }
        Ok(())
    }

    /// Refuses further writes: memory and disk may disagree.
    fn fail(&self, e: Error) -> Error {
        // The batch may or may not be on disk; refuse to guess.
        self.failed.store(true, Ordering::Release);
        tracing::error!(error = %e, "appending to the event log failed; refusing further writes");
        e
    }

    /// Whether a failed local append stopped this engine's writes.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Makes `log` the log of record: publishes the sled history to an empty
    /// stream (migration), checks that the sled copy agrees with the stream,
    /// and applies what the stream has beyond it. Refuses, naming the first
    /// differing sequence, a sled copy that disagrees.
    pub async fn replicate(&self, log: Arc<Log>) -> Result<(), Error> {
        let mut writer = self.writer.lock().await;
        let store = self.store.clone();
        let (marked, local_last) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let marked = match store.meta_get(KEY_STREAM_SEQ)? {
                Some(b) => u64::from_be_bytes(
                    b.as_slice()
                        .try_into()
                        .map_err(|_| Error::Storage(format!("malformed meta {KEY_STREAM_SEQ}")))?,
                ),
                None => 0,
            };
            Ok((marked, store.last_seq()?))
        })
        .await
        .map_err(|e| Error::Storage(format!("reading the data dir: {e}")))??;
        let stream_last = log.last_seq().await?;
        if marked > stream_last {
            return Err(Error::Storage(format!(
                "this data_dir applied the replicated log up to message {marked}, but stream {} ends at {stream_last}: it is another stream (or was recreated); move the data_dir away to rebuild this replica from the stream",
                log_name(&log)
            )));
        }
        if stream_last == 0 && local_last > 0 {
            self.publish_history(&mut writer, &log, local_last).await?;
        } else if marked > 0 {
            // Where this copy left the stream: the same message on both sides?
            let entry = log.get(marked).await?.ok_or_else(|| {
                Error::Unavailable(format!("stream message {marked} could not be read"))
            })?;
            self.check_same(&entry).await?;
        }
        writer.stream_seq = marked.max(writer.stream_seq);
        self.stream_seq.store(writer.stream_seq, Ordering::Release);
        let applied = self.catch_up_locked(&mut writer, &log).await?;
        let local_last = self.store.last_seq()?;
        let log_last = match writer.stream_seq {
            0 => 0,
            seq => log
                .get(seq)
                .await?
                .and_then(|e| e.events.last().map(|e| e.seq))
                .unwrap_or(0),
        };
        if local_last > log_last {
            return Err(Error::Storage(format!(
                "this data_dir holds events up to seq {local_last}, but stream {} ends at seq {log_last}: the sled copy disagrees with the log of record (first differing seq {}); move the data_dir away to rebuild this replica from the stream",
                log_name(&log),
                log_last + 1
            )));
        }
        info!(
            stream_seq = writer.stream_seq,
            version = log_last,
            applied,
            "replicated event log in sync"
        );
        let _ = self.log.set(log);
        Ok(())
    }

    /// Publishes the sled log to an empty stream, in chunks.
    async fn publish_history(
        &self,
        writer: &mut Writer,
        log: &Log,
        local_last: u64,
    ) -> Result<(), Error> {
        let store = self.store.clone();
        let events = tokio::task::spawn_blocking(move || {
            store.read_from(1).collect::<Result<Vec<_>, Error>>()
        })
        .await
        .map_err(|e| Error::Storage(format!("reading the log: {e}")))??;
        info!(events = local_last, stream = %log_name(log), "publishing this data_dir's event log to the empty stream");
        let now = Instant::now();
        let deadline = now.checked_add(START_DEADLINE).unwrap_or(now);
        for (i, chunk) in events.chunks(MIGRATION_CHUNK).enumerate() {
            let body = crate::replication::log::encode(chunk)?;
            let first = chunk.first().map(|e| e.seq).unwrap_or_default();
            let msg_id = format!("migrate-{first}");
            let expected = i as u64;
            loop {
                match log.append(body.clone(), &msg_id, expected).await {
                    Ok(seq) => {
                        let store = self.store.clone();
                        tokio::task::spawn_blocking(move || {
                            store.meta_put(KEY_STREAM_SEQ, &seq.to_be_bytes())
                        })
                        .await
                        .map_err(|e| Error::Storage(format!("writing meta: {e}")))??;
                        writer.stream_seq = seq;
                        self.stream_seq.store(seq, Ordering::Release);
                        break;
                    }
                    // Someone else publishes too: the catch-up compares.
                    Err(AppendError::Conflict) => return Ok(()),
                    Err(AppendError::Fatal(e)) => return Err(e),
                    Err(AppendError::Transient(e)) if Instant::now() < deadline => {
                        warn!(error = %e, "publishing the history: retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(AppendError::Transient(e)) => return Err(Error::Unavailable(e)),
                }
            }
        }
        Ok(())
    }

    /// Refuses an entry whose events differ from the sled copy's.
    async fn check_same(&self, entry: &Entry) -> Result<(), Error> {
        let store = self.store.clone();
        let events = entry.events.clone();
        let stream_seq = entry.stream_seq;
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let Some(first) = events.first() else {
                return Ok(());
            };
            let mut local = store.read_from(first.seq);
            for theirs in &events {
                match local.next().transpose()? {
                    Some(mine) if mine == *theirs => {}
                    Some(_) => {
                        return Err(Error::Storage(format!(
                            "the sled copy of the event log disagrees with the replicated log: seq {} differs (stream message {stream_seq}); move the data_dir away to rebuild this replica from the stream",
                            theirs.seq
                        )))
                    }
                    None => return Ok(()),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Storage(format!("comparing the log: {e}")))?
    }

    /// Applies what other replicas appended; returns how many events.
    pub async fn catch_up(&self) -> Result<usize, Error> {
        let Some(log) = self.log.get() else {
            return Ok(0);
        };
        let mut writer = self.writer.lock().await;
        self.check_failed()?;
        self.catch_up_locked(&mut writer, log).await
    }

    async fn catch_up_locked(&self, writer: &mut Writer, log: &Log) -> Result<usize, Error> {
        let mut applied = 0;
        while let Some(entry) = log.get(writer.stream_seq + 1).await? {
            applied += self.apply_entry(writer, entry).await?;
        }
        Ok(applied)
    }

    /// Applies one message of the log: events this copy already has (a
    /// crash between the sled append and its mark, or the history this
    /// replica published) must be the same; the rest must follow on.
    async fn apply_entry(&self, writer: &mut Writer, entry: Entry) -> Result<usize, Error> {
        let version = self.read().version;
        let (known, new): (Vec<_>, Vec<_>) =
            entry.events.iter().cloned().partition(|e| e.seq <= version);
        if !known.is_empty() {
            self.check_same(&Entry {
                events: known,
                ..entry.clone()
            })
            .await?;
        }
        if let Some(first) = new.first() {
            if first.seq != version + 1 {
                return Err(Error::Storage(format!(
                    "replicated log message {} starts at seq {}, this replica is at {version}: the log has a gap",
                    entry.stream_seq, first.seq
                )));
            }
        }
        let n = new.len();
        self.commit(writer, entry.stream_seq, &new).await?;
        Ok(n)
    }

    /// Waits until this replica has applied `min` (read-your-writes on any
    /// replica), at most `timeout`.
    pub async fn wait_for_version(&self, min: u64, timeout: Duration) -> Result<u64, Error> {
        let mut versions = self.subscribe();
        if *versions.borrow() >= min {
            return Ok(*versions.borrow());
        }
        self.kick.notify_one();
        let reached = tokio::time::timeout(timeout, async {
            versions.wait_for(|v| *v >= min).await.map(|v| *v).ok()
        })
        .await;
        match reached {
            Ok(Some(v)) => Ok(v),
            _ => Err(Error::Unavailable(format!(
                "this replica is at seq {}, not yet at the requested {min}; retry, or ask another replica",
                self.read().version
            ))),
        }
    }

    /// Resolves when a reader asks the follower to catch up now.
    pub async fn kicked(&self) {
        self.kick.notified().await
    }

    /// Stream sequence of the last replicated-log message applied (0
    /// without replication).
    pub fn stream_seq(&self) -> u64 {
        self.stream_seq.load(Ordering::Acquire)
    }

    /// The replicated log, when this engine writes through one.
    pub fn log(&self) -> Option<&Arc<Log>> {
        self.log.get()
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

/// How long start-up keeps trying to publish a sled history.
const START_DEADLINE: Duration = Duration::from_secs(60);

fn log_name(log: &Log) -> String {
    log.stream_name().to_string()
}

/// The stored form of a command's events: sequence numbers after `base`,
/// one time and actor.
fn stamp(events: Vec<crate::events::DomainEvent>, base: u64, actor: &str) -> Vec<StoredEvent> {
    let at = OffsetDateTime::now_utc();
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| StoredEvent {
            seq: base + 1 + i as u64,
            at,
            actor: actor.to_string(),
            event,
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ResourceValue, StoredProviderKey};
    use crate::store::SledStore;
    use aigw_shared::domain::{Model, ProviderKey};

    fn pending(command: Command) -> Pending {
        let (reply, _) = tokio::sync::oneshot::channel();
        Pending {
            command,
            actor: "admin:test".into(),
            reply,
        }
    }

    fn model(name: &str, pk: &str) -> Command {
        Command::Create {
            id: format!("id-{name}"),
            value: ResourceValue::Model(Model {
                display_name: name.into(),
                provider: "azure".into(),
                model_name: Some("d".into()),
                provider_key_id: Some(pk.into()),
                targets: vec![],
                routing: None,
                rate_limit: None,
                cost: None,
                cache: None,
                log_payloads: false,
                context_window: None,
                fallbacks: Default::default(),
            }),
        }
    }

    /// A replicated batch: each command sees the ones before it (a model
    /// on a provider key created earlier in the batch), a command that
    /// breaks a rule fails alone, and the events continue the log without
    /// a gap, so the batch is one valid log message.
    #[tokio::test]
    async fn a_batch_validates_each_command_after_the_ones_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let engine = Engine::open(store, Cipher::new(&[9; 32]), 1_000)
            .await
            .unwrap();
        let pk = ProviderKey {
            display_name: "pk".into(),
            provider: String::new(),
            adapter: "azure-openai".into(),
            secret: "k".into(),
            api_base: "https://acme.openai.azure.com".into(),
            api_version: "2024-10-21".into(),
            ca_pem: None,
            allow_insecure_upstream: false,
        };
        let sealed = engine.cipher().seal("pk", "k").unwrap();
        engine
            .execute(model("before", "missing"), "admin:test")
            .await
            .unwrap_err();
        let batch = vec![
            pending(Command::Create {
                id: "pk".into(),
                value: ResourceValue::ProviderKey(StoredProviderKey::new(pk, sealed)),
            }),
            pending(model("a", "pk")),
            pending(model("a", "pk")),
            pending(model("b", "missing")),
            pending(model("c", "pk")),
        ];
        let (results, events) = engine.validate(&batch);
        let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, true, false, false, true]);
        assert!(
            matches!(results[2], Err(Error::Duplicate(_))),
            "{results:?}"
        );
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        let body = crate::replication::log::encode(&events).unwrap();
        assert_eq!(crate::replication::log::decode(&body).unwrap(), events);
        // Validation alone changes nothing.
        assert_eq!(engine.read().version, 0);
    }
}
