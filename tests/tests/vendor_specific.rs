//! Behaviour specific to one CA: EnOS token expiry, EZCA V2 fallback, wrapped answers, Entra ID
//! bootstrap, refused bootstrap credentials.

mod common;

use common::{write_secret, Ca, Env};
use enroll_tests::Fault;

#[test]
fn enos_refreshes_an_expired_token_once_and_succeeds() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    env.emu.clear_log();
    env.emu.set_fault(Fault::EnosTokenExpired, Some(1));
    env.expect(&["renew", "--force"], 0);
    let token_calls: Vec<String> = env
        .emu
        .log()
        .iter()
        .filter(|r| r.path.contains("/token/"))
        .map(|r| format!("{} {}", r.path, r.status))
        .collect();
    assert_eq!(
        token_calls,
        ["/apim-token-service/v2.0/token/get 200", "/apim-token-service/v2.0/token/refresh 200"],
        "one token, expired by the CA (code 1203), then refreshed"
    );
    let calls = env.issuing_calls();
    assert!(calls.iter().rev().take(2).all(|c| c.contains("action=renew")), "{calls:?}");
}

#[test]
fn enos_token_request_in_a_used_millisecond_is_signed_again_once() {
    let env = Env::new(Ca::Enos, "p256");
    env.emu.set_fault(Fault::EnosDuplicatedEncryption, Some(1));
    env.expect(&["enroll"], 0);
    let token_calls: Vec<Option<String>> =
        env.emu.log().into_iter().filter(|r| r.path.contains("/token/")).map(|r| r.fault).collect();
    assert_eq!(
        token_calls,
        [Some("enos-duplicated-encryption".to_string()), None],
        "status 1001, then one more token request"
    );
    env.assert_chain_verifies();

    // Twice in a row is another client racing for good: temporary (75), nothing installed.
    let env = Env::new(Ca::Enos, "p256");
    env.emu.set_fault(Fault::EnosDuplicatedEncryption, Some(2));
    let out = env.expect(&["enroll"], 75);
    assert!(out.stderr.contains("status 1001 twice"), "{}", out.stderr);
    assert!(!env.current().exists());
}

#[test]
fn enos_product_key_and_device_key_select_the_device() {
    let env = Env::new(Ca::Enos, "rsa2048");
    env.edit_config(|c| {
        let ca = c["ca"].as_object_mut().unwrap();
        ca.remove("asset_id");
        ca.insert("product_key".into(), env.emu.enos.product_key.clone().into());
        ca.insert("device_key".into(), env.emu.enos.device_key.clone().into());
    });
    env.expect(&["enroll"], 0);
    let apply = env.emu.log().into_iter().find(|r| r.path.starts_with("/connect-service/")).unwrap();
    assert!(
        apply.query.iter().any(|(k, v)| k == "deviceKey" && *v == env.emu.enos.device_key),
        "{:?}",
        apply.query
    );
}

#[test]
fn ezca_falls_back_to_renew_v2_when_v3_is_missing() {
    let env = Env::new(Ca::Ezca, "rsa2048");
    env.expect(&["enroll"], 0);
    env.emu.set_fault(Fault::EzcaV3404, Some(1));
    env.expect(&["renew", "--force"], 0);
    let calls = env.issuing_calls();
    let tail: Vec<_> = calls.iter().rev().take(2).rev().collect();
    assert!(tail[0].contains("RenewCertificateV3") && tail[0].ends_with("-> 404"), "{calls:?}");
    assert!(tail[1].contains("RenewCertificateV2") && tail[1].ends_with("-> 200"), "{calls:?}");
    assert_eq!(env.status_json()["state"], "valid");
}

#[test]
fn ezca_unwraps_a_json_string_wrapped_answer() {
    let env = Env::new(Ca::Ezca, "rsa2048");
    env.expect(&["enroll"], 0);
    env.emu.set_fault(Fault::EzcaWrapped, Some(1));
    env.expect(&["renew", "--force"], 0);
}

#[test]
fn ezca_enrolls_with_entra_client_credentials() {
    let env = entra_env(false);
    env.expect(&["enroll"], 0);
    let token_call =
        env.emu.log().into_iter().find(|r| r.path.ends_with("/oauth2/v2.0/token")).expect("Entra token call");
    assert!(token_call.path.contains(&env.emu.ezca.tenant_id) && token_call.status == 200);
    env.assert_no_secret_in_outputs();
}

