//! EST request handling (RFC 7030; design.md §9): routing, authentication, policy, the
//! once-only upstream submission, and the answers. Independent of the HTTP server: the server
//! hands over a collected [`EstRequest`] and writes back the [`Reply`].

use crate::config::{DeviceIdField, Label, Settings};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::pki::{self, CertFacts, Csr, San};
use crate::store::{AuditRow, IssuedRecord, RequestRow, State, Store};
use crate::upstream::{Upstream, UpstreamError, UpstreamOutcome, UpstreamRequest};
use rustls_pki_types::TrustAnchor;
use rustls_pki_types::{CertificateDer, UnixTime};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

/// `Content-Type` of PKCS#7 answers (RFC 7030 §4.1.3, §4.2.3; protocols.md §6.1a).
pub const PKCS7: &str = "application/pkcs7-mime; smime-type=certs-only";
/// The challenge of every 401 (design.md §9).
pub const CHALLENGE: &str = "Basic realm=\"enroll-gateway\"";
/// Retry-After for a request another replica or request is working on right now.
const BUSY_RETRY_S: u64 = 2;
/// Retry-After when the vendor is unreachable and did not say.
const UNAVAILABLE_RETRY_S: u64 = 30;
/// A poll claim older than this belongs to a replica that died during the call. A poll is only
/// a question to the CA (it submits nothing), so a shorter bound costs at most a second question:
/// see [`stale_poll_s`].
const STALE_POLL_S: i64 = 300;

/// When a poll claim counts as abandoned: the vendor call's own bound (`upstream.timeout_s`,
/// twice, for a token fetch before the poll) plus 5 s, at most [`STALE_POLL_S`]; so a device
/// whose poll died with its replica waits seconds, not five minutes (replica-kill test).
fn stale_poll_s(upstream_timeout_s: u64) -> i64 {
    (2 * upstream_timeout_s as i64 + 5).min(STALE_POLL_S)
}
/// At most this long, a `submitting` claim is taken for a vendor call still running.
const STALE_SUBMIT_S: i64 = 900;

/// When a `submitting` claim belongs to a replica that died during the vendor call: a submission
/// makes at most six vendor calls (token, a repeated token, the request, the EnOS lost-answer
/// recovery's list and apply, a first collect), each bounded by `upstream.timeout_s`; plus 30 s.
/// Past it the device is told the request is stuck, and `enroll-gateway request release` may
/// free it (design.md §9: a CSR is never forwarded twice without an operator's decision).
pub fn stale_submit_s(upstream_timeout_s: u64) -> i64 {
    (6 * upstream_timeout_s as i64 + 30).min(STALE_SUBMIT_S)
}
/// Retry-After for a request whose submission was interrupted.
const STUCK_RETRY_S: u64 = 3600;
/// Upstream calls running at once in this replica (the blocking pool is not a queue).
const UPSTREAM_SLOTS: usize = 32;

/// A request, as the HTTP layer collected it.
pub struct EstRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authorization: Option<&'a str>,
    /// The TLS client's chain, leaf first; empty without a client certificate.
    pub peer_certs: &'a [CertificateDer<'static>],
    pub peer: SocketAddr,
    pub body: &'a [u8],
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(status: u16, text: &str) -> Self {
        let line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        Reply {
            status,
            headers: vec![("content-type", "text/plain; charset=utf-8".into())],
            body: format!("{line}\n").into_bytes(),
        }
    }
    fn pkcs7(base64: String) -> Self {
        Reply {
            status: 200,
            headers: vec![("content-type", PKCS7.into()), ("content-transfer-encoding", "base64".into())],
            body: base64.into_bytes(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    CaCerts,
    Enroll,
    Reenroll,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::CaCerts => "cacerts",
            Op::Enroll => "simpleenroll",
            Op::Reenroll => "simplereenroll",
        }
    }
}

