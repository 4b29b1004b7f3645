//! The in-process emulator: EnOS, EZCA, Sectigo SCM, Securosys TSB, Redtrust, EST, ACME and SCEP
//! on ONE HTTPS server (their paths do not collide), plus a control API (`/_emulator/…`) and a
//! request log.
//!
//! ```no_run
//! use enroll_tests::{Emulator, Fault, Options};
//! let emu = Emulator::start(Options::default()).unwrap();
//! emu.set_fault(Fault::Http500, Some(1));
//! println!("{} trusts {}", emu.url(), emu.tls_root_pem());
//! ```

use crate::acme::{AcmeConfig, AcmeState};
use crate::enos::{EnosConfig, EnosState};
use crate::est::{EstAuth, EstConfig, EstState};
use crate::ezca::{EzcaConfig, EzcaState};
use crate::fault::{Endpoint, Fault, FaultState, Phase};
use crate::pki::Pki;
use crate::redtrust::{RedtrustConfig, RedtrustState};
use crate::scep::{ScepCipher, ScepConfig, ScepMessage, ScepState};
use crate::sectigo::{SectigoConfig, SectigoState};
use crate::securosys::{SecurosysConfig, SecurosysState};
use crate::server::{self, HttpsServer, Request, Response};
use serde_json::{json, Value};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Header naming the fault that shaped a response (also recorded in the log).
pub const FAULT_HEADER: &str = "X-Emulator-Fault";

/// Start-up options. `Default` gives random secrets, fixed readable identifiers, any free port.
#[derive(Clone, Debug)]
pub struct Options {
    /// TCP port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// How long the `timeout` fault holds a response (default 5 s).
    pub fault_delay: Duration,
    /// Ask clients for a TLS certificate (optional: a client without one still connects;
    /// verified against the vendor CAs, the EST root and issuing CA, and the Factory CA).
    pub request_client_cert: bool,
    /// A fault armed from the start, and for how many calls (`None` = until cleared).
    pub fault: Option<(Fault, Option<u32>)>,
    /// EnOS identifiers and credentials.
    pub enos: EnosConfig,
    /// EZCA identifiers and credentials.
    pub ezca: EzcaConfig,
    /// Sectigo SCM identifiers and credentials.
    pub sectigo: SectigoConfig,
    /// Securosys TSB key name and credentials.
    pub securosys: SecurosysConfig,
    /// Redtrust partner identifiers and HMAC secret.
    pub redtrust: RedtrustConfig,
    /// EST label, Basic credentials, Retry-After and certificate lifetime.
    pub est: EstConfig,
    /// ACME certificate lifetime and ARI (renewalInfo) behaviour.
    pub acme: AcmeConfig,
    /// SCEP challenge, capabilities, pending polls and answer cipher.
    pub scep: ScepConfig,
    /// Polls an asynchronous request stays pending (Sectigo collect calls, Securosys PENDING
    /// GETs) before it completes; default 1. Changeable at run time.
    pub pending_polls: u32,
    /// notBefore of the HTTPS server certificate, in seconds from now (default one day ago).
    pub tls_start_offset_s: i64,
    /// notAfter of the HTTPS server certificate, in seconds from now (default a year ahead;
    /// negative: a certificate that has expired).
    pub tls_end_offset_s: i64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            port: 0,
            fault_delay: Duration::from_secs(5),
            request_client_cert: false,
            fault: None,
            enos: EnosConfig::generate(),
            ezca: EzcaConfig::generate(),
            sectigo: SectigoConfig::generate(),
            securosys: SecurosysConfig::generate(),
            redtrust: RedtrustConfig::generate(),
            est: EstConfig::generate(),
            acme: AcmeConfig::generate(),
            scep: ScepConfig::generate(),
            pending_polls: 1,
            tls_start_offset_s: -86_400,
            tls_end_offset_s: 365 * 86_400,
        }
    }
}

