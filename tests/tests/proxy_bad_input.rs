//! The proxy under bad input and bad upstreams: every failure is an OpenAI
//! error envelope `{"error":{"message","type","param","code"}}` with an
//! `x-request-id`, with the status and code the design fixes; upstream
//! requests are cancelled when the caller leaves or the deadline passes.

use aigw_tests::data_plane::{
    chat_body, expect_openai_envelope, expect_openai_error, sse_data, wait_standalone_synced,
    ProxyClient,
};
use aigw_tests::fixtures::{
    self, seed_azure, Seeded, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT, SEED_PROVIDER_KEY,
};
use aigw_tests::mock_azure::{Behaviour, MockAzure, DEFAULT_API_KEY};
use aigw_tests::process::free_addr;
use aigw_tests::{ControlPlane, Options};
use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `data_plane.max_body_bytes` in these tests.
const MAX_BODY: usize = 4096;

struct Gateway {
    mock: MockAzure,
    cp: ControlPlane,
    seeded: Seeded,
    proxy: ProxyClient,
}

impl Gateway {
    /// Adds a model alias on `deployment` behind the seed's provider key (or
    /// `provider_key_id`), with `routing` if given; allowed for the seed key
    /// through a fresh wildcard key `sk-all`.
    async fn model(
        &self,
        alias: &str,
        deployment: &str,
        provider_key_id: Option<&str>,
        routing: Option<Value>,
    ) -> Result<()> {
        let pk = provider_key_id.unwrap_or(&self.seeded.provider_key_id);
        let mut m = fixtures::model_on(alias, deployment, pk);
        if let Some(r) = routing {
            m["routing"] = r;
        }
        self.cp.rest().create_id("models", &m).await?;
        Ok(())
    }

    /// A client presenting `sk-all` (allowed every alias).
    fn all(&self) -> ProxyClient {
        self.proxy.with_key(Some("sk-all"))
    }

    async fn synced(&self) -> Result<()> {
        wait_standalone_synced(&self.cp).await.map(drop)
    }
}

async fn gateway() -> Result<Gateway> {
    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let cp = ControlPlane::start_with(
        Options::standalone().with_config(json!({"data_plane": {"max_body_bytes": MAX_BODY}})),
    )
    .await?;
    let seeded = seed_azure(&cp.rest(), &mock.base_url(), DEFAULT_API_KEY).await?;
    cp.rest()
        .create_id("apikeys", &fixtures::api_key("sk-all", &["*"]))
        .await?;
    wait_standalone_synced(&cp).await?;
    let proxy = ProxyClient::new(&cp.proxy_url(), Some(SEED_CALLER_KEY));
    Ok(Gateway {
        mock,
        cp,
        seeded,
        proxy,
    })
}

fn seed_chat() -> Value {
    chat_body(SEED_ALIAS, "Say hello from Azure OpenAI.")
}

