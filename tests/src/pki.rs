//! Test PKI generated at start-up by code (style.md §9: no checked-in fixtures).
//!
//! - EnOS root CA: EnOS returns only `caCert` (protocols.md §1.4), so EnOS leaves are signed
//!   directly by this root.
//! - EZCA root + issuing CA: EZCA returns `IssuingCACertificate` and `RootCertificate` (§2.4).
//! - Sectigo root + issuing CA: `collect` returns leaf, issuing and root (protocols.md §3.3).
//! - Securosys root + issuing CA: the issuing CA's key is the RSA-2048 "CA key in the HSM"
//!   (`signKeyName`), since the TSB signature algorithms are `SHA*_WITH_RSA` (§4.4).
//! - EST root + issuing CA: the EST emulator's CA (RFC 7030; `cacerts` answers both, the issuing
//!   CA signs the device certificates).
//! - Factory CA: signs factory (IDevID) TLS client certificates that authenticate EST
//!   `simpleenroll` (RFC 7030 §3.3.2); it issues no device certificates.
//! - TLS root: signs the emulator's HTTPS server certificate for `localhost` and 127.0.0.1.
//!
//! All other CA keys are ECDSA P-256. Leaves are made from a PKCS#10 CSR whose self-signature is
//! verified; the subject and the SAN extension are copied from the CSR byte for byte.

use crate::util;
use ::time::OffsetDateTime;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CustomExtension, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
    SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};
use x509_parser::prelude::*;

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_SHA256_RSA: &str = "1.2.840.113549.1.1.11";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const OID_SAN: &[u64] = &[2, 5, 29, 17];

/// PEM with LF line endings (the pem crate defaults to CRLF; vendor samples use LF).
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    let cfg = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(tag, der.to_vec()), cfg)
}

/// PEM `CERTIFICATE` block of a DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

/// A certificate authority: its certificate and its signing key.
pub struct CertAuthority {
    cert: Certificate,
    key: KeyPair,
    not_after: SystemTime,
}

impl CertAuthority {
    /// A self-signed root valid from a day ago for 20 years.
    fn root(org: &str, cn: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(org, cn, BasicConstraints::Unconstrained);
        let not_after = to_system(params.not_after);
        Ok(Self { cert: params.self_signed(&key)?, key, not_after })
    }

    /// A self-signed RSA root for the RSA PKCS#8 key `key_pkcs8`, valid from a day ago for 20
    /// years, that may also decrypt (keyEncipherment: a SCEP CA receives requests encrypted to
    /// its key, RFC 8894 §2.2).
    pub fn rsa_root(org: &str, cn: &str, key_pkcs8: &[u8]) -> Result<Self, String> {
        let key = rsa_key_pair(key_pkcs8, &PKCS_RSA_SHA256)?;
        let mut params = ca_params(org, cn, BasicConstraints::Unconstrained);
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        let not_after = to_system(params.not_after);
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Self { cert, key, not_after })
    }

    /// An intermediate (issuing) CA signed by `parent`, path length 0.
    fn intermediate(org: &str, cn: &str, parent: &CertAuthority) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        Self::intermediate_with_key(org, cn, parent, key)
    }

    /// An intermediate CA with the given key (e.g. RSA, which ring cannot generate).
    fn intermediate_with_key(
        org: &str,
        cn: &str,
        parent: &CertAuthority,
        key: KeyPair,
    ) -> Result<Self, rcgen::Error> {
        let mut params = ca_params(org, cn, BasicConstraints::Constrained(0));
        params.not_after -= ::time::Duration::days(1);
        params.use_authority_key_identifier_extension = true;
        let not_after = to_system(params.not_after);
        let cert = params.signed_by(&key, &parent.cert, &parent.key)?;
        Ok(Self { cert, key, not_after })
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> &[u8] {
        self.cert.der()
    }

    /// The CA certificate, PEM (LF line endings).
    pub fn pem(&self) -> String {
        cert_pem(self.der())
    }

    /// End of the CA certificate's validity; leaves are clipped to it (EnOS validDay rule).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The CA's SubjectPublicKeyInfo, DER.
    pub fn spki_der(&self) -> Vec<u8> {
        self.key.public_key_der()
    }

    /// The CA key loaded for signing with `alg` (an RSA key can sign with SHA-256/384/512).
    fn key_for(&self, alg: &'static SignatureAlgorithm) -> Result<KeyPair, String> {
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from(self.key.serialize_der());
        KeyPair::from_pkcs8_der_and_sign_algo(&der, alg)
            .map_err(|e| format!("the CA key cannot sign with {alg:?}: {e}"))
    }
}

