use super::EventStore;
use crate::error::Error;
use crate::events::StoredEvent;
use std::path::Path;

/// Snapshots kept in all; older ones only cost space, replay reads the newest.
const SNAPSHOTS_KEPT: usize = 2;

/// The event log in sled: tree `events` keyed by big-endian `seq`, tree
/// `snapshots` keyed likewise, tree `meta` for the rest.
pub struct SledStore {
    db: sled::Db,
    events: sled::Tree,
    snapshots: sled::Tree,
    meta: sled::Tree,
}

/// How long to wait for another holder of a sled database's file lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// sled's page cache per database. Its default, 1 GiB, is what a control
/// plane's RSS grew towards under load (the usage database takes a dedup key
/// per call); both databases are read mostly at start-up and appended to, so
/// a small cache costs nothing measurable and the OS page cache serves reads.
pub const SLED_CACHE_BYTES: u64 = 32 << 20;

/// Opens a sled database. sled releases its file lock from a background
/// thread shortly after the last handle drops, so a reopen in the same
/// process (a restart, a test) waits for it, briefly; a database that stays
/// locked (another control plane on the same data_dir) is a clear error.
#[allow(
    clippy::disallowed_methods,
    reason = "synchronous open at start-up (or in spawn_blocking): a short sleep between lock attempts is the point"
)]
pub fn open_sled(config: sled::Config, path: &Path) -> Result<sled::Db, Error> {
    let started = std::time::Instant::now();
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            // sled reports it as `ErrorKind::Other` with this message.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(Error::Storage(format!(
                    "opening {}: {e} (is another control plane using this data_dir?)",
                    path.display()
                )))
            }
        }
    }
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("events.sled");
        let db = open_sled(
            sled::Config::new()
                .path(&path)
                .cache_capacity(SLED_CACHE_BYTES)
                .mode(sled::Mode::HighThroughput),
            &path,
        )?;
        Ok(Self {
            events: db.open_tree("events")?,
            snapshots: db.open_tree("snapshots")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }
}

impl SledStore {
    fn append_unflushed(&self, events: &[StoredEvent]) -> Result<(), Error> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let last = self.last_seq()?;
        if first.seq != last + 1 || events.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
            return Err(Error::Storage(format!(
                "refusing a gap: log ends at {last}, batch starts at {}",
                first.seq
            )));
        }
        let mut batch = sled::Batch::default();
        for e in events {
            batch.insert(&e.seq.to_be_bytes(), e.encode()?);
        }
        self.events.apply_batch(batch)?;
        Ok(())
    }
}

impl EventStore for SledStore {
    fn append(&self, events: &[StoredEvent]) -> Result<(), Error> {
        self.append_unflushed(events)?;
        // sled's background flush is no durability guarantee: flush before we answer.
        self.db.flush()?;
        Ok(())
    }

    fn append_marked(&self, events: &[StoredEvent], key: &str, value: &[u8]) -> Result<(), Error> {
        // One flush for both; sled recovers a prefix of its writes, so the
        // mark (written last) is never there without the events.
        self.append_unflushed(events)?;
        self.meta.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }

    fn read_from(
        &self,
        from: u64,
    ) -> Box<dyn Iterator<Item = Result<StoredEvent, Error>> + Send + '_> {
        Box::new(self.events.range(from.to_be_bytes()..).map(|item| {
            let (_, v) = item?;
            StoredEvent::decode(&v)
        }))
    }

    fn last_seq(&self) -> Result<u64, Error> {
        Ok(match self.events.last()? {
            Some((k, _)) => seq_of(&k)?,
            None => 0,
        })
    }

    fn save_snapshot(&self, seq: u64, state: &[u8]) -> Result<(), Error> {
        self.snapshots.insert(seq.to_be_bytes(), state)?;
        let keys: Vec<_> = self.snapshots.iter().keys().collect::<Result<_, _>>()?;
        for k in keys.iter().take(keys.len().saturating_sub(SNAPSHOTS_KEPT)) {
            self.snapshots.remove(k)?;
        }
        self.db.flush()?;
        Ok(())
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, Error> {
        match self.snapshots.last()? {
            Some((k, v)) => Ok(Some((seq_of(&k)?, v.to_vec()))),
            None => Ok(None),
        }
    }

    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.meta.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }
}

fn seq_of(key: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| Error::Storage("malformed event key".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    #[allow(
        clippy::disallowed_methods,
        reason = "the lock must be released from another thread while the open waits"
    )]
    fn a_reopen_waits_for_the_lock_and_a_held_lock_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sled");
        let held = open_sled(sled::Config::new().path(&path), &path).unwrap();
        // Released from another thread a little later: the open waits for it.
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        let db = open_sled(sled::Config::new().path(&path), &path).unwrap();
        release.join().unwrap();
        // Held for good: a clear error once the wait is over.
        let err = open_sled(sled::Config::new().path(&path), &path).unwrap_err();
        assert!(err.to_string().contains("another control plane"), "{err}");
        drop(db);
    }
}
