//! EnOS emulator: API-gateway token + request signature (protocols.md §1.2) and the
//! connect-service certificate calls `action=apply` (§1.4, seeds/enos-apply-certificate.txt)
//! and `action=renew` (§1.5).
//!
//! Gateway failures (bad or missing signature, unknown token) are HTTP 401 with a text body,
//! before the service is reached (§1.1); service errors are HTTP 200 with the envelope
//! `{"code","msg","requestId","data"}`; token-service errors are HTTP 200 with `{"status","msg",…}`.

use crate::emulator::{answer_fault, lock, tag, Shared};
use crate::fault::{Endpoint, Fault, Phase};
use crate::pki::{self, IssuedCert, LeafFault, LeafProfile, ParsedCsr};
use crate::server::{Request, Response};
use crate::util;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

/// Allowed clock difference for `timestamp` / `apim-timestamp`: ±10 minutes.
const SKEW_MS: i64 = 10 * 60 * 1000;

/// EnOS identifiers and credentials of the emulated organisation, app and device.
#[derive(Clone, Debug)]
pub struct EnosConfig {
    /// Application (service account) access key.
    pub app_key: String,
    /// Application secret (random per run).
    pub app_secret: String,
    /// Organisation ID (`orgId`).
    pub org_id: String,
    /// The one registered device's `assetId`.
    pub asset_id: String,
    /// Its `productKey`.
    pub product_key: String,
    /// Its `deviceKey`.
    pub device_key: String,
    /// The product's maximum `validDay` (larger requests fail with 99400).
    pub max_valid_days: u32,
    /// Access-token lifetime in seconds (`expire`, 7200 in the docs).
    pub token_lifetime_s: u32,
    /// Every `deviceKey` of `product_key` is a registered device with its own current
    /// certificate (false: only `device_key`). The gateway's fleet tests and load benchmark
    /// name each device by `{device}`, as a real EnOS product with many devices.
    pub fleet: bool,
    /// Issue certificates that live this many seconds instead of `validDay` days (the soak run
    /// renews every minute or two).
    pub leaf_lifetime_s: Option<u32>,
}

impl EnosConfig {
    /// Readable fixed identifiers and a random app secret.
    pub fn generate() -> Self {
        Self {
            app_key: "emu-app-key-0001".into(),
            app_secret: util::random_hex(16),
            org_id: "o15724268424841".into(),
            asset_id: "Xs5IwMbX".into(),
            product_key: "emuPK0001".into(),
            device_key: "sensor-0042".into(),
            max_valid_days: 3650,
            token_lifetime_s: 7200,
            fleet: false,
            leaf_lifetime_s: None,
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    expires_ms: i64,
    /// Set by the `enos-token-expired` fault: the token is dead from then on.
    forced_expired: bool,
}

impl Token {
    fn expired(&self) -> bool {
        self.forced_expired || util::now_ms() >= self.expires_ms
    }
}

/// Mutable EnOS state: tokens, used `encryption` values, the device's current certificate.
#[derive(Default)]
pub struct EnosState {
    tokens: HashMap<String, Token>,
    current_token: Option<String>,
    used_encryptions: HashSet<String>,
    current: Option<CurrentCert>,
    /// Every certificate issued to the device, oldest first (`action=list`, §1.7).
    history: Vec<Listed>,
    /// With `EnosConfig::fleet`: the current certificate of every other device, by deviceKey.
    fleet: HashMap<String, CurrentCert>,
}

/// One `action=list` entry: a renewal supersedes (revokes) every earlier certificate (§1.5).
struct Listed {
    serial: u64,
    pem: String,
    not_after: SystemTime,
    revoked: bool,
}

struct CurrentCert {
    serial: u64,
    not_after: SystemTime,
    csr: ParsedCsr,
}

impl EnosState {
    /// Serial of the certificate currently bound to the device.
    pub fn current_serial(&self) -> Option<u64> {
        self.current.as_ref().map(|c| c.serial)
    }
}

/// The token-service body `{"status","msg","business","data"}`.
fn token_body(status: i64, msg: &str, data: Value) -> Response {
    Response::json(
        200,
        &json!({"status": status, "msg": msg, "business": "apim-token-service", "data": data}),
    )
}

/// The connect-service envelope `{"code","msg","requestId","data"}` (§1.1).
pub(crate) fn envelope(code: i64, msg: &str, data: Value) -> Response {
    Response::json(200, &json!({"code": code, "msg": msg, "requestId": util::uuid_like(), "data": data}))
}

fn gateway_401(why: &str) -> Response {
    Response::text(401, &format!("Unauthorized: {why}"))
}

/// `paramsData` of §1.2 step B: query parameters sorted byte-wise by key (then value), each as
/// key then decoded value without separators, followed by the raw body bytes.
pub fn params_data(query: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let mut q: Vec<&(String, String)> = query.iter().collect();
    q.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.as_bytes().cmp(b.1.as_bytes())));
    let mut out = Vec::new();
    for (k, v) in q {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(body);
    out
}

/// `apim-signature` = lowercase hex SHA-256(accessToken + paramsData + timestamp + appSecret).
pub fn api_signature(token: &str, params_data: &[u8], timestamp: &str, app_secret: &str) -> String {
    util::sha256_hex(&[token.as_bytes(), params_data, timestamp.as_bytes(), app_secret.as_bytes()])
}

/// token/get `encryption` = lowercase hex SHA-256(appKey + timestamp + appSecret).
pub fn token_encryption(app_key: &str, timestamp_ms: i64, app_secret: &str) -> String {
    util::sha256_hex(&[app_key.as_bytes(), timestamp_ms.to_string().as_bytes(), app_secret.as_bytes()])
}

impl Shared {
    /// `POST /apim-token-service/v2.0/token/get` and `…/token/refresh` (§1.2 steps A, A').
    pub(crate) fn enos_token(&self, req: &Request, refresh: bool) -> Response {
        if let Some(f) = self.take_fault(Endpoint::EnosToken, Phase::Early) {
            if f == Fault::RejectAuth {
                return tag(token_body(1003, "encryption is invalid", Value::Null), f);
            }
            if f == Fault::EnosDuplicatedEncryption {
                return tag(token_body(1001, "duplicated encryption", Value::Null), f);
            }
        }
        let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
            return token_body(1004, "invalid parameter: body is not JSON", Value::Null);
        };
        match self.check_token_request(&body, refresh) {
            Ok(()) => self.grant_token(&body, refresh),
            Err(r) => r,
        }
    }

