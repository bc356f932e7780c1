//! Code both planes share: generated protobuf types, configuration sections,
//! the admin resources with their validation rules, the snapshot document, the
//! usage bus contract, node identity and the life of a binary
//! (`process`). Neither plane depends on the other:
//! what crosses between them is defined here.

pub mod body;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod error;
pub mod listener;
pub mod log_line;
pub mod log_writer;
pub mod nats;
pub mod node;
pub mod process;
pub mod proto;
pub mod snapshot;
pub mod span_export;
pub mod telemetry;
pub mod tls;
pub mod usage_bus;

pub use error::Error;
