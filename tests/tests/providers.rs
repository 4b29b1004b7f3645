//! One contract suite for every key provider (issue 4): the same tests run for software keys,
//! a SoftHSM2 token (PKCS#11) and an swtpm TPM 2.0. Each runs the real binary against the
//! emulators: enroll and renew through EnOS and EZCA (whose renewal token the device key signs),
//! rotation A/B with a crash at every step, and, in process, a CSR that `openssl req -verify`
//! accepts and TLS client authentication signed in place.

mod common;

use std::fs;

use common::hw::{require, Swtpm, Token, USER_PIN};
use common::{agent_binary, openssl, write_secret, Ca, Env};
use enroll_tests::Options;
use serde_json::json;

/// A provider set up for one test: the store it needs stays alive as long as this does.
struct Setup {
    env: Env,
    token: Option<Token>,
    _swtpm: Option<Swtpm>,
    hardware: bool,
}

/// Whether the agent binary under test was built with `provider` (its `--version` lists them).
fn compiled_in(provider: &str) -> Result<(), String> {
    let out =
        std::process::Command::new(agent_binary()).arg("--version").output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    match text.lines().any(|l| l.starts_with("key providers:") && l.split_whitespace().any(|w| w == provider))
    {
        true => Ok(()),
        false => Err(format!(
            "the agent binary was built without it ({}); scripts/test.sh builds --all-features",
            text.trim()
        )),
    }
}

fn setup(provider: &str, ca: Ca, algorithm: &str, options: Options) -> Option<Setup> {
    let compiled_name = if provider == "tpm2-pkcs11" { "pkcs11" } else { provider };
    if provider != "file" {
        require(compiled_in(compiled_name), provider)?;
    }
    let env = Env::with_options(ca, algorithm, options, |_| {});
    let dir = env.dir().to_path_buf();
    match provider {
        "file" => Some(Setup { env, token: None, _swtpm: None, hardware: false }),
        "pkcs11" | "tpm2-pkcs11" => {
            let token = match provider {
                "pkcs11" => require(Token::softhsm(&dir, "enroll-test"), "SoftHSM2")?,
                _ => require(Token::tpm2_pkcs11(&dir), "tpm2-pkcs11 on swtpm")?,
            };
            write_secret(&dir.join("token.pin"), USER_PIN);
            env.edit_config(|c| {
                c["key"]["provider"] = "pkcs11".into();
                c["key"]["pkcs11"] = json!({
                    "module": token.module, "token_label": token.label,
                    "pin_file": dir.join("token.pin"), "key_label": "device"
                });
            });
            env.env_vars.lock().unwrap().extend(token.env.iter().cloned());
            Some(Setup { env, token: Some(token), _swtpm: None, hardware: true })
        }
        "tpm" => {
            let tpm = require(Swtpm::start(&dir), "swtpm")?;
            env.edit_config(|c| {
                c["key"]["provider"] = "tpm".into();
                c["key"]["tpm"] = json!({ "tcti": tpm.tcti });
            });
            Some(Setup { env, token: None, _swtpm: Some(tpm), hardware: true })
        }
        other => panic!("unknown provider {other}"),
    }
}

fn spki_of(cert: &std::path::Path) -> String {
    openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-pubkey"]).1
}

fn live_slots(env: &Env) -> usize {
    fs::read_dir(env.state_dir().join("slots")).unwrap().count()
}

/// Keys the store holds for this agent: token objects for PKCS#11, slot files otherwise.
fn keys_held(setup: &Setup) -> usize {
    match &setup.token {
        Some(token) => token.private_keys().len(),
        None => live_slots(&setup.env),
    }
}

