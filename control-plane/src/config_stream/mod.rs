//! Config distribution to data planes, split as in Envoy's go-control-plane:
//! [`SnapshotCache`] turns each new config version into one immutable,
//! versioned snapshot; [`ConfigStreamService`] serves it to every node over
//! `aigw.config.v1.ConfigService/Watch` and records acks and nacks.

mod cache;
mod server;

pub use cache::{build_snapshot, Published, SnapshotCache};
pub use server::ConfigStreamService;
