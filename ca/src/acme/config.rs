//! The `ca` block for ACME (design.md §10, protocols.md §6.3).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::backend::{parse_polling, Polling};
use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::secret::Secret;

/// `ca.backend = "acme"`.
#[derive(Debug)]
pub struct AcmeSettings {
    /// The directory URL (RFC 8555 §7.1.1).
    pub directory: String,
    /// `mailto:` URLs for the account.
    pub contact: Vec<String>,
    /// The operator agreed to the CA's terms of service (sent as `termsOfServiceAgreed`).
    pub terms_agreed: bool,
    /// External account binding (RFC 8555 §7.3.4), required by most private CAs.
    pub eab: Option<Eab>,
    pub challenge: Challenge,
    /// Where the account key (P-256, PKCS#8 PEM, 0600) lives: `<state_dir>/acme/account.key`
    /// unless the block names a file.
    pub account_key_file: Option<PathBuf>,
    /// Pauses while an authorization or the order is processing (2 s, doubling), `poll_wait_s`
    /// (120) and `poll_timeout_s` (3600).
    pub polling: Polling,
}

#[derive(Debug)]
pub struct Eab {
    pub kid: String,
    /// The base64url MAC key the CA handed out with the key id.
    pub hmac_key: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// RFC 8555 §8.3: the agent answers `GET /.well-known/acme-challenge/<token>` on `listen`
    /// while its authorizations are pending, and only then.
    Http01 { listen: SocketAddr },
    /// RFC 8737: the agent answers TLS with ALPN `acme-tls/1` on `listen` while its
    /// authorizations are pending, and only then.
    TlsAlpn01 { listen: SocketAddr },
    /// RFC 8555 §8.4: `hook` (argv) publishes the TXT record (`ACME_ACTION=present`) and
    /// removes it afterwards (`ACME_ACTION=cleanup`).
    Dns01 { hook: Vec<String> },
}

/// `ca` for ACME: `directory`, `contact`, `terms_agreed`, `eab` (`kid` + `hmac_key_file`),
/// `challenge` (`http-01` with `http01_listen`, or `dns-01` with `dns01_hook`),
/// `account_key_file`, `poll_interval_s`, `poll_wait_s`, `poll_timeout_s`.
pub fn parse(fields: &mut Fields, allow_http: bool) -> Result<AcmeSettings> {
    let directory = fields.url("directory", None, allow_http)?;
    let contact = fields.string_list("contact")?.unwrap_or_default();
    if let Some(bad) = contact.iter().find(|c| !c.starts_with("mailto:") || c.contains([',', ' '])) {
        return Err(Error::config(format!("ca.contact: {bad:?} is not one mailto: URL")));
    }
    let terms_agreed = fields.boolean("terms_agreed")?.unwrap_or(false);
    let eab = match fields.object("eab")? {
        None => None,
        Some(mut block) => {
            let eab =
                Eab { kid: block.required_string("kid")?, hmac_key: block.secret_file("hmac_key_file")? };
            block.finish()?;
            Some(eab)
        }
    };
    let challenge = parse_challenge(fields)?;
    let account_key_file = fields.string("account_key_file")?.map(PathBuf::from);
    if account_key_file.as_ref().is_some_and(|p| !p.is_absolute()) {
        return Err(Error::config("ca.account_key_file: must be an absolute path"));
    }
    let polling = parse_polling(fields, 2, 3600)?;
    Ok(AcmeSettings { directory, contact, terms_agreed, eab, challenge, account_key_file, polling })
}

/// The 78 for tls-alpn-01 in a build without its feature.
pub(crate) fn tls_alpn_not_compiled() -> Error {
    Error::config("ca.challenge: tls-alpn-01 is not compiled into this build (cargo feature acme-tls-alpn)")
}

fn parse_challenge(fields: &mut Fields) -> Result<Challenge> {
    let name = fields.string("challenge")?.unwrap_or_else(|| "http-01".to_string());
    let http01 = fields.string("http01_listen")?;
    let tls_alpn01 = fields.string("tls_alpn01_listen")?;
    let hook = fields.string_list("dns01_hook")?;
    let address = |field: &str, text: Option<String>, default: &str| -> Result<SocketAddr> {
        let text = text.unwrap_or_else(|| default.to_string());
        text.parse().map_err(|_| {
            Error::config(format!("ca.{field}: {text:?} is not an address:port (e.g. \"{default}\")"))
        })
    };
    match name.as_str() {
        "http-01" => Ok(Challenge::Http01 { listen: address("http01_listen", http01, "0.0.0.0:80")? }),
        "tls-alpn-01" if cfg!(feature = "acme-tls-alpn") => {
            Ok(Challenge::TlsAlpn01 { listen: address("tls_alpn01_listen", tls_alpn01, "0.0.0.0:443")? })
        }
        "tls-alpn-01" => Err(tls_alpn_not_compiled()),
        "dns-01" => match hook {
            Some(hook) if !hook.is_empty() && Path::new(&hook[0]).is_absolute() => {
                // Whoever can write the program runs code as the agent (as for hooks.after_install).
                crate::files::check_program(Path::new(&hook[0]))
                    .map_err(|e| Error::config(format!("ca.dns01_hook: {e}")))?;
                Ok(Challenge::Dns01 { hook })
            }
            _ => Err(Error::config(
                "ca.dns01_hook: dns-01 needs the argv of a program that publishes the TXT record \
                 (an absolute path first)",
            )),
        },
        other => Err(Error::config(format!(
            "ca.challenge: {other:?} is not one of \"http-01\", \"tls-alpn-01\", \"dns-01\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alpn01_needs_its_cargo_feature() {
        let value =
            crate::json::parse(br#"{"directory":"https://acme.example/dir","challenge":"tls-alpn-01"}"#)
                .unwrap();
        let parsed = parse(&mut Fields::new(&value, "ca").unwrap(), false);
        if cfg!(feature = "acme-tls-alpn") {
            let listen = "0.0.0.0:443".parse().unwrap();
            assert_eq!(parsed.unwrap().challenge, Challenge::TlsAlpn01 { listen });
        } else {
            assert_eq!(
                parsed.unwrap_err().to_string(),
                "ca.challenge: tls-alpn-01 is not compiled into this build (cargo feature acme-tls-alpn)"
            );
        }
    }
}
