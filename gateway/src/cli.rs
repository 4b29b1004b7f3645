//! The command line (design.md §9): `serve`, `check`, `token create`, `device list|show|revoke`,
//! `audit`, and `request stuck|release` for submissions a dead replica left behind. Exit codes as design.md §2.

use crate::config::{Settings, DEFAULT_CONFIG};
use crate::error::{report, Error, Kind};
use crate::store::{AuditRow, Store};
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Parser, Debug)]
#[command(name = "enroll-gateway", version, about = "EST registration authority in front of vendor CA APIs")]
struct Cli {
    /// Config file [env ENROLL_GATEWAY_CONFIG; default /etc/enroll-gateway/config.json]
    #[arg(short = 'c', long = "config", env = "ENROLL_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply schema migrations, serve EST on `listen` and metrics/health on `admin_listen`
    Serve,
    /// Validate the config, open the database, report the schema version
    Check {
        /// Also reach every upstream CA
        #[arg(long)]
        online: bool,
    },
    /// One-time enrollment passwords
    #[command(subcommand)]
    Token(TokenCommand),
    /// What the gateway issued, per device
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Submissions to a CA that a replica started and never finished
    #[command(subcommand)]
    Request(RequestCommand),
    /// Every decision: who, label, operation, outcome, upstream reference, reason
    Audit {
        /// Only decisions at or after this time (RFC 3339, e.g. 2026-12-01T00:00:00Z)
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a new one-time enrollment password (only its SHA-256 is stored)
    Create {
        #[arg(long)]
        label: String,
        #[arg(long)]
        device: String,
        /// Lifetime in seconds; default 7 days
        #[arg(long = "ttl-s", default_value_t = 604_800)]
        ttl_s: u64,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Refuse every further enroll and renew of this device
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum RequestCommand {
    /// List submissions whose replica stopped during the vendor call: the vendor may or may not
    /// have them, so the gateway never submits them again by itself
    Stuck {
        #[arg(long)]
        json: bool,
    },
    /// Let the device's next identical request be submitted again. Check the vendor first: if
    /// it issued a certificate for this CSR, releasing gets the device a second one
    Release {
        #[arg(long)]
        label: String,
        /// SHA-256 (hex) of the CSR, as `request stuck` and the device's 503 answer show it
        #[arg(long)]
        csr: String,
    },
}

/// Runs the command line; returns the exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => Kind::Usage.exit_code(),
            };
        }
    };
    log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Info)).ok();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{}", report(&e));
            e.kind().exit_code()
        }
    }
}

