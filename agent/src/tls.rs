//! rustls client configuration: server roots, and TLS client authentication with the device key
//! signing in place through the HAL (design.md §5 rule 3), never an exported key.

use std::path::Path;
use std::sync::Arc;

use enroll_hal::{Algorithm, DeviceKey, SignatureScheme as HalScheme};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{ClientConfig, RootCertStore, SignatureAlgorithm, SignatureScheme};

use crate::error::{Error, Result};

/// Where Debian/Ubuntu/Alpine, Fedora/RHEL and OpenWrt keep the system roots, in that order.
const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// Reads the roots CA endpoints are verified against: the configured bundle, else the system's.
pub fn load_roots(trust_bundle: Option<&Path>) -> Result<RootCertStore> {
    let (path, field) = match trust_bundle {
        Some(path) => (path.to_path_buf(), "tls.trust_bundle"),
        None => {
            let found = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.exists()).ok_or_else(|| {
                Error::config("tls.trust_bundle: not set and no system CA bundle was found; set it")
            })?;
            (found.to_path_buf(), "system CA bundle")
        }
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::config(format!("{field}: {}: {e}", path.display())))?;
    let blocks =
        pem::parse_many(&text).map_err(|e| Error::config(format!("{field}: {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    for block in blocks.iter().filter(|b| b.tag() == "CERTIFICATE") {
        roots
            .add(CertificateDer::from(block.contents().to_vec()))
            .map_err(|e| Error::config(format!("{field}: {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::config(format!("{field}: {}: contains no certificate", path.display())));
    }
    Ok(roots)
}

/// A client identity for mutual TLS: our certificate chain and the key that signs in place.
pub struct ClientIdentity {
    pub chain: Vec<Vec<u8>>,
    pub key: Arc<dyn DeviceKey>,
}

pub fn client_config(roots: RootCertStore, identity: Option<ClientIdentity>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(crate::error::Kind::Internal, format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let chain = identity.chain.into_iter().map(CertificateDer::from).collect();
            let signing_key = Arc::new(HalSigningKey(identity.key));
            let certified = Arc::new(CertifiedKey::new(chain, signing_key));
            builder.with_client_cert_resolver(Arc::new(FixedIdentity(certified)))
        }
    };
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct FixedIdentity(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedIdentity {
    fn resolve(&self, _hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.key.choose_scheme(schemes).is_some().then(|| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// rustls' signing interface over a HAL key.
#[derive(Debug)]
struct HalSigningKey(Arc<dyn DeviceKey>);

impl SigningKey for HalSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        // PSS first: TLS 1.3 forbids PKCS#1 v1.5 for handshake signatures.
        let preferences: &[(SignatureScheme, HalScheme)] = match self.0.algorithm() {
            Algorithm::P256 => &[(SignatureScheme::ECDSA_NISTP256_SHA256, HalScheme::EcdsaP256Sha256)],
            Algorithm::Rsa2048 => &[
                (SignatureScheme::RSA_PSS_SHA256, HalScheme::RsaPssSha256),
                (SignatureScheme::RSA_PKCS1_SHA256, HalScheme::RsaPkcs1Sha256),
            ],
        };
        let (tls, hal) = preferences.iter().find(|(tls, _)| offered.contains(tls))?;
        Some(Box::new(HalSigner { key: self.0.clone(), tls: *tls, hal: *hal }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.0.algorithm() {
            Algorithm::P256 => SignatureAlgorithm::ECDSA,
            Algorithm::Rsa2048 => SignatureAlgorithm::RSA,
        }
    }
}

#[derive(Debug)]
struct HalSigner {
    key: Arc<dyn DeviceKey>,
    tls: SignatureScheme,
    hal: HalScheme,
}

impl Signer for HalSigner {
    fn sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, rustls::Error> {
        self.key.sign(self.hal, message).map_err(|e| rustls::Error::General(format!("device key: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.tls
    }
}
