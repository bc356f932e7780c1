//! Usage accounting: every proxied call made with a valid key yields exactly
//! one [`UsageEvent`], handed off the request path to a bounded buffer and
//! published by a background task (`publisher`) over NATS JetStream (`nats`)
//! or an in-process bus, with a disk spool (`spool`) while the bus is away.

mod nats;
mod publisher;
mod recorder;
mod spool;

pub use aigw_shared::proto::usage::v1::{CacheStatus, UsageEvent};
pub use nats::{NatsBus, STREAM_NAME, SUBJECT};
pub use publisher::run_publisher;
pub use recorder::{Accounting, UsageRecorder};
pub use spool::Spool;

use futures::future::BoxFuture;

/// Where usage events go. Implementations must be idempotent per event id:
/// a batch whose publish failed is sent again.
pub trait UsageBus: Send + Sync + 'static {
    fn publish<'a>(&'a self, batch: &'a [UsageEvent]) -> BoxFuture<'a, Result<(), String>>;
}

/// Rough token count for text we have to count ourselves (no usage from
/// Azure): about four characters per token, as OpenAI documents for English.
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}
