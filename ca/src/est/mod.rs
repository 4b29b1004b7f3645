//! EST client, RFC 7030 with RFC 8951 (protocols.md §6.1, §6.1a; design.md §8).
//!
//! `enroll`: `GET cacerts`, then `POST simpleenroll` authenticated with the bootstrap credential
//! (a factory TLS client certificate, or HTTP Basic over verified TLS). `renew`: `POST
//! simplereenroll` over TLS client authentication with the current certificate, its key signing
//! in place through the key provider. Requests are base64 DER PKCS#10 without line breaks;
//! answers are base64 certs-only PKCS#7, DER or BER, with any whitespace. `202` + `Retry-After`
//! means pending: the lifecycle keeps the CSR and [`Est::poll`] sends the identical bytes again.

pub mod config;
pub use config::*;

use std::sync::Arc;

use base64::Engine;
use enroll_hal::DeviceKey;

use crate::backend::Polling;
use crate::backend::{CaBackend, Credentials, Current, Outcome, Poll, Request};
use crate::error::{Context, Error, Result};
use crate::http::{self, Http, Response};
use crate::pki::{self, Cert, Issued};
use crate::secret::Secret;
use crate::tls::ClientIdentity;

const CACERTS: &str = "cacerts";
const SIMPLEENROLL: &str = "simpleenroll";
const SIMPLEREENROLL: &str = "simplereenroll";

pub const CREDENTIALS_CERTIFICATE: Credentials = Credentials {
    enroll: "factory certificate (TLS client authentication with ca.bootstrap.cert_file)",
    renew: "the device certificate (TLS client authentication)",
};
pub const CREDENTIALS_BASIC: Credentials = Credentials {
    enroll: "one-time password (HTTP Basic with ca.bootstrap.username and password_file)",
    renew: "the device certificate (TLS client authentication)",
};
pub const CREDENTIALS_NONE: Credentials = Credentials {
    enroll: "none configured (ca.bootstrap): this device can only renew",
    renew: "the device certificate (TLS client authentication)",
};

pub fn credentials(settings: &EstSettings) -> Credentials {
    match &settings.bootstrap {
        Some(EstBootstrap::Certificate { .. }) => CREDENTIALS_CERTIFICATE,
        Some(EstBootstrap::Basic { .. }) => CREDENTIALS_BASIC,
        None => CREDENTIALS_NONE,
    }
}

/// `<url>/.well-known/est/[<label>/]<operation>` (RFC 7030 §3.2.2).
pub fn operation_url(url: &str, label: Option<&str>, operation: &str) -> String {
    let base = url.trim_end_matches('/');
    match label {
        Some(label) => format!("{base}/.well-known/est/{label}/{operation}"),
        None => format!("{base}/.well-known/est/{operation}"),
    }
}

/// The request id recorded for a pending (202) request: the SHA-256 of the CSR DER, which is
/// how servers key pending work (OpenXPKI) and what the identical resend carries.
pub fn request_id(csr_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, csr_der);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("est:{hex}")
}

/// Base64 with any whitespace (CR, LF, space, tab) anywhere, padding optional (RFC 8951: the
/// body is base64 whatever `Content-Transfer-Encoding` says).
pub fn decode_base64(body: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let compact: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err("the body is empty".into());
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(&compact).map_err(|e| format!("the body is not base64: {e}"))
}

/// The content types a certs-only answer may carry: `application/pkcs7-mime` with any
/// parameters (and no header at all).
fn is_pkcs7(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(ct) => ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/pkcs7-mime"),
    }
}

/// The certificates of a `200` certs-only answer.
pub(crate) fn certs_of(step: &str, response: &Response) -> Result<Vec<Cert>> {
    if !is_pkcs7(response.content_type.as_deref()) {
        return Err(Error::protocol(format!(
            "{step}: HTTP 200 with content type {:?}, not application/pkcs7-mime",
            response.content_type.as_deref().unwrap_or("")
        )));
    }
    let malformed =
        |e: String| Error::protocol(format!("{step}: the answer is not a base64 certs-only PKCS#7: {e}"));
    let der = decode_base64(&response.body).map_err(malformed)?;
    let certs = crate::pkcs7::certificates(&der).map_err(malformed)?;
    certs
        .iter()
        .map(|der| Cert::from_der(der).context(format!("{step}: a certificate in the answer")))
        .collect()
}

