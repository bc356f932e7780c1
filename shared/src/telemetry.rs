//! Logging and tracing set-up shared by both binaries.
//!
//! Logs: JSON lines (or text) on stdout. Traces: when `telemetry.otlp_endpoint`
//! is set, spans also go to an OTLP gRPC collector (Jaeger, the OpenTelemetry
//! Collector...) through a batch processor on its own thread, so exporting
//! never runs on a request's path. Sampling is `ParentBased(TraceIdRatioBased)`:
//! a caller's sampled `traceparent` is honoured, new traces are sampled at
//! `telemetry.sample_ratio`.

use crate::config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use std::fmt::Write as _;
use std::sync::OnceLock;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] (or drop) flushes
/// the spans still queued, then stops the exporter's thread.
#[must_use = "dropping it stops trace export"]
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The proxy's call spans ([`tracer`]), exported by aigw's own encoder
    /// (`span_export`).
    calls: Option<SdkTracerProvider>,
    export: Option<ExportThread>,
    /// The log writer thread: dropping it writes out the lines still queued.
    logs: Option<crate::log_writer::LogWriterGuard>,
}

/// A thread with its own single-threaded tokio runtime for the OTLP gRPC
/// client: its connection tasks (encoding, HTTP/2 framing, socket writes)
/// run there, not on the workers that serve calls.
struct ExportThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExportThread {
    fn start() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ExportThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now.
    pub fn flush(&self) {
        for p in self.provider.iter().chain(&self.calls) {
            let _ = p.force_flush();
        }
    }

    /// Flushes and stops the exporter.
    pub fn shutdown(&mut self) {
        for p in self.calls.take().into_iter().chain(self.provider.take()) {
            if let Err(e) = p.shutdown() {
                eprintln!("trace export shutdown: {e}");
            }
        }
        self.export = None;
        // Last: lines logged while traces flushed still reach stdout.
        self.logs = None;
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The log writer, when logs are JSON lines: for lines their callers format
/// themselves (`log_line`).
static JSON_LINES: OnceLock<crate::log_writer::LogWriter> = OnceLock::new();

/// Writes one complete JSON log line (newline included) through the log
/// writer thread; `false` when logs are not JSON lines (log through
/// `tracing` then).
pub fn write_json_line(line: &str) -> bool {
    JSON_LINES.get().is_some_and(|w| {
        w.append(line.as_bytes());
        true
    })
}

/// The exporter's tracer, for hot paths that build their spans with the
/// OpenTelemetry API directly (the proxy's call and attempt spans); `None`
/// when traces are not exported.
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Installs the global subscriber: JSON lines (or text) on stdout, filtered by
/// `RUST_LOG` if set, else `telemetry.log_level`. No trace export.
pub fn init_logging(cfg: &TelemetryConfig) {
    let logs_only = TelemetryConfig {
        otlp_endpoint: None,
        ..cfg.clone()
    };
    drop(init(&logs_only, "aigw", ""));
}

/// A span's fields as one JSON object, grown in place when a field is
/// recorded later (the proxy records the caller once it is authenticated).
/// `tracing-subscriber`'s `JsonFields` parses and re-serialises the whole
/// object on every record: ~14k instructions per call, 6 % of a plain chat
/// call under callgrind. A key recorded twice appears twice; the JSON
/// formatter reads the object back with the last value winning.
struct AppendJsonFields;

struct JsonFieldVisitor<'a> {
    out: &'a mut String,
    first: bool,
}

impl JsonFieldVisitor<'_> {
    fn key(&mut self, field: &tracing::field::Field) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        let name = field.name();
        crate::log_line::push_str(self.out, name.strip_prefix("r#").unwrap_or(name));
        self.out.push(':');
    }
}

impl tracing::field::Visit for JsonFieldVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.key(field);
        crate::log_line::push_str(self.out, value);
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.key(field);
        match serde_json::Number::from_f64(value) {
            Some(n) => self.out.push_str(&n.to_string()),
            None => self.out.push_str("null"),
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        crate::log_line::push_str(self.out, &format!("{value:?}"));
    }
}

