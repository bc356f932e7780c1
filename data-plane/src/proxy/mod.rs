//! The OpenAI-compatible proxy.
//!
//! Request pipeline, in the order every call goes through it
//! (`Proxy::serve` → `Proxy::run`); each step is a method over the call's
//! state, [`call::Call`]:
//!
//! 1. **request id** — reuse the caller's `x-request-id` or mint one; it is on
//!    every response, errors included.
//! 2. **route** — method and path select the operation from the operation
//!    table (`crate::openai::operation`), and the answer's shape: OpenAI's
//!    on `/v1` and `/openai/v1`, Azure's on `/openai/deployments/{alias}/…`
//!    (whose path names the alias); `GET /v1/models` is answered here.
//! 3. **config** — one lock-free load of the current snapshot; none yet → 503.
//! 4. **authenticate** (`auth`) — a JWT bearer is verified (`crate::jwt`) and
//!    its identity → api key; any other bearer: sha256 of the key → api key;
//!    unknown, disabled or expired → 401. A JWT caller's id goes upstream in
//!    `caller-objectid` and into the usage event. Usage is accounted for
//!    from here on, whatever the outcome.
//! 5. **read** (`request`) — content type, body limit (413), JSON, required
//!    fields; for streams ask Azure for `stream_options.include_usage`.
//! 6. **authorise** — the alias must exist (404) and be on the key's allowlist (403).
//! 7. **limit** (`crate::limits`) — every rate limit of the key and of the
//!    model must pass, on the fleet's counts (429 `rate_limit_exceeded`);
//!    tokens are estimated now and corrected when the call ends.
//! 8. **cache** (`cached`, `crate::cache`) — a deterministic call to a
//!    caching model may be answered here (it still counted as a request in step 7).
//! 9. **pick a target** (`forward`, `crate::routing`) — the first priority
//!    group with a healthy target; weighted, round-robin or least-latency inside it.
//! 10. **call Azure** (`upstream`) — URL, credential, deadline (and the
//!     first-token timeout); Azure errors mapped; retryable failures go back
//!     to step 9 for another target. When the model cannot answer for a
//!     reason its `fallbacks` name, steps 9–10 run again for the fallback
//!     alias (`forward`).
//! 11. **adapt** (`crate::openai`) — OpenAI shape: `model` → alias, filter
//!     fields stripped; Azure shape: as Azure sent it. Streams pass through
//!     `sse::SseAdapter` chunk by chunk.
//!
//! The Responses API (`responses`) goes the same way — its ids sealed with
//! the provider key that stores the response, a `previous_response_id`
//! pinning the call to that key in step 9, never cached in step 8 — and
//! its calls by id (`GET|DELETE /v1/responses/{id}`, cancel, input items)
//! go from step 4 straight to the key the id names.
//!
//! Errors from any step become the call's shape of error envelope in `edge`. The call's
//! span, usage record and rate-limit permit end together (`call::CallEnd`)
//! when the answer is sent — for a stream, with its last chunk or the
//! caller's cancellation.

mod auth;
mod cached;
mod call;
mod edge;
mod forward;
mod request;
mod responses;
mod sse;
mod trace;
mod upstream;

#[cfg(test)]
mod tests;

/// Entry points for the fuzz targets (`tests/fuzz`): the request check and
/// the SSE adapter, without a server around them.
#[cfg(feature = "fuzz")]
pub mod fuzz {
    use super::*;

    /// Checks `body` as a request for `op`, and when it passes, reads it the
    /// ways later steps do (cache key, token estimate, payload log).
    pub fn check_request(op: Operation, body: &[u8]) -> Result<request::Request, Error> {
        let r = request::check(op, None, Bytes::copy_from_slice(body))?;
        let object = r.object()?;
        let _ = crate::cache::key("alias", crate::openai::Shape::OpenAi, &object);
        let _ = crate::cache::json_body(&object);
        let _ = crate::openai::request::prompt_json(op, &object);
        let t = crate::limits::tokens::tokenizer_for("gpt-4o");
        let _ = crate::limits::tokens::estimate(op, &object, &r.fields, t);
        Ok(r)
    }

    /// What the caller receives for an upstream stream arriving in `frames`.
    pub fn adapt_sse(frames: Vec<Bytes>, forward_usage: bool) -> Bytes {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        else {
            return Bytes::new();
        };
        let upstream = http_body_util::StreamBody::new(futures::stream::iter(
            frames
                .into_iter()
                .map(|f| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(f))),
        ));
        rt.block_on(async {
            let adapter = sse::SseAdapter::new(
                upstream,
                Arc::from("alias"),
                crate::openai::Shape::OpenAi,
                forward_usage,
                std::time::Duration::from_secs(60),
                call::CallEnd::detached(),
            );
            adapter
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default()
        })
    }
}

