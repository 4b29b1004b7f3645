//! `status`, `check` and `needs-renewal`: read-only views of the identity and the setup.

use crate::config::Settings;
use crate::error::{Context, Error, Result};
use crate::json::{self, Value};
use crate::lifecycle::{self, Condition};
use crate::pki::Cert;
use crate::state::State;
use crate::time;

/// Everything `status` shows, gathered without network or writes.
struct Snapshot {
    condition: Condition,
    cert: Option<Cert>,
    renew_at: Option<u64>,
    state: State,
    current: std::path::PathBuf,
    /// The run's effective time the condition was judged at.
    now: u64,
}

fn snapshot(settings: &Settings) -> Result<Snapshot> {
    let current = settings.state_dir.join("current");
    if !settings.state_dir.exists() {
        let state = State::default();
        let now = crate::time::system_now();
        return Ok(Snapshot { condition: Condition::None, cert: None, renew_at: None, state, current, now });
    }
    // Checks the directory's mode and owner (exit 74 naming it), like every other command, but
    // neither waits for a running renewal's lock nor writes anything.
    let agent = lifecycle::Agent::inspect(settings)?;
    let installed = agent.installed();
    let renew_at = installed.as_ref().map(|i| agent.renew_at(i));
    let cert = installed.map(|i| i.cert);
    let now = agent.clock().now();
    let condition = lifecycle::condition(
        cert.as_ref().map(|c| (c.not_before(), c.not_after())),
        renew_at.unwrap_or(0),
        // Outstanding at the CA: a request it accepted and will answer. A slot kept only so a
        // retry reuses its key is not a pending request.
        agent.state.pending.as_ref().is_some_and(|p| p.request_id.is_some()),
        now,
    );
    Ok(Snapshot { condition, cert, renew_at, state: agent.state, current, now })
}

pub fn status(settings: &Settings, as_json: bool) -> Result<String> {
    let snap = snapshot(settings)?;
    Ok(if as_json {
        status_json(settings, &snap).to_json_pretty() + "\n"
    } else {
        status_text(settings, &snap)
    })
}

fn status_json(settings: &Settings, snap: &Snapshot) -> Value {
    let cert = snap.cert.as_ref();
    let rfc = |t: Option<u64>| t.map(time::rfc3339);
    let path = |name: &str| snap.current.join(name).display().to_string();
    let credentials = settings.ca.credentials();
    // Only a request the CA accepted is "pending"; a slot kept so a retry reuses its key is not.
    let pending = snap.state.pending.as_ref().filter(|p| p.request_id.is_some()).map_or(Value::Null, |p| {
        json::object([
            ("request_id", p.request_id.clone().into()),
            ("since", time::rfc3339(p.since).into()),
            ("purpose", p.purpose.name().into()),
        ])
    });
    json::object([
        ("state", snap.condition.name().into()),
        ("subject", cert.map(Cert::subject).into()),
        (
            "san",
            Value::Array(
                cert.map(Cert::san_strings).unwrap_or_default().into_iter().map(Value::from).collect(),
            ),
        ),
        ("issuer", cert.map(Cert::issuer).into()),
        ("serial", cert.map(Cert::serial_hex).into()),
        ("not_before", rfc(cert.map(Cert::not_before)).into()),
        ("not_after", rfc(cert.map(Cert::not_after)).into()),
        ("renew_at", rfc(snap.renew_at).into()),
        (
            "key",
            json::object([
                ("algorithm", settings.key.algorithm.name().into()),
                ("provider", settings.key.provider.name().into()),
                ("uri", key_uri(snap).into()),
                ("remote", settings.key.provider.is_remote().into()),
            ]),
        ),
        ("backend", settings.ca.name().into()),
        (
            "credentials",
            json::object([("enroll", credentials.enroll.into()), ("renew", credentials.renew.into())]),
        ),
        ("pending", pending),
        ("last_error", snap.state.last_error.clone().into()),
        ("last_success", rfc(snap.state.last_success).into()),
        ("hook_error", snap.state.hook_error.clone().into()),
        ("renewals", snap.state.renewals.into()),
        (
            "paths",
            json::object([
                ("cert", path("cert.pem").into()),
                ("chain", path("chain.pem").into()),
                // A remote key has no file on this device.
                ("key", (!settings.key.provider.is_remote()).then(|| path("key.pem")).into()),
            ]),
        ),
    ])
}

