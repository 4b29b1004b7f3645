//! The end-to-end suite every CA backend passes, written once and instantiated per backend and
//! key algorithm. Each test runs the real `enroll-agent` binary against the emulator.

mod common;

use std::fs;
use std::time::Duration;

use common::{mode, openssl, serial_of, Ca, Env};
use enroll_tests::{scep, Fault, ScepCipher};

/// Generates the suite for one (CA, algorithm, config tweak).
macro_rules! backend_suite {
    ($name:ident, $ca:expr, $algorithm:expr, $tweak:expr) => {
        mod $name {
            use super::*;

            fn env() -> Env {
                Env::with_config($ca, $algorithm, $tweak)
            }

            #[test]
            fn first_enroll_installs_a_verified_identity() {
                suite_first_enroll(&env());
            }

            #[test]
            fn second_enroll_is_a_no_op() {
                suite_second_enroll(&env());
            }

            #[test]
            fn forced_renewal_installs_a_new_serial_and_keeps_previous() {
                suite_forced_renewal(&env());
            }

            #[test]
            fn every_fault_leaves_the_identity_untouched_with_the_documented_exit_code() {
                suite_faults(&env());
            }

            #[test]
            fn a_failed_first_enrollment_resumes_with_the_same_key() {
                suite_resume_same_key(&env());
            }

            #[test]
            fn forced_enrollment_starts_over_with_the_bootstrap_credential() {
                suite_forced_enrollment(&env());
            }
        }
    };
}

fn no_tweak(_: &mut serde_json::Value) {}

backend_suite!(enos_p256, Ca::Enos, "p256", no_tweak);
backend_suite!(enos_rsa2048, Ca::Enos, "rsa2048", no_tweak);
backend_suite!(ezca_rsa2048, Ca::Ezca, "rsa2048", no_tweak);
backend_suite!(ezca_p256_bootstrap_renewal, Ca::Ezca, "p256", |c: &mut serde_json::Value| {
    c["ca"]["renew_auth"] = "bootstrap".into();
});
backend_suite!(sectigo_p256, Ca::Sectigo, "p256", no_tweak);
backend_suite!(sectigo_rsa2048, Ca::Sectigo, "rsa2048", no_tweak);
backend_suite!(securosys_rsa2048, Ca::Securosys, "rsa2048", no_tweak);
backend_suite!(securosys_p256_with_approval, Ca::Securosys, "p256", |c: &mut serde_json::Value| {
    c["ca"]["approval"] = true.into();
});
backend_suite!(est_p256, Ca::Est, "p256", no_tweak);
backend_suite!(est_rsa2048, Ca::Est, "rsa2048", no_tweak);
backend_suite!(acme_p256, Ca::Acme, "p256", no_tweak);
backend_suite!(acme_rsa2048, Ca::Acme, "rsa2048", no_tweak);
// SCEP encrypts its answers to the device key with RSA: a P-256 config is refused (78).
backend_suite!(scep_rsa2048, Ca::Scep, "rsa2048", no_tweak);