pub use trace::{CallAttributes, CallSpan};

use crate::config::{ConfigHandle, Route, Runtime};
use crate::error::Error;
use crate::node::Services;
use crate::openai::{Inbound, Operation, Shape, Unrouted};
use crate::usage::{CacheStatus, UsageRecorder};
use bytes::Bytes;
use call::Call;
use http::{header, HeaderName, HeaderValue, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde_json::json;
use std::sync::Arc;
use tracing::Instrument;

static SERVED_BY: HeaderName = HeaderName::from_static("x-aigw-served-by");
static CACHE_STATUS: HeaderName = HeaderName::from_static("x-aigw-cache");
static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Prompts shorter than this (in characters, and bodies in bytes) are
/// tokenized on the reactor.
const TOKENIZE_INLINE: usize = 16 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub struct Proxy {
    config: Arc<ConfigHandle>,
    services: Arc<Services>,
    max_body: usize,
    usage: Arc<UsageRecorder>,
}

impl Proxy {
    pub fn new(
        config: Arc<ConfigHandle>,
        services: Arc<Services>,
        max_body: usize,
        usage: Arc<UsageRecorder>,
    ) -> Self {
        Self {
            config,
            services,
            max_body,
            usage,
        }
    }

    /// One call, in its server span (`chat {alias}`, GenAI attributes), a
    /// child of the caller's `traceparent` if any.
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
        let trace = CallSpan::start(req.method(), req.uri().path(), req.headers());
        let shape = Shape::of_path(req.uri().path());
        let mut call = Call::new(request_id, trace, shape);
        let result = self.run(req, &mut call).instrument(span).await;
        self.respond(result, call)
    }

    /// Steps 2–11.
    async fn run<B>(&self, req: Request<B>, call: &mut Call) -> Result<Response<ProxyBody>, Error>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let inbound =
            Inbound::route(req.method(), req.uri().path(), req.uri().query()).map_err(|e| {
                match e {
                    Unrouted::MethodNotAllowed => Error::MethodNotAllowed,
                    // Azure answers a missing api-version as an unknown path.
                    Unrouted::UnknownPath | Unrouted::MissingApiVersion => {
                        Error::UnknownPath(req.uri().path().to_string())
                    }
                }
            })?;
        let op = inbound.op;
        if op == Operation::ListModels {
            return self.list_models(req.headers()).await;
        }
        call.op = Some(op);
        call.end.api_version = inbound.api_version.clone();
        let runtime = self.config.load().ok_or(Error::NotReady)?;
        self.authenticate(&runtime, op, req.headers(), call).await?;
        if op.by_id() {
            return self.by_id(runtime, &inbound, req, call).await;
        }
        let (mut parts, body) = req.into_parts();
        if let Some(caller) = &call.caller {
            caller.stamp(&mut parts.headers);
        }
        let request = request::read(
            op,
            inbound.alias.as_deref(),
            &parts.headers,
            body,
            self.max_body,
        )
        .await?;
        record_request(call, &request);
        if op == Operation::Responses {
            call.responses = Some(responses::follow_up(&runtime, call, &request)?);
        }
        let route = authorise(&runtime, call, &request)?;
        drop(runtime);
        self.limit(op, &route, &request, call).await?;
        if let Some(store) = self.response_cache(op, &route, &parts.headers, &request, call) {
            return self
                .cached(op, &route, store, &parts.headers, request, call)
                .await;
        }
        self.forward_with_fallbacks(op, &route, &parts.headers, &request, call)
            .await
    }

    /// Step 4: who is calling; usage is accounted for from here on.
    async fn authenticate(
        &self,
        runtime: &Runtime,
        op: Operation,
        headers: &http::HeaderMap,
        call: &mut Call,
    ) -> Result<(), Error> {
        let caller = auth::authenticate(runtime, &self.services.jwks, headers).await?;
        let budget_exceeded = caller.budget_exceeded;
        call.authenticated(caller, op, &self.usage);
        if budget_exceeded {
            return Err(Error::BudgetExceeded);
        }
        Ok(())
    }

    /// Step 7: one request and the estimated tokens against every limit of
    /// the key and of the model.
    async fn limit(
        &self,
        op: Operation,
        route: &Route,
        request: &request::Request,
        call: &mut Call,
    ) -> Result<(), Error> {
        let Some(caller) = &call.caller else {
            return Ok(());
        };
        if caller.limits.is_none() && route.limits.is_none() {
            return Ok(());
        }
        let tokens = estimate_tokens(op, caller, route, request).await?;
        self.admit(Some(route), tokens, call)
    }

    /// Step 8: the model's response cache, when this request may use it.
    fn response_cache(
        &self,
        op: Operation,
        route: &Route,
        inbound: &http::HeaderMap,
        request: &request::Request,
        call: &mut Call,
    ) -> Option<crate::cache::Store> {
        // Responses API calls are stateful (stored, followed up): never cached.
        if op == Operation::Embeddings || op.is_responses() || !request.fields.deterministic {
            return None;
        }
        let store =
            self.services
                .caches
                .get(&route.alias, route.cache.as_ref(), route.cache_generation)?;
        if no_cache(inbound) {
            call.cache_status(CacheStatus::Bypass);
            return None;
        }
        Some(store)
    }

    /// `GET /v1/models`: the aliases this caller may use.
    async fn list_models(&self, headers: &http::HeaderMap) -> Result<Response<ProxyBody>, Error> {
        let runtime = self.config.load().ok_or(Error::NotReady)?;
        let caller = auth::authenticate(&runtime, &self.services.jwks, headers).await?;
        let data: Vec<_> = runtime
            .aliases()
            .iter()
            .filter(|a| caller.allows(a))
            .map(|a| json!({"id": a, "object": "model", "created": 0, "owned_by": "aigw"}))
            .collect();
        let body = serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default();
        Ok(json_response(Bytes::from(body)))
    }
}