fn contract_enroll_renew(provider: &str, ca: Ca, algorithm: &str) {
    let Some(s) = setup(provider, ca, algorithm, Options::default()) else { return };
    let env = &s.env;
    env.expect(&["enroll"], 0);
    let current = env.current();
    env.assert_chain_verifies();
    let status = env.status_json();
    let configured = if provider == "tpm2-pkcs11" { "pkcs11" } else { provider };
    assert_eq!(status["key"]["provider"], configured);
    if s.hardware {
        assert!(!current.join("key.pem").exists(), "a hardware key leaves no key file");
        let uri = status["key"]["uri"].as_str().unwrap_or_default().to_string();
        assert!(uri.starts_with(&format!("{configured}:")), "key.uri {uri:?}");
    }
    env.expect(&["check"], 0);

    let first_key = spki_of(&current.join("cert.pem"));
    env.expect(&["renew", "--force"], 0);
    assert_ne!(spki_of(&env.current().join("cert.pem")), first_key, "rotate_on_renew made a new key");
    // A second renewal prunes the oldest slot; its key must go with it.
    env.expect(&["renew", "--force"], 0);
    assert_eq!(live_slots(env), 2, "current and previous");
    assert_eq!(keys_held(&s), 2, "exactly the keys of current and previous remain");
    let last = env.issuing_calls().pop().unwrap();
    if ca == Ca::Ezca {
        assert!(last.contains("RenewCertificateV3") && last.ends_with("-> 200"), "{last}");
    }
    if ca == Ca::Est {
        // design.md §5 rule 3: the TLS handshake was signed in place by the provider's key.
        assert!(last.contains("simplereenroll") && last.ends_with("-> 200"), "{last}");
        assert_eq!(env.emu.est_last_auth(), Some(enroll_tests::EstAuth::DeviceCert));
    }
    env.assert_no_secret_in_outputs();
}

/// design.md §4 and issue 4 item 3: a crash at any step leaves one usable identity, and the
/// next run finishes the job and removes any orphan key.
fn contract_rotation_crash_points(provider: &str) {
    let Some(s) = setup(provider, Ca::Enos, "p256", Options::default()) else { return };
    let env = &s.env;
    env.expect(&["enroll"], 0);
    env.expect(&["renew", "--force"], 0);
    for point in ["after-key", "after-write", "before-old-key-deleted", "after-install"] {
        eprintln!("crash point {point}");
        let before = spki_of(&env.current().join("cert.pem"));
        env.env_vars.lock().unwrap().push(("ENROLL_AGENT_CRASH_AT".into(), point.into()));
        let crashed = env.agent(&["renew", "--force"]);
        env.env_vars.lock().unwrap().retain(|(k, _)| k != "ENROLL_AGENT_CRASH_AT");
        assert_ne!(crashed.code, 0, "{point}: the agent was meant to abort: {crashed:?}");
        // `check` loads current's key and compares it with cert.pem.
        env.expect(&["check"], 0);
        let after_crash = spki_of(&env.current().join("cert.pem"));
        assert!(
            after_crash == before || matches!(point, "before-old-key-deleted" | "after-install"),
            "{point}: current changed before the install"
        );
        assert!(keys_held(&s) <= 3, "{point}: at most one orphan key");
        env.expect(&["renew", "--force"], 0);
        assert_eq!(keys_held(&s), 2, "{point}: the next run removed the orphan");
        assert_eq!(live_slots(env), 2, "{point}");
    }
}

