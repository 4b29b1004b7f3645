//! ACME server emulator: RFC 8555 as Pebble serves it, plus ARI (RFC 9773 `renewalInfo`, which
//! Debian's Pebble 2.4 lacks) and the suite's faults. protocols.md §6.3, design.md §10.
//!
//! Routes under `/acme/`: `GET directory`, `HEAD|GET new-nonce`, and JWS POSTs to `new-account`,
//! `new-order`, `order/{id}`, `authz/{id}`, `chall/{id}`, `finalize/{id}`, `cert/{id}`;
//! `GET renewal-info/{certID}`. Every POST is checked as a real server would: flattened JWS,
//! ES256 signature verified with the account's JWK (`jwk` for new-account, `kid` after), a nonce
//! this server issued and nobody used (else 400 `badNonce`), `url` equal to the request URL.
//! Authorizations become valid when their challenge is posted (Pebble's
//! `PEBBLE_VA_ALWAYS_VALID`); finalize checks that the CSR names exactly the order's
//! identifiers and issues from the EST emulator's issuing CA (leaf + issuing CA as
//! `application/pem-certificate-chain`). A new order may name the certificate it `replaces`
//! (RFC 9773 §5), which is recorded.
//!
//! Faults: the generic early ones and `reject-auth` (403 `unauthorized`) at new-order; the JSON
//! answer faults on the new-order answer; `pending-forever` keeps a finalized order
//! `processing`; `wrong-key-cert` and `expired-cert` shape the issued certificate.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use x509_parser::prelude::*;

use crate::emulator::{answer_fault, lock, tag, Shared};
use crate::fault::{Endpoint, Fault, Phase};
use crate::pki::{self, LeafFault, LeafProfile, San};
use crate::server::{Request, Response};
use crate::util;

/// ACME server settings.
#[derive(Clone, Debug)]
pub struct AcmeConfig {
    /// Lifetime of issued certificates in days; default 30.
    pub valid_days: u32,
    /// Offer `renewalInfo` in the directory (RFC 9773); default true.
    pub renewal_info: bool,
    /// The suggested renewal window, in seconds from now (start, end); `None`: the last third
    /// of the certificate's life, as RFC 9773 §4.2 suggests for a CA without other wishes.
    pub ari_window: Option<(i64, i64)>,
}

impl AcmeConfig {
    pub fn generate() -> Self {
        Self { valid_days: 30, renewal_info: true, ari_window: None }
    }
}

struct Account {
    url: String,
    /// The uncompressed P-256 point of the account's JWK.
    point: Vec<u8>,
}

struct Order {
    account: String,
    identifiers: Vec<Value>,
    authorizations: Vec<String>,
    /// pending / ready / processing / valid / invalid, as last decided.
    status: String,
    certificate: Option<String>,
    pending_forever: bool,
}

struct Authz {
    identifier: Value,
    token: String,
    valid: bool,
}

/// What the ACME emulator has seen and issued.
#[derive(Default)]
pub struct AcmeState {
    nonces: std::collections::HashSet<String>,
    accounts: Vec<Account>,
    orders: HashMap<String, Order>,
    authzs: HashMap<String, Authz>,
    /// Issued chains by certificate id, and (certID of RFC 9773 §4.1 → (notBefore, notAfter)).
    certs: HashMap<String, String>,
    validity: HashMap<String, (SystemTime, SystemTime)>,
    counter: u64,
    /// new-order requests answered 201.
    pub new_orders: usize,
    /// Every `replaces` a new order carried.
    pub replaces: Vec<String>,
    /// renewal-info GETs answered.
    pub renewal_info_requests: usize,
    /// Overrides [`AcmeConfig::ari_window`] once set (`set_acme_window`).
    pub ari_window: Option<(i64, i64)>,
    ari_window_set: bool,
}

impl AcmeState {
    pub(crate) fn set_window(&mut self, window: Option<(i64, i64)>) {
        self.ari_window = window;
        self.ari_window_set = true;
    }

    fn next_id(&mut self) -> String {
        self.counter += 1;
        format!("{}{}", self.counter, util::random_hex(4))
    }
}

/// A problem document (RFC 8555 §6.7).
fn problem(status: u16, kind: &str, detail: &str) -> Response {
    Response::new(status).header("Content-Type", "application/problem+json").body(
        json!({ "type": format!("urn:ietf:params:acme:error:{kind}"), "detail": detail, "status": status })
            .to_string()
            .into_bytes(),
    )
}

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

