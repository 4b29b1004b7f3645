//! The ACME account key and the JSON Web Signatures made with it (RFC 8555 §6.2, RFC 7515,
//! RFC 7638 thumbprints), and the external account binding (§7.3.4).
//!
//! The account key is a P-256 key of its own, never the device key: it only proves "the same
//! account" to the CA, and keeping it apart lets the device key live in a token that cannot sign
//! JWS-formatted ECDSA (design.md §10).

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use zeroize::Zeroizing;

use crate::error::{Error, Kind, Result};
use crate::json::{self, Value};
use crate::secret::Secret;

pub struct AccountKey {
    pair: EcdsaKeyPair,
    /// The public key as a JWK, members in RFC 7638 order (so it is also the thumbprint input).
    jwk: String,
}

impl AccountKey {
    /// Reads the key at `path`, or makes one and stores it there (0600, written atomically in a
    /// 0700 directory) when there is none yet. A key file that is there but is not a key (a
    /// damaged disk) is set aside as `<name>.damaged` and replaced: the account only proves
    /// continuity to the CA, and a new one is cheap, where keeping the damaged file would stop
    /// every renewal for good. A file with loose permissions or the wrong owner is not damaged but
    /// suspicious: that stays an error (74) for the operator.
    pub fn load_or_create(path: &Path) -> Result<AccountKey> {
        let what = || format!("the ACME account key {}", path.display());
        if path.exists() {
            let text = crate::files::read(path, crate::files::Rule::Secret, crate::files::MAX_SECRET_BYTES)
                .map_err(|e| Error::storage(format!("reading {}: {e}", what())))?;
            let key = pem::parse(&text).ok().and_then(|parsed| {
                let der = Zeroizing::new(parsed.into_contents());
                AccountKey::from_pkcs8(&der).ok()
            });
            if let Some(key) = key {
                return Ok(key);
            }
            let aside = path.with_extension("key.damaged");
            log::warn!("{} is not a P-256 key; set aside as {} and replaced", what(), aside.display());
            std::fs::rename(path, &aside)
                .map_err(|e| Error::storage(format!("setting aside {}: {e}", what())))?;
        }
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map_err(|_| Error::new(Kind::Internal, "generating the ACME account key failed"))?;
        let der = Zeroizing::new(der.as_ref().to_vec());
        let pem = Zeroizing::new(crate::pki::pem_of("PRIVATE KEY", &der));
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::storage(format!("creating {}: {e}", dir.display())))?;
        }
        enroll_hal::store::write_file_atomic(path, pem.as_bytes(), 0o600)
            .map_err(|e| Error::storage(format!("storing {}: {e}", what())))?;
        AccountKey::from_pkcs8(&der)
    }

    fn from_pkcs8(der: &[u8]) -> Result<AccountKey> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
            .map_err(|_| Error::storage("the ACME account key is not a P-256 PKCS#8 key"))?;
        // An uncompressed point: 0x04 || X || Y, 32 bytes each.
        let point = pair.public_key().as_ref();
        let (x, y) = (URL_SAFE_NO_PAD.encode(&point[1..33]), URL_SAFE_NO_PAD.encode(&point[33..65]));
        let jwk = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        Ok(AccountKey { pair, jwk })
    }

    /// RFC 7638 thumbprint, base64url: the second half of every key authorization (§8.1).
    pub fn thumbprint(&self) -> String {
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, self.jwk.as_bytes()))
    }

    /// A flattened JWS (§6.2) over `payload` ("" = POST-as-GET), identified by the account URL
    /// `kid` or, before there is an account, by the key itself.
    pub fn sign(&self, url: &str, nonce: &str, kid: Option<&str>, payload: &str) -> Result<String> {
        let who = match kid {
            Some(kid) => format!(r#""kid":{}"#, Value::from(kid).to_json()),
            None => format!(r#""jwk":{}"#, self.jwk),
        };
        let protected = format!(
            r#"{{"alg":"ES256",{who},"nonce":{},"url":{}}}"#,
            Value::from(nonce).to_json(),
            Value::from(url).to_json()
        );
        let jws = flattened(&protected, payload.as_bytes(), |input| {
            self.pair
                .sign(&SystemRandom::new(), input)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| Error::new(Kind::Internal, "signing with the ACME account key failed"))
        })?;
        Ok(jws.to_json())
    }

    /// The `externalAccountBinding` of a newAccount request (§7.3.4): the account key as payload,
    /// MACed (HS256) with the CA's key for `kid`.
    pub fn external_binding(&self, kid: &str, hmac_key: &Secret, new_account_url: &str) -> Result<Value> {
        let key = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(hmac_key.expose().trim().trim_end_matches('='))
                .map_err(|_| Error::config("ca.eab.hmac_key_file: the MAC key is not base64url"))?,
        );
        let protected = format!(
            r#"{{"alg":"HS256","kid":{},"url":{}}}"#,
            Value::from(kid).to_json(),
            Value::from(new_account_url).to_json()
        );
        let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
        flattened(&protected, self.jwk.as_bytes(), |input| {
            Ok(ring::hmac::sign(&mac_key, input).as_ref().to_vec())
        })
    }
}

