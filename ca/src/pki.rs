//! Certificates we receive: parsing, and the checks of design.md §5 rule 2 that every issued
//! certificate passes before it is installed.

use der::{Decode, Encode};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

use crate::error::{Error, Result};
use crate::subject::{Sans, Subject};

/// How far in the future a fresh certificate's notBefore may be (CA and device clocks differ).
pub const CLOCK_SKEW_S: u64 = 300;

/// A parsed certificate with its original DER.
#[derive(Clone)]
pub struct Cert {
    pub der: Vec<u8>,
    pub parsed: Certificate,
}

impl std::fmt::Debug for Cert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cert({})", self.subject())
    }
}

impl Cert {
    pub fn from_der(der: &[u8]) -> Result<Cert> {
        let parsed = Certificate::from_der(der)
            .map_err(|e| Error::protocol(format!("not an X.509 certificate: {e}")))?;
        Ok(Cert { der: der.to_vec(), parsed })
    }

    pub fn subject(&self) -> String {
        self.parsed.tbs_certificate.subject.to_string()
    }

    pub fn issuer(&self) -> String {
        self.parsed.tbs_certificate.issuer.to_string()
    }

    /// Serial number as lowercase hex without leading zero bytes.
    pub fn serial_hex(&self) -> String {
        let bytes = self.parsed.tbs_certificate.serial_number.as_bytes();
        let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
        if trimmed.is_empty() {
            return "00".into();
        }
        trimmed.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Serial number in decimal, when it fits 128 bits (EnOS `certSN` is the decimal serial).
    pub fn serial_decimal(&self) -> Option<String> {
        let bytes = self.parsed.tbs_certificate.serial_number.as_bytes();
        if bytes.len() > 17 {
            return None;
        }
        Some(bytes.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b)).to_string())
    }

    /// The serial number's content octets, as encoded (RFC 9773 §4.1 certID).
    pub fn serial_bytes(&self) -> &[u8] {
        self.parsed.tbs_certificate.serial_number.as_bytes()
    }

    /// The authorityKeyIdentifier's keyIdentifier, when the certificate has one.
    pub fn authority_key_id(&self) -> Option<Vec<u8>> {
        match self.parsed.tbs_certificate.get::<x509_cert::ext::pkix::AuthorityKeyIdentifier>() {
            Ok(Some((_, aki))) => aki.key_identifier.map(|k| k.as_bytes().to_vec()),
            _ => None,
        }
    }

    pub fn not_before(&self) -> u64 {
        self.parsed.tbs_certificate.validity.not_before.to_unix_duration().as_secs()
    }

    pub fn not_after(&self) -> u64 {
        self.parsed.tbs_certificate.validity.not_after.to_unix_duration().as_secs()
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        self.parsed.tbs_certificate.subject_public_key_info.to_der().unwrap_or_default()
    }

    pub fn sans(&self) -> Vec<GeneralName> {
        match self.parsed.tbs_certificate.get::<SubjectAltName>() {
            Ok(Some((_, san))) => san.0,
            _ => Vec::new(),
        }
    }

    /// Human-readable SANs (`DNS:x`, `IP:1.2.3.4`, `URI:…`, `email:…`).
    pub fn san_strings(&self) -> Vec<String> {
        self.sans().iter().filter_map(describe_general_name).collect()
    }

    pub fn pem(&self) -> String {
        to_pem(&self.der)
    }

    /// Uppercase hex SHA-1 of the DER (the thumbprint EZCA and Windows use).
    pub fn thumbprint_sha1_hex(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &self.der);
        digest.as_ref().iter().map(|b| format!("{b:02X}")).collect()
    }

    pub fn is_self_issued(&self) -> bool {
        self.parsed.tbs_certificate.subject == self.parsed.tbs_certificate.issuer
    }

    /// Whether `issuer` issued this certificate (its name and its signature).
    pub fn is_signed_by(&self, issuer: &Cert) -> bool {
        self.signed_by(issuer)
    }

    /// Whether the key usage extension allows keyEncipherment (or there is none).
    pub fn allows_key_encipherment(&self) -> bool {
        use x509_cert::ext::pkix::{KeyUsage, KeyUsages};
        let extensions = self.parsed.tbs_certificate.extensions.as_deref().unwrap_or_default();
        match extensions.iter().find(|e| e.extn_id == <KeyUsage as der::oid::AssociatedOid>::OID) {
            None => true,
            Some(e) => KeyUsage::from_der(e.extn_value.as_bytes())
                .is_ok_and(|usage| usage.0.contains(KeyUsages::KeyEncipherment)),
        }
    }

    /// Whether `issuer`'s key made this certificate's signature.
    fn signed_by(&self, issuer: &Cert) -> bool {
        if self.parsed.tbs_certificate.issuer != issuer.parsed.tbs_certificate.subject {
            return false;
        }
        let Some(tbs) = first_element(&self.der) else {
            return false;
        };
        let spki = &issuer.parsed.tbs_certificate.subject_public_key_info;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok());
        let Some(algorithm) = verification_algorithm(&self.parsed.signature_algorithm.oid.to_string(), curve)
        else {
            return false;
        };
        let Some(signature) = self.parsed.signature.as_bytes() else {
            return false;
        };
        let Some(public_key) = spki.subject_public_key.as_bytes() else {
            return false;
        };
        UnparsedPublicKey::new(algorithm, public_key).verify(tbs, signature).is_ok()
    }
}

