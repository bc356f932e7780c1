//! Azure-shaped inbound routes end to end (issue 20, part 1): callers that
//! speak Azure OpenAI's own API — `AzureOpenAI(azure_endpoint=…)` clients,
//! apps that called APIM — reach aigw at
//! `/openai/deployments/{alias}/{op}?api-version=…` with an `api-key`
//! header and get Azure's answers (filter annotations, Azure's `model`) and
//! Azure's errors; `OpenAI(base_url=<gateway>/openai/v1)` clients get the
//! OpenAI API under `/openai/v1`. Every gateway step applies as on `/v1`.

use aigw_tests::data_plane::{
    chat_body, expect_openai_error, sse_data, wait_standalone_synced, ProxyClient,
};
use aigw_tests::fixtures::{self, seed_azure, SEED_ALIAS, SEED_DEPLOYMENT, SEED_PROVIDER_KEY};
use aigw_tests::mock_azure::{
    expected_answer, expected_embedding_tokens, expected_usage, MockAzure, API_VERSION,
};
use aigw_tests::usage::{assert_totals, Totals};
use aigw_tests::{ControlPlane, Options, Resp};
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

const AZURE_SECRET: &str = "azure-upstream-secret";
/// The model version the mock reports for the seed deployment.
const AZURE_MODEL: &str = "gpt-4o-mini-2024-07-18";
const EMBED_ALIAS: &str = "embed-azure";
const EMBED_DEPLOYMENT: &str = "embed-prod";
const EMBED_MODEL: &str = "text-embedding-3-small";
/// Allowed the seed alias and the embeddings alias.
const CALLER: &str = "sk-azure-inbound";
/// Allowed only the embeddings alias.
const EMBED_ONLY: &str = "sk-embed-only";
/// A preview version an SDK might send: accepted, never sent upstream.
const CALLER_API_VERSION: &str = "2025-04-01-preview";

struct Gateway {
    mock: MockAzure,
    cp: ControlPlane,
    /// No `Authorization`: requests add `api-key` themselves.
    anon: ProxyClient,
}

async fn gateway() -> Result<Gateway> {
    let mock = MockAzure::start().await;
    mock.set_api_key(AZURE_SECRET);
    mock.add_deployment(SEED_DEPLOYMENT, AZURE_MODEL);
    mock.add_deployment(EMBED_DEPLOYMENT, EMBED_MODEL);
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let seeded = seed_azure(&admin, &mock.base_url(), AZURE_SECRET).await?;
    admin
        .create_id(
            "models",
            &fixtures::model_on(EMBED_ALIAS, EMBED_DEPLOYMENT, &seeded.provider_key_id),
        )
        .await?;
    admin
        .create_id(
            "apikeys",
            &fixtures::api_key(CALLER, &[SEED_ALIAS, EMBED_ALIAS]),
        )
        .await?;
    admin
        .create_id("apikeys", &fixtures::api_key(EMBED_ONLY, &[EMBED_ALIAS]))
        .await?;
    wait_standalone_synced(&cp).await?;
    let anon = ProxyClient::new(&cp.proxy_url(), None);
    Ok(Gateway { mock, cp, anon })
}

/// `/openai/deployments/{alias}/{op}?api-version=…`, as `AzureOpenAI` builds it.
fn deployment_path(alias: &str, op: &str) -> String {
    format!("/openai/deployments/{alias}/{op}?api-version={CALLER_API_VERSION}")
}

impl Gateway {
    /// POST `body` to `path` with `api-key: <key>` (when given).
    async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Result<Resp> {
        let mut rb = self.anon.request(Method::POST, path).json(body);
        if let Some(k) = key {
            rb = rb.header("api-key", k);
        }
        ProxyClient::send(rb).await
    }
}