/// One request as seen by the emulator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Decoded query parameters.
    pub query: Vec<(String, String)>,
    /// Selected headers: Content-Type, Authorization, apim-accesstoken, apim-timestamp,
    /// apim-signature, login, customerUri, x-partner-name, x-request-timestamp; secrets whose
    /// presence matters (password, X-API-KEY, x-hmac-signature, and a Basic Authorization)
    /// are recorded as `<present>`.
    pub headers: Vec<(String, String)>,
    /// Status code answered.
    pub status: u16,
    /// Fault that shaped the answer, if any.
    pub fault: Option<String>,
    /// Whether the client presented a TLS certificate.
    pub client_cert: bool,
    /// CN of the client certificate's subject, when one was presented.
    pub client_cert_subject: Option<String>,
    /// CN of the client certificate's issuer, when one was presented.
    pub client_cert_issuer: Option<String>,
}

const LOGGED_HEADERS: &[&str] = &[
    "content-type",
    "authorization",
    "apim-accesstoken",
    "apim-timestamp",
    "apim-signature",
    "login",
    "customeruri",
    "x-partner-name",
    "x-request-timestamp",
];

/// Headers logged only as `<present>`: tests see that they were sent, never their value.
const REDACTED_HEADERS: &[&str] = &["password", "x-api-key", "x-hmac-signature"];

/// What the log shows instead of a redacted header's value.
pub const PRESENT: &str = "<present>";

impl LoggedRequest {
    fn new(req: &Request, resp: &Response) -> Self {
        let headers = req
            .headers
            .iter()
            .filter_map(|(k, v)| {
                let lower = k.to_ascii_lowercase();
                let basic = v.get(..6).is_some_and(|s| s.eq_ignore_ascii_case("basic "));
                if lower == "authorization" && basic {
                    Some((k.clone(), PRESENT.to_string()))
                } else if LOGGED_HEADERS.contains(&lower.as_str()) {
                    Some((k.clone(), v.clone()))
                } else if REDACTED_HEADERS.contains(&lower.as_str()) {
                    Some((k.clone(), PRESENT.to_string()))
                } else {
                    None
                }
            })
            .collect();
        let fault = resp.headers.iter().find(|(k, _)| k == FAULT_HEADER).map(|(_, v)| v.clone());
        let names = req.peer_cert.as_deref().and_then(|der| {
            let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
            Some((crate::est::common_name(c.subject()), crate::est::common_name(c.issuer())))
        });
        Self {
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.query.clone(),
            headers,
            status: resp.status,
            fault,
            client_cert: req.peer_cert.is_some(),
            client_cert_subject: names.as_ref().map(|n| n.0.clone()),
            client_cert_issuer: names.map(|n| n.1),
        }
    }

    /// One JSON object (a line of `GET /_emulator/log`).
    pub fn to_json(&self) -> Value {
        let pairs = |v: &[(String, String)]| v.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>();
        json!({
            "method": self.method, "path": self.path, "query": pairs(&self.query),
            "headers": pairs(&self.headers), "status": self.status, "fault": self.fault,
            "client_cert": self.client_cert, "client_cert_subject": self.client_cert_subject,
            "client_cert_issuer": self.client_cert_issuer,
        })
    }
}

/// State shared by all connection threads.
pub(crate) struct Shared {
    pub(crate) pki: Pki,
    pub(crate) url: OnceLock<String>,
    pub(crate) enos_cfg: EnosConfig,
    pub(crate) ezca_cfg: EzcaConfig,
    pub(crate) enos: Mutex<EnosState>,
    pub(crate) ezca: Mutex<EzcaState>,
    pub(crate) sectigo_cfg: SectigoConfig,
    pub(crate) securosys_cfg: SecurosysConfig,
    pub(crate) redtrust_cfg: RedtrustConfig,
    pub(crate) sectigo: Mutex<SectigoState>,
    pub(crate) securosys: Mutex<SecurosysState>,
    pub(crate) redtrust: Mutex<RedtrustState>,
    pub(crate) est_cfg: EstConfig,
    pub(crate) est: Mutex<EstState>,
    pub(crate) acme_cfg: AcmeConfig,
    pub(crate) acme: Mutex<AcmeState>,
    pub(crate) scep_cfg: ScepConfig,
    pub(crate) scep: Mutex<ScepState>,
    pending_polls: Mutex<u32>,
    faults: Mutex<FaultState>,
    fault_delay: Mutex<Duration>,
    log: Mutex<Vec<LoggedRequest>>,
    issued: Mutex<Vec<Vec<u8>>>,
}