#[tokio::test]
async fn caller_errors_are_openai_envelopes() -> Result<()> {
    let gw = gateway().await?;
    let admin = gw.cp.rest();
    let raw = |body: &'static str, ct: Option<&'static str>| {
        let mut rb = gw
            .proxy
            .request(Method::POST, "/v1/chat/completions")
            .body(body);
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        ProxyClient::send(rb)
    };

    // Malformed JSON.
    let r = raw(
        r#"{"model": "gpt-4o-azure", "messages": [}"#,
        Some("application/json"),
    )
    .await?;
    let e = expect_openai_error(&r, 400, "invalid_json")?;
    assert_eq!(e["type"], "invalid_request_error");
    // Trailing garbage after the document is malformed too.
    let r = raw(
        r#"{"model": "gpt-4o-azure", "messages": []} x"#,
        Some("application/json"),
    )
    .await?;
    assert_eq!(
        expect_openai_error(&r, 400, "invalid_json")?["type"],
        "invalid_request_error"
    );
    // Not an object.
    let r = raw("[1, 2]", Some("application/json")).await?;
    assert_eq!(
        expect_openai_error(&r, 400, "invalid_json")?["type"],
        "invalid_request_error"
    );

    // Missing model / messages name the parameter.
    let r = gw
        .proxy
        .chat(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .await?;
    let e = expect_openai_error(&r, 400, "missing_required_parameter")?;
    assert_eq!(e["param"], "model");
    assert_eq!(e["type"], "invalid_request_error");
    let r = gw.proxy.chat(&json!({"model": SEED_ALIAS})).await?;
    let e = expect_openai_error(&r, 400, "missing_required_parameter")?;
    assert_eq!(e["param"], "messages");
    let r = gw
        .proxy
        .post_json("/v1/embeddings", &json!({"model": SEED_ALIAS}))
        .await?;
    assert_eq!(
        expect_openai_error(&r, 400, "missing_required_parameter")?["param"],
        "input"
    );
    let r = gw
        .proxy
        .post_json("/v1/completions", &json!({"model": SEED_ALIAS}))
        .await?;
    assert_eq!(
        expect_openai_error(&r, 400, "missing_required_parameter")?["param"],
        "prompt"
    );

    // Unknown alias; alias outside the allowlist.
    let r = gw.proxy.chat(&chat_body("no-such-alias", "hi")).await?;
    let e = expect_openai_error(&r, 404, "model_not_found")?;
    assert_eq!(e["param"], "model");
    ensure!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-alias"),
        "message should name the alias: {e}"
    );
    gw.model("other-alias", SEED_DEPLOYMENT, None, None).await?;
    gw.synced().await?;
    let r = gw.proxy.chat(&chat_body("other-alias", "hi")).await?;
    let e = expect_openai_error(&r, 403, "permission_denied")?;
    assert_eq!(e["param"], "model");
    // ... which a wildcard key may use.
    gw.all()
        .chat(&chat_body("other-alias", "hi"))
        .await?
        .expect(200)?;

    // Unknown, missing, disabled and expired keys.
    let r = gw
        .proxy
        .with_key(Some("sk-unknown"))
        .chat(&seed_chat())
        .await?;
    expect_openai_error(&r, 401, "invalid_api_key")?;
    let r = gw.proxy.with_key(None).chat(&seed_chat()).await?;
    expect_openai_error(&r, 401, "invalid_api_key")?;
    let r = gw.proxy.with_key(None).models().await?;
    expect_openai_error(&r, 401, "invalid_api_key")?;
    let mut disabled = fixtures::api_key("sk-disabled", &["*"]);
    disabled["disabled"] = json!(true);
    admin.create_id("apikeys", &disabled).await?;
    let mut expired = fixtures::api_key("sk-expired", &["*"]);
    expired["expires_at"] = json!("2020-01-01T00:00:00Z");
    admin.create_id("apikeys", &expired).await?;
    let mut future = fixtures::api_key("sk-not-expired", &["*"]);
    future["expires_at"] = json!("2999-01-01T00:00:00Z");
    admin.create_id("apikeys", &future).await?;
    gw.synced().await?;
    for key in ["sk-disabled", "sk-expired"] {
        let c = gw.proxy.with_key(Some(key));
        let r = c.chat(&seed_chat()).await?;
        expect_openai_error(&r, 401, "invalid_api_key").with_context(|| key.to_string())?;
        let r = c.models().await?;
        expect_openai_error(&r, 401, "invalid_api_key").with_context(|| key.to_string())?;
    }
    // `api-key` header works as well as a bearer token.
    let r = ProxyClient::send(
        gw.proxy
            .with_key(None)
            .request(Method::POST, "/v1/chat/completions")
            .header("api-key", "sk-not-expired")
            .json(&seed_chat()),
    )
    .await?;
    r.expect(200)?;

    // Body over data_plane.max_body_bytes: declared, and streamed unannounced.
    let big = chat_body(SEED_ALIAS, &"x".repeat(MAX_BODY * 2));
    let r = gw.proxy.chat(&big).await?;
    expect_openai_error(&r, 413, "request_too_large")?;
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = big
        .to_string()
        .into_bytes()
        .chunks(1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let r = ProxyClient::send(
        gw.proxy
            .request(Method::POST, "/v1/chat/completions")
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap(StreamBody::new(futures::stream::iter(
                chunks,
            )))),
    )
    .await?;
    expect_openai_error(&r, 413, "request_too_large")?;
    // Just under the limit is fine.
    let fits = chat_body(SEED_ALIAS, &"y".repeat(MAX_BODY - 200));
    ensure!(fits.to_string().len() <= MAX_BODY);
    gw.proxy.chat(&fits).await?.expect(200)?;

    // Wrong content type.
    let r = raw(
        r#"{"model":"gpt-4o-azure","messages":[]}"#,
        Some("text/plain"),
    )
    .await?;
    expect_openai_error(&r, 415, "unsupported_media_type")?;
    let r = raw(
        "model=gpt-4o-azure",
        Some("application/x-www-form-urlencoded"),
    )
    .await?;
    expect_openai_error(&r, 415, "unsupported_media_type")?;

    // Unknown routes and methods are envelopes too.
    let r = ProxyClient::send(gw.proxy.request(Method::GET, "/v1/chat/completions")).await?;
    expect_openai_error(&r, 405, "method_not_allowed")?;
    let r = ProxyClient::send(
        gw.proxy
            .request(Method::POST, "/v1/nope")
            .json(&seed_chat()),
    )
    .await?;
    expect_openai_error(&r, 404, "unknown_url")?;

    // None of the rejected calls reached Azure: only the 3 that succeeded did.
    assert_eq!(gw.mock.requests(SEED_DEPLOYMENT), 3);
    Ok(())
}

