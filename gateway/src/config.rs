//! The gateway's JSON config (design.md §9): parsed once into [`Settings`], which the rest of
//! the gateway uses. Unknown keys are errors naming their path (`labels.meters.policy.san_dsn`);
//! secrets are only read from `*_file` paths that are mode 0600 or 0400.

use crate::error::Error;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default config path (design.md §9); a build may set `ENROLL_GATEWAY_DEFAULT_CONFIG`.
pub const DEFAULT_CONFIG: &str = match option_env!("ENROLL_GATEWAY_DEFAULT_CONFIG") {
    Some(p) => p,
    None => "/etc/enroll-gateway/config.json",
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    #[serde(default)]
    admin_listen: Option<String>,
    tls: RawTls,
    database: RawDatabase,
    labels: BTreeMap<String, RawLabel>,
    #[serde(default)]
    default_label: Option<String>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    upstream: RawUpstream,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(default)]
    trust_bundle: Option<PathBuf>,
    #[serde(default)]
    timeout_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: String,
    #[serde(default)]
    password_file: Option<PathBuf>,
    /// Connections in this replica's pool; default 8.
    #[serde(default = "default_pool")]
    max_connections: u32,
}

fn default_pool() -> u32 {
    8
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    ca: serde_json::Value,
    ca_certs_file: PathBuf,
    bootstrap: RawBootstrap,
    #[serde(default)]
    policy: Policy,
    /// Break the base64 of PKCS#7 answers into 76-column lines (libest, `openssl base64 -d`);
    /// default false: one line (strongSwan reads only that; protocols.md §6.1a).
    #[serde(default)]
    wrap_base64: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootstrap {
    #[serde(default)]
    factory_roots_file: Option<PathBuf>,
    #[serde(default)]
    device_id: DeviceIdField,
    #[serde(default)]
    tokens: bool,
}

/// Which subject attribute of a factory certificate names the device; default `serialNumber`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum DeviceIdField {
    #[default]
    #[serde(rename = "serialNumber")]
    SerialNumber,
    #[serde(rename = "CN")]
    Cn,
}

/// Per-label CSR policy (design.md §9).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// DNS SANs a CSR may ask for, `{device}` replaced by the device id; default none.
    #[serde(default)]
    pub san_dns: Vec<String>,
    /// Issuances (including ones in flight) per device and label in any 24 hours; default 10.
    #[serde(default = "default_quota")]
    pub max_per_device_per_day: u32,
}

fn default_quota() -> u32 {
    10
}

impl Default for Policy {
    fn default() -> Self {
        Self { san_dns: Vec::new(), max_per_device_per_day: default_quota() }
    }
}

/// Connection and request limits (design.md §9).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body; larger ones get 413. Default 65536 bytes.
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Seconds a client has for the TLS handshake, and again for headers and body; default 30.
    #[serde(default = "default_timeout")]
    pub request_timeout_s: u64,
    /// Connections served at once; more wait in the kernel's backlog. Default 1024.
    #[serde(default = "default_conns")]
    pub max_connections: usize,
}

fn default_body() -> usize {
    65536
}
fn default_timeout() -> u64 {
    30
}
fn default_conns() -> usize {
    1024
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_body(),
            request_timeout_s: default_timeout(),
            max_connections: default_conns(),
        }
    }
}

/// How the gateway reaches the vendor APIs (`upstream`): the roots their TLS certificates are
/// verified against and the timeout of one call. The agent keeps these in its `tls` block; the
/// gateway's `labels.L.ca` blocks are the agent's `ca` block, so they live here.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// `upstream.trust_bundle` (PEM roots); default `None`: the system bundle.
    pub trust_bundle: Option<PathBuf>,
    /// `upstream.timeout_s`: seconds for one vendor call; default 30.
    pub timeout_s: u64,
}

/// `upstream.timeout_s` default.
pub const DEFAULT_UPSTREAM_TIMEOUT_S: u64 = 30;

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self { trust_bundle: None, timeout_s: DEFAULT_UPSTREAM_TIMEOUT_S }
    }
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    pub database: Database,
    pub labels: BTreeMap<String, Arc<Label>>,
    pub default_label: Option<String>,
    pub limits: Limits,
    pub upstream: UpstreamSettings,
}

/// Where the store lives. `url` may hold the password: never print it, print [`Database::shown`].
#[derive(Clone)]
pub struct Database {
    url: String,
    shown: String,
    pub max_connections: u32,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database").field("url", &self.shown).finish_non_exhaustive()
    }
}

