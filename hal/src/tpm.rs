//! The `tpm` key provider (cargo feature `tpm`): keys generated inside a TPM 2.0 and kept as
//! TPM-wrapped blobs in the slot directory.
//!
//! A slot holds
//! ```text
//! key.tpm.pub   0644  TPM2B_PUBLIC, marshalled (the format tpm2_create -u writes)
//! key.tpm.priv  0600  TPM2B_PRIVATE, marshalled (tpm2_create -r): the private key encrypted and
//!                     integrity-protected by the TPM under its storage key; useless on any other TPM
//! key.uri       0644  tpm:blob;alg=<p256|rsa2048>;name=<hex TPM Name of the key>
//! ```
//! The parent is the storage root key (SRK) made with `TPM2_CreatePrimary` in the owner hierarchy
//! from the standard ECC P-256 SRK template of the TCG provisioning guidance. A primary key is a
//! deterministic function of the owner seed and the template, so the SRK is recreated for every
//! operation instead of being made persistent: nothing in the TPM's NV memory is consumed, nothing
//! has to be cleaned up after a crash, and A/B rotation is two blob sets in two slots. The blobs
//! stay valid until the owner seed changes (`tpm2_clear`), which is the point of a clear.
//!
//! Every operation opens its own TCTI connection, creates the SRK, loads the key, uses it and
//! flushes every transient object again, also on error paths: swtpm and a raw `/dev/tpm0` without
//! a resource manager have only three transient object slots. Operations of one process are
//! serialised by a lock for the same reason. Authorisation is the empty password session: the
//! owner hierarchy auth and the keys' auth values are empty, since the blobs are bound to this TPM
//! and readable only by the agent's user (the threat model of a file key, with the key itself not
//! extractable). Messages are hashed with ring and the digest is signed with a null hashcheck
//! ticket, which an unrestricted signing key accepts.

use std::fmt;
use std::fs;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{
    TPM2_PT_HR_TRANSIENT_AVAIL, TPM2_RH_NULL, TPM2_ST_HASHCHECK, TPM2_TRANSIENT_FIRST,
};
use tss_esapi::constants::Tss2ResponseCodeKind;
use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::CapabilityData;
use tss_esapi::structures::{
    Digest, EccParameter, EccPoint, EccScheme, HashScheme, HashcheckTicket, Private, Public, PublicBuffer,
    PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent,
    RsaScheme, Signature, SignatureScheme as TpmScheme, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};

use crate::key::spki;
use crate::store;
use crate::{Algorithm, DeviceKey, Error, KeyProvider, SignatureScheme};

/// The marshalled TPM2B_PUBLIC of the slot's key.
pub const PUBLIC_FILE: &str = "key.tpm.pub";
/// The marshalled TPM2B_PRIVATE (TPM-encrypted) of the slot's key.
pub const PRIVATE_FILE: &str = "key.tpm.priv";
/// The key reference `load` starts from.
pub const KEY_URI_FILE: &str = "key.uri";
const URI_PREFIX: &str = "tpm:blob;";

/// Serialises TPM use within the process: without a resource manager, two interleaved operations
/// could need more transient slots than the TPM has.
static TPM_LOCK: Mutex<()> = Mutex::new(());

/// Where the TPM is (design.md §3 `key.tpm`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmConfig {
    /// TCTI as tpm2-tools spell it: `device:/dev/tpmrm0` (the kernel resource manager; the usual
    /// choice), `device:/dev/tpm0`, `swtpm:host=127.0.0.1,port=2321`, `mssim:…`, `tabrmd:…`.
    pub tcti: String,
}

/// Keys in a TPM 2.0, stored as wrapped blobs in the slot directory.
pub struct TpmProvider {
    tcti: Arc<TctiNameConf>,
}

impl fmt::Debug for TpmProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmProvider").field("tcti", &self.tcti).finish()
    }
}

impl TpmProvider {
    /// Parses the TCTI. The TPM itself is first contacted by the first key operation.
    pub fn new(config: TpmConfig) -> Result<Self, Error> {
        let tcti = TctiNameConf::from_str(config.tcti.trim()).map_err(|_| {
            Error::key(
                "opening the TPM",
                format!(
                    "tcti {:?} is not a TCTI (expected e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321)",
                    config.tcti
                ),
            )
        })?;
        Ok(TpmProvider { tcti: Arc::new(tcti) })
    }
}

