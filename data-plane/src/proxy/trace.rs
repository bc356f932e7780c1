//! OpenTelemetry spans of the proxy: the call's server span (GenAI semantic
//! conventions), the caller's W3C `traceparent` as its parent, a client span
//! per upstream attempt, and that attempt's context injected into the
//! upstream request.
//!
//! These two spans are built with the OpenTelemetry API directly, not through
//! `tracing`: the per-field `record` of the `tracing` bridge (a visitor, an
//! extension lookup and an allocation per attribute) was most of what tracing
//! cost a call. The attributes known as the call goes are set on the span in
//! one batch when it ends ([`CallSpan::end`]). The `tracing` span of the call
//! (`serve`, target `aigw_data_plane::call`) feeds the logs only.
//!
//! Without an OTLP endpoint there is no span at all, no context, and the
//! caller's trace headers go upstream as they came, if well formed
//! and within bounds (`caller_trace_header`).

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::Span as SdkSpan;

/// Longest caller `tracestate` taken (the W3C minimum a vendor must
/// propagate); longer ones are dropped, not cut.
pub const MAX_TRACESTATE: usize = 512;
/// Longest caller `x-request-id` taken; a longer or odd one is replaced.
pub const MAX_REQUEST_ID: usize = 64;

/// The caller's trace header `name`, if it is well formed and within bounds:
/// what reaches Azure, the span and the logs from a caller is checked first.
pub fn caller_trace_header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h HeaderValue> {
    let v = headers.get(name)?;
    let ok = match name {
        "traceparent" => traceparent_ok(v.as_bytes()),
        // Meaningless without the parent it goes with.
        "tracestate" => {
            caller_trace_header(headers, "traceparent").is_some() && tracestate_ok(v.as_bytes())
        }
        _ => false,
    };
    ok.then_some(v)
}

/// W3C version-00 shape: `vv-<32 hex>-<16 hex>-ff`, lowercase.
fn traceparent_ok(v: &[u8]) -> bool {
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    v.len() == 55
        && v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[..2])
        && hex(&v[3..35])
        && hex(&v[36..52])
        && hex(&v[53..])
}

/// Printable ASCII within [`MAX_TRACESTATE`].
fn tracestate_ok(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_TRACESTATE && v.iter().all(|c| (0x20..0x7f).contains(c))
}

