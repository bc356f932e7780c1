//! The request fields the gateway reads, checks or rewrites. The body is
//! parsed once into a JSON object (the response cache keys on it and token
//! limits count it); these functions read the typed fields off it.

use super::Operation;
use serde_json::{Map, Value};

pub const MODEL: &str = "model";
pub const STREAM: &str = "stream";
pub const STREAM_OPTIONS: &str = "stream_options";
pub const INCLUDE_USAGE: &str = "include_usage";
pub const MAX_TOKENS: &str = "max_tokens";
pub const MAX_COMPLETION_TOKENS: &str = "max_completion_tokens";
pub const TEMPERATURE: &str = "temperature";
pub const N: &str = "n";

/// Largest `max_tokens` / `max_completion_tokens` accepted: above every
/// deployment's output limit (the largest today is 128k), so a bigger value
/// can only be a mistake or an attempt to overflow the token estimate; it is
/// refused with a 400 rather than clamped, as Azure would refuse it.
pub const MAX_COMPLETION_TOKENS_LIMIT: u64 = 1 << 20;
/// Largest `n` (choices per call), as the OpenAI API documents it.
pub const MAX_N: u64 = 128;

/// A request body that breaks the API: the OpenAI error's message, `param`
/// and `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

fn invalid(message: impl Into<String>, param: &'static str, code: &'static str) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param),
        code: Some(code),
    }
}