/// Locks a mutex even if a handler thread panicked while holding it (tests keep going).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn new(opts: &Options) -> io::Result<Self> {
        let pki = Pki::generate_with_tls_validity(opts.tls_start_offset_s, opts.tls_end_offset_s)
            .map_err(io::Error::other)?;
        let mut faults = FaultState::default();
        if let Some((f, n)) = opts.fault {
            faults.set(f, n);
        }
        let est = EstState::new(&pki.factory_ca).map_err(io::Error::other)?;
        Ok(Self {
            pki,
            url: OnceLock::new(),
            enos_cfg: opts.enos.clone(),
            ezca_cfg: opts.ezca.clone(),
            enos: Mutex::new(EnosState::default()),
            ezca: Mutex::new(EzcaState::default()),
            sectigo_cfg: opts.sectigo.clone(),
            securosys_cfg: opts.securosys.clone(),
            redtrust_cfg: opts.redtrust.clone(),
            sectigo: Mutex::new(SectigoState::default()),
            securosys: Mutex::new(SecurosysState::new()),
            redtrust: Mutex::new(RedtrustState::default()),
            est_cfg: opts.est.clone(),
            est: Mutex::new(est),
            acme_cfg: opts.acme.clone(),
            acme: Mutex::new(AcmeState::default()),
            scep_cfg: opts.scep.clone(),
            scep: Mutex::new(ScepState::new(&opts.scep)),
            pending_polls: Mutex::new(opts.pending_polls),
            faults: Mutex::new(faults),
            fault_delay: Mutex::new(opts.fault_delay),
            log: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
        })
    }

    /// Base URL, e.g. `https://127.0.0.1:4433`.
    pub(crate) fn url(&self) -> &str {
        self.url.get().map(String::as_str).unwrap_or("https://127.0.0.1")
    }

    /// Serves one request and records it.
    pub(crate) fn handle(&self, req: &Request) -> Response {
        let resp = self.route(req);
        lock(&self.log).push(LoggedRequest::new(req, &resp));
        dump_exchange(req, &resp);
        resp
    }

    fn route(&self, req: &Request) -> Response {
        let post = req.method == "POST";
        match (req.method.as_str(), req.path.as_str()) {
            (_, "/apim-token-service/v2.0/token/get") if post => self.enos_token(req, false),
            (_, "/apim-token-service/v2.0/token/refresh") if post => self.enos_token(req, true),
            (_, "/connect-service/v2.0/certificates") if post || req.method == "GET" => {
                self.enos_certificates(req)
            }
            ("GET", p) if p.starts_with("/enos/CA/cacert") => Response::new(200)
                .header("Content-Type", "application/x-pem-file")
                .body(self.pki.enos_root.pem().into_bytes()),
            (_, "/api/CA/RequestSSLCertificateV2") if post => self.ezca_request_v2(req),
            (_, "/api/Certificates/RenewCertificateV3") if post => self.ezca_renew(req, true),
            (_, "/api/Certificates/RenewCertificateV2") if post => self.ezca_renew(req, false),
            (_, p) if post && is_entra_token_path(p) => self.entra_token(req),
            (_, p) if p.starts_with("/api/ssl/v1/") => self.sectigo(req),
            (_, p) if p.starts_with("/v1/") => self.securosys(req),
            (_, p)
                if p.starts_with("/authclient/")
                    || p.starts_with("/authapi/")
                    || p.starts_with("/raapi/") =>
            {
                self.redtrust(req)
            }
            (_, p) if p.starts_with("/.well-known/est/") => self.est(req),
            (_, p) if p.starts_with("/acme/") => self.acme(req),
            (_, p) if p == "/scep" || p.starts_with("/scep/") => self.scep(req),
            (_, "/_emulator/fault") => self.control_fault(req),
            (_, "/_emulator/pending-polls") => self.control_pending_polls(req),
            ("GET", "/_emulator/log") => self.control_log(),
            _ => Response::text(404, "Not Found"),
        }
    }

    /// Fires the armed fault for `ep` in `phase`, if it applies.
    pub(crate) fn take_fault(&self, ep: Endpoint, phase: Phase) -> Option<Fault> {
        lock(&self.faults).take(ep, phase)
    }

    /// The generic early-phase answers (shared by EnOS and EZCA); vendor-specific faults
    /// return `None` here and are handled by the vendor module.
    pub(crate) fn generic_fault(&self, f: Fault, json_body: bool) -> Option<Response> {
        let r = match f {
            Fault::Http500 => Response::text(500, "Internal Server Error (emulated)"),
            Fault::Http503 => Response::text(503, "Service Unavailable (emulated)"),
            Fault::Http503RetryAfter => {
                Response::text(503, "Service Unavailable (emulated)").header("Retry-After", "1")
            }
            Fault::Http429 => Response::text(429, "Too Many Requests (emulated)").header("Retry-After", "1"),
            Fault::Timeout => {
                let mut r = Response::text(504, "emulated timeout: request not processed");
                r.delay = Some(*lock(&self.fault_delay));
                r
            }
            Fault::Oversized => oversized(json_body),
            _ => return None,
        };
        Some(tag(r, f))
    }

    /// Polls an asynchronous request now stays pending (captured when a request is created).
    pub(crate) fn pending_polls(&self) -> u32 {
        *lock(&self.pending_polls)
    }

    /// `GET` → current value; `POST` body `N` sets it.
    fn control_pending_polls(&self, req: &Request) -> Response {
        match req.method.as_str() {
            "GET" => Response::text(200, &format!("{}\n", self.pending_polls())),
            "POST" => match String::from_utf8_lossy(&req.body).trim().parse::<u32>() {
                Ok(n) => {
                    *lock(&self.pending_polls) = n;
                    Response::text(200, &format!("{n}\n"))
                }
                Err(_) => Response::text(400, "body must be a non-negative integer"),
            },
            _ => Response::text(405, "use GET or POST"),
        }
    }

    /// Records a genuinely issued leaf for [`crate::Emulator::issued`].
    pub(crate) fn record_issued(&self, der: &[u8]) {
        lock(&self.issued).push(der.to_vec());
    }

    fn control_fault(&self, req: &Request) -> Response {
        match req.method.as_str() {
            "GET" => {
                let cur = lock(&self.faults).current();
                let name = cur.map(|(f, _)| f.name()).unwrap_or("none");
                Response::text(200, &format!("{name}\n"))
            }
            "DELETE" => {
                lock(&self.faults).set(Fault::None, None);
                Response::text(200, "none\n")
            }
            "POST" => self.arm_from_text(req),
            _ => Response::text(405, "use GET, POST or DELETE"),
        }
    }

    /// Body `NAME` or `NAME COUNT`; `?count=N` also works.
    fn arm_from_text(&self, req: &Request) -> Response {
        let text = String::from_utf8_lossy(&req.body).to_string();
        let mut words = text.split_whitespace();
        let name = words.next().unwrap_or("none");
        let count = words.next().or(req.query_param("count"));
        let fault: Fault = match name.parse() {
            Ok(f) => f,
            Err(e) => return Response::text(400, &e),
        };
        let count = match count.map(str::parse::<u32>) {
            None => None,
            Some(Ok(n)) => Some(n),
            Some(Err(_)) => return Response::text(400, "count must be a non-negative integer"),
        };
        lock(&self.faults).set(fault, count);
        Response::text(200, &format!("{fault}\n"))
    }

    fn control_log(&self) -> Response {
        let lines: String = lock(&self.log).iter().map(|l| format!("{}\n", l.to_json())).collect();
        Response::new(200).header("Content-Type", "application/x-ndjson").body(lines.into_bytes())
    }
}

