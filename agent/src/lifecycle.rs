//! Enrollment, renewal and the long-running loop.
//!
//! The scheduling rules are pure functions of (certificate, policy, clock, random sample) so tests
//! cover them without sleeping; [`Agent`] does the I/O around them: it records a pending request in
//! `state.json` before talking to the CA, verifies what comes back (design.md §5 rule 2) and only
//! then installs it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "redtrust")]
use enroll_hal::remote::RemoteKeyProvider;
use enroll_hal::soft::FileKeyProvider;
use enroll_hal::{DeviceKey, KeyProvider, Store};

use crate::backend::{CaBackend, Current, Outcome, Poll, RemoteKeyService, Request, MAX_POLL_INTERVAL_S};
use crate::config::{Provider, RenewalPolicy, Settings};
use crate::csr::{self, Csr};
use crate::error::{Context, Error, Kind, Result};
use crate::http::Http;
use crate::pki::{self, Cert, Expectation, Issued, Verified};
use crate::state::{Pending, Purpose, State};
use crate::time::{self, Clock};
use crate::tls::Transport;

/// A renewal is never started sooner than this after an install, whatever the certificate says
/// (a CA issuing very short or back-dated certificates must not make us hammer it).
const MIN_RENEWAL_INTERVAL_S: u64 = 60;

/// How often the CA's suggested renewal window is read again when its answer names no
/// Retry-After (RFC 9773 §4.3 suggests about every six hours).
const WINDOW_RECHECK_S: u64 = 6 * 3600;
/// The CSR a remote provider made, kept in its pending slot (Redtrust).
const REQUEST_CSR: &str = "request.csr";
/// The only PATH a hook inherits.
const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// ---------------------------------------------------------------- pure scheduling rules

/// not_before + lifetime × (at_fraction + jitter_fraction × sample), sample uniform in [-1, 1].
pub fn renewal_time(not_before: u64, not_after: u64, policy: &RenewalPolicy, sample: f64) -> u64 {
    let lifetime = not_after.saturating_sub(not_before) as f64;
    let fraction = (policy.at_fraction + policy.jitter_fraction * sample.clamp(-1.0, 1.0)).clamp(0.0, 1.0);
    not_before.saturating_add((lifetime * fraction) as u64)
}

/// The renewal loop guard: never earlier than `MIN_RENEWAL_INTERVAL_S` (or the retry base, if
/// larger) after the last install.
pub fn guarded_renewal_time(renew_at: u64, last_install: Option<u64>, policy: &RenewalPolicy) -> u64 {
    match last_install {
        // `installed` comes from state.json: a corrupt value must not overflow (issue 14 item 5).
        Some(installed) => {
            renew_at.max(installed.saturating_add(MIN_RENEWAL_INTERVAL_S.max(policy.retry_initial_s)))
        }
        None => renew_at,
    }
}

/// Capped exponential backoff with full jitter: uniform in [1 s, min(max, initial × 2^attempt)].
/// `attempt` counts from 0; `sample` is uniform in [0, 1).
pub fn backoff(attempt: u32, policy: &RenewalPolicy, sample: f64) -> Duration {
    let cap = policy.retry_initial_s.saturating_mul(1u64 << attempt.min(32)).min(policy.retry_max_s);
    let seconds = (cap as f64 * sample.clamp(0.0, 1.0)) as u64;
    Duration::from_secs(seconds.max(1))
}

/// A failed renewal may wait up to this fraction of the validity left.
const RENEWAL_RETRY_DIVISOR: u64 = 8;

/// The pause after a failed request: [`backoff`], with its initial and maximum pause raised to
/// 1/8 of the validity left while the installed certificate is valid until `valid_until`. After a
/// long CA outage a fleet's renewals then come back over days instead of within `retry_max_s`;
/// an enrollment (no valid certificate) and a renewal close to expiry keep [`backoff`] as it is.
pub fn retry_pause(
    attempt: u32,
    policy: &RenewalPolicy,
    valid_until: Option<u64>,
    now: u64,
    sample: f64,
) -> Duration {
    let floor = valid_until.map_or(0, |not_after| not_after.saturating_sub(now) / RENEWAL_RETRY_DIVISOR);
    let widened = RenewalPolicy {
        retry_initial_s: policy.retry_initial_s.max(floor),
        retry_max_s: policy.retry_max_s.max(floor),
        ..*policy
    };
    backoff(attempt, &widened, sample)
}

/// What `status` calls the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    None,
    Valid,
    RenewalDue,
    Expired,
    Pending,
}

impl Condition {
    pub fn name(self) -> &'static str {
        match self {
            Condition::None => "none",
            Condition::Valid => "valid",
            Condition::RenewalDue => "renewal_due",
            Condition::Expired => "expired",
            Condition::Pending => "pending",
        }
    }
}

pub fn condition(cert: Option<(u64, u64)>, renew_at: u64, pending: bool, now: u64) -> Condition {
    match cert {
        _ if pending => Condition::Pending,
        None => Condition::None,
        Some((_, not_after)) if now >= not_after => Condition::Expired,
        Some(_) if now >= renew_at => Condition::RenewalDue,
        Some(_) => Condition::Valid,
    }
}

/// A uniform sample in [0, 1) from the system generator.
pub fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------- the agent

/// The installed identity.
pub struct Installed {
    pub slot: PathBuf,
    pub cert: Cert,
    /// CA certificates installed with it (ca.pem).
    pub ca: Vec<Cert>,
}

/// What a command did, for the one line printed on success.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    Installed { serial: String, purpose: Purpose },
    AlreadyEnrolled,
    NotDue { renew_at: u64 },
}