/// What was decided about one enroll or re-enroll request; becomes the reply and the audit row.
struct Decision {
    status: u16,
    outcome: &'static str,
    reason: Option<String>,
    upstream_ref: Option<String>,
    retry_after: Option<u64>,
    cert: Option<Vec<u8>>,
}

impl Decision {
    fn refuse(reason: impl Into<String>) -> Self {
        Self {
            status: 403,
            outcome: "refused",
            reason: Some(reason.into()),
            upstream_ref: None,
            retry_after: None,
            cert: None,
        }
    }
    fn status(status: u16, outcome: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            outcome,
            reason: Some(reason.into()),
            upstream_ref: None,
            retry_after: None,
            cert: None,
        }
    }
    fn pending(upstream_ref: Option<String>, retry_after: u64, reason: &str) -> Self {
        Self {
            status: 202,
            outcome: "pending",
            reason: Some(reason.into()),
            upstream_ref,
            retry_after: Some(retry_after),
            cert: None,
        }
    }
    fn issued(outcome: &'static str, rec: &IssuedRecord) -> Self {
        Self {
            status: 200,
            outcome,
            reason: None,
            upstream_ref: rec.upstream_ref.clone(),
            retry_after: None,
            cert: Some(rec.cert_der.clone()),
        }
    }
    fn with_ref(mut self, r: Option<String>) -> Self {
        self.upstream_ref = r;
        self
    }
}

/// Trust anchors of one label, prepared once.
struct Anchors {
    ca: Vec<TrustAnchor<'static>>,
    factory: Option<Vec<TrustAnchor<'static>>>,
    cacerts_body: String,
}

/// The EST side of the gateway; shared by all connections.
pub struct Gateway {
    settings: Arc<Settings>,
    store: Store,
    upstreams: HashMap<String, Arc<dyn Upstream>>,
    anchors: HashMap<String, Anchors>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
}

fn anchors_of(certs: &[CertificateDer<'static>]) -> Result<Vec<TrustAnchor<'static>>, Error> {
    certs
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| Error::config(format!("a trust anchor is unusable: {e:?}")))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Checks a client chain (leaf first) against anchors, for client authentication, now.
fn verify_chain(chain: &[CertificateDer<'static>], anchors: &[TrustAnchor<'static>]) -> Result<(), String> {
    let leaf = chain.first().ok_or("no client certificate")?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("unparsable: {e}"))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        anchors,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| match e {
        webpki::Error::CertExpired { not_after, .. } => {
            format!("it expired at {} (Unix time)", not_after.as_secs())
        }
        webpki::Error::CertNotValidYet { not_before, .. } => {
            format!("it is not valid before {} (Unix time)", not_before.as_secs())
        }
        webpki::Error::UnknownIssuer => "its issuer is not a trust anchor here (UnknownIssuer)".into(),
        other => format!("{other:?}"),
    })
}

fn device_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic() && c != '/')
}

/// `Basic base64(user:password)` (RFC 7617); None when the header is not Basic.
fn basic(header: &str) -> Option<Result<(String, String), String>> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = match pki::base64_in(rest.as_bytes()) {
        Ok(d) => d,
        Err(_) => return Some(Err("the Basic credentials are not base64".into())),
    };
    let text = match String::from_utf8(decoded) {
        Ok(t) => t,
        Err(_) => return Some(Err("the Basic credentials are not UTF-8".into())),
    };
    Some(match text.split_once(':') {
        Some((u, p)) => Ok((u.to_owned(), p.to_owned())),
        None => Err("the Basic credentials have no ':'".into()),
    })
}

/// How the client authenticated.
enum Credential {
    Factory,
    Token {
        sha: String,
    },
    /// Re-enrollment: the presented certificate and, when the gateway issued it, its record.
    Current {
        facts: Box<CertFacts>,
        record: Option<Box<IssuedRecord>>,
    },
}

