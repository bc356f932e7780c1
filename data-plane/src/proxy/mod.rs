//! The OpenAI-compatible proxy.
//!
//! Request pipeline, in the order every call goes through it
//! (`Proxy::serve` → `Proxy::dispatch`):
//!
//! 1. **request id** — reuse the caller's `x-request-id` or mint one; it is on
//!    every response, errors included.
//! 2. **route** — method and path select the operation (`/v1/chat/completions`,
//!    `/v1/completions`, `/v1/embeddings`, `GET /v1/models`).
//! 3. **config** — one lock-free load of the current snapshot; none yet → 503.
//! 4. **authenticate** (`auth`) — sha256 of the presented key → api key;
//!    unknown, disabled or expired → 401.
//! 5. **read** (`request`) — content type, body limit (413), JSON, required
//!    fields; for streams ask Azure for `stream_options.include_usage`.
//! 6. **authorise** — the alias must exist (404) and be on the key's allowlist (403).
//! 7. **pick a target** (`crate::routing`) — the first priority group with a
//!    healthy target; weighted, round-robin or least-latency inside it.
//! 8. **call Azure** (`upstream`) — URL, credential, deadline; Azure errors
//!    mapped; retryable failures go back to step 7 for another target.
//! 9. **adapt** — `model` → alias, filter fields stripped; streams pass through
//!    `sse::SseAdapter` chunk by chunk.
//!
//! Errors from any step become the OpenAI envelope in `edge`.

mod auth;
mod edge;
mod request;
mod sse;
mod upstream;

use crate::usage::{Accounting, UsageRecorder};

pub use upstream::UpstreamClient;

use crate::config::Route;
use crate::config::{ConfigHandle, Operation};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::routing::{self, Outcome};
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{instrument, Instrument};

/// Longest wait between two attempts of one call.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What an attempt's error says about the target's health; `None` when it
/// says nothing (e.g. our own credential was refused).
fn classify(e: &Error, latency: Duration) -> Option<Outcome> {
    match e {
        Error::UpstreamRateLimited { wait, .. } => Some(Outcome::RateLimited(*wait)),
        Error::Upstream(_) | Error::UpstreamConnect(_) | Error::Timeout(_) => {
            Some(Outcome::Failure)
        }
        // The target answered properly; the request was the problem.
        Error::ContentFilter { .. } | Error::InvalidRequest { .. } => {
            Some(Outcome::Success(latency))
        }
        _ => None,
    }
}

