//! Tests of the emulators themselves: authentication accepted when computed as documented and
//! rejected otherwise, real certificates checked with `openssl verify`, faults observable.
//! RSA keys and CSRs come from `openssl` (rcgen with ring cannot generate RSA keys).

use crate::client;
use crate::enos::{api_signature, params_data, token_encryption};
use crate::server::Request;
use crate::util::{self, url_encode};
use crate::{Emulator, Fault, Options};
use base64::Engine;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The request body of the seed's "Request Sample" (seeds/enos-apply-certificate.txt).
const ENOS_SAMPLE_REQUEST: &str = r#"{
    "csr": "-----BEGIN NEW CERTIFICATE REQUEST-----\nMIICpzCCAY8CAQAwYjELMAkGA1UEBhMCQ04xETAPBgNVBAgTCFNoYW5naGFpMREw\nDwYDVQQHEwhTaGFuZ2hhaTENMAsGA1UEChMERW5PUzENMAsGA1UECxMERW5PUzEP\nMA0GA1UEAxMGMjVTWkFsMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\njWydoAdwoJcpvpNLr1zrsUHUXPCOLwl7jDZsBCWo8aEVv8tn4qI1VG4pqn5nqYzG\n40aoAFz1MBGxPIpjGHWbQfAaRgUlEf352ql6cpP/T1Qm6f8CjECY8vFbl4ABwOye\ncCjZJ7KIXHPF81OWOi2+JDsjDVOp747zuDpNwxkI3lIre3cj9zTa6/L+mAO34W/5\nGyHPTZ3wl7x2eFQMNXnccRoCzeXGOmk0+Cikdr5ERkZogLzW1h6JO2Gm6hAFhxjf\nuKVolAgdkjjiNoN4TTaHH4o+JNBzsV8UR4amtaFo0a+NXjZgwr2V9IMjtjkV6YIe\nHhFRLg5EpJmd4KEOUazwbwIDAQABoAAwDQYJKoZIhvcNAQELBQADggEBAIm5PAnG\ny0AIxDCB0cttTnxmOP8uquva4wnl3ZbX3cNWudzZXXHjCwYRXBhDWHJ1qM8yV1mN\nTJ1irW6Ebwq3kSqW4moJk161gKvspJuHlZhr+8eH0t/z1yLHD4sdf1XAqZ8CtIaG\nZpaOnYmp4bBu/SpfPi+S4VBU48KIc86yBtfQ1GpZiwBTpjiDTG1tyIJe2Vtd26WE\nc2LwBn9zRaFwQQ6AKCdzjGejXcWgXxRgHmxaN1zx3l4xKWR4ZAoON9Hx26RWG7zt\nQlQreoVD/FiERI81OijqrrX0LLAx4CpHVEGhrNykRAdWph47Z5vkNnfaIu2T9HWI\nsYYM5JVl66v3x7I=\n-----END NEW CERTIFICATE REQUEST-----\n",
    "validDay": 250,
    "issueAuthority": "RSA"
}"#;

/// The seed's "Response Sample" (seeds/enos-apply-certificate.txt).
const ENOS_SAMPLE_RESPONSE: &str = r#"{
    "code": 0,
    "msg": "OK",
    "requestId": "6f0c1c93-08f9-404c-a403-b49cbdab2938",
    "data": {
        "certChainURL": "https://{domain-name}/enos/CA/cacert",
        "caCert": "-----BEGIN CERTIFICATE-----\nMIID7DCCAtSgAwIBAgIJAK3CuSWAQ/PIMA0GCSqGSIb3DQEBCwUAMIGCMQswCQYD\nVQQGEwJDTjERMA8GA1UECAwIU2hhbmdoYWkxETAPBgNVBAcMCFNoYW5naGFpMQ0w\nCwYDVQQKDARFbk9TMRAwDgYDVQQLDAdFbk9TIENBMRAwDgYDVQQDDAdFbk9TIENB\nMRowGAYJKoZIhvcNAQkBFgtjYUBlbmlvdC5pbzAeFw0xOTAyMjYwOTExMzlaFw0y\nOTAyMjMwOTExMzlaMIGCMQswCQYDVQQGEwJDTjERMA8GA1UECAwIU2hhbmdoYWkx\nETAPBgNVBAcMCFNoYW5naGFpMQ0wCwYDVQQKDARFbk9TMRAwDgYDVQQLDAdFbk9T\nIENBMRAwDgYDVQQDDAdFbk9TIENBMRowGAYJKoZIhvcNAQkBFgtjYUBlbmlvdC5p\nbzCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAMU32ZYkLVcUzdvlASek\npL7oiwK4dCsmNmIIL0JHyfjPoIk34ud0eB3YR/6wv4n4eXkLp51ZOMcfTC/TXGW2\noz3gwhv/hIVg2vtu3sIYiKoL87UtMk1B6nlWdiuNeklGWEzY7nrdUEBjZn0l93Oy\nSmkXT/zPbK0ix5qLAcSuV23zADNihdh7oiUIEk8M4qz1QZWKaU+l7WPEcGZiDkRh\nZ8SWZ3Z4TQZoazDV1EGXTiw0v722O/TsnviTWilFhGsUclW91VzicZQf6NStp6Wc\nJtsGviiN+HPI+gpX2TVl/1lQmom9YPBhwdVzqGPs4NqhTClVkXUSxKSoA4ab42P/\nUBUCAwEAAaNjMGEwHQYDVR0OBBYEFINjzI33ermRFRvh5oVmH1TbgYcaMB8GA1Ud\nIwQYMBaAFINjzI33ermRFRvh5oVmH1TbgYcaMA8GA1UdEwEB/wQFMAMBAf8wDgYD\nVR0PAQH/BAQDAgEGMA0GCSqGSIb3DQEBCwUAA4IBAQACseTlfMbEA0PVbwxTSuNp\npaJ5XBFGqxFkuK5MYYBAVFmqlfSluH39BPJQFCnSNZi16T6vEXuvqqTZOIylE3z1\nVARUg3sHKLIx7sKKA4rFjTb49h48BlQGHHuyapdSJwRHuIqrWuGwgHz7Bi7NZ6EO\ngw+xkfMlEC846mlsRfqxxkFiI69hIkpu5rdO7Ya8uaXJSyAi1J3/gLSidWyyUMFM\nAq1eeWRDY/IrEcb0nRjgObuqE5DVq/1ylpkL+5DAaSiG9vYSpyIacnKxkPlg6ezJ\nqXJM+s3XWxm8/mlqspb5ewHxj6dVw/DOhFky+3l7zHERdWPkHHysEp/IcHB6Vj6y\n-----END CERTIFICATE-----",
        "cert": "-----BEGIN CERTIFICATE-----\nMIIEtTCCA52gAwIBAgICf9AwDQYJKoZIhvcNAQELBQAwgYIxCzAJBgNVBAYTAkNO\nMREwDwYDVQQIDAhTaGFuZ2hhaTERMA8GA1UEBwwIU2hhbmdoYWkxDTALBgNVBAoM\nBEVuT1MxEDAOBgNVBAsMB0VuT1MgQ0ExEDAOBgNVBAMMB0VuT1MgQ0ExGjAYBgkq\nhkiG9w0BCQEWC2NhQGVuaW90LmlvMB4XDTIwMDEwNjEwNDYzM1oXDTIwMDkxMjEw\nNDYzM1owYjELMAkGA1UEBhMCQ04xETAPBgNVBAgTCFNoYW5naGFpMREwDwYDVQQH\nEwhTaGFuZ2hhaTENMAsGA1UEChMERW5PUzENMAsGA1UECxMERW5PUzEPMA0GA1UE\nAxMGMjVTWkFsMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAjWydoAdw\noJcpvpNLr1zrsUHUXPCOLwl7jDZsBCWo8aEVv8tn4qI1VG4pqn5nqYzG40aoAFz1\nMBGxPIpjGHWbQfAaRgUlEf352ql6cpP/T1Qm6f8CjECY8vFbl4ABwOyecCjZJ7KI\nXHPF81OWOi2+JDsjDVOp747zuDpNwxkI3lIre3cj9zTa6/L+mAO34W/5GyHPTZ3w\nl7x2eFQMNXnccRoCzeXGOmk0+Cikdr5ERkZogLzW1h6JO2Gm6hAFhxjfuKVolAgd\nkjjiNoN4TTaHH4o+JNBzsV8UR4amtaFo0a+NXjZgwr2V9IMjtjkV6YIeHhFRLg5E\npJmd4KEOUazwbwIDAQABo4IBUjCCAU4wCQYDVR0TBAIwADAnBglghkgBhvhCAQ0E\nGkVub3MgR2VuZXJhdGVkIENlcnRpZmljYXRlMB0GA1UdDgQWBBRGmiiFkKBySldM\nc8qtiBeXWLtYTDCBtwYDVR0jBIGvMIGsgBSDY8yN93q5kRUb4eaFZh9U24GHGqGB\niKSBhTCBgjELMAkGA1UEBhMCQ04xETAPBgNVBAgMCFNoYW5naGFpMREwDwYDVQQH\nDAhTaGFuZ2hhaTENMAsGA1UECgwERW5PUzEQMA4GA1UECwwHRW5PUyBDQTEQMA4G\nA1UEAwwHRW5PUyBDQTEaMBgGCSqGSIb3DQEJARYLY2FAZW5pb3QuaW+CCQCtwrkl\ngEPzyDA/BglghkgBhvhCAQQEMmh0dHBzOi8vYWxwaGEtcG9ydGFsLWNuNC5lbmlv\ndC5pbzo4MDgxL2Vub3MvQ0EvY3JsMA0GCSqGSIb3DQEBCwUAA4IBAQAeunPZdxzS\nksI1iEr5eG6BVF96dahGtKdNwd8bZqkF0hfZ2OTaXX019lQHpE/KU0wRBSpNXMfq\nwtUlmK4dAzUVhWdW48gNv3jSrdxj2iwK27j7DyMpNup+mKI2AR9AMjhPzVnHXt9M\nNEK7BxTqsPs+I6gFSLr9fUV7kozROm5jEVvvLrEvX68LKvyXAqkYTtPHZlR4oj/v\nDgZwXfE9rFEi9OFYYl0Xm4lSH3HhTh9vxgq08mGtyoUiGi8h6Uy79Slwk40oblE5\n1sV1o+31MDpzQTca1aAsL/g3XL6aLUFziMHzkn5peHuf+njN0tNupNn2CLK1cl2n\nBr9WJ55OFglM\n-----END CERTIFICATE-----\n",
        "certSN": "32720",
        "issueAuthority": "RSA"
    }
}"#;

