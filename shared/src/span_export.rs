//! OTLP/gRPC export of the proxy's call spans, encoded straight from the
//! SDK's `SpanData` to protobuf bytes.
//!
//! Why not opentelemetry-otlp's exporter for these: per call it cost ~30k
//! instructions (a callgrind profile, two spans a call), three quarters of
//! tracing's whole cost: a deep copy of every batch kept for retries, a
//! conversion into owned protobuf structs (a `String` per key and value), and
//! prost's encoding, which recomputes each nested message's length at every
//! level. Here each batch is written once, in the field order prost uses, so
//! the bytes are the same as that exporter's (the tests check byte for
//! byte); the pieces go out as they are, and a retry resends the same bytes.
//!
//! Only the call spans, the bulk of what a node exports, take this path;
//! every other span (admin mutations, background work) goes through
//! opentelemetry-otlp's exporter (`telemetry::build_providers`).

use bytes::Bytes;
use opentelemetry::trace::{SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use std::time::{Duration, SystemTime};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::Channel;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// The OTLP default for an export call.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of a batch the collector could not take now (the OTLP spec's
/// retryable codes), after 100, 200 and 400 ms.
const RETRIES: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Exports call spans to an OTLP/gRPC collector (see the module doc).
pub struct CallSpanExporter {
    channel: Channel,
    /// The runtime the channel's connection runs on; exports run there too
    /// (the SDK's batch thread only waits for them).
    runtime: tokio::runtime::Handle,
    metadata: MetadataMap,
    timeout: Duration,
    /// The `Resource` message's body, encoded once (`set_resource`).
    resource: Vec<u8>,
    resource_schema: String,
}

impl std::fmt::Debug for CallSpanExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallSpanExporter")
    }
}

/// What the standard `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` and `..._TIMEOUT`
/// variables set, read as opentelemetry-otlp reads them for the other spans.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub metadata: MetadataMap,
    pub timeout: Duration,
}

impl ExportOptions {
    /// From the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// From `var` (a variable's value by name); the signal-specific
    /// `_TRACES_` variable wins over the general one.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| {
            var(&format!("OTEL_EXPORTER_OTLP_TRACES_{name}"))
                .or_else(|| var(&format!("OTEL_EXPORTER_OTLP_{name}")))
        };
        Self {
            metadata: get("HEADERS")
                .map(|h| parse_headers(&h))
                .unwrap_or_default(),
            timeout: get("TIMEOUT")
                .and_then(|ms| ms.trim().parse::<u64>().ok())
                .map_or(DEFAULT_TIMEOUT, Duration::from_millis),
        }
    }
}

impl CallSpanExporter {
    /// An exporter to `endpoint` (plain `http://`, as opentelemetry-otlp's is
    /// built here: without its TLS features it refuses `https://`),
    /// connecting on first use; call it inside `runtime`'s context.
    pub fn new(
        endpoint: &str,
        runtime: tokio::runtime::Handle,
        options: ExportOptions,
    ) -> Result<Self, String> {
        let ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("invalid OTLP endpoint {endpoint:?}: {e}"))?
            .timeout(options.timeout);
        let _rt = runtime.enter();
        Ok(Self {
            channel: ep.connect_lazy(),
            runtime: runtime.clone(),
            metadata: options.metadata,
            timeout: options.timeout,
            resource: Vec::new(),
            resource_schema: String::new(),
        })
    }
}

/// `k1=v1,k2=v2` with percent-encoded values (the OTLP exporter variables'
/// format); entries that are not valid gRPC metadata are skipped.
fn parse_headers(spec: &str) -> MetadataMap {
    let mut map = MetadataMap::new();
    for entry in spec.split(',') {
        let Some((k, v)) = entry.split_once('=') else {
            continue;
        };
        let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(k.trim().to_ascii_lowercase().as_bytes()),
            MetadataValue::try_from(
                percent_encoding::percent_decode_str(v.trim())
                    .decode_utf8_lossy()
                    .as_ref(),
            ),
        ) else {
            continue;
        };
        map.insert(key, value);
    }
    map
}