/// A self-signed certificate for `key` (valid from an hour ago for `valid_s` seconds, a random
/// positive serial): the carrier a protocol needs for a key that has no certificate yet (SCEP's
/// PKCSReq signer, ACME's tls-alpn-01 answer).
#[cfg(any(feature = "scep", feature = "acme-tls-alpn"))]
pub fn self_signed(
    key: &dyn enroll_hal::DeviceKey,
    subject: x509_cert::name::Name,
    extensions: Vec<x509_cert::ext::Extension>,
    valid_s: u64,
) -> Result<Vec<u8>> {
    use std::time::{Duration, SystemTime};
    use x509_cert::time::{Time, Validity};
    let internal = |what: &str, e: der::Error| {
        Error::new(crate::error::Kind::Internal, format!("self-signed certificate: {what}: {e}"))
    };
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| Error::new(crate::error::Kind::Internal, "the system random generator failed"))?;
    serial[0] = (serial[0] & 0x7f) | 0x01;
    let scheme = key.algorithm().default_scheme();
    let algorithm = crate::csr::signature_algorithm(scheme);
    // An hour back, so a server whose clock is a little behind ours still takes it.
    let start = SystemTime::now().checked_sub(Duration::from_secs(3600)).unwrap_or(SystemTime::UNIX_EPOCH);
    let time = |at: SystemTime| Time::try_from(at).map_err(|e| internal("validity", e));
    let tbs = x509_cert::TbsCertificate {
        version: x509_cert::Version::V3,
        serial_number: x509_cert::serial_number::SerialNumber::new(&serial)
            .map_err(|e| internal("serial", e))?,
        signature: algorithm.clone(),
        issuer: subject.clone(),
        validity: Validity {
            not_before: time(start)?,
            not_after: time(start + Duration::from_secs(3600 + valid_s))?,
        },
        subject,
        subject_public_key_info: spki::SubjectPublicKeyInfoOwned::from_der(key.public_key_spki())
            .map_err(|e| internal("key", e))?,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: (!extensions.is_empty()).then_some(extensions),
    };
    let signature = key.sign(scheme, &tbs.to_der().map_err(|e| internal("encoding", e))?)?;
    let certificate = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: algorithm,
        signature: der::asn1::BitString::from_bytes(&signature).map_err(|e| internal("signature", e))?,
    };
    certificate.to_der().map_err(|e| internal("encoding", e))
}

