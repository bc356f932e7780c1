//! What aigw adds on top of Azure, beside the limit a proxy doing no work
//! reaches on the same box: the same load sent straight to the mock Azure
//! OpenAI, through nginx `proxy_pass` (keep-alive upstream) and through a
//! standalone aigw (release build, shipped defaults: access log on, usage
//! events on), in one run.
//!
//! `tests/benches/run-proxy-bench` installs nginx (Debian `nginx-light`) if
//! it is missing, builds the release binary and runs this bench:
//!
//! ```sh
//! bash tests/benches/run-proxy-bench            # BENCH_SECS=10 by default
//! ```
//!
//! Or by hand: `cargo build --release -p aigw && cargo bench -p aigw-tests
//! --bench proxy` (`AIGW_BIN` overrides the binary, `NGINX_BIN` nginx; without
//! nginx its row is skipped; `BENCH_AIGW_ENV="K=V ..."` sets environment
//! for aigw alone, e.g. `TOKIO_WORKER_THREADS=1`).
//!
//! Per row, with a keep-alive hyper client in this process:
//! 1. fixed rate, open loop: 1,000 req/s for `BENCH_SECS` s in
//!    `BENCH_ROUNDS` (5) rounds, the rows taking turns; each request is
//!    scheduled on a timer and its latency counted from the scheduled time
//!    (no coordinated omission): p50/p99, time to first body byte for
//!    streams, and the p99 aigw (and nginx) add as the median over rounds.
//!    tokio's timer ticks in milliseconds, so a request leaves up to 1 ms
//!    after it is due, the same for every row; the p99 is also given from
//!    the actual send (what `hey` reports), without that jitter;
//! 2. max throughput, closed loop: 32 connections for `BENCH_SECS` s; for
//!    aigw rows also the CPU time aigw spent per call (`/proc/<pid>/stat`);
//! 3. aigw's RSS (`VmRSS`) idle and after the load.
//!
//! Rows: plain chat JSON (direct, nginx, aigw), streamed chat, embeddings,
//! a cache hit, a key under five rate limits (none reached), a 100 KB
//! prompt. `BENCH_LOG_LEVEL=warn` shows what aigw's access log costs; the
//! `tracing` bench measures tracing on.
//!
//! The load generator, the mock, nginx and aigw share the machine's cores:
//! read the numbers as ratios measured side by side.

use aigw_tests::data_plane::wait_standalone_synced;
use aigw_tests::fixtures::{seed_azure, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT};
use aigw_tests::mock_azure::{MockAzure, DEFAULT_API_KEY};
use aigw_tests::process::{free_addr, rss_kib};
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

/// One way to send one of the benchmark's requests.
#[derive(Clone)]
struct Target {
    name: &'static str,
    uri: Uri,
    auth: (&'static str, String),
    body: Bytes,
    /// Served by aigw: its CPU time per call is measured.
    aigw: bool,
}

/// What one call saw: time to the first body byte, bytes read.
struct Seen {
    first_byte: Duration,
    /// From the actual send to the last byte.
    total: Duration,
    bytes: usize,
}

impl Target {
    /// Sends one request and reads the whole answer; `Some` on a 200.
    async fn call(&self, client: &HttpClient) -> Option<Seen> {
        let sent = Instant::now();
        let req = Request::post(self.uri.clone())
            .header("content-type", "application/json")
            .header(self.auth.0, &self.auth.1)
            .body(Full::new(self.body.clone()))
            .ok()?;
        let resp = client.request(req).await.ok()?;
        let ok = resp.status() == 200;
        let mut body = resp.into_body();
        let mut first_byte = None;
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.ok()?.into_data() {
                first_byte.get_or_insert_with(|| sent.elapsed());
                bytes += data.len();
            }
        }
        let total = sent.elapsed();
        ok.then(|| Seen {
            first_byte: first_byte.unwrap_or(total),
            total,
            bytes,
        })
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

impl OpenLoop {
    /// One row's rounds as one sample.
    fn merge(rounds: Vec<OpenLoop>) -> OpenLoop {
        let mut all = OpenLoop {
            errors: 0,
            latencies: Vec::new(),
            service: Vec::new(),
            first_byte: Vec::new(),
        };
        for r in rounds {
            all.errors += r.errors;
            all.latencies.extend(r.latencies);
            all.service.extend(r.service);
            all.first_byte.extend(r.first_byte);
        }
        all.latencies.sort();
        all.service.sort();
        all.first_byte.sort();
        all
    }
}

struct OpenLoop {
    errors: u64,
    /// From the scheduled time; sorted, successful requests only.
    latencies: Vec<Duration>,
    /// From the actual send (what `hey` reports): without the load
    /// generator's own lateness (tokio's timer ticks in milliseconds, so a
    /// request goes out up to 1 ms after it is due); sorted.
    service: Vec<Duration>,
    /// Time to the first body byte from the actual send; sorted.
    first_byte: Vec<Duration>,
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
            let seen = target.call(&client).await?;
            Some((due.elapsed(), seen.total, seen.first_byte))
        }));
    }
    let mut latencies = Vec::with_capacity(handles.len());
    let mut service = Vec::with_capacity(handles.len());
    let mut first_byte = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for h in handles {
        match h.await {
            Ok(Some((l, s, f))) => {
                latencies.push(l);
                service.push(s);
                first_byte.push(f);
            }
            _ => errors += 1,
        }
    }
    latencies.sort();
    service.sort();
    first_byte.sort();
    OpenLoop {
        errors,
        latencies,
        service,
        first_byte,
    }
}

