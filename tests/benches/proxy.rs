//! What aigw adds on top of Azure: the same load sent straight to the mock
//! Azure OpenAI and through a standalone aigw (release build), compared.
//!
//! Build the release binary first, then run the bench (benches build in the
//! release profile, so the binary is found next to the bench executable, in
//! `target/release/`; `AIGW_BIN` overrides the location):
//!
//! ```sh
//! cargo build --release -p aigw
//! cargo bench -p aigw-tests --bench proxy
//! ```
//!
//! Measures, with a keep-alive hyper client in this process:
//! 1. fixed rate, open loop: 1,000 req/s for `BENCH_SECS` (default 10) s each
//!    way; every request is scheduled on a timer and its latency counted from
//!    the scheduled time (no coordinated omission); p50/p99 each way and the
//!    latency aigw adds;
//! 2. max throughput, closed loop: 32 connections for `BENCH_SECS` s each way;
//! 3. the aigw process's RSS (`VmRSS`) idle and after the load.
//!
//! Besides the plain path, two more aliases on the same deployment: one with
//! the response cache on (every call a hit), one under rate limits (rpm,
//! tpm, rpd, tpd and concurrency, all high enough never to refuse), so the
//! limiter's cost — prompt tokenized, five limits checked and settled — is
//! the difference between that row and the plain one.
//!
//! aigw logs at `info` (its default, with one access-log line per call);
//! `BENCH_LOG_LEVEL=warn` shows what that logging costs.
//!
//! The load generator and the mock share this process; aigw runs in its own.
//! On a small machine they all compete for the same cores, so read the
//! numbers as relative.

use aigw_tests::data_plane::wait_standalone_synced;
use aigw_tests::fixtures::{seed_azure, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT};
use aigw_tests::mock_azure::{MockAzure, DEFAULT_API_KEY};
use aigw_tests::process::rss_kib;
use aigw_tests::{ControlPlane, Options};
use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const RATE: u64 = 1_000;
const CONNECTIONS: usize = 32;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One way to send the benchmark's chat request.
#[derive(Clone)]
struct Target {
    name: &'static str,
    uri: Uri,
    auth: (&'static str, String),
    body: Bytes,
}

impl Target {
    /// Sends one request and reads the whole answer; true on a 200.
    async fn call(&self, client: &HttpClient) -> bool {
        let req = Request::post(self.uri.clone())
            .header("content-type", "application/json")
            .header(self.auth.0, &self.auth.1)
            .body(Full::new(self.body.clone()))
            .expect("request");
        match client.request(req).await {
            Ok(resp) => {
                let ok = resp.status() == 200;
                resp.into_body().collect().await.is_ok() && ok
            }
            Err(_) => false,
        }
    }
}

fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(http)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[idx.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct OpenLoop {
    sent: u64,
    errors: u64,
    /// From the scheduled time; sorted, successful requests only.
    latencies: Vec<Duration>,
    /// From the actual send (excludes timer lateness); sorted.
    service: Vec<Duration>,
    elapsed: Duration,
}

/// `RATE` req/s for `secs`: request `i` is due at `start + i / RATE`.
async fn open_loop(target: &Target, secs: u64) -> OpenLoop {
    let client = client();
    let total = RATE * secs;
    let start = Instant::now() + Duration::from_millis(20);
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / RATE);
        tokio::time::sleep_until(due).await;
        let (target, client) = (target.clone(), client.clone());
        handles.push(tokio::spawn(async move {
            let sent = Instant::now();
            target
                .call(&client)
                .await
                .then(|| (due.elapsed(), sent.elapsed()))
        }));
    }
    let mut latencies = Vec::with_capacity(handles.len());
    let mut service = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for h in handles {
        match h.await {
            Ok(Some((l, s))) => {
                latencies.push(l);
                service.push(s);
            }
            _ => errors += 1,
        }
    }
    latencies.sort();
    service.sort();
    OpenLoop {
        sent: total,
        errors,
        latencies,
        service,
        elapsed: start.elapsed(),
    }
}

