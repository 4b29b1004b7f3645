//! Bad config, bad command lines and bad files on disk: each is a one-line error naming the field
//! or path, with its own exit code, and creates nothing.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{Ca, Env};
use serde_json::Value;

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// Runs `enroll` with a config edited by `tweak`; expects 78 and `message` on the first line.
fn config_error(ca: Ca, algorithm: &str, tweak: impl FnOnce(&mut Value), message: &str) {
    let env = Env::with_config(ca, algorithm, tweak);
    let run = env.expect(&["enroll"], 78);
    assert_eq!(first_line(&run.stderr), format!("error: {message}"), "{run:?}");
    assert!(!env.state_dir().exists(), "a config error must create nothing");
    assert!(env.issuing_calls().is_empty());
    env.assert_no_secret_in_outputs();
}

#[test]
fn unknown_keys_are_named_by_their_full_path() {
    config_error(
        Ca::Enos,
        "p256",
        |c| c["renewal"]["at_fracton"] = 0.5.into(),
        "renewal.at_fracton: unknown field",
    );
    config_error(
        Ca::Ezca,
        "rsa2048",
        |c| c["ca"]["bootstrap"]["tokenfile"] = "x".into(),
        "ca.bootstrap.tokenfile: unknown field",
    );
}

#[test]
fn missing_fields_and_wrong_types_are_named() {
    config_error(
        Ca::Enos,
        "p256",
        |c| {
            c["ca"].as_object_mut().unwrap().remove("org_id");
        },
        "ca.org_id: missing",
    );
    config_error(
        Ca::Enos,
        "p256",
        |c| c["ca"]["valid_days"] = "30".into(),
        "ca.valid_days: expected a number, found a string",
    );
    config_error(
        Ca::Enos,
        "p256",
        |c| c["subject"] = serde_json::json!({"O": "Acme"}),
        "subject.CN: missing",
    );
    config_error(Ca::Enos, "ed25519", |_| {}, r#"key.algorithm: "ed25519" is not one of "p256", "rsa2048""#);
    config_error(
        Ca::Enos,
        "p256",
        |c| c["san"]["ip"] = serde_json::json!(["10.0.0.300"]),
        r#"san.ip: "10.0.0.300" is not an IP address"#,
    );
}

#[test]
fn plain_http_is_refused_unless_explicitly_allowed() {
    config_error(
        Ca::Enos,
        "p256",
        |c| c["ca"]["api_gateway"] = "http://127.0.0.1:1".into(),
        "ca.api_gateway: plain http:// is refused; use https:// (or set tls.danger_allow_http for a lab)",
    );
}

#[test]
fn ezca_certificate_renewal_with_a_p256_key_names_both_ways_out() {
    let env = Env::new(Ca::Ezca, "p256");
    let run = env.expect(&["enroll"], 78);
    assert!(
        run.stderr.contains("set key.algorithm to \"rsa2048\", or set ca.renew_auth to \"bootstrap\""),
        "{run:?}"
    );
}

#[test]
fn providers_and_backends_not_in_this_build_say_so() {
    // Hardware providers are compiled into the test build (scripts/test.sh), not into the static
    // one: check whichever this binary lacks (scripts/static-build.sh checks the static binary).
    let version = Env::new(Ca::Enos, "p256").expect(&["--version"], 0).stdout;
    let missing = |p: &&str| !version.contains(&format!(" {p}"));
    for provider in ["pkcs11", "tpm", "redtrust"].into_iter().filter(missing) {
        config_error(
            Ca::Enos,
            "p256",
            |c| c["key"]["provider"] = provider.into(),
            &format!("key.provider: provider {provider} is not compiled into this build (cargo feature {provider})"),
        );
    }
    config_error(
        Ca::Enos,
        "p256",
        |c| c["ca"]["backend"] = "x509".into(),
        "ca.backend: \"x509\" is not one of \"enos\", \"ezca\", \"sectigo\", \"securosys\", \"est\", \"acme\", \"scep\"",
    );
    // The binary under test has every protocol (the unit test of config::check_protocol covers
    // the refusal); a build without some refuses each with 78 before reading the rest of `ca`.
    let protocols = version.lines().find_map(|l| l.strip_prefix("protocols: ")).expect("a protocols: line");
    for protocol in ["enos", "ezca", "sectigo", "securosys", "est", "acme", "scep"] {
        if !protocols.split_whitespace().any(|w| w == protocol) {
            config_error(
                Ca::Enos,
                "p256",
                |c| c["ca"]["backend"] = protocol.into(),
                &format!(
                    "ca.backend: {protocol:?} is not compiled into this build (cargo feature {protocol})"
                ),
            );
        }
    }
}

/// An EST `ca` block with a factory certificate and key (written to `dir`), edited by `tweak`.
fn est_config(dir: &std::path::Path, tweak: impl FnOnce(&mut Value)) -> impl FnOnce(&mut Value) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["factory-0042".to_string()]).unwrap().self_signed(&key).unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    fs::write(dir.join("idevid.pem"), cert.pem()).unwrap();
    common::write_secret(&dir.join("idevid.key"), key.serialize_pem().trim_end());
    common::write_secret(&dir.join("other.key"), other.serialize_pem().trim_end());
    common::write_secret(&dir.join("est-password"), "one-time-0042");
    let dir = dir.to_path_buf();
    move |c: &mut Value| {
        let url = c["ca"]["api_gateway"].clone();
        c["ca"] = serde_json::json!({
            "backend": "est",
            "url": url,
            "label": "meters",
            "bootstrap": { "cert_file": dir.join("idevid.pem"), "key_file": dir.join("idevid.key") }
        });
        tweak(c);
    }
}

