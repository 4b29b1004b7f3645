//! The state directory as a shared resource (issue 14): one writer at a time, slot names that
//! cannot leave `slots/`, and an optional group that consumers use to read the identity.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{mode, Ca, Env};

fn finish(child: std::process::Child) -> (i32, String) {
    let output = child.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

/// `check` proves `current` names a complete slot whose key matches its certificate.
fn assert_identity_intact(env: &Env) {
    env.expect(&["check"], 0);
    env.assert_chain_verifies();
    let slots: Vec<_> =
        fs::read_dir(env.state_dir().join("slots")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(slots.len() <= 2, "only current and previous are kept: {slots:?}");
    let leftovers: Vec<_> = fs::read_dir(env.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

/// Issue 14 item 2: two writers at once (a timer firing during a manual run) used to prune each
/// other's slot and temp files (74) and lose the CA reference (EnOS then refused renewal, 77).
#[test]
fn concurrent_renewals_take_turns_and_leave_the_identity_intact() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    for round in 0..10 {
        let a = env.spawn(&["renew", "--force"], &[]);
        let b = env.spawn(&["renew", "--force"], &[]);
        let (code_a, out_a) = finish(a);
        let (code_b, out_b) = finish(b);
        assert_eq!((code_a, code_b), (0, 0), "round {round}:\n--- a\n{out_a}--- b\n{out_b}");
        assert_identity_intact(&env);
    }
    assert_eq!(env.status_json()["renewals"], 20);
    env.expect(&["renew", "--force"], 0);
    assert_identity_intact(&env);
}

/// `enroll` and `renew` racing: the loser sees the winner's identity, never half of it.
#[test]
fn concurrent_enrollments_make_one_identity() {
    let env = Env::new(Ca::Enos, "p256");
    let a = env.spawn(&["enroll"], &[]);
    let b = env.spawn(&["enroll"], &[]);
    let (code_a, out_a) = finish(a);
    let (code_b, out_b) = finish(b);
    assert_eq!((code_a, code_b), (0, 0), "--- a\n{out_a}--- b\n{out_b}");
    assert!(
        out_a.contains("already installed") || out_b.contains("already installed"),
        "the second enroll found the first one's identity:\n{out_a}\n{out_b}"
    );
    assert_identity_intact(&env);
    env.expect(&["renew", "--force"], 0);
}

/// The lock is `<state_dir>/.lock` (flock(2)): another holder makes a writer wait a bounded time
/// and then exit 75 saying so, while `status` and `check` answer at once.
#[test]
fn a_held_lock_makes_writers_wait_then_exit_75_and_never_blocks_readers() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    let lock = env.state_dir().join(".lock");
    assert!(lock.exists(), "the lock file lives in the state directory");
    assert_eq!(mode(&lock), 0o600);

    // Held for 3 s by util-linux flock: a writer waits and then goes ahead.
    let holder =
        Command::new("flock").args(["-x", "--no-fork"]).arg(&lock).args(["sleep", "3"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = env.expect(&["status", "--json"], 0);
    let check = env.expect(&["check"], 0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "status/check waited for the lock: {status:?} {check:?}"
    );
    let renew = env.expect(&["renew", "--force"], 0);
    assert!(started.elapsed() >= Duration::from_secs(2), "renew did not wait for the holder: {renew:?}");
    assert!(renew.stderr.contains("another enroll-agent run holds"), "{renew:?}");
    let mut holder = holder;
    holder.wait().unwrap();

    // Held longer than the writer waits (debug builds: ENROLL_AGENT_LOCK_WAIT_S): exit 75.
    let mut holder =
        Command::new("flock").args(["-x", "--no-fork"]).arg(&lock).args(["sleep", "30"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let child = env.spawn(&["renew", "--force"], &[("ENROLL_AGENT_LOCK_WAIT_S", "1")]);
    let (code, out) = finish(child);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, 75, "{out}");
    assert!(out.contains("another enroll-agent run holds") && out.contains(".lock"), "{out}");
    assert_identity_intact(&env);
    env.expect(&["renew", "--force"], 0);
}

/// `run` holds the lock only during a cycle: while it sleeps, a manual renewal goes through at once.
#[test]
fn run_releases_the_lock_while_it_sleeps() {
    let env = Env::new(Ca::Enos, "p256");
    let mut daemon = env.spawn(&["run"], &[]);
    let start = Instant::now();
    while !env.current().exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "run did not enroll");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let child = env.spawn(&["renew", "--force"], &[("ENROLL_AGENT_LOCK_WAIT_S", "1")]);
    let (code, out) = finish(child);
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    assert_eq!(code, 0, "{out}");
    assert_identity_intact(&env);
}

/// Issue 14 item 3: `pending.slot` is joined to `slots/`; `../../victim` made `enroll --force`
/// delete a directory outside the state directory.
#[test]
fn a_pending_slot_outside_slots_is_set_aside_and_nothing_outside_is_touched() {
    for args in [&["enroll", "--force"][..], &["renew", "--force"][..]] {
        let env = Env::new(Ca::Enos, "p256");
        env.expect(&["enroll"], 0);
        let victim = env.dir().join("victim");
        fs::create_dir_all(victim.join("inner")).unwrap();
        fs::write(victim.join("inner/data"), "precious").unwrap();
        fs::write(victim.join("key.pem"), "not ours").unwrap();
        let state = env.state_dir().join("state.json");
        let mut json = env.state_json();
        json["pending"] = serde_json::json!({ "slot": "../../victim", "since": 1, "purpose": "renew" });
        fs::write(&state, json.to_string()).unwrap();

        let run = env.expect(args, 0);
        assert_eq!(fs::read_to_string(victim.join("inner/data")).unwrap(), "precious", "{args:?}: {run:?}");
        assert!(victim.join("key.pem").exists(), "{args:?}: {run:?}");
        assert!(env.state_dir().join("state.json.corrupt").exists(), "{args:?}: {run:?}");
        assert!(run.stderr.contains("pending.slot"), "the warning says why: {run:?}");
        assert_identity_intact(&env);
    }
}

/// `current`/`previous` naming anything but `slots/<digits>` are not followed (nor kept as
/// `previous` by the next install); they are moved aside and a new identity is enrolled.
#[test]
fn current_and_previous_outside_slots_are_moved_aside_not_followed() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    // A complete identity outside slots/: the old code used it as the current one.
    let outside = env.dir().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
    for entry in fs::read_dir(env.current()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), outside.join(entry.file_name())).unwrap();
    }
    let state_dir = env.state_dir();
    fs::remove_file(state_dir.join("current")).unwrap();
    std::os::unix::fs::symlink("../outside", state_dir.join("current")).unwrap();
    std::os::unix::fs::symlink(&outside, state_dir.join("previous")).unwrap();

    // Read-only views neither follow nor repair it.
    assert_eq!(env.status_json()["state"], "none");
    assert_eq!(fs::read_link(state_dir.join("current")).unwrap(), Path::new("../outside"));

    let run = env.expect(&["enroll"], 0);
    assert!(run.stdout.contains("installed certificate"), "a new identity, not the outside one: {run:?}");
    assert!(run.stderr.contains("current") && run.stderr.contains("moved"), "{run:?}");
    let target = fs::read_link(env.current()).unwrap();
    assert!(target.starts_with("slots") && target.components().count() == 2, "{target:?}");
    assert_eq!(fs::read_link(state_dir.join("current.corrupt")).unwrap(), Path::new("../outside"));
    assert!(fs::symlink_metadata(state_dir.join("previous")).is_err(), "the bad previous is gone");
    env.expect(&["renew", "--force"], 0);
    let previous = fs::read_link(state_dir.join("previous")).unwrap();
    assert!(previous.starts_with("slots"), "{previous:?}");
    assert!(outside.join("key.pem").exists(), "nothing outside the state directory is deleted");
    assert_identity_intact(&env);
}

/// A group that is not ours and not root's, to prove the agent sets it.
fn other_group() -> (String, u32) {
    let egid = fs::metadata("/proc/self").map(|m| m.gid()).unwrap_or(0);
    fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.to_string();
            let gid = f.nth(1)?.parse().ok()?;
            Some((name, gid))
        })
        .find(|(_, gid)| *gid != 0 && *gid != egid)
        .expect("a group other than ours in /etc/group")
}

