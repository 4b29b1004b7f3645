//! The boundary to the vendor CAs (design.md §9 "Upstream outcomes"). The gateway calls an
//! [`Upstream`] for each label; the vendor clients (EnOS, EZCA, Sectigo, Securosys) come from
//! the shared CA crate (`enroll-ca`) and are wired in [`build_upstream`] (`upstream/ca.rs`).
//! Calls are blocking: the server runs them on tokio's blocking pool, a bounded number at once.

mod ca;

use crate::config::UpstreamSettings;
use crate::store::IssuedRecord;
use std::sync::Arc;

/// What the gateway asks upstream for: one CSR that passed authentication and policy.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamRequest<'a> {
    /// The EST label (`/.well-known/est/<label>/…`).
    pub label: &'a str,
    /// The authenticated device id, for `{device}` in the label's `ca` block.
    pub device_id: &'a str,
    /// The CSR as the device sent it (DER PKCS#10); subject and SANs are sent upstream as they are.
    pub csr_der: &'a [u8],
    /// For `simplereenroll`: the stored record of the certificate being renewed (its upstream
    /// reference selects the vendor's renewal call), when the gateway issued it.
    pub renewal_of: Option<&'a IssuedRecord>,
}

/// A vendor answer that is not an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// The certificate (DER), its chain (DER, not sent to the device: that is `cacerts`), and
    /// the vendor's reference for it (EnOS certSN, Sectigo sslId), kept for renewals.
    Issued { cert_der: Vec<u8>, chain_der: Vec<Vec<u8>>, upstream_ref: Option<String> },
    /// Accepted, decision later (approval): poll with `upstream_ref` after `retry_after_s`.
    Pending { upstream_ref: String, retry_after_s: u64 },
}

/// A vendor failure, in the vendor's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamError {
    /// The vendor refused the request (policy, authorization): 403 with these words.
    Refused(String),
    /// The vendor could not be reached or failed temporarily: 503 + Retry-After. The request was
    /// not taken by the vendor, so a retry may submit it again.
    Unavailable { message: String, retry_after_s: Option<u64> },
    /// The vendor answered something unusable: 502.
    Protocol(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Refused(m) => write!(f, "refused: {m}"),
            UpstreamError::Unavailable { message, .. } => write!(f, "unavailable: {message}"),
            UpstreamError::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// One vendor CA behind one label. Blocking; called from the blocking pool.
pub trait Upstream: Send + Sync {
    /// Forwards a CSR. Called at most once per (label, CSR) over the whole fleet of replicas.
    fn submit(&self, req: &UpstreamRequest<'_>) -> Result<UpstreamOutcome, UpstreamError>;
    /// Asks about a request that [`Upstream::submit`] or an earlier poll answered `Pending`.
    fn poll(&self, upstream_ref: &str, req: &UpstreamRequest<'_>) -> Result<UpstreamOutcome, UpstreamError>;
    /// `check --online`: reach the vendor (authenticate) without issuing anything.
    fn check(&self) -> Result<(), UpstreamError> {
        Ok(())
    }
}

/// Builds the upstream of one label from its `ca` block (the agent's `ca` block, design.md §3,
/// §7) with the shared CA crate's client for `enos`, `ezca`, `sectigo` or `securosys`, reached
/// as `upstream` says. Tests and embedders may pass upstreams to
/// [`crate::server::ServerBuilder::upstream`] instead.
pub fn build_upstream(
    label: &str,
    ca: &serde_json::Value,
    settings: &UpstreamSettings,
) -> Result<Arc<dyn Upstream>, String> {
    let transport = ca::transport(settings)?;
    Ok(ca::CaUpstream::new(label, ca, transport)?)
}