impl SpanExporter for CallSpanExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let body = encode_request(&self.resource, &self.resource_schema, &batch);
        drop(batch);
        let (channel, metadata, timeout) =
            (self.channel.clone(), self.metadata.clone(), self.timeout);
        let task = self.runtime.spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            let mut retries = 0;
            loop {
                match send(channel.clone(), metadata.clone(), timeout, body.clone()).await {
                    Err(s) if retries < RETRIES && retryable(s.code()) => {
                        retries += 1;
                        tokio::time::sleep(backoff).await;
                        backoff = backoff.saturating_mul(2);
                    }
                    other => return other,
                }
            }
        });
        match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(s)) => Err(OTelSdkError::InternalFailure(format!(
                "OTLP export of call spans failed: {:?}: {}",
                s.code(),
                s.message()
            ))),
            Err(e) => Err(OTelSdkError::InternalFailure(format!(
                "OTLP export task: {e}"
            ))),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource.clear();
        for (k, v) in resource.iter() {
            key_value(&mut self.resource, 1, k.as_str(), v);
        }
        self.resource_schema = resource.schema_url().unwrap_or_default().to_string();
    }
}

/// The codes the OTLP spec says to retry. RESOURCE_EXHAUSTED is retried
/// always: the spec wants a server's retry info for it, which we do not
/// read, and a collector sends it when it sheds load.
fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled
            | DeadlineExceeded
            | ResourceExhausted
            | Aborted
            | OutOfRange
            | Unavailable
            | DataLoss
    )
}

/// One unary `Export` call, written by hand over the channel: the batch's
/// pieces are the request body's frames as they are (tonic's codec would
/// copy them into one buffer first).
async fn send(
    mut channel: Channel,
    metadata: MetadataMap,
    timeout: Duration,
    pieces: Vec<Bytes>,
) -> Result<(), tonic::Status> {
    let len: usize = pieces.iter().map(Bytes::len).sum();
    let len =
        u32::try_from(len).map_err(|_| tonic::Status::resource_exhausted("a batch over 4 GiB"))?;
    // The gRPC message prefix: not compressed, then the length.
    let mut prefix = [0u8; 5];
    prefix[1..].copy_from_slice(&len.to_be_bytes());
    let frames = std::iter::once(Bytes::copy_from_slice(&prefix))
        .chain(pieces)
        .map(|b| Ok::<_, std::convert::Infallible>(http_body::Frame::data(b)));
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
        frames,
    )));
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(EXPORT_PATH);
    let headers = request.headers_mut();
    *headers = metadata.into_headers();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    if let Ok(v) = http::HeaderValue::from_str(&format!("{}m", timeout.as_millis())) {
        headers.insert("grpc-timeout", v);
    }
    let unavailable =
        |e: &dyn std::fmt::Display| tonic::Status::unavailable(format!("OTLP collector: {e}"));
    std::future::poll_fn(|cx| tonic::codegen::Service::poll_ready(&mut channel, cx))
        .await
        .map_err(|e| unavailable(&e))?;
    let response = tonic::codegen::Service::call(&mut channel, request)
        .await
        .map_err(|e| unavailable(&e))?;
    let (parts, body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(http_status(parts.status));
    }
    // An answer is a few bytes; a collector that sends more is broken.
    let collected = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 64 << 10))
        .await
        .map_err(|e| tonic::Status::internal(format!("OTLP collector's answer: {e}")))?;
    // The status is in the trailers, or in the headers of a trailers-only
    // answer (what a failed call usually is).
    let status = collected
        .trailers()
        .and_then(tonic::Status::from_header_map)
        .or_else(|| tonic::Status::from_header_map(&parts.headers))
        .ok_or_else(|| tonic::Status::internal("the OTLP collector's answer has no grpc-status"))?;
    if status.code() != tonic::Code::Ok {
        return Err(status);
    }
    let data = collected.to_bytes();
    let response = match data.get(5..) {
        Some(message) => <ExportResponse as prost::Message>::decode(message)
            .map_err(|e| tonic::Status::internal(format!("OTLP collector's answer: {e}")))?,
        None => ExportResponse::default(),
    };
    if let Some(p) = response.partial_success {
        if p.rejected_spans > 0 || !p.error_message.is_empty() {
            tracing::warn!(
                rejected_spans = p.rejected_spans,
                error_message = %p.error_message,
                "the OTLP collector rejected call spans"
            );
        }
    }
    Ok(())
}

