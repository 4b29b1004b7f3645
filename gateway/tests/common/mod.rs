//! Test harness for the gateway: a PKI made by code (rcgen), a test upstream that signs real
//! certificates and misbehaves on demand, a gateway on 127.0.0.1:0, curl and openssl as the
//! independent client, and a private PostgreSQL cluster.
#![allow(dead_code)]

pub mod pg;

use enroll_gateway::config::Settings;
use enroll_gateway::server::{Running, ServerBuilder};
use enroll_gateway::store::Store;
use enroll_gateway::upstream::{Upstream, UpstreamError, UpstreamOutcome, UpstreamRequest};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const LABEL: &str = "meters";
pub const SAN_PATTERN: &str = "{device}.meters.example";

/// A CA made in the test.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Ca {
    pub fn new(cn: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `key` with this subject and SANs, valid for a day (or already expired).
    pub fn leaf(
        &self,
        key: &KeyPair,
        dn: &[(DnType, &str)],
        sans: Vec<SanType>,
        expired: bool,
    ) -> rcgen::Certificate {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            p.distinguished_name.push(t.clone(), *v);
        }
        p.subject_alt_names = sans;
        let now = time::OffsetDateTime::now_utc();
        if expired {
            p.not_before = now - time::Duration::days(3);
            p.not_after = now - time::Duration::days(1);
        } else {
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::days(1);
        }
        p.signed_by(key, &self.cert, &self.key).unwrap()
    }
}

/// What the test upstream does with the next requests.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Answer `Pending` to the submit and to this many polls minus one (0: issue at once).
    pub pending_polls: u32,
    pub refuse: Option<String>,
    /// Answer `Unavailable` with this Retry-After.
    pub unavailable: Option<u64>,
    /// Sleep this long in every call.
    pub delay_ms: u64,
    /// Issue a certificate for another key.
    pub wrong_key: bool,
}

/// An upstream CA in the test: signs the CSR's key and subject with a real CA key.
pub struct TestUpstream {
    pub ca: Ca,
    pub behaviour: Mutex<Behaviour>,
    pub submits: AtomicUsize,
    pub polls: AtomicUsize,
    /// Upstream references of the certificates renewals named (None: not a known certificate).
    pub renewals: Mutex<Vec<Option<String>>>,
    pending: Mutex<HashMap<String, u32>>,
    serial: AtomicU64,
}

impl TestUpstream {
    pub fn new() -> Arc<Self> {
        Arc::new(TestUpstream {
            ca: Ca::new("Test Issuing CA"),
            behaviour: Mutex::new(Behaviour::default()),
            submits: AtomicUsize::new(0),
            polls: AtomicUsize::new(0),
            renewals: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            serial: AtomicU64::new(1000),
        })
    }

    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    pub fn submits(&self) -> usize {
        self.submits.load(Ordering::SeqCst)
    }

    fn issue(&self, csr_der: &[u8], wrong_key: bool) -> Result<UpstreamOutcome, UpstreamError> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| UpstreamError::Refused(format!("bad CSR: {e}")))?;
        let serial = self.serial.fetch_add(1, Ordering::SeqCst);
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(5);
        csr.params.not_after = now + time::Duration::days(30);
        csr.params.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
        let cert = if wrong_key {
            let other = KeyPair::generate().unwrap();
            csr.params.signed_by(&other, &self.ca.cert, &self.ca.key)
        } else {
            csr.signed_by(&self.ca.cert, &self.ca.key)
        }
        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        Ok(UpstreamOutcome::Issued {
            cert_der: cert.der().to_vec(),
            chain_der: vec![self.ca.cert.der().to_vec()],
            upstream_ref: Some(format!("cert-{serial}")),
        })
    }
}

impl Upstream for TestUpstream {
    fn submit(&self, req: &UpstreamRequest<'_>) -> Result<UpstreamOutcome, UpstreamError> {
        self.submits.fetch_add(1, Ordering::SeqCst);
        let b = self.behaviour.lock().unwrap().clone();
        std::thread::sleep(Duration::from_millis(b.delay_ms));
        if let Some(r) = req.renewal_of {
            self.renewals.lock().unwrap().push(r.upstream_ref.clone());
        }
        if let Some(s) = b.unavailable {
            return Err(UpstreamError::Unavailable {
                message: "test CA is down".into(),
                retry_after_s: Some(s),
            });
        }
        if let Some(w) = b.refuse {
            return Err(UpstreamError::Refused(w));
        }
        if b.pending_polls > 0 {
            let r = format!("req-{}", self.serial.fetch_add(1, Ordering::SeqCst));
            self.pending.lock().unwrap().insert(r.clone(), b.pending_polls);
            return Ok(UpstreamOutcome::Pending { upstream_ref: r, retry_after_s: 1 });
        }
        self.issue(req.csr_der, b.wrong_key)
    }

