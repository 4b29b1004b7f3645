//! The key seam. A [`DeviceKey`] is an algorithm, a public key and a signing operation; a
//! [`KeyProvider`] creates, loads and deletes keys for an identity slot. That is all PKCS#11, TPM
//! and remote (Redtrust) keys need to offer, so they fit here without changing callers.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::Error;

/// Key algorithms the product supports (design.md §3 `key.algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    P256,
    Rsa2048,
}

impl Algorithm {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::P256 => "p256",
            Algorithm::Rsa2048 => "rsa2048",
        }
    }

    /// The scheme used for CSRs and certificate-bound tokens.
    pub fn default_scheme(self) -> SignatureScheme {
        match self {
            Algorithm::P256 => SignatureScheme::EcdsaP256Sha256,
            Algorithm::Rsa2048 => SignatureScheme::RsaPkcs1Sha256,
        }
    }
}

/// Signature schemes callers ask for. TLS 1.3 needs RSA-PSS; X.509 and JWT RS256 need PKCS#1 v1.5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureScheme {
    /// ECDSA P-256 with SHA-256, signature ASN.1 DER encoded (as X.509 and TLS carry it).
    EcdsaP256Sha256,
    RsaPkcs1Sha256,
    RsaPssSha256,
}

impl SignatureScheme {
    pub fn algorithm(self) -> Algorithm {
        match self {
            SignatureScheme::EcdsaP256Sha256 => Algorithm::P256,
            SignatureScheme::RsaPkcs1Sha256 | SignatureScheme::RsaPssSha256 => Algorithm::Rsa2048,
        }
    }
}

/// A private key the device holds. Implementations never expose the private half.
pub trait DeviceKey: Send + Sync + fmt::Debug {
    fn algorithm(&self) -> Algorithm;
    /// DER-encoded SubjectPublicKeyInfo.
    fn public_key_spki(&self) -> &[u8];
    /// Signs `message` (the hash is computed by the scheme, not by the caller).
    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, Error>;
    /// Where a non-file key lives (RFC 7512 URI, TPM handle, remote id), for `key.uri` and status.
    fn uri(&self) -> Option<String> {
        None
    }
    /// Decrypts an RSAES-PKCS1-v1_5 `ciphertext` made for this key: the content-encryption key
    /// of a CMS envelope a CA sent to the device (SCEP's CertRep). Callers decrypt only what a
    /// CA signed, so the key never answers as a padding oracle. RSA keys only, and only in
    /// builds with the `decrypt` feature; others refuse.
    fn decrypt_pkcs1v15(&self, _ciphertext: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
        Err(Error::key(
            "decrypting",
            format!("this {} key cannot decrypt in this build", self.algorithm().name()),
        ))
    }
}

/// Creates, loads and deletes the key of one identity slot directory.
pub trait KeyProvider: Send + Sync {
    /// The config name (`file`, `pkcs11`, …).
    fn name(&self) -> &'static str;
    fn generate(&self, algorithm: Algorithm, slot: &Path) -> Result<Arc<dyn DeviceKey>, Error>;
    fn load(&self, slot: &Path) -> Result<Arc<dyn DeviceKey>, Error>;
    /// Makes `to` use the same key as `from` (renewal without rotation).
    fn reuse(&self, from: &Path, to: &Path) -> Result<(), Error>;
    fn delete(&self, slot: &Path) -> Result<(), Error>;
    /// Deletes keys this provider holds outside the slot directories (token objects, TPM handles)
    /// whose slot is not in `live`: the orphans a crash between install and cleanup leaves.
    /// File-based providers keep keys inside the slot, so pruning the directory is enough.
    fn retain(&self, _live: &[std::path::PathBuf]) -> Result<(), Error> {
        Ok(())
    }
}

/// DER helpers for the two SubjectPublicKeyInfo forms we build.
pub(crate) mod spki {
    /// id-ecPublicKey + prime256v1, then the BIT STRING header for a 65-byte uncompressed point.
    const P256_PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    /// AlgorithmIdentifier { rsaEncryption, NULL }.
    const RSA_ALGORITHM: [u8; 15] =
        [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];

    pub fn p256(point: &[u8]) -> Vec<u8> {
        let mut out = P256_PREFIX.to_vec();
        out.extend_from_slice(point);
        out
    }

    /// `rsa_public_key` is the DER RSAPublicKey { n, e } that ring exposes.
    pub fn rsa(rsa_public_key: &[u8]) -> Vec<u8> {
        let mut bits = vec![0u8];
        bits.extend_from_slice(rsa_public_key);
        let mut body = RSA_ALGORITHM.to_vec();
        body.extend(crate::der::tlv(0x03, &bits));
        crate::der::tlv(0x30, &body)
    }
}
