//! EST (design.md §8, protocols.md §6.1/§6.1a) end to end against the emulator: the bootstrap
//! credentials, 202 + Retry-After with the identical CSR (also across a SIGKILL), the refusal and
//! failure classes, the answer layouts real servers send, and the expired-certificate fallback.
//! The backend suite (tests/backends.rs) covers the rest; tests/providers.rs renews over mTLS with
//! PKCS#11 and TPM keys.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{openssl, Ca, Env};
use enroll_tests::{EstAuth, Fault};
use serde_json::Value;

fn spki_of(cert: &std::path::Path) -> String {
    openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-pubkey"]).1
}

fn key_spki(key: &std::path::Path) -> String {
    openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]).1
}

/// Every CSR the emulator received, as the agent's request id names them.
fn csr_ids(env: &Env) -> Vec<String> {
    env.emu.est_csr_hashes().iter().map(|h| format!("est:{h}")).collect()
}

#[test]
fn factory_certificate_enrolls_and_the_device_certificate_renews() {
    let env = Env::new(Ca::Est, "p256");
    let run = env.expect(&["check", "--online"], 0);
    assert!(run.stdout.contains("reachable over verified TLS"), "{run:?}");
    env.expect(&["enroll"], 0);
    assert_eq!(env.emu.est_last_auth(), Some(EstAuth::FactoryCert));
    env.assert_chain_verifies();
    let current = env.current();
    // chain.pem = leaf + the issuing CA; ca.pem = what cacerts returned (issuing CA and root).
    let chain = fs::read_to_string(current.join("chain.pem")).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "{chain}");
    let ca = fs::read_to_string(current.join("ca.pem")).unwrap();
    assert!(ca.contains(env.emu.est_root_pem().trim()), "ca.pem holds the root from cacerts");
    assert!(ca.contains(env.emu.est_issuing_pem().trim()), "ca.pem holds the issuing CA from cacerts");
    let status = env.agent(&["status"]).stdout;
    assert!(status.contains("factory certificate"), "{status}");
    assert!(status.contains("the device certificate (TLS client authentication)"), "{status}");

    env.expect(&["renew", "--force"], 0);
    assert_eq!(env.emu.est_last_auth(), Some(EstAuth::DeviceCert));
    assert_eq!(env.emu.est_reenroll_requests(), 1);
    env.assert_chain_verifies();
    env.assert_no_secret_in_outputs();
}

#[test]
fn http_basic_bootstrap_enrolls_and_never_shows_the_password() {
    let env = Env::new(Ca::Est, "rsa2048");
    env.use_est_basic();
    env.expect(&["enroll"], 0);
    assert_eq!(env.emu.est_last_auth(), Some(EstAuth::Basic));
    env.assert_chain_verifies();
    let status = env.agent(&["status"]).stdout;
    assert!(status.contains("one-time password"), "{status}");
    // Renewal never uses the password: the device certificate authenticates.
    env.expect(&["renew", "--force"], 0);
    assert_eq!(env.emu.est_last_auth(), Some(EstAuth::DeviceCert));
    env.assert_no_secret_in_outputs();
}

#[test]
fn refused_credentials_are_77_with_the_servers_words_and_no_secret() {
    let env = Env::new(Ca::Est, "p256");
    env.use_est_basic();
    env.emu.set_fault(Fault::RejectAuth, None);
    let run = env.expect(&["enroll"], 77);
    assert!(run.stderr.contains("refused the bootstrap password (HTTP Basic): HTTP 401"), "{run:?}");
    assert!(run.stderr.contains("authentication rejected"), "the server's own words: {run:?}");
    env.emu.set_fault(Fault::EstForbidden, None);
    let run = env.expect(&["enroll"], 77);
    assert!(run.stderr.contains("HTTP 403: enrollment refused by policy"), "{run:?}");
    env.emu.set_fault(Fault::Http503RetryAfter, None);
    let run = env.expect(&["enroll"], 75);
    assert!(run.stderr.contains("HTTP 503") && run.stderr.contains("retry after"), "{run:?}");
    env.emu.clear_fault();
    assert!(!env.current().exists(), "nothing was installed");
    env.expect(&["enroll"], 0);
    env.assert_no_secret_in_outputs();
}

