//! The `file` key provider: the private key is PKCS#8 in `<slot>/key.pem`, mode 0600.
//!
//! P-256 keys are generated and used with ring. ring cannot generate RSA keys, so RSA-2048 keys are
//! generated with the `rsa` crate and then loaded into ring, which does all the signing.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use zeroize::Zeroizing;

use crate::key::spki;
use crate::store;
use crate::{Algorithm, DeviceKey, Error, KeyProvider, SignatureScheme};

/// The key file inside a slot.
pub const KEY_FILE: &str = "key.pem";
const PEM_LABEL: &str = "PRIVATE KEY";

#[derive(Debug, Default)]
pub struct FileKeyProvider {
    /// The consumer group (`storage.group`) that may read an installed key (0640).
    group: Option<u32>,
}

impl FileKeyProvider {
    /// A provider whose installed keys may be shared with `group` (see `Store`); keys are
    /// always created 0600.
    pub fn shared_with(group: Option<u32>) -> Self {
        FileKeyProvider { group }
    }
}

impl KeyProvider for FileKeyProvider {
    fn name(&self) -> &'static str {
        "file"
    }

    fn generate(&self, algorithm: Algorithm, slot: &Path) -> Result<Arc<dyn DeviceKey>, Error> {
        let pkcs8 = match algorithm {
            Algorithm::P256 => generate_p256()?,
            Algorithm::Rsa2048 => generate_rsa2048()?,
        };
        let key = SoftKey::from_pkcs8(&pkcs8)?;
        let pem = Zeroizing::new(pem::encode(&pem::Pem::new(PEM_LABEL, pkcs8.to_vec())));
        store::write_file_atomic(&slot.join(KEY_FILE), pem.as_bytes(), 0o600)?;
        Ok(Arc::new(key))
    }

    fn load(&self, slot: &Path) -> Result<Arc<dyn DeviceKey>, Error> {
        let path = slot.join(KEY_FILE);
        store::check_key_file(&path, self.group)?;
        let text = Zeroizing::new(fs::read(&path).map_err(|e| Error::io("reading key", &path, e))?);
        let parsed = pem::parse(text.as_slice())
            .map_err(|_| Error::key("loading key", format!("{} is not a PEM file", path.display())))?;
        if parsed.tag() != PEM_LABEL {
            return Err(Error::key("loading key", format!("{} is not a PKCS#8 PRIVATE KEY", path.display())));
        }
        let der = Zeroizing::new(parsed.into_contents());
        Ok(Arc::new(SoftKey::from_pkcs8(&der)?))
    }

    fn reuse(&self, from: &Path, to: &Path) -> Result<(), Error> {
        let source = from.join(KEY_FILE);
        store::check_key_file(&source, self.group)?;
        let bytes = Zeroizing::new(fs::read(&source).map_err(|e| Error::io("reading key", &source, e))?);
        store::write_file_atomic(&to.join(KEY_FILE), &bytes, 0o600)
    }

    fn delete(&self, slot: &Path) -> Result<(), Error> {
        let path = slot.join(KEY_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("deleting key", &path, e)),
        }
    }
}

fn generate_p256() -> Result<Zeroizing<Vec<u8>>, Error> {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| Error::key("generating P-256 key", "the system random generator failed"))?;
    Ok(Zeroizing::new(doc.as_ref().to_vec()))
}

fn generate_rsa2048() -> Result<Zeroizing<Vec<u8>>, Error> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = crate::rsa_keygen::generate(&mut rand_core::OsRng)
        .map_err(|e| Error::key("generating RSA-2048 key", e.to_string()))?;
    let doc = key.to_pkcs8_der().map_err(|e| Error::key("encoding RSA-2048 key", e.to_string()))?;
    Ok(Zeroizing::new(doc.as_bytes().to_vec()))
}

/// A key held in memory by ring.
pub struct SoftKey {
    pair: Pair,
    spki: Vec<u8>,
}

enum Pair {
    Ecdsa(EcdsaKeyPair),
    /// ring signs; the PKCS#8 document is kept for decryption, which ring does not offer.
    Rsa(RsaKeyPair, #[cfg_attr(not(feature = "decrypt"), allow(dead_code))] Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for SoftKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftKey").field("algorithm", &self.algorithm()).finish_non_exhaustive()
    }
}

impl SoftKey {
    /// Parses a PKCS#8 document (P-256 or RSA; RSA keys must be 2048 bits).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, Error> {
        let rng = SystemRandom::new();
        if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng) {
            let spki = spki::p256(pair.public_key().as_ref());
            return Ok(SoftKey { pair: Pair::Ecdsa(pair), spki });
        }
        let pair = RsaKeyPair::from_pkcs8(der)
            .map_err(|e| Error::key("loading key", format!("not a P-256 or RSA PKCS#8 key ({e})")))?;
        if pair.public().modulus_len() != 256 {
            return Err(Error::key("loading key", "RSA keys must be 2048 bits"));
        }
        let spki = spki::rsa(pair.public_key().as_ref());
        Ok(SoftKey { pair: Pair::Rsa(pair, Zeroizing::new(der.to_vec())), spki })
    }
}

