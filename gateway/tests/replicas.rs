//! Two replicas on one PostgreSQL database (design.md §9): a token works once even when both
//! receive it at the same instant, and identical requests reaching both at once are forwarded
//! upstream once; the certificate is then served by either replica.

mod common;

use common::{b64, Behaviour, Call, Env};
use std::time::Duration;

const ENROLL: &str = "/.well-known/est/meters/simpleenroll";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_at_two_replicas_reach_the_ca_once() {
    if !common::pg::installed("replicas on PostgreSQL") {
        return;
    }
    let env = Env::start_on(Some(common::pg::fresh_db()), |_| {}).await;
    let (replica, base2) = env.replica().await;
    env.up.set(Behaviour { delay_ms: 1500, ..Default::default() });
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let body = b64(&dev.csr("dev-1", &[]));
    let call = |base: String| {
        let (token, body) = (token.clone(), body.clone());
        let env = &env;
        async move {
            env.call_at(
                &base,
                Call { path: ENROLL, basic: Some(("dev-1", &token)), cert: None, body: Some(&body) },
            )
            .await
        }
    };
    let (a, b) = tokio::join!(call(env.base.clone()), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        call(base2.clone()).await
    });
    let mut st = [a.status, b.status];
    st.sort();
    assert_eq!(st, [200, 202]);
    assert_eq!(env.up.submits(), 1);
    // The retry at the other replica gets the same certificate.
    let winner = if a.status == 200 { a } else { b };
    let r = call(base2.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.certs(), winner.certs());
    let r = call(env.base.clone()).await;
    assert_eq!(r.certs(), winner.certs());
    assert_eq!(env.up.submits(), 1);
    replica.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_two_csrs_at_two_replicas_one_wins() {
    if !common::pg::installed("replicas on PostgreSQL") {
        return;
    }
    let env = Env::start_on(Some(common::pg::fresh_db()), |_| {}).await;
    let (replica, base2) = env.replica().await;
    let token = env.token("dev-1");
    let (d1, d2) = (env.device("dev-1"), env.device("dev-1"));
    let (b1, b2) = (b64(&d1.csr("dev-1", &[])), b64(&d2.csr("dev-1", &[])));
    let (a, b) = tokio::join!(
        env.call_at(
            &env.base,
            Call { path: ENROLL, basic: Some(("dev-1", &token)), cert: None, body: Some(&b1) }
        ),
        env.call_at(
            &base2,
            Call { path: ENROLL, basic: Some(("dev-1", &token)), cert: None, body: Some(&b2) }
        ),
    );
    let mut st = [a.status, b.status];
    st.sort();
    assert_eq!(st, [200, 403], "{} / {}", a.text(), b.text());
    assert_eq!(env.up.submits(), 1);
    assert_eq!(env.store().certificates_of("dev-1").await.unwrap().len(), 1);
    replica.shutdown().await;
    env.stop().await;
}
