//! The `pkcs11` key provider (design.md §3 `key.pkcs11`): keys generated on a PKCS#11 token
//! (SoftHSM2, tpm2-pkcs11, a smart card or HSM) as sensitive, non-extractable, private objects.
//!
//! The module is loaded with dlopen (crate `cryptoki`), so this provider needs a dynamically linked
//! build: a static musl binary cannot load PKCS#11 modules.
//!
//! One provider holds one read/write session, logged in once as the user, for its whole life. A
//! refused PIN is [`Error::Pin`] and is never retried here: tokens lock after a few wrong PINs.
//!
//! Keys are named by label: the key of slot directory `slots/<n>` is `<key_label>.<n>`, with a
//! random CKA_ID shared by its private and public objects. `slots/<n>/key.uri` holds the RFC 7512
//! URI `pkcs11:token=<token>;object=<key_label>.<n>;type=private`, which `load` follows. Renewal
//! without rotation copies that file, so one token key can be named by two slots; `delete` only
//! destroys a key no sibling slot still names, and `retain` destroys keys with our prefix that no
//! live slot names (the orphan a crash between generate and install leaves).
//!
//! Signing: ECDSA with CKM_ECDSA_SHA256 when the token offers it (tpm2-pkcs11), else SHA-256 with
//! ring and raw CKM_ECDSA on the digest (SoftHSM2 2.6.1 has only that); the token's r||s is
//! converted to the DER `Ecdsa-Sig-Value` callers need. RSA uses CKM_SHA256_RSA_PKCS and
//! CKM_SHA256_RSA_PKCS_PSS (SHA-256, MGF1-SHA-256, salt 32), falling back to the raw CKM_RSA_PKCS /
//! CKM_RSA_PKCS_PSS mechanisms over a ring digest when the token lacks the combined ones.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::key::spki;
use crate::store;
use crate::{Algorithm, DeviceKey, Error, KeyProvider, SignatureScheme};

/// The file in a slot that names the slot's token key.
pub const KEY_URI_FILE: &str = "key.uri";

/// DER OID prime256v1 (CKA_EC_PARAMS of a P-256 key).
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1), for raw CKM_RSA_PKCS.
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00,
    0x04, 0x20,
];
/// PSS salt length (bytes) for RsaPssSha256: the digest length, as TLS 1.3 requires.
const PSS_SALT_LEN: usize = 32;

/// Which token to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSelector {
    /// By token label: stable, unlike slot ids (SoftHSM2 gives an initialised token a random slot id).
    Label(String),
    /// By PKCS#11 slot id.
    Slot(u64),
}

/// Plain settings for [`Pkcs11Provider::new`]; the agent's config layer fills it in.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    pub token: TokenSelector,
    /// The user PIN, read from `pin_file`.
    pub pin: Zeroizing<String>,
    /// Prefix of our key labels: slot `n`'s key is `<key_label>.<n>`.
    pub key_label: String,
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("key_label", &self.key_label)
            .finish_non_exhaustive()
    }
}

/// The attributes of an RFC 7512 `pkcs11:` URI this agent uses. Others are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UriParts {
    pub token: Option<String>,
    pub slot_id: Option<u64>,
    pub object: Option<String>,
    pub module_path: Option<PathBuf>,
}