impl Database {
    /// A database without a password (tests, SQLite).
    pub fn new(url: &str) -> Self {
        Self { url: url.to_owned(), shown: url.to_owned(), max_connections: default_pool() }
    }
    /// The URL to connect with (may hold the password).
    pub fn connect_url(&self) -> &str {
        &self.url
    }
    /// The URL without the password, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// One CA label (`/.well-known/est/<label>/…`).
#[derive(Debug)]
pub struct Label {
    pub name: String,
    /// The label's `ca` block, exactly as written: the upstream factory parses it.
    pub ca: serde_json::Value,
    /// `ca_certs_file`: what `cacerts` returns, and the anchors renewal certificates chain to.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// `bootstrap.factory_roots_file`, if client certificates may bootstrap.
    pub factory_roots: Option<Vec<CertificateDer<'static>>>,
    pub device_id: DeviceIdField,
    pub tokens: bool,
    pub policy: Policy,
    pub wrap_base64: bool,
}

fn field_err(path: &str, what: impl std::fmt::Display) -> Error {
    Error::config(format!("config {path}: {what}"))
}

/// Reads PEM certificates; at least one.
pub fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let text = std::fs::read(path).map_err(|e| field_err(field, format!("{}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| field_err(field, format!("{}: not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(field_err(field, format!("{}: holds no certificate", path.display())));
    }
    for (i, c) in certs.iter().enumerate() {
        webpki::anchor_from_trusted_cert(c).map_err(|e| {
            field_err(field, format!("{}: certificate {} is not usable: {e:?}", path.display(), i + 1))
        })?;
    }
    Ok(certs)
}

/// Reads a secret file, which must be mode 0600/0400 and owned by this user (design.md §3).
pub fn read_secret(path: &Path, field: &str) -> Result<String, Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| field_err(field, format!("{}: {e}", path.display())))?;
    if meta.mode() & 0o077 != 0 {
        return Err(field_err(field, format!("{}: must be mode 0600 or 0400", path.display())));
    }
    let me = nix_euid();
    if meta.uid() != me {
        return Err(field_err(field, format!("{}: must be owned by uid {me}", path.display())));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| field_err(field, format!("{}: {e}", path.display())))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

fn nix_euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Percent-encodes a URL userinfo component (RFC 3986 §3.2.1).
fn userinfo_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn label_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !["cacerts", "simpleenroll", "simplereenroll", "csrattrs", "serverkeygen", "fullcmc"]
            .contains(&name)
}

