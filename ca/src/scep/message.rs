//! The SCEP pkiMessage (RFC 8894 §3.2): CMS SignedData whose content is an EnvelopedData (the
//! request, encrypted to the CA) and whose signed attributes carry the SCEP fields.
//!
//! Outgoing: PKCSReq, RenewalReq and CertPoll, signed by the device key with SHA-256 under the
//! self-signed or current certificate. Incoming: CertRep, whose signature is checked against the
//! CA or RA certificate that `GetCACert` returned (pinned by fingerprint) before anything in it
//! is believed, and whose transactionID and recipientNonce must answer our request.

use cms::cert::IssuerAndSerialNumber;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{EncapsulatedContentInfo, SignerIdentifier, SignerInfo};
use der::asn1::{Any, ContextSpecific, ObjectIdentifier, OctetString, PrintableStringRef, SetOfVec};
use der::{Decode, Encode, TagMode, TagNumber};
use enroll_hal::{DeviceKey, SignatureScheme};
use spki::AlgorithmIdentifierOwned;
use x509_cert::attr::Attribute;

use crate::error::{Error, Kind, Result};
use crate::pki::Cert;

pub const DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
pub const SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
pub const ENVELOPED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.3");
const CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
// The SCEP attributes (RFC 8894 §3.2.1, under id-VeriSign 2.16.840.1.113733.1.9).
const MESSAGE_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.2");
const PKI_STATUS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.3");
const FAIL_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.4");
const SENDER_NONCE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.5");
const RECIPIENT_NONCE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.6");
const TRANSACTION_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.7");

/// The messageType values we send and read (RFC 8894 §3.2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    CertRep = 3,
    RenewalReq = 17,
    PkcsReq = 19,
    CertPoll = 20,
}

/// The certificate and key that sign a request: a self-signed certificate for the new key
/// (PKCSReq, RFC 8894 §2.3), or the current identity (RenewalReq).
pub struct Signer<'a> {
    pub cert: &'a Cert,
    pub key: &'a dyn DeviceKey,
}

/// A request ready to send, and the nonce its answer must echo.
pub struct Outgoing {
    pub der: Vec<u8>,
    pub sender_nonce: [u8; 16],
}

/// What a CertRep said (RFC 8894 §3.3.2).
#[derive(Debug)]
pub enum Answer {
    /// SUCCESS: the ContentInfo(EnvelopedData) holding the certs-only reply.
    Success(Vec<u8>),
    Pending,
    /// FAILURE, with the failInfo number if the CA gave one.
    Failure(Option<u8>),
}

fn internal(what: &'static str) -> impl Fn(der::Error) -> Error {
    move |e| Error::new(Kind::Internal, format!("SCEP message: {what}: {e}"))
}

/// `value` as an ASN.1 element of its own type, to assemble a SEQUENCE field by field.
pub fn any(value: &impl Encode, what: &'static str) -> Result<Any> {
    let der = value.to_der().and_then(|der| Any::from_der(&der));
    der.map_err(|e| Error::new(Kind::Internal, format!("SCEP: encoding {what}: {e}")))
}

pub fn issuer_and_serial(cert: &Cert) -> IssuerAndSerialNumber {
    IssuerAndSerialNumber {
        issuer: cert.parsed.tbs_certificate.issuer.clone(),
        serial_number: cert.parsed.tbs_certificate.serial_number.clone(),
    }
}

fn attribute(oid: ObjectIdentifier, value: Any) -> Result<Attribute> {
    Ok(Attribute { oid, values: SetOfVec::try_from(vec![value]).map_err(internal("attribute"))? })
}

fn printable(text: &str) -> Result<Any> {
    Ok(Any::from(PrintableStringRef::new(text).map_err(internal("PrintableString"))?))
}

fn octets(bytes: &[u8]) -> Result<Any> {
    Any::encode_from(&OctetString::new(bytes).map_err(internal("OCTET STRING"))?)
        .map_err(internal("OCTET STRING"))
}