/// Checks a CSR someone else made (Redtrust's server-side key) is signed by the key it carries,
/// and returns that key's SubjectPublicKeyInfo (DER).
pub fn verify_csr(der: &[u8]) -> Result<Vec<u8>> {
    let request = x509_cert::request::CertReq::from_der(der)
        .map_err(|e| Error::protocol(format!("the CSR does not parse: {e}")))?;
    let spki = &request.info.public_key;
    let curve =
        spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok());
    let algorithm = verification_algorithm(&request.algorithm.oid.to_string(), curve).ok_or_else(|| {
        Error::protocol(format!("the CSR is signed with an unsupported algorithm {}", request.algorithm.oid))
    })?;
    let (Some(tbs), Some(signature), Some(public_key)) =
        (first_element(der), request.signature.as_bytes(), spki.subject_public_key.as_bytes())
    else {
        return Err(Error::protocol("the CSR is not a complete signed request"));
    };
    UnparsedPublicKey::new(algorithm, public_key)
        .verify(tbs, signature)
        .map_err(|_| Error::protocol("the CSR's signature does not verify with its own public key"))?;
    spki.to_der().map_err(|e| Error::protocol(format!("the CSR's public key does not encode: {e}")))
}

/// PEM with LF line endings and the given label.
pub fn pem_of(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

pub fn to_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Every CERTIFICATE block in a PEM text, parsed. Other blocks are ignored.
pub fn parse_pem_certs(text: &str) -> Result<Vec<Cert>> {
    let blocks = pem::parse_many(text).map_err(|e| Error::protocol(format!("bad PEM: {e}")))?;
    blocks.iter().filter(|b| b.tag() == "CERTIFICATE").map(|b| Cert::from_der(b.contents())).collect()
}

fn describe_general_name(name: &GeneralName) -> Option<String> {
    Some(match name {
        GeneralName::DnsName(s) => format!("DNS:{}", s.as_str()),
        GeneralName::UniformResourceIdentifier(s) => format!("URI:{}", s.as_str()),
        GeneralName::Rfc822Name(s) => format!("email:{}", s.as_str()),
        GeneralName::IpAddress(bytes) => {
            let b = bytes.as_bytes();
            let ip: std::net::IpAddr = match b.len() {
                4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into(),
                16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?).into(),
                _ => return None,
            };
            format!("IP:{ip}")
        }
        _ => return None,
    })
}

/// The signature algorithms CAs use, mapped to ring (curve decides ECDSA's verifier).
fn verification_algorithm(
    signature_oid: &str,
    curve: Option<der::asn1::ObjectIdentifier>,
) -> Option<&'static dyn VerificationAlgorithm> {
    const P256: &str = "1.2.840.10045.3.1.7";
    const P384: &str = "1.3.132.0.34";
    let curve = curve.map(|c| c.to_string());
    Some(match (signature_oid, curve.as_deref()) {
        ("1.2.840.10045.4.3.2", Some(P256)) => &signature::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.4.3.2", Some(P384)) => &signature::ECDSA_P384_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", Some(P256)) => &signature::ECDSA_P256_SHA384_ASN1,
        ("1.2.840.10045.4.3.3", Some(P384)) => &signature::ECDSA_P384_SHA384_ASN1,
        ("1.2.840.113549.1.1.11", _) => &signature::RSA_PKCS1_2048_8192_SHA256,
        ("1.2.840.113549.1.1.12", _) => &signature::RSA_PKCS1_2048_8192_SHA384,
        ("1.2.840.113549.1.1.13", _) => &signature::RSA_PKCS1_2048_8192_SHA512,
        _ => return None,
    })
}

/// The raw bytes of the first element inside a DER SEQUENCE (a certificate's TBSCertificate),
/// so signatures are checked over exactly what the CA signed, not a re-encoding.
fn first_element(der: &[u8]) -> Option<&[u8]> {
    let (_, outer_len, outer_header) = read_header(der)?;
    let inner = der.get(outer_header..outer_header + outer_len)?;
    let (_, len, header) = read_header(inner)?;
    inner.get(..header + len)
}