impl KeyProvider for TpmProvider {
    fn name(&self) -> &'static str {
        "tpm"
    }

    fn generate(&self, algorithm: Algorithm, slot: &Path) -> Result<Arc<dyn DeviceKey>, Error> {
        const STEP: &str = "generating TPM key";
        let template =
            key_template(algorithm).map_err(|e| tpm_error(STEP, "building the key template", e))?;
        let mut tpm = Tpm::open(&self.tcti, STEP)?;
        let created = tpm.with_srk(STEP, "creating the key", |ctx, srk| {
            ctx.create(srk, template, None, None, None, None)
        })?;
        let public_blob = PublicBuffer::try_from(created.out_public.clone())
            .and_then(|b| b.marshall())
            .map_err(|e| tpm_error(STEP, "encoding the public blob", e))?;
        let private_blob = marshal_private(&created.out_private);
        drop(tpm);

        let key = TpmKey::new(self.tcti.clone(), created.out_public, created.out_private, &public_blob)?;
        store::write_file_atomic(&slot.join(PUBLIC_FILE), &public_blob, 0o644)?;
        store::write_file_atomic(&slot.join(PRIVATE_FILE), &private_blob, 0o600)?;
        // key.uri last: a slot that names a key has both blobs.
        store::write_file_atomic(&slot.join(KEY_URI_FILE), format!("{}\n", key.uri).as_bytes(), 0o644)?;
        Ok(Arc::new(key))
    }

    /// Reads the blobs and has the TPM load them once, so a blob from another TPM (or from before
    /// a TPM clear) fails here rather than at the first signature.
    fn load(&self, slot: &Path) -> Result<Arc<dyn DeviceKey>, Error> {
        const STEP: &str = "loading TPM key";
        let uri_path = slot.join(KEY_URI_FILE);
        let uri =
            fs::read_to_string(&uri_path).map_err(|e| Error::io("reading key reference", &uri_path, e))?;
        let uri = uri.trim();
        let (algorithm, name) = parse_uri(uri).ok_or_else(|| {
            Error::key(STEP, format!("{}: {uri:?} is not a tpm:blob URI", uri_path.display()))
        })?;

        let public_path = slot.join(PUBLIC_FILE);
        let public_blob = fs::read(&public_path).map_err(|e| Error::io("reading", &public_path, e))?;
        let private_path = slot.join(PRIVATE_FILE);
        store::check_private_file(&private_path)?;
        let private_blob = fs::read(&private_path).map_err(|e| Error::io("reading", &private_path, e))?;

        let public = unmarshal_public(&public_blob)
            .ok_or_else(|| Error::key(STEP, format!("{} is not a TPM2B_PUBLIC", public_path.display())))?;
        let private = unmarshal_private(&private_blob)
            .ok_or_else(|| Error::key(STEP, format!("{} is not a TPM2B_PRIVATE", private_path.display())))?;
        let key = TpmKey::new(self.tcti.clone(), public, private, &public_blob)?;
        if key.algorithm != algorithm || tpm_name(&public_blob) != name {
            return Err(Error::key(
                STEP,
                format!("{} does not hold the key {} names", public_path.display(), uri_path.display()),
            ));
        }
        key.with_loaded(STEP, |_, _| Ok(()))?;
        Ok(Arc::new(key))
    }

    fn reuse(&self, from: &Path, to: &Path) -> Result<(), Error> {
        store::check_private_file(&from.join(PRIVATE_FILE))?;
        for (name, mode) in [(PUBLIC_FILE, 0o644), (PRIVATE_FILE, 0o600), (KEY_URI_FILE, 0o644)] {
            let source = from.join(name);
            let bytes = fs::read(&source).map_err(|e| Error::io("reading", &source, e))?;
            store::write_file_atomic(&to.join(name), &bytes, mode)?;
        }
        Ok(())
    }

    /// Removes the slot's blobs. Nothing lives in the TPM, and a slot that reused the key holds its
    /// own copy, so there is nothing else to destroy or to keep.
    fn delete(&self, slot: &Path) -> Result<(), Error> {
        for name in [KEY_URI_FILE, PRIVATE_FILE, PUBLIC_FILE] {
            let path = slot.join(name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("deleting key", &path, e)),
            }
        }
        Ok(())
    }
}