pub struct Agent<'a> {
    settings: &'a Settings,
    store: Store,
    /// Opened on first use, and only once per run: a token's PIN is never tried twice.
    provider: std::cell::OnceCell<std::result::Result<Box<dyn KeyProvider>, (Kind, String)>>,
    pub state: State,
    /// The writer's lock on the state directory (none for `status`/`check`); released when the
    /// agent is dropped, so `run` holds it only during a cycle.
    _lock: Option<enroll_hal::store::Lock>,
    /// This run's clock (design.md §5 rule 7), fed by the CA's answers.
    clock: Arc<Clock>,
}

/// A new identity in the making: its slot, its key and the CSR that proves the key.
struct Prepared {
    slot: PathBuf,
    key: Arc<dyn DeviceKey>,
    csr: Csr,
}

/// Opens the configured key provider (for a token: loads the module and logs in, once).
pub fn open_provider(settings: &Settings) -> Result<Box<dyn KeyProvider>> {
    match &settings.key.provider {
        Provider::File => Ok(Box::new(FileKeyProvider::shared_with(settings.storage_group))),
        #[cfg(feature = "redtrust")]
        Provider::Redtrust(_) => Ok(Box::new(RemoteKeyProvider::new("redtrust", settings.key.algorithm))),
        #[cfg(feature = "pkcs11")]
        Provider::Pkcs11(p11) => crate::hardware::pkcs11(p11),
        #[cfg(feature = "tpm")]
        Provider::Tpm(tpm) => crate::hardware::tpm(tpm),
        #[allow(unreachable_patterns)]
        other => Err(Error::config(format!(
            "key.provider: provider {0} is not compiled into this build (cargo feature {0})",
            other.name()
        ))),
    }
}

/// Test hook, compiled into debug builds only: `ENROLL_AGENT_CRASH_AT=<point>` aborts the process
/// at that point, so tests can show that every crash leaves one usable identity.
fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("ENROLL_AGENT_CRASH_AT").is_ok_and(|at| at == point) {
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// How long a writer waits for another run (a timer firing during a manual renewal) before it
/// exits 75. Debug builds (the end-to-end tests) take `ENROLL_AGENT_LOCK_WAIT_S` instead.
const LOCK_WAIT: Duration = Duration::from_secs(60);

fn lock_wait() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(seconds) = std::env::var("ENROLL_AGENT_LOCK_WAIT_S").ok().and_then(|s| s.parse().ok()) {
        return Duration::from_secs(seconds);
    }
    LOCK_WAIT
}

/// Destroys the key of a slot about to be removed (best effort: a failure leaves an orphan that
/// `retain` removes later).
fn forget_key(provider: &dyn KeyProvider, slot: &Path) {
    if let Err(e) = provider.delete(slot) {
        log::warn!("could not delete the key of {}: {e}", slot.display());
    }
}

/// The intermediates after the leaf in a slot's chain.pem (none when unreadable).
fn installed_chain(slot: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(slot.join("chain.pem")).unwrap_or_default();
    let certs = pki::parse_pem_certs(&text).unwrap_or_default();
    certs.into_iter().skip(1).map(|c| c.der).collect()
}

fn csr_from_pem(text: &str) -> Option<Csr> {
    let parsed = pem::parse(text).ok().filter(|p| p.tag() == "CERTIFICATE REQUEST")?;
    Some(Csr { der: parsed.contents().to_vec(), pem: text.to_string() })
}

