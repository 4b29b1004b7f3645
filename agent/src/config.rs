//! The config file (design.md §3, §7), parsed once into a validated [`Settings`].
//!
//! Every error names the JSON path of the field (`error: ca.org_id: missing`), unknown keys are
//! errors, and nothing is created on disk while parsing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use enroll_hal::soft::SoftKey;
use enroll_hal::{Algorithm, DeviceKey};

use crate::error::{Error, Result};
use crate::files::Rule;
use crate::json::{self, Value};
use crate::secret::Secret;

/// Config files are small; a larger one is a mistake (or an attack on the parser).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Build-time default so a Yocto recipe can move it (style.md §11).
pub const DEFAULT_CONFIG_PATH: &str = match option_env!("ENROLL_AGENT_DEFAULT_CONFIG") {
    Some(p) => p,
    None => "/etc/enroll-agent/config.json",
};
const DEFAULT_STATE_DIR: &str = match option_env!("ENROLL_AGENT_DEFAULT_STATE_DIR") {
    Some(p) => p,
    None => "/var/lib/enroll-agent",
};

#[derive(Debug)]
pub struct Settings {
    pub state_dir: PathBuf,
    /// Prometheus textfile-collector file, rewritten after every enroll/renew (and `run` cycle).
    pub metrics_file: Option<PathBuf>,
    /// `storage.group` (resolved to a gid): consumers that may read the installed identity.
    pub storage_group: Option<u32>,
    pub subject: Subject,
    pub san: Sans,
    pub key: KeySettings,
    pub ca: Backend,
    pub tls: TlsSettings,
    pub renewal: RenewalPolicy,
    pub hooks: Hooks,
}

/// Subject attributes in DER order (most significant first).
#[derive(Debug, Clone, PartialEq)]
pub struct Subject {
    pub attributes: Vec<(SubjectAttribute, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectAttribute {
    C,
    ST,
    L,
    O,
    OU,
    CN,
    SerialNumber,
}

impl SubjectAttribute {
    const ALL: [SubjectAttribute; 7] =
        [Self::C, Self::ST, Self::L, Self::O, Self::OU, Self::CN, Self::SerialNumber];

    pub fn key(self) -> &'static str {
        match self {
            Self::C => "C",
            Self::ST => "ST",
            Self::L => "L",
            Self::O => "O",
            Self::OU => "OU",
            Self::CN => "CN",
            Self::SerialNumber => "serialNumber",
        }
    }

    /// Dotted OID (RFC 4519 / X.520).
    pub fn oid(self) -> &'static str {
        match self {
            Self::C => "2.5.4.6",
            Self::ST => "2.5.4.8",
            Self::L => "2.5.4.7",
            Self::O => "2.5.4.10",
            Self::OU => "2.5.4.11",
            Self::CN => "2.5.4.3",
            Self::SerialNumber => "2.5.4.5",
        }
    }
}

impl Subject {
    pub fn common_name(&self) -> &str {
        self.attributes.iter().find(|(a, _)| *a == SubjectAttribute::CN).map_or("", |(_, v)| v)
    }

    /// RFC 4514 string, least significant first (`CN=x,O=y,C=z`).
    pub fn rfc4514(&self) -> String {
        let escape = |v: &str| {
            let mut out = String::new();
            for (i, c) in v.chars().enumerate() {
                let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
                if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
                    out.push('\\');
                }
                out.push(c);
            }
            out
        };
        let parts: Vec<String> =
            self.attributes.iter().rev().map(|(a, v)| format!("{}={}", a.key(), escape(v))).collect();
        parts.join(",")
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sans {
    pub dns: Vec<String>,
    pub ip: Vec<IpAddr>,
    pub uri: Vec<String>,
    pub email: Vec<String>,
}

impl Sans {
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.ip.is_empty() && self.uri.is_empty() && self.email.is_empty()
    }
}

#[derive(Debug)]
pub struct KeySettings {
    pub algorithm: Algorithm,
    pub provider: Provider,
    pub rotate_on_renew: bool,
}

#[derive(Debug)]
pub enum Provider {
    File,
    /// A PKCS#11 token (cargo feature `pkcs11`).
    Pkcs11(Pkcs11Settings),
    /// A TPM 2.0 (cargo feature `tpm`).
    Tpm(TpmSettings),
    /// Keys generated and held by a Redtrust server (design.md §7 "Redtrust").
    Redtrust(RedtrustSettings),
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::File => "file",
            Provider::Pkcs11(_) => "pkcs11",
            Provider::Tpm(_) => "tpm",
            Provider::Redtrust(_) => "redtrust",
        }
    }

    /// Whether the key lives elsewhere and cannot sign on this device.
    pub fn is_remote(&self) -> bool {
        matches!(self, Provider::Redtrust(_))
    }
}

#[derive(Debug)]
pub struct Pkcs11Settings {
    /// The module (`.so`) to load.
    pub module: PathBuf,
    pub token: TokenSelector,
    pub pin: Secret,
    /// Keys are named `<key_label>.<slot number>`.
    pub key_label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Slot(u64),
}

#[derive(Debug)]
pub struct TpmSettings {
    /// TCTI as tpm2-tools spell it, e.g. `device:/dev/tpmrm0`.
    pub tcti: String,
}

#[derive(Debug)]
pub struct RedtrustSettings {
    /// Root of `/raapi/…` and `/authapi/…`.
    pub url: String,
    /// Root of `/authclient/auth/loginrequest` (defaults to `url`).
    pub auth_url: String,
    /// Partner name, sent uppercase.
    pub partner: String,
    pub hmac_secret: Secret,
    pub domain: Option<String>,
    pub redirect_url: String,
    /// Redtrust's name for the CA that issues (`provider` in csr/create and finalize).
    pub ca_provider: String,
    pub hash_type: String,
}