/// Parses an RFC 7512 URI: `pkcs11:` path attributes separated by `;`, then optionally `?` and query
/// attributes separated by `&`, values percent-decoded. Unknown attributes are ignored; an attribute
/// given twice, a malformed escape or a non-numeric `slot-id` is an error. `pin-value` is refused
/// (design.md: secrets are never inline; use `pin_file`), and its value is never echoed.
pub fn parse_uri(uri: &str) -> Result<UriParts, Error> {
    const STEP: &str = "parsing pkcs11: URI";
    let rest = match uri.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("pkcs11:") => &uri[7..],
        _ => return Err(Error::key(STEP, format!("{uri:?} does not start with pkcs11:"))),
    };
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let mut parts = UriParts::default();
    let attributes = path.split(';').chain(query.into_iter().flat_map(|q| q.split('&')));
    let mut seen: Vec<String> = Vec::new();
    for attribute in attributes.filter(|a| !a.is_empty()) {
        let (name, value) = attribute
            .split_once('=')
            .ok_or_else(|| Error::key(STEP, format!("attribute {attribute:?} has no '='")))?;
        let name = name.to_ascii_lowercase();
        if name == "pin-value" {
            return Err(Error::key(STEP, "pin-value is not accepted in a URI: put the PIN in pin_file"));
        }
        if seen.contains(&name) {
            return Err(Error::key(STEP, format!("attribute {name} is given twice")));
        }
        seen.push(name.clone());
        let text = || -> Result<String, Error> {
            String::from_utf8(percent_decode(value)?)
                .map_err(|_| Error::key(STEP, format!("{name} is not UTF-8 after percent-decoding")))
        };
        match name.as_str() {
            "token" => parts.token = Some(text()?),
            "object" => parts.object = Some(text()?),
            "slot-id" => {
                let digits = text()?;
                parts.slot_id = Some(
                    digits
                        .parse()
                        .map_err(|_| Error::key(STEP, format!("slot-id {digits:?} is not a number")))?,
                )
            }
            "module-path" => parts.module_path = Some(PathBuf::from(text()?)),
            _ => {}
        }
    }
    Ok(parts)
}