impl<'w> fmt::FormatFields<'w> for AppendJsonFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut out = String::from("{");
        fields.record(&mut JsonFieldVisitor {
            out: &mut out,
            first: true,
        });
        out.push('}');
        writer.write_str(&out)
    }

    fn add_fields(
        &self,
        current: &'w mut fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let Some(open) = current.fields.strip_suffix('}').map(str::len) else {
            return self.format_fields(current.as_writer(), fields);
        };
        current.fields.truncate(open);
        let first = open <= 1;
        fields.record(&mut JsonFieldVisitor {
            out: &mut current.fields,
            first,
        });
        current.fields.push('}');
        Ok(())
    }
}

/// Installs the global subscriber (see [`init_logging`]) and, with an OTLP
/// endpoint configured, the trace exporter for `service` (`aigw-control-plane`
/// or `aigw-data-plane`) with `node_id` as a resource attribute.
///
/// A second call (tests, embedded use) keeps the first subscriber and
/// exports nothing.
pub fn init(cfg: &TelemetryConfig, service: &str, node_id: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Calls format their line; a thread of its own writes the lines, many
    // per write(2), instead of one locked stdout write per line on the
    // worker serving the call (see `log_writer`).
    let (writer, log_guard) = match crate::log_writer::LogWriter::start(
        std::io::stdout(),
        "aigw-log-writer",
        std::time::Duration::from_millis(cfg.access_log_flush_ms),
    ) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("cannot start the log writer thread: {e}");
            return Telemetry::default();
        }
    };
    // The access log (`write_json_line`) is buffered; what goes through the
    // subscriber is written at once.
    let lines = (cfg.log_format == LogFormat::Json).then(|| writer.clone());
    let writer = writer.urgent();
    let fmt_layer = match cfg.log_format {
        LogFormat::Json => fmt::layer()
            .with_writer(writer)
            .with_target(true)
            .json()
            .flatten_event(true)
            // The current span's fields give a line its call's context; the
            // list of all enclosing spans would repeat them.
            .with_span_list(false)
            .fmt_fields(AppendJsonFields)
            .boxed(),
        LogFormat::Text => fmt::layer().with_writer(writer).with_target(true).boxed(),
    }
    .with_filter(filter);
    let (provider, calls, export) = match cfg.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => match build_providers(endpoint, cfg.sample_ratio, service, node_id) {
            Ok((p, c, t)) => (Some(p), Some(c), Some(t)),
            Err(e) => {
                eprintln!("{service}: OTLP trace export disabled: {e}");
                (None, None, None)
            }
        },
        None => (None, None, None),
    };
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("aigw"))
            // No per-span busy/idle timing, thread or source-location
            // attributes: clocks and strings on every span enter and exit
            // that no GenAI dashboard reads.
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            // Only the gateway's own spans: not those of the HTTP and gRPC
            // libraries (the exporter's own calls included), nor the proxy's
            // per-call spans and log lines: the proxy builds its call spans
            // with the OpenTelemetry API (`tracer`), and the access log would
            // otherwise be copied into every call's span as an event.
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("aigw_data_plane", tracing::Level::INFO)
                    .with_target("aigw_data_plane::call", LevelFilter::OFF)
                    .with_target("aigw_data_plane::access", LevelFilter::OFF)
                    .with_target("aigw_data_plane::payload", LevelFilter::OFF)
                    .with_target("aigw_control_plane", tracing::Level::INFO),
            )
    });
    let installed = tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .is_ok();
    if !installed {
        for p in provider.into_iter().chain(calls) {
            let _ = p.shutdown();
        }
        return Telemetry::default();
    }
    if let Some(lines) = lines {
        let _ = JSON_LINES.set(lines);
    }
    if let Some(p) = &provider {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    if let Some(c) = &calls {
        let _ = TRACER.set(c.tracer("aigw"));
    }
    Telemetry {
        provider,
        calls,
        export,
        logs: Some(log_guard),
    }
}