/// One line per record on stderr; systemd adds the time.
struct StderrLogger;
static LOGGER: StderrLogger = StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info && m.target().starts_with("enroll_gateway")
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("{}: {}", r.level().as_str().to_ascii_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn runtime(multi: bool) -> Result<tokio::runtime::Runtime, Error> {
    let mut b = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().map_err(|e| Error::with_source(Kind::Internal, "starting the async runtime", e))
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn rfc3339(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

fn json_out<T: serde::Serialize>(v: &T) -> Result<(), Error> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| Error::with_source(Kind::Internal, "writing JSON", e))?;
    println!("{text}");
    Ok(())
}

fn run(cli: Cli) -> Result<(), Error> {
    let settings = Settings::load(&cli.config)?;
    match cli.command {
        Command::Serve => runtime(true)?.block_on(serve(settings)),
        Command::Check { online } => runtime(false)?.block_on(check(settings, online)),
        Command::Token(TokenCommand::Create { label, device, ttl_s }) => {
            let l = settings
                .labels
                .get(&label)
                .ok_or_else(|| Error::usage(format!("--label {label}: not a label of the config")))?;
            if !l.tokens {
                return Err(Error::usage(format!(
                    "--label {label}: bootstrap.tokens is false for this label"
                )));
            }
            if device.is_empty()
                || device.len() > 128
                || !device.chars().all(|c| c.is_ascii_graphic() && c != '/' && c != ':')
            {
                return Err(Error::usage("--device: 1-128 printable ASCII characters without '/' or ':'"));
            }
            if ttl_s == 0 {
                return Err(Error::usage("--ttl-s: must be at least 1"));
            }
            let mut raw = [0u8; 20];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
                .map_err(|_| Error::new(Kind::Internal, "the system random generator failed"))?;
            let token = crate::pki::hex(&raw);
            let t = now();
            runtime(false)?.block_on(async {
                let store = open(&settings).await?;
                store
                    .token_create(
                        &crate::pki::sha256_hex(token.as_bytes()),
                        &label,
                        &device,
                        t,
                        t + ttl_s as i64,
                    )
                    .await?;
                store
                    .audit(&AuditRow {
                        at: t,
                        peer: "cli".into(),
                        who: device.clone(),
                        label: label.clone(),
                        operation: "token-create".into(),
                        outcome: "ok".into(),
                        upstream_ref: None,
                        reason: Some(format!("expires {}", rfc3339(t + ttl_s as i64))),
                    })
                    .await
            })?;
            println!("{token}");
            Ok(())
        }
        Command::Device(cmd) => runtime(false)?.block_on(device(settings, cmd)),
        Command::Request(cmd) => runtime(false)?.block_on(request(settings, cmd)),
        Command::Audit { since, json } => {
            let since = match since {
                None => 0,
                Some(s) => OffsetDateTime::parse(&s, &Rfc3339)
                    .map_err(|e| Error::usage(format!("--since {s:?}: not RFC 3339 ({e})")))?
                    .unix_timestamp(),
            };
            runtime(false)?.block_on(async {
                let store = open(&settings).await?;
                let rows = store.audit_since(since).await?;
                if json {
                    #[derive(serde::Serialize)]
                    struct Out<'a> {
                        time: String,
                        #[serde(flatten)]
                        row: &'a AuditRow,
                    }
                    return json_out(
                        &rows.iter().map(|row| Out { time: rfc3339(row.at), row }).collect::<Vec<_>>(),
                    );
                }
                for r in &rows {
                    println!(
                        "{} {} {} {} {} {} ref={} {}",
                        rfc3339(r.at),
                        r.peer,
                        r.who,
                        r.label,
                        r.operation,
                        r.outcome,
                        r.upstream_ref.as_deref().unwrap_or("-"),
                        r.reason.as_deref().unwrap_or("")
                    );
                }
                Ok(())
            })
        }
    }
}

/// Opens the database for an admin command; the schema must be current (`serve` migrates).
async fn open(settings: &Settings) -> Result<Store, Error> {
    let store = Store::open(&settings.database).await?;
    let (have, want) = store.schema_version().await?;
    if have != want {
        return Err(Error::new(
            Kind::Storage,
            format!("database {}: schema version {have}, this build needs {want}: run `enroll-gateway serve` once to migrate", settings.database.shown()),
        ));
    }
    Ok(store)
}

async fn serve(settings: Settings) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| signal(k).map_err(|e| Error::with_source(Kind::Internal, "installing signal handlers", e));
    let (mut term, mut int, mut hup) =
        (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?, sig(SignalKind::hangup())?);
    let running = crate::server::ServerBuilder::new(settings).start().await?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Err(e) = running.reload_tls() {
                    log::error!("SIGHUP: keeping the old certificate: {}", report(&e).replace('\n', "; "));
                }
            }
        }
    }
    log::info!("draining and stopping");
    running.shutdown().await;
    Ok(())
}

async fn check(settings: Settings, online: bool) -> Result<(), Error> {
    crate::server::load_tls(&settings)?;
    println!("config: ok ({} labels)", settings.labels.len());
    let store = Store::open(&settings.database).await?;
    let (have, want) = store.schema_version().await?;
    println!(
        "database {}: schema version {have} of {want}{}",
        settings.database.shown(),
        if have < want { " (serve applies the missing migrations)" } else { "" }
    );
    let mut failed = Vec::new();
    for (name, l) in &settings.labels {
        match crate::upstream::build_upstream(name, &l.ca, &settings.upstream) {
            Ok(up) => {
                if online {
                    match tokio::task::spawn_blocking(move || up.check()).await {
                        Ok(Ok(())) => println!("label {name}: upstream reachable"),
                        Ok(Err(e)) => {
                            failed.push(Error::new(Kind::Temporary, format!("labels.{name}.ca: {e}")))
                        }
                        Err(e) => failed.push(Error::new(Kind::Internal, format!("labels.{name}.ca: {e}"))),
                    }
                } else {
                    println!("label {name}: ok");
                }
            }
            Err(e) => failed.push(Error::config(e)),
        }
    }
    match failed.len() {
        0 => Ok(()),
        _ => {
            for e in &failed[1..] {
                eprintln!("{}", report(e));
            }
            Err(failed.swap_remove(0))
        }
    }
}

