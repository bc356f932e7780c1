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
//! 4. **authenticate** (`auth`) — a JWT bearer is verified (`crate::jwt`) and
//!    its identity → api key; any other bearer: sha256 of the key → api key;
//!    unknown, disabled or expired → 401. A JWT caller's id goes upstream in
//!    `caller-objectid` and into the usage event.
//! 5. **read** (`request`) — content type, body limit (413), JSON, required
//!    fields; for streams ask Azure for `stream_options.include_usage`.
//! 6. **authorise** — the alias must exist (404) and be on the key's allowlist (403).
//! 7. **limit** (`crate::limits`) — every rate limit of the key and of the
//!    model must pass, on the fleet's counts (429 `rate_limit_exceeded`);
//!    tokens are estimated now and corrected when the call ends.
//! 8. **cache** (`crate::cache`) — a deterministic call to a caching model
//!    may be answered here (it still counted as a request in step 7).
//! 9. **pick a target** (`crate::routing`) — the first priority group with a
//!    healthy target; weighted, round-robin or least-latency inside it.
//! 10. **call Azure** (`upstream`) — URL, credential, deadline; Azure errors
//!     mapped; retryable failures go back to step 9 for another target.
//! 11. **adapt** — `model` → alias, filter fields stripped; streams pass through
//!     `sse::SseAdapter` chunk by chunk.
//!
//! Errors from any step become the OpenAI envelope in `edge`. Usage is
//! accounted for from step 4 on (`crate::usage::Accounting`), whatever the
//! outcome; the call's rate-limit permit lives in it, so it is released when
//! the call ends, a stream's last chunk or a cancellation included.

mod auth;
mod edge;
mod request;
mod sse;
mod trace;
mod upstream;

use crate::usage::{Accounting, CacheStatus, UsageRecorder};

pub use trace::{CallAttributes, CallSpan};
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
use tracing::Instrument;

static SERVED_BY: HeaderName = HeaderName::from_static("x-aigw-served-by");
static CACHE_STATUS: HeaderName = HeaderName::from_static("x-aigw-cache");

/// `Cache-Control: no-cache` (or `no-store`) from the caller skips the cache.
fn no_cache(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            matches!(
                d.trim().to_ascii_lowercase().as_str(),
                "no-cache" | "no-store"
            )
        })
}