#[test]
fn est_fields_are_checked_by_path() {
    let scratch = common::Scratch::new("est-config");
    let dir = scratch.0.clone();
    let est = |tweak: fn(&mut Value, &std::path::Path)| {
        let dir = dir.clone();
        est_config(&scratch.0, move |c| tweak(c, &dir))
    };
    config_error(Ca::Enos, "p256", est(|c, _| c["ca"]["lable"] = "x".into()), "ca.lable: unknown field");
    config_error(
        Ca::Enos,
        "p256",
        est(|c, _| c["ca"]["label"] = "a/b".into()),
        "ca.label: one path segment of letters, digits, '-', '_' and '.'",
    );
    config_error(
        Ca::Enos,
        "p256",
        est(|c, _| {
            c["ca"].as_object_mut().unwrap().remove("url");
        }),
        "ca.url: missing",
    );
    config_error(
        Ca::Enos,
        "p256",
        est(|c, d| c["ca"]["bootstrap"]["key_file"] = d.join("other.key").to_str().unwrap().into()),
        "ca.bootstrap.key_file: the key does not belong to the certificate in ca.bootstrap.cert_file",
    );
    config_error(
        Ca::Enos,
        "p256",
        est(|c, _| c["ca"]["bootstrap"]["password_file"] = "/x".into()),
        "ca.bootstrap.password_file: unknown field",
    );
    config_error(
        Ca::Enos,
        "p256",
        est(|c, _| c["ca"]["bootstrap"] = serde_json::json!({ "token_file": "/x" })),
        "ca.bootstrap: give cert_file + key_file, or username + password_file",
    );
    // HTTP Basic travels only over verified TLS: a lab's danger_allow_http refuses it outright.
    config_error(
        Ca::Enos,
        "p256",
        est(|c, d| {
            c["ca"]["bootstrap"] =
                serde_json::json!({ "username": "sensor-0042", "password_file": d.join("est-password") });
            c["tls"]["danger_allow_http"] = true.into();
        }),
        "ca.bootstrap.username: HTTP Basic credentials are only sent over verified https; remove \
         tls.danger_allow_http",
    );
    fs::write(dir.join("loose.key"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
    fs::set_permissions(dir.join("loose.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let env = Env::with_config(
        Ca::Enos,
        "p256",
        est(|c, d| c["ca"]["bootstrap"]["key_file"] = d.join("loose.key").to_str().unwrap().into()),
    );
    let run = env.expect(&["enroll"], 78);
    assert!(first_line(&run.stderr).starts_with("error: ca.bootstrap.key_file: "), "{run:?}");
    assert!(run.stderr.contains("0644"), "{run:?}");
    assert!(!run.stderr.contains("PRIVATE KEY"), "{run:?}");
}

#[test]
fn sectigo_and_securosys_fields_are_checked_by_path() {
    config_error(
        Ca::Sectigo,
        "p256",
        |c| c["ca"]["org_id"] = "12345".into(),
        "ca.org_id: expected a number, found a string",
    );
    config_error(
        Ca::Sectigo,
        "p256",
        |c| {
            c["ca"].as_object_mut().unwrap().remove("cert_type");
        },
        "ca.cert_type: missing",
    );
    config_error(
        Ca::Sectigo,
        "p256",
        |c| c["ca"]["poll_timeout_s"] = 0.into(),
        "ca.poll_timeout_s: must be a whole number of at least 1",
    );
    config_error(
        Ca::Securosys,
        "p256",
        |c| {
            let ca = c["ca"].as_object_mut().unwrap();
            ca.remove("jwt_file");
            ca.remove("api_key_file");
        },
        "ca.jwt_file: missing (give jwt_file, api_key_file, or both)",
    );
    config_error(
        Ca::Securosys,
        "p256",
        |c| c["ca"]["key_usage"] = serde_json::json!(["digitalSignature"]),
        r#"ca.key_usage: "digitalSignature" is not an enum name such as "DIGITAL_SIGNATURE""#,
    );
}

#[test]
fn a_secret_file_readable_by_others_is_refused_naming_field_and_file() {
    let env = Env::new(Ca::Enos, "p256");
    let secret = env.dir().join("app-secret");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    let run = env.expect(&["enroll"], 78);
    let line = first_line(&run.stderr);
    assert!(
        line.starts_with("error: ca.app_secret_file: ")
            && line.contains(secret.to_str().unwrap())
            && line.contains("0644"),
        "{run:?}"
    );
    assert!(!env.state_dir().exists());
    env.assert_no_secret_in_outputs();
}

#[test]
fn a_missing_or_unparsable_config_file_is_a_config_error() {
    let env = Env::new(Ca::Enos, "p256");
    fs::write(&env.config, "{ not json").unwrap();
    let run = env.expect(&["status"], 78);
    assert!(first_line(&run.stderr).contains("invalid JSON at byte 2"), "{run:?}");
    fs::remove_file(&env.config).unwrap();
    let run = env.expect(&["enroll"], 78);
    assert!(first_line(&run.stderr).contains(env.config.to_str().unwrap()), "{run:?}");
}

#[test]
fn command_line_mistakes_are_usage_errors() {
    let env = Env::new(Ca::Enos, "p256");
    for args in [&["frobnicate"][..], &["enroll", "--forc"], &[]] {
        let run = env.expect(args, 64);
        assert!(run.stderr.contains("see enroll-agent --help"), "{run:?}");
    }
    assert!(env.expect(&["--help"], 0).stdout.contains("needs-renewal"));
    assert!(env.expect(&["--version"], 0).stdout.starts_with("enroll-agent "));
    let renew_before_enroll = env.expect(&["renew"], 64);
    assert!(renew_before_enroll.stderr.contains("run `enroll-agent enroll` first"));
}

#[test]
fn a_state_directory_open_to_others_is_refused_naming_it() {
    let env = Env::new(Ca::Enos, "p256");
    fs::create_dir(env.state_dir()).unwrap();
    fs::set_permissions(env.state_dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let run = env.expect(&["enroll"], 74);
    assert!(run.stderr.contains(env.state_dir().to_str().unwrap()) && run.stderr.contains("0755"), "{run:?}");
}

#[test]
fn a_loose_key_file_stops_renewal_but_the_identity_stays() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    let key = env.current().join("key.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let run = env.expect(&["check"], 74);
    assert!(
        run.stderr.contains(key.to_str().unwrap().trim_start_matches(env.state_dir().to_str().unwrap()))
            || run.stderr.contains("key.pem"),
        "{run:?}"
    );
    assert!(run.stderr.contains("0644"), "{run:?}");
}

#[test]
fn a_corrupt_state_file_is_set_aside_and_the_agent_carries_on() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    fs::write(env.state_dir().join("state.json"), "{\"pending\": tru").unwrap();
    let run = env.expect(&["renew", "--force"], 0);
    assert!(run.stderr.contains("state.json is unreadable"), "{run:?}");
    assert!(env.state_dir().join("state.json.corrupt").exists());
    assert_eq!(env.status_json()["state"], "valid");
}

#[test]
fn needs_renewal_answers_for_exec_condition() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["needs-renewal"], 0);
    env.expect(&["enroll"], 0);
    env.expect(&["needs-renewal"], 1);
}

#[test]
fn check_validates_offline_and_online() {
    let env = Env::new(Ca::Ezca, "rsa2048");
    let run = env.expect(&["check"], 0);
    assert!(run.stdout.contains("ok: trust bundle (1 roots)"), "{run:?}");
    assert!(!env.state_dir().exists(), "check creates nothing");
    let run = env.expect(&["check", "--online"], 0);
    assert!(run.stdout.contains("reachable over verified TLS"), "{run:?}");
    // A trust bundle that does not hold the CA's root: TLS verification fails, nothing is sent.
    let env = Env::with_config(Ca::Ezca, "rsa2048", |c| {
        c["tls"]["trust_bundle"] = "/etc/ssl/certs/ca-certificates.crt".into()
    });
    let run = env.expect(&["enroll"], 75);
    assert!(run.stderr.contains("could not reach the CA"), "{run:?}");
    assert!(run.stderr.to_lowercase().contains("certificate"), "{run:?}");
    assert!(env.issuing_calls().is_empty());
}

#[test]
fn a_crash_between_install_and_state_write_is_reconciled() {
    // Simulate the power cut: state.json says the installed slot is still pending.
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    let before = env.identity();
    let slot = before.target.file_name().unwrap().to_str().unwrap().to_string();
    let state_path = env.state_dir().join("state.json");
    let mut state: Value = serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    state["pending"] = serde_json::json!({"request_id": null, "slot": slot, "since": 1, "purpose": "enroll"});
    fs::write(&state_path, state.to_string()).unwrap();
    let run = env.expect(&["renew", "--force"], 0);
    assert!(run.stderr.contains("clearing it"), "{run:?}");
    let after = env.identity();
    assert_ne!(after.target, before.target, "the renewal used a new slot");
    assert_eq!(fs::read_link(env.state_dir().join("previous")).unwrap(), before.target);
    let old_cert = fs::read(env.state_dir().join(&before.target).join("cert.pem")).unwrap();
    assert_eq!(old_cert, before.files[0].1, "the installed slot was not written into");
}

#[test]
fn a_state_directory_owned_by_someone_else_is_refused_naming_the_owner() {
    let env = Env::new(Ca::Enos, "p256");
    fs::create_dir(env.state_dir()).unwrap();
    fs::set_permissions(env.state_dir(), fs::Permissions::from_mode(0o700)).unwrap();
    let chowned = Command::new("chown").arg("65534").arg(env.state_dir()).status().unwrap().success();
    assert!(chowned, "chown (the tests run as root in CI)");
    let run = env.expect(&["enroll"], 74);
    assert!(run.stderr.contains("owned by uid 65534"), "{run:?}");
    assert!(run.stderr.contains(env.state_dir().to_str().unwrap()), "{run:?}");
}

#[test]
fn a_missing_or_empty_trust_bundle_is_a_config_error_naming_it() {
    let env =
        Env::with_config(Ca::Enos, "p256", |c| c["tls"]["trust_bundle"] = "/nonexistent/roots.pem".into());
    let run = env.expect(&["enroll"], 78);
    assert!(run.stderr.contains("tls.trust_bundle: /nonexistent/roots.pem"), "{run:?}");
    assert!(!env.state_dir().exists(), "a config error creates nothing");
    let env = Env::new(Ca::Enos, "p256");
    fs::write(env.dir().join("tls-root.pem"), "no certificates here\n").unwrap();
    let run = env.expect(&["check"], 78);
    assert!(run.stderr.contains("contains no certificate"), "{run:?}");
}

/// Issue 14: the new bounds (tls.clock_window_s, hooks.timeout_s) are config errors by path.
#[test]
fn clock_window_and_hook_timeout_out_of_bounds_are_named() {
    config_error(
        Ca::Enos,
        "p256",
        |c| c["tls"]["clock_window_s"] = 315_360_001u64.into(),
        "tls.clock_window_s: must be at most 315360000 seconds",
    );
    config_error(
        Ca::Enos,
        "p256",
        |c| c["tls"]["clock_window_s"] = (-1).into(),
        "tls.clock_window_s: must be a whole number",
    );
    config_error(
        Ca::Enos,
        "p256",
        |c| c["hooks"] = serde_json::json!({ "after_install": ["/bin/true"], "timeout_s": 3601 }),
        "hooks.timeout_s: must be at most 3600 seconds",
    );
    config_error(
        Ca::Enos,
        "p256",
        |c| c["hooks"] = serde_json::json!({ "after_install": ["/bin/true"], "timeout_s": 0 }),
        "hooks.timeout_s: must be a whole number of at least 1",
    );
}

#[test]
fn acme_blocks_are_checked_field_by_field() {
    let acme = |extra: Value| {
        move |c: &mut Value| {
            let mut block = serde_json::json!({
                "backend": "acme", "directory": "https://acme.example/directory", "terms_agreed": true
            });
            for (key, value) in extra.as_object().unwrap() {
                block[key] = value.clone();
            }
            c["ca"] = block;
        }
    };
    let cases = [
        (
            serde_json::json!({ "challenge": "tls-alpn" }),
            "ca.challenge: \"tls-alpn\" is not one of \"http-01\", \"tls-alpn-01\", \"dns-01\"",
        ),
        (
            serde_json::json!({ "challenge": "dns-01" }),
            "ca.dns01_hook: dns-01 needs the argv of a program that publishes the TXT record (an absolute path first)",
        ),
        (
            serde_json::json!({ "http01_listen": "port 80" }),
            "ca.http01_listen: \"port 80\" is not an address:port (e.g. \"0.0.0.0:80\")",
        ),
        (
            serde_json::json!({ "contact": ["ops@acme.example"] }),
            "ca.contact: \"ops@acme.example\" is not one mailto: URL",
        ),
        (
            serde_json::json!({ "account_key_file": "acme.key" }),
            "ca.account_key_file: must be an absolute path",
        ),
        (serde_json::json!({ "eab": { "kid": "k" } }), "ca.eab.hmac_key_file: missing"),
    ];
    for (extra, message) in cases {
        config_error(Ca::Enos, "p256", acme(extra), message);
    }
}

#[test]
fn scep_blocks_are_checked_field_by_field() {
    let scep = |tweak: fn(&mut Value)| {
        move |c: &mut Value| {
            tweak(&mut c["ca"]);
        }
    };
    /// An edit of the `ca` block and the end of the error it must cause.
    type Case = (fn(&mut Value), &'static str);
    let cases: [Case; 3] = [
        (
            |ca| ca["url"] = format!("{}?operation=GetCACaps", ca["url"].as_str().unwrap()).into(),
            "has no host or has a query",
        ),
        (
            |ca| ca["ca_fingerprint"] = "sha256:zz".into(),
            "ca.ca_fingerprint: SHA-256 of the CA certificate's DER, 64 hex digits (colons allowed, \"sha256:\" prefix optional)",
        ),
        (|ca| { ca["poll_interval_s"] = 10.into(); ca["poll_timeout_s"] = 5.into() }, "ca.poll_timeout_s: must not be smaller than poll_interval_s"),
    ];
    for (tweak, message) in cases {
        let env = Env::with_config(Ca::Scep, "rsa2048", scep(tweak));
        let run = env.expect(&["enroll"], 78);
        assert!(first_line(&run.stderr).ends_with(message), "{run:?}");
        assert!(env.issuing_calls().is_empty());
    }
    // An empty challenge file: named, and nothing sent.
    let env = Env::with_config(Ca::Scep, "rsa2048", |_| {});
    std::fs::write(env.dir().join("scep-challenge"), "").unwrap();
    let run = env.expect(&["enroll"], 78);
    assert!(run.stderr.contains("ca.challenge_password_file: "), "{run:?}");
    assert!(env.issuing_calls().is_empty());
}
