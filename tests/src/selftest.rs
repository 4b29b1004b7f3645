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
