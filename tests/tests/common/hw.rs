//! Hardware key stores for the provider contract suite: a private SoftHSM2 token and an swtpm
//! TPM 2.0 simulator on loopback, each in its own scratch directory and torn down on drop.
//! A store that cannot be started fails the test when `CI` is set, and is reported as skipped
//! (loudly, on stderr) otherwise.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const USER_PIN: &str = "246810";

/// `Err(why)`: the store cannot run here. In CI that is a failure; elsewhere a loud skip.
pub fn require<T>(store: Result<T, String>, what: &str) -> Option<T> {
    match store {
        Ok(store) => Some(store),
        Err(why) if std::env::var_os("CI").is_some() => panic!("{what} is required in CI: {why}"),
        Err(why) => {
            eprintln!("SKIPPED: {what} cannot run here: {why}");
            None
        }
    }
}

fn run(program: &str, args: &[&str], env: &[(&str, &Path)]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("{program} {args:?}: {text}"))
    }
}

/// A SoftHSM2 token of its own: config file, token directory, one initialised token.
pub struct SoftHsm {
    pub conf: PathBuf,
    pub label: String,
}

impl SoftHsm {
    pub fn new(dir: &Path, label: &str) -> Result<SoftHsm, String> {
        if !Path::new(SOFTHSM_MODULE).exists() {
            return Err(format!("{SOFTHSM_MODULE} is missing (Debian package softhsm2)"));
        }
        let tokens = dir.join("softhsm-tokens");
        fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
        let conf = dir.join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        run(
            "softhsm2-util",
            &["--init-token", "--free", "--label", label, "--so-pin", "13579111", "--pin", USER_PIN],
            &[("SOFTHSM2_CONF", &conf)],
        )?;
        Ok(SoftHsm { conf, label: label.to_string() })
    }

    /// Private-key objects on the token, by label (pkcs11-tool, not our code, counts them).
    pub fn private_keys(&self) -> Vec<String> {
        let text = run(
            "pkcs11-tool",
            &[
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                &self.label,
                "--login",
                "--pin",
                USER_PIN,
                "--list-objects",
                "--type",
                "privkey",
            ],
            &[("SOFTHSM2_CONF", &self.conf)],
        )
        .unwrap_or_else(|e| panic!("listing the token's keys: {e}"));
        text.lines().filter_map(|l| l.trim().strip_prefix("label:").map(|v| v.trim().to_string())).collect()
    }
}

/// An swtpm TPM 2.0 simulator on two free loopback ports; killed on drop.
pub struct Swtpm {
    child: Child,
    pub tcti: String,
}

fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65_000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

impl Swtpm {
    pub fn start(dir: &Path) -> Result<Swtpm, String> {
        let state = dir.join("swtpm-state");
        fs::create_dir_all(&state).map_err(|e| e.to_string())?;
        let port = free_port_pair();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("swtpm: {e} (Debian packages swtpm, swtpm-tools)"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("swtpm did not listen within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Swtpm { child, tcti: format!("swtpm:host=127.0.0.1,port={port}") })
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