    fn check_token_request(&self, body: &Value, refresh: bool) -> Result<(), Response> {
        let cfg = &self.enos_cfg;
        let (Some(app_key), Some(encryption)) =
            (util::json_str(body, "appKey"), util::json_str(body, "encryption"))
        else {
            return Err(token_body(1202, "empty parameter: appKey and encryption are required", Value::Null));
        };
        let Some(ts) = util::json_int_lenient(body, "timestamp") else {
            return Err(token_body(1004, "invalid parameter: timestamp", Value::Null));
        };
        if app_key != cfg.app_key {
            return Err(token_body(1002, "appKey is invalid", Value::Null));
        }
        if (util::now_ms() - ts).abs() > SKEW_MS {
            return Err(token_body(1004, "invalid parameter: timestamp out of range", Value::Null));
        }
        if encryption != token_encryption(app_key, ts, &cfg.app_secret) {
            return Err(token_body(1003, "encryption is invalid", Value::Null));
        }
        let mut st = lock(&self.enos);
        if st.used_encryptions.contains(encryption) {
            return Err(token_body(1001, "duplicated encryption", Value::Null));
        }
        if refresh {
            let known = util::json_str(body, "accessToken").is_some_and(|t| st.tokens.contains_key(t));
            if !known {
                return Err(token_body(1204, "refresh token failed: accessToken unknown", Value::Null));
            }
        }
        st.used_encryptions.insert(encryption.to_string());
        Ok(())
    }

    /// Issues a token; `get` returns the still-valid current token (§1.2), refresh a new one.
    fn grant_token(&self, body: &Value, refresh: bool) -> Response {
        let mut st = lock(&self.enos);
        if refresh {
            if let Some(old) = util::json_str(body, "accessToken") {
                st.tokens.remove(old);
            }
        }
        let now = util::now_ms();
        let reuse =
            st.current_token.clone().filter(|t| !refresh && st.tokens.get(t).is_some_and(|x| !x.expired()));
        let token = reuse.unwrap_or_else(|| {
            let t = format!("APP_{}", util::random_hex(20));
            let expires_ms = now + i64::from(self.enos_cfg.token_lifetime_s) * 1000;
            st.tokens.insert(t.clone(), Token { expires_ms, forced_expired: false });
            t
        });
        st.current_token = Some(token.clone());
        let left = st.tokens.get(&token).map(|t| (t.expires_ms - now) / 1000).unwrap_or_default();
        token_body(0, "SUCCESS", json!({"accessToken": token, "expire": left}))
    }

