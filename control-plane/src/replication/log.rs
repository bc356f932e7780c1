//! The event log of record in a JetStream stream.
//!
//! One message per command: its events (each in the sled envelope, one per
//! line), so a command lands whole or not at all. Stream sequence and event
//! sequence differ (a command may have several events); each replica keeps
//! the stream sequence of the last message it applied next to its sled copy
//! (`Engine`), and appends with `Nats-Expected-Last-Sequence` set to it: a
//! replica that missed a message gets `wrong last sequence` (10071), catches
//! up, re-validates and tries again. `Nats-Msg-Id` makes a retry after a lost
//! ack idempotent: JetStream answers a duplicate with the original's sequence.

use crate::error::Error;
use crate::events::StoredEvent;
use aigw_shared::config::{NatsConfig, ReplicationConfig};
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How long JetStream drops a re-published message with the same id: longer
/// than a write retries ([`crate::engine`]'s write deadline).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long one JetStream request (publish ack, message get) may take before
/// it is retried: short, so a lost server costs a writer little.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long start-up waits for JetStream (a cluster electing its leaders).
const START_WAIT: Duration = Duration::from_secs(60);
/// Header naming the replica that wrote a message (diagnostics only).
pub const REPLICA_HEADER: &str = "Aigw-Replica";

/// One message of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its stream sequence.
    pub stream_seq: u64,
    pub msg_id: Option<String>,
    pub events: Vec<StoredEvent>,
}

/// Why an append did not land.
#[derive(Debug)]
pub enum AppendError {
    /// The stream has messages this replica has not applied.
    Conflict,
    /// No answer, or JetStream could not take it now: retry with the same id.
    Transient(String),
    /// Retrying will not help.
    Fatal(Error),
}

/// The stream and this replica's connection to it.
pub struct Log {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream<()>,
    stream_name: String,
    subject: String,
    replica_id: String,
    replicas: usize,
    /// Random per process start, so message ids never repeat across restarts.
    nonce: String,
    counter: AtomicU64,
}

impl Log {
    /// Connects and creates the stream if it is missing, waiting up to a
    /// minute for JetStream (a cluster electing its meta leader).
    pub async fn connect(nats: &NatsConfig, cfg: &ReplicationConfig) -> Result<Arc<Self>, Error> {
        let replica_id = cfg.replica_id();
        let started = std::time::Instant::now();
        let mut last_error = String::new();
        while started.elapsed() < START_WAIT {
            match Self::try_connect(nats, cfg, &replica_id).await {
                Ok(log) => return Ok(Arc::new(log)),
                Err(e) => {
                    if last_error != e.to_string() {
                        warn!(error = %e, "waiting for JetStream to open the replicated event log");
                    }
                    last_error = e.to_string();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Err(Error::Unavailable(format!(
            "control_plane.replication: the event log stream {} could not be opened within {}s: {last_error}",
            cfg.stream,
            START_WAIT.as_secs()
        )))
    }

    async fn try_connect(
        nats: &NatsConfig,
        cfg: &ReplicationConfig,
        replica_id: &str,
    ) -> Result<Self, Error> {
        let client = aigw_shared::nats::connect(
            nats,
            &format!("aigw-control-plane-{replica_id}"),
            aigw_shared::nats::Start::Now,
        )
        .await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        let subject = format!("aigw.log.{}", cfg.stream);
        js.get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            // The log of record: nothing expires, nothing is removed.
            retention: stream::RetentionPolicy::Limits,
            deny_delete: true,
            deny_purge: true,
            duplicate_window: DUPLICATE_WINDOW,
            description: Some("aigw control plane: admin event log of record".into()),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Unavailable(format!("creating stream {}: {e}", cfg.stream)))?;
        let stream = js
            .get_stream_no_info(&cfg.stream)
            .await
            .map_err(|e| Error::Unavailable(format!("stream {}: {e}", cfg.stream)))?;
        let mut nonce = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        info!(stream = %cfg.stream, replicas = cfg.replicas, %replica_id, "replicated event log open");
        Ok(Self {
            client,
            js,
            stream,
            stream_name: cfg.stream.clone(),
            subject,
            replica_id: replica_id.to_string(),
            replicas: cfg.replicas,
            nonce: hex::encode(nonce),
            counter: AtomicU64::new(0),
        })
    }

    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// A message id no other append uses.
    pub fn next_msg_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{}-{n}", self.replica_id, self.nonce)
    }

    /// Appends one command's events after stream sequence `expected`;
    /// returns the message's stream sequence once JetStream (its quorum)
    /// has it.
    pub async fn append(
        &self,
        body: Bytes,
        msg_id: &str,
        expected: u64,
    ) -> Result<u64, AppendError> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(body)
            .message_id(msg_id)
            .expected_last_sequence(expected)
            .header(REPLICA_HEADER, self.replica_id.as_str());
        let classify = |kind: PublishErrorKind, e: String| match kind {
            PublishErrorKind::WrongLastSequence => AppendError::Conflict,
            PublishErrorKind::MaxPayloadExceeded => AppendError::Fatal(Error::Invalid(format!(
                "the change is too large for the replicated log: {e}"
            ))),
            _ => AppendError::Transient(e),
        };
        let ack = self
            .js
            .send_publish(self.subject.clone(), publish)
            .await
            .map_err(|e| classify(e.kind(), e.to_string()))?;
        let ack = ack.await.map_err(|e| classify(e.kind(), e.to_string()))?;
        Ok(ack.sequence)
    }

