//! enroll-agent: gives an embedded Linux device its own X.509 identity and keeps it renewed.
//!
//! The binary (`main.rs`) parses the command line and calls [`execute`]. Inside: `config` parses the
//! JSON config once into `Settings`; `lifecycle` drives enrollment and renewal through the
//! `backend::CaBackend` trait (one file per CA) and the `enroll_hal` key and storage seams; `pki`
//! checks every issued certificate before it is installed.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod hardware;
pub mod lifecycle;
pub mod report;
pub mod state;

// The CA clients and what they stand on live in the shared crate (design.md §8).
#[cfg(feature = "redtrust")]
pub use enroll_ca::redtrust;
pub use enroll_ca::{backend, csr, error, files, http, json, pki, secret, subject, time, tls};

use cli::Command;
use config::Settings;
use error::{Error, Result};
use lifecycle::{Agent, Done};

/// When this binary was built (from build.rs); a clock earlier than this is known to be wrong
/// (design.md §5 rule 7).
pub fn build_time() -> u64 {
    env!("ENROLL_AGENT_BUILD_UNIX").parse().unwrap_or(0)
}

/// What `main` should print and how it should exit.
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Outcome { stdout, exit_code: 0 }
    }
}

/// `--version`'s `protocols:` line of a build with no protocol feature.
const NO_PROTOCOL: &str = "none (every ca.backend is refused; build with a protocol's cargo feature)";

/// The key providers compiled into this build.
fn providers() -> String {
    let mut names = vec!["file"];
    if cfg!(feature = "redtrust") {
        names.push("redtrust");
    }
    if cfg!(feature = "pkcs11") {
        names.push("pkcs11");
    }
    if cfg!(feature = "tpm") {
        names.push("tpm");
    }
    names.join(" ")
}

/// Runs one parsed command.
pub fn execute(cli: &cli::Cli) -> Result<Outcome> {
    match &cli.command {
        Command::Help => return Ok(Outcome::ok(cli::HELP.to_string())),
        Command::Version => {
            return Ok(Outcome::ok(format!(
                "enroll-agent {}\nkey providers: {}\nprotocols: {}\nbuilt: {} (the clock floor: an earlier clock is not believed)\n",
                env!("CARGO_PKG_VERSION"),
                providers(),
                match config::protocols() {
                    none if none.is_empty() => NO_PROTOCOL.to_string(),
                    names => names.join(" "),
                },
                crate::time::rfc3339(build_time())
            )))
        }
        Command::Run => {
            return daemon::run(&cli.config, cli.metrics_file.as_deref()).map(|_| Outcome::ok(String::new()))
        }
        _ => {}
    }
    let mut settings = Settings::load(&cli.config)?;
    if let Some(path) = &cli.metrics_file {
        settings.metrics_file = Some(path.clone());
    }
    match &cli.command {
        Command::Enroll { force } => with_agent(&settings, |agent| agent.enroll(*force)),
        Command::Renew { force } => with_agent(&settings, |agent| agent.renew(*force)),
        Command::Status { json } => report::status(&settings, *json).map(Outcome::ok),
        Command::Check { online } => report::check(&settings, *online).map(Outcome::ok),
        Command::NeedsRenewal => {
            let due = report::needs_renewal(&settings)?;
            Ok(Outcome {
                stdout: if due { "due\n".into() } else { "not due\n".into() },
                exit_code: if due { 0 } else { 1 },
            })
        }
        Command::Help | Command::Version | Command::Run => unreachable!("handled above"),
    }
}

/// Runs an enroll/renew step and records its failure in state.json.
fn with_agent(settings: &Settings, step: impl FnOnce(&mut Agent) -> Result<Done>) -> Result<Outcome> {
    let mut agent = Agent::open(settings)?;
    let current = agent.store().current_link();
    let result = match step(&mut agent) {
        Ok(done) => Ok(Outcome::ok(describe(&done, &current))),
        Err(error) => {
            agent.record_error(&error);
            Err(error)
        }
    };
    drop(agent);
    report::write_metrics(settings);
    result
}

fn describe(done: &Done, current: &std::path::Path) -> String {
    match done {
        Done::Installed { serial, purpose } => {
            format!("{}: installed certificate serial {serial} in {}\n", purpose.name(), current.display())
        }
        Done::AlreadyEnrolled => {
            format!("enroll: a valid identity is already installed in {}\n", current.display())
        }
        Done::NotDue { renew_at } => format!("renew: not due until {}\n", time::rfc3339(*renew_at)),
    }
}

/// The error chain as printed by `main`: `error: …` then `caused by: …` lines.
pub fn format_error(error: &Error) -> String {
    let mut text = format!("error: {error}\n");
    let mut next = std::error::Error::source(error);
    while let Some(cause) = next {
        // Causes that are not our Error (io, JSON, TLS) may quote a peer: make them one safe line.
        let cause_text = error::sanitize(&cause.to_string(), error::MAX_MESSAGE_CHARS);
        text.push_str(&format!("caused by: {cause_text}\n"));
        next = cause.source();
    }
    text
}
