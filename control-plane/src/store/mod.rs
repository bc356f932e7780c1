//! Where events live. The engine only sees the [`EventStore`] trait.

mod sled_store;

pub use sled_store::{open_sled, SledStore, SLED_CACHE_BYTES};

use crate::error::Error;
use crate::events::StoredEvent;

/// An append-only, gapless event log with compacted state snapshots.
pub trait EventStore: Send + Sync + 'static {
    /// Appends events whose `seq` continue the log without a gap, and returns
    /// only once they are durable on disk.
    fn append(&self, events: &[StoredEvent]) -> Result<(), Error>;
    /// Events with `seq >= from`, in order.
    fn read_from(
        &self,
        from: u64,
    ) -> Box<dyn Iterator<Item = Result<StoredEvent, Error>> + Send + '_>;
    /// Sequence number of the last event, 0 for an empty log.
    fn last_seq(&self) -> Result<u64, Error>;
    /// Keeps a serialized state as of `seq`; older snapshots may be dropped.
    fn save_snapshot(&self, seq: u64, state: &[u8]) -> Result<(), Error>;
    /// The newest snapshot, if any.
    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, Error>;
    /// A small key-value area for store-wide metadata (e.g. the key check).
    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;
    fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), Error>;
    /// Appends `events` (possibly none) and sets meta `key` to `value`,
    /// durably. After a crash the meta value never runs ahead of the events
    /// (the events may be there without it).
    fn append_marked(&self, events: &[StoredEvent], key: &str, value: &[u8]) -> Result<(), Error> {
        self.append(events)?;
        self.meta_put(key, value)
    }
}