/// Errors worth another target: connect errors, timeouts, 408/429/5xx.
fn retryable(e: &Error) -> bool {
    matches!(
        e,
        Error::UpstreamRateLimited { .. }
            | Error::Upstream(_)
            | Error::UpstreamConnect(_)
            | Error::Timeout(_)
    )
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub struct Proxy {
    config: Arc<ConfigHandle>,
    upstream: UpstreamClient,
    max_body: usize,
    metrics: Arc<Metrics>,
    usage: Arc<UsageRecorder>,
}

impl Proxy {
    pub fn new(
        config: Arc<ConfigHandle>,
        upstream: UpstreamClient,
        max_body: usize,
        metrics: Arc<Metrics>,
        usage: Arc<UsageRecorder>,
    ) -> Self {
        Self {
            config,
            upstream,
            max_body,
            metrics,
            usage,
        }
    }

    #[instrument(skip_all, fields(request_id, method = %req.method(), path = %req.uri().path(), status))]
    pub async fn serve<B>(&self, req: Request<B>) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let request_id = request_id(req.headers());
        if let Ok(id) = request_id.to_str() {
            tracing::Span::current().record("request_id", id);
        }
        // Set once the caller is known; a stream takes it along to account at its end.
        let mut acct: Option<Accounting> = None;
        let (mut resp, code) = match self.dispatch(req, &request_id, &mut acct).await {
            Ok(r) => (r, None),
            Err(e) => {
                let code = e.code();
                (e.into_response(), code)
            }
        };
        if let Some(a) = acct {
            a.finish(resp.status().as_u16(), code);
        }
        tracing::Span::current().record("status", resp.status().as_u16());
        self.metrics.record_status(resp.status().as_u16());
        resp.headers_mut().insert(REQUEST_ID.clone(), request_id);
        resp
    }

    async fn dispatch<B>(
        &self,
        req: Request<B>,
        request_id: &HeaderValue,
        slot: &mut Option<Accounting>,
    ) -> Result<Response<ProxyBody>, Error>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let op = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/chat/completions") => Operation::ChatCompletions,
            (&Method::POST, "/v1/completions") => Operation::Completions,
            (&Method::POST, "/v1/embeddings") => Operation::Embeddings,
            (&Method::GET, "/v1/models") => return self.list_models(req.headers()),
            (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models") => {
                return Err(Error::MethodNotAllowed)
            }
            (_, path) => return Err(Error::RouteNotFound(path.to_string())),
        };
        let runtime = self.config.load().ok_or(Error::NotReady)?;
        let caller = auth::authenticate(&runtime, req.headers())?.clone();
        let acct = slot.insert(self.usage.begin(&caller.id, op.name()));
        if caller.budget_exceeded {
            return Err(Error::BudgetExceeded);
        }
        let (parts, body) = req.into_parts();
        let call = request::read(op, &parts.headers, body, self.max_body).await?;
        acct.set_stream(call.stream);
        acct.set_prompt_chars(call.prompt_chars);
        let route = runtime
            .route(&call.alias)
            .ok_or_else(|| Error::ModelNotFound(call.alias.clone()))?
            .clone();
        if !caller.allows(&call.alias) {
            return Err(Error::PermissionDenied(call.alias));
        }
        acct.set_route(&route.alias, "", "");
        drop(runtime);
        self.forward(op, &route, &parts.headers, call, request_id, slot)
            .await
    }

    /// Steps 7–8: attempts until one answers, within the model's deadline.
    /// Each attempt picks a healthy target not tried yet in this call (see
    /// `routing`); connect errors, timeouts, 429 and 5xx move on to the next
    /// after a capped, jittered backoff. A response that reached the caller
    /// (a stream's first byte included) is never retried.
    async fn forward(
        &self,
        op: Operation,
        route: &Arc<Route>,
        inbound: &http::HeaderMap,
        call: request::Call,
        request_id: &HeaderValue,
        slot: &mut Option<Accounting>,
    ) -> Result<Response<ProxyBody>, Error> {
        let deadline = Instant::now() + route.timeout;
        let mut tried: Vec<usize> = Vec::with_capacity(route.targets.len());
        let mut last: Option<Error> = None;
        for attempt in 0..=route.retries {
            let choice = match routing::pick(route, &tried, routing::now_ms()) {
                Ok(c) => c,
                Err(u) => {
                    return Err(last.unwrap_or(Error::AllTargetsUnavailable {
                        retry_after: u.retry_after,
                    }))
                }
            };
            tried.push(choice.index);
            let target = &route.targets[choice.index];
            if let Some(a) = slot.as_mut() {
                a.set_route(&route.alias, &target.deployment, &target.provider_key_id);
            }
            let span = tracing::info_span!(
                "upstream_attempt",
                attempt,
                deployment = %target.deployment,
                probe = choice.probe,
                outcome = tracing::field::Empty,
            );
            target.health.start();
            let started = Instant::now();
            let result = self
                .upstream
                .call(
                    upstream::Attempt {
                        op,
                        route,
                        target,
                        deadline,
                    },
                    inbound,
                    call.clone(),
                    request_id,
                    slot,
                )
                .instrument(span.clone())
                .await;
            let outcome = match &result {
                Ok(_) => Some(Outcome::Success(started.elapsed())),
                Err(e) => classify(e, started.elapsed()),
            };
            span.record("outcome", tracing::field::debug(&outcome));
            match outcome {
                Some(o) => target.health.record(o, routing::now_ms(), route.cooldown),
                None => target.health.abandon(),
            }
            let err = match result {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if !retryable(&err) || attempt == route.retries {
                return Err(err);
            }
            let backoff = route
                .retry_backoff
                .saturating_mul(1 << attempt.min(6))
                .min(MAX_BACKOFF)
                .mul_f64(rand::random::<f64>() * 0.5 + 0.5);
            if Instant::now() + backoff >= deadline {
                return Err(err);
            }
            tokio::time::sleep(backoff).await;
            last = Some(err);
        }
        Err(last.unwrap_or(Error::AllTargetsUnavailable {
            retry_after: route.cooldown,
        }))
    }

    /// `GET /v1/models`: the aliases this caller may use.
    fn list_models(&self, headers: &http::HeaderMap) -> Result<Response<ProxyBody>, Error> {
        let runtime = self.config.load().ok_or(Error::NotReady)?;
        let caller = auth::authenticate(&runtime, headers)?;
        let data: Vec<_> = runtime
            .aliases()
            .iter()
            .filter(|a| caller.allows(a))
            .map(|a| json!({"id": a, "object": "model", "created": 0, "owned_by": "aigw"}))
            .collect();
        let body = serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default();
        let mut r = Response::new(full(Bytes::from(body)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(r)
    }
}

/// The caller's `x-request-id` if it is reasonable, else a fresh one.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID) {
        if !v.is_empty() && v.len() <= 128 {
            return v.clone();
        }
    }
    let id = uuid::Uuid::from_u128(rand::random::<u128>() & !(0xF << 76) | (0x4 << 76));
    HeaderValue::from_str(&id.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}
