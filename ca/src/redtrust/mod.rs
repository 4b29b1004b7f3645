//! Redtrust Certificate Enroll, the remote key provider (protocols.md §5; seed
//! redtrust-certificate-enroll.txt; design.md §7 "Redtrust").
//!
//! The key pair is generated and kept by the Redtrust server: `csr/create` makes it and answers
//! the CSR, the configured CA backend issues that CSR, `csr/finalize` hands the certificate back.
//! The agent plays the seed's "partner" without a browser:
//! 1. `GET <auth_url>/authclient/auth/loginrequest?Consumer=RA_API&…&hmac=` with the headers
//!    `x-partner-name`, `x-request-timestamp`, `x-hmac-signature`, where the signature is
//!    HMAC-SHA256(secret, "PARTNER:TIMESTAMP") in lowercase hex; the server answers a redirect
//!    whose Location carries `tkn` (we read it instead of following it);
//! 2. `POST /authapi/v1/login_by_temp_token {temporalToken}` (v4.42 form; the 4.33 seed says GET)
//!    gives the access and refresh tokens; `PUT /authapi/v1/refresh-token` renews them;
//!    `DELETE /authapi/v1/logout` ends every run.
//!
//! Every answer is the envelope `{message, messageType, errorCode, data}`.

pub mod config;
pub use config::*;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::backend::{RemoteKeyService, RemoteRequest};
use crate::error::{Error, Result};
use crate::http::{self, Http, Response};
use crate::json::{self, Value};
use crate::pki::Cert;
use crate::subject::{Subject, SubjectAttribute};

const LOGIN_REQUEST: &str = "/authclient/auth/loginrequest";
const LOGIN_BY_TEMP_TOKEN: &str = "/authapi/v1/login_by_temp_token";
const REFRESH_TOKEN: &str = "/authapi/v1/refresh-token";
const LOGOUT: &str = "/authapi/v1/logout";
const CREATE_V1: &str = "/raapi/v1/csr/create";
/// Renewal uses v2 of create; finalize stays v1 (seed "Step 4").
const CREATE_V2: &str = "/raapi/v2/csr/create";
const FINALIZE: &str = "/raapi/v1/csr/finalize";
/// Refresh the access token this long before it expires.
const REFRESH_MARGIN_S: u64 = 30;

/// The `key.uri` of a Redtrust key, named by its certificate's thumbprint.
pub fn key_uri(thumbprint: &str) -> String {
    format!("redtrust:{thumbprint}")
}

pub(crate) struct Tokens {
    access: Zeroizing<String>,
    refresh: Zeroizing<String>,
    expires_at: Option<u64>,
}

/// One run's session with the Redtrust server; log in on first use, [`Redtrust::logout`] at the end.
pub struct Redtrust<'a> {
    settings: &'a RedtrustSettings,
    http: Http,
    tokens: Option<Tokens>,
}

impl<'a> Redtrust<'a> {
    pub fn new(settings: &'a RedtrustSettings, http: Http) -> Self {
        Redtrust { settings, http, tokens: None }
    }

    /// `csr/create` (v1), or v2 with `thumbprintToRenew` when renewing that certificate.
    fn create_request(&mut self, subject: &Subject, renew_thumbprint: Option<&str>) -> Result<RemoteRequest> {
        const STEP: &str = "Redtrust csr/create";
        let dn: Vec<Value> = subject
            .attributes
            .iter()
            .map(|(attribute, value)| {
                json::object([("attribute", dn_name(*attribute).into()), ("value", value.as_str().into())])
            })
            .collect();
        let mut members = vec![
            ("dn".to_string(), Value::Array(dn)),
            ("hashType".to_string(), self.settings.hash_type.as_str().into()),
            ("keyLength".to_string(), 2048u64.into()),
            ("keyType".to_string(), "RSA".into()),
            ("provider".to_string(), self.settings.ca_provider.as_str().into()),
        ];
        let path = match renew_thumbprint {
            Some(thumbprint) => {
                members.push(("thumbprintToRenew".to_string(), thumbprint.into()));
                CREATE_V2
            }
            None => CREATE_V1,
        };
        let data = self.call(STEP, "POST", path, &Value::Object(members))?;
        created(STEP, &data)
    }

