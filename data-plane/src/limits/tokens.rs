//! A call's token cost before it runs, estimated the way Azure OpenAI does for
//! its own token limits: the prompt counted with the model's tokenizer, plus
//! the completion the caller allows (`max_tokens` × `n`).

use super::bpe::Bpe;
use crate::openai::raw::{self, RawObject};
use crate::openai::request::{self, Fields};
use crate::openai::Operation;
use std::sync::OnceLock;
use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};

/// Framing tokens around each chat message, and the reply's priming (OpenAI cookbook).
const PER_MESSAGE: u64 = 3;
const PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;
/// What an image part costs at low detail; high detail is corrected afterwards.
const PER_IMAGE: u64 = 85;

/// The tokenizer of a deployment's model, from its name (`gpt-4o…` → o200k,
/// `gpt-4…`/`gpt-35…` → cl100k); unknown names get o200k, today's default.
pub fn tokenizer_for(deployment: &str) -> Tokenizer {
    let name = deployment.replace("gpt-35", "gpt-3.5");
    get_tokenizer(&name).unwrap_or(Tokenizer::O200kBase)
}

/// Indexes the tokenizers' tables in the background, once, when a snapshot
/// first needs token counts (token limits or context windows): some tens of
/// milliseconds and ~3 MiB each, which a node without token limits never
/// pays; the first limited call does not wait for them.
pub fn warm_up_for(snapshot: &aigw_shared::snapshot::ConfigSnapshot) {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !needs_tokenizer(snapshot) || STARTED.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    // Only the tables the routes count with (each route uses its first
    // target's): a fleet of gpt-4o deployments never indexes cl100k.
    // A later snapshot with other models loads the rest on first use.
    let wanted = tokenizers_of(snapshot);
    let load = move || {
        for t in wanted {
            let _ = bpe(t);
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(load)),
        Err(_) => drop(std::thread::spawn(load)),
    }
}

/// The tokenizers `snapshot`'s routes count with, each once.
fn tokenizers_of(snapshot: &aigw_shared::snapshot::ConfigSnapshot) -> Vec<Tokenizer> {
    let mut out = Vec::new();
    for m in snapshot.models.values() {
        let mut targets = m.resolved_targets();
        targets.sort_by_key(|t| t.priority);
        let t = tokenizer_for(targets.first().map_or("", |t| t.model_name.as_str()));
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// Whether any token limit or context window applies under `snapshot`.
pub fn needs_tokenizer(snapshot: &aigw_shared::snapshot::ConfigSnapshot) -> bool {
    let tokens = |r: &Option<aigw_shared::domain::RateLimit>| {
        r.as_ref()
            .is_some_and(|r| r.tpm.is_some() || r.tpd.is_some())
    };
    snapshot.models.values().any(|m| {
        tokens(&m.rate_limit)
            || m.context_window.is_some()
            || m.targets.iter().any(|t| t.context_window.is_some())
    }) || snapshot.api_keys.values().any(|k| tokens(&k.rate_limit))
}

/// Loads both tables now (benches; nodes use [`warm_up_for`]).
pub fn warm_up() {
    for t in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
        let _ = bpe(t);
    }
}

/// `t`'s tables, read on first use; `None` (no token counts) if they cannot be.
fn bpe(t: Tokenizer) -> Option<&'static Bpe> {
    static TABLES: [OnceLock<Option<Bpe>>; 7] = [const { OnceLock::new() }; 7];
    let slot = match t {
        Tokenizer::O200kBase => 0,
        Tokenizer::O200kHarmony => 1,
        Tokenizer::Cl100kBase => 2,
        Tokenizer::P50kBase => 3,
        Tokenizer::P50kEdit => 4,
        Tokenizer::R50kBase => 5,
        Tokenizer::Gpt2 => 6,
    };
    TABLES[slot]
        .get_or_init(|| {
            Bpe::load(t)
                .map_err(|e| tracing::error!(error = %e, "token counts off: the tokenizer's tables did not load"))
                .ok()
        })
        .as_ref()
}