impl<'a> Agent<'a> {
    /// Opens (creating if needed) the state directory for writing: waits for its lock (another
    /// run holding it past [`LOCK_WAIT`] is exit 75), repairs what a crash or tampering left
    /// (temporary files, links out of `slots/`), and reads state.json.
    pub fn open(settings: &'a Settings) -> Result<Agent<'a>> {
        let store = Store::open(&settings.state_dir, settings.storage_group)
            .context("opening the state directory")?;
        let lock = store
            .lock(lock_wait(), &crate::daemon::stop_requested)
            .context("waiting for the state directory")?;
        store.repair(&lock).context("opening the state directory")?;
        Agent::with_store(settings, store, Some(lock))
    }

    /// Reads the state directory without the lock and without writing anything (`status`,
    /// `check`, `needs-renewal`, metrics): these never wait for a running renewal.
    pub fn inspect(settings: &'a Settings) -> Result<Agent<'a>> {
        let store = Store::inspect(&settings.state_dir, settings.storage_group)
            .context("opening the state directory")?;
        Agent::with_store(settings, store, None)
    }

    fn with_store(
        settings: &'a Settings,
        store: Store,
        lock: Option<enroll_hal::store::Lock>,
    ) -> Result<Agent<'a>> {
        let writer = lock.is_some();
        let mut state = load_state(&store, writer)?;
        let clock = Arc::new(Clock::new(crate::build_time()));
        if let Some(floor) = state.clock_floor {
            if !clock.set_persisted_floor(floor) {
                state.clock_floor = None;
            }
        }
        let mut agent =
            Agent { settings, store, provider: std::cell::OnceCell::new(), state, _lock: lock, clock };
        agent.forget_installed_pending(writer)?;
        Ok(agent)
    }

    /// A power cut between the `current` swap and the state.json write leaves `pending` naming
    /// the slot that is now installed. That request is finished: forget it, so the next request
    /// never writes into an installed slot.
    fn forget_installed_pending(&mut self, persist: bool) -> Result<()> {
        let Some(pending) = &self.state.pending else {
            return Ok(());
        };
        let slot = self.slot_path(&pending.slot);
        let installed =
            [self.store.current(), self.store.previous()].into_iter().flatten().any(|s| s == slot);
        if installed {
            log::warn!(
                "state.json still listed slot {} as pending although it is installed; clearing it",
                pending.slot
            );
            // The CA reference recorded is the old certificate's. An asynchronous CA's request
            // id names the new one (Sectigo sslId); otherwise the backend falls back to the
            // certificate itself (EnOS takes its serial).
            self.state.ca_ref = pending.request_id.clone();
            self.state.pending = None;
            if persist {
                self.save()?;
            }
        }
        Ok(())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The key provider, opened on first use. A failure (a refused PIN) is remembered, so this
    /// run never tries the token again.
    pub fn provider(&self) -> Result<&dyn KeyProvider> {
        let opened = self
            .provider
            .get_or_init(|| open_provider(self.settings).map_err(|e| (e.kind(), e.chain_line())));
        match opened {
            Ok(provider) => Ok(provider.as_ref()),
            Err((kind, message)) => Err(Error::new(*kind, message.clone())),
        }
    }

    fn save(&mut self) -> Result<()> {
        self.state.clock_floor = self.state.clock_floor.max(self.clock.corroborated());
        self.store.write_state(self.state.to_json().as_bytes()).context("writing state.json")
    }

    /// Remembers a failure in state.json so `status` can show it (best effort).
    pub fn record_error(&mut self, error: &Error) {
        self.state.last_error = Some(error.chain_line());
        self.state.last_error_at = Some(self.clock.now());
        if let Err(e) = self.save() {
            log::warn!("could not record the error in state.json: {}", e.chain_line());
        }
    }

    /// The current identity, if `current` names a readable certificate.
    pub fn installed(&self) -> Option<Installed> {
        let slot = self.store.current()?;
        let read = |name: &str| std::fs::read_to_string(slot.join(name)).ok();
        let cert = match read("cert.pem").map(|t| pki::parse_pem_certs(&t)) {
            Some(Ok(certs)) if !certs.is_empty() => certs.into_iter().next()?,
            _ => {
                log::warn!("{} has no readable certificate", slot.join("cert.pem").display());
                return None;
            }
        };
        let ca = read("ca.pem").and_then(|t| pki::parse_pem_certs(&t).ok()).unwrap_or_default();
        Some(Installed { slot, cert, ca })
    }

    /// When the installed identity is due for renewal.
    pub fn renew_at(&self, installed: &Installed) -> u64 {
        let policy = &self.settings.renewal;
        let planned = self.state.renew_at.unwrap_or_else(|| {
            renewal_time(installed.cert.not_before(), installed.cert.not_after(), policy, 0.0)
        });
        guarded_renewal_time(planned, self.state.last_install, policy)
    }

    fn http(&self) -> Result<Http> {
        Http::new(Transport::from_settings(&self.settings.tls, self.clock.clone())?)
    }

    /// This run's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// `enroll [--force]`.
    pub fn enroll(&mut self, force: bool) -> Result<Done> {
        let installed = self.installed();
        if let (Some(installed), false) = (&installed, force) {
            if self.usable(installed)? {
                return Ok(Done::AlreadyEnrolled);
            }
        }
        if force {
            self.abandon_pending()?;
        }
        self.obtain(Purpose::Enroll, None)
    }

    /// `renew [--force]`.
    pub fn renew(&mut self, force: bool) -> Result<Done> {
        let Some(installed) = self.installed() else {
            return Err(Error::new(
                Kind::Usage,
                "renew: no identity is installed; run `enroll-agent enroll` first",
            ));
        };
        let now = self.clock.now();
        // A request the CA accepted is resumed whenever we are asked; a slot kept from a failed
        // synchronous call waits for the renewal time like everything else.
        let accepted = self.state.pending.as_ref().is_some_and(|p| p.request_id.is_some());
        if !force && !accepted {
            self.consult_renewal_window(&installed)?;
        }
        let renew_at = self.renew_at(&installed);
        if !force && now < renew_at && !accepted {
            return Ok(Done::NotDue { renew_at });
        }
        if now >= installed.cert.not_after() {
            // An expired certificate is no credential; enroll again with the bootstrap credential.
            log::warn!(
                "the installed certificate expired at {}; enrolling again with the bootstrap credential",
                time::rfc3339(installed.cert.not_after())
            );
            return self.obtain(Purpose::Enroll, Some(&installed));
        }
        self.obtain(Purpose::Renew, Some(&installed))
    }

    /// Where the CA suggests renewal times (ACME ARI, RFC 9773), asks for the window when the
    /// last answer's Retry-After has passed and moves `renew_at` to a random point in it (so a
    /// CA that wants a certificate replaced early, after a mass revocation say, gets it early).
    /// A failure to ask is not the renewal's failure: it is logged, retried in an hour, and the
    /// planned time stands.
    fn consult_renewal_window(&mut self, installed: &Installed) -> Result<()> {
        let now = self.clock.now();
        if !self.settings.ca.suggests_renewal_time() || self.state.window_check_at.is_some_and(|at| now < at)
        {
            return Ok(());
        }
        let asked =
            self.http().and_then(|http| self.settings.ca.client(http).renewal_window(&installed.cert));
        let (not_before, not_after) = (installed.cert.not_before(), installed.cert.not_after());
        let next_check = match asked {
            Ok(Some(window)) => {
                let (start, end) =
                    (window.start.clamp(not_before, not_after), window.end.clamp(not_before, not_after));
                let at = start + ((end - start) as f64 * random_unit()) as u64;
                log::info!(
                    "the CA suggests renewing between {} and {}: renewal planned at {}",
                    time::rfc3339(window.start),
                    time::rfc3339(window.end),
                    time::rfc3339(at)
                );
                self.state.renew_at = Some(at);
                window.retry_after_s.unwrap_or(WINDOW_RECHECK_S).clamp(60, 7 * 86_400)
            }
            Ok(None) => WINDOW_RECHECK_S * 4,
            Err(e) => {
                log::warn!("could not read the CA's suggested renewal window: {}", e.chain_line());
                3600
            }
        };
        self.state.window_check_at = Some(now.saturating_add(next_check));
        self.save()
    }

    /// When `run` should wake to ask the CA for its suggested renewal window again, if it
    /// suggests one.
    pub fn next_window_check(&self) -> Option<u64> {
        self.settings.ca.suggests_renewal_time().then(|| self.state.window_check_at.unwrap_or(0))
    }

    /// Whether the installed identity can be used as it is: valid now and its key loads and
    /// matches the certificate.
    fn usable(&self, installed: &Installed) -> Result<bool> {
        if self.clock.now() >= installed.cert.not_after() {
            return Ok(false);
        }
        match self.provider()?.load(&installed.slot) {
            Ok(key) => Ok(key.public_key_spki() == installed.cert.spki_der()),
            Err(e) => {
                log::warn!("the installed key cannot be used: {e}");
                Ok(false)
            }
        }
    }

    /// Drops an outstanding request (enroll --force) and its key, withdrawing it at the CA where
    /// the API can.
    fn abandon_pending(&mut self) -> Result<()> {
        let Some(pending) = self.state.pending.take() else {
            return Ok(());
        };
        log::info!("abandoning the pending {} request in slot {}", pending.purpose.name(), pending.slot);
        if let Some(id) = &pending.request_id {
            match self.http() {
                Ok(http) => {
                    let mut ca = self.settings.ca.client(http);
                    if ca.polling().is_some() {
                        if let Err(e) = ca.cancel(id) {
                            log::warn!("could not withdraw request {id}: {}", e.chain_line());
                        }
                    }
                }
                Err(e) => log::warn!("could not withdraw request {id}: {}", e.chain_line()),
            }
        }
        let slot = self.slot_path(&pending.slot);
        if Some(&slot) != self.store.current().as_ref() {
            if let Ok(provider) = self.provider() {
                forget_key(provider, &slot);
            }
            self.store.remove_slot(&slot).context("removing the abandoned slot")?;
        }
        self.save()
    }

    fn slot_path(&self, name: &str) -> PathBuf {
        self.store.root().join("slots").join(name)
    }

    /// The pending slot a previous run left, if it still holds a usable key.
    fn resumable_slot(&mut self) -> Option<(PathBuf, Arc<dyn DeviceKey>)> {
        let pending = self.state.pending.clone()?;
        let slot = self.slot_path(&pending.slot);
        match self.provider().ok()?.load(&slot) {
            Ok(key) if key.algorithm() == self.settings.key.algorithm => {
                log::info!(
                    "resuming the pending {} request with the key in {}",
                    pending.purpose.name(),
                    slot.display()
                );
                return Some((slot, key));
            }
            _ => log::warn!("the pending slot {} has no usable key; starting over", slot.display()),
        }
        if Some(&slot) != self.store.current().as_ref() {
            let _ = self.store.remove_slot(&slot);
        }
        self.state.pending = None;
        None
    }

    /// A new slot, recorded in state.json before any key is made for it.
    fn new_pending_slot(&mut self, purpose: Purpose) -> Result<PathBuf> {
        let slot = self.store.create_slot().context("creating a slot for the new identity")?;
        let name = slot.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        self.state.pending =
            Some(Pending { request_id: None, key_ref: None, slot: name, since: self.clock.now(), purpose });
        self.save()?;
        Ok(slot)
    }

    /// Slot, key and CSR for a device-held key: the pending ones if a previous run left them (a
    /// restart never makes a second key), else a new (or, without rotation, reused) key.
    fn local_request(&mut self, purpose: Purpose, installed: Option<&Installed>) -> Result<Prepared> {
        let (slot, key) = match self.resumable_slot() {
            Some(resumed) => resumed,
            None => {
                let slot = self.new_pending_slot(purpose)?;
                let reuse = purpose == Purpose::Renew && !self.settings.key.rotate_on_renew;
                let key = match installed.filter(|_| reuse) {
                    Some(current) => {
                        self.provider()?.reuse(&current.slot, &slot).context("reusing the current key")?;
                        self.provider()?.load(&slot).context("loading the reused key")?
                    }
                    None => self
                        .provider()?
                        .generate(self.settings.key.algorithm, &slot)
                        .context(format!("generating a {} key", self.settings.key.algorithm.name()))?,
                };
                crash_point("after-key");
                (slot, key)
            }
        };
        // The CSR sent is kept in the slot: an asynchronous CA that is asked again with the
        // identical request (EST 202) gets the same bytes after a restart, although a new
        // signature over the same request would differ (ECDSA is randomized).
        let kept = std::fs::read_to_string(slot.join(REQUEST_CSR)).ok().and_then(|t| csr_from_pem(&t));
        if let Some(csr) = kept {
            if csr::asks_for(&csr.der, key.as_ref(), &self.settings.subject, &self.settings.san)
                && pki::verify_csr(&csr.der).is_ok()
            {
                return Ok(Prepared { slot, key, csr });
            }
            log::warn!(
                "the CSR kept in {} is not for its key or the configured subject and SANs; making a new one",
                slot.display()
            );
        }
        let csr = csr::build(key.as_ref(), &self.settings.subject, &self.settings.san)
            .context("building the CSR")?;
        self.store
            .write_slot_file(&slot, REQUEST_CSR, csr.pem.as_bytes(), 0o600)
            .context("recording the CSR")?;
        Ok(Prepared { slot, key, csr })
    }

    /// Slot, key and CSR for a remote key: the service (Redtrust) generates the key and makes the CSR
    /// (`csr/create`, v2 with `thumbprintToRenew` for a renewal). The CSR and the request code
    /// are kept so a crash before `csr/finalize` resumes without a second key.
    fn remote_request(
        &mut self,
        purpose: Purpose,
        installed: Option<&Installed>,
        service: &mut dyn RemoteKeyService,
    ) -> Result<Prepared> {
        if let Some((slot, key)) = self.resumable_slot() {
            let has_code = self.state.pending.as_ref().is_some_and(|p| p.key_ref.is_some());
            let csr = std::fs::read_to_string(slot.join(REQUEST_CSR)).ok().and_then(|t| csr_from_pem(&t));
            if let (true, Some(csr)) = (has_code, csr) {
                return Ok(Prepared { slot, key, csr });
            }
            log::warn!("the pending slot {} has no remote key request; starting over", slot.display());
            let _ = self.store.remove_slot(&slot);
            self.state.pending = None;
        }
        let slot = self.new_pending_slot(purpose)?;
        let provider = service.name();
        let renewing = installed.filter(|_| purpose == Purpose::Renew).map(|i| &i.cert);
        let created = service
            .create(&self.settings.subject, renewing)
            .context(format!("having {provider} generate the key and CSR"))?;
        let spki = pki::verify_csr(&created.csr_der).context(format!("checking the CSR {provider} made"))?;
        let csr = Csr { pem: pki::pem_of("CERTIFICATE REQUEST", &created.csr_der), der: created.csr_der };
        self.store
            .write_slot_file(&slot, REQUEST_CSR, csr.pem.as_bytes(), 0o600)
            .context(format!("recording the {provider} CSR"))?;
        let key = enroll_hal::remote::record(&slot, self.settings.key.algorithm, &spki)
            .context(format!("recording the {provider} key"))?;
        if let Some(pending) = self.state.pending.as_mut() {
            pending.key_ref = Some(created.handle);
        }
        self.save()?;
        Ok(Prepared { slot, key, csr })
    }

    fn obtain(&mut self, purpose: Purpose, installed: Option<&Installed>) -> Result<Done> {
        let http = self.http()?;
        let settings = self.settings;
        match settings.key.remote_service(http.clone()) {
            Some(mut service) => {
                let result = self.obtain_with(purpose, installed, &http, Some(service.as_mut()));
                service.end();
                result
            }
            None => self.obtain_with(purpose, installed, &http, None),
        }
    }

    fn obtain_with(
        &mut self,
        purpose: Purpose,
        installed: Option<&Installed>,
        http: &Http,
        remote: Option<&mut dyn RemoteKeyService>,
    ) -> Result<Done> {
        let mut ca = self.settings.ca.client(http.clone());
        if !self.clock.clock_trusted() && !self.clock.has_server_time() {
            learn_time_from_ca(http, &ca.probe_url());
        }
        let (prepared, remote) = match remote {
            Some(service) => (self.remote_request(purpose, installed, service)?, Some(service)),
            None => (self.local_request(purpose, installed)?, None),
        };
        // A certificate this slot already received (a crash before finalize or install) is not
        // requested a second time.
        let (issued, polled) = match self.received(&prepared.slot) {
            Some(issued) => (issued, false),
            None => self.request(ca.as_mut(), purpose, installed, &prepared)?,
        };
        let known_ca: Vec<Cert> = installed.map(|i| i.ca.clone()).unwrap_or_default();
        let verified = match self.verify(prepared.key.public_key_spki(), &issued, &known_ca) {
            Ok(verified) => verified,
            Err(e) => {
                if polled {
                    // Polling again would fetch the same unusable certificate.
                    self.end_request()?;
                }
                return Err(e);
            }
        };
        self.write_identity(&prepared.slot, &verified)?;
        let uri = match remote {
            Some(service) => match self.finalize_remote(service, &verified.leaf) {
                Ok(uri) => Some(uri),
                Err(e) if e.answer().is_some_and(|a| a.status == 404) => {
                    return Err(self.abandon_unknown_request(e));
                }
                Err(e) => return Err(e),
            },
            None => prepared.key.uri(),
        };
        if let Some(uri) = uri {
            self.store
                .write_slot_file(&prepared.slot, "key.uri", format!("{uri}\n").as_bytes(), 0o644)
                .context("writing the new identity")?;
        }
        crash_point("after-write");
        self.commit(&prepared.slot, &verified, issued.ca_ref.clone(), purpose)
    }

    /// Sends the request, or resumes the one the CA accepted earlier; waits for asynchronous CAs.
    /// Answers the certificate and whether it came from polling.
    fn request(
        &mut self,
        ca: &mut dyn CaBackend,
        purpose: Purpose,
        installed: Option<&Installed>,
        prepared: &Prepared,
    ) -> Result<(Issued, bool)> {
        let request = Request {
            csr: &prepared.csr,
            key: Some(prepared.key.clone()),
            algorithm: self.settings.key.algorithm,
            subject: &self.settings.subject,
            sans: &self.settings.san,
        };
        let ca_ref = self.state.ca_ref.clone();
        let current = match (purpose, installed) {
            (Purpose::Renew, Some(current)) => {
                let key = self.provider()?.load(&current.slot).context("loading the current key")?;
                Some(Current {
                    cert: &current.cert,
                    key: Some(key),
                    chain: installed_chain(&current.slot),
                    ca_ref: ca_ref.as_deref(),
                })
            }
            _ => None,
        };
        if let Some(id) = self.state.pending.as_ref().and_then(|p| p.request_id.clone()) {
            if ca.polling().is_some() {
                log::info!("resuming request {id} at {}", ca.name());
                return self
                    .await_issue(ca, &id, &request, current.as_ref(), false)
                    .map(|issued| (issued, true));
            }
            log::warn!("request {id} was made with another CA configuration; starting a new one");
            self.end_request()?;
        }
        let outcome = match &current {
            Some(current) => ca.renew(&request, current).context(format!("renewing with {}", ca.name()))?,
            None => ca.enroll(&request).context(format!("enrolling with {}", ca.name()))?,
        };
        match outcome {
            Outcome::Issued(issued) => Ok((issued, false)),
            Outcome::Pending { request_id } => {
                // design.md §5 rule 4: recorded before waiting, so a restart resumes it.
                if let Some(pending) = self.state.pending.as_mut() {
                    pending.request_id = Some(request_id.clone());
                    pending.since = self.clock.now();
                }
                self.save()?;
                self.await_issue(ca, &request_id, &request, current.as_ref(), true)
                    .map(|issued| (issued, true))
            }
        }
    }

    /// Polls request `id` for at most `poll_wait_s` (this run) and `poll_timeout_s` (since the
    /// request was made), pausing `poll_interval_s`, doubling up to `MAX_POLL_INTERVAL_S`, or as
    /// long as the CA's `Retry-After` says. `just_accepted`: the CA answered "pending" a moment
    /// ago, so the first poll waits for its Retry-After (when it sent one).
    fn await_issue(
        &mut self,
        ca: &mut dyn CaBackend,
        id: &str,
        request: &Request,
        current: Option<&Current>,
        just_accepted: bool,
    ) -> Result<Issued> {
        let Some(polling) = ca.polling() else {
            return Err(Error::new(
                Kind::Internal,
                format!("{} answered a request id but does not poll", ca.name()),
            ));
        };
        let since = self.state.pending.as_ref().map_or_else(|| self.clock.now(), |p| p.since);
        let started = std::time::Instant::now();
        let mut pause = polling.interval_s;
        let mut wait = match (just_accepted, ca.retry_after()) {
            (true, Some(seconds)) => Some((seconds, "accepted".to_string())),
            _ => None,
        };
        loop {
            if let Some((seconds, words)) = wait.take() {
                if started.elapsed().as_secs().saturating_add(seconds) > polling.wait_s {
                    return Err(Error::temporary(format!(
                        "request {id} is still pending at {} ({words}); the next run resumes it",
                        ca.name()
                    )));
                }
                log::info!("request {id} is not ready ({words}); asking again in {seconds} s");
                std::thread::sleep(Duration::from_secs(seconds));
            }
            if self.clock.now() >= since.saturating_add(polling.timeout_s) {
                return Err(self.give_up(ca, id, polling.timeout_s));
            }
            let answer =
                ca.poll(id, request, current).context(format!("asking {} about request {id}", ca.name()))?;
            let words = match answer {
                Poll::Issued(issued) => return Ok(issued),
                Poll::Ended(error) => {
                    self.end_request()?;
                    return Err(error.context(format!("request {id} ended without a certificate")));
                }
                Poll::NotYet(words) => words,
            };
            wait = match ca.retry_after() {
                Some(seconds) => Some((seconds, words)),
                None => {
                    let this = pause;
                    pause = (pause * 2).min(MAX_POLL_INTERVAL_S.max(polling.interval_s));
                    Some((this, words))
                }
            };
        }
    }

    /// `poll_timeout_s` has passed: withdraw the request where the CA can and forget it.
    fn give_up(&mut self, ca: &mut dyn CaBackend, id: &str, timeout_s: u64) -> Error {
        let withdrawn = match ca.cancel(id) {
            Ok(()) => "",
            Err(e) => {
                log::warn!("could not withdraw request {id}: {}", e.chain_line());
                " (withdrawing it failed)"
            }
        };
        if let Err(e) = self.end_request() {
            return e;
        }
        Error::temporary(format!(
            "request {id} got no certificate within poll_timeout_s ({timeout_s} s); it was abandoned{withdrawn} \
             and the next run makes a new request"
        ))
    }

    /// Forgets the CA's request id; the slot and its key stay for the next request, which signs
    /// a new CSR (a remote key's CSR is Redtrust's and stays).
    fn end_request(&mut self) -> Result<()> {
        if let Some(pending) = self.state.pending.as_mut() {
            pending.request_id = None;
            let slot = pending.slot.clone();
            if !self.settings.key.provider.is_remote() {
                if let Err(e) = std::fs::remove_file(self.slot_path(&slot).join(REQUEST_CSR)) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        log::warn!("could not remove the CSR of an ended request: {e}");
                    }
                }
            }
        }
        self.save()
    }

