//! SCEP client, RFC 8894 (protocols.md §6.2, design.md §10).
//!
//! `GetCACaps` decides POST or GET and the content cipher (AES, else DES3, else DES); `GetCACert`
//! must contain the certificate `ca_fingerprint` pins, and that CA (or an RA it issued) is the only
//! key whose CertRep we believe. `enroll`: PKCSReq — our CSR with the challengePassword,
//! encrypted to the CA, signed by the new key under a self-signed certificate. `renew`:
//! RenewalReq signed by the current certificate and key when the server lists `Renewal`, else
//! PKCSReq again. The CA encrypts its answer to the signer's key, so the device key decrypts it
//! in place (file, PKCS#11 or TPM; RSA only). `PENDING` becomes the pending request
//! `scep:<transactionID>` and [`Scep::poll`] sends CertPoll with the same transactionID.

pub mod config;
pub mod envelope;
pub mod message;
pub use config::*;

use std::sync::Arc;

use base64::Engine;
use enroll_hal::DeviceKey;

use crate::backend::{CaBackend, Credentials, Current, Outcome, Poll, Polling, Request};
use crate::error::{Context, Error, Result};
use crate::http::{self, Http, Response};
use crate::pki::{Cert, Issued};
use envelope::Cipher;
use message::{Answer, Expected, MessageType, Signer};

pub const CREDENTIALS: Credentials = Credentials {
    enroll: "challenge password (in the PKCSReq CSR, from ca.challenge_password_file)",
    renew: "the device certificate (RenewalReq signed with it; PKCSReq with the challenge where the server \
            does not list Renewal)",
};
pub const CREDENTIALS_RENEW_ONLY: Credentials = Credentials {
    enroll: "none configured (ca.challenge_password_file): this device can only renew",
    renew: CREDENTIALS.renew,
};

/// Pending request ids: `scep:<transactionID>` for PKCSReq, `scep-renewal:<transactionID>` for
/// RenewalReq (the CertPoll is signed by the same certificate as the request it asks about).
const PENDING_ENROLL: &str = "scep:";
const PENDING_RENEWAL: &str = "scep-renewal:";

/// What `GetCACaps` offered (RFC 8894 §3.5.2), as far as it changes what we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub post: bool,
    pub renewal: bool,
    pub cipher: Cipher,
    /// SHA-256 (or SCEPStandard, which implies it): the only digest our keys sign with.
    pub sha256: bool,
}

/// Reads a GetCACaps body: one capability per line, case-insensitive (RFC 8894 §3.5.2).
pub fn parse_caps(body: &[u8]) -> Caps {
    let text = String::from_utf8_lossy(body);
    let has = |cap: &str| text.split_whitespace().any(|word| word.eq_ignore_ascii_case(cap));
    // SCEPStandard means AES, POSTPKIOperation and SHA-256 (RFC 8894 §3.5.2).
    let standard = has("SCEPStandard");
    let cipher = if standard || has("AES") {
        Cipher::Aes256
    } else if has("DES3") {
        Cipher::Des3
    } else {
        Cipher::Des
    };
    Caps {
        post: standard || has("POSTPKIOperation"),
        renewal: has("Renewal"),
        cipher,
        sha256: standard || has("SHA-256"),
    }
}

/// The CA certificates `GetCACert` returned, checked against the pinned fingerprint.
#[derive(Debug, Clone)]
pub struct CaCerts {
    /// The pinned CA first, then RA certificates it issued.
    pub trusted: Vec<Cert>,
    /// Index into `trusted` of the certificate requests are encrypted to (the RA's, if any).
    pub recipient: usize,
}

