use super::{estimate_tokens, CacheStatus, UsageEvent};
use crate::metrics::{CallRecord, Metrics};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Hands events to the publisher without waiting: a full buffer is counted
/// and logged, never silent.
pub struct UsageRecorder {
    tx: mpsc::Sender<UsageEvent>,
    node_id: Arc<str>,
    metrics: Arc<Metrics>,
}

impl UsageRecorder {
    pub fn new(tx: mpsc::Sender<UsageEvent>, node_id: &str, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            tx,
            node_id: Arc::from(node_id),
            metrics,
        })
    }

    /// Starts accounting for one call by `api_key_id`.
    pub fn begin(self: &Arc<Self>, api_key_id: &str, operation: &'static str) -> Accounting {
        let now = time::OffsetDateTime::now_utc();
        Accounting {
            recorder: self.clone(),
            started: Instant::now(),
            first_byte: None,
            event: UsageEvent {
                id: uuid::Uuid::now_v7().to_string(),
                time_unix_ms: i64::try_from(now.unix_timestamp_nanos() / 1_000_000)
                    .unwrap_or_default(),
                node_id: self.node_id.to_string(),
                api_key_id: api_key_id.to_string(),
                operation: operation.to_string(),
                cache_status: CacheStatus::Miss as i32,
                ..Default::default()
            },
            prompt_chars: 0,
            completion_chars: 0,
            usage_known: false,
            request_id: String::new(),
            api_version: String::new(),
            response_model: String::new(),
            payload: None,
        }
    }

    fn emit(&self, event: UsageEvent) {
        match self.tx.try_send(event) {
            Ok(()) => self.metrics.usage_buffered(),
            Err(mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e)) => {
                self.metrics.usage_dropped();
                tracing::error!(event_id = %e.id, api_key_id = %e.api_key_id, "usage buffer full: event dropped");
            }
        }
    }
}

/// One call's usage record, filled in as the call goes: the call writes the
/// event's fields as it learns them; [`Accounting::settle`] completes the
/// counts and [`Accounting::emit`] hands the event on (metrics, access log,
/// the bus). Ending the call exactly once is the caller's job
/// (`proxy::call::CallEnd`), with the span and the rate-limit permit.
pub struct Accounting {
    recorder: Arc<UsageRecorder>,
    started: Instant,
    first_byte: Option<Instant>,
    /// The usage event; model, deployment, caller and cache status are set
    /// straight on it.
    pub event: UsageEvent,
    /// Characters of prompt text, for estimating when Azure reports no usage.
    pub prompt_chars: usize,
    /// Characters streamed back, likewise.
    pub completion_chars: usize,
    usage_known: bool,
    /// The call's `x-request-id`, for the access log.
    pub request_id: String,
    /// The caller's `api-version` on Azure's deployment route (empty on
    /// the OpenAI routes), for the access log.
    pub api_version: String,
    /// `model` as Azure answered (the deployment's model version).
    pub response_model: String,
    /// Prompt and completion, kept only for models that opt in (`log_payloads`).
    payload: Option<Payload>,
}

struct Payload {
    prompt: String,
    completion: String,
}

impl Accounting {
    /// `model` as Azure reported it (first one wins).
    pub fn set_response_model(&mut self, model: &str) {
        if self.response_model.is_empty() {
            self.response_model = model.to_string();
        }
    }

    /// Logs this call's prompt (JSON) and its completion when it ends.
    pub fn log_payload(&mut self, prompt: String) {
        self.payload = Some(Payload {
            prompt,
            completion: String::new(),
        });
    }

    /// Whether completion text should be collected (`add_completion_text`).
    pub fn wants_completion(&self) -> bool {
        self.payload.is_some()
    }

    pub fn add_completion_text(&mut self, text: &str) {
        if let Some(p) = self.payload.as_mut() {
            p.completion.push_str(text);
        }
    }

    pub fn mark_first_byte(&mut self) {
        self.first_byte.get_or_insert_with(Instant::now);
    }

