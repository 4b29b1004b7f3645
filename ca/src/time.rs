//! Time as the agent reasons about it: Unix seconds, RFC 3339 output, HTTP `Date` input, and the
//! clock rule of design.md §5 rule 7.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The raw system clock, whether or not it can be believed.
pub fn system_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// How far the system clock and an authenticated CA's `Date` may disagree and still count as
/// vouching for each other (a device clock drifts; a CA's clock is NTP-disciplined).
pub const CORROBORATION_TOLERANCE_S: u64 = 3600;

/// How far past the earliest possible time a persisted floor may be and still be believed:
/// longer than any device stays in service on one firmware.
const MAX_FLOOR_AHEAD_OF_BUILD_S: u64 = 50 * 365 * 86_400;

/// One run's view of time (design.md §5 rule 7). Each agent run (or gateway) owns one and hands
/// it to its transport: nothing about time is process-global, so two clients in one process
/// (tests, the gateway's upstreams) never see each other's server offsets.
#[derive(Debug, Default)]
pub struct Clock {
    /// The earliest time it can possibly be for this program: its build time (0: no floor).
    earliest: u64,
    /// The last-known-good time persisted in state.json (0: none yet); see [`Clock::floor`].
    persisted_floor: AtomicU64,
    /// Offset (server − system) learnt from a CA's `Date` header while the system clock is untrusted.
    server_offset: AtomicI64,
    have_server_time: AtomicBool,
    /// The latest time that both the system clock and an authenticated CA's `Date` vouched for.
    corroborated: AtomicU64,
}

impl Clock {
    /// A clock that knows it cannot be earlier than `earliest` (the agent's build time).
    pub fn new(earliest: u64) -> Clock {
        Clock { earliest, ..Clock::default() }
    }

    /// The earliest time it can possibly be: max(build time, the last-known-good time persisted
    /// in state.json). The floor only moves forward, and only on authenticated evidence (see
    /// [`Clock::corroborated`]), like systemd-timesyncd's saved clock.
    pub fn floor(&self) -> u64 {
        self.earliest.max(self.persisted_floor.load(Ordering::Relaxed))
    }

    /// Sets the persisted last-known-good time read from state.json; answers whether it was believed.
    pub fn set_persisted_floor(&self, unix: u64) -> bool {
        // The floor only ever comes from a corroborated clock or a certificate's notBefore, so one
        // far beyond the build is a corrupt state.json (a flipped bit), not time that has passed:
        // believing it would make every certificate look expired, for good.
        if unix > self.earliest.saturating_add(MAX_FLOOR_AHEAD_OF_BUILD_S) {
            log::warn!("state.json: ignoring clock_floor {unix}, implausibly far beyond this build");
            return false;
        }
        self.persisted_floor.fetch_max(unix, Ordering::Relaxed);
        true
    }

    /// The time used for every validity judgement except the CA's TLS certificate.
    pub fn now(&self) -> u64 {
        let offset =
            self.have_server_time.load(Ordering::Relaxed).then(|| self.server_offset.load(Ordering::Relaxed));
        effective_now(system_now(), self.floor(), offset)
    }

    /// The time the CA's TLS certificate is judged at: the system clock when it can be believed,
    /// else the floor. Never the CA's `Date`: that header arrives from a server we have not yet
    /// authenticated, so it must not decide whether we authenticate it.
    pub fn tls_now(&self) -> u64 {
        system_now().max(self.floor())
    }

    /// Whether the CA's time is known (only learnt while the system clock is untrusted).
    pub fn has_server_time(&self) -> bool {
        self.have_server_time.load(Ordering::Relaxed)
    }

    /// Whether the system clock can be believed: it is not before the floor.
    pub fn clock_trusted(&self) -> bool {
        system_now() >= self.floor()
    }

    /// A new last-known-good time, when this run has one: the system clock, if it is past the
    /// floor and a CA reached over verified TLS agreed with it (a battery-backed clock that jumped
    /// to 2099 must not raise the floor for good, or every certificate would look expired forever).
    pub fn corroborated(&self) -> Option<u64> {
        let at = self.corroborated.load(Ordering::Relaxed);
        (at > self.floor()).then_some(at)
    }

    /// Records a CA's `Date` header. `authenticated`: it came over TLS that verified the CA.
    pub fn observe_server_date(&self, server: u64, authenticated: bool) {
        let system = system_now();
        let floor = self.floor();
        if authenticated {
            if let Some(vouched) = vouches_for(system, server, floor) {
                self.corroborated.fetch_max(vouched, Ordering::Relaxed);
            }
        }
        if system >= floor {
            return;
        }
        if !self.have_server_time.swap(true, Ordering::Relaxed) {
            log::warn!(
                "system clock ({}) is before the earliest possible time ({}); using the CA's Date header \
                 ({}) for request timestamps and certificate checks",
                rfc3339(system),
                rfc3339(floor),
                rfc3339(server)
            );
        }
        self.server_offset.store(server as i64 - system as i64, Ordering::Relaxed);
    }
}

/// The clock rule as a pure function: trust the system clock unless it is before the floor;
/// then use the CA's time if we have heard it (never earlier than the floor), else the floor.
pub fn effective_now(system: u64, floor: u64, server_offset: Option<i64>) -> u64 {
    if system >= floor {
        return system;
    }
    match server_offset {
        Some(offset) => system.saturating_add_signed(offset).max(floor),
        None => floor,
    }
}

