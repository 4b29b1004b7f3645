//! ACME (RFC 8555) against the real Pebble test CA (Debian's `pebble`, tooling.md §1): the real
//! `enroll-agent` binary enrolls and renews through orders, answers http-01 on its own listener
//! (validated by Pebble through `pebble-challtestsrv`'s DNS), dns-01 through a hook that writes
//! the TXT record into that DNS, retries `badNonce`, binds its account to an external account,
//! carries a pending order across runs, and leaves the installed identity alone whenever an
//! order fails. Chains are checked with `openssl verify` against Pebble's root.

mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::hw::require;
use common::{mode, openssl, skipped_without, write_secret, Device, Scratch};
use serde_json::{json, Value};

const DEVICE: &str = "sensor-0042.devices.acme.example";

#[derive(Default)]
struct PebbleOptions {
    /// Pebble marks every authorization valid without connecting (no DNS, no listener needed).
    always_valid: bool,
    /// Percentage of nonces Pebble rejects with badNonce (PEBBLE_WFE_NONCEREJECT).
    nonce_reject: u32,
    /// External account binding required, with this (kid, base64url MAC key).
    eab: Option<(&'static str, &'static str)>,
    /// Seconds the validation authority sleeps before validating (else PEBBLE_VA_NOSLEEP).
    va_sleep_s: Option<u32>,
}

