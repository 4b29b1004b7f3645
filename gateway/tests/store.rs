//! The store contract, run against SQLite and a real PostgreSQL: one-winner token consumption
//! and request claims under concurrency, certificates, devices, audit, schema versions.

mod common;

use enroll_gateway::config::Database;
use enroll_gateway::store::{AuditRow, IssuedRecord, State, Store};

async fn sqlite() -> Option<(Store, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/s.db?mode=rwc", dir.path().display());
    Some((Store::open(&Database::new(&url)).await.unwrap(), dir))
}

/// `None` (a loud skip) where PostgreSQL is not installed, outside CI.
async fn postgres() -> Option<(Store, ())> {
    if !common::pg::installed("store on PostgreSQL") {
        return None;
    }
    let url = common::pg::fresh_db();
    Some((Store::open(&Database::new(&url)).await.unwrap(), ()))
}

fn record(label: &str, device: &str, csr: &str, cert_sha: &str, issued_at: i64) -> IssuedRecord {
    IssuedRecord {
        label: label.into(),
        device: device.into(),
        serial: "0a1b".into(),
        not_before: issued_at - 60,
        not_after: issued_at + 86_400,
        upstream_ref: Some("cert-1".into()),
        csr_sha256: csr.into(),
        cert_sha256: cert_sha.into(),
        cert_der: vec![0x30, 0x03, 0x02, 0x01, 0x00, 0xff],
        issued_at,
    }
}

