//! Issue 17, row 1: anyone who reaches a port, with no key, opens thousands
//! of sockets and sends nothing or partial headers. Every listener (proxy,
//! metrics, admin REST, gRPC) has a connection cap, a header-read timeout and
//! an idle timeout, so the process keeps its file descriptors and everyone
//! else keeps being served; the cap shows in `/metrics` and in one log line.

use aigw_tests::data_plane::{chat_body, wait_standalone_synced, ProxyClient};
use aigw_tests::fixtures::{seed_azure, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT};
use aigw_tests::mock_azure::{MockAzure, DEFAULT_API_KEY};
use aigw_tests::{ControlPlane, Options};
use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections per listener in the flood test.
const CAP: usize = 256;
/// The gateway's descriptors in the flood test: more than every listener's
/// cap together (1,024) plus what the process needs itself, fewer than the
/// sockets the flood connects.
const GATEWAY_FDS: u64 = 1536;
/// Idle sockets per listener: 5,000 in all.
const FLOOD: [(&str, usize); 3] = [("proxy", 2500), ("admin", 1500), ("metrics", 1000)];
/// Header-read timeout in the timeout test.
const HEADER_TIMEOUT: Duration = Duration::from_millis(500);
/// Idle timeout in the timeout test.
const IDLE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Raises this process's soft descriptor limit to its hard limit: the test
/// holds thousands of sockets itself.
fn raise_own_fd_limit(need: u64) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no 'Max open files' in /proc/self/limits")?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (soft, hard) = (nums[0], nums[1]);
    ensure!(
        hard >= need,
        "this test needs {need} descriptors; the hard limit is {hard}"
    );
    if soft < need {
        let status = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={hard}:{hard}"))
            .status()?;
        ensure!(status.success(), "prlimit failed: {status}");
    }
    Ok(())
}

fn addr_of(url: &str) -> Result<SocketAddr> {
    Ok(url.trim_start_matches("http://").parse()?)
}

/// Opens `n` sockets to `addr`; every other one sends the start of a
/// request and never finishes it, the rest send nothing. Connections the
/// kernel does not complete within 2 s (a full backlog) are skipped.
async fn idle_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?;
            if i % 2 == 0 {
                let _ = s
                    .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await;
            }
            Some(s)
        })
        .buffer_unordered(512)
        .filter_map(|s| async move { s })
        .collect()
        .await
}

use aigw_tests::metrics::scrape;

/// The value of `name{listener}`; 0 when absent.
fn listener_value(scrape: &prometheus_parse::Scrape, name: &str, listener: &str) -> f64 {
    aigw_tests::metrics::sum(scrape, name, &[("listener", listener)])
}

