//! SCEP server emulator (RFC 8894, protocols.md §6.2), written from the RFC and RFC 5652 (CMS),
//! independently of the agent's client.
//!
//! Routes on `/scep` (and `/scep/…`, e.g. `/scep/pkiclient.exe`), by `operation=`:
//! - `GET GetCACaps` (§3.5.2): the configured capability lines, `text/plain`;
//! - `GET GetCACert` (§4.2): the SCEP CA certificate, DER, `application/x-x509-ca-cert`. The CA
//!   is its own RSA-2048 root ("SCEP Emulator CA"), made on first use (the other emulated CAs
//!   are P-256, and SCEP encrypts to the CA's key);
//! - `POST PKIOperation` (body: DER pkiMessage) and `GET PKIOperation&message=<base64>` (§4.3).
//!
//! A pkiMessage is checked as a CA must: ContentInfo(SignedData) with one signer whose
//! certificate is in the message; the RSA signature over the signed attributes as received
//! (SHA-1, SHA-256 or SHA-512), contentType id-data and messageDigest of the content; then the
//! EnvelopedData opened with the CA key (RSA PKCS#1 v1.5 key transport; DES, DES3 or AES-CBC).
//! - PKCSReq (19): the signer is a self-signed certificate for the CSR's key, and the CSR's
//!   challengePassword equals [`ScepConfig::challenge`] (else FAILURE badRequest).
//! - RenewalReq (17): the signer is a valid certificate this CA issued (else FAILURE
//!   badCertId); a challengePassword, if present, must be right.
//! - CertPoll (20): IssuerAndSubject naming this CA and the pending request's subject, for a
//!   known transactionID (else badCertId), signed by the same key as the request.
//!
//! The CertRep (§3.3.2) is a SignedData signed by the CA (SHA-256) with contentType,
//! messageDigest, messageType 3, pkiStatus, failInfo (FAILURE only), the request's
//! transactionID, recipientNonce = the request's senderNonce and a fresh senderNonce. On
//! SUCCESS its content is a ContentInfo(EnvelopedData) encrypted to the request signer's key
//! (DES-CBC by default, as micromdm's scepserver answers; [`ScepConfig::reply_cipher`]) holding
//! a certs-only SignedData with the issued certificate. Signature failures answer badMessageCheck,
//! unknown algorithms badAlg. A body that is not a pkiMessage at all is a 400.
//!
//! Pending: with [`ScepConfig::pending_polls`] > 0 a request is answered PENDING and kept by
//! transactionID; that many CertPolls answer PENDING, the next SUCCESS. Faults: the generic
//! early ones on PKCSReq/RenewalReq; `reject-auth` is a FAILURE badRequest CertRep;
//! `pending-forever` keeps the transaction PENDING for good; `malformed-json` (a body that is
//! not CMS), `truncated-json`, `truncated-body`, `wrong-key-cert`, `expired-cert`,
//! `scep-bad-signature` and `scep-wrong-nonce` shape a SUCCESS answer.

use std::collections::HashMap;
use std::sync::Arc;

use cipher::block_padding::Pkcs7;
use cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::enveloped_data::{
    EncryptedContentInfo, EnvelopedData, KeyTransRecipientInfo, RecipientIdentifier, RecipientInfo,
    RecipientInfos,
};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use der::asn1::{
    Any, AnyRef, Ia5StringRef, ObjectIdentifier, OctetString, PrintableStringRef, SetOfVec, Utf8StringRef,
};
use der::{Decode, Encode, Reader, SliceReader, Tag, TagNumber, Tagged};
use spki::AlgorithmIdentifierOwned;
use x509_cert::attr::Attribute;
use x509_cert::name::Name;
use x509_cert::Certificate;

use crate::emulator::{answer_fault, lock, tag, Shared};
use crate::fault::{Endpoint, Fault, Phase};
use crate::pki::{self, CertAuthority, LeafFault, LeafProfile, ParsedCsr};
use crate::server::{Request, Response};
use crate::util;

/// messageType (RFC 8894 §3.2.1.2).
pub const CERT_REP: u8 = 3;
pub const RENEWAL_REQ: u8 = 17;
pub const PKCS_REQ: u8 = 19;
pub const CERT_POLL: u8 = 20;

/// pkiStatus (§3.2.1.3).
pub const SUCCESS: u8 = 0;
pub const FAILURE: u8 = 2;
pub const PENDING: u8 = 3;

/// failInfo (§3.2.1.4).
pub const BAD_ALG: u8 = 0;
pub const BAD_MESSAGE_CHECK: u8 = 1;
pub const BAD_REQUEST: u8 = 2;
pub const BAD_CERT_ID: u8 = 4;

/// What GetCACaps lists by default.
pub const DEFAULT_CAPS: &[&str] = &["Renewal", "SHA-256", "AES", "DES3", "POSTPKIOperation", "SCEPStandard"];

const DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ENVELOPED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.3");
const CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA1_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.5");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const SHA512_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
const SUBJECT_KEY_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");
// SCEP attributes, under id-VeriSign pki attributes 2.16.840.1.113733.1.9 (RFC 8894 §3.2.1).
const MESSAGE_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.2");
const PKI_STATUS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.3");
const FAIL_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.4");
const SENDER_NONCE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.5");
const RECIPIENT_NONCE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.6");
const TRANSACTION_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.7");

