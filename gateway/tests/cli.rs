//! The command line (design.md §2, §9): exit codes, error lines that name the field, `check`,
//! and the server's lifecycle: certificate reload, drain on shutdown, handshake timeout.

mod common;

use common::{b64, Behaviour, Ca, Call, Env};
use rcgen::{DnType, KeyPair, SanType};
use std::io::Read;
use std::time::Duration;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_enroll-gateway"))
        .args(args)
        .env_remove("ENROLL_GATEWAY_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn edit(env: &Env, f: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&env.config_file).unwrap()).unwrap();
    f(&mut v);
    let p = env.path().join(format!("edited-{}.json", std::process::id()));
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_the_field_and_exit_78() {
    let env = Env::start(|_| {}).await;
    let bad = edit(&env, |v| v["labels"]["meters"]["policy"]["san_dsn"] = serde_json::json!([]));
    let (code, _, err) = run(&["-c", &bad, "check"], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.starts_with("error: config labels.meters.policy.san_dsn: unknown field `san_dsn`"), "{err}");
    let bad = edit(&env, |v| v["default_label"] = "nope".into());
    let (code, _, err) = run(&["-c", &bad, "device", "list"], &[]);
    assert_eq!((code, err.lines().count()), (78, 1), "{err}");
    assert!(err.contains("default_label"));
    // A password file others can read is refused.
    let pw = common::write(env.path(), "pw", "secret");
    let bad = edit(
        &env,
        |v| v["database"] = serde_json::json!({ "url": "postgres://gw@127.0.0.1:1/db", "password_file": pw.display().to_string() }),
    );
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, _, err) = run(&["-c", &bad, "check"], &[]);
    assert_eq!(code, 78);
    assert!(err.contains("database.password_file") && err.contains("0600"), "{err}");
    assert!(!err.contains("secret"));
    // The config comes from ENROLL_GATEWAY_CONFIG when -c is not given.
    let (code, _, err) = run(&["check"], &[("ENROLL_GATEWAY_CONFIG", "/nonexistent/gw.json")]);
    assert_eq!(code, 78);
    assert!(err.contains("/nonexistent/gw.json"), "{err}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_64() {
    let env = Env::start(|_| {}).await;
    let c = env.config_file.display().to_string();
    assert_eq!(run(&["-c", &c, "frobnicate"], &[]).0, 64);
    assert_eq!(run(&["-c", &c, "token", "create", "--label", "meters"], &[]).0, 64);
    assert_eq!(run(&["--help"], &[]).0, 0);
    let (code, _, err) = run(&["-c", &c, "token", "create", "--label", "nope", "--device", "d"], &[]);
    assert_eq!(code, 64, "{err}");
    let no_tokens = edit(&env, |v| v["labels"]["meters"]["bootstrap"]["tokens"] = false.into());
    let (code, _, err) =
        run(&["-c", &no_tokens, "token", "create", "--label", "meters", "--device", "d"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("bootstrap.tokens"));
    let (code, _, _) = run(&["-c", &c, "audit", "--since", "yesterday"], &[]);
    assert_eq!(code, 64);
    let (code, _, err) = run(&["-c", &c, "device", "show", "nobody"], &[]);
    assert_eq!(code, 64, "{err}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_schema_and_unusable_upstreams() {
    let env = Env::start(|_| {}).await;
    let (code, out, err) = env.cli(&["check"]);
    assert!(out.contains("schema version 1 of 1"), "{out}");
    // The harness's label forwards to an in-process test upstream, which no config can name.
    assert_eq!(code, 78);
    assert!(err.contains("labels.meters.ca.backend: \"test\" cannot be a gateway upstream"), "{err}");
    let fresh =
        edit(&env, |v| v["database"]["url"] = format!("sqlite://{}/fresh.db", env.path().display()).into());
    let (_, out, _) = run(&["-c", &fresh, "check"], &[]);
    assert!(out.contains("schema version 0 of 1 (serve applies the missing migrations)"), "{out}");
    let (code, _, err) = run(&["-c", &fresh, "token", "create", "--label", "meters", "--device", "d"], &[]);
    assert_eq!(code, 74, "admin commands need a migrated database: {err}");
    let (code, _, err) = run(&["-c", &fresh, "serve"], &[]);
    assert_eq!(code, 78);
    assert!(err.contains("cannot be a gateway upstream"), "{err}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_server_certificate_for_new_connections() {
    let env = Env::start(|_| {}).await;
    let cacerts = Call { path: "/.well-known/est/cacerts", basic: None, cert: None, body: None };
    assert_eq!(env.call(cacerts).await.status, 200);
    let new_ca = Ca::new("New Server CA");
    let key = KeyPair::generate().unwrap();
    let leaf = new_ca.leaf(
        &key,
        &[(DnType::CommonName, "gw")],
        vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
        false,
    );
    std::fs::write(env.path().join("server.pem"), leaf.pem()).unwrap();
    std::fs::write(env.path().join("server.key"), key.serialize_pem()).unwrap();
    env.running.as_ref().unwrap().reload_tls().unwrap();
    let cacerts = Call { path: "/.well-known/est/cacerts", basic: None, cert: None, body: None };
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&env.server_ca_file)
        .arg(format!("{}{}", env.base, cacerts.path))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the old CA no longer verifies the server");
    std::fs::write(&env.server_ca_file, new_ca.cert.pem()).unwrap();
    assert_eq!(env.call(cacerts).await.status, 200);
    // A broken key file keeps the old certificate.
    std::fs::write(env.path().join("server.key"), "garbage").unwrap();
    assert!(env.running.as_ref().unwrap().reload_tls().is_err());
    let cacerts = Call { path: "/.well-known/est/cacerts", basic: None, cert: None, body: None };
    assert_eq!(env.call(cacerts).await.status, 200);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_a_request_in_flight() {
    let mut env = Env::start(|_| {}).await;
    env.up.set(Behaviour { delay_ms: 1500, ..Default::default() });
    let dev = env.device("dev-1");
    let token = env.token("dev-1");
    let body = b64(&dev.csr("dev-1", &[]));
    let running = env.running.take().unwrap();
    let (r, ()) = tokio::join!(
        env.call(Call {
            path: "/.well-known/est/meters/simpleenroll",
            basic: Some(("dev-1", &token)),
            cert: None,
            body: Some(&body)
        }),
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            running.shutdown().await;
        }
    );
    assert_eq!(r.status, 200, "the request in flight finished: {}", r.text());
    // And nothing listens any more.
    assert!(std::net::TcpStream::connect(env.base.trim_start_matches("https://")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_cut_off() {
    let env = Env::start(|c| c["limits"]["request_timeout_s"] = 1.into()).await;
    let addr = env.base.trim_start_matches("https://").to_string();
    let started = std::time::Instant::now();
    let n = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        s.read(&mut buf).unwrap_or(0)
    })
    .await
    .unwrap();
    assert_eq!(n, 0, "the server closed the connection");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_and_max_connections_holds_others_back() {
    let env = Env::start(|c| {
        c["limits"]["request_timeout_s"] = 2.into();
        c["limits"]["max_connections"] = 1.into();
    })
    .await;
    // One connection that says nothing holds the only slot until its handshake times out.
    let addr = env.base.trim_start_matches("https://").to_string();
    let staller = std::net::TcpStream::connect(&addr).unwrap();
    let started = std::time::Instant::now();
    let r = env.call(Call { path: "/.well-known/est/cacerts", basic: None, cert: None, body: None }).await;
    assert_eq!(r.status, 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "served after the stalled connection was cut off: {waited:?}"
    );
    drop(staller);
    // A body that trickles in slower than the timeout allows.
    let token = env.token("dev-1");
    let f = common::write(env.path(), "slow.b64", vec![b'A'; 400]);
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--limit-rate",
            "50",
            "--max-time",
            "20",
            "--cacert",
        ])
        .arg(&env.server_ca_file)
        .arg("-u")
        .arg(format!("dev-1:{token}"))
        .arg("--data-binary")
        .arg(format!("@{}", f.display()))
        .arg(format!("{}/.well-known/est/simpleenroll", env.base))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "408", "{}", String::from_utf8_lossy(&out.stderr));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start(|c| c["limits"]["request_timeout_s"] = 1.into()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(env.server_ca.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(env.base.trim_start_matches("https://")).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: gw\r\n\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the idle connection was not closed");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(5));
    env.stop().await;
}