/// The gRPC code for an HTTP status other than 200 (the gRPC spec's table).
fn http_status(status: http::StatusCode) -> tonic::Status {
    use tonic::Code;
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    tonic::Status::new(code, format!("the OTLP collector answered HTTP {status}"))
}

/// `ExportTraceServiceResponse`, what we read of it.
#[derive(Clone, PartialEq, prost::Message)]
struct ExportResponse {
    #[prost(message, optional, tag = "1")]
    partial_success: Option<PartialSuccess>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PartialSuccess {
    #[prost(int64, tag = "1")]
    rejected_spans: i64,
    #[prost(string, tag = "2")]
    error_message: String,
}

// Protobuf wire types.
const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

/// `ExportTraceServiceRequest` with one `ResourceSpans` (the resource
/// given encoded) holding a `ScopeSpans` per instrumentation scope, in
/// order of first appearance: what opentelemetry-otlp sends for a batch.
///
/// Returned as the pieces to send one after the other: the spans of each
/// scope are written once, into a buffer of their own, and the few bytes
/// around them, which need the spans' length, are pieces of their own
/// (rather than moving a batch's spans to make room for a length).
pub fn encode_request(resource: &[u8], schema: &str, spans: &[SpanData]) -> Vec<Bytes> {
    // Spans by scope, scopes in order of first appearance.
    let mut groups: Vec<(&InstrumentationScope, Vec<&SpanData>)> = Vec::new();
    for s in spans {
        let scope = &s.instrumentation_scope;
        match groups.iter_mut().find(|(g, _)| *g == scope) {
            Some((_, members)) => members.push(s),
            None => groups.push((scope, vec![s])),
        }
    }
    // Each `ScopeSpans` body: the scope, its spans, its schema.
    let scope_spans: Vec<[Vec<u8>; 3]> = groups
        .into_iter()
        .map(|(scope, members)| {
            let mut head = Vec::new();
            message(&mut head, 1, |o| {
                string(o, 1, scope.name());
                string(o, 2, scope.version().unwrap_or_default());
                for kv in scope.attributes() {
                    attribute(o, 3, kv);
                }
            });
            let mut body = Vec::with_capacity(members.len() * 400);
            for span in members {
                message(&mut body, 2, |o| encode_span(o, span));
            }
            let mut tail = Vec::new();
            string(&mut tail, 3, scope.schema_url().unwrap_or_default());
            [head, body, tail]
        })
        .collect();
    let scope_len = |p: &[Vec<u8>; 3]| p.iter().map(Vec::len).sum::<usize>();
    let mut resource_field = Vec::with_capacity(resource.len() + 4);
    message(&mut resource_field, 1, |o| o.extend_from_slice(resource));
    let mut tail = Vec::new();
    string(&mut tail, 3, schema);
    let resource_spans_len = resource_field.len()
        + scope_spans
            .iter()
            .map(|p| delimited_len(scope_len(p)))
            .sum::<usize>()
        + tail.len();
    let mut head = Vec::with_capacity(16 + resource_field.len());
    tag(&mut head, 1, LEN);
    varint(&mut head, resource_spans_len as u64);
    head.extend_from_slice(&resource_field);
    let mut pieces = Vec::with_capacity(2 * scope_spans.len() + 1);
    for p in scope_spans {
        tag(&mut head, 2, LEN);
        varint(&mut head, scope_len(&p) as u64);
        let [scope, body, scope_tail] = p;
        head.extend_from_slice(&scope);
        pieces.push(Bytes::from(head));
        pieces.push(Bytes::from(body));
        head = scope_tail;
    }
    head.extend_from_slice(&tail);
    pieces.push(Bytes::from(head));
    pieces
}

fn encode_span(o: &mut Vec<u8>, s: &SpanData) {
    let sc = &s.span_context;
    bytes(o, 1, &sc.trace_id().to_bytes());
    bytes(o, 2, &sc.span_id().to_bytes());
    if *sc.trace_state() != TraceState::NONE {
        string(o, 3, &sc.trace_state().header());
    }
    if s.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes(o, 4, &s.parent_span_id.to_bytes());
    }
    string(o, 5, &s.name);
    let kind: u64 = match s.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    uint(o, 6, kind);
    fixed64(o, 7, nanos(s.start_time));
    fixed64(o, 8, nanos(s.end_time));
    for kv in &s.attributes {
        attribute(o, 9, kv);
    }
    uint(o, 10, u64::from(s.dropped_attributes_count));
    for e in s.events.iter() {
        message(o, 11, |o| {
            fixed64(o, 1, nanos(e.timestamp));
            string(o, 2, &e.name);
            for kv in &e.attributes {
                attribute(o, 3, kv);
            }
            uint(o, 4, u64::from(e.dropped_attributes_count));
        });
    }
    uint(o, 12, u64::from(s.events.dropped_count));
    for l in s.links.iter() {
        let lc = &l.span_context;
        message(o, 13, |o| {
            bytes(o, 1, &lc.trace_id().to_bytes());
            bytes(o, 2, &lc.span_id().to_bytes());
            string(o, 3, &lc.trace_state().header());
            for kv in &l.attributes {
                attribute(o, 4, kv);
            }
            uint(o, 5, u64::from(l.dropped_attributes_count));
            fixed32(o, 6, span_flags(lc.is_remote(), lc.trace_flags().to_u8()));
        });
    }
    uint(o, 14, u64::from(s.links.dropped_count));
    message(o, 15, |o| match &s.status {
        Status::Error { description } => {
            string(o, 2, description);
            uint(o, 3, 2);
        }
        Status::Ok => uint(o, 3, 1),
        Status::Unset => {}
    });
    // Field 16 came later to the proto; prost writes fields in tag order.
    fixed32(
        o,
        16,
        span_flags(s.parent_span_is_remote, sc.trace_flags().to_u8()),
    );
}

