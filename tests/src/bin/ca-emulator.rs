//! `ca-emulator [--port N] [--dir DIR] [--fault NAME[:COUNT]] [--fault-delay-ms MS] [--pending-polls N] [--client-cert] [--est-label L] [--enos-fleet] [--enos-leaf-lifetime-s S]`
//!
//! Starts the EnOS + EZCA + Sectigo + Securosys + Redtrust + EST + ACME + SCEP emulator (see the
//! `enroll_tests` crate docs), writes what a client needs into DIR (0700): `tls-root.pem`,
//! `securosys-ca-bundle.pem` (issuing then root); secrets (0600, one trailing newline)
//! `enos-app-secret`, `ezca-bootstrap.token`, `entra-client-secret`, `sectigo-password`,
//! `securosys-jwt`, `securosys-api-key`, `securosys-key-password`, `redtrust-hmac-secret`,
//! `scep-challenge`; `emulator.json` (URL and identifiers, no secrets); enroll-agent configs for
//! this emulator: `agent-enos.json`, `agent-ezca.json`, `agent-sectigo.json`,
//! `agent-securosys.json` (synchronous sign), `agent-securosys-approval.json` (approval flow) and
//! `agent-redtrust-enos.json` (Redtrust key, EnOS CA), `agent-est.json` (EST, factory certificate
//! `est-factory.pem` / `est-factory.key` (0600)), `agent-acme.json` (ACME, http-01),
//! `agent-scep.json` (SCEP, RSA-2048, challenge password `scep-challenge`, the SCEP CA pinned by
//! `ca_fingerprint`) and `agent-est-basic.json` (EST, HTTP Basic with `est-password` (0600));
//! `est-ca.pem` is the EST issuing CA then root, `scep-ca.pem` the SCEP CA. With `--dir`, TLS
//! client certificates are requested (optionally) as if `--client-cert` were given, so the EST
//! factory-certificate config works. Prints `ca-emulator ready <url>` and
//! serves until killed. `--enos-fleet`: every EnOS deviceKey of the product is a registered
//! device with its own current certificate (the gateway names devices by `{device}`).

