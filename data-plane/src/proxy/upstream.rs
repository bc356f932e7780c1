//! The call to Azure OpenAI: URL and credential from the compiled target,
//! the model's deadline, and the answer adapted for an OpenAI client.

use super::request::Call;
use super::{full, sse::SseAdapter, ProxyBody};
use crate::config::{Operation, Route, Upstream, UpstreamAuth};
use crate::credentials::{Bearer, TokenProvider};
use crate::error::{error_chain, Error};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Largest upstream JSON answer we read.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
/// Largest upstream error body we read for its message.
const MAX_ERROR_BODY: usize = 256 * 1024;

static API_KEY: HeaderName = HeaderName::from_static("api-key");
static CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
static SERVED_BY: HeaderName = HeaderName::from_static("x-aigw-served-by");
static TRACE_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// Where one upstream attempt goes: the operation, the model's route and the
/// deployment chosen from it.
pub struct Attempt<'a> {
    pub op: Operation,
    pub route: &'a Arc<Route>,
    pub target: &'a Arc<Upstream>,
    /// The model's deadline for the whole call.
    pub deadline: Instant,
    /// This attempt's client span: its context goes upstream.
    pub trace: &'a super::trace::AttemptSpan,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One pooled client for every upstream: HTTP/1.1 keep-alive, and HTTP/2
/// where the upstream offers it over TLS (ALPN).
#[derive(Clone)]
pub struct UpstreamClient {
    client: HttpsClient,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamClient")
    }
}

impl UpstreamClient {
    /// A client trusting the system roots (or, without any, the bundled web
    /// PKI roots) plus `extra_roots` (DER).
    pub fn new(extra_roots: &[Vec<u8>]) -> Result<Self, Error> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            tracing::warn!("no system CA roots found; using the bundled web PKI roots");
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for der in extra_roots {
            roots
                .add(rustls::pki_types::CertificateDer::from(der.clone()))
                .map_err(|e| Error::Config(format!("ca_pem: {e}")))?;
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(https);
        Ok(Self { client })
    }

    /// Sends `call` to the attempt's deployment and adapts the answer; errors
    /// are mapped to what the caller should see.
    pub async fn call(
        &self,
        attempt: Attempt<'_>,
        inbound: &HeaderMap,
        call: Call,
        request_id: &HeaderValue,
        acct: &mut Option<crate::usage::Accounting>,
    ) -> Result<Response<ProxyBody>, Error> {
        let Attempt {
            op,
            route,
            target,
            deadline: attempt_deadline,
            trace,
        } = attempt;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(target.uri(op).clone())
            .body(Full::new(call.body))
            .map_err(|e| Error::Upstream(format!("building the upstream request: {e}")))?;
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static(if call.stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
        h.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("aigw/", env!("CARGO_PKG_VERSION"))),
        );
        h.insert(CLIENT_REQUEST_ID.clone(), request_id.clone());
        // With tracing on, this attempt's span is Azure's parent (same trace
        // as the caller's); without, the caller's headers go as they came.
        if !trace.inject(h) {
            for name in &TRACE_HEADERS {
                if let Some(v) = inbound.get(name) {
                    h.insert(name.clone(), v.clone());
                }
            }
        }
        // The verified JWT caller, stamped by `auth` (never the caller's own header).
        if let Some(v) = inbound.get(&super::auth::CALLER_OBJECT_ID) {
            h.insert(super::auth::CALLER_OBJECT_ID.clone(), v.clone());
        }
        let entra = match &target.auth {
            UpstreamAuth::ApiKey(key) => {
                h.insert(API_KEY.clone(), key.clone());
                None
            }
            UpstreamAuth::Entra(tokens) => {
                let bearer = tokens
                    .bearer()
                    .await
                    .map_err(|e| e.to_upstream_error(&target.provider_name, tokens.kind()))?;
                req.headers_mut()
                    .insert(header::AUTHORIZATION, bearer.header().clone());
                Some((tokens, bearer))
            }
        };