fn suite_first_enroll(env: &Env) {
    let run = env.expect(&["enroll"], 0);
    assert!(run.stdout.contains("installed certificate serial"), "{run:?}");
    let current = env.current();
    assert_eq!(mode(&env.state_dir()), 0o700);
    assert_eq!(mode(&current.join("key.pem")), 0o600);
    assert_eq!(mode(&env.state_dir().join("state.json")), 0o600);

    // openssl, not our parser, checks the chain and that the key belongs to the certificate.
    env.assert_chain_verifies();
    let (_, cert_key) =
        openssl(&["x509", "-in", current.join("cert.pem").to_str().unwrap(), "-noout", "-pubkey"]);
    let (_, file_key) = openssl(&["pkey", "-in", current.join("key.pem").to_str().unwrap(), "-pubout"]);
    assert_eq!(cert_key, file_key, "key.pem is the certificate's key");
    let (_, text) = openssl(&["x509", "-in", current.join("cert.pem").to_str().unwrap(), "-noout", "-text"]);
    assert!(
        text.contains("DNS:sensor-0042.devices.acme.example") && text.contains("IP Address:10.0.0.42"),
        "{text}"
    );

    let status = env.status_json();
    assert_eq!(status["state"], "valid");
    assert!(status["subject"].as_str().unwrap().contains("CN=sensor-0042"), "{status}");
    assert_eq!(status["backend"], env.ca.name());
    assert_eq!(status["key"]["algorithm"], env_algorithm(env));
    assert_eq!(status["pending"], serde_json::Value::Null);
    assert_eq!(status["last_error"], serde_json::Value::Null);
    assert_eq!(status["paths"]["chain"], current.join("chain.pem").to_str().unwrap());
    let text_status = env.expect(&["status"], 0).stdout;
    assert!(text_status.contains("state:       valid") && text_status.contains("identity:"), "{text_status}");
    env.assert_no_secret_in_outputs();
}

fn env_algorithm(env: &Env) -> String {
    let config: serde_json::Value = serde_json::from_slice(&fs::read(&env.config).unwrap()).unwrap();
    config["key"]["algorithm"].as_str().unwrap().to_string()
}

/// The Securosys call that signs: synchronous, or the approval flow's.
fn sign_path(env: &Env) -> &'static str {
    let config: serde_json::Value = serde_json::from_slice(&fs::read(&env.config).unwrap()).unwrap();
    match config["ca"]["approval"].as_bool() {
        Some(true) => "POST /v1/certificate/sign ",
        _ => "POST /v1/certificate/synchronous/sign ",
    }
}

fn suite_second_enroll(env: &Env) {
    env.expect(&["enroll"], 0);
    let before = env.identity();
    let calls = env.issuing_calls().len();
    let run = env.expect(&["enroll"], 0);
    assert!(run.stdout.contains("already installed"), "{run:?}");
    assert_eq!(env.identity(), before);
    assert_eq!(env.issuing_calls().len(), calls, "no request reached the CA");
}

fn suite_forced_renewal(env: &Env) {
    env.expect(&["enroll"], 0);
    let first = env.identity();
    let first_serial = serial_of(env);
    let run = env.expect(&["renew"], 0);
    assert!(run.stdout.contains("not due until"), "a fresh certificate is not due: {run:?}");

    let run = env.expect(&["renew", "--force"], 0);
    assert!(run.stdout.starts_with("renew: installed certificate serial"), "{run:?}");
    let second = env.identity();
    assert_ne!(serial_of(env), first_serial);
    assert_ne!(second.target, first.target);
    assert_eq!(
        fs::read_link(env.state_dir().join("previous")).unwrap(),
        first.target,
        "previous keeps the old slot"
    );
    let key = |id: &common::Identity| id.files.iter().find(|(n, _)| n == "key.pem").unwrap().1.clone();
    assert_ne!(key(&first), key(&second), "rotate_on_renew makes a new key");
    let last = env.issuing_calls().pop().unwrap();
    let expected = match (env.ca, env_algorithm(env).as_str()) {
        (Ca::Enos, _) => "?action=renew",
        (Ca::Ezca, "rsa2048") => "/api/Certificates/RenewCertificateV3",
        (Ca::Ezca, _) => "/api/CA/RequestSSLCertificateV2",
        (Ca::Sectigo, _) => "POST /api/ssl/v1/renewById/",
        (Ca::Securosys, _) => sign_path(env),
        (Ca::Est, _) => "POST /.well-known/est/meters/simplereenroll",
        (Ca::Acme, _) => "POST /acme/finalize/",
        (Ca::Scep, _) => "POST /scep?operation=PKIOperation",
    };
    assert!(last.contains(expected) && last.ends_with("-> 200"), "{last}");
    if env.ca == Ca::Scep {
        // The server lists Renewal: the current certificate signs a RenewalReq.
        assert_eq!(env.emu.scep_last_message_type(), Some(scep::RENEWAL_REQ));
        assert_eq!(env.emu.scep_requests(scep::PKCS_REQ), 1, "only the first enrollment was a PKCSReq");
    }
    assert_eq!(env.status_json()["renewals"], 1);
    env.assert_no_secret_in_outputs();
}

