//! What every request check shares: the error a bad field makes, the
//! bound on output tokens, and reading a JSON string.

use std::borrow::Cow;

/// A request body that breaks the API: the OpenAI error's message, `param`
/// and `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

/// Largest `max_tokens` / `max_completion_tokens` accepted: above every
/// deployment's output limit (the largest today is 128k), so a bigger value
/// can only be a mistake or an attempt to overflow the token estimate; it is
/// refused with a 400 rather than clamped, as Azure would refuse it. The
/// Responses API's `max_output_tokens` has the same bound.
pub const MAX_COMPLETION_TOKENS_LIMIT: u64 = 1 << 20;

/// A JSON string's value; `None` if `raw` is not a string.
pub fn string(raw: &str) -> Option<Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct S<'a>(#[serde(borrow)] Cow<'a, str>);
    serde_json::from_str::<S<'_>>(raw).ok().map(|s| s.0)
}
