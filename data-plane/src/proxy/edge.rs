//! The one place data-plane errors become HTTP answers, in the shape of the
//! route the caller used (`call.shape`): the OpenAI error envelope
//! `{"error":{"message","type","param","code"}}` on `/v1` and `/openai/v1`,
//! Azure's `{"error":{"code","message"}}` on `/openai/deployments/…`, with
//! Azure's own codes where Azure has the same error (as recorded in
//! azure-wire.md) and the gateway's codes where it has none.

use super::call::Call;
use super::{Proxy, ProxyBody, REQUEST_ID};
use crate::clock::retry_after_secs;
use crate::error::Error;
use crate::openai::Shape;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

impl Proxy {
    /// The call's answer: the error envelope if it failed, rate-limit
    /// headers, the request id; and the call ends (unless a stream took
    /// its end along).
    pub(super) fn respond(
        &self,
        result: Result<Response<ProxyBody>, Error>,
        mut call: Call,
    ) -> Response<ProxyBody> {
        let metrics = &self.services.metrics;
        let (mut resp, code) = match result {
            Ok(r) => (r, None),
            Err(e) => {
                match &e {
                    Error::RateLimited(_) => metrics.record_rejection("rate_limit"),
                    Error::BudgetExceeded => metrics.record_rejection("budget"),
                    Error::UpstreamRateLimited { .. } => {
                        metrics.record_rejection("upstream_rate_limit")
                    }
                    _ => {}
                }
                let code = e.code();
                (e.into_response(call.shape), code)
            }
        };
        if let Some(r) = call.rate.take() {
            r.apply(resp.headers_mut());
        }
        let status = resp.status().as_u16();
        call.end.close(status, code);
        metrics.record_status(status);
        resp.headers_mut()
            .insert(REQUEST_ID.clone(), call.request_id.clone());
        resp
    }
}

