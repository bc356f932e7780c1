//! The mock's Responses API (OpenAI's wire format as Azure serves it; see
//! `azure-wire.md`): `POST /openai/v1/responses` and, with an `api-version`,
//! `POST /openai/responses`, the deployment in the body's `model`; then
//! `GET|DELETE …/responses/{id}`, `POST …/{id}/cancel`,
//! `GET …/{id}/input_items` on the same two prefixes.
//!
//! Responses are stored per mock instance, as an Azure resource stores
//! them: another mock (another region) does not know them (404).
//!
//! # Deterministic answers
//! * Text ([`expected_response_text`]): `"Hello from Azure OpenAI! You said:
//!   <text>"`, `<text>` the string `input`, or the text of the last `user`
//!   item's content (a string, or its parts' `text`), trimmed; cut to the
//!   first `max_output_tokens` words when that is smaller than the word
//!   count (status `incomplete`, `incomplete_details.reason:
//!   max_output_tokens`).
//! * Usage ([`expected_response_usage`]): `input_tokens = max(1, C / 4)`, `C`
//!   the characters of `instructions` plus every input text;
//!   `output_tokens` = the answer's words.
//! * A `previous_response_id` this mock does not store: 400
//!   `previous_response_not_found`; one it stores: the answer says so in
//!   `previous_response_id`.
//! * `background: true`: answered `queued` (no output, `usage: null`); reads
//!   say `in_progress` for [`BACKGROUND_DELAY`], then `completed` with output
//!   and usage; cancel before then makes it `cancelled`.
//! * `store: false`: not stored (reads are 404).
//! * `stream: true`: `event:` + `data:` lines, `response.created`,
//!   `response.in_progress`, `response.output_item.added`,
//!   `response.content_part.added`, one `response.output_text.delta` per
//!   word, `response.output_text.done`, `response.content_part.done`,
//!   `response.output_item.done`, `response.completed` (with usage), with
//!   `sequence_number`s from 0; no `[DONE]`. [`Behaviour::StreamNoDone`]
//!   cuts it before `response.completed`.

use super::*;

/// How long a background response stays in progress.
pub const BACKGROUND_DELAY: Duration = Duration::from_millis(300);

/// A response the mock stores.
#[derive(Clone, Debug)]
pub(super) struct Stored {
    pub deployment: String,
    /// The response as it is once completed.
    pub done: Value,
    pub input_items: Vec<Value>,
    /// Background responses: when they complete.
    pub ready_at: Option<Instant>,
    pub cancelled: bool,
}

impl Stored {
    /// The response as a read sees it now.
    fn view(&self) -> Value {
        let mut v = self.done.clone();
        if self.cancelled {
            v["status"] = json!("cancelled");
            v["output"] = json!([]);
            v["usage"] = Value::Null;
        } else if self.ready_at.is_some_and(|t| Instant::now() < t) {
            v["status"] = json!("in_progress");
            v["output"] = json!([]);
            v["usage"] = Value::Null;
        }
        v
    }
}

