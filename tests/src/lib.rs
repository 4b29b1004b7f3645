//! CA emulators for enroll-agent's end-to-end tests (design.md §6).
//!
//! One HTTPS server on 127.0.0.1 hosts:
//! - EnOS (protocols.md §1): `/apim-token-service/v2.0/token/{get,refresh}`,
//!   `/connect-service/v2.0/certificates?action={apply,renew}`, `/enos/CA/cacert/{RSA,ECC}`;
//! - EZCA (protocols.md §2): `/{tenant}/oauth2/v2.0/token` (Entra client credentials),
//!   `/api/CA/RequestSSLCertificateV2`, `/api/Certificates/RenewCertificate{V3,V2}`;
//! - Sectigo SCM (protocols.md §3): `/api/ssl/v1/{enroll,collect/…,renewById/…,revoke/…,types}`
//!   and `GET /api/ssl/v1/{sslId}`, authenticated by the `login`/`password`/`customerUri` headers;
//! - Securosys TSB (protocols.md §4): `/v1/certificate/synchronous/sign`, `/v1/certificate/sign`,
//!   `GET|DELETE /v1/request/{id}` with JWT bearer and `X-API-KEY`;
//! - Redtrust (protocols.md §5): HMAC partner login `/authclient/auth/loginrequest`,
//!   `/authapi/v1/{login_by_temp_token,refresh-token,logout}`, `/raapi/v{1,2}/csr/create`,
//!   `/raapi/v1/csr/finalize` (server-side RSA keys);
//! - EST (RFC 7030 + RFC 8951, protocols.md §6.1): `/.well-known/est[/<label>]/{cacerts,
//!   simpleenroll,simplereenroll}` with HTTP Basic or factory / device TLS client certificates;
//! - ACME (RFC 8555 + RFC 9773 ARI, protocols.md §6.3): `/acme/{directory,new-nonce,new-account,
//!   new-order,order/…,authz/…,chall/…,finalize/…,cert/…,renewal-info/…}`, JWS-verified;
//! - SCEP (RFC 8894, protocols.md §6.2): `/scep?operation={GetCACaps,GetCACert,PKIOperation}`
//!   with its own RSA-2048 CA; CMS signatures and envelopes checked, challengePassword, PENDING
//!   and CertPoll;
//! - control: `POST|GET|DELETE /_emulator/fault`, `POST|GET /_emulator/pending-polls`,
//!   `GET /_emulator/log` (JSON lines).
//!
//! Certificates are real: signed by CAs generated at start-up ([`pki`]). Authentication is
//! checked as documented (EnOS token + request signature, EZCA bearer / certificate JWT,
//! Sectigo headers, Securosys JWT / API key, Redtrust HMAC).
//! Faults ([`Fault`]) make the CAs misbehave on demand.

#![forbid(unsafe_code)]

pub mod acme;
pub mod client;
pub mod emulator;
pub mod enos;
pub mod est;
pub mod ezca;
pub mod fault;
pub mod pki;
pub mod redtrust;
pub mod scep;
pub mod sectigo;
pub mod securosys;
pub mod server;
pub mod util;

pub use acme::AcmeConfig;
pub use emulator::{Emulator, LoggedRequest, Options};
pub use enos::EnosConfig;
pub use est::{EstAuth, EstConfig};
pub use ezca::EzcaConfig;
pub use fault::Fault;
pub use redtrust::RedtrustConfig;
pub use scep::{ScepCipher, ScepConfig, ScepMessage};
pub use sectigo::SectigoConfig;
pub use securosys::SecurosysConfig;

#[cfg(test)]
mod selftest;
#[cfg(test)]
mod selftest_est;
#[cfg(test)]
mod selftest_scep;
