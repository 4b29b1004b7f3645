//! design.md §5 rule 7: a device whose clock is before the binary's build time (here: 1970) has no
//! clock. It must still enroll, using the CA's HTTP `Date` header for every judgement of time: the
//! EnOS request timestamps, the EZCA token's nbf/exp, the TLS and issued-certificate validity.
//! libfaketime moves the agent's clock only (the emulator keeps the real one).

mod common;

use std::process::Command;

use common::{agent_binary, Ca, Env, Run};

fn at_1970(env: &Env, args: &[&str]) -> Run {
    let found = Command::new("faketime").arg("--version").output().is_ok();
    assert!(found, "faketime is not installed (Debian package faketime; .ci/run installs it)");
    let output = Command::new("faketime")
        .arg("1970-01-02 00:00:00")
        .arg(agent_binary())
        .args(["-c", env.config.to_str().unwrap()])
        .args(args)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn a_device_at_1970_enrolls_and_renews_using_the_ca_date() {
    for (ca, algorithm) in [(Ca::Enos, "p256"), (Ca::Ezca, "rsa2048")] {
        let env = Env::new(ca, algorithm);
        let run = at_1970(&env, &["enroll"]);
        assert_eq!(run.code, 0, "{ca:?}: {run:?}");
        assert!(run.stderr.contains("earlier than this build; asking the CA for the time"), "{run:?}");
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
        run.stderr.contains("accepting the CA's TLS certificate, which starts after this build"),
        "{run:?}"
    );
}
