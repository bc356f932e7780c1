//! The request reader on any body: a checked request or a 4xx error, never
//! a panic. What it sends upstream reads back as a request, and is valid
//! JSON for serde_json whenever the caller's body was (the raw reader also
//! takes what serde_json refuses but JSON allows, e.g. lone surrogates).
#![no_main]

use aigw_data_plane::openai::{request, Operation};
use aigw_data_plane::proxy::fuzz::check_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let op = match ctl % 4 {
        0 => Operation::ChatCompletions,
        1 => Operation::Completions,
        2 => Operation::Embeddings,
        _ => Operation::Responses,
    };
    let Ok(r) = check_request(op, body) else {
        return;
    };
    let again = request::parse(&r.body).expect("the upstream body reads back");
    let fields = request::read_fields(op, &again, None).expect("and checks again");
    assert_eq!(fields.alias, r.fields.alias);
    assert!(r.fields.max_tokens.is_none_or(|m| m <= request::MAX_COMPLETION_TOKENS_LIMIT));
    if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).expect("the upstream body is JSON");
        assert!(v.is_object());
        // Responses streams end with their usage unasked.
        if r.fields.stream && op != Operation::Responses {
            assert_eq!(v["stream_options"]["include_usage"], true);
        }
    }
});
