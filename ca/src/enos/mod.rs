//! Envision EnOS connect-service certificates (protocols.md §1; seed enos-apply-certificate.txt).
//!
//! Auth (§1.2): `token/get` with `encryption = sha256hex(appKey + timestamp + appSecret)`, then on
//! every call `apim-signature = sha256hex(accessToken + paramsData + timestamp + appSecret)` where
//! paramsData is the sorted query parameters as key+value followed by the body bytes exactly as
//! sent. Apply (§1.4) and renew (§1.5) are synchronous. Renewal is authenticated by the same
//! application credentials: EnOS does not accept the device certificate (§1.9).

pub mod config;
pub use config::*;

use zeroize::Zeroizing;

use crate::backend::{CaBackend, Credentials, Current, Outcome, Request};
use crate::error::{Error, Result};
use crate::http::{self, Http};
use crate::json::{self, Value};
use crate::pki::Issued;
use crate::tokens::Token;

pub const CREDENTIALS: Credentials = Credentials {
    enroll: "EnOS application appKey + appSecret (apim token and per-request signature)",
    renew: "the same EnOS application appKey + appSecret (EnOS does not accept the device certificate)",
};

const TOKEN_PATH: &str = "/apim-token-service/v2.0/token/get";
const REFRESH_PATH: &str = "/apim-token-service/v2.0/token/refresh";
const CERTIFICATES_PATH: &str = "/connect-service/v2.0/certificates";
/// §1.2: the token service's "token expired" code.
const TOKEN_EXPIRED: i64 = 1203;
/// `action=list` answers every certificate the device ever had (revoked and expired ones too:
/// about 2 KB each), so a device that renewed monthly for years outgrows the usual 64 KiB
/// bound; 1 MiB holds about 500.
const LIST_MAX_BODY_BYTES: u64 = 1 << 20;
/// §1.2: "duplicated encryption": another token request was signed in the same millisecond
/// (another replica of the gateway, say). A new timestamp makes a new request.
const DUPLICATED_ENCRYPTION: i64 = 1001;

pub struct Enos<'a> {
    settings: &'a EnosSettings,
    http: Http,
}

impl<'a> Enos<'a> {
    pub fn new(settings: &'a EnosSettings, http: Http) -> Self {
        Enos { settings, http }
    }

    /// The token cache key: a token belongs to one application at one API gateway.
    fn token_key(&self) -> String {
        format!("enos {} {}", self.settings.api_gateway, self.settings.app_key)
    }

