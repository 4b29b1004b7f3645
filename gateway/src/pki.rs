//! CSRs, certificates and the EST wire format: PKCS#10 parsing and self-signature check, the
//! subject and SAN facts the policy needs, certs-only PKCS#7 (RFC 5652 §5.1, RFC 7030 §4.1.3)
//! and base64 (RFC 8951: read with any whitespace, write unwrapped or in 76-column lines).

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use der::asn1::{Any, SetOfVec};
use der::oid::ObjectIdentifier;
use der::{Decode, Encode};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::name::Name;
use x509_cert::request::CertReq;
use x509_cert::Certificate;

const OID_CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_SERIAL_NUMBER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.5");
const OID_SAN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");
const OID_EXTENSION_REQUEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
const OID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const OID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const OID_RSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const OID_RSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const OID_RSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// A SAN entry, as far as the policy cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum San {
    Dns(String),
    /// Any other type, named (`IP address`, `email`, `URI`, …).
    Other(&'static str),
}

/// The facts of a CSR the gateway decides on.
#[derive(Clone, Debug)]
pub struct Csr {
    pub der: Vec<u8>,
    pub sha256: String,
    /// The subject Name's DER (RFC 7030 §4.2.2 compares it byte for byte).
    pub subject_der: Vec<u8>,
    /// The subject's CN values (a valid request has exactly one).
    pub cns: Vec<String>,
    /// The SubjectAltName extension's value (extnValue contents), if requested.
    pub san_der: Option<Vec<u8>>,
    pub sans: Vec<San>,
    /// The SubjectPublicKeyInfo DER (an issued certificate must carry exactly this).
    pub spki_der: Vec<u8>,
    req: CertReq,
}

fn string_value(v: &Any) -> Option<String> {
    use der::{Tag, Tagged};
    match v.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString | Tag::VisibleString => {
            std::str::from_utf8(v.value()).ok().map(str::to_owned)
        }
        _ => None,
    }
}

/// Values of one attribute type in a Name, in order.
pub fn name_values(name: &Name, oid: ObjectIdentifier) -> Vec<String> {
    name.0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|atv| atv.oid == oid)
        .map(|atv| string_value(&atv.value).unwrap_or_default())
        .collect()
}

fn parse_sans(ext_value: &[u8]) -> Result<Vec<San>, String> {
    let san = SubjectAltName::from_der(ext_value).map_err(|e| format!("subjectAltName is malformed: {e}"))?;
    Ok(san
        .0
        .iter()
        .map(|g| match g {
            GeneralName::DnsName(d) => San::Dns(d.to_string()),
            GeneralName::IpAddress(_) => San::Other("IP address"),
            GeneralName::Rfc822Name(_) => San::Other("email"),
            GeneralName::UniformResourceIdentifier(_) => San::Other("URI"),
            GeneralName::DirectoryName(_) => San::Other("directory name"),
            GeneralName::OtherName(_) => San::Other("otherName"),
            GeneralName::RegisteredId(_) => San::Other("registered ID"),
            GeneralName::EdiPartyName(_) => San::Other("EDI party name"),
        })
        .collect())
}

impl Csr {
    /// Parses a DER PKCS#10 request (RFC 2986).
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let req = CertReq::from_der(der).map_err(|e| format!("the CSR is not DER PKCS#10: {e}"))?;
        let subject_der = req.info.subject.to_der().map_err(|e| e.to_string())?;
        let cns = name_values(&req.info.subject, OID_CN);
        let spki_der = req.info.public_key.to_der().map_err(|e| e.to_string())?;
        let mut san_der = None;
        for attr in req.info.attributes.iter() {
            if attr.oid != OID_EXTENSION_REQUEST {
                continue;
            }
            for v in attr.values.iter() {
                let exts: x509_cert::ext::Extensions =
                    v.decode_as().map_err(|e| format!("the CSR's extensionRequest is malformed: {e}"))?;
                for ext in exts {
                    if ext.extn_id == OID_SAN {
                        if san_der.is_some() {
                            return Err("the CSR requests subjectAltName twice".into());
                        }
                        san_der = Some(ext.extn_value.as_bytes().to_vec());
                    }
                }
            }
        }
        let sans = match &san_der {
            Some(v) => parse_sans(v)?,
            None => Vec::new(),
        };
        Ok(Csr { der: der.to_vec(), sha256: sha256_hex(der), subject_der, cns, san_der, sans, spki_der, req })
    }

    /// Checks the self-signature (proof of possession of the key).
    pub fn verify_signature(&self) -> Result<(), String> {
        let tbs = self.req.info.to_der().map_err(|e| e.to_string())?;
        let sig = self.req.signature.as_bytes().ok_or("the CSR signature is not whole bytes")?;
        verify(&self.req.info.public_key, &self.req.algorithm.oid, &tbs, sig)
    }
}