/// A TPM-wrapped key. Holds the blobs, never the private key.
pub struct TpmKey {
    tcti: Arc<TctiNameConf>,
    algorithm: Algorithm,
    public: Public,
    private: Private,
    spki: Vec<u8>,
    uri: String,
}

impl fmt::Debug for TpmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmKey")
            .field("algorithm", &self.algorithm)
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl TpmKey {
    fn new(
        tcti: Arc<TctiNameConf>,
        public: Public,
        private: Private,
        public_blob: &[u8],
    ) -> Result<Self, Error> {
        const STEP: &str = "reading TPM public key";
        let (algorithm, spki) = match &public {
            Public::Ecc { parameters, unique, .. } => {
                if parameters.ecc_curve() != EccCurve::NistP256 {
                    return Err(Error::key(STEP, "the ECC key is not on curve P-256"));
                }
                let mut point = vec![4u8];
                point.extend(left_pad(unique.x().value(), 32).ok_or_else(|| Error::key(STEP, "bad x"))?);
                point.extend(left_pad(unique.y().value(), 32).ok_or_else(|| Error::key(STEP, "bad y"))?);
                (Algorithm::P256, spki::p256(&point))
            }
            Public::Rsa { parameters, unique, .. } => {
                let modulus = unique.value();
                if parameters.key_bits() != RsaKeyBits::Rsa2048 || modulus.len() != 256 {
                    return Err(Error::key(STEP, "the RSA key is not 2048 bits"));
                }
                // 0 means the default exponent 65537 (TPM 2.0 Part 2, TPMS_RSA_PARMS).
                let exponent = match parameters.exponent().value() {
                    0 => 65537,
                    e => e,
                };
                let rsa_public_key = crate::der::sequence(&[
                    crate::der::uint(modulus),
                    crate::der::uint(&exponent.to_be_bytes()),
                ]);
                (Algorithm::Rsa2048, spki::rsa(&rsa_public_key))
            }
            _ => return Err(Error::key(STEP, "the TPM key is neither ECC nor RSA")),
        };
        let attributes = public.object_attributes();
        if !(attributes.fixed_tpm() && attributes.sensitive_data_origin() && attributes.sign_encrypt())
            || attributes.restricted()
        {
            return Err(Error::key(STEP, "the TPM key is not a non-duplicable, TPM-generated signing key"));
        }
        let uri = format!("{URI_PREFIX}alg={};name={}", algorithm.name(), hex(&tpm_name(public_blob)));
        Ok(TpmKey { tcti, algorithm, public, private, spki, uri })
    }

    /// Opens the TPM, loads this key under a fresh SRK, runs `f`, and flushes everything.
    fn with_loaded<T>(
        &self,
        step: &'static str,
        f: impl FnOnce(&mut Context, KeyHandle) -> tss_esapi::Result<T>,
    ) -> Result<T, Error> {
        let mut tpm = Tpm::open(&self.tcti, step)?;
        let key = tpm.with_srk(step, "loading the key blob", |ctx, srk| {
            ctx.load(srk, self.private.clone(), self.public.clone())
        })?;
        let ctx = &mut tpm.ctx;
        let result = ctx.execute_with_session(Some(AuthSession::Password), |ctx| f(ctx, key));
        let flushed = ctx.flush_context(key.into());
        let value = result.map_err(|e| tpm_error(step, "using the key", e))?;
        flushed.map_err(|e| tpm_error(step, "flushing the key", e))?;
        Ok(value)
    }
}