    /// `csr/finalize`: hands the issued certificate to Redtrust; answers its thumbprint.
    fn finalize_request(
        &mut self,
        request_code: &str,
        certificate_der: &[u8],
        own_thumbprint: &str,
    ) -> Result<String> {
        const STEP: &str = "Redtrust csr/finalize";
        let body = json::object([
            ("dataInB64", STANDARD.encode(certificate_der).into()),
            ("provider", self.settings.ca_provider.as_str().into()),
            ("requestCode", request_code.into()),
        ]);
        let data = self.call(STEP, "PUT", FINALIZE, &body)?;
        finalized(STEP, &data, own_thumbprint)
    }

    /// Ends the session (best effort: a failed logout only costs a token that expires anyway).
    fn logout(&mut self) {
        let Some(tokens) = self.tokens.take() else {
            return;
        };
        let bearer = Zeroizing::new(format!("Bearer {}", tokens.access.as_str()));
        let url = http::join(&self.settings.url, LOGOUT);
        let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
        match self.http.send("Redtrust logout", "DELETE", &url, &headers, None) {
            Ok(response) if response.is_success() => log::debug!("Redtrust session closed"),
            Ok(response) => log::warn!("Redtrust logout: HTTP {}", response.status),
            Err(e) => log::warn!("{}", e.chain_line()),
        }
    }

    /// An authenticated call that answers the envelope's `data`. A 401 is answered once by
    /// refreshing the tokens (or logging in again) and repeating the call.
    fn call(&mut self, step: &str, method: &str, path: &str, body: &Value) -> Result<Value> {
        self.ensure_session()?;
        let response = self.send_authorized(step, method, path, body)?;
        let response = if response.status == 401 {
            log::info!("{step}: the access token was refused ({}); refreshing it", envelope_words(&response));
            self.renew_session()?;
            self.send_authorized(step, method, path, body)?
        } else {
            response
        };
        envelope_data(step, &response)
    }

    fn send_authorized(&self, step: &str, method: &str, path: &str, body: &Value) -> Result<Response> {
        let access = self.tokens.as_ref().map(|t| t.access.as_str()).unwrap_or_default();
        let bearer = Zeroizing::new(format!("Bearer {access}"));
        let headers = [
            ("Authorization", bearer.as_str()),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ];
        let url = http::join(&self.settings.url, path);
        self.http.send(step, method, &url, &headers, Some(body.to_json().as_bytes()))
    }

    fn ensure_session(&mut self) -> Result<()> {
        let now = self.http.clock().now();
        let fresh = |t: &Tokens| t.expires_at.is_none_or(|at| at > now.saturating_add(REFRESH_MARGIN_S));
        match &self.tokens {
            Some(tokens) if fresh(tokens) => Ok(()),
            Some(_) => self.renew_session(),
            None => self.login(),
        }
    }

    /// `refresh-token`, or a new login when Redtrust will not refresh.
    fn renew_session(&mut self) -> Result<()> {
        const STEP: &str = "Redtrust refresh-token";
        let Some(old) = self.tokens.take() else {
            return self.login();
        };
        let body = Zeroizing::new(json::object([("refreshToken", old.refresh.as_str().into())]).to_json());
        let url = http::join(&self.settings.url, REFRESH_TOKEN);
        let result = self
            .http
            .send(STEP, "PUT", &url, &[("Content-Type", "application/json")], Some(body.as_bytes()))
            .and_then(|response| envelope_data(STEP, &response))
            .and_then(|data| tokens_from(STEP, &data));
        match result {
            Ok(tokens) => {
                self.tokens = Some(tokens);
                Ok(())
            }
            Err(e) => {
                log::info!("{}; logging in again", e.chain_line());
                self.login()
            }
        }
    }

