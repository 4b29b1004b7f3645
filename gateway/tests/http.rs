//! The gateway over real TLS on 127.0.0.1 with curl (OpenSSL) as the client and openssl reading
//! the PKCS#7 answers: cacerts, Basic/token and factory-certificate enrollment, re-enrollment
//! with the current certificate, the policy refusals (each with an audit row and nothing
//! issued), quota, limits, pending and polling, and the once-only upstream submission.

mod common;

use common::{b64, cert_spki, Behaviour, Call, Env};
use rcgen::{DnType, SanType};
use std::time::Duration;

const ENROLL: &str = "/.well-known/est/meters/simpleenroll";
const REENROLL: &str = "/.well-known/est/meters/simplereenroll";

/// The audit rows of one device.
async fn audit_of(env: &Env, who: &str) -> Vec<enroll_gateway::store::AuditRow> {
    env.audit().await.into_iter().filter(|a| a.who == who && a.peer != "cli").collect()
}

/// A refusal: 403, one line of text/plain naming `words`, an audit row saying so, nothing issued.
async fn assert_refused(env: &Env, r: &common::Resp, who: &str, words: &str) {
    assert_eq!(r.status, 403, "body: {}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(r.text().trim_end().lines().count(), 1);
    assert!(r.text().contains(words), "{:?} does not say {words:?}", r.text());
    let rows = audit_of(env, who).await;
    let last = rows.last().expect("an audit row");
    assert_eq!(last.outcome, "refused");
    assert!(last.reason.as_deref().unwrap().contains(words));
    assert!(env.store().certificates_of(who).await.unwrap().is_empty(), "nothing issued to {who}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cacerts_is_unwrapped_base64_pkcs7_or_wrapped_per_label() {
    let env = Env::start(|_| {}).await;
    for path in ["/.well-known/est/cacerts", "/.well-known/est/meters/cacerts"] {
        let r = env.call(Call { path, basic: None, cert: None, body: None }).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/pkcs7-mime; smime-type=certs-only"));
        assert_eq!(r.header("content-transfer-encoding"), Some("base64"));
        assert!(!r.body.contains(&b'\n'), "unwrapped by default");
        assert_eq!(r.certs(), vec![env.up.ca.cert.der().to_vec()]);
    }
    let r = env
        .call(Call { path: "/.well-known/est/wrapped/cacerts", basic: None, cert: None, body: None })
        .await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.lines().count() > 1 && text.lines().all(|l| l.len() <= 76));
    assert_eq!(r.certs(), vec![env.up.ca.cert.der().to_vec()]);
    let r =
        env.call(Call { path: "/.well-known/est/nosuch/cacerts", basic: None, cert: None, body: None }).await;
    assert_eq!(r.status, 404);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_enrolls_once_identical_retry_gets_the_same_certificate() {
    let env = Env::start(|_| {}).await;
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let csr = dev.csr("dev-1", &[&dev.san()]);
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/pkcs7-mime; smime-type=certs-only"));
    assert_eq!(r.header("content-transfer-encoding"), Some("base64"));
    let certs = r.certs();
    assert_eq!(certs.len(), 1, "the answer holds only the issued certificate");
    assert_eq!(cert_spki(&certs[0]), dev.key.public_key_der(), "it carries the CSR's key");
    // An identical retry (the answer was lost): the same certificate, no second submission.
    let again = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.certs(), certs);
    assert_eq!(env.up.submits(), 1);
    // The same token with another CSR: refused, and not forwarded.
    let csr2 = dev.csr("dev-1", &[]);
    let r = env.enroll_basic("dev-1", &token, &csr2).await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("token"));
    assert_eq!(env.up.submits(), 1);
    // Another device cannot use it either.
    let other = env.device("dev-2");
    let r = env.enroll_basic("dev-2", &token, &other.csr("dev-2", &[])).await;
    assert_eq!(r.status, 403);
    let outcomes: Vec<String> = audit_of(&env, "dev-1").await.into_iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, ["issued", "reissued", "refused"]);
    assert_eq!(env.store().certificates_of("dev-1").await.unwrap().len(), 1);
    // device list / show see it.
    let (code, out, _) = env.cli(&["device", "show", "dev-1", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["certificates"][0]["upstream_ref"], "cert-1000");
    let (code, out, _) = env.cli(&["device", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("dev-1"));
    let (code, out, _) = env.cli(&["audit", "--json", "--since", "2000-01-01T00:00:00Z"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"reissued\""));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_get_401_with_the_basic_challenge() {
    let env = Env::start(|_| {}).await;
    let dev = env.device("dev-1");
    let body = b64(&dev.csr("dev-1", &[]));
    let r = env.call(Call { path: ENROLL, basic: None, cert: None, body: Some(&body) }).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"enroll-gateway\""));
    assert_eq!(audit_of(&env, "-").await.last().unwrap().outcome, "unauthenticated");
    // A wrong token is refused before the policy is looked at (the CN is wrong too).
    let r = env.enroll_basic("dev-1", "0123456789abcdef", &dev.csr("someone-else", &[])).await;
    assert_refused(&env, &r, "dev-1", "token").await;
    assert_eq!(env.up.submits(), 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let env = Env::start(|_| {}).await;
    let dev = env.device("dev-1");
    let token = env.token_ttl("dev-1", 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = env.enroll_basic("dev-1", &token, &dev.csr("dev-1", &[])).await;
    assert_refused(&env, &r, "dev-1", "token").await;
    assert_eq!(env.up.submits(), 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refusals_keep_the_token_and_issue_nothing() {
    let env = Env::start(|_| {}).await;
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    // Subject CN must be the device id.
    let r = env.enroll_basic("dev-1", &token, &dev.csr("dev-9", &[])).await;
    assert_refused(&env, &r, "dev-1", "CN").await;
    // DNS SANs only from policy.san_dns.
    let r = env.enroll_basic("dev-1", &token, &dev.csr("dev-1", &["evil.example"])).await;
    assert_refused(&env, &r, "dev-1", "evil.example").await;
    let r = env.enroll_basic("dev-1", &token, &dev.csr("dev-1", &["dev-2.meters.example"])).await;
    assert_refused(&env, &r, "dev-1", "dev-2.meters.example").await;
    // No other SAN types.
    let ip =
        dev.csr_with(&[(DnType::CommonName, "dev-1")], vec![SanType::IpAddress("10.0.0.1".parse().unwrap())]);
    let r = env.enroll_basic("dev-1", &token, &ip).await;
    assert_refused(&env, &r, "dev-1", "IP address").await;
    // A CSR whose signature is broken.
    let mut bad = dev.csr("dev-1", &[]);
    let n = bad.len();
    bad[n - 5] ^= 0x55;
    let r = env.enroll_basic("dev-1", &token, &bad).await;
    assert_refused(&env, &r, "dev-1", "signature").await;
    // Not a CSR at all.
    let r = env.enroll_basic("dev-1", &token, b"hello").await;
    assert_eq!(r.status, 400);
    assert_eq!(env.up.submits(), 0, "no refused CSR reached the CA");
    // The token was not spent on the refusals.
    let r = env.enroll_basic("dev-1", &token, &dev.csr("dev-1", &[&dev.san()])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factory_certificate_enrolls_and_current_certificate_renews() {
    let env = Env::start(|_| {}).await;
    let dev = env.device("SN0042");
    let factory_cert = env.factory.leaf(
        &dev.key,
        &[(DnType::CommonName, "Acme meter"), (DnType::CustomDnType(vec![2, 5, 4, 5]), "SN0042")],
        vec![],
        false,
    );
    let factory_file = env.cert_file(&factory_cert);
    let csr = dev.csr("SN0042", &[&dev.san()]);
    let r = env
        .call(Call {
            path: "/.well-known/est/simpleenroll",
            basic: None,
            cert: Some((&factory_file, &dev.key_file)),
            body: Some(&b64(&csr)),
        })
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let cert = r.certs().remove(0);
    let cert_file = env.cert_der_file(&cert);

    // The factory certificate does not renew.
    let r = env
        .call(Call {
            path: REENROLL,
            basic: None,
            cert: Some((&factory_file, &dev.key_file)),
            body: Some(&b64(&csr)),
        })
        .await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("not a current certificate of this label's CA"), "{}", r.text());
    let last = env.audit().await.pop().unwrap();
    assert_eq!((last.who.as_str(), last.outcome.as_str()), ("cert CN=Acme meter", "refused"));

    // Renewal with a new key and the same subject and SANs.
    let new = env.device("SN0042");
    let csr2 = new.csr("SN0042", &[&dev.san()]);
    let r = env
        .call(Call {
            path: REENROLL,
            basic: None,
            cert: Some((&cert_file, &dev.key_file)),
            body: Some(&b64(&csr2)),
        })
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(cert_spki(&r.certs()[0]), new.key.public_key_der());
    assert_eq!(
        *env.up.renewals.lock().unwrap(),
        vec![Some("cert-1000".to_string())],
        "renewal names the vendor reference"
    );

    // A CSR whose subject differs from the certificate's.
    let csr3 = new.csr_with(
        &[(DnType::CommonName, "SN0042"), (DnType::OrganizationName, "Other")],
        vec![SanType::DnsName(dev.san().try_into().unwrap())],
    );
    let r = env
        .call(Call {
            path: REENROLL,
            basic: None,
            cert: Some((&cert_file, &dev.key_file)),
            body: Some(&b64(&csr3)),
        })
        .await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("must equal the client certificate"));
    // Without SANs: also different.
    let r = env
        .call(Call {
            path: REENROLL,
            basic: None,
            cert: Some((&cert_file, &dev.key_file)),
            body: Some(&b64(&new.csr("SN0042", &[]))),
        })
        .await;
    assert_eq!(r.status, 403);
    // Without a client certificate.
    let r = env.call(Call { path: REENROLL, basic: None, cert: None, body: Some(&b64(&csr2)) }).await;
    assert_eq!(r.status, 403);
    // An expired certificate of the label's CA, or one of another CA: 403 with the reason.
    let expired = env.up.ca.leaf(
        &dev.key,
        &[(DnType::CommonName, "SN0042")],
        vec![SanType::DnsName(dev.san().try_into().unwrap())],
        true,
    );
    let expired_file = env.cert_file(&expired);
    let r = env
        .call(Call {
            path: REENROLL,
            basic: None,
            cert: Some((&expired_file, &dev.key_file)),
            body: Some(&b64(&csr2)),
        })
        .await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("expired"), "{}", r.text());
    let last = env.audit().await.pop().unwrap();
    assert_eq!((last.who.as_str(), last.outcome.as_str()), ("cert CN=SN0042", "refused"));
    let stranger =
        common::Ca::new("Stranger CA").leaf(&dev.key, &[(DnType::CommonName, "SN0042")], vec![], false);
    let stranger_file = env.cert_file(&stranger);
    let r = env
        .call(Call {
            path: REENROLL,
            basic: None,
            cert: Some((&stranger_file, &dev.key_file)),
            body: Some(&b64(&csr2)),
        })
        .await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("UnknownIssuer"), "{}", r.text());
    // A certificate whose key the client does not hold fails the TLS handshake itself.
    let other = env.device("SN0042");
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--cacert"])
        .arg(&env.server_ca_file)
        .arg("--cert")
        .arg(&cert_file)
        .arg("--key")
        .arg(&other.key_file)
        .arg(format!("{}{REENROLL}", env.base))
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Revoked: no renewal.
    let (code, out, err) = env.cli(&["device", "revoke", "SN0042"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"));
    let csr4 = env.device("SN0042").csr("SN0042", &[&dev.san()]);
    let r = env
        .call(Call {
            path: REENROLL,
            basic: None,
            cert: Some((&cert_file, &dev.key_file)),
            body: Some(&b64(&csr4)),
        })
        .await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("revoked"));
    let last = audit_of(&env, "SN0042").await.pop().unwrap();
    assert_eq!((last.operation.as_str(), last.outcome.as_str()), ("simplereenroll", "refused"));
    assert_eq!(env.up.submits(), 2, "only the factory enrollment and the one renewal reached the CA");
    assert_eq!(env.store().certificates_of("SN0042").await.unwrap().len(), 2);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_per_device_per_day() {
    let env = Env::start(|c| c["labels"]["meters"]["policy"]["max_per_device_per_day"] = 2.into()).await;
    let dev = env.device("dev-1");
    for _ in 0..2 {
        let token = env.token("dev-1");
        let r = env.enroll_basic("dev-1", &token, &env.device("dev-1").csr("dev-1", &[])).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let token = env.token("dev-1");
    let r = env.enroll_basic("dev-1", &token, &dev.csr("dev-1", &[])).await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("max_per_device_per_day"));
    assert_eq!(env.up.submits(), 2);
    assert_eq!(env.store().certificates_of("dev-1").await.unwrap().len(), 2);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413() {
    let env = Env::start(|_| {}).await;
    let token = env.token("dev-1");
    let big = vec![b'A'; 20_000];
    let r =
        env.call(Call { path: ENROLL, basic: Some(("dev-1", &token)), cert: None, body: Some(&big) }).await;
    assert_eq!(r.status, 413);
    assert_eq!(env.up.submits(), 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_answers_202_with_retry_after_then_the_retry_issues() {
    let env = Env::start(|_| {}).await;
    env.up.set(Behaviour { pending_polls: 2, ..Default::default() });
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let csr = dev.csr("dev-1", &[]);
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.header("retry-after"), Some("1"));
    let metrics = || {
        let out = std::process::Command::new("curl")
            .args(["-sS"])
            .arg(format!("{}/metrics", env.admin))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(metrics().contains("enroll_gateway_pending_requests 1"), "{}", metrics());
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 202, "first poll: still pending");
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(cert_spki(&r.certs()[0]), dev.key.public_key_der());
    assert_eq!(env.up.submits(), 1);
    assert_eq!(env.up.polls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let rows = audit_of(&env, "dev-1").await;
    assert_eq!(rows.iter().map(|a| a.outcome.as_str()).collect::<Vec<_>>(), ["pending", "pending", "issued"]);
    assert!(rows[0].upstream_ref.as_deref().unwrap().starts_with("req-"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identical_requests_at_once_reach_the_ca_once() {
    let env = Env::start(|_| {}).await;
    env.up.set(Behaviour { delay_ms: 1500, ..Default::default() });
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let csr = dev.csr("dev-1", &[]);
    let (a, b) = tokio::join!(env.enroll_basic("dev-1", &token, &csr), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.enroll_basic("dev-1", &token, &csr).await
    });
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 202], "one issues, the other is told to retry");
    let loser = if a.status == 202 { &a } else { &b };
    assert!(loser.header("retry-after").is_some());
    assert_eq!(env.up.submits(), 1);
    let winner = if a.status == 200 { &a } else { &b };
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.certs(), winner.certs());
    assert_eq!(env.up.submits(), 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_refusal_unavailability_and_a_wrong_certificate() {
    let env = Env::start(|_| {}).await;
    // Refused: 403 with the vendor's words; the retry is answered from the record.
    env.up
        .set(Behaviour { refuse: Some("Device not registered in product P1".into()), ..Default::default() });
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let csr = dev.csr("dev-1", &[]);
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("Device not registered in product P1"));
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 403);
    assert_eq!(env.up.submits(), 1);
    assert_eq!(audit_of(&env, "dev-1").await.last().unwrap().outcome, "vendor-refused");

    // Unavailable: 503 + Retry-After; the vendor did not take it, so the retry submits.
    env.up.set(Behaviour { unavailable: Some(7), ..Default::default() });
    let dev2 = env.device("dev-2");
    let token2 = env.token("dev-2");
    let csr2 = dev2.csr("dev-2", &[]);
    let r = env.enroll_basic("dev-2", &token2, &csr2).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("7"));
    env.up.set(Behaviour::default());
    let r = env.enroll_basic("dev-2", &token2, &csr2).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(env.up.submits(), 3);

    // A certificate for another key: 502, audited, not stored, not given out.
    env.up.set(Behaviour { wrong_key: true, ..Default::default() });
    let dev3 = env.device("dev-3");
    let token3 = env.token("dev-3");
    let r = env.enroll_basic("dev-3", &token3, &dev3.csr("dev-3", &[])).await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("public key"));
    let out = std::process::Command::new("curl")
        .args(["-sS"])
        .arg(format!("{}/metrics", env.admin))
        .output()
        .unwrap();
    let m = String::from_utf8_lossy(&out.stdout);
    for kind in ["refused", "unavailable", "protocol"] {
        assert!(
            m.contains(&format!(
                "enroll_gateway_upstream_errors_total{{label=\"meters\",kind=\"{kind}\"}} 1"
            )),
            "{m}"
        );
    }
    let last = audit_of(&env, "dev-3").await.pop().unwrap();
    assert_eq!(last.outcome, "upstream-error");
    assert!(env.store().certificates_of("dev-3").await.unwrap().is_empty());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_metrics_health_ready() {
    let env = Env::start(|_| {}).await;
    let get = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}"])
            .arg(format!("{}{path}", env.admin))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(get("/healthz").ends_with("200"));
    assert!(get("/readyz").ends_with("200"));
    env.call(Call { path: "/.well-known/est/cacerts", basic: None, cert: None, body: None }).await;
    let m = get("/metrics");
    assert!(
        m.contains("enroll_gateway_requests_total{label=\"meters\",operation=\"cacerts\",outcome=\"ok\"} 1"),
        "{m}"
    );
    assert!(m.contains("enroll_gateway_request_duration_seconds_bucket"));
    assert!(m.contains("enroll_gateway_pending_requests 0"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_interrupted_by_a_dead_replica_is_reported_not_resubmitted() {
    let env = Env::start(|_| {}).await;
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let csr = dev.csr("dev-1", &[]);
    let sha = enroll_gateway::pki::sha256_hex(&csr);
    // A replica claimed this CSR 20 minutes ago and died during the vendor call.
    let then = time::OffsetDateTime::now_utc().unix_timestamp() - 1200;
    assert!(env.store().request_claim("meters", &sha, "dev-1", "simpleenroll", then).await.unwrap());
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("3600"));
    assert!(r.text().contains("interrupted"), "{}", r.text());
    assert_eq!(audit_of(&env, "dev-1").await.pop().unwrap().outcome, "stuck");
    assert_eq!(env.up.submits(), 0, "never resubmitted");
    // A fresh claim (another replica is calling the vendor right now) is a 202.
    let csr2 = env.device("dev-1").csr("dev-1", &[]);
    let sha2 = enroll_gateway::pki::sha256_hex(&csr2);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(env.store().request_claim("meters", &sha2, "dev-1", "simpleenroll", now).await.unwrap());
    let r = env.enroll_basic("dev-1", &env.token("dev-1"), &csr2).await;
    assert_eq!(r.status, 202);
    assert_eq!(env.up.submits(), 0);
    env.stop().await;
}

/// A replica killed during the vendor call leaves the claim `submitting`: after the stale bound
/// the device hears 503 "stuck" (never a second submission), `request stuck` lists it, and
/// `request release` lets the device's next identical request through, recorded in the audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_submission_is_listed_and_released_by_the_operator_only() {
    let env = Env::start(|_| {}).await;
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let csr = dev.csr("dev-1", &[&dev.san()]);
    let sha = enroll_gateway::pki::sha256_hex(&csr);
    let long_ago = time::OffsetDateTime::now_utc().unix_timestamp() - 3_600;
    assert!(env.store().request_claim("meters", &sha, "dev-1", "simpleenroll", long_ago).await.unwrap());

    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains(&format!("request release --label meters --csr {sha}")), "{}", r.text());
    assert_eq!(env.up.submits(), 0, "a stuck submission is never sent again by itself");

    let (code, out, err) = env.cli(&["request", "stuck", "--json"]);
    assert_eq!(code, 0, "{err}");
    let stuck: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stuck[0]["csr_sha256"], sha.as_str());
    assert_eq!(stuck[0]["device"], "dev-1");

    // A fresh claim (a replica may still be calling the vendor) cannot be released.
    let fresh = dev.csr("dev-1", &[]);
    let fresh_sha = enroll_gateway::pki::sha256_hex(&fresh);
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(env.store().request_claim("meters", &fresh_sha, "dev-1", "simpleenroll", t).await.unwrap());
    let (code, _, err) = env.cli(&["request", "release", "--label", "meters", "--csr", &fresh_sha]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("no stuck request"), "{err}");
    let (code, _, err) = env.cli(&["request", "release", "--label", "meters", "--csr", "xyz"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--csr"), "{err}");

    let (code, out, err) = env.cli(&["request", "release", "--label", "meters", "--csr", &sha]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("released"), "{out}");
    let r = env.enroll_basic("dev-1", &token, &csr).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(env.up.submits(), 1);
    let releases: Vec<(String, String)> = env
        .audit()
        .await
        .into_iter()
        .filter(|a| a.operation == "request-release")
        .map(|a| (a.outcome, a.reason.unwrap_or_default()))
        .collect();
    assert_eq!(releases, [("released".to_string(), format!("csr {sha}"))]);
    let outcomes: Vec<String> = audit_of(&env, "dev-1").await.into_iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, ["stuck", "issued"]);
    env.stop().await;
}

/// A token is bound to its label as well as its device: a `meters` token is refused at the
/// `wrapped` label (both accept tokens), with nothing forwarded, and still works at `meters`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_label_is_refused() {
    let env = Env::start(|_| {}).await;
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let csr = dev.csr("dev-1", &[]);
    let r = env
        .call(common::Call {
            path: "/.well-known/est/wrapped/simpleenroll",
            basic: Some(("dev-1", &token)),
            cert: None,
            body: Some(&b64(&csr)),
        })
        .await;
    assert_refused(&env, &r, "dev-1", "token").await;
    assert_eq!(env.up.submits(), 0);
    let r = env.enroll_basic("dev-1", &token, &dev.csr("dev-1", &[&dev.san()])).await;
    assert_eq!(r.status, 200, "the refusal did not use the token up: {}", r.text());
    env.stop().await;
}
