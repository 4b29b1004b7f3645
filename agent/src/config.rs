//! The config file (design.md §3, §7), parsed once into a validated [`Settings`].
//!
//! Every error names the JSON path of the field (`error: ca.org_id: missing`), unknown keys are
//! errors, and nothing is created on disk while parsing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use enroll_hal::Algorithm;

use enroll_ca::backend::RemoteKeyService;
pub use enroll_ca::backend::{check_protocol, not_compiled, protocols, Backend, Polling, PROTOCOLS};
#[cfg(feature = "redtrust")]
pub use enroll_ca::redtrust::RedtrustSettings;
pub use enroll_ca::subject::{Sans, Subject, SubjectAttribute};
pub use enroll_ca::tls::{TlsSettings, DEFAULT_CLOCK_WINDOW_S, MAX_CLOCK_WINDOW_S};

use crate::error::{Error, Result};
use crate::files::Rule;
use crate::json::{self, Value};
use crate::secret::Secret;
use enroll_ca::fields::Fields;

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
    #[cfg(feature = "redtrust")]
    Redtrust(RedtrustSettings),
}

impl KeySettings {
    /// The session with the service that holds the key, for remote providers (Redtrust).
    pub fn remote_service(&self, http: crate::http::Http) -> Option<Box<dyn RemoteKeyService + '_>> {
        match &self.provider {
            #[cfg(feature = "redtrust")]
            Provider::Redtrust(settings) => {
                Some(Box::new(enroll_ca::redtrust::Redtrust::new(settings, http)))
            }
            _ => {
                drop(http);
                None
            }
        }
    }
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::File => "file",
            Provider::Pkcs11(_) => "pkcs11",
            Provider::Tpm(_) => "tpm",
            #[cfg(feature = "redtrust")]
            Provider::Redtrust(_) => "redtrust",
        }
    }

    /// Whether the key lives elsewhere and cannot sign on this device.
    pub fn is_remote(&self) -> bool {
        #[cfg(feature = "redtrust")]
        return matches!(self, Provider::Redtrust(_));
        #[cfg(not(feature = "redtrust"))]
        false
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
        let mut settings = Settings {
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
            ca: match root.object("ca")? {
                Some(block) => Backend::parse(block, tls.danger_allow_http)?,
                None => return Err(Error::config("ca: missing")),
            },
            renewal: parse_renewal(&mut root)?,
            hooks: parse_hooks(&mut root)?,
            tls,
        };
        root.finish()?;
        settings.ca.use_state_dir(&settings.state_dir);
        settings.cross_check()?;
        Ok(settings)
    }

    /// Rules that involve more than one section.
    fn cross_check(&self) -> Result<()> {
        self.ca.check_key(self.key.algorithm, self.key.provider.is_remote())?;
        if self.key.provider.is_remote() {
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

#[cfg_attr(not(feature = "redtrust"), allow(unused_variables))] // only Redtrust has a URL
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
        #[cfg(feature = "redtrust")]
        "redtrust" => Provider::Redtrust(enroll_ca::redtrust::config::parse(&mut fields, allow_http)?),
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
        return Err(Error::config(format!(
            "tls.clock_window_s: must be at most {MAX_CLOCK_WINDOW_S} seconds"
        )));
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
        use enroll_ca::ezca::{EzcaBootstrap, RenewAuth};
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
            assert!(check_protocol(name, PROTOCOLS).is_ok(), "{name}");
            let error = check_protocol(name, &[]).unwrap_err();
            assert_eq!(error.kind().exit_code(), 78);
            assert!(error.to_string().ends_with(&format!("(cargo feature {name})")), "{error}");
        }
        // Names that are no protocol get parse_backend's own words ("not one of").
        assert!(check_protocol("x509", &[]).is_ok());
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
            cfg!(feature = "acme"),
            cfg!(feature = "scep"),
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
