//! An EnOS answer: [status high, status low, body…] through the client's own readers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enroll_ca::fuzz::enos_answer(data);
});