fn percent_decode(value: &str) -> Result<Vec<u8>, Error> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    Error::key("parsing pkcs11: URI", format!("bad percent escape in {value:?}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Percent-encodes everything but RFC 3986 unreserved characters: always valid in a pkcs11: value.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URI recorded in `key.uri` for a key labelled `object` on token `token`.
fn key_uri(token: &str, object: &str) -> String {
    format!("pkcs11:token={};object={};type=private", percent_encode(token), percent_encode(object))
}

/// PKCS#11 modules are loaded and C_Initialize'd once per process and never finalised: the standard
/// allows one initialisation per process, and a provider rebuilt on SIGHUP must not pull the module
/// out from under keys still in use.
fn module(path: &Path) -> Result<Pkcs11, Error> {
    static MODULES: OnceLock<Mutex<Vec<(PathBuf, Pkcs11)>>> = OnceLock::new();
    let mut modules = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, ctx)) = modules.iter().find(|(p, _)| p == path) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(path)
        .map_err(|e| Error::key("loading PKCS#11 module", format!("{}: {e}", path.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(p11("initialising PKCS#11 module", e)),
    }
    modules.push((path.to_path_buf(), ctx.clone()));
    Ok(ctx)
}

fn p11(step: &'static str, e: P11Error) -> Error {
    let detail = match e {
        P11Error::Pkcs11(rv, function) => format!("{function} returned {rv:?}"),
        other => other.to_string(),
    };
    Error::key(step, detail)
}

/// The logged-in session and what we learnt about the token, shared by the provider and its keys.
struct Token {
    session: Mutex<Session>,
    label: String,
    key_label: String,
    ecdsa_sha256: bool,
    sha256_rsa_pkcs: bool,
    sha256_rsa_pss: bool,
    _ctx: Pkcs11,
}

impl Token {
    fn session(&self) -> MutexGuard<'_, Session> {
        // A panic while holding the lock cannot leave the session half-changed in a way we rely on.
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keys on one PKCS#11 token.
pub struct Pkcs11Provider {
    token: Arc<Token>,
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Provider").field("token", &self.token.label).finish_non_exhaustive()
    }
}

impl Pkcs11Provider {
    /// Loads the module, finds the token, opens a read/write session and logs in once as the user.
    pub fn new(config: Pkcs11Config) -> Result<Self, Error> {
        if config.key_label.is_empty() {
            return Err(Error::key("opening PKCS#11 token", "key_label is empty"));
        }
        let ctx = module(&config.module)?;
        let (slot, label) = find_token(&ctx, &config.token)?;
        let mechanisms = ctx.get_mechanism_list(slot).map_err(|e| p11("listing token mechanisms", e))?;
        let session = ctx.open_rw_session(slot).map_err(|e| p11("opening PKCS#11 session", e))?;
        let pin = AuthPin::from(config.pin.as_str());
        match session.login(UserType::User, Some(&pin)) {
            // Login state is per token and process: a second provider (config reload) shares it.
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(P11Error::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
                return Err(Error::Pin { detail: format!("token {label:?} says the PIN is incorrect") })
            }
            Err(P11Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(Error::Pin {
                    detail: format!(
                        "token {label:?} has locked the user PIN; the security officer must unlock it"
                    ),
                })
            }
            Err(P11Error::Pkcs11(RvError::PinExpired, _)) => {
                return Err(Error::Pin { detail: format!("token {label:?} says the PIN has expired") })
            }
            Err(e) => return Err(p11("logging in to PKCS#11 token", e)),
        }
        let token = Token {
            session: Mutex::new(session),
            ecdsa_sha256: mechanisms.contains(&MechanismType::ECDSA_SHA256),
            sha256_rsa_pkcs: mechanisms.contains(&MechanismType::SHA256_RSA_PKCS),
            sha256_rsa_pss: mechanisms.contains(&MechanismType::SHA256_RSA_PKCS_PSS),
            label,
            key_label: config.key_label,
            _ctx: ctx,
        };
        Ok(Pkcs11Provider { token: Arc::new(token) })
    }

    /// Signs with the raw mechanisms (CKM_ECDSA, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS over a ring digest)
    /// even when the token offers the hashing ones: how tokens that lack them are served. For tests.
    #[doc(hidden)]
    pub fn with_raw_mechanisms(mut self) -> Self {
        if let Some(token) = Arc::get_mut(&mut self.token) {
            token.ecdsa_sha256 = false;
            token.sha256_rsa_pkcs = false;
            token.sha256_rsa_pss = false;
        }
        self
    }

    /// The label of the token in use.
    pub fn token_label(&self) -> &str {
        &self.token.label
    }

    /// The label of the key a slot directory gets: `<key_label>.<slot dir name>`.
    fn label_for(&self, slot: &Path) -> Result<String, Error> {
        let name = slot.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            Error::key("naming key", format!("{} has no usable directory name", slot.display()))
        })?;
        Ok(format!("{}.{name}", self.token.key_label))
    }

    /// The key label `slot/key.uri` names, if the file exists and names a key on our token.
    fn named_label(&self, slot: &Path) -> Result<Option<String>, Error> {
        let path = slot.join(KEY_URI_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading key URI", &path, e)),
        };
        let parts = parse_uri(text.trim())?;
        if parts.token.as_deref().is_some_and(|t| t != self.token.label) {
            return Ok(None);
        }
        Ok(parts.object)
    }

    /// Whether a slot directory next to `slot` (same parent, not `slot`) names `label`.
    fn named_by_sibling(&self, slot: &Path, label: &str) -> Result<bool, Error> {
        let Some(parent) = slot.parent() else { return Ok(false) };
        let entries = match fs::read_dir(parent) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("listing slots", parent, e)),
        };
        for entry in entries {
            let sibling = entry.map_err(|e| Error::io("listing slots", parent, e))?.path();
            if sibling.file_name() != slot.file_name()
                && sibling.is_dir()
                && self.named_label(&sibling)?.as_deref() == Some(label)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn generate_pair(
        &self,
        algorithm: Algorithm,
        label: &str,
    ) -> Result<(ObjectHandle, ObjectHandle), Error> {
        let mut id = [0u8; 16];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| Error::key("generating key", "the system random generator failed"))?;
        let common = |class: ObjectClass| {
            vec![
                Attribute::Class(class),
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ]
        };
        let mut public = common(ObjectClass::PUBLIC_KEY);
        public.push(Attribute::Verify(true));
        let mut private = common(ObjectClass::PRIVATE_KEY);
        private.extend([
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ]);
        let mechanism = match algorithm {
            Algorithm::P256 => {
                public.extend([Attribute::KeyType(KeyType::EC), Attribute::EcParams(P256_PARAMS.to_vec())]);
                private.push(Attribute::KeyType(KeyType::EC));
                Mechanism::EccKeyPairGen
            }
            Algorithm::Rsa2048 => {
                public.extend([
                    Attribute::KeyType(KeyType::RSA),
                    Attribute::ModulusBits(ulong(2048)?),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ]);
                private.push(Attribute::KeyType(KeyType::RSA));
                // SCEP's CertRep is encrypted to the device key (RFC 8894 §3.3.2).
                private.push(Attribute::Decrypt(true));
                public.push(Attribute::Encrypt(true));
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        let step = match algorithm {
            Algorithm::P256 => "generating P-256 key on the token",
            Algorithm::Rsa2048 => "generating RSA-2048 key on the token",
        };
        let (public, private) = self
            .token
            .session()
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| p11(step, e))?;
        Ok((private, public))
    }

    /// Destroys every object of ours labelled `label` (private and public key).
    fn destroy(&self, label: &str) -> Result<(), Error> {
        let session = self.token.session();
        let objects = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .map_err(|e| p11("finding key to delete", e))?;
        for object in objects {
            match session.destroy_object(object) {
                Ok(()) | Err(P11Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => {}
                Err(e) => return Err(p11("destroying key on the token", e)),
            }
        }
        Ok(())
    }

    /// Opens the key pair labelled `label`.
    fn open(&self, label: &str) -> Result<Pkcs11Key, Error> {
        let session = self.token.session();
        let find = |class: ObjectClass| {
            session
                .find_objects(&[Attribute::Class(class), Attribute::Label(label.as_bytes().to_vec())])
                .map_err(|e| p11("finding key on the token", e))
        };
        let private = match find(ObjectClass::PRIVATE_KEY)?.as_slice() {
            [one] => *one,
            [] => {
                return Err(Error::key(
                    "loading key",
                    format!("token {:?} has no private key labelled {label:?}", self.token.label),
                ))
            }
            _ => {
                return Err(Error::key(
                    "loading key",
                    format!("token {:?} has several private keys labelled {label:?}", self.token.label),
                ))
            }
        };
        let attrs = session
            .get_attributes(private, &[AttributeType::KeyType, AttributeType::Id])
            .map_err(|e| p11("reading key attributes", e))?;
        let mut key_type = None;
        let mut id = None;
        for attr in attrs {
            match attr {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::Id(i) => id = Some(i),
                _ => {}
            }
        }
        let algorithm = match key_type {
            Some(KeyType::EC) => Algorithm::P256,
            Some(KeyType::RSA) => Algorithm::Rsa2048,
            other => {
                return Err(Error::key(
                    "loading key",
                    format!("key {label:?} has unsupported key type {other:?}"),
                ))
            }
        };
        let mut template =
            vec![Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Label(label.as_bytes().to_vec())];
        template.extend(id.map(Attribute::Id));
        let public = match find_first(&session, &template)? {
            Some(public) => public,
            None => {
                return Err(Error::key(
                    "loading key",
                    format!("token {:?} has no public key labelled {label:?}", self.token.label),
                ))
            }
        };
        drop(session);
        self.key_from(algorithm, private, public, label)
    }

    /// The key made of a private and a public object already found (or just generated: right
    /// after a destroy in the same session, tpm2-pkcs11 1.9 may not find a new object by label).
    fn key_from(
        &self,
        algorithm: Algorithm,
        private: ObjectHandle,
        public: ObjectHandle,
        label: &str,
    ) -> Result<Pkcs11Key, Error> {
        let session = self.token.session();
        let spki = match algorithm {
            Algorithm::P256 => ec_spki(&session, public, label)?,
            Algorithm::Rsa2048 => rsa_spki(&session, public, label)?,
        };
        drop(session);
        Ok(Pkcs11Key {
            token: Arc::clone(&self.token),
            private,
            algorithm,
            spki,
            uri: key_uri(&self.token.label, label),
        })
    }

    /// Labels of all key objects on the token that are ours: `<key_label>.<digits>`, the names
    /// [`Store`](crate::Store) slot directories give. Anything else on the token is left alone.
    /// Whether `label` is one this provider creates: `<key_label>.<digits>`.
    fn is_ours(&self, label: &str) -> bool {
        label
            .strip_prefix(self.token.key_label.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// Destroys key objects that a key generation interrupted by a crash left half made: no
    /// label, no CKA_ID and not CKA_LOCAL (SoftHSM2 creates the objects, then writes their
    /// attributes; a SIGKILL in between leaves such objects, found by the random-kill run). No
    /// RFC 7512 URI can name them and no finished generation makes them, so they are nobody's.
    /// Runs after an install (with [`KeyProvider::retain`]), outside any generation.
    fn destroy_unfinished(&self) -> Result<(), Error> {
        let session = self.token.session();
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            let objects = session
                .find_objects(&[Attribute::Class(class)])
                .map_err(|e| p11("listing keys on the token", e))?;
            for object in objects {
                let attrs = session
                    .get_attributes(object, &[AttributeType::Label, AttributeType::Id, AttributeType::Local])
                    .map_err(|e| p11("reading key attributes", e))?;
                let unfinished = attrs.iter().all(|attr| match attr {
                    Attribute::Label(bytes) | Attribute::Id(bytes) => bytes.is_empty(),
                    Attribute::Local(local) => !*local,
                    _ => true,
                });
                if unfinished {
                    log::info!(
                        "destroying a key object without label or id on token {:?} (a key generation \
                         interrupted by a crash)",
                        self.token.label
                    );
                    match session.destroy_object(object) {
                        Ok(()) | Err(P11Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => {}
                        Err(e) => return Err(p11("destroying key on the token", e)),
                    }
                }
            }
        }
        Ok(())
    }

    fn our_labels(&self) -> Result<Vec<String>, Error> {
        let session = self.token.session();
        let mut labels = Vec::new();
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            let objects = session
                .find_objects(&[Attribute::Class(class)])
                .map_err(|e| p11("listing keys on the token", e))?;
            for object in objects {
                let attrs = session
                    .get_attributes(object, &[AttributeType::Label])
                    .map_err(|e| p11("reading key label", e))?;
                for attr in attrs {
                    if let Attribute::Label(bytes) = attr {
                        if let Ok(label) = String::from_utf8(bytes) {
                            if self.is_ours(&label) && !labels.contains(&label) {
                                labels.push(label);
                            }
                        }
                    }
                }
            }
        }
        Ok(labels)
    }
}

fn remove_key_uri(slot: &Path) -> Result<(), Error> {
    let path = slot.join(KEY_URI_FILE);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("deleting key URI", &path, e)),
        _ => Ok(()),
    }
}