impl Settings {
    /// Reads and validates the config file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("config {}: {e}", path.display())))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses config text; relative `*_file` paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, Error> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            Error::config(format!("config {path}: {}", e.inner()))
        })?;
        let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let listen = raw
            .listen
            .parse()
            .map_err(|e| field_err("listen", format!("{:?} is not ADDRESS:PORT ({e})", raw.listen)))?;
        let admin_listen = match &raw.admin_listen {
            None => None,
            Some(a) => Some(
                a.parse()
                    .map_err(|e| field_err("admin_listen", format!("{a:?} is not ADDRESS:PORT ({e})")))?,
            ),
        };
        let database = parse_database(&raw.database, &abs)?;
        if raw.labels.is_empty() {
            return Err(field_err("labels", "at least one label is needed"));
        }
        let mut labels = BTreeMap::new();
        for (name, l) in &raw.labels {
            let at = |f: &str| format!("labels.{name}.{f}");
            if !label_name_ok(name) {
                return Err(field_err(
                    &format!("labels.{name}"),
                    "a label is 1-64 of A-Z a-z 0-9 - _ . and not an EST operation name",
                ));
            }
            if l.ca.get("backend").and_then(|b| b.as_str()).is_none() {
                return Err(field_err(&at("ca.backend"), "missing (a string naming the CA backend)"));
            }
            let ca_certs = read_certs(&abs(&l.ca_certs_file), &at("ca_certs_file"))?;
            let factory_roots = match &l.bootstrap.factory_roots_file {
                Some(p) => Some(read_certs(&abs(p), &at("bootstrap.factory_roots_file"))?),
                None => None,
            };
            if factory_roots.is_none() && !l.bootstrap.tokens {
                return Err(field_err(
                    &at("bootstrap"),
                    "needs factory_roots_file or \"tokens\": true (else no device can enroll)",
                ));
            }
            for (i, s) in l.policy.san_dns.iter().enumerate() {
                let probe = s.replace("{device}", "d");
                if probe.is_empty() || probe.contains(['{', '}', ' ', '/']) {
                    return Err(field_err(
                        &at(&format!("policy.san_dns[{i}]")),
                        format!("{s:?} is not a DNS name pattern"),
                    ));
                }
            }
            if l.policy.max_per_device_per_day == 0 {
                return Err(field_err(&at("policy.max_per_device_per_day"), "must be at least 1"));
            }
            labels.insert(
                name.clone(),
                Arc::new(Label {
                    name: name.clone(),
                    ca: absolute_files(&l.ca, &abs),
                    ca_certs,
                    factory_roots,
                    device_id: l.bootstrap.device_id,
                    tokens: l.bootstrap.tokens,
                    policy: l.policy.clone(),
                    wrap_base64: l.wrap_base64,
                }),
            );
        }
        if let Some(d) = &raw.default_label {
            if !labels.contains_key(d) {
                return Err(field_err("default_label", format!("{d:?} is not one of labels")));
            }
        }
        let limits = raw.limits;
        if limits.max_body_bytes == 0 {
            return Err(field_err("limits.max_body_bytes", "must be at least 1"));
        }
        if !(1..=3600).contains(&limits.request_timeout_s) {
            return Err(field_err("limits.request_timeout_s", "must be 1..=3600"));
        }
        if limits.max_connections == 0 {
            return Err(field_err("limits.max_connections", "must be at least 1"));
        }
        let upstream = UpstreamSettings {
            trust_bundle: raw.upstream.trust_bundle.as_deref().map(abs),
            timeout_s: raw.upstream.timeout_s.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_S),
        };
        if !(1..=600).contains(&upstream.timeout_s) {
            return Err(field_err("upstream.timeout_s", "must be 1..=600"));
        }
        Ok(Settings {
            listen,
            admin_listen,
            tls_cert_file: abs(&raw.tls.cert_file),
            tls_key_file: abs(&raw.tls.key_file),
            database,
            labels,
            default_label: raw.default_label,
            limits,
            upstream,
        })
    }

    /// The label of a request path: `Some(name)` for `/.well-known/est/<name>/op`, `None` for
    /// `/.well-known/est/op` (served by `default_label`).
    pub fn label(&self, name: Option<&str>) -> Option<&Arc<Label>> {
        match name {
            Some(n) => self.labels.get(n),
            None => self.default_label.as_ref().and_then(|d| self.labels.get(d)),
        }
    }
}

/// The `ca` block with every relative `*_file` path taken from the config's directory, as the
/// gateway's own `*_file` fields are (the CA crate reads them as given).
fn absolute_files(value: &serde_json::Value, abs: &dyn Fn(&Path) -> PathBuf) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(members) => members
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(p) if k.ends_with("_file") && !p.is_empty() => {
                        Value::String(abs(Path::new(p)).display().to_string())
                    }
                    other => absolute_files(other, abs),
                };
                (k.clone(), v)
            })
            .collect(),
        Value::Array(items) => items.iter().map(|v| absolute_files(v, abs)).collect(),
        other => other.clone(),
    }
}