    fn issue_authority(request: &Request) -> &'static str {
        match request.algorithm {
            enroll_hal::Algorithm::P256 => "ECC",
            enroll_hal::Algorithm::Rsa2048 => "RSA",
        }
    }

    /// A valid access token: the cached one (shared by the clients of this transport), a
    /// refreshed one when it is about to expire, or a new one.
    fn access_token(&self) -> Result<Zeroizing<String>> {
        let slot = self.http.tokens().slot(&self.token_key());
        let mut cached = slot.lock();
        let now = self.http.clock().now();
        let token = match cached.take() {
            Some(token) if token.expires_at > now.saturating_add(60) => token,
            Some(stale) => self.refresh_token(&stale)?,
            None => self.fetch_token(TOKEN_PATH, None)?,
        };
        let value = token.value.clone();
        *cached = Some(token);
        Ok(value)
    }

    /// Marks the cached token expired (the service said 1203), so the next call refreshes it.
    fn expire_token(&self) {
        if let Some(token) = self.http.tokens().slot(&self.token_key()).lock().as_mut() {
            token.expires_at = 0;
        }
    }

    /// §1.2 step A': exchange an expired token; if the service will not, get a new one.
    fn refresh_token(&self, stale: &Token) -> Result<Token> {
        self.fetch_token(REFRESH_PATH, Some(&stale.value)).or_else(|e| {
            log::info!("EnOS token refresh failed ({e}); getting a new token");
            self.fetch_token(TOKEN_PATH, None)
        })
    }

    /// `token/get` (no `previous`) or `token/refresh` (with the token being replaced), once more
    /// with a new timestamp when the service saw this one already.
    fn fetch_token(&self, path: &str, previous: Option<&str>) -> Result<Token> {
        if let Some(token) = self.try_fetch_token(path, previous)? {
            return Ok(token);
        }
        log::info!(
            "EnOS token request signed in the same millisecond as another one (status 1001); retrying"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        self.try_fetch_token(path, previous)?.ok_or_else(|| {
            Error::temporary(
                "getting an EnOS access token: status 1001 twice: another client signs token requests \
                 with this appKey in the same milliseconds",
            )
        })
    }

    /// One token request; `None` when the service answers 1001 (timestamp already used).
    fn try_fetch_token(&self, path: &str, previous: Option<&str>) -> Result<Option<Token>> {
        const STEP: &str = "getting an EnOS access token";
        let timestamp = now_ms(self.http.clock()).to_string();
        let secret = self.settings.app_secret.expose();
        let encryption = sha256_hex(&[&self.settings.app_key, &timestamp, secret]);
        let mut members = vec![
            ("appKey".to_string(), Value::from(self.settings.app_key.as_str())),
            ("encryption".to_string(), encryption.into()),
            ("timestamp".to_string(), Value::Number(timestamp)),
        ];
        if let Some(previous) = previous {
            members.push(("accessToken".to_string(), previous.into()));
        }
        let body = Zeroizing::new(Value::Object(members).to_json());
        let url = http::join(&self.settings.api_gateway, path);
        let response = self.http.send(
            STEP,
            "POST",
            &url,
            &[("Content-Type", "application/json;charset=UTF-8")],
            Some(body.as_bytes()),
        )?;
        token_answer(STEP, &response, self.http.clock().now())
    }

    /// The device selection of §1.3 plus the action, as (key, value) query parameters.
    fn query(&self, action: &str) -> Vec<(&'static str, String)> {
        let mut params = vec![("action", action.to_string()), ("orgId", self.settings.org_id.clone())];
        match &self.settings.device {
            EnosDevice::Asset(id) => params.push(("assetId", id.clone())),
            EnosDevice::Product { product_key, device_key } => {
                params.push(("productKey", product_key.clone()));
                params.push(("deviceKey", device_key.clone()));
            }
        }
        params
    }

    /// One signed connect-service call (`POST` with a JSON body, or `GET` without one when
    /// `body` is `None`); retried once with a fresh token on code 1203.
    fn call(&mut self, action: &str, body: Option<&Value>) -> Result<Value> {
        let step = format!("EnOS certificates action={action}");
        let method = if body.is_some() { "POST" } else { "GET" };
        let body = body.map(Value::to_json).unwrap_or_default();
        for attempt in 0..2 {
            let token = self.access_token()?;
            let timestamp = now_ms(self.http.clock()).to_string();
            let params = self.query(action);
            let signature =
                sign_request(&token, &params, body.as_bytes(), &timestamp, self.settings.app_secret.expose());
            let query: Vec<String> =
                params.iter().map(|(k, v)| format!("{k}={}", http::query_escape(v))).collect();
            let url =
                format!("{}?{}", http::join(&self.settings.api_gateway, CERTIFICATES_PATH), query.join("&"));
            let headers = [
                ("Content-Type", "application/json;charset=UTF-8"),
                ("apim-accesstoken", token.as_str()),
                ("apim-signature", signature.as_str()),
                ("apim-timestamp", timestamp.as_str()),
            ];
            let sent = (method == "POST").then_some(body.as_bytes());
            let limit = if action == "list" { LIST_MAX_BODY_BYTES } else { http::MAX_BODY_BYTES };
            let response = self.http.send_bounded(&step, method, &url, &headers, sent, limit)?;
            match service_answer(&step, &response)? {
                Some(data) => return Ok(data),
                None if attempt == 0 => {
                    log::info!("EnOS access token expired (code 1203); refreshing it");
                    self.expire_token();
                }
                None => {}
            }
        }
        Err(Error::refused(format!(
            "{step}: EnOS kept answering code 1203 (token expired) with a fresh token"
        )))
    }

    /// The old certificate is no longer valid at EnOS: most likely an earlier run's renewal was
    /// processed and its answer lost (a power cut, a kill, a dropped connection), and EnOS
    /// superseded the old certificate then (§1.5). The certificate issued for this request's key
    /// is then the device's valid one in `action=list` (§1.7); when it is not there (or the list
    /// shows no PEM), `apply` with the same CSR gets one for the same key.
    fn recover_renewal(&mut self, request: &Request, refusal: Error) -> Result<Outcome> {
        log::warn!("{}; looking for a certificate already issued for this key", refusal.chain_line());
        let spki = crate::pki::verify_csr(&request.csr.der)?;
        if let Some(issued) = self.listed_for_key(&spki)? {
            log::info!(
                "EnOS already issued certificate {} for this key; taking it",
                issued.ca_ref.as_deref().unwrap_or("?")
            );
            return Ok(Outcome::Issued(issued));
        }
        log::info!("no certificate for this key at EnOS; applying for one with the same CSR");
        self.enroll(request)
    }

    /// The valid certificate in `action=list` that carries `spki`, if any.
    fn listed_for_key(&mut self, spki: &[u8]) -> Result<Option<Issued>> {
        listed_for_key(&self.call("list", None)?, spki)
    }
}

