//! Keytos EZCA emulator (protocols.md §2, seeds/ezca-api.txt):
//! - Entra ID client-credentials token endpoint `POST /{tenant}/oauth2/v2.0/token` (§2.2),
//! - `POST /api/CA/RequestSSLCertificateV2` with a bearer token (§2.4),
//! - `POST /api/Certificates/RenewCertificateV3` and `…V2` authenticated by the certificate
//!   JWT of §2.3 (RS256, `x5t` = uppercase hex SHA-1 of the certificate DER).
//!
//! Rejections are plain text (`Error: …`), as the clients in §2.1 expect.

use crate::emulator::{answer_fault, lock, tag, Shared};
use crate::fault::{Endpoint, Fault, Phase};
use crate::pki::{self, IssuedCert, LeafFault, LeafProfile, ParsedCsr, San};
use crate::server::{Request, Response};
use crate::util;
use base64::Engine;
use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::SystemTime;
use x509_parser::prelude::*;

/// The Entra scope EZCA accepts (§2.2).
pub const EZCA_SCOPE: &str = "https://management.core.windows.net/.default";
/// JWT audiences accepted for certificate authentication (§2.3).
pub const JWT_AUDIENCES: &[&str] = &["https://ezca.io", "https://agent.keytos.io"];
/// Lifetime of Entra tokens minted here.
const ENTRA_LIFETIME_S: i64 = 3599;
/// Allowed clock skew for `nbf`.
const NBF_SKEW_S: i64 = 300;
/// Longest certificate-JWT lifetime accepted (`exp − nbf`).
const MAX_JWT_LIFETIME_S: i64 = 3600;

/// EZCA identifiers and credentials.
#[derive(Clone, Debug)]
pub struct EzcaConfig {
    /// CA ID (GUID).
    pub ca_id: String,
    /// Template ID (GUID).
    pub template_id: String,
    /// Static bootstrap bearer token (random per run).
    pub bootstrap_token: String,
    /// Entra tenant ID (GUID).
    pub tenant_id: String,
    /// Entra application (client) ID.
    pub client_id: String,
    /// Entra client secret (random per run).
    pub client_secret: String,
    /// Template's maximum `ValidityInDays`.
    pub max_validity_days: u32,
}

impl EzcaConfig {
    /// Random GUIDs and secrets.
    pub fn generate() -> Self {
        Self {
            ca_id: util::uuid_like(),
            template_id: util::uuid_like(),
            bootstrap_token: util::random_hex(24),
            tenant_id: util::uuid_like(),
            client_id: util::uuid_like(),
            client_secret: util::random_hex(20),
            max_validity_days: 3650,
        }
    }
}

/// A certificate this CA issued, usable for certificate authentication while valid.
struct EzcaCert {
    der: Vec<u8>,
    not_after: SystemTime,
    profile: LeafProfile,
}

/// Mutable EZCA state.
#[derive(Default)]
pub struct EzcaState {
    entra_tokens: HashMap<String, i64>,
    /// Issued certificates by uppercase hex SHA-1 thumbprint.
    certs: HashMap<String, EzcaCert>,
}

fn text(status: u16, s: &str) -> Response {
    Response::text(status, s)
}

fn entra_error(error: &str, code: u32, description: &str) -> Response {
    Response::json(
        400,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description} Trace ID: {} Correlation ID: {} Timestamp: {}",
                util::uuid_like(), util::uuid_like(), util::imf_fixdate(SystemTime::now())),
            "error_codes": [code],
            "trace_id": util::uuid_like(),
            "correlation_id": util::uuid_like(),
        }),
    )
}

impl Shared {
    /// `POST /{tenant}/oauth2/v2.0/token`, client-credentials grant with a client secret (§2.2).
    pub(crate) fn entra_token(&self, req: &Request) -> Response {
        let cfg = &self.ezca_cfg;
        let tenant = req.path.trim_start_matches('/').split('/').next().unwrap_or_default();
        let form = util::parse_form(&String::from_utf8_lossy(&req.body));
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let form_ct = req
            .header("Content-Type")
            .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
        if !form_ct {
            return entra_error(
                "invalid_request",
                900144,
                "The request body must be application/x-www-form-urlencoded.",
            );
        }
        if tenant != cfg.tenant_id {
            return entra_error("invalid_request", 90002, &format!("Tenant '{tenant}' not found."));
        }
        if field("grant_type") != Some("client_credentials") {
            return entra_error(
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            );
        }
        if field("client_id") != Some(cfg.client_id.as_str()) {
            return entra_error("unauthorized_client", 700016, "Application was not found in the directory.");
        }
        if field("scope") != Some(EZCA_SCOPE) {
            return entra_error(
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid.",
            );
        }
        if field("client_secret") != Some(cfg.client_secret.as_str()) {
            return entra_error(
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            );
        }
        let token = format!("eyEmu.{}", util::random_hex(32));
        lock(&self.ezca).entra_tokens.insert(token.clone(), util::now_s() + ENTRA_LIFETIME_S);
        Response::json(
            200,
            &json!({"token_type": "Bearer", "expires_in": ENTRA_LIFETIME_S, "ext_expires_in": ENTRA_LIFETIME_S, "access_token": token}),
        )
    }

