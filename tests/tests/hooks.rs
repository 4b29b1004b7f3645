//! `hooks.after_install` as the review asked (issue 14 item 7): a clean environment, the key named
//! the way its provider stores it, the whole process group killed at `hooks.timeout_s`, and a slow
//! hook never holding up SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_binary, Ca, Env};

/// The `KEY=value` lines a hook wrote with `env`.
fn read_environment(path: &std::path::Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).expect("the hook ran");
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn dump_environment_hook(env: &Env) -> std::path::PathBuf {
    let out = env.dir().join("hook.env");
    env.edit_config(|c| {
        c["hooks"] = serde_json::json!({ "after_install": ["/bin/sh", "-c", "env > \"$0\"", out] })
    });
    out
}

#[test]
fn a_hook_sees_a_fixed_path_and_only_the_agents_variables() {
    let env = Env::new(Ca::Enos, "p256");
    let out = dump_environment_hook(&env);
    // Something a service manager might hand the agent that a hook must not inherit.
    env.env_vars.lock().unwrap().push(("HTTPS_PROXY".into(), "http://user:proxy-secret@proxy:3128".into()));
    env.expect(&["enroll"], 0);
    let seen = read_environment(&out);
    let names: Vec<&str> =
        seen.keys().map(String::as_str).filter(|k| !["PWD", "SHLVL", "_"].contains(k)).collect();
    assert_eq!(
        names,
        [
            "ENROLL_AGENT_CERT",
            "ENROLL_AGENT_CHAIN",
            "ENROLL_AGENT_KEY",
            "ENROLL_AGENT_NOT_AFTER",
            "ENROLL_AGENT_SERIAL",
            "ENROLL_AGENT_STATE_DIR",
            "PATH"
        ],
        "{seen:?}"
    );
    assert_eq!(seen["PATH"], "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    assert!(std::path::Path::new(&seen["ENROLL_AGENT_KEY"]).is_file(), "{seen:?}");
    assert_eq!(seen["ENROLL_AGENT_SERIAL"], common::serial_of(&env));
}

#[test]
fn a_remote_key_is_named_by_its_uri_not_by_a_key_file_that_does_not_exist() {
    let env = Env::new(Ca::Enos, "rsa2048");
    env.use_redtrust();
    let out = dump_environment_hook(&env);
    env.expect(&["enroll"], 0);
    let seen = read_environment(&out);
    assert!(!seen.contains_key("ENROLL_AGENT_KEY"), "{seen:?}");
    let uri = std::fs::read_to_string(env.current().join("key.uri")).unwrap();
    assert_eq!(seen["ENROLL_AGENT_KEY_URI"], uri.trim());
    assert!(uri.starts_with("redtrust:"), "{uri}");
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet, which runs no code).
fn is_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn wait_for_file(path: &std::path::Path) -> String {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text.trim().to_string();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A hook that starts a child which would outlive it, then waits: `$0` receives the child's pid.
fn lingering_hook(env: &Env, timeout_s: u64) -> std::path::PathBuf {
    let pid_file = env.dir().join("child.pid");
    env.edit_config(|c| {
        c["hooks"] = serde_json::json!({
            "after_install": ["/bin/sh", "-c", "sleep 600 & echo $! > \"$0\"; wait", pid_file],
            "timeout_s": timeout_s
        })
    });
    pid_file
}

#[test]
fn at_the_timeout_the_hooks_whole_process_group_is_killed() {
    let env = Env::new(Ca::Enos, "p256");
    let pid_file = lingering_hook(&env, 1);
    let run = env.expect(&["enroll"], 0);
    assert!(run.stderr.contains("killed after 1 s (hooks.timeout_s)"), "{run:?}");
    let child = wait_for_file(&pid_file);
    assert!(is_gone(&child), "the hook's child {child} outlived the hook");
    let status = env.status_json();
    assert_eq!(status["state"], "valid", "a slow hook never costs the new certificate");
    assert!(status["hook_error"].as_str().unwrap().contains("killed after 1 s"), "{status}");
}

#[test]
fn sigterm_is_not_held_up_by_a_slow_hook() {
    let env = Env::new(Ca::Enos, "p256");
    let pid_file = lingering_hook(&env, 600);
    let mut daemon = Command::new(agent_binary())
        .args(["-c", env.config.to_str().unwrap(), "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = wait_for_file(&pid_file);
    let pid = daemon.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // The hook would run for ten minutes; the agent must not wait for it.
    let start = Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = daemon.kill();
            panic!("run was still waiting for its hook 30 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("killed: the agent is stopping"), "{stderr}");
    assert!(is_gone(&child), "the hook's child {child} outlived the agent");
    assert_eq!(env.status_json()["state"], "valid");
}