/// Estimated tokens of a whole call: prompt plus the allowed completion
/// (`fields`: the checked `max_tokens` and `n`).
pub fn estimate(op: Operation, body: &RawObject<'_>, fields: &Fields, tokenizer: Tokenizer) -> u64 {
    let Some(bpe) = bpe(tokenizer) else {
        return 0;
    };
    let count = |s: &str| -> u64 { request::string(s).map_or(0, |s| bpe.count(&s) as u64) };
    let prompt = match op {
        Operation::ChatCompletions => chat_prompt(body, &count),
        Operation::Completions | Operation::Embeddings => {
            input_tokens(op.prompt_field().and_then(|f| body.raw(f)), &count)
        }
        Operation::Responses => responses_prompt(body, &count),
        Operation::ListModels
        | Operation::GetResponse
        | Operation::DeleteResponse
        | Operation::CancelResponse
        | Operation::ListInputItems => 0,
    };
    let completion = match op {
        Operation::ChatCompletions | Operation::Completions | Operation::Responses => fields
            .max_tokens
            .unwrap_or(0)
            .saturating_mul(fields.n.max(1)),
        _ => 0,
    };
    prompt.saturating_add(completion)
}

/// A Responses request's prompt: `instructions`, then `input` (a string, or
/// items: messages framed like chat's, tool calls and their outputs as
/// text), then the tool definitions. A `previous_response_id`'s context is
/// billed too but unknown here: the usage corrects it afterwards.
fn responses_prompt(body: &RawObject<'_>, count: &impl Fn(&str) -> u64) -> u64 {
    use crate::openai::responses::{INPUT, INSTRUCTIONS, TOOLS};
    let mut total = REPLY_PRIMING;
    if let Some(i) = body.raw(INSTRUCTIONS) {
        total = total.saturating_add(PER_MESSAGE).saturating_add(count(i));
    }
    let input = body.raw(INPUT).unwrap_or_default();
    if input.starts_with('"') {
        total = total
            .saturating_add(PER_MESSAGE)
            .saturating_add(count(input));
    }
    for item in raw::items(input) {
        total = total.saturating_add(PER_MESSAGE);
        // One pass over the item, however long its content.
        let [role, content, name, arguments, output] =
            raw::lookup_each(item, ["role", "content", "name", "arguments", "output"]);
        if let Some(role) = role {
            total = total.saturating_add(count(role));
        }
        total = total.saturating_add(content_tokens(content, count));
        // Tool calls and their results are text the model reads.
        for v in [name, arguments, output].into_iter().flatten() {
            total = total.saturating_add(if v.starts_with('"') {
                count(v)
            } else {
                count_text(v, count)
            });
        }
    }
    if let Some(v) = body.raw(TOOLS) {
        total = total.saturating_add(count_text(v, count));
    }
    total
}

/// `count` takes a raw JSON string (anything else counts 0).
fn chat_prompt(body: &RawObject<'_>, count: &impl Fn(&str) -> u64) -> u64 {
    let mut total = REPLY_PRIMING;
    let messages = Operation::ChatCompletions
        .prompt_field()
        .and_then(|f| body.raw(f))
        .unwrap_or_default();
    for m in raw::items(messages) {
        total = total.saturating_add(PER_MESSAGE);
        // One pass over the message, however long its content.
        let [role, name, content, tool_calls] =
            raw::lookup_each(m, ["role", "name", "content", "tool_calls"]);
        if let Some(role) = role {
            total = total.saturating_add(count(role));
        }
        if let Some(name) = name {
            total = total.saturating_add(count(name).saturating_add(PER_NAME));
        }
        total = total.saturating_add(content_tokens(content, count));
        for call in raw::items(tool_calls.unwrap_or_default()) {
            if let Some(f) = raw::lookup(call, "function") {
                for s in raw::lookup_each(f, ["name", "arguments"])
                    .into_iter()
                    .flatten()
                {
                    total = total.saturating_add(count(s));
                }
            }
        }
    }
    // Tool and function definitions are sent to the model as text too.
    for k in ["tools", "functions", "response_format"] {
        if let Some(v) = body.raw(k) {
            total = total.saturating_add(count_text(v, count));
        }
    }
    total
}

