//! The request fields the gateway reads, checks or rewrites, read off the
//! body without building a tree of it (`raw`): the top-level fields are kept
//! as their raw text, and only what the gateway needs is parsed from them.
//! A request therefore costs about its own size in memory, however it is
//! shaped (a `serde_json::Value` of `[0,0,…]` costs ~30× its bytes).

pub use super::field::{string, Invalid, MAX_COMPLETION_TOKENS_LIMIT};
use super::raw::{self, Field, RawObject};
use super::Operation;

pub const MODEL: &str = "model";
pub const STREAM: &str = "stream";
pub const STREAM_OPTIONS: &str = "stream_options";
pub const INCLUDE_USAGE: &str = "include_usage";
pub const MAX_TOKENS: &str = "max_tokens";
pub const MAX_COMPLETION_TOKENS: &str = "max_completion_tokens";
pub const TEMPERATURE: &str = "temperature";
pub const N: &str = "n";

/// Largest `n` (choices per call), as the OpenAI API documents it.
pub const MAX_N: u64 = 128;
/// Most top-level fields a request may have (the API has a few dozen); each
/// is kept while the call runs, so this bounds what tiny fields can cost.
pub const MAX_FIELDS: usize = 256;

fn invalid(message: impl Into<String>, param: &'static str, code: &'static str) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param),
        code: Some(code),
    }
}

/// Reads the body's top level: a JSON object of at most [`MAX_FIELDS`]
/// fields, every value checked but kept as text.
pub fn parse(body: &[u8]) -> Result<RawObject<'_>, Invalid> {
    let object = RawObject::parse_bounded(body, MAX_FIELDS).map_err(|e| Invalid {
        message: match e {
            raw::Invalid::Json { .. } if !body.trim_ascii_start().starts_with(b"{") => {
                "the request body must be a JSON object".to_string()
            }
            raw::Invalid::Json { at } => format!(
                "we could not parse the JSON body of your request (invalid JSON at byte {at})"
            ),
            raw::Invalid::TooManyFields { max } => {
                format!("the request body has more than {max} top-level fields")
            }
        },
        param: None,
        code: Some("invalid_json"),
    })?;
    // The gateway and Azure must read the same value: a repeated field
    // (first wins here, last in most JSON readers) could hide a large
    // `max_tokens` from the limits.
    let mut keys: Vec<&str> = object.fields().map(|(k, _)| k).collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(Invalid {
            message: format!("the request body repeats the field `{}`", w[0]),
            param: None,
            code: Some("invalid_json"),
        });
    }
    Ok(object)
}

/// The fields of a request the gateway acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    /// The alias the caller asked for: the deployment route's path
    /// segment, else `model`.
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
    /// `temperature` exactly 0 and `n` absent or 1: cacheable (never for
    /// the Responses API, whose calls are stateful).
    pub deterministic: bool,
    /// The Responses API's `previous_response_id`, as the caller sent it.
    pub previous_response_id: Option<String>,
}

/// Checks what `op` requires of `body` and reads the fields the gateway uses.
/// `path_alias` is the alias Azure's deployment route named: there `model`
/// is optional and ignored (Azure ignores it on that route too).
pub fn read_fields(
    op: Operation,
    body: &RawObject<'_>,
    path_alias: Option<&str>,
) -> Result<Fields, Invalid> {
    let alias = match path_alias {
        Some(a) => a.to_string(),
        None => alias(body)?,
    };
    let prompt = prompt(op, body)?;
    let responses = match op {
        Operation::Responses => Some(super::responses::read(body)?),
        _ => None,
    };
    let stream = stream(op, body)?;
    let caller_wants_usage = stream && caller_wants_usage(body)?;
    let n = bounded(body, N, MAX_N)?;
    let temperature_zero = body
        .raw(TEMPERATURE)
        .and_then(|t| serde_json::from_str::<f64>(t).ok())
        == Some(0.0);
    let prompt_chars = prompt.map_or(0, text_chars);
    if let Some(r) = responses {
        return Ok(Fields {
            alias,
            stream,
            // Responses streams always end with the usage (`response.completed`).
            caller_wants_usage: stream,
            max_tokens: r.max_output_tokens,
            n: 1,
            prompt_chars: prompt_chars.saturating_add(r.instructions_chars),
            deterministic: false,
            previous_response_id: r.previous_response_id,
        });
    }
    Ok(Fields {
        alias,
        stream,
        caller_wants_usage,
        max_tokens: max_tokens(body)?,
        n: n.unwrap_or(1),
        prompt_chars,
        deterministic: temperature_zero && n.is_none_or(|n| n == 1),
        previous_response_id: None,
    })
}

