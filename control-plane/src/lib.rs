//! aigw control plane.
//!
//! Where things live:
//! - `admin/`   — the admin API: REST shim, gRPC service, admin-key auth, error edge
//! - `console/` — the web console on the admin listener (`/console/`): pages, sessions, SSO
//! - `events/`  — commands, events, the pure `handle` and `apply`, upcasting
//! - `store/`   — the append-only event log (sled) behind the `EventStore` trait
//! - `engine`   — the write path: handle → durable append → apply → notify
//! - `replication` — several replicas over one log of record in NATS JetStream
//! - `secrets`  — AES-256-GCM sealing of provider secrets
//! - `config_stream` — snapshots for data planes and the Watch stream that pushes them
//! - `nodes`    — data-plane nodes seen on the config stream
//! - `metrics`  — `/metrics` on the admin port (Prometheus text)
//! - `usage`    — usage events in, aggregates, cost and budgets out
//! - `config`   — the process's config file (its sections, validation)
//! - `app`      — wiring and serving
//!
//! The control plane does not depend on the data plane: what crosses between
//! them (snapshot document, usage bus, node identity) is in `aigw_shared`.
//! Standalone mode composes both in the `aigw` binary.

pub mod admin;
pub mod app;
pub mod config;
pub mod config_stream;
pub mod console;
pub mod engine;
pub mod error;
pub mod events;
pub mod metrics;
pub mod nodes;
pub mod replica;
pub mod replication;
pub mod secrets;
pub mod store;
pub mod usage;

pub use app::ControlPlane;
pub use config::Config;
pub use error::Error;