impl DeviceKey for TpmKey {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, Error> {
        const STEP: &str = "signing with the TPM";
        if scheme.algorithm() != self.algorithm {
            return Err(Error::key(
                STEP,
                format!("a {} key cannot sign with {scheme:?}", self.algorithm.name()),
            ));
        }
        let sha256 = HashScheme::new(HashingAlgorithm::Sha256);
        let tpm_scheme = match scheme {
            SignatureScheme::EcdsaP256Sha256 => TpmScheme::EcDsa { hash_scheme: sha256 },
            SignatureScheme::RsaPkcs1Sha256 => TpmScheme::RsaSsa { hash_scheme: sha256 },
            SignatureScheme::RsaPssSha256 => TpmScheme::RsaPss { hash_scheme: sha256 },
        };
        let digest = Digest::try_from(ring::digest::digest(&ring::digest::SHA256, message).as_ref())
            .map_err(|e| tpm_error(STEP, "preparing the digest", e))?;
        let signature = self.with_loaded(STEP, |ctx, key| {
            // A null ticket: the digest was not made by the TPM, which an unrestricted key allows.
            let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
                tag: TPM2_ST_HASHCHECK,
                hierarchy: TPM2_RH_NULL,
                digest: Default::default(),
            })?;
            ctx.sign(key, digest, tpm_scheme, ticket)
        })?;
        match (scheme, signature) {
            (SignatureScheme::EcdsaP256Sha256, Signature::EcDsa(sig)) => Ok(crate::der::sequence(&[
                crate::der::uint(sig.signature_r().value()),
                crate::der::uint(sig.signature_s().value()),
            ])),
            (SignatureScheme::RsaPkcs1Sha256, Signature::RsaSsa(sig))
            | (SignatureScheme::RsaPssSha256, Signature::RsaPss(sig)) => {
                left_pad(sig.signature().value(), 256)
                    .ok_or_else(|| Error::key(STEP, "the TPM returned an over-long RSA signature"))
            }
            (_, other) => {
                Err(Error::key(STEP, format!("the TPM answered with a {:?} signature", other.algorithm())))
            }
        }
    }

    fn uri(&self) -> Option<String> {
        Some(self.uri.clone())
    }

    #[cfg(feature = "decrypt")]
    fn decrypt_pkcs1v15(&self, ciphertext: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
        const STEP: &str = "decrypting with the TPM";
        if self.algorithm != Algorithm::Rsa2048 || !self.public.object_attributes().decrypt() {
            return Err(Error::key(STEP, "only RSA keys created by this version can decrypt"));
        }
        let ciphertext = tss_esapi::structures::PublicKeyRsa::try_from(ciphertext.to_vec())
            .map_err(|e| tpm_error(STEP, "preparing the ciphertext", e))?;
        let plain = self.with_loaded(STEP, |ctx, key| {
            ctx.rsa_decrypt(
                key,
                ciphertext,
                tss_esapi::structures::RsaDecryptionScheme::RsaEs,
                tss_esapi::structures::Data::default(),
            )
        })?;
        Ok(zeroize::Zeroizing::new(plain.value().to_vec()))
    }
}

/// One TCTI connection, held under the process-wide TPM lock. Dropping the context flushes any
/// object handle it still tracks (tss-esapi's `Drop`), so an early return leaks nothing either.
struct Tpm {
    ctx: Context,
    _lock: MutexGuard<'static, ()>,
}

impl Tpm {
    fn open(tcti: &TctiNameConf, step: &'static str) -> Result<Tpm, Error> {
        let lock = TPM_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut ctx = Context::new(tcti.clone()).map_err(|e| {
            Error::key(step, format!("cannot open the TPM at tcti {} ({e})", tcti_display(tcti)))
        })?;
        free_object_slots(&mut ctx).map_err(|e| tpm_error(step, "freeing transient object slots", e))?;
        Ok(Tpm { ctx, _lock: lock })
    }

    /// Creates the SRK, runs `f` (described by `what`) with it in a password session, and flushes
    /// the SRK.
    fn with_srk<T>(
        &mut self,
        step: &'static str,
        what: &str,
        f: impl FnOnce(&mut Context, KeyHandle) -> tss_esapi::Result<T>,
    ) -> Result<T, Error> {
        let template = srk_template().map_err(|e| tpm_error(step, "building the SRK template", e))?;
        self.ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            let srk = ctx
                .create_primary(Hierarchy::Owner, template, None, None, None, None)
                .map_err(|e| tpm_error(step, "creating the storage root key", e))?
                .key_handle;
            let result = f(ctx, srk);
            let flushed = ctx.flush_context(srk.into());
            let value = result.map_err(|e| tpm_error(step, what, e))?;
            flushed.map_err(|e| tpm_error(step, "flushing the storage root key", e))?;
            Ok(value)
        })
    }
}

