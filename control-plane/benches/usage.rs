//! How many usage events per second the aggregator counts durably
//! (dedup check, aggregate update, one sled flush per batch).
//! Run: `cargo bench -p aigw-control-plane --bench usage`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark is a test: a failed setup step should stop it loudly"
)]

use aigw_control_plane::engine::Engine;
use aigw_control_plane::secrets::Cipher;
use aigw_control_plane::store::SledStore;
use aigw_control_plane::usage::Aggregator;
use aigw_shared::proto::usage::v1::UsageEvent;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn events(n: usize) -> Vec<UsageEvent> {
    (0..n)
        .map(|i| {
            let id = NEXT.fetch_add(1, Ordering::Relaxed);
            UsageEvent {
                id: format!("ev-{id:016}"),
                time_unix_ms: 1_795_000_000_000 + (id as i64 % 5) * 86_400_000,
                api_key_id: format!("key-{}", i % 50),
                model: format!("model-{}", i % 5),
                deployment: format!("dep-{}", i % 3),
                prompt_tokens: 100,
                completion_tokens: 50,
                total_tokens: 150,
                status: if i % 20 == 0 { 500 } else { 200 },
                ..Default::default()
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let engine = rt
        .block_on(Engine::open(store, Cipher::new(&[9; 32]), 10_000))
        .unwrap();
    let agg = Aggregator::open(dir.path(), engine).unwrap();
    let mut g = c.benchmark_group("aggregator");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    for batch in [100usize, 1000] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("ingest_batch_{batch}"), |b| {
            b.iter_batched(
                || events(batch),
                |evs| agg.ingest(&evs).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    // Redelivered events: dedup only, nothing new to store.
    let seen = events(1000);
    agg.ingest(&seen).unwrap();
    g.throughput(Throughput::Elements(1000));
    g.bench_function("redelivered_batch_1000", |b| {
        b.iter(|| agg.ingest(&seen).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
