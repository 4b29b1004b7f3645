//! Asynchronous CAs (design.md §5 rule 4, §7 "Lifecycle"): Sectigo collect, Securosys
//! approvals, ACME orders and SCEP PENDING answers are recorded before waiting, resumed after a
//! restart (even SIGKILL) with the same request and key, abandoned at `poll_timeout_s`, and ended
//! by the CA's terminal answers.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{write_secret, Ca, Env};
use enroll_tests::{scep, Fault};
use serde_json::Value;

fn securosys_with_approval() -> Env {
    Env::with_config(Ca::Securosys, "p256", |c| c["ca"]["approval"] = true.into())
}

/// design.md §4: "resuming never creates a second key or a second request".
fn killed_while_pending_resumes_the_same_request(env: &Env, requests: impl Fn(&Env) -> usize) {
    env.emu.set_pending_polls(1_000_000);
    let mut child = env.spawn(&["enroll"], &[]);
    let id = env.wait_for_request_id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let key_before = env.only_slot_key();
    let status = env.status_json();
    assert_eq!(status["state"], "pending", "{status}");
    assert_eq!(status["pending"]["request_id"], id.as_str());

    env.emu.set_pending_polls(1);
    let run = env.expect(&["enroll"], 0);
    assert!(run.stderr.contains(&format!("resuming request {id}")), "{run:?}");
    assert_eq!(requests(env), 1, "exactly one request reached the CA");
    assert_eq!(fs::read(env.current().join("key.pem")).unwrap(), key_before, "the same key was certified");
    assert_eq!(fs::read_dir(env.state_dir().join("slots")).unwrap().count(), 1, "no second key");
    assert_eq!(env.status_json()["pending"], Value::Null);
}

#[test]
fn sectigo_killed_while_pending_resumes_the_same_ssl_id_and_key() {
    let env = Env::new(Ca::Sectigo, "p256");
    killed_while_pending_resumes_the_same_request(&env, |e| e.emu.sectigo_requests());
}

#[test]
fn securosys_killed_while_awaiting_approval_resumes_the_same_request_and_key() {
    let env = securosys_with_approval();
    killed_while_pending_resumes_the_same_request(&env, |e| e.emu.securosys_requests());
}

#[test]
fn a_run_waits_at_most_poll_wait_s_then_exits_75_and_keeps_the_request() {
    let env = Env::with_config(Ca::Sectigo, "p256", |c| c["ca"]["poll_wait_s"] = 2.into());
    env.emu.set_pending_polls(1_000_000);
    let started = Instant::now();
    let run = env.expect(&["enroll"], 75);
    assert!(started.elapsed() < Duration::from_secs(15), "poll_wait_s bounds one run");
    assert!(run.stderr.contains("is still pending at Sectigo SCM"), "{run:?}");
    let status = env.status_json();
    assert_eq!(status["state"], "pending");
    assert!(status["last_error"].as_str().unwrap().contains("still pending"), "{status}");
    let log = env.emu.log();
    assert!(
        log.iter().any(|r| r.path.starts_with("/api/ssl/v1/collect/") && r.status == 400),
        "not-ready answers"
    );
    env.emu.set_pending_polls(0);
    env.expect(&["enroll"], 0);
    assert_eq!(env.emu.sectigo_requests(), 1);
}

#[test]
fn sectigo_every_documented_not_ready_answer_is_waited_out() {
    let env = Env::new(Ca::Sectigo, "rsa2048");
    env.emu.set_pending_polls(3);
    let run = env.expect(&["enroll"], 0);
    for words in ["-1400", "-183", "200 with an empty body"] {
        assert!(run.stderr.contains(words), "{words} was reported as not ready: {run:?}");
    }
    // Sectigo returns root → issuing → leaf; chain.pem must be leaf-first.
    let chain = fs::read_to_string(env.current().join("chain.pem")).unwrap();
    let first =
        chain.split("-----END CERTIFICATE-----").next().unwrap().to_string() + "-----END CERTIFICATE-----\n";
    assert_eq!(first, fs::read_to_string(env.current().join("cert.pem")).unwrap());
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "leaf + issuing CA (the root goes to ca.pem)");
}