fn is_entra_token_path(p: &str) -> bool {
    p.strip_suffix("/oauth2/v2.0/token")
        .and_then(|t| t.strip_prefix('/'))
        .is_some_and(|tenant| !tenant.is_empty() && !tenant.contains('/'))
}

/// Marks a response as shaped by `f` (header + log).
pub(crate) fn tag(r: Response, f: Fault) -> Response {
    r.header(FAULT_HEADER, f.name())
}

fn oversized(json_body: bool) -> Response {
    const SIZE: usize = 2 * 1024 * 1024;
    if json_body {
        let mut body = b"{\"padding\":\"".to_vec();
        body.resize(SIZE - 2, b'A');
        body.extend_from_slice(b"\"}");
        Response::raw_json(200, body)
    } else {
        Response::text(200, &"A".repeat(SIZE))
    }
}

/// Applies an answer-phase fault to a successful response (malformed, truncated, wrapped).
pub(crate) fn answer_fault(f: Option<Fault>, mut r: Response) -> Response {
    let Some(f) = f else { return r };
    let is_json = r.headers.iter().any(|(k, v)| k == "Content-Type" && v.contains("json"));
    match f {
        Fault::MalformedJson if is_json => {
            // Same shape, single quotes: looks like JSON, is not.
            r.body = String::from_utf8_lossy(&r.body).replace('"', "'").into_bytes();
        }
        Fault::MalformedJson => {
            r.body = b"-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n".to_vec();
        }
        Fault::TruncatedJson => {
            let half = r.body.len() / 2;
            r.body.truncate(half);
        }
        Fault::TruncatedBody | Fault::EnosAnswerLost | Fault::RedtrustFinalizeAnswerLost => {
            r.truncate_body_at = Some(r.body.len() / 2)
        }
        Fault::EzcaWrapped => {
            let inner = String::from_utf8_lossy(&r.body).into_owned();
            r.body = Value::String(inner).to_string().into_bytes();
        }
        // Replaces the server's own Date (server.rs sends only one).
        Fault::AbsurdDate => r = r.header("Date", "Thu, 01 Jan 99999999999999 00:00:00 GMT"),
        _ => {}
    }
    tag(r, f)
}

