//! Sectigo Certificate Manager REST API (protocols.md §3; seed sectigo-scm-rest-api-nl.txt).
//!
//! Auth (§3.1): the headers `login`, `password`, `customerUri` on every call. Issuance is always
//! asynchronous (§3.5): `POST /api/ssl/v1/enroll` answers `{sslId, renewId}`, then
//! `GET /api/ssl/v1/collect/{sslId}?format=x509` is polled until it delivers the certificate.
//! Renewal (§3.3, design.md §7): `POST /api/ssl/v1/renewById/{current sslId}` with the new CSR,
//! then collect the new sslId. Every call needs the SCM API account: there is no
//! device-credential renewal in this API.

pub mod config;
pub use config::*;

use crate::backend::Polling;
use crate::backend::{CaBackend, Credentials, Current, Outcome, Poll, Request};
use crate::error::{Error, Result};
use crate::http::{self, Http, Response};
use crate::json::{self, Value};
use crate::pki;

pub const CREDENTIALS: Credentials = Credentials {
    enroll: "Sectigo SCM API account (login + password file + customerUri headers)",
    renew: "the same Sectigo SCM API account (SCM has no device-certificate renewal)",
};

const ENROLL: &str = "/api/ssl/v1/enroll";
const RENEW_BY_ID: &str = "/api/ssl/v1/renewById/";
const COLLECT: &str = "/api/ssl/v1/collect/";
const DETAILS: &str = "/api/ssl/v1/";
/// `x509`: certificate and chain as PEM (§3.3); we sort the order ourselves.
const COLLECT_FORMAT: &str = "x509";

/// §3.3 "Pending behaviour": the codes collect answers while the certificate is not ready.
const NOT_READY: [i64; 4] = [-1400, -183, -109, -103];
/// §3.2: revoked, can't download; already revoked.
const TERMINAL: [i64; 2] = [-110, -159];
/// §3.2: CA unavailable.
const CA_UNAVAILABLE: i64 = -195;
/// Request states after which a certificate will never be collectable (§3.3 status values).
const DEAD_STATES: [&str; 6] = ["Declined", "Rejected", "Revoked", "Expired", "Invalid", "Replaced"];

pub struct Sectigo<'a> {
    settings: &'a SectigoSettings,
    http: Http,
    /// Set after the 25.4 query form of collect answered 404: use the older path form.
    collect_path_form: bool,
}

impl<'a> Sectigo<'a> {
    pub fn new(settings: &'a SectigoSettings, http: Http) -> Self {
        Sectigo { settings, http, collect_path_form: false }
    }

    fn send(&self, step: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
        let url = http::join(&self.settings.url, path);
        let body = body.map(Value::to_json);
        let headers = [
            ("Accept", "application/json"),
            ("Content-Type", "application/json;charset=utf-8"),
            ("customerUri", self.settings.customer_uri.as_str()),
            ("login", self.settings.login.as_str()),
            ("password", self.settings.password.expose()),
        ];
        self.http.send(step, method, &url, &headers, body.as_deref().map(str::as_bytes))
    }

