//! Signing latency of the file provider, printed for tests/bench/providers.sh to compare with
//! the hardware providers' figures (a measurement, not an assertion on time).

use std::time::Instant;

use enroll_hal::soft::FileKeyProvider;
use enroll_hal::{Algorithm, KeyProvider, SignatureScheme};

#[test]
fn file_sign_latency() {
    let dir = std::env::temp_dir().join(format!("enroll-soft-latency-{}", std::process::id()));
    for (algorithm, schemes) in [
        (Algorithm::P256, &[SignatureScheme::EcdsaP256Sha256][..]),
        (Algorithm::Rsa2048, &[SignatureScheme::RsaPkcs1Sha256, SignatureScheme::RsaPssSha256][..]),
    ] {
        let slot = dir.join(algorithm.name());
        std::fs::create_dir_all(&slot).unwrap();
        let key = FileKeyProvider::default().generate(algorithm, &slot).unwrap();
        for &scheme in schemes {
            let start = Instant::now();
            for i in 0..100u32 {
                let signature = key.sign(scheme, &i.to_be_bytes()).unwrap();
                assert!(!signature.is_empty());
            }
            eprintln!(
                "file: {scheme:?} sign latency {:?} per signature (100 signatures)",
                start.elapsed() / 100
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