/// Pebble and its DNS (pebble-challtestsrv) on free loopback ports, killed on drop.
struct Pebble {
    scratch: Scratch,
    children: Vec<Child>,
    port: u16,
    management: u16,
    /// Where Pebble's validation authority connects for http-01.
    http01: u16,
    /// Where it connects for tls-alpn-01.
    tls_alpn01: u16,
    /// pebble-challtestsrv's management API (set-txt, clear-txt).
    dns_management: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn shell(script: &str, dir: &Path) -> Result<(), String> {
    let out = Command::new("sh").args(["-c", script]).current_dir(dir).output().map_err(|e| e.to_string())?;
    out.status.success().then_some(()).ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

impl Pebble {
    fn start(options: PebbleOptions) -> Option<Pebble> {
        require(Pebble::try_start(options), "pebble")
    }

    fn try_start(options: PebbleOptions) -> Result<Pebble, String> {
        for tool in ["pebble", "pebble-challtestsrv"] {
            shell(&format!("command -v {tool}"), Path::new("/"))
                .map_err(|_| format!("{tool} is not installed (scripts/hw-deps.sh installs it)"))?;
        }
        let scratch = Scratch::new("pebble");
        let dir = scratch.0.clone();
        // Pebble's own HTTPS listener needs a certificate; Debian ships none (tooling.md §1).
        shell(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
               -subj '/CN=pebble test TLS CA' -keyout tls-ca.key -out tls-ca.pem 2>/dev/null && \
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
               -keyout tls-key.pem -out tls.csr 2>/dev/null && \
             printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > tls.ext && \
             openssl x509 -req -in tls.csr -CA tls-ca.pem -CAkey tls-ca.key -CAcreateserial -days 30 \
               -extfile tls.ext -out tls-cert.pem 2>/dev/null",
            &dir,
        )?;
        let (port, management, http01, dns, dns_management, tls_alpn01) =
            (free_port(), free_port(), free_port(), free_port(), free_port(), free_port());
        let mut config = json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("tls-cert.pem"), "privateKey": dir.join("tls-key.pem"),
            "httpPort": http01, "tlsPort": tls_alpn01, "ocspResponderURL": "",
            "externalAccountBindingRequired": options.eab.is_some()
        }});
        if let Some((kid, key)) = options.eab {
            config["pebble"]["externalAccountMACKeys"] = json!({ kid: key });
        }
        fs::write(dir.join("pebble.json"), config.to_string()).map_err(|e| e.to_string())?;
        let log = |name: &str| fs::File::create(dir.join(name)).map(Stdio::from).map_err(|e| e.to_string());
        let dns_server = Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns}"),
                "-management",
                &format!("127.0.0.1:{dns_management}"),
            ])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log")?)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut pebble = Command::new("pebble");
        pebble.args(["-config", "pebble.json", "-dnsserver", &format!("127.0.0.1:{dns}")]).current_dir(&dir);
        pebble.env("PEBBLE_WFE_NONCEREJECT", options.nonce_reject.to_string());
        // Every order validates anew (by default Pebble reuses half of the valid authorizations).
        pebble.env("PEBBLE_AUTHZREUSE", "0");
        match options.va_sleep_s {
            Some(s) => pebble.env("PEBBLE_VA_SLEEPTIME", s.to_string()),
            None => pebble.env("PEBBLE_VA_NOSLEEP", "1"),
        };
        if options.always_valid {
            pebble.env("PEBBLE_VA_ALWAYS_VALID", "1");
        }
        let pebble =
            pebble.stdout(log("pebble.log")?).stderr(Stdio::null()).spawn().map_err(|e| e.to_string())?;
        let started = Pebble {
            scratch,
            children: vec![dns_server, pebble],
            port,
            management,
            http01,
            tls_alpn01,
            dns_management,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || TcpStream::connect(("127.0.0.1", dns_management)).is_err()
        {
            if Instant::now() > deadline {
                return Err("pebble did not listen within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(started)
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    fn tls_root(&self) -> PathBuf {
        self.scratch.0.join("tls-ca.pem")
    }

    /// The issuing root, which Pebble makes anew at every start.
    fn root_pem(&self) -> String {
        let out = Command::new("curl")
            .args(["-sf", "--cacert", self.tls_root().to_str().unwrap()])
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(out.status.success(), "fetching pebble's root");
        String::from_utf8(out.stdout).unwrap()
    }

    fn stop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A device with an ACME config for `pebble` (http-01 on Pebble's validation port).
fn device(pebble: &Pebble, algorithm: &str, tweak: impl FnOnce(&mut Value)) -> Device {
    let config = |dir: &Path| {
        json!({
            "state_dir": dir.join("state"),
            "subject": { "CN": DEVICE },
            "san": { "dns": [DEVICE] },
            "key": { "algorithm": algorithm, "provider": "file", "rotate_on_renew": true },
            "ca": {
                "backend": "acme", "directory": pebble.directory(),
                "contact": ["mailto:fleet@acme.example"], "terms_agreed": true,
                "challenge": "http-01", "http01_listen": format!("127.0.0.1:{}", pebble.http01),
                "poll_wait_s": 20
            },
            "tls": { "trust_bundle": pebble.tls_root(), "timeout_s": 5 },
            "renewal": { "retry_initial_s": 1, "retry_max_s": 4 }
        })
    };
    Device::new("acme-device", config, tweak)
}

/// What the ACME tests check on a device.
trait Checks {
    fn serial(&self) -> String;
    fn assert_chain_verifies(&self, pebble: &Pebble);
}

impl Checks for Device {
    fn serial(&self) -> String {
        let (ok, text) =
            openssl(&["x509", "-noout", "-serial", "-in", self.current().join("cert.pem").to_str().unwrap()]);
        assert!(ok, "{text}");
        text.trim().to_string()
    }

    /// `openssl verify` of current/cert.pem against Pebble's root through current/chain.pem.
    fn assert_chain_verifies(&self, pebble: &Pebble) {
        let root = self.dir().join("pebble-root.pem");
        fs::write(&root, pebble.root_pem()).unwrap();
        let current = self.current();
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            root.to_str().unwrap(),
            "-untrusted",
            current.join("chain.pem").to_str().unwrap(),
            current.join("cert.pem").to_str().unwrap(),
        ]);
        assert!(ok, "openssl verify: {text}");
    }
}

#[test]
fn enrolls_and_renews_through_a_real_http01_validation() {
    let Some(pebble) = Pebble::start(PebbleOptions::default()) else { return };
    let device = device(&pebble, "p256", |_| {});
    device.expect(&["enroll"], 0);
    device.assert_chain_verifies(&pebble);
    let account_key = device.dir().join("state/acme/account.key");
    assert_eq!(mode(&account_key), 0o600, "the account key is private");
    let account = fs::read(&account_key).unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", pebble.http01)).is_err(),
        "the http-01 listener is gone once the order is over"
    );
    let first = device.serial();

    device.expect(&["enroll"], 0);
    assert_eq!(device.serial(), first, "a second enroll changes nothing");

    device.expect(&["renew", "--force"], 0);
    assert_ne!(device.serial(), first, "the renewal is a new certificate");
    device.assert_chain_verifies(&pebble);
    assert_eq!(fs::read(&account_key).unwrap(), account, "the renewal uses the same account key");
    device.expect(&["check"], 0);
    let status = device.run(&["status", "--json"]);
    assert!(status.stdout.contains("http-01"), "status names the credential: {status:?}");
}

#[test]
fn an_rsa2048_device_key_is_certified_under_a_p256_account() {
    let Some(pebble) = Pebble::start(PebbleOptions { always_valid: true, ..Default::default() }) else {
        return;
    };
    let device = device(&pebble, "rsa2048", |_| {});
    device.expect(&["enroll"], 0);
    device.assert_chain_verifies(&pebble);
    let (ok, text) =
        openssl(&["x509", "-noout", "-text", "-in", device.current().join("cert.pem").to_str().unwrap()]);
    assert!(ok && text.contains("rsaEncryption") && text.contains(DEVICE), "{text}");
}

#[test]
fn bad_nonces_are_retried_with_the_nonce_that_came_with_them() {
    // Pebble rejects 30 % of nonces at random: an enroll makes about ten signed requests, so
    // both runs meet several (the agent gives up after ten in a row: 0.3^10 per request).
    let Some(pebble) =
        Pebble::start(PebbleOptions { always_valid: true, nonce_reject: 30, ..Default::default() })
    else {
        return;
    };
    let device = device(&pebble, "p256", |_| {});
    let mut retried = 0;
    for args in [&["-v", "enroll"][..], &["-v", "renew", "--force"][..]] {
        let run = device.expect(args, 0);
        retried += run.stderr.matches("badNonce").count();
    }
    device.assert_chain_verifies(&pebble);
    assert!(retried > 0, "Pebble rejected no nonce in about twenty requests (30 % each)?");
}

#[test]
fn external_account_binding_is_required_checked_and_accepted() {
    const KID: &str = "kid-fleet-1";
    const MAC: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let Some(pebble) =
        Pebble::start(PebbleOptions { always_valid: true, eab: Some((KID, MAC)), ..Default::default() })
    else {
        return;
    };
    let device = device(&pebble, "p256", |_| {});
    let run = device.expect(&["enroll"], 78);
    assert!(run.stderr.contains("ca.eab"), "the error names the field: {run:?}");
    assert!(!device.current().exists());

    let key_file = device.dir().join("eab.key");
    // Another account's MAC key: Pebble refuses the binding.
    write_secret(&key_file, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    device.edit(|c| c["ca"]["eab"] = json!({ "kid": KID, "hmac_key_file": key_file }));
    let run = device.expect(&["enroll"], 77);
    assert!(!device.current().exists(), "{run:?}");

    write_secret(&key_file, MAC);
    let run = device.expect(&["enroll"], 0);
    device.assert_chain_verifies(&pebble);
    for output in [&run.stdout, &run.stderr] {
        assert!(!output.contains(MAC), "the MAC key never reaches the output");
    }
}

/// A device answering dns-01 through `hook`, an executable written with `script`.
fn dns01_device(pebble: &Pebble, hook: &Path, script: &str) -> Device {
    fs::write(hook, script).unwrap();
    fs::set_permissions(hook, fs::Permissions::from_mode(0o755)).unwrap();
    device(pebble, "p256", |c| {
        c["ca"]["challenge"] = "dns-01".into();
        c["ca"]["dns01_hook"] = json!([hook]);
        c["ca"].as_object_mut().unwrap().remove("http01_listen");
    })
}

#[test]
fn dns01_publishes_the_txt_record_through_the_hook_and_removes_it() {
    let Some(pebble) = Pebble::start(PebbleOptions::default()) else { return };
    let scratch = Scratch::new("acme-hook");
    let hook = scratch.0.join("dns-hook");
    let log = scratch.0.join("hook.log");
    // The operator's hook: here it writes into pebble-challtestsrv's DNS, which Pebble asks.
    let device = dns01_device(
        &pebble,
        &hook,
        &format!(
            "#!/bin/sh\nset -e\necho \"$ACME_ACTION $ACME_DOMAIN\" >> {log}\n\
             case $ACME_ACTION in\n\
             present) curl -sf -d \"{{\\\"host\\\":\\\"_acme-challenge.$ACME_DOMAIN.\\\",\\\"value\\\":\\\"$ACME_TXT\\\"}}\" http://127.0.0.1:{port}/set-txt ;;\n\
             cleanup) curl -sf -d \"{{\\\"host\\\":\\\"_acme-challenge.$ACME_DOMAIN.\\\"}}\" http://127.0.0.1:{port}/clear-txt ;;\n\
             esac\n",
            log = log.display(),
            port = pebble.dns_management
        ),
    );
    device.expect(&["enroll"], 0);
    device.assert_chain_verifies(&pebble);
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        format!("present {DEVICE}\ncleanup {DEVICE}\n"),
        "the record is published, then removed"
    );
}

#[test]
fn a_failing_dns01_hook_is_temporary_names_the_step_and_the_next_run_recovers() {
    let Some(pebble) = Pebble::start(PebbleOptions { always_valid: true, ..Default::default() }) else {
        return;
    };
    let scratch = Scratch::new("acme-hook-fails");
    let hook = scratch.0.join("dns-hook");
    let log = scratch.0.join("hook.log");
    // Fails while the flag file exists (a DNS API that is down), then works.
    let down = scratch.0.join("dns-api-down");
    fs::write(&down, "").unwrap();
    let device = dns01_device(
        &pebble,
        &hook,
        &format!(
            "#!/bin/sh
echo \"$ACME_ACTION\" >> {log}
[ -e {down} ] && exit 3
exit 0\n",
            log = log.display(),
            down = down.display()
        ),
    );
    let run = device.expect(&["enroll"], 75);
    assert!(
        run.stderr.contains(&format!(
            "ca.dns01_hook: publishing the TXT record for {DEVICE} failed (exit status: 3)"
        )),
        "{run:?}"
    );
    assert!(!device.current().exists());
    assert!(fs::read_to_string(&log).unwrap().starts_with("present\n"));

    fs::remove_file(&down).unwrap();
    device.expect(&["enroll"], 0);
    device.assert_chain_verifies(&pebble);
}

#[test]
fn a_challenge_listener_that_cannot_bind_is_named_75_when_busy_78_when_not_ours() {
    let Some(pebble) = Pebble::start(PebbleOptions::default()) else { return };
    // Someone else holds the port (a web server on :80, say): temporary.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let device = device(&pebble, "p256", |c| {
        c["ca"]["http01_listen"] = format!("127.0.0.1:{port}").into();
    });
    let run = device.expect(&["enroll"], 75);
    assert!(
        run.stderr
            .contains(&format!("ca.http01_listen: cannot listen on 127.0.0.1:{port} for the challenge")),
        "{run:?}"
    );
    drop(busy);
    // An address this host does not have (TEST-NET-1): a configuration error.
    device.edit(|c| c["ca"]["http01_listen"] = "192.0.2.1:80".into());
    let run = device.expect(&["enroll"], 78);
    assert!(run.stderr.contains("ca.http01_listen: cannot listen on 192.0.2.1:80"), "{run:?}");
    assert!(!device.current().exists());
}