    /// The certificate a pending slot already holds (written before finalize or install).
    fn received(&self, slot: &Path) -> Option<Issued> {
        let read = |name: &str| std::fs::read_to_string(slot.join(name)).ok();
        let chain = pki::parse_pem_certs(&read("chain.pem")?).ok()?;
        let (leaf, intermediates) = chain.split_first()?;
        let roots = read("ca.pem").and_then(|t| pki::parse_pem_certs(&t).ok()).unwrap_or_default();
        log::info!("{} already holds a certificate; installing it without a new request", slot.display());
        Some(Issued {
            leaf: leaf.der.clone(),
            intermediates: intermediates.iter().map(|c| c.der.clone()).collect(),
            roots: roots.into_iter().map(|c| c.der).collect(),
            ca_ref: self.state.pending.as_ref().and_then(|p| p.request_id.clone()),
        })
    }

    /// design.md §5 rule 2.
    fn verify(&self, spki: &[u8], issued: &Issued, known_ca: &[Cert]) -> Result<Verified> {
        let expectation = Expectation {
            spki,
            subject: &self.settings.subject,
            sans: &self.settings.san,
            known_ca,
            now: self.clock.now(),
        };
        let verified = pki::verify_issued(issued, &expectation).context("checking the issued certificate")?;
        for warning in &verified.warnings {
            log::warn!("{warning}");
        }
        Ok(verified)
    }