/// `CONNECTIONS` workers sending back to back for `secs`; (ok, errors).
async fn closed_loop(target: &Target, secs: u64) -> (u64, u64, Duration) {
    let client = client();
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (target, client) = (target.clone(), client.clone());
            let (ok, errors, stop) = (ok.clone(), errors.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if target.call(&client).await {
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
    let counted = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    let elapsed = started.elapsed();
    for w in workers {
        let _ = w.await;
    }
    (counted.0, counted.1, elapsed)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

async fn run() -> Result<()> {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let log_level = std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let cp = ControlPlane::start_with(
        Options::standalone().with_config(json!({"telemetry": {"log_level": log_level}})),
    )
    .await?;
    let pid = cp.process().and_then(|p| p.id()).context("no aigw pid")?;
    let seeded = seed_azure(&cp.rest(), &mock.base_url(), DEFAULT_API_KEY).await?;
    // A second alias on the same deployment, with the response cache on.
    let mut cached_model =
        aigw_tests::fixtures::model_on("cached", SEED_DEPLOYMENT, &seeded.provider_key_id);
    cached_model["cache"] = json!({"enabled": true, "ttl_seconds": 3600});
    cp.rest().create("models", &cached_model).await?;
    // And one under every kind of rate limit, none of them ever reached.
    let mut limited_model =
        aigw_tests::fixtures::model_on("limited", SEED_DEPLOYMENT, &seeded.provider_key_id);
    limited_model["rate_limit"] = json!({
        "rpm": 100_000_000u64, "tpm": 100_000_000_000u64,
        "rpd": 100_000_000u64, "tpd": 100_000_000_000u64, "concurrency": 100_000
    });
    cp.rest().create("models", &limited_model).await?;
    let mut key = cp
        .rest()
        .get(&format!("/admin/v1/apikeys/{}", seeded.api_key_id))
        .await?
        .expect(200)?["value"]
        .clone();
    key["allowed_models"] = json!([SEED_ALIAS, "cached", "limited"]);
    cp.rest()
        .put(&format!("/admin/v1/apikeys/{}", seeded.api_key_id), &key)
        .await?
        .expect(200)?;
    wait_standalone_synced(&cp).await?;
    let rss_idle = rss_kib(pid);

    let body = json!({
        "model": SEED_ALIAS,
        "messages": [{"role": "user", "content": "Say hello from Azure OpenAI."}],
        "max_tokens": 64
    })
    .to_string();
    let direct = Target {
        name: "direct to mock Azure",
        uri: mock.chat_url(SEED_DEPLOYMENT).parse()?,
        auth: ("api-key", DEFAULT_API_KEY.to_string()),
        body: Bytes::from(body.clone()),
    };
    let via = Target {
        name: "through aigw",
        uri: format!("{}/v1/chat/completions", cp.proxy_url()).parse()?,
        auth: ("authorization", format!("Bearer {SEED_CALLER_KEY}")),
        body: Bytes::from(body),
    };
    let hit = Target {
        name: "aigw cache hit",
        body: Bytes::from(
            json!({
                "model": "cached",
                "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello from Azure OpenAI."}],
                "max_tokens": 64
            })
            .to_string(),
        ),
        ..via.clone()
    };
    let limited = Target {
        name: "aigw rate-limited",
        body: Bytes::from(
            json!({
                "model": "limited",
                "messages": [{"role": "user", "content": "Say hello from Azure OpenAI."}],
                "max_tokens": 64
            })
            .to_string(),
        ),
        ..via.clone()
    };
    let paths = [&direct, &via, &hit, &limited];
    // Every path works, then warm up (connections, allocator, caches).
    for t in paths {
        anyhow::ensure!(t.call(&client()).await, "{} does not answer 200", t.name);
        closed_loop(t, 1).await;
    }

    eprintln!("aigw proxy benchmark: {secs} s per phase and path ...");
    // Upstream calls made while the cache-hit path ran: should be none.
    let mut upstream_calls = 0;
    let mut fixed = Vec::new();
    for t in paths {
        let before = mock.total_requests();
        fixed.push(open_loop(t, secs).await);
        if t.name == hit.name {
            upstream_calls += mock.total_requests() - before;
        }
    }
    let mut max = Vec::new();
    for t in paths {
        let before = mock.total_requests();
        max.push(closed_loop(t, secs).await);
        if t.name == hit.name {
            upstream_calls += mock.total_requests() - before;
        }
    }
    let rss_after = rss_kib(pid);
    // Stop aigw now: dropping it prints its log tail to stderr, which should
    // come before the report, not after it.
    drop(cp);
    let cores = std::thread::available_parallelism().map_or(0, usize::from);

    println!();
    println!("=== aigw proxy benchmark (release; {cores} cores shared by load generator + mock Azure + aigw) ===");
    println!(
        "request: non-streaming chat completion, ~{} byte body; aigw log level {log_level}",
        direct.body.len()
    );
    println!();
    println!("(i) fixed rate {RATE} req/s, open loop, {secs} s each");
    println!("    `sched` latency counts from the scheduled send time (includes timer lateness,");
    println!("    ~1 ms tick); `service` from the moment the request was actually sent");
    println!(
        "  {:<22} {:>6} {:>4} {:>11} {:>11} {:>11} {:>13} {:>13} {:>8}",
        "path",
        "sent",
        "err",
        "sched p50",
        "sched p99",
        "sched max",
        "service p50",
        "service p99",
        "done/s"
    );
    for (t, r) in paths.iter().zip(&fixed) {
        println!(
            "  {:<22} {:>6} {:>4} {:>8.3} ms {:>8.3} ms {:>8.3} ms {:>10.3} ms {:>10.3} ms {:>8.0}",
            t.name,
            r.sent,
            r.errors,
            ms(pct(&r.latencies, 50.0)),
            ms(pct(&r.latencies, 99.0)),
            ms(r.latencies.last().copied().unwrap_or_default()),
            ms(pct(&r.service, 50.0)),
            ms(pct(&r.service, 99.0)),
            r.latencies.len() as f64 / r.elapsed.as_secs_f64(),
        );
    }
    let added = |f: fn(&OpenLoop) -> &Vec<Duration>, p: f64, over: usize, base: usize| {
        ms(pct(f(&fixed[over]), p)) - ms(pct(f(&fixed[base]), p))
    };
    for (what, over, base) in [("aigw", 1, 0), ("the rate limiter", 3, 1)] {
        println!(
            "  added by {what}: sched p50 {:+.3} ms, p99 {:+.3} ms; service p50 {:+.3} ms, p99 {:+.3} ms",
            added(|r| &r.latencies, 50.0, over, base),
            added(|r| &r.latencies, 99.0, over, base),
            added(|r| &r.service, 50.0, over, base),
            added(|r| &r.service, 99.0, over, base),
        );
    }
    println!();
    println!(
        "(ii) max throughput, {CONNECTIONS} keep-alive connections, closed loop, {secs} s each"
    );
    let rps: Vec<f64> = max
        .iter()
        .map(|(ok, _, el)| *ok as f64 / el.as_secs_f64())
        .collect();
    for (t, ((ok, errors, _), rps)) in paths.iter().zip(max.iter().zip(&rps)) {
        println!(
            "  {:<22} {:>9.0} req/s  ({ok} ok, {errors} errors)",
            t.name, rps
        );
    }
    println!(
        "  ratio through aigw / direct: {:.2}",
        rps[1] / rps[0].max(f64::MIN_POSITIVE)
    );
    println!(
        "  cache hits / non-cached through aigw: {:.2}; upstream calls while serving hits: {upstream_calls}",
        rps[2] / rps[1].max(f64::MIN_POSITIVE)
    );
    println!(
        "  rate-limited / unlimited through aigw: {:.2}",
        rps[3] / rps[1].max(f64::MIN_POSITIVE)
    );
    println!();
    println!("(iii) aigw process RSS (standalone: control plane + data plane)");
    println!("  idle (configured, before load): {}", mib(rss_idle));
    println!("  after load:                     {}", mib(rss_after));
    println!();
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}