struct ClosedLoop {
    ok: u64,
    errors: u64,
    bytes: u64,
    elapsed: Duration,
    /// aigw's user + system CPU time over the run.
    aigw_cpu: Option<Duration>,
}

impl ClosedLoop {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// User + system CPU time of process `pid` so far (`/proc/<pid>/stat`).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

/// `CONNECTIONS` workers sending back to back for `secs`.
async fn closed_loop(target: &Target, secs: u64, aigw_pid: u32) -> ClosedLoop {
    let client = client();
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu_time(aigw_pid);
    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (target, client) = (target.clone(), client.clone());
            let (ok, errors, bytes, stop) =
                (ok.clone(), errors.clone(), bytes.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match target.call(&client).await {
                        Some(seen) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(seen.bytes as u64, Ordering::Relaxed);
                        }
                        None => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let counted = (
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
    );
    let elapsed = started.elapsed();
    let cpu_after = cpu_time(aigw_pid);
    for w in workers {
        let _ = w.await;
    }
    ClosedLoop {
        ok: counted.0,
        errors: counted.1,
        bytes: counted.2,
        elapsed,
        aigw_cpu: match (cpu_before, cpu_after) {
            (Some(b), Some(a)) if target.aigw => Some(a.saturating_sub(b)),
            _ => None,
        },
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// nginx as a plain reverse proxy to `upstream`, with keep-alive upstream
/// connections and a buffered access log (its usual production setup).
struct Nginx {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstream: std::net::SocketAddr) -> Result<Option<Self>> {
        let bin = std::env::var("NGINX_BIN").unwrap_or_else(|_| "nginx".into());
        let found = std::process::Command::new(&bin)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!(
                "nginx not found (tests/benches/run-proxy-bench installs it): its row is skipped"
            );
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let d = dir.path().display();
        let addr = free_addr();
        let conf = format!(
            "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log {d}/access.log combined buffer=64k flush=1s;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               upstream mock {{ server {upstream}; keepalive 64; }}\n\
               server {{\n    listen {addr};\n    client_max_body_size 16m;\n    client_body_buffer_size 256k;\n\
                 location / {{ proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf)?;
        let child = std::process::Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting nginx")?;
        Ok(Some(Self {
            child,
            addr,
            _dir: dir,
        }))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run() -> Result<()> {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    mock.add_deployment("embed-prod", "text-embedding-3-small");
    let nginx = Nginx::start(mock.addr())?;
    let log_level = std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let mut opts =
        Options::standalone().with_config(json!({"telemetry": {"log_level": log_level}}));
    // `BENCH_AIGW_ENV="K=V K2=V2"`: environment for aigw alone (runtime or
    // allocator settings under test), not for the load generator.
    for kv in std::env::var("BENCH_AIGW_ENV")
        .unwrap_or_default()
        .split_whitespace()
    {
        let (k, v) = kv.split_once('=').context("BENCH_AIGW_ENV wants K=V")?;
        opts = opts.with_env(k, v);
    }
    let cp = ControlPlane::start_with(opts).await?;
    let pid = cp.process().and_then(|p| p.id()).context("no aigw pid")?;
    let admin = cp.rest();
    let seeded = seed_azure(&admin, &mock.base_url(), DEFAULT_API_KEY).await?;
    let alias_on = |name: &str, deployment: &str| {
        aigw_tests::fixtures::model_on(name, deployment, &seeded.provider_key_id)
    };
    // More aliases on the same provider key: the response cache on, every
    // kind of rate limit (none ever reached), embeddings.
    let mut cached_model = alias_on("cached", SEED_DEPLOYMENT);
    cached_model["cache"] = json!({"enabled": true, "ttl_seconds": 3600});
    admin.create("models", &cached_model).await?;
    let mut limited_model = alias_on("limited", SEED_DEPLOYMENT);
    limited_model["rate_limit"] = json!({
        "rpm": 100_000_000u64, "tpm": 100_000_000_000u64,
        "rpd": 100_000_000u64, "tpd": 100_000_000_000u64, "concurrency": 100_000
    });
    admin.create("models", &limited_model).await?;
    admin
        .create("models", &alias_on("embed", "embed-prod"))
        .await?;
    let mut key = admin
        .get(&format!("/admin/v1/apikeys/{}", seeded.api_key_id))
        .await?
        .expect(200)?["value"]
        .clone();
    key["allowed_models"] = json!([SEED_ALIAS, "cached", "limited", "embed"]);
    admin
        .put(&format!("/admin/v1/apikeys/{}", seeded.api_key_id), &key)
        .await?
        .expect(200)?;
    wait_standalone_synced(&cp).await?;
    let rss_idle = rss_kib(pid);

    let chat = |model: &str, extra: serde_json::Value| {
        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Say hello from Azure OpenAI."}],
            "max_tokens": 64
        });
        aigw_tests::control_plane::merge(&mut body, extra);
        Bytes::from(body.to_string())
    };
    let direct = Target {
        name: "direct to mock",
        uri: mock.chat_url(SEED_DEPLOYMENT).parse()?,
        auth: ("api-key", DEFAULT_API_KEY.to_string()),
        body: chat(SEED_ALIAS, json!({})),
        aigw: false,
    };
    let nginx_row = nginx.as_ref().map(|n| -> Result<Target> {
        let path = mock.chat_url(SEED_DEPLOYMENT);
        let path = &path[path.find("/openai").unwrap_or(0)..];
        Ok(Target {
            name: "nginx proxy_pass",
            uri: format!("http://{}{path}", n.addr).parse()?,
            ..direct.clone()
        })
    });
    let aigw = Target {
        name: "aigw chat",
        uri: format!("{}/v1/chat/completions", cp.proxy_url()).parse()?,
        auth: ("authorization", format!("Bearer {SEED_CALLER_KEY}")),
        body: chat(SEED_ALIAS, json!({})),
        aigw: true,
    };
    let big_prompt = "lorem ipsum dolor sit amet ".repeat(100 * 1024 / 27);
    let mut rows = vec![direct.clone()];
    if let Some(n) = nginx_row {
        rows.push(n?);
    }
    let aigw_at = rows.len();
    rows.extend([
        aigw.clone(),
        Target {
            name: "aigw chat stream",
            body: chat(SEED_ALIAS, json!({"stream": true})),
            ..aigw.clone()
        },
        Target {
            name: "aigw embeddings",
            uri: format!("{}/v1/embeddings", cp.proxy_url()).parse()?,
            body: Bytes::from(
                json!({"model": "embed", "input": "Say hello from Azure OpenAI."}).to_string(),
            ),
            ..aigw.clone()
        },
        Target {
            name: "aigw cache hit",
            body: chat("cached", json!({"temperature": 0})),
            ..aigw.clone()
        },
        Target {
            name: "aigw rate-limited",
            body: chat("limited", json!({})),
            ..aigw.clone()
        },
        Target {
            name: "aigw 100 KB prompt",
            body: chat(
                SEED_ALIAS,
                json!({"messages": [{"role": "user", "content": big_prompt}]}),
            ),
            ..aigw.clone()
        },
    ]);
    // Every row works, then warm up (connections, allocator, caches).
    for t in &rows {
        anyhow::ensure!(
            t.call(&client()).await.is_some(),
            "{} does not answer 200",
            t.name
        );
        closed_loop(t, 1, pid).await;
    }

    // The open loop runs in rounds, every row once per round, so that a
    // burst of noise on the shared box hits one round of each row rather
    // than all of one row; the added p99 is the median over rounds of
    // aigw's p99 minus the direct row's p99 in the same round.
    let rounds: u64 = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .clamp(1, secs.max(1));
    let round_secs = (secs / rounds).max(1);
    eprintln!("aigw proxy benchmark: {secs} s per phase and row ({rounds} open-loop rounds) ...");
    let mut per_round: Vec<Vec<OpenLoop>> = rows.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (t, runs) in rows.iter().zip(&mut per_round) {
            runs.push(open_loop(t, round_secs).await);
        }
    }
    // Each row's p99 per round, from the due time and from the send.
    let p99_by_round = |of: fn(&OpenLoop) -> &[Duration]| -> Vec<Vec<f64>> {
        per_round
            .iter()
            .map(|row| row.iter().map(|r| ms(pct(of(r), 99.0))).collect())
            .collect()
    };
    let p99_due = p99_by_round(|r| &r.latencies);
    let p99_sent = p99_by_round(|r| &r.service);
    let fixed: Vec<OpenLoop> = per_round.into_iter().map(OpenLoop::merge).collect();
    let mut max = Vec::new();
    let mut upstream_while_hits = 0;
    for t in &rows {
        let before = mock.total_requests();
        max.push(closed_loop(t, secs, pid).await);
        if t.name == "aigw cache hit" {
            upstream_while_hits = mock.total_requests() - before;
        }
    }
    let rss_after = rss_kib(pid);
    // Stop aigw now: dropping it prints its log tail to stderr, which should
    // come before the report, not after it.
    drop(cp);
    drop(nginx);
    let cores = std::thread::available_parallelism().map_or(0, usize::from);

    println!();
    println!("=== aigw proxy benchmark (release; {cores} cores shared by load generator, mock, nginx and aigw) ===");
    println!("aigw log level {log_level}; {secs} s per phase; open loop at {RATE} req/s, closed loop with {CONNECTIONS} connections");
    println!();
    println!(
        "  {:<20} {:>9} {:>9} {:>9} {:>9} {:>5} | {:>9} {:>6} {:>9} {:>10}",
        "row", "p50", "p99", "p99 sent", "1st byte", "err", "max req/s", "err", "MB/s", "aigw CPU"
    );
    for (t, (f, m)) in rows.iter().zip(fixed.iter().zip(&max)) {
        let cpu = m
            .aigw_cpu
            .map(|c| format!("{:.1} µs", c.as_secs_f64() * 1e6 / m.ok.max(1) as f64))
            .unwrap_or_default();
        println!(
            "  {:<20} {:>6.3} ms {:>6.3} ms {:>6.3} ms {:>6.3} ms {:>5} | {:>9.0} {:>6} {:>9.1} {:>10}",
            t.name,
            ms(pct(&f.latencies, 50.0)),
            ms(pct(&f.latencies, 99.0)),
            ms(pct(&f.service, 99.0)),
            ms(pct(&f.first_byte, 50.0)),
            f.errors,
            m.rps(),
            m.errors,
            m.bytes as f64 / m.elapsed.as_secs_f64() / 1e6,
            cpu
        );
    }
    println!();
    let (direct_f, aigw_f, aigw_m) = (&fixed[0], &fixed[aigw_at], &max[aigw_at]);
    if aigw_at == 2 {
        println!(
            "  aigw / nginx max throughput: {:.2}  (goal >= 0.60)",
            aigw_m.rps() / max[1].rps().max(f64::MIN_POSITIVE)
        );
    }
    println!(
        "  aigw / direct max throughput: {:.2}",
        aigw_m.rps() / max[0].rps().max(f64::MIN_POSITIVE)
    );
    println!(
        "  added by aigw at {RATE} req/s, all rounds pooled: p50 {:+.3} ms, p99 {:+.3} ms",
        ms(pct(&aigw_f.latencies, 50.0)) - ms(pct(&direct_f.latencies, 50.0)),
        ms(pct(&aigw_f.latencies, 99.0)) - ms(pct(&direct_f.latencies, 99.0)),
    );
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for row in 0..=aigw_at {
        println!(
            "  p99 per round, {:<17} {} ms (from the send: {} ms)",
            rows[row].name,
            show(&p99_due[row]),
            show(&p99_sent[row])
        );
    }
    // What a row adds to the direct row's p99, round by round, sorted.
    let added_p99 = |p99: &[Vec<f64>], row: usize| -> Vec<f64> {
        let mut v: Vec<f64> = p99[row].iter().zip(&p99[0]).map(|(a, d)| a - d).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let median = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or_default();
    // nginx (a proxy doing no work) gives the same figure's floor on this box.
    let proxies: &[(usize, &str)] = if aigw_at == 2 {
        &[(aigw_at, "aigw"), (1, "nginx")]
    } else {
        &[(aigw_at, "aigw")]
    };
    for (p99, from) in [(&p99_due, "due time"), (&p99_sent, "send")] {
        for &(row, name) in proxies {
            let added = added_p99(p99, row);
            println!(
                "  added p99 by {name:<5} (latency from the {from:<8}), median of {} rounds: {:+.3} ms  (per round: {}){}",
                added.len(),
                median(&added),
                show(&added),
                if name == "aigw" { "  goal <= +0.5 ms" } else { "" }
            );
        }
    }
    println!("  upstream calls while serving cache hits: {upstream_while_hits}");
    println!(
        "  aigw RSS (standalone: control plane + data plane): idle {}, after load {}  (goal <= 64 / 150 MiB)",
        mib(rss_idle),
        mib(rss_after)
    );
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