// ---------------------------------------------------------------- helpers

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("enroll-tests-{}", util::random_hex(6)));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("/usr/bin/openssl").args(args).output().expect("run /usr/bin/openssl");
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openssl {args:?} failed: {all}");
    all
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// An RSA-2048 key (PKCS#8 DER) and a CSR (PEM) for `/O=Acme/CN=cn` with `san` (openssl -addext form).
fn rsa_key_and_csr(dir: &TempDir, cn: &str, san: Option<&str>) -> (Vec<u8>, String) {
    let key = dir.path(&format!("{cn}.key"));
    let csr = dir.path(&format!("{cn}.csr"));
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", p(&key)]);
    let subj = format!("/O=Acme/CN={cn}");
    let mut args = vec!["req", "-new", "-sha256", "-key", p(&key), "-subj", &subj, "-out", p(&csr)];
    let ext = san.map(|s| format!("subjectAltName={s}"));
    if let Some(e) = &ext {
        args.extend(["-addext", e.as_str()]);
    }
    openssl(&args);
    let key_pem = std::fs::read_to_string(&key).unwrap();
    (::pem::parse(key_pem).unwrap().into_contents(), std::fs::read_to_string(&csr).unwrap())
}

/// `openssl verify` of `leaf_pem` against `root_pem` (and `untrusted` intermediates).
fn openssl_verify(dir: &TempDir, root_pem: &str, untrusted: Option<&str>, leaf_pem: &str) {
    let name = util::random_hex(4);
    let (root, inter, leaf) = (
        dir.path(&format!("{name}-root.pem")),
        dir.path(&format!("{name}-inter.pem")),
        dir.path(&format!("{name}-leaf.pem")),
    );
    std::fs::write(&root, root_pem).unwrap();
    std::fs::write(&leaf, leaf_pem).unwrap();
    let mut args = vec!["verify", "-x509_strict", "-CAfile", p(&root)];
    if let Some(u) = untrusted {
        std::fs::write(&inter, u).unwrap();
        args.extend(["-untrusted", p(&inter)]);
    }
    args.push(p(&leaf));
    let out = openssl(&args);
    assert!(out.contains(": OK"), "{out}");
}

fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Request {
    let (path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    Request {
        method: method.into(),
        path: path.into(),
        raw_query: raw_query.into(),
        query: util::parse_form(raw_query),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        body: body.to_vec(),
        peer_cert: None,
    }
}

fn json_of(r: &crate::server::Response) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&r.body)))
}

// ---------------------------------------------------------------- EnOS helpers

fn token_request(emu: &Emulator, ts: Value, secret: &str) -> Request {
    let ts_num = ts.as_i64().or_else(|| ts.as_str().and_then(|s| s.parse().ok())).unwrap();
    let body = json!({"appKey": emu.enos.app_key, "encryption": token_encryption(&emu.enos.app_key, ts_num, secret), "timestamp": ts});
    request(
        "POST",
        "/apim-token-service/v2.0/token/get",
        &[("Content-Type", "application/json;charset=UTF-8")],
        body.to_string().as_bytes(),
    )
}

/// Distinct timestamps for back-to-back token requests (a reused one is "duplicated encryption").
static TS_BUMP: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(100);

fn enos_token(emu: &Emulator) -> String {
    let ts = util::now_ms() + TS_BUMP.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let r = emu.handle(&token_request(emu, json!(ts), &emu.enos.app_secret));
    let v = json_of(&r);
    assert_eq!(v["status"], 0, "{v}");
    v["data"]["accessToken"].as_str().unwrap().to_string()
}

/// A connect-service call signed as in §1.2 step B, at time `ts_ms`, with `secret`.
fn enos_call(emu: &Emulator, token: &str, action: &str, body: &str, ts_ms: i64, secret: &str) -> Request {
    let query = [
        ("action", action),
        ("orgId", emu.enos.org_id.as_str()),
        ("productKey", emu.enos.product_key.as_str()),
        ("deviceKey", emu.enos.device_key.as_str()),
    ];
    let raw_query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", url_encode(v))).collect();
    let target = format!("/connect-service/v2.0/certificates?{}", raw_query.join("&"));
    let decoded: Vec<(String, String)> = query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let ts = ts_ms.to_string();
    let sig = api_signature(token, &params_data(&decoded, body.as_bytes()), &ts, secret);
    request(
        "POST",
        &target,
        &[
            ("Content-Type", "application/json;charset=UTF-8"),
            ("apim-accesstoken", token),
            ("apim-timestamp", &ts),
            ("apim-signature", &sig),
        ],
        body.as_bytes(),
    )
}

fn enos_ok(emu: &Emulator, token: &str, action: &str, body: &Value) -> Value {
    let r =
        emu.handle(&enos_call(emu, token, action, &body.to_string(), util::now_ms(), &emu.enos.app_secret));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    json_of(&r)
}

// ---------------------------------------------------------------- EnOS tests

#[test]
fn enos_token_accepts_documented_encryption_and_rejects_others() {
    let emu = Emulator::start(Options::default()).unwrap();
    let now = util::now_ms();
    // timestamp as a JSON number (documented Long) and as a string (DECADA firmware).
    let v = json_of(&emu.handle(&token_request(&emu, json!(now), &emu.enos.app_secret)));
    assert_eq!(
        (v["status"].as_i64(), v["msg"].as_str(), v["business"].as_str()),
        (Some(0), Some("SUCCESS"), Some("apim-token-service"))
    );
    assert!(v["data"]["expire"].as_i64().unwrap() > 7000);
    let v2 = json_of(&emu.handle(&token_request(&emu, json!((now + 1).to_string()), &emu.enos.app_secret)));
    assert_eq!(v2["status"], 0);
    // "Calling get again before expiry returns the same token."
    assert_eq!(v2["data"]["accessToken"], v["data"]["accessToken"]);
    // Reused timestamp = duplicated encryption.
    assert_eq!(json_of(&emu.handle(&token_request(&emu, json!(now), &emu.enos.app_secret)))["status"], 1001);
    assert_eq!(json_of(&emu.handle(&token_request(&emu, json!(now + 2), "wrong-secret")))["status"], 1003);
    let stale = now - 11 * 60 * 1000;
    assert_eq!(
        json_of(&emu.handle(&token_request(&emu, json!(stale), &emu.enos.app_secret)))["status"],
        1004
    );
    let unknown = json!({"appKey": "nobody", "encryption": "00", "timestamp": now + 3});
    let r = emu.handle(&request(
        "POST",
        "/apim-token-service/v2.0/token/get",
        &[],
        unknown.to_string().as_bytes(),
    ));
    assert_eq!(json_of(&r)["status"], 1002);
    let junk = emu.handle(&request("POST", "/apim-token-service/v2.0/token/get", &[], b"not json"));
    assert_eq!(json_of(&junk)["status"], 1004);
}

#[test]
fn enos_token_refresh_replaces_the_token() {
    let emu = Emulator::start(Options::default()).unwrap();
    let old = enos_token(&emu);
    let ts = util::now_ms() + 5;
    let body = json!({"appKey": emu.enos.app_key, "encryption": token_encryption(&emu.enos.app_key, ts, &emu.enos.app_secret), "timestamp": ts, "accessToken": old});
    let v = json_of(&emu.handle(&request(
        "POST",
        "/apim-token-service/v2.0/token/refresh",
        &[],
        body.to_string().as_bytes(),
    )));
    assert_eq!(v["status"], 0, "{v}");
    assert_ne!(v["data"]["accessToken"].as_str(), Some(old.as_str()));
    // The old token no longer passes the gateway.
    let csr = crate::pki::tests::p256_csr("dev", &[]).1;
    let r = emu.handle(&enos_call(
        &emu,
        &old,
        "apply",
        &json!({"csr": csr, "issueAuthority": "ECC"}).to_string(),
        util::now_ms(),
        &emu.enos.app_secret,
    ));
    assert_eq!(r.status, 401);
}

#[test]
fn enos_signature_is_checked_exactly() {
    let emu = Emulator::start(Options::default()).unwrap();
    let token = enos_token(&emu);
    let (_, csr) = crate::pki::tests::p256_csr("sensor-0042", &["sensor-0042.example"]);
    let body = json!({"csr": csr, "issueAuthority": "ecc"}).to_string();
    let now = util::now_ms();
    assert_eq!(emu.handle(&enos_call(&emu, &token, "apply", &body, now, "wrong-secret")).status, 401);
    assert_eq!(
        emu.handle(&enos_call(&emu, &token, "apply", &body, now - 11 * 60 * 1000, &emu.enos.app_secret))
            .status,
        401
    );
    assert_eq!(
        emu.handle(&enos_call(&emu, "unknown-token", "apply", &body, now, &emu.enos.app_secret)).status,
        401
    );
    // Body bytes hashed must be the bytes sent: re-serialising changes them.
    let mut tampered = enos_call(&emu, &token, "apply", &body, now, &emu.enos.app_secret);
    tampered.body.push(b' ');
    assert_eq!(emu.handle(&tampered).status, 401);
    let mut missing = enos_call(&emu, &token, "apply", &body, now, &emu.enos.app_secret);
    missing.headers.retain(|(k, _)| k != "apim-signature");
    assert_eq!(emu.handle(&missing).status, 401);
    let ok = emu.handle(&enos_call(&emu, &token, "apply", &body, now, &emu.enos.app_secret));
    assert_eq!(json_of(&ok)["code"], 0, "{}", String::from_utf8_lossy(&ok.body));
}

#[test]
fn params_data_sorts_bytewise_and_appends_body() {
    let q = vec![
        ("orgId".to_string(), "o 1".to_string()),
        ("action".into(), "apply".into()),
        ("Zeta".into(), "z".into()),
    ];
    assert_eq!(params_data(&q, b"{}"), b"ZetazactionapplyorgIdo 1{}".to_vec());
    // Independent check of the DECADA-style string of protocols.md §1.2.
    let q = vec![
        ("productKey".to_string(), "pk".to_string()),
        ("orgId".into(), "org".into()),
        ("deviceKey".into(), "dk".into()),
        ("action".into(), "apply".into()),
    ];
    assert_eq!(params_data(&q, b"B"), b"actionapplydeviceKeydkorgIdorgproductKeypkB".to_vec());
}

#[test]
fn enos_apply_with_the_seed_sample_body_and_response_shape() {
    let emu = Emulator::start(Options::default()).unwrap();
    let token = enos_token(&emu);
    let v = enos_ok(&emu, &token, "apply", &serde_json::from_str(ENOS_SAMPLE_REQUEST).unwrap());
    let sample: Value = serde_json::from_str(ENOS_SAMPLE_RESPONSE).unwrap();
    assert_same_shape(&sample, &v, "$");
    assert_eq!(v["data"]["issueAuthority"], "RSA");
    let cert = v["data"]["cert"].as_str().unwrap();
    let der = ::pem::parse(cert).unwrap().into_contents();
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    // certSN is the decimal serial; the lifetime is the sample's validDay 250.
    assert_eq!(v["data"]["certSN"].as_str().unwrap(), x.serial.to_string());
    let days = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 250);
    assert!(x.subject().to_string().contains("CN=25SZAl"));
    let dir = TempDir::new();
    openssl_verify(&dir, v["data"]["caCert"].as_str().unwrap(), None, cert);
}

