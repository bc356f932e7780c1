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
use crate::replication::bucket::{Bucket, CasError};
use crate::replication::Log;
use std::time::{Duration, Instant};
use tracing::info;

pub const BUCKET: &str = "AIGW_LEASES";
/// A lease not renewed for this long is free.
pub const TTL: Duration = Duration::from_secs(15);

/// A lease this replica holds. Renew it every `TTL / 3`; drop it with
/// [`Lease::release`].
pub struct Lease<'a> {
    bucket: &'a Bucket,
    name: String,
    holder: String,
    revision: u64,
}

/// Opens (creating if needed) the lease bucket.
pub async fn bucket(log: &Log) -> Result<Bucket, Error> {
    Bucket::open(log, BUCKET, TTL).await
}

impl<'a> Lease<'a> {
    /// Takes lease `name` if it is free (or already this holder's).
    pub async fn try_acquire(
        bucket: &'a Bucket,
        name: &str,
        holder: &str,
    ) -> Result<Option<Self>, Error> {
        let mut lease = Self {
            bucket,
            name: name.into(),
            holder: holder.into(),
            revision: 0,
        };
        match bucket.create(name, holder.to_string().into()).await {
            Ok(revision) => {
                lease.revision = revision;
                return Ok(Some(lease));
            }
            Err(CasError::Changed) => {}
            Err(CasError::Unavailable(e)) => return Err(Error::Unavailable(e)),
        }
        // Ours from before a restart: take it back at its revision.
        if let Some((revision, value)) = bucket.entry(name).await? {
            if value.as_ref() == holder.as_bytes() {
                lease.revision = revision;
                if lease.renew().await.is_ok() {
                    return Ok(Some(lease));
                }
            }
        }
        Ok(None)
    }

    /// Waits up to `wait` for lease `name`.
    pub async fn acquire(
        bucket: &'a Bucket,
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
            .map_err(|e| Error::Unavailable(format!("lease {} lost: {e:?}", self.name)))?;
        Ok(())
    }

    /// Gives the lease up at once.
    pub async fn release(self) {
        let _ = self.bucket.delete(&self.name).await;
    }
}
