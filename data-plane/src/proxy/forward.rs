//! Steps 9–10: attempts until one answers, within the model's deadline.
//! Each attempt picks a healthy target not tried yet in this call (see
//! `crate::routing`); connect errors, timeouts, 429 and 5xx move on to the
//! next after a capped, jittered backoff. A response that reached the caller
//! (a stream's first byte included) is never retried.

use super::call::Call;
use super::request::Request;
use super::upstream::{self, Attempt};
use super::{Proxy, ProxyBody};
use crate::clock::{deadline_after, monotonic_ms};
use crate::config::Route;
use crate::error::Error;
use crate::openai::Operation;
use crate::routing::{self, Outcome};
use http::Response;
use std::time::Duration;
use tokio::time::Instant;

/// Longest wait between two attempts of one call.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Proxy {
    pub(super) async fn forward(
        &self,
        op: Operation,
        route: &Route,
        inbound: &http::HeaderMap,
        request: &Request,
        call: &mut Call,
    ) -> Result<Response<ProxyBody>, Error> {
        let deadline = deadline_after(Instant::now(), route.timeout);
        let mut tried: Vec<usize> = Vec::with_capacity(route.targets.len());
        if let Some(pk) = call.responses.as_ref().and_then(|r| r.previous.as_ref()) {
            // A follow-up must reach the resource that stores the response it
            // follows: every other target counts as tried already.
            let pk = &pk.provider_key_id;
            tried.extend(
                (0..route.targets.len()).filter(|&i| route.targets[i].provider_key_id != *pk),
            );
            if tried.len() == route.targets.len() {
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
        _ => "error",
    }
}

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