    fn write_identity(&self, slot: &Path, verified: &Verified) -> Result<()> {
        let chain: String = std::iter::once(&verified.leaf).chain(&verified.chain).map(Cert::pem).collect();
        let ca: String = verified.ca.iter().map(Cert::pem).collect();
        let write = |name: &str, text: &str| self.store.write_slot_file(slot, name, text.as_bytes(), 0o644);
        if !ca.is_empty() {
            write("ca.pem", &ca).context("writing the new identity")?;
        }
        // chain.pem last: its presence marks the slot as holding a received certificate.
        write("cert.pem", &verified.leaf.pem()).context("writing the new identity")?;
        write("chain.pem", &chain).context("writing the new identity")
    }

    /// Hands the certificate back to the remote key service; answers the key's URI.
    fn finalize_remote(&mut self, service: &mut dyn RemoteKeyService, leaf: &Cert) -> Result<String> {
        let provider = service.name();
        let Some(handle) = self.state.pending.as_ref().and_then(|p| p.key_ref.clone()) else {
            return Err(Error::new(Kind::Internal, format!("the {provider} request handle was lost")));
        };
        service.finalize(&handle, leaf).context(format!("handing the certificate to {provider}"))
    }

    /// The remote key service no longer knows this request (HTTP 404 on finalize): an earlier
    /// run's finalize was processed and its answer lost, or the request expired. It cannot
    /// complete either way, and installing its certificate unconfirmed could name a key the
    /// service does not hold; so it is abandoned (the installed identity stays) and the next run
    /// makes a new request, instead of failing the same way at every run.
    fn abandon_unknown_request(&mut self, error: Error) -> Error {
        if let Err(e) = self.abandon_pending() {
            return e;
        }
        Error::temporary(format!(
            "{}; the request was abandoned and the next run makes a new one",
            error.chain_line()
        ))
    }

