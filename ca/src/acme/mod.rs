//! ACME, RFC 8555 (design.md §10, protocols.md §6.3).
//!
//! `GET directory` → account (`newAccount` with the account key; the same key finds the same
//! account again, so nothing but the key is kept) → `newOrder` for the configured SANs → answer
//! each pending authorization (http-01 or dns-01) → `finalize` with our CSR (so hardware keys
//! work: the account key signs the JWS, the device key only the CSR) → poll while `processing`
//! → download the PEM chain. Renewal is a new order. Every POST is a JWS with a fresh nonce;
//! `badNonce` is retried with the nonce that came with it.
//!
//! A placed order is the pending request at once: its URL is kept in state.json before anything
//! is waited for, and a run that ends (75 after `poll_wait_s`, a kill, a power cut) leaves it to
//! the next run, which carries the same order on (answering authorizations again if they are
//! still pending, finalizing it with the identical CSR if it is ready) instead of placing another.

#[cfg(feature = "acme-tls-alpn")]
mod alpn;
mod challenge;
pub mod config;
mod jws;

pub use config::*;

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::backend::{CaBackend, Credentials, Current, Outcome, Poll, Polling, RenewalWindow, Request};
use crate::error::{Error, Result};
use crate::http::{Http, Response};
use crate::json::{self, Value};
use crate::pki::{Cert, Issued};
use challenge::{Identifier, Responder};
use jws::AccountKey;

const JOSE: &str = "application/jose+json";
const PROBLEM_PREFIX: &str = "urn:ietf:params:acme:error:";
/// A CA answering `badNonce` this many times in a row is not going to accept one.
const NONCE_ATTEMPTS: usize = 10;
/// The first pause while an authorization or the order is being processed.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

pub fn credentials(settings: &AcmeSettings) -> Credentials {
    let proof = match (&settings.challenge, settings.eab.is_some()) {
        (Challenge::Http01 { .. }, false) => "ACME account key + http-01 challenge (ca.http01_listen)",
        (Challenge::Http01 { .. }, true) => {
            "ACME account key bound to ca.eab.kid (ca.eab.hmac_key_file) + http-01 challenge"
        }
        (Challenge::TlsAlpn01 { .. }, false) => {
            "ACME account key + tls-alpn-01 challenge (ca.tls_alpn01_listen)"
        }
        (Challenge::TlsAlpn01 { .. }, true) => {
            "ACME account key bound to ca.eab.kid (ca.eab.hmac_key_file) + tls-alpn-01 challenge"
        }
        (Challenge::Dns01 { .. }, false) => "ACME account key + dns-01 challenge (ca.dns01_hook)",
        (Challenge::Dns01 { .. }, true) => {
            "ACME account key bound to ca.eab.kid (ca.eab.hmac_key_file) + dns-01 challenge"
        }
    };
    // ACME does not take the current certificate as a credential: a renewal is a new order.
    Credentials { enroll: proof, renew: proof }
}

/// The URLs of `GET directory` (§7.1.1) this client uses.
pub(crate) struct Directory {
    new_nonce: String,
    new_account: String,
    new_order: String,
    /// ARI (RFC 9773 §4): where a certificate's suggested renewal window is read.
    renewal_info: Option<String>,
    terms_of_service: Option<String>,
    eab_required: bool,
}

struct Account {
    key: AccountKey,
    /// The account URL (the `kid` of every later JWS).
    url: String,
}

pub struct Acme<'a> {
    settings: &'a AcmeSettings,
    http: Http,
    directory: Option<Directory>,
    account: Option<Account>,
    nonce: RefCell<Option<String>>,
    retry_after: Option<u64>,
    /// The order placed by this run and the CA's answer to it, until the first poll.
    placed: Option<(String, Value)>,
}

/// Where an order stands after [`Acme::carry_on`].
enum Progress {
    Issued(Issued),
    /// Not finished within the wait; the CA's state, for the log.
    Waiting(String),
}

impl<'a> Acme<'a> {
    pub fn new(settings: &'a AcmeSettings, http: Http) -> Self {
        Acme {
            settings,
            http,
            directory: None,
            account: None,
            nonce: RefCell::new(None),
            retry_after: None,
            placed: None,
        }
    }