#[test]
fn sectigo_renewal_renews_the_recorded_ssl_id() {
    let env = Env::new(Ca::Sectigo, "p256");
    env.expect(&["enroll"], 0);
    let ssl_id = env.state_json()["ca_ref"].as_str().expect("the sslId is kept for renewal").to_string();
    env.expect(&["renew", "--force"], 0);
    let renew = env.emu.log().into_iter().find(|r| r.path.starts_with("/api/ssl/v1/renewById/")).unwrap();
    assert_eq!(renew.path, format!("/api/ssl/v1/renewById/{ssl_id}"));
    let new_id = env.state_json()["ca_ref"].as_str().unwrap().to_string();
    assert_ne!(new_id, ssl_id, "the renewed certificate's sslId is kept for the next renewal");
    let headers = &renew.headers;
    let header = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
    assert_eq!(header("customerUri").as_deref(), Some(env.emu.sectigo.customer_uri.as_str()));
    assert_eq!(header("login").as_deref(), Some(env.emu.sectigo.login.as_str()));
    env.assert_no_secret_in_outputs();
}

/// (fault, exit code, words): terminal answers end the request; the next run starts a new one.
fn terminal(env: &Env, fault: Fault, code: i32, words: &str, requests: impl Fn(&Env) -> usize) {
    env.emu.set_fault(fault, Some(1));
    let run = env.expect(&["enroll"], code);
    assert!(run.stderr.contains(words), "{fault:?} should say {words:?}: {run:?}");
    let status = env.status_json();
    assert_eq!(status["pending"], Value::Null, "{fault:?}: the request was dropped: {status}");
    assert_eq!(status["state"], "none");
    env.emu.clear_fault();
    env.expect(&["enroll"], 0);
    assert_eq!(requests(env), 2, "{fault:?}: a new request after the terminal answer");
}

#[test]
fn securosys_rejected_is_77_and_the_next_run_makes_a_new_request() {
    terminal(&securosys_with_approval(), Fault::ApprovalRejected, 77, "REJECTED", |e| {
        e.emu.securosys_requests()
    });
}

#[test]
fn securosys_expired_and_failed_are_75_and_end_the_request() {
    terminal(&securosys_with_approval(), Fault::RequestExpired, 75, "EXPIRED", |e| {
        e.emu.securosys_requests()
    });
    terminal(&securosys_with_approval(), Fault::RequestFailed, 75, "FAILED", |e| e.emu.securosys_requests());
}

#[test]
fn sectigo_declined_and_revoked_are_refusals_that_end_the_request() {
    terminal(&Env::new(Ca::Sectigo, "p256"), Fault::ApprovalRejected, 77, "Declined", |e| {
        e.emu.sectigo_requests()
    });
    terminal(&Env::new(Ca::Sectigo, "p256"), Fault::SectigoRevoked, 77, "Sectigo code -110", |e| {
        e.emu.sectigo_requests()
    });
}

#[test]
fn past_poll_timeout_s_the_request_is_cancelled_at_tsb_and_replaced() {
    let env = Env::with_config(Ca::Securosys, "p256", |c| {
        c["ca"]["approval"] = true.into();
        c["ca"]["poll_wait_s"] = 1.into();
    });
    env.emu.set_pending_polls(1_000_000);
    env.expect(&["enroll"], 75);
    assert_eq!(env.status_json()["state"], "pending");
    // poll_timeout_s counts from the request's creation (persisted), so shortening it now makes
    // the next run give up; setting it before the first run raced a busy machine, where the
    // first run could already be past 2 s when it started polling.
    env.edit_config(|c| c["ca"]["poll_timeout_s"] = 2.into());
    std::thread::sleep(Duration::from_secs(3));
    let run = env.expect(&["enroll"], 75);
    assert!(run.stderr.contains("poll_timeout_s (2 s)"), "{run:?}");
    assert_eq!(env.emu.securosys_cancelled(), 1, "DELETE /v1/request/{{id}} withdrew it");
    assert_eq!(env.status_json()["pending"], Value::Null);
    env.emu.set_pending_polls(0);
    // The new request still passes through APPROVED: give this run time to see it executed
    // (and lift the 2 s limit, which a loaded machine can spend on the polls alone).
    env.edit_config(|c| {
        c["ca"]["poll_wait_s"] = 10.into();
        c["ca"]["poll_timeout_s"] = 60.into();
    });
    env.expect(&["enroll"], 0);
    assert_eq!(env.emu.securosys_requests(), 2);
}

