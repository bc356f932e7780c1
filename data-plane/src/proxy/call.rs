//! One proxy call's state, owned in one place: who called, which model
//! route serves it, its rate-limit permit, its span and its usage record,
//! and the attempts made. Pipeline steps (`super`) are methods over it.
//!
//! The span, the usage record and the permit end together, exactly once
//! ([`CallEnd`]): when the answer is sent, or — for a stream — with its last
//! chunk or the caller's cancellation, the stream taking them along.

use super::auth::Authenticated;
use super::trace::{AttemptSpan, CallAttributes, CallSpan};
use crate::config::{Route, Target};
use crate::limits::{Permit, RateHeaders};
use crate::openai::{Operation, Shape};
use crate::response_ids::{IdScope, ResponseIds, ResponseRef};
use crate::usage::{Accounting, CacheStatus, UsageRecorder};
use http::HeaderValue;
use std::sync::Arc;

pub struct Call {
    pub request_id: HeaderValue,
    /// The answer's shape, from the route the caller used (errors too).
    pub shape: Shape,
    /// Known once the path is routed.
    pub op: Option<Operation>,
    /// Known once authenticated.
    pub caller: Option<Authenticated>,
    /// The model route, once the alias is authorised.
    pub route: Option<Arc<Route>>,
    /// Rate-limit headers for the answer.
    pub rate: Option<RateHeaders>,
    /// Upstream attempts made so far.
    pub attempts: u32,
    /// A Responses API call: its id sealer and the stored response it
    /// follows up on.
    pub responses: Option<ResponsesCall>,
    pub end: CallEnd,
}

/// What a Responses API call carries besides the request.
pub struct ResponsesCall {
    pub ids: Arc<ResponseIds>,
    /// The opened `previous_response_id`: the call goes to its provider key.
    pub previous: Option<ResponseRef>,
}

impl Call {
    /// How the ids of an answer from `target` are sealed for this caller.
    pub fn id_scope(&self, target: &Target, alias: &str) -> Option<IdScope> {
        let r = self.responses.as_ref()?;
        Some(IdScope {
            ids: r.ids.clone(),
            provider_key_id: target.provider_key_id.clone(),
            api_key_id: self.caller.as_ref()?.id.clone(),
            alias: alias.to_string(),
        })
    }
}

impl Call {
    pub fn new(request_id: HeaderValue, span: CallSpan, shape: Shape) -> Self {
        Self {
            request_id,
            shape,
            op: None,
            caller: None,
            route: None,
            rate: None,
            attempts: 0,
            responses: None,
            end: CallEnd {
                span,
                usage: None,
                permit: None,
                max_tokens: None,
                api_version: None,
                server_address: String::new(),
                fallback: String::new(),
                done: false,
            },
        }
    }

    /// The caller is known: usage is accounted for from here on.
    pub fn authenticated(
        &mut self,
        caller: Authenticated,
        op: Operation,
        usage: &Arc<UsageRecorder>,
    ) {
        let mut acct = usage.begin(&caller.id, op.name());
        acct.event.caller_id = caller.caller_id().to_string();
        acct.request_id = self.request_id.to_str().unwrap_or_default().to_string();
        self.end.usage = Some(acct);
        self.caller = Some(caller);
    }

    /// The usage record, once the caller is known.
    pub fn usage(&mut self) -> Option<&mut Accounting> {
        self.end.usage.as_mut()
    }

    /// The alias is authorised: the call is the model route's.
    pub fn routed(&mut self, route: Arc<Route>) {
        if let Some(a) = self.usage() {
            a.event.model = route.alias.to_string();
        }
        self.route = Some(route);
    }

    pub fn hold(&mut self, permit: Permit) {
        self.rate = Some(permit.headers());
        self.end.permit = Some(permit);
    }

    pub fn cache_status(&mut self, status: CacheStatus) {
        if let Some(a) = self.usage() {
            a.event.cache_status = status as i32;
        }
    }

    /// An attempt goes to `target`: recorded, and its client span started.
    pub fn attempt(&mut self, target: &Target, probe: bool) -> AttemptSpan {
        let attempt = self.attempts;
        self.attempts += 1;
        let recording = self.end.span.is_recording();
        if let Some(a) = self.end.usage.as_mut() {
            a.event.deployment.clone_from(&target.deployment);
            a.event.provider_key_id.clone_from(&target.provider_key_id);
        }
        if recording {
            target.host.clone_into(&mut self.end.server_address);
        }
        self.end
            .span
            .attempt(attempt, &target.deployment, &target.host, probe)
    }

    /// The end of the call, for a stream to take along; the call keeps
    /// nothing to end.
    pub fn hand_off(&mut self) -> CallEnd {
        std::mem::replace(&mut self.end, CallEnd::detached())
    }
}

/// What ends with the call, once: its span, its usage record, its permit.
/// Dropped without [`CallEnd::close`] (the caller went away), the call is
/// recorded as 499 `client_closed_request`.
pub struct CallEnd {
    span: CallSpan,
    usage: Option<Accounting>,
    permit: Option<Permit>,
    /// The request's `max_tokens`, for the span.
    pub max_tokens: Option<u64>,
    /// The caller's `api-version` (Azure's deployment route), for the span
    /// and the access log.
    pub api_version: Option<String>,
    /// The host of the target tried last (kept only when the span records).
    server_address: String,
    /// The fallbacks taken, as in `x-aigw-fallback`, for the span.
    pub fallback: String,
    done: bool,
}

impl CallEnd {
    /// Nothing to end (handed off, or a test).
    pub fn detached() -> Self {
        Self {
            span: CallSpan::none(),
            usage: None,
            permit: None,
            max_tokens: None,
            api_version: None,
            server_address: String::new(),
            fallback: String::new(),
            done: true,
        }
    }

    pub fn usage(&mut self) -> Option<&mut Accounting> {
        self.usage.as_mut()
    }

    /// Ends the call answered with `status` (and `error_code` if it failed).
    pub fn close(&mut self, status: u16, error_code: Option<&str>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let Some(mut acct) = self.usage.take() else {
            // Refused before the caller was known: no usage, and the span
            // keeps the name it started with.
            self.span.end(&CallAttributes {
                status,
                error_code: error_code.unwrap_or_default(),
                api_version: self.api_version.as_deref().unwrap_or_default(),
                ..CallAttributes::default()
            });
            return;
        };
        acct.settle(status, error_code);
        if let Some(v) = self.api_version.take() {
            acct.api_version = v;
        }
        let e = &acct.event;
        if let Some(p) = self.permit.as_mut() {
            p.settle(e.total_tokens);
        }
        let trace_id = self.span.trace_id();
        self.span.end(&CallAttributes {
            operation: &e.operation,
            alias: &e.model,
            status,
            error_code: &e.error_code,
            api_key_id: &e.api_key_id,
            caller_id: &e.caller_id,
            response_model: &acct.response_model,
            max_tokens: self.max_tokens,
            stream: e.stream,
            usage: Some((e.prompt_tokens, e.completion_tokens)),
            server_address: &self.server_address,
            api_version: &acct.api_version,
            fallback: &self.fallback,
        });
        acct.emit(trace_id.as_str());
        // The permit's concurrency slot goes back now.
        self.permit = None;
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.close(499, Some("client_closed_request"));
    }
}