/// The valid certificate of an `action=list` answer's data that carries `spki`, if any.
pub(crate) fn listed_for_key(data: &Value, spki: &[u8]) -> Result<Option<Issued>> {
    let Value::Array(entries) = data else {
        return Err(Error::protocol("EnOS certificates action=list: data is not an array"));
    };
    for entry in entries {
        let valid = entry.get("certStatus").and_then(Value::as_i64) == Some(0);
        let pem = entry.get("cert").and_then(Value::as_str).filter(|c| c.contains("-----BEGIN"));
        let (true, Some(_)) = (valid, pem) else { continue };
        let issued = issued_from(entry)?;
        if crate::pki::Cert::from_der(&issued.leaf)?.spki_der() == spki {
            return Ok(Some(issued));
        }
    }
    Ok(None)
}

/// The token service's answer (§1.2): the token, `None` for status 1001 (the timestamp was used
/// already), or the error. `now` is when it arrived, on the transport's clock.
pub(crate) fn token_answer(step: &str, response: &http::Response, now: u64) -> Result<Option<Token>> {
    if !response.is_success() {
        return Err(gateway_error(step, response));
    }
    let answer = crate::backend::parse_json(step, response)?;
    // The doc's sample spells the field "stauts" (protocols.md §1.2).
    let status = answer.get("status").or_else(|| answer.get("stauts")).and_then(Value::as_i64);
    if status == Some(DUPLICATED_ENCRYPTION) {
        return Ok(None);
    }
    if status != Some(0) {
        let msg = answer.get("msg").and_then(Value::as_str).unwrap_or("");
        let status = status.map_or("missing".into(), |s| s.to_string());
        return Err(if status == "1005" {
            Error::temporary(format!("{step}: EnOS token service failed: status {status}: {msg}"))
        } else {
            Error::refused(format!(
                "{step}: EnOS token service refused the app credentials: status {status}: {msg}"
            ))
        });
    }
    let data =
        answer.get("data").ok_or_else(|| Error::protocol(format!("{step}: the answer has no data")))?;
    let value = data
        .get("accessToken")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::protocol(format!("{step}: the answer has no data.accessToken")))?;
    let lifetime = data.get("expire").and_then(Value::as_u64).unwrap_or(7200);
    // `expire` is the CA's number: saturate, never overflow (issue 14 item 5).
    Ok(Some(Token { value: Zeroizing::new(value.to_string()), expires_at: now.saturating_add(lifetime) }))
}

