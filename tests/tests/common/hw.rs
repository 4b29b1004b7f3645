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

pub const TPM2_PKCS11_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";

/// A PKCS#11 token of its own, and the environment its module needs in every process that
/// loads it (the agent's too).
pub struct Token {
    pub module: String,
    pub label: String,
    pub env: Vec<(String, String)>,
    children: Vec<Child>,
}

impl Drop for Token {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!("{what} not ready within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn spawn(command: &mut Command, what: &str) -> Result<Child, String> {
    command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| format!("starting {what}: {e}"))
}

impl Token {
    /// A SoftHSM2 token: private config file and token directory.
    pub fn softhsm(dir: &Path, label: &str) -> Result<Token, String> {
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
        Ok(Token {
            module: SOFTHSM_MODULE.into(),
            label: label.into(),
            env: vec![("SOFTHSM2_CONF".into(), conf.display().to_string())],
            children: Vec::new(),
        })
    }

    /// tpm2-pkcs11 on swtpm. swtpm alone holds 3 transient objects and tpm2-pkcs11 keeps its
    /// primary and keys loaded, so, as a device goes through /dev/tpmrm0, this goes through
    /// tpm2-abrmd, which needs a D-Bus session bus: a private dbus-daemon.
    pub fn tpm2_pkcs11(dir: &Path) -> Result<Token, String> {
        for tool in ["swtpm", "tpm2_startup", "tpm2_getcap", "tpm2_ptool", "tpm2-abrmd", "dbus-daemon"] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map_or(true, |o| !o.status.success())
            {
                return Err(format!("{tool} is not installed (scripts/hw-deps.sh installs it)"));
            }
        }
        if !Path::new(TPM2_PKCS11_MODULE).exists() {
            return Err(format!("{TPM2_PKCS11_MODULE} is missing (libtpm2-pkcs11-1)"));
        }
        let (state, store, home) = (dir.join("tpm-state"), dir.join("tpm2-store"), dir.join("tpm-home"));
        for d in [&state, &store, &home] {
            fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let mut token = Token {
            module: TPM2_PKCS11_MODULE.into(),
            label: "tpm-token".into(),
            env: Vec::new(),
            children: Vec::new(),
        };
        let port = free_port_pair();
        token.children.push(spawn(
            Command::new("swtpm")
                .args(["socket", "--tpm2", "--flags", "not-need-init"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1)),
            "swtpm",
        )?);
        let tcti = format!("swtpm:host=127.0.0.1,port={port}");
        let tcti_env = [("TPM2TOOLS_TCTI", Path::new(&tcti))];
        wait_until("swtpm", || run("tpm2_startup", &["-c"], &tcti_env).is_ok())?;
        let bus = dir.join("dbus-socket");
        let bus_address = format!("unix:path={}", bus.display());
        token.children.push(spawn(
            Command::new("dbus-daemon")
                .args(["--session", "--nofork"])
                .arg(format!("--address={bus_address}")),
            "dbus-daemon",
        )?);
        wait_until("dbus-daemon", || bus.exists())?;
        token.children.push(spawn(
            Command::new("tpm2-abrmd")
                .args(["--session", "--allow-root", "--flush-all"])
                .arg(format!("--tcti={tcti}"))
                .env("DBUS_SESSION_BUS_ADDRESS", &bus_address),
            "tpm2-abrmd",
        )?);
        let bus_path = PathBuf::from(&bus_address);
        let tabrmd = [
            ("TPM2TOOLS_TCTI", Path::new("tabrmd:bus_type=session")),
            ("DBUS_SESSION_BUS_ADDRESS", bus_path.as_path()),
            ("HOME", home.as_path()),
        ];
        wait_until("tpm2-abrmd", || run("tpm2_getcap", &["properties-fixed"], &tabrmd).is_ok())?;
        let store_arg = format!("--path={}", store.display());
        run("tpm2_ptool", &["init", &store_arg], &tabrmd)?;
        let (userpin, sopin) = (format!("--userpin={USER_PIN}"), "--sopin=13579111".to_string());
        run(
            "tpm2_ptool",
            &["addtoken", "--pid=1", "--label=tpm-token", &userpin, &sopin, &store_arg],
            &tabrmd,
        )?;
        token.env = vec![
            ("TPM2_PKCS11_TCTI".into(), "tabrmd:bus_type=session".into()),
            ("DBUS_SESSION_BUS_ADDRESS".into(), bus_address),
            ("TPM2_PKCS11_STORE".into(), store.display().to_string()),
            ("TPM2_PKCS11_LOG_LEVEL".into(), "0".into()),
        ];
        Ok(token)
    }

    /// Whether the module still lists a token with this label. SoftHSM2 is not crash-safe: a
    /// process killed while SoftHSM2 rewrites its token file can leave the token uninitialised
    /// (reproduced with `pkcs11-tool --keypairgen` killed at random instants, without our code).
    pub fn present(&self) -> bool {
        let env: Vec<(&str, &Path)> =
            self.env.iter().map(|(k, v)| (k.as_str(), Path::new(v.as_str()))).collect();
        run("pkcs11-tool", &["--module", &self.module, "--list-token-slots"], &env).is_ok_and(|text| {
            text.lines()
                .any(|l| l.contains("token label") && l.trim_end().ends_with(&format!(": {}", self.label)))
        })
    }

    /// Every object on the token as pkcs11-tool lists it (for failure messages).
    pub fn listing(&self) -> String {
        let env: Vec<(&str, &Path)> =
            self.env.iter().map(|(k, v)| (k.as_str(), Path::new(v.as_str()))).collect();
        let args = [
            "--module",
            &self.module,
            "--token-label",
            &self.label,
            "--login",
            "--pin",
            USER_PIN,
            "--list-objects",
        ];
        run("pkcs11-tool", &args, &env).unwrap_or_else(|e| e)
    }

    /// Private-key objects on the token, by label (pkcs11-tool, not our code, counts them).
    pub fn private_keys(&self) -> Vec<String> {
        let env: Vec<(&str, &Path)> =
            self.env.iter().map(|(k, v)| (k.as_str(), Path::new(v.as_str()))).collect();
        let text = run(
            "pkcs11-tool",
            &[
                "--module",
                &self.module,
                "--token-label",
                &self.label,
                "--login",
                "--pin",
                USER_PIN,
                "--list-objects",
                "--type",
                "privkey",
            ],
            &env,
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