/// A running emulator. Dropping it stops the server.
pub struct Emulator {
    shared: Arc<Shared>,
    server: HttpsServer,
    /// EnOS identifiers and credentials (app_key, app_secret, org_id, asset_id, product_key, device_key).
    pub enos: EnosConfig,
    /// EZCA identifiers and credentials (ca_id, template_id, bootstrap_token, tenant_id, client_id, client_secret).
    pub ezca: EzcaConfig,
    /// Sectigo identifiers and credentials (customer_uri, login, password, org_id, cert_type, terms).
    pub sectigo: SectigoConfig,
    /// Securosys key name and credentials (sign_key_name, key_password, jwt, api_key, …).
    pub securosys: SecurosysConfig,
    /// Redtrust partner settings (partner, hmac_secret, domain, redirect_url, ca_provider, …).
    pub redtrust: RedtrustConfig,
    /// EST settings (label, username, password, retry_after_s, valid_days).
    pub est: EstConfig,
    /// SCEP settings as started (challenge, caps, pending_polls, reply_cipher, valid_days).
    pub scep: ScepConfig,
}

impl Emulator {
    /// Generates the test PKI and starts the HTTPS server on 127.0.0.1.
    pub fn start(opts: Options) -> io::Result<Self> {
        let shared = Arc::new(Shared::new(&opts)?);
        let client_roots = opts.request_client_cert.then(|| client_roots(&shared.pki));
        let tls =
            server::tls_config(shared.pki.tls_server_chain(), shared.pki.tls_server_key(), client_roots)
                .map_err(io::Error::other)?;
        let handler_state = shared.clone();
        let handler: server::Handler = Arc::new(move |req: &Request| handler_state.handle(req));
        let server = HttpsServer::start(opts.port, tls, handler)?;
        let _ = shared.url.set(format!("https://{}", server.addr()));
        Ok(Self {
            shared,
            server,
            enos: opts.enos,
            ezca: opts.ezca,
            sectigo: opts.sectigo,
            securosys: opts.securosys,
            redtrust: opts.redtrust,
            est: opts.est,
            scep: opts.scep,
        })
    }

    /// Base URL, `https://127.0.0.1:PORT` (the agent's `url` / `api_gateway` / EZCA `authority`).
    pub fn url(&self) -> String {
        self.shared.url().to_string()
    }

    /// The bound socket address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// PEM of the root that signs the HTTPS server certificate (the client's trust bundle).
    pub fn tls_root_pem(&self) -> String {
        self.shared.pki.tls_root.pem()
    }

