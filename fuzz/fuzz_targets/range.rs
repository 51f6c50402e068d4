//! Client `Range` headers: a partial answer always lies inside the blob.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::range::{plan, Plan};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap()) >> (data[0] % 64);
    let Ok(header) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    match plan(Some(header), size) {
        Plan::Partial { start, end } => {
            assert!(
                start < end && end <= size,
                "{header:?} size {size}: {start}..{end}"
            );
        }
        Plan::Whole | Plan::Unsatisfiable => {}
    }
});
