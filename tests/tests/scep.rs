//! SCEP (RFC 8894) against the real micromdm `scepserver` 2.1.0 (Debian's `scep`, tooling.md §2):
//! the real `enroll-agent` enrolls with PKCSReq and the challenge password, renews with
//! RenewalReq signed by its current certificate (the server's debug log names the message type),
//! decrypts the server's DES-CBC answer with its own key (file, SoftHSM2, swtpm), and leaves the
//! installed identity alone whenever the server refuses or is gone. Chains are checked with
//! `openssl verify` against the server's CA.
//!
//! scepserver has no listen-address option (it binds `*:PORT`), so each test's server listens
//! on a free port of every interface for the test's duration, with a random challenge.

mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::hw::{require, Swtpm};
use common::{openssl, skipped_without, write_secret, Device, Scratch};
use serde_json::{json, Value};

const DEVICE: &str = "sensor-0042.devices.example";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// micromdm's SCEP server with a CA of its own in a scratch depot; killed on drop.
struct ScepServer {
    scratch: Scratch,
    child: Option<Child>,
    port: u16,
    challenge: String,
}

impl ScepServer {
    fn start() -> Option<ScepServer> {
        require(ScepServer::try_start(), "micromdm scepserver")
    }

    fn try_start() -> Result<ScepServer, String> {
        if Command::new("scepserver").arg("-version").output().is_err() {
            return Err("scepserver is not installed (scripts/hw-deps.sh installs Debian's scep)".into());
        }
        let scratch = Scratch::new("scepserver");
        let depot = scratch.0.join("depot");
        let init = Command::new("scepserver")
            .args(["ca", "-init", "-depot"])
            .arg(&depot)
            .args(["-keySize", "2048", "-organization", "enroll-test-ca", "-years", "1"])
            .output()
            .map_err(|e| e.to_string())?;
        if !init.status.success() {
            return Err(format!("scepserver ca -init: {}", String::from_utf8_lossy(&init.stderr)));
        }
        let challenge = format!("challenge-{:08x}", rand_u32());
        let mut server = ScepServer { scratch, child: None, port: free_port(), challenge };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::File::create(self.scratch.0.join("server.log")).map_err(|e| e.to_string())?;
        let child = Command::new("scepserver")
            .arg("-depot")
            .arg(self.scratch.0.join("depot"))
            .args([
                "-port",
                &self.port.to_string(),
                "-challenge",
                &self.challenge,
                "-allowrenew",
                "0",
                "-debug",
            ])
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err("scepserver did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/scep", self.port)
    }

    fn ca_pem(&self) -> PathBuf {
        self.scratch.0.join("depot/ca.pem")
    }

    /// `sha256:<hex>` of the CA certificate's DER, as `ca.ca_fingerprint` wants it.
    fn fingerprint(&self) -> String {
        let (ok, text) =
            openssl(&["x509", "-noout", "-fingerprint", "-sha256", "-in", self.ca_pem().to_str().unwrap()]);
        assert!(ok, "{text}");
        let hex = text.trim().rsplit('=').next().unwrap().to_string();
        format!("sha256:{hex}")
    }

