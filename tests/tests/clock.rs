//! design.md §5 rule 7: a device whose clock is before the binary's build time (here: 1970) has no
//! clock. It must still enroll, using the CA's HTTP `Date` header for every judgement of time: the
//! EnOS request timestamps, the EZCA token's nbf/exp, the TLS and issued-certificate validity.
//! libfaketime moves the agent's clock only (the emulator keeps the real one).

mod common;

use std::process::Command;

use common::{agent_binary, Ca, Env, Run};
use enroll_tests::Options;

fn at_1970(env: &Env, args: &[&str]) -> Run {
    let found = Command::new("faketime").arg("--version").output().is_ok();
    assert!(found, "faketime is not installed (Debian package faketime; .ci/run installs it)");
    Command::new("faketime")
        .arg("1970-01-02 00:00:00")
        .arg(agent_binary())
        .args(["-c", env.config.to_str().unwrap()])
        .args(args)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .output()
        .unwrap()
        .into()
}

#[test]
fn a_device_at_1970_enrolls_and_renews_using_the_ca_date() {
    for (ca, algorithm) in [(Ca::Enos, "p256"), (Ca::Ezca, "rsa2048")] {
        let env = Env::new(ca, algorithm);
        let run = at_1970(&env, &["enroll"]);
        assert_eq!(run.code, 0, "{ca:?}: {run:?}");
        assert!(run.stderr.contains("before the earliest possible time"), "{run:?}");
        assert!(run.stderr.contains("asking the CA for the time"), "{run:?}");
        assert!(run.stderr.contains("using the CA's Date header"), "{run:?}");
        // With the CA's time, the fresh certificate is valid (with a 1970 clock it would be in the
        // future); the real clock agrees.
        assert_eq!(env.status_json()["state"], "valid");
        let run = at_1970(&env, &["renew", "--force"]);
        assert_eq!(run.code, 0, "{ca:?}: {run:?}");
        assert_eq!(env.status_json()["renewals"], 1);
    }
}

#[test]
fn without_a_clock_an_expired_certificate_from_the_ca_is_still_refused() {
    let env = Env::new(Ca::Enos, "p256");
    env.emu.set_fault(enroll_tests::Fault::ExpiredCert, None);
    let run = at_1970(&env, &["enroll"]);
    assert_eq!(run.code, 76, "{run:?}");
    assert!(run.stderr.contains("expired"), "{run:?}");
    assert!(!env.current().exists());
}