/// Asserts Azure's error shape: status, `x-request-id`, JSON, and a body that
/// is exactly `{"error": {"code": <code>, "message": <non-empty>}}`.
fn expect_azure_error(resp: &Resp, status: u16, code: &str) -> Result<String> {
    ensure!(
        resp.status.as_u16() == status,
        "expected HTTP {status}, got {}: {}",
        resp.status,
        resp.text
    );
    ensure!(
        resp.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "no x-request-id on a {status}: {:?}",
        resp.headers
    );
    ensure!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "content-type {:?}",
        resp.header("content-type")
    );
    let body = resp.json()?;
    let error = body
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("error"))
        .and_then(Value::as_object)
        .with_context(|| format!("not Azure's error shape: {body}"))?;
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    ensure!(
        keys == ["code", "message"],
        "Azure's error has `code` and `message` only: {body}"
    );
    ensure!(error["code"] == code, "expected code {code:?}: {body}");
    let message = error["message"].as_str().unwrap_or_default();
    ensure!(!message.trim().is_empty(), "empty message: {body}");
    Ok(message.to_string())
}

/// What the mock got last on `deployment`: the deployment path for `op`, the
/// provider key's api-version (never the caller's) and its secret.
fn assert_upstream(mock: &MockAzure, deployment: &str, op: &str) -> Result<Value> {
    let req = mock.last_request(deployment).context("no upstream call")?;
    ensure!(
        req.path == format!("/openai/deployments/{deployment}/{op}"),
        "upstream path {}",
        req.path
    );
    ensure!(
        req.query == format!("api-version={API_VERSION}"),
        "upstream query {:?}: the provider key's api-version, not the caller's",
        req.query
    );
    ensure!(req.header("api-key") == Some(AZURE_SECRET));
    Ok(req.json())
}

#[tokio::test]
async fn azure_shaped_chat_keeps_azures_answer() -> Result<()> {
    let gw = gateway().await?;
    // AzureOpenAI sends no `model` in the body: the path names the alias.
    let body = json!({"messages": [{"role": "user", "content": "What is 4200 + 42?"}]});
    let resp = gw
        .post(
            &deployment_path(SEED_ALIAS, "chat/completions"),
            Some(CALLER),
            &body,
        )
        .await?;
    let v = resp.expect(200)?;
    assert_eq!(
        v["model"], AZURE_MODEL,
        "the model as Azure reports it: {v}"
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_answer(&body)
    );
    // Azure's annotations, passed through unchanged.
    let prompt_filter = &v["prompt_filter_results"][0];
    assert_eq!(prompt_filter["prompt_index"], 0, "{v}");
    assert_eq!(
        prompt_filter["content_filter_results"]["jailbreak"],
        json!({"filtered": false, "detected": false})
    );
    assert_eq!(
        v["choices"][0]["content_filter_results"]["hate"],
        json!({"filtered": false, "severity": "safe"}),
        "{v}"
    );
    let (p, c) = expected_usage(&body);
    assert_eq!(v["usage"]["prompt_tokens"], p);
    assert_eq!(v["usage"]["completion_tokens"], c);
    assert_eq!(
        resp.header("x-aigw-served-by"),
        Some(format!("{SEED_PROVIDER_KEY}/{SEED_DEPLOYMENT}").as_str())
    );
    let sent = assert_upstream(&gw.mock, SEED_DEPLOYMENT, "chat/completions")?;
    assert_eq!(sent["messages"], body["messages"]);
    assert_eq!(gw.mock.requests(SEED_DEPLOYMENT), 1);

    // A body `model` that names another alias loses to the path.
    let mut other = body.clone();
    other["model"] = json!(EMBED_ALIAS);
    let v = gw
        .post(
            &deployment_path(SEED_ALIAS, "chat/completions"),
            Some(CALLER),
            &other,
        )
        .await?
        .expect(200)?;
    assert_eq!(v["model"], AZURE_MODEL);
    assert_eq!(gw.mock.requests(SEED_DEPLOYMENT), 2);
    assert_eq!(gw.mock.requests(EMBED_DEPLOYMENT), 0);

    // `Authorization: Bearer` works on this route too.
    let bearer = ProxyClient::new(&gw.cp.proxy_url(), Some(CALLER));
    let v = bearer
        .post_json(&deployment_path(SEED_ALIAS, "chat/completions"), &body)
        .await?
        .expect(200)?;
    ensure!(v["prompt_filter_results"].is_array(), "{v}");

    // /v1 is unchanged: the alias as `model`, no annotations.
    let v1 = bearer
        .chat(&chat_body(SEED_ALIAS, "What is 4200 + 42?"))
        .await?;
    let v = v1.expect(200)?;
    assert_eq!(v["model"], SEED_ALIAS);
    ensure!(
        !v1.text.contains("filter_results") && !v1.text.contains(AZURE_MODEL),
        "/v1 must strip Azure's fields: {}",
        v1.text
    );
    assert_eq!(gw.mock.requests(SEED_DEPLOYMENT), 4);
    Ok(())
}

