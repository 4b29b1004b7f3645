//! PKCS#10 certificate requests (RFC 2986), built with x509-cert and signed by the device key
//! (design.md §5 rule 1: the provider signs, proving possession).

use der::asn1::{
    Any, BitString, Ia5String, ObjectIdentifier, OctetString, PrintableStringRef, SetOfVec, Utf8StringRef,
};
use der::{Decode, Encode};
use enroll_hal::{DeviceKey, SignatureScheme};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::Extension;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::request::{CertReq, CertReqInfo, ExtensionReq, Version};

use crate::config::{Sans, Subject, SubjectAttribute};
use crate::error::{Context, Error, Result};

pub const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
pub const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

/// A signed request, in the two forms CAs want.
pub struct Csr {
    pub der: Vec<u8>,
    pub pem: String,
}

/// Builds and signs a CSR for `subject` and `sans` with `key`.
pub fn build(key: &dyn DeviceKey, subject: &Subject, sans: &Sans) -> Result<Csr> {
    let info = request_info(key, subject, sans)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use enroll_hal::{Algorithm, KeyProvider};

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
        std::fs::remove_dir_all(&slot).unwrap();
    }
}
