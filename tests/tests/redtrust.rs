//! The Redtrust remote key provider (design.md §7 "Redtrust"): Redtrust makes the key and CSR,
//! the configured CA issues it, `csr/finalize` hands the certificate back; the device holds only
//! the certificate and `key.uri`.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_binary, openssl, Ca, Env};
use enroll_tests::Fault;
use serde_json::Value;

fn redtrust_with(ca: Ca) -> Env {
    let env = Env::new(ca, "rsa2048");
    env.use_redtrust();
    env
}

fn calls(env: &Env, method: &str, path: &str) -> usize {
    env.emu.log().iter().filter(|r| r.method == method && r.path == path).count()
}

#[test]
fn enrolls_and_renews_with_a_key_that_never_reaches_the_device() {
    let env = redtrust_with(Ca::Enos);
    env.expect(&["enroll"], 0);
    let current = env.current();
    assert!(!current.join("key.pem").exists(), "no private key on the device");
    let cert = current.join("cert.pem");
    let (_, fingerprint) =
        openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-fingerprint", "-sha1"]);
    let thumbprint = fingerprint.trim().rsplit('=').next().unwrap().replace(':', "");
    let uri = fs::read_to_string(current.join("key.uri")).unwrap();
    assert_eq!(uri.trim(), format!("redtrust:{thumbprint}"));
    assert_eq!((env.emu.redtrust_keys(), env.emu.redtrust_finalized()), (1, 1));
    assert_eq!(env.emu.redtrust_sessions_open(), 0, "every run logs out");

    let login = env.emu.log().into_iter().find(|r| r.path == "/authclient/auth/loginrequest").unwrap();
    let query = |k: &str| login.query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(query("Consumer").as_deref(), Some("RA_API"));
    assert_eq!(query("partner").as_deref(), Some(env.emu.redtrust.partner.as_str()));
    assert_eq!(calls(&env, "POST", "/authapi/v1/login_by_temp_token"), 1);

    let status = env.status_json();
    assert_eq!(status["key"]["provider"], "redtrust");
    assert_eq!(status["key"]["uri"], uri.trim());
    assert_eq!(status["key"]["remote"], true);
    assert_eq!(status["paths"]["key"], Value::Null);
    let text = env.expect(&["status"], 0).stdout;
    assert!(text.contains("held remotely by redtrust"), "{text}");

    env.expect(&["renew", "--force"], 0);
    assert_eq!(calls(&env, "POST", "/raapi/v2/csr/create"), 1, "renewal uses v2 create");
    assert_eq!(env.emu.redtrust_keys(), 2, "Redtrust made a new key for the renewal");
    assert_ne!(fs::read_to_string(env.current().join("key.uri")).unwrap(), uri);
    assert_eq!(env.emu.redtrust_sessions_open(), 0);
    env.assert_no_secret_in_outputs();
}

#[test]
fn a_failed_finalize_is_retried_without_a_second_key_or_certificate() {
    let env = redtrust_with(Ca::Enos);
    env.emu.set_fault(Fault::RedtrustFinalize500, Some(1));
    let run = env.expect(&["enroll"], 75);
    assert!(run.stderr.contains("csr/finalize"), "{run:?}");
    assert_eq!(env.status_json()["state"], "none");
    env.expect(&["enroll"], 0);
    assert_eq!(env.emu.redtrust_keys(), 1, "one Redtrust key");
    assert_eq!(
        env.issuing_calls().len(),
        1,
        "the certificate received before the crash was not requested again"
    );
    assert_eq!(env.emu.redtrust_finalized(), 1);
}

/// Issue 11's question for Redtrust: finalize bound the certificate and its answer was lost.
/// The retry of the same requestCode gets 404; the request is abandoned (75, the old identity
/// untouched) and the next run converges with a new request instead of failing at every run.
#[test]
fn a_finalize_whose_answer_was_lost_is_abandoned_and_the_next_run_starts_over() {
    let env = redtrust_with(Ca::Enos);
    env.expect(&["enroll"], 0);
    let first = env.identity();
    env.emu.set_fault(Fault::RedtrustFinalizeAnswerLost, Some(1));
    env.expect(&["renew", "--force"], 75);
    assert_eq!(env.emu.redtrust_finalized(), 2, "Redtrust bound the renewal's certificate");
    assert_eq!(env.identity(), first, "the old identity stays installed");

    let run = env.expect(&["renew", "--force"], 75);
    assert!(run.stderr.contains("HTTP 404") && run.stderr.contains("abandoned"), "{run:?}");
    assert_eq!(env.identity(), first, "the old identity stays installed");
    assert!(env.state_json()["pending"].is_null(), "nothing pending: {}", env.state_json());

    // Redtrust replaced the old certificate with the lost one, so renewing the old one is a 404:
    // the agent asks for a new key and certificate instead (v1 create, as an enrollment).
    let run = env.expect(&["renew", "--force"], 0);
    assert!(run.stderr.contains("requesting a new key and certificate instead"), "{run:?}");
    assert_eq!(calls(&env, "POST", "/raapi/v2/csr/create"), 2, "the lost renewal, then the refused one");
    assert_eq!(calls(&env, "POST", "/raapi/v1/csr/create"), 2, "the enrollment, then the new issuance");
    assert_ne!(env.identity(), first);
    assert_eq!(env.emu.redtrust_finalized(), 3);
    env.assert_chain_verifies();
}

