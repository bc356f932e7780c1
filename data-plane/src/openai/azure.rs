//! What Azure OpenAI adds to the OpenAI shapes, and the gateway removes:
//! content-filter annotations on answers and chunks, and the chunks that
//! carry nothing but those annotations.

use super::raw::RawObject;
use super::types::Answer;

/// Top-level annotations of an answer or chunk.
const ANSWER_FIELDS: [&str; 2] = ["prompt_filter_results", "prompt_annotations"];
/// Per-choice annotations.
const CHOICE_FIELDS: [&str; 2] = ["content_filter_results", "content_filter_offsets"];

/// Removes Azure's content-filter annotations from an answer or chunk.
pub fn strip_fields(answer: &mut Answer<'_>) {
    strip_object(answer.object_mut());
}

fn strip_object(obj: &mut RawObject<'_>) {
    for f in ANSWER_FIELDS {
        obj.remove(f);
    }
    let annotated = obj.get(super::types::CHOICES).is_some_and(|c| {
        c.raw()
            .is_none_or(|r| CHOICE_FIELDS.iter().any(|f| r.contains(f)))
    });
    if !annotated {
        // Nothing to strip: the choices go on as they came, unparsed.
        return;
    }
    if let Some(choices) = obj.objects_mut(super::types::CHOICES) {
        for c in choices {
            for f in CHOICE_FIELDS {
                c.remove(f);
            }
        }
    }
}

/// What a stream chunk from Azure is, for the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Content for the caller.
    Content,
    /// The usage chunk (no choices) Azure sends because the gateway asked.
    Usage,
    /// The prompt-filter chunk (no choices, no usage): never forwarded.
    PromptFilter,
    /// An annotation-only chunk (asynchronous content filter, empty `id`).
    Annotation,
}

pub fn chunk_kind(chunk: &Answer<'_>) -> ChunkKind {
    if chunk.no_choices() {
        if chunk.has_usage() {
            ChunkKind::Usage
        } else {
            ChunkKind::PromptFilter
        }
    } else if chunk.id().is_some_and(|id| id.is_empty()) {
        ChunkKind::Annotation
    } else {
        ChunkKind::Content
    }
}

/// An Azure (or OpenAI) error answer: `{"error": {"message", "code", ...}}`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct ErrorDetail {
    #[serde(default, deserialize_with = "string_or_none")]
    pub message: Option<String>,
    /// A string code (`content_filter`, `DeploymentNotFound`); other
    /// shapes (Azure sometimes sends numbers) are ignored.
    #[serde(default, deserialize_with = "string_or_none")]
    pub code: Option<String>,
    #[serde(default)]
    innererror: Option<serde_json::Value>,
}

impl ErrorDetail {
    /// Azure's content-filter verdict on a blocked prompt (`null` if none).
    pub fn content_filter_result(&self) -> serde_json::Value {
        self.innererror
            .as_ref()
            .and_then(|i| i.get("content_filter_result"))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

fn string_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::Deserialize;
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

impl ErrorBody {
    /// The error of an answer body; anything unparseable: no detail.
    pub fn parse(body: &[u8]) -> ErrorDetail {
        serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .and_then(|b| b.error)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripped(json: &[u8]) -> String {
        let mut a = Answer::parse(json).unwrap();
        strip_fields(&mut a);
        let mut out = Vec::new();
        a.write_to(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn filter_fields_are_stripped_everything_else_kept() {
        let out = stripped(
            br#"{"id":"x","prompt_filter_results":[{}],"choices":[{"index":0,"content_filter_results":{"hate":{}},"content_filter_offsets":{},"message":{"content":"hi"}}],"extra":{"a":1}}"#,
        );
        assert_eq!(
            out,
            r#"{"id":"x","choices":[{"index":0,"message":{"content":"hi"}}],"extra":{"a":1}}"#
        );
    }

    #[test]
    fn chunks_are_classified() {
        let kind = |j: &[u8]| chunk_kind(&Answer::parse(j).unwrap());
        assert_eq!(
            kind(br#"{"choices":[],"id":"","prompt_filter_results":[]}"#),
            ChunkKind::PromptFilter
        );
        assert_eq!(
            kind(br#"{"choices":[],"id":"c","usage":{"prompt_tokens":1}}"#),
            ChunkKind::Usage
        );
        assert_eq!(
            kind(br#"{"choices":[{"index":0}],"id":""}"#),
            ChunkKind::Annotation
        );
        assert_eq!(
            kind(br#"{"choices":[{"index":0}],"id":"c","usage":null}"#),
            ChunkKind::Content
        );
    }
}