/// Which identity authenticates a request.
enum Auth<'a> {
    /// TLS client authentication with this chain and key.
    Tls(&'a [Vec<u8>], Arc<dyn DeviceKey>),
    /// HTTP Basic (the bootstrap password).
    Basic(&'a str, &'a Secret),
}

pub struct Est<'a> {
    settings: &'a EstSettings,
    /// Server authentication only (cacerts).
    http: Http,
    /// What `cacerts` returned in this run (ca.pem).
    cacerts: Option<Vec<Cert>>,
    /// The server's Retry-After from its last answer.
    retry_after: Option<u64>,
}

impl<'a> Est<'a> {
    pub fn new(settings: &'a EstSettings, http: Http) -> Self {
        Est { settings, http, cacerts: None, retry_after: None }
    }

    fn url(&self, operation: &str) -> String {
        operation_url(&self.settings.url, self.settings.label.as_deref(), operation)
    }

    /// `GET cacerts`, once per run.
    fn cacerts(&mut self) -> Result<Vec<Cert>> {
        if let Some(certs) = &self.cacerts {
            return Ok(certs.clone());
        }
        const STEP: &str = "EST cacerts";
        let response =
            self.http.send(STEP, "GET", &self.url(CACERTS), &[("Accept", "application/pkcs7-mime")], None)?;
        if response.status != 200 {
            return Err(http::status_error(STEP, &response));
        }
        let certs = certs_of(STEP, &response)?;
        if certs.is_empty() {
            return Err(Error::protocol(format!("{STEP}: the answer holds no certificate")));
        }
        self.cacerts = Some(certs.clone());
        Ok(certs)
    }

    /// An HTTP client that presents `chain` and signs with `key` (in place, through the HAL).
    fn mtls(&self, chain: &[Vec<u8>], key: Arc<dyn DeviceKey>) -> Result<Http> {
        self.http.with_identity(ClientIdentity { chain: chain.to_vec(), key })
    }