use enroll_tests::{Emulator, Fault, Options};
use serde_json::json;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: ca-emulator [--port N] [--dir DIR] [--fault NAME[:COUNT]] [--fault-delay-ms MS] [--pending-polls N] [--client-cert] [--est-label L] [--enos-fleet] [--enos-leaf-lifetime-s S]";

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
            "--pending-polls" => {
                opts.pending_polls =
                    value("--pending-polls")?.parse().map_err(|_| "--pending-polls: not a number")?
            }
            "--client-cert" => opts.request_client_cert = true,
            "--est-label" => opts.est.label = value("--est-label")?,
            "--enos-fleet" => opts.enos.fleet = true,
            "--enos-leaf-lifetime-s" => {
                let seconds = value("--enos-leaf-lifetime-s")?;
                opts.enos.leaf_lifetime_s =
                    Some(seconds.parse().map_err(|_| "--enos-leaf-lifetime-s: not a number of seconds")?);
            }
            "-h" | "--help" => {
                println!("{USAGE}\nfaults: {}", enroll_tests::fault::names());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    // The EST factory-certificate config needs the server to ask for a client certificate;
    // asking is harmless to clients without one.
    if dir.is_some() {
        opts.request_client_cert = true;
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
    write_file(dir, "sectigo-password", &format!("{}\n", emu.sectigo.password), 0o600)?;
    write_file(dir, "securosys-jwt", &format!("{}\n", emu.securosys.jwt), 0o600)?;
    write_file(dir, "securosys-api-key", &format!("{}\n", emu.securosys.api_key), 0o600)?;
    let key_password = emu.securosys.key_password.clone().unwrap_or_default();
    write_file(dir, "securosys-key-password", &format!("{key_password}\n"), 0o600)?;
    write_file(dir, "redtrust-hmac-secret", &format!("{}\n", emu.redtrust.hmac_secret), 0o600)?;
    write_file(dir, "securosys-ca-bundle.pem", &emu.securosys_ca_bundle_pem(), 0o644)?;
    write_file(dir, "est-password", &format!("{}\n", emu.est.password), 0o600)?;
    write_file(dir, "est-factory.pem", &emu.factory_cert_pem(), 0o600)?;
    write_file(dir, "est-factory.key", &emu.factory_key_pem(), 0o600)?;
    write_file(dir, "est-ca.pem", &format!("{}{}", emu.est_issuing_pem(), emu.est_root_pem()), 0o644)?;
    write_file(dir, "scep-challenge", &format!("{}\n", emu.scep.challenge), 0o600)?;
    write_file(dir, "scep-ca.pem", &emu.scep_ca_pem(), 0o644)?;
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
        "sectigo": {
            "customer_uri": emu.sectigo.customer_uri, "login": emu.sectigo.login,
            "org_id": emu.sectigo.org_id, "cert_type": emu.sectigo.cert_type, "terms": emu.sectigo.terms,
        },
        "securosys": {
            "sign_key_name": emu.securosys.sign_key_name,
            "key_password": emu.securosys.key_password.is_some(),
            "require_jwt": emu.securosys.require_jwt, "require_api_key": emu.securosys.require_api_key,
        },
        "redtrust": {
            "partner": emu.redtrust.partner, "domain": emu.redtrust.domain,
            "redirect_url": emu.redtrust.redirect_url, "username": emu.redtrust.username,
            "ca_provider": emu.redtrust.ca_provider, "token_lifetime_s": emu.redtrust.token_lifetime_s,
        },
        "est": {
            "label": emu.est.label, "username": emu.est.username,
            "retry_after_s": emu.est.retry_after_s, "valid_days": emu.est.valid_days,
        },
        "scep": {
            "path": "/scep", "ca_fingerprint": emu.scep_ca_fingerprint(),
            "caps": emu.scep.caps, "pending_polls": emu.scep.pending_polls,
            "reply_cipher": emu.scep.reply_cipher.name(), "valid_days": emu.scep.valid_days,
        },
        "ca": {
            "enos_root_pem": emu.enos_root_pem(), "ezca_root_pem": emu.ezca_root_pem(),
            "ezca_issuing_pem": emu.ezca_issuing_pem(), "sectigo_root_pem": emu.sectigo_root_pem(),
            "sectigo_issuing_pem": emu.sectigo_issuing_pem(), "securosys_root_pem": emu.securosys_root_pem(),
            "securosys_issuing_pem": emu.securosys_issuing_pem(),
            "est_root_pem": emu.est_root_pem(), "est_issuing_pem": emu.est_issuing_pem(),
            "factory_ca_pem": emu.factory_ca_pem(),
        },
    });
    write_file(dir, "emulator.json", &format!("{info:#}\n"), 0o644)?;
    write_agent_configs(dir, emu)
}

