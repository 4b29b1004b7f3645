//! Securosys TSB (Primus HSM REST) emulator (protocols.md §4, seeds/securosys-tsb-sign-csr.txt):
//! - authentication (§4.1): `Authorization: Bearer <JWT>` and/or `X-API-KEY`;
//! - `POST /v1/certificate/synchronous/sign` with a FLAT body → `{label, certificate}` (§4.4);
//! - `POST /v1/certificate/sign` with the body wrapped in `signCertificateRequest` →
//!   `{signRequestId}` (approval flow, §4.4 and the seed);
//! - `GET /v1/request/{id}`: PENDING for `pending_polls` GETs, APPROVED for one, then EXECUTED
//!   with `result` = the PEM leaf (§4.5); `DELETE /v1/request/{id}` → CANCELLED.
//!
//! Errors are `{"errorCode": int, "reason": "res.error.…", "message"}` (§4.2). The CA key named by
//! `signKeyName` is the RSA-2048 Securosys issuing CA; TSB returns only the leaf, so clients
//! configure the chain (`ca_bundle`, design.md §7).

use crate::emulator::{answer_fault, lock, tag, Shared};
use crate::fault::{Endpoint, Fault, Phase};
use crate::pki::{self, LeafFault, LeafProfile, ParsedCsr};
use crate::server::{Request, Response};
use crate::util;
use base64::Engine;
use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose, SignatureAlgorithm};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::SystemTime;

/// Securosys key name and credentials of the emulated TSB.
#[derive(Clone, Debug)]
pub struct SecurosysConfig {
    /// Label of the CA key in the HSM (`signKeyName`).
    pub sign_key_name: String,
    /// The key's password (`keyPassword`, sent as a JSON char array); `None` = key without one.
    pub key_password: Option<String>,
    /// The JWT accepted as `Authorization: Bearer` (random, JWT-shaped).
    pub jwt: String,
    /// The keyOperationToken API key accepted as `X-API-KEY` (random).
    pub api_key: String,
    /// Require the JWT (CloudHSM: mandatory, §4.1).
    pub require_jwt: bool,
    /// Require the API key.
    pub require_api_key: bool,
}

