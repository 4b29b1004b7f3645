//! `run`: enroll if needed, sleep until the renewal time, renew, repeat. Failures back off with
//! capped exponential backoff and full jitter. SIGTERM/SIGINT end the loop between steps (exit 0),
//! SIGHUP reloads the config (a broken new config is reported and the old one kept).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::lifecycle::{self, Agent, Done};
use crate::time;

/// Even with nothing due, wake up this often to re-read the installed identity (it may have been
/// replaced by an operator, or the clock may have jumped).
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// Set by the signal thread on SIGTERM/SIGINT, so work that would hold up the exit (a slow
/// hook) can be cut short before the main loop sees the signal.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether `run` has been asked to stop (always false outside `run`).
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::Relaxed)
}

enum Wake {
    Timeout,
    Reload,
    Stop,
}

/// Signals delivered to a channel by a dedicated thread (sigwait), so the main loop can sleep on
/// `recv_timeout` and never runs code inside a signal handler.
struct Signals {
    rx: Receiver<Signal>,
}

impl Signals {
    fn install() -> Result<Signals> {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(signal);
        }
        // Blocked here, before the thread exists, so every thread inherits the mask and only
        // sigwait sees these signals.
        set.thread_block()
            .map_err(|e| Error::new(crate::error::Kind::Internal, format!("blocking signals: {e}")))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(signal) = set.wait() {
                if signal != Signal::SIGHUP {
                    STOP_REQUESTED.store(true, Ordering::Relaxed);
                }
                if tx.send(signal).is_err() {
                    break;
                }
            }
        });
        Ok(Signals { rx })
    }

    fn wait(&self, limit: Duration) -> Wake {
        match self.rx.recv_timeout(limit) {
            Ok(Signal::SIGHUP) => Wake::Reload,
            Ok(_) | Err(RecvTimeoutError::Disconnected) => Wake::Stop,
            Err(RecvTimeoutError::Timeout) => Wake::Timeout,
        }
    }
}

pub fn run(config_path: &Path, metrics_file: Option<&Path>) -> Result<()> {
    let signals = Signals::install()?;
    let load = || {
        Settings::load(config_path).map(|mut settings| {
            if let Some(path) = metrics_file {
                settings.metrics_file = Some(path.to_path_buf());
            }
            settings
        })
    };
    let mut settings = load()?;
    let mut failures: u32 = 0;
    log::info!("running: backend {}, state in {}", settings.ca.name(), settings.state_dir.display());
    loop {
        let outcome = cycle(&settings);
        crate::report::write_metrics(&settings);
        let pause = match outcome {
            Ok(next) => {
                failures = 0;
                next
            }
            // A configuration fault (such as a PIN the token refused) does not heal by waiting, and
            // retrying a PIN locks the token: stop with 78 so the service manager does not loop.
            Err(error) if error.kind() == crate::error::Kind::Config => return Err(error),
            Err(error) => {
                // A renewal (a certificate still valid) may wait longer: lifecycle::retry_pause.
                let (valid_until, now) = match Agent::inspect(&settings) {
                    Ok(agent) => (agent.installed().map(|i| i.cert.not_after()), agent.clock().now()),
                    Err(_) => (None, 0),
                };
                let mut pause = lifecycle::retry_pause(
                    failures,
                    &settings.renewal,
                    valid_until,
                    now,
                    lifecycle::random_unit(),
                );
                // The CA's Retry-After (HTTP 429/503) is a floor, within retry_max_s.
                if let Some(seconds) = error.retry_after() {
                    pause = pause.max(Duration::from_secs(seconds.min(settings.renewal.retry_max_s)));
                }
                failures = failures.saturating_add(1);
                log::error!("{} (retrying in {} s)", error.chain_line(), pause.as_secs());
                pause
            }
        };
        match signals.wait(pause) {
            Wake::Timeout => {}
            Wake::Stop => {
                log::info!("stopping on signal");
                return Ok(());
            }
            Wake::Reload => match load() {
                Ok(new) => {
                    log::info!("reloaded {}", config_path.display());
                    settings = new;
                    failures = 0;
                }
                Err(e) => log::error!("reload failed, keeping the previous config: {}", e.chain_line()),
            },
        }
    }
}

/// One step: enroll or renew if needed; returns how long to sleep.
fn cycle(settings: &Settings) -> Result<Duration> {
    let mut agent = Agent::open(settings)?;
    let result = match agent.installed() {
        None => agent.enroll(false),
        Some(_) => agent.renew(false),
    };
    match result {
        Ok(done) => {
            if let Done::Installed { serial, purpose } = &done {
                log::info!("{} done: serial {serial}", purpose.name());
            }
            let installed = agent
                .installed()
                .ok_or_else(|| Error::storage("the identity vanished right after install"))?;
            let renew_at = agent.renew_at(&installed);
            // Wake for the CA's suggested renewal window too (ACME ARI), whichever comes first.
            let wake = agent.next_window_check().map_or(renew_at, |check| renew_at.min(check));
            let wait = wake.saturating_sub(agent.clock().now()).max(1);
            log::info!("next renewal at {}", time::rfc3339(renew_at));
            Ok(Duration::from_secs(wait).min(MAX_SLEEP))
        }
        Err(error) => {
            agent.record_error(&error);
            Err(error)
        }
    }
}