    /// Gateway check of §1.2 step B. `Err` carries the 401 (or 1203) answer.
    fn enos_authenticate(&self, req: &Request) -> Result<String, Response> {
        let h = |n: &str| req.header(n).filter(|v| !v.is_empty());
        let (Some(token), Some(ts), Some(sig)) =
            (h("apim-accesstoken"), h("apim-timestamp"), h("apim-signature"))
        else {
            return Err(gateway_401("apim-accesstoken, apim-timestamp and apim-signature are required"));
        };
        let Ok(ts_ms) = ts.parse::<i64>() else {
            return Err(gateway_401("apim-timestamp is not a number of milliseconds"));
        };
        if (util::now_ms() - ts_ms).abs() > SKEW_MS {
            return Err(gateway_401("apim-timestamp out of range"));
        }
        let expired = match lock(&self.enos).tokens.get(token) {
            None => return Err(gateway_401("unknown access token")),
            Some(t) => t.expired(),
        };
        let expect = api_signature(token, &params_data(&req.query, &req.body), ts, &self.enos_cfg.app_secret);
        if sig != expect {
            return Err(gateway_401("apim-signature mismatch"));
        }
        if expired {
            return Err(envelope(1203, "token is expired", Value::Null));
        }
        Ok(token.to_string())
    }

    /// `POST /connect-service/v2.0/certificates?action=…` (§1.4, §1.5).
    pub(crate) fn enos_certificates(&self, req: &Request) -> Response {
        if let Some(r) = self.enos_early_fault() {
            return r;
        }
        let token = match self.enos_authenticate(req) {
            Ok(t) => t,
            Err(r) => return r,
        };
        if let Some(f) = self.take_fault(Endpoint::EnosCert, Phase::Authenticated) {
            return self.enos_vendor_fault(f, &token);
        }
        let result = self.check_device(req).and_then(|device| {
            if req.query_param("action") == Some("list") {
                return Ok(self.enos_list());
            }
            let body: Value = serde_json::from_slice(&req.body).map_err(|_| {
                envelope(99400, "Invalid Argument body:request body is not JSON", Value::Null)
            })?;
            match req.query_param("action") {
                Some("apply") => self.enos_apply(&body, device),
                Some("renew") => self.enos_renew(&body, device),
                Some(a) => Err(envelope(
                    99400,
                    &format!("Invalid Argument action:{a} is not supported"),
                    Value::Null,
                )),
                None => Err(envelope(99400, "Invalid Argument action:action is missing", Value::Null)),
            }
        });
        result.unwrap_or_else(|r| r)
    }

    fn enos_early_fault(&self) -> Option<Response> {
        let f = self.take_fault(Endpoint::EnosCert, Phase::Early)?;
        let r = match f {
            Fault::RejectAuth | Fault::Gateway401 => gateway_401("invalid credentials (emulated)"),
            Fault::Gateway429 => {
                Response::text(429, "Too Many Requests: rate limit (emulated)").header("Retry-After", "1")
            }
            _ => return self.generic_fault(f, true),
        };
        Some(tag(r, f))
    }

    fn enos_vendor_fault(&self, f: Fault, token: &str) -> Response {
        let r = match f {
            Fault::EnosTokenExpired => {
                if let Some(t) = lock(&self.enos).tokens.get_mut(token) {
                    t.forced_expired = true;
                }
                envelope(1203, "token is expired", Value::Null)
            }
            Fault::Enos99400 => envelope(
                99400,
                "Call ca error!: Certificate service err info:, code: 400, message: emulated fault, detail message: enos-99400",
                Value::Null,
            ),
            Fault::Enos11404 => envelope(11404, "Device cannot be found", Value::Null),
            Fault::Enos11833 => envelope(11833, "Certificate is already bound to another device.", Value::Null),
            // A hostile or broken CA: its words try to clear the screen, forge a log line, ring the
            // bell, retitle the terminal and reverse the text (issue 14 item 11).
            Fault::EnosControlChars => Response::json(
                200,
                &json!({
                    "code": 99400,
                    "msg": "\u{1b}[2J\u{1b}[31mdevice wiped\r\nerror: forged line\u{7}\u{9b}0m \u{202e}gpj.exe",
                    "requestId": "r1\u{1b}]0;owned\u{7}\nforged: requestId",
                    "data": null
                }),
            ),
            _ => envelope(99500, "Internal error of certificate service.", Value::Null),
        };
        tag(r, f)
    }

