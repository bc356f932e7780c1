use super::{Spool, UsageBus, UsageEvent};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

const BATCH: usize = 512;
/// How long a batch waits for more events after its first (Kafka's
/// `linger.ms`). Without it a node at 1,000 calls/s published one event at a
/// time, and each publish is a durable write downstream (a JetStream ack, or
/// in standalone a sled flush that woke its seven I/O threads): ~15 thread
/// wake-ups per call. Budgets see usage this much later, well inside the
/// two seconds they are enforced within.
const LINGER: Duration = Duration::from_millis(20);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Moves events from the buffer to the bus. While the bus fails, batches go
/// to the spool (so the buffer never fills during an outage); the spool is
/// replayed, oldest first, as soon as the bus takes a batch again. On stop the
/// buffer is drained: published if possible, else spooled for the next start.
pub async fn run_publisher(
    mut rx: mpsc::Receiver<UsageEvent>,
    bus: Arc<dyn UsageBus>,
    spool: Spool,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut retry = RETRY_MIN;
    let mut next_try = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        let stopping = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n == 0,
            _ = crate::shutdown::stopped(&mut stop) => true,
            // Wake up to retry the spool even when no new events come.
            _ = tokio::time::sleep_until(next_try), if !spool.is_empty() => false,
        };
        if stopping {
            // Drain what is left, then one last attempt.
            while let Ok(e) = rx.try_recv() {
                batch.push(e);
            }
            metrics.usage_unbuffered(batch.len());
            if !batch.is_empty() {
                let sent = tokio::time::timeout(Duration::from_secs(5), bus.publish(&batch)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    spool_batch(&spool, &batch, &metrics);
                }
            }
            info!("usage publisher stopped");
            return;
        }
        if !batch.is_empty() && batch.len() < BATCH {
            linger(&mut rx, &mut batch).await;
        }
        metrics.usage_unbuffered(batch.len());
        if !spool.is_empty() {
            // Keep order simple while an outage lasts: everything goes through the spool.
            spool_batch(&spool, &batch, &metrics);
            if Instant::now() >= next_try {
                match replay(&spool, &*bus, &metrics).await {
                    Ok(n) => {
                        info!(events = n, "usage bus is back: spooled events published");
                        retry = RETRY_MIN;
                    }
                    Err(e) => {
                        warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "usage bus still unavailable");
                        next_try = crate::clock::deadline_after(Instant::now(), retry);
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
            }
            continue;
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = bus.publish(&batch).await {
            warn!(error = %e, events = batch.len(), "usage bus unavailable: spooling events to disk");
            spool_batch(&spool, &batch, &metrics);
            next_try = crate::clock::deadline_after(Instant::now(), retry);
        } else {
            metrics.usage_published(batch.len());
        }
    }
}

/// Gathers more events into `batch` for up to [`LINGER`], or until it is full
/// or the buffer closes (a stop then drains it on the next turn).
async fn linger(rx: &mut mpsc::Receiver<UsageEvent>, batch: &mut Vec<UsageEvent>) {
    let until = crate::clock::deadline_after(Instant::now(), LINGER);
    while batch.len() < BATCH {
        tokio::select! {
            n = rx.recv_many(batch, BATCH - batch.len()) => if n == 0 { return },
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

fn spool_batch(spool: &Spool, batch: &[UsageEvent], metrics: &Metrics) {
    match spool.append(batch) {
        Ok(()) => metrics.usage_spooled(batch.len()),
        Err(e) => {
            metrics.usage_dropped_n(batch.len());
            tracing::error!(error = %e, events = batch.len(), path = %spool.path().display(), "cannot spool usage events: dropped");
        }
    }
}

async fn replay(spool: &Spool, bus: &dyn UsageBus, metrics: &Metrics) -> Result<usize, String> {
    let read = spool
        .read_all()
        .map_err(|e| format!("reading the spool: {e}"))?;
    metrics.usage_spool_damaged(read.damaged);
    let events = read.events;
    // Removed only after the bus acknowledged every event in it; a failure
    // part way leaves it whole (the aggregator counts each event id once).
    for chunk in events.chunks(BATCH) {
        bus.publish(chunk).await?;
        metrics.usage_published(chunk.len());
    }
    spool
        .clear()
        .map_err(|e| format!("clearing the spool: {e}"))?;
    Ok(events.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use std::sync::Mutex;

    /// A bus that takes every batch and remembers its size.
    #[derive(Default)]
    struct Recording(Mutex<Vec<usize>>);

    impl UsageBus for Recording {
        fn publish<'a>(&'a self, batch: &'a [UsageEvent]) -> BoxFuture<'a, Result<(), String>> {
            self.0.lock().unwrap().push(batch.len());
            Box::pin(async { Ok(()) })
        }
    }

    fn ev(i: usize) -> UsageEvent {
        UsageEvent {
            id: format!("e{i}"),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_close_together_go_out_in_one_batch_and_a_stop_sends_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(Recording::default());
        let (tx, rx) = mpsc::channel(1024);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let publisher = tokio::spawn(run_publisher(
            rx,
            bus.clone(),
            Spool::new(&dir.path().join("spool.bin")),
            Arc::new(Metrics::default()),
            stop,
        ));
        // Ten events inside one linger window, one after it.
        for i in 0..10 {
            tx.send(ev(i)).await.unwrap();
            tokio::time::sleep(LINGER / 20).await;
        }
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(*bus.0.lock().unwrap(), [10]);
        tx.send(ev(10)).await.unwrap();
        stop_tx.send(true).unwrap();
        publisher.await.unwrap();
        assert_eq!(bus.0.lock().unwrap().iter().sum::<usize>(), 11);
    }
}