#[tokio::test]
async fn azure_shaped_errors_and_gateway_steps() -> Result<()> {
    let gw = gateway().await?;
    let chat = deployment_path(SEED_ALIAS, "chat/completions");
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});

    // No key, an unknown key: Azure's 401.
    let msg = expect_azure_error(&gw.post(&chat, None, &body).await?, 401, "401")?;
    ensure!(msg.starts_with("Access denied"), "{msg}");
    expect_azure_error(&gw.post(&chat, Some("sk-nobody"), &body).await?, 401, "401")?;
    // A key not allowed this alias: 403, Azure's PermissionDenied.
    let msg = expect_azure_error(
        &gw.post(&chat, Some(EMBED_ONLY), &body).await?,
        403,
        "PermissionDenied",
    )?;
    ensure!(msg.contains(SEED_ALIAS), "{msg}");
    // An alias that does not exist is, to an Azure client, a deployment
    // that does not exist.
    expect_azure_error(
        &gw.post(
            &deployment_path("no-such-alias", "chat/completions"),
            Some(CALLER),
            &body,
        )
        .await?,
        404,
        "DeploymentNotFound",
    )?;
    // Azure answers a missing api-version, and an unknown operation, 404
    // "Resource not found".
    for path in [
        format!("/openai/deployments/{SEED_ALIAS}/chat/completions"),
        format!("/openai/deployments/{SEED_ALIAS}/chat/completions?api-version="),
        format!("/openai/deployments/{SEED_ALIAS}/images/generations?api-version=2024-10-21"),
        "/openai/deployments//chat/completions?api-version=2024-10-21".to_string(),
        format!(
            "/openai/deployments/{SEED_ALIAS}%2F..%2F..%2Fadmin/chat/completions?api-version=1"
        ),
    ] {
        let resp = gw.post(&path, Some(CALLER), &body).await?;
        let msg = expect_azure_error(
            &resp,
            404,
            if path.contains("%2F") {
                "DeploymentNotFound"
            } else {
                "404"
            },
        )
        .with_context(|| path.clone())?;
        ensure!(
            path.contains("%2F") || msg == "Resource not found",
            "{path}: {msg}"
        );
    }
    // A malformed body is Azure-shaped too.
    let resp = ProxyClient::send(
        gw.anon
            .request(Method::POST, &chat)
            .header("api-key", CALLER)
            .header("content-type", "application/json")
            .body("{\"messages\": ["),
    )
    .await?;
    expect_azure_error(&resp, 400, "invalid_json")?;
    assert_eq!(
        gw.mock.total_requests(),
        0,
        "no refused call may reach Azure"
    );

    // The key's rate limit applies: one call a minute, then Azure's 429.
    let limited = "sk-azure-limited";
    let mut key = fixtures::api_key(limited, &[SEED_ALIAS]);
    key["rate_limit"] = json!({"rpm": 1});
    gw.cp.rest().create_id("apikeys", &key).await?;
    wait_standalone_synced(&gw.cp).await?;
    gw.post(&chat, Some(limited), &body).await?.expect(200)?;
    let resp = gw.post(&chat, Some(limited), &body).await?;
    expect_azure_error(&resp, 429, "429")?;
    ensure!(
        resp.header("retry-after").is_some(),
        "a 429 says when to retry: {:?}",
        resp.headers
    );
    assert_eq!(gw.mock.requests(SEED_DEPLOYMENT), 1);

    // An upstream content filter is Azure's own answer, verbatim in shape.
    gw.mock.set_behaviour(
        SEED_DEPLOYMENT,
        aigw_tests::mock_azure::Behaviour::ContentFilter,
    );
    let resp = gw.post(&chat, Some(CALLER), &body).await?;
    let v = resp.expect(400)?;
    assert_eq!(v["error"]["code"], "content_filter", "{v}");
    assert_eq!(
        v["error"]["innererror"]["code"],
        "ResponsibleAIPolicyViolation"
    );
    assert_eq!(
        v["error"]["innererror"]["content_filter_result"]["self_harm"]["filtered"], true,
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn azure_shaped_stream_keeps_azures_chunks() -> Result<()> {
    let gw = gateway().await?;
    let path = deployment_path(SEED_ALIAS, "chat/completions");
    for include_usage in [false, true] {
        let mut body = json!({"messages": [{"role": "user", "content": "Count to three."}],
                              "stream": true});
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let resp = gw.post(&path, Some(CALLER), &body).await?;
        ensure!(resp.status == 200, "{}: {}", resp.status, resp.text);
        ensure!(
            resp.header("content-type")
                .is_some_and(|c| c.starts_with("text/event-stream")),
            "{:?}",
            resp.headers
        );
        let events = sse_data(&resp.text);
        let (done, chunks) = events.split_last().context("no events")?;
        ensure!(done == "[DONE]", "last event {done:?}");
        let chunks: Vec<Value> = chunks
            .iter()
            .map(|e| serde_json::from_str(e).context("event is not JSON"))
            .collect::<Result<_>>()?;
        // Azure's first chunk: empty choices, the prompt's filter results.
        ensure!(
            chunks[0]["choices"] == json!([]) && chunks[0]["prompt_filter_results"].is_array(),
            "first chunk {}",
            chunks[0]
        );
        let content: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["id"].as_str().is_some_and(|id| !id.is_empty()))
            .filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()))
            .collect();
        ensure!(content.len() >= 3, "{chunks:?}");
        for c in &content {
            ensure!(c["model"] == AZURE_MODEL, "Azure's model: {c}");
            ensure!(
                c["choices"][0].get("content_filter_results").is_some(),
                "content_filter_results kept: {c}"
            );
        }
        let text: String = content
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, expected_answer(&body));
        ensure!(
            chunks
                .iter()
                .any(|c| c["choices"][0].get("content_filter_offsets").is_some()),
            "the asynchronous filter's annotation chunk is kept"
        );
        let usage = chunks.iter().find(|c| c["usage"].is_object());
        if include_usage {
            let u = usage.context("asked-for usage chunk missing")?;
            let (p, c) = expected_usage(&body);
            assert_eq!(u["usage"]["prompt_tokens"], p);
            assert_eq!(u["usage"]["completion_tokens"], c);
        } else {
            ensure!(usage.is_none(), "usage not asked for: {}", resp.text);
        }
        let sent = assert_upstream(&gw.mock, SEED_DEPLOYMENT, "chat/completions")?;
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }
    Ok(())
}

