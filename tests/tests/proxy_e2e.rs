//! The proxy end to end, as a new user meets it: a standalone control plane,
//! the seed's three admin calls (provider key pointed at a mock Azure OpenAI,
//! model alias, caller key), then OpenAI-API calls through the in-process
//! data plane — JSON and streamed chat, embeddings, completions, the model
//! list, request ids and trace propagation.

use aigw_tests::data_plane::{chat_body, sse_data, wait_standalone_synced, ProxyClient};
use aigw_tests::fixtures::{
    self, seed_azure, Seeded, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT, SEED_PROVIDER_KEY,
};
use aigw_tests::mock_azure::{
    expected_answer, expected_embedding_tokens, expected_usage, Behaviour, MockAzure, API_VERSION,
};
use aigw_tests::{ControlPlane, Options, Resp};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// The seed's provider-key secret; the mock accepts only this `api-key`.
const AZURE_SECRET: &str = "YOUR_AZURE_API_KEY";
/// Underlying model name the mock reports (never shown to callers).
const AZURE_MODEL: &str = "gpt-4o-2024-08-06";
/// The seed's request.
const SEED_PROMPT: &str = "Say hello from Azure OpenAI.";

struct Gateway {
    mock: MockAzure,
    cp: ControlPlane,
    seeded: Seeded,
    /// Presents the seed's caller key.
    proxy: ProxyClient,
}

/// Mock Azure with the seed's deployment, a standalone control plane, and
/// the seed's admin calls applied on its data plane.
async fn gateway() -> Result<Gateway> {
    gateway_with(Options::standalone()).await
}

/// [`gateway`] with the standalone's options given.
async fn gateway_with(opts: Options) -> Result<Gateway> {
    let mock = MockAzure::start().await;
    mock.set_api_key(AZURE_SECRET);
    mock.add_deployment(SEED_DEPLOYMENT, AZURE_MODEL);
    let cp = ControlPlane::start_with(opts).await?;
    let seeded = seed_azure(&cp.rest(), &mock.base_url(), AZURE_SECRET).await?;
    wait_standalone_synced(&cp).await?;
    let proxy = ProxyClient::new(&cp.proxy_url(), Some(SEED_CALLER_KEY));
    Ok(Gateway {
        mock,
        cp,
        seeded,
        proxy,
    })
}

/// No Azure-only fields anywhere in what the caller got.
fn assert_no_azure_fields(text: &str) -> Result<()> {
    for field in [
        "prompt_filter_results",
        "prompt_annotations",
        "content_filter_results",
        "content_filter_offsets",
    ] {
        ensure!(
            !text.contains(field),
            "`{field}` leaked to the caller: {text}"
        );
    }
    ensure!(
        !text.contains(AZURE_MODEL),
        "the Azure model name leaked to the caller: {text}"
    );
    Ok(())
}

/// The gateway's own headers on a successful answer.
fn assert_gateway_headers(resp: &Resp) -> Result<()> {
    ensure!(
        resp.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "no x-request-id: {:?}",
        resp.headers
    );
    ensure!(
        resp.header("x-aigw-served-by") == Some(&format!("{SEED_PROVIDER_KEY}/{SEED_DEPLOYMENT}")),
        "x-aigw-served-by should name the deployment that answered: {:?}",
        resp.headers
    );
    Ok(())
}

/// What the mock received for the last call on the seed deployment: the
/// provider key's secret as `api-key`, the deployment path for `op`, the GA
/// api-version, and nothing of the caller's own key.
fn assert_upstream_request(mock: &MockAzure, op: &str) -> Result<Value> {
    let req = mock
        .last_request(SEED_DEPLOYMENT)
        .context("the mock saw no request")?;
    ensure!(req.method == "POST", "method {}", req.method);
    ensure!(
        req.path == format!("/openai/deployments/{SEED_DEPLOYMENT}/{op}"),
        "upstream path {}",
        req.path
    );
    ensure!(
        req.query
            .split('&')
            .any(|kv| kv == format!("api-version={API_VERSION}")),
        "upstream query {:?} lacks api-version={API_VERSION}",
        req.query
    );
    ensure!(
        req.header("api-key") == Some(AZURE_SECRET),
        "upstream api-key header: {:?}",
        req.header("api-key")
    );
    for (name, value) in &req.headers {
        ensure!(
            !value.contains(SEED_CALLER_KEY),
            "the caller's key reached Azure in `{name}`"
        );
    }
    Ok(req.json())
}