        let deadline = attempt_deadline;
        let client = target.client.as_ref().unwrap_or(self);
        let sent = send_authenticated(&client.client, req, entra);
        let resp = match tokio::time::timeout_at(deadline, sent).await {
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "Azure deployment `{}` did not answer within {:?}",
                    target.deployment, route.timeout
                )))
            }
            Ok(Err(e)) if e.is_connect() => {
                return Err(Error::UpstreamConnect(format!(
                    "cannot connect to {} for provider key `{}`: {}",
                    target.host,
                    target.provider_name,
                    error_chain(&e)
                )))
            }
            Ok(Err(e)) => {
                return Err(Error::Upstream(format!(
                    "the request to Azure deployment `{}` failed: {}",
                    target.deployment,
                    error_chain(&e)
                )))
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));

        if !status.is_success() {
            let headers = resp.headers().clone();
            let body = read_limited(resp.into_body(), MAX_ERROR_BODY, deadline)
                .await
                .unwrap_or_default();
            return Err(map_error(status, &headers, &body, target));
        }

        let mut out = if call.stream && is_sse {
            let adapter = SseAdapter::new(
                resp.into_body(),
                route.alias.clone(),
                call.caller_wants_usage,
                route.stream_idle_timeout,
                acct.take(),
            );
            let mut r = Response::new(adapter.boxed());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        } else {
            let body = match read_limited(resp.into_body(), MAX_UPSTREAM_BODY, deadline).await {
                Ok(b) => b,
                Err(ReadError::Timeout) => {
                    return Err(Error::Timeout(format!(
                        "Azure deployment `{}` did not finish its answer within {:?}",
                        target.deployment, route.timeout
                    )))
                }
                Err(ReadError::Other(e)) => {
                    return Err(Error::Upstream(format!(
                        "reading the answer of Azure deployment `{}` failed: {e}",
                        target.deployment
                    )))
                }
            };
            if let Some(a) = acct.as_mut() {
                if let Some(m) = response_model(&body) {
                    a.set_response_model(&m);
                }
            }
            let (adapted, usage) = adapt_json(&body, &route.alias).map_err(|e| {
                Error::Upstream(format!(
                    "Azure deployment `{}` returned an unusable body: {e}",
                    target.deployment
                ))
            })?;
            if let Some(a) = acct.as_mut() {
                if let Some((prompt, completion)) = usage {
                    a.set_usage(prompt, completion);
                }
                if a.wants_completion() {
                    a.add_completion_text(&completion_text(&adapted));
                }
            }
            let mut r = Response::new(full(adapted));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        out.headers_mut()
            .insert(SERVED_BY.clone(), target.served_by.clone());
        Ok(out)
    }
}

/// Sends `req`. With an Entra ID token: marks it accepted when Azure takes it,
/// and when Azure answers 401 to a token it accepted before (revoked, or
/// expired in flight), drops it, gets a new one and retries once.
async fn send_authenticated(
    client: &HttpsClient,
    req: Request<Full<Bytes>>,
    entra: Option<(&Arc<TokenProvider>, Bearer)>,
) -> Result<Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
    let Some((tokens, bearer)) = entra else {
        return client.request(req).await;
    };
    let mut again = Request::new(req.body().clone());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.headers_mut() = req.headers().clone();
    let resp = client.request(req).await?;
    let refused = matches!(
        resp.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    );
    if !refused {
        bearer.mark_accepted();
        return Ok(resp);
    }
    if resp.status() != StatusCode::UNAUTHORIZED || !bearer.was_accepted() {
        return Ok(resp);
    }
    tokens.reject(&bearer);
    let Ok(fresh) = tokens.bearer().await else {
        return Ok(resp);
    };
    drop(resp);
    again
        .headers_mut()
        .insert(header::AUTHORIZATION, fresh.header().clone());
    let resp = client.request(again).await?;
    if resp.status() != StatusCode::UNAUTHORIZED && resp.status() != StatusCode::FORBIDDEN {
        fresh.mark_accepted();
    }
    Ok(resp)
}

enum ReadError {
    Timeout,
    Other(String),
}

async fn read_limited<B>(body: B, max: usize, deadline: Instant) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout_at(deadline, Limited::new(body, max).collect()).await {
        Err(_) => Err(ReadError::Timeout),
        Ok(Err(e)) => Err(ReadError::Other(e.to_string())),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Rewrites `model` to the alias and strips Azure's filter annotations;
/// returns the body and the (prompt, completion) tokens Azure reported.
pub fn adapt_json(body: &[u8], alias: &str) -> Result<(Bytes, Option<(u64, u64)>), String> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let obj = v.as_object_mut().ok_or("not a JSON object")?;
    strip_azure_fields(obj);
    obj.insert("model".into(), Value::from(alias));
    let usage = obj.get("usage").and_then(usage_tokens);
    let bytes = serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| e.to_string())?;
    Ok((bytes, usage))
}