fn read_header(der: &[u8]) -> Option<(u8, usize, usize)> {
    let tag = *der.first()?;
    let first = *der.get(1)?;
    if first < 0x80 {
        return Some((tag, usize::from(first), 2));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 {
        return None;
    }
    let len = der.get(2..2 + count)?.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Some((tag, len, 2 + count))
}

/// Sorts certificates a CA returned in an unknown order (Sectigo's `x509` format is observed
/// root-first, protocols.md §3.3) into an [`Issued`]: the leaf is the one certificate that issued
/// none of the others, roots are self-issued, the rest are intermediates.
pub fn sort_returned(certs: Vec<Cert>, ca_ref: Option<String>) -> Result<Issued> {
    let issues_another = |c: &Cert| {
        certs.iter().any(|other| {
            other.der != c.der && other.parsed.tbs_certificate.issuer == c.parsed.tbs_certificate.subject
        })
    };
    let self_issued = |c: &Cert| c.parsed.tbs_certificate.issuer == c.parsed.tbs_certificate.subject;
    let leaves: Vec<&Cert> = certs.iter().filter(|c| !issues_another(c) && !self_issued(c)).collect();
    let leaf = match leaves.as_slice() {
        [leaf] => leaf.der.clone(),
        [] => return Err(Error::protocol("the returned certificates hold no end-entity certificate")),
        _ => {
            return Err(Error::protocol(
                "the returned certificates hold more than one end-entity certificate",
            ))
        }
    };
    let (roots, intermediates): (Vec<&Cert>, Vec<&Cert>) =
        certs.iter().filter(|c| c.der != leaf).partition(|c| self_issued(c));
    Ok(Issued {
        leaf,
        intermediates: intermediates.into_iter().map(|c| c.der.clone()).collect(),
        roots: roots.into_iter().map(|c| c.der.clone()).collect(),
        ca_ref,
    })
}

/// What the CA returned for one request.
#[derive(Debug, Clone, Default)]
pub struct Issued {
    pub leaf: Vec<u8>,
    /// Intermediates, in any order.
    pub intermediates: Vec<Vec<u8>>,
    /// Roots the CA returned (EnOS `caCert`, EZCA `RootCertificate`).
    pub roots: Vec<Vec<u8>>,
    /// The CA's handle for this certificate (EnOS certSN), kept for renewal.
    pub ca_ref: Option<String>,
}

/// What we asked for.
pub struct Expectation<'a> {
    pub spki: &'a [u8],
    pub subject: &'a Subject,
    pub sans: &'a Sans,
    /// CA certificates known from configuration or the previous installation.
    pub known_ca: &'a [Cert],
    pub now: u64,
}

/// A certificate that passed every check, with its chain ordered leaf-first.
pub struct Verified {
    pub leaf: Cert,
    /// Intermediates from the leaf's issuer upward (what chain.pem carries after the leaf).
    pub chain: Vec<Cert>,
    /// Every CA certificate returned or known (ca.pem).
    pub ca: Vec<Cert>,
    pub warnings: Vec<String>,
}

/// design.md §5 rule 2. Any failure is a protocol error (exit 76); nothing gets installed.
pub fn verify_issued(issued: &Issued, expect: &Expectation) -> Result<Verified> {
    let leaf = Cert::from_der(&issued.leaf).map_err(|e| e.context("the issued certificate"))?;
    let mut warnings = Vec::new();
    check_public_key(&leaf, expect.spki)?;
    check_subject(&leaf, expect.subject, &mut warnings)?;
    check_sans(&leaf, expect.sans, &mut warnings)?;
    check_validity(&leaf, expect.now)?;
    let mut ca: Vec<Cert> = Vec::new();
    for der in issued.intermediates.iter().chain(&issued.roots) {
        let cert = Cert::from_der(der).map_err(|e| e.context("a CA certificate returned with the leaf"))?;
        if !ca.iter().any(|c| c.der == cert.der) {
            ca.push(cert);
        }
    }
    for known in expect.known_ca {
        if !ca.iter().any(|c| c.der == known.der) {
            ca.push(known.clone());
        }
    }
    let chain = build_chain(&leaf, &ca)?;
    Ok(Verified { leaf, chain, ca, warnings })
}