fn ulong(value: usize) -> Result<Ulong, Error> {
    Ulong::try_from(value).map_err(|_| Error::key("building PKCS#11 template", "value out of range"))
}

fn find_first(session: &Session, template: &[Attribute]) -> Result<Option<ObjectHandle>, Error> {
    let found = session.find_objects(template).map_err(|e| p11("finding key on the token", e))?;
    Ok(found.first().copied())
}

fn find_token(ctx: &Pkcs11, selector: &TokenSelector) -> Result<(Slot, String), Error> {
    let slots = ctx.get_slots_with_token().map_err(|e| p11("listing PKCS#11 slots", e))?;
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    for slot in slots {
        // A token being removed or set up by another process can fail this; it is not ours then.
        let info = match ctx.get_token_info(slot) {
            Ok(info) => info,
            Err(e) => {
                unreadable.push(format!("slot {}: {}", slot.id(), p11("reading token info", e)));
                continue;
            }
        };
        let matches = match selector {
            TokenSelector::Label(label) => info.label() == label,
            TokenSelector::Slot(id) => slot.id() == *id,
        };
        if matches {
            found.push((slot, info.label().to_string()));
        }
    }
    let what = match selector {
        TokenSelector::Label(label) => format!("token labelled {label:?}"),
        TokenSelector::Slot(id) => format!("token in slot {id}"),
    };
    match found.len() {
        1 => Ok(found.remove(0)),
        0 if unreadable.is_empty() => Err(Error::key("opening PKCS#11 token", format!("no {what}"))),
        0 => Err(Error::key("opening PKCS#11 token", format!("no {what} ({})", unreadable.join("; ")))),
        n => Err(Error::key("opening PKCS#11 token", format!("{n} tokens match: {what}; select by slot"))),
    }
}

