//! The SSE adapter on any upstream bytes, framed anyhow: it never panics,
//! always ends the caller's stream with exactly one `data: [DONE]`, and
//! never sends more than it was given plus its bounded error event.
#![no_main]

use aigw_data_plane::proxy::fuzz::adapt_sse;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the framing and whether usage is forwarded.
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(ctl >> 1).max(1);
    let frames: Vec<Bytes> = rest
        .chunks(step)
        .map(Bytes::copy_from_slice)
        .collect();
    let out = adapt_sse(frames, ctl & 1 == 1);
    let done = b"data: [DONE]\n\n";
    assert!(out.ends_with(done), "no final [DONE]");
    let count = out.windows(done.len()).filter(|w| w == done).count();
    assert_eq!(count, 1, "[DONE] sent {count} times");
});