/// The W3C flags in the low byte; bit 8 says bit 9 is known, bit 9 that the
/// parent was remote (OTLP `SpanFlags`).
fn span_flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | 0x100 | if remote { 0x200 } else { 0 }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn attribute(o: &mut Vec<u8>, field: u32, kv: &KeyValue) {
    key_value(o, field, kv.key.as_str(), &kv.value);
}

/// A `KeyValue` field, sized first (no moves: attributes are most of a span).
fn key_value(o: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    // The `AnyValue` body's size; for an array, its `ArrayValue`'s too.
    let (value_len, array_len) = match value {
        Value::Array(a) => {
            let mut inner = 0;
            array_items(a, |x| inner += delimited_len(x.len()));
            (delimited_len(inner), inner)
        }
        other => {
            let mut n = 0;
            with_scalar(other, |x| n = x.len());
            (n, 0)
        }
    };
    let body = if key.is_empty() {
        0
    } else {
        delimited_len(key.len())
    } + delimited_len(value_len);
    o.reserve(body + 11);
    tag(o, field, LEN);
    varint(o, body as u64);
    string(o, 1, key);
    tag(o, 2, LEN);
    varint(o, value_len as u64);
    match value {
        Value::Array(a) => {
            tag(o, 5, LEN);
            varint(o, array_len as u64);
            array_items(a, |x| {
                tag(o, 1, LEN);
                varint(o, x.len() as u64);
                x.write(o);
            });
        }
        other => with_scalar(other, |x| x.write(o)),
    }
}

/// A length-delimited field's size with a one-byte tag: tag, length, body.
#[inline(always)]
fn delimited_len(body: usize) -> usize {
    1 + varint_len(body as u64) + body
}

#[inline(always)]
fn varint_len(v: u64) -> usize {
    // Lengths are nearly always under 128: a compare, not a bit count.
    if v < 1 << 7 {
        1
    } else if v < 1 << 14 {
        2
    } else {
        (64 - v.leading_zeros() as usize).div_ceil(7)
    }
}

/// One value of an `AnyValue` other than an array. Its fields are a `oneof`,
/// so a default value (`false`, `0`, `""`) is still written.
#[derive(Clone, Copy)]
enum Scalar<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
}