/// CBC content ciphers of an EnvelopedData (RFC 8894 §3.2.2; RFC 3565 for AES).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScepCipher {
    /// DES-CBC, 1.3.14.3.2.7 (what micromdm's scepserver answers with).
    Des,
    /// DES-EDE3-CBC, 1.2.840.113549.3.7.
    Des3,
    /// AES-128-CBC, 2.16.840.1.101.3.4.1.2.
    Aes128,
    /// AES-192-CBC, 2.16.840.1.101.3.4.1.22.
    Aes192,
    /// AES-256-CBC, 2.16.840.1.101.3.4.1.42.
    Aes256,
}

const CIPHERS: [ScepCipher; 5] =
    [ScepCipher::Des, ScepCipher::Des3, ScepCipher::Aes128, ScepCipher::Aes192, ScepCipher::Aes256];

impl ScepCipher {
    fn oid(self) -> ObjectIdentifier {
        ObjectIdentifier::new_unwrap(match self {
            ScepCipher::Des => "1.3.14.3.2.7",
            ScepCipher::Des3 => "1.2.840.113549.3.7",
            ScepCipher::Aes128 => "2.16.840.1.101.3.4.1.2",
            ScepCipher::Aes192 => "2.16.840.1.101.3.4.1.22",
            ScepCipher::Aes256 => "2.16.840.1.101.3.4.1.42",
        })
    }

    fn key_len(self) -> usize {
        match self {
            ScepCipher::Des => 8,
            ScepCipher::Aes128 => 16,
            ScepCipher::Des3 | ScepCipher::Aes192 => 24,
            ScepCipher::Aes256 => 32,
        }
    }

    fn block_len(self) -> usize {
        match self {
            ScepCipher::Des | ScepCipher::Des3 => 8,
            _ => 16,
        }
    }

    /// E.g. `AES-256-CBC`.
    pub fn name(self) -> &'static str {
        match self {
            ScepCipher::Des => "DES-CBC",
            ScepCipher::Des3 => "DES-EDE3-CBC",
            ScepCipher::Aes128 => "AES-128-CBC",
            ScepCipher::Aes192 => "AES-192-CBC",
            ScepCipher::Aes256 => "AES-256-CBC",
        }
    }

    /// A fresh content-encryption key; DES keys get odd parity (FIPS 46-3).
    fn new_key(self) -> Vec<u8> {
        let mut key = util::random_bytes(self.key_len());
        if matches!(self, ScepCipher::Des | ScepCipher::Des3) {
            for byte in key.iter_mut() {
                *byte = (*byte & 0xfe) | u8::from((*byte >> 1).count_ones() % 2 == 0);
            }
        }
        key
    }

    fn encrypt(self, key: &[u8], iv: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        fn run<C: BlockEncryptMut + KeyIvInit>(key: &[u8], iv: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
            Some(C::new_from_slices(key, iv).ok()?.encrypt_padded_vec_mut::<Pkcs7>(plain))
        }
        match self {
            ScepCipher::Des => run::<cbc::Encryptor<des::Des>>(key, iv, plain),
            ScepCipher::Des3 => run::<cbc::Encryptor<des::TdesEde3>>(key, iv, plain),
            ScepCipher::Aes128 => run::<cbc::Encryptor<aes::Aes128>>(key, iv, plain),
            ScepCipher::Aes192 => run::<cbc::Encryptor<aes::Aes192>>(key, iv, plain),
            ScepCipher::Aes256 => run::<cbc::Encryptor<aes::Aes256>>(key, iv, plain),
        }
    }

    fn decrypt(self, key: &[u8], iv: &[u8], data: &[u8]) -> Option<Vec<u8>> {
        fn run<C: BlockDecryptMut + KeyIvInit>(key: &[u8], iv: &[u8], data: &[u8]) -> Option<Vec<u8>> {
            C::new_from_slices(key, iv).ok()?.decrypt_padded_vec_mut::<Pkcs7>(data).ok()
        }
        match self {
            ScepCipher::Des => run::<cbc::Decryptor<des::Des>>(key, iv, data),
            ScepCipher::Des3 => run::<cbc::Decryptor<des::TdesEde3>>(key, iv, data),
            ScepCipher::Aes128 => run::<cbc::Decryptor<aes::Aes128>>(key, iv, data),
            ScepCipher::Aes192 => run::<cbc::Decryptor<aes::Aes192>>(key, iv, data),
            ScepCipher::Aes256 => run::<cbc::Decryptor<aes::Aes256>>(key, iv, data),
        }
    }
}

/// SCEP server settings.
#[derive(Clone, Debug)]
pub struct ScepConfig {
    /// The challengePassword a PKCSReq must carry (random hex by default).
    pub challenge: String,
    /// GetCACaps lines, in order ([`DEFAULT_CAPS`]).
    pub caps: Vec<String>,
    /// CertPolls a new PKCSReq / RenewalReq stays PENDING (0, the default: issued at once).
    pub pending_polls: u32,
    /// Content cipher of SUCCESS answers (DES-CBC by default, as micromdm answers).
    pub reply_cipher: ScepCipher,
    /// Lifetime of issued certificates in days (default 30).
    pub valid_days: u32,
}

impl ScepConfig {
    pub fn generate() -> Self {
        Self {
            challenge: util::random_hex(12),
            caps: DEFAULT_CAPS.iter().map(|c| c.to_string()).collect(),
            pending_polls: 0,
            reply_cipher: ScepCipher::Des,
            valid_days: 30,
        }
    }
}