macro_rules! store_suite {
    ($($backend:ident),*) => { $( mod $backend {
        use super::*;

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn schema_version_before_and_after_migrate() {
            let Some((s, _g)) = super::$backend().await else { return };
            let (have, want) = s.schema_version().await.unwrap();
            assert_eq!((have, want), (0, 1));
            s.migrate().await.unwrap();
            s.migrate().await.unwrap(); // idempotent
            assert_eq!(s.schema_version().await.unwrap(), (1, 1));
            s.ping().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_token_is_consumed_by_exactly_one_csr_even_concurrently() {
            let Some((s, _g)) = super::$backend().await else { return };
            s.migrate().await.unwrap();
            s.token_create("tok", "meters", "dev1", 100, 1000).await.unwrap();
            let mut tasks = Vec::new();
            for i in 0..8 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move { s.token_consume("tok", "meters", "dev1", &format!("csr{i}"), 200).await.unwrap() }));
            }
            let mut winners = Vec::new();
            for (i, t) in tasks.into_iter().enumerate() {
                if t.await.unwrap() {
                    winners.push(i);
                }
            }
            assert_eq!(winners.len(), 1, "exactly one CSR consumes the token");
            let w = format!("csr{}", winners[0]);
            // The identical retry keeps being accepted, even after expiry; others never.
            assert!(s.token_usable("tok", "meters", "dev1", &w, 200).await.unwrap());
            assert!(s.token_consume("tok", "meters", "dev1", &w, 2000).await.unwrap());
            assert!(!s.token_consume("tok", "meters", "dev1", "other", 200).await.unwrap());
            assert!(!s.token_usable("tok", "meters", "dev1", "other", 200).await.unwrap());
            // Wrong label or device: no.
            s.token_create("tok2", "meters", "dev1", 100, 1000).await.unwrap();
            assert!(!s.token_consume("tok2", "other", "dev1", "c", 200).await.unwrap());
            assert!(!s.token_consume("tok2", "meters", "dev2", "c", 200).await.unwrap());
            // Expired and unused: no.
            assert!(!s.token_usable("tok2", "meters", "dev1", "c", 1000).await.unwrap());
            assert!(!s.token_consume("tok2", "meters", "dev1", "c", 1001).await.unwrap());
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_request_is_claimed_once_and_polled_by_one() {
            let Some((s, _g)) = super::$backend().await else { return };
            s.migrate().await.unwrap();
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move { s.request_claim("meters", "h1", "dev1", "simpleenroll", 100).await.unwrap() }));
            }
            let mut won = 0;
            for t in tasks {
                won += usize::from(t.await.unwrap());
            }
            assert_eq!(won, 1);
            let row = s.request("meters", "h1").await.unwrap().unwrap();
            assert_eq!(row.state, State::Submitting);
            assert_eq!(row.device, "dev1");
            // The same CSR under another label is another request.
            assert!(s.request_claim("other", "h1", "dev1", "simpleenroll", 100).await.unwrap());

            s.request_set("meters", "h1", State::Pending, Some("req-7"), None, Some(5), 101).await.unwrap();
            let row = s.request("meters", "h1").await.unwrap().unwrap();
            assert_eq!((row.state, row.upstream_ref.as_deref(), row.retry_after_s), (State::Pending, Some("req-7"), Some(5)));
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move { s.request_claim_poll("meters", "h1", 102, 102 - 300).await.unwrap() }));
            }
            let mut won = 0;
            for t in tasks {
                won += usize::from(t.await.unwrap());
            }
            assert_eq!(won, 1, "one poll at a time");
            // A poll claim of a replica that died becomes claimable once stale.
            assert!(!s.request_claim_poll("meters", "h1", 200, 100).await.unwrap());
            assert!(s.request_claim_poll("meters", "h1", 500, 200).await.unwrap());
            // Quota counts in-flight and issued requests, not refused ones.
            assert_eq!(s.requests_since("meters", "dev1", 0).await.unwrap(), 1);
            s.request_set("meters", "h1", State::Refused, None, Some("no"), None, 600).await.unwrap();
            assert_eq!(s.requests_since("meters", "dev1", 0).await.unwrap(), 0);
            let row = s.request("meters", "h1").await.unwrap().unwrap();
            assert_eq!(row.upstream_ref.as_deref(), Some("req-7"), "the reference survives");
            // A released claim can be claimed again.
            assert!(s.request_claim("meters", "h2", "dev1", "simpleenroll", 100).await.unwrap());
            s.request_release("meters", "h2").await.unwrap();
            assert!(s.request("meters", "h2").await.unwrap().is_none());
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn certificates_devices_and_audit_round_trip() {
            let Some((s, _g)) = super::$backend().await else { return };
            s.migrate().await.unwrap();
            assert!(s.request_claim("meters", "c1", "dev1", "simpleenroll", 100).await.unwrap());
            let rec = record("meters", "dev1", "c1", "sha-a", 150);
            s.issued(&rec, 150).await.unwrap();
            assert_eq!(s.request("meters", "c1").await.unwrap().unwrap().state, State::Issued);
            let got = s.certificate_for_csr("meters", "c1").await.unwrap().unwrap();
            assert_eq!(got.cert_der, rec.cert_der);
            assert_eq!(got.upstream_ref.as_deref(), Some("cert-1"));
            assert_eq!(s.certificate_by_hash("sha-a").await.unwrap().unwrap().device, "dev1");
            assert!(s.certificate_by_hash("sha-b").await.unwrap().is_none());
            assert!(s.certificate_for_csr("other", "c1").await.unwrap().is_none());

            let devs = s.devices().await.unwrap();
            assert_eq!(devs.len(), 1);
            assert_eq!((devs[0].certificates, devs[0].latest_not_after, devs[0].revoked), (1, Some(150 + 86_400), false));
            assert!(!s.device_revoked("dev1").await.unwrap());
            assert!(s.device_revoke("dev1", 200).await.unwrap());
            assert!(!s.device_revoke("dev1", 201).await.unwrap());
            assert!(s.device_revoked("dev1").await.unwrap());
            assert!(s.device_revoke("never-seen", 202).await.unwrap());
            assert!(s.device_revoked("never-seen").await.unwrap());
            assert_eq!(s.certificates_of("dev1").await.unwrap().len(), 1);

            let a = AuditRow {
                at: 300,
                peer: "127.0.0.1:5".into(),
                who: "dev1".into(),
                label: "meters".into(),
                operation: "simpleenroll".into(),
                outcome: "issued".into(),
                upstream_ref: Some("cert-1".into()),
                reason: None,
            };
            s.audit(&a).await.unwrap();
            s.audit(&AuditRow { at: 400, outcome: "refused".into(), reason: Some("why".into()), upstream_ref: None, ..a.clone() }).await.unwrap();
            let all = s.audit_since(0).await.unwrap();
            assert_eq!(all.len(), 2);
            assert_eq!(all[0], a);
            let late = s.audit_since(301).await.unwrap();
            assert_eq!(late.len(), 1);
            assert_eq!(late[0].reason.as_deref(), Some("why"));
            assert_eq!(s.pending_count().await.unwrap(), 0);
        }
    } )* };
}

store_suite!(sqlite, postgres);