/// Reads a GetCACert answer: one DER certificate (`application/x-x509-ca-cert`) or a certs-only
/// PKCS#7 with the CA and its RA (`application/x-x509-ca-ra-cert`, RFC 8894 §4.2.1.2); keeps
/// the certificate whose SHA-256 is `fingerprint` and the RA certificates it signed.
pub fn read_ca_certs(body: &[u8], fingerprint: &[u8; 32]) -> Result<CaCerts> {
    let malformed = |e: String| Error::protocol(format!("SCEP GetCACert: {e}"));
    let ders = match Cert::from_der(body) {
        Ok(_) => vec![body.to_vec()],
        Err(_) => crate::pkcs7::certificates(body)
            .map_err(|e| malformed(format!("neither a DER certificate nor a certs-only PKCS#7 ({e})")))?,
    };
    let certs: Vec<Cert> = ders
        .iter()
        .map(|der| Cert::from_der(der).context("SCEP GetCACert: a certificate in the answer"))
        .collect::<Result<_>>()?;
    let Some(ca) =
        certs.iter().find(|c| ring::digest::digest(&ring::digest::SHA256, &c.der).as_ref() == fingerprint)
    else {
        let seen: Vec<String> =
            certs.iter().map(|c| hex(ring::digest::digest(&ring::digest::SHA256, &c.der).as_ref())).collect();
        return Err(Error::refused(format!(
            "SCEP GetCACert: no certificate matches ca.ca_fingerprint (the server sent SHA-256 {})",
            seen.join(", ")
        )));
    };
    let mut trusted = vec![ca.clone()];
    trusted.extend(certs.iter().filter(|c| c.der != ca.der && c.is_signed_by(ca)).cloned());
    // An RA that may encrypt (keyEncipherment) receives the request; else the CA itself.
    let recipient = (1..trusted.len()).find(|i| trusted[*i].allows_key_encipherment()).unwrap_or(0);
    Ok(CaCerts { trusted, recipient })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The transactionID (RFC 8894 §3.2.1.1): SHA-256 of the public key being certified, so a
/// request resent for the same key is the same transaction. A renewal also hashes the
/// certificate it replaces: with `rotate_on_renew: false` the key is the enrollment's, and a
/// server must not take the renewal for that finished transaction.
pub fn transaction_id(spki: &[u8], renewing: Option<&Cert>) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(spki);
    if let Some(cert) = renewing {
        context.update(&cert.der);
    }
    hex(context.finish().as_ref())
}

/// failInfo (RFC 8894 §3.2.1.4) as an error of the right class.
pub fn failure(operation: &str, fail_info: Option<u8>) -> Error {
    let (name, refused) = match fail_info {
        Some(0) => ("badAlg: the CA does not accept our algorithms", false),
        Some(1) => ("badMessageCheck: the CA could not verify our signature", false),
        Some(2) => ("badRequest: the CA refused the request (wrong challenge password, or its policy)", true),
        Some(3) => ("badTime: the CA says our message time is wrong", true),
        Some(4) => ("badCertId: the CA does not know the certificate we signed with", true),
        Some(_) => ("an unknown failInfo", true),
        None => ("no failInfo given", true),
    };
    let message = format!("SCEP {operation}: FAILURE, {name}");
    let code = fail_info.map(i64::from);
    let error = if refused { Error::refused(message) } else { Error::protocol(message) };
    error.with_answer(200, code, name)
}

pub fn credentials(settings: &ScepSettings) -> Credentials {
    match settings.challenge {
        Some(_) => CREDENTIALS,
        None => CREDENTIALS_RENEW_ONLY,
    }
}

pub struct Scep<'a> {
    settings: &'a ScepSettings,
    http: Http,
    caps: Option<Caps>,
    ca: Option<CaCerts>,
}

/// Who signs a request and decrypts its answer.
struct Credential {
    cert: Cert,
    key: Arc<dyn DeviceKey>,
}

impl<'a> Scep<'a> {
    pub fn new(settings: &'a ScepSettings, http: Http) -> Self {
        Scep { settings, http, caps: None, ca: None }
    }

    fn url(&self, operation: &str) -> String {
        let mut url = format!("{}?operation={operation}", self.settings.url);
        if let Some(id) = &self.settings.ca_identifier {
            url.push_str(&format!("&message={}", http::query_escape(id)));
        }
        url
    }

