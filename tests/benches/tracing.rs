//! What tracing costs: max throughput through a standalone aigw (release
//! build) with no trace export, then with OTLP export at sample ratio 1.0 to
//! a real OTLP/gRPC receiver in this process. Rounds alternate off/on to
//! spread drift; the report gives each round and the median ratio.
//!
//! ```sh
//! cargo build --release -p aigw
//! cargo bench -p aigw-tests --bench tracing
//! ```
//!
//! Besides throughput, the CPU time the aigw process uses per call
//! (`/proc/<pid>/stat`), at max throughput and at a fixed rate
//! (`BENCH_RATE`, default 1,000 calls/s), off and on: aigw's own cost,
//! whatever the receiver and the load generator take from the same cores.
//!
//! The receiver stands for a collector on another machine, so it counts
//! spans by walking the protobuf wire format instead of decoding every
//! attribute. It also counts server spans: after a graceful stop (which
//! flushes the queue) every call the traced gateway answered must have
//! reached it, or the report says how many were lost. A full export queue
//! drops spans, and a cheaper "on" figure that lost spans would be wrong.
//!
//! `BENCH_SECS` (default 5) per round, `BENCH_ROUNDS` (default 3) rounds.
//! Load generator, mock Azure, the receiver and aigw share this machine's
//! cores: read the figure as relative.

use aigw_tests::data_plane::wait_standalone_synced;
use aigw_tests::fixtures::{seed_azure, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT};
use aigw_tests::mock_azure::{MockAzure, DEFAULT_API_KEY};
use aigw_tests::otlp_receiver::OtlpReceiver;
use aigw_tests::process::cpu_ticks;
use aigw_tests::{ControlPlane, Options};
use anyhow::Result;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const CONNECTIONS: usize = 32;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONNECTIONS)
        .build(http)
}

