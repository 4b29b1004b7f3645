//! `run` as a service: enrolls, sleeps, reloads on SIGHUP, exits 0 on SIGTERM; the after-install
//! hook runs once per install with the documented environment.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_binary, Ca, Env};

/// A running `enroll-agent run` whose stderr is collected.
struct Daemon(std::process::Child);

impl Daemon {
    fn start(env: &Env) -> Daemon {
        let child = Command::new(agent_binary())
            .args(["-c", env.config.to_str().unwrap(), "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Daemon(child)
    }

    fn signal(&self, name: &str) {
        let pid = self.0.id().to_string();
        let ok = Command::new("kill").arg(format!("-{name}")).arg(&pid).status().unwrap().success();
        assert!(ok, "kill -{name} {pid}");
    }

    /// Sends SIGTERM and returns the exit code and everything the daemon logged.
    fn stop(mut self) -> (Option<i32>, String) {
        self.signal("TERM");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                break status;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "run did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        self.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (status.code(), stderr)
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn run_enrolls_reloads_on_sighup_and_stops_cleanly_on_sigterm() {
    let env = Env::new(Ca::Enos, "p256");
    let daemon = Daemon::start(&env);
    wait_for("the first enrollment", Duration::from_secs(30), || env.current().join("cert.pem").exists());
    // Let it reach its sleep, then reload and stop.
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("next renewal at"), "{stderr}");
    assert!(stderr.contains("reloaded"), "{stderr}");
    assert!(stderr.contains("stopping on signal"), "{stderr}");
    assert_eq!(env.issuing_calls().len(), 1, "one enrollment, no renewal loop");
}

#[test]
fn run_backs_off_while_the_ca_fails_and_enrolls_once_it_recovers() {
    let env = Env::new(Ca::Ezca, "rsa2048");
    env.emu.set_fault(enroll_tests::Fault::Http503, Some(2));
    let daemon = Daemon::start(&env);
    wait_for("enrollment after two failures", Duration::from_secs(30), || {
        env.current().join("cert.pem").exists()
    });
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.matches("retrying in").count(), 2, "{stderr}");
    let calls = env.issuing_calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
}

#[test]
fn the_after_install_hook_runs_once_per_install_with_the_new_serial() {
    let env = Env::new(Ca::Enos, "p256");
    let log = env.dir().join("hook.log");
    env.edit_config(|c| c["hooks"] = serde_json::json!({
        "after_install": ["/bin/sh", "-c", "echo \"$ENROLL_AGENT_SERIAL $ENROLL_AGENT_CHAIN\" >> \"$0\"", log]
    }));
    env.expect(&["enroll"], 0);
    let first = common::serial_of(&env);
    env.expect(&["enroll"], 0);
    env.expect(&["renew", "--force"], 0);
    let second = common::serial_of(&env);
    let chain = env.current().join("chain.pem");
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines, format!("{first} {}\n{second} {}\n", chain.display(), chain.display()));
}

#[test]
fn a_failing_hook_is_reported_and_keeps_the_new_certificate() {
    let env = Env::with_config(Ca::Enos, "p256", |c| {
        c["hooks"] = serde_json::json!({"after_install": ["/bin/false"]})
    });
    let run = env.expect(&["enroll"], 0);
    assert!(run.stderr.contains("hook /bin/false: exited with"), "{run:?}");
    let status = env.status_json();
    assert_eq!(status["state"], "valid");
    assert!(status["hook_error"].as_str().unwrap().contains("exited with"), "{status}");
}

/// Issue 5 item 5: a Prometheus textfile the node_exporter textfile collector can read,
/// rewritten after every run, success or failure.
#[test]
fn metrics_file_reports_expiry_success_errors_and_renewals() {
    let env = Env::new(Ca::Enos, "p256");
    let metrics = env.dir().join("enroll_agent.prom");
    let flag = metrics.to_str().unwrap();
    env.expect(&["--metrics-file", flag, "enroll"], 0);
    let read = || -> std::collections::HashMap<String, String> {
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    };
    let status = env.status_json();
    let m = read();
    assert_eq!(m["enroll_agent_identity_valid"], "1");
    assert_eq!(m["enroll_agent_last_run_failed"], "0");
    assert_eq!(m["enroll_agent_renewals_total"], "0");
    let not_after: u64 = m["enroll_agent_certificate_not_after_seconds"].parse().unwrap();
    assert!(
        status["not_after"].as_str().unwrap().starts_with(&time_prefix(not_after)),
        "{status} vs {not_after}"
    );
    assert!(m.keys().any(|k| k.starts_with("enroll_agent_info{") && k.contains("backend=\"enos\"")), "{m:?}");

    env.emu.set_fault(enroll_tests::Fault::Http503, None);
    env.expect(&["--metrics-file", flag, "renew", "--force"], 75);
    let m = read();
    assert_eq!(m["enroll_agent_last_run_failed"], "1");
    assert!(m.contains_key("enroll_agent_last_error_seconds"));
    assert_eq!(m["enroll_agent_identity_valid"], "1", "the old identity is still valid");
    env.emu.clear_fault();

    // The config field does the same as the flag.
    env.edit_config(|c| c["metrics_file"] = flag.into());
    env.expect(&["renew", "--force"], 0);
    let m = read();
    assert_eq!(m["enroll_agent_renewals_total"], "1");
    assert_eq!(m["enroll_agent_last_run_failed"], "0");
    let mode = std::fs::metadata(&metrics).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "readable by the collector, holds no secret");
}

/// `2026-11-22T` for a Unix time: enough to tie the metric to status's RFC 3339 string.
fn time_prefix(unix: u64) -> String {
    enroll_agent::time::rfc3339(unix)[..11].to_string()
}

/// A CA's `Retry-After` is a floor for `run`'s next attempt (design.md §8): with
/// `retry_initial_s` at 1 s, an EST server's 503 asking for 4 s is not retried sooner.
#[test]
fn run_waits_at_least_the_cas_retry_after_before_trying_again() {
    let mut options = enroll_tests::Options::default();
    options.est.retry_after_s = 4;
    let env = Env::with_options(Ca::Est, "p256", options, |c| c["renewal"]["retry_initial_s"] = 1.into());
    env.emu.set_fault(enroll_tests::Fault::Http503RetryAfter, Some(1));
    let started = Instant::now();
    let daemon = Daemon::start(&env);
    wait_for("enrollment after the 503", Duration::from_secs(30), || env.current().join("cert.pem").exists());
    let elapsed = started.elapsed();
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.matches("retrying in 4 s").count(), 1, "{stderr}");
    assert!(elapsed >= Duration::from_secs(4), "retried after {elapsed:?}");
}