async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, String)> {
    let r = client.get(url).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_idle_sockets_leave_every_listener_answering() -> Result<()> {
    let total: usize = FLOOD.iter().map(|(_, n)| n).sum();
    raise_own_fd_limit(u64::try_from(total)? + 1024)?;

    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let cap = json!({"connections": {"max_per_listener": CAP}});
    let mut opts =
        Options::standalone().with_config(json!({"data_plane": cap.clone(), "control_plane": cap}));
    opts.max_open_files = Some((GATEWAY_FDS, GATEWAY_FDS));
    let mut cp = ControlPlane::start_with(opts).await?;
    seed_azure(&cp.rest(), &mock.base_url(), DEFAULT_API_KEY).await?;
    wait_standalone_synced(&cp).await?;

    let metrics_url = cp.data_plane_metrics_url();
    let urls = [
        ("proxy", cp.proxy_url()),
        ("admin", cp.admin_url()),
        ("metrics", metrics_url.clone()),
    ];
    let mut held = Vec::new();
    for (name, n) in FLOOD {
        let url = &urls.iter().find(|(l, _)| *l == name).context("url")?.1;
        let socks = idle_sockets(addr_of(url)?, n).await;
        eprintln!("{name}: {} of {n} idle sockets connected", socks.len());
        held.push(socks);
    }
    let connected: usize = held.iter().map(Vec::len).sum();
    ensure!(
        connected as u64 > GATEWAY_FDS,
        "only {connected} sockets connected: not enough to exhaust the gateway's {GATEWAY_FDS} descriptors"
    );

    // While the flood is held: a real call, and both health endpoints.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let started = Instant::now();
    let proxy = ProxyClient::new(&cp.proxy_url(), Some(SEED_CALLER_KEY));
    let resp = proxy
        .chat(&chat_body(SEED_ALIAS, "still there?"))
        .await
        .context("a valid call during the flood")?;
    ensure!(
        resp.status == 200,
        "valid call: {} {}",
        resp.status,
        resp.text
    );
    let (s, _) = get(&client, &format!("{}/livez", cp.admin_url()))
        .await
        .context("admin /livez during the flood")?;
    ensure!(s == 200, "admin /livez: {s}");
    let (s, _) = get(&client, &format!("{metrics_url}/livez"))
        .await
        .context("data plane /livez during the flood")?;
    ensure!(s == 200, "data plane /livez: {s}");
    // Each request has its own 10 s timeout; together they stay well inside
    // what a client would wait, on a loaded CI box too.
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "answers took {:?} during the flood",
        started.elapsed()
    );
    ensure!(cp.is_running(), "the gateway died:\n{}", cp.stderr());

    // The cap was met on every flooded listener, and never exceeded.
    let (_, dp_text) = get(&client, &format!("{metrics_url}/metrics")).await?;
    let (_, cp_text) = get(&client, &format!("{}/metrics", cp.admin_url())).await?;
    let (dp, cpm) = (scrape(&dp_text)?, scrape(&cp_text)?);
    for (scrape, listener) in [(&dp, "proxy"), (&dp, "metrics"), (&cpm, "admin")] {
        let reached = listener_value(scrape, "aigw_listener_limit_reached_total", listener);
        ensure!(reached > 0.0, "{listener}: cap never reported reached");
        let open = listener_value(scrape, "aigw_listener_connections", listener);
        ensure!(
            open <= CAP as f64,
            "{listener}: {open} connections open, cap {CAP}"
        );
        ensure!(
            listener_value(scrape, "aigw_listener_connections_max", listener) == CAP as f64,
            "{listener}: cap not exported"
        );
        ensure!(
            listener_value(scrape, "aigw_listener_accept_errors_total", listener) == 0.0,
            "{listener}: accept failed (descriptors exhausted?)"
        );
    }
    // One log line per listener and period, not one per connection.
    let logs = format!("{}{}", cp.stdout(), cp.stderr());
    let lines = logs
        .lines()
        .filter(|l| l.contains("connection limit reached") && l.contains("\"proxy\""))
        .count();
    let reached = listener_value(&dp, "aigw_listener_limit_reached_total", "proxy");
    ensure!(lines >= 1, "no log line for the proxy's cap");
    ensure!(
        (lines as f64) < reached,
        "{lines} log lines for {reached} cap hits: not rate-limited"
    );
    drop(held);
    Ok(())
}

