//! Configuration on the data plane: the snapshot pushed by the control plane,
//! compiled into lookup tables ([`Runtime`]) and swapped atomically, so the hot
//! path reads it without a lock.
//!
//! - `runtime`       — compile a snapshot, validating it whole
//! - `watch`         — the stream from the control plane, with reconnect and backoff
//! - `snapshot_file` — the last good snapshot on disk, sealed with the node token

mod runtime;
mod snapshot_file;
pub mod watch;

pub use runtime::{CompileWith, Route, Runtime, Target, TargetAuth};
pub use snapshot_file::SnapshotFile;
pub use watch::{watch_control_plane, Apply, WatchSettings};

use arc_swap::ArcSwapOption;
use std::sync::Arc;

/// The live compiled snapshot: readers `load` it lock-free; the node swaps
/// it in. Nothing else: the services a snapshot draws on are `node::Services`.
pub struct ConfigHandle {
    current: ArcSwapOption<Runtime>,
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for ConfigHandle {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            version: tokio::sync::watch::channel(0).0,
        }
    }
}

impl ConfigHandle {
    pub fn load(&self) -> Option<Arc<Runtime>> {
        self.current.load_full()
    }

    pub fn store(&self, runtime: Arc<Runtime>) {
        let v = runtime.version;
        self.current.store(Some(runtime));
        self.version.send_replace(v);
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Version of the applied snapshot, 0 before the first.
    pub fn version(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |r| r.version)
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }
}
