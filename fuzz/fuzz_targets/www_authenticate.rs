//! Upstream `WWW-Authenticate` challenges and token responses: hostile upstream input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::upstream::auth::{parse_challenge, parse_token, Challenge};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(text) {
            assert!(!realm.is_empty());
        }
    }
    if let Ok(token) = parse_token(data) {
        assert!(!token.value.is_empty());
    }
});
