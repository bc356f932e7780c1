//! Choosing a deployment for each attempt of a call.
//!
//! - `health` — per-deployment state shared by every snapshot: 429 cooldown,
//!   circuit breaker (open after consecutive failures, one half-open probe),
//!   peak-EWMA latency and in-flight count; lock-free atomics
//! - `pick`   — priority groups (lowest first; the next group only when every
//!   target in the current one is cooling down or open), then weighted,
//!   round-robin or least-latency (power of two choices) inside the group

mod health;
mod pick;

pub use health::{HealthRegistry, Outcome, TargetHealth};
pub use pick::{pick, Choice, Pool, Unavailable};
