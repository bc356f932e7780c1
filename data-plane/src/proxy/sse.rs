//! Server-sent events from Azure, adapted chunk by chunk as they arrive
//! (never buffered whole). For the OpenAI shape the prompt-filter chunk and
//! annotation-only chunks are dropped, filter fields stripped and `model`
//! set to the alias; the Azure shape keeps them all as Azure sent them.
//! Either way the usage chunk is forwarded only if the caller asked, and the
//! stream always ends with `data: [DONE]`.
//!
//! A Responses API stream ([`SseAdapter::responses`]) keeps its events'
//! names and order; response ids are sealed (`crate::response_ids`), `model`
//! is the alias on the OpenAI shape, the usage comes from
//! `response.completed` (or another terminal event), and there is no
//! `[DONE]`: a stream that ends before a terminal event gets an `error`
//! event, and its usage is estimated.

use super::call::CallEnd;
use super::BoxError;
use crate::openai::azure::{self, ChunkKind};
use crate::openai::responses::{self, TERMINAL_EVENTS};
use crate::openai::{Answer, ChoiceText, Shape};
use crate::response_ids::IdScope;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Largest upstream event accepted: far above any real chunk (a token or a
/// tool-call fragment), so an upstream that never sends a separator gets an
/// error event instead of growing the buffer without end.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

pub struct SseAdapter<B> {
    upstream: B,
    /// Bytes received but not yet a complete event.
    pending: BytesMut,
    /// How much of `pending` is known to hold no separator: each byte is
    /// scanned once, however the upstream frames the stream.
    scanned: usize,
    /// Adapted events ready for the caller.
    out: BytesMut,
    alias: Arc<str>,
    shape: Shape,
    forward_usage: bool,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    upstream_done: bool,
    sent_done: bool,
    /// Ends the call (usage, span, permit) when the stream ends, or when the
    /// caller goes away (dropped).
    end: CallEnd,
    /// A Responses API stream: how its ids are sealed.
    responses: Option<IdScope>,
    /// A Responses stream reached a terminal event.
    terminal: bool,
}

impl<B> SseAdapter<B> {
    pub fn new(
        upstream: B,
        alias: Arc<str>,
        shape: Shape,
        forward_usage: bool,
        idle: Duration,
        end: CallEnd,
    ) -> Self {
        Self {
            upstream,
            pending: BytesMut::new(),
            scanned: 0,
            out: BytesMut::new(),
            alias,
            shape,
            forward_usage,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            upstream_done: false,
            sent_done: false,
            end,
            responses: None,
            terminal: false,
        }
    }

    /// The adapter for a Responses API stream, its ids sealed by `ids`.
    pub fn responses(mut self, ids: IdScope) -> Self {
        self.responses = Some(ids);
        self
    }

    /// Moves every complete event from `pending` to `out`.
    fn drain_events(&mut self, at_end: bool) {
        while !self.sent_done {
            // A separator can straddle two frames: rescan its first bytes.
            let from = self.scanned.saturating_sub(2);
            let Some((end, sep)) = event_end(self.pending.get(from..).unwrap_or_default())
                .map(|(end, sep)| (from + end, sep))
            else {
                self.scanned = self.pending.len();
                if at_end && !self.pending.is_empty() {
                    let rest = self.pending.split();
                    self.scanned = 0;
                    self.event(&rest);
                } else if self.pending.len() > MAX_EVENT_BYTES {
                    self.pending.clear();
                    self.scanned = 0;
                    self.fail(&format!(
                        "the upstream sent a stream event larger than {MAX_EVENT_BYTES} bytes"
                    ));
                }
                return;
            };
            let ev = self.pending.split_to(end);
            self.pending.advance(sep);
            self.scanned = 0;
            if ev.len() > MAX_EVENT_BYTES {
                self.fail(&format!(
                    "the upstream sent a stream event larger than {MAX_EVENT_BYTES} bytes"
                ));
                break;
            }
            self.event(&ev);
        }
        self.pending.clear();
    }

    fn event(&mut self, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let mut data = String::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            // Lenient: some upstreams send a bare `[DONE]` line.
            let payload = if let Some(rest) = line.strip_prefix("data:") {
                rest.strip_prefix(' ').unwrap_or(rest)
            } else if line.trim() == "[DONE]" {
                "[DONE]"
            } else {
                continue; // `event:`, `id:`, comments
            };
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(payload);
        }
        let data = data.trim();
        if data.is_empty() {
            return;
        }
        if data == "[DONE]" {
            self.finish();
            return;
        }
        if self.responses.is_some() {
            self.responses_event(data);
            return;
        }
        let Ok(mut chunk) = Answer::parse(data.as_bytes()) else {
            tracing::debug!("dropping an unparseable stream event");
            return;
        };
        let azure_shape = self.shape == Shape::Azure;
        match azure::chunk_kind(&chunk) {
            // Annotations say nothing of the answer's content or timing.
            ChunkKind::PromptFilter | ChunkKind::Annotation if azure_shape => {}
            ChunkKind::PromptFilter | ChunkKind::Annotation => return,
            ChunkKind::Usage => {
                if let (Some(a), Some(u)) = (self.end.usage(), chunk.usage()) {
                    a.set_usage(u.tokens());
                }
                if !self.forward_usage {
                    return;
                }
                self.account(&mut chunk);
            }
            ChunkKind::Content => self.account(&mut chunk),
        }
        if !self.forward_usage {
            chunk.remove_usage();
        }
        if !azure_shape {
            azure::strip_fields(&mut chunk);
            chunk.set_model(&self.alias);
        }
        let before = self.out.len();
        self.out.extend_from_slice(b"data: ");
        if chunk.write_to((&mut self.out).writer()).is_err() {
            self.out.truncate(before);
            return;
        }
        self.out.extend_from_slice(b"\n\n");
    }

    /// What a chunk tells the call's record: the model, the first byte's
    /// time, the characters (and, when logged, the text) generated.
    fn account(&mut self, chunk: &mut Answer<'_>) {
        let Some(a) = self.end.usage() else { return };
        if let Some(m) = chunk.model() {
            a.set_response_model(&m);
        }
        a.mark_first_byte();
        let wants_text = a.wants_completion();
        let Some(choices) = chunk.choices_mut() else {
            return;
        };
        for c in choices.iter() {
            let text = ChoiceText::of(c);
            a.completion_chars += text.streamed_chars();
            if wants_text {
                if let Some(t) = text.text() {
                    a.add_completion_text(t);
                }
            }
        }
    }

    /// One Responses API event, forwarded with its name: ids sealed,
    /// `model` the alias (OpenAI shape), usage and text accounted.
    fn responses_event(&mut self, data: &str) {
        let Some(scope) = self.responses.as_ref() else {
            return;
        };
        let Ok(mut ev) = responses::Event::parse(data.as_bytes()) else {
            tracing::debug!("dropping an unparseable stream event");
            return;
        };
        let kind = ev.kind().map(|k| k.into_owned()).unwrap_or_default();
        let terminal = TERMINAL_EVENTS.contains(&kind.as_str());
        if let Some(mut r) = ev.response() {
            if let Some(a) = self.end.usage() {
                if let Some(m) = r.model() {
                    a.set_response_model(&m);
                }
                if let (true, Some(u)) = (terminal, r.usage()) {
                    a.set_usage(u.tokens());
                }
            }
            let alias = (self.shape == Shape::OpenAi).then_some(&*self.alias);
            r.rewrite(&|id| scope.seal(id), alias);
            ev.set_response(&r);
        }
        if let (Some(a), Some(delta)) = (self.end.usage(), ev.text_delta()) {
            a.mark_first_byte();
            a.completion_chars += delta.chars().count();
            if a.wants_completion() {
                a.add_completion_text(&delta);
            }
        }
        self.terminal |= terminal;
        if !kind.is_empty() {
            self.out.extend_from_slice(b"event: ");
            self.out.extend_from_slice(kind.as_bytes());
            self.out.extend_from_slice(b"\n");
        }
        self.out.extend_from_slice(b"data: ");
        self.out.extend_from_slice(ev.to_json().as_bytes());
        self.out.extend_from_slice(b"\n\n");
    }

    /// The upstream's stream ended: a Responses stream must have reached a
    /// terminal event, or it was cut.
    fn upstream_ended(&mut self) {
        if self.responses.is_some() && !self.terminal && !self.sent_done {
            self.fail("the upstream stream ended before the response was completed");
        }
        self.finish();
    }

    fn finish(&mut self) {
        if !self.sent_done {
            if self.responses.is_none() {
                self.out.extend_from_slice(DONE);
            }
            self.sent_done = true;
            self.end.close(200, None);
        }
    }

    /// Tells the caller the stream broke, then ends it properly.
    fn fail(&mut self, message: &str) {
        // The caller got a 200 and then a broken stream.
        self.end.close(200, Some("upstream_stream_error"));
        if self.responses.is_some() {
            // The Responses API's own error event.
            let ev = serde_json::json!({"type": "error", "code": "upstream_error", "message": message, "param": null});
            self.out.extend_from_slice(b"event: error\ndata: ");
            self.out.extend_from_slice(ev.to_string().as_bytes());
            self.out.extend_from_slice(b"\n\n");
            self.finish();
            return;
        }
        let ev = serde_json::json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": "upstream_error"}});
        self.out.extend_from_slice(b"data: ");
        self.out.extend_from_slice(ev.to_string().as_bytes());
        self.out.extend_from_slice(b"\n\n");
        self.finish();
    }
}

