//! CA emulators for enroll-agent's end-to-end tests (design.md §6).
//!
//! One HTTPS server on 127.0.0.1 hosts:
//! - EnOS (protocols.md §1): `/apim-token-service/v2.0/token/{get,refresh}`,
//!   `/connect-service/v2.0/certificates?action={apply,renew}`, `/enos/CA/cacert/{RSA,ECC}`;
//! - EZCA (protocols.md §2): `/{tenant}/oauth2/v2.0/token` (Entra client credentials),
//!   `/api/CA/RequestSSLCertificateV2`, `/api/Certificates/RenewCertificate{V3,V2}`;
//! - control: `POST|GET|DELETE /_emulator/fault`, `GET /_emulator/log` (JSON lines).
//!
//! Certificates are real: signed by CAs generated at start-up ([`pki`]). Authentication is
//! checked as documented (EnOS token + request signature, EZCA bearer / certificate JWT).
//! Faults ([`Fault`]) make the CAs misbehave on demand.

#![forbid(unsafe_code)]

pub mod client;
pub mod emulator;
pub mod enos;
pub mod ezca;
pub mod fault;
pub mod pki;
pub mod server;
pub mod util;

pub use emulator::{Emulator, LoggedRequest, Options};
pub use enos::EnosConfig;
pub use ezca::EzcaConfig;
pub use fault::Fault;

#[cfg(test)]
mod selftest;