/// (fault, exit code, words the error must carry).
fn fault_table(ca: Ca) -> Vec<(Fault, i32, &'static str)> {
    let mut table = vec![
        (Fault::Http500, 75, "HTTP 500"),
        (Fault::Http503, 75, "HTTP 503"),
        (Fault::Http429, 75, "HTTP 429"),
        (Fault::Timeout, 75, "could not reach the CA"),
        (Fault::MalformedJson, 76, "not valid JSON"),
        (Fault::TruncatedJson, 76, "not valid JSON"),
        (Fault::TruncatedBody, 75, "closed before the body was complete"),
        (Fault::WrongKeyCert, 76, "does not carry our public key"),
        (Fault::ExpiredCert, 76, "expired"),
        (Fault::RejectAuth, 77, "refused"),
        (Fault::Oversized, 76, "larger than"),
    ];
    if ca == Ca::Est {
        // EST answers are base64 PKCS#7, not JSON.
        for (fault, _, words) in table.iter_mut() {
            if matches!(fault, Fault::MalformedJson | Fault::TruncatedJson) {
                *words = "not a base64 certs-only PKCS#7";
            }
        }
        table.extend([(Fault::EstForbidden, 77, "HTTP 403"), (Fault::Http503RetryAfter, 75, "retry after")]);
    }
    if ca == Ca::Scep {
        // A CertRep is DER CMS, not JSON: a body that is not CMS, or half of one, does not parse.
        for (fault, _, words) in table.iter_mut() {
            if matches!(fault, Fault::MalformedJson | Fault::TruncatedJson) {
                *words = "not a CMS message";
            }
        }
        // reject-auth is a FAILURE CertRep with failInfo badRequest: a refusal naming it.
        for (fault, _, words) in table.iter_mut() {
            if *fault == Fault::RejectAuth {
                *words = "FAILURE, badRequest";
            }
        }
        // A CertRep is believed only with the pinned CA's signature and our nonce.
        table.extend([
            (Fault::ScepBadSignature, 76, "the signature does not verify"),
            (Fault::ScepWrongNonce, 76, "recipientNonce is not the nonce we sent"),
        ]);
    }
    if ca == Ca::Enos {
        table.extend([
            (Fault::Enos99400, 77, "EnOS code 99400"),
            (Fault::Enos11404, 77, "EnOS code 11404: Device cannot be found"),
            (Fault::Enos11833, 77, "EnOS code 11833"),
            (Fault::Enos99500, 75, "EnOS code 99500"),
            (Fault::Gateway401, 77, "HTTP 401"),
            (Fault::Gateway429, 75, "HTTP 429"),
        ]);
    }
    table
}

fn suite_faults(env: &Env) {
    env.expect(&["enroll"], 0);
    let before = env.identity();
    env.emu.set_fault_delay(Duration::from_secs(4));
    for (fault, code, words) in fault_table(env.ca) {
        env.emu.set_fault(fault, None);
        let run = env.agent(&["renew", "--force"]);
        env.emu.clear_fault();
        assert_eq!(run.code, code, "{fault:?}: {run:?}");
        assert!(run.stderr.lines().any(|l| l.starts_with("error: ")), "{fault:?}: {run:?}");
        assert!(run.stderr.contains(words), "{fault:?} should mention {words:?}: {run:?}");
        assert_eq!(env.identity(), before, "{fault:?} changed the installed identity");
        let status = env.status_json();
        assert_eq!(status["state"], "valid", "{fault:?}: the old identity is still in force");
        assert!(status["last_error"].as_str().unwrap_or("").contains(words), "{fault:?}: {status}");
    }
    // And the CA recovering is enough: the next run succeeds and clears the error.
    env.expect(&["renew", "--force"], 0);
    let status = env.status_json();
    assert_eq!(status["state"], "valid");
    assert_eq!(status["last_error"], serde_json::Value::Null);
    env.assert_no_secret_in_outputs();
    let state = fs::read_to_string(env.state_dir().join("state.json")).unwrap();
    for secret in env.secrets() {
        assert!(!state.contains(&secret), "state.json holds a secret");
    }
}