/// End of the first complete event and the length of its separator.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

impl<B> Body for SseAdapter<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(this.out.split().freeze()))));
            }
            if this.sent_done {
                return Poll::Ready(None);
            }
            if this.upstream_done {
                this.drain_events(true);
                this.upstream_ended();
                continue;
            }
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.pending.extend_from_slice(&data);
                        this.drain_events(false);
                    }
                    let next = crate::clock::deadline_after(tokio::time::Instant::now(), this.idle);
                    this.idle_timer.as_mut().reset(next);
                }
                Poll::Ready(Some(Err(e))) => {
                    this.drain_events(true);
                    this.fail(&format!("the upstream stream broke: {e}"));
                }
                Poll::Ready(None) => this.upstream_done = true,
                Poll::Pending => {
                    if this.idle_timer.as_mut().poll(cx).is_ready() {
                        let msg = format!("the upstream stream was silent for {:?}", this.idle);
                        this.fail(&msg);
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.sent_done && self.out.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn adapt(chunks: Vec<&'static str>, forward_usage: bool) -> String {
        adapt_as(Shape::OpenAi, chunks, forward_usage)
    }

    fn adapt_as(shape: Shape, chunks: Vec<&'static str>, forward_usage: bool) -> String {
        let frames = futures::stream::iter(chunks.into_iter().map(|c| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes())))
        }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let bytes = rt.block_on(async {
            let body = SseAdapter::new(
                StreamBody::new(frames),
                Arc::from("alias"),
                shape,
                forward_usage,
                Duration::from_secs(5),
                CallEnd::detached(),
            );
            body.collect().await.unwrap().to_bytes()
        });
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    const RECORDED: &str = concat!(
        "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n",
        "data: {\"choices\":[{\"content_filter_results\":{},\"delta\":{\"content\":\"\",\"role\":\"assistant\"},\"finish_reason\":null,\"index\":0}],\"created\":1,\"id\":\"c1\",\"model\":\"gpt-5-mini\",\"object\":\"chat.completion.chunk\",\"usage\":null}\n\n",
        "data: {\"choices\":[{\"content_filter_results\":{\"hate\":{\"filtered\":false}},\"delta\":{\"content\":\"424\"},\"finish_reason\":null,\"index\":0}],\"created\":1,\"id\":\"c1\",\"model\":\"gpt-5-mini\",\"object\":\"chat.completion.chunk\",\"usage\":null}\n\n",
        "data: {\"choices\":[{\"content_filter_results\":{},\"delta\":{},\"finish_reason\":\"stop\",\"index\":0}],\"created\":1,\"id\":\"c1\",\"model\":\"gpt-5-mini\",\"object\":\"chat.completion.chunk\",\"usage\":null}\n\n",
        "data: {\"choices\":[{\"content_filter_offsets\":{\"check_offset\":1},\"content_filter_results\":{},\"finish_reason\":null,\"index\":0}],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\"}\n\n",
        "data: {\"choices\":[],\"created\":1,\"id\":\"c1\",\"model\":\"gpt-5-mini\",\"object\":\"chat.completion.chunk\",\"usage\":{\"completion_tokens\":12,\"prompt_tokens\":15,\"total_tokens\":27}}\n\n",
        "data: [DONE]\n\n",
    );

    fn events(s: &str) -> Vec<String> {
        s.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn recorded_stream_without_usage() {
        let out = adapt(vec![RECORDED], false);
        let ev = events(&out);
        assert_eq!(ev.len(), 4, "{out}");
        assert!(!out.contains("content_filter"), "{out}");
        assert!(!out.contains("prompt_filter_results"), "{out}");
        assert!(!out.contains("usage"), "{out}");
        assert!(!out.contains("gpt-5-mini"), "{out}");
        assert!(ev[0].contains("\"role\":\"assistant\"") && ev[0].contains("\"model\":\"alias\""));
        assert!(ev[1].contains("424"));
        assert!(ev[2].contains("\"finish_reason\":\"stop\""));
        assert_eq!(ev[3], "data: [DONE]");
    }

    #[test]
    fn recorded_stream_in_azure_shape_keeps_the_annotations() {
        let out = adapt_as(Shape::Azure, vec![RECORDED], false);
        let ev = events(&out);
        // Every event but the usage chunk, as Azure sent it, then [DONE].
        assert_eq!(ev.len(), 6, "{out}");
        assert!(ev[0].contains("\"prompt_filter_results\":[{\"prompt_index\":0"));
        assert!(ev[2].contains("\"content_filter_results\":{\"hate\":{\"filtered\":false}}"));
        assert!(ev[2].contains("\"model\":\"gpt-5-mini\""), "{}", ev[2]);
        assert!(ev[4].contains("\"content_filter_offsets\""));
        assert!(!out.contains("usage"), "not asked for: {out}");
        assert!(!out.contains("\"alias\""), "{out}");
        assert_eq!(ev[5], "data: [DONE]");
        let with_usage = adapt_as(Shape::Azure, vec![RECORDED], true);
        let ev = events(&with_usage);
        assert_eq!(ev.len(), 7, "{with_usage}");
        assert!(ev[5].contains("\"total_tokens\":27"));
        // Unchanged but for whitespace: the recorded chunks, byte for byte.
        let recorded = events(RECORDED);
        assert_eq!(ev, recorded);
    }

    #[test]
    fn recorded_stream_with_usage_split_anywhere() {
        // Split the bytes at every position: framing must not matter.
        for cut in [1, 7, 100, 333, RECORDED.len() - 3] {
            let (a, b) = RECORDED.split_at(cut);
            let a: &'static str = Box::leak(a.to_string().into_boxed_str());
            let b: &'static str = Box::leak(b.to_string().into_boxed_str());
            let out = adapt(vec![a, b], true);
            let ev = events(&out);
            assert_eq!(ev.len(), 5, "cut {cut}: {out}");
            assert!(ev[3].contains("\"total_tokens\":27") && ev[3].contains("\"model\":\"alias\""));
            assert_eq!(ev[4], "data: [DONE]");
        }
    }

    #[test]
    fn an_endless_event_is_an_error_event_not_a_growing_buffer() {
        // 16 MB without a separator, in 64 KiB frames (issue 17 row 9).
        let frame: &'static str =
            Box::leak(format!("data: {}", "x".repeat(64 * 1024)).into_boxed_str());
        let out = adapt(vec![frame; 256], false);
        let ev = events(&out);
        assert_eq!(ev.len(), 2, "{}", &out[..out.len().min(300)]);
        assert!(
            ev[0].contains("\"code\":\"upstream_error\"") && ev[0].contains("larger than"),
            "{}",
            ev[0]
        );
        assert_eq!(ev[1], "data: [DONE]");
        // One event just under the bound still goes through.
        let big: &'static str = Box::leak(
            format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}},\"index\":0}}],\"id\":\"a\",\"model\":\"m\"}}\n\n",
                "y".repeat(MAX_EVENT_BYTES - 100)
            )
            .into_boxed_str(),
        );
        let (a, b) = big.split_at(big.len() / 2);
        let out = adapt(vec![a, b], false);
        assert_eq!(events(&out).len(), 2);
        assert!(out.contains("yyyy"));
    }

    #[test]
    fn separators_split_across_frames_are_found() {
        let ev = "data: {\"choices\":[{\"delta\":{\"content\":\"z\"},\"index\":0}],\"id\":\"a\",\"model\":\"m\"}";
        for sep in ["\n\n", "\r\n\r\n", "\n\r\n"] {
            let whole: &'static str =
                Box::leak(format!("{ev}{sep}{ev}{sep}data: [DONE]{sep}").into_boxed_str());
            for cut in ev.len()..=ev.len() + sep.len() {
                let (a, b) = whole.split_at(cut);
                let out = adapt(vec![a, b], false);
                assert_eq!(events(&out).len(), 3, "{sep:?} cut {cut}: {out}");
            }
        }
    }

    fn adapt_responses(stream: &'static str) -> String {
        let frames = futures::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
            Bytes::from_static(stream.as_bytes()),
        ))]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let scope = IdScope {
            ids: Arc::new(crate::response_ids::ResponseIds::new(&[5u8; 32])),
            provider_key_id: "pk".into(),
            api_key_id: "key".into(),
            alias: "alias".into(),
        };
        let bytes = rt.block_on(async {
            SseAdapter::new(
                StreamBody::new(frames),
                Arc::from("alias"),
                Shape::OpenAi,
                true,
                Duration::from_secs(5),
                CallEnd::detached(),
            )
            .responses(scope)
            .collect()
            .await
            .unwrap()
            .to_bytes()
        });
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    const RESPONSES: &str = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_up\",\"model\":\"gpt-4o-2024\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"delta\":\"Hi\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_up\",\"model\":\"gpt-4o-2024\",\"status\":\"completed\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1,\"total_tokens\":4}}}\n\n",
    );

    #[test]
    fn responses_streams_keep_their_events_and_seal_their_ids() {
        let out = adapt_responses(RESPONSES);
        let ev = events(&out);
        assert_eq!(ev.len(), 3, "no [DONE] on a Responses stream: {out}");
        let names: Vec<&str> = ev
            .iter()
            .map(|e| e.lines().next().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "event: response.created",
                "event: response.output_text.delta",
                "event: response.completed"
            ]
        );
        assert!(
            !out.contains("resp_up") && !out.contains("gpt-4o-2024"),
            "{out}"
        );
        let data = |e: &str| -> serde_json::Value {
            serde_json::from_str(e.lines().nth(1).unwrap().strip_prefix("data: ").unwrap()).unwrap()
        };
        let (created, completed) = (data(&ev[0]), data(&ev[2]));
        let id = created["response"]["id"].as_str().unwrap();
        assert!(id.starts_with("resp_"), "{id}");
        assert_eq!(completed["response"]["id"], id, "one response, one id");
        assert_eq!(completed["response"]["model"], "alias");
        assert_eq!(completed["response"]["usage"]["total_tokens"], 4);
        assert_eq!(data(&ev[1])["item_id"], "msg_1");
    }

    #[test]
    fn a_responses_stream_cut_before_its_end_says_so() {
        let cut = &RESPONSES[..RESPONSES.find("event: response.completed").unwrap()];
        let out = adapt_responses(Box::leak(cut.to_string().into_boxed_str()));
        let ev = events(&out);
        assert_eq!(ev.len(), 3, "{out}");
        assert!(
            ev[2].starts_with("event: error\ndata: {") && ev[2].contains("\"type\":\"error\""),
            "{}",
            ev[2]
        );
        assert!(!out.contains("[DONE]"));
    }

    #[test]
    fn lenient_endings() {
        let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"index\":0}],\"id\":\"a\",\"model\":\"m\"}\n\n";
        // No [DONE] at all.
        let out = adapt(vec![chunk], false);
        assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
        assert_eq!(events(&out).len(), 2);
        // Bare [DONE] without `data:`, CRLF separators, trailing event without separator.
        let crlf = "data: {\"choices\":[{\"delta\":{\"content\":\"y\"},\"index\":0}],\"id\":\"a\",\"model\":\"m\"}\r\n\r\n[DONE]";
        let out = adapt(vec![crlf], false);
        assert_eq!(events(&out).len(), 2, "{out}");
        assert!(out.contains("\"content\":\"y\""));
        // Nothing after [DONE] is forwarded.
        let out = adapt(vec!["data: [DONE]\n\n", chunk], false);
        assert_eq!(out, "data: [DONE]\n\n");
    }
}