/// A caller's `x-request-id` worth echoing and passing on: 1 to
/// [`MAX_REQUEST_ID`] characters of `[A-Za-z0-9._:-]` (UUIDs, ULIDs, hex).
pub fn request_id_ok(v: &HeaderValue) -> bool {
    let v = v.as_bytes();
    !v.is_empty()
        && v.len() <= MAX_REQUEST_ID
        && v.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        caller_trace_header(self.0, key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A trace id in hex, or nothing (see [`CallSpan::trace_id`]).
#[derive(Default)]
pub struct TraceIdHex([u8; 32], bool);

impl TraceIdHex {
    pub fn as_str(&self) -> &str {
        if self.1 {
            std::str::from_utf8(&self.0).unwrap_or_default()
        } else {
            ""
        }
    }
}

/// The server span of one call (`{operation} {alias}`), or nothing when
/// traces are not exported. Ended once, by [`CallSpan::end`], when the call
/// ends (`call::CallEnd`; a stream's with its last chunk).
///
/// The SDK's span itself, owned, rather than inside a `Context` (an `Arc`
/// and a mutex taken by every call on it): the call is its only user. Boxed:
/// the SDK's span is ~0.5 KB, and an untraced call should not carry (and
/// move) that much.
pub struct CallSpan {
    span: Option<Box<SdkSpan>>,
}

/// What the call's span learns before it ends, set on it in one batch.
#[derive(Default)]
pub struct CallAttributes<'a> {
    pub operation: &'a str,
    pub alias: &'a str,
    pub status: u16,
    pub error_code: &'a str,
    pub api_key_id: &'a str,
    pub caller_id: &'a str,
    pub response_model: &'a str,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// Token counts, when the call got as far as Azure (or the cache).
    pub usage: Option<(u64, u64)>,
    pub server_address: &'a str,
    /// The caller's `api-version` on Azure's deployment route.
    pub api_version: &'a str,
    /// The fallbacks taken (`x-aigw-fallback`), if any.
    pub fallback: &'a str,
}

impl CallSpan {
    /// A span that records nothing (traces off, or a test).
    pub fn none() -> Self {
        Self { span: None }
    }

    /// Starts the call's server span, a child of the caller's `traceparent`
    /// when it sent a valid one.
    pub fn start(method: &http::Method, path: &str, headers: &HeaderMap) -> Self {
        let Some(tracer) = aigw_shared::telemetry::tracer() else {
            return Self::none();
        };
        let parent = if headers.contains_key("traceparent") {
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(headers)))
        } else {
            Context::new()
        };
        let op = crate::openai::operation::span_name(method, path);
        // The span keeps this vector: room for what `end` adds, without regrowing.
        let mut attributes = Vec::with_capacity(15);
        attributes.push(KeyValue::new("gen_ai.operation.name", op));
        attributes.push(KeyValue::new("gen_ai.system", "az.ai.openai"));
        if op == crate::openai::operation::UNKNOWN_NAME || *method != http::Method::POST {
            // Not a GenAI call (a 404 or 405): say what was asked for.
            attributes.push(KeyValue::new("http.request.method", method.to_string()));
            attributes.push(KeyValue::new("url.path", path.to_string()));
        }
        let span = tracer
            .span_builder(op)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Self {
            span: Some(Box::new(span)),
        }
    }

    /// Whether the span records (traced and sampled).
    pub fn is_recording(&self) -> bool {
        self.span.as_ref().is_some_and(|s| s.is_recording())
    }

    /// The trace id for logs (hex, on the stack); empty when untraced.
    pub fn trace_id(&self) -> TraceIdHex {
        let mut id = TraceIdHex::default();
        if let Some(span) = &self.span {
            let sc = span.span_context();
            if sc.is_valid() && hex::encode_to_slice(sc.trace_id().to_bytes(), &mut id.0).is_ok() {
                id.1 = true;
            }
        }
        id
    }

    /// Starts the client span of one upstream attempt, a child of this call.
    pub fn attempt(
        &self,
        attempt: u32,
        deployment: &str,
        server_address: &str,
        probe: bool,
    ) -> AttemptSpan {
        let (Some(call), Some(tracer)) = (&self.span, aigw_shared::telemetry::tracer()) else {
            return AttemptSpan::none();
        };
        let sc = call.span_context().clone();
        if !call.is_recording() {
            // Not sampled: the attempt inherits the decision; only the
            // context travels upstream.
            return AttemptSpan(Attempt::Unsampled(sc));
        }
        // A local parent: the span context as it is (not remote).
        let parent = Context::new().with_remote_span_context(sc);
        let span = tracer
            .span_builder("upstream_attempt")
            .with_kind(SpanKind::Client)
            .with_attributes(
                [
                    KeyValue::new("attempt", i64::from(attempt)),
                    KeyValue::new("deployment", deployment.to_string()),
                    KeyValue::new("server.address", server_address.to_string()),
                ]
                .into_iter()
                .chain(probe.then(|| KeyValue::new("probe", true))),
            )
            .start_with_context(tracer, &parent);
        AttemptSpan(Attempt::Recording(Box::new(span)))
    }

    /// Sets what the call learned and ends the span (once).
    pub fn end(&mut self, a: &CallAttributes<'_>) {
        let Some(mut span) = self.span.take() else {
            return;
        };
        if !span.is_recording() {
            return;
        }
        if !a.alias.is_empty() {
            let mut name = String::with_capacity(a.operation.len() + 1 + a.alias.len());
            name.push_str(a.operation);
            name.push(' ');
            name.push_str(a.alias);
            span.update_name(name);
        }
        // Set one by one on the span we own: no list to build and free.
        let mut str_attr = |k: &'static str, v: &str| {
            if !v.is_empty() {
                span.set_attribute(KeyValue::new(k, v.to_string()));
            }
        };
        // The request id is not here: the access log line has this trace's id.
        str_attr("api_key_id", a.api_key_id);
        str_attr("caller_id", a.caller_id);
        str_attr("gen_ai.request.model", a.alias);
        str_attr("gen_ai.response.model", a.response_model);
        str_attr("server.address", a.server_address);
        str_attr("error.type", a.error_code);
        str_attr("aigw.request.api_version", a.api_version);
        str_attr("aigw.fallback", a.fallback);
        if a.status != 0 {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(a.status),
            ));
        }
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if let Some(m) = a.max_tokens {
            span.set_attribute(KeyValue::new("gen_ai.request.max_tokens", int(m)));
        }
        if let Some((input, output)) = a.usage {
            span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", int(input)));
            span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", int(output)));
        }
        if a.stream {
            span.set_attribute(KeyValue::new("aigw.stream", true));
        }
        if a.status >= 500 || a.error_code == "upstream_stream_error" {
            span.set_status(Status::error(a.error_code.to_string()));
        }
        span.end();
    }
}

/// The client span of one upstream attempt (see [`CallSpan::attempt`]).
/// A span nobody ended (a panic unwinding) ends when dropped (the SDK's
/// `Drop`), as does a call's.
pub struct AttemptSpan(Attempt);