/// Spans per export call and spans queued at most. The SDK exports one
/// batch at a time, so a batch is what one collector round trip carries: at
/// the SDK's 512, a node serving ~15k calls/s (two spans each) outran a
/// collector on the same loaded host and the full queue dropped ~14 % of its
/// spans (`cargo bench --bench tracing` counts them). 2,048 of our spans are
/// ~0.5 MB, well under a collector's default 4 MiB message limit. A full
/// queue drops spans; a call is never held up.
const EXPORT_BATCH: usize = 2_048;
const EXPORT_QUEUE: usize = 16_384;

/// Two providers with the same sampler and resource, so one exporter each:
/// the call spans' (aigw's encoder, `span_export`: the hot path) and every
/// other span's (opentelemetry-otlp's exporter). Both connect from the
/// export thread's runtime.
fn build_providers(
    endpoint: &str,
    ratio: f64,
    service: &str,
    node_id: &str,
) -> Result<(SdkTracerProvider, SdkTracerProvider, ExportThread), String> {
    let thread = ExportThread::start().map_err(|e| format!("starting the export thread: {e}"))?;
    let exporter = {
        // The gRPC channel spawns its tasks on the runtime current here.
        let _rt = thread.handle.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| e.to_string())?
    };
    let calls = crate::span_export::CallSpanExporter::new(
        endpoint,
        thread.handle.clone(),
        crate::span_export::ExportOptions::from_env(),
    )?;
    let mut resource = Resource::builder().with_service_name(service.to_string());
    if !node_id.is_empty() {
        resource = resource.with_attribute(KeyValue::new("aigw.node.id", node_id.to_string()));
        resource =
            resource.with_attribute(KeyValue::new("service.instance.id", node_id.to_string()));
    }
    resource = resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    let resource = resource.build();
    Ok((
        provider(exporter, resource.clone(), ratio),
        provider(calls, resource, ratio),
        thread,
    ))
}

fn provider(
    exporter: impl opentelemetry_sdk::trace::SpanExporter + 'static,
    resource: Resource,
    ratio: f64,
) -> SdkTracerProvider {
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_export_batch_size(EXPORT_BATCH)
                .with_max_queue_size(EXPORT_QUEUE)
                .build(),
        )
        .build();
    SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio.clamp(0.0, 1.0),
        ))))
        .with_resource(resource)
        .build()
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod append_json_fields_tests {
    use super::*;

    #[test]
    fn span_fields_stay_one_json_object_as_they_grow() {
        let line = logged_line(|| {
            let span = tracing::info_span!(
                "serve",
                request_id = "r-1",
                api_key_id = tracing::field::Empty,
                n = tracing::field::Empty,
            );
            span.record("api_key_id", "k \"quoted\"\n");
            span.record("n", 7u64);
            let _in = span.enter();
            tracing::info!(ok = true, "inside");
        });
        assert_eq!(line["message"], "inside");
        assert_eq!(line["span"]["request_id"], "r-1");
        assert_eq!(line["span"]["api_key_id"], "k \"quoted\"\n");
        assert_eq!(line["span"]["n"], 7);
        assert_eq!(line["span"]["name"], "serve");

        // A span with no field at first gets its first one without a comma.
        let line = logged_line(|| {
            let span = tracing::info_span!("late", a = tracing::field::Empty);
            span.record("a", -3i64);
            let _in = span.enter();
            tracing::info!("inside");
        });
        assert_eq!(line["span"]["a"], -3);
    }

    /// The one JSON line `log` writes through the JSON layer the logs use.
    fn logged_line(log: impl FnOnce()) -> serde_json::Value {
        let (writer, lines) = CaptureWriter::new();
        let subscriber = tracing_subscriber::registry().with(
            fmt::layer()
                .with_writer(writer)
                .json()
                .flatten_event(true)
                .with_span_list(false)
                .fmt_fields(AppendJsonFields),
        );
        tracing::subscriber::with_default(subscriber, log);
        let text = lines.text();
        serde_json::from_str(text.trim()).expect(&text)
    }

    #[derive(Clone)]
    struct CaptureWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl CaptureWriter {
        fn new() -> (Self, Self) {
            let w = Self(Default::default());
            (w.clone(), w)
        }
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for CaptureWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> fmt::MakeWriter<'a> for CaptureWriter {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }
}
