//! Code both planes share: generated protobuf types, configuration, and the
//! admin resources with their validation rules.

pub mod body;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod error;
pub mod proto;
pub mod snapshot;
pub mod telemetry;

pub use error::Error;
