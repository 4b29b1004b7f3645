//! EST server emulator: RFC 7030 (Enrollment over Secure Transport) with the RFC 8951
//! clarifications; protocols.md §6.1 and §6.1a, design.md §8.
//!
//! Routes (RFC 7030 §3.2.2: `https://host/.well-known/est[/<label>]/<op>`), on the shared server:
//! - `GET cacerts` (§4.1): the EST issuing CA and root as a base64 certs-only PKCS#7 (§4.1.3),
//!   no authentication;
//! - `POST simpleenroll` (§4.2.1): authenticated by a TLS client certificate issued by the
//!   Factory CA (an IDevID, §3.3.2) or by HTTP Basic (§3.2.3) with the configured user;
//! - `POST simplereenroll` (§4.2.2): only by a TLS client certificate from the EST issuing CA,
//!   unexpired, and the CSR's subject and subjectAltName must equal that certificate's byte for
//!   byte (protocols.md §6.1a: else 403 "subject/SAN differ").
//!
//! The label is [`EstConfig::label`] (default `meters`); the unlabelled path reaches the same CA;
//! any other label is 404. Requests are `Content-Type: application/pkcs10` with a base64 DER
//! PKCS#10 body (§4.2.1; any whitespace accepted, RFC 8951 §3); the CSR's self-signature is
//! verified (RSA ≥ 2048 and P-256). The answer (§4.2.3) is 200, `application/pkcs7-mime;
//! smime-type=certs-only`, `Content-Transfer-Encoding: base64`, unwrapped base64 of a DER
//! certs-only SignedData (RFC 5652 §5.1, degenerate: no signers) holding only the issued
//! certificate. Missing credentials: 401 with `WWW-Authenticate: Basic realm="est"` (RFC 7617
//! §2); authenticated but refused: 403 with one line of text. Pending: 202 with `Retry-After`
//! (§4.2.3), by the `est-pending` fault; the client must resend the identical CSR, and every
//! CSR's SHA-256 is recorded so tests can check that it did.

use crate::emulator::{lock, tag, Shared};
use crate::fault::{Endpoint, Fault, Phase};
use crate::pki::{self, CertAuthority, KeyKind, LeafFault, LeafProfile};
use crate::server::{Request, Response};
use crate::util;
use base64::Engine;
use x509_parser::prelude::*;

/// `Content-Type` of every PKCS#7 answer (RFC 7030 §4.1.3 and §4.2.3; protocols.md §6.1a).
pub const PKCS7_CONTENT_TYPE: &str = "application/pkcs7-mime; smime-type=certs-only";
/// The Basic challenge sent with every 401 (RFC 7617 §2).
pub const CHALLENGE: &str = "Basic realm=\"est\"";

/// EST server settings.
#[derive(Clone, Debug)]
pub struct EstConfig {
    /// CA label of the labelled path (RFC 7030 §3.2.2); default `meters`.
    pub label: String,
    /// HTTP Basic user accepted by `simpleenroll`; default `device-enroll`.
    pub username: String,
    /// HTTP Basic password (random per run; one-time-token-like).
    pub password: String,
    /// Seconds in `Retry-After` of the 202 and 503 answers; default 1.
    pub retry_after_s: u32,
    /// Lifetime of issued device certificates in days; default 30.
    pub valid_days: u32,
}

impl EstConfig {
    /// Label `meters`, user `device-enroll`, a random password.
    pub fn generate() -> Self {
        Self {
            label: "meters".into(),
            username: "device-enroll".into(),
            password: util::random_hex(16),
            retry_after_s: 1,
            valid_days: 30,
        }
    }
}

/// How a `simpleenroll` / `simplereenroll` request was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EstAuth {
    /// HTTP Basic with the configured username and password.
    Basic,
    /// A TLS client certificate issued by the Factory CA.
    FactoryCert,
    /// A TLS client certificate issued by the EST issuing CA (re-enrollment).
    DeviceCert,
}

