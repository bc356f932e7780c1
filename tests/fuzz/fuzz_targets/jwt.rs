//! Bearer tokens and JWKS documents, as anyone on the network can send the
//! one and a JWKS endpoint (or anything on its path) the other: never a
//! panic, and never a token accepted that nobody signed.
#![no_main]

use aigw_data_plane::jwt::fuzz::{jwks_keys, Verifier};
use aigw_data_plane::jwt::looks_like_jwt;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

/// RFC 7517 appendix A.1's public keys: one EC P-256, one RSA.
static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let jwks = serde_json::json!({"keys": [
        {"kty": "EC", "crv": "P-256", "use": "sig", "kid": "1",
         "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
         "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"},
        {"kty": "RSA", "alg": "RS256", "kid": "2011-04-29",
         "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
         "e": "AQAB"}
    ]});
    Verifier::new(&jwks).unwrap_or_else(|e| panic!("fuzz verifier: {e}"))
});

fn check(token: &str) {
    let _ = looks_like_jwt(token);
    if let Ok(id) = VERIFIER.verify(token) {
        panic!("a token nobody signed was accepted as {}: {token}", id.caller_id);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        // The bearer as sent.
        0 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                check(token);
            }
        }
        // Header, claims and signature split at 0xff and encoded here, so
        // the fuzzer's JSON reaches the parsers and the signature check.
        1 => {
            let mut parts = rest.splitn(3, |b| *b == 0xff);
            let mut seg = || URL_SAFE_NO_PAD.encode(parts.next().unwrap_or_default());
            let token = format!("{}.{}.{}", seg(), seg(), seg());
            check(&token);
        }
        // A JWKS document.
        _ => {
            let _ = jwks_keys(rest);
        }
    }
});
