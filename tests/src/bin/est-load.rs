//! `est-load tokens --devices N --seed S [--prefix P] [--label L]` prints SQL inserting one
//! one-time token per device into an enroll-gateway database (the SHA-256 the gateway keeps, as
//! `enroll-gateway token create` stores it; 1,000 CLI runs would measure process start-up).
//!
//! `est-load run --gateway URL [--gateway URL…] --trust PEM --devices N --seed S [--prefix P]
//! [--label L] [--concurrency C] [--deadline-s D] [--phase enroll|renew|both]`: the simulated
//! fleet of the gateway load benchmark (tests/bench/gateway.sh) and the replica-kill test. It
//! pre-generates N P-256 keys and CSRs (CN = device id, DNS SAN `{device}.devices.acme.example`),
//! then, C devices at a time, sends `simpleenroll` with HTTP Basic (device id, token) to the
//! gateways in turn, then `simplereenroll` with a new key over TLS client authentication with the
//! certificate it got. A device retries its identical request on 202/503 (after `Retry-After`,
//! at most 2 s) and on a connection error, each time at the next gateway, until `--deadline-s`
//! (60). Prints per phase: devices, ok, errors, retries, requests/s, p50/p99/max latency of one
//! device's phase (retries included), and a last line `est-load {json}`. Exit 0 when every device
//! completed, 1 otherwise.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use enroll_tests::client::{self, Identity};
use enroll_tests::util;
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

const USAGE: &str = "usage: est-load tokens --devices N --seed S [--prefix P] [--label L]\n       est-load run --gateway URL [--gateway URL...] --trust PEM --devices N --seed S [--prefix P] [--label L] [--concurrency C] [--deadline-s D] [--phase enroll|renew|both]";

struct Args {
    cmd: String,
    gateways: Vec<String>,
    trust: String,
    devices: usize,
    seed: String,
    prefix: String,
    label: String,
    concurrency: usize,
    deadline: Duration,
    phase: String,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or("missing command")?;
    if cmd != "tokens" && cmd != "run" {
        return Err(format!("unknown command {cmd:?}"));
    }
    let mut a = Args {
        cmd,
        gateways: Vec::new(),
        trust: String::new(),
        devices: 0,
        seed: String::new(),
        prefix: "dev-".into(),
        label: "meters".into(),
        concurrency: 32,
        deadline: Duration::from_secs(60),
        phase: "both".into(),
    };
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|_| format!("{k}: not a number"));
        match k.as_str() {
            "--gateway" => a.gateways.push(v),
            "--trust" => a.trust = std::fs::read_to_string(&v).map_err(|e| format!("--trust {v}: {e}"))?,
            "--devices" => a.devices = num(&v)?,
            "--seed" => a.seed = v,
            "--prefix" => a.prefix = v,
            "--label" => a.label = v,
            "--concurrency" => a.concurrency = num(&v)?.max(1),
            "--deadline-s" => a.deadline = Duration::from_secs(num(&v)? as u64),
            "--phase" if ["enroll", "renew", "both"].contains(&v.as_str()) => a.phase = v,
            _ => return Err(format!("unknown argument {k:?}")),
        }
    }
    if a.devices == 0 || a.seed.is_empty() {
        return Err("--devices and --seed are required".into());
    }
    if a.cmd == "run" && (a.gateways.is_empty() || a.trust.is_empty()) {
        return Err("run needs --gateway and --trust".into());
    }
    Ok(a)
}

fn device_id(a: &Args, i: usize) -> String {
    format!("{}{i:05}", a.prefix)
}

/// The device's one-time password: derived from the seed, so `tokens` and `run` agree.
fn token(a: &Args, device: &str) -> String {
    util::sha256_hex(&[a.seed.as_bytes(), b"/", device.as_bytes()])[..32].to_string()
}