fn unb64(text: &str) -> Result<Vec<u8>, Response> {
    URL_SAFE_NO_PAD.decode(text).map_err(|_| problem(400, "malformed", "not base64url"))
}

/// The verified content of a JWS POST.
struct Signed {
    /// The account URL (`kid`), or `None` for a `jwk` JWS (new-account).
    kid: Option<String>,
    /// The JWK's point (new-account only).
    point: Vec<u8>,
    payload: Vec<u8>,
}

impl Shared {
    fn acme_url(&self, path: &str) -> String {
        format!("{}/acme/{path}", self.url())
    }

    fn fresh_nonce(&self) -> String {
        let nonce = util::random_hex(16);
        lock(&self.acme).nonces.insert(nonce.clone());
        nonce
    }

    pub(crate) fn acme(&self, req: &Request) -> Response {
        let response = self.acme_route(req);
        let nonce = self.fresh_nonce();
        response.header("Replay-Nonce", &nonce).header("Cache-Control", "no-store")
    }

    fn acme_route(&self, req: &Request) -> Response {
        let rest = req.path.strip_prefix("/acme/").unwrap_or("");
        let (kind, id) = rest.split_once('/').unwrap_or((rest, ""));
        match (req.method.as_str(), kind) {
            ("GET", "directory") => Response::json(200, &self.acme_directory()),
            ("HEAD" | "GET", "new-nonce") => Response::new(if req.method == "HEAD" { 200 } else { 204 }),
            ("GET", "renewal-info") => self.acme_renewal_info(id),
            ("POST", _) => match self.acme_verify(req) {
                Err(r) => r,
                Ok(signed) => match kind {
                    "new-account" => self.acme_new_account(signed),
                    "new-order" => self.acme_new_order(&signed),
                    "order" => self.acme_order(id, &signed),
                    "authz" => self.acme_authz(id),
                    "chall" => self.acme_challenge(id),
                    "finalize" => self.acme_finalize(id, &signed),
                    "cert" => self.acme_cert(id),
                    _ => problem(404, "malformed", "no such resource"),
                },
            },
            _ => problem(405, "malformed", "method not allowed"),
        }
    }

    fn acme_directory(&self) -> Value {
        let mut directory = json!({
            "newNonce": self.acme_url("new-nonce"), "newAccount": self.acme_url("new-account"),
            "newOrder": self.acme_url("new-order"), "revokeCert": self.acme_url("revoke-cert"),
            "keyChange": self.acme_url("key-change"),
            "meta": { "termsOfService": "https://acme.example/terms", "externalAccountRequired": false }
        });
        if self.acme_cfg.renewal_info {
            directory["renewalInfo"] = self.acme_url("renewal-info").into();
        }
        directory
    }

    /// RFC 8555 §6.2–6.5: flattened JWS, ES256, nonce, url, jwk or kid.
    fn acme_verify(&self, req: &Request) -> Result<Signed, Response> {
        let ct = req.header("Content-Type").unwrap_or_default();
        if ct != "application/jose+json" {
            return Err(problem(415, "malformed", "Content-Type must be application/jose+json"));
        }
        let jws: Value =
            serde_json::from_slice(&req.body).map_err(|_| problem(400, "malformed", "not JSON"))?;
        let field =
            |name: &str| jws.get(name).and_then(Value::as_str).ok_or_else(|| problem(400, "malformed", name));
        let (protected_b64, payload_b64, signature) =
            (field("protected")?, field("payload")?, field("signature")?);
        let protected: Value = serde_json::from_slice(&unb64(protected_b64)?)
            .map_err(|_| problem(400, "malformed", "protected header is not JSON"))?;
        if protected.get("alg").and_then(Value::as_str) != Some("ES256") {
            return Err(problem(400, "badSignatureAlgorithm", "only ES256 here"));
        }
        let nonce = protected.get("nonce").and_then(Value::as_str).unwrap_or_default();
        if !lock(&self.acme).nonces.remove(nonce) {
            return Err(problem(400, "badNonce", "JWS has an invalid anti-replay nonce"));
        }
        if protected.get("url").and_then(Value::as_str) != Some(&format!("{}{}", self.url(), req.path)) {
            return Err(problem(401, "unauthorized", "the url in the JWS header is not the request's"));
        }
        let (kid, point) = match (protected.get("jwk"), protected.get("kid").and_then(Value::as_str)) {
            (Some(jwk), None) if req.path == "/acme/new-account" => (None, jwk_point(jwk)?),
            (None, Some(kid)) => {
                let state = lock(&self.acme);
                let account = state.accounts.iter().find(|a| a.url == kid);
                let point = account
                    .ok_or_else(|| problem(400, "accountDoesNotExist", "no such account"))?
                    .point
                    .clone();
                (Some(kid.to_string()), point)
            }
            _ => return Err(problem(400, "malformed", "jwk for new-account, kid for everything else")),
        };
        let signed = format!("{protected_b64}.{payload_b64}");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
            .verify(signed.as_bytes(), &unb64(signature)?)
            .map_err(|_| problem(403, "unauthorized", "JWS signature does not verify"))?;
        Ok(Signed { kid, point, payload: unb64(payload_b64)? })
    }