impl Gateway {
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        upstreams: HashMap<String, Arc<dyn Upstream>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let mut anchors = HashMap::new();
        for (name, l) in &settings.labels {
            let ders: Vec<&[u8]> = l.ca_certs.iter().map(|c| c.as_ref()).collect();
            let p7 = pki::certs_only(&ders)
                .map_err(|e| Error::config(format!("labels.{name}.ca_certs_file: {e}")))?;
            anchors.insert(
                name.clone(),
                Anchors {
                    ca: anchors_of(&l.ca_certs)?,
                    factory: l.factory_roots.as_deref().map(anchors_of).transpose()?,
                    cacerts_body: pki::base64_out(&p7, l.wrap_base64),
                },
            );
            if !upstreams.contains_key(name) {
                return Err(Error::config(format!("labels.{name}: no upstream")));
            }
        }
        Ok(Self {
            settings,
            store,
            upstreams,
            anchors,
            metrics,
            slots: Arc::new(Semaphore::new(UPSTREAM_SLOTS)),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one request under `/.well-known/est/`.
    pub async fn handle(&self, req: &EstRequest<'_>) -> Reply {
        let started = Instant::now();
        let Some(rest) = req.path.strip_prefix("/.well-known/est/") else {
            return Reply::text(404, "not found");
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (label_name, op_name) = match parts.as_slice() {
            [op] => (None, *op),
            [label, op] => (Some(*label), *op),
            _ => return Reply::text(404, "not found"),
        };
        let op = match op_name {
            "cacerts" => Op::CaCerts,
            "simpleenroll" => Op::Enroll,
            "simplereenroll" => Op::Reenroll,
            _ => return Reply::text(404, "this EST operation is not offered"),
        };
        let Some(label) = self.settings.label(label_name).cloned() else {
            return Reply::text(404, "no such CA label");
        };
        let want = if op == Op::CaCerts { "GET" } else { "POST" };
        if req.method != want {
            let mut r = Reply::text(405, &format!("{} takes {want}", op.name()));
            r.headers.push(("allow", want.into()));
            return r;
        }
        if op == Op::CaCerts {
            let reply = Reply::pkcs7(self.anchors[&label.name].cacerts_body.clone());
            self.metrics.request(&label.name, op.name(), "ok", started.elapsed().as_secs_f64());
            return reply;
        }
        let mut who = "-".to_string();
        let decision = match self.decide(&label, op, req, &mut who).await {
            Ok(d) => d,
            Err(e) => {
                log::error!(
                    "{} {} from {}: {}",
                    label.name,
                    op.name(),
                    req.peer,
                    crate::error::report(&e).replace('\n', "; ")
                );
                Decision::status(500, "error", format!("internal error: {e}"))
            }
        };
        let audit = AuditRow {
            at: now(),
            peer: req.peer.to_string(),
            who: printable(&who),
            label: label.name.clone(),
            operation: op.name().into(),
            outcome: decision.outcome.into(),
            upstream_ref: decision.upstream_ref.clone(),
            reason: decision.reason.clone(),
        };
        let mut reply = match self.store.audit(&audit).await {
            Ok(()) => self.reply(&label, &decision),
            Err(e) => {
                // A decision that cannot be recorded is not given out.
                log::error!("audit: {}", crate::error::report(&e).replace('\n', "; "));
                Reply::text(500, "internal error: the audit log cannot be written")
            }
        };
        if decision.status == 401 {
            reply.headers.push(("www-authenticate", CHALLENGE.into()));
        }
        log::info!(
            "{} {} {} who={} -> {} {}{}",
            req.peer,
            label.name,
            op.name(),
            audit.who,
            reply.status,
            audit.outcome,
            audit.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
        );
        self.metrics.request(&label.name, op.name(), decision.outcome, started.elapsed().as_secs_f64());
        reply
    }

    fn reply(&self, label: &Label, d: &Decision) -> Reply {
        let mut r = match (&d.cert, d.status) {
            (Some(cert), 200) => match pki::certs_only(&[cert]) {
                Ok(p7) => Reply::pkcs7(pki::base64_out(&p7, label.wrap_base64)),
                Err(e) => Reply::text(500, &format!("internal error: {e}")),
            },
            _ => Reply::text(d.status, d.reason.as_deref().unwrap_or("")),
        };
        if let Some(s) = d.retry_after {
            r.headers.push(("retry-after", s.to_string()));
        }
        r
    }

    async fn decide(
        &self,
        label: &Arc<Label>,
        op: Op,
        req: &EstRequest<'_>,
        who: &mut String,
    ) -> Result<Decision, Error> {
        let anchors = &self.anchors[&label.name];
        // Until the device is known, the audit names the client certificate's CN, if any.
        if let Some(leaf) = req.peer_certs.first() {
            if let Some(cn) = CertFacts::parse(leaf).ok().and_then(|f| f.cns.into_iter().next()) {
                *who = format!("cert CN={cn}");
            }
        }
        // 1. Who is asking (RFC 7030 §3.2.3, §3.3.2).
        let (device, cred) = match op {
            Op::Enroll => {
                let mut cert_problem = None;
                let mut found = None;
                if let (Some(roots), false) = (&anchors.factory, req.peer_certs.is_empty()) {
                    match verify_chain(req.peer_certs, roots) {
                        Ok(()) => {
                            let facts = CertFacts::parse(&req.peer_certs[0])
                                .map_err(|e| Error::new(crate::error::Kind::Internal, e))?;
                            let (ids, field) = match label.device_id {
                                DeviceIdField::SerialNumber => (facts.serial_numbers, "serialNumber"),
                                DeviceIdField::Cn => (facts.cns, "CN"),
                            };
                            match ids.as_slice() {
                                [id] => found = Some((id.clone(), Credential::Factory)),
                                _ => {
                                    return Ok(Decision::refuse(format!(
                                        "the factory certificate's subject has no single {field}"
                                    )))
                                }
                            }
                        }
                        Err(e) => {
                            cert_problem = Some(format!(
                                "the client certificate does not chain to this label's factory roots: {e}"
                            ))
                        }
                    }
                }
                match found {
                    Some(f) => f,
                    None => match req.authorization.and_then(basic) {
                        Some(Err(e)) => return Ok(Decision::status(400, "bad-request", e)),
                        Some(Ok((user, password))) => {
                            *who = user.clone();
                            if !label.tokens {
                                return Ok(Decision::refuse("this label does not accept enrollment tokens"));
                            }
                            (user, Credential::Token { sha: pki::sha256_hex(password.as_bytes()) })
                        }
                        None => match cert_problem {
                            Some(p) => return Ok(Decision::refuse(p)),
                            None => return Ok(Decision::status(401, "unauthenticated", "credentials needed: a factory client certificate or Basic with an enrollment token")),
                        },
                    },
                }
            }
            Op::Reenroll => {
                if req.peer_certs.is_empty() {
                    return Ok(Decision::refuse(
                        "re-enrollment needs a TLS client certificate issued under this label's CA",
                    ));
                }
                if let Err(e) = verify_chain(req.peer_certs, &anchors.ca) {
                    return Ok(Decision::refuse(format!(
                        "the client certificate is not a current certificate of this label's CA: {e}"
                    )));
                }
                let facts = CertFacts::parse(&req.peer_certs[0])
                    .map_err(|e| Error::new(crate::error::Kind::Internal, e))?;
                let record = self.store.certificate_by_hash(&pki::sha256_hex(&req.peer_certs[0])).await?;
                let device = match (&record, facts.cns.as_slice()) {
                    (Some(r), _) => r.device.clone(),
                    (None, [cn]) => cn.clone(),
                    (None, _) => {
                        return Ok(Decision::refuse("the client certificate's subject has no single CN"))
                    }
                };
                (device, Credential::Current { facts: Box::new(facts), record: record.map(Box::new) })
            }
            Op::CaCerts => unreachable!("cacerts is answered before"),
        };
        *who = device.clone();
        if !device_id_ok(&device) {
            return Ok(Decision::refuse(
                "the device id must be 1-128 printable ASCII characters without '/'",
            ));
        }

        // 2. The CSR (RFC 7030 §4.2.1; RFC 8951: base64, any whitespace).
        let csr = match pki::base64_in(req.body).and_then(|der| Csr::parse(&der)) {
            Ok(c) => c,
            Err(e) => return Ok(Decision::status(400, "bad-request", e)),
        };

        // A token that cannot authenticate this request ends it before the policy is looked at.
        let token_refused =
            "the enrollment token is unknown, expired, already used, or not for this device and label";
        if let Credential::Token { sha } = &cred {
            if !self.store.token_usable(sha, &label.name, &device, &csr.sha256, now()).await? {
                return Ok(Decision::refuse(token_refused));
            }
        }

        // 3. Policy (design.md §9).
        if let Err(e) = csr.verify_signature() {
            return Ok(Decision::refuse(e));
        }
        if csr.cns.as_slice() != [device.as_str()] {
            return Ok(Decision::refuse(format!("the CSR's subject CN must be the device id {device:?}")));
        }
        let allowed: Vec<String> = label
            .policy
            .san_dns
            .iter()
            .map(|p| p.replace("{device}", &device).to_ascii_lowercase())
            .collect();
        for san in &csr.sans {
            match san {
                San::Dns(d) if allowed.contains(&d.to_ascii_lowercase()) => {}
                San::Dns(d) => {
                    return Ok(Decision::refuse(format!("DNS SAN {d:?} is not allowed for this device")))
                }
                San::Other(kind) => return Ok(Decision::refuse(format!("{kind} SANs are not allowed"))),
            }
        }
        if let Credential::Current { facts, .. } = &cred {
            if csr.subject_der != facts.subject_der || csr.san_der != facts.san_der {
                return Ok(Decision::refuse(
                    "the CSR's subject and subjectAltName must equal the client certificate's (RFC 7030 §4.2.2)",
                ));
            }
        }
        if self.store.device_revoked(&device).await? {
            return Ok(Decision::refuse(format!("device {device} is revoked")));
        }

        // 4. The token, consumed by this CSR (identical retries keep working).
        let t = now();
        if let Credential::Token { sha } = &cred {
            // One atomic UPDATE: of two requests with one token, one wins (even at two replicas).
            if !self.store.token_consume(sha, &label.name, &device, &csr.sha256, t).await? {
                return Ok(Decision::refuse(token_refused));
            }
        }

        // 5. Once per CSR upstream, whichever replica or retry gets here.
        let renewal_of = match &cred {
            Credential::Current { record, .. } => record.as_deref().cloned(),
            _ => None,
        };
        if let Some(row) = self.store.request(&label.name, &csr.sha256).await? {
            return self.existing(label, &device, &csr, renewal_of.as_ref(), row).await;
        }
        let since = t - 86_400;
        let used = self.store.requests_since(&label.name, &device, since).await?;
        if used >= i64::from(label.policy.max_per_device_per_day) {
            return Ok(Decision::refuse(format!(
                "device {device} has had {used} certificates in 24 hours; policy.max_per_device_per_day is {}",
                label.policy.max_per_device_per_day
            )));
        }
        if !self.store.request_claim(&label.name, &csr.sha256, &device, op.name(), t).await? {
            return match self.store.request(&label.name, &csr.sha256).await? {
                Some(row) => self.existing(label, &device, &csr, renewal_of.as_ref(), row).await,
                None => Ok(Decision::pending(None, BUSY_RETRY_S, "the request is being submitted upstream")),
            };
        }
        let result = self.call(label, &device, &csr, renewal_of.clone(), None).await;
        self.outcome(label, &device, &csr, result, false).await
    }

    /// An identical request was seen before: answer from its state, polling upstream when due.
    async fn existing(
        &self,
        label: &Label,
        device: &str,
        csr: &Csr,
        renewal_of: Option<&IssuedRecord>,
        row: RequestRow,
    ) -> Result<Decision, Error> {
        if row.device != device {
            return Ok(Decision::refuse("this CSR was submitted by another device"));
        }
        match row.state {
            State::Issued => match self.store.certificate_for_csr(&label.name, &csr.sha256).await? {
                Some(rec) => Ok(Decision::issued("reissued", &rec)),
                None => Err(Error::new(
                    crate::error::Kind::Storage,
                    "database: an issued request has no certificate",
                )),
            },
            State::Refused => Ok(Decision::status(403, "vendor-refused", row.reason.unwrap_or_default())
                .with_ref(row.upstream_ref)),
            State::Failed => Ok(Decision::status(502, "upstream-error", row.reason.unwrap_or_default())
                .with_ref(row.upstream_ref)),
            State::Submitting
                if now() - row.updated_at > stale_submit_s(self.settings.upstream.timeout_s) =>
            {
                // The replica that claimed it stopped during the vendor call: whether the vendor
                // has it is unknown, so it is never resubmitted by itself. Say so, loudly, until
                // an operator checks the vendor and runs `request release` (or the device sends
                // a CSR for a new key).
                let mut d = Decision::status(
                    503,
                    "stuck",
                    format!(
                        "the submission of this CSR to the CA was interrupted at {} (Unix time); \
                         whether the CA has it is unknown; an operator must check the CA and run \
                         `enroll-gateway request release --label {} --csr {}`, or the device must send a new CSR",
                        row.updated_at, label.name, csr.sha256
                    ),
                );
                d.retry_after = Some(STUCK_RETRY_S);
                Ok(d)
            }
            State::Submitting => Ok(Decision::pending(
                row.upstream_ref,
                BUSY_RETRY_S,
                "the request is being submitted upstream",
            )),
            State::Pending | State::Polling => {
                let t = now();
                let retry = row.retry_after_s.map(|s| s.max(1) as u64).unwrap_or(BUSY_RETRY_S);
                let Some(reference) = row.upstream_ref.clone() else {
                    return Err(Error::new(
                        crate::error::Kind::Storage,
                        "database: a pending request has no upstream reference",
                    ));
                };
                if !self
                    .store
                    .request_claim_poll(
                        &label.name,
                        &csr.sha256,
                        t,
                        t - stale_poll_s(self.settings.upstream.timeout_s),
                    )
                    .await?
                {
                    return Ok(Decision::pending(Some(reference), retry, "waiting for the CA"));
                }
                let result =
                    self.call(label, device, csr, renewal_of.cloned(), Some(reference.clone())).await;
                self.outcome(label, device, csr, result, true).await
            }
        }
    }

    /// One upstream call on the blocking pool, at most [`UPSTREAM_SLOTS`] at once.
    async fn call(
        &self,
        label: &Label,
        device: &str,
        csr: &Csr,
        renewal_of: Option<IssuedRecord>,
        poll_ref: Option<String>,
    ) -> Result<UpstreamOutcome, UpstreamError> {
        let up = self.upstreams[&label.name].clone();
        let _slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (name, device, der) = (label.name.clone(), device.to_owned(), csr.der.clone());
        tokio::task::spawn_blocking(move || {
            let req = UpstreamRequest {
                label: &name,
                device_id: &device,
                csr_der: &der,
                renewal_of: renewal_of.as_ref(),
            };
            match &poll_ref {
                None => up.submit(&req),
                Some(r) => up.poll(r, &req),
            }
        })
        .await
        .unwrap_or_else(|e| Err(UpstreamError::Protocol(format!("the upstream client failed: {e}"))))
    }

    /// Records and answers an upstream result. `polled`: the call was a poll of a pending request.
    async fn outcome(
        &self,
        label: &Label,
        device: &str,
        csr: &Csr,
        result: Result<UpstreamOutcome, UpstreamError>,
        polled: bool,
    ) -> Result<Decision, Error> {
        let (l, key, t) = (&label.name, &csr.sha256, now());
        let prior =
            if polled { self.store.request(l, key).await?.and_then(|r| r.upstream_ref) } else { None };
        match result {
            Ok(UpstreamOutcome::Issued { cert_der, chain_der: _, upstream_ref }) => {
                let upstream_ref = upstream_ref.or(prior);
                let facts = match CertFacts::parse(&cert_der) {
                    Ok(f) => f,
                    Err(e) => {
                        let why = format!("the CA returned an unusable certificate: {e}");
                        self.metrics.upstream_error(l, "protocol");
                        self.store
                            .request_set(l, key, State::Failed, upstream_ref.as_deref(), Some(&why), None, t)
                            .await?;
                        return Ok(Decision::status(502, "upstream-error", why).with_ref(upstream_ref));
                    }
                };
                if facts.spki_der != csr.spki_der {
                    let why =
                        "the CA returned a certificate that does not carry the CSR's public key".to_string();
                    self.metrics.upstream_error(l, "protocol");
                    self.store
                        .request_set(l, key, State::Failed, upstream_ref.as_deref(), Some(&why), None, t)
                        .await?;
                    return Ok(Decision::status(502, "upstream-error", why).with_ref(upstream_ref));
                }
                let rec = IssuedRecord {
                    label: l.clone(),
                    device: device.to_owned(),
                    serial: facts.serial,
                    not_before: facts.not_before,
                    not_after: facts.not_after,
                    upstream_ref,
                    csr_sha256: key.clone(),
                    cert_sha256: pki::sha256_hex(&cert_der),
                    cert_der,
                    issued_at: t,
                };
                self.store.issued(&rec, t).await?;
                Ok(Decision::issued("issued", &rec))
            }
            Ok(UpstreamOutcome::Pending { upstream_ref, retry_after_s }) => {
                let retry = retry_after_s.max(1);
                self.store
                    .request_set(l, key, State::Pending, Some(&upstream_ref), None, Some(retry as i64), t)
                    .await?;
                Ok(Decision::pending(Some(upstream_ref), retry, "waiting for the CA"))
            }
            Err(UpstreamError::Refused(words)) => {
                self.metrics.upstream_error(l, "refused");
                let words = one_line(&words);
                self.store.request_set(l, key, State::Refused, None, Some(&words), None, t).await?;
                Ok(Decision::status(403, "vendor-refused", words).with_ref(prior))
            }
            Err(UpstreamError::Unavailable { message, retry_after_s }) => {
                self.metrics.upstream_error(l, "unavailable");
                let retry = retry_after_s.unwrap_or(UNAVAILABLE_RETRY_S).max(1);
                if polled {
                    self.store
                        .request_set(l, key, State::Pending, None, Some(&message), Some(retry as i64), t)
                        .await?;
                } else {
                    // The vendor did not take it: a retry may submit it again.
                    self.store.request_release(l, key).await?;
                }
                let mut d = Decision::status(
                    503,
                    "unavailable",
                    format!("the CA is unavailable: {}", one_line(&message)),
                );
                d.retry_after = Some(retry);
                Ok(d.with_ref(prior))
            }
            Err(UpstreamError::Protocol(message)) => {
                self.metrics.upstream_error(l, "protocol");
                let why = format!("the CA's answer is unusable: {}", one_line(&message));
                if polled {
                    self.store.request_set(l, key, State::Pending, None, Some(&why), None, t).await?;
                } else {
                    // Whether the vendor took it is unknown: never submit it again.
                    self.store.request_set(l, key, State::Failed, None, Some(&why), None, t).await?;
                }
                Ok(Decision::status(502, "upstream-error", why).with_ref(prior))
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A client-supplied name for logs and the audit: no control characters, at most 128 characters.
fn printable(s: &str) -> String {
    s.chars().take(128).map(|c| if c.is_control() { '?' } else { c }).collect()
}
