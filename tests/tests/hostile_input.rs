//! Issue 14 (security review), items 5, 8 and 11, end to end with the real binary: absurd times
//! from the CA or `state.json`, config and secret files that are symlinks, devices or writable by
//! others, CA words full of terminal escapes, and `check --online` over plain HTTP.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{agent_binary, Ca, Env, Run};
use enroll_tests::Fault;

/// Runs the agent on `config` with 512 MiB of address space and 20 s, so an unbounded read ends
/// in an allocation failure and a blocked one in exit 124 (not a 78) instead of eating the machine.
fn agent_with_config(config: &Path, args: &[&str]) -> Run {
    let output = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 524288; exec timeout 20 \"$@\"")
        .arg("sh")
        .arg(agent_binary())
        .arg("-c")
        .arg(config)
        .args(args)
        .env_remove("ENROLL_AGENT_CONFIG")
        .output()
        .expect("run enroll-agent");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn first_line(run: &Run) -> &str {
    run.stderr.lines().next().unwrap_or("")
}

#[test]
fn a_config_that_is_a_symlink_or_a_device_is_a_config_error_read_within_bounds() {
    let env = Env::new(Ca::Enos, "p256");
    let link = env.dir().join("link.json");
    std::os::unix::fs::symlink(&env.config, &link).unwrap();
    let run = agent_with_config(&link, &["enroll"]);
    assert_eq!(run.code, 78, "{run:?}");
    assert_eq!(
        first_line(&run),
        format!(
            "error: config file {}: is a symbolic link; name the file itself (symlinks are not followed)",
            link.display()
        ),
        "{run:?}"
    );
    // /dev/zero has length 0 and never ends: the old reader ran out of memory here.
    let started = std::time::Instant::now();
    let run = agent_with_config(Path::new("/dev/zero"), &["check"]);
    assert_eq!(run.code, 78, "{run:?}");
    assert_eq!(first_line(&run), "error: config file /dev/zero: is not a regular file", "{run:?}");
    assert!(started.elapsed().as_secs() < 10);
    // A FIFO nobody writes to must not hang the agent either.
    let fifo = env.dir().join("fifo.json");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let run = agent_with_config(&fifo, &["check"]);
    assert_eq!(run.code, 78, "{run:?}");
    assert!(first_line(&run).ends_with("fifo.json: is not a regular file"), "{run:?}");
    assert!(!env.state_dir().exists(), "a config error creates nothing");
}

#[test]
fn a_secret_file_given_as_a_symlink_is_refused_naming_the_field() {
    let env = Env::new(Ca::Enos, "p256");
    let link = env.dir().join("app-secret-link");
    std::os::unix::fs::symlink(env.dir().join("app-secret"), &link).unwrap();
    env.edit_config(|c| c["ca"]["app_secret_file"] = link.to_str().unwrap().into());
    let run = env.expect(&["enroll"], 78);
    assert!(first_line(&run).starts_with("error: ca.app_secret_file: "), "{run:?}");
    assert!(first_line(&run).contains("is a symbolic link"), "{run:?}");
    env.assert_no_secret_in_outputs();
}

#[test]
fn a_config_trust_bundle_or_hook_program_others_can_write_is_refused() {
    // The config itself.
    let env = Env::new(Ca::Enos, "p256");
    chmod(&env.config, 0o664);
    let run = env.expect(&["enroll"], 78);
    assert_eq!(
        first_line(&run),
        format!(
            "error: config file {}: mode 0664 lets group/others write it; remove their write permission (chmod go-w)",
            env.config.display()
        ),
        "{run:?}"
    );
    assert!(!env.state_dir().exists(), "a config error creates nothing");
    // The trust bundle.
    let env = Env::new(Ca::Enos, "p256");
    let bundle = env.dir().join("tls-root.pem");
    chmod(&bundle, 0o666);
    let run = env.expect(&["check"], 78);
    assert_eq!(
        first_line(&run),
        format!(
            "error: tls.trust_bundle: {}: mode 0666 lets group/others write it; remove their write permission (chmod go-w)",
            bundle.display()
        ),
        "{run:?}"
    );
    // The hook program: it runs as the agent after every install.
    let env = Env::new(Ca::Enos, "p256");
    let hook = env.dir().join("hook.sh");
    fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    chmod(&hook, 0o775);
    env.edit_config(|c| c["hooks"] = serde_json::json!({ "after_install": [hook] }));
    let run = env.expect(&["enroll"], 78);
    assert_eq!(
        first_line(&run),
        format!(
            "error: hooks.after_install: {}: mode 0775 lets group/others write it; remove their write permission (chmod go-w)",
            hook.display()
        ),
        "{run:?}"
    );
    assert!(env.issuing_calls().is_empty());
    chmod(&hook, 0o755);
    env.expect(&["enroll"], 0);
}