impl DeviceKey for SoftKey {
    fn algorithm(&self) -> Algorithm {
        match self.pair {
            Pair::Ecdsa(_) => Algorithm::P256,
            Pair::Rsa(..) => Algorithm::Rsa2048,
        }
    }

    fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, Error> {
        let rng = SystemRandom::new();
        let failed = |_| Error::key("signing", "the software key refused to sign");
        match (&self.pair, scheme) {
            (Pair::Ecdsa(pair), SignatureScheme::EcdsaP256Sha256) => {
                Ok(pair.sign(&rng, message).map_err(failed)?.as_ref().to_vec())
            }
            (Pair::Rsa(pair, _), SignatureScheme::RsaPkcs1Sha256 | SignatureScheme::RsaPssSha256) => {
                let padding: &'static dyn signature::RsaEncoding = match scheme {
                    SignatureScheme::RsaPssSha256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut out = vec![0u8; pair.public().modulus_len()];
                pair.sign(padding, &rng, message, &mut out).map_err(failed)?;
                Ok(out)
            }
            _ => Err(Error::key(
                "signing",
                format!("a {} key cannot sign with {scheme:?}", self.algorithm().name()),
            )),
        }
    }

    #[cfg(feature = "decrypt")]
    fn decrypt_pkcs1v15(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        use rsa::pkcs8::DecodePrivateKey;
        let Pair::Rsa(_, pkcs8) = &self.pair else {
            return Err(Error::key("decrypting", "a P-256 key cannot decrypt RSA key transport"));
        };
        let key = rsa::RsaPrivateKey::from_pkcs8_der(pkcs8)
            .map_err(|e| Error::key("decrypting", format!("reading the RSA key: {e}")))?;
        // The rsa crate blinds the private operation (its default), so timing does not leak it.
        key.decrypt(rsa::Pkcs1v15Encrypt, ciphertext)
            .map(Zeroizing::new)
            .map_err(|_| Error::key("decrypting", "the ciphertext was not made for this RSA key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::UnparsedPublicKey;

    fn temp_slot(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("enroll-hal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn point_or_modulus(spki: &[u8], algorithm: Algorithm) -> &[u8] {
        match algorithm {
            Algorithm::P256 => &spki[26..],
            // SEQUENCE(4) + AlgorithmIdentifier(15) + BIT STRING header(4) + unused-bits byte.
            Algorithm::Rsa2048 => &spki[4 + 15 + 4 + 1..],
        }
    }

    #[test]
    fn generated_keys_sign_verifiably_and_reload_from_a_0600_file() {
        use std::os::unix::fs::PermissionsExt;
        for (algorithm, verify_alg) in [
            (Algorithm::P256, &signature::ECDSA_P256_SHA256_ASN1 as &dyn signature::VerificationAlgorithm),
            (Algorithm::Rsa2048, &signature::RSA_PKCS1_2048_8192_SHA256),
        ] {
            let slot = temp_slot(algorithm.name());
            let key = FileKeyProvider::default().generate(algorithm, &slot).unwrap();
            let mode = fs::metadata(slot.join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let sig = key.sign(algorithm.default_scheme(), b"hello").unwrap();
            let public = point_or_modulus(key.public_key_spki(), algorithm);
            UnparsedPublicKey::new(verify_alg, public).verify(b"hello", &sig).unwrap();
            assert!(UnparsedPublicKey::new(verify_alg, public).verify(b"hellO", &sig).is_err());
            let reloaded = FileKeyProvider::default().load(&slot).unwrap();
            assert_eq!(reloaded.public_key_spki(), key.public_key_spki());
            fs::remove_dir_all(&slot).unwrap();
        }
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_with_its_path() {
        use std::os::unix::fs::PermissionsExt;
        let slot = temp_slot("loose");
        FileKeyProvider::default().generate(Algorithm::P256, &slot).unwrap();
        let path = slot.join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = FileKeyProvider::default().load(&slot).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("0644"), "{err}");
        fs::remove_dir_all(&slot).unwrap();
    }

    #[test]
    fn wrong_scheme_is_an_error_not_a_panic_or_a_bad_signature() {
        let slot = temp_slot("scheme");
        let key = FileKeyProvider::default().generate(Algorithm::P256, &slot).unwrap();
        assert!(key.sign(SignatureScheme::RsaPkcs1Sha256, b"x").is_err());
        fs::remove_dir_all(&slot).unwrap();
    }
}
