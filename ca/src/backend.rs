//! The CA seam: one trait, one folder per protocol, and [`Backend`], the `ca` block that builds
//! the client.
//!
//! A backend turns a signed CSR into an [`Outcome`]: a certificate, or (for asynchronous CAs) a
//! pending request id the lifecycle records before waiting. Backends keep the CA's own error
//! words and classify them into the exit codes of design.md §2.

use std::sync::Arc;

use enroll_hal::{Algorithm, DeviceKey};

use crate::csr::Csr;
use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::http::Http;
use crate::pki::{Cert, Issued};
use crate::subject::{Sans, Subject};

/// What the backend needs to know about the request besides the CSR.
pub struct Request<'a> {
    pub csr: &'a Csr,
    /// The key the CSR is for, where the caller holds it (SCEP signs and decrypts with it); the
    /// gateway, which only has a device's CSR, has none.
    pub key: Option<Arc<dyn DeviceKey>>,
    pub algorithm: Algorithm,
    pub subject: &'a Subject,
    pub sans: &'a Sans,
}

/// The identity being renewed: the credential for CAs that accept it.
pub struct Current<'a> {
    pub cert: &'a Cert,
    /// The certificate's key, signing in place; `None` where the caller does not hold it (the
    /// gateway renews on a device's behalf through the vendor's renewal call).
    pub key: Option<Arc<dyn DeviceKey>>,
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
    /// What protects this protocol's messages over plain `http://`, for protocols that are
    /// secure without TLS (SCEP); `None`: plain http is unprotected (a lab setting).
    fn plain_http_protection(&self) -> Option<&'static str> {
        None
    }
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
    /// The CA's suggested renewal window for `cert` (ACME ARI, RFC 9773), where the CA offers
    /// one; only asked when [`Protocol::suggests_renewal_time`] says so.
    fn renewal_window(&mut self, _cert: &Cert) -> Result<Option<RenewalWindow>> {
        Ok(None)
    }
}

/// When the CA would like a certificate renewed (RFC 9773 §4.2), and when to ask again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalWindow {
    pub start: u64,
    pub end: u64,
    /// The answer's `Retry-After`, in seconds.
    pub retry_after_s: Option<u64>,
}

/// A service that generates and keeps the device's key (Redtrust): it makes the CSR and takes
/// the issued certificate back. Which CA issues is the `ca` block's business, as for any key.
pub trait RemoteKeyService {
    /// The service's name in messages ("Redtrust").
    fn name(&self) -> &'static str;
    /// Has the service generate a key and a CSR for `subject`; `renewing` is the certificate the
    /// new one replaces. The handle ties the later [`RemoteKeyService::finalize`] to this request;
    /// the lifecycle keeps it in state.json across restarts.
    fn create(&mut self, subject: &Subject, renewing: Option<&Cert>) -> Result<RemoteRequest>;
    /// Hands the issued certificate back; answers the URI that names the key (`key.uri`).
    fn finalize(&mut self, handle: &str, leaf: &Cert) -> Result<String>;
    /// Ends the session (best effort).
    fn end(&mut self) {}
}

/// What [`RemoteKeyService::create`] answered.
pub struct RemoteRequest {
    pub handle: String,
    pub csr_der: Vec<u8>,
}