/// A fresh RSA key of `bits` bits, PKCS#8 DER (rcgen with ring cannot generate RSA keys).
pub fn rsa_pkcs8(bits: usize) -> Result<Vec<u8>, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits).map_err(|e| e.to_string())?;
    Ok(key.to_pkcs8_der().map_err(|e| e.to_string())?.as_bytes().to_vec())
}

/// An rcgen key pair for an RSA PKCS#8 key, signing with `alg` (one of the `PKCS_RSA_*`).
pub fn rsa_key_pair(pkcs8: &[u8], alg: &'static SignatureAlgorithm) -> Result<KeyPair, String> {
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.to_vec());
    KeyPair::from_pkcs8_der_and_sign_algo(&der, alg).map_err(|e| e.to_string())
}

fn ca_params(org: &str, cn: &str, bc: BasicConstraints) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "NL");
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(bc);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.serial_number = Some(random_serial().into());
    let now = OffsetDateTime::now_utc();
    p.not_before = now - ::time::Duration::days(1);
    p.not_after = now + ::time::Duration::days(20 * 365);
    p
}

fn to_system(t: OffsetDateTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64)
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    let s = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    OffsetDateTime::from_unix_timestamp(s as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A random positive serial of at most 63 bits, so it fits the i64 `certSn` of EnOS renew.
pub fn random_serial() -> u64 {
    let b = util::random_bytes(8);
    let v = u64::from_be_bytes(b.try_into().unwrap_or([1; 8])) & 0x7fff_ffff_ffff_ffff;
    v.max(1)
}

/// All CA material of one emulator run.
pub struct Pki {
    /// EnOS root CA (signs EnOS leaves directly).
    pub enos_root: CertAuthority,
    /// EZCA root CA.
    pub ezca_root: CertAuthority,
    /// EZCA issuing CA (signs EZCA leaves).
    pub ezca_issuing: CertAuthority,
    /// Sectigo root CA.
    pub sectigo_root: CertAuthority,
    /// Sectigo issuing CA (signs Sectigo leaves; chain = leaf + issuing + root).
    pub sectigo_issuing: CertAuthority,
    /// Securosys root CA (P-256).
    pub securosys_root: CertAuthority,
    /// Securosys issuing CA: the RSA-2048 "CA key in the HSM" named by `signKeyName`.
    pub securosys_issuing: CertAuthority,
    /// EST root CA ("EST Emulator Root CA").
    pub est_root: CertAuthority,
    /// EST issuing CA ("EST Emulator Issuing CA"): signs EST device certificates.
    pub est_issuing: CertAuthority,
    /// Factory CA: signs the factory / IDevID client certificates EST `simpleenroll` accepts.
    pub factory_ca: CertAuthority,
    /// Root that signs the HTTPS server certificate.
    pub tls_root: CertAuthority,
    tls_server_der: Vec<u8>,
    tls_server_key: Vec<u8>,
}

impl Pki {
    /// Generates every CA and the TLS server certificate (for `localhost` and 127.0.0.1).
    pub fn generate() -> Result<Self, rcgen::Error> {
        Self::generate_with_tls_start(-86_400)
    }

    /// As [`Pki::generate`], with the TLS server certificate's notBefore `offset_s` seconds from
    /// now (positive: a certificate that is not valid yet, as a freshly rotated one looks to a
    /// device whose clock is behind).
    pub fn generate_with_tls_start(offset_s: i64) -> Result<Self, rcgen::Error> {
        Self::generate_with_tls_validity(offset_s, 365 * 86_400)
    }

    /// As [`Pki::generate`], with the TLS server certificate valid from `start_offset_s` to
    /// `end_offset_s` seconds from now (a negative end: a certificate that has expired).
    pub fn generate_with_tls_validity(start_offset_s: i64, end_offset_s: i64) -> Result<Self, rcgen::Error> {
        let enos_root = CertAuthority::root("EnOS", "EnOS Emulator Root CA")?;
        let ezca_root = CertAuthority::root("Keytos EZCA Emulator", "EZCA Emulator Root CA")?;
        let ezca_issuing =
            CertAuthority::intermediate("Keytos EZCA Emulator", "EZCA Emulator Issuing CA", &ezca_root)?;
        let sectigo_root = CertAuthority::root("Sectigo Emulator", "Sectigo Emulator Root CA")?;
        let sectigo_issuing =
            CertAuthority::intermediate("Sectigo Emulator", "Sectigo Emulator Issuing CA", &sectigo_root)?;
        let securosys_root = CertAuthority::root("Securosys Emulator", "Securosys Emulator Root CA")?;
        let rsa = rsa_pkcs8(2048).map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
        let hsm_key = KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(rsa),
            &PKCS_RSA_SHA256,
        )?;
        let securosys_issuing = CertAuthority::intermediate_with_key(
            "Securosys Emulator",
            "CA.iot.acme.example",
            &securosys_root,
            hsm_key,
        )?;
        let est_root = CertAuthority::root("EST Emulator", "EST Emulator Root CA")?;
        let est_issuing = CertAuthority::intermediate("EST Emulator", "EST Emulator Issuing CA", &est_root)?;
        let factory_ca = CertAuthority::root("Acme Factory", "Factory CA")?;
        let tls_root = CertAuthority::root("enroll-tests", "CA Emulator TLS Root")?;
        let (tls_server_der, tls_server_key) = tls_server_cert(&tls_root, start_offset_s, end_offset_s)?;
        Ok(Self {
            enos_root,
            ezca_root,
            ezca_issuing,
            sectigo_root,
            sectigo_issuing,
            securosys_root,
            securosys_issuing,
            est_root,
            est_issuing,
            factory_ca,
            tls_root,
            tls_server_der,
            tls_server_key,
        })
    }

    /// The HTTPS server certificate chain (leaf only; the client trusts `tls_root`).
    pub fn tls_server_chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        vec![self.tls_server_der.clone().into()]
    }

    /// The HTTPS server key (PKCS#8).
    pub fn tls_server_key(&self) -> rustls::pki_types::PrivateKeyDer<'static> {
        rustls::pki_types::PrivatePkcs8KeyDer::from(self.tls_server_key.clone()).into()
    }
}

