//! Usage aggregation: events from data planes (NATS JetStream, or the
//! in-process bus in standalone) are deduplicated by id and folded into
//! per-day aggregates in sled before they are acknowledged; budgets are
//! checked against the aggregates and pushed to nodes in the next snapshot.
//!
//! - `aggregator` — dedup, aggregates, cost, budgets, queries
//! - `consumer`   — the durable JetStream consumer
//! - `bus`        — the in-process bus for standalone
//! - `check`      — bounds an event from the bus must meet to be counted

mod aggregator;
mod bus;
pub mod check;
mod consumer;

pub use aggregator::{
    day_of, unix_ms_now, Aggregator, Counters, Dimension, IngestStats, UsageQuery, UsageRow,
};
pub use bus::InProcessBus;
pub use consumer::{run_nats_consumer, DURABLE};
