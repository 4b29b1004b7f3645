//! The shipped systemd units' commands, run the way systemd runs them (issue 14 item 4): the
//! timer variant's `ExecCondition=` then each `ExecStart=` of a `Type=oneshot` service, in order,
//! stopping at the first failure, with `SuccessExitStatus=` counted as success. `systemd-analyze
//! verify` (yocto/check.sh) only checks that the lines parse; this checks what they do.

mod common;

use std::path::Path;
use std::process::Command;

use common::{agent_binary, Ca, Env};

const TIMER_SERVICE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../yocto/meta-enroll-agent/recipes-security/enroll-agent/files/enroll-agent-renew.service"
);

/// The values of `key=` lines in a unit file, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines().filter_map(|l| l.strip_prefix(&prefix)).map(str::to_string).collect()
}

/// systemd's command-line splitting for the forms our units use: words, single or double quotes,
/// `$$` for a literal `$`.
fn split_command(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut in_word = false;
    for c in line.replace("$$", "$").chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The outcome of one timer activation of the service.
#[derive(Debug, PartialEq)]
enum Activation {
    /// ExecCondition said nothing is due.
    Skipped,
    /// Every ExecStart succeeded; the last one's exit code.
    Succeeded(i32),
    /// An ExecStart failed with this exit code.
    Failed(i32),
}

/// Runs the unit's commands with `/usr/bin/enroll-agent` replaced by the built binary and the
/// config handed over in `ENROLL_AGENT_CONFIG` (the unit relies on the default path).
fn activate(env: &Env) -> Activation {
    let unit = std::fs::read_to_string(TIMER_SERVICE).unwrap();
    assert_eq!(unit_values(&unit, "Type"), ["oneshot"]);
    let success: Vec<i32> = unit_values(&unit, "SuccessExitStatus")
        .iter()
        .flat_map(|v| v.split_whitespace().map(|c| c.parse::<i32>().unwrap()).collect::<Vec<_>>())
        .chain([0])
        .collect();
    let binary = agent_binary();
    let run = |line: &str| -> i32 {
        let line = line.replace("/usr/bin/enroll-agent", binary.to_str().unwrap());
        let words = split_command(&line);
        let status = Command::new(&words[0])
            .args(&words[1..])
            .env("ENROLL_AGENT_CONFIG", &env.config)
            .status()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        status.code().unwrap_or(-1)
    };
    for condition in unit_values(&unit, "ExecCondition") {
        match run(&condition) {
            0 => {}
            1..=254 => return Activation::Skipped,
            code => return Activation::Failed(code),
        }
    }
    let mut last = 0;
    for start in unit_values(&unit, "ExecStart") {
        last = run(&start);
        if !success.contains(&last) {
            return Activation::Failed(last);
        }
    }
    Activation::Succeeded(last)
}

/// Makes the installed identity due for renewal, as time passing would.
fn make_renewal_due(env: &Env) {
    let path = env.state_dir().join("state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["renew_at"] = 1.into();
    state["last_install"] = 1.into();
    std::fs::write(&path, state.to_string()).unwrap();
}

#[test]
fn the_timer_variant_enrolls_a_fresh_device_then_renews_only_when_due() {
    assert!(Path::new(TIMER_SERVICE).exists());
    let env = Env::new(Ca::Enos, "p256");
    assert_eq!(activate(&env), Activation::Succeeded(0), "a fresh device gets an identity");
    assert_eq!(env.status_json()["state"], "valid");
    let first = common::serial_of(&env);

    assert_eq!(activate(&env), Activation::Skipped, "nothing is due");
    assert_eq!(common::serial_of(&env), first);

    make_renewal_due(&env);
    assert_eq!(activate(&env), Activation::Succeeded(0));
    assert_ne!(common::serial_of(&env), first, "renewed");
    assert_eq!(env.status_json()["renewals"], 1);
    let calls = env.issuing_calls();
    assert_eq!(calls.len(), 2, "one enrollment and one renewal: {calls:?}");
}

#[test]
fn an_unreachable_ca_leaves_the_timer_unit_successful_and_retrying() {
    let env = Env::new(Ca::Enos, "p256");
    env.emu.set_fault(enroll_tests::Fault::Http503, None);
    // 75 is the activation's result (SuccessExitStatus), not a 64 from a renew with nothing to renew.
    assert_eq!(activate(&env), Activation::Succeeded(75));
    assert!(!env.current().exists());
    env.emu.clear_fault();
    assert_eq!(activate(&env), Activation::Succeeded(0), "the next activation enrolls");
    assert_eq!(env.status_json()["state"], "valid");
}