fn ec_spki(session: &Session, public: ObjectHandle, label: &str) -> Result<Vec<u8>, Error> {
    let attrs = session
        .get_attributes(public, &[AttributeType::EcPoint, AttributeType::EcParams])
        .map_err(|e| p11("reading EC public key", e))?;
    let mut point = None;
    for attr in attrs {
        match attr {
            Attribute::EcPoint(p) => point = Some(p),
            Attribute::EcParams(params) if params != P256_PARAMS => {
                return Err(Error::key("loading key", format!("key {label:?} is not on curve P-256")))
            }
            _ => {}
        }
    }
    let point =
        point.ok_or_else(|| Error::key("loading key", format!("key {label:?} has no CKA_EC_POINT")))?;
    // PKCS#11 says DER OCTET STRING around the point; a few modules return the bare point.
    let raw = match point.as_slice() {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        bare if bare.len() == 65 => bare,
        _ => return Err(Error::key("loading key", format!("key {label:?} has a malformed CKA_EC_POINT"))),
    };
    if raw[0] != 0x04 {
        return Err(Error::key("loading key", format!("key {label:?} has a compressed or invalid EC point")));
    }
    Ok(spki::p256(raw))
}

fn rsa_spki(session: &Session, public: ObjectHandle, label: &str) -> Result<Vec<u8>, Error> {
    let attrs = session
        .get_attributes(public, &[AttributeType::Modulus, AttributeType::PublicExponent])
        .map_err(|e| p11("reading RSA public key", e))?;
    let (mut n, mut e) = (None, None);
    for attr in attrs {
        match attr {
            Attribute::Modulus(v) => n = Some(v),
            Attribute::PublicExponent(v) => e = Some(v),
            _ => {}
        }
    }
    let (Some(n), Some(e)) = (n, e) else {
        return Err(Error::key("loading key", format!("key {label:?} lacks its modulus or exponent")));
    };
    let n = strip_zeros(&n);
    if n.len() != 256 {
        return Err(Error::key("loading key", format!("key {label:?} is RSA-{}, not RSA-2048", n.len() * 8)));
    }
    let mut body = crate::der::uint(n);
    body.extend(crate::der::uint(&e));
    Ok(spki::rsa(&crate::der::tlv(0x30, &body)))
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len().saturating_sub(1));
    &bytes[start..]
}

