//! Resilience end to end, against mock Azure deployments: active health
//! probes take a dead region out of rotation (and bring it back), model
//! fallbacks (content filter, context window), the first-token timeout, and
//! the admin rules for fallbacks.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{
    chat_body, expect_openai_error, sse_data, wait_standalone_synced, ProxyClient,
};
use aigw_tests::fixtures::{api_key, mock_provider_key, provider_key_at};
use aigw_tests::metrics::scrape_value;
use aigw_tests::mock_azure::{Behaviour, MockAzure, DEFAULT_API_KEY};
use aigw_tests::process::poll_until;
use aigw_tests::AdminClient;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const CALLER: &str = "sk-resilience-caller";
const MODEL: &str = "gpt-4o-mini-2024-07-18";

async fn standalone() -> Result<(ControlPlane, AdminClient)> {
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    Ok((cp, admin))
}

/// A provider key named `name` for `mock`.
async fn provider_key(admin: &AdminClient, name: &str, mock: &MockAzure) -> Result<String> {
    let pk = provider_key_at(name, DEFAULT_API_KEY, &mock.base_url());
    admin.create_id("provider_keys", &pk).await
}

/// `aigw_target_healthy` for `deployment` on the standalone node, if shown.
async fn target_healthy(cp: &ControlPlane, deployment: &str) -> Result<Option<f64>> {
    let url = format!("{}/metrics", cp.data_plane_metrics_url());
    let text = reqwest::get(&url).await?.text().await?;
    let scrape = aigw_tests::metrics::scrape(&text)?;
    Ok(scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "aigw_target_healthy" && s.labels.get("deployment") == Some(deployment)
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => -1.0,
        }))
}

/// The node list's entry for `deployment`, from any node.
async fn node_target(admin: &AdminClient, deployment: &str) -> Result<Option<Value>> {
    let nodes = admin.get("/admin/v1/nodes").await?.expect(200)?;
    Ok(nodes["list"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|n| n["targets"].as_array().cloned().unwrap_or_default())
        .find(|t| t["deployment"] == deployment))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_take_a_dead_region_out_of_rotation_and_bring_it_back() -> Result<()> {
    const REGIONS: [&str; 3] = ["east", "west", "north"];
    let interval = Duration::from_secs(1);
    let (unhealthy_after, healthy_after) = (2u32, 2u32);
    let mut mocks = HashMap::new();
    let (cp, admin) = standalone().await?;
    let mut targets = Vec::new();
    for region in REGIONS {
        let mock = MockAzure::start().await;
        mock.add_deployment(region, MODEL);
        let pk = provider_key(&admin, &format!("azure-{region}"), &mock).await?;
        targets.push(json!({"provider_key_id": pk, "model_name": region}));
        mocks.insert(region, mock);
    }
    admin
        .create(
            "models",
            &json!({"display_name": "multi", "targets": targets, "routing": {
                "retries": 2, "cooldown": "1s",
                "health_check": {"interval": "1s", "timeout": "500ms",
                                 "unhealthy_after": unhealthy_after, "healthy_after": healthy_after}}}),
        )
        .await?;
    admin
        .create("apikeys", &api_key(CALLER, &["multi"]))
        .await?;
    wait_standalone_synced(&cp).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));

    // Every region is probed, on Front Door's status path, without the key.
    for region in REGIONS {
        let mock = &mocks[region];
        poll_until(
            &format!("a probe of {region}"),
            100,
            Duration::from_millis(50),
            || async { Ok((mock.probes() > 0).then_some(())) },
        )
        .await?;
        let probe = mock.last_probe().context("a probe")?;
        ensure!(probe.method == "GET", "{probe:?}");
        ensure!(
            probe.header("api-key").is_none(),
            "the status path takes no credential"
        );
        ensure!(probe.header("authorization").is_none());
    }
    let by = client.served_by_counts("multi", 60, 8).await?;
    ensure!(
        by.get("north").is_some_and(|n| *n > 0),
        "north serves while up: {by:?}"
    );

    // North dies: its probes fail and so do its calls.
    let north = &mocks["north"];
    north.set_probe_healthy(false);
    north.set_behaviour(
        "north",
        Behaviour::Fail {
            status: 503,
            body: r#"{"error":{"code":"503","message":"down"}}"#.into(),
        },
    );
    let died = Instant::now();
    poll_until(
        "north out of rotation",
        200,
        Duration::from_millis(50),
        || async { Ok((target_healthy(&cp, "north").await? == Some(0.0)).then_some(())) },
    )
    .await?;
    let detected = died.elapsed();
    // A probe may have just left when it died: one interval (+10% jitter)
    // until the next, then `unhealthy_after` intervals; 1 s for scheduling.
    let bound = interval.mul_f64(1.1 * f64::from(unhealthy_after + 1)) + Duration::from_secs(1);
    println!("north out of rotation after {detected:?} (bound {bound:?})");
    ensure!(
        detected <= bound,
        "detected after {detected:?}, bound {bound:?}"
    );

    let before = north.requests("north");
    let by = client.served_by_counts("multi", 1000, 16).await?;
    ensure!(!by.contains_key("north"), "{by:?}");
    ensure!(by.values().sum::<usize>() == 1000);
    let after = north.requests("north");
    ensure!(
        after == before,
        "the dead region got {} caller attempts after detection",
        after - before
    );

    // The node list shows what this node's probes see.
    let shown = poll_until(
        "north down in /admin/v1/nodes",
        100,
        Duration::from_millis(50),
        || async {
            Ok(node_target(&admin, "north")
                .await?
                .filter(|t| t["healthy"] == false))
        },
    )
    .await?;
    ensure!(
        shown["consecutive_failures"].as_u64() >= Some(u64::from(unhealthy_after)),
        "{shown}"
    );
    ensure!(
        shown["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{shown}"
    );
    ensure!(shown["last_probe"].as_str().is_some(), "{shown}");
    ensure!(shown["provider_key_id"].as_str().is_some(), "{shown}");

    // Back: `healthy_after` good probes bring it into rotation again.
    north.set_behaviour("north", Behaviour::Normal);
    north.set_probe_healthy(true);
    let healed = Instant::now();
    poll_until(
        "north back in rotation",
        200,
        Duration::from_millis(50),
        || async { Ok((target_healthy(&cp, "north").await? == Some(1.0)).then_some(())) },
    )
    .await?;
    let back = healed.elapsed();
    let bound = interval.mul_f64(1.1 * f64::from(healthy_after + 1)) + Duration::from_secs(1);
    println!("north back after {back:?} (bound {bound:?})");
    ensure!(back <= bound, "back after {back:?}, bound {bound:?}");
    poll_until(
        "north serving callers again",
        50,
        Duration::from_millis(100),
        || async {
            let by = client.served_by_counts("multi", 30, 8).await?;
            Ok(by.get("north").is_some_and(|n| *n > 0).then_some(()))
        },
    )
    .await?;
    poll_until(
        "north up in /admin/v1/nodes",
        100,
        Duration::from_millis(50),
        || async {
            Ok(node_target(&admin, "north")
                .await?
                .filter(|t| t["healthy"] == true))
        },
    )
    .await?;
    Ok(())
}