/// Transient objects this provider has loaded at once: the SRK and the key.
const OBJECTS_NEEDED: u32 = 2;

/// Makes room for the SRK and the key when the TPM has no two free transient object slots.
///
/// Behind a resource manager (`/dev/tpmrm0`, tpm2-abrmd) each connection sees its own objects
/// only, so slots are always free here. Without one (swtpm, a raw `/dev/tpm0`; three slots) a
/// process killed between load and flush leaves its objects loaded for good, and every later
/// operation would fail with "out of memory for object contexts" until a reboot. Such leftovers
/// are flushed. A process using the raw TPM at this very instant would lose its objects too;
/// on a device where that can happen, use a resource manager.
fn free_object_slots(ctx: &mut Context) -> tss_esapi::Result<()> {
    let (properties, _) = ctx.get_capability(CapabilityType::TpmProperties, TPM2_PT_HR_TRANSIENT_AVAIL, 1)?;
    let available = match properties {
        CapabilityData::TpmProperties(list) => list.find(PropertyTag::HrTransientAvail).map(|p| p.value()),
        _ => None,
    };
    if available.is_none_or(|free| free >= OBJECTS_NEEDED) {
        return Ok(());
    }
    let (handles, _) = ctx.get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)?;
    let CapabilityData::Handles(handles) = handles else { return Ok(()) };
    for handle in handles.iter().copied() {
        let object = ctx.tr_from_tpm_public(handle)?;
        ctx.flush_context(object)?;
    }
    log::warn!(
        "the TPM had {} free transient object slots: flushed {} objects left loaded by a process that \
         stopped without flushing them (no resource manager)",
        available.unwrap_or_default(),
        handles.len()
    );
    Ok(())
}

/// The ECC P-256 SRK template of the TCG "TPM 2.0 Provisioning Guidance" (§7.5.1): restricted
/// decryption key, AES-128-CFB for children, noDA, unique = two 32-byte zero coordinates.
fn srk_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let zero = EccParameter::try_from(vec![0u8; 32])?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(zero.clone(), zero))
        .build()
}

/// An unrestricted signing key (so it signs digests it did not compute), not duplicable. RSA keys
/// get the null scheme so one key can sign both PKCS#1 v1.5 (X.509, JWT) and PSS (TLS 1.3), and
/// may also decrypt (SCEP encrypts its answer to the device key, RFC 8894 §3.3.2).
fn key_template(algorithm: Algorithm) -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .with_decrypt(algorithm == Algorithm::Rsa2048)
        .build()?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes);
    match algorithm {
        Algorithm::P256 => builder
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new_unrestricted_signing_key(
                    EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                    EccCurve::NistP256,
                )
                .build()?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build(),
        Algorithm::Rsa2048 => builder
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_rsa_parameters(
                PublicRsaParametersBuilder::new_unrestricted_signing_key(
                    RsaScheme::Null,
                    RsaKeyBits::Rsa2048,
                    RsaExponent::default(),
                )
                .with_is_decryption_key(true)
                .build()?,
            )
            .with_rsa_unique_identifier(PublicKeyRsa::default())
            .build(),
    }
}

fn tpm_error(step: &'static str, what: &str, e: tss_esapi::Error) -> Error {
    let hint = match e {
        tss_esapi::Error::Tss2Error(rc) => match rc.kind() {
            Some(Tss2ResponseCodeKind::ObjectMemory) => {
                "; the TPM has no free transient object slot: another client without a resource manager \
                 left objects loaded (use device:/dev/tpmrm0, or flush with tpm2_flushcontext -t)"
            }
            Some(Tss2ResponseCodeKind::BadAuth | Tss2ResponseCodeKind::AuthFail) => {
                "; the owner hierarchy has an authorization value, but this provider needs the empty owner auth"
            }
            Some(Tss2ResponseCodeKind::Integrity) => {
                "; the key blob was not made by this TPM or the TPM was cleared since"
            }
            _ => "",
        },
        tss_esapi::Error::WrapperError(_) => "",
    };
    Error::key(step, format!("{what}: {e}{hint}"))
}

