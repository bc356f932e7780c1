//! The Responses API's stateful side. A response lives in the Azure
//! resource that created it, so every call about it goes to that provider
//! key, whichever node serves it: the id the caller holds names the key
//! (`crate::response_ids`), sealed so it cannot be forged or used by
//! another api key — an id that does not open is a 404, without any call
//! to Azure.
//!
//! - `POST /v1/responses` with `previous_response_id`: [`follow_up`] opens
//!   the id, and `forward` sends every attempt to that key only;
//! - `GET|DELETE /v1/responses/{id}`, `POST …/{id}/cancel`,
//!   `GET …/{id}/input_items`: [`Proxy::by_id`], one attempt at the key the
//!   id names. They cost no tokens: their usage event counts the request,
//!   and the caller's request limits apply.

use super::call::{Call, ResponsesCall};
use super::upstream::{self, ReadError};
use super::{full, Proxy, ProxyBody, SERVED_BY};
use crate::clock::deadline_after;
use crate::config::{Route, Runtime, Target};
use crate::error::Error;
use crate::openai::{Inbound, Operation};
use crate::response_ids::{IdScope, ResponseRef};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::instrument;

/// Deadline of a call by id when its model (and so its routing policy) is gone.
const BY_ID_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest id echoed in an error message.
const ECHOED_ID: usize = 64;

fn not_found(id: &str, param: Option<&'static str>) -> Error {
    let id = match id.char_indices().nth(ECHOED_ID) {
        Some((at, _)) => format!("{}…", &id[..at]),
        None => id.to_string(),
    };
    Error::ResponseNotFound { id, param }
}

fn gone(r: &ResponseRef) -> Error {
    Error::ResponseTargetGone(format!(
        "the response was stored by provider key `{}`, which no model routes to any more",
        r.provider_key_id
    ))
}

/// A Responses call's ids, and the stored response it follows up on (a
/// `previous_response_id` this caller may use, whose key is still routed).
pub(super) fn follow_up(
    runtime: &Runtime,
    call: &Call,
    request: &super::request::Request,
) -> Result<ResponsesCall, Error> {
    let ids = runtime
        .response_ids()
        .ok_or(Error::ResponsesUnavailable)?
        .clone();
    let previous = match &request.fields.previous_response_id {
        None => None,
        Some(id) => {
            let caller = call.caller.as_ref().map(|c| c.id.as_str());
            let r = ids
                .open(id, caller.unwrap_or_default())
                .ok_or_else(|| not_found(id, Some("previous_response_id")))?;
            if runtime.provider_target(&r.provider_key_id).is_none() {
                return Err(gone(&r));
            }
            Some(r)
        }
    };
    Ok(ResponsesCall { ids, previous })
}