impl EstAuth {
    /// `basic`, `factory-cert` or `device-cert`.
    pub fn name(self) -> &'static str {
        match self {
            EstAuth::Basic => "basic",
            EstAuth::FactoryCert => "factory-cert",
            EstAuth::DeviceCert => "device-cert",
        }
    }
}

/// Mutable EST state: the factory identity handed to tests, and what clients sent.
pub struct EstState {
    /// The factory (IDevID) certificate, DER, issued by the Factory CA for `factory_key`.
    pub(crate) factory_cert: Vec<u8>,
    /// Its P-256 key, PKCS#8 DER.
    pub(crate) factory_key: Vec<u8>,
    pub(crate) enrolls: usize,
    pub(crate) reenrolls: usize,
    pub(crate) csr_hashes: Vec<String>,
    pub(crate) last_auth: Option<EstAuth>,
}

impl EstState {
    /// A fresh P-256 factory identity `O=Acme, CN=sensor-0042 factory`, valid ten years.
    pub(crate) fn new(factory_ca: &CertAuthority) -> Result<Self, String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let factory_key = key.serialize_der();
        let factory_cert =
            pki::issue_client_cert(factory_ca, &factory_key, "Acme", "sensor-0042 factory", 3650)?;
        Ok(Self {
            factory_cert,
            factory_key,
            enrolls: 0,
            reenrolls: 0,
            csr_hashes: Vec::new(),
            last_auth: None,
        })
    }
}

/// The EST operations served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    CaCerts,
    Enroll,
    Reenroll,
}

fn text(status: u16, s: &str) -> Response {
    Response::text(status, &format!("{s}\n"))
}

fn challenge(s: &str) -> Response {
    text(401, s).header("WWW-Authenticate", CHALLENGE)
}

impl Shared {
    /// Everything under `/.well-known/est/`.
    pub(crate) fn est(&self, req: &Request) -> Response {
        let rest = req.path.strip_prefix("/.well-known/est/").unwrap_or_default();
        let parts: Vec<&str> = rest.split('/').collect();
        let op = match parts.as_slice() {
            [op] => *op,
            [label, op] if *label == self.est_cfg.label => *op,
            [label, _] => return text(404, &format!("unknown CA label {label:?}")),
            _ => return text(404, "Not Found"),
        };
        let (op, method) = match op {
            "cacerts" => (Op::CaCerts, "GET"),
            "simpleenroll" => (Op::Enroll, "POST"),
            "simplereenroll" => (Op::Reenroll, "POST"),
            _ => return text(404, &format!("unsupported EST operation {op:?}")),
        };
        if req.method != method {
            return text(405, &format!("use {method}")).header("Allow", method);
        }
        match op {
            Op::CaCerts => self.est_cacerts(),
            Op::Enroll | Op::Reenroll => self.est_enroll(req, op == Op::Reenroll),
        }
    }

    /// RFC 7030 §4.1.3: the current CA certificates, issuing CA then root.
    fn est_cacerts(&self) -> Response {
        let fault = self.take_fault(Endpoint::EstCaCerts, Phase::Answer);
        let certs = [self.pki.est_issuing.der(), self.pki.est_root.der()];
        pkcs7_answer(&certs, fault)
    }

    fn est_enroll(&self, req: &Request, reenroll: bool) -> Response {
        let ep = if reenroll { Endpoint::EstReenroll } else { Endpoint::EstEnroll };
        {
            let mut st = lock(&self.est);
            if reenroll {
                st.reenrolls += 1;
            } else {
                st.enrolls += 1;
            }
        }
        if let Some(f) = self.take_fault(ep, Phase::Early) {
            let r = match f {
                Fault::RejectAuth => challenge("authentication rejected (emulated reject-auth)"),
                Fault::Http503RetryAfter => text(503, "Service Unavailable (emulated)")
                    .header("Retry-After", &self.est_cfg.retry_after_s.to_string()),
                _ => match self.generic_fault(f, false) {
                    Some(r) => return r,
                    None => return text(500, &format!("fault {f} has no EST form")),
                },
            };
            return tag(r, f);
        }
        match self.est_enroll_checked(req, ep, reenroll) {
            Ok(r) | Err(r) => r,
        }
    }