    /// Usage as Azure reported it.
    pub fn set_usage(&mut self, (prompt, completion): (u64, u64)) {
        self.event.prompt_tokens = prompt;
        self.event.completion_tokens = completion;
        self.usage_known = true;
    }

    /// Completes the event for a call answered with `status` (and
    /// `error_code` if it failed): token counts (estimated if Azure reported
    /// none), latencies.
    pub fn settle(&mut self, status: u16, error_code: Option<&str>) -> &UsageEvent {
        let e = &mut self.event;
        e.status = u32::from(status);
        e.error_code = error_code.unwrap_or_default().to_string();
        let succeeded = (200..300).contains(&e.status);
        // No usage from Azure (e.g. a stream without the usage chunk), or
        // cut off mid-stream (what was streamed was still generated): count.
        if !self.usage_known && (succeeded || self.completion_chars > 0) {
            e.prompt_tokens = estimate_tokens(self.prompt_chars);
            e.completion_tokens = estimate_tokens(self.completion_chars);
            e.estimated = true;
        }
        e.total_tokens = e.prompt_tokens.saturating_add(e.completion_tokens);
        e.latency_ms = millis(self.started.elapsed());
        e.ttft_ms = self
            .first_byte
            .map_or(0, |t| millis(t.duration_since(self.started)));
        &self.event
    }