#[test]
fn forced_enrollment_withdraws_the_pending_approval_request() {
    let env = Env::with_config(Ca::Securosys, "p256", |c| {
        c["ca"]["approval"] = true.into();
        c["ca"]["poll_wait_s"] = 1.into();
    });
    env.emu.set_pending_polls(1_000_000);
    env.expect(&["enroll"], 75);
    env.emu.set_pending_polls(0);
    env.edit_config(|c| c["ca"]["poll_wait_s"] = 10.into());
    env.expect(&["enroll", "--force"], 0);
    assert_eq!(env.emu.securosys_cancelled(), 1);
    assert_eq!(env.emu.securosys_requests(), 2);
}

#[test]
fn securosys_sends_both_credentials_and_refuses_a_missing_ca_bundle() {
    let env = Env::new(Ca::Securosys, "rsa2048");
    env.expect(&["enroll"], 0);
    let sign = env.emu.log().into_iter().find(|r| r.path == "/v1/certificate/synchronous/sign").unwrap();
    let header =
        |n: &str| sign.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
    assert!(header("Authorization").is_some_and(|v| v.starts_with("Bearer ")), "{sign:?}");
    assert!(header("X-API-KEY").is_some(), "{sign:?}");
    // TSB returns only the leaf: the chain comes from ca_bundle.
    let chain = fs::read_to_string(env.current().join("chain.pem")).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    env.assert_no_secret_in_outputs();

    env.edit_config(|c| {
        c["ca"].as_object_mut().unwrap().remove("ca_bundle");
    });
    let run = env.expect(&["renew", "--force"], 78);
    assert!(run.stderr.starts_with("error: ca.ca_bundle: missing"), "{run:?}");
}

/// ACME: an order the CA keeps `processing` (the `pending-forever` fault at finalize) is the
/// pending request; later runs carry that order on instead of placing another, and a forced
/// enrollment gives it up.
#[test]
fn acme_an_order_stuck_in_processing_is_carried_on_not_placed_again() {
    let env = Env::with_config(Ca::Acme, "p256", |c| c["ca"]["poll_wait_s"] = 2.into());
    env.emu.set_fault(Fault::PendingForever, Some(1));
    let started = Instant::now();
    let run = env.expect(&["enroll"], 75);
    assert!(started.elapsed() < Duration::from_secs(15), "poll_wait_s bounds one run: {run:?}");
    let status = env.status_json();
    assert_eq!(status["state"], "pending", "{status}");
    let order = status["pending"]["request_id"].as_str().unwrap().to_string();
    assert!(order.contains("/acme/order/"), "{order}");
    let key = env.only_slot_key();

    let run = env.expect(&["enroll"], 75);
    assert!(run.stderr.contains(&format!("resuming request {order}")), "{run:?}");
    assert_eq!(env.emu.acme_new_orders(), 1, "one order reached the CA");
    assert_eq!(env.only_slot_key(), key, "the same key waits");

    env.expect(&["enroll", "--force"], 0);
    assert_eq!(env.emu.acme_new_orders(), 2);
    assert_eq!(env.status_json()["pending"], Value::Null);
}

/// SCEP (RFC 8894 §3.3.3): a PKCSReq answered PENDING is recorded as `scep:<transactionID>`
/// before any wait; a run gives up after `poll_wait_s` with 75, and the next run asks about the
/// same transaction with CertPoll (never a second PKCSReq) and installs what the CA issued.
#[test]
fn scep_a_pending_request_is_resumed_with_certpoll_for_the_same_transaction() {
    let env = Env::with_config(Ca::Scep, "rsa2048", |c| c["ca"]["poll_wait_s"] = 2.into());
    env.emu.set_scep_pending_polls(1_000_000);
    let started = Instant::now();
    let run = env.expect(&["enroll"], 75);
    assert!(started.elapsed() < Duration::from_secs(15), "poll_wait_s bounds one run: {run:?}");
    let status = env.status_json();
    assert_eq!(status["state"], "pending", "{status}");
    let id = status["pending"]["request_id"].as_str().unwrap().to_string();
    let tid = id.strip_prefix("scep:").unwrap_or_else(|| panic!("a PKCSReq transaction: {id}")).to_string();
    let first = env.emu.scep_messages();
    assert_eq!(first[0].message_type, scep::PKCS_REQ, "{first:?}");
    assert!(
        first.iter().all(|m| m.transaction_id == tid && m.status == Some(scep::PENDING)),
        "every answer so far was PENDING for {tid}: {first:?}"
    );
    let key = env.only_slot_key();

    env.emu.set_scep_pending_polls(0);
    let run = env.expect(&["enroll"], 0);
    assert!(run.stderr.contains(&format!("resuming request {id}")), "{run:?}");
    assert_eq!(env.emu.scep_requests(scep::PKCS_REQ), 1, "no second PKCSReq");
    let resumed = &env.emu.scep_messages()[first.len()..];
    assert!(
        !resumed.is_empty()
            && resumed.iter().all(|m| m.message_type == scep::CERT_POLL && m.transaction_id == tid),
        "the resumed run only polled {tid}: {resumed:?}"
    );
    assert_eq!(resumed.last().unwrap().status, Some(scep::SUCCESS));
    assert_eq!(fs::read(env.current().join("key.pem")).unwrap(), key, "the pending key was certified");
    let installed = pem::parse(fs::read(env.current().join("cert.pem")).unwrap()).unwrap();
    assert_eq!(env.emu.issued(), vec![installed.contents().to_vec()], "the one certificate the CA issued");
    assert_eq!(env.status_json()["pending"], Value::Null);
    env.assert_chain_verifies();
}

