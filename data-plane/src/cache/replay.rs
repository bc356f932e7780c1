//! A cached JSON answer replayed as the SSE stream an OpenAI client expects.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Value};

/// Chunks of a chat or text completion: one content chunk per choice, one
/// finish chunk per choice, the usage chunk if asked for, then `[DONE]`.
pub fn sse_from_json(body: &[u8], include_usage: bool) -> Bytes {
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
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    for c in &choices {
        let index = c["index"].clone();
        let content = if chat {
            json!([{"index": index, "delta": {"role": "assistant", "content": c["message"]["content"]}, "finish_reason": null}])
        } else {
            json!([{"index": index, "text": c["text"], "finish_reason": null}])
        };
        emit(base(content));
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
        let s = String::from_utf8(sse_from_json(body, false).to_vec()).unwrap();
        let events: Vec<&str> = s.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{s}");
        assert!(
            events[0].contains(r#""content":"Hello there""#)
                && events[0].contains("chat.completion.chunk")
        );
        assert!(events[1].contains(r#""finish_reason":"stop""#));
        assert_eq!(events[2], "data: [DONE]");
        let s = String::from_utf8(sse_from_json(body, true).to_vec()).unwrap();
        assert!(s.contains(r#""total_tokens":5"#));
    }
}