    /// The bootstrap credential, or 77 saying there is none.
    fn bootstrap_auth(&self) -> Result<Auth<'a>> {
        match &self.settings.bootstrap {
            Some(EstBootstrap::Certificate { chain, key }) => Ok(Auth::Tls(chain, key.clone())),
            Some(EstBootstrap::Basic { username, password }) => Ok(Auth::Basic(username, password)),
            None => Err(Error::refused(
                "EST enrollment (simpleenroll) needs a bootstrap credential and ca.bootstrap is not configured \
                 (give cert_file + key_file, or username + password_file)",
            )),
        }
    }

    /// Sends the CSR to `operation` and reads the answer.
    fn send_csr(&mut self, operation: &str, request: &Request, auth: Auth) -> Result<Outcome> {
        let step = format!("EST {operation}");
        let body = base64::engine::general_purpose::STANDARD.encode(&request.csr.der);
        let url = self.url(operation);
        let mut headers = vec![("Content-Type", "application/pkcs10"), ("Accept", "application/pkcs7-mime")];
        let credential = match (&auth, operation) {
            (Auth::Basic(..), _) => "the bootstrap password (HTTP Basic)",
            (Auth::Tls(..), SIMPLEREENROLL) => "the device certificate",
            (Auth::Tls(..), _) => "the factory certificate",
        };
        let basic;
        let http = match auth {
            Auth::Tls(chain, key) => self.mtls(chain, key)?,
            Auth::Basic(username, password) => {
                let pair = zeroize::Zeroizing::new(format!("{username}:{}", password.expose()));
                basic = zeroize::Zeroizing::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
                ));
                headers.push(("Authorization", basic.as_str()));
                self.http.clone()
            }
        };
        let response = http.send(&step, "POST", &url, &headers, Some(body.as_bytes()))?;
        self.answer(&step, request, &response, credential)
    }

    fn answer(
        &mut self,
        step: &str,
        request: &Request,
        response: &Response,
        credential: &str,
    ) -> Result<Outcome> {
        self.retry_after = response.retry_after;
        match response.status {
            200 => {}
            // 202 (RFC 7030 §4.2.3); 206 as one vendor documents it (protocols.md §6.1).
            202 | 206 => return Ok(Outcome::Pending { request_id: request_id(&request.csr.der) }),
            401 => {
                return Err(Error::refused(format!(
                    "{step}: the EST server refused {credential}: HTTP 401: {}",
                    response.excerpt()
                )))
            }
            403 => {
                return Err(Error::refused(format!(
                    "{step}: the EST server refused the request made with {credential}: HTTP 403: {}",
                    response.excerpt()
                )))
            }
            _ => {
                let error = http::status_error(step, response);
                return Err(match error.retry_after() {
                    Some(seconds) => error.context(format!("the server asks to retry after {seconds} s")),
                    None => error,
                });
            }
        }
        let mut certs = certs_of(step, response)?;
        let spki = pki::verify_csr(&request.csr.der).context("reading our own CSR")?;
        let Some(position) = certs.iter().position(|c| c.spki_der() == spki) else {
            return Err(Error::protocol(format!(
                "{step}: the answer does not carry our public key (none of its {} certificate(s) is for our key)",
                certs.len()
            )));
        };
        let leaf = certs.remove(position);
        let cacerts = self.cacerts()?;
        Ok(Outcome::Issued(Issued {
            leaf: leaf.der,
            intermediates: certs.into_iter().map(|c| c.der).collect(),
            roots: cacerts.into_iter().map(|c| c.der).collect(),
            ca_ref: None,
        }))
    }

    fn reenroll(&mut self, request: &Request, current: &Current) -> Result<Outcome> {
        let wanted = crate::csr::encode_name(request.subject)?.to_string();
        if current.cert.subject() != wanted {
            // RFC 7030 §4.2.2: the server may refuse a re-enroll whose subject changed.
            log::warn!(
                "the configured subject {wanted:?} differs from the current certificate's {:?}; the EST \
                 server may refuse the re-enrollment",
                current.cert.subject()
            );
        }
        let chain: Vec<Vec<u8>> =
            std::iter::once(current.cert.der.clone()).chain(current.chain.iter().cloned()).collect();
        let key = crate::backend::current_key(current, "EST simplereenroll")?;
        self.send_csr(SIMPLEREENROLL, request, Auth::Tls(&chain, key))
    }
}

impl CaBackend for Est<'_> {
    fn name(&self) -> &'static str {
        "EST"
    }

    fn enroll(&mut self, request: &Request) -> Result<Outcome> {
        let auth = self.bootstrap_auth()?;
        self.cacerts()?;
        self.send_csr(SIMPLEENROLL, request, auth)
    }

    fn renew(&mut self, request: &Request, current: &Current) -> Result<Outcome> {
        self.cacerts()?;
        self.reenroll(request, current)
    }

    fn credentials(&self) -> Credentials {
        credentials(self.settings)
    }

    fn probe_url(&self) -> String {
        self.url(CACERTS)
    }

    fn polling(&self) -> Option<Polling> {
        Some(self.settings.polling)
    }

    fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    /// The identical CSR again (RFC 7030 §4.2.3), with the same credential as the first time.
    fn poll(&mut self, request_id: &str, request: &Request, current: Option<&Current>) -> Result<Poll> {
        if self::request_id(&request.csr.der) != request_id {
            log::warn!("request {request_id} is resent with a CSR that is not the one first sent");
        }
        let outcome = match current {
            Some(current) => self.reenroll(request, current)?,
            None => {
                let auth = self.bootstrap_auth()?;
                self.send_csr(SIMPLEENROLL, request, auth)?
            }
        };
        Ok(match outcome {
            Outcome::Issued(issued) => Poll::Issued(issued),
            Outcome::Pending { .. } => Poll::NotYet(match self.retry_after {
                Some(seconds) => format!("HTTP 202, retry after {seconds} s"),
                None => "HTTP 202".to_string(),
            }),
        })
    }
}

impl crate::backend::Protocol for EstSettings {
    fn parse(fields: &mut crate::fields::Fields, allow_http: bool) -> Result<Self> {
        config::parse(fields, allow_http)
    }