fn tokens_sql(a: &Args) {
    let now = util::now_s();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "BEGIN;");
    for i in 0..a.devices {
        let d = device_id(a, i);
        let sha = util::sha256_hex(&[token(a, &d).as_bytes()]);
        let _ = writeln!(
            out,
            "INSERT INTO tokens (token_sha256, label, device, created_at, expires_at) VALUES ('{sha}', '{}', '{d}', {now}, {});",
            a.label,
            now + 86_400
        );
    }
    let _ = writeln!(out, "COMMIT;");
}

/// A key and its CSR (base64 DER, the EST body).
fn key_and_csr(device: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, device);
    p.subject_alt_names =
        vec![SanType::DnsName(format!("{device}.devices.acme.example").try_into().expect("dns name"))];
    let csr = p.serialize_request(&key).expect("CSR");
    (key, base64::engine::general_purpose::STANDARD.encode(csr.der()))
}

/// The certificate in a certs-only PKCS#7 answer whose public key is `key`'s.
fn leaf_for(body: &[u8], key: &KeyPair) -> Option<Vec<u8>> {
    let text: String = String::from_utf8_lossy(body).split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    let spki = key.public_key_der();
    (0..der.len()).filter(|&i| der[i] == 0x30).find_map(|i| {
        let (rest, cert) = x509_parser::parse_x509_certificate(&der[i..]).ok()?;
        let len = der.len() - i - rest.len();
        (cert.tbs_certificate.subject_pki.raw == spki.as_slice()).then(|| der[i..i + len].to_vec())
    })
}

#[derive(Default)]
struct Phase {
    ok: usize,
    errors: Vec<String>,
    retries: usize,
    latencies: Vec<Duration>,
}

struct Device {
    id: String,
    key: Option<KeyPair>,
    cert: Option<Vec<u8>>,
}

/// One device's request until it is answered 200 or the deadline passes: (certificate, retries)
/// or the last failure.
fn exchange(
    a: &Args,
    next: &AtomicUsize,
    path: &str,
    auth: Option<&str>,
    identity: Option<&Identity>,
    body: &str,
    key: &KeyPair,
) -> (Result<Vec<u8>, String>, usize) {
    let started = Instant::now();
    let mut retries = 0;
    loop {
        let base = &a.gateways[next.fetch_add(1, Ordering::Relaxed) % a.gateways.len()];
        let mut headers = vec![("Content-Type", "application/pkcs10"), ("Connection", "close")];
        if let Some(auth) = auth {
            headers.push(("Authorization", auth));
        }
        let r = client::request_with_identity(
            base,
            &a.trust,
            identity.map(|(c, k)| (c.clone(), k.clone_key())),
            "POST",
            path,
            &headers,
            body.as_bytes(),
            Duration::from_secs(30),
        );
        let (why, wait) = match r {
            Ok(r) if r.status == 200 => {
                return (leaf_for(&r.body, key).ok_or_else(|| "200 without our certificate".into()), retries)
            }
            Ok(r) if r.status == 202 || r.status == 503 => {
                let ra = r.header("Retry-After").and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
                (format!("{} at {base}", r.status), Duration::from_secs(ra.min(2)))
            }
            Ok(r) => return (Err(format!("{} at {base}: {}", r.status, r.text().trim())), retries),
            Err(e) => (format!("{e} at {base}"), Duration::from_millis(100)),
        };
        if started.elapsed() + wait > a.deadline {
            return (Err(format!("deadline passed; last: {why}")), retries);
        }
        retries += 1;
        std::thread::sleep(wait);
    }
}