fn parse_database(raw: &RawDatabase, abs: &dyn Fn(&Path) -> PathBuf) -> Result<Database, Error> {
    let url = raw.url.trim();
    if raw.max_connections == 0 {
        return Err(field_err("database.max_connections", "must be at least 1"));
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        if raw.password_file.is_some() {
            return Err(field_err("database.password_file", "SQLite takes no password"));
        }
        if path.is_empty() || path.contains('?') {
            return Err(field_err("database.url", "sqlite://PATH with a file path and no options"));
        }
        let mut db = Database::new(&format!("sqlite://{path}?mode=rwc"));
        db.shown = url.to_owned();
        db.max_connections = raw.max_connections;
        return Ok(db);
    }
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| field_err("database.url", "must start with sqlite:// or postgres://"))?;
    let (userinfo, hostpart) = rest
        .split_once('@')
        .ok_or_else(|| field_err("database.url", "postgres://USER@HOST:PORT/DB: the user is missing"))?;
    if userinfo.contains(':') {
        return Err(field_err("database.url", "no password in the URL: use database.password_file"));
    }
    if !hostpart.contains('/') {
        return Err(field_err("database.url", "postgres://USER@HOST:PORT/DB: the database is missing"));
    }
    let connect = match &raw.password_file {
        Some(p) => {
            let pw = read_secret(&abs(p), "database.password_file")?;
            format!("postgres://{userinfo}:{}@{hostpart}", userinfo_escape(&pw))
        }
        None => format!("postgres://{userinfo}@{hostpart}"),
    };
    Ok(Database { url: connect, shown: url.to_owned(), max_connections: raw.max_connections })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(url: &str, password_file: Option<PathBuf>) -> Result<Database, Error> {
        let raw = RawDatabase { url: url.into(), password_file, max_connections: 4 };
        parse_database(&raw, &|p: &Path| p.to_path_buf())
    }

    #[test]
    fn database_urls() {
        let d = db("sqlite:///var/lib/gw.db", None).unwrap();
        assert_eq!(d.connect_url(), "sqlite:///var/lib/gw.db?mode=rwc");
        assert_eq!(d.shown(), "sqlite:///var/lib/gw.db");
        assert!(db("mysql://x@h/db", None).unwrap_err().to_string().contains("database.url"));
        assert!(db("postgres://gw:pw@h:5432/db", None).unwrap_err().to_string().contains("password_file"));
        assert!(db("postgres://h:5432/db", None).is_err());
        let dir = std::env::temp_dir().join(format!("gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "p@ss:w/rd\n").unwrap();
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let d = db("postgres://gw@127.0.0.1:5432/gateway", Some(pw.clone())).unwrap();
        assert_eq!(d.connect_url(), "postgres://gw:p%40ss%3Aw%2Frd@127.0.0.1:5432/gateway");
        assert_eq!(d.shown(), "postgres://gw@127.0.0.1:5432/gateway");
        assert!(!format!("{d:?}").contains("p%40ss"), "Debug never shows the password");
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        assert!(db("postgres://gw@127.0.0.1:5432/gateway", Some(pw))
            .unwrap_err()
            .to_string()
            .contains("0600"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_example_config_has_only_known_keys() {
        // Parsing gets past every key and stops at the first file the example names.
        let e = Settings::parse(include_str!("../examples/config.json"), Path::new("/")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config labels.meters.ca_certs_file: /etc/enroll-gateway/meters-ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn the_upstream_block_and_relative_ca_files() {
        let dir = std::env::temp_dir().join(format!("gw-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
        let text = |upstream: &str| {
            format!(
                r#"{{"listen": "127.0.0.1:1", "tls": {{"cert_file": "a", "key_file": "b"}},
                    "database": {{"url": "sqlite:///x"}}, {upstream}
                    "labels": {{"m": {{"ca": {{"backend": "enos", "app_secret_file": "enos.secret",
                                               "nested": {{"token_file": "/abs/token"}}}},
                                       "ca_certs_file": "ca.pem", "bootstrap": {{"tokens": true}}}}}}}}"#
            )
        };
        let s = Settings::parse(&text(""), &dir).unwrap();
        assert_eq!(s.upstream.trust_bundle, None);
        assert_eq!(s.upstream.timeout_s, DEFAULT_UPSTREAM_TIMEOUT_S);
        let ca_block = &s.labels["m"].ca;
        assert_eq!(ca_block["app_secret_file"], dir.join("enos.secret").display().to_string());
        assert_eq!(ca_block["nested"]["token_file"], "/abs/token");
        let s = Settings::parse(&text(r#""upstream": {"trust_bundle": "roots.pem", "timeout_s": 5},"#), &dir)
            .unwrap();
        assert_eq!(s.upstream.trust_bundle, Some(dir.join("roots.pem")));
        assert_eq!(s.upstream.timeout_s, 5);
        let e = Settings::parse(&text(r#""upstream": {"timeout_s": 0},"#), &dir).unwrap_err();
        assert!(e.to_string().starts_with("config upstream.timeout_s: must be 1..=600"), "{e}");
        let e = Settings::parse(&text(r#""upstream": {"roots": "x"},"#), &dir).unwrap_err();
        assert!(e.to_string().starts_with("config upstream.roots: unknown field"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let text = r#"{"listen": "127.0.0.1:1", "tls": {"cert_file": "a", "key_file": "b", "ciphers": 1},
                       "database": {"url": "sqlite:///x"}, "labels": {}}"#;
        let e = Settings::parse(text, Path::new("/")).unwrap_err();
        assert!(e.to_string().starts_with("config tls.ciphers: unknown field `ciphers`"), "{e}");
        assert_eq!(e.kind(), crate::error::Kind::Config);
        let text = r#"{"listen": "nope", "tls": {"cert_file": "a", "key_file": "b"},
                       "database": {"url": "sqlite:///x"}, "labels": {}}"#;
        assert!(Settings::parse(text, Path::new("/")).unwrap_err().to_string().contains("config listen"));
    }
}
