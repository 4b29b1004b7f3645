//! Harness for the end-to-end suites: an emulator, a scratch directory with a config for the
//! real `enroll-agent` binary, and helpers to run it and look at what it installed.
#![allow(dead_code)]

pub mod hw;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use enroll_tests::{Emulator, Options};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ca {
    Enos,
    Ezca,
    Sectigo,
    Securosys,
    /// EST (RFC 7030) on the emulator, label `meters`, factory-certificate bootstrap by default
    /// ([`Env::use_est_basic`] switches to HTTP Basic). The emulator asks for TLS client certificates.
    Est,
    /// ACME (RFC 8555) on the emulator: JWS-verified, challenges valid once answered, ARI offered.
    Acme,
    /// SCEP (RFC 8894) on the emulator's `/scep`: its own RSA CA pinned by `ca_fingerprint`,
    /// PKCSReq with the challenge password (`scep-challenge`), RenewalReq, CertPoll. RSA keys only.
    Scep,
}

impl Ca {
    /// The `ca.backend` value.
    pub fn name(self) -> &'static str {
        match self {
            Ca::Enos => "enos",
            Ca::Ezca => "ezca",
            Ca::Sectigo => "sectigo",
            Ca::Securosys => "securosys",
            Ca::Est => "est",
            Ca::Acme => "acme",
            Ca::Scep => "scep",
        }
    }
}

/// The agent binary built by `cargo build --workspace --bins` (scripts/test.sh does that).
pub fn agent_binary() -> PathBuf {
    if let Ok(path) = std::env::var("ENROLL_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let debug_dir = exe.parent().and_then(Path::parent).expect("target/debug");
    let bin = debug_dir.join("enroll-agent");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("enroll-e2e-{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(output: std::process::Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

pub struct Env {
    /// Extra environment for the agent (SOFTHSM2_CONF for a private token, crash points).
    pub env_vars: Mutex<Vec<(String, String)>>,
    pub ca: Ca,
    pub emu: Emulator,
    pub scratch: Scratch,
    pub config: PathBuf,
    /// Every output the agent printed, to search for secrets.
    pub outputs: Mutex<Vec<String>>,
}

/// Issue 11 item 6: when a test ends, no agent output holds a configured secret or a line of a
/// private key the agent made, and no file the test leaves holds a configured secret (except
/// the secret files themselves, which hold nothing else). A test that already failed is not
/// checked again.
impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        self.assert_no_secret_in_outputs();
        let mut key_lines = Vec::new();
        for file in files_under(&self.state_dir()).iter().filter(|f| f.ends_with("key.pem")) {
            let text = fs::read_to_string(file).unwrap_or_default();
            key_lines.extend(
                text.lines().filter(|l| l.len() >= 40 && !l.starts_with("-----")).map(str::to_string),
            );
        }
        for output in self.outputs.lock().unwrap().iter() {
            if let Some(line) = key_lines.iter().find(|l| output.contains(l.as_str())) {
                panic!("private key material ({line}) leaked into agent output:\n{output}");
            }
        }
        let secrets = self.secrets();
        for file in files_under(self.dir()) {
            let text = String::from_utf8_lossy(&fs::read(&file).unwrap_or_default()).into_owned();
            if secrets.iter().any(|s| text.trim() == s) {
                continue;
            }
            if let Some(secret) = secrets.iter().find(|s| text.contains(s.as_str())) {
                panic!("a configured secret ({} characters) is in {}", secret.len(), file.display());
            }
        }
    }
}

/// Every regular file below `dir` (symlinks not followed).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(next) = todo.pop() {
        let Ok(entries) = fs::read_dir(&next) else { continue };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => todo.push(entry.path()),
                Ok(kind) if kind.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    files
}

/// What `current` looks like on disk, to prove a failure changed nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub target: PathBuf,
    pub files: Vec<(String, Vec<u8>)>,
}