    fn get(&self, operation: &str) -> Result<Response> {
        let what = format!("SCEP {operation}");
        let response = self.http.send(&what, "GET", &self.url(operation), &[], None)?;
        if !response.is_success() {
            return Err(http::status_error(&what, &response));
        }
        Ok(response)
    }

    /// `GetCACaps`, once per run.
    fn caps(&mut self) -> Result<Caps> {
        if let Some(caps) = self.caps {
            return Ok(caps);
        }
        let caps = parse_caps(&self.get("GetCACaps")?.body);
        if !caps.sha256 {
            return Err(Error::protocol(
                "SCEP GetCACaps: the server lists neither SHA-256 nor SCEPStandard; this agent signs with \
                 SHA-256 only",
            ));
        }
        log::debug!("SCEP capabilities: {caps:?}");
        self.caps = Some(caps);
        Ok(caps)
    }

    /// `GetCACert`, once per run, pinned by `ca_fingerprint`.
    fn ca(&mut self) -> Result<CaCerts> {
        if let Some(ca) = &self.ca {
            return Ok(ca.clone());
        }
        let ca = read_ca_certs(&self.get("GetCACert")?.body, &self.settings.ca_fingerprint)?;
        self.ca = Some(ca.clone());
        Ok(ca)
    }

    /// Sends a pkiMessage and reads the CertRep (POST when the server lists POSTPKIOperation,
    /// else GET with the base64 message, RFC 8894 §4.1).
    fn operation(
        &mut self,
        kind: MessageType,
        tid: &str,
        content: &[u8],
        signer: &Credential,
    ) -> Result<Answer> {
        let caps = self.caps()?;
        let ca = self.ca()?;
        let envelope = envelope::seal(content, &ca.trusted[ca.recipient], caps.cipher)?;
        let outgoing =
            message::sign(kind, tid, &envelope, &Signer { cert: &signer.cert, key: signer.key.as_ref() })?;
        let what = format!("SCEP {kind:?}");
        let response = if caps.post {
            let headers = [("Content-Type", "application/x-pki-message")];
            self.http.send(&what, "POST", &self.url("PKIOperation"), &headers, Some(&outgoing.der))?
        } else {
            let message = base64::engine::general_purpose::STANDARD.encode(&outgoing.der);
            let url = format!(
                "{}?operation=PKIOperation&message={}",
                self.settings.url,
                http::query_escape(&message)
            );
            self.http.send(&what, "GET", &url, &[], None)?
        };
        if !response.is_success() {
            return Err(http::status_error(&what, &response));
        }
        let expected =
            Expected { transaction_id: tid, sender_nonce: &outgoing.sender_nonce, ca_certs: &ca.trusted };
        message::read_cert_rep(&response.body, &expected).context(format!("answering {what}"))
    }

    /// The certificates of a SUCCESS answer, decrypted with the key that signed the request.
    fn issued(&self, encrypted: &[u8], key: &dyn DeviceKey, expected_spki: &[u8]) -> Result<Issued> {
        let content = envelope::open(encrypted, key)?;
        let ders = crate::pkcs7::certificates(&content).map_err(|e| {
            Error::protocol(format!("SCEP CertRep: the decrypted answer is not certs-only PKCS#7: {e}"))
        })?;
        let mut certs: Vec<Cert> = ders
            .iter()
            .map(|d| Cert::from_der(d).context("SCEP CertRep: a certificate"))
            .collect::<Result<_>>()?;
        // The leaf is the one for our key; with none, the §5 checks report the mismatch.
        let leaf_at = certs.iter().position(|c| c.spki_der() == expected_spki).unwrap_or(0);
        if certs.is_empty() {
            return Err(Error::protocol("SCEP CertRep: SUCCESS without a certificate"));
        }
        let leaf = certs.remove(leaf_at);
        let ca = self.ca.as_ref().map(|ca| ca.trusted[0].clone());
        certs.extend(ca.filter(|ca| !certs.iter().any(|c| c.der == ca.der)));
        let (roots, intermediates): (Vec<Cert>, Vec<Cert>) =
            certs.into_iter().filter(|c| c.der != leaf.der).partition(Cert::is_self_issued);
        Ok(Issued {
            leaf: leaf.der,
            intermediates: intermediates.into_iter().map(|c| c.der).collect(),
            roots: roots.into_iter().map(|c| c.der).collect(),
            ca_ref: None,
        })
    }