    /// PEM of the EnOS root CA (what `caCert` carries).
    pub fn enos_root_pem(&self) -> String {
        self.shared.pki.enos_root.pem()
    }

    /// PEM of the EZCA root CA (`RootCertificate`).
    pub fn ezca_root_pem(&self) -> String {
        self.shared.pki.ezca_root.pem()
    }

    /// PEM of the EZCA issuing CA (`IssuingCACertificate`).
    pub fn ezca_issuing_pem(&self) -> String {
        self.shared.pki.ezca_issuing.pem()
    }

    /// PEM of the Sectigo root CA (last block of a `collect` chain).
    pub fn sectigo_root_pem(&self) -> String {
        self.shared.pki.sectigo_root.pem()
    }

    /// PEM of the Sectigo issuing CA (the leaves' issuer).
    pub fn sectigo_issuing_pem(&self) -> String {
        self.shared.pki.sectigo_issuing.pem()
    }

    /// PEM of the Securosys root CA.
    pub fn securosys_root_pem(&self) -> String {
        self.shared.pki.securosys_root.pem()
    }

    /// PEM of the Securosys issuing CA (the RSA "CA key in the HSM").
    pub fn securosys_issuing_pem(&self) -> String {
        self.shared.pki.securosys_issuing.pem()
    }

    /// The Securosys chain an agent's `ca_bundle` holds: issuing CA PEM, then root PEM
    /// (TSB returns only the leaf, protocols.md §4.4).
    pub fn securosys_ca_bundle_pem(&self) -> String {
        format!("{}{}", self.securosys_issuing_pem(), self.securosys_root_pem())
    }

    /// PEM of the EST root CA (last certificate of `cacerts`).
    pub fn est_root_pem(&self) -> String {
        self.shared.pki.est_root.pem()
    }

    /// PEM of the EST issuing CA (signs EST device certificates; first in `cacerts`).
    pub fn est_issuing_pem(&self) -> String {
        self.shared.pki.est_issuing.pem()
    }

    /// PEM of the Factory CA (issues the factory / IDevID certificates `simpleenroll` accepts).
    pub fn factory_ca_pem(&self) -> String {
        self.shared.pki.factory_ca.pem()
    }

    /// PEM of this run's factory (IDevID) certificate, `O=Acme, CN=sensor-0042 factory`.
    pub fn factory_cert_pem(&self) -> String {
        crate::pki::cert_pem(&lock(&self.shared.est).factory_cert)
    }

    /// PKCS#8 PEM (`PRIVATE KEY`) of the factory certificate's P-256 key.
    pub fn factory_key_pem(&self) -> String {
        crate::pki::pem_encode("PRIVATE KEY", &lock(&self.shared.est).factory_key)
    }

    /// Another factory certificate from the Factory CA for a fresh key (`rsa`: RSA-2048, else
    /// P-256), subject `O=Acme, CN=cn`, valid `days` (< 0: expired that many days ago).
    /// Returns (certificate PEM, PKCS#8 key PEM).
    pub fn issue_factory_identity(&self, cn: &str, rsa: bool, days: i64) -> Result<(String, String), String> {
        issue_client_identity(&self.shared.pki.factory_ca, cn, rsa, days)
    }

    /// A client certificate from the EST issuing CA for a fresh key, as
    /// [`Self::issue_factory_identity`] (simplereenroll tests, e.g. an expired device
    /// certificate). Not recorded in [`Self::issued`].
    pub fn issue_est_device_identity(
        &self,
        cn: &str,
        rsa: bool,
        days: i64,
    ) -> Result<(String, String), String> {
        issue_client_identity(&self.shared.pki.est_issuing, cn, rsa, days)
    }

    /// `simpleenroll` requests received on a known label (whatever the answer).
    /// ACME new-order requests answered 201.
    pub fn acme_new_orders(&self) -> usize {
        lock(&self.shared.acme).new_orders
    }

    /// Every `replaces` (RFC 9773 §5) a new ACME order carried.
    pub fn acme_replaces(&self) -> Vec<String> {
        lock(&self.shared.acme).replaces.clone()
    }

    /// Changes the ACME suggested renewal window (seconds from now; `None`: the last third of
    /// the certificate's life).
    pub fn set_acme_window(&self, window: Option<(i64, i64)>) {
        lock(&self.shared.acme).set_window(window);
    }

