use super::{estimate_tokens, CacheStatus, UsageEvent};
use crate::metrics::{CallRecord, Metrics};
use crate::proxy::{CallAttributes, CallSpan};
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

    /// Starts accounting for one call by `api_key_id`. The call's server span
    /// is kept until the call ends, a stream's last chunk included, so the
    /// span's end and token counts are the call's own.
    pub fn begin(
        self: &Arc<Self>,
        api_key_id: &str,
        operation: &'static str,
        trace: CallSpan,
    ) -> Accounting {
        let now = time::OffsetDateTime::now_utc();
        Accounting {
            recorder: self.clone(),
            started: Instant::now(),
            first_byte: None,
            event: UsageEvent {
                id: uuid::Uuid::now_v7().to_string(),
                time_unix_ms: (now.unix_timestamp_nanos() / 1_000_000) as i64,
                node_id: self.node_id.to_string(),
                api_key_id: api_key_id.to_string(),
                operation: operation.to_string(),
                cache_status: CacheStatus::Miss as i32,
                ..Default::default()
            },
            prompt_chars: 0,
            completion_chars: 0,
            usage_known: false,
            finished: false,
            trace,
            max_tokens: None,
            server_address: String::new(),
            request_id: String::new(),
            response_model: String::new(),
            permit: None,
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

/// One call's usage, filled in as the call goes. Dropped unfinished (the
/// caller went away), it still records the call, with status 499.
pub struct Accounting {
    recorder: Arc<UsageRecorder>,
    started: Instant,
    first_byte: Option<Instant>,
    event: UsageEvent,
    prompt_chars: usize,
    completion_chars: usize,
    usage_known: bool,
    finished: bool,
    /// The call's server span: everything below goes on it at the end.
    trace: CallSpan,
    max_tokens: Option<u64>,
    /// The Azure host that answered (kept only when the span records).
    server_address: String,
    request_id: String,
    /// `model` as Azure answered (the deployment's model version).
    response_model: String,
    /// The call's hold on its rate limits: settled with the real token count
    /// when the call ends, and released (concurrency) when this is dropped.
    permit: Option<crate::limits::Permit>,
    /// Prompt and completion, kept only for models that opt in (`log_payloads`).
    payload: Option<Payload>,
}

struct Payload {
    prompt: String,
    completion: String,
}

impl Accounting {
    pub fn set_route(&mut self, alias: &str, deployment: &str, provider_key_id: &str) {
        self.event.model = alias.to_string();
        self.event.deployment = deployment.to_string();
        self.event.provider_key_id = provider_key_id.to_string();
    }

    /// The call's server span, parent of its upstream attempts.
    pub fn trace(&self) -> &CallSpan {
        &self.trace
    }

    /// The request's `max_tokens` (or `max_completion_tokens`), for the span.
    pub fn set_max_tokens(&mut self, max_tokens: Option<u64>) {
        self.max_tokens = max_tokens;
    }

    /// The host of the deployment tried last, for the span.
    pub fn set_server_address(&mut self, host: &str) {
        if self.trace.is_recording() {
            host.clone_into(&mut self.server_address);
        }
    }

    pub fn set_cache_status(&mut self, status: CacheStatus) {
        self.event.cache_status = status as i32;
    }

    /// The JWT caller's id (empty for API-key callers).
    pub fn set_caller_id(&mut self, caller_id: &str) {
        self.event.caller_id = caller_id.to_string();
    }

    /// The call's `x-request-id`, for the access log.
    pub fn set_request_id(&mut self, id: &http::HeaderValue) {
        if self.request_id.is_empty() {
            self.request_id = id.to_str().unwrap_or_default().to_string();
        }
    }

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

    pub fn set_permit(&mut self, permit: crate::limits::Permit) {
        self.permit = Some(permit);
    }

    pub fn set_stream(&mut self, stream: bool) {
        self.event.stream = stream;
    }

    /// Characters of prompt text, for estimating when Azure reports no usage.
    pub fn set_prompt_chars(&mut self, chars: usize) {
        self.prompt_chars = chars;
    }

    pub fn add_completion_chars(&mut self, chars: usize) {
        self.completion_chars += chars;
    }

    pub fn mark_first_byte(&mut self) {
        self.first_byte.get_or_insert_with(Instant::now);
    }

    /// Usage as Azure reported it.
    pub fn set_usage(&mut self, prompt: u64, completion: u64) {
        self.event.prompt_tokens = prompt;
        self.event.completion_tokens = completion;
        self.usage_known = true;
    }

    /// Records the call as answered with `status` (and `error_code` if it failed).
    pub fn finish(mut self, status: u16, error_code: Option<&str>) {
        self.event.status = u32::from(status);
        self.event.error_code = error_code.unwrap_or_default().to_string();
        self.complete();
    }

    fn complete(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let succeeded = (200..300).contains(&self.event.status);
        if !self.usage_known && succeeded {
            // Azure sent no usage (e.g. a stream without the usage chunk): count ourselves.
            self.event.prompt_tokens = estimate_tokens(self.prompt_chars);
            self.event.completion_tokens = estimate_tokens(self.completion_chars);
            self.event.estimated = true;
        } else if !self.usage_known && self.completion_chars > 0 {
            // Cut off mid-stream: what was streamed was still generated.
            self.event.prompt_tokens = estimate_tokens(self.prompt_chars);
            self.event.completion_tokens = estimate_tokens(self.completion_chars);
            self.event.estimated = true;
        }
        self.event.total_tokens = self.event.prompt_tokens + self.event.completion_tokens;
        if let Some(p) = self.permit.as_mut() {
            p.settle(self.event.total_tokens);
        }
        self.event.latency_ms = self.started.elapsed().as_millis() as u64;
        self.event.ttft_ms = self
            .first_byte
            .map_or(0, |t| t.duration_since(self.started).as_millis() as u64);
        self.observe();
        self.recorder.emit(std::mem::take(&mut self.event));
    }

    /// Metrics, span attributes and the access-log line for the finished call.
    fn observe(&mut self) {
        let e = &self.event;
        let cache = match CacheStatus::try_from(e.cache_status) {
            Ok(CacheStatus::Hit) => "hit",
            Ok(CacheStatus::Miss) => "miss",
            Ok(CacheStatus::Bypass) => "bypass",
            _ => "",
        };
        let latency = self.started.elapsed();
        self.recorder.metrics.record_call(&CallRecord {
            model: &e.model,
            status: e.status as u16,
            latency,
            input_tokens: e.prompt_tokens,
            output_tokens: e.completion_tokens,
            cache,
        });
        let trace_id = self.trace.trace_id();
        self.trace.end(&CallAttributes {
            operation: &e.operation,
            alias: &e.model,
            status: e.status as u16,
            error_code: &e.error_code,
            api_key_id: &e.api_key_id,
            caller_id: &e.caller_id,
            response_model: &self.response_model,
            max_tokens: self.max_tokens,
            stream: e.stream,
            usage: Some((e.prompt_tokens, e.completion_tokens)),
            server_address: &self.server_address,
        });
        // Never the prompt or the completion: sizes and counts only.
        tracing::info!(
            target: "aigw_data_plane::access",
            request_id = %self.request_id,
            trace_id = %trace_id,
            api_key_id = %e.api_key_id,
            operation = %e.operation,
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
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        if !self.finished {
            if self.event.status == 0 {
                self.event.status = 499;
                self.event.error_code = "client_closed_request".into();
            }
            self.complete();
        }
    }
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

    #[test]
    fn reported_usage_wins_and_ids_are_unique() {
        let (r, mut rx, _) = recorder(8);
        let mut a = r.begin("key-1", "chat", CallSpan::none());
        a.set_route("alias", "dep", "pk");
        a.set_prompt_chars(400);
        a.set_usage(7, 5);
        a.finish(200, None);
        r.begin("key-1", "chat", CallSpan::none()).finish(200, None);
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
        let mut a = r.begin("key-1", "chat", CallSpan::none());
        a.set_prompt_chars(10);
        a.add_completion_chars(9);
        a.finish(200, None);
        let e = rx.try_recv().unwrap();
        assert!(e.estimated);
        assert_eq!((e.prompt_tokens, e.completion_tokens), (3, 3));
    }

    #[test]
    fn dropped_unfinished_is_a_499_and_errors_carry_their_code() {
        let (r, mut rx, _) = recorder(8);
        let mut a = r.begin("key-1", "chat", CallSpan::none());
        a.add_completion_chars(8);
        drop(a);
        let e = rx.try_recv().unwrap();
        assert_eq!(
            (e.status, e.error_code.as_str()),
            (499, "client_closed_request")
        );
        assert_eq!(e.completion_tokens, 2, "streamed text still counts");
        r.begin("key-1", "chat", CallSpan::none())
            .finish(502, Some("upstream_error"));
        let e = rx.try_recv().unwrap();
        assert_eq!(
            (e.status, e.error_code.as_str(), e.total_tokens),
            (502, "upstream_error", 0)
        );
    }

    #[test]
    fn a_full_buffer_is_counted_not_silent() {
        let (r, _rx, metrics) = recorder(1);
        r.begin("k", "chat", CallSpan::none()).finish(200, None);
        r.begin("k", "chat", CallSpan::none()).finish(200, None);
        let text = metrics.render(0, true);
        assert!(text.contains("aigw_usage_dropped_total 1"), "{text}");
        assert!(text.contains("aigw_usage_buffer_depth 1"), "{text}");
    }
}
