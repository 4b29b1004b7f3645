//! `run` as a service: enrolls, sleeps, reloads on SIGHUP, exits 0 on SIGTERM; the after-install
//! hook runs once per install with the documented environment.

mod common;

use std::io::Read;
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