#[tokio::test]
async fn caller_disconnect_mid_stream_cancels_the_upstream_request() -> Result<()> {
    let gw = gateway().await?;
    gw.mock.add_deployment("slow-prod", "gpt-4o-2024-08-06");
    // ~150 words at 100 ms per event: the whole stream would take 15 s.
    gw.mock.set_behaviour(
        "slow-prod",
        Behaviour::SlowStream {
            chunk_delay: Duration::from_millis(100),
        },
    );
    gw.model("slow", "slow-prod", None, None).await?;
    gw.synced().await?;

    let mut body = chat_body("slow", &"word ".repeat(150));
    body["stream"] = json!(true);
    let mut resp = gw
        .all()
        .request(Method::POST, "/v1/chat/completions")
        .json(&body)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    ensure!(resp.headers().contains_key("x-request-id"));
    let first = resp.chunk().await?.context("the stream ended at once")?;
    let first = String::from_utf8_lossy(&first).to_string();
    let events = sse_data(&first);
    ensure!(!events.is_empty(), "first chunk is not an event: {first:?}");
    let chunk: Value = serde_json::from_str(&events[0])?;
    assert_eq!(chunk["model"], "slow");
    assert_eq!(gw.mock.open_responses(), 1, "the upstream stream is open");
    let left_at = Instant::now();
    drop(resp);

    ensure!(
        gw.mock.wait_open_responses(0, Duration::from_secs(5)).await,
        "the upstream request was not cancelled within 5 s of the caller leaving \
         (the stream alone would last ~15 s); open responses: {}",
        gw.mock.open_responses()
    );
    eprintln!(
        "upstream released {:?} after the caller left",
        left_at.elapsed()
    );

    // The data plane still serves.
    gw.mock.set_behaviour("slow-prod", Behaviour::Normal);
    let mut body = chat_body("slow", "still there?");
    gw.all().chat(&body).await?.expect(200)?;
    body["stream"] = json!(true);
    let r = gw.all().chat(&body).await?;
    ensure!(
        r.status == 200 && r.text.ends_with("data: [DONE]\n\n"),
        "{}",
        r.text
    );
    gw.proxy.chat(&seed_chat()).await?.expect(200)?;
    assert_eq!(gw.mock.open_responses(), 0);
    Ok(())
}