/// Signs `envelope` (a ContentInfo(EnvelopedData) DER) as a `kind` message of `transaction_id`.
pub fn sign(kind: MessageType, transaction_id: &str, envelope: &[u8], signer: &Signer) -> Result<Outgoing> {
    let mut sender_nonce = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut sender_nonce)
        .map_err(|_| Error::new(Kind::Internal, "the system random generator failed"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, envelope);
    let content_type = Any::encode_from(&DATA).map_err(internal("contentType"))?;
    let attributes = vec![
        attribute(CONTENT_TYPE, content_type)?,
        attribute(MESSAGE_DIGEST, octets(digest.as_ref())?)?,
        attribute(MESSAGE_TYPE, printable(&(kind as u8).to_string())?)?,
        attribute(TRANSACTION_ID, printable(transaction_id)?)?,
        attribute(SENDER_NONCE, octets(&sender_nonce)?)?,
    ];
    let signed_attrs = SetOfVec::try_from(attributes).map_err(internal("signed attributes"))?;
    // RFC 5652 §5.4: the signature covers the attributes' DER with the SET OF tag.
    let to_sign = signed_attrs.to_der().map_err(internal("signed attributes"))?;
    let signature = signer.key.sign(SignatureScheme::RsaPkcs1Sha256, &to_sign)?;
    let sha256 = AlgorithmIdentifierOwned { oid: SHA256, parameters: None };
    let signer_info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(issuer_and_serial(signer.cert)),
        digest_alg: sha256.clone(),
        signed_attrs: Some(signed_attrs),
        signature_algorithm: AlgorithmIdentifierOwned { oid: SHA256_WITH_RSA, parameters: Some(Any::null()) },
        signature: OctetString::new(signature).map_err(internal("signature"))?,
        unsigned_attrs: None,
    };
    // SignedData (RFC 5652 §5.1) field by field: cms's own SignedData type would link the
    // encoders of every CertificateChoices and RevocationInfoChoice kind (issue 13).
    let certificate = Any::from_der(&signer.cert.der).map_err(internal("certificate"))?;
    let certificates = ContextSpecific {
        tag_number: TagNumber::N0,
        tag_mode: TagMode::Implicit,
        value: SetOfVec::try_from(vec![certificate]).map_err(internal("certificates"))?,
    };
    let encapsulated = EncapsulatedContentInfo { econtent_type: DATA, econtent: Some(octets(envelope)?) };
    let signed: Vec<Any> = vec![
        any(&CmsVersion::V1, "version")?,
        any(&SetOfVec::try_from(vec![sha256]).map_err(internal("digestAlgorithms"))?, "digestAlgorithms")?,
        any(&encapsulated, "encapContentInfo")?,
        any(&certificates, "certificates")?,
        any(&SetOfVec::try_from(vec![signer_info]).map_err(internal("signerInfos"))?, "signerInfos")?,
    ];
    let info = ContentInfo { content_type: SIGNED_DATA, content: any(&signed, "SignedData")? };
    Ok(Outgoing { der: info.to_der().map_err(internal("ContentInfo"))?, sender_nonce })
}

/// What a CertRep must answer: our transaction and nonce, signed by one of `ca_certs`.
pub struct Expected<'a> {
    pub transaction_id: &'a str,
    pub sender_nonce: &'a [u8],
    pub ca_certs: &'a [Cert],
}

/// Reads and authenticates a CertRep.
pub fn read_cert_rep(der: &[u8], expected: &Expected) -> Result<Answer> {
    let (signer_info, content) = decode_cert_rep(der)?;
    let as_sent = crate::pkcs7::signed_attributes(der).ok().flatten();
    let attributes =
        verify_signer(&signer_info, as_sent, content.as_deref().unwrap_or_default(), expected.ca_certs)?;
    answer_of(&attributes, content, expected)
}

/// The one SignerInfo of a CertRep and its content (the encrypted reply), not yet verified.
fn decode_cert_rep(der: &[u8]) -> Result<(SignerInfo, Option<Vec<u8>>)> {
    let malformed = |what: String| Error::protocol(format!("SCEP CertRep: {what}"));
    let signed = crate::pkcs7::signed(der).map_err(|e| malformed(format!("not a CMS message ({e})")))?;
    let [signer_info] = signed.signer_infos.as_slice() else {
        return Err(malformed(format!("{} signers instead of one", signed.signer_infos.len())));
    };
    let signer_info = SignerInfo::from_der(signer_info)
        .map_err(|e| malformed(format!("the SignerInfo does not parse ({e})")))?;
    Ok((signer_info, signed.content))
}

/// What the verified attributes say, checked against our request.
fn answer_of(attributes: &Attributes, content: Option<Vec<u8>>, expected: &Expected) -> Result<Answer> {
    let malformed = |what: String| Error::protocol(format!("SCEP CertRep: {what}"));
    let message_type = attributes.printable(MESSAGE_TYPE, "messageType")?;
    if message_type != (MessageType::CertRep as u8).to_string() {
        return Err(malformed(format!(
            "messageType {}, not CertRep (3)",
            crate::error::sanitize(&message_type, 20)
        )));
    }
    let transaction_id = attributes.printable(TRANSACTION_ID, "transactionID")?;
    if transaction_id != expected.transaction_id {
        return Err(malformed(format!(
            "the answer is for transaction {}, not ours",
            crate::error::sanitize(&transaction_id, 80)
        )));
    }
    if attributes.octets(RECIPIENT_NONCE, "recipientNonce")? != expected.sender_nonce {
        return Err(malformed("the recipientNonce is not the nonce we sent (a replayed answer?)".into()));
    }
    match attributes.printable(PKI_STATUS, "pkiStatus")?.as_str() {
        "0" => content
            .map(Answer::Success)
            .ok_or_else(|| malformed("SUCCESS without the encrypted certificates".into())),
        "3" => Ok(Answer::Pending),
        "2" => {
            let fail_info = attributes.find(FAIL_INFO).and_then(|a| a.decode_as::<PrintableStringRef>().ok());
            Ok(Answer::Failure(fail_info.and_then(|f| f.as_str().parse().ok())))
        }
        other => Err(malformed(format!("unknown pkiStatus {}", crate::error::sanitize(other, 20)))),
    }
}

