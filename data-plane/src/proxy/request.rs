//! Reading and checking the caller's request body.

use crate::config::Operation;
use crate::error::Error;
use bytes::Bytes;
use http::{header, HeaderMap};
use serde_json::{Map, Value};

/// A checked request, ready to send upstream (cheap to clone: the body is shared).
#[derive(Clone)]
pub struct Call {
    pub alias: String,
    pub stream: bool,
    /// The caller asked for the usage chunk (`stream_options.include_usage`).
    pub caller_wants_usage: bool,
    pub max_tokens: Option<u64>,
    /// Characters of prompt text, for counting tokens ourselves if need be.
    pub prompt_chars: usize,
    /// The parsed body, for the response cache's key.
    pub parsed: std::sync::Arc<Map<String, Value>>,
    /// The body for Azure: the caller's own bytes unless it had to change.
    pub body: Bytes,
}

/// What the caller sent the model, as JSON, for payload logging:
/// `messages`, `prompt` or `input`.
pub fn prompt_json(op: Operation, body: &Map<String, Value>) -> String {
    let field = match op {
        Operation::ChatCompletions => "messages",
        Operation::Completions => "prompt",
        Operation::Embeddings => "input",
    };
    body.get(field).map(Value::to_string).unwrap_or_default()
}

fn invalid(
    message: impl Into<String>,
    param: Option<&'static str>,
    code: Option<&'static str>,
) -> Error {
    Error::InvalidRequest {
        message: message.into(),
        param,
        code,
    }
}

/// Reads at most `max` bytes, parses JSON and checks the fields `op` needs.
pub async fn read<B>(op: Operation, headers: &HeaderMap, body: B, max: usize) -> Result<Call, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default();
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(Error::UnsupportedMediaType);
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(Error::PayloadTooLarge { limit: max });
    }
    let bytes = match aigw_shared::body::read_limited(body, max).await {
        Ok(b) => b,
        Err(aigw_shared::Error::BodyTooLarge { limit }) => {
            return Err(Error::PayloadTooLarge { limit })
        }
        Err(e) => return Err(invalid(e.to_string(), None, None)),
    };
    let mut obj: Map<String, Value> = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(o)) => o,
        Ok(_) => {
            return Err(invalid(
                "the request body must be a JSON object",
                None,
                Some("invalid_json"),
            ))
        }
        Err(e) => {
            return Err(invalid(
                format!("we could not parse the JSON body of your request: {e}"),
                None,
                Some("invalid_json"),
            ))
        }
    };
    let alias = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return Err(invalid(
                "`model` must be a non-empty string",
                Some("model"),
                Some("invalid_type"),
            ))
        }
        None => {
            return Err(invalid(
                "you must provide a model parameter",
                Some("model"),
                Some("missing_required_parameter"),
            ))
        }
    };
    let required = match op {
        Operation::ChatCompletions => "messages",
        Operation::Completions => "prompt",
        Operation::Embeddings => "input",
    };
    match obj.get(required) {
        None | Some(Value::Null) => {
            return Err(invalid(
                format!("missing required parameter: `{required}`"),
                Some(required_param(op)),
                Some("missing_required_parameter"),
            ))
        }
        Some(Value::Array(a)) if a.is_empty() && op == Operation::ChatCompletions => {
            return Err(invalid(
                "`messages` must not be empty",
                Some("messages"),
                Some("invalid_value"),
            ))
        }
        Some(Value::Array(_)) => {}
        Some(_) if op == Operation::ChatCompletions => {
            return Err(invalid(
                "`messages` must be an array",
                Some("messages"),
                Some("invalid_type"),
            ))
        }
        Some(_) => {}
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b && op != Operation::Embeddings,
        Some(_) => {
            return Err(invalid(
                "`stream` must be a boolean",
                Some("stream"),
                Some("invalid_type"),
            ))
        }
    };
    let max_tokens = obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
        .and_then(Value::as_u64);
    let prompt_chars = obj.get(required).map_or(0, text_chars);
    let mut caller_wants_usage = false;
    let body = if stream {
        // Azure sends token usage in streams only when asked; we always ask,
        // and forward the usage chunk only if the caller asked too.
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !opts.is_object() {
            return Err(invalid(
                "`stream_options` must be an object",
                Some("stream_options"),
                Some("invalid_type"),
            ));
        }
        caller_wants_usage = opts
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        opts["include_usage"] = Value::Bool(true);
        Bytes::from(serde_json::to_vec(&obj).map_err(|e| invalid(e.to_string(), None, None))?)
    } else {
        bytes
    };
    let parsed = std::sync::Arc::new(obj);
    Ok(Call {
        alias,
        stream,
        caller_wants_usage,
        max_tokens,
        prompt_chars,
        parsed,
        body,
    })
}

/// Characters of text in a prompt: strings, message `content` (string or
/// parts with `text`), arrays of those.
pub fn text_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(a) => a.iter().map(text_chars).sum(),
        Value::Object(o) => ["content", "text"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(text_chars)
            .sum(),
        _ => 0,
    }
}

fn required_param(op: Operation) -> &'static str {
    match op {
        Operation::ChatCompletions => "messages",
        Operation::Completions => "prompt",
        Operation::Embeddings => "input",
    }
}
