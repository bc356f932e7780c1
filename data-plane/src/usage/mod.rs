//! Usage accounting: every proxied call made with a valid key yields exactly
//! one [`UsageEvent`], handed off the request path to a bounded buffer and
//! published by a background task (`publisher`) over NATS JetStream (`nats`)
//! or an in-process bus, with a disk spool (`spool`) while the bus is away.

mod nats;
mod publisher;
mod recorder;
mod spool;

pub use aigw_shared::proto::usage::v1::{CacheStatus, UsageEvent};
pub use aigw_shared::usage_bus::UsageBus;
pub use nats::NatsBus;
pub use publisher::run_publisher;
pub use recorder::{Accounting, UsageRecorder};
pub use spool::Spool;

/// Rough token count for text we have to count ourselves (no usage from
/// Azure): about four characters per token, as OpenAI documents for English.
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}