    fn acme_new_account(&self, signed: Signed) -> Response {
        let payload: Value = serde_json::from_slice(&signed.payload).unwrap_or(Value::Null);
        if payload.get("termsOfServiceAgreed").and_then(Value::as_bool) != Some(true) {
            return problem(403, "userActionRequired", "agree to https://acme.example/terms");
        }
        let mut state = lock(&self.acme);
        if let Some(account) = state.accounts.iter().find(|a| a.point == signed.point) {
            let url = account.url.clone();
            return Response::json(200, &json!({ "status": "valid" })).header("Location", &url);
        }
        let url = self.acme_url(&format!("account/{}", state.next_id()));
        state.accounts.push(Account { url: url.clone(), point: signed.point });
        Response::json(201, &json!({ "status": "valid", "orders": format!("{url}/orders") }))
            .header("Location", &url)
    }

    fn acme_new_order(&self, signed: &Signed) -> Response {
        if let Some(f) = self.take_fault(Endpoint::AcmeOrder, Phase::Early) {
            let r = match f {
                Fault::RejectAuth => {
                    problem(403, "unauthorized", "account refused by policy (emulated reject-auth)")
                }
                _ => match self.generic_fault(f, true) {
                    Some(r) => return r,
                    None => problem(500, "serverInternal", &format!("fault {f} has no ACME form")),
                },
            };
            return tag(r, f);
        }
        let payload: Value = serde_json::from_slice(&signed.payload).unwrap_or(Value::Null);
        let Some(identifiers) =
            payload.get("identifiers").and_then(Value::as_array).filter(|i| !i.is_empty())
        else {
            return problem(400, "malformed", "an order needs identifiers");
        };
        if let Some(bad) = identifiers.iter().find(|i| !matches!(i["type"].as_str(), Some("dns" | "ip"))) {
            return problem(400, "unsupportedIdentifier", &format!("{bad}"));
        }
        let mut state = lock(&self.acme);
        if let Some(replaces) = payload.get("replaces").and_then(Value::as_str) {
            state.replaces.push(replaces.to_string());
        }
        let mut authorizations = Vec::new();
        for identifier in identifiers {
            let id = state.next_id();
            state.authzs.insert(
                id.clone(),
                Authz { identifier: identifier.clone(), token: b64(&util::random_bytes(24)), valid: false },
            );
            authorizations.push(self.acme_url(&format!("authz/{id}")));
        }
        let id = state.next_id();
        let order = Order {
            account: signed.kid.clone().unwrap_or_default(),
            identifiers: identifiers.clone(),
            authorizations,
            status: "pending".into(),
            certificate: None,
            pending_forever: false,
        };
        state.orders.insert(id.clone(), order);
        state.new_orders += 1;
        let body = self.order_json(&mut state, &id);
        drop(state);
        let fault = self.take_fault(Endpoint::AcmeOrder, Phase::Answer);
        answer_fault(
            fault,
            Response::json(201, &body).header("Location", &self.acme_url(&format!("order/{id}"))),
        )
    }

    /// The order as JSON, its status brought up to date with its authorizations.
    fn order_json(&self, state: &mut AcmeState, id: &str) -> Value {
        let all_valid = {
            let order = &state.orders[id];
            order.authorizations.iter().all(|url| {
                let authz_id = url.rsplit('/').next().unwrap_or_default();
                state.authzs.get(authz_id).is_some_and(|a| a.valid)
            })
        };
        let order = state.orders.get_mut(id).expect("caller checked");
        if order.status == "pending" && all_valid {
            order.status = "ready".into();
        }
        let mut body = json!({
            "status": order.status, "identifiers": order.identifiers, "authorizations": order.authorizations,
            "finalize": self.acme_url(&format!("finalize/{id}")),
            "expires": util::rfc3339_utc(SystemTime::now() + Duration::from_secs(3600))
        });
        if let Some(cert) = &order.certificate {
            body["certificate"] = self.acme_url(&format!("cert/{cert}")).into();
        }
        body
    }

