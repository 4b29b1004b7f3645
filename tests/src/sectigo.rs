//! Sectigo Certificate Manager (SCM) emulator (protocols.md §3, seeds/sectigo-scm-rest-api-nl.txt):
//! - password login: headers `login`, `password`, `customerUri` on every `/api/ssl/v1/…` call (§3.1);
//! - `POST /api/ssl/v1/enroll` → `{"renewId","sslId"}` (§3.3);
//! - `GET /api/ssl/v1/collect/{sslId}/{format}` and `…/collect/{sslId}?format=` (§3.3), asynchronous:
//!   an sslId is collectable after `pending_polls` collect calls; until then collect answers, in
//!   turn, the "not ready" forms §3.3 lists as undocumented (400 -1400, 400 -183, 200 with an empty
//!   body, 400 -109, 400 -103);
//! - `GET /api/ssl/v1/{sslId}` details, `POST /api/ssl/v1/renewById/{sslId}`,
//!   `POST /api/ssl/v1/revoke/{sslId}`, `GET /api/ssl/v1/types` (§3.3).
//!
//! Errors are `{"code": <negative>, "description"}` (§3.2); codes and wordings from the SCM 25.4
//! error table (S17). `pem`/`x509`/`x509R` chains are root → issuing → leaf, the order observed
//! by sectigo-issuer (§3.3, S21), not leaf-first.

use crate::emulator::{answer_fault, lock, tag, Shared};
use crate::fault::{Endpoint, Fault, Phase};
use crate::pki::{self, IssuedCert, LeafFault, LeafProfile, ParsedCsr, San};
use crate::server::{Request, Response};
use crate::util;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;

/// Sectigo identifiers and credentials of the emulated customer.
#[derive(Clone, Debug)]
pub struct SectigoConfig {
    /// `customerUri` header value (SURFnet's is `surfnet`, seed002).
    pub customer_uri: String,
    /// API admin `login`.
    pub login: String,
    /// API admin `password` (random per run).
    pub password: String,
    /// The organisation with "Web API" enabled (`orgId`).
    pub org_id: u64,
    /// The SSL certificate profile id (`certType`, 423 = "GÉANT OV SSL" in seed002).
    pub cert_type: u64,
    /// The profile's terms in days (`term` must be one of them).
    pub terms: Vec<u32>,
}

impl SectigoConfig {
    /// Fixed readable identifiers and a random password.
    pub fn generate() -> Self {
        Self {
            customer_uri: "acme-iot".into(),
            login: "enroll-api".into(),
            password: util::random_hex(16),
            org_id: 12345,
            cert_type: 423,
            terms: vec![365, 730],
        }
    }
}

/// One SSL certificate order (an sslId).
struct SslOrder {
    csr: ParsedCsr,
    term: u32,
    renew_id: String,
    /// Collect calls needed before it is ready (captured at creation; lowering the emulator's
    /// setting later releases it).
    pending_polls: u32,
    /// "Not ready" answers given so far.
    polls: u32,
    /// Decided on the first poll: `Some(None)` normal, `Some(Some(f))` a status fault's fate.
    fate: Option<Option<Fault>>,
    revoked: bool,
    /// The certificate, once genuinely collected (the order is then "Issued" and renewable).
    issued: Option<IssuedCert>,
}

impl SslOrder {
    fn status(&self) -> &'static str {
        if self.revoked {
            return "Revoked";
        }
        match self.fate {
            Some(Some(Fault::ApprovalRejected)) => "Declined",
            Some(Some(Fault::RequestExpired)) => "Expired",
            Some(Some(Fault::SectigoRevoked)) => "Revoked",
            _ if self.issued.is_some() => "Issued",
            // Not collected yet: "Requested" until the first collect attempt, then "Applied".
            _ if self.polls == 0 => "Requested",
            _ => "Applied",
        }
    }
}

