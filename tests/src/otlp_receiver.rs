//! A real OTLP/gRPC trace receiver (the collector's `TraceService`) on a free
//! loopback port: spans as the gateway exported them, with their resource's
//! `service.name`, for tests to wait on and inspect.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// One exported span; ids as lowercase hex (`parent_span_id` empty for a root).
#[derive(Clone, Debug)]
pub struct Span {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// `SpanKind` as the proto numbers it (2 server, 3 client).
    pub kind: i32,
    /// Status code (0 unset, 1 ok, 2 error).
    pub status: i32,
    /// OTLP `SpanFlags`: W3C flags in the low byte, 0x100 when 0x200 (a
    /// remote parent) is known.
    pub flags: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: HashMap<String, String>,
    pub resource: HashMap<String, String>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<Span>>,
    changed: Notify,
    counted: std::sync::atomic::AtomicU64,
    counted_server: std::sync::atomic::AtomicU64,
}

struct Service(Arc<Shared>);

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut got = Vec::new();
        for rs in request.resource_spans {
            let resource = rs
                .resource
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Span {
                        service: service.clone(),
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent_span_id: hex::encode(&s.parent_span_id),
                        name: s.name,
                        kind: s.kind,
                        status: s.status.map_or(0, |st| st.code),
                        flags: s.flags,
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                        attributes: attrs(&s.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
        self.0.spans.lock().unwrap().extend(got);
        self.0.changed.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An export request read only as far as counting its spans: the fields
/// `resource_spans` (1) → `scope_spans` (2) → `spans` (2) are walked and
/// everything else skipped, with nothing allocated. For benchmarks, where a
/// collector decoding every attribute would compete with the gateway for
/// the same cores (a real collector runs elsewhere).
#[derive(Debug, Default)]
struct SpanCount {
    spans: u64,
    /// Of which `SPAN_KIND_SERVER`: one per call through the proxy.
    server: u64,
}

/// Whether the span message in `buf` has `kind` (field 6) `SPAN_KIND_SERVER`.
fn is_server_span(mut buf: &[u8]) -> Result<bool, prost::DecodeError> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut server = false;
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf)?;
        if tag == 6 && wire == WireType::Varint {
            server = decode_varint(&mut buf)? == 2;
        } else {
            skip_field(wire, tag, &mut buf, DecodeContext::default())?;
        }
    }
    Ok(server)
}

/// Calls `each` on every length-delimited field `want` of the message in `buf`.
fn each_field(
    mut buf: &[u8],
    want: u32,
    each: &mut dyn FnMut(&[u8]) -> Result<(), prost::DecodeError>,
) -> Result<(), prost::DecodeError> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf)?;
        let start = buf;
        // Skipping checks the field's length against what is left.
        skip_field(wire, tag, &mut buf, DecodeContext::default())?;
        if tag == want && wire == WireType::LengthDelimited {
            let mut field = &start[..start.len() - buf.len()];
            decode_varint(&mut field)?;
            each(field)?;
        }
    }
    Ok(())
}

impl prost::Message for SpanCount {
    fn encode_raw(&self, _buf: &mut impl prost::bytes::BufMut) {}

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag != 1 {
            return prost::encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let mut resource_spans = prost::bytes::Bytes::new();
        prost::encoding::bytes::merge(wire_type, &mut resource_spans, buf, ctx)?;
        let (mut spans, mut server) = (0, 0);
        each_field(&resource_spans, 2, &mut |scope_spans| {
            each_field(scope_spans, 2, &mut |span| {
                spans += 1;
                server += u64::from(is_server_span(span)?);
                Ok(())
            })
        })?;
        self.spans += spans;
        self.server += server;
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The `TraceService/Export` method over [`SpanCount`].
#[derive(Clone)]
struct CountingServer(Arc<Shared>);

impl tonic::server::NamedService for CountingServer {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl tonic::server::UnaryService<SpanCount> for CountingServer {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<SpanCount>) -> Self::Future {
        let count = request.into_inner();
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        self.0.counted.fetch_add(count.spans, relaxed);
        self.0.counted_server.fetch_add(count.server, relaxed);
        std::future::ready(Ok(tonic::Response::new(
            ExportTraceServiceResponse::default(),
        )))
    }
}

impl<B> tower::Service<http::Request<B>> for CountingServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, SpanCount>::default();
            Ok(tonic::server::Grpc::new(codec).unary(svc, req).await)
        })
    }
}

/// The receiver; stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        Self::start_with(false).await
    }

    /// A receiver that only counts spans ([`OtlpReceiver::counted`]), for
    /// benchmarks, where keeping them would compete with the gateway.
    pub async fn start_counting() -> OtlpReceiver {
        Self::start_with(true).await
    }

    /// Spans received by a counting receiver.
    pub fn counted(&self) -> u64 {
        self.shared
            .counted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Server spans (one per proxied call) received by a counting receiver.
    pub fn counted_server(&self) -> u64 {
        self.shared
            .counted_server
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn start_with(count_only: bool) -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut server = tonic::transport::Server::builder();
        let router = if count_only {
            server.add_service(CountingServer(shared.clone()))
        } else {
            server.add_service(TraceServiceServer::new(Service(shared.clone())))
        };
        let task = tokio::spawn(async move {
            let _ = router.serve_with_incoming(incoming).await;
        });
        OtlpReceiver { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`, for `telemetry.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.shared.spans.lock().unwrap().clone()
    }

    /// Waits until `done` holds over the spans received so far (woken by
    /// each export), or `timeout`; returns the spans either way.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.spans();
            }
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::AnyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as ProtoSpan};
    use prost::Message;

    fn span(name: &str) -> ProtoSpan {
        ProtoSpan {
            name: name.into(),
            kind: if name.ends_with('0') { 2 } else { 3 },
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            attributes: vec![KeyValue {
                key: "k".into(),
                value: Some(AnyValue {
                    value: Some(Any::StringValue("v".repeat(300))),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_counting_decoder_counts_every_span_of_every_scope_and_resource() {
        let scope = |n: usize| ScopeSpans {
            spans: (0..n).map(|i| span(&format!("s{i}"))).collect(),
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(Resource::default()),
                    scope_spans: vec![scope(3), scope(0), scope(200)],
                    ..Default::default()
                },
                ResourceSpans {
                    scope_spans: vec![scope(7)],
                    ..Default::default()
                },
            ],
        };
        let bytes = request.encode_to_vec();
        let count = SpanCount::decode(bytes.as_slice()).unwrap();
        // Server spans: s0 of each non-empty scope, and s10..s190 of the 200.
        assert_eq!((count.spans, count.server), (210, 3 + 19));
        assert!(
            SpanCount::decode(&bytes[..bytes.len() - 5]).is_err(),
            "a truncated request is an error, not a short count"
        );
    }
}