    fn poll(&self, upstream_ref: &str, req: &UpstreamRequest<'_>) -> Result<UpstreamOutcome, UpstreamError> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        let b = self.behaviour.lock().unwrap().clone();
        std::thread::sleep(Duration::from_millis(b.delay_ms));
        let mut pending = self.pending.lock().unwrap();
        let left = pending
            .get_mut(upstream_ref)
            .ok_or_else(|| UpstreamError::Protocol(format!("unknown request {upstream_ref}")))?;
        *left -= 1;
        if *left > 0 {
            return Ok(UpstreamOutcome::Pending { upstream_ref: upstream_ref.into(), retry_after_s: 1 });
        }
        pending.remove(upstream_ref);
        drop(pending);
        self.issue(req.csr_der, b.wrong_key)
    }
}

/// A device: its id and key, and what it has on disk for curl.
pub struct Device {
    pub id: String,
    pub key: KeyPair,
    pub key_file: PathBuf,
}

impl Device {
    pub fn new(dir: &Path, id: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let key_file = dir.join(format!("{id}-{}.key", rand_tag()));
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Device { id: id.into(), key, key_file }
    }

    /// A CSR (DER) with this CN and these DNS SANs.
    pub fn csr(&self, cn: &str, dns: &[&str]) -> Vec<u8> {
        self.csr_with(
            &[(DnType::CommonName, cn)],
            dns.iter().map(|d| SanType::DnsName((*d).try_into().unwrap())).collect(),
        )
    }

    pub fn csr_with(&self, dn: &[(DnType, &str)], sans: Vec<SanType>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            p.distinguished_name.push(t.clone(), *v);
        }
        p.subject_alt_names = sans;
        p.serialize_request(&self.key).unwrap().der().to_vec()
    }

    /// The default DNS SAN of this device.
    pub fn san(&self) -> String {
        SAN_PATTERN.replace("{device}", &self.id)
    }
}

fn rand_tag() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

pub fn b64(der: &[u8]) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(der).into_bytes()
}

pub fn write(dir: &Path, name: &str, data: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A running gateway with one label (`meters`, also the default) and a second, `wrapped`, whose
/// answers are base64 in 76-column lines.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub up: Arc<TestUpstream>,
    pub factory: Ca,
    pub server_ca: Ca,
    pub server_ca_file: PathBuf,
    pub config_file: PathBuf,
    pub running: Option<Running>,
    pub base: String,
    pub admin: String,
    pub db_url: String,
}

impl Env {
    pub async fn start(tweak: impl FnOnce(&mut serde_json::Value)) -> Env {
        Self::start_on(None, tweak).await
    }

    /// `db_url`: a PostgreSQL URL, or None for a SQLite file in the test's directory.
    pub async fn start_on(db_url: Option<String>, tweak: impl FnOnce(&mut serde_json::Value)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let up = TestUpstream::new();
        let factory = Ca::new("Factory Root");
        let server_ca = Ca::new("Gateway Server CA");
        let server_key = KeyPair::generate().unwrap();
        let server = server_ca.leaf(
            &server_key,
            &[(DnType::CommonName, "gateway.test")],
            vec![
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
                SanType::DnsName("localhost".try_into().unwrap()),
            ],
            false,
        );
        let server_ca_file = write(d, "server-ca.pem", server_ca.cert.pem());
        write(d, "server.pem", server.pem());
        write(d, "server.key", server_key.serialize_pem());
        write(d, "meters-ca.pem", up.ca.cert.pem());
        write(d, "factory.pem", factory.cert.pem());
        let db_url = db_url.unwrap_or_else(|| format!("sqlite://{}/gateway.db", d.display()));
        let mut config = serde_json::json!({
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "tls": { "cert_file": "server.pem", "key_file": "server.key" },
            "database": { "url": db_url },
            "labels": {
                LABEL: {
                    "ca": { "backend": "test" },
                    "ca_certs_file": "meters-ca.pem",
                    "bootstrap": { "factory_roots_file": "factory.pem", "device_id": "serialNumber", "tokens": true },
                    "policy": { "san_dns": [SAN_PATTERN], "max_per_device_per_day": 5 }
                },
                "wrapped": {
                    "ca": { "backend": "test" },
                    "ca_certs_file": "meters-ca.pem",
                    "bootstrap": { "tokens": true },
                    "wrap_base64": true
                }
            },
            "default_label": LABEL,
            "limits": { "max_body_bytes": 8192, "request_timeout_s": 5, "max_connections": 64 }
        });
        tweak(&mut config);
        let config_file = write(d, "config.json", serde_json::to_string_pretty(&config).unwrap());
        let settings = Settings::load(&config_file).unwrap();
        let running = ServerBuilder::new(settings)
            .upstream(LABEL, up.clone())
            .upstream("wrapped", up.clone())
            .start()
            .await
            .unwrap();
        let base = format!("https://127.0.0.1:{}", running.est_addr.port());
        let admin = format!("http://127.0.0.1:{}", running.admin_addr.unwrap().port());
        Env {
            dir,
            up,
            factory,
            server_ca,
            server_ca_file,
            config_file,
            running: Some(running),
            base,
            admin,
            db_url,
        }
    }