fn suite_resume_same_key(env: &Env) {
    env.emu.set_fault(Fault::Http500, Some(1));
    env.expect(&["enroll"], 75);
    let slots: Vec<_> =
        fs::read_dir(env.state_dir().join("slots")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(slots.len(), 1, "one pending slot");
    let pending_key = fs::read(slots[0].join("key.pem")).unwrap();
    assert_eq!(env.status_json()["state"], "none");
    env.expect(&["enroll"], 0);
    assert_eq!(
        fs::read(env.current().join("key.pem")).unwrap(),
        pending_key,
        "the retry used the pending key"
    );
    assert_eq!(fs::read_dir(env.state_dir().join("slots")).unwrap().count(), 1, "no second key was made");
}

fn suite_forced_enrollment(env: &Env) {
    env.expect(&["enroll"], 0);
    let first = env.identity();
    let run = env.expect(&["enroll", "--force"], 0);
    assert!(run.stdout.starts_with("enroll: installed certificate serial"), "{run:?}");
    assert_ne!(env.identity(), first);
    assert_eq!(fs::read_link(env.state_dir().join("previous")).unwrap(), first.target);
    let last = env.issuing_calls().pop().unwrap();
    let expected = match env.ca {
        Ca::Enos => "?action=apply",
        Ca::Ezca => "/api/CA/RequestSSLCertificateV2",
        Ca::Sectigo => "POST /api/ssl/v1/enroll",
        Ca::Securosys => sign_path(env),
        Ca::Est => "POST /.well-known/est/meters/simpleenroll",
        Ca::Acme => "POST /acme/finalize/",
        Ca::Scep => "POST /scep?operation=PKIOperation",
    };
    assert!(last.contains(expected) && last.ends_with("-> 200"), "{last}");
    if env.ca == Ca::Scep {
        // Enrollment starts over with the challenge password, not the current certificate.
        assert_eq!(env.emu.scep_last_message_type(), Some(scep::PKCS_REQ));
        assert_eq!(env.emu.scep_requests(scep::RENEWAL_REQ), 0);
    }
}

/// Issue 11's defect: EnOS renewed (superseding the old certificate, §1.5) and the answer was
/// lost. The next run resends its pending request, EnOS refuses the old certSn, and the agent
/// takes the certificate EnOS already issued for its pending key from `action=list` (§1.7):
/// nothing is issued twice and the device is not left with a superseded certificate.
#[test]
fn an_enos_renewal_whose_answer_was_lost_is_found_in_the_certificate_list() {
    for algorithm in ["p256", "rsa2048"] {
        let env = Env::new(Ca::Enos, algorithm);
        env.expect(&["enroll"], 0);
        let first = env.identity();
        env.emu.set_fault(Fault::EnosAnswerLost, Some(1));
        env.expect(&["renew", "--force"], 75);
        assert_eq!(env.identity(), first, "the old identity stays installed");
        let lost = env.emu.issued().last().cloned().unwrap();
        let slot = env.state_json()["pending"]["slot"].as_str().unwrap().to_string();
        let pending_key = fs::read(env.state_dir().join("slots").join(slot).join("key.pem")).unwrap();

        let run = env.expect(&["renew", "--force"], 0);
        assert!(run.stderr.contains("EnOS already issued certificate"), "{run:?}");
        let installed = pem::parse(fs::read(env.current().join("cert.pem")).unwrap()).unwrap();
        assert_eq!(installed.contents(), lost.as_slice(), "the certificate EnOS issued in the lost answer");
        assert_eq!(env.emu.issued().len(), 2, "nothing was issued a second time");
        assert_ne!(env.identity(), first);
        assert_eq!(fs::read(env.current().join("key.pem")).unwrap(), pending_key, "the pending key");
        let calls = env.issuing_calls();
        assert!(calls.last().is_some_and(|c| c.contains("action=list")), "{calls:?}");
        assert_eq!(
            calls.iter().filter(|c| c.contains("action=apply")).count(),
            1,
            "only the first enroll: {calls:?}"
        );
        env.assert_chain_verifies();
        // The recovered certificate renews like any other: its certSN was recorded.
        env.expect(&["renew", "--force"], 0);
    }
}

/// ACME renewal information (RFC 9773): the CA's suggested window moves the renewal time, a
/// window that has begun makes the renewal due at once, and the new order names the
/// certificate it replaces.
#[test]
fn acme_renewal_follows_the_cas_suggested_window_and_names_what_it_replaces() {
    let mut options = enroll_tests::Options::default();
    // Ten to eleven days from now: far earlier than the default two thirds of 30 days.
    options.acme.ari_window = Some((10 * 86_400, 11 * 86_400));
    let env = Env::with_options(Ca::Acme, "p256", options, |_| {});
    env.expect(&["enroll"], 0);
    let run = env.expect(&["renew"], 0);
    assert!(run.stdout.contains("not due until"), "{run:?}");
    assert_eq!(env.emu.acme_renewal_info_requests(), 1);
    let renew_at = env.status_json()["renew_at"].as_str().unwrap().to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let planned = enroll_ca::time::parse_rfc3339(&renew_at).unwrap();
    assert!(
        (now + 10 * 86_400 - 5..=now + 11 * 86_400 + 5).contains(&planned),
        "renew_at {renew_at} lies in the suggested window"
    );
    // The window is asked again only after the answer's Retry-After (6 h).
    env.expect(&["renew"], 0);
    assert_eq!(env.emu.acme_renewal_info_requests(), 1, "Retry-After is respected");

    // The CA now wants the certificate replaced (a window that has begun): the next check makes
    // the renewal due at once. (The check is due: move it, and the last install, an hour back.)
    env.emu.set_acme_window(Some((-600, -60)));
    let state_path = env.state_dir().join("state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    let hour_ago = now - 3600;
    state["window_check_at"] = hour_ago.into();
    state["last_install"] = hour_ago.into();
    fs::write(&state_path, state.to_string()).unwrap();
    let old_serial = serial_of(&env);
    let run = env.expect(&["renew"], 0);
    assert!(run.stdout.starts_with("renew: installed certificate serial"), "{run:?}");
    assert_ne!(serial_of(&env), old_serial);
    let replaces = env.emu.acme_replaces();
    assert_eq!(replaces.len(), 1, "the renewal order names the certificate it replaces");
    assert!(replaces[0].contains('.'), "an RFC 9773 certID: {replaces:?}");
    env.assert_chain_verifies();
}

/// SCEP capabilities (RFC 8894 §3.5.2) decide how the agent talks: without POSTPKIOperation (and
/// SCEPStandard, which implies it) messages go as GET `message=`; without AES the request is
/// encrypted with DES3; without Renewal a renewal is a PKCSReq with the challenge password.
#[test]
fn scep_follows_the_servers_capabilities() {
    let env = Env::new(Ca::Scep, "rsa2048");
    env.emu.set_scep_caps(&["SHA-256", "DES3"]);
    env.expect(&["enroll"], 0);
    env.expect(&["renew", "--force"], 0);
    let messages = env.emu.scep_messages();
    let types: Vec<u8> = messages.iter().map(|m| m.message_type).collect();
    assert_eq!(types, [scep::PKCS_REQ, scep::PKCS_REQ], "no Renewal: the renewal is a PKCSReq");
    assert!(
        messages.iter().all(|m| m.method == "GET" && m.cipher == Some(ScepCipher::Des3)),
        "no POSTPKIOperation: GET; no AES: DES3: {messages:?}"
    );
    env.assert_chain_verifies();

    env.emu.set_scep_caps(scep::DEFAULT_CAPS);
    env.expect(&["renew", "--force"], 0);
    let last = env.emu.scep_messages().pop().unwrap();
    assert_eq!((last.method.as_str(), last.message_type), ("POST", scep::RENEWAL_REQ), "{last:?}");
    assert!(matches!(last.cipher, Some(ScepCipher::Aes128 | ScepCipher::Aes256)), "AES offered: {last:?}");
    assert_eq!(env.status_json()["renewals"], 2);
}

/// A SCEP server answers in the content cipher it likes (micromdm: DES-CBC, the default here);
/// the agent reads each of them.
#[test]
fn scep_answers_in_every_content_cipher_are_read() {
    let env = Env::new(Ca::Scep, "rsa2048");
    env.expect(&["enroll"], 0);
    for cipher in [ScepCipher::Des3, ScepCipher::Aes128, ScepCipher::Aes256] {
        env.emu.set_scep_reply_cipher(cipher);
        let run = env.expect(&["renew", "--force"], 0);
        assert!(run.stdout.starts_with("renew: installed certificate serial"), "{cipher:?}: {run:?}");
        env.assert_chain_verifies();
    }
    assert_eq!(env.emu.issued().len(), 4);
}

/// RFC 8894 §2.3: the current certificate authenticates a RenewalReq, so a device without the
/// challenge password still renews; enrolling again needs the challenge and is a 78.
#[test]
fn scep_renewal_needs_only_the_current_certificate() {
    let env = Env::new(Ca::Scep, "rsa2048");
    env.expect(&["enroll"], 0);
    env.edit_config(|c| {
        c["ca"].as_object_mut().unwrap().remove("challenge_password_file");
    });
    env.expect(&["renew", "--force"], 0);
    assert_eq!(env.emu.scep_last_message_type(), Some(scep::RENEWAL_REQ));
    let before = env.identity();
    let run = env.expect(&["enroll", "--force"], 78);
    assert!(run.stderr.contains("challenge_password_file"), "{run:?}");
    assert_eq!(env.identity(), before);
    assert_eq!(env.emu.scep_requests(scep::PKCS_REQ), 1, "only the first enrollment");
}

/// `ca_fingerprint` is SCEP's trust anchor: a CA certificate with another fingerprint is
/// refused before any request is sent; and a P-256 key, which SCEP cannot decrypt with, is a
/// configuration error.
#[test]
fn scep_refuses_an_unpinned_ca_and_p256_keys() {
    let env = Env::with_config(Ca::Scep, "rsa2048", |c| {
        c["ca"]["ca_fingerprint"] = format!("sha256:{}", "ab".repeat(32)).into();
    });
    let run = env.expect(&["enroll"], 77);
    assert!(run.stderr.contains("no certificate matches ca.ca_fingerprint"), "{run:?}");
    assert!(env.emu.scep_messages().is_empty(), "nothing was sent to an unpinned CA");
    let log = env.emu.log();
    assert!(log.iter().any(|r| r.query.iter().any(|(k, v)| k == "operation" && v == "GetCACert")), "{log:?}");

    let env = Env::new(Ca::Scep, "p256");
    let run = env.expect(&["enroll"], 78);
    assert!(run.stderr.contains("key.algorithm"), "{run:?}");
    assert!(env.emu.log().is_empty(), "refused before reaching the CA");
}