/// The current key, for the CAs whose renewal it must sign (EST over TLS, EZCA's token).
pub fn current_key(current: &Current, what: &str) -> Result<Arc<dyn DeviceKey>> {
    current.key.clone().ok_or_else(|| {
        Error::refused(format!(
            "{what} is signed with the current certificate's key, which this caller does not hold"
        ))
    })
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

/// What a protocol's `ca` block offers: implemented by each protocol's settings type (in its
/// folder's `config.rs`), which is then listed once in [`protocols!`] below.
pub trait Protocol: std::fmt::Debug {
    /// Reads the block's fields (`backend` has been read already).
    fn parse(fields: &mut Fields, allow_http: bool) -> Result<Self>
    where
        Self: Sized;
    /// The client for this block, talking through `http`.
    fn client(&self, http: Http) -> Box<dyn CaBackend + '_>;
    /// Which credential this block uses for what (for `status`, without building a client).
    fn credentials(&self) -> Credentials;
    /// Whether a key of `algorithm` can serve this CA (`remote`: it cannot sign on the device,
    /// as a Redtrust key); the 78 names the field to change.
    fn check_key(&self, _algorithm: Algorithm, _remote: bool) -> Result<()> {
        Ok(())
    }
    /// Where this program keeps its state (the agent's `state_dir`), for protocols that keep
    /// files of their own there (the ACME account key).
    fn use_state_dir(&mut self, _state_dir: &std::path::Path) {}
    /// Whether this CA may suggest renewal times ([`CaBackend::renewal_window`]); the agent
    /// then asks before deciding that a renewal is not due yet.
    fn suggests_renewal_time(&self) -> bool {
        false
    }
}

/// Makes [`Backend`] and the protocol lists from one line per protocol: its name (= its cargo
/// feature and `ca.backend` value), its variant and its settings type.
macro_rules! protocols {
    ($($name:literal => $variant:ident($settings:ty)),* $(,)?) => {
        /// The CA protocol and its block (the `ca` object of the agent's config, and of each
        /// gateway label). A variant exists only with its protocol's cargo feature; a config
        /// naming one that is not compiled in is refused while parsing ([`check_protocol`]).
        #[derive(Debug)]
        pub enum Backend {
            $( #[cfg(feature = $name)] $variant($settings), )*
        }

        /// Every CA protocol this version implements; each one's cargo feature has its name.
        pub const PROTOCOLS: &[&str] = &[$($name),*];

        /// The CA protocols compiled into this build (`--version`).
        pub fn protocols() -> Vec<&'static str> {
            let compiled = [$(cfg!(feature = $name)),*];
            PROTOCOLS.iter().copied().zip(compiled).filter_map(|(name, on)| on.then_some(name)).collect()
        }

        // A build without any protocol has no variants: nothing here can run.
        #[cfg_attr(not(any($(feature = $name),*)), allow(unused_variables, unreachable_code))]
        impl Backend {
            /// The block of the protocol called `name`, if this build has it.
            fn parse_named(name: &str, fields: &mut Fields, allow_http: bool) -> Option<Result<Backend>> {
                match name {
                    $( #[cfg(feature = $name)]
                    $name => Some(<$settings as Protocol>::parse(fields, allow_http).map(Backend::$variant)), )*
                    _ => None,
                }
            }

            pub fn name(&self) -> &'static str {
                match *self {
                    $( #[cfg(feature = $name)] Backend::$variant(_) => $name, )*
                }
            }

            /// The protocol's own side of this block.
            fn protocol(&self) -> &dyn Protocol {
                match *self {
                    $( #[cfg(feature = $name)] Backend::$variant(ref settings) => settings, )*
                }
            }

            fn protocol_mut(&mut self) -> &mut dyn Protocol {
                match *self {
                    $( #[cfg(feature = $name)] Backend::$variant(ref mut settings) => settings, )*
                }
            }
        }
    };
}

protocols! {
    "enos" => Enos(crate::enos::EnosSettings),
    "ezca" => Ezca(crate::ezca::EzcaSettings),
    "sectigo" => Sectigo(crate::sectigo::SectigoSettings),
    "securosys" => Securosys(crate::securosys::SecurosysSettings),
    "est" => Est(crate::est::EstSettings),
    "acme" => Acme(crate::acme::AcmeSettings),
    "scep" => Scep(crate::scep::ScepSettings),
}

impl Backend {
    /// Reads a `ca` block (`fields` is that object): `backend` picks the protocol, whose own
    /// module reads the rest. `allow_http`: `tls.danger_allow_http`.
    pub fn parse(mut fields: Fields, allow_http: bool) -> Result<Backend> {
        let name = fields.required_string("backend")?;
        // Before the block's fields: they are another protocol's business in this build.
        check_protocol(&name, &protocols())?;
        let backend = match Backend::parse_named(&name, &mut fields, allow_http) {
            Some(parsed) => parsed?,
            None => {
                let known: Vec<String> = PROTOCOLS.iter().map(|p| format!("{p:?}")).collect();
                return Err(Error::config(format!(
                    "ca.backend: {name:?} is not one of {}",
                    known.join(", ")
                )));
            }
        };
        fields.finish()?;
        Ok(backend)
    }

    /// The client for this block, talking through `http`.
    pub fn client(&self, http: Http) -> Box<dyn CaBackend + '_> {
        self.protocol().client(http)
    }

    /// Which credential this block uses for what, without building a client (for `status`).
    pub fn credentials(&self) -> Credentials {
        self.protocol().credentials()
    }

    /// Whether a key of `algorithm` can serve this CA (`remote`: a key that cannot sign on the
    /// device, as Redtrust's); the 78 names the field to change.
    pub fn check_key(&self, algorithm: Algorithm, remote: bool) -> Result<()> {
        self.protocol().check_key(algorithm, remote)
    }

    /// See [`Protocol::suggests_renewal_time`].
    pub fn suggests_renewal_time(&self) -> bool {
        self.protocol().suggests_renewal_time()
    }

    /// Tells the protocol where the program keeps its state (see [`Protocol::use_state_dir`]).
    pub fn use_state_dir(&mut self, state_dir: &std::path::Path) {
        self.protocol_mut().use_state_dir(state_dir)
    }
}

/// The 78 for a known protocol missing from `compiled` (this build's [`protocols`]), naming the
/// cargo feature that would bring it in. Names that are not protocols are left to the caller.
pub fn check_protocol(name: &str, compiled: &[&str]) -> Result<()> {
    if PROTOCOLS.contains(&name) && !compiled.contains(&name) {
        return Err(not_compiled(name));
    }
    Ok(())
}

/// `ca.backend: "<name>" is not compiled into this build (cargo feature <name>)` (design.md §8).
pub fn not_compiled(name: &str) -> Error {
    Error::config(format!("ca.backend: {name:?} is not compiled into this build (cargo feature {name})"))
}

/// How an asynchronous CA is polled (design.md §7 "Lifecycle").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Polling {
    /// First pause between polls; later pauses double up to `MAX_POLL_INTERVAL_S`.
    pub interval_s: u64,
    /// How long one `enroll`/`renew` invocation waits before exiting 75 (the request is kept).
    pub wait_s: u64,
    /// Counted from the request's creation: past it the request is abandoned.
    pub timeout_s: u64,
}

/// The most a poll pause grows to (protocols.md §3.5 suggests a 5-minute cap).
pub const MAX_POLL_INTERVAL_S: u64 = 300;

pub fn parse_polling(fields: &mut Fields, interval_s: u64, timeout_s: u64) -> Result<Polling> {
    let polling = Polling {
        interval_s: fields.positive("poll_interval_s")?.unwrap_or(interval_s),
        wait_s: fields.positive("poll_wait_s")?.unwrap_or(120),
        timeout_s: fields.positive("poll_timeout_s")?.unwrap_or(timeout_s),
    };
    if polling.timeout_s < polling.interval_s {
        return Err(Error::config(format!(
            "{}: must not be smaller than poll_interval_s",
            fields.path_of("poll_timeout_s")
        )));
    }
    Ok(polling)
}