#[test]
fn terms_of_service_must_be_agreed_when_the_directory_names_them() {
    let Some(pebble) = Pebble::start(PebbleOptions { always_valid: true, ..Default::default() }) else {
        return;
    };
    let device = device(&pebble, "p256", |c| c["ca"]["terms_agreed"] = false.into());
    let run = device.expect(&["enroll"], 78);
    assert!(run.stderr.contains("ca.terms_agreed: the CA asks to agree to its terms of service"), "{run:?}");
    assert!(!device.current().exists());
    device.edit(|c| c["ca"]["terms_agreed"] = true.into());
    device.expect(&["enroll"], 0);
}

#[test]
fn tls_alpn01_is_answered_with_the_acme_identifier_certificate_for_names_and_addresses() {
    let Some(pebble) = Pebble::start(PebbleOptions::default()) else { return };
    let device = device(&pebble, "p256", |c| {
        c["ca"]["challenge"] = "tls-alpn-01".into();
        c["ca"]["tls_alpn01_listen"] = format!("127.0.0.1:{}", pebble.tls_alpn01).into();
        c["ca"].as_object_mut().unwrap().remove("http01_listen");
        // An IP identifier is validated under its reverse-DNS name (RFC 8738 §6).
        c["san"]["ip"] = json!(["127.0.0.1"]);
    });
    let run = device.run(&["enroll"]);
    if skipped_without(&run, "acme-tls-alpn") {
        return;
    }
    assert_eq!(run.code, 0, "{run:?}");
    device.assert_chain_verifies(&pebble);
    let (ok, text) = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        device.current().join("cert.pem").to_str().unwrap(),
    ]);
    assert!(ok && text.contains(DEVICE) && text.contains("IP Address:127.0.0.1"), "{text}");
    assert!(
        TcpStream::connect(("127.0.0.1", pebble.tls_alpn01)).is_err(),
        "the tls-alpn-01 listener is gone once the order is over"
    );
    device.expect(&["renew", "--force"], 0);
    device.assert_chain_verifies(&pebble);
}