fn tls_server_cert(
    root: &CertAuthority,
    start_offset_s: i64,
    end_offset_s: i64,
) -> Result<(Vec<u8>, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial().into());
    let now = OffsetDateTime::now_utc();
    p.not_before = now + ::time::Duration::seconds(start_offset_s);
    p.not_after = now + ::time::Duration::seconds(end_offset_s);
    let cert = p.signed_by(&key, &root.cert, &root.key)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

/// A TLS client certificate (clientAuth) signed by `ca` for the PKCS#8 key `key_pkcs8`
/// (P-256 or RSA), subject `O=org, CN=cn`, valid from a day ago for
/// `days` (negative: expired that many days ago). Returns the certificate DER.
pub fn issue_client_cert(
    ca: &CertAuthority,
    key_pkcs8: &[u8],
    org: &str,
    cn: &str,
    days: i64,
) -> Result<Vec<u8>, String> {
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key_pkcs8.to_vec());
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ECDSA_P256_SHA256)
        .or_else(|_| KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_RSA_SHA256))
        .map_err(|e| format!("unsupported key: {e}"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, org);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial().into());
    let now = OffsetDateTime::now_utc();
    if days < 0 {
        p.not_before = now + ::time::Duration::days(days - 30);
        p.not_after = now + ::time::Duration::days(days);
    } else {
        p.not_before = now - ::time::Duration::days(1);
        p.not_after = (now + ::time::Duration::days(days)).min(to_offset(ca.not_after));
    }
    let cert = p.signed_by(&key, &ca.cert, &ca.key).map_err(|e| format!("signing failed: {e}"))?;
    Ok(cert.der().to_vec())
}

