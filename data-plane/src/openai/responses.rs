//! The Responses API's wire format (OpenAI's `POST /responses`, which Azure
//! serves at `/openai/v1/responses` and `/openai/responses?api-version=`):
//! the request fields the gateway checks or rewrites, and the response
//! objects and stream events it reads (usage, text) or rewrites (ids,
//! `model`). As elsewhere, only those fields are typed; everything else
//! stays raw (`raw`) and goes on verbatim.
//!
//! Request: `{"model", "input": "text" | [items], "instructions"?,
//! "tools"?, "max_output_tokens"?, "previous_response_id"?, "store"?,
//! "background"?, "stream"?}`. Answer: `{"id": "resp_…", "object":
//! "response", "status", "model", "output": [...], "usage": {"input_tokens",
//! "output_tokens", "total_tokens"}}`. Stream: `event: <type>` +
//! `data: {"type", "sequence_number", …}`; `response.created`,
//! `response.in_progress`, `response.completed` (and the other terminal
//! events) carry the response object, `response.output_text.delta` a
//! `delta`; no `[DONE]`.

use super::field::{string, Invalid, MAX_COMPLETION_TOKENS_LIMIT};
use super::raw::{self, Field, RawObject};
use serde::Deserialize;
use std::borrow::Cow;

pub const INPUT: &str = "input";
pub const INSTRUCTIONS: &str = "instructions";
pub const TOOLS: &str = "tools";
pub const MAX_OUTPUT_TOKENS: &str = "max_output_tokens";
pub const PREVIOUS_RESPONSE_ID: &str = "previous_response_id";
pub const BACKGROUND: &str = "background";
pub const STORE: &str = "store";
pub const MODEL: &str = "model";
pub const ID: &str = "id";
pub const USAGE: &str = "usage";
pub const OUTPUT: &str = "output";
/// A stream event's name, and the field of the response object it carries.
pub const TYPE: &str = "type";
pub const RESPONSE: &str = "response";
pub const DELTA: &str = "delta";
/// The error code of a `previous_response_id` the resource does not have.
pub const PREVIOUS_NOT_FOUND: &str = "previous_response_not_found";

/// Stream events after which nothing more comes: the response is done
/// (its usage in `response.usage`) or failed.
pub const TERMINAL_EVENTS: [&str; 4] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
    "error",
];

/// What the gateway needs from a Responses request beyond the common fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFields {
    /// The caller's (sealed) `previous_response_id`.
    pub previous_response_id: Option<String>,
    /// `max_output_tokens`, at most [`MAX_COMPLETION_TOKENS_LIMIT`].
    pub max_output_tokens: Option<u64>,
    /// Characters of `instructions`, counted with the input's.
    pub instructions_chars: usize,
}

fn invalid(message: impl Into<String>, param: &'static str, code: &'static str) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param),
        code: Some(code),
    }
}

/// Checks a Responses request's own fields (`input` is required and present:
/// `request::read_fields` saw to it).
pub fn read(body: &RawObject<'_>) -> Result<RequestFields, Invalid> {
    let present = |k: &str| body.raw(k).filter(|v| *v != "null");
    if let Some(input) = present(INPUT) {
        if !(input.starts_with('"') || input.starts_with('[')) {
            return Err(invalid(
                "`input` must be a string or an array of input items",
                INPUT,
                "invalid_type",
            ));
        }
    }
    let instructions = match present(INSTRUCTIONS) {
        None => 0,
        Some(v) => string(v)
            .ok_or_else(|| {
                invalid(
                    "`instructions` must be a string",
                    INSTRUCTIONS,
                    "invalid_type",
                )
            })?
            .chars()
            .count(),
    };
    if present(TOOLS).is_some_and(|t| !t.starts_with('[')) {
        return Err(invalid("`tools` must be an array", TOOLS, "invalid_type"));
    }
    for flag in [BACKGROUND, STORE] {
        if present(flag).is_some_and(|v| v != "true" && v != "false") {
            return Err(invalid(
                format!("`{flag}` must be a boolean"),
                flag,
                "invalid_type",
            ));
        }
    }
    let previous_response_id = match present(PREVIOUS_RESPONSE_ID) {
        None => None,
        Some(v) => match string(v) {
            Some(id) if !id.is_empty() => Some(id.into_owned()),
            _ => {
                return Err(invalid(
                    "`previous_response_id` must be a non-empty string",
                    PREVIOUS_RESPONSE_ID,
                    "invalid_type",
                ))
            }
        },
    };
    let max_output_tokens = match present(MAX_OUTPUT_TOKENS) {
        None => None,
        Some(v) => match serde_json::from_str::<u64>(v) {
            Ok(n) if (1..=MAX_COMPLETION_TOKENS_LIMIT).contains(&n) => Some(n),
            _ => {
                return Err(invalid(
                    format!(
                        "`{MAX_OUTPUT_TOKENS}` must be an integer from 1 to {MAX_COMPLETION_TOKENS_LIMIT}"
                    ),
                    MAX_OUTPUT_TOKENS,
                    "invalid_value",
                ))
            }
        },
    };
    Ok(RequestFields {
        previous_response_id,
        max_output_tokens,
        instructions_chars: instructions,
    })
}