    fn bearer_ok(&self, req: &Request) -> bool {
        let Some(token) = bearer(req) else {
            return false;
        };
        if token == self.ezca_cfg.bootstrap_token {
            return true;
        }
        lock(&self.ezca).entra_tokens.get(token).is_some_and(|exp| *exp > util::now_s())
    }

    fn ezca_early_fault(&self, ep: Endpoint, json_body: bool) -> Option<Response> {
        let f = self.take_fault(ep, Phase::Early)?;
        let r = match f {
            Fault::RejectAuth => text(401, "Error: unauthorized (emulated reject-auth)"),
            Fault::EzcaV3404 => text(404, "Not Found"),
            _ => return self.generic_fault(f, json_body),
        };
        Some(tag(r, f))
    }

    /// `POST /api/CA/RequestSSLCertificateV2` (§2.4): bare JSON
    /// `{CertificatePEM, IssuingCACertificate, RootCertificate}`.
    pub(crate) fn ezca_request_v2(&self, req: &Request) -> Response {
        if let Some(r) = self.ezca_early_fault(Endpoint::EzcaIssue, true) {
            return r;
        }
        if !self.bearer_ok(req) {
            return text(401, "Error: invalid or expired bearer token");
        }
        self.request_v2_checked(req).unwrap_or_else(|r| r)
    }

    fn request_v2_checked(&self, req: &Request) -> Result<Response, Response> {
        let body: Value =
            serde_json::from_slice(&req.body).map_err(|_| text(400, "Error: request body is not JSON"))?;
        self.check_ca_template(&body)?;
        let csr = csr_field(&body)?;
        check_subject_name(&body, &csr)?;
        let sans = requested_sans(&body)?;
        if !csr.sans.is_empty() && !sans.is_empty() && csr.sans != sans {
            return Err(text(400, "Error: SubjectAltNames do not match the CSR's subjectAltName extension"));
        }
        let profile = LeafProfile {
            days: self.validity_days(&body)?,
            sans_override: (!sans.is_empty()).then_some(sans),
            key_usages: key_usages(&body)?,
            ekus: ekus(&body)?,
            lifetime_s: None,
        };
        Ok(self.ezca_issue(Endpoint::EzcaIssue, &csr, profile, true))
    }

    fn check_ca_template(&self, body: &Value) -> Result<(), Response> {
        match util::json_str(body, "CAID") {
            None => return Err(text(400, "Error: CAID is required")),
            Some(id) if !id.eq_ignore_ascii_case(&self.ezca_cfg.ca_id) => {
                return Err(text(404, &format!("Error: CA {id} not found")))
            }
            _ => {}
        }
        match util::json_str(body, "TemplateID") {
            None => Err(text(400, "Error: TemplateID is required")),
            Some(id) if !id.eq_ignore_ascii_case(&self.ezca_cfg.template_id) => {
                Err(text(404, &format!("Error: template {id} not found for this CA")))
            }
            _ => Ok(()),
        }
    }

    fn validity_days(&self, v: &Value) -> Result<u32, Response> {
        let max = self.ezca_cfg.max_validity_days;
        match v.get("ValidityInDays").and_then(Value::as_i64) {
            Some(d) if d > 0 && d <= i64::from(max) => Ok(d as u32),
            Some(d) => Err(text(400, &format!("Error: ValidityInDays {d} is outside 1..={max}"))),
            None => Err(text(400, "Error: ValidityInDays must be an integer")),
        }
    }