/// A connect-service answer (§1.1): its `data` on code 0, `None` on 1203 (token expired), or
/// the error (gateway status, service code).
pub(crate) fn service_answer(step: &str, response: &http::Response) -> Result<Option<Value>> {
    if !response.is_success() {
        return Err(gateway_error(step, response));
    }
    let answer = crate::backend::parse_json(step, response)?;
    match answer.get("code").and_then(Value::as_i64) {
        Some(0) => answer
            .get("data")
            .cloned()
            .map(Some)
            .ok_or_else(|| Error::protocol(format!("{step}: the answer has no data"))),
        Some(TOKEN_EXPIRED) => Ok(None),
        _ => Err(service_error(step, &answer)),
    }
}

/// The certificate of an apply, renew or list entry (§1.4, §1.7).
pub(crate) fn issued_from(data: &Value) -> Result<Issued> {
    const STEP: &str = "reading the EnOS certificate";
    let leaf = crate::backend::pem_field(STEP, data, "cert")?
        .into_iter()
        .next()
        .ok_or_else(|| Error::protocol(format!("{STEP}: empty cert")))?;
    let roots = match data.get("caCert") {
        Some(_) => crate::backend::pem_field(STEP, data, "caCert")?,
        None => Vec::new(),
    };
    // The table says certSn, the samples certSN; it is a decimal string (§1.4).
    let ca_ref = ["certSN", "certSn"].iter().find_map(|k| data.get(k)).and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.clone()),
        _ => None,
    });
    if ca_ref.as_deref().is_none_or(|s| s.parse::<i64>().is_err()) {
        return Err(Error::protocol(format!("{STEP}: certSN is missing or not a number")));
    }
    Ok(Issued { leaf, intermediates: Vec::new(), roots, ca_ref })
}

impl CaBackend for Enos<'_> {
    fn name(&self) -> &'static str {
        "enos"
    }

    fn enroll(&mut self, request: &Request) -> Result<Outcome> {
        let body = json::object([
            ("csr", request.csr.pem.as_str().into()),
            ("validDay", self.settings.valid_days.into()),
            ("issueAuthority", Self::issue_authority(request).into()),
        ]);
        let data = self.call("apply", Some(&body))?;
        Ok(Outcome::Issued(issued_from(&data)?))
    }

    fn renew(&mut self, request: &Request, current: &Current) -> Result<Outcome> {
        // design.md §7: certSn is the integer form of the certSN string kept at apply; if
        // state.json lost it, the certificate's own serial is the same number (seed sample).
        let cert_sn = current
            .ca_ref
            .map(str::to_string)
            .or_else(|| current.cert.serial_decimal())
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| Error::protocol("EnOS renew: the current certificate's certSN is unknown and its serial is not a 63-bit number"))?;
        let body = json::object([
            ("certSn", cert_sn.into()),
            ("csr", request.csr.pem.as_str().into()),
            ("validDay", self.settings.valid_days.into()),
            ("issueAuthority", Self::issue_authority(request).into()),
        ]);
        match self.call("renew", Some(&body)) {
            Ok(data) => Ok(Outcome::Issued(issued_from(&data)?)),
            Err(error) if replaced_or_gone(&error) => self.recover_renewal(request, error),
            Err(error) => Err(error),
        }
    }

    fn credentials(&self) -> Credentials {
        CREDENTIALS
    }

    fn probe_url(&self) -> String {
        http::join(&self.settings.api_gateway, TOKEN_PATH)
    }
}

/// §1.2 step B: sha256hex(token + sorted(key+value)… + body + timestamp + secret).
pub fn sign_request(
    token: &str,
    params: &[(&str, String)],
    body: &[u8],
    timestamp: &str,
    secret: &str,
) -> String {
    let mut sorted: Vec<&(&str, String)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(token.as_bytes());
    for (key, value) in sorted {
        context.update(key.as_bytes());
        context.update(value.as_bytes());
    }
    context.update(body);
    context.update(timestamp.as_bytes());
    context.update(secret.as_bytes());
    hex(context.finish().as_ref())
}

fn sha256_hex(parts: &[&str]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part.as_bytes());
    }
    hex(context.finish().as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms(clock: &crate::time::Clock) -> u64 {
    // The effective clock (design.md §5 rule 7), with the system's sub-second part.
    let millis =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_millis());
    clock.now().saturating_mul(1000).saturating_add(u64::from(millis))
}