/// Prompts shorter than this (in characters) are tokenized on the reactor.
const TOKENIZE_INLINE: usize = 16 * 1024;

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
    caches: crate::cache::CacheRegistry,
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
            caches: crate::cache::CacheRegistry::default(),
        }
    }

    /// One call, in its server span (`chat {alias}`, GenAI attributes), a
    /// child of the caller's `traceparent` if any. The span ends with the
    /// call: for a stream, when its last chunk is sent (`usage::Accounting`
    /// holds it till then).
    pub async fn serve<B>(&self, req: Request<B>) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let request_id = request_id(req.headers());
        // The logs' context for the call (the OpenTelemetry span is `trace`).
        let span = tracing::info_span!(
            target: "aigw_data_plane::call",
            "serve",
            request_id = request_id.to_str().unwrap_or_default(),
            api_key_id = tracing::field::Empty,
            caller_id = tracing::field::Empty,
        );
        let trace = trace::CallSpan::start(req.method(), req.uri().path(), req.headers());
        self.serve_in_span(req, request_id, trace)
            .instrument(span)
            .await
    }

    async fn serve_in_span<B>(
        &self,
        req: Request<B>,
        request_id: HeaderValue,
        trace: CallSpan,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        // Taken by the call's accounting once the caller is known (it ends
        // the span then); still here, the call was refused before that.
        let mut trace = Some(trace);
        // Set once the caller is known; a stream takes it along to account at its end.
        let mut acct: Option<Accounting> = None;
        let mut rate: Option<crate::limits::RateHeaders> = None;
        let dispatched = self
            .dispatch(req, &request_id, &mut trace, &mut acct, &mut rate)
            .await;
        let (mut resp, code) = match dispatched {
            Ok(r) => (r, None),
            Err(e) => {
                match &e {
                    Error::RateLimited(_) => self.metrics.record_rejection("rate_limit"),
                    Error::BudgetExceeded => self.metrics.record_rejection("budget"),
                    Error::UpstreamRateLimited { .. } => {
                        self.metrics.record_rejection("upstream_rate_limit")
                    }
                    _ => {}
                }
                let code = e.code();
                (e.into_response(), code)
            }
        };
        if let Some(r) = rate {
            r.apply(resp.headers_mut());
        }
        if let Some(mut a) = acct {
            a.set_request_id(&request_id);
            a.finish(resp.status().as_u16(), code);
        }
        if let Some(mut t) = trace {
            // No alias yet: the span keeps the name it started with.
            t.end(&CallAttributes {
                status: resp.status().as_u16(),
                error_code: code.unwrap_or_default(),
                ..CallAttributes::default()
            });
        }
        self.metrics.record_status(resp.status().as_u16());
        resp.headers_mut().insert(REQUEST_ID.clone(), request_id);
        resp
    }

    async fn dispatch<B>(
        &self,
        req: Request<B>,
        request_id: &HeaderValue,
        trace: &mut Option<CallSpan>,
        slot: &mut Option<Accounting>,
        rate: &mut Option<crate::limits::RateHeaders>,
    ) -> Result<Response<ProxyBody>, Error>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let op = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/chat/completions") => Operation::ChatCompletions,
            (&Method::POST, "/v1/completions") => Operation::Completions,
            (&Method::POST, "/v1/embeddings") => Operation::Embeddings,
            (&Method::GET, "/v1/models") => return self.list_models(req.headers()).await,
            (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models") => {
                return Err(Error::MethodNotAllowed)
            }
            (_, path) => return Err(Error::RouteNotFound(path.to_string())),
        };
        let runtime = self.config.load().ok_or(Error::NotReady)?;
        let caller = auth::authenticate(&runtime, self.config.jwks(), req.headers()).await?;
        let trace = trace.take().unwrap_or_else(CallSpan::none);
        let acct = slot.insert(self.usage.begin(&caller.id, op.name(), trace));
        acct.set_caller_id(caller.caller_id());
        if caller.budget_exceeded {
            return Err(Error::BudgetExceeded);
        }
        let (mut parts, body) = req.into_parts();
        caller.stamp(&mut parts.headers);
        let call = request::read(op, &parts.headers, body, self.max_body).await?;
        acct.set_stream(call.stream);
        acct.set_max_tokens(call.max_tokens);
        acct.set_prompt_chars(call.prompt_chars);
        let route = runtime
            .route(&call.alias)
            .ok_or_else(|| Error::ModelNotFound(call.alias.clone()))?
            .clone();
        if !caller.allows(&call.alias) {
            return Err(Error::PermissionDenied(call.alias));
        }
        acct.set_route(&route.alias, "", "");
        if route.log_payloads {
            acct.log_payload(request::prompt_json(op, &call.parsed));
        }
        drop(runtime);
        if caller.limits.is_some() || route.limits.is_some() {
            let permit = self.limit(op, &caller, &route, &call).await?;
            *rate = Some(permit.headers());
            acct.set_permit(permit);
        }
        // The response cache, for deterministic requests to caching models.
        if op != Operation::Embeddings && crate::cache::cacheable(&call.parsed) {
            let store = self
                .caches
                .get(&route.alias, route.cache.as_ref(), route.cache_generation);
            if let Some(store) = store {
                if no_cache(&parts.headers) {
                    acct.set_cache_status(CacheStatus::Bypass);
                } else {
                    return self
                        .cached(op, &route, store, &parts.headers, call, request_id, slot)
                        .await;
                }
            }
        }
        self.forward(op, &route, &parts.headers, call, request_id, slot)
            .await
    }

    /// Step 7: one request and the estimated tokens against every limit of
    /// the key and of the model.
    async fn limit(
        &self,
        op: Operation,
        caller: &auth::Authenticated,
        route: &Route,
        call: &request::Call,
    ) -> Result<crate::limits::Permit, Error> {
        use crate::limits::{tokens, Check};
        let counts_tokens = |l: &Option<crate::config::Limits>| {
            l.as_ref().is_some_and(crate::config::Limits::counts_tokens)
        };
        let tokens = if !counts_tokens(&caller.limits) && !counts_tokens(&route.limits) {
            0
        } else if call.prompt_chars < TOKENIZE_INLINE {
            tokens::estimate(op, &call.parsed, route.tokenizer)
        } else {
            // Long prompts take milliseconds to tokenize: not on the reactor.
            let (parsed, tokenizer) = (call.parsed.clone(), route.tokenizer);
            tokio::task::spawn_blocking(move || tokens::estimate(op, &parsed, tokenizer))
                .await
                .map_err(|e| Error::Upstream(format!("counting prompt tokens: {e}")))?
        };
        let mut checks = Vec::with_capacity(2);
        if let Some(l) = &caller.limits {
            checks.push(Check {
                scope: &l.scope,
                limits: &l.rate,
                what: "api key",
                id: &caller.id,
            });
        }
        if let Some(l) = &route.limits {
            checks.push(Check {
                scope: &l.scope,
                limits: &l.rate,
                what: "model",
                id: &route.alias,
            });
        }
        self.config
            .limiter()
            .acquire(&checks, tokens)
            .map_err(Error::RateLimited)
    }

    /// Serves from the cache, or fetches the answer as JSON (one fetch for
    /// any number of identical concurrent misses) and keeps it; a stream
    /// caller gets it replayed as SSE either way.
    #[allow(clippy::too_many_arguments)] // the pipeline's state, passed through once
    async fn cached(
        &self,
        op: Operation,
        route: &Arc<Route>,
        store: crate::cache::Store,
        inbound: &http::HeaderMap,
        call: request::Call,
        request_id: &HeaderValue,
        slot: &mut Option<Accounting>,
    ) -> Result<Response<ProxyBody>, Error> {
        let key = crate::cache::key(&route.alias, &call.parsed);
        let (stream, include_usage) = (call.stream, call.caller_wants_usage);
        let fetch = request::Call {
            stream: false,
            body: crate::cache::json_body(&call.parsed),
            ..call
        };
        let entry = store
            .entry(key)
            .or_try_insert_with(async {
                let resp = self
                    .forward(op, route, inbound, fetch, request_id, slot)
                    .await?;
                let served_by = resp
                    .headers()
                    .get(&SERVED_BY)
                    .cloned()
                    .unwrap_or_else(|| HeaderValue::from_static("cache"));
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| Error::Upstream(format!("reading the answer to cache: {e}")))?
                    .to_bytes();
                Ok::<_, Error>(Arc::new(crate::cache::Answer { body, served_by }))
            })
            .await
            .map_err(|e| e.duplicate())?;
        let hit = !entry.is_fresh();
        let answer = entry.into_value();
        if !hit {
            // Apply the size bound now rather than at moka's next housekeeping.
            store.run_pending_tasks().await;
        }
        if let Some(a) = slot.as_mut() {
            if hit {
                // Served without Azure: no tokens spent, no cost.
                a.set_cache_status(CacheStatus::Hit);
                a.set_usage(0, 0);
                if a.wants_completion() {
                    a.add_completion_text(&upstream::completion_text(&answer.body));
                }
            } else {
                a.set_cache_status(CacheStatus::Miss);
            }
        }
        let mut r = if stream {
            let mut r = Response::new(full(crate::cache::sse_from_json(
                &answer.body,
                include_usage,
            )));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            r
        } else {
            let mut r = Response::new(full(answer.body.clone()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        r.headers_mut()
            .insert(SERVED_BY.clone(), answer.served_by.clone());
        r.headers_mut().insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static(if hit { "hit" } else { "miss" }),
        );
        Ok(r)
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
                a.set_request_id(request_id);
            }
            let span = match slot.as_mut() {
                Some(a) => {
                    a.set_server_address(&target.host);
                    a.trace()
                        .attempt(attempt, &target.deployment, &target.host, choice.probe)
                }
                None => trace::AttemptSpan::none(),
            };
            if attempt > 0 {
                self.metrics.record_retry(&route.alias);
            }
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
                        trace: &span,
                    },
                    inbound,
                    call.clone(),
                    request_id,
                    slot,
                )
                .await;
            let outcome = match &result {
                Ok(_) => Some(Outcome::Success(started.elapsed())),
                Err(e) => classify(e, started.elapsed()),
            };
            let label = match (&result, &outcome) {
                (Ok(_), _) => "success",
                (Err(_), Some(Outcome::RateLimited(_))) => "rate_limited",
                (Err(_), Some(Outcome::Failure)) => "failure",
                _ => "error",
            };
            self.metrics
                .record_upstream(&target.deployment, label, started.elapsed());
            match &result {
                Ok(_) => span.end(label, None, None),
                Err(e) => {
                    let code = e.code().unwrap_or("error");
                    let retry = retryable(e) && attempt < route.retries;
                    span.end(label, Some(code), retry.then_some(code));
                }
            }
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
    async fn list_models(&self, headers: &http::HeaderMap) -> Result<Response<ProxyBody>, Error> {
        let runtime = self.config.load().ok_or(Error::NotReady)?;
        let caller = auth::authenticate(&runtime, self.config.jwks(), headers).await?;
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