/// A pending SCEP renewal is `scep-renewal:<transactionID>`: its CertPolls are signed by the
/// current certificate (the emulator insists on the key that signed the RenewalReq).
#[test]
fn scep_a_pending_renewal_is_polled_under_the_current_certificate() {
    let env = Env::with_config(Ca::Scep, "rsa2048", |c| c["ca"]["poll_wait_s"] = 2.into());
    env.expect(&["enroll"], 0);
    let before = env.identity();
    env.emu.set_scep_pending_polls(1_000_000);
    env.expect(&["renew", "--force"], 75);
    assert_eq!(env.identity(), before, "the old identity stays in force while the renewal waits");
    let id = env.status_json()["pending"]["request_id"].as_str().unwrap().to_string();
    let tid = id.strip_prefix("scep-renewal:").unwrap_or_else(|| panic!("a RenewalReq: {id}")).to_string();
    assert_eq!(env.emu.scep_requests(scep::RENEWAL_REQ), 1);

    env.emu.set_scep_pending_polls(0);
    let run = env.expect(&["renew", "--force"], 0);
    assert!(run.stderr.contains(&format!("resuming request {id}")), "{run:?}");
    assert_eq!(env.emu.scep_requests(scep::RENEWAL_REQ), 1, "no second RenewalReq");
    let last = env.emu.scep_messages().pop().unwrap();
    assert_eq!(
        (last.message_type, last.transaction_id, last.status),
        (scep::CERT_POLL, tid, Some(scep::SUCCESS))
    );
    assert_ne!(env.identity(), before);
    assert_eq!(env.status_json()["renewals"], 1);
    env.assert_chain_verifies();
}

/// A wrong challenge password is a FAILURE with failInfo badRequest: 77 naming it, nothing
/// installed on a first enrollment, and an installed identity untouched by a forced one.
#[test]
fn scep_a_wrong_challenge_is_a_bad_request_refusal_that_changes_nothing() {
    let env = Env::new(Ca::Scep, "rsa2048");
    let challenge = env.dir().join("scep-challenge");
    write_secret(&challenge, "not-the-challenge");
    let run = env.expect(&["enroll"], 77);
    assert!(run.stderr.contains("FAILURE, badRequest"), "{run:?}");
    assert!(fs::symlink_metadata(env.current()).is_err(), "nothing was installed");
    let status = env.status_json();
    assert_eq!(status["state"], "none", "{status}");
    assert_eq!(status["pending"], Value::Null, "a refusal ends the request: {status}");
    assert!(status["last_error"].as_str().unwrap().contains("badRequest"), "{status}");
    let answer = env.emu.scep_messages().pop().unwrap();
    assert_eq!((answer.message_type, answer.status, answer.fail_info), (scep::PKCS_REQ, Some(2), Some(2)));
    assert!(env.emu.issued().is_empty(), "the CA issued nothing");

    write_secret(&challenge, &env.emu.scep.challenge);
    env.expect(&["enroll"], 0);
    let before = env.identity();
    write_secret(&challenge, "not-the-challenge");
    let run = env.expect(&["enroll", "--force"], 77);
    assert!(run.stderr.contains("FAILURE, badRequest"), "{run:?}");
    assert_eq!(env.identity(), before, "the installed identity is untouched");
    let status = env.status_json();
    assert_eq!(status["state"], "valid", "{status}");
    assert!(status["last_error"].as_str().unwrap().contains("badRequest"), "{status}");
    assert_eq!(env.emu.issued().len(), 1);
}