/// A Responses route: `None` when the path is not one.
pub(super) enum Route {
    Create {
        preview: bool,
    },
    ById {
        preview: bool,
        id: String,
        what: ById,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ById {
    Get,
    Delete,
    Cancel,
    InputItems,
}

pub(super) fn parse(method: &Method, path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.split('/').collect();
    let (preview, rest) = match segments.as_slice() {
        ["", "openai", "v1", "responses", rest @ ..] => (false, rest),
        ["", "openai", "responses", rest @ ..] => (true, rest),
        _ => return None,
    };
    let by_id = |id: &str, what| {
        Some(Route::ById {
            preview,
            id: id.to_string(),
            what,
        })
    };
    match (method.clone(), rest) {
        (Method::POST, []) => Some(Route::Create { preview }),
        (Method::GET, [id]) if !id.is_empty() => by_id(id, ById::Get),
        (Method::DELETE, [id]) if !id.is_empty() => by_id(id, ById::Delete),
        (Method::POST, [id, "cancel"]) if !id.is_empty() => by_id(id, ById::Cancel),
        (Method::GET, [id, "input_items"]) if !id.is_empty() => by_id(id, ById::InputItems),
        _ => None,
    }
}

fn hex_id(prefix: &str) -> String {
    let a: u128 = rand::random();
    let b: u64 = rand::random();
    format!("{prefix}{a:032x}{b:016x}")
}

/// Text of one input item's content.
fn item_text(item: &Value) -> String {
    item.get("content").map(content_text).unwrap_or_default()
}

fn input_texts(body: &Value) -> Vec<String> {
    match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().map(item_text).collect(),
        _ => Vec::new(),
    }
}

fn echoed(body: &Value) -> String {
    match body.get("input") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .rev()
            .find(|i| i.get("role").and_then(Value::as_str) == Some("user"))
            .map(item_text)
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// `(text, incomplete)`: the answer the mock gives a Responses body.
fn answer(body: &Value) -> (String, bool) {
    let echo = echoed(body);
    let echo = echo.trim();
    let full = if echo.is_empty() {
        GREETING.to_string()
    } else {
        format!("{GREETING} You said: {echo}")
    };
    match body.get("max_output_tokens").and_then(Value::as_u64) {
        Some(n) if n >= 1 && n < word_count(&full) => (
            full.split_whitespace()
                .take(n as usize)
                .collect::<Vec<_>>()
                .join(" "),
            true,
        ),
        _ => (full, false),
    }
}

/// The output text the mock answers a Responses body with.
pub fn expected_response_text(request_body: &Value) -> String {
    answer(request_body).0
}

/// `(input_tokens, output_tokens)` the mock reports for a Responses body.
pub fn expected_response_usage(request_body: &Value) -> (u64, u64) {
    let instructions = request_body
        .get("instructions")
        .and_then(Value::as_str)
        .map_or(0, |s| s.chars().count());
    let chars: usize = input_texts(request_body)
        .iter()
        .map(|t| t.chars().count())
        .sum();
    (
        tokens_for_chars(instructions + chars),
        word_count(&expected_response_text(request_body)),
    )
}

fn responses_usage(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output
    })
}

fn message(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn response_json(id: &str, model: &str, body: &Value, previous: Option<&str>) -> Value {
    let (text, incomplete) = answer(body);
    let (input, output) = expected_response_usage(body);
    json!({
        "id": id,
        "object": "response",
        "created_at": now_secs(),
        "status": if incomplete { "incomplete" } else { "completed" },
        "background": body.get("background").and_then(Value::as_bool).unwrap_or(false),
        "error": null,
        "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
        "max_output_tokens": body.get("max_output_tokens").cloned().unwrap_or(Value::Null),
        "model": model,
        "output": [message(&hex_id("msg_"), &text, "completed")],
        "parallel_tool_calls": true,
        "previous_response_id": previous,
        "reasoning": {"effort": null, "summary": null},
        "store": body.get("store").and_then(Value::as_bool).unwrap_or(true),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": body.get("tools").cloned().unwrap_or(json!([])),
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": responses_usage(input, output),
        "user": null,
        "metadata": {}
    })
}

fn input_items(body: &Value) -> Vec<Value> {
    let items = match body.get("input") {
        Some(Value::String(s)) => vec![json!({"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": s}]})],
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    items
        .into_iter()
        .map(|mut i| {
            if i.get("id").is_none() {
                i["id"] = json!(hex_id("msg_"));
            }
            if i.get("type").is_none() {
                i["type"] = json!("message");
            }
            i
        })
        .collect()
}

fn not_found(id: &str) -> Reply {
    json_reply(
        StatusCode::NOT_FOUND,
        json!({"error": {"message": format!("Response with id '{id}' not found."),
            "type": "invalid_request_error", "param": null, "code": null}})
        .to_string(),
    )
}

