//! EST certs-only answers: base64 (RFC 8951) then PKCS#7, as `est::certs_of` reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enroll_ca::fuzz::est_answer(data);
});
