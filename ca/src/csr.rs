//! PKCS#10 certificate requests (RFC 2986), built with x509-cert and signed by the device key
//! (design.md §5 rule 1: the provider signs, proving possession).

use der::asn1::{
    Any, BitString, Ia5String, ObjectIdentifier, OctetString, PrintableStringRef, SetOfVec, Utf8StringRef,
};
use der::{Decode, Encode};
use enroll_hal::{Algorithm, DeviceKey, SignatureScheme};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::Extension;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::request::{CertReq, CertReqInfo, ExtensionReq, Version};

use crate::error::{Context, Error, Result};
use crate::subject::{Sans, Subject, SubjectAttribute};

pub const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
pub const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

/// A signed request, in the two forms CAs want.
pub struct Csr {
    pub der: Vec<u8>,
    pub pem: String,
}

/// Builds and signs a CSR for `subject` and `sans` with `key`.
pub fn build(key: &dyn DeviceKey, subject: &Subject, sans: &Sans) -> Result<Csr> {
    sign(key, request_info(key, subject, sans)?)
}

/// As [`build`], with a challengePassword attribute (RFC 2985 §5.4.1), which SCEP's PKCSReq
/// carries (RFC 8894 §2.2): a PrintableString where the password allows, else UTF8String.
#[cfg(feature = "scep")]
pub fn build_with_challenge(
    key: &dyn DeviceKey,
    subject: &Subject,
    sans: &Sans,
    password: &str,
) -> Result<Csr> {
    const CHALLENGE_PASSWORD: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.7");
    let mut info = request_info(key, subject, sans)?;
    let value = match PrintableStringRef::new(password) {
        Ok(printable) => Any::from(printable),
        Err(_) => Any::from(Utf8StringRef::new(password).map_err(der_error)?),
    };
    let attribute = x509_cert::attr::Attribute {
        oid: CHALLENGE_PASSWORD,
        values: SetOfVec::try_from(vec![value]).map_err(der_error)?,
    };
    info.attributes.insert(attribute).map_err(der_error)?;
    sign(key, info)
}

