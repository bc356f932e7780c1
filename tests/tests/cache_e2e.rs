//! The response cache: deterministic requests are answered from memory with
//! no upstream call, concurrent identical misses make one upstream call,
//! non-deterministic requests never hit it, TTL and size bounds hold, hits
//! stream as SSE, and `Cache-Control: no-cache` bypasses it.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{wait_standalone_synced, ProxyClient};
use aigw_tests::fixtures::{api_key, mock_provider_key, model_on};
use aigw_tests::mock_azure::{Behaviour, MockAzure};
use aigw_tests::process::poll_until;
use anyhow::{ensure, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

const ALIAS: &str = "cached-4o";
const DEP: &str = "gpt4o-prod";
const CALLER: &str = "sk-cache-caller";

async fn setup(cache: Value) -> Result<(MockAzure, ControlPlane, ProxyClient)> {
    let mock = MockAzure::start().await;
    mock.add_deployment(DEP, "gpt-4o-mini-2024-07-18");
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let pk = mock_provider_key(&admin, &mock).await?;
    let mut m = model_on(ALIAS, DEP, &pk);
    m["cache"] = cache;
    admin.create("models", &m).await?;
    admin.create("apikeys", &api_key(CALLER, &[ALIAS])).await?;
    wait_standalone_synced(&cp).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    Ok((mock, cp, client))
}

fn body(text: &str, temperature: f64) -> Value {
    json!({"model": ALIAS, "temperature": temperature, "messages": [{"role": "user", "content": text}]})
}

#[tokio::test]
async fn identical_deterministic_requests_hit_the_cache() -> Result<()> {
    let (mock, _cp, client) = setup(json!({"enabled": true, "ttl_seconds": 300})).await?;
    let first = client.chat(&body("what is 2+2?", 0.0)).await?;
    ensure!(first.status.as_u16() == 200, "{}", first.text);
    assert_eq!(first.header("x-aigw-cache"), Some("miss"));
    // Same request, keys in another order and with `user`: one upstream call in all.
    let again = client
        .chat(&json!({"messages": [{"content": "what is 2+2?", "role": "user"}], "user": "u-7", "temperature": 0, "model": ALIAS}))
        .await?;
    assert_eq!(again.header("x-aigw-cache"), Some("hit"));
    assert_eq!(again.json()?["choices"], first.json()?["choices"]);
    assert_eq!(again.json()?["model"], json!(ALIAS));
    assert_eq!(mock.requests(DEP), 1);
    // The upstream fetch was not a stream, whatever the caller asked.
    assert_eq!(mock.last_request(DEP).unwrap().json().get("stream"), None);
    Ok(())
}

#[tokio::test]
async fn non_deterministic_and_no_cache_requests_go_upstream() -> Result<()> {
    let (mock, _cp, client) = setup(json!({"enabled": true})).await?;
    for _ in 0..3 {
        let r = client.chat(&body("tell me a story", 0.7)).await?;
        ensure!(r.status.as_u16() == 200);
        assert_eq!(r.header("x-aigw-cache"), None);
    }
    let n2 = json!({"model": ALIAS, "temperature": 0, "n": 2, "messages": [{"role": "user", "content": "x"}]});
    client.chat(&n2).await?;
    client.chat(&n2).await?;
    assert_eq!(mock.requests(DEP), 5);
    client.chat(&body("cache me", 0.0)).await?;
    let bypass = ProxyClient::send(
        client
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .header("cache-control", "no-cache")
            .json(&body("cache me", 0.0)),
    )
    .await?;
    ensure!(bypass.status.as_u16() == 200);
    assert_eq!(bypass.header("x-aigw-cache"), None);
    assert_eq!(mock.requests(DEP), 7);
    Ok(())
}

#[tokio::test]
async fn errors_are_never_cached() -> Result<()> {
    let (mock, _cp, client) = setup(json!({"enabled": true})).await?;
    mock.set_behaviour(
        DEP,
        Behaviour::Fail {
            status: 500,
            body: r#"{"error":{"message":"boom"}}"#.into(),
        },
    );
    let r = client.chat(&body("q", 0.0)).await?;
    ensure!(r.status.as_u16() == 502, "{} {}", r.status, r.text);
    mock.set_behaviour(DEP, Behaviour::Normal);
    let r = client.chat(&body("q", 0.0)).await?;
    ensure!(r.status.as_u16() == 200);
    assert_eq!(r.header("x-aigw-cache"), Some("miss"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_identical_misses_make_one_upstream_call() -> Result<()> {
    let (mock, _cp, client) = setup(json!({"enabled": true})).await?;
    // A slow upstream keeps all fifty waiting on the one fetch.
    mock.set_behaviour(DEP, Behaviour::Delay(Duration::from_millis(400)));
    let results: Vec<Result<(u16, String)>> = futures::stream::iter(0..50)
        .map(|_| {
            let c = client.clone();
            async move {
                let r = c.chat(&body("same question", 0.0)).await?;
                Ok((
                    r.status.as_u16(),
                    r.header("x-aigw-cache").unwrap_or_default().to_string(),
                ))
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let mut misses = 0;
    for r in results {
        let (status, cache) = r?;
        assert_eq!(status, 200);
        misses += usize::from(cache == "miss");
    }
    assert_eq!(
        mock.requests(DEP),
        1,
        "one upstream call for 50 identical misses"
    );
    assert_eq!(misses, 1);
    Ok(())
}

#[tokio::test]
async fn a_hit_streams_as_sse_when_asked() -> Result<()> {
    let (mock, _cp, client) = setup(json!({"enabled": true})).await?;
    client.chat(&body("stream me", 0.0)).await?;
    let mut b = body("stream me", 0.0);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let r = client.chat(&b).await?;
    assert_eq!(r.header("x-aigw-cache"), Some("hit"));
    ensure!(r
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/event-stream"));
    let events: Vec<&str> = r.text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    assert!(
        events[0].contains("chat.completion.chunk")
            && events[0].contains("Hello from Azure OpenAI")
    );
    assert!(
        events.iter().any(|e| e.contains("\"usage\"")),
        "usage chunk when asked"
    );
    assert_eq!(mock.requests(DEP), 1);
    Ok(())
}

#[tokio::test]
async fn ttl_expiry_and_size_bound_hold() -> Result<()> {
    let (mock, _cp, client) =
        setup(json!({"enabled": true, "ttl_seconds": 1, "max_entries": 2})).await?;
    client.chat(&body("a", 0.0)).await?;
    assert_eq!(
        client.chat(&body("a", 0.0)).await?.header("x-aigw-cache"),
        Some("hit")
    );
    // After the TTL the same request goes upstream again.
    poll_until(
        "the entry to expire",
        100,
        Duration::from_millis(50),
        || async {
            let r = client.chat(&body("a", 0.0)).await?;
            Ok((r.header("x-aigw-cache") == Some("miss")).then_some(()))
        },
    )
    .await?;
    let before = mock.requests(DEP);
    assert!(before >= 2);
    // Size bound: many distinct entries never keep more than two hits' worth.
    for i in 0..20 {
        client.chat(&body(&format!("q{i}"), 0.0)).await?;
    }
    let mut hits = 0;
    for i in 0..20 {
        hits += usize::from(
            client
                .chat(&body(&format!("q{i}"), 0.0))
                .await?
                .header("x-aigw-cache")
                == Some("hit"),
        );
    }
    ensure!(
        hits <= 2,
        "{hits} of 20 distinct entries still cached with max_entries 2"
    );
    Ok(())
}

#[tokio::test]
async fn admin_purge_empties_the_cache_on_the_nodes() -> Result<()> {
    let (mock, cp, client) = setup(json!({"enabled": true})).await?;
    client.chat(&body("purge me", 0.0)).await?;
    assert_eq!(
        client
            .chat(&body("purge me", 0.0))
            .await?
            .header("x-aigw-cache"),
        Some("hit")
    );
    let admin = cp.rest();
    let model_id = admin.list("models").await?[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let r = admin
        .delete(&format!("/admin/v1/models/{model_id}/cache"))
        .await?
        .expect(200)?;
    assert_eq!(r["purged"], json!(true));
    admin
        .delete("/admin/v1/models/no-such-model/cache")
        .await?
        .expect_error(404)?;
    // The purge reaches the node with the next snapshot.
    poll_until(
        "the purge to reach the node",
        200,
        Duration::from_millis(20),
        || async {
            let r = client.chat(&body("purge me", 0.0)).await?;
            Ok((r.header("x-aigw-cache") == Some("miss")).then_some(()))
        },
    )
    .await?;
    assert_eq!(mock.requests(DEP), 2);
    Ok(())
}