/// The request for one upstream attempt: `model` is the target's
/// deployment (Azure's v1 and preview forms take it in the body) and
/// `previous_response_id` Azure's own id.
pub fn upstream_body(
    body: &mut RawObject<'_>,
    deployment: &str,
    previous_upstream_id: Option<&str>,
) {
    body.set(MODEL, Field::Str(Cow::Owned(deployment.to_string())));
    if let Some(id) = previous_upstream_id {
        body.set(PREVIOUS_RESPONSE_ID, Field::Str(Cow::Owned(id.to_string())));
    }
}

/// Token counts of a response's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
}

impl Usage {
    /// (prompt, completion), as the usage record counts them.
    pub fn tokens(self) -> (u64, u64) {
        (self.input_tokens, self.output_tokens)
    }
}

/// A response object (an answer, or the `response` of a stream event).
#[derive(Debug)]
pub struct ResponseObject<'a> {
    obj: RawObject<'a>,
}

impl<'a> ResponseObject<'a> {
    pub fn parse(json: &'a [u8]) -> Result<Self, raw::Invalid> {
        RawObject::parse(json).map(|obj| Self { obj })
    }

    pub fn parse_text(text: &'a str) -> Result<Self, raw::Invalid> {
        RawObject::parse_text(text, usize::MAX).map(|obj| Self { obj })
    }

    /// `model` as Azure answered; empty counts as absent.
    pub fn model(&self) -> Option<Cow<'a, str>> {
        self.obj.str_field(MODEL).filter(|m| !m.is_empty())
    }

    /// Reported usage; `null` (queued, in progress) or absent: `None`.
    pub fn usage(&self) -> Option<Usage> {
        self.obj.parse_field(USAGE)
    }

    /// The text of every `output_text` part of every output message
    /// (payload logging).
    pub fn output_text(&self) -> String {
        let mut out = String::new();
        for item in raw::items(self.obj.raw(OUTPUT).unwrap_or_default()) {
            for part in raw::items(raw::lookup(item, "content").unwrap_or_default()) {
                let kind = raw::lookup(part, TYPE).and_then(string);
                if kind.as_deref() == Some("output_text") {
                    if let Some(t) = raw::lookup(part, "text").and_then(string) {
                        out.push_str(&t);
                    }
                }
            }
        }
        out
    }

    /// The caller's view: `id` and `previous_response_id` through `seal`,
    /// and `model` set to `alias` when given (only where present: a
    /// deletion's answer has none).
    pub fn rewrite(&mut self, seal: &impl Fn(&str) -> String, alias: Option<&str>) {
        for key in [ID, PREVIOUS_RESPONSE_ID] {
            if let Some(id) = self.obj.str_field(key) {
                let sealed = seal(&id);
                self.obj.set(key, Field::Str(Cow::Owned(sealed)));
            }
        }
        if let (Some(alias), Some(_)) = (alias, self.obj.get(MODEL)) {
            self.obj
                .set(MODEL, Field::Str(Cow::Owned(alias.to_string())));
        }
    }

    pub fn to_json(&self) -> String {
        self.obj.to_json()
    }
}

/// One stream event's data.
#[derive(Debug)]
pub struct Event<'a> {
    obj: RawObject<'a>,
}

impl<'a> Event<'a> {
    pub fn parse(json: &'a [u8]) -> Result<Self, raw::Invalid> {
        RawObject::parse(json).map(|obj| Self { obj })
    }

