//! Retry-After and Date header values, RFC 3339 times in answers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enroll_ca::fuzz::header_values(data);
});