    /// §1.3: `orgId` plus `assetId` or `productKey` + `deviceKey` naming the one device (or, with
    /// `fleet`, any deviceKey of the product: `Some(deviceKey)`).
    fn check_device(&self, req: &Request) -> Result<Option<String>, Response> {
        let cfg = &self.enos_cfg;
        let Some(org) = req.query_param("orgId") else {
            return Err(envelope(99400, "Invalid Argument orgId:orgId is missing", Value::Null));
        };
        let by_asset = req.query_param("assetId").map(|a| a == cfg.asset_id);
        let keys = match (req.query_param("productKey"), req.query_param("deviceKey")) {
            (Some(p), Some(d)) => Some((p, d)),
            _ => None,
        };
        if let (true, None, Some((p, d))) = (cfg.fleet, by_asset, keys) {
            if org == cfg.org_id && p == cfg.product_key && d != cfg.device_key && !d.is_empty() {
                return Ok(Some(d.to_string()));
            }
        }
        let by_keys = keys.map(|(p, d)| p == cfg.product_key && d == cfg.device_key);
        match by_asset.or(by_keys) {
            None => Err(envelope(99400, "invalid argument: The device identifier is invalid", Value::Null)),
            Some(found) if found && org == cfg.org_id => Ok(None),
            Some(_) => Err(envelope(11404, "Device cannot be found", Value::Null)),
        }
    }

    /// `action=apply`: body `{csr, validDay?, issueAuthority?}`.
    fn enos_apply(&self, body: &Value, device: Option<String>) -> Result<Response, Response> {
        let csr_pem = util::json_str(body, "csr").filter(|s| !s.trim().is_empty());
        let Some(csr_pem) = csr_pem else {
            return Err(envelope(99400, "Invalid Argument csr:csr is missing", Value::Null));
        };
        let csr =
            pki::parse_csr(csr_pem.as_bytes()).map_err(|e| invalid_cert_request("CSR is invalid", &e))?;
        self.enos_issue(body, csr, device)
    }

    /// `action=renew`: body `{certSn:int, csr?, validDay?, issueAuthority?}`; certSn must be the
    /// device's current, unexpired certificate; without `csr` the old request is re-signed.
    fn enos_renew(&self, body: &Value, device: Option<String>) -> Result<Response, Response> {
        let cert_sn = match body.get("certSn") {
            None | Some(Value::Null) => {
                return Err(envelope(99400, "Invalid Argument certSn:certSn is missing", Value::Null))
            }
            Some(v) => v.as_i64().filter(|n| *n >= 0).ok_or_else(|| {
                envelope(99400, "Invalid Argument certSn:certSn must be a non-negative integer", Value::Null)
            })?,
        };
        let old_csr = {
            let st = lock(&self.enos);
            let current = match &device {
                Some(d) => st.fleet.get(d),
                None => st.current.as_ref(),
            };
            match current {
                Some(c) if c.serial as i64 == cert_sn && c.not_after > SystemTime::now() => c.csr.clone(),
                Some(c) if c.serial as i64 == cert_sn => {
                    return Err(renew_failed(
                        "the original certificate has expired, apply for a new one instead",
                    ))
                }
                _ => {
                    return Err(renew_failed(&format!(
                        "certificate {cert_sn} is not the valid certificate of this device"
                    )))
                }
            }
        };
        let csr = match util::json_str(body, "csr").filter(|s| !s.trim().is_empty()) {
            Some(pem) => {
                pki::parse_csr(pem.as_bytes()).map_err(|e| invalid_cert_request("CSR is invalid", &e))?
            }
            None => old_csr,
        };
        self.enos_issue(body, csr, device)
    }

    /// Shared tail of apply/renew: issueAuthority and validDay rules, then signing.
    fn enos_issue(&self, body: &Value, csr: ParsedCsr, device: Option<String>) -> Result<Response, Response> {
        let authority = issue_authority(body)?;
        let matches = if authority == "RSA" { csr.is_enos_rsa() } else { csr.is_enos_ecc() };
        if !matches {
            let detail = format!("issueAuthority {authority} needs {}", needed_key(&authority));
            return Err(invalid_cert_request("the CSR key does not match issueAuthority", &detail));
        }
        let days = self.valid_days(body)?;
        let fault = self.take_fault(Endpoint::EnosCert, Phase::Answer);
        let leaf_fault = match fault {
            Some(Fault::WrongKeyCert) => LeafFault::WrongKey,
            Some(Fault::ExpiredCert) => LeafFault::Expired,
            _ => LeafFault::None,
        };
        let profile = LeafProfile { lifetime_s: self.enos_cfg.leaf_lifetime_s, ..LeafProfile::device(days) };
        let issued = pki::issue_leaf(&csr, &self.pki.enos_root, &profile, leaf_fault).map_err(|e| {
            envelope(99500, &format!("Internal error of certificate service. {e}"), Value::Null)
        })?;
        // A lost answer is an answer the CA gave: the certificate is issued and bound.
        if fault.is_none() || fault == Some(Fault::EnosAnswerLost) {
            self.bind(&issued, csr, device);
        }
        Ok(answer_fault(fault, self.apply_result(&issued, &authority)))
    }