fn check_public_key(leaf: &Cert, spki: &[u8]) -> Result<()> {
    if leaf.spki_der() != spki {
        return Err(Error::protocol(
            "the issued certificate does not carry our public key (the CA issued it for another key)",
        ));
    }
    Ok(())
}

fn check_subject(leaf: &Cert, subject: &Subject, warnings: &mut Vec<String>) -> Result<()> {
    let wanted = crate::csr::encode_name(subject)?.to_string();
    let got = leaf.subject();
    if got == wanted {
        return Ok(());
    }
    // CAs may rewrite or drop O/OU/C by policy; the common name is the identity and must match.
    let cn = subject.common_name();
    let has_cn = leaf
        .parsed
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .any(|atv| atv.oid.to_string() == "2.5.4.3" && atv_text(atv).as_deref() == Some(cn));
    if !has_cn {
        return Err(Error::protocol(format!("the issued certificate's subject {got:?} lacks our CN {cn:?}")));
    }
    warnings.push(format!("the CA changed the subject from {wanted:?} to {got:?}"));
    Ok(())
}

fn atv_text(atv: &x509_cert::attr::AttributeTypeAndValue) -> Option<String> {
    let value = &atv.value;
    std::str::from_utf8(value.value()).ok().map(str::to_string)
}

fn check_sans(leaf: &Cert, sans: &Sans, warnings: &mut Vec<String>) -> Result<()> {
    let wanted: Vec<String> =
        crate::csr::general_names(sans)?.iter().filter_map(describe_general_name).collect();
    let got = leaf.san_strings();
    if let Some(missing) = wanted.iter().find(|w| !got.contains(w)) {
        return Err(Error::protocol(format!("the issued certificate lacks the requested SAN {missing}")));
    }
    let extra: Vec<&String> = got.iter().filter(|g| !wanted.contains(g)).collect();
    if !extra.is_empty() {
        warnings.push(format!("the CA added SANs we did not ask for: {extra:?}"));
    }
    Ok(())
}

fn check_validity(leaf: &Cert, now: u64) -> Result<()> {
    if leaf.not_after() <= now {
        return Err(Error::protocol(format!(
            "the issued certificate expired at {} (it is now {})",
            crate::time::rfc3339(leaf.not_after()),
            crate::time::rfc3339(now)
        )));
    }
    if leaf.not_before() > now + CLOCK_SKEW_S {
        return Err(Error::protocol(format!(
            "the issued certificate is not valid until {}",
            crate::time::rfc3339(leaf.not_before())
        )));
    }
    Ok(())
}

/// Walks issuer links from the leaf through `ca`, checking each signature. At least the leaf's
/// own signature must verify against a CA certificate we were given or already know.
fn build_chain(leaf: &Cert, ca: &[Cert]) -> Result<Vec<Cert>> {
    let mut chain: Vec<Cert> = Vec::new();
    let mut current = leaf.clone();
    loop {
        let Some(issuer) = ca.iter().find(|c| current.signed_by(c)) else {
            if chain.is_empty() {
                return Err(Error::protocol(format!(
                    "the issued certificate does not chain to the CA certificates returned or configured \
                     (issuer {:?})",
                    leaf.issuer()
                )));
            }
            // The top of what we have is not self-signed: a partial chain is still a chain.
            return Ok(chain);
        };
        if issuer.is_self_issued() {
            return Ok(chain);
        }
        if chain.iter().any(|c| c.der == issuer.der) || chain.len() > 8 {
            return Err(Error::protocol("the CA certificates returned form a loop"));
        }
        chain.push(issuer.clone());
        current = issuer.clone();
    }
}