/// Mutable Sectigo state: orders by sslId.
pub struct SectigoState {
    orders: HashMap<u64, SslOrder>,
    next_id: u64,
    accepted: usize,
}

impl Default for SectigoState {
    fn default() -> Self {
        // Same magnitude as the seed's sslId 1230789.
        Self { orders: HashMap::new(), next_id: 1_230_789, accepted: 0 }
    }
}

impl SectigoState {
    /// Enroll + renewById calls accepted.
    pub fn accepted(&self) -> usize {
        self.accepted
    }

    /// The DER of every CSR accepted (one per order; identical CSRs appear once each time).
    pub fn csrs(&self) -> Vec<Vec<u8>> {
        self.orders.values().map(|o| o.csr.der.clone()).collect()
    }

    fn add(&mut self, order: SslOrder) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.orders.insert(id, order);
        self.accepted += 1;
        id
    }
}

/// `{"code","description"}` with `status` (§3.2).
pub(crate) fn error(status: u16, code: i64, description: &str) -> Response {
    Response::json(status, &json!({"code": code, "description": description}))
}

fn bad(code: i64, description: &str) -> Response {
    error(400, code, description)
}

fn missing(field: &str) -> Response {
    bad(-7, &format!("Field '{field}' is missing"))
}

fn invalid(field: &str) -> Response {
    bad(-1601, &format!("Field '{field}' has invalid value."))
}

fn unknown_id() -> Response {
    bad(-123, "Invalid SSL certificate id")
}

/// The five "not ready" collect answers of §3.3, in the order they are cycled through.
fn not_ready(i: u32) -> Response {
    match i % 5 {
        0 => bad(-1400, "The request is being processed by Sectigo"),
        1 => bad(-183, "Certificate is not collectable"),
        2 => Response::new(200),
        3 => bad(-109, "Certificate is not available now, please try again later"),
        _ => bad(-103, "Certificate has not been collected yet"),
    }
}

/// A positive integer JSON number.
fn number(v: &Value, key: &str) -> Option<Result<u64, Response>> {
    match v.get(key) {
        None | Some(Value::Null) => None,
        Some(n) => Some(n.as_u64().ok_or_else(|| invalid(key))),
    }
}

impl Shared {
    /// Every `/api/ssl/v1/…` call.
    pub(crate) fn sectigo(&self, req: &Request) -> Response {
        let rest = req.path.trim_start_matches("/api/ssl/v1/");
        let segs: Vec<&str> = rest.split('/').collect();
        let post = req.method == "POST";
        let get = req.method == "GET";
        let creates = post && matches!(segs.as_slice(), ["enroll"] | ["renewById", _]);
        if creates {
            if let Some(r) = self.sectigo_early_fault() {
                return r;
            }
        }
        if !self.sectigo_auth_ok(req) {
            return error(401, -16, "Unknown user");
        }
        let result = match segs.as_slice() {
            ["enroll"] if post => self.sectigo_enroll(req),
            ["renewById", id] if post => self.sectigo_renew(req, id),
            ["revoke", id] if post => self.sectigo_revoke(req, id),
            ["collect", id] if get => self.sectigo_collect(id, req.query_param("format")),
            ["collect", id, format] if get => self.sectigo_collect(id, Some(format)),
            ["types"] if get => Ok(self.sectigo_types()),
            [id] if get && !id.is_empty() => self.sectigo_details(id),
            _ => Err(Response::text(404, "Not Found")),
        };
        result.unwrap_or_else(|r| r)
    }

    fn sectigo_early_fault(&self) -> Option<Response> {
        let f = self.take_fault(Endpoint::SectigoRequest, Phase::Early)?;
        match f {
            Fault::RejectAuth => Some(tag(error(401, -16, "Unknown user"), f)),
            _ => self.generic_fault(f, true),
        }
    }

    /// §3.1: `login`, `password` and `customerUri` must all match.
    fn sectigo_auth_ok(&self, req: &Request) -> bool {
        let cfg = &self.sectigo_cfg;
        req.header("login") == Some(cfg.login.as_str())
            && req.header("password") == Some(cfg.password.as_str())
            && req.header("customerUri") == Some(cfg.customer_uri.as_str())
    }

