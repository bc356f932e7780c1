//! A cached JSON answer replayed as the SSE stream an OpenAI client expects
//! (or, for the Azure shape, an Azure client: with its filter annotations).

use crate::openai::Shape;
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Value};

/// Chunks of a chat or text completion: one content chunk per choice, one
/// finish chunk per choice, the usage chunk if asked for, then `[DONE]`.
/// The Azure shape starts, as Azure does, with the prompt-filter chunk, and
/// its content chunks carry their choice's `content_filter_results`.
pub fn sse_from_json(body: &[u8], shape: Shape, include_usage: bool) -> Bytes {
    let mut out = BytesMut::new();
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let chat = v["object"] == "chat.completion";
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let base = |choices: Value| {
        json!({
            "id": v["id"],
            "object": object,
            "created": v["created"],
            "model": v["model"],
            "system_fingerprint": v.get("system_fingerprint").cloned().unwrap_or(Value::Null),
            "choices": choices,
        })
    };
    let mut emit = |chunk: Value| {
        out.put_slice(b"data: ");
        out.put_slice(chunk.to_string().as_bytes());
        out.put_slice(b"\n\n");
    };
    let azure = shape == Shape::Azure;
    if let Some(filters) = v.get("prompt_filter_results").filter(|_| azure) {
        emit(
            json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                    "prompt_filter_results": filters}),
        );
    }
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    for c in &choices {
        let index = c["index"].clone();
        let mut content = if chat {
            json!({"index": index, "delta": {"role": "assistant", "content": c["message"]["content"]}, "finish_reason": null})
        } else {
            json!({"index": index, "text": c["text"], "finish_reason": null})
        };
        if let Some(filters) = c.get("content_filter_results").filter(|_| azure) {
            content["content_filter_results"] = filters.clone();
        }
        emit(base(json!([content])));
    }
    for c in &choices {
        let finish = if chat {
            json!([{"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"]}])
        } else {
            json!([{"index": c["index"], "text": "", "finish_reason": c["finish_reason"]}])
        };
        emit(base(finish));
    }
    if include_usage {
        let mut u = base(json!([]));
        u["usage"] = v["usage"].clone();
        emit(u);
    }
    out.put_slice(b"data: [DONE]\n\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_answer_becomes_chunks_ending_in_done() {
        let body = br#"{"id":"c1","object":"chat.completion","created":1,"model":"alias","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let s = String::from_utf8(sse_from_json(body, Shape::OpenAi, false).to_vec()).unwrap();
        let events: Vec<&str> = s.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{s}");
        assert!(
            events[0].contains(r#""content":"Hello there""#)
                && events[0].contains("chat.completion.chunk")
        );
        assert!(events[1].contains(r#""finish_reason":"stop""#));
        assert_eq!(events[2], "data: [DONE]");
        let s = String::from_utf8(sse_from_json(body, Shape::OpenAi, true).to_vec()).unwrap();
        assert!(s.contains(r#""total_tokens":5"#));
    }

    #[test]
    fn azure_shape_replays_the_filter_annotations() {
        let body = br#"{"id":"c1","object":"chat.completion","created":1,"model":"gpt-4o-2024","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false}}}],"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop","content_filter_results":{"sexual":{"filtered":false}}}]}"#;
        let s = String::from_utf8(sse_from_json(body, Shape::Azure, false).to_vec()).unwrap();
        let events: Vec<Value> = s
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(events.len(), 3, "{s}");
        assert_eq!(events[0]["choices"], json!([]));
        assert_eq!(
            events[0]["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"],
            false
        );
        assert_eq!(
            events[1]["choices"][0]["content_filter_results"]["sexual"]["filtered"],
            false
        );
        assert_eq!(events[1]["model"], "gpt-4o-2024");
        let openai = String::from_utf8(sse_from_json(body, Shape::OpenAi, false).to_vec()).unwrap();
        assert!(!openai.contains("filter"), "{openai}");
    }
}
