//! The data plane's two clocks, named apart: wall-clock Unix milliseconds
//! (shared with the fleet, e.g. rate-limit windows) and a process-local
//! monotonic millisecond count (target health, which must not jump).

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch; 0 if the clock is before it.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds since the first call in this process, plus one (so 0 can
/// mean "never"): a monotonic clock that fits in an atomic.
pub fn monotonic_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX).saturating_add(1)
}

/// A wait as `retry-after` gives it: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis())
        .unwrap_or(u64::MAX)
        .div_ceil(1000)
        .max(1)
}

/// `now + wait`, or `now` far enough ahead when that would overflow (a
/// deadline from untrusted or huge settings must not panic).
pub fn deadline_after(now: tokio::time::Instant, wait: Duration) -> tokio::time::Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(86_400 * 365)))
        .unwrap_or(now)
}