/// Converts a PKCS#11 ECDSA signature (r||s, 32 bytes each) to DER `Ecdsa-Sig-Value`.
fn ecdsa_der(raw: &[u8]) -> Result<Vec<u8>, Error> {
    if raw.len() != 64 {
        return Err(Error::key(
            "signing",
            format!("the token returned a {}-byte ECDSA signature", raw.len()),
        ));
    }
    let mut body = crate::der::uint(&raw[..32]);
    body.extend(crate::der::uint(&raw[32..]));
    Ok(crate::der::tlv(0x30, &body))
}

impl KeyProvider for Pkcs11Provider {
    fn name(&self) -> &'static str {
        "pkcs11"
    }

    fn generate(&self, algorithm: Algorithm, slot: &Path) -> Result<Arc<dyn DeviceKey>, Error> {
        let label = self.label_for(slot)?;
        // A key with this label can only be left by a crash before its slot was recorded, or by a
        // slot directory number reused after pruning; either way destroy it unless a slot names it.
        if self.named_by_sibling(slot, &label)? {
            return Err(Error::key(
                "generating key",
                format!("key {label:?} already exists and another slot uses it"),
            ));
        }
        self.destroy(&label)?;
        let (private, public) = self.generate_pair(algorithm, &label)?;
        let written = self.key_from(algorithm, private, public, &label).and_then(|key| {
            let line = format!("{}\n", key.uri);
            store::write_file_atomic(&slot.join(KEY_URI_FILE), line.as_bytes(), 0o644).map(|()| key)
        });
        match written {
            Ok(key) => Ok(Arc::new(key)),
            Err(e) => {
                let _ = self.destroy(&label);
                Err(e)
            }
        }
    }

    fn load(&self, slot: &Path) -> Result<Arc<dyn DeviceKey>, Error> {
        let path = slot.join(KEY_URI_FILE);
        let text = fs::read_to_string(&path).map_err(|e| Error::io("reading key URI", &path, e))?;
        let parts = parse_uri(text.trim())?;
        if let Some(token) = parts.token.as_deref().filter(|t| *t != self.token.label) {
            return Err(Error::key(
                "loading key",
                format!(
                    "{} names token {token:?}, but the provider uses token {:?}",
                    path.display(),
                    self.token.label
                ),
            ));
        }
        let label = parts
            .object
            .ok_or_else(|| Error::key("loading key", format!("{} names no object", path.display())))?;
        Ok(Arc::new(self.open(&label)?))
    }

    fn reuse(&self, from: &Path, to: &Path) -> Result<(), Error> {
        let source = from.join(KEY_URI_FILE);
        let text = fs::read_to_string(&source).map_err(|e| Error::io("reading key URI", &source, e))?;
        parse_uri(text.trim())?;
        store::write_file_atomic(&to.join(KEY_URI_FILE), text.as_bytes(), 0o644)
    }

    fn delete(&self, slot: &Path) -> Result<(), Error> {
        let Some(label) = self.named_label(slot)? else {
            return remove_key_uri(slot);
        };
        // Reference first: a crash between the two steps leaves an orphan that `retain` removes.
        remove_key_uri(slot)?;
        // key.uri is a file on disk: it may name any object on the token (a site's CA key, another
        // agent's key). We only ever destroy what we made, `<key_label>.<digits>`.
        if !self.is_ours(&label) {
            log::warn!(
                "{} named key {label:?}, which is not one of ours ({}.<n>); the reference was dropped, \
                 the key left on the token",
                slot.join(KEY_URI_FILE).display(),
                self.token.key_label
            );
            return Ok(());
        }
        if self.named_by_sibling(slot, &label)? {
            return Ok(());
        }
        self.destroy(&label)
    }

    fn retain(&self, live: &[PathBuf]) -> Result<(), Error> {
        let mut named = Vec::new();
        for slot in live {
            named.extend(self.named_label(slot)?);
        }
        for label in self.our_labels()? {
            if !named.contains(&label) {
                log::info!("destroying orphaned key {label:?} on token {:?}", self.token.label);
                self.destroy(&label)?;
            }
        }
        self.destroy_unfinished()
    }
}