/// The CA protocol and its block. Every variant exists in every build (style.md item 2); the
/// client of each is compiled only with its cargo feature of the same name, and a config naming
/// one that is not is refused while parsing ([`check_protocol`]).
#[derive(Debug)]
pub enum Backend {
    Enos(EnosSettings),
    Ezca(EzcaSettings),
    Sectigo(SectigoSettings),
    Securosys(SecurosysSettings),
    /// EST, RFC 7030.
    Est(EstSettings),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Enos(_) => "enos",
            Backend::Ezca(_) => "ezca",
            Backend::Sectigo(_) => "sectigo",
            Backend::Securosys(_) => "securosys",
            Backend::Est(_) => "est",
        }
    }
}

/// Every CA protocol this version implements; each one's cargo feature has its name.
pub const PROTOCOLS: [&str; 5] = ["enos", "ezca", "sectigo", "securosys", "est"];

/// The CA protocols compiled into this build (`--version`).
pub fn protocols() -> Vec<&'static str> {
    let compiled = [
        cfg!(feature = "enos"),
        cfg!(feature = "ezca"),
        cfg!(feature = "sectigo"),
        cfg!(feature = "securosys"),
        cfg!(feature = "est"),
    ];
    PROTOCOLS.into_iter().zip(compiled).filter_map(|(name, on)| on.then_some(name)).collect()
}

/// The 78 for a known protocol missing from `compiled` (this build's [`protocols`]), naming the
/// cargo feature that would bring it in. Names that are not protocols are left to the caller.
pub fn check_protocol(name: &str, compiled: &[&str]) -> Result<()> {
    if PROTOCOLS.contains(&name) && !compiled.contains(&name) {
        return Err(not_compiled(name));
    }
    Ok(())
}

/// `ca.backend: "<name>" is not compiled into this build (cargo feature <name>)` (design.md §8).
pub fn not_compiled(name: &str) -> Error {
    Error::config(format!("ca.backend: {name:?} is not compiled into this build (cargo feature {name})"))
}

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

/// How an asynchronous CA is polled (design.md §7 "Lifecycle").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Polling {
    /// First pause between polls; later pauses double up to `MAX_POLL_INTERVAL_S`.
    pub interval_s: u64,
    /// How long one `enroll`/`renew` invocation waits before exiting 75 (the request is kept).
    pub wait_s: u64,
    /// Counted from the request's creation: past it the request is abandoned.
    pub timeout_s: u64,
}

#[derive(Debug)]
pub struct SectigoSettings {
    pub url: String,
    pub customer_uri: String,
    pub login: String,
    pub password: Secret,
    pub org_id: u64,
    pub cert_type: u64,
    pub term: u64,
    pub external_requester: Option<String>,
    pub comments: Option<String>,
    pub polling: Polling,
}

#[derive(Debug)]
pub struct SecurosysSettings {
    pub url: String,
    pub sign_key_name: String,
    pub key_password: Option<Secret>,
    pub signature_algorithm: String,
    pub key_usage: Vec<String>,
    pub extended_key_usage: Vec<String>,
    pub approval: bool,
    pub jwt: Option<Secret>,
    pub api_key: Option<Secret>,
    pub valid_days: u64,
    /// The issuing chain (TSB returns only the leaf), DER, as read from `ca_bundle`.
    pub ca_bundle: Vec<Vec<u8>>,
    pub polling: Polling,
}

#[derive(Debug)]
pub struct EnosSettings {
    pub api_gateway: String,
    pub org_id: String,
    pub device: EnosDevice,
    pub app_key: String,
    pub app_secret: Secret,
    pub valid_days: u64,
}

#[derive(Debug, Clone)]
pub enum EnosDevice {
    Asset(String),
    Product { product_key: String, device_key: String },
}

#[derive(Debug)]
pub struct EzcaSettings {
    pub url: String,
    pub ca_id: String,
    pub template_id: String,
    pub valid_days: u64,
    pub bootstrap: EzcaBootstrap,
    pub renew_auth: RenewAuth,
}