#[tokio::test]
async fn seed_chat_completion_through_the_gateway() -> Result<()> {
    let gw = gateway().await?;
    let body = chat_body(SEED_ALIAS, SEED_PROMPT);
    let resp = gw.proxy.chat(&body).await?;
    let v = resp.expect(200)?;
    ensure!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "content-type {:?}",
        resp.header("content-type")
    );
    assert_eq!(v["model"], SEED_ALIAS, "the alias, not the deployment: {v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_answer(&body)
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (p, c) = expected_usage(&body);
    assert_eq!(v["usage"]["prompt_tokens"], p);
    assert_eq!(v["usage"]["completion_tokens"], c);
    assert_eq!(v["usage"]["total_tokens"], p + c);
    assert_no_azure_fields(&resp.text)?;
    assert_gateway_headers(&resp)?;

    assert_eq!(gw.mock.requests(SEED_DEPLOYMENT), 1);
    let sent = assert_upstream_request(&gw.mock, "chat/completions")?;
    assert_eq!(sent["messages"], body["messages"], "prompt forwarded as is");

    // A fresh request id per call when the caller sends none.
    let again = gw.proxy.chat(&body).await?;
    again.expect(200)?;
    assert_ne!(
        resp.header("x-request-id"),
        again.header("x-request-id"),
        "request ids must differ between calls"
    );

    // The caller's x-request-id is reused.
    let r = ProxyClient::send(
        gw.proxy
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .header("x-request-id", "e2e-req-0042")
            .json(&body),
    )
    .await?;
    r.expect(200)?;
    assert_eq!(r.header("x-request-id"), Some("e2e-req-0042"));

    // W3C trace context is propagated upstream (same trace id).
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let r = ProxyClient::send(
        gw.proxy
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .header("traceparent", &traceparent)
            .json(&body),
    )
    .await?;
    r.expect(200)?;
    let upstream = gw
        .mock
        .last_request(SEED_DEPLOYMENT)
        .context("no request")?;
    let forwarded = upstream
        .header("traceparent")
        .context("traceparent was not forwarded to Azure")?;
    let parts: Vec<&str> = forwarded.split('-').collect();
    ensure!(
        parts.len() == 4 && parts[0] == "00" && parts[1] == trace_id,
        "forwarded traceparent {forwarded:?} does not continue trace {trace_id}"
    );
    assert_eq!(gw.mock.requests(SEED_DEPLOYMENT), 4);

    // The seed's admin resources are what the gateway used.
    let models = gw.cp.rest().list("models").await?;
    ensure!(
        models
            .iter()
            .any(|m| m["id"] == gw.seeded.model_id.as_str()),
        "seed model missing from {models:?}"
    );
    Ok(())
}

/// Checks a streamed chat answer; returns the parsed chunks (without `[DONE]`).
fn check_chat_stream(resp: &Resp, body: &Value, want_usage: bool) -> Result<Vec<Value>> {
    ensure!(resp.status == 200, "{}: {}", resp.status, resp.text);
    ensure!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "content-type {:?}",
        resp.header("content-type")
    );
    assert_gateway_headers(resp)?;
    assert_no_azure_fields(&resp.text)?;
    ensure!(
        resp.text.ends_with("data: [DONE]\n\n"),
        "the stream must end with `data: [DONE]`: {:?}",
        resp.text
    );
    let events = sse_data(&resp.text);
    ensure!(events.len() >= 4, "too few events: {events:?}");
    let (done, chunks) = events.split_last().context("no events")?;
    ensure!(done == "[DONE]", "last event {done:?}");
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|e| serde_json::from_str(e).with_context(|| format!("event is not JSON: {e}")))
        .collect::<Result<_>>()?;
    for (i, c) in chunks.iter().enumerate() {
        ensure!(c["model"] == SEED_ALIAS, "chunk {i} without the alias: {c}");
        ensure!(c["object"] == "chat.completion.chunk", "chunk {i}: {c}");
    }
    // First chunk: the assistant role (the prompt-filter chunk was dropped).
    ensure!(
        chunks[0]["choices"][0]["delta"]["role"] == "assistant",
        "first chunk should carry the role: {}",
        chunks[0]
    );
    let (content_end, usage_chunk) = if want_usage {
        let (last, rest) = chunks.split_last().context("no chunks")?;
        (rest, Some(last))
    } else {
        (&chunks[..], None)
    };
    // Every chunk but the usage chunk has a choice; the last one finishes.
    for (i, c) in content_end.iter().enumerate() {
        ensure!(
            c["choices"].as_array().is_some_and(|a| a.len() == 1),
            "chunk {i} must have one choice (empty-choice chunks are dropped): {c}"
        );
        ensure!(
            c.get("usage").is_none_or(Value::is_null),
            "usage before the end: {c}"
        );
    }
    let finish = content_end.last().context("no content chunks")?;
    ensure!(
        finish["choices"][0]["finish_reason"] == "stop",
        "the last choice chunk should finish: {finish}"
    );
    let text: String = content_end
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    ensure!(text == expected_answer(body), "streamed text {text:?}");
    if let Some(u) = usage_chunk {
        let (p, c) = expected_usage(body);
        ensure!(u["choices"] == json!([]), "usage chunk has choices: {u}");
        ensure!(
            u["usage"]["prompt_tokens"] == p
                && u["usage"]["completion_tokens"] == c
                && u["usage"]["total_tokens"] == p + c,
            "usage chunk {u}"
        );
    } else {
        ensure!(
            !resp.text.contains("prompt_tokens"),
            "usage forwarded though the caller did not ask: {}",
            resp.text
        );
    }
    Ok(chunks)
}

