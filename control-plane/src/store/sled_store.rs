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

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir.join("events.sled"))
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| Error::Storage(format!("opening {}: {e}", dir.display())))?;
        Ok(Self {
            events: db.open_tree("events")?,
            snapshots: db.open_tree("snapshots")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }
}

impl EventStore for SledStore {
    fn append(&self, events: &[StoredEvent]) -> Result<(), Error> {
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
        // sled's background flush is no durability guarantee: flush before we answer.
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