    /// The message at `stream_seq`, or `None` past the end of the stream.
    pub async fn get(&self, stream_seq: u64) -> Result<Option<Entry>, Error> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        match self.stream.get_raw_message(stream_seq).await {
            Ok(m) => {
                let msg_id = m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_string());
                Ok(Some(Entry {
                    stream_seq: m.sequence,
                    msg_id,
                    events: decode(&m.payload).map_err(|e| {
                        Error::Storage(format!(
                            "stream {} message {stream_seq}: {e}",
                            self.stream_name
                        ))
                    })?,
                }))
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(Error::Unavailable(format!(
                "reading stream {} at {stream_seq}: {e}",
                self.stream_name
            ))),
        }
    }

    /// The stream sequence of the last message (0: empty).
    pub async fn last_seq(&self) -> Result<u64, Error> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| Error::Unavailable(format!("stream {}: {e}", self.stream_name)))?;
        Ok(info.state.last_sequence)
    }

    /// Every append to the log, as it happens (core NATS: a hint to catch
    /// up, not the data).
    pub async fn nudges(&self) -> Result<async_nats::Subscriber, Error> {
        self.client
            .subscribe(self.subject.clone())
            .await
            .map_err(|e| Error::Unavailable(format!("subscribing to {}: {e}", self.subject)))
    }
}

/// One message body: the events' envelopes, one per line (compact JSON
/// never holds a raw newline).
pub fn encode(events: &[StoredEvent]) -> Result<Bytes, Error> {
    let mut body = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b'\n');
        }
        body.extend_from_slice(&e.encode()?);
    }
    Ok(Bytes::from(body))
}

pub fn decode(body: &[u8]) -> Result<Vec<StoredEvent>, Error> {
    let events = body
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(StoredEvent::decode)
        .collect::<Result<Vec<_>, _>>()?;
    if events.is_empty() {
        return Err(Error::Storage("a log message without events".into()));
    }
    if events.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
        return Err(Error::Storage(
            "a log message whose events are not consecutive".into(),
        ));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::DomainEvent;

    fn event(seq: u64) -> StoredEvent {
        StoredEvent {
            seq,
            at: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            actor: "admin:test\nwith a newline".into(),
            event: DomainEvent::ModelDeleted {
                id: format!("m{seq}"),
            },
        }
    }

    #[test]
    fn a_message_round_trips_its_events() {
        let events = vec![event(7), event(8), event(9)];
        let body = encode(&events).unwrap();
        assert_eq!(decode(&body).unwrap(), events);
        assert!(decode(b"").is_err());
        let gap = encode(&[event(1), event(3)]).unwrap();
        assert!(decode(&gap).is_err());
    }
}