    /// Signs with the issuing CA, applies answer-phase faults, records genuine certificates.
    fn ezca_issue(&self, ep: Endpoint, csr: &ParsedCsr, profile: LeafProfile, as_json: bool) -> Response {
        let fault = self.take_fault(ep, Phase::Answer);
        let leaf_fault = match fault {
            Some(Fault::WrongKeyCert) => LeafFault::WrongKey,
            Some(Fault::ExpiredCert) => LeafFault::Expired,
            _ => LeafFault::None,
        };
        let issued = match pki::issue_leaf(csr, &self.pki.ezca_issuing, &profile, leaf_fault) {
            Ok(i) => i,
            Err(e) => return text(400, &format!("Error: cannot issue certificate: {e}")),
        };
        if fault.is_none() {
            self.register(&issued, profile);
        }
        let r = if as_json {
            Response::json(
                200,
                &json!({
                    "CertificatePEM": issued.pem,
                    "IssuingCACertificate": self.pki.ezca_issuing.pem(),
                    "RootCertificate": self.pki.ezca_root.pem(),
                }),
            )
        } else {
            Response::new(200)
                .header("Content-Type", "text/plain; charset=utf-8")
                .body(issued.pem.into_bytes())
        };
        answer_fault(fault, r)
    }

    fn register(&self, issued: &IssuedCert, profile: LeafProfile) {
        let cert = EzcaCert { der: issued.der.clone(), not_after: issued.not_after, profile };
        lock(&self.ezca).certs.insert(util::thumbprint(&issued.der), cert);
        self.record_issued(&issued.der);
    }

    /// `POST /api/Certificates/RenewCertificateV3` (`v3`) or `…V2` (§2.4, §2.5).
    pub(crate) fn ezca_renew(&self, req: &Request, v3: bool) -> Response {
        let ep = if v3 { Endpoint::EzcaRenewV3 } else { Endpoint::EzcaRenewV2 };
        if let Some(r) = self.ezca_early_fault(ep, v3) {
            return r;
        }
        self.renew_checked(req, ep, v3).unwrap_or_else(|r| r)
    }

    fn renew_checked(&self, req: &Request, ep: Endpoint, v3: bool) -> Result<Response, Response> {
        let (cert_der, profile) = self.verify_cert_jwt(req)?;
        let body: Value =
            serde_json::from_slice(&req.body).map_err(|_| text(400, "Error: request body is not JSON"))?;
        let body_cert = util::json_str(&body, "Certificate")
            .and_then(|p| ::pem::parse(p).ok())
            .filter(|p| p.tag() == "CERTIFICATE")
            .ok_or_else(|| text(400, "Error: Certificate must be a PEM certificate"))?;
        if body_cert.contents() != cert_der.as_slice() {
            return Err(text(401, "Error: Certificate does not match the token's x5t"));
        }
        let payload = body
            .get("Payload")
            .filter(|p| p.is_object())
            .ok_or_else(|| text(400, "Error: Payload is required"))?;
        let csr = csr_field(payload)?;
        let (subject, sans) = pki::cert_names(&cert_der).map_err(|e| text(500, &format!("Error: {e}")))?;
        if csr.subject_der != subject || csr.sans != sans {
            return Err(text(400, "CSR does not match certificate"));
        }
        let profile = LeafProfile { days: self.validity_days(payload)?, sans_override: None, ..profile };
        Ok(self.ezca_issue(ep, &csr, profile, v3))
    }

    /// §2.3: RS256 JWT whose `x5t` (uppercase hex SHA-1) names a valid certificate issued here,
    /// signed by that certificate's RSA key, `aud` ezca.io, `jti`, sane `nbf`/`exp`.
    /// Returns the certificate and the profile it was issued with.
    fn verify_cert_jwt(&self, req: &Request) -> Result<(Vec<u8>, LeafProfile), Response> {
        let unauthorized = |why: &str| text(401, &format!("Error: {why}"));
        let jwt = bearer(req).ok_or_else(|| unauthorized("missing bearer token"))?;
        let parts =
            JwtParts::split(jwt).ok_or_else(|| unauthorized("token is not a JWS compact serialization"))?;
        let header = parts.json(0).ok_or_else(|| unauthorized("token header is not JSON"))?;
        if util::json_str(&header, "alg") != Some("RS256") {
            return Err(unauthorized("token alg must be RS256"));
        }
        if header.get("typ").is_some_and(|t| t.as_str() != Some("JWT")) {
            return Err(unauthorized("token typ must be JWT"));
        }
        let x5t = util::json_str(&header, "x5t").ok_or_else(|| unauthorized("token has no x5t"))?;
        let (der, not_after, profile) = {
            let st = lock(&self.ezca);
            let c = st
                .certs
                .get(x5t)
                .ok_or_else(|| unauthorized("x5t does not name a certificate issued by this CA"))?;
            (c.der.clone(), c.not_after, c.profile.clone())
        };
        if not_after <= SystemTime::now() {
            return Err(unauthorized("certificate has expired"));
        }
        verify_rs256(&der, &parts).map_err(|e| unauthorized(&e))?;
        let claims = parts.json(1).ok_or_else(|| unauthorized("token claims are not JSON"))?;
        check_claims(&claims, util::now_s()).map_err(|e| unauthorized(&e))?;
        Ok((der, profile))
    }
}