    /// `{"sslId": n}` out of a successful enroll or renewById answer.
    pub(crate) fn accepted(step: &str, response: &Response) -> Result<Outcome> {
        if !response.is_success() {
            return Err(sectigo_error(step, response));
        }
        let answer = crate::backend::parse_json(step, response)?;
        let id = answer
            .get("sslId")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::protocol(format!("{step}: the answer has no numeric sslId")))?;
        log::info!("Sectigo accepted the request as sslId {id}; collecting it");
        Ok(Outcome::Pending { request_id: id.to_string() })
    }

    fn collect(&mut self, ssl_id: &str) -> Result<Response> {
        const STEP: &str = "Sectigo collect";
        let query_form = format!("{COLLECT}{ssl_id}?format={COLLECT_FORMAT}");
        let path_form = format!("{COLLECT}{ssl_id}/{COLLECT_FORMAT}");
        if !self.collect_path_form {
            let response = self.send(STEP, "GET", &query_form, None)?;
            if response.status != 404 {
                return Ok(response);
            }
            // Older SCM releases only know /collect/{id}/{format} (protocols.md §3.3, §7 q6).
            log::info!("Sectigo collect: the ?format= form answered 404; using /collect/{{id}}/{{format}}");
            self.collect_path_form = true;
        }
        self.send(STEP, "GET", &path_form, None)
    }

    /// §3.3 `GET /api/ssl/v1/{sslId}`: the request's status word, if the answer has one.
    fn status_of(&self, ssl_id: &str) -> Option<String> {
        let response =
            self.send("Sectigo certificate details", "GET", &format!("{DETAILS}{ssl_id}"), None).ok()?;
        let answer = json::parse(&response.body).ok().filter(|_| response.is_success())?;
        answer.get("status").and_then(Value::as_str).map(str::to_string)
    }

    pub(crate) fn delivered(ssl_id: &str, response: &Response) -> Result<Poll> {
        let text = std::str::from_utf8(&response.body)
            .map_err(|_| Error::protocol("Sectigo collect: the certificate is not text"))?;
        let certs = pki::parse_pem_certs(text).map_err(|e| e.context("Sectigo collect"))?;
        let issued = pki::sort_returned(certs, Some(ssl_id.to_string()))
            .map_err(|e| e.context(format!("Sectigo collect of sslId {ssl_id}")))?;
        Ok(Poll::Issued(issued))
    }
}

impl CaBackend for Sectigo<'_> {
    fn name(&self) -> &'static str {
        "Sectigo SCM"
    }

    fn enroll(&mut self, request: &Request) -> Result<Outcome> {
        const STEP: &str = "Sectigo enroll";
        let s = self.settings;
        let body = json::object([
            ("orgId", s.org_id.into()),
            ("csr", request.csr.pem.as_str().into()),
            ("certType", s.cert_type.into()),
            ("term", s.term.into()),
            // §3.3: comma-separated; IP and URI SANs travel in the CSR only (design.md §7).
            ("subjAltNames", Some(request.sans.dns.join(",")).filter(|v| !v.is_empty()).into()),
            ("externalRequester", s.external_requester.clone().into()),
            ("comments", s.comments.clone().into()),
        ]);
        let response = self.send(STEP, "POST", ENROLL, Some(&without_nulls(body)))?;
        Self::accepted(STEP, &response)
    }

    fn renew(&mut self, request: &Request, current: &Current) -> Result<Outcome> {
        const STEP: &str = "Sectigo renewById";
        let Some(ssl_id) = current.ca_ref.filter(|id| id.parse::<u64>().is_ok()) else {
            // Same credential either way: a fresh enrollment is as good as a renewal here.
            log::warn!("no Sectigo sslId is recorded for the current certificate; enrolling anew");
            return self.enroll(request);
        };
        let body = json::object([("csr", request.csr.pem.as_str().into())]);
        let response = self.send(STEP, "POST", &format!("{RENEW_BY_ID}{ssl_id}"), Some(&body))?;
        Self::accepted(STEP, &response)
    }

    fn polling(&self) -> Option<Polling> {
        Some(self.settings.polling)
    }

    fn poll(&mut self, ssl_id: &str, _request: &Request, _current: Option<&Current>) -> Result<Poll> {
        let response = self.collect(ssl_id)?;
        if response.is_success() {
            if response.body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Poll::NotYet("collect answered 200 with an empty body".into()));
            }
            return Self::delivered(ssl_id, &response);
        }
        let Some((code, description)) = error_body(&response) else {
            return Err(sectigo_error("Sectigo collect", &response));
        };
        if NOT_READY.contains(&code) {
            // A declined request also says "not collectable": ask for its state before waiting.
            if let Some(state) = self.status_of(ssl_id).filter(|s| DEAD_STATES.contains(&s.as_str())) {
                return Ok(Poll::Ended(Error::refused(format!(
                    "Sectigo request sslId {ssl_id} is {state}: Sectigo code {code}: {description}"
                ))));
            }
            return Ok(Poll::NotYet(format!("Sectigo code {code}: {description}")));
        }
        if TERMINAL.contains(&code) {
            return Ok(Poll::Ended(sectigo_error(&format!("Sectigo collect of sslId {ssl_id}"), &response)));
        }
        Err(sectigo_error("Sectigo collect", &response))
    }

    fn credentials(&self) -> Credentials {
        CREDENTIALS
    }

    fn probe_url(&self) -> String {
        http::join(&self.settings.url, "/api/ssl/v1/types")
    }
}

