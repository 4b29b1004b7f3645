//! Thin entry point: parse the command line, set up logging, run, print the error chain, exit
//! with the code of design.md §2.

use std::io::Write;

use enroll_agent::{cli, execute, format_error};

/// Logs to stderr. Other crates (ureq, rustls) only get to say warnings and errors: their debug
/// output could include request details we do not want in journals.
struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        let target = metadata.target();
        let ours = target.starts_with("enroll");
        // cryptoki logs every mechanism a token lists that it has no name for as an *error*
        // (SoftHSM2: about thirty per run): noise that reads like a failure in a journal.
        if target.starts_with("cryptoki") {
            return self.level >= log::LevelFilter::Debug;
        }
        metadata.level() <= if ours { self.level } else { log::LevelFilter::Warn.min(self.level) }
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_ascii_lowercase();
            // Log lines may quote a CA (a pending request's status words): one safe line each.
            let text = enroll_agent::error::sanitize(&record.args().to_string(), 4096);
            let _ = writeln!(std::io::stderr(), "enroll-agent: {level}: {text}");
        }
    }

    fn flush(&self) {}
}

fn main() {
    // libtss2 prints its own ERROR lines to stderr; our one-line error already says what failed.
    // Set before any thread starts; an operator's own TSS2_LOG wins.
    #[cfg(feature = "tpm")]
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+NONE");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match cli::parse(&args, std::env::var("ENROLL_AGENT_CONFIG").ok()) {
        Ok(cli) => {
            let level = match cli.verbosity {
                i8::MIN..=-1 => log::LevelFilter::Warn,
                0 => log::LevelFilter::Info,
                _ => log::LevelFilter::Debug,
            };
            let logger = Box::leak(Box::new(StderrLogger { level }));
            let _ = log::set_logger(logger).map(|()| log::set_max_level(level));
            match execute(&cli) {
                Ok(outcome) => {
                    print!("{}", outcome.stdout);
                    outcome.exit_code
                }
                Err(error) => {
                    eprint!("{}", format_error(&error));
                    error.kind().exit_code()
                }
            }
        }
        Err(error) => {
            eprint!("{}", format_error(&error));
            error.kind().exit_code()
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}