    /// ACME renewal-info GETs answered.
    pub fn acme_renewal_info_requests(&self) -> usize {
        lock(&self.shared.acme).renewal_info_requests
    }

    /// DER of the SCEP CA certificate (RSA-2048, self-signed; what GetCACert answers). The CA
    /// is generated on first use.
    pub fn scep_ca_der(&self) -> Vec<u8> {
        lock(&self.shared.scep).ca_der().expect("the SCEP CA can be generated")
    }

    /// PEM of the SCEP CA certificate.
    pub fn scep_ca_pem(&self) -> String {
        crate::pki::cert_pem(&self.scep_ca_der())
    }

    /// Lowercase hex SHA-256 of the SCEP CA certificate's DER (the agent's `ca_fingerprint`).
    pub fn scep_ca_fingerprint(&self) -> String {
        crate::util::sha256_hex(&[&self.scep_ca_der()])
    }

    /// Every SCEP PKIOperation whose signed attributes could be read, oldest first.
    pub fn scep_messages(&self) -> Vec<ScepMessage> {
        lock(&self.shared.scep).messages()
    }

    /// SCEP PKIOperations of `message_type` (19 PKCSReq, 17 RenewalReq, 20 CertPoll) received.
    pub fn scep_requests(&self, message_type: u8) -> usize {
        self.scep_messages().iter().filter(|m| m.message_type == message_type).count()
    }

    /// The messageType of the last SCEP PKIOperation received.
    pub fn scep_last_message_type(&self) -> Option<u8> {
        self.scep_messages().last().map(|m| m.message_type)
    }

    /// Replaces the GetCACaps lines (e.g. without `Renewal` or `POSTPKIOperation`).
    pub fn set_scep_caps(&self, caps: &[&str]) {
        lock(&self.shared.scep).set_caps(caps);
    }

    /// CertPolls a new SCEP request stays PENDING; open transactions (except `pending-forever`
    /// ones) are set to `n` more too, so 0 lets a waiting request be issued at its next CertPoll.
    pub fn set_scep_pending_polls(&self, n: u32) {
        lock(&self.shared.scep).set_pending_polls(n);
    }

    /// The content cipher of SCEP SUCCESS answers (DES-CBC unless set).
    pub fn set_scep_reply_cipher(&self, cipher: ScepCipher) {
        lock(&self.shared.scep).set_reply_cipher(cipher);
    }

    pub fn est_enroll_requests(&self) -> usize {
        lock(&self.shared.est).enrolls
    }

    /// `simplereenroll` requests received on a known label (whatever the answer).
    pub fn est_reenroll_requests(&self) -> usize {
        lock(&self.shared.est).reenrolls
    }

    /// Lowercase hex SHA-256 of the DER CSR of every authenticated enroll/reenroll request whose
    /// body decoded, oldest first (a client repeating a pending request sends identical bytes).
    pub fn est_csr_hashes(&self) -> Vec<String> {
        lock(&self.shared.est).csr_hashes.clone()
    }

    /// How the last authenticated enroll/reenroll request authenticated.
    pub fn est_last_auth(&self) -> Option<EstAuth> {
        lock(&self.shared.est).last_auth
    }

    /// Sets how many polls a new asynchronous request stays pending (Sectigo collect calls,
    /// Securosys PENDING GETs); also `POST /_emulator/pending-polls`.
    pub fn set_pending_polls(&self, n: u32) {
        *lock(&self.shared.pending_polls) = n;
    }

    /// Sectigo `enroll` + `renewById` calls accepted (a faulty answer creates nothing).
    pub fn sectigo_requests(&self) -> usize {
        lock(&self.shared.sectigo).accepted()
    }

