//! Durable admin writes per second, sled only vs replicated (R3 over a
//! 3-node NATS JetStream cluster started here), with one writer and with 8,
//! and the p50/p99 of one write (a `POST /admin/v1/apikeys`, answered once
//! the write is durable: fsynced in sled, or acknowledged by the JetStream
//! quorum and then in the replica's sled copy).
//!
//! ```sh
//! cargo build --release -p aigw-control-plane
//! cargo bench -p aigw-tests --bench ha_writes     # BENCH_WRITES=2000 by default
//! ```
//!
//! `AIGW_CONTROL_PLANE_BIN` points it at another build; e.g. a release
//! control plane driven by a debug load generator (less to compile):
//! `AIGW_CONTROL_PLANE_BIN=target/release/aigw-control-plane cargo bench -p
//! aigw-tests --bench ha_writes --profile dev`. Rows with 8 writers
//! on the replicated log: all on one replica, and spread over the three
//! (every write then also races the others' for the next log position).

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::fixtures::api_key;
use aigw_tests::nats::NatsCluster;
use aigw_tests::AdminClient;
use anyhow::{ensure, Result};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(0)
}

/// `total` creates by `writers` concurrent writers, writer `w` on
/// `admins[w % admins.len()]`; returns (writes/s, p50 µs, p99 µs).
async fn run(
    admins: &[AdminClient],
    writers: usize,
    total: usize,
    tag: &str,
) -> Result<(f64, u64, u64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let admin = admins[w % admins.len()].clone();
            let next = next.clone();
            let tag = tag.to_string();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, anyhow::Error>(lat);
                    }
                    let t = Instant::now();
                    let r = admin
                        .post("/admin/v1/apikeys", &api_key(&format!("sk-{tag}-{i}"), &[]))
                        .await?;
                    ensure!(r.status.as_u16() == 201, "{} {}", r.status, r.text);
                    lat.push(t.elapsed().as_micros() as u64);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok((
        total as f64 / secs,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    ))
}

fn row(name: &str, (rate, p50, p99): (f64, u64, u64)) {
    println!("{name:<44} {rate:>9.0} writes/s   p50 {p50:>6} µs   p99 {p99:>6} µs");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> Result<()> {
    let total: usize = std::env::var("BENCH_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    // Quiet processes: the access log is not what is measured.
    let quiet = json!({"telemetry": {"log_level": "warn"}});

    let sled = ControlPlane::start_with(Options::default().with_config(quiet.clone())).await?;
    let admins = [sled.rest()];
    row("sled only, 1 writer", run(&admins, 1, total, "s1").await?);
    row("sled only, 8 writers", run(&admins, 8, total, "s8").await?);
    drop(sled);

    let nats = NatsCluster::start(3).await?;
    let base = Options::default().with_config(quiet);
    let mut cps = Vec::new();
    for i in 0..3 {
        cps.push(
            ControlPlane::start_with(base.clone().with_config(json!({
                "nats": {"url": nats.urls()},
                "control_plane": {"replication": {"replicas": 3, "replica_id": format!("cp-{i}")}},
            })))
            .await?,
        );
    }
    let all: Vec<AdminClient> = cps.iter().map(ControlPlane::rest).collect();
    row(
        "replicated R3, 1 writer",
        run(&all[..1], 1, total, "r1").await?,
    );
    row(
        "replicated R3, 8 writers on one replica",
        run(&all[..1], 8, total, "r8").await?,
    );
    row(
        "replicated R3, 8 writers over 3 replicas",
        run(&all, 8, total, "r83").await?,
    );
    Ok(())
}
