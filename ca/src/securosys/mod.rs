//! Securosys Transaction Security Broker (protocols.md §4; seed securosys-tsb-sign-csr.txt).
//!
//! TSB signs our CSR with a CA key held in the HSM. Auth (§4.1): `Authorization: Bearer <JWT>`
//! and/or `X-API-KEY` (both sent when both are configured, design.md §7). Without approvals
//! (§4.4) `POST /v1/certificate/synchronous/sign` takes a flat body and answers the leaf at once;
//! with approvals `POST /v1/certificate/sign` takes the same fields wrapped in
//! `signCertificateRequest` and answers a `signRequestId`, which `GET /v1/request/{id}` reports
//! through PENDING / APPROVED until EXECUTED (§4.5). TSB has no renew call: renewal signs a new
//! CSR with the same credential (§4.6). TSB returns only the leaf, so the issuing chain comes
//! from `ca.ca_bundle`.

pub mod config;
pub use config::*;

use crate::backend::Polling;
use crate::backend::{CaBackend, Credentials, Current, Outcome, Poll, Request};
use crate::error::{Error, Result};
use crate::http::{self, Http, Response};
use crate::json::{self, Value};
use crate::pki::{self, Issued};

const SYNCHRONOUS_SIGN: &str = "/v1/certificate/synchronous/sign";
const SIGN: &str = "/v1/certificate/sign";
const REQUEST: &str = "/v1/request/";
/// §4.2: "request not existent".
const REQUEST_NOT_EXISTENT: i64 = 651;

pub fn credentials(settings: &SecurosysSettings) -> Credentials {
    let enroll = match (&settings.jwt, &settings.api_key) {
        (Some(_), Some(_)) => "Securosys TSB JWT (jwt_file) and API key (api_key_file)",
        (Some(_), None) => "Securosys TSB JWT (jwt_file)",
        _ => "Securosys TSB API key (api_key_file)",
    };
    let renew = if settings.approval {
        "the same TSB credential; every certificate waits for approval (TSB has no renew call)"
    } else {
        "the same TSB credential (TSB has no renew call: a new CSR is signed)"
    };
    Credentials { enroll, renew }
}

pub struct Securosys<'a> {
    settings: &'a SecurosysSettings,
    http: Http,
}

impl<'a> Securosys<'a> {
    pub fn new(settings: &'a SecurosysSettings, http: Http) -> Self {
        Securosys { settings, http }
    }

    fn send(&self, step: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
        let url = http::join(&self.settings.url, path);
        let bearer =
            self.settings.jwt.as_ref().map(|jwt| zeroize::Zeroizing::new(format!("Bearer {}", jwt.expose())));
        let mut headers = vec![("Accept", "application/json"), ("Content-Type", "application/json")];
        if let Some(bearer) = &bearer {
            headers.push(("Authorization", bearer.as_str()));
        }
        if let Some(key) = &self.settings.api_key {
            headers.push(("X-API-KEY", key.expose()));
        }
        let body = body.map(|b| zeroize::Zeroizing::new(b.to_json()));
        self.http.send(step, method, &url, &headers, body.as_deref().map(String::as_bytes))
    }

    /// The sign request's fields (§4.4), flat.
    fn sign_fields(&self, request: &Request) -> Value {
        let s = self.settings;
        // §4.3: the key password travels as a JSON array of one-character strings.
        let password = s.key_password.as_ref().map_or(Value::Null, |p| {
            Value::Array(p.expose().chars().map(|c| Value::String(c.to_string())).collect())
        });
        let names = |list: &[String]| Value::Array(list.iter().map(|n| n.as_str().into()).collect());
        json::object([
            ("signKeyName", s.sign_key_name.as_str().into()),
            ("keyPassword", password),
            ("signatureAlgorithm", s.signature_algorithm.as_str().into()),
            ("commonName", request.subject.common_name().into()),
            ("certificateAuthority", false.into()),
            ("certificateSigningRequest", request.csr.pem.as_str().into()),
            ("keyUsage", names(&s.key_usage)),
            ("extendedKeyUsage", names(&s.extended_key_usage)),
            ("validity", s.valid_days.into()),
        ])
    }