    /// A second replica: the same config and database, its own listeners; its base URL.
    pub async fn replica(&self) -> (Running, String) {
        let settings = Settings::load(&self.config_file).unwrap();
        let running = ServerBuilder::new(settings)
            .upstream(LABEL, self.up.clone())
            .upstream("wrapped", self.up.clone())
            .start()
            .await
            .unwrap();
        let base = format!("https://127.0.0.1:{}", running.est_addr.port());
        (running, base)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn store(&self) -> &Store {
        self.running.as_ref().unwrap().store()
    }

    pub fn device(&self, id: &str) -> Device {
        Device::new(self.path(), id)
    }

    /// Runs the gateway binary with this env's config; (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_enroll-gateway"))
            .arg("-c")
            .arg(&self.config_file)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A new token for `device` on `meters`, made by `enroll-gateway token create`.
    pub fn token(&self, device: &str) -> String {
        self.token_ttl(device, 3600)
    }

    pub fn token_ttl(&self, device: &str, ttl: u64) -> String {
        let (code, out, err) =
            self.cli(&["token", "create", "--label", LABEL, "--device", device, "--ttl-s", &ttl.to_string()]);
        assert_eq!(code, 0, "token create: {err}");
        out.trim().to_owned()
    }

    /// Writes a certificate and returns its path (for curl --cert).
    pub fn cert_file(&self, cert: &rcgen::Certificate) -> PathBuf {
        write(self.path(), &format!("cert-{}.pem", rand_tag()), cert.pem())
    }

    pub fn cert_der_file(&self, der: &[u8]) -> PathBuf {
        let text = pem_encode("CERTIFICATE", der);
        write(self.path(), &format!("cert-{}.pem", rand_tag()), text)
    }

    /// One request with curl.
    pub async fn call(&self, c: Call<'_>) -> Resp {
        self.call_at(&self.base, c).await
    }

    /// One request with curl to `base` (a replica).
    pub async fn call_at(&self, base: &str, c: Call<'_>) -> Resp {
        let tag = rand_tag();
        let hdr = self.path().join(format!("h-{tag}"));
        let body_out = self.path().join(format!("b-{tag}"));
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "--cacert"])
            .arg(&self.server_ca_file)
            .arg("-D")
            .arg(&hdr)
            .arg("-o")
            .arg(&body_out)
            .args(["-w", "%{http_code}"]);
        if let Some((u, p)) = c.basic {
            cmd.arg("-u").arg(format!("{u}:{p}"));
        }
        if let Some((cert, key)) = c.cert {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        if let Some(body) = c.body {
            let f = write(self.path(), &format!("req-{tag}"), body);
            cmd.args(["-H", "Content-Type: application/pkcs10", "--data-binary"])
                .arg(format!("@{}", f.display()));
        }
        cmd.arg(format!("{base}{}", c.path));
        let out = cmd.output().await.unwrap();
        let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| {
            panic!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
        });
        let headers = std::fs::read_to_string(&hdr).unwrap_or_default();
        let headers = headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Resp { status: code, headers, body: std::fs::read(&body_out).unwrap_or_default() }
    }

    /// simpleenroll with Basic.
    pub async fn enroll_basic(&self, user: &str, token: &str, csr: &[u8]) -> Resp {
        self.call(Call {
            path: "/.well-known/est/meters/simpleenroll",
            basic: Some((user, token)),
            cert: None,
            body: Some(&b64(csr)),
        })
        .await
    }

    pub async fn audit(&self) -> Vec<enroll_gateway::store::AuditRow> {
        self.store().audit_since(0).await.unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

pub struct Call<'a> {
    pub path: &'a str,
    pub basic: Option<(&'a str, &'a str)>,
    pub cert: Option<(&'a Path, &'a Path)>,
    pub body: Option<&'a [u8]>,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The certificates of a base64 PKCS#7 answer, as `openssl pkcs7 -print_certs` reads them
    /// (an independent parser), DER.
    pub fn certs(&self) -> Vec<Vec<u8>> {
        use base64::Engine;
        let compact: Vec<u8> = self.body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(compact).expect("base64 body");
        openssl_certs(&der)
    }
}

/// The certificates in a DER PKCS#7, read by `openssl pkcs7`.
pub fn openssl_certs(p7: &[u8]) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["pkcs7", "-inform", "DER", "-print_certs"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(p7).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl pkcs7 failed");
    rustls_pki_types::CertificateDer::pem_slice_iter(&out.stdout).map(|c| c.unwrap().to_vec()).collect()
}

/// SubjectPublicKeyInfo DER of a certificate.
pub fn cert_spki(der: &[u8]) -> Vec<u8> {
    enroll_gateway::pki::CertFacts::parse(der).unwrap().spki_der
}