/// Same keys, same JSON types, recursively (string contents may differ).
fn assert_same_shape(expect: &Value, got: &Value, at: &str) {
    match (expect, got) {
        (Value::Object(e), Value::Object(g)) => {
            let (mut ek, mut gk): (Vec<_>, Vec<_>) = (e.keys().collect(), g.keys().collect());
            ek.sort();
            gk.sort();
            assert_eq!(ek, gk, "keys at {at}");
            for (k, ev) in e {
                assert_same_shape(ev, &g[k], &format!("{at}.{k}"));
            }
        }
        (e, g) => assert_eq!(std::mem::discriminant(e), std::mem::discriminant(g), "type at {at}"),
    }
}

#[test]
fn enos_apply_and_renew_with_rsa_and_errors() {
    let emu = Emulator::start(Options::default()).unwrap();
    let dir = TempDir::new();
    let token = enos_token(&emu);
    let (_, rsa_csr) = rsa_key_and_csr(&dir, "sensor-rsa", Some("DNS:sensor-rsa.example"));
    let (_, ec_csr) = crate::pki::tests::p256_csr("sensor-ec", &[]);
    let code = |action: &str, body: Value| enos_ok(&emu, &token, action, &body)["code"].as_i64().unwrap();
    assert_eq!(code("apply", json!({"csr": ec_csr})), 99400, "default issueAuthority is RSA");
    assert_eq!(code("apply", json!({"csr": rsa_csr, "issueAuthority": "ECC"})), 99400);
    assert_eq!(code("apply", json!({"csr": rsa_csr, "issueAuthority": "DSA"})), 99400);
    assert_eq!(code("apply", json!({"csr": rsa_csr, "validDay": 3651})), 99400);
    assert_eq!(code("apply", json!({"validDay": 30})), 99400);
    let first =
        enos_ok(&emu, &token, "apply", &json!({"csr": rsa_csr, "validDay": 30, "issueAuthority": "rsa"}));
    assert_eq!(first["code"], 0, "{first}");
    openssl_verify(&dir, &emu.enos_root_pem(), None, first["data"]["cert"].as_str().unwrap());
    let sn: i64 = first["data"]["certSN"].as_str().unwrap().parse().unwrap();
    assert_eq!(emu.enos_current_serial(), Some(sn as u64));
    // Renew: certSn must be the current one; afterwards the old one is invalid.
    assert_eq!(code("renew", json!({"certSn": sn + 1, "csr": rsa_csr})), 99400);
    let (_, rsa_csr2) = rsa_key_and_csr(&dir, "sensor-rsa2", None);
    let renewed = enos_ok(
        &emu,
        &token,
        "renew",
        &json!({"certSn": sn, "csr": rsa_csr2, "validDay": 30, "issueAuthority": "RSA"}),
    );
    assert_eq!(renewed["code"], 0, "{renewed}");
    assert_ne!(renewed["data"]["certSN"], first["data"]["certSN"]);
    let again = enos_ok(&emu, &token, "renew", &json!({"certSn": sn, "csr": rsa_csr2}));
    assert!(again["msg"].as_str().unwrap().starts_with("Renew cert is failed!"), "{again}");
    // Renew without csr re-signs the old request (same key).
    let sn2: i64 = renewed["data"]["certSN"].as_str().unwrap().parse().unwrap();
    assert_eq!(enos_ok(&emu, &token, "renew", &json!({"certSn": sn2}))["code"], 0);
    assert_eq!(code("renew", json!({"csr": rsa_csr2})), 99400, "certSn is mandatory");
    assert_eq!(emu.issued().len(), 3);
}

#[test]
fn enos_device_selection() {
    let emu = Emulator::start(Options::default()).unwrap();
    let token = enos_token(&emu);
    let (_, csr) = crate::pki::tests::p256_csr("d", &[]);
    let body = json!({"csr": csr, "issueAuthority": "ECC"}).to_string();
    let call = |query: &str| {
        let decoded = util::parse_form(query);
        let ts = util::now_ms().to_string();
        let sig = api_signature(&token, &params_data(&decoded, body.as_bytes()), &ts, &emu.enos.app_secret);
        let target = format!("/connect-service/v2.0/certificates?{query}");
        json_of(&emu.handle(&request(
            "POST",
            &target,
            &[("apim-accesstoken", &token), ("apim-timestamp", &ts), ("apim-signature", &sig)],
            body.as_bytes(),
        )))
    };
    let org = &emu.enos.org_id;
    assert_eq!(call(&format!("action=apply&orgId={org}&assetId={}", emu.enos.asset_id))["code"], 0);
    assert_eq!(call(&format!("action=apply&orgId={org}&assetId=nope"))["code"], 11404);
    assert_eq!(call(&format!("action=apply&orgId=other&assetId={}", emu.enos.asset_id))["code"], 11404);
    assert_eq!(call(&format!("action=apply&orgId={org}"))["code"], 99400);
    let v = call(&format!("action=apply&orgId={org}&productKey=x&deviceKey=y"));
    assert_eq!((v["code"].as_i64(), v["msg"].as_str()), (Some(11404), Some("Device cannot be found")));
}

#[test]
fn enos_faults() {
    let emu = Emulator::start(Options::default()).unwrap();
    let token = enos_token(&emu);
    let (_, csr) = crate::pki::tests::p256_csr("d", &[]);
    let body = json!({"csr": csr, "issueAuthority": "ECC"});
    let call = |t: &str| {
        emu.handle(&enos_call(&emu, t, "apply", &body.to_string(), util::now_ms(), &emu.enos.app_secret))
    };
    emu.set_fault(Fault::EnosTokenExpired, Some(1));
    assert_eq!(json_of(&call(&token))["code"], 1203);
    // The token stays expired; a fresh one from token/get works.
    assert_eq!(json_of(&call(&token))["code"], 1203);
    let fresh = enos_token(&emu);
    assert_ne!(fresh, token);
    assert_eq!(json_of(&call(&fresh))["code"], 0);
    for (f, code, msg) in [
        (Fault::Enos11833, 11833, "Certificate is already bound to another device."),
        (Fault::Enos99500, 99500, "Internal error of certificate service."),
        (Fault::Enos11404, 11404, "Device cannot be found"),
    ] {
        emu.set_fault(f, Some(1));
        let v = json_of(&call(&fresh));
        assert_eq!((v["code"].as_i64(), v["msg"].as_str()), (Some(code), Some(msg)));
    }
    emu.set_fault(Fault::Gateway429, Some(1));
    let r = call(&fresh);
    assert_eq!((r.status, r.headers.iter().any(|(k, v)| k == "Retry-After" && v == "1")), (429, true));
    emu.set_fault(Fault::RejectAuth, Some(2));
    assert_eq!(
        json_of(&emu.handle(&token_request(&emu, json!(util::now_ms() + 7), &emu.enos.app_secret)))["status"],
        1003
    );
    assert_eq!(call(&fresh).status, 401);
    assert_eq!(json_of(&call(&fresh))["code"], 0);
    emu.set_fault(Fault::WrongKeyCert, Some(1));
    let before = emu.enos_current_serial();
    let v = json_of(&call(&fresh));
    assert_eq!(v["code"], 0);
    assert_eq!(emu.enos_current_serial(), before, "a faulty answer does not rebind the device");
    emu.set_fault(Fault::MalformedJson, Some(1));
    assert!(serde_json::from_slice::<Value>(&call(&fresh).body).is_err());
    emu.set_fault(Fault::TruncatedJson, Some(1));
    assert!(serde_json::from_slice::<Value>(&call(&fresh).body).is_err());
    let log = emu.log();
    assert!(log.iter().any(|l| l.fault.as_deref() == Some("truncated-json")));
    assert!(log.iter().all(|l| l.path.starts_with('/')));
}

// ---------------------------------------------------------------- EZCA helpers

fn jwt(pkcs8: &[u8], header: &Value, claims: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let input = format!("{}.{}", b64.encode(header.to_string()), b64.encode(claims.to_string()));
    let key = ring::signature::RsaKeyPair::from_pkcs8(pkcs8).unwrap();
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", b64.encode(sig))
}

fn claims(aud: &str) -> Value {
    let now = util::now_s();
    json!({"aud": aud, "jti": util::uuid_like(), "nbf": now, "exp": now + 1800})
}

