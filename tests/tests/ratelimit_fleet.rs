//! Rate limits hold across the fleet: three data planes sharing their counts
//! over a real `nats-server` together admit the configured rate, and fall
//! back to an even local share (and say so in /metrics) when NATS goes away.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{chat_body, start_fleet, DataPlane, ProxyClient};
use aigw_tests::fixtures::{api_key, mock_provider_key, model_on};
use aigw_tests::mock_azure::MockAzure;
use aigw_tests::nats::NatsServer;
use aigw_tests::process::poll_until;
use anyhow::{ensure, Result};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const ALIAS: &str = "gpt-4o-fleet";
const DEP: &str = "gpt4o-prod";
const RPM_KEY: &str = "sk-fleet-rpm-600";
const TPM_KEY: &str = "sk-fleet-tpm-20000";
const SHARE_KEY: &str = "sk-fleet-rpm-30";
const NODES: usize = 3;
const MINUTES: u64 = 2;

async fn gauge(dp: &DataPlane, name: &str) -> Result<Option<u64>> {
    let text = reqwest::get(format!("{}/metrics", dp.metrics_url()))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()))
}

/// Waits until every node reports `name` = `want`.
async fn all_report(nodes: &[DataPlane], name: &str, want: u64) -> Result<()> {
    poll_until(
        &format!("{name} = {want} on every node"),
        500,
        Duration::from_millis(20),
        || async {
            for dp in nodes {
                if gauge(dp, name).await? != Some(want) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
}

/// Calls sent at a steady `per_minute` rate, round robin over the nodes,
/// without waiting for answers (an open-loop load, as independent clients
/// make): (seconds since `t0` when sent, status, total tokens).
async fn offer(
    clients: Vec<ProxyClient>,
    body: Value,
    per_minute: u64,
    t0: Instant,
    log: Arc<Mutex<Vec<(f64, u16, u64)>>>,
) {
    let period = Duration::from_micros(60_000_000 / per_minute.max(1));
    let total = per_minute * MINUTES;
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(t0 + period.mul_f64(i as f64)).await;
        let client = clients[i as usize % clients.len()].clone();
        let (body, log) = (body.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let sent = t0.elapsed().as_secs_f64();
            let (status, tokens) = match client.chat(&body).await {
                Ok(r) => {
                    let tokens = r
                        .json()
                        .ok()
                        .and_then(|v| v["usage"]["total_tokens"].as_u64())
                        .unwrap_or(0);
                    (r.status.as_u16(), tokens)
                }
                Err(_) => (0, 0),
            };
            log.lock().unwrap().push((sent, status, tokens));
        }));
    }
    futures::future::join_all(tasks).await;
}

/// Per minute of the run: (calls admitted, tokens admitted).
fn per_minute(log: &[(f64, u16, u64)]) -> Vec<(u64, u64)> {
    (0..MINUTES)
        .map(|m| {
            let range = (m * 60) as f64..((m + 1) * 60) as f64;
            log.iter()
                .filter(|(t, s, _)| *s == 200 && range.contains(t))
                .fold((0, 0), |(n, tok), (_, _, t)| (n + 1, tok + t))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_together_admit_the_configured_rate() -> Result<()> {
    let mock = MockAzure::start().await;
    mock.add_deployment(DEP, "gpt-4o-2024-11-20");
    let mut nats = NatsServer::start().await?;
    let cp = ControlPlane::start_with(
        Options::default().with_config(json!({"nats": {"url": nats.url()}})),
    )
    .await?;
    let admin = cp.rest();
    let pk = mock_provider_key(&admin, &mock).await?;
    admin.create("models", &model_on(ALIAS, DEP, &pk)).await?;
    for (key, limit) in [
        (RPM_KEY, json!({"rpm": 600})),
        (TPM_KEY, json!({"tpm": 20000})),
        (SHARE_KEY, json!({"rpm": 30})),
    ] {
        let mut k = api_key(key, &[ALIAS]);
        k["rate_limit"] = limit;
        admin.create("apikeys", &k).await?;
    }
    let nodes = start_fleet(&cp, &nats.url(), NODES).await?;
    all_report(&nodes, "aigw_ratelimit_fleet_nodes", NODES as u64).await?;
    all_report(&nodes, "aigw_ratelimit_fleet_sync", 1).await?;

    // 1,800 calls a minute offered against rpm 600, and ~3× the token limit
    // against tpm 20,000 (each call estimated at ~90 tokens, using ~35),
    // both spread over the three nodes, for two minutes.
    let clients = |key: &str| nodes.iter().map(|dp| dp.client(Some(key))).collect();
    let mut tpm_body = chat_body(ALIAS, &"tokens ".repeat(20));
    tpm_body["max_tokens"] = json!(60);
    let (rpm_log, tpm_log) = (Arc::default(), Arc::default());
    let t0 = Instant::now() + Duration::from_millis(100);
    tokio::join!(
        offer(
            clients(RPM_KEY),
            chat_body(ALIAS, "hi"),
            1_800,
            t0,
            Arc::clone(&rpm_log)
        ),
        offer(clients(TPM_KEY), tpm_body, 1_700, t0, Arc::clone(&tpm_log)),
    );
    let rpm_log = rpm_log.lock().unwrap().clone();
    let tpm_log = tpm_log.lock().unwrap().clone();
    for log in [&rpm_log, &tpm_log] {
        let odd: Vec<_> = log
            .iter()
            .filter(|(_, s, _)| ![200, 429].contains(s))
            .collect();
        ensure!(
            odd.is_empty(),
            "calls neither admitted nor refused: {odd:?}"
        );
    }
    let rpm = per_minute(&rpm_log);
    let tpm = per_minute(&tpm_log);
    eprintln!("admitted per minute: rpm 600 → {rpm:?}; tpm 20000 → {tpm:?}");
    for (m, (calls, _)) in rpm.iter().enumerate() {
        ensure!(
            (570..=630).contains(calls),
            "minute {m}: {calls} calls admitted against rpm 600"
        );
    }
    for (m, (_, tokens)) in tpm.iter().enumerate() {
        ensure!(
            (19_000..=21_000).contains(tokens),
            "minute {m}: {tokens} tokens admitted against tpm 20000"
        );
    }

    // NATS goes away: every node says so and enforces a third of the limit
    // on its own counts.
    nats.stop();
    all_report(&nodes, "aigw_ratelimit_fleet_sync", 0).await?;
    all_report(&nodes, "aigw_ratelimit_fleet_nodes", NODES as u64).await?;
    for dp in &nodes {
        let c = dp.client(Some(SHARE_KEY));
        let mut admitted = 0;
        for _ in 0..15 {
            let r = c.chat(&chat_body(ALIAS, "hi")).await?;
            ensure!([200, 429].contains(&r.status.as_u16()), "{}", r.text);
            admitted += usize::from(r.status == 200);
        }
        ensure!(
            admitted == 10,
            "{}: {admitted} admitted of rpm 30 / 3 nodes",
            dp.node_id()
        );
    }
    Ok(())
}