#[test]
fn killed_between_create_and_finalize_resumes_the_same_key_and_request() {
    let env = redtrust_with(Ca::Sectigo);
    env.emu.set_pending_polls(1_000_000);
    let mut child = Command::new(agent_binary())
        .arg("-c")
        .arg(&env.config)
        .arg("enroll")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(env.state_dir().join("state.json"))
        .is_ok_and(|s| s.contains("\"request_id\": \""))
    {
        assert!(Instant::now() < deadline, "no Sectigo request was recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    env.emu.set_pending_polls(1);
    env.expect(&["enroll"], 0);
    assert_eq!(env.emu.redtrust_keys(), 1, "one Redtrust key");
    assert_eq!(env.emu.sectigo_requests(), 1, "one Sectigo request");
    assert_eq!(env.emu.redtrust_finalized(), 1);
}

#[test]
fn an_expired_access_token_is_refreshed_once() {
    let env = redtrust_with(Ca::Enos);
    env.emu.set_fault(Fault::RedtrustTokenExpired, Some(1));
    env.expect(&["enroll"], 0);
    assert_eq!(calls(&env, "PUT", "/authapi/v1/refresh-token"), 1);
    assert_eq!(env.emu.redtrust_sessions_open(), 0);
}

#[test]
fn a_refused_hmac_login_is_77_and_names_redtrust() {
    let env = redtrust_with(Ca::Enos);
    env.emu.set_fault(Fault::RejectAuth, None);
    let run = env.expect(&["enroll"], 77);
    assert!(run.stderr.contains("Redtrust refused the credentials"), "{run:?}");
    env.assert_no_secret_in_outputs();
}

#[test]
fn combinations_a_remote_key_cannot_serve_are_config_errors() {
    let env = redtrust_with(Ca::Enos);
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 4] = [
        ("key.algorithm: Redtrust generates RSA-2048 keys only", |c| c["key"]["algorithm"] = "p256".into()),
        ("san: Redtrust makes the CSR from subject attributes only", |c| {
            c["san"] = serde_json::json!({ "dns": ["x.example"] })
        }),
        ("key.rotate_on_renew: Redtrust makes a new key", |c| c["key"]["rotate_on_renew"] = false.into()),
        ("key.redtrust.hmac_secret_file: missing", |c| {
            c["key"]["redtrust"].as_object_mut().unwrap().remove("hmac_secret_file");
        }),
    ];
    let original = fs::read(&env.config).unwrap();
    for (words, edit) in cases {
        fs::write(&env.config, &original).unwrap();
        env.edit_config(edit);
        let run = env.expect(&["enroll"], 78);
        assert!(run.stderr.starts_with(&format!("error: {words}")), "{words}: {run:?}");
        assert!(!env.state_dir().exists(), "a config error creates nothing");
    }
}

#[test]
fn ezca_certificate_renewal_cannot_use_a_remote_key() {
    let env = Env::with_config(Ca::Ezca, "rsa2048", |_| {});
    env.use_redtrust();
    let run = env.expect(&["enroll"], 78);
    assert!(run.stderr.contains("ca.renew_auth: a Redtrust key cannot sign"), "{run:?}");
}

#[test]
fn est_cannot_use_a_remote_key() {
    // EST renews over TLS client authentication, which a Redtrust key cannot sign on the device.
    let env = Env::with_config(Ca::Est, "rsa2048", |c| c["san"] = serde_json::json!({}));
    env.use_redtrust();
    let run = env.expect(&["enroll"], 78);
    assert!(
        run.stderr.starts_with("error: ca.backend: EST renews over TLS client authentication"),
        "{run:?}"
    );
    assert!(!env.state_dir().exists(), "a config error creates nothing");
}