fn status_text(settings: &Settings, snap: &Snapshot) -> String {
    let mut lines = vec![format!("state:       {}", snap.condition.name())];
    let credentials = settings.ca.credentials();
    if let Some(cert) = &snap.cert {
        let now = snap.now as i64;
        let left = cert.not_after() as i64 - now;
        lines.push(format!("subject:     {}", cert.subject()));
        lines.push(format!("SANs:        {}", cert.san_strings().join(", ")));
        lines.push(format!("issuer:      {}", cert.issuer()));
        lines.push(format!("serial:      {}", cert.serial_hex()));
        lines.push(format!("not before:  {}", time::rfc3339(cert.not_before())));
        lines.push(format!(
            "not after:   {} ({} left)",
            time::rfc3339(cert.not_after()),
            time::human_duration(left)
        ));
        if let Some(at) = snap.renew_at {
            lines.push(format!(
                "renew at:    {} (in {})",
                time::rfc3339(at),
                // `at` may come from state.json: saturate rather than wrap or overflow.
                time::human_duration(i64::try_from(at).unwrap_or(i64::MAX).saturating_sub(now))
            ));
        }
    }
    let provider = settings.key.provider.name();
    lines.push(match key_uri(snap) {
        Some(uri) if settings.key.provider.is_remote() => format!(
            "key:         {} held remotely by {provider} ({uri}); it never leaves that server",
            settings.key.algorithm.name()
        ),
        Some(uri) => format!("key:         {} ({provider} provider, {uri})", settings.key.algorithm.name()),
        None => format!("key:         {} ({provider} provider)", settings.key.algorithm.name()),
    });
    lines.push(format!("backend:     {}", settings.ca.name()));
    lines.push(format!("enrolls with {}", credentials.enroll));
    lines.push(format!("renews with  {}", credentials.renew));
    lines.push(match snap.state.pending.as_ref().filter(|p| p.request_id.is_some()) {
        Some(p) => format!(
            "pending:     {} request {} since {}",
            p.purpose.name(),
            p.request_id.as_deref().unwrap_or_default(),
            time::rfc3339(p.since)
        ),
        None => "pending:     none".into(),
    });
    lines.push(format!("last error:  {}", snap.state.last_error.as_deref().unwrap_or("none")));
    if let Some(hook) = &snap.state.hook_error {
        lines.push(format!("hook error:  {hook}"));
    }
    match (snap.cert.is_some(), settings.key.provider.is_remote()) {
        (true, false) => {
            lines.push(format!("identity:    {}/{{cert,chain,key}}.pem", snap.current.display()))
        }
        (true, true) => {
            lines.push(format!("identity:    {}/{{cert,chain}}.pem + key.uri", snap.current.display()))
        }
        _ => {}
    }
    lines.join("\n") + "\n"
}

/// Prometheus text exposition of the identity's health, for node_exporter's textfile collector.
/// Times are Unix seconds; absent values are left out rather than written as 0.
pub fn metrics_text(settings: &Settings) -> Result<String> {
    let snap = snapshot(settings)?;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: Option<u64>| {
        if let Some(value) = value {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
        }
    };
    let cert = snap.cert.as_ref();
    gauge(
        "enroll_agent_certificate_not_after_seconds",
        "notAfter of the installed certificate.",
        cert.map(Cert::not_after),
    );
    gauge(
        "enroll_agent_certificate_not_before_seconds",
        "notBefore of the installed certificate.",
        cert.map(Cert::not_before),
    );
    gauge(
        "enroll_agent_renew_at_seconds",
        "When the installed certificate is due for renewal.",
        snap.renew_at,
    );
    gauge(
        "enroll_agent_last_success_seconds",
        "Time of the last successful enrollment or renewal.",
        snap.state.last_success,
    );
    gauge(
        "enroll_agent_last_error_seconds",
        "Time of the last failed run, while it is not followed by a success.",
        snap.state.last_error_at,
    );
    gauge(
        "enroll_agent_last_run_failed",
        "1 when the last enroll/renew run failed (see status for the error).",
        Some(u64::from(snap.state.last_error.is_some())),
    );
    gauge(
        "enroll_agent_pending_request",
        "1 while a request accepted by the CA is outstanding.",
        Some(u64::from(snap.condition == Condition::Pending)),
    );
    gauge(
        "enroll_agent_identity_valid",
        "1 when an installed certificate is valid now.",
        Some(u64::from(matches!(snap.condition, Condition::Valid | Condition::RenewalDue))),
    );
    out.push_str(&format!(
        "# HELP enroll_agent_renewals_total Renewals installed since the state directory was created.\n\
         # TYPE enroll_agent_renewals_total counter\nenroll_agent_renewals_total {}\n",
        snap.state.renewals
    ));
    out.push_str(&format!(
        "# HELP enroll_agent_info Build and configuration.\n# TYPE enroll_agent_info gauge\n\
         enroll_agent_info{{version=\"{}\",backend=\"{}\",provider=\"{}\",algorithm=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        settings.ca.name(),
        settings.key.provider.name(),
        settings.key.algorithm.name()
    ));
    Ok(out)
}