/// One PKIOperation the emulator could read (its signed attributes parsed), oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScepMessage {
    /// `POST` or `GET`.
    pub method: String,
    /// messageType: 19 PKCSReq, 17 RenewalReq, 20 CertPoll, …
    pub message_type: u8,
    /// The transactionID as text.
    pub transaction_id: String,
    /// The request envelope's content cipher, once it was opened.
    pub cipher: Option<ScepCipher>,
    /// pkiStatus answered (0 SUCCESS, 2 FAILURE, 3 PENDING); `None`: no CertRep (an HTTP fault).
    pub status: Option<u8>,
    /// failInfo of a FAILURE.
    pub fail_info: Option<u8>,
}

/// The SCEP CA: an RSA-2048 root that decrypts requests, signs CertReps and issues leaves.
pub(crate) struct ScepCa {
    authority: CertAuthority,
    cert: Certificate,
    decrypt_key: rsa::RsaPrivateKey,
    sign_key: ring::signature::RsaKeyPair,
}

impl ScepCa {
    fn generate() -> Result<Self, String> {
        use rsa::pkcs8::DecodePrivateKey;
        let pkcs8 = pki::rsa_pkcs8(2048)?;
        let authority = CertAuthority::rsa_root("SCEP Emulator", "SCEP Emulator CA", &pkcs8)?;
        let cert = Certificate::from_der(authority.der()).map_err(|e| e.to_string())?;
        let decrypt_key = rsa::RsaPrivateKey::from_pkcs8_der(&pkcs8).map_err(|e| e.to_string())?;
        let sign_key = ring::signature::RsaKeyPair::from_pkcs8(&pkcs8).map_err(|e| e.to_string())?;
        Ok(Self { authority, cert, decrypt_key, sign_key })
    }

    fn sign_sha256(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut signature = vec![0u8; self.sign_key.public().modulus_len()];
        self.sign_key
            .sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), data, &mut signature)
            .map_err(|_| "RSA signing failed".to_string())?;
        Ok(signature)
    }

    fn issuer_and_serial(&self) -> IssuerAndSerialNumber {
        issuer_and_serial(&self.cert)
    }
}

/// A request kept by transactionID (pending, or answered and kept for repeated CertPolls).
struct Transaction {
    csr: ParsedCsr,
    /// SubjectPublicKeyInfo (DER) of the certificate that signed the request: CertPolls must
    /// come from the same key, and answers are encrypted to it.
    signer_spki: Vec<u8>,
    /// CertPolls still to answer PENDING; `None`: for good (`pending-forever`).
    remaining: Option<u32>,
    /// The certificate, once issued.
    issued: Option<Vec<u8>>,
}

/// What the SCEP emulator has seen, and its run-time settings.
pub struct ScepState {
    ca: Option<Arc<ScepCa>>,
    caps: Vec<String>,
    pending_polls: u32,
    reply_cipher: ScepCipher,
    transactions: HashMap<String, Transaction>,
    messages: Vec<ScepMessage>,
}

impl ScepState {
    pub(crate) fn new(cfg: &ScepConfig) -> Self {
        Self {
            ca: None,
            caps: cfg.caps.clone(),
            pending_polls: cfg.pending_polls,
            reply_cipher: cfg.reply_cipher,
            transactions: HashMap::new(),
            messages: Vec::new(),
        }
    }

    /// The CA, generated on first use (an RSA key takes a moment; most tests never need it).
    pub(crate) fn ca(&mut self) -> Result<Arc<ScepCa>, String> {
        if let Some(ca) = &self.ca {
            return Ok(ca.clone());
        }
        let ca = Arc::new(ScepCa::generate()?);
        self.ca = Some(ca.clone());
        Ok(ca)
    }

    pub(crate) fn ca_der(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.ca()?.authority.der().to_vec())
    }

    pub(crate) fn set_caps(&mut self, caps: &[&str]) {
        self.caps = caps.iter().map(|c| c.to_string()).collect();
    }

    /// New requests stay pending `n` CertPolls; so do the open transactions that are not
    /// pending for good (a test releases a waiting request with 0).
    pub(crate) fn set_pending_polls(&mut self, n: u32) {
        self.pending_polls = n;
        for transaction in self.transactions.values_mut() {
            if transaction.issued.is_none() && transaction.remaining.is_some() {
                transaction.remaining = Some(n);
            }
        }
    }

    pub(crate) fn set_reply_cipher(&mut self, cipher: ScepCipher) {
        self.reply_cipher = cipher;
    }

    pub(crate) fn messages(&self) -> Vec<ScepMessage> {
        self.messages.clone()
    }
}

/// A pkiMessage as received: parsed, not yet verified.
struct Incoming {
    signed: SignedData,
    signer_info: SignerInfo,
    /// The signed attributes exactly as received, with the SET OF tag (RFC 5652 §5.4).
    signed_attrs_der: Vec<u8>,
    /// The encapsulated content (the EnvelopedData ContentInfo), empty when absent.
    content: Vec<u8>,
    message_type: u8,
    /// The transactionID value as sent (echoed as is) and as text.
    transaction_id: Any,
    transaction_text: String,
    sender_nonce: Vec<u8>,
}

fn attribute_value(attrs: &[Attribute], oid: ObjectIdentifier) -> Option<&Any> {
    attrs.iter().find(|a| a.oid == oid).and_then(|a| a.values.iter().next())
}

