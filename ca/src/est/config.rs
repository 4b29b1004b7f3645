//! The `ca` block for EST (design.md §8, protocols.md §6.1).

use std::sync::Arc;

use enroll_hal::soft::SoftKey;
use enroll_hal::DeviceKey;

use crate::backend::{parse_polling, Polling};
use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::secret::Secret;

/// `ca.backend = "est"` (design.md §8, protocols.md §6.1).
#[derive(Debug)]
pub struct EstSettings {
    /// The service root; `/.well-known/est/[label/]<operation>` is appended.
    pub url: String,
    /// The CA label (RFC 7030 §3.2.2), one path segment; none by default.
    pub label: Option<String>,
    /// The credential for `simpleenroll`; `None`: this device can only renew.
    pub bootstrap: Option<EstBootstrap>,
    /// Pauses between resends of a pending (202) request when the server sends no Retry-After
    /// (60 s), `poll_wait_s` (120) and `poll_timeout_s` (86400).
    pub polling: Polling,
}

#[derive(Debug)]
pub enum EstBootstrap {
    /// A factory (IDevID) TLS client certificate, leaf first, and its key (read from a PKCS#8
    /// file once, when the config is loaded, and checked against the certificate then).
    Certificate { chain: Vec<Vec<u8>>, key: Arc<dyn DeviceKey> },
    /// HTTP Basic (a one-time password, for example); only ever sent over verified https.
    Basic { username: String, password: Secret },
}

/// `ca` for EST: `url`, `label`, `bootstrap` (`cert_file` + `key_file`, or `username` +
/// `password_file`), `poll_interval_s`, `poll_wait_s`, `poll_timeout_s`.
pub fn parse(fields: &mut Fields, allow_http: bool) -> Result<EstSettings> {
    let url = fields.url("url", None, allow_http)?;
    let label = fields.string("label")?;
    if let Some(label) = &label {
        if label.is_empty()
            || !label.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(Error::config("ca.label: one path segment of letters, digits, '-', '_' and '.'"));
        }
    }
    let bootstrap = match fields.object("bootstrap")? {
        None => None,
        Some(mut boot) => {
            let bootstrap = if boot.has("cert_file") || boot.has("key_file") {
                let chain = boot.certificate_file("cert_file")?;
                let key_pem = boot.secret_file("key_file")?;
                let key = bootstrap_key(&chain[0], &key_pem)
                    .map_err(|e| Error::config(format!("ca.bootstrap.key_file: {e}")))?;
                EstBootstrap::Certificate { chain, key }
            } else if boot.has("username") || boot.has("password_file") {
                if allow_http {
                    // Basic credentials are only ever sent over verified TLS (design.md §8).
                    return Err(Error::config(
                        "ca.bootstrap.username: HTTP Basic credentials are only sent over verified https; \
                         remove tls.danger_allow_http",
                    ));
                }
                let username = boot.required_string("username")?;
                if username.contains(':') {
                    return Err(Error::config("ca.bootstrap.username: must not contain ':' (RFC 7617)"));
                }
                EstBootstrap::Basic { username, password: boot.secret_file("password_file")? }
            } else {
                return Err(Error::config(
                    "ca.bootstrap: give cert_file + key_file, or username + password_file",
                ));
            };
            boot.finish()?;
            Some(bootstrap)
        }
    };
    Ok(EstSettings { url, label, bootstrap, polling: parse_polling(fields, 60, 86_400)? })
}

/// The factory key: a PKCS#8 P-256 or RSA-2048 key that belongs to the factory certificate.
fn bootstrap_key(cert: &[u8], key_pem: &Secret) -> std::result::Result<Arc<dyn DeviceKey>, String> {
    let key = load_pkcs8_key(key_pem)?;
    let cert = crate::pki::Cert::from_der(cert).map_err(|e| e.to_string())?;
    if key.public_key_spki() != cert.spki_der() {
        return Err("the key does not belong to the certificate in ca.bootstrap.cert_file".into());
    }
    Ok(key)
}

/// Loads a PKCS#8 PEM key (the EST factory key) as a soft key.
fn load_pkcs8_key(pem_text: &Secret) -> std::result::Result<Arc<dyn DeviceKey>, String> {
    let parsed = pem::parse(pem_text.expose().as_bytes()).map_err(|_| "not a PEM file".to_string())?;
    if parsed.tag() != "PRIVATE KEY" {
        return Err(format!("a {} PEM block; a PKCS#8 \"PRIVATE KEY\" is needed", parsed.tag()));
    }
    let der = zeroize::Zeroizing::new(parsed.into_contents());
    SoftKey::from_pkcs8(&der).map(|k| Arc::new(k) as Arc<dyn DeviceKey>).map_err(|e| e.to_string())
}
