//! SCEP answers: GetCACaps, GetCACert (pinned), CertRep CMS and attributes, the EnvelopedData.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enroll_ca::fuzz::scep_answer(data);
});
