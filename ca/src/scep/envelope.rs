//! CMS EnvelopedData (RFC 5652 §6) as SCEP uses it (RFC 8894 §3.2.2): one content-encryption
//! key, sent to one RSA recipient with PKCS#1 v1.5 key transport; the content in CBC mode.
//!
//! Outgoing envelopes use AES-256-CBC when the server lists `AES`, else DES-EDE3-CBC when it lists
//! `DES3`, else single DES (the RFC's fallback). Incoming envelopes are read in whichever of those
//! the server chose: micromdm's `scepserver` always answers with DES-CBC, whatever it advertises
//! (tooling.md §2).

use cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::enveloped_data::{EncryptedContentInfo, KeyTransRecipientInfo, RecipientIdentifier};
use der::asn1::{Any, ObjectIdentifier, OctetString, SetOfVec};
use der::{Decode, Encode};
use enroll_hal::DeviceKey;
use spki::AlgorithmIdentifierOwned;
use zeroize::Zeroizing;

use super::message::{any, issuer_and_serial, DATA, ENVELOPED_DATA};
use crate::error::{Error, Kind, Result};
use crate::pki::Cert;

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const DES_CBC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.7");
const DES_EDE3_CBC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.3.7");
const AES128_CBC: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.1.2");
const AES192_CBC: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.1.22");
const AES256_CBC: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.1.42");

/// The content ciphers SCEP servers use (RFC 8894 §3.5.2 capabilities `AES`, `DES3`; DES).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Des,
    Des3,
    Aes128,
    Aes192,
    Aes256,
}

impl Cipher {
    fn oid(self) -> ObjectIdentifier {
        match self {
            Cipher::Des => DES_CBC,
            Cipher::Des3 => DES_EDE3_CBC,
            Cipher::Aes128 => AES128_CBC,
            Cipher::Aes192 => AES192_CBC,
            Cipher::Aes256 => AES256_CBC,
        }
    }

    fn from_oid(oid: &ObjectIdentifier) -> Option<Cipher> {
        [Cipher::Des, Cipher::Des3, Cipher::Aes128, Cipher::Aes192, Cipher::Aes256]
            .into_iter()
            .find(|c| c.oid() == *oid)
    }

    fn key_len(self) -> usize {
        match self {
            Cipher::Des => 8,
            Cipher::Des3 | Cipher::Aes192 => 24,
            Cipher::Aes128 => 16,
            Cipher::Aes256 => 32,
        }
    }

    fn block_len(self) -> usize {
        match self {
            Cipher::Des | Cipher::Des3 => 8,
            _ => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cipher::Des => "DES-CBC",
            Cipher::Des3 => "DES-EDE3-CBC",
            Cipher::Aes128 => "AES-128-CBC",
            Cipher::Aes192 => "AES-192-CBC",
            Cipher::Aes256 => "AES-256-CBC",
        }
    }
}

fn internal(what: &'static str) -> impl Fn(der::Error) -> Error {
    move |e| Error::new(Kind::Internal, format!("SCEP envelope: {what}: {e}"))
}

fn random(len: usize) -> Result<Zeroizing<Vec<u8>>> {
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| Error::new(Kind::Internal, "the system random generator failed"))?;
    Ok(bytes)
}

/// ContentInfo(EnvelopedData) holding `content` for `recipient` (the CA or RA certificate).
pub fn seal(content: &[u8], recipient: &Cert, cipher: Cipher) -> Result<Vec<u8>> {
    let key = random(cipher.key_len())?;
    let iv = random(cipher.block_len())?;
    let encrypted = encrypt(cipher, &key, &iv, content)?;
    let enc_key = rsa_encrypt(recipient, &key)?;
    let ktri = KeyTransRecipientInfo {
        version: CmsVersion::V0,
        rid: RecipientIdentifier::IssuerAndSerialNumber(issuer_and_serial(recipient)),
        key_enc_alg: AlgorithmIdentifierOwned { oid: RSA_ENCRYPTION, parameters: Some(Any::null()) },
        enc_key: OctetString::new(enc_key).map_err(internal("encrypted key"))?,
    };
    let iv_param =
        Any::encode_from(&OctetString::new(iv.to_vec()).map_err(internal("IV"))?).map_err(internal("IV"))?;
    let encrypted_content = EncryptedContentInfo {
        content_type: DATA,
        content_enc_alg: AlgorithmIdentifierOwned { oid: cipher.oid(), parameters: Some(iv_param) },
        encrypted_content: Some(OctetString::new(encrypted).map_err(internal("content"))?),
    };
    // EnvelopedData (RFC 5652 §6.1) field by field, with one key-transport recipient: cms's own
    // EnvelopedData type would link the encoders of every RecipientInfo kind (issue 13).
    let recipients =
        SetOfVec::try_from(vec![any(&ktri, "recipientInfo")?]).map_err(internal("recipients"))?;
    let enveloped: Vec<Any> = vec![
        any(&CmsVersion::V0, "version")?,
        any(&recipients, "recipientInfos")?,
        any(&encrypted_content, "encryptedContentInfo")?,
    ];
    let info = ContentInfo { content_type: ENVELOPED_DATA, content: any(&enveloped, "EnvelopedData")? };
    info.to_der().map_err(internal("ContentInfo"))
}