impl SecurosysConfig {
    /// Fixed key name, random password, JWT and API key; both credentials required.
    pub fn generate() -> Self {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = b64.encode(format!(r#"{{"sub":"enroll-tests","jti":"{}"}}"#, util::uuid_like()));
        Self {
            sign_key_name: "CA.iot.acme.example".into(),
            key_password: Some(util::random_hex(8)),
            jwt: format!("{header}.{claims}.{}", b64.encode(util::random_bytes(32))),
            api_key: util::random_hex(20),
            require_jwt: true,
            require_api_key: true,
        }
    }
}

/// One approval-flow sign request.
struct SignRequest {
    csr: ParsedCsr,
    profile: LeafProfile,
    alg: &'static SignatureAlgorithm,
    pending_polls: u32,
    gets: u32,
    /// Decided on the first GET: `Some(None)` normal, `Some(Some(f))` a status fault's fate.
    fate: Option<Option<Fault>>,
    cancelled: bool,
    /// The PEM leaf and execution time once genuinely EXECUTED.
    result: Option<(String, String)>,
}

/// Mutable Securosys state.
pub struct SecurosysState {
    requests: HashMap<String, SignRequest>,
    accepted: usize,
    cancelled: usize,
    /// The one approver's public key (base64 SPKI), as in `approvedBy` of the seed.
    approver: String,
}

impl SecurosysState {
    pub(crate) fn new() -> Self {
        let approver = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map(|k| base64::engine::general_purpose::STANDARD.encode(k.public_key_der()))
            .unwrap_or_default();
        Self { requests: HashMap::new(), accepted: 0, cancelled: 0, approver }
    }

    /// `synchronous/sign` + `sign` calls accepted.
    pub fn accepted(&self) -> usize {
        self.accepted
    }

    /// Successful `DELETE /v1/request/{id}` calls.
    pub fn cancelled(&self) -> usize {
        self.cancelled
    }
}

/// `{"errorCode","reason","message"}` (§4.2).
fn error(status: u16, code: i64, reason: &str, message: &str) -> Response {
    Response::json(status, &json!({"errorCode": code, "reason": reason, "message": message}))
}

fn unsupported(message: &str) -> Response {
    error(400, 611, "res.error.unsupported.operation", message)
}

fn bad_request(message: &str) -> Response {
    error(400, 400, "res.error.bad.request", message)
}

fn unauthorized() -> Response {
    error(401, 401, "res.error.unauthorized", "Full authentication is required")
}

fn not_existent(id: &str) -> Response {
    error(404, 651, "res.error.request.not.existent", &format!("Request with id {id} does not exist"))
}

/// What a sign body asks for, after every check of §4.4.
struct SignSpec {
    csr: ParsedCsr,
    profile: LeafProfile,
    alg: &'static SignatureAlgorithm,
}

impl Shared {
    /// Every `/v1/…` call.
    pub(crate) fn securosys(&self, req: &Request) -> Response {
        let rest = req.path.trim_start_matches("/v1/");
        let post = req.method == "POST";
        let (ep, wrapped) = match rest {
            "certificate/synchronous/sign" if post => (Some(Endpoint::SecurosysSyncSign), false),
            "certificate/sign" if post => (Some(Endpoint::SecurosysSign), true),
            _ => (None, false),
        };
        if let Some(ep) = ep {
            if let Some(f) = self.take_fault(ep, Phase::Early) {
                let r = match f {
                    Fault::RejectAuth => Some(tag(unauthorized(), f)),
                    _ => self.generic_fault(f, true),
                };
                if let Some(r) = r {
                    return r;
                }
            }
        }
        if let Err(r) = self.securosys_auth(req) {
            return r;
        }
        let result = match (ep, rest.strip_prefix("request/")) {
            (Some(ep), _) => self.securosys_sign(req, ep, wrapped),
            (None, Some(id)) if req.method == "GET" && !id.is_empty() => self.securosys_get(id),
            (None, Some(id)) if req.method == "DELETE" && !id.is_empty() => self.securosys_delete(id),
            _ => Err(error(404, 404, "res.error.not.found", "Not Found")),
        };
        result.unwrap_or_else(|r| r)
    }

    /// §4.1: JWT bearer when required, then `X-API-KEY` when required.
    fn securosys_auth(&self, req: &Request) -> Result<(), Response> {
        let cfg = &self.securosys_cfg;
        if cfg.require_jwt {
            let token = req
                .header("Authorization")
                .and_then(|v| v.split_once(' '))
                .filter(|(s, _)| s.eq_ignore_ascii_case("Bearer"))
                .map(|(_, t)| t.trim());
            if token != Some(cfg.jwt.as_str()) {
                return Err(unauthorized());
            }
        }
        if cfg.require_api_key && req.header("X-API-KEY") != Some(cfg.api_key.as_str()) {
            return Err(error(401, 631, "res.error.invalid.api.key", "Invalid API key"));
        }
        Ok(())
    }

    /// `synchronous/sign` (flat body) and `sign` (wrapped body).
    fn securosys_sign(&self, req: &Request, ep: Endpoint, wrapped: bool) -> Result<Response, Response> {
        let body: Value =
            serde_json::from_slice(&req.body).map_err(|_| bad_request("request body is not JSON"))?;
        let fields = if wrapped {
            body.get("signCertificateRequest")
                .filter(|v| v.is_object())
                .ok_or_else(|| bad_request("signCertificateRequest is required"))?
        } else {
            if body.get("signCertificateRequest").is_some() {
                return Err(bad_request("synchronous/sign takes the fields unwrapped"));
            }
            &body
        };
        let spec = self.check_sign(fields)?;
        let fault = self.take_fault(ep, Phase::Answer);
        if ep == Endpoint::SecurosysSign {
            let id = util::uuid_like();
            if fault.is_none() {
                let request = SignRequest {
                    csr: spec.csr,
                    profile: spec.profile,
                    alg: spec.alg,
                    pending_polls: self.pending_polls(),
                    gets: 0,
                    fate: None,
                    cancelled: false,
                    result: None,
                };
                let mut st = lock(&self.securosys);
                st.requests.insert(id.clone(), request);
                st.accepted += 1;
            }
            return Ok(answer_fault(fault, Response::json(200, &json!({"signRequestId": id}))));
        }
        let issued = pki::issue_leaf_with(
            &spec.csr,
            &self.pki.securosys_issuing,
            &spec.profile,
            leaf_fault(fault),
            Some(spec.alg),
        )
        .map_err(|e| error(500, 701, "res.error.in.hsm", &format!("Error in HSM: {e}")))?;
        if fault.is_none() {
            self.record_issued(&issued.der);
            lock(&self.securosys).accepted += 1;
        }
        let r = Response::json(
            200,
            &json!({"label": self.securosys_cfg.sign_key_name, "certificate": issued.pem}),
        );
        Ok(answer_fault(fault, r))
    }

    /// The checks of §4.4, in the order a TSB reports them.
    fn check_sign(&self, f: &Value) -> Result<SignSpec, Response> {
        let cfg = &self.securosys_cfg;
        for field in ["signKeyName", "signatureAlgorithm", "commonName", "certificateSigningRequest"] {
            if util::json_str(f, field).is_none() {
                return Err(bad_request(&format!("{field} is required")));
            }
        }
        let key_name = util::json_str(f, "signKeyName").unwrap_or_default();
        if key_name != cfg.sign_key_name {
            return Err(error(
                400,
                650,
                "res.error.key.not.existent",
                &format!("Key with name {key_name} does not exist"),
            ));
        }
        if !password_matches(f.get("keyPassword"), cfg.key_password.as_deref()) {
            return Err(error(400, 620, "res.error.key.password.mismatch", "Key password mismatch"));
        }
        let csr_pem = util::json_str(f, "certificateSigningRequest").unwrap_or_default();
        let csr = pki::parse_csr(csr_pem.as_bytes()).map_err(|e| {
            error(400, 628, "res.error.csr.invalid.format", &format!("CSR has an invalid format: {e}"))
        })?;
        let alg = match util::json_str(f, "signatureAlgorithm").unwrap_or_default() {
            "SHA256_WITH_RSA" => &rcgen::PKCS_RSA_SHA256,
            "SHA384_WITH_RSA" => &rcgen::PKCS_RSA_SHA384,
            "SHA512_WITH_RSA" => &rcgen::PKCS_RSA_SHA512,
            other => {
                return Err(unsupported(&format!(
                    "signatureAlgorithm {other} is not supported by an RSA key"
                )))
            }
        };
        match f.get("certificateAuthority") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(_) => return Err(unsupported("certificateAuthority must be false for a leaf certificate")),
        }
        let key_usages = enum_list(f, "keyUsage", key_usage)?;
        let ekus = enum_list(f, "extendedKeyUsage", eku)?;
        let cn = util::json_str(f, "commonName").unwrap_or_default();
        if crate::sectigo::subject_cn(&csr).as_deref() != Some(cn) {
            return Err(unsupported("commonName does not match the CSR"));
        }
        let days = match f.get("validity") {
            None | Some(Value::Null) => 365,
            Some(v) => v
                .as_u64()
                .filter(|d| (1..=36_500).contains(d))
                .ok_or_else(|| bad_request("validity must be a positive number of days"))?
                as u32,
        };
        let profile = LeafProfile { days, sans_override: None, key_usages, ekus, lifetime_s: None };
        Ok(SignSpec { csr, profile, alg })
    }

    /// `GET /v1/request/{id}` (§4.5).
    fn securosys_get(&self, id: &str) -> Result<Response, Response> {
        let mut st = lock(&self.securosys);
        let approver = st.approver.clone();
        let request = st.requests.get_mut(id).ok_or_else(|| not_existent(id))?;
        if request.fate.is_none() && !request.cancelled {
            request.fate = Some(self.take_fault(Endpoint::SecurosysRequest, Phase::Authenticated));
        }
        let fate = request.fate.flatten();
        let body =
            |status: &str, approved: bool, rejected: bool, exec: Option<&str>, result: Option<&str>| {
                let who = |on: bool| if on { json!([approver]) } else { json!([]) };
                json!({
                    "id": id, "status": status, "executionTime": exec,
                    "approvedBy": who(approved), "notYetApprovedBy": who(!approved && !rejected),
                    "rejectedBy": who(rejected), "result": result,
                })
            };
        let fated = |status: &str, rejected: bool, f: Fault| {
            Ok(tag(Response::json(200, &body(status, false, rejected, None, None)), f))
        };
        if request.cancelled {
            return Ok(Response::json(200, &body("CANCELLED", false, false, None, None)));
        }
        match fate {
            Some(f @ Fault::ApprovalRejected) => return fated("REJECTED", true, f),
            Some(f @ Fault::RequestExpired) => return fated("EXPIRED", false, f),
            Some(f @ Fault::RequestFailed) => return fated("FAILED", false, f),
            Some(f @ Fault::PendingForever) => return fated("PENDING", false, f),
            _ => {}
        }
        if let Some((pem, exec)) = &request.result {
            return Ok(Response::json(200, &body("EXECUTED", true, false, Some(exec), Some(pem))));
        }
        request.gets += 1;
        // Read at poll time so a test can release requests made while it was high.
        request.pending_polls = request.pending_polls.min(self.pending_polls());
        if request.gets <= request.pending_polls {
            return Ok(Response::json(200, &body("PENDING", false, false, None, None)));
        }
        if request.gets == request.pending_polls + 1 {
            return Ok(Response::json(200, &body("APPROVED", true, false, None, None)));
        }
        let fault = self.take_fault(Endpoint::SecurosysRequest, Phase::Answer);
        let issued = pki::issue_leaf_with(
            &request.csr,
            &self.pki.securosys_issuing,
            &request.profile,
            leaf_fault(fault),
            Some(request.alg),
        )
        .map_err(|e| error(500, 701, "res.error.in.hsm", &format!("Error in HSM: {e}")))?;
        let exec = util::rfc3339_utc(SystemTime::now());
        let r = Response::json(200, &body("EXECUTED", true, false, Some(&exec), Some(&issued.pem)));
        if fault.is_none() {
            self.record_issued(&issued.der);
            request.result = Some((issued.pem, exec));
        }
        Ok(match fault {
            Some(f) => tag(r, f),
            None => r,
        })
    }

    /// `DELETE /v1/request/{id}` → 200, status CANCELLED from then on (§4.5).
    fn securosys_delete(&self, id: &str) -> Result<Response, Response> {
        let mut st = lock(&self.securosys);
        let request = st.requests.get_mut(id).ok_or_else(|| not_existent(id))?;
        request.cancelled = true;
        st.cancelled += 1;
        Ok(Response::new(200))
    }
}

fn leaf_fault(f: Option<Fault>) -> LeafFault {
    match f {
        Some(Fault::WrongKeyCert) => LeafFault::WrongKey,
        Some(Fault::ExpiredCert) => LeafFault::Expired,
        _ => LeafFault::None,
    }
}

/// `keyPassword`: a JSON array of one-character strings equal to the key's password (§4.3,
/// tsb-client-go StringToCharArray), or null/absent for a key without one.
fn password_matches(given: Option<&Value>, expected: Option<&str>) -> bool {
    match (given, expected) {
        (None | Some(Value::Null), None) => true,
        (Some(Value::Array(chars)), Some(pw)) => {
            let mut s = String::new();
            for c in chars {
                match c.as_str() {
                    Some(one) if one.chars().count() == 1 => s.push_str(one),
                    _ => return false,
                }
            }
            s == pw
        }
        _ => false,
    }
}

/// An optional array of TSB enum names mapped by `map`; unknown names → 400 611.
fn enum_list<T>(f: &Value, key: &str, map: fn(&str) -> Option<T>) -> Result<Vec<T>, Response> {
    let list = match f.get(key) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(unsupported(&format!("{key} must be an array"))),
    };
    list.iter()
        .map(|v| {
            let name = v.as_str().unwrap_or_default();
            map(name).ok_or_else(|| unsupported(&format!("{key} {v} is not supported")))
        })
        .collect()
}