/// A PrintableString (what RFC 8894 specifies), or a UTF8String / IA5String from a lax client.
fn any_text(value: &Any) -> Option<String> {
    value
        .decode_as::<PrintableStringRef>()
        .map(|s| s.as_str().to_string())
        .or_else(|_| value.decode_as::<Utf8StringRef>().map(|s| s.as_str().to_string()))
        .or_else(|_| value.decode_as::<Ia5StringRef>().map(|s| s.as_str().to_string()))
        .ok()
}

fn any_octets(value: &Any) -> Option<Vec<u8>> {
    value.decode_as::<OctetString>().ok().map(OctetString::into_bytes)
}

/// The first SignerInfo's `[0] IMPLICIT signedAttrs` as received, re-tagged as SET OF: what the
/// signature covers (RFC 5652 §5.4), without re-encoding what was parsed.
fn raw_signed_attrs(der: &[u8]) -> Option<Vec<u8>> {
    fn children(outer: AnyRef<'_>) -> Option<Vec<AnyRef<'_>>> {
        let mut reader = SliceReader::new(outer.value()).ok()?;
        let mut out = Vec::new();
        while !reader.is_finished() {
            out.push(reader.decode::<AnyRef>().ok()?);
        }
        Some(out)
    }
    let content_info = AnyRef::from_der(der).ok()?;
    let explicit = *children(content_info)?.get(1)?;
    let signed_data = AnyRef::from_der(explicit.value()).ok()?;
    let signer_infos = *children(signed_data)?.last()?;
    let signer_info = *children(signer_infos)?.first()?;
    let attrs = children(signer_info)?
        .into_iter()
        .find(|item| item.tag() == Tag::ContextSpecific { constructed: true, number: TagNumber::N0 })?;
    AnyRef::new(Tag::Set, attrs.value()).ok()?.to_der().ok()
}

impl Incoming {
    fn parse(der: &[u8]) -> Result<Self, String> {
        let info = ContentInfo::from_der(der).map_err(|e| format!("not a CMS ContentInfo ({e})"))?;
        if info.content_type != SIGNED_DATA {
            return Err(format!("the content is {}, not SignedData", info.content_type));
        }
        let signed: SignedData =
            info.content.decode_as().map_err(|e| format!("the SignedData does not parse ({e})"))?;
        let [signer_info] = signed.signer_infos.0.as_slice() else {
            return Err(format!("{} signers instead of one", signed.signer_infos.0.len()));
        };
        let signer_info = signer_info.clone();
        let Some(attrs) = &signer_info.signed_attrs else {
            return Err("no signed attributes".into());
        };
        let attrs: Vec<Attribute> = attrs.iter().cloned().collect();
        let signed_attrs_der = raw_signed_attrs(der).ok_or("the signed attributes cannot be located")?;
        let message_type = attribute_value(&attrs, MESSAGE_TYPE)
            .and_then(any_text)
            .and_then(|t| t.parse::<u8>().ok())
            .ok_or("no numeric messageType")?;
        let transaction_id = attribute_value(&attrs, TRANSACTION_ID).ok_or("no transactionID")?.clone();
        let transaction_text = any_text(&transaction_id).ok_or("the transactionID is not a string")?;
        let sender_nonce =
            attribute_value(&attrs, SENDER_NONCE).and_then(any_octets).ok_or("no senderNonce")?;
        let content = match &signed.encap_content_info.econtent {
            Some(any) => any_octets(any).ok_or("the encapsulated content is not an OCTET STRING")?,
            None => Vec::new(),
        };
        Ok(Self {
            signed,
            signer_info,
            signed_attrs_der,
            content,
            message_type,
            transaction_id,
            transaction_text,
            sender_nonce,
        })
    }

    fn attrs(&self) -> Vec<Attribute> {
        self.signer_info.signed_attrs.as_ref().map(|a| a.iter().cloned().collect()).unwrap_or_default()
    }

    /// The signer's certificate, found in the message by its SignerIdentifier.
    fn signer_cert(&self) -> Option<Certificate> {
        let certs = self.signed.certificates.as_ref()?;
        certs.0.iter().find_map(|choice| {
            let CertificateChoices::Certificate(cert) = choice else { return None };
            let matches = match &self.signer_info.sid {
                SignerIdentifier::IssuerAndSerialNumber(id) => {
                    id.issuer == cert.tbs_certificate.issuer
                        && id.serial_number == cert.tbs_certificate.serial_number
                }
                SignerIdentifier::SubjectKeyIdentifier(ski) => {
                    subject_key_id(cert).is_some_and(|own| own == ski.0.as_bytes())
                }
            };
            matches.then(|| cert.clone())
        })
    }

    /// RFC 5652 §5.6 for the one signer: its certificate, if the signature and digest hold.
    fn verify(&self) -> Result<Certificate, u8> {
        let cert = self.signer_cert().ok_or(BAD_CERT_ID)?;
        if self.signed.encap_content_info.econtent_type != DATA {
            return Err(BAD_MESSAGE_CHECK);
        }
        let (verify_alg, digest_alg): (&'static dyn ring::signature::VerificationAlgorithm, _) =
            match self.signer_info.digest_alg.oid {
                SHA1 => (
                    &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                    &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                ),
                SHA256 => (&ring::signature::RSA_PKCS1_2048_8192_SHA256, &ring::digest::SHA256),
                SHA512 => (&ring::signature::RSA_PKCS1_2048_8192_SHA512, &ring::digest::SHA512),
                _ => return Err(BAD_ALG),
            };
        let signature_alg = self.signer_info.signature_algorithm.oid;
        let expected_with = match self.signer_info.digest_alg.oid {
            SHA1 => SHA1_WITH_RSA,
            SHA256 => SHA256_WITH_RSA,
            _ => SHA512_WITH_RSA,
        };
        if signature_alg != RSA_ENCRYPTION && signature_alg != expected_with {
            return Err(BAD_ALG);
        }
        let spki = &cert.tbs_certificate.subject_public_key_info;
        if spki.algorithm.oid != RSA_ENCRYPTION {
            return Err(BAD_ALG);
        }
        let public_key = spki.subject_public_key.as_bytes().ok_or(BAD_MESSAGE_CHECK)?;
        ring::signature::UnparsedPublicKey::new(verify_alg, public_key)
            .verify(&self.signed_attrs_der, self.signer_info.signature.as_bytes())
            .map_err(|_| BAD_MESSAGE_CHECK)?;
        let attrs = self.attrs();
        let content_type =
            attribute_value(&attrs, CONTENT_TYPE).and_then(|v| v.decode_as::<ObjectIdentifier>().ok());
        if content_type != Some(DATA) {
            return Err(BAD_MESSAGE_CHECK);
        }
        let digest = attribute_value(&attrs, MESSAGE_DIGEST).and_then(any_octets);
        if digest.as_deref() != Some(ring::digest::digest(digest_alg, &self.content).as_ref()) {
            return Err(BAD_MESSAGE_CHECK);
        }
        Ok(cert)
    }
}

fn issuer_and_serial(cert: &Certificate) -> IssuerAndSerialNumber {
    IssuerAndSerialNumber {
        issuer: cert.tbs_certificate.issuer.clone(),
        serial_number: cert.tbs_certificate.serial_number.clone(),
    }
}

fn subject_key_id(cert: &Certificate) -> Option<Vec<u8>> {
    let extension = cert.tbs_certificate.extensions.as_ref()?.iter().find(|e| e.extn_id == SUBJECT_KEY_ID)?;
    OctetString::from_der(extension.extn_value.as_bytes()).ok().map(OctetString::into_bytes)
}

fn spki_der(cert: &Certificate) -> Vec<u8> {
    cert.tbs_certificate.subject_public_key_info.to_der().unwrap_or_default()
}

/// Opens a ContentInfo(EnvelopedData) sent to the CA: its content and cipher.
fn open_envelope(ca: &ScepCa, der: &[u8]) -> Result<(Vec<u8>, ScepCipher), u8> {
    let info = ContentInfo::from_der(der).map_err(|_| BAD_MESSAGE_CHECK)?;
    if info.content_type != ENVELOPED_DATA {
        return Err(BAD_MESSAGE_CHECK);
    }
    let enveloped: EnvelopedData = info.content.decode_as().map_err(|_| BAD_MESSAGE_CHECK)?;
    let ours = ca.issuer_and_serial();
    let ktri = enveloped
        .recip_infos
        .0
        .iter()
        .find_map(|recipient| match recipient {
            RecipientInfo::Ktri(ktri) => match &ktri.rid {
                RecipientIdentifier::IssuerAndSerialNumber(id) if *id == ours => Some(ktri),
                RecipientIdentifier::SubjectKeyIdentifier(ski)
                    if subject_key_id(&ca.cert).is_some_and(|own| own == ski.0.as_bytes()) =>
                {
                    Some(ktri)
                }
                _ => None,
            },
            _ => None,
        })
        .ok_or(BAD_MESSAGE_CHECK)?;
    if ktri.key_enc_alg.oid != RSA_ENCRYPTION {
        return Err(BAD_ALG);
    }
    let encrypted = &enveloped.encrypted_content;
    if encrypted.content_type != DATA {
        return Err(BAD_MESSAGE_CHECK);
    }
    let algorithm = &encrypted.content_enc_alg;
    let cipher = CIPHERS.into_iter().find(|c| c.oid() == algorithm.oid).ok_or(BAD_ALG)?;
    let iv = algorithm.parameters.as_ref().and_then(any_octets).ok_or(BAD_MESSAGE_CHECK)?;
    if iv.len() != cipher.block_len() {
        return Err(BAD_MESSAGE_CHECK);
    }
    let key = ca
        .decrypt_key
        .decrypt(rsa::Pkcs1v15Encrypt, ktri.enc_key.as_bytes())
        .map_err(|_| BAD_MESSAGE_CHECK)?;
    if key.len() != cipher.key_len() {
        return Err(BAD_MESSAGE_CHECK);
    }
    let data = encrypted.encrypted_content.as_ref().ok_or(BAD_MESSAGE_CHECK)?;
    let plain = cipher.decrypt(&key, &iv, data.as_bytes()).ok_or(BAD_MESSAGE_CHECK)?;
    Ok((plain, cipher))
}

/// ContentInfo(EnvelopedData) holding `content` for the RSA key of `recipient`.
fn seal(content: &[u8], recipient: &Certificate, cipher: ScepCipher) -> Result<Vec<u8>, String> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    let spki = &recipient.tbs_certificate.subject_public_key_info;
    let bits = spki.subject_public_key.as_bytes().ok_or("the recipient key is not whole bytes")?;
    let public = rsa::RsaPublicKey::from_pkcs1_der(bits).map_err(|e| format!("recipient key: {e}"))?;
    let key = cipher.new_key();
    let iv = util::random_bytes(cipher.block_len());
    let encrypted = cipher.encrypt(&key, &iv, content).ok_or("content encryption failed")?;
    let enc_key = public
        .encrypt(&mut rand_core::OsRng, rsa::Pkcs1v15Encrypt, &key)
        .map_err(|e| format!("RSA key transport: {e}"))?;
    let e = |e: der::Error| e.to_string();
    let ktri = KeyTransRecipientInfo {
        version: CmsVersion::V0,
        rid: RecipientIdentifier::IssuerAndSerialNumber(issuer_and_serial(recipient)),
        key_enc_alg: AlgorithmIdentifierOwned { oid: RSA_ENCRYPTION, parameters: Some(Any::null()) },
        enc_key: OctetString::new(enc_key).map_err(e)?,
    };
    let iv = Any::encode_from(&OctetString::new(iv).map_err(e)?).map_err(e)?;
    let enveloped = EnvelopedData {
        version: CmsVersion::V0,
        originator_info: None,
        recip_infos: RecipientInfos(SetOfVec::try_from(vec![RecipientInfo::Ktri(ktri)]).map_err(e)?),
        encrypted_content: EncryptedContentInfo {
            content_type: DATA,
            content_enc_alg: AlgorithmIdentifierOwned { oid: cipher.oid(), parameters: Some(iv) },
            encrypted_content: Some(OctetString::new(encrypted).map_err(e)?),
        },
        unprotected_attrs: None,
    };
    ContentInfo { content_type: ENVELOPED_DATA, content: Any::encode_from(&enveloped).map_err(e)? }
        .to_der()
        .map_err(e)
}

/// The CertPoll content (RFC 8894 §3.3.3): `IssuerAndSubject ::= SEQUENCE { issuer Name,
/// subject Name }`, both as DER.
fn issuer_and_subject(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut reader = SliceReader::new(der).ok()?;
    let (issuer, subject) = reader
        .sequence(|inner| {
            let issuer = Name::decode(inner)?;
            let subject = Name::decode(inner)?;
            Ok((issuer, subject))
        })
        .ok()?;
    if !reader.is_finished() {
        return None;
    }
    Some((issuer.to_der().ok()?, subject.to_der().ok()?))
}

/// What a PKIOperation is answered with.
enum Verdict {
    /// SUCCESS: `leaf` encrypted to `recipient`, the answer shaped by an answer-phase `fault`.
    Success {
        leaf: Vec<u8>,
        recipient: Box<Certificate>,
        fault: Option<Fault>,
    },
    /// PENDING (`forever`: the `pending-forever` fault holds the transaction).
    Pending {
        forever: bool,
    },
    Failure(u8),
}

fn attribute(oid: ObjectIdentifier, value: Any) -> Result<Attribute, String> {
    Ok(Attribute { oid, values: SetOfVec::try_from(vec![value]).map_err(|e| e.to_string())? })
}

fn printable(text: &str) -> Result<Any, String> {
    Ok(Any::from(PrintableStringRef::new(text).map_err(|e| e.to_string())?))
}

fn octets(bytes: &[u8]) -> Result<Any, String> {
    Any::encode_from(&OctetString::new(bytes).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

/// The CertRep (RFC 8894 §3.3.2) answering `msg`, signed by the CA with SHA-256.
fn cert_rep(
    ca: &ScepCa,
    msg: &Incoming,
    status: u8,
    fail_info: Option<u8>,
    envelope: Option<Vec<u8>>,
    fault: Option<Fault>,
) -> Result<Vec<u8>, String> {
    let e = |e: der::Error| e.to_string();
    let content = envelope.unwrap_or_default();
    let recipient_nonce = match fault {
        Some(Fault::ScepWrongNonce) => util::random_bytes(msg.sender_nonce.len().max(16)),
        _ => msg.sender_nonce.clone(),
    };
    let mut attributes = vec![
        attribute(CONTENT_TYPE, Any::encode_from(&DATA).map_err(e)?)?,
        attribute(MESSAGE_DIGEST, octets(ring::digest::digest(&ring::digest::SHA256, &content).as_ref())?)?,
        attribute(MESSAGE_TYPE, printable(&CERT_REP.to_string())?)?,
        attribute(PKI_STATUS, printable(&status.to_string())?)?,
        attribute(TRANSACTION_ID, msg.transaction_id.clone())?,
        attribute(RECIPIENT_NONCE, octets(&recipient_nonce)?)?,
        attribute(SENDER_NONCE, octets(&util::random_bytes(16))?)?,
    ];
    if let Some(info) = fail_info {
        attributes.push(attribute(FAIL_INFO, printable(&info.to_string())?)?);
    }
    let signed_attrs = SetOfVec::try_from(attributes).map_err(e)?;
    let mut signature = ca.sign_sha256(&signed_attrs.to_der().map_err(e)?)?;
    if fault == Some(Fault::ScepBadSignature) {
        let last = signature.len() - 1;
        signature[last] ^= 0x01;
    }
    let sha256 = AlgorithmIdentifierOwned { oid: SHA256, parameters: None };
    let signer_info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(ca.issuer_and_serial()),
        digest_alg: sha256.clone(),
        signed_attrs: Some(signed_attrs),
        signature_algorithm: AlgorithmIdentifierOwned { oid: RSA_ENCRYPTION, parameters: Some(Any::null()) },
        signature: OctetString::new(signature).map_err(e)?,
        unsigned_attrs: None,
    };
    let econtent = if content.is_empty() { None } else { Some(octets(&content)?) };
    let signed = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![sha256]).map_err(e)?,
        encap_content_info: EncapsulatedContentInfo { econtent_type: DATA, econtent },
        certificates: Some(CertificateSet(
            SetOfVec::try_from(vec![CertificateChoices::Certificate(ca.cert.clone())]).map_err(e)?,
        )),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![signer_info]).map_err(e)?),
    };
    ContentInfo { content_type: SIGNED_DATA, content: Any::encode_from(&signed).map_err(e)? }
        .to_der()
        .map_err(e)
}

