//! Configuration files: errors, never panics; an accepted configuration renders to TOML that
//! is accepted again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        let rendered = config.to_redacted_toml();
        if !rendered.contains("<redacted>") {
            Config::parse(&rendered).expect("a rendered configuration parses again");
        }
    }
});
