//! tls-alpn-01 (RFC 8737): the validation server opens TLS with ALPN `acme-tls/1` and SNI = the
//! identifier (for an IP address, its reverse-DNS name, RFC 8738 §6), and expects a self-signed
//! certificate for exactly that identifier with the critical acmeIdentifier extension holding
//! SHA-256 of the key authorization. The certificate's key is made for this validation and
//! dropped with it; the device key is never involved.

use std::net::{IpAddr, TcpStream};
use std::sync::Arc;

use der::asn1::OctetString;
use der::Encode;
use enroll_hal::soft::SoftKey;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use spki::ObjectIdentifier;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::Extension;

use super::challenge::Identifier;
use crate::error::{Error, Kind, Result};

/// The ALPN protocol of RFC 8737 §6.2.
pub const ACME_TLS: &[u8] = b"acme-tls/1";
/// id-pe-acmeIdentifier (RFC 8737 §6.1).
const ACME_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.31");

fn internal(what: &str) -> impl Fn(der::Error) -> Error + '_ {
    move |e| Error::new(Kind::Internal, format!("tls-alpn-01 certificate: {what}: {e}"))
}

/// A TLS server configuration that answers every identifier's validation.
pub fn server_config(answers: &[(Identifier, String)]) -> Result<rustls::ServerConfig> {
    let mut certs = Vec::new();
    for (identifier, key_authorization) in answers {
        certs
            .push((server_name(identifier), Arc::new(challenge_certificate(identifier, key_authorization)?)));
    }
    let provider = Arc::new(crate::tls::device_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(Kind::Internal, format!("tls-alpn-01 server: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ByName(certs)));
    config.alpn_protocols = vec![ACME_TLS.to_vec()];
    Ok(config)
}

/// Completes one validation handshake (the validation server closes once it has seen the
/// certificate; nothing is read or written after the handshake).
pub fn handshake(stream: TcpStream, config: Arc<rustls::ServerConfig>) {
    let Ok(connection) = rustls::ServerConnection::new(config) else { return };
    let mut tls = rustls::StreamOwned::new(connection, stream);
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return;
        }
    }
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
}

/// The SNI the validation server sends for `identifier`.
fn server_name(identifier: &Identifier) -> String {
    match identifier {
        Identifier::Dns(name) => name.to_ascii_lowercase(),
        Identifier::Ip(IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        Identifier::Ip(IpAddr::V6(v6)) => {
            let nibbles: Vec<String> =
                v6.octets().iter().rev().flat_map(|b| [b & 0xf, b >> 4]).map(|n| format!("{n:x}")).collect();
            format!("{}.ip6.arpa", nibbles.join("."))
        }
    }
}

#[derive(Debug)]
struct ByName(Vec<(String, Arc<CertifiedKey>)>);

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Only the validation protocol is served (RFC 8737 §3: no other ALPN, no fallback).
        if !hello.alpn()?.any(|protocol| protocol == ACME_TLS) {
            return None;
        }
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.iter().find(|(n, _)| *n == name).map(|(_, certified)| certified.clone())
    }
}

/// A fresh P-256 key and the self-signed certificate of RFC 8737 §3 for `identifier`.
fn challenge_certificate(identifier: &Identifier, key_authorization: &str) -> Result<CertifiedKey> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
        .map_err(|_| Error::new(Kind::Internal, "generating the tls-alpn-01 key failed"))?;
    let key = SoftKey::from_pkcs8(pkcs8.as_ref())?;
    let sans = match identifier {
        Identifier::Dns(name) => crate::subject::Sans { dns: vec![name.clone()], ..Default::default() },
        Identifier::Ip(ip) => crate::subject::Sans { ip: vec![*ip], ..Default::default() },
    };
    let san = SubjectAltName(crate::csr::general_names(&sans)?).to_der().map_err(internal("SAN"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    let acme =
        OctetString::new(digest.as_ref()).and_then(|o| o.to_der()).map_err(internal("acmeIdentifier"))?;
    let extensions = vec![
        // The subject is empty, so the SAN is critical (RFC 5280 §4.2.1.6).
        Extension {
            extn_id: x509_cert::ext::pkix::ID_CE_SUBJECT_ALT_NAME,
            critical: true,
            extn_value: OctetString::new(san).map_err(internal("SAN"))?,
        },
        Extension {
            extn_id: ACME_IDENTIFIER,
            critical: true,
            extn_value: OctetString::new(acme).map_err(internal("acmeIdentifier"))?,
        },
    ];
    let der = crate::pki::self_signed(&key, Default::default(), extensions, 7 * 86_400)?;
    let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec()),
    ))
    .map_err(|e| Error::new(Kind::Internal, format!("tls-alpn-01 key: {e}")))?;
    Ok(CertifiedKey::new(vec![CertificateDer::from(der)], signing_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_dns_names_of_ip_identifiers_follow_rfc8738() {
        assert_eq!(server_name(&Identifier::Ip("10.0.0.42".parse().unwrap())), "42.0.0.10.in-addr.arpa");
        let v6 = server_name(&Identifier::Ip("2001:db8::1".parse().unwrap()));
        assert!(v6.starts_with("1.0.0.0.") && v6.ends_with(".8.b.d.0.1.0.0.2.ip6.arpa"), "{v6}");
        assert_eq!(server_name(&Identifier::Dns("Device.Example".into())), "device.example");
    }
}