impl Scalar<'_> {
    /// The size of the `AnyValue` body it is.
    #[inline(always)]
    fn len(self) -> usize {
        match self {
            Scalar::Str(s) => delimited_len(s.len()),
            Scalar::Bool(_) => 2,
            Scalar::Int(i) => 1 + varint_len(twos_complement(i)),
            Scalar::Double(_) => 9,
        }
    }

    #[inline(always)]
    fn write(self, o: &mut Vec<u8>) {
        match self {
            Scalar::Str(s) => {
                tag(o, 1, LEN);
                varint(o, s.len() as u64);
                o.extend_from_slice(s.as_bytes());
            }
            Scalar::Bool(b) => {
                tag(o, 2, VARINT);
                o.push(u8::from(b));
            }
            Scalar::Int(i) => {
                tag(o, 3, VARINT);
                varint(o, twos_complement(i));
            }
            Scalar::Double(f) => {
                tag(o, 4, I64);
                o.extend_from_slice(&f.to_le_bytes());
            }
        }
    }
}

/// int64 is written as its two's complement (ten bytes when negative).
#[inline(always)]
fn twos_complement(i: i64) -> u64 {
    u64::from_ne_bytes(i.to_ne_bytes())
}

fn with_scalar(v: &Value, mut f: impl FnMut(Scalar<'_>)) {
    match v {
        Value::Bool(b) => f(Scalar::Bool(*b)),
        Value::I64(i) => f(Scalar::Int(*i)),
        Value::F64(x) => f(Scalar::Double(*x)),
        Value::String(s) => f(Scalar::Str(s.as_str())),
        // A kind of value newer than this code: its text.
        other => f(Scalar::Str(&other.as_str())),
    }
}

fn array_items(a: &Array, mut f: impl FnMut(Scalar<'_>)) {
    match a {
        Array::Bool(v) => v.iter().for_each(|b| f(Scalar::Bool(*b))),
        Array::I64(v) => v.iter().for_each(|i| f(Scalar::Int(*i))),
        Array::F64(v) => v.iter().for_each(|x| f(Scalar::Double(*x))),
        Array::String(v) => v.iter().for_each(|s| f(Scalar::Str(s.as_str()))),
        // A kind of array newer than this code: its text, as one item.
        other => f(Scalar::Str(&other.to_string())),
    }
}

#[inline(always)]
fn tag(o: &mut Vec<u8>, field: u32, wire: u32) {
    varint(o, u64::from(field << 3 | wire));
}

#[inline(always)]
fn varint(o: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        o.push(v as u8);
    } else {
        let (buf, n) = varint_bytes(v);
        o.extend_from_slice(&buf[..n]);
    }
}

/// `v` as a protobuf varint: the bytes and how many of them are used.
fn varint_bytes(mut v: u64) -> ([u8; 10], usize) {
    let mut buf = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        buf[n] = (v & 0x7f) as u8 | 0x80;
        v >>= 7;
        n += 1;
    }
    buf[n] = v as u8;
    (buf, n + 1)
}

/// A length-delimited field whose body `body` writes: the body goes first,
/// then its length is slipped in before it (one byte below 128 bytes, so
/// usually a one-byte move of the body; no second pass to size it).
fn message(o: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    tag(o, field, LEN);
    let at = o.len();
    body(o);
    let end = o.len();
    let (buf, n) = varint_bytes((end - at) as u64);
    o.resize(end + n, 0);
    o.copy_within(at..end, at + n);
    o[at..at + n].copy_from_slice(&buf[..n]);
}

/// A string field, left out when empty (proto3's default).
#[inline(always)]
fn string(o: &mut Vec<u8>, field: u32, s: &str) {
    bytes(o, field, s.as_bytes());
}

#[inline(always)]
fn bytes(o: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        tag(o, field, LEN);
        varint(o, b.len() as u64);
        o.extend_from_slice(b);
    }
}

#[inline(always)]
fn uint(o: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(o, field, VARINT);
        varint(o, v);
    }
}

#[inline(always)]
fn fixed64(o: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(o, field, I64);
        o.extend_from_slice(&v.to_le_bytes());
    }
}