fn v2_body(emu: &Emulator, cn: &str, csr: &str, sans: Value) -> Value {
    json!({
        "SubjectName": format!("CN={cn},O=Acme"), "SubjectAltNames": sans, "CAID": emu.ezca.ca_id,
        "TemplateID": emu.ezca.template_id, "CSR": csr, "ValidityInDays": 30,
        "EKUs": ["1.3.6.1.5.5.7.3.2", "1.3.6.1.5.5.7.3.1"], "KeyUsages": ["Key Encipherment", "Digital Signature"],
        "SelectedLocation": "IoT Device",
    })
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Issues an RSA certificate for `cn` with the bootstrap token; returns (key, cert PEM, CSR PEM).
fn ezca_issue_rsa(emu: &Emulator, dir: &TempDir, cn: &str) -> (Vec<u8>, String) {
    let (key, csr) = rsa_key_and_csr(dir, cn, Some(&format!("DNS:{cn}.example")));
    let body = v2_body(emu, cn, &csr, json!([{"ValueSTR": format!("{cn}.example"), "SubjectAltType": 2}]));
    let auth = bearer(&emu.ezca.bootstrap_token);
    let r = emu.handle(&request(
        "POST",
        "/api/CA/RequestSSLCertificateV2",
        &[("Authorization", &auth)],
        body.to_string().as_bytes(),
    ));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = json_of(&r);
    (key, v["CertificatePEM"].as_str().unwrap().to_string())
}

fn renew_request(path: &str, token: &str, cert_pem: &str, csr: &str) -> Request {
    let body = json!({"Certificate": cert_pem, "Payload": {"CSR": csr, "ValidityInDays": 30}});
    request(
        "POST",
        path,
        &[("Authorization", &bearer(token)), ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn x5t(cert_pem: &str) -> String {
    util::thumbprint(&::pem::parse(cert_pem).unwrap().into_contents())
}

// ---------------------------------------------------------------- EZCA tests

#[test]
fn entra_client_credentials() {
    let emu = Emulator::start(Options::default()).unwrap();
    let path = format!("/{}/oauth2/v2.0/token", emu.ezca.tenant_id);
    let form = |secret: &str| {
        format!(
            "client_id={}&client_secret={}&scope={}&grant_type=client_credentials",
            emu.ezca.client_id,
            url_encode(secret),
            url_encode("https://management.core.windows.net/.default")
        )
    };
    let ct = [("Content-Type", "application/x-www-form-urlencoded")];
    let bad = json_of(&emu.handle(&request("POST", &path, &ct, form("nope").as_bytes())));
    assert_eq!(
        (bad["error"].as_str(), bad["error_codes"][0].as_i64()),
        (Some("invalid_client"), Some(7000215))
    );
    assert!(bad["error_description"]
        .as_str()
        .unwrap()
        .starts_with("AADSTS7000215: Invalid client secret provided."));
    let r = emu.handle(&request("POST", &path, &ct, form(&emu.ezca.client_secret).as_bytes()));
    let v = json_of(&r);
    assert_eq!(
        (r.status, v["token_type"].as_str(), v["expires_in"].as_i64()),
        (200, Some("Bearer"), Some(3599))
    );
    // The minted token authorises RequestSSLCertificateV2; a random one does not.
    let (_, csr) = crate::pki::tests::p256_csr("ec-dev", &[]);
    let body = v2_body(&emu, "ec-dev", &csr, json!([])).to_string();
    let call = |t: &str| {
        emu.handle(&request(
            "POST",
            "/api/CA/RequestSSLCertificateV2",
            &[("Authorization", &bearer(t))],
            body.as_bytes(),
        ))
    };
    assert_eq!(call(v["access_token"].as_str().unwrap()).status, 200);
    assert_eq!(call("forged").status, 401);
}

#[test]
fn ezca_issue_chain_verifies_with_openssl() {
    let emu = Emulator::start(Options::default()).unwrap();
    let dir = TempDir::new();
    let (_, cert) = ezca_issue_rsa(&emu, &dir, "meter-7");
    openssl_verify(&dir, &emu.ezca_root_pem(), Some(&emu.ezca_issuing_pem()), &cert);
    let text = openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        p(&{
            let f = dir.path("c.pem");
            std::fs::write(&f, &cert).unwrap();
            f
        }),
    ]);
    assert!(text.contains("DNS:meter-7.example"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    // Unknown CAID / TemplateID / bad SAN type.
    let (_, csr) = crate::pki::tests::p256_csr("x", &[]);
    let auth = bearer(&emu.ezca.bootstrap_token);
    let send = |b: Value| {
        emu.handle(&request(
            "POST",
            "/api/CA/RequestSSLCertificateV2",
            &[("Authorization", &auth)],
            b.to_string().as_bytes(),
        ))
        .status
    };
    let mut b = v2_body(&emu, "x", &csr, json!([]));
    b["CAID"] = json!(util::uuid_like());
    assert_eq!(send(b), 404);
    let mut b = v2_body(&emu, "x", &csr, json!([]));
    b["TemplateID"] = json!(util::uuid_like());
    assert!(matches!(send(b), 400 | 404));
    assert_eq!(send(v2_body(&emu, "x", &csr, json!([{"ValueSTR": "a", "SubjectAltType": 3}]))), 400);
    assert_eq!(send(v2_body(&emu, "other", &csr, json!([]))), 400, "SubjectName must name the CSR's CN");
}

#[test]
fn ezca_renew_jwt_rules() {
    let emu = Emulator::start(Options::default()).unwrap();
    let dir = TempDir::new();
    let (key, cert) = ezca_issue_rsa(&emu, &dir, "gw-1");
    let (_, new_csr) = rsa_key_and_csr(&dir, "gw-1", Some("DNS:gw-1.example"));
    let header = |x: &str| json!({"alg": "RS256", "typ": "JWT", "x5t": x});
    let good = jwt(&key, &header(&x5t(&cert)), &claims("https://ezca.io"));
    let v3 = "/api/Certificates/RenewCertificateV3";
    let r = emu.handle(&renew_request(v3, &good, &cert, &new_csr));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let renewed = json_of(&r)["CertificatePEM"].as_str().unwrap().to_string();
    openssl_verify(&dir, &emu.ezca_root_pem(), Some(&emu.ezca_issuing_pem()), &renewed);
    // The other accepted audience.
    let agent = jwt(&key, &header(&x5t(&cert)), &claims("https://agent.keytos.io"));
    assert_eq!(emu.handle(&renew_request(v3, &agent, &cert, &new_csr)).status, 200);
    // Rejections: foreign key, lowercase x5t, unknown x5t, wrong aud, expired, HS256.
    let (foreign, _) = rsa_key_and_csr(&dir, "foreign", None);
    let cases = [
        jwt(&foreign, &header(&x5t(&cert)), &claims("https://ezca.io")),
        jwt(&key, &header(&x5t(&cert).to_lowercase()), &claims("https://ezca.io")),
        jwt(&key, &header(&"AB".repeat(20)), &claims("https://ezca.io")),
        jwt(&key, &header(&x5t(&cert)), &claims("https://login.microsoftonline.com")),
        jwt(
            &key,
            &header(&x5t(&cert)),
            &json!({"aud": "https://ezca.io", "jti": "j", "nbf": util::now_s() - 3000, "exp": util::now_s() - 10}),
        ),
        jwt(&key, &json!({"alg": "HS256", "typ": "JWT", "x5t": x5t(&cert)}), &claims("https://ezca.io")),
    ];
    for (i, t) in cases.iter().enumerate() {
        let r = emu.handle(&renew_request(v3, t, &cert, &new_csr));
        assert_eq!(r.status, 401, "case {i}: {}", String::from_utf8_lossy(&r.body));
    }
    let r = emu.handle(&renew_request(v3, &cases[0], &cert, &new_csr));
    assert_eq!(String::from_utf8_lossy(&r.body), "Error: token signature invalid");
    // The body's certificate must be the x5t certificate.
    assert_eq!(emu.handle(&renew_request(v3, &good, &renewed, &new_csr)).status, 401);
    // CSR subject/SANs must match the certificate.
    let (_, other_csr) = rsa_key_and_csr(&dir, "gw-2", Some("DNS:gw-1.example"));
    let r = emu.handle(&renew_request(v3, &good, &cert, &other_csr));
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        (400, "CSR does not match certificate".to_string())
    );
    // V2 answers raw PEM.
    let r = emu.handle(&renew_request("/api/Certificates/RenewCertificateV2", &good, &cert, &new_csr));
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).starts_with("-----BEGIN CERTIFICATE-----"));
}

#[test]
fn ezca_faults() {
    let emu = Emulator::start(Options::default()).unwrap();
    let dir = TempDir::new();
    let (key, cert) = ezca_issue_rsa(&emu, &dir, "gw-3");
    let (_, csr) = rsa_key_and_csr(&dir, "gw-3", Some("DNS:gw-3.example"));
    let token =
        jwt(&key, &json!({"alg": "RS256", "typ": "JWT", "x5t": x5t(&cert)}), &claims("https://ezca.io"));
    let v3 = "/api/Certificates/RenewCertificateV3";
    emu.set_fault(Fault::EzcaV3404, Some(1));
    assert_eq!(emu.handle(&renew_request(v3, &token, &cert, &csr)).status, 404);
    assert_eq!(emu.handle(&renew_request(v3, &token, &cert, &csr)).status, 200);
    emu.set_fault(Fault::EzcaWrapped, Some(1));
    let wrapped = json_of(&emu.handle(&renew_request(v3, &token, &cert, &csr)));
    let inner: Value = serde_json::from_str(wrapped.as_str().expect("a JSON string")).unwrap();
    assert!(inner["CertificatePEM"].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    emu.set_fault(Fault::ExpiredCert, Some(1));
    let v = json_of(&emu.handle(&renew_request(v3, &token, &cert, &csr)));
    let der = ::pem::parse(v["CertificatePEM"].as_str().unwrap()).unwrap().into_contents();
    assert!(!x509_parser::parse_x509_certificate(&der).unwrap().1.validity().is_valid());
    emu.set_fault(Fault::RejectAuth, Some(1));
    assert_eq!(emu.handle(&renew_request(v3, &token, &cert, &csr)).status, 401);
    emu.set_fault(Fault::Http503, None);
    for _ in 0..2 {
        assert_eq!(emu.handle(&renew_request(v3, &token, &cert, &csr)).status, 503);
    }
    emu.clear_fault();
    assert_eq!(emu.handle(&renew_request(v3, &token, &cert, &csr)).status, 200);
}

// ---------------------------------------------------------------- over HTTPS

#[test]
fn https_transport_faults_and_control_endpoint() {
    let emu =
        Emulator::start(Options { fault_delay: Duration::from_millis(1500), ..Options::default() }).unwrap();
    let root = emu.tls_root_pem();
    let t = Duration::from_secs(10);
    let auth = bearer(&emu.ezca.bootstrap_token);
    let (_, csr) = crate::pki::tests::p256_csr("net-1", &[]);
    let body = v2_body(&emu, "net-1", &csr, json!([])).to_string();
    let issue = |timeout| {
        client::request(
            &emu.url(),
            &root,
            "POST",
            "/api/CA/RequestSSLCertificateV2",
            &[("Authorization", &auth)],
            body.as_bytes(),
            timeout,
        )
    };
    let r = issue(t).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    assert!(r.header("Date").is_some_and(|d| d.ends_with(" GMT") && d.len() == 29), "{:?}", r.header("Date"));
    // Arm through the control endpoint, as the binary's users do.
    let arm = |name: &str| {
        client::request(&emu.url(), &root, "POST", "/_emulator/fault", &[], name.as_bytes(), t).unwrap()
    };
    assert_eq!(arm("truncated-body 1").status, 200);
    let r = issue(t).unwrap();
    assert!(!r.complete, "Content-Length must promise more than is sent");
    assert_eq!(arm("bogus").status, 400);
    arm("http429 1");
    let r = issue(t).unwrap();
    assert_eq!((r.status, r.header("Retry-After")), (429, Some("1")));
    arm("timeout 1");
    assert!(issue(Duration::from_millis(300)).is_err(), "the client must time out");
    arm("oversized 1");
    assert_eq!(issue(t).unwrap().body.len(), 2 * 1024 * 1024);
    let log = client::request(&emu.url(), &root, "GET", "/_emulator/log", &[], b"", t).unwrap();
    let lines: Vec<Value> = log.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["fault"] == "http429" && l["status"] == 429));
    assert!(lines.iter().any(|l| l["path"] == "/api/CA/RequestSSLCertificateV2"));
    assert_eq!(
        client::request(&emu.url(), &root, "GET", "/enos/CA/cacert/ECC", &[], b"", t).unwrap().text(),
        emu.enos_root_pem()
    );
}