    /// The event's name (`type`).
    pub fn kind(&self) -> Option<Cow<'a, str>> {
        self.obj.str_field(TYPE)
    }

    /// Text generated by this event (`response.output_text.delta`).
    pub fn text_delta(&self) -> Option<Cow<'a, str>> {
        match self.kind().as_deref() {
            Some("response.output_text.delta") => self.obj.str_field(DELTA),
            _ => None,
        }
    }

    /// The response object the event carries, if any.
    pub fn response(&self) -> Option<ResponseObject<'a>> {
        let text = self.obj.raw(RESPONSE)?;
        text.starts_with('{')
            .then(|| ResponseObject::parse_text(text).ok())
            .flatten()
    }

    /// Replaces the carried response object (rewritten).
    pub fn set_response(&mut self, response: &ResponseObject<'_>) {
        self.obj.set(RESPONSE, Field::Json(response.to_json()));
    }

    pub fn to_json(&self) -> String {
        self.obj.to_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::parse;

    #[test]
    fn request_fields_and_their_errors() {
        let o = parse(br#"{"model":"m","input":"hi","instructions":"Be brief.","max_output_tokens":50,"previous_response_id":"resp_x","store":true,"background":false}"#).unwrap();
        assert_eq!(
            read(&o).unwrap(),
            RequestFields {
                previous_response_id: Some("resp_x".into()),
                max_output_tokens: Some(50),
                instructions_chars: 9,
            }
        );
        for (body, param) in [
            (r#"{"input":3}"#, INPUT),
            (r#"{"input":{}}"#, INPUT),
            (r#"{"input":"x","instructions":[1]}"#, INSTRUCTIONS),
            (r#"{"input":"x","tools":{}}"#, TOOLS),
            (r#"{"input":"x","background":"yes"}"#, BACKGROUND),
            (r#"{"input":"x","store":1}"#, STORE),
            (
                r#"{"input":"x","previous_response_id":""}"#,
                PREVIOUS_RESPONSE_ID,
            ),
            (
                r#"{"input":"x","previous_response_id":7}"#,
                PREVIOUS_RESPONSE_ID,
            ),
            (r#"{"input":"x","max_output_tokens":0}"#, MAX_OUTPUT_TOKENS),
            (
                r#"{"input":"x","max_output_tokens":1e9}"#,
                MAX_OUTPUT_TOKENS,
            ),
        ] {
            let o = parse(body.as_bytes()).unwrap();
            assert_eq!(read(&o).unwrap_err().param, Some(param), "{body}");
        }
    }

    #[test]
    fn the_upstream_body_names_the_deployment_and_azures_id() {
        let mut o = parse(br#"{"model":"alias","input":"x","previous_response_id":"resp_sealed"}"#)
            .unwrap();
        upstream_body(&mut o, "dep-1", Some("resp_azure"));
        assert_eq!(
            o.to_json(),
            r#"{"model":"dep-1","input":"x","previous_response_id":"resp_azure"}"#
        );
    }

    #[test]
    fn responses_are_read_and_rewritten() {
        let body = br#"{"id":"resp_up","object":"response","status":"completed","model":"gpt-4o-2024","previous_response_id":"resp_prev","output":[{"type":"message","id":"msg_1","role":"assistant","content":[{"type":"output_text","text":"Hi","annotations":[]},{"type":"refusal","refusal":"no"}]}],"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":2,"total_tokens":7}}"#;
        let mut r = ResponseObject::parse(body).unwrap();
        assert_eq!(r.usage().map(Usage::tokens), Some((5, 2)));
        assert_eq!(r.model().as_deref(), Some("gpt-4o-2024"));
        assert_eq!(r.output_text(), "Hi");
        r.rewrite(&|id| format!("sealed:{id}"), Some("alias"));
        let out: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(out["id"], "sealed:resp_up");
        assert_eq!(out["previous_response_id"], "sealed:resp_prev");
        assert_eq!(out["model"], "alias");
        assert_eq!(out["output"][0]["id"], "msg_1", "item ids are Azure's");
        let mut deleted = ResponseObject::parse(
            br#"{"id":"resp_up","object":"response.deleted","deleted":true}"#,
        )
        .unwrap();
        deleted.rewrite(&|id| format!("s:{id}"), Some("alias"));
        assert_eq!(
            deleted.to_json(),
            r#"{"id":"s:resp_up","object":"response.deleted","deleted":true}"#
        );
        let queued =
            ResponseObject::parse(br#"{"id":"r","status":"queued","usage":null}"#).unwrap();
        assert_eq!(queued.usage(), None);
    }

    #[test]
    fn stream_events_carry_the_response_and_deltas() {
        let ev = Event::parse(br#"{"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hel"}"#).unwrap();
        assert_eq!(ev.text_delta().as_deref(), Some("Hel"));
        assert!(ev.response().is_none());
        let mut ev = Event::parse(br#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_up","model":"m","usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}}"#).unwrap();
        assert!(TERMINAL_EVENTS.contains(&ev.kind().unwrap().as_ref()));
        let mut r = ev.response().unwrap();
        assert_eq!(r.usage().map(Usage::tokens), Some((3, 4)));
        r.rewrite(&|_| "resp_sealed".into(), None);
        ev.set_response(&r);
        assert_eq!(
            ev.to_json(),
            r#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_sealed","model":"m","usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}}"#
        );
    }
}
