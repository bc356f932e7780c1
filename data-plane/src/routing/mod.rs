//! Choosing a deployment for each attempt of a call.
//!
//! - `health` — per-deployment state shared by every snapshot: 429 cooldown,
//!   circuit breaker (open after consecutive failures, one half-open probe),
//!   peak-EWMA latency and in-flight count; lock-free atomics
//! - `pick`   — priority groups (lowest first; the next group only when every
//!   target in the current one is cooling down or open), then weighted,
//!   round-robin or least-latency (power of two choices) inside the group
//! - `probe`  — active health probes per target (`routing.health_check`):
//!   one loop per probed target, verdicts into `health`

mod health;
mod pick;
mod probe;

pub use health::{HealthRegistry, Outcome, ProbeStatus, TargetHealth};
pub use pick::{pick, Choice, Pool, Unavailable};
pub use probe::{rfc3339_ms, ProbeAuth, ProbeTarget, Prober};