#[test]
fn optional_client_certificates_reach_the_log() {
    let emu = Emulator::start(Options { request_client_cert: true, ..Options::default() }).unwrap();
    let root = emu.tls_root_pem();
    let t = Duration::from_secs(10);
    // Issue an EZCA certificate for a P-256 key, then present it.
    let (key, csr) = crate::pki::tests::p256_csr("mtls-1", &[]);
    let body = v2_body(&emu, "mtls-1", &csr, json!([])).to_string();
    let auth = bearer(&emu.ezca.bootstrap_token);
    let r = client::request(
        &emu.url(),
        &root,
        "POST",
        "/api/CA/RequestSSLCertificateV2",
        &[("Authorization", &auth)],
        body.as_bytes(),
        t,
    )
    .unwrap();
    assert_eq!(r.status, 200, "no client certificate is still fine");
    let leaf = ::pem::parse(r.json().unwrap()["CertificatePEM"].as_str().unwrap()).unwrap().into_contents();
    let issuing = ::pem::parse(emu.ezca_issuing_pem()).unwrap().into_contents();
    let identity: client::Identity = (
        vec![leaf.into(), issuing.into()],
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    );
    let r = client::request_with_identity(
        &emu.url(),
        &root,
        Some(identity),
        "GET",
        "/enos/CA/cacert/RSA",
        &[],
        b"",
        t,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let log = emu.log();
    assert_eq!(log.iter().map(|l| l.client_cert).collect::<Vec<_>>(), vec![false, true]);
}

// ---------------------------------------------------------------- Sectigo (protocols.md §3)

fn sectigo_headers(emu: &Emulator) -> Vec<(String, String)> {
    vec![
        ("Content-Type".into(), "application/json;charset=utf-8".into()),
        ("Accept".into(), "application/json".into()),
        ("login".into(), emu.sectigo.login.clone()),
        ("password".into(), emu.sectigo.password.clone()),
        ("customerUri".into(), emu.sectigo.customer_uri.clone()),
    ]
}

fn sectigo_call(emu: &Emulator, method: &str, target: &str, body: &[u8]) -> crate::server::Response {
    let h = sectigo_headers(emu);
    let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    emu.handle(&request(method, target, &refs, body))
}

fn sectigo_enroll_body(emu: &Emulator, csr: &str) -> Value {
    json!({
        "orgId": emu.sectigo.org_id, "csr": csr, "certType": emu.sectigo.cert_type, "term": 365,
        "externalRequester": "ops@acme.example", "comments": "enroll via API",
    })
}

/// Enrolls `csr`; returns the sslId.
fn sectigo_enroll(emu: &Emulator, csr: &str) -> u64 {
    let r =
        sectigo_call(emu, "POST", "/api/ssl/v1/enroll", sectigo_enroll_body(emu, csr).to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = json_of(&r);
    assert!(v["renewId"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    v["sslId"].as_u64().unwrap()
}

/// (HTTP status, Sectigo code or 0 for an empty 200).
fn sectigo_code(r: &crate::server::Response) -> (u16, i64) {
    if r.body.is_empty() {
        return (r.status, 0);
    }
    (r.status, json_of(r)["code"].as_i64().unwrap_or(1))
}

fn pem_blocks(text: &str) -> Vec<String> {
    ::pem::parse_many(text).unwrap().iter().map(|p| crate::pki::cert_pem(p.contents())).collect()
}

fn cert_spki(pem: &str) -> Vec<u8> {
    let der = ::pem::parse(pem).unwrap().into_contents();
    x509_parser::parse_x509_certificate(&der).unwrap().1.public_key().raw.to_vec()
}

#[test]
fn sectigo_enroll_pending_collect_forms_and_chain_order() {
    let emu = Emulator::start(Options::default()).unwrap();
    emu.set_pending_polls(5);
    let (key, csr) = crate::pki::tests::p256_csr("sensor-0042", &["sensor-0042.devices.acme.example"]);
    let id = sectigo_enroll(&emu, &csr);
    let details = |emu: &Emulator| json_of(&sectigo_call(emu, "GET", &format!("/api/ssl/v1/{id}"), b""));
    assert_eq!(details(&emu)["status"], "Requested");
    // Five not-ready answers, each documented form once, in turn.
    let mut seen = Vec::new();
    for i in 0..5 {
        let target = if i % 2 == 0 {
            format!("/api/ssl/v1/collect/{id}/x509")
        } else {
            format!("/api/ssl/v1/collect/{id}?format=x509")
        };
        seen.push(sectigo_code(&sectigo_call(&emu, "GET", &target, b"")));
    }
    assert_eq!(seen, vec![(400, -1400), (400, -183), (200, 0), (400, -109), (400, -103)]);
    let d = details(&emu);
    assert_eq!((d["status"].as_str(), d["serialNumber"].as_str()), (Some("Applied"), None), "{d}");
    assert!(emu.issued().is_empty());
    // Ready: path form, root → issuing → leaf.
    let r = sectigo_call(&emu, "GET", &format!("/api/ssl/v1/collect/{id}/x509"), b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers.iter().find(|(k, _)| k == "Content-Type").unwrap().1, "application/octet-stream");
    assert!(r.headers.iter().any(|(k, v)| k == "Content-Disposition" && v.starts_with("attachment")));
    let chain = pem_blocks(&String::from_utf8_lossy(&r.body));
    assert_eq!(chain.len(), 3);
    assert_eq!(
        (chain[0].as_str(), chain[1].as_str()),
        (emu.sectigo_root_pem().as_str(), emu.sectigo_issuing_pem().as_str())
    );
    let leaf = chain[2].clone();
    assert_eq!(cert_spki(&leaf), key.public_key_der());
    let dir = TempDir::new();
    openssl_verify(&dir, &emu.sectigo_root_pem(), Some(&emu.sectigo_issuing_pem()), &leaf);
    let der = ::pem::parse(&leaf).unwrap().into_contents();
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    let days = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 365, "lifetime is the term");
    assert!(x.subject().to_string().contains("CN=sensor-0042"));
    // Query form and the other formats; the same certificate every time.
    let co = sectigo_call(&emu, "GET", &format!("/api/ssl/v1/collect/{id}?format=x509CO"), b"");
    assert_eq!(pem_blocks(&String::from_utf8_lossy(&co.body)), vec![leaf.clone()]);
    let ior = sectigo_call(&emu, "GET", &format!("/api/ssl/v1/collect/{id}/x509IOR"), b"");
    assert_eq!(
        pem_blocks(&String::from_utf8_lossy(&ior.body)),
        vec![emu.sectigo_issuing_pem(), emu.sectigo_root_pem()]
    );
    assert_eq!(
        sectigo_code(&sectigo_call(&emu, "GET", &format!("/api/ssl/v1/collect/{id}/bin"), b"")),
        (400, -126)
    );
    assert_eq!(sectigo_code(&sectigo_call(&emu, "GET", "/api/ssl/v1/collect/999/x509", b"")), (400, -123));
    let d = details(&emu);
    assert_eq!(d["status"], "Issued");
    assert_eq!(
        d["serialNumber"].as_str().map(|s| u64::from_str_radix(s, 16).unwrap()),
        Some(x.serial.to_u64_digits()[0])
    );
    assert_eq!((emu.issued().len(), emu.sectigo_requests()), (1, 1));
}

#[test]
fn sectigo_auth_and_enroll_validation() {
    let emu = Emulator::start(Options::default()).unwrap();
    let (_, csr) = crate::pki::tests::p256_csr("dev-1", &["dev-1.example", "alt.example"]);
    let body = sectigo_enroll_body(&emu, &csr).to_string();
    for (name, value) in [("password", "wrong"), ("login", "nobody"), ("customerUri", "surfnet")] {
        let mut h = sectigo_headers(&emu);
        h.iter_mut().find(|(k, _)| k == name).unwrap().1 = value.into();
        let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = emu.handle(&request("POST", "/api/ssl/v1/enroll", &refs, body.as_bytes()));
        assert_eq!((r.status, json_of(&r)), (401, json!({"code": -16, "description": "Unknown user"})));
    }
    let no_uri = emu.handle(&request(
        "GET",
        "/api/ssl/v1/types",
        &[("login", &emu.sectigo.login), ("password", &emu.sectigo.password)],
        b"",
    ));
    assert_eq!(no_uri.status, 401);
    // The log shows login and customerUri, and only that a password was sent.
    let log = emu.log();
    let h = &log[2].headers;
    assert!(h.contains(&("password".into(), "<present>".into())), "{h:?}");
    assert!(h.contains(&("customerUri".into(), "surfnet".into())));
    assert!(!format!("{log:?}").contains(&emu.sectigo.password));
    let send = |b: Value| sectigo_call(&emu, "POST", "/api/ssl/v1/enroll", b.to_string().as_bytes());
    let with = |k: &str, v: Value| {
        let mut b = sectigo_enroll_body(&emu, &csr);
        b[k] = v;
        send(b)
    };
    assert_eq!(json_of(&with("term", json!(90))), json!({"code": -36, "description": "Invalid term"}));
    assert_eq!(
        json_of(&with("orgId", json!(999))),
        json!({"code": -1021, "description": "This operation cannot be performed for Organization '999'."})
    );
    assert_eq!(sectigo_code(&with("certType", json!(424))), (400, -39));
    assert_eq!(
        sectigo_code(&with(
            "csr",
            json!("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
        )),
        (400, -10)
    );
    assert_eq!(sectigo_code(&with("subjAltNames", json!("dev-1.example,evil.example"))), (400, -1601));
    let mut b = sectigo_enroll_body(&emu, &csr);
    b.as_object_mut().unwrap().remove("csr");
    assert_eq!(json_of(&send(b)), json!({"code": -7, "description": "Field 'csr' is missing"}));
    assert_eq!(emu.sectigo_requests(), 0);
    assert_eq!(with("subjAltNames", json!("alt.example, dev-1.example")).status, 200);
    let types = json_of(&sectigo_call(&emu, "GET", "/api/ssl/v1/types", b""));
    assert_eq!(types[0]["terms"], json!([365, 730]));
    assert_eq!(emu.sectigo_requests(), 1);
}

#[test]
fn sectigo_renew_by_id_and_revoke() {
    let emu = Emulator::start(Options { pending_polls: 0, ..Options::default() }).unwrap();
    let (key, csr) = crate::pki::tests::p256_csr("gw-9", &[]);
    let id = sectigo_enroll(&emu, &csr);
    let renew =
        |id: u64, body: &[u8]| sectigo_call(&emu, "POST", &format!("/api/ssl/v1/renewById/{id}"), body);
    assert_eq!(json_of(&renew(id, b"")), json!({"code": -130, "description": "SSL state is not ISSUED"}));
    assert_eq!(sectigo_code(&renew(4242, b"")), (400, -123));
    let collect = |id: u64| sectigo_call(&emu, "GET", &format!("/api/ssl/v1/collect/{id}/pemco"), b"");
    let first = String::from_utf8(collect(id).body).unwrap();
    assert_eq!(cert_spki(&first), key.public_key_der());
    // New key through renewById with a CSR: a new sslId that is collected again.
    let (key2, csr2) = crate::pki::tests::p256_csr("gw-9", &[]);
    let new_id = json_of(&renew(id, json!({"csr": csr2}).to_string().as_bytes()))["sslId"].as_u64().unwrap();
    assert_ne!(new_id, id);
    assert_eq!(cert_spki(&String::from_utf8(collect(new_id).body).unwrap()), key2.public_key_der());
    // Without a CSR the old request is re-certified (same key).
    let same_id = json_of(&renew(id, b""))["sslId"].as_u64().unwrap();
    assert_eq!(cert_spki(&String::from_utf8(collect(same_id).body).unwrap()), key.public_key_der());
    assert_eq!(emu.sectigo_requests(), 3);
    // Revoke: 204, then collect -110, details Revoked, renew -130, revoke again -159.
    let revoke = |id: u64| {
        sectigo_call(
            &emu,
            "POST",
            &format!("/api/ssl/v1/revoke/{id}"),
            json!({"reasonCode": 4, "reason": "superseded"}).to_string().as_bytes(),
        )
    };
    assert_eq!(revoke(id).status, 204);
    assert_eq!(sectigo_code(&collect(id)), (400, -110));
    assert_eq!(json_of(&sectigo_call(&emu, "GET", &format!("/api/ssl/v1/{id}"), b""))["status"], "Revoked");
    assert_eq!(sectigo_code(&renew(id, b"")), (400, -130));
    assert_eq!(sectigo_code(&revoke(id)), (400, -159));
}

#[test]
fn sectigo_faults_are_sticky_per_request() {
    let emu = Emulator::start(Options { pending_polls: 0, ..Options::default() }).unwrap();
    let (key, csr) = crate::pki::tests::p256_csr("f-1", &[]);
    let collect = |id: u64| sectigo_call(&emu, "GET", &format!("/api/ssl/v1/collect/{id}/x509"), b"");
    let status =
        |id: u64| json_of(&sectigo_call(&emu, "GET", &format!("/api/ssl/v1/{id}"), b""))["status"].clone();
    // approval-rejected: Declined and not collectable, even after the fault is used up.
    let declined = sectigo_enroll(&emu, &csr);
    emu.set_fault(Fault::ApprovalRejected, Some(1));
    assert_eq!(
        json_of(&collect(declined)),
        json!({"code": -183, "description": "Certificate is not collectable"})
    );
    assert_eq!(emu.current_fault(), None);
    assert_eq!(status(declined), "Declined");
    assert_eq!(sectigo_code(&collect(declined)), (400, -183));
    // request-expired decided by a details poll.
    let expired = sectigo_enroll(&emu, &csr);
    emu.set_fault(Fault::RequestExpired, Some(1));
    assert_eq!(status(expired), "Expired");
    assert_eq!(sectigo_code(&collect(expired)), (400, -183));
    // sectigo-revoked.
    let revoked = sectigo_enroll(&emu, &csr);
    emu.set_fault(Fault::SectigoRevoked, Some(1));
    assert_eq!(
        json_of(&collect(revoked)),
        json!({"code": -110, "description": "Certificate has been revoked and can't be downloaded"})
    );
    // pending-forever until cleared, and the request stays pending after clearing.
    let forever = sectigo_enroll(&emu, &csr);
    emu.set_fault(Fault::PendingForever, None);
    for _ in 0..7 {
        let (s, code) = sectigo_code(&collect(forever));
        assert!(matches!((s, code), (400, -1400 | -183 | -109 | -103) | (200, 0)), "{s} {code}");
    }
    emu.clear_fault();
    for _ in 0..6 {
        assert!(!String::from_utf8_lossy(&collect(forever).body).contains("CERTIFICATE"));
    }
    assert_eq!(status(forever), "Applied");
    // An unaffected request is served normally.
    let normal = sectigo_enroll(&emu, &csr);
    assert_eq!(collect(normal).status, 200);
    assert_eq!(emu.issued().len(), 1);
    // wrong-key-cert: a certificate for another key, not recorded; the next collect is genuine.
    let wrong = sectigo_enroll(&emu, &csr);
    emu.set_fault(Fault::WrongKeyCert, Some(1));
    let bad = pem_blocks(&String::from_utf8(collect(wrong).body).unwrap());
    assert_ne!(cert_spki(&bad[2]), key.public_key_der());
    assert_eq!(emu.issued().len(), 1);
    let good = pem_blocks(&String::from_utf8(collect(wrong).body).unwrap());
    assert_eq!(cert_spki(&good[2]), key.public_key_der());
    assert_eq!(emu.issued().len(), 2);
    // Request-creating faults: http500, reject-auth, malformed-json (nothing is created).
    let before = emu.sectigo_requests();
    let enroll = || {
        sectigo_call(
            &emu,
            "POST",
            "/api/ssl/v1/enroll",
            sectigo_enroll_body(&emu, &csr).to_string().as_bytes(),
        )
    };
    emu.set_fault(Fault::Http500, Some(1));
    assert_eq!(enroll().status, 500);
    emu.set_fault(Fault::RejectAuth, Some(1));
    assert_eq!(sectigo_code(&enroll()), (401, -16));
    emu.set_fault(Fault::MalformedJson, Some(1));
    let r = enroll();
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
    assert_eq!(emu.sectigo_requests(), before);
    // Status faults do not fire on request-creating calls.
    emu.set_fault(Fault::ApprovalRejected, Some(1));
    assert_eq!(enroll().status, 200);
    assert_eq!(emu.current_fault(), Some((Fault::ApprovalRejected, Some(1))));
}

#[test]
fn pending_polls_control_endpoint() {
    let emu = Emulator::start(Options::default()).unwrap();
    let set = |b: &[u8]| emu.handle(&request("POST", "/_emulator/pending-polls", &[], b));
    assert_eq!(set(b"2").status, 200);
    assert_eq!(set(b"x").status, 400);
    assert_eq!(
        String::from_utf8(emu.handle(&request("GET", "/_emulator/pending-polls", &[], b"")).body).unwrap(),
        "2\n"
    );
    let (_, csr) = crate::pki::tests::p256_csr("pp", &[]);
    let id = sectigo_enroll(&emu, &csr);
    let collect = || sectigo_call(&emu, "GET", &format!("/api/ssl/v1/collect/{id}/x509"), b"").status;
    assert_eq!([collect(), collect(), collect()], [400, 400, 200]);
}

// ---------------------------------------------------------------- Securosys (protocols.md §4)

fn tsb_headers(emu: &Emulator) -> Vec<(String, String)> {
    vec![
        ("Content-Type".into(), "application/json".into()),
        ("Authorization".into(), bearer(&emu.securosys.jwt)),
        ("X-API-KEY".into(), emu.securosys.api_key.clone()),
    ]
}

fn tsb_call_with(
    emu: &Emulator,
    headers: &[(String, String)],
    method: &str,
    target: &str,
    body: &[u8],
) -> crate::server::Response {
    let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    emu.handle(&request(method, target, &refs, body))
}

fn tsb_call(emu: &Emulator, method: &str, target: &str, body: &Value) -> crate::server::Response {
    let b = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    tsb_call_with(emu, &tsb_headers(emu), method, target, &b)
}

fn tsb_error(r: &crate::server::Response) -> (u16, i64) {
    (r.status, json_of(r)["errorCode"].as_i64().unwrap_or(0))
}

fn tsb_submit(emu: &Emulator, csr: &str) -> String {
    let body = json!({"signCertificateRequest": crate::securosys::sign_body(&emu.securosys, "dev-a", csr)});
    let r = tsb_call(emu, "POST", "/v1/certificate/sign", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    json_of(&r)["signRequestId"].as_str().unwrap().to_string()
}

fn tsb_status(emu: &Emulator, id: &str) -> Value {
    let r = tsb_call(emu, "GET", &format!("/v1/request/{id}"), &Value::Null);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    json_of(&r)
}

#[test]
fn securosys_sync_sign_checks_and_auth() {
    let emu = Emulator::start(Options::default()).unwrap();
    let dir = TempDir::new();
    let (key, csr) = crate::pki::tests::p256_csr("dev-a", &["dev-a.example"]);
    let body = crate::securosys::sign_body(&emu.securosys, "dev-a", &csr);
    assert!(body["keyPassword"].as_array().unwrap().iter().all(|c| c.as_str().unwrap().chars().count() == 1));
    let r = tsb_call(&emu, "POST", "/v1/certificate/synchronous/sign", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = json_of(&r);
    assert_eq!(v["label"], json!(emu.securosys.sign_key_name));
    let leaf = v["certificate"].as_str().unwrap();
    assert_eq!(pem_blocks(leaf).len(), 1, "TSB returns only the leaf");
    assert_eq!(cert_spki(leaf), key.public_key_der());
    let bundle = emu.securosys_ca_bundle_pem();
    assert_eq!(pem_blocks(&bundle), vec![emu.securosys_issuing_pem(), emu.securosys_root_pem()]);
    openssl_verify(&dir, &emu.securosys_root_pem(), Some(&emu.securosys_issuing_pem()), leaf);
    let der = ::pem::parse(leaf).unwrap().into_contents();
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(x.signature_algorithm.algorithm.to_id_string(), "1.2.840.113549.1.1.11");
    let days = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 90);
    assert!(x.extended_key_usage().unwrap().unwrap().value.client_auth);
    assert!(!x.extended_key_usage().unwrap().unwrap().value.server_auth);
    // SHA384_WITH_RSA is honoured.
    let mut b384 = body.clone();
    b384["signatureAlgorithm"] = json!("SHA384_WITH_RSA");
    let c384 = json_of(&tsb_call(&emu, "POST", "/v1/certificate/synchronous/sign", &b384))["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    let der = ::pem::parse(&c384).unwrap().into_contents();
    assert_eq!(
        x509_parser::parse_x509_certificate(&der).unwrap().1.signature_algorithm.algorithm.to_id_string(),
        "1.2.840.113549.1.1.12"
    );
    // Authentication: wrong API key 631, missing JWT 401.
    let mut h = tsb_headers(&emu);
    h[2].1 = "wrong".into();
    let r = tsb_call_with(&emu, &h, "POST", "/v1/certificate/synchronous/sign", body.to_string().as_bytes());
    assert_eq!(
        json_of(&r),
        json!({"errorCode": 631, "reason": "res.error.invalid.api.key", "message": "Invalid API key"})
    );
    assert_eq!(r.status, 401);
    let h: Vec<_> = tsb_headers(&emu).into_iter().filter(|(k, _)| k != "Authorization").collect();
    let r = tsb_call_with(&emu, &h, "GET", "/v1/request/x", b"");
    assert_eq!((r.status, json_of(&r)["reason"].as_str()), (401, Some("res.error.unauthorized")));
    let log = emu.log();
    assert!(log[0].headers.contains(&("X-API-KEY".into(), "<present>".into())));
    assert!(!format!("{log:?}").contains(&emu.securosys.api_key));
    // Body checks.
    let send = |k: &str, val: Value| {
        let mut b = body.clone();
        b[k] = val;
        tsb_error(&tsb_call(&emu, "POST", "/v1/certificate/synchronous/sign", &b))
    };
    let pw = emu.securosys.key_password.clone().unwrap();
    assert_eq!(send("keyPassword", json!(pw)), (400, 620), "a plain string is not a char array");
    assert_eq!(send("keyPassword", json!(["x"])), (400, 620));
    assert_eq!(send("keyPassword", Value::Null), (400, 620));
    assert_eq!(send("signKeyName", json!("other")), (400, 650));
    assert_eq!(send("certificateSigningRequest", json!("garbage")), (400, 628));
    assert_eq!(send("signatureAlgorithm", json!("SHA256_WITH_ECDSA")), (400, 611));
    assert_eq!(send("certificateAuthority", json!(true)), (400, 611));
    assert_eq!(send("commonName", json!("dev-b")), (400, 611));
    assert_eq!(send("extendedKeyUsage", json!(["TELEPATHY"])), (400, 611));
    let wrapped = json!({"signCertificateRequest": body});
    assert_eq!(tsb_error(&tsb_call(&emu, "POST", "/v1/certificate/synchronous/sign", &wrapped)).0, 400);
    assert_eq!((emu.securosys_requests(), emu.issued().len()), (2, 2));
}

#[test]
fn securosys_approval_flow_and_cancel() {
    let emu = Emulator::start(Options::default()).unwrap();
    let (key, csr) = crate::pki::tests::p256_csr("dev-a", &[]);
    // The flat body is refused on the approval endpoint.
    let flat = crate::securosys::sign_body(&emu.securosys, "dev-a", &csr);
    let r = tsb_call(&emu, "POST", "/v1/certificate/sign", &flat);
    assert_eq!((tsb_error(&r), json_of(&r)["reason"].as_str()), ((400, 400), Some("res.error.bad.request")));
    let id = tsb_submit(&emu, &csr);
    assert_eq!(id.len(), 36);
    let v = tsb_status(&emu, &id);
    assert_eq!(
        (v["status"].as_str(), v["result"].is_null(), v["executionTime"].is_null()),
        (Some("PENDING"), true, true)
    );
    assert_eq!(v["notYetApprovedBy"].as_array().unwrap().len(), 1);
    let v = tsb_status(&emu, &id);
    assert_eq!((v["status"].as_str(), v["approvedBy"].as_array().unwrap().len()), (Some("APPROVED"), 1));
    assert!(v["result"].is_null());
    assert!(emu.issued().is_empty());
    let v = tsb_status(&emu, &id);
    assert_eq!(v["status"], "EXECUTED", "{v}");
    let leaf = v["result"].as_str().unwrap().to_string();
    assert_eq!(cert_spki(&leaf), key.public_key_der());
    assert!(v["executionTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(tsb_status(&emu, &id)["result"].as_str(), Some(leaf.as_str()), "EXECUTED is stable");
    assert_eq!(emu.issued().len(), 1);
    // Unknown id → 404 651; DELETE → CANCELLED.
    let r = tsb_call(&emu, "GET", "/v1/request/00000000-0000-4000-8000-000000000000", &Value::Null);
    assert_eq!(tsb_error(&r), (404, 651));
    let other = tsb_submit(&emu, &csr);
    assert_eq!(tsb_call(&emu, "DELETE", &format!("/v1/request/{other}"), &Value::Null).status, 200);
    assert_eq!(tsb_status(&emu, &other)["status"], "CANCELLED");
    assert_eq!(tsb_error(&tsb_call(&emu, "DELETE", "/v1/request/nope", &Value::Null)), (404, 651));
    assert_eq!((emu.securosys_requests(), emu.securosys_cancelled()), (2, 1));
}

#[test]
fn securosys_status_and_delivery_faults() {
    let emu = Emulator::start(Options { pending_polls: 0, ..Options::default() }).unwrap();
    let (key, csr) = crate::pki::tests::p256_csr("dev-a", &[]);
    for (fault, status) in [
        (Fault::ApprovalRejected, "REJECTED"),
        (Fault::RequestExpired, "EXPIRED"),
        (Fault::RequestFailed, "FAILED"),
    ] {
        let id = tsb_submit(&emu, &csr);
        emu.set_fault(fault, Some(1));
        let v = tsb_status(&emu, &id);
        assert_eq!(v["status"], status);
        assert_eq!(emu.current_fault(), None);
        assert_eq!(tsb_status(&emu, &id)["status"], status, "sticky");
        if fault == Fault::ApprovalRejected {
            let who = v["rejectedBy"][0].as_str().unwrap();
            assert!(base64::engine::general_purpose::STANDARD.decode(who).is_ok());
            assert!(v["approvedBy"].as_array().unwrap().is_empty());
        }
    }
    let forever = tsb_submit(&emu, &csr);
    emu.set_fault(Fault::PendingForever, None);
    for _ in 0..4 {
        assert_eq!(tsb_status(&emu, &forever)["status"], "PENDING");
    }
    emu.clear_fault();
    assert_eq!(tsb_status(&emu, &forever)["status"], "PENDING");
    // wrong-key-cert on the EXECUTED result: not recorded, the next GET is genuine.
    let id = tsb_submit(&emu, &csr);
    assert_eq!(tsb_status(&emu, &id)["status"], "APPROVED");
    emu.set_fault(Fault::WrongKeyCert, Some(1));
    let bad = tsb_status(&emu, &id);
    assert_ne!(cert_spki(bad["result"].as_str().unwrap()), key.public_key_der());
    assert!(emu.issued().is_empty());
    let good = tsb_status(&emu, &id);
    assert_eq!(cert_spki(good["result"].as_str().unwrap()), key.public_key_der());
    assert_eq!(emu.issued().len(), 1);
    // Request-creating calls: expired-cert (sync), http503, reject-auth, truncated-json.
    let body = crate::securosys::sign_body(&emu.securosys, "dev-a", &csr);
    emu.set_fault(Fault::ExpiredCert, Some(1));
    let v = json_of(&tsb_call(&emu, "POST", "/v1/certificate/synchronous/sign", &body));
    let der = ::pem::parse(v["certificate"].as_str().unwrap()).unwrap().into_contents();
    assert!(!x509_parser::parse_x509_certificate(&der).unwrap().1.validity().is_valid());
    let before = emu.securosys_requests();
    emu.set_fault(Fault::Http503, Some(1));
    assert_eq!(tsb_call(&emu, "POST", "/v1/certificate/synchronous/sign", &body).status, 503);
    emu.set_fault(Fault::RejectAuth, Some(1));
    let wrapped = json!({"signCertificateRequest": body});
    assert_eq!(tsb_call(&emu, "POST", "/v1/certificate/sign", &wrapped).status, 401);
    emu.set_fault(Fault::TruncatedJson, Some(1));
    let r = tsb_call(&emu, "POST", "/v1/certificate/sign", &wrapped);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
    assert_eq!(emu.securosys_requests(), before);
    // A status fault is not taken by a request-creating call.
    emu.set_fault(Fault::RequestFailed, Some(1));
    tsb_submit(&emu, &csr);
    assert_eq!(emu.current_fault(), Some((Fault::RequestFailed, Some(1))));
}

// ---------------------------------------------------------------- Redtrust (protocols.md §5)

fn rt_call(
    emu: &Emulator,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: &Value,
) -> crate::server::Response {
    let auth = token.map(bearer);
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        h.push(("Authorization", a.as_str()));
    }
    let b = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    emu.handle(&request(method, target, &h, &b))
}

fn rt_login_request(emu: &Emulator, ts: i64, secret: &str) -> crate::server::Response {
    let (target, headers) = crate::redtrust::login_request_target(&emu.redtrust, ts, secret);
    let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    emu.handle(&request("GET", &target, &refs, b""))
}

/// (HTTP status, envelope errorCode).
fn rt_code(r: &crate::server::Response) -> (u16, String) {
    let v = json_of(r);
    (r.status, v["errorCode"].as_str().unwrap_or_default().to_string())
}

/// The temporary token from a successful login request's Location.
fn rt_tkn(emu: &Emulator) -> String {
    let r = rt_login_request(emu, util::now_s(), &emu.redtrust.hmac_secret);
    assert_eq!(r.status, 302, "{}", String::from_utf8_lossy(&r.body));
    let loc = r.headers.iter().find(|(k, _)| k == "Location").unwrap().1.clone();
    loc.split_once("tkn=").unwrap().1.to_string()
}

/// A full login; returns (accessToken, refreshToken).
fn rt_login(emu: &Emulator) -> (String, String) {
    let tkn = rt_tkn(emu);
    let r = rt_call(emu, "POST", "/authapi/v1/login_by_temp_token", None, &json!({"temporalToken": tkn}));
    let v = json_of(&r);
    assert_eq!((r.status, v["messageType"].as_str()), (200, Some("SUCCESS")), "{v}");
    (v["data"]["accessToken"].as_str().unwrap().into(), v["data"]["refreshToken"].as_str().unwrap().into())
}

fn rt_create_body(emu: &Emulator, cn: &str) -> Value {
    json!({
        "dn": [{"attribute": "cn", "value": cn}, {"attribute": "o", "value": "Acme"}, {"attribute": "c", "value": "NL"}],
        "hashType": "SHA384", "keyLength": "2048", "keyType": "RSA", "provider": emu.redtrust.ca_provider,
        "info": {"device": cn},
    })
}

/// csr/create (v1 or v2); returns (requestCode, CSR DER).
fn rt_create(emu: &Emulator, token: &str, path: &str, body: &Value) -> (String, Vec<u8>) {
    let r = rt_call(emu, "POST", path, Some(token), body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = json_of(&r);
    assert_eq!((v["messageType"].as_str(), v["errorCode"].as_str()), (Some("SUCCESS"), Some("OK")));
    let csr = base64::engine::general_purpose::STANDARD.decode(v["data"]["csr"].as_str().unwrap()).unwrap();
    (v["data"]["requestCode"].as_str().unwrap().to_string(), csr)
}

/// Issues a leaf for `csr_der` with the Sectigo emulator of the same run (pending 0); DER.
fn issue_elsewhere(emu: &Emulator, csr_der: &[u8]) -> Vec<u8> {
    emu.set_pending_polls(0);
    let pem = crate::pki::pem_encode("CERTIFICATE REQUEST", csr_der);
    let id = sectigo_enroll(emu, &pem);
    let r = sectigo_call(emu, "GET", &format!("/api/ssl/v1/collect/{id}/x509CO"), b"");
    assert_eq!(r.status, 200);
    ::pem::parse(&r.body).unwrap().into_contents()
}

fn rt_finalize(emu: &Emulator, token: &str, code: &str, der: &[u8]) -> crate::server::Response {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body = json!({"dataInB64": b64, "provider": emu.redtrust.ca_provider, "requestCode": code});
    rt_call(emu, "PUT", "/raapi/v1/csr/finalize", Some(token), &body)
}

#[test]
fn redtrust_hmac_login_and_token_lifecycle() {
    let emu = Emulator::start(Options::default()).unwrap();
    let now = util::now_s();
    let secret = emu.redtrust.hmac_secret.clone();
    let r = rt_login_request(&emu, now, &secret);
    assert_eq!((r.status, r.body.len()), (302, 0));
    let loc = r.headers.iter().find(|(k, _)| k == "Location").unwrap().1.clone();
    assert!(loc.starts_with(&format!("{}?tkn=", emu.redtrust.redirect_url)), "{loc}");
    assert_eq!(rt_code(&rt_login_request(&emu, now, "wrong-secret")), (401, "INVALID_SIGNATURE".into()));
    assert_eq!(rt_code(&rt_login_request(&emu, now - 400, &secret)), (401, "TIMESTAMP_OUT_OF_RANGE".into()));
    // The MAC must be in the header too, and the partner known in both places.
    let (target, headers) = crate::redtrust::login_request_target(&emu.redtrust, now, &secret);
    let only_query = emu.handle(&request(
        "GET",
        &target,
        &[("x-partner-name", &headers[0].1), ("x-request-timestamp", &headers[1].1)],
        b"",
    ));
    assert_eq!(rt_code(&only_query), (401, "INVALID_SIGNATURE".into()));
    let mut other = emu.redtrust.clone();
    other.partner = "OTHER".into();
    let (t, h) = crate::redtrust::login_request_target(&other, now, &secret);
    let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(rt_code(&emu.handle(&request("GET", &t, &refs, b""))), (401, "UNKNOWN_PARTNER".into()));
    let mut other = emu.redtrust.clone();
    other.redirect_url = "https://evil.invalid/".into();
    let (t, h) = crate::redtrust::login_request_target(&other, now, &secret);
    let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        rt_code(&emu.handle(&request("GET", &t, &refs, b""))),
        (401, "REDIRECT_NOT_REGISTERED".into())
    );
    let log = emu.log();
    assert!(log[0].headers.contains(&("x-hmac-signature".into(), "<present>".into())));
    assert!(log[0].headers.contains(&("x-partner-name".into(), emu.redtrust.partner.clone())));
    // Temporary tokens are single use; POST (v4.42) and GET (seed v4.33) both work.
    let tkn = loc.split_once("tkn=").unwrap().1.to_string();
    let login = |m: &str, t: &str| {
        rt_call(&emu, m, "/authapi/v1/login_by_temp_token", None, &json!({"temporalToken": t}))
    };
    let v = json_of(&login("POST", &tkn));
    assert_eq!(v["messageType"], "SUCCESS", "{v}");
    assert!(v["data"]["expiration"].as_str().unwrap().ends_with('Z'));
    assert_eq!(rt_code(&login("POST", &tkn)), (401, "INVALID_TEMPORAL_TOKEN".into()));
    assert_eq!(json_of(&login("GET", &rt_tkn(&emu)))["messageType"], "SUCCESS");
    assert!(emu
        .log()
        .iter()
        .any(|l| l.method == "GET" && l.path == "/authapi/v1/login_by_temp_token" && l.status == 200));
    assert_eq!(emu.redtrust_sessions_open(), 2);
    // Refresh rotates both tokens.
    let (access, refresh) =
        (v["data"]["accessToken"].as_str().unwrap(), v["data"]["refreshToken"].as_str().unwrap());
    let r = rt_call(&emu, "PUT", "/authapi/v1/refresh-token", None, &json!({"refreshToken": refresh}));
    let nv = json_of(&r);
    assert_eq!(nv["errorCode"], "OK", "{nv}");
    let new_access = nv["data"]["accessToken"].as_str().unwrap().to_string();
    assert_ne!(new_access, access);
    let again = rt_call(&emu, "PUT", "/authapi/v1/refresh-token", None, &json!({"refreshToken": refresh}));
    assert_eq!(rt_code(&again), (401, "INVALID_REFRESH_TOKEN".into()));
    let bad_create = rt_call(&emu, "POST", "/raapi/v1/csr/create", Some(access), &json!({}));
    assert_eq!(rt_code(&bad_create), (401, "INVALID_TOKEN".into()));
    assert_eq!(
        rt_code(&rt_call(&emu, "POST", "/raapi/v1/csr/create", Some(&new_access), &json!({}))),
        (400, "UNKNOWN_PROVIDER".into()),
        "the new access token passes authentication"
    );
    // Logout kills the token.
    let r = rt_call(&emu, "DELETE", "/authapi/v1/logout", Some(&new_access), &Value::Null);
    assert_eq!(
        (json_of(&r)["messageType"].as_str(), json_of(&r)["data"].clone()),
        (Some("SUCCESS"), json!({}))
    );
    assert_eq!(
        rt_code(&rt_call(&emu, "POST", "/raapi/v1/csr/create", Some(&new_access), &json!({}))),
        (401, "INVALID_TOKEN".into())
    );
    assert_eq!(emu.redtrust_sessions_open(), 1);
    // reject-auth on the login request.
    emu.set_fault(Fault::RejectAuth, Some(1));
    assert_eq!(rt_code(&rt_login_request(&emu, util::now_s(), &secret)), (401, "INVALID_SIGNATURE".into()));
    assert_eq!(rt_login_request(&emu, util::now_s(), &secret).status, 302);
}

#[test]
fn redtrust_create_finalize_and_renew() {
    let emu = Emulator::start(Options::default()).unwrap();
    let (token, _) = rt_login(&emu);
    let (code, csr_der) = rt_create(&emu, &token, "/raapi/v1/csr/create", &rt_create_body(&emu, "sensor-rt"));
    assert!(code.len() == 20 && code.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()), "{code}");
    let csr = crate::pki::parse_csr(&csr_der).unwrap();
    assert_eq!(csr.key, crate::pki::KeyKind::Rsa(2048));
    assert_eq!(csr.sig_alg, "1.2.840.113549.1.1.12", "hashType SHA384");
    let (_, name) =
        <x509_parser::x509::X509Name as x509_parser::prelude::FromDer<_>>::from_der(&csr.subject_der)
            .unwrap();
    assert_eq!(name.to_string(), "CN=sensor-rt, O=Acme, C=NL");
    let leaf = issue_elsewhere(&emu, &csr_der);
    let r = rt_finalize(&emu, &token, &code, &leaf);
    let v = json_of(&r);
    assert_eq!(v["errorCode"], "OK", "{v}");
    assert_eq!(v["data"]["thumbprint"].as_str(), Some(util::thumbprint(&leaf).as_str()));
    let id = v["data"]["idCertificate"].as_u64().unwrap();
    assert_eq!(rt_code(&rt_finalize(&emu, &token, &code, &leaf)), (404, "REQUEST_NOT_FOUND".into()));
    // A certificate for another key, garbage, unknown requests, wrong provider, no cn.
    let (code2, _) = rt_create(&emu, &token, "/raapi/v1/csr/create", &rt_create_body(&emu, "sensor-rt"));
    assert_eq!(rt_code(&rt_finalize(&emu, &token, &code2, &leaf)), (400, "CERTIFICATE_KEY_MISMATCH".into()));
    assert_eq!(
        rt_code(&rt_finalize(&emu, &token, &code2, b"not a certificate")),
        (400, "INVALID_CERTIFICATE".into())
    );
    assert_eq!(rt_code(&rt_finalize(&emu, &token, "NOPE", &leaf)), (404, "REQUEST_NOT_FOUND".into()));
    let mut b = rt_create_body(&emu, "x");
    b["provider"] = json!("CAMERFIRMA");
    assert_eq!(
        rt_code(&rt_call(&emu, "POST", "/raapi/v1/csr/create", Some(&token), &b)),
        (400, "UNKNOWN_PROVIDER".into())
    );
    let mut b = rt_create_body(&emu, "x");
    b["dn"] = json!([{"attribute": "o", "value": "Acme"}]);
    assert_eq!(
        rt_code(&rt_call(&emu, "POST", "/raapi/v1/csr/create", Some(&token), &b)),
        (400, "BAD_REQUEST".into())
    );
    // Renewal: v2 with thumbprintToRenew only.
    let thumb = util::thumbprint(&leaf);
    let mut renew = rt_create_body(&emu, "sensor-rt");
    renew["thumbprintToRenew"] = json!(thumb);
    assert_eq!(
        rt_code(&rt_call(&emu, "POST", "/raapi/v1/csr/create", Some(&token), &renew)),
        (400, "BAD_REQUEST".into())
    );
    let plain = rt_create_body(&emu, "sensor-rt");
    assert_eq!(
        rt_code(&rt_call(&emu, "POST", "/raapi/v2/csr/create", Some(&token), &plain)),
        (400, "BAD_REQUEST".into())
    );
    let mut unknown = renew.clone();
    unknown["thumbprintToRenew"] = json!("AB".repeat(20));
    assert_eq!(
        rt_code(&rt_call(&emu, "POST", "/raapi/v2/csr/create", Some(&token), &unknown)),
        (404, "CERTIFICATE_NOT_FOUND".into())
    );
    let (code3, csr3) = rt_create(&emu, &token, "/raapi/v2/csr/create", &renew);
    assert_ne!(crate::pki::parse_csr(&csr3).unwrap().spki_der, csr.spki_der, "a new server-side key");
    let leaf3 = issue_elsewhere(&emu, &csr3);
    let v = json_of(&rt_finalize(&emu, &token, &code3, &leaf3));
    assert_eq!(
        v["data"]["idCertificate"].as_u64(),
        Some(id),
        "the renewed certificate replaces the old record"
    );
    assert_eq!(v["data"]["thumbprint"].as_str(), Some(util::thumbprint(&leaf3).as_str()));
    assert_eq!(
        rt_code(&rt_call(&emu, "POST", "/raapi/v2/csr/create", Some(&token), &renew)),
        (404, "CERTIFICATE_NOT_FOUND".into())
    );
    assert_eq!((emu.redtrust_keys(), emu.redtrust_finalized()), (3, 2));
}

#[test]
fn redtrust_faults_and_expiry() {
    let emu = Emulator::start(Options::default()).unwrap();
    let (token, refresh) = rt_login(&emu);
    let body = rt_create_body(&emu, "sensor-f");
    emu.set_fault(Fault::RedtrustTokenExpired, Some(1));
    let create = |t: &str| rt_call(&emu, "POST", "/raapi/v1/csr/create", Some(t), &body);
    assert_eq!(rt_code(&create(&token)), (401, "TOKEN_EXPIRED".into()));
    assert_eq!(rt_code(&create(&token)), (401, "TOKEN_EXPIRED".into()), "the token stays dead");
    let r = rt_call(&emu, "PUT", "/authapi/v1/refresh-token", None, &json!({"refreshToken": refresh}));
    let fresh = json_of(&r)["data"]["accessToken"].as_str().unwrap().to_string();
    let (code, csr) = rt_create(&emu, &fresh, "/raapi/v1/csr/create", &body);
    assert_eq!(emu.redtrust_keys(), 1);
    // finalize-500 records nothing; the same finalize then succeeds.
    let leaf = issue_elsewhere(&emu, &csr);
    emu.set_fault(Fault::RedtrustFinalize500, Some(1));
    assert_eq!(rt_finalize(&emu, &fresh, &code, &leaf).status, 500);
    assert_eq!(emu.redtrust_finalized(), 0);
    assert_eq!(rt_code(&rt_finalize(&emu, &fresh, &code, &leaf)), (200, "OK".into()));
    // Generic faults on create generate no key.
    emu.set_fault(Fault::Http500, Some(1));
    assert_eq!(create(&fresh).status, 500);
    emu.set_fault(Fault::MalformedJson, Some(1));
    assert!(serde_json::from_slice::<Value>(&create(&fresh).body).is_err());
    assert_eq!(emu.redtrust_keys(), 1);
    // Natural expiry of the access token.
    let mut opts = Options::default();
    opts.redtrust.token_lifetime_s = 0;
    let short = Emulator::start(opts).unwrap();
    let (t, _) = rt_login(&short);
    assert_eq!(
        rt_code(&rt_call(&short, "POST", "/raapi/v1/csr/create", Some(&t), &json!({}))),
        (401, "TOKEN_EXPIRED".into())
    );
}
