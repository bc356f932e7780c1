use super::Aggregator;
use aigw_shared::proto::usage::v1::UsageEvent;
use aigw_shared::usage_bus::UsageBus;
use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

type Delivery = (Vec<UsageEvent>, oneshot::Sender<Result<(), String>>);

/// Standalone without NATS: the in-process node publishes straight into the
/// aggregator, with the same contract as JetStream: a publish returns only
/// once the events are durably counted.
pub struct InProcessBus {
    tx: mpsc::Sender<Delivery>,
}

impl InProcessBus {
    /// Starts the task that feeds the aggregator; it ends when the bus is dropped.
    pub fn start(aggregator: Arc<Aggregator>, tasks: &tokio_util::task::TaskTracker) -> Arc<Self> {
        let (tx, mut rx) = mpsc::channel::<Delivery>(64);
        tasks.spawn(async move {
            while let Some((events, reply)) = rx.recv().await {
                let agg = aggregator.clone();
                let r = tokio::task::spawn_blocking(move || agg.ingest(&events))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
                let _ = reply.send(r);
            }
        });
        Arc::new(Self { tx })
    }
}

impl UsageBus for InProcessBus {
    fn publish<'a>(&'a self, batch: &'a [UsageEvent]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.tx
                .send((batch.to_vec(), reply))
                .await
                .map_err(|_| "the aggregator has stopped".to_string())?;
            answer
                .await
                .map_err(|_| "the aggregator has stopped".to_string())?
        })
    }
}