    fn est_enroll_checked(&self, req: &Request, ep: Endpoint, reenroll: bool) -> Result<Response, Response> {
        let ct = req.header("Content-Type").unwrap_or_default().to_ascii_lowercase();
        if ct.split(';').next().map(str::trim) != Some("application/pkcs10") {
            return Err(text(415, "Content-Type must be application/pkcs10 (RFC 7030 §4.2.1)"));
        }
        let (auth, peer) = if reenroll {
            (EstAuth::DeviceCert, Some(self.device_cert_auth(req)?))
        } else {
            (self.enroll_auth(req)?, None)
        };
        lock(&self.est).last_auth = Some(auth);
        let der = decode_base64(&req.body)
            .map_err(|e| text(400, &format!("body is not base64 of a DER PKCS#10 request: {e}")))?;
        lock(&self.est).csr_hashes.push(util::sha256_hex(&[&der]));
        if der.trim_ascii_start().starts_with(b"-----") {
            return Err(text(400, "body is PEM; RFC 7030 §4.2.1 wants base64 of the DER request"));
        }
        let csr = pki::parse_csr(&der).map_err(|e| text(400, &e))?;
        match csr.key {
            KeyKind::P256 => {}
            KeyKind::Rsa(bits) if bits >= 2048 => {}
            other => return Err(text(400, &format!("unsupported key {other:?}: RSA-2048+ or P-256"))),
        }
        if let Some(cert_der) = peer {
            // RFC 7030 §4.2.2: Subject and SubjectAltName identical to the current certificate.
            let (_, cert) =
                X509Certificate::from_der(&cert_der).map_err(|_| text(400, "bad client certificate"))?;
            let cert_san =
                cert.extensions().iter().find(|e| e.oid.to_id_string() == "2.5.29.17").map(|e| e.value);
            if cert.subject().as_raw() != csr.subject_der.as_slice() || cert_san != csr.san_ext_der() {
                return Err(text(403, "subject/SAN differ"));
            }
        }
        if let Some(f) = self.take_fault(ep, Phase::Authenticated) {
            let r = match f {
                Fault::EstPending => {
                    let s = self.est_cfg.retry_after_s.to_string();
                    text(202, &format!("request accepted, pending manual approval; retry after {s} s"))
                        .header("Retry-After", &s)
                }
                _ => text(403, "enrollment refused by policy (emulated est-forbidden)"),
            };
            return Ok(tag(r, f));
        }
        let fault = self.take_fault(ep, Phase::Answer);
        let leaf_fault = match fault {
            Some(Fault::WrongKeyCert) => LeafFault::WrongKey,
            Some(Fault::ExpiredCert) => LeafFault::Expired,
            _ => LeafFault::None,
        };
        let profile = LeafProfile::device(self.est_cfg.valid_days);
        let issued = pki::issue_leaf(&csr, &self.pki.est_issuing, &profile, leaf_fault)
            .map_err(|e| text(400, &format!("cannot issue: {e}")))?;
        if fault.is_none() {
            self.record_issued(&issued.der);
        }
        let certs: Vec<&[u8]> = if fault == Some(Fault::EstExtraCerts) {
            vec![self.pki.est_root.der(), self.pki.est_issuing.der(), &issued.der]
        } else {
            vec![&issued.der]
        };
        Ok(pkcs7_answer(&certs, fault))
    }

    /// `simpleenroll`: a Factory CA client certificate, else HTTP Basic (RFC 7030 §3.2.3, §3.3.2).
    fn enroll_auth(&self, req: &Request) -> Result<EstAuth, Response> {
        if let Some(der) = &req.peer_cert {
            if issued_by(der, &self.pki.factory_ca).is_ok() {
                return Ok(EstAuth::FactoryCert);
            }
        }
        let Some(value) = req.header("Authorization") else {
            return Err(challenge("authentication required: a factory certificate or HTTP Basic"));
        };
        let (scheme, b64) = value.split_once(' ').unwrap_or((value, ""));
        let creds = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let ok = scheme.eq_ignore_ascii_case("basic")
            && creds
                .as_deref()
                .and_then(|c| c.split_once(':'))
                .is_some_and(|(u, p)| u == self.est_cfg.username && p == self.est_cfg.password);
        if ok {
            Ok(EstAuth::Basic)
        } else {
            Err(challenge("wrong username or password"))
        }
    }