#[derive(Debug)]
pub enum EzcaBootstrap {
    /// A static bearer token installed at the factory.
    Token(Secret),
    /// Entra ID client credentials (protocols.md §2.2).
    Entra { tenant_id: String, client_id: String, client_secret: Secret, authority: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewAuth {
    Certificate,
    Bootstrap,
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
const MAX_CLOCK_WINDOW_S: u64 = 10 * 365 * 86_400;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalPolicy {
    pub at_fraction: f64,
    pub jitter_fraction: f64,
    pub retry_initial_s: u64,
    pub retry_max_s: u64,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy { at_fraction: 0.66, jitter_fraction: 0.05, retry_initial_s: 30, retry_max_s: 21_600 }
    }
}

#[derive(Debug)]
pub struct Hooks {
    pub after_install: Vec<String>,
    /// How long the hook may run before its process group is killed (`hooks.timeout_s`).
    pub timeout_s: u64,
}

/// `hooks.timeout_s` default and upper bound.
const DEFAULT_HOOK_TIMEOUT_S: u64 = 300;
const MAX_HOOK_TIMEOUT_S: u64 = 3600;

impl Settings {
    /// Reads and validates the config file.
    pub fn load(path: &Path) -> Result<Settings> {
        let bytes = read_config(path)?;
        let value =
            json::parse(&bytes).map_err(|e| Error::config(format!("config file {}: {e}", path.display())))?;
        Settings::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Settings> {
        let mut root = Fields::new(value, "")?;
        let tls = parse_tls(&mut root)?;
        let settings = Settings {
            state_dir: root
                .string("state_dir")?
                .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from),
            metrics_file: match root.string("metrics_file")?.map(PathBuf::from) {
                Some(path) if !path.is_absolute() => {
                    return Err(Error::config("metrics_file: must be an absolute path"))
                }
                other => other,
            },
            storage_group: parse_storage(&mut root)?,
            subject: parse_subject(&mut root)?,
            san: parse_sans(&mut root)?,
            key: parse_key(&mut root, tls.danger_allow_http)?,
            ca: parse_backend(&mut root, tls.danger_allow_http)?,
            renewal: parse_renewal(&mut root)?,
            hooks: parse_hooks(&mut root)?,
            tls,
        };
        root.finish()?;
        settings.cross_check()?;
        Ok(settings)
    }

    /// Rules that involve more than one section.
    fn cross_check(&self) -> Result<()> {
        if let Backend::Ezca(ezca) = &self.ca {
            if ezca.renew_auth == RenewAuth::Certificate && self.key.algorithm != Algorithm::Rsa2048 {
                return Err(Error::config(
                    "ca.renew_auth: EZCA certificate renewal signs an RS256 token and needs an RSA key: \
                     set key.algorithm to \"rsa2048\", or set ca.renew_auth to \"bootstrap\"",
                ));
            }
        }
        if let Provider::Redtrust(_) = &self.key.provider {
            self.redtrust_cross_check()?;
        }
        if !self.state_dir.is_absolute() {
            return Err(Error::config("state_dir: must be an absolute path"));
        }
        Ok(())
    }
}

impl Settings {
    /// design.md §7: a Redtrust key is RSA-2048, carries no SANs, and cannot sign on the device.
    fn redtrust_cross_check(&self) -> Result<()> {
        if self.key.algorithm != Algorithm::Rsa2048 {
            return Err(Error::config(
                "key.algorithm: Redtrust generates RSA-2048 keys only; set it to \"rsa2048\"",
            ));
        }
        if !self.san.is_empty() {
            return Err(Error::config(
                "san: Redtrust makes the CSR from subject attributes only; remove the san block",
            ));
        }
        if self.subject.attributes.iter().any(|(a, _)| *a == SubjectAttribute::SerialNumber) {
            return Err(Error::config(
                "subject.serialNumber: Redtrust's dn takes CN, O, OU, C, ST and L only",
            ));
        }
        if !self.key.rotate_on_renew {
            return Err(Error::config(
                "key.rotate_on_renew: Redtrust makes a new key for every renewal; remove the field or set it to true",
            ));
        }
        if let Backend::Ezca(ezca) = &self.ca {
            if ezca.renew_auth == RenewAuth::Certificate {
                return Err(Error::config(
                    "ca.renew_auth: a Redtrust key cannot sign the EZCA renewal token on this device; \
                     set ca.renew_auth to \"bootstrap\"",
                ));
            }
        }
        if let Backend::Est(_) = &self.ca {
            return Err(Error::config(
                "ca.backend: EST renews over TLS client authentication, which a Redtrust key cannot sign \
                 on this device",
            ));
        }
        Ok(())
    }
}

/// The config file: not a symlink, a regular file owned by root or us and writable by no one
/// else (it names the hook program and the CA), read up to `MAX_CONFIG_BYTES`.
fn read_config(path: &Path) -> Result<Vec<u8>> {
    crate::files::read(path, Rule::Trusted, MAX_CONFIG_BYTES)
        .map_err(|e| Error::config(format!("config file {e}")))
}

fn parse_subject(root: &mut Fields) -> Result<Subject> {
    let Some(mut fields) = root.object("subject")? else {
        return Err(Error::config("subject: missing (subject.CN is required)"));
    };
    let mut attributes = Vec::new();
    for attribute in SubjectAttribute::ALL {
        if let Some(value) = fields.string(attribute.key())? {
            if value.is_empty() {
                return Err(Error::config(format!("{}: must not be empty", fields.path_of(attribute.key()))));
            }
            if attribute == SubjectAttribute::C
                && (value.len() != 2 || !value.chars().all(|c| c.is_ascii_alphabetic()))
            {
                return Err(Error::config("subject.C: must be a two-letter country code"));
            }
            attributes.push((attribute, value));
        }
    }
    fields.finish()?;
    if !attributes.iter().any(|(a, _)| *a == SubjectAttribute::CN) {
        return Err(Error::config("subject.CN: missing"));
    }
    Ok(Subject { attributes })
}

fn parse_sans(root: &mut Fields) -> Result<Sans> {
    let Some(mut fields) = root.object("san")? else {
        return Ok(Sans::default());
    };
    let dns = fields.string_list("dns")?.unwrap_or_default();
    let ip_text = fields.string_list("ip")?.unwrap_or_default();
    let uri = fields.string_list("uri")?.unwrap_or_default();
    let email = fields.string_list("email")?.unwrap_or_default();
    fields.finish()?;
    let check = |list: &[String], field: &str, ok: &dyn Fn(&str) -> bool, what: &str| match list
        .iter()
        .find(|v| !ok(v))
    {
        Some(bad) => Err(Error::config(format!("san.{field}: {bad:?} is not {what}"))),
        None => Ok(()),
    };
    check(&dns, "dns", &|v| !v.is_empty() && v.is_ascii() && !v.contains(char::is_whitespace), "a DNS name")?;
    check(&uri, "uri", &|v| v.is_ascii() && v.contains(':'), "an absolute URI")?;
    check(&email, "email", &|v| v.is_ascii() && v.contains('@'), "an email address")?;
    check(&ip_text, "ip", &|v| v.parse::<IpAddr>().is_ok(), "an IP address")?;
    let ip = ip_text.iter().filter_map(|v| v.parse().ok()).collect();
    Ok(Sans { dns, ip, uri, email })
}

fn parse_key(root: &mut Fields, allow_http: bool) -> Result<KeySettings> {
    let Some(mut fields) = root.object("key")? else {
        return Err(Error::config("key: missing"));
    };
    let algorithm = match fields.required_string("algorithm")?.as_str() {
        "p256" => Algorithm::P256,
        "rsa2048" => Algorithm::Rsa2048,
        other => {
            return Err(Error::config(format!(
                "key.algorithm: {other:?} is not one of \"p256\", \"rsa2048\""
            )))
        }
    };
    let provider = match fields.required_string("provider")?.as_str() {
        "file" => Provider::File,
        name @ ("pkcs11" | "tpm" | "redtrust") if !provider_compiled(name) => {
            return Err(Error::config(format!(
                "key.provider: provider {name} is not compiled into this build (cargo feature {name})"
            )))
        }
        #[cfg(feature = "pkcs11")]
        "pkcs11" => Provider::Pkcs11(parse_pkcs11(&mut fields)?),
        "tpm" => Provider::Tpm(parse_tpm(&mut fields)?),
        "redtrust" => Provider::Redtrust(parse_redtrust(&mut fields, allow_http)?),
        other => {
            return Err(Error::config(format!(
                "key.provider: {other:?} is not one of \"file\", \"pkcs11\", \"tpm\", \"redtrust\""
            )))
        }
    };
    let rotate_on_renew = fields.boolean("rotate_on_renew")?.unwrap_or(true);
    for (block, name) in [("redtrust", "redtrust"), ("pkcs11", "pkcs11"), ("tpm", "tpm")] {
        if provider.name() != name && fields.has(block) {
            return Err(Error::config(format!("key.{block}: only used with key.provider \"{name}\"")));
        }
    }

    fields.finish()?;
    Ok(KeySettings { algorithm, provider, rotate_on_renew })
}

fn parse_backend(root: &mut Fields, allow_http: bool) -> Result<Backend> {
    let Some(mut fields) = root.object("ca")? else {
        return Err(Error::config("ca: missing"));
    };
    let name = fields.required_string("backend")?;
    // Before the block's fields: they are another protocol's business in this build.
    check_protocol(&name, &protocols())?;
    let backend = match name.as_str() {
        "enos" => Backend::Enos(parse_enos(&mut fields, allow_http)?),
        "ezca" => Backend::Ezca(parse_ezca(&mut fields, allow_http)?),
        "sectigo" => Backend::Sectigo(parse_sectigo(&mut fields, allow_http)?),
        "securosys" => Backend::Securosys(parse_securosys(&mut fields, allow_http)?),
        "est" => Backend::Est(parse_est(&mut fields, allow_http)?),
        name @ ("scep" | "acme") => {
            return Err(Error::config(format!(
                "ca.backend: backend {name} is not implemented in this version"
            )))
        }
        other => {
            return Err(Error::config(format!(
                "ca.backend: {other:?} is not one of \"enos\", \"ezca\", \"sectigo\", \"securosys\", \"est\""
            )))
        }
    };
    fields.finish()?;
    Ok(backend)
}

fn parse_enos(fields: &mut Fields, allow_http: bool) -> Result<EnosSettings> {
    let api_gateway = fields.url("api_gateway", None, allow_http)?;
    let org_id = fields.required_string("org_id")?;
    let asset_id = fields.string("asset_id")?;
    let product_key = fields.string("product_key")?;
    let device_key = fields.string("device_key")?;
    let device = match (asset_id, product_key, device_key) {
        (Some(asset), None, None) => EnosDevice::Asset(asset),
        (None, Some(product_key), Some(device_key)) => EnosDevice::Product { product_key, device_key },
        (Some(_), _, _) => {
            return Err(Error::config(
                "ca.asset_id: give either asset_id or product_key + device_key, not both",
            ))
        }
        (None, Some(_), None) => {
            return Err(Error::config("ca.device_key: missing (product_key needs device_key)"))
        }
        (None, None, Some(_)) => {
            return Err(Error::config("ca.product_key: missing (device_key needs product_key)"))
        }
        (None, None, None) => {
            return Err(Error::config("ca.asset_id: missing (give asset_id, or product_key + device_key)"))
        }
    };
    Ok(EnosSettings {
        api_gateway,
        org_id,
        device,
        app_key: fields.required_string("app_key")?,
        app_secret: fields.secret_file("app_secret_file")?,
        valid_days: fields.positive("valid_days")?.unwrap_or(730),
    })
}

fn parse_ezca(fields: &mut Fields, allow_http: bool) -> Result<EzcaSettings> {
    let url = fields.url("url", Some("https://portal.ezca.io/"), allow_http)?;
    let ca_id = fields.required_string("ca_id")?;
    let template_id = fields.required_string("template_id")?;
    let valid_days = fields.positive("valid_days")?.unwrap_or(90);
    let renew_auth = match fields.string("renew_auth")?.as_deref() {
        None | Some("certificate") => RenewAuth::Certificate,
        Some("bootstrap") => RenewAuth::Bootstrap,
        Some(other) => {
            return Err(Error::config(format!(
                "ca.renew_auth: {other:?} is not one of \"certificate\", \"bootstrap\""
            )))
        }
    };
    let Some(mut boot) = fields.object("bootstrap")? else {
        return Err(Error::config("ca.bootstrap: missing"));
    };
    let bootstrap = if boot.has("token_file") {
        EzcaBootstrap::Token(boot.secret_file("token_file")?)
    } else if boot.has("client_id") || boot.has("tenant_id") {
        EzcaBootstrap::Entra {
            tenant_id: boot.required_string("tenant_id")?,
            client_id: boot.required_string("client_id")?,
            client_secret: boot.secret_file("client_secret_file")?,
            authority: boot.url("authority", Some("https://login.microsoftonline.com"), allow_http)?,
        }
    } else {
        return Err(Error::config(
            "ca.bootstrap: give token_file, or tenant_id + client_id + client_secret_file",
        ));
    };
    boot.finish()?;
    Ok(EzcaSettings { url, ca_id, template_id, valid_days, bootstrap, renew_auth })
}

/// The most a poll pause grows to (protocols.md §3.5 suggests a 5-minute cap).
pub const MAX_POLL_INTERVAL_S: u64 = 300;

fn parse_polling(fields: &mut Fields, interval_s: u64, timeout_s: u64) -> Result<Polling> {
    let polling = Polling {
        interval_s: fields.positive("poll_interval_s")?.unwrap_or(interval_s),
        wait_s: fields.positive("poll_wait_s")?.unwrap_or(120),
        timeout_s: fields.positive("poll_timeout_s")?.unwrap_or(timeout_s),
    };
    if polling.timeout_s < polling.interval_s {
        return Err(Error::config(format!(
            "{}: must not be smaller than poll_interval_s",
            fields.path_of("poll_timeout_s")
        )));
    }
    Ok(polling)
}

fn parse_sectigo(fields: &mut Fields, allow_http: bool) -> Result<SectigoSettings> {
    Ok(SectigoSettings {
        url: fields.url("url", Some("https://cert-manager.com"), allow_http)?,
        customer_uri: fields.required_string("customer_uri")?,
        login: fields.required_string("login")?,
        password: fields.secret_file("password_file")?,
        org_id: fields.required_positive("org_id")?,
        cert_type: fields.required_positive("cert_type")?,
        term: fields.required_positive("term")?,
        external_requester: fields.string("external_requester")?,
        comments: fields.string("comments")?,
        polling: parse_polling(fields, 60, 86_400)?,
    })
}

fn parse_securosys(fields: &mut Fields, allow_http: bool) -> Result<SecurosysSettings> {
    let url = fields.url("url", None, allow_http)?;
    let sign_key_name = fields.required_string("sign_key_name")?;
    let key_password = fields.optional_secret_file("key_password_file")?;
    let signature_algorithm =
        fields.string("signature_algorithm")?.unwrap_or_else(|| "SHA256_WITH_RSA".to_string());
    let key_usage = fields.enum_names("key_usage")?.unwrap_or_else(|| vec!["DIGITAL_SIGNATURE".into()]);
    let extended_key_usage =
        fields.enum_names("extended_key_usage")?.unwrap_or_else(|| vec!["CLIENT_AUTH".into()]);
    let approval = fields.boolean("approval")?.unwrap_or(false);
    let jwt = fields.optional_secret_file("jwt_file")?;
    let api_key = fields.optional_secret_file("api_key_file")?;
    if jwt.is_none() && api_key.is_none() {
        return Err(Error::config("ca.jwt_file: missing (give jwt_file, api_key_file, or both)"));
    }
    let valid_days = fields.positive("valid_days")?.unwrap_or(365);
    let ca_bundle = fields.certificate_file("ca_bundle")?;
    Ok(SecurosysSettings {
        url,
        sign_key_name,
        key_password,
        signature_algorithm,
        key_usage,
        extended_key_usage,
        approval,
        jwt,
        api_key,
        valid_days,
        ca_bundle,
        polling: parse_polling(fields, 10, 3_600)?,
    })
}

/// `ca` for EST: `url`, `label`, `bootstrap` (`cert_file` + `key_file`, or `username` +
/// `password_file`), `poll_interval_s`, `poll_wait_s`, `poll_timeout_s`.
fn parse_est(fields: &mut Fields, allow_http: bool) -> Result<EstSettings> {
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

/// Whether the cargo feature of an optional key provider (same name) is in this build.
fn provider_compiled(name: &str) -> bool {
    let optional = [
        ("pkcs11", cfg!(feature = "pkcs11")),
        ("tpm", cfg!(feature = "tpm")),
        ("redtrust", cfg!(feature = "redtrust")),
    ];
    optional.into_iter().all(|(provider, compiled)| provider != name || compiled)
}

/// `key.pkcs11`: `module`, `token_label` or `slot`, `pin_file`, `key_label`; or an RFC 7512
/// `uri` (`pkcs11:token=…;object=…?module-path=…`, parsed by the provider's own parser) for the
/// same things.
#[cfg(feature = "pkcs11")]
fn parse_pkcs11(key: &mut Fields) -> Result<Pkcs11Settings> {
    let Some(mut fields) = key.object("pkcs11")? else {
        return Err(Error::config("key.pkcs11: missing (key.provider \"pkcs11\" needs it)"));
    };
    let uri = match fields.string("uri")? {
        Some(uri) => Some(
            enroll_hal::pkcs11::parse_uri(&uri).map_err(|e| Error::config(format!("key.pkcs11.uri: {e}")))?,
        ),
        None => None,
    };
    let from_uri = |get: fn(&enroll_hal::pkcs11::UriParts) -> Option<String>| uri.as_ref().and_then(get);
    let module = fields
        .string("module")?
        .or_else(|| from_uri(|u| u.module_path.as_ref().map(|p| p.display().to_string())));
    let Some(module) = module.map(PathBuf::from) else {
        return Err(Error::config("key.pkcs11.module: missing (the PKCS#11 module's .so path)"));
    };
    if !module.is_absolute() {
        return Err(Error::config("key.pkcs11.module: must be an absolute path"));
    }
    let label = fields.string("token_label")?.or_else(|| from_uri(|u| u.token.clone()));
    let slot = fields.positive_or_zero("slot")?.or(uri.as_ref().and_then(|u| u.slot_id));
    let token = match (label, slot) {
        (Some(label), None) => TokenSelector::Label(label),
        (None, Some(slot)) => TokenSelector::Slot(slot),
        (Some(_), Some(_)) => {
            return Err(Error::config("key.pkcs11.slot: give token_label or slot, not both"))
        }
        (None, None) => return Err(Error::config("key.pkcs11.token_label: missing (or give slot)")),
    };
    let settings = Pkcs11Settings {
        module,
        token,
        pin: fields.secret_file("pin_file")?,
        key_label: fields
            .string("key_label")?
            .or_else(|| from_uri(|u| u.object.clone()))
            .unwrap_or_else(|| "enroll-agent".into()),
    };
    fields.finish()?;
    Ok(settings)
}

/// `key.tpm`: `tcti`. Keys are TPM-wrapped blobs in the slot, so no persistent handle is used.
fn parse_tpm(key: &mut Fields) -> Result<TpmSettings> {
    let Some(mut fields) = key.object("tpm")? else {
        return Ok(TpmSettings { tcti: "device:/dev/tpmrm0".into() });
    };
    if fields.has("persistent_handle") {
        return Err(Error::config(
            "key.tpm.persistent_handle: keys are kept as TPM-wrapped blobs in each slot, not as persistent \
             handles; remove this field",
        ));
    }
    let tcti = fields.string("tcti")?.unwrap_or_else(|| "device:/dev/tpmrm0".into());
    fields.finish()?;
    Ok(TpmSettings { tcti })
}

fn parse_redtrust(key: &mut Fields, allow_http: bool) -> Result<RedtrustSettings> {
    let Some(mut fields) = key.object("redtrust")? else {
        return Err(Error::config("key.redtrust: missing (key.provider \"redtrust\" needs it)"));
    };
    let url = fields.url("url", None, allow_http)?;
    let auth_url = match fields.has("auth_url") {
        true => fields.url("auth_url", None, allow_http)?,
        false => url.clone(),
    };
    let partner = fields.required_string("partner")?;
    if !partner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(Error::config("key.redtrust.partner: use letters, digits, '_' and '-' only"));
    }
    let settings = RedtrustSettings {
        url,
        auth_url,
        partner: partner.to_ascii_uppercase(),
        hmac_secret: fields.secret_file("hmac_secret_file")?,
        domain: fields.string("domain")?,
        redirect_url: {
            let url = fields.required_string("redirect_url")?;
            if !url.starts_with("https://") && !url.starts_with("http://") {
                return Err(Error::config("key.redtrust.redirect_url: must be an absolute http(s) URL"));
            }
            url
        },
        ca_provider: fields.required_string("ca_provider")?,
        hash_type: match fields.string("hash_type")?.as_deref() {
            None => "SHA256".to_string(),
            Some(h @ ("SHA256" | "SHA384" | "SHA512")) => h.to_string(),
            Some(other) => {
                return Err(Error::config(format!(
                    "key.redtrust.hash_type: {other:?} is not one of \"SHA256\", \"SHA384\", \"SHA512\""
                )))
            }
        },
    };
    fields.finish()?;
    Ok(settings)
}

fn parse_tls(root: &mut Fields) -> Result<TlsSettings> {
    let Some(mut fields) = root.object("tls")? else {
        return Ok(TlsSettings {
            trust_bundle: None,
            timeout_s: 30,
            danger_allow_http: false,
            clock_window_s: DEFAULT_CLOCK_WINDOW_S,
        });
    };
    let trust_bundle = fields.string("trust_bundle")?.map(PathBuf::from);
    // Checked here so a wrong path, a symlink or a bundle others can write fails before anything
    // is created; tls::load_roots reads it again (with the same checks) for the first connection.
    if let Some(path) = &trust_bundle {
        crate::files::read(path, Rule::Trusted, crate::files::MAX_PEM_BYTES)
            .map_err(|e| Error::config(format!("tls.trust_bundle: {e}")))?;
    }
    let timeout_s = fields.positive("timeout_s")?.unwrap_or(30);
    if timeout_s > 600 {
        return Err(Error::config("tls.timeout_s: must be at most 600 seconds"));
    }
    let danger_allow_http = fields.boolean("danger_allow_http")?.unwrap_or(false);
    let clock_window_s = fields.positive_or_zero("clock_window_s")?.unwrap_or(DEFAULT_CLOCK_WINDOW_S);
    if clock_window_s > MAX_CLOCK_WINDOW_S {
        return Err(Error::config(format!("tls.clock_window_s: must be at most {MAX_CLOCK_WINDOW_S} seconds")));
    }
    fields.finish()?;
    Ok(TlsSettings { trust_bundle, timeout_s, danger_allow_http, clock_window_s })
}

fn parse_renewal(root: &mut Fields) -> Result<RenewalPolicy> {
    let defaults = RenewalPolicy::default();
    let Some(mut fields) = root.object("renewal")? else {
        return Ok(defaults);
    };
    let policy = RenewalPolicy {
        at_fraction: fields.number("at_fraction")?.unwrap_or(defaults.at_fraction),
        jitter_fraction: fields.number("jitter_fraction")?.unwrap_or(defaults.jitter_fraction),
        retry_initial_s: fields.positive("retry_initial_s")?.unwrap_or(defaults.retry_initial_s),
        retry_max_s: fields.positive("retry_max_s")?.unwrap_or(defaults.retry_max_s),
    };
    fields.finish()?;
    if !(policy.at_fraction > 0.0 && policy.at_fraction < 1.0) {
        return Err(Error::config("renewal.at_fraction: must be between 0 and 1 (exclusive)"));
    }
    let (low, high) =
        (policy.at_fraction - policy.jitter_fraction, policy.at_fraction + policy.jitter_fraction);
    if policy.jitter_fraction < 0.0 || low <= 0.0 || high >= 1.0 {
        return Err(Error::config(
            "renewal.jitter_fraction: at_fraction ± jitter_fraction must stay between 0 and 1",
        ));
    }
    if policy.retry_max_s < policy.retry_initial_s {
        return Err(Error::config("renewal.retry_max_s: must not be smaller than retry_initial_s"));
    }
    Ok(policy)
}

/// `storage.group`: a group name or a gid. Resolved now, so a typo is a config error (78) and
/// not a failed install; the agent's user must be a member of it (to chgrp its files).
fn parse_storage(root: &mut Fields) -> Result<Option<u32>> {
    let Some(mut fields) = root.object("storage")? else {
        return Ok(None);
    };
    let group = match fields.take("group") {
        None => None,
        Some(v @ Value::Number(_)) => match v.as_u64().and_then(|g| u32::try_from(g).ok()) {
            Some(gid) => Some(gid),
            None => return Err(Error::config("storage.group: not a group id")),
        },
        Some(Value::String(name)) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) => {
            Some(name.parse().map_err(|_| Error::config("storage.group: not a group id"))?)
        }
        Some(Value::String(name)) => match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Some(group.gid.as_raw()),
            Ok(None) => return Err(Error::config(format!("storage.group: no group named {name:?}"))),
            Err(e) => return Err(Error::config(format!("storage.group: looking up {name:?}: {e}"))),
        },
        Some(other) => return Err(fields.wrong_type("group", "a group name or id", other)),
    };
    fields.finish()?;
    Ok(group)
}