/// The generated text of a JSON answer (every choice, in order), for
/// payload logging.
pub fn completion_text(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    v.get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(choice_text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of one choice: `message.content` (chat), `delta.content` (a
/// chat stream's chunk) or `text` (completions).
pub fn choice_text(c: &Value) -> Option<&str> {
    c.pointer("/message/content")
        .or_else(|| c.pointer("/delta/content"))
        .or_else(|| c.get("text"))
        .and_then(Value::as_str)
}

/// The top-level `model` of an Azure JSON answer (the deployment's model
/// version), for `gen_ai.response.model`: one pass that skips everything else.
fn response_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    serde_json::from_slice::<Model>(body).ok()?.model
}

/// (prompt, completion) tokens from an OpenAI `usage` object.
pub fn usage_tokens(usage: &Value) -> Option<(u64, u64)> {
    let prompt = usage.get("prompt_tokens")?.as_u64()?;
    let completion = usage
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some((prompt, completion))
}

/// Removes Azure's content-filter annotations from a response or chunk.
pub fn strip_azure_fields(obj: &mut serde_json::Map<String, Value>) {
    obj.remove("prompt_filter_results");
    obj.remove("prompt_annotations");
    if let Some(Value::Array(choices)) = obj.get_mut("choices") {
        for c in choices.iter_mut().filter_map(Value::as_object_mut) {
            c.remove("content_filter_results");
            c.remove("content_filter_offsets");
        }
    }
}

/// Maps an Azure error answer to what the caller sees.
fn map_error(status: StatusCode, headers: &HeaderMap, body: &[u8], target: &Upstream) -> Error {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let err = parsed.as_ref().and_then(|v| v.get("error"));
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string();
            if text.is_empty() {
                "(empty body)".into()
            } else {
                text
            }
        });
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    match status.as_u16() {
        400 if code == "content_filter" => Error::ContentFilter {
            message,
            details: err
                .and_then(|e| e.pointer("/innererror/content_filter_result"))
                .cloned()
                .unwrap_or(Value::Null),
        },
        401 | 403 => Error::UpstreamAuth(format!(
            "Azure rejected the gateway's credential for provider key `{}` (HTTP {}): {message}",
            target.provider_name,
            status.as_u16()
        )),
        404 => Error::UpstreamRoute(format!(
            "Azure found no deployment `{}` at {} (HTTP 404{}): {message}",
            target.deployment,
            target.host,
            if code.is_empty() {
                String::new()
            } else {
                format!(" {code}")
            }
        )),
        408 | 504 => Error::Timeout(format!(
            "Azure deployment `{}` timed out (HTTP {}): {message}",
            target.deployment,
            status.as_u16()
        )),
        429 => Error::UpstreamRateLimited {
            message,
            retry_after: retry_after(headers),
            wait: retry_wait(headers),
        },
        s if s >= 500 => Error::Upstream(format!(
            "Azure deployment `{}` failed (HTTP {s}): {message}",
            target.deployment
        )),
        _ => Error::InvalidRequest {
            message,
            param: None,
            code: None,
        },
    }
}

/// How long Azure asks us to wait: `retry-after-ms`, else `retry-after` seconds.
pub fn retry_wait(headers: &HeaderMap) -> Option<Duration> {
    let num = |name: &str| -> Option<f64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
    num("retry-after-ms")
        .map(|ms| Duration::from_millis(ms as u64))
        .or_else(|| num("retry-after").map(Duration::from_secs_f64))
}

/// `retry-after` as Azure sent it, or whole seconds from `retry-after-ms`.
pub fn retry_after(headers: &HeaderMap) -> Option<HeaderValue> {
    if let Some(v) = headers.get(header::RETRY_AFTER) {
        return Some(v.clone());
    }
    let ms: u64 = headers
        .get("retry-after-ms")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(HeaderValue::from(crate::error::retry_after_secs(
        std::time::Duration::from_millis(ms),
    )))
}
