//! strongSwan's `pki` (Debian strongswan-pki + libstrongswan-extra-plugins) as an independent EST
//! client of the gateway (protocols.md §6.1a, tooling.md): `--estca`, `--est --userpass` with a
//! 202 and its polling, and `--est --cert --key` (simplereenroll). strongSwan has no label option,
//! so it uses the unlabelled path, served by `default_label`.

mod common;

use common::{Behaviour, Env};
use std::path::Path;
use std::process::Command;

fn pki(args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new("/usr/bin/pki").args(args).output().expect("run pki");
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn new_req(dir: &Path, name: &str, key_from: Option<&Path>) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = key_from.map(Path::to_path_buf).unwrap_or_else(|| dir.join(format!("{name}.key")));
    let req = dir.join(format!("{name}.der"));
    let mut args = vec!["req", "-new"];
    if key_from.is_none() {
        args.extend(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", s(&key)]);
    } else {
        args.extend(["-key", s(&key)]);
    }
    args.extend([
        "-subj",
        "/CN=swan-1",
        "-addext",
        "subjectAltName=DNS:swan-1.meters.example",
        "-outform",
        "DER",
        "-out",
        s(&req),
    ]);
    openssl(&args);
    (key, req)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strongswan_pki_estca_enroll_with_polling_and_reenroll() {
    if !Path::new("/usr/bin/pki").exists() {
        let why = "strongSwan `pki` is missing: apt-get install strongswan-pki libstrongswan-extra-plugins \
                   libstrongswan-standard-plugins (scripts/hw-deps.sh)";
        // Plain `cargo test` on a fresh machine skips loudly; CI must run it.
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let env = Env::start(|_| {}).await;
    let dir = env.path().to_path_buf();
    let url = env.base.clone();
    let caout = dir.join("est-ca.crt");
    let (ok, _, err) = tokio::task::spawn_blocking({
        let (url, tls, caout) = (url.clone(), env.server_ca_file.clone(), caout.clone());
        move || {
            pki(&[
                "--estca",
                "--url",
                &url,
                "--cacert",
                s(&tls),
                "--caout",
                s(&caout),
                "--outform",
                "pem",
                "--force",
            ])
        }
    })
    .await
    .unwrap();
    assert!(ok, "pki --estca: {err}");
    let got = std::fs::read_to_string(&caout).unwrap();
    assert_eq!(got.trim(), env.up.ca.cert.pem().trim());

    let token = env.token("swan-1");
    let (key, req) = new_req(&dir, "swan", None);
    let est = {
        let (url, tls, caout) = (url.clone(), env.server_ca_file.clone(), caout.clone());
        move |req: std::path::PathBuf, extra: Vec<String>| {
            let mut args: Vec<String> =
                ["--est", "--url", &url, "--in", s(&req), "--cacert", s(&tls), "--cacert", s(&caout)]
                    .iter()
                    .map(|a| a.to_string())
                    .collect();
            args.extend(["--outform", "pem", "--interval", "1", "--maxpolltime", "30"].map(String::from));
            args.extend(extra);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            pki(&refs)
        }
    };
    // Basic enrollment, pending once: strongSwan gets 202 + Retry-After, polls with the same CSR.
    env.up.set(Behaviour { pending_polls: 1, ..Default::default() });
    let (ok, leaf, err) = tokio::task::spawn_blocking({
        let (est, req, up) = (est.clone(), req.clone(), format!("swan-1:{token}"));
        move || est(req, vec!["--userpass".into(), up])
    })
    .await
    .unwrap();
    assert!(ok, "pki --est --userpass: {err}");
    assert_eq!(env.up.submits(), 1);
    assert_eq!(env.up.polls.load(std::sync::atomic::Ordering::SeqCst), 1);
    let leaf_file = common::write(&dir, "swan.pem", &leaf);
    let outcomes: Vec<String> = env
        .audit()
        .await
        .into_iter()
        .filter(|a| a.who == "swan-1" && a.peer != "cli")
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, ["pending", "issued"]);

    // Re-enrollment over TLS client authentication, with a new CSR of the same subject and SAN.
    env.up.set(Behaviour::default());
    let (_, req2) = new_req(&dir, "swan2", Some(&key));
    let (ok, renewed, err) = tokio::task::spawn_blocking({
        let (est, key, leaf_file) = (est.clone(), key.clone(), leaf_file.clone());
        move || est(req2, vec!["--cert".into(), s(&leaf_file).into(), "--key".into(), s(&key).into()])
    })
    .await
    .unwrap();
    assert!(ok, "pki --est --cert --key: {err}");
    assert_ne!(renewed, leaf);
    let rows = env.audit().await;
    let last = rows.last().unwrap();
    assert_eq!(
        (last.operation.as_str(), last.outcome.as_str(), last.who.as_str()),
        ("simplereenroll", "issued", "swan-1")
    );
    assert_eq!(env.up.submits(), 2);

    // A used token fails with another CSR.
    let (_, req3) = new_req(&dir, "swan3", None);
    let (ok, _, err) = tokio::task::spawn_blocking({
        let (est, up) = (est.clone(), format!("swan-1:{token}"));
        move || est(req3, vec!["--userpass".into(), up])
    })
    .await
    .unwrap();
    assert!(!ok && err.contains("403"), "{err}");
    env.stop().await;
}