/// For the fuzz target: everything [`read_cert_rep`] reads, without the signature check (which
/// random input never passes). The transaction and nonce are taken from the message itself, so
/// the status branches are reached.
#[cfg(fuzzing)]
pub fn read_cert_rep_unverified(der: &[u8]) -> Result<Answer> {
    let (signer_info, content) = decode_cert_rep(der)?;
    let attributes =
        Attributes(signer_info.signed_attrs.iter().flat_map(|set| set.iter().cloned()).collect());
    let transaction_id = attributes.printable(TRANSACTION_ID, "transactionID").unwrap_or_default();
    let nonce = attributes.octets(RECIPIENT_NONCE, "recipientNonce").unwrap_or_default();
    let expected = Expected { transaction_id: &transaction_id, sender_nonce: &nonce, ca_certs: &[] };
    answer_of(&attributes, content, &expected)
}

/// The signed attributes of a SignerInfo whose signature verified.
struct Attributes(Vec<Attribute>);

impl Attributes {
    fn find(&self, oid: ObjectIdentifier) -> Option<&Any> {
        self.0.iter().find(|a| a.oid == oid).and_then(|a| a.values.iter().next())
    }

    fn printable(&self, oid: ObjectIdentifier, name: &str) -> Result<String> {
        self.find(oid)
            .and_then(|v| v.decode_as::<PrintableStringRef>().ok())
            .map(|s| s.as_str().to_string())
            .ok_or_else(|| Error::protocol(format!("SCEP CertRep: no {name} PrintableString attribute")))
    }

    fn octets(&self, oid: ObjectIdentifier, name: &str) -> Result<Vec<u8>> {
        self.find(oid)
            .and_then(|v| v.decode_as::<OctetString>().ok())
            .map(OctetString::into_bytes)
            .ok_or_else(|| Error::protocol(format!("SCEP CertRep: no {name} OCTET STRING attribute")))
    }
}

/// Checks that one of `ca_certs` signed `signer_info` over `content`; answers its attributes.
/// `as_sent`: the signed attributes in the order the CA sent them, tried before their DER
/// re-encoding (which is what RFC 5652 §5.4 says is signed; servers sign what they send).
fn verify_signer(
    signer_info: &SignerInfo,
    as_sent: Option<Vec<u8>>,
    content: &[u8],
    ca_certs: &[Cert],
) -> Result<Attributes> {
    let refused = |what: &str| Error::protocol(format!("SCEP CertRep: {what}"));
    let signer = ca_certs
        .iter()
        .find(|cert| match &signer_info.sid {
            SignerIdentifier::IssuerAndSerialNumber(id) => {
                id.issuer == cert.parsed.tbs_certificate.issuer
                    && id.serial_number == cert.parsed.tbs_certificate.serial_number
            }
            SignerIdentifier::SubjectKeyIdentifier(ski) => {
                subject_key_id(cert).is_some_and(|own| own == ski.0.as_bytes())
            }
        })
        .ok_or_else(|| refused("signed by a certificate that is not the pinned CA or its RA"))?;
    let Some(signed_attrs) = &signer_info.signed_attrs else {
        return Err(refused("the signature covers no attributes"));
    };
    let (algorithm, digest): (&'static dyn ring::signature::VerificationAlgorithm, _) =
        match signer_info.digest_alg.oid {
            SHA1 => (
                &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            ),
            SHA256 => (&ring::signature::RSA_PKCS1_2048_8192_SHA256, &ring::digest::SHA256),
            SHA512 => (&ring::signature::RSA_PKCS1_2048_8192_SHA512, &ring::digest::SHA512),
            other => return Err(refused(&format!("signed with an unknown digest {other}"))),
        };
    let public_key = signer
        .parsed
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| refused("the signer's key is malformed"))?;
    let der = signed_attrs.to_der().map_err(|e| refused(&format!("attributes do not encode ({e})")))?;
    let key = ring::signature::UnparsedPublicKey::new(algorithm, public_key);
    let signature = signer_info.signature.as_bytes();
    if !as_sent.into_iter().chain([der]).any(|signed| key.verify(&signed, signature).is_ok()) {
        return Err(refused("the signature does not verify with the CA's key"));
    }
    let attributes = Attributes(signed_attrs.iter().cloned().collect());
    // RFC 5652 §11.2: the signed digest of the content.
    let digest_of_content = ring::digest::digest(digest, content);
    if attributes.octets(MESSAGE_DIGEST, "messageDigest")? != digest_of_content.as_ref() {
        return Err(refused("the messageDigest does not match the content"));
    }
    Ok(attributes)
}