#[test]
fn pending_202_is_resent_with_the_identical_csr_until_issued() {
    let env = Env::new(Ca::Est, "p256");
    env.emu.set_fault(Fault::EstPending, Some(3));
    let started = Instant::now();
    let run = env.expect(&["enroll"], 0);
    assert!(started.elapsed() >= Duration::from_secs(3), "Retry-After (1 s) was honoured between resends");
    let ids = csr_ids(&env);
    assert_eq!(ids.len(), 4, "three 202s, then the certificate: {ids:?}");
    assert!(ids.iter().all(|id| *id == ids[0]), "every resend carried the identical CSR: {ids:?}");
    assert!(run.stderr.contains(&format!("request {} is not ready", ids[0])), "{run:?}");
    env.assert_chain_verifies();

    // A renewal that is pending resends over mTLS with the current certificate.
    env.emu.set_fault(Fault::EstPending, Some(2));
    env.expect(&["renew", "--force"], 0);
    let ids = csr_ids(&env);
    assert_eq!(ids.len(), 7, "{ids:?}");
    assert!(ids[4..].iter().all(|id| *id == ids[4]) && ids[4] != ids[0], "{ids:?}");
    assert_eq!(env.emu.est_reenroll_requests(), 3);
    assert_eq!(env.emu.est_last_auth(), Some(EstAuth::DeviceCert));
}

#[test]
fn a_run_waits_at_most_poll_wait_s_and_the_next_run_resends_the_same_csr() {
    let env = Env::with_config(Ca::Est, "p256", |c| c["ca"]["poll_wait_s"] = 2.into());
    env.emu.set_fault(Fault::EstPending, None);
    let run = env.expect(&["enroll"], 75);
    assert!(run.stderr.contains("still pending"), "{run:?}");
    let state = env.state_json();
    let id = state["pending"]["request_id"].as_str().unwrap().to_string();
    assert_eq!(csr_ids(&env)[0], id, "the request id is the SHA-256 of the CSR sent");
    env.emu.clear_fault();
    let run = env.expect(&["enroll"], 0);
    assert!(run.stderr.contains(&format!("resuming request {id}")), "{run:?}");
    assert!(csr_ids(&env).iter().all(|h| *h == id), "{:?}", csr_ids(&env));
}

#[test]
fn killed_while_pending_the_restart_resends_the_identical_csr_with_the_same_key() {
    let env = Env::new(Ca::Est, "p256");
    env.emu.set_fault(Fault::EstPending, None);
    let mut child = env.spawn(&["enroll"], &[]);
    let id = env.wait_for_request_id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let key_before = env.only_slot_key();
    assert_eq!(env.status_json()["state"], "pending");

    env.emu.clear_fault();
    let run = env.expect(&["enroll"], 0);
    assert!(run.stderr.contains(&format!("resuming request {id}")), "{run:?}");
    let ids = csr_ids(&env);
    assert!(ids.len() >= 2 && ids.iter().all(|h| *h == id), "the restart resent the identical CSR: {ids:?}");
    assert_eq!(fs::read(env.current().join("key.pem")).unwrap(), key_before, "the same key was certified");
    assert_eq!(fs::read_dir(env.state_dir().join("slots")).unwrap().count(), 1, "no second key");
    assert_eq!(env.status_json()["pending"], Value::Null);
}