    /// `POST /api/ssl/v1/enroll` (§3.3).
    fn sectigo_enroll(&self, req: &Request) -> Result<Response, Response> {
        let body: Value = serde_json::from_slice(&req.body).map_err(|_| bad(-1, "Unknown error."))?;
        if !body.is_object() {
            return Err(bad(-1, "Unknown error."));
        }
        for field in ["orgId", "csr", "certType", "term"] {
            if body.get(field).is_none_or(Value::is_null) {
                return Err(missing(field));
            }
        }
        let cfg = &self.sectigo_cfg;
        let org = number(&body, "orgId").transpose()?.unwrap_or_default();
        if org != cfg.org_id {
            return Err(bad(-1021, &format!("This operation cannot be performed for Organization '{org}'.")));
        }
        let csr = csr_field(&body)?;
        // SCM 25.4 table: -39 "The certificate profile id is invalid!".
        let cert_type = number(&body, "certType").transpose().map_err(|_| cert_type_invalid())?;
        if cert_type != Some(cfg.cert_type) {
            return Err(cert_type_invalid());
        }
        let term = number(&body, "term").transpose().map_err(|_| invalid_term())?.unwrap_or_default();
        if !cfg.terms.iter().any(|t| u64::from(*t) == term) {
            return Err(invalid_term());
        }
        check_optional_fields(&body, &csr)?;
        let fault = self.take_fault(Endpoint::SectigoRequest, Phase::Answer);
        let renew_id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(util::random_bytes(15));
        let order = self.new_order(csr, term as u32, renew_id.clone());
        let id = if fault.is_none() { lock(&self.sectigo).add(order) } else { 0 };
        Ok(answer_fault(fault, Response::json(200, &json!({"renewId": renew_id, "sslId": id}))))
    }

    fn new_order(&self, csr: ParsedCsr, term: u32, renew_id: String) -> SslOrder {
        SslOrder {
            csr,
            term,
            renew_id,
            pending_polls: self.pending_polls(),
            polls: 0,
            fate: None,
            revoked: false,
            issued: None,
        }
    }

