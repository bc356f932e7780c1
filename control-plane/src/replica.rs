//! What one control-plane replica runs over the replicated log (see
//! [`crate::replication`]): it follows the other replicas' writes, refuses a
//! master key that does not open the log's secrets, and finishes a master-key
//! rotation under the fleet's lease. Here, not in `replication`, because it
//! drives the [`Engine`], which itself writes through the log.

use crate::engine::Engine;
use crate::replication::{lease, log, Log};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// Refuses to serve secrets sealed with another master key: every replica
/// applies the others' sealed events verbatim, so all share one key.
pub fn check_master_key(engine: &Engine) -> Result<(), crate::error::Error> {
    let state = engine.read();
    if let Some((id, r)) = state.provider_keys.iter().next() {
        if engine.cipher().open(id, &r.value.secret).is_err() {
            return Err(crate::error::Error::Crypto(
                "the replicated log's secrets are sealed with another master key: every \
                 replica needs the same secrets.master_key"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Finishes a master key rotation once in the fleet: under the
/// `master-key-rotation` lease, after catching up (a replica that comes
/// second finds the secrets already re-sealed by the first).
pub async fn rotate_once(
    engine: &Engine,
    log: &Log,
    previous: &crate::secrets::Cipher,
) -> Result<usize, crate::error::Error> {
    let bucket = lease::bucket(log).await?;
    let mut held = lease::Lease::acquire(
        &bucket,
        "master-key-rotation",
        log.replica_id(),
        lease::TTL * 4,
    )
    .await?;
    let work = async {
        engine.catch_up().await?;
        engine.finish_rotation(previous).await
    };
    tokio::pin!(work);
    let done = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tokio::time::sleep(lease::TTL / 3) => held.renew().await?,
        }
    };
    held.release().await;
    done
}

/// Keeps `engine` up to date with what other replicas append: on every
/// message seen on the log's subject (a nudge) and at least every
/// `POLL`, it reads the stream from its applied sequence on.
pub async fn follow(engine: Arc<Engine>, log: Arc<Log>, mut stop: watch::Receiver<bool>) {
    const POLL: Duration = Duration::from_millis(500);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut nudges = match log.nudges().await {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "subscribing to the event log failed; polling");
                None
            }
        };
        loop {
            let (ended, news) = tokio::select! {
                n = next_nudge(&mut nudges) => match n {
                    Some(m) => (false, is_news(&m, &engine, &log)),
                    None => (true, true),
                },
                _ = tokio::time::sleep(POLL) => (nudges.is_none(), true),
                _ = engine.kicked() => (false, true),
                _ = stop.wait_for(|s| *s) => return,
            };
            if !news {
                continue;
            }
            // Nudges that queued meanwhile are covered by this catch-up.
            if let Some(sub) = nudges.as_mut() {
                use futures::{FutureExt, StreamExt};
                while let Some(Some(_)) = sub.next().now_or_never() {}
            }
            match engine.catch_up().await {
                Ok(n) => {
                    backoff = Duration::from_millis(100);
                    if n > 0 {
                        tracing::debug!(applied = n, "applied events from other replicas");
                    }
                }
                Err(e) => {
                    if engine.is_failed() {
                        warn!(error = %e, "the local copy of the log failed; no longer following");
                        return;
                    }
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "catching up with the event log failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            if ended {
                break;
            }
        }
        info!("re-subscribing to the event log");
    }
}

/// The next nudge; `None` once the subscription ended. Never resolves
/// without one.
async fn next_nudge(sub: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    use futures::StreamExt;
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Whether a publish seen on the log's subject may hold a message this
/// replica has not applied: not its own (its writer applies those), and
/// expecting a position at or past this replica's (one expecting an earlier
/// position was applied already or refused).
fn is_news(m: &async_nats::Message, engine: &Engine, log: &Log) -> bool {
    let Some(headers) = m.headers.as_ref() else {
        return true;
    };
    if headers
        .get(log::REPLICA_HEADER)
        .is_some_and(|v| v.as_str() == log.replica_id())
    {
        return false;
    }
    match headers
        .get(async_nats::header::NATS_EXPECTED_LAST_SEQUENCE)
        .and_then(|v| v.as_str().parse::<u64>().ok())
    {
        Some(expected) => expected >= engine.stream_seq(),
        None => true,
    }
}