    fn directory(&mut self) -> Result<&Directory> {
        if self.directory.is_none() {
            let response = self.http.send("ACME directory", "GET", &self.settings.directory, &[], None)?;
            if !response.is_success() {
                return Err(problem("ACME directory", &response));
            }
            self.directory = Some(read_directory(&crate::backend::parse_json("ACME directory", &response)?)?);
        }
        Ok(self.directory.as_ref().expect("set above"))
    }

    /// Finds or creates the account of our account key (§7.3; §7.3.1: a known key answers 200
    /// with the same account's URL).
    fn account(&mut self) -> Result<()> {
        if self.account.is_some() {
            return Ok(());
        }
        let key_path = self.settings.account_key_file.clone().ok_or_else(|| {
            Error::config("ca.account_key_file: missing (no state directory to keep the ACME account key in)")
        })?;
        let key = AccountKey::load_or_create(&key_path)?;
        let settings = self.settings;
        let directory = self.directory()?;
        if let (Some(terms), false) = (&directory.terms_of_service, settings.terms_agreed) {
            return Err(Error::config(format!(
                "ca.terms_agreed: the CA asks to agree to its terms of service ({}); set it to true once agreed",
                crate::http::excerpt(terms)
            )));
        }
        let mut members = vec![("termsOfServiceAgreed".to_string(), Value::Bool(settings.terms_agreed))];
        if !settings.contact.is_empty() {
            let contact = settings.contact.iter().map(|c| Value::from(c.as_str())).collect();
            members.push(("contact".to_string(), Value::Array(contact)));
        }
        match (&settings.eab, directory.eab_required) {
            (Some(eab), _) => members.push((
                "externalAccountBinding".to_string(),
                key.external_binding(&eab.kid, &eab.hmac_key, &directory.new_account)?,
            )),
            (None, true) => {
                return Err(Error::config(
                    "ca.eab: this CA requires external account binding (meta.externalAccountRequired); \
                     give kid and hmac_key_file",
                ))
            }
            (None, false) => {}
        }
        let new_account = directory.new_account.clone();
        let response =
            self.post_signed("ACME newAccount", &new_account, &Value::Object(members).to_json(), &key, None)?;
        let url = response.location.ok_or_else(|| {
            Error::protocol("ACME newAccount: the answer has no Location (the account URL)")
        })?;
        self.account = Some(Account { key, url });
        Ok(())
    }

    /// A JWS POST by the account, with a fresh nonce and the `badNonce` retry (§6.5).
    fn post(&mut self, what: &str, url: &str, payload: &str) -> Result<Response> {
        self.account()?;
        let account = self.account.as_ref().expect("set by account()");
        self.post_signed(what, url, payload, &account.key, Some(&account.url))
    }

    fn post_signed(
        &self,
        what: &str,
        url: &str,
        payload: &str,
        key: &AccountKey,
        kid: Option<&str>,
    ) -> Result<Response> {
        for _ in 0..NONCE_ATTEMPTS {
            let nonce = self.take_nonce()?;
            let body = key.sign(url, &nonce, kid, payload)?;
            log::debug!("{what}: POST {url}");
            let headers =
                [("Content-Type", JOSE), ("Accept", "application/pem-certificate-chain, application/json")];
            let response = self.http.send(what, "POST", url, &headers, Some(body.as_bytes()))?;
            *self.nonce.borrow_mut() = response.replay_nonce.clone();
            if response.is_success() {
                return Ok(response);
            }
            if problem_type(&response).as_deref() != Some("badNonce") {
                return Err(problem(what, &response));
            }
            log::debug!("{what}: badNonce, signing again with the nonce that came with it");
        }
        Err(Error::temporary(format!("{what}: the CA refused {NONCE_ATTEMPTS} nonces in a row (badNonce)")))
    }

    fn take_nonce(&self) -> Result<String> {
        if let Some(nonce) = self.nonce.borrow_mut().take() {
            return Ok(nonce);
        }
        let url = &self.directory.as_ref().expect("read before any POST").new_nonce;
        let response = self.http.send("ACME newNonce", "HEAD", url, &[], None)?;
        if !response.is_success() {
            return Err(problem("ACME newNonce", &response));
        }
        response.replay_nonce.ok_or_else(|| Error::protocol("ACME newNonce: the answer has no Replay-Nonce"))
    }