/// The content of a ContentInfo(EnvelopedData) the CA sent to `key`: its content-encryption
/// key decrypted by the device key (in the token or TPM where it lives), then the content.
/// Only called on a message whose CA signature has been checked.
pub fn open(der: &[u8], key: &dyn DeviceKey) -> Result<Zeroizing<Vec<u8>>> {
    let malformed = |what: &str| Error::protocol(format!("SCEP CertRep: the encrypted answer {what}"));
    let parts = crate::pkcs7::enveloped(der).map_err(|e| malformed(&format!("does not parse ({e})")))?;
    let algorithm = AlgorithmIdentifierOwned::from_der(parts.content_algorithm)
        .map_err(|e| malformed(&format!("has an unreadable cipher ({e})")))?;
    let cipher = Cipher::from_oid(&algorithm.oid)
        .ok_or_else(|| malformed(&format!("uses an unknown cipher {}", algorithm.oid)))?;
    let iv = algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<OctetString>().ok())
        .filter(|iv| iv.as_bytes().len() == cipher.block_len())
        .ok_or_else(|| malformed(&format!("has no {}-byte IV for {}", cipher.block_len(), cipher.name())))?;
    if parts.encrypted.is_empty() || parts.encrypted.len() % cipher.block_len() != 0 {
        return Err(malformed(&format!("is not whole {} blocks", cipher.name())));
    }
    // One recipient (us) in practice; try each RSA key-transport entry until one opens.
    let mut cek = None;
    for recipient in &parts.key_transport {
        let ktri = KeyTransRecipientInfo::from_der(recipient)
            .map_err(|e| malformed(&format!("has an unreadable recipientInfo ({e})")))?;
        if let Ok(key) = key.decrypt_pkcs1v15(ktri.enc_key.as_bytes()) {
            cek = Some(key);
            break;
        }
    }
    let cek =
        cek.ok_or_else(|| Error::protocol("SCEP CertRep: the answer is not encrypted to this device's key"))?;
    if cek.len() != cipher.key_len() {
        return Err(malformed(&format!("carries a {}-byte key for {}", cek.len(), cipher.name())));
    }
    decrypt(cipher, &cek, iv.as_bytes(), &parts.encrypted)
        .ok_or_else(|| malformed(&format!("does not decrypt with {} (bad padding)", cipher.name())))
}

/// RSAES-PKCS1-v1_5 (RFC 8017 §7.2) to the recipient certificate's public key.
fn rsa_encrypt(recipient: &Cert, plain: &[u8]) -> Result<Vec<u8>> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    let spki = &recipient.parsed.tbs_certificate.subject_public_key_info;
    let refused = |why: String| Error::protocol(format!("SCEP: the CA certificate {why}"));
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(refused("has no RSA key to encrypt the request to".into()));
    }
    let bits = spki.subject_public_key.as_bytes().ok_or_else(|| refused("has a malformed key".into()))?;
    let public = rsa::RsaPublicKey::from_pkcs1_der(bits).map_err(|e| refused(format!("key: {e}")))?;
    public
        .encrypt(&mut rand_core::OsRng, rsa::Pkcs1v15Encrypt, plain)
        .map_err(|e| Error::new(Kind::Internal, format!("SCEP: RSA key transport: {e}")))
}

fn encrypt(cipher: Cipher, key: &[u8], iv: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
    use cipher::block_padding::Pkcs7;
    fn run<C: BlockEncryptMut + KeyIvInit>(key: &[u8], iv: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        Some(C::new_from_slices(key, iv).ok()?.encrypt_padded_vec_mut::<Pkcs7>(plain))
    }
    let out = match cipher {
        Cipher::Des => run::<cbc::Encryptor<des::Des>>(key, iv, plain),
        Cipher::Des3 => run::<cbc::Encryptor<des::TdesEde3>>(key, iv, plain),
        Cipher::Aes128 => run::<cbc::Encryptor<aes::Aes128>>(key, iv, plain),
        Cipher::Aes192 => run::<cbc::Encryptor<aes::Aes192>>(key, iv, plain),
        Cipher::Aes256 => run::<cbc::Encryptor<aes::Aes256>>(key, iv, plain),
    };
    out.ok_or_else(|| Error::new(Kind::Internal, "SCEP: content encryption key of the wrong length"))
}

fn decrypt(cipher: Cipher, key: &[u8], iv: &[u8], data: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    use cipher::block_padding::Pkcs7;
    fn run<C: BlockDecryptMut + KeyIvInit>(key: &[u8], iv: &[u8], data: &[u8]) -> Option<Vec<u8>> {
        C::new_from_slices(key, iv).ok()?.decrypt_padded_vec_mut::<Pkcs7>(data).ok()
    }
    let out = match cipher {
        Cipher::Des => run::<cbc::Decryptor<des::Des>>(key, iv, data),
        Cipher::Des3 => run::<cbc::Decryptor<des::TdesEde3>>(key, iv, data),
        Cipher::Aes128 => run::<cbc::Decryptor<aes::Aes128>>(key, iv, data),
        Cipher::Aes192 => run::<cbc::Decryptor<aes::Aes192>>(key, iv, data),
        Cipher::Aes256 => run::<cbc::Decryptor<aes::Aes256>>(key, iv, data),
    };
    out.map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cipher_round_trips_and_a_wrong_key_fails_on_padding_or_content() {
        for cipher in [Cipher::Des, Cipher::Des3, Cipher::Aes128, Cipher::Aes192, Cipher::Aes256] {
            let key = random(cipher.key_len()).unwrap();
            let iv = random(cipher.block_len()).unwrap();
            let plain = b"a certs-only SignedData would be here".to_vec();
            let sealed = encrypt(cipher, &key, &iv, &plain).unwrap();
            assert_eq!(sealed.len() % cipher.block_len(), 0);
            assert_ne!(&sealed[..plain.len().min(sealed.len())], &plain[..], "{}", cipher.name());
            assert_eq!(decrypt(cipher, &key, &iv, &sealed).unwrap().as_slice(), plain.as_slice());
            let other = random(cipher.key_len()).unwrap();
            assert_ne!(decrypt(cipher, &other, &iv, &sealed).map(|p| p.to_vec()), Some(plain));
        }
    }
}