/// The public-key type of a CSR, as far as the emulated CAs care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA with this modulus size in bits.
    Rsa(usize),
    /// ECDSA on NIST P-256 (prime256v1).
    P256,
    /// Anything else (algorithm OID, curve OID).
    Other(String),
}

/// One subjectAltName entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum San {
    /// rfc822Name (EZCA SubjectAltType 1).
    Email(String),
    /// dNSName (EZCA SubjectAltType 2).
    Dns(String),
    /// uniformResourceIdentifier (EZCA SubjectAltType 6).
    Uri(String),
    /// iPAddress (EZCA SubjectAltType 7).
    Ip(IpAddr),
    /// Any other GeneralName, by its debug form (only compared, never issued).
    Other(String),
}

/// A verified PKCS#10 request.
#[derive(Clone, Debug)]
pub struct ParsedCsr {
    /// The CSR, DER.
    pub der: Vec<u8>,
    /// The subject Name, DER (copied verbatim into the leaf).
    pub subject_der: Vec<u8>,
    /// The SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    /// Key type and size.
    pub key: KeyKind,
    /// Signature algorithm OID of the CSR (dotted).
    pub sig_alg: String,
    /// SANs requested in the extensionRequest attribute, sorted.
    pub sans: Vec<San>,
    /// The challengePassword attribute (PKCS#9, RFC 2985 §5.4.1), if the CSR carries one.
    pub challenge_password: Option<String>,
    /// The SAN extension value (DER) and its criticality, copied verbatim into the leaf.
    san_ext: RawSanExt,
}

impl ParsedCsr {
    /// True for RSA-2048 signed with SHA256withRSA (EnOS "RSA", protocols.md §1.4).
    pub fn is_enos_rsa(&self) -> bool {
        self.key == KeyKind::Rsa(2048) && self.sig_alg == OID_SHA256_RSA
    }

    /// The CSR's subjectAltName extension value (DER), if it requests one.
    pub fn san_ext_der(&self) -> Option<&[u8]> {
        self.san_ext.as_ref().map(|(v, _)| v.as_slice())
    }

    /// True for P-256 signed with SHA256withECDSA (EnOS "ECC", protocols.md §1.4).
    pub fn is_enos_ecc(&self) -> bool {
        self.key == KeyKind::P256 && self.sig_alg == OID_ECDSA_SHA256
    }
}

/// Parses a PEM (`CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`) or DER CSR and verifies
/// its self-signature (proof of possession). Errors are human-readable reasons.
pub fn parse_csr(input: &[u8]) -> Result<ParsedCsr, String> {
    let der = csr_der(input)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| format!("CSR is not valid DER PKCS#10: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the CSR".into());
    }
    csr.verify_signature().map_err(|e| format!("CSR signature does not verify: {e}"))?;
    let info = &csr.certification_request_info;
    let (sans, san_ext) = csr_sans(&csr)?;
    let challenge_password = info.iter_attributes().find_map(|attr| match attr.parsed_attribute() {
        ParsedCriAttribute::ChallengePassword(password) => Some(password.0.clone()),
        _ => None,
    });
    Ok(ParsedCsr {
        der: der.clone(),
        subject_der: info.subject.as_raw().to_vec(),
        spki_der: info.subject_pki.raw.to_vec(),
        key: key_kind(&info.subject_pki),
        sig_alg: csr.signature_algorithm.algorithm.to_id_string(),
        sans,
        challenge_password,
        san_ext,
    })
}