    fn acme_order(&self, id: &str, signed: &Signed) -> Response {
        let mut state = lock(&self.acme);
        match state.orders.get(id) {
            Some(order) if Some(&order.account) == signed.kid.as_ref() => {}
            Some(_) => return problem(403, "unauthorized", "another account's order"),
            None => return problem(404, "malformed", "no such order"),
        }
        let body = self.order_json(&mut state, id);
        let processing = body["status"] == "processing";
        let response = Response::json(200, &body);
        if processing {
            response.header("Retry-After", "1")
        } else {
            response
        }
    }

    fn acme_authz(&self, id: &str) -> Response {
        let state = lock(&self.acme);
        let Some(authz) = state.authzs.get(id) else {
            return problem(404, "malformed", "no such authorization");
        };
        let status = if authz.valid { "valid" } else { "pending" };
        let challenges: Vec<Value> = ["http-01", "dns-01", "tls-alpn-01"]
            .iter()
            .map(|kind| json!({ "type": kind, "url": self.acme_url(&format!("chall/{id}")), "token": authz.token, "status": status }))
            .collect();
        Response::json(
            200,
            &json!({
                "status": status, "identifier": authz.identifier, "challenges": challenges,
                "expires": util::rfc3339_utc(SystemTime::now() + Duration::from_secs(3600))
            }),
        )
    }

    /// Pebble with `PEBBLE_VA_ALWAYS_VALID`: answering the challenge validates it.
    fn acme_challenge(&self, id: &str) -> Response {
        let mut state = lock(&self.acme);
        let Some(authz) = state.authzs.get_mut(id) else {
            return problem(404, "malformed", "no such challenge");
        };
        authz.valid = true;
        let token = authz.token.clone();
        Response::json(200, &json!({ "type": "http-01", "url": self.acme_url(&format!("chall/{id}")), "token": token, "status": "valid" }))
            .header("Link", &format!("<{}>;rel=\"up\"", self.acme_url(&format!("authz/{id}"))))
    }

    fn acme_finalize(&self, id: &str, signed: &Signed) -> Response {
        let mut state = lock(&self.acme);
        let status = match state.orders.get(id) {
            Some(order) if Some(&order.account) == signed.kid.as_ref() => order.status.clone(),
            Some(_) => return problem(403, "unauthorized", "another account's order"),
            None => return problem(404, "malformed", "no such order"),
        };
        let status = if status == "pending" {
            self.order_json(&mut state, id)["status"].as_str().unwrap_or("").to_string()
        } else {
            status
        };
        if status != "ready" {
            return problem(403, "orderNotReady", &format!("order is {status}"));
        }
        let payload: Value = serde_json::from_slice(&signed.payload).unwrap_or(Value::Null);
        let csr = match payload["csr"].as_str().map(unb64) {
            Some(Ok(der)) => der,
            _ => return problem(400, "badCSR", "csr is not base64url DER"),
        };
        let csr = match pki::parse_csr(&csr) {
            Ok(csr) => csr,
            Err(e) => return problem(400, "badCSR", &e),
        };
        let mut asked: Vec<String> = csr
            .sans
            .iter()
            .filter_map(|s| match s {
                San::Dns(name) => Some(format!("dns:{name}")),
                San::Ip(ip) => Some(format!("ip:{ip}")),
                _ => None,
            })
            .collect();
        let order = state.orders.get_mut(id).expect("checked above");
        let mut ordered: Vec<String> = order
            .identifiers
            .iter()
            .map(|i| format!("{}:{}", i["type"].as_str().unwrap_or(""), i["value"].as_str().unwrap_or("")))
            .collect();
        asked.sort();
        ordered.sort();
        if asked != ordered {
            return problem(400, "badCSR", &format!("the CSR names {asked:?}, the order {ordered:?}"));
        }
        if self.take_fault(Endpoint::AcmeFinalize, Phase::Authenticated) == Some(Fault::PendingForever) {
            order.pending_forever = true;
        }
        if order.pending_forever {
            order.status = "processing".into();
            let body = self.order_json(&mut state, id);
            return tag(Response::json(200, &body).header("Retry-After", "1"), Fault::PendingForever);
        }
        let fault = self.take_fault(Endpoint::AcmeFinalize, Phase::Answer);
        let leaf_fault = match fault {
            Some(Fault::WrongKeyCert) => LeafFault::WrongKey,
            Some(Fault::ExpiredCert) => LeafFault::Expired,
            _ => LeafFault::None,
        };
        let issued = match pki::issue_leaf(
            &csr,
            &self.pki.est_issuing,
            &LeafProfile::device(self.acme_cfg.valid_days),
            leaf_fault,
        ) {
            Ok(issued) => issued,
            Err(e) => return problem(400, "badCSR", &format!("cannot issue: {e}")),
        };
        if fault.is_none() {
            self.record_issued(&issued.der);
        }
        let cert_id = state.next_id();
        if let Ok((_, parsed)) = X509Certificate::from_der(&issued.der) {
            let validity = parsed.validity();
            let to_time =
                |t: ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
            state.validity.insert(
                cert_id_of(&parsed, &self.pki.est_issuing),
                (to_time(validity.not_before), to_time(validity.not_after)),
            );
        }
        state.certs.insert(cert_id.clone(), format!("{}{}", issued.pem, self.pki.est_issuing.pem()));
        let order = state.orders.get_mut(id).expect("checked above");
        order.status = "valid".into();
        order.certificate = Some(cert_id);
        let body = self.order_json(&mut state, id);
        let response = Response::json(200, &body);
        match fault {
            Some(f) => tag(response, f),
            None => response,
        }
    }

