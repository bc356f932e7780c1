//! Event store benchmarks.
//!
//! - `durable_writes`: admin writes per second through `Engine::execute`
//!   (handle → append + sled flush → apply), one writer and 8 concurrent
//!   writers. Each iteration is one write, so criterion's `thrpt` is writes/s.
//! - `replay_100k`: `engine::replay` of a 100,000-event log, from scratch and
//!   from a compacted snapshot at seq 99,000 (tail of 1,000 events). The sled
//!   page cache is warm after the first iteration.
//!
//! Data lives under cargo's target tmp dir (a real disk, not a tmpfs).
//! Run: `cargo bench -p aigw-control-plane --bench event_store`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark is a test: a failed setup step should stop it loudly"
)]

use aigw_control_plane::engine::{replay, Engine};
use aigw_control_plane::events::{Command, DomainEvent, ResourceValue, StoredEvent};
use aigw_control_plane::secrets::Cipher;
use aigw_control_plane::store::{EventStore, SledStore};
use aigw_shared::domain::ApiKey;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

const REPLAY_EVENTS: u64 = 100_000;
const SNAPSHOT_AT: u64 = 99_000;
const BATCH: u64 = 1_000;
const WRITERS: u64 = 8;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("aigw-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("creating a bench directory")
}

fn cipher() -> Cipher {
    Cipher::new(&[7; 32])
}

fn api_key(n: u64) -> ApiKey {
    ApiKey {
        key_hash: format!("{n:064x}"),
        allowed_models: vec!["gpt-4o".into(), "gpt-4o-mini".into()],
        display_name: Some(format!("bench key {n}")),
        rate_limit: None,
        budget: None,
        expires_at: Some(OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap()),
        disabled: false,
        ..Default::default()
    }
}

fn create_key(n: u64) -> Command {
    Command::Create {
        id: format!("ak-{n}"),
        value: ResourceValue::ApiKey(api_key(n)),
    }
}

async fn open_engine(dir: &Path) -> Arc<Engine> {
    let store = Arc::new(SledStore::open(dir).expect("opening the store"));
    match Engine::open(store, cipher(), 10_000).await {
        Ok(engine) => engine,
        Err(e) => panic!("opening the engine: {e}"),
    }
}

fn durable_writes(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("durable_writes");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));

    let dir = tempdir();
    let engine = rt.block_on(open_engine(dir.path()));
    let next = AtomicU64::new(0);
    group.bench_function("single_writer", |b| {
        b.to_async(&rt).iter(|| async {
            let n = next.fetch_add(1, Ordering::Relaxed);
            black_box(engine.execute(create_key(n), "admin:bench").await.unwrap());
        })
    });
    drop(engine);

    let dir8 = tempdir();
    let engine = rt.block_on(open_engine(dir8.path()));
    let next = Arc::new(AtomicU64::new(0));
    group.bench_function(format!("{WRITERS}_writers"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                let tasks: Vec<_> = (0..WRITERS)
                    .map(|w| {
                        // Spread `iters` writes over the writers.
                        let share = iters / WRITERS + u64::from(w < iters % WRITERS);
                        let engine = engine.clone();
                        let next = next.clone();
                        tokio::spawn(async move {
                            for _ in 0..share {
                                let n = next.fetch_add(1, Ordering::Relaxed);
                                engine.execute(create_key(n), "admin:bench").await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

/// Appends api-key creates `from..=to` straight to the store, 1,000 per batch.
fn append_events(store: &SledStore, from: u64, to: u64) {
    let at = OffsetDateTime::now_utc();
    let mut seq = from;
    while seq <= to {
        let end = (seq + BATCH - 1).min(to);
        let batch: Vec<StoredEvent> = (seq..=end)
            .map(|n| StoredEvent {
                seq: n,
                at,
                actor: "admin:bench".into(),
                event: DomainEvent::ApiKeyCreated {
                    id: format!("ak-{n}"),
                    value: api_key(n),
                },
            })
            .collect();
        store.append(&batch).expect("appending a batch");
        seq = end + 1;
    }
}

fn replay_100k(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();

    // A log of 100k events, no snapshot.
    let full_dir = tempdir();
    let full = SledStore::open(full_dir.path()).unwrap();
    let t = Instant::now();
    append_events(&full, 1, REPLAY_EVENTS);
    eprintln!("built a {REPLAY_EVENTS}-event log in {:?}", t.elapsed());

    // The same log with a compacted snapshot at 99k, written by the engine.
    let snap_dir = tempdir();
    {
        let store = Arc::new(SledStore::open(snap_dir.path()).unwrap());
        append_events(&store, 1, SNAPSHOT_AT);
        let engine = rt.block_on(async {
            match Engine::open(store.clone(), cipher(), 10_000).await {
                Ok(e) => e,
                Err(e) => panic!("opening the engine: {e}"),
            }
        });
        assert_eq!(engine.snapshot().unwrap(), SNAPSHOT_AT);
        drop(engine);
        append_events(&store, SNAPSHOT_AT + 1, REPLAY_EVENTS);
    }
    let snap = SledStore::open(snap_dir.path()).unwrap();
    assert_eq!(
        snap.latest_snapshot().unwrap().map(|(seq, _)| seq),
        Some(SNAPSHOT_AT)
    );
    // Both give the same state.
    assert_eq!(replay(&full).unwrap(), replay(&snap).unwrap());

    let mut group = c.benchmark_group("replay_100k");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    group.bench_function("full_log", |b| {
        b.iter(|| {
            let state = replay(&full).unwrap();
            assert_eq!(state.version, REPLAY_EVENTS);
            black_box(state)
        })
    });
    group.bench_function("snapshot_at_99k", |b| {
        b.iter(|| {
            let state = replay(&snap).unwrap();
            assert_eq!(state.version, REPLAY_EVENTS);
            black_box(state)
        })
    });
    group.finish();
}

criterion_group!(benches, durable_writes, replay_100k);
criterion_main!(benches);