/// Reads from `s` until the peer closes; the time since `started` that took,
/// or an error past `limit`.
async fn time_to_close(s: &mut TcpStream, started: Instant, limit: Duration) -> Result<Duration> {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Err(_) => bail!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn silent_and_partial_header_sockets_are_closed_after_the_header_timeout() -> Result<()> {
    let bounds = json!({"connections": {
        "header_read_timeout": format!("{}ms", HEADER_TIMEOUT.as_millis()),
        "idle_timeout": format!("{}ms", IDLE_TIMEOUT.as_millis()),
    }});
    let cp = ControlPlane::start_with(
        Options::standalone()
            .with_config(json!({"data_plane": bounds.clone(), "control_plane": bounds})),
    )
    .await?;
    wait_standalone_synced(&cp).await?;
    let listeners = [
        ("proxy", addr_of(&cp.proxy_url())?),
        ("metrics", addr_of(&cp.data_plane_metrics_url())?),
        ("admin", cp.admin_addr()),
        ("grpc", cp.grpc_addr()),
    ];
    let limit = HEADER_TIMEOUT + Duration::from_secs(4);
    for (name, addr) in listeners {
        let partial: &[u8] = if name == "grpc" {
            // Half of the HTTP/2 connection preface.
            b"PRI * HTTP/2.0\r\n"
        } else {
            b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: "
        };
        let started = Instant::now();
        let mut silent = TcpStream::connect(addr).await?;
        let mut slow = TcpStream::connect(addr).await?;
        slow.write_all(partial).await?;
        for (what, s) in [("silent", &mut silent), ("partial headers", &mut slow)] {
            let took = time_to_close(s, started, limit)
                .await
                .with_context(|| format!("{name}: {what} socket"))?;
            // Closed by the timeout, not at once for some other reason.
            ensure!(
                took >= HEADER_TIMEOUT.mul_f32(0.8),
                "{name}: {what} socket closed after {took:?}, before the header timeout"
            );
        }
    }

    // A kept-alive HTTP/1.1 connection idling after its response is closed too.
    let mut s = TcpStream::connect(cp.admin_addr()).await?;
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(limit, s.read(&mut buf)).await??;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "admin /livez: {}",
        String::from_utf8_lossy(&buf[..n])
    );
    time_to_close(&mut s, Instant::now(), limit)
        .await
        .context("admin: kept-alive connection after its response")?;

    // An HTTP/2 connection with no stream open is closed after the idle timeout.
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(cp.admin_addr()).await?);
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/livez", cp.admin_addr()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = send.send_request(req).await?;
    ensure!(
        resp.status() == 200,
        "admin /livez over h2: {}",
        resp.status()
    );
    drop(resp);
    let started = Instant::now();
    tokio::time::timeout(IDLE_TIMEOUT + Duration::from_secs(4), conn)
        .await
        .context("h2 connection still open after the idle timeout")???;
    ensure!(
        started.elapsed() >= IDLE_TIMEOUT.mul_f32(0.8),
        "h2 connection closed after {:?}, before the idle timeout",
        started.elapsed()
    );

    // Every close was counted.
    let client = reqwest::Client::new();
    let (_, dp) = get(&client, &format!("{}/metrics", cp.data_plane_metrics_url())).await?;
    let (_, cpm) = get(&client, &format!("{}/metrics", cp.admin_url())).await?;
    let (dp, cpm) = (scrape(&dp)?, scrape(&cpm)?);
    for (scrape, listener, at_least) in [
        (&dp, "proxy", 2.0),
        (&dp, "metrics", 2.0),
        (&cpm, "admin", 4.0),
        (&cpm, "grpc", 2.0),
    ] {
        let n = listener_value(scrape, "aigw_listener_timed_out_total", listener);
        ensure!(
            n >= at_least,
            "{listener}: {n} timeouts counted, want {at_least}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn connection_bounds_outside_their_range_are_refused_at_start() -> Result<()> {
    for (patch, key) in [
        (
            json!({"data_plane": {"connections": {"max_header_bytes": 100}}}),
            "data_plane.connections.max_header_bytes",
        ),
        (
            json!({"control_plane": {"connections": {"max_per_listener": 0}}}),
            "control_plane.connections.max_per_listener",
        ),
        (
            json!({"control_plane": {"connections": {"header_read_timeout": "0s"}}}),
            "control_plane.connections.header_read_timeout",
        ),
        (
            json!({"data_plane": {"connections": {"max_conns": 5}}}),
            "max_conns",
        ),
    ] {
        let mut cfg = Options::standalone().render(tempfile::tempdir()?.path());
        aigw_tests::control_plane::merge(&mut cfg, patch);
        let out = aigw_tests::control_plane::run_binary_until_exit(
            "aigw",
            &serde_yaml::to_string(&cfg)?,
            &[],
            &[],
        )
        .await?;
        ensure!(!out.status.success(), "{key}: started anyway");
        let said = format!("{}{}", out.stdout, out.stderr);
        ensure!(said.contains(key), "{key} not named: {said}");
    }
    Ok(())
}

/// The soft open-file limit of `pid`, from `/proc/<pid>/limits`.
fn soft_fd_limit(pid: u32) -> Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no 'Max open files'")?;
    line.split_whitespace()
        .find_map(|w| w.parse().ok())
        .context("no soft limit")
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_hold_the_caps_or_a_warning_says_why_not() -> Result<()> {
    // Soft 1024, hard 8192: four caps of 1000 plus the 1024 reserve fit
    // under the hard limit, so the soft one is raised to 5024.
    let cap = json!({"connections": {"max_per_listener": 1000}});
    let mut opts =
        Options::standalone().with_config(json!({"data_plane": cap.clone(), "control_plane": cap}));
    opts.max_open_files = Some((1024, 8192));
    let cp = ControlPlane::start_with(opts).await?;
    wait_standalone_synced(&cp).await?;
    let pid = cp.process().and_then(|p| p.id()).context("no pid")?;
    ensure!(
        soft_fd_limit(pid)? == 4 * 1000 + 1024,
        "soft open-file limit {} after start",
        soft_fd_limit(pid)?
    );
    drop(cp);

    // Hard 2048 cannot hold four default caps (10,000 each): started, and said so.
    let mut opts = Options::standalone();
    opts.max_open_files = Some((2048, 2048));
    let cp = ControlPlane::start_with(opts).await?;
    wait_standalone_synced(&cp).await?;
    let logs = format!("{}{}", cp.stdout(), cp.stderr());
    ensure!(
        logs.contains("the open-file limit cannot hold every listener's connection cap"),
        "no warning about the open-file limit:\n{logs}"
    );
    Ok(())
}
