//! Observability end to end: a standalone gateway exports its spans over
//! OTLP/gRPC to a real receiver (`aigw_tests::otlp_receiver`), and its
//! `/metrics` pages parse as Prometheus text with counters that move.
//!
//! Traces: a streamed call and a retried call (first target answers 500),
//! each sent with the caller's own `traceparent`: the server span
//! `chat {alias}` keeps the caller's trace id and parent, carries the GenAI
//! attributes, has one child span per upstream attempt, and Azure receives
//! the attempt span as its parent. The streamed call's span ends with the
//! stream, after the last (slow) chunk.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{chat_body, wait_standalone_synced, ProxyClient};
use aigw_tests::fixtures::{api_key, mock_provider_key};
use aigw_tests::mock_azure::{Behaviour, MockAzure};
use aigw_tests::otlp_receiver::{OtlpReceiver, Span};
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

const CALLER: &str = "sk-otel-caller";
const MODEL: &str = "gpt-4o-mini-2024-07-18";
const CHUNK_DELAY: Duration = Duration::from_millis(150);

struct Setup {
    mock: MockAzure,
    cp: ControlPlane,
    client: ProxyClient,
}

/// Aliases: `streamy` → `west`; `retry` → `east` (priority 0, answers 500)
/// then `west` (priority 1).
async fn setup(otlp_endpoint: Option<String>) -> Result<Setup> {
    let mock = MockAzure::start().await;
    for d in ["east", "west"] {
        mock.add_deployment(d, MODEL);
    }
    mock.set_behaviour(
        "east",
        Behaviour::Fail {
            status: 500,
            body: r#"{"error":{"code":"500","message":"down"}}"#.into(),
        },
    );
    let mut opts = Options::standalone()
        // Export promptly: the test waits on the receiver, not on a timer.
        .with_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    if let Some(e) = otlp_endpoint {
        opts = opts.with_config(json!({"telemetry": {"otlp_endpoint": e, "sample_ratio": 1.0}}));
    }
    let cp = ControlPlane::start_with(opts).await?;
    let admin = cp.rest();
    let pk = mock_provider_key(&admin, &mock).await?;
    admin
        .create(
            "models",
            &json!({"display_name": "streamy", "targets": [{"provider_key_id": pk, "model_name": "west"}]}),
        )
        .await?;
    admin
        .create(
            "models",
            &json!({
                "display_name": "retry",
                "targets": [
                    {"provider_key_id": pk, "model_name": "east", "priority": 0},
                    {"provider_key_id": pk, "model_name": "west", "priority": 1}
                ],
                "routing": {"retries": 1, "retry_backoff": "1ms"}
            }),
        )
        .await?;
    admin
        .create("apikeys", &api_key(CALLER, &["streamy", "retry"]))
        .await?;
    wait_standalone_synced(&cp).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    Ok(Setup { mock, cp, client })
}

fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