fn run_phase(a: &Args, devices: &Mutex<Vec<Device>>, renew: bool) -> (Phase, Duration) {
    let phase = Mutex::new(Phase::default());
    let cursor = AtomicUsize::new(0);
    let rr = AtomicUsize::new(0);
    // New keys and CSRs are made before the clock starts: the device side must be cheap.
    let prepared: Vec<(KeyPair, String)> = {
        let devs = devices.lock().unwrap();
        devs.iter().map(|d| key_and_csr(&d.id)).collect()
    };
    let prepared = Mutex::new(prepared.into_iter().map(Some).collect::<Vec<_>>());
    let path =
        format!("/.well-known/est/{}/{}", a.label, if renew { "simplereenroll" } else { "simpleenroll" });
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.concurrency.min(a.devices) {
            s.spawn(|| loop {
                let i = cursor.fetch_add(1, Ordering::Relaxed);
                if i >= a.devices {
                    break;
                }
                let (key, csr) = prepared.lock().unwrap()[i].take().expect("prepared once");
                let (id, old) = {
                    let devs = devices.lock().unwrap();
                    (
                        devs[i].id.clone(),
                        devs[i].key.as_ref().map(|k| k.serialize_der()).zip(devs[i].cert.clone()),
                    )
                };
                let t = Instant::now();
                let result = match (renew, old) {
                    (false, _) => {
                        let basic = base64::engine::general_purpose::STANDARD
                            .encode(format!("{id}:{}", token(a, &id)));
                        exchange(a, &rr, &path, Some(&format!("Basic {basic}")), None, &csr, &key)
                    }
                    (true, Some((old_key, cert))) => {
                        let identity: Identity = (
                            vec![CertificateDer::from(cert)],
                            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(old_key)),
                        );
                        exchange(a, &rr, &path, None, Some(&identity), &csr, &key)
                    }
                    (true, None) => (Err("no certificate to renew with".into()), 0),
                };
                let took = t.elapsed();
                let mut p = phase.lock().unwrap();
                p.retries += result.1;
                match result.0 {
                    Ok(cert) => {
                        p.ok += 1;
                        p.latencies.push(took);
                        drop(p);
                        let mut devs = devices.lock().unwrap();
                        devs[i].key = Some(key);
                        devs[i].cert = Some(cert);
                    }
                    Err(e) => p.errors.push(format!("{id}: {e}")),
                }
            });
        }
    });
    (phase.into_inner().unwrap(), started.elapsed())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(name: &str, p: &mut Phase, wall: Duration) -> serde_json::Value {
    p.latencies.sort();
    let rate = p.ok as f64 / wall.as_secs_f64().max(1e-9);
    let v = json!({
        "ok": p.ok, "errors": p.errors.len(), "retries": p.retries,
        "wall_s": (wall.as_secs_f64() * 1000.0).round() / 1000.0,
        "per_s": (rate * 10.0).round() / 10.0,
        "p50_ms": pct(&p.latencies, 0.50).round(), "p99_ms": pct(&p.latencies, 0.99).round(),
        "max_ms": pct(&p.latencies, 1.0).round(),
    });
    println!(
        "{name}: {} ok, {} errors, {} retries in {:.2} s: {:.1}/s, latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        p.ok,
        p.errors.len(),
        p.retries,
        wall.as_secs_f64(),
        rate,
        pct(&p.latencies, 0.5),
        pct(&p.latencies, 0.99),
        pct(&p.latencies, 1.0)
    );
    for e in p.errors.iter().take(5) {
        println!("  {name} error: {e}");
    }
    v
}

fn main() -> std::process::ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("est-load: {e}\n{USAGE}");
            return std::process::ExitCode::from(64);
        }
    };
    if a.cmd == "tokens" {
        tokens_sql(&a);
        return std::process::ExitCode::SUCCESS;
    }
    let devices =
        Mutex::new((0..a.devices).map(|i| Device { id: device_id(&a, i), key: None, cert: None }).collect());
    let mut summary =
        json!({ "devices": a.devices, "concurrency": a.concurrency, "gateways": a.gateways.len() });
    let mut failed = false;
    if a.phase != "renew" {
        let (mut p, wall) = run_phase(&a, &devices, false);
        failed |= !p.errors.is_empty();
        summary["enroll"] = report("enroll", &mut p, wall);
    }
    if a.phase != "enroll" {
        let (mut p, wall) = run_phase(&a, &devices, true);
        failed |= !p.errors.is_empty();
        summary["renew"] = report("renew", &mut p, wall);
    }
    println!("est-load {summary}");
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
