//! One attempt at Azure OpenAI: the request built for the chosen target
//! (URL, headers, credential), sent within the model's deadline, and the
//! answer adapted for an OpenAI client or mapped to the caller's error.

use super::call::Call;
use super::request::Request;
use super::trace::AttemptSpan;
use super::{full, sse::SseAdapter, ProxyBody, SERVED_BY};
use crate::config::{Route, Target, TargetAuth};
use crate::credentials::{Bearer, TokenProvider};
use crate::error::Error;
use crate::http_client::{error_chain, HttpClient};
use crate::openai::responses::ResponseObject;
use crate::openai::{azure, Answer, Operation, Shape};
use crate::response_ids::IdScope;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Largest upstream JSON answer we read.
pub(super) const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
/// Largest upstream error body we read for its message.
pub(super) const MAX_ERROR_BODY: usize = 256 * 1024;
/// Longest wait an upstream's `retry-after` can impose (on the target's
/// cooldown and the caller's `retry-after`); longer hints are clamped.
pub const MAX_RETRY_HINT: Duration = Duration::from_secs(300);

static API_KEY: HeaderName = HeaderName::from_static("api-key");
static CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
static TRACE_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// Where one upstream attempt goes: the operation, the model's route and the
/// target chosen from it.
pub struct Attempt<'a> {
    pub op: Operation,
    pub route: &'a Route,
    pub target: &'a Target,
    /// The model's deadline for the whole call.
    pub deadline: Instant,
    /// When this attempt is abandoned without a first byte (JSON) or first
    /// stream chunk (`routing.first_token_timeout`).
    pub first_token: Option<Instant>,
    /// This attempt's client span: its context goes upstream.
    pub span: &'a AttemptSpan,
}

type UpstreamRequest = http::Request<Full<Bytes>>;

/// Sends `request` on the attempt's target and adapts the answer; errors are
/// mapped to what the caller should see. A stream takes the call's end along.
pub async fn send(
    client: &HttpClient,
    attempt: &Attempt<'_>,
    inbound: &HeaderMap,
    request: &Request,
    call: &mut Call,
) -> Result<Response<ProxyBody>, Error> {
    let body = match attempt.op {
        Operation::Responses => responses_body(attempt.target, request, call).await?,
        _ if attempt.target.model_in_body => v1_body(attempt.target, request).await?,
        _ => request.body.clone(),
    };
    let mut req = build(attempt, inbound, request, body, &call.request_id)?;
    let entra = authorize(attempt.target, &mut req).await?;
    let client = attempt.target.client.as_ref().unwrap_or(client);
    let resp = within_deadline(attempt, send_authenticated(client, req, entra)).await?;
    let mut out = if !resp.status().is_success() {
        return Err(error_answer(attempt, request, resp).await);
    } else if request.fields.stream && !is_json(resp.headers()) {
        match attempt.first_token {
            Some(until) => {
                let (parts, body) = resp.into_parts();
                let body = first_chunk(attempt, body, until).await?;
                stream_answer(attempt, request, Response::from_parts(parts, body), call)
            }
            None => stream_answer(attempt, request, resp, call),
        }
    } else {
        json_answer(attempt, resp, call).await?
    };
    out.headers_mut()
        .insert(SERVED_BY.clone(), attempt.target.served_by.clone());
    Ok(out)
}

/// The request for the target: its URL, the body, and the headers Azure
/// gets (never the caller's credentials).
/// A Responses request's body for `target`: Azure's Responses API takes the
/// deployment in the body, and Azure's own id of the previous response.
/// Read off the async workers when large, as every read of the body is.
async fn responses_body(target: &Target, request: &Request, call: &Call) -> Result<Bytes, Error> {
    let deployment = target.deployment.clone();
    let previous = call
        .responses
        .as_ref()
        .and_then(|r| r.previous.as_ref())
        .map(|p| p.upstream_id.clone());
    let json = request
        .with_object(move |object, _| {
            let mut object = object.clone();
            crate::openai::responses::upstream_body(&mut object, &deployment, previous.as_deref());
            object.to_json()
        })
        .await?;
    Ok(Bytes::from(json))
}

/// A body for Azure's v1 API: the deployment in `model` (the caller named
/// the alias there).
async fn v1_body(target: &Target, request: &Request) -> Result<Bytes, Error> {
    let deployment = target.deployment.clone();
    let json = request
        .with_object(move |object, _| {
            let mut object = object.clone();
            object.set(
                crate::openai::request::MODEL,
                crate::openai::raw::Field::Str(std::borrow::Cow::Owned(deployment)),
            );
            object.to_json()
        })
        .await?;
    Ok(Bytes::from(json))
}