fn server_span<'a>(spans: &'a [Span], trace_id: &str, name: &str) -> Option<&'a Span> {
    spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.name == name && s.kind == 2)
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    let mut v: Vec<_> = spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id && s.name == "upstream_attempt")
        .collect();
    v.sort_by_key(|s| s.attr("attempt").map(str::to_string));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_and_retried_calls_are_traced_with_genai_attributes() -> Result<()> {
    let otlp = OtlpReceiver::start().await;
    let s = setup(Some(otlp.endpoint())).await?;
    s.mock.set_behaviour(
        "west",
        Behaviour::SlowStream {
            chunk_delay: CHUNK_DELAY,
        },
    );

    // A streamed call, continuing the caller's trace.
    let (trace_a, parent_a) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut body = chat_body("streamy", "tell me a story");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(64);
    let r = ProxyClient::send(
        s.client
            .request(Method::POST, "/v1/chat/completions")
            .header("traceparent", traceparent(trace_a, parent_a))
            .json(&body),
    )
    .await?;
    ensure!(r.status.as_u16() == 200, "stream: {} {}", r.status, r.text);
    ensure!(r.text.contains("data: [DONE]"), "{}", r.text);
    let upstream_tp = s
        .mock
        .last_request("west")
        .context("west saw no request")?
        .header("traceparent")
        .map(str::to_string)
        .context("no traceparent upstream")?;

    // A retried call: east answers 500, west answers.
    let (trace_b, parent_b) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let r = ProxyClient::send(
        s.client
            .request(Method::POST, "/v1/chat/completions")
            .header("traceparent", traceparent(trace_b, parent_b))
            .json(&chat_body("retry", "hello")),
    )
    .await?;
    ensure!(r.status.as_u16() == 200, "retry: {} {}", r.status, r.text);
    ensure!(s.mock.requests("east") == 1, "east was tried once");

    // A call to no route: refused before any accounting, still one span.
    let (trace_c, parent_c) = ("5c3b0e4e6a7d4f2b9a8c7d6e5f4a3b2c", "1a2b3c4d5e6f7081");
    let r = ProxyClient::send(
        s.client
            .request(Method::POST, "/v1/nowhere")
            .header("traceparent", traceparent(trace_c, parent_c))
            .json(&json!({})),
    )
    .await?;
    ensure!(
        r.status.as_u16() == 404,
        "no route: {} {}",
        r.status,
        r.text
    );

    let spans = otlp
        .wait_until(Duration::from_secs(30), |spans| {
            [(trace_a, "chat streamy", 1), (trace_b, "chat retry", 2)]
                .iter()
                .all(|(t, name, attempts)| {
                    server_span(spans, t, name)
                        .is_some_and(|p| children(spans, p).len() == *attempts)
                })
                && server_span(spans, trace_c, "http").is_some()
        })
        .await;
    let dump = || format!("{spans:#?}");

    // The streamed call.
    let server = server_span(&spans, trace_a, "chat streamy").with_context(dump)?;
    assert_eq!(server.service, "aigw-control-plane");
    assert!(
        server.resource.contains_key("aigw.node.id"),
        "{:?}",
        server.resource
    );
    assert_eq!(
        server.parent_span_id, parent_a,
        "the caller's span is the parent"
    );
    assert_eq!(server.flags, 0x301, "sampled, with a remote parent");
    for (k, v) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "streamy"),
        ("gen_ai.response.model", MODEL),
        ("gen_ai.request.max_tokens", "64"),
        ("http.response.status_code", "200"),
        ("aigw.stream", "true"),
    ] {
        assert_eq!(server.attr(k), Some(v), "{k}: {server:#?}");
    }
    for k in ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"] {
        let n: u64 = server
            .attr(k)
            .with_context(|| format!("{k}: {server:#?}"))?
            .parse()?;
        assert!(n > 0, "{k} = {n}");
    }
    assert!(
        server.attr("server.address").is_some_and(|a| !a.is_empty()),
        "{server:#?}"
    );
    assert!(
        server.attr("api_key_id").is_some_and(|a| !a.is_empty()),
        "{server:#?}"
    );
    assert!(
        !server.attributes.values().any(|v| v.contains(CALLER)),
        "the key itself is never an attribute"
    );
    let attempts = children(&spans, server);
    assert_eq!(attempts.len(), 1, "{}", dump());
    let attempt = attempts[0];
    assert_eq!(attempt.trace_id, trace_a);
    assert_eq!(attempt.kind, 3, "client span");
    assert_eq!(attempt.flags, 0x101, "sampled, with a local parent");
    assert_eq!(attempt.attr("deployment"), Some("west"));
    assert_eq!(
        upstream_tp,
        traceparent(trace_a, &attempt.span_id),
        "Azure gets the caller's trace with the attempt span as parent"
    );
    // The server span ends with the stream, after the slow chunks; the
    // attempt ends when Azure's headers arrive.
    ensure!(
        server.end_ns >= attempt.end_ns + CHUNK_DELAY.as_nanos() as u64,
        "server span ended {} ns after the attempt",
        server.end_ns as i128 - attempt.end_ns as i128
    );

    // The retried call.
    let server = server_span(&spans, trace_b, "chat retry").with_context(dump)?;
    assert_eq!(server.parent_span_id, parent_b);
    assert_eq!(server.attr("gen_ai.request.model"), Some("retry"));
    assert_eq!(server.attr("http.response.status_code"), Some("200"));
    let attempts = children(&spans, server);
    assert_eq!(attempts.len(), 2, "{}", dump());
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(
        (first.attr("attempt"), first.attr("deployment")),
        (Some("0"), Some("east"))
    );
    assert_eq!(
        first.status, 2,
        "the failed attempt is an error: {first:#?}"
    );
    assert!(first.attr("retry_reason").is_some(), "{first:#?}");
    assert!(first.attr("error.type").is_some(), "{first:#?}");
    assert_eq!(
        (second.attr("attempt"), second.attr("deployment")),
        (Some("1"), Some("west"))
    );
    assert_ne!(second.status, 2, "{second:#?}");
    assert_eq!(second.attr("outcome"), None, "a success says nothing more");
    assert_eq!(second.attr("server.address"), first.attr("server.address"));
    assert!(first.attr("server.address").is_some(), "{first:#?}");
    assert!(second.start_ns >= first.end_ns, "attempts are sequential");
    for a in [first, second] {
        assert_eq!(a.trace_id, trace_b, "the caller's trace id is kept");
    }

    // The refused call: what was asked for, and how it ended.
    let refused = server_span(&spans, trace_c, "http").with_context(dump)?;
    assert_eq!(refused.parent_span_id, parent_c);
    assert_eq!(refused.attr("url.path"), Some("/v1/nowhere"));
    assert_eq!(refused.attr("http.request.method"), Some("POST"));
    assert_eq!(refused.attr("http.response.status_code"), Some("404"));
    assert!(refused.attr("error.type").is_some(), "{refused:#?}");
    assert!(children(&spans, refused).is_empty());

    // Control-plane spans: the admin mutations above.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "create" && s.attr("resource") == Some("models")),
        "no admin mutation span: {}",
        dump()
    );
    drop(s.cp);
    Ok(())
}

