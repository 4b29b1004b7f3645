//! ACME answers: problem documents, directory, order and authorization objects, PEM chains.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enroll_ca::fuzz::acme_answer(data);
});
