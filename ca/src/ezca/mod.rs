//! Keytos EZCA (protocols.md §2; seed ezca-api.txt).
//!
//! Enrollment: `POST /api/CA/RequestSSLCertificateV2` with a bootstrap bearer token (a static
//! token file, or Entra ID client credentials, §2.2). Renewal: `POST
//! /api/Certificates/RenewCertificateV3` authenticated by a JWT the device key signs (§2.3: RS256,
//! `x5t` = UPPERCASE hex SHA-1 of the certificate, aud `https://ezca.io`), falling back to
//! `RenewCertificateV2` when V3 answers 404 (§2.5). Both are synchronous.

pub mod config;
pub use config::*;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::backend::{CaBackend, Credentials, Current, Outcome, Request};
use crate::error::{Error, Result};
use crate::http::{self, Http, Response};
use crate::json::{self, Value};
use crate::pki::Issued;

const REQUEST_V2: &str = "/api/CA/RequestSSLCertificateV2";
const RENEW_V3: &str = "/api/Certificates/RenewCertificateV3";
const RENEW_V2: &str = "/api/Certificates/RenewCertificateV2";
/// §2.2: EZCA accepts Azure management-plane tokens.
const ENTRA_SCOPE: &str = "https://management.core.windows.net/.default";
/// §2.3: the certificate JWT's audience and lifetime.
const JWT_AUDIENCE: &str = "https://ezca.io";
const JWT_LIFETIME_S: u64 = 1800;
const JWT_BACKDATE_S: u64 = 60;
/// §2.4 defaults of the official clients: client and server authentication.
const EKUS: [&str; 2] = ["1.3.6.1.5.5.7.3.2", "1.3.6.1.5.5.7.3.1"];

/// Certificate renewal signs an RS256 token with the device key, in place (protocols.md §2.3).
pub fn check_key(settings: &EzcaSettings, algorithm: enroll_hal::Algorithm, remote: bool) -> Result<()> {
    if settings.renew_auth != RenewAuth::Certificate {
        return Ok(());
    }
    if algorithm != enroll_hal::Algorithm::Rsa2048 {
        return Err(Error::config(
            "ca.renew_auth: EZCA certificate renewal signs an RS256 token and needs an RSA key: \
             set key.algorithm to \"rsa2048\", or set ca.renew_auth to \"bootstrap\"",
        ));
    }
    if remote {
        return Err(Error::config(
            "ca.renew_auth: a Redtrust key cannot sign the EZCA renewal token on this device; \
             set ca.renew_auth to \"bootstrap\"",
        ));
    }
    Ok(())
}

pub fn credentials(settings: &EzcaSettings) -> Credentials {
    let bootstrap = match settings.bootstrap {
        EzcaBootstrap::Token(_) => "EZCA bootstrap bearer token (ca.bootstrap.token_file)",
        EzcaBootstrap::Entra { .. } => "Entra ID client credentials (ca.bootstrap.client_secret_file)",
    };
    let renew = match (settings.renew_auth, &settings.bootstrap) {
        (RenewAuth::Certificate, _) => "the device certificate: RS256 JWT signed by the device key",
        (RenewAuth::Bootstrap, EzcaBootstrap::Token(_)) => {
            "EZCA bootstrap bearer token (ca.renew_auth = bootstrap)"
        }
        (RenewAuth::Bootstrap, EzcaBootstrap::Entra { .. }) => {
            "Entra ID client credentials (ca.renew_auth = bootstrap)"
        }
    };
    Credentials { enroll: bootstrap, renew }
}

pub struct Ezca<'a> {
    settings: &'a EzcaSettings,
    http: Http,
}

impl<'a> Ezca<'a> {
    pub fn new(settings: &'a EzcaSettings, http: Http) -> Self {
        Ezca { settings, http }
    }

    /// The bearer token for issuance calls.
    fn bootstrap_token(&self) -> Result<Zeroizing<String>> {
        match &self.settings.bootstrap {
            EzcaBootstrap::Token(token) => Ok(Zeroizing::new(token.expose().to_string())),
            EzcaBootstrap::Entra { tenant_id, client_id, client_secret, authority } => {
                self.entra_token(authority, tenant_id, client_id, client_secret.expose())
            }
        }
    }

