//! `ca-emulator [--port N] [--dir DIR] [--fault NAME[:COUNT]] [--fault-delay-ms MS] [--client-cert]`
//!
//! Starts the EnOS + EZCA emulator (see the `enroll_tests` crate docs), writes what a client
//! needs into DIR (0700): `tls-root.pem`, `enos-app-secret`, `ezca-bootstrap.token`,
//! `entra-client-secret` (secrets 0600, one trailing newline), `emulator.json` (URL and
//! identifiers, no secrets), `agent-enos.json` and `agent-ezca.json` (enroll-agent configs for
//! this emulator), prints `ca-emulator ready <url>` and serves until killed.

use enroll_tests::{Emulator, Fault, Options};
use serde_json::json;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str =
    "usage: ca-emulator [--port N] [--dir DIR] [--fault NAME[:COUNT]] [--fault-delay-ms MS] [--client-cert]";

struct Args {
    opts: Options,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut opts = Options::default();
    let mut dir = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--port" => opts.port = value("--port")?.parse().map_err(|_| "--port: not a port number")?,
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            "--fault" => opts.fault = Some(parse_fault(&value("--fault")?)?),
            "--fault-delay-ms" => {
                let ms: u64 =
                    value("--fault-delay-ms")?.parse().map_err(|_| "--fault-delay-ms: not a number")?;
                opts.fault_delay = Duration::from_millis(ms);
            }
            "--client-cert" => opts.request_client_cert = true,
            "-h" | "--help" => {
                println!("{USAGE}\nfaults: {}", enroll_tests::fault::names());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args { opts, dir })
}

/// `NAME` or `NAME:COUNT`.
fn parse_fault(s: &str) -> Result<(Fault, Option<u32>), String> {
    let (name, count) = match s.split_once(':') {
        Some((n, c)) => (n, Some(c.parse::<u32>().map_err(|_| format!("bad fault count in {s:?}"))?)),
        None => (s, None),
    };
    Ok((name.parse()?, count))
}

fn write_file(dir: &Path, name: &str, contents: &str, mode: u32) -> io::Result<()> {
    let path = dir.join(name);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&path)?;
    // The mode only applies on creation; an existing file must be tightened too.
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

fn write_dir(dir: &Path, emu: &Emulator) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    write_file(dir, "tls-root.pem", &emu.tls_root_pem(), 0o644)?;
    write_file(dir, "enos-app-secret", &format!("{}\n", emu.enos.app_secret), 0o600)?;
    write_file(dir, "ezca-bootstrap.token", &format!("{}\n", emu.ezca.bootstrap_token), 0o600)?;
    write_file(dir, "entra-client-secret", &format!("{}\n", emu.ezca.client_secret), 0o600)?;
    let info = json!({
        "url": emu.url(),
        "enos": {
            "app_key": emu.enos.app_key, "org_id": emu.enos.org_id, "asset_id": emu.enos.asset_id,
            "product_key": emu.enos.product_key, "device_key": emu.enos.device_key,
            "max_valid_days": emu.enos.max_valid_days,
        },
        "ezca": {
            "ca_id": emu.ezca.ca_id, "template_id": emu.ezca.template_id, "tenant_id": emu.ezca.tenant_id,
            "client_id": emu.ezca.client_id, "authority": emu.url(),
            "max_validity_days": emu.ezca.max_validity_days,
        },
        "ca": {
            "enos_root_pem": emu.enos_root_pem(), "ezca_root_pem": emu.ezca_root_pem(),
            "ezca_issuing_pem": emu.ezca_issuing_pem(),
        },
    });
    write_file(dir, "emulator.json", &format!("{info:#}\n"), 0o644)?;
    write_agent_configs(dir, emu)
}

/// Ready-to-use enroll-agent configs for this emulator (`agent-enos.json`: P-256 key;
/// `agent-ezca.json`: RSA-2048 key with certificate renewal), so a demo or a person can run the
/// real agent against it without editing anything.
fn write_agent_configs(dir: &Path, emu: &Emulator) -> io::Result<()> {
    let dir = fs::canonicalize(dir)?;
    let common = |backend: &str, algorithm: &str, ca: serde_json::Value| {
        json!({
            "state_dir": dir.join(format!("state-{backend}")),
            "subject": { "CN": "sensor-0042", "O": "Acme", "OU": "Meters", "C": "NL" },
            "san": { "dns": ["sensor-0042.devices.acme.example"], "ip": ["10.0.0.42"] },
            "key": { "algorithm": algorithm, "provider": "file", "rotate_on_renew": true },
            "ca": ca,
            "tls": { "trust_bundle": dir.join("tls-root.pem"), "timeout_s": 10 },
        })
    };
    let enos = common(
        "enos",
        "p256",
        json!({
            "backend": "enos", "api_gateway": emu.url(), "org_id": emu.enos.org_id,
            "asset_id": emu.enos.asset_id, "app_key": emu.enos.app_key,
            "app_secret_file": dir.join("enos-app-secret"), "valid_days": 365,
        }),
    );
    let ezca = common(
        "ezca",
        "rsa2048",
        json!({
            "backend": "ezca", "url": emu.url(), "ca_id": emu.ezca.ca_id,
            "template_id": emu.ezca.template_id, "valid_days": 90,
            "bootstrap": { "token_file": dir.join("ezca-bootstrap.token") },
        }),
    );
    write_file(&dir, "agent-enos.json", &format!("{enos:#}\n"), 0o644)?;
    write_file(&dir, "agent-ezca.json", &format!("{ezca:#}\n"), 0o644)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let emu = match Emulator::start(args.opts) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot start the emulator: {e}");
            return ExitCode::from(70);
        }
    };
    if let Some(dir) = &args.dir {
        if let Err(e) = write_dir(dir, &emu) {
            eprintln!("error: cannot write {}: {e}", dir.display());
            return ExitCode::from(74);
        }
    }
    let mut out = io::stdout().lock();
    // Test harnesses wait for this exact line; flush so a pipe sees it at once.
    let _ = writeln!(out, "ca-emulator ready {}", emu.url());
    let _ = out.flush();
    drop(out);
    // Serve until killed (SIGTERM/SIGINT end the process with the default action).
    loop {
        std::thread::park();
    }
}
