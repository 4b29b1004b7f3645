//! rustls client configuration: server roots, and TLS client authentication with the device key
//! signing in place through the HAL (design.md §5 rule 3), never an exported key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use enroll_hal::{Algorithm, DeviceKey, SignatureScheme as HalScheme};
use std::time::Duration;

use crate::time::Clock;

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
    // The configured bundle decides whom we trust: not a symlink, not writable by others
    // (crate::files). A system bundle is the distribution's, often linked into place.
    let bytes = match trust_bundle {
        Some(_) => crate::files::read(&path, crate::files::Rule::Trusted, crate::files::MAX_PEM_BYTES),
        None => crate::files::read_system(&path, crate::files::MAX_PEM_BYTES),
    }
    .map_err(|e| Error::config(format!("{field}: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::config(format!("{field}: {}: not UTF-8 text", path.display())))?;
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

/// How far past the clock floor a CA's TLS certificate may start and still be accepted while the
/// device has no trustworthy clock (`tls.clock_window_s`); `None` when the roots are the
/// system's, where anyone's certificate could be presented (design.md §5 rule 7).
pub fn clock_window(tls: &TlsSettings) -> Option<u64> {
    tls.trust_bundle.as_ref().and(Some(tls.clock_window_s)).filter(|window| *window > 0)
}

/// How a program reaches its CAs: whom it trusts, the clock it judges certificates with, its
/// timeout. Each run (or gateway upstream) owns one; nothing of it is process-global.
#[derive(Clone)]
pub struct Transport {
    pub roots: Arc<RootCertStore>,
    /// See [`clock_window`].
    pub clock_window_s: Option<u64>,
    pub timeout_s: u64,
    pub clock: Arc<Clock>,
    /// Access tokens of the clients built on this transport (shared by its clones).
    pub tokens: Arc<crate::tokens::TokenCache>,
}

impl Transport {
    /// The transport the `tls` block describes (reads the trust bundle).
    pub fn from_settings(tls: &TlsSettings, clock: Arc<Clock>) -> Result<Transport> {
        let roots = Arc::new(load_roots(tls.trust_bundle.as_deref())?);
        Ok(Transport {
            roots,
            clock_window_s: clock_window(tls),
            timeout_s: tls.timeout_s,
            clock,
            tokens: Default::default(),
        })
    }

    /// The rustls client configuration, with a client identity for mutual TLS or without.
    pub fn client_config(&self, identity: Option<ClientIdentity>) -> Result<Arc<ClientConfig>> {
        client_config(self.roots.clone(), self.clock_window_s, identity, self.clock.clone())
    }
}

/// ring's algorithms, cut to what every TLS 1.2/1.3 server offers (issue 13): secp256r1 is the
/// key exchange group RFC 8446 §9.1 requires of every server and AES-GCM the cipher (TLS 1.3's
/// `TLS_AES_128_GCM_SHA256` is a must; TLS 1.2 servers pair AES-GCM with ECDHE), so X25519,
/// P-384 key exchange and ChaCha20-Poly1305 stay out of the device binary. Built field by field
/// because `ring::default_provider()` would link the left-out algorithms anyway. Server
/// signatures are checked with every algorithm webpki has.
pub fn device_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::{cipher_suite, kx_group};
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ],
        kx_groups: vec![kx_group::SECP256R1],
        signature_verification_algorithms: SIGNATURE_ALGORITHMS,
        secure_random: &RingRandom,
        key_provider: &OwnKeysOnly,
    }
}

/// For each TLS signature scheme, the webpki algorithms that may check it (for TLS 1.2 ECDSA the
/// scheme does not fix the curve, so both).
static SIGNATURE_ALGORITHMS: rustls::crypto::WebPkiSupportedAlgorithms = {
    use rustls::SignatureScheme as Scheme;
    use webpki::ring as alg;
    rustls::crypto::WebPkiSupportedAlgorithms {
        all: &[
            alg::ECDSA_P256_SHA256,
            alg::ECDSA_P256_SHA384,
            alg::ECDSA_P384_SHA256,
            alg::ECDSA_P384_SHA384,
            alg::ED25519,
            alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
            alg::RSA_PKCS1_2048_8192_SHA256,
            alg::RSA_PKCS1_2048_8192_SHA384,
            alg::RSA_PKCS1_2048_8192_SHA512,
            alg::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
        ],
        mapping: &[
            (Scheme::ECDSA_NISTP256_SHA256, &[alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256]),
            (Scheme::ECDSA_NISTP384_SHA384, &[alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384]),
            (Scheme::ED25519, &[alg::ED25519]),
            (Scheme::RSA_PSS_SHA256, &[alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY]),
            (Scheme::RSA_PSS_SHA384, &[alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY]),
            (Scheme::RSA_PSS_SHA512, &[alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY]),
            (Scheme::RSA_PKCS1_SHA256, &[alg::RSA_PKCS1_2048_8192_SHA256]),
            (Scheme::RSA_PKCS1_SHA384, &[alg::RSA_PKCS1_2048_8192_SHA384]),
            (Scheme::RSA_PKCS1_SHA512, &[alg::RSA_PKCS1_2048_8192_SHA512]),
        ],
    }
};

#[derive(Debug)]
struct RingRandom;

