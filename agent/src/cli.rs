//! The command line of design.md §2, parsed by hand (a flag parser crate would cost more bytes
//! than these sixty lines).

use std::path::PathBuf;

use crate::config::DEFAULT_CONFIG_PATH;
use crate::error::{Error, Kind, Result};

pub const HELP: &str = "\
enroll-agent: gives this device its own X.509 identity and keeps it renewed

usage: enroll-agent [-c|--config PATH] [-v|-q] COMMAND [OPTIONS]

commands:
  enroll [--force]   first enrollment; does nothing when a valid identity is installed
  renew [--force]    renew when due (--force: now), authenticating with the current certificate
  run                enroll if needed, then renew whenever due (for a systemd service)
  status [--json]    show the installed identity, renewal time, pending request, last error
  check [--online]   validate config, storage, key and trust bundle (--online: reach the CA)
  needs-renewal      exit 0 when enrollment or renewal is due, 1 when not

options:
  -c, --config PATH  config file (default: $ENROLL_AGENT_CONFIG or /etc/enroll-agent/config.json)
  --metrics-file PATH  Prometheus textfile written after enroll/renew/run cycles (or config metrics_file)
  -v, --verbose      more logging;  -q, --quiet  only warnings and errors
  -h, --help         this text;     -V, --version  the version

exit codes: 0 ok, 64 usage, 78 config, 75 retry later, 76 protocol, 77 refused, 74 storage, 70 internal
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Enroll { force: bool },
    Renew { force: bool },
    Run,
    Status { json: bool },
    Check { online: bool },
    NeedsRenewal,
    Help,
    Version,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Cli {
    pub config: PathBuf,
    /// `--metrics-file PATH`: overrides the config's `metrics_file`.
    pub metrics_file: Option<PathBuf>,
    /// -1 quiet, 0 normal, 1+ verbose.
    pub verbosity: i8,
    pub command: Command,
}

fn usage(message: String) -> Error {
    Error::new(Kind::Usage, format!("{message} (see enroll-agent --help)"))
}

/// Parses arguments (without the program name). `env_config` is `$ENROLL_AGENT_CONFIG`.
pub fn parse(args: &[String], env_config: Option<String>) -> Result<Cli> {
    let mut config = env_config.filter(|c| !c.is_empty()).map(PathBuf::from);
    let mut verbosity = 0i8;
    let mut metrics_file = None;
    let mut rest = args.iter();
    let command_name = loop {
        let Some(arg) = rest.next() else {
            return Err(usage("no command given".into()));
        };
        match arg.as_str() {
            "-c" | "--config" => {
                let path = rest.next().ok_or_else(|| usage(format!("{arg} needs a path")))?;
                config = Some(PathBuf::from(path));
            }
            a if a.starts_with("--config=") => config = Some(PathBuf::from(&a["--config=".len()..])),
            "--metrics-file" => {
                let path = rest.next().ok_or_else(|| usage(format!("{arg} needs a path")))?;
                metrics_file = Some(PathBuf::from(path));
            }
            "-v" | "--verbose" => verbosity = verbosity.saturating_add(1),
            "-q" | "--quiet" => verbosity = -1,
            "-h" | "--help" | "help" => break "help",
            "-V" | "--version" => break "version",
            a if a.starts_with('-') => return Err(usage(format!("unknown option {a}"))),
            a => break a,
        }
    };
    let options: Vec<&str> = rest.map(String::as_str).collect();
    let flag = |name: &str| -> Result<bool> {
        match options.as_slice() {
            [] => Ok(false),
            [only] if *only == name => Ok(true),
            _ => Err(usage(format!("{command_name} takes only {name}, not {}", options.join(" ")))),
        }
    };
    let none = || -> Result<()> {
        match options.first() {
            None => Ok(()),
            Some(extra) => Err(usage(format!("{command_name} takes no option {extra}"))),
        }
    };
    let command = match command_name {
        "enroll" => Command::Enroll { force: flag("--force")? },
        "renew" => Command::Renew { force: flag("--force")? },
        "run" => none().map(|_| Command::Run)?,
        "status" => Command::Status { json: flag("--json")? },
        "check" => Command::Check { online: flag("--online")? },
        "needs-renewal" => none().map(|_| Command::NeedsRenewal)?,
        "help" => Command::Help,
        "version" => Command::Version,
        other => return Err(usage(format!("unknown command {other:?}"))),
    };
    Ok(Cli {
        config: config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        metrics_file,
        verbosity,
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn global_options_come_before_the_command() {
        let cli = parse(&args("-c /x.json -v renew --force"), None).unwrap();
        assert_eq!(
            cli,
            Cli {
                config: "/x.json".into(),
                metrics_file: None,
                verbosity: 1,
                command: Command::Renew { force: true }
            }
        );
        let cli = parse(&args("status --json"), Some("/env.json".into())).unwrap();
        assert_eq!(cli.config, PathBuf::from("/env.json"));
        assert_eq!(parse(&args("--config=/y run"), None).unwrap().config, PathBuf::from("/y"));
    }

    #[test]
    fn mistakes_are_usage_errors() {
        for bad in ["", "frobnicate", "enroll --forc", "run --force", "-c", "--nope status"] {
            let err = parse(&args(bad), None).unwrap_err();
            assert_eq!(err.kind(), Kind::Usage, "{bad}");
        }
    }
}