    /// The access-log line, formatted here into a reused buffer and handed
    /// to the log writer (the hottest log line); `false` when logs are not
    /// JSON lines.
    fn write_access_line(&self, trace_id: &str, cache: &str) -> bool {
        use aigw_shared::log_line::JsonLine;
        thread_local! {
            static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let e = &self.event;
        LINE.with(|buf| {
            let Ok(mut buf) = buf.try_borrow_mut() else {
                return false;
            };
            let line = JsonLine::info(&mut buf, "access")
                .str("request_id", &self.request_id)
                .str("trace_id", trace_id)
                .str("api_key_id", &e.api_key_id)
                .str("operation", &e.operation)
                .str("api_version", &self.api_version)
                .str("model", &e.model)
                .str("deployment", &e.deployment)
                .num("status", u64::from(e.status))
                .str("error_code", &e.error_code)
                .bool("stream", e.stream)
                .num("input_tokens", e.prompt_tokens)
                .num("output_tokens", e.completion_tokens)
                .bool("estimated", e.estimated)
                .str("cache", cache)
                .num("latency_ms", e.latency_ms)
                .num("ttft_ms", e.ttft_ms)
                .finish("aigw_data_plane::access");
            aigw_shared::telemetry::write_json_line(line)
        })
    }

    /// The same line through `tracing` (text logs).
    fn trace_access_line(&self, trace_id: &str, cache: &str) {
        let e = &self.event;
        tracing::info!(
            target: "aigw_data_plane::access",
            request_id = %self.request_id,
            trace_id = %trace_id,
            api_key_id = %e.api_key_id,
            operation = %e.operation,
            api_version = %self.api_version,
            model = %e.model,
            deployment = %e.deployment,
            status = e.status,
            error_code = %e.error_code,
            stream = e.stream,
            input_tokens = e.prompt_tokens,
            output_tokens = e.completion_tokens,
            estimated = e.estimated,
            cache,
            latency_ms = e.latency_ms,
            ttft_ms = e.ttft_ms,
            "access"
        );
    }

    /// Metrics, the access-log line (with the call's `trace_id`) and the
    /// payload line for a settled call; then the event goes to the bus.
    pub fn emit(self, trace_id: &str) {
        let e = &self.event;
        let cache = match CacheStatus::try_from(e.cache_status) {
            Ok(CacheStatus::Hit) => "hit",
            Ok(CacheStatus::Miss) => "miss",
            Ok(CacheStatus::Bypass) => "bypass",
            _ => "",
        };
        self.recorder.metrics.record_call(&CallRecord {
            model: &e.model,
            status: u16::try_from(e.status).unwrap_or(u16::MAX),
            latency: self.started.elapsed(),
            input_tokens: e.prompt_tokens,
            output_tokens: e.completion_tokens,
            cache,
        });
        // Never the prompt or the completion: sizes and counts only.
        if tracing::enabled!(target: "aigw_data_plane::access", tracing::Level::INFO)
            && !self.write_access_line(trace_id, cache)
        {
            self.trace_access_line(trace_id, cache);
        }
        if let Some(p) = &self.payload {
            // Only for models with `log_payloads`: the operator opted in.
            tracing::info!(
                target: "aigw_data_plane::payload",
                request_id = %self.request_id,
                trace_id = %trace_id,
                api_key_id = %e.api_key_id,
                model = %e.model,
                prompt = %p.prompt,
                completion = %p.completion,
                "payload"
            );
        }
        let Self {
            recorder, event, ..
        } = self;
        recorder.emit(event);
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(cap: usize) -> (Arc<UsageRecorder>, mpsc::Receiver<UsageEvent>, Arc<Metrics>) {
        let (tx, rx) = mpsc::channel(cap);
        let metrics = Arc::new(Metrics::default());
        (
            UsageRecorder::new(tx, "node-a", metrics.clone()),
            rx,
            metrics,
        )
    }

    fn finish(mut a: Accounting, status: u16, code: Option<&str>) {
        a.settle(status, code);
        a.emit("");
    }

    #[test]
    fn reported_usage_wins_and_ids_are_unique() {
        let (r, mut rx, _) = recorder(8);
        let mut a = r.begin("key-1", "chat");
        a.event.model = "alias".into();
        a.event.deployment = "dep".into();
        a.event.provider_key_id = "pk".into();
        a.prompt_chars = 400;
        a.set_usage((7, 5));
        finish(a, 200, None);
        finish(r.begin("key-1", "chat"), 200, None);
        let e = rx.try_recv().unwrap();
        assert_eq!(
            (e.prompt_tokens, e.completion_tokens, e.total_tokens),
            (7, 5, 12)
        );
        assert!(!e.estimated);
        assert_eq!(
            (e.model.as_str(), e.deployment.as_str(), e.node_id.as_str()),
            ("alias", "dep", "node-a")
        );
        assert_ne!(e.id, rx.try_recv().unwrap().id);
    }

    #[test]
    fn missing_usage_is_estimated_and_marked() {
        let (r, mut rx, _) = recorder(8);
        let mut a = r.begin("key-1", "chat");
        a.prompt_chars = 10;
        a.completion_chars += 9;
        finish(a, 200, None);
        let e = rx.try_recv().unwrap();
        assert!(e.estimated);
        assert_eq!((e.prompt_tokens, e.completion_tokens), (3, 3));
    }

    #[test]
    fn cut_off_streams_and_errors_carry_their_code() {
        let (r, mut rx, _) = recorder(8);
        let mut a = r.begin("key-1", "chat");
        a.completion_chars += 8;
        finish(a, 499, Some("client_closed_request"));
        let e = rx.try_recv().unwrap();
        assert_eq!(
            (e.status, e.error_code.as_str()),
            (499, "client_closed_request")
        );
        assert_eq!(e.completion_tokens, 2, "streamed text still counts");
        finish(r.begin("key-1", "chat"), 502, Some("upstream_error"));
        let e = rx.try_recv().unwrap();
        assert_eq!(
            (e.status, e.error_code.as_str(), e.total_tokens),
            (502, "upstream_error", 0)
        );
    }

    #[test]
    fn a_full_buffer_is_counted_not_silent() {
        let (r, _rx, metrics) = recorder(1);
        finish(r.begin("k", "chat"), 200, None);
        finish(r.begin("k", "chat"), 200, None);
        let text = metrics.render(0, true);
        assert!(text.contains("aigw_usage_dropped_total 1"), "{text}");
        assert!(text.contains("aigw_usage_buffer_depth 1"), "{text}");
    }
}