#[tokio::test]
async fn upstream_deadlines() -> Result<()> {
    let gw = gateway().await?;
    gw.mock.add_deployment("hang-prod", "gpt-4o-2024-08-06");
    gw.mock.set_behaviour("hang-prod", Behaviour::Hang);
    gw.model("hang", "hang-prod", None, Some(json!({"timeout": "500ms"})))
        .await?;
    gw.mock.add_deployment("stall-prod", "gpt-4o-2024-08-06");
    gw.mock.set_behaviour(
        "stall-prod",
        Behaviour::SlowStream {
            chunk_delay: Duration::from_secs(3),
        },
    );
    gw.model(
        "stall",
        "stall-prod",
        None,
        Some(json!({"stream_idle_timeout": "300ms"})),
    )
    .await?;
    gw.synced().await?;

    // An upstream that never answers: 504 at the model's deadline, and the
    // upstream request is released.
    let started = Instant::now();
    let r = gw.all().chat(&chat_body("hang", "hello?")).await?;
    let took = started.elapsed();
    let e = expect_openai_error(&r, 504, "timeout")?;
    ensure!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "504 after {took:?}; the deadline is 500 ms"
    );
    ensure!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("hang-prod"),
        "message should name the deployment: {e}"
    );
    ensure!(
        gw.mock.requests("hang-prod") >= 1,
        "the mock never saw the call"
    );
    ensure!(
        gw.mock.wait_open_responses(0, Duration::from_secs(5)).await,
        "the hanging upstream request was not released"
    );

    // A stream that goes silent: an error event, then [DONE], and the
    // upstream request is released long before its next event (3 s).
    let mut body = chat_body("stall", "hello?");
    body["stream"] = json!(true);
    let started = Instant::now();
    let r = gw.all().chat(&body).await?;
    let took = started.elapsed();
    ensure!(r.status == 200, "{}: {}", r.status, r.text);
    ensure!(
        took < Duration::from_secs(2),
        "idle stream cut after {took:?}"
    );
    let events = sse_data(&r.text);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let err: Value = serde_json::from_str(&events[events.len() - 2])?;
    ensure!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "expected an error event before [DONE]: {events:?}"
    );
    ensure!(
        gw.mock.wait_open_responses(0, Duration::from_secs(2)).await,
        "the silent upstream stream was not released"
    );

    // Other models are unaffected.
    gw.proxy.chat(&seed_chat()).await?.expect(200)?;
    Ok(())
}