fn verify(
    spki: &spki::SubjectPublicKeyInfoOwned,
    sig_alg: &ObjectIdentifier,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), String> {
    use ring::signature as s;
    let key = spki.subject_public_key.as_bytes().ok_or("the public key is not whole bytes")?;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    let alg: &dyn s::VerificationAlgorithm = match (*sig_alg, curve) {
        (OID_RSA_SHA256, _) => &s::RSA_PKCS1_2048_8192_SHA256,
        (OID_RSA_SHA384, _) => &s::RSA_PKCS1_2048_8192_SHA384,
        (OID_RSA_SHA512, _) => &s::RSA_PKCS1_2048_8192_SHA512,
        (OID_ECDSA_SHA256, Some(OID_P256)) => &s::ECDSA_P256_SHA256_ASN1,
        (OID_ECDSA_SHA256, Some(OID_P384)) => &s::ECDSA_P384_SHA256_ASN1,
        (OID_ECDSA_SHA384, Some(OID_P256)) => &s::ECDSA_P256_SHA384_ASN1,
        (OID_ECDSA_SHA384, Some(OID_P384)) => &s::ECDSA_P384_SHA384_ASN1,
        (OID_ED25519, _) => &s::ED25519,
        (other, _) => return Err(format!("the CSR's signature algorithm {other} is not supported")),
    };
    s::UnparsedPublicKey::new(alg, key)
        .verify(msg, sig)
        .map_err(|_| "the CSR's signature does not verify with its public key".to_string())
}

/// The facts of a certificate the gateway uses.
#[derive(Clone, Debug)]
pub struct CertFacts {
    pub subject_der: Vec<u8>,
    pub san_der: Option<Vec<u8>>,
    pub spki_der: Vec<u8>,
    pub cns: Vec<String>,
    pub serial_numbers: Vec<String>,
    /// Hex of the serial number's bytes.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl CertFacts {
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let cert = Certificate::from_der(der).map_err(|e| format!("not a DER X.509 certificate: {e}"))?;
        let tbs = &cert.tbs_certificate;
        let san_der = tbs
            .extensions
            .as_ref()
            .and_then(|exts| exts.iter().find(|e| e.extn_id == OID_SAN))
            .map(|e| e.extn_value.as_bytes().to_vec());
        Ok(CertFacts {
            subject_der: tbs.subject.to_der().map_err(|e| e.to_string())?,
            san_der,
            spki_der: tbs.subject_public_key_info.to_der().map_err(|e| e.to_string())?,
            cns: name_values(&tbs.subject, OID_CN),
            serial_numbers: name_values(&tbs.subject, OID_SERIAL_NUMBER),
            serial: hex(tbs.serial_number.as_bytes()),
            not_before: tbs.validity.not_before.to_unix_duration().as_secs() as i64,
            not_after: tbs.validity.not_after.to_unix_duration().as_secs() as i64,
        })
    }
}

/// A degenerate (certs-only) SignedData in a ContentInfo, DER (RFC 5652 §5.1; RFC 7030 §4.1.3).
/// The certificates are a DER SET OF, so their order is the DER sort order.
pub fn certs_only(certs: &[&[u8]]) -> Result<Vec<u8>, String> {
    use cms::cert::CertificateChoices;
    use cms::content_info::{CmsVersion, ContentInfo};
    use cms::signed_data::{CertificateSet, EncapsulatedContentInfo, SignedData, SignerInfos};
    let mut set = Vec::new();
    for (i, c) in certs.iter().enumerate() {
        let cert = Certificate::from_der(c).map_err(|e| format!("certificate {}: {e}", i + 1))?;
        set.push(CertificateChoices::Certificate(cert));
    }
    let sd = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::new(),
        encap_content_info: EncapsulatedContentInfo { econtent_type: OID_DATA, econtent: None },
        certificates: Some(CertificateSet(SetOfVec::try_from(set).map_err(|e| e.to_string())?)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::new()),
    };
    let ci = ContentInfo {
        content_type: OID_SIGNED_DATA,
        content: Any::encode_from(&sd).map_err(|e| e.to_string())?,
    };
    ci.to_der().map_err(|e| e.to_string())
}

/// Base64 of `data`: one line, or 76-column lines ending in CRLF (RFC 2045 §6.8).
pub fn base64_out(data: &[u8], wrap: bool) -> String {
    let flat = base64::engine::general_purpose::STANDARD.encode(data);
    if !wrap {
        return flat;
    }
    let mut out = String::with_capacity(flat.len() + flat.len() / 38 + 2);
    for chunk in flat.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push_str("\r\n");
    }
    out
}

/// Decodes base64 with any whitespace and with or without padding (RFC 8951 §3).
pub fn base64_in(body: &[u8]) -> Result<Vec<u8>, String> {
    let compact: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    engine.decode(&compact).map_err(|e| format!("the body is not base64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_reads_any_whitespace_and_writes_76_columns() {
        let data: Vec<u8> = (0..=255u8).collect();
        let wrapped = base64_out(&data, true);
        assert!(wrapped.lines().all(|l| l.trim_end().len() <= 76));
        assert_eq!(base64_in(wrapped.as_bytes()).unwrap(), data);
        let spaced: String = base64_out(&data, false).chars().flat_map(|c| [c, ' ', '\t']).collect();
        assert_eq!(base64_in(spaced.as_bytes()).unwrap(), data);
        assert!(base64_in(b"***").is_err());
    }
}
