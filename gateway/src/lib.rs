//! enroll-gateway: an EST (RFC 7030) registration authority in front of the vendor CA APIs
//! (design.md §9). Devices speak EST to it; it authenticates them (factory certificate, one-time
//! token, or their current certificate), applies the label's policy, forwards each CSR upstream
//! exactly once and records every decision.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod error;
pub mod est;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod store;
pub mod upstream;