    /// Swaps `current` to the verified slot and records the install.
    fn commit(
        &mut self,
        slot: &Path,
        verified: &Verified,
        ca_ref: Option<String>,
        purpose: Purpose,
    ) -> Result<Done> {
        let provider = self.provider()?;
        self.store
            .install(slot, &[], &|old| {
                crash_point("before-old-key-deleted");
                forget_key(provider, old)
            })
            .context("installing the new identity")?;
        crash_point("after-install");
        let live: Vec<PathBuf> =
            [self.store.current(), self.store.previous()].into_iter().flatten().collect();
        if let Err(e) = provider.retain(&live) {
            log::warn!("could not remove keys of old slots: {e}");
        }
        let now = self.clock.now();
        let leaf = &verified.leaf;
        self.state.pending = None;
        self.state.ca_ref = ca_ref;
        // The first renewal after an enrollment lands anywhere in (0, at_fraction] of the lifetime,
        // so a fleet enrolled together renews spread over a whole period, not in waves.
        let mut renewal = self.settings.renewal;
        if purpose == Purpose::Enroll {
            renewal.at_fraction *= 1.0 - random_unit();
        }
        self.state.renew_at =
            Some(renewal_time(leaf.not_before(), leaf.not_after(), &renewal, random_unit() * 2.0 - 1.0));
        // A new certificate has a window of its own: ask at the next chance.
        self.state.window_check_at = None;
        self.state.last_success = Some(now);
        self.state.last_install = Some(now);
        // The CA vouched for its notBefore (rule 2 checked it against our time): a device without
        // any clock still learns that it is at least this late.
        self.state.clock_floor = self.state.clock_floor.max(Some(leaf.not_before().min(now)));
        self.state.last_error = None;
        self.state.last_error_at = None;
        if purpose == Purpose::Renew {
            self.state.renewals += 1;
        }
        self.state.hook_error = self.run_hook(leaf).err();
        self.save()?;
        log::info!(
            "installed certificate serial {} (valid until {})",
            leaf.serial_hex(),
            time::rfc3339(leaf.not_after())
        );
        Ok(Done::Installed { serial: leaf.serial_hex(), purpose })
    }