/// `body`: the caller's, or the target's own (Responses, Azure's v1 API).
fn build(
    attempt: &Attempt<'_>,
    inbound: &HeaderMap,
    request: &Request,
    body: Bytes,
    request_id: &HeaderValue,
) -> Result<UpstreamRequest, Error> {
    let uri = match attempt.op {
        Operation::Responses => attempt
            .target
            .responses_uri(attempt.op, None, None)
            .map_err(Error::Upstream)?,
        op => attempt
            .target
            .uri(op)
            .ok_or_else(|| Error::Upstream(format!("{op:?} has no Azure endpoint")))?
            .clone(),
    };
    let mut req = http::Request::builder()
        .method(Method::POST)
        .uri(uri)
        .body(Full::new(body))
        .map_err(|e| Error::Upstream(format!("building the upstream request: {e}")))?;
    stamp_headers(
        req.headers_mut(),
        attempt.span,
        inbound,
        request_id,
        request.fields.stream,
    );
    Ok(req)
}

/// The headers every upstream request carries (never the caller's
/// credentials): content and accepted types, the gateway's agent, the
/// request id, the trace context, the verified JWT caller.
pub(super) fn stamp_headers(
    h: &mut HeaderMap,
    span: &AttemptSpan,
    inbound: &HeaderMap,
    request_id: &HeaderValue,
    stream: bool,
) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::ACCEPT,
        HeaderValue::from_static(if stream {
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
    // as the caller's); without, the caller's headers go on if well formed.
    if !span.inject(h) {
        for name in &TRACE_HEADERS {
            if let Some(v) = super::trace::caller_trace_header(inbound, name.as_str()) {
                h.insert(name.clone(), v.clone());
            }
        }
    }
    // The verified JWT caller, stamped by `auth` (never the caller's own header).
    if let Some(v) = inbound.get(&super::auth::CALLER_OBJECT_ID) {
        h.insert(super::auth::CALLER_OBJECT_ID.clone(), v.clone());
    }
}

/// The target's credential on the request: its API key, or an Entra ID
/// bearer (returned, to be marked accepted or replaced).
pub(super) async fn authorize<'t>(
    target: &'t Target,
    req: &mut UpstreamRequest,
) -> Result<Option<(&'t Arc<TokenProvider>, Bearer)>, Error> {
    match &target.auth {
        TargetAuth::ApiKey(key) => {
            req.headers_mut().insert(API_KEY.clone(), key.clone());
            Ok(None)
        }
        TargetAuth::Entra(tokens) => {
            let bearer = tokens
                .bearer()
                .await
                .map_err(|e| e.to_upstream_error(&target.provider_name, tokens.kind()))?;
            req.headers_mut()
                .insert(header::AUTHORIZATION, bearer.header().clone());
            Ok(Some((tokens, bearer)))
        }
    }
}

/// Waits for the answer's head until the call's deadline.
async fn within_deadline(
    attempt: &Attempt<'_>,
    sent: impl std::future::Future<
        Output = Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    >,
) -> Result<Response<Incoming>, Error> {
    let target = attempt.target;
    let until = attempt
        .first_token
        .map_or(attempt.deadline, |f| f.min(attempt.deadline));
    match tokio::time::timeout_at(until, sent).await {
        Err(_) if until < attempt.deadline => Err(first_token_timeout(attempt)),
        Err(_) => Err(Error::Timeout(format!(
            "Azure deployment `{}` did not answer within {:?}",
            target.deployment, attempt.route.timeout
        ))),
        Ok(Err(e)) if e.is_connect() => Err(Error::UpstreamConnect(format!(
            "cannot connect to {} for provider key `{}`: {}",
            target.host,
            target.provider_name,
            error_chain(&e)
        ))),
        Ok(Err(e)) => Err(Error::Upstream(format!(
            "the request to Azure deployment `{}` failed: {}",
            target.deployment,
            error_chain(&e)
        ))),
        Ok(Ok(r)) => Ok(r),
    }
}

fn first_token_timeout(attempt: &Attempt<'_>) -> Error {
    Error::FirstTokenTimeout(format!(
        "Azure deployment `{}` sent nothing within the first-token timeout of {:?}",
        attempt.target.deployment,
        attempt.route.first_token_timeout.unwrap_or_default()
    ))
}

/// A stream body whose first chunk has arrived, that chunk in front.
struct Started {
    first: Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>,
    rest: Incoming,
}

impl http_body::Body for Started {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(first));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// Waits for the stream's first chunk until `until` (past it: the
/// first-token timeout), and hands the stream on with that chunk in front.
async fn first_chunk(
    attempt: &Attempt<'_>,
    mut body: Incoming,
    until: Instant,
) -> Result<Started, Error> {
    let until = until.min(attempt.deadline);
    match tokio::time::timeout_at(until, body.frame()).await {
        Err(_) if until < attempt.deadline => Err(first_token_timeout(attempt)),
        Err(_) => Err(Error::Timeout(format!(
            "Azure deployment `{}` did not start its stream within {:?}",
            attempt.target.deployment, attempt.route.timeout
        ))),
        Ok(first) => Ok(Started { first, rest: body }),
    }
}