    /// `simplereenroll`: an unexpired client certificate from the EST issuing CA (§3.3.2, §4.2.2).
    fn device_cert_auth(&self, req: &Request) -> Result<Vec<u8>, Response> {
        let Some(der) = &req.peer_cert else {
            return Err(text(
                403,
                "simplereenroll requires the current certificate as TLS client certificate",
            ));
        };
        let valid = issued_by(der, &self.pki.est_issuing).map_err(|e| text(403, &e))?;
        if !valid {
            return Err(text(403, "client certificate is expired or not yet valid"));
        }
        Ok(der.clone())
    }
}

/// Whether `der` is signed by `ca` (issuer name and signature); `Ok(valid now)`.
pub(crate) fn issued_by(der: &[u8], ca: &CertAuthority) -> Result<bool, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("bad client certificate: {e}"))?;
    let (_, ca_cert) = X509Certificate::from_der(ca.der()).map_err(|e| e.to_string())?;
    if cert.issuer().as_raw() != ca_cert.subject().as_raw()
        || cert.verify_signature(Some(ca_cert.public_key())).is_err()
    {
        return Err(format!("client certificate was not issued by {}", common_name(ca_cert.subject())));
    }
    Ok(cert.validity().is_valid())
}

/// The first CN of a Name, or its whole text form.
pub(crate) fn common_name(name: &X509Name) -> String {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| name.to_string())
}

/// Base64 with any ASCII whitespace (space, tab, CR, LF) ignored (RFC 8951 §3 / protocols.md §6.1a).
pub fn decode_base64(body: &[u8]) -> Result<Vec<u8>, String> {
    let compact: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err("empty body".into());
    }
    base64::engine::general_purpose::STANDARD.decode(&compact).map_err(|e| e.to_string())
}

/// How a PKCS#7 answer's base64 is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One line, no line break (the default; what strongSwan reads).
    Unwrapped,
    /// Lines of at most this many characters, each ended by LF (`true`: CRLF).
    Wrapped(usize, bool),
}

/// Base64 of `der` in `layout`.
pub fn base64_layout(der: &[u8], layout: Layout) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    match layout {
        Layout::Unwrapped => b64.into_bytes(),
        Layout::Wrapped(width, crlf) => {
            let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
            let mut out = Vec::new();
            for line in b64.as_bytes().chunks(width) {
                out.extend_from_slice(line);
                out.extend_from_slice(eol);
            }
            out
        }
    }
}

const OID_SIGNED_DATA: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
const OID_DATA: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// BER constructed encoding with indefinite length: `tag 0x80 … 00 00` (X.690 §8.1.3.6).
fn ber_indefinite(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, 0x80];
    out.extend_from_slice(content);
    out.extend_from_slice(&[0, 0]);
    out
}

/// A degenerate ("certs-only") CMS SignedData (RFC 5652 §5.1; RFC 7030 §4.1.3 and §4.2.3):
/// version 1, no digest algorithms, id-data without content, `certs`, no signers. `ber`:
/// indefinite lengths on every constructed level above the certificates (which stay DER). With
/// `sort`, the certificates are DER-sorted as a SET OF must be (X.690 §11.6); without, they
/// stay in the order given.
pub fn certs_only(certs: &[&[u8]], ber: bool, sort: bool) -> Vec<u8> {
    let mut certs: Vec<&[u8]> = certs.to_vec();
    if sort {
        // X.690 §11.6: compare as octet strings, the shorter padded with zero octets.
        certs.sort_by(|a, b| {
            let n = a.len().max(b.len());
            let pad = |v: &[u8]| v.iter().copied().chain(std::iter::repeat(0)).take(n).collect::<Vec<u8>>();
            pad(a).cmp(&pad(b))
        });
    }
    let set: Vec<u8> = certs.concat();
    let c = |tag: u8, content: &[u8]| if ber { ber_indefinite(tag, content) } else { der_tlv(tag, content) };
    let mut signed = vec![0x02, 0x01, 0x01, 0x31, 0x00];
    signed.extend(c(0x30, OID_DATA));
    signed.extend(c(0xa0, &set));
    signed.extend_from_slice(&[0x31, 0x00]);
    let mut content_info = OID_SIGNED_DATA.to_vec();
    content_info.extend(c(0xa0, &c(0x30, &signed)));
    c(0x30, &content_info)
}