/// Rewrites the metrics file, if one is configured (atomically, so a scraper never reads half a
/// file). Failure is logged: metrics must never turn a good run into a failed one.
pub fn write_metrics(settings: &Settings) {
    let Some(path) = &settings.metrics_file else {
        return;
    };
    let written = metrics_text(settings).and_then(|text| {
        enroll_hal::store::write_file_atomic(path, text.as_bytes(), 0o644).map_err(Error::from)
    });
    if let Err(e) = written {
        log::warn!("could not write the metrics file {}: {}", path.display(), e.chain_line());
    }
}

/// `current/key.uri`: where a hardware or remote key lives.
fn key_uri(snap: &Snapshot) -> Option<String> {
    snap.cert.as_ref()?;
    let text = std::fs::read_to_string(snap.current.join("key.uri")).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// `needs-renewal`: true when enrollment or renewal is due (or a request is pending).
pub fn needs_renewal(settings: &Settings) -> Result<bool> {
    let snap = snapshot(settings)?;
    Ok(snap.condition != Condition::Valid)
}

/// `check [--online]`: config (already parsed), storage, key, trust bundle, optionally the CA.
pub fn check(settings: &Settings, online: bool) -> Result<String> {
    let mut lines = vec!["ok: config".to_string()];
    if settings.state_dir.exists() {
        let agent = lifecycle::Agent::inspect(settings)?;
        lines.push(format!("ok: state directory {}", agent.store().root().display()));
        if let Some(slot) = agent.store().current() {
            let provider = agent.provider()?;
            let key = provider.load(&slot).context("checking the installed key")?;
            let installed =
                agent.installed().ok_or_else(|| Error::storage("current/cert.pem is unreadable"))?;
            if key.public_key_spki() != installed.cert.spki_der() {
                return Err(Error::storage(format!("{}: the key does not match cert.pem", slot.display())));
            }
            lines.push(format!("ok: installed key matches the certificate ({} provider)", provider.name()));
        } else {
            lines.push("ok: no identity installed yet".into());
        }
    } else {
        lines.push(format!("ok: state directory {} will be created on enroll", settings.state_dir.display()));
    }
    let clock = std::sync::Arc::new(crate::time::Clock::new(crate::build_time()));
    let transport = crate::tls::Transport::from_settings(&settings.tls, clock)?;
    lines.push(format!("ok: trust bundle ({} roots)", transport.roots.len()));
    if online {
        let http = crate::http::Http::new(transport)?;
        let backend = settings.ca.client(http.clone());
        let url = backend.probe_url();
        let response = http.send("reaching the CA", "GET", &url, &[], None)?;
        // Only an https:// URL went through TLS; tls.danger_allow_http lets a lab CA use http://.
        let tls = url.get(..8).is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
        let protection = backend.plain_http_protection();
        let channel = match (tls, protection) {
            (true, _) => "verified TLS".to_string(),
            (false, Some(protection)) => format!("plain HTTP; {protection}"),
            (false, None) => "plain HTTP".to_string(),
        };
        lines.push(format!(
            "ok: {} reachable over {channel} (HTTP {} from {url})",
            backend.name(),
            response.status
        ));
        if !tls && protection.is_none() {
            lines.push(
                "warning: no TLS: nothing authenticates the CA or protects the requests (tls.danger_allow_http)"
                    .into(),
            );
        }
    }
    Ok(lines.join("\n") + "\n")
}