fn csr_der(input: &[u8]) -> Result<Vec<u8>, String> {
    let trimmed = input.trim_ascii_start();
    if !trimmed.starts_with(b"-----") {
        return Ok(input.to_vec());
    }
    let p = ::pem::parse(trimmed).map_err(|e| format!("CSR is not valid PEM: {e}"))?;
    match p.tag() {
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Ok(p.into_contents()),
        t => Err(format!("PEM block is {t:?}, not a CERTIFICATE REQUEST")),
    }
}

fn key_kind(spki: &x509_parser::x509::SubjectPublicKeyInfo) -> KeyKind {
    let alg = spki.algorithm.algorithm.to_id_string();
    let param = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    match (alg.as_str(), spki.parsed()) {
        (OID_RSA, Ok(x509_parser::public_key::PublicKey::RSA(k))) => KeyKind::Rsa(k.key_size()),
        (OID_EC, _) if param.as_ref().map(|o| o.to_id_string()).as_deref() == Some(OID_P256) => KeyKind::P256,
        _ => KeyKind::Other(format!("{alg} {}", param.map(|o| o.to_id_string()).unwrap_or_default())),
    }
}

/// The SAN extension's DER value and criticality.
type RawSanExt = Option<(Vec<u8>, bool)>;

fn csr_sans(csr: &X509CertificationRequest) -> Result<(Vec<San>, RawSanExt), String> {
    for attr in csr.certification_request_info.iter_attributes() {
        if let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() {
            for ext in &req.extensions {
                if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                    let sans = sorted_sans(&san.general_names);
                    return Ok((sans, Some((ext.value.to_vec(), ext.critical))));
                }
                if let ParsedExtension::ParseError { error } = ext.parsed_extension() {
                    return Err(format!("CSR extension {} does not parse: {error}", ext.oid));
                }
            }
        }
    }
    Ok((Vec::new(), None))
}

/// Sorted [`San`] list of parsed GeneralNames.
pub fn sorted_sans(names: &[GeneralName]) -> Vec<San> {
    let mut v: Vec<San> = names
        .iter()
        .map(|n| match n {
            GeneralName::RFC822Name(s) => San::Email(s.to_string()),
            GeneralName::DNSName(s) => San::Dns(s.to_string()),
            GeneralName::URI(s) => San::Uri(s.to_string()),
            GeneralName::IPAddress(b) => ip_from(b).map(San::Ip).unwrap_or(San::Other(format!("{n:?}"))),
            other => San::Other(format!("{other:?}")),
        })
        .collect();
    v.sort();
    v
}

fn ip_from(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// Sorted SANs and subject (DER) of a DER certificate.
pub fn cert_names(der: &[u8]) -> Result<(Vec<u8>, Vec<San>), String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => sorted_sans(&ext.value.general_names),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("bad SAN extension: {e}")),
    };
    Ok((cert.subject().as_raw().to_vec(), sans))
}

/// What the CA puts into a leaf besides what the CSR supplies.
#[derive(Clone, Debug)]
pub struct LeafProfile {
    /// Requested lifetime in days (clipped to the issuer's own validity).
    pub days: u32,
    /// SANs to issue instead of the CSR's SAN extension (EZCA `SubjectAltNames`).
    pub sans_override: Option<Vec<San>>,
    /// keyUsage bits.
    pub key_usages: Vec<KeyUsagePurpose>,
    /// extendedKeyUsage purposes.
    pub ekus: Vec<ExtendedKeyUsagePurpose>,
    /// A lifetime in seconds that replaces `days` (short-lived certificates for soak runs).
    pub lifetime_s: Option<u32>,
}

impl LeafProfile {
    /// Client + server auth device certificate valid for `days`.
    pub fn device(days: u32) -> Self {
        Self {
            days,
            sans_override: None,
            key_usages: vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment],
            ekus: vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth],
            lifetime_s: None,
        }
    }
}