    /// `POST /api/ssl/v1/renewById/{sslId}`, body optional `{"csr"}` (§3.3): a new sslId with
    /// the old order's parameters; without a CSR the old request is re-certified.
    fn sectigo_renew(&self, req: &Request, id: &str) -> Result<Response, Response> {
        let body: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(&req.body).map_err(|_| bad(-1, "Unknown error."))?
        };
        let new_csr = match body.get("csr") {
            None | Some(Value::Null) => None,
            Some(_) => Some(csr_field(&body)?),
        };
        let id = parse_id(id)?;
        let (csr, term) = {
            let st = lock(&self.sectigo);
            let old = st.orders.get(&id).ok_or_else(unknown_id)?;
            if old.issued.is_none() || old.revoked {
                return Err(bad(-130, "SSL state is not ISSUED"));
            }
            (new_csr.unwrap_or_else(|| old.csr.clone()), old.term)
        };
        let fault = self.take_fault(Endpoint::SectigoRequest, Phase::Answer);
        let renew_id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(util::random_bytes(15));
        let order = self.new_order(csr, term, renew_id);
        let new_id = if fault.is_none() { lock(&self.sectigo).add(order) } else { 0 };
        Ok(answer_fault(fault, Response::json(200, &json!({"sslId": new_id}))))
    }

    /// `POST /api/ssl/v1/revoke/{sslId}` `{"reasonCode","reason"}` → 204 (§3.3).
    fn sectigo_revoke(&self, req: &Request, id: &str) -> Result<Response, Response> {
        let id = parse_id(id)?;
        let body: Value = serde_json::from_slice(&req.body).map_err(|_| missing("reason"))?;
        let reason = util::json_str(&body, "reason").ok_or_else(|| missing("reason"))?;
        if reason.is_empty() || reason.len() > 512 {
            return Err(invalid("reason"));
        }
        if let Some(code) = body.get("reasonCode").filter(|v| !v.is_null()) {
            if !matches!(code.as_u64(), Some(0 | 1 | 3 | 4 | 5)) {
                return Err(invalid("reasonCode"));
            }
        }
        let mut st = lock(&self.sectigo);
        let order = st.orders.get_mut(&id).ok_or_else(unknown_id)?;
        if order.revoked {
            return Err(bad(-159, "Your certificate already revoked"));
        }
        if order.issued.is_none() {
            return Err(bad(-102, "Only issued certificates could be revoked."));
        }
        order.revoked = true;
        Ok(Response::new(204))
    }

    /// Decides an order's fate on its first poll (sticky status faults, fault.rs).
    fn decide_fate(&self, order: &mut SslOrder) {
        if order.fate.is_none() {
            order.fate = Some(self.take_fault(Endpoint::SectigoCollect, Phase::Authenticated));
        }
    }

    /// `GET /api/ssl/v1/{sslId}` (§3.3).
    fn sectigo_details(&self, id: &str) -> Result<Response, Response> {
        let id = parse_id(id)?;
        let mut st = lock(&self.sectigo);
        let order = st.orders.get_mut(&id).ok_or_else(unknown_id)?;
        self.decide_fate(order);
        let serial = order.issued.as_ref().map(|c| format!("{:x}", c.serial));
        let expires = order.issued.as_ref().map(|c| util::rfc3339_utc(c.not_after)[..10].to_string());
        let cn = subject_cn(&order.csr);
        Ok(Response::json(
            200,
            &json!({
                "sslId": id,
                "commonName": cn,
                "status": order.status(),
                "certType": {"id": self.sectigo_cfg.cert_type, "name": "Emulated OV SSL"},
                "term": order.term,
                "serialNumber": serial,
                "expires": expires,
                "requestedVia": "Web API",
                "renewId": order.renew_id,
            }),
        ))
    }

    /// `GET /api/ssl/v1/collect/{sslId}[/{format}]` (§3.3).
    fn sectigo_collect(&self, id: &str, format: Option<&str>) -> Result<Response, Response> {
        let id = parse_id(id)?;
        let mut st = lock(&self.sectigo);
        let order = st.orders.get_mut(&id).ok_or_else(unknown_id)?;
        let format = format.unwrap_or("base64");
        if !matches!(format, "x509" | "pem" | "x509R" | "x509CO" | "pemco" | "x509IOR") {
            return Err(bad(-126, "Invalid format"));
        }
        self.decide_fate(order);
        let fate = order.fate.flatten();
        if order.revoked || fate == Some(Fault::SectigoRevoked) {
            let r = bad(-110, "Certificate has been revoked and can't be downloaded");
            return Err(match fate {
                Some(f) => tag(r, f),
                None => r,
            });
        }
        match fate {
            Some(f @ (Fault::ApprovalRejected | Fault::RequestExpired)) => {
                return Err(tag(bad(-183, "Certificate is not collectable"), f))
            }
            Some(f @ Fault::PendingForever) => {
                order.polls += 1;
                return Err(tag(not_ready(order.polls - 1), f));
            }
            _ => {}
        }
        // Read at poll time so a test can release requests made while it was high (as Securosys).
        order.pending_polls = order.pending_polls.min(self.pending_polls());
        if order.issued.is_none() && order.polls < order.pending_polls {
            order.polls += 1;
            return Err(not_ready(order.polls - 1));
        }
        let fault = self.take_fault(Endpoint::SectigoCollect, Phase::Answer);
        let leaf_fault = match fault {
            Some(Fault::WrongKeyCert) => LeafFault::WrongKey,
            Some(Fault::ExpiredCert) => LeafFault::Expired,
            _ => LeafFault::None,
        };
        let leaf_pem = match (&order.issued, leaf_fault) {
            (Some(c), LeafFault::None) => c.pem.clone(),
            _ => {
                let issued = pki::issue_leaf(
                    &order.csr,
                    &self.pki.sectigo_issuing,
                    &LeafProfile::device(order.term),
                    leaf_fault,
                )
                .map_err(|e| bad(-195, &format!("CA is not available now. Please try again later. ({e})")))?;
                let pem = issued.pem.clone();
                if leaf_fault == LeafFault::None {
                    self.record_issued(&issued.der);
                    order.issued = Some(issued);
                }
                pem
            }
        };
        let (root, issuing) = (self.pki.sectigo_root.pem(), self.pki.sectigo_issuing.pem());
        let body = match format {
            "x509CO" | "pemco" => leaf_pem,
            "x509IOR" => format!("{issuing}{root}"),
            _ => format!("{root}{issuing}{leaf_pem}"),
        };
        let r = Response::new(200)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Disposition", "attachment; filename=cert.pem")
            .body(body.into_bytes());
        Ok(match fault {
            Some(f) => tag(r, f),
            None => r,
        })
    }

    /// `GET /api/ssl/v1/types` (§3.3): the one profile of this customer.
    fn sectigo_types(&self) -> Response {
        let cfg = &self.sectigo_cfg;
        Response::json(
            200,
            &json!([{
                "id": cfg.cert_type, "name": "Emulated OV SSL", "description": "enroll-tests emulator profile",
                "terms": cfg.terms, "keyTypes": {"RSA": ["2048", "3072", "4096"], "EC": ["secp256r1", "secp384r1"]},
                "useSecondaryOrgName": false,
            }]),
        )
    }
}

