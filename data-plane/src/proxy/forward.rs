//! Steps 9–10: attempts until one answers, within the model's deadline.
//! Each attempt picks a healthy target not tried yet in this call (see
//! `crate::routing`); connect errors, timeouts, 429 and 5xx move on to the
//! next after a capped, jittered backoff. A response that reached the caller
//! (a stream's first byte included) is never retried. Targets whose
//! `context_window` the prompt cannot fit are skipped without a call; a
//! target silent past `first_token_timeout` is abandoned (a slow outcome).
//!
//! When the model cannot answer for a reason its `fallbacks` name (the
//! prompt filtered, over the context window, no target available), the
//! listed aliases the caller may use are tried in order, and theirs in turn,
//! at most `MAX_FALLBACK_DEPTH` deep; only before any byte reached the
//! caller. Each hop taken is on the answer (`x-aigw-fallback`), the span,
//! a metric, and the usage event (billed to the alias that answered).

use super::call::Call;
use super::request::Request;
use super::upstream::{self, Attempt};
use super::{Proxy, ProxyBody};
use crate::clock::{deadline_after, monotonic_ms};
use crate::config::Route;
use crate::error::Error;
use crate::openai::Operation;
use crate::routing::{self, Outcome};
use aigw_shared::domain::{Fallbacks, MAX_FALLBACK_DEPTH};
use http::{HeaderName, HeaderValue, Response};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

static FALLBACK: HeaderName = HeaderName::from_static("x-aigw-fallback");

/// Why a model could not answer, as its `fallbacks` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    ContentFilter,
    ContextWindow,
    Unavailable,
}

impl Reason {
    fn of(e: &Error) -> Option<Self> {
        match e {
            Error::ContentFilter { .. } => Some(Self::ContentFilter),
            Error::InvalidRequest {
                code: Some(CONTEXT_LENGTH_EXCEEDED),
                ..
            } => Some(Self::ContextWindow),
            Error::AllTargetsUnavailable { .. }
            | Error::UpstreamRateLimited { .. }
            | Error::Upstream(_)
            | Error::UpstreamConnect(_)
            | Error::Timeout(_)
            | Error::FirstTokenTimeout(_) => Some(Self::Unavailable),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::ContentFilter => "content_filter",
            Self::ContextWindow => "context_window_exceeded",
            Self::Unavailable => "unavailable",
        }
    }

    fn aliases(self, f: &Fallbacks) -> &[String] {
        match self {
            Self::ContentFilter => &f.content_filter,
            Self::ContextWindow => &f.context_window_exceeded,
            Self::Unavailable => &f.unavailable,
        }
    }
}

/// Azure's (and the gateway's) code for a prompt over the context window.
const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

/// One fallback hop: the alias left, why, the one being tried, and the
/// rest of the list after it.
struct Hop {
    from: Arc<str>,
    reason: Reason,
    to: Arc<str>,
    rest: VecDeque<Arc<Route>>,
}

