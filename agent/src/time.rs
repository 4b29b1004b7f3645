//! Time as the agent reasons about it: Unix seconds, RFC 3339 output, HTTP `Date` input, and the
//! clock rule of design.md §5 rule 7.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// When this binary was built (from build.rs); a clock earlier than this is known to be wrong.
pub fn build_time() -> u64 {
    env!("ENROLL_AGENT_BUILD_UNIX").parse().unwrap_or(0)
}

/// The raw system clock, whether or not it can be believed.
pub fn system_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Offset (server − system) learnt from a CA's `Date` header while the system clock is untrusted.
static SERVER_OFFSET: AtomicI64 = AtomicI64::new(0);
static HAVE_SERVER_TIME: AtomicBool = AtomicBool::new(false);

/// The time used for every validity judgement.
pub fn now() -> u64 {
    let offset = HAVE_SERVER_TIME.load(Ordering::Relaxed).then(|| SERVER_OFFSET.load(Ordering::Relaxed));
    effective_now(system_now(), build_time(), offset)
}

/// Whether the CA's time is known (only learnt while the system clock is untrusted).
pub fn has_server_time() -> bool {
    HAVE_SERVER_TIME.load(Ordering::Relaxed)
}

/// Whether the system clock can be believed.
pub fn clock_trusted() -> bool {
    system_now() >= build_time()
}

/// The clock rule as a pure function: trust the system clock unless it is before the build time;
/// then use the CA's time if we have heard it, else the build time (the earliest plausible "now").
pub fn effective_now(system: u64, build: u64, server_offset: Option<i64>) -> u64 {
    if system >= build {
        return system;
    }
    match server_offset {
        Some(offset) => system.saturating_add_signed(offset),
        None => build,
    }
}

/// Records a CA's `Date` header. Only used when the system clock is untrusted.
pub fn observe_server_date(server: u64) {
    let system = system_now();
    if system >= build_time() {
        return;
    }
    if !HAVE_SERVER_TIME.swap(true, Ordering::Relaxed) {
        log::warn!(
            "system clock is before this build ({}); using the CA's Date header ({})",
            rfc3339(system),
            rfc3339(server)
        );
    }
    SERVER_OFFSET.store(server as i64 - system as i64, Ordering::Relaxed);
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-22T18:55:00Z`
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Parses an HTTP IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 §5.6.7).
pub fn parse_http_date(text: &str) -> Option<u64> {
    let mut parts = text.split_whitespace();
    let _weekday = parts.next()?;
    let day: u32 = parts.next()?.parse().ok()?;
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month_name = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)? as u32 + 1;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || day == 0 || day > 31 || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    u64::try_from(days).ok().map(|d| d * 86_400 + h * 3600 + mi * 60 + s)
}

/// Parses RFC 3339 date-times such as `2026-11-22T18:55:00Z`, `…T18:55:00.123+01:00`.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let (date, rest) = text.trim().split_once(['T', 't', ' '])?;
    let mut ymd = date.split('-');
    let (year, month, day): (i64, u32, u32) =
        (ymd.next()?.parse().ok()?, ymd.next()?.parse().ok()?, ymd.next()?.parse().ok()?);
    let zone_at = rest.find(['Z', 'z', '+', '-']).unwrap_or(rest.len());
    let (clock, zone) = rest.split_at(zone_at);
    let clock = clock.split('.').next()?;
    let mut hms = clock.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next().flatten().unwrap_or(0));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let offset = match zone {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (oh, om) = zone[1..].split_once(':').unwrap_or((&zone[1..], "0"));
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    let unix = days_from_civil(year, month, day) * 86_400 + h * 3600 + mi * 60 + s - offset;
    u64::try_from(unix).ok()
}

/// `3d 4h`, `5h 12m`, `40s`: for humans reading `status`.
pub fn human_duration(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let s = seconds.unsigned_abs();
    let text = match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {}h", s / 86_400, s / 3600 % 24),
    };
    format!("{sign}{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_rfc3339("2026-11-22T18:55:00Z"), Some(1_795_373_700));
        assert_eq!(parse_rfc3339("2026-11-22T19:55:00.5+01:00"), Some(1_795_373_700));
        assert_eq!(parse_rfc3339("2026-13-22T18:55:00Z"), None);
        assert_eq!(rfc3339(784_111_777), "1994-11-06T08:49:37Z");
        assert_eq!(rfc3339(1_709_164_800), "2024-02-29T00:00:00Z");
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT"), Some(1_709_164_800));
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
        assert_eq!(parse_http_date("garbage"), None);
    }

    #[test]
    fn the_clock_rule_prefers_the_ca_date_when_the_system_clock_is_before_the_build() {
        let build = 1_800_000_000;
        assert_eq!(effective_now(build + 5, build, Some(99)), build + 5, "a sane clock is believed");
        assert_eq!(effective_now(10, build, None), build, "no clock, no CA time: the build time");
        assert_eq!(effective_now(10, build, Some(1_900_000_000 - 10)), 1_900_000_000);
    }
}
