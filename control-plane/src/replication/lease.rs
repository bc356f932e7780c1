//! A lease: one replica at a time does a fleet-wide duty. A key in the KV
//! bucket `AIGW_LEASES` (a TTL on every entry) taken with `create` (only if
//! absent) and renewed with `update` at the revision it holds (CAS); a
//! holder that dies stops renewing and the key expires, so another replica
//! takes over after at most [`TTL`].
//!
//! What is fleet-wide here: finishing a master key rotation (re-sealing
//! every secret, events in the shared log). Per-replica upkeep (pruning the
//! usage dedup ids, state snapshots) stays on every replica: each keeps its
//! own sled copy and its own aggregates.

use crate::error::Error;
use crate::replication::Log;
use async_nats::jetstream::kv;
use std::time::{Duration, Instant};
use tracing::info;

pub const BUCKET: &str = "AIGW_LEASES";
/// A lease not renewed for this long is free.
pub const TTL: Duration = Duration::from_secs(15);

/// A lease this replica holds. Renew it every `TTL / 3`; drop it with
/// [`Lease::release`].
pub struct Lease {
    bucket: kv::Store,
    name: String,
    holder: String,
    revision: u64,
}

/// Opens (creating if needed) the lease bucket.
pub async fn bucket(log: &Log) -> Result<kv::Store, Error> {
    let js = log.jetstream();
    if let Ok(b) = js.get_key_value(BUCKET).await {
        return Ok(b);
    }
    js.create_key_value(kv::Config {
        bucket: BUCKET.into(),
        description: "aigw: leases for once-in-the-fleet duties".into(),
        history: 1,
        max_age: TTL,
        num_replicas: log.replicas(),
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Unavailable(format!("lease bucket {BUCKET}: {e}")))
}

impl Lease {
    /// Takes lease `name` if it is free (or already this holder's).
    pub async fn try_acquire(
        bucket: &kv::Store,
        name: &str,
        holder: &str,
    ) -> Result<Option<Self>, Error> {
        let unavailable = |e: String| Error::Unavailable(format!("lease {name}: {e}"));
        match bucket.create(name, holder.to_string().into()).await {
            Ok(revision) => {
                return Ok(Some(Self {
                    bucket: bucket.clone(),
                    name: name.into(),
                    holder: holder.into(),
                    revision,
                }))
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unavailable(e.to_string())),
        }
        // Ours from before a restart: take it back at its revision.
        let entry = bucket
            .entry(name)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if let Some(entry) = entry.filter(|e| e.value.as_ref() == holder.as_bytes()) {
            let mut lease = Self {
                bucket: bucket.clone(),
                name: name.into(),
                holder: holder.into(),
                revision: entry.revision,
            };
            if lease.renew().await.is_ok() {
                return Ok(Some(lease));
            }
        }
        Ok(None)
    }

    /// Waits up to `wait` for lease `name`.
    pub async fn acquire(
        bucket: &kv::Store,
        name: &str,
        holder: &str,
        wait: Duration,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        loop {
            if let Some(lease) = Self::try_acquire(bucket, name, holder).await? {
                info!(lease = name, holder, "lease taken");
                return Ok(lease);
            }
            if started.elapsed() >= wait {
                return Err(Error::Unavailable(format!(
                    "lease {name} is held by another replica"
                )));
            }
            tokio::time::sleep(TTL / 5).await;
        }
    }

    /// Extends the lease; fails if another replica took it meanwhile.
    pub async fn renew(&mut self) -> Result<(), Error> {
        self.revision = self
            .bucket
            .update(&self.name, self.holder.clone().into(), self.revision)
            .await
            .map_err(|e| Error::Unavailable(format!("lease {} lost: {e}", self.name)))?;
        Ok(())
    }

    /// Gives the lease up at once.
    pub async fn release(self) {
        let _ = self
            .bucket
            .delete_expect_revision(&self.name, Some(self.revision))
            .await;
    }
}