/// Tokens of a JSON value's text as the model sees it.
fn count_text(raw_json: &str, count: &impl Fn(&str) -> u64) -> u64 {
    // `count` reads a JSON string: give it the value's text as one.
    serde_json::to_string(raw_json).map_or(0, |s| count(&s))
}

fn content_tokens(content: Option<&str>, count: &impl Fn(&str) -> u64) -> u64 {
    match content.and_then(|c| c.as_bytes().first()) {
        Some(b'"') => content.map_or(0, count),
        Some(b'[') => raw::items(content.unwrap_or_default())
            .map(|p| {
                let kind = raw::lookup(p, "type").and_then(request::string);
                if matches!(kind.as_deref(), Some("image_url" | "input_image")) {
                    PER_IMAGE
                } else {
                    raw::lookup(p, "text").map_or(0, count)
                }
            })
            .fold(0, u64::saturating_add),
        _ => 0,
    }
}

/// `prompt` / `input`: a string, strings, token ids or arrays of token ids.
fn input_tokens(v: Option<&str>, count: &impl Fn(&str) -> u64) -> u64 {
    match v.and_then(|v| v.as_bytes().first()) {
        Some(b'"') => v.map_or(0, count),
        Some(b'[') => raw::items(v.unwrap_or_default())
            .map(|i| match i.as_bytes().first() {
                Some(b'"') => count(i),
                Some(b'-' | b'0'..=b'9') => 1,
                Some(b'[') => raw::items(i).count() as u64,
                _ => 0,
            })
            .fold(0, u64::saturating_add),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn estimate_of(op: Operation, v: Value, t: Tokenizer) -> u64 {
        let text = v.to_string();
        let body = request::parse(text.as_bytes()).unwrap();
        let fields = request::read_fields(op, &body, None).unwrap();
        estimate(op, &body, &fields, t)
    }

    #[test]
    fn chat_counts_messages_framing_and_max_tokens() {
        let body = json!({
            "model": "m",
            "messages": [{"role": "user", "content": "Hello, how are you?"}],
            "max_tokens": 50, "n": 2
        });
        let t = tokenizer_for("gpt-4o");
        // "Hello, how are you?" is 6 tokens in o200k, "user" 1: 3 + 1 + 6 + 3 = 13.
        assert_eq!(estimate_of(Operation::ChatCompletions, body, t), 13 + 100);
    }

    #[test]
    fn embeddings_and_completions_count_their_inputs() {
        let t = tokenizer_for("text-embedding-3-small");
        assert_eq!(t, Tokenizer::Cl100kBase);
        let body = json!({"model": "m", "input": ["hello world", [1, 2, 3]]});
        assert_eq!(estimate_of(Operation::Embeddings, body, t), 2 + 3);
        let body = json!({"model": "m", "prompt": "hello world", "max_tokens": 7});
        assert_eq!(estimate_of(Operation::Completions, body, t), 2 + 7);
    }

    #[test]
    fn parts_tools_and_escapes_count_like_the_text() {
        let t = tokenizer_for("gpt-4o");
        let plain =
            json!({"model": "m", "messages": [{"role": "user", "content": "Hello, how are you?"}]});
        let parts = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, how are you?"}, {"type": "image_url", "image_url": {"url": "x"}}]}]});
        let p = estimate_of(Operation::ChatCompletions, plain.clone(), t);
        assert_eq!(
            estimate_of(Operation::ChatCompletions, parts, t),
            p + PER_IMAGE
        );
        let escaped =
            r#"{"model":"m","messages":[{"role":"user","content":"Hello, how are you\u003f"}]}"#;
        let body = request::parse(escaped.as_bytes()).unwrap();
        let fields = request::read_fields(Operation::ChatCompletions, &body, None).unwrap();
        assert_eq!(estimate(Operation::ChatCompletions, &body, &fields, t), p);
        let mut tools = plain;
        tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
        assert!(estimate_of(Operation::ChatCompletions, tools, t) > p);
    }

    #[test]
    fn names_and_tool_calls_count_like_their_text() {
        let t = tokenizer_for("gpt-4o");
        let hello = "Hello, how are you?"; // 6 tokens in o200k
        let chat = |m: serde_json::Value| json!({"model": "m", "messages": [m]});
        let p = estimate_of(
            Operation::ChatCompletions,
            chat(json!({"role": "assistant", "content": hello})),
            t,
        );
        let named = chat(json!({"content": hello, "role": "assistant", "name": hello}));
        assert_eq!(
            estimate_of(Operation::ChatCompletions, named, t),
            p + 6 + PER_NAME
        );
        let calls = chat(json!({"tool_calls": [
            {"id": "c1", "type": "function", "function": {"arguments": hello, "name": hello}},
            {"id": "c2", "type": "function", "function": {"name": hello}}
        ], "role": "assistant", "content": hello}));
        assert_eq!(estimate_of(Operation::ChatCompletions, calls, t), p + 18);
    }

    #[test]
    fn responses_count_instructions_input_items_tools_and_max_output_tokens() {
        let t = tokenizer_for("gpt-4o");
        // "Hello, how are you?" is 6 tokens in o200k.
        let text = json!({"model": "m", "input": "Hello, how are you?", "max_output_tokens": 40});
        assert_eq!(
            estimate_of(Operation::Responses, text, t),
            REPLY_PRIMING + PER_MESSAGE + 6 + 40
        );
        // As a message item, with parts: the same text, framed like chat's
        // ("user" is 1 token); an image costs its low-detail price.
        let items = json!({"model": "m", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Hello, how are you?"},
                                          {"type": "input_image", "image_url": "data:x"}]}
        ]});
        assert_eq!(
            estimate_of(Operation::Responses, items, t),
            REPLY_PRIMING + PER_MESSAGE + 1 + 6 + PER_IMAGE
        );
        let plain = json!({"model": "m", "input": "Hello, how are you?"});
        let base = estimate_of(Operation::Responses, plain.clone(), t);
        let mut more = plain.clone();
        more["instructions"] = json!("Hello, how are you?");
        assert_eq!(
            estimate_of(Operation::Responses, more, t),
            base + PER_MESSAGE + 6
        );
        let mut tools = plain.clone();
        tools["tools"] = json!([{"type": "function", "name": "get_weather", "parameters": {}}]);
        assert!(estimate_of(Operation::Responses, tools, t) > base);
        let outputs = json!({"model": "m", "input": [
            {"type": "function_call_output", "call_id": "c1", "output": "Hello, how are you?"}
        ]});
        assert_eq!(
            estimate_of(Operation::Responses, outputs, t),
            REPLY_PRIMING + PER_MESSAGE + 6
        );
    }

    #[test]
    fn azure_style_names_pick_the_right_tokenizer() {
        assert_eq!(tokenizer_for("gpt-35-turbo"), Tokenizer::Cl100kBase);
        assert_eq!(tokenizer_for("gpt-4o-mini"), Tokenizer::O200kBase);
        assert_eq!(tokenizer_for("my-prod-deployment"), Tokenizer::O200kBase);
    }
}

#[cfg(test)]
mod tokenizer_need_tests {
    use super::needs_tokenizer;
    use aigw_shared::snapshot::ConfigSnapshot;

    #[test]
    fn only_token_limits_and_context_windows_need_the_tokenizer() {
        let mut s: ConfigSnapshot = serde_json::from_value(serde_json::json!({
            "format": 2, "version": 1, "provider_keys": {},
            "models": {"m": {"display_name": "m", "provider": "azure", "rate_limit": {"rpm": 5}}},
            "api_keys": {"k": {"key_hash": "00", "allowed_models": ["m"], "rate_limit": {"rpm": 1}}}
        }))
        .unwrap();
        assert!(!needs_tokenizer(&s), "request limits need no token counts");
        s.api_keys
            .get_mut("k")
            .unwrap()
            .rate_limit
            .as_mut()
            .unwrap()
            .tpm = Some(1000);
        assert!(needs_tokenizer(&s));
        s.api_keys.get_mut("k").unwrap().rate_limit = None;
        assert!(!needs_tokenizer(&s));
        s.models.get_mut("m").unwrap().context_window = Some(128_000);
        assert!(needs_tokenizer(&s));
    }
}