/// §3.2: `{"code": <negative int>, "description": <string>}`.
pub(crate) fn error_body(response: &Response) -> Option<(i64, String)> {
    let answer = json::parse(&response.body).ok()?;
    let code = answer.get("code")?.as_i64()?;
    let description = answer.get("description").and_then(Value::as_str).unwrap_or("");
    Some((code, http::excerpt(description)))
}

/// Keeps Sectigo's words; classifies per design.md §7 (-195 CA unavailable is temporary).
pub(crate) fn sectigo_error(step: &str, response: &Response) -> Error {
    let Some((code, description)) = error_body(response) else {
        return http::status_error(step, response);
    };
    let refused = if matches!(response.status, 401 | 403) { "Sectigo refused the API account: " } else { "" };
    let message = format!("{step}: HTTP {}: {refused}Sectigo code {code}: {description}", response.status);
    let error = match response.status {
        _ if code == CA_UNAVAILABLE => Error::temporary(message),
        408 | 429 | 500..=599 => Error::temporary(message).with_retry_after(response.retry_after),
        400..=499 => Error::refused(message),
        _ => Error::protocol(message),
    };
    error.with_answer(response.status, Some(code), &description)
}

/// Optional members are left out rather than sent as `null`.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(members) => Value::Object(members.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        other => other,
    }
}

impl crate::backend::Protocol for SectigoSettings {
    fn parse(fields: &mut crate::fields::Fields, allow_http: bool) -> Result<Self> {
        config::parse(fields, allow_http)
    }

    fn client(&self, http: Http) -> Box<dyn CaBackend + '_> {
        Box::new(Sectigo::new(self, http))
    }

    fn credentials(&self) -> Credentials {
        CREDENTIALS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, body: &str) -> Response {
        Response {
            status,
            body: body.as_bytes().to_vec(),
            content_type: None,
            location: None,
            retry_after: None,
            replay_nonce: None,
        }
    }

    #[test]
    fn errors_keep_sectigo_words_and_classify_by_code_and_status() {
        let auth = sectigo_error("s", &response(401, r#"{"code":-16,"description":"Unknown user"}"#));
        assert_eq!(auth.kind(), crate::error::Kind::Refused);
        assert!(auth.to_string().contains("Sectigo code -16: Unknown user"), "{auth}");
        // The answer as data, for the gateway: status, vendor code and words.
        let answer = crate::error::CaAnswer { status: 401, code: Some(-16), words: "Unknown user".into() };
        assert_eq!(auth.context("enrolling").answer(), Some(&answer));
        let busy = sectigo_error("s", &response(400, r#"{"code":-195,"description":"CA unavailable"}"#));
        assert_eq!(busy.kind(), crate::error::Kind::Temporary);
        let plain = sectigo_error("s", &response(502, "Bad Gateway"));
        assert_eq!(plain.kind(), crate::error::Kind::Temporary);
        assert_eq!(
            plain.answer().map(|a| (a.status, a.code, a.words.as_str())),
            Some((502, None, "Bad Gateway"))
        );
    }

    #[test]
    fn optional_members_are_dropped_not_sent_as_null() {
        let body = without_nulls(json::object([("a", 1u64.into()), ("b", Value::Null)]));
        assert_eq!(body.to_json(), r#"{"a":1}"#);
    }
}