    /// The transactionIDs of the messages the server parsed, from its debug log, in order.
    fn transaction_ids(&self) -> Vec<String> {
        let log = fs::read_to_string(self.scratch.0.join("server.log")).unwrap_or_default();
        log.lines()
            .filter(|line| line.contains("scep_message_type="))
            .filter_map(|line| line.split("transaction_id=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// The message types the server parsed, from its debug log, in order.
    fn message_types(&self) -> Vec<String> {
        let log = fs::read_to_string(self.scratch.0.join("server.log")).unwrap_or_default();
        log.lines()
            .filter_map(|line| line.split("scep_message_type=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for ScepServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).unwrap();
    u32::from_le_bytes(bytes)
}

/// A device with a SCEP config for `server` (RSA-2048 file key, the server's challenge).
fn device(server: &ScepServer, tweak: impl FnOnce(&mut Value)) -> Device {
    let config = |dir: &Path| {
        let challenge = dir.join("scep.challenge");
        write_secret(&challenge, &server.challenge);
        json!({
            "state_dir": dir.join("state"),
            "subject": { "CN": "sensor-0042", "O": "Acme" },
            "san": { "dns": [DEVICE] },
            "key": { "algorithm": "rsa2048", "provider": "file", "rotate_on_renew": true },
            "ca": {
                "backend": "scep", "url": server.url(), "ca_fingerprint": server.fingerprint(),
                "challenge_password_file": challenge, "poll_wait_s": 5
            },
            "tls": { "timeout_s": 5 },
            "renewal": { "retry_initial_s": 1, "retry_max_s": 4 }
        })
    };
    Device::new("scep-device", config, tweak)
}

/// What the SCEP tests check on a device.
trait Checks {
    fn x509(&self, what: &[&str]) -> String;
    fn assert_chain_verifies(&self, server: &ScepServer);
}

impl Checks for Device {
    fn x509(&self, what: &[&str]) -> String {
        let path = self.current().join("cert.pem");
        let mut args = vec!["x509", "-noout", "-in", path.to_str().unwrap()];
        args.extend_from_slice(what);
        let (ok, text) = openssl(&args);
        assert!(ok, "{text}");
        text.trim().to_string()
    }

    fn assert_chain_verifies(&self, server: &ScepServer) {
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            server.ca_pem().to_str().unwrap(),
            self.current().join("cert.pem").to_str().unwrap(),
        ]);
        assert!(ok, "openssl verify: {text}");
    }
}

#[test]
fn enrolls_with_the_challenge_and_renews_with_renewal_req_signed_by_the_current_certificate() {
    let Some(server) = ScepServer::start() else { return };
    let device = device(&server, |_| {});
    let run = device.expect(&["-v", "enroll"], 0);
    device.assert_chain_verifies(&server);
    assert!(device.x509(&["-subject"]).contains("CN = sensor-0042"));
    assert!(device.x509(&["-ext", "subjectAltName"]).contains(&format!("DNS:{DEVICE}")));
    assert_eq!(server.message_types(), ["PKCSReq (19)"]);
    assert!(!run.stdout.contains(&server.challenge) && !run.stderr.contains(&server.challenge));
    let key = fs::read(device.current().join("key.pem")).unwrap();
    let serial = device.x509(&["-serial"]);

    device.expect(&["enroll"], 0);
    assert_eq!(device.x509(&["-serial"]), serial, "a second enroll is a no-op");
    assert_eq!(server.message_types().len(), 1, "and asks nothing");

    device.expect(&["renew", "--force"], 0);
    device.assert_chain_verifies(&server);
    assert_ne!(device.x509(&["-serial"]), serial);
    assert_ne!(fs::read(device.current().join("key.pem")).unwrap(), key, "rotate_on_renew: a new key");
    assert_eq!(server.message_types(), ["PKCSReq (19)", "RenewalReq (17)"]);
    device.expect(&["check"], 0);
    // Plain http is SCEP's norm (design.md §10): no TLS warning, the pin is named instead.
    let online = device.expect(&["check", "--online"], 0);
    assert!(online.stdout.contains("the CA pinned by ca.ca_fingerprint"), "{online:?}");
    assert!(!online.stdout.contains("warning: no TLS"), "{online:?}");
}

#[test]
fn a_renewal_with_the_same_key_is_a_new_transaction() {
    let Some(server) = ScepServer::start() else { return };
    let device = device(&server, |c| c["key"]["rotate_on_renew"] = false.into());
    device.expect(&["enroll"], 0);
    let key = fs::read(device.current().join("key.pem")).unwrap();
    device.expect(&["renew", "--force"], 0);
    device.expect(&["renew", "--force"], 0);
    assert_eq!(fs::read(device.current().join("key.pem")).unwrap(), key, "the key is kept");
    let ids = server.transaction_ids();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "{ids:?}");
    device.assert_chain_verifies(&server);
}

#[test]
fn a_wrong_challenge_is_a_77_naming_bad_request_and_installs_nothing() {
    let Some(server) = ScepServer::start() else { return };
    let device = device(&server, |_| {});
    write_secret(&device.dir().join("scep.challenge"), "not-the-challenge");
    let run = device.expect(&["enroll"], 77);
    assert!(run.stderr.contains("PKCSReq: FAILURE, badRequest"), "{run:?}");
    assert!(!run.stderr.contains("not-the-challenge"), "the password never reaches a message");
    assert!(!device.current().exists());

    // Renewal with a wrong challenge (micromdm checks it on RenewalReq too): 77, identity kept.
    write_secret(&device.dir().join("scep.challenge"), &server.challenge);
    device.expect(&["enroll"], 0);
    let before = device.cert();
    write_secret(&device.dir().join("scep.challenge"), "not-the-challenge");
    let run = device.expect(&["renew", "--force"], 77);
    assert!(run.stderr.contains("RenewalReq: FAILURE, badRequest"), "{run:?}");
    assert_eq!(device.cert(), before);
    device.expect(&["check"], 0);
}

#[test]
fn a_server_whose_ca_does_not_match_the_pinned_fingerprint_is_refused() {
    let Some(server) = ScepServer::start() else { return };
    let device = device(&server, |c| {
        c["ca"]["ca_fingerprint"] = format!("sha256:{}", "ab".repeat(32)).into();
    });
    let run = device.expect(&["enroll"], 77);
    assert!(run.stderr.contains("no certificate matches ca.ca_fingerprint"), "{run:?}");
    let real = server.fingerprint().trim_start_matches("sha256:").replace(':', "").to_lowercase();
    assert!(run.stderr.contains(&real), "the error shows what the server sent: {run:?}");
    assert!(!device.current().exists());
    assert!(server.message_types().is_empty(), "no request went to an unpinned CA");
}

#[test]
fn a_server_that_is_gone_is_a_75_and_the_identity_stays() {
    let Some(mut server) = ScepServer::start() else { return };
    let device = device(&server, |_| {});
    device.expect(&["enroll"], 0);
    let before = device.cert();
    server.stop();
    let run = device.expect(&["renew", "--force"], 75);
    assert!(run.stderr.contains("SCEP GetCACaps") && run.stderr.contains("could not reach"), "{run:?}");
    assert_eq!(device.cert(), before);
    device.expect(&["check"], 0);
    server.spawn().unwrap();
    device.expect(&["renew", "--force"], 0);
    assert_ne!(device.cert(), before);
}

#[test]
fn p256_keys_redtrust_keys_and_a_missing_fingerprint_are_config_errors() {
    let Some(server) = ScepServer::start() else { return };
    let device = device(&server, |c| c["key"]["algorithm"] = "p256".into());
    let run = device.expect(&["enroll"], 78);
    assert!(
        run.stderr.contains("key.algorithm: SCEP answers are encrypted to the device key with RSA"),
        "{run:?}"
    );
    device.edit(|c| {
        c["key"]["algorithm"] = "rsa2048".into();
        c["ca"].as_object_mut().unwrap().remove("ca_fingerprint");
    });
    let run = device.expect(&["enroll"], 78);
    assert!(run.stderr.contains("ca.ca_fingerprint"), "{run:?}");
    device.edit(|c| c["ca"]["ca_fingerprint"] = "sha256:12:34".into());
    let run = device.expect(&["enroll"], 78);
    assert!(run.stderr.contains("ca.ca_fingerprint: SHA-256 of the CA certificate's DER"), "{run:?}");
    assert!(server.message_types().is_empty());
}

#[test]
fn a_softhsm2_key_decrypts_the_answer_inside_the_token() {
    let Some(server) = ScepServer::start() else { return };
    let mut device = device(&server, |_| {});
    let Some(_token) = device.use_softhsm("scep-test") else { return };
    let run = device.run(&["enroll"]);
    if skipped_without(&run, "pkcs11") {
        return;
    }
    assert_eq!(run.code, 0, "{run:?}");
    device.assert_chain_verifies(&server);
    assert!(device.current().join("key.uri").exists(), "the key stays in the token");
    device.expect(&["renew", "--force"], 0);
    device.assert_chain_verifies(&server);
    assert_eq!(server.message_types(), ["PKCSReq (19)", "RenewalReq (17)"]);
}

#[test]
fn a_tpm_key_decrypts_the_answer_inside_the_tpm() {
    let Some(server) = ScepServer::start() else { return };
    let device = device(&server, |_| {});
    let Some(tpm) = require(Swtpm::start(device.dir()), "swtpm") else { return };
    device.edit(|c| {
        c["key"]["provider"] = "tpm".into();
        c["key"]["tpm"] = json!({ "tcti": tpm.tcti });
    });
    let run = device.run(&["enroll"]);
    if skipped_without(&run, "tpm") {
        return;
    }
    assert_eq!(run.code, 0, "{run:?}");
    device.assert_chain_verifies(&server);
    device.expect(&["renew", "--force"], 0);
    device.assert_chain_verifies(&server);
    assert_eq!(server.message_types(), ["PKCSReq (19)", "RenewalReq (17)"]);
}