#[tokio::test]
async fn azure_errors_are_mapped() -> Result<()> {
    let gw = gateway().await?;
    let admin = gw.cp.rest();
    let mock = &gw.mock;
    for dep in ["garbage-prod", "filter-prod", "busy-prod", "busy2-prod"] {
        mock.add_deployment(dep, "gpt-4o-2024-08-06");
    }
    mock.set_behaviour("garbage-prod", Behaviour::Garbage);
    mock.set_behaviour("filter-prod", Behaviour::ContentFilter);
    mock.set_behaviour(
        "busy-prod",
        Behaviour::RateLimited {
            retry_after_ms: Some(1500),
            retry_after: None,
        },
    );
    mock.set_behaviour(
        "busy2-prod",
        Behaviour::RateLimited {
            retry_after_ms: None,
            retry_after: Some(7),
        },
    );
    for (alias, dep) in [
        ("garbage", "garbage-prod"),
        ("filtered", "filter-prod"),
        ("busy", "busy-prod"),
        ("busy2", "busy2-prod"),
        ("missing-deployment", "no-such-deployment"),
    ] {
        gw.model(alias, dep, None, None).await?;
    }
    // A provider key Azure rejects, and one at a closed port.
    let wrong_pk = admin
        .create_id(
            "provider_keys",
            &fixtures::provider_key_at("azure-wrong-key", "not-the-key", &mock.base_url()),
        )
        .await?;
    gw.model("wrong-key", SEED_DEPLOYMENT, Some(&wrong_pk), None)
        .await?;
    let closed = free_addr();
    let closed_pk = admin
        .create_id(
            "provider_keys",
            &fixtures::provider_key_at(
                "azure-unreachable",
                DEFAULT_API_KEY,
                &format!("http://{closed}"),
            ),
        )
        .await?;
    gw.model("unreachable", SEED_DEPLOYMENT, Some(&closed_pk), None)
        .await?;
    gw.synced().await?;
    let c = gw.all();
    let chat = |alias: &str| {
        let (c, body) = (c.clone(), chat_body(alias, "hello"));
        async move { c.chat(&body).await }
    };
    let message = |e: &Value| e["message"].as_str().unwrap_or_default().to_string();

    // 200 with a body that is not JSON.
    let r = chat("garbage").await?;
    let e = expect_openai_envelope(&r, 502)?;
    ensure!(
        message(&e).contains("garbage-prod"),
        "message should name the deployment: {e}"
    );

    // Azure rejects the gateway's credential: 502, not the caller's 401.
    let r = chat("wrong-key").await?;
    let e = expect_openai_error(&r, 502, "upstream_auth_error")?;
    ensure!(
        message(&e).contains("azure-wrong-key"),
        "message should name the provider key: {e}"
    );
    ensure!(!r.text.contains("not-the-key"), "secret leaked: {}", r.text);

    // Unknown deployment.
    let r = chat("missing-deployment").await?;
    let e = expect_openai_error(&r, 502, "upstream_route_error")?;
    ensure!(message(&e).contains("no-such-deployment"), "{e}");

    // Prompt blocked: 400 content_filter with Azure's filter details, for
    // streamed calls too.
    for stream in [false, true] {
        let mut body = chat_body("filtered", "something bad");
        body["stream"] = json!(stream);
        let r = c.chat(&body).await?;
        let e = expect_openai_error(&r, 400, "content_filter")?;
        assert_eq!(e["param"], "prompt");
        assert_eq!(e["content_filter_result"]["self_harm"]["filtered"], true);
        assert_eq!(
            e["content_filter_result"]["self_harm"]["severity"],
            "medium"
        );
        assert_eq!(e["content_filter_result"]["hate"]["filtered"], false);
    }

    // Rate limited: 429 with retry-after (from retry-after-ms, rounded up,
    // or as Azure sent it).
    let r = chat("busy").await?;
    expect_openai_error(&r, 429, "rate_limit_exceeded")?;
    assert_eq!(r.header("retry-after"), Some("2"), "{:?}", r.headers);
    let r = chat("busy2").await?;
    expect_openai_error(&r, 429, "rate_limit_exceeded")?;
    assert_eq!(r.header("retry-after"), Some("7"), "{:?}", r.headers);

    // Nothing listens at the api_base.
    let r = chat("unreachable").await?;
    let e = expect_openai_error(&r, 502, "upstream_route_error")?;
    ensure!(
        message(&e).contains("azure-unreachable") || message(&e).contains(&closed.to_string()),
        "message should name the provider key or the address: {e}"
    );

    // Every upstream failure above reached the mock (or tried to).
    for dep in [
        "garbage-prod",
        "filter-prod",
        "busy-prod",
        "busy2-prod",
        "no-such-deployment",
    ] {
        ensure!(mock.requests(dep) >= 1, "{dep} never called");
    }
    // ... and the gateway is fine afterwards, with the seed's provider key.
    let r = gw.proxy.chat(&seed_chat()).await?;
    r.expect(200)?;
    ensure!(
        r.header("x-aigw-served-by") == Some(&format!("{SEED_PROVIDER_KEY}/{SEED_DEPLOYMENT}")),
        "{:?}",
        r.headers
    );
    assert_eq!(mock.open_responses(), 0);
    Ok(())
}