#[test]
fn ezca_reports_entra_refusing_the_client_secret() {
    let env = entra_env(true);
    let run = env.expect(&["enroll"], 77);
    assert!(
        run.stderr.contains("Entra ID refused the client credentials: invalid_client: AADSTS7000215"),
        "{run:?}"
    );
    env.assert_no_secret_in_outputs();
    assert!(!run.stderr.contains("not-the-secret"));
}

fn entra_env(wrong_secret: bool) -> Env {
    let env = Env::new(Ca::Ezca, "rsa2048");
    let secret_path = env.dir().join("client-secret");
    let secret = if wrong_secret { "not-the-secret".to_string() } else { env.emu.ezca.client_secret.clone() };
    write_secret(&secret_path, &secret);
    env.edit_config(|c| {
        c["ca"]["bootstrap"] = serde_json::json!({
            "tenant_id": env.emu.ezca.tenant_id,
            "client_id": env.emu.ezca.client_id,
            "client_secret_file": secret_path,
            "authority": env.emu.url(),
        })
    });
    env
}

#[test]
fn ezca_says_when_the_bootstrap_token_is_refused() {
    let env = Env::new(Ca::Ezca, "rsa2048");
    write_secret(&env.dir().join("bootstrap.token"), "expired-factory-token");
    let run = env.expect(&["enroll"], 77);
    assert!(run.stderr.contains("the bootstrap token was refused (HTTP 401)"), "{run:?}");
    assert!(!run.stderr.contains("expired-factory-token"));
}

#[test]
fn ezca_certificate_renewal_does_not_need_the_bootstrap_token() {
    let env = Env::new(Ca::Ezca, "rsa2048");
    env.expect(&["enroll"], 0);
    // The factory token is gone (or revoked): the device renews with its certificate alone.
    write_secret(&env.dir().join("bootstrap.token"), "revoked");
    env.expect(&["renew", "--force"], 0);
    let renew = env.emu.log().into_iter().rev().find(|r| r.path.contains("RenewCertificateV3")).unwrap();
    assert_eq!(renew.status, 200);
}

#[test]
fn renewal_without_rotation_keeps_the_key() {
    let env = Env::with_config(Ca::Enos, "rsa2048", |c| c["key"]["rotate_on_renew"] = false.into());
    env.expect(&["enroll"], 0);
    let key = std::fs::read(env.current().join("key.pem")).unwrap();
    let serial = common::serial_of(&env);
    env.expect(&["renew", "--force"], 0);
    assert_ne!(common::serial_of(&env), serial);
    assert_eq!(std::fs::read(env.current().join("key.pem")).unwrap(), key);
    assert_eq!(common::mode(&env.current().join("key.pem")), 0o600);
}

#[test]
fn a_failed_forced_renewal_does_not_make_the_next_plain_renew_due() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    env.emu.set_fault(Fault::Http503, Some(1));
    env.expect(&["renew", "--force"], 75);
    let calls = env.issuing_calls().len();
    let run = env.expect(&["renew"], 0);
    assert!(run.stdout.contains("not due until"), "{run:?}");
    assert_eq!(env.issuing_calls().len(), calls);
    env.expect(&["needs-renewal"], 1);
}

/// `action=list` names every certificate the device ever had: after years of renewals the
/// answer outgrows the 64 KiB bound of other answers, and the lost-answer recovery must still
/// read it (the 1,000-kill run found a device stuck on 76 "larger than 65536 bytes").
#[test]
fn enos_recovery_reads_a_list_longer_than_64_kib() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    // About 700 bytes per listed P-256 certificate: 130 of them make more than 64 KiB.
    for _ in 0..130 {
        env.expect(&["renew", "--force"], 0);
    }
    env.emu.set_fault(Fault::EnosAnswerLost, Some(1));
    env.expect(&["renew", "--force"], 75);
    let lost = env.emu.issued().last().cloned().unwrap();
    let run = env.expect(&["renew", "--force"], 0);
    assert!(run.stderr.contains("EnOS already issued certificate"), "{run:?}");
    let list =
        env.emu.log().into_iter().rev().find(|r| r.query.iter().any(|(k, v)| k == "action" && v == "list"));
    assert_eq!(list.map(|r| r.status), Some(200));
    let installed = pem::parse(std::fs::read(env.current().join("cert.pem")).unwrap()).unwrap();
    assert_eq!(installed.contents(), lost.as_slice());
}