/// Deliberately wrong leaves, for the `wrong-key-cert` and `expired-cert` faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafFault {
    /// A correct certificate.
    None,
    /// Same subject and SANs, but a fresh random key that the client does not hold.
    WrongKey,
    /// The client's key, but notAfter already in the past.
    Expired,
}

/// A certificate issued by [`issue_leaf`].
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// DER.
    pub der: Vec<u8>,
    /// PEM (LF line endings).
    pub pem: String,
    /// Serial number (positive, ≤ 63 bits).
    pub serial: u64,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Signs a leaf for `csr` with `issuer`: subject and SAN extension copied from the CSR,
/// random serial, validity now−60 s .. now+days (clipped to the issuer).
pub fn issue_leaf(
    csr: &ParsedCsr,
    issuer: &CertAuthority,
    profile: &LeafProfile,
    fault: LeafFault,
) -> Result<IssuedCert, String> {
    issue_leaf_with(csr, issuer, profile, fault, None)
}

/// As [`issue_leaf`], the issuer signing with `alg` instead of its key's default algorithm
/// (Securosys `signatureAlgorithm` with the RSA CA key).
pub fn issue_leaf_with(
    csr: &ParsedCsr,
    issuer: &CertAuthority,
    profile: &LeafProfile,
    fault: LeafFault,
    alg: Option<&'static SignatureAlgorithm>,
) -> Result<IssuedCert, String> {
    let re_keyed = alg.map(|a| issuer.key_for(a)).transpose()?;
    let issuer_key = re_keyed.as_ref().unwrap_or(&issuer.key);
    let mut params = leaf_params(csr, issuer, profile, fault)?;
    let serial = random_serial();
    params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
    let not_after = to_system(params.not_after);
    let cert = if fault == LeafFault::WrongKey {
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        params.signed_by(&other, &issuer.cert, issuer_key)
    } else {
        let spki = SubjectPublicKeyInfo::from_der(&csr.spki_der)
            .map_err(|e| format!("unsupported public key: {e}"))?;
        params.signed_by(&spki, &issuer.cert, issuer_key)
    }
    .map_err(|e| format!("signing failed: {e}"))?;
    let der = cert.der().to_vec();
    // rcgen rebuilds the Name from parsed attributes; refuse rather than silently alter it.
    if cert_names(&der)?.0 != csr.subject_der {
        return Err("emulator cannot reproduce this subject byte for byte".into());
    }
    Ok(IssuedCert { pem: cert_pem(&der), der, serial, not_after })
}

fn leaf_params(
    csr: &ParsedCsr,
    issuer: &CertAuthority,
    profile: &LeafProfile,
    fault: LeafFault,
) -> Result<CertificateParams, String> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject_dn(&csr.subject_der)?;
    match &profile.sans_override {
        Some(sans) => p.subject_alt_names = sans.iter().map(san_type).collect::<Result<_, _>>()?,
        None => {
            if let Some((value, critical)) = &csr.san_ext {
                let mut ext = CustomExtension::from_oid_content(OID_SAN, value.clone());
                ext.set_criticality(*critical);
                p.custom_extensions.push(ext);
            }
        }
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = profile.key_usages.clone();
    p.extended_key_usages = profile.ekus.clone();
    p.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    if fault == LeafFault::Expired {
        p.not_before = now - ::time::Duration::days(30);
        p.not_after = now - ::time::Duration::days(1);
    } else {
        p.not_before = now - ::time::Duration::seconds(60);
        let lifetime = match profile.lifetime_s {
            Some(seconds) => ::time::Duration::seconds(i64::from(seconds)),
            None => ::time::Duration::days(i64::from(profile.days)),
        };
        p.not_after = (now + lifetime).min(to_offset(issuer.not_after));
    }
    Ok(p)
}

fn subject_dn(subject_der: &[u8]) -> Result<DistinguishedName, String> {
    let (_, name) = X509Name::from_der(subject_der).map_err(|e| format!("bad subject: {e}"))?;
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let attrs: Vec<_> = rdn.iter().collect();
        let [attr] = attrs.as_slice() else {
            return Err("multi-valued RDNs are not supported".into());
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or("subject attribute OID too large")?.collect();
        dn.push(DnType::from_oid(&oid), dn_value(attr)?);
    }
    Ok(dn)
}