fn sse(kind: &str, seq: &mut u64, mut data: Value) -> Bytes {
    data["type"] = json!(kind);
    data["sequence_number"] = json!(*seq);
    *seq += 1;
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// The stream's events for `done`, the completed response.
fn stream_events(done: &Value, cut: bool) -> Vec<Bytes> {
    let mut seq = 0;
    let mut early = done.clone();
    early["status"] = json!("in_progress");
    early["output"] = json!([]);
    early["usage"] = Value::Null;
    let msg = &done["output"][0];
    let text = msg["content"][0]["text"].as_str().unwrap_or_default();
    let item_id = msg["id"].clone();
    let mut ev = vec![
        sse(
            "response.created",
            &mut seq,
            json!({"response": early.clone()}),
        ),
        sse("response.in_progress", &mut seq, json!({"response": early})),
        sse(
            "response.output_item.added",
            &mut seq,
            json!({"output_index": 0, "item": message(item_id.as_str().unwrap_or_default(), "", "in_progress")}),
        ),
        sse(
            "response.content_part.added",
            &mut seq,
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for piece in stream_pieces(text) {
        ev.push(sse(
            "response.output_text.delta",
            &mut seq,
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    ev.push(sse(
        "response.output_text.done",
        &mut seq,
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
    ));
    ev.push(sse(
        "response.content_part.done",
        &mut seq,
        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
            "part": msg["content"][0].clone()}),
    ));
    ev.push(sse(
        "response.output_item.done",
        &mut seq,
        json!({"output_index": 0, "item": msg.clone()}),
    ));
    if !cut {
        let kind = if done["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        ev.push(sse(kind, &mut seq, json!({"response": done.clone()})));
    }
    ev
}

/// `POST …/responses` once the common checks passed (auth, deployment,
/// behaviour): a new response.
pub(super) fn create(
    shared: &Shared,
    deployment: &str,
    model: &str,
    body: &Value,
    chunk_delay: Duration,
    cut: bool,
) -> Reply {
    match body.get("input") {
        Some(Value::String(_) | Value::Array(_)) => {}
        _ => {
            return invalid_request(
                "'input' is a required property and must be a string or an array",
            )
        }
    }
    let previous = body.get("previous_response_id").and_then(Value::as_str);
    if let Some(p) = previous {
        if !shared.tables().responses.contains_key(p) {
            return json_reply(
                StatusCode::BAD_REQUEST,
                json!({"error": {"message": format!("Previous response with id '{p}' not found."),
                    "type": "invalid_request_error", "param": "previous_response_id",
                    "code": "previous_response_not_found"}})
                .to_string(),
            );
        }
    }
    let id = hex_id("resp_");
    let done = response_json(&id, model, body, previous);
    let background = body.get("background").and_then(Value::as_bool) == Some(true);
    if body.get("store").and_then(Value::as_bool) != Some(false) {
        shared.tables().responses.insert(
            id.clone(),
            Stored {
                deployment: deployment.to_string(),
                done: done.clone(),
                input_items: input_items(body),
                ready_at: background.then(|| Instant::now() + BACKGROUND_DELAY),
                cancelled: false,
            },
        );
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return sse_reply(
            stream_events(&done, cut),
            false,
            chunk_delay,
            Duration::ZERO,
        );
    }
    if background {
        let mut queued = done;
        queued["status"] = json!("queued");
        queued["output"] = json!([]);
        queued["usage"] = Value::Null;
        return json_reply(StatusCode::OK, queued.to_string());
    }
    json_reply(StatusCode::OK, done.to_string())
}

/// A call about a stored response.
pub(super) fn by_id(
    shared: &Shared,
    recorded: &RecordedRequest,
    preview: bool,
    id: &str,
    what: ById,
) -> Reply {
    if preview && !has_api_version(&recorded.query) {
        return json_reply(StatusCode::NOT_FOUND, RESOURCE_NOT_FOUND_BODY);
    }
    let mut t = shared.tables();
    let (key, bearers) = (t.api_key.clone(), t.bearer_tokens.clone());
    if !authorized(recorded, &key, &bearers) {
        return json_reply(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY);
    }
    let Some(stored) = t.responses.get(id).cloned() else {
        return not_found(id);
    };
    *t.counts.entry(stored.deployment.clone()).or_insert(0) += 1;
    t.last.insert(stored.deployment.clone(), recorded.clone());
    let mut reply = match what {
        ById::Get => json_reply(StatusCode::OK, stored.view().to_string()),
        ById::Delete => {
            t.responses.remove(id);
            json_reply(
                StatusCode::OK,
                json!({"id": id, "object": "response.deleted", "deleted": true}).to_string(),
            )
        }
        ById::Cancel => {
            if stored.ready_at.is_none() {
                return invalid_request(
                    "Only responses created with background=true can be cancelled.",
                );
            }
            let in_progress = stored.view()["status"] == "in_progress";
            if let (true, Some(s)) = (in_progress, t.responses.get_mut(id)) {
                s.cancelled = true;
            }
            let view = t.responses.get(id).map(Stored::view).unwrap_or_default();
            json_reply(StatusCode::OK, view.to_string())
        }
        ById::InputItems => {
            let data = stored.input_items.clone();
            let first = data.first().and_then(|i| i.get("id")).cloned();
            let last = data.last().and_then(|i| i.get("id")).cloned();
            json_reply(
                StatusCode::OK,
                json!({"object": "list", "data": data, "first_id": first, "last_id": last,
                    "has_more": false})
                .to_string(),
            )
        }
    };
    set_header(&mut reply, "x-ms-deployment-name", &stored.deployment);
    reply
}
