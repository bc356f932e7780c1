//! The OpenAI answer shapes the gateway reads or rewrites: a completion,
//! a chat completion, an embeddings list, or one chunk of a stream. Only the
//! fields the gateway needs are typed; everything else stays raw (see
//! `raw`), so nothing the upstream sends is lost or reordered.

use super::raw::{Field, RawObject};
use serde::Deserialize;
use std::borrow::Cow;

/// Top-level fields of an answer or chunk.
pub const MODEL: &str = "model";
pub const ID: &str = "id";
pub const CHOICES: &str = "choices";
pub const USAGE: &str = "usage";

/// Token counts from an OpenAI `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

impl Usage {
    /// (prompt, completion) tokens; embeddings have no completion.
    pub fn tokens(self) -> (u64, u64) {
        (self.prompt_tokens, self.completion_tokens.unwrap_or(0))
    }
}

/// What a choice says, in any of its shapes: `message.content` (chat),
/// `delta.content` (a chat chunk) or `text` (completions).
#[derive(Debug, Default, Deserialize)]
pub struct ChoiceText<'a> {
    #[serde(borrow, default)]
    message: Option<Content<'a>>,
    #[serde(borrow, default)]
    delta: Option<Content<'a>>,
    #[serde(borrow, default)]
    text: Option<Text<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct Content<'a> {
    #[serde(borrow, default)]
    content: Option<Text<'a>>,
}

/// A string, or anything else (which says no text).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Text<'a> {
    Str(#[serde(borrow)] Cow<'a, str>),
    Other(serde::de::IgnoredAny),
}

impl Text<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Text::Str(s) => Some(s),
            Text::Other(_) => None,
        }
    }
}

fn content<'s>(c: &'s Option<Content<'_>>) -> Option<&'s str> {
    c.as_ref()
        .and_then(|c| c.content.as_ref())
        .and_then(Text::as_str)
}

impl<'a> ChoiceText<'a> {
    pub fn of(choice: &RawObject<'a>) -> Self {
        let part = |k: &str| choice.parse_field::<Content<'a>>(k);
        Self {
            message: part("message"),
            delta: part("delta"),
            text: choice.parse_field("text"),
        }
    }

    /// The choice's text, the first shape present.
    pub fn text(&self) -> Option<&str> {
        content(&self.message)
            .or_else(|| content(&self.delta))
            .or_else(|| self.text.as_ref().and_then(Text::as_str))
    }

    /// Characters of generated text in a stream chunk's choice (`delta`
    /// content, or `text`), for estimating tokens Azure did not report.
    pub fn streamed_chars(&self) -> usize {
        let delta = self
            .delta
            .as_ref()
            .and_then(|d| d.content.as_ref())
            .and_then(Text::as_str);
        delta
            .or_else(|| self.text.as_ref().and_then(Text::as_str))
            .map_or(0, |s| s.chars().count())
    }
}

/// An answer or a stream chunk, as read from Azure.
#[derive(Debug)]
pub struct Answer<'a> {
    obj: RawObject<'a>,
}

impl<'a> Answer<'a> {
    /// Parses an answer; it must be a JSON object.
    pub fn parse(json: &'a [u8]) -> Result<Self, super::raw::Invalid> {
        RawObject::parse(json).map(|obj| Self { obj })
    }

    /// `model` as Azure answered (the deployment's model version); empty
    /// counts as absent.
    pub fn model(&self) -> Option<Cow<'a, str>> {
        self.obj.str_field(MODEL).filter(|m| !m.is_empty())
    }

    pub fn id(&self) -> Option<Cow<'a, str>> {
        self.obj.str_field(ID)
    }

    /// Reported usage; `null` or absent: `None`.
    pub fn usage(&self) -> Option<Usage> {
        self.obj.parse_field(USAGE)
    }

    /// Whether there is a `usage` field that is not `null`.
    pub fn has_usage(&self) -> bool {
        self.obj.get(USAGE).is_some_and(|u| !u.is_null())
    }

    /// The choices, parsed (an answer's `choices` is read once per call).
    pub fn choices(&self) -> Vec<RawObject<'a>> {
        self.obj.objects(CHOICES)
    }

    /// The choices, parsed once for reading and rewriting.
    pub fn choices_mut(&mut self) -> Option<&mut Vec<RawObject<'a>>> {
        self.obj.objects_mut(CHOICES)
    }

    /// Whether `choices` is absent or an empty array.
    pub fn no_choices(&self) -> bool {
        match self.obj.get(CHOICES) {
            None => true,
            Some(Field::Raw(r)) => {
                let s = r.trim();
                s == "null" || (s.starts_with('[') && s[1..].trim_start().starts_with(']'))
            }
            Some(Field::Objects(v)) => v.is_empty(),
            Some(Field::Str(_) | Field::Json(_)) => false,
        }
    }

    /// The text of every choice, joined by newlines (payload logging).
    pub fn completion_text(&self) -> String {
        self.choices()
            .iter()
            .filter_map(|c| ChoiceText::of(c).text().map(str::to_owned))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The raw object, for rewriting.
    pub fn object_mut(&mut self) -> &mut RawObject<'a> {
        &mut self.obj
    }

    /// `model` becomes the alias the caller used.
    pub fn set_model(&mut self, alias: &'a str) {
        self.obj.set(MODEL, Field::Str(Cow::Borrowed(alias)));
    }

    pub fn remove_usage(&mut self) {
        self.obj.remove(USAGE);
    }

    pub fn write_to(&self, out: impl std::io::Write) -> Result<(), serde_json::Error> {
        self.obj.write_to(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_usage_and_text() {
        let body = br#"{"id":"c1","model":"gpt-4o-2024","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"}},{"index":1,"text":"yo"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        let a = Answer::parse(body).unwrap();
        assert_eq!(a.model().as_deref(), Some("gpt-4o-2024"));
        assert_eq!(a.usage().map(Usage::tokens), Some((3, 2)));
        assert_eq!(a.completion_text(), "Hi\nyo");
        assert!(!a.no_choices());
        let e = Answer::parse(br#"{"choices":[ ],"usage":null,"model":""}"#).unwrap();
        assert!(e.no_choices() && !e.has_usage() && e.model().is_none());
        let emb = Answer::parse(br#"{"usage":{"prompt_tokens":5,"total_tokens":5}}"#).unwrap();
        assert_eq!(emb.usage().map(Usage::tokens), Some((5, 0)));
    }

    #[test]
    fn streamed_chars_count_delta_or_text() {
        let c = RawObject::parse(br#"{"delta":{"content":"h\u00e9llo"}}"#).unwrap();
        assert_eq!(ChoiceText::of(&c).streamed_chars(), 5);
        let c = RawObject::parse(br#"{"text":"abc","index":0}"#).unwrap();
        assert_eq!(ChoiceText::of(&c).streamed_chars(), 3);
        let c = RawObject::parse(br#"{"delta":{"tool_calls":[]}}"#).unwrap();
        assert_eq!(ChoiceText::of(&c).streamed_chars(), 0);
    }
}