    fn sign(&self, request: &Request) -> Result<Outcome> {
        let fields = self.sign_fields(request);
        if !self.settings.approval {
            const STEP: &str = "Securosys synchronous/sign";
            let response = self.send(STEP, "POST", SYNCHRONOUS_SIGN, Some(&fields))?;
            let answer = success_json(STEP, &response)?;
            return issued(STEP, &answer, "certificate", &self.settings.ca_bundle).map(Outcome::Issued);
        }
        const STEP: &str = "Securosys sign (approval)";
        let body = Value::Object(vec![("signCertificateRequest".into(), fields)]);
        let response = self.send(STEP, "POST", SIGN, Some(&body))?;
        let answer = success_json(STEP, &response)?;
        let id = sign_request_id(STEP, &answer)?;
        log::info!("Securosys accepted the sign request {id}; it waits for approval");
        Ok(Outcome::Pending { request_id: id.to_string() })
    }
}

impl CaBackend for Securosys<'_> {
    fn name(&self) -> &'static str {
        "Securosys TSB"
    }

    fn enroll(&mut self, request: &Request) -> Result<Outcome> {
        self.sign(request)
    }

    fn renew(&mut self, request: &Request, _current: &Current) -> Result<Outcome> {
        self.sign(request)
    }

    fn polling(&self) -> Option<Polling> {
        self.settings.approval.then_some(self.settings.polling)
    }

    fn poll(&mut self, id: &str, _request: &Request, _current: Option<&Current>) -> Result<Poll> {
        const STEP: &str = "Securosys request status";
        let response = self.send(STEP, "GET", &format!("{REQUEST}{id}"), None)?;
        if !response.is_success() {
            let error = securosys_error(STEP, &response);
            return match error_body(&response) {
                Some((REQUEST_NOT_EXISTENT, _, _)) => Ok(Poll::Ended(Error::temporary(format!(
                    "Securosys sign request {id} no longer exists: {error}"
                )))),
                _ => Err(error),
            };
        }
        let answer = crate::backend::parse_json(STEP, &response)?;
        request_status(STEP, id, &answer, &self.settings.ca_bundle)
    }

    fn cancel(&mut self, id: &str) -> Result<()> {
        const STEP: &str = "cancelling the Securosys sign request";
        let response = self.send(STEP, "DELETE", &format!("{REQUEST}{id}"), None)?;
        if response.is_success() || response.status == 404 {
            return Ok(());
        }
        Err(securosys_error(STEP, &response))
    }

    fn credentials(&self) -> Credentials {
        credentials(self.settings)
    }

    fn probe_url(&self) -> String {
        http::join(&self.settings.url, "/v1/versionInfo")
    }
}

/// The `signRequestId` of an accepted sign request (it becomes a URL path segment).
pub(crate) fn sign_request_id<'a>(step: &str, answer: &'a Value) -> Result<&'a str> {
    answer
        .get("signRequestId")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && id.len() <= 128 && !id.contains(['/', '?', '#']))
        .ok_or_else(|| Error::protocol(format!("{step}: the answer has no usable signRequestId")))
}

/// §4.5: what `GET /v1/request/{id}` says about sign request `id`.
pub(crate) fn request_status(step: &str, id: &str, answer: &Value, ca_bundle: &[Vec<u8>]) -> Result<Poll> {
    let status = answer.get("status").and_then(Value::as_str).unwrap_or("");
    let ended = |message: String| Ok(Poll::Ended(Error::refused(message)));
    match status {
        "PENDING" | "APPROVED" => {
            let waiting = answer.get("notYetApprovedBy").and_then(|v| match v {
                Value::Array(items) => Some(items.len()),
                _ => None,
            });
            Ok(Poll::NotYet(match waiting {
                Some(n) => format!("{status}, {n} approval(s) outstanding"),
                None => status.to_string(),
            }))
        }
        "EXECUTED" => issued(step, answer, "result", ca_bundle).map(Poll::Issued),
        "REJECTED" => ended(format!("Securosys sign request {id} was REJECTED by an approver")),
        "CANCELLED" => ended(format!("Securosys sign request {id} was CANCELLED")),
        // design.md §7: EXPIRED and FAILED are the CA's trouble, not a refusal: retry later.
        "EXPIRED" | "FAILED" => Ok(Poll::Ended(Error::temporary(format!(
            "Securosys sign request {id} ended {status}; a new request will be made"
        )))),
        other => Err(Error::protocol(format!("{step}: unknown request status {other:?}"))),
    }
}