    /// `newOrder` for every DNS and IP SAN (§7.4, RFC 8738); a renewal names the certificate it
    /// `replaces` where the CA offers ARI (RFC 9773 §5).
    fn new_order(&mut self, request: &Request, replacing: Option<&Cert>) -> Result<(String, Value)> {
        let dns = request.sans.dns.iter().map(|name| ("dns", name.clone()));
        let ip = request.sans.ip.iter().map(|ip| ("ip", ip.to_string()));
        let identifiers: Vec<Value> = dns
            .chain(ip)
            .map(|(kind, value)| json::object([("type", kind.into()), ("value", value.into())]))
            .collect();
        if identifiers.is_empty() {
            return Err(Error::config("san: ACME orders name DNS or IP identifiers; give san.dns or san.ip"));
        }
        let directory = self.directory()?;
        let url = directory.new_order.clone();
        let replaces = replacing.filter(|_| directory.renewal_info.is_some()).and_then(cert_id);
        let mut members = vec![("identifiers".to_string(), Value::Array(identifiers))];
        if let Some(replaces) = replaces {
            members.push(("replaces".to_string(), replaces.into()));
        }
        let response = match self.post("ACME newOrder", &url, &Value::Object(members.clone()).to_json()) {
            // RFC 9773 §5: a CA that will not take this replacement still takes a plain order.
            Err(e)
                if members.len() > 1
                    && e.answer().is_some_and(|a| a.words.starts_with("alreadyReplaced")) =>
            {
                log::info!("the CA refused the replacement ({}); ordering without it", e.chain_line());
                members.pop();
                self.post("ACME newOrder", &url, &Value::Object(members).to_json())?
            }
            other => other?,
        };
        let order_url = response
            .location
            .clone()
            .ok_or_else(|| Error::protocol("ACME newOrder: the answer has no Location"))?;
        Ok((order_url, crate::backend::parse_json("ACME newOrder", &response)?))
    }

    fn fetch(&mut self, what: &str, url: &str) -> Result<Value> {
        let response = self.post(what, url, "")?;
        self.retry_after = response.retry_after;
        crate::backend::parse_json(what, &response)
    }

    /// Takes the order as far as it goes before `deadline`.
    fn carry_on(
        &mut self,
        order_url: &str,
        mut order: Value,
        csr_der: &[u8],
        deadline: Instant,
    ) -> Result<Progress> {
        // Issuance usually takes well under a second: start short, double up to poll_interval_s.
        let mut pause = FIRST_PAUSE;
        let mut finalized = false;
        loop {
            let status = order.get("status").and_then(Value::as_str).unwrap_or("").to_string();
            match status.as_str() {
                "pending" => {
                    let authorizations = string_list(&order, "authorizations")?;
                    if !self.authorize(&authorizations, deadline)? {
                        return Ok(Progress::Waiting("authorizations pending".into()));
                    }
                }
                "ready" if !finalized => {
                    let finalize = required_str(&order, "finalize", "ACME order")?.to_string();
                    let payload = json::object([("csr", URL_SAFE_NO_PAD.encode(csr_der).into())]).to_json();
                    let response = self.post("ACME finalize", &finalize, &payload)?;
                    self.retry_after = response.retry_after;
                    order = crate::backend::parse_json("ACME finalize", &response)?;
                    finalized = true;
                    continue;
                }
                "ready" | "processing" => {
                    let wait = self.next_pause(&mut pause);
                    if Instant::now() + wait > deadline {
                        return Ok(Progress::Waiting(format!("order {status}")));
                    }
                    std::thread::sleep(wait);
                }
                "valid" => {
                    let certificate = required_str(&order, "certificate", "ACME order")?.to_string();
                    return self.download(&certificate).map(Progress::Issued);
                }
                "invalid" => return Err(invalid("ACME order", &order)),
                other => return Err(Error::protocol(format!("ACME order: unknown status {other:?}"))),
            }
            order = self.fetch("ACME order", order_url)?;
        }
    }