#[test]
fn wrapped_crlf_and_ber_answers_are_accepted() {
    let env = Env::new(Ca::Est, "p256");
    env.emu.set_fault(Fault::EstBer, None);
    env.expect(&["enroll"], 0);
    env.assert_chain_verifies();
    for fault in [Fault::EstWrap64, Fault::EstWrap76, Fault::EstCrlf, Fault::EstBer] {
        env.emu.set_fault(fault, None);
        let run = env.agent(&["renew", "--force"]);
        assert_eq!(run.code, 0, "{fault:?}: {run:?}");
        env.assert_chain_verifies();
    }
}

#[test]
fn the_leaf_is_the_certificate_for_our_key_among_several() {
    let env = Env::new(Ca::Est, "rsa2048");
    env.emu.set_fault(Fault::EstExtraCerts, None);
    env.expect(&["enroll"], 0);
    let current = env.current();
    assert_eq!(spki_of(&current.join("cert.pem")), key_spki(&current.join("key.pem")));
    env.assert_chain_verifies();
}

#[test]
fn bad_answers_to_a_first_enrollment_install_nothing() {
    for (fault, code, words) in [
        (Fault::WrongKeyCert, 76, "does not carry our public key"),
        (Fault::TruncatedJson, 76, "not a base64 certs-only PKCS#7"),
        (Fault::MalformedJson, 76, "not a base64 certs-only PKCS#7"),
        (Fault::TruncatedBody, 75, "closed before the body was complete"),
    ] {
        let env = Env::new(Ca::Est, "p256");
        env.emu.set_fault(fault, None);
        let run = env.agent(&["enroll"]);
        assert_eq!(run.code, code, "{fault:?}: {run:?}");
        assert!(run.stderr.contains(words), "{fault:?}: {run:?}");
        assert!(!env.current().exists(), "{fault:?}: nothing installed");
        assert_eq!(env.status_json()["state"], "none", "{fault:?}");
    }
}

/// Replaces the installed identity with an expired device certificate and its key.
fn install_expired_identity(env: &Env) {
    let (cert, key) = env.emu.issue_est_device_identity("sensor-0042", false, -1).unwrap();
    let current = env.current();
    for (name, text, mode) in
        [("cert.pem", &cert, 0o644), ("chain.pem", &cert, 0o644), ("key.pem", &key, 0o600)]
    {
        let path = current.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    assert_eq!(env.status_json()["state"], "expired");
}

#[test]
fn an_expired_certificate_falls_back_to_the_bootstrap_credential() {
    let env = Env::new(Ca::Est, "p256");
    env.expect(&["enroll"], 0);
    install_expired_identity(&env);
    let run = env.expect(&["renew", "--force"], 0);
    assert!(run.stderr.contains("enrolling again with the bootstrap credential"), "{run:?}");
    assert_eq!(env.emu.est_last_auth(), Some(EstAuth::FactoryCert));
    assert_eq!(env.emu.est_reenroll_requests(), 0);
    assert_eq!(env.status_json()["state"], "valid");
    env.assert_chain_verifies();
}

#[test]
fn an_expired_certificate_without_a_bootstrap_credential_is_77_saying_so() {
    let env = Env::new(Ca::Est, "p256");
    env.expect(&["enroll"], 0);
    install_expired_identity(&env);
    env.edit_config(|c| {
        c["ca"].as_object_mut().unwrap().remove("bootstrap");
    });
    let run = env.expect(&["renew", "--force"], 77);
    assert!(run.stderr.contains("ca.bootstrap is not configured"), "{run:?}");
    assert_eq!(env.emu.est_enroll_requests(), 1, "nothing was sent without a credential");
    // With a valid certificate, renewal needs no bootstrap credential at all.
    let fresh = Env::new(Ca::Est, "p256");
    fresh.expect(&["enroll"], 0);
    fresh.edit_config(|c| {
        c["ca"].as_object_mut().unwrap().remove("bootstrap");
    });
    fresh.expect(&["renew", "--force"], 0);
    assert_eq!(fresh.emu.est_last_auth(), Some(EstAuth::DeviceCert));
}