fn parse_hooks(root: &mut Fields) -> Result<Hooks> {
    let Some(mut fields) = root.object("hooks")? else {
        return Ok(Hooks { after_install: Vec::new(), timeout_s: DEFAULT_HOOK_TIMEOUT_S });
    };
    let after_install = fields.string_list("after_install")?.unwrap_or_default();
    let timeout_s = fields.positive("timeout_s")?.unwrap_or(DEFAULT_HOOK_TIMEOUT_S);
    if timeout_s > MAX_HOOK_TIMEOUT_S {
        return Err(Error::config(format!("hooks.timeout_s: must be at most {MAX_HOOK_TIMEOUT_S} seconds")));
    }
    fields.finish()?;
    if let Some(program) = after_install.first() {
        if !Path::new(program).is_absolute() {
            return Err(Error::config(
                "hooks.after_install: the program (first element) must be an absolute path",
            ));
        }
        // It runs as the agent after every install: no one else may be able to replace it.
        crate::files::check_program(Path::new(program))
            .map_err(|e| Error::config(format!("hooks.after_install: {e}")))?;
    }
    Ok(Hooks { after_install, timeout_s })
}

/// One JSON object being read: remembers which members were used so unknown ones are reported
/// with their full path.
struct Fields<'a> {
    path: String,
    members: &'a [(String, Value)],
    used: Vec<bool>,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, path: &str) -> Result<Fields<'a>> {
        match value {
            Value::Object(members) => {
                Ok(Fields { path: path.to_string(), members, used: vec![false; members.len()] })
            }
            other => Err(Error::config(format!(
                "{}: expected an object, found {}",
                display_path(path),
                other.type_name()
            ))),
        }
    }

    fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn has(&self, key: &str) -> bool {
        self.members.iter().any(|(k, _)| k == key)
    }

    /// The member's value; JSON `null` counts as absent.
    fn take(&mut self, key: &str) -> Option<&'a Value> {
        let index = self.members.iter().position(|(k, _)| k == key)?;
        self.used[index] = true;
        let value = &self.members[index].1;
        (!value.is_null()).then_some(value)
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        Error::config(format!("{}: expected {expected}, found {}", self.path_of(key), found.type_name()))
    }

    fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn required_string(&mut self, key: &str) -> Result<String> {
        match self.string(key)? {
            Some(s) if !s.is_empty() => Ok(s),
            Some(_) => Err(Error::config(format!("{}: must not be empty", self.path_of(key)))),
            None => Err(Error::config(format!("{}: missing", self.path_of(key)))),
        }
    }

    fn number(&mut self, key: &str) -> Result<Option<f64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Number(_)) => Ok(v.as_f64()),
            Some(other) => Err(self.wrong_type(key, "a number", other)),
        }
    }

    /// A whole number ≥ 1.
    fn positive(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Number(_)) => match v.as_u64() {
                Some(n) if n >= 1 => Ok(Some(n)),
                _ => {
                    Err(Error::config(format!("{}: must be a whole number of at least 1", self.path_of(key))))
                }
            },
            Some(other) => Err(self.wrong_type(key, "a number", other)),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "true or false", other)),
        }
    }

    fn string_list(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(Error::config(format!(
                        "{}[{i}]: expected a string, found {}",
                        self.path_of(key),
                        other.type_name()
                    ))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(self.wrong_type(key, "an array of strings", other)),
        }
    }

    fn object(&mut self, key: &str) -> Result<Option<Fields<'a>>> {
        let path = self.path_of(key);
        self.take(key).map(|v| Fields::new(v, &path)).transpose()
    }

    /// An `https://` URL (or `http://` with `tls.danger_allow_http`).
    fn url(&mut self, key: &str, default: Option<&str>, allow_http: bool) -> Result<String> {
        let url = match (self.string(key)?, default) {
            (Some(url), _) => url,
            (None, Some(default)) => default.to_string(),
            (None, None) => return Err(Error::config(format!("{}: missing", self.path_of(key)))),
        };
        let rest = if let Some(rest) = url.strip_prefix("https://") {
            rest
        } else if let Some(rest) = url.strip_prefix("http://") {
            if !allow_http {
                return Err(Error::config(format!(
                    "{}: plain http:// is refused; use https:// (or set tls.danger_allow_http for a lab)",
                    self.path_of(key)
                )));
            }
            rest
        } else {
            return Err(Error::config(format!("{}: {url:?} is not an https:// URL", self.path_of(key))));
        };
        if rest.is_empty()
            || rest.starts_with('/')
            || rest.contains(char::is_whitespace)
            || rest.contains(['?', '#'])
        {
            return Err(Error::config(format!("{}: {url:?} has no host or has a query", self.path_of(key))));
        }
        Ok(url.trim_end_matches('/').to_string())
    }

    /// A whole number ≥ 0.
    fn positive_or_zero(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Number(_)) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Error::config(format!("{}: must be a whole number", self.path_of(key)))),
            Some(other) => Err(self.wrong_type(key, "a number", other)),
        }
    }

    fn required_positive(&mut self, key: &str) -> Result<u64> {
        self.positive(key)?.ok_or_else(|| Error::config(format!("{}: missing", self.path_of(key))))
    }

    /// Upper-case enum names such as `DIGITAL_SIGNATURE` (Securosys TSB).
    fn enum_names(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        let list = self.string_list(key)?;
        if let Some(bad) = list.iter().flatten().find(|v| {
            v.is_empty() || !v.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        }) {
            return Err(Error::config(format!(
                "{}: {bad:?} is not an enum name such as \"DIGITAL_SIGNATURE\"",
                self.path_of(key)
            )));
        }
        Ok(list)
    }

    fn optional_secret_file(&mut self, key: &str) -> Result<Option<Secret>> {
        match self.has(key) {
            true => self.secret_file(key).map(Some),
            false => Ok(None),
        }
    }

    /// A PEM file of one or more certificates, read now (so a bad file fails before anything is
    /// created), returned as DER.
    fn certificate_file(&mut self, key: &str) -> Result<Vec<Vec<u8>>> {
        let path = self.required_string(key)?;
        let bytes = crate::files::read(Path::new(&path), Rule::Trusted, crate::files::MAX_PEM_BYTES)
            .map_err(|e| Error::config(format!("{}: {e}", self.path_of(key))))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::config(format!("{}: {path}: not UTF-8 text", self.path_of(key))))?;
        let certs = crate::pki::parse_pem_certs(&text)
            .map_err(|e| Error::config(format!("{}: {path}: {e}", self.path_of(key))))?;
        if certs.is_empty() {
            return Err(Error::config(format!("{}: {path}: holds no certificate", self.path_of(key))));
        }
        Ok(certs.into_iter().map(|c| c.der).collect())
    }

    fn secret_file(&mut self, key: &str) -> Result<Secret> {
        let path = self.required_string(key)?;
        Secret::from_file(Path::new(&path)).map_err(|e| Error::config(format!("{}: {e}", self.path_of(key))))
    }

    /// Every member must have been read: a typo must not be silently ignored.
    fn finish(self) -> Result<()> {
        match self.used.iter().position(|used| !used) {
            Some(i) => Err(Error::config(format!("{}: unknown field", self.path_of(&self.members[i].0)))),
            None => Ok(()),
        }
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "config"
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secret_file(name: &str, mode: u32) -> PathBuf {
        let path = std::env::temp_dir().join(format!("enroll-config-{name}-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn ezca(extra_key: &str, secret: &Path) -> String {
        format!(
            r#"{{"subject":{{"CN":"dev-1","C":"NL"}},"key":{{"algorithm":"rsa2048","provider":"file"{extra_key}}},
            "ca":{{"backend":"ezca","ca_id":"c","template_id":"t","bootstrap":{{"token_file":"{}"}}}}}}"#,
            secret.display()
        )
    }

    fn load(text: &str) -> Result<Settings> {
        Settings::from_value(&json::parse(text.as_bytes()).unwrap())
    }

    fn message(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn a_minimal_ezca_config_gets_the_documented_defaults() {
        let secret = secret_file("ok", 0o600);
        let settings = load(&ezca("", &secret)).unwrap();
        assert_eq!(settings.state_dir, PathBuf::from("/var/lib/enroll-agent"));
        assert_eq!(settings.renewal, RenewalPolicy::default());
        assert_eq!(settings.tls.timeout_s, 30);
        let Backend::Ezca(ezca) = settings.ca else { panic!("not ezca") };
        assert_eq!(ezca.url, "https://portal.ezca.io");
        assert_eq!(ezca.renew_auth, RenewAuth::Certificate);
        let EzcaBootstrap::Token(token) = ezca.bootstrap else { panic!("not a token") };
        assert_eq!(token.expose(), "s3cret", "one trailing newline is trimmed");
        assert_eq!(settings.subject.rfc4514(), "CN=dev-1,C=NL");
    }

    #[test]
    fn errors_name_the_full_path_of_the_field() {
        let secret = secret_file("paths", 0o600);
        let base = ezca("", &secret);
        assert_eq!(
            message(&ezca(r#","rotate_on_reneww":true"#, &secret)),
            "key.rotate_on_reneww: unknown field"
        );
        assert_eq!(message(&base.replacen(r#""template_id":"t","#, "", 1)), "ca.template_id: missing");
        assert_eq!(
            message(&base.replacen(r#""ca_id":"c""#, r#""ca_id":7"#, 1)),
            "ca.ca_id: expected a string, found a number"
        );
        let with_renewal = base.replacen('{', r#"{"renewal":{"at_fracton":0.5},"#, 1);
        assert_eq!(message(&with_renewal), "renewal.at_fracton: unknown field");
        let http = base.replacen(r#""ca_id""#, r#""url":"http://ca.example","ca_id""#, 1);
        assert!(message(&http).starts_with("ca.url: plain http:// is refused"));
    }

    #[test]
    fn ezca_certificate_renewal_with_p256_names_both_ways_out() {
        let secret = secret_file("p256", 0o600);
        let text = ezca("", &secret).replace("rsa2048", "p256");
        let err = message(&text);
        assert!(err.contains("key.algorithm") && err.contains("\"bootstrap\""), "{err}");
        let fixed = text.replacen(r#""ca_id""#, r#""renew_auth":"bootstrap","ca_id""#, 1);
        assert!(load(&fixed).is_ok());
    }

    #[test]
    fn a_protocol_not_compiled_in_is_a_config_error_naming_its_feature() {
        // This test build has every protocol: hand check_protocol a build that lacks some.
        let error = check_protocol("sectigo", &["enos", "est"]).unwrap_err();
        assert_eq!(error.kind().exit_code(), 78);
        assert_eq!(
            error.to_string(),
            r#"ca.backend: "sectigo" is not compiled into this build (cargo feature sectigo)"#
        );
        for name in PROTOCOLS {
            assert!(check_protocol(name, &PROTOCOLS).is_ok(), "{name}");
            let error = check_protocol(name, &[]).unwrap_err();
            assert_eq!(error.kind().exit_code(), 78);
            assert!(error.to_string().ends_with(&format!("(cargo feature {name})")), "{error}");
        }
        // Names that are no protocol get parse_backend's own words ("not one of", "not implemented").
        assert!(check_protocol("scep", &[]).is_ok());
        assert!(check_protocol("Sectigo", &[]).is_ok());
    }

    #[test]
    fn protocols_lists_the_cargo_features_of_this_build() {
        let features = [
            cfg!(feature = "enos"),
            cfg!(feature = "ezca"),
            cfg!(feature = "sectigo"),
            cfg!(feature = "securosys"),
            cfg!(feature = "est"),
        ];
        let expected: Vec<&str> =
            PROTOCOLS.iter().zip(features).filter(|(_, on)| *on).map(|(p, _)| *p).collect();
        assert_eq!(protocols(), expected);
        for name in protocols() {
            assert!(check_protocol(name, &protocols()).is_ok(), "{name}");
        }
    }

    #[cfg(feature = "tpm")]
    #[test]
    fn a_tpm_persistent_handle_is_refused_with_the_reason() {
        let secret = secret_file("tpm", 0o600);
        let text = ezca(r#","provider":"tpm","tpm":{"persistent_handle":"0x81000100"}"#, &secret)
            .replacen(r#""provider":"file","#, "", 1)
            .replacen(r#""ca_id""#, r#""renew_auth":"bootstrap","ca_id""#, 1);
        let err = message(&text);
        assert!(err.starts_with("key.tpm.persistent_handle: keys are kept as TPM-wrapped blobs"), "{err}");
    }

    #[test]
    fn a_secret_file_readable_by_others_is_refused_naming_field_and_file() {
        let secret = secret_file("loose", 0o644);
        let err = message(&ezca("", &secret));
        assert!(err.starts_with("ca.bootstrap.token_file: "), "{err}");
        assert!(err.contains(&secret.display().to_string()) && err.contains("0644"), "{err}");
        assert!(!err.contains("s3cret"));
    }
}