#[tokio::test]
async fn streamed_chat_completion() -> Result<()> {
    let gw = gateway().await?;

    // Without stream_options: no usage chunk for the caller, but the gateway
    // still asks Azure for usage (it accounts for tokens).
    let mut body = chat_body(SEED_ALIAS, SEED_PROMPT);
    body["stream"] = json!(true);
    let resp = gw.proxy.chat(&body).await?;
    check_chat_stream(&resp, &body, false)?;
    let sent = assert_upstream_request(&gw.mock, "chat/completions")?;
    assert_eq!(sent["stream"], true);
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "the gateway must ask Azure for usage: {sent}"
    );
    assert_eq!(sent["messages"], body["messages"]);

    // With include_usage: the usage chunk comes last, before [DONE].
    body["stream_options"] = json!({"include_usage": true});
    let resp = gw.proxy.chat(&body).await?;
    let chunks = check_chat_stream(&resp, &body, true)?;
    ensure!(chunks.len() >= 4, "{chunks:?}");
    let sent = assert_upstream_request(&gw.mock, "chat/completions")?;
    assert_eq!(sent["stream_options"]["include_usage"], true);

    // include_usage: false explicitly — still asked upstream, not forwarded.
    body["stream_options"] = json!({"include_usage": false});
    let resp = gw.proxy.chat(&body).await?;
    check_chat_stream(&resp, &body, false)?;
    let sent = assert_upstream_request(&gw.mock, "chat/completions")?;
    assert_eq!(sent["stream_options"]["include_usage"], true);

    // An upstream stream that ends without [DONE] still ends properly.
    gw.mock
        .set_behaviour(SEED_DEPLOYMENT, Behaviour::StreamNoDone);
    body["stream_options"] = json!({"include_usage": true});
    let resp = gw.proxy.chat(&body).await?;
    ensure!(resp.status == 200, "{}", resp.text);
    ensure!(
        resp.text.ends_with("data: [DONE]\n\n"),
        "stream without upstream [DONE] must still end with [DONE]: {:?}",
        resp.text
    );
    let events = sse_data(&resp.text);
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, expected_answer(&body));
    assert_eq!(gw.mock.requests(SEED_DEPLOYMENT), 4);
    Ok(())
}

