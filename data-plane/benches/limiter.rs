//! What the rate limiter adds to a call: the prompt's token estimate, one
//! request and its tokens checked against five limits (rpm, tpm, rpd, tpd,
//! concurrency) on an api key and a model, the settle with the real usage,
//! and the release. Measured per call at a steady 1,000 calls/s (latency
//! percentiles), then flat out from several threads on the same key and model
//! (throughput under contention).
//!
//! Run: `cargo bench -p aigw-data-plane --bench limiter`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark is a test: a failed setup step should stop it loudly"
)]

use aigw_data_plane::limits::{tokens, Check, Limiter};
use aigw_data_plane::openai::raw::RawObject;
use aigw_data_plane::openai::request::{self, Fields};
use aigw_data_plane::openai::Operation;
use aigw_shared::domain::RateLimit;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tiktoken_rs::tokenizer::Tokenizer;

const RATE: u64 = 1_000;
const SECS: u64 = 5;
const THREADS: usize = 4;

fn limits() -> RateLimit {
    RateLimit {
        rpm: Some(u64::MAX / 4),
        tpm: Some(u64::MAX / 4),
        rpd: Some(u64::MAX / 4),
        tpd: Some(u64::MAX / 4),
        concurrency: Some(1_000_000),
    }
}

/// One call's limiter work; returns the time spent estimating tokens.
fn one_call(
    limiter: &Limiter,
    checks: &[Check<'_>],
    body: &RawObject<'_>,
    fields: &Fields,
) -> Duration {
    let t = Instant::now();
    // The route picked its tokenizer when the snapshot was compiled.
    let estimate = tokens::estimate(
        Operation::ChatCompletions,
        body,
        fields,
        Tokenizer::O200kBase,
    );
    let estimating = t.elapsed();
    let mut permit = limiter.acquire(checks, estimate).expect("never refused");
    permit.settle(estimate / 2);
    drop(permit);
    estimating
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[idx.clamp(1, sorted.len()) - 1]
}

fn main() {
    tokens::warm_up();
    let limiter = Arc::new(Limiter::default());
    let rl = limits();
    let key = limiter.scope("key/bench", &rl);
    let model = limiter.scope("model/bench", &rl);
    let body = json!({
        "model": "bench",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello from Azure OpenAI, in three languages please."}
        ],
        "max_tokens": 64
    });
    let text = body.to_string();
    let body = request::parse(text.as_bytes()).unwrap();
    let fields = request::read_fields(Operation::ChatCompletions, &body, None).unwrap();
    let checks = [
        Check {
            scope: &key,
            limits: &rl,
            what: "api key",
            id: "bench",
        },
        Check {
            scope: &model,
            limits: &rl,
            what: "model",
            id: "bench",
        },
    ];

    // Steady rate: call i is due at start + i ms.
    let total = RATE * SECS;
    let mut lat = Vec::with_capacity(total as usize);
    let mut est = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            #[allow(
                clippy::disallowed_methods,
                reason = "pacing the benchmark's own thread, not a runtime worker"
            )]
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        est.push(one_call(&limiter, &checks, &body, &fields));
        lat.push(t.elapsed());
    }
    lat.sort();
    est.sort();
    println!(
        "=== rate limiter on the hot path (key + model, 5 limits each, tiktoken estimate) ==="
    );
    println!(
        "at {RATE} calls/s for {SECS} s: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        pct(&lat, 50.0).as_secs_f64() * 1e6,
        pct(&lat, 99.0).as_secs_f64() * 1e6,
        lat.last().unwrap().as_secs_f64() * 1e6
    );
    println!(
        "  of which the token estimate: p50 {:.1} µs, p99 {:.1} µs",
        pct(&est, 50.0).as_secs_f64() * 1e6,
        pct(&est, 99.0).as_secs_f64() * 1e6
    );

    // Flat out, THREADS threads on the same two scopes.
    let until = Instant::now() + Duration::from_secs(SECS);
    let done: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (limiter, rl, key, model, body, fields) =
                    (&limiter, &rl, &key, &model, &body, &fields);
                s.spawn(move || {
                    let checks = [
                        Check {
                            scope: key,
                            limits: rl,
                            what: "api key",
                            id: "bench",
                        },
                        Check {
                            scope: model,
                            limits: rl,
                            what: "model",
                            id: "bench",
                        },
                    ];
                    let mut n = 0u64;
                    while Instant::now() < until {
                        let _ = one_call(limiter, &checks, body, fields);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!(
        "flat out, {THREADS} threads on the same key and model: {:.0} calls/s",
        done as f64 / SECS as f64
    );
}