    /// Answers every pending authorization and waits for them; `false` when the deadline came
    /// first.
    fn authorize(&mut self, urls: &[String], deadline: Instant) -> Result<bool> {
        let mut pending = Vec::new();
        for url in urls {
            let authz = self.fetch("ACME authorization", url)?;
            match authz.get("status").and_then(Value::as_str) {
                Some("valid") => {}
                Some("pending") => pending.push((url.clone(), self.pick_challenge(&authz)?)),
                _ => return Err(invalid("ACME authorization", &authz)),
            }
        }
        if pending.is_empty() {
            return Ok(true);
        }
        let answering = self.present(&pending)?;
        let outcome = self.validate(&pending, deadline);
        self.withdraw(answering, &pending);
        outcome
    }

    fn pick_challenge(&self, authz: &Value) -> Result<Offer> {
        match self.settings.challenge {
            Challenge::Http01 { .. } => pick_challenge(authz, "http-01"),
            Challenge::TlsAlpn01 { .. } => pick_challenge(authz, "tls-alpn-01"),
            Challenge::Dns01 { .. } => pick_challenge(authz, "dns-01"),
        }
    }

    fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", self.account.as_ref().expect("account before orders").key.thumbprint())
    }

    /// Puts the answers where the CA will look: the http-01 listener, or the hook's TXT records.
    fn present(&self, pending: &[(String, Offer)]) -> Result<Option<Responder>> {
        match &self.settings.challenge {
            Challenge::Http01 { listen } => {
                let answers: HashMap<String, String> = pending
                    .iter()
                    .map(|(_, o)| (o.token.clone(), self.key_authorization(&o.token)))
                    .collect();
                Responder::http01(*listen, answers).map(Some)
            }
            Challenge::TlsAlpn01 { listen } => {
                let mut answers = Vec::new();
                for (_, offer) in pending {
                    let identifier = Identifier::parse(&offer.kind, &offer.identifier).ok_or_else(|| {
                        Error::protocol(format!(
                            "ACME authorization: identifier {:?} of type {:?}",
                            offer.identifier, offer.kind
                        ))
                    })?;
                    answers.push((identifier, self.key_authorization(&offer.token)));
                }
                Responder::tls_alpn01(*listen, &answers).map(Some)
            }
            Challenge::Dns01 { hook } => {
                for (_, offer) in pending {
                    let txt = challenge::dns01_txt(&self.key_authorization(&offer.token));
                    challenge::run_dns01_hook(hook, "present", &offer.identifier, &txt)?;
                }
                Ok(None)
            }
        }
    }

    fn withdraw(&self, responder: Option<Responder>, pending: &[(String, Offer)]) {
        drop(responder);
        if let Challenge::Dns01 { hook } = &self.settings.challenge {
            for (_, offer) in pending {
                let txt = challenge::dns01_txt(&self.key_authorization(&offer.token));
                if let Err(e) = challenge::run_dns01_hook(hook, "cleanup", &offer.identifier, &txt) {
                    log::warn!("{e}");
                }
            }
        }
    }

    /// Tells the CA to validate (§7.5.1) and polls the authorizations until they are decided.
    fn validate(&mut self, pending: &[(String, Offer)], deadline: Instant) -> Result<bool> {
        for (_, offer) in pending.iter().filter(|(_, o)| !o.answered) {
            self.post("ACME challenge", &offer.url, "{}")?;
        }
        let mut pause = FIRST_PAUSE;
        for (url, offer) in pending {
            loop {
                let authz = self.fetch("ACME authorization", url)?;
                match authz.get("status").and_then(Value::as_str) {
                    Some("valid") => break,
                    Some("pending") => {}
                    _ => {
                        return Err(invalid(&format!("ACME authorization for {}", offer.identifier), &authz))
                    }
                }
                let wait = self.next_pause(&mut pause);
                if Instant::now() + wait > deadline {
                    return Ok(false);
                }
                std::thread::sleep(wait);
            }
        }
        Ok(true)
    }

    /// `application/pem-certificate-chain` (§7.4.2): the leaf, then its issuers.
    fn download(&mut self, url: &str) -> Result<Issued> {
        let response = self.post("ACME certificate download", url, "")?;
        chain_of(&response)
    }

    fn polling(&self) -> Polling {
        self.settings.polling
    }

    /// The CA's Retry-After if it sent one, else `pause`, which doubles up to poll_interval_s.
    fn next_pause(&self, pause: &mut Duration) -> Duration {
        let wait = self.retry_after.map_or(*pause, Duration::from_secs);
        *pause = (*pause * 2).min(Duration::from_secs(self.polling().interval_s));
        wait
    }

    /// Places the order and hands its URL back as the pending request at once (design.md §5
    /// rule 4: recorded before anything is waited for), so a restart at any later instant
    /// carries this order on instead of placing another; [`CaBackend::poll`] then drives it.
    fn order(&mut self, request: &Request, replacing: Option<&Cert>) -> Result<Outcome> {
        let (order_url, order) = self.new_order(request, replacing)?;
        self.placed = Some((order_url.clone(), order));
        Ok(Outcome::Pending { request_id: order_url })
    }
}

