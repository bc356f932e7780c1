use super::UsageEvent;
use aigw_shared::config::NatsConfig;
use aigw_shared::nats;
use aigw_shared::usage_bus::{ensure_stream, UsageBus, SUBJECT};
use async_nats::jetstream::{self, message::PublishMessage};
use futures::future::{join_all, BoxFuture};
use prost::Message;
use std::future::IntoFuture;
use std::time::Duration;

/// Publishes to JetStream with `Nats-Msg-Id` = event id, awaiting every ack.
pub struct NatsBus {
    js: jetstream::Context,
}

impl NatsBus {
    /// Connects in the background: a NATS server that is down at start is
    /// retried, and events spool meanwhile.
    pub async fn connect(cfg: &NatsConfig) -> Result<Self, aigw_shared::Error> {
        let client = nats::connect(cfg, "aigw-data-plane", nats::Start::Background).await?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(3));
        Ok(Self { js })
    }

    /// The connection, shared with the rate limits' fleet sync.
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    async fn publish_batch(&self, batch: &[UsageEvent]) -> Result<(), String> {
        let mut acks = Vec::with_capacity(batch.len());
        for ev in batch {
            let msg = PublishMessage::build()
                .payload(ev.encode_to_vec().into())
                .message_id(ev.id.as_str());
            match self.js.send_publish(SUBJECT, msg).await {
                Ok(ack) => acks.push(ack),
                Err(e) if e.to_string().contains("no responders") => {
                    ensure_stream(&self.js).await?;
                    return Err("the usage stream was missing; created it".into());
                }
                Err(e) => return Err(format!("publish: {e}")),
            }
        }
        for r in join_all(acks.into_iter().map(|a| a.into_future())).await {
            r.map_err(|e| format!("publish ack: {e}"))?;
        }
        Ok(())
    }
}

impl UsageBus for NatsBus {
    fn publish<'a>(&'a self, batch: &'a [UsageEvent]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.publish_batch(batch))
    }
}