use aigw_tests::metrics::{scrape, sum as value};

async fn get(url: &str) -> Result<String> {
    let r = reqwest::get(url).await?;
    ensure!(r.status().is_success(), "{url}: {}", r.status());
    Ok(r.text().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_as_prometheus_text_and_counters_move() -> Result<()> {
    let s = setup(None).await?;
    let dp_metrics = format!("{}/metrics", s.cp.data_plane_metrics_url());
    let cp_metrics = format!("{}/metrics", s.cp.admin_url());
    let before = scrape(&get(&dp_metrics).await?)?;
    let cp_before = scrape(&get(&cp_metrics).await?)?;

    for _ in 0..3 {
        let r = s.client.chat(&chat_body("retry", "hello")).await?;
        ensure!(r.status.as_u16() == 200, "{} {}", r.status, r.text);
    }
    let r = s.client.chat(&chat_body("streamy", "hi")).await?;
    ensure!(r.status.as_u16() == 200, "{} {}", r.status, r.text);
    s.cp.rest()
        .create("apikeys", &api_key("sk-otel-other", &["streamy"]))
        .await?;

    let after = scrape(&get(&dp_metrics).await?)?;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(
        delta(
            "aigw_model_requests_total",
            &[("model", "retry"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            "aigw_model_requests_total",
            &[("model", "streamy"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(delta("aigw_retries_total", &[("model", "retry")]), 3.0);
    assert_eq!(delta("aigw_requests_total", &[("status", "200")]), 4.0);
    assert!(delta("aigw_input_tokens_total", &[("model", "retry")]) > 0.0);
    assert!(delta("aigw_output_tokens_total", &[("model", "streamy")]) > 0.0);
    // Histograms: the parser folds buckets into one sample per series.
    let count = |sc: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| -> f64 {
        sc.samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(
        count(
            &after,
            "aigw_request_duration_seconds",
            &[("model", "retry"), ("status", "200")]
        ) - count(
            &before,
            "aigw_request_duration_seconds",
            &[("model", "retry"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        count(
            &after,
            "aigw_upstream_duration_seconds",
            &[("deployment", "east"), ("outcome", "failure")]
        ) - count(
            &before,
            "aigw_upstream_duration_seconds",
            &[("deployment", "east"), ("outcome", "failure")]
        ),
        3.0
    );

    let cp_after = scrape(&get(&cp_metrics).await?)?;
    let cp_delta = |name: &str, labels: &[(&str, &str)]| {
        value(&cp_after, name, labels) - value(&cp_before, name, labels)
    };
    assert_eq!(
        cp_delta("aigw_cp_admin_mutations_total", &[("resource", "apikeys")]),
        1.0
    );
    assert!(value(&cp_after, "aigw_cp_snapshot_version", &[]) > 0.0);
    Ok(())
}
