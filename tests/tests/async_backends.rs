//! Asynchronous CAs (design.md §5 rule 4, §7 "Lifecycle"): Sectigo collect and Securosys
//! approvals are recorded before waiting, resumed after a restart (even SIGKILL) with the same
//! request and key, abandoned at `poll_timeout_s`, and ended by the CA's terminal answers.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{Ca, Env};
use enroll_tests::Fault;
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
    // The new request still passes through APPROVED: give this run time to see it executed.
    env.edit_config(|c| c["ca"]["poll_wait_s"] = 10.into());
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
