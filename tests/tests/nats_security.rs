//! NATS locked down as the README's "Security model" ships it: users with
//! permissions so only data planes publish usage and rate-limit counts, and
//! only the control plane consumes usage. Outsiders cannot change any limit or
//! usage total; a credential holder's implausible messages are refused and
//! counted.

use aigw_shared::proto::limits::v1::{InFlight, LimitSync, Measure, WindowCounts};
use aigw_shared::proto::usage::v1::UsageEvent;
use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{chat_body, start_fleet_with_nats, DataPlane};
use aigw_tests::fixtures::{api_key, mock_provider_key, model_on};
use aigw_tests::metrics::scrape_value;
use aigw_tests::mock_azure::MockAzure;
use aigw_tests::nats::NatsServer;
use aigw_tests::process::poll_until;
use aigw_tests::usage::usage_totals;
use anyhow::{ensure, Context, Result};
use prost::Message;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ALIAS: &str = "gpt-4o-azure";
const DEP: &str = "gpt4o-prod";
const VICTIM: &str = "sk-victim-tpm-1000";

/// The NATS configuration shipped in `deploy/nats/nats.conf` (its users and
/// permissions), with test passwords and one more user: another service on
/// the same NATS that holds credentials but none of aigw's rights.
fn shipped_conf() -> Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/nats.conf");
    let text = std::fs::read_to_string(path).context(path)?;
    ensure!(text.contains("users = ["), "{path} has no users");
    Ok(text
        .replace("$AIGW_NATS_DATA_PLANE_PASSWORD", "\"dp-pass\"")
        .replace("$AIGW_NATS_CONTROL_PLANE_PASSWORD", "\"cp-pass\"")
        .replace(
            "users = [",
            "users = [\n    { user: observer, password: \"obs-pass\" }",
        ))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A peer's message claiming `scope` used `count` tokens this minute.
fn forged_limits(scope: &str, count: i64) -> LimitSync {
    LimitSync {
        node_id: "intruder".into(),
        session: "forged".into(),
        sent_unix_ms: now_ms(),
        full: true,
        hello: false,
        windows: vec![WindowCounts {
            scope: scope.into(),
            measure: Measure::TokensPerMinute as i32,
            first_bucket: now_ms() / 100,
            counts: vec![count],
        }],
        in_flight: vec![InFlight {
            scope: scope.into(),
            count: 0,
        }],
    }
}

async fn connect(url: &str, user: &str, pass: &str) -> Result<async_nats::Client> {
    Ok(
        async_nats::ConnectOptions::with_user_and_password(user.into(), pass.into())
            .connect(url)
            .await?,
    )
}