impl Shared {
    fn scep_ca(&self) -> Result<Arc<ScepCa>, String> {
        lock(&self.scep).ca()
    }

    pub(crate) fn scep(&self, req: &Request) -> Response {
        let get = req.method == "GET";
        match req.query_param("operation") {
            Some("GetCACaps") if get => {
                let caps: String = lock(&self.scep).caps.iter().map(|c| format!("{c}\n")).collect();
                Response::text(200, &caps)
            }
            Some("GetCACert") if get => match self.scep_ca() {
                Ok(ca) => Response::new(200)
                    .header("Content-Type", "application/x-x509-ca-cert")
                    .body(ca.authority.der().to_vec()),
                Err(e) => Response::text(500, &format!("no SCEP CA: {e}")),
            },
            Some("PKIOperation") if req.method == "POST" => self.scep_pki_operation(req, &req.body),
            Some("PKIOperation") if get => {
                // A lax client may leave '+' unescaped, which form decoding made a space.
                let message = req.query_param("message").unwrap_or_default().replace(' ', "+");
                match crate::est::decode_base64(message.as_bytes()) {
                    Ok(der) => self.scep_pki_operation(req, &der),
                    Err(e) => Response::text(400, &format!("message= is not base64: {e}")),
                }
            }
            Some("GetCACaps" | "GetCACert" | "PKIOperation") => Response::text(405, "method not allowed"),
            Some(other) => Response::text(400, &format!("unsupported operation {other}")),
            None => Response::text(400, "operation= is missing"),
        }
    }