/// A 200 PKCS#7 answer shaped by an answer-phase `fault` (layout, encoding, body damage).
fn pkcs7_answer(certs: &[&[u8]], fault: Option<Fault>) -> Response {
    let ber = fault == Some(Fault::EstBer);
    let der = certs_only(certs, ber, fault != Some(Fault::EstExtraCerts));
    let layout = match fault {
        Some(Fault::EstWrap64) => Layout::Wrapped(64, false),
        Some(Fault::EstWrap76) => Layout::Wrapped(76, false),
        Some(Fault::EstCrlf) => Layout::Wrapped(76, true),
        _ => Layout::Unwrapped,
    };
    let mut r = Response::new(200)
        .header("Content-Type", PKCS7_CONTENT_TYPE)
        .header("Content-Transfer-Encoding", "base64")
        .body(base64_layout(&der, layout));
    let Some(f) = fault else { return r };
    match f {
        Fault::MalformedJson => {
            r.body = b"<html><body>EST: this is not base64 (emulated)</body></html>\n".to_vec()
        }
        // Cut inside a 4-character quantum, so no prefix decodes cleanly.
        Fault::TruncatedJson => {
            let cut = (r.body.len() / 2) | 1;
            r.body.truncate(cut);
        }
        Fault::TruncatedBody => r.truncate_body_at = Some(r.body.len() / 2),
        Fault::AbsurdDate => r = r.header("Date", "Thu, 01 Jan 99999999999999 00:00:00 GMT"),
        _ => {}
    }
    tag(r, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_layouts_and_whitespace() {
        let der: Vec<u8> = (0..=255u8).collect();
        let one = base64_layout(&der, Layout::Unwrapped);
        assert!(!one.contains(&b'\n'));
        let w64 = String::from_utf8(base64_layout(&der, Layout::Wrapped(64, false))).unwrap();
        assert!(w64.lines().all(|l| l.len() <= 64) && w64.lines().next().unwrap().len() == 64);
        let crlf = String::from_utf8(base64_layout(&der, Layout::Wrapped(76, true))).unwrap();
        assert!(crlf.contains("\r\n") && crlf.split("\r\n").next().unwrap().len() == 76);
        let spaced: Vec<u8> = crlf.bytes().flat_map(|b| [b, b' ', b'\t']).collect();
        assert_eq!(decode_base64(&spaced).unwrap(), der);
        assert!(decode_base64(b"@@@@").is_err() && decode_base64(b" \n").is_err());
    }

    #[test]
    fn der_lengths_and_ber_end_of_contents() {
        assert_eq!(der_tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der_tlv(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let ber = certs_only(&[&b"\x30\x00"[..]], true, true);
        assert_eq!(&ber[..2], &[0x30, 0x80]);
        assert!(ber.ends_with(&[0x31, 0, 0, 0, 0, 0, 0, 0]), "three end-of-contents after signerInfos");
        let der = certs_only(&[&b"\x30\x03\x02\x01\x05"[..], &b"\x30\x00"[..]], false, true);
        // Sorted SET OF: the shorter `30 00` sorts first.
        let set_start = der.windows(2).position(|w| w == [0x30, 0x00]).unwrap();
        assert!(set_start < der.windows(3).position(|w| w == [0x30, 0x03, 0x02]).unwrap());
    }
}