#[test]
fn ca_words_with_terminal_escapes_reach_stderr_and_status_defused() {
    let env = Env::new(Ca::Enos, "p256");
    env.emu.set_fault(Fault::EnosControlChars, Some(1));
    let run = env.expect(&["enroll"], 77);
    let bad = |c: char| (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c);
    assert!(!run.stderr.chars().any(bad), "raw control characters in stderr: {:?}", run.stderr);
    // No forged lines: every line is the agent's own.
    for line in run.stderr.lines() {
        assert!(
            line.starts_with("error: ")
                || line.starts_with("caused by: ")
                || line.starts_with("enroll-agent: "),
            "a line the CA wrote: {line:?} in {run:?}"
        );
    }
    // The CA's msg is cut to one line of words (http::excerpt), its escapes made visible.
    assert!(run.stderr.contains(r"\x1b[2J\x1b[31mdevice wiped error: forged line\x07\x9b0m"), "{run:?}");
    assert!(run.stderr.contains(r"\u{202e}gpj.exe"), "{run:?}");
    assert!(run.stderr.contains(r"requestId r1\x1b]0;owned\x07\x0aforged: requestId"), "{run:?}");
    let status = env.status_json();
    let last_error = status["last_error"].as_str().unwrap();
    assert!(!last_error.chars().any(bad), "{last_error:?}");
    assert!(last_error.contains("EnOS code 99400"), "{last_error:?}");
}

#[test]
fn an_absurd_date_header_is_ignored_not_a_crash() {
    // Year 99999999999999 overflowed (a panic in a debug build, a wrapped time in release).
    let env = Env::new(Ca::Enos, "p256");
    env.emu.set_fault(Fault::AbsurdDate, None);
    let run = env.expect(&["enroll"], 0);
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    assert_eq!(env.status_json()["state"], "valid");
}

#[test]
fn absurd_times_in_state_json_do_not_crash_status_or_renew() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    let path = env.state_dir().join("state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    state["renew_at"] = u64::MAX.into();
    state["last_install"] = u64::MAX.into();
    fs::write(&path, state.to_string()).unwrap();
    let run = env.expect(&["status"], 0);
    assert!(run.stdout.contains("renew at:    9999-12-31T23:59:59Z"), "{run:?}");
    let run = env.expect(&["renew"], 0);
    assert!(run.stdout.contains("not due until 9999-12-31T23:59:59Z"), "{run:?}");
    assert_eq!(env.status_json()["renew_at"], "9999-12-31T23:59:59Z");
    // A last-known-good time in the year 584 billion is a corrupt file, not time that has
    // passed: ignored with a warning (believing it would make every certificate look expired
    // for good), and the renewal goes ahead.
    let mut state: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    state["clock_floor"] = u64::MAX.into();
    fs::write(&path, state.to_string()).unwrap();
    let run = env.expect(&["renew", "--force"], 0);
    assert!(run.stderr.contains("ignoring clock_floor"), "{run:?}");
    assert_eq!(env.status_json()["state"], "valid");
    let floor = env.state_json()["clock_floor"].as_u64().unwrap();
    assert!(floor < 4_102_444_800, "the next write keeps a sane floor, not {floor}");
}

/// A plain-HTTP "CA" that answers every request 404, for `check --online`.
fn plain_http_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ =
                stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    url
}

#[test]
fn check_online_over_plain_http_does_not_claim_verified_tls() {
    let url = plain_http_server();
    let env = Env::with_config(Ca::Enos, "p256", |c| {
        c["ca"]["api_gateway"] = url.clone().into();
        c["tls"]["danger_allow_http"] = true.into();
    });
    let run = env.expect(&["check", "--online"], 0);
    assert!(!run.stdout.contains("TLS (HTTP"), "{run:?}");
    assert!(!run.stdout.contains("verified TLS"), "{run:?}");
    assert!(run.stdout.contains("ok: enos reachable over plain HTTP (HTTP 404 from http://"), "{run:?}");
    assert!(run.stdout.contains("warning: no TLS: nothing authenticates the CA"), "{run:?}");
}

/// The secrets scan every end-to-end test ends with (issue 11 item 6) can fail: a file holding a
/// configured secret among other text, or an agent output with a line of the device key, fails
/// the test; the secret files themselves do not.
#[test]
fn the_secrets_scan_at_the_end_of_every_test_catches_a_leak() {
    let leak_in_file = std::panic::catch_unwind(|| {
        let env = Env::new(Ca::Enos, "p256");
        let secret = env.secrets()[0].clone();
        fs::write(env.dir().join("service.log"), format!("connecting with {secret}\n")).unwrap();
    });
    assert!(leak_in_file.is_err(), "a secret in a left-over file fails the test");

    let leak_in_output = std::panic::catch_unwind(|| {
        let env = Env::new(Ca::Enos, "p256");
        env.expect(&["enroll"], 0);
        let key = fs::read_to_string(env.current().join("key.pem")).unwrap();
        env.outputs.lock().unwrap().push(key);
    });
    assert!(leak_in_output.is_err(), "the device key in an output fails the test");

    let clean = std::panic::catch_unwind(|| {
        let env = Env::new(Ca::Enos, "p256");
        env.expect(&["enroll"], 0);
    });
    assert!(clean.is_ok(), "secret files alone pass");
}