fn cert_type_invalid() -> Response {
    bad(-39, "The certificate profile id is invalid!")
}

fn invalid_term() -> Response {
    bad(-36, "Invalid term")
}

fn parse_id(id: &str) -> Result<u64, Response> {
    id.parse().map_err(|_| unknown_id())
}

/// `csr`: PEM; undecodable → -10 "Error while decoding CSR.", bad signature → -138 "Invalid CSR."
/// (SCM 25.4 error table).
fn csr_field(body: &Value) -> Result<ParsedCsr, Response> {
    let pem = util::json_str(body, "csr").filter(|s| !s.trim().is_empty()).ok_or_else(|| missing("csr"))?;
    pki::parse_csr(pem.as_bytes()).map_err(|e| {
        if e.starts_with("CSR signature") {
            bad(-138, "Invalid CSR.")
        } else {
            bad(-10, "Error while decoding CSR.")
        }
    })
}

/// `subjAltNames` (comma-separated DNS names, a subset of the CSR's), `externalRequester`,
/// `comments`, `customFields` (§3.3 limits).
fn check_optional_fields(body: &Value, csr: &ParsedCsr) -> Result<(), Response> {
    match body.get("subjAltNames") {
        None | Some(Value::Null) => {}
        Some(Value::String(list)) => {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !csr.sans.contains(&San::Dns(name.to_string())) {
                    return Err(invalid("subjAltNames"));
                }
            }
        }
        Some(_) => return Err(invalid("subjAltNames")),
    }
    for (field, max) in [("externalRequester", 512), ("comments", 1024)] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.len() <= max => {}
            Some(_) => return Err(invalid(field)),
        }
    }
    match body.get("customFields") {
        None | Some(Value::Null) | Some(Value::Array(_)) => Ok(()),
        Some(_) => Err(invalid("customFields")),
    }
}

/// The first CN of a CSR's subject.
pub(crate) fn subject_cn(csr: &ParsedCsr) -> Option<String> {
    use x509_parser::prelude::*;
    X509Name::from_der(&csr.subject_der)
        .ok()
        .and_then(|(_, n)| n.iter_common_name().next().and_then(|a| a.as_str().ok().map(str::to_string)))
}