/// The leaf from `field`, with the configured issuing chain (`ca_bundle`, DER).
pub(crate) fn issued(step: &str, answer: &Value, field: &str, ca_bundle: &[Vec<u8>]) -> Result<Issued> {
    let leaf = crate::backend::pem_field(step, answer, field)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::protocol(format!("{step}: {field} is empty")))?;
    let bundle: Vec<pki::Cert> = ca_bundle.iter().filter_map(|der| pki::Cert::from_der(der).ok()).collect();
    let self_issued = |c: &pki::Cert| c.parsed.tbs_certificate.issuer == c.parsed.tbs_certificate.subject;
    let (roots, intermediates): (Vec<_>, Vec<_>) = bundle.into_iter().partition(self_issued);
    Ok(Issued {
        leaf,
        intermediates: intermediates.into_iter().map(|c| c.der).collect(),
        roots: roots.into_iter().map(|c| c.der).collect(),
        ca_ref: None,
    })
}

pub(crate) fn success_json(step: &str, response: &Response) -> Result<Value> {
    if !response.is_success() {
        return Err(securosys_error(step, response));
    }
    crate::backend::parse_json(step, response)
}

/// §4.2: `{"errorCode": int, "reason": "res.error.…", "message": str}`.
pub(crate) fn error_body(response: &Response) -> Option<(i64, String, String)> {
    let answer = json::parse(&response.body).ok()?;
    let code = answer.get("errorCode")?.as_i64()?;
    let text = |k: &str| http::excerpt(answer.get(k).and_then(Value::as_str).unwrap_or(""));
    Some((code, text("reason"), text("message")))
}

pub(crate) fn securosys_error(step: &str, response: &Response) -> Error {
    let Some((code, reason, message)) = error_body(response) else {
        return http::status_error(step, response);
    };
    let refused = if matches!(response.status, 401 | 403) { "TSB refused the credentials: " } else { "" };
    let text =
        format!("{step}: HTTP {}: {refused}Securosys errorCode {code} {reason}: {message}", response.status);
    let error = match response.status {
        408 | 429 | 500..=599 => Error::temporary(text).with_retry_after(response.retry_after),
        400..=499 => Error::refused(text),
        _ => Error::protocol(text),
    };
    error.with_answer(response.status, Some(code), &format!("{reason}: {message}"))
}

impl crate::backend::Protocol for SecurosysSettings {
    fn parse(fields: &mut crate::fields::Fields, allow_http: bool) -> Result<Self> {
        config::parse(fields, allow_http)
    }

    fn client(&self, http: Http) -> Box<dyn CaBackend + '_> {
        Box::new(Securosys::new(self, http))
    }

    fn credentials(&self) -> Credentials {
        credentials(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_error_code_reason_and_message() {
        let response = Response {
            status: 401,
            body: br#"{"errorCode":631,"reason":"res.error.invalid.api.key","message":"Invalid API key"}"#
                .to_vec(),
            content_type: None,
            location: None,
            retry_after: None,
            replay_nonce: None,
        };
        let error = securosys_error("s", &response);
        assert_eq!(error.kind(), crate::error::Kind::Refused);
        assert!(
            error.to_string().contains("errorCode 631 res.error.invalid.api.key: Invalid API key"),
            "{error}"
        );
        let answer = error.answer().expect("the answer as data");
        assert_eq!((answer.status, answer.code), (401, Some(631)));
        assert_eq!(answer.words, "res.error.invalid.api.key: Invalid API key");
    }
}