    /// The seed's partner flow without a browser (module docs, steps 1 and 2).
    fn login(&mut self) -> Result<()> {
        const STEP: &str = "Redtrust login request";
        let s = self.settings;
        let timestamp = self.http.clock().now().to_string();
        let signature = Zeroizing::new(hmac_hex(
            s.hmac_secret.expose().as_bytes(),
            &format!("{}:{timestamp}", s.partner),
        ));
        let mut query = vec![("Consumer", "RA_API")];
        if let Some(domain) = &s.domain {
            query.push(("Domain", domain.as_str()));
        }
        query.extend([
            ("RedirectUrl", s.redirect_url.as_str()),
            ("timestamp", timestamp.as_str()),
            ("partner", s.partner.as_str()),
            ("hmac", signature.as_str()),
        ]);
        let url = format!("{}?{}", http::join(&s.auth_url, LOGIN_REQUEST), http::form_encode(&query));
        let headers = [
            ("x-partner-name", s.partner.as_str()),
            ("x-request-timestamp", timestamp.as_str()),
            ("x-hmac-signature", signature.as_str()),
        ];
        let response = self.http.send(STEP, "GET", &url, &headers, None)?;
        let temporal = match (response.status, &response.location) {
            (300..=399, Some(location)) => temporal_token(location)
                .ok_or_else(|| Error::protocol(format!("{STEP}: the redirect carries no tkn parameter")))?,
            _ if response.is_success() => {
                return Err(Error::protocol(format!(
                    "{STEP}: HTTP {} without a redirect (an interactive login page?)",
                    response.status
                )))
            }
            _ => return Err(envelope_error(STEP, &response)),
        };
        const EXCHANGE: &str = "Redtrust login_by_temp_token";
        let body = Zeroizing::new(json::object([("temporalToken", temporal.as_str().into())]).to_json());
        let url = http::join(&s.url, LOGIN_BY_TEMP_TOKEN);
        let response = self.http.send(
            EXCHANGE,
            "POST",
            &url,
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )?;
        let data = envelope_data(EXCHANGE, &response)?;
        self.tokens = Some(tokens_from(EXCHANGE, &data)?);
        log::info!("logged in to Redtrust as partner {}", s.partner);
        Ok(())
    }
}

impl RemoteKeyService for Redtrust<'_> {
    fn name(&self) -> &'static str {
        "Redtrust"
    }

    fn create(&mut self, subject: &Subject, renewing: Option<&Cert>) -> Result<RemoteRequest> {
        let Some(thumbprint) = renewing.map(Cert::thumbprint_sha1_hex) else {
            return self.create_request(subject, None);
        };
        match self.create_request(subject, Some(&thumbprint)) {
            // Redtrust no longer holds the certificate being renewed: a renewal whose finalize
            // answer was lost replaced it there (seed step 4) while the device kept the old one.
            // Renewing it can never work again; a new issuance (the enrollment's call, with the
            // same partner credential) gives the device a key Redtrust holds.
            Err(e) if e.answer().is_some_and(|a| a.status == 404) => {
                log::warn!("{}; requesting a new key and certificate instead", e.chain_line());
                self.create_request(subject, None)
            }
            other => other,
        }
    }

    fn finalize(&mut self, handle: &str, leaf: &Cert) -> Result<String> {
        let thumbprint = self.finalize_request(handle, &leaf.der, &leaf.thumbprint_sha1_hex())?;
        Ok(key_uri(&thumbprint))
    }

    fn end(&mut self) {
        self.logout();
    }
}

/// Redtrust's lowercase dn attribute names (seed example: cn, o, c, st, l, ou).
fn dn_name(attribute: SubjectAttribute) -> &'static str {
    match attribute {
        SubjectAttribute::C => "c",
        SubjectAttribute::ST => "st",
        SubjectAttribute::L => "l",
        SubjectAttribute::O => "o",
        SubjectAttribute::OU => "ou",
        SubjectAttribute::CN => "cn",
        SubjectAttribute::SerialNumber => "serialnumber",
    }
}