/// Ready-to-use enroll-agent configs for this emulator (`agent-enos.json`: P-256 key;
/// `agent-ezca.json`: RSA-2048 key with certificate renewal; `agent-sectigo.json`: P-256;
/// `agent-securosys.json` / `agent-securosys-approval.json`: P-256, synchronous or approval
/// flow; `agent-redtrust-enos.json`: Redtrust-held RSA-2048 key issued by EnOS; `agent-est.json`,
/// `agent-est-basic.json`, `agent-acme.json`: P-256; `agent-scep.json`: RSA-2048, the only key
/// SCEP takes), so a demo or a person can run the real agent against it without editing anything.
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
    let sectigo = common(
        "sectigo",
        "p256",
        json!({
            "backend": "sectigo", "url": emu.url(), "customer_uri": emu.sectigo.customer_uri,
            "login": emu.sectigo.login, "password_file": dir.join("sectigo-password"),
            "org_id": emu.sectigo.org_id, "cert_type": emu.sectigo.cert_type, "term": emu.sectigo.terms[0],
            "external_requester": "ops@acme.example", "comments": "enroll-agent via ca-emulator",
            "poll_interval_s": 1, "poll_wait_s": 30,
        }),
    );
    let securosys = |approval: bool| {
        common(
            if approval { "securosys-approval" } else { "securosys" },
            "p256",
            json!({
                "backend": "securosys", "url": emu.url(), "sign_key_name": emu.securosys.sign_key_name,
                "key_password_file": dir.join("securosys-key-password"),
                "signature_algorithm": "SHA256_WITH_RSA", "key_usage": ["DIGITAL_SIGNATURE"],
                "extended_key_usage": ["CLIENT_AUTH"], "approval": approval,
                "jwt_file": dir.join("securosys-jwt"), "api_key_file": dir.join("securosys-api-key"),
                "valid_days": 90, "ca_bundle": dir.join("securosys-ca-bundle.pem"),
                "poll_interval_s": 1, "poll_wait_s": 30,
            }),
        )
    };
    // Redtrust keys: RSA-2048, no SANs (design.md §7); the certificate comes from EnOS.
    let mut redtrust = common(
        "redtrust-enos",
        "rsa2048",
        json!({
            "backend": "enos", "api_gateway": emu.url(), "org_id": emu.enos.org_id,
            "asset_id": emu.enos.asset_id, "app_key": emu.enos.app_key,
            "app_secret_file": dir.join("enos-app-secret"), "valid_days": 365,
        }),
    );
    redtrust.as_object_mut().map(|o| o.remove("san"));
    redtrust["key"] = json!({
        "algorithm": "rsa2048", "provider": "redtrust",
        "redtrust": {
            "url": emu.url(), "auth_url": emu.url(), "partner": emu.redtrust.partner,
            "hmac_secret_file": dir.join("redtrust-hmac-secret"), "domain": emu.redtrust.domain,
            "redirect_url": emu.redtrust.redirect_url, "ca_provider": emu.redtrust.ca_provider,
            "hash_type": "SHA256",
        },
    });
    // EST (design.md §8): the factory certificate enrolls, or HTTP Basic with a password file.
    let est = |bootstrap: serde_json::Value, name: &str| {
        common(
            name,
            "p256",
            json!({
                "backend": "est", "url": emu.url(), "label": emu.est.label, "bootstrap": bootstrap,
                "poll_wait_s": 30, "poll_timeout_s": 300,
            }),
        )
    };
    let est_cert = est(
        json!({ "cert_file": dir.join("est-factory.pem"), "key_file": dir.join("est-factory.key") }),
        "est",
    );
    let est_basic =
        est(json!({ "username": emu.est.username, "password_file": dir.join("est-password") }), "est-basic");
    // ACME (design.md §10): the emulator validates a challenge as soon as it is answered (as
    // Pebble with PEBBLE_VA_ALWAYS_VALID), so the http-01 listener may take any free port.
    let acme = common(
        "acme",
        "p256",
        json!({
            "backend": "acme", "directory": format!("{}/acme/directory", emu.url()),
            "contact": ["mailto:ops@acme.example"], "terms_agreed": true,
            "challenge": "http-01", "http01_listen": "127.0.0.1:0", "poll_wait_s": 30,
        }),
    );
    // SCEP (RFC 8894): RSA only (the CA encrypts its answer to the device key); the CA
    // certificate GetCACert returns is pinned by its SHA-256.
    let scep = common(
        "scep",
        "rsa2048",
        json!({
            "backend": "scep", "url": format!("{}/scep", emu.url()),
            "ca_fingerprint": format!("sha256:{}", emu.scep_ca_fingerprint()),
            "challenge_password_file": dir.join("scep-challenge"),
            "poll_interval_s": 1, "poll_wait_s": 30,
        }),
    );
    write_file(&dir, "agent-acme.json", &format!("{acme:#}\n"), 0o644)?;
    write_file(&dir, "agent-scep.json", &format!("{scep:#}\n"), 0o644)?;
    write_file(&dir, "agent-est.json", &format!("{est_cert:#}\n"), 0o644)?;
    write_file(&dir, "agent-est-basic.json", &format!("{est_basic:#}\n"), 0o644)?;
    write_file(&dir, "agent-enos.json", &format!("{enos:#}\n"), 0o644)?;
    write_file(&dir, "agent-ezca.json", &format!("{ezca:#}\n"), 0o644)?;
    write_file(&dir, "agent-sectigo.json", &format!("{sectigo:#}\n"), 0o644)?;
    write_file(&dir, "agent-securosys.json", &format!("{:#}\n", securosys(false)), 0o644)?;
    write_file(&dir, "agent-securosys-approval.json", &format!("{:#}\n", securosys(true)), 0o644)?;
    write_file(&dir, "agent-redtrust-enos.json", &format!("{redtrust:#}\n"), 0o644)
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