    /// `hooks.after_install`, run once per install, without a shell. Its failure is reported,
    /// never a reason to roll back a good certificate.
    fn run_hook(&self, leaf: &Cert) -> std::result::Result<(), String> {
        let Some((program, args)) = self.settings.hooks.after_install.split_first() else {
            return Ok(());
        };
        let mut command = std::process::Command::new(program);
        command.args(args).env_clear().envs(self.hook_environment(leaf));
        let outcome = run_with_timeout(&mut command, Duration::from_secs(self.settings.hooks.timeout_s));
        if let Err(e) = &outcome {
            log::warn!("hook {program}: {e}");
        }
        outcome
    }

    /// What a hook sees: a fixed PATH and the `ENROLL_AGENT_*` variables, nothing inherited (our
    /// environment may hold a proxy password or a PIN-bearing module setting). A soft key is
    /// named by `ENROLL_AGENT_KEY`; a hardware or remote key by `ENROLL_AGENT_KEY_URI`.
    fn hook_environment(&self, leaf: &Cert) -> Vec<(&'static str, String)> {
        let current = self.store.current_link();
        let path_of = |name: &str| current.join(name).to_string_lossy().into_owned();
        let mut environment = vec![
            ("PATH", HOOK_PATH.to_string()),
            ("ENROLL_AGENT_SERIAL", leaf.serial_hex()),
            ("ENROLL_AGENT_CERT", path_of("cert.pem")),
            ("ENROLL_AGENT_CHAIN", path_of("chain.pem")),
            ("ENROLL_AGENT_NOT_AFTER", time::rfc3339(leaf.not_after())),
            ("ENROLL_AGENT_STATE_DIR", self.store.root().to_string_lossy().into_owned()),
        ];
        match std::fs::read_to_string(current.join("key.uri")) {
            Ok(uri) => environment.push(("ENROLL_AGENT_KEY_URI", uri.trim().to_string())),
            Err(_) => environment.push(("ENROLL_AGENT_KEY", path_of("key.pem"))),
        }
        environment
    }
}