#[tokio::test]
async fn azure_shaped_embeddings_and_completions() -> Result<()> {
    let gw = gateway().await?;
    let body = json!({"input": ["first text", "second"]});
    let resp = gw
        .post(
            &deployment_path(EMBED_ALIAS, "embeddings"),
            Some(EMBED_ONLY),
            &body,
        )
        .await?;
    let v = resp.expect(200)?;
    assert_eq!(v["model"], EMBED_MODEL, "{v}");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    let n = expected_embedding_tokens(&body);
    assert_eq!(v["usage"]["prompt_tokens"], n);
    assert_upstream(&gw.mock, EMBED_DEPLOYMENT, "embeddings")?;

    let body = json!({"prompt": "Once upon a time", "max_tokens": 20});
    let v = gw
        .post(
            &deployment_path(SEED_ALIAS, "completions"),
            Some(CALLER),
            &body,
        )
        .await?
        .expect(200)?;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], AZURE_MODEL);
    ensure!(v["prompt_filter_results"].is_array(), "{v}");
    assert_upstream(&gw.mock, SEED_DEPLOYMENT, "completions")?;
    Ok(())
}

#[tokio::test]
async fn openai_v1_under_openai_is_the_openai_api() -> Result<()> {
    let gw = gateway().await?;
    let client = ProxyClient::new(&format!("{}/openai", gw.cp.proxy_url()), Some(CALLER));
    let body = chat_body(SEED_ALIAS, "Say hello.");
    let resp = client.chat(&body).await?;
    let v = resp.expect(200)?;
    assert_eq!(v["model"], SEED_ALIAS, "the OpenAI shape: {v}");
    ensure!(!resp.text.contains("filter_results"), "{}", resp.text);
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_answer(&body)
    );
    assert_upstream(&gw.mock, SEED_DEPLOYMENT, "chat/completions")?;

    let emb = client
        .post_json(
            "/v1/embeddings",
            &json!({"model": EMBED_ALIAS, "input": "x"}),
        )
        .await?
        .expect(200)?;
    assert_eq!(emb["model"], EMBED_ALIAS);

    let models = client.models().await?.expect(200)?;
    let mut ids: Vec<&str> = models["data"]
        .as_array()
        .context("no data")?
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [EMBED_ALIAS, SEED_ALIAS]);

    // Errors keep the OpenAI envelope here.
    let resp = client.with_key(Some("sk-nobody")).chat(&body).await?;
    expect_openai_error(&resp, 401, "invalid_api_key")?;
    let resp = client.with_key(Some(EMBED_ONLY)).chat(&body).await?;
    expect_openai_error(&resp, 403, "permission_denied")?;
    Ok(())
}