/// The fields of a request the gateway acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    /// `model`: the alias the caller asked for.
    pub alias: String,
    pub stream: bool,
    /// The caller asked for the usage chunk (`stream_options.include_usage`).
    pub caller_wants_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`; at most
    /// [`MAX_COMPLETION_TOKENS_LIMIT`].
    pub max_tokens: Option<u64>,
    /// `n`, 1 when absent; at most [`MAX_N`].
    pub n: u64,
    /// Characters of prompt text, for counting tokens ourselves if need be.
    pub prompt_chars: usize,
}

/// Checks what `op` requires of `body` and reads the fields the gateway uses.
pub fn read_fields(op: Operation, body: &Map<String, Value>) -> Result<Fields, Invalid> {
    let alias = alias(body)?;
    let prompt = prompt(op, body)?;
    let stream = stream(op, body)?;
    let caller_wants_usage = stream && caller_wants_usage(body)?;
    Ok(Fields {
        alias,
        stream,
        caller_wants_usage,
        max_tokens: max_tokens(body)?,
        n: choices(body)?,
        prompt_chars: prompt.map_or(0, text_chars),
    })
}

fn alias(body: &Map<String, Value>) -> Result<String, Invalid> {
    match body.get(MODEL) {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        Some(_) => Err(invalid(
            "`model` must be a non-empty string",
            MODEL,
            "invalid_type",
        )),
        None => Err(invalid(
            "you must provide a model parameter",
            MODEL,
            "missing_required_parameter",
        )),
    }
}

/// The prompt field `op` requires (`messages`, `prompt`, `input`).
fn prompt(op: Operation, body: &Map<String, Value>) -> Result<Option<&Value>, Invalid> {
    let Some(field) = op.prompt_field() else {
        return Ok(None);
    };
    let chat = op == Operation::ChatCompletions;
    match body.get(field) {
        None | Some(Value::Null) => Err(invalid(
            format!("missing required parameter: `{field}`"),
            field,
            "missing_required_parameter",
        )),
        Some(Value::Array(a)) if a.is_empty() && chat => Err(invalid(
            "`messages` must not be empty",
            field,
            "invalid_value",
        )),
        Some(v @ Value::Array(_)) => Ok(Some(v)),
        Some(_) if chat => Err(invalid(
            "`messages` must be an array",
            field,
            "invalid_type",
        )),
        Some(v) => Ok(Some(v)),
    }
}

fn stream(op: Operation, body: &Map<String, Value>) -> Result<bool, Invalid> {
    match body.get(STREAM) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b && op.streams()),
        Some(_) => Err(invalid(
            "`stream` must be a boolean",
            STREAM,
            "invalid_type",
        )),
    }
}

fn stream_options_invalid() -> Invalid {
    invalid(
        "`stream_options` must be an object",
        STREAM_OPTIONS,
        "invalid_type",
    )
}

fn caller_wants_usage(body: &Map<String, Value>) -> Result<bool, Invalid> {
    match body.get(STREAM_OPTIONS) {
        None => Ok(false),
        Some(Value::Object(o)) => Ok(o.get(INCLUDE_USAGE).and_then(Value::as_bool) == Some(true)),
        Some(_) => Err(stream_options_invalid()),
    }
}

/// An optional integer field within `1..=max` (`null` is absent).
fn bounded(
    body: &Map<String, Value>,
    field: &'static str,
    max: u64,
) -> Result<Option<u64>, Invalid> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(invalid(
                format!("`{field}` must be an integer from 1 to {max}"),
                field,
                "invalid_value",
            )),
        },
    }
}

fn max_tokens(body: &Map<String, Value>) -> Result<Option<u64>, Invalid> {
    let completion = bounded(body, MAX_COMPLETION_TOKENS, MAX_COMPLETION_TOKENS_LIMIT)?;
    let max = bounded(body, MAX_TOKENS, MAX_COMPLETION_TOKENS_LIMIT)?;
    Ok(completion.or(max))
}

fn choices(body: &Map<String, Value>) -> Result<u64, Invalid> {
    Ok(bounded(body, N, MAX_N)?.unwrap_or(1))
}

/// Azure sends token usage in streams only when asked: the gateway always
/// asks (`stream_options.include_usage`), and forwards the usage chunk only
/// if the caller asked too.
pub fn ask_for_stream_usage(body: &mut Map<String, Value>) -> Result<(), Invalid> {
    let opts = body
        .entry(STREAM_OPTIONS)
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(opts) = opts else {
        return Err(stream_options_invalid());
    };
    opts.insert(INCLUDE_USAGE.into(), Value::Bool(true));
    Ok(())
}

/// What the caller sent the model, as JSON, for payload logging.
pub fn prompt_json(op: Operation, body: &Map<String, Value>) -> String {
    op.prompt_field()
        .and_then(|f| body.get(f))
        .map(Value::to_string)
        .unwrap_or_default()
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

/// Whether a request is deterministic enough to cache: `temperature`
/// exactly 0 and `n` absent or 1.
pub fn deterministic(body: &Map<String, Value>) -> bool {
    let temperature_zero = body.get(TEMPERATURE).and_then(Value::as_f64) == Some(0.0);
    let single = match body.get(N) {
        None | Some(Value::Null) => true,
        Some(v) => v.as_u64() == Some(1),
    };
    temperature_zero && single
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => Map::new(),
        }
    }

    #[test]
    fn fields_and_their_errors() {
        let f = read_fields(
            Operation::ChatCompletions,
            &obj(json!({"model": "m", "messages": [{"role": "user", "content": "hey"}], "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 5})),
        )
        .unwrap();
        assert_eq!(
            (
                f.alias.as_str(),
                f.stream,
                f.caller_wants_usage,
                f.max_tokens,
                f.prompt_chars
            ),
            ("m", true, true, Some(5), 3)
        );
        let e = read_fields(
            Operation::ChatCompletions,
            &obj(json!({"model": "m", "messages": []})),
        );
        assert_eq!(e.unwrap_err().code, Some("invalid_value"));
        let e = read_fields(Operation::Embeddings, &obj(json!({"model": "m"})));
        assert_eq!(e.unwrap_err().param, Some("input"));
        let e = read_fields(Operation::Completions, &obj(json!({"prompt": "x"})));
        assert_eq!(e.unwrap_err().code, Some("missing_required_parameter"));
        let f = read_fields(
            Operation::Embeddings,
            &obj(json!({"model": "m", "input": "x", "stream": true})),
        )
        .unwrap();
        assert!(!f.stream, "embeddings never stream");
    }

    #[test]
    fn max_tokens_and_n_are_bounded() {
        let chat = |extra: Value| {
            let mut b = obj(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}));
            b.extend(obj(extra));
            read_fields(Operation::ChatCompletions, &b)
        };
        for (field, v) in [
            ("max_tokens", json!(9_223_372_036_854_775_808u64)),
            ("max_tokens", json!(MAX_COMPLETION_TOKENS_LIMIT + 1)),
            ("max_completion_tokens", json!(-1)),
            ("max_tokens", json!(1.5)),
            ("max_tokens", json!("100")),
            ("max_tokens", json!(0)),
            ("n", json!(MAX_N + 1)),
            ("n", json!(0)),
        ] {
            let e = chat(json!({ field: v })).unwrap_err();
            assert_eq!(
                (e.param, e.code),
                (Some(field), Some("invalid_value")),
                "{field}: {v}"
            );
        }
        let f = chat(json!({"max_tokens": MAX_COMPLETION_TOKENS_LIMIT, "n": MAX_N})).unwrap();
        assert_eq!(
            (f.max_tokens, f.n),
            (Some(MAX_COMPLETION_TOKENS_LIMIT), MAX_N)
        );
        let f = chat(json!({"max_tokens": null, "max_completion_tokens": 7})).unwrap();
        assert_eq!((f.max_tokens, f.n), (Some(7), 1));
    }

    #[test]
    fn stream_usage_is_always_asked_for() {
        let mut b = obj(json!({"stream_options": {"include_usage": false, "x": 1}}));
        ask_for_stream_usage(&mut b).unwrap();
        assert_eq!(b["stream_options"], json!({"include_usage": true, "x": 1}));
        let mut b = obj(json!({"stream_options": 3}));
        assert!(ask_for_stream_usage(&mut b).is_err());
    }
}