#[test]
fn a_server_certificate_issued_after_the_build_is_accepted_only_without_a_clock() {
    // The CA rotated its TLS certificate after our build: from 1970 it starts in the future.
    let options = enroll_tests::Options { tls_start_offset_s: 3600, ..enroll_tests::Options::default() };
    let env = Env::with_options(Ca::Enos, "p256", options, |_| {});
    // With a good clock the certificate really is not valid yet: refused, nothing sent.
    let run = env.agent(&["enroll"]);
    assert_eq!(run.code, 75, "{run:?}");
    assert!(run.stderr.to_lowercase().contains("not valid yet"), "{run:?}");
    assert!(env.issuing_calls().is_empty());
    // Without a clock the device cannot tell; the chain, name and signatures still decide.
    let run = at_1970(&env, &["enroll"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains("accepted the CA's TLS certificate, which starts after the earliest possible time"),
        "{run:?}"
    );
}

/// The build time the agent binary believes in (its `--version` says it).
fn agent_build_time() -> i64 {
    let output = Command::new(agent_binary()).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let line = text.lines().find_map(|l| l.strip_prefix("built: ")).expect("--version names the build time");
    let stamp = line.split_whitespace().next().unwrap();
    enroll_agent::time::parse_rfc3339(stamp).unwrap() as i64
}

fn unix_now() -> i64 {
    ::time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The independent review's reproduction (issue 14): the CA host's TLS certificate started after
/// the build and expired two minutes ago; the device's clock says 1970. Whoever holds that old
/// key must not get the bootstrap token. The device has had a good clock before, so its
/// state.json carries a last-known-good time, and at that time the certificate has expired.
#[test]
fn an_expired_server_certificate_gets_no_credential_from_a_device_at_1970() {
    // A device that enrolled with a good clock remembers the time its CA vouched for.
    let earlier = Env::new(Ca::Ezca, "rsa2048");
    let before = unix_now();
    earlier.expect(&["enroll"], 0);
    let floor = earlier.state_json()["clock_floor"].as_i64().expect("state.json records clock_floor");
    assert!((before - 5..=unix_now()).contains(&floor), "floor {floor}, run started at {before}");

    // The certificate must start after the build for the old rule to have accepted it.
    let build = agent_build_time();
    let wait = build + 200 - unix_now();
    if wait > 0 {
        std::thread::sleep(std::time::Duration::from_secs(wait as u64));
    }
    let now = unix_now();
    let options =
        Options { tls_start_offset_s: build + 60 - now, tls_end_offset_s: -120, ..Options::default() };
    let env = Env::with_options(Ca::Ezca, "rsa2048", options, |_| {});
    std::fs::create_dir_all(env.state_dir()).unwrap();
    std::fs::set_permissions(env.state_dir(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let state = serde_json::json!({ "clock_floor": floor }).to_string();
    std::fs::write(env.state_dir().join("state.json"), state).unwrap();

    let run = at_1970(&env, &["enroll"]);
    assert_eq!(run.code, 75, "{run:?}");
    assert!(run.stderr.to_lowercase().contains("expired"), "{run:?}");
    assert!(!run.stderr.contains("accepted the CA's TLS certificate"), "warned although refused: {run:?}");
    assert!(env.emu.log().is_empty(), "a request reached the server: {:?}", env.emu.log());
    assert!(!env.current().exists());
    env.assert_no_secret_in_outputs();
}

/// A fresh device (floor = build time) accepts a certificate that starts after the build only
/// within tls.clock_window_s, and says which setting refused it.
#[test]
fn a_server_certificate_starting_beyond_the_clock_window_is_refused() {
    // One hour after the floor (the build time): however old the binary under test is, the
    // start is beyond a 600 s window and inside a 7200 s one.
    let start = agent_build_time() + 3600;
    let options = Options { tls_start_offset_s: start - unix_now(), ..Options::default() };
    let env = Env::with_options(Ca::Enos, "p256", options, |config| {
        config["tls"]["clock_window_s"] = serde_json::json!(600);
    });
    let run = at_1970(&env, &["enroll"]);
    assert_eq!(run.code, 75, "{run:?}");
    assert!(run.stderr.contains("beyond tls.clock_window_s (600 s)"), "{run:?}");
    assert!(!run.stderr.contains("accepted the CA's TLS certificate"), "{run:?}");
    assert!(env.emu.log().is_empty(), "{:?}", env.emu.log());

    // The same certificate inside a wider window is accepted, and the warning says so.
    env.edit_config(|config| config["tls"]["clock_window_s"] = serde_json::json!(7200));
    let run = at_1970(&env, &["enroll"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("accepted the CA's TLS certificate"), "{run:?}");
}

/// A device with no clock at all still learns time from what its CA signs: after an install the
/// floor is at least the new certificate's notBefore.
#[test]
fn an_installed_certificate_raises_the_floor_of_a_device_without_a_clock() {
    let env = Env::new(Ca::Enos, "p256");
    assert_eq!(at_1970(&env, &["enroll"]).code, 0);
    let floor = env.state_json()["clock_floor"].as_i64().expect("clock_floor recorded");
    let not_before = env.status_json()["not_before"].as_str().unwrap().to_string();
    let not_before = enroll_agent::time::parse_rfc3339(&not_before).unwrap() as i64;
    assert!(floor >= not_before, "floor {floor} below notBefore {not_before}");
    assert!(floor <= unix_now());
}
