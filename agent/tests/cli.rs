//! The binary's own command line, run as a user would. Having an integration test here also makes
//! a plain `cargo test --workspace` build `target/debug/enroll-agent`, which the end-to-end suites
//! in `tests/` drive.

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_enroll-agent"))
        .args(args)
        .env_remove("ENROLL_AGENT_CONFIG")
        .output()
        .expect("run enroll-agent");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

#[test]
fn version_names_the_release_the_key_providers_and_the_build_time() {
    let (code, stdout, _) = agent(&["--version"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], concat!("enroll-agent ", env!("CARGO_PKG_VERSION")));
    assert!(lines[1].starts_with("key providers: file"), "{stdout}");
    let line = |prefix: &str| {
        lines.iter().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("{stdout}"))
    };
    // Exactly the protocols whose cargo features this build has (the default build: all six).
    let compiled: Vec<&str> = [
        ("enos", cfg!(feature = "enos")),
        ("ezca", cfg!(feature = "ezca")),
        ("sectigo", cfg!(feature = "sectigo")),
        ("securosys", cfg!(feature = "securosys")),
        ("est", cfg!(feature = "est")),
        ("acme", cfg!(feature = "acme")),
        ("scep", cfg!(feature = "scep")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let protocols = line("protocols: ");
    if compiled.is_empty() {
        assert!(protocols.starts_with("none "), "{stdout}");
    } else {
        assert_eq!(protocols.split(' ').collect::<Vec<_>>(), compiled, "{stdout}");
    }
    let providers: Vec<&str> = lines[1]["key providers: ".len()..].split(' ').collect();
    assert_eq!(providers.contains(&"redtrust"), cfg!(feature = "redtrust"), "{stdout}");
    let built = line("built: ");
    assert!(enroll_agent::time::parse_rfc3339(&built[..20]).is_some(), "{built}");
}

#[test]
fn a_wrong_command_line_is_a_usage_error_64() {
    for args in [&["frobnicate"][..], &["renew", "--frobnicate"], &[]] {
        let (code, _, stderr) = agent(args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn a_missing_config_file_is_a_config_error_78_naming_it() {
    let (code, _, stderr) = agent(&["-c", "/nonexistent/enroll-agent.json", "status"]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("/nonexistent/enroll-agent.json"), "{stderr}");
}