/// A key pair on the token; signing goes through the provider's session.
pub struct Pkcs11Key {
    token: Arc<Token>,
    private: ObjectHandle,
    algorithm: Algorithm,
    spki: Vec<u8>,
    uri: String,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("algorithm", &self.algorithm)
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Key {
    fn sign_with(&self, mechanism: &Mechanism, data: &[u8]) -> Result<Vec<u8>, Error> {
        self.token.session().sign(mechanism, self.private, data).map_err(|e| p11("signing on the token", e))
    }
}

impl DeviceKey for Pkcs11Key {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, Error> {
        if scheme.algorithm() != self.algorithm {
            return Err(Error::key(
                "signing",
                format!("a {} key cannot sign with {scheme:?}", self.algorithm.name()),
            ));
        }
        let sha256 = || digest::digest(&digest::SHA256, message);
        let pss = |hash_alg| {
            Ok::<_, Error>(PkcsPssParams {
                hash_alg,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: ulong(PSS_SALT_LEN)?,
            })
        };
        match scheme {
            SignatureScheme::EcdsaP256Sha256 => {
                let raw = if self.token.ecdsa_sha256 {
                    self.sign_with(&Mechanism::EcdsaSha256, message)?
                } else {
                    self.sign_with(&Mechanism::Ecdsa, sha256().as_ref())?
                };
                ecdsa_der(&raw)
            }
            SignatureScheme::RsaPkcs1Sha256 if self.token.sha256_rsa_pkcs => {
                self.sign_with(&Mechanism::Sha256RsaPkcs, message)
            }
            SignatureScheme::RsaPkcs1Sha256 => {
                let mut info = SHA256_DIGEST_INFO.to_vec();
                info.extend_from_slice(sha256().as_ref());
                self.sign_with(&Mechanism::RsaPkcs, &info)
            }
            SignatureScheme::RsaPssSha256 if self.token.sha256_rsa_pss => {
                self.sign_with(&Mechanism::Sha256RsaPkcsPss(pss(MechanismType::SHA256)?), message)
            }
            SignatureScheme::RsaPssSha256 => {
                self.sign_with(&Mechanism::RsaPkcsPss(pss(MechanismType::SHA256)?), sha256().as_ref())
            }
        }
    }