impl Error {
    /// Status, OpenAI `type` and `code`.
    fn classify(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        use Error::*;
        match self {
            InvalidApiKey(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            // 401 `invalid_api_key`, refined by the `jwt_*` code.
            Jwt(e) => (StatusCode::UNAUTHORIZED, "invalid_api_key", Some(e.code())),
            PermissionDenied(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("permission_denied"),
            ),
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            InvalidRequest { code, .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", *code)
            }
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                Some("unsupported_media_type"),
            ),
            PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            UnknownPath(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("unknown_url"),
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                Some("method_not_allowed"),
            ),
            ResponseNotFound { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("response_not_found"),
            ),
            ResponseTargetGone(_) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("response_target_gone"),
            ),
            ResponsesUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("responses_unavailable"),
            ),
            NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("not_ready"),
            ),
            ContentFilter { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("content_filter"),
            ),
            BudgetExceeded => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("budget_exceeded"),
            ),
            RateLimited(_) | UpstreamRateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            UpstreamConnect(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("upstream_route_error"),
            ),
            AllTargetsUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("all_targets_unavailable"),
            ),
            UpstreamAuth(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("upstream_auth_error"),
            ),
            TargetMisconfigured(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("upstream_route_error"),
            ),
            Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("upstream_error"),
            ),
            Timeout(_) | FirstTokenTimeout(_) => {
                (StatusCode::GATEWAY_TIMEOUT, "timeout", Some("timeout"))
            }
            Config(_) | SnapshotFile(_) | Io(_) | Shared(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("internal_error"),
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    /// The same error again, for every caller that waited on one shared
    /// upstream fetch (the cache hands each of them the same `Arc`).
    pub fn duplicate(&self) -> Error {
        use Error::*;
        match self {
            InvalidRequest {
                message,
                param,
                code,
            } => InvalidRequest {
                message: message.clone(),
                param: *param,
                code: *code,
            },
            ContentFilter { message, details } => ContentFilter {
                message: message.clone(),
                details: details.clone(),
            },
            UpstreamRateLimited {
                message,
                retry_after,
                wait,
            } => UpstreamRateLimited {
                message: message.clone(),
                retry_after: retry_after.clone(),
                wait: *wait,
            },
            RateLimited(r) => RateLimited(r.clone()),
            AllTargetsUnavailable { retry_after } => AllTargetsUnavailable {
                retry_after: *retry_after,
            },
            UpstreamAuth(m) => UpstreamAuth(m.clone()),
            TargetMisconfigured(m) => TargetMisconfigured(m.clone()),
            UpstreamConnect(m) => UpstreamConnect(m.clone()),
            Timeout(m) => Timeout(m.clone()),
            FirstTokenTimeout(m) => FirstTokenTimeout(m.clone()),
            other => Upstream(other.to_string()),
        }
    }

    /// The OpenAI `code` the caller sees.
    pub fn code(&self) -> Option<&'static str> {
        self.classify().2
    }

    /// The OpenAI error object.
    fn openai_error(&self) -> Value {
        let (_, kind, code) = self.classify();
        let param: Value = match self {
            Error::InvalidRequest { param, .. } => param.map_or(Value::Null, Value::from),
            Error::ContentFilter { .. } => Value::from("prompt"),
            Error::ModelNotFound(_) | Error::PermissionDenied(_) => Value::from("model"),
            Error::ResponseNotFound { param, .. } => param.map_or(Value::Null, Value::from),
            _ => Value::Null,
        };
        let mut error = json!({
            "message": self.to_string(),
            "type": kind,
            "param": param,
            "code": code,
        });
        if let Error::ContentFilter { details, .. } = self {
            error["content_filter_result"] = details.clone();
        }
        error
    }

    /// Azure's error object. To an Azure client the alias is the
    /// deployment, so an unknown alias is Azure's `DeploymentNotFound`; a
    /// refused key is Azure's `401`, a blocked prompt Azure's own answer.
    fn azure_error(&self) -> Value {
        let (status, _, code) = self.classify();
        let message = self.to_string();
        let (code, message) = match self {
            Error::InvalidApiKey(_) => (
                "401",
                format!(
                    "Access denied due to invalid subscription key or wrong API endpoint: {message}."
                ),
            ),
            Error::ModelNotFound(alias) => (
                "DeploymentNotFound",
                format!("The API deployment for this resource does not exist: no model `{alias}`."),
            ),
            Error::PermissionDenied(_) => ("PermissionDenied", message),
            Error::UnknownPath(_) => ("404", "Resource not found".to_string()),
            Error::ResponseNotFound { .. } => ("404", message),
            Error::RateLimited(_) | Error::UpstreamRateLimited { .. } => ("429", message),
            Error::ContentFilter { details, .. } => {
                return json!({
                    "message": message,
                    "type": null,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": status.as_u16(),
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": details,
                    },
                });
            }
            _ => (code.unwrap_or(status.as_str()), message),
        };
        json!({ "code": code, "message": message })
    }

    /// The error as the caller sees it, in the shape of its route.
    pub fn into_response(self, shape: Shape) -> Response<ProxyBody> {
        let status = self.status();
        let error = match shape {
            Shape::OpenAi => self.openai_error(),
            Shape::Azure => self.azure_error(),
        };
        let retry_after = match &self {
            Error::UpstreamRateLimited { retry_after, .. } => retry_after.clone(),
            Error::AllTargetsUnavailable { retry_after } => {
                Some(HeaderValue::from(retry_after_secs(*retry_after)))
            }
            Error::RateLimited(r) => Some(HeaderValue::from(retry_after_secs(r.retry_after))),
            _ => None,
        };
        if status.is_server_error() && !matches!(self, Error::NotReady) {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let body = serde_json::to_vec(&json!({ "error": error })).unwrap_or_default();
        let mut resp = Response::new(super::full(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(v) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let Error::RateLimited(r) = &self {
            r.apply_headers(resp.headers_mut());
        }
        resp
    }
}