    /// The DER of every CSR Sectigo accepted (enroll and renewById with a CSR), one per order.
    pub fn sectigo_csrs(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.sectigo).csrs()
    }

    /// Securosys `synchronous/sign` + `sign` calls accepted.
    pub fn securosys_requests(&self) -> usize {
        lock(&self.shared.securosys).accepted()
    }

    /// Successful Securosys `DELETE /v1/request/{id}` calls.
    pub fn securosys_cancelled(&self) -> usize {
        lock(&self.shared.securosys).cancelled()
    }

    /// Keys the Redtrust server generated (`csr/create` calls answered successfully).
    pub fn redtrust_keys(&self) -> usize {
        lock(&self.shared.redtrust).keys()
    }

    /// Redtrust sessions (access tokens issued by login or refresh) not logged out.
    pub fn redtrust_sessions_open(&self) -> usize {
        lock(&self.shared.redtrust).sessions_open()
    }

    /// Successful Redtrust `csr/finalize` calls.
    pub fn redtrust_finalized(&self) -> usize {
        lock(&self.shared.redtrust).finalized()
    }

    /// Arms `fault` for the next `count` matching calls (`None` = until cleared).
    pub fn set_fault(&self, fault: Fault, count: Option<u32>) {
        lock(&self.shared.faults).set(fault, count);
    }

    /// Disarms any fault.
    pub fn clear_fault(&self) {
        self.set_fault(Fault::None, None);
    }

    /// The armed fault and its remaining count, if any.
    pub fn current_fault(&self) -> Option<(Fault, Option<u32>)> {
        lock(&self.shared.faults).current()
    }

    /// Sets how long the `timeout` fault holds its response.
    pub fn set_fault_delay(&self, d: Duration) {
        *lock(&self.shared.fault_delay) = d;
    }

    /// Every request served so far, oldest first.
    pub fn log(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.log).clone()
    }

    /// Forgets the request log.
    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }

    /// DER of every leaf issued so far by any CA (faulty deliveries excluded), oldest first.
    pub fn issued(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.issued).clone()
    }

    /// Serial of the EnOS device's current (renewable) certificate, if any.
    pub fn enos_current_serial(&self) -> Option<u64> {
        lock(&self.shared.enos).current_serial()
    }

    /// Serves `req` without the network (for unit tests of the handlers).
    pub fn handle(&self, req: &Request) -> Response {
        self.shared.handle(req)
    }
}

/// With `ENROLL_EMULATOR_DUMP=<dir>`, every request and answer body is written to `<dir>` as
/// `<pid>-<n>.<path>.req` and `<pid>-<n>.<path>.<status>.resp`: the fuzz seeds are real answers
/// (tests/fuzz/seeds.sh). Best effort: a dump that cannot be written is skipped.
fn dump_exchange(req: &Request, resp: &Response) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Some(dir) = std::env::var_os("ENROLL_EMULATOR_DUMP") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path: String =
        req.path.trim_matches('/').chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let stem = format!("{}-{n:06}.{path}", std::process::id());
    let _ = std::fs::write(dir.join(format!("{stem}.req")), &req.body);
    let _ = std::fs::write(dir.join(format!("{stem}.{}.resp", resp.status)), &resp.body);
}

/// A fresh key (RSA-2048 or P-256) and a client certificate for it from `ca`, both PEM.
fn issue_client_identity(
    ca: &crate::pki::CertAuthority,
    cn: &str,
    rsa: bool,
    days: i64,
) -> Result<(String, String), String> {
    let key = if rsa {
        crate::pki::rsa_pkcs8(2048)?
    } else {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| e.to_string())?
            .serialize_der()
    };
    let cert = crate::pki::issue_client_cert(ca, &key, "Acme", cn, days)?;
    Ok((crate::pki::cert_pem(&cert), crate::pki::pem_encode("PRIVATE KEY", &key)))
}

fn client_roots(pki: &Pki) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let cas = [
        &pki.enos_root,
        &pki.ezca_root,
        &pki.ezca_issuing,
        &pki.sectigo_root,
        &pki.sectigo_issuing,
        &pki.securosys_root,
        &pki.securosys_issuing,
        &pki.est_root,
        &pki.est_issuing,
        &pki.factory_ca,
    ];
    for ca in cas {
        // Our own freshly generated CA certificates always parse.
        let _ = roots.add(ca.der().to_vec().into());
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entra_path() {
        assert!(is_entra_token_path("/abc/oauth2/v2.0/token"));
        assert!(!is_entra_token_path("/oauth2/v2.0/token"));
        assert!(!is_entra_token_path("/a/b/oauth2/v2.0/token"));
    }
}