/// Longest wait between two attempts of one call.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Proxy {
    /// The model's answer, or a fallback alias's when the model's own
    /// failure is one its `fallbacks` name.
    pub(super) async fn forward_with_fallbacks(
        &self,
        op: Operation,
        route: &Arc<Route>,
        inbound: &http::HeaderMap,
        request: &Request,
        call: &mut Call,
    ) -> Result<Response<ProxyBody>, Error> {
        let mut hops: Vec<Hop> = Vec::new();
        let mut visited: Vec<Arc<str>> = vec![route.alias.clone()];
        let mut current = route.clone();
        loop {
            let err = match self.forward(op, &current, inbound, request, call).await {
                Ok(mut r) => {
                    for h in &hops {
                        let v = format!("{}; from={}; to={}", h.reason.name(), h.from, h.to);
                        if let Ok(v) = HeaderValue::from_str(&v) {
                            r.headers_mut().append(FALLBACK.clone(), v);
                        }
                    }
                    return Ok(r);
                }
                Err(e) => e,
            };
            if let Some(reason) = Reason::of(&err).filter(|_| hops.len() < MAX_FALLBACK_DEPTH) {
                let rest = self.fallback_routes(&current, reason, &visited, call);
                if !rest.is_empty() {
                    hops.push(Hop {
                        from: current.alias.clone(),
                        reason,
                        to: current.alias.clone(),
                        rest,
                    });
                }
            }
            // The next alias: the deepest hop's next choice; a hop whose
            // list is used up gives way to the one before it.
            let next = loop {
                let Some(hop) = hops.last_mut() else {
                    return Err(err);
                };
                if let Some(next) = hop.rest.pop_front() {
                    hop.to = next.alias.clone();
                    break next;
                }
                hops.pop();
            };
            let hop = hops.last().map(|h| (h.from.clone(), h.reason));
            if let Some((from, reason)) = hop {
                tracing::info!(from = %from, to = %next.alias, reason = reason.name(), error = %err, "falling back to another model");
                self.services
                    .metrics
                    .record_fallback(&from, &next.alias, reason.name());
            }
            visited.push(next.alias.clone());
            call.end.fallback = hops
                .iter()
                .map(|h| format!("{}; from={}; to={}", h.reason.name(), h.from, h.to))
                .collect::<Vec<_>>()
                .join(", ");
            call.routed(next.clone());
            current = next;
        }
    }

    /// The routes `route`'s fallbacks for `reason` name, in order: those
    /// that exist, were not tried in this call, and the caller may use.
    fn fallback_routes(
        &self,
        route: &Route,
        reason: Reason,
        visited: &[Arc<str>],
        call: &Call,
    ) -> VecDeque<Arc<Route>> {
        let aliases = reason.aliases(&route.fallbacks);
        if aliases.is_empty() {
            return VecDeque::new();
        }
        let Some(runtime) = self.config.load() else {
            return VecDeque::new();
        };
        aliases
            .iter()
            .filter(|a| !visited.iter().any(|v| **v == ***a))
            .filter(|a| {
                let allowed = call.caller.as_ref().is_some_and(|c| c.allows(a));
                if !allowed {
                    tracing::debug!(alias = %a, "fallback alias not on the caller's allowlist; skipped");
                }
                allowed
            })
            .filter_map(|a| runtime.route(a).cloned())
            .collect()
    }

    pub(super) async fn forward(
        &self,
        op: Operation,
        route: &Route,
        inbound: &http::HeaderMap,
        request: &Request,
        call: &mut Call,
    ) -> Result<Response<ProxyBody>, Error> {
        let deadline = deadline_after(Instant::now(), route.timeout);
        let mut tried = self.too_small(op, route, request).await?;
        if let Some(pk) = call.responses.as_ref().and_then(|r| r.previous.as_ref()) {
            // A follow-up must reach the resource that stores the response it
            // follows: every other target counts as tried already.
            let pk = &pk.provider_key_id;
            let elsewhere: Vec<usize> = (0..route.targets.len())
                .filter(|&i| route.targets[i].provider_key_id != *pk && !tried.contains(&i))
                .collect();
            tried.extend(elsewhere);
            if (0..route.targets.len()).all(|i| tried.contains(&i)) {
                return Err(Error::ResponseTargetGone(format!(
                    "the previous response is stored by provider key `{pk}`, which is not a target of model `{}`",
                    route.alias
                )));
            }
        }
        let mut last: Option<Error> = None;
        for attempt in 0..=route.retries {
            let choice = match routing::pick(&route.pool, &tried, monotonic_ms()) {
                Ok(c) => c,
                Err(u) => {
                    return Err(last.unwrap_or(Error::AllTargetsUnavailable {
                        retry_after: u.retry_after,
                    }))
                }
            };
            tried.push(choice.index);
            let Some(target) = route.targets.get(choice.index) else {
                break;
            };
            let span = call.attempt(target, choice.probe);
            if attempt > 0 {
                self.services.metrics.record_retry(&route.alias);
            }
            target.health.start();
            let started = Instant::now();
            let attempt_of = Attempt {
                op,
                route,
                target,
                deadline,
                first_token: route
                    .first_token_timeout
                    .and_then(|t| started.checked_add(t)),
                span: &span,
            };
            let result =
                upstream::send(&self.services.http, &attempt_of, inbound, request, call).await;
            let elapsed = started.elapsed();
            let outcome = match &result {
                Ok(_) => Some(Outcome::Success(elapsed)),
                Err(e) => classify(e, elapsed),
            };
            let label = outcome_label(result.is_ok(), outcome);
            self.services
                .metrics
                .record_upstream(&target.deployment, label, elapsed);
            let more = attempt < route.retries;
            match &result {
                Ok(_) => span.end(label, None, None),
                Err(e) => {
                    let code = e.code().unwrap_or("error");
                    span.end(label, Some(code), (retryable(e) && more).then_some(code));
                }
            }
            match outcome {
                Some(o) => target.health.record(o, monotonic_ms(), route.pool.cooldown),
                None => target.health.abandon(),
            }
            let err = match result {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if !retryable(&err) || !more {
                return Err(err);
            }
            let wait = backoff(route.retry_backoff, attempt);
            if Instant::now()
                .checked_add(wait)
                .is_none_or(|t| t >= deadline)
            {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
            last = Some(err);
        }
        Err(last.unwrap_or(Error::AllTargetsUnavailable {
            retry_after: route.pool.cooldown,
        }))
    }
}

impl Proxy {
    /// Indices of the targets whose `context_window` the prompt (plus
    /// `max_tokens`) cannot fit; all of them is `context_length_exceeded`.
    async fn too_small(
        &self,
        op: Operation,
        route: &Route,
        request: &Request,
    ) -> Result<Vec<usize>, Error> {
        let mut skip = Vec::with_capacity(route.targets.len());
        if route.context_windows.iter().all(Option::is_none) {
            return Ok(skip);
        }
        let tokens = super::count_tokens(op, route.tokenizer, request).await?;
        for (i, w) in route.context_windows.iter().enumerate() {
            if w.is_some_and(|w| tokens > w) {
                skip.push(i);
            }
        }
        if skip.len() == route.targets.len() {
            return Err(Error::InvalidRequest {
                message: format!(
                    "this model's context window is {} tokens; the request needs about {tokens} \
                     (prompt plus max_tokens)",
                    route
                        .context_windows
                        .iter()
                        .flatten()
                        .max()
                        .copied()
                        .unwrap_or(0)
                ),
                param: Some("messages"),
                code: Some(CONTEXT_LENGTH_EXCEEDED),
            });
        }
        Ok(skip)
    }
}

/// The wait before attempt `attempt + 1`: exponential, capped, jittered.
fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << attempt.min(6))
        .min(MAX_BACKOFF)
        .mul_f64(rand::random::<f64>() * 0.5 + 0.5)
}

