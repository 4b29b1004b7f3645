//! enroll-gateway (design.md §9) end to end with real components: a vendor emulator, the
//! `enroll-gateway` binary serving EST over TLS with SQLite, and the real `enroll-agent` with
//! `ca.backend = "est"` pointing at it. The gateway's label forwards to the emulator through the
//! shared CA crate, verifying its TLS against `upstream.trust_bundle`; the agent never sees a
//! vendor credential. Both binaries come from `cargo build -p enroll-agent -p enroll-gateway`.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::hw::{require, Token, USER_PIN};
use common::{agent_binary, write_secret, Ca, Env};
use enroll_tests::{Fault, Options};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use serde_json::{json, Value};

/// The device id: the agent's subject CN, the token's username, the EnOS `device_key`.
const DEVICE: &str = "sensor-0042";
const LABEL: &str = "meters";

/// `target/debug/enroll-gateway`, next to the agent binary the harness runs.
fn gateway_binary() -> PathBuf {
    if let Ok(path) = std::env::var("ENROLL_GATEWAY_BIN") {
        return PathBuf::from(path);
    }
    let bin = agent_binary().with_file_name("enroll-gateway");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p enroll-agent -p enroll-gateway` first (scripts/test.sh builds every binary)",
        bin.display()
    );
    bin
}

/// How the device bootstraps at the gateway.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bootstrap {
    /// HTTP Basic with a one-time password from `enroll-gateway token create`.
    Token,
    /// A factory certificate (CN = device id) from the emulator's Factory CA.
    Factory,
}

/// A running `enroll-gateway serve`, killed on drop.
struct Gateway {
    child: Child,
    config: PathBuf,
    base: String,
    /// Everything the gateway logged, for failure messages.
    log: Arc<Mutex<String>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// `enroll-gateway -c CONFIG args…`: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(gateway_binary())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env_remove("ENROLL_GATEWAY_CONFIG")
            .output()
            .expect("run enroll-gateway");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn audit(&self) -> Vec<Value> {
        let (code, out, err) = self.cli(&["audit", "--json"]);
        assert_eq!(code, 0, "audit: {err}");
        serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().clone()
    }

    /// (operation, outcome) of every EST request's audit row, in order.
    fn decisions(&self) -> Vec<(String, String)> {
        self.audit()
            .iter()
            .filter(|r| r["operation"] != "token-create")
            .map(|r| {
                (r["operation"].as_str().unwrap().to_string(), r["outcome"].as_str().unwrap().to_string())
            })
            .collect()
    }

    /// What the gateway stored for the device: its certificates, oldest first.
    fn certificates(&self) -> Vec<Value> {
        let (code, out, err) = self.cli(&["device", "show", DEVICE, "--json"]);
        assert_eq!(code, 0, "device show: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let mut certs = v["certificates"].as_array().unwrap().clone();
        certs.sort_by_key(|c| c["issued_at"].as_i64());
        certs
    }

    fn logged(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// A CA for the gateway's TLS server certificate, and that certificate for 127.0.0.1.
fn server_pki(dir: &Path) -> PathBuf {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "Gateway Test Server CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "gateway.test");
    leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    write_secret(&dir.join("server.key"), key.serialize_pem().trim_end());
    let ca_file = dir.join("server-ca.pem");
    fs::write(&ca_file, ca_cert.pem()).unwrap();
    ca_file
}

/// The vendor's CA certificates: what the label's `cacerts` returns and renewals chain to.
fn vendor_ca_pem(env: &Env) -> String {
    let issuing = match env.ca {
        Ca::Enos => String::new(),
        Ca::Ezca => env.emu.ezca_issuing_pem(),
        Ca::Sectigo => env.emu.sectigo_issuing_pem(),
        Ca::Securosys => env.emu.securosys_issuing_pem(),
        // SCEP signs with the requested key, which a gateway does not hold.
        Ca::Est | Ca::Acme | Ca::Scep => unreachable!("EST, ACME and SCEP are not gateway upstreams"),
    };
    format!("{issuing}{}", env.ca_root_pem())
}

/// An emulator, a gateway whose label `meters` forwards to it, and an agent config that enrolls
/// at the gateway. `vendor` edits the label's `ca` block (the agent's block for that vendor).
fn setup(
    ca: Ca,
    algorithm: &str,
    bootstrap: Bootstrap,
    vendor: impl FnOnce(&Env, &mut Value),
) -> (Env, Gateway) {
    let env = Env::with_options(ca, algorithm, Options::default(), |_| {});
    let config: Value = serde_json::from_slice(&fs::read(&env.config).unwrap()).unwrap();
    let mut block = config["ca"].clone();
    vendor(&env, &mut block);

    let dir = env.dir().join("gateway");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let server_ca = server_pki(&dir);
    fs::write(dir.join("vendor-ca.pem"), vendor_ca_pem(&env)).unwrap();
    fs::write(dir.join("factory-roots.pem"), env.emu.factory_ca_pem()).unwrap();
    let label_bootstrap = match bootstrap {
        Bootstrap::Token => json!({ "tokens": true }),
        Bootstrap::Factory => json!({ "factory_roots_file": "factory-roots.pem", "device_id": "CN" }),
    };
    let gateway_config = json!({
        "listen": "127.0.0.1:0",
        "tls": { "cert_file": "server.pem", "key_file": "server.key" },
        "database": { "url": format!("sqlite://{}/gateway.db", dir.display()) },
        "labels": {
            LABEL: {
                "ca": block,
                "ca_certs_file": "vendor-ca.pem",
                "bootstrap": label_bootstrap,
                "policy": { "san_dns": ["{device}.devices.acme.example"], "max_per_device_per_day": 10 }
            }
        },
        "upstream": { "trust_bundle": env.dir().join("tls-root.pem"), "timeout_s": 20 }
    });
    let config_file = dir.join("config.json");
    fs::write(&config_file, serde_json::to_string_pretty(&gateway_config).unwrap()).unwrap();
    let gateway = start_gateway(&config_file);

    let agent_bootstrap = match bootstrap {
        Bootstrap::Token => {
            let (code, token, err) = gateway.cli(&["token", "create", "--label", LABEL, "--device", DEVICE]);
            assert_eq!(code, 0, "token create: {err}");
            write_secret(&env.dir().join("gateway-token"), token.trim());
            json!({ "username": DEVICE, "password_file": env.dir().join("gateway-token") })
        }
        Bootstrap::Factory => {
            let (cert, key) = env.emu.issue_factory_identity(DEVICE, algorithm == "rsa2048", 30).unwrap();
            write_secret(&env.dir().join("factory.pem"), cert.trim_end());
            write_secret(&env.dir().join("factory.key"), key.trim_end());
            json!({ "cert_file": env.dir().join("factory.pem"), "key_file": env.dir().join("factory.key") })
        }
    };
    env.edit_config(|c| {
        c["ca"] = json!({
            "backend": "est",
            "url": gateway.base,
            "label": LABEL,
            "bootstrap": agent_bootstrap,
            "poll_wait_s": 20,
            "poll_timeout_s": 120
        });
        // The gateway's policy: DNS SANs from policy.san_dns only.
        c["san"] = json!({ "dns": [format!("{DEVICE}.devices.acme.example")] });
        // The agent trusts the gateway, not the vendor; the gateway calls the vendor within
        // the request, so give it more than the 2 s the emulator suites use.
        c["tls"] = json!({ "trust_bundle": server_ca, "timeout_s": 30 });
    });
    (env, gateway)
}

/// `enroll-gateway serve`, once it says where it listens.
fn start_gateway(config: &Path) -> Gateway {
    let mut child = Command::new(gateway_binary())
        .arg("-c")
        .arg(config)
        .arg("serve")
        .env_remove("ENROLL_GATEWAY_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start enroll-gateway serve");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("serving EST on ").nth(1) {
                let _ = tx.send(addr.split(',').next().unwrap_or_default().trim().to_string());
            }
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("enroll-gateway serve did not start:\n{}", log.lock().unwrap());
        }
    };
    Gateway { child, config: config.to_path_buf(), base: format!("https://{addr}"), log }
}

/// The installed leaf (DER) is one the vendor emulator issued, and `openssl verify` accepts the
/// chain up to the vendor's root.
fn assert_vendor_issued(env: &Env) {
    env.assert_chain_verifies();
    let pem = fs::read_to_string(env.current().join("cert.pem")).unwrap();
    let der = pem::parse(pem).unwrap().into_contents();
    assert!(
        env.emu.issued().contains(&der),
        "current/cert.pem is not a certificate the vendor emulator issued"
    );
}

fn count(calls: &[String], needle: &str) -> usize {
    calls.iter().filter(|c| c.contains(needle)).count()
}

fn enos_block(env: &Env, block: &mut Value) {
    // The gateway names the device per request: EnOS product_key + device_key = the device id.
    let b = block.as_object_mut().unwrap();
    b.remove("asset_id");
    b.insert("product_key".into(), env.emu.enos.product_key.clone().into());
    b.insert("device_key".into(), "{device}".into());
}

/// EnOS: enroll through the gateway (`action=apply`), renew over TLS with the device certificate
/// (`simplereenroll`), which the gateway turns into `action=renew` for the stored certSN.
fn enos_enrolls_and_renews(algorithm: &str, bootstrap: Bootstrap) {
    let (env, gw) = setup(Ca::Enos, algorithm, bootstrap, enos_block);
    let (code, out, err) = gw.cli(&["check", "--online"]);
    assert_eq!(code, 0, "check --online: {out}{err}");
    assert!(out.contains(&format!("label {LABEL}: upstream reachable")), "{out}");

    env.expect(&["enroll"], 0);
    assert_vendor_issued(&env);
    let calls = env.issuing_calls();
    assert_eq!(calls, ["POST /connect-service/v2.0/certificates?action=apply -> 200"], "{calls:?}");
    let first = gw.certificates();
    assert_eq!(first.len(), 1, "{first:?}");
    let cert_sn = first[0]["upstream_ref"].as_str().expect("the certSN is stored").to_string();
    assert_eq!(Some(cert_sn.parse::<u64>().unwrap()), env.emu.enos_current_serial());

    env.expect(&["renew", "--force"], 0);
    assert_vendor_issued(&env);
    let calls = env.issuing_calls();
    // The emulator's renew refuses any certSn but the device's current one (99400), so the
    // 200 says the gateway sent the stored certSN.
    assert_eq!(calls[1], "POST /connect-service/v2.0/certificates?action=renew -> 200", "{calls:?}");
    assert_eq!(calls.len(), 2, "{calls:?}");
    let certs = gw.certificates();
    assert_eq!(certs.len(), 2, "{certs:?}");
    assert_ne!(certs[1]["upstream_ref"], certs[0]["upstream_ref"]);
    // One access token serves the label's requests (enroll, renew): a token per request would,
    // under load, sign token requests in the same millisecond (EnOS 1001). (`check --online`
    // only GETs the token URL to see the vendor answer.)
    let token_requests = env
        .emu
        .log()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/apim-token-service/v2.0/token/get")
        .count();
    assert_eq!(token_requests, 1, "EnOS token/get requests for two device requests");
    let decisions = gw.decisions();
    assert!(decisions.contains(&("simpleenroll".into(), "issued".into())), "{decisions:?}");
    assert!(decisions.contains(&("simplereenroll".into(), "issued".into())), "{decisions:?}");
    // The vendor credential never reached the device.
    let config = fs::read_to_string(&env.config).unwrap();
    assert!(!config.contains(&env.emu.enos.app_key), "the agent's config names no EnOS credential");
    env.assert_no_secret_in_outputs();
    drop(gw);
}

#[test]
fn enos_p256_token_bootstrap_enrolls_and_renews_with_the_vendors_renew_call() {
    enos_enrolls_and_renews("p256", Bootstrap::Token);
}

#[test]
fn enos_rsa2048_factory_certificate_enrolls_and_renews_with_the_vendors_renew_call() {
    enos_enrolls_and_renews("rsa2048", Bootstrap::Factory);
}

#[test]
fn ezca_renews_with_the_bootstrap_credential() {
    let (env, gw) = setup(Ca::Ezca, "p256", Bootstrap::Token, |_, block| {
        block["renew_auth"] = "bootstrap".into();
    });
    env.expect(&["enroll"], 0);
    assert_vendor_issued(&env);
    env.expect(&["renew", "--force"], 0);
    assert_vendor_issued(&env);
    let calls = env.issuing_calls();
    assert_eq!(count(&calls, "RequestSSLCertificateV2 -> 200"), 2, "{calls:?}");
    assert_eq!(count(&calls, "RenewCertificate"), 0, "no device-key renewal: {calls:?}");
    assert_eq!(gw.certificates().len(), 2);
    env.assert_no_secret_in_outputs();
}

#[test]
fn ezca_certificate_renewal_is_refused_at_start_naming_the_field() {
    let (env, gw) = setup(Ca::Ezca, "p256", Bootstrap::Token, |_, block| {
        block["renew_auth"] = "bootstrap".into();
    });
    let mut config: Value = serde_json::from_slice(&fs::read(&gw.config).unwrap()).unwrap();
    config["labels"][LABEL]["ca"]["renew_auth"] = "certificate".into();
    fs::write(&gw.config, config.to_string()).unwrap();
    let (code, _, err) = gw.cli(&["check"]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("labels.meters.ca.renew_auth: must be \"bootstrap\""), "{err}");
    config["labels"][LABEL]["ca"] = json!({ "backend": "est", "url": env.emu.url() });
    fs::write(&gw.config, config.to_string()).unwrap();
    let (code, _, err) = gw.cli(&["check"]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("labels.meters.ca.backend: \"est\" cannot be a gateway upstream"), "{err}");
}

#[test]
fn sectigo_pending_is_202_and_the_agents_retry_collects_the_certificate() {
    let (env, gw) = setup(Ca::Sectigo, "p256", Bootstrap::Token, |_, _| {});
    let started = Instant::now();
    env.expect(&["enroll"], 0);
    assert_vendor_issued(&env);
    let calls = env.issuing_calls();
    assert_eq!(calls, ["POST /api/ssl/v1/enroll -> 200"], "submitted once: {calls:?}");
    let collects = env.emu.log().iter().filter(|r| r.path.starts_with("/api/ssl/v1/collect/")).count();
    assert!(collects >= 2, "the device's retries polled collect ({collects})");
    let decisions = gw.decisions();
    assert_eq!(decisions.first(), Some(&("simpleenroll".into(), "pending".into())), "{decisions:?}");
    assert_eq!(decisions.last(), Some(&("simpleenroll".into(), "issued".into())), "{decisions:?}");
    let ssl_id = gw.certificates()[0]["upstream_ref"].as_str().unwrap().to_string();

    env.expect(&["renew", "--force"], 0);
    assert_vendor_issued(&env);
    let calls = env.issuing_calls();
    assert_eq!(calls[1], format!("POST /api/ssl/v1/renewById/{ssl_id} -> 200"), "{calls:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    env.assert_no_secret_in_outputs();
}

#[test]
fn securosys_approval_is_202_until_approved() {
    let (env, gw) = setup(Ca::Securosys, "p256", Bootstrap::Token, |_, block| {
        block["approval"] = true.into();
    });
    env.emu.set_pending_polls(2);
    env.expect(&["enroll"], 0);
    assert_vendor_issued(&env);
    let calls = env.issuing_calls();
    assert_eq!(calls, ["POST /v1/certificate/sign -> 200"], "submitted once: {calls:?}");
    let polls = env.emu.log().iter().filter(|r| r.path.starts_with("/v1/request/")).count();
    assert!(polls >= 3, "two PENDING answers, then EXECUTED ({polls})");
    let decisions = gw.decisions();
    let pending = decisions.iter().filter(|d| d.1 == "pending").count();
    assert!(pending >= 2, "{decisions:?}");
    assert_eq!(decisions.last(), Some(&("simpleenroll".into(), "issued".into())), "{decisions:?}");
}

#[test]
fn a_vendor_refusal_is_77_with_the_vendors_words_and_an_audit_row() {
    let (env, gw) = setup(Ca::Enos, "p256", Bootstrap::Token, enos_block);
    env.emu.set_fault(Fault::Enos11404, None);
    let run = env.expect(&["enroll"], 77);
    assert!(run.stderr.contains("Device cannot be found"), "the vendor's words: {run:?}");
    assert!(run.stderr.contains("11404"), "the vendor's code: {run:?}");
    assert!(!env.current().exists(), "nothing installed");
    let audit = gw.audit();
    let row = audit.iter().find(|r| r["outcome"] == "vendor-refused").unwrap_or_else(|| panic!("{audit:?}"));
    assert_eq!(row["operation"], "simpleenroll");
    assert!(row["reason"].as_str().unwrap().contains("Device cannot be found"), "{row}");
    env.assert_no_secret_in_outputs();
}

#[test]
fn a_vendor_5xx_is_75_and_the_identity_stays_untouched() {
    let (env, gw) = setup(Ca::Enos, "p256", Bootstrap::Token, enos_block);
    env.expect(&["enroll"], 0);
    let before = env.identity();
    env.emu.set_fault(Fault::Http500, None);
    let run = env.expect(&["renew", "--force"], 75);
    assert!(run.stderr.contains("503"), "the gateway answered 503: {run:?}");
    assert_eq!(env.identity(), before, "a failed renewal changes nothing");
    let decisions = gw.decisions();
    assert_eq!(decisions.last(), Some(&("simplereenroll".into(), "unavailable".into())), "{decisions:?}");
    // The vendor did not take it: once it recovers, the renewal goes through.
    env.emu.clear_fault();
    env.expect(&["renew", "--force"], 0);
    assert_vendor_issued(&env);
    assert!(!gw.logged().is_empty());
}

/// Whether the agent binary has the PKCS#11 provider (`--version`), as tests/providers.rs asks.
fn agent_has_pkcs11() -> Result<(), String> {
    let out = Command::new(agent_binary()).arg("--version").output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    match text.lines().any(|l| l.starts_with("key providers:") && l.split_whitespace().any(|w| w == "pkcs11"))
    {
        true => Ok(()),
        false => Err(format!(
            "the agent binary was built without pkcs11 ({}); scripts/test.sh builds --all-features",
            text.trim()
        )),
    }
}

#[test]
fn a_softhsm2_device_key_enrolls_and_renews_over_mtls_through_the_gateway() {
    if require(agent_has_pkcs11(), "pkcs11 in the agent").is_none() {
        return;
    }
    let (env, gw) = setup(Ca::Enos, "p256", Bootstrap::Token, enos_block);
    let Some(token) = require(Token::softhsm(env.dir(), "enroll-test"), "SoftHSM2") else {
        return;
    };
    write_secret(&env.dir().join("token.pin"), USER_PIN);
    env.edit_config(|c| {
        c["key"]["provider"] = "pkcs11".into();
        c["key"]["pkcs11"] = json!({
            "module": token.module, "token_label": token.label,
            "pin_file": env.dir().join("token.pin"), "key_label": "device"
        });
    });
    env.env_vars.lock().unwrap().extend(token.env.iter().cloned());

    env.expect(&["enroll"], 0);
    assert_vendor_issued(&env);
    assert!(!env.current().join("key.pem").exists(), "the key stays on the token");
    assert_eq!(token.private_keys().len(), 1, "{:?}", token.private_keys());
    // simplereenroll: the TLS client key signs on the token; the gateway renews at EnOS.
    env.expect(&["renew", "--force"], 0);
    assert_vendor_issued(&env);
    let calls = env.issuing_calls();
    assert_eq!(
        calls.last().unwrap(),
        "POST /connect-service/v2.0/certificates?action=renew -> 200",
        "{calls:?}"
    );
    let decisions = gw.decisions();
    assert_eq!(decisions.last(), Some(&("simplereenroll".into(), "issued".into())), "{decisions:?}");
    let audit = gw.audit();
    let renewal = audit.iter().rev().find(|r| r["operation"] == "simplereenroll").unwrap();
    assert!(renewal["who"].as_str().unwrap().contains(DEVICE), "{renewal}");
}