/// A flattened JWS (RFC 7515 §7.2.2): base64url of the protected header and of the payload, and
/// `sign` over "header.payload".
fn flattened(protected: &str, payload: &[u8], sign: impl FnOnce(&[u8]) -> Result<Vec<u8>>) -> Result<Value> {
    let (protected_b64, payload_b64) = (URL_SAFE_NO_PAD.encode(protected), URL_SAFE_NO_PAD.encode(payload));
    let signature = sign(format!("{protected_b64}.{payload_b64}").as_bytes())?;
    Ok(json::object([
        ("protected", protected_b64.into()),
        ("payload", payload_b64.into()),
        ("signature", URL_SAFE_NO_PAD.encode(signature).into()),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jws_verifies_with_the_jwk_it_carries() {
        let dir = std::env::temp_dir().join(format!("enroll-acme-jws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("acme/account.key");
        let key = AccountKey::load_or_create(&path).unwrap();
        let again = AccountKey::load_or_create(&path).unwrap();
        assert_eq!(key.thumbprint(), again.thumbprint(), "the stored key is read back, not replaced");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        // A damaged file is set aside and replaced, never a dead end.
        let damaged = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        std::fs::write(&path, damaged).unwrap();
        let replaced = AccountKey::load_or_create(&path).unwrap();
        assert_ne!(replaced.thumbprint(), key.thumbprint());
        assert_eq!(std::fs::read(path.with_extension("key.damaged")).unwrap(), damaged);
        assert_eq!(AccountKey::load_or_create(&path).unwrap().thumbprint(), replaced.thumbprint());
        // Loose permissions are not damage: refused, the file left alone.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = AccountKey::load_or_create(&path).err().expect("a 0644 key file is refused");
        assert_eq!(refused.kind(), crate::error::Kind::Storage, "{refused}");

        let jws =
            json::parse(key.sign("https://ca/new-order", "n1", None, "{}").unwrap().as_bytes()).unwrap();
        let field = |name: &str| jws.get(name).and_then(Value::as_str).unwrap().to_string();
        let protected = json::parse(&URL_SAFE_NO_PAD.decode(field("protected")).unwrap()).unwrap();
        assert_eq!(protected.get("alg").and_then(Value::as_str), Some("ES256"));
        assert_eq!(protected.get("nonce").and_then(Value::as_str), Some("n1"));
        let jwk = protected.get("jwk").unwrap();
        let coord =
            |name: &str| URL_SAFE_NO_PAD.decode(jwk.get(name).and_then(Value::as_str).unwrap()).unwrap();
        let mut point = vec![4u8];
        point.extend(coord("x"));
        point.extend(coord("y"));
        let signed = format!("{}.{}", field("protected"), field("payload"));
        let signature = URL_SAFE_NO_PAD.decode(field("signature")).unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
            .verify(signed.as_bytes(), &signature)
            .expect("the signature verifies with the embedded JWK");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