#[tokio::test]
async fn embeddings_completions_and_the_model_list() -> Result<()> {
    let gw = gateway().await?;
    let admin = gw.cp.rest();
    // A second alias for embeddings, and a caller allowed both.
    gw.mock
        .add_deployment("embed-prod", "text-embedding-3-small");
    admin
        .create_id(
            "models",
            &fixtures::model_on("embed-azure", "embed-prod", &gw.seeded.provider_key_id),
        )
        .await?;
    let both_key = "sk-azure-both";
    admin
        .create_id(
            "apikeys",
            &fixtures::api_key(both_key, &[SEED_ALIAS, "embed-azure"]),
        )
        .await?;
    let all_key = "sk-azure-all";
    admin
        .create_id("apikeys", &fixtures::api_key(all_key, &["*"]))
        .await?;
    wait_standalone_synced(&gw.cp).await?;

    // GET /v1/models: filtered by the caller's allowlist.
    let ids = |resp: &Resp| -> Result<Vec<String>> {
        let v = resp.expect(200)?;
        ensure!(v["object"] == "list", "{v}");
        let mut ids: Vec<String> = v["data"]
            .as_array()
            .context("no data array")?
            .iter()
            .map(|m| {
                ensure!(m["object"] == "model", "{m}");
                m["id"].as_str().map(str::to_string).context("model id")
            })
            .collect::<Result<_>>()?;
        ids.sort();
        Ok(ids)
    };
    let seed_list = gw.proxy.models().await?;
    assert_eq!(ids(&seed_list)?, vec![SEED_ALIAS.to_string()]);
    ensure!(
        seed_list.header("x-request-id").is_some(),
        "no x-request-id"
    );
    let both = gw.proxy.with_key(Some(both_key));
    assert_eq!(
        ids(&both.models().await?)?,
        vec!["embed-azure".to_string(), SEED_ALIAS.to_string()]
    );
    assert_eq!(
        ids(&gw.proxy.with_key(Some(all_key)).models().await?)?,
        vec!["embed-azure".to_string(), SEED_ALIAS.to_string()]
    );

    // Embeddings.
    let body = json!({"model": "embed-azure", "input": ["first text", "second"]});
    let resp = both.post_json("/v1/embeddings", &body).await?;
    let v = resp.expect(200)?;
    assert_eq!(v["model"], "embed-azure");
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().map(Vec::len), Some(8));
    let n = expected_embedding_tokens(&body);
    assert_eq!(v["usage"], json!({"prompt_tokens": n, "total_tokens": n}));
    ensure!(
        resp.header("x-aigw-served-by") == Some(&format!("{SEED_PROVIDER_KEY}/embed-prod")),
        "{:?}",
        resp.headers
    );
    ensure!(
        !resp.text.contains("text-embedding-3-small"),
        "{}",
        resp.text
    );
    let req = gw.mock.last_request("embed-prod").context("no request")?;
    assert_eq!(req.path, "/openai/deployments/embed-prod/embeddings");
    ensure!(
        req.query.contains(&format!("api-version={API_VERSION}")),
        "{}",
        req.query
    );
    assert_eq!(req.header("api-key"), Some(AZURE_SECRET));

    // The seed key may not embed with an alias outside its allowlist.
    let resp = gw.proxy.post_json("/v1/embeddings", &body).await?;
    assert_eq!(resp.status, 403, "{}", resp.text);

    // Completions.
    let body = json!({"model": SEED_ALIAS, "prompt": "Say hi", "max_tokens": 20});
    let resp = gw.proxy.post_json("/v1/completions", &body).await?;
    let v = resp.expect(200)?;
    assert_eq!(v["model"], SEED_ALIAS);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], expected_answer(&body));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (p, c) = expected_usage(&body);
    assert_eq!(v["usage"]["total_tokens"], p + c);
    assert_no_azure_fields(&resp.text)?;
    assert_gateway_headers(&resp)?;
    let sent = assert_upstream_request(&gw.mock, "completions")?;
    assert_eq!(sent["prompt"], "Say hi");

    // Streamed completions: alias in every chunk, ends with [DONE].
    let mut body = body;
    body["stream"] = json!(true);
    let resp = gw.proxy.post_json("/v1/completions", &body).await?;
    ensure!(resp.status == 200, "{}", resp.text);
    assert_no_azure_fields(&resp.text)?;
    let events = sse_data(&resp.text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).context("chunk is not JSON"))
        .collect::<Result<_>>()?;
    ensure!(
        chunks.iter().all(|c| c["model"] == SEED_ALIAS),
        "{chunks:?}"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, expected_answer(&body));
    ensure!(
        !resp.text.contains("prompt_tokens"),
        "usage forwarded unasked: {}",
        resp.text
    );
    let sent = assert_upstream_request(&gw.mock, "completions")?;
    assert_eq!(sent["stream_options"]["include_usage"], true);
    Ok(())
}

