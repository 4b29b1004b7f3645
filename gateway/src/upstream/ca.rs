//! A label's `ca` block as an [`Upstream`]: the shared CA crate's client for that block
//! (design.md §9), the same code the agent runs. The block is parsed again for each request
//! with `{device}` replaced by the authenticated device id (secret files are read then, so a
//! rotated secret needs no restart); a pending request is polled with the vendor's own request
//! id, and a renewal names the certificate by the vendor's reference (EnOS certSN, Sectigo sslId).

use std::sync::Arc;

use enroll_ca::backend::{Backend, CaBackend, Current, Outcome, Poll};
use enroll_ca::csr::Received;
use enroll_ca::error::{Error, Kind};
use enroll_ca::fields::Fields;
use enroll_ca::http::Http;
use enroll_ca::pki::{Cert, Issued};
use enroll_ca::time::Clock;
use enroll_ca::tls::Transport;

use super::{Upstream, UpstreamError, UpstreamOutcome, UpstreamRequest};
use crate::config::UpstreamSettings;

/// The protocols a label may forward to: the vendor APIs. EST renews over TLS with the device's
/// own key, which the gateway never holds.
pub const UPSTREAM_PROTOCOLS: [&str; 4] = ["enos", "ezca", "sectigo", "securosys"];

/// How long a device is told to wait when the vendor gave no Retry-After for a pending request
/// and its block no poll interval.
const DEFAULT_RETRY_AFTER_S: u64 = 60;

/// The device id the block is checked with at start (`check`, `serve`), before any request.
const PROBE_DEVICE: &str = "device-id";

pub struct CaUpstream {
    label: String,
    /// The block as configured; `{device}` is replaced per request.
    block: serde_json::Value,
    /// One HTTP client for every request of this label: its clones share the connection pool
    /// and the vendor access tokens (one EnOS token per label, not one per request).
    http: Http,
}

/// The transport of one upstream: `upstream.trust_bundle` (else the system roots), its own clock
/// (the gateway's host clock is NTP-synced: no floor, no clock window) and `upstream.timeout_s`.
pub fn transport(settings: &UpstreamSettings) -> Result<Transport, String> {
    let roots = enroll_ca::tls::load_roots(settings.trust_bundle.as_deref()).map_err(|e| {
        format!("config {}", e.chain_line().replacen("tls.trust_bundle", "upstream.trust_bundle", 1))
    })?;
    Ok(Transport {
        roots: Arc::new(roots),
        clock_window_s: None,
        timeout_s: settings.timeout_s,
        clock: Arc::new(Clock::new(0)),
        tokens: Default::default(),
    })
}

impl CaUpstream {
    /// Checks the block now (with a placeholder device id), so a bad label fails `check` and
    /// `serve` at start, naming the field.
    pub fn new(label: &str, block: &serde_json::Value, transport: Transport) -> Result<Arc<Self>, String> {
        let name = block.get("backend").and_then(|b| b.as_str()).unwrap_or_default();
        if !UPSTREAM_PROTOCOLS.contains(&name) {
            let why = match name {
                "est" => "EST renews over TLS with the device's own key, which the gateway never holds",
                "scep" => "SCEP messages are signed and decrypted with the device's own key, which the gateway never holds",
                _ => "not a vendor CA protocol",
            };
            return Err(format!(
                "labels.{label}.ca.backend: {name:?} cannot be a gateway upstream ({why}); use one of {}",
                UPSTREAM_PROTOCOLS.map(|p| format!("{p:?}")).join(", ")
            ));
        }
        // design.md §9: EZCA renewals use the bootstrap credential; a certificate renewal would
        // sign a token with the device key.
        if name == "ezca" && block.get("renew_auth").and_then(|v| v.as_str()) != Some("bootstrap") {
            return Err(format!(
                "labels.{label}.ca.renew_auth: must be \"bootstrap\" behind the gateway (EZCA certificate \
                 renewal signs with the device key, which the gateway never holds)"
            ));
        }
        let block = block.clone();
        backend_for(label, &block, PROBE_DEVICE).map_err(|e| e.chain_line())?;
        let http = Http::new(transport).map_err(|e| format!("labels.{label}: {}", e.chain_line()))?;
        Ok(Arc::new(CaUpstream { label: label.to_string(), block, http }))
    }

    /// The label's block for one device.
    fn backend_for(&self, device: &str) -> enroll_ca::error::Result<Backend> {
        backend_for(&self.label, &self.block, device)
    }

