//! A call's token cost before it runs, estimated the way Azure OpenAI does for
//! its own token limits: the prompt counted with the model's tokenizer, plus
//! the completion the caller allows (`max_tokens` × `n`).

use crate::openai::{request, Operation};
use serde_json::{Map, Value};
use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
use tiktoken_rs::CoreBPE;

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

/// Loads the tokenizers' tables, which takes a few hundred milliseconds,
/// so the first limited call does not pay for it.
pub fn warm_up() {
    for t in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
        let _ = tiktoken_rs::bpe_for_tokenizer(t);
    }
}

fn bpe(t: Tokenizer) -> Option<&'static CoreBPE> {
    tiktoken_rs::bpe_for_tokenizer(t).ok()
}

/// Estimated tokens of a whole call: prompt plus the allowed completion.
pub fn estimate(op: Operation, body: &Map<String, Value>, tokenizer: Tokenizer) -> u64 {
    let Some(bpe) = bpe(tokenizer) else {
        return 0;
    };
    let count = |s: &str| bpe.count_ordinary(s) as u64;
    let prompt = match op {
        Operation::ChatCompletions => chat_prompt(body, &count),
        Operation::Completions | Operation::Embeddings => {
            input_tokens(op.prompt_field().and_then(|f| body.get(f)), &count)
        }
        Operation::ListModels => 0,
    };
    let completion = match op {
        Operation::Embeddings | Operation::ListModels => 0,
        _ => {
            let max = [request::MAX_COMPLETION_TOKENS, request::MAX_TOKENS]
                .iter()
                .find_map(|k| body.get(*k).and_then(Value::as_u64))
                .unwrap_or(0);
            let n = body
                .get(request::N)
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1);
            max.saturating_mul(n)
        }
    };
    prompt.saturating_add(completion)
}

fn chat_prompt(body: &Map<String, Value>, count: &impl Fn(&str) -> u64) -> u64 {
    let mut total = REPLY_PRIMING;
    for m in body
        .get(
            Operation::ChatCompletions
                .prompt_field()
                .unwrap_or_default(),
        )
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        total += PER_MESSAGE;
        if let Some(role) = m.get("role").and_then(Value::as_str) {
            total += count(role);
        }
        if let Some(name) = m.get("name").and_then(Value::as_str) {
            total += count(name) + PER_NAME;
        }
        total += content_tokens(m.get("content"), count);
        for call in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(f) = call.get("function") {
                for k in ["name", "arguments"] {
                    if let Some(s) = f.get(k).and_then(Value::as_str) {
                        total += count(s);
                    }
                }
            }
        }
    }
    // Tool and function definitions are sent to the model as text too.
    for k in ["tools", "functions", "response_format"] {
        if let Some(v) = body.get(k) {
            total += count(&v.to_string());
        }
    }
    total
}

fn content_tokens(content: Option<&Value>, count: &impl Fn(&str) -> u64) -> u64 {
    match content {
        Some(Value::String(s)) => count(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("image_url") => PER_IMAGE,
                _ => p.get("text").and_then(Value::as_str).map_or(0, count),
            })
            .sum(),
        _ => 0,
    }
}

/// `prompt` / `input`: a string, strings, token ids or arrays of token ids.
fn input_tokens(v: Option<&Value>, count: &impl Fn(&str) -> u64) -> u64 {
    match v {
        Some(Value::String(s)) => count(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => count(s),
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn chat_counts_messages_framing_and_max_tokens() {
        let body = obj(json!({
            "messages": [{"role": "user", "content": "Hello, how are you?"}],
            "max_tokens": 50, "n": 2
        }));
        let t = tokenizer_for("gpt-4o");
        // "Hello, how are you?" is 6 tokens in o200k, "user" 1: 3 + 1 + 6 + 3 = 13.
        assert_eq!(estimate(Operation::ChatCompletions, &body, t), 13 + 100);
    }

    #[test]
    fn embeddings_and_completions_count_their_inputs() {
        let t = tokenizer_for("text-embedding-3-small");
        assert_eq!(t, Tokenizer::Cl100kBase);
        let body = obj(json!({"input": ["hello world", [1, 2, 3]]}));
        assert_eq!(estimate(Operation::Embeddings, &body, t), 2 + 3);
        let body = obj(json!({"prompt": "hello world", "max_tokens": 7}));
        assert_eq!(estimate(Operation::Completions, &body, t), 2 + 7);
    }

    #[test]
    fn azure_style_names_pick_the_right_tokenizer() {
        assert_eq!(tokenizer_for("gpt-35-turbo"), Tokenizer::Cl100kBase);
        assert_eq!(tokenizer_for("gpt-4o-mini"), Tokenizer::O200kBase);
        assert_eq!(tokenizer_for("my-prod-deployment"), Tokenizer::O200kBase);
    }
}