fn dn_value(attr: &AttributeTypeAndValue) -> Result<DnValue, String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let data = attr.attr_value().data;
    let text = || std::str::from_utf8(data).map_err(|_| "subject value is not text".to_string());
    let bad = |e: rcgen::Error| e.to_string();
    Ok(match attr.attr_value().header.tag() {
        Tag::PrintableString => DnValue::PrintableString(text()?.try_into().map_err(bad)?),
        Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
        Tag::Ia5String => DnValue::Ia5String(text()?.try_into().map_err(bad)?),
        Tag::T61String => DnValue::TeletexString(text()?.try_into().map_err(bad)?),
        t => return Err(format!("unsupported subject string type {t}")),
    })
}

fn san_type(s: &San) -> Result<SanType, String> {
    let ia5 = |v: &str| v.to_string().try_into().map_err(|e: rcgen::Error| e.to_string());
    Ok(match s {
        San::Email(v) => SanType::Rfc822Name(ia5(v)?),
        San::Dns(v) => SanType::DnsName(ia5(v)?),
        San::Uri(v) => SanType::URI(ia5(v)?),
        San::Ip(ip) => SanType::IpAddress(*ip),
        San::Other(v) => return Err(format!("cannot issue SAN {v}")),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A P-256 key and a CSR for it with the given CN and DNS SANs, made with rcgen.
    pub fn p256_csr(cn: &str, dns: &[&str]) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "Acme");
        p.distinguished_name.push(DnType::CommonName, cn);
        let csr = p.serialize_request(&key).unwrap();
        (key, csr.pem().unwrap())
    }

    #[test]
    fn leaf_copies_subject_and_sans_and_key() {
        let pki = Pki::generate().unwrap();
        let (key, csr_pem) = p256_csr("sensor-1", &["sensor-1.example", "10.0.0.1"]);
        let csr = parse_csr(csr_pem.as_bytes()).unwrap();
        assert!(csr.is_enos_ecc());
        let leaf = issue_leaf(&csr, &pki.enos_root, &LeafProfile::device(30), LeafFault::None).unwrap();
        let (_, cert) = X509Certificate::from_der(&leaf.der).unwrap();
        assert_eq!(cert.subject().as_raw(), csr.subject_der.as_slice());
        assert_eq!(cert.public_key().raw, key.public_key_der().as_slice());
        assert_eq!(cert_names(&leaf.der).unwrap().1, csr.sans);
        let strip = |b: &[u8]| b.iter().skip_while(|&&x| x == 0).copied().collect::<Vec<u8>>();
        assert_eq!(strip(cert.raw_serial()), strip(&leaf.serial.to_be_bytes()));
    }

    #[test]
    fn faulty_leaves() {
        let pki = Pki::generate().unwrap();
        let (key, csr_pem) = p256_csr("sensor-2", &[]);
        let csr = parse_csr(csr_pem.as_bytes()).unwrap();
        let wrong = issue_leaf(&csr, &pki.enos_root, &LeafProfile::device(30), LeafFault::WrongKey).unwrap();
        let (_, c) = X509Certificate::from_der(&wrong.der).unwrap();
        assert_ne!(c.public_key().raw, key.public_key_der().as_slice());
        let expired = issue_leaf(&csr, &pki.enos_root, &LeafProfile::device(30), LeafFault::Expired).unwrap();
        let (_, c) = X509Certificate::from_der(&expired.der).unwrap();
        assert!(!c.validity().is_valid());
    }

    #[test]
    fn tampered_csr_is_rejected() {
        let (_, csr_pem) = p256_csr("sensor-3", &[]);
        let mut der = ::pem::parse(&csr_pem).unwrap().into_contents();
        let n = der.len();
        der[n - 5] ^= 0x55; // inside the signature
        assert!(parse_csr(&der).is_err());
    }
}