fn alias(body: &RawObject<'_>) -> Result<String, Invalid> {
    match body.raw(MODEL) {
        Some(m) => match string(m) {
            Some(m) if !m.is_empty() => Ok(m.into_owned()),
            _ => Err(invalid(
                "`model` must be a non-empty string",
                MODEL,
                "invalid_type",
            )),
        },
        None => Err(invalid(
            "you must provide a model parameter",
            MODEL,
            "missing_required_parameter",
        )),
    }
}

/// The prompt field `op` requires (`messages`, `prompt`, `input`), raw.
fn prompt<'a>(op: Operation, body: &RawObject<'a>) -> Result<Option<&'a str>, Invalid> {
    let Some(field) = op.prompt_field() else {
        return Ok(None);
    };
    let value = body.raw(field).filter(|v| *v != "null").ok_or_else(|| {
        invalid(
            format!("missing required parameter: `{field}`"),
            field,
            "missing_required_parameter",
        )
    })?;
    if op != Operation::ChatCompletions {
        return Ok(Some(value));
    }
    if !value.starts_with('[') {
        return Err(invalid(
            "`messages` must be an array",
            field,
            "invalid_type",
        ));
    }
    let mut count = 0usize;
    for (i, m) in raw::items(value).enumerate() {
        if !m.starts_with('{') {
            return Err(invalid(
                format!("`messages[{i}]` must be an object"),
                field,
                "invalid_type",
            ));
        }
        count += 1;
    }
    if count == 0 {
        return Err(invalid(
            "`messages` must not be empty",
            field,
            "invalid_value",
        ));
    }
    Ok(Some(value))
}