/// The token of an `Authorization: Bearer …` header (scheme case-insensitive).
fn bearer(req: &Request) -> Option<&str> {
    let v = req.header("Authorization")?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("Bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The three segments of a compact JWS.
struct JwtParts<'a> {
    signing_input: &'a str,
    segments: [&'a str; 3],
}

impl<'a> JwtParts<'a> {
    fn split(jwt: &'a str) -> Option<Self> {
        let mut it = jwt.split('.');
        let segments = [it.next()?, it.next()?, it.next()?];
        if it.next().is_some() {
            return None;
        }
        let signing_input = &jwt[..segments[0].len() + 1 + segments[1].len()];
        Some(Self { signing_input, segments })
    }

    fn bytes(&self, i: usize) -> Option<Vec<u8>> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(self.segments[i].trim_end_matches('=')).ok()
    }

    fn json(&self, i: usize) -> Option<Value> {
        serde_json::from_slice::<Value>(&self.bytes(i)?).ok().filter(Value::is_object)
    }
}

/// RSASSA-PKCS1-v1_5 SHA-256 over `header.claims` with the certificate's RSA key (ring).
fn verify_rs256(cert_der: &[u8], parts: &JwtParts) -> Result<(), String> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| "stored certificate does not parse")?;
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() != "1.2.840.113549.1.1.1" {
        return Err("only RSA certificates can authenticate".into());
    }
    let sig = parts.bytes(2).ok_or("token signature is not base64url")?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &spki.subject_public_key.data,
    );
    key.verify(parts.signing_input.as_bytes(), &sig).map_err(|_| "token signature invalid".into())
}

/// `aud`, `jti`, `nbf`, `exp` rules of §2.3 at time `now` (Unix seconds).
fn check_claims(c: &Value, now: i64) -> Result<(), String> {
    let aud_ok = match c.get("aud") {
        Some(Value::String(a)) => JWT_AUDIENCES.contains(&a.as_str()),
        Some(Value::Array(a)) => a.iter().any(|x| x.as_str().is_some_and(|s| JWT_AUDIENCES.contains(&s))),
        _ => false,
    };
    if !aud_ok {
        return Err("token audience is not https://ezca.io".into());
    }
    if util::json_str(c, "jti").is_none_or(str::is_empty) {
        return Err("token has no jti".into());
    }
    let (Some(nbf), Some(exp)) = (c.get("nbf").and_then(Value::as_i64), c.get("exp").and_then(Value::as_i64))
    else {
        return Err("token needs integer nbf and exp".into());
    };
    if exp <= now {
        return Err("token expired".into());
    }
    if nbf > now + NBF_SKEW_S {
        return Err("token not yet valid".into());
    }
    if exp - nbf > MAX_JWT_LIFETIME_S || exp < nbf {
        return Err("token lifetime exceeds 1 hour".into());
    }
    Ok(())
}

fn csr_field(v: &Value) -> Result<ParsedCsr, Response> {
    let pem = util::json_str(v, "CSR")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| text(400, "Error: CSR is required"))?;
    pki::parse_csr(pem.as_bytes()).map_err(|e| text(400, &format!("Error: invalid CSR: {e}")))
}

/// `SubjectName` must be present and name the CSR's CN (the certificate subject itself is
/// copied from the CSR, as the Go client sends the CSR's subject string here).
fn check_subject_name(body: &Value, csr: &ParsedCsr) -> Result<(), Response> {
    let name = util::json_str(body, "SubjectName").filter(|s| !s.trim().is_empty());
    let name = name.ok_or_else(|| text(400, "Error: SubjectName is required"))?;
    let given_cn = name
        .split([',', '+'])
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("CN"))
        .map(|(_, v)| v.trim().to_string());
    let csr_cn = X509Name::from_der(&csr.subject_der)
        .ok()
        .and_then(|(_, n)| n.iter_common_name().next().and_then(|a| a.as_str().ok().map(str::to_string)));
    if given_cn.is_none() || given_cn != csr_cn {
        return Err(text(400, "Error: SubjectName does not match the CSR subject"));
    }
    Ok(())
}