/// The challenge of type `wanted` in an authorization (§7.1.4), with a token that is safe to
/// put in a URL path and a DNS name.
pub(crate) fn pick_challenge(authz: &Value, wanted: &str) -> Result<Offer> {
    let identifier =
        authz.get("identifier").and_then(|i| i.get("value")).and_then(Value::as_str).unwrap_or("");
    let kind = authz.get("identifier").and_then(|i| i.get("type")).and_then(Value::as_str).unwrap_or("");
    let challenges = match authz.get("challenges") {
        Some(Value::Array(items)) => items.as_slice(),
        _ => return Err(Error::protocol("ACME authorization: no challenges list")),
    };
    let chosen = challenges.iter().find(|c| c.get("type").and_then(Value::as_str) == Some(wanted));
    let Some(chosen) = chosen else {
        let offered: Vec<&str> =
            challenges.iter().filter_map(|c| c.get("type").and_then(Value::as_str)).collect();
        return Err(Error::refused(format!(
            "ACME authorization for {identifier}: the CA offers no {wanted} challenge (it offers {offered:?}); \
             change ca.challenge"
        )));
    };
    let token = required_str(chosen, "token", "ACME challenge")?;
    // §8.1: tokens are base64url; anything else must not reach a URL path or a DNS name.
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(Error::protocol("ACME challenge: the token is not base64url"));
    }
    Ok(Offer {
        kind: kind.to_string(),
        identifier: identifier.to_string(),
        url: required_str(chosen, "url", "ACME challenge")?.to_string(),
        token: token.to_string(),
        answered: chosen.get("status").and_then(Value::as_str) != Some("pending"),
    })
}

/// One challenge this client answers.
pub(crate) struct Offer {
    /// The identifier's type (`dns`, `ip`) and value.
    kind: String,
    identifier: String,
    url: String,
    token: String,
    /// Already answered (a run before this one posted it).
    answered: bool,
}

impl CaBackend for Acme<'_> {
    fn name(&self) -> &'static str {
        "ACME"
    }

    fn enroll(&mut self, request: &Request) -> Result<Outcome> {
        self.order(request, None)
    }

    /// A new order (§7.4); the current certificate is not a credential in ACME, but with ARI
    /// the order names it as the one it replaces.
    fn renew(&mut self, request: &Request, current: &Current) -> Result<Outcome> {
        self.order(request, Some(current.cert))
    }

    /// RFC 9773 §4: `GET renewalInfo/<certID>`, unauthenticated.
    fn renewal_window(&mut self, cert: &Cert) -> Result<Option<RenewalWindow>> {
        let Some(base) = self.directory()?.renewal_info.clone() else {
            return Ok(None);
        };
        let Some(id) = cert_id(cert) else {
            log::debug!("the certificate has no authorityKeyIdentifier: no ARI certID");
            return Ok(None);
        };
        let what = "ACME renewalInfo";
        let response =
            self.http.send(what, "GET", &format!("{}/{id}", base.trim_end_matches('/')), &[], None)?;
        if !response.is_success() {
            return Err(problem(what, &response));
        }
        read_window(&crate::backend::parse_json(what, &response)?, response.retry_after).map(Some)
    }

    fn credentials(&self) -> Credentials {
        credentials(self.settings)
    }

    fn probe_url(&self) -> String {
        self.settings.directory.clone()
    }

    fn polling(&self) -> Option<Polling> {
        Some(self.settings.polling)
    }

    fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    fn poll(&mut self, order_url: &str, request: &Request, _current: Option<&Current>) -> Result<Poll> {
        let deadline = Instant::now() + Duration::from_secs(self.polling().wait_s);
        // The order this run just placed is known already; one from an earlier run is fetched.
        let placed = self.placed.take().filter(|(url, _)| url == order_url).map(|(_, order)| order);
        let fetched = match placed {
            Some(order) => Ok(order),
            None => self.fetch("ACME order", order_url),
        };
        let order = match fetched {
            Ok(order) => order,
            Err(e) if e.answer().is_some_and(|a| a.status == 404) => return Ok(Poll::Ended(e)),
            Err(e) => return Err(e),
        };
        match self.carry_on(order_url, order, &request.csr.der, deadline) {
            Ok(Progress::Issued(issued)) => Ok(Poll::Issued(issued)),
            Ok(Progress::Waiting(why)) => Ok(Poll::NotYet(why)),
            // The CA decided against this order: the next run starts a new one.
            Err(e) if e.kind() == crate::error::Kind::Refused => Ok(Poll::Ended(e)),
            Err(e) => Err(e),
        }
    }
}

