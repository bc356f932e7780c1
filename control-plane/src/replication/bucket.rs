//! A small key-value bucket over a plain JetStream stream, for leases and
//! node status: one subject per key, the last message per subject kept,
//! entries expiring after the stream's `max_age`; create and update are
//! compare-and-set with `Nats-Expected-Last-Subject-Sequence` (the entry's
//! revision is its stream sequence). Plain streams rather than the client's
//! KV API: they work the same on every JetStream server version.

use crate::error::Error;
use crate::replication::Log;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;

pub struct Bucket {
    js: jetstream::Context,
    stream: stream::Stream<()>,
    name: String,
    prefix: String,
}

/// Why a compare-and-set did not happen.
#[derive(Debug)]
pub enum CasError {
    /// The entry is not at the revision expected (or exists, for a create).
    Changed,
    Unavailable(String),
}

impl Bucket {
    /// Opens (creating if needed) bucket `name`, whose entries live `ttl`.
    pub async fn open(log: &Log, name: &str, ttl: Duration) -> Result<Self, Error> {
        let js = log.jetstream().clone();
        let prefix = format!("aigw.{}", name.to_ascii_lowercase());
        js.get_or_create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{prefix}.>")],
            storage: stream::StorageType::File,
            num_replicas: log.replicas(),
            max_messages_per_subject: 1,
            max_age: ttl,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Unavailable(format!("bucket {name}: {e}")))?;
        let stream = js
            .get_stream_no_info(name)
            .await
            .map_err(|e| Error::Unavailable(format!("bucket {name}: {e}")))?;
        Ok(Self {
            js,
            stream,
            name: name.to_string(),
            prefix,
        })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{key}", self.prefix)
    }

    async fn publish(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
    ) -> Result<u64, CasError> {
        let mut message = jetstream::message::PublishMessage::build().payload(value);
        if let Some(rev) = expected {
            message = message.expected_last_subject_sequence(rev);
        }
        let classify = |kind: PublishErrorKind, e: String| match kind {
            PublishErrorKind::WrongLastSequence => CasError::Changed,
            _ => CasError::Unavailable(format!("bucket {}: {e}", self.name)),
        };
        let ack = self
            .js
            .send_publish(self.subject(key), message)
            .await
            .map_err(|e| classify(e.kind(), e.to_string()))?;
        let ack = ack.await.map_err(|e| classify(e.kind(), e.to_string()))?;
        Ok(ack.sequence)
    }

    /// Writes `key` unconditionally; returns its revision.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, CasError> {
        self.publish(key, value, None).await
    }

    /// Writes `key` only if it has no live entry.
    pub async fn create(&self, key: &str, value: Bytes) -> Result<u64, CasError> {
        self.publish(key, value, Some(0)).await
    }

    /// Writes `key` only if its entry is still at `revision`.
    pub async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, CasError> {
        self.publish(key, value, Some(revision)).await
    }

    /// The live entry of `key`: (revision, value).
    pub async fn entry(&self, key: &str) -> Result<Option<(u64, Bytes)>, Error> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(key))
            .await
        {
            Ok(m) => Ok(Some((m.sequence, m.payload))),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(Error::Unavailable(format!("bucket {}: {e}", self.name))),
        }
    }

    /// Removes `key`'s entry.
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.stream
            .purge()
            .filter(self.subject(key))
            .await
            .map(|_| ())
            .map_err(|e| Error::Unavailable(format!("bucket {}: {e}", self.name)))
    }

    /// Every live entry's value.
    pub async fn values(&self) -> Result<Vec<Bytes>, Error> {
        let unavailable = |e: String| Error::Unavailable(format!("bucket {}: {e}", self.name));
        let mut subjects = self
            .stream
            .info_with_subjects(format!("{}.>", self.prefix))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut keys = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, _) = s.map_err(|e| unavailable(e.to_string()))?;
            if let Some(key) = subject.strip_prefix(&format!("{}.", self.prefix)) {
                keys.push(key.to_string());
            }
        }
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((_, v)) = self.entry(&key).await? {
                values.push(v);
            }
        }
        Ok(values)
    }
}