    fn valid_days(&self, body: &Value) -> Result<u32, Response> {
        let days = match body.get("validDay") {
            None | Some(Value::Null) => 730,
            Some(v) => v.as_i64().filter(|d| *d > 0).ok_or_else(|| {
                envelope(99400, "Invalid Argument validDay:validDay must be a positive integer", Value::Null)
            })?,
        };
        if days > i64::from(self.enos_cfg.max_valid_days) {
            return Err(envelope(
                99400,
                "The specified validity period exceeds the maximum certificate validity period of the product to which this device belongs.",
                Value::Null,
            ));
        }
        // Clipping to the root's remaining lifetime happens in issue_leaf (§1.4 validDay rule).
        Ok(days as u32)
    }

    /// Makes `issued` the device's current certificate; the previous certSn becomes invalid.
    fn bind(&self, issued: &IssuedCert, csr: ParsedCsr, device: Option<String>) {
        let mut enos = lock(&self.enos);
        if let Some(device) = device {
            let current = CurrentCert { serial: issued.serial, not_after: issued.not_after, csr };
            enos.fleet.insert(device, current);
            drop(enos);
            self.record_issued(&issued.der);
            return;
        }
        enos.current = Some(CurrentCert { serial: issued.serial, not_after: issued.not_after, csr });
        for earlier in &mut enos.history {
            earlier.revoked = true;
        }
        enos.history.push(Listed {
            serial: issued.serial,
            pem: issued.pem.clone(),
            not_after: issued.not_after,
            revoked: false,
        });
        drop(enos);
        self.record_issued(&issued.der);
    }

    /// `GET …?action=list` (§1.7): the device's certificates with certStatus 0 valid, 1 revoked,
    /// 2 expired. `cert` is the PEM (the doc's sample shows a serial there; see protocols.md).
    fn enos_list(&self) -> Response {
        let now = SystemTime::now();
        let entries: Vec<Value> = lock(&self.enos)
            .history
            .iter()
            .map(|c| {
                let status = if c.revoked { 1 } else if c.not_after <= now { 2 } else { 0 };
                json!({"certSN": c.serial.to_string(), "cert": c.pem, "certStatus": status, "isEnosCert": true})
            })
            .collect();
        envelope(0, "OK", Value::Array(entries))
    }

    /// `data` = DeviceCertApplyResultInfo, as in the seed's response sample.
    fn apply_result(&self, issued: &IssuedCert, authority: &str) -> Response {
        envelope(
            0,
            "OK",
            json!({
                "certChainURL": format!("{}/enos/CA/cacert/{authority}", self.url()),
                "caCert": self.pki.enos_root.pem(),
                "cert": issued.pem,
                "certSN": issued.serial.to_string(),
                "issueAuthority": authority,
            }),
        )
    }
}

/// `issueAuthority`: "RSA" (default) or "ECC", case-insensitive; returned upper-case.
fn issue_authority(body: &Value) -> Result<String, Response> {
    match body.get("issueAuthority") {
        None | Some(Value::Null) => Ok("RSA".into()),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("RSA") || s.eq_ignore_ascii_case("ECC") => {
            Ok(s.to_ascii_uppercase())
        }
        Some(v) => Err(envelope(
            99400,
            &format!("Invalid Argument issueAuthority:{v} is not RSA or ECC"),
            Value::Null,
        )),
    }
}

fn needed_key(authority: &str) -> &'static str {
    if authority == "RSA" {
        "an RSA-2048 key signed with SHA256withRSA"
    } else {
        "a prime256v1 key signed with SHA256withECDSA"
    }
}

fn invalid_cert_request(message: &str, detail: &str) -> Response {
    envelope(
        99400,
        &format!("Invalid cert request!message: {message}, detail message: {detail}"),
        Value::Null,
    )
}

fn renew_failed(message: &str) -> Response {
    envelope(
        99400,
        &format!("Renew cert is failed!message: {message}, detail message: {message}"),
        Value::Null,
    )
}
