//! The request reader on any body: a checked request or a 4xx error, never
//! a panic; what it sends upstream is always a JSON object.
#![no_main]

use aigw_data_plane::openai::Operation;
use aigw_data_plane::proxy::fuzz::check_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let op = match ctl % 3 {
        0 => Operation::ChatCompletions,
        1 => Operation::Completions,
        _ => Operation::Embeddings,
    };
    if let Ok(r) = check_request(op, body) {
        let v: serde_json::Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("the upstream body is not JSON: {e}"));
        assert!(v.is_object());
        assert!(r.fields.max_tokens.is_none_or(|m| m <= 1 << 20));
    }
});
