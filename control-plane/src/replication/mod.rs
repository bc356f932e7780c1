//! A highly available control plane: the admin event log of record is a
//! JetStream stream (`control_plane.replication`), replicated by JetStream's
//! Raft; every replica keeps its own copy of the log, its projection and its
//! snapshots in sled, and serves reads and writes.
//!
//! - [`log`]    — the stream: one message per command carrying its events;
//!   optimistic appends with `Nats-Expected-Last-Sequence`
//! - `engine`   — (crate root) writes through [`log::Log::append`], catches
//!   up on a conflict and re-validates; `replica` (crate root) runs a
//!   replica's duties over the log: following the others' writes, the
//!   master-key check, the leased rotation
//! - [`lease`]  — one replica at a time does the fleet's once-only duties
//! - [`node_status`] — node status shared through a KV bucket, so any
//!   replica lists every node
//!
//! All replicas share `secrets.master_key`: they apply each other's sealed
//! events verbatim.

pub mod bucket;
pub mod lease;
pub mod log;
pub mod node_status;

pub use log::Log;
