//! OpenTelemetry glue for the proxy: the call's server span (GenAI semantic
//! conventions), the caller's W3C `traceparent` as its parent, and the
//! current span's context injected into the upstream request.
//!
//! Without an OTLP endpoint the spans are plain `tracing` spans (they feed the
//! logs), no context exists, and the caller's trace headers go upstream as
//! they came.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// `gen_ai.operation.name` for a proxy path.
pub fn operation_name(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "text_completion",
        "/v1/embeddings" => "embeddings",
        "/v1/models" => "list_models",
        _ => "http",
    }
}

/// The server span of one call, child of the caller's `traceparent` when it
/// sent one. Renamed `{operation} {alias}` once the alias is known
/// ([`name_call`]); attributes are filled in as the call goes and when it ends
/// (`usage::Accounting`).
pub fn server_span(method: &http::Method, path: &str, headers: &HeaderMap) -> Span {
    let op = operation_name(path);
    let span = tracing::info_span!(
        "serve",
        otel.name = op,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        request_id = tracing::field::Empty,
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        gen_ai.operation.name = op,
        gen_ai.system = "az.ai.openai",
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.request.max_tokens = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        server.address = tracing::field::Empty,
        // Recorded by `auth`: the api key's id (never the key) and a JWT caller's id.
        api_key_id = tracing::field::Empty,
        caller_id = tracing::field::Empty,
        aigw.stream = tracing::field::Empty,
    );
    if headers.contains_key("traceparent") {
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(headers)));
        if parent.span().span_context().is_valid() {
            // Fails only without the OpenTelemetry layer: nothing to link then.
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// Names the current (server) span `{operation} {alias}` and records the
/// request attributes known once the call is read.
pub fn name_call(op: &str, alias: &str, max_tokens: Option<u64>, stream: bool) {
    let span = Span::current();
    span.record("gen_ai.request.model", alias);
    span.record("aigw.stream", stream);
    if let Some(m) = max_tokens {
        span.record("gen_ai.request.max_tokens", m);
    }
    let cx = span.context();
    let otel = cx.span();
    if otel.span_context().is_valid() {
        otel.update_name(format!("{op} {alias}"));
    }
}

/// Writes the current span's `traceparent`/`tracestate` into `headers`;
/// `false` when there is no trace context (tracing off).
pub fn inject_current(headers: &mut HeaderMap) -> bool {
    let cx = Span::current().context();
    if !cx.span().span_context().is_valid() {
        return false;
    }
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Inject(headers)));
    true
}