fn outcome_label(ok: bool, outcome: Option<Outcome>) -> &'static str {
    match (ok, outcome) {
        (true, _) => "success",
        (false, Some(Outcome::RateLimited(_))) => "rate_limited",
        (false, Some(Outcome::Failure)) => "failure",
        (false, Some(Outcome::Slow(_))) => "slow",
        _ => "error",
    }
}

/// What an attempt's error says about the target's health; `None` when it
/// says nothing (e.g. our own credential was refused).
fn classify(e: &Error, latency: Duration) -> Option<Outcome> {
    match e {
        Error::UpstreamRateLimited { wait, .. } => Some(Outcome::RateLimited(*wait)),
        Error::FirstTokenTimeout(_) => Some(Outcome::Slow(latency)),
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
            | Error::FirstTokenTimeout(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_names_the_fallback_list_it_takes() {
        let filtered = Error::ContentFilter {
            message: "filtered".into(),
            details: serde_json::Value::Null,
        };
        assert_eq!(Reason::of(&filtered), Some(Reason::ContentFilter));
        let too_long = Error::InvalidRequest {
            message: "too long".into(),
            param: Some("messages"),
            code: Some(CONTEXT_LENGTH_EXCEEDED),
        };
        assert_eq!(Reason::of(&too_long), Some(Reason::ContextWindow));
        for down in [
            Error::AllTargetsUnavailable {
                retry_after: Duration::from_secs(1),
            },
            Error::Upstream("500".into()),
            Error::UpstreamConnect("refused".into()),
            Error::Timeout("late".into()),
            Error::FirstTokenTimeout("silent".into()),
        ] {
            assert_eq!(Reason::of(&down), Some(Reason::Unavailable), "{down}");
        }
        // The caller's own mistakes and the gateway's limits never fall back.
        for own in [
            Error::InvalidRequest {
                message: "bad".into(),
                param: None,
                code: None,
            },
            Error::PermissionDenied("m".into()),
            Error::UpstreamAuth("401".into()),
            Error::BudgetExceeded,
        ] {
            assert_eq!(Reason::of(&own), None, "{own}");
        }
        let f = Fallbacks {
            content_filter: vec!["strict".into()],
            context_window_exceeded: vec!["long".into()],
            unavailable: vec!["mini".into()],
        };
        assert_eq!(Reason::ContentFilter.aliases(&f), ["strict"]);
        assert_eq!(Reason::ContextWindow.aliases(&f), ["long"]);
        assert_eq!(Reason::Unavailable.aliases(&f), ["mini"]);
    }

    #[test]
    fn a_silent_target_is_slow_and_retried() {
        let e = Error::FirstTokenTimeout("silent".into());
        let latency = Duration::from_millis(400);
        assert_eq!(classify(&e, latency), Some(Outcome::Slow(latency)));
        assert!(retryable(&e));
        assert_eq!(outcome_label(false, Some(Outcome::Slow(latency))), "slow");
    }
}