/// A device for the suites against real servers (Pebble, micromdm scepserver): a scratch
/// directory with a config for the real agent, and the environment its runs get.
pub struct Device {
    pub scratch: Scratch,
    pub config: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Device {
    /// `config` makes the config from the scratch directory; `tweak` then adjusts it.
    pub fn new(name: &str, config: impl FnOnce(&Path) -> Value, tweak: impl FnOnce(&mut Value)) -> Device {
        let scratch = Scratch::new(name);
        let mut value = config(&scratch.0);
        tweak(&mut value);
        let path = scratch.0.join("config.json");
        fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
        Device { scratch, config: path, env: Vec::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.scratch.0
    }

    pub fn current(&self) -> PathBuf {
        self.dir().join("state/current")
    }

    pub fn edit(&self, edit: impl FnOnce(&mut Value)) {
        let mut config: Value = serde_json::from_slice(&fs::read(&self.config).unwrap()).unwrap();
        edit(&mut config);
        fs::write(&self.config, config.to_string()).unwrap();
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Command::new(agent_binary())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env_remove("ENROLL_AGENT_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap()
            .into()
    }

    pub fn expect(&self, args: &[&str], code: i32) -> Run {
        let run = self.run(args);
        assert_eq!(run.code, code, "enroll-agent {args:?}: {run:?}");
        run
    }

    pub fn cert(&self) -> Vec<u8> {
        fs::read(self.current().join("cert.pem")).unwrap()
    }

    pub fn state(&self) -> Value {
        serde_json::from_slice(&fs::read(self.dir().join("state/state.json")).unwrap()).unwrap()
    }

    /// Puts the device's key into a SoftHSM2 token of its own (`None`: SoftHSM2 cannot run
    /// here, see [`hw::require`]). Keep the token while the device runs.
    pub fn use_softhsm(&mut self, label: &str) -> Option<hw::Token> {
        let token = hw::require(hw::Token::softhsm(self.dir(), label), "SoftHSM2")?;
        let pin = self.dir().join("token.pin");
        write_secret(&pin, hw::USER_PIN);
        self.edit(|c| {
            c["key"]["provider"] = "pkcs11".into();
            c["key"]["pkcs11"] =
                json!({ "module": token.module, "token_label": token.label, "pin_file": pin, "key_label": "device" });
        });
        self.env.extend(token.env.iter().cloned());
        Some(token)
    }
}

/// Whether `run` was refused because this agent build lacks cargo feature `feature` (plain
/// `cargo test` builds the default agent; scripts/test.sh builds --all-features); prints the
/// skip line when so.
pub fn skipped_without(run: &Run, feature: &str) -> bool {
    if run.code == 78 && run.stderr.contains(&format!("(cargo feature {feature})")) {
        eprintln!("SKIPPED: this enroll-agent was built without {feature}");
        return true;
    }
    false
}

pub fn write_secret(path: &Path, text: &str) {
    fs::write(path, format!("{text}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

impl Env {
    pub fn new(ca: Ca, algorithm: &str) -> Env {
        Env::with_config(ca, algorithm, |_| {})
    }

    /// An emulator plus a config; `tweak` edits the config JSON before it is written.
    pub fn with_config(ca: Ca, algorithm: &str, tweak: impl FnOnce(&mut Value)) -> Env {
        Env::with_options(ca, algorithm, Options::default(), tweak)
    }

    pub fn with_options(
        ca: Ca,
        algorithm: &str,
        mut options: Options,
        tweak: impl FnOnce(&mut Value),
    ) -> Env {
        if ca == Ca::Est {
            // Factory and device certificates are TLS client certificates (design.md §8).
            options.request_client_cert = true;
        }
        let emu = Emulator::start(options).expect("start emulator");
        let scratch = Scratch::new(ca.name());
        let dir = &scratch.0;
        fs::write(dir.join("tls-root.pem"), emu.tls_root_pem()).unwrap();
        let http01_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ca_block = match ca {
            Ca::Enos => {
                write_secret(&dir.join("app-secret"), &emu.enos.app_secret);
                json!({
                    "backend": "enos",
                    "api_gateway": emu.url(),
                    "org_id": emu.enos.org_id,
                    "asset_id": emu.enos.asset_id,
                    "app_key": emu.enos.app_key,
                    "app_secret_file": dir.join("app-secret"),
                    "valid_days": 30
                })
            }
            Ca::Ezca => {
                write_secret(&dir.join("bootstrap.token"), &emu.ezca.bootstrap_token);
                json!({
                    "backend": "ezca",
                    "url": emu.url(),
                    "ca_id": emu.ezca.ca_id,
                    "template_id": emu.ezca.template_id,
                    "valid_days": 30,
                    "bootstrap": { "token_file": dir.join("bootstrap.token") }
                })
            }
            Ca::Sectigo => {
                write_secret(&dir.join("sectigo-password"), &emu.sectigo.password);
                json!({
                    "backend": "sectigo",
                    "url": emu.url(),
                    "customer_uri": emu.sectigo.customer_uri,
                    "login": emu.sectigo.login,
                    "password_file": dir.join("sectigo-password"),
                    "org_id": emu.sectigo.org_id,
                    "cert_type": emu.sectigo.cert_type,
                    "term": emu.sectigo.terms[0],
                    "external_requester": "fleet@acme.example",
                    "comments": "enroll-agent e2e",
                    "poll_interval_s": 1,
                    "poll_wait_s": 10
                })
            }
            Ca::Securosys => {
                write_secret(&dir.join("securosys-jwt"), &emu.securosys.jwt);
                write_secret(&dir.join("securosys-api-key"), &emu.securosys.api_key);
                let password =
                    emu.securosys.key_password.clone().expect("the emulator's CA key has a password");
                write_secret(&dir.join("securosys-key-password"), &password);
                fs::write(dir.join("securosys-ca-bundle.pem"), emu.securosys_ca_bundle_pem()).unwrap();
                json!({
                    "backend": "securosys",
                    "url": emu.url(),
                    "sign_key_name": emu.securosys.sign_key_name,
                    "key_password_file": dir.join("securosys-key-password"),
                    "jwt_file": dir.join("securosys-jwt"),
                    "api_key_file": dir.join("securosys-api-key"),
                    "ca_bundle": dir.join("securosys-ca-bundle.pem"),
                    "valid_days": 30,
                    "approval": false,
                    "poll_interval_s": 1,
                    "poll_wait_s": 10
                })
            }
            Ca::Est => {
                write_secret(&dir.join("est-factory.pem"), emu.factory_cert_pem().trim_end());
                write_secret(&dir.join("est-factory.key"), emu.factory_key_pem().trim_end());
                json!({
                    "backend": "est",
                    "url": emu.url(),
                    "label": emu.est.label,
                    "bootstrap": {
                        "cert_file": dir.join("est-factory.pem"),
                        "key_file": dir.join("est-factory.key")
                    },
                    "poll_wait_s": 10,
                    "poll_timeout_s": 60
                })
            }
            Ca::Acme => json!({
                "backend": "acme",
                "directory": format!("{}/acme/directory", emu.url()),
                "contact": ["mailto:fleet@acme.example"],
                "terms_agreed": true,
                "http01_listen": format!("127.0.0.1:{http01_port}"),
                "poll_interval_s": 1,
                "poll_wait_s": 5,
                "poll_timeout_s": 60
            }),
            Ca::Scep => {
                write_secret(&dir.join("scep-challenge"), &emu.scep.challenge);
                json!({
                    "backend": "scep",
                    "url": format!("{}/scep", emu.url()),
                    "ca_fingerprint": format!("sha256:{}", emu.scep_ca_fingerprint()),
                    "challenge_password_file": dir.join("scep-challenge"),
                    "poll_interval_s": 1,
                    "poll_wait_s": 5,
                    "poll_timeout_s": 60
                })
            }
        };
        let mut config = json!({
            "state_dir": dir.join("state"),
            "subject": { "CN": "sensor-0042", "O": "Acme", "C": "NL" },
            "san": { "dns": ["sensor-0042.devices.acme.example"], "ip": ["10.0.0.42"] },
            "key": { "algorithm": algorithm, "provider": "file", "rotate_on_renew": true },
            "ca": ca_block,
            "tls": { "trust_bundle": dir.join("tls-root.pem"), "timeout_s": 2 },
            "renewal": { "retry_initial_s": 1, "retry_max_s": 4 }
        });
        tweak(&mut config);
        let path = dir.join("config.json");
        fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        Env {
            env_vars: Mutex::new(Vec::new()),
            ca,
            emu,
            scratch,
            config: path,
            outputs: Mutex::new(Vec::new()),
        }
    }

    /// Rewrites the config file (for edits that need the emulator's identifiers).
    pub fn edit_config(&self, edit: impl FnOnce(&mut Value)) {
        let mut config: Value = serde_json::from_slice(&fs::read(&self.config).unwrap()).unwrap();
        edit(&mut config);
        fs::write(&self.config, config.to_string()).unwrap();
    }

    pub fn dir(&self) -> &Path {
        &self.scratch.0
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    pub fn current(&self) -> PathBuf {
        self.state_dir().join("current")
    }

    /// Runs `enroll-agent -c CONFIG args…`.
    pub fn agent(&self, args: &[&str]) -> Run {
        let output = Command::new(agent_binary())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env_remove("ENROLL_AGENT_CONFIG")
            .envs(self.env_vars.lock().unwrap().iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run enroll-agent");
        let run = Run::from(output);
        let mut outputs = self.outputs.lock().unwrap();
        outputs.push(run.stdout.clone());
        outputs.push(run.stderr.clone());
        run
    }

    /// Starts `enroll-agent -c CONFIG args…` without waiting (stdout and stderr piped), with
    /// this environment's variables and `extra`.
    pub fn spawn(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Child {
        Command::new(agent_binary())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env_remove("ENROLL_AGENT_CONFIG")
            .envs(self.env_vars.lock().unwrap().iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start enroll-agent")
    }

    /// Waits (20 s at most) until state.json records the CA's request id; answers it.
    pub fn wait_for_request_id(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let state = fs::read(self.state_dir().join("state.json")).ok();
            let id = state
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|s| s["pending"]["request_id"].as_str().map(str::to_string));
            if let Some(id) = id {
                return id;
            }
            assert!(std::time::Instant::now() < deadline, "the agent never recorded a request id");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The key file of the only slot (the pending one before any install).
    pub fn only_slot_key(&self) -> Vec<u8> {
        let slots: Vec<_> =
            fs::read_dir(self.state_dir().join("slots")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(slots.len(), 1, "exactly one slot: {slots:?}");
        fs::read(slots[0].join("key.pem")).unwrap()
    }

    /// Runs the agent and insists on exit code `code`.
    pub fn expect(&self, args: &[&str], code: i32) -> Run {
        let run = self.agent(args);
        assert_eq!(run.code, code, "enroll-agent {args:?}: {run:?}");
        run
    }

    pub fn identity(&self) -> Identity {
        let target = fs::read_link(self.current()).expect("current symlink");
        let mut files = Vec::new();
        for name in ["cert.pem", "chain.pem", "ca.pem", "key.pem", "key.uri"] {
            if let Ok(bytes) = fs::read(self.current().join(name)) {
                files.push((name.to_string(), bytes));
            }
        }
        Identity { target, files }
    }

    pub fn status_json(&self) -> Value {
        let run = self.expect(&["status", "--json"], 0);
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {run:?}"))
    }

    /// The root the issued chain must verify against.
    pub fn ca_root_pem(&self) -> String {
        match self.ca {
            Ca::Enos => self.emu.enos_root_pem(),
            Ca::Ezca => self.emu.ezca_root_pem(),
            Ca::Sectigo => self.emu.sectigo_root_pem(),
            Ca::Securosys => self.emu.securosys_root_pem(),
            Ca::Est | Ca::Acme => self.emu.est_root_pem(),
            Ca::Scep => self.emu.scep_ca_pem(),
        }
    }

    /// `openssl verify` (not our parser) checks current/cert.pem against the CA root, with
    /// current/chain.pem as the untrusted intermediates.
    pub fn assert_chain_verifies(&self) {
        let root = self.dir().join("ca-root.pem");
        fs::write(&root, self.ca_root_pem()).unwrap();
        let current = self.current();
        let (chain, cert) = (current.join("chain.pem"), current.join("cert.pem"));
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            root.to_str().unwrap(),
            "-untrusted",
            chain.to_str().unwrap(),
            cert.to_str().unwrap(),
        ]);
        assert!(ok, "openssl verify: {text}");
    }

    /// Switches the key to the Redtrust remote provider of this emulator (RSA-2048, no SANs).
    pub fn use_redtrust(&self) {
        write_secret(&self.dir().join("redtrust-hmac"), &self.emu.redtrust.hmac_secret);
        let redtrust = json!({
            "url": self.emu.url(),
            "partner": self.emu.redtrust.partner,
            "hmac_secret_file": self.dir().join("redtrust-hmac"),
            "domain": self.emu.redtrust.domain,
            "redirect_url": self.emu.redtrust.redirect_url,
            "ca_provider": self.emu.redtrust.ca_provider
        });
        self.edit_config(|c| {
            c["key"] = json!({ "algorithm": "rsa2048", "provider": "redtrust", "redtrust": redtrust });
            // The emulator generates an RSA key inside csr/create; on a busy 2-core machine that
            // can take longer than the 2 s the other tests allow.
            c["tls"]["timeout_s"] = 15.into();
            c.as_object_mut().unwrap().remove("san");
        });
    }

    /// EST: bootstrap with HTTP Basic (`{username, password_file}`, the password file 0600)
    /// instead of the factory certificate.
    pub fn use_est_basic(&self) {
        assert_eq!(self.ca, Ca::Est, "use_est_basic is for Ca::Est");
        let password = self.dir().join("est-password");
        write_secret(&password, &self.emu.est.password);
        self.edit_config(|c| {
            c["ca"]["bootstrap"] = json!({ "username": self.emu.est.username, "password_file": password });
        });
    }

    /// EST: bootstrap with another factory certificate and key (PEM, e.g. from
    /// `emu.issue_factory_identity`), written 0600.
    pub fn use_est_factory(&self, cert_pem: &str, key_pem: &str) {
        assert_eq!(self.ca, Ca::Est, "use_est_factory is for Ca::Est");
        write_secret(&self.dir().join("est-factory.pem"), cert_pem.trim_end());
        write_secret(&self.dir().join("est-factory.key"), key_pem.trim_end());
    }

    /// The state.json the agent wrote.
    pub fn state_json(&self) -> Value {
        serde_json::from_slice(&fs::read(self.state_dir().join("state.json")).unwrap()).unwrap()
    }

    /// Requests that issued or renewed a certificate (the emulator's log).
    pub fn issuing_calls(&self) -> Vec<String> {
        self.emu
            .log()
            .into_iter()
            .filter(|r| {
                r.path.starts_with("/connect-service/")
                    || r.path.starts_with("/api/CA/Request")
                    || r.path.starts_with("/api/Certificates/Renew")
                    || r.path == "/api/ssl/v1/enroll"
                    || r.path.starts_with("/api/ssl/v1/renewById/")
                    || r.path.starts_with("/v1/certificate/")
                    || r.path.ends_with("/simpleenroll")
                    || r.path.ends_with("/simplereenroll")
                    || r.path.starts_with("/acme/new-order")
                    || r.path.starts_with("/acme/finalize/")
                    || (r.path == "/scep"
                        && r.query.iter().any(|(k, v)| k == "operation" && v == "PKIOperation"))
            })
            .map(|r| {
                // EnOS `action=`, SCEP `operation=` (never the GET form's `message=`).
                let action = r
                    .query
                    .iter()
                    .find(|(k, _)| k == "action" || k == "operation")
                    .map(|(k, v)| format!("?{k}={v}"))
                    .unwrap_or_default();
                format!("{} {}{} -> {}", r.method, r.path, action, r.status)
            })
            .collect()
    }

    /// Secrets that must never appear in any output or world-readable file.
    pub fn secrets(&self) -> Vec<String> {
        vec![
            self.emu.enos.app_secret.clone(),
            self.emu.ezca.bootstrap_token.clone(),
            self.emu.ezca.client_secret.clone(),
            self.emu.sectigo.password.clone(),
            self.emu.securosys.jwt.clone(),
            self.emu.securosys.api_key.clone(),
            self.emu.securosys.key_password.clone().unwrap_or_default(),
            self.emu.redtrust.hmac_secret.clone(),
            self.emu.est.password.clone(),
            self.emu.scep.challenge.clone(),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }

    pub fn assert_no_secret_in_outputs(&self) {
        let outputs = self.outputs.lock().unwrap();
        for secret in self.secrets() {
            for output in outputs.iter() {
                assert!(!output.contains(&secret), "a secret leaked into agent output:\n{output}");
            }
        }
    }
}

/// `openssl` run with arguments; returns (success, combined output).
pub fn openssl(args: &[&str]) -> (bool, String) {
    let output = Command::new("openssl").args(args).output().expect("openssl is installed");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

pub fn serial_of(env: &Env) -> String {
    env.status_json()["serial"].as_str().unwrap().to_string()
}