fn key_usage(name: &str) -> Option<KeyUsagePurpose> {
    Some(match name {
        "DIGITAL_SIGNATURE" => KeyUsagePurpose::DigitalSignature,
        "CONTENT_COMMITMENT" | "NON_REPUDIATION" => KeyUsagePurpose::ContentCommitment,
        "KEY_ENCIPHERMENT" => KeyUsagePurpose::KeyEncipherment,
        "DATA_ENCIPHERMENT" => KeyUsagePurpose::DataEncipherment,
        "KEY_AGREEMENT" => KeyUsagePurpose::KeyAgreement,
        "KEY_CERT_SIGN" => KeyUsagePurpose::KeyCertSign,
        "CRL_SIGN" => KeyUsagePurpose::CrlSign,
        "ENCIPHER_ONLY" => KeyUsagePurpose::EncipherOnly,
        "DECIPHER_ONLY" => KeyUsagePurpose::DecipherOnly,
        _ => return None,
    })
}

fn eku(name: &str) -> Option<ExtendedKeyUsagePurpose> {
    Some(match name {
        "ANY_EXTENDED_KEY_USAGE" => ExtendedKeyUsagePurpose::Any,
        "SERVER_AUTH" => ExtendedKeyUsagePurpose::ServerAuth,
        "CLIENT_AUTH" => ExtendedKeyUsagePurpose::ClientAuth,
        "CODE_SIGNING" => ExtendedKeyUsagePurpose::CodeSigning,
        "EMAIL_PROTECTION" => ExtendedKeyUsagePurpose::EmailProtection,
        "TIME_STAMPING" => ExtendedKeyUsagePurpose::TimeStamping,
        "OCSP_SIGNING" => ExtendedKeyUsagePurpose::OcspSigning,
        _ => return None,
    })
}

/// A sign body for tests and demos (flat; wrap it in `signCertificateRequest` for `/sign`).
pub fn sign_body(cfg: &SecurosysConfig, common_name: &str, csr_pem: &str) -> Value {
    let mut m = Map::new();
    m.insert("signKeyName".into(), json!(cfg.sign_key_name));
    let pw = cfg.key_password.as_ref().map(|p| p.chars().map(|c| c.to_string()).collect::<Vec<_>>());
    m.insert("keyPassword".into(), json!(pw));
    m.insert("signatureAlgorithm".into(), json!("SHA256_WITH_RSA"));
    m.insert("commonName".into(), json!(common_name));
    m.insert("certificateAuthority".into(), json!(false));
    m.insert("certificateSigningRequest".into(), json!(csr_pem));
    m.insert("keyUsage".into(), json!(["DIGITAL_SIGNATURE"]));
    m.insert("extendedKeyUsage".into(), json!(["CLIENT_AUTH"]));
    m.insert("validity".into(), json!(90));
    Value::Object(m)
}