    fn outcome(
        &self,
        operation: &str,
        answer: Answer,
        signer: &Credential,
        spki: &[u8],
        id: String,
    ) -> Result<Outcome> {
        match answer {
            Answer::Success(encrypted) => {
                self.issued(&encrypted, signer.key.as_ref(), spki).map(Outcome::Issued)
            }
            Answer::Pending => Ok(Outcome::Pending { request_id: id }),
            Answer::Failure(info) => Err(failure(operation, info)),
        }
    }

    /// PKCSReq: the CSR with the challenge, signed under a self-signed certificate of the new key.
    /// `renewing`: the certificate a PKCSReq renews (servers without `Renewal`).
    fn pkcs_req(&mut self, request: &Request, renewing: Option<&Cert>) -> Result<Outcome> {
        let key = request_key(request)?;
        let Some(challenge) = &self.settings.challenge else {
            return Err(Error::config(
                "ca.challenge_password_file: SCEP enrollment (PKCSReq) needs the challenge password",
            ));
        };
        let csr = crate::csr::build_with_challenge(
            key.as_ref(),
            request.subject,
            request.sans,
            challenge.expose(),
        )?;
        let signer = self_signed(&key, request)?;
        let tid = transaction_id(key.public_key_spki(), renewing);
        let answer = self.operation(MessageType::PkcsReq, &tid, &csr.der, &signer)?;
        self.outcome("PKCSReq", answer, &signer, key.public_key_spki(), format!("{PENDING_ENROLL}{tid}"))
    }

    /// RenewalReq: the new CSR signed by the current identity (RFC 8894 §3.3.1.2).
    fn renewal_req(&mut self, request: &Request, current: &Current) -> Result<Outcome> {
        let new_key = request_key(request)?;
        let signer = Credential {
            cert: current.cert.clone(),
            key: crate::backend::current_key(current, "SCEP RenewalReq")?,
        };
        // micromdm's scepserver checks the challenge on RenewalReq too (its challenge middleware
        // sees every CSR), although RFC 8894 §2.3 lets the signing certificate authenticate it;
        // so the challenge goes in when the device has one.
        let csr = match &self.settings.challenge {
            Some(challenge) => crate::csr::build_with_challenge(
                new_key.as_ref(),
                request.subject,
                request.sans,
                challenge.expose(),
            )?,
            None => crate::csr::build(new_key.as_ref(), request.subject, request.sans)?,
        };
        let tid = transaction_id(new_key.public_key_spki(), Some(current.cert));
        let answer = self.operation(MessageType::RenewalReq, &tid, &csr.der, &signer)?;
        self.outcome(
            "RenewalReq",
            answer,
            &signer,
            new_key.public_key_spki(),
            format!("{PENDING_RENEWAL}{tid}"),
        )
    }
}

/// The key the CSR is for: SCEP signs and decrypts with it, so callers that only hold a CSR
/// (the gateway) cannot use SCEP upstream.
fn request_key(request: &Request) -> Result<Arc<dyn DeviceKey>> {
    request.key.clone().ok_or_else(|| {
        Error::refused("SCEP signs its messages with the requested key, which this caller does not hold")
    })
}

/// The self-signed certificate that carries the new key in a PKCSReq (RFC 8894 §2.3).
fn self_signed(key: &Arc<dyn DeviceKey>, request: &Request) -> Result<Credential> {
    let subject = crate::csr::encode_name(request.subject)?;
    let der = crate::pki::self_signed(key.as_ref(), subject, Vec::new(), 86_400)?;
    Ok(Credential { cert: Cert::from_der(&der)?, key: key.clone() })
}

