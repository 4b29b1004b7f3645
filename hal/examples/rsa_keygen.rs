//! One RSA-2048 file-key generation, as the agent makes it (for tests/bench/keygen.sh, which times
//! this process against `openssl genrsa 2048`). Prints the PKCS#8 size so the work cannot be skipped.
fn main() {
    use rsa::pkcs8::EncodePrivateKey;
    let key = enroll_hal::rsa_keygen::generate(&mut rand_core::OsRng).expect("RSA-2048 generation");
    println!("{} bytes of PKCS#8", key.to_pkcs8_der().expect("PKCS#8").as_bytes().len());
}