    fn scep_pki_operation(&self, req: &Request, body: &[u8]) -> Response {
        let ca = match self.scep_ca() {
            Ok(ca) => ca,
            Err(e) => return Response::text(500, &format!("no SCEP CA: {e}")),
        };
        let msg = match Incoming::parse(body) {
            Ok(msg) => msg,
            Err(e) => return Response::text(400, &format!("not a SCEP pkiMessage: {e}")),
        };
        let index = {
            let mut state = lock(&self.scep);
            state.messages.push(ScepMessage {
                method: req.method.clone(),
                message_type: msg.message_type,
                transaction_id: msg.transaction_text.clone(),
                cipher: None,
                status: None,
                fail_info: None,
            });
            state.messages.len() - 1
        };
        let ep = if msg.message_type == CERT_POLL { Endpoint::ScepCertPoll } else { Endpoint::ScepRequest };
        let (verdict, early) = match self.take_fault(ep, Phase::Early) {
            Some(Fault::RejectAuth) => (Verdict::Failure(BAD_REQUEST), Some(Fault::RejectAuth)),
            Some(f) => {
                return self
                    .generic_fault(f, false)
                    .unwrap_or_else(|| tag(Response::text(500, &format!("fault {f} has no SCEP form")), f))
            }
            None => (self.scep_decide(&ca, &msg, ep, index), None),
        };
        let (status, fail_info) = match &verdict {
            Verdict::Success { .. } => (SUCCESS, None),
            Verdict::Pending { .. } => (PENDING, None),
            Verdict::Failure(info) => (FAILURE, Some(*info)),
        };
        let (envelope, fault, forever) = match verdict {
            Verdict::Success { leaf, recipient, fault } => {
                let cipher = lock(&self.scep).reply_cipher;
                let certs = crate::est::certs_only(&[&leaf], false, true);
                match seal(&certs, &recipient, cipher) {
                    Ok(envelope) => (Some(envelope), fault, false),
                    Err(e) => return Response::text(500, &format!("cannot encrypt the answer: {e}")),
                }
            }
            Verdict::Pending { forever } => (None, None, forever),
            Verdict::Failure(_) => (None, None, false),
        };
        let der = match cert_rep(&ca, &msg, status, fail_info, envelope, fault) {
            Ok(der) => der,
            Err(e) => return Response::text(500, &format!("cannot build the CertRep: {e}")),
        };
        if let Some(message) = lock(&self.scep).messages.get_mut(index) {
            message.status = Some(status);
            message.fail_info = fail_info;
        }
        let response = Response::new(200).header("Content-Type", "application/x-pki-message").body(der);
        let response = if forever { tag(response, Fault::PendingForever) } else { response };
        match early {
            Some(f) => tag(response, f),
            // Body damage (malformed, truncated) or a tag for the faults cert_rep applied.
            None => answer_fault(fault, response),
        }
    }

