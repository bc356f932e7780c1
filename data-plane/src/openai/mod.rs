//! The OpenAI / Azure OpenAI wire format, in one place.
//!
//! - `operation` — the operation table: path ↔ operation ↔ span name ↔
//!   Azure path; proxy routing (the `/v1`, `/openai/v1` and Azure-shaped
//!   `/openai/deployments/{alias}` routes, and the answer [`Shape`] each
//!   asks for), tracing and upstream URLs all read it
//! - `request`   — the request fields the gateway checks or rewrites
//!   (`field`: what every check shares)
//! - `types`     — answers and stream chunks: the typed fields the gateway
//!   reads, the rest kept raw (`raw`) so nothing is lost
//! - `azure`     — what Azure adds (content-filter annotations) and the
//!   gateway strips from OpenAI-shaped answers
//! - `responses` — the Responses API: its request fields, response objects
//!   and stream events
//!
//! A new endpoint: a row in `operation`, its required fields in `request`,
//! and any answer fields it needs in `types`.
//!
//! This module depends on nothing else in the crate.

pub mod azure;
pub mod field;
pub mod operation;
pub mod raw;
pub mod request;
pub mod responses;
pub mod types;

pub use operation::{Inbound, Operation, Shape, Unrouted, OPERATIONS};
pub use types::{Answer, ChoiceText, Usage};