async fn victim_call(node: &DataPlane) -> Result<u16> {
    let mut body = chat_body(ALIAS, "hello");
    body["max_tokens"] = json!(100);
    Ok(node.client(Some(VICTIM)).chat(&body).await?.status.as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_credentialed_planes_move_limits_and_usage() -> Result<()> {
    let mock = MockAzure::start().await;
    mock.add_deployment(DEP, "gpt-4o-2024-11-20");
    let nats = NatsServer::start_with_conf(Some(&shipped_conf()?)).await?;
    let cp = ControlPlane::start_with(Options::default().with_config(json!({
        "nats": {"url": nats.url(), "user": "aigw-control-plane", "password": "cp-pass"}
    })))
    .await?;
    let admin = cp.rest();
    let pk = mock_provider_key(&admin, &mock).await?;
    admin.create("models", &model_on(ALIAS, DEP, &pk)).await?;
    let mut k = api_key(VICTIM, &[ALIAS]);
    k["rate_limit"] = json!({"tpm": 1000});
    let key_id = admin.create_id("apikeys", &k).await?;
    let nodes = start_fleet_with_nats(
        &cp,
        json!({"url": nats.url(), "user": "aigw-data-plane", "password": "dp-pass"}),
        2,
    )
    .await?;
    let cp_metrics = format!("{}/metrics", cp.admin_url());

    // The locked-down credentials carry real traffic: nodes sync limits and
    // a call is counted by the control plane.
    for dp in &nodes {
        poll_until(
            "fleet sync over authenticated NATS",
            500,
            Duration::from_millis(20),
            || async {
                let url = format!("{}/metrics", dp.metrics_url());
                Ok(
                    (scrape_value(&url, "aigw_ratelimit_fleet_nodes", &[]).await? == 2.0)
                        .then_some(()),
                )
            },
        )
        .await?;
    }
    ensure!(victim_call(&nodes[0]).await? == 200);
    poll_until(
        "the real call counted",
        300,
        Duration::from_millis(50),
        || async { Ok((usage_totals(&admin).await?.requests == 1).then_some(())) },
    )
    .await?;
    let counted = usage_totals(&admin).await?;

    // No credentials: no connection at all.
    ensure!(
        async_nats::connect(nats.url()).await.is_err(),
        "an anonymous client connected"
    );

    // Authenticated but not a data plane: the server refuses its publishes.
    let (tx, mut refused) = tokio::sync::mpsc::unbounded_channel();
    let observer =
        async_nats::ConnectOptions::with_user_and_password("observer".into(), "obs-pass".into())
            .event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(err) = e {
                        let _ = tx.send(err.to_string());
                    }
                }
            })
            .connect(nats.url())
            .await?;
    let scope = format!("key/{key_id}");
    let forged = forged_limits(&scope, 1_000_000);
    observer
        .publish("aigw.limits.v1", forged.encode_to_vec().into())
        .await?;
    observer.flush().await?;
    let err = tokio::time::timeout(Duration::from_secs(5), refused.recv())
        .await
        .context("no permissions violation reported")?
        .unwrap_or_default();
    ensure!(
        err.to_lowercase().contains("permissions violation"),
        "{err}"
    );
    let js = async_nats::jetstream::new(observer.clone());
    let fake_usage = UsageEvent {
        id: "forged-by-observer".into(),
        time_unix_ms: now_ms() as i64,
        node_id: "node-0".into(),
        api_key_id: key_id.clone(),
        model: ALIAS.into(),
        prompt_tokens: 5_000,
        total_tokens: 5_000,
        status: 200,
        ..Default::default()
    };
    let published = match js
        .publish("aigw.usage.v1", fake_usage.encode_to_vec().into())
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    ensure!(!published, "an observer published a usage event");

    // A data-plane credential that sends nonsense: refused and counted.
    let insider = connect(&nats.url(), "aigw-data-plane", "dp-pass").await?;
    let huge = forged_limits(&scope, i64::MAX);
    insider
        .publish("aigw.limits.v1", huge.encode_to_vec().into())
        .await?;
    insider.flush().await?;
    let js = async_nats::jetstream::new(insider.clone());
    let out_of_bounds = UsageEvent {
        id: "forged-5e9".into(),
        prompt_tokens: 5_000_000_000,
        total_tokens: 5_000_000_000,
        ..fake_usage
    };
    js.publish("aigw.usage.v1", out_of_bounds.encode_to_vec().into())
        .await?
        .await?;
    poll_until(
        "the forged usage event refused",
        300,
        Duration::from_millis(50),
        || async {
            let n = scrape_value(
                &cp_metrics,
                "aigw_cp_usage_rejected_total",
                &[("reason", "tokens_out_of_bounds")],
            )
            .await?;
            Ok((n == 1.0).then_some(()))
        },
    )
    .await?;
    for dp in &nodes {
        let url = format!("{}/metrics", dp.metrics_url());
        poll_until(
            "the forged counts refused",
            300,
            Duration::from_millis(20),
            || async {
                let n = scrape_value(
                    &url,
                    "aigw_ratelimit_sync_rejected_total",
                    &[("reason", "count_out_of_bounds")],
                )
                .await?;
                Ok((n >= 1.0).then_some(()))
            },
        )
        .await?;
    }

    // Nothing moved: the victim still gets its TPM, the fleet is still two
    // nodes, and usage holds only the real call.
    for dp in &nodes {
        ensure!(
            victim_call(dp).await? == 200,
            "victim refused on {}",
            dp.node_id()
        );
        let url = format!("{}/metrics", dp.metrics_url());
        ensure!(scrape_value(&url, "aigw_ratelimit_fleet_nodes", &[]).await? == 2.0);
    }
    poll_until(
        "the victim's two calls counted",
        300,
        Duration::from_millis(50),
        || async {
            Ok((usage_totals(&admin).await?.requests == counted.requests + 2).then_some(()))
        },
    )
    .await?;
    let after = usage_totals(&admin).await?;
    ensure!(
        after.prompt < counted.prompt + 1_000,
        "forged tokens counted: {counted:?} -> {after:?}"
    );
    let rows: Value = admin.get("/admin/v1/usage").await?.expect(200)?;
    ensure!(
        !rows.to_string().contains("5000000000"),
        "usage rows: {rows}"
    );
    Ok(())
}