    /// OAuth 2.0 client-credentials grant against Entra ID (§2.2).
    fn entra_token(
        &self,
        authority: &str,
        tenant: &str,
        client_id: &str,
        secret: &str,
    ) -> Result<Zeroizing<String>> {
        const STEP: &str = "getting an Entra ID token for EZCA";
        let url = http::join(authority, &format!("/{}/oauth2/v2.0/token", http::query_escape(tenant)));
        let form = Zeroizing::new(http::form_encode(&[
            ("client_id", client_id),
            ("scope", ENTRA_SCOPE),
            ("grant_type", "client_credentials"),
            ("client_secret", secret),
        ]));
        let response = self.http.send(
            STEP,
            "POST",
            &url,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            Some(form.as_bytes()),
        )?;
        let answer = crate::backend::parse_json(STEP, &response);
        if !response.is_success() {
            let detail = answer.ok().map(|a| {
                let field = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                format!("{}: {}", field("error"), http::excerpt(&field("error_description")))
            });
            return Err(match (response.status, detail) {
                (400 | 401, Some(detail)) => {
                    Error::refused(format!("{STEP}: Entra ID refused the client credentials: {detail}"))
                        .with_answer(response.status, None, &detail)
                }
                _ => http::status_error(STEP, &response),
            });
        }
        let token = answer?
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| Zeroizing::new(t.to_string()))
            .ok_or_else(|| Error::protocol(format!("{STEP}: the answer has no access_token")))?;
        Ok(token)
    }

    fn request_v2(&self, request: &Request) -> Result<Issued> {
        const STEP: &str = "EZCA RequestSSLCertificateV2";
        let body = json::object([
            ("SubjectName", request.subject.rfc4514().into()),
            ("SubjectAltNames", subject_alt_names(request)),
            ("CAID", self.settings.ca_id.as_str().into()),
            ("TemplateID", self.settings.template_id.as_str().into()),
            ("CSR", request.csr.pem.as_str().into()),
            ("ValidityInDays", self.settings.valid_days.into()),
            ("EKUs", Value::Array(EKUS.iter().map(|e| (*e).into()).collect())),
            ("KeyUsages", Value::Array(vec!["Key Encipherment".into(), "Digital Signature".into()])),
            ("SelectedLocation", "IoT Device".into()),
        ])
        .to_json();
        let token = self.bootstrap_token()?;
        let auth = Zeroizing::new(format!("Bearer {}", token.as_str()));
        let url = http::join(&self.settings.url, REQUEST_V2);
        let headers = [("Content-Type", "application/json"), ("Authorization", auth.as_str())];
        let response = self.http.send(STEP, "POST", &url, &headers, Some(body.as_bytes()))?;
        if matches!(response.status, 401 | 403) {
            let whose = match self.settings.bootstrap {
                EzcaBootstrap::Token(_) => "the bootstrap token was refused",
                EzcaBootstrap::Entra { .. } => "the Entra ID token was refused",
            };
            return Err(Error::refused(format!(
                "{STEP}: {whose} (HTTP {}): {}",
                response.status,
                response.excerpt()
            )));
        }
        if !response.is_success() {
            return Err(http::status_error(STEP, &response));
        }
        issued_from_json(STEP, &response)
    }

    fn renew_with_certificate(&self, request: &Request, current: &Current) -> Result<Issued> {
        let body = json::object([
            ("Certificate", current.cert.pem().into()),
            (
                "Payload",
                json::object([
                    ("CSR", request.csr.pem.as_str().into()),
                    ("ValidityInDays", self.settings.valid_days.into()),
                ]),
            ),
        ])
        .to_json();
        let jwt = certificate_jwt(current, self.http.clock().now())?;
        let auth = Zeroizing::new(format!("Bearer {jwt}"));
        let headers = [("Content-Type", "application/json"), ("Authorization", auth.as_str())];
        let v3 = self.http.send(
            "EZCA RenewCertificateV3",
            "POST",
            &http::join(&self.settings.url, RENEW_V3),
            &headers,
            Some(body.as_bytes()),
        )?;
        if v3.status != 404 {
            check_renew_status("EZCA RenewCertificateV3", &v3)?;
            return issued_from_json("EZCA RenewCertificateV3", &v3);
        }
        log::info!("EZCA has no RenewCertificateV3 (HTTP 404); using RenewCertificateV2");
        let v2 = self.http.send(
            "EZCA RenewCertificateV2",
            "POST",
            &http::join(&self.settings.url, RENEW_V2),
            &headers,
            Some(body.as_bytes()),
        )?;
        check_renew_status("EZCA RenewCertificateV2", &v2)?;
        issued_from_pem_text("EZCA RenewCertificateV2", &v2)
    }
}

impl CaBackend for Ezca<'_> {
    fn name(&self) -> &'static str {
        "ezca"
    }

    fn enroll(&mut self, request: &Request) -> Result<Outcome> {
        Ok(Outcome::Issued(self.request_v2(request)?))
    }

    fn renew(&mut self, request: &Request, current: &Current) -> Result<Outcome> {
        let issued = match self.settings.renew_auth {
            RenewAuth::Certificate => self.renew_with_certificate(request, current)?,
            RenewAuth::Bootstrap => self.request_v2(request)?,
        };
        Ok(Outcome::Issued(issued))
    }

    fn credentials(&self) -> Credentials {
        credentials(self.settings)
    }

    fn probe_url(&self) -> String {
        http::join(&self.settings.url, "/")
    }
}