#[test]
fn a_failed_validation_is_refused_and_leaves_the_identity_untouched() {
    let Some(pebble) = Pebble::start(PebbleOptions::default()) else { return };
    let device = device(&pebble, "p256", |_| {});
    device.expect(&["enroll"], 0);
    let installed = device.cert();
    let target = fs::read_link(device.current()).unwrap();

    // The agent listens where Pebble does not look: the authorization fails.
    device.edit(|c| c["ca"]["http01_listen"] = format!("127.0.0.1:{}", free_port()).into());
    let run = device.expect(&["renew", "--force"], 77);
    assert!(run.stderr.contains("invalid"), "the CA's verdict is shown: {run:?}");
    assert_eq!(device.cert(), installed);
    assert_eq!(fs::read_link(device.current()).unwrap(), target);
    device.expect(&["check"], 0);

    device.edit(|c| c["ca"]["http01_listen"] = format!("127.0.0.1:{}", pebble.http01).into());
    device.expect(&["renew", "--force"], 0);
    assert_ne!(device.cert(), installed);
}

#[test]
fn an_unreachable_ca_is_temporary_and_leaves_the_identity_untouched() {
    let Some(mut pebble) = Pebble::start(PebbleOptions { always_valid: true, ..Default::default() }) else {
        return;
    };
    let device = device(&pebble, "p256", |_| {});
    device.expect(&["enroll"], 0);
    let installed = device.cert();
    pebble.stop();
    device.expect(&["renew", "--force"], 75);
    assert_eq!(device.cert(), installed);
    device.expect(&["check"], 0);
}