/// Prompts and completions reach the logs only for a model with
/// `log_payloads`, JSON and streamed alike; never for the others.
#[tokio::test]
async fn prompts_and_completions_are_logged_only_for_models_that_opt_in() -> Result<()> {
    let g = gateway().await?;
    let admin = g.cp.rest();
    let mut logged =
        fixtures::model_on("gpt-4o-logged", SEED_DEPLOYMENT, &g.seeded.provider_key_id);
    logged["log_payloads"] = json!(true);
    admin.create("models", &logged).await?;
    admin
        .create(
            "apikeys",
            &fixtures::api_key("sk-logged-caller", &["gpt-4o-logged"]),
        )
        .await?;
    wait_standalone_synced(&g.cp).await?;
    let logged_client = g.proxy.with_key(Some("sk-logged-caller"));

    let quiet = chat_body(SEED_ALIAS, "never-logged prompt marker-q1");
    ensure!(g.proxy.chat(&quiet).await?.status == 200);
    let plain = chat_body("gpt-4o-logged", "logged prompt marker-p2");
    ensure!(logged_client.chat(&plain).await?.status == 200);
    let mut streamed = chat_body("gpt-4o-logged", "logged stream marker-s3");
    streamed["stream"] = json!(true);
    ensure!(logged_client.chat(&streamed).await?.status == 200);

    let process = g.cp.process().context("no control plane process")?;
    let payload_lines = aigw_tests::process::poll_until(
        "two payload log lines",
        250,
        std::time::Duration::from_millis(20),
        || {
            let text = process.stdout() + &process.stderr();
            async move {
                let lines: Vec<Value> = text
                    .lines()
                    .filter(|l| l.contains("aigw_data_plane::payload"))
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                Ok((lines.len() >= 2).then_some(lines))
            }
        },
    )
    .await?;
    ensure!(payload_lines.len() == 2, "{payload_lines:?}");
    for (line, body) in payload_lines.iter().zip([&plain, &streamed]) {
        let prompt = line["prompt"].as_str().unwrap_or_default();
        ensure!(
            serde_json::from_str::<Value>(prompt)? == body["messages"],
            "logged prompt {prompt} for {body}"
        );
        ensure!(
            line["completion"] == json!(expected_answer(body)),
            "logged completion {} for {body}",
            line["completion"]
        );
        ensure!(line["model"] == "gpt-4o-logged" && line["request_id"] != "");
    }
    let all = process.stdout() + &process.stderr();
    ensure!(
        !all.contains("marker-q1"),
        "a prompt of a model without log_payloads reached the logs"
    );
    Ok(())
}

/// The access log is buffered (written a moment after the call, many lines
/// per write): every call still gets its line, and a graceful stop writes
/// out what is buffered.
#[tokio::test]
async fn every_call_gets_one_access_line_and_a_stop_flushes_them() -> Result<()> {
    // Long enough that every line is still buffered when the stop comes.
    let Gateway {
        mut cp,
        proxy,
        // Bound, not dropped: the mock serves the calls.
        mock: _mock,
        ..
    } = gateway_with(
        Options::standalone().with_config(json!({"telemetry": {"access_log_flush_ms": 60_000}})),
    )
    .await?;
    // 100 lines stay under the 64 KiB that cut the interval short.
    let ids: Vec<String> = (0..100).map(|i| format!("access-{i:04}")).collect();
    for chunk in ids.chunks(20) {
        let calls = chunk.iter().map(|id| {
            ProxyClient::send(
                proxy
                    .request(http::Method::POST, "/v1/chat/completions")
                    .header("x-request-id", id.as_str())
                    .json(&chat_body(SEED_ALIAS, "hello")),
            )
        });
        for r in futures::future::join_all(calls).await {
            ensure!(r?.status == 200);
        }
    }
    let before_stop = cp.stdout();
    ensure!(
        !before_stop.contains("access-0000"),
        "an access line was written before the interval was out:\n{before_stop}"
    );
    let status = cp
        .process_mut()
        .context("no control plane process")?
        .terminate(200)
        .await?;
    ensure!(status.success(), "aigw exited with {status}");
    let out = cp.stdout();
    let mut logged: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "aigw_data_plane::access")
        .map(|l| l["request_id"].as_str().unwrap_or_default().to_string())
        .filter(|id| id.starts_with("access-"))
        .collect();
    logged.sort();
    ensure!(
        logged == ids,
        "access lines for {} of {} calls",
        logged.len(),
        ids.len()
    );
    Ok(())
}
