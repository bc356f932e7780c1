//! Usage accounting end to end: two data planes publish usage events on a
//! real NATS JetStream, the control plane aggregates them; totals must equal
//! what the test computed, exactly, also across a NATS outage and a control
//! plane crash. Budgets cut a key off on every node.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{chat_body, start_fleet, DataPlane, ProxyClient};
use aigw_tests::fixtures::{api_key, model_on, provider_key_at};
use aigw_tests::mock_azure::{expected_usage, Behaviour, MockAzure};
use aigw_tests::nats::NatsServer;
use aigw_tests::process::poll_until;
use aigw_tests::usage::{assert_totals, wait_budget_refused, Totals};
use aigw_tests::AdminClient;
use anyhow::{ensure, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ALIAS: &str = "gpt-4o-azure";
const BROKEN: &str = "broken-azure";
const CALLER: &str = "sk-usage-caller";
/// USD per 1k tokens: exact in nano-USD, so expected costs are exact integers.
const IN_PER_1K: f64 = 0.5;
const OUT_PER_1K: f64 = 1.5;

struct Fleet {
    _mock: MockAzure,
    nats: NatsServer,
    cp: ControlPlane,
    nodes: Vec<DataPlane>,
    admin: AdminClient,
}

async fn fleet(nodes: usize, budget: Option<f64>) -> Result<Fleet> {
    let mock = MockAzure::start().await;
    mock.add_deployment("gpt4o-prod", "gpt-4o-mini-2024-07-18");
    mock.add_deployment("broken", "gpt-4o-mini-2024-07-18");
    mock.set_behaviour(
        "broken",
        Behaviour::Fail {
            status: 500,
            body: r#"{"error":{"code":"500","message":"boom"}}"#.into(),
        },
    );
    let nats = NatsServer::start().await?;
    let cp = ControlPlane::start_with(
        Options::default().with_config(json!({"nats": {"url": nats.url()}})),
    )
    .await?;
    let admin = cp.rest();
    let pk = admin
        .create_id(
            "provider_keys",
            &provider_key_at("azure-prod", "test-azure-key", &mock.base_url()),
        )
        .await?;
    let mut m = model_on(ALIAS, "gpt4o-prod", &pk);
    m["cost"] = json!({"input_per_1k": IN_PER_1K, "output_per_1k": OUT_PER_1K});
    admin.create("models", &m).await?;
    admin
        .create("models", &model_on(BROKEN, "broken", &pk))
        .await?;
    let mut k = api_key(CALLER, &[ALIAS, BROKEN]);
    if let Some(usd) = budget {
        k["budget"] = json!({"max_usd": usd, "period": "day"});
    }
    admin.create("apikeys", &k).await?;
    let dps = start_fleet(&cp, &nats.url(), nodes).await?;
    Ok(Fleet {
        _mock: mock,
        nats,
        cp,
        nodes: dps,
        admin,
    })
}

fn nanos(prompt: u64, completion: u64) -> u64 {
    prompt * (IN_PER_1K * 1e6) as u64 + completion * (OUT_PER_1K * 1e6) as u64
}

/// Call `i` of a load: every 10th goes to the broken deployment (502/503), every
/// 3rd streams; message lengths vary so token counts do.
async fn one_call(client: &ProxyClient, i: usize) -> Result<Totals> {
    let broken = i.is_multiple_of(10);
    let stream = i.is_multiple_of(3);
    let text = "word ".repeat(1 + i % 37);
    let mut body = chat_body(if broken { BROKEN } else { ALIAS }, &text);
    if stream {
        body["stream"] = json!(true);
    }
    let resp = client.chat(&body).await?;
    if broken {
        // 502 while the broken deployment is tried; 503 while its circuit is open.
        ensure!(
            matches!(resp.status.as_u16(), 502 | 503),
            "call {i}: {} {}",
            resp.status,
            resp.text
        );
        return Ok(Totals {
            requests: 1,
            errors: 1,
            ..Default::default()
        });
    }
    ensure!(
        resp.status.as_u16() == 200,
        "call {i}: {} {}",
        resp.status,
        resp.text
    );
    if stream {
        ensure!(
            resp.text.ends_with("data: [DONE]\n\n"),
            "call {i}: unterminated stream"
        );
    }
    let (prompt, completion) = expected_usage(&body);
    Ok(Totals {
        requests: 1,
        errors: 0,
        prompt,
        completion,
        cost_nanos: nanos(prompt, completion),
    })
}

/// Runs `n` calls spread over `clients`, at most `concurrency` at a time and
/// no faster than one every `pace`; `done` counts finished calls.
async fn load(
    clients: &[ProxyClient],
    n: usize,
    concurrency: usize,
    pace: Duration,
    done: Arc<AtomicUsize>,
) -> Result<Totals> {
    let start = Instant::now();
    let results: Vec<Result<Totals>> = futures::stream::iter(0..n)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            let done = done.clone();
            async move {
                tokio::time::sleep_until((start + pace * i as u32).into()).await;
                let r = one_call(&client, i).await;
                done.fetch_add(1, Ordering::Relaxed);
                r
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut t = Totals::default();
    for r in results {
        let r = r?;
        t.requests += r.requests;
        t.errors += r.errors;
        t.prompt += r.prompt;
        t.completion += r.completion;
        t.cost_nanos += r.cost_nanos;
    }
    Ok(t)
}

fn clients(f: &Fleet) -> Vec<ProxyClient> {
    f.nodes.iter().map(|n| n.client(Some(CALLER))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_calls_across_two_nodes_are_counted_exactly() -> Result<()> {
    let f = fleet(2, None).await?;
    let expected = load(&clients(&f), 10_000, 32, Duration::ZERO, Arc::default()).await?;
    assert_totals(&f.admin, expected, 600).await?;
    // Per alias: the broken alias's calls are all errors with no tokens (502 while
    // its deployment is tried, 503 while its circuit is open).
    let v: Value = f
        .admin
        .get("/admin/v1/usage?group_by=model")
        .await?
        .expect(200)?;
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let broken = rows
        .iter()
        .find(|r| r["group"]["model"] == BROKEN)
        .expect("a row for the broken alias");
    assert_eq!(broken["requests"], broken["errors"]);
    assert_eq!(broken["requests"], json!(1000));
    assert_eq!(broken["prompt_tokens"], json!(0));
    Ok(())
}

/// Starts 10,000 calls in the background, one every `pace`; returns the
/// task (with the computed totals) and the count of finished calls.
fn spawn_load(
    f: &Fleet,
    pace: Duration,
) -> (tokio::task::JoinHandle<Result<Totals>>, Arc<AtomicUsize>) {
    let done = Arc::new(AtomicUsize::new(0));
    let cs = clients(f);
    let counter = done.clone();
    (
        tokio::spawn(async move { load(&cs, 10_000, 16, pace, counter).await }),
        done,
    )
}

/// Waits until at least `n` calls of a background load have finished.
async fn wait_calls(done: &AtomicUsize, n: usize, what: &str) -> Result<()> {
    poll_until(what, 3000, Duration::from_millis(20), || {
        let finished = done.load(Ordering::Relaxed);
        async move { Ok((finished >= n).then_some(())) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_down_for_twenty_seconds_mid_load_loses_nothing() -> Result<()> {
    let mut f = fleet(2, None).await?;
    // ~35 s of load at 3.5 ms per call, so the outage falls in the middle.
    let (load, done) = spawn_load(&f, Duration::from_micros(3500));
    wait_calls(&done, 2000, "2,000 calls before the outage").await?;
    f.nats.stop();
    let stopped_at = done.load(Ordering::Relaxed);
    // The outage itself lasts 20 s by design; the load keeps going meanwhile.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = done.load(Ordering::Relaxed) - stopped_at;
    f.nats.resume().await?;
    let expected = load.await??;
    ensure!(during > 1000, "only {during} calls ran while NATS was down");
    assert_totals(&f.admin, expected, 900).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_killed_mid_load_loses_nothing() -> Result<()> {
    let mut f = fleet(2, None).await?;
    let (load, done) = spawn_load(&f, Duration::from_micros(1500));
    wait_calls(&done, 3000, "3,000 calls before the crash").await?;
    f.cp.kill9();
    let killed_at = done.load(Ordering::Relaxed);
    wait_calls(
        &done,
        killed_at + 1000,
        "1,000 calls while the control plane is down",
    )
    .await?;
    f.cp.restart().await?;
    let expected = load.await??;
    // The restarted control plane listens on fresh ports.
    assert_totals(&f.cp.rest(), expected, 900).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budget_is_enforced_on_every_node_within_two_seconds() -> Result<()> {
    let f = fleet(2, Some(0.01)).await?;
    let cs = clients(&f);
    let mut spent = 0u64;
    let mut i = 1; // never a broken call (i % 10 != 0 below)
    let crossed = loop {
        if i % 10 == 0 {
            i += 1;
        }
        let t = one_call(&cs[i % 2], i).await?;
        spent += t.cost_nanos;
        i += 1;
        if spent >= 10_000_000 {
            break Instant::now();
        }
    };
    wait_budget_refused(&cs, ALIAS).await?;
    let took = crossed.elapsed();
    ensure!(
        took < Duration::from_secs(2),
        "budget enforced on all nodes after {took:?}"
    );
    println!("budget enforced on both nodes {took:?} after crossing it");
    Ok(())
}

#[tokio::test]
async fn standalone_without_nats_counts_through_the_in_process_bus() -> Result<()> {
    let mock = MockAzure::start().await;
    mock.add_deployment("gpt4o-prod", "gpt-4o-mini-2024-07-18");
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let pk = admin
        .create_id(
            "provider_keys",
            &provider_key_at("azure-prod", "test-azure-key", &mock.base_url()),
        )
        .await?;
    let mut m = model_on(ALIAS, "gpt4o-prod", &pk);
    m["cost"] = json!({"input_per_1k": IN_PER_1K, "output_per_1k": OUT_PER_1K});
    admin.create("models", &m).await?;
    admin.create("apikeys", &api_key(CALLER, &[ALIAS])).await?;
    aigw_tests::data_plane::wait_standalone_synced(&cp).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    let mut expected = Totals::default();
    for i in 1..60 {
        if i % 10 == 0 {
            continue;
        }
        let t = one_call(&client, i).await?;
        expected.requests += t.requests;
        expected.prompt += t.prompt;
        expected.completion += t.completion;
        expected.cost_nanos += t.cost_nanos;
    }
    assert_totals(&admin, expected, 300).await?;
    Ok(())
}