fn sign(key: &dyn DeviceKey, info: CertReqInfo) -> Result<Csr> {
    let tbs = info.to_der().map_err(der_error)?;
    let scheme = key.algorithm().default_scheme();
    let signature = key.sign(scheme, &tbs).context("signing the CSR with the device key")?;
    let request = CertReq {
        info,
        algorithm: signature_algorithm(scheme),
        signature: BitString::from_bytes(&signature).map_err(der_error)?,
    };
    let der = request.to_der().map_err(der_error)?;
    let pem = pem::encode_config(
        &pem::Pem::new("CERTIFICATE REQUEST", der.clone()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    Ok(Csr { der, pem })
}

/// What a CSR for `key`, `subject` and `sans` asks for (the part the signature covers).
fn request_info(key: &dyn DeviceKey, subject: &Subject, sans: &Sans) -> Result<CertReqInfo> {
    Ok(CertReqInfo {
        version: Version::V1,
        subject: encode_name(subject)?,
        public_key: SubjectPublicKeyInfoOwned::from_der(key.public_key_spki())
            .map_err(|e| Error::new(crate::error::Kind::Internal, format!("device key SPKI: {e}")))?,
        attributes: san_attributes(sans, subject)?,
    })
}

/// Whether `csr` (DER) asks exactly for `key`, `subject` and `sans`: a CSR kept from an earlier
/// run is sent again only while the configuration still asks for the same thing.
pub fn asks_for(csr: &[u8], key: &dyn DeviceKey, subject: &Subject, sans: &Sans) -> bool {
    let (Ok(kept), Ok(wanted)) = (CertReq::from_der(csr), request_info(key, subject, sans)) else {
        return false;
    };
    matches!((kept.info.to_der(), wanted.to_der()), (Ok(a), Ok(b)) if a == b)
}

/// The AlgorithmIdentifier for a signature made with `scheme` (RSA carries explicit NULL
/// parameters, ECDSA none: RFC 4055 / RFC 5758).
pub fn signature_algorithm(scheme: SignatureScheme) -> AlgorithmIdentifierOwned {
    match scheme {
        SignatureScheme::EcdsaP256Sha256 => {
            AlgorithmIdentifierOwned { oid: ECDSA_WITH_SHA256, parameters: None }
        }
        _ => AlgorithmIdentifierOwned { oid: SHA256_WITH_RSA, parameters: Some(Any::null()) },
    }
}

fn der_error(e: der::Error) -> Error {
    Error::new(crate::error::Kind::Internal, format!("DER encoding: {e}"))
}

/// One attribute per RDN, in the subject's order. Country is a PrintableString (RFC 5280
/// appendix A); everything else UTF8String.
pub fn encode_name(subject: &Subject) -> Result<Name> {
    let mut rdns = Vec::new();
    for (attribute, value) in &subject.attributes {
        let oid = ObjectIdentifier::new(attribute.oid())
            .map_err(|e| Error::new(crate::error::Kind::Internal, e.to_string()))?;
        let encoded = match attribute {
            SubjectAttribute::C | SubjectAttribute::SerialNumber => {
                PrintableStringRef::new(value).map(Any::from).map_err(|_| {
                    Error::config(format!(
                        "subject.{}: only letters, digits and ' ()+,-./:=? are allowed",
                        attribute.key()
                    ))
                })?
            }
            _ => Any::from(Utf8StringRef::new(value).map_err(der_error)?),
        };
        let set =
            SetOfVec::try_from(vec![AttributeTypeAndValue { oid, value: encoded }]).map_err(der_error)?;
        rdns.push(RelativeDistinguishedName(set));
    }
    Ok(RdnSequence(rdns))
}

/// The SAN list as GeneralNames, in a stable order (dns, ip, uri, email).
pub fn general_names(sans: &Sans) -> Result<Vec<GeneralName>> {
    let ia5 = |s: &str| Ia5String::new(s).map_err(|_| Error::config(format!("san: {s:?} is not ASCII")));
    let mut names = Vec::new();
    for dns in &sans.dns {
        names.push(GeneralName::DnsName(ia5(dns)?));
    }
    for ip in &sans.ip {
        let bytes = match ip {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        names.push(GeneralName::IpAddress(OctetString::new(bytes).map_err(der_error)?));
    }
    for uri in &sans.uri {
        names.push(GeneralName::UniformResourceIdentifier(ia5(uri)?));
    }
    for email in &sans.email {
        names.push(GeneralName::Rfc822Name(ia5(email)?));
    }
    Ok(names)
}

/// The extensionRequest attribute carrying the SAN extension (none when there are no SANs).
fn san_attributes(sans: &Sans, subject: &Subject) -> Result<SetOfVec<x509_cert::attr::Attribute>> {
    let mut attributes = SetOfVec::new();
    if sans.is_empty() {
        return Ok(attributes);
    }
    let san = SubjectAltName(general_names(sans)?).to_der().map_err(der_error)?;
    let extension = Extension {
        extn_id: const_oid_san(),
        // RFC 5280 §4.2.1.6: critical only when the subject is empty, which ours never is.
        critical: subject.attributes.is_empty(),
        extn_value: OctetString::new(san).map_err(der_error)?,
    };
    let attribute = x509_cert::attr::Attribute::try_from(ExtensionReq(vec![extension])).map_err(der_error)?;
    attributes.insert(attribute).map_err(der_error)?;
    Ok(attributes)
}

fn const_oid_san() -> ObjectIdentifier {
    x509_cert::ext::pkix::ID_CE_SUBJECT_ALT_NAME
}

/// A CSR made elsewhere (a device asking the gateway), read into what a CA request carries: its
/// self-signature checked, then its subject, SANs and key algorithm (design.md §8).
pub struct Received {
    pub csr: Csr,
    pub algorithm: Algorithm,
    pub subject: Subject,
    pub sans: Sans,
    /// The requested public key (DER SubjectPublicKeyInfo), which the issued certificate must carry.
    pub spki: Vec<u8>,
}

const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const P256_CURVE: &str = "1.2.840.10045.3.1.7";
const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const EXTENSION_REQUEST: &str = "1.2.840.113549.1.9.14";

impl Received {
    /// Parses and checks `der`; every refusal is a protocol error naming what is wrong.
    pub fn from_der(der: &[u8]) -> Result<Received> {
        let spki = crate::pki::verify_csr(der)?;
        let request =
            CertReq::from_der(der).map_err(|e| Error::protocol(format!("the CSR does not parse: {e}")))?;
        let pem = pem::encode_config(
            &pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        Ok(Received {
            algorithm: key_algorithm(&request.info.public_key)?,
            subject: subject_of(&request.info.subject)?,
            sans: sans_of(&request.info)?,
            csr: Csr { der: der.to_vec(), pem },
            spki,
        })
    }

    /// The request a [`crate::backend::CaBackend`] takes.
    pub fn request(&self) -> crate::backend::Request<'_> {
        crate::backend::Request {
            csr: &self.csr,
            key: None,
            algorithm: self.algorithm,
            subject: &self.subject,
            sans: &self.sans,
        }
    }
}

/// P-256 or RSA-2048: the two algorithms every CA client here handles.
fn key_algorithm(spki: &SubjectPublicKeyInfoOwned) -> Result<Algorithm> {
    let parameter = spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    match (spki.algorithm.oid.to_string().as_str(), parameter.map(|p| p.to_string())) {
        (EC_PUBLIC_KEY, Some(curve)) if curve == P256_CURVE => Ok(Algorithm::P256),
        (RSA_ENCRYPTION, _) if rsa_modulus_bits(spki.subject_public_key.raw_bytes()) == Some(2048) => {
            Ok(Algorithm::Rsa2048)
        }
        (oid, _) => Err(Error::protocol(format!("the CSR's key ({oid}) is neither P-256 nor RSA-2048"))),
    }
}

/// The modulus size of a PKCS#1 RSAPublicKey (`SEQUENCE { n INTEGER, e INTEGER }`).
fn rsa_modulus_bits(pkcs1: &[u8]) -> Option<usize> {
    use der::Reader;
    let mut reader = der::SliceReader::new(pkcs1).ok()?;
    let n = reader
        .sequence(|inner| {
            let n = inner.decode::<der::asn1::UintRef<'_>>()?;
            inner.decode::<der::asn1::UintRef<'_>>()?;
            Ok(n.as_bytes().len())
        })
        .ok()?;
    Some(n * 8)
}

/// The subject's attributes, in order; one this crate cannot ask a CA for is refused.
fn subject_of(name: &Name) -> Result<Subject> {
    let mut attributes = Vec::new();
    for atv in name.0.iter().flat_map(|rdn| rdn.0.iter()) {
        let oid = atv.oid.to_string();
        let Some(attribute) = SubjectAttribute::ALL.into_iter().find(|a| a.oid() == oid) else {
            return Err(Error::protocol(format!(
                "the CSR's subject carries attribute {oid}, which is not supported"
            )));
        };
        let value = directory_string(&atv.value).ok_or_else(|| {
            Error::protocol(format!("the CSR's subject {}: not a text string", attribute.key()))
        })?;
        attributes.push((attribute, value));
    }
    Ok(Subject { attributes })
}

fn directory_string(value: &Any) -> Option<String> {
    if let Ok(s) = value.decode_as::<Utf8StringRef<'_>>() {
        return Some(s.as_str().to_string());
    }
    if let Ok(s) = value.decode_as::<PrintableStringRef<'_>>() {
        return Some(s.as_str().to_string());
    }
    value.decode_as::<der::asn1::Ia5StringRef<'_>>().ok().map(|s| s.as_str().to_string())
}

/// The SANs of the extensionRequest attribute; a type other than DNS, IP, URI and email is refused.
fn sans_of(info: &CertReqInfo) -> Result<Sans> {
    let mut sans = Sans::default();
    let requested = info.attributes.iter().filter(|a| a.oid.to_string() == EXTENSION_REQUEST);
    let extensions = requested.flat_map(|a| a.values.iter()).map(|v| v.decode_as::<ExtensionReq>());
    for extensions in extensions {
        let extensions =
            extensions.map_err(|e| Error::protocol(format!("the CSR's extensionRequest: {e}")))?;
        for extension in extensions.0.iter().filter(|e| e.extn_id == const_oid_san()) {
            let names = SubjectAltName::from_der(extension.extn_value.as_bytes())
                .map_err(|e| Error::protocol(format!("the CSR's subjectAltName: {e}")))?;
            for name in names.0 {
                add_san(&mut sans, name)?;
            }
        }
    }
    Ok(sans)
}

fn add_san(sans: &mut Sans, name: GeneralName) -> Result<()> {
    match name {
        GeneralName::DnsName(dns) => sans.dns.push(dns.to_string()),
        GeneralName::UniformResourceIdentifier(uri) => sans.uri.push(uri.to_string()),
        GeneralName::Rfc822Name(email) => sans.email.push(email.to_string()),
        GeneralName::IpAddress(ip) => {
            let ip = match ip.as_bytes().len() {
                4 => <[u8; 4]>::try_from(ip.as_bytes()).map(std::net::IpAddr::from).ok(),
                16 => <[u8; 16]>::try_from(ip.as_bytes()).map(std::net::IpAddr::from).ok(),
                _ => None,
            };
            sans.ip.push(ip.ok_or_else(|| Error::protocol("the CSR's IP SAN is neither IPv4 nor IPv6"))?);
        }
        _ => return Err(Error::protocol("the CSR asks for a SAN type other than DNS, IP, URI and email")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use enroll_hal::KeyProvider;

    #[test]
    fn csr_carries_subject_sans_and_a_signature_that_verifies() {
        let slot = std::env::temp_dir().join(format!("enroll-csr-{}", std::process::id()));
        std::fs::create_dir_all(&slot).unwrap();
        let key = enroll_hal::soft::FileKeyProvider::default().generate(Algorithm::P256, &slot).unwrap();
        let subject = Subject {
            attributes: vec![(SubjectAttribute::C, "NL".into()), (SubjectAttribute::CN, "sensor-1".into())],
        };
        let sans = Sans {
            dns: vec!["a.example".into()],
            ip: vec!["10.1.2.3".parse().unwrap()],
            uri: vec!["urn:dev:1".into()],
            email: vec!["ops@example.com".into()],
        };
        let csr = build(key.as_ref(), &subject, &sans).unwrap();
        let parsed = CertReq::from_der(&csr.der).unwrap();
        assert_eq!(parsed.info.subject.to_string(), "CN=sensor-1,C=NL");
        let tbs = parsed.info.to_der().unwrap();
        let point = &key.public_key_spki()[26..];
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
            .verify(&tbs, parsed.signature.raw_bytes())
            .unwrap();
        assert!(csr.pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"));
        // A kept CSR is resent only while key, subject and SANs are still what it asks for.
        assert!(asks_for(&csr.der, key.as_ref(), &subject, &sans));
        let other_sans = Sans { dns: vec!["b.example".into()], ..sans.clone() };
        assert!(!asks_for(&csr.der, key.as_ref(), &subject, &other_sans));
        let other_key =
            enroll_hal::soft::FileKeyProvider::default().generate(Algorithm::P256, &slot).unwrap();
        assert!(!asks_for(&csr.der, other_key.as_ref(), &subject, &sans));
        assert!(!asks_for(b"garbage", key.as_ref(), &subject, &sans));
        // A CSR that arrives over the network reads back as what was asked for.
        let received = Received::from_der(&csr.der).unwrap();
        assert_eq!(
            (received.algorithm, &received.subject, &received.sans, &received.spki),
            (Algorithm::P256, &subject, &sans, &key.public_key_spki().to_vec())
        );
        assert_eq!(received.csr.pem, csr.pem);
        let mut tampered = csr.der.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let error = Received::from_der(&tampered).err().expect("a bad signature is refused");
        assert_eq!(error.kind(), crate::error::Kind::Protocol);
        std::fs::remove_dir_all(&slot).unwrap();
    }

    #[test]
    fn a_received_rsa_csr_is_rsa2048() {
        let slot = std::env::temp_dir().join(format!("enroll-csr-rsa-{}", std::process::id()));
        std::fs::create_dir_all(&slot).unwrap();
        let key = enroll_hal::soft::FileKeyProvider::default().generate(Algorithm::Rsa2048, &slot).unwrap();
        let subject = Subject { attributes: vec![(SubjectAttribute::CN, "meter-7".into())] };
        let csr = build(key.as_ref(), &subject, &Sans::default()).unwrap();
        let received = Received::from_der(&csr.der).unwrap();
        assert_eq!(
            (received.algorithm, received.subject, received.sans),
            (Algorithm::Rsa2048, subject, Sans::default())
        );
        std::fs::remove_dir_all(&slot).unwrap();
    }
}