/// §2.4: `[{ValueSTR, SubjectAltType}]` with 1 email, 2 DNS, 6 URI, 7 IP.
fn subject_alt_names(request: &Request) -> Value {
    let entry = |value: String, kind: u64| {
        json::object([("ValueSTR", value.into()), ("SubjectAltType", kind.into())])
    };
    let sans = request.sans;
    let mut list: Vec<Value> = Vec::new();
    list.extend(sans.dns.iter().map(|d| entry(d.clone(), 2)));
    list.extend(sans.ip.iter().map(|ip| entry(ip.to_string(), 7)));
    list.extend(sans.uri.iter().map(|u| entry(u.clone(), 6)));
    list.extend(sans.email.iter().map(|e| entry(e.clone(), 1)));
    Value::Array(list)
}

/// §2.3: the renewal token, signed in place by the device key.
fn certificate_jwt(current: &Current, now: u64) -> Result<String> {
    // A minute in the past, so a device clock slightly ahead of EZCA's is not "not yet valid".
    let not_before = now.saturating_sub(JWT_BACKDATE_S);
    let header = json::object([
        ("alg", "RS256".into()),
        ("typ", "JWT".into()),
        ("x5t", current.cert.thumbprint_sha1_hex().into()),
    ]);
    let claims = json::object([
        ("aud", JWT_AUDIENCE.into()),
        ("jti", uuid_v4()?.into()),
        ("nbf", not_before.into()),
        ("exp", (not_before + JWT_LIFETIME_S).into()),
    ]);
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_json()), URL_SAFE_NO_PAD.encode(claims.to_json()));
    let key = crate::backend::current_key(current, "EZCA certificate renewal")?;
    let signature = key
        .sign(enroll_hal::SignatureScheme::RsaPkcs1Sha256, signing_input.as_bytes())
        .map_err(|e| Error::from(e).context("signing the EZCA renewal token with the device key"))?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

fn uuid_v4() -> Result<String> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| Error::new(crate::error::Kind::Internal, "the system random generator failed"))?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]))
}

/// Renewal rejections are plain text (§2.4, e.g. "CSR does not match certificate").
fn check_renew_status(step: &str, response: &Response) -> Result<()> {
    match response.status {
        200..=299 => Ok(()),
        401 | 403 => Err(Error::refused(format!(
            "{step}: EZCA refused the certificate-signed token (HTTP {}): {}",
            response.status,
            response.excerpt()
        ))
        .with_answer(response.status, None, &response.excerpt())),
        _ => Err(http::status_error(step, response)),
    }
}

/// The bare `{CertificatePEM, IssuingCACertificate, RootCertificate}` answer, possibly encoded a
/// second time as a JSON string (§2.1), and with the doc's trailing-space key typo tolerated.
fn issued_from_json(step: &str, response: &Response) -> Result<Issued> {
    let mut answer = crate::backend::parse_json(step, response)?;
    if let Value::String(inner) = &answer {
        answer = json::parse(inner.as_bytes()).map_err(|e| {
            Error::protocol(format!("{step}: the JSON-string-wrapped answer is not JSON")).with_source(e)
        })?;
    }
    let Value::Object(members) = answer else {
        return Err(Error::protocol(format!("{step}: expected a JSON object, found {}", answer.type_name())));
    };
    let trimmed = Value::Object(members.into_iter().map(|(k, v)| (k.trim().to_string(), v)).collect());
    let leaf = crate::backend::pem_field(step, &trimmed, "CertificatePEM")?
        .into_iter()
        .next()
        .ok_or_else(|| Error::protocol(format!("{step}: CertificatePEM is empty")))?;
    let optional = |field: &str| match trimmed.get(field) {
        Some(Value::String(_)) => crate::backend::pem_field(step, &trimmed, field),
        _ => Ok(Vec::new()),
    };
    Ok(Issued {
        leaf,
        intermediates: optional("IssuingCACertificate")?,
        roots: optional("RootCertificate")?,
        ca_ref: None,
    })
}

/// V2 renewals answer with PEM text: the leaf first, then whatever CA certificates follow.
fn issued_from_pem_text(step: &str, response: &Response) -> Result<Issued> {
    let text = String::from_utf8_lossy(&response.body);
    let mut certs = crate::pki::parse_pem_certs(&text).map_err(|e| e.context(step.to_string()))?.into_iter();
    let leaf =
        certs.next().ok_or_else(|| Error::protocol(format!("{step}: the answer holds no certificate")))?;
    Ok(Issued {
        leaf: leaf.der,
        intermediates: certs.map(|c| c.der).collect(),
        roots: Vec::new(),
        ca_ref: None,
    })
}

impl crate::backend::Protocol for EzcaSettings {
    fn parse(fields: &mut crate::fields::Fields, allow_http: bool) -> Result<Self> {
        config::parse(fields, allow_http)
    }

    fn client(&self, http: Http) -> Box<dyn CaBackend + '_> {
        Box::new(Ezca::new(self, http))
    }

    fn credentials(&self) -> Credentials {
        credentials(self)
    }

    fn check_key(&self, algorithm: enroll_hal::Algorithm, remote: bool) -> Result<()> {
        check_key(self, algorithm, remote)
    }
}