impl Proxy {
    /// A call about a stored response: to the provider key its id names.
    #[instrument(skip_all, fields(op = inbound.op.name()))]
    pub(super) async fn by_id<B>(
        &self,
        runtime: Arc<Runtime>,
        inbound: &Inbound,
        req: Request<B>,
        call: &mut Call,
    ) -> Result<Response<ProxyBody>, Error>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let op = inbound.op;
        let ids = runtime
            .response_ids()
            .ok_or(Error::ResponsesUnavailable)?
            .clone();
        let id = inbound.response_id.as_deref().unwrap_or_default();
        let caller = call
            .caller
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let r = ids.open(id, &caller).ok_or_else(|| not_found(id, None))?;
        let target = runtime
            .provider_target(&r.provider_key_id)
            .cloned()
            .ok_or_else(|| gone(&r))?;
        let route = runtime.route(&r.alias).cloned();
        drop(runtime);
        if let Some(a) = call.usage() {
            a.event.model.clone_from(&r.alias);
            // Reading, deleting or cancelling a response generates nothing.
            a.set_usage((0, 0));
        }
        self.admit(route.as_deref(), 0, call)?;
        let (parts, body) = req.into_parts();
        // Nothing in a body is used (cancel's is `{}` at most); bounded anyway.
        let _ = aigw_shared::body::read_limited(body, self.max_body).await;
        let timeout = route.as_ref().map_or(BY_ID_TIMEOUT, |r| r.timeout);
        let deadline = deadline_after(Instant::now(), timeout);
        let span = call.attempt(&target, false);
        let started = Instant::now();
        let result = self
            .send_by_id(op, &target, &r, (&parts, id), deadline, &span, call)
            .await;
        let label = if result.is_ok() { "success" } else { "error" };
        self.services
            .metrics
            .record_upstream(&target.deployment, label, started.elapsed());
        match &result {
            Ok(_) => span.end(label, None, None),
            Err(e) => span.end(label, Some(e.code().unwrap_or("error")), None),
        }
        let scope = IdScope {
            ids,
            provider_key_id: r.provider_key_id.clone(),
            api_key_id: caller,
            alias: r.alias.clone(),
        };
        let (status, body) = result?;
        let body = match op {
            // Items keep Azure's ids: only response ids route.
            Operation::ListInputItems => body,
            _ => upstream::adapt_response(&body, &r.alias, &scope, call, false).map_err(|e| {
                Error::Upstream(format!(
                    "Azure (provider key `{}`) returned an unusable body: {e}",
                    target.provider_name
                ))
            })?,
        };
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(SERVED_BY.clone(), target.served_by.clone());
        Ok(resp)
    }

    /// One request to Azure about `r`, within `deadline`: its status and
    /// body. `caller_response_id` is the id as the caller holds it (for a 404).
    #[allow(clippy::too_many_arguments)]
    async fn send_by_id(
        &self,
        op: Operation,
        target: &Target,
        r: &ResponseRef,
        (parts, caller_response_id): (&http::request::Parts, &str),
        deadline: Instant,
        span: &super::trace::AttemptSpan,
        call: &Call,
    ) -> Result<(StatusCode, Bytes), Error> {
        let uri = target
            .responses_uri(op, Some(&r.upstream_id), parts.uri.query())
            .map_err(Error::Upstream)?;
        let mut req = http::Request::builder()
            .method(op.row().method.clone())
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::Upstream(format!("building the upstream request: {e}")))?;
        upstream::stamp_headers(
            req.headers_mut(),
            span,
            &parts.headers,
            &call.request_id,
            false,
        );
        let entra = upstream::authorize(target, &mut req).await?;
        let client = target.client.as_ref().unwrap_or(&self.services.http);
        let sent = upstream::send_authenticated(client, req, entra);
        let resp: Response<Incoming> = match tokio::time::timeout_at(deadline, sent).await {
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "provider key `{}` did not answer in time",
                    target.provider_name
                )))
            }
            Ok(Err(e)) if e.is_connect() => {
                return Err(Error::UpstreamConnect(format!(
                    "cannot connect to {} for provider key `{}`: {}",
                    target.host,
                    target.provider_name,
                    crate::http_client::error_chain(&e)
                )))
            }
            Ok(Err(e)) => {
                return Err(Error::Upstream(format!(
                    "the request to provider key `{}` failed: {}",
                    target.provider_name,
                    crate::http_client::error_chain(&e)
                )))
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let (head, body) = resp.into_parts();
        let max = if status.is_success() {
            upstream::MAX_UPSTREAM_BODY
        } else {
            upstream::MAX_ERROR_BODY
        };
        let body = match upstream::read_limited(body, max, deadline).await {
            Ok(b) => b,
            Err(ReadError::Timeout) => {
                return Err(Error::Timeout(format!(
                    "provider key `{}` did not finish its answer in time",
                    target.provider_name
                )))
            }
            Err(ReadError::Other(e)) => {
                return Err(Error::Upstream(format!(
                    "reading the answer of provider key `{}` failed: {e}",
                    target.provider_name
                )))
            }
        };
        if status == StatusCode::NOT_FOUND {
            // Deleted, never stored (`store: false`) or expired: unknown.
            return Err(not_found(caller_response_id, None));
        }
        if !status.is_success() {
            return Err(upstream::map_error(status, &head.headers, &body, target));
        }
        Ok((status, body))
    }

    /// One request and `tokens` against the caller's limits and, when
    /// given, the model's.
    pub(super) fn admit(
        &self,
        route: Option<&Route>,
        tokens: u64,
        call: &mut Call,
    ) -> Result<(), Error> {
        use crate::limits::Check;
        let Some(caller) = &call.caller else {
            return Ok(());
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
        if let Some((l, alias)) = route.and_then(|r| r.limits.as_ref().map(|l| (l, &r.alias))) {
            checks.push(Check {
                scope: &l.scope,
                limits: &l.rate,
                what: "model",
                id: alias,
            });
        }
        if checks.is_empty() {
            return Ok(());
        }
        let permit = self
            .services
            .limiter
            .acquire(&checks, tokens)
            .map_err(Error::RateLimited)?;
        call.hold(permit);
        Ok(())
    }
}