async fn device(settings: Settings, cmd: DeviceCommand) -> Result<(), Error> {
    let store = open(&settings).await?;
    match cmd {
        DeviceCommand::List { json } => {
            let devices = store.devices().await?;
            if json {
                return json_out(&devices);
            }
            println!("{:<32} {:<8} {:>5}  LATEST NOT AFTER", "DEVICE", "REVOKED", "CERTS");
            for d in devices {
                println!(
                    "{:<32} {:<8} {:>5}  {}",
                    d.device,
                    if d.revoked { "yes" } else { "no" },
                    d.certificates,
                    d.latest_not_after.map(rfc3339).unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        DeviceCommand::Show { id, json } => {
            let Some(d) = store.device(&id).await? else {
                return Err(Error::usage(format!("device {id}: the gateway has no record of it")));
            };
            let certs = store.certificates_of(&id).await?;
            if json {
                return json_out(&serde_json::json!({ "device": d, "certificates": certs }));
            }
            println!("device {}: {}", d.device, if d.revoked { "revoked" } else { "active" });
            for c in certs {
                println!(
                    "  {} serial {} issued {} not after {} ref {}",
                    c.label,
                    c.serial,
                    rfc3339(c.issued_at),
                    rfc3339(c.not_after),
                    c.upstream_ref.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        DeviceCommand::Revoke { id } => {
            let changed = store.device_revoke(&id, now()).await?;
            store
                .audit(&AuditRow {
                    at: now(),
                    peer: "cli".into(),
                    who: id.clone(),
                    label: "-".into(),
                    operation: "device-revoke".into(),
                    outcome: if changed { "revoked".into() } else { "already-revoked".into() },
                    upstream_ref: None,
                    reason: None,
                })
                .await?;
            println!("device {id}: {}", if changed { "revoked" } else { "was already revoked" });
            Ok(())
        }
    }
}

async fn request(settings: Settings, cmd: RequestCommand) -> Result<(), Error> {
    let store = open(&settings).await?;
    let stale_s = crate::est::stale_submit_s(settings.upstream.timeout_s);
    let stale_before = now() - stale_s;
    match cmd {
        RequestCommand::Stuck { json } => {
            let stuck = store.stuck_requests(stale_before).await?;
            if json {
                return json_out(&stuck);
            }
            println!("{:<16} {:<32} {:<14} {:<20} CSR SHA-256", "LABEL", "DEVICE", "OPERATION", "CLAIMED");
            for r in stuck {
                println!(
                    "{:<16} {:<32} {:<14} {:<20} {}",
                    r.label,
                    r.device,
                    r.operation,
                    rfc3339(r.claimed_at),
                    r.csr_sha256
                );
            }
            Ok(())
        }
        RequestCommand::Release { label, csr } => {
            let csr = csr.to_ascii_lowercase();
            if !settings.labels.contains_key(&label) {
                return Err(Error::usage(format!("--label {label}: not a label of the config")));
            }
            if csr.len() != 64 || !csr.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::usage("--csr: the CSR's SHA-256 as 64 hex digits"));
            }
            if !store.release_stuck(&label, &csr, stale_before).await? {
                return Err(Error::usage(format!(
                    "--csr {csr}: no stuck request of label {label} (only a submission claimed more than \
                     {stale_s} s ago and never finished can be released; see `request stuck`)"
                )));
            }
            store
                .audit(&AuditRow {
                    at: now(),
                    peer: "cli".into(),
                    who: "operator".into(),
                    label: label.clone(),
                    operation: "request-release".into(),
                    outcome: "released".into(),
                    upstream_ref: None,
                    reason: Some(format!("csr {csr}")),
                })
                .await?;
            println!("request {csr} of label {label}: released; the device's next retry is submitted again");
            Ok(())
        }
    }
}
