//! HTTP/1.1 responses (head, Content-Length, chunked and close-delimited bodies) and URLs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enroll_ca::fuzz::http_response(data);
});