fn gid(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().gid()
}

/// Issue 14 item 10: with `storage.group`, consumers in that group can read the certificate
/// files and the soft key (0640) through 0750 directories; nothing is opened to others, and
/// state.json, the lock and pending keys stay private.
#[test]
fn storage_group_lets_consumers_read_the_identity_and_nobody_else() {
    let (name, group) = other_group();
    let env = Env::with_config(Ca::Enos, "p256", |c| c["storage"] = serde_json::json!({ "group": name }));
    env.expect(&["enroll"], 0);
    env.expect(&["renew", "--force"], 0);
    let state_dir = env.state_dir();
    for dir in [state_dir.clone(), state_dir.join("slots"), env.current(), state_dir.join("previous")] {
        let real = fs::canonicalize(&dir).unwrap();
        assert_eq!((mode(&real), gid(&real)), (0o750, group), "{}", dir.display());
    }
    for name in ["cert.pem", "chain.pem", "ca.pem", "key.pem"] {
        let path = env.current().join(name);
        assert_eq!((mode(&path), gid(&path)), (0o640, group), "{}", path.display());
    }
    assert_eq!(mode(&state_dir.join("state.json")), 0o600);
    assert_eq!(mode(&state_dir.join(".lock")), 0o600);
    env.expect(&["check"], 0);

    // A consumer: another uid whose only group is that one reads through `current/` (the
    // scratch directory above the state directory is 0700; /var/lib is 0755 on a device).
    fs::set_permissions(env.dir(), fs::Permissions::from_mode(0o711)).unwrap();
    let read_as = |gid: u32| {
        Command::new("setpriv")
            .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups", "cat"])
            .arg(env.current().join("key.pem"))
            .output()
            .unwrap()
    };
    let consumer = read_as(group);
    assert!(consumer.status.success(), "{}", String::from_utf8_lossy(&consumer.stderr));
    assert!(String::from_utf8_lossy(&consumer.stdout).contains("PRIVATE KEY"));
    assert!(!read_as(65534).status.success(), "others cannot read the key");

    // A pending key is not shared before it is installed.
    env.emu.set_fault(enroll_tests::Fault::Http503, None);
    env.expect(&["renew", "--force"], 75);
    env.emu.clear_fault();
    let pending = env.state_json()["pending"]["slot"].as_str().unwrap().to_string();
    let slot = state_dir.join("slots").join(&pending);
    assert_eq!(mode(&slot), 0o700);
    assert_eq!(mode(&slot.join("key.pem")), 0o600);
    env.expect(&["renew", "--force"], 0);
    assert_eq!(mode(&env.current().join("key.pem")), 0o640);

    // Group write or world access is still refused.
    fs::set_permissions(env.current().join("key.pem"), fs::Permissions::from_mode(0o644)).unwrap();
    let run = env.expect(&["check"], 74);
    assert!(run.stderr.contains("0644"), "{run:?}");
    fs::set_permissions(env.current().join("key.pem"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o770)).unwrap();
    env.expect(&["renew", "--force"], 74);
    fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o750)).unwrap();
    env.expect(&["renew", "--force"], 0);
}

