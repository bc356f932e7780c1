//! The pipeline in-process: a snapshot compiled in code, a fake Azure on
//! 127.0.0.1:0 (a hyper server in the test), and `Proxy::serve` driven
//! directly — no binaries, no NATS.

use super::*;
use crate::node::{Node, Services};
use crate::usage::UsageEvent;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use tokio::sync::mpsc;

const KEY: &str = "sk-test-caller";
const LIMITED_KEY: &str = "sk-only-other";

/// One request the fake Azure received.
#[derive(Debug, Clone)]
struct Seen {
    deployment: String,
    path_and_query: String,
    api_key: Option<String>,
    body: Value,
}

/// What the fake answers: status, extra headers, content type, body.
type Answer = (u16, Vec<(&'static str, &'static str)>, &'static str, String);
type Script = Arc<dyn Fn(&str, &Value) -> Answer + Send + Sync>;

struct FakeAzure {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeAzure {
    async fn start(script: Script) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (script, log) = (script.clone(), log.clone());
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (script, log) = (script.clone(), log.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let path = parts.uri.path().to_string();
                        let deployment = path
                            .strip_prefix("/openai/deployments/")
                            .and_then(|p| p.split('/').next())
                            .unwrap_or_default()
                            .to_string();
                        log.lock().unwrap().push(Seen {
                            deployment: deployment.clone(),
                            path_and_query: parts.uri.to_string(),
                            api_key: parts
                                .headers
                                .get("api-key")
                                .map(|v| v.to_str().unwrap().to_string()),
                            body: body.clone(),
                        });
                        let (status, headers, ctype, text) = script(&deployment, &body);
                        let mut resp = Response::new(Full::new(Bytes::from(text)));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        resp.headers_mut()
                            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
                        for (k, v) in headers {
                            resp.headers_mut().insert(k, HeaderValue::from_static(v));
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { base, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A proxy over a snapshot whose model `gpt` has two targets in priority
/// order (`dep-a`, then `dep-b`) on the fake Azure.
struct Harness {
    proxy: Proxy,
    azure: FakeAzure,
    usage: mpsc::Receiver<UsageEvent>,
}

impl Harness {
    async fn start(script: Script) -> Self {
        let azure = FakeAzure::start(script).await;
        let hash = |k: &str| hex::encode(Sha256::digest(k.as_bytes()));
        let snapshot = serde_json::from_value(json!({
            "format": aigw_shared::snapshot::SNAPSHOT_FORMAT,
            "version": 1,
            "provider_keys": {"pk": {
                "display_name": "fake-azure",
                "adapter": "azure-openai",
                "api_base": azure.base,
                "allow_insecure_upstream": true,
                "api_version": "2024-10-21",
                "credential": {"kind": "api_key", "key": "upstream-secret"},
            }},
            "models": {
                "m-gpt": {"display_name": "gpt", "targets": [
                    {"provider_key_id": "pk", "model_name": "dep-a", "priority": 0},
                    {"provider_key_id": "pk", "model_name": "dep-b", "priority": 1},
                ], "routing": {"retries": 1, "retry_backoff": "1ms", "cooldown": "1s"}},
                "m-other": {"display_name": "other", "provider_key_id": "pk", "model_name": "dep-b"},
                "m-cached": {"display_name": "cached", "provider_key_id": "pk", "model_name": "dep-c",
                             "cache": {"enabled": true}},
            },
            "api_keys": {
                "key-1": {"key_hash": hash(KEY), "allowed_models": ["*"]},
                "key-2": {"key_hash": hash(LIMITED_KEY), "allowed_models": ["other"]},
            },
        }))
        .unwrap();
        let metrics: Arc<crate::metrics::Metrics> = Arc::default();
        let node = Node {
            installed: Default::default(),
            services: Arc::new(Services::new(metrics.clone()).unwrap()),
            config: Arc::default(),
        };
        node.install(snapshot).unwrap();
        let (tx, usage) = mpsc::channel(64);
        let recorder = UsageRecorder::new(tx, "node-test", metrics);
        let proxy = Proxy::new(node.config, node.services, 1 << 20, recorder);
        Self {
            proxy,
            azure,
            usage,
        }
    }

    async fn call(&self, key: Option<&str>, body: Value) -> (Response<ProxyBody>, String) {
        self.call_at("/v1/chat/completions", key, body).await
    }

    /// A POST to `path` with `key` as a bearer.
    async fn call_at(
        &self,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (Response<ProxyBody>, String) {
        let mut req = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        if let Some(k) = key {
            req.headers_mut().insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {k}")).unwrap(),
            );
        }
        let resp = self.proxy.serve(req).await;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            Response::from_parts(parts, full(Bytes::new())),
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    /// The one usage event recorded so far.
    fn event(&mut self) -> UsageEvent {
        let e = self.usage.try_recv().expect("a usage event");
        assert!(self.usage.try_recv().is_err(), "exactly one event per call");
        e
    }
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

const ANSWER: &str = r#"{"id":"c1","object":"chat.completion","created":1,"model":"gpt-4o-2024-08-06","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}],"choices":[{"index":0,"message":{"role":"assistant","content":"Hi!"},"finish_reason":"stop","content_filter_results":{"hate":{"filtered":false}}}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12},"system_fingerprint":"fp_1"}"#;

fn answers_ok() -> Script {
    Arc::new(|_, _| (200, vec![], "application/json", ANSWER.to_string()))
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn no_key_is_401_and_unaccounted() {
    let mut h = Harness::start(answers_ok()).await;
    let (resp, body) = h.call(None, chat("gpt")).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(error_code(&body), "invalid_api_key");
    assert!(resp.headers().contains_key("x-request-id"));
    let (resp, _) = h.call(Some("sk-wrong"), chat("gpt")).await;
    assert_eq!(resp.status(), 401);
    assert!(h.usage.try_recv().is_err(), "no caller, no usage event");
    assert!(h.azure.seen().is_empty());
}

#[tokio::test]
async fn unknown_alias_is_404_and_accounted() {
    let mut h = Harness::start(answers_ok()).await;
    let (resp, body) = h.call(Some(KEY), chat("nope")).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(&body), "model_not_found");
    let e = h.event();
    assert_eq!((e.status, e.api_key_id.as_str()), (404, "key-1"));
    assert!(h.azure.seen().is_empty());
}

#[tokio::test]
async fn alias_off_the_allowlist_is_403() {
    let mut h = Harness::start(answers_ok()).await;
    let (resp, body) = h.call(Some(LIMITED_KEY), chat("gpt")).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(error_code(&body), "permission_denied");
    assert_eq!(h.event().status, 403);
    assert!(h.azure.seen().is_empty());
}

#[tokio::test]
async fn json_answer_is_rewritten_and_usage_recorded() {
    let mut h = Harness::start(answers_ok()).await;
    let (resp, body) = h.call(Some(KEY), chat("gpt")).await;
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(resp.headers()["x-aigw-served-by"], "fake-azure/dep-a");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"], "gpt", "model is the alias");
    assert!(!body.contains("content_filter"), "{body}");
    assert!(!body.contains("prompt_filter_results"), "{body}");
    assert_eq!(v["choices"][0]["message"]["content"], "Hi!");
    assert_eq!(v["system_fingerprint"], "fp_1", "other fields kept");
    assert!(
        body.find("\"id\"") < body.find("\"system_fingerprint\""),
        "order kept: {body}"
    );

    let seen = h.azure.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].path_and_query,
        "/openai/deployments/dep-a/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(seen[0].api_key.as_deref(), Some("upstream-secret"));
    assert_eq!(
        seen[0].body,
        chat("gpt"),
        "a JSON call goes as the caller sent it"
    );

    let e = h.event();
    assert_eq!(
        (e.status, e.model.as_str(), e.deployment.as_str()),
        (200, "gpt", "dep-a")
    );
    assert_eq!(
        (e.prompt_tokens, e.completion_tokens, e.total_tokens),
        (9, 3, 12)
    );
    assert!(!e.estimated);
}

const STREAM: &str = concat!(
    "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n",
    "data: {\"choices\":[{\"content_filter_results\":{},\"delta\":{\"content\":\"Hel\",\"role\":\"assistant\"},\"finish_reason\":null,\"index\":0}],\"created\":1,\"id\":\"c1\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"usage\":null}\n\n",
    "data: {\"choices\":[{\"content_filter_results\":{},\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\",\"index\":0}],\"created\":1,\"id\":\"c1\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"usage\":null}\n\n",
    "data: {\"choices\":[],\"created\":1,\"id\":\"c1\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":5,\"total_tokens\":7}}\n\n",
    "data: [DONE]\n\n",
);

#[tokio::test]
async fn a_stream_is_adapted_and_accounted_at_its_end() {
    let mut h = Harness::start(Arc::new(|_, _| {
        (200, vec![], "text/event-stream", STREAM.to_string())
    }))
    .await;
    let mut req = chat("gpt");
    req["stream"] = json!(true);
    let (resp, body) = h.call(Some(KEY), req).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "two content chunks and [DONE]: {body}");
    assert!(events[0].contains("\"content\":\"Hel\"") && events[0].contains("\"model\":\"gpt\""));
    assert!(
        !body.contains("content_filter") && !body.contains("usage"),
        "{body}"
    );
    assert_eq!(events[2], "data: [DONE]");

    let seen = h.azure.seen();
    assert_eq!(
        seen[0].body["stream_options"]["include_usage"], true,
        "Azure is asked for usage"
    );

    let e = h.event();
    assert_eq!((e.status, e.stream), (200, true));
    assert_eq!(
        (e.prompt_tokens, e.completion_tokens),
        (5, 2),
        "from the usage chunk"
    );
}

#[tokio::test]
async fn a_dropped_stream_is_a_499() {
    let mut h = Harness::start(Arc::new(|_, _| {
        (200, vec![], "text/event-stream", STREAM.to_string())
    }))
    .await;
    let mut body = chat("gpt");
    body["stream"] = json!(true);
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = h.proxy.serve(req).await;
    assert_eq!(resp.status(), 200);
    assert!(
        h.usage.try_recv().is_err(),
        "a stream is accounted at its end"
    );
    drop(resp);
    let e = h.event();
    assert_eq!(
        (e.status, e.error_code.as_str()),
        (499, "client_closed_request")
    );
}

#[tokio::test]
async fn a_429_moves_on_to_the_next_target_which_rests_for_its_retry_after() {
    let mut h = Harness::start(Arc::new(|deployment, _| {
        if deployment == "dep-a" {
            let busy = r#"{"error":{"code":"429","message":"busy"}}"#.to_string();
            (
                429,
                vec![("retry-after-ms", "60000")],
                "application/json",
                busy,
            )
        } else {
            (200, vec![], "application/json", ANSWER.to_string())
        }
    }))
    .await;
    let (resp, body) = h.call(Some(KEY), chat("gpt")).await;
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(resp.headers()["x-aigw-served-by"], "fake-azure/dep-b");
    let tried: Vec<String> = h.azure.seen().into_iter().map(|s| s.deployment).collect();
    assert_eq!(tried, ["dep-a", "dep-b"]);
    assert_eq!(h.event().deployment, "dep-b");

    // dep-a asked for a minute's rest (the route's own cooldown is 1s): the
    // next call goes straight to dep-b.
    let (resp, _) = h.call(Some(KEY), chat("gpt")).await;
    assert_eq!(resp.status(), 200);
    let tried: Vec<String> = h.azure.seen().into_iter().map(|s| s.deployment).collect();
    assert_eq!(tried, ["dep-a", "dep-b", "dep-b"]);
    assert_eq!(h.event().status, 200);
}

#[tokio::test]
async fn wrong_method_and_unknown_path_come_from_the_operation_table() {
    let h = Harness::start(answers_ok()).await;
    let req = Request::get("/v1/chat/completions")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.proxy.serve(req).await.status(), 405);
    let req = Request::post("/v1/nothing")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.proxy.serve(req).await.status(), 404);
    let req = Request::get("/v1/models")
        .header(header::AUTHORIZATION, format!("Bearer {LIMITED_KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h.proxy.serve(req).await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["data"].as_array().map(Vec::len),
        Some(1),
        "only `other`: {v}"
    );
}

#[tokio::test]
async fn azure_shaped_answers_are_cached_apart_and_replayed_with_their_annotations() {
    let h = Harness::start(answers_ok()).await;
    let azure_path = "/openai/deployments/cached/chat/completions?api-version=2024-10-21";
    let body = json!({"messages": [{"role": "user", "content": "hello"}], "temperature": 0});
    for want in ["miss", "hit"] {
        let (resp, text) = h.call_at(azure_path, Some(KEY), body.clone()).await;
        assert_eq!(resp.status(), 200, "{text}");
        assert_eq!(resp.headers()["x-aigw-cache"], want);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["model"], "gpt-4o-2024-08-06", "{want}: {text}");
        assert!(v["prompt_filter_results"].is_array(), "{want}: {text}");
    }
    // A hit replayed as a stream keeps Azure's shape.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (resp, text) = h.call_at(azure_path, Some(KEY), streamed).await;
    assert_eq!(resp.headers()["x-aigw-cache"], "hit");
    assert!(text.starts_with("data: {\"choices\":[]"), "{text}");
    assert!(
        text.contains("\"content_filter_results\":{\"hate\""),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The same request on /v1 does not get the Azure-shaped entry.
    let mut v1 = body.clone();
    v1["model"] = json!("cached");
    let (resp, text) = h.call(Some(KEY), v1).await;
    assert_eq!(resp.headers()["x-aigw-cache"], "miss");
    assert!(!text.contains("filter_results"), "{text}");
    assert_eq!(h.azure.seen().len(), 2);
}

#[tokio::test]
async fn azure_shaped_errors_use_azures_envelope() {
    let mut h = Harness::start(answers_ok()).await;
    let path = "/openai/deployments/gpt/chat/completions?api-version=1";
    let azure_error = |text: &str| -> (String, usize) {
        let v: Value = serde_json::from_str(text).unwrap();
        let e = v["error"].as_object().unwrap();
        (e["code"].as_str().unwrap().to_string(), e.len())
    };
    let (resp, text) = h.call_at(path, Some("sk-wrong"), json!({})).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(azure_error(&text), ("401".to_string(), 2), "{text}");
    let body = json!({"messages": [{"role": "user", "content": "x"}]});
    let (resp, text) = h.call_at(path, Some(LIMITED_KEY), body.clone()).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(azure_error(&text), ("PermissionDenied".to_string(), 2));
    assert_eq!(
        h.event().model,
        "",
        "refused before the alias was authorised"
    );
    let (resp, text) = h
        .call_at("/openai/deployments/gpt/chat/completions", Some(KEY), body)
        .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        text,
        r#"{"error":{"code":"404","message":"Resource not found"}}"#
    );
    assert!(
        h.usage.try_recv().is_err(),
        "an unrouted call is not accounted"
    );
    assert!(h.azure.seen().is_empty());
}