/// In process: the configured provider makes a key, openssl verifies our CSR, and the
/// emulator's TLS server sees a client certificate signed by the hardware key. The in-process
/// part runs in a child process of this test binary ([`in_process_csr_and_mtls`]): a PKCS#11
/// module is initialised once per process and reads its environment (SOFTHSM2_CONF, the
/// tpm2-pkcs11 store) then, so tests sharing one process under `cargo test` would see each
/// other's tokens.
fn contract_csr_and_mtls(provider: &str, algorithm: &str) {
    let in_process = match (provider, cfg!(feature = "hardware")) {
        ("file", _) | (_, true) => Ok(()),
        _ => Err(
            "the test crate was built without its `hardware` feature (scripts/test.sh uses --all-features)"
                .into(),
        ),
    };
    if require(in_process, provider).is_none() {
        return;
    }
    let options = Options { request_client_cert: true, ..Options::default() };
    let Some(s) = setup(provider, Ca::Enos, algorithm, options) else { return };
    let env = &s.env;
    env.expect(&["enroll"], 0);
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "in_process_csr_and_mtls", "--ignored", "--nocapture", "--test-threads=1"])
        .envs(env.env_vars.lock().unwrap().iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(CHILD_CONFIG, &env.config)
        .env(CHILD_URL, env.emu.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(child.status.success(), "{provider}/{algorithm}: {stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{provider}/{algorithm}: the child ran no test: {stdout}");
    assert!(env.emu.log().last().unwrap().client_cert, "{provider}/{algorithm}: no client certificate seen");
}

/// Where [`contract_csr_and_mtls`] tells its child process the agent config and the emulator.
const CHILD_CONFIG: &str = "ENROLL_TEST_CHILD_CONFIG";
const CHILD_URL: &str = "ENROLL_TEST_CHILD_URL";

/// The in-process half of [`contract_csr_and_mtls`], run only as its child (hence `#[ignore]`).
#[test]
#[ignore = "run by contract_csr_and_mtls in a child process"]
fn in_process_csr_and_mtls() {
    let config =
        std::path::PathBuf::from(std::env::var_os(CHILD_CONFIG).expect("run by contract_csr_and_mtls"));
    let dir = config.parent().unwrap();
    let settings = enroll_agent::config::Settings::load(&config).unwrap();
    let keys = enroll_agent::lifecycle::open_provider(&settings).unwrap();

    let slot = dir.join("csr-slot-9");
    fs::create_dir(&slot).unwrap();
    let key = keys.generate(settings.key.algorithm, &slot).unwrap();
    let csr = enroll_agent::csr::build(key.as_ref(), &settings.subject, &settings.san).unwrap();
    fs::write(slot.join("req.pem"), &csr.pem).unwrap();
    let (ok, text) = openssl(&["req", "-in", slot.join("req.pem").to_str().unwrap(), "-verify", "-noout"]);
    assert!(ok && text.contains("verify OK"), "{text}");
    keys.delete(&slot).unwrap();

    let current = fs::canonicalize(settings.state_dir.join("current")).unwrap();
    let key = keys.load(&current).unwrap();
    let chain =
        enroll_agent::pki::parse_pem_certs(&fs::read_to_string(current.join("chain.pem")).unwrap()).unwrap();
    let identity =
        enroll_agent::tls::ClientIdentity { chain: chain.into_iter().map(|c| c.der).collect(), key };
    let roots = std::sync::Arc::new(enroll_agent::tls::load_roots(Some(&dir.join("tls-root.pem"))).unwrap());
    let clock = std::sync::Arc::new(enroll_agent::time::Clock::default());
    let transport = enroll_agent::tls::Transport {
        roots,
        clock_window_s: None,
        timeout_s: 10,
        clock,
        tokens: Default::default(),
    };
    let http = enroll_agent::http::Http::new(transport).unwrap().with_identity(identity).unwrap();
    let url = std::env::var(CHILD_URL).unwrap();
    let response = http.send("probe", "GET", &format!("{url}/_emulator/log"), &[], None).unwrap();
    assert_eq!(response.status, 200);
}

fn contract_wrong_pin_fails_once_and_is_not_retried() {
    let Some(s) = setup("pkcs11", Ca::Enos, "p256", Options::default()) else { return };
    let env = &s.env;
    write_secret(&env.dir().join("token.pin"), "000000");
    let run = env.expect(&["enroll"], 78);
    assert!(run.stderr.contains("refused the PIN") && run.stderr.contains("not retrying"), "{run:?}");
    assert_eq!(run.stderr.matches("refused the PIN").count(), 1, "one login attempt: {run:?}");
    assert!(!run.stderr.contains("000000"), "the PIN never reaches a message");
}

macro_rules! provider_contract {
    ($name:ident, $provider:literal) => {
        mod $name {
            use super::*;

            #[test]
            fn enroll_and_renew_through_enos_p256() {
                contract_enroll_renew($provider, Ca::Enos, "p256");
            }

            #[test]
            fn enroll_and_renew_through_enos_rsa2048() {
                contract_enroll_renew($provider, Ca::Enos, "rsa2048");
            }

            #[test]
            fn ezca_renewal_token_is_signed_by_the_device_key() {
                contract_enroll_renew($provider, Ca::Ezca, "rsa2048");
            }

            #[test]
            fn est_renewal_is_tls_client_auth_with_the_device_key() {
                contract_enroll_renew($provider, Ca::Est, "p256");
            }

            #[test]
            fn rotation_survives_a_crash_at_every_step() {
                contract_rotation_crash_points($provider);
            }

            #[test]
            fn csr_and_tls_client_auth_p256() {
                contract_csr_and_mtls($provider, "p256");
            }

            #[test]
            fn csr_and_tls_client_auth_rsa2048() {
                contract_csr_and_mtls($provider, "rsa2048");
            }
        }
    };
}

provider_contract!(file, "file");
provider_contract!(softhsm_pkcs11, "pkcs11");
provider_contract!(tpm2_pkcs11_on_swtpm, "tpm2-pkcs11");
provider_contract!(swtpm_tpm, "tpm");

#[test]
fn pkcs11_a_wrong_pin_fails_once_and_is_never_retried() {
    contract_wrong_pin_fails_once_and_is_not_retried();
}