fn stream(op: Operation, body: &RawObject<'_>) -> Result<bool, Invalid> {
    match body.raw(STREAM) {
        None | Some("null") => Ok(false),
        Some("true") => Ok(op.streams()),
        Some("false") => Ok(false),
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

fn caller_wants_usage(body: &RawObject<'_>) -> Result<bool, Invalid> {
    match body.raw(STREAM_OPTIONS) {
        None => Ok(false),
        Some(o) if o.starts_with('{') => Ok(raw::lookup(o, INCLUDE_USAGE) == Some("true")),
        Some(_) => Err(stream_options_invalid()),
    }
}

/// An optional integer field within `1..=max` (`null` is absent).
fn bounded(body: &RawObject<'_>, field: &'static str, max: u64) -> Result<Option<u64>, Invalid> {
    match body.raw(field) {
        None | Some("null") => Ok(None),
        Some(v) => match serde_json::from_str::<u64>(v) {
            Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(invalid(
                format!("`{field}` must be an integer from 1 to {max}"),
                field,
                "invalid_value",
            )),
        },
    }
}

fn max_tokens(body: &RawObject<'_>) -> Result<Option<u64>, Invalid> {
    let completion = bounded(body, MAX_COMPLETION_TOKENS, MAX_COMPLETION_TOKENS_LIMIT)?;
    let max = bounded(body, MAX_TOKENS, MAX_COMPLETION_TOKENS_LIMIT)?;
    Ok(completion.or(max))
}

/// Azure sends token usage in streams only when asked: the gateway always
/// asks (`stream_options.include_usage`), and forwards the usage chunk only
/// if the caller asked too.
pub fn ask_for_stream_usage(body: &mut RawObject<'_>) -> Result<(), Invalid> {
    let opts = match body.raw(STREAM_OPTIONS) {
        None => r#"{"include_usage":true}"#.to_string(),
        Some(o) => {
            let mut opts =
                RawObject::parse_text(o, MAX_FIELDS).map_err(|_| stream_options_invalid())?;
            opts.set(INCLUDE_USAGE, Field::Raw("true"));
            opts.to_json()
        }
    };
    body.set(STREAM_OPTIONS, Field::Json(opts));
    Ok(())
}

/// What the caller sent the model, as JSON, for payload logging.
pub fn prompt_json(op: Operation, body: &RawObject<'_>) -> String {
    op.prompt_field()
        .and_then(|f| body.raw(f))
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Characters of text in a prompt: strings, message `content` (string or
/// parts with `text`), arrays of those.
pub fn text_chars(v: &str) -> usize {
    match v.as_bytes().first() {
        // Without escapes the characters are those between the quotes: no
        // decoding, no copy of a long prompt.
        Some(b'"') => match v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            Some(inner) if !inner.contains('\\') => inner.chars().count(),
            _ => string(v).map_or(0, |s| s.chars().count()),
        },
        Some(b'[') => raw::items(v).map(text_chars).sum(),
        Some(b'{') => raw::lookup_each(v, ["content", "text"])
            .into_iter()
            .flatten()
            .map(text_chars)
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// `read_fields` of a JSON value's text.
    fn read(op: Operation, v: &Value) -> Result<Fields, Invalid> {
        let text = v.to_string();
        read_fields(op, &parse(text.as_bytes())?, None)
    }

    #[test]
    fn fields_and_their_errors() {
        let f = read(
            Operation::ChatCompletions,
            &json!({"model": "m", "messages": [{"role": "user", "content": "hey"}], "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 5}),
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
        let e = read(
            Operation::ChatCompletions,
            &json!({"model": "m", "messages": []}),
        );
        assert_eq!(e.unwrap_err().code, Some("invalid_value"));
        let e = read(Operation::Embeddings, &json!({"model": "m"}));
        assert_eq!(e.unwrap_err().param, Some("input"));
        let e = read(Operation::Completions, &json!({"prompt": "x"}));
        assert_eq!(e.unwrap_err().code, Some("missing_required_parameter"));
        let f = read(
            Operation::Embeddings,
            &json!({"model": "m", "input": "x", "stream": true}),
        )
        .unwrap();
        assert!(!f.stream, "embeddings never stream");
        for (body, param) in [
            (json!({"model": 3, "messages": [{}]}), "model"),
            (json!({"model": "m", "messages": {}}), "messages"),
            (json!({"model": "m", "messages": [{}, 0]}), "messages"),
            (
                json!({"model": "m", "messages": [{}], "stream": "yes"}),
                "stream",
            ),
            (
                json!({"model": "m", "messages": [{}], "stream": true, "stream_options": 1}),
                "stream_options",
            ),
        ] {
            let e = read(Operation::ChatCompletions, &body).unwrap_err();
            assert_eq!(
                (e.param, e.code),
                (Some(param), Some("invalid_type")),
                "{body}"
            );
        }
    }

    #[test]
    fn the_deployment_route_alias_wins_over_model() {
        let body = json!({"model": "other", "messages": [{"role": "user", "content": "x"}]});
        let text = body.to_string();
        let o = parse(text.as_bytes()).unwrap();
        let f = read_fields(Operation::ChatCompletions, &o, Some("from-path")).unwrap();
        assert_eq!(f.alias, "from-path");
        // `model` may be absent, or anything: Azure ignores it there.
        for body in [json!({"input": "x"}), json!({"model": 3, "input": "x"})] {
            let text = body.to_string();
            let o = parse(text.as_bytes()).unwrap();
            let f = read_fields(Operation::Embeddings, &o, Some("emb")).unwrap();
            assert_eq!(f.alias, "emb", "{body}");
        }
        // The operation's own requirements still hold.
        let o = parse(br#"{"model":"m"}"#).unwrap();
        let e = read_fields(Operation::Embeddings, &o, Some("emb")).unwrap_err();
        assert_eq!(e.param, Some("input"));
    }

    #[test]
    fn the_body_is_read_without_a_tree_and_its_width_is_bounded() {
        let wide = format!(
            "{{{}\"model\":\"m\"}}",
            (0..MAX_FIELDS)
                .map(|i| format!("\"f{i}\":0,"))
                .collect::<String>()
        );
        let e = parse(wide.as_bytes()).unwrap_err();
        assert!(e.message.contains("top-level fields"), "{}", e.message);
        assert!(parse(b"{\"model\": [}")
            .unwrap_err()
            .message
            .contains("byte"));
        assert!(parse(b"[1]").is_err());
        let e = parse(br#"{"model":"m","max_tokens":1,"max_tokens":900000}"#).unwrap_err();
        assert!(
            e.message.contains("repeats the field `max_tokens`"),
            "{}",
            e.message
        );
        // Nested width costs nothing and is fine.
        let nested = format!(
            "{{\"model\":\"m\",\"messages\":[{{\"content\":\"hi\"}}],\"x\":{{{}\"y\":1}}}}",
            (0..10_000)
                .map(|i| format!("\"f{i}\":0,"))
                .collect::<String>()
        );
        let body = parse(nested.as_bytes()).unwrap();
        assert_eq!(
            read_fields(Operation::ChatCompletions, &body, None)
                .unwrap()
                .prompt_chars,
            2
        );
    }

    #[test]
    fn prompt_characters_count_decoded_text_only() {
        let v = json!([{"role": "user", "content": "h\u{e9}\"llo"}, {"content": [{"type": "text", "text": "ab"}, {"type": "image_url", "image_url": {"url": "xyz"}}]}]);
        assert_eq!(text_chars(&v.to_string()), 5 + 1 + 2);
        assert_eq!(text_chars("\"\\u00e9\""), 1);
        assert_eq!(text_chars("12"), 0);
        // No escapes: counted between the quotes, in characters, not bytes.
        assert_eq!(text_chars("\"h\u{e9}llo \u{1f600}\""), 7);
        assert_eq!(text_chars("\"\""), 0);
        assert_eq!(text_chars("\""), 0, "not a string");
        // Both fields of one part; the first of duplicate keys.
        assert_eq!(
            text_chars(r#"{"text":"abc","x":"zzzz","content":"de","content":"fghij"}"#),
            5
        );
    }

    #[test]
    fn max_tokens_and_n_are_bounded() {
        let chat = |extra: Value| {
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            if let (Some(b), Value::Object(e)) = (b.as_object_mut(), extra) {
                b.extend(e);
            }
            read(Operation::ChatCompletions, &b)
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
    fn only_deterministic_requests_are_cacheable() {
        let det = |extra: Value| {
            let mut b = json!({"model": "m", "messages": [{"content": "x"}]});
            if let (Some(b), Value::Object(e)) = (b.as_object_mut(), extra) {
                b.extend(e);
            }
            read(Operation::ChatCompletions, &b).unwrap().deterministic
        };
        assert!(det(json!({"temperature": 0})));
        assert!(det(json!({"temperature": 0.0, "n": 1})));
        assert!(!det(json!({"temperature": 0.7})));
        assert!(!det(json!({})), "the default temperature is not 0");
        assert!(!det(json!({"temperature": 0, "n": 2})));
    }

    #[test]
    fn stream_usage_is_always_asked_for() {
        let text = r#"{"a":1,"stream_options":{"include_usage":false,"x":1}}"#;
        let mut b = parse(text.as_bytes()).unwrap();
        ask_for_stream_usage(&mut b).unwrap();
        assert_eq!(
            b.to_json(),
            r#"{"a":1,"stream_options":{"include_usage":true,"x":1}}"#
        );
        let mut b = parse(br#"{"a":1}"#).unwrap();
        ask_for_stream_usage(&mut b).unwrap();
        assert_eq!(
            b.to_json(),
            r#"{"a":1,"stream_options":{"include_usage":true}}"#
        );
        let mut b = parse(br#"{"stream_options":3}"#).unwrap();
        assert!(ask_for_stream_usage(&mut b).is_err());
    }
}
