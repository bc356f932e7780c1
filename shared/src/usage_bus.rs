//! The usage bus contract between the planes: data planes publish one
//! [`UsageEvent`] per call, the control plane aggregates them. On NATS the
//! bus is the JetStream stream below; standalone without NATS it is an
//! in-process channel into the aggregator.

use crate::proto::usage::v1::UsageEvent;
use async_nats::jetstream::{self, stream};
use futures::future::BoxFuture;
use std::time::Duration;

/// The JetStream stream that holds usage events.
pub const STREAM_NAME: &str = "AIGW_USAGE";
/// Subject usage events are published on.
pub const SUBJECT: &str = "aigw.usage.v1";
/// JetStream drops a re-published event with the same `Nats-Msg-Id` inside
/// this window; the control plane deduplicates beyond it.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long the stream keeps events the control plane has not consumed.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where usage events go. Implementations must be idempotent per event id:
/// a batch whose publish failed is sent again.
pub trait UsageBus: Send + Sync + 'static {
    /// Resolves once every event of `batch` is durably taken (acked by
    /// JetStream, or counted by the in-process aggregator).
    fn publish<'a>(&'a self, batch: &'a [UsageEvent]) -> BoxFuture<'a, Result<(), String>>;
}

/// Creates the usage stream if it is missing; either plane may be first.
pub async fn ensure_stream(js: &jetstream::Context) -> Result<(), String> {
    ensure_stream_with(js, 1).await
}

/// [`ensure_stream`] with `replicas` JetStream replicas (a replicated
/// control plane asks for its own count): a stream with fewer, e.g. created
/// by a data plane first, is scaled up.
pub async fn ensure_stream_with(js: &jetstream::Context, replicas: usize) -> Result<(), String> {
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: STREAM_NAME.into(),
            subjects: vec![SUBJECT.into()],
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            max_age: MAX_AGE,
            num_replicas: replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating stream {STREAM_NAME}: {e}"))?;
    let info = stream
        .info()
        .await
        .map_err(|e| format!("stream {STREAM_NAME}: {e}"))?;
    if info.config.num_replicas < replicas {
        let mut config = info.config.clone();
        config.num_replicas = replicas;
        js.update_stream(config)
            .await
            .map_err(|e| format!("scaling stream {STREAM_NAME} to {replicas} replicas: {e}"))?;
    }
    Ok(())
}