    /// Verifies and decrypts `msg`, then decides its answer (issuing when it is SUCCESS).
    fn scep_decide(&self, ca: &ScepCa, msg: &Incoming, ep: Endpoint, index: usize) -> Verdict {
        let signer = match msg.verify() {
            Ok(cert) => cert,
            Err(info) => return Verdict::Failure(info),
        };
        let (plain, cipher) = match open_envelope(ca, &msg.content) {
            Ok(opened) => opened,
            Err(info) => return Verdict::Failure(info),
        };
        if let Some(message) = lock(&self.scep).messages.get_mut(index) {
            message.cipher = Some(cipher);
        }
        let result = match msg.message_type {
            PKCS_REQ | RENEWAL_REQ => self.scep_request(ca, msg, &signer, &plain),
            CERT_POLL => self.scep_cert_poll(ca, msg, &signer, &plain, ep),
            _ => Err(BAD_REQUEST),
        };
        result.unwrap_or_else(Verdict::Failure)
    }

    /// PKCSReq and RenewalReq (RFC 8894 §3.3.1).
    fn scep_request(
        &self,
        ca: &ScepCa,
        msg: &Incoming,
        signer: &Certificate,
        plain: &[u8],
    ) -> Result<Verdict, u8> {
        let csr = pki::parse_csr(plain).map_err(|_| BAD_REQUEST)?;
        let signer_spki = spki_der(signer);
        let challenge_ok =
            |password: &Option<String>| password.as_deref() == Some(self.scep_cfg.challenge.as_str());
        if msg.message_type == PKCS_REQ {
            // §2.3: without a certificate, the requester signs under a self-signed one for the
            // key being certified.
            let tbs = &signer.tbs_certificate;
            if tbs.issuer != tbs.subject || signer_spki != csr.spki_der {
                return Err(BAD_REQUEST);
            }
            if !challenge_ok(&csr.challenge_password) {
                return Err(BAD_REQUEST);
            }
        } else {
            let der = signer.to_der().map_err(|_| BAD_CERT_ID)?;
            if crate::est::issued_by(&der, &ca.authority) != Ok(true) {
                return Err(BAD_CERT_ID);
            }
            // §2.3: the current certificate authenticates a renewal; a challenge is optional,
            // but a wrong one is still refused.
            if csr.challenge_password.is_some() && !challenge_ok(&csr.challenge_password) {
                return Err(BAD_REQUEST);
            }
        }
        let forever =
            self.take_fault(Endpoint::ScepRequest, Phase::Authenticated) == Some(Fault::PendingForever);
        let polls = lock(&self.scep).pending_polls;
        if forever || polls > 0 {
            let remaining = if forever { None } else { Some(polls) };
            let transaction = Transaction { csr, signer_spki, remaining, issued: None };
            lock(&self.scep).transactions.insert(msg.transaction_text.clone(), transaction);
            return Ok(Verdict::Pending { forever });
        }
        let fault = self.take_fault(Endpoint::ScepRequest, Phase::Answer);
        let leaf = self.scep_issue(ca, &csr, fault)?;
        let transaction = Transaction { csr, signer_spki, remaining: Some(0), issued: Some(leaf.clone()) };
        if fault.is_none() {
            lock(&self.scep).transactions.insert(msg.transaction_text.clone(), transaction);
        }
        Ok(Verdict::Success { leaf, recipient: Box::new(signer.clone()), fault })
    }

