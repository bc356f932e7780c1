use super::Aggregator;
use aigw_shared::config::NatsConfig;
use aigw_shared::proto::usage::v1::UsageEvent;
use aigw_shared::usage_bus::{ensure_stream_with, STREAM_NAME};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use futures::StreamExt;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// The durable consumer of a single control plane. Replicas each have their
/// own (`aigw-control-plane-<replica_id>`): each reads every event and keeps
/// complete aggregates, deduplicated by event id, so totals are exact on
/// every replica and budgets are computed wherever a data plane connects.
pub const DURABLE: &str = "aigw-control-plane";
const BATCH: usize = 1000;

/// Consumes usage events with a durable pull consumer and acks each message
/// only after its batch is durably aggregated; reconnects with backoff.
pub async fn run_nats_consumer(
    nats: NatsConfig,
    aggregator: Arc<Aggregator>,
    durable: String,
    replicas: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            r = consume(&nats, &aggregator, &durable, replicas) => {
                if let Err(e) = r {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "usage consumer interrupted");
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn consume(
    nats: &NatsConfig,
    aggregator: &Arc<Aggregator>,
    durable: &str,
    replicas: usize,
) -> Result<(), String> {
    let client =
        aigw_shared::nats::connect(nats, "aigw-control-plane", aigw_shared::nats::Start::Now)
            .await
            .map_err(|e| e.to_string())?;
    let js = jetstream::new(client);
    ensure_stream_with(&js, replicas).await?;
    let stream = js
        .get_stream(STREAM_NAME)
        .await
        .map_err(|e| e.to_string())?;
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer: {e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| format!("messages: {e}"))?
        .ready_chunks(BATCH);
    info!("consuming usage events from JetStream");
    while let Some(chunk) = messages.next().await {
        let mut msgs = Vec::with_capacity(chunk.len());
        let mut events = Vec::with_capacity(chunk.len());
        for m in chunk {
            let m = m.map_err(|e| format!("message: {e}"))?;
            match UsageEvent::decode(m.payload.as_ref()) {
                Ok(e) => match super::check::refuse_reason(&e, super::unix_ms_now()) {
                    None => {
                        events.push(e);
                        msgs.push(m);
                    }
                    Some(reason) => {
                        // Never counted, never redelivered; the log says who sent it.
                        error!(%reason, event_id = %e.id.escape_debug(), node_id = %e.node_id.escape_debug(),
                            api_key_id = %e.api_key_id.escape_debug(), prompt_tokens = e.prompt_tokens,
                            completion_tokens = e.completion_tokens, "implausible usage event refused");
                        crate::metrics::METRICS.usage_rejected(reason);
                        let _ = m.ack_with(AckKind::Term).await;
                    }
                },
                Err(e) => {
                    // Not ours to count; terminate it so it is not redelivered forever.
                    error!(error = %e, subject = %m.subject, "undecodable usage event terminated");
                    let _ = m.ack_with(AckKind::Term).await;
                }
            }
        }
        let agg = aggregator.clone();
        let ingested = tokio::task::spawn_blocking(move || agg.ingest(&events)).await;
        match ingested {
            Ok(Ok(_)) => {
                for r in futures::future::join_all(msgs.iter().map(|m| m.ack())).await {
                    if let Err(e) = r {
                        // Redelivery is harmless: the event id is already counted.
                        warn!(error = %e, "ack failed");
                    }
                }
            }
            Ok(Err(e)) => {
                error!(error = %e, "aggregating usage failed; events will be redelivered");
                for m in &msgs {
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
            Err(e) => return Err(format!("aggregation task: {e}")),
        }
    }
    Err("the message stream ended".into())
}
