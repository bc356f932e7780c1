//! The playground's call: one chat completion through a data plane, made by
//! the control plane (no CORS, no key kept), with the caller key the user typed.

use super::forms::FormData;
use serde_json::{json, Value};
use std::time::Instant;

/// What the playground shows about a call.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub status: u16,
    pub answer: String,
    pub latency_ms: u128,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub served_by: Option<String>,
    /// The body of an error answer.
    pub error: Option<String>,
}

pub async fn send(http: &reqwest::Client, base: &str, form: &FormData) -> Result<Outcome, String> {
    let (alias, key, message) = (
        form.get("model"),
        form.get("caller_key"),
        form.get("message"),
    );
    if alias.is_empty() || key.is_empty() || message.is_empty() {
        return Err("choose a model, and type a caller key and a message".into());
    }
    let stream = form.has("stream");
    let mut body = json!({
        "model": alias,
        "messages": [{ "role": "user", "content": message }],
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({ "include_usage": true });
    }
    let url = format!("{}/v1/chat/completions", base.trim_end_matches('/'));
    let started = Instant::now();
    let resp = http
        .post(&url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("calling {url}: {e}"))?;
    let mut out = Outcome {
        status: resp.status().as_u16(),
        served_by: resp
            .headers()
            .get("x-aigw-served-by")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        ..Outcome::default()
    };
    let ok = resp.status().is_success();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    out.latency_ms = started.elapsed().as_millis();
    if !ok {
        out.error = Some(text);
        return Ok(out);
    }
    let mut usage = Value::Null;
    if stream {
        for data in text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
        {
            let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(s) = chunk
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                out.answer.push_str(s);
            }
            if chunk.get("usage").is_some_and(|u| !u.is_null()) {
                usage = chunk["usage"].clone();
            }
        }
    } else {
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
        out.answer = v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        usage = v["usage"].clone();
    }
    out.prompt_tokens = usage["prompt_tokens"].as_u64();
    out.completion_tokens = usage["completion_tokens"].as_u64();
    Ok(out)
}
