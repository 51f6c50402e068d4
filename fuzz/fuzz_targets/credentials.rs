//! Client credentials: `Authorization` headers, htpasswd and tokens files, access patterns.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::access::fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::check(data);
});