/// `SubjectAltNames: [{ValueSTR, SubjectAltType}]` with 1 email, 2 DNS, 6 URI, 7 IP (§2.4).
fn requested_sans(body: &Value) -> Result<Vec<San>, Response> {
    let bad = |why: &str| text(400, &format!("Error: SubjectAltNames: {why}"));
    let list = match body.get("SubjectAltNames") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("must be an array")),
    };
    let mut sans = Vec::new();
    for item in list {
        let value = util::json_str(item, "ValueSTR").ok_or_else(|| bad("ValueSTR missing"))?.to_string();
        let san = match item.get("SubjectAltType").and_then(Value::as_i64) {
            Some(1) => San::Email(value),
            Some(2) => San::Dns(value),
            Some(6) => San::Uri(value),
            Some(7) => San::Ip(value.parse().map_err(|_| bad("type 7 needs an IP address"))?),
            _ => return Err(bad("SubjectAltType must be 1, 2, 6 or 7")),
        };
        sans.push(san);
    }
    sans.sort();
    Ok(sans)
}

/// `EKUs`: OID strings, default client + server auth.
fn ekus(body: &Value) -> Result<Vec<ExtendedKeyUsagePurpose>, Response> {
    let Some(list) = body.get("EKUs").and_then(Value::as_array).filter(|a| !a.is_empty()) else {
        return Ok(vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth]);
    };
    list.iter()
        .map(|e| {
            let oid = e.as_str().unwrap_or_default();
            let arcs: Option<Vec<u64>> = oid.split('.').map(|a| a.parse().ok()).collect();
            match (oid, arcs) {
                ("1.3.6.1.5.5.7.3.1", _) => Ok(ExtendedKeyUsagePurpose::ServerAuth),
                ("1.3.6.1.5.5.7.3.2", _) => Ok(ExtendedKeyUsagePurpose::ClientAuth),
                (_, Some(a)) if a.len() >= 2 => Ok(ExtendedKeyUsagePurpose::Other(a)),
                _ => Err(text(400, &format!("Error: EKU {e} is not an OID"))),
            }
        })
        .collect()
}

/// `KeyUsages`: names as in the EZCA portal, default Key Encipherment + Digital Signature.
fn key_usages(body: &Value) -> Result<Vec<KeyUsagePurpose>, Response> {
    let Some(list) = body.get("KeyUsages").and_then(Value::as_array).filter(|a| !a.is_empty()) else {
        return Ok(vec![KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::DigitalSignature]);
    };
    list.iter()
        .map(|k| match k.as_str().unwrap_or_default() {
            "Key Encipherment" => Ok(KeyUsagePurpose::KeyEncipherment),
            "Digital Signature" => Ok(KeyUsagePurpose::DigitalSignature),
            "Data Encipherment" => Ok(KeyUsagePurpose::DataEncipherment),
            "Key Agreement" => Ok(KeyUsagePurpose::KeyAgreement),
            "Non Repudiation" => Ok(KeyUsagePurpose::ContentCommitment),
            _ => Err(text(400, &format!("Error: unknown key usage {k}"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_rules() {
        let now = 1_700_000_000;
        let ok = json!({"aud": "https://ezca.io", "jti": "x", "nbf": now, "exp": now + 1800});
        assert!(check_claims(&ok, now).is_ok());
        let agent = json!({"aud": "https://agent.keytos.io", "jti": "x", "nbf": now, "exp": now + 1800});
        assert!(check_claims(&agent, now).is_ok());
        let bad_aud =
            json!({"aud": "https://login.microsoftonline.com", "jti": "x", "nbf": now, "exp": now + 1800});
        assert!(check_claims(&bad_aud, now).is_err());
        let expired = json!({"aud": "https://ezca.io", "jti": "x", "nbf": now - 4000, "exp": now - 1});
        assert!(check_claims(&expired, now).is_err());
        let future = json!({"aud": "https://ezca.io", "jti": "x", "nbf": now + 600, "exp": now + 1800});
        assert!(check_claims(&future, now).is_err());
        let long = json!({"aud": "https://ezca.io", "jti": "x", "nbf": now, "exp": now + 7200});
        assert!(check_claims(&long, now).is_err());
        let no_jti = json!({"aud": "https://ezca.io", "nbf": now, "exp": now + 1800});
        assert!(check_claims(&no_jti, now).is_err());
    }
}