impl CaBackend for Scep<'_> {
    fn name(&self) -> &'static str {
        "scep"
    }

    fn enroll(&mut self, request: &Request) -> Result<Outcome> {
        self.pkcs_req(request, None)
    }

    fn renew(&mut self, request: &Request, current: &Current) -> Result<Outcome> {
        if self.caps()?.renewal {
            return self.renewal_req(request, current);
        }
        log::info!("the SCEP server does not list Renewal: renewing with PKCSReq and the challenge password");
        self.pkcs_req(request, Some(current.cert))
    }

    fn credentials(&self) -> Credentials {
        credentials(self.settings)
    }

    fn probe_url(&self) -> String {
        self.url("GetCACaps")
    }

    fn plain_http_protection(&self) -> Option<&'static str> {
        Some("SCEP messages are signed and encrypted, the CA pinned by ca.ca_fingerprint")
    }

    fn polling(&self) -> Option<Polling> {
        Some(self.settings.polling)
    }

    /// CertPoll (RFC 8894 §3.3.3) for the transaction, signed as the request was.
    fn poll(&mut self, request_id: &str, request: &Request, current: Option<&Current>) -> Result<Poll> {
        let key = request_key(request)?;
        let (renewal, tid) =
            match (request_id.strip_prefix(PENDING_RENEWAL), request_id.strip_prefix(PENDING_ENROLL)) {
                (Some(tid), _) => (true, tid),
                (None, Some(tid)) => (false, tid),
                _ => return Err(Error::protocol(format!("{request_id} is not a SCEP transaction"))),
            };
        if tid != transaction_id(key.public_key_spki(), current.map(|c| c.cert)) {
            return Ok(Poll::Ended(Error::protocol("the pending SCEP transaction was for another key")));
        }
        let (signer, operation) = match (renewal, current) {
            (true, Some(current)) => (
                Credential {
                    cert: current.cert.clone(),
                    key: crate::backend::current_key(current, "SCEP CertPoll")?,
                },
                "CertPoll (renewal)",
            ),
            _ => (self_signed(&key, request)?, "CertPoll"),
        };
        let ca = self.ca()?;
        let content =
            message::issuer_and_subject(&ca.trusted[0], &crate::csr::encode_name(request.subject)?)?;
        match self.operation(MessageType::CertPoll, tid, &content, &signer)? {
            Answer::Pending => Ok(Poll::NotYet("PENDING".into())),
            Answer::Success(encrypted) => {
                self.issued(&encrypted, signer.key.as_ref(), key.public_key_spki()).map(Poll::Issued)
            }
            Answer::Failure(info) => Ok(Poll::Ended(failure(operation, info))),
        }
    }
}

impl crate::backend::Protocol for ScepSettings {
    fn parse(fields: &mut crate::fields::Fields, allow_http: bool) -> Result<Self> {
        config::parse(fields, allow_http)
    }

    fn client(&self, http: Http) -> Box<dyn CaBackend + '_> {
        Box::new(Scep::new(self, http))
    }

    fn credentials(&self) -> Credentials {
        credentials(self)
    }

    fn check_key(&self, algorithm: enroll_hal::Algorithm, remote: bool) -> Result<()> {
        config::check_key(algorithm, remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_pick_post_aes_and_renewal_and_fall_back_to_des() {
        let micromdm = parse_caps(b"Renewal\nSHA-1\nSHA-256\nAES\nDES3\nSCEPStandard\nPOSTPKIOperation\n");
        assert_eq!(micromdm, Caps { post: true, renewal: true, cipher: Cipher::Aes256, sha256: true });
        let old = parse_caps(b"des3\r\nsha-256\r\n");
        assert_eq!(old, Caps { post: false, renewal: false, cipher: Cipher::Des3, sha256: true });
        assert_eq!(parse_caps(b"").cipher, Cipher::Des);
        assert!(!parse_caps(b"SHA-1").sha256);
    }

    #[test]
    fn fail_info_maps_to_refused_or_protocol() {
        assert_eq!(failure("PKCSReq", Some(2)).kind().exit_code(), 77);
        assert_eq!(failure("PKCSReq", Some(1)).kind().exit_code(), 76);
        assert!(failure("PKCSReq", Some(2)).to_string().contains("badRequest"));
    }
}