    /// Runs `call` with a fresh client for this request's device.
    fn with_client<T>(
        &self,
        device: &str,
        call: impl FnOnce(&mut dyn CaBackend) -> enroll_ca::error::Result<T>,
    ) -> Result<T, UpstreamError> {
        let backend = self.backend_for(device).map_err(upstream_error)?;
        let mut client = backend.client(self.http.clone());
        call(client.as_mut()).map_err(upstream_error)
    }
}

impl Upstream for CaUpstream {
    fn submit(&self, req: &UpstreamRequest<'_>) -> Result<UpstreamOutcome, UpstreamError> {
        let received =
            Received::from_der(req.csr_der).map_err(|e| UpstreamError::Protocol(e.chain_line()))?;
        let renewing = renewed_cert(req)?;
        self.with_client(req.device_id, |client| {
            let request = received.request();
            let outcome = match (&renewing, req.renewal_of) {
                (Some(cert), Some(record)) => {
                    let current = Current {
                        cert,
                        key: None,
                        chain: Vec::new(),
                        ca_ref: record.upstream_ref.as_deref(),
                    };
                    client.renew(&request, &current)?
                }
                _ => client.enroll(&request)?,
            };
            Ok(match outcome {
                Outcome::Issued(issued) => issued_outcome(issued),
                Outcome::Pending { request_id } => pending(request_id, client),
            })
        })
    }

    fn poll(&self, upstream_ref: &str, req: &UpstreamRequest<'_>) -> Result<UpstreamOutcome, UpstreamError> {
        let received =
            Received::from_der(req.csr_der).map_err(|e| UpstreamError::Protocol(e.chain_line()))?;
        let renewing = renewed_cert(req)?;
        self.with_client(req.device_id, |client| {
            let current = match (&renewing, req.renewal_of) {
                (Some(cert), Some(record)) => Some(Current {
                    cert,
                    key: None,
                    chain: Vec::new(),
                    ca_ref: record.upstream_ref.as_deref(),
                }),
                _ => None,
            };
            match client.poll(upstream_ref, &received.request(), current.as_ref())? {
                Poll::Issued(issued) => Ok(issued_outcome(issued)),
                Poll::NotYet(words) => {
                    log::info!("labels.{}: request {upstream_ref} not issued yet: {words}", self.label);
                    Ok(pending(upstream_ref.to_string(), client))
                }
                Poll::Ended(error) => Err(error),
            }
        })
    }

    /// Reaches the vendor's probe URL over verified TLS (any HTTP answer counts), as the agent's
    /// `check --online` does. It does not authenticate: that would need an API call per vendor.
    fn check(&self) -> Result<(), UpstreamError> {
        let backend = self.backend_for(PROBE_DEVICE).map_err(upstream_error)?;
        let url = backend.client(self.http.clone()).probe_url();
        let response = self.http.send("reaching the CA", "GET", &url, &[], None).map_err(upstream_error)?;
        log::info!("labels.{}: {} answered HTTP {} at {url}", self.label, backend.name(), response.status);
        Ok(())
    }
}

/// A label's block for one device, parsed by the CA crate (the agent's parser).
fn backend_for(label: &str, block: &serde_json::Value, device: &str) -> enroll_ca::error::Result<Backend> {
    let at = format!("labels.{label}.ca");
    let text = with_device(block, device).to_string();
    let value = enroll_ca::json::parse(text.as_bytes()).map_err(|e| Error::config(format!("{at}: {e}")))?;
    let fields = Fields::new(&value, &at)?;
    Backend::parse(fields, false).map_err(|e| match e.kind() {
        // The CA crate names some fields from its own root (`ca.renew_auth`).
        Kind::Config if e.to_string().starts_with("ca.") => {
            Error::config(format!("labels.{label}.{}", e.chain_line()))
        }
        _ => e,
    })
}

/// The certificate being renewed, when the gateway issued it.
fn renewed_cert(req: &UpstreamRequest<'_>) -> Result<Option<Cert>, UpstreamError> {
    req.renewal_of
        .map(|record| Cert::from_der(&record.cert_der).map_err(|e| UpstreamError::Protocol(e.chain_line())))
        .transpose()
}

fn issued_outcome(issued: Issued) -> UpstreamOutcome {
    let chain_der = issued.intermediates.into_iter().chain(issued.roots).collect();
    UpstreamOutcome::Issued { cert_der: issued.leaf, chain_der, upstream_ref: issued.ca_ref }
}