#[test]
fn an_order_still_being_validated_is_carried_on_by_the_next_run() {
    // Pebble's validation authority waits a random 0-10 s; the agent waits 1 s, keeps the order
    // as its pending request and exits 75. (A run that happens to finish within the second is
    // a plain enrollment: start over, at most five times.)
    let Some(pebble) =
        Pebble::start(PebbleOptions { always_valid: true, va_sleep_s: Some(10), ..Default::default() })
    else {
        return;
    };
    let device = device(&pebble, "p256", |c| c["ca"]["poll_wait_s"] = 1.into());
    let mut attempts = 0;
    while device.run(&["enroll"]).code == 0 {
        attempts += 1;
        assert!(attempts < 5, "five orders in a row were valid within a second");
        fs::remove_dir_all(device.dir().join("state")).unwrap();
    }
    let state = device.state();
    let order = state["pending"]["request_id"].as_str().expect("the order is the pending request");
    assert!(order.starts_with(&format!("https://127.0.0.1:{}/", pebble.port)), "{order}");
    assert!(!device.current().exists());
    let slot = fs::read_dir(device.dir().join("state/slots")).unwrap().next().unwrap().unwrap().path();
    let pending_key = fs::read(slot.join("key.pem")).unwrap();

    device.edit(|c| c["ca"]["poll_wait_s"] = 15.into());
    let run = device.expect(&["-v", "enroll"], 0);
    assert!(run.stderr.contains("ACME order: POST"), "the run carries the kept order on: {run:?}");
    assert!(!run.stderr.contains("ACME newOrder"), "no second order: {run:?}");
    device.assert_chain_verifies(&pebble);
    assert_eq!(
        fs::read(device.current().join("key.pem")).unwrap(),
        pending_key,
        "the pending key is certified"
    );
    assert!(device.state()["pending"].is_null(), "{}", device.state());
}

#[test]
fn a_softhsm2_key_is_certified_through_its_csr() {
    let Some(pebble) = Pebble::start(PebbleOptions { always_valid: true, ..Default::default() }) else {
        return;
    };
    let mut device = device(&pebble, "p256", |_| {});
    let Some(_token) = device.use_softhsm("acme-test") else { return };
    let run = device.run(&["enroll"]);
    if skipped_without(&run, "pkcs11") {
        return;
    }
    assert_eq!(run.code, 0, "{run:?}");
    device.assert_chain_verifies(&pebble);
    assert!(device.current().join("key.uri").exists(), "the key stays in the token");
    device.expect(&["renew", "--force"], 0);
    device.assert_chain_verifies(&pebble);
}
