//! rustls client configuration: server roots, and TLS client authentication with the device key
//! signing in place through the HAL (design.md §5 rule 3), never an exported key.

use std::path::Path;
use std::sync::Arc;

use enroll_hal::{Algorithm, DeviceKey, SignatureScheme as HalScheme};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::time_provider::TimeProvider;
use rustls::{CertificateError, DigitallySignedStruct};
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
    let server_verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::config(format!("tls.trust_bundle: {e}")))?;
    let builder = ClientConfig::builder_with_details(provider, Arc::new(EffectiveClock))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(crate::error::Kind::Internal, format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClockTolerantVerifier(server_verifier)));
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

/// rustls asks this for "now": the clock rule's time (design.md §5 rule 7), not the raw system
/// clock, so a device booted at 1970 judges validity by the build time or the CA's Date.
#[derive(Debug)]
struct EffectiveClock;

impl TimeProvider for EffectiveClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(crate::time::now())))
    }
}

/// Full WebPKI verification of the CA's server certificate, with one allowance for devices that
/// have no clock: a certificate "not valid yet" at the build time is accepted if it verifies in
/// every other respect (roots, chain, name, signatures) at its own notBefore. A device without a
/// clock cannot tell a newly rotated server certificate from a future-dated one, and refusing
/// every rotation after the firmware build would cut it off for good. Expired certificates are
/// still refused: they are expired at any time after the build.
#[derive(Debug)]
struct ClockTolerantVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ClockTolerantVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let result = self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let not_yet_valid = matches!(
            result,
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
            ))
        );
        if !not_yet_valid || crate::time::clock_trusted() {
            return result;
        }
        let Some(latest_start) = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|der| crate::pki::Cert::from_der(der).map(|c| c.not_before()))
            .collect::<Result<Vec<u64>>>()
            .ok()
            .and_then(|starts| starts.into_iter().max())
        else {
            return result;
        };
        log::warn!(
            "no trustworthy clock: accepting the CA's TLS certificate, which starts after this build, \
             as of its own start time"
        );
        let then = UnixTime::since_unix_epoch(Duration::from_secs(latest_start));
        self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, then)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
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