enum Attempt {
    /// Traces are off.
    Untraced,
    /// The call is not sampled: its context still goes upstream.
    Unsampled(SpanContext),
    /// Boxed for the reason [`CallSpan`]'s is.
    Recording(Box<SdkSpan>),
}

impl AttemptSpan {
    /// An attempt of an untraced call.
    pub fn none() -> Self {
        Self(Attempt::Untraced)
    }

    /// Writes this attempt's `traceparent` (and `tracestate`, if any) into
    /// `headers`; `false` when there is no trace context (tracing off).
    pub fn inject(&self, headers: &mut HeaderMap) -> bool {
        let sc = match &self.0 {
            Attempt::Untraced => return false,
            Attempt::Unsampled(sc) => sc,
            Attempt::Recording(span) => span.span_context(),
        };
        if !sc.is_valid() {
            return false;
        }
        // W3C trace context, written here rather than through the global
        // propagator (a lock and three string allocations per call).
        let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let ids = hex::encode_to_slice(sc.trace_id().to_bytes(), &mut tp[3..35])
            .and_then(|()| hex::encode_to_slice(sc.span_id().to_bytes(), &mut tp[36..52]))
            .and_then(|()| hex::encode_to_slice([sc.trace_flags().to_u8()], &mut tp[53..55]));
        if let (Ok(()), Ok(v)) = (ids, HeaderValue::from_bytes(&tp)) {
            headers.insert(TRACEPARENT.clone(), v);
        }
        let state = sc.trace_state().header();
        if !state.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&state) {
                headers.insert(TRACESTATE.clone(), v);
            }
        }
        true
    }

    /// Ends the attempt with its outcome: `error` (the error's code) and,
    /// when another attempt follows, `retry_reason`.
    pub fn end(self, outcome: &str, error: Option<&str>, retry_reason: Option<&str>) {
        let Attempt::Recording(mut span) = self.0 else {
            return;
        };
        // A success is the span's unset status; only a failure says more.
        if let Some(code) = error {
            let mut kv = vec![
                KeyValue::new("outcome", outcome.to_string()),
                KeyValue::new("error.type", code.to_string()),
            ];
            if let Some(reason) = retry_reason {
                kv.push(KeyValue::new("retry_reason", reason.to_string()));
            }
            span.set_attributes(kv);
            span.set_status(Status::error(code.to_string()));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use std::collections::HashMap;

    #[test]
    fn caller_trace_headers_are_bounded_and_well_formed() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = |tp: &str, ts: &str| {
            let mut h = HeaderMap::new();
            h.insert("traceparent", HeaderValue::from_str(tp).unwrap());
            h.insert("tracestate", HeaderValue::from_str(ts).unwrap());
            h
        };
        let ok = h(TP, "vendor=abc,other=x1");
        assert!(caller_trace_header(&ok, "traceparent").is_some());
        assert!(caller_trace_header(&ok, "tracestate").is_some());
        let big = h(TP, &format!("v={}", "a".repeat(3000)));
        assert!(caller_trace_header(&big, "traceparent").is_some());
        assert!(
            caller_trace_header(&big, "tracestate").is_none(),
            "3 KB tracestate"
        );
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
            "",
        ] {
            let b = h(bad, "v=1");
            assert!(caller_trace_header(&b, "traceparent").is_none(), "{bad}");
            assert!(caller_trace_header(&b, "tracestate").is_none(), "{bad}");
        }
        assert!(request_id_ok(&HeaderValue::from_static(
            "0b5d2c6e-1f7a-4e08-9d2b-6f0a8f3d2c11"
        )));
        for bad in [
            &b""[..],
            &[b'a'; 65][..],
            b"id with spaces",
            b"id\tx",
            b"a/b",
            b"caf\xc3\xa9",
        ] {
            assert!(
                !request_id_ok(&HeaderValue::from_bytes(bad).unwrap()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn attempt_headers_match_the_w3c_propagator() {
        for (flags, state) in [
            (TraceFlags::SAMPLED, TraceState::default()),
            (
                TraceFlags::default(),
                TraceState::from_key_value([("vendor", "abc"), ("other", "x1")]).unwrap(),
            ),
        ] {
            let sc = SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                true,
                state,
            );
            let cx = Context::new().with_remote_span_context(sc.clone());
            let mut expected = HashMap::new();
            TraceContextPropagator::new().inject_context(&cx, &mut expected);
            let mut headers = HeaderMap::new();
            assert!(AttemptSpan(Attempt::Unsampled(sc)).inject(&mut headers));
            let got: HashMap<String, String> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            expected.retain(|_, v| !v.is_empty());
            assert_eq!(got, expected);
        }
        assert!(!AttemptSpan::none().inject(&mut HeaderMap::new()));
    }
}