#[inline(always)]
fn fixed32(o: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        tag(o, field, I32);
        o.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId};
    use opentelemetry::StringValue;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;
    use std::sync::{Arc, Mutex};

    fn ctx(trace: u128, span: u64, flags: TraceFlags, remote: bool, state: &str) -> SpanContext {
        let state = if state.is_empty() {
            TraceState::default()
        } else {
            state.parse().unwrap()
        };
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            flags,
            remote,
            state,
        )
    }

    /// Every kind of value, at lengths either side of the one- and two-byte
    /// length prefixes.
    fn attributes(seed: usize) -> Vec<KeyValue> {
        let long = |n: usize| "é".repeat(n / 2) + &"x".repeat(n % 2);
        vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("empty", ""),
            KeyValue::new("", "empty key"),
            KeyValue::new("zero", 0_i64),
            KeyValue::new("negative", -1_i64 - seed as i64),
            KeyValue::new("max", i64::MAX),
            KeyValue::new("min", i64::MIN),
            KeyValue::new("float", -0.5_f64),
            KeyValue::new("nan", f64::NAN.copysign(1.0)),
            KeyValue::new("false", false),
            KeyValue::new("true", true),
            KeyValue::new("len", long(seed)),
            KeyValue::new(
                "arrays.s",
                Value::Array(Array::String(vec![
                    StringValue::from(""),
                    StringValue::from(long(seed * 3)),
                ])),
            ),
            KeyValue::new("arrays.b", Value::Array(Array::Bool(vec![false, true]))),
            KeyValue::new("arrays.i", Value::Array(Array::I64(vec![0, -7, 1 << 40]))),
            KeyValue::new("arrays.f", Value::Array(Array::F64(vec![0.0, 1e300]))),
            KeyValue::new("arrays.empty", Value::Array(Array::I64(vec![]))),
        ]
    }

    fn span(i: usize, scope: &InstrumentationScope) -> SpanData {
        let kinds = [
            SpanKind::Server,
            SpanKind::Client,
            SpanKind::Internal,
            SpanKind::Producer,
            SpanKind::Consumer,
        ];
        let statuses = [
            Status::Unset,
            Status::Ok,
            Status::error(""),
            Status::error("upstream_stream_error"),
        ];
        let mut events = SpanEvents::default();
        let mut links = SpanLinks::default();
        if i.is_multiple_of(3) {
            events.events.push(opentelemetry::trace::Event::new(
                format!("event {i}"),
                SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
                attributes(i),
                u32::try_from(i).unwrap(),
            ));
            events.events.push(opentelemetry::trace::Event::new(
                "",
                SystemTime::UNIX_EPOCH,
                vec![],
                0,
            ));
            events.dropped_count = 2;
            links.links.push(opentelemetry::trace::Link::new(
                ctx(7, 9, TraceFlags::default(), true, "a=1,b=2"),
                attributes(i + 1),
                1,
            ));
            links.dropped_count = 3;
        }
        SpanData {
            span_context: ctx(
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736 + i as u128,
                0x00f0_67aa_0ba9_02b7 + i as u64,
                if i.is_multiple_of(2) {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                false,
                if i % 4 == 1 { "vendor=abc" } else { "" },
            ),
            parent_span_id: if i.is_multiple_of(2) {
                SpanId::INVALID
            } else {
                SpanId::from(i as u64)
            },
            parent_span_is_remote: i % 5 == 1,
            span_kind: kinds[i % kinds.len()].clone(),
            name: format!("chat alias-{i}").into(),
            start_time: SystemTime::UNIX_EPOCH
                + Duration::from_nanos(1_764_000_000_000_000_000 + i as u64),
            end_time: if i == 4 {
                SystemTime::UNIX_EPOCH
            } else {
                SystemTime::now()
            },
            attributes: attributes(i * 37 % 20_000),
            dropped_attributes_count: u32::try_from(i % 3).unwrap(),
            events,
            links,
            status: statuses[i % statuses.len()].clone(),
            instrumentation_scope: scope.clone(),
        }
    }

    fn resource(schema: bool) -> Resource {
        let kv = [
            KeyValue::new("service.name", "aigw-data-plane"),
            KeyValue::new("aigw.node.id", "node-1"),
            KeyValue::new("pid", 42_i64),
        ];
        if schema {
            Resource::builder_empty()
                .with_schema_url(kv, "https://opentelemetry.io/schemas/1.30.0")
                .build()
        } else {
            Resource::builder_empty().with_attributes(kv).build()
        }
    }

    fn reference(resource: &Resource, spans: &[SpanData]) -> Vec<u8> {
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans.to_vec(), &resource.into()),
        }
        .encode_to_vec()
    }

    fn ours(resource: &Resource, spans: &[SpanData]) -> Vec<u8> {
        let mut e = CallSpanExporter {
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
            runtime: tokio::runtime::Handle::current(),
            metadata: MetadataMap::new(),
            timeout: DEFAULT_TIMEOUT,
            resource: Vec::new(),
            resource_schema: String::new(),
        };
        e.set_resource(resource);
        encode_request(&e.resource, &e.resource_schema, spans).concat()
    }

    #[tokio::test]
    async fn batches_encode_byte_for_byte_as_opentelemetry_otlp_does() {
        let aigw = InstrumentationScope::builder("aigw").build();
        let other = InstrumentationScope::builder("lib")
            .with_version("1.2.3")
            .with_schema_url("https://example.com/s")
            .with_attributes([KeyValue::new("k", "v")])
            .build();
        for schema in [false, true] {
            let res = resource(schema);
            // Scopes interleaved: grouped in order of first appearance.
            let spans: Vec<SpanData> = (0..40)
                .map(|i| span(i * 251, if i % 7 == 3 { &other } else { &aigw }))
                .collect();
            for n in [0, 1, 2, 5, 40] {
                let batch = &spans[..n];
                assert_eq!(ours(&res, batch), reference(&res, batch), "{n} spans");
            }
        }
    }

    #[tokio::test]
    async fn lengths_at_every_varint_boundary_encode_as_prost_does() {
        let scope = InstrumentationScope::builder("aigw").build();
        let res = resource(false);
        let lengths = (0..300).chain(16_360..16_400).chain([2_097_151, 2_097_152]);
        for len in lengths {
            let mut s = span(2, &scope);
            s.attributes = vec![KeyValue::new("k", "x".repeat(len))];
            let batch = [s];
            assert_eq!(ours(&res, &batch), reference(&res, &batch), "{len} bytes");
        }
    }

    #[test]
    fn options_come_from_the_standard_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        let o = ExportOptions::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                " Api-Key = s%20e%3Dcret ,broken,bad key=x,x-tenant=t1,=v",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ]));
        assert_eq!(o.metadata.get("api-key").unwrap(), "s e=cret");
        assert_eq!(o.metadata.get("x-tenant").unwrap(), "t1");
        assert!(o.metadata.get("a").is_none(), "the traces variable wins");
        assert_eq!(o.metadata.len(), 2, "{:?}", o.metadata);
        assert_eq!(o.timeout, Duration::from_millis(2500));
        let d = ExportOptions::from_vars(vars(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "-3")]));
        assert_eq!(d.timeout, DEFAULT_TIMEOUT);
        assert!(d.metadata.is_empty());
        let bad = ExportOptions::from_vars(vars(&[("OTEL_EXPORTER_OTLP_HEADERS", "x-bad=%zz%4")]));
        assert_eq!(
            bad.metadata.get("x-bad").unwrap(),
            "%zz%4",
            "bad escapes stay as they are"
        );
    }

    /// A request as the collector got it, with its `api-key` header.
    type Seen = (ExportTraceServiceRequest, Option<String>);

    /// A collector that answers the first `fail` calls with `code`.
    #[derive(Clone)]
    struct Collector {
        fail: usize,
        code: tonic::Code,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let key = request
                .metadata()
                .get("api-key")
                .map(|v| v.to_str().unwrap().to_string());
            let mut seen = self.seen.lock().unwrap();
            seen.push((request.into_inner(), key));
            if seen.len() <= self.fail {
                return Err(tonic::Status::new(self.code, "not now"));
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    async fn export_to(fail: usize, code: tonic::Code) -> (OTelSdkResult, Collector, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector {
            fail,
            code,
            seen: Arc::default(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut metadata = MetadataMap::new();
        metadata.insert("api-key", "secret".parse().unwrap());
        let mut exporter = CallSpanExporter::new(
            &format!("http://{addr}"),
            tokio::runtime::Handle::current(),
            ExportOptions {
                metadata,
                timeout: Duration::from_secs(5),
            },
        )
        .unwrap();
        let res = resource(true);
        exporter.set_resource(&res);
        let scope = InstrumentationScope::builder("aigw").build();
        let batch: Vec<SpanData> = (0..3).map(|i| span(i, &scope)).collect();
        let expected = reference(&res, &batch);
        (exporter.export(batch).await, collector, expected)
    }

    type Answer = fn() -> http::Response<http_body_util::Full<Bytes>>;

    /// A collector that is not one: answers every call with `answer`, and
    /// counts the calls.
    async fn broken_collector(answer: Answer) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let counted = counted.clone();
                let service = hyper::service::service_fn(move |_req| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, std::convert::Infallible>(answer()) }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(io), service),
                );
            }
        });
        (format!("http://{addr}"), calls)
    }

    async fn export_batch(endpoint: &str) -> OTelSdkResult {
        let exporter = CallSpanExporter::new(
            endpoint,
            tokio::runtime::Handle::current(),
            ExportOptions {
                metadata: MetadataMap::new(),
                timeout: Duration::from_secs(5),
            },
        )
        .unwrap();
        let scope = InstrumentationScope::builder("aigw").build();
        exporter.export(vec![span(1, &scope)]).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_collector_that_breaks_the_protocol_is_an_error_not_a_hang() {
        use std::sync::atomic::Ordering;
        let cases: [(Answer, &str, usize); 4] = [
            // A proxy in front of the collector, overloaded: retried.
            (
                || {
                    http::Response::builder()
                        .status(503)
                        .body(Default::default())
                        .unwrap()
                },
                "Unavailable",
                1 + RETRIES as usize,
            ),
            (
                || http::Response::new(Default::default()),
                "no grpc-status",
                1,
            ),
            // An answer that never ends its message: bounded, then refused.
            (
                || http::Response::new(Bytes::from(vec![0u8; 1 << 20]).into()),
                "answer",
                1,
            ),
            (
                || {
                    http::Response::builder()
                        .status(404)
                        .body(Default::default())
                        .unwrap()
                },
                "Unimplemented",
                1,
            ),
        ];
        for (answer, error, calls) in cases {
            let (endpoint, seen) = broken_collector(answer).await;
            let err = export_batch(&endpoint).await.unwrap_err().to_string();
            assert!(err.contains(error), "{error}: {err}");
            assert_eq!(seen.load(Ordering::SeqCst), calls, "{error}");
        }
        // Nothing listening: an error once the retries are spent.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let err = export_batch(&endpoint).await.unwrap_err().to_string();
        assert!(err.contains("Unavailable"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_reaches_the_collector_with_the_headers() {
        let (result, collector, expected) = export_to(0, tonic::Code::Ok).await;
        result.unwrap();
        let seen = collector.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0.encode_to_vec(), expected);
        assert_eq!(seen[0].1.as_deref(), Some("secret"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unavailable_collector_gets_the_same_batch_again() {
        let (result, collector, expected) = export_to(2, tonic::Code::Unavailable).await;
        result.unwrap();
        let seen = collector.seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "two refusals, then the batch");
        assert!(seen.iter().all(|(r, _)| r.encode_to_vec() == expected));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_refused_batch_is_an_error_and_not_retried() {
        let (result, collector, _) = export_to(1, tonic::Code::InvalidArgument).await;
        let err = result.unwrap_err().to_string();
        assert!(err.contains("InvalidArgument"), "{err}");
        assert_eq!(collector.seen.lock().unwrap().len(), 1);
        let (result, collector, _) = export_to(usize::MAX, tonic::Code::Unavailable).await;
        assert!(result.is_err());
        assert_eq!(
            collector.seen.lock().unwrap().len(),
            1 + RETRIES as usize,
            "gives up after its retries"
        );
    }
}