/// Whether the answer says it is JSON. A stream call's 200 is read as SSE
/// unless it says so: some Azure-compatible proxies stream without any
/// content type, and a JSON answer to a stream call is still understood.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Azure's error answer, as the caller's error.
async fn error_answer(attempt: &Attempt<'_>, request: &Request, resp: Response<Incoming>) -> Error {
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let body = read_limited(body, MAX_ERROR_BODY, attempt.deadline)
        .await
        .unwrap_or_default();
    // The resource no longer has the previous response (deleted, expired):
    // the caller's id is unknown, as one that never opened (never Azure's id).
    if let Some(id) = &request.fields.previous_response_id {
        let code = azure::ErrorBody::parse(&body).code;
        if code.as_deref() == Some(crate::openai::responses::PREVIOUS_NOT_FOUND) {
            return Error::ResponseNotFound {
                id: id.chars().take(64).collect(),
                param: Some(crate::openai::responses::PREVIOUS_RESPONSE_ID),
            };
        }
    }
    map_error(status, &parts.headers, &body, attempt.target)
}

/// A stream, adapted chunk by chunk; it ends the call with its last chunk.
fn stream_answer<B>(
    attempt: &Attempt<'_>,
    request: &Request,
    resp: Response<B>,
    call: &mut Call,
) -> Response<ProxyBody>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: std::fmt::Display,
{
    let route = attempt.route;
    let scope = call.id_scope(attempt.target, &route.alias);
    let adapter = SseAdapter::new(
        resp.into_body(),
        route.alias.clone(),
        call.shape,
        request.fields.caller_wants_usage,
        route.stream_idle_timeout,
        call.hand_off(),
    );
    let adapter = match scope {
        Some(ids) => adapter.responses(ids),
        None => adapter,
    };
    let mut r = Response::new(adapter.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// A JSON answer, read whole (within the deadline) and adapted.
async fn json_answer(
    attempt: &Attempt<'_>,
    resp: Response<Incoming>,
    call: &mut Call,
) -> Result<Response<ProxyBody>, Error> {
    let deployment = &attempt.target.deployment;
    let body = match read_limited(resp.into_body(), MAX_UPSTREAM_BODY, attempt.deadline).await {
        Ok(b) => b,
        Err(ReadError::Timeout) => {
            return Err(Error::Timeout(format!(
                "Azure deployment `{deployment}` did not finish its answer within {:?}",
                attempt.route.timeout
            )))
        }
        Err(ReadError::Other(e)) => {
            return Err(Error::Upstream(format!(
                "reading the answer of Azure deployment `{deployment}` failed: {e}"
            )))
        }
    };
    let adapted = match call.id_scope(attempt.target, &attempt.route.alias) {
        Some(ids) => adapt_response(&body, &attempt.route.alias, &ids, call, true),
        None => adapt_json(&body, &attempt.route.alias, call),
    }
    .map_err(|e| {
        Error::Upstream(format!(
            "Azure deployment `{deployment}` returned an unusable body: {e}"
        ))
    })?;
    let mut r = Response::new(full(adapted));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// For the OpenAI shape, rewrites `model` to the alias and strips Azure's
/// filter annotations, in one parse; the Azure shape is Azure's answer as
/// it came. The usage, model and text Azure reported go to the call's record.
fn adapt_json(body: &Bytes, alias: &str, call: &mut Call) -> Result<Bytes, String> {
    let mut answer = Answer::parse(body).map_err(|e| format!("not a JSON object ({e})"))?;
    if let Some(acct) = call.usage() {
        if let Some(m) = answer.model() {
            acct.set_response_model(&m);
        }
        if let Some(u) = answer.usage() {
            acct.set_usage(u.tokens());
        }
        if acct.wants_completion() {
            acct.add_completion_text(&answer.completion_text());
        }
    }
    if call.shape == Shape::Azure {
        return Ok(body.clone());
    }
    azure::strip_fields(&mut answer);
    answer.set_model(alias);
    let mut out = Vec::with_capacity(body.len());
    answer.write_to(&mut out).map_err(|e| e.to_string())?;
    Ok(Bytes::from(out))
}

/// A Responses API object (a response, a deletion) for the caller: its ids
/// sealed, `model` the alias on the OpenAI shape (Azure's own on Azure's
/// route). Its usage, model and text go to the call's record; a response
/// still queued or in progress (`background`) reports no usage yet, so the
/// call's is estimated.
/// `account`: the answer's usage is this call's (creation); a response read
/// again later was accounted when it was created.
pub(super) fn adapt_response(
    body: &Bytes,
    alias: &str,
    ids: &IdScope,
    call: &mut Call,
    account: bool,
) -> Result<Bytes, String> {
    let mut r = ResponseObject::parse(body).map_err(|e| format!("not a JSON object ({e})"))?;
    if let Some(acct) = call.usage() {
        if let Some(m) = r.model() {
            acct.set_response_model(&m);
        }
        if let (true, Some(u)) = (account, r.usage()) {
            acct.set_usage(u.tokens());
        }
        if account && acct.wants_completion() {
            acct.add_completion_text(&r.output_text());
        }
    }
    let alias = (call.shape == Shape::OpenAi).then_some(alias);
    r.rewrite(&|id| ids.seal(id), alias);
    Ok(Bytes::from(r.to_json()))
}

/// Sends `req`. With an Entra ID token: marks it accepted when Azure takes it,
/// and when Azure answers 401 to a token it accepted before (revoked, or
/// expired in flight), drops it, gets a new one and retries once.
pub(super) async fn send_authenticated(
    client: &HttpClient,
    req: UpstreamRequest,
    entra: Option<(&Arc<TokenProvider>, Bearer)>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let Some((tokens, bearer)) = entra else {
        return client.request(req).await;
    };
    let mut again = http::Request::new(req.body().clone());
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

pub(super) enum ReadError {
    Timeout,
    Other(String),
}

pub(super) async fn read_limited<B>(
    body: B,
    max: usize,
    deadline: Instant,
) -> Result<Bytes, ReadError>
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

/// Maps an Azure error answer to what the caller sees.
pub(super) fn map_error(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    target: &Target,
) -> Error {
    let detail = azure::ErrorBody::parse(body);
    let code = detail.code.as_deref().unwrap_or_default();
    let message = detail.message.clone().unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body.get(..200).unwrap_or(body))
            .trim()
            .to_string();
        if text.is_empty() {
            "(empty body)".into()
        } else {
            text
        }
    });
    match status.as_u16() {
        400 if code == "content_filter" => Error::ContentFilter {
            message,
            details: detail.content_filter_result(),
        },
        // The prompt (plus max_tokens) is over the deployment's window.
        400 if code == "context_length_exceeded" => Error::InvalidRequest {
            message,
            param: Some("messages"),
            code: Some("context_length_exceeded"),
        },
        401 | 403 => Error::UpstreamAuth(format!(
            "Azure rejected the gateway's credential for provider key `{}` (HTTP {}): {message}",
            target.provider_name,
            status.as_u16()
        )),
        404 => Error::TargetMisconfigured(format!(
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
        429 => {
            let wait = retry_wait(headers);
            Error::UpstreamRateLimited {
                message,
                // Said again in whole seconds from the checked wait, never
                // the upstream's text verbatim.
                retry_after: wait.map(|w| HeaderValue::from(crate::clock::retry_after_secs(w))),
                wait,
            }
        }
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

/// How long Azure asks us to wait: `retry-after-ms`, else `retry-after`
/// seconds, at most [`MAX_RETRY_HINT`]. Nonsense (negative, not a finite
/// number, an HTTP date) is no hint at all.
pub fn retry_wait(headers: &HeaderMap) -> Option<Duration> {
    let secs = |name: &str, scale: f64| -> Option<Duration> {
        let n: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        Duration::try_from_secs_f64(n / scale).ok()
    };
    secs("retry-after-ms", 1000.0)
        .or_else(|| secs("retry-after", 1.0))
        .map(|w| w.min(MAX_RETRY_HINT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_json_only_when_it_says_so() {
        let with = |ct: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            }
            is_json(&h)
        };
        assert!(with(Some("application/json")));
        assert!(with(Some("Application/JSON; charset=utf-8")));
        for not_json in [
            None,
            Some("text/event-stream"),
            Some("text/plain"),
            Some(""),
        ] {
            assert!(!with(not_json), "{not_json:?}");
        }
    }

    #[test]
    fn retry_hints_never_panic() {
        let mut h = HeaderMap::new();
        for nonsense in [
            "-1",
            "NaN",
            "inf",
            "-0.5",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "1e300",
        ] {
            h.insert("retry-after", HeaderValue::from_static(nonsense));
            assert_eq!(retry_wait(&h), None, "{nonsense}");
        }
        for huge in ["1e15", "86400"] {
            h.insert("retry-after", HeaderValue::from_static(huge));
            assert_eq!(retry_wait(&h), Some(MAX_RETRY_HINT), "{huge}");
        }
        h.insert("retry-after", HeaderValue::from_static("1.5"));
        assert_eq!(retry_wait(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_wait(&h), Some(Duration::from_millis(250)));
    }
}