/// Setting the group later shares the installed identity at the next run; without it nothing
/// changes: 0700 directories, a 0600 key, and a 0750 state directory is refused.
#[test]
fn without_storage_group_the_state_stays_private_and_the_group_can_be_added_later() {
    let env = Env::new(Ca::Enos, "p256");
    env.expect(&["enroll"], 0);
    let state_dir = env.state_dir();
    for dir in [state_dir.clone(), state_dir.join("slots"), fs::canonicalize(env.current()).unwrap()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    assert_eq!(mode(&env.current().join("key.pem")), 0o600);

    let (name, group) = other_group();
    env.edit_config(|c| c["storage"] = serde_json::json!({ "group": group }));
    env.expect(&["renew"], 0);
    assert_eq!((mode(&state_dir), gid(&state_dir)), (0o750, group));
    assert_eq!((mode(&env.current().join("key.pem")), gid(&env.current().join("key.pem"))), (0o640, group));

    // Removing the group again: the shared directory is refused until an operator closes it.
    env.edit_config(|c| {
        c.as_object_mut().unwrap().remove("storage");
    });
    let run = env.expect(&["renew"], 74);
    assert!(run.stderr.contains("0750") && run.stderr.contains("storage.group"), "{run:?}");
    let _ = name;
}

#[test]
fn storage_group_must_exist() {
    let env = Env::with_config(Ca::Enos, "p256", |c| {
        c["storage"] = serde_json::json!({ "group": "no-such-group-enroll" })
    });
    let run = env.expect(&["enroll"], 78);
    assert!(run.stderr.contains("storage.group"), "{run:?}");
    assert!(!env.state_dir().exists(), "a config error creates nothing");
    env.edit_config(|c| c["storage"] = serde_json::json!({ "grup": "root" }));
    let run = env.expect(&["enroll"], 78);
    assert!(run.stderr.contains("storage.grup: unknown field"), "{run:?}");
}