impl crate::backend::Protocol for AcmeSettings {
    fn parse(fields: &mut crate::fields::Fields, allow_http: bool) -> Result<Self> {
        config::parse(fields, allow_http)
    }

    fn client(&self, http: Http) -> Box<dyn CaBackend + '_> {
        Box::new(Acme::new(self, http))
    }

    fn credentials(&self) -> Credentials {
        credentials(self)
    }

    fn suggests_renewal_time(&self) -> bool {
        true
    }

    fn use_state_dir(&mut self, state_dir: &std::path::Path) {
        if self.account_key_file.is_none() {
            self.account_key_file = Some(state_dir.join("acme").join("account.key"));
        }
    }
}

/// RFC 9773 §4.1: base64url(authorityKeyIdentifier.keyIdentifier) "." base64url(serial octets).
fn cert_id(cert: &Cert) -> Option<String> {
    let aki = cert.authority_key_id()?;
    Some(format!("{}.{}", URL_SAFE_NO_PAD.encode(aki), URL_SAFE_NO_PAD.encode(cert.serial_bytes())))
}

/// `{"suggestedWindow": {"start", "end"}}` (RFC 9773 §4.2): RFC 3339 times, start before end.
pub(crate) fn read_window(value: &Value, retry_after_s: Option<u64>) -> Result<RenewalWindow> {
    let window = value.get("suggestedWindow");
    let time = |name: &str| {
        window
            .and_then(|w| w.get(name))
            .and_then(Value::as_str)
            .and_then(crate::time::parse_rfc3339)
            .ok_or_else(|| {
                Error::protocol(format!("ACME renewalInfo: suggestedWindow.{name} is not an RFC 3339 time"))
            })
    };
    let (start, end) = (time("start")?, time("end")?);
    if end < start {
        return Err(Error::protocol("ACME renewalInfo: the suggested window ends before it starts"));
    }
    Ok(RenewalWindow { start, end, retry_after_s })
}

/// `application/pem-certificate-chain` (§7.4.2): the leaf, then its issuers.
pub(crate) fn chain_of(response: &Response) -> Result<Issued> {
    let text = std::str::from_utf8(&response.body)
        .map_err(|_| Error::protocol("ACME certificate download: the chain is not PEM text"))?;
    let certs = crate::pki::parse_pem_certs(text).map_err(|e| e.context("ACME certificate download"))?;
    crate::pki::sort_returned(certs, None)
}

pub(crate) fn read_directory(value: &Value) -> Result<Directory> {
    let url = |name: &str| required_str(value, name, "ACME directory").map(str::to_string);
    let meta = value.get("meta");
    Ok(Directory {
        new_nonce: url("newNonce")?,
        new_account: url("newAccount")?,
        new_order: url("newOrder")?,
        renewal_info: value.get("renewalInfo").and_then(Value::as_str).map(str::to_string),
        terms_of_service: meta
            .and_then(|m| m.get("termsOfService"))
            .and_then(Value::as_str)
            .map(str::to_string),
        eab_required: meta
            .and_then(|m| m.get("externalAccountRequired"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

pub(crate) fn required_str<'v>(value: &'v Value, field: &str, what: &str) -> Result<&'v str> {
    value
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::protocol(format!("{what}: the answer has no {field}")))
}

pub(crate) fn string_list(value: &Value, field: &str) -> Result<Vec<String>> {
    match value.get(field) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::protocol(format!("ACME order: {field} holds a non-string"))),
        _ => Err(Error::protocol(format!("ACME order: the answer has no {field} list"))),
    }
}