fn tcti_display(tcti: &TctiNameConf) -> String {
    std::ffi::CString::try_from(tcti.clone())
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{tcti:?}"))
}

/// `tpm:blob;alg=<alg>;name=<hex>` → (algorithm, name bytes).
fn parse_uri(uri: &str) -> Option<(Algorithm, Vec<u8>)> {
    let rest = uri.strip_prefix(URI_PREFIX)?;
    let (mut algorithm, mut name) = (None, None);
    for part in rest.split(';') {
        match part.split_once('=')? {
            ("alg", "p256") => algorithm = Some(Algorithm::P256),
            ("alg", "rsa2048") => algorithm = Some(Algorithm::Rsa2048),
            ("name", value) => name = Some(unhex(value)?),
            _ => return None,
        }
    }
    Some((algorithm?, name?))
}

/// The TPM Name of an object: nameAlg (SHA-256, 0x000b) ‖ SHA-256(TPMT_PUBLIC). `tpm2_readpublic`
/// prints the same value, so the URI names the key the way TPM tools do.
fn tpm_name(public_blob: &[u8]) -> Vec<u8> {
    let mut name = vec![0x00, 0x0b];
    name.extend_from_slice(
        ring::digest::digest(&ring::digest::SHA256, public_blob.get(2..).unwrap_or(&[])).as_ref(),
    );
    name
}

fn unmarshal_public(blob: &[u8]) -> Option<Public> {
    let size = u16::from_be_bytes([*blob.first()?, *blob.get(1)?]) as usize;
    if blob.len() != size + 2 {
        return None;
    }
    Public::try_from(PublicBuffer::unmarshall(blob).ok()?).ok()
}

/// TPM2B_PRIVATE on the wire: a big-endian u16 size, then the opaque buffer.
fn marshal_private(private: &Private) -> Vec<u8> {
    let value = private.value();
    let mut out = (value.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(value);
    out
}

fn unmarshal_private(blob: &[u8]) -> Option<Private> {
    let size = u16::from_be_bytes([*blob.first()?, *blob.get(1)?]) as usize;
    if blob.len() != size + 2 {
        return None;
    }
    Private::try_from(blob[2..].to_vec()).ok()
}

fn left_pad(value: &[u8], len: usize) -> Option<Vec<u8>> {
    let value = &value[value.iter().take_while(|b| **b == 0).count().min(value.len())..];
    if value.len() > len {
        return None;
    }
    let mut out = vec![0u8; len - value.len()];
    out.extend_from_slice(value);
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let pair = |p: &[u8]| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok().filter(|_| p.len() == 2);
    text.as_bytes().chunks(2).map(pair).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_integers_are_minimal_and_positive() {
        assert_eq!(crate::der::uint(&[0, 0, 0x7f]), vec![2, 1, 0x7f]);
        assert_eq!(crate::der::uint(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(crate::der::uint(&[0, 0]), vec![2, 1, 0]);
        assert_eq!(crate::der::tlv(0x30, &[0u8; 300])[..4], [0x30, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn uris_round_trip_and_reject_strangers() {
        let (alg, name) = parse_uri("tpm:blob;alg=rsa2048;name=000bff").unwrap();
        assert_eq!((alg, name), (Algorithm::Rsa2048, vec![0, 0x0b, 0xff]));
        assert!(parse_uri("tpm:blob;alg=p384;name=00").is_none());
        assert!(parse_uri("pkcs11:object=x").is_none());
        assert!(parse_uri("tpm:blob;alg=p256").is_none());
    }

    #[test]
    fn a_bad_tcti_is_refused_with_its_text() {
        let err = TpmProvider::new(TpmConfig { tcti: "bogus:thing".into() }).unwrap_err().to_string();
        assert!(err.contains("bogus:thing"), "{err}");
    }
}