    fn client(&self, http: Http) -> Box<dyn CaBackend + '_> {
        Box::new(Est::new(self, http))
    }

    fn credentials(&self) -> Credentials {
        credentials(self)
    }

    /// EST renews over TLS client authentication, signed on the device.
    fn check_key(&self, _algorithm: enroll_hal::Algorithm, remote: bool) -> Result<()> {
        match remote {
            true => Err(Error::config(
                "ca.backend: EST renews over TLS client authentication, which a Redtrust key cannot sign \
                 on this device",
            )),
            false => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_retry_after;

    #[test]
    fn urls_append_the_well_known_path_with_and_without_a_label() {
        assert_eq!(
            operation_url("https://est.example:8443", Some("meters"), "simpleenroll"),
            "https://est.example:8443/.well-known/est/meters/simpleenroll"
        );
        assert_eq!(
            operation_url("https://est.example/prefix/", None, "cacerts"),
            "https://est.example/prefix/.well-known/est/cacerts"
        );
    }

    #[test]
    fn base64_with_any_whitespace_decodes() {
        let want = b"certs-only pkcs7 bytes, long enough to wrap".to_vec();
        let plain = base64::engine::general_purpose::STANDARD.encode(&want);
        assert_eq!(decode_base64(plain.as_bytes()).unwrap(), want);
        let wrapped: String =
            plain.as_bytes().chunks(10).map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap())).collect();
        assert_eq!(decode_base64(wrapped.as_bytes()).unwrap(), want);
        let spaced = format!(" \t{}\n {} \t\n", &plain[..8], &plain[8..]);
        assert_eq!(decode_base64(spaced.as_bytes()).unwrap(), want);
        assert_eq!(decode_base64(plain.trim_end_matches('=').as_bytes()).unwrap(), want);
        assert!(decode_base64(b"not*base64!").is_err());
        assert!(decode_base64(b" \r\n").is_err());
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        assert_eq!(parse_retry_after("120", 0), Some(120));
        assert_eq!(parse_retry_after(" 7 ", 0), Some(7));
        assert_eq!(parse_retry_after("0", 0), Some(1), "never zero");
        assert_eq!(parse_retry_after("99999999999999999999999", 0), Some(u64::MAX));
        let date = crate::time::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", date - 30), Some(30));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", date + 30), Some(1), "a past date");
        assert_eq!(parse_retry_after("soon", 0), None);
        assert_eq!(parse_retry_after("-5", 0), None);
    }

    #[test]
    fn pkcs7_mime_with_any_parameters_is_accepted() {
        assert!(is_pkcs7(Some("application/pkcs7-mime")));
        assert!(is_pkcs7(Some("application/pkcs7-mime; smime-type=certs-only")));
        assert!(is_pkcs7(Some("Application/PKCS7-MIME;smime-type=certs-only; name=cert.p7c")));
        assert!(is_pkcs7(None));
        assert!(!is_pkcs7(Some("text/html")));
    }

    #[test]
    fn the_request_id_is_the_sha256_of_the_csr() {
        assert_eq!(
            request_id(b"abc"),
            "est:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn status_classes_follow_the_contract() {
        let response = |status: u16| Response {
            status,
            body: b"enrollment refused:\x1b[31m policy".to_vec(),
            content_type: Some("text/plain".into()),
            location: None,
            retry_after: None,
            replay_nonce: None,
        };
        for (status, kind) in [
            (401, crate::error::Kind::Refused),
            (403, crate::error::Kind::Refused),
            (400, crate::error::Kind::Refused),
            (408, crate::error::Kind::Temporary),
            (429, crate::error::Kind::Temporary),
            (503, crate::error::Kind::Temporary),
            (302, crate::error::Kind::Protocol),
        ] {
            let error = http::status_error("EST simpleenroll", &response(status));
            assert_eq!(error.kind(), kind, "{status}");
            assert!(error.to_string().contains("enrollment refused"), "{error}");
            assert!(!error.to_string().contains('\x1b'), "{error}");
        }
        // A temporary failure carries the server's Retry-After through the error chain (for `run`).
        let mut busy = response(503);
        busy.retry_after = Some(30);
        let error = http::status_error("EST simpleenroll", &busy).context("enrolling with EST");
        assert_eq!(error.retry_after(), Some(30));
        busy.status = 403;
        assert_eq!(http::status_error("EST simpleenroll", &busy).retry_after(), None);
    }
}