/// The short type of a problem document (§6.7): `badNonce` for
/// `urn:ietf:params:acme:error:badNonce`.
pub(crate) fn problem_type(response: &Response) -> Option<String> {
    let value = json::parse(&response.body).ok()?;
    let full = value.get("type")?.as_str()?;
    Some(full.strip_prefix(PROBLEM_PREFIX).unwrap_or(full).to_string())
}

/// A problem document as an error of the right class, keeping the CA's words (§6.7).
pub(crate) fn problem(what: &str, response: &Response) -> Error {
    let parsed = json::parse(&response.body).ok();
    let detail =
        parsed.as_ref().and_then(|v| v.get("detail")).and_then(Value::as_str).map(crate::http::excerpt);
    let kind = problem_type(response);
    let words = match (&kind, &detail) {
        (Some(kind), Some(detail)) => format!("{kind}: {detail}"),
        (Some(kind), None) => kind.clone(),
        _ => response.excerpt(),
    };
    let message = format!("{what}: HTTP {}: {words}", response.status);
    let error = match (response.status, kind.as_deref()) {
        (429, _) | (500..=599, _) | (_, Some("rateLimited" | "serverInternal" | "badNonce")) => {
            Error::temporary(message).with_retry_after(response.retry_after)
        }
        (
            _,
            Some(
                "unauthorized"
                | "rejectedIdentifier"
                | "caa"
                | "badCSR"
                | "externalAccountRequired"
                | "userActionRequired"
                | "accountDoesNotExist"
                | "unsupportedIdentifier"
                | "badPublicKey"
                | "badRevocationReason"
                | "alreadyRevoked"
                | "orderNotReady"
                | "connection"
                | "dns"
                | "tls"
                | "incorrectResponse",
            ),
        ) => Error::refused(message),
        (401 | 403, _) => Error::refused(message),
        _ => Error::protocol(message),
    };
    error.with_answer(response.status, None, &words)
}

/// An order or authorization the CA marked invalid: refused, with the CA's reason.
pub(crate) fn invalid(what: &str, value: &Value) -> Error {
    let status = value.get("status").and_then(Value::as_str).unwrap_or("missing");
    let mut reasons: Vec<String> = Vec::new();
    if let Some(detail) = value.get("error").and_then(|e| e.get("detail")).and_then(Value::as_str) {
        reasons.push(detail.to_string());
    }
    if let Some(Value::Array(challenges)) = value.get("challenges") {
        for c in challenges {
            if let Some(detail) = c.get("error").and_then(|e| e.get("detail")).and_then(Value::as_str) {
                reasons.push(detail.to_string());
            }
        }
    }
    let why = if reasons.is_empty() {
        String::new()
    } else {
        format!(": {}", crate::http::excerpt(&reasons.join("; ")))
    };
    Error::refused(format!("{what} is {status}{why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: &str, end: &str) -> Result<RenewalWindow> {
        let text = format!(r#"{{"suggestedWindow": {{"start": "{start}", "end": "{end}"}}}}"#);
        read_window(&crate::json::parse(text.as_bytes()).unwrap(), Some(3600))
    }

    #[test]
    fn ari_windows_must_be_rfc3339_and_forwards() {
        let ok = window("2027-01-01T00:00:00Z", "2027-01-02T00:00:00Z").unwrap();
        assert_eq!((ok.end - ok.start, ok.retry_after_s), (86_400, Some(3600)));
        let backwards = window("2027-01-02T00:00:00Z", "2027-01-01T00:00:00Z").unwrap_err();
        assert_eq!(backwards.kind().exit_code(), 76);
        assert!(backwards.to_string().contains("the suggested window ends before it starts"));
        let garbled = window("tomorrow", "2027-01-01T00:00:00Z").unwrap_err();
        assert!(garbled.to_string().contains("suggestedWindow.start is not an RFC 3339 time"));
        let missing = read_window(&crate::json::parse(b"{}").unwrap(), None).unwrap_err();
        assert_eq!(missing.kind().exit_code(), 76);
    }
}