fn pending(upstream_ref: String, client: &dyn CaBackend) -> UpstreamOutcome {
    let retry_after_s = client
        .retry_after()
        .or_else(|| client.polling().map(|p| p.interval_s))
        .unwrap_or(DEFAULT_RETRY_AFTER_S);
    UpstreamOutcome::Pending { upstream_ref, retry_after_s }
}

/// The CA crate's error classes as the gateway's answers: a refusal keeps the vendor's words
/// with the step and the vendor's code (403, e.g. `apply: EnOS code 11404: Device cannot be found
/// (requestId …)`), a temporary failure its Retry-After (503), anything else is the vendor's
/// fault (502).
fn upstream_error(error: Error) -> UpstreamError {
    match error.kind() {
        Kind::Refused => UpstreamError::Refused(error.chain_line()),
        Kind::Temporary => {
            UpstreamError::Unavailable { message: error.chain_line(), retry_after_s: error.retry_after() }
        }
        // A secret file became unreadable after start: the operator's to fix, the device's to retry.
        Kind::Config | Kind::Storage => {
            UpstreamError::Unavailable { message: error.chain_line(), retry_after_s: None }
        }
        _ => UpstreamError::Protocol(error.chain_line()),
    }
}

/// Every string in the block with `{device}` replaced.
fn with_device(value: &serde_json::Value, device: &str) -> serde_json::Value {
    match value {
        serde_json::Value::String(s) => serde_json::Value::String(s.replace("{device}", device)),
        serde_json::Value::Array(items) => items.iter().map(|v| with_device(v, device)).collect(),
        serde_json::Value::Object(members) => {
            members.iter().map(|(k, v)| (k.clone(), with_device(v, device))).collect()
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(block: serde_json::Value) -> Result<Arc<CaUpstream>, String> {
        let transport = Transport {
            roots: Arc::new(rustls::RootCertStore::empty()),
            clock_window_s: None,
            timeout_s: 5,
            clock: Arc::new(Clock::new(0)),
            tokens: Default::default(),
        };
        CaUpstream::new("meters", &block, transport)
    }

    #[test]
    fn est_and_unknown_backends_are_refused_naming_the_field() {
        let e = upstream(serde_json::json!({"backend": "est", "url": "https://est.example"})).err().unwrap();
        assert!(e.starts_with("labels.meters.ca.backend: \"est\" cannot be a gateway upstream"), "{e}");
        let e = upstream(serde_json::json!({"backend": "scep", "url": "http://scep.example"})).err().unwrap();
        assert!(
            e.contains("\"scep\" cannot be a gateway upstream (SCEP messages are signed and decrypted"),
            "{e}"
        );
        assert!(e.contains("device's own key"), "{e}");
        let e = upstream(serde_json::json!({"backend": "scep"})).err().unwrap();
        assert!(e.starts_with("labels.meters.ca.backend: \"scep\" cannot be a gateway upstream"), "{e}");
    }

    #[test]
    fn ezca_needs_bootstrap_renewals() {
        let block = serde_json::json!({"backend": "ezca", "ca_id": "c", "template_id": "t",
                                       "bootstrap": {"token_file": "/nonexistent"}});
        let e = upstream(block).err().unwrap();
        assert!(e.starts_with("labels.meters.ca.renew_auth: must be \"bootstrap\""), "{e}");
    }

    #[test]
    fn block_errors_name_the_label_path() {
        let e = upstream(serde_json::json!({"backend": "enos", "api_gateway": "https://x.example",
                                             "org_id": "o", "asset_id": "{device}", "app_key": "k",
                                             "app_secret_file": "/nonexistent", "colour": 1}))
        .err()
        .unwrap();
        assert!(e.starts_with("labels.meters.ca.app_secret_file: "), "{e}");
        let e = upstream(serde_json::json!({"backend": "enos", "api_gateway": "https://x.example",
                                             "org_id": "o", "product_key": "p"}))
        .err()
        .unwrap();
        assert!(e.starts_with("labels.meters.ca.device_key: missing"), "{e}");
    }

    #[test]
    fn device_is_replaced_in_every_string() {
        let v = serde_json::json!({"a": "x-{device}", "b": ["{device}", 1], "c": {"d": "{device}.{device}"}});
        assert_eq!(
            with_device(&v, "SN1"),
            serde_json::json!({"a": "x-SN1", "b": ["SN1", 1], "c": {"d": "SN1.SN1"}})
        );
    }
}