/// Whether an authenticated `Date` vouches for the system clock (pure, for tests).
pub fn vouches_for(system: u64, server: u64, floor: u64) -> Option<u64> {
    (system >= floor && system.abs_diff(server) <= CORROBORATION_TOLERANCE_S).then(|| system.min(server))
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

/// The years a time value may name: 1970 to 9999 (what X.509 and RFC 3339 can express). Values
/// from the network or `state.json` outside them are refused, so no arithmetic on them can overflow.
pub const YEARS: std::ops::RangeInclusive<i64> = 1970..=9999;
/// 9999-12-31T23:59:59Z, the last second [`rfc3339`] can print.
pub const MAX_UNIX: u64 = 253_402_300_799;

/// Seconds since the epoch for a UTC calendar date and time, with every field bounded (years
/// [`YEARS`]) and checked arithmetic; `None` for anything out of range.
fn unix_from_parts(year: i64, month: u32, day: u32, h: u64, mi: u64, s: u64) -> Option<u64> {
    if !YEARS.contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    let unix = days.checked_mul(86_400)?.checked_add(h * 3600 + mi * 60 + s)?;
    (unix <= MAX_UNIX).then_some(unix)
}

/// `2026-11-22T18:55:00Z`; a value past [`MAX_UNIX`] (only from a corrupt `state.json`) prints
/// as 9999-12-31T23:59:59Z.
pub fn rfc3339(unix: u64) -> String {
    let unix = unix.min(MAX_UNIX);
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
    if parts.next()? != "GMT" {
        return None;
    }
    unix_from_parts(year, month, day, h, mi, s)
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
    let mut hms = clock.split(':').map(|p| p.parse::<u64>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next().flatten().unwrap_or(0));
    let local = unix_from_parts(year, month, day, h, mi, s)?;
    let (east, offset) = match zone {
        "" | "Z" | "z" => (true, 0),
        _ => {
            let (oh, om) = zone[1..].split_once(':').unwrap_or((&zone[1..], "0"));
            let (oh, om) = (oh.parse::<u64>().ok()?, om.parse::<u64>().ok()?);
            if oh > 23 || om > 59 {
                return None;
            }
            (!zone.starts_with('-'), oh * 3600 + om * 60)
        }
    };
    let unix = if east { local.checked_sub(offset)? } else { local.checked_add(offset)? };
    (unix <= MAX_UNIX).then_some(unix)
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
    fn absurd_years_from_the_network_or_state_json_are_refused_without_overflow() {
        // Issue 14 item 5: this Date panicked a debug build (and wrapped in release).
        assert_eq!(parse_http_date("Thu, 01 Jan 99999999999999 00:00:00 GMT"), None);
        assert_eq!(parse_http_date("Thu, 01 Jan 9223372036854775807 00:00:00 GMT"), None);
        assert_eq!(parse_http_date("Thu, 01 Jan -9223372036854775808 00:00:00 GMT"), None);
        assert_eq!(parse_http_date("Wed, 31 Dec 1969 23:59:59 GMT"), None, "before 1970");
        assert_eq!(parse_http_date("Fri, 01 Jan 10000 00:00:00 GMT"), None, "after 9999");
        assert_eq!(parse_http_date("Fri, 31 Dec 9999 23:59:59 GMT"), Some(MAX_UNIX));
        assert_eq!(parse_http_date("Fri, 31 Dec 9999 23:59:60 GMT"), None);
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_rfc3339("99999999999999-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("9223372036854775807-12-31T23:59:59Z"), None);
        assert_eq!(parse_rfc3339("2026-11-22T18:55:00+9999999999999999:00"), None, "absurd offset");
        assert_eq!(parse_rfc3339("2026-11-22T18:55:00+24:00"), None);
        assert_eq!(parse_rfc3339("1970-01-01T00:30:00+01:00"), None, "before the epoch");
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59-01:00"), None, "after 9999 in UTC");
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59Z"), Some(MAX_UNIX));
        assert_eq!(parse_rfc3339("2026-11-22T17:55:00-01:00"), Some(1_795_373_700));
        assert_eq!(rfc3339(MAX_UNIX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z", "a corrupt state.json value");
    }

    #[test]
    fn the_clock_rule_prefers_the_ca_date_when_the_system_clock_is_before_the_build() {
        let build = 1_800_000_000;
        assert_eq!(effective_now(build + 5, build, Some(99)), build + 5, "a sane clock is believed");
        assert_eq!(effective_now(10, build, None), build, "no clock, no CA time: the build time");
        assert_eq!(effective_now(10, build, Some(1_900_000_000 - 10)), 1_900_000_000);
        assert_eq!(effective_now(10, build, Some(5)), build, "a CA's Date never goes below the floor");
    }

    #[test]
    fn only_an_authenticated_date_that_agrees_with_the_clock_raises_the_floor() {
        let floor = 1_800_000_000;
        assert_eq!(vouches_for(floor + 100, floor + 160, floor), Some(floor + 100));
        assert_eq!(vouches_for(floor + 100, floor + 40, floor), Some(floor + 40), "the earlier of the two");
        assert_eq!(vouches_for(4_000_000_000, floor + 100, floor), None, "a clock that jumped ahead");
        assert_eq!(vouches_for(10, floor + 100, floor), None, "a clock before the floor");
    }
}