impl rustls::crypto::SecureRandom for RingRandom {
    fn fill(&self, buf: &mut [u8]) -> std::result::Result<(), rustls::crypto::GetRandomFailed> {
        use ring::rand::SecureRandom;
        ring::rand::SystemRandom::new().fill(buf).map_err(|_| rustls::crypto::GetRandomFailed)
    }
}

/// The agent signs with its own keys (`HalSigningKey`, the tls-alpn-01 certificate's key), never
/// with a private key rustls would load.
#[derive(Debug)]
struct OwnKeysOnly;

impl rustls::crypto::KeyProvider for OwnKeysOnly {
    fn load_private_key(
        &self,
        _key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> std::result::Result<Arc<dyn SigningKey>, rustls::Error> {
        Err(rustls::Error::General("enroll-agent loads no private keys into rustls".into()))
    }
}

/// The rustls client configuration. `clock_window_s`: see [`clock_window`].
pub fn client_config(
    roots: Arc<RootCertStore>,
    clock_window_s: Option<u64>,
    identity: Option<ClientIdentity>,
    clock: Arc<Clock>,
) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(device_provider());
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::config(format!("tls.trust_bundle: {e}")))?;
    let builder = ClientConfig::builder_with_details(provider, Arc::new(EffectiveClock(clock.clone())))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(crate::error::Kind::Internal, format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClockTolerantVerifier {
            webpki: server_verifier,
            window_s: clock_window_s,
            clock,
        }));
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

/// rustls asks this for "now": the system clock when it can be believed, else the floor
/// (design.md §5 rule 7). Never the CA's `Date`, which comes from the server being judged.
#[derive(Debug)]
struct EffectiveClock(Arc<Clock>);

impl TimeProvider for EffectiveClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(self.0.tls_now())))
    }
}

/// Full WebPKI verification of the CA's server certificate at [`crate::time::tls_now`], with one
/// allowance for devices that have no clock. Such a device cannot tell a CA certificate rotated
/// after its floor (build time or last-known-good time) from a future-dated one, and refusing
/// every rotation would cut it off for good. So a certificate that is "not valid yet" at the
/// floor is accepted when, and only when:
/// - the system clock is before the floor (a believable clock is never overruled);
/// - the roots are the configured `tls.trust_bundle`, never the system's;
/// - the whole chain starts within `tls.clock_window_s` of the floor;
/// - it verifies in every other respect (roots, chain, name, signatures) at its latest start.
///
/// An expired certificate is expired at any time past the floor, so it never passes; what
/// remains is a certificate that started inside the window and expired since, which a device
/// without a clock cannot detect (README, "Clock rule").
#[derive(Debug)]
struct ClockTolerantVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    window_s: Option<u64>,
    clock: Arc<Clock>,
}

impl ClockTolerantVerifier {
    /// The verdict for a chain that is not valid yet at the floor.
    fn starts_after_floor(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let floor = self.clock.floor();
        let Some(window_s) = self.window_s else {
            return Err(refusal(
                floor,
                "the allowance needs tls.trust_bundle and a non-zero tls.clock_window_s",
            ));
        };
        let latest_start = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|der| crate::pki::Cert::from_der(der).map(|c| c.not_before()))
            .collect::<Result<Vec<u64>>>()
            .ok()
            .and_then(|starts| starts.into_iter().max())
            .ok_or(rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if latest_start > floor.saturating_add(window_s) {
            return Err(refusal(
                floor,
                &format!(
                    "it starts at {}, beyond tls.clock_window_s ({window_s} s)",
                    crate::time::rfc3339(latest_start)
                ),
            ));
        }
        let then = UnixTime::since_unix_epoch(Duration::from_secs(latest_start));
        let verified = self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, then)?;
        log::warn!(
            "no trustworthy clock: accepted the CA's TLS certificate, which starts after the earliest possible \
             time ({}), as of its own start time ({})",
            crate::time::rfc3339(floor),
            crate::time::rfc3339(latest_start)
        );
        Ok(verified)
    }
}

/// Why a certificate that is not valid yet at the floor was refused, for the one-line error.
fn refusal(floor: u64, reason: &str) -> rustls::Error {
    rustls::Error::General(format!(
        "the CA's TLS certificate is not valid yet at the earliest possible time ({}) and the system clock \
         is before it; {reason}; set the clock (NTP, RTC) to proceed",
        crate::time::rfc3339(floor)
    ))
}

impl ServerCertVerifier for ClockTolerantVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let result = self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let not_yet_valid = matches!(
            result,
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
            ))
        );
        if !not_yet_valid || self.clock.clock_trusted() {
            return result;
        }
        self.starts_after_floor(end_entity, intermediates, server_name, ocsp)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
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

#[derive(Debug)]
pub struct TlsSettings {
    pub trust_bundle: Option<PathBuf>,
    pub timeout_s: u64,
    pub danger_allow_http: bool,
    /// Without a trustworthy clock, how far past the clock floor the CA's TLS certificate may
    /// start (design.md §5 rule 7); 0 refuses every such certificate.
    pub clock_window_s: u64,
}

/// `tls.clock_window_s` default: 180 days, about two rotations of a 90-day server certificate.
pub const DEFAULT_CLOCK_WINDOW_S: u64 = 180 * 86_400;
/// `tls.clock_window_s` upper bound (10 years): the window is a bound or it is nothing.
pub const MAX_CLOCK_WINDOW_S: u64 = 10 * 365 * 86_400;