/// One mock with deployments `primary`, `strict`, `big`, `overflow`, and
/// the given models; the caller may use `allowed`.
async fn fallback_setup(
    models: &[Value],
    allowed: &[&str],
) -> Result<(MockAzure, ControlPlane, ProxyClient)> {
    let mock = MockAzure::start().await;
    for d in ["primary", "strict", "big", "overflow", "stall", "fast"] {
        mock.add_deployment(d, MODEL);
    }
    let (cp, admin) = standalone().await?;
    let pk = mock_provider_key(&admin, &mock).await?;
    // Fallback targets first: a model's fallbacks must exist.
    for m in models.iter().rev() {
        let mut m = m.clone();
        if m.get("targets").is_none() {
            m["provider_key_id"] = json!(pk);
        } else if let Some(ts) = m["targets"].as_array_mut() {
            for t in ts {
                t["provider_key_id"] = json!(pk);
            }
        }
        admin.create("models", &m).await?;
    }
    admin.create("apikeys", &api_key(CALLER, allowed)).await?;
    wait_standalone_synced(&cp).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    Ok((mock, cp, client))
}

async fn stream_chat(client: &ProxyClient, alias: &str) -> Result<aigw_tests::Resp> {
    let mut body = chat_body(alias, "tell me");
    body["stream"] = json!(true);
    client.chat(&body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_filtered_prompt_falls_back_visibly_json_and_stream() -> Result<()> {
    let (mock, cp, client) = fallback_setup(
        &[
            json!({"display_name": "gpt-4o", "model_name": "primary",
                   "fallbacks": {"content_filter": ["gpt-4o-strict"]}}),
            json!({"display_name": "plain", "model_name": "primary"}),
            json!({"display_name": "gpt-4o-strict", "model_name": "strict"}),
        ],
        &["*"],
    )
    .await?;
    mock.set_behaviour("primary", Behaviour::ContentFilter);
    let header = "content_filter; from=gpt-4o; to=gpt-4o-strict";

    let r = client.chat(&chat_body("gpt-4o", "hello")).await?;
    let v = r.expect(200)?;
    ensure!(
        r.header("x-aigw-fallback") == Some(header),
        "{:?}",
        r.header("x-aigw-fallback")
    );
    ensure!(
        v["model"] == "gpt-4o-strict",
        "answered by the fallback: {v}"
    );
    ensure!(r
        .header("x-aigw-served-by")
        .is_some_and(|s| s.ends_with("/strict")));

    let r = stream_chat(&client, "gpt-4o").await?;
    ensure!(r.status.as_u16() == 200, "{} {}", r.status, r.text);
    ensure!(r.header("x-aigw-fallback") == Some(header));
    let events = sse_data(&r.text);
    ensure!(
        events.last().map(String::as_str) == Some("[DONE]"),
        "{events:?}"
    );
    let first: Value = serde_json::from_str(&events[0])?;
    ensure!(first["model"] == "gpt-4o-strict", "{first}");

    // Without fallbacks: Azure's 400 as before.
    let r = client.chat(&chat_body("plain", "hello")).await?;
    expect_openai_error(&r, 400, "content_filter")?;
    ensure!(r.header("x-aigw-fallback").is_none());
    let r = stream_chat(&client, "plain").await?;
    expect_openai_error(&r, 400, "content_filter")?;

    let counted = scrape_value(
        &format!("{}/metrics", cp.data_plane_metrics_url()),
        "aigw_fallbacks_total",
        &[
            ("from", "gpt-4o"),
            ("to", "gpt-4o-strict"),
            ("reason", "content_filter"),
        ],
    )
    .await?;
    ensure!(counted == 2.0, "aigw_fallbacks_total {counted}");

    // Billed to the model that answered.
    let admin = cp.rest();
    poll_until(
        "usage billed to the fallback",
        100,
        Duration::from_millis(100),
        || async {
            let v = admin
                .get("/admin/v1/usage?group_by=model")
                .await?
                .expect(200)?;
            let strict: u64 = v["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["group"]["model"] == "gpt-4o-strict")
                .map(|r| r["requests"].as_u64().unwrap_or(0))
                .sum();
            Ok((strict == 2).then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fallback_the_caller_may_not_use_is_not_taken() -> Result<()> {
    let (mock, _cp, client) = fallback_setup(
        &[
            json!({"display_name": "gpt-4o", "model_name": "primary",
                   "fallbacks": {"content_filter": ["gpt-4o-strict"]}}),
            json!({"display_name": "gpt-4o-strict", "model_name": "strict"}),
        ],
        &["gpt-4o"],
    )
    .await?;
    mock.set_behaviour("primary", Behaviour::ContentFilter);
    let r = client.chat(&chat_body("gpt-4o", "hello")).await?;
    expect_openai_error(&r, 400, "content_filter")?;
    ensure!(mock.requests("strict") == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_over_the_context_window_goes_to_the_fallback_without_calling_the_primary(
) -> Result<()> {
    let (mock, _cp, client) = fallback_setup(
        &[
            json!({"display_name": "small", "model_name": "primary", "context_window": 100,
                   "fallbacks": {"context_window_exceeded": ["large"]}}),
            json!({"display_name": "azure-small", "model_name": "overflow",
                   "fallbacks": {"context_window_exceeded": ["large"]}}),
            json!({"display_name": "bare-small", "model_name": "overflow"}),
            json!({"display_name": "large", "model_name": "big"}),
        ],
        &["*"],
    )
    .await?;
    let long = "lorem ipsum dolor sit amet ".repeat(100);

    let r = client.chat(&chat_body("small", &long)).await?;
    r.expect(200)?;
    ensure!(
        r.header("x-aigw-fallback") == Some("context_window_exceeded; from=small; to=large"),
        "{:?}",
        r.header("x-aigw-fallback")
    );
    ensure!(mock.requests("primary") == 0, "the primary was not called");
    ensure!(mock.requests("big") == 1);
    // A prompt that fits stays on the primary.
    let r = client.chat(&chat_body("small", "hi")).await?;
    r.expect(200)?;
    ensure!(r.header("x-aigw-fallback").is_none());
    ensure!(mock.requests("primary") == 1);

    // Azure's own context_length_exceeded falls back too, or is the caller's 400.
    mock.set_behaviour("overflow", Behaviour::ContextLengthExceeded);
    let r = client.chat(&chat_body("azure-small", "hi")).await?;
    r.expect(200)?;
    ensure!(
        r.header("x-aigw-fallback") == Some("context_window_exceeded; from=azure-small; to=large")
    );
    let r = client.chat(&chat_body("bare-small", "hi")).await?;
    expect_openai_error(&r, 400, "context_length_exceeded")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_silent_past_the_first_token_timeout_costs_at_most_that() -> Result<()> {
    let first_token = Duration::from_millis(400);
    let (mock, cp, client) = fallback_setup(
        &[json!({"display_name": "ptu", "targets": [
                    {"model_name": "stall", "priority": 0},
                    {"model_name": "fast", "priority": 1}],
                 "routing": {"retries": 1, "first_token_timeout": "400ms"}})],
        &["*"],
    )
    .await?;
    // The fallback's own latency, measured.
    mock.set_behaviour("stall", Behaviour::Hang);
    let _ = client.chat(&chat_body("ptu", "warm")).await?;
    mock.set_behaviour("stall", Behaviour::StallFirstByte(Duration::from_secs(30)));
    let started = Instant::now();
    let r = client.chat(&chat_body("ptu", "hi")).await?;
    let json_took = started.elapsed();
    r.expect(200)?;
    ensure!(r
        .header("x-aigw-served-by")
        .is_some_and(|s| s.ends_with("/fast")));

    let started = Instant::now();
    let r = stream_chat(&client, "ptu").await?;
    let stream_took = started.elapsed();
    ensure!(r.status.as_u16() == 200, "{} {}", r.status, r.text);
    ensure!(r
        .header("x-aigw-served-by")
        .is_some_and(|s| s.ends_with("/fast")));
    ensure!(sse_data(&r.text).last().map(String::as_str) == Some("[DONE]"));

    // The fallback answers a mock call in milliseconds; 600 ms of margin for
    // a loaded machine, far below the 30 s stall.
    let bound = first_token + Duration::from_millis(600);
    println!("json {json_took:?}, stream {stream_took:?} (bound {bound:?})");
    ensure!(
        json_took <= bound && stream_took <= bound,
        "json {json_took:?}, stream {stream_took:?}"
    );
    let slow = scrape_value(
        &format!("{}/metrics", cp.data_plane_metrics_url()),
        "aigw_upstream_attempts_total",
        &[("deployment", "stall"), ("outcome", "slow")],
    )
    .await?;
    ensure!(slow >= 3.0, "slow outcomes recorded: {slow}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_unknown_cyclic_and_deep_fallbacks() -> Result<()> {
    let mock = MockAzure::start().await;
    let (_cp, admin) = standalone().await?;
    let pk = mock_provider_key(&admin, &mock).await?;
    let model = |name: &str, to: &[&str]| {
        json!({"display_name": name, "model_name": "d", "provider_key_id": pk,
               "fallbacks": {"unavailable": to}})
    };

    let r = admin
        .post("/admin/v1/models", &model("a", &["nope"]))
        .await?;
    let msg = r.expect_error(409)?;
    ensure!(msg.contains("nope"), "{msg}");

    // e ← d ← c ← b: b → c → d → e is 3 deep, the most allowed.
    let e = admin.create_id("models", &model("e", &[])).await?;
    admin.create_id("models", &model("d", &["e"])).await?;
    admin.create_id("models", &model("c", &["d"])).await?;
    let b = admin.create_id("models", &model("b", &["c"])).await?;
    let r = admin.post("/admin/v1/models", &model("a", &["b"])).await?;
    let msg = r.expect_error(400)?;
    ensure!(msg.contains("deep"), "{msg}");

    // A cycle: e → b → c → d → e.
    let r = admin
        .put(&format!("/admin/v1/models/{e}"), &model("e", &["b"]))
        .await?;
    let msg = r.expect_error(400)?;
    ensure!(msg.contains("cycle"), "{msg}");
    let r = admin
        .put(&format!("/admin/v1/models/{b}"), &model("b", &["b"]))
        .await?;
    r.expect_error(400)?;

    // A model another falls back to stays while it is named.
    let r = admin.delete(&format!("/admin/v1/models/{e}")).await?;
    r.expect_error(409)?;

    // Probe settings are bounded.
    for bad in [
        json!({"interval": "500ms"}),
        json!({"interval": "2h"}),
        json!({"interval": "1s", "timeout": "1s"}),
        json!({"unhealthy_after": 0}),
        json!({"healthy_after": 101}),
        json!({"path": "status"}),
        json!({"path": "/a?b"}),
    ] {
        let mut m = model("p", &[]);
        m["routing"] = json!({"health_check": bad});
        let r = admin.post("/admin/v1/models", &m).await?;
        r.expect_error(400).with_context(|| format!("{bad}"))?;
    }
    let mut m = model("p", &[]);
    m["routing"] = json!({"first_token_timeout": "0ms"});
    admin
        .post("/admin/v1/models", &m)
        .await?
        .expect_error(400)?;
    m["routing"] = json!({"first_token_timeout": "2s",
        "health_check": {"interval": "1s", "unhealthy_after": 100, "healthy_after": 1}});
    m["context_window"] = json!(128000);
    admin.post("/admin/v1/models", &m).await?.expect(201)?;
    Ok(())
}