/// design.md §5 rule 7: with no trustworthy clock, ask the CA for the time (its `Date` header,
/// recorded by the HTTP layer) before signing timestamps and judging validity.
fn learn_time_from_ca(http: &Http, url: &str) {
    log::warn!(
        "the system clock ({}) is before the earliest possible time ({}: this build or the last \
         known good time); asking the CA for the time",
        time::rfc3339(time::system_now()),
        time::rfc3339(http.clock().floor())
    );
    if let Err(e) = http.send("learning the time from the CA", "GET", url, &[], None) {
        log::warn!("{}", e.chain_line());
    }
}

/// Runs a hook in its own process group and waits at most `limit`. At the limit, or when `run`
/// is asked to stop, the whole group is killed: a hook's children (a `systemctl` it started, a
/// sleeping shell) go with it, and a slow hook never holds up SIGTERM.
fn run_with_timeout(command: &mut std::process::Command, limit: Duration) -> std::result::Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut child = command
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start: {e}"))?;
    let started = std::time::Instant::now();
    loop {
        let cut_short = match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("exited with {status}")),
            Err(e) => format!("could not wait for it: {e}"),
            Ok(None) if started.elapsed() > limit => {
                format!("killed after {} s (hooks.timeout_s)", limit.as_secs())
            }
            Ok(None) if crate::daemon::stop_requested() => "killed: the agent is stopping".to_string(),
            Ok(None) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        kill_group(&mut child);
        return Err(cut_short);
    }
}

/// SIGKILL to the hook's process group (its pid is the group id), then reaps the hook itself.
fn kill_group(child: &mut std::process::Child) {
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    if nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Reads state.json. A file we cannot parse is moved aside (and said so) rather than blocking
/// renewals forever: the identity itself lives in `current/`, not here.
fn load_state(store: &Store, writer: bool) -> Result<State> {
    let Some(bytes) = store.read_state().context("reading state.json")? else {
        return Ok(State::default());
    };
    match State::from_json(&bytes) {
        Ok(state) => Ok(state),
        Err(reason) if !writer => {
            log::warn!("state.json is unreadable ({reason}); the next enroll or renew moves it aside");
            Ok(State::default())
        }
        Err(reason) => {
            let moved = store.quarantine_state().context("setting aside an unreadable state.json")?;
            log::warn!(
                "state.json is unreadable ({reason}); moved it to {} and starting with empty state",
                moved.display()
            );
            Ok(State::default())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RenewalPolicy =
        RenewalPolicy { at_fraction: 0.66, jitter_fraction: 0.05, retry_initial_s: 30, retry_max_s: 21_600 };

    #[test]
    fn renewal_time_spreads_around_at_fraction_within_jitter() {
        assert_eq!(renewal_time(1000, 2000, &POLICY, 0.0), 1660);
        assert_eq!(renewal_time(1000, 2000, &POLICY, -1.0), 1610);
        assert_eq!(renewal_time(1000, 2000, &POLICY, 1.0), 1710);
        assert_eq!(renewal_time(1000, 2000, &POLICY, 7.0), 1710, "samples are clamped");
    }

    #[test]
    fn the_loop_guard_delays_renewal_right_after_an_install() {
        assert_eq!(guarded_renewal_time(100, Some(90), &POLICY), 150);
        assert_eq!(guarded_renewal_time(1000, Some(90), &POLICY), 1000);
        assert_eq!(guarded_renewal_time(100, None, &POLICY), 100);
    }

    #[test]
    fn absurd_times_from_state_json_saturate_instead_of_overflowing() {
        assert_eq!(guarded_renewal_time(100, Some(u64::MAX), &POLICY), u64::MAX);
        assert_eq!(guarded_renewal_time(u64::MAX, Some(u64::MAX - 1), &POLICY), u64::MAX);
        assert_eq!(renewal_time(u64::MAX - 10, u64::MAX, &POLICY, 0.0), u64::MAX - 4);
        assert_eq!(renewal_time(u64::MAX, 0, &POLICY, 1.0), u64::MAX);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_never_reaches_zero() {
        assert_eq!(backoff(0, &POLICY, 0.999_999), Duration::from_secs(29));
        assert_eq!(backoff(3, &POLICY, 0.999_999), Duration::from_secs(239));
        assert_eq!(backoff(40, &POLICY, 0.999_999), Duration::from_secs(21_599));
        assert_eq!(backoff(5, &POLICY, 0.0), Duration::from_secs(1));
    }

    #[test]
    fn a_failed_renewal_may_wait_an_eighth_of_the_validity_left() {
        let day = 86_400;
        // 30 days left: up to 3.75 days, from the first failure on.
        assert_eq!(retry_pause(0, &POLICY, Some(30 * day), 0, 0.999_999), Duration::from_secs(323_999));
        assert_eq!(retry_pause(0, &POLICY, Some(30 * day), 0, 0.0), Duration::from_secs(1));
        // Close to expiry, expired, or enrolling: backoff as it is.
        assert_eq!(retry_pause(3, &POLICY, Some(200), 0, 0.999_999), backoff(3, &POLICY, 0.999_999));
        assert_eq!(retry_pause(3, &POLICY, Some(1_000), 2_000, 0.5), backoff(3, &POLICY, 0.5));
        assert_eq!(retry_pause(3, &POLICY, None, 0, 0.5), backoff(3, &POLICY, 0.5));
    }

    #[test]
    fn condition_names_pending_first_then_expiry_then_due() {
        assert_eq!(condition(None, 0, false, 5), Condition::None);
        assert_eq!(condition(Some((0, 100)), 60, true, 5), Condition::Pending);
        assert_eq!(condition(Some((0, 100)), 60, false, 100), Condition::Expired);
        assert_eq!(condition(Some((0, 100)), 60, false, 60), Condition::RenewalDue);
        assert_eq!(condition(Some((0, 100)), 60, false, 59), Condition::Valid);
    }
}