async fn call(client: &HttpClient, url: &str, body: &Bytes) -> bool {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {SEED_CALLER_KEY}"))
        .body(Full::new(body.clone()))
        .expect("request");
    match client.request(req).await {
        Ok(resp) => {
            let ok = resp.status() == 200;
            resp.into_body().collect().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

/// A steady `rate` calls/s for `secs`, each call on its own task (open
/// loop); returns the failed calls.
async fn fixed_rate(url: &str, body: &Bytes, rate: u64, secs: u64) -> u64 {
    let client = client();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity((rate * secs) as usize);
    for i in 0..rate * secs {
        tokio::time::sleep_until(start + Duration::from_nanos(i * 1_000_000_000 / rate)).await;
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.push(tokio::spawn(
            async move { call(&client, &url, &body).await },
        ));
    }
    let mut failed = 0;
    for t in tasks {
        failed += u64::from(!t.await.unwrap_or(false));
    }
    failed
}

/// Requests per second over `secs` with `CONNECTIONS` back-to-back workers,
/// failed calls, and all calls answered 200 (those still in flight at the
/// end included).
async fn closed_loop(url: &str, body: &Bytes, secs: u64) -> (f64, u64, u64) {
    let client = client();
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.to_string(), body.clone());
            let (ok, errors, stop) = (ok.clone(), errors.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if call(&client, &url, &body).await {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = ok.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    for w in workers {
        let _ = w.await;
    }
    (
        n as f64 / elapsed.as_secs_f64(),
        errors.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed),
    )
}

async fn gateway(mock: &MockAzure, otlp: Option<&OtlpReceiver>) -> Result<ControlPlane> {
    let mut telemetry = json!({"log_level": "info"});
    if let Some(r) = otlp {
        telemetry["otlp_endpoint"] = json!(r.endpoint());
        telemetry["sample_ratio"] = json!(1.0);
    }
    let cp = ControlPlane::start_with(
        Options::standalone().with_config(json!({"telemetry": telemetry})),
    )
    .await?;
    seed_azure(&cp.rest(), &mock.base_url(), DEFAULT_API_KEY).await?;
    wait_standalone_synced(&cp).await?;
    Ok(cp)
}

async fn run() -> Result<()> {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (secs, rounds) = (env("BENCH_SECS", 5), env("BENCH_ROUNDS", 3));
    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let otlp = OtlpReceiver::start_counting().await;
    let body = Bytes::from(
        json!({
            "model": SEED_ALIAS,
            "messages": [{"role": "user", "content": "Say hello from Azure OpenAI."}],
            "max_tokens": 64
        })
        .to_string(),
    );
    let off = gateway(&mock, None).await?;
    let on = gateway(&mock, Some(&otlp)).await?;
    let urls = [
        format!("{}/v1/chat/completions", off.proxy_url()),
        format!("{}/v1/chat/completions", on.proxy_url()),
    ];
    // Calls the traced gateway answered 200: each must reach the receiver
    // as a server span (a full export queue would drop spans).
    let mut traced_calls = 0;
    for u in &urls {
        anyhow::ensure!(call(&client(), u, &body).await, "{u} does not answer 200");
        traced_calls = 1 + closed_loop(u, &body, 1).await.2;
    }
    eprintln!("aigw tracing benchmark: {rounds} rounds of {secs} s off/on ...");
    let pids = [&off, &on].map(|g| g.process().and_then(|p| p.id()).unwrap_or(0));
    let rate = env("BENCH_RATE", 1_000);
    // Max throughput and aigw's CPU ticks per 1,000 calls there, then CPU
    // ticks per 1,000 calls at the fixed rate.
    let measured = |i: usize| {
        let (url, body, pid) = (&urls[i], &body, pids[i]);
        async move {
            let before = cpu_ticks(pid).unwrap_or(0);
            let (rps, mut errors, ok) = closed_loop(url, body, secs).await;
            let ticks = cpu_ticks(pid).unwrap_or(0).saturating_sub(before);
            let saturated = ticks as f64 * 1000.0 / (rps * secs as f64).max(1.0);
            let before = cpu_ticks(pid).unwrap_or(0);
            let failed = fixed_rate(url, body, rate, secs).await;
            errors += failed;
            let ticks = cpu_ticks(pid).unwrap_or(0).saturating_sub(before);
            let per_1k = ticks as f64 * 1000.0 / (rate * secs) as f64;
            let ok = ok + rate * secs - failed;
            (rps, errors, saturated, per_1k, ok)
        }
    };
    let mut ratios = Vec::new();
    let mut cpu_ratios = Vec::new();
    let mut rows = Vec::new();
    let mut sat_ratios = Vec::new();
    for _ in 0..rounds {
        let (r_off, e_off, s_off, c_off, _) = measured(0).await;
        let (r_on, e_on, s_on, c_on, ok) = measured(1).await;
        traced_calls += ok;
        ratios.push(r_on / r_off.max(f64::MIN_POSITIVE));
        cpu_ratios.push(c_on / c_off.max(f64::MIN_POSITIVE));
        sat_ratios.push(s_on / s_off.max(f64::MIN_POSITIVE));
        rows.push((r_off, e_off, s_off, c_off, r_on, e_on, s_on, c_on));
    }
    // A graceful stop flushes the spans still queued.
    let mut on = on;
    if let Some(p) = on.process_mut() {
        p.terminate(1_500).await?;
    }
    let flushed = Instant::now() + Duration::from_secs(10);
    while otlp.counted_server() < traced_calls && Instant::now() < flushed {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (spans, server_spans) = (otlp.counted(), otlp.counted_server());
    drop((off, on));
    ratios.sort_by(f64::total_cmp);
    cpu_ratios.sort_by(f64::total_cmp);
    sat_ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let cpu_median = cpu_ratios[cpu_ratios.len() / 2];
    let sat_median = sat_ratios[sat_ratios.len() / 2];
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!();
    println!("=== aigw tracing overhead (release; {cores} cores shared; {CONNECTIONS} connections, closed loop) ===");
    println!("  (CPU: aigw's CPU ticks per 1,000 calls, at max throughput / at {rate} calls/s)");
    for (i, (r_off, e_off, s_off, c_off, r_on, e_on, s_on, c_on)) in rows.iter().enumerate() {
        println!(
            "  round {}: off {r_off:>6.0} req/s ({e_off} err, CPU {s_off:.1} / {c_off:.1})   on (OTLP, ratio 1.0) {r_on:>6.0} req/s ({e_on} err, CPU {s_on:.1} / {c_on:.1})   on/off {:.3}",
            i + 1,
            r_on / r_off.max(f64::MIN_POSITIVE)
        );
    }
    println!(
        "  median on/off {median:.3}: tracing costs {:.1} % of max throughput",
        (1.0 - median) * 100.0
    );
    println!(
        "  spans received: {spans}; server spans {server_spans} for {traced_calls} traced calls ({})",
        if server_spans >= traced_calls { "none lost".to_string() } else { format!("{} lost", traced_calls - server_spans) }
    );
    println!(
        "  aigw's own CPU per call at max throughput, on/off median {sat_median:.3}: tracing adds {:.1} %",
        (sat_median - 1.0) * 100.0
    );
    println!(
        "  aigw's own CPU per call at {rate} calls/s, on/off median {cpu_median:.3}: tracing adds {:.1} %",
        (cpu_median - 1.0) * 100.0
    );
    println!();
    Ok(())
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}