#[tokio::test]
async fn usage_is_accounted_for_azure_shaped_calls_as_for_v1() -> Result<()> {
    let gw = gateway().await?;
    let chat_path = deployment_path(SEED_ALIAS, "chat/completions");
    let v1 = ProxyClient::new(&gw.cp.proxy_url(), Some(CALLER));
    let mut expected = Totals::default();
    let mut add = |(p, c): (u64, u64), error: bool| {
        expected += Totals {
            requests: 1,
            errors: u64::from(error),
            prompt: p,
            completion: c,
            cost_nanos: 0,
        };
    };
    // The same chat on both routes counts the same.
    let body = chat_body(SEED_ALIAS, "Tell me a short story.");
    v1.chat(&body).await?.expect(200)?;
    add(expected_usage(&body), false);
    gw.post(&chat_path, Some(CALLER), &body)
        .await?
        .expect(200)?;
    add(expected_usage(&body), false);
    // A stream without the caller asking for usage: Azure's usage chunk
    // (the gateway asked for it) is what counts.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let resp = gw.post(&chat_path, Some(CALLER), &stream).await?;
    ensure!(resp.status == 200 && resp.text.ends_with("data: [DONE]\n\n"));
    add(expected_usage(&body), false);
    let emb = json!({"input": "count me"});
    gw.post(
        &deployment_path(EMBED_ALIAS, "embeddings"),
        Some(CALLER),
        &emb,
    )
    .await?
    .expect(200)?;
    add((expected_embedding_tokens(&emb), 0), false);
    // A refusal of a known key counts as an error; an unknown key does not.
    gw.post(&chat_path, Some(EMBED_ONLY), &body)
        .await?
        .expect(403)?;
    add((0, 0), true);
    gw.post(&chat_path, Some("sk-nobody"), &body)
        .await?
        .expect(401)?;
    assert_totals(&gw.cp.rest(), expected, 300).await?;

    // Per model, the Azure-shaped calls sit with the /v1 one under the
    // alias (the refusal came before the alias was authorised, as on /v1).
    let v: Value = gw
        .cp
        .rest()
        .get("/admin/v1/usage?group_by=model")
        .await?
        .expect(200)?;
    let row = v["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["group"]["model"] == SEED_ALIAS))
        .context("no row for the alias")?;
    assert_eq!(row["requests"], 3, "{v}");
    assert_eq!(row["errors"], 0, "{v}");
    Ok(())
}

/// The official `openai` Python SDK (installed by `.ci/run`) against the
/// gateway: `AzureOpenAI` on the Azure-shaped routes keeps Azure's filter
/// annotations, `OpenAI` on `/v1` gets them stripped; chat JSON and stream,
/// embeddings, each answer as the mock gave it.
#[tokio::test]
async fn the_official_openai_sdk_works_on_both_shapes() -> Result<()> {
    let gw = gateway().await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/openai_clients.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .env("AIGW_URL", gw.cp.proxy_url())
        .env("AIGW_KEY", CALLER)
        .env("AIGW_ALIAS", SEED_ALIAS)
        .env("AIGW_EMBED_ALIAS", EMBED_ALIAS)
        .output()
        .await
        .context("running python3 (the SDK test needs python3 with `pip install openai`)")?;
    ensure!(
        out.status.success(),
        "the SDK script failed (needs `python3 -m pip install openai`, as .ci/run does):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).to_string())?;
    let asked = json!({"model": SEED_ALIAS, "messages": [{"role": "user", "content": "hello from the sdk"}], "max_tokens": 16});
    let answer = expected_answer(&asked);
    for (shape, filters) in [("azure", true), ("v1", false), ("openai_v1", false)] {
        let chat = &seen[shape]["chat"];
        ensure!(chat["content"] == answer.as_str(), "{shape}: {chat}");
        ensure!(
            chat["content_filter_results"] == filters && chat["prompt_filter_results"] == filters,
            "{shape}: filter annotations {chat}"
        );
        ensure!(
            chat["total_tokens"].as_u64().unwrap_or(0) > 0,
            "{shape}: {chat}"
        );
    }
    ensure!(seen["azure"]["chat"]["model"] == AZURE_MODEL, "{seen}");
    for shape in ["azure", "v1"] {
        let stream = &seen[shape]["stream"];
        ensure!(stream["content"] == answer.as_str(), "{shape}: {stream}");
        ensure!(
            stream["chunks"].as_u64().unwrap_or(0) > 1,
            "{shape}: {stream}"
        );
        let embeddings = &seen[shape]["embeddings"];
        ensure!(
            embeddings["dimensions"].as_u64().unwrap_or(0) > 0,
            "{shape}: {embeddings}"
        );
    }
    ensure!(
        gw.mock.requests(SEED_DEPLOYMENT) == 5,
        "every chat reached Azure once"
    );
    Ok(())
}

/// A provider key on Azure's v1 API (`api_version: "v1"`): calls go to
/// `{api_base}/openai/v1/{op}` without an `api-version`, with the deployment
/// in the body's `model` instead of the caller's alias; the caller sees the
/// same answers either way.
#[tokio::test]
async fn a_provider_key_on_azures_v1_api_sends_the_deployment_in_the_body() -> Result<()> {
    let mock = MockAzure::start().await;
    mock.set_api_key(AZURE_SECRET);
    mock.add_deployment(SEED_DEPLOYMENT, AZURE_MODEL);
    mock.add_deployment(EMBED_DEPLOYMENT, EMBED_MODEL);
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let mut pk = fixtures::provider_key_at(SEED_PROVIDER_KEY, AZURE_SECRET, &mock.base_url());
    pk["api_version"] = json!("v1");
    let pk = admin.create_id("provider_keys", &pk).await?;
    for (alias, deployment) in [
        (SEED_ALIAS, SEED_DEPLOYMENT),
        (EMBED_ALIAS, EMBED_DEPLOYMENT),
    ] {
        admin
            .create_id("models", &fixtures::model_on(alias, deployment, &pk))
            .await?;
    }
    admin
        .create_id(
            "apikeys",
            &fixtures::api_key(CALLER, &[SEED_ALIAS, EMBED_ALIAS]),
        )
        .await?;
    wait_standalone_synced(&cp).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));

    let body = chat_body(SEED_ALIAS, "hello over v1");
    let resp = client.chat(&body).await?;
    let answer = resp.expect(200)?;
    ensure!(
        answer["choices"][0]["message"]["content"] == expected_answer(&body).as_str(),
        "{answer}"
    );
    let seen = mock
        .last_request(SEED_DEPLOYMENT)
        .context("the call reached the deployment")?;
    ensure!(seen.path == "/openai/v1/chat/completions", "{}", seen.path);
    ensure!(
        seen.query.is_empty(),
        "no api-version on v1: {}",
        seen.query
    );
    let sent: Value = serde_json::from_slice(&seen.body)?;
    ensure!(sent["model"] == SEED_DEPLOYMENT, "{sent}");
    ensure!(sent["messages"] == body["messages"], "{sent}");

    let embed = client
        .post_json(
            "/v1/embeddings",
            &json!({"model": EMBED_ALIAS, "input": "hello over v1"}),
        )
        .await?;
    embed.expect(200)?;
    let seen = mock
        .last_request(EMBED_DEPLOYMENT)
        .context("the embeddings call reached its deployment")?;
    ensure!(seen.path == "/openai/v1/embeddings", "{}", seen.path);
    let sent: Value = serde_json::from_slice(&seen.body)?;
    ensure!(sent["model"] == EMBED_DEPLOYMENT, "{sent}");
    Ok(())
}
