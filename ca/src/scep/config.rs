//! The `ca` block for SCEP (design.md §10, protocols.md §6.2).

use enroll_hal::Algorithm;

use crate::backend::{parse_polling, Polling};
use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::secret::Secret;

/// `ca.backend = "scep"` (RFC 8894).
#[derive(Debug)]
pub struct ScepSettings {
    /// The SCEP endpoint; `?operation=…` is appended. `http://` is allowed: the messages are
    /// signed and encrypted, and `GetCACert` is pinned by `ca_fingerprint`.
    pub url: String,
    /// SHA-256 of the CA certificate's DER: the one trust anchor for plain-http SCEP.
    pub ca_fingerprint: [u8; 32],
    /// Sent as `message=` with GetCACaps and GetCACert (RFC 8894 §3.5.1), for servers that host
    /// several CAs on one URL.
    pub ca_identifier: Option<String>,
    /// The challengePassword put into PKCSReq CSRs; `None`: this device can only renew.
    pub challenge: Option<Secret>,
    /// CertPoll pauses after PENDING when the server names none (60 s, doubling), `poll_wait_s`
    /// (120) and `poll_timeout_s` (86400).
    pub polling: Polling,
}

/// `ca` for SCEP: `url`, `ca_fingerprint`, `ca_identifier`, `challenge_password_file`,
/// `poll_interval_s`, `poll_wait_s`, `poll_timeout_s`.
pub fn parse(fields: &mut Fields, _allow_http: bool) -> Result<ScepSettings> {
    // design.md §10: plain http is fine here, because the fingerprint below pins the CA.
    // (fields.url refuses a query already: `?operation=` is ours to add.)
    let url = fields.url("url", None, true)?;
    let fingerprint = fields.required_string("ca_fingerprint")?;
    let ca_fingerprint = parse_fingerprint(&fingerprint).ok_or_else(|| {
        Error::config(
            "ca.ca_fingerprint: SHA-256 of the CA certificate's DER, 64 hex digits (colons allowed, \
             \"sha256:\" prefix optional)",
        )
    })?;
    let ca_identifier = fields.string("ca_identifier")?;
    let challenge = fields.optional_secret_file("challenge_password_file")?;
    if let Some(secret) = &challenge {
        // RFC 2985 §5.4.1: a DirectoryString of at most 255 characters.
        if secret.expose().is_empty() || secret.expose().chars().count() > 255 {
            return Err(Error::config(
                "ca.challenge_password_file: the password must be 1 to 255 characters",
            ));
        }
    }
    let polling = parse_polling(fields, 60, 86_400)?;
    Ok(ScepSettings { url, ca_fingerprint, ca_identifier, challenge, polling })
}

/// `sha256:9F:86:…`, `9f86…`: 32 bytes of hex, colons and case free.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let text = text.strip_prefix("sha256:").or_else(|| text.strip_prefix("SHA256:")).unwrap_or(text);
    let digits: Vec<u8> = text.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// SCEP answers are encrypted to the device key with RSA key transport (RFC 8894 §3.3.2), and
/// every message is signed on the device.
pub fn check_key(algorithm: Algorithm, remote: bool) -> Result<()> {
    if remote {
        return Err(Error::config(
            "ca.backend: SCEP messages are signed and decrypted with the device key, which a Redtrust key \
             cannot do on the device; use key.provider \"file\", \"pkcs11\" or \"tpm\"",
        ));
    }
    if algorithm != Algorithm::Rsa2048 {
        return Err(Error::config(
            "key.algorithm: SCEP answers are encrypted to the device key with RSA (RFC 8894 §3.3.2); \
             use \"rsa2048\"",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_take_colons_case_and_a_prefix_and_nothing_else() {
        let hex = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        let colons: Vec<String> =
            hex.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into()).collect();
        let expected = parse_fingerprint(hex).unwrap();
        assert_eq!(expected[0], 0x9f);
        assert_eq!(parse_fingerprint(&format!("sha256:{}", colons.join(":"))), Some(expected));
        assert_eq!(parse_fingerprint(&hex.to_lowercase()), Some(expected));
        assert_eq!(parse_fingerprint(&hex[2..]), None);
        assert_eq!(parse_fingerprint(&hex.replace('9', "g")), None);
    }

    #[test]
    fn only_rsa_device_keys_can_take_scep_answers() {
        assert!(check_key(Algorithm::Rsa2048, false).is_ok());
        assert!(check_key(Algorithm::P256, false).unwrap_err().to_string().starts_with("key.algorithm:"));
        assert!(check_key(Algorithm::Rsa2048, true).unwrap_err().to_string().contains("Redtrust"));
    }
}