/// HMAC-SHA256 in lowercase hex (the seed's example signature is 64 lowercase hex digits).
pub fn hmac_hex(secret: &[u8], message: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::sign(&key, message.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `tkn` query parameter of the redirect target.
pub(crate) fn temporal_token(location: &str) -> Option<Zeroizing<String>> {
    let query = location.split_once('?')?.1.split('#').next()?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "tkn")
        .map(|(_, v)| Zeroizing::new(http::query_unescape(v)))
        .filter(|v| !v.is_empty())
}

/// The `data` of a `csr/create` answer: the request code and the CSR Redtrust made.
pub(crate) fn created(step: &str, data: &Value) -> Result<RemoteRequest> {
    let text = |k: &str| data.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    let request_code = text("requestCode")
        .filter(|c| {
            c.len() <= 128 && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        })
        .ok_or_else(|| Error::protocol(format!("{step}: the answer has no usable requestCode")))?;
    let csr_der = text("csr")
        .and_then(|b64| STANDARD.decode(b64.split_whitespace().collect::<String>()).ok())
        .ok_or_else(|| Error::protocol(format!("{step}: the answer has no base64 csr")))?;
    Ok(RemoteRequest { handle: request_code.to_string(), csr_der })
}

/// The `data` of a `csr/finalize` answer, checked against the certificate's own thumbprint.
pub(crate) fn finalized(step: &str, data: &Value, own_thumbprint: &str) -> Result<String> {
    // v4.42 answers idCertificate and thumbprint; older servers may answer nothing useful.
    match data.get("thumbprint").and_then(Value::as_str) {
        Some(t) if !t.eq_ignore_ascii_case(own_thumbprint) => Err(Error::protocol(format!(
            "{step}: Redtrust reports thumbprint {t}, but the certificate's is {own_thumbprint}"
        ))),
        _ => Ok(own_thumbprint.to_string()),
    }
}

pub(crate) fn tokens_from(step: &str, data: &Value) -> Result<Tokens> {
    let text = |k: &str| data.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    let (Some(access), Some(refresh)) = (text("accessToken"), text("refreshToken")) else {
        return Err(Error::protocol(format!("{step}: the answer has no accessToken/refreshToken")));
    };
    let expires_at = text("expiration").and_then(crate::time::parse_rfc3339);
    Ok(Tokens { access: Zeroizing::new(access.into()), refresh: Zeroizing::new(refresh.into()), expires_at })
}

/// `data` of a SUCCESS envelope; anything else keeps Redtrust's errorCode and message.
pub(crate) fn envelope_data(step: &str, response: &Response) -> Result<Value> {
    if !response.is_success() {
        return Err(envelope_error(step, response));
    }
    let envelope = crate::backend::parse_json(step, response)?;
    let code = envelope.get("errorCode").and_then(Value::as_str).unwrap_or("OK");
    let kind = envelope.get("messageType").and_then(Value::as_str).unwrap_or("SUCCESS");
    if kind == "ERROR" || code != "OK" {
        return Err(envelope_error(step, response));
    }
    Ok(envelope.get("data").cloned().unwrap_or(Value::Null))
}

pub(crate) fn envelope_words(response: &Response) -> String {
    let Ok(envelope) = json::parse(&response.body) else {
        return response.excerpt();
    };
    let text = |k: &str| envelope.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    http::excerpt(&format!("Redtrust errorCode {}: {}", text("errorCode"), text("message")))
}

pub(crate) fn envelope_error(step: &str, response: &Response) -> Error {
    let refused =
        if matches!(response.status, 401 | 403) { "Redtrust refused the credentials: " } else { "" };
    let words = envelope_words(response);
    let message = format!("{step}: HTTP {}: {refused}{words}", response.status);
    let error = match response.status {
        408 | 429 | 500..=599 => Error::temporary(message).with_retry_after(response.retry_after),
        400..=499 => Error::refused(message),
        _ => Error::protocol(message),
    };
    error.with_answer(response.status, None, &words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_is_lowercase_hex_of_partner_colon_timestamp() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            hmac_hex(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_temporal_token_comes_from_the_redirect_query() {
        let t = temporal_token("https://app.example/cb?state=1&tkn=ab%2Bc&x=2").unwrap();
        assert_eq!(t.as_str(), "ab+c");
        assert!(temporal_token("https://app.example/cb?tkn=").is_none());
        assert!(temporal_token("https://app.example/cb").is_none());
    }
}
