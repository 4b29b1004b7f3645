//! The CA seam: one trait, one file per CA, one factory.
//!
//! A backend turns a signed CSR into an [`Outcome`]: a certificate, or (for asynchronous CAs) a
//! pending request id the lifecycle records before waiting. Backends keep the CA's own error
//! words and classify them into the exit codes of design.md §2.

use std::sync::Arc;

use enroll_hal::{Algorithm, DeviceKey};

use crate::config::{Backend, Polling, Sans, Settings, Subject};
use crate::csr::Csr;
use crate::error::Result;
use crate::http::Http;
use crate::pki::{Cert, Issued};

// One client per protocol, each compiled only with its cargo feature (design.md §8).
#[cfg(feature = "enos")]
pub mod enos;
#[cfg(feature = "est")]
pub mod est;
#[cfg(feature = "ezca")]
pub mod ezca;
#[cfg(feature = "sectigo")]
pub mod sectigo;
#[cfg(feature = "securosys")]
pub mod securosys;

/// What the backend needs to know about the request besides the CSR.
pub struct Request<'a> {
    pub csr: &'a Csr,
    pub algorithm: Algorithm,
    pub subject: &'a Subject,
    pub sans: &'a Sans,
}

/// The identity being renewed: the credential for CAs that accept it.
pub struct Current<'a> {
    pub cert: &'a Cert,
    pub key: Arc<dyn DeviceKey>,
    /// The intermediates installed after it in chain.pem (sent with it for TLS client auth).
    pub chain: Vec<Vec<u8>>,
    /// The CA's handle recorded at issue time (EnOS certSN).
    pub ca_ref: Option<&'a str>,
}

pub enum Outcome {
    Issued(Issued),
    /// The CA accepted the request and will answer later (Sectigo, Securosys approval, …): the
    /// lifecycle records the id in state.json before the first [`CaBackend::poll`].
    Pending {
        request_id: String,
    },
}

/// The answer to "is request X ready?".
pub enum Poll {
    Issued(Issued),
    /// Not yet; the CA's own words, for the log.
    NotYet(String),
    /// The CA will never issue for this request (rejected, expired, cancelled, revoked): the
    /// request is dropped from state.json and the error reported; the next run starts anew.
    Ended(crate::error::Error),
}

/// Which credential a backend uses for what (shown by `status`, documented in README).
pub struct Credentials {
    pub enroll: &'static str,
    pub renew: &'static str,
}

pub trait CaBackend {
    fn name(&self) -> &'static str;
    /// First enrollment with the bootstrap credential.
    fn enroll(&mut self, request: &Request) -> Result<Outcome>;
    /// Renewal, authenticated with the current identity wherever the CA allows.
    fn renew(&mut self, request: &Request, current: &Current) -> Result<Outcome>;
    fn credentials(&self) -> Credentials;
    /// The URL `check --online` probes.
    fn probe_url(&self) -> String;
    /// How to poll, for asynchronous CAs; `None` for CAs that always answer at once.
    fn polling(&self) -> Option<Polling> {
        None
    }
    /// How long the CA asked us to wait before asking again (`Retry-After` of its last answer);
    /// it wins over `poll_interval_s`.
    fn retry_after(&self) -> Option<u64> {
        None
    }
    /// Asks about a request this CA accepted earlier (only called when `polling` is `Some`).
    /// `request` is the original request (its identical CSR, kept in the pending slot), for CAs
    /// that poll by sending it again (EST); `current` is the identity being renewed, if any.
    fn poll(&mut self, request_id: &str, _request: &Request, _current: Option<&Current>) -> Result<Poll> {
        Err(crate::error::Error::new(
            crate::error::Kind::Internal,
            format!("{} has no pending requests to poll (request {request_id})", self.name()),
        ))
    }
    /// Withdraws a request the agent gives up on, where the API can (best effort).
    fn cancel(&mut self, _request_id: &str) -> Result<()> {
        Ok(())
    }
}

/// Builds the configured backend; a protocol not compiled in is the 78 that parsing already gave.
pub fn from_settings(settings: &Settings, http: Http) -> Result<Box<dyn CaBackend + '_>> {
    match &settings.ca {
        #[cfg(feature = "enos")]
        Backend::Enos(enos) => Ok(Box::new(enos::Enos::new(enos, http))),
        #[cfg(feature = "ezca")]
        Backend::Ezca(ezca) => Ok(Box::new(ezca::Ezca::new(ezca, http))),
        #[cfg(feature = "sectigo")]
        Backend::Sectigo(sectigo) => Ok(Box::new(sectigo::Sectigo::new(sectigo, http))),
        #[cfg(feature = "securosys")]
        Backend::Securosys(securosys) => Ok(Box::new(securosys::Securosys::new(securosys, http))),
        #[cfg(feature = "est")]
        Backend::Est(est) => Ok(Box::new(est::Est::new(est, &settings.tls, http))),
        #[cfg(not(all(
            feature = "enos",
            feature = "ezca",
            feature = "sectigo",
            feature = "securosys",
            feature = "est"
        )))]
        other => {
            drop(http);
            Err(crate::config::not_compiled(Backend::name(other)))
        }
    }
}

/// Static description without building a client (for `status`).
pub fn credentials_of(settings: &Settings) -> Credentials {
    match &settings.ca {
        #[cfg(feature = "enos")]
        Backend::Enos(_) => enos::CREDENTIALS,
        #[cfg(feature = "ezca")]
        Backend::Ezca(ezca) => ezca::credentials(ezca),
        #[cfg(feature = "sectigo")]
        Backend::Sectigo(_) => sectigo::CREDENTIALS,
        #[cfg(feature = "securosys")]
        Backend::Securosys(securosys) => securosys::credentials(securosys),
        #[cfg(feature = "est")]
        Backend::Est(est) => est::credentials(est),
        #[cfg(not(all(
            feature = "enos",
            feature = "ezca",
            feature = "sectigo",
            feature = "securosys",
            feature = "est"
        )))]
        // Not reached: a config naming a protocol this build lacks is refused when parsed.
        _ => Credentials { enroll: "not compiled into this build", renew: "not compiled into this build" },
    }
}

/// Reads a JSON body, naming the step.
pub fn parse_json(what: &str, response: &crate::http::Response) -> Result<crate::json::Value> {
    crate::json::parse(&response.body).map_err(|e| {
        crate::error::Error::protocol(format!(
            "{what}: HTTP {} with a body that is not valid JSON",
            response.status
        ))
        .with_source(e)
    })
}

/// Reads one PEM certificate out of a JSON field.
pub fn pem_field(what: &str, value: &crate::json::Value, field: &str) -> Result<Vec<Vec<u8>>> {
    let Some(text) = value.get(field).and_then(|v| v.as_str()) else {
        return Err(crate::error::Error::protocol(format!("{what}: the answer has no {field}")));
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let certs = crate::pki::parse_pem_certs(text).map_err(|e| e.context(format!("{what}: {field}")))?;
    if certs.is_empty() {
        return Err(crate::error::Error::protocol(format!("{what}: {field} holds no certificate")));
    }
    Ok(certs.into_iter().map(|c| c.der).collect())
}
