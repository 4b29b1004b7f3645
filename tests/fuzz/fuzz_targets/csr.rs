//! The gateway's reading of a device's CSR (DER): signature, key algorithm, subject, SANs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(received) = enroll_ca::csr::Received::from_der(data) {
        let request = received.request();
        let _ = (request.subject.rfc4514(), request.sans.is_empty(), request.csr.pem.len());
    }
});
