//! enroll-ca: one client per CA protocol, shared by the device agent and the gateway
//! (design.md §8).
//!
//! Each protocol is a folder with its `ca` block (`config.rs`, read with [`fields::Fields`]) and
//! its client (`mod.rs`, a [`backend::CaBackend`]); [`backend::Backend`] is the parsed block and
//! builds the client. Below them: [`http`] and [`tls`] (a [`tls::Transport`] per program, with its
//! own [`time::Clock`]: nothing transport-related is process-global), [`pki`] (certificates and
//! the checks every issued one passes), [`csr`] and [`subject`] (X.509 requests and names),
//! [`error`] (the exit-code classes and what the CA said).

pub mod backend;
pub mod csr;
pub mod error;
pub mod fields;
pub mod files;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz;
pub mod http;
pub mod json;
#[cfg(feature = "est")]
pub mod pkcs7;
pub mod pki;
pub mod secret;
pub mod subject;
pub mod time;
pub mod tls;
pub mod tokens;

#[cfg(feature = "acme")]
pub mod acme;
#[cfg(feature = "enos")]
pub mod enos;
#[cfg(feature = "est")]
pub mod est;
#[cfg(feature = "ezca")]
pub mod ezca;
#[cfg(feature = "redtrust")]
pub mod redtrust;
#[cfg(feature = "scep")]
pub mod scep;
#[cfg(feature = "sectigo")]
pub mod sectigo;
#[cfg(feature = "securosys")]
pub mod securosys;