    fn acme_cert(&self, id: &str) -> Response {
        match lock(&self.acme).certs.get(id) {
            Some(chain) => Response::new(200)
                .header("Content-Type", "application/pem-certificate-chain")
                .body(chain.clone().into_bytes()),
            None => problem(404, "malformed", "no such certificate"),
        }
    }

    /// RFC 9773 §4.2: the suggested window of the certificate `cert_id` names.
    fn acme_renewal_info(&self, cert_id: &str) -> Response {
        let mut state = lock(&self.acme);
        let Some(&(not_before, not_after)) = state.validity.get(cert_id) else {
            return problem(404, "malformed", "no certificate with this certID");
        };
        state.renewal_info_requests += 1;
        let now = SystemTime::now();
        let at = |offset: i64| {
            if offset >= 0 {
                now + Duration::from_secs(offset as u64)
            } else {
                now - Duration::from_secs(offset.unsigned_abs())
            }
        };
        let window = if state.ari_window_set { state.ari_window } else { self.acme_cfg.ari_window };
        let (start, end) = match window {
            Some((start, end)) => (at(start), at(end)),
            None => {
                let life = not_after.duration_since(not_before).unwrap_or_default();
                (not_before + life * 2 / 3, not_before + life * 5 / 6)
            }
        };
        Response::json(200, &json!({ "suggestedWindow": { "start": util::rfc3339_utc(start), "end": util::rfc3339_utc(end) } }))
            .header("Retry-After", "21600")
    }
}

/// The P-256 point of a JWK (`kty` EC, `crv` P-256).
fn jwk_point(jwk: &Value) -> Result<Vec<u8>, Response> {
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" {
        return Err(problem(400, "badPublicKey", "only P-256 account keys here"));
    }
    let coordinate = |name: &str| unb64(jwk[name].as_str().unwrap_or_default());
    let (x, y) = (coordinate("x")?, coordinate("y")?);
    if x.len() != 32 || y.len() != 32 {
        return Err(problem(400, "badPublicKey", "coordinates must be 32 bytes"));
    }
    Ok([&[4u8][..], &x, &y].concat())
}

/// RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(serial DER integer bytes).
fn cert_id_of(cert: &X509Certificate, issuer: &pki::CertAuthority) -> String {
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0.to_vec()),
            _ => None,
        })
        .unwrap_or_else(|| issuer_key_id(issuer));
    format!("{}.{}", b64(&aki), b64(cert.raw_serial()))
}

fn issuer_key_id(issuer: &pki::CertAuthority) -> Vec<u8> {
    X509Certificate::from_der(issuer.der())
        .ok()
        .and_then(|(_, c)| {
            c.extensions().iter().find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
        })
        .unwrap_or_default()
}
