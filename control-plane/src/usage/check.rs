//! What a usage event from the bus must look like before it is counted.
//!
//! NATS permissions keep outsiders from publishing (see the README's
//! "Security model"); these bounds keep one bad or forged message from a
//! publisher that does hold a credential from poisoning the aggregates and
//! budgets: no call reports more tokens than any model's context holds, and
//! no event is dated in the future.

use aigw_shared::proto::usage::v1::UsageEvent;

/// Tokens one call may report per field: above the largest context window
/// Azure offers (about 1M) with a wide margin, far below what could wrap.
pub const MAX_TOKENS_PER_CALL: u64 = 10_000_000;
/// Clock skew tolerated between a node and the control plane.
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;
/// Longest id or name carried by an event (ids are UUIDs, names are
/// resource names of at most 256 bytes).
pub const MAX_FIELD_BYTES: usize = 256;
/// A call lasting more than a day is not a call.
pub const MAX_LATENCY_MS: u64 = 24 * 3600 * 1000;

/// Why an event is refused; a short, stable label for logs and metrics.
pub fn refuse_reason(e: &UsageEvent, now_unix_ms: i64) -> Option<&'static str> {
    if e.id.is_empty() {
        return Some("missing_id");
    }
    let fields = [
        &e.id,
        &e.node_id,
        &e.api_key_id,
        &e.model,
        &e.deployment,
        &e.provider_key_id,
        &e.operation,
        &e.error_code,
        &e.caller_id,
    ];
    if fields.iter().any(|f| f.len() > MAX_FIELD_BYTES) {
        return Some("field_too_long");
    }
    if e.prompt_tokens > MAX_TOKENS_PER_CALL
        || e.completion_tokens > MAX_TOKENS_PER_CALL
        || e.total_tokens > 2 * MAX_TOKENS_PER_CALL
    {
        return Some("tokens_out_of_bounds");
    }
    if e.time_unix_ms <= 0 || e.time_unix_ms > now_unix_ms.saturating_add(MAX_FUTURE_MS) {
        return Some("time_out_of_bounds");
    }
    if e.latency_ms > MAX_LATENCY_MS || e.ttft_ms > MAX_LATENCY_MS {
        return Some("latency_out_of_bounds");
    }
    if !(100..=599).contains(&e.status) {
        return Some("bad_status");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn ok() -> UsageEvent {
        UsageEvent {
            id: "0190a0a0-0000-7000-8000-000000000001".into(),
            time_unix_ms: NOW - 1000,
            node_id: "node-1".into(),
            api_key_id: "key".into(),
            model: "gpt-4o".into(),
            prompt_tokens: 120_000,
            completion_tokens: 4_000,
            total_tokens: 124_000,
            latency_ms: 900,
            status: 200,
            ..Default::default()
        }
    }

    #[test]
    fn a_plausible_event_passes() {
        assert_eq!(refuse_reason(&ok(), NOW), None);
    }

    #[test]
    fn forged_or_broken_events_are_refused_with_their_reason() {
        type Forge = fn(&mut UsageEvent);
        let cases: Vec<(Forge, &str)> = vec![
            (|e| e.id.clear(), "missing_id"),
            (|e| e.api_key_id = "k".repeat(257), "field_too_long"),
            (|e| e.prompt_tokens = 5_000_000_000, "tokens_out_of_bounds"),
            (|e| e.completion_tokens = u64::MAX, "tokens_out_of_bounds"),
            (|e| e.total_tokens = u64::MAX, "tokens_out_of_bounds"),
            (|e| e.time_unix_ms = NOW + 3_600_000, "time_out_of_bounds"),
            (|e| e.time_unix_ms = i64::MIN, "time_out_of_bounds"),
            (|e| e.latency_ms = u64::MAX, "latency_out_of_bounds"),
            (|e| e.status = 0, "bad_status"),
        ];
        for (forge, reason) in cases {
            let mut e = ok();
            forge(&mut e);
            assert_eq!(refuse_reason(&e, NOW), Some(reason), "{e:?}");
        }
    }

    #[test]
    fn the_bounds_are_inclusive() {
        let mut e = ok();
        e.prompt_tokens = MAX_TOKENS_PER_CALL;
        e.time_unix_ms = NOW + MAX_FUTURE_MS;
        e.api_key_id = "k".repeat(MAX_FIELD_BYTES);
        assert_eq!(refuse_reason(&e, NOW), None);
    }
}