/// Step 5's findings, for the call's record and span.
fn record_request(call: &mut Call, request: &request::Request) {
    call.end.max_tokens = request.fields.max_tokens;
    if let Some(a) = call.usage() {
        a.event.stream = request.fields.stream;
        a.prompt_chars = request.fields.prompt_chars;
    }
}

/// Step 6: the alias must exist and the caller may use it.
fn authorise(
    runtime: &Runtime,
    call: &mut Call,
    request: &request::Request,
) -> Result<Arc<Route>, Error> {
    let alias = &request.fields.alias;
    let route = runtime
        .route(alias)
        .ok_or_else(|| Error::ModelNotFound(alias.clone()))?
        .clone();
    if !call.caller.as_ref().is_some_and(|c| c.allows(alias)) {
        return Err(Error::PermissionDenied(alias.clone()));
    }
    if route.log_payloads {
        if let (Some(op), Ok(body)) = (call.op, request.object()) {
            let prompt = crate::openai::request::prompt_json(op, &body);
            if let Some(a) = call.usage() {
                a.log_payload(prompt);
            }
        }
    }
    call.routed(route.clone());
    Ok(route)
}

/// The call's token cost for token limits (0 when no limit counts tokens).
async fn estimate_tokens(
    op: Operation,
    caller: &auth::Authenticated,
    route: &Route,
    request: &request::Request,
) -> Result<u64, Error> {
    let counts = |l: &Option<crate::limits::Limits>| {
        l.as_ref().is_some_and(crate::limits::Limits::counts_tokens)
    };
    if !counts(&caller.limits) && !counts(&route.limits) {
        return Ok(0);
    }
    count_tokens(op, route.tokenizer, request).await
}

/// The request's tokens as Azure counts them at arrival: the prompt with
/// the model's tokenizer plus `max_tokens`.
async fn count_tokens(
    op: Operation,
    tokenizer: tiktoken_rs::tokenizer::Tokenizer,
    request: &request::Request,
) -> Result<u64, Error> {
    use crate::limits::tokens;
    // Long prompts take milliseconds to tokenize: not on the reactor.
    if request.fields.prompt_chars < TOKENIZE_INLINE && request.body.len() < TOKENIZE_INLINE {
        let body = request.object()?;
        return Ok(tokens::estimate(op, &body, &request.fields, tokenizer));
    }
    let request = request.clone();
    tokio::task::spawn_blocking(move || -> Result<u64, Error> {
        let body = request.object()?;
        Ok(tokens::estimate(op, &body, &request.fields, tokenizer))
    })
    .await
    .map_err(|e| Error::Upstream(format!("counting prompt tokens: {e}")))?
}

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

fn json_response(body: Bytes) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The caller's `x-request-id` if it is short and plain (it is echoed and
/// sent to Azure), else a fresh one.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID) {
        if trace::request_id_ok(v) {
            return v.clone();
        }
    }
    let id = uuid::Uuid::from_u128(rand::random::<u128>() & !(0xF << 76) | (0x4 << 76));
    HeaderValue::from_str(&id.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}