    /// CertPoll (RFC 8894 §3.3.3) for a kept transaction.
    fn scep_cert_poll(
        &self,
        ca: &ScepCa,
        msg: &Incoming,
        signer: &Certificate,
        plain: &[u8],
        ep: Endpoint,
    ) -> Result<Verdict, u8> {
        let (issuer, subject) = issuer_and_subject(plain).ok_or(BAD_REQUEST)?;
        let ca_subject = ca.cert.tbs_certificate.subject.to_der().map_err(|_| BAD_REQUEST)?;
        let (csr, issued) = {
            let mut state = lock(&self.scep);
            let transaction = state.transactions.get_mut(&msg.transaction_text).ok_or(BAD_CERT_ID)?;
            if issuer != ca_subject
                || subject != transaction.csr.subject_der
                || spki_der(signer) != transaction.signer_spki
            {
                return Err(BAD_CERT_ID);
            }
            match &mut transaction.remaining {
                None => return Ok(Verdict::Pending { forever: true }),
                Some(n) if *n > 0 => {
                    *n -= 1;
                    return Ok(Verdict::Pending { forever: false });
                }
                Some(_) => (transaction.csr.clone(), transaction.issued.clone()),
            }
        };
        let fault = self.take_fault(ep, Phase::Answer);
        let leaf = match (issued, fault) {
            (Some(leaf), None) => leaf,
            _ => {
                let leaf = self.scep_issue(ca, &csr, fault)?;
                if fault.is_none() {
                    if let Some(transaction) = lock(&self.scep).transactions.get_mut(&msg.transaction_text) {
                        transaction.issued = Some(leaf.clone());
                    }
                }
                leaf
            }
        };
        Ok(Verdict::Success { leaf, recipient: Box::new(signer.clone()), fault })
    }

    /// A certificate for `csr` from the SCEP CA (a faulty one for `wrong-key-cert` and
    /// `expired-cert`; only correct ones are recorded as issued).
    fn scep_issue(&self, ca: &ScepCa, csr: &ParsedCsr, fault: Option<Fault>) -> Result<Vec<u8>, u8> {
        let leaf_fault = match fault {
            Some(Fault::WrongKeyCert) => LeafFault::WrongKey,
            Some(Fault::ExpiredCert) => LeafFault::Expired,
            _ => LeafFault::None,
        };
        let issued =
            pki::issue_leaf(csr, &ca.authority, &LeafProfile::device(self.scep_cfg.valid_days), leaf_fault)
                .map_err(|_| BAD_REQUEST)?;
        if fault.is_none() {
            self.record_issued(&issued.der);
        }
        Ok(issued.der)
    }
}
