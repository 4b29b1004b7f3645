//! Tests of the EST emulator (RFC 7030 / RFC 8951, protocols.md §6.1 and §6.1a): over TLS with
//! this crate's rustls client, with curl + openssl as an independent client and parser, and
//! with strongSwan's `pki --estca` / `pki --est` as an independent EST client.

use crate::client::{self, ClientResponse, Identity};
use crate::est::{decode_base64, EstAuth, CHALLENGE, PKCS7_CONTENT_TYPE};
use crate::server::Request;
use crate::{util, Emulator, Fault, Options};
use base64::Engine;
use rcgen::KeyPair;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use x509_parser::prelude::*;

const T: Duration = Duration::from_secs(20);
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("enroll-tests-est-{}", util::random_hex(6)));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn write(&self, name: &str, data: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs a program; returns (success, stdout, stderr).
fn run(program: &str, args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (scripts/hw-deps.sh installs it)"));
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn openssl(args: &[&str]) -> String {
    let (ok, out, err) = run("/usr/bin/openssl", args);
    assert!(ok, "openssl {args:?} failed: {err}");
    String::from_utf8_lossy(&out).into_owned()
}

fn sh(script: &str) -> (bool, Vec<u8>, String) {
    run("/bin/sh", &["-c", script])
}

fn start() -> Emulator {
    Emulator::start(Options { request_client_cert: true, ..Options::default() }).unwrap()
}

fn basic(emu: &Emulator, password: &str) -> String {
    format!("Basic {}", B64.encode(format!("{}:{password}", emu.est.username)))
}

/// A P-256 key and the base64 (one line) of a DER CSR for `O=Acme, CN=cn` with DNS `dns`.
fn csr(cn: &str, dns: &[&str]) -> (KeyPair, Vec<u8>, String) {
    let (key, pem) = crate::pki::tests::p256_csr(cn, dns);
    let der = ::pem::parse(pem).unwrap().into_contents();
    let b64 = B64.encode(&der);
    (key, der, b64)
}

fn identity(cert_pem: &str, key_pem: &str) -> Identity {
    let cert = ::pem::parse(cert_pem).unwrap().into_contents();
    let key = ::pem::parse(key_pem).unwrap().into_contents();
    (vec![cert.into()], rustls::pki_types::PrivatePkcs8KeyDer::from(key).into())
}

fn key_identity(cert_der: &[u8], key: &KeyPair) -> Identity {
    (vec![cert_der.to_vec().into()], rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into())
}

fn call(
    emu: &Emulator,
    id: Option<Identity>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> ClientResponse {
    client::request_with_identity(&emu.url(), &emu.tls_root_pem(), id, method, path, headers, body, T)
        .unwrap()
}

const ENROLL: &str = "/.well-known/est/meters/simpleenroll";
const REENROLL: &str = "/.well-known/est/meters/simplereenroll";
const PKCS10: (&str, &str) = ("Content-Type", "application/pkcs10");

fn enroll_basic(emu: &Emulator, b64: &str) -> ClientResponse {
    let auth = basic(emu, &emu.est.password);
    call(emu, None, "POST", ENROLL, &[PKCS10, ("Authorization", &auth)], b64.as_bytes())
}

/// The certificates of a base64 PKCS#7 answer, as openssl (not our code) reads them, in order.
fn certs_via_openssl(dir: &TempDir, body: &[u8]) -> Vec<Vec<u8>> {
    let der = decode_base64(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    let name = util::random_hex(4);
    let f = dir.write(&format!("{name}.p7"), der);
    let text = openssl(&["pkcs7", "-inform", "DER", "-in", p(&f), "-print_certs"]);
    ::pem::parse_many(text).unwrap().into_iter().map(|b| b.into_contents()).collect()
}

fn pem_der(pem: &str) -> Vec<u8> {
    ::pem::parse(pem).unwrap().into_contents()
}

fn spki(cert_der: &[u8]) -> Vec<u8> {
    let (_, c) = X509Certificate::from_der(cert_der).unwrap();
    c.public_key().raw.to_vec()
}

fn assert_pkcs7_headers(r: &ClientResponse) {
    assert_eq!(r.header("Content-Type"), Some(PKCS7_CONTENT_TYPE), "{r:?}");
    assert_eq!(r.header("Content-Transfer-Encoding"), Some("base64"), "{r:?}");
}

#[test]
fn cacerts_on_both_paths_and_routing_errors() {
    let emu = Emulator::start(Options::default()).unwrap();
    let dir = TempDir::new();
    let want = vec![pem_der(&emu.est_issuing_pem()), pem_der(&emu.est_root_pem())];
    for path in ["/.well-known/est/cacerts", "/.well-known/est/meters/cacerts"] {
        let r = call(&emu, None, "GET", path, &[], b"");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_pkcs7_headers(&r);
        assert!(!r.body.iter().any(u8::is_ascii_whitespace), "unwrapped base64 by default");
        let mut got = certs_via_openssl(&dir, &r.body);
        got.sort();
        let mut want = want.clone();
        want.sort();
        assert_eq!(got, want, "cacerts = issuing CA + root");
    }
    for (method, path, status) in [
        ("GET", "/.well-known/est/other/cacerts", 404),
        ("POST", "/.well-known/est/other/simpleenroll", 404),
        ("GET", "/.well-known/est/meters/csrattrs", 404),
        ("GET", "/.well-known/est/a/b/cacerts", 404),
        ("POST", "/.well-known/est/cacerts", 405),
        ("GET", ENROLL, 405),
    ] {
        let r = call(&emu, None, method, path, &[], b"");
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
    }
    assert_eq!(emu.est_enroll_requests(), 0, "an unknown label reaches no CA");
}

#[test]
fn basic_enroll_with_curl_and_openssl_chains_to_cacerts() {
    let emu = Emulator::start(Options::default()).unwrap();
    let dir = TempDir::new();
    let root = dir.write("tls-root.pem", emu.tls_root_pem());
    let key = dir.path("dev.key");
    let req = dir.path("req.der");
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", p(&key)]);
    openssl(&[
        "req",
        "-new",
        "-sha256",
        "-key",
        p(&key),
        "-subj",
        "/O=Acme/CN=meter-7",
        "-addext",
        "subjectAltName=DNS:meter-7.acme.example",
        "-outform",
        "DER",
        "-out",
        p(&req),
    ]);
    let b64 = dir.write("req.b64", B64.encode(std::fs::read(&req).unwrap()));
    let url = emu.url();
    let user = format!("{}:{}", emu.est.username, emu.est.password);
    let script = format!(
        "set -e; curl -sS --fail --cacert {root} {url}/.well-known/est/meters/cacerts | base64 -di \
         | openssl pkcs7 -inform DER -print_certs -out {d}/cacerts.pem; \
         curl -sS --fail --cacert {root} -u '{user}' -H 'Content-Type: application/pkcs10' \
         --data-binary @{b64} {url}{ENROLL} | base64 -di \
         | openssl pkcs7 -inform DER -print_certs -out {d}/leaf.pem",
        root = p(&root),
        b64 = p(&b64),
        d = p(&dir.0),
    );
    let (ok, _, err) = sh(&script);
    assert!(ok, "curl | base64 -di | openssl pkcs7: {err}");
    let leaf = dir.path("leaf.pem");
    let out = openssl(&["verify", "-x509_strict", "-CAfile", p(&dir.path("cacerts.pem")), p(&leaf)]);
    assert!(out.contains(": OK"), "{out}");
    let leaf_key = openssl(&["x509", "-in", p(&leaf), "-noout", "-pubkey"]);
    assert_eq!(leaf_key, openssl(&["pkey", "-in", p(&key), "-pubout"]), "the leaf carries our key");
    let text = openssl(&["x509", "-in", p(&leaf), "-noout", "-subject", "-ext", "subjectAltName"]);
    assert!(text.contains("CN = meter-7") && text.contains("DNS:meter-7.acme.example"), "{text}");
    assert_eq!(emu.est_last_auth(), Some(EstAuth::Basic));
    assert_eq!(emu.issued().len(), 1);

    // No credentials: the Basic challenge; wrong ones: 401 again.
    for creds in ["", &format!("-u '{}:wrong'", emu.est.username)] {
        let script = format!(
            "curl -sS --cacert {root} {creds} -H 'Content-Type: application/pkcs10' --data-binary @{b64} \
             -o /dev/null -D - {url}{ENROLL}",
            root = p(&root),
            b64 = p(&b64),
        );
        let (ok, head, err) = sh(&script);
        let head = String::from_utf8_lossy(&head);
        assert!(ok && head.starts_with("HTTP/1.1 401"), "{head}{err}");
        assert!(head.contains(&format!("WWW-Authenticate: {CHALLENGE}")), "{head}");
    }
    let log = emu.log();
    let enrolls: Vec<_> = log.iter().filter(|l| l.path == ENROLL).collect();
    assert_eq!(enrolls.len(), 3);
    let auth = enrolls[0].headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("authorization"));
    assert_eq!(auth.map(|(_, v)| v.as_str()), Some(crate::emulator::PRESENT));
    let all: String = log.iter().map(|l| l.to_json().to_string()).collect();
    assert!(!all.contains(&emu.est.password), "the password reached the log");
}

#[test]
fn certificate_authentication_and_reenroll_rules() {
    let emu = start();
    let (fc, fk) = (emu.factory_cert_pem(), emu.factory_key_pem());
    assert!(fk.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM");
    let (key, _, b64) = csr("sensor-9", &["sensor-9.acme.example"]);

    // Factory certificate, no Basic: enrolled.
    let r = call(&emu, Some(identity(&fc, &fk)), "POST", ENROLL, &[PKCS10], b64.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_pkcs7_headers(&r);
    assert_eq!(emu.est_last_auth(), Some(EstAuth::FactoryCert));
    let last = emu.log().pop().unwrap();
    assert_eq!(last.client_cert_subject.as_deref(), Some("sensor-0042 factory"));
    assert_eq!(last.client_cert_issuer.as_deref(), Some("Factory CA"));
    let dir = TempDir::new();
    let certs = certs_via_openssl(&dir, &r.body);
    assert_eq!(certs.len(), 1, "only the issued certificate (RFC 7030 §4.2.3)");
    let device = certs[0].clone();
    assert_eq!(spki(&device), key.public_key_der());

    // An RSA-2048 factory certificate signs the TLS handshake too.
    let (rc, rk) = emu.issue_factory_identity("rsa-factory", true, 365).unwrap();
    let r = call(&emu, Some(identity(&rc, &rk)), "POST", ENROLL, &[PKCS10], b64.as_bytes());
    assert_eq!((r.status, emu.est_last_auth()), (200, Some(EstAuth::FactoryCert)), "{}", r.text());

    // Neither: challenged; the device certificate does not enroll.
    let r = call(&emu, None, "POST", ENROLL, &[PKCS10], b64.as_bytes());
    assert_eq!((r.status, r.header("WWW-Authenticate")), (401, Some(CHALLENGE)));
    let r = call(&emu, Some(key_identity(&device, &key)), "POST", ENROLL, &[PKCS10], b64.as_bytes());
    assert_eq!(r.status, 401, "{}", r.text());
    let wrong = basic(&emu, "nope");
    let r = call(&emu, None, "POST", ENROLL, &[PKCS10, ("Authorization", &wrong)], b64.as_bytes());
    assert_eq!((r.status, r.header("WWW-Authenticate")), (401, Some(CHALLENGE)));

    // Re-enroll with the device certificate, same subject and SAN (a new key: rekey).
    let (key2, _, same) = {
        let (k, pem) = crate::pki::tests::p256_csr("sensor-9", &["sensor-9.acme.example"]);
        let der = pem_der(&pem);
        (k, der.clone(), B64.encode(der))
    };
    let before = emu.issued().len();
    let r = call(&emu, Some(key_identity(&device, &key)), "POST", REENROLL, &[PKCS10], same.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(emu.est_last_auth(), Some(EstAuth::DeviceCert));
    let renewed = certs_via_openssl(&dir, &r.body).remove(0);
    assert_eq!(spki(&renewed), key2.public_key_der());
    assert_eq!(emu.issued().len(), before + 1);
    assert_eq!(emu.est_reenroll_requests(), 1);

    // Subject or SAN not byte-equal: 403.
    for (cn, dns) in [("sensor-10", "sensor-9.acme.example"), ("sensor-9", "other.acme.example")] {
        let (_, _, other) = csr(cn, &[dns]);
        let r = call(&emu, Some(key_identity(&device, &key)), "POST", REENROLL, &[PKCS10], other.as_bytes());
        assert_eq!((r.status, r.text()), (403, "subject/SAN differ\n".into()), "{cn} {dns}");
    }
    // The factory certificate, Basic, or nothing do not re-enroll.
    let r = call(&emu, Some(identity(&fc, &fk)), "POST", REENROLL, &[PKCS10], same.as_bytes());
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("EST Emulator Issuing CA"), "{}", r.text());
    let good = basic(&emu, &emu.est.password);
    let r = call(&emu, None, "POST", REENROLL, &[PKCS10, ("Authorization", &good)], same.as_bytes());
    assert_eq!(r.status, 403, "{}", r.text());

    // An expired device certificate: rustls refuses the handshake; the handler says 403 too.
    let (ec, ek) = emu.issue_est_device_identity("sensor-9", false, -1).unwrap();
    let tls = client::request_with_identity(
        &emu.url(),
        &emu.tls_root_pem(),
        Some(identity(&ec, &ek)),
        "POST",
        REENROLL,
        &[PKCS10],
        same.as_bytes(),
        T,
    );
    assert!(tls.is_err() || tls.as_ref().is_ok_and(|r| r.status == 403), "{tls:?}");
    let req = Request {
        method: "POST".into(),
        path: REENROLL.into(),
        headers: vec![("Content-Type".into(), "application/pkcs10".into())],
        body: same.clone().into_bytes(),
        peer_cert: Some(pem_der(&ec)),
        ..Request::default()
    };
    let r = emu.handle(&req);
    assert_eq!(r.status, 403);
    assert!(String::from_utf8_lossy(&r.body).contains("expired"));

    // Bad requests: content type, PEM instead of DER, a tampered signature.
    let r =
        call(&emu, None, "POST", ENROLL, &[("Content-Type", "text/plain"), ("Authorization", &good)], b"x");
    assert_eq!(r.status, 415);
    let pem_b64 = B64.encode(crate::pki::tests::p256_csr("x", &[]).1);
    let r = call(&emu, None, "POST", ENROLL, &[PKCS10, ("Authorization", &good)], pem_b64.as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    let (_, mut der, _) = csr("tampered", &[]);
    let n = der.len();
    der[n - 3] ^= 0x5a;
    let r = call(&emu, None, "POST", ENROLL, &[PKCS10, ("Authorization", &good)], B64.encode(der).as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("signature"), "{}", r.text());
}

#[test]
fn pending_answers_202_until_the_identical_csr_is_resent() {
    let mut opts = Options::default();
    opts.est.retry_after_s = 7;
    let emu = Emulator::start(opts).unwrap();
    // Armed through the control endpoint, as a shell script would.
    let r = call(&emu, None, "POST", "/_emulator/fault", &[], b"est-pending 2");
    assert_eq!(r.status, 200, "{}", r.text());
    // cacerts neither answers 202 nor uses up the count.
    assert_eq!(call(&emu, None, "GET", "/.well-known/est/cacerts", &[], b"").status, 200);
    let (key, der, b64) = csr("slow-1", &[]);
    let statuses: Vec<(u16, Option<String>)> = (0..3)
        .map(|_| {
            let r = enroll_basic(&emu, &b64);
            (r.status, r.header("Retry-After").map(str::to_string))
        })
        .collect();
    assert_eq!(statuses, vec![(202, Some("7".into())), (202, Some("7".into())), (200, None)]);
    let h = util::sha256_hex(&[&der]);
    assert_eq!(emu.est_csr_hashes(), vec![h.clone(), h.clone(), h]);
    assert_eq!(emu.est_enroll_requests(), 3);
    assert_eq!(emu.issued().len(), 1, "nothing is issued while pending");
    assert_eq!(spki(&emu.issued()[0]), key.public_key_der());
    let faults: Vec<_> = emu.log().into_iter().filter(|l| l.path == ENROLL).map(|l| l.fault).collect();
    assert_eq!(faults, vec![Some("est-pending".into()), Some("est-pending".into()), None]);
    // A different CSR gets a different hash.
    enroll_basic(&emu, &csr("slow-2", &[]).2);
    let hashes = emu.est_csr_hashes();
    assert_ne!(hashes[3], hashes[0]);
}

#[test]
fn faults_shape_est_answers() {
    let emu = Emulator::start(Options::default()).unwrap();
    let dir = TempDir::new();
    let (key, _, b64) = csr("faulty", &["faulty.acme.example"]);
    let mine = key.public_key_der();
    let once = |f: Fault| {
        emu.set_fault(f, Some(1));
        let r = enroll_basic(&emu, &b64);
        assert_eq!(emu.current_fault(), None, "{f} was used up by simpleenroll");
        r
    };

    let r = once(Fault::EstWrap64);
    let text = r.text();
    assert!(
        text.lines().count() > 2 && text.lines().all(|l| l.len() <= 64) && !text.contains('\r'),
        "{text}"
    );
    assert_eq!(spki(&certs_via_openssl(&dir, &r.body)[0]), mine);
    let text = once(Fault::EstWrap76).text();
    assert_eq!(text.lines().next().unwrap().len(), 76, "{text}");
    let r = once(Fault::EstCrlf);
    let text = r.text();
    assert!(text.ends_with("\r\n") && text.split_inclusive('\n').all(|l| l.ends_with("\r\n")), "{text:?}");
    assert_eq!(spki(&certs_via_openssl(&dir, &r.body)[0]), mine);

    let r = once(Fault::EstBer);
    assert_pkcs7_headers(&r);
    let der = decode_base64(&r.body).unwrap();
    assert_eq!((der[0], der[1]), (0x30, 0x80), "indefinite length");
    assert!(der.ends_with(&[0, 0, 0, 0, 0, 0]), "end-of-contents octets");
    assert_eq!(spki(&certs_via_openssl(&dir, &r.body)[0]), mine, "openssl reads the BER form");

    let r = once(Fault::EstExtraCerts);
    let certs = certs_via_openssl(&dir, &r.body);
    assert_eq!(certs.len(), 3);
    assert_eq!(certs[0], pem_der(&emu.est_root_pem()), "root first");
    assert_eq!(spki(&certs[2]), mine, "leaf last");

    let issued = emu.issued().len();
    let r = once(Fault::WrongKeyCert);
    assert_ne!(spki(&certs_via_openssl(&dir, &r.body)[0]), mine);
    let r = once(Fault::ExpiredCert);
    let c = certs_via_openssl(&dir, &r.body).remove(0);
    assert!(!X509Certificate::from_der(&c).unwrap().1.validity().is_valid());
    assert_eq!(emu.issued().len(), issued, "faulty deliveries are not recorded");

    let r = once(Fault::MalformedJson);
    assert!(r.status == 200 && decode_base64(&r.body).is_err(), "{}", r.text());
    let r = once(Fault::TruncatedJson);
    assert!(r.complete && decode_base64(&r.body).is_err(), "cut mid-base64: {}", r.text());
    let r = once(Fault::TruncatedBody);
    assert!(!r.complete, "Content-Length larger than the body");

    let r = once(Fault::RejectAuth);
    assert_eq!((r.status, r.header("WWW-Authenticate")), (401, Some(CHALLENGE)));
    let r = once(Fault::EstForbidden);
    assert_eq!(r.status, 403);
    assert_eq!(r.text().lines().count(), 1, "{}", r.text());
    let r = once(Fault::Http503RetryAfter);
    assert_eq!((r.status, r.header("Retry-After")), (503, Some("1")));
    assert_eq!(once(Fault::Http500).status, 500);
    assert_eq!(once(Fault::Http429).status, 429);

    // Encoding faults shape cacerts too; delivery faults do not fire there.
    emu.set_fault(Fault::EstBer, Some(1));
    let r = call(&emu, None, "GET", "/.well-known/est/cacerts", &[], b"");
    assert_eq!(decode_base64(&r.body).unwrap()[1], 0x80);
    assert_eq!(certs_via_openssl(&dir, &r.body).len(), 2);
    emu.set_fault(Fault::WrongKeyCert, Some(1));
    call(&emu, None, "GET", "/.well-known/est/cacerts", &[], b"");
    assert_eq!(emu.current_fault(), Some((Fault::WrongKeyCert, Some(1))));
    // Re-enroll is subject to the same faults.
    emu.set_fault(Fault::Http500, Some(1));
    let r = call(&emu, None, "POST", REENROLL, &[PKCS10], b64.as_bytes());
    assert_eq!(r.status, 500);
}

/// strongSwan's `pki` (Debian strongswan-pki + libstrongswan-extra-plugins for curl and
/// -standard-plugins for EC keys): `--estca`, `--est --userpass`, `--est --cert/--key`
/// (simplereenroll), and its 202 polling. strongSwan has no label option (protocols.md §6.1a),
/// so it uses the unlabelled path.
#[test]
fn strongswan_pki_estca_est_userpass_and_reenroll() {
    assert!(
        Path::new("/usr/bin/pki").exists(),
        "strongSwan `pki` is missing: apt-get install strongswan-pki libstrongswan-extra-plugins \
         libstrongswan-standard-plugins (scripts/hw-deps.sh)"
    );
    let emu = start();
    let dir = TempDir::new();
    let tls = dir.write("tls-root.pem", emu.tls_root_pem());
    let url = emu.url();
    let (ok, _, err) = run(
        "/usr/bin/pki",
        &[
            "--estca",
            "--url",
            &url,
            "--cacert",
            p(&tls),
            "--caout",
            p(&dir.path("ca.crt")),
            "--outform",
            "pem",
        ],
    );
    assert!(ok, "pki --estca: {err}");
    // strongSwan writes the root to ca.crt and the issuing CA to ca-1.crt.
    let root = std::fs::read_to_string(dir.path("ca.crt")).unwrap();
    let issuing = std::fs::read_to_string(dir.path("ca-1.crt")).unwrap();
    assert_eq!(pem_der(&root), pem_der(&emu.est_root_pem()));
    assert_eq!(pem_der(&issuing), pem_der(&emu.est_issuing_pem()));

    let key = dir.path("dev.key");
    let req = dir.path("req.der");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        p(&key),
        "-subj",
        "/O=Acme/CN=swan-1",
        "-addext",
        "subjectAltName=DNS:swan-1.acme.example",
        "-outform",
        "DER",
        "-out",
        p(&req),
    ]);
    let userpass = format!("{}:{}", emu.est.username, emu.est.password);
    let (ca, ca1) = (dir.path("ca.crt"), dir.path("ca-1.crt"));
    let est = |extra: &[&str]| {
        let mut args = vec![
            "--est",
            "--url",
            &url,
            "--in",
            p(&req),
            "--cacert",
            p(&tls),
            "--cacert",
            p(&ca),
            "--cacert",
            p(&ca1),
            "--outform",
            "pem",
            "--interval",
            "1",
            "--maxpolltime",
            "20",
        ];
        args.extend_from_slice(extra);
        run("/usr/bin/pki", &args)
    };

    // Basic enrollment, delayed once by a 202: strongSwan polls and resends the same CSR.
    emu.set_fault(Fault::EstPending, Some(1));
    let (ok, leaf, err) = est(&["--userpass", &userpass]);
    assert!(ok, "pki --est --userpass: {err}");
    assert!(err.contains("Issued certificate is trusted"), "{err}");
    assert_eq!(emu.est_last_auth(), Some(EstAuth::Basic));
    let hashes = emu.est_csr_hashes();
    assert_eq!(hashes.len(), 2);
    assert_eq!(hashes[0], hashes[1], "the poll resends the identical CSR");
    let leaf_path = dir.write("leaf.pem", &leaf);
    assert_eq!(pem_der(&String::from_utf8_lossy(&leaf)), emu.issued()[0]);

    // Re-enrollment over TLS client authentication with the issued certificate.
    let (ok, _, err) = est(&["--cert", p(&leaf_path), "--key", p(&key)]);
    assert!(ok, "pki --est --cert --key: {err}");
    assert_eq!(emu.est_last_auth(), Some(EstAuth::DeviceCert));
    assert_eq!(emu.est_reenroll_requests(), 1);
    assert_eq!(emu.issued().len(), 2);

    // A wrong password fails.
    let (ok, _, err) = est(&["--userpass", &format!("{}:wrong", emu.est.username)]);
    assert!(!ok && err.contains("401"), "{err}");
}
