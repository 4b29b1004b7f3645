//! The JSON reader (config, state.json, every CA answer). Property: what it reads, it writes
//! back in a form it reads to the same value (compact and pretty).
#![no_main]

use enroll_ca::json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = json::parse(data) else {
        return;
    };
    let compact = value.to_json();
    assert_eq!(json::parse(compact.as_bytes()).as_ref(), Ok(&value), "compact: {compact}");
    let pretty = value.to_json_pretty();
    assert_eq!(json::parse(pretty.as_bytes()).as_ref(), Ok(&value), "pretty: {pretty}");
});