/// Gateway statuses (§1.1): 401 bad credentials/signature, 403 IP not allowed, 429 rate limit.
fn gateway_error(step: &str, response: &http::Response) -> Error {
    match response.status {
        401 => Error::refused(format!(
            "{step}: the EnOS API gateway rejected the credentials or request signature (HTTP 401): {}",
            response.excerpt()
        ))
        .with_answer(401, None, &response.excerpt()),
        _ => http::status_error(step, response),
    }
}

/// Whether a renew refusal says the certificate to replace is no longer the device's valid one
/// (revoked, superseded, expired: §1.5 "original revoked", "original expired"). EnOS answers
/// these with 99400 and words only, so the words decide [I].
fn replaced_or_gone(error: &Error) -> bool {
    let Some(answer) = error.answer().filter(|a| a.code == Some(99400)) else {
        return false;
    };
    let words = answer.words.to_ascii_lowercase();
    ["revoked", "expired", "not the valid", "not valid", "superseded", "replaced"]
        .iter()
        .any(|w| words.contains(w))
}

/// Service codes (§1.1, §1.4): 99500 and token-service 1005 are the CA's own failures (retry);
/// everything else is a refusal that needs a person (bad device, policy, parameters).
fn service_error(step: &str, answer: &Value) -> Error {
    let code = answer.get("code").and_then(Value::as_i64);
    let msg = answer.get("msg").and_then(Value::as_str).unwrap_or("");
    let request_id = answer.get("requestId").and_then(Value::as_str).unwrap_or("-");
    let Some(code) = code else {
        return Error::protocol(format!("{step}: the answer has no numeric code"));
    };
    let text = format!("{step}: EnOS code {code}: {} (requestId {request_id})", http::excerpt(msg));
    let error = match code {
        99500 | 1005 => Error::temporary(text),
        _ => Error::refused(text),
    };
    // EnOS answers its errors with HTTP 200 and the code in the body (§1.1).
    error.with_answer(200, Some(code), &http::excerpt(msg))
}

impl crate::backend::Protocol for EnosSettings {
    fn parse(fields: &mut crate::fields::Fields, allow_http: bool) -> Result<Self> {
        config::parse(fields, allow_http)
    }

    fn client(&self, http: Http) -> Box<dyn CaBackend + '_> {
        Box::new(Enos::new(self, http))
    }

    fn credentials(&self) -> Credentials {
        CREDENTIALS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_sorts_params_bytewise_and_hashes_body_as_sent() {
        // The DECADA firmware's layout (protocols.md §1.2): action, deviceKey, orgId, productKey.
        let params = vec![
            ("orgId", "o1".to_string()),
            ("action", "apply".to_string()),
            ("productKey", "pk".to_string()),
            ("deviceKey", "dk".to_string()),
        ];
        let body = br#"{"csr":"x"}"#;
        let expected =
            sha256_hex(&["tok", "actionapplydeviceKeydkorgIdo1productKeypk", r#"{"csr":"x"}"#, "123", "sec"]);
        assert_eq!(sign_request("tok", &params, body, "123", "sec"), expected);
        assert_ne!(sign_request("tok", &params, br#"{"csr": "x"}"#, "123", "sec"), expected);
    }

    #[test]
    fn service_codes_map_to_the_documented_exit_classes() {
        let answer = |code: i64| {
            json::parse(
                format!(r#"{{"code":{code},"msg":"Device cannot be found","requestId":"r1"}}"#).as_bytes(),
            )
            .unwrap()
        };
        let refused = service_error("apply", &answer(11404));
        assert_eq!(refused.kind(), crate::error::Kind::Refused);
        assert_eq!(refused.to_string(), "apply: EnOS code 11404: Device cannot be found (requestId r1)");
        let expected =
            crate::error::CaAnswer { status: 200, code: Some(11404), words: "Device cannot be found".into() };
        assert_eq!(refused.answer(), Some(&expected));
        assert_eq!(service_error("apply", &answer(99500)).kind(), crate::error::Kind::Temporary);
    }
}