fn subject_key_id(cert: &Cert) -> Option<Vec<u8>> {
    use x509_cert::ext::pkix::SubjectKeyIdentifier;
    let extensions = cert.parsed.tbs_certificate.extensions.as_ref()?;
    let extension =
        extensions.iter().find(|e| e.extn_id == x509_cert::ext::pkix::ID_CE_SUBJECT_KEY_IDENTIFIER)?;
    SubjectKeyIdentifier::from_der(extension.extn_value.as_bytes()).ok().map(|s| s.0.into_bytes())
}

/// The CertPoll content (RFC 8894 §3.3.3): IssuerAndSubject { CA name, our subject }.
pub fn issuer_and_subject(ca: &Cert, subject: &x509_cert::name::Name) -> Result<Vec<u8>> {
    let issuer = ca.parsed.tbs_certificate.subject.to_der().map_err(internal("issuer"))?;
    let subject = subject.to_der().map_err(internal("subject"))?;
    let length = der::Length::try_from(issuer.len() + subject.len()).map_err(internal("length"))?;
    let mut out = der::Header::new(der::Tag::Sequence, length)
        .and_then(|h| h.to_der())
        .map_err(internal("IssuerAndSubject"))?;
    out.extend_from_slice(&issuer);
    out.extend_from_slice(&subject);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// micromdm scepserver 2.1.0's real answers (tests/fuzz/corpus/scep, after the selector byte).
    const CERT_REP: &[u8] = include_bytes!("../../../tests/fuzz/corpus/scep/certrep-success-micromdm");
    const CA_CERT: &[u8] = include_bytes!("../../../tests/fuzz/corpus/scep/getcacert-micromdm");

    fn expected_of(der: &[u8]) -> (String, Vec<u8>) {
        let (signer_info, _) = decode_cert_rep(der).unwrap();
        let attributes = Attributes(signer_info.signed_attrs.unwrap().iter().cloned().collect());
        (
            attributes.printable(TRANSACTION_ID, "transactionID").unwrap(),
            attributes.octets(RECIPIENT_NONCE, "recipientNonce").unwrap(),
        )
    }

    #[test]
    fn a_real_micromdm_cert_rep_verifies_and_any_change_to_it_is_refused() {
        let (der, ca) = (&CERT_REP[1..], vec![Cert::from_der(&CA_CERT[1..]).unwrap()]);
        let (tid, nonce) = expected_of(der);
        let expected = Expected { transaction_id: &tid, sender_nonce: &nonce, ca_certs: &ca };
        assert!(matches!(read_cert_rep(der, &expected).unwrap(), Answer::Success(_)));
        // The attributes as sent are what micromdm signed (here also their DER form).
        let as_sent = crate::pkcs7::signed_attributes(der).unwrap().unwrap();
        let (signer_info, _) = decode_cert_rep(der).unwrap();
        assert_eq!(as_sent, signer_info.signed_attrs.unwrap().to_der().unwrap());

        let other_nonce = [0u8; 16];
        let replayed = Expected { sender_nonce: &other_nonce, ..expected };
        assert!(read_cert_rep(der, &replayed).unwrap_err().to_string().contains("recipientNonce"));
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let key = enroll_hal::soft::SoftKey::from_pkcs8(pkcs8.as_ref()).unwrap();
        let other = crate::pki::self_signed(&key, ca[0].parsed.tbs_certificate.subject.clone(), vec![], 60);
        let wrong_ca = [Cert::from_der(&other.unwrap()).unwrap()];
        let stranger = Expected { ca_certs: &wrong_ca, ..expected };
        assert!(read_cert_rep(der, &stranger).unwrap_err().to_string().contains("not the pinned CA"));
        // One flipped bit in the signed content fails the messageDigest; one in the signature
        // (the SignerInfo ends the message) fails the signature. (The certificates the message
        // carries are not signed and not used: the signer must be the pinned CA.)
        let content = crate::pkcs7::signed(der).unwrap().content.unwrap();
        let start = der.windows(content.len()).position(|w| w == content.as_slice()).unwrap();
        for at in [start + content.len() / 2, der.len() - 1] {
            let mut changed = der.to_vec();
            changed[at] ^= 1;
            assert!(read_cert_rep(&changed, &expected).is_err(), "bit flipped at {at}");
        }
    }
}