    fn uri(&self) -> Option<String> {
        Some(self.uri.clone())
    }

    #[cfg(feature = "decrypt")]
    fn decrypt_pkcs1v15(&self, ciphertext: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
        if self.algorithm != Algorithm::Rsa2048 {
            return Err(Error::key("decrypting", "a P-256 key cannot decrypt RSA key transport"));
        }
        self.token
            .session()
            .decrypt(&Mechanism::RsaPkcs, self.private, ciphertext)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| p11("decrypting on the token", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_attributes_are_percent_decoded_and_unknown_ones_ignored() {
        let parts = parse_uri(
            "pkcs11:token=agent%20token;object=device-key;slot-id=3;manufacturer=x;type=private\
             ?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/x",
        )
        .unwrap();
        assert_eq!(parts.token.as_deref(), Some("agent token"));
        assert_eq!(parts.object.as_deref(), Some("device-key"));
        assert_eq!(parts.slot_id, Some(3));
        assert_eq!(parts.module_path, Some(PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")));
        assert_eq!(parse_uri("pkcs11:").unwrap(), UriParts::default());
    }

    #[test]
    fn bad_uris_are_errors_that_never_echo_a_pin() {
        for bad in
            ["file:/x", "pkcs11:token=a;token=b", "pkcs11:slot-id=x", "pkcs11:object=%zz", "pkcs11:token"]
        {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
        let err = parse_uri("pkcs11:token=t?pin-value=secret123").unwrap_err().to_string();
        assert!(err.contains("pin_file") && !err.contains("secret123"), "{err}");
    }

    #[test]
    fn key_uris_round_trip_through_percent_encoding() {
        let uri = key_uri("my token;1", "dev/key.3");
        assert_eq!(uri, "pkcs11:token=my%20token%3B1;object=dev%2Fkey.3;type=private");
        let parts = parse_uri(&uri).unwrap();
        assert_eq!(parts.token.as_deref(), Some("my token;1"));
        assert_eq!(parts.object.as_deref(), Some("dev/key.3"));
    }

    #[test]
    fn raw_ecdsa_signatures_become_der() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[63] = 0x01; // s is 1 after stripping zeros
        let der = ecdsa_der(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 2 + 33 + 3, 0x02, 0x21, 0x00]);
        assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x01]);
        assert!(ecdsa_der(&raw[..63]).is_err());
    }

    #[test]
    fn rsa_public_key_integers_are_minimal_and_positive() {
        assert_eq!(crate::der::uint(&[0x00, 0x01, 0x00, 0x01]), vec![0x02, 0x03, 0x01, 0x00, 0x01]);
        assert_eq!(crate::der::uint(&[0xff]), vec![0x02, 0x02, 0x00, 0xff]);
        assert_eq!(crate::der::uint(&[0x00]), vec![0x02, 0x01, 0x00]);
    }
}
